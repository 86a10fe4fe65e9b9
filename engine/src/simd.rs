//! Hand-vectorised inner loops for the hot paths, picked once at run time by CPU feature, each with the
//! plain scalar reference it is tested against.

/// Which implementation this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                Level::Avx2
            } else {
                Level::Scalar
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Scalar
}

/// Little-endian f16 bytes → f32.
/// Round half to even for `|x| ≤ 2²²` (callers clamp to their code range first): adding and removing
/// 1.5·2²³ leaves the rounding to the FPU's default mode. `f32::round_ties_even` is a libm call (`rintf`)
/// without SSE4.1 in the target — 98 % of EXL2's scale search before this — while this inlines and
/// vectorises.
#[inline(always)]
pub fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 2);
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::f16_to_f32(src, dst),
        Level::Scalar => f16_to_f32_scalar(src, dst),
    }
}

/// f32 → little-endian f16 bytes, rounded to nearest (ties to even, as F16C's `vcvtps2ph` does): the
/// values [`round_f16`] gives, stored in half the bytes.
pub fn f32_to_f16(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len() * 2);
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::f32_to_f16(src, dst),
        Level::Scalar => f32_to_f16_scalar(src, dst),
    }
}

/// Σ f16(w[i]) · x[i] for little-endian f16 bytes `w`.
pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len() * 2);
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::dot_f16(w, x),
        Level::Scalar => dot_f16_scalar(w, x),
    }
}

/// [`dot_f16`] of two weight rows against the same activations, bit for bit (`(dot_f16(w0, x),
/// dot_f16(w1, x))`): each 8 activations loaded once for both rows, one call for the pair (short rows,
/// such as a 576-wide model's, spent a fifth of their time in the per-row call and reduction).
pub fn dot_f16_2(w0: &[u8], w1: &[u8], x: &[f32]) -> (f32, f32) {
    assert!(w0.len() == x.len() * 2 && w1.len() == x.len() * 2);
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::dot_f16_2(w0, w1, x),
        Level::Scalar => (dot_f16_scalar(w0, x), dot_f16_scalar(w1, x)),
    }
}

/// [`dot_f16`] against `T` activation rows at once, bit for bit: `out[t] = dot_f16(w, x[t·n..(t+1)·n])`
/// with `n = w.len() / 2`. Each 8 weights are loaded and converted once for all `T` rows (the verification
/// pass of speculative decoding reads each F16 row for several tokens; converting it once per token was
/// most of that pass's cost).
pub fn dot_f16_n<const T: usize>(w: &[u8], x: &[f32], out: &mut [f32; T]) {
    let n = w.len() / 2;
    assert!(w.len() == 2 * n && x.len() == T * n);
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        return x86::dot_f16_n(w, x, out);
    }
    for (t, o) in out.iter_mut().enumerate() {
        *o = dot_f16_scalar(w, &x[t * n..(t + 1) * n]);
    }
}

/// Attention scores of one query against a run of cached keys: `out[j] = dot(q, key j) · scale`, each key
/// `q.len()` values (f32 here, f16 in [`scores_f16`]), with the bits of [`dot`] (its 8 lanes, products then
/// sums, its final order) — one dispatch for the run instead of one per key.
pub fn scores_f32(keys: &[f32], q: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(hd > 0 && keys.len() == out.len() * hd);
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        return x86::scores(|j, i| x86::Row::F32(&keys[j * hd + i..]), q, scale, out);
    }
    for (o, k) in out.iter_mut().zip(keys.chunks_exact(hd)) {
        *o = dot(q, k) * scale;
    }
}

/// [`scores_f32`] over little-endian f16 keys (`2·q.len()` bytes each), each converted exactly.
pub fn scores_f16(keys: &[u8], q: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(hd > 0 && keys.len() == out.len() * 2 * hd);
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        return x86::scores(
            |j, i| x86::Row::F16(&keys[2 * (j * hd + i)..]),
            q,
            scale,
            out,
        );
    }
    let mut k = vec![0f32; hd];
    for (o, kb) in out.iter_mut().zip(keys.chunks_exact(2 * hd)) {
        f16_to_f32_scalar(kb, &mut k);
        *o = dot(q, &k) * scale;
    }
}

