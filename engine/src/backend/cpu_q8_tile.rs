//! Prompt processing over packed weights in integers, as llama.cpp's repacked CPU kernels do it: the
//! activations are quantized once per matmul to the type ggml pairs with the weight (Q8_0 for Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 and IQ4_NL; Q8_K for the k-quants and IQ4_XS), the weights are repacked 16 rows at a time
//! into a panel whose 32-bit lanes are rows (the codes interleaved four bytes per row, shifted to unsigned
//! bytes), and AVX-512 VNNI's `vpdpbusd` sums four codes of 16 rows against one token's broadcast four
//! activation bytes per instruction. Every integer sum is exact.
//!
//! - **Q8_0 family**: a block's sum meets `f16(d_w) · d_x` in one fused multiply-add per block and row, in
//!   block order (reference [`tile_dot_scalar`], equal bit for bit). The decoding kernels keep eight partial
//!   lanes per block instead, so a prompt's rows and a decoded token's row can differ in the last bits (both
//!   equal ggml's `mul_mat` to rounding).
//! - **Q8_K family** (Q2_K … Q6_K, IQ4_XS): per 16-code sub-block the exact sum is multiplied by its integer
//!   scale; the shift to unsigned codes and the mins meet the activations' 16-code sums in `vpdpwssd`; the
//!   block's two f32 steps are the decoding kernel's, so prompt and decoding results are equal bit for bit
//!   (reference `cpu_q8::vec_dot_k_scalar`).
//!
//! The types with repacked decoding panels (`cpu_q8_repack`) take those for prompts too, so these tiles serve
//! Q2_K, Q3_K and Q5_K. Without AVX-512 VNNI, [`matmul`] declines and the caller dots rows with four tokens at
//! a time (`cpu_q8::vec_dot4`).

use std::sync::Mutex;

use super::cpu_q8::{codes, f16_at, k_scales, k_split, tile_bias, Q8Row};
use crate::codecs::GgmlType;
use crate::tensor::TensorRef;

/// Rows per panel: the sixteen 32-bit lanes of a 512-bit register.
const PANEL: usize = 16;
/// Panels per task (the panels a task repacks once and multiplies with every token).
const PANELS_PER_TASK: usize = 4;
/// Tokens per kernel call (accumulators held in registers).
const TOKENS: usize = 8;

/// Whether `ty` is one of the Q8_0 family the tiles take.
fn q8_0_family(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Iq4Nl
    )
}

/// Whether [`matmul`] takes weights of `ty`: the Q8_0 family and the k-quants with IQ4_XS (the low-bit
/// i-quants go through dequantised tiles).
pub fn supports(ty: GgmlType) -> bool {
    q8_0_family(ty) || k_split(ty)
}

/// What a k-family type's unsigned codes add to its signed ones (Q3_K 4, Q6_K 32, IQ4_XS 128; the types
/// with mins store unsigned codes already).
fn k_bias(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q3K => 4,
        GgmlType::Q6K => 32,
        GgmlType::Iq4Xs => 128,
        _ => 0,
    }
}

/// Whether a k-family type has mins (Q2_K, Q4_K, Q5_K).
fn k_mins(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2K | GgmlType::Q4K | GgmlType::Q5K)
}

/// Whether this CPU runs the integer tiles (AVX-512 F, BW and VNNI; AVX2, FMA and F16C for the repacking;
/// not under `QS_CPU=avx2`, [`super::avx512_allowed`]).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::cpu_q8::avx2()
                && super::avx512_allowed()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The activations of one matmul quantized to the weight's 8-bit type, token after token: codes and `d`
/// per block; Q8_0: Q8_1's `s` and `−bias · Σq` per block (what the unsigned weight codes add back); Q8_K:
/// the sums of 16 codes.
struct Acts {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    corr: Vec<i32>,
    bsums: Vec<i16>,
    /// Blocks per token.
    nb: usize,
}

