//! What each job does, on its own thread.

use crate::bench::BenchOptions;
use crate::calib::CalibSource;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::cache::{LoadedModel, ModelCache};
use super::{Command, EvalText, Event, ImatrixSource, JobId, JobOutput, WakerSlot};
use super::{DEFAULT_CHAT_CONTEXT, STAGE_CHAT_READY, STAGE_CONVERT};
use crate::eval::{kl_divergence, perplexity, ChunkProgress, EvalOptions};
use crate::imatrix::ImatrixOptions;
use crate::infer::{generate_with_draft, ChatSession, Draft, GenerateOptions, Model, StopReason};
use crate::model::summary::ModelSummary;
use crate::model::{ChatMessage, SourceModel, TextTokenizer};
use crate::output::OutputSpec;
use crate::writers::hf::{write_hf_folder, OutDtype};
use crate::{Error, Result};

/// Messages queued for a chat session.
#[derive(Debug)]
pub(crate) enum ChatMsg {
    Send(String),
    Regenerate,
    Reset,
    Options(GenerateOptions),
}

/// Turns waiting for a chat session.
const CHAT_QUEUE: usize = 16;
/// How often an idle chat session looks at its cancel flag.
const CHAT_POLL: Duration = Duration::from_millis(100);

/// The engine's ends of a chat session: where turns go, and the flag that stops the current reply.
pub(crate) type ChatEnds = (Sender<ChatMsg>, Arc<AtomicBool>);

/// The worker's ends of a chat session: the turns to answer, and the flag that stops the current reply.
pub(crate) type ChatTurns = (Receiver<ChatMsg>, Arc<AtomicBool>);

/// A chat session's channels: the engine's ends and the worker's.
pub(crate) fn chat_channels() -> (ChatEnds, ChatTurns) {
    let (tx, rx) = bounded(CHAT_QUEUE);
    let stop = Arc::new(AtomicBool::new(false));
    ((tx, Arc::clone(&stop)), (rx, stop))
}

/// A job's view of the engine: its id, its cancel flag, where its events go.
pub(crate) struct JobCtx {
    pub job: JobId,
    pub cancel: Arc<AtomicBool>,
    pub events: Sender<Event>,
    pub waker: WakerSlot,
}

