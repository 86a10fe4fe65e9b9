//! Weights that stay in their stored type (mapped from the file), and the matmuls over them.
//!
//! A [`TensorRef`] is a cheap handle on one tensor's bytes inside a memory-mapped file (or an owned
//! buffer), in PyTorch's shape order (`[out_features, in_features]` for a linear weight). Rows are whole
//! blocks of the tensor's [`GgmlType`], so a row is dequantised on its own. A GGUF's Q/K weights keep
//! llama.cpp's interleaved-RoPE row order on disk; the handle maps rows back to Hugging Face order on
//! read, so everything above this module sees Hugging Face's layout.

use std::ops::Deref;
use std::sync::Arc;

use crate::codecs::GgmlType;
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

    /// What identifies this range for caches: the shared backing, start and length.
    pub fn identity(&self) -> (&Arc<Backing>, usize, usize) {
        (&self.backing, self.start, self.len)
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

/// llama.cpp's interleaved-RoPE row order of a Q/K weight with `rows` rows and `heads` heads (head dim
/// `hd = rows/heads`): Hugging Face row `g·hd + j·hd/2 + i` is stored as row `g·hd + 2i + j`. The one
/// definition of the permutation; [`hf_row_of_interleaved`] is its inverse.
#[inline]
pub fn interleaved_row(hf_row: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let half = hd / 2;
    let (g, w) = (hf_row / hd, hf_row % hd);
    let (j, i) = (w / half, w % half);
    g * hd + 2 * i + j
}

/// The Hugging Face row held by interleaved row `r` (the inverse of [`interleaved_row`]).
#[inline]
pub fn hf_row_of_interleaved(r: usize, rows: usize, heads: usize) -> usize {
    let hd = rows / heads;
    let half = hd / 2;
    let (g, w) = (r / hd, r % hd);
    let (i, j) = (w / 2, w % 2);
    g * hd + j * half + i
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
    /// bitsandbytes 4-bit (NF4/FP4), blockwise over the flattened weight.
    Bnb4(Bnb4Linear),
    /// HQQ: asymmetric groups with optimised float zeros, 1–8 bits.
    Hqq(HqqLinear),
    /// AWQ GEMM (AutoAWQ's 4-bit layout, packed along the output dimension).
    Awq(AwqLinear),
    /// compressed-tensors `pack-quantized` (llm-compressor's integer layout, 1–8 bits).
    Ct(CtLinear),
    /// ExLlamaV2's EXL2: act-ordered groups of 2–8 bits, 4-bit scale codes under an fp16 maximum.
    Exl2(Exl2Linear),
}

impl Grouped {
    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Grouped::Gptq(p) => (p.out_features, p.in_features),
            Grouped::Bnb4(p) => (p.out_features, p.in_features),
            Grouped::Hqq(p) => (p.out_features, p.in_features),
            Grouped::Awq(p) => (p.out_features, p.in_features),
            Grouped::Ct(p) => (p.out_features, p.in_features),
            Grouped::Exl2(p) => (p.out_features, p.in_features),
        }
    }

    /// Dequantise output row `r` (`out.len() == in_features`).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        match self {
            Grouped::Gptq(p) => p.parts().dequant_row(r, out),
            Grouped::Bnb4(p) => p.parts().dequant_row(r, out),
            Grouped::Hqq(p) => p.parts().dequant_row(r, out),
            Grouped::Awq(p) => p.parts().dequant_row(r, out),
            Grouped::Ct(p) => p.parts().dequant_row(r, out),
            Grouped::Exl2(p) => p.parts().dequant_row(r, out),
        }
    }

    /// Bytes of every stored part (codes and side tensors).
    pub fn stored_bytes(&self) -> usize {
        match self {
            Grouped::Gptq(p) => p.qweight.len() + p.qzeros.len() + p.scales.len() + p.g_idx.len(),
            Grouped::Bnb4(p) => {
                p.codes.len()
                    + p.absmax.len()
                    + 16 * 4
                    + p.nested
                        .as_ref()
                        .map_or(0, |n| n.absmax.len() * 4 + 256 * 4)
            }
            Grouped::Hqq(p) => p.packed.len() + p.scale.len() + p.zero.len(),
            Grouped::Awq(p) => p.qweight.len() + p.qzeros.len() + p.scales.len(),
            Grouped::Ct(p) => {
                p.packed.len()
                    + p.scale.len()
                    + p.zero_point.as_ref().map_or(0, |z| z.len())
                    + p.g_idx.as_ref().map_or(0, |g| g.len())
            }
            Grouped::Exl2(p) => {
                p.q_weight.len() + p.q_scale.len() + p.q_scale_max.len() + p.index_bytes
            }
        }
    }

    /// A short label: `"GPTQ 4-bit"`.
    pub fn label(&self) -> String {
        match self {
            Grouped::Gptq(p) => format!("GPTQ {}-bit", p.bits),
            Grouped::Bnb4(p) => format!(
                "{}{}",
                p.kind.name().to_uppercase(),
                if p.nested.is_some() { " dq" } else { "" }
            ),
            Grouped::Hqq(p) => format!("HQQ {}-bit g{}", p.params.nbits, p.params.group_size),
            Grouped::Awq(p) => format!("AWQ 4-bit g{}", p.group_size),
            Grouped::Ct(p) => format!(
                "int{} g{}{} (compressed-tensors)",
                p.bits,
                p.group_size,
                if p.zero_point.is_some() { " asym" } else { "" }
            ),
            Grouped::Exl2(p) => format!("EXL2 {:.2} bpw", p.bits_per_weight()),
        }
    }

    /// Check sizes and indices; called once when a checkpoint is opened.
    pub fn validate(&self, name: &str) -> Result<()> {
        match self {
            Grouped::Gptq(p) => p.parts().validate(name),
            Grouped::Bnb4(p) => p.parts().validate(name),
            Grouped::Hqq(p) => p.parts().validate(name),
            Grouped::Awq(p) => p.parts().validate(name),
            Grouped::Ct(p) => p.parts().validate(name),
            Grouped::Exl2(p) => p.parts().validate(name),
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
    /// What a backend derives from the stored bytes once (the CPU's repacked decoding layout), built on
    /// first use and shared by clones.
    pub derived: Derived,
}

/// Data derived from a tensor's stored bytes once and kept with it (a backend's repacked layout): built by the
/// first caller, shared by the tensor's clones, of whatever type the deriving module defines.
#[derive(Clone, Default)]
pub struct Derived(Arc<std::sync::OnceLock<Option<Arc<dyn std::any::Any + Send + Sync>>>>);

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0.get() {
            None => "not built",
            Some(None) => "nothing derived",
            Some(Some(_)) => "derived",
        })
    }
}

