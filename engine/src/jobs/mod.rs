//! The engine thread: the GUI and the CLI send [`Command`]s and read [`Event`]s, both over bounded
//! channels, and never call the numerical code themselves.
//!
//! ```text
//!  front end ── Command ──▶ "quant-engine" thread ──▶ one "quant-job-<id>" thread per job (rayon inside)
//!      ▲                                                   │
//!      └───────────────────── Event (bounded) ◀────────────┘
//! ```
//!
//! * Every job gets a [`JobId`]: [`EngineHandle::submit`] returns it up front; a command sent straight
//!   on [`EngineHandle::commands`] gets the next id, announced by [`Event::Started`].
//! * Per job, events arrive in order: `Started`, then `Progress` / `EvalChunk` / `Token` /
//!   `TurnFinished` / `LayerDone`, then exactly one of `Finished`, `Failed`, `Cancelled`.
//! * [`Command::Cancel`] sets the job's flag, which the job checks per chunk (evaluation), per token
//!   (generation), per tensor (conversion) and per 64 KiB (the demo model's download); loading a model
//!   is not interruptible.
//! * Loaded models are cached by path (a few at a time), so chat turns and repeated evaluations do not
//!   reload them.
//! * Event channels are bounded: a front end that stops reading stalls the jobs rather than memory.

mod cache;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, select, Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::eval::{ChunkProgress, EvalOptions, KldReport, PerplexityReport};
use crate::infer::{GenerateOptions, GenerateStats};
use crate::model::summary::ModelSummary;
pub use crate::writers::hf::OutDtype;
use crate::{Error, Result};

use cache::ModelCache;
use worker::{ChatMsg, JobCtx};

/// Identifies a job (unique within one engine).
pub type JobId = u64;

/// Room in the command channel.
pub const COMMAND_CAPACITY: usize = 64;
/// Room in the event channel: enough for a frame's worth of tokens and chunks.
pub const EVENT_CAPACITY: usize = 1024;
/// Models kept loaded (a base and a variant for KL-divergence).
pub const MODEL_CACHE_CAPACITY: usize = 2;
/// Context of a chat session when the command does not say (capped by the model's trained length).
pub const DEFAULT_CHAT_CONTEXT: usize = 4096;

/// The [`Event::Progress`] stage a chat session reports (1 of 1) once its model is loaded and its
/// context checked: turns can be sent.
pub const STAGE_CHAT_READY: &str = "chat ready";

/// The [`Event::Progress`] stage of a conversion; its units are bytes of weights written.
pub const STAGE_CONVERT: &str = "writing weights";

/// Where the evaluation text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalText {
    /// A UTF-8 text file, read whole.
    File(PathBuf),
    /// The text itself.
    Inline(String),
    /// The bundled held-out text ([`crate::eval::DEFAULT_EVAL_TEXT`]), which no bundled calibration uses.
    Bundled,
}

pub use crate::recipes::{ImatrixSource, Recipe};

