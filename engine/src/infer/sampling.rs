//! Choosing the next token from a row of logits.
//!
//! The steps and their order follow transformers' logits processors: repetition penalty (positive logits
//! divided, negative multiplied, once per distinct token of the recent history, as llama.cpp and
//! transformers do), then temperature, top-k, top-p, min-p, then a draw from a seeded RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. The default is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Logits are divided by this; `0` picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; `1` turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one's probability; `0` turns it off.
    pub min_p: f32,
    /// Penalty on tokens seen in the last `repeat_last_n` tokens; `1` turns it off.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at (`0`: none).
    pub repeat_last_n: usize,
    /// Seed of the random draw.
    pub seed: u64,
}

impl SamplerConfig {
    /// Every setting within its range, with a message that gives the range.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str, v: f32, range: &str| {
            Err(crate::Error::Invalid(format!("{what} {v}: use {range}")))
        };
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", self.temperature, "a number ≥ 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p, "a number in (0, 1] (1 = off)");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p, "a number in [0, 1] (0 = off)");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repeat-penalty",
                self.repetition_penalty,
                "a number > 0 (1 = off)",
            );
        }
        Ok(())
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding (the default).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether this configuration always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// A sampler with its own seeded random stream.
#[derive(Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
    logits: Vec<f32>,
    cands: Vec<(u32, f32)>,
    seen: Vec<u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            rng,
            logits: Vec::new(),
            cands: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Pick the next token from one row of `logits`; `history` holds the tokens so far (prompt and
    /// generated), the last `repeat_last_n` of which the repetition penalty looks at.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if let Some(id) = self.filter(logits, history) {
            return id;
        }
        let c = &self.cands;
        let m = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
        let total: f64 = c.iter().map(|x| f64::from((x.1 - m).exp())).sum();
        let mut r = self.rng.gen::<f64>() * total;
        for &(id, v) in c.iter() {
            r -= f64::from((v - m).exp());
            if r < 0.0 {
                return id;
            }
        }
        // Rounding left a sliver: the last candidate takes it.
        c.last().map_or(0, |x| x.0)
    }

    /// The distribution [`sample`](Self::sample) draws from for this row: `(id, probability)` of every token
    /// the filters keep, sorted by id, probabilities summing to 1 (greedy: the one token it picks).
    pub fn distribution(&mut self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        if let Some(id) = self.filter(logits, history) {
            return vec![(id, 1.0)];
        }
        let c = &self.cands;
        let m = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
        let total: f64 = c.iter().map(|x| f64::from((x.1 - m).exp())).sum();
        let mut d: Vec<(u32, f64)> = c
            .iter()
            .map(|&(id, v)| (id, f64::from((v - m).exp()) / total))
            .collect();
        d.sort_unstable_by_key(|x| x.0);
        d
    }

    /// A uniform draw in `[0, 1)` from this sampler's stream.
    pub fn uniform(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }

    /// Repetition penalty and temperature, then top-k, top-p and min-p into `self.cands`; returns the token
    /// when there is nothing to draw (greedy, or no finite logit).
    fn filter(&mut self, logits: &[f32], history: &[u32]) -> Option<u32> {
        let cfg = &self.cfg;
        self.logits.clear();
        self.logits.extend(
            logits
                .iter()
                .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
        );
        let l = &mut self.logits;
        if cfg.repetition_penalty != 1.0 && cfg.repeat_last_n > 0 {
            let recent = &history[history.len().saturating_sub(cfg.repeat_last_n)..];
            self.seen.clear();
            self.seen.extend_from_slice(recent);
            self.seen.sort_unstable();
            self.seen.dedup();
            apply_repetition_penalty(l, &self.seen, cfg.repetition_penalty);
        }
        if cfg.is_greedy() {
            return Some(argmax(l));
        }
        let inv_t = 1.0 / cfg.temperature;
        self.cands.clear();
        self.cands.extend(
            l.iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| (i as u32, v * inv_t)),
        );
        if self.cands.is_empty() {
            return Some(argmax(l));
        }
        let c = &mut self.cands;
        if cfg.top_k > 0 && cfg.top_k < c.len() {
            c.select_nth_unstable_by(cfg.top_k - 1, by_logit_desc);
            c.truncate(cfg.top_k);
        }
        if cfg.top_p < 1.0 {
            top_p_filter(c, cfg.top_p);
        }
        if cfg.min_p > 0.0 {
            min_p_filter(c, cfg.min_p);
        }
        None
    }
}

