//! Legacy 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Layouts and formulas: gguf.md §2. Every element is computed with a single f32 multiply (and one add
//! for the `_1` types) in the same order as ggml's `dequantize_row_*`, so results are bit-exact.
//!
//! The quantizers reproduce llama.cpp's quantizers bit for bit: the same f32 operations in the same order,
//! f16 rounding to nearest even, and C's float→int conversions.
//!
//! * Without `importance`: the reference quantizers (`quantize_row_*_ref`; truncation, or `roundf` for
//!   Q8_0). They work block by block, so any whole number of blocks is fine.
//! * With `importance` (one weight per element of `src`): llama.cpp's weighted search
//!   (`quantize_row_q*_impl`). Each element is weighted by `w_j · sqrt(sigma2 + x_j²)`, where `sigma2` is
//!   the mean square of the whole ROW; the symmetric types then use `make_qx_quants` (nmax 8 / 16), the
//!   `_1` types `make_qkx3_quants` (nmax 15 / 31, 37 scale tries). Because of the row-wide `sigma2`,
//!   `src` must be exactly one tensor row in this case (the [`super::QuantizeFn`] contract).
//! * Q8_0 has no weighted search in llama.cpp (`quantize_q8_0` ignores the imatrix): it ignores
//!   `importance`.

use super::f16_at;
use super::kquants::{make_qkx3_quants, make_qx_quants};

const QK: usize = 32;

/// `(q - 8) * d`, nibble j → element j, high nibble → element j + 16.
pub fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q4_0(src, dst) {
        dequant_q4_0_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q4_0`].
pub(super) fn dequant_q4_0_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `q * d + m`.
pub fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q4_1(src, dst) {
        dequant_q4_1_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q4_1`].
pub(super) fn dequant_q4_1_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let m = f16_at(&b[2..]);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (qs[j] & 0x0F) as f32 * d + m;
            hi[j] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// `(q - 16) * d` with the fifth bit of element e at bit e of `qh`.
pub fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q5_0(src, dst) {
        dequant_q5_0_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q5_0`].
pub(super) fn dequant_q5_0_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let q0 = (qs[j] & 0x0F) as u32 | h0;
            let q1 = (qs[j] >> 4) as u32 | h1;
            lo[j] = (q0 as i32 - 16) as f32 * d;
            hi[j] = (q1 as i32 - 16) as f32 * d;
        }
    }
}

/// `q * d + m`, q in 0..32.
pub fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q5_1(src, dst) {
        dequant_q5_1_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q5_1`].
pub(super) fn dequant_q5_1_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let m = f16_at(&b[2..]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let q0 = (qs[j] & 0x0F) as u32 | h0;
            let q1 = (qs[j] >> 4) as u32 | h1;
            lo[j] = q0 as f32 * d + m;
            hi[j] = q1 as f32 * d + m;
        }
    }
}

