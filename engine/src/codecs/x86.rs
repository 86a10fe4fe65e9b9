//! AVX2 + F16C dequantisers for the hot block types, picked once at run time by CPU feature.
//!
//! Each `dequant_*` here returns `false` when this CPU (or target) has no vector path, and the caller in
//! `legacy.rs` / `kquants.rs` then runs its scalar loop, which stays the reference. The vector code does
//! the same f32 operations in the same order as the scalar loop — a separate multiply and add, never a
//! fused multiply-add, and an exact F16C f16 → f32 conversion — so results are bit-identical to it.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub(super) fn avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
    })
}

macro_rules! dispatch {
    ($(#[$doc:meta] $name:ident => $imp:ident;)*) => {$(
        #[$doc]
        pub(super) fn $name(src: &[u8], dst: &mut [f32]) -> bool {
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: `avx2()` saw avx2 and f16c on this CPU, the only features `imp` enables.
                unsafe { imp::$imp(src, dst) };
                return true;
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (src, dst);
            false
        }
    )*};
}

dispatch! {
    /// Q4_0 blocks, if vectorised here.
    dequant_q4_0 => q4_0;
    /// Q4_1 blocks, if vectorised here.
    dequant_q4_1 => q4_1;
    /// Q5_0 blocks, if vectorised here.
    dequant_q5_0 => q5_0;
    /// Q5_1 blocks, if vectorised here.
    dequant_q5_1 => q5_1;
    /// Q8_0 blocks, if vectorised here.
    dequant_q8_0 => q8_0;
    /// Q4_K super-blocks, if vectorised here.
    dequant_q4_k => q4_k;
    /// Q6_K super-blocks, if vectorised here.
    dequant_q6_k => q6_k;
}

#[cfg(target_arch = "x86_64")]
mod imp {
    //! Every function takes whole blocks via `chunks_exact`, so each output slice `y` has exactly its
    //! block's elements; the raw-pointer (unaligned) stores below stay inside it, as each SAFETY comment
    //! spells out. Loads are safe slice reads.
    use std::arch::x86_64::*;

