//! Integer dot products of packed weight rows with activations quantized to Q8_0, as llama.cpp's CPU
//! backend multiplies them (`ggml_vec_dot_q4_0_q8_0`, `ggml_vec_dot_q8_0_q8_0`): each block's products are
//! summed exactly in integers and scaled by `f16(d_w) · f16(d_x)`; the block sums are scaled in
//! eight f32 lanes and added at the end (the order documented on [`vec_dot_scalar`]). The weight is read packed (4.5 or 8.5 bits per weight instead of a dequantised f32 row), so
//! decoding moves a fraction of the bytes. AVX2 where the CPU has it; the scalar code is the reference
//! the vector code equals exactly (the block sums are exact integers, the f32 accumulation the same).

use crate::codecs::GgmlType;

/// One activation row quantized to Q8_0 as ggml-cpu's x86 `quantize_row_q8_0` does: per 32 values
/// `d = amax/127` stored as f16, `q = round_half_even(x · 127/amax)`.
pub struct Q8Row {
    /// `f16(d)` per block, as f32.
    pub d: Vec<f32>,
    /// Q8_1's `s = f16(d · Σq)` per block (the unrounded d), for the `_1` weight types' offsets.
    pub s: Vec<f32>,
    pub q: Vec<i8>,
}

impl Q8Row {
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(32));
        let mut d = Vec::with_capacity(x.len() / 32);
        let mut s = Vec::with_capacity(x.len() / 32);
        let mut q = Vec::with_capacity(x.len());
        for b in x.chunks_exact(32) {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let dd = amax / 127.0;
            d.push(half::f16::from_f32(dd).to_f32());
            let start = q.len();
            q.extend(b.iter().map(|&v| (v * id).round_ties_even() as i8));
            let sum: i32 = q[start..].iter().map(|&v| i32::from(v)).sum();
            s.push(half::f16::from_f32(dd * sum as f32).to_f32());
        }
        Self { d, s, q }
    }
}

/// Whether [`vec_dot`] takes weights of `ty`.
pub fn fused(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
    )
}

/// A weight block's layout: bytes, where the codes start, whether it has an f16 offset `m` after `d`
/// (paired with Q8_1's `s`), and where its 32 fifth bits are (5-bit types).
struct Layout {
    bytes: usize,
    qs: usize,
    offset: bool,
    qh: Option<usize>,
}

fn layout(ty: GgmlType) -> Layout {
    let (bytes, qs, offset, qh) = match ty {
        GgmlType::Q4_0 => (18, 2, false, None),
        GgmlType::Q4_1 => (20, 4, true, None),
        GgmlType::Q5_0 => (22, 6, false, Some(2)),
        GgmlType::Q5_1 => (24, 8, true, Some(4)),
        GgmlType::Q8_0 => (34, 2, false, None),
        _ => unreachable!("vec_dot of a type without a fused kernel"),
    };
    Layout {
        bytes,
        qs,
        offset,
        qh,
    }
}

/// The 32 integer codes of one block as the dot product uses them: Q4_0 `q − 8`, Q5_0 `q − 16`, Q4_1/Q5_1
/// `q` (their offset is added separately), Q8_0 the signed bytes.
fn codes(ty: GgmlType, blk: &[u8], w: &mut [i32; 32]) {
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
}

#[inline]
fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// `Σ_c W[c] · x[c]` of one packed row of `ty` (a [`fused`] type) with a quantized activation row.
pub fn vec_dot(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked at runtime).
            #[allow(unsafe_code)]
            return unsafe { x86::vec_dot(ty, row, x) };
        }
    }
    vec_dot_scalar(ty, row, x)
}

/// The scalar reference of [`vec_dot`], in the vector code's order: each block's products summed exactly in
/// eight lanes of four consecutive elements, each lane scaled by `f16(d_w) · f16(d_x)` into its own f32
/// accumulator with a fused multiply-add, the eight accumulators added pairwise at the end; the `_1` types'
/// offsets `m_w · s_x` summed block by block on the side and added last.
pub fn vec_dot_scalar(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    let l = layout(ty);
    let mut acc = [0.0f32; 8];
    let mut offs = 0.0f32;
    let mut w = [0i32; 32];
    for (b, (blk, xq)) in row
        .chunks_exact(l.bytes)
        .zip(x.q.chunks_exact(32))
        .enumerate()
    {
        codes(ty, blk, &mut w);
        let d = f16_at(blk) * x.d[b];
        for (k, a) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * k..4 * k + 4).map(|j| w[j] * i32::from(xq[j])).sum();
            *a = d.mul_add(s as f32, *a);
        }
        if l.offset {
            offs = f16_at(&blk[2..]).mul_add(x.s[b], offs);
        }
    }
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + offs
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
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
mod x86 {
    use super::Q8Row;
    use crate::codecs::GgmlType;
    use std::arch::x86_64::*;

