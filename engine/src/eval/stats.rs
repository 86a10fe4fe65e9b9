//! The numerics of `llama-perplexity`, one function per formula, so each can be tested by hand.
//!
//! Precision follows llama.cpp on purpose (it changes the last printed digits): exponentials in `f32`,
//! the sum of exponentials in `f64`, per-token values such as the KL term in `f32` and their running sums
//! in `f64`. Percentiles interpolate in `f32` as `llama-perplexity` does.

use serde::{Deserialize, Serialize};

/// A value and its (one standard error) uncertainty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueUnc {
    pub value: f64,
    /// One standard error; 0 when too few samples to estimate it (as llama.cpp).
    pub unc: f64,
}

impl ValueUnc {
    pub fn new(value: f64, unc: f64) -> Self {
        Self { value, unc }
    }
}

/// Mean of `count` samples from their sum and sum of squares, with the standard error of the mean
/// `sqrt((E[x²] − E[x]²) / (count − 1))`. As llama.cpp's `mean_and_uncertainty`: the uncertainty is 0
/// unless `count > 10` and the variance is positive; everything is 0 for `count == 0`.
pub fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> ValueUnc {
    if count == 0 {
        return ValueUnc::default();
    }
    let n = count as f64;
    let mean = sum / n;
    let var = sum2 / n - mean * mean;
    let unc = if var > 0.0 && count > 10 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    ValueUnc::new(mean, unc)
}

/// Covariance of the two sample means, `(E[xy] − E[x]E[y]) / (count − 1)`; 0 when `count < 10` (llama.cpp's
/// `covariance`).
pub fn covariance(sum1: f64, sum2: f64, sum12: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sum12 / n - (sum1 / n) * (sum2 / n)) / (n - 1.0)
}

/// The value at `fraction` (0..=1) of ascending `sorted`, interpolating linearly between neighbours at
/// position `fraction · (N − 1)` — `llama-perplexity`'s percentile, computed in `f32` as it is there.
/// Fractions ≤ 0 give the first value and ≥ 1 the last. `NaN` for an empty slice.
pub fn percentile(sorted: &[f32], fraction: f32) -> f32 {
    let (Some(&first), Some(&last)) = (sorted.first(), sorted.last()) else {
        return f32::NAN;
    };
    if fraction <= 0.0 {
        return first;
    }
    if fraction >= 1.0 {
        return last;
    }
    let pos = fraction * (sorted.len() - 1) as f32;
    let ip = pos as usize;
    let frac = pos - ip as f32;
    let hi = sorted[(ip + 1).min(sorted.len() - 1)];
    (1.0 - frac) * sorted[ip] + frac * hi
}

/// The median of ascending `sorted`: the middle value, or the mean of the two middle values for an even
/// count (as `llama-perplexity`, which does not use [`percentile`] for it). `NaN` for an empty slice.
pub fn median(sorted: &[f32]) -> f32 {
    let n = sorted.len();
    if n == 0 {
        f32::NAN
    } else if n & 1 == 0 {
        0.5 * (sorted[n / 2] + sorted[n / 2 - 1])
    } else {
        sorted[n / 2]
    }
}

/// Sorts ascending; `NaN`s (which a broken model could produce) go last instead of panicking.
pub fn sort_values(values: &mut [f32]) {
    values.sort_by(f32::total_cmp);
}

/// The facts of one logits row that every log-probability needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSoftmax {
    /// The largest logit.
    pub max: f32,
    /// Index of the first largest logit.
    pub argmax: usize,
    /// `Σ exp(logit − max)`, exps in `f32`, the sum in `f64`.
    pub sum_exp: f64,
}

impl RowSoftmax {
    /// Scans `logits` (must not be empty).
    pub fn of(logits: &[f32]) -> Self {
        let mut max = logits[0];
        let mut argmax = 0;
        for (i, &l) in logits.iter().enumerate().skip(1) {
            if l > max {
                max = l;
                argmax = i;
            }
        }
        let sum_exp = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        Self {
            max,
            argmax,
            sum_exp,
        }
    }

    /// `−log softmax(logits)[target]` in `f64`: `−(logit[t] − max − ln Σ)`, as perplexity mode computes it.
    pub fn nll(&self, logits: &[f32], target: usize) -> f64 {
        -(f64::from(logits[target] - self.max) - self.sum_exp.ln())
    }

