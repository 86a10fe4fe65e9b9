//! The CPU's f32 GEMM `y = x · wᵀ` (prompt processing over dequantised weight tiles, and attention): `w` is
//! packed into panels of [`NR`] rows stored k-major in a per-thread buffer that is reused from call to call
//! (no allocation per call), `x` is read in place, and a register-blocked microkernel of [`MR`] activation
//! rows × [`NR`] weight rows accumulates over blocks of [`KC`] columns. AVX-512 ([`MR_512`] rows) or
//! AVX2+FMA where the CPU has them, a scalar reference otherwise (and in the tests); all three make the
//! same sums in the same order (one FMA per column), so their results are equal bit for bit.

use std::cell::RefCell;

/// Weight rows per packed panel (two AVX2 registers).
const NR: usize = 16;
/// Activation rows per microkernel call (AVX2: 12 ymm accumulators).
const MR: usize = 6;
/// Activation rows per AVX-512 microkernel call: one zmm accumulator per row, each token's value met as
/// an FMA's broadcast memory operand (no separate broadcast instruction).
const MR_512: usize = 12;
/// Columns per pass over the panels (a panel's slice stays in L1/L2 while every activation row block uses it).
const KC: usize = 256;

/// How the `m × k` operand `w` is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WLayout {
    /// `w[j·k + c]`: rows of the weight (a dequantised tile, attention's keys).
    RowMajor,
    /// `w[c·m + j]`: the transpose stored row-major (attention's values).
    KMajor,
}