    /// The eight lane sums (four consecutive elements each) of 32 signed byte products, exact.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_i8(a: __m256i, b: __m256i) -> __m256i {
        // maddubs needs an unsigned left operand: |a| · sign(b, a) (no pair exceeds 2 · 128 · 127).
        let ax = _mm256_sign_epi8(a, a);
        let sy = _mm256_sign_epi8(b, a);
        let p16 = _mm256_maddubs_epi16(ax, sy);
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }

    /// The f16 at the start of `b`, with F16C.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_at(b: &[u8]) -> f32 {
        let h = i32::from(u16::from_le_bytes([b[0], b[1]]));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)))
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

    /// [`super::vec_dot`] with AVX2, FMA and F16C, in the order [`super::vec_dot_scalar`] documents.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
        let l = super::layout(ty);
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0.0f32;
        let low = _mm256_set1_epi8(15);
        for (b, (blk, xq)) in row
            .chunks_exact(l.bytes)
            .zip(x.q.chunks_exact(32))
            .enumerate()
        {
            let w = if ty == GgmlType::Q8_0 {
                // SAFETY: 32 code bytes are in bounds.
                unsafe { _mm256_loadu_si256(blk.as_ptr().add(2).cast()) }
            } else {
                // SAFETY: 16 bytes of nibbles are in bounds. Low nibbles are elements 0..16, high 16..32.
                let qs = unsafe { _mm_loadu_si128(blk.as_ptr().add(l.qs).cast()) };
                let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low);
                match ty {
                    GgmlType::Q4_0 => _mm256_sub_epi8(nib, _mm256_set1_epi8(8)),
                    GgmlType::Q4_1 => nib,
                    GgmlType::Q5_0 => {
                        // q − 16: the nibble with 0xF0 where the fifth bit is clear.
                        let hi = unsafe { bits_as_bytes(&blk[2..]) };
                        _mm256_or_si256(
                            nib,
                            _mm256_andnot_si256(hi, _mm256_set1_epi8(0xF0u8 as i8)),
                        )
                    }
                    _ => {
                        let hi = unsafe { bits_as_bytes(&blk[4..]) };
                        _mm256_or_si256(nib, _mm256_and_si256(hi, _mm256_set1_epi8(0x10)))
                    }
                }
            };
            // SAFETY: 32 activation bytes are in bounds.
            let v = unsafe { _mm256_loadu_si256(xq.as_ptr().cast()) };
            let s = _mm256_cvtepi32_ps(unsafe { lanes_i8(w, v) });
            let d = _mm256_set1_ps(unsafe { f16_at(blk) } * x.d[b]);
            acc = _mm256_fmadd_ps(d, s, acc);
            if l.offset {
                offs = unsafe { f16_at(&blk[2..]) }.mul_add(x.s[b], offs);
            }
        }
        // (a0+a4, a1+a5, a2+a6, a3+a7), then (s0+s2) + (s1+s3).
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + offs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_vector_kernels_equal_the_scalar_reference_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            for cols in [32usize, 256, 4096] {
                let w: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut row = vec![0u8; ty.traits().row_bytes(cols).expect("row")];
                ty.quantize(&w, &mut row, None);
                // Extreme activations too: ±127 codes, zero blocks.
                let mut x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
                x[..32.min(cols)].fill(0.0);
                let q = Q8Row::quantize(&x);
                let a = vec_dot(ty, &row, &q);
                let b = vec_dot_scalar(ty, &row, &q);
                assert_eq!(a.to_bits(), b.to_bits(), "{ty:?} × {cols}");
                // And it is ggml's block formula, Σ_b f16(d_w)·f16(d_x)·Σ q_w·q_x (+ m_w·s_x), in f64.
                let l = layout(ty);
                let (mut want, mut scale) = (0.0f64, 0.0f64);
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
                // The codes reproduce the CPU's dequantiser.
                let mut wd = vec![0f32; cols];
                ty.dequantize(&row, &mut wd);
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
                assert!(
                    (f64::from(a) - want).abs() <= 1e-5 * scale.max(1e-12),
                    "{ty:?} × {cols}: {a} vs {want}"
                );
            }
        }
    }
}
