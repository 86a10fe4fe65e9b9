//! Native file dialogs (rfd) on their own threads: a modal dialog on the UI thread would freeze the window.
//! The result comes back on a channel and the UI reads it next frame.
//!
//! A dialog that cannot open (no desktop portal, no zenity: common on minimal desktops and remote
//! sessions) looks to rfd like a cancel. One that comes back empty faster than a person can cancel is taken
//! as a failure: the user is told so, and a small window asks for the path as text instead. The same
//! window is offered on purpose by every picker's "Type a path…" entry ([`Dialogs::type_path`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use eframe::egui;

/// What a dialog was opened for, with the path the user chose.
#[derive(Clone, Debug, PartialEq)]
pub enum Picked {
    /// A model to open (folder or .gguf).
    Model(PathBuf),
    /// The folder quantized variants are written to.
    OutputDir(PathBuf),
    /// A calibration text file for quantization.
    CalibFile(PathBuf),
    /// An evaluation text file for the compare panel.
    EvalFile(PathBuf),
    /// Where to save the compare table as CSV.
    SaveCsv(PathBuf),
    /// Where to save a chart as PNG (with the chart's id).
    SavePng(PathBuf, String),
    /// Where to save the chat transcript.
    SaveTranscript(PathBuf),
    /// A draft model for the chat's speculative decoding (folder or .gguf).
    DraftModel(PathBuf),
}

/// What a picker asks for (the path still to come).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PickKind {
    ModelFile,
    ModelFolder,
    OutputDir,
    CalibFile,
    EvalFile,
    SaveCsv,
    /// A chart's PNG (the chart's id).
    SavePng(String),
    SaveTranscript,
    /// A draft model file for the chat.
    DraftModel,
}

impl PickKind {
    /// The dialog's title, also the typed-path window's question.
    pub fn title(&self) -> &'static str {
        match self {
            PickKind::ModelFile => "Open a model (.gguf, or a folder's config.json)",
            PickKind::ModelFolder => "Open a Hugging Face model folder",
            PickKind::OutputDir => "Where to write the quantized models",
            PickKind::CalibFile => "Calibration data (.txt, .jsonl, .parquet)",
            PickKind::EvalFile => "Evaluation text",
            PickKind::SaveCsv => "Save the comparison table",
            PickKind::SavePng(_) => "Save the chart",
            PickKind::SaveTranscript => "Save the conversation",
            PickKind::DraftModel => {
                "A draft model (.gguf, or a folder's config.json) with the same tokenizer"
            }
        }
    }

    /// The result for `path`.
    pub fn picked(&self, path: PathBuf) -> Picked {
        match self {
            PickKind::ModelFile | PickKind::ModelFolder => {
                // A config.json stands for its folder.
                if path.file_name().is_some_and(|n| n == "config.json") {
                    Picked::Model(path.parent().map(PathBuf::from).unwrap_or(path))
                } else {
                    Picked::Model(path)
                }
            }
            PickKind::OutputDir => Picked::OutputDir(path),
            PickKind::CalibFile => Picked::CalibFile(path),
            PickKind::EvalFile => Picked::EvalFile(path),
            PickKind::SaveCsv => Picked::SaveCsv(path),
            PickKind::SavePng(chart) => Picked::SavePng(path, chart.clone()),
            PickKind::SaveTranscript => Picked::SaveTranscript(path),
            PickKind::DraftModel => {
                if path.file_name().is_some_and(|n| n == "config.json") {
                    Picked::DraftModel(path.parent().map(PathBuf::from).unwrap_or(path))
                } else {
                    Picked::DraftModel(path)
                }
            }
        }
    }

    fn dialog(&self) -> rfd::FileDialog {
        let d = rfd::FileDialog::new().set_title(self.title());
        match self {
            PickKind::ModelFile | PickKind::DraftModel => d
                .add_filter("GGUF", &["gguf"])
                .add_filter("Hugging Face config", &["json"]),
            PickKind::CalibFile => {
                d.add_filter("text, JSON lines, Parquet", &["txt", "jsonl", "parquet"])
            }
            PickKind::EvalFile => d.add_filter("text", &["txt", "raw"]),
            PickKind::SaveCsv => d.set_file_name("comparison.csv"),
            PickKind::SavePng(chart) => d.set_file_name(format!("{chart}.png")),
            PickKind::SaveTranscript => d.set_file_name("conversation.md"),
            PickKind::ModelFolder | PickKind::OutputDir => d,
        }
    }

    /// Run the native dialog (blocking: on a dialog thread).
    fn run(&self) -> Option<PathBuf> {
        let d = self.dialog();
        match self {
            PickKind::ModelFolder | PickKind::OutputDir => d.pick_folder(),
            PickKind::ModelFile
            | PickKind::DraftModel
            | PickKind::CalibFile
            | PickKind::EvalFile => d.pick_file(),
            PickKind::SaveCsv | PickKind::SavePng(_) | PickKind::SaveTranscript => d.save_file(),
        }
    }
}

/// A dialog that returns nothing sooner than this could not have been cancelled by a person.
const FAILED_WITHIN: Duration = Duration::from_millis(400);

enum Message {
    Picked(Picked),
    Failed(PickKind),
}

/// The typed-path window's state.
#[derive(Clone, Debug, PartialEq)]
pub struct TypedPath {
    pub kind: PickKind,
    pub text: String,
    /// Why it is shown: the dialog failed (`true`) or the user asked for it.
    pub after_failure: bool,
}

