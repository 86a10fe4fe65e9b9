//! GPTQ (Frantar et al., 2022), written from reading AutoGPTQ's and GPTQModel's `GPTQ.fasterquant` and
//! `Quantizer.find_params` (and the reference IST-DASLab/gptq), including their quirks:
//!
//! * **Hessian.** `H = 2/n Σ xᵢ xᵢᵀ` over the `n` input rows (tokens) seen so far, kept as a running average
//!   (`H ← H·n/(n+t)`, then `H += (2/(n+t))·XᵀX`), like GPTQModel (which counts tokens, not sequences; GPTQ is
//!   invariant to a positive scale of `H`, so the two conventions give the same result).
//! * **Dead columns.** `H[i,i] == 0` → `H[i,i] = 1` and `W[:,i] = 0`. Per-channel parameters (no groups) are
//!   computed *before* this, as AutoGPTQ does; static-group parameters after it.
//! * **Act-order** (`desc_act`): columns are processed in the order of `diag(H)` descending (a stable sort, so ties
//!   keep their original order). Without static groups the groups are formed in that processing order and
//!   `g_idx[k] = invperm[k] / group_size`; with static groups the parameters are fitted up front on the original
//!   column blocks and `g_idx[k] = k / group_size`.
//! * **Damping.** `H[j,j] += damp · mean(diag H)`; if a Cholesky fails, `damp += damp_auto_increment` is retried
//!   while `damp < 1`, as GPTQModel does (AutoGPTQ would raise).
//! * `U = chol_upper(H⁻¹)`, computed as `L = chol(H)`, `H⁻¹ = L⁻ᵀL⁻¹`, then the Cholesky of that (in f64).
//! * **Sweep.** Blocks of `block_size` columns; inside a block each column is rounded, its error
//!   `e = (w − q)/U[j,j]` is fed back into the block's later columns (`w −= e·U[j, j+1..]`), and at the end of the
//!   block into all later columns with one GEMM (`W[:, i2..] −= E · U[i1..i2, i2..]`).
//! * **Group parameters** (not static) are fitted when a group starts, on the *outer* weight, which holds the lazy
//!   updates of earlier blocks but not the in-block updates of the current one (AutoGPTQ's quirk; it only matters
//!   when `group_size < block_size`).
//! * **Grid** (`find_params`): `xmin = min(row, 0)`, `xmax = max(row, 0)`; symmetric: `xmax = max(|xmin|, xmax)` and
//!   `xmin = −xmax` when `xmin < 0`; both zero → `−1, +1`; `scale = (xmax − xmin)/maxq`; zero
//!   `= (maxq+1)/2` (symmetric) or `round(−xmin/scale)` (asymmetric; always in `0..=maxq`). Rounding is
//!   round-half-to-even like `torch.round`. `q = clamp(round(w/scale) + zero, 0, maxq)`, value `scale·(q − zero)`.
//!
//! Rows of `W` are independent once `U` is known (group parameters are per row too), so the sweep runs chunks of
//! rows in parallel (rayon), each chunk doing its own lazy GEMMs.
//!
//! Two optional deviations, both off by default (GPTQ-exact): `fp16_scales` rounds each scale to f16 before it is
//! used, so the error feedback sees the grid that is stored; `v1_safe_zeros` keeps asymmetric zero points in
//! `1..=maxq` (the GPTQ v1 checkpoint format stores `zero − 1`, see `hf-formats.md` §2.3) by refitting a group whose
//! zero would be 0 with `zero = 1, scale = xmax/(maxq − 1)`.
//!
//! **Loss.** `GptqResult::loss` is GPTQ's summed `Losses`: `Σ (w − q)²/(2·U[j,j]²)` over every weight. In exact
//! arithmetic this equals `½ Σ_rows (W − Ŵ) H_d (W − Ŵ)ᵀ`, with `W` the weight after dead-column zeroing, `Ŵ` the
//! dequantised result and `H_d` the damped Hessian; `rtn_loss` is that same trace for plain round-to-nearest on the
//! same grid (same groups, parameters fitted on the un-updated weights). Both are in the units of `H`
//! (`2/n Σ xxᵀ`), so `loss · n / 2` is the summed squared output error `‖(W − Ŵ)Xᵀ‖²` up to the damping term.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use std::borrow::Cow;

use rayon::prelude::*;

use crate::{Error, Result};

/// The Hessian `H = 2/n Σ x xᵀ` of one linear layer's inputs, accumulated batch by batch.
#[derive(Clone, Debug)]
pub struct Hessian {
    cols: usize,
    /// `[cols, cols]`, symmetric (row-major = column-major).
    h: Vec<f64>,
    nsamples: usize,
}

impl Hessian {
    /// An empty Hessian for a layer with `cols` input features.
    pub fn new(cols: usize) -> Self {
        Self {
            cols,
            h: vec![0.0; cols * cols],
            nsamples: 0,
        }
    }

    /// A Hessian from a full symmetric `[cols, cols]` matrix (already `2/n Σ x xᵀ`-scaled) and its sample count.
    pub fn from_matrix(cols: usize, h: Vec<f64>, nsamples: usize) -> Result<Self> {
        if h.len() != cols * cols {
            return Err(Error::Invalid(format!(
                "GPTQ Hessian: {} values for a {cols}×{cols} matrix",
                h.len()
            )));
        }
        Ok(Self { cols, h, nsamples })
    }

    /// Number of input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of input rows (tokens) accumulated.
    pub fn nsamples(&self) -> usize {
        self.nsamples
    }

    /// The matrix, `[cols, cols]`.
    pub fn matrix(&self) -> &[f64] {
        &self.h
    }

    /// Adds `n_rows` input rows whose Gram matrix `Σ x xᵀ` is `g` (`[cols, cols]`, computed elsewhere: on
    /// a GPU), keeping `H = 2/n Σ x xᵀ` over all rows so far.
    pub fn add_gram(&mut self, g: &[f32], n_rows: usize) -> Result<()> {
        let cols = self.cols;
        if g.len() != cols * cols {
            return Err(Error::Invalid(format!(
                "GPTQ Hessian: a Gram matrix of {} values for {cols} columns",
                g.len()
            )));
        }
        if n_rows == 0 {
            return Ok(());
        }
        let total = self.nsamples + n_rows;
        let beta = self.nsamples as f64 / total as f64;
        let alpha = 2.0 / total as f64;
        for i in 0..cols {
            for j in 0..=i {
                // The lower triangle, mirrored: the two halves of a GPU sum may differ in the last bit.
                let v = self.h[i * cols + j] * beta + alpha * f64::from(g[i * cols + j]);
                self.h[i * cols + j] = v;
                self.h[j * cols + i] = v;
            }
        }
        self.nsamples = total;
        Ok(())
    }

    /// Adds `n_rows` input rows `x` (`[n_rows, cols]`, row-major), keeping `H = 2/n Σ x xᵀ` over all rows so far.
    pub fn add_batch(&mut self, x: &[f32], n_rows: usize) -> Result<()> {
        let cols = self.cols;
        if x.len() != n_rows * cols {
            return Err(Error::Invalid(format!(
                "GPTQ Hessian: batch of {} values is not {n_rows} rows of {cols}",
                x.len()
            )));
        }
        if n_rows == 0 || cols == 0 {
            return Ok(());
        }
        let total = self.nsamples + n_rows;
        let beta = self.nsamples as f64 / total as f64;
        let alpha = 2.0 / total as f64;
        let xr = MatRef::from_row_major_slice(x, n_rows, cols);
        let mut g = Mat::<f32>::zeros(cols, cols);
        // Lower triangle only: H is symmetric.
        triangular::matmul(
            g.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Replace,
            xr.transpose(),
            BlockStructure::Rectangular,
            xr,
            BlockStructure::Rectangular,
            alpha as f32,
            Par::rayon(0),
        );
        let h = &mut self.h;
        for j in 0..cols {
            let col = g.col_as_slice(j);
            for i in j..cols {
                let v = h[i * cols + j] * beta + col[i] as f64;
                h[i * cols + j] = v;
                h[j * cols + i] = v;
            }
        }
        self.nsamples = total;
        Ok(())
    }
}

