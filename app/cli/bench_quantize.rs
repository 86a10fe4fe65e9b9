//! `bench-quantize`: how long a GGUF quantization takes here, and — given a `llama-quantize` binary — how
//! long llama-quantize takes for the same input, mix, importance matrix and thread count, with the ratio
//! and both peak memories (Linux `VmHWM`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use quant_engine::jobs::{Command, EngineHandle, ImatrixSource, JobOutput};
use quant_engine::recipes::{GgufRecipe, Recipe};

#[derive(Debug, Args)]
pub struct BenchQuantizeArgs {
    /// The source model (e.g. an F16 GGUF).
    pub model: PathBuf,
    /// The mix, as for `quantize`.
    #[arg(long, default_value = "q4_k_m")]
    pub format: String,
    /// An importance matrix to use (both tools).
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// A llama-quantize binary to compare with (run as `BIN [--imatrix F] MODEL OUT TYPE THREADS`).
    #[arg(long, value_name = "BIN")]
    pub llama_quantize: Option<PathBuf>,
    /// Timed runs of each (the best is reported).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub repetitions: usize,
}

/// Peak resident memory of this process so far, in bytes (Linux).
fn own_peak_rss() -> Option<u64> {
    vm_hwm(Path::new("/proc/self/status"))
}

fn vm_hwm(status: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(status).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Run `cmd` to completion; its wall time and the last peak RSS seen while it ran.
fn run_child(cmd: &mut std::process::Command) -> anyhow::Result<(Duration, Option<u64>)> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting llama-quantize")?;
    let status_path = PathBuf::from(format!("/proc/{}/status", child.id()));
    let mut peak = None;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("llama-quantize failed: {st}");
            }
            return Ok((start.elapsed(), peak));
        }
        if let Some(p) = vm_hwm(&status_path) {
            peak = Some(peak.map_or(p, |q: u64| q.max(p)));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn run(engine: &EngineHandle, a: &BenchQuantizeArgs) -> anyhow::Result<()> {
    let reps = a.repetitions.max(1);
    let threads = quant_engine::jobs::thread_count();
    let dir = std::env::temp_dir().join(format!("qs-bench-quantize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> anyhow::Result<()> {
        let ours_out = dir.join("ours.gguf");
        let mut ours = Vec::new();
        for _ in 0..reps {
            let start = Instant::now();
            let command = Command::Quantize {
                model: a.model.clone(),
                out: ours_out.clone(),
                recipe: Recipe::Gguf(GgufRecipe {
                    mix: quant_engine::recipes::parse_mix(&a.format)?,
                    overrides: Vec::new(),
                    imatrix: a
                        .imatrix
                        .clone()
                        .map_or(ImatrixSource::None, ImatrixSource::File),
                    auto: None,
                    auto_types: Vec::new(),
                    auto_probe_tokens: quant_engine::quantize_automix::DEFAULT_PROBE_TOKENS,
                    auto_measurement: None,
                    backend: quant_engine::backend::Backend::Cpu,
                }),
                // Its own scratch folder, rewritten on every repetition.
                overwrite: true,
            };
            match super::run_with_bars(engine, command, |_, _| Ok(()))? {
                JobOutput::Quantized(_) => {}
                other => bail!("internal error: unexpected output {other:?}"),
            }
            ours.push(start.elapsed());
        }
        let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default().as_secs_f64();
        let ours_best = best(&ours);
        let ours_size = std::fs::metadata(&ours_out)?.len();
        outln!(
            "{:<16} {:>10} {:>12} {:>12}",
            "tool",
            "best s",
            "peak MiB",
            "file MiB"
        )?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        outln!(
            "{:<16} {:>10.3} {:>12} {:>12.2}",
            "quant-studio",
            ours_best,
            own_peak_rss().map_or("?".into(), |p| format!("{:.1}", mib(p))),
            mib(ours_size)
        )?;
        if let Some(bin) = &a.llama_quantize {
            let ll_out = dir.join("llama.gguf");
            let mut times = Vec::new();
            let mut peak = None;
            for _ in 0..reps {
                let mut cmd = std::process::Command::new(bin);
                if let Some(im) = &a.imatrix {
                    cmd.arg("--imatrix").arg(im);
                }
                cmd.arg(&a.model)
                    .arg(&ll_out)
                    .arg(a.format.to_uppercase())
                    .arg(threads.to_string());
                let (t, p) = run_child(&mut cmd)?;
                times.push(t);
                peak = peak.max(p);
            }
            let ll_best = best(&times);
            let ll_size = std::fs::metadata(&ll_out)?.len();
            outln!(
                "{:<16} {:>10.3} {:>12} {:>12.2}",
                "llama-quantize",
                ll_best,
                peak.map_or("?".into(), |p| format!("{:.1}", mib(p))),
                mib(ll_size)
            )?;
            let same = std::fs::read(&ours_out)? == std::fs::read(&ll_out)?;
            outln!(
                "{} on {threads} threads: quant-studio takes {:.2}× llama-quantize's time; files {}",
                a.format,
                ours_best / ll_best,
                if same { "byte-identical" } else { "differ" }
            )?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