    /// `ln Σ` rounded to `f32` (KL-divergence mode keeps it in `f32`).
    pub fn log_sum_exp_f32(&self) -> f32 {
        self.sum_exp.ln() as f32
    }
}

/// The negative log-likelihood of `target` under `logits` (perplexity mode's formula).
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    RowSoftmax::of(logits).nll(logits, target)
}

/// One row of log-probabilities compressed to 16 bits exactly as `llama-perplexity
/// --kl-divergence-base` stores it: `log p_i ≈ scale · q_i + min_log_prob`, where the range is the top
/// 16 nats below the largest logit and everything below it is `q = 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLogProbs {
    pub scale: f32,
    pub min_log_prob: f32,
    pub q: Vec<u16>,
}

/// ggml's `nearest_int`: round to nearest, ties to even (for the magnitudes that occur here).
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

impl QuantizedLogProbs {
    /// Compresses one logits row (must not be empty).
    pub fn quantize(logits: &[f32]) -> Self {
        let soft = RowSoftmax::of(logits);
        Self::quantize_with(logits, &soft)
    }

    /// As [`quantize`](Self::quantize) with the row's softmax facts already computed.
    pub fn quantize_with(logits: &[f32], soft: &RowSoftmax) -> Self {
        let max = soft.max;
        let min = logits.iter().copied().fold(f32::INFINITY, f32::min);
        let min_logit = min.max(max - 16.0);
        let log_sum_exp = soft.log_sum_exp_f32();
        let min_log_prob = min_logit - max - log_sum_exp;
        let scale = (max - min_logit) / 65535.0;
        let q = if scale != 0.0 {
            let inv_scale = 1.0 / scale;
            logits
                .iter()
                .map(|&l| {
                    if l > min_logit {
                        nearest_int(inv_scale * (l - min_logit)).clamp(0, 65535) as u16
                    } else {
                        0
                    }
                })
                .collect()
        } else {
            vec![0; logits.len()]
        };
        Self {
            scale,
            min_log_prob,
            q,
        }
    }

    /// The decoded log-probability of token `i`.
    pub fn log_prob(&self, i: usize) -> f32 {
        self.scale * f32::from(self.q[i]) + self.min_log_prob
    }
}

/// How the base model's log-probabilities enter the KL-divergence statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseLogProbs {
    /// Compressed to 16 bits per token as llama.cpp's logits file stores them: the numbers match
    /// `llama-perplexity --kl-divergence` (the compression moves mean KLD in about the 4th significant digit).
    Quantized16,
    /// Full `f32` log-probabilities: what the KL divergence really is (same −16 cut-off).
    Full,
}

/// What one scored token contributes to the KL-divergence statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenKld {
    /// The variant's negative log-likelihood of the target (`f32`, as llama.cpp's KLD mode).
    pub nll: f32,
    /// The base model's negative log-likelihood of the target.
    pub nll_base: f32,
    /// `Σ_i p_base,i (log p_base,i − log q_i)` over tokens with `log p_base,i > −16`.
    pub kld: f64,
    /// The variant's and the base's most likely tokens agree (first maximum of each).
    pub same_top: bool,
    /// `p_variant(target) − p_base(target)`.
    pub p_diff: f32,
}

/// Tokens whose base log-probability is at or below this are left out of the KL sum (llama.cpp's −16).
pub const KLD_LOG_PROB_CUTOFF: f32 = -16.0;

/// The KL-divergence contribution of one position, given the variant's logits and the base's
/// log-probabilities as a function of the token index (`base_log_prob(i)`). This is llama.cpp's
/// `log_softmax(n_vocab, logits, base_log_prob, tok, kld)` of KLD mode.
pub fn token_kld(logits: &[f32], base_log_prob: impl Fn(usize) -> f32, target: usize) -> TokenKld {
    let soft = RowSoftmax::of(logits);
    let log_sum_exp = soft.log_sum_exp_f32();
    let nll = soft.max + log_sum_exp - logits[target];
    let nll_base = -base_log_prob(target);
    // log q_i = logits[i] − max_plus_lse
    let max_plus_lse = soft.max + log_sum_exp;
    let mut kld = 0.0f64;
    let mut imax_base = 0usize;
    let mut max_base = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        let lp_base = base_log_prob(i);
        if i == 0 || lp_base > max_base {
            max_base = lp_base;
            imax_base = i;
        }
        if lp_base > KLD_LOG_PROB_CUTOFF {
            let p_base = lp_base.exp();
            kld += f64::from(p_base * (lp_base - l + max_plus_lse));
        }
    }
    let p_diff = (-nll).exp() - (-nll_base).exp();
    TokenKld {
        nll,
        nll_base,
        kld,
        same_top: soft.argmax == imax_base,
        p_diff,
    }
}

