//! The chat tab: pick a variant, chat with it through its own chat template with streaming tokens, stop,
//! sampling settings, a system prompt and tokens/s; in A/B mode one prompt goes to two variants and the
//! answers stream side by side. A draft model (any variant or file with the same tokenizer) decodes
//! speculatively; each reply shows its acceptance rate.

use std::path::PathBuf;

use eframe::egui;
use quant_engine::infer::{GenerateOptions, SamplerConfig};
use quant_engine::jobs::{Command, Event, JobId};

use super::dialogs::Picked;
use super::{Owner, Shared};

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub user: bool,
    pub text: String,
}

/// One side of the chat (the only one, or A / B).
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// The variant chatted with.
    pub model: Option<PathBuf>,
    /// The engine's chat session and the model and system prompt it was started with.
    pub session: Option<(JobId, PathBuf, String)>,
    pub transcript: Vec<Message>,
    pub writing: bool,
    /// Decode speed of the last reply, and the arithmetic it was measured in.
    pub tokens_per_sec: Option<(f64, quant_engine::infer::Numerics)>,
    /// The last reply's drafted tokens accepted, when a draft model proposed any.
    pub acceptance_rate: Option<f64>,
    pub generated: usize,
    /// Tokens of the session's context in use (prompts and replies so far; approximate: chat-template
    /// tokens between turns are counted with the prompts).
    pub context_used: usize,
}

impl Side {
    fn label(&self, shared: &Shared) -> String {
        self.model
            .as_ref()
            .and_then(|p| shared.variants.iter().find(|v| &v.path == p))
            .map_or("—".into(), |v| v.label.clone())
    }
}

pub struct ChatPanel {
    pub sides: [Side; 2],
    pub ab: bool,
    pub system: String,
    pub sampler: SamplerConfig,
    pub max_new_tokens: usize,
    pub input: String,
    /// Draft model of speculative decoding (`None`: decode without one).
    pub draft: Option<PathBuf>,
    /// Tokens the draft proposes per step.
    pub draft_tokens: usize,
    /// The draft stops proposing below this probability.
    pub draft_p_min: f32,
}

impl Default for ChatPanel {
    fn default() -> Self {
        Self {
            sides: [Side::default(), Side::default()],
            ab: false,
            system: String::new(),
            sampler: SamplerConfig::default(),
            max_new_tokens: 256,
            input: String::new(),
            draft: None,
            draft_tokens: quant_engine::infer::DEFAULT_DRAFT_TOKENS,
            draft_p_min: quant_engine::infer::DEFAULT_DRAFT_P_MIN,
        }
    }
}

