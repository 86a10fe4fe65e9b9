//! The desktop window: open a model, quantize it to several formats with live per-layer error plots,
//! compare the variants, chat with them. Every piece of work is a `Command` to the engine thread; the UI
//! drains `Event`s once per frame and never waits (file dialogs run on their own threads).
//!
//! Layout: a top bar (tabs, theme, shortcuts), a status bar (jobs, frame time), one central panel per tab
//! (`model`, `quantize`, `compare`, `chat`), toasts for notifications. Each panel owns its state and the
//! jobs it started; [`StudioApp`] routes events to the owner of their job.

pub mod chat;
pub mod compare;
pub mod dialogs;
pub mod model;
pub mod notify;
pub mod plots;
pub mod quantize;
pub mod settings;
pub mod theme;
pub mod walkthrough;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;
use quant_engine::backend::wgpu::AdapterSummary;
use quant_engine::backend::Backend;
use quant_engine::jobs::{Command, EngineHandle, Event, JobId};

use self::dialogs::Dialogs;
use self::notify::Notifications;
use self::settings::Settings;

/// Open the window, with `open` already loading if given; with `demo`, fetch (or reuse) the demo model and
/// open it.
pub fn run(demo: bool, open: Option<PathBuf>) -> anyhow::Result<()> {
    let walkthrough = walkthrough::Walkthrough::from_env();
    // The walkthrough can run at another size (`QS_WALKTHROUGH_SIZE=1024x700`) to check the layout there.
    let size = walkthrough
        .as_ref()
        .and_then(|w| w.window_size())
        .unwrap_or([1280.0, 800.0]);
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Quant Studio")
            .with_inner_size(size)
            .with_min_inner_size([960.0, 600.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "Quant Studio",
        options,
        Box::new(move |cc| {
            let mut app = StudioApp::new(cc, EngineHandle::spawn());
            if let Some(path) = open {
                app.open_model(path);
            } else if demo {
                app.get_demo_model();
            }
            app.walkthrough = walkthrough;
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// The tabs of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tab {
    Model,
    Quantize,
    Compare,
    Chat,
}

impl Tab {
    pub const ALL: [Tab; 4] = [Tab::Model, Tab::Quantize, Tab::Compare, Tab::Chat];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Model => "Model",
            Tab::Quantize => "Quantize",
            Tab::Compare => "Compare",
            Tab::Chat => "Chat",
        }
    }
}

/// Which panel started a job (and receives its events).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Model,
    Quantize,
    Compare,
    Chat,
}

/// A model the studio knows: the source or one of its quantized variants.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// Short label (`"source"`, `"Q4_K_M"`, `"GPTQ 4-bit g128"`).
    pub label: String,
    pub path: PathBuf,
    pub is_source: bool,
    /// Bits per weight, when known (from the quantize report or the file's size).
    pub bpw: Option<f64>,
    pub size_bytes: Option<u64>,
}

/// What every panel may use: the engine, settings, notifications, the open model and its variants.
pub struct Shared {
    pub engine: EngineHandle,
    pub settings: Settings,
    pub notes: Notifications,
    pub dialogs: Dialogs,
    /// The open model's card (`None` until one is open).
    pub source: Option<model::OpenModel>,
    /// The source first, then the variants found or made.
    pub variants: Vec<Variant>,
    owners: HashMap<JobId, Owner>,
}

impl Shared {
    /// Send a command to the engine on behalf of `owner`; `None` (with a notification) if the engine is
    /// busy or gone. Never waits.
    pub fn submit(&mut self, owner: Owner, mut command: Command) -> Option<JobId> {
        command.set_backend(self.settings.backend);
        match self.engine.try_submit(command) {
            Ok(Some(job)) => {
                self.owners.insert(job, owner);
                Some(job)
            }
            Ok(None) => None,
            Err(e) => {
                self.notes
                    .error("The engine did not take the command", e.to_string());
                None
            }
        }
    }

    /// A command that starts no job (chat turns, cancel).
    pub fn send(&mut self, mut command: Command) {
        command.set_backend(self.settings.backend);
        if let Err(e) = self.engine.try_submit(command) {
            self.notes
                .error("The engine did not take the command", e.to_string());
        }
    }

