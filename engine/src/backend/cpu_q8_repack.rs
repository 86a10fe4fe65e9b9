//! Decoding over Q8_0-family weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) and Q4_K, Q6_K and IQ4_XS
//! repacked once, as llama.cpp's CPU backend repacks Q4_0, IQ4_NL and Q4_K on load: 16 rows interleaved so that each 32-bit lane of a 512-bit
//! register holds one row's four code bytes, the codes kept at their stored width (nibbles stay nibbles,
//! the fifth bits are regrouped so two shifts place them), the block scales of the 16 rows side by side.
//! AVX-512 VNNI's `vpdpbusd` then sums a block of 16 rows against a token in 8 instructions where the
//! row-by-row kernel needs a horizontal layout per row, so decoding reads the weights at memory speed. CPUs
//! with AVX2 but not AVX-512 VNNI read the same panels with AVX2 kernels (two halves of eight rows per
//! vector, `vpmaddubsw` pair sums kept in 16 bits while they cannot overflow, then `vpmaddwd`), equal bit for
//! bit. Prompts use the panels too, four tokens per kernel call.
//!
//! The arithmetic is the prompt tiles' (`cpu_q8_tile::tile_dot_scalar` for the Q8_0 family; for the
//! k-quants the row kernel's `cpu_q8::vec_dot_k_scalar`, equal bit for bit): a prompt's rows and a decoded
//! token's row are the same numbers. A tensor is repacked the first time it is multiplied (the copy
//! lives as long as the tensor; its size is within 3 % of the weight's), where the CPU has AVX-512 VNNI or
//! AVX2. Decoding is bound by memory bandwidth, so the layouts carry no byte the stored blocks do not (the
//! k-quants' scales stay bytes, their `d` stays f16: widening them had cost 10–23 % of decoding speed),
//! start every panel block on a cache line, and are read front to back in the order the kernels use them,
//! with no software prefetch: the hardware prefetchers keep up with a forward stream (prefetching ahead
//! into L2 had cost 2–10 %, and was needed only while Q6_K's block was read out of order — without it that
//! layout decoded at half speed).

use super::cpu_q8::{tile_bias, Q8Row};
use crate::codecs::GgmlType;
use crate::tensor::TensorRef;

/// Rows per panel.
const PANEL: usize = 16;
/// The repacked weights of `w`, built the first time (kept in the tensor's [`crate::tensor::Derived`], shared
/// by its clones), or `None` where the tensor's type or the CPU has no repacked kernel (or a clone of the
/// tensor now reads its rows in another order than the one they were repacked in).
pub fn repacked(w: &TensorRef) -> Option<&Repacked> {
    w.derived
        .get_or_init(|| Repacked::new(w))
        .filter(|r| r.rope == w.rope_interleaved_heads)
}

/// Where a block's parts sit in a panel block, and how long one is.
#[derive(Clone, Copy)]
struct Parts {
    /// Offsets of the 16 `f16(m)` (the `_1` types), the 16 regrouped fifth-bit words (the 5-bit types) and
    /// the codes; the 16 `f16(d)` are first.
    m: usize,
    h: usize,
    qs: usize,
    bytes: usize,
}

fn parts(ty: GgmlType) -> Parts {
    let offset = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    let fifth = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
    let m = 32;
    let h = m + if offset { 32 } else { 0 };
    let qs = h + if fifth { 64 } else { 0 };
    let codes = if ty == GgmlType::Q8_0 { 512 } else { 256 };
    Parts {
        m,
        h,
        qs,
        bytes: qs + codes,
    }
}

/// A Q8_0-family tensor in panels of 16 rows. Panel `p`, block `b` starts at `(p·nb + b)·parts.bytes`:
/// the rows' `f16(d)`, then (the `_1` types) their `f16(m)`, then (Q5_0/Q5_1) per row a word whose byte `j`
/// holds in bit `g` the fifth bit of code `4g + j` and in bit `4 + g` that of code `16 + 4g + j`, then the
/// codes: Q8_0 group `g` (codes `4g..4g + 4` as `code + 128`) of row `r` at `g·64 + r·4`; the 4- and 5-bit
/// types the stored bytes `4g..4g + 4` of row `r` (low nibbles: codes `4g..`, high: codes `16 + 4g..`).
pub struct Repacked {
    ty: GgmlType,
    /// The row order the rows were read in (`TensorRef::rope_interleaved_heads`).
    rope: Option<usize>,
    rows: usize,
    nb: usize,
    parts: Parts,
    data: Lines,
    /// The AVX-512 VNNI kernels (else the k types' AVX2 ones).
    vnni: bool,
}

impl Repacked {
    fn new(w: &TensorRef) -> Option<Self> {
        Self::new_with(w, super::cpu_q8_tile::available())
    }

