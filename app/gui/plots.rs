//! Per-layer charts of a quantization, filled in as `LayerDone` events arrive: the error of every tensor
//! kind by layer (log scale, one series per kind, several runs overlaid), a heat map (layers × kinds),
//! and bits per layer for mixed formats. Hovering shows the exact numbers.

use eframe::egui::{self, Sense};
use egui_plot::{HoverPosition, Legend, Line, LineStyle, Plot, PlotPoints};
use quant_engine::jobs::LayerMetrics;

use super::theme::{kind_color, kind_of, ramp, KINDS};

/// Which number the charts show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// ‖W − Ŵ‖ / ‖W‖.
    RelError,
    /// The same weighted by input importance (imatrix runs), else the plain error.
    Weighted,
    /// GPTQ's output loss on the calibration inputs (GPTQ runs), else nothing.
    GptqLoss,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::RelError, Metric::Weighted, Metric::GptqLoss];

    pub fn name(self) -> &'static str {
        match self {
            Metric::RelError => "relative RMS error",
            Metric::Weighted => "importance-weighted error",
            Metric::GptqLoss => "GPTQ output loss",
        }
    }

    /// The value of this metric for a tensor, if it has one.
    pub fn of(self, m: &LayerMetrics) -> Option<f64> {
        let v = match self {
            Metric::RelError => Some(m.rel_rms_error),
            Metric::Weighted => m.weighted_rel_rms_error.or(Some(m.rel_rms_error)),
            Metric::GptqLoss => m.gptq_loss,
        }?;
        (v.is_finite() && v > 0.0).then_some(v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    ErrorByLayer,
    HeatMap,
    BitsByLayer,
}

/// One quantization's metrics.
#[derive(Clone, Debug)]
pub struct Run {
    pub label: String,
    pub metrics: Vec<LayerMetrics>,
    pub done: bool,
    /// Drawn in the overlay.
    pub shown: bool,
}

/// A named series of points, as drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub kind: &'static str,
    pub points: Vec<[f64; 2]>,
}

/// Parameters of each tensor kind in a layer (to weight bits per layer); from the model's shape.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerShape {
    pub hidden: usize,
    pub kv_dim: usize,
    pub intermediate: usize,
}

impl LayerShape {
    fn params(&self, kind: &str) -> f64 {
        let h = self.hidden as f64;
        match kind {
            "q" | "o" => h * h,
            "k" | "v" => h * self.kv_dim as f64,
            _ => h * self.intermediate as f64,
        }
    }
}

pub struct LayerPlots {
    pub runs: Vec<Run>,
    pub view: View,
    pub metric: Metric,
    /// The run the heat map shows.
    pub heat_run: usize,
    pub shape: LayerShape,
}

impl Default for LayerPlots {
    fn default() -> Self {
        Self {
            runs: Vec::new(),
            view: View::ErrorByLayer,
            metric: Metric::RelError,
            heat_run: 0,
            shape: LayerShape::default(),
        }
    }
}

impl LayerPlots {
    /// A new run (shown, and the heat map's subject); returns its index.
    pub fn start_run(&mut self, label: String) -> usize {
        self.runs.push(Run {
            label,
            metrics: Vec::new(),
            done: false,
            shown: true,
        });
        self.heat_run = self.runs.len() - 1;
        self.runs.len() - 1
    }

    pub fn push(&mut self, run: usize, m: LayerMetrics) {
        if let Some(r) = self.runs.get_mut(run) {
            // GPTQ runs choose their metric as soon as one arrives.
            if m.gptq_loss.is_some() && r.metrics.is_empty() && self.metric == Metric::RelError {
                self.metric = Metric::GptqLoss;
            }
            r.metrics.push(m);
        }
    }

    pub fn finish(&mut self, run: usize) {
        if let Some(r) = self.runs.get_mut(run) {
            r.done = true;
        }
    }