impl JobCtx {
    /// Send an event (waiting while the channel is full) and wake the front end. If nobody listens any
    /// more, the job is cancelled.
    pub fn emit(&self, ev: Event) {
        if self.events.send(ev).is_ok() {
            self.waker.wake();
        } else {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<()> {
        if self.cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    fn progress(&self, stage: &str, done: u64, total: u64, eta_secs: Option<f64>) {
        self.emit(Event::Progress {
            job: self.job,
            stage: stage.to_owned(),
            done,
            total,
            eta_secs,
        });
    }
}

/// Runs `req` and sends its last event (`Finished`, `Failed` or `Cancelled`). A panic in the job is
/// reported as `Failed`, not propagated.
pub(crate) fn run(ctx: &JobCtx, cache: &ModelCache, cmd: Command, chat: Option<ChatTurns>) {
    let result = catch_unwind(AssertUnwindSafe(|| run_inner(ctx, cache, cmd, chat)));
    let job = ctx.job;
    let ev = match result {
        Ok(Ok(output)) => Event::Finished { job, output },
        Ok(Err(Error::Cancelled)) => Event::Cancelled { job },
        Ok(Err(e)) => Event::Failed {
            job,
            error: one_line(&e.to_string()),
        },
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Event::Failed {
                job,
                error: one_line(&format!("internal error (a bug, please report it): {what}")),
            }
        }
    };
    ctx.emit(ev);
}

/// Seconds left when `done` of `total` units took the time since `start` (none before the first unit).
fn eta(start: Instant, done: u64, total: u64) -> Option<f64> {
    (done > 0)
        .then(|| start.elapsed().as_secs_f64() / done as f64 * total.saturating_sub(done) as f64)
}

/// Newlines folded so an error is one line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" — ")
}

fn run_inner(
    ctx: &JobCtx,
    cache: &ModelCache,
    cmd: Command,
    chat_turns: Option<ChatTurns>,
) -> Result<JobOutput> {
    ctx.check()?;
    match cmd {
        Command::Inspect { path } => {
            let src = SourceModel::open(&path)?;
            let mut summary = ModelSummary::of(&src);
            // What each named mix would weigh (a plan, no tensor is read); mixes a model cannot take
            // (rows that are no whole blocks of any fallback) are left out.
            summary.gguf_mix_bytes = crate::recipes::gguf::GgufMix::all()
                .filter_map(|mix| {
                    let bytes = crate::quantize::gguf_tensor_bytes(&src, &mix).ok()?;
                    Some((mix.name().to_string(), bytes))
                })
                .collect();
            summary.auto_mix_bytes = crate::quantize_automix::reachable_bytes(
                &src,
                &crate::quantize_automix::AUTOMIX_TYPES,
            )
            .ok();
            Ok(JobOutput::Summary(Box::new(summary)))
        }
        Command::Evaluate {
            model,
            base,
            text,
            options,
        } => evaluate(ctx, cache, &model, base.as_deref(), text, &options),
        Command::Generate {
            model,
            prompt,
            options,
            apply_chat_template,
        } => generate_job(ctx, cache, &model, &prompt, &options, apply_chat_template),
        Command::Chat {
            model,
            system,
            options,
            context_tokens,
        } => {
            let (turns, stop_turn) = chat_turns.ok_or_else(|| {
                Error::Invalid("internal error: a chat job without its channels".into())
            })?;
            chat(
                ctx,
                cache,
                &model,
                system,
                options,
                context_tokens,
                &turns,
                &stop_turn,
            )
        }
        Command::Convert {
            model,
            out,
            dtype,
            overwrite,
        } => convert(
            ctx,
            &model,
            &OutputSpec::folder(out).overwrite(overwrite),
            dtype,
        ),
        Command::Bench { model, options } => bench(ctx, cache, &model, &options),
        Command::Quantize {
            model,
            out,
            recipe,
            overwrite,
        } => {
            let spec = match recipe.container() {
                crate::recipes::Container::GgufFile => OutputSpec::file(out),
                crate::recipes::Container::HfFolder => OutputSpec::folder(out),
            };
            let mut spec = spec.overwrite(overwrite).input(&model);
            for p in recipe.inputs() {
                spec = spec.input(p);
            }
            match recipe {
                crate::recipes::Recipe::Gguf(g) => quantize(ctx, cache, &model, &spec, g),
                crate::recipes::Recipe::Gptq(o) => quantize_gptq(ctx, &model, &spec, &o),
                crate::recipes::Recipe::Awq(o) => quantize_awq(ctx, &model, &spec, &o),
                crate::recipes::Recipe::Exl2(o) => quantize_exl2(ctx, &model, &spec, &o),
                crate::recipes::Recipe::Packed(p) => quantize_packed(ctx, &model, &spec, &p),
            }
        }
        Command::Imatrix {
            model,
            source,
            options,
            out,
            legacy_dat,
            overwrite,
        } => {
            let mut spec = OutputSpec::file(&out).overwrite(overwrite).input(&model);
            if let CalibSource::File { path, .. } = &source {
                spec = spec.input(path);
            }
            crate::output::preflight(&spec)?;
            let m = compute_imatrix(ctx, cache, &model, &source, &options)?;
            let path = crate::output::write_staged(spec, |tmp| {
                if legacy_dat {
                    m.write_dat(tmp)
                } else {
                    m.write_gguf(tmp)
                }
            })?;
            Ok(JobOutput::Imatrix {
                path,
                entries: m.entries.len(),
                chunks: m.chunk_count,
                tokens_per_chunk: m.chunk_size,
            })
        }
        Command::FetchDemo { dest } => fetch_demo(ctx, dest.as_deref()),
        other => Err(Error::Invalid(format!(
            "internal error: {other:?} is not a job"
        ))),
    }
}

fn load(ctx: &JobCtx, cache: &ModelCache, path: &Path) -> Result<Arc<LoadedModel>> {
    let stage = format!("loading {}", path.display());
    ctx.progress(&stage, 0, 1, None);
    let m = cache.get_or_load(path)?;
    ctx.progress(&stage, 1, 1, Some(0.0));
    ctx.check()?;
    Ok(m)
}

/// The model as `options` runs it: on its backend, in its arithmetic.
fn runner(model: &Model, options: &GenerateOptions) -> Model {
    let mut m = model.on_backend(options.backend);
    m.set_numerics(options.numerics);
    m
}

/// The draft model `options.draft` names (none when it names none), loaded through the model cache, on
/// `model`'s backend and numerics (or `options.draft_numerics`), checked against `model` and its
/// tokenizer `tok`.
fn load_draft(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Model,
    tok: &TextTokenizer,
    options: &GenerateOptions,
) -> Result<Option<Draft>> {
    let Some(path) = &options.draft else {
        return Ok(None);
    };
    crate::infer::validate_draft_tokens(options.draft_tokens)?;
    crate::infer::validate_draft_p_min(options.draft_p_min)?;
    let d = load(ctx, cache, path)?;
    let mut draft = d.model.on_backend(model.backend());
    draft.set_numerics(options.draft_numerics.unwrap_or(model.numerics()));
    Draft::new(model, tok, draft, &d.source.tokenizer)
        .map(Some)
        .map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("draft {}: {m}", path.display())),
            e => e,
        })
}