    /// The repacked `w` for the AVX-512 VNNI kernels (`vnni`) or for the AVX2 ones (where the CPU has AVX2,
    /// FMA and F16C).
    fn new_with(w: &TensorRef, vnni: bool) -> Option<Self> {
        let ty = w.block_type()?;
        if !repackable(ty) || !(vnni || avx2()) {
            return None;
        }
        if k_type(ty) {
            return Some(Self::new_k(w, ty, vnni));
        }
        let (rows, cols) = (w.rows(), w.cols());
        let nb = cols / 32;
        let parts = parts(ty);
        let bytes = ty.traits().block_bytes;
        let panels = rows.div_ceil(PANEL);
        let mut data = Lines::zeroed(panels * nb * parts.bytes);
        for r in 0..rows {
            let (p, lane) = (r / PANEL, r % PANEL);
            let row = w.row_data(r);
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                let o = (p * nb + b) * parts.bytes;
                let dst = &mut data.bytes_mut()[o..o + parts.bytes];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&blk[..2]);
                let (qh, qs): (Option<&[u8]>, &[u8]) = match ty {
                    GgmlType::Q4_0 | GgmlType::Iq4Nl => (None, &blk[2..18]),
                    GgmlType::Q4_1 => (None, &blk[4..20]),
                    GgmlType::Q5_0 => (Some(&blk[2..6]), &blk[6..22]),
                    GgmlType::Q5_1 => (Some(&blk[4..8]), &blk[8..24]),
                    _ => (None, &blk[2..34]),
                };
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    dst[parts.m + 2 * lane..parts.m + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                }
                if let Some(qh) = qh {
                    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                    let mut h = 0u32;
                    for j in 0..4 {
                        for g in 0..4 {
                            h |= ((qh >> (4 * g + j)) & 1) << (8 * j + g);
                            h |= ((qh >> (16 + 4 * g + j)) & 1) << (8 * j + 4 + g);
                        }
                    }
                    dst[parts.h + 4 * lane..parts.h + 4 * lane + 4]
                        .copy_from_slice(&h.to_le_bytes());
                }
                for g in 0..qs.len() / 4 {
                    let at = parts.qs + g * 64 + lane * 4;
                    for (k, &v) in qs[4 * g..4 * g + 4].iter().enumerate() {
                        dst[at + k] = if ty == GgmlType::Q8_0 { v ^ 0x80 } else { v };
                    }
                }
            }
        }
        Some(Self {
            ty,
            rope: w.rope_interleaved_heads,
            rows,
            nb,
            parts,
            data,
            vnni,
        })
    }

    /// The k layout: per panel and 256-block, at [`koff`]'s offsets, the rows' `d` (and Q4_K's `dmin`) as
    /// the f16 they are stored as, row `r`'s at `2r`; their scales: Q4_K's and IQ4_XS's per 32 codes as bytes
    /// (unsigned and signed), sub-block `s` of row `r` at `16s + r`, Q4_K's mins likewise; Q6_K's per 16 as
    /// signed bytes, pair `p` (sub-blocks `2p`, `2p + 1`) of row `r` at `2·(16p + r)`; then the codes: Q4_K
    /// and IQ4_XS the stored nibble bytes `4k..4k + 4` of row `r` at `k·64 + r·4`; Q6_K its low-nibble bytes
    /// and its high-bit bytes `4k..4k + 4` (k < 16) likewise, at the slots of [`q6_slot`] (the kernel's
    /// reading order).
    fn new_k(w: &TensorRef, ty: GgmlType, vnni: bool) -> Self {
        let (rows, cols) = (w.rows(), w.cols());
        let nb = cols / 256;
        let bytes = ty.traits().block_bytes;
        let kb = k_block_bytes(ty);
        let off = koff(ty);
        let panels = rows.div_ceil(PANEL);
        let mut data = Lines::zeroed(panels * nb * kb);
        for r in 0..rows {
            let (p, lane) = (r / PANEL, r % PANEL);
            let row = w.row_data(r);
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                let o = (p * nb + b) * kb;
                let dst = &mut data.bytes_mut()[o..o + kb];
                let k = super::cpu_q8::k_scales(ty, blk);
                // The f16 `d` (and `dmin`) bytes as stored.
                let d_at = if ty == GgmlType::Q6K { 208 } else { 0 };
                dst[2 * lane..2 * lane + 2].copy_from_slice(&blk[d_at..d_at + 2]);
                if ty == GgmlType::Q6K {
                    for sb in 0..16 {
                        let at = 2 * ((sb / 2) * PANEL + lane) + sb % 2;
                        dst[off.sc + at] = k.scales[sb] as i8 as u8;
                    }
                } else {
                    for sb in 0..8 {
                        // `k_scales` gives one scale per 16 codes; these types' pairs are equal.
                        dst[off.sc + sb * PANEL + lane] = k.scales[2 * sb] as i8 as u8;
                    }
                }
                if ty == GgmlType::Q4K {
                    dst[off.dmin + 2 * lane..off.dmin + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                    for sb in 0..8 {
                        dst[off.mn + sb * PANEL + lane] = k.mins[2 * sb] as u8;
                    }
                }
                let (qs, qh): (&[u8], Option<&[u8]>) = match ty {
                    GgmlType::Q4K => (&blk[16..144], None),
                    GgmlType::Iq4Xs => (&blk[8..136], None),
                    _ => (&blk[..128], Some(&blk[128..192])),
                };
                for kk in 0..32 {
                    let at = off.qs + q6_slot(qh.is_some(), kk) * 64 + lane * 4;
                    dst[at..at + 4].copy_from_slice(&qs[4 * kk..4 * kk + 4]);
                }
                if let Some(qh) = qh {
                    for kk in 0..16 {
                        let at = off.qs + 3 * kk * 64 + lane * 4;
                        dst[at..at + 4].copy_from_slice(&qh[4 * kk..4 * kk + 4]);
                    }
                }
            }
        }
        Self {
            ty,
            rope: w.rope_interleaved_heads,
            rows,
            nb,
            parts: Parts {
                m: 0,
                h: 0,
                qs: off.qs,
                bytes: kb,
            },
            data,
            vnni,
        }
    }

    /// `out[t·rows + r] = W[r] · x[t]` for the `acts.len()` tokens (each a [`Q8Row::q8_0`] of the tensor's
    /// row length), with the arithmetic of `cpu_q8_tile::tile_dot_scalar`; panels spread over the spinning
    /// pool.
    pub fn dot(&self, acts: &[Q8Row], out: &mut [f32]) {
        let n = acts.len();
        assert!(out.len() >= n * self.rows);
        if k_type(self.ty) {
            for a in acts {
                assert!(a.q.len() >= self.nb * 256 && a.d.len() >= self.nb);
                assert!(a.bsums.len() >= self.nb * 16);
            }
            self.each_panel(n, out, &|p, t, c, res| {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `vnni` was set where `available` says AVX-512 F, BW and VNNI, else the panels
                // were built only where the CPU has AVX2, FMA and F16C; the tokens t..t + c have `nb`
                // blocks and their sums (asserted above).
                #[allow(unsafe_code)]
                unsafe {
                    x86::k_panel(self, p, &acts[t..t + c], res);
                }
            });
            return;
        }
        for a in acts {
            assert!(a.q.len() >= self.nb * 32 && a.d.len() >= self.nb && a.s.len() >= self.nb);
        }
        let corr = self.corrections(acts);
        self.each_panel(n, out, &|p, t, c, res| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `vnni` was set where `available` says AVX-512 F, BW and VNNI, else the panels were
            // built only where the CPU has AVX2, FMA and F16C; the tokens t..t + c have `nb` blocks
            // (asserted above).
            #[allow(unsafe_code)]
            unsafe {
                x86::panel(self, p, &acts[t..t + c], &corr[t..t + c], res);
            }
        });
    }

    /// [`Repacked::dot`] of one token as the tasks of a [`super::spin::for_each_group`] part: the same
    /// numbers, for several matrices in one job.
    pub fn token_part<'a>(&'a self, act: &'a Q8Row, out: &'a mut [f32]) -> super::spin::Part<'a> {
        assert!(out.len() >= self.rows);
        if k_type(self.ty) {
            assert!(act.q.len() >= self.nb * 256 && act.d.len() >= self.nb);
            assert!(act.bsums.len() >= self.nb * 16);
        } else {
            assert!(
                act.q.len() >= self.nb * 32 && act.d.len() >= self.nb && act.s.len() >= self.nb
            );
        }
        let corr = if k_type(self.ty) {
            Vec::new()
        } else {
            self.corrections(std::slice::from_ref(act))
        };
        let o = super::spin::Disjoint::new(&mut out[..self.rows]);
        let (tasks, per_task) = self.panel_tasks();
        let acts = std::slice::from_ref(act);
        (
            tasks,
            Box::new(move |task| {
                self.panel_task(task, per_task, 1, &o, &|p, t, c, res| {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as in `dot` (the panels' kernels exist on this CPU; the token's blocks and
                    // sums were asserted above).
                    #[allow(unsafe_code)]
                    unsafe {
                        if k_type(self.ty) {
                            x86::k_panel(self, p, &acts[t..t + c], res);
                        } else {
                            x86::panel(self, p, &acts[t..t + c], &corr[t..t + c], res);
                        }
                    }
                });
            }),
        )
    }

    /// `−bias · Σq` per token and block: what the unsigned codes add back (the Q8_0 family).
    fn corrections(&self, acts: &[Q8Row]) -> Vec<Vec<i32>> {
        let bias = tile_bias(self.ty);
        acts.iter()
            .map(|a| {
                let mut c = vec![0i32; self.nb];
                super::cpu_q8::bias_corrections(&a.q, bias, &mut c);
                c
            })
            .collect()
    }

    /// How many tasks the panels make, and panels per task.
    fn panel_tasks(&self) -> (usize, usize) {
        let panels = self.rows.div_ceil(PANEL);
        let per_task = (panels / (4 * rayon::current_num_threads())).clamp(1, 8);
        (panels.div_ceil(per_task), per_task)
    }

    /// Every panel against the `n` tokens, up to four at a time (`kernel(panel, first token, count,
    /// results)`), on the spinning pool; the real rows' results into `out`.
    fn each_panel(&self, n: usize, out: &mut [f32], kernel: &PanelKernel) {
        let o = super::spin::Disjoint::new(&mut out[..n * self.rows]);
        let (tasks, per_task) = self.panel_tasks();
        super::spin::for_each(tasks, &|task| {
            self.panel_task(task, per_task, n, &o, kernel)
        });
    }

    /// The panels of task `task` against the `n` tokens (see [`Repacked::each_panel`]).
    fn panel_task(
        &self,
        task: usize,
        per_task: usize,
        n: usize,
        o: &super::spin::Disjoint<'_, f32>,
        kernel: &PanelKernel,
    ) {
        let panels = self.rows.div_ceil(PANEL);
        for p in task * per_task..((task + 1) * per_task).min(panels) {
            let mut t = 0;
            while t < n {
                let c = (n - t).min(4);
                let mut res = [[0f32; PANEL]; 4];
                kernel(p, t, c, &mut res);
                // A whole panel's 16 results as one copy (element-wise, each would reload a value the
                // kernel has just stored as a vector: a forwarding stall per value).
                let real = self.rows.min((p + 1) * PANEL) - p * PANEL;
                for (k, rk) in res.iter().enumerate().take(c) {
                    o.set_slice((t + k) * self.rows + p * PANEL, &rk[..real]);
                }
                t += c;
            }
        }
    }
}

