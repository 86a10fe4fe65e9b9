//! The quantize tab: pick targets (GGUF mixes, GPTQ bit widths), calibration and output folder, see the
//! estimated size, bpw, peak memory and time of each, then run them one after another with stage, progress,
//! ETA and cancel, while the per-layer charts fill in.

use std::path::PathBuf;
use std::time::Instant;

use eframe::egui;
use quant_engine::calib::{CalibOptions, CalibSource};
use quant_engine::imatrix::ImatrixOptions;
use quant_engine::jobs::{Command, Event, ImatrixSource, JobId};
use quant_engine::quantize_awq::{AwqQuantizeOptions, AwqScaling};
use quant_engine::quantize_exl2::Exl2QuantizeOptions;
use quant_engine::quantize_gptq::GptqQuantizeOptions;
use quant_engine::recipes::{self, GgufRecipe, Recipe};
use quant_engine::solvers::awq::AwqGrid;
use quant_engine::solvers::gptq::GptqOptions;

use super::dialogs::Picked;
use super::model::{model_stem, output_dir};
use super::plots::{LayerPlots, LayerShape};
use super::settings::{Settings, TimeFactor};
use super::{human_bytes, human_secs, Owner, Shared, Variant};

/// Calibration settings shared by every calibrated target.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// `None`: the bundled text.
    pub file: Option<PathBuf>,
    pub rows: usize,
    pub seq_len: usize,
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            file: None,
            rows: 128,
            seq_len: 512,
        }
    }
}