/// GPTQ settings, in AutoGPTQ's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOptions {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    /// Columns per group (`None`: one group per row, GPTQ's `group_size = -1`).
    pub group_size: Option<usize>,
    /// `desc_act`: process columns by decreasing `diag(H)`.
    pub act_order: bool,
    /// Fit group parameters up front on the original column blocks (only with `group_size`).
    pub static_groups: bool,
    /// Symmetric grid (zero point `(maxq+1)/2`).
    pub sym: bool,
    /// Damping as a fraction of `mean(diag H)` (`damp_percent`; 0.05 as GPTQModel's default, AutoGPTQ used 0.01:
    /// on SmolLM2 with the bundled text 0.05 gives lower KLD on held-out text both in and out of its domain).
    pub damp_percent: f32,
    /// Added to the damping each time a Cholesky fails (GPTQModel's `damp_auto_increment`); 0 = fail at once.
    pub damp_auto_increment: f32,
    /// Columns per lazy-update block (128).
    pub block_size: usize,
    /// Round each scale to f16 before using it, so the sweep sees the stored grid (not in GPTQ; off by default).
    pub fp16_scales: bool,
    /// Keep asymmetric zero points in `1..=maxq` for the GPTQ v1 format (not in GPTQ; off by default).
    pub v1_safe_zeros: bool,
    /// Where the lazy-batch updates run (the in-block sweep and the Cholesky stay on the CPU).
    pub backend: crate::backend::Backend,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            bits: 4,
            group_size: Some(128),
            act_order: false,
            static_groups: false,
            sym: true,
            damp_percent: 0.05,
            damp_auto_increment: 0.01,
            block_size: 128,
            fp16_scales: false,
            v1_safe_zeros: false,
            backend: crate::backend::Backend::Cpu,
        }
    }
}

impl GptqOptions {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("GPTQ options: {m}")));
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return bad(format!("bits must be 2, 3, 4 or 8, not {}", self.bits));
        }
        if self.group_size == Some(0) {
            return bad("group size 0".into());
        }
        if self.block_size == 0 {
            return bad("block size 0".into());
        }
        if !(0.0..1.0).contains(&self.damp_percent) {
            return bad(format!(
                "damp_percent {} is not in [0, 1)",
                self.damp_percent
            ));
        }
        if !(self.damp_auto_increment >= 0.0 && self.damp_auto_increment.is_finite()) {
            return bad(format!(
                "damp_auto_increment {} is negative",
                self.damp_auto_increment
            ));
        }
        Ok(())
    }
}

/// One quantized matrix and what the solver measured.
#[derive(Clone, Debug)]
pub struct GptqResult {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    /// Integer codes `0..=maxq`, `[rows, cols]` in the original column order.
    pub q: Vec<u8>,
    /// `[n_groups, rows]`.
    pub scales: Vec<f32>,
    /// Integer zero points `0..=maxq`, `[n_groups, rows]`.
    pub zeros: Vec<u32>,
    /// Group of each original column (GPTQ's `g_idx`), length `cols`.
    pub g_idx: Vec<u32>,
    pub n_groups: usize,
    /// `scales[g_idx[c], r] · (q[r, c] − zeros[g_idx[c], r])`, `[rows, cols]` (what GPTQ writes back into the layer).
    pub dequantised: Vec<f32>,
    /// GPTQ's summed losses `Σ (w − q)²/(2·U[j,j]²)` (see the module doc); for [`rtn_quantize`] the trace below.
    pub loss: f64,
    /// `½ Σ_rows (W − Ŵ_rtn) H_d (W − Ŵ_rtn)ᵀ` for round-to-nearest on the same grid.
    pub rtn_loss: f64,
    /// The damping fraction that was finally used (larger than asked when a Cholesky had to be retried).
    pub damp_percent: f32,
}

impl GptqResult {
    /// Largest integer code.
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}

/// GPTQ-quantizes `w` (`[rows, cols]` row-major, PyTorch `Linear` layout) against the Hessian of its inputs.
pub fn gptq_quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    gptq_with(w, rows, cols, Cow::Borrowed(h), opts)
}

/// [`gptq_quantize`] taking the Hessian: it is freed as soon as it has been factorised, so the
/// factorisation's working matrices never coexist with it (for a 4864-wide `down_proj`, 189 MB less at
/// the peak).
pub fn gptq_quantize_owned(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: Hessian,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    gptq_with(w, rows, cols, Cow::Owned(h), opts)
}

fn gptq_with(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: Cow<'_, Hessian>,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    let prep = Prepared::new(w, rows, cols, h, opts, true)?;
    let Prepared {
        grid,
        mode,
        gs,
        n_groups,
        perm,
        u,
        damp,
        rtn,
    } = prep;
    let w0 = &rtn.w0;

    // Working weight in processing order.
    let mut wp = vec![0f32; rows * cols];
    for (dst, src) in wp.chunks_exact_mut(cols).zip(w0.chunks_exact(cols)) {
        for (d, &p) in dst.iter_mut().zip(&perm) {
            *d = src[p];
        }
    }
    let mut qp = vec![0u8; rows * cols];

    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = rows
        .div_ceil(2 * threads)
        .clamp(1, 256)
        .max(16.min(rows.max(1)));
    let ctx = SweepCtx {
        cols,
        u: &u,
        grid,
        mode: &mode,
        gs,
        n_groups,
        perm: &perm,
        block: opts.block_size,
    };
    let on_device = match opts.backend {
        crate::backend::Backend::Gpu if rows > 0 && cols > 0 => {
            crate::backend::on_gpu(|g| ctx.sweep_on_device(g, &wp, &mut qp, chunk_rows))
        }
        _ => None,
    };
    let outs: Vec<ChunkOut> = if let Some(outs) = on_device {
        outs
    } else if rows == 0 || cols == 0 {
        Vec::new()
    } else {
        wp.par_chunks_mut(chunk_rows * cols)
            .zip(qp.par_chunks_mut(chunk_rows * cols))
            .enumerate()
            .map(|(ci, (wc, qc))| ctx.sweep(ci * chunk_rows, wc, qc))
            .collect()
    };
    drop(wp);

    let mut loss = 0.0;
    let (scales, zeros) = match &mode {
        GroupMode::PerChannel(t) | GroupMode::Static(t) => (t.scale.clone(), t.zero.clone()),
        GroupMode::Dynamic => {
            let mut scales = vec![0f32; n_groups * rows];
            let mut zeros = vec![0f32; n_groups * rows];
            for (ci, out) in outs.iter().enumerate() {
                let r0 = ci * chunk_rows;
                let nr = out.scale.len() / n_groups.max(1);
                for g in 0..n_groups {
                    scales[g * rows + r0..g * rows + r0 + nr]
                        .copy_from_slice(&out.scale[g * nr..(g + 1) * nr]);
                    zeros[g * rows + r0..g * rows + r0 + nr]
                        .copy_from_slice(&out.zero[g * nr..(g + 1) * nr]);
                }
            }
            (scales, zeros)
        }
    };
    for out in &outs {
        loss += out.loss;
    }

    // Back to the original column order.
    let mut q = vec![0u8; rows * cols];
    for (dst, src) in q.chunks_exact_mut(cols).zip(qp.chunks_exact(cols)) {
        for (&code, &p) in src.iter().zip(&perm) {
            dst[p] = code;
        }
    }
    let g_idx = g_idx_for(&mode, &perm, cols, gs);
    let dequantised = dequantise(&q, &scales, &zeros, &g_idx, rows, cols);
    let rtn_loss = rtn.loss;

    Ok(GptqResult {
        rows,
        cols,
        bits: opts.bits,
        q,
        scales,
        zeros: zeros.iter().map(|&z| z as u32).collect(),
        g_idx,
        n_groups,
        dequantised,
        loss,
        rtn_loss,
        damp_percent: damp,
    })
}

/// Round-to-nearest on exactly the grid [`gptq_quantize`] would use with the same arguments (same groups, same
/// act-order grouping, parameters fitted on the un-updated weights). `loss` and `rtn_loss` are both
/// `½ Σ_rows (W − Ŵ) H_d (W − Ŵ)ᵀ`.
pub fn rtn_quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    let prep = Prepared::new(w, rows, cols, Cow::Borrowed(h), opts, false)?;
    let r = prep.rtn;
    Ok(GptqResult {
        rows,
        cols,
        bits: opts.bits,
        q: r.q,
        scales: r.scales,
        zeros: r.zeros.iter().map(|&z| z as u32).collect(),
        g_idx: r.g_idx,
        n_groups: prep.n_groups,
        dequantised: r.dequantised,
        loss: r.loss,
        rtn_loss: r.loss,
        damp_percent: prep.damp,
    })
}