    /// The two little-endian f16 at `b[0..4]` as f32 in lanes 0 and 1 (exact conversion).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn f16x2(b: &[u8]) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
            b[0], b[1], b[2], b[3],
        ])))
    }

    /// The little-endian f16 at `b[0..2]` as f32 (exact conversion).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn f16_1(b: &[u8]) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([b[0], b[1]]) as i32,
        )))
    }

    /// The 8 bytes at `b[0..8]` as one 64-bit lane (safe code; folds into the widening load).
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn bytes8(b: &[u8]) -> __m128i {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        _mm_cvtsi64_si128(i64::from_le_bytes(a))
    }

    /// The 8 bytes at `b[0..8]`, zero-extended to i32 lanes.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn u8x8(b: &[u8]) -> __m256i {
        _mm256_cvtepu8_epi32(bytes8(b))
    }

    /// The 8 bytes at `b[0..8]`, sign-extended to i32 lanes.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn i8x8(b: &[u8]) -> __m256i {
        _mm256_cvtepi8_epi32(bytes8(b))
    }

    /// Low and high nibbles of the 16 packed bytes at `b[0..16]`, as 32 elements in i32 lanes: element
    /// j is the low nibble of byte j and element j + 16 its high nibble (the legacy block layout).
    /// Widening straight from memory and splitting nibbles in i32 lanes keeps the shuffle port free.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn nibbles16(b: &[u8]) -> [__m256i; 4] {
        let mask = _mm256_set1_epi32(0x0F);
        let (a, b) = (u8x8(b), u8x8(&b[8..16]));
        [
            _mm256_and_si256(a, mask),
            _mm256_and_si256(b, mask),
            _mm256_srli_epi32::<4>(a),
            _mm256_srli_epi32::<4>(b),
        ]
    }

    /// The fifth bits of elements 8k..8k+8 (bit e of `qh` for element e), as 0 or 16 in i32 lanes.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn fifth_bits(qh: u32, k: usize) -> __m256i {
        let shifts = _mm256_add_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(8 * k as i32),
        );
        let bits = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(qh as i32), shifts),
            _mm256_set1_epi32(1),
        );
        _mm256_slli_epi32::<4>(bits)
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q4_0(src: &[u8], dst: &mut [f32]) {
        let eight = _mm256_set1_epi32(8);
        for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
            let d = _mm256_broadcastss_ps(f16x2(b));
            let qs = nibbles16(&b[2..18]);
            for (k, q) in qs.into_iter().enumerate() {
                let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight));
                // SAFETY: `y` is 32 floats and 8k + 8 <= 32.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), _mm256_mul_ps(q, d)) };
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q4_1(src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
            let dm = f16x2(b);
            let d = _mm256_broadcastss_ps(dm);
            let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
            let qs = nibbles16(&b[4..20]);
            for (k, q) in qs.into_iter().enumerate() {
                let v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m);
                // SAFETY: `y` is 32 floats and 8k + 8 <= 32.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), v) };
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q5_0(src: &[u8], dst: &mut [f32]) {
        let sixteen = _mm256_set1_epi32(16);
        for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
            let d = _mm256_broadcastss_ps(f16x2(b));
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = nibbles16(&b[6..22]);
            for (k, q) in qs.into_iter().enumerate() {
                let q = _mm256_or_si256(q, fifth_bits(qh, k));
                let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, sixteen));
                // SAFETY: `y` is 32 floats and 8k + 8 <= 32.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), _mm256_mul_ps(q, d)) };
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q5_1(src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
            let dm = f16x2(b);
            let d = _mm256_broadcastss_ps(dm);
            let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = nibbles16(&b[8..24]);
            for (k, q) in qs.into_iter().enumerate() {
                let q = _mm256_cvtepi32_ps(_mm256_or_si256(q, fifth_bits(qh, k)));
                let v = _mm256_add_ps(_mm256_mul_ps(q, d), m);
                // SAFETY: `y` is 32 floats and 8k + 8 <= 32.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), v) };
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q8_0(src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
            let d = _mm256_broadcastss_ps(f16x2(b));
            for k in 0..4 {
                let q = _mm256_cvtepi32_ps(i8x8(&b[2 + 8 * k..10 + 8 * k]));
                // SAFETY: `y` is 32 floats and 8k + 8 <= 32.
                unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(8 * k), _mm256_mul_ps(q, d)) };
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q4_k(src: &[u8], dst: &mut [f32]) {
        let mask = _mm256_set1_epi32(0x0F);
        for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
            let dd = f16x2(b);
            let d = _mm_cvtss_f32(dd);
            let dmin = _mm_cvtss_f32(_mm_movehdup_ps(dd));
            let scales = &b[4..16];
            for c in 0..4 {
                let (sc1, m1) = super::scale_min_k4(2 * c, scales);
                let (sc2, m2) = super::scale_min_k4(2 * c + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let (d1, m1) = (_mm256_set1_ps(d1), _mm256_set1_ps(m1));
                let (d2, m2) = (_mm256_set1_ps(d2), _mm256_set1_ps(m2));
                for k in 0..4 {
                    let v = u8x8(&b[16 + 32 * c + 8 * k..24 + 32 * c + 8 * k]);
                    // SAFETY: `y` is 256 floats and 64c + 32 + 8k + 8 <= 256 for c, k < 4.
                    unsafe {
                        let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                        let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v));
                        let out = y.as_mut_ptr().add(64 * c + 8 * k);
                        _mm256_storeu_ps(out, _mm256_sub_ps(_mm256_mul_ps(d1, lo), m1));
                        _mm256_storeu_ps(out.add(32), _mm256_sub_ps(_mm256_mul_ps(d2, hi), m2));
                    }
                }
            }
        }
    }

    /// `(h & 3) << 4` per i32 lane: two high bits of a Q6_K quant.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn high2(h: __m256i) -> __m256i {
        _mm256_slli_epi32::<4>(_mm256_and_si256(h, _mm256_set1_epi32(3)))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn q6_k(src: &[u8], dst: &mut [f32]) {
        let (m4, c32) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(32));
        for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
            let d = f16_1(&b[208..210]);
            for h in 0..2 {
                let sc = &b[192 + 8 * h..200 + 8 * h];
                for l in (0..32).step_by(8) {
                    let is = l / 16;
                    let ql = 64 * h + l;
                    let a = u8x8(&b[ql..ql + 8]);
                    let a2 = u8x8(&b[ql + 32..ql + 40]);
                    let hb = u8x8(&b[128 + 32 * h + l..136 + 32 * h + l]);
                    let qs = [
                        _mm256_or_si256(_mm256_and_si256(a, m4), high2(hb)),
                        _mm256_or_si256(
                            _mm256_and_si256(a2, m4),
                            high2(_mm256_srli_epi32::<2>(hb)),
                        ),
                        _mm256_or_si256(
                            _mm256_srli_epi32::<4>(a),
                            high2(_mm256_srli_epi32::<4>(hb)),
                        ),
                        _mm256_or_si256(
                            _mm256_srli_epi32::<4>(a2),
                            high2(_mm256_srli_epi32::<6>(hb)),
                        ),
                    ];
                    for (g, q) in qs.into_iter().enumerate() {
                        let scale = _mm256_set1_ps(d * (sc[is + 2 * g] as i8) as f32);
                        let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, c32));
                        // SAFETY: `y` is 256 floats and 128h + 32g + l + 8 <= 256.
                        unsafe {
                            _mm256_storeu_ps(
                                y.as_mut_ptr().add(128 * h + 32 * g + l),
                                _mm256_mul_ps(scale, q),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Q4_K/Q5_K packed 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}