    /// The error-by-layer series: per shown run, one per tensor kind that has values, x = layer, y = the
    /// metric (not its log).
    pub fn error_series(&self) -> Vec<Series> {
        let shown: Vec<&Run> = self.runs.iter().filter(|r| r.shown).collect();
        let many = shown.len() > 1;
        let mut out = Vec::new();
        for r in shown {
            for kind in KINDS {
                let mut points: Vec<[f64; 2]> = r
                    .metrics
                    .iter()
                    .filter(|m| kind_of(&m.tensor) == Some(kind))
                    .filter_map(|m| Some([m.layer? as f64, self.metric.of(m)?]))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                points.sort_by(|a, b| a[0].total_cmp(&b[0]));
                let name = if many {
                    format!("{} · {kind}", r.label)
                } else {
                    kind.to_string()
                };
                out.push(Series { name, kind, points });
            }
        }
        out
    }

    /// Bits per weight of each layer of each shown run (weighted by the kinds' parameter counts).
    pub fn bits_series(&self) -> Vec<Series> {
        let mut out = Vec::new();
        for r in self.runs.iter().filter(|r| r.shown) {
            let mut per_layer: std::collections::BTreeMap<usize, (f64, f64)> = Default::default();
            for m in &r.metrics {
                let (Some(layer), Some(kind)) = (m.layer, kind_of(&m.tensor)) else {
                    continue;
                };
                let w = self.shape.params(kind).max(1.0);
                let e = per_layer.entry(layer).or_default();
                e.0 += m.bits_per_weight * w;
                e.1 += w;
            }
            let points = per_layer
                .into_iter()
                .map(|(l, (bw, w))| [l as f64, bw / w])
                .collect();
            out.push(Series {
                name: r.label.clone(),
                kind: "",
                points,
            });
        }
        out
    }

    /// The heat map's cells: (layer, kind index, value) of the heat-map run.
    pub fn heat_cells(&self) -> Vec<(usize, usize, f64)> {
        let Some(r) = self.runs.get(self.heat_run) else {
            return Vec::new();
        };
        r.metrics
            .iter()
            .filter_map(|m| {
                let k = KINDS.iter().position(|k| Some(*k) == kind_of(&m.tensor))?;
                Some((m.layer?, k, self.metric.of(m)?))
            })
            .collect()
    }

