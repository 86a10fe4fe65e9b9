//! The desktop window. Until the studio issue lands: a drop zone that opens a model through the engine and
//! shows its card. The UI thread never waits: it sends a `Command` and drains `Event`s once per frame.

use std::path::PathBuf;

use eframe::egui;
use quant_engine::jobs::{Command, EngineHandle, Event, JobOutput};

/// Open the window, with `open` already loading if given. `demo` is reserved for the "get the demo
/// model" flow of the studio issue.
pub fn run(_demo: bool, open: Option<PathBuf>) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Quant Studio")
            .with_inner_size([1280.0, 800.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "Quant Studio",
        options,
        Box::new(|cc| {
            let mut app = StudioApp::new(&cc.egui_ctx);
            if let Some(path) = open {
                app.open(path);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// What the window shows about the model that was dropped.
enum ModelState {
    None,
    Loading(PathBuf),
    Loaded { path: PathBuf, card: String },
    Failed { path: PathBuf, error: String },
}

struct StudioApp {
    engine: EngineHandle,
    model: ModelState,
}

impl StudioApp {
    fn new(ctx: &egui::Context) -> Self {
        let engine = EngineHandle::spawn();
        let repaint = ctx.clone();
        engine.set_waker(Box::new(move || repaint.request_repaint()));
        Self {
            engine,
            model: ModelState::None,
        }
    }

    fn open(&mut self, path: PathBuf) {
        let cmd = Command::Inspect { path: path.clone() };
        self.model = match self.engine.commands.try_send(cmd) {
            Ok(()) => ModelState::Loading(path),
            Err(e) => ModelState::Failed {
                path,
                error: format!("the engine is busy: {e}"),
            },
        };
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.engine.events.try_recv() {
            let path = match &self.model {
                ModelState::Loading(p) => p.clone(),
                _ => continue,
            };
            match ev {
                Event::Finished {
                    output: JobOutput::Summary(summary),
                    ..
                } => {
                    self.model = ModelState::Loaded {
                        path,
                        card: summary.to_string(),
                    };
                }
                Event::Failed { error, .. } => self.model = ModelState::Failed { path, error },
                _ => {}
            }
        }
    }

    fn drop_zone_ui(&mut self, ui: &mut egui::Ui, hovering: bool) {
        let stroke = if hovering {
            ui.visuals().selection.stroke
        } else {
            ui.visuals().widgets.noninteractive.bg_stroke
        };
        egui::Frame::group(ui.style())
            .stroke(stroke)
            .inner_margin(48.0)
            .show(ui, |ui| {
                ui.set_min_width(ui.available_width());
                ui.vertical_centered(|ui| {
                    ui.heading("Drop a model here");
                    ui.label("a Hugging Face folder (config.json + safetensors) or a .gguf file");
                });
            });
    }
}

impl eframe::App for StudioApp {
    fn update(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain_events();
        let (hovering, dropped) = ctx.input(|i| {
            (
                !i.raw.hovered_files.is_empty(),
                i.raw.dropped_files.iter().find_map(|f| f.path.clone()),
            )
        });
        if let Some(path) = dropped {
            self.open(path);
        }
        egui::CentralPanel::default().show(ctx, |ui| {
            ui.heading("Quant Studio");
            ui.add_space(12.0);
            self.drop_zone_ui(ui, hovering);
            ui.add_space(12.0);
            match &self.model {
                ModelState::None => {}
                ModelState::Loading(p) => {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label(format!("Opening {}", p.display()));
                    });
                }
                ModelState::Loaded { path, card } => {
                    ui.strong(path.display().to_string());
                    ui.monospace(card);
                }
                ModelState::Failed { path, error } => {
                    ui.colored_label(
                        ui.visuals().error_fg_color,
                        format!("{}: {error}", path.display()),
                    );
                }
            }
        });
    }
}
