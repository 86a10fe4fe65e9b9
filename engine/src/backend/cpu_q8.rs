//! Integer dot products of packed weight rows with activations quantized to 8 bits, as llama.cpp's CPU
//! backend multiplies them (`ggml_vec_dot_q4_0_q8_0`, `ggml_vec_dot_q4_K_q8_K`, …): the weight is read
//! packed (2.6–8.5 bits per weight instead of a dequantised f32 row), each block's products are summed
//! exactly in integers, and only the block sums are scaled in f32. AVX2 where the CPU has it; the scalar
//! code is the reference the vector code equals exactly (the integer sums are exact and the f32 operations
//! are the same ones in the same order).
//!
//! Two families, by the activation type ggml pairs with the weight type (the codec table's `vec_dot`):
//! - **Q8_0 blocks of 32** for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL (Q4_1/Q5_1 also use Q8_1's stored sum
//!   `s` for their offsets): per block, the products are summed in eight lanes of four consecutive elements,
//!   each lane scaled by `f16(d_w) · f16(d_x)` into its own f32 accumulator (order on [`vec_dot_scalar`]).
//! - **Q8_K blocks of 256** for the k-quants and IQ4_XS: a weight block is read as 256 signed integer codes,
//!   an integer scale (and, for Q2_K/Q4_K/Q5_K, an integer min) per 16 elements and one or two f32 block
//!   multipliers; per block `Σ_s scale_s · Σ_{i∈s} code_i · q_i` and `Σ_s min_s · bsum_s` are exact integers
//!   that meet `d_w · d_x` and `dmin_w · d_x` in two fused multiply-adds of one f32 accumulator.

use super::int_dot::k_accumulate;
use crate::codecs::{GgmlType, VecDotType};

/// One activation row quantized to the weight type's vec_dot type: Q8_0 blocks of 32 as ggml-cpu's x86
/// `quantize_row_q8_0` makes them (`d = amax/127` stored as f16, `q = round_half_even(x · 127/amax)`), or
/// Q8_K blocks of 256 as `quantize_row_q8_K_ref` makes them (the value of largest magnitude maps to −127,
/// `d = 1/iscale` kept in f32, and the sum of every 16 codes).
pub struct Q8Row {
    /// The block's scale, as f32 (`f16(d)` for Q8_0).
    pub d: Vec<f32>,
    /// Q8_1's `s = f16(d · Σq)` per block (the unrounded d), for the `_1` weight types' offsets; Q8_0 only.
    pub s: Vec<f32>,
    /// Q8_K's sums of 16 consecutive codes.
    pub bsums: Vec<i16>,
    pub q: Vec<i8>,
}

impl Q8Row {
    /// `x` in the activation type `ty`'s weights are multiplied with (a [`fused`] type).
    pub fn for_type(ty: GgmlType, x: &[f32]) -> Self {
        match ty.traits().vec_dot {
            VecDotType::Q8K => Self::q8_k(x),
            _ => Self::q8_0(x),
        }
    }

    /// Q8_0 (with Q8_1's sums) blocks of 32.
    pub fn q8_0(x: &[f32]) -> Self {
        let nb = x.len() / 32;
        let (mut d, mut s, mut q) = (vec![0.0; nb], vec![0.0; nb], vec![0i8; x.len()]);
        q8_0_into(x, &mut d, &mut s, &mut q);
        Self {
            d,
            s,
            bsums: Vec::new(),
            q,
        }
    }

    /// Q8_K blocks of 256.
    pub fn q8_k(x: &[f32]) -> Self {
        let (mut d, mut bsums, mut q) = (
            vec![0.0; x.len() / 256],
            vec![0i16; x.len() / 16],
            vec![0i8; x.len()],
        );
        q8_k_into(x, &mut d, &mut bsums, &mut q);
        Self {
            d,
            s: Vec::new(),
            bsums,
            q,
        }
    }
}

/// `x` (a multiple of 32 values) as Q8_0 blocks into caller-owned slices: per block `d` (`f16(amax/127)` as
/// f32), Q8_1's `s` (`f16(d · Σq)` with the unrounded `d`) and the 32 codes — [`Q8Row::q8_0`] without the
/// allocations, for callers that quantize many rows into one buffer.
pub fn q8_0_into(x: &[f32], d: &mut [f32], s: &mut [f32], q: &mut [i8]) {
    debug_assert!(x.len().is_multiple_of(32));
    for (((b, qb), db), sb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d).zip(s) {
        let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let dd = amax / 127.0;
        *db = half::f16::from_f32(dd).to_f32();
        let mut sum = 0i32;
        for (o, &v) in qb.iter_mut().zip(b) {
            *o = crate::simd::round_even(v * id) as i8;
            sum += i32::from(*o);
        }
        *sb = half::f16::from_f32(dd * sum as f32).to_f32();
    }
}

/// `x` (a multiple of 256 values) as Q8_K blocks into caller-owned slices: per block `d` ([`q8_k_block`]),
/// the sums of each 16 consecutive codes, and the codes — [`Q8Row::q8_k`] without the allocations.
pub fn q8_k_into(x: &[f32], d: &mut [f32], bsums: &mut [i16], q: &mut [i8]) {
    debug_assert!(x.len().is_multiple_of(256));
    for ((xb, qb), db) in x.chunks_exact(256).zip(q.chunks_exact_mut(256)).zip(d) {
        *db = q8_k_block(xb, qb);
    }
    for (bs, qc) in bsums.iter_mut().zip(q.chunks_exact(16)) {
        *bs = qc.iter().map(|&v| i16::from(v)).sum();
    }
}

/// Per 32-code block of `q`, `−bias · Σq`: what weight codes stored `bias` above their value add back to a
/// product with these activations (the Q8_0 family's unsigned-code kernels).
pub(crate) fn bias_corrections(q: &[i8], bias: i32, out: &mut [i32]) {
    for (c, qb) in out.iter_mut().zip(q.chunks_exact(32)) {
        *c = -bias * qb.iter().map(|&v| i32::from(v)).sum::<i32>();
    }
}

/// One Q8_K block as `quantize_row_q8_K_ref` makes it: the value of largest magnitude `max` maps to −127,
/// `q = min(127, nearest_int(−127/max · x))`; returns `d = 1/iscale` (0 for an all-zero block).
pub fn q8_k_block(x: &[f32], q: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (o, &v) in q.iter_mut().zip(x) {
        // ggml's nearest_int: ties to even for |v| < 2^22 (always here: |iscale·x| ≤ 127).
        *o = crate::simd::round_even(iscale * v).min(127.0) as i8;
    }
    1.0 / iscale
}

/// Whether [`vec_dot`] takes weights of `ty`: every type ggml multiplies with 8-bit activations (all the
/// quantized GGUF types; not F32/F16/BF16).
pub fn fused(ty: GgmlType) -> bool {
    matches!(ty.traits().vec_dot, VecDotType::Q8_0 | VecDotType::Q8K)
}

/// Whether `ty` is one of the Q8_K family (256-element blocks with sub-block scales).
fn k_family(ty: GgmlType) -> bool {
    ty.traits().vec_dot == VecDotType::Q8K
}

/// A 32-element weight block's layout: bytes, where the codes start, whether it has an f16 offset `m`
/// after `d` (paired with Q8_1's `s`), and where its 32 fifth bits are (5-bit types).
struct Layout {
    bytes: usize,
    qs: usize,
    offset: bool,
    qh: Option<usize>,
}