    /// Add or refresh a variant (by path).
    pub fn add_variant(&mut self, v: Variant) {
        if let Some(old) = self.variants.iter_mut().find(|o| o.path == v.path) {
            *old = v;
        } else {
            self.variants.push(v);
        }
    }

    /// The source model's path.
    pub fn source_path(&self) -> Option<&Path> {
        self.source.as_ref().map(|m| m.path.as_path())
    }
}

/// Frame-time statistics (CPU time inside `update`), for the status bar and the responsiveness report.
#[derive(Default)]
pub struct FrameTimes {
    pub frames: u64,
    pub last_ms: f64,
    pub max_ms: f64,
    pub total_ms: f64,
    /// Frames while a job was running.
    pub busy_frames: u64,
    pub busy_max_ms: f64,
    /// eframe's own measure of the previous frame (update, tessellation and painting), max while busy.
    pub busy_max_egui_ms: f64,
    /// The same for every busy frame (bounded), for percentiles.
    pub busy_egui_ms: Vec<f32>,
}

impl FrameTimes {
    fn record(&mut self, ms: f64, busy: bool) {
        self.frames += 1;
        self.last_ms = ms;
        self.max_ms = self.max_ms.max(ms);
        self.total_ms += ms;
        if busy {
            self.busy_frames += 1;
            self.busy_max_ms = self.busy_max_ms.max(ms);
        }
    }

    pub fn mean_ms(&self) -> f64 {
        self.total_ms / self.frames.max(1) as f64
    }

    /// The `q`-quantile (0‥1) of eframe's busy frame times, in ms.
    pub fn busy_egui_quantile(&self, q: f64) -> f64 {
        let mut v = self.busy_egui_ms.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f32::total_cmp);
        let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        f64::from(v[i])
    }
}

/// The application.
pub struct StudioApp {
    pub shared: Shared,
    pub tab: Tab,
    pub model: model::ModelPanel,
    pub quantize: quantize::QuantizePanel,
    pub compare: compare::ComparePanel,
    pub chat: chat::ChatPanel,
    pub frame_times: FrameTimes,
    /// Show the frame time in the status bar (off in snapshot tests, where it would vary).
    pub show_frame_time: bool,
    walkthrough: Option<walkthrough::Walkthrough>,
    gpu: GpuProbe,
}

/// The GPU the studio can offer: opened on a background thread (it can take a moment, and the UI thread
/// never waits) the first time the compute menu opens, or at start when the GPU was chosen last time.
#[derive(Default)]
pub struct GpuProbe(Option<std::sync::Arc<std::sync::Mutex<Option<ProbeResult>>>>);

/// The adapter, or why there is none.
type ProbeResult = Result<AdapterSummary, String>;