impl ChatPanel {
    /// Every active side's conversation as text.
    pub fn transcript(&self, shared: &Shared) -> String {
        (0..self.active())
            .map(|i| transcript_text(&self.sides[i], &self.sides[i].label(shared)))
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    pub fn on_dialog(&mut self, shared: &mut Shared, p: &Picked) {
        if let Picked::DraftModel(path) = p {
            self.draft = Some(path.clone());
            self.options_changed(shared);
        }
        if let Picked::SaveTranscript(path) = p {
            match std::fs::write(path, self.transcript(shared)) {
                Ok(()) => shared
                    .notes
                    .info("Conversation saved", path.display().to_string()),
                Err(e) => shared.notes.error(
                    "Could not save the conversation",
                    format!("{}: {e}", path.display()),
                ),
            }
        }
    }

    /// Whether a reply is being written.
    pub fn writing(&self) -> bool {
        self.sides.iter().any(|s| s.writing)
    }

    /// The options of a reply computed on `backend` (in its fastest arithmetic).
    fn options(&self, backend: quant_engine::backend::Backend) -> GenerateOptions {
        GenerateOptions {
            numerics: quant_engine::infer::Numerics::fastest(backend),
            max_new_tokens: self.max_new_tokens,
            sampler: self.sampler.clone(),
            draft: self.draft.clone(),
            draft_tokens: self.draft_tokens,
            draft_p_min: self.draft_p_min,
            ..GenerateOptions::default()
        }
    }

    /// Every running session takes the current settings from its next reply on.
    fn options_changed(&self, shared: &mut Shared) {
        let options = self.options(shared.settings.backend);
        for s in &self.sides {
            if let Some((job, _, _)) = &s.session {
                shared.send(Command::ChatOptions {
                    job: *job,
                    options: options.clone(),
                });
            }
        }
    }

    /// The draft model's name: a variant's label, else the file name.
    fn draft_label(&self, shared: &Shared) -> String {
        let Some(p) = &self.draft else {
            return "none".into();
        };
        shared
            .variants
            .iter()
            .find(|v| &v.path == p)
            .map(|v| v.label.clone())
            .or_else(|| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| p.display().to_string())
    }

    fn active(&self) -> usize {
        if self.ab {
            2
        } else {
            1
        }
    }

    /// Send `text` to the active side(s), starting sessions as needed.
    pub fn send(&mut self, shared: &mut Shared, text: String) {
        if text.trim().is_empty() {
            return;
        }
        let options = self.options(shared.settings.backend);
        for i in 0..self.active() {
            let side = &mut self.sides[i];
            let Some(model) = side
                .model
                .clone()
                .or_else(|| shared.source_path().map(PathBuf::from))
            else {
                shared.notes.error("Open a model first", "");
                return;
            };
            side.model = Some(model.clone());
            let fresh = match &side.session {
                Some((_, m, sys)) => m != &model || sys != &self.system,
                None => true,
            };
            if fresh {
                if let Some((job, _, _)) = side.session.take() {
                    shared.send(Command::Cancel(job));
                }
                side.transcript.clear();
                side.context_used = 0;
                let system = (!self.system.trim().is_empty()).then(|| self.system.clone());
                let cmd = Command::Chat {
                    model: model.clone(),
                    system,
                    options: options.clone(),
                    context_tokens: None,
                };
                match shared.submit(Owner::Chat, cmd) {
                    Some(job) => side.session = Some((job, model, self.system.clone())),
                    None => return,
                }
            }
            if let Some((job, _, _)) = &side.session {
                shared.send(Command::ChatSend {
                    job: *job,
                    text: text.clone(),
                });
                side.transcript.push(Message {
                    user: true,
                    text: text.clone(),
                });
                side.transcript.push(Message {
                    user: false,
                    text: String::new(),
                });
                side.writing = true;
                side.generated = 0;
            }
        }
    }

    pub fn on_event(&mut self, shared: &mut Shared, ev: Event) {
        let job = ev.job();
        let Some(side) = self
            .sides
            .iter_mut()
            .find(|s| s.session.as_ref().is_some_and(|(j, _, _)| *j == job))
        else {
            return;
        };
        match ev {
            Event::Token { text, .. } => {
                if let Some(m) = side.transcript.last_mut().filter(|m| !m.user) {
                    m.text.push_str(&text);
                }
                side.generated += 1;
            }
            Event::TurnFinished { text, stats, .. } => {
                if let Some(m) = side.transcript.last_mut().filter(|m| !m.user) {
                    m.text = text;
                }
                side.writing = false;
                side.tokens_per_sec = Some((stats.decode_tokens_per_sec(), stats.numerics));
                side.acceptance_rate = stats.acceptance_rate();
                side.context_used += stats.prompt_tokens + stats.generated_tokens + 1;
            }
            Event::Failed { error, .. } => {
                side.writing = false;
                side.session = None;
                shared.notes.error("The chat stopped", error);
            }
            Event::Cancelled { .. } | Event::Finished { .. } => {
                side.writing = false;
                side.session = None;
            }
            _ => {}
        }
    }

    pub fn ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        if shared.source.is_none() {
            ui.heading("Open a model first");
            return;
        }
        egui::Panel::right("chat-settings")
            .default_size(280.0)
            .show(ui, |ui| self.settings_ui(ui, shared));
        egui::Panel::bottom("chat-input").show(ui, |ui| {
            ui.add_space(4.0);
            ui.horizontal(|ui| {
                let edit = ui.add(
                    egui::TextEdit::multiline(&mut self.input)
                        .desired_rows(2)
                        .desired_width(ui.available_width() - 140.0)
                        .hint_text("Message (Enter to send, Shift+Enter for a new line)"),
                );
                let enter = edit.has_focus()
                    && ui.input(|i| i.key_pressed(egui::Key::Enter) && !i.modifiers.shift);
                let writing = self.writing();
                if writing {
                    if ui.button("⏹ Stop").clicked() {
                        for s in &self.sides {
                            if let (true, Some((job, _, _))) = (s.writing, &s.session) {
                                shared.send(Command::ChatStop { job: *job });
                            }
                        }
                    }
                } else if ui.button("Send").clicked() || enter {
                    let text = std::mem::take(&mut self.input);
                    self.send(shared, text.trim_end_matches('\n').to_string());
                }
            });
            ui.add_space(4.0);
        });
        let mut regenerate = [false; 2];
        egui::CentralPanel::default().show(ui, |ui| {
            let n = self.active();
            ui.columns(n, |cols| {
                for (i, col) in cols.iter_mut().enumerate() {
                    regenerate[i] =
                        transcript(col, &self.sides[i], i, &self.sides[i].label(shared));
                }
            });
        });
        for (i, side) in self.sides.iter_mut().enumerate() {
            if !regenerate[i] {
                continue;
            }
            if let (Some((job, _, _)), Some(last)) = (&side.session, side.transcript.last_mut()) {
                shared.send(Command::ChatRegenerate { job: *job });
                last.text.clear();
                side.writing = true;
                side.generated = 0;
            }
        }
    }