fn layout(ty: GgmlType) -> Layout {
    let (bytes, qs, offset, qh) = match ty {
        GgmlType::Q4_0 | GgmlType::Iq4Nl => (18, 2, false, None),
        GgmlType::Q4_1 => (20, 4, true, None),
        GgmlType::Q5_0 => (22, 6, false, Some(2)),
        GgmlType::Q5_1 => (24, 8, true, Some(4)),
        GgmlType::Q8_0 => (34, 2, false, None),
        _ => unreachable!("a Q8_0-family layout of {ty:?}"),
    };
    Layout {
        bytes,
        qs,
        offset,
        qh,
    }
}

/// The 32 integer codes of one block as the dot product uses them: Q4_0 `q − 8`, Q5_0 `q − 16`, Q4_1/Q5_1
/// `q` (their offset is added separately), Q8_0 the signed bytes, IQ4_NL the table's values.
pub(super) fn codes(ty: GgmlType, blk: &[u8], w: &mut [i32; 32]) {
    let l = layout(ty);
    if ty == GgmlType::Q8_0 {
        for (o, &b) in w.iter_mut().zip(&blk[2..34]) {
            *o = i32::from(b as i8);
        }
        return;
    }
    let qs = &blk[l.qs..l.qs + 16];
    let qh = l.qh.map_or(0, |h| {
        u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]])
    });
    let bias = match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        _ => 0,
    };
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        w[j] = (u32::from(qs[j] & 15) | h0) as i32 - bias;
        w[j + 16] = (u32::from(qs[j] >> 4) | h1) as i32 - bias;
    }
    if ty == GgmlType::Iq4Nl {
        for v in w.iter_mut() {
            *v = i32::from(crate::codecs::KVALUES_IQ4NL[*v as usize]);
        }
    }
}

/// What the integer prompt tiles add to [`codes`] to make them unsigned bytes (0..=255): the bias the
/// type's codes subtract (Q4_0 8, Q5_0 16), 128 for the signed ones (Q8_0, IQ4_NL), 0 for the `_1` types.
pub(super) fn tile_bias(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q8_0 | GgmlType::Iq4Nl => 128,
        _ => 0,
    }
}

#[inline]
pub(super) fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// `Σ_c W[c] · x[c]` of one packed row of `ty` (a [`fused`] type) with its activation row
/// ([`Q8Row::for_type`] of the same type).
pub fn vec_dot(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked at runtime).
            #[allow(unsafe_code)]
            return unsafe {
                if k_family(ty) {
                    x86::vec_dot_k(ty, row, x)
                } else {
                    x86::vec_dot(ty, row, x)
                }
            };
        }
    }
    vec_dot_scalar(ty, row, x)
}

/// Tokens per call of [`vec_dot4`].
pub const TOKENS: usize = 4;

/// [`vec_dot`] of one packed row with four tokens' activation rows, `out[t] = vec_dot(ty, row, &xs[t])` bit
/// for bit: each weight block is decoded once for the four (its codes and scales stay in registers while
/// the four tokens' activations stream past), which is what makes prompts fast without AVX-512 VNNI. The
/// low-bit i-quants (no multi-token kernel) take four single-token calls.
pub fn vec_dot4(ty: GgmlType, row: &[u8], xs: &[Q8Row; TOKENS], out: &mut [f32; TOKENS]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked at runtime).
            #[allow(unsafe_code)]
            unsafe {
                x86::vec_dot_n(ty, row, xs, out);
            }
            return;
        }
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = vec_dot_scalar(ty, row, x);
    }
}