/// `scale · (q − zero)` with the group of column `c` given by `g_idx[c]`.
fn dequantise(
    q: &[u8],
    scales: &[f32],
    zeros: &[f32],
    g_idx: &[u32],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let g = g_idx[c] as usize * rows + r;
            out[r * cols + c] = scales[g] * (q[r * cols + c] as f32 - zeros[g]);
        }
    }
    out
}

/// The quantization grid of one row of one group.
#[derive(Clone, Copy, Debug)]
struct Grid {
    maxq: f32,
    sym: bool,
    fp16_scales: bool,
    v1_safe_zeros: bool,
}

impl Grid {
    /// `Quantizer.find_params` for one row of values: `(scale, zero)`.
    fn find_params(&self, vals: impl Iterator<Item = f32>) -> (f32, f32) {
        let (mut xmin, mut xmax) = vals.fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if self.sym {
            xmax = xmax.max(xmin.abs());
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        let mut scale = (xmax - xmin) / self.maxq;
        let mut zero = if self.sym {
            (self.maxq + 1.0) / 2.0
        } else {
            (-xmin / scale).round_ties_even().clamp(0.0, self.maxq)
        };
        if self.v1_safe_zeros && !self.sym && zero < 1.0 {
            // Shift the grid one step down and stretch it so that xmax stays representable.
            zero = 1.0;
            scale = xmax / (self.maxq - 1.0);
        }
        if self.fp16_scales {
            let s = half::f16::from_f32(scale).to_f32();
            scale = if s.is_finite() && s > 0.0 {
                s
            } else if s == 0.0 {
                half::f16::from_bits(1).to_f32()
            } else {
                half::f16::MAX.to_f32()
            };
        }
        (scale, zero)
    }

    /// `(code, value)` of `w` on the grid `(scale, zero)`.
    #[inline]
    fn quantize(&self, w: f32, scale: f32, zero: f32) -> (f32, f32) {
        // = (round(w/scale) + zero) clamped to 0..=maxq (zero is a whole number), without a libm call.
        let q = crate::simd::round_even((w / scale).clamp(-zero, self.maxq - zero)) + zero;
        (q, scale * (q - zero))
    }
}

/// Group parameters, `[n_groups, rows]`.
#[derive(Clone, Debug)]
struct ParamTable {
    scale: Vec<f32>,
    zero: Vec<f32>,
}

/// Where a column's group parameters come from.
enum GroupMode {
    /// One group per row, fitted before dead columns are zeroed (AutoGPTQ's order).
    PerChannel(ParamTable),
    /// Fitted up front on the original column blocks; processing position `j` uses group `perm[j] / gs`.
    Static(ParamTable),
    /// Fitted in the sweep when processing position `j` starts a group (`j % gs == 0`).
    Dynamic,
}

/// Everything the sweep and the RTN baseline share.
struct Prepared {
    grid: Grid,
    mode: GroupMode,
    gs: usize,
    n_groups: usize,
    /// Processing position → original column.
    perm: Vec<usize>,
    /// `chol_upper(H⁻¹)` in processing order, row-major `[cols, cols]` (empty when not asked for).
    u: Vec<f32>,
    damp: f32,
    /// Round-to-nearest on the same grid, and its loss against the damped Hessian.
    rtn: Rtn,
}

/// The round-to-nearest baseline, computed before the Hessian is factorised (and possibly freed).
struct Rtn {
    /// The weight after dead-column zeroing, original order.
    w0: Vec<f32>,
    q: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<f32>,
    g_idx: Vec<u32>,
    dequantised: Vec<f32>,
    /// `½ Σ_rows (W − Ŵ) H_d (W − Ŵ)ᵀ` with `H_d` the fixed, damped Hessian.
    loss: f64,
}

impl Prepared {
    /// Everything but the sweep; `factorise`: also `U` (the Hessian, when owned, is freed once factorised).
    fn new(
        w: &[f32],
        rows: usize,
        cols: usize,
        h: Cow<'_, Hessian>,
        opts: &GptqOptions,
        factorise: bool,
    ) -> Result<Self> {
        opts.validate()?;
        if w.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "GPTQ: weight has {} values, not {rows}×{cols}",
                w.len()
            )));
        }
        if h.cols != cols {
            return Err(Error::Invalid(format!(
                "GPTQ: Hessian is {0}×{0} for a weight with {cols} columns",
                h.cols
            )));
        }
        if h.nsamples == 0 {
            return Err(Error::Invalid(
                "GPTQ: the Hessian has no calibration samples".into(),
            ));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "GPTQ: weight value {i} is {}",
                w[i]
            )));
        }
        if h.h.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(
                "GPTQ: the Hessian has non-finite values".into(),
            ));
        }
        let grid = Grid {
            maxq: ((1u32 << opts.bits) - 1) as f32,
            sym: opts.sym,
            fp16_scales: opts.fp16_scales,
            v1_safe_zeros: opts.v1_safe_zeros,
        };
        let gs = opts.group_size.unwrap_or(cols).max(1);
        let n_groups = if cols == 0 { 0 } else { cols.div_ceil(gs) };

        let mut w0 = w.to_vec();
        // One group covering every column, fitted before dead columns are zeroed.
        let per_channel = opts
            .group_size
            .is_none()
            .then(|| fit_table(&w0, rows, cols, cols.max(1), &grid));

        // Dead columns (no input ever reached them): H[i,i] = 1 and the weight column zeroed. The
        // Hessian is not copied: the fixed diagonal is kept apart.
        let mut diag: Vec<f64> = (0..cols).map(|i| h.h[i * cols + i]).collect();
        for (i, d) in diag.iter_mut().enumerate() {
            if *d == 0.0 {
                *d = 1.0;
                for r in 0..rows {
                    w0[r * cols + i] = 0.0;
                }
            }
        }

        let mode = match (per_channel, opts.static_groups) {
            (Some(t), _) => GroupMode::PerChannel(t),
            (None, true) => GroupMode::Static(fit_table(&w0, rows, cols, gs, &grid)),
            (None, false) => GroupMode::Dynamic,
        };

        let mut perm: Vec<usize> = (0..cols).collect();
        if opts.act_order {
            perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        }

        // The RTN baseline and the Hessian part of its loss, while the Hessian is at hand.
        let g_idx = g_idx_for(&mode, &perm, cols, gs);
        let (q, (scales, zeros), dequantised) =
            rtn_on_groups(&w0, rows, cols, &g_idx, n_groups, &grid, &mode);
        let (rtn_h, rtn_col_sq) = trace_parts(&w0, &dequantised, rows, cols, &h.h);
        let (u, damp, diag_add) = if factorise {
            hessian_inverse_upper(h, &diag, cols, &perm, opts)?
        } else {
            let damp = opts.damp_percent;
            let mean = diag.iter().sum::<f64>() / cols.max(1) as f64;
            let add = (0..cols)
                .map(|i| diag[i] - h.h[i * cols + i] + damp as f64 * mean)
                .collect();
            (Vec::new(), damp, add)
        };
        let loss = rtn_h
            + rtn_col_sq
                .iter()
                .zip(&diag_add)
                .map(|(c, a)| c * a)
                .sum::<f64>()
                / 2.0;
        Ok(Self {
            grid,
            mode,
            gs,
            n_groups,
            perm,
            u,
            damp,
            rtn: Rtn {
                w0,
                q,
                scales,
                zeros,
                g_idx,
                dequantised,
                loss,
            },
        })
    }
}

/// `find_params` on every `[row, group]` block of column groups `[t·gs, (t+1)·gs)` of the original order.
fn fit_table(w: &[f32], rows: usize, cols: usize, gs: usize, grid: &Grid) -> ParamTable {
    let n_groups = if cols == 0 { 0 } else { cols.div_ceil(gs) };
    let mut t = ParamTable {
        scale: vec![0.0; n_groups * rows],
        zero: vec![0.0; n_groups * rows],
    };
    for g in 0..n_groups {
        let (c0, c1) = (g * gs, ((g + 1) * gs).min(cols));
        for r in 0..rows {
            let (s, z) = grid.find_params(w[r * cols + c0..r * cols + c1].iter().copied());
            t.scale[g * rows + r] = s;
            t.zero[g * rows + r] = z;
        }
    }
    t
}