    /// Start both sides' conversations afresh (their system prompts stay).
    fn new_conversation(&mut self, shared: &mut Shared) {
        for s in &mut self.sides {
            if let Some((job, _, _)) = &s.session {
                shared.send(Command::ChatReset { job: *job });
            }
            s.transcript.clear();
            s.context_used = 0;
            s.tokens_per_sec = None;
            s.acceptance_rate = None;
        }
    }

    /// A side with no model chosen gets one: A the source, B the newest variant made from it (or the
    /// source), so the tab never opens on an empty choice.
    fn choose_defaults(&mut self, shared: &Shared) {
        let source = shared.source_path().map(PathBuf::from);
        let newest = shared
            .variants
            .iter()
            .rev()
            .find(|v| !v.is_source)
            .map(|v| v.path.clone());
        if self.sides[0].model.is_none() {
            self.sides[0].model = source.clone();
        }
        if self.sides[1].model.is_none() {
            self.sides[1].model = newest.or(source);
        }
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui, shared: &mut Shared) {
        ui.heading("Chat");
        self.choose_defaults(shared);
        let was_ab = self.ab;
        ui.checkbox(&mut self.ab, "A/B: two variants side by side");
        if self.ab != was_ab {
            // Both sides start from the same (empty) history, or the comparison is not fair.
            self.new_conversation(shared);
        }
        for i in 0..self.active() {
            let name = if self.ab { ["A", "B"][i] } else { "Model" };
            let current = self.sides[i].label(shared);
            egui::ComboBox::from_label(name)
                .selected_text(current)
                .show_ui(ui, |ui| {
                    for v in &shared.variants {
                        let on = self.sides[i].model.as_ref() == Some(&v.path);
                        if ui.selectable_label(on, &v.label).clicked() {
                            self.sides[i].model = Some(v.path.clone());
                        }
                    }
                });
        }
        let mut draft_changed = false;
        egui::ComboBox::from_label("Draft model")
            .selected_text(self.draft_label(shared))
            .show_ui(ui, |ui| {
                if ui.selectable_label(self.draft.is_none(), "none").clicked() {
                    self.draft = None;
                    draft_changed = true;
                }
                for v in &shared.variants {
                    let on = self.draft.as_ref() == Some(&v.path);
                    if ui.selectable_label(on, &v.label).clicked() {
                        self.draft = Some(v.path.clone());
                        draft_changed = true;
                    }
                }
                if ui.selectable_label(false, "File…").clicked() {
                    shared.dialogs.open(super::dialogs::PickKind::DraftModel);
                }
            })
            .response
            .on_hover_text(
                "Speculative decoding: a smaller model or a low-bit quant with the same tokenizer \
                 proposes tokens, the model checks them in one pass (greedy replies are unchanged)",
            );
        if self.draft.is_some() {
            let label = ui.label("draft tokens");
            draft_changed |= ui
                .add(egui::DragValue::new(&mut self.draft_tokens).range(1..=16))
                .labelled_by(label.id)
                .changed();
            let label = ui.label("min. draft probability");
            draft_changed |= ui
                .add(
                    egui::DragValue::new(&mut self.draft_p_min)
                        .range(0.0..=1.0)
                        .speed(0.01),
                )
                .labelled_by(label.id)
                .on_hover_text(
                    "The draft stops proposing after a token it is less sure of than this (0: always the \
                     full number of draft tokens)",
                )
                .changed();
        }
        if draft_changed {
            self.options_changed(shared);
        }
        ui.add_space(6.0);
        let label = ui.label("System prompt");
        ui.add(egui::TextEdit::multiline(&mut self.system).desired_rows(3))
            .labelled_by(label.id);
        ui.add_space(6.0);
        ui.label("Sampling");
        let mut changed = false;
        egui::Grid::new("sampling").num_columns(2).show(ui, |ui| {
            let label = ui.label("temperature");
            changed |= ui
                .add(egui::Slider::new(&mut self.sampler.temperature, 0.0..=2.0))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
            let label = ui.label("top-p");
            changed |= ui
                .add(egui::Slider::new(&mut self.sampler.top_p, 0.0..=1.0))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
            let label = ui.label("top-k");
            changed |= ui
                .add(egui::Slider::new(&mut self.sampler.top_k, 0..=200))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
            let label = ui.label("min-p");
            changed |= ui
                .add(egui::Slider::new(&mut self.sampler.min_p, 0.0..=1.0))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
            let label = ui.label("repeat penalty");
            changed |= ui
                .add(egui::Slider::new(
                    &mut self.sampler.repetition_penalty,
                    1.0..=2.0,
                ))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
            let label = ui.label("max tokens");
            changed |= ui
                .add(egui::DragValue::new(&mut self.max_new_tokens).range(1..=8192))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
            let label = ui.label("seed");
            changed |= ui
                .add(egui::DragValue::new(&mut self.sampler.seed))
                .labelled_by(label.id)
                .changed();
            ui.end_row();
        });
        if changed {
            self.options_changed(shared);
        }
        ui.add_space(6.0);
        ui.horizontal(|ui| {
            if ui.button("New conversation").clicked() {
                self.new_conversation(shared);
            }
            if ui
                .button("Copy transcript")
                .on_hover_text("The conversation as text, to the clipboard")
                .clicked()
            {
                ui.ctx().copy_text(self.transcript(shared));
            }
            if ui
                .button("Save…")
                .on_hover_text("The conversation as a text file")
                .clicked()
            {
                shared
                    .dialogs
                    .open(super::dialogs::PickKind::SaveTranscript);
            }
        });
        if let Some(src) = &shared.source {
            let max = quant_engine::jobs::DEFAULT_CHAT_CONTEXT.min(src.summary.context.max(1));
            for i in 0..self.active() {
                ui.weak(format!(
                    "{}context: ≈ {} of {max} tokens",
                    if self.ab { ["A ", "B "][i] } else { "" },
                    self.sides[i].context_used
                ));
            }
        }
    }
}