/// Whether [`vec_dot4`] decodes `ty`'s blocks once for its four tokens on this CPU (AVX2; the Q8_0 family,
/// the k-quants and IQ4_XS): where it does, a prompt's matmul runs best as rows of four-token dots.
pub fn many_tokens_fast(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && (!k_family(ty) || k_split(ty)) && fused(ty)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// The scalar reference of [`vec_dot`]. Q8_0 family, in the vector code's order: each block's products
/// summed exactly in eight lanes of four consecutive elements, each lane scaled by `f16(d_w) · f16(d_x)` into
/// its own f32 accumulator with a fused multiply-add (even and odd blocks into two sets of eight, added lane
/// by lane at the end, so the vector code has two independent chains), the eight added pairwise; the
/// `_1` types' offsets `m_w · s_x` summed block by block on the side and added last. Q8_K family: per block
/// `acc = fma(d_w·d_x, sumi, acc)`, then `acc = fma(−dmin_w·d_x, summ, acc)` for types with mins.
pub fn vec_dot_scalar(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    if k_family(ty) {
        return vec_dot_k_scalar(ty, row, x);
    }
    let l = layout(ty);
    // Even blocks into the first eight lanes, odd blocks into the second eight.
    let mut acc2 = [[0.0f32; 8]; 2];
    let mut offs = 0.0f32;
    let mut w = [0i32; 32];
    for (b, (blk, xq)) in row
        .chunks_exact(l.bytes)
        .zip(x.q.chunks_exact(32))
        .enumerate()
    {
        codes(ty, blk, &mut w);
        let d = f16_at(blk) * x.d[b];
        for (k, a) in acc2[b % 2].iter_mut().enumerate() {
            let s: i32 = (4 * k..4 * k + 4).map(|j| w[j] * i32::from(xq[j])).sum();
            *a = d.mul_add(s as f32, *a);
        }
        if l.offset {
            offs = f16_at(&blk[2..]).mul_add(x.s[b], offs);
        }
    }
    let acc: [f32; 8] = std::array::from_fn(|k| acc2[0][k] + acc2[1][k]);
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + offs
}

/// A Q8_K-family weight block read as integers: `value_i = d · scale_{i/16} · code_i − dmin · min_{i/16}`.
pub(super) struct KScales {
    pub d: f32,
    pub dmin: f32,
    pub scales: [i16; 16],
    /// All zero for the types without mins.
    pub mins: [i16; 16],
}

/// Bytes per block of a Q8_K-family type.
fn k_bytes(ty: GgmlType) -> usize {
    ty.traits().block_bytes
}

/// The block multipliers and per-16 integer scales and mins of one Q8_K-family block.
pub(super) fn k_scales(ty: GgmlType, blk: &[u8]) -> KScales {
    let mut k = KScales {
        d: 0.0,
        dmin: 0.0,
        scales: [0; 16],
        mins: [0; 16],
    };
    match ty {
        GgmlType::Q2K => {
            k.d = f16_at(&blk[80..]);
            k.dmin = f16_at(&blk[82..]);
            for (j, &s) in blk[..16].iter().enumerate() {
                k.scales[j] = i16::from(s & 15);
                k.mins[j] = i16::from(s >> 4);
            }
        }
        GgmlType::Q3K => {
            k.d = f16_at(&blk[108..]);
            for (o, s) in k
                .scales
                .iter_mut()
                .zip(crate::codecs::q3_k_scales(&blk[96..108]))
            {
                *o = s as i16;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            k.d = f16_at(blk);
            k.dmin = f16_at(&blk[2..]);
            for j in 0..8 {
                let (sc, m) = crate::codecs::scale_min_k4(j, &blk[4..16]);
                k.scales[2 * j..2 * j + 2].fill(i16::from(sc));
                k.mins[2 * j..2 * j + 2].fill(i16::from(m));
            }
        }
        GgmlType::Q6K => {
            k.d = f16_at(&blk[208..]);
            for (o, &s) in k.scales.iter_mut().zip(&blk[192..208]) {
                *o = i16::from(s as i8);
            }
        }
        GgmlType::Iq4Xs => {
            k.d = f16_at(blk);
            let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
            for ib in 0..8 {
                let ls = ((blk[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F)
                    | ((((scales_h >> (2 * ib)) & 3) as u8) << 4);
                k.scales[2 * ib..2 * ib + 2].fill(i16::from(ls) - 32);
            }
        }
        _ => unreachable!("a Q8_K-family block of {ty:?}"),
    }
    k
}

/// The 256 signed integer codes of one Q8_K-family block, in element order.
fn k_codes(ty: GgmlType, blk: &[u8], w: &mut [i8; 256]) {
    match ty {
        GgmlType::Q2K => {
            for (i, o) in w.iter_mut().enumerate() {
                let (h, g, l) = (i / 128, (i / 32) % 4, i % 32);
                *o = ((blk[16 + 32 * h + l] >> (2 * g)) & 3) as i8;
            }
        }
        GgmlType::Q3K => {
            for (i, o) in w.iter_mut().enumerate() {
                let (h, g, l) = (i / 128, (i / 32) % 4, i % 32);
                let low = (blk[32 + 32 * h + l] >> (2 * g)) & 3;
                let high = (blk[l] >> (4 * h + g)) & 1;
                *o = (low | (high << 2)) as i8 - 4;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (qs, qh) = if ty == GgmlType::Q4K {
                (&blk[16..144], None)
            } else {
                (&blk[48..176], Some(&blk[16..48]))
            };
            for (i, o) in w.iter_mut().enumerate() {
                let (c, hi, l) = (i / 64, (i / 32) % 2, i % 32);
                let nib = (qs[32 * c + l] >> (4 * hi)) & 15;
                let fifth = qh.map_or(0, |qh| ((qh[l] >> (2 * c + hi)) & 1) << 4);
                *o = (nib | fifth) as i8;
            }
        }
        GgmlType::Q6K => {
            for (i, o) in w.iter_mut().enumerate() {
                let (h, m, l) = (i / 128, (i / 32) % 4, i % 32);
                let ql = blk[64 * h + l + 32 * (m % 2)];
                let low = (ql >> (4 * (m / 2))) & 15;
                let high = (blk[128 + 32 * h + l] >> (2 * m)) & 3;
                *o = (low | (high << 4)) as i8 - 32;
            }
        }
        GgmlType::Iq4Xs => {
            for (i, o) in w.iter_mut().enumerate() {
                let (ib, hi, j) = (i / 32, (i / 16) % 2, i % 16);
                let nib = (blk[8 + 16 * ib + j] >> (4 * hi)) & 15;
                *o = crate::codecs::KVALUES_IQ4NL[nib as usize];
            }
        }
        _ => unreachable!("Q8_K-family codes of {ty:?}"),
    }
}

/// Whether [`k_codes`] / [`k_scales`] read `ty` (the k-quants and IQ4_XS; the low-bit i-quants are read
/// by the codecs' `lowbit_int_reading`, codes and scales at once).
pub(super) fn k_split(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Iq4Xs
    )
}

/// One Q8_K-family block as integers: codes into `w`, the multipliers and scales returned.
fn k_block(ty: GgmlType, blk: &[u8], w: &mut [i8; 256]) -> KScales {
    if k_split(ty) {
        k_codes(ty, blk, w);
        return k_scales(ty, blk);
    }
    let mut k = KScales {
        d: 0.0,
        dmin: 0.0,
        scales: [0; 16],
        mins: [0; 16],
    };
    let Some(d) = crate::codecs::lowbit_int_reading(ty, blk, w, &mut k.scales) else {
        unreachable!("a Q8_K-family block of {ty:?}")
    };
    k.d = d;
    k
}

/// `Σ_s min_s · bsum_s` of one block.
#[inline]
fn k_mins(k: &KScales, bsums: &[i16]) -> i32 {
    k.mins
        .iter()
        .zip(bsums)
        .map(|(&m, &b)| i32::from(m) * i32::from(b))
        .sum()
}

pub(super) fn vec_dot_k_scalar(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    let mut w = [0i8; 256];
    for (b, (blk, xq)) in row
        .chunks_exact(k_bytes(ty))
        .zip(x.q.chunks_exact(256))
        .enumerate()
    {
        let k = k_block(ty, blk, &mut w);
        let sumi: i32 = (0..16)
            .map(|s| {
                let p: i32 = (16 * s..16 * s + 16)
                    .map(|i| i32::from(w[i]) * i32::from(xq[i]))
                    .sum();
                i32::from(k.scales[s]) * p
            })
            .sum();
        let summ = k_mins(&k, &x.bsums[16 * b..16 * b + 16]);
        acc = k_accumulate(acc, k.d, k.dmin, x.d[b], sumi, summ);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
pub(super) fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    use super::Q8Row;
    use crate::backend::int_dot::k_accumulate;
    use crate::backend::int_dot::x86::{hsum_i32, pairs_i8, scaled};
    use crate::codecs::GgmlType;
    use std::arch::x86_64::*;

    /// The eight lane sums (four consecutive elements each) of 32 signed byte products, exact.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_i8(a: __m256i, b: __m256i) -> __m256i {
        _mm256_madd_epi16(pairs_i8(a, b), _mm256_set1_epi16(1))
    }

    /// The 32 fifth bits at `p` as bytes: 0xFF where set.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bits_as_bytes(p: &[u8]) -> __m256i {
        let qh = i32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        let v = _mm256_set1_epi32(qh);
        // Byte j takes source byte j / 8, then tests its bit j % 8.
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0x0000_0000_0000_0000,
        );
        let bytes = _mm256_shuffle_epi8(v, shuf);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
    }

    /// IQ4_NL's table in both 128-bit halves, for `pshufb`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn iq4_table() -> __m256i {
        // SAFETY: the table has 16 bytes.
        let t = unsafe { _mm_loadu_si128(crate::codecs::KVALUES_IQ4NL.as_ptr().cast()) };
        _mm256_set_m128i(t, t)
    }

    /// 16 bytes of nibbles as 32 bytes: low nibbles first, then high.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles16(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 bytes at `p`.
        let qs = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs),
            _mm256_set1_epi8(15),
        )
    }

    /// [`super::vec_dot`] of the Q8_0 family with AVX2, FMA and F16C, in the order
    /// [`super::vec_dot_scalar`] documents; one monomorphised loop per type.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
        // SAFETY: forwarded (the features are enabled on this function).
        unsafe {
            match ty {
                GgmlType::Q8_0 => dot_q8_0_family::<Q8_0>(row, x),
                GgmlType::Q4_0 => dot_q8_0_family::<Q4_0>(row, x),
                GgmlType::Q4_1 => dot_q8_0_family::<Q4_1>(row, x),
                GgmlType::Iq4Nl => dot_q8_0_family::<IQ4_NL>(row, x),
                GgmlType::Q5_0 => dot_q8_0_family::<Q5_0>(row, x),
                GgmlType::Q5_1 => dot_q8_0_family::<Q5_1>(row, x),
                _ => unreachable!("a Q8_0-family type: {ty:?}"),
            }
        }
    }

    /// The Q8_0 family's type codes for the monomorphised kernels (shared with `cpu_q8_repack`).
    pub(crate) const Q8_0: u8 = 0;
    pub(crate) const Q4_0: u8 = 1;
    pub(crate) const Q4_1: u8 = 2;
    pub(crate) const IQ4_NL: u8 = 3;
    pub(crate) const Q5_0: u8 = 4;
    pub(crate) const Q5_1: u8 = 5;

    /// One block's 32 codes as signed bytes (type `T`, block at `p`).
    #[inline(always)]
    unsafe fn block_codes<const T: u8>(p: *const u8, table: __m256i) -> __m256i {
        // SAFETY (all arms): the caller passes a whole block of type T at `p`.
        unsafe {
            match T {
                Q8_0 => _mm256_loadu_si256(p.add(2).cast()),
                Q4_0 => _mm256_sub_epi8(nibbles16(p.add(2)), _mm256_set1_epi8(8)),
                Q4_1 => nibbles16(p.add(4)),
                IQ4_NL => _mm256_shuffle_epi8(table, nibbles16(p.add(2))),
                Q5_0 => {
                    // q − 16: the nibble with 0xF0 where the fifth bit is clear.
                    let hi = bits_as_bytes(std::slice::from_raw_parts(p.add(2), 4));
                    _mm256_or_si256(
                        nibbles16(p.add(6)),
                        _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8)),
                    )
                }
                _ => {
                    let hi = bits_as_bytes(std::slice::from_raw_parts(p.add(4), 4));
                    _mm256_or_si256(
                        nibbles16(p.add(8)),
                        _mm256_and_si256(hi, _mm256_set1_epi8(0x10)),
                    )
                }
            }
        }
    }

    /// Bytes per block of type `T`.
    const fn block_bytes<const T: u8>() -> usize {
        match T {
            Q8_0 => 34,
            Q4_0 | IQ4_NL => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            _ => 24,
        }
    }

    /// One row of a Q8_0-family type written into a 16-row panel as unsigned codes (`code + bias`, see
    /// [`crate::backend::cpu_q8_tile`]): block `b`'s codes `4g..4g + 4` of row `r` go to
    /// `dst[b·512 + g·64 + r·4..][..4]`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn panel_row(ty: GgmlType, row: &[u8], r: usize, dst: &mut [u8]) {
        // SAFETY: forwarded (the feature is enabled on this function).
        unsafe {
            match ty {
                GgmlType::Q8_0 => panel_row_t::<Q8_0>(row, r, dst),
                GgmlType::Q4_0 => panel_row_t::<Q4_0>(row, r, dst),
                GgmlType::Q4_1 => panel_row_t::<Q4_1>(row, r, dst),
                GgmlType::Iq4Nl => panel_row_t::<IQ4_NL>(row, r, dst),
                GgmlType::Q5_0 => panel_row_t::<Q5_0>(row, r, dst),
                GgmlType::Q5_1 => panel_row_t::<Q5_1>(row, r, dst),
                _ => unreachable!("a Q8_0-family type: {ty:?}"),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn panel_row_t<const T: u8>(row: &[u8], r: usize, dst: &mut [u8]) {
        let bytes = block_bytes::<T>();
        let nb = row.len() / bytes;
        assert!(r < 16 && dst.len() >= nb * 512);
        let bias = super::tile_bias(match T {
            Q8_0 => GgmlType::Q8_0,
            IQ4_NL => GgmlType::Iq4Nl,
            Q4_0 => GgmlType::Q4_0,
            Q5_0 => GgmlType::Q5_0,
            _ => GgmlType::Q4_1,
        });
        // Wrapping byte addition: 128 is −128 as a byte.
        let bias = _mm256_set1_epi8(bias as u8 as i8);
        let table = unsafe { iq4_table() };
        let mut tmp = [0u32; 8];
        for b in 0..nb {
            // SAFETY: block b < nb lies in `row`; `tmp` holds 32 bytes.
            unsafe {
                let u = _mm256_add_epi8(block_codes::<T>(row.as_ptr().add(b * bytes), table), bias);
                _mm256_storeu_si256(tmp.as_mut_ptr().cast(), u);
            }
            let base = b * 512 + r * 4;
            for (g, v) in tmp.iter().enumerate() {
                dst[base + g * 64..base + g * 64 + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0_family<const T: u8>(row: &[u8], x: &Q8Row) -> f32 {
        let bytes = block_bytes::<T>();
        let offset = matches!(T, Q4_1 | Q5_1);
        let nb = row.len() / bytes;
        assert!(x.q.len() >= nb * 32 && x.d.len() >= nb && (!offset || x.s.len() >= nb));
        let mut offs = 0.0f32;
        let table = unsafe { iq4_table() };
        let (rp, qp) = (row.as_ptr(), x.q.as_ptr());
        // Block b's lane sums scaled by d_w · d_x (and, for the `_1` types, its offset added to `offs`).
        let block = |b: usize, offs: &mut f32| -> (__m256, __m256) {
            // SAFETY: block b < nb lies in `row`; 32 activation bytes and the scales of block b lie in `x`
            // (asserted above).
            unsafe {
                let p = rp.add(b * bytes);
                let w = block_codes::<T>(p, table);
                let v = _mm256_loadu_si256(qp.add(32 * b).cast());
                let s = _mm256_cvtepi32_ps(lanes_i8(w, v));
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    u16::from_le_bytes([*p, *p.add(1)]),
                ))));
                if offset {
                    let m = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                        u16::from_le_bytes([*p.add(2), *p.add(3)]),
                    ))));
                    *offs = m.mul_add(*x.s.get_unchecked(b), *offs);
                }
                (_mm256_set1_ps(dw * *x.d.get_unchecked(b)), s)
            }
        };
        // Two independent chains: even blocks into acc0, odd into acc1.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut b = 0;
        while b + 2 <= nb {
            // The rows of a task follow each other in memory: keep the stream ahead of the loads.
            // SAFETY: a prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add(b * bytes + 512).cast());
            let (d0, s0) = block(b, &mut offs);
            let (d1, s1) = block(b + 1, &mut offs);
            acc0 = _mm256_fmadd_ps(d0, s0, acc0);
            acc1 = _mm256_fmadd_ps(d1, s1, acc1);
            b += 2;
        }
        if b < nb {
            let (d0, s0) = block(b, &mut offs);
            acc0 = _mm256_fmadd_ps(d0, s0, acc0);
        }
        let acc = _mm256_add_ps(acc0, acc1);
        // (a0+a4, a1+a5, a2+a6, a3+a7), then (s0+s2) + (s1+s3).
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + offs
    }

    /// [`super::k_codes`] with AVX2: the same 256 codes (what the tests compare; the dot consumes
    /// [`k_codes_with`]'s chunks directly).
    #[cfg(test)]
    #[target_feature(enable = "avx2")]
    pub unsafe fn k_codes(ty: GgmlType, blk: &[u8], w: &mut [i8; 256]) {
        let o = w.as_mut_ptr();
        // SAFETY: every chunk starts at a multiple of 32 below 256, inside the 256 codes.
        unsafe { k_codes_with(ty, blk, |at, v| _mm256_storeu_si256(o.add(at).cast(), v)) }
    }

    /// One row of a [`super::k_split`] type written into a 16-row panel as unsigned codes (`code + bias`):
    /// block `b`'s codes `4g..4g + 4` of row `r` go to `dst[b·4096 + g·64 + r·4..][..4]`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn k_panel_row(ty: GgmlType, row: &[u8], r: usize, bias: i32, dst: &mut [u8]) {
        let bytes = ty.traits().block_bytes;
        let nb = row.len() / bytes;
        assert!(r < 16 && dst.len() >= nb * 4096);
        let bias = _mm256_set1_epi8(bias as u8 as i8);
        let mut tmp = [0u32; 8];
        for (b, blk) in row.chunks_exact(bytes).enumerate() {
            // SAFETY: `blk` is one whole block; `tmp` holds 32 bytes.
            unsafe {
                k_codes_with(ty, blk, |off, v| {
                    _mm256_storeu_si256(tmp.as_mut_ptr().cast(), _mm256_add_epi8(v, bias));
                    let base = b * 4096 + (off / 4) * 64 + r * 4;
                    for (g, v) in tmp.iter().enumerate() {
                        dst[base + g * 64..base + g * 64 + 4].copy_from_slice(&v.to_le_bytes());
                    }
                });
            }
        }
    }

    const Q2K: u8 = 10;
    const Q3K: u8 = 11;
    const Q4K: u8 = 12;
    const Q5K: u8 = 13;
    const Q6K: u8 = 14;
    const IQ4XS: u8 = 15;

    /// What [`k_chunks`]' codes of `T` carry above the signed codes: Q3_K 4, Q6_K 32 (their stored codes
    /// are unsigned), 0 for the rest (IQ4_XS's table values are signed, the other types' codes unsigned).
    const fn k_chunk_bias<const T: u8>() -> i32 {
        match T {
            Q3K => 4,
            Q6K => 32,
            _ => 0,
        }
    }

    /// The 256 codes of one block of `ty` handed to `st` as eight chunks of 32 (`st(offset, codes)`), as
    /// the signed codes of [`super::k_codes`].
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn k_codes_with(ty: GgmlType, blk: &[u8], mut st: impl FnMut(usize, __m256i)) {
        assert!(blk.len() >= ty.traits().block_bytes);
        #[inline(always)]
        unsafe fn signed<const T: u8>(blk: &[u8], st: &mut impl FnMut(usize, __m256i)) {
            let bias = _mm256_set1_epi8(k_chunk_bias::<T>() as i8);
            // SAFETY: `blk` holds one whole block (asserted).
            unsafe { k_chunks::<T>(blk.as_ptr(), |at, v| st(at, _mm256_sub_epi8(v, bias))) }
        }
        // SAFETY: forwarded (AVX2 is enabled on this function).
        unsafe {
            match ty {
                GgmlType::Q2K => signed::<Q2K>(blk, &mut st),
                GgmlType::Q3K => signed::<Q3K>(blk, &mut st),
                GgmlType::Q4K => signed::<Q4K>(blk, &mut st),
                GgmlType::Q5K => signed::<Q5K>(blk, &mut st),
                GgmlType::Q6K => signed::<Q6K>(blk, &mut st),
                GgmlType::Iq4Xs => signed::<IQ4XS>(blk, &mut st),
                _ => unreachable!("Q8_K-family codes of {ty:?}"),
            }
        }
    }

    /// The 256 codes of one block of `T` at `p` handed to `st` as eight chunks of 32 (`st(offset, codes)`),
    /// each chunk once, decoding and consuming without a trip through memory: the stored unsigned codes
    /// (Q3_K's and Q6_K's [`k_chunk_bias`] above the signed ones), IQ4_XS's signed table values.
    #[inline(always)]
    unsafe fn k_chunks<const T: u8>(p: *const u8, mut st: impl FnMut(usize, __m256i)) {
        let m15 = _mm256_set1_epi8(15);
        let m3 = _mm256_set1_epi8(3);
        // SAFETY (all loads below): the caller passes one whole block of `T` at `p`; every offset is
        // inside it.
        unsafe {
            let ld = |off: usize| _mm256_loadu_si256(p.add(off).cast());
            match T {
                Q2K | Q3K => {
                    let qs = if T == Q2K { 16 } else { 32 };
                    let hmask = ld(0);
                    for h in 0..2 {
                        let q = ld(qs + 32 * h);
                        // Shifts by constants: the loops unroll.
                        for g in 0..4 {
                            let sh = _mm_cvtsi32_si128((2 * g) as i32);
                            let mut c = _mm256_and_si256(_mm256_srl_epi16(q, sh), m3);
                            if T == Q3K {
                                // The third bit, bit 4h + g of hmask's byte, to bit 2.
                                let hb = _mm_cvtsi32_si128((4 * h + g) as i32);
                                let hi = _mm256_and_si256(
                                    _mm256_srl_epi16(hmask, hb),
                                    _mm256_set1_epi8(1),
                                );
                                c = _mm256_or_si256(c, _mm256_slli_epi16(hi, 2));
                            }
                            st(128 * h + 32 * g, c);
                        }
                    }
                }
                Q4K | Q5K => {
                    let qs = if T == Q4K { 16 } else { 48 };
                    let qh = ld(16);
                    let one = _mm256_set1_epi8(1);
                    for c in 0..4 {
                        let q = ld(qs + 32 * c);
                        let mut lo = _mm256_and_si256(q, m15);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m15);
                        if T == Q5K {
                            // Fifth bits 2c and 2c + 1 of each byte of qh, to bit 4.
                            let bit = |k: usize| {
                                let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(k as i32));
                                _mm256_slli_epi16(_mm256_and_si256(v, one), 4)
                            };
                            lo = _mm256_or_si256(lo, bit(2 * c));
                            hi = _mm256_or_si256(hi, bit(2 * c + 1));
                        }
                        st(64 * c, lo);
                        st(64 * c + 32, hi);
                    }
                }
                Q6K => {
                    let m30 = _mm256_set1_epi8(0x30);
                    for h in 0..2 {
                        let (l0, l1, qh) = (ld(64 * h), ld(64 * h + 32), ld(128 + 32 * h));
                        // Bits 2m, 2m+1 of qh to bits 4, 5 of each byte (the shifts cross bytes
                        // only into bits the mask drops).
                        let h0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30);
                        let h1 = _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30);
                        let h2 = _mm256_and_si256(qh, m30);
                        let h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30);
                        let lo = |v: __m256i| _mm256_and_si256(v, m15);
                        let hi = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
                        st(128 * h, _mm256_or_si256(lo(l0), h0));
                        st(128 * h + 32, _mm256_or_si256(lo(l1), h1));
                        st(128 * h + 64, _mm256_or_si256(hi(l0), h2));
                        st(128 * h + 96, _mm256_or_si256(hi(l1), h3));
                    }
                }
                _ => {
                    let table = iq4_table();
                    for ib in 0..8 {
                        let nib = nibbles16(p.add(8 + 16 * ib));
                        st(32 * ib, _mm256_shuffle_epi8(table, nib));
                    }
                }
            }
        }
    }

    /// One block's per-16 scales and (Q2_K, Q4_K, Q5_K) mins as 16 `i16` lanes each, and its `d`, `dmin`:
    /// the numbers of [`super::k_scales`], decoded with vector operations where the layout allows.
    #[inline(always)]
    unsafe fn k_scale_vecs<const T: u8>(p: *const u8) -> (__m256i, __m256i, f32, f32) {
        let f16 = |off: usize| {
            // SAFETY: inside the block (the caller passes a whole one).
            half::f16::from_bits(unsafe { p.add(off).cast::<u16>().read_unaligned() }).to_f32()
        };
        let zero = _mm256_setzero_si256();
        // SAFETY: every read lies in the block.
        unsafe {
            match T {
                Q2K => {
                    let v = _mm_loadu_si128(p.cast());
                    let m15 = _mm_set1_epi8(15);
                    let sc = _mm256_cvtepu8_epi16(_mm_and_si128(v, m15));
                    let mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m15));
                    (sc, mn, f16(80), f16(82))
                }
                Q3K => {
                    // Sixteen 6-bit scales from 12 bytes, four at a time: low nibbles of bytes 0–7, then
                    // their high nibbles, each with two bits of bytes 8–11 above; less 32.
                    let w = |k: usize| p.add(96 + 4 * k).cast::<u32>().read_unaligned();
                    let (a0, a1, t) = (w(0), w(1), w(2));
                    let (m4, m2) = (0x0F0F_0F0Fu32, 0x0303_0303u32);
                    let v = _mm_setr_epi32(
                        ((a0 & m4) | ((t & m2) << 4)) as i32,
                        ((a1 & m4) | (((t >> 2) & m2) << 4)) as i32,
                        (((a0 >> 4) & m4) | (((t >> 4) & m2) << 4)) as i32,
                        (((a1 >> 4) & m4) | (((t >> 6) & m2) << 4)) as i32,
                    );
                    let sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(v), _mm256_set1_epi16(32));
                    (sc, zero, f16(108), 0.0)
                }
                Q4K | Q5K => {
                    // Six-bit scales and mins of the eight sub-blocks of 32 from 12 bytes, four at a time.
                    let w = |k: usize| p.add(4 + 4 * k).cast::<u32>().read_unaligned();
                    let (u0, u1, u2) = (w(0), w(1), w(2));
                    let (m6, m4, m2) = (0x3F3F_3F3Fu32, 0x0F0F_0F0Fu32, 0x0303_0303u32);
                    let sc =
                        u64::from(u0 & m6) | u64::from((u2 & m4) | (((u0 >> 6) & m2) << 4)) << 32;
                    let mn = u64::from(u1 & m6)
                        | u64::from(((u2 >> 4) & m4) | (((u1 >> 6) & m2) << 4)) << 32;
                    // Each per-32 value for both of its halves of 16.
                    let dup = |v: u64| {
                        let b = _mm_cvtsi64_si128(v as i64);
                        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(b, b))
                    };
                    (dup(sc), dup(mn), f16(0), f16(2))
                }
                Q6K => (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast())),
                    zero,
                    f16(208),
                    0.0,
                ),
                _ => {
                    // Eight 6-bit scales (one per 32 codes): nibble ib of bytes 4–7 (low nibble first)
                    // with bits 2ib, 2ib + 1 of the u16 at 2 above; less 32.
                    let l = p.add(4).cast::<u32>().read_unaligned();
                    let h = u64::from(p.add(2).cast::<u16>().read_unaligned());
                    let nib = _mm_unpacklo_epi8(
                        _mm_cvtsi32_si128((l & 0x0F0F_0F0F) as i32),
                        _mm_cvtsi32_si128(((l >> 4) & 0x0F0F_0F0F) as i32),
                    );
                    let mut high = 0u64;
                    for ib in 0..8 {
                        high |= ((h >> (2 * ib)) & 3) << (8 * ib + 4);
                    }
                    let b = _mm_or_si128(nib, _mm_cvtsi64_si128(high as i64));
                    let sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(b, b));
                    (
                        _mm256_sub_epi16(sc, _mm256_set1_epi16(32)),
                        zero,
                        f16(0),
                        0.0,
                    )
                }
            }
        }
    }

    /// [`super::vec_dot`] of the Q8_K family with AVX2: per block the exact integer sums of the scalar
    /// reference (codes against activations, pair sums times the per-16 scales in 32-bit lanes; the
    /// unsigned codes' bias and the mins against the activations' 16-code sums), one horizontal sum each,
    /// then the reference's float step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_k(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
        let bytes = ty.traits().block_bytes;
        // SAFETY: forwarded (the features are enabled on this function; `bytes` is `ty`'s block).
        unsafe {
            match ty {
                GgmlType::Q2K => dot_k::<Q2K>(row, bytes, x),
                GgmlType::Q3K => dot_k::<Q3K>(row, bytes, x),
                GgmlType::Q4K => dot_k::<Q4K>(row, bytes, x),
                GgmlType::Q5K => dot_k::<Q5K>(row, bytes, x),
                GgmlType::Q6K => dot_k::<Q6K>(row, bytes, x),
                GgmlType::Iq4Xs => dot_k::<IQ4XS>(row, bytes, x),
                _ => dot_lowbit(ty, row, x),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_k<const T: u8>(row: &[u8], bytes: usize, x: &Q8Row) -> f32 {
        let nb = row.len() / bytes;
        assert!(x.q.len() >= nb * 256 && x.d.len() >= nb && x.bsums.len() >= nb * 16);
        let bias = _mm256_set1_epi32(k_chunk_bias::<T>());
        let mut acc = 0.0f32;
        for b in 0..nb {
            // SAFETY: block b lies in `row`, its activations and sums in `x` (asserted).
            unsafe {
                let blk = row.as_ptr().add(b * bytes);
                let (sc, mn, d, dmin) = k_scale_vecs::<T>(blk);
                let (lo, hi) = (_mm256_unpacklo_epi16(sc, sc), _mm256_unpackhi_epi16(sc, sc));
                let xp = x.q.as_ptr().add(b * 256);
                let mut sum = _mm256_setzero_si256();
                k_chunks::<T>(blk, |at, w| {
                    let xv = _mm256_loadu_si256(xp.add(at).cast());
                    let p = if T == IQ4XS {
                        pairs_i8(w, xv)
                    } else {
                        // Unsigned codes (≤ 63): maddubs directly, no pair saturates.
                        _mm256_maddubs_epi16(w, xv)
                    };
                    sum = scaled(sum, p, lo, hi, at / 32);
                });
                let bs = _mm256_loadu_si256(x.bsums.as_ptr().add(16 * b).cast());
                if k_chunk_bias::<T>() != 0 {
                    sum =
                        _mm256_sub_epi32(sum, _mm256_mullo_epi32(_mm256_madd_epi16(sc, bs), bias));
                }
                let summ = if matches!(T, Q2K | Q4K | Q5K) {
                    hsum_i32(_mm256_madd_epi16(mn, bs))
                } else {
                    0
                };
                acc = k_accumulate(acc, d, dmin, x.d[b], hsum_i32(sum), summ);
            }
        }
        acc
    }

    /// [`super::vec_dot4`] with AVX2: one monomorphised loop per type and token count, each token's
    /// arithmetic that of the single-token kernel ([`dot_q8_0_family`], [`dot_k`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot_n<const N: usize>(
        ty: GgmlType,
        row: &[u8],
        xs: &[Q8Row; N],
        out: &mut [f32; N],
    ) {
        let bytes = ty.traits().block_bytes;
        // SAFETY: forwarded (the features are enabled on this function; `bytes` is `ty`'s block).
        unsafe {
            match ty {
                GgmlType::Q8_0 => dot_q8_0_family_n::<Q8_0, N>(row, xs, out),
                GgmlType::Q4_0 => dot_q8_0_family_n::<Q4_0, N>(row, xs, out),
                GgmlType::Q4_1 => dot_q8_0_family_n::<Q4_1, N>(row, xs, out),
                GgmlType::Iq4Nl => dot_q8_0_family_n::<IQ4_NL, N>(row, xs, out),
                GgmlType::Q5_0 => dot_q8_0_family_n::<Q5_0, N>(row, xs, out),
                GgmlType::Q5_1 => dot_q8_0_family_n::<Q5_1, N>(row, xs, out),
                GgmlType::Q2K => dot_k_n::<Q2K, N>(row, bytes, xs, out),
                GgmlType::Q3K => dot_k_n::<Q3K, N>(row, bytes, xs, out),
                GgmlType::Q4K => dot_k_n::<Q4K, N>(row, bytes, xs, out),
                GgmlType::Q5K => dot_k_n::<Q5K, N>(row, bytes, xs, out),
                GgmlType::Q6K => dot_k_n::<Q6K, N>(row, bytes, xs, out),
                GgmlType::Iq4Xs => dot_k_n::<IQ4XS, N>(row, bytes, xs, out),
                _ => {
                    for (o, x) in out.iter_mut().zip(xs) {
                        *o = dot_lowbit(ty, row, x);
                    }
                }
            }
        }
    }

    /// [`dot_q8_0_family`] for `N` tokens: each block's codes and `d` read once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0_family_n<const T: u8, const N: usize>(
        row: &[u8],
        xs: &[Q8Row; N],
        out: &mut [f32; N],
    ) {
        let bytes = block_bytes::<T>();
        let offset = matches!(T, Q4_1 | Q5_1);
        let nb = row.len() / bytes;
        for x in xs {
            assert!(x.q.len() >= nb * 32 && x.d.len() >= nb && (!offset || x.s.len() >= nb));
        }
        let table = unsafe { iq4_table() };
        let rp = row.as_ptr();
        let mut offs = [0.0f32; N];
        // Even blocks into acc[0], odd into acc[1], as the single-token kernel's two chains.
        let mut acc = [[_mm256_setzero_ps(); N]; 2];
        for b in 0..nb {
            // SAFETY: block b < nb lies in `row`; 32 activation bytes and the scales of block b lie in
            // every `x` (asserted above).
            unsafe {
                let p = rp.add(b * bytes);
                let w = block_codes::<T>(p, table);
                let f16 = |o: usize| {
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                        u16::from_le_bytes([*p.add(o), *p.add(o + 1)]),
                    ))))
                };
                let dw = f16(0);
                let m = if offset { f16(2) } else { 0.0 };
                let chain = &mut acc[b % 2];
                for t in 0..N {
                    let x = &xs[t];
                    let v = _mm256_loadu_si256(x.q.as_ptr().add(32 * b).cast());
                    let s = _mm256_cvtepi32_ps(lanes_i8(w, v));
                    let d = _mm256_set1_ps(dw * *x.d.get_unchecked(b));
                    chain[t] = _mm256_fmadd_ps(d, s, chain[t]);
                    if offset {
                        offs[t] = m.mul_add(*x.s.get_unchecked(b), offs[t]);
                    }
                }
            }
        }
        for t in 0..N {
            let a = _mm256_add_ps(acc[0][t], acc[1][t]);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            out[t] = _mm_cvtss_f32(s1) + offs[t];
        }
    }

    /// The horizontal sums of the first four of `v` (eight i32 lanes each) as four lanes, exact.
    #[inline(always)]
    unsafe fn hsum4<const N: usize>(v: &[__m256i; N]) -> __m128i {
        let (a, b) = (v[0], v[1 % N]);
        let (c, d) = (v[2 % N], v[3 % N]);
        // Pairwise: (a01 a23 b01 b23 | a45 a67 b45 b67), then (a b c d | a' b' c' d').
        let ab = _mm256_hadd_epi32(a, b);
        let cd = _mm256_hadd_epi32(c, d);
        let abcd = _mm256_hadd_epi32(ab, cd);
        _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256(abcd, 1),
        )
    }

    /// [`dot_k`] for `N` tokens: each block's scales decoded and codes unpacked once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_k_n<const T: u8, const N: usize>(
        row: &[u8],
        bytes: usize,
        xs: &[Q8Row; N],
        out: &mut [f32; N],
    ) {
        let nb = row.len() / bytes;
        for x in xs {
            assert!(x.q.len() >= nb * 256 && x.d.len() >= nb && x.bsums.len() >= nb * 16);
        }
        let bias = _mm256_set1_epi32(k_chunk_bias::<T>());
        let mut acc = [0.0f32; N];
        for b in 0..nb {
            // SAFETY: block b lies in `row`, its activations and sums in every `x` (asserted).
            unsafe {
                let blk = row.as_ptr().add(b * bytes);
                let (sc, mn, d, dmin) = k_scale_vecs::<T>(blk);
                let (lo, hi) = (_mm256_unpacklo_epi16(sc, sc), _mm256_unpackhi_epi16(sc, sc));
                let mut sum = [_mm256_setzero_si256(); N];
                k_chunks::<T>(blk, |at, w| {
                    // The signed codes' magnitudes, once for the N tokens.
                    let aw = _mm256_sign_epi8(w, w);
                    for t in 0..N {
                        let xv = _mm256_loadu_si256(xs[t].q.as_ptr().add(b * 256 + at).cast());
                        let p = if T == IQ4XS {
                            _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w))
                        } else {
                            _mm256_maddubs_epi16(w, xv)
                        };
                        sum[t] = scaled(sum[t], p, lo, hi, at / 32);
                    }
                });
                let mut mins = [_mm256_setzero_si256(); N];
                for t in 0..N {
                    let bs = _mm256_loadu_si256(xs[t].bsums.as_ptr().add(16 * b).cast());
                    if k_chunk_bias::<T>() != 0 {
                        let c = _mm256_mullo_epi32(_mm256_madd_epi16(sc, bs), bias);
                        sum[t] = _mm256_sub_epi32(sum[t], c);
                    }
                    if matches!(T, Q2K | Q4K | Q5K) {
                        mins[t] = _mm256_madd_epi16(mn, bs);
                    }
                }
                if N == 4 {
                    // The four tokens' sums side by side, and the float step in their four lanes (the
                    // same operations as `k_accumulate`, lane by lane).
                    let sumi = _mm_cvtepi32_ps(hsum4(&sum));
                    let dx = _mm_setr_ps(
                        *xs[0].d.get_unchecked(b),
                        *xs[1 % N].d.get_unchecked(b),
                        *xs[2 % N].d.get_unchecked(b),
                        *xs[3 % N].d.get_unchecked(b),
                    );
                    let mut a = _mm_loadu_ps(acc.as_ptr());
                    a = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(d), dx), sumi, a);
                    if matches!(T, Q2K | Q4K | Q5K) {
                        let summ = _mm_cvtepi32_ps(hsum4(&mins));
                        let m = _mm_mul_ps(_mm_set1_ps(dmin), dx);
                        a = _mm_fnmadd_ps(m, summ, a);
                    }
                    _mm_storeu_ps(acc.as_mut_ptr(), a);
                } else {
                    for t in 0..N {
                        let summ = if matches!(T, Q2K | Q4K | Q5K) {
                            hsum_i32(mins[t])
                        } else {
                            0
                        };
                        let dx = *xs[t].d.get_unchecked(b);
                        acc[t] = k_accumulate(acc[t], d, dmin, dx, hsum_i32(sum[t]), summ);
                    }
                }
            }
        }
        *out = acc;
    }

    /// The low-bit i-quants ([`crate::backend::cpu_q8_iq`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_lowbit(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
        // SAFETY: forwarded (the features are enabled on this function).
        unsafe { crate::backend::cpu_q8_iq::x86::vec_dot(ty, row, &x.q, &x.d) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every type with an integer kernel.
    fn types() -> Vec<GgmlType> {
        let t: Vec<GgmlType> = GgmlType::all().filter(|&t| fused(t)).collect();
        assert_eq!(t.len(), 19, "{t:?}");
        t
    }

    /// Each block's exact contribution `(Σ value_w · value_x, Σ |…|)` in f64, from the integer reading of the
    /// block ([`codes`] or [`k_codes`] with [`k_scales`]).
    fn f64_dot(ty: GgmlType, row: &[u8], q: &Q8Row) -> (f64, f64) {
        let (mut want, mut scale) = (0.0f64, 0.0f64);
        if k_family(ty) {
            let mut w = [0i8; 256];
            for (b, (blk, xq)) in row
                .chunks_exact(k_bytes(ty))
                .zip(q.q.chunks_exact(256))
                .enumerate()
            {
                let k = k_block(ty, blk, &mut w);
                for i in 0..256 {
                    let v = f64::from(k.d) * f64::from(k.scales[i / 16]) * f64::from(w[i])
                        - f64::from(k.dmin) * f64::from(k.mins[i / 16]);
                    let t = v * f64::from(q.d[b]) * f64::from(xq[i]);
                    want += t;
                    scale += t.abs();
                }
            }
            return (want, scale);
        }
        let l = layout(ty);
        let mut wq = [0i32; 32];
        for (b, (blk, xq)) in row
            .chunks_exact(l.bytes)
            .zip(q.q.chunks_exact(32))
            .enumerate()
        {
            codes(ty, blk, &mut wq);
            let si: i64 = wq
                .iter()
                .zip(xq)
                .map(|(&a, &v)| i64::from(a) * i64::from(v))
                .sum();
            let t = f64::from(f16_at(blk)) * f64::from(q.d[b]) * si as f64;
            let o = if l.offset {
                f64::from(f16_at(&blk[2..])) * f64::from(q.s[b])
            } else {
                0.0
            };
            want += t + o;
            scale += t.abs() + o.abs();
        }
        (want, scale)
    }

    #[test]
    fn the_vector_kernels_equal_the_scalar_reference_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for ty in types() {
            let block = ty.traits().block_elems;
            for cols in [block, 256, 4096] {
                let w: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut row = vec![0u8; ty.traits().row_bytes(cols).expect("row")];
                ty.quantize(&w, &mut row, None);
                // Extreme activations too: ±127 codes, zero blocks.
                let mut x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
                x[..32.min(cols)].fill(0.0);
                let q = Q8Row::for_type(ty, &x);
                let a = vec_dot(ty, &row, &q);
                let b = vec_dot_scalar(ty, &row, &q);
                assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} × {cols}");
                // Four tokens at once: each token's result is its single-token one, bit for bit.
                let four: [Q8Row; TOKENS] = std::array::from_fn(|t| {
                    let xt: Vec<f32> = x.iter().map(|v| v * (t as f32 - 1.5)).collect();
                    Q8Row::for_type(ty, &xt)
                });
                let assert_four = |row: &[u8], what: &str| {
                    let mut got = [0.0f32; TOKENS];
                    vec_dot4(ty, row, &four, &mut got);
                    for (t, (g, xt)) in got.iter().zip(&four).enumerate() {
                        let want = vec_dot_scalar(ty, row, xt);
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{ty:?} × {cols}{what}, token {t}"
                        );
                    }
                };
                assert_four(&row, "");
                // And it is ggml's block formula in f64.
                let (want, scale) = f64_dot(ty, &row, &q);
                assert!(
                    (f64::from(a) - want).abs() <= 1e-5 * scale.max(1e-12),
                    "{ty:?} × {cols}: {a} vs {want}"
                );
                // Random bytes are valid blocks too (all scale and code patterns): still exact.
                let raw: Vec<u8> = (0..row.len()).map(|_| rng.gen()).collect();
                let mut raw = raw;
                for blk in raw.chunks_exact_mut(ty.traits().block_bytes) {
                    // Keep the f16 fields finite.
                    for f in f16_fields(ty) {
                        blk[f + 1] &= 0x3B;
                    }
                    if ty == GgmlType::Iq1M {
                        // IQ1_M's d has its sign and top exponent bits in the last byte's top nibble.
                        blk[55] &= 0x3F;
                    }
                }
                assert_eq!(
                    vec_dot(ty, &raw, &q).to_bits(),
                    vec_dot_scalar(ty, &raw, &q).to_bits(),
                    "{ty:?} × {cols} random bytes"
                );
                assert_four(&raw, " random bytes");
            }
        }
    }

    /// Where a block's f16 fields start.
    fn f16_fields(ty: GgmlType) -> Vec<usize> {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Iq4Nl => vec![0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => vec![0, 2],
            GgmlType::Q2K => vec![80, 82],
            GgmlType::Q3K => vec![108],
            GgmlType::Q6K => vec![208],
            GgmlType::Iq4Xs
            | GgmlType::Iq2Xxs
            | GgmlType::Iq2Xs
            | GgmlType::Iq2S
            | GgmlType::Iq3Xxs
            | GgmlType::Iq3S
            | GgmlType::Iq1S => vec![0],
            GgmlType::Iq1M => vec![],
            _ => unreachable!(),
        }
    }

    /// The integer reading of every block reproduces the CPU's dequantiser exactly (up to how ggml rounds
    /// `d·scale·q − dmin·min`, which the codes and scales determine).
    #[test]
    fn the_integer_reading_is_the_dequantiser() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for ty in types() {
            let cols = 512;
            let w: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut row = vec![0u8; ty.traits().row_bytes(cols).expect("row")];
            ty.quantize(&w, &mut row, None);
            let mut wd = vec![0f32; cols];
            ty.dequantize(&row, &mut wd);
            if k_family(ty) {
                let mut codes_v = [0i8; 256];
                for (b, blk) in row.chunks_exact(k_bytes(ty)).enumerate() {
                    let k = k_block(ty, blk, &mut codes_v);
                    for i in 0..256 {
                        let want =
                            f64::from(k.d) * f64::from(k.scales[i / 16]) * f64::from(codes_v[i])
                                - f64::from(k.dmin) * f64::from(k.mins[i / 16]);
                        let got = f64::from(wd[256 * b + i]);
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{ty:?} element {i}: {got} vs {want}"
                        );
                    }
                }
            } else {
                let l = layout(ty);
                let mut wq = [0i32; 32];
                for (b, blk) in row.chunks_exact(l.bytes).enumerate() {
                    codes(ty, blk, &mut wq);
                    let m = if l.offset { f16_at(&blk[2..]) } else { 0.0 };
                    for j in 0..32 {
                        assert_eq!(
                            wd[32 * b + j],
                            wq[j] as f32 * f16_at(blk) + m,
                            "{ty:?} code {j}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_decoders_give_the_scalar_codes() {
        if !avx2() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for ty in types().into_iter().filter(|&t| k_split(t)) {
            for _ in 0..50 {
                let blk: Vec<u8> = (0..k_bytes(ty)).map(|_| rng.gen()).collect();
                let (mut a, mut b) = ([0i8; 256], [0i8; 256]);
                k_codes(ty, &blk, &mut a);
                #[allow(unsafe_code)]
                // SAFETY: AVX2 checked above.
                unsafe {
                    x86::k_codes(ty, &blk, &mut b)
                };
                assert_eq!(a, b, "{ty:?}");
            }
        }
    }

    #[test]
    fn q8_k_rows_follow_ggml() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q = Q8Row::q8_k(&x);
        assert_eq!(q.d.len(), 2);
        assert_eq!(q.bsums.len(), 32);
        for (b, xb) in x.chunks_exact(256).enumerate() {
            let max = xb
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let iscale = -127.0 / max;
            assert_eq!(q.d[b], 1.0 / iscale);
            for (i, &v) in xb.iter().enumerate() {
                let want = (iscale * v).round_ties_even().min(127.0) as i8;
                assert_eq!(q.q[256 * b + i], want);
            }
        }
        for (s, c) in q.q.chunks_exact(16).enumerate() {
            assert_eq!(
                i32::from(q.bsums[s]),
                c.iter().map(|&v| i32::from(v)).sum::<i32>()
            );
        }
    }
}