/// What the front ends ask of the engine.
#[derive(Clone, Debug)]
pub enum Command {
    /// Open a model and summarise it → [`JobOutput::Summary`].
    Inspect { path: PathBuf },
    /// Perplexity of `model` on the text, or with `base` the KL-divergence of `model` from `base`
    /// (the base's tokenizer is used) → [`JobOutput::Perplexity`] / [`JobOutput::Kld`].
    Evaluate {
        model: PathBuf,
        base: Option<PathBuf>,
        text: EvalText,
        options: EvalOptions,
    },
    /// Generate from a prompt, streaming [`Event::Token`]s → [`JobOutput::Generated`]. With
    /// `apply_chat_template` the prompt is a user message rendered by the model's chat template.
    Generate {
        model: PathBuf,
        prompt: String,
        options: GenerateOptions,
        apply_chat_template: bool,
    },
    /// Start a chat session: a job that keeps the model and the conversation (and its KV cache) until it
    /// is cancelled or the engine shuts down. Turns are sent with [`Command::ChatSend`]; each streams
    /// [`Event::Token`]s and ends with [`Event::TurnFinished`]. `context_tokens` defaults to
    /// [`DEFAULT_CHAT_CONTEXT`] capped by the model's trained context.
    Chat {
        model: PathBuf,
        system: Option<String>,
        options: GenerateOptions,
        context_tokens: Option<usize>,
    },
    /// A user message for chat session `job` (queued if a reply is being written).
    ChatSend { job: JobId, text: String },
    /// Stop the reply being written in chat session `job`; the session stays.
    ChatStop { job: JobId },
    /// Forget chat session `job`'s conversation (its system prompt stays).
    ChatReset { job: JobId },
    /// Replace the last reply of chat session `job` with a new one (streamed like a turn; sampled replies
    /// draw with the next seed). Ignored when there is no reply yet.
    ChatRegenerate { job: JobId },
    /// Sampling options for the next turns of chat session `job`.
    ChatOptions {
        job: JobId,
        options: GenerateOptions,
    },
    /// Write `model` as a Hugging Face folder in `dtype` → [`JobOutput::Converted`].
    ///
    /// Every command that writes checks its output before any work starts ([`crate::output`]): never one
    /// of its inputs, an existing output replaced only with `overwrite`, writable, room for it.
    Convert {
        model: PathBuf,
        out: PathBuf,
        dtype: OutDtype,
        overwrite: bool,
    },
    /// Quantize `model` with `recipe` (a GGUF mix, a GPTQ folder, …) into `out`; an [`Event::LayerDone`]
    /// per quantized tensor, then [`JobOutput::Quantized`] (GGUF), [`JobOutput::QuantizedGptq`] or
    /// [`JobOutput::QuantizedPacked`].
    Quantize {
        model: PathBuf,
        out: PathBuf,
        recipe: Recipe,
        overwrite: bool,
    },
    /// Compute `model`'s importance matrix on a calibration text and write it (llama.cpp's GGUF format, or
    /// the legacy `.dat` with `legacy_dat`) → [`JobOutput::Imatrix`].
    Imatrix {
        model: PathBuf,
        source: crate::calib::CalibSource,
        options: crate::imatrix::ImatrixOptions,
        out: PathBuf,
        legacy_dat: bool,
        overwrite: bool,
    },
    /// Measure prompt-processing and decoding speed of `model` → [`JobOutput::Bench`].
    Bench {
        model: PathBuf,
        options: crate::bench::BenchOptions,
    },
    /// Fetch the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) into `dest` (a folder; `None`: the user
    /// cache, [`crate::demo::demo_cache_dir`]); a copy already there with the right sha256 is reused.
    /// [`Event::Progress`] in stages [`crate::demo::STAGE_VERIFY`], [`crate::demo::STAGE_DOWNLOAD`] and
    /// [`crate::demo::STAGE_EXTRACT`] (bytes), then (once) [`crate::demo::STAGE_REFERENCE`] while its F16
    /// reference is written, then [`JobOutput::DemoModel`].
    FetchDemo { dest: Option<PathBuf> },
    /// Cancel a job (a chat session ends). Unknown or finished jobs are ignored.
    Cancel(JobId),
    /// Cancel every job and stop the engine thread.
    Shutdown,
    /// A job-starting command with the id [`EngineHandle::submit`] chose for it.
    Tagged { job: JobId, command: Box<Command> },
}