/// `chol_upper(H⁻¹)` of `H[perm][:, perm]` damped, retrying with more damping when a factorisation fails.
/// `diag` is `H`'s diagonal after dead-column fixing (it replaces `H[i,i]`). Returns `(U row-major f32, damp
/// used, what fixing and damping added to each diagonal entry in original order)`.
///
/// One Cholesky and one triangular inverse instead of GPTQ's three factorisations (Cholesky, inverse,
/// Cholesky of the inverse): with `J` the exchange matrix and `JHJ = L̃L̃ᵀ`, `H = ŨŨᵀ` for the upper
/// triangular `Ũ = JL̃J`, so `H⁻¹ = Ũ⁻ᵀŨ⁻¹` and, by uniqueness of the Cholesky factor, `U = Ũ⁻¹ = JL̃⁻¹J`.
/// That is 2n³/3 flops instead of 5n³/3, in place, in f64.
pub(crate) fn hessian_inverse_upper(
    h: Cow<'_, Hessian>,
    diag: &[f64],
    cols: usize,
    perm: &[usize],
    opts: &GptqOptions,
) -> Result<(Vec<f32>, f32, Vec<f64>)> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
    use faer::linalg::triangular_inverse::invert_lower_triangular;

    if cols == 0 {
        return Ok((Vec::new(), opts.damp_percent, Vec::new()));
    }
    let n = cols;
    let mean = diag.iter().sum::<f64>() / cols as f64;
    // What fixing and damping add to H's diagonal, read before H may be freed.
    let fixed: Vec<f64> = (0..cols).map(|i| diag[i] - h.h[i * cols + i]).collect();
    let mut h = Some(h);
    let mut damp = opts.damp_percent as f64;
    let par = Par::rayon(0);
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(n, par, Default::default()));
    loop {
        // F = J·H[perm][:, perm]·J + damping: entry (i, j) is H[perm[n-1-i], perm[n-1-j]]. Only the
        // lower triangle is read by the factorisation.
        let Some(hm) = h.as_ref().map(|h| h.h.as_slice()) else {
            unreachable!("the Hessian is kept until a factorisation succeeds")
        };
        let mut f = Mat::<f64>::from_fn(n, n, |i, j| {
            if j > i {
                0.0
            } else {
                let (a, b) = (perm[n - 1 - i], perm[n - 1 - j]);
                if i == j {
                    diag[a] + damp * mean
                } else {
                    hm[a * cols + b]
                }
            }
        });
        let factored = cholesky_in_place(
            f.as_mut(),
            Default::default(),
            par,
            MemStack::new(&mut scratch),
            Default::default(),
        )
        .is_ok()
            && (0..n).all(|i| f[(i, i)].is_finite() && f[(i, i)] > 0.0);
        if factored {
            // An owned Hessian is not needed any more: freed before the inverse is allocated.
            drop(h.take());
            let mut inv = Mat::<f64>::zeros(n, n);
            invert_lower_triangular(inv.as_mut(), f.as_ref(), par);
            drop(f);
            // U[i, j] = L̃⁻¹[n-1-i, n-1-j] for j ≥ i.
            let mut u = vec![0f32; n * n];
            let mut ok = true;
            for i in 0..n {
                for j in i..n {
                    let v = inv[(n - 1 - i, n - 1 - j)];
                    ok &= v.is_finite();
                    u[i * n + j] = v as f32;
                }
                ok &= u[i * n + i] > 0.0;
            }
            if ok {
                let diag_add = fixed.iter().map(|f| f + damp * mean).collect();
                return Ok((u, damp as f32, diag_add));
            }
        }
        let inc = opts.damp_auto_increment as f64;
        if inc > 0.0 && damp + inc < 1.0 {
            damp += inc;
        } else {
            return Err(Error::Invalid(format!(
                "GPTQ: the Hessian is not positive definite even with damp_percent {damp:.4}; \
                 use more calibration samples or a larger damp_percent"
            )));
        }
    }
}

/// What one chunk of rows produced.
struct ChunkOut {
    /// Dynamic groups only: `[n_groups, nr]`.
    scale: Vec<f32>,
    zero: Vec<f32>,
    loss: f64,
}

struct SweepCtx<'a> {
    cols: usize,
    u: &'a [f32],
    grid: Grid,
    mode: &'a GroupMode,
    gs: usize,
    n_groups: usize,
    perm: &'a [usize],
    block: usize,
}

/// Tests cap the rows kept on the device at once, to run several device chunks on small matrices.
#[cfg(test)]
pub(crate) static DEVICE_ROWS_CAP: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// A chunk of rows' state through the sweep.
struct ChunkState {
    /// Rows in the chunk.
    nr: usize,
    dyn_scale: Vec<f32>,
    dyn_zero: Vec<f32>,
    w1: Vec<f32>,
    /// The block's scaled errors `[nr, block]`.
    err: Vec<f32>,
    loss: f64,
}

impl ChunkState {
    fn finish(self) -> ChunkOut {
        ChunkOut {
            scale: self.dyn_scale,
            zero: self.dyn_zero,
            loss: self.loss / 2.0,
        }
    }
}