    pub fn ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.selectable_value(&mut self.view, View::ErrorByLayer, "Error by layer");
            ui.selectable_value(&mut self.view, View::HeatMap, "Heat map");
            ui.selectable_value(&mut self.view, View::BitsByLayer, "Bits by layer");
            ui.separator();
            egui::ComboBox::from_id_salt("metric")
                .selected_text(self.metric.name())
                .show_ui(ui, |ui| {
                    for m in Metric::ALL {
                        ui.selectable_value(&mut self.metric, m, m.name());
                    }
                })
                .response
                .on_hover_text("Error metric");
        });
        if self.runs.is_empty() {
            ui.weak("The charts fill in as tensors are quantized.");
            return;
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("Runs:");
            for (i, r) in self.runs.iter_mut().enumerate() {
                let mark = if r.done { "" } else { " …" };
                ui.checkbox(&mut r.shown, format!("{}{mark}", r.label))
                    .on_hover_text("Overlay this run's series");
                if self.view == View::HeatMap && r.shown && ui.small_button("map").clicked() {
                    self.heat_run = i;
                }
            }
        });
        match self.view {
            View::ErrorByLayer => self.error_plot(ui),
            View::HeatMap => self.heat_map(ui),
            View::BitsByLayer => self.bits_plot(ui),
        }
    }

    fn error_plot(&self, ui: &mut egui::Ui) {
        let series = self.error_series();
        let runs: Vec<&str> = self
            .runs
            .iter()
            .filter(|r| r.shown)
            .map(|r| r.label.as_str())
            .collect();
        let metric = self.metric.name();
        Plot::new("error-by-layer")
            .legend(Legend::default())
            .x_axis_label("layer")
            .y_axis_label(format!("{metric} (log)"))
            .y_axis_formatter(|mark, _| short_number(10f64.powf(mark.value)))
            .label_formatter(|pos| match pos {
                HoverPosition::NearDataPoint {
                    plot_name,
                    position: p,
                    ..
                } if !plot_name.is_empty() => Some(format!(
                    "{plot_name}\nlayer {:.0}\n{:.4e}",
                    p.x,
                    10f64.powf(p.y)
                )),
                _ => None,
            })
            .show(ui, |plot| {
                for s in series {
                    let run = runs
                        .iter()
                        .position(|r| s.name.starts_with(&format!("{r} · ")))
                        .unwrap_or(0);
                    let style = match run % 3 {
                        0 => LineStyle::Solid,
                        1 => LineStyle::dashed_loose(),
                        _ => LineStyle::dotted_dense(),
                    };
                    let pts: PlotPoints = s
                        .points
                        .iter()
                        .map(|p| [p[0], p[1].log10()])
                        .collect::<Vec<_>>()
                        .into();
                    plot.line(
                        Line::new(&s.name, pts)
                            .color(kind_color(s.kind))
                            .style(style),
                    );
                }
            });
    }

    fn bits_plot(&self, ui: &mut egui::Ui) {
        let series = self.bits_series();
        Plot::new("bits-by-layer")
            .legend(Legend::default())
            .x_axis_label("layer")
            .y_axis_label("bits per weight")
            .show(ui, |plot| {
                for (i, s) in series.into_iter().enumerate() {
                    plot.line(
                        Line::new(&s.name, PlotPoints::from(s.points))
                            .color(super::theme::series_color(i)),
                    );
                }
            });
    }

    fn heat_map(&self, ui: &mut egui::Ui) {
        let cells = self.heat_cells();
        let Some(run) = self.runs.get(self.heat_run) else {
            return;
        };
        ui.label(format!("{} — {}", run.label, self.metric.name()));
        if cells.is_empty() {
            ui.weak("No values for this metric yet.");
            return;
        }
        let layers = cells.iter().map(|c| c.0).max().unwrap_or(0) + 1;
        let (lo, hi) = cells.iter().fold((f64::MAX, f64::MIN), |(lo, hi), c| {
            (lo.min(c.2.log10()), hi.max(c.2.log10()))
        });
        let span = (hi - lo).max(1e-9);
        let label_w = 48.0;
        let avail = ui.available_size();
        let cell_w = ((avail.x - label_w) / layers as f32).clamp(4.0, 40.0);
        let cell_h = ((avail.y - 40.0) / KINDS.len() as f32).clamp(10.0, 36.0);
        let size = egui::vec2(
            label_w + cell_w * layers as f32,
            cell_h * KINDS.len() as f32 + 18.0,
        );
        let (rect, response) = ui.allocate_exact_size(size, Sense::hover());
        let painter = ui.painter_at(rect);
        let text_color = ui.visuals().text_color();
        for (k, kind) in KINDS.iter().enumerate() {
            painter.text(
                rect.left_top() + egui::vec2(4.0, cell_h * (k as f32 + 0.5)),
                egui::Align2::LEFT_CENTER,
                kind,
                egui::FontId::monospace(12.0),
                text_color,
            );
        }
        let cell_rect = |l: usize, k: usize| {
            egui::Rect::from_min_size(
                rect.left_top() + egui::vec2(label_w + cell_w * l as f32, cell_h * k as f32),
                egui::vec2(cell_w - 1.0, cell_h - 1.0),
            )
        };
        for &(l, k, v) in &cells {
            painter.rect_filled(cell_rect(l, k), 1.0, ramp((v.log10() - lo) / span));
        }
        for l in (0..layers).step_by(((layers / 10).max(1)).max(1)) {
            painter.text(
                rect.left_top()
                    + egui::vec2(
                        label_w + cell_w * (l as f32 + 0.5),
                        cell_h * KINDS.len() as f32 + 2.0,
                    ),
                egui::Align2::CENTER_TOP,
                l.to_string(),
                egui::FontId::monospace(10.0),
                text_color,
            );
        }
        if let Some(pos) = response.hover_pos() {
            if let Some(&(l, k, v)) = cells
                .iter()
                .find(|(l, k, _)| cell_rect(*l, *k).contains(pos))
            {
                let m = run
                    .metrics
                    .iter()
                    .find(|m| m.layer == Some(l) && kind_of(&m.tensor) == Some(KINDS[k]));
                response.on_hover_ui_at_pointer(|ui| {
                    ui.strong(format!("layer {l} · {}", KINDS[k]));
                    ui.label(format!("{}: {v:.4e}", self.metric.name()));
                    if let Some(m) = m {
                        ui.label(format!("{} · {:.2} bpw", m.codec, m.bits_per_weight));
                        ui.label(format!("max |W − Ŵ| {:.3e}", m.max_error));
                        if let (Some(g), Some(r)) = (m.gptq_loss, m.rtn_loss) {
                            ui.label(format!("GPTQ loss {g:.4e} (RTN {r:.4e})"));
                        }
                    }
                });
            }
        }
        ui.horizontal(|ui| {
            ui.weak(format!("{:.1e}", 10f64.powf(lo)));
            let (r, _) = ui.allocate_exact_size(egui::vec2(160.0, 10.0), Sense::hover());
            for i in 0..32 {
                let t = i as f32 / 32.0;
                let x0 = r.left() + r.width() * t;
                ui.painter().rect_filled(
                    egui::Rect::from_min_max(
                        egui::pos2(x0, r.top()),
                        egui::pos2(x0 + r.width() / 32.0 + 0.5, r.bottom()),
                    ),
                    0.0,
                    ramp(f64::from(t)),
                );
            }
            ui.weak(format!("{:.1e}", 10f64.powf(hi)));
        });
    }
}

