//! A scripted new-user session through the real window, for the README's screenshots and the
//! responsiveness report: `QS_WALKTHROUGH=DIR QS_WALKTHROUGH_MODEL=MODEL quant-studio` (under Xvfb or on a
//! desktop) opens the model, quantizes it to Q4_K_M, Q3_K_M and GPTQ 4-bit in one go, compares the three
//! with the source, chats with one and A/Bs two, saving a screenshot of each step into DIR and the frame
//! times into DIR/frame-times.txt, then closes the window. `QS_WALKTHROUGH_MODEL=demo` starts with "Get the demo
//! model" instead. It drives the app through the same methods the
//! buttons call; every engine job is real.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use eframe::egui;

use super::compare::{save_png, ChartView, Screenshot};
use super::plots::View;
use super::quantize::Status;
use super::{StudioApp, Tab};

pub struct Walkthrough {
    dir: PathBuf,
    model: PathBuf,
    stage: usize,
    /// The screenshot asked for.
    shot: Option<Screenshot>,
    since: Instant,
    /// Calibration rows × tokens for GPTQ (small, so the walkthrough takes minutes).
    rows: usize,
    seq_len: usize,
}

impl Walkthrough {
    /// From `QS_WALKTHROUGH` (the screenshot folder) and `QS_WALKTHROUGH_MODEL`; `None` if unset.
    pub fn from_env() -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os("QS_WALKTHROUGH")?);
        let model = PathBuf::from(std::env::var_os("QS_WALKTHROUGH_MODEL")?);
        let num = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        std::fs::create_dir_all(&dir).ok()?;
        Some(Self {
            dir,
            model,
            stage: 0,
            shot: None,
            since: Instant::now(),
            rows: num("QS_WALKTHROUGH_ROWS", 32),
            seq_len: num("QS_WALKTHROUGH_SEQ", 512),
        })
    }

    /// `QS_WALKTHROUGH_SIZE=WxH`: the window's size for this walkthrough.
    pub fn window_size(&self) -> Option<[f32; 2]> {
        let v = std::env::var("QS_WALKTHROUGH_SIZE").ok()?;
        let (w, h) = v.split_once('x')?;
        Some([w.trim().parse().ok()?, h.trim().parse().ok()?])
    }

    fn next(&mut self) {
        self.stage += 1;
        self.since = Instant::now();
    }

    /// Ask for a screenshot; true once it is saved.
    fn shoot(&mut self, ctx: &egui::Context, name: &str) -> bool {
        match &self.shot {
            None => {
                // Let the layout settle for a moment first.
                if self.since.elapsed() < Duration::from_millis(800) {
                    ctx.request_repaint_after(Duration::from_millis(100));
                    return false;
                }
                self.shot = Some(Screenshot::request(ctx));
                false
            }
            Some(shot) => {
                ctx.request_repaint_after(Duration::from_millis(50));
                let img = match shot.poll() {
                    Ok(None) => return false,
                    Ok(Some(img)) => img,
                    Err(e) => {
                        // Ask again.
                        eprintln!("walkthrough: {e}");
                        self.shot = None;
                        return false;
                    }
                };
                let path = self.dir.join(format!("{name}.png"));
                if let Err(e) = save_png(&img, &path) {
                    eprintln!("walkthrough: {e}");
                }
                eprintln!("walkthrough: saved {}", path.display());
                self.shot = None;
                true
            }
        }
    }

    // Each arm waits for its condition, then for its screenshot: the screenshot is an action with effects,
    // not a match guard.
    #[allow(clippy::collapsible_match)]
    pub fn step(&mut self, app: &mut StudioApp, ctx: &egui::Context) {
        ctx.request_repaint_after(Duration::from_millis(200));
        let q = &app.quantize;
        match self.stage {
            0 => {
                // `demo`: the newcomer's path, through "Get the demo model".
                if self.model.as_os_str() == "demo" {
                    app.get_demo_model();
                } else {
                    app.open_model(self.model.clone());
                }
                self.next();
            }
            1 if app.shared.source.is_some() => {
                if self.shoot(ctx, "1-model") {
                    self.next();
                }
            }
            2 => {
                app.tab = Tab::Quantize;
                let qp = &mut app.quantize;
                qp.gguf = vec!["Q4_K_M".into(), "Q3_K_M".into()];
                qp.imatrix = false;
                qp.gptq_bits = vec![4];
                qp.gptq_group = Some(128);
                qp.gptq_act_order = true;
                qp.gptq_sym = false;
                qp.calib.rows = self.rows;
                qp.calib.seq_len = self.seq_len;
                self.next();
            }
            3 => {
                if self.shoot(ctx, "2-targets") {
                    // A rerun replaces what an earlier walkthrough wrote (the studio would ask).
                    app.quantize.start_with(&mut app.shared, true);
                    self.next();
                }
            }
            // GPTQ under way with a good part of its layers plotted.
            4 if q.queue.len() == 3
                && q.queue[2].status == Status::Running
                && q.plots.runs.get(2).is_some_and(|r| r.metrics.len() >= 60) =>
            {
                if self.shoot(ctx, "3-quantize-running") {
                    self.next();
                }
            }
            5 if q.queue.iter().all(|i| {
                matches!(
                    i.status,
                    Status::Done | Status::Failed(_) | Status::Cancelled
                )
            }) =>
            {
                app.quantize.plots.view = View::HeatMap;
                app.quantize.plots.heat_run = 1;
                app.quantize.plots.metric = super::plots::Metric::RelError;
                self.next();
            }
            6 => {
                if self.shoot(ctx, "4-heat-map") {
                    app.quantize.plots.view = View::ErrorByLayer;
                    for r in &mut app.quantize.plots.runs {
                        r.shown = true;
                    }
                    self.next();
                }
            }
            7 => {
                if self.shoot(ctx, "5-error-overlay") {
                    app.tab = Tab::Compare;
                    app.compare.picked = app
                        .shared
                        .variants
                        .iter()
                        .filter(|v| !v.is_source)
                        .map(|v| v.path.clone())
                        .collect();
                    app.compare.max_chunks = 12;
                    app.compare.n_ctx = 512;
                    app.compare.run(&mut app.shared);
                    self.next();
                }
            }
            8 if app.compare.rows.len() >= 3 && app.compare.rows[2].ppl_curve.len() >= 4 => {
                if self.shoot(ctx, "6-compare-running") {
                    self.next();
                }
            }
            9 if app
                .compare
                .rows
                .iter()
                .all(|r| !r.running && r.job.is_some()) =>
            {
                app.compare.chart = ChartView::Bars;
                self.next();
            }
            10 => {
                if self.shoot(ctx, "7-compare-bars") {
                    app.compare.chart = ChartView::Scatter;
                    self.next();
                }
            }
            11 => {
                if self.shoot(ctx, "8-compare-scatter") {
                    app.tab = Tab::Chat;
                    let v = app
                        .shared
                        .variants
                        .iter()
                        .find(|v| v.label.starts_with("Q4_K_M"));
                    app.chat.sides[0].model = v.map(|v| v.path.clone());
                    app.chat.max_new_tokens = 96;
                    app.chat.send(
                        &mut app.shared,
                        "What is a good name for a pet hedgehog? Answer in two sentences.".into(),
                    );
                    self.next();
                }
            }
            12 if !app.chat.writing() => {
                if self.shoot(ctx, "9-chat") {
                    app.chat.ab = true;
                    let find = |p: &str| {
                        app.shared
                            .variants
                            .iter()
                            .find(|v| v.label.starts_with(p))
                            .map(|v| v.path.clone())
                    };
                    app.chat.sides[0].model = find("Q3_K_M");
                    app.chat.sides[1].model = find("GPTQ");
                    app.chat.send(
                        &mut app.shared,
                        "Explain in one paragraph what quantizing a language model does.".into(),
                    );
                    self.next();
                }
            }
            13 if !app.chat.writing() => {
                if self.shoot(ctx, "10-chat-ab") {
                    self.next();
                }
            }
            14 => {
                let f = &app.frame_times;
                let report = format!(
                    "frames {}\nmean_ms {:.3}\nmax_ms {:.2}\nbusy_frames {}\nbusy_max_ms {:.2}\n\
                     busy_egui_frame_ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}\n\
                     busy_egui_frames_over_50ms {}\n",
                    f.frames,
                    f.mean_ms(),
                    f.max_ms,
                    f.busy_frames,
                    f.busy_max_ms,
                    f.busy_egui_quantile(0.5),
                    f.busy_egui_quantile(0.99),
                    f.busy_egui_quantile(0.999),
                    f.busy_max_egui_ms,
                    f.busy_egui_ms.iter().filter(|m| **m > 50.0).count()
                );
                let _ = std::fs::write(self.dir.join("frame-times.txt"), &report);
                eprint!("walkthrough done\n{report}");
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                self.next();
            }
            _ => {}
        }
    }
}
