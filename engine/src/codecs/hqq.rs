//! HQQ (half-quadratic quantization, mobiusml/hqq): asymmetric round-to-nearest per group whose zero point
//! is optimised by a proximal solver of `‖W − dequant(quant(W))‖_p^p` (p = 0.7), no calibration data.
//! Written from `shared/reference/hf-formats.md` §5; `tests/hqq_py` checks it against the hqq package.
//!
//! The flattened weight `[out, in]` is viewed as a grouped matrix: axis 1 → `[numel/gs, gs]` (each row a
//! group of `gs` consecutive weights), axis 0 → `[gs, numel/gs]` (each column a group, strided). Per
//! group HQQ works with an inverse scale `s = (2^b − 1)/(max − min)` and a float zero `z`; codes are
//! `clamp(round(w·s + z), 0, 2^b − 1)`; it stores `scale = 1/s` and `z` in the compute dtype (fp16) and
//! dequantises `(q − z)·scale` in that dtype. Codes are packed along the grouped matrix's rows: with `f`
//! fields per word, row `k` of the packed matrix holds rows `k, k + R/f, …` (the first block in the top
//! bits); 3-bit pads the rows to a multiple of 10 and packs ten fields into an int32.

use serde::{Deserialize, Serialize};

/// Bit widths HQQ packs (1.58, 5 and 6 bits are stored as 8 and are not offered).
pub const HQQ_BITS: [u8; 5] = [8, 4, 3, 2, 1];

/// The proximal solver's settings (hqq's defaults: `optimize_weights_proximal_legacy`).
const LP_NORM: f32 = 0.7;
const BETA: f32 = 10.0;
const ITERS: usize = 20;

/// What to quantize with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HqqParams {
    pub nbits: u8,
    pub group_size: usize,
    /// 1: groups along the input dimension; 0: strided groups down the flattened weight.
    pub axis: u8,
    pub optimize: bool,
    /// Round the initial zero to an integer (hqq's default for 4 bits only).
    pub round_zero: bool,
}

impl HqqParams {
    /// hqq's `BaseQuantizeConfig(nbits, group_size, axis=…)`.
    pub fn new(nbits: u8, group_size: usize, axis: u8) -> Self {
        Self {
            nbits,
            group_size,
            axis,
            optimize: true,
            round_zero: nbits == 4,
        }
    }

    /// The packing's name, as hqq records it.
    pub fn packing(&self) -> &'static str {
        match self.nbits {
            8 => "8bit_u8",
            4 => "4bit_u8",
            3 => "3bit_32",
            2 => "2bit_u8",
            _ => "1bit_u8",
        }
    }

    /// Bits per weight of a linear: codes plus an fp16 scale and zero per group.
    pub fn bpw(&self) -> f64 {
        f64::from(self.nbits) + 32.0 / self.group_size.max(1) as f64
    }

    /// Rows and columns of the grouped matrix of a weight with `numel` elements.
    pub fn grouped_dims(&self, numel: usize) -> (usize, usize) {
        let gs = self.group_size;
        if self.axis == 1 {
            (numel / gs, gs)
        } else {
            (gs, numel / gs)
        }
    }

    /// Number of groups of a weight with `numel` elements.
    pub fn groups(&self, numel: usize) -> usize {
        numel / self.group_size.max(1)
    }

    /// Fields per packed word, and the word's bytes.
    pub fn fields(&self) -> (usize, usize) {
        match self.nbits {
            8 => (1, 1),
            4 => (2, 1),
            3 => (10, 4),
            2 => (4, 1),
            _ => (8, 1),
        }
    }

    /// Rows of the packed matrix (3-bit pads the grouped rows to a multiple of 10).
    pub fn packed_rows(&self, rows: usize) -> usize {
        let (f, _) = self.fields();
        if self.nbits == 3 {
            rows.div_ceil(10)
        } else {
            rows / f
        }
    }

    /// Why `numel` weights in `[out, in]` cannot be quantized with these settings, if they cannot.
    pub fn check(&self, out: usize, inp: usize) -> Result<(), String> {
        if !HQQ_BITS.contains(&self.nbits) {
            return Err(format!("HQQ bits {}: use 8, 4, 3, 2 or 1", self.nbits));
        }
        if self.axis > 1 {
            return Err(format!("HQQ axis {}: use 0 or 1", self.axis));
        }
        let gs = self.group_size;
        if gs == 0 || !gs.is_multiple_of(8) {
            return Err(format!(
                "HQQ group size {gs}: use a multiple of 8 (64 is the default)"
            ));
        }
        let numel = out * inp;
        if !numel.is_multiple_of(gs) {
            return Err(format!(
                "its {out}×{inp} weights are not a multiple of the group size {gs}; pick a group size that divides {numel}"
            ));
        }
        let (rows, _) = self.grouped_dims(numel);
        let (f, _) = self.fields();
        if self.nbits != 3 && rows % f != 0 {
            return Err(format!(
                "{rows} grouped rows do not split into the {f} blocks {}-bit packing needs; pick another group size or axis",
                self.nbits
            ));
        }
        Ok(())
    }
}

