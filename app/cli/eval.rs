//! `quant-studio eval`: perplexity (llama-perplexity's output) or, with `--base`, KL-divergence.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use quant_engine::eval::{EvalOptions, KldReport, KldStats, PerplexityReport, ValueUnc};
use quant_engine::infer::Numerics;
use quant_engine::jobs::{Command, EngineHandle, EvalText, Event, JobOutput};

use super::progress::Bars;
use super::{start, wait};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model to evaluate (with --base: the variant, e.g. a quantized file).
    pub model: PathBuf,
    /// The evaluation text (UTF-8; one trailing newline is dropped); omitted or "default": the bundled
    /// held-out text (chapters 16–17 of the Rust book, which the bundled calibration text does not contain).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// The reference model: report KL-divergence of MODEL from it.
    #[arg(long, value_name = "MODEL")]
    pub base: Option<PathBuf>,
    /// Tokens per chunk.
    #[arg(long = "ctx", default_value_t = 512)]
    pub n_ctx: usize,
    /// Evaluate at most N chunks.
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Arithmetic: `exact` (f32 activations) or `llama-cpu` (activations rounded as llama.cpp's CPU backend
    /// rounds them: Q8_0/Q8_1/Q8_K or f16 per weight type, f16 KV cache), to compare with llama-perplexity.
    #[arg(long, default_value = "exact", value_parser = parse_numerics)]
    pub numerics: Numerics,
    /// Print the report as JSON (no per-chunk lines).
    #[arg(long)]
    pub json: bool,
    /// Accept a --ctx longer than the model's trained context (max_position_embeddings); quality degrades.
    #[arg(long)]
    pub allow_long_context: bool,
}

pub(crate) fn parse_numerics(s: &str) -> Result<Numerics, String> {
    Numerics::parse(s).ok_or_else(|| format!("unknown arithmetic {s:?}: use exact or llama-cpu"))
}

pub fn run(engine: &EngineHandle, args: &EvalArgs) -> anyhow::Result<()> {
    let options = EvalOptions {
        n_ctx: args.n_ctx,
        max_chunks: args.chunks,
        numerics: args.numerics,
        allow_long_context: args.allow_long_context,
        backend: super::backend(),
    };
    if args.allow_long_context {
        super::warn_long_context();
    }
    let job = start(
        engine,
        Command::Evaluate {
            model: args.model.clone(),
            base: args.base.clone(),
            text: match &args.text {
                Some(p) if p.as_os_str() != "default" => EvalText::File(p.clone()),
                _ => EvalText::Bundled,
            },
            options,
        },
    )?;
    let mut bars = Bars::new();
    // Per-chunk output streams to stdout unless both stdout and the bar are on the terminal, where the
    // bar shows the running PPL and the line is printed at the end.
    let stream = !(args.json || (bars.visible() && std::io::stdout().is_terminal()));
    let mut ppl_line = String::new();
    let mut kld_header = false;
    let output = wait(engine, job, |ev| {
        bars.on_event(ev);
        let Event::EvalChunk { progress: p, .. } = ev else {
            return Ok(());
        };
        if args.json {
            return Ok(());
        }
        match &p.kld {
            None => {
                let piece = format!("[{}]{:.4},", p.done(), p.ppl);
                ppl_line.push_str(&piece);
                if stream {
                    bars.suspend(|| {
                        if p.chunk == 0 {
                            eprintln!(
                                "perplexity: calculating perplexity over {} chunks, n_ctx={}",
                                p.n_chunks, args.n_ctx
                            );
                        }
                        write!(std::io::stdout().lock(), "{piece}")?;
                        std::io::stdout().flush()
                    })?;
                }
            }
            Some(line) => {
                let mut text = String::new();
                if !kld_header {
                    kld_header = true;
                    text.push_str(KLD_HEADER);
                    text.push('\n');
                }
                let _ = write!(
                    text,
                    "{:4}    {:9.4} ± {:9.4}    {:10.5} ± {:10.5}    {:10.5} ± {:10.5}    {:6.3} ± {:6.3} %    {:6.3} ± {:6.3} %",
                    p.done(),
                    line.ppl.value,
                    line.ppl.unc,
                    line.ln_ppl_ratio.value,
                    line.ln_ppl_ratio.unc,
                    line.kld.value,
                    line.kld.unc,
                    100.0 * line.rms_p_diff.value,
                    100.0 * line.rms_p_diff.unc,
                    100.0 * line.same_top.value,
                    100.0 * line.same_top.unc,
                );
                bars.suspend(|| outln!("{text}"))?;
            }
        }
        Ok(())
    });
    bars.finish();
    match output? {
        JobOutput::Perplexity(r) if args.json => outln!("{}", serde_json::to_string_pretty(&r)?)?,
        JobOutput::Kld(r) if args.json => outln!("{}", serde_json::to_string_pretty(&r)?)?,
        JobOutput::Perplexity(r) => {
            if stream {
                outln!()?;
            } else {
                outln!("{ppl_line}")?;
            }
            print_ppl(&r)?;
        }
        JobOutput::Kld(r) => print_kld(&r)?,
        other => bail!("internal error: unexpected output {other:?}"),
    }
    Ok(())
}