impl Derived {
    /// The value `make` builds the first time (`None`: nothing to derive, remembered too), then the same
    /// one; `None` also when it was built as another type.
    pub fn get_or_init<T: std::any::Any + Send + Sync>(
        &self,
        make: impl FnOnce() -> Option<T>,
    ) -> Option<&T> {
        self.0
            .get_or_init(|| make().map(|v| Arc::new(v) as Arc<dyn std::any::Any + Send + Sync>))
            .as_ref()
            .and_then(|a| a.downcast_ref::<T>())
    }
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

/// A bitsandbytes 4-bit linear layer: codes and block scales kept in the mapped file.
#[derive(Clone, Debug)]
pub struct Bnb4Linear {
    pub kind: crate::codecs::bnb::Bnb4Kind,
    pub out_features: usize,
    pub in_features: usize,
    /// The dtype dequantized values are rounded to (the quant state's `dtype`).
    pub dtype: crate::codecs::bnb::Bnb4Dtype,
    pub blocksize: usize,
    /// The 16 levels as stored (`quant_map`).
    pub levels: [f32; 16],
    /// Packed 4-bit codes, two per byte, high nibble first.
    pub codes: Bytes,
    /// f32 per block, or with `nested` one 8-bit code per block.
    pub absmax: Bytes,
    pub nested: Option<Box<Bnb4Nested>>,
}

/// The double quantization of a [`Bnb4Linear`]'s block scales.
#[derive(Clone, Debug)]
pub struct Bnb4Nested {
    pub absmax: Vec<f32>,
    pub blocksize: usize,
    pub offset: f32,
    pub map: [f32; 256],
}

impl Bnb4Linear {
    /// Borrowed view for the codec.
    pub fn parts(&self) -> crate::codecs::bnb::Bnb4Parts<'_> {
        use crate::codecs::bnb::{Bnb4Parts, StoredAbsmax};
        Bnb4Parts {
            levels: &self.levels,
            dtype: self.dtype,
            blocksize: self.blocksize,
            out_features: self.out_features,
            in_features: self.in_features,
            codes: &self.codes,
            absmax: match &self.nested {
                None => StoredAbsmax::F32(&self.absmax),
                Some(n) => StoredAbsmax::Double {
                    codes: &self.absmax,
                    nested_absmax: &n.absmax,
                    nested_block: n.blocksize,
                    offset: n.offset,
                    map: &n.map,
                },
            },
        }
    }
}