/// `o[i] += p[j] · value j [i]` for every cached value `j` in order (a product, then a sum, as the scalar
/// loop computes it), the values f32 here, f16 in [`add_weighted_f16`].
pub fn add_weighted_f32(p: &[f32], vals: &[f32], o: &mut [f32]) {
    let hd = o.len();
    assert!(vals.len() == p.len() * hd);
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        return x86::add_weighted(p, |j, i| x86::Row::F32(&vals[j * hd + i..]), o);
    }
    for (&pj, v) in p.iter().zip(vals.chunks_exact(hd)) {
        for (oo, &vv) in o.iter_mut().zip(v) {
            *oo += pj * vv;
        }
    }
}

/// [`add_weighted_f32`] over little-endian f16 values (`2·o.len()` bytes each).
pub fn add_weighted_f16(p: &[f32], vals: &[u8], o: &mut [f32]) {
    let hd = o.len();
    assert!(vals.len() == p.len() * 2 * hd);
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        return x86::add_weighted(p, |j, i| x86::Row::F16(&vals[2 * (j * hd + i)..]), o);
    }
    let mut v = vec![0f32; hd];
    for (&pj, vb) in p.iter().zip(vals.chunks_exact(2 * hd)) {
        f16_to_f32_scalar(vb, &mut v);
        for (oo, &vv) in o.iter_mut().zip(&v) {
            *oo += pj * vv;
        }
    }
}

/// Σ a[i] · b[i].
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::dot_f32(a, b),
        Level::Scalar => dot(a, b),
    }
}

/// Round every value to the nearest f16 and back (ties to even, as F16C's `vcvtps2ph` does).
pub fn round_f16(x: &mut [f32]) {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::round_f16(x),
        Level::Scalar => round_f16_scalar(x),
    }
}

/// `e^x` for every element, in place: Cephes' `expf` (range reduction by ln 2 in two parts, a degree-5
/// polynomial), within 2 ulp of the true value for −87.3 ≤ x ≤ 88; inputs are clamped to that range (softmax
/// and SiLU never need more). The vector and scalar forms give the same bits.
pub fn exp_in_place(x: &mut [f32]) {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::exp_in_place(x),
        Level::Scalar => x.iter_mut().for_each(|v| *v = exp_scalar(*v)),
    }
}

