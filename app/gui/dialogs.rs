//! Native file dialogs (rfd) on their own threads: a modal dialog on the UI thread would freeze the window.
//! The result comes back on a channel and the UI reads it next frame.

use std::path::PathBuf;

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
}

pub struct Dialogs {
    tx: Sender<Picked>,
    rx: Receiver<Picked>,
    ctx: egui::Context,
}

impl Dialogs {
    pub fn new(ctx: egui::Context) -> Self {
        let (tx, rx) = unbounded();
        Self { tx, rx, ctx }
    }

    /// Results that arrived since the last frame.
    pub fn poll(&self) -> Vec<Picked> {
        self.rx.try_iter().collect()
    }

    /// For tests and the walkthrough: act as if the user picked this.
    pub fn inject(&self, p: Picked) {
        let _ = self.tx.send(p);
    }

    fn spawn(&self, f: impl FnOnce() -> Option<Picked> + Send + 'static) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let _ = std::thread::Builder::new()
            .name("file-dialog".into())
            .spawn(move || {
                if let Some(p) = f() {
                    let _ = tx.send(p);
                    ctx.request_repaint();
                }
            });
    }

    pub fn pick_model_folder(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Open a Hugging Face model folder")
                .pick_folder()
                .map(Picked::Model)
        });
    }

    pub fn pick_model_file(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Open a model")
                .add_filter("GGUF", &["gguf"])
                .add_filter("Hugging Face config", &["json"])
                .pick_file()
                .map(|p| {
                    // A config.json stands for its folder.
                    if p.file_name().is_some_and(|n| n == "config.json") {
                        Picked::Model(p.parent().map(PathBuf::from).unwrap_or(p))
                    } else {
                        Picked::Model(p)
                    }
                })
        });
    }

    pub fn pick_output_dir(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Where to write the quantized models")
                .pick_folder()
                .map(Picked::OutputDir)
        });
    }

    pub fn pick_calib_file(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Calibration data")
                .add_filter("text, JSON lines, Parquet", &["txt", "jsonl", "parquet"])
                .pick_file()
                .map(Picked::CalibFile)
        });
    }

    pub fn pick_eval_file(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Evaluation text")
                .add_filter("text", &["txt", "raw"])
                .pick_file()
                .map(Picked::EvalFile)
        });
    }

    pub fn save_csv(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Save the comparison table")
                .set_file_name("comparison.csv")
                .save_file()
                .map(Picked::SaveCsv)
        });
    }

    pub fn save_png(&self, chart: &str) {
        let chart = chart.to_owned();
        self.spawn(move || {
            rfd::FileDialog::new()
                .set_title("Save the chart")
                .set_file_name(format!("{chart}.png"))
                .save_file()
                .map(|p| Picked::SavePng(p, chart))
        });
    }
}
