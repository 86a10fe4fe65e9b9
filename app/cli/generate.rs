//! `quant-studio generate` and `quant-studio chat`: text streamed to stdout, speed to stderr.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use quant_engine::infer::{GenerateStats, StopReason};
use quant_engine::jobs::{Command, EngineHandle, Event, JobId, JobOutput};

use super::progress::Bars;
use super::{start, wait, SamplingArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A Hugging Face folder or a .gguf file.
    pub model: PathBuf,
    /// The prompt (a user message, unless --raw).
    #[arg(long)]
    pub prompt: String,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A Hugging Face folder or a .gguf file.
    pub model: PathBuf,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Context of the conversation in tokens (default: 4096, or the model's if smaller).
    #[arg(long = "ctx")]
    pub context: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "end of text",
        StopReason::StopString => "stop string",
        StopReason::MaxTokens => "max tokens",
        StopReason::Cancelled => "cancelled",
        StopReason::ContextFull => "context full",
    }
}

fn print_stats(s: &GenerateStats) {
    let draft = s.acceptance_rate().map_or_else(String::new, |rate| {
        format!(
            " | draft: {} of {} accepted, {:.1}%",
            s.accepted_tokens,
            s.drafted_tokens,
            100.0 * rate
        )
    });
    eprintln!(
        "[prompt: {} tokens, {:.1} tokens/s | generated: {} tokens, {:.1} tokens/s{draft} | stop: {} | arithmetic: {}]",
        s.prompt_tokens,
        s.prompt_tokens_per_sec(),
        s.generated_tokens,
        s.decode_tokens_per_sec(),
        stop_reason(s.stop_reason),
        s.numerics.name()
    );
}

fn print_piece(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

pub fn run_generate(engine: &EngineHandle, args: &GenerateArgs) -> anyhow::Result<()> {
    if args.sampling.allow_long_context {
        super::warn_long_context();
    }
    let job = start(
        engine,
        Command::Generate {
            model: args.model.clone(),
            prompt: args.prompt.clone(),
            options: args.sampling.options(),
            apply_chat_template: !args.raw,
        },
    )?;
    let mut bars = Bars::new();
    let output = wait(engine, job, |ev| {
        bars.on_event(ev);
        if let Event::Token { text, .. } = ev {
            print_piece(text)?;
        }
        Ok(())
    });
    bars.finish();
    match output? {
        JobOutput::Generated { stats, .. } => {
            outln!()?;
            print_stats(&stats);
            Ok(())
        }
        other => bail!("internal error: unexpected output {other:?}"),
    }
}

/// Wait until chat session `job` has loaded its model.
fn wait_loaded(engine: &EngineHandle, job: JobId, bars: &mut Bars) -> anyhow::Result<()> {
    loop {
        let ev = engine.events.recv().context("the engine stopped")?;
        if ev.job() != job {
            continue;
        }
        bars.on_event(&ev);
        match ev {
            Event::Progress { stage, .. } if stage == quant_engine::jobs::STAGE_CHAT_READY => {
                return Ok(())
            }
            Event::Failed { error, .. } => bail!(error),
            Event::Cancelled { .. } => bail!("cancelled"),
            Event::Finished { .. } => bail!("the chat session ended"),
            _ => {}
        }
    }
}

/// Stream one reply of chat session `job`.
fn wait_reply(engine: &EngineHandle, job: JobId) -> anyhow::Result<()> {
    loop {
        let ev = engine.events.recv().context("the engine stopped")?;
        if ev.job() != job {
            continue;
        }
        match ev {
            Event::Token { text, .. } => print_piece(&text)?,
            Event::TurnFinished { stats, .. } => {
                outln!()?;
                print_stats(&stats);
                return Ok(());
            }
            Event::Failed { error, .. } => bail!(error),
            Event::Cancelled { .. } => bail!("cancelled"),
            Event::Finished { .. } => bail!("the chat session ended"),
            _ => {}
        }
    }
}

pub fn run_chat(engine: &EngineHandle, args: &ChatArgs) -> anyhow::Result<()> {
    if args.sampling.allow_long_context {
        super::warn_long_context();
    }
    let job = start(
        engine,
        Command::Chat {
            model: args.model.clone(),
            system: args.system.clone(),
            options: args.sampling.options(),
            context_tokens: args.context,
        },
    )?;
    let mut bars = Bars::new();
    let loaded = wait_loaded(engine, job, &mut bars);
    bars.finish();
    loaded?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with {} — /reset forgets the conversation, /exit quits.",
            args.model.display()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            print_piece("> ")?;
        }
        let Some(line) = lines.next() else {
            break;
        };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                engine.submit(Command::ChatReset { job })?;
                eprintln!("(conversation cleared)");
            }
            _ => {
                engine.submit(Command::ChatSend {
                    job,
                    text: text.to_owned(),
                })?;
                wait_reply(engine, job)?;
            }
        }
    }
    engine.submit(Command::Cancel(job))?;
    Ok(())
}