impl GpuProbe {
    fn start(&mut self, ctx: &egui::Context) {
        if self.0.is_some() {
            return;
        }
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (out, ctx) = (std::sync::Arc::clone(&slot), ctx.clone());
        let spawned = std::thread::Builder::new()
            .name("gpu-probe".into())
            .spawn(move || {
                let r = quant_engine::backend::wgpu::adapter().map_err(|e| e.to_string());
                *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                ctx.request_repaint();
            });
        if spawned.is_err() {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Err("could not start the GPU probe".into()));
        }
        self.0 = Some(slot);
    }

    fn result(&self) -> Option<ProbeResult> {
        self.0
            .as_ref()
            .and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl StudioApp {
    /// A studio talking to `engine` (the real engine, or [`EngineHandle::detached`] in tests), with the
    /// settings eframe stored last time.
    pub fn new(cc: &eframe::CreationContext<'_>, engine: EngineHandle) -> Self {
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
        Self::with_settings(&cc.egui_ctx, engine, settings)
    }

    pub fn with_settings(ctx: &egui::Context, engine: EngineHandle, settings: Settings) -> Self {
        let repaint = ctx.clone();
        engine.set_waker(Box::new(move || repaint.request_repaint()));
        theme::apply(ctx, settings.theme);
        let dialogs = Dialogs::new(ctx.clone());
        let quantize = quantize::QuantizePanel::from_settings(&settings);
        let mut gpu = GpuProbe::default();
        if settings.backend == Backend::Gpu {
            gpu.start(ctx);
        }
        Self {
            shared: Shared {
                engine,
                settings,
                notes: Notifications::default(),
                dialogs,
                source: None,
                variants: Vec::new(),
                owners: HashMap::new(),
            },
            tab: Tab::Model,
            model: model::ModelPanel::default(),
            quantize,
            compare: compare::ComparePanel::default(),
            chat: chat::ChatPanel::default(),
            frame_times: FrameTimes::default(),
            show_frame_time: true,
            walkthrough: None,
            gpu,
        }
    }

    /// Open a model (a folder or a .gguf): the card fills in when the engine has read it.
    pub fn open_model(&mut self, path: PathBuf) {
        self.tab = Tab::Model;
        self.model.open(&mut self.shared, path);
    }

    /// Download (or reuse) SmolLM2-135M-Instruct and open it.
    pub fn get_demo_model(&mut self) {
        self.tab = Tab::Model;
        self.model.get_demo(&mut self.shared);
    }

    /// Whether any job is running (for the frame-time statistics).
    pub fn busy(&self) -> bool {
        self.running_jobs() > 0
    }

    /// Jobs at work (an idle chat session is not).
    pub fn running_jobs(&self) -> usize {
        let chats_idle = !self.chat.writing();
        self.shared
            .owners
            .values()
            .filter(|o| !(chats_idle && **o == Owner::Chat))
            .count()
    }

    fn drain_events(&mut self) {
        // At most a bounded number per frame, so a flood of tokens cannot stall a frame.
        for _ in 0..4096 {
            let Ok(ev) = self.shared.engine.events.try_recv() else {
                break;
            };
            self.route(ev);
        }
    }

    /// Hand an event to the panel whose job it is about.
    pub fn route(&mut self, ev: Event) {
        let job = ev.job();
        let Some(owner) = self.shared.owners.get(&job).copied() else {
            return;
        };
        if ev.is_terminal() {
            self.shared.owners.remove(&job);
        }
        match owner {
            Owner::Model => self.model.on_event(&mut self.shared, ev),
            Owner::Quantize => self.quantize.on_event(&mut self.shared, ev),
            Owner::Compare => self.compare.on_event(&mut self.shared, ev),
            Owner::Chat => self.chat.on_event(&mut self.shared, ev),
        }
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        use egui::{Key, KeyboardShortcut, Modifiers};
        let open_file = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
        let open_folder = KeyboardShortcut::new(Modifiers::COMMAND | Modifiers::SHIFT, Key::O);
        let quantize = KeyboardShortcut::new(Modifiers::COMMAND, Key::Q);
        let (folder, file, quant, tabs) = ctx.input_mut(|i| {
            let folder = i.consume_shortcut(&open_folder);
            let file = i.consume_shortcut(&open_file);
            let quant = i.consume_shortcut(&quantize);
            let mut tab = None;
            for (k, t) in [Key::Num1, Key::Num2, Key::Num3, Key::Num4]
                .into_iter()
                .zip(Tab::ALL)
            {
                if i.consume_shortcut(&KeyboardShortcut::new(Modifiers::COMMAND, k)) {
                    tab = Some(t);
                }
            }
            (folder, file, quant, tab)
        });
        if folder {
            self.shared.dialogs.pick_model_folder();
        }
        if file {
            self.shared.dialogs.pick_model_file();
        }
        if quant {
            self.tab = Tab::Quantize;
            self.quantize.start(&mut self.shared);
        }
        if let Some(t) = tabs {
            self.tab = t;
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        egui::Panel::top("top").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("Quant Studio");
                ui.separator();
                for (i, t) in Tab::ALL.into_iter().enumerate() {
                    ui.selectable_value(&mut self.tab, t, t.title())
                        .on_hover_text(format!("Ctrl+{}", i + 1));
                }
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    if let Some(t) = theme::switch(ui, self.shared.settings.theme) {
                        self.shared.settings.theme = t;
                        theme::apply(ui.ctx(), t);
                    }
                    if let Some(m) = &self.shared.source {
                        ui.label(egui::RichText::new(&m.summary.name).strong());
                    }
                });
            });
        });
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                let running = self.running_jobs();
                if running > 0 {
                    ui.spinner();
                    ui.label(format!("{running} job(s) running"));
                } else {
                    ui.label("idle");
                }
                ui.separator();
                self.compute_menu(ui);
                ui.separator();
                if let Some(s) = self.quantize.status_line() {
                    ui.label(s);
                }
                if !self.show_frame_time {
                    return;
                }
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    let f = &self.frame_times;
                    ui.weak(format!(
                        "frame {:.1} ms · busy max {:.1} ms",
                        f.last_ms, f.busy_max_ms
                    ))
                    .on_hover_text(format!(
                        "CPU time of the UI thread per frame: mean {:.2} ms, max {:.1} ms over {} frames; \
                         max {:.1} ms over the {} frames drawn while a job ran",
                        f.mean_ms(),
                        f.max_ms,
                        f.frames,
                        f.busy_max_ms,
                        f.busy_frames
                    ));
                });
            });
        });
    }

    /// "Compute: CPU | GPU (name)": where jobs started from now on run.
    fn compute_menu(&mut self, ui: &mut egui::Ui) {
        let probe = self.gpu.result();
        let backend = &mut self.shared.settings.backend;
        let current = match (*backend, &probe) {
            (Backend::Cpu, _) => "CPU".to_string(),
            (Backend::Gpu, Some(Ok(a))) => format!("GPU ({})", a.name),
            (Backend::Gpu, Some(Err(_))) => "GPU (unavailable: CPU used)".to_string(),
            (Backend::Gpu, None) => "GPU".to_string(),
        };
        let mut opened = false;
        let label = ui.label("Compute:");
        egui::ComboBox::from_id_salt("compute")
            .selected_text(current)
            .show_ui(ui, |ui| {
                opened = true;
                ui.selectable_value(backend, Backend::Cpu, "CPU");
                match &probe {
                    None => {
                        ui.horizontal(|ui| {
                            ui.spinner();
                            ui.label("looking for a GPU...");
                        });
                    }
                    Some(Ok(a)) => {
                        ui.selectable_value(backend, Backend::Gpu, format!("GPU: {}", a.label()));
                        if a.is_software() {
                            ui.weak("a software adapter: correct, but slower than the CPU");
                        }
                    }
                    Some(Err(e)) => {
                        ui.add_enabled(false, egui::Button::new("GPU: none found"))
                            .on_disabled_hover_text(e);
                    }
                }
                ui.separator();
                ui.weak(
                    "Where evaluation, chat, importance matrices and calibrated quantization \
                     (GPTQ, AWQ, EXL2) run from now on; the GPU through wgpu (Vulkan, Metal, DX12).",
                );
            })
            .response
            .labelled_by(label.id);
        if opened {
            self.gpu.start(ui.ctx());
        }
    }

    fn handle_drops_and_dialogs(&mut self, ctx: &egui::Context) {
        let dropped = ctx.input(|i| i.raw.dropped_files.first().map(|f| f.path().to_path_buf()));
        if let Some(path) = dropped {
            self.open_model(path);
        }
        for result in self.shared.dialogs.poll() {
            match result {
                Err(kind) => self.shared.notes.error(
                    "The file dialog could not open",
                    format!(
                        "{}: no file chooser is available here (it needs xdg-desktop-portal or \
                         zenity). Type the path in the window instead.",
                        kind.title()
                    ),
                ),
                Ok(dialogs::Picked::Model(p)) => self.open_model(p),
                Ok(other) => {
                    self.quantize.on_dialog(&other);
                    self.compare.on_dialog(&mut self.shared, &other);
                    self.chat.on_dialog(&mut self.shared, &other);
                    self.model.on_dialog(&mut self.shared, &other);
                }
            }
        }
        self.shared.dialogs.ui(ctx);
    }

    /// One frame of the UI in the window's root `ui` (what eframe calls; tests call it through the harness).
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        let t0 = Instant::now();
        let ctx = &ui.ctx().clone();
        self.drain_events();
        self.handle_drops_and_dialogs(ctx);
        self.shortcuts(ctx);
        self.top_bar(ui);
        self.status_bar(ui);
        egui::CentralPanel::default().show(ui, |ui| match self.tab {
            Tab::Model => {
                if let Some(next) = self.model.ui(ui, &mut self.shared) {
                    self.tab = next;
                }
            }
            Tab::Quantize => self.quantize.ui(ui, &mut self.shared),
            Tab::Compare => self.compare.ui(ui, &mut self.shared),
            Tab::Chat => self.chat.ui(ui, &mut self.shared),
        });
        self.shared.notes.ui(ctx);
        if let Some(mut w) = self.walkthrough.take() {
            w.step(self, ctx);
            self.walkthrough = Some(w);
        }
        // Running jobs report at least once a second; repaint anyway so ETAs and toasts age.
        if self.busy() || self.shared.notes.any() {
            ctx.request_repaint_after(Duration::from_millis(250));
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let busy = self.busy();
        self.frame_times.record(ms, busy);
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        if let Some(s) = frame.info().cpu_usage {
            if self.busy() {
                let f = &mut self.frame_times;
                f.busy_max_egui_ms = f.busy_max_egui_ms.max(f64::from(s) * 1e3);
                if f.busy_egui_ms.len() < 1_000_000 {
                    f.busy_egui_ms.push(s * 1e3);
                }
            }
        }
        StudioApp::ui(self, ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        self.quantize.store_settings(&mut self.shared.settings);
        eframe::set_value(storage, eframe::APP_KEY, &self.shared.settings);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        let f = &self.frame_times;
        if std::env::var_os("QS_FRAME_STATS").is_some() {
            eprintln!(
                "frame time: {} frames, mean {:.2} ms, max {:.1} ms; while busy: {} frames, max {:.1} ms",
                f.frames,
                f.mean_ms(),
                f.max_ms,
                f.busy_frames,
                f.busy_max_ms
            );
        }
    }
}

