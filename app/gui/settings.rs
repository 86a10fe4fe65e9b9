//! What the studio remembers between runs (eframe storage): theme, recent models, output folder, the last
//! quantize targets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::theme::ThemeChoice;

/// At most this many recent models are kept.
pub const MAX_RECENT: usize = 10;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub theme: ThemeChoice,
    /// Where evaluation, chat, importance matrices and calibrated quantization run.
    pub backend: quant_engine::backend::Backend,
    /// Most recent first.
    pub recent: Vec<PathBuf>,
    /// Where quantized variants go (`None`: beside the model, in `<name>-quants/`).
    pub output_dir: Option<PathBuf>,
    /// GGUF mixes ticked last time (`"Q4_K_M"`).
    pub gguf_targets: Vec<String>,
    /// GPTQ bit widths ticked last time.
    pub gptq_bits: Vec<u8>,
    /// Calibration-free packed formats ticked last time (`"nf4"`).
    #[serde(default)]
    pub packed_targets: Vec<String>,
    /// Time estimates learned on this machine: per recipe timing key (`"gguf"`, `"gguf-imatrix"`,
    /// `"gptq"`), the measured / estimated ratio of finished runs.
    pub time_factors: std::collections::BTreeMap<String, TimeFactor>,
    /// Evaluation results by what was evaluated (variant and base files, text, context, chunks,
    /// arithmetic: [`super::compare::eval_key`]), so nothing is evaluated twice, across sessions too.
    pub evals: std::collections::BTreeMap<String, StoredEval>,
}

/// At most this many evaluation results are remembered.
pub const MAX_STORED_EVALS: usize = 2000;

/// One remembered evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredEval {
    pub ppl: Option<(f64, f64)>,
    pub kld: Option<(f64, f64)>,
    pub same_top: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    /// The engine's warning about this evaluation (the text is the variant's calibration text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
}

/// A learned correction of the time estimates for one kind of run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimeFactor {
    /// Measured / estimated, averaged in log space (each new run weighs a half: the machine's load
    /// changes).
    pub factor: f64,
    /// Finished runs it was learned from.
    pub runs: u32,
}

impl TimeFactor {
    /// The factor after a run that took `measured` seconds where `estimated` were expected.
    pub fn learn(prev: Option<TimeFactor>, measured: f64, estimated: f64) -> Option<TimeFactor> {
        if !(measured > 0.0 && estimated > 0.0 && measured.is_finite() && estimated.is_finite()) {
            return prev;
        }
        let r = (measured / estimated).clamp(1e-3, 1e3);
        Some(match prev {
            None => TimeFactor { factor: r, runs: 1 },
            Some(p) => TimeFactor {
                factor: (0.5 * p.factor.ln() + 0.5 * r.ln()).exp(),
                runs: p.runs.saturating_add(1),
            },
        })
    }
}

impl Settings {
    /// Put `path` first in the recent list (once), dropping the oldest beyond [`MAX_RECENT`].
    pub fn remember(&mut self, path: PathBuf) {
        self.recent.retain(|p| p != &path);
        self.recent.insert(0, path);
        self.recent.truncate(MAX_RECENT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_models_are_unique_newest_first_and_bounded() {
        let mut s = Settings::default();
        for i in 0..15 {
            s.remember(PathBuf::from(format!("/m/{i}")));
        }
        s.remember(PathBuf::from("/m/7"));
        assert_eq!(s.recent.len(), MAX_RECENT);
        assert_eq!(s.recent[0], PathBuf::from("/m/7"));
        assert_eq!(s.recent[1], PathBuf::from("/m/14"));
        assert_eq!(s.recent.iter().filter(|p| p.ends_with("7")).count(), 1);
        // Settings from an older version (missing fields) still load.
        let old: Settings = serde_json::from_str(r#"{"recent": ["/a"]}"#).expect("parse");
        assert_eq!(old.recent, vec![PathBuf::from("/a")]);
        assert_eq!(old.theme, ThemeChoice::Dark);
    }

    #[test]
    fn time_factors_learn_from_runs() {
        let t = TimeFactor::learn(None, 20.0, 10.0).expect("first");
        assert_eq!(
            t,
            TimeFactor {
                factor: 2.0,
                runs: 1
            }
        );
        let t = TimeFactor::learn(Some(t), 80.0, 10.0).expect("second");
        assert!((t.factor - 4.0).abs() < 1e-9, "geometric mean of 2 and 8");
        assert_eq!(t.runs, 2);
        assert_eq!(
            TimeFactor::learn(Some(t), 0.0, 10.0),
            Some(t),
            "a zero time teaches nothing"
        );
    }
}
