//! The compare tab: pick variants and an evaluation text, run perplexity (the source) and KL-divergence
//! against the source (every variant) one after another, with per-chunk curves while they run; then bar
//! charts of PPL and KLD, a KLD-versus-bpw scatter with the Pareto frontier, and a table (size, bpw,
//! PPL ± err, KLD, top-token agreement, tokens/s) that exports as CSV; charts export as PNG.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, TryRecvError};
use eframe::egui;
use egui_plot::{Bar, BarChart, HoverPosition, Legend, Line, Plot, PlotPoints, Points};
use quant_engine::eval::EvalOptions;
use quant_engine::infer::Numerics;
use quant_engine::jobs::{Command, EvalText, Event, JobId, JobOutput};

use super::dialogs::Picked;
use super::theme::series_color;
use super::{human_bytes, Owner, Shared};

/// One variant's evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub label: String,
    pub path: PathBuf,
    pub is_source: bool,
    pub size_bytes: Option<u64>,
    pub bpw: Option<f64>,
    pub job: Option<JobId>,
    pub running: bool,
    pub error: Option<String>,
    pub ppl: Option<(f64, f64)>,
    pub kld: Option<(f64, f64)>,
    /// Share of positions where the variant's top token is the source's.
    pub same_top: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    /// (chunk, running PPL) as chunks finish.
    pub ppl_curve: Vec<[f64; 2]>,
    /// (chunk, running KLD).
    pub kld_curve: Vec<[f64; 2]>,
    /// What was evaluated ([`eval_key`]); results are remembered under it.
    pub key: String,
    /// The numbers came from an earlier evaluation of exactly this (not run again).
    pub remembered: bool,
    /// While running: chunks done, chunks in all, seconds left.
    pub progress: Option<(u64, u64, f64)>,
    /// The engine's warning about this evaluation ([`Event::Notice`]).
    pub notice: Option<String>,
}

/// A file's (or folder's) identity for the results store: size and modification time of the file, or of
/// every file in the folder. Cheap (no hashing of gigabytes) and changes whenever the file is rewritten.
fn fingerprint(p: &std::path::Path) -> String {
    let one = |m: std::fs::Metadata| {
        let t = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        format!("{}@{t}", m.len())
    };
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => {
            let mut parts: Vec<String> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| Some((e.file_name(), e.metadata().ok()?)))
                        .filter(|(_, m)| m.is_file())
                        .map(|(n, m)| format!("{}={}", n.to_string_lossy(), one(m)))
                        .collect()
                })
                .unwrap_or_default();
            parts.sort();
            parts.join(",")
        }
        Ok(m) => one(m),
        Err(_) => "missing".into(),
    }
}