const EXP_LO: f32 = -87.336_55;
const EXP_HI: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// The scalar form of [`exp_in_place`].
pub fn exp_scalar(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = round_even(x * LOG2E);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

fn round_f16_scalar(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

fn f32_to_f16_scalar(src: &[f32], dst: &mut [u8]) {
    for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
    }
}

fn f16_to_f32_scalar(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

fn dot_f16_scalar(w: &[u8], x: &[f32]) -> f32 {
    if x.is_empty() {
        // The vector kernels' empty tail: no scratch to clear.
        return 0.0;
    }
    let mut buf = [0.0f32; 64];
    let mut s = 0.0f32;
    for (wc, xc) in w.chunks(128).zip(x.chunks(64)) {
        let b = &mut buf[..xc.len()];
        f16_to_f32_scalar(wc, b);
        s += dot(b, xc);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
        // SAFETY: only called after `level()` saw avx2, fma and f16c on this CPU.
        unsafe { f16_to_f32_impl(src, dst) }
    }

    pub fn f32_to_f16(src: &[f32], dst: &mut [u8]) {
        // SAFETY: as above.
        unsafe { f32_to_f16_impl(src, dst) }
    }

    pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
        let mut out = [0.0f32];
        // SAFETY: as above.
        unsafe { dot_f16_n_impl(w, x, &mut out) };
        out[0]
    }

    pub fn dot_f16_2(w0: &[u8], w1: &[u8], x: &[f32]) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { dot_f16_2_impl(w0, w1, x) }
    }

    pub fn dot_f16_n<const T: usize>(w: &[u8], x: &[f32], out: &mut [f32; T]) {
        // SAFETY: as above.
        unsafe { dot_f16_n_impl(w, x, out) }
    }

    /// Where a key or value row continues: f32 values, or f16 bytes.
    pub enum Row<'a> {
        F32(&'a [f32]),
        F16(&'a [u8]),
    }

    impl Row<'_> {
        /// The next 8 values as f32 (the row has at least 8 left).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn load8(&self) -> __m256 {
            match self {
                Row::F32(r) => {
                    assert!(r.len() >= 8);
                    // SAFETY: 8 floats in bounds (asserted).
                    unsafe { _mm256_loadu_ps(r.as_ptr()) }
                }
                Row::F16(r) => {
                    assert!(r.len() >= 16);
                    // SAFETY: 16 bytes in bounds (asserted).
                    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(r.as_ptr().cast())) }
                }
            }
        }

        /// The value at `i` as f32.
        fn at(&self, i: usize) -> f32 {
            match self {
                Row::F32(r) => r[i],
                Row::F16(r) => half::f16::from_le_bytes([r[2 * i], r[2 * i + 1]]).to_f32(),
            }
        }
    }

    pub fn scores<'a>(
        row: impl Fn(usize, usize) -> Row<'a>,
        q: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        // SAFETY: only called after `level()` saw avx2, fma and f16c on this CPU.
        unsafe { scores_impl(row, q, scale, out) }
    }

    /// `super::dot`'s arithmetic: one 8-lane accumulator of products then sums, the tail in order, then
    /// `(tail + ((a0 + a4) + (a1 + a5))) + ((a2 + a6) + (a3 + a7))`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_impl<'a>(
        row: impl Fn(usize, usize) -> Row<'a>,
        q: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = q.len();
        let full = hd / 8 * 8;
        for (j, o) in out.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_ps();
            for i in (0..full).step_by(8) {
                // SAFETY: i + 8 <= hd: 8 floats of q in bounds.
                let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(i)) };
                acc = _mm256_add_ps(acc, _mm256_mul_ps(qv, row(j, i).load8()));
            }
            let mut tail = 0f32;
            if full < hd {
                let r = row(j, full);
                for (k, &qv) in q[full..].iter().enumerate() {
                    tail += qv * r.at(k);
                }
            }
            let t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let t = _mm_add_ps(t, _mm_movehdup_ps(t)); // lanes 0, 2: t0 + t1, t2 + t3
            *o = ((tail + _mm_cvtss_f32(t)) + _mm_cvtss_f32(_mm_movehl_ps(t, t))) * scale;
        }
    }

    pub fn add_weighted<'a>(p: &[f32], row: impl Fn(usize, usize) -> Row<'a>, o: &mut [f32]) {
        // SAFETY: only called after `level()` saw avx2, fma and f16c on this CPU.
        unsafe { add_weighted_impl(p, row, o) }
    }

    /// `o[i] = o[i] + p[j] · v[j][i]` for j in order (a product, then a sum), 64 outputs at a time held
    /// in registers across all `j`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add_weighted_impl<'a>(
        p: &[f32],
        row: impl Fn(usize, usize) -> Row<'a>,
        o: &mut [f32],
    ) {
        let hd = o.len();
        let full = hd / 8 * 8;
        let mut c0 = 0;
        while c0 < full {
            let w = (full - c0).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for (k, a) in acc.iter_mut().enumerate().take(w) {
                // SAFETY: c0 + 8k + 8 <= full <= hd.
                *a = unsafe { _mm256_loadu_ps(o.as_ptr().add(c0 + 8 * k)) };
            }
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm256_set1_ps(pj);
                for (k, a) in acc.iter_mut().enumerate().take(w) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, row(j, c0 + 8 * k).load8()));
                }
            }
            for (k, a) in acc.iter().enumerate().take(w) {
                // SAFETY: as the loads above.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * k), *a) };
            }
            c0 += 8 * w;
        }
        for (j, &pj) in p.iter().enumerate() {
            let r = row(j, full);
            for (k, oo) in o[full..].iter_mut().enumerate() {
                *oo += pj * r.at(k);
            }
        }
    }

    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { dot_f32_impl(a, b) }
    }

    pub fn round_f16(x: &mut [f32]) {
        // SAFETY: as above.
        unsafe { round_f16_impl(x) }
    }

    pub fn exp_in_place(x: &mut [f32]) {
        // SAFETY: as above.
        unsafe { exp_impl(x) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp_impl(x: &mut [f32]) {
        use super::{EXP_HI, EXP_LO, EXP_P, LN2_HI, LN2_LO, LOG2E};
        let n = x.len();
        let p = x.as_mut_ptr();
        let magic = _mm256_set1_ps(12_582_912.0);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n: 8 floats in bounds, unaligned load and store.
            unsafe {
                let v = _mm256_loadu_ps(p.add(i));
                let v = _mm256_min_ps(
                    _mm256_max_ps(v, _mm256_set1_ps(EXP_LO)),
                    _mm256_set1_ps(EXP_HI),
                );
                let k = _mm256_sub_ps(
                    _mm256_add_ps(_mm256_mul_ps(v, _mm256_set1_ps(LOG2E)), magic),
                    magic,
                );
                let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_HI), v);
                let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_LO), r);
                let mut q = _mm256_set1_ps(EXP_P[0]);
                for &c in &EXP_P[1..] {
                    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(c));
                }
                let y = _mm256_add_ps(
                    _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r),
                    _mm256_set1_ps(1.0),
                );
                let e = _mm256_slli_epi32(
                    _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)),
                    23,
                );
                _mm256_storeu_ps(p.add(i), _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
            }
            i += 8;
        }
        for v in &mut x[i..] {
            *v = super::exp_scalar(*v);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn round_f16_impl(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n: 8 floats in bounds, unaligned load and store.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p.add(i)));
                _mm256_storeu_ps(p.add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        super::round_f16_scalar(&mut x[i..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f32_to_f16_impl(src: &[f32], dst: &mut [u8]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, so 8 source floats and 16 destination bytes are in bounds; loads and
            // stores are unaligned.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(
                    src.as_ptr().add(i),
                ));
                _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
            i += 8;
        }
        super::f32_to_f16_scalar(&src[i..], &mut dst[2 * i..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_to_f32_impl(src: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, so 16 source bytes and 8 destination floats are in bounds; loads and
            // stores are unaligned.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        super::f16_to_f32_scalar(&src[2 * i..], &mut dst[i..]);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `dot_f16_n_impl::<1>` for two weight rows (each as long as `x`): the same accumulators, sums and tail
    /// per row, each 8 activations loaded once.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16_2_impl(w0: &[u8], w1: &[u8], x: &[f32]) -> (f32, f32) {
        let n = x.len();
        assert!(w0.len() == 2 * n && w1.len() == 2 * n);
        let (p0, p1, xp) = (w0.as_ptr(), w1.as_ptr(), x.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut b = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            // Both streams ahead, as `dot_f16_n_impl` (a prefetch never faults).
            _mm_prefetch::<_MM_HINT_T2>(p0.wrapping_add(2 * i + 8192).cast());
            _mm_prefetch::<_MM_HINT_T2>(p1.wrapping_add(2 * i + 8192).cast());
            for k in 0..4 {
                let j = i + 8 * k;
                // SAFETY: j + 8 <= n: 16 bytes of each row and 8 floats of x are in bounds.
                unsafe {
                    let xv = _mm256_loadu_ps(xp.add(j));
                    let h0 = _mm256_cvtph_ps(_mm_loadu_si128(p0.add(2 * j).cast()));
                    let h1 = _mm256_cvtph_ps(_mm_loadu_si128(p1.add(2 * j).cast()));
                    a[k] = _mm256_fmadd_ps(h0, xv, a[k]);
                    b[k] = _mm256_fmadd_ps(h1, xv, b[k]);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, as above.
            unsafe {
                let xv = _mm256_loadu_ps(xp.add(i));
                let h0 = _mm256_cvtph_ps(_mm_loadu_si128(p0.add(2 * i).cast()));
                let h1 = _mm256_cvtph_ps(_mm_loadu_si128(p1.add(2 * i).cast()));
                a[0] = _mm256_fmadd_ps(h0, xv, a[0]);
                b[0] = _mm256_fmadd_ps(h1, xv, b[0]);
            }
            i += 8;
        }
        let fold =
            |v: [__m256; 4]| _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
        (
            hsum(fold(a)) + super::dot_f16_scalar(&w0[2 * i..], &x[i..]),
            hsum(fold(b)) + super::dot_f16_scalar(&w1[2 * i..], &x[i..]),
        )
    }

    /// `dot_f16` of `w` against `T` rows of `x` (each `w.len() / 2` long; `T = 1` is `dot_f16` itself): per
    /// row four 8-lane accumulators over 32 values, then 8 at a time into the first, the four summed
    /// `(a0 + a1) + (a2 + a3)`, reduced, plus the scalar tail; each 8 weights converted once for all rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16_n_impl<const T: usize>(w: &[u8], x: &[f32], out: &mut [f32; T]) {
        let n = w.len() / 2;
        assert!(x.len() == T * n);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        let mut i = 0;
        while i + 32 <= n {
            // The row stream 8 KB ahead with the T2 hint (a prefetch never faults, whatever the address):
            // rows are contiguous, so this runs into the rows that come next. `examples/decode_bandwidth f16`
            // on two threads: 42–51 GB/s, at the streaming read's rate, where T1 32 KB ahead read 31–45 and
            // T1 4 KB 37 (no prefetch 34); one thread alike (23 GB/s). Earlier, one thread decoding the
            // 1B-shape model read 9.0–10.1 tokens/s with T1 4 KB and 11.2–11.5 with T1 32 KB.
            _mm_prefetch::<_MM_HINT_T2>(wp.wrapping_add(2 * i + 8192).cast());
            for k in 0..4 {
                let j = i + 8 * k;
                // SAFETY: j + 8 <= n: 16 bytes of w, and 8 floats of each row of x (t·n + j + 8 <= T·n).
                unsafe {
                    let h = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * j).cast()));
                    for (t, a) in acc.iter_mut().enumerate() {
                        a[k] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xp.add(t * n + j)), a[k]);
                    }
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, as above.
            unsafe {
                let h = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i).cast()));
                for (t, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xp.add(t * n + i)), a[0]);
                }
            }
            i += 8;
        }
        for (t, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
            let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            *o = hsum(v) + super::dot_f16_scalar(&w[2 * i..], &x[t * n + i..(t + 1) * n]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f32_impl(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                let j = i + 8 * k;
                // SAFETY: j + 8 <= n for both slices (equal lengths asserted by the caller).
                unsafe {
                    *s =
                        _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(j)), _mm256_loadu_ps(bp.add(j)), *s);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, as above.
            unsafe {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(ap.add(i)),
                    _mm256_loadu_ps(bp.add(i)),
                    acc[0],
                );
            }
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let tail: f32 = a[i..].iter().zip(&b[i..]).map(|(x, y)| x * y).sum();
        hsum(v) + tail
    }
}

