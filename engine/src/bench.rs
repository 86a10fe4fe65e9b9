//! Speed benchmark in llama-bench's terms: `pp` (a prompt of N tokens processed as one batch) and `tg` (N
//! tokens decoded one at a time), tokens per second, mean ± standard deviation over repetitions.
//!
//! Like llama-bench, the tokens are random ids (the speed does not depend on them) and each repetition
//! starts from an empty KV cache.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::infer::{Logits, Model};
use crate::{Error, Result};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Prompt length for the `pp` test (0 skips it).
    pub n_prompt: usize,
    /// Tokens generated for the `tg` test (0 skips it).
    pub n_gen: usize,
    /// Repetitions of each test (after one untimed warm-up run).
    pub repetitions: usize,
    /// Where the arithmetic runs.
    pub backend: crate::backend::Backend,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            n_prompt: 512,
            n_gen: 128,
            repetitions: 3,
            backend: crate::backend::Backend::Cpu,
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

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub lines: Vec<BenchLine>,
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
    if opts.n_prompt > 0 {
        let test = format!("pp{}", opts.n_prompt);
        let mut cache = model.new_cache(opts.n_prompt);
        let mut speeds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            if !progress(&test, rep) {
                return Err(Error::Cancelled);
            }
            let prompt = tokens(opts.n_prompt);
            cache.clear();
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
        let test = format!("tg{}", opts.n_gen);
        let mut cache = model.new_cache(opts.n_gen + 1);
        let mut speeds = Vec::with_capacity(reps);
        for rep in 0..=reps {
            if !progress(&test, rep) {
                return Err(Error::Cancelled);
            }
            let gen = tokens(opts.n_gen);
            cache.clear();
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
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        lines,
    })
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
        writeln!(f, "| test   | threads |          t/s |")?;
        writeln!(f, "| ------ | ------: | -----------: |")?;
        for l in &self.lines {
            writeln!(
                f,
                "| {:6} | {:7} | {:7.2} ± {:.2} |",
                l.test, self.threads, l.tokens_per_sec_mean, l.tokens_per_sec_std
            )?;
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
}