/// The contributions of one position under both treatments of the base log-probabilities.
pub fn token_kld_both(base_logits: &[f32], logits: &[f32], target: usize) -> (TokenKld, TokenKld) {
    let base = RowSoftmax::of(base_logits);
    let quant = QuantizedLogProbs::quantize_with(base_logits, &base);
    let q16 = token_kld(logits, |i| quant.log_prob(i), target);
    let base_shift = base.max + base.log_sum_exp_f32();
    let full = token_kld(logits, |i| base_logits[i] - base_shift, target);
    (q16, full)
}

/// Running sums for perplexity: Σ nll, Σ nll², count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NllSums {
    pub nll: f64,
    pub nll2: f64,
    pub count: usize,
}

impl NllSums {
    pub fn add(&mut self, nll: f64) {
        self.nll += nll;
        self.nll2 += nll * nll;
        self.count += 1;
    }

    /// `exp(mean nll)`; NaN before any token.
    pub fn ppl(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            (self.nll / self.count as f64).exp()
        }
    }

    /// llama-perplexity's final estimate: `(PPL, PPL · sqrt(var / (count − 1)))`, with `var = E[nll²] −
    /// E[nll]²`. The error is NaN when it cannot be estimated (fewer than two tokens or var ≤ 0, where
    /// llama.cpp prints "Unexpected negative standard deviation").
    pub fn final_estimate(&self) -> (f64, f64) {
        let ppl = self.ppl();
        if self.count < 2 {
            return (ppl, f64::NAN);
        }
        let n = self.count as f64;
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        let err = if var > 0.0 {
            (var / (n - 1.0)).sqrt() * ppl
        } else {
            f64::NAN
        };
        (ppl, err)
    }
}

/// Running sums and per-token values for the KL-divergence statistics (llama.cpp's
/// `kl_divergence_result` plus the value lists it sorts at the end).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KldSums {
    pub sum_nll: f64,
    pub sum_nll2: f64,
    pub sum_nll_base: f64,
    pub sum_nll_base2: f64,
    pub sum_nll_nll_base: f64,
    pub sum_kld: f64,
    pub sum_kld2: f64,
    pub sum_p_diff: f64,
    pub sum_p_diff2: f64,
    pub sum_p_diff4: f64,
    pub max_abs_p_diff: f32,
    pub n_same_top: usize,
    pub count: usize,
    /// Every token's KLD (as `f32`), in order of scoring.
    pub kld_values: Vec<f32>,
    /// Every token's Δp, in order of scoring.
    pub p_diff_values: Vec<f32>,
}

impl KldSums {
    pub fn add(&mut self, t: &TokenKld) {
        let (nll, nll_base) = (f64::from(t.nll), f64::from(t.nll_base));
        self.sum_nll += nll;
        self.sum_nll2 += f64::from(t.nll * t.nll);
        self.sum_nll_base += nll_base;
        self.sum_nll_base2 += f64::from(t.nll_base * t.nll_base);
        self.sum_nll_nll_base += f64::from(t.nll * t.nll_base);
        self.sum_kld += t.kld;
        self.sum_kld2 += t.kld * t.kld;
        let p_diff2 = f64::from(t.p_diff * t.p_diff);
        self.sum_p_diff += f64::from(t.p_diff);
        self.sum_p_diff2 += p_diff2;
        self.sum_p_diff4 += p_diff2 * p_diff2;
        self.max_abs_p_diff = self.max_abs_p_diff.max(t.p_diff.abs());
        self.n_same_top += usize::from(t.same_top);
        self.count += 1;
        self.kld_values.push(t.kld as f32);
        self.p_diff_values.push(t.p_diff);
    }

