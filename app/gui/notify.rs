//! Notifications: errors and news as toasts in the corner, with details on click; errors stay until
//! closed, news fades after a few seconds. Nothing is ever shown in a blocking dialog.

use std::time::{Duration, Instant};

use eframe::egui;

/// How long an info toast stays.
const INFO_TTL: Duration = Duration::from_secs(6);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

#[derive(Clone, Debug)]
pub struct Notification {
    pub level: Level,
    pub title: String,
    pub details: String,
    pub at: Instant,
}

#[derive(Default)]
pub struct Notifications {
    pub items: Vec<Notification>,
}

impl Notifications {
    pub fn error(&mut self, title: impl Into<String>, details: impl Into<String>) {
        self.push(Level::Error, title.into(), details.into());
    }

    pub fn info(&mut self, title: impl Into<String>, details: impl Into<String>) {
        self.push(Level::Info, title.into(), details.into());
    }

    fn push(&mut self, level: Level, title: String, details: String) {
        self.items.push(Notification {
            level,
            title,
            details,
            at: Instant::now(),
        });
        // Bounded: the oldest go first.
        if self.items.len() > 8 {
            self.items.remove(0);
        }
    }

    pub fn any(&self) -> bool {
        !self.items.is_empty()
    }

    pub fn errors(&self) -> impl Iterator<Item = &Notification> {
        self.items.iter().filter(|n| n.level == Level::Error)
    }

    /// Draw the toasts (bottom right).
    pub fn ui(&mut self, ctx: &egui::Context) {
        self.items
            .retain(|n| n.level == Level::Error || n.at.elapsed() < INFO_TTL);
        if self.items.is_empty() {
            return;
        }
        let mut close = None;
        egui::Area::new(egui::Id::unique("notifications"))
            .anchor(egui::Align2::RIGHT_BOTTOM, [-12.0, -36.0])
            .order(egui::Order::Foreground)
            .show(ctx, |ui| {
                ui.set_max_width(420.0);
                for (i, n) in self.items.iter().enumerate() {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.horizontal(|ui| {
                            let (icon, color) = match n.level {
                                Level::Error => ("⚠", ui.visuals().error_fg_color),
                                Level::Info => ("ℹ", ui.visuals().hyperlink_color),
                            };
                            ui.colored_label(color, icon);
                            ui.strong(&n.title);
                            if ui.small_button("x").on_hover_text("Dismiss").clicked() {
                                close = Some(i);
                            }
                        });
                        if !n.details.is_empty() {
                            egui::CollapsingHeader::new("details")
                                .id_salt(("note", i, &n.title))
                                .show(ui, |ui| {
                                    ui.add(egui::Label::new(&n.details).wrap());
                                });
                        }
                    });
                }
            });
        if let Some(i) = close {
            self.items.remove(i);
        }
    }
}