/// An HQQ linear layer: packed codes, and per group a scale and a zero in the compute dtype.
#[derive(Clone, Debug)]
pub struct HqqLinear {
    pub params: crate::codecs::hqq::HqqParams,
    pub out_features: usize,
    pub in_features: usize,
    pub dtype: crate::codecs::hqq::HqqDtype,
    pub packed: Bytes,
    pub scale: Bytes,
    pub zero: Bytes,
}

impl HqqLinear {
    /// Borrowed view for the codec.
    pub fn parts(&self) -> crate::codecs::hqq::HqqParts<'_> {
        crate::codecs::hqq::HqqParts {
            params: self.params,
            out_features: self.out_features,
            in_features: self.in_features,
            packed: &self.packed,
            scale: &self.scale,
            zero: &self.zero,
            dtype: self.dtype,
        }
    }
}

/// An AWQ GEMM linear layer's tensors, kept in the mapped file.
#[derive(Debug)]
pub struct AwqLinear {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    pub qweight: Bytes,
    pub qzeros: Bytes,
    pub scales: Bytes,
}

impl AwqLinear {
    /// Borrowed view for the codec.
    pub fn parts(&self) -> crate::codecs::awq::AwqParts<'_> {
        crate::codecs::awq::AwqParts {
            in_features: self.in_features,
            out_features: self.out_features,
            group_size: self.group_size,
            qweight: &self.qweight,
            qzeros: &self.qzeros,
            scales: &self.scales,
        }
    }
}

/// An EXL2 linear layer: packed codes and scales kept in the mapped file, its groups and permutation decoded.
#[derive(Debug)]
pub struct Exl2Linear {
    pub in_features: usize,
    pub out_features: usize,
    /// `q_weight`'s width: `out_features` rounded up to 32.
    pub n_pad: usize,
    pub groups: Vec<crate::codecs::exl2::Exl2Group>,
    /// Permuted row → input feature (`argsort(q_invperm)`).
    pub perm: Vec<u32>,
    pub q_weight: Bytes,
    pub q_scale: Bytes,
    pub q_scale_max: Bytes,
    /// Bytes of `q_groups` and `q_invperm` as stored.
    pub index_bytes: usize,
}

impl Exl2Linear {
    /// Borrowed view for the codec.
    pub fn parts(&self) -> crate::codecs::exl2::Exl2Parts<'_> {
        crate::codecs::exl2::Exl2Parts {
            in_features: self.in_features,
            out_features: self.out_features,
            n_pad: self.n_pad,
            groups: &self.groups,
            perm: &self.perm,
            q_weight: &self.q_weight,
            q_scale: &self.q_scale,
            q_scale_max: &self.q_scale_max,
        }
    }

    /// Stored bits per weight of the real (unpadded) matrix, everything counted.
    pub fn bits_per_weight(&self) -> f64 {
        let bytes =
            self.q_weight.len() + self.q_scale.len() + self.q_scale_max.len() + self.index_bytes;
        bytes as f64 * 8.0 / (self.in_features * self.out_features).max(1) as f64
    }
}

/// A compressed-tensors `pack-quantized` linear layer's tensors, kept in the mapped file.
#[derive(Debug)]
pub struct CtLinear {
    pub bits: u32,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    pub packed: Bytes,
    pub scale: Bytes,
    pub scale_type: crate::codecs::ct::ScaleType,
    pub zero_point: Option<Bytes>,
    pub g_idx: Option<Bytes>,
}