/// A side's conversation as plain text (`you:` / `model:` turns).
fn transcript_text(side: &Side, label: &str) -> String {
    let mut out = format!("# {label}\n");
    for m in &side.transcript {
        let who = if m.user { "you" } else { "model" };
        out.push_str(&format!("\n{who}:\n{}\n", m.text));
    }
    out
}

/// A message: plain left-aligned text, with ``` fenced code blocks kept exactly as written, in monospace.
fn message_body(ui: &mut egui::Ui, text: &str) {
    ui.with_layout(egui::Layout::top_down(egui::Align::LEFT), |ui| {
        for (k, part) in text.split("```").enumerate() {
            if k % 2 == 1 {
                // A fence's first line names the language; the code follows.
                let code = part.split_once('\n').map_or(part, |(_, c)| c);
                egui::Frame::new()
                    .fill(ui.visuals().code_bg_color)
                    .inner_margin(6.0)
                    .corner_radius(4.0)
                    .show(ui, |ui| {
                        ui.add(
                            egui::Label::new(
                                egui::RichText::new(code.trim_end_matches('\n')).monospace(),
                            )
                            .extend(),
                        );
                    });
            } else if !part.trim().is_empty() {
                ui.add(egui::Label::new(part.trim_matches('\n')).wrap());
            }
        }
    });
}