impl SweepCtx<'_> {
    fn state(&self, nr: usize) -> ChunkState {
        let bs = self.block.min(self.cols);
        let dynamic = matches!(self.mode, GroupMode::Dynamic);
        let groups = if dynamic { self.n_groups * nr } else { 0 };
        ChunkState {
            nr,
            dyn_scale: vec![0f32; groups],
            dyn_zero: vec![0f32; groups],
            w1: vec![0f32; bs],
            err: vec![0f32; nr * bs],
            loss: 0.0,
        }
    }

    /// The last column (exclusive) the block `i1..i2` reads: `i2`, or further when a dynamic group starting
    /// inside it is fitted on columns beyond it.
    fn reads_to(&self, i1: usize, i2: usize) -> usize {
        if !matches!(self.mode, GroupMode::Dynamic) {
            return i2;
        }
        (i1..i2)
            .filter(|j| j % self.gs == 0)
            .map(|j| (j + self.gs).min(self.cols))
            .fold(i2, usize::max)
    }

    /// The in-block part of the sweep for columns `i1..i2` of the chunk's rows (global rows `r0..`):
    /// `src` holds each row's columns from `base` on with row stride `stride` (they must reach
    /// [`SweepCtx::reads_to`]); codes go to `qc` (`[nr, cols]`), scaled errors to `st.err`.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        st: &mut ChunkState,
        r0: usize,
        src: &[f32],
        stride: usize,
        base: usize,
        (i1, i2): (usize, usize),
        qc: &mut [u8],
    ) {
        let cols = self.cols;
        let nr = st.nr;
        let bs = self.block.min(cols);
        let count = i2 - i1;
        let total_rows = match self.mode {
            GroupMode::PerChannel(t) | GroupMode::Static(t) => t.scale.len() / self.n_groups,
            GroupMode::Dynamic => 0,
        };
        for r in 0..nr {
            let row = &src[r * stride..];
            st.w1[..count].copy_from_slice(&row[i1 - base..i2 - base]);
            for i in 0..count {
                let j = i1 + i;
                let (scale, zero) = match self.mode {
                    GroupMode::PerChannel(t) => (t.scale[r0 + r], t.zero[r0 + r]),
                    GroupMode::Static(t) => {
                        let g = self.perm[j] / self.gs;
                        (
                            t.scale[g * total_rows + r0 + r],
                            t.zero[g * total_rows + r0 + r],
                        )
                    }
                    GroupMode::Dynamic => {
                        let g = j / self.gs;
                        if j % self.gs == 0 {
                            // Fitted on the outer weight (lazy updates of earlier blocks only).
                            let end = (j + self.gs).min(cols);
                            let (s, z) = self
                                .grid
                                .find_params(row[j - base..end - base].iter().copied());
                            st.dyn_scale[g * nr + r] = s;
                            st.dyn_zero[g * nr + r] = z;
                        }
                        (st.dyn_scale[g * nr + r], st.dyn_zero[g * nr + r])
                    }
                };
                let wv = st.w1[i];
                let (code, qv) = self.grid.quantize(wv, scale, zero);
                qc[r * cols + j] = code as u8;
                let d = self.u[j * cols + j];
                let e = (wv - qv) / d;
                st.loss += (e as f64) * (e as f64);
                let urow = &self.u[j * cols + j + 1..j * cols + i2];
                for (x, &uu) in st.w1[i + 1..count].iter_mut().zip(urow) {
                    *x -= e * uu;
                }
                st.err[r * bs + i] = e;
            }
        }
    }

    /// GPTQ's column sweep over rows `r0..r0+nr` (`wc`, `qc` hold those rows in processing order), the
    /// lazy-batch updates on the CPU.
    fn sweep(&self, r0: usize, wc: &mut [f32], qc: &mut [u8]) -> ChunkOut {
        let cols = self.cols;
        let nr = wc.len() / cols;
        let bs = self.block.min(cols);
        let mut st = self.state(nr);
        let mut i1 = 0;
        while i1 < cols {
            let i2 = (i1 + bs).min(cols);
            let count = i2 - i1;
            self.block(&mut st, r0, wc, cols, 0, (i1, i2), qc);
            if i2 < cols {
                // Lazy batch update: W[:, i2..] -= E · U[i1..i2, i2..].
                let e_mat = MatRef::from_row_major_slice_with_stride(&st.err, nr, count, bs);
                let u_blk = MatRef::from_row_major_slice_with_stride(
                    &self.u[i1 * cols + i2..],
                    count,
                    cols - i2,
                    cols,
                );
                let w_rest = row_major_mut(&mut wc[i2..], nr, cols - i2, cols);
                matmul(w_rest, Accum::Add, e_mat, u_blk, -1.0f32, Par::Seq);
            }
            i1 = i2;
        }
        st.finish()
    }

    /// The sweep of every row with the lazy-batch updates on the GPU: rows in device chunks (whole
    /// multiples of `chunk_rows`) whose transposed weight stays on the device; per block the block's columns
    /// come back, the in-block sweep runs on the CPU (chunks of `chunk_rows` in parallel) and one GEMM
    /// updates every later column there. One [`ChunkOut`] per `chunk_rows` rows, as [`SweepCtx::sweep`]'s.
    fn sweep_on_device(
        &self,
        gpu: &crate::backend::wgpu::Gpu,
        wp: &[f32],
        qp: &mut [u8],
        chunk_rows: usize,
    ) -> Result<Vec<ChunkOut>> {
        let cols = self.cols;
        let rows = wp.len() / cols.max(1);
        let bs = self.block.min(cols);
        let fit = gpu.lazy_rows_max(cols);
        #[cfg(test)]
        let fit = match DEVICE_ROWS_CAP.load(std::sync::atomic::Ordering::Relaxed) {
            0 => fit,
            cap => fit.min(cap),
        };
        let per_device = (fit / chunk_rows).max(1) * chunk_rows;
        let mut outs = Vec::new();
        for d0 in (0..rows).step_by(per_device) {
            let dn = per_device.min(rows - d0);
            let lazy = gpu.lazy_columns(&wp[d0 * cols..(d0 + dn) * cols], dn, cols)?;
            let mut states: Vec<ChunkState> = (0..dn)
                .step_by(chunk_rows)
                .map(|c| self.state(chunk_rows.min(dn - c)))
                .collect();
            let qd = &mut qp[d0 * cols..(d0 + dn) * cols];
            let mut i1 = 0;
            let mut width = self.reads_to(0, bs.min(cols));
            let mut src = gpu.lazy_read(&lazy, 0, width)?;
            while i1 < cols {
                let i2 = (i1 + bs).min(cols);
                let count = i2 - i1;
                let src_ref = &src;
                states
                    .par_iter_mut()
                    .zip(qd.par_chunks_mut(chunk_rows * cols))
                    .enumerate()
                    .for_each(|(ci, (st, qc))| {
                        let at = ci * chunk_rows;
                        let rows_src = &src_ref[at * width..];
                        self.block(st, d0 + at, rows_src, width, i1, (i1, i2), qc);
                    });
                if i2 < cols {
                    let mut e = vec![0f32; dn * count];
                    for (ci, st) in states.iter().enumerate() {
                        for r in 0..st.nr {
                            let dst = (ci * chunk_rows + r) * count;
                            e[dst..dst + count].copy_from_slice(&st.err[r * bs..r * bs + count]);
                        }
                    }
                    let n2 = (i2 + bs).min(cols);
                    let to = self.reads_to(i2, n2);
                    width = to - i2;
                    let u_rows = &self.u[i1 * cols..i2 * cols];
                    src = gpu.lazy_update_read(&lazy, u_rows, i2, &e, (i2, to))?;
                }
                i1 = i2;
            }
            outs.extend(states.into_iter().map(ChunkState::finish));
        }
        Ok(outs)
    }
}

/// A row-major `[nrows, ncols]` view with row stride `row_stride`. (faer 0.22's own
/// `MatMut::from_row_major_slice_with_stride_mut` builds a column-major view by mistake, so it is not used.)
pub(crate) fn row_major_mut(
    slice: &mut [f32],
    nrows: usize,
    ncols: usize,
    row_stride: usize,
) -> MatMut<'_, f32> {
    MatMut::from_column_major_slice_with_stride_mut(slice, ncols, nrows, row_stride).transpose_mut()
}

/// GPTQ's `g_idx` (original column → group).
fn g_idx_for(mode: &GroupMode, perm: &[usize], cols: usize, gs: usize) -> Vec<u32> {
    match mode {
        GroupMode::PerChannel(_) => vec![0; cols],
        GroupMode::Static(_) => (0..cols).map(|k| (k / gs) as u32).collect(),
        GroupMode::Dynamic => {
            let mut g = vec![0u32; cols];
            for (j, &k) in perm.iter().enumerate() {
                g[k] = (j / gs) as u32;
            }
            g
        }
    }
}

/// Round-to-nearest with groups given by `g_idx`: `(codes, (scales, zeros), dequantised)`.
#[allow(clippy::type_complexity)]
fn rtn_on_groups(
    w0: &[f32],
    rows: usize,
    cols: usize,
    g_idx: &[u32],
    n_groups: usize,
    grid: &Grid,
    mode: &GroupMode,
) -> (Vec<u8>, (Vec<f32>, Vec<f32>), Vec<f32>) {
    let (scales, zeros) = match mode {
        GroupMode::PerChannel(t) | GroupMode::Static(t) => (t.scale.clone(), t.zero.clone()),
        GroupMode::Dynamic => {
            let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_groups];
            for (k, &g) in g_idx.iter().enumerate() {
                members[g as usize].push(k);
            }
            let mut scales = vec![0f32; n_groups * rows];
            let mut zeros = vec![0f32; n_groups * rows];
            for (g, m) in members.iter().enumerate() {
                for r in 0..rows {
                    let row = &w0[r * cols..(r + 1) * cols];
                    let (s, z) = grid.find_params(m.iter().map(|&k| row[k]));
                    scales[g * rows + r] = s;
                    zeros[g * rows + r] = z;
                }
            }
            (scales, zeros)
        }
    };
    let mut q = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let g = g_idx[c] as usize * rows + r;
            q[r * cols + c] = grid.quantize(w0[r * cols + c], scales[g], zeros[g]).0 as u8;
        }
    }
    let deq = dequantise(&q, &scales, &zeros, g_idx, rows, cols);
    (q, (scales, zeros), deq)
}

/// `½ Σ_rows (W − Ŵ) (H + diag(diag_add)) (W − Ŵ)ᵀ`.
#[cfg(test)]
fn trace_loss(
    w0: &[f32],
    deq: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    diag_add: &[f64],
) -> f64 {
    let (t, col_sq) = trace_parts(w0, deq, rows, cols, h);
    t + col_sq.iter().zip(diag_add).map(|(c, a)| c * a).sum::<f64>() / 2.0
}