/// The results store's key of evaluating `model` (against `base` for KLD) on `text` with these options,
/// on `backend` (a GPU's numbers, tokens per second above all, are kept apart from the CPU's; CPU keys
/// are as before the backend was part of them).
pub fn eval_key(
    model: &std::path::Path,
    base: Option<&std::path::Path>,
    text: Option<&std::path::Path>,
    n_ctx: usize,
    max_chunks: usize,
    numerics: Numerics,
    backend: quant_engine::backend::Backend,
) -> String {
    let base = base.map_or_else(String::new, |b| {
        format!("{}#{}", b.display(), fingerprint(b))
    });
    let text = text.map_or_else(
        || quant_engine::eval::DEFAULT_EVAL_NAME.to_string(),
        |t| format!("{}#{}", t.display(), fingerprint(t)),
    );
    let on = match backend {
        quant_engine::backend::Backend::Cpu => String::new(),
        b => format!("|{}", b.name()),
    };
    format!(
        "{}#{}|base={base}|text={text}|ctx={n_ctx}|chunks={max_chunks}|{numerics:?}{on}",
        model.display(),
        fingerprint(model)
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChartView {
    Curves,
    Bars,
    Scatter,
}

pub struct ComparePanel {
    /// Paths of the ticked variants.
    pub picked: Vec<PathBuf>,
    /// `None`: the bundled text.
    pub text: Option<PathBuf>,
    pub n_ctx: usize,
    pub max_chunks: usize,
    /// Round activations as llama.cpp's CPU backend does (its `llama-perplexity` numbers), not exact f32.
    pub llama_numerics: bool,
    pub rows: Vec<Row>,
    pub chart: ChartView,
    /// Where each chart was last drawn (for PNG export).
    chart_rects: HashMap<String, egui::Rect>,
    /// A PNG export waiting for its screenshot.
    pending_png: Option<(PathBuf, String)>,
    /// The screenshot asked for that export.
    screenshot: Option<Screenshot>,
}

impl Default for ComparePanel {
    fn default() -> Self {
        Self {
            picked: Vec::new(),
            text: None,
            n_ctx: 512,
            max_chunks: 20,
            llama_numerics: false,
            rows: Vec::new(),
            chart: ChartView::Curves,
            chart_rects: HashMap::new(),
            pending_png: None,
            screenshot: None,
        }
    }
}

/// Indices of the rows on the KLD-versus-bpw Pareto frontier (no other row is both smaller and closer to
/// the source), by increasing bpw.
pub fn pareto(rows: &[Row]) -> Vec<usize> {
    let mut pts: Vec<(usize, f64, f64)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_source)
        .filter_map(|(i, r)| Some((i, r.bpw?, r.kld?.0)))
        .collect();
    pts.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)));
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for (i, _, k) in pts {
        if k < best {
            best = k;
            out.push(i);
        }
    }
    out
}

/// The table as CSV (one header line, one line per row; empty cells for what is not known).
pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "variant,path,size_bytes,bpw,ppl,ppl_err,kld,kld_err,same_top,tokens_per_sec\n",
    );
    let f = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    for r in rows {
        let quote = |t: &str| {
            if t.contains([',', '"', '\n']) {
                format!("\"{}\"", t.replace('"', "\"\""))
            } else {
                t.to_string()
            }
        };
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            quote(&r.label),
            quote(&r.path.display().to_string()),
            r.size_bytes.map(|b| b.to_string()).unwrap_or_default(),
            f(r.bpw),
            f(r.ppl.map(|p| p.0)),
            f(r.ppl.map(|p| p.1)),
            f(r.kld.map(|p| p.0)),
            f(r.kld.map(|p| p.1)),
            f(r.same_top),
            f(r.tokens_per_sec),
        ));
    }
    s
}

impl ComparePanel {
    pub fn on_dialog(&mut self, shared: &mut Shared, p: &Picked) {
        match p {
            Picked::EvalFile(f) => self.text = Some(f.clone()),
            Picked::SaveCsv(f) => match std::fs::write(f, to_csv(&self.rows)) {
                Ok(()) => shared.notes.info("Table saved", f.display().to_string()),
                Err(e) => shared
                    .notes
                    .error(format!("Could not write {}", f.display()), e.to_string()),
            },
            Picked::SavePng(f, chart) => self.pending_png = Some((f.clone(), chart.clone())),
            _ => {}
        }
    }

    fn numerics(&self) -> Numerics {
        if self.llama_numerics {
            Numerics::LlamaCpu
        } else {
            Numerics::Exact
        }
    }

