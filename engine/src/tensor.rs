//! Weights that stay in their stored type (mapped from the file), and the matmuls over them.
//!
//! A [`TensorRef`] is a cheap handle on one tensor's bytes inside a memory-mapped file (or an owned
//! buffer), in PyTorch's shape order (`[out_features, in_features]` for a linear weight). Rows are whole
//! blocks of the tensor's [`GgmlType`], so a row is dequantised on its own. A GGUF's Q/K weights keep
//! llama.cpp's interleaved-RoPE row order on disk; the handle maps rows back to Hugging Face order on
//! read, so everything above this module sees Hugging Face's layout.

use std::ops::Deref;
use std::sync::Arc;

use rayon::prelude::*;

use crate::codecs::GgmlType;
pub use crate::simd::dot;
use crate::{Error, Result};

/// What holds the bytes.
#[derive(Debug)]
pub enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A shared, immutable byte range.
#[derive(Clone, Debug)]
pub struct Bytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// The range `start..start+len` of `backing`; `None` if it does not fit.
    pub fn slice_of(backing: &Arc<Backing>, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= backing.len()).then(|| Self {
            backing: Arc::clone(backing),
            start,
            len,
        })
    }

    /// Bytes owned by this handle.
    pub fn owned(v: Vec<u8>) -> Self {
        let len = v.len();
        Self {
            backing: Arc::new(Backing::Owned(v)),
            start: 0,
            len,
        }
    }

    /// f32 values as little-endian bytes.
    pub fn from_f32(v: &[f32]) -> Self {
        Self::owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }
}

/// How a tensor's weights are stored: the two families every format falls into.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Self-contained blocks of a ggml type (F32/F16/BF16 and every quantized block type): each row is a
    /// whole number of blocks and dequantises on its own.
    Blocks { ty: GgmlType, data: Bytes },
    /// A grouped linear layer: integer codes plus side tensors (scales, zero points, a column
    /// permutation), as the Hugging Face quantized formats store them.
    Grouped(Arc<Grouped>),
}

/// A linear layer `[out, in]` in a grouped layout. One variant per layout; each dequantises a row and
/// knows its exact size.
#[derive(Debug)]
pub enum Grouped {
    /// GPTQ v1 (`qweight`/`qzeros`/`scales`/`g_idx`).
    Gptq(GptqLinear),
}

impl Grouped {
    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Grouped::Gptq(p) => (p.out_features, p.in_features),
        }
    }

    /// Dequantise output row `r` (`out.len() == in_features`).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        match self {
            Grouped::Gptq(p) => p.parts().dequant_row(r, out),
        }
    }

    /// Bytes of every stored part (codes and side tensors).
    pub fn stored_bytes(&self) -> usize {
        match self {
            Grouped::Gptq(p) => p.qweight.len() + p.qzeros.len() + p.scales.len() + p.g_idx.len(),
        }
    }

    /// A short label: `"GPTQ 4-bit"`.
    pub fn label(&self) -> String {
        match self {
            Grouped::Gptq(p) => format!("GPTQ {}-bit", p.bits),
        }
    }

    /// Check sizes and indices; called once when a checkpoint is opened.
    pub fn validate(&self, name: &str) -> Result<()> {
        match self {
            Grouped::Gptq(p) => p.parts().validate(name),
        }
    }
}

/// One tensor of a model, in its stored form.
#[derive(Clone, Debug)]
pub struct TensorRef {
    /// Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// PyTorch order, outermost first.
    pub shape: Vec<usize>,
    pub storage: Storage,
    /// `Some(n_heads)` when rows are stored in llama.cpp's interleaved-RoPE order (a GGUF's attn_q/attn_k).
    pub rope_interleaved_heads: Option<usize>,
}

/// A GPTQ (v1) linear layer's tensors, kept in the mapped file.
#[derive(Debug)]
pub struct GptqLinear {
    pub bits: u32,
    pub in_features: usize,
    pub out_features: usize,
    pub groups: usize,
    pub qweight: Bytes,
    pub qzeros: Bytes,
    pub scales: Bytes,
    pub g_idx: Bytes,
}

impl GptqLinear {
    /// Borrowed view for the codec.
    pub fn parts(&self) -> crate::codecs::gptq::GptqParts<'_> {
        crate::codecs::gptq::GptqParts {
            bits: self.bits,
            in_features: self.in_features,
            out_features: self.out_features,
            groups: self.groups,
            qweight: &self.qweight,
            qzeros: &self.qzeros,
            scales: &self.scales,
            g_idx: &self.g_idx,
        }
    }
}