fn evaluate(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Path,
    base: Option<&Path>,
    text: EvalText,
    options: &EvalOptions,
) -> Result<JobOutput> {
    let (text, text_name) = read_text(text)?;
    let variant = load(ctx, cache, model)?;
    if let Some(d) = variant.source.calibration_dataset.as_deref() {
        if crate::eval::same_text(d, &text_name) {
            ctx.emit(Event::Notice {
                job: ctx.job,
                message: format!(
                    "{} was calibrated on {d}, the text it is now evaluated on: its numbers are flattering. \
                     Evaluate on held-out text (the bundled default is held out).",
                    model.file_name().map_or_else(|| model.display().to_string(), |n| n.to_string_lossy().into_owned())
                ),
            });
        }
    }
    variant
        .model
        .check_context(options.n_ctx, options.allow_long_context)?;
    // The cached models are shared: another arithmetic runs on a clone (weights stay shared).
    let with_numerics = |m: &crate::infer::Model| {
        let mut m = m.clone();
        m.set_numerics(options.numerics);
        m.set_backend(options.backend);
        m
    };
    let variant_model = with_numerics(&variant.model);
    let mut on_chunk = |p: &ChunkProgress| {
        ctx.emit(Event::EvalChunk {
            job: ctx.job,
            progress: *p,
        });
        !ctx.cancelled()
    };
    match base {
        None => {
            let r = perplexity(
                &variant_model,
                &variant.source.tokenizer,
                &text,
                options,
                &mut on_chunk,
            )?;
            Ok(JobOutput::Perplexity(Box::new(r)))
        }
        Some(base) => {
            let b = load(ctx, cache, base)?;
            b.model
                .check_context(options.n_ctx, options.allow_long_context)?;
            let r = kl_divergence(
                &with_numerics(&b.model),
                &variant_model,
                &b.source.tokenizer,
                &text,
                options,
                &mut on_chunk,
            )?;
            Ok(JobOutput::Kld(Box::new(r)))
        }
    }
}

/// The prompt's token ids: rendered as one user message by the chat template (as a chat session's
/// first turn is), or encoded as it is with BOS when the model wants one.
fn prompt_ids(tok: &TextTokenizer, prompt: &str, apply_chat_template: bool) -> Result<Vec<u32>> {
    if !apply_chat_template {
        return tok.encode(prompt, true);
    }
    let text = tok.render_chat(&[ChatMessage::new("user", prompt)], true)?;
    // The template writes BOS itself when the model wants one; add it only when it did not.
    let has_bos = tok
        .bos_token
        .as_deref()
        .is_some_and(|b| !b.is_empty() && text.starts_with(b));
    tok.encode(&text, !has_bos)
}