/// A tick label: 3 significant digits, scientific outside 0.001‥10000.
pub fn short_number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e4).contains(&v.abs()) {
        let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    } else {
        format!("{v:.2e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(layer: usize, kind: &str, err: f64, bpw: f64) -> LayerMetrics {
        let part = match kind {
            "q" => "self_attn.q_proj",
            "k" => "self_attn.k_proj",
            "down" => "mlp.down_proj",
            _ => "mlp.up_proj",
        };
        LayerMetrics {
            layer: Some(layer),
            tensor: format!("model.layers.{layer}.{part}.weight"),
            codec: "Q4_K".into(),
            bits_per_weight: bpw,
            rel_rms_error: err,
            weighted_rel_rms_error: None,
            gptq_loss: None,
            rtn_loss: None,
            max_error: 0.1,
        }
    }

    #[test]
    fn series_heat_cells_and_bits() {
        let mut p = LayerPlots {
            shape: LayerShape {
                hidden: 4,
                kv_dim: 2,
                intermediate: 8,
            },
            ..Default::default()
        };
        let a = p.start_run("Q4_K_M".into());
        p.push(a, metric(1, "q", 0.02, 4.5));
        p.push(a, metric(0, "q", 0.01, 4.5));
        p.push(a, metric(0, "down", 0.03, 6.5625));
        let s = p.error_series();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "q");
        assert_eq!(s[0].points, vec![[0.0, 0.01], [1.0, 0.02]]);
        assert_eq!(s[1].name, "down");
        // Layer 0: q (16 params at 4.5) and down (32 at 6.5625).
        let bits = p.bits_series();
        let want = (16.0 * 4.5 + 32.0 * 6.5625) / 48.0;
        assert!((bits[0].points[0][1] - want).abs() < 1e-12);
        let b = p.start_run("Q3_K_M".into());
        p.push(b, metric(0, "k", 0.05, 3.4375));
        let names: Vec<String> = p.error_series().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["Q4_K_M · q", "Q4_K_M · down", "Q3_K_M · k"]);
        assert_eq!(p.heat_cells(), vec![(0, 1, 0.05)]);
        p.runs[0].shown = false;
        assert_eq!(p.error_series().len(), 1);
        assert_eq!(short_number(0.0123), "0.0123");
        assert_eq!(short_number(0.03), "0.0300");
        assert_eq!(short_number(12.5), "12.5");
        assert_eq!(short_number(2.5e-5), "2.50e-5");
    }
}