/// Descending by logit, ties to the lower id.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The most likely id (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each id of `tokens` (distinct) has its logit divided
/// by `penalty` when positive, multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], tokens: &[u32], penalty: f32) {
    for &t in tokens {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Sort `cands` by descending logit and keep the smallest head whose probability (softmax over `cands`)
/// reaches `p`; at least one candidate stays.
///
/// Only the head is sorted: the best 64 candidates are selected first, and the selection widens until
/// it holds enough probability, so a large vocabulary is not sorted in full at every step.
pub fn top_p_filter(cands: &mut Vec<(u32, f32)>, p: f32) {
    let len = cands.len();
    if len == 0 {
        return;
    }
    let m = cands.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
    let total: f64 = cands.iter().map(|x| f64::from((x.1 - m).exp())).sum();
    let p = f64::from(p);
    let mut k = len.min(64);
    loop {
        if k < len {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
        }
        cands[..k].sort_unstable_by(by_logit_desc);
        let mut cum = 0.0f64;
        for (i, x) in cands[..k].iter().enumerate() {
            cum += f64::from((x.1 - m).exp()) / total;
            if cum >= p {
                cands.truncate(i + 1);
                return;
            }
        }
        if k == len {
            return;
        }
        k = (k * 4).min(len);
    }
}

/// Keep the candidates whose probability is at least `min_p` × the largest probability.
pub fn min_p_filter(cands: &mut Vec<(u32, f32)>, min_p: f32) {
    let m = cands.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
    // p_i / p_max = exp(l_i - l_max)
    let floor = f64::from(min_p);
    cands.retain(|x| f64::from((x.1 - m).exp()) >= floor);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100)
            .map(|i| ((i * 37 % 101) as f32 / 10.0).sin() * 3.0)
            .collect()
    }

    #[test]
    fn greedy_is_argmax_with_first_tie() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], &[]), 1);
        let l = logits();
        assert_eq!(s.sample(&l, &[]), argmax(&l));
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_varies() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let l = logits();
        let run = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 3, "{a:?}");
        let b = run(&SamplerConfig { seed: 43, ..cfg });
        assert_ne!(a, b);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let l = logits();
        let mut s = Sampler::new(SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            seed: 7,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[]), argmax(&l));
        }
        // Through the general path too (top_k 1 with top_p set still keeps just the best).
        let mut c: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
        c.select_nth_unstable_by(0, by_logit_desc);
        c.truncate(1);
        assert_eq!(c[0].0, argmax(&l));
    }

    #[test]
    fn top_k_limits_the_support() {
        let l = logits();
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let top: Vec<u32> = order[..5].to_vec();
        let mut s = Sampler::new(SamplerConfig {
            temperature: 100.0,
            top_k: 5,
            seed: 1,
            ..Default::default()
        });
        let mut seen = Vec::new();
        for _ in 0..300 {
            let t = s.sample(&l, &[]);
            assert!(top.contains(&t), "{t}");
            seen.push(t);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn top_p_maths() {
        // probabilities 0.5, 0.25, 0.125, 0.125
        let ln = |p: f32| p.ln();
        let base = vec![
            (0u32, ln(0.125)),
            (1, ln(0.5)),
            (2, ln(0.125)),
            (3, ln(0.25)),
        ];
        let ids = |c: &[(u32, f32)]| c.iter().map(|x| x.0).collect::<Vec<_>>();
        let mut c = base.clone();
        top_p_filter(&mut c, 0.5);
        assert_eq!(ids(&c), vec![1]);
        let mut c = base.clone();
        top_p_filter(&mut c, 0.6);
        assert_eq!(ids(&c), vec![1, 3]);
        let mut c = base.clone();
        top_p_filter(&mut c, 0.8);
        assert_eq!(ids(&c), vec![1, 3, 0]);
        let mut c = base.clone();
        top_p_filter(&mut c, 0.0);
        assert_eq!(ids(&c), vec![1]);
        let mut c = base;
        top_p_filter(&mut c, 0.99);
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
        let l: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 5003) as f32 / 300.0).sin() * 4.0)
            .collect();
        for p in [0.1f32, 0.5, 0.9, 0.999] {
            let mut c: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            top_p_filter(&mut c, p);
            let mut full: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            full.sort_by(by_logit_desc);
            let m = full[0].1;
            let total: f64 = full.iter().map(|x| f64::from((x.1 - m).exp())).sum();
            let mut cum = 0.0;
            let keep = full
                .iter()
                .position(|x| {
                    cum += f64::from((x.1 - m).exp()) / total;
                    cum >= f64::from(p)
                })
                .map_or(full.len(), |i| i + 1);
            assert!(keep > 64 || p < 0.5, "the test should widen the selection");
            assert_eq!(c, full[..keep].to_vec(), "p = {p}");
        }
    }

    #[test]
    fn min_p_maths() {
        let ln = |p: f32| p.ln();
        let base = vec![
            (0u32, ln(0.125)),
            (1, ln(0.5)),
            (2, ln(0.05)),
            (3, ln(0.25)),
        ];
        let ids = |c: &[(u32, f32)]| {
            let mut v = c.iter().map(|x| x.0).collect::<Vec<_>>();
            v.sort_unstable();
            v
        };
        let mut c = base.clone();
        min_p_filter(&mut c, 0.5); // keeps p >= 0.25
        assert_eq!(ids(&c), vec![1, 3]);
        let mut c = base.clone();
        min_p_filter(&mut c, 0.2); // keeps p >= 0.1
        assert_eq!(ids(&c), vec![0, 1, 3]);
        let mut c = base;
        min_p_filter(&mut c, 1.0);
        assert_eq!(ids(&c), vec![1]);
        // Through the sampler: only the two survivors are ever drawn.
        let l = vec![ln(0.125), ln(0.5), ln(0.05), ln(0.25)];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            min_p: 0.5,
            seed: 3,
            ..Default::default()
        });
        for _ in 0..100 {
            assert!([1, 3].contains(&s.sample(&l, &[])));
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 1.0, 0.5];
        apply_repetition_penalty(&mut l, &[0, 1, 9], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.5]);
        // Within the sampler: once per distinct token, only the last `repeat_last_n`.
        let cfg = SamplerConfig {
            repetition_penalty: 4.0,
            repeat_last_n: 2,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg.clone());
        // Token 0 is best (3.0); penalised (0.75) it loses to token 2 (1.0)...
        assert_eq!(s.sample(&[3.0, -1.0, 1.0], &[5, 0, 0]), 2);
        // ...but an occurrence older than the window does not count.
        assert_eq!(s.sample(&[3.0, -1.0, 1.0], &[0, 5, 6]), 0);
        // A repeated token is penalised once (3 / 2 = 1.5 still beats 1.0), not once per occurrence.
        let mut s = Sampler::new(SamplerConfig {
            repetition_penalty: 2.0,
            ..cfg
        });
        assert_eq!(s.sample(&[3.0, -1.0, 1.0], &[5, 0, 0]), 0);
    }

    #[test]
    fn distribution_is_what_sample_draws_from() {
        let l = logits();
        let cfg = SamplerConfig {
            temperature: 0.7,
            top_k: 12,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.3,
            seed: 5,
            ..Default::default()
        };
        let history = [3u32, 17, 17, 40];
        let mut s = Sampler::new(cfg.clone());
        let d = s.distribution(&l, &history);
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0), "sorted by id");
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(d.len() > 1 && d.len() <= 12);
        let n = 40_000;
        let mut counts = std::collections::HashMap::new();
        for _ in 0..n {
            *counts.entry(s.sample(&l, &history)).or_insert(0usize) += 1;
        }
        for &(id, p) in &d {
            let f = counts.remove(&id).unwrap_or(0) as f64 / f64::from(n);
            assert!((f - p).abs() < 0.015, "token {id}: {f} vs {p}");
        }
        assert!(
            counts.is_empty(),
            "drawn outside the distribution: {counts:?}"
        );
        let mut g = Sampler::new(SamplerConfig::default());
        assert_eq!(g.distribution(&l, &[]), vec![(argmax(&l), 1.0)]);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let l = vec![0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        });
        let ones = (0..4000).filter(|_| s.sample(&l, &[]) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }
}
