//! Light and dark themes, and the colours every chart uses (one per tensor kind, one per variant), so the
//! same thing has the same colour on every panel.

use eframe::egui::{self, Color32};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThemeChoice {
    #[default]
    Dark,
    Light,
}

/// Set the visuals for `choice`.
pub fn apply(ctx: &egui::Context, choice: ThemeChoice) {
    let mut visuals = match choice {
        ThemeChoice::Dark => egui::Visuals::dark(),
        ThemeChoice::Light => egui::Visuals::light(),
    };
    visuals.window_corner_radius = egui::CornerRadius::same(6);
    visuals.selection.bg_fill = accent(choice);
    ctx.set_visuals(visuals);
}

/// The accent colour (selection, primary buttons).
pub fn accent(choice: ThemeChoice) -> Color32 {
    match choice {
        ThemeChoice::Dark => Color32::from_rgb(0x2f, 0x6f, 0xb0),
        ThemeChoice::Light => Color32::from_rgb(0x9c, 0xc4, 0xf0),
    }
}

/// A button that flips the theme; returns the new choice when clicked.
pub fn switch(ui: &mut egui::Ui, current: ThemeChoice) -> Option<ThemeChoice> {
    let (icon, next, hint) = match current {
        ThemeChoice::Dark => ("☀", ThemeChoice::Light, "Light theme"),
        ThemeChoice::Light => ("🌙", ThemeChoice::Dark, "Dark theme"),
    };
    ui.button(icon)
        .on_hover_text(hint)
        .clicked()
        .then_some(next)
}

/// The tensor kinds the per-layer charts show, in the order of a decoder layer.
pub const KINDS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// The kind of a Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight` → `q`).
pub fn kind_of(tensor: &str) -> Option<&'static str> {
    let parts = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    parts
        .iter()
        .position(|p| tensor.contains(p))
        .map(|i| KINDS[i])
}

/// The colour of a tensor kind (a qualitative palette readable on light and dark backgrounds).
pub fn kind_color(kind: &str) -> Color32 {
    let i = KINDS.iter().position(|k| *k == kind).unwrap_or(7);
    series_color(i)
}

/// The i-th colour of the series palette.
pub fn series_color(i: usize) -> Color32 {
    const PALETTE: [Color32; 10] = [
        Color32::from_rgb(0x4e, 0x79, 0xa7),
        Color32::from_rgb(0xf2, 0x8e, 0x2b),
        Color32::from_rgb(0xe1, 0x57, 0x59),
        Color32::from_rgb(0x76, 0xb7, 0xb2),
        Color32::from_rgb(0x59, 0xa1, 0x4f),
        Color32::from_rgb(0xed, 0xc9, 0x48),
        Color32::from_rgb(0xb0, 0x7a, 0xa1),
        Color32::from_rgb(0xff, 0x9d, 0xa7),
        Color32::from_rgb(0x9c, 0x75, 0x5f),
        Color32::from_rgb(0xba, 0xb0, 0xac),
    ];
    PALETTE[i % PALETTE.len()]
}

/// A colour for `t` in 0..=1 on a perceptually ordered ramp (viridis-like), for heat maps.
pub fn ramp(t: f64) -> Color32 {
    const STOPS: [(f64, [u8; 3]); 5] = [
        (0.0, [0x44, 0x01, 0x54]),
        (0.25, [0x3b, 0x52, 0x8b]),
        (0.5, [0x21, 0x90, 0x8d]),
        (0.75, [0x5d, 0xc8, 0x63]),
        (1.0, [0xfd, 0xe7, 0x25]),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let k = STOPS
        .windows(2)
        .position(|w| t <= w[1].0)
        .unwrap_or(STOPS.len() - 2);
    let (t0, a) = STOPS[k];
    let (t1, b) = STOPS[k + 1];
    let f = (t - t0) / (t1 - t0);
    let mix = |i: usize| (f64::from(a[i]) + (f64::from(b[i]) - f64::from(a[i])) * f).round() as u8;
    Color32::from_rgb(mix(0), mix(1), mix(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_ramp() {
        assert_eq!(kind_of("model.layers.3.self_attn.q_proj.weight"), Some("q"));
        assert_eq!(kind_of("model.layers.0.mlp.down_proj.weight"), Some("down"));
        assert_eq!(kind_of("model.embed_tokens.weight"), None);
        assert_eq!(ramp(0.0), Color32::from_rgb(0x44, 0x01, 0x54));
        assert_eq!(ramp(1.0), Color32::from_rgb(0xfd, 0xe7, 0x25));
        assert_eq!(ramp(f64::NAN), ramp(0.0));
        assert_ne!(kind_color("q"), kind_color("k"));
    }
}