    /// The ln-perplexity of the variant and of the base, their covariance, and the ratio.
    fn ppl_stats(&self) -> PplComparison {
        let log_ppl = mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count);
        let log_ppl_base = mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count);
        let cov = covariance(
            self.sum_nll,
            self.sum_nll_base,
            self.sum_nll_nll_base,
            self.count,
        );
        let ppl = log_ppl.value.exp();
        let ppl_base = log_ppl_base.value.exp();
        let ppl_unc = ppl * log_ppl.unc;
        let ppl_base_unc = ppl_base * log_ppl_base.unc;
        let ratio_val = log_ppl.value - log_ppl_base.value;
        // llama.cpp takes the square root as it is and prints `nan` when rounding makes the variance of
        // the difference negative (two nearly identical models); we clamp it at 0.
        let ratio_unc = (log_ppl.unc * log_ppl.unc + log_ppl_base.unc * log_ppl_base.unc
            - 2.0 * cov)
            .max(0.0)
            .sqrt();
        let ppl_cov = ppl * ppl_base * cov;
        PplComparison {
            ppl: ValueUnc::new(ppl, ppl_unc),
            ppl_base: ValueUnc::new(ppl_base, ppl_base_unc),
            ln_ppl_correlation: cov / (log_ppl.unc * log_ppl_base.unc),
            ln_ppl_ratio: ValueUnc::new(ratio_val, ratio_unc),
            ppl_ratio: ValueUnc::new(ratio_val.exp(), ratio_val.exp() * ratio_unc),
            ppl_diff: ValueUnc::new(
                ppl - ppl_base,
                (ppl_unc * ppl_unc + ppl_base_unc * ppl_base_unc - 2.0 * ppl_cov)
                    .max(0.0)
                    .sqrt(),
            ),
        }
    }

    /// `sqrt(mean Δp²)` with uncertainty `0.5 / rms · unc(Δp²)`.
    fn rms_p_diff(&self) -> ValueUnc {
        let mse = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count);
        let rms = mse.value.sqrt();
        ValueUnc::new(rms, 0.5 / rms * mse.unc)
    }

    /// Fraction of positions whose top tokens agree, with binomial uncertainty `sqrt(p(1−p)/(n−1))`.
    fn same_top(&self) -> ValueUnc {
        if self.count == 0 {
            return ValueUnc::default();
        }
        let p = self.n_same_top as f64 / self.count as f64;
        let unc = if self.count > 1 {
            (p * (1.0 - p) / (self.count - 1) as f64).sqrt()
        } else {
            0.0
        };
        ValueUnc::new(p, unc)
    }

    /// The columns of llama-perplexity's per-chunk KLD line, from the sums so far.
    pub fn chunk_line(&self) -> KldChunkLine {
        let c = self.ppl_stats();
        KldChunkLine {
            ppl: c.ppl,
            ln_ppl_ratio: c.ln_ppl_ratio,
            kld: mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count),
            rms_p_diff: self.rms_p_diff(),
            same_top: self.same_top(),
        }
    }

    /// The final statistics (sorts copies of the value lists).
    pub fn stats(&self) -> KldStats {
        let mut kld = self.kld_values.clone();
        sort_values(&mut kld);
        let mut dp = self.p_diff_values.clone();
        sort_values(&mut dp);
        let c = self.ppl_stats();
        let pct = |v: &[f32], f: f32| f64::from(percentile(v, f));
        KldStats {
            count: self.count,
            ppl: c.ppl,
            ppl_base: c.ppl_base,
            ln_ppl_correlation: c.ln_ppl_correlation,
            ln_ppl_ratio: c.ln_ppl_ratio,
            ppl_ratio: c.ppl_ratio,
            ppl_diff: c.ppl_diff,
            kld: KldDistribution {
                mean: mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count),
                max: pct(&kld, 1.0),
                p99_9: pct(&kld, 0.999),
                p99: pct(&kld, 0.99),
                p95: pct(&kld, 0.95),
                p90: pct(&kld, 0.90),
                median: f64::from(median(&kld)),
                p10: pct(&kld, 0.10),
                p5: pct(&kld, 0.05),
                p1: pct(&kld, 0.01),
                p0_1: pct(&kld, 0.001),
                min: pct(&kld, 0.0),
            },
            p_diff: PDiffDistribution {
                mean: mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, self.count),
                max: pct(&dp, 1.0),
                p99_9: pct(&dp, 0.999),
                p99: pct(&dp, 0.99),
                p95: pct(&dp, 0.95),
                p90: pct(&dp, 0.90),
                p75: pct(&dp, 0.75),
                median: f64::from(median(&dp)),
                p25: pct(&dp, 0.25),
                p10: pct(&dp, 0.10),
                p5: pct(&dp, 0.05),
                p1: pct(&dp, 0.01),
                p0_1: pct(&dp, 0.001),
                min: pct(&dp, 0.0),
            },
            rms_p_diff: self.rms_p_diff(),
            max_abs_p_diff: f64::from(self.max_abs_p_diff),
            same_top: self.same_top(),
        }
    }
}

