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
    pub q: Vec<i8>,
}

impl Q8Row {
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(32));
        let mut d = Vec::with_capacity(x.len() / 32);
        let mut q = Vec::with_capacity(x.len());
        for b in x.chunks_exact(32) {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            d.push(half::f16::from_f32(amax / 127.0).to_f32());
            q.extend(b.iter().map(|&v| (v * id).round_ties_even() as i8));
        }
        Self { d, q }
    }
}

/// Whether [`vec_dot`] takes weights of `ty`.
pub fn fused(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0)
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
/// accumulator with a fused multiply-add, the eight accumulators added pairwise at the end.
pub fn vec_dot_scalar(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = [0.0f32; 8];
    let (block_bytes, off) = match ty {
        GgmlType::Q4_0 => (18, 2),
        GgmlType::Q8_0 => (34, 2),
        _ => unreachable!("vec_dot of a type without a fused kernel"),
    };
    let mut w = [0i32; 32];
    for (b, (blk, xq)) in row
        .chunks_exact(block_bytes)
        .zip(x.q.chunks_exact(32))
        .enumerate()
    {
        let qs = &blk[off..];
        match ty {
            GgmlType::Q4_0 => {
                for j in 0..16 {
                    w[j] = i32::from(qs[j] & 15) - 8;
                    w[j + 16] = i32::from(qs[j] >> 4) - 8;
                }
            }
            _ => {
                for j in 0..32 {
                    w[j] = i32::from(qs[j] as i8);
                }
            }
        }
        let d = f16_at(blk) * x.d[b];
        for (l, a) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * l..4 * l + 4).map(|j| w[j] * i32::from(xq[j])).sum();
            *a = d.mul_add(s as f32, *a);
        }
    }
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
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

    /// [`super::vec_dot`] with AVX2, FMA and F16C, in the order [`super::vec_dot_scalar`] documents.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
        let mut acc = _mm256_setzero_ps();
        match ty {
            GgmlType::Q4_0 => {
                let low = _mm256_set1_epi8(15);
                let eight = _mm256_set1_epi8(8);
                for (b, (blk, xq)) in row.chunks_exact(18).zip(x.q.chunks_exact(32)).enumerate() {
                    // SAFETY: 16 bytes of nibbles and 32 activation bytes are in bounds.
                    let qs = unsafe { _mm_loadu_si128(blk.as_ptr().add(2).cast()) };
                    // Low nibbles are elements 0..16, high nibbles 16..32.
                    let both = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
                    let w = _mm256_sub_epi8(_mm256_and_si256(both, low), eight);
                    let v = unsafe { _mm256_loadu_si256(xq.as_ptr().cast()) };
                    let s = _mm256_cvtepi32_ps(unsafe { lanes_i8(w, v) });
                    let d = _mm256_set1_ps(unsafe { f16_at(blk) } * x.d[b]);
                    acc = _mm256_fmadd_ps(d, s, acc);
                }
            }
            GgmlType::Q8_0 => {
                for (b, (blk, xq)) in row.chunks_exact(34).zip(x.q.chunks_exact(32)).enumerate() {
                    // SAFETY: 32 weight and 32 activation bytes are in bounds.
                    let w = unsafe { _mm256_loadu_si256(blk.as_ptr().add(2).cast()) };
                    let v = unsafe { _mm256_loadu_si256(xq.as_ptr().cast()) };
                    let s = _mm256_cvtepi32_ps(unsafe { lanes_i8(w, v) });
                    let d = _mm256_set1_ps(unsafe { f16_at(blk) } * x.d[b]);
                    acc = _mm256_fmadd_ps(d, s, acc);
                }
            }
            _ => unreachable!("vec_dot of a type without a fused kernel"),
        }
        // (a0+a4, a1+a5, a2+a6, a3+a7), then (s0+s2) + (s1+s3).
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_vector_kernels_equal_the_scalar_reference_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
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
                // And it is the dot product of the dequantised weight with the rounded activations.
                let mut wd = vec![0f32; cols];
                ty.dequantize(&row, &mut wd);
                let xr: Vec<f32> =
                    q.q.iter()
                        .enumerate()
                        .map(|(i, &v)| f32::from(v) * q.d[i / 32])
                        .collect();
                let want: f64 = wd
                    .iter()
                    .zip(&xr)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let scale: f64 = wd
                    .iter()
                    .zip(&xr)
                    .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                    .sum();
                assert!(
                    (f64::from(a) - want).abs() <= 1e-5 * scale.max(1e-12),
                    "{ty:?} × {cols}: {a} vs {want}"
                );
            }
        }
    }
}