impl CtLinear {
    /// Borrowed view for the codec.
    pub fn parts(&self) -> crate::codecs::ct::CtParts<'_> {
        crate::codecs::ct::CtParts {
            bits: self.bits,
            in_features: self.in_features,
            out_features: self.out_features,
            group_size: self.group_size,
            packed: &self.packed,
            scale: &self.scale,
            scale_type: self.scale_type,
            zero_point: self.zero_point.as_deref(),
            g_idx: self.g_idx.as_deref(),
        }
    }
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
            derived: Derived::default(),
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
            derived: Derived::default(),
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

    /// Bits per weight as stored, side tensors included (the same measure for ggml blocks and grouped
    /// linears).
    pub fn bits_per_weight(&self) -> f64 {
        self.stored_bytes() as f64 * 8.0 / self.numel().max(1) as f64
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
            Some(heads) => interleaved_row(r, self.rows(), heads),
        }
    }

    /// Hugging Face rows `r0..r1` as one run of stored bytes (`(r1 − r0) · row_bytes()` long), where they are
    /// stored in that order (ggml blocks without a RoPE row interleave); `None` otherwise (use
    /// [`TensorRef::row_data`] per row). A kernel walking many short rows slices them itself instead of
    /// paying `row_data`'s division per row.
    pub fn rows_run(&self, r0: usize, r1: usize) -> Option<&[u8]> {
        match (&self.storage, self.rope_interleaved_heads) {
            (Storage::Blocks { data, .. }, None) if r0 <= r1 && r1 <= self.rows() => {
                let rb = self.row_bytes();
                Some(&data[r0 * rb..r1 * rb])
            }
            _ => None,
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_weight_of_blocks_and_grouped_linears() {
        let t = TensorRef::new(
            "w",
            vec![2, 32],
            GgmlType::Q4_0,
            Bytes::owned(vec![0; 2 * 18]),
        )
        .unwrap();
        assert_eq!(t.bits_per_weight(), 4.5);
        // GPTQ 4-bit, 32 in × 32 out, one group: codes 512 B, zeros 16 B, scales 64 B, g_idx 128 B.
        let g = GptqLinear {
            bits: 4,
            in_features: 32,
            out_features: 32,
            groups: 1,
            qweight: Bytes::owned(vec![0; 512]),
            qzeros: Bytes::owned(vec![0; 16]),
            scales: Bytes::owned(vec![0; 64]),
            g_idx: Bytes::owned(vec![0; 128]),
        };
        let t = TensorRef::grouped("g", Grouped::Gptq(g)).unwrap();
        assert_eq!(
            t.bits_per_weight(),
            (512.0 + 16.0 + 64.0 + 128.0) * 8.0 / 1024.0
        );
        assert_eq!(t.type_label(), "GPTQ 4-bit");
        assert!(t.is_grouped() && t.block_type().is_none());
    }

    #[test]
    fn interleaved_row_and_its_inverse() {
        for (rows, heads) in [(16, 2), (64, 8), (12, 3)] {
            let mut seen = vec![false; rows];
            for r in 0..rows {
                let s = interleaved_row(r, rows, heads);
                assert!(!seen[s], "a permutation");
                seen[s] = true;
                assert_eq!(hf_row_of_interleaved(s, rows, heads), r);
            }
        }
        // Head dim 8: HF row 4 (j = 1, i = 0) is stored second.
        assert_eq!(interleaved_row(4, 16, 2), 1);
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
        // Stored in order: a run of rows is their row_data, one after another.
        let run = t.rows_run(3, 9).expect("in order");
        assert_eq!(
            run,
            (3..9)
                .flat_map(|r| t.row_data(r))
                .copied()
                .collect::<Vec<u8>>()
        );
        assert!(t.rows_run(9, 3).is_none() && t.rows_run(0, rows + 1).is_none());
        t.rope_interleaved_heads = Some(2);
        assert_eq!(t.to_f32(), hf);
        // Interleaved: no run in Hugging Face order.
        assert!(t.rows_run(3, 9).is_none());
    }
}