impl Acts {
    const fn empty() -> Self {
        Self {
            q: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            corr: Vec::new(),
            bsums: Vec::new(),
            nb: 0,
        }
    }

    /// Quantizes `n` tokens of `x` for weights of type `ty`, reusing the buffers.
    fn fill(&mut self, ty: GgmlType, x: &[f32], n: usize, cols: usize) {
        fn sized<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
            v.clear();
            v.resize(len, T::default());
        }
        if !q8_0_family(ty) {
            let nb = cols / 256;
            self.nb = nb;
            sized(&mut self.q, n * cols);
            sized(&mut self.d, n * nb);
            sized(&mut self.bsums, n * cols / 16);
            // One token per task on the spinning pool, where the tiles run next.
            let tokens: Vec<_> = self
                .q
                .chunks_mut(cols)
                .zip(self.d.chunks_mut(nb))
                .zip(self.bsums.chunks_mut(cols / 16))
                .map(Mutex::new)
                .collect();
            super::spin::for_each(n, &|t| {
                let mut token = tokens[t]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let ((q, d), bsums) = &mut *token;
                super::cpu_q8::q8_k_into(&x[t * cols..(t + 1) * cols], d, bsums, q);
            });
            return;
        }
        let nb = cols / 32;
        self.nb = nb;
        sized(&mut self.q, n * cols);
        sized(&mut self.d, n * nb);
        sized(&mut self.s, n * nb);
        sized(&mut self.corr, n * nb);
        let bias = tile_bias(ty);
        let tokens: Vec<_> = self
            .q
            .chunks_mut(cols)
            .zip(self.d.chunks_mut(nb))
            .zip(self.s.chunks_mut(nb))
            .zip(self.corr.chunks_mut(nb))
            .map(Mutex::new)
            .collect();
        super::spin::for_each(n, &|t| {
            let mut token = tokens[t]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (((q, d), s), corr) = &mut *token;
            super::cpu_q8::q8_0_into(&x[t * cols..(t + 1) * cols], d, s, q);
            super::cpu_q8::bias_corrections(q, bias, corr);
        });
    }
}

thread_local! {
    /// The calling thread's quantized activations, kept from matmul to matmul (a prompt's are megabytes:
    /// fresh buffers per call would be an mmap and a page fault per 4 KiB).
    static ACTS: std::cell::RefCell<Acts> = const { std::cell::RefCell::new(Acts::empty()) };
}

/// `out[t, r] = W[r] · x[t]` for `n` activation rows in integer tiles, or `false` (nothing written) when
/// `w`'s type is not one the tiles take ([`supports`]) or the CPU lacks AVX-512 VNNI. Every output equals
/// [`tile_dot_scalar`] (Q8_0 family) or the decoding kernel's reference (Q8_K family) of its row and token.
pub fn matmul(w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) -> bool {
    let Some(ty) = w.block_type().filter(|&t| supports(t)) else {
        return false;
    };
    if !available() {
        return false;
    }
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "{}: activation size", w.name);
    assert_eq!(out.len(), n * rows, "{}: output size", w.name);
    ACTS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut acts) => {
            acts.fill(ty, x, n, cols);
            tiles(w, ty, &acts, n, out);
        }
        // A matmul nested in another on this thread (a worker that took one): its own buffers.
        Err(_) => {
            let mut acts = Acts::empty();
            acts.fill(ty, x, n, cols);
            tiles(w, ty, &acts, n, out);
        }
    });
    true
}