    /// Start evaluating every ticked variant (the source first: its perplexity; the others' KLD against
    /// it). Runs one at a time.
    pub fn run(&mut self, shared: &mut Shared) {
        if shared.source.is_none() {
            shared.notes.error("Open a model first", "");
            return;
        }
        let src = shared.source_path().map(PathBuf::from);
        let numerics = self.numerics();
        let previous = std::mem::take(&mut self.rows);
        self.rows = shared
            .variants
            .iter()
            .filter(|v| v.is_source || self.picked.contains(&v.path))
            .map(|v| {
                let base = (!v.is_source).then_some(src.as_deref()).flatten();
                let key = eval_key(
                    &v.path,
                    base,
                    self.text.as_deref(),
                    self.n_ctx,
                    self.max_chunks,
                    numerics,
                    shared.settings.backend,
                );
                // A row evaluated in this session with the same key keeps everything (curves too); else
                // a remembered result fills it in; else it is evaluated.
                if let Some(r) = previous
                    .iter()
                    .find(|r| r.key == key && r.error.is_none() && !r.running && r.job.is_some())
                {
                    return r.clone();
                }
                let mut row = Row {
                    label: v.label.clone(),
                    path: v.path.clone(),
                    is_source: v.is_source,
                    size_bytes: v.size_bytes,
                    bpw: v.bpw,
                    key: key.clone(),
                    ..Row::default()
                };
                if let Some(e) = shared.settings.evals.get(&key) {
                    row.ppl = e.ppl;
                    row.kld = e.kld;
                    row.same_top = e.same_top;
                    row.tokens_per_sec = e.tokens_per_sec;
                    row.notice = e.notice.clone();
                    row.remembered = true;
                }
                row
            })
            .collect();
        self.pump(shared);
    }

    fn pump(&mut self, shared: &mut Shared) {
        if self.rows.iter().any(|r| r.running) {
            return;
        }
        let Some(src) = shared.source_path().map(PathBuf::from) else {
            return;
        };
        let Some(i) = self
            .rows
            .iter()
            .position(|r| r.job.is_none() && r.error.is_none() && !r.remembered)
        else {
            return;
        };
        let text = match &self.text {
            Some(f) => EvalText::File(f.clone()),
            None => EvalText::Bundled,
        };
        let row = &self.rows[i];
        let cmd = Command::Evaluate {
            model: row.path.clone(),
            base: (!row.is_source).then(|| src.clone()),
            text,
            options: EvalOptions {
                n_ctx: self.n_ctx,
                max_chunks: Some(self.max_chunks),
                numerics: self.numerics(),
                allow_long_context: false,
                backend: quant_engine::backend::Backend::Cpu,
            },
        };
        match shared.submit(Owner::Compare, cmd) {
            Some(job) => {
                self.rows[i].job = Some(job);
                self.rows[i].running = true;
            }
            None => self.rows[i].error = Some("the engine did not take it".into()),
        }
    }

