//! Speed benchmark in llama-bench's terms: `pp` (a prompt of N tokens processed as one batch) and `tg` (N
//! tokens decoded one at a time), tokens per second, mean ± standard deviation over repetitions.
//!
//! Like llama-bench, the tokens are random ids (the speed does not depend on them) and each repetition
//! starts from an empty KV cache. After them, the kernels on the model's own first `ffn_gate` weight: the
//! matmul of a 512-token batch (GFLOP/s), the decoding matvec (weight GB/s), dequantisation (GB/s of
//! stored weights) and GPTQ of it (seconds; ×7 per layer is the projection), on the backend the model runs
//! on; on the CPU also the machine's memory read bandwidth, the ceiling of decoding's weight streaming.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::Backend;
use crate::infer::{LinearKind, Logits, Model};
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Prompt length for the `pp` test (0 skips it).
    pub n_prompt: usize,
    /// Tokens generated for the `tg` test (0 skips it).
    pub n_gen: usize,
    /// Context both tests start from (llama-bench's `-d`): this many tokens are run first, untimed, and
    /// each repetition starts again from them — decoding deep in a context reads the whole KV cache per
    /// token.
    pub n_depth: usize,
    /// Repetitions of each test (after one untimed warm-up run).
    pub repetitions: usize,
    /// Where the arithmetic runs.
    pub backend: crate::backend::Backend,
    /// The arithmetic (`llama-cpu`: activations quantized as llama.cpp's CPU backend does, the packed
    /// integer dot products where a type has them).
    pub numerics: crate::infer::Numerics,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            n_prompt: 512,
            n_gen: 128,
            n_depth: 0,
            repetitions: 3,
            backend: crate::backend::Backend::Cpu,
            numerics: crate::infer::Numerics::LlamaCpu,
        }
    }
}

/// One test's throughput.
#[derive(Clone, Debug, Serialize)]
pub struct BenchLine {
    /// `pp512`, `tg128`.
    pub test: String,
    pub tokens_per_sec_mean: f64,
    pub tokens_per_sec_std: f64,
    pub repetitions: usize,
}

/// One kernel's throughput.
#[derive(Clone, Debug, Serialize)]
pub struct KernelLine {
    /// `"matmul Q4_K 1536×576 · 512 tokens"`.
    pub test: String,
    pub value: f64,
    /// `"GFLOP/s"`, `"GB/s"` or `"s"`.
    pub unit: &'static str,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    /// `"cpu"`, `"gpu: NVIDIA H100 (Vulkan)"`.
    pub backend: String,
    /// The arithmetic the numbers were measured in (`exact`, `llama-cpu`).
    pub numerics: String,
    pub lines: Vec<BenchLine>,
    pub kernels: Vec<KernelLine>,
}

/// Run the benchmark. `progress(test, rep)` is called before each timed run; returning false cancels.
pub fn run(
    model: &Model,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str, usize) -> bool,
) -> Result<BenchReport> {
    let vocab = model.vocab_size() as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..vocab)).collect() };
    let mut lines = Vec::new();
    let reps = opts.repetitions.max(1);
    let depth = opts.n_depth;
    let longest = depth.saturating_add(opts.n_prompt.max(opts.n_gen));
    model.check_context(longest.max(1), true)?;
    let context = tokens(depth);
    let name = |t: String| {
        if depth > 0 {
            format!("{t} @ d{depth}")
        } else {
            t
        }
    };
    // A cache for `n` more tokens holding the context.
    let start = |n: usize| -> Result<crate::infer::KvCache> {
        let mut cache = model.new_cache(depth + n);
        if depth > 0 {
            model.forward(&context, &mut cache, Logits::None)?;
        }
        Ok(cache)
    };
    if opts.n_prompt > 0 {
        let test = name(format!("pp{}", opts.n_prompt));
        let mut cache = start(opts.n_prompt)?;
        let mut speeds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            if !progress(&test, rep) {
                return Err(Error::Cancelled);
            }
            let prompt = tokens(opts.n_prompt);
            cache.truncate(depth);
            let t0 = Instant::now();
            model.forward(&prompt, &mut cache, Logits::Last)?;
            let secs = t0.elapsed().as_secs_f64();
            if rep > 0 {
                speeds.push(opts.n_prompt as f64 / secs);
            }
        }
        lines.push(line(test, &speeds));
    }
    if opts.n_gen > 0 {
        let test = name(format!("tg{}", opts.n_gen));
        let mut cache = start(opts.n_gen + 1)?;
        let mut speeds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            if !progress(&test, rep) {
                return Err(Error::Cancelled);
            }
            let gen = tokens(opts.n_gen);
            cache.truncate(depth);
            let t0 = Instant::now();
            for &t in &gen {
                model.forward(&[t], &mut cache, Logits::Last)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            if rep > 0 {
                speeds.push(opts.n_gen as f64 / secs);
            }
        }
        lines.push(line(test, &speeds));
    }
    let kernels = match model.linear(0, LinearKind::Gate) {
        Some(w) if opts.n_prompt > 0 => kernel_lines(model.backend(), w, opts.n_prompt, reps)?,
        _ => Vec::new(),
    };
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        backend: model.backend().describe(),
        numerics: model.numerics().name().to_owned(),
        lines,
        kernels,
    })
}

