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
    /// Most recent first.
    pub recent: Vec<PathBuf>,
    /// Where quantized variants go (`None`: beside the model, in `<name>-quants/`).
    pub output_dir: Option<PathBuf>,
    /// GGUF mixes ticked last time (`"Q4_K_M"`).
    pub gguf_targets: Vec<String>,
    /// GPTQ bit widths ticked last time.
    pub gptq_bits: Vec<u8>,
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
}
