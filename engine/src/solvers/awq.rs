//! AWQ's arithmetic (activation-aware weight quantization, Lin et al. 2023), as AutoAWQ and llm-compressor's
//! `AWQModifier` run it: asymmetric min–max group quantization, the per-input-channel scales
//! `s = x̄^α / w̄^(1−α)` (normalised by `√(max·min)`) tried over a grid of `α` ("duo scaling"), and the
//! per-group clipping search that shrinks each group's range while the group's partial outputs on
//! calibration tokens improve. The pipeline (`crate::quantize_awq`) decides what to score each candidate on.

use rayon::prelude::*;

/// A group quantization grid: `bits`-bit codes with a zero point per group of `group_size` inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwqGrid {
    pub bits: u8,
    pub group_size: usize,
}

/// One row's quantized groups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedRows {
    /// `[rows, cols]` codes in `0..2^bits`.
    pub codes: Vec<u8>,
    /// `[rows, groups]` scales, already rounded to f16 (what the files store and the loaders use).
    pub scales: Vec<f32>,
    /// `[rows, groups]` zero points in `0..2^bits`.
    pub zeros: Vec<u8>,
}

impl AwqGrid {
    fn maxq(self) -> f32 {
        f32::from((1u16 << self.bits) - 1)
    }

    /// Scale (f16-rounded) and zero point of one group: `s = max(max − min, 1e−5) / maxq`,
    /// `z = clamp(−round(min / s), 0, maxq)` (AutoAWQ's `pseudo_quantize_tensor` with zero points).
    #[inline]
    pub fn group_params(self, g: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in g {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let s = half::f16::from_f32((hi - lo).max(1e-5) / self.maxq()).to_f32();
        let z = (-(lo / s).round_ties_even()).clamp(0.0, self.maxq());
        (s, z)
    }

    /// The code of `v` in a group with scale `s` and zero `z`.
    #[inline]
    pub fn code(self, v: f32, s: f32, z: f32) -> f32 {
        // = (round(v/s) + z) clamped to 0..=maxq (z is a whole number), without a libm call.
        crate::simd::round_even((v / s).clamp(-z, self.maxq() - z)) + z
    }

    /// Quantize then dequantise one group in place, rounding each value to f16 as the loaders'
    /// `scale · (q − z)` in half precision does.
    #[inline]
    pub fn fake_quantize_group(self, g: &mut [f32]) {
        let (s, z) = self.group_params(g);
        for v in g.iter_mut() {
            *v = half::f16::from_f32(s * (self.code(*v, s, z) - z)).to_f32();
        }
    }

    /// [`fake_quantize_group`](Self::fake_quantize_group) over every group of `w` (`[rows, cols]`).
    pub fn fake_quantize(self, w: &mut [f32], cols: usize) {
        let gs = self.group_size;
        w.par_chunks_mut(cols).for_each(|row| {
            for g in row.chunks_mut(gs) {
                self.fake_quantize_group(g);
            }
        });
    }

    /// The codes, scales and zeros of `w` (`[rows, cols]`, `cols` a multiple of the group size).
    pub fn quantize(self, w: &[f32], cols: usize) -> QuantizedRows {
        let gs = self.group_size;
        let rows = w.len() / cols.max(1);
        let groups = cols / gs;
        let mut out = QuantizedRows {
            codes: vec![0; w.len()],
            scales: vec![0.0; rows * groups],
            zeros: vec![0; rows * groups],
        };
        out.codes
            .par_chunks_mut(cols)
            .zip(out.scales.par_chunks_mut(groups))
            .zip(out.zeros.par_chunks_mut(groups))
            .zip(w.par_chunks(cols))
            .for_each(|(((codes, scales), zeros), row)| {
                for (gi, g) in row.chunks(gs).enumerate() {
                    let (s, z) = self.group_params(g);
                    scales[gi] = s;
                    zeros[gi] = z as u8;
                    for (c, &v) in codes[gi * gs..(gi + 1) * gs].iter_mut().zip(g) {
                        *c = self.code(v, s, z) as u8;
                    }
                }
            });
        out
    }
}

/// The mean over output rows of each input column's normalised magnitude `|w| / max|w|_group` across the
/// concatenated weights `ws` (each `[rows_i, cols]`) — AutoAWQ's `w_mean`.
pub fn weight_mean(ws: &[&[f32]], cols: usize, group_size: usize) -> Vec<f32> {
    let mut sum = vec![0.0f64; cols];
    let mut rows = 0usize;
    for w in ws {
        for row in w.chunks_exact(cols) {
            rows += 1;
            for (gi, g) in row.chunks(group_size).enumerate() {
                let m = g.iter().fold(0.0f32, |a, v| a.max(v.abs())) + 1e-6;
                for (j, v) in g.iter().enumerate() {
                    sum[gi * group_size + j] += f64::from(v.abs() / m);
                }
            }
        }
    }
    sum.iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect()
}

/// The per-input-channel scales tried at `ratio` (AutoAWQ's duo scaling:
/// `s = clamp(x̄^α / (w̄^(1−α) + 1e−4), 1e−4)`, or `x̄^α` without `w_mean`), divided by `√(max s · min s)`.
pub fn candidate_scales(x_mean: &[f32], w_mean: Option<&[f32]>, ratio: f32) -> Vec<f32> {
    let mut s: Vec<f32> = match w_mean {
        Some(w) => x_mean
            .iter()
            .zip(w)
            .map(|(&x, &w)| (x.powf(ratio) / (w.powf(1.0 - ratio) + 1e-4)).max(1e-4))
            .collect(),
        None => x_mean.iter().map(|&x| x.powf(ratio).max(1e-4)).collect(),
    };
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let norm = (hi * lo).sqrt();
    if norm > 0.0 && norm.is_finite() {
        for v in &mut s {
            *v /= norm;
        }
    }
    s
}

/// `w · diag(s)`, quantized on `grid`, then `· diag(1/s)`: the weights a candidate scale leaves the layer
/// with (`[rows, cols]`).
pub fn scaled_fake_quantize(w: &[f32], cols: usize, s: &[f32], grid: AwqGrid) -> Vec<f32> {
    let mut q: Vec<f32> = w
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(s).map(|(v, s)| v * s))
        .collect();
    grid.fake_quantize(&mut q, cols);
    for row in q.chunks_exact_mut(cols) {
        for (v, s) in row.iter_mut().zip(s) {
            *v /= s;
        }
    }
    q
}