/// `(½ Σ_rows (W − Ŵ) H (W − Ŵ)ᵀ, Σ_rows (W − Ŵ)[·, c]² per column)`: the product with `H` as an f32 GEMM
/// (it is `rows·cols²` multiply-adds, as much as the solve itself in f64), each dot product summed in f64.
fn trace_parts(w0: &[f32], deq: &[f32], rows: usize, cols: usize, h: &[f64]) -> (f64, Vec<f64>) {
    let mut col_sq = vec![0f64; cols];
    if rows == 0 || cols == 0 {
        return (0.0, col_sq);
    }
    let delta: Vec<f32> = w0.iter().zip(deq).map(|(&a, &b)| a - b).collect();
    let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    let dm = MatRef::from_row_major_slice(&delta, rows, cols);
    let hm = MatRef::from_row_major_slice(&h32, cols, cols);
    let mut prod = Mat::<f32>::zeros(rows, cols);
    matmul(prod.as_mut(), Accum::Replace, dm, hm, 1.0, Par::rayon(0));
    drop(h32);
    let mut sum = 0.0;
    for c in 0..cols {
        let pc = prod.col_as_slice(c);
        for r in 0..rows {
            let d = delta[r * cols + c] as f64;
            sum += pc[r] as f64 * d;
            col_sq[c] += d * d;
        }
    }
    (sum / 2.0, col_sq)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use faer::linalg::solvers::DenseSolveCore;
    use faer::Side;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn normal(rng: &mut StdRng) -> f32 {
        // Box–Muller.
        let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
        let u2: f32 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    fn random_weight(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|_| 0.05 * normal(rng)).collect()
    }

    /// `x = z · A` with `A = I + mixing`, plus per-column scales: correlated inputs of unequal variance.
    fn correlated_inputs(rng: &mut StdRng, n: usize, cols: usize) -> Vec<f32> {
        let a: Vec<f32> = (0..cols * cols)
            .map(|i| {
                let m = 1.5 * normal(rng) / (cols as f32).sqrt();
                if i / cols == i % cols {
                    1.0 + m
                } else {
                    m
                }
            })
            .collect();
        let colscale: Vec<f32> = (0..cols).map(|_| 0.2 + 2.0 * rng.gen::<f32>()).collect();
        let z: Vec<f32> = (0..n * cols).map(|_| normal(rng)).collect();
        let mut x = vec![0f32; n * cols];
        matmul(
            MatMut::from_row_major_slice_mut(&mut x, n, cols),
            Accum::Replace,
            MatRef::from_row_major_slice(&z, n, cols),
            MatRef::from_row_major_slice(&a, cols, cols),
            1.0,
            Par::Seq,
        );
        for row in x.chunks_exact_mut(cols) {
            for (v, s) in row.iter_mut().zip(&colscale) {
                *v *= s;
            }
        }
        x
    }

    /// `‖(W − Ŵ) Xᵀ‖²`, computed from the activations directly.
    fn output_error(w: &[f32], deq: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
        let n = x.len() / cols;
        let mut sum = 0.0;
        for r in 0..rows {
            let d: Vec<f64> = (0..cols)
                .map(|c| w[r * cols + c] as f64 - deq[r * cols + c] as f64)
                .collect();
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let y: f64 = d.iter().zip(xt).map(|(a, &b)| a * b as f64).sum();
                sum += y * y;
            }
        }
        sum
    }

    fn hessian_of(x: &[f32], cols: usize, batch: usize) -> Hessian {
        let mut h = Hessian::new(cols);
        for chunk in x.chunks(batch * cols) {
            h.add_batch(chunk, chunk.len() / cols).unwrap();
        }
        h
    }

    fn opts(bits: u8, gs: Option<usize>, act_order: bool, sym: bool) -> GptqOptions {
        GptqOptions {
            bits,
            group_size: gs,
            act_order,
            sym,
            ..GptqOptions::default()
        }
    }

    fn check_reproduces(res: &GptqResult) {
        let (rows, cols) = (res.rows, res.cols);
        let maxq = res.maxq();
        assert_eq!(res.q.len(), rows * cols);
        assert_eq!(res.scales.len(), res.n_groups * rows);
        assert_eq!(res.zeros.len(), res.n_groups * rows);
        assert_eq!(res.g_idx.len(), cols);
        assert!(res.zeros.iter().all(|&z| z <= maxq));
        assert!(res.q.iter().all(|&q| (q as u32) <= maxq));
        assert!(res.scales.iter().all(|&s| s.is_finite() && s > 0.0));
        for r in 0..rows {
            for c in 0..cols {
                let g = res.g_idx[c] as usize;
                assert!(g < res.n_groups);
                let s = res.scales[g * rows + r];
                let z = res.zeros[g * rows + r] as f32;
                let v = s * (res.q[r * cols + c] as f32 - z);
                assert_eq!(
                    v.to_bits(),
                    res.dequantised[r * cols + c].to_bits(),
                    "r{r} c{c}"
                );
            }
        }
    }

    /// The one-factorisation `chol_upper(H⁻¹)` equals GPTQ's three-step one (Cholesky, inverse, Cholesky of
    /// the inverse), with act-order permutation and damping, and `UᵀU` is the damped, permuted `H⁻¹`.
    #[test]
    fn inverse_cholesky_factor_matches_three_factorisations() {
        let mut rng = StdRng::seed_from_u64(7);
        let (n, cols) = (300, 96);
        let x: Vec<f32> = (0..n * cols).map(|_| normal(&mut rng)).collect();
        let h = hessian_of(&x, cols, 64);
        let mut perm: Vec<usize> = (0..cols).collect();
        perm.reverse();
        perm.swap(3, 50);
        let opts = GptqOptions::default();
        let diag: Vec<f64> = (0..cols).map(|i| h.matrix()[i * cols + i]).collect();
        let (u, damp, _) =
            hessian_inverse_upper(Cow::Borrowed(&h), &diag, cols, &perm, &opts).unwrap();
        let hm = h.matrix();
        let mean = (0..cols).map(|i| hm[i * cols + i]).sum::<f64>() / cols as f64;
        let hp = Mat::<f64>::from_fn(cols, cols, |i, j| {
            hm[perm[i] * cols + perm[j]] + if i == j { damp as f64 * mean } else { 0.0 }
        });
        let inv = hp.llt(Side::Lower).unwrap().inverse();
        let l2 = inv.llt(Side::Lower).unwrap();
        let l2 = l2.L();
        for i in 0..cols {
            for j in 0..cols {
                let want = if j >= i { l2[(j, i)] } else { 0.0 };
                let got = u[i * cols + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                    "U[{i},{j}] = {got}, three-step {want}"
                );
            }
        }
    }

    #[test]
    fn hessian_matches_naive_and_is_batch_invariant() {
        let mut rng = StdRng::seed_from_u64(1);
        let (n, cols) = (37, 24);
        let x: Vec<f32> = (0..n * cols).map(|_| normal(&mut rng)).collect();
        let h1 = hessian_of(&x, cols, n);
        let h2 = hessian_of(&x, cols, 5);
        assert_eq!(h1.nsamples(), n);
        assert_eq!(h2.nsamples(), n);
        for i in 0..cols {
            for j in 0..cols {
                let naive: f64 = (0..n)
                    .map(|t| x[t * cols + i] as f64 * x[t * cols + j] as f64)
                    .sum::<f64>()
                    * 2.0
                    / n as f64;
                let a = h1.matrix()[i * cols + j];
                let b = h2.matrix()[i * cols + j];
                assert!(
                    (a - naive).abs() < 1e-5 * (1.0 + naive.abs()),
                    "{a} {naive}"
                );
                assert!(
                    (b - naive).abs() < 1e-5 * (1.0 + naive.abs()),
                    "{b} {naive}"
                );
                assert_eq!(a, h1.matrix()[j * cols + i]);
            }
        }
        assert!(h1.clone().add_batch(&x[..5], 1).is_err());
    }

    #[test]
    fn identity_hessian_gives_rtn_codes() {
        let mut rng = StdRng::seed_from_u64(2);
        let (rows, cols) = (16, 256);
        let w = random_weight(&mut rng, rows, cols);
        let mut hm = vec![0.0; cols * cols];
        for i in 0..cols {
            hm[i * cols + i] = 2.0;
        }
        let h = Hessian::from_matrix(cols, hm, 100).unwrap();
        for sym in [true, false] {
            for gs in [Some(128), Some(32), None] {
                for act_order in [false, true] {
                    let o = opts(4, gs, act_order, sym);
                    let g = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
                    let r = rtn_quantize(&w, rows, cols, &h, &o).unwrap();
                    assert_eq!(g.q, r.q, "sym {sym} gs {gs:?} act {act_order}");
                    assert_eq!(g.scales, r.scales);
                    assert_eq!(g.zeros, r.zeros);
                    assert_eq!(g.g_idx, r.g_idx);
                    assert!((g.loss - g.rtn_loss).abs() <= 1e-6 * g.rtn_loss);
                    // With equal diag(H) the stable act-order sort is the identity.
                    assert_eq!(
                        g.g_idx,
                        (0..cols)
                            .map(|k| (k / gs.unwrap_or(cols)) as u32)
                            .collect::<Vec<_>>()
                    );
                }
            }
        }
        // Uncorrelated inputs of equal variance: nearly the same codes as RTN.
        let x: Vec<f32> = (0..8192 * cols).map(|_| normal(&mut rng)).collect();
        let h = hessian_of(&x, cols, 1024);
        let o = opts(4, Some(128), false, true);
        let g = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
        let r = rtn_quantize(&w, rows, cols, &h, &o).unwrap();
        let same = g.q.iter().zip(&r.q).filter(|(a, b)| a == b).count();
        assert!(same as f64 > 0.85 * (rows * cols) as f64, "{same}");
    }

    #[test]
    fn gptq_beats_rtn_on_correlated_inputs() {
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, cols, n) = (64, 256, 2048);
        let w = random_weight(&mut rng, rows, cols);
        let x = correlated_inputs(&mut rng, n, cols);
        let h = hessian_of(&x, cols, 512);
        for bits in [4u8, 3] {
            for act_order in [false, true] {
                for sym in [true, false] {
                    let o = opts(bits, Some(128), act_order, sym);
                    let g = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
                    let r = rtn_quantize(&w, rows, cols, &h, &o).unwrap();
                    check_reproduces(&g);
                    check_reproduces(&r);
                    let eg = output_error(&w, &g.dequantised, &x, rows, cols);
                    let er = output_error(&w, &r.dequantised, &x, rows, cols);
                    eprintln!(
                        "bits {bits} act {act_order} sym {sym}: gptq {eg:.4} rtn {er:.4} ratio {:.3} loss {:.5} rtn_loss {:.5}",
                        eg / er,
                        g.loss,
                        g.rtn_loss
                    );
                    assert!(eg < 0.7 * er, "gptq {eg} rtn {er}");
                    // The solver's own measures agree with the output error.
                    assert!((r.loss - g.rtn_loss).abs() <= 1e-9 * r.loss);
                    assert!(g.loss < 0.7 * g.rtn_loss);
                    // loss = ½ tr((W−Ŵ) H_d (W−Ŵ)ᵀ) (exact in exact arithmetic).
                    let mean =
                        (0..cols).map(|i| h.matrix()[i * cols + i]).sum::<f64>() / cols as f64;
                    let add = vec![g.damp_percent as f64 * mean; cols];
                    let tr = trace_loss(&w, &g.dequantised, rows, cols, h.matrix(), &add);
                    assert!(
                        (tr - g.loss).abs() < 1e-3 * tr,
                        "trace {tr} loss {}",
                        g.loss
                    );
                    // And to the output error up to the damping term.
                    let undamped =
                        trace_loss(&w, &g.dequantised, rows, cols, h.matrix(), &vec![0.0; cols]);
                    assert!((undamped * n as f64 - eg).abs() < 1e-3 * eg);
                }
            }
        }
    }

    #[test]
    fn block_size_does_not_change_the_result() {
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, cols) = (24, 200);
        let w = random_weight(&mut rng, rows, cols);
        let x = correlated_inputs(&mut rng, 1024, cols);
        let h = hessian_of(&x, cols, 1024);
        for (gs, act) in [(Some(128), false), (None, true), (Some(64), true)] {
            let mut o = opts(4, gs, act, false);
            o.static_groups = gs == Some(64);
            let a = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
            o.block_size = 16;
            let b = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
            // GPTQ's group fitting depends on the block size when gs < block (the quirk), so only compare
            // where the groups start on block boundaries in both runs.
            let same = a.q.iter().zip(&b.q).filter(|(x, y)| x == y).count();
            assert!(
                same as f64 > 0.995 * (rows * cols) as f64,
                "{gs:?} {act}: {same}"
            );
            assert!(
                (a.loss - b.loss).abs() < 1e-3 * a.loss,
                "{} {}",
                a.loss,
                b.loss
            );
        }
    }

    #[test]
    fn dequantised_reproduces_for_every_layout() {
        let mut rng = StdRng::seed_from_u64(5);
        let (rows, cols) = (8, 96);
        let w = random_weight(&mut rng, rows, cols);
        let x = correlated_inputs(&mut rng, 300, cols);
        let h = hessian_of(&x, cols, 300);
        for bits in [2u8, 3, 4, 8] {
            for gs in [None, Some(32), Some(64), Some(40)] {
                for act_order in [false, true] {
                    for static_groups in [false, true] {
                        for sym in [false, true] {
                            for (fp16_scales, v1_safe_zeros) in [(false, false), (true, true)] {
                                let o = GptqOptions {
                                    bits,
                                    group_size: gs,
                                    act_order,
                                    static_groups,
                                    sym,
                                    fp16_scales,
                                    v1_safe_zeros,
                                    block_size: 32,
                                    ..GptqOptions::default()
                                };
                                let g = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
                                check_reproduces(&g);
                                assert_eq!(g.n_groups, cols.div_ceil(gs.unwrap_or(cols)));
                                if fp16_scales {
                                    assert!(g
                                        .scales
                                        .iter()
                                        .all(|&s| half::f16::from_f32(s).to_f32() == s));
                                }
                                if v1_safe_zeros && !sym {
                                    assert!(g.zeros.iter().all(|&z| z >= 1));
                                }
                                if sym {
                                    assert!(g.zeros.iter().all(|&z| z == 1 << (g.bits - 1)));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dead_columns_are_zero() {
        let mut rng = StdRng::seed_from_u64(6);
        let (rows, cols) = (16, 128);
        let w = random_weight(&mut rng, rows, cols);
        let mut x = correlated_inputs(&mut rng, 512, cols);
        let dead = [0usize, 5, 77, 127];
        for row in x.chunks_exact_mut(cols) {
            for &d in &dead {
                row[d] = 0.0;
            }
        }
        let h = hessian_of(&x, cols, 512);
        for act_order in [false, true] {
            for sym in [false, true] {
                let o = opts(4, Some(32), act_order, sym);
                let g = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
                check_reproduces(&g);
                assert!(g.loss.is_finite() && g.rtn_loss.is_finite());
                for r in 0..rows {
                    for &d in &dead {
                        assert_eq!(g.dequantised[r * cols + d], 0.0);
                    }
                }
                if act_order {
                    // Dead columns have diag 1 after the fix; live ones are larger here, so they come last.
                    let live_groups: Vec<u32> = (0..cols)
                        .filter(|c| !dead.contains(c))
                        .map(|c| g.g_idx[c])
                        .collect();
                    assert!(dead.iter().all(|&d| g.g_idx[d] == 3));
                    assert!(live_groups.iter().filter(|&&t| t == 3).count() == 28);
                }
            }
        }
        // A Hessian from fewer samples than columns (rank deficient) still solves thanks to the damping.
        let h = hessian_of(&x[..20 * cols], cols, 20);
        let g = gptq_quantize(&w, rows, cols, &h, &opts(4, Some(128), true, true)).unwrap();
        check_reproduces(&g);
    }

    #[test]
    fn act_order_g_idx_is_a_valid_mapping() {
        let mut rng = StdRng::seed_from_u64(7);
        let (rows, cols, gs) = (8, 160, 32);
        let w = random_weight(&mut rng, rows, cols);
        let x = correlated_inputs(&mut rng, 512, cols);
        let h = hessian_of(&x, cols, 512);
        let diag: Vec<f64> = (0..cols).map(|i| h.matrix()[i * cols + i]).collect();

        let g = gptq_quantize(&w, rows, cols, &h, &opts(4, Some(gs), true, true)).unwrap();
        assert_eq!(g.n_groups, 5);
        for t in 0..5u32 {
            assert_eq!(g.g_idx.iter().filter(|&&x| x == t).count(), gs);
        }
        // Groups follow diag(H) descending: every column of group t has a larger diagonal than any of group t+1.
        for a in 0..cols {
            for b in 0..cols {
                if g.g_idx[a] < g.g_idx[b] {
                    assert!(diag[a] >= diag[b]);
                }
            }
        }
        assert_ne!(
            g.g_idx,
            (0..cols).map(|k| (k / gs) as u32).collect::<Vec<_>>()
        );

        // Static groups: identity g_idx, groups fitted on the original blocks.
        let mut o = opts(4, Some(gs), true, true);
        o.static_groups = true;
        let s = gptq_quantize(&w, rows, cols, &h, &o).unwrap();
        assert_eq!(
            s.g_idx,
            (0..cols).map(|k| (k / gs) as u32).collect::<Vec<_>>()
        );
        check_reproduces(&s);
        let r = rtn_quantize(&w, rows, cols, &h, &o).unwrap();
        assert_eq!(s.scales, r.scales);
        assert!(s.loss < r.loss);

        // A partial last group (cols not a multiple of gs).
        let g = gptq_quantize(
            &w[..rows * 150],
            rows,
            150,
            &hessian_of(
                &x.chunks_exact(cols)
                    .flat_map(|r| r[..150].to_vec())
                    .collect::<Vec<_>>(),
                150,
                512,
            ),
            &opts(4, Some(gs), true, false),
        )
        .unwrap();
        assert_eq!(g.n_groups, 5);
        assert_eq!(g.g_idx.iter().filter(|&&x| x == 4).count(), 150 - 4 * gs);
        check_reproduces(&g);
    }

    #[test]
    fn two_and_eight_bits_run() {
        let mut rng = StdRng::seed_from_u64(8);
        let (rows, cols) = (32, 256);
        let w = random_weight(&mut rng, rows, cols);
        let x = correlated_inputs(&mut rng, 1024, cols);
        let h = hessian_of(&x, cols, 1024);
        let mut losses = Vec::new();
        for bits in [2u8, 8] {
            for sym in [true, false] {
                let g =
                    gptq_quantize(&w, rows, cols, &h, &opts(bits, Some(128), true, sym)).unwrap();
                check_reproduces(&g);
                assert!(g.loss.is_finite());
                assert!(
                    g.loss <= g.rtn_loss * 1.0001,
                    "{bits} {sym}: {} {}",
                    g.loss,
                    g.rtn_loss
                );
                if bits == 8 {
                    let max_err = w
                        .iter()
                        .zip(&g.dequantised)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(max_err < 0.02, "{max_err}");
                    assert!(g.q.iter().any(|&q| q > 200) && g.q.iter().any(|&q| q < 50));
                }
                losses.push(g.loss);
            }
        }
        assert!(losses[2] < 0.01 * losses[0]);
    }

    #[test]
    fn retries_damping_then_fails_clearly() {
        let cols = 4;
        // Indefinite: eigenvalues 3 and -1 on the first two columns.
        let mut hm = vec![0.0; 16];
        hm[0] = 1.0;
        hm[1] = 2.0;
        hm[4] = 2.0;
        hm[5] = 1.0;
        hm[10] = 1.0;
        hm[15] = 1.0;
        let h = Hessian::from_matrix(cols, hm, 10).unwrap();
        let w = vec![0.1, -0.2, 0.3, 0.05, 0.4, 0.0, -0.1, 0.2];
        let mut o = opts(4, None, false, true);
        o.damp_percent = 0.0;
        o.damp_auto_increment = 0.0;
        let e = gptq_quantize(&w, 2, cols, &h, &o).unwrap_err();
        assert!(e.to_string().contains("not positive definite"), "{e}");
        // mean(diag) = 1, so damp > 1 is needed: unreachable below 1 → error after retries too.
        o.damp_auto_increment = 0.05;
        assert!(gptq_quantize(&w, 2, cols, &h, &o).is_err());
        // Mildly indefinite: a few increments fix it.
        let mut hm = vec![0.0; 16];
        hm[0] = 1.0;
        hm[1] = 1.17;
        hm[4] = 1.17;
        hm[5] = 1.0;
        hm[10] = 1.0;
        hm[15] = 1.0;
        let h = Hessian::from_matrix(cols, hm, 10).unwrap();
        let g = gptq_quantize(&w, 2, cols, &h, &o).unwrap();
        assert!(
            g.damp_percent > 0.17 && g.damp_percent < 0.25,
            "{}",
            g.damp_percent
        );
        check_reproduces(&g);
        // Bad inputs are errors, not panics.
        assert!(gptq_quantize(&w, 3, cols, &h, &o).is_err());
        assert!(gptq_quantize(&w, 2, cols, &h, &opts(5, None, false, true)).is_err());
        assert!(gptq_quantize(&w, 2, cols, &Hessian::new(cols), &o).is_err());
        let mut nan = w.clone();
        nan[3] = f32::NAN;
        assert!(gptq_quantize(&nan, 2, cols, &h, &o).is_err());
    }

    #[test]
    fn find_params_matches_autogptq() {
        let g = |sym| Grid {
            maxq: 15.0,
            sym,
            fp16_scales: false,
            v1_safe_zeros: false,
        };
        // All zero → [-1, 1].
        // -xmin/scale = 1/(2/15) = 7.4999995 in f32, which rounds to 7 (as in torch).
        assert_eq!(
            g(false).find_params([0.0f32; 4].into_iter()),
            (2.0 / 15.0, 7.0)
        );
        assert_eq!(
            g(true).find_params([0.0f32; 4].into_iter()),
            (2.0 / 15.0, 8.0)
        );
        // Asymmetric: xmin is clamped to ≤ 0, xmax to ≥ 0.
        let (s, z) = g(false).find_params([0.5f32, 1.5].into_iter());
        assert_eq!((s, z), (1.5 / 15.0, 0.0));
        let (s, z) = g(false).find_params([-3.0f32, 1.0].into_iter());
        assert_eq!(s, 4.0 / 15.0);
        assert_eq!(z, (3.0f32 / (4.0 / 15.0)).round_ties_even());
        // Symmetric: range ±max|w|, zero 8.
        let (s, z) = g(true).find_params([-1.0f32, 3.0].into_iter());
        assert_eq!((s, z), (6.0 / 15.0, 8.0));
        // Symmetric with no negative value keeps xmin = 0 (GPTQ's behaviour).
        let (s, z) = g(true).find_params([1.0f32, 3.0].into_iter());
        assert_eq!((s, z), (3.0 / 15.0, 8.0));
        // Round half to even, like torch.round.
        assert_eq!(g(false).quantize(2.5, 1.0, 0.0).0, 2.0);
        assert_eq!(g(false).quantize(3.5, 1.0, 0.0).0, 4.0);
        assert_eq!(g(false).quantize(100.0, 1.0, 0.0).0, 15.0);
        // v1-safe zeros: zero 0 → 1 with xmax still on the grid.
        let v1 = Grid {
            v1_safe_zeros: true,
            ..g(false)
        };
        let (s, z) = v1.find_params([0.5f32, 1.4].into_iter());
        assert_eq!(z, 1.0);
        assert_eq!(v1.quantize(1.4, s, z).1, 1.4f32 / 14.0 * 14.0);
    }

    #[test]
    fn lazy_update_view_is_row_major_and_in_bounds() {
        let mut rng = StdRng::seed_from_u64(10);
        for (nr, cols, i1, i2) in [(16usize, 256usize, 0usize, 128usize), (3, 96, 32, 40)] {
            let (count, bs) = (i2 - i1, 128);
            let err: Vec<f32> = (0..nr * bs).map(|_| normal(&mut rng)).collect();
            let u: Vec<f32> = (0..cols * cols).map(|_| normal(&mut rng)).collect();
            let w: Vec<f32> = (0..nr * cols).map(|_| normal(&mut rng)).collect();
            let mut buf = w.clone();
            buf.extend(std::iter::repeat_n(7.0f32, 64));
            let e_mat = MatRef::from_row_major_slice_with_stride(&err, nr, count, bs);
            let u_blk = MatRef::from_row_major_slice_with_stride(
                &u[i1 * cols + i2..],
                count,
                cols - i2,
                cols,
            );
            let w_rest = row_major_mut(&mut buf[i2..nr * cols], nr, cols - i2, cols);
            matmul(w_rest, Accum::Add, e_mat, u_blk, -1.0f32, Par::Seq);
            assert!(buf[nr * cols..].iter().all(|&v| v == 7.0));
            for r in 0..nr {
                for c in 0..cols {
                    let mut want = w[r * cols + c];
                    if c >= i2 {
                        for k in 0..count {
                            want -= err[r * bs + k] * u[(i1 + k) * cols + c];
                        }
                    }
                    assert!((want - buf[r * cols + c]).abs() < 1e-3, "{r} {c}");
                }
            }
        }
    }

    #[test]
    fn speed_576x1536() {
        let mut rng = StdRng::seed_from_u64(9);
        let (rows, cols, n) = (576, 1536, 2048);
        let w = random_weight(&mut rng, rows, cols);
        let x: Vec<f32> = (0..n * cols).map(|_| normal(&mut rng)).collect();
        let t0 = std::time::Instant::now();
        let h = hessian_of(&x, cols, 512);
        let t1 = std::time::Instant::now();
        let g = gptq_quantize(&w, rows, cols, &h, &opts(4, Some(128), true, true)).unwrap();
        let t2 = std::time::Instant::now();
        eprintln!(
            "576x1536: hessian ({n} rows) {:.3}s, gptq solve {:.3}s, loss {:.4} rtn {:.4}",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            g.loss,
            g.rtn_loss
        );
        check_reproduces(&g);
        assert!(g.loss < g.rtn_loss);
    }
}