/// Zeroed bytes starting on a 64-byte boundary, so the kernels' 64-byte vector loads of a panel block each
/// touch one cache line (a large `Vec<u8>` starts 16 bytes into its page, and every such load would then be
/// split over two lines).
struct Lines {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Lines {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + 63];
        let off = buf.as_ptr().align_offset(64).min(63);
        Self { buf, off, len }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// A panel kernel: `(panel, first token, tokens, results per token and lane)`.
type PanelKernel<'a> = dyn Fn(usize, usize, usize, &mut [[f32; PANEL]; 4]) + Sync + 'a;

/// Offsets in a k panel block ([`Repacked::new_k`]); `dmin` and `mn` only in Q4_K's.
#[derive(Clone, Copy)]
struct KOff {
    dmin: usize,
    sc: usize,
    mn: usize,
    qs: usize,
}

/// The k layout of `ty`: as small as the stored block (Q4_K 2368 bytes per 16 rows against the rows' 2304,
/// Q6_K 3392 against 3360, IQ4_XS 2240 against 2176), the codes starting on a cache line. Decoding reads
/// every byte once per token, so every byte of layout is time.
const fn koff(ty: GgmlType) -> KOff {
    match ty {
        GgmlType::Q4K => KOff {
            dmin: 32,
            sc: 64,
            mn: 192,
            qs: 320,
        },
        GgmlType::Q6K => KOff {
            dmin: 0,
            sc: 32,
            mn: 0,
            qs: 320,
        },
        _ => KOff {
            dmin: 0,
            sc: 32,
            mn: 0,
            qs: 192,
        },
    }
}

/// Where code vector `k` (stored bytes `4k..4k + 4` of each row) sits among a panel block's code vectors:
/// in order for Q4_K and IQ4_XS; for Q6_K in the order its kernel reads them, so a block is read front to
/// back (the hardware prefetchers follow only forward streams): per `(h, kk)` (`h < 2`, `kk < 8`) the
/// high-bit vector `8h + kk` at `3·(8h + kk)`, then low-nibble vectors `16h + kk` and `16h + 8 + kk`.
const fn q6_slot(q6: bool, k: usize) -> usize {
    if !q6 {
        return k;
    }
    let (h, s, kk) = (k / 16, (k / 8) % 2, k % 8);
    3 * (8 * h + kk) + 1 + s
}

/// Bytes of one k panel block (a whole number of cache lines).
fn k_block_bytes(ty: GgmlType) -> usize {
    koff(ty).qs + if ty == GgmlType::Q6K { 3072 } else { 2048 }
}

/// Whether `ty` is one of the repacked k types.
fn k_type(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q6K | GgmlType::Iq4Xs)
}