/// AWQ's clipping search for one linear (`w` `[rows, cols]`, already scaled) on calibration inputs `x`
/// (`[tokens, cols]`, scaled the same way): for each output row and group, the largest magnitude
/// `m·(1 − i/n_grid)`, `i < max_shrink·n_grid`, whose clamped-and-quantized group gives the smallest mean
/// squared partial output `Σ_j x[t, j]·w[r, j]` over the group's inputs. Returns `[rows, groups]` bounds.
pub fn clip_search(
    w: &[f32],
    cols: usize,
    x: &[f32],
    grid: AwqGrid,
    n_grid: usize,
    max_shrink: f32,
) -> Vec<f32> {
    let gs = grid.group_size;
    let groups = cols / gs;
    let tokens = x.len() / cols.max(1);
    let steps = ((max_shrink * n_grid as f32) as usize).max(1);
    let mut bounds = vec![0.0f32; w.len() / cols * groups];
    bounds
        .par_chunks_mut(groups)
        .zip(w.par_chunks(cols))
        .for_each(|(bound, row)| {
            let mut org = vec![0.0f32; tokens];
            let mut cur = vec![0.0f32; gs];
            for (gi, g) in row.chunks(gs).enumerate() {
                let xs = |t: usize| &x[t * cols + gi * gs..t * cols + (gi + 1) * gs];
                for (t, o) in org.iter_mut().enumerate() {
                    *o = crate::simd::dot_f32(xs(t), g);
                }
                let max0 = g.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let (mut best, mut best_err) = (max0, f64::INFINITY);
                for i in 0..steps {
                    let m = max0 * (1.0 - i as f32 / n_grid as f32);
                    for (c, &v) in cur.iter_mut().zip(g) {
                        *c = v.clamp(-m, m);
                    }
                    grid.fake_quantize_group(&mut cur);
                    let err: f64 = org
                        .iter()
                        .enumerate()
                        .map(|(t, &o)| f64::from(crate::simd::dot_f32(xs(t), &cur) - o).powi(2))
                        .sum::<f64>()
                        / tokens.max(1) as f64;
                    if err < best_err {
                        best_err = err;
                        best = m;
                    }
                }
                bound[gi] = best;
            }
        });
    bounds
}