/// A dot product with eight independent accumulators, so it vectorises without fast-math.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 211) as f32 / 37.0 - 2.5)
            .collect();
        let bytes: Vec<u8> = w
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 97) as f32 / 13.0 - 3.0)
            .collect();
        (bytes, w, x)
    }

    #[test]
    fn dot_f16_2_equals_one_dot_per_row_bit_for_bit() {
        for n in [0, 1, 7, 8, 31, 32, 33, 576, 1536 + 5] {
            let (w0, _, x) = data(n);
            // A second row: the first reversed.
            let w1: Vec<u8> = w0.chunks_exact(2).rev().flatten().copied().collect();
            let (a, b) = dot_f16_2(&w0, &w1, &x);
            assert_eq!(a.to_bits(), dot_f16(&w0, &x).to_bits(), "n={n} row 0");
            assert_eq!(b.to_bits(), dot_f16(&w1, &x).to_bits(), "n={n} row 1");
        }
    }

    #[test]
    fn dot_f16_n_equals_one_dot_per_row_bit_for_bit() {
        for n in [0, 1, 7, 8, 31, 32, 33, 576, 1536 + 5] {
            let (bytes, _, x1) = data(n);
            // Four different rows: the first shifted and scaled per row.
            let x: Vec<f32> = (0..4)
                .flat_map(|t| {
                    x1.iter()
                        .map(move |&v| v * (1.0 + t as f32 * 0.37) - t as f32)
                })
                .collect();
            let mut four = [0.0f32; 4];
            dot_f16_n(&bytes, &x, &mut four);
            let mut three = [0.0f32; 3];
            dot_f16_n(&bytes, &x[..3 * n], &mut three);
            for t in 0..4 {
                let one = dot_f16(&bytes, &x[t * n..(t + 1) * n]);
                assert_eq!(four[t].to_bits(), one.to_bits(), "n={n} row {t}");
                if t < 3 {
                    assert_eq!(three[t].to_bits(), one.to_bits(), "n={n} row {t} of 3");
                }
            }
        }
    }

    #[test]
    fn vectorised_paths_match_the_scalar_reference() {
        for n in [0, 1, 7, 8, 31, 32, 33, 576, 1536 + 5] {
            let (bytes, _, x) = data(n);
            let mut a = vec![0.0; n];
            let mut b = vec![0.0; n];
            f16_to_f32(&bytes, &mut a);
            f16_to_f32_scalar(&bytes, &mut b);
            assert_eq!(a, b, "conversion is exact, n={n}");
            let (d, r) = (dot_f16(&bytes, &x), dot_f16_scalar(&bytes, &x));
            assert!((d - r).abs() <= 1e-4 * (1.0 + r.abs()), "n={n}: {d} vs {r}");
            let (d, r) = (dot_f32(&a, &x), dot(&a, &x));
            assert!((d - r).abs() <= 1e-4 * (1.0 + r.abs()), "n={n}: {d} vs {r}");
        }
    }

    /// Attention scores and weighted value sums over f32 and f16 rows have the bits of the scalar loops
    /// the attention used to run (`dot(q, k) · scale`; `o += p · v` in order), at head sizes with and
    /// without an 8-value tail.
    #[test]
    fn attention_kernels_equal_the_scalar_loops_bit_for_bit() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 6.0
        };
        for hd in [1, 7, 16, 64, 80, 100, 128, 136] {
            let len = 37;
            let q: Vec<f32> = (0..hd).map(|_| rnd()).collect();
            let k32: Vec<f32> = (0..len * hd)
                .map(|_| half::f16::from_f32(rnd()).to_f32())
                .collect();
            let k16: Vec<u8> = k32
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            let want: Vec<u32> = k32
                .chunks_exact(hd)
                .map(|k| (dot(&q, k) * 0.125).to_bits())
                .collect();
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            scores_f32(&k32, &q, 0.125, &mut a);
            scores_f16(&k16, &q, 0.125, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want,
                "hd {hd}"
            );
            assert_eq!(
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want,
                "hd {hd}"
            );
            let p: Vec<f32> = (0..len).map(|_| rnd().abs() / 7.0).collect();
            let start: Vec<f32> = (0..hd).map(|_| rnd()).collect();
            let mut want = start.clone();
            for (&pj, v) in p.iter().zip(k32.chunks_exact(hd)) {
                for (o, &vv) in want.iter_mut().zip(v) {
                    *o += pj * vv;
                }
            }
            let (mut a, mut b) = (start.clone(), start.clone());
            add_weighted_f32(&p, &k32, &mut a);
            add_weighted_f16(&p, &k16, &mut b);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&want), "hd {hd}");
            assert_eq!(bits(&b), bits(&want), "hd {hd}");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_the_vector_form_equals_the_scalar_one() {
        let xs: Vec<f32> = (0..20_000)
            .map(|i| -87.3 + (i as f32) * (88.0 + 87.3) / 20_000.0)
            .chain([
                0.0,
                -0.0,
                1.0,
                -1.0,
                1e-8,
                -1e-8,
                88.0,
                -87.3,
                -1e4,
                1e4,
                f32::NEG_INFINITY,
            ])
            .collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (&x, &e) in xs.iter().zip(&v) {
            assert_eq!(e.to_bits(), exp_scalar(x).to_bits(), "x = {x}");
            if (EXP_LO..=EXP_HI).contains(&x) {
                let want = f64::from(x).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                assert!(
                    (f64::from(e) - want).abs() <= 2.0 * ulp,
                    "x = {x}: {e} vs {want}"
                );
            }
        }
        assert_eq!(exp_scalar(0.0), 1.0);
        assert!(exp_scalar(f32::NEG_INFINITY) > 0.0 && exp_scalar(f32::NEG_INFINITY) < 1.2e-38);
    }

    #[test]
    fn f16_rounding_equals_the_scalar_one_on_ties_overflow_and_subnormals() {
        // Exact ties between two f16 values (1 + 2⁻¹¹ and 1 + 3·2⁻¹¹), beyond f16's range, subnormals,
        // signed zero, infinities, NaN, and a spread of ordinary values.
        let mut x = vec![
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            -(1.0 + 2f32.powi(-11)),
            65519.0,
            65520.0,
            1e6,
            -1e6,
            3e-8,
            6e-8,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        x.extend((0..1000).map(|i| (i as f32 * 0.7311).sin() * 10f32.powi(i % 9 - 4)));
        let mut a = x.clone();
        let mut b = x.clone();
        round_f16(&mut a);
        round_f16_scalar(&mut b);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(a[0], 1.0, "a tie goes to the even neighbour");
        assert_eq!(a[1], 1.0 + 4.0 * 2f32.powi(-11));
        assert!(a[4].is_infinite() && a[5].is_infinite());
        let mut nan = [f32::NAN; 9];
        round_f16(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
        // Stored as f16 bytes: the same values, in both forms of the conversion.
        let mut bytes = vec![0u8; 2 * x.len()];
        let mut scalar = bytes.clone();
        f32_to_f16(&x, &mut bytes);
        f32_to_f16_scalar(&x, &mut scalar);
        assert_eq!(bytes, scalar);
        let mut back = vec![0.0f32; x.len()];
        f16_to_f32(&bytes, &mut back);
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