/// What kind of job an id names.
impl Command {
    /// Make every computation this command starts run on `backend` (the front ends' one setting).
    pub fn set_backend(&mut self, backend: crate::backend::Backend) {
        match self {
            Command::Evaluate { options, .. } => options.backend = backend,
            Command::Generate { options, .. }
            | Command::Chat { options, .. }
            | Command::ChatOptions { options, .. } => options.backend = backend,
            Command::Quantize { recipe, .. } => recipe.set_backend(backend),
            Command::Imatrix { options, .. } => options.backend = backend,
            Command::Bench { options, .. } => options.backend = backend,
            Command::Tagged { command, .. } => command.set_backend(backend),
            Command::Inspect { .. }
            | Command::ChatSend { .. }
            | Command::ChatStop { .. }
            | Command::ChatReset { .. }
            | Command::ChatRegenerate { .. }
            | Command::Convert { .. }
            | Command::FetchDemo { .. }
            | Command::Cancel(_)
            | Command::Shutdown => {}
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Inspect,
    Evaluate,
    Generate,
    Chat,
    Convert,
    Bench,
    Quantize,
    Imatrix,
    FetchDemo,
}

/// Quality of one quantized tensor (sent by the quantizers as [`Event::LayerDone`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerMetrics {
    /// Decoder layer index (`None` for embeddings, the output head, …).
    pub layer: Option<usize>,
    /// Hugging Face tensor name.
    pub tensor: String,
    /// The codec's display name (`"Q4_K"`, `"GPTQ int4 g128"`, …).
    pub codec: String,
    pub bits_per_weight: f64,
    /// ‖W − Ŵ‖ / ‖W‖.
    pub rel_rms_error: f64,
    /// The same weighted by the importance of each input column, when an importance matrix was used.
    pub weighted_rel_rms_error: Option<f64>,
    /// GPTQ: the output error `½ Σ (W − Ŵ) H (W − Ŵ)ᵀ` on the calibration inputs, and the same for
    /// round-to-nearest on the same grid.
    pub gptq_loss: Option<f64>,
    pub rtn_loss: Option<f64>,
    /// max |W − Ŵ|.
    pub max_error: f64,
}

/// What a finished job produced.
#[derive(Clone, Debug)]
pub enum JobOutput {
    Summary(Box<ModelSummary>),
    Perplexity(Box<PerplexityReport>),
    Kld(Box<KldReport>),
    Generated {
        text: String,
        stats: GenerateStats,
    },
    Converted {
        path: PathBuf,
    },
    Bench(crate::bench::BenchReport),
    Quantized(Box<crate::quantize::QuantizeReport>),
    QuantizedGptq(Box<crate::quantize_gptq::GptqReport>),
    /// A calibration-free packed folder (NF4/FP4).
    QuantizedPacked(Box<crate::quantize_packed::PackedReport>),
    /// An importance matrix was written to `path`.
    Imatrix {
        path: PathBuf,
        entries: usize,
        chunks: u32,
        tokens_per_chunk: u32,
    },
    /// The demo model is ready: `shipped` is the downloaded file (Q4_1/Q8_0), `path` its F16 dequantization,
    /// the reference the demo quantizes and compares against.
    DemoModel {
        path: PathBuf,
        shipped: PathBuf,
    },
    /// A chat session that was ended by [`Command::Shutdown`].
    ChatEnded,
}

/// What the engine tells the front ends.
#[derive(Clone, Debug)]
pub enum Event {
    Started {
        job: JobId,
        kind: JobKind,
    },
    /// A stage of work (`"loading model"`, `"converting"`); `done` of `total` units.
    Progress {
        job: JobId,
        stage: String,
        done: u64,
        total: u64,
        eta_secs: Option<f64>,
    },
    /// An evaluation chunk finished.
    EvalChunk {
        job: JobId,
        progress: ChunkProgress,
    },
    /// Generated text (a piece of whole UTF-8 characters).
    Token {
        job: JobId,
        text: String,
    },
    /// A chat reply is complete.
    TurnFinished {
        job: JobId,
        text: String,
        stats: GenerateStats,
    },
    /// A tensor was quantized.
    LayerDone {
        job: JobId,
        metrics: LayerMetrics,
    },
    Finished {
        job: JobId,
        output: JobOutput,
    },
    /// Something the user should know about a job that goes on (a flattering evaluation text, a fallback
    /// taken); front ends show it as a warning.
    Notice {
        job: JobId,
        message: String,
    },
    /// The job failed; `error` is one line that says what and where.
    Failed {
        job: JobId,
        error: String,
    },
    Cancelled {
        job: JobId,
    },
}

impl JobOutput {
    /// For a quantize job's output: its size in bytes and bits per parameter over the whole model
    /// (`params` parameters).
    pub fn quantized_size(&self, params: u64) -> Option<(u64, f64)> {
        let size = match self {
            JobOutput::Quantized(r) => return Some((r.file_size_bytes, r.bits_per_weight)),
            JobOutput::QuantizedGptq(r) => r.folder_size_bytes,
            JobOutput::QuantizedPacked(r) => r.folder_size_bytes,
            _ => return None,
        };
        Some((size, size as f64 * 8.0 / params.max(1) as f64))
    }
}

impl Event {
    /// The job this event is about.
    pub fn job(&self) -> JobId {
        match self {
            Event::Started { job, .. }
            | Event::Progress { job, .. }
            | Event::EvalChunk { job, .. }
            | Event::Token { job, .. }
            | Event::TurnFinished { job, .. }
            | Event::LayerDone { job, .. }
            | Event::Finished { job, .. }
            | Event::Notice { job, .. }
            | Event::Failed { job, .. }
            | Event::Cancelled { job } => *job,
        }
    }