const KLD_HEADER: &str = "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p";

fn print_ppl(r: &PerplexityReport) -> std::io::Result<()> {
    if r.ppl_err.is_finite() {
        outln!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_err)?;
    } else {
        outln!(
            "Final estimate: PPL = {:.4} (no error estimate: too few tokens)",
            r.ppl
        )?;
    }
    eprintln!(
        "{} chunks of {} tokens, {} tokens scored, {:.1} s ({:.0} tokens/s)",
        r.n_chunks, r.n_ctx, r.n_scored, r.elapsed_secs, r.tokens_per_sec
    );
    Ok(())
}

fn vu(v: ValueUnc) -> String {
    format!("{:10.6} ± {:10.6}", v.value, v.unc)
}

fn pct(v: ValueUnc) -> String {
    format!("{:6.3} ± {:5.3} %", 100.0 * v.value, 100.0 * v.unc)
}

/// llama-perplexity's closing blocks for KL-divergence mode.
fn print_kld(r: &KldReport) -> std::io::Result<()> {
    let s: &KldStats = &r.stats;
    if s.count < 100 {
        eprintln!(
            "note: only {} tokens were scored; llama-perplexity prints these statistics from 100 on",
            s.count
        );
    }
    outln!()?;
    outln!("====== Perplexity statistics ======")?;
    outln!("Mean PPL(Q)                   : {}", vu(s.ppl))?;
    outln!("Mean PPL(base)                : {}", vu(s.ppl_base))?;
    outln!(
        "Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%",
        100.0 * s.ln_ppl_correlation
    )?;
    outln!("Mean ln(PPL(Q)/PPL(base))     : {}", vu(s.ln_ppl_ratio))?;
    outln!("Mean PPL(Q)/PPL(base)         : {}", vu(s.ppl_ratio))?;
    outln!("Mean PPL(Q)-PPL(base)         : {}", vu(s.ppl_diff))?;
    outln!()?;
    let k = &s.kld;
    outln!("====== KL divergence statistics ======")?;
    outln!("Mean    KLD: {}", vu(k.mean))?;
    for (name, v) in [
        ("Maximum KLD", k.max),
        ("99.9%   KLD", k.p99_9),
        ("99.0%   KLD", k.p99),
        ("95.0%   KLD", k.p95),
        ("90.0%   KLD", k.p90),
        ("Median  KLD", k.median),
        ("10.0%   KLD", k.p10),
        (" 5.0%   KLD", k.p5),
        (" 1.0%   KLD", k.p1),
        (" 0.1%   KLD", k.p0_1),
        ("Minimum KLD", k.min),
    ] {
        outln!("{name}: {v:10.6}")?;
    }
    outln!()?;
    let d = &s.p_diff;
    outln!("====== Token probability statistics ======")?;
    outln!("Mean    Δp: {}", pct(d.mean))?;
    for (name, v) in [
        ("Maximum Δp", d.max),
        ("99.9%   Δp", d.p99_9),
        ("99.0%   Δp", d.p99),
        ("95.0%   Δp", d.p95),
        ("90.0%   Δp", d.p90),
        ("75.0%   Δp", d.p75),
        ("Median  Δp", d.median),
        ("25.0%   Δp", d.p25),
        ("10.0%   Δp", d.p10),
        (" 5.0%   Δp", d.p5),
        (" 1.0%   Δp", d.p1),
        (" 0.1%   Δp", d.p0_1),
        ("Minimum Δp", d.min),
    ] {
        outln!("{name}: {:6.3}%", 100.0 * v)?;
    }
    outln!("RMS Δp    : {}", pct(s.rms_p_diff))?;
    outln!("Same top p: {}", pct(s.same_top))?;
    outln!()?;
    let f = &r.full_precision;
    outln!(
        "With full-precision base log-probs (llama.cpp stores them in 16 bits): mean KLD {}, same top p {}",
        vu(f.kld.mean).trim(),
        pct(f.same_top).trim()
    )?;
    eprintln!(
        "{} chunks of {} tokens through both models, {:.1} s ({:.0} tokens/s)",
        r.n_chunks, r.n_ctx, r.elapsed_secs, r.tokens_per_sec
    );
    Ok(())
}