    pub fn on_event(&mut self, shared: &mut Shared, ev: Event) {
        let job = ev.job();
        let Some(r) = self.rows.iter_mut().find(|r| r.job == Some(job)) else {
            return;
        };
        match ev {
            Event::EvalChunk { progress, .. } => {
                let x = progress.done() as f64;
                r.ppl_curve.push([x, progress.ppl]);
                if let Some(k) = progress.kld {
                    r.kld_curve.push([x, k.kld.value]);
                }
                r.tokens_per_sec = Some(progress.tokens_per_sec);
                r.progress = Some((
                    progress.done() as u64,
                    progress.n_chunks as u64,
                    progress.eta_secs,
                ));
            }
            Event::Finished { output, .. } => {
                r.running = false;
                match output {
                    JobOutput::Perplexity(p) => {
                        r.ppl = Some((p.ppl, p.ppl_err));
                        r.tokens_per_sec = Some(p.tokens_per_sec);
                    }
                    JobOutput::Kld(k) => {
                        r.ppl = Some((k.stats.ppl.value, k.stats.ppl.unc));
                        r.kld = Some((k.stats.kld.mean.value, k.stats.kld.mean.unc));
                        r.same_top = Some(k.stats.same_top.value);
                        r.tokens_per_sec = Some(k.tokens_per_sec);
                    }
                    _ => {}
                }
                let stored = &mut shared.settings.evals;
                if stored.len() >= super::settings::MAX_STORED_EVALS {
                    stored.clear();
                }
                stored.insert(
                    r.key.clone(),
                    super::settings::StoredEval {
                        ppl: r.ppl,
                        kld: r.kld,
                        same_top: r.same_top,
                        tokens_per_sec: r.tokens_per_sec,
                        notice: r.notice.clone(),
                    },
                );
                self.pump(shared);
            }
            Event::Failed { error, .. } => {
                r.running = false;
                shared
                    .notes
                    .error(format!("Evaluating {} failed", r.label), &error);
                r.error = Some(error);
                self.pump(shared);
            }
            Event::Cancelled { .. } => {
                r.running = false;
                r.error = Some("cancelled".into());
                self.pump(shared);
            }
            Event::Notice { message, .. } => r.notice = Some(message),
            _ => {}
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        self.take_screenshot(ui.ctx(), shared);
        if shared.source.is_none() {
            ui.heading("Open a model first");
            return;
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("Variants:");
            for v in shared.variants.iter().filter(|v| !v.is_source) {
                let mut on = self.picked.contains(&v.path);
                if ui.checkbox(&mut on, &v.label).changed() {
                    if on {
                        self.picked.push(v.path.clone());
                    } else {
                        self.picked.retain(|p| p != &v.path);
                    }
                }
            }
            if shared.variants.len() <= 1 {
                ui.weak("(quantize the model first)");
            }
        });
        ui.horizontal(|ui| {
            ui.label("Text:");
            ui.label(
                self.text
                    .as_ref()
                    .map_or("bundled (held out from calibration)".into(), |f| {
                        super::model::display_name(f)
                    }),
            );
            if ui.button("File…").clicked() {
                shared.dialogs.pick_eval_file();
            }
            shared
                .dialogs
                .type_button(ui, super::dialogs::PickKind::EvalFile);
            if self.text.is_some() && ui.button("Bundled").clicked() {
                self.text = None;
            }
            ui.separator();
            let label = ui.label("context");
            ui.add(egui::DragValue::new(&mut self.n_ctx).range(16..=8192))
                .labelled_by(label.id);
            let label = ui.label("chunks");
            ui.add(egui::DragValue::new(&mut self.max_chunks).range(1..=10_000))
                .labelled_by(label.id);
            let running = self.rows.iter().any(|r| r.running);
            ui.add_enabled(
                !running,
                egui::Checkbox::new(&mut self.llama_numerics, "llama.cpp arithmetic"),
            )
            .on_hover_text(
                    "Round activations as llama.cpp's CPU backend does (8-bit or f16 per weight type, f16 KV \
                     cache): the numbers llama-perplexity prints. Off: exact f32 activations.",
            );
            ui.separator();
            if ui
                .add_enabled(!running, egui::Button::new("Evaluate"))
                .clicked()
            {
                self.run(shared);
            }
            if running && ui.button("Cancel").clicked() {
                for r in self.rows.iter().filter(|r| r.running) {
                    if let Some(j) = r.job {
                        shared.send(Command::Cancel(j));
                    }
                }
                for r in self.rows.iter_mut().filter(|r| r.job.is_none()) {
                    r.error = Some("cancelled".into());
                }
            }
        });
        // A calibrated variant scored on its own calibration text looks better than it is: the engine says
        // so per variant (from what the file records); gather the warnings here.
        let flattered: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.notice.is_some())
            .map(|r| r.label.as_str())
            .collect();
        if !flattered.is_empty() {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!(
                    "⚠ {} evaluated on the text {} calibrated on: the numbers flatter them. Pick held-out \
                     text (the bundled default is held out).",
                    flattered.join(", "),
                    if flattered.len() == 1 { "it was" } else { "they were" }
                ),
            );
        }
        ui.separator();
        self.table(ui, shared);
        ui.separator();
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.chart, ChartView::Curves, "Per-chunk curves");
            ui.selectable_value(&mut self.chart, ChartView::Bars, "PPL and KLD");
            ui.selectable_value(&mut self.chart, ChartView::Scatter, "KLD vs bpw");
            if ui.button("Save chart as PNG…").clicked() {
                let id = match self.chart {
                    ChartView::Curves => "curves",
                    ChartView::Bars => "bars",
                    ChartView::Scatter => "scatter",
                };
                shared.dialogs.save_png(id);
            }
        });
        match self.chart {
            ChartView::Curves => self.curves(ui),
            ChartView::Bars => self.bars(ui),
            ChartView::Scatter => self.scatter(ui),
        }
    }

    fn table(&self, ui: &mut egui::Ui, shared: &mut Shared) {
        egui::Grid::new("compare-table")
            .num_columns(8)
            .striped(true)
            .show(ui, |ui| {
                for h in [
                    "variant", "size", "bpw", "PPL", "KLD", "same top", "tokens/s", "",
                ] {
                    ui.strong(h);
                }
                ui.end_row();
                for r in &self.rows {
                    let l = ui.label(&r.label);
                    if r.remembered {
                        l.on_hover_text(
                            "remembered: this exact file, text and settings were evaluated before",
                        );
                    }
                    ui.label(r.size_bytes.map(human_bytes).unwrap_or_default());
                    ui.label(r.bpw.map(|b| format!("{b:.2}")).unwrap_or_default());
                    ui.label(
                        r.ppl
                            .map(|(p, e)| format!("{p:.3} ± {e:.3}"))
                            .unwrap_or_default(),
                    );
                    ui.label(
                        r.kld
                            .map(|(k, e)| format!("{k:.4} ± {e:.4}"))
                            .unwrap_or_default(),
                    );
                    ui.label(
                        r.same_top
                            .map(|s| format!("{:.1} %", s * 100.0))
                            .unwrap_or_default(),
                    );
                    ui.label(
                        r.tokens_per_sec
                            .map(|t| format!("{t:.0}"))
                            .unwrap_or_default(),
                    );
                    if r.running {
                        match r.progress {
                            Some((done, total, eta)) => super::progress_bar(
                                ui,
                                (done, total),
                                Some(eta),
                                format!("chunk {done}/{total}"),
                                200.0,
                            ),
                            None => {
                                ui.spinner();
                            }
                        }
                    } else if let Some(e) = &r.error {
                        ui.colored_label(ui.visuals().error_fg_color, "✖")
                            .on_hover_text(e);
                    } else if let Some(n) = &r.notice {
                        ui.colored_label(ui.visuals().warn_fg_color, "⚠ calibration text")
                            .on_hover_text(n);
                    } else {
                        ui.label("");
                    }
                    ui.end_row();
                }
            });
        if !self.rows.is_empty() && ui.button("Export CSV…").clicked() {
            shared.dialogs.save_csv();
        }
    }

    fn remember_rect(&mut self, id: &str, rect: egui::Rect) {
        self.chart_rects.insert(id.to_string(), rect);
    }

    fn curves(&mut self, ui: &mut egui::Ui) {
        let half = (ui.available_width() - 8.0) / 2.0;
        let height = ui.available_height().max(160.0);
        let rows = &self.rows;
        let r = ui
            .horizontal(|ui| {
                Plot::new("ppl-curves")
                    .legend(Legend::default())
                    .width(half)
                    .height(height)
                    .x_axis_label("chunks")
                    .y_axis_label("PPL")
                    .show(ui, |plot| {
                        for (i, r) in rows.iter().enumerate() {
                            plot.line(
                                Line::new(&r.label, PlotPoints::from(r.ppl_curve.clone()))
                                    .color(series_color(i)),
                            );
                        }
                    });
                Plot::new("kld-curves")
                    .legend(Legend::default())
                    .width(half)
                    .height(height)
                    .x_axis_label("chunks")
                    .y_axis_label("KLD")
                    .show(ui, |plot| {
                        for (i, r) in rows.iter().enumerate().filter(|(_, r)| !r.is_source) {
                            plot.line(
                                Line::new(&r.label, PlotPoints::from(r.kld_curve.clone()))
                                    .color(series_color(i)),
                            );
                        }
                    });
            })
            .response
            .rect;
        self.remember_rect("curves", r);
    }

    fn bars(&mut self, ui: &mut egui::Ui) {
        let half = (ui.available_width() - 8.0) / 2.0;
        let height = ui.available_height().max(160.0);
        let rows = &self.rows;
        let bar = |i: usize, r: &Row, v: f64| {
            Bar::new(i as f64, v)
                .name(&r.label)
                .fill(series_color(i))
                .width(0.7)
        };
        let r = ui
            .horizontal(|ui| {
                let ppl: Vec<Bar> = rows
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| Some(bar(i, r, r.ppl?.0)))
                    .collect();
                let kld: Vec<Bar> = rows
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| Some(bar(i, r, r.kld?.0)))
                    .collect();
                let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
                let labels2 = labels.clone();
                Plot::new("ppl-bars")
                    .width(half)
                    .height(height)
                    .y_axis_label("PPL")
                    .x_axis_formatter(move |m, _| axis_label(&labels, m.value))
                    .show(ui, |plot| plot.bar_chart(BarChart::new("PPL", ppl)));
                Plot::new("kld-bars")
                    .width(half)
                    .height(height)
                    .y_axis_label("KLD vs source")
                    .x_axis_formatter(move |m, _| axis_label(&labels2, m.value))
                    .show(ui, |plot| plot.bar_chart(BarChart::new("KLD", kld)));
            })
            .response
            .rect;
        self.remember_rect("bars", r);
    }

    fn scatter(&mut self, ui: &mut egui::Ui) {
        let front = pareto(&self.rows);
        let rows = &self.rows;
        let (lo_bpw, hi_bpw) = rows
            .iter()
            .filter(|r| r.kld.is_some() || r.is_source)
            .filter_map(|r| r.bpw)
            .fold((f64::MAX, f64::MIN), |(lo, hi), b| (lo.min(b), hi.max(b)));
        let (lo_bpw, hi_bpw) = if lo_bpw <= hi_bpw {
            (lo_bpw - 0.5, hi_bpw + 0.5)
        } else {
            (0.0, 16.0)
        };
        let resp = Plot::new("kld-vs-bpw")
            .legend(Legend::default().position(egui_plot::Corner::LeftBottom))
            .x_axis_label("bits per weight")
            .y_axis_label("KLD vs source")
            .include_y(0.0)
            .include_x(lo_bpw)
            .include_x(hi_bpw)
            .label_formatter(|pos| match pos {
                HoverPosition::NearDataPoint {
                    plot_name,
                    position: p,
                    ..
                } if !plot_name.is_empty() => {
                    Some(format!("{plot_name}\n{:.2} bpw\nKLD {:.4}", p.x, p.y))
                }
                _ => None,
            })
            .show(ui, |plot| {
                for (i, r) in rows.iter().enumerate() {
                    // The source sits at KLD 0 (by definition), at its own bpw.
                    let kld = if r.is_source { Some((0.0, 0.0)) } else { r.kld };
                    if let (Some(b), Some(k)) = (r.bpw, kld) {
                        plot.points(
                            Points::new(&r.label, vec![[b, k.0]])
                                .radius(6.0)
                                .color(series_color(i)),
                        );
                        // Error bar: ± one standard uncertainty of the mean KLD.
                        if k.1 > 0.0 && k.1.is_finite() {
                            plot.line(
                                Line::new(
                                    "",
                                    PlotPoints::from(vec![[b, k.0 - k.1], [b, k.0 + k.1]]),
                                )
                                .color(series_color(i)),
                            );
                        }
                        // Every point says what it is, without hovering.
                        plot.text(
                            egui_plot::Text::new(
                                "",
                                egui_plot::PlotPoint::new(b, k.0),
                                format!("  {}", r.label),
                            )
                            .anchor(egui::Align2::LEFT_BOTTOM)
                            .color(series_color(i)),
                        );
                    }
                }
                let line: Vec<[f64; 2]> = front
                    .iter()
                    .filter_map(|&i| Some([rows[i].bpw?, rows[i].kld?.0]))
                    .collect();
                if line.len() > 1 {
                    plot.line(
                        Line::new("Pareto frontier", PlotPoints::from(line))
                            .color(egui::Color32::GRAY)
                            .style(egui_plot::LineStyle::dashed_loose()),
                    );
                }
            });
        self.remember_rect("scatter", resp.response.rect);
    }

    /// Answer a pending PNG export: ask for a screenshot, then crop the chart out of it.
    fn take_screenshot(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some((path, chart)) = self.pending_png.clone() else {
            return;
        };
        let shot = self
            .screenshot
            .get_or_insert_with(|| Screenshot::request(ctx))
            .poll();
        let image = match shot {
            Ok(None) => return,
            Ok(Some(image)) => image,
            Err(e) => {
                self.screenshot = None;
                self.pending_png = None;
                shared.notes.error("Could not save the chart", e);
                return;
            }
        };
        self.screenshot = None;
        self.pending_png = None;
        let rect = self.chart_rects.get(&chart).copied();
        let img = match rect {
            Some(r) => image.region(&r, Some(ctx.pixels_per_point())),
            None => (*image).clone(),
        };
        match save_png(&img, &path) {
            Ok(()) => shared.notes.info("Chart saved", path.display().to_string()),
            Err(e) => shared.notes.error("Could not save the chart", e),
        }
    }
}