/// A queued, running or finished target.
#[derive(Clone, Debug)]
pub struct QueueItem {
    pub target: Recipe,
    pub out: PathBuf,
    /// The user agreed to replace an existing output.
    pub overwrite: bool,
    pub status: Status,
    pub job: Option<JobId>,
    pub stage: String,
    pub done: u64,
    pub total: u64,
    pub eta: Option<f64>,
    pub started: Option<Instant>,
    /// Index of this item's run in the charts.
    pub run: Option<usize>,
    /// Bits per weight and size, when finished.
    pub result: Option<(f64, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    Waiting,
    Running,
    Done,
    Failed(String),
    Cancelled,
}

pub struct QuantizePanel {
    /// Ticked GGUF mixes.
    pub gguf: Vec<String>,
    pub imatrix: bool,
    /// The low-bit i-quant mixes are shown (they also show whenever one is ticked).
    pub show_lowbit: bool,
    /// An error-aware GGUF mix at `auto_bpw` bits per weight.
    pub auto_mix: bool,
    pub auto_bpw: f64,
    /// Ticked GPTQ bit widths.
    pub gptq_bits: Vec<u8>,
    pub gptq_group: Option<usize>,
    pub gptq_act_order: bool,
    pub gptq_sym: bool,
    /// Fold AWQ's activation-aware scales into the model before GPTQ / EXL2.
    pub gptq_awq_scales: bool,
    pub exl2_awq_scales: bool,
    /// Ticked Hugging Face formats besides GPTQ (catalogue ids: `awq`, `awq-ct`, `nf4`, `fp4`, `hqq`).
    pub packed: Vec<String>,
    /// AWQ's group size.
    pub awq_group: usize,
    /// EXL2's target bits per weight and head bits (ticked as `exl2` in `packed`).
    pub exl2_bpw: f64,
    pub exl2_head_bits: u8,
    /// bitsandbytes double quantization for the NF4/FP4 targets.
    pub double_quant: bool,
    /// HQQ's bit width and group size.
    pub hqq_bits: u8,
    pub hqq_group: usize,
    pub calib: Calibration,
    pub queue: Vec<QueueItem>,
    pub plots: LayerPlots,
    /// Outputs that exist already, waiting for the user to say whether to replace them.
    pub confirm_replace: Option<Vec<PathBuf>>,
}

const AWQ_SCALES_HOVER: &str = "Fold AWQ's activation-aware scales into the model first (searched on the first 32 calibration \
                 rows): the solver then spends its error away from the input channels that carry large \
                 activations. The folder loads unchanged (the norms carry the inverse scales).";

impl QuantizePanel {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            gguf: if s.gguf_targets.is_empty() {
                vec!["Q4_K_M".into()]
            } else {
                s.gguf_targets.clone()
            },
            imatrix: false,
            show_lowbit: false,
            auto_mix: false,
            auto_bpw: 5.0,
            gptq_bits: s.gptq_bits.clone(),
            gptq_group: Some(128),
            gptq_act_order: true,
            gptq_sym: false,
            gptq_awq_scales: false,
            exl2_awq_scales: false,
            packed: s.packed_targets.clone(),
            awq_group: 128,
            exl2_bpw: 4.0,
            exl2_head_bits: 6,
            double_quant: false,
            hqq_bits: 4,
            hqq_group: 64,
            calib: Calibration::default(),
            queue: Vec::new(),
            plots: LayerPlots::default(),
            confirm_replace: None,
        }
    }

    pub fn store_settings(&self, s: &mut Settings) {
        s.gguf_targets = self.gguf.clone();
        s.gptq_bits = self.gptq_bits.clone();
        s.packed_targets = self.packed.clone();
    }

    /// Where the ticked recipes read calibration data from.
    fn calib_source(&self) -> CalibSource {
        match &self.calib.file {
            Some(f) => CalibSource::File {
                path: f.clone(),
                column: None,
            },
            None => CalibSource::Bundled,
        }
    }

    /// The recipes ticked now, in the engine's catalogue order (GGUF mixes, then GPTQ by bit width).
    pub fn targets(&self) -> Vec<Recipe> {
        let mut t = Vec::new();
        for kind in recipes::catalogue() {
            match kind.container {
                recipes::Container::GgufFile => {
                    if !self.gguf.contains(&kind.label) {
                        continue;
                    }
                    let Ok(mix) = recipes::parse_mix(&kind.id) else {
                        continue;
                    };
                    // A mix llama-quantize refuses without an importance matrix always gets one.
                    let imatrix = if self.imatrix || mix.needs_imatrix() {
                        ImatrixSource::Compute {
                            source: self.calib_source(),
                            options: ImatrixOptions {
                                n_ctx: self.calib.seq_len,
                                max_chunks: Some(self.calib.rows),
                                ..ImatrixOptions::default()
                            },
                        }
                    } else {
                        ImatrixSource::None
                    };
                    t.push(Recipe::Gguf(GgufRecipe {
                        mix,
                        overrides: Vec::new(),
                        imatrix,
                        auto: None,
                        auto_types: Vec::new(),
                        auto_probe_tokens: quant_engine::quantize_automix::DEFAULT_PROBE_TOKENS,
                        auto_measurement: None,
                        backend: quant_engine::backend::Backend::Cpu,
                    }));
                }
                recipes::Container::HfFolder
                    if kind.calibration == recipes::CalibrationNeed::None =>
                {
                    if self.packed.contains(&kind.id) {
                        t.extend(
                            recipes::parse_packed(
                                &kind.id,
                                self.double_quant,
                                Some(self.hqq_bits),
                                Some(self.hqq_group),
                                None,
                            )
                            .map(Recipe::Packed),
                        );
                    }
                }
                recipes::Container::HfFolder if kind.family == "AWQ" => {
                    if let (true, Some(layout)) =
                        (self.packed.contains(&kind.id), recipes::parse_awq(&kind.id))
                    {
                        let d = AwqQuantizeOptions::default();
                        t.push(Recipe::Awq(Box::new(AwqQuantizeOptions {
                            grid: AwqGrid {
                                bits: 4,
                                group_size: self.awq_group,
                            },
                            layout,
                            calib: self.calib_source(),
                            calib_opts: CalibOptions {
                                rows: self.calib.rows,
                                seq_len: self.calib.seq_len,
                                seed: 0,
                            },
                            ..d
                        })));
                    }
                }
                recipes::Container::HfFolder if kind.family == "EXL2" => {
                    if self.packed.contains(&kind.id) {
                        let d = Exl2QuantizeOptions::default();
                        t.push(Recipe::Exl2(Box::new(Exl2QuantizeOptions {
                            budget: quant_engine::recipes::MixBudget::Bpw(self.exl2_bpw),
                            head_bits: self.exl2_head_bits,
                            awq_scales: self.exl2_awq_scales.then(AwqScaling::default),
                            calib: self.calib_source(),
                            calib_opts: CalibOptions {
                                rows: self.calib.rows,
                                seq_len: self.calib.seq_len,
                                seed: 0,
                            },
                            ..d
                        })));
                    }
                }
                recipes::Container::HfFolder => {
                    let mut bits = self.gptq_bits.clone();
                    bits.sort_unstable();
                    bits.dedup();
                    t.extend(bits.into_iter().map(|bits| {
                        Recipe::Gptq(Box::new(GptqQuantizeOptions {
                            solver: GptqOptions {
                                bits,
                                group_size: self.gptq_group,
                                act_order: self.gptq_act_order,
                                sym: self.gptq_sym,
                                ..GptqOptions::default()
                            },
                            awq_scales: self.gptq_awq_scales.then(|| AwqScaling {
                                bits,
                                ..AwqScaling::default()
                            }),
                            calib: self.calib_source(),
                            calib_opts: CalibOptions {
                                rows: self.calib.rows,
                                seq_len: self.calib.seq_len,
                                seed: 0,
                            },
                            ..GptqQuantizeOptions::default()
                        }))
                    }));
                }
            }
        }
        if self.auto_mix {
            t.push(Recipe::Gguf(GgufRecipe {
                mix: quant_engine::quantize_automix::AUTOMIX_BASE,
                overrides: Vec::new(),
                imatrix: ImatrixSource::Compute {
                    source: self.calib_source(),
                    options: ImatrixOptions {
                        n_ctx: self.calib.seq_len,
                        max_chunks: Some(self.calib.rows),
                        ..ImatrixOptions::default()
                    },
                },
                auto: Some(quant_engine::quantize_automix::MixBudget::Bpw(
                    self.auto_bpw,
                )),
                auto_types: Vec::new(),
                auto_probe_tokens: quant_engine::quantize_automix::DEFAULT_PROBE_TOKENS,
                auto_measurement: None,
                backend: quant_engine::backend::Backend::Cpu,
            }));
        }
        t
    }

    pub fn on_dialog(&mut self, p: &Picked) {
        if let Picked::CalibFile(f) = p {
            self.calib.file = Some(f.clone());
        }
    }

    /// Queue every ticked target (the first starts at once if nothing runs). Outputs that exist already
    /// are not replaced without asking: the panel asks first ([`Self::confirm_replace`]).
    pub fn start(&mut self, shared: &mut Shared) {
        self.start_with(shared, false);
    }

    /// [`start`](Self::start), replacing existing outputs when `overwrite`.
    pub fn start_with(&mut self, shared: &mut Shared, overwrite: bool) {
        self.confirm_replace = None;
        let Some(src) = shared.source.as_ref() else {
            shared.notes.error(
                "Open a model first",
                "Drop a model on the window, or use Open model….",
            );
            return;
        };
        let targets = self.targets();
        if targets.is_empty() {
            shared.notes.error(
                "Pick a target first",
                "Tick a GGUF mix or a GPTQ bit width.",
            );
            return;
        }
        let dir = output_dir(shared, &src.path);
        let stem = model_stem(&src.path);
        self.plots.shape = LayerShape {
            hidden: src.summary.hidden,
            kv_dim: src.summary.kv_heads * src.summary.head_dim,
            intermediate: src.summary.intermediate,
        };
        // A target already waiting or running into the same output is not queued twice.
        let busy = |q: &QueueItem| matches!(q.status, Status::Waiting | Status::Running);
        let fresh: Vec<(Recipe, PathBuf)> = targets
            .into_iter()
            .map(|t| {
                let out = t.output_in(&dir, &stem);
                (t, out)
            })
            .filter(|(_, out)| !self.queue.iter().any(|q| busy(q) && q.out == *out))
            .collect();
        if fresh.is_empty() {
            shared.notes.error(
                "Already queued",
                "Every ticked target is already waiting or running.",
            );
            return;
        }
        let existing: Vec<PathBuf> = fresh
            .iter()
            .map(|(_, out)| out.clone())
            .filter(|out| out.exists())
            .collect();
        if !overwrite && !existing.is_empty() {
            self.confirm_replace = Some(existing);
            return;
        }
        for (target, out) in fresh {
            self.queue.push(QueueItem {
                target,
                out,
                overwrite,
                status: Status::Waiting,
                job: None,
                stage: "waiting".into(),
                done: 0,
                total: 0,
                eta: None,
                started: None,
                run: None,
                result: None,
            });
        }
        self.pump(shared);
    }

    /// The engine command for a target.
    pub fn command(
        &self,
        target: &Recipe,
        model: PathBuf,
        out: PathBuf,
        overwrite: bool,
    ) -> Command {
        Command::Quantize {
            model,
            out,
            recipe: target.clone(),
            overwrite,
        }
    }

    /// Start the next waiting item if none is running.
    fn pump(&mut self, shared: &mut Shared) {
        if self.queue.iter().any(|q| q.status == Status::Running) {
            return;
        }
        let Some(src) = shared.source.as_ref().map(|s| s.path.clone()) else {
            return;
        };
        let Some(i) = self.queue.iter().position(|q| q.status == Status::Waiting) else {
            return;
        };
        if let Some(parent) = self.queue[i].out.parent().map(PathBuf::from) {
            if let Err(e) = std::fs::create_dir_all(&parent) {
                self.queue[i].status = Status::Failed(e.to_string());
                shared
                    .notes
                    .error(format!("Cannot create {}", parent.display()), e.to_string());
                return;
            }
        }
        let cmd = self.command(
            &self.queue[i].target,
            src,
            self.queue[i].out.clone(),
            self.queue[i].overwrite,
        );
        if let Some(job) = shared.submit(Owner::Quantize, cmd) {
            let run = self.plots.start_run(self.queue[i].target.label());
            let item = &mut self.queue[i];
            item.job = Some(job);
            item.status = Status::Running;
            item.stage = "starting".into();
            item.started = Some(Instant::now());
            item.run = Some(run);
        }
    }

    pub fn on_event(&mut self, shared: &mut Shared, ev: Event) {
        let job = ev.job();
        let Some(i) = self.queue.iter().position(|q| q.job == Some(job)) else {
            return;
        };
        let run = self.queue[i].run;
        match ev {
            Event::Progress {
                stage,
                done,
                total,
                eta_secs,
                ..
            } => {
                let q = &mut self.queue[i];
                q.stage = stage;
                q.done = done;
                q.total = total;
                q.eta = eta_secs;
            }
            Event::LayerDone { metrics, .. } => {
                if let Some(r) = run {
                    self.plots.push(r, metrics);
                }
            }
            Event::Finished { output, .. } => {
                let params = shared
                    .source
                    .as_ref()
                    .map_or(1, |s| s.summary.parameter_count);
                let (size, bpw) = output.quantized_size(params).unwrap_or((0, 0.0));
                let q = &mut self.queue[i];
                q.status = Status::Done;
                q.result = Some((bpw, size));
                // The estimates learn from the run (kept between sessions in the settings).
                if let (Some(started), Some(src)) = (q.started, shared.source.as_ref()) {
                    let key = q.target.timing_key().to_string();
                    let estimated = q.target.estimate(&src.summary).seconds;
                    let learned = TimeFactor::learn(
                        shared.settings.time_factors.get(&key).copied(),
                        started.elapsed().as_secs_f64(),
                        estimated,
                    );
                    if let Some(f) = learned {
                        shared.settings.time_factors.insert(key, f);
                    }
                }
                if let Some(r) = run {
                    self.plots.finish(r);
                }
                shared.add_variant(Variant {
                    label: q.target.label(),
                    path: q.out.clone(),
                    is_source: false,
                    bpw: Some(bpw),
                    size_bytes: Some(size),
                });
                // An auto mix says what KL-divergence its measurement predicts (the Compare tab measures it).
                let predicted = match &output {
                    quant_engine::jobs::JobOutput::Quantized(r) => r.predicted_kld,
                    _ => None,
                };
                let detail = match predicted {
                    Some(k) => format!("{} · predicted KLD {k:.4}", q.out.display()),
                    None => q.out.display().to_string(),
                };
                shared
                    .notes
                    .info(format!("{} done", q.target.label()), detail);
                self.pump(shared);
            }
            Event::Failed { error, .. } => {
                if let Some(r) = run {
                    self.plots.finish(r);
                }
                let label = self.queue[i].target.label();
                shared.notes.error(format!("{label} failed"), &error);
                self.queue[i].status = Status::Failed(error);
                self.pump(shared);
            }
            Event::Cancelled { .. } => {
                if let Some(r) = run {
                    self.plots.finish(r);
                }
                self.queue[i].status = Status::Cancelled;
                self.pump(shared);
            }
            _ => {}
        }
    }

    /// One line for the status bar about the running item.
    pub fn status_line(&self) -> Option<String> {
        let q = self.queue.iter().find(|q| q.status == Status::Running)?;
        let waiting = self
            .queue
            .iter()
            .filter(|q| q.status == Status::Waiting)
            .count();
        Some(format!(
            "{}: {} {}/{}{}",
            q.target.label(),
            q.stage,
            q.done,
            q.total,
            if waiting > 0 {
                format!(" · {waiting} waiting")
            } else {
                String::new()
            }
        ))
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        let Some(src) = shared.source.clone() else {
            ui.heading("Open a model first");
            ui.label("Drop a model on the window, or use the Model tab.");
            return;
        };
        // Bounded: at most half the window, so the queue and the charts keep their room whatever the
        // paths in the options are (they are truncated, with the whole path on hover).
        let max = (ui.available_width() * 0.5).max(300.0);
        egui::Panel::left("quantize-options")
            .resizable(true)
            .default_size(400.0_f32.min(max))
            .min_size(280.0)
            .max_size(max)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    self.options_ui(ui, shared, &src);
                });
            });
        egui::CentralPanel::default().show(ui, |ui| {
            self.queue_ui(ui, shared);
            ui.separator();
            self.plots.ui(ui);
        });
        self.confirm_ui(ui.ctx(), shared);
    }

    /// The question asked before existing outputs are replaced.
    fn confirm_ui(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(existing) = self.confirm_replace.clone() else {
            return;
        };
        let answer = super::confirm(
            ctx,
            "Replace existing outputs?",
            "Replace",
            "Keep them",
            |ui| {
                ui.label(format!(
                    "{} output(s) exist already and would be replaced:",
                    existing.len()
                ));
                for p in &existing {
                    super::path_label(ui, p);
                }
            },
        );
        match answer {
            Some(true) => self.start_with(shared, true),
            Some(false) => self.confirm_replace = None,
            None => {}
        }
    }

    /// One checkbox per GGUF mix, `cols` to a row of the enclosing grid; ticking a mix that needs an
    /// importance matrix turns the importance-matrix option on.
    fn mix_boxes(&mut self, ui: &mut egui::Ui, kinds: &[recipes::RecipeKind]) {
        let cols = if kinds.len() <= 10 { 5 } else { 4 };
        for (i, kind) in kinds.iter().enumerate() {
            let name = kind.label.as_str();
            let mut on = self.gguf.iter().any(|g| g == name);
            let needs = kind.calibration == recipes::CalibrationNeed::Required;
            let mut box_ = ui.checkbox(&mut on, name);
            if needs {
                box_ = box_.on_hover_text(format!(
                    "{name} needs an importance matrix: llama.cpp's low-bit lattice searches weigh \
                     every weight by it (computed from the calibration text)"
                ));
            }
            if box_.changed() {
                if on {
                    self.gguf.push(name.to_string());
                    self.imatrix |= needs;
                } else {
                    self.gguf.retain(|g| g != name);
                }
            }
            if i % cols == cols - 1 {
                ui.end_row();
            }
        }
    }

    fn options_ui(
        &mut self,
        ui: &mut egui::Ui,
        shared: &mut Shared,
        src: &super::model::OpenModel,
    ) {
        if let Some(w) = src.summary.already_quantized() {
            ui.colored_label(ui.visuals().warn_fg_color, format!("⚠ {w}"));
            ui.add_space(4.0);
        }
        ui.heading("Targets");
        ui.label("GGUF (llama.cpp) mixes:");
        // The low-bit i-quant mixes (IQ1_S … IQ3_M) in their own section, folded unless one is ticked.
        let (low, common): (Vec<_>, Vec<_>) = recipes::catalogue()
            .into_iter()
            .filter(|k| k.container == recipes::Container::GgufFile)
            .partition(|k| k.label.starts_with("IQ") && k.nominal_bpw < 4.0);
        let any_low = low.iter().any(|k| self.gguf.contains(&k.label));
        egui::Grid::new("gguf-mixes").num_columns(4).show(ui, |ui| {
            self.mix_boxes(ui, &common);
            // The fold-out for the low-bit mixes takes the next free cell (no extra row when folded).
            let open = self.show_lowbit || any_low;
            let mut want = open;
            ui.toggle_value(&mut want, if open { "IQ1–IQ3 −" } else { "IQ1–IQ3 +" })
                .on_hover_text(
                    "The low-bit i-quant mixes, 1.6–3.7 bpw: they need an importance matrix (turned on \
                     when you tick one)",
                );
            if want != open {
                self.show_lowbit = want;
            }
        });
        if self.show_lowbit || any_low {
            egui::Grid::new("gguf-lowbit-mixes")
                .num_columns(5)
                .show(ui, |ui| self.mix_boxes(ui, &low));
        }
        ui.horizontal(|ui| {
            ui.checkbox(
                &mut self.imatrix,
                "Importance matrix from the calibration text (llama-imatrix's method)",
            );
            // The ticked mixes that need one get one whatever the box says: say so.
            let needing: Vec<&str> = self
                .gguf
                .iter()
                .filter(|g| recipes::parse_mix(g).is_ok_and(|m| m.needs_imatrix()))
                .map(String::as_str)
                .collect();
            if !needing.is_empty() {
                ui.weak(format!(
                    "(required by {}: their lattice searches weigh every weight by it)",
                    needing.join(", ")
                ));
            }
        });
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.auto_mix, "Error-aware mix at")
                .on_hover_text(
                    "Every decoder tensor's type chosen by its measured error (imatrix-weighted) so the \
                     whole file spends this many bits per weight; it loads in llama.cpp unchanged. \
                     Needs an importance matrix: computed from the calibration text.",
                );
            // What the candidate types can reach on this model (tensor bits over every parameter), when the
            // inspect job computed it.
            let params = src.summary.parameter_count.max(1) as f64;
            let (lo, hi) = src.summary.auto_mix_bytes.map_or((2.0, 9.0), |(lo, hi)| {
                (
                    (lo as f64 * 8.0 / params * 100.0).ceil() / 100.0,
                    (hi as f64 * 8.0 / params * 100.0).floor() / 100.0,
                )
            });
            let value = ui
                .add(
                    egui::DragValue::new(&mut self.auto_bpw)
                        .range(lo..=hi.max(lo))
                        .speed(0.05)
                        .fixed_decimals(2),
                )
                .on_hover_text(format!(
                    "This model's mixes can take {lo:.2} to {hi:.2} bits per weight (about {:.1} to {:.1} MB)",
                    lo * params / 8e6,
                    hi * params / 8e6
                ));
            let label = ui.label("bits per weight");
            value.labelled_by(label.id);
            if self.auto_mix && !self.imatrix {
                ui.weak("(importance matrix computed for it)");
            }
        });
        ui.add_space(6.0);
        ui.label("GPTQ (transformers / vLLM / ExLlamaV2):");
        ui.horizontal(|ui| {
            for bits in recipes::GPTQ_BITS {
                let mut on = self.gptq_bits.contains(&bits);
                if ui.checkbox(&mut on, format!("{bits}-bit")).changed() {
                    if on {
                        self.gptq_bits.push(bits);
                    } else {
                        self.gptq_bits.retain(|b| *b != bits);
                    }
                }
            }
        });
        ui.horizontal(|ui| {
            let label = ui.label("group");
            egui::ComboBox::from_id_salt("gptq-group")
                .selected_text(
                    self.gptq_group
                        .map_or("per channel".into(), |g| g.to_string()),
                )
                .show_ui(ui, |ui| {
                    for g in recipes::GPTQ_GROUPS {
                        ui.selectable_value(
                            &mut self.gptq_group,
                            g,
                            g.map_or("per channel".into(), |g| g.to_string()),
                        );
                    }
                })
                .response
                .labelled_by(label.id);
            ui.checkbox(&mut self.gptq_act_order, "act-order");
            ui.checkbox(&mut self.gptq_sym, "symmetric");
            ui.checkbox(&mut self.gptq_awq_scales, "AWQ scales")
                .on_hover_text(AWQ_SCALES_HOVER);
        });
        ui.horizontal(|ui| {
            ui.label("AWQ 4-bit:");
            let kinds = recipes::catalogue()
                .into_iter()
                .filter(|k| k.family == "AWQ");
            for kind in kinds {
                let mut on = self.packed.contains(&kind.id);
                let label = kind
                    .label
                    .replace("AWQ (compressed-tensors)", "compressed-tensors");
                if ui
                    .checkbox(&mut on, label)
                    .on_hover_text(format!("{}: loads in {}", kind.label, kind.loads_in))
                    .changed()
                {
                    if on {
                        self.packed.push(kind.id.clone());
                    } else {
                        self.packed.retain(|p| *p != kind.id);
                    }
                }
            }
            let label = ui.label("group");
            egui::ComboBox::from_id_salt("awq-group")
                .selected_text(self.awq_group.to_string())
                .show_ui(ui, |ui| {
                    for g in [32usize, 64, 128] {
                        ui.selectable_value(&mut self.awq_group, g, g.to_string());
                    }
                })
                .response
                .labelled_by(label.id);
            let s = &src.summary;
            let ticked = self.packed.iter().any(|p| p.starts_with("awq"));
            if ticked
                && !(s.hidden.is_multiple_of(self.awq_group)
                    && s.intermediate.is_multiple_of(self.awq_group))
            {
                ui.colored_label(ui.visuals().warn_fg_color, "⚠ must divide the widths")
                    .on_hover_text(format!(
                        "AWQ's loaders need whole groups: this model's widths are {} and {}",
                        s.hidden, s.intermediate
                    ));
            }
        });
        ui.horizontal(|ui| {
            let mut on = self.packed.iter().any(|p| p == "exl2");
            if ui
                .checkbox(&mut on, "EXL2 at")
                .on_hover_text(
                    "ExLlamaV2's format: each attention and MLP block's bit mix (2–8 bits) chosen by its measured \
                     output error so the decoder spends this many bits per weight; loads in ExLlamaV2, TabbyAPI, \
                     text-generation-webui. Measures 36 options per layer first (slow on a CPU).",
                )
                .changed()
            {
                if on {
                    self.packed.push("exl2".into());
                } else {
                    self.packed.retain(|p| p != "exl2");
                }
            }
            // The option tables' reach on this model's shapes (exact before measuring).
            let (lo, hi) = quant_engine::quantize_exl2::reachable_bpw(&src.summary);
            let (lo, hi) = ((lo * 100.0).ceil() / 100.0, (hi * 100.0).floor() / 100.0);
            let value = ui
                .add(
                    egui::DragValue::new(&mut self.exl2_bpw)
                        .range(lo..=hi.max(lo))
                        .speed(0.05)
                        .fixed_decimals(2),
                )
                .on_hover_text(format!("This model's decoder can take {lo:.2} to {hi:.2} bits per weight"));
            let label = ui.label("bits per weight, head");
            value.labelled_by(label.id);
            let head = egui::ComboBox::from_id_salt("exl2-head")
                .selected_text(format!("{}-bit", self.exl2_head_bits))
                .show_ui(ui, |ui| {
                    for b in [2u8, 3, 4, 5, 6, 8] {
                        ui.selectable_value(&mut self.exl2_head_bits, b, format!("{b}-bit"));
                    }
                })
                .response;
            head.labelled_by(label.id);
            ui.checkbox(&mut self.exl2_awq_scales, "AWQ scales")
                .on_hover_text(AWQ_SCALES_HOVER);
            let s = &src.summary;
            if on && !(s.hidden.is_multiple_of(32) && s.intermediate.is_multiple_of(32)) {
                ui.colored_label(ui.visuals().warn_fg_color, "⚠ widths must be multiples of 32")
                    .on_hover_text(format!(
                        "EXL2 stores input rows in groups of 32: this model's widths are {} and {}",
                        s.hidden, s.intermediate
                    ));
            }
        });
        ui.horizontal(|ui| {
            ui.label("Calibration-free:");
            let kinds = recipes::catalogue()
                .into_iter()
                .filter(|k| k.container == recipes::Container::HfFolder)
                .filter(|k| k.calibration == recipes::CalibrationNeed::None);
            for kind in kinds {
                let mut on = self.packed.contains(&kind.id);
                if ui
                    .checkbox(&mut on, &kind.label)
                    .on_hover_text(format!("{}: loads in {}", kind.family, kind.loads_in))
                    .changed()
                {
                    if on {
                        self.packed.push(kind.id.clone());
                    } else {
                        self.packed.retain(|p| *p != kind.id);
                    }
                }
            }
            ui.checkbox(&mut self.double_quant, "double quant")
                .on_hover_text(
                    "Quantize the block scales to 8 bits too (bitsandbytes' double quantization)",
                );
        });
        ui.horizontal(|ui| {
            let label = ui.label("HQQ bits");
            egui::ComboBox::from_id_salt("hqq-bits")
                .selected_text(self.hqq_bits.to_string())
                .show_ui(ui, |ui| {
                    for b in quant_engine::codecs::hqq::HQQ_BITS {
                        ui.selectable_value(&mut self.hqq_bits, b, b.to_string());
                    }
                })
                .response
                .labelled_by(label.id);
            let label = ui.label("group");
            egui::ComboBox::from_id_salt("hqq-group")
                .selected_text(self.hqq_group.to_string())
                .show_ui(ui, |ui| {
                    for g in [16usize, 32, 64, 128] {
                        ui.selectable_value(&mut self.hqq_group, g, g.to_string());
                    }
                })
                .response
                .labelled_by(label.id);
        });
        ui.add_space(6.0);
        ui.heading("Calibration");
        ui.horizontal(|ui| {
            let name = self.calib.file.as_ref().map_or(
                "bundled text (prose, code, chat, 26 languages)".into(),
                |f| super::model::display_name(f),
            );
            ui.label(name);
            if ui.button("File…").clicked() {
                shared.dialogs.pick_calib_file();
            }
            shared
                .dialogs
                .type_button(ui, super::dialogs::PickKind::CalibFile);
            if self.calib.file.is_some() && ui.button("Bundled").clicked() {
                self.calib.file = None;
            }
        });
        ui.horizontal(|ui| {
            let label = ui.label("rows");
            ui.add(egui::DragValue::new(&mut self.calib.rows).range(1..=4096))
                .labelled_by(label.id);
            let label = ui.label("× tokens");
            ui.add(egui::DragValue::new(&mut self.calib.seq_len).range(16..=8192))
                .labelled_by(label.id);
        });
        ui.horizontal(|ui| {
            ui.label("Backend:");
            match shared.settings.backend {
                quant_engine::backend::Backend::Cpu => {
                    ui.strong("CPU");
                    ui.weak(format!("({} threads)", quant_engine::jobs::thread_count()));
                }
                quant_engine::backend::Backend::Gpu => {
                    ui.strong("GPU");
                    ui.weak(
                        "(model passes and GPTQ/AWQ/EXL2 calibration; change under Compute below)",
                    );
                }
            }
        });
        ui.horizontal(|ui| {
            ui.label("Output folder:");
            if ui.button("Change…").clicked() {
                shared.dialogs.pick_output_dir();
            }
            shared
                .dialogs
                .type_button(ui, super::dialogs::PickKind::OutputDir);
        });
        let dir = output_dir(shared, &src.path);
        super::path_label(ui, &dir);
        ui.add_space(6.0);
        ui.heading("Estimates");
        let targets = self.targets();
        egui::Grid::new("estimates")
            .num_columns(6)
            .striped(true)
            .show(ui, |ui| {
                // Sizes two ways: the file (what must fit in memory, embeddings included) and the bits of
                // the quantized decoder weights (what formats are compared by).
                for (h, tip) in [
                    ("target", ""),
                    ("size", "the output's size: what must fit in memory"),
                    (
                        "bpw",
                        "bits per parameter of the whole file, embeddings and norms included",
                    ),
                    (
                        "linear bpw",
                        "bits per weight of the quantized decoder linears",
                    ),
                    ("memory", "peak memory while quantizing"),
                    ("time", "on this machine"),
                ] {
                    let r = ui.strong(h);
                    if !tip.is_empty() {
                        r.on_hover_text(tip);
                    }
                }
                ui.end_row();
                for t in &targets {
                    let e = t.estimate(&src.summary);
                    ui.label(t.label());
                    ui.label(format!("≈ {}", human_bytes(e.size_bytes)));
                    ui.label(format!("≈ {:.2}", e.bpw));
                    ui.label(format!("{:.2}", e.linear_bpw));
                    ui.label(format!("≈ {}", human_bytes(e.peak_memory_bytes)));
                    match shared.settings.time_factors.get(t.timing_key()) {
                        Some(f) => {
                            ui.label(format!("≈ {}", human_secs(e.seconds * f.factor)))
                                .on_hover_text(format!(
                                    "learned from {} finished run(s) on this machine (×{:.2} the \
                                     built-in model)",
                                    f.runs, f.factor
                                ));
                        }
                        None => {
                            ui.label(format!("≈ {}", human_secs(e.seconds)))
                                .on_hover_text("built-in model; learns from finished runs");
                        }
                    }
                    ui.end_row();
                }
            });
        ui.add_space(8.0);
        let label = format!("Quantize {} target(s)  (Ctrl+Q)", targets.len());
        if ui
            .add_enabled(!targets.is_empty(), egui::Button::new(label))
            .clicked()
        {
            self.start(shared);
        }
    }

    fn queue_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Jobs");
        if self.queue.is_empty() {
            ui.weak("Nothing queued.");
            return;
        }
        let mut cancel = Vec::new();
        // One line per item, Cancel first so it is always reachable; the progress bar takes at most 40 % of
        // the width and the output's name whatever is left (truncated, the whole path on hover).
        let bar = (ui.available_width() * 0.4).clamp(120.0, 300.0);
        for (i, q) in self.queue.iter().enumerate() {
            ui.horizontal(|ui| {
                if matches!(q.status, Status::Waiting | Status::Running)
                    && ui.small_button("Cancel").clicked()
                {
                    cancel.push(i);
                }
                ui.label(q.target.label());
                match &q.status {
                    Status::Waiting => {
                        ui.weak("waiting");
                    }
                    Status::Running => {
                        let text = format!("{} {}/{}", q.stage, q.done, q.total);
                        super::progress_bar(ui, (q.done, q.total), q.eta, text, bar);
                    }
                    Status::Done => {
                        let (bpw, size) = q.result.unwrap_or_default();
                        ui.label(format!("✔ {bpw:.2} bpw · {}", human_bytes(size)));
                    }
                    Status::Failed(e) => {
                        ui.colored_label(ui.visuals().error_fg_color, "failed")
                            .on_hover_text(e);
                    }
                    Status::Cancelled => {
                        ui.weak("cancelled");
                    }
                }
                ui.add(
                    egui::Label::new(
                        egui::RichText::new(super::model::display_name(&q.out)).weak(),
                    )
                    .truncate(),
                )
                .on_hover_text(q.out.display().to_string());
            });
        }
        for i in cancel {
            match (self.queue[i].status.clone(), self.queue[i].job) {
                (Status::Running, Some(job)) => shared.send(Command::Cancel(job)),
                _ => self.queue[i].status = Status::Cancelled,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticked_boxes_become_engine_recipes() {
        let mut p = QuantizePanel::from_settings(&Settings::default());
        p.gguf = vec!["Q8_0".into(), "Q4_K_M".into()];
        p.imatrix = true;
        p.gptq_bits = vec![4, 2, 4];
        let labels: Vec<String> = p.targets().iter().map(Recipe::label).collect();
        // The engine's catalogue order, duplicates dropped.
        assert_eq!(
            labels,
            [
                "Q8_0-imat",
                "Q4_K_M-imat",
                "GPTQ-2bit-g128-ao-asym",
                "GPTQ-4bit-g128-ao-asym"
            ]
        );
        assert!(p.targets().iter().all(Recipe::calibrated));
    }
}