thread_local! {
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One column block of every panel ([`run_blocks`]).
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[t·ldy + j] = Σ_c x[t·k + c] · w(j, c)` for `t < n`, `j < m`, single-threaded (callers parallelise).
///
/// # Safety
/// `y` must be valid for writes at `y + t·ldy + j` for `t < n`, `j < m`, and no other thread may touch
/// those elements meanwhile.
#[allow(unsafe_code)]
pub unsafe fn gemm_nt(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    layout: WLayout,
    y: *mut f32,
    ldy: usize,
) {
    assert!(x.len() >= n * k && w.len() >= m * k && (n == 0 || ldy >= m));
    if n == 0 || m == 0 {
        return;
    }
    PANELS.with_borrow_mut(|panels| {
        pack(m, k, w, layout, panels);
        // SAFETY: forwarded from the caller.
        unsafe { run(n, m, k, x, panels, k * NR, y, ldy) };
    });
}

/// [`gemm_nt`] with the `m` weight rows given as little-endian f16 values (`rows[j]` holds `2k` bytes):
/// converted to f32 as they are packed, so no f32 copy of the rows is made; the products are those of
/// [`gemm_nt`] on the converted rows, bit for bit (the conversion is exact).
///
/// # Safety
/// As [`gemm_nt`].
#[allow(unsafe_code)]
pub unsafe fn gemm_nt_f16(n: usize, k: usize, x: &[f32], rows: &[&[u8]], y: *mut f32, ldy: usize) {
    let m = rows.len();
    assert!(x.len() >= n * k && rows.iter().all(|r| r.len() >= 2 * k) && (n == 0 || ldy >= m));
    if n == 0 || m == 0 {
        return;
    }
    let pack = |k0: usize, kl: usize, dst: &mut [f32]| pack_f16(k0, kl, rows, dst);
    // SAFETY: forwarded from the caller; `pack_f16` writes every value of the block.
    unsafe { run_blocks(n, m, k, Acts::F32(x), &pack, y, ldy) };
}

/// [`gemm_nt_f16`] with the activations given as little-endian f16 values too (`x` holds `2·n·k` bytes):
/// the products of [`gemm_nt_f16`] on their f32 values, bit for bit, reading half the bytes (a prompt's
/// activations, re-read by every tile, then stay in L2 at the widths of small models).
///
/// # Safety
/// As [`gemm_nt`].
#[allow(unsafe_code)]
pub unsafe fn gemm_nt_f16_acts(
    n: usize,
    k: usize,
    x: &[u8],
    rows: &[&[u8]],
    y: *mut f32,
    ldy: usize,
) {
    let m = rows.len();
    assert!(x.len() >= 2 * n * k && rows.iter().all(|r| r.len() >= 2 * k) && (n == 0 || ldy >= m));
    if n == 0 || m == 0 {
        return;
    }
    let pack = |k0: usize, kl: usize, dst: &mut [f32]| pack_f16(k0, kl, rows, dst);
    // SAFETY: forwarded from the caller; `pack_f16` writes every value of the block.
    unsafe { run_blocks(n, m, k, Acts::F16(x), &pack, y, ldy) };
}

/// The activation operand of a product: f32 values, or little-endian f16 bytes converted as they are
/// copied into the microkernel's block.
#[derive(Clone, Copy)]
enum Acts<'a> {
    F32(&'a [f32]),
    F16(&'a [u8]),
}

impl Acts<'_> {
    /// Values `at..at + dst.len()` as f32.
    fn copy_to(self, at: usize, dst: &mut [f32]) {
        match self {
            Acts::F32(x) => dst.copy_from_slice(&x[at..at + dst.len()]),
            Acts::F16(x) => crate::simd::f16_to_f32(&x[2 * at..2 * (at + dst.len())], dst),
        }
    }

    /// A hint that values `at..at + len` are read soon.
    #[allow(unsafe_code)]
    fn prefetch(self, at: usize, len: usize) {
        let bytes = match self {
            Acts::F32(x) => bytemuck::cast_slice(&x[at..at + len]),
            Acts::F16(x) => &x[2 * at..2 * (at + len)],
        };
        #[cfg(target_arch = "x86_64")]
        for line in bytes.chunks(64) {
            // SAFETY: SSE is part of x86_64; a prefetch reads nothing and never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    line.as_ptr().cast(),
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = bytes;
    }
}

/// An `m × k` operand packed once for many products (attention's keys and values, shared by every query
/// block of a head group).
pub struct Packed {
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl Packed {
    pub fn new(m: usize, k: usize, w: &[f32], layout: WLayout) -> Self {
        assert!(w.len() >= m * k);
        let mut data = Vec::new();
        pack(m, k, w, layout, &mut data);
        Self { m, k, data }
    }
}

/// [`gemm_nt`] with the first `m` rows and first `k` columns of a [`Packed`] operand: the same sums, in the
/// same order, as packing those rows and columns for the call.
///
/// # Safety
/// As [`gemm_nt`].
#[allow(unsafe_code)]
pub unsafe fn gemm_nt_packed(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    w: &Packed,
    y: *mut f32,
    ldy: usize,
) {
    assert!(m <= w.m && k <= w.k && x.len() >= n * k && (n == 0 || ldy >= m));
    if n == 0 || m == 0 {
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe { run(n, m, k, x, &w.data, w.k * NR, y, ldy) };
}

/// `y[n, m] = x[n, k] · w[..m, ..k]ᵀ` into a dense `y` ([`gemm_nt_packed`] with `ldy = m`).
#[allow(unsafe_code)]
pub fn product_packed(n: usize, m: usize, k: usize, x: &[f32], w: &Packed, y: &mut [f32]) {
    assert!(y.len() >= n * m);
    // SAFETY: `y` holds n rows of m (asserted) and is borrowed exclusively.
    unsafe { gemm_nt_packed(n, m, k, x, w, y.as_mut_ptr(), m) }
}

/// The blocked loops over packed panels (each `pstride` values apart, columns `k0..` at `k0·NR`).
///
/// # Safety
/// As [`gemm_nt`]; `panels` holds `m.div_ceil(NR)` panels of at least `k` columns.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn run(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    panels: &[f32],
    pstride: usize,
    y: *mut f32,
    ldy: usize,
) {
    if k == 0 {
        for t in 0..n {
            for j in 0..m {
                // SAFETY: in the caller's output range.
                unsafe { *y.add(t * ldy + j) = 0.0 };
            }
        }
        return;
    }
    let np = m.div_ceil(NR);
    assert!(pstride >= k * NR && panels.len() >= (np - 1) * pstride + k * NR);
    let mut xb = [0.0f32; MR_512 * KC];
    for k0 in (0..k).step_by(KC) {
        let kl = KC.min(k - k0);
        // SAFETY: forwarded; each panel's columns k0..k0+kl are at p·pstride + k0·NR.
        unsafe {
            column_block(
                n,
                m,
                k,
                k0,
                kl,
                Acts::F32(x),
                panels,
                pstride,
                k0 * NR,
                y,
                ldy,
                &mut xb,
            )
        };
    }
}

/// [`run`] with the panels packed one column block at a time by `pack_block(k0, kl, dst)` (panel `p`'s
/// columns `k0..k0+kl` to `dst[p·kl·NR..]`) into a reused per-thread buffer of `np·KC·NR` floats, which
/// stays in L2 while every activation row block uses it: the operand's panels are never written whole, so
/// a tile can be tall (fewer passes of the prompt's activations through the cache).
///
/// # Safety
/// As [`gemm_nt`]; `pack_block` fills every value of `dst`.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn run_blocks(
    n: usize,
    m: usize,
    k: usize,
    x: Acts,
    pack_block: &dyn Fn(usize, usize, &mut [f32]),
    y: *mut f32,
    ldy: usize,
) {
    let np = m.div_ceil(NR);
    BLOCK.with_borrow_mut(|buf| {
        if buf.len() < np * KC * NR {
            buf.resize(np * KC * NR, 0.0);
        }
        let mut xb = [0.0f32; MR_512 * KC];
        for k0 in (0..k).step_by(KC) {
            let kl = KC.min(k - k0);
            let panels = &mut buf[..np * kl * NR];
            pack_block(k0, kl, panels);
            // SAFETY: forwarded; panel p's block is at p·kl·NR.
            unsafe { column_block(n, m, k, k0, kl, x, panels, kl * NR, 0, y, ldy, &mut xb) };
        }
    });
}

/// Columns `k0..k0+kl` of every activation row and panel: each block of activation rows copied next to
/// each other first, then multiplied with each panel's columns (at `p·pstride + poff`), written (first
/// block) or added to `y`.
///
/// # Safety
/// As [`gemm_nt`].
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn column_block(
    n: usize,
    m: usize,
    ldx: usize,
    k0: usize,
    kl: usize,
    x: Acts,
    panels: &[f32],
    pstride: usize,
    poff: usize,
    y: *mut f32,
    ldy: usize,
    xb: &mut [f32; MR_512 * KC],
) {
    let np = m.div_ceil(NR);
    let (avx2, avx512) = (avx2(), avx512());
    let mr = if avx512 { MR_512 } else { MR };
    // The block's activation rows copied next to each other (`kl` apart): read in place they are `k`
    // apart, and at the power-of-two widths of real models (2048, 8192 columns) a dozen rows that far apart
    // fall into the same L1 sets and evict each other.
    for t0 in (0..n).step_by(mr) {
        let rows = mr.min(n - t0);
        for (i, dst) in xb.chunks_exact_mut(kl).take(rows).enumerate() {
            x.copy_to((t0 + i) * ldx + k0, dst);
        }
        // The next block's activations are fetched while this one is multiplied: they come from L3 or
        // memory (a prompt's activations outgrow L2), which the copy above would otherwise wait for.
        for t in (t0 + mr..n).take(mr) {
            x.prefetch(t * ldx + k0, kl);
        }
        let (xs, k) = (&xb[..rows * kl], kl);
        for p in 0..np {
            let cols = NR.min(m - p * NR);
            let ps = &panels[p * pstride + poff..p * pstride + poff + kl * NR];
            // SAFETY: rows t0..t0+rows and columns p·NR..p·NR+cols are inside the caller's range.
            let yp = unsafe { y.add(t0 * ldy + p * NR) };
            let acc = k0 > 0;
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512 F was detected; the slices bound every read.
                unsafe { x86::kernel512(rows, kl, xs, k, ps, yp, ldy, cols, acc) };
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA were detected; the slices bound every read.
                unsafe { x86::kernel(rows, kl, xs, k, ps, yp, ldy, cols, acc) };
                continue;
            }
            let _ = (avx2, avx512);
            // SAFETY: as above.
            unsafe { kernel_scalar(rows, kl, xs, k, ps, yp, ldy, cols, acc) };
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::avx512_allowed() && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `w` into panels of NR rows, each `[k][NR]`; rows past `m` in the last panel are zero.
#[allow(unsafe_code)]
fn pack(m: usize, k: usize, w: &[f32], layout: WLayout, panels: &mut Vec<f32>) {
    let np = m.div_ceil(NR);
    panels.clear();
    panels.resize(np * k * NR, 0.0);
    for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
        let j0 = p * NR;
        let cols = NR.min(m - j0);
        match layout {
            WLayout::RowMajor => {
                let rows: Vec<&[f32]> = (0..cols)
                    .map(|jj| &w[(j0 + jj) * k..(j0 + jj + 1) * k])
                    .collect();
                // A whole panel: 16 × 16 blocks transposed in registers.
                #[cfg(target_arch = "x86_64")]
                let done = if cols == NR && avx512() {
                    // SAFETY: AVX-512 F detected; 16 rows of k values, a panel of k·16.
                    unsafe { x86::transpose_panel(&rows, k, panel) }
                } else {
                    0
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = 0;
                // Column by column: each panel line is written whole, the rows are read as 16 streams.
                for (c, dst) in panel.chunks_exact_mut(NR).enumerate().skip(done) {
                    for (d, row) in dst.iter_mut().zip(&rows) {
                        *d = row[c];
                    }
                }
            }
            WLayout::KMajor => {
                for (c, dst) in panel.chunks_exact_mut(NR).enumerate() {
                    dst[..cols].copy_from_slice(&w[c * m + j0..c * m + j0 + cols]);
                }
            }
        }
    }
}

/// Columns `k0..k0+kl` of f16 rows into panels of that width (`dst[p·kl·NR..]`, `[kl][NR]`), as [`pack`]
/// lays out their f32 values; lanes past the last row are zero.
#[allow(unsafe_code)]
fn pack_f16(k0: usize, kl: usize, rows: &[&[u8]], dst: &mut [f32]) {
    let f16 = |r: &[u8], c: usize| half::f16::from_le_bytes([r[2 * c], r[2 * c + 1]]).to_f32();
    for (p, panel) in dst.chunks_exact_mut(kl * NR).enumerate() {
        let group = &rows[p * NR..(p * NR + NR).min(rows.len())];
        #[cfg(target_arch = "x86_64")]
        let done = if group.len() == NR && (avx512() || (avx2() && f16c())) {
            // The block's columns of the 16 rows (on the stack: this runs per panel and column block).
            let cut: [&[u8]; NR] = std::array::from_fn(|j| &group[j][2 * k0..2 * (k0 + kl)]);
            // SAFETY: AVX-512 F or AVX2 (with F16C) detected; 16 rows of 2·kl bytes, a panel block of
            // kl·16.
            unsafe {
                if avx512() {
                    x86::transpose_panel_f16(&cut, kl, panel)
                } else {
                    x86::transpose_panel_f16_avx2(&cut, kl, panel)
                }
            }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for (c, line) in panel.chunks_exact_mut(NR).enumerate().skip(done) {
            for (j, d) in line.iter_mut().enumerate() {
                *d = group.get(j).map_or(0.0, |r| f16(r, k0 + c));
            }
        }
    }
}

/// The reference microkernel: `rows` activation rows (stride `ldx`) × one panel over `kl` columns, written
/// (or added, `acc`) to the first `cols` columns of `rows` output rows.
///
/// # Safety
/// As [`gemm_nt`] for the block.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn kernel_scalar(
    rows: usize,
    kl: usize,
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    y: *mut f32,
    ldy: usize,
    cols: usize,
    acc: bool,
) {
    for t in 0..rows {
        let xr = &x[t * ldx..t * ldx + kl];
        let mut s = [0.0f32; NR];
        for (c, &xv) in xr.iter().enumerate() {
            for (sv, &wv) in s.iter_mut().zip(&panel[c * NR..(c + 1) * NR]) {
                *sv = xv.mul_add(wv, *sv);
            }
        }
        for (j, &v) in s.iter().enumerate().take(cols) {
            // SAFETY: the caller's range.
            unsafe {
                let d = y.add(t * ldy + j);
                *d = if acc { *d + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{MR, MR_512, NR};
    use std::arch::x86_64::*;

    /// AVX2 form of [`super::kernel_scalar`] (the same sums in the same order: one FMA per column).
    ///
    /// # Safety
    /// AVX2 and FMA present; as [`super::gemm_nt`] for the block.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel(
        rows: usize,
        kl: usize,
        x: &[f32],
        ldx: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        assert!(rows <= MR && panel.len() >= kl * NR && x.len() >= (rows - 1) * ldx + kl);
        // SAFETY: forwarded.
        unsafe {
            match rows {
                6 => block::<6>(kl, x, ldx, panel, y, ldy, cols, acc),
                5 => block::<5>(kl, x, ldx, panel, y, ldy, cols, acc),
                4 => block::<4>(kl, x, ldx, panel, y, ldy, cols, acc),
                3 => block::<3>(kl, x, ldx, panel, y, ldy, cols, acc),
                2 => block::<2>(kl, x, ldx, panel, y, ldy, cols, acc),
                _ => block::<1>(kl, x, ldx, panel, y, ldy, cols, acc),
            }
        }
    }

    /// Columns `0..16·⌊k/16⌋` of 16 rows into the panel (`panel[c·16 + j] = rows[j][c]`), 16 × 16 blocks
    /// transposed in registers; returns how many columns it wrote.
    ///
    /// # Safety
    /// AVX-512 F present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_panel(rows: &[&[f32]], k: usize, panel: &mut [f32]) -> usize {
        assert!(rows.len() == NR && rows.iter().all(|r| r.len() >= k) && panel.len() >= k * NR);
        let whole = k / 16 * 16;
        let dst = panel.as_mut_ptr();
        for c in (0..whole).step_by(16) {
            // SAFETY: c + 16 ≤ k for every row; the panel holds k·16 values (asserted).
            unsafe {
                let r: [__m512; 16] =
                    std::array::from_fn(|j| _mm512_loadu_ps(rows[j].as_ptr().add(c)));
                transpose16(&r, dst.add(c * NR));
            }
        }
        whole
    }

    /// [`transpose_panel`] of 16 rows of little-endian f16 values (`2k` bytes each), converted as loaded.
    ///
    /// # Safety
    /// AVX-512 F present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_panel_f16(rows: &[&[u8]], k: usize, panel: &mut [f32]) -> usize {
        assert!(rows.len() == NR && rows.iter().all(|r| r.len() >= 2 * k) && panel.len() >= k * NR);
        let whole = k / 16 * 16;
        let dst = panel.as_mut_ptr();
        for c in (0..whole).step_by(16) {
            // SAFETY: 16 values (32 bytes) from c are inside every row; the panel as above.
            unsafe {
                let r: [__m512; 16] = std::array::from_fn(|j| {
                    let p = rows[j].as_ptr().add(2 * c).cast::<__m256i>();
                    _mm512_cvtph_ps(_mm256_loadu_si256(p))
                });
                transpose16(&r, dst.add(c * NR));
            }
        }
        whole
    }

    /// [`transpose_panel_f16`] with AVX2 and F16C: eight columns at a time, each half of the 16 rows an 8 × 8
    /// transpose in registers.
    ///
    /// # Safety
    /// AVX2 and F16C present.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn transpose_panel_f16_avx2(rows: &[&[u8]], k: usize, panel: &mut [f32]) -> usize {
        assert!(rows.len() == NR && rows.iter().all(|r| r.len() >= 2 * k) && panel.len() >= k * NR);
        let whole = k / 8 * 8;
        let dst = panel.as_mut_ptr();
        for c in (0..whole).step_by(8) {
            for h in 0..2 {
                // SAFETY: 8 values (16 bytes) from c are inside every row; lines c..c + 8 of the panel
                // (16 floats each) are inside it (asserted).
                unsafe {
                    let r: [__m256; 8] = std::array::from_fn(|j| {
                        let p = rows[8 * h + j].as_ptr().add(2 * c).cast::<__m128i>();
                        _mm256_cvtph_ps(_mm_loadu_si128(p))
                    });
                    // (r0 r1), (r2 r3), … interleaved, then pairs of pairs: columns i and i + 4 of four
                    // rows in the two halves of tt[i] (rows 0–3) and tt[4 + i] (rows 4–7).
                    let t: [__m256; 8] = std::array::from_fn(|i| {
                        let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
                        if i % 2 == 0 {
                            _mm256_unpacklo_ps(a, b)
                        } else {
                            _mm256_unpackhi_ps(a, b)
                        }
                    });
                    let tt: [__m256; 8] = std::array::from_fn(|i| {
                        let q = 4 * (i / 4);
                        let (a, b) = if (i % 4) < 2 {
                            (t[q], t[q + 2])
                        } else {
                            (t[q + 1], t[q + 3])
                        };
                        if i % 2 == 0 {
                            _mm256_shuffle_ps::<0x44>(a, b)
                        } else {
                            _mm256_shuffle_ps::<0xEE>(a, b)
                        }
                    });
                    for i in 0..4 {
                        let lo = _mm256_permute2f128_ps::<0x20>(tt[i], tt[4 + i]);
                        let hi = _mm256_permute2f128_ps::<0x31>(tt[i], tt[4 + i]);
                        _mm256_storeu_ps(dst.add((c + i) * NR + 8 * h), lo);
                        _mm256_storeu_ps(dst.add((c + 4 + i) * NR + 8 * h), hi);
                    }
                }
            }
        }
        whole
    }

    /// 16 rows of 16 values stored as 16 lines of 16 (`dst[i·16 + j] = r[j][i]`), in registers.
    ///
    /// # Safety
    /// AVX-512 F present; `dst` valid for 256 floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: &[__m512; 16], dst: *mut f32) {
        let lo = |a, b| _mm512_unpacklo_ps(a, b);
        let hi = |a, b| _mm512_unpackhi_ps(a, b);
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                lo(a, b)
            } else {
                hi(a, b)
            }
        });
        let pd = |a: __m512| _mm512_castps_pd(a);
        // u[4q + 0..4]: unpack{lo,hi}_pd of (t[4q], t[4q+2]) and (t[4q+1], t[4q+3])
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let q = 4 * (i / 4);
            let (a, b) = match i % 4 {
                0 | 1 => (t[q], t[q + 2]),
                _ => (t[q + 1], t[q + 3]),
            };
            _mm512_castpd_ps(if i % 2 == 0 {
                _mm512_unpacklo_pd(pd(a), pd(b))
            } else {
                _mm512_unpackhi_pd(pd(a), pd(b))
            })
        });
        // v: 128-bit lanes of groups (0..4, 4..8) and (8..12, 12..16) paired
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let g = 8 * (i / 8);
            let (a, b) = (u[g + i % 4], u[g + 4 + i % 4]);
            if (i % 8) < 4 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            }
        });
        for i in 0..16 {
            let (a, b) = (v[i % 8], v[8 + i % 8]);
            let o = if i < 8 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            };
            // SAFETY: 256 floats at dst (the caller's contract).
            unsafe { _mm512_storeu_ps(dst.add(i * NR), o) };
        }
    }

    /// AVX-512 form of [`super::kernel_scalar`] for up to [`MR_512`] rows (the same sums in the same order).
    ///
    /// # Safety
    /// AVX-512 F present; as [`super::gemm_nt`] for the block.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel512(
        rows: usize,
        kl: usize,
        x: &[f32],
        ldx: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        assert!(rows <= MR_512 && panel.len() >= kl * NR && x.len() >= (rows - 1) * ldx + kl);
        macro_rules! by_rows {
            ($($r:literal)*) => {
                match rows {
                    // SAFETY: forwarded.
                    $($r => unsafe { block512::<$r>(kl, x, ldx, panel, y, ldy, cols, acc) },)*
                    _ => unreachable!("rows ≤ MR_512"),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12);
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block512<const R: usize>(
        kl: usize,
        x: &[f32],
        ldx: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        let mut a = [_mm512_setzero_ps(); R];
        let xp = x.as_ptr();
        let pp = panel.as_ptr();
        for c in 0..kl {
            // SAFETY: c < kl and the panel holds kl·NR values (asserted by the caller).
            let w = unsafe { _mm512_loadu_ps(pp.add(c * NR)) };
            for (i, ai) in a.iter_mut().enumerate() {
                // SAFETY: row i < R ≤ rows, column c < kl: inside x (asserted by the caller).
                let b = unsafe { _mm512_set1_ps(*xp.add(i * ldx + c)) };
                *ai = _mm512_fmadd_ps(b, w, *ai);
            }
        }
        let mask: __mmask16 = if cols >= NR {
            0xffff
        } else {
            (1u16 << cols) - 1
        };
        for (i, &ai) in a.iter().enumerate() {
            // SAFETY: the caller's output range: row i < rows, the first `cols` columns (masked).
            unsafe {
                let d = y.add(i * ldy);
                let v = if acc {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), ai)
                } else {
                    ai
                };
                _mm512_mask_storeu_ps(d, mask, v);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize>(
        kl: usize,
        x: &[f32],
        ldx: usize,
        panel: &[f32],
        y: *mut f32,
        ldy: usize,
        cols: usize,
        acc: bool,
    ) {
        let mut a = [[_mm256_setzero_ps(); 2]; R];
        let xp = x.as_ptr();
        let pp = panel.as_ptr();
        for c in 0..kl {
            // SAFETY: c < kl and the panel holds kl·NR values (asserted by the caller).
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_ps(pp.add(c * NR)),
                    _mm256_loadu_ps(pp.add(c * NR + 8)),
                )
            };
            for (i, ai) in a.iter_mut().enumerate() {
                // SAFETY: row i < R ≤ rows, column c < kl: inside x (asserted by the caller).
                let b = unsafe { _mm256_broadcast_ss(&*xp.add(i * ldx + c)) };
                ai[0] = _mm256_fmadd_ps(b, w0, ai[0]);
                ai[1] = _mm256_fmadd_ps(b, w1, ai[1]);
            }
        }
        for (i, ai) in a.iter().enumerate() {
            let mut s = [0.0f32; NR];
            // SAFETY: s holds NR = 16 values.
            unsafe {
                _mm256_storeu_ps(s.as_mut_ptr(), ai[0]);
                _mm256_storeu_ps(s.as_mut_ptr().add(8), ai[1]);
            }
            // SAFETY: the caller's output range: row i < rows, columns < cols.
            unsafe {
                let d = y.add(i * ldy);
                if cols == NR {
                    let (mut v0, mut v1) = (ai[0], ai[1]);
                    if acc {
                        v0 = _mm256_add_ps(_mm256_loadu_ps(d), v0);
                        v1 = _mm256_add_ps(_mm256_loadu_ps(d.add(8)), v1);
                    }
                    _mm256_storeu_ps(d, v0);
                    _mm256_storeu_ps(d.add(8), v1);
                } else {
                    for (j, &v) in s.iter().enumerate().take(cols) {
                        let o = d.add(j);
                        *o = if acc { *o + v } else { v };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    fn naive(n: usize, m: usize, k: usize, x: &[f32], w: &[f32], layout: WLayout) -> Vec<f32> {
        let mut y = vec![0.0f32; n * m];
        for t in 0..n {
            for j in 0..m {
                let mut s = 0.0f64;
                for c in 0..k {
                    let wv = match layout {
                        WLayout::RowMajor => w[j * k + c],
                        WLayout::KMajor => w[c * m + j],
                    };
                    s += f64::from(x[t * k + c]) * f64::from(wv);
                }
                y[t * m + j] = s as f32;
            }
        }
        y
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    #[test]
    fn every_shape_edge_matches_the_naive_product() {
        // Row counts around MR, column counts around NR, depths around KC, both layouts, a strided output.
        for &(n, m, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (6, 16, 256),
            (13, 33, 257),
            (5, 31, 600),
            (12, 48, 64),
        ] {
            for layout in [WLayout::RowMajor, WLayout::KMajor] {
                let x = values(n * k, 1);
                let w = values(m * k, 2);
                let want = naive(n, m, k, &x, &w, layout);
                let ldy = m + 3;
                let mut y = vec![f32::NAN; n * ldy];
                // SAFETY: y holds n rows of ldy ≥ m.
                unsafe { gemm_nt(n, m, k, &x, &w, layout, y.as_mut_ptr(), ldy) };
                for t in 0..n {
                    for j in 0..m {
                        let (a, b) = (y[t * ldy + j], want[t * m + j]);
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{n}x{m}x{k} {layout:?} [{t},{j}]: {a} vs {b}"
                        );
                    }
                    // Columns past m are not touched.
                    assert!(y[t * ldy + m..(t + 1) * ldy].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    /// `n × m` over depth `k` with a packed operand `p`, against packing `w` (those rows and columns) per
    /// call: the same bits.
    fn assert_packed_is_per_call(
        n: usize,
        m: usize,
        k: usize,
        x: &[f32],
        p: &Packed,
        w: &[f32],
        layout: WLayout,
    ) {
        let (mut a, mut b) = (vec![0.0f32; n * m], vec![0.0f32; n * m]);
        product_packed(n, m, k, x, p, &mut a);
        // SAFETY: b holds n rows of m.
        unsafe { gemm_nt(n, m, k, x, w, layout, b.as_mut_ptr(), m) };
        assert_eq!(a, b, "{n}×{m}×{k} {layout:?}");
    }

    #[test]
    fn a_packed_operand_gives_the_same_bits_as_packing_per_call() {
        // Keys packed once for 40 rows × 64, used for the first 33 rows; values packed once for 64 × 40,
        // used for the first 29 columns of depth.
        let (mt, kt) = (40, 64);
        let w = values(mt * kt, 6);
        let p = Packed::new(mt, kt, &w, WLayout::RowMajor);
        let m = 33;
        assert_packed_is_per_call(
            7,
            m,
            kt,
            &values(7 * kt, 7),
            &p,
            &w[..m * kt],
            WLayout::RowMajor,
        );
        let v = values(kt * mt, 8); // [k = 64 positions][m = 40 columns], KMajor with k = positions
        let pv = Packed::new(mt, kt, &v, WLayout::KMajor);
        let k = 29;
        assert_packed_is_per_call(
            5,
            mt,
            k,
            &values(5 * k, 9),
            &pv,
            &v[..k * mt],
            WLayout::KMajor,
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_register_transpose_packs_as_the_scalar_loop() {
        if !avx512() {
            eprintln!("no AVX-512 here: the transposing pack cannot run");
            return;
        }
        for k in [16, 37, 64, 600] {
            let w = values(NR * k, 11);
            let rows: Vec<&[f32]> = w.chunks_exact(k).collect();
            let mut panel = vec![f32::NAN; k * NR];
            // SAFETY: AVX-512 detected.
            let done = unsafe { x86::transpose_panel(&rows, k, &mut panel) };
            assert_eq!(done, k / 16 * 16);
            for c in 0..done {
                for (j, row) in rows.iter().enumerate() {
                    assert_eq!(
                        panel[c * NR + j].to_bits(),
                        row[c].to_bits(),
                        "k {k} c {c} j {j}"
                    );
                }
            }
            assert!(panel[done * NR..].iter().all(|v| v.is_nan()));
        }
    }

    /// f16 rows converted while packed give the products of their f32 values, bit for bit (edges of the
    /// register transpose and of the panels included).
    #[test]
    fn f16_rows_multiply_as_their_f32_values() {
        for &(n, m, k) in &[
            (13, 16, 48),
            (7, 37, 300),
            (25, 33, 16),
            (3, 5, 17),
            (1, 64, 600),
        ] {
            // Activations that are f16 values, so the f16-bytes form of them is exact.
            let x: Vec<f32> = values(n * k, 3)
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            let x16: Vec<u8> = x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            let w: Vec<half::f16> = values(m * k, 5)
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect();
            let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let rows: Vec<&[u8]> = bytes.chunks_exact(2 * k).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let mut want = vec![0.0f32; n * m];
            let mut got = vec![f32::NAN; n * m];
            // SAFETY: dense n × m outputs, borrowed exclusively.
            #[allow(unsafe_code)]
            unsafe {
                gemm_nt(n, m, k, &x, &wf, WLayout::RowMajor, want.as_mut_ptr(), m);
                gemm_nt_f16(n, k, &x, &rows, got.as_mut_ptr(), m);
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{n}×{m}×{k}");
            let mut from_f16 = vec![f32::NAN; n * m];
            // SAFETY: as above.
            #[allow(unsafe_code)]
            unsafe {
                gemm_nt_f16_acts(n, k, &x16, &rows, from_f16.as_mut_ptr(), m);
            }
            assert_eq!(bits(&from_f16), bits(&want), "{n}×{m}×{k}, f16 activations");
        }
    }

    /// Both register transposes of f16 rows give the scalar conversion's panel (whole blocks of 16 and 8
    /// columns; the rest is left to the caller).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16_panel_transposes_equal_the_scalar_one() {
        let k = 40;
        let w: Vec<half::f16> = values(NR * k, 9)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let rows: Vec<&[u8]> = bytes.chunks_exact(2 * k).collect();
        let want: Vec<f32> = (0..k * NR)
            .map(|i| w[(i % NR) * k + i / NR].to_f32())
            .collect();
        if avx2() && f16c() {
            let mut got = vec![f32::NAN; k * NR];
            // SAFETY: AVX2 and F16C detected; 16 rows of 2k bytes, a panel of k·16.
            #[allow(unsafe_code)]
            let done = unsafe { x86::transpose_panel_f16_avx2(&rows, k, &mut got) };
            assert_eq!(done, 40);
            assert_eq!(got, want);
        }
        if avx512() {
            let mut got = vec![f32::NAN; k * NR];
            // SAFETY: AVX-512 F detected.
            #[allow(unsafe_code)]
            let done = unsafe { x86::transpose_panel_f16(&rows, k, &mut got) };
            assert_eq!(done, 32);
            assert_eq!(got[..32 * NR], want[..32 * NR]);
        }
    }

    /// Signature shared by the microkernels.
    #[cfg(target_arch = "x86_64")]
    type Kernel = unsafe fn(usize, usize, &[f32], usize, &[f32], *mut f32, usize, usize, bool);

    /// `kernel` against the scalar one, bit for bit, for 1..=`mr` rows, the given column counts, with and
    /// without accumulation.
    ///
    /// # Safety
    /// The CPU has the kernel's features.
    #[cfg(target_arch = "x86_64")]
    unsafe fn assert_kernel_is_scalar(kernel: Kernel, mr: usize, col_counts: &[usize]) {
        let (kl, ldx, ldy) = (37, 40, 20);
        let x = values(mr * ldx, 3);
        let panel = values(kl * NR, 4);
        for rows in 1..=mr {
            for &cols in col_counts {
                for acc in [false, true] {
                    let mut a = values(mr * ldy, 5);
                    let mut b = a.clone();
                    // SAFETY: the caller's features; a and b hold mr rows of ldy ≥ NR.
                    unsafe {
                        kernel(rows, kl, &x, ldx, &panel, a.as_mut_ptr(), ldy, cols, acc);
                        kernel_scalar(rows, kl, &x, ldx, &panel, b.as_mut_ptr(), ldy, cols, acc);
                    }
                    assert_eq!(a, b, "rows {rows} cols {cols} acc {acc}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_kernel_equals_the_scalar_one_bit_for_bit() {
        if !avx512() {
            eprintln!("no AVX-512 here: the AVX-512 kernel cannot run");
            return;
        }
        // SAFETY: AVX-512 detected.
        unsafe { assert_kernel_is_scalar(x86::kernel512, MR_512, &[NR, 11, 1]) };
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_kernel_equals_the_scalar_one_bit_for_bit() {
        if !avx2() {
            eprintln!("no AVX2+FMA here: the vector kernel cannot run");
            return;
        }
        // SAFETY: AVX2 and FMA detected.
        unsafe { assert_kernel_is_scalar(x86::kernel, MR, &[NR, 11]) };
    }
}
