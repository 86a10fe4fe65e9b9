//! `bench`: prompt-processing and decoding tokens per second as llama-bench measures them (ppN, tgN), and —
//! given a `llama-bench` binary — llama-bench's numbers for the same model, tests, thread count and
//! repetitions, run right after ours, with the ratio per test.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use quant_engine::bench::{BenchOptions, BenchReport};
use quant_engine::jobs::{Command, EngineHandle, JobOutput};
use serde::Serialize;

/// One llama-bench result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaLine {
    /// `pp512`, `tg128`.
    pub test: String,
    pub tokens_per_sec_mean: f64,
    pub tokens_per_sec_std: f64,
}

/// llama-bench's `-o json` output: one object per test with `n_prompt`, `n_gen`, `avg_ts`, `stddev_ts`.
pub fn parse_llama_bench_json(s: &str) -> anyhow::Result<Vec<LlamaLine>> {
    let v: serde_json::Value =
        serde_json::from_str(s).context("llama-bench's JSON output could not be parsed")?;
    let Some(tests) = v.as_array() else {
        bail!("llama-bench's JSON output is not a list of tests");
    };
    tests
        .iter()
        .map(|t| {
            let num = |k: &str| {
                t.get(k)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("llama-bench's JSON output lacks `{k}`"))
            };
            let (p, g) = (num("n_prompt")?, num("n_gen")?);
            let test = if g > 0.0 {
                format!("tg{g}")
            } else {
                format!("pp{p}")
            };
            // Older llama-bench builds have no `n_depth` (no depth: 0).
            let d = num("n_depth").unwrap_or(0.0);
            let test = if d > 0.0 {
                format!("{test} @ d{d}")
            } else {
                test
            };
            Ok(LlamaLine {
                test,
                tokens_per_sec_mean: num("avg_ts")?,
                tokens_per_sec_std: num("stddev_ts").unwrap_or(0.0),
            })
        })
        .collect()
}

/// Run `bin -m MODEL -p P -n N -r R -t T -o json` and read its results.
fn llama_bench(
    bin: &Path,
    model: &Path,
    opts: &BenchOptions,
    threads: usize,
) -> anyhow::Result<Vec<LlamaLine>> {
    let out = std::process::Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-p", &opts.n_prompt.to_string()])
        .args(["-n", &opts.n_gen.to_string()])
        .args(["-d", &opts.n_depth.to_string()])
        .args(["-r", &opts.repetitions.max(1).to_string()])
        .args(["-t", &threads.to_string()])
        .args(["-o", "json"])
        .output()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "{} failed ({}): {}",
            bin.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    parse_llama_bench_json(&String::from_utf8_lossy(&out.stdout))
}

/// Our report with llama-bench's numbers beside it.
#[derive(Debug, Serialize)]
struct Comparison<'a> {
    ours: &'a BenchReport,
    llama_bench: &'a [LlamaLine],
}

/// The side-by-side table: one row per test both ran.
pub fn comparison_table(ours: &BenchReport, theirs: &[LlamaLine]) -> String {
    let mut s = format!(
        "backend: {} · arithmetic: {} · {} threads, llama-bench right after\n",
        ours.backend, ours.numerics, ours.threads
    );
    s.push_str("| test   |      ours t/s      |   llama.cpp t/s    | ratio |\n");
    s.push_str("| ------ | -----------------: | -----------------: | ----: |\n");
    for l in &ours.lines {
        let Some(t) = theirs.iter().find(|t| t.test == l.test) else {
            continue;
        };
        s.push_str(&format!(
            "| {:6} | {:8.2} ± {:7.2} | {:8.2} ± {:7.2} | {:5.2} |\n",
            l.test,
            l.tokens_per_sec_mean,
            l.tokens_per_sec_std,
            t.tokens_per_sec_mean,
            t.tokens_per_sec_std,
            l.tokens_per_sec_mean / t.tokens_per_sec_mean.max(1e-12)
        ));
    }
    s
}

pub fn run(
    engine: &EngineHandle,
    model: PathBuf,
    options: BenchOptions,
    llama: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let command = Command::Bench {
        model: model.clone(),
        options: options.clone(),
    };
    let report = match super::run_with_bars(engine, command, |_, _| Ok(()))? {
        JobOutput::Bench(report) => report,
        other => bail!("internal error: unexpected output {other:?}"),
    };
    let theirs = match llama {
        Some(bin) => Some(llama_bench(bin, &model, &options, report.threads)?),
        None => None,
    };
    match (json, &theirs) {
        (true, Some(t)) => outln!(
            "{}",
            serde_json::to_string_pretty(&Comparison {
                ours: &report,
                llama_bench: t
            })?
        )?,
        (true, None) => outln!("{}", serde_json::to_string_pretty(&report)?)?,
        (false, Some(t)) => {
            outln!("{report}")?;
            outln!("{}", comparison_table(&report, t))?;
        }
        (false, None) => outln!("{report}")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields llama-bench b4000+ prints with `-o json` (trimmed).
    const SAMPLE: &str = r#"[
      {"build_commit": "abc", "model_type": "llama 256M Q4_K - Medium", "n_threads": 2,
       "n_prompt": 512, "n_gen": 0, "avg_ns": 1, "stddev_ns": 1, "avg_ts": 1020.5, "stddev_ts": 12.25},
      {"build_commit": "abc", "model_type": "llama 256M Q4_K - Medium", "n_threads": 2,
       "n_prompt": 0, "n_gen": 128, "avg_ns": 1, "stddev_ns": 1, "avg_ts": 140.0, "stddev_ts": 2.5},
      {"build_commit": "abc", "model_type": "llama 256M Q4_K - Medium", "n_threads": 2, "n_depth": 4096,
       "n_prompt": 0, "n_gen": 128, "avg_ns": 1, "stddev_ns": 1, "avg_ts": 90.0, "stddev_ts": 0.5}
    ]"#;

    #[test]
    fn llama_bench_json_is_read_and_compared() {
        let theirs = parse_llama_bench_json(SAMPLE).expect("parse");
        assert_eq!(
            theirs,
            vec![
                LlamaLine {
                    test: "pp512".into(),
                    tokens_per_sec_mean: 1020.5,
                    tokens_per_sec_std: 12.25
                },
                LlamaLine {
                    test: "tg128".into(),
                    tokens_per_sec_mean: 140.0,
                    tokens_per_sec_std: 2.5
                },
                LlamaLine {
                    test: "tg128 @ d4096".into(),
                    tokens_per_sec_mean: 90.0,
                    tokens_per_sec_std: 0.5
                },
            ]
        );
        let ours = BenchReport {
            threads: 2,
            backend: "cpu".into(),
            numerics: "llama-cpu".into(),
            lines: vec![quant_engine::bench::BenchLine {
                test: "tg128".into(),
                tokens_per_sec_mean: 105.0,
                tokens_per_sec_std: 1.0,
                repetitions: 3,
            }],
            kernels: Vec::new(),
        };
        let table = comparison_table(&ours, &theirs);
        assert!(table.contains("| tg128  |   105.00 ±    1.00 |   140.00 ±    2.50 |  0.75 |"));
        assert!(!table.contains("pp512"), "{table}");
        assert!(table.contains("arithmetic: llama-cpu"));
        assert!(parse_llama_bench_json("{}").is_err());
        assert!(parse_llama_bench_json(r#"[{"n_prompt": 1}]"#).is_err());
    }
}