/// The panels of `w` against the quantized tokens, in parallel tasks of [`PANELS_PER_TASK`] panels.
fn tiles(w: &TensorRef, ty: GgmlType, acts: &Acts, n: usize, out: &mut [f32]) {
    let rows = w.rows();
    let dst = Out(out.as_mut_ptr());
    let tasks = rows.div_ceil(PANEL * PANELS_PER_TASK);
    super::spin::for_each(tasks, &|task| {
        PANELS.with_borrow_mut(|panels| {
            let r0 = task * PANEL * PANELS_PER_TASK;
            let r1 = (r0 + PANEL * PANELS_PER_TASK).min(rows);
            let count = (r1 - r0).div_ceil(PANEL);
            panels.resize_with(count, Panel::default);
            for (p, panel) in panels.iter_mut().enumerate() {
                let pr0 = r0 + p * PANEL;
                panel.fill(w, ty, pr0, (pr0 + PANEL).min(r1));
            }
            #[cfg(target_arch = "x86_64")]
            for panel in panels.iter() {
                // SAFETY: the CPU has AVX-512 F and VNNI (`available`); the panel holds `acts.nb` blocks;
                // this task alone writes rows r0..r1 of the n × rows output, which outlives the loop.
                #[allow(unsafe_code)]
                unsafe {
                    x86::panel_tokens(panel, acts, n, dst, rows);
                }
            }
        });
    });
}