fn generate_job(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Path,
    prompt: &str,
    options: &GenerateOptions,
    apply_chat_template: bool,
) -> Result<JobOutput> {
    let m = load(ctx, cache, model)?;
    let model_on = runner(&m.model, options);
    let tok = &m.source.tokenizer;
    let ids = prompt_ids(tok, prompt, apply_chat_template)?;
    options.sampler.validate()?;
    // Room for the prompt and the reply, within the trained context (or past it, when allowed, by what
    // the reply asks for).
    let max_pos = m.model.config().max_position_embeddings.max(1);
    if ids.len() >= max_pos && !options.allow_long_context {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; the model's context is {max_pos} (max_position_embeddings): \
             shorten it, or --allow-long-context to go past it (quality degrades)",
            ids.len()
        )));
    }
    let wanted = ids.len().saturating_add(options.max_new_tokens);
    let capacity = if options.allow_long_context {
        wanted
    } else {
        wanted.min(max_pos)
    };
    m.model
        .check_context(capacity, options.allow_long_context)?;
    let mut kv = model_on.new_cache(capacity);
    let mut draft = load_draft(ctx, cache, &model_on, tok, options)?;
    let mut on_text = |s: &str| {
        ctx.emit(Event::Token {
            job: ctx.job,
            text: s.to_owned(),
        });
        !ctx.cancelled()
    };
    let (text, stats) = generate_with_draft(
        &model_on,
        tok,
        &ids,
        &mut kv,
        draft.as_mut(),
        options,
        &mut on_text,
    )?;
    if stats.stop_reason == StopReason::Cancelled {
        return Err(Error::Cancelled);
    }
    Ok(JobOutput::Generated { text, stats })
}