/// A screenshot of the window asked for on one frame, delivered after a later one.
pub struct Screenshot(Receiver<Arc<egui::ColorImage>>);

impl Screenshot {
    /// Ask for a screenshot of the next frame (and a repaint once it has come).
    pub fn request(ctx: &egui::Context) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let repaint = ctx.clone();
        ctx.request_screenshot(move |image| {
            let _ = tx.send(image);
            repaint.request_repaint();
        });
        Self(rx)
    }

    /// The image once it has come; `Ok(None)` while it has not; an error if it never will.
    pub fn poll(&self) -> Result<Option<Arc<egui::ColorImage>>, String> {
        match self.0.try_recv() {
            Ok(image) => Ok(Some(image)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err("the window gave no screenshot".to_string()),
        }
    }
}

fn axis_label(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).cloned().unwrap_or_default()
}

/// Write an egui image as PNG.
pub fn save_png(img: &egui::ColorImage, path: &std::path::Path) -> Result<(), String> {
    let [w, h] = img.size;
    let bytes: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
    let buf = image::RgbaImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| "bad image size".to_string())?;
    buf.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, bpw: f64, kld: f64) -> Row {
        Row {
            label: label.into(),
            bpw: Some(bpw),
            kld: Some((kld, 0.001)),
            ..Row::default()
        }
    }

    #[test]
    fn pareto_frontier_and_csv() {
        let mut src = row("source", 16.0, 0.0);
        src.is_source = true;
        let rows = vec![
            src,
            row("Q4_K_M", 4.9, 0.05),
            row("Q3_K_M", 3.9, 0.13),
            row("Q4_0", 4.5, 0.09),
            row("worse", 5.0, 0.2),
            row("Q8_0", 8.5, 0.001),
        ];
        assert_eq!(pareto(&rows), vec![2, 3, 1, 5]);
        let csv = to_csv(&rows[..2]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[2].starts_with("Q4_K_M,,,4.900000,,,0.050000,0.001000,,"),
            "{}",
            lines[2]
        );
        let quoted = to_csv(&[row("a,b", 1.0, 1.0)]);
        assert!(quoted
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("\"a,b\",")));
    }
}
