//! Decoding dot products of the low-bit i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)
//! with Q8_K activations, vectorised as llama.cpp's `ggml_vec_dot_iq*_q8_K` do: per 32 codes, four lattice
//! points are loaded as 64-bit words (the grid bytes are the codes' magnitudes, unsigned), the activations
//! take the points' signs (`vpsignb`), and `vpmaddubsw` multiplies the unsigned magnitudes with the signed
//! activations; IQ1's codes (`8·grid ± 1`, signed) go through the signed pair product. The integer sums are
//! exactly the codecs' integer reading (`codecs::lowbit_int_reading`) times the activations, so the result
//! is the scalar reference's bit for bit (`cpu_q8::vec_dot_scalar`, tested there for every type, on
//! quantized rows and on random bytes). `cpu_q8::vec_dot` dispatches here; this module takes the activations
//! as slices and the shared pieces from `int_dot`, so it depends on nothing above it.

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod x86 {
    use crate::backend::int_dot::k_accumulate;
    use crate::backend::int_dot::x86::{hsum_i32, pairs_i8, scaled};
    use crate::codecs::{
        iq1m_d, iq1m_scales, GgmlType, IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID,
        IQ3XXS_GRID, KSIGNS_IQ2XS,
    };
    use std::arch::x86_64::*;

    const IQ2XXS: u8 = 0;
    const IQ2XS: u8 = 1;
    const IQ2S: u8 = 2;
    const IQ3XXS: u8 = 3;
    const IQ3S: u8 = 4;
    const IQ1S: u8 = 5;
    const IQ1M: u8 = 6;

    /// `Σ_c W[c] · x[c]` of one row of a low-bit i-quant `ty` with its Q8_K activations (codes `q`,
    /// block scales `d`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn vec_dot(ty: GgmlType, row: &[u8], q: &[i8], d: &[f32]) -> f32 {
        let bytes = ty.traits().block_bytes;
        // SAFETY: forwarded (the features are enabled on this function).
        unsafe {
            match ty {
                GgmlType::Iq2Xxs => dot::<IQ2XXS>(row, bytes, q, d),
                GgmlType::Iq2Xs => dot::<IQ2XS>(row, bytes, q, d),
                GgmlType::Iq2S => dot::<IQ2S>(row, bytes, q, d),
                GgmlType::Iq3Xxs => dot::<IQ3XXS>(row, bytes, q, d),
                GgmlType::Iq3S => dot::<IQ3S>(row, bytes, q, d),
                GgmlType::Iq1S => dot::<IQ1S>(row, bytes, q, d),
                GgmlType::Iq1M => dot::<IQ1M>(row, bytes, q, d),
                _ => unreachable!("a low-bit i-quant: {ty:?}"),
            }
        }
    }

    /// Sign byte `s` as the bytes `vpsignb` applies to 8 activations: −1 where bit `j` is set, else +1.
    const SIGN_BYTES: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut s = 0;
        while s < 256 {
            let mut j = 0;
            while j < 8 {
                let byte: u64 = if (s >> j) & 1 != 0 { 0xFF } else { 0x01 };
                t[s] |= byte << (8 * j);
                j += 1;
            }
            s += 1;
        }
        t
    };

    /// The IQ2/IQ3 seven-bit sign index `v & 127` (`ksigns_iq2xs`: the eighth sign makes the count even) as
    /// sign bytes.
    #[inline(always)]
    fn even_signs(v: u32) -> u64 {
        SIGN_BYTES[KSIGNS_IQ2XS[(v & 127) as usize] as usize]
    }

    /// IQ1's shift of a point: −1 in every byte where it shifts down, +1 where up.
    const fn shift(minus: bool) -> u64 {
        if minus {
            u64::MAX
        } else {
            0x0101_0101_0101_0101
        }
    }

    /// Four 8-byte words (lattice points, or eight 4-byte ones paired; or their sign or shift bytes) as one
    /// vector, the first lowest.
    #[inline(always)]
    unsafe fn points(p: [u64; 4]) -> __m256i {
        _mm256_set_epi64x(p[3] as i64, p[2] as i64, p[1] as i64, p[0] as i64)
    }

    #[inline(always)]
    fn g8(t: &[[u8; 8]], i: usize) -> u64 {
        u64::from_le_bytes(t[i])
    }

    /// IQ3 group `g`'s eight 4-byte lattice points, gathered: IQ3_XXS's indices are the bytes at
    /// `2 + 8g`, IQ3_S's those bytes with bit `k` of byte `66 + g` as their ninth bit.
    #[inline(always)]
    unsafe fn iq3_points<const T: u8>(b: &[u8], g: usize) -> __m256i {
        assert!(b.len() >= 10 + 8 * g);
        // SAFETY: the 8 bytes at 2 + 8g (asserted); every index is below the grid's length (256
        // for IQ3_XXS's 8-bit indices, 512 for IQ3_S's 9-bit ones), 4 bytes per entry.
        unsafe {
            let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.as_ptr().add(2 + 8 * g).cast()));
            if T == IQ3XXS {
                _mm256_i32gather_epi32::<4>(IQ3XXS_GRID.as_ptr().cast(), q)
            } else {
                let qh = _mm256_set1_epi32(i32::from(b[66 + g]));
                let ninth = _mm256_and_si256(
                    _mm256_srlv_epi32(qh, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                    _mm256_set1_epi32(1),
                );
                let idx = _mm256_or_si256(q, _mm256_slli_epi32::<8>(ninth));
                _mm256_i32gather_epi32::<4>(IQ3S_GRID.as_ptr().cast(), idx)
            }
        }
    }

    #[inline(always)]
    fn odd(s: u32) -> i16 {
        (2 * s + 1) as i16
    }

    #[inline(always)]
    fn f16(b: &[u8], o: usize) -> f32 {
        half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
    }

    #[inline(always)]
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// One block's scales per 16 codes and its multiplier.
    #[inline(always)]
    fn scales<const T: u8>(b: &[u8]) -> ([i16; 16], f32) {
        let mut sc = [0i16; 16];
        let d = match T {
            IQ2XXS | IQ3XXS => {
                let at = if T == IQ2XXS {
                    |g: usize| 6 + 8 * g
                } else {
                    |g: usize| 66 + 4 * g
                };
                for g in 0..8 {
                    sc[2 * g..2 * g + 2].fill(odd(u32_at(b, at(g)) >> 28));
                }
                f16(b, 0) * if T == IQ2XXS { 0.125 } else { 0.25 }
            }
            IQ2XS | IQ2S => {
                let at = if T == IQ2XS { 66 } else { 74 };
                for g in 0..8 {
                    sc[2 * g] = odd(u32::from(b[at + g] & 15));
                    sc[2 * g + 1] = odd(u32::from(b[at + g] >> 4));
                }
                f16(b, 0) * 0.125
            }
            IQ3S => {
                for g in 0..8 {
                    sc[2 * g..2 * g + 2]
                        .fill(odd(u32::from((b[106 + g / 2] >> (4 * (g % 2))) & 15)));
                }
                f16(b, 0)
            }
            IQ1S => {
                for g in 0..8 {
                    let h = u32::from(b[35 + 2 * g]) << 8;
                    sc[2 * g..2 * g + 2].fill(odd((h >> 12) & 7));
                }
                f16(b, 0) * 0.125
            }
            _ => {
                let s = iq1m_scales(b);
                for (h, o) in sc.iter_mut().enumerate() {
                    *o = odd(u32::from((s[h / 4] >> (3 * (h % 4))) & 7));
                }
                iq1m_d(&s) * 0.125
            }
        };
        (sc, d)
    }

    /// Group `g`'s (codes `32g..32g + 32`) four lattice points and, per point, its sign bytes (IQ2/IQ3) or
    /// its shift bytes (IQ1).
    #[inline(always)]
    fn group<const T: u8>(b: &[u8], g: usize) -> ([u64; 4], [u64; 4]) {
        match T {
            IQ2XXS => {
                let q = &b[2 + 8 * g..10 + 8 * g];
                let a1 = u32_at(b, 6 + 8 * g);
                let pts = std::array::from_fn(|l| g8(&IQ2XXS_GRID, q[l] as usize));
                (pts, std::array::from_fn(|l| even_signs(a1 >> (7 * l))))
            }
            IQ2XS => {
                let v = |l: usize| {
                    u32::from(u16::from_le_bytes([
                        b[2 + 8 * g + 2 * l],
                        b[3 + 8 * g + 2 * l],
                    ]))
                };
                let pts = std::array::from_fn(|l| g8(&IQ2XS_GRID, (v(l) & 511) as usize));
                (pts, std::array::from_fn(|l| even_signs(v(l) >> 9)))
            }
            IQ2S => {
                let qh = b[66 + g] as usize;
                let pts = std::array::from_fn(|l| {
                    g8(
                        &IQ2S_GRID,
                        b[2 + 4 * g + l] as usize | (qh << (8 - 2 * l) & 0x300),
                    )
                });
                (
                    pts,
                    std::array::from_fn(|l| SIGN_BYTES[b[34 + 4 * g + l] as usize]),
                )
            }
            // IQ3's eight 4-byte points are gathered by the caller ([`iq3_points`]).
            IQ3XXS => {
                let a = u32_at(b, 66 + 4 * g);
                ([0; 4], std::array::from_fn(|l| even_signs(a >> (7 * l))))
            }
            IQ3S => (
                [0; 4],
                std::array::from_fn(|l| SIGN_BYTES[b[74 + 4 * g + l] as usize]),
            ),
            IQ1S => {
                let h = u32::from(u16::from_le_bytes([b[34 + 2 * g], b[35 + 2 * g]]));
                let pts = std::array::from_fn(|l| {
                    g8(
                        &IQ1S_GRID,
                        b[2 + 4 * g + l] as usize | (((h >> (3 * l)) & 7) as usize) << 8,
                    )
                });
                // One shift for all four points: down where bit 15 is set.
                (pts, [shift(h & 0x8000 != 0); 4])
            }
            _ => {
                let (mut pts, mut shifts) = ([0u64; 4], [0u64; 4]);
                for half in 0..2 {
                    let h = 2 * g + half;
                    let q = b[32 + h] as usize;
                    pts[2 * half] = g8(&IQ1S_GRID, b[2 * h] as usize | (q << 8 & 0x700));
                    pts[2 * half + 1] = g8(&IQ1S_GRID, b[2 * h + 1] as usize | (q << 4 & 0x700));
                    shifts[2 * half] = shift(q & 0x08 != 0);
                    shifts[2 * half + 1] = shift(q & 0x80 != 0);
                }
                (pts, shifts)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<const T: u8>(row: &[u8], bytes: usize, q: &[i8], dx: &[f32]) -> f32 {
        let nb = row.len() / bytes;
        assert!(q.len() >= nb * 256 && dx.len() >= nb);
        let iq1 = matches!(T, IQ1S | IQ1M);
        let mut acc = 0.0f32;
        for b in 0..nb {
            let blk = &row[b * bytes..(b + 1) * bytes];
            let (scales, d) = scales::<T>(blk);
            // SAFETY: 16 scales; block b's 256 activations (asserted).
            unsafe {
                let sc = _mm256_loadu_si256(scales.as_ptr().cast());
                let (lo, hi) = (_mm256_unpacklo_epi16(sc, sc), _mm256_unpackhi_epi16(sc, sc));
                let xp = q.as_ptr().add(b * 256);
                let mut sum = _mm256_setzero_si256();
                for c in 0..8 {
                    let (pts, sg) = group::<T>(blk, c);
                    let xv = _mm256_loadu_si256(xp.add(32 * c).cast());
                    let g = if matches!(T, IQ3XXS | IQ3S) {
                        iq3_points::<T>(blk, c)
                    } else {
                        points(pts)
                    };
                    let sg = points(sg);
                    let p = if iq1 {
                        // 8·grid (grid bytes −1, 0, 1), then the ±1 shifts.
                        let codes = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), g), sg);
                        pairs_i8(codes, xv)
                    } else {
                        _mm256_maddubs_epi16(g, _mm256_sign_epi8(xv, sg))
                    };
                    sum = scaled(sum, p, lo, hi, c);
                }
                acc = k_accumulate(acc, d, 0.0, dx[b], hsum_i32(sum), 0);
            }
        }
        acc
    }
}