/// `qs[e] * d`, signed bytes.
pub fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q8_0(src, dst) {
        dequant_q8_0_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q8_0`].
pub(super) fn dequant_q8_0_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        for (o, &q) in y.iter_mut().zip(&b[2..34]) {
            *o = (q as i8) as f32 * d;
        }
    }
}

/// f32 → little-endian f16 bytes, rounding to nearest even like `GGML_FP32_TO_FP16`.
#[inline]
pub(super) fn put_f16(b: &mut [u8], x: f32) {
    b[..2].copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
}

/// The element of largest magnitude (first one on ties), 0 for an all-zero block.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Minimum and maximum of a block, starting from ±FLT_MAX like ggml.
#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// C's `(int8_t)f` for the in-range values these quantizers produce (truncation toward zero).
#[inline]
fn trunc_i8(f: f32) -> i32 {
    f as i32 as i8 as i32
}

/// Per-element weights of llama.cpp's `quantize_row_q*_impl`: `qw_j · sqrt(sigma2 + x_j²)` for every
/// element of the row `x`, with `sigma2` the row's mean square (summed in order, as ggml does).
fn row_weights(x: &[f32], qw: &[f32]) -> Vec<f32> {
    assert_eq!(qw.len(), x.len(), "one importance weight per element");
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let sigma2 = sum_x2 / x.len() as f32;
    x.iter()
        .zip(qw)
        .map(|(&v, &w)| w * (sigma2 + v * v).sqrt())
        .collect()
}

/// llama.cpp's `quantize_row_q4_0_ref`: `d = max / -8`, `q = min(15, trunc(x/d + 8.5))`; with
/// `importance` (`src` one row), `quantize_row_q4_0_impl`: `make_qx_quants(nmax = 8)` on weighted elements.
pub fn quantize_q4_0(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    if let Some(qw) = importance {
        let weight = row_weights(src, qw);
        let mut l = [0i8; QK];
        for ((x, w), b) in src
            .chunks_exact(QK)
            .zip(weight.chunks_exact(QK))
            .zip(dst.chunks_exact_mut(18))
        {
            let d = make_qx_quants(8, x, &mut l, 1, Some(w));
            put_f16(b, d);
            for j in 0..16 {
                b[2 + j] = l[j] as u8 | ((l[j + 16] as u8) << 4);
            }
        }
        return;
    }
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        let d = signed_absmax(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(b, d);
        for j in 0..16 {
            let q0 = trunc_i8(x[j] * id + 8.5).min(15) as u8;
            let q1 = trunc_i8(x[j + 16] * id + 8.5).min(15) as u8;
            b[2 + j] = q0 | (q1 << 4);
        }
    }
}

/// llama.cpp's `make_qkx3_quants(nmax, …, rmin = -0.9, rdelta = 0.05, nstep = 36, use_mad = false)` as the
/// `_1` types' weighted search calls it: returns `(d, m)` and fills `l` with `0..=nmax`.
fn weighted_asym(nmax: i32, x: &[f32], w: &[f32], l: &mut [u8; QK]) -> (f32, f32) {
    let (d, neg_min) = make_qkx3_quants(nmax, x, Some(w), l, -0.9, 0.05, 36, false);
    (d, -neg_min)
}

/// llama.cpp's `quantize_row_q4_1_ref`: `d = (max - min) / 15`, `m = min`; with `importance` (`src` one
/// row), `quantize_row_q4_1_impl`: `make_qkx3_quants(nmax = 15)` on weighted elements.
pub fn quantize_q4_1(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    if let Some(qw) = importance {
        let weight = row_weights(src, qw);
        let mut l = [0u8; QK];
        for ((x, w), b) in src
            .chunks_exact(QK)
            .zip(weight.chunks_exact(QK))
            .zip(dst.chunks_exact_mut(20))
        {
            let (d, m) = weighted_asym(15, x, w, &mut l);
            put_f16(b, d);
            put_f16(&mut b[2..], m);
            for j in 0..16 {
                b[4 + j] = l[j] | (l[j + 16] << 4);
            }
        }
        return;
    }
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(20)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(b, d);
        put_f16(&mut b[2..], min);
        for j in 0..16 {
            let q0 = trunc_i8((x[j] - min) * id + 0.5).min(15) as u8;
            let q1 = trunc_i8((x[j + 16] - min) * id + 0.5).min(15) as u8;
            b[4 + j] = q0 | (q1 << 4);
        }
    }
}

/// Five-bit values `l` of one block into `qs` (low nibbles, element j and j + 16 in byte j) and the
/// little-endian `qh` (fifth bit of element e at bit e).
fn pack_q5(l: &[u8], qh_bytes: &mut [u8], qs: &mut [u8]) {
    let mut qh = 0u32;
    for j in 0..16 {
        let (q0, q1) = (l[j], l[j + 16]);
        qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= ((q0 as u32 & 0x10) >> 4) << j;
        qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
    }
    qh_bytes[..4].copy_from_slice(&qh.to_le_bytes());
}

/// llama.cpp's `quantize_row_q5_0_ref`: `d = max / -16`, `q = min(31, trunc(x/d + 16.5))`; with
/// `importance` (`src` one row), `quantize_row_q5_0_impl`: `make_qx_quants(nmax = 16)` on weighted
/// elements.
pub fn quantize_q5_0(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    if let Some(qw) = importance {
        let weight = row_weights(src, qw);
        let mut l = [0i8; QK];
        for ((x, w), b) in src
            .chunks_exact(QK)
            .zip(weight.chunks_exact(QK))
            .zip(dst.chunks_exact_mut(22))
        {
            let d = make_qx_quants(16, x, &mut l, 1, Some(w));
            put_f16(b, d);
            let lu = l.map(|v| v as u8);
            let (qh, qs) = b[2..].split_at_mut(4);
            pack_q5(&lu, qh, qs);
        }
        return;
    }
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(22)) {
        let d = signed_absmax(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(b, d);
        let l: [u8; QK] = std::array::from_fn(|j| trunc_i8(x[j] * id + 16.5).min(31) as u8);
        let (qh, qs) = b[2..].split_at_mut(4);
        pack_q5(&l, qh, qs);
    }
}

/// llama.cpp's `quantize_row_q5_1_ref`: `d = (max - min) / 31`, `m = min`; with `importance` (`src` one
/// row), `quantize_row_q5_1_impl`: `make_qkx3_quants(nmax = 31)` on weighted elements.
pub fn quantize_q5_1(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    if let Some(qw) = importance {
        let weight = row_weights(src, qw);
        let mut l = [0u8; QK];
        for ((x, w), b) in src
            .chunks_exact(QK)
            .zip(weight.chunks_exact(QK))
            .zip(dst.chunks_exact_mut(24))
        {
            let (d, m) = weighted_asym(31, x, w, &mut l);
            put_f16(b, d);
            put_f16(&mut b[2..], m);
            let (qh, qs) = b[4..].split_at_mut(4);
            pack_q5(&l, qh, qs);
        }
        return;
    }
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(24)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(b, d);
        put_f16(&mut b[2..], min);
        // `(uint8_t)f`: the values are in 0..32.
        let l: [u8; QK] = std::array::from_fn(|j| ((x[j] - min) * id + 0.5) as u8);
        let (qh, qs) = b[4..].split_at_mut(4);
        pack_q5(&l, qh, qs);
    }
}

/// llama.cpp's `quantize_row_q8_0_ref`: `d = amax / 127`, `q = roundf(x / d)` (half away from zero).
/// `importance` is ignored, as llama.cpp's `quantize_q8_0` does.
pub fn quantize_q8_0(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(34)) {
        let mut amax = 0.0f32;
        for &v in x {
            // MAX(amax, fabsf(v))
            amax = if amax > v.abs() { amax } else { v.abs() };
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        put_f16(b, d);
        for (o, &v) in b[2..34].iter_mut().zip(x) {
            *o = (v * id).round() as i8 as u8;
        }
    }
}

#[cfg(test)]
pub(super) mod fixture {
    //! The oracle fixture `tests/fixtures/quants/legacy_iq4.bin`, written by `make_quant_fixtures.py`
    //! from llama.cpp's `ggml_quantize_chunk`.

    pub struct Case {
        pub ggml_type: u32,
        pub with_imatrix: bool,
        pub bytes: Vec<u8>,
    }

    pub struct Fixture {
        pub nrows: usize,
        pub n_per_row: usize,
        pub src: Vec<f32>,
        /// One weight per column, as llama.cpp's imatrix.
        pub imatrix: Vec<f32>,
        pub cases: Vec<Case>,
    }

    impl Fixture {
        /// The imatrix repeated for every row: one importance per element of `src`.
        pub fn importance(&self) -> Vec<f32> {
            self.imatrix.repeat(self.nrows)
        }
    }

    pub fn load() -> Fixture {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/quants/legacy_iq4.bin");
        let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&b[..4], b"QSLQ");
        let mut p = 4;
        let u32_at = |p: &mut usize| {
            let v = u32::from_le_bytes(b[*p..*p + 4].try_into().expect("4 bytes"));
            *p += 4;
            v
        };
        assert_eq!(u32_at(&mut p), 1);
        let nrows = u32_at(&mut p) as usize;
        let n_per_row = u32_at(&mut p) as usize;
        let floats = |p: &mut usize, n: usize| {
            let v: Vec<f32> = b[*p..*p + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            *p += 4 * n;
            v
        };
        let src = floats(&mut p, nrows * n_per_row);
        let imatrix = floats(&mut p, n_per_row);
        let ncases = u32_at(&mut p);
        let mut cases = Vec::new();
        for _ in 0..ncases {
            let ggml_type = u32_at(&mut p);
            let with_imatrix = u32_at(&mut p) != 0;
            let n = u32_at(&mut p) as usize;
            cases.push(Case {
                ggml_type,
                with_imatrix,
                bytes: b[p..p + n].to_vec(),
            });
            p += n;
        }
        assert_eq!(p, b.len());
        Fixture {
            nrows,
            n_per_row,
            src,
            imatrix,
            cases,
        }
    }

    /// Quantise the fixture with `ty` row by row (as the `QuantizeFn` contract asks when importance is
    /// given) and compare with llama.cpp's bytes; then check that the round trip error of every block
    /// stays under `rel` × the block's largest magnitude (2·`rel` for the imatrix cases). Returns the
    /// cases checked.
    pub fn check(ty: crate::codecs::GgmlType, rel: f32) -> usize {
        let f = load();
        let t = ty.traits();
        let imp = f.importance();
        let row_bytes = f.n_per_row / t.block_elems * t.block_bytes;
        let mut checked = 0;
        for c in f.cases.iter().filter(|c| c.ggml_type == t.ggml_id) {
            assert_eq!(c.bytes.len(), f.nrows * row_bytes, "{}", t.name);
            let mut out = vec![0u8; c.bytes.len()];
            for ((x, w), q) in f
                .src
                .chunks_exact(f.n_per_row)
                .zip(imp.chunks_exact(f.n_per_row))
                .zip(out.chunks_exact_mut(row_bytes))
            {
                ty.quantize(x, q, c.with_imatrix.then_some(w))
                    .expect("has a quantizer");
            }
            if let Some(i) = out.iter().zip(&c.bytes).position(|(a, b)| a != b) {
                panic!(
                    "{} (imatrix: {}): byte {i} (block {}) differs from llama.cpp: {} vs {}",
                    t.name,
                    c.with_imatrix,
                    i / t.block_bytes,
                    out[i],
                    c.bytes[i]
                );
            }
            let mut y = vec![0.0f32; f.src.len()];
            ty.dequantize(&out, &mut y);
            // The weighted search may give up accuracy on unimportant elements, the block's extreme
            // one included, to fit the important ones better: twice the bound there.
            let rel = if c.with_imatrix { 2.0 * rel } else { rel };
            for (xb, yb) in f.src.chunks(32).zip(y.chunks(32)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                if amax < 1e-2 {
                    // The scale is an f16 subnormal or zero there: no relative bound.
                    continue;
                }
                for (a, b) in xb.iter().zip(yb) {
                    assert!(
                        (a - b).abs() <= rel * amax,
                        "{} (imatrix: {}): {a} → {b} (block amax {amax})",
                        t.name,
                        c.with_imatrix
                    );
                }
            }
            checked += 1;
        }
        assert_eq!(f.src.len(), f.nrows * f.n_per_row);
        checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::GgmlType;

    #[test]
    fn legacy_quantizers_match_llama_cpp() {
        // Worst case per element: half a step, plus f16 rounding of the scale (and the min).
        // Q8_0 is fixtured without an imatrix only (llama.cpp ignores it); the others with and without.
        for (ty, rel, cases) in [
            (GgmlType::Q8_0, 0.5 / 127.0 + 0.002, 1),
            // The symmetric types clamp the element opposite the extreme: one whole step.
            (GgmlType::Q4_0, 1.0 / 8.0 + 0.01, 2),
            (GgmlType::Q4_1, 2.0 * (0.5 / 15.0) + 0.01, 2),
            (GgmlType::Q5_0, 1.0 / 16.0 + 0.01, 2),
            (GgmlType::Q5_1, 2.0 * (0.5 / 31.0) + 0.01, 2),
        ] {
            assert_eq!(fixture::check(ty, rel), cases, "{ty:?}");
        }
    }

    #[test]
    fn q8_0_ignores_importance() {
        let f = fixture::load();
        let row = &f.src[..f.n_per_row];
        let mut a = vec![0u8; f.n_per_row / 32 * 34];
        let mut b = a.clone();
        quantize_q8_0(row, &mut a, None);
        quantize_q8_0(row, &mut b, Some(&f.imatrix));
        assert_eq!(a, b);
    }

    /// `sum_j w_j (x_j - q_j)²` of `x` quantised with `ty` (importance `w` or none) and dequantised.
    fn weighted_sq_error(ty: GgmlType, x: &[f32], w: &[f32], use_importance: bool) -> f64 {
        let t = ty.traits();
        let mut q = vec![0u8; x.len() / t.block_elems * t.block_bytes];
        ty.quantize(x, &mut q, use_importance.then_some(w))
            .expect("has a quantizer");
        let mut y = vec![0.0f32; x.len()];
        ty.dequantize(&q, &mut y);
        x.iter()
            .zip(&y)
            .zip(w)
            .map(|((&a, &b), &wj)| wj as f64 * (a as f64 - b as f64).powi(2))
            .sum()
    }

    #[test]
    fn weighted_quantizers_lower_the_weighted_error() {
        // A row whose importance strongly favours a few columns per block: the weighted search must not
        // do worse than the reference quantizer on the weighted error it optimises.
        let mut s = 0x2545_f491_u32;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as f32 / u32::MAX as f32 - 0.5
        };
        let n = 256;
        let x: Vec<f32> = (0..n)
            .map(|j| {
                let v = 0.05 * rnd();
                if j % 61 == 7 {
                    v * 12.0 // outliers, which the reference quantizers fit first
                } else {
                    v
                }
            })
            .collect();
        let w: Vec<f32> = (0..n)
            .map(|j| {
                if j % 32 < 4 || j % 9 == 0 {
                    100.0
                } else {
                    0.01
                }
            })
            .collect();
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let plain = weighted_sq_error(ty, &x, &w, false);
            let weighted = weighted_sq_error(ty, &x, &w, true);
            assert!(
                weighted <= plain,
                "{ty:?}: weighted error {weighted} > unweighted {plain}"
            );
            assert!(weighted < 0.9 * plain, "{ty:?}: {weighted} vs {plain}");
        }
    }

    fn half(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn legacy_nibble_and_fifth_bit_placement() {
        // Q4_0: byte j holds element j (low nibble) and element j + 16 (high nibble).
        let mut b = half(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0.0f32; 32];
        dequant_q4_0(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 2.0);
        }
        // Q5_1: bit e of qh is element e's fifth bit; value q·d + m.
        let mut b = half(0.5).to_vec();
        b.extend_from_slice(&half(-1.0));
        b.extend_from_slice(&(1u32 | 1 << 16 | 1 << 31).to_le_bytes());
        b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
        let mut y = [0.0f32; 32];
        dequant_q5_1(&b, &mut y);
        assert_eq!(
            (y[0], y[1], y[16], y[17], y[31]),
            (
                17.0 * 0.5 - 1.0,
                1.0 * 0.5 - 1.0,
                18.0 * 0.5 - 1.0,
                2.0 * 0.5 - 1.0,
                18.0 * 0.5 - 1.0
            )
        );
        // Q8_0: signed bytes.
        let mut b = half(-0.25).to_vec();
        b.extend((0..32).map(|i: i32| (i - 16) as u8));
        dequant_q8_0(&b, &mut y);
        assert_eq!((y[0], y[16], y[31]), (4.0, 0.0, -3.75));
    }
}
