//! Progress bars on stderr, drawn from the engine's `Progress` and `EvalChunk` events; hidden when stderr
//! is not a terminal.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use quant_engine::jobs::{Event, STAGE_CONVERT};

/// The bar of the current stage (one at a time).
pub struct Bars {
    visible: bool,
    current: Option<(String, ProgressBar)>,
}

impl Bars {
    pub fn new() -> Self {
        Self {
            visible: std::io::stderr().is_terminal(),
            current: None,
        }
    }

    /// Whether bars are drawn.
    pub fn visible(&self) -> bool {
        self.visible
    }

    fn bar(&mut self, stage: &str, total: u64) -> &ProgressBar {
        let same = self
            .current
            .as_ref()
            .is_some_and(|(s, b)| s == stage && b.length() == Some(total));
        if !same {
            self.finish();
            let bar = if self.visible {
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            } else {
                ProgressBar::hidden()
            };
            let template = if stage == STAGE_CONVERT {
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} ({binary_bytes_per_sec}, ETA {eta})"
            } else {
                "{prefix} [{bar:30}] {pos}/{len} {msg} (elapsed {elapsed}, ETA {eta})"
            };
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(stage.to_owned());
            bar.enable_steady_tick(Duration::from_millis(250));
            self.current = Some((stage.to_owned(), bar));
        }
        match &self.current {
            Some((_, b)) => b,
            None => unreachable!("a bar was just made"),
        }
    }

    /// Update from an event (others are ignored).
    pub fn on_event(&mut self, ev: &Event) {
        match ev {
            Event::Progress {
                stage, done, total, ..
            } => {
                let (done, total) = (*done, *total);
                let bar = self.bar(stage, total);
                bar.set_position(done);
                if done >= total {
                    self.finish();
                }
            }
            Event::EvalChunk { progress: p, .. } => {
                let bar = self.bar("evaluating", p.n_chunks as u64);
                bar.set_position(p.done() as u64);
                bar.set_message(format!(
                    "PPL {:.4}, {:.0} tokens/s",
                    p.ppl, p.tokens_per_sec
                ));
                if p.done() >= p.n_chunks {
                    self.finish();
                }
            }
            Event::Notice { message, .. } => self.suspend(|| eprintln!("warning: {message}")),
            _ => {}
        }
    }

    /// Run `f` (which prints) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.current {
            Some((_, b)) => b.suspend(f),
            None => f(),
        }
    }

    /// Remove the current bar.
    pub fn finish(&mut self) {
        if let Some((_, b)) = self.current.take() {
            b.finish_and_clear();
        }
    }
}