/// A quantized weight: codes in the grouped matrix's order, and per group the stored scale and zero
/// (already rounded to fp16).
#[derive(Clone, Debug, PartialEq)]
pub struct HqqQuantized {
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub zero: Vec<f32>,
}

#[inline]
fn group_of(p: &HqqParams, cols: usize, i: usize) -> usize {
    if p.axis == 1 {
        i / cols
    } else {
        i % cols
    }
}

/// hqq's shrinkage operator for the l_p norm (p < 1): `sign(x)·max(|x| − |x|^(p−1)/β, 0)`.
#[inline]
fn shrink(x: f32) -> f32 {
    let a = x.abs();
    let v = (a - (1.0 / BETA) * a.powf(LP_NORM - 1.0)).max(0.0);
    if x < 0.0 {
        -v
    } else if x > 0.0 {
        v
    } else {
        0.0
    }
}

/// The proximal solver's constants as one step of it needs them: `(2^b − 1, 1/β, p − 1)`.
pub fn solver_constants(p: &HqqParams) -> [f32; 3] {
    [((1u32 << p.nbits) - 1) as f32, 1.0 / BETA, LP_NORM - 1.0]
}

/// Quantize the flattened weight `w` (`numel % group_size == 0`, checked by [`HqqParams::check`]), the
/// solver's steps on the CPU.
pub fn quantize(w: &[f32], p: &HqqParams) -> HqqQuantized {
    match quantize_with(w, p, |s, z| {
        Ok::<f64, std::convert::Infallible>(step(w, p, s, z))
    }) {
        Ok(q) => q,
        Err(never) => match never {},
    }
}

/// [`quantize`] with the solver's steps taken by `step(s, z)`: every group's new zero into `z` (from the
/// inverse scales `s` and the zeros `z`), returning `Σ |w − dequant(quant(w))|` before the step (an
/// accelerator's version of [`step`]).
pub fn quantize_with<E>(
    w: &[f32],
    p: &HqqParams,
    mut step: impl FnMut(&[f32], &mut [f32]) -> Result<f64, E>,
) -> Result<HqqQuantized, E> {
    let n = w.len();
    let (_, cols) = p.grouped_dims(n);
    let groups = p.groups(n);
    let max_v = solver_constants(p)[0];
    let mut lo = vec![f32::INFINITY; groups];
    let mut hi = vec![f32::NEG_INFINITY; groups];
    for (i, &x) in w.iter().enumerate() {
        let g = group_of(p, cols, i);
        lo[g] = lo[g].min(x);
        hi[g] = hi[g].max(x);
    }
    // The inverse scale (hqq multiplies), 1 where the range is tiny, at most 2e4.
    let s: Vec<f32> = lo
        .iter()
        .zip(&hi)
        .map(|(&l, &h)| {
            let d = h - l;
            let s = if d.abs() <= 1e-4 { 1.0 } else { max_v / d };
            s.min(2e4)
        })
        .collect();
    let mut z: Vec<f32> = lo
        .iter()
        .zip(&s)
        .map(|(&l, &s)| {
            let z = -l * s;
            if p.round_zero {
                z.round_ties_even()
            } else {
                z
            }
        })
        .collect();
    if p.optimize {
        let mut best = f32::INFINITY;
        for _ in 0..ITERS {
            // The zero after this step, the error before it (hqq's order).
            let err = (step(&s, &mut z)? / n.max(1) as f64) as f32;
            if err < best {
                best = err;
            } else {
                break;
            }
        }
    }
    let codes = w
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let g = group_of(p, cols, i);
            code(x, s[g], z[g], max_v) as u8
        })
        .collect();
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    Ok(HqqQuantized {
        codes,
        scale: s.iter().map(|&s| f16(1.0 / s)).collect(),
        zero: z.iter().map(|&z| f16(z)).collect(),
    })
}