thread_local! {
    /// A worker's repacked panels, kept from call to call.
    static PANELS: std::cell::RefCell<Vec<Panel>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sixteen weight rows repacked (rows past the tensor's end are zero, and never written out).
///
/// Q8_0 family: block `b`'s codes `4g..4g + 4` of row `r` (as unsigned bytes, `code + tile_bias`) at
/// `u[b·512 + g·64 + r·4..][..4]`, `f16(d)` of row `r`, block `b` at `d[b·16 + r]`, the `_1` types' `f16(m)`
/// likewise in `m`.
///
/// Q8_K family: the codes (`code + k_bias`) at `u[b·4096 + g·64 + r·4..][..4]`, sub-block `s`'s scale at
/// `sc[(b·16 + s)·16 + r]`, `d` and `dmin` at `d[b·16 + r]` and `m[b·16 + r]`, and per pair of sub-blocks
/// `(2p, 2p + 1)` the two 16-bit coefficients their activation sums meet (`bias · scale` or the mins) at
/// `coef[((b·8 + p)·16 + r)·2..][..2]`.
#[derive(Default)]
struct Panel {
    u: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    sc: Vec<i32>,
    coef: Vec<i16>,
    /// The first row and how many are real.
    r0: usize,
    len: usize,
    /// Q8_0 family: a `_1` type (offsets `m · s`). Q8_K family: a type with mins.
    offset: bool,
    /// The Q8_K family.
    k: bool,
}

impl Panel {
    fn fill(&mut self, w: &TensorRef, ty: GgmlType, r0: usize, r1: usize) {
        if !q8_0_family(ty) {
            self.fill_k(w, ty, r0, r1);
            return;
        }
        let nb = w.cols() / 32;
        let bytes = ty.traits().block_bytes;
        self.k = false;
        self.offset = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        (self.r0, self.len) = (r0, r1 - r0);
        self.u.clear();
        self.u.resize(nb * 512, 0);
        self.d.clear();
        self.d.resize(nb * PANEL, 0.0);
        self.m.clear();
        self.m.resize(if self.offset { nb * PANEL } else { 0 }, 0.0);
        for r in 0..self.len {
            let row = w.row_data(r0 + r);
            for b in 0..nb {
                let blk = &row[b * bytes..];
                self.d[b * PANEL + r] = f16_at(blk);
                if self.offset {
                    self.m[b * PANEL + r] = f16_at(&blk[2..]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 (`available`, checked by the only caller).
            #[allow(unsafe_code)]
            unsafe {
                super::cpu_q8::x86::panel_row(ty, row, r, &mut self.u);
            }
        }
    }

    fn fill_k(&mut self, w: &TensorRef, ty: GgmlType, r0: usize, r1: usize) {
        let nb = w.cols() / 256;
        let bytes = ty.traits().block_bytes;
        let bias = k_bias(ty);
        self.k = true;
        self.offset = k_mins(ty);
        (self.r0, self.len) = (r0, r1 - r0);
        self.u.clear();
        self.u.resize(nb * 4096, 0);
        self.d.clear();
        self.d.resize(nb * PANEL, 0.0);
        self.m.clear();
        self.m.resize(nb * PANEL, 0.0);
        self.sc.clear();
        self.sc.resize(nb * 16 * PANEL, 0);
        self.coef.clear();
        self.coef.resize(nb * 8 * PANEL * 2, 0);
        for r in 0..self.len {
            let row = w.row_data(r0 + r);
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                let k = k_scales(ty, blk);
                self.d[b * PANEL + r] = k.d;
                self.m[b * PANEL + r] = k.dmin;
                for s in 0..16 {
                    self.sc[(b * 16 + s) * PANEL + r] = i32::from(k.scales[s]);
                    let c = if self.offset {
                        k.mins[s]
                    } else {
                        (bias * i32::from(k.scales[s])) as i16
                    };
                    self.coef[((b * 8 + s / 2) * PANEL + r) * 2 + s % 2] = c;
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 (`available`, checked by the only caller).
            #[allow(unsafe_code)]
            unsafe {
                super::cpu_q8::x86::k_panel_row(ty, row, r, bias, &mut self.u);
            }
        }
    }
}

/// The output of [`matmul`], written by tasks that own disjoint rows.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only its own rows' columns; see `matmul`.
#[allow(unsafe_code)]
unsafe impl Send for Out {}
#[allow(unsafe_code)]
unsafe impl Sync for Out {}

/// The scalar reference of the tiles: per block the exact integer sum `Σ code · q` meets `f16(d_w) · d_x` in
/// one fused multiply-add of a single f32 accumulator, block after block; the `_1` types' offsets
/// `f16(m_w) · s_x` are summed the same way on the side and added last.
pub fn tile_dot_scalar(ty: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    let bytes = ty.traits().block_bytes;
    let offset = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    let (mut acc, mut offs) = (0.0f32, 0.0f32);
    let mut w = [0i32; 32];
    for (b, (blk, xq)) in row
        .chunks_exact(bytes)
        .zip(x.q.chunks_exact(32))
        .enumerate()
    {
        codes(ty, blk, &mut w);
        let sumi: i32 = w.iter().zip(xq).map(|(&a, &b)| a * i32::from(b)).sum();
        acc = (f16_at(blk) * x.d[b]).mul_add(sumi as f32, acc);
        if offset {
            offs = f16_at(&blk[2..]).mul_add(x.s[b], offs);
        }
    }
    acc + offs
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{Acts, Out, Panel, PANEL, TOKENS};
    use std::arch::x86_64::*;

    /// Every token of `acts` against one panel, [`TOKENS`] at a time, results into `out` (`n` rows of
    /// `rows`) at the panel's rows.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn panel_tokens(panel: &Panel, acts: &Acts, n: usize, out: Out, rows: usize) {
        let mut t = 0;
        // SAFETY (every call): forwarded; the tokens t..t + C exist.
        unsafe {
            if panel.k {
                while t < n {
                    let c = TOKENS.min(n - t);
                    match (c == TOKENS, panel.offset) {
                        (true, true) => k_tokens::<TOKENS, true>(panel, acts, t, out, rows),
                        (true, false) => k_tokens::<TOKENS, false>(panel, acts, t, out, rows),
                        (false, true) => k_tokens::<1, true>(panel, acts, t, out, rows),
                        (false, false) => k_tokens::<1, false>(panel, acts, t, out, rows),
                    }
                    t += if c == TOKENS { TOKENS } else { 1 };
                }
                return;
            }
            while t + TOKENS <= n {
                if panel.offset {
                    tokens::<TOKENS, true>(panel, acts, t, out, rows);
                } else {
                    tokens::<TOKENS, false>(panel, acts, t, out, rows);
                }
                t += TOKENS;
            }
            while t < n {
                if panel.offset {
                    tokens::<1, true>(panel, acts, t, out, rows);
                } else {
                    tokens::<1, false>(panel, acts, t, out, rows);
                }
                t += 1;
            }
        }
    }

    /// The panel's real rows of tokens `t0..t0 + C` (the accumulators) into the output.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const C: usize>(
        panel: &Panel,
        acc: &[__m512; C],
        t0: usize,
        out: Out,
        rows: usize,
    ) {
        let mask: __mmask16 = if panel.len >= PANEL {
            0xFFFF
        } else {
            (1u16 << panel.len) - 1
        };
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: row (t0 + c) of the output has `rows` columns; the mask keeps to the panel's real rows,
            // which lie in 0..rows and belong to this task (the caller's contract).
            unsafe { _mm512_mask_storeu_ps(out.0.add((t0 + c) * rows + panel.r0), mask, *a) };
        }
    }

    /// Q8_K-family tokens `t0..t0 + C` against the panel: per sub-block four `vpdpbusd` and one multiply
    /// by the scales; per block eight `vpdpwssd` of the coefficients with the token's 16-code sums (the
    /// unsigned codes' shift, or the mins); then the decoding kernel's two f32 steps.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn k_tokens<const C: usize, const MINS: bool>(
        panel: &Panel,
        acts: &Acts,
        t0: usize,
        out: Out,
        rows: usize,
    ) {
        let nb = acts.nb;
        let cols = nb * 256;
        assert!(
            panel.u.len() >= nb * 4096
                && panel.d.len() >= nb * PANEL
                && panel.m.len() >= nb * PANEL
        );
        assert!(panel.sc.len() >= nb * 16 * PANEL && panel.coef.len() >= nb * 16 * PANEL);
        assert!(acts.q.len() >= (t0 + C) * cols && acts.d.len() >= (t0 + C) * nb);
        assert!(acts.bsums.len() >= (t0 + C) * cols / 16);
        let mut acc = [_mm512_setzero_ps(); C];
        let up = panel.u.as_ptr();
        let qp = acts.q.as_ptr();
        let bp = acts.bsums.as_ptr();
        let sign = _mm512_set1_epi32(i32::MIN);
        for b in 0..nb {
            // SAFETY: block b < nb of the panel and of tokens t0..t0 + C (asserted above).
            unsafe {
                let mut sumi = [_mm512_setzero_si512(); C];
                for s in 0..16 {
                    let wp = up.add(b * 4096 + s * 256);
                    let w: [__m512i; 4] =
                        std::array::from_fn(|g| _mm512_loadu_si512(wp.add(g * 64).cast()));
                    let scale =
                        _mm512_loadu_si512(panel.sc.as_ptr().add((b * 16 + s) * PANEL).cast());
                    for (c, si) in sumi.iter_mut().enumerate() {
                        let y = qp.add((t0 + c) * cols + b * 256 + s * 16).cast::<i32>();
                        let mut p = _mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            w[0],
                            _mm512_set1_epi32(y.read_unaligned()),
                        );
                        for (g, wg) in w.iter().enumerate().skip(1) {
                            p = _mm512_dpbusd_epi32(
                                p,
                                *wg,
                                _mm512_set1_epi32(y.add(g).read_unaligned()),
                            );
                        }
                        *si = _mm512_add_epi32(*si, _mm512_mullo_epi32(p, scale));
                    }
                }
                let mut aux = [_mm512_setzero_si512(); C];
                for p in 0..8 {
                    let cf =
                        _mm512_loadu_si512(panel.coef.as_ptr().add((b * 8 + p) * PANEL * 2).cast());
                    for (c, a) in aux.iter_mut().enumerate() {
                        let bs = bp.add((t0 + c) * cols / 16 + b * 16 + 2 * p).cast::<i32>();
                        *a = _mm512_dpwssd_epi32(*a, cf, _mm512_set1_epi32(bs.read_unaligned()));
                    }
                }
                let dw = _mm512_loadu_ps(panel.d.as_ptr().add(b * PANEL));
                let dmin = _mm512_loadu_ps(panel.m.as_ptr().add(b * PANEL));
                for (c, a) in acc.iter_mut().enumerate() {
                    let dx = _mm512_set1_ps(*acts.d.get_unchecked((t0 + c) * nb + b));
                    let si = if MINS {
                        sumi[c]
                    } else {
                        _mm512_sub_epi32(sumi[c], aux[c])
                    };
                    *a = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(si), *a);
                    if MINS {
                        // −(dmin · d_x): the sign flipped exactly.
                        let m = _mm512_castsi512_ps(_mm512_xor_si512(
                            _mm512_castps_si512(_mm512_mul_ps(dmin, dx)),
                            sign,
                        ));
                        *a = _mm512_fmadd_ps(m, _mm512_cvtepi32_ps(aux[c]), *a);
                    }
                }
            }
        }
        // SAFETY: forwarded (the caller's output contract).
        unsafe { store::<C>(panel, &acc, t0, out, rows) };
    }

    /// Tokens `t0..t0 + C` against the panel: per block, eight `vpdpbusd` of the panel's eight 64-byte groups
    /// with the token's four-byte groups broadcast, started from the token's `−bias · Σq`; then one fused
    /// multiply-add per block as [`super::tile_dot_scalar`] does.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tokens<const C: usize, const OFFSET: bool>(
        panel: &Panel,
        acts: &Acts,
        t0: usize,
        out: Out,
        rows: usize,
    ) {
        let nb = acts.nb;
        let cols = nb * 32;
        assert!(panel.u.len() >= nb * 512 && panel.d.len() >= nb * PANEL);
        assert!(!OFFSET || panel.m.len() >= nb * PANEL);
        assert!(acts.q.len() >= (t0 + C) * cols && acts.d.len() >= (t0 + C) * nb);
        let mut acc = [_mm512_setzero_ps(); C];
        let mut offs = [_mm512_setzero_ps(); C];
        let (up, dp, mp) = (panel.u.as_ptr(), panel.d.as_ptr(), panel.m.as_ptr());
        let qp = acts.q.as_ptr();
        for b in 0..nb {
            // SAFETY: block b < nb of the panel and of tokens t0..t0 + C (asserted above).
            unsafe {
                let wp = up.add(b * 512);
                let w: [__m512i; 8] =
                    std::array::from_fn(|g| _mm512_loadu_si512(wp.add(g * 64).cast()));
                let dw = _mm512_loadu_ps(dp.add(b * PANEL));
                let mw = if OFFSET {
                    _mm512_loadu_ps(mp.add(b * PANEL))
                } else {
                    _mm512_setzero_ps()
                };
                for (c, (a, o)) in acc.iter_mut().zip(offs.iter_mut()).enumerate() {
                    let i = (t0 + c) * nb + b;
                    let y = qp.add((t0 + c) * cols + b * 32).cast::<i32>();
                    let mut s = _mm512_set1_epi32(*acts.corr.get_unchecked(i));
                    for (g, wg) in w.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(
                            s,
                            *wg,
                            _mm512_set1_epi32(y.add(g).read_unaligned()),
                        );
                    }
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*acts.d.get_unchecked(i)));
                    *a = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), *a);
                    if OFFSET {
                        *o = _mm512_fmadd_ps(mw, _mm512_set1_ps(*acts.s.get_unchecked(i)), *o);
                    }
                }
            }
        }
        let v: [__m512; C] = std::array::from_fn(|c| {
            if OFFSET {
                _mm512_add_ps(acc[c], offs[c])
            } else {
                acc[c]
            }
        });
        // SAFETY: forwarded (the caller's output contract).
        unsafe { store::<C>(panel, &v, t0, out, rows) };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tensor::Bytes;
    use rand::{Rng, SeedableRng};

    /// Random rows of `ty` (valid blocks: finite scales) and random activations.
    fn weight(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> TensorRef {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let bytes = ty.traits().block_bytes;
        let mut raw = vec![0u8; rows * cols / 32 * bytes];
        for blk in raw.chunks_exact_mut(bytes) {
            for v in blk.iter_mut() {
                *v = rng.gen();
            }
            let d = half::f16::from_f32(rng.gen_range(-0.05..0.05)).to_le_bytes();
            blk[..2].copy_from_slice(&d);
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                let m = half::f16::from_f32(rng.gen_range(-0.5..0.5)).to_le_bytes();
                blk[2..4].copy_from_slice(&m);
            }
        }
        TensorRef::new("w", vec![rows, cols], ty, Bytes::owned(raw)).unwrap()
    }

    /// Every output of the tiles equals the scalar reference bit for bit: partial panels and task groups,
    /// token counts below, at and past a multiple of the kernel's eight, odd and even block counts, an
    /// all-zero activation row and one with a single large value.
    #[test]
    fn tiles_equal_the_scalar_reference() {
        assert_eq!(
            available(),
            cfg!(target_arch = "x86_64")
                && super::super::avx512_allowed()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        );
        if !available() {
            eprintln!("no AVX-512 VNNI here: the integer tiles decline (checked above), nothing to compare");
            return;
        }
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Iq4Nl,
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (i, &ty) in types.iter().enumerate() {
            for (rows, cols, n) in [(16, 32, 1), (37, 96, 13), (130, 64, 8), (70, 160, 17)] {
                let w = weight(ty, rows, cols, 11 + i as u64);
                let mut x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
                x[..cols].fill(0.0);
                if n > 1 {
                    x[cols + 5] = 1e4;
                }
                let mut out = vec![f32::NAN; n * rows];
                assert!(matmul(&w, &x, n, &mut out), "{ty:?}");
                let acts: Vec<Q8Row> = x.chunks_exact(cols).map(Q8Row::q8_0).collect();
                crate::testing::assert_outputs_bitwise(
                    &out,
                    n,
                    rows,
                    &format!("{ty:?} {rows}×{cols}"),
                    |t, r| tile_dot_scalar(ty, w.row_data(r), &acts[t]),
                );
            }
        }
    }

    /// The k-quants and IQ4_XS: every output equals the decoding kernel's scalar reference bit for bit (and
    /// so the decoding kernel), for quantized random rows with outliers and activation rows with a zero
    /// block and a single large value.
    #[test]
    fn k_tiles_equal_the_decoding_reference() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the integer tiles decline, nothing to compare");
            return;
        }
        let types = [
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::Iq4Xs,
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for &ty in &types {
            for (rows, cols, n) in [(16, 256, 1), (37, 512, 13), (70, 768, 9)] {
                let row_bytes = ty.traits().row_bytes(cols).unwrap();
                let mut raw = vec![0u8; rows * row_bytes];
                for r in raw.chunks_exact_mut(row_bytes) {
                    let mut v: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    v[rng.gen_range(0..cols)] = 9.0;
                    ty.quantize(&v, r, None);
                }
                let w = TensorRef::new("w", vec![rows, cols], ty, Bytes::owned(raw)).unwrap();
                let mut x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
                x[..256].fill(0.0);
                if n > 1 {
                    x[cols + 7] = -1e4;
                }
                let mut out = vec![f32::NAN; n * rows];
                assert!(matmul(&w, &x, n, &mut out), "{ty:?}");
                let acts: Vec<Q8Row> = x.chunks_exact(cols).map(Q8Row::q8_k).collect();
                crate::testing::assert_outputs_bitwise(
                    &out,
                    n,
                    rows,
                    &format!("{ty:?} {rows}×{cols}"),
                    |t, r| super::super::cpu_q8::vec_dot_k_scalar(ty, w.row_data(r), &acts[t]),
                );
            }
        }
    }

    #[test]
    fn other_types_decline() {
        let w = TensorRef::from_f32("w", vec![4, 32], &[0.5; 128]).unwrap();
        let mut out = vec![7.0; 8];
        assert!(!matmul(&w, &[1.0; 64], 2, &mut out));
        assert_eq!(out, vec![7.0; 8]);
        assert!(!supports(GgmlType::Iq2Xxs) && !supports(GgmlType::F16));
    }
}