impl TensorRef {
    /// Build a handle, checking that `data` holds exactly `shape` elements of `ty` in whole-block rows.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        ty: GgmlType,
        data: Bytes,
    ) -> Result<Self> {
        let name = name.into();
        let t = ty.traits();
        let cols = shape.last().copied().unwrap_or(1);
        let rows: usize = shape.iter().rev().skip(1).product();
        let row_bytes = t.row_bytes(cols).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor {name}: row length {cols} is not a multiple of {}'s block of {}",
                t.name, t.block_elems
            ))
        })?;
        let want = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| Error::Invalid(format!("tensor {name}: size overflows")))?;
        if want != data.len() {
            return Err(Error::Invalid(format!(
                "tensor {name}: {} bytes stored, {want} expected for {shape:?} {}",
                data.len(),
                t.name
            )));
        }
        Ok(Self {
            name,
            shape,
            storage: Storage::Blocks { ty, data },
            rope_interleaved_heads: None,
        })
    }

    /// A grouped linear layer `[out, in]` (validated: sizes and group indices).
    pub fn grouped(name: impl Into<String>, g: Grouped) -> Result<Self> {
        let name = name.into();
        g.validate(&name)?;
        let (out, inp) = g.shape();
        Ok(Self {
            shape: vec![out, inp],
            name,
            storage: Storage::Grouped(Arc::new(g)),
            rope_interleaved_heads: None,
        })
    }

    /// The ggml block type, or `None` for a grouped linear.
    pub fn block_type(&self) -> Option<GgmlType> {
        match &self.storage {
            Storage::Blocks { ty, .. } => Some(*ty),
            Storage::Grouped(_) => None,
        }
    }

    /// The stored ggml blocks (all rows, in stored order), or `None` for a grouped linear.
    pub fn block_bytes(&self) -> Option<&Bytes> {
        match &self.storage {
            Storage::Blocks { data, .. } => Some(data),
            Storage::Grouped(_) => None,
        }
    }

    /// The grouped layout, or `None` for ggml blocks.
    pub fn as_grouped(&self) -> Option<&Grouped> {
        match &self.storage {
            Storage::Blocks { .. } => None,
            Storage::Grouped(g) => Some(g),
        }
    }

    /// Whether the weights are a grouped linear.
    pub fn is_grouped(&self) -> bool {
        matches!(self.storage, Storage::Grouped(_))
    }

    /// `"Q4_K"`, `"F16"`, `"GPTQ 4-bit"`.
    pub fn type_label(&self) -> String {
        match &self.storage {
            Storage::Blocks { ty, .. } => ty.name().to_string(),
            Storage::Grouped(g) => g.label(),
        }
    }

    /// Bytes the weights occupy as stored (side tensors included).
    pub fn stored_bytes(&self) -> usize {
        match &self.storage {
            Storage::Blocks { data, .. } => data.len(),
            Storage::Grouped(g) => g.stored_bytes(),
        }
    }

    /// f32 tensor owned by the handle.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, v: &[f32]) -> Result<Self> {
        Self::new(name, shape, GgmlType::F32, Bytes::from_f32(v))
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of a row (the innermost dimension).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows (product of the outer dimensions; 1 for a vector).
    pub fn rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }

    /// Bytes of one stored row of ggml blocks (0 for a grouped linear).
    pub fn row_bytes(&self) -> usize {
        match &self.storage {
            Storage::Blocks { data, .. } => data.len() / self.rows().max(1),
            Storage::Grouped(_) => 0,
        }
    }

    /// The stored row that holds Hugging Face row `r`.
    #[inline]
    pub fn stored_row(&self, r: usize) -> usize {
        match self.rope_interleaved_heads {
            None => r,
            Some(heads) => {
                let hd = self.rows() / heads;
                let half = hd / 2;
                let (g, w) = (r / hd, r % hd);
                let (j, i) = (w / half, w % half);
                g * hd + 2 * i + j
            }
        }
    }

    /// The stored blocks of Hugging Face row `r` (empty for a grouped linear, whose rows are spread over
    /// several tensors: use [`TensorRef::dequant_row`]).
    #[inline]
    pub fn row_data(&self, r: usize) -> &[u8] {
        match &self.storage {
            Storage::Blocks { data, .. } => {
                let rb = self.row_bytes();
                let s = self.stored_row(r) * rb;
                &data[s..s + rb]
            }
            Storage::Grouped(_) => &[],
        }
    }

    /// Dequantise Hugging Face row `r` into `out` (`out.len() == cols`).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        match &self.storage {
            Storage::Blocks { ty, .. } => ty.dequantize(self.row_data(r), out),
            Storage::Grouped(g) => g.dequant_row(r, out),
        }
    }

    /// The whole tensor as f32 in Hugging Face order. Allocates `numel` floats: only for small tensors,
    /// tests and conversion one tensor at a time.
    pub fn to_f32(&self) -> Vec<f32> {
        let cols = self.cols();
        let mut out = vec![0.0f32; self.numel()];
        for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
            self.dequant_row(r, row);
        }
        out
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `n` activation rows `x` (`[n, cols]`), `out` is `[n, rows]`.
    ///
    /// The weight stays in its stored type: tiles of rows are dequantised into a per-thread scratch and
    /// multiplied with a GEMM (prompt processing) or dotted directly (decoding, `n == 1`).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        assert_eq!(x.len(), n * cols, "{}: activation size", self.name);
        assert_eq!(out.len(), n * rows, "{}: output size", self.name);
        if n == 1 {
            self.matvec(x, out);
            return;
        }
        let tile = tile_rows(rows, cols);
        let dst = SharedOut(out.as_mut_ptr());
        (0..rows.div_ceil(tile)).into_par_iter().for_each_init(
            || Vec::with_capacity(tile * cols),
            |w: &mut Vec<f32>, ti| {
                let r0 = ti * tile;
                let r1 = (r0 + tile).min(rows);
                let m = r1 - r0;
                w.resize(m * cols, 0.0);
                for (i, row) in w.chunks_exact_mut(cols).enumerate() {
                    self.dequant_row(r0 + i, row);
                }
                // SAFETY: tiles are disjoint column ranges r0..r1 of the n×rows output, which outlives
                // this parallel loop; each tile writes only its own columns.
                #[allow(unsafe_code)]
                unsafe {
                    sgemm_nt_strided(n, m, cols, x, w, dst.at(r0), rows);
                }
            },
        );
    }

    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        let cols = self.cols();
        let chunk = (out.len() / (rayon::current_num_threads() * 8)).clamp(8, 256);
        out.par_chunks_mut(chunk).enumerate().for_each_init(
            || vec![0.0f32; cols],
            |scratch, (ci, o)| {
                for (k, v) in o.iter_mut().enumerate() {
                    let r = ci * chunk + k;
                    *v = match self.block_type() {
                        Some(GgmlType::F16) => crate::simd::dot_f16(self.row_data(r), x),
                        _ => {
                            self.dequant_row(r, scratch);
                            crate::simd::dot_f32(scratch, x)
                        }
                    };
                }
            },
        );
    }
}