/// Best of `reps` timings of `f` (after one warm-up run, which also uploads the weight to a GPU).
fn best_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn kernel_lines(backend: Backend, w: &TensorRef, n: usize, reps: usize) -> Result<Vec<KernelLine>> {
    let (rows, cols) = (w.rows(), w.cols());
    let ty = w.type_label();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x: Vec<f32> = (0..n * cols).map(|_| rng.gen::<f32>() - 0.5).collect();
    let mut out = vec![0.0f32; n * rows];
    let mm = best_secs(reps, || {
        backend.matmul(w, &x, n, &mut out);
        Ok(())
    })?;
    let mv = best_secs(reps, || {
        backend.matmul(w, &x[..cols], 1, &mut out[..rows]);
        Ok(())
    })?;
    let dq = match backend {
        Backend::Cpu => best_secs(reps, || {
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                w.dequant_row(r, &mut row);
            }
            Ok(())
        })?,
        Backend::Gpu => {
            let g = crate::backend::wgpu::gpu()?;
            best_secs(reps, || g.time_dequant(w).map(|_| ()))?
        }
    };
    // GPTQ of this weight as a layer's worth: the Hessian of n random input rows on this backend, then the
    // solver (4-bit, groups of 128 or the whole row, act-order).
    let gptq = {
        let t0 = Instant::now();
        let mut h = crate::solvers::gptq::Hessian::new(cols);
        match backend {
            Backend::Gpu => {
                let g = crate::backend::wgpu::gpu()?.gram(&x, n, cols)?;
                h.add_gram(&g, n)?;
            }
            Backend::Cpu => h.add_batch(&x, n)?,
        }
        let opts = crate::solvers::gptq::GptqOptions {
            bits: 4,
            group_size: (cols % 128 == 0).then_some(128),
            act_order: true,
            backend,
            ..Default::default()
        };
        crate::solvers::gptq::gptq_quantize(&w.to_f32(), rows, cols, &h, &opts)?;
        t0.elapsed().as_secs_f64()
    };
    let bytes = w.stored_bytes() as f64;
    let memory = match backend {
        Backend::Cpu => Some(memory_read_gbs(reps)?),
        Backend::Gpu => None,
    };
    let mut lines = vec![
        KernelLine {
            test: format!("GPTQ 4-bit of {rows}×{cols} ({n} input rows, Hessian and lazy updates on this backend)"),
            value: gptq,
            unit: "s",
        },
        KernelLine {
            test: format!("matmul {ty} {rows}×{cols} · {n} tokens"),
            value: 2.0 * (n * rows * cols) as f64 / mm / 1e9,
            unit: "GFLOP/s",
        },
        KernelLine {
            test: format!("matvec {ty} {rows}×{cols} (decoding)"),
            value: bytes / mv / 1e9,
            unit: "GB/s",
        },
        KernelLine {
            test: format!("dequantise {ty} {rows}×{cols}"),
            value: bytes / dq / 1e9,
            unit: "GB/s",
        },
    ];
    if let Some(gbs) = memory {
        lines.push(KernelLine {
            test: format!(
                "memory read, {} threads (the decoding ceiling)",
                rayon::current_num_threads()
            ),
            value: gbs,
            unit: "GB/s",
        });
    }
    Ok(lines)
}