/// One side's conversation; `true` when its last reply's Regenerate was clicked.
fn transcript(ui: &mut egui::Ui, side: &Side, i: usize, label: &str) -> bool {
    let mut regenerate = false;
    let last = side.transcript.len().saturating_sub(1);
    ui.horizontal(|ui| {
        ui.strong(label);
        if let Some((t, numerics)) = side.tokens_per_sec {
            ui.weak(format!("{t:.1} tokens/s"));
            ui.weak(numerics.name()).on_hover_text(match numerics {
                quant_engine::infer::Numerics::LlamaCpu => {
                    "Measured in llama.cpp's CPU arithmetic: activations quantized to 8 bits, packed weights \
                     dotted in integers (the fast path)"
                }
                quant_engine::infer::Numerics::Exact => "Measured with f32 activations throughout",
            });
        }
        if let Some(a) = side.acceptance_rate {
            ui.weak(format!("draft accepted {:.0}%", 100.0 * a))
                .on_hover_text("Drafted tokens the model accepted in the last reply");
        }
        if side.writing {
            ui.spinner();
        }
    });
    egui::ScrollArea::vertical()
        .id_salt(("transcript", i))
        .stick_to_bottom(true)
        .auto_shrink([false, false])
        .show(ui, |ui| {
            for (k, m) in side.transcript.iter().enumerate() {
                let (who, fill) = if m.user {
                    ("you", ui.visuals().faint_bg_color)
                } else {
                    ("model", ui.visuals().extreme_bg_color)
                };
                egui::Frame::new()
                    .fill(fill)
                    .inner_margin(8.0)
                    .corner_radius(6.0)
                    .show(ui, |ui| {
                        ui.set_min_width(ui.available_width());
                        ui.horizontal(|ui| {
                            ui.weak(who);
                            if !m.user
                                && !m.text.is_empty()
                                && ui
                                    .small_button("Copy")
                                    .on_hover_text("This answer, to the clipboard")
                                    .clicked()
                            {
                                ui.ctx().copy_text(m.text.clone());
                            }
                            if !m.user
                                && k == last
                                && !side.writing
                                && side.session.is_some()
                                && ui
                                    .small_button("Regenerate")
                                    .on_hover_text(
                                        "A new answer to the same message (sampled answers draw again; \
                                         at temperature 0 it is the same answer)",
                                    )
                                    .clicked()
                            {
                                regenerate = true;
                            }
                        });
                        message_body(ui, &m.text);
                    });
                ui.add_space(4.0);
            }
        });
    regenerate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_text_has_every_turn() {
        let side = Side {
            transcript: vec![
                Message {
                    user: true,
                    text: "hi".into(),
                },
                Message {
                    user: false,
                    text: "```rust\nfn main() {}\n```".into(),
                },
            ],
            ..Side::default()
        };
        assert_eq!(
            transcript_text(&side, "Q8_0"),
            "# Q8_0\n\nyou:\nhi\n\nmodel:\n```rust\nfn main() {}\n```\n"
        );
    }
}