/// `round(x·s + z)` clamped to `0..=max_v`, without a libm call.
#[inline]
fn code(x: f32, s: f32, z: f32, max_v: f32) -> f32 {
    crate::simd::round_even((x * s + z).clamp(0.0, max_v))
}

/// One step of the proximal solver on the CPU: every group's new zero into `z`; the error sum before it.
pub fn step(w: &[f32], p: &HqqParams, s: &[f32], z: &mut [f32]) -> f64 {
    use rayon::prelude::*;
    let (_, cols) = p.grouped_dims(w.len());
    let groups = s.len();
    let max_v = solver_constants(p)[0];
    let gs = p.group_size;
    let per_group = gs as f64;
    // The elements of group g: a row of the grouped matrix (axis 1) or a column (axis 0).
    let element = |g: usize, j: usize| {
        if p.axis == 1 {
            g * gs + j
        } else {
            j * cols + g
        }
    };
    const CHUNK: usize = 256;
    // Per chunk of groups (in parallel): the groups' new zeros and the chunk's error sum; summed in chunk
    // order, so the early stop does not depend on the thread count.
    let parts: Vec<(Vec<f32>, f64)> = (0..groups.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut zs = Vec::with_capacity(CHUNK);
            let mut err = 0.0f64;
            for g in c * CHUNK..((c + 1) * CHUNK).min(groups) {
                let (sg, zg) = (s[g], z[g]);
                let mut sum = 0.0f64;
                for j in 0..gs {
                    let x = w[element(g, j)];
                    let q = code(x, sg, zg, max_v);
                    let r = (q - zg) / sg;
                    let e = shrink(x - r);
                    sum += f64::from(q - (x - e) * sg);
                    err += f64::from((x - r).abs());
                }
                zs.push((sum / per_group) as f32);
            }
            (zs, err)
        })
        .collect();
    let mut err = 0.0f64;
    for (c, (zs, e)) in parts.into_iter().enumerate() {
        z[c * CHUNK..c * CHUNK + zs.len()].copy_from_slice(&zs);
        err += e;
    }
    err
}

/// The weight's groups one after another (`[groups, gs]`): axis 1 is already so, axis 0's strided
/// columns are gathered (what an accelerator's step reads).
pub fn group_major(w: &[f32], p: &HqqParams) -> Vec<f32> {
    if p.axis == 1 {
        return w.to_vec();
    }
    let (rows, cols) = p.grouped_dims(w.len());
    let mut out = vec![0.0f32; w.len()];
    for (j, row) in w.chunks_exact(cols.max(1)).enumerate().take(rows) {
        for (g, &x) in row.iter().enumerate() {
            out[g * rows + j] = x;
        }
    }
    out
}

/// Pack codes (grouped matrix `[rows, cols]`, row-major) as hqq's `BitPack` does: little-endian bytes of
/// the packed matrix (`u8`, or `i32` for 3 bits).
pub fn pack(codes: &[u8], rows: usize, cols: usize, p: &HqqParams) -> Vec<u8> {
    let (f, word) = p.fields();
    let prow = p.packed_rows(rows);
    let step = if p.nbits == 3 { prow } else { rows / f };
    let bits = u32::from(p.nbits);
    let mut out = Vec::with_capacity(prow * cols * word);
    for k in 0..prow {
        for c in 0..cols {
            let mut v: u32 = 0;
            for j in 0..f {
                let r = k + j * step;
                let q = if r < rows {
                    u32::from(codes[r * cols + c])
                } else {
                    0
                };
                v |= q << (bits * (f - 1 - j) as u32);
            }
            if word == 4 {
                out.extend_from_slice(&v.to_le_bytes());
            } else {
                out.push(v as u8);
            }
        }
    }
    out
}