/// Whether the CPU runs the AVX2 k kernels.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu_q8::avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether [`Repacked`] takes weights of `ty`.
pub fn repackable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Iq4Nl
    ) || k_type(ty)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::{Q8Row, Repacked, PANEL};
    use crate::codecs::GgmlType;
    use std::arch::x86_64::*;

    use super::super::cpu_q8::x86::{iq4_table, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

    /// IQ4_NL's values + 128 (unsigned bytes) in each 128-bit lane, for `vpshufb`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn iq4_unsigned_table() -> __m512i {
        let mut t = [0u8; 16];
        for (o, &v) in t.iter_mut().zip(crate::codecs::KVALUES_IQ4NL.iter()) {
            *o = (i16::from(v) + 128) as u8;
        }
        // SAFETY: 16 bytes.
        _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(t.as_ptr().cast()) })
    }

    const Q4K: u8 = 0;
    const Q6K: u8 = 1;
    const IQ4XS: u8 = 2;

    /// A k panel `p` against up to four tokens (Q8_K rows), results per token and lane into `res`, with the
    /// kernels the panels were built for ([`k_tokens`] or [`k_tokens_avx2`]).
    ///
    /// # Safety
    /// The CPU has the kernels' features: AVX-512 F, BW and VNNI where `rp.vnni`, else AVX2, FMA and F16C.
    pub unsafe fn k_panel(rp: &Repacked, p: usize, acts: &[Q8Row], res: &mut [[f32; PANEL]; 4]) {
        macro_rules! by_count {
            ($k:ident, $t:ident) => {
                match acts.len() {
                    1 => $k::<$t, 1>(rp, p, acts, res),
                    2 => $k::<$t, 2>(rp, p, acts, res),
                    3 => $k::<$t, 3>(rp, p, acts, res),
                    _ => $k::<$t, 4>(rp, p, acts, res),
                }
            };
        }
        macro_rules! by_type {
            ($k:ident) => {
                match rp.ty {
                    GgmlType::Q4K => by_count!($k, Q4K),
                    GgmlType::Q6K => by_count!($k, Q6K),
                    _ => by_count!($k, IQ4XS),
                }
            };
        }
        // SAFETY: forwarded (the caller's contract names the features of the kernel chosen).
        unsafe {
            if rp.vnni {
                by_type!(k_tokens)
            } else {
                by_type!(k_tokens_avx2)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn k_tokens<const T: u8, const C: usize>(
        rp: &Repacked,
        p: usize,
        acts: &[Q8Row],
        res: &mut [[f32; PANEL]; 4],
    ) {
        let (nb, kb) = (rp.nb, rp.parts.bytes);
        assert!(acts.len() >= C && C <= 4);
        assert!(rp.data.bytes().len() >= (p + 1) * nb * kb);
        for a in &acts[..C] {
            assert!(a.q.len() >= nb * 256 && a.d.len() >= nb && a.bsums.len() >= nb * 16);
        }
        let mins = T == Q4K;
        let off = super::koff(match T {
            Q4K => GgmlType::Q4K,
            Q6K => GgmlType::Q6K,
            _ => GgmlType::Iq4Xs,
        });
        let bias: i16 = match T {
            Q6K => 32,
            IQ4XS => 128,
            _ => 0,
        };
        let table = iq4_unsigned_table();
        let sign = _mm512_set1_epi32(i32::MIN);
        let mut acc = [_mm512_setzero_ps(); C];
        let base = rp.data.bytes().as_ptr().wrapping_add(p * nb * kb);
        for b in 0..nb {
            // SAFETY: panel p's block b lies in `data`; the tokens' block b and its sums lie in their rows
            // (asserted above).
            unsafe {
                let blk = base.add(b * kb);
                let qs = blk.add(off.qs);
                let y: [*const i32; C] =
                    std::array::from_fn(|c| acts[c].q.as_ptr().add(b * 256).cast::<i32>());
                let mut sumi = [_mm512_setzero_si512(); C];
                // Q6_K's sub-block `sb` (16 codes) scales as 32-bit lanes (pairs are stored as two signed
                // bytes per row).
                let scale16 = |sb: usize| {
                    let scp = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                        blk.add(off.sc + (sb / 2) * 32).cast(),
                    ));
                    if sb.is_multiple_of(2) {
                        _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(scp))
                    } else {
                        _mm512_srai_epi32::<16>(scp)
                    }
                };
                // Q4_K's and IQ4_XS's sub-block `sb` (32 codes) scales (or Q4_K's mins at `at`) as 32-bit
                // lanes.
                let per32 = |at: usize, sb: usize| {
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(at + 16 * sb).cast()))
                };
                // Codes `v` of elements `e..e + 4` (16 rows) against each token's four bytes there.
                let dp = |u: &mut [__m512i; C], v: __m512i, e: usize| {
                    for c in 0..C {
                        u[c] = _mm512_dpbusd_epi32(
                            u[c],
                            v,
                            _mm512_set1_epi32(y[c].add(e / 4).read_unaligned()),
                        );
                    }
                };
                let m4 = _mm512_set1_epi8(0x0F);
                let lo = |q: __m512i| _mm512_and_si512(q, m4);
                let hi = |q: __m512i| _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                let vec = |k: usize| _mm512_loadu_si512(qs.add(k * 64).cast());
                // The stored vectors in storage order (a sequential read), each nibble half into the
                // sub-block it belongs to; then each sub-block's sum times its scale.
                match T {
                    Q4K => {
                        for c64 in 0..4 {
                            // Low nibbles are sub-block 2·c64, high ones 2·c64 + 1 (accumulators named, not
                            // indexed by the loop, so they stay in registers).
                            let (mut ul, mut uh) =
                                ([_mm512_setzero_si512(); C], [_mm512_setzero_si512(); C]);
                            for kk in 0..8 {
                                let q = vec(8 * c64 + kk);
                                dp(&mut ul, lo(q), 64 * c64 + 4 * kk);
                                dp(&mut uh, hi(q), 64 * c64 + 32 + 4 * kk);
                            }
                            let (sl, sh) = (per32(off.sc, 2 * c64), per32(off.sc, 2 * c64 + 1));
                            for c in 0..C {
                                sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(ul[c], sl));
                                sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(uh[c], sh));
                            }
                        }
                    }
                    IQ4XS => {
                        for ib in 0..8 {
                            let mut u = [[_mm512_setzero_si512(); C]; 2];
                            for kk in 0..4 {
                                let q = vec(4 * ib + kk);
                                dp(
                                    &mut u[0],
                                    _mm512_shuffle_epi8(table, lo(q)),
                                    32 * ib + 4 * kk,
                                );
                                dp(
                                    &mut u[1],
                                    _mm512_shuffle_epi8(table, hi(q)),
                                    32 * ib + 16 + 4 * kk,
                                );
                            }
                            let sc = per32(off.sc, ib);
                            for c in 0..C {
                                let ub = _mm512_add_epi32(u[0][c], u[1][c]);
                                sumi[c] = _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(ub, sc));
                            }
                        }
                    }
                    _ => {
                        let m30 = _mm512_set1_epi8(0x30);
                        for (h, half) in (0..2).flat_map(|h| [(h, 0), (h, 1)]) {
                            // Index m: elements 128h + 32m + 16·half .. + 16, sub-block 8h + 2m + half
                            // (the index does not depend on kk, so the accumulators stay in registers).
                            let mut u = [[_mm512_setzero_si512(); C]; 4];
                            for kk in 4 * half..4 * half + 4 {
                                // Slots in storage order (`q6_slot`).
                                let at = 3 * (8 * h + kk);
                                let (qh, q0, q1) = (vec(at), vec(at + 1), vec(at + 2));
                                // Bits 2m, 2m + 1 of each byte to bits 4, 5 (the shifts stay inside the
                                // byte for the bits kept).
                                let hb = [
                                    _mm512_and_si512(_mm512_slli_epi16::<4>(qh), m30),
                                    _mm512_and_si512(_mm512_slli_epi16::<2>(qh), m30),
                                    _mm512_and_si512(qh, m30),
                                    _mm512_and_si512(_mm512_srli_epi16::<2>(qh), m30),
                                ];
                                let nib = [lo(q0), lo(q1), hi(q0), hi(q1)];
                                for m in 0..4 {
                                    let v = _mm512_or_si512(nib[m], hb[m]);
                                    dp(&mut u[m], v, 128 * h + 32 * m + 4 * kk);
                                }
                            }
                            for (m, um) in u.iter().enumerate() {
                                let sc = scale16(8 * h + 2 * m + half);
                                for c in 0..C {
                                    sumi[c] =
                                        _mm512_add_epi32(sumi[c], _mm512_mullo_epi32(um[c], sc));
                                }
                            }
                        }
                    }
                }
                // The mins (Q4_K) or the unsigned codes' shift (bias · scale) against the 16-code sums:
                // per row lane a pair of 16-bit factors against a token's pair of sums.
                let mut aux = [_mm512_setzero_si512(); C];
                for pr in 0..8 {
                    let cf = if T == Q6K {
                        _mm512_mullo_epi16(
                            _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                blk.add(off.sc + pr * 32).cast(),
                            )),
                            _mm512_set1_epi16(bias),
                        )
                    } else {
                        // One factor per 32 codes, for both of its halves.
                        let v = if mins {
                            per32(off.mn, pr)
                        } else {
                            _mm512_mullo_epi32(
                                per32(off.sc, pr),
                                _mm512_set1_epi32(i32::from(bias)),
                            )
                        };
                        _mm512_or_si512(
                            _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF)),
                            _mm512_slli_epi32::<16>(v),
                        )
                    };
                    for c in 0..C {
                        let bs = acts[c].bsums.as_ptr().add(b * 16 + 2 * pr).cast::<i32>();
                        aux[c] =
                            _mm512_dpwssd_epi32(aux[c], cf, _mm512_set1_epi32(bs.read_unaligned()));
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(off.dmin).cast()));
                for c in 0..C {
                    let dx = _mm512_set1_ps(*acts[c].d.get_unchecked(b));
                    let si = if mins {
                        sumi[c]
                    } else {
                        _mm512_sub_epi32(sumi[c], aux[c])
                    };
                    acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(si), acc[c]);
                    if mins {
                        let m = _mm512_castsi512_ps(_mm512_xor_si512(
                            _mm512_castps_si512(_mm512_mul_ps(dmin, dx)),
                            sign,
                        ));
                        acc[c] = _mm512_fmadd_ps(m, _mm512_cvtepi32_ps(aux[c]), acc[c]);
                    }
                }
            }
        }
        for c in 0..C {
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(res[c].as_mut_ptr(), acc[c]) };
        }
    }

    /// [`k_tokens`] with AVX2 alone (CPUs without AVX-512 VNNI), over the same layout and with the same
    /// integer sums and float steps (equal bit for bit): each 64-byte code vector is two halves of eight
    /// rows; `vpmaddubsw` of the unsigned codes with a token's broadcast four bytes gives 16-bit pair sums,
    /// summed in 16 bits as far as they cannot overflow (Q4_K: a sub-block's eight, ≤ 8 · 3810; Q6_K: two,
    /// ≤ 2 · 16002), then `vpmaddwd` with each row's scale duplicated in its lane's two halves. IQ4_XS's
    /// table values take the sign trick instead (signed codes, no bias).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k_tokens_avx2<const T: u8, const C: usize>(
        rp: &Repacked,
        p: usize,
        acts: &[Q8Row],
        res: &mut [[f32; PANEL]; 4],
    ) {
        let (nb, kb) = (rp.nb, rp.parts.bytes);
        assert!(acts.len() >= C && C <= 4);
        assert!(rp.data.bytes().len() >= (p + 1) * nb * kb);
        for a in &acts[..C] {
            assert!(a.q.len() >= nb * 256 && a.d.len() >= nb && a.bsums.len() >= nb * 16);
        }
        let off = super::koff(match T {
            Q4K => GgmlType::Q4K,
            Q6K => GgmlType::Q6K,
            _ => GgmlType::Iq4Xs,
        });
        // SAFETY: AVX2 (enabled on this function).
        let table = unsafe { iq4_table() };
        let m4 = _mm256_set1_epi8(0x0F);
        let lo = |q: __m256i| _mm256_and_si256(q, m4);
        let hi = |q: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
        let mut acc = [[_mm256_setzero_ps(); C]; 2];
        let base = rp.data.bytes().as_ptr().wrapping_add(p * nb * kb);
        for b in 0..nb {
            // SAFETY: panel p's block b lies in `data`; the tokens' block b and its sums lie in their rows
            // (asserted above).
            unsafe {
                let blk = base.add(b * kb);
                let qs = blk.add(off.qs);
                let y: [*const i32; C] =
                    std::array::from_fn(|c| acts[c].q.as_ptr().add(b * 256).cast::<i32>());
                // Token c's four bytes at element e, in every lane.
                let bc = |c: usize, e: usize| _mm256_set1_epi32(y[c].add(e / 4).read_unaligned());
                // Code vector k's half h8 (rows 8·h8..8·h8 + 8).
                let vec = |k: usize, h8: usize| _mm256_loadu_si256(qs.add(k * 64 + 32 * h8).cast());
                // Q4_K's and IQ4_XS's sub-block `sb` (32 codes) scales (or Q4_K's mins at `at`) of half h8,
                // duplicated.
                let per32 = |at: usize, sb: usize, h8: usize| {
                    let v = _mm_loadl_epi64(blk.add(at + 16 * sb + 8 * h8).cast());
                    _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(v, v))
                };
                // Both halves side by side: each token's broadcast bytes serve the two.
                let mut sumi = [[_mm256_setzero_si256(); C]; 2];
                match T {
                    Q4K => {
                        for c64 in 0..4 {
                            let mut ul = [[_mm256_setzero_si256(); C]; 2];
                            let mut uh = [[_mm256_setzero_si256(); C]; 2];
                            for kk in 0..8 {
                                let q = [vec(8 * c64 + kk, 0), vec(8 * c64 + kk, 1)];
                                for c in 0..C {
                                    let xl = bc(c, 64 * c64 + 4 * kk);
                                    let xh = bc(c, 64 * c64 + 32 + 4 * kk);
                                    for h8 in 0..2 {
                                        let (l, h) = (lo(q[h8]), hi(q[h8]));
                                        ul[h8][c] = _mm256_add_epi16(
                                            ul[h8][c],
                                            _mm256_maddubs_epi16(l, xl),
                                        );
                                        uh[h8][c] = _mm256_add_epi16(
                                            uh[h8][c],
                                            _mm256_maddubs_epi16(h, xh),
                                        );
                                    }
                                }
                            }
                            for h8 in 0..2 {
                                let sl = per32(off.sc, 2 * c64, h8);
                                let sh = per32(off.sc, 2 * c64 + 1, h8);
                                for c in 0..C {
                                    let v = _mm256_add_epi32(
                                        _mm256_madd_epi16(ul[h8][c], sl),
                                        _mm256_madd_epi16(uh[h8][c], sh),
                                    );
                                    sumi[h8][c] = _mm256_add_epi32(sumi[h8][c], v);
                                }
                            }
                        }
                    }
                    IQ4XS => {
                        for ib in 0..8 {
                            let sc = [per32(off.sc, ib, 0), per32(off.sc, ib, 1)];
                            for kk in 0..4 {
                                for h8 in 0..2 {
                                    let q = vec(4 * ib + kk, h8);
                                    for (v, e) in [
                                        (_mm256_shuffle_epi8(table, lo(q)), 32 * ib + 4 * kk),
                                        (_mm256_shuffle_epi8(table, hi(q)), 32 * ib + 16 + 4 * kk),
                                    ] {
                                        let av = _mm256_sign_epi8(v, v);
                                        for c in 0..C {
                                            let pr = _mm256_maddubs_epi16(
                                                av,
                                                _mm256_sign_epi8(bc(c, e), v),
                                            );
                                            sumi[h8][c] = _mm256_add_epi32(
                                                sumi[h8][c],
                                                _mm256_madd_epi16(pr, sc[h8]),
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                    _ => {
                        let m30 = _mm256_set1_epi8(0x30);
                        // Row r's even (odd) sub-block scale of pair `pr` in both halves of lane r.
                        let dup_even =
                            _mm_setr_epi8(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
                        let dup_odd =
                            _mm_setr_epi8(1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
                        let scale16 = |sb: usize, h8: usize| {
                            let v =
                                _mm_loadu_si128(blk.add(off.sc + (sb / 2) * 32 + 16 * h8).cast());
                            let d = if sb.is_multiple_of(2) {
                                dup_even
                            } else {
                                dup_odd
                            };
                            _mm256_cvtepi8_epi16(_mm_shuffle_epi8(v, d))
                        };
                        for (h, half) in (0..2).flat_map(|h| [(h, 0), (h, 1)]) {
                            // Two code vectors' pair sums per 16-bit sum (≤ 2 · 16002), then the scale.
                            for pair in 0..2 {
                                let mut t16 = [[[_mm256_setzero_si256(); C]; 4]; 2];
                                for kk in 4 * half + 2 * pair..4 * half + 2 * pair + 2 {
                                    let at = 3 * (8 * h + kk);
                                    for (h8, t16) in t16.iter_mut().enumerate() {
                                        let (qh, q0, q1) =
                                            (vec(at, h8), vec(at + 1, h8), vec(at + 2, h8));
                                        let hb = [
                                            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
                                            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
                                            _mm256_and_si256(qh, m30),
                                            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
                                        ];
                                        let nib = [lo(q0), lo(q1), hi(q0), hi(q1)];
                                        for m in 0..4 {
                                            let v = _mm256_or_si256(nib[m], hb[m]);
                                            for c in 0..C {
                                                let x = bc(c, 128 * h + 32 * m + 4 * kk);
                                                t16[m][c] = _mm256_add_epi16(
                                                    t16[m][c],
                                                    _mm256_maddubs_epi16(v, x),
                                                );
                                            }
                                        }
                                    }
                                }
                                for (h8, t16) in t16.iter().enumerate() {
                                    for m in 0..4 {
                                        let sc = scale16(8 * h + 2 * m + half, h8);
                                        for c in 0..C {
                                            sumi[h8][c] = _mm256_add_epi32(
                                                sumi[h8][c],
                                                _mm256_madd_epi16(t16[m][c], sc),
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                // Q4_K: each token's eight sums of 32 codes (pairs of its 16-code sums, ≤ 2 · 2032), in
                // 16-bit lanes 0–3 and 8–11 (`vphaddw` works within 128-bit halves).
                let sums32: [__m256i; C] = std::array::from_fn(|c| {
                    if T == Q4K {
                        let bs = _mm256_loadu_si256(acts[c].bsums.as_ptr().add(b * 16).cast());
                        _mm256_hadd_epi16(bs, bs)
                    } else {
                        _mm256_setzero_si256()
                    }
                });
                for (h8, acc) in acc.iter_mut().enumerate() {
                    let sumi = &mut sumi[h8];
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h8).cast()));
                    // The mins (Q4_K) or Q6_K's shift (32 · scale) against the 16-code sums, per row lane
                    // a pair of 16-bit factors against a token's pair of sums.
                    if T != IQ4XS {
                        let mut aux = [_mm256_setzero_si256(); C];
                        if T == Q6K {
                            for pr in 0..8 {
                                let cf = _mm256_slli_epi16::<5>(_mm256_cvtepi8_epi16(
                                    _mm_loadu_si128(blk.add(off.sc + pr * 32 + 16 * h8).cast()),
                                ));
                                for c in 0..C {
                                    let bs =
                                        acts[c].bsums.as_ptr().add(b * 16 + 2 * pr).cast::<i32>();
                                    let x = _mm256_set1_epi32(bs.read_unaligned());
                                    aux[c] = _mm256_add_epi32(aux[c], _mm256_madd_epi16(cf, x));
                                }
                            }
                        } else {
                            // Q4_K's mins, two sub-blocks of 32 per `vpmaddwd`: each row's pair of
                            // mins against the token's pair of 32-code sums.
                            for j in 0..4 {
                                let at = off.mn + 32 * j + 8 * h8;
                                let (m0, m1) = (
                                    _mm_loadl_epi64(blk.add(at).cast()),
                                    _mm_loadl_epi64(blk.add(at + 16).cast()),
                                );
                                let cf = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m0, m1));
                                for c in 0..C {
                                    let x = _mm256_permutevar8x32_epi32(
                                        sums32[c],
                                        _mm256_set1_epi32(j as i32 + 2 * (j as i32 / 2)),
                                    );
                                    aux[c] = _mm256_add_epi32(aux[c], _mm256_madd_epi16(cf, x));
                                }
                            }
                        }
                        let dmin =
                            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(off.dmin + 16 * h8).cast()));
                        for c in 0..C {
                            let dx = _mm256_set1_ps(*acts[c].d.get_unchecked(b));
                            if T == Q6K {
                                sumi[c] = _mm256_sub_epi32(sumi[c], aux[c]);
                            }
                            let si = _mm256_cvtepi32_ps(sumi[c]);
                            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), si, acc[c]);
                            if T == Q4K {
                                let m = _mm256_mul_ps(dmin, dx);
                                acc[c] = _mm256_fnmadd_ps(m, _mm256_cvtepi32_ps(aux[c]), acc[c]);
                            }
                        }
                    } else {
                        for c in 0..C {
                            let dx = _mm256_set1_ps(*acts[c].d.get_unchecked(b));
                            let si = _mm256_cvtepi32_ps(sumi[c]);
                            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), si, acc[c]);
                        }
                    }
                }
            }
        }
        for c in 0..C {
            for (h8, a) in acc.iter().enumerate() {
                // SAFETY: eight floats at lanes 8·h8 of a row of 16.
                unsafe { _mm256_storeu_ps(res[c].as_mut_ptr().add(8 * h8), a[c]) };
            }
        }
    }

    /// [`tokens`] with AVX2 alone, over the same layout and with the same integer sums and float steps
    /// (equal bit for bit): the 4- and 5-bit types' unsigned codes through `vpmaddubsw` with the token's
    /// broadcast bytes, their 16-bit pair sums added while they cannot overflow (eight of ≤ 3810, four of
    /// ≤ 7874), started from `−bias · Σq`; Q8_0's and IQ4_NL's codes back to signed bytes and through the sign
    /// trick (no bias).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tokens_avx2<const T: u8, const C: usize>(
        rp: &Repacked,
        p: usize,
        acts: &[Q8Row],
        corr: &[Vec<i32>],
        res: &mut [[f32; PANEL]; 4],
    ) {
        let (nb, parts) = (rp.nb, rp.parts);
        assert!(acts.len() >= C && corr.len() >= C && C <= 4);
        assert!(rp.data.bytes().len() >= (p + 1) * nb * parts.bytes);
        for c in 0..C {
            assert!(acts[c].q.len() >= nb * 32 && acts[c].d.len() >= nb && acts[c].s.len() >= nb);
            assert!(corr[c].len() >= nb);
        }
        let offset = matches!(T, Q4_1 | Q5_1);
        let fifth = matches!(T, Q5_0 | Q5_1);
        // The types read as signed codes (no bias, no correction).
        let signed = matches!(T, Q8_0 | IQ4_NL);
        let m4 = _mm256_set1_epi8(0x0F);
        let m10 = _mm256_set1_epi8(0x10);
        let ones = _mm256_set1_epi16(1);
        // SAFETY: AVX2 (enabled on this function).
        let table = unsafe { iq4_table() };
        let mut acc = [[_mm256_setzero_ps(); C]; 2];
        let mut offs = [[_mm256_setzero_ps(); C]; 2];
        let base = rp.data.bytes().as_ptr().wrapping_add(p * nb * parts.bytes);
        for b in 0..nb {
            // SAFETY: panel p's block b lies in `data`; the tokens' block b lies in their rows (asserted).
            unsafe {
                let blk = base.add(b * parts.bytes);
                let y: [*const i32; C] =
                    std::array::from_fn(|c| acts[c].q.as_ptr().add(b * 32).cast::<i32>());
                let bc = |c: usize, g: usize| _mm256_set1_epi32(y[c].add(g).read_unaligned());
                let qs = blk.add(parts.qs);
                let mut s = [[_mm256_setzero_si256(); C]; 2];
                // Signed codes `w` of group g (four codes of each of 8 rows) against the tokens.
                let signed_dot = |s: &mut [__m256i; C], w: __m256i, g: usize| {
                    let aw = _mm256_sign_epi8(w, w);
                    for (c, sc) in s.iter_mut().enumerate() {
                        let pr = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bc(c, g), w));
                        *sc = _mm256_add_epi32(*sc, _mm256_madd_epi16(pr, ones));
                    }
                };
                for (h8, s) in s.iter_mut().enumerate() {
                    if T == Q8_0 {
                        for g in 0..8 {
                            let u = _mm256_loadu_si256(qs.add(g * 64 + 32 * h8).cast());
                            signed_dot(s, _mm256_xor_si256(u, _mm256_set1_epi8(-128)), g);
                        }
                        continue;
                    }
                    let h = if fifth {
                        _mm256_loadu_si256(blk.add(parts.h + 32 * h8).cast())
                    } else {
                        _mm256_setzero_si256()
                    };
                    // Unsigned 4-bit codes: all eight groups' pair sums in 16 bits; 5-bit: four.
                    let mut t16 = [[_mm256_setzero_si256(); C]; 2];
                    for g in 0..4 {
                        let q = _mm256_loadu_si256(qs.add(g * 64 + 32 * h8).cast());
                        let mut lo = _mm256_and_si256(q, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                        if fifth {
                            let up = _mm_cvtsi32_si128(4 - g as i32);
                            let down = _mm_cvtsi32_si128(g as i32);
                            lo =
                                _mm256_or_si256(lo, _mm256_and_si256(_mm256_sll_epi16(h, up), m10));
                            hi = _mm256_or_si256(
                                hi,
                                _mm256_and_si256(_mm256_srl_epi16(h, down), m10),
                            );
                        }
                        if signed {
                            signed_dot(s, _mm256_shuffle_epi8(table, lo), g);
                            signed_dot(s, _mm256_shuffle_epi8(table, hi), 4 + g);
                            continue;
                        }
                        for c in 0..C {
                            let k = if fifth { g / 2 } else { 0 };
                            let pl = _mm256_maddubs_epi16(lo, bc(c, g));
                            let ph = _mm256_maddubs_epi16(hi, bc(c, 4 + g));
                            t16[k][c] = _mm256_add_epi16(t16[k][c], _mm256_add_epi16(pl, ph));
                        }
                    }
                    if !signed {
                        for c in 0..C {
                            let mut v = _mm256_madd_epi16(t16[0][c], ones);
                            if fifth {
                                v = _mm256_add_epi32(v, _mm256_madd_epi16(t16[1][c], ones));
                            }
                            let cr = _mm256_set1_epi32(*corr[c].get_unchecked(b));
                            s[c] = _mm256_add_epi32(v, cr);
                        }
                    }
                }
                for h8 in 0..2 {
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h8).cast()));
                    let mw = if offset {
                        _mm256_cvtph_ps(_mm_loadu_si128(blk.add(parts.m + 16 * h8).cast()))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for c in 0..C {
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*acts[c].d.get_unchecked(b)));
                        let si = _mm256_cvtepi32_ps(s[h8][c]);
                        acc[h8][c] = _mm256_fmadd_ps(scale, si, acc[h8][c]);
                        if offset {
                            let sx = _mm256_set1_ps(*acts[c].s.get_unchecked(b));
                            offs[h8][c] = _mm256_fmadd_ps(mw, sx, offs[h8][c]);
                        }
                    }
                }
            }
        }
        for c in 0..C {
            for h8 in 0..2 {
                let v = if offset {
                    _mm256_add_ps(acc[h8][c], offs[h8][c])
                } else {
                    acc[h8][c]
                };
                // SAFETY: eight floats at lanes 8·h8 of a row of 16.
                unsafe { _mm256_storeu_ps(res[c].as_mut_ptr().add(8 * h8), v) };
            }
        }
    }

    /// Panel `p` against up to four tokens, results per token and lane into `res`, with the kernels the
    /// panels were built for ([`tokens`] or [`tokens_avx2`]).
    ///
    /// # Safety
    /// The CPU has the kernels' features: AVX-512 F, BW, VNNI and F16C where `rp.vnni`, else AVX2, FMA and
    /// F16C.
    pub unsafe fn panel(
        rp: &Repacked,
        p: usize,
        acts: &[Q8Row],
        corr: &[Vec<i32>],
        res: &mut [[f32; PANEL]; 4],
    ) {
        macro_rules! by_count {
            ($k:ident, $t:ident) => {
                match acts.len() {
                    1 => $k::<$t, 1>(rp, p, acts, corr, res),
                    2 => $k::<$t, 2>(rp, p, acts, corr, res),
                    3 => $k::<$t, 3>(rp, p, acts, corr, res),
                    _ => $k::<$t, 4>(rp, p, acts, corr, res),
                }
            };
        }
        macro_rules! by_type {
            ($k:ident) => {
                match rp.ty {
                    GgmlType::Q8_0 => by_count!($k, Q8_0),
                    GgmlType::Q4_0 => by_count!($k, Q4_0),
                    GgmlType::Q4_1 => by_count!($k, Q4_1),
                    GgmlType::Iq4Nl => by_count!($k, IQ4_NL),
                    GgmlType::Q5_0 => by_count!($k, Q5_0),
                    _ => by_count!($k, Q5_1),
                }
            };
        }
        // SAFETY: forwarded (the caller's contract names the features of the kernel chosen).
        unsafe {
            if rp.vnni {
                by_type!(tokens)
            } else {
                by_type!(tokens_avx2)
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tokens<const T: u8, const C: usize>(
        rp: &Repacked,
        p: usize,
        acts: &[Q8Row],
        corr: &[Vec<i32>],
        res: &mut [[f32; PANEL]; 4],
    ) {
        let (nb, parts) = (rp.nb, rp.parts);
        assert!(acts.len() >= C && corr.len() >= C && C <= 4);
        assert!(rp.data.bytes().len() >= (p + 1) * nb * parts.bytes);
        for c in 0..C {
            assert!(acts[c].q.len() >= nb * 32 && acts[c].d.len() >= nb && acts[c].s.len() >= nb);
            assert!(corr[c].len() >= nb);
        }
        let offset = matches!(T, Q4_1 | Q5_1);
        let fifth = matches!(T, Q5_0 | Q5_1);
        let m4 = _mm512_set1_epi8(0x0F);
        let m10 = _mm512_set1_epi8(0x10);
        // IQ4_NL's values + 128 (unsigned), in each 128-bit lane.
        let table = iq4_unsigned_table();
        let mut acc = [_mm512_setzero_ps(); C];
        let mut offs = [_mm512_setzero_ps(); C];
        let base = rp.data.bytes().as_ptr().wrapping_add(p * nb * parts.bytes);
        for b in 0..nb {
            // SAFETY: panel p's block b lies in `data`; the tokens' block b lies in their rows (asserted).
            unsafe {
                let blk = base.add(b * parts.bytes);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast()));
                let mut s: [__m512i; C] =
                    std::array::from_fn(|c| _mm512_set1_epi32(*corr[c].get_unchecked(b)));
                let y: [*const i32; C] =
                    std::array::from_fn(|c| acts[c].q.as_ptr().add(b * 32).cast::<i32>());
                let qs = blk.add(parts.qs);
                if T == Q8_0 {
                    for g in 0..8 {
                        let w = _mm512_loadu_si512(qs.add(g * 64).cast());
                        for c in 0..C {
                            s[c] = _mm512_dpbusd_epi32(
                                s[c],
                                w,
                                _mm512_set1_epi32(y[c].add(g).read_unaligned()),
                            );
                        }
                    }
                } else {
                    let h = if fifth {
                        _mm512_loadu_si512(blk.add(parts.h).cast())
                    } else {
                        _mm512_setzero_si512()
                    };
                    for g in 0..4 {
                        let q = _mm512_loadu_si512(qs.add(g * 64).cast());
                        let mut lo = _mm512_and_si512(q, m4);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                        if fifth {
                            // Byte j's bit g (codes 4g + j) and bit 4 + g (codes 16 + 4g + j) to bit 4.
                            let up = _mm_cvtsi32_si128(4 - g as i32);
                            let down = _mm_cvtsi32_si128(g as i32);
                            lo =
                                _mm512_or_si512(lo, _mm512_and_si512(_mm512_sll_epi16(h, up), m10));
                            hi = _mm512_or_si512(
                                hi,
                                _mm512_and_si512(_mm512_srl_epi16(h, down), m10),
                            );
                        }
                        if T == IQ4_NL {
                            lo = _mm512_shuffle_epi8(table, lo);
                            hi = _mm512_shuffle_epi8(table, hi);
                        }
                        for c in 0..C {
                            s[c] = _mm512_dpbusd_epi32(
                                s[c],
                                lo,
                                _mm512_set1_epi32(y[c].add(g).read_unaligned()),
                            );
                            s[c] = _mm512_dpbusd_epi32(
                                s[c],
                                hi,
                                _mm512_set1_epi32(y[c].add(4 + g).read_unaligned()),
                            );
                        }
                    }
                }
                let mw = if offset {
                    _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(parts.m).cast()))
                } else {
                    _mm512_setzero_ps()
                };
                for c in 0..C {
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*acts[c].d.get_unchecked(b)));
                    acc[c] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s[c]), acc[c]);
                    if offset {
                        offs[c] = _mm512_fmadd_ps(
                            mw,
                            _mm512_set1_ps(*acts[c].s.get_unchecked(b)),
                            offs[c],
                        );
                    }
                }
            }
        }
        for c in 0..C {
            let v = if offset {
                _mm512_add_ps(acc[c], offs[c])
            } else {
                acc[c]
            };
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(res[c].as_mut_ptr(), v) };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tensor::Bytes;
    use rand::{Rng, SeedableRng};

    /// Q4_K, Q6_K and IQ4_XS: every output equals the row kernel's scalar reference bit for bit (quantized
    /// random rows with outliers; a zero token and an extreme one; one to six tokens; partial panels).
    #[test]
    fn repacked_k_decoding_equals_the_row_reference() {
        if !avx2() {
            eprintln!("no AVX2 here: nothing is repacked");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        for ty in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Iq4Xs] {
            for (rows, cols, n) in [(16, 256, 1), (37, 512, 6), (20, 768, 3)] {
                let row_bytes = ty.traits().row_bytes(cols).unwrap();
                let mut raw = vec![0u8; rows * row_bytes];
                for r in raw.chunks_exact_mut(row_bytes) {
                    let mut v: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    v[rng.gen_range(0..cols)] = -7.0;
                    ty.quantize(&v, r, None);
                }
                let w = TensorRef::new("w", vec![rows, cols], ty, Bytes::owned(raw)).unwrap();
                assert!(repacked(&w).is_some());
                let acts: Vec<Q8Row> = (0..n)
                    .map(|t| {
                        let mut x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-3.0..3.0)).collect();
                        if t == 1 {
                            x.fill(0.0);
                        }
                        if t == 2 {
                            x[5] = 1e4;
                        }
                        Q8Row::q8_k(&x)
                    })
                    .collect();
                // The AVX2 kernels everywhere, the AVX-512 VNNI ones where the CPU has them.
                let vnni = super::super::cpu_q8_tile::available();
                for rp in [Repacked::new_with(&w, false), Repacked::new_with(&w, true)]
                    .into_iter()
                    .take(if vnni { 2 } else { 1 })
                {
                    let rp = rp.expect("repacked");
                    let mut out = vec![f32::NAN; n * rows];
                    rp.dot(&acts, &mut out);
                    crate::testing::assert_outputs_bitwise(
                        &out,
                        n,
                        rows,
                        &format!("{ty:?} {rows}×{cols}, vnni {}", rp.vnni),
                        |t, r| super::super::cpu_q8::vec_dot_k_scalar(ty, w.row_data(r), &acts[t]),
                    );
                }
            }
        }
    }

    /// Every output equals the prompt tiles' scalar reference bit for bit: partial panels, one to six
    /// tokens (a group of four and a remainder), random codes and scales, a zero and an extreme token.
    #[test]
    fn repacked_decoding_equals_the_tile_reference() {
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Iq4Nl,
        ];
        let w = TensorRef::from_f32("w", vec![16, 32], &[0.0; 512]).unwrap();
        assert!(repacked(&w).is_none(), "f32 has no repacked kernels");
        if !avx2() {
            eprintln!("no AVX2 here: nothing is repacked");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for &ty in &types {
            for (rows, cols, n) in [(16, 32, 1), (37, 96, 6), (70, 160, 3)] {
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
                let w = TensorRef::new("w", vec![rows, cols], ty, Bytes::owned(raw)).unwrap();
                assert!(repacked(&w).is_some());
                let acts: Vec<Q8Row> = (0..n)
                    .map(|t| {
                        let mut x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
                        if t == 1 {
                            x.fill(0.0);
                        }
                        if t == 2 {
                            x[3] = 1e4;
                        }
                        Q8Row::q8_0(&x)
                    })
                    .collect();
                // The AVX2 kernels everywhere, the AVX-512 VNNI ones where the CPU has them.
                let vnni = super::super::cpu_q8_tile::available();
                for rp in [Repacked::new_with(&w, false), Repacked::new_with(&w, true)]
                    .into_iter()
                    .take(if vnni { 2 } else { 1 })
                {
                    let rp = rp.expect("repacked");
                    let mut out = vec![f32::NAN; n * rows];
                    rp.dot(&acts, &mut out);
                    crate::testing::assert_outputs_bitwise(
                        &out,
                        n,
                        rows,
                        &format!("{ty:?} {rows}×{cols}, vnni {}", rp.vnni),
                        |t, r| {
                            super::super::cpu_q8_tile::tile_dot_scalar(ty, w.row_data(r), &acts[t])
                        },
                    );
                }
            }
        }
    }
}