/// This machine's memory read bandwidth: each thread sums its share of a 512 MiB buffer (far past any
/// cache) as eight interleaved streams, prefetched 4 KiB ahead (more misses in flight than one stream:
/// on the 2-core Zen 4 this project is measured on, one stream per thread reads 29 GB/s, eight 32), best
/// of `reps`.
fn memory_read_gbs(reps: usize) -> Result<f64> {
    use rayon::prelude::*;
    const BYTES: usize = 512 << 20;
    let buf = vec![1u64; BYTES / 8];
    let share = (buf.len() / rayon::current_num_threads().max(1)).next_multiple_of(STREAMS * 8);
    let secs = best_secs(reps, || {
        let s: u64 = buf.par_chunks(share).map(read_streams).sum();
        assert_eq!(s, (BYTES / 8) as u64, "every word read once");
        Ok(())
    })?;
    Ok(BYTES as f64 / secs / 1e9)
}

/// Streams [`read_streams`] interleaves.
const STREAMS: usize = 8;

/// The wrapping sum of `c`, read as [`STREAMS`] interleaved streams a cache line at a time.
fn read_streams(c: &[u64]) -> u64 {
    const LINE: usize = 8;
    const AHEAD: usize = 4096 / 8;
    let sub = c.len() / STREAMS / LINE * LINE;
    let mut acc = [0u64; STREAMS];
    for off in (0..sub).step_by(LINE) {
        for (s, a) in acc.iter_mut().enumerate() {
            let at = s * sub + off;
            #[cfg(target_arch = "x86_64")]
            if off + AHEAD < sub {
                // SAFETY: a prefetch hint inside the slice (it never faults).
                #[allow(unsafe_code)]
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(c.as_ptr().add(at + AHEAD).cast());
                }
            }
            *a = c[at..at + LINE].iter().fold(*a, |x, &v| x.wrapping_add(v));
        }
    }
    let rest = c[STREAMS * sub..]
        .iter()
        .fold(0u64, |x, &v| x.wrapping_add(v));
    acc.iter().fold(rest, |x, &v| x.wrapping_add(v))
}

fn line(test: String, speeds: &[f64]) -> BenchLine {
    let n = speeds.len() as f64;
    let mean = speeds.iter().sum::<f64>() / n;
    let var = if speeds.len() > 1 {
        speeds.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    BenchLine {
        test,
        tokens_per_sec_mean: mean,
        tokens_per_sec_std: var.sqrt(),
        repetitions: speeds.len(),
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "backend: {} · arithmetic: {}",
            self.backend, self.numerics
        )?;
        writeln!(f, "| test   | threads |          t/s |")?;
        writeln!(f, "| ------ | ------: | -----------: |")?;
        for l in &self.lines {
            writeln!(
                f,
                "| {:6} | {:7} | {:7.2} ± {:.2} |",
                l.test, self.threads, l.tokens_per_sec_mean, l.tokens_per_sec_std
            )?;
        }
        for k in &self.kernels {
            writeln!(f, "{:66} {:10.2} {}", k.test, k.value, k.unit)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_statistics() {
        let l = line("pp4".into(), &[10.0, 12.0, 14.0]);
        assert!((l.tokens_per_sec_mean - 12.0).abs() < 1e-12);
        assert!((l.tokens_per_sec_std - 2.0).abs() < 1e-12);
        assert_eq!(l.repetitions, 3);
    }

    /// With a depth both tests start from that context (named as llama-bench names them), and a context
    /// no memory holds is refused before anything runs.
    #[test]
    fn depth_runs_both_tests_after_the_context() {
        use crate::model::fixture::{fixture_tensor_refs, FixtureSpec};
        let spec = FixtureSpec::tiny_llama();
        let tensors = fixture_tensor_refs(&spec).expect("tensors");
        let model = Model::from_parts(std::path::Path::new("fixture"), &spec.config(), &tensors)
            .expect("model");
        let opts = BenchOptions {
            n_prompt: 5,
            n_gen: 3,
            n_depth: 9,
            repetitions: 1,
            ..BenchOptions::default()
        };
        let mut seen = Vec::new();
        let report = run(&model, &opts, &mut |t, rep| {
            seen.push((t.to_owned(), rep));
            true
        })
        .expect("bench");
        let names: Vec<&str> = report.lines.iter().map(|l| l.test.as_str()).collect();
        assert_eq!(names, ["pp5 @ d9", "tg3 @ d9"]);
        assert!(report.lines.iter().all(|l| l.tokens_per_sec_mean > 0.0));
        assert_eq!(
            seen.len(),
            4,
            "a warm-up and one timed run per test: {seen:?}"
        );
        let absurd = BenchOptions {
            n_depth: usize::MAX / 2,
            ..opts
        };
        let err = run(&model, &absurd, &mut |_, _| panic!("nothing may run"))
            .expect_err("an absurd depth is refused");
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }
}