/// The float type HQQ stores scales and zeros in and computes the dequantization in (its compute dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HqqDtype {
    F16,
    BF16,
    F32,
}

impl HqqDtype {
    /// `"torch.float16"`, as hqq encodes `compute_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            HqqDtype::F16 => "torch.float16",
            HqqDtype::BF16 => "torch.bfloat16",
            HqqDtype::F32 => "torch.float32",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "torch.float16" => Some(HqqDtype::F16),
            "torch.bfloat16" => Some(HqqDtype::BF16),
            "torch.float32" => Some(HqqDtype::F32),
            _ => None,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        if self == HqqDtype::F32 {
            4
        } else {
            2
        }
    }

    #[inline]
    fn round(self, x: f32) -> f32 {
        match self {
            HqqDtype::F16 => half::f16::from_f32(x).to_f32(),
            HqqDtype::BF16 => half::bf16::from_f32(x).to_f32(),
            HqqDtype::F32 => x,
        }
    }

    #[inline]
    fn read(self, b: &[u8], i: usize) -> f32 {
        match self {
            HqqDtype::F16 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            HqqDtype::BF16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            HqqDtype::F32 => {
                f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
        }
    }
}

/// An HQQ linear `[out, in]` as stored, borrowed: what dequantization needs.
#[derive(Clone, Copy, Debug)]
pub struct HqqParts<'a> {
    pub params: HqqParams,
    pub out_features: usize,
    pub in_features: usize,
    /// The packed matrix's bytes (little-endian words).
    pub packed: &'a [u8],
    /// Per group, little-endian values of `dtype`.
    pub scale: &'a [u8],
    pub zero: &'a [u8],
    /// The compute dtype: what scale and zero are stored in and each dequantization step rounds to.
    pub dtype: HqqDtype,
}