    /// Whether this is the job's last event.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }
}

/// Called after every event, e.g. `egui::Context::request_repaint`.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Where the engine finds the current waker (it may be set after spawning).
#[derive(Clone, Default)]
pub(crate) struct WakerSlot(Arc<Mutex<Option<Waker>>>);

impl WakerSlot {
    fn set(&self, w: Option<Waker>) {
        match self.0.lock() {
            Ok(mut g) => *g = w,
            Err(p) => *p.into_inner() = w,
        }
    }

    pub(crate) fn wake(&self) {
        let w = match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if let Some(w) = w {
            w();
        }
    }
}

/// The engine thread is gone (it was shut down or panicked).
#[derive(Debug, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineStopped;

/// The front end's side of the engine.
pub struct EngineHandle {
    /// Commands to the engine thread.
    pub commands: Sender<Command>,
    /// Events from the engine and its jobs.
    pub events: Receiver<Event>,
    waker: WakerSlot,
    next_id: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// The engine (a namespace for [`Engine::spawn`]).
pub struct Engine;

impl Engine {
    /// Start the engine thread.
    pub fn spawn() -> EngineHandle {
        EngineHandle::spawn()
    }
}

impl EngineHandle {
    /// Start the engine thread ("quant-engine").
    ///
    /// # Panics
    /// If the OS cannot start a thread.
    pub fn spawn() -> Self {
        crate::bounded::return_large_frees_to_os();
        let (cmd_tx, cmd_rx) = bounded(COMMAND_CAPACITY);
        let (ev_tx, ev_rx) = bounded(EVENT_CAPACITY);
        let waker = WakerSlot::default();
        let next_id = Arc::new(AtomicU64::new(1));
        let engine = EngineThread {
            commands: cmd_rx,
            events: ev_tx,
            waker: waker.clone(),
            next_id: Arc::clone(&next_id),
            jobs: HashMap::new(),
            cache: Arc::new(ModelCache::new(MODEL_CACHE_CAPACITY)),
        };
        #[allow(clippy::expect_used)]
        let thread = std::thread::Builder::new()
            .name("quant-engine".into())
            .spawn(move || engine.run())
            .expect("cannot start the engine thread");
        Self {
            commands: cmd_tx,
            events: ev_rx,
            waker,
            next_id,
            thread: Some(thread),
        }
    }

    /// A handle with no engine thread behind it: what the front end sends arrives on the returned
    /// receiver, and what is sent on the returned sender arrives as events. For front-end tests that
    /// check the commands a click sends and replay events without running jobs.
    pub fn detached() -> (Self, Receiver<Command>, Sender<Event>) {
        let (cmd_tx, cmd_rx) = bounded(COMMAND_CAPACITY);
        let (ev_tx, ev_rx) = bounded(EVENT_CAPACITY);
        let handle = Self {
            commands: cmd_tx,
            events: ev_rx,
            waker: WakerSlot::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            thread: None,
        };
        (handle, cmd_rx, ev_tx)
    }