struct PplComparison {
    ppl: ValueUnc,
    ppl_base: ValueUnc,
    ln_ppl_correlation: f64,
    ln_ppl_ratio: ValueUnc,
    ppl_ratio: ValueUnc,
    ppl_diff: ValueUnc,
}

/// The running columns llama-perplexity prints after each KLD chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KldChunkLine {
    /// PPL of the variant.
    pub ppl: ValueUnc,
    /// `ln(PPL(Q)/PPL(base))`, uncertainty with the covariance term.
    pub ln_ppl_ratio: ValueUnc,
    /// Mean KL divergence (nats).
    pub kld: ValueUnc,
    /// RMS of Δp (a probability, not a percentage).
    pub rms_p_diff: ValueUnc,
    /// Fraction of positions with the same top token.
    pub same_top: ValueUnc,
}

/// Distribution of the per-token KL divergence (nats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KldDistribution {
    pub mean: ValueUnc,
    pub max: f64,
    pub p99_9: f64,
    pub p99: f64,
    pub p95: f64,
    pub p90: f64,
    pub median: f64,
    pub p10: f64,
    pub p5: f64,
    pub p1: f64,
    pub p0_1: f64,
    pub min: f64,
}

/// Distribution of Δp = p_variant(target) − p_base(target) (probabilities, not percentages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PDiffDistribution {
    pub mean: ValueUnc,
    pub max: f64,
    pub p99_9: f64,
    pub p99: f64,
    pub p95: f64,
    pub p90: f64,
    pub p75: f64,
    pub median: f64,
    pub p25: f64,
    pub p10: f64,
    pub p5: f64,
    pub p1: f64,
    pub p0_1: f64,
    pub min: f64,
}