/// Rows per tile so a dequantised tile stays around 256 KiB (L2-sized).
fn tile_rows(rows: usize, cols: usize) -> usize {
    ((256 * 1024 / 4) / cols.max(1))
        .clamp(16, 512)
        .min(rows.max(1))
}

/// `y[n, m] = x[n, k] · w[m, k]ᵀ`, single-threaded (callers parallelise over tiles).
#[allow(unsafe_code)]
pub fn sgemm_nt(n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!(y.len() >= n * m);
    // SAFETY: `y` holds n rows of m (asserted) and is borrowed exclusively.
    unsafe { sgemm_nt_strided(n, m, k, x, w, y.as_mut_ptr(), m) }
}

/// The output of a parallel matmul, written by disjoint tiles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// The pointer `i` elements in (captured as a whole struct by closures, so it stays `Sync`).
    #[allow(unsafe_code)]
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: each tile writes a disjoint set of columns; see `TensorRef::matmul`.
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

/// `y = x[n, k] · w[m, k]ᵀ` written into `y` with row stride `ldy` (a column block of a wider matrix).
///
/// # Safety
/// `y` must be valid for writes at `y + t·ldy + j` for `t < n`, `j < m`, and no other thread may touch
/// those elements meanwhile.
#[allow(unsafe_code)]
unsafe fn sgemm_nt_strided(
    n: usize,
    m: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    y: *mut f32,
    ldy: usize,
) {
    assert!(x.len() >= n * k && w.len() >= m * k && ldy >= m);
    // SAFETY: the caller guarantees the output; the inputs are bounded by the assert.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y,
            1,
            ldy as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `y[n, m] = x[n, k] · w[k, m]` with row-major `w`, parallel over threads. For activations × activations
/// (attention).
#[allow(unsafe_code)]
pub fn sgemm_nn(n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= k * m && y.len() >= n * m);
    // SAFETY: bounds asserted above; all three matrices are row-major with unit column stride.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            m as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            m as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, w: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * m];
        for t in 0..n {
            for r in 0..m {
                y[t * m + r] = (0..k).map(|c| x[t * k + c] * w[r * k + c]).sum();
            }
        }
        y
    }

    #[test]
    fn matmul_matches_naive_for_batches_and_vectors() {
        // 1100 rows of 64 make three tiles, the last one partial.
        let (m, k) = (1100, 64);
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let t = TensorRef::from_f32("w", vec![m, k], &w).unwrap();
        for n in [1, 5] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let mut y = vec![0.0; n * m];
            t.matmul(&x, n, &mut y);
            let want = naive(&x, n, &w, m, k);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn interleaved_rows_map_back_to_hf_order() {
        // 2 heads of head_dim 8: stored row 2i+j of a head holds HF row j*4+i.
        let rows = 16;
        let hf: Vec<f32> = (0..rows).map(|r| r as f32).collect();
        let mut stored = vec![0.0f32; rows];
        for g in 0..2 {
            for i in 0..4 {
                for j in 0..2 {
                    stored[g * 8 + 2 * i + j] = hf[g * 8 + j * 4 + i];
                }
            }
        }
        let mut t = TensorRef::from_f32("q", vec![rows, 1], &stored).unwrap();
        t.rope_interleaved_heads = Some(2);
        assert_eq!(t.to_f32(), hf);
    }
}