/// A progress bar: `done` of `total`, `text`, and the time left when known.
pub fn progress_bar(
    ui: &mut egui::Ui,
    (done, total): (u64, u64),
    eta: Option<f64>,
    text: String,
    width: f32,
) {
    let frac = if total > 0 {
        done as f32 / total as f32
    } else {
        0.0
    };
    let eta = eta
        .map(|s| format!(" · {} left", human_secs(s)))
        .unwrap_or_default();
    ui.add(
        egui::ProgressBar::new(frac)
            .desired_width(width)
            .text(format!("{text}{eta}")),
    );
}

pub use quant_engine::model::summary::{human_bytes, human_count};

/// A centred question with two answers: `Some(true)` for `yes`, `Some(false)` for `no`, `None` while
/// unanswered. `body` draws what is asked about.
pub fn confirm(
    ctx: &egui::Context,
    title: &str,
    yes: &str,
    no: &str,
    body: impl FnOnce(&mut egui::Ui),
) -> Option<bool> {
    let mut answer = None;
    egui::Window::new(title)
        .collapsible(false)
        .resizable(false)
        .anchor(egui::Align2::CENTER_CENTER, egui::vec2(0.0, 0.0))
        .show(ctx, |ui| {
            body(ui);
            ui.horizontal(|ui| {
                if ui.button(yes).clicked() {
                    answer = Some(true);
                }
                if ui.button(no).clicked() {
                    answer = Some(false);
                }
            });
        });
    answer
}

/// A path as one truncated monospace line (its end is cut with "…" when the room is short), the whole path
/// on hover: long default paths never widen a panel.
pub fn path_label(ui: &mut egui::Ui, path: &std::path::Path) -> egui::Response {
    let full = path.display().to_string();
    ui.add(egui::Label::new(egui::RichText::new(&full).monospace().weak()).truncate())
        .on_hover_text(full)
}

/// `1 h 02 min`, `3 min 05 s`, `12 s`.
pub fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}