impl HqqParts<'_> {
    /// The code of flattened element `i`.
    #[inline]
    fn code(&self, i: usize, rows: usize, cols: usize) -> u32 {
        let (r, c) = (i / cols, i % cols);
        let p = &self.params;
        let (f, word) = p.fields();
        let prow = p.packed_rows(rows);
        let step = if p.nbits == 3 { prow } else { rows / f };
        let (k, j) = (r % step, r / step);
        let at = (k * cols + c) * word;
        let v = if word == 4 {
            u32::from_le_bytes([
                self.packed[at],
                self.packed[at + 1],
                self.packed[at + 2],
                self.packed[at + 3],
            ])
        } else {
            u32::from(self.packed[at])
        };
        let bits = u32::from(p.nbits);
        (v >> (bits * (f - 1 - j) as u32)) & ((1 << bits) - 1)
    }

    /// Dequantize output row `r`: `(q − zero)·scale`, each step rounded to the compute dtype.
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let numel = self.out_features * self.in_features;
        let (rows, cols) = self.params.grouped_dims(numel);
        let d = self.dtype;
        let start = r * self.in_features;
        for (j, o) in out.iter_mut().enumerate() {
            let i = start + j;
            let g = group_of(&self.params, cols, i);
            let q = self.code(i, rows, cols) as f32;
            *o = d.round(d.round(q - d.read(self.zero, g)) * d.read(self.scale, g));
        }
    }

    /// Sizes agree with the shape (checked once, when a checkpoint is opened).
    pub fn validate(&self, name: &str) -> crate::Result<()> {
        let bad = |d: String| Err(crate::Error::Invalid(format!("{name}: {d}")));
        if let Err(e) = self.params.check(self.out_features, self.in_features) {
            return bad(e);
        }
        let numel = self.out_features * self.in_features;
        let (rows, cols) = self.params.grouped_dims(numel);
        let (_, word) = self.params.fields();
        let want = self.params.packed_rows(rows) * cols * word;
        if self.packed.len() != want {
            return bad(format!(
                "{} bytes of packed codes, {want} expected",
                self.packed.len()
            ));
        }
        let groups = self.params.groups(numel);
        let each = self.dtype.size();
        if self.scale.len() != groups * each || self.zero.len() != groups * each {
            return bad(format!(
                "{} scales and {} zeros for {groups} groups",
                self.scale.len() / each,
                self.zero.len() / each
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn weights(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919) % 1009) as f32 / 1009.0 - 0.5) * (1.0 + (i % 13) as f32 / 13.0))
            .collect()
    }

    #[test]
    fn pack_matches_hqq_bitpack_layout() {
        // 4 rows × 2 cols, 4-bit: row k holds rows k and k + 2, the first in the high nibble.
        let p = HqqParams::new(4, 8, 1);
        let codes = [1u8, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(pack(&codes, 4, 2, &p), [0x15, 0x26, 0x37, 0x48]);
        // 3-bit: 10 fields per int32, rows padded to 10.
        let p3 = HqqParams::new(3, 8, 1);
        let codes = [7u8; 3];
        let w = pack(&codes, 3, 1, &p3);
        assert_eq!(w.len(), 4);
        assert_eq!(
            u32::from_le_bytes(w[..4].try_into().unwrap()),
            (7 << 27) | (7 << 24) | (7 << 21)
        );
    }

    #[test]
    fn round_trip_through_the_parts_for_every_width_and_axis() {
        let (out, inp) = (16, 64);
        let w = weights(out * inp);
        for nbits in HQQ_BITS {
            for axis in [0u8, 1] {
                let p = HqqParams::new(nbits, 64, axis);
                p.check(out, inp).unwrap();
                let q = quantize(&w, &p);
                let (rows, cols) = p.grouped_dims(w.len());
                let packed = pack(&q.codes, rows, cols, &p);
                let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
                let (sb, zb) = (f32b(&q.scale), f32b(&q.zero));
                let parts = HqqParts {
                    params: p,
                    out_features: out,
                    in_features: inp,
                    packed: &packed,
                    scale: &sb,
                    zero: &zb,
                    dtype: HqqDtype::F32,
                };
                parts.validate("w").unwrap();
                let mut got = vec![0.0; w.len()];
                for (r, row) in got.chunks_mut(inp).enumerate() {
                    parts.dequant_row(r, row);
                }
                for (i, g) in got.iter().enumerate() {
                    let grp = group_of(&p, cols, i);
                    let want = (f32::from(q.codes[i]) - q.zero[grp]) * q.scale[grp];
                    assert_eq!(*g, want, "{nbits}-bit axis {axis} element {i}");
                }
                let rel = (w
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f32>()
                    / w.iter().map(|a| a * a).sum::<f32>())
                .sqrt();
                let limit = if nbits == 8 { 0.01 } else { 0.15 };
                if nbits >= 4 {
                    assert!(rel < limit, "{nbits}-bit axis {axis}: {rel}");
                }
            }
        }
    }

    #[test]
    fn the_solver_beats_plain_rounding() {
        let w = weights(64 * 64);
        for nbits in [4u8, 3, 2] {
            let plain = HqqParams {
                optimize: false,
                ..HqqParams::new(nbits, 64, 1)
            };
            let err = |p: &HqqParams| {
                let q = quantize(&w, p);
                w.iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        let g = i / 64;
                        (x - (f32::from(q.codes[i]) - q.zero[g]) * q.scale[g]).abs()
                    })
                    .sum::<f32>()
            };
            let (a, b) = (err(&HqqParams::new(nbits, 64, 1)), err(&plain));
            assert!(a < b, "{nbits}-bit: optimised {a} vs plain {b}");
        }
    }

    #[test]
    fn shapes_it_cannot_take_are_refused_with_the_reason() {
        assert!(HqqParams::new(4, 64, 1)
            .check(10, 10)
            .unwrap_err()
            .contains("multiple of the group size"));
        assert!(HqqParams::new(4, 12, 1)
            .check(64, 64)
            .unwrap_err()
            .contains("multiple of 8"));
        assert!(HqqParams::new(5, 64, 1).check(64, 64).is_err());
        // 1-bit packs 8 row blocks: 3 groups cannot split.
        assert!(HqqParams::new(1, 64, 1)
            .check(3, 64)
            .unwrap_err()
            .contains("blocks"));
    }
}