    /// Call `waker` after every event (replacing any earlier one).
    pub fn set_waker(&self, waker: Box<dyn Fn() + Send + Sync>) {
        self.waker.set(Some(Arc::from(waker)));
    }

    /// Send `command`, waiting if the command channel is full. For a command that starts a job, returns
    /// the job's id (its events carry it); otherwise `None`.
    pub fn submit(&self, command: Command) -> Result<Option<JobId>, EngineStopped> {
        let (command, id) = self.tag(command);
        self.commands.send(command).map_err(|_| EngineStopped)?;
        Ok(id)
    }

    /// As [`submit`](Self::submit) without waiting: `Err` if the channel is full or the engine gone.
    pub fn try_submit(&self, command: Command) -> Result<Option<JobId>, EngineStopped> {
        let (command, id) = self.tag(command);
        self.commands.try_send(command).map_err(|_| EngineStopped)?;
        Ok(id)
    }

    fn tag(&self, command: Command) -> (Command, Option<JobId>) {
        if starts_job(&command) {
            let job = self.next_id.fetch_add(1, Ordering::Relaxed);
            (
                Command::Tagged {
                    job,
                    command: Box::new(command),
                },
                Some(job),
            )
        } else {
            (command, None)
        }
    }

    /// Cancel every job, stop the engine thread and wait for it (not for the job threads, which stop at
    /// their next cancellation check). Events not yet read are dropped.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Nobody reads events any more: dropping the receiver unblocks any thread waiting to send one
        // (the engine thread included), and makes the jobs cancel themselves.
        self.events = crossbeam_channel::never();
        // If the command channel is full the engine is alive and sees the Shutdown soon; if the engine
        // is gone, there is nothing to stop.
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.commands.try_send(Command::Shutdown);
        }
    }
}