pub struct Dialogs {
    tx: Sender<Message>,
    rx: Receiver<Message>,
    ctx: egui::Context,
    /// The typed-path window, when open.
    pub typed: Option<TypedPath>,
}

impl Dialogs {
    pub fn new(ctx: egui::Context) -> Self {
        let (tx, rx) = unbounded();
        Self {
            tx,
            rx,
            ctx,
            typed: None,
        }
    }

    /// Results that arrived since the last frame; a dialog that failed opens the typed-path window and is
    /// returned as `Err` so the caller can say so.
    pub fn poll(&mut self) -> Vec<Result<Picked, PickKind>> {
        let mut out = Vec::new();
        for m in self.rx.try_iter() {
            match m {
                Message::Picked(p) => out.push(Ok(p)),
                Message::Failed(kind) => {
                    self.typed = Some(TypedPath {
                        kind: kind.clone(),
                        text: String::new(),
                        after_failure: true,
                    });
                    out.push(Err(kind));
                }
            }
        }
        out
    }

    /// For tests and the walkthrough: act as if the user picked this.
    pub fn inject(&self, p: Picked) {
        let _ = self.tx.send(Message::Picked(p));
    }

    /// For tests: act as if the dialog for `kind` could not open.
    pub fn inject_failure(&self, kind: PickKind) {
        let _ = self.tx.send(Message::Failed(kind));
    }

    /// Ask for the path as text instead of with a dialog.
    pub fn type_path(&mut self, kind: PickKind) {
        self.typed = Some(TypedPath {
            kind,
            text: String::new(),
            after_failure: false,
        });
    }

    /// A picker's "Type…" entry: opens the typed-path window for `kind`.
    pub fn type_button(&mut self, ui: &mut egui::Ui, kind: PickKind) {
        if ui
            .small_button("Type…")
            .on_hover_text("Type a path instead of using the file dialog")
            .clicked()
        {
            self.type_path(kind);
        }
    }

    /// Open the native dialog for `kind` on its own thread.
    pub fn open(&self, kind: PickKind) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let _ = std::thread::Builder::new()
            .name("file-dialog".into())
            .spawn(move || {
                let start = Instant::now();
                let msg = match kind.run() {
                    Some(p) => Message::Picked(kind.picked(p)),
                    None if start.elapsed() < FAILED_WITHIN => Message::Failed(kind),
                    None => return,
                };
                let _ = tx.send(msg);
                ctx.request_repaint();
            });
    }

    pub fn pick_model_folder(&self) {
        self.open(PickKind::ModelFolder);
    }

    pub fn pick_model_file(&self) {
        self.open(PickKind::ModelFile);
    }

    pub fn pick_output_dir(&self) {
        self.open(PickKind::OutputDir);
    }

    pub fn pick_calib_file(&self) {
        self.open(PickKind::CalibFile);
    }

    pub fn pick_eval_file(&self) {
        self.open(PickKind::EvalFile);
    }

    pub fn save_csv(&self) {
        self.open(PickKind::SaveCsv);
    }

    pub fn save_png(&self, chart: &str) {
        self.open(PickKind::SavePng(chart.to_owned()));
    }

    /// The typed-path window, when open: a text field, "Use this path" and "Cancel". A path that is
    /// used goes through the same channel as a dialog's.
    pub fn ui(&mut self, ctx: &egui::Context) {
        let Some(t) = self.typed.as_mut() else {
            return;
        };
        let mut done: Option<bool> = None;
        egui::Window::new("Type the path")
            .collapsible(false)
            .resizable(false)
            .anchor(egui::Align2::CENTER_CENTER, egui::vec2(0.0, 0.0))
            .show(ctx, |ui| {
                if t.after_failure {
                    ui.colored_label(
                        ui.visuals().warn_fg_color,
                        "The file dialog could not open (no desktop portal or zenity here).",
                    );
                }
                let label = ui.label(t.kind.title());
                let edit = ui
                    .add(
                        egui::TextEdit::singleline(&mut t.text)
                            .desired_width(420.0)
                            .hint_text("/path/to/…"),
                    )
                    .labelled_by(label.id);
                let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                ui.horizontal(|ui| {
                    let ok = !t.text.trim().is_empty();
                    if ui
                        .add_enabled(ok, egui::Button::new("Use this path"))
                        .clicked()
                        || (ok && enter)
                    {
                        done = Some(true);
                    }
                    if ui.button("Cancel").clicked() {
                        done = Some(false);
                    }
                });
            });
        match done {
            Some(true) => {
                if let Some(t) = self.typed.take() {
                    let path = expand_home(t.text.trim());
                    let _ = self.tx.send(Message::Picked(t.kind.picked(path)));
                    ctx.request_repaint();
                }
            }
            Some(false) => self.typed = None,
            None => {}
        }
    }
}

/// `~/x` → `$HOME/x`; anything else as typed.
fn expand_home(s: &str) -> PathBuf {
    match (s.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_make_their_results() {
        let p = PathBuf::from("/m/config.json");
        assert_eq!(
            PickKind::ModelFile.picked(p),
            Picked::Model(PathBuf::from("/m"))
        );
        assert_eq!(
            PickKind::SavePng("kld".into()).picked("/a.png".into()),
            Picked::SavePng("/a.png".into(), "kld".into())
        );
        assert_eq!(expand_home("/x/y"), PathBuf::from("/x/y"));
    }
}
