//! Pieces the integer dot products share (`cpu_q8` for the legacy and k-quant types, `cpu_q8_iq` for the
//! low-bit i-quants): the Q8_K family's float step per block, and the AVX2 building blocks of exact integer
//! sums — signed byte pair products, a horizontal sum, and per-16 scales applied to pair sums.

/// The Q8_K family's per-block float step, shared by the scalar and vector code: the block's exact integer
/// sums `sumi` (codes × scales × activations) and `summ` (mins × the activations' 16-code sums) meet
/// `d_w · d_x` and `−dmin_w · d_x` in two fused multiply-adds.
#[inline]
pub(super) fn k_accumulate(acc: f32, d: f32, dmin: f32, dx: f32, sumi: i32, summ: i32) -> f32 {
    let acc = (d * dx).mul_add(sumi as f32, acc);
    (-(dmin * dx)).mul_add(summ as f32, acc)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// The sixteen pair sums of 32 signed byte products (|a|, |b| ≤ 127, so no pair saturates).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::backend) unsafe fn pairs_i8(a: __m256i, b: __m256i) -> __m256i {
        // maddubs needs an unsigned left operand: |a| · sign(b, a).
        let ax = _mm256_sign_epi8(a, a);
        let sy = _mm256_sign_epi8(b, a);
        _mm256_maddubs_epi16(ax, sy)
    }

    /// The horizontal sum of eight i32 lanes (exact: the caller's sums fit).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::backend) unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
        _mm_cvtsi128_si32(s)
    }

    /// Chunk `c`'s (codes `32c..32c + 32`) pair sums `p` times their scales, added to `sum`: `lo`/`hi`
    /// hold the block's 16 scales each duplicated into both halves of a 32-bit lane
    /// (`unpacklo/hi_epi16(sc, sc)`: lo = scales 0–3 and 8–11, hi = 4–7 and 12–15), and the chunk's pair
    /// of scales (`2c`, `2c + 1`) is spread over the lanes of its first and second 16 codes.
    #[inline(always)]
    pub(in crate::backend) unsafe fn scaled(
        sum: __m256i,
        p: __m256i,
        lo: __m256i,
        hi: __m256i,
        c: usize,
    ) -> __m256i {
        let base = (2 * (c % 2) + 4 * (c / 4)) as i32;
        let (a, b) = (base, base + 1);
        let idx = _mm256_setr_epi32(a, a, a, a, b, b, b, b);
        let src = if (c / 2).is_multiple_of(2) { lo } else { hi };
        _mm256_add_epi32(
            sum,
            _mm256_madd_epi16(p, _mm256_permutevar8x32_epi32(src, idx)),
        )
    }
}