/// Everything llama-perplexity prints at the end of a KL-divergence run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KldStats {
    /// Scored tokens.
    pub count: usize,
    /// PPL of the variant ("Mean PPL(Q)").
    pub ppl: ValueUnc,
    /// PPL of the base ("Mean PPL(base)").
    pub ppl_base: ValueUnc,
    /// Correlation of the two ln PPL estimates (a fraction; llama.cpp prints it as %).
    pub ln_ppl_correlation: f64,
    pub ln_ppl_ratio: ValueUnc,
    pub ppl_ratio: ValueUnc,
    pub ppl_diff: ValueUnc,
    pub kld: KldDistribution,
    pub p_diff: PDiffDistribution,
    pub rms_p_diff: ValueUnc,
    pub max_abs_p_diff: f64,
    pub same_top: ValueUnc,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn mean_and_uncertainty_by_hand() {
        // 12 samples: six 1s and six 3s → mean 2, E[x²] = 5, var = 1, unc = sqrt(1/11).
        let xs = [1.0, 3.0].repeat(6);
        let s: f64 = xs.iter().sum();
        let s2: f64 = xs.iter().map(|x| x * x).sum();
        let r = mean_and_uncertainty(s, s2, xs.len());
        assert_eq!(r.value, 2.0);
        assert!(close(r.unc, (1.0f64 / 11.0).sqrt(), 1e-12));
        // ≤ 10 samples: no uncertainty.
        let r = mean_and_uncertainty(10.0, 50.0, 5);
        assert_eq!(r, ValueUnc::new(2.0, 0.0));
        assert_eq!(mean_and_uncertainty(1.0, 1.0, 0), ValueUnc::default());
    }

    #[test]
    fn covariance_by_hand() {
        // x = 0..10 (10 values), y = 2x: E[xy] = 2·28.5 = 57, E[x]E[y] = 4.5·9 = 40.5 → (57−40.5)/9.
        let xs: Vec<f64> = (0..10).map(f64::from).collect();
        let s1: f64 = xs.iter().sum();
        let s2: f64 = xs.iter().map(|x| 2.0 * x).sum();
        let s12: f64 = xs.iter().map(|x| 2.0 * x * x).sum();
        assert!(close(covariance(s1, s2, s12, 10), 16.5 / 9.0, 1e-12));
        assert_eq!(covariance(s1, s2, s12, 9), 0.0);
    }

    #[test]
    fn percentile_interpolates_like_llama_cpp() {
        let v = [0.0f32, 1.0, 2.0, 3.0, 10.0];
        assert_eq!(percentile(&v, 0.0), 0.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        assert_eq!(percentile(&v, 0.5), 2.0);
        // position 0.9·4 = 3.6 → 0.4·3 + 0.6·10 = 7.2
        assert!((percentile(&v, 0.9) - 7.2).abs() < 1e-5);
        // position 0.1·4 = 0.4 → 0.4
        assert!((percentile(&v, 0.1) - 0.4).abs() < 1e-6);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(percentile(&[5.0], 0.3), 5.0);
    }

    #[test]
    fn median_even_and_odd() {
        assert_eq!(median(&[1.0, 2.0, 4.0, 8.0]), 3.0);
        assert_eq!(median(&[1.0, 2.0, 4.0]), 2.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn nll_of_uniform_and_two_way_rows() {
        // Uniform over 4 → nll = ln 4.
        assert!(close(token_nll(&[0.5; 4], 2), 4f64.ln(), 1e-7));
        // logits [0, ln 3]: p = [1/4, 3/4].
        let l = [0.0f32, 3f32.ln()];
        assert!(close(token_nll(&l, 0), 4f64.ln(), 1e-6));
        assert!(close(token_nll(&l, 1), (4.0f64 / 3.0).ln(), 1e-6));
        // Max subtraction keeps huge logits finite.
        let big = [1000.0f32, 1000.0];
        assert!(close(token_nll(&big, 1), 2f64.ln(), 1e-7));
    }

    #[test]
    fn row_softmax_takes_the_first_maximum() {
        let s = RowSoftmax::of(&[1.0, 3.0, 3.0, 2.0]);
        assert_eq!(s.argmax, 1);
        assert_eq!(s.max, 3.0);
    }

    #[test]
    fn quantized_log_probs_round_trip_within_half_a_step() {
        let logits = [2.0f32, -1.0, 0.5, 7.0, -20.0, 6.9];
        let q = QuantizedLogProbs::quantize(&logits);
        // Range: max 7, min logit clipped to 7 − 16 = −9.
        assert!((q.scale - 16.0 / 65535.0).abs() < 1e-9);
        let s = RowSoftmax::of(&logits);
        let lse = s.sum_exp.ln() as f32;
        assert!((q.min_log_prob - (-9.0 - 7.0 - lse)).abs() < 1e-5);
        assert_eq!(q.q[3], 65535);
        assert_eq!(q.q[4], 0); // below the range
        for i in [0usize, 1, 2, 3, 5] {
            let exact = logits[i] - 7.0 - lse;
            assert!(
                (q.log_prob(i) - exact).abs() <= q.scale * 0.5 + 1e-5,
                "token {i}"
            );
        }
        // A flat row has scale 0 and decodes to −ln n.
        let flat = QuantizedLogProbs::quantize(&[1.0; 8]);
        assert_eq!(flat.scale, 0.0);
        assert!((flat.log_prob(5) + 8f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn token_kld_by_hand() {
        // base p = [1/2, 1/2], variant q = [1/4, 3/4], target 1.
        // KL = ½ ln(½ / ¼) + ½ ln(½ / ¾) = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3).
        let base = [0.0f32, 0.0];
        let var = [0.0f32, 3f32.ln()];
        let (q16, full) = token_kld_both(&base, &var, 1);
        for t in [q16, full] {
            assert!(close(t.kld, 0.5 * (4.0f64 / 3.0).ln(), 1e-6), "{t:?}");
            assert!(close(f64::from(t.nll), (4.0f64 / 3.0).ln(), 1e-6));
            assert!(close(f64::from(t.nll_base), 2f64.ln(), 1e-6));
            assert!(close(f64::from(t.p_diff), 0.25, 1e-6));
            // base argmax = 0 (first of equal), variant argmax = 1.
            assert!(!t.same_top);
        }
        // identical rows: KL 0, same top, Δp 0.
        let (q16, full) = token_kld_both(&var, &var, 0);
        assert!(full.kld.abs() < 1e-7 && full.same_top && full.p_diff.abs() < 1e-7);
        assert!(q16.kld.abs() < 1e-4 && q16.same_top);
    }

    #[test]
    fn kld_skips_base_tokens_below_minus_16() {
        // Base puts ~all mass on token 0; token 1 has log p ≈ −30: excluded from the sum.
        let base = [0.0f32, -30.0];
        let var = [0.0f32, 0.0];
        let t = token_kld(&var, |i| base[i], 0);
        // Only token 0: p=1 · (0 − ln ½) = ln 2.
        assert!(close(t.kld, 2f64.ln(), 1e-6));
    }

    #[test]
    fn nll_sums_final_estimate_by_hand() {
        let mut s = NllSums::default();
        for x in [1.0, 3.0] {
            s.add(x);
        }
        // mean 2, var = 5 − 4 = 1, err = sqrt(1/1) · e².
        let (ppl, err) = s.final_estimate();
        assert!(close(ppl, 2f64.exp(), 1e-12));
        assert!(close(err, 2f64.exp(), 1e-12));
        let mut one = NllSums::default();
        one.add(1.0);
        assert!(one.final_estimate().1.is_nan());
    }

    #[test]
    fn kld_sums_statistics_by_hand() {
        let mut s = KldSums::default();
        // 20 tokens: KLD alternates 0.1 / 0.3, nll 1/2 for the variant vs 1 for the base, half same top.
        for i in 0..20 {
            let odd = i % 2 == 1;
            s.add(&TokenKld {
                nll: if odd { 2.0 } else { 1.0 },
                nll_base: 1.0,
                kld: if odd { 0.3 } else { 0.1 },
                same_top: odd,
                p_diff: if odd { -0.2 } else { 0.2 },
            });
        }
        let st = s.stats();
        assert_eq!(st.count, 20);
        assert!(close(st.kld.mean.value, 0.2, 1e-12));
        // var = E[k²] − 0.04 = 0.05 − 0.04 = 0.01 → unc = sqrt(0.01/19)
        assert!(close(st.kld.mean.unc, (0.01f64 / 19.0).sqrt(), 1e-9));
        assert!(close(st.kld.max, 0.3, 1e-6));
        assert!(close(st.kld.min, 0.1, 1e-6));
        assert!(close(st.kld.median, 0.2, 1e-6));
        // ppl(Q) = e^{1.5}, ppl(base) = e.
        assert!(close(st.ppl.value, 1.5f64.exp(), 1e-12));
        assert!(close(st.ppl_base.value, 1f64.exp(), 1e-12));
        assert!(close(st.ln_ppl_ratio.value, 0.5, 1e-12));
        // the base is constant: its unc is 0, cov is 0, ratio unc = unc(ln PPL(Q)) = sqrt(0.25/19).
        assert!(close(st.ln_ppl_ratio.unc, (0.25f64 / 19.0).sqrt(), 1e-9));
        assert!(close(st.p_diff.mean.value, 0.0, 1e-9));
        assert!(close(st.rms_p_diff.value, 0.2, 1e-6));
        assert!(close(st.same_top.value, 0.5, 1e-12));
        assert!(close(st.same_top.unc, (0.25f64 / 19.0).sqrt(), 1e-12));
        assert!(close(st.max_abs_p_diff, 0.2, 1e-6));
        let line = s.chunk_line();
        assert_eq!(line.kld, st.kld.mean);
        assert_eq!(line.same_top, st.same_top);
    }
}