/// Clamp each group of `w` (`[rows, cols]`) to `±bounds[row, group]`.
pub fn apply_clip(w: &mut [f32], cols: usize, group_size: usize, bounds: &[f32]) {
    let groups = cols / group_size;
    for (row, b) in w.chunks_exact_mut(cols).zip(bounds.chunks_exact(groups)) {
        for (g, &m) in row.chunks_mut(group_size).zip(b) {
            for v in g {
                *v = v.clamp(-m, m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_max_groups_round_trip_their_extremes() {
        let grid = AwqGrid {
            bits: 4,
            group_size: 8,
        };
        let w = [-1.0f32, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0];
        let q = grid.quantize(&w, 8);
        // s = 3/15 = 0.2 (f16: 0.19995117), z = round(1/0.2) = 5.
        assert_eq!(q.zeros, vec![5]);
        assert_eq!(q.scales, vec![half::f16::from_f32(0.2).to_f32()]);
        assert_eq!(q.codes, vec![0, 2, 5, 6, 8, 9, 10, 15]);
        let mut f = w;
        grid.fake_quantize(&mut f, 8);
        for (i, (&a, &c)) in f.iter().zip(&q.codes).enumerate() {
            let want = half::f16::from_f32(q.scales[0] * (f32::from(c) - 5.0)).to_f32();
            assert_eq!(a, want, "{i}");
        }
    }

    #[test]
    fn scales_are_normalised_and_follow_the_ratio() {
        let x = [1.0f32, 4.0, 16.0];
        let s = candidate_scales(&x, None, 0.5);
        // x^0.5 = 1, 2, 4; √(4·1) = 2 → 0.5, 1, 2.
        assert_eq!(s, vec![0.5, 1.0, 2.0]);
        let w = [1.0f32, 1.0, 1.0];
        let s0 = candidate_scales(&x, Some(&w), 0.0);
        assert!(s0.iter().all(|v| (v - 1.0).abs() < 1e-6), "{s0:?}");
    }

    #[test]
    fn clipping_an_outlier_group_helps_its_partial_outputs() {
        // One large outlier stretches the group's range; inputs that never excite it make a tighter range
        // better.
        let grid = AwqGrid {
            bits: 4,
            group_size: 8,
        };
        let w: Vec<f32> = vec![0.1, -0.2, 0.15, 0.3, -0.25, 0.05, -0.1, 1.0];
        let x: Vec<f32> = (0..64)
            .flat_map(|t| {
                (0..8).map(move |j| {
                    if j == 7 {
                        0.0
                    } else {
                        ((t * 7 + j * 3) % 11) as f32 - 5.0
                    }
                })
            })
            .collect();
        let b = clip_search(&w, 8, &x, grid, 20, 0.5);
        assert!(b[0] < 1.0, "{b:?}");
        let mut clipped = w.clone();
        apply_clip(&mut clipped, 8, 8, &b);
        assert!(clipped.iter().all(|v| v.abs() <= b[0]));
    }
}
