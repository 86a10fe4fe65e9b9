//! Decoding dot products of the low-bit i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)
//! with Q8_K activations, vectorised as llama.cpp's `ggml_vec_dot_iq*_q8_K` do: per 32 codes, four lattice
//! points are loaded as 64-bit words (the grid bytes are the codes' magnitudes, unsigned), the activations
//! take the points' signs (`vpsignb`), and `vpmaddubsw` multiplies the unsigned magnitudes with the signed
//! activations; IQ1's codes (`8·grid ± 1`, signed) go through the signed pair product. The integer sums are
//! exactly the codecs' integer reading (`codecs::lowbit_int_reading`) times the activations, so the result
//! is the scalar reference's bit for bit (`cpu_q8::vec_dot_scalar`, tested there for every type, on
//! quantized rows and on random bytes). IQ2_XS has a loop of its own in the shape of ggml's (sixteen points'
//! signs completed at once, four groups' activations loaded up front, two integer accumulators, scales by
//! `vpshufb`): 8–9 % faster than the shared per-group loop (one thread, rows in cache, 3.4 → 3.7 GB/s; the
//! 1B-shaped stack out of cache, two threads, 4.9–6.4 → 6.0–6.9). `cpu_q8::vec_dot` dispatches here; this
//! module takes the activations as slices and the shared pieces from `int_dot`, so it depends on nothing
//! above it.

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
                GgmlType::Iq2Xs => dot_iq2xs(row, q, d),
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

    /// [`SIGN_BYTES`] of `ksigns_iq2xs[i]` (seven explicit sign bits, the eighth making their count even),
    /// composed once so a point's signs are one load.
    static EVEN_SIGN_BYTES: [u64; 128] = {
        let mut t = [0u64; 128];
        let mut i = 0;
        while i < 128 {
            t[i] = SIGN_BYTES[KSIGNS_IQ2XS[i] as usize];
            i += 1;
        }
        t
    };

    /// The IQ2/IQ3 seven-bit sign index `v & 127` (`ksigns_iq2xs`: the eighth sign makes the count even) as
    /// sign bytes.
    #[inline(always)]
    fn even_signs(v: u32) -> u64 {
        EVEN_SIGN_BYTES[(v & 127) as usize]
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

    /// IQ3 group `g`'s eight 4-byte lattice points: IQ3_XXS's indices are the bytes at `2 + 8g`, IQ3_S's
    /// those bytes with bit `k` of byte `66 + g` as their ninth bit. IQ3_XXS's with eight scalar loads, as
    /// ggml does, which on Zen 4 is 30–40 % faster than `vpgatherdd` (rows in cache, 2 threads: 6.0 → 7.7–8.5
    /// GB/s); IQ3_S's with the gather, whose ninth bits are three vector instructions where scalar code
    /// takes three per point (5.2–5.4 GB/s scalar, 6.0–6.6 gathered).
    #[inline(always)]
    unsafe fn iq3_points<const T: u8>(b: &[u8], g: usize) -> __m256i {
        let q: &[u8; 8] = b[2 + 8 * g..10 + 8 * g]
            .try_into()
            .unwrap_or_else(|_| unreachable!("eight bytes"));
        if T == IQ3XXS {
            let w = |i: usize| i32::from_le_bytes(IQ3XXS_GRID[usize::from(q[i])]);
            return _mm256_setr_epi32(w(0), w(1), w(2), w(3), w(4), w(5), w(6), w(7));
        }
        let qh = b[66 + g];
        // SAFETY: the 8 bytes of `q`; every index is below IQ3_S's grid length (512: nine bits), 4 bytes per
        // entry.
        unsafe {
            let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.as_ptr().cast()));
            let ninth = _mm256_and_si256(
                _mm256_srlv_epi32(
                    _mm256_set1_epi32(i32::from(qh)),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                ),
                _mm256_set1_epi32(1),
            );
            let idx = _mm256_or_si256(q, _mm256_slli_epi32::<8>(ninth));
            _mm256_i32gather_epi32::<4>(IQ3S_GRID.as_ptr().cast(), idx)
        }
    }

    #[inline(always)]
    fn odd(s: u32) -> i16 {
        (2 * s + 1) as i16
    }

    /// The f16 at `o` as f32, exactly (inline F16C, where `half` makes a call per block).
    ///
    /// # Safety
    /// The CPU has F16C (every caller runs with it enabled).
    #[inline(always)]
    unsafe fn f16(b: &[u8], o: usize) -> f32 {
        let bits = u16::from_le_bytes([b[o], b[o + 1]]);
        // SAFETY: F16C (the caller's contract).
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
    }

    #[inline(always)]
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// `0x80` where a nibble has an odd number of bits set, in both 128-bit lanes (for `vpshufb`).
    const PARITY80: [u8; 32] = {
        let mut t = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = if (i % 16).count_ones() % 2 == 1 {
                0x80
            } else {
                0
            };
            i += 1;
        }
        t
    };

    /// One block's scales per 16 codes (`2s + 1`) as a vector of 16 `i16`, and its multiplier; decoded with
    /// vector operations where the layout allows (IQ1_M's spread bits stay scalar).
    #[inline(always)]
    unsafe fn scale_vec<const T: u8>(b: &[u8]) -> (__m256i, f32) {
        // Eight i32 lanes `s` (one scale per 32 codes) as `2s + 1` in both 16-bit halves of each lane.
        let odd_pairs = |v: __m256i| {
            let o = _mm256_add_epi32(_mm256_slli_epi32::<1>(v), _mm256_set1_epi32(1));
            _mm256_or_si256(o, _mm256_slli_epi32::<16>(o))
        };
        let m15 = _mm_set1_epi8(15);
        // SAFETY (every load): inside the block of T (`b` is one whole block; offsets per its layout).
        unsafe {
            match T {
                IQ2XXS => {
                    assert!(b.len() >= 66);
                    // Groups' (indices, word) as 64-bit lanes: the word's top four bits are the lane's.
                    let v0 = _mm256_srli_epi64::<60>(_mm256_loadu_si256(b.as_ptr().add(2).cast()));
                    let v1 = _mm256_srli_epi64::<60>(_mm256_loadu_si256(b.as_ptr().add(34).cast()));
                    let lo =
                        _mm256_permutevar8x32_epi32(v0, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
                    let hi =
                        _mm256_permutevar8x32_epi32(v1, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
                    let v = _mm256_permute2x128_si256::<0x20>(lo, hi);
                    (odd_pairs(v), f16(b, 0) * 0.125)
                }
                IQ3XXS => {
                    assert!(b.len() >= 98);
                    let v = _mm256_srli_epi32::<28>(_mm256_loadu_si256(b.as_ptr().add(66).cast()));
                    (odd_pairs(v), f16(b, 0) * 0.25)
                }
                IQ2S => {
                    assert!(b.len() >= 82);
                    let v = _mm_loadl_epi64(b.as_ptr().add(74).cast());
                    let lo = _mm_and_si128(v, m15);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m15);
                    let s = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));
                    let o = _mm256_add_epi16(_mm256_slli_epi16::<1>(s), _mm256_set1_epi16(1));
                    (o, f16(b, 0) * 0.125)
                }
                IQ3S => {
                    assert!(b.len() >= 110);
                    let v = _mm_cvtsi32_si128(i32::from_le_bytes([b[106], b[107], b[108], b[109]]));
                    let lo = _mm_and_si128(v, m15);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m15);
                    let s = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
                    (odd_pairs(s), f16(b, 0))
                }
                IQ1S => {
                    assert!(b.len() >= 50);
                    let v = _mm_loadu_si128(b.as_ptr().add(34).cast());
                    let s = _mm_and_si128(_mm_srli_epi16::<12>(v), _mm_set1_epi16(7));
                    (odd_pairs(_mm256_cvtepu16_epi32(s)), f16(b, 0) * 0.125)
                }
                _ => {
                    let s = iq1m_scales(b);
                    let sc: [i16; 16] =
                        std::array::from_fn(|h| odd(u32::from((s[h / 4] >> (3 * (h % 4))) & 7)));
                    (_mm256_loadu_si256(sc.as_ptr().cast()), iq1m_d(&s) * 0.125)
                }
            }
        }
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
            IQ2XS => unreachable!("IQ2_XS has its own loop ([`dot_iq2xs`])"),
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
        // The codec table's block size, which the per-type constant repeats for the compiler.
        assert_eq!(bytes, block_bytes::<T>());
        assert!(q.len() >= nb * 256 && dx.len() >= nb);
        let mut acc = 0.0f32;
        for b in 0..nb {
            // A slice of the type's constant length: with the groups unrolled, every offset is a constant
            // the compiler checks once.
            let blk = &row[b * bytes..][..block_bytes::<T>()];
            // SAFETY: block b's 256 activations (asserted); `blk` is one whole block.
            unsafe {
                let (sc, d) = scale_vec::<T>(blk);
                let (lo, hi) = (_mm256_unpacklo_epi16(sc, sc), _mm256_unpackhi_epi16(sc, sc));
                let xp = q.as_ptr().add(b * 256);
                let g = Group { blk, xp, lo, hi };
                let mut sum = _mm256_setzero_si256();
                sum = g.step::<T, 0>(sum);
                sum = g.step::<T, 1>(sum);
                sum = g.step::<T, 2>(sum);
                sum = g.step::<T, 3>(sum);
                sum = g.step::<T, 4>(sum);
                sum = g.step::<T, 5>(sum);
                sum = g.step::<T, 6>(sum);
                sum = g.step::<T, 7>(sum);
                acc = k_accumulate(acc, d, 0.0, dx[b], hsum_i32(sum), 0);
            }
        }
        acc
    }

    /// IQ2_XS's dot product in the shape of ggml's AVX2 loop: per half block one 32-byte load of sixteen
    /// points' words, their signs completed at once, four groups' activations loaded up front, two
    /// integer accumulators, each group's scales by `vpshufb` + `vpmovsxbw`; the per-block float step is
    /// the scalar reference's.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_iq2xs(row: &[u8], q: &[i8], dx: &[f32]) -> f32 {
        const BYTES: usize = 74;
        const SPREAD1: [u8; 32] = {
            let mut t = [0u8; 32];
            let mut i = 0;
            while i < 32 {
                t[i] = (2 * (i / 8)) as u8;
                i += 1;
            }
            t
        };
        const SPREAD2: [u8; 32] = {
            let mut t = [0u8; 32];
            let mut i = 0;
            while i < 32 {
                t[i] = (8 + 2 * (i / 8)) as u8;
                i += 1;
            }
            t
        };
        const SCALE_SHUFFLE: [[u8; 16]; 8] = {
            let mut t = [[0u8; 16]; 8];
            let mut g = 0;
            while g < 8 {
                let mut i = 0;
                while i < 16 {
                    t[g][i] = (2 * g + i / 8) as u8;
                    i += 1;
                }
                g += 1;
            }
            t
        };
        let nb = row.len() / BYTES;
        assert!(q.len() >= nb * 256 && dx.len() >= nb);
        // SAFETY: 32-byte tables; every load below inside block b of `row` or its 256 activations.
        unsafe {
            let parity = _mm256_loadu_si256(PARITY80.as_ptr().cast());
            let s1 = _mm256_loadu_si256(SPREAD1.as_ptr().cast());
            let s2 = _mm256_loadu_si256(SPREAD2.as_ptr().cast());
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let one = _mm256_set1_epi8(1);
            let m511 = _mm256_set1_epi16(511);
            let m4 = _mm_set1_epi8(15);
            let mut acc = 0.0f32;
            for b in 0..nb {
                let blk = &row[b * BYTES..][..BYTES];
                let p = blk.as_ptr();
                let d = f16(blk, 0) * 0.125;
                let st = _mm_loadl_epi64(p.add(66).cast());
                let st = _mm_unpacklo_epi8(
                    _mm_and_si128(st, m4),
                    _mm_and_si128(_mm_srli_epi16::<4>(st), m4),
                );
                let scales = _mm_add_epi8(_mm_slli_epi16::<1>(st), _mm_set1_epi8(1));
                let mut sumi1 = _mm256_setzero_si256();
                let mut sumi2 = _mm256_setzero_si256();
                let mut q8 = q.as_ptr().add(b * 256);
                for h in 0..2 {
                    let data = _mm256_loadu_si256(p.add(2 + 32 * h).cast());
                    let mut gi = [0u16; 16];
                    _mm256_storeu_si256(gi.as_mut_ptr().cast(), _mm256_and_si256(data, m511));
                    let part = _mm256_srli_epi16::<9>(data);
                    let fold = _mm256_xor_si256(part, _mm256_srli_epi16::<13>(data));
                    let full = _mm256_or_si256(part, _mm256_shuffle_epi8(parity, fold));
                    let x1 = _mm256_loadu_si256(q8.cast());
                    let x2 = _mm256_loadu_si256(q8.add(32).cast());
                    let x3 = _mm256_loadu_si256(q8.add(64).cast());
                    let x4 = _mm256_loadu_si256(q8.add(96).cast());
                    q8 = q8.add(128);
                    let g = |k: usize| i64::from_le_bytes(IQ2XS_GRID[usize::from(gi[k])]);
                    let q1 = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
                    let q2 = _mm256_set_epi64x(g(7), g(6), g(5), g(4));
                    let q3 = _mm256_set_epi64x(g(11), g(10), g(9), g(8));
                    let q4 = _mm256_set_epi64x(g(15), g(14), g(13), g(12));
                    let f1 = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(full));
                    let f2 = _mm256_broadcastsi128_si256(_mm256_extracti128_si256::<1>(full));
                    let sg = |f: __m256i, s: __m256i, x: __m256i| {
                        let v = _mm256_shuffle_epi8(f, s);
                        let v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
                        _mm256_sign_epi8(x, _mm256_or_si256(v, one))
                    };
                    let d1 = _mm256_maddubs_epi16(q1, sg(f1, s1, x1));
                    let d2 = _mm256_maddubs_epi16(q2, sg(f1, s2, x2));
                    let d3 = _mm256_maddubs_epi16(q3, sg(f2, s1, x3));
                    let d4 = _mm256_maddubs_epi16(q4, sg(f2, s2, x4));
                    let sc = |k: usize| {
                        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
                            scales,
                            _mm_loadu_si128(SCALE_SHUFFLE[4 * h + k].as_ptr().cast()),
                        ))
                    };
                    sumi1 = _mm256_add_epi32(sumi1, _mm256_madd_epi16(d1, sc(0)));
                    sumi2 = _mm256_add_epi32(sumi2, _mm256_madd_epi16(d2, sc(1)));
                    sumi1 = _mm256_add_epi32(sumi1, _mm256_madd_epi16(d3, sc(2)));
                    sumi2 = _mm256_add_epi32(sumi2, _mm256_madd_epi16(d4, sc(3)));
                }
                acc = k_accumulate(
                    acc,
                    d,
                    0.0,
                    dx[b],
                    hsum_i32(_mm256_add_epi32(sumi1, sumi2)),
                    0,
                );
            }
            acc
        }
    }

    /// Bytes per block of `T`.
    const fn block_bytes<const T: u8>() -> usize {
        match T {
            IQ2XXS => 66,
            IQ2XS => 74,
            IQ2S => 82,
            IQ3XXS => 98,
            IQ3S => 110,
            IQ1S => 50,
            _ => 56,
        }
    }

    /// One block's state for its eight groups of 32 codes.
    struct Group<'a> {
        blk: &'a [u8],
        xp: *const i8,
        lo: __m256i,
        hi: __m256i,
    }

    impl Group<'_> {
        /// Group `C`'s (codes `32C..32C + 32`) scaled pair sums added to `sum` (one call per group, so
        /// every group-dependent index and scale selection is a constant).
        #[inline(always)]
        unsafe fn step<const T: u8, const C: usize>(&self, sum: __m256i) -> __m256i {
            let blk = self.blk;
            // SAFETY: block's activations `32C..32C + 32` (the caller's).
            let xv = unsafe { _mm256_loadu_si256(self.xp.add(32 * C).cast()) };
            let (pts, sg) = group::<T>(blk, C);
            // SAFETY: AVX2 (the caller's); IQ3's group inside the block.
            let (g, sg) = unsafe {
                let g = if matches!(T, IQ3XXS | IQ3S) {
                    iq3_points::<T>(blk, C)
                } else {
                    points(pts)
                };
                (g, points(sg))
            };
            // SAFETY: AVX2 (the caller's).
            unsafe {
                let p = if matches!(T, IQ1S | IQ1M) {
                    // 8·grid (grid bytes −1, 0, 1), then the ±1 shifts.
                    let codes = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), g), sg);
                    pairs_i8(codes, xv)
                } else {
                    _mm256_maddubs_epi16(g, _mm256_sign_epi8(xv, sg))
                };
                scaled(sum, p, self.lo, self.hi, C)
            }
        }
    }
}