/// Use `n` threads for the numerical work (the process-wide rayon pool). Call before any work starts;
/// once the pool exists it cannot be resized.
pub fn configure_threads(n: usize) -> Result<()> {
    let max = max_threads();
    if n == 0 || n > max {
        return Err(Error::Invalid(format!(
            "--threads {n}: use 1..={max} (up to 4 per core; this machine has {})",
            cores()
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("quant-worker-{i}"))
        .build_global()
        .map_err(|e| Error::Invalid(format!("cannot set the thread count to {n}: {e}")))
}

/// Cores the OS lets this process use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Most threads [`configure_threads`] accepts: 4 per core.
pub fn max_threads() -> usize {
    4 * cores()
}

/// Threads the engine's parallel work uses.
pub fn thread_count() -> usize {
    rayon::current_num_threads()
}

fn starts_job(c: &Command) -> bool {
    job_kind(c).is_some()
}

fn job_kind(c: &Command) -> Option<JobKind> {
    Some(match c {
        Command::Inspect { .. } => JobKind::Inspect,
        Command::Evaluate { .. } => JobKind::Evaluate,
        Command::Generate { .. } => JobKind::Generate,
        Command::Chat { .. } => JobKind::Chat,
        Command::Convert { .. } => JobKind::Convert,
        Command::Bench { .. } => JobKind::Bench,
        Command::Quantize { .. } => JobKind::Quantize,
        Command::Imatrix { .. } => JobKind::Imatrix,
        Command::FetchDemo { .. } => JobKind::FetchDemo,
        _ => return None,
    })
}

/// What the engine thread knows of a running job.
struct JobEntry {
    cancel: Arc<AtomicBool>,
    chat: Option<ChatControl>,
}

/// The engine's side of a chat session.
struct ChatControl {
    turns: Sender<ChatMsg>,
    stop_turn: Arc<AtomicBool>,
}

struct EngineThread {
    commands: Receiver<Command>,
    events: Sender<Event>,
    waker: WakerSlot,
    next_id: Arc<AtomicU64>,
    jobs: HashMap<JobId, JobEntry>,
    cache: Arc<ModelCache>,
}

impl EngineThread {
    fn run(mut self) {
        let (done_tx, done_rx) = bounded::<JobId>(256);
        loop {
            select! {
                recv(self.commands) -> cmd => match cmd {
                    Ok(Command::Shutdown) | Err(_) => break,
                    Ok(cmd) => self.handle(cmd, &done_tx),
                },
                recv(done_rx) -> id => {
                    if let Ok(id) = id {
                        self.jobs.remove(&id);
                    }
                }
            }
        }
        for entry in self.jobs.values() {
            entry.cancel.store(true, Ordering::Relaxed);
            if let Some(chat) = &entry.chat {
                chat.stop_turn.store(true, Ordering::Relaxed);
            }
        }
        // Dropping the chat senders ends idle chat sessions.
        self.jobs.clear();
    }

    fn emit(&self, ev: Event) {
        if self.events.send(ev).is_ok() {
            self.waker.wake();
        }
    }

    fn handle(&mut self, cmd: Command, done_tx: &Sender<JobId>) {
        match cmd {
            Command::Tagged { job, command } => {
                if starts_job(&command) {
                    self.start(job, *command, done_tx);
                } else {
                    self.emit(Event::Failed {
                        job,
                        error: "only a command that starts a job can be tagged with a job id"
                            .into(),
                    });
                }
            }
            Command::Cancel(job) => {
                if let Some(e) = self.jobs.get_mut(&job) {
                    e.cancel.store(true, Ordering::Relaxed);
                    if let Some(chat) = e.chat.take() {
                        chat.stop_turn.store(true, Ordering::Relaxed);
                    }
                }
            }
            Command::ChatSend { job, text } => self.to_chat(job, ChatMsg::Send(text)),
            Command::ChatReset { job } => self.to_chat(job, ChatMsg::Reset),
            Command::ChatRegenerate { job } => self.to_chat(job, ChatMsg::Regenerate),
            Command::ChatOptions { job, options } => self.to_chat(job, ChatMsg::Options(options)),
            Command::ChatStop { job } => {
                if let Some(chat) = self.jobs.get(&job).and_then(|e| e.chat.as_ref()) {
                    chat.stop_turn.store(true, Ordering::Relaxed);
                }
            }
            Command::Shutdown => {}
            other => {
                let job = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.start(job, other, done_tx);
            }
        }
    }

    fn to_chat(&self, job: JobId, msg: ChatMsg) {
        let Some(chat) = self.jobs.get(&job).and_then(|e| e.chat.as_ref()) else {
            self.emit(Event::Failed {
                job,
                error: format!("job {job} is not a running chat session"),
            });
            return;
        };
        if matches!(msg, ChatMsg::Reset) {
            chat.stop_turn.store(true, Ordering::Relaxed);
        }
        if chat.turns.try_send(msg).is_err() {
            self.emit(Event::Failed {
                job,
                error: format!("chat session {job} is busy: too many messages are waiting"),
            });
        }
    }

    fn start(&mut self, job: JobId, cmd: Command, done_tx: &Sender<JobId>) {
        let Some(kind) = job_kind(&cmd) else {
            return;
        };
        self.emit(Event::Started { job, kind });
        let cancel = Arc::new(AtomicBool::new(false));
        let (chat, chat_turns) = if matches!(cmd, Command::Chat { .. }) {
            let ((turns, stop_turn), worker_ends) = worker::chat_channels();
            (Some(ChatControl { turns, stop_turn }), Some(worker_ends))
        } else {
            (None, None)
        };
        let ctx = JobCtx {
            job,
            cancel: Arc::clone(&cancel),
            events: self.events.clone(),
            waker: self.waker.clone(),
        };
        let cache = Arc::clone(&self.cache);
        let done = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("quant-job-{job}"))
            .spawn(move || {
                worker::run(&ctx, &cache, cmd, chat_turns);
                let _ = done.send(ctx.job);
            });
        match spawned {
            Ok(_) => {
                self.jobs.insert(job, JobEntry { cancel, chat });
            }
            Err(e) => self.emit(Event::Failed {
                job,
                error: format!("cannot start a thread for the job: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