fn chat(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Path,
    system: Option<String>,
    mut options: GenerateOptions,
    context_tokens: Option<usize>,
    turns: &Receiver<ChatMsg>,
    stop_turn: &AtomicBool,
) -> Result<JobOutput> {
    let m = load(ctx, cache, model)?;
    let context = context_tokens.unwrap_or_else(|| {
        DEFAULT_CHAT_CONTEXT.min(m.model.config().max_position_embeddings.max(1))
    });
    m.model.check_context(context, options.allow_long_context)?;
    options.sampler.validate()?;
    let mut model_on = runner(&m.model, &options);
    let mut session = ChatSession::new(&model_on, context, system);
    // A draft that cannot draft for the model fails the session up front; one chosen later fails its turn.
    let tok = &m.source.tokenizer;
    session.set_draft(load_draft(ctx, cache, &model_on, tok, &options)?);
    let mut draft_path = options.draft.clone();
    // The draft must be loaded again (the model's backend or arithmetic changed).
    let mut draft_stale = false;
    ctx.progress(STAGE_CHAT_READY, 1, 1, Some(0.0));
    loop {
        ctx.check()?;
        let msg = match turns.recv_timeout(CHAT_POLL) {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => continue,
            // The engine dropped the session: cancelled, or the engine shut down.
            Err(RecvTimeoutError::Disconnected) => {
                return if ctx.cancelled() {
                    Err(Error::Cancelled)
                } else {
                    Ok(JobOutput::ChatEnded)
                };
            }
        };
        match msg {
            ChatMsg::Reset => {
                session.clear();
                stop_turn.store(false, Ordering::Relaxed);
            }
            ChatMsg::Options(o) => {
                // Settings out of range fail the next turn with a message that gives the range.
                if (o.backend, o.numerics) != (options.backend, options.numerics) {
                    model_on = runner(&m.model, &o);
                    // The draft follows the model's backend (and arithmetic, unless told otherwise).
                    draft_stale = true;
                }
                options = o;
            }
            msg @ (ChatMsg::Send(_) | ChatMsg::Regenerate) => {
                stop_turn.store(false, Ordering::Relaxed);
                let mut on_text = |s: &str| {
                    ctx.emit(Event::Token {
                        job: ctx.job,
                        text: s.to_owned(),
                    });
                    !ctx.cancelled() && !stop_turn.load(Ordering::Relaxed)
                };
                if draft_stale || options.draft != draft_path {
                    draft_stale = false;
                    session.set_draft(load_draft(ctx, cache, &model_on, tok, &options)?);
                    draft_path.clone_from(&options.draft);
                }
                let turn = match msg {
                    ChatMsg::Send(text) => session
                        .send(&model_on, tok, &text, &options, &mut on_text)
                        .map(Some),
                    _ => session.regenerate(&model_on, tok, &options, &mut on_text),
                };
                match turn {
                    Ok(None) => {}
                    Ok(Some((text, stats))) => {
                        ctx.check()?;
                        ctx.emit(Event::TurnFinished {
                            job: ctx.job,
                            text,
                            stats,
                        });
                    }
                    // A turn that fails (context full, template error) ends the session.
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

fn convert(ctx: &JobCtx, model: &Path, out: &OutputSpec, dtype: OutDtype) -> Result<JobOutput> {
    crate::output::preflight(&out.clone().input(model))?;
    let src = SourceModel::open(model)?;
    let start = Instant::now();
    let mut on_progress = |done: usize, total: usize| {
        let eta = eta(start, done as u64, total as u64);
        ctx.progress(STAGE_CONVERT, done as u64, total as u64, eta);
        !ctx.cancelled()
    };
    write_hf_folder(&src, out, dtype, &mut on_progress)?;
    Ok(JobOutput::Converted {
        path: out.path.clone(),
    })
}

fn fetch_demo(ctx: &JobCtx, dest: Option<&Path>) -> Result<JobOutput> {
    // Each stage's ETA is measured from the stage's start.
    let mut stage_start: Option<(String, Instant)> = None;
    let mut on_progress = |stage: &str, done: u64, total: u64| {
        let start = match &stage_start {
            Some((s, t)) if s == stage => *t,
            _ => {
                let t = Instant::now();
                stage_start = Some((stage.to_owned(), t));
                t
            }
        };
        let eta = eta(start, done, total);
        ctx.progress(stage, done, total, eta);
    };
    let shipped = crate::demo::fetch_demo_model(dest, &mut on_progress, &ctx.cancel)?;
    // The shipped file is already quantized (Q4_1/Q8_0): quantizing it again would make variants larger
    // and worse than it. The demo starts from its F16 dequantization instead — the closest thing to the
    // original there is — made once and kept beside it.
    let reference = crate::demo::demo_reference_path(dest);
    if !reference.is_file() {
        let src = SourceModel::open(&shipped)?;
        let opts = crate::quantize::GgufQuantizeOptions {
            mix: crate::recipes::parse_mix("f16")?,
            overrides: Vec::new(),
            imatrix: None,
            backend: crate::backend::Backend::Cpu,
        };
        let start = Instant::now();
        let mut on_tensor = |_: &crate::quantize::TensorMetrics, done: usize, total: usize| {
            let eta = eta(start, done as u64, total as u64);
            ctx.progress(crate::demo::STAGE_REFERENCE, done as u64, total as u64, eta);
            !ctx.cancelled()
        };
        crate::quantize::quantize_gguf(
            &src,
            &opts,
            &OutputSpec::file(&reference).input(&shipped),
            &mut on_tensor,
        )?;
    }
    Ok(JobOutput::DemoModel {
        path: reference,
        shipped,
    })
}

fn bench(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Path,
    options: &BenchOptions,
) -> Result<JobOutput> {
    let m = load(ctx, cache, model)?;
    // The tests run apart, each from an empty cache, as llama-bench's do: the longer one bounds the context.
    m.model
        .check_context(options.n_prompt.max(options.n_gen.saturating_add(1)), false)?;
    let total = 2 * (options.repetitions.max(1) as u64 + 1);
    let mut step = 0u64;
    let mut on_progress = |test: &str, _rep: usize| {
        ctx.progress(&format!("bench {test}"), step, total, None);
        step += 1;
        !ctx.cancelled()
    };
    let mut model = m.model.on_backend(options.backend);
    model.set_numerics(options.numerics);
    let report = crate::bench::run(&model, options, &mut on_progress)?;
    Ok(JobOutput::Bench(report))
}

/// Read the evaluation text and name it.
fn read_text(text: EvalText) -> Result<(String, String)> {
    Ok(match text {
        EvalText::Inline(s) => (s, "inline text".to_owned()),
        EvalText::Bundled => (
            crate::eval::DEFAULT_EVAL_TEXT.to_owned(),
            crate::eval::DEFAULT_EVAL_NAME.to_owned(),
        ),
        EvalText::File(p) => (
            crate::bounded::read_text_file(&p, crate::bounded::MAX_TEXT_BYTES, "text")?,
            p.display().to_string(),
        ),
    })
}

fn compute_imatrix(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Path,
    source: &CalibSource,
    options: &ImatrixOptions,
) -> Result<crate::imatrix::Imatrix> {
    // llama-imatrix reads one text and records its path: the documents joined, the path as given.
    let text = crate::calib::load_documents(source)?.join("\n\n");
    let dataset = match source {
        CalibSource::Bundled => crate::imatrix::DEFAULT_CALIBRATION_NAME.to_owned(),
        CalibSource::File { path, .. } => path.display().to_string(),
    };
    let m = load(ctx, cache, model)?;
    m.model.check_context(options.n_ctx, false)?;
    let start = Instant::now();
    let mut on_chunk = |done: usize, total: usize| {
        let eta = eta(start, done as u64, total as u64);
        ctx.progress(
            "computing importance matrix",
            done as u64,
            total as u64,
            eta,
        );
        !ctx.cancelled()
    };
    crate::imatrix::compute_imatrix(
        &m.model.on_backend(options.backend),
        &m.source.tokenizer,
        &text,
        &dataset,
        options,
        &mut on_chunk,
    )
}

fn quantize(
    ctx: &JobCtx,
    cache: &ModelCache,
    model: &Path,
    out: &OutputSpec,
    recipe: crate::recipes::GgufRecipe,
) -> Result<JobOutput> {
    let stage = format!("loading {}", model.display());
    ctx.progress(&stage, 0, 1, None);
    let src = SourceModel::open(model)?;
    let crate::recipes::GgufRecipe {
        mix,
        overrides,
        imatrix,
        auto,
        auto_types,
        auto_probe_tokens,
        auto_measurement,
        backend,
    } = recipe;
    if auto_probe_tokens > crate::quantize_automix::MAX_PROBE_TOKENS {
        return Err(Error::Invalid(format!(
            "--probe-tokens {auto_probe_tokens}: at most {} (the probes keep every layer's states and the \
             float model's log-probabilities of each token)",
            crate::quantize_automix::MAX_PROBE_TOKENS
        )));
    }
    if auto.is_some() && !overrides.is_empty() {
        return Err(Error::Invalid(
            "an auto mix chooses every decoder tensor's type itself: drop --override".into(),
        ));
    }
    if auto.is_some() && imatrix == ImatrixSource::None {
        return Err(Error::Invalid(
            "an auto mix measures each tensor's error with an importance matrix: give --imatrix FILE, or \
             --calib TEXT (`default` for the bundled text) to compute one first"
                .into(),
        ));
    }
    // The output checked (with room for the file) before an importance matrix is computed.
    let bytes = crate::quantize::gguf_tensor_bytes(&src, &mix).unwrap_or(0);
    crate::output::preflight(&out.clone().estimated_bytes(bytes))?;
    // An auto mix probes the model on the importance matrix's text (the bundled one with a file).
    let probe_source = match &imatrix {
        ImatrixSource::Compute { source, .. } => source.clone(),
        _ => crate::calib::CalibSource::Bundled,
    };
    let imatrix = match imatrix {
        ImatrixSource::None => None,
        ImatrixSource::File(p) => Some(crate::quantize::ImatrixInput {
            matrix: crate::imatrix::Imatrix::read(&p)?,
            file: Some(p.display().to_string()),
        }),
        ImatrixSource::Compute { source, options } => Some(crate::quantize::ImatrixInput {
            matrix: compute_imatrix(ctx, cache, model, &source, &options)?,
            file: None,
        }),
    };
    let mut predicted_kld = None;
    let (mix, overrides, tensor_types) = match (auto, &imatrix) {
        (Some(budget), Some(im)) => {
            let start = Instant::now();
            let stage = "measuring every tensor under every type";
            let types = if auto_types.is_empty() {
                crate::quantize_automix::AUTOMIX_TYPES.to_vec()
            } else {
                auto_types
            };
            let measured = match &auto_measurement {
                Some(p) if p.exists() => crate::quantize_automix::read_measurement(p, &src, im)?,
                _ => {
                    let probe_rows = match auto_probe_tokens {
                        0 => Vec::new(),
                        n => {
                            let docs = crate::calib::load_documents(&probe_source)?;
                            // Rows of up to 512 tokens, shorter when the whole text is.
                            let text_tokens =
                                src.tokenizer.encode(&docs.join("\n\n"), false)?.len();
                            let seq_len = n
                                .min(crate::quantize_automix::DEFAULT_PROBE_TOKENS)
                                .min(
                                    text_tokens
                                        + usize::from(
                                            src.tokenizer.add_bos
                                                && src.tokenizer.bos_token_id.is_some(),
                                        ),
                                )
                                .max(2);
                            let opts = crate::calib::CalibOptions {
                                rows: n.div_ceil(seq_len),
                                seq_len,
                                seed: 0,
                            };
                            crate::calib::sample_rows(&src.tokenizer, &docs, &opts)?
                        }
                    };
                    let m = crate::quantize_automix::measure_mix(
                        &src,
                        im,
                        &types,
                        &probe_rows,
                        &mut |done, total| {
                            ctx.progress(
                                stage,
                                done as u64,
                                total as u64,
                                eta(start, done as u64, total as u64),
                            );
                            !ctx.cancelled()
                        },
                    )?;
                    if let Some(p) = &auto_measurement {
                        m.write(p)?;
                    }
                    m
                }
            };
            let m = measured.restricted_to(&types)?;
            let plan = crate::quantize_automix::plan_mix(&m, budget)?;
            let args = crate::quantize_automix::tensor_type_args(&plan.overrides);
            predicted_kld = (m.probed_tokens > 0).then_some(plan.err);
            (crate::quantize_automix::AUTOMIX_BASE, plan.overrides, args)
        }
        _ => (mix, overrides, Vec::new()),
    };
    let opts = crate::quantize::GgufQuantizeOptions {
        mix,
        overrides,
        imatrix,
        backend,
    };
    let start = Instant::now();
    let mut on_tensor = |m: &crate::quantize::TensorMetrics, done: usize, total: usize| {
        ctx.emit(Event::LayerDone {
            job: ctx.job,
            metrics: super::LayerMetrics {
                layer: m.layer,
                tensor: m.tensor.clone(),
                codec: m.ty.to_owned(),
                bits_per_weight: m.bits_per_weight,
                rel_rms_error: m.rel_rms_error,
                weighted_rel_rms_error: m.weighted_rel_rms_error,
                gptq_loss: None,
                rtn_loss: None,
                max_error: m.max_error,
            },
        });
        let eta = eta(start, done as u64, total as u64);
        ctx.progress("quantizing", done as u64, total as u64, eta);
        !ctx.cancelled()
    };
    let mut report = crate::quantize::quantize_gguf(&src, &opts, out, &mut on_tensor)?;
    report.tensor_type_args = tensor_types;
    report.predicted_kld = predicted_kld;
    Ok(JobOutput::Quantized(Box::new(report)))
}

/// Check the output, then open the source (a progress stage while it loads).
fn open_source_for(ctx: &JobCtx, model: &Path, out: &OutputSpec) -> Result<SourceModel> {
    crate::output::preflight(out)?;
    let stage = format!("loading {}", model.display());
    ctx.progress(&stage, 0, 1, None);
    SourceModel::open(model)
}

/// A quantized module: its metrics as an event and the job's progress; `false` when the job is cancelled.
fn module_done(
    ctx: &JobCtx,
    start: Instant,
    stage: &str,
    metrics: super::LayerMetrics,
    done: usize,
    total: usize,
) -> bool {
    ctx.emit(Event::LayerDone {
        job: ctx.job,
        metrics,
    });
    let eta = eta(start, done as u64, total as u64);
    ctx.progress(stage, done as u64, total as u64, eta);
    !ctx.cancelled()
}

/// A packed-format module's metrics as the front ends get them.
fn packed_metrics(
    m: &crate::quantize_packed::PackedModuleMetrics,
    codec: &str,
) -> super::LayerMetrics {
    super::LayerMetrics {
        layer: Some(m.layer),
        tensor: m.tensor.clone(),
        codec: codec.to_owned(),
        bits_per_weight: m.bits_per_weight,
        rel_rms_error: m.rel_rms_error,
        weighted_rel_rms_error: None,
        gptq_loss: None,
        rtn_loss: None,
        max_error: m.max_error,
    }
}

fn quantize_packed(
    ctx: &JobCtx,
    model: &Path,
    out: &OutputSpec,
    recipe: &crate::recipes::PackedRecipe,
) -> Result<JobOutput> {
    let src = open_source_for(ctx, model, out)?;
    let packer = recipe.packer();
    let codec = packer.codec();
    let start = Instant::now();
    let mut on_module =
        |m: &crate::quantize_packed::PackedModuleMetrics, done: usize, total: usize| {
            let metrics = packed_metrics(m, &codec);
            module_done(ctx, start, "quantizing", metrics, done, total)
        };
    let report = crate::quantize_packed::quantize_packed(&src, packer, out, &mut on_module)?;
    Ok(JobOutput::QuantizedPacked(Box::new(report)))
}

fn quantize_awq(
    ctx: &JobCtx,
    model: &Path,
    out: &OutputSpec,
    options: &crate::quantize_awq::AwqQuantizeOptions,
) -> Result<JobOutput> {
    let src = open_source_for(ctx, model, out)?;
    let codec = options.codec();
    let start = Instant::now();
    let stage = if options.rtn { "quantizing" } else { "AWQ" };
    let mut on_module =
        |m: &crate::quantize_packed::PackedModuleMetrics, done: usize, total: usize| {
            let metrics = packed_metrics(m, &codec);
            module_done(ctx, start, stage, metrics, done, total)
        };
    let report = crate::quantize_awq::quantize_awq(&src, options, out, &mut on_module)?;
    Ok(JobOutput::QuantizedPacked(Box::new(report)))
}

fn quantize_exl2(
    ctx: &JobCtx,
    model: &Path,
    out: &OutputSpec,
    options: &crate::quantize_exl2::Exl2QuantizeOptions,
) -> Result<JobOutput> {
    let src = open_source_for(ctx, model, out)?;
    let codec = options.codec();
    let start = Instant::now();
    let mut on_step = |phase: &str,
                       m: Option<&crate::quantize_packed::PackedModuleMetrics>,
                       done: usize,
                       total: usize| {
        match m {
            Some(m) => module_done(ctx, start, phase, packed_metrics(m, &codec), done, total),
            None => {
                // A measured block: progress only (its options' errors land in measurement.json).
                let eta = eta(start, done as u64, total as u64);
                ctx.progress(phase, done as u64, total as u64, eta);
                !ctx.cancelled()
            }
        }
    };
    let report = crate::quantize_exl2::quantize_exl2(&src, options, out, &mut on_step)?;
    Ok(JobOutput::QuantizedPacked(Box::new(report)))
}

fn quantize_gptq(
    ctx: &JobCtx,
    model: &Path,
    out: &OutputSpec,
    options: &crate::quantize_gptq::GptqQuantizeOptions,
) -> Result<JobOutput> {
    let src = open_source_for(ctx, model, out)?;
    let codec = {
        let s = &options.solver;
        format!(
            "{} int{} {}",
            if options.rtn { "RTN" } else { "GPTQ" },
            s.bits,
            s.group_size.map_or("pc".into(), |g| format!("g{g}"))
        )
    };
    let start = Instant::now();
    let mut on_module =
        |m: Option<&crate::quantize_gptq::GptqModuleMetrics>, done: usize, total: usize| {
            let Some(m) = m else {
                // A layer of the AWQ-scale pass: progress only.
                ctx.progress(
                    "AWQ scales",
                    done as u64,
                    total as u64,
                    eta(start, done as u64, total as u64),
                );
                return !ctx.cancelled();
            };
            let metrics = super::LayerMetrics {
                layer: Some(m.layer),
                tensor: m.tensor.clone(),
                codec: codec.clone(),
                bits_per_weight: m.bits_per_weight,
                rel_rms_error: m.rel_rms_error,
                weighted_rel_rms_error: None,
                gptq_loss: Some(m.gptq_output_loss),
                rtn_loss: Some(m.rtn_loss),
                max_error: m.max_error,
            };
            module_done(ctx, start, "GPTQ", metrics, done, total)
        };
    let report = crate::quantize_gptq::quantize_gptq(&src, options, out, &mut on_module)?;
    Ok(JobOutput::QuantizedGptq(Box::new(report)))
}
