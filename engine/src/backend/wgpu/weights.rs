//! Weights on the device and the operations over them: a tensor is uploaded once in its stored form, in
//! chunks of whole rows no larger than a storage binding, and kept in a cache under a byte budget (least
//! recently used first out), so device memory is bounded however large the model. A matmul reads the
//! stored form in place: the fused matvec for a few tokens, else the tiled GEMM, which decodes quantized
//! blocks (or a grouped format's values) as it stages them in workgroup memory; the types without a kernel
//! are dequantised on the CPU once and kept as f32 rows.

use std::sync::{Arc, Weak};

use ::wgpu as wg;
use rayon::prelude::*;
use wg::util::DeviceExt;

use super::kernels::{block_files, Gemm, Matvec, WStore};
use super::{lock, Gpu};
use crate::codecs::GgmlType;
use crate::tensor::{Backing, Grouped, Storage, TensorRef};
use crate::{Error, Result};

/// Device bytes kept for weights unless `QS_GPU_WEIGHT_CACHE_MB` says otherwise.
pub(crate) const DEFAULT_BUDGET: u64 = 6 << 30;

/// Up to this many tokens a matmul is the fused dequantisation × vector kernel (decoding); more go
/// through dequantisation and the tiled GEMM.
pub(crate) const MATVEC_TOKENS: usize = 4;

/// Bytes of dequantised weights one GEMM reads at a time.
const SCRATCH: u64 = 64 << 20;

/// What a cached weight was made from. The cache holds only weak references, so it never keeps a file
/// mapped; while an entry exists its allocation cannot be reused, so a match is the same tensor.
enum Owner {
    Bytes(Weak<Backing>, usize, usize),
    Grouped(Weak<Grouped>),
}

impl Owner {
    fn of(w: &TensorRef) -> Self {
        match &w.storage {
            Storage::Blocks { data, .. } => {
                let (b, s, l) = data.identity();
                Owner::Bytes(Arc::downgrade(b), s, l)
            }
            Storage::Grouped(g) => Owner::Grouped(Arc::downgrade(g)),
        }
    }

    fn same(&self, other: &Owner) -> bool {
        match (self, other) {
            (Owner::Bytes(a, s, l), Owner::Bytes(b, t, m)) => a.ptr_eq(b) && s == t && l == m,
            (Owner::Grouped(a), Owner::Grouped(b)) => a.ptr_eq(b),
            _ => false,
        }
    }

    fn alive(&self) -> bool {
        match self {
            Owner::Bytes(a, ..) => a.strong_count() > 0,
            Owner::Grouped(a) => a.strong_count() > 0,
        }
    }
}

/// Whole rows `row0..row0 + rows` of a weight on the device.
pub(crate) struct Chunk {
    row0: usize,
    rows: usize,
    buf: wg::Buffer,
}

/// A grouped linear read in place by its own kernel file (`gptq.wgsl`, …): its buffers by binding
/// ([`super::grouped::layout`]), and the format's parameter (GPTQ's bits, AWQ's group size).
pub(crate) struct GroupedDevice {
    file: &'static str,
    bufs: Vec<(u32, wg::Buffer)>,
    param: u32,
    rows: usize,
}

/// A weight on the device.
pub(crate) struct DeviceWeight {
    chunks: Vec<Chunk>,
    /// The stored type and its block size in elements (F32 for the types dequantised on the host).
    kernel: (GgmlType, usize),
    /// `Some(heads)` when rows are in llama.cpp's interleaved-RoPE order.
    interleaved: Option<usize>,
    /// A grouped linear read in place (`chunks` is then empty).
    grouped: Option<GroupedDevice>,
    bytes: u64,
}

impl Gpu {
    /// Rows of a `cols`-wide weight dequantised per pass of the dequantisation benchmark (its scratch holds
    /// `tile · cols` floats).
    pub(crate) fn tile_rows(&self, cols: usize) -> usize {
        ((SCRATCH.min(self.max_binding()) / (cols.max(1) as u64 * 4)) as usize).max(1)
    }
}

impl DeviceWeight {
    /// Bytes it occupies on the device.
    #[cfg(test)]
    pub fn device_bytes(&self) -> u64 {
        self.bytes
    }
}

struct Entry {
    owner: Owner,
    weight: Arc<DeviceWeight>,
    last: u64,
}

/// Uploaded weights, least recently used dropped first once over budget.
pub(crate) struct WeightCache {
    entries: Vec<Entry>,
    budget: u64,
    clock: u64,
    /// Entries left since [`WeightCache::take_removed`] was last asked.
    removed: bool,
}

impl WeightCache {
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            clock: 0,
            removed: false,
        }
    }

    fn used(&self) -> u64 {
        self.entries.iter().map(|e| e.weight.bytes).sum()
    }

    fn get(&mut self, owner: &Owner) -> Option<Arc<DeviceWeight>> {
        let before = self.entries.len();
        self.entries.retain(|e| e.owner.alive());
        self.removed |= self.entries.len() < before;
        self.clock += 1;
        let now = self.clock;
        self.entries
            .iter_mut()
            .find(|e| e.owner.same(owner))
            .map(|e| {
                e.last = now;
                Arc::clone(&e.weight)
            })
    }

    /// Make room for `bytes` more.
    fn evict_for(&mut self, bytes: u64) {
        while !self.entries.is_empty() && self.used() + bytes > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last)
                .map_or(0, |(i, _)| i);
            self.entries.swap_remove(oldest);
            self.removed = true;
        }
    }

    /// Whether entries left the cache since the last call (their buffers must not stay bound).
    fn take_removed(&mut self) -> bool {
        std::mem::take(&mut self.removed)
    }

    fn insert(&mut self, owner: Owner, weight: Arc<DeviceWeight>) {
        self.clock += 1;
        self.entries.push(Entry {
            owner,
            weight,
            last: self.clock,
        });
    }
}

impl Gpu {
    /// Bytes of weights resident on the device now.
    pub fn resident_weight_bytes(&self) -> u64 {
        lock(&self.weights).used()
    }

    fn storage(&self, label: &str, size: u64, extra: wg::BufferUsages) -> wg::Buffer {
        self.device.create_buffer(&wg::BufferDescriptor {
            label: Some(label),
            size: size.max(4).next_multiple_of(4),
            usage: wg::BufferUsages::STORAGE | extra,
            mapped_at_creation: false,
        })
    }

    fn upload(&self, label: &str, bytes: &[u8]) -> wg::Buffer {
        self.upload_with(label, bytes, wg::BufferUsages::empty())
    }

    /// A storage buffer holding `bytes` (zero-padded to whole words), with `extra` usages.
    pub(crate) fn upload_with(
        &self,
        label: &str,
        bytes: &[u8],
        extra: wg::BufferUsages,
    ) -> wg::Buffer {
        let usage = wg::BufferUsages::STORAGE | extra;
        if bytes.len().is_multiple_of(4) && !bytes.is_empty() {
            return self
                .device
                .create_buffer_init(&wg::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytes,
                    usage,
                });
        }
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4).max(4), 0);
        self.device
            .create_buffer_init(&wg::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded,
                usage,
            })
    }

    /// Run `f` on the weight cache; weights it let go of are freed for the bind cache too.
    fn weight_cache<T>(&self, f: impl FnOnce(&mut WeightCache) -> T) -> T {
        let mut c = lock(&self.weights);
        let v = f(&mut c);
        if c.take_removed() {
            self.freed();
        }
        v
    }

    /// `w` on the device, uploaded now if it is not cached.
    pub(crate) fn weight(&self, w: &TensorRef) -> Result<Arc<DeviceWeight>> {
        let owner = Owner::of(w);
        if let Some(d) = self.weight_cache(|c| c.get(&owner)) {
            return Ok(d);
        }
        let (rows, cols) = (w.rows(), w.cols());
        let max = self.max_binding();
        if let Storage::Grouped(g) = &w.storage {
            let l = super::grouped::layout(g);
            if l.parts.iter().all(|(_, b)| (b.len() as u64) <= max) {
                let bytes: u64 = l.parts.iter().map(|(_, b)| b.len() as u64).sum();
                self.weight_cache(|c| c.evict_for(bytes));
                let weight = self.checked(&format!("uploading {}", w.name), || {
                    Ok(DeviceWeight {
                        chunks: Vec::new(),
                        kernel: (GgmlType::F32, 1),
                        interleaved: None,
                        grouped: Some(GroupedDevice {
                            file: l.file,
                            bufs: l
                                .parts
                                .iter()
                                .map(|(i, b)| (*i, self.upload(&w.name, b)))
                                .collect(),
                            param: l.param,
                            rows,
                        }),
                        bytes,
                    })
                })?;
                let weight = Arc::new(weight);
                lock(&self.weights).insert(owner, Arc::clone(&weight));
                return Ok(weight);
            }
        }
        let native = w
            .block_type()
            .filter(|&t| block_files(t).is_some())
            .map(|t| (t, t.traits().block_elems));
        let row_bytes = match native {
            Some(_) => w.row_bytes() as u64,
            None => cols as u64 * 4,
        };
        if row_bytes == 0 || row_bytes > max {
            return Err(Error::Gpu(format!(
                "{}: a row of {row_bytes} bytes does not fit a storage binding ({max} bytes)",
                w.name
            )));
        }
        let per_chunk = ((max / row_bytes) as usize).max(1);
        let bytes = row_bytes * rows as u64;
        self.weight_cache(|c| c.evict_for(bytes));
        let weight = self.checked(&format!("uploading {}", w.name), || {
            let mut chunks = Vec::new();
            for row0 in (0..rows).step_by(per_chunk) {
                let n = per_chunk.min(rows - row0);
                let buf = match (&native, &w.storage) {
                    (Some(_), Storage::Blocks { data, .. }) => {
                        let rb = row_bytes as usize;
                        self.upload(&w.name, &data[row0 * rb..(row0 + n) * rb])
                    }
                    _ => {
                        let mut f = vec![0.0f32; n * cols];
                        f.par_chunks_mut(cols)
                            .enumerate()
                            .for_each(|(i, row)| w.dequant_row(row0 + i, row));
                        self.upload(&w.name, bytemuck::cast_slice(&f))
                    }
                };
                chunks.push(Chunk { row0, rows: n, buf });
            }
            Ok(DeviceWeight {
                chunks,
                kernel: native.unwrap_or((GgmlType::F32, 1)),
                interleaved: if native.is_some() {
                    w.rope_interleaved_heads
                } else {
                    None
                },
                grouped: None,
                bytes,
            })
        })?;
        let weight = Arc::new(weight);
        lock(&self.weights).insert(owner, Arc::clone(&weight));
        Ok(weight)
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` on the device (see [`crate::backend::Backend::matmul`]).
    pub fn matmul(&self, w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        let (rows, cols) = (w.rows(), w.cols());
        if x.len() != n * cols || out.len() != n * rows {
            return Err(Error::Invalid(format!("{}: matmul sizes", w.name)));
        }
        let _guard = self.begin()?;
        let dw = self.weight(w)?;
        let max = self.max_binding();
        let row_f32 = (rows.max(cols) as u64) * 4;
        let n_step = ((max / row_f32) as usize).clamp(1, n.max(1));
        for t0 in (0..n).step_by(n_step) {
            let nt = n_step.min(n - t0);
            let xb = self.upload("x", bytemuck::cast_slice(&x[t0 * cols..(t0 + nt) * cols]));
            let yb = self.storage("y", (nt * rows * 4) as u64, wg::BufferUsages::COPY_SRC);
            let what = format!("matmul {}", w.name);
            let vals = self.record_and_read(&what, nt * rows, |enc, staging| {
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    self.record_linear(&mut pass, &dw, cols, nt, [&xb, &yb]);
                }
                enc.copy_buffer_to_buffer(&yb, 0, staging, 0, (nt * rows * 4) as u64);
            })?;
            out[t0 * rows..(t0 + nt) * rows].copy_from_slice(&vals);
        }
        Ok(())
    }

    /// Record `y[t, r] = Σ_c x[t, c] · W[r, c]` for `nt` tokens (Hugging Face row order), from device
    /// buffers `[x, y]`: the fused matvec up to [`MATVEC_TOKENS`] tokens, else one tiled GEMM per chunk
    /// reading the stored form in place.
    pub(crate) fn record_linear(
        &self,
        pass: &mut wg::ComputePass<'_>,
        dw: &DeviceWeight,
        cols: usize,
        nt: usize,
        [xb, yb]: [&wg::Buffer; 2],
    ) {
        if let Some(gq) = &dw.grouped {
            self.record_grouped(pass, gq, cols, nt, [xb, yb]);
            return;
        }
        let (ty, _) = dw.kernel;
        let rows: usize = dw.chunks.iter().map(|c| c.rows).sum();
        let (perm_rows, perm_heads) = match dw.interleaved {
            Some(h) => (rows as u32, h as u32),
            None => (0, 0),
        };
        // How the GEMM reads the weight: every block type in place, quantized ones decoded sub-block by
        // sub-block as it stages them.
        let w = match ty {
            GgmlType::F32 => WStore::F32,
            GgmlType::F16 if self.uses_f16() => WStore::F16,
            GgmlType::F16 => WStore::F16Bits,
            GgmlType::BF16 => WStore::Bf16,
            t => WStore::Blocks(t),
        };
        for ch in &dw.chunks {
            if nt <= MATVEC_TOKENS {
                let mv = Matvec {
                    rows: ch.rows as u32,
                    cols: cols as u32,
                    n: nt as u32,
                    ldy: rows as u32,
                    col0: ch.row0 as u32,
                    perm_rows,
                    perm_heads,
                };
                self.record_matvec(pass, ty, [&ch.buf, xb, yb], mv);
                continue;
            }
            // One product per chunk, the weight read in place.
            let g = Gemm {
                n: nt as u32,
                m: ch.rows as u32,
                k: cols as u32,
                ldw: cols as u32,
                ldy: rows as u32,
                col0: ch.row0 as u32,
                perm_rows,
                perm_heads,
                w,
                ..Gemm::default()
            };
            self.record_gemm(pass, [xb, &ch.buf, yb], g);
        }
    }

    /// [`Gpu::record_linear`] for a grouped linear: its format file's fused matvec, or its tiled GEMM
    /// (`grouped.wgsl`'s `gemm`, each weight decoded as it is staged).
    fn record_grouped(
        &self,
        pass: &mut wg::ComputePass<'_>,
        gq: &GroupedDevice,
        cols: usize,
        nt: usize,
        [xb, yb]: [&wg::Buffer; 2],
    ) {
        let rows = gq.rows as u32;
        let (entry, stride, groups) = if nt <= MATVEC_TOKENS {
            let gx = rows.min(self.max_groups()).max(1);
            ("matvec", gx, (gx, rows.div_ceil(gx), nt as u32))
        } else {
            let n = nt as u32;
            ("gemm", n, (rows.div_ceil(64), n.div_ceil(64), 1))
        };
        let p = self.pipeline(super::kernels::Key::Op(gq.file, entry));
        let params = self.uniform(&[rows, cols as u32, gq.param, 0, rows, stride, 0, rows]);
        let mut entries: Vec<(u32, &wg::Buffer)> = gq.bufs.iter().map(|(i, b)| (*i, b)).collect();
        entries.extend([(4, xb), (5, yb), (6, &params)]);
        let bg = self.bind_at(&p, &entries);
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    /// `y[n, m] = x[n, k] · Wᵀ` with `w` as `[m, k]` (`kmajor == false`) or `W` as `w[k, m]`
    /// (`kmajor == true`), all f32 in host memory.
    pub fn sgemm(
        &self,
        n: usize,
        m: usize,
        k: usize,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        kmajor: bool,
    ) -> Result<()> {
        let max = self.max_binding() as usize;
        if [n * k, m * k, n * m].iter().any(|&e| e * 4 > max) {
            return Err(Error::Gpu(format!(
                "a {n}×{m}×{k} product does not fit a storage binding"
            )));
        }
        let _guard = self.begin()?;
        let xb = self.upload("x", bytemuck::cast_slice(&x[..n * k]));
        let wb = self.upload("w", bytemuck::cast_slice(&w[..m * k]));
        let bytes = (n * m * 4) as u64;
        let yb = self.storage("y", bytes, wg::BufferUsages::COPY_SRC);
        let vals = self.record_and_read("attention product", n * m, |enc, staging| {
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                let g = Gemm {
                    n: n as u32,
                    m: m as u32,
                    k: k as u32,
                    ldw: if kmajor { m as u32 } else { k as u32 },
                    ldy: m as u32,
                    kmajor,
                    ..Gemm::default()
                };
                self.record_gemm(&mut pass, [&xb, &wb, &yb], g);
            }
            enc.copy_buffer_to_buffer(&yb, 0, staging, 0, bytes.max(4));
        })?;
        y[..n * m].copy_from_slice(&vals[..n * m]);
        Ok(())
    }
}

impl Gpu {
    /// Dequantise every row of `w` (uploaded first if needed) into scratch on the device and wait: the
    /// seconds it took, for the benchmark.
    pub fn time_dequant(&self, w: &TensorRef) -> Result<f64> {
        let _guard = self.begin()?;
        let dw = self.weight(w)?;
        let (ty, block) = dw.kernel;
        let cols = w.cols();
        let tile = self.tile_rows(cols);
        let scratch = self.storage(
            "scratch",
            (tile.min(w.rows()) * cols * 4) as u64,
            wg::BufferUsages::empty(),
        );
        let t0 = std::time::Instant::now();
        self.checked("dequantisation", || {
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for ch in &dw.chunks {
                    for r0 in (0..ch.rows).step_by(tile) {
                        let m = tile.min(ch.rows - r0);
                        let (first, count) =
                            ((r0 * cols / block) as u32, (m * cols / block) as u32);
                        self.record_dequant(&mut pass, ty, &ch.buf, first, count, &scratch);
                    }
                }
            }
            let idx = self.submit(enc.finish());
            self.device
                .poll(wg::PollType::Wait {
                    submission_index: Some(idx),
                    timeout: Some(super::WAIT),
                })
                .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
            Ok(())
        })?;
        Ok(t0.elapsed().as_secs_f64())
    }
}

impl Gpu {
    /// The Gram matrix `XᵀX` (`[cols, cols]`, f32 products and sums) of `n` rows `x` (`[n, cols]`): the
    /// GPTQ Hessian's accumulation. Rows of tokens and of the result are split to fit the bindings.
    pub fn gram(&self, x: &[f32], n: usize, cols: usize) -> Result<Vec<f32>> {
        if x.len() != n * cols || cols == 0 {
            return Err(Error::Invalid("gram: sizes".into()));
        }
        let max = (self.max_binding() / 4) as usize;
        let tok_step = (max / cols).max(1).min(n.max(1));
        let row_step = (max / cols).max(1).min(cols);
        let mut g = vec![0.0f32; cols * cols];
        let _guard = self.begin()?;
        for t0 in (0..n).step_by(tok_step) {
            let nt = tok_step.min(n - t0);
            let xb = self.upload("x", bytemuck::cast_slice(&x[t0 * cols..(t0 + nt) * cols]));
            for i0 in (0..cols).step_by(row_step) {
                let ni = row_step.min(cols - i0);
                let bytes = (ni * cols * 4) as u64;
                let yb = self.storage("gram", bytes, wg::BufferUsages::COPY_SRC);
                let vals = self.record_and_read("Hessian", ni * cols, |enc, staging| {
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        let gm = Gemm {
                            n: ni as u32,
                            m: cols as u32,
                            k: nt as u32,
                            x_off: i0 as u32,
                            ldx: cols as u32,
                            xkmajor: true,
                            ldw: cols as u32,
                            kmajor: true,
                            ldy: cols as u32,
                            ..Gemm::default()
                        };
                        self.record_gemm(&mut pass, [&xb, &xb, &yb], gm);
                    }
                    enc.copy_buffer_to_buffer(&yb, 0, staging, 0, bytes);
                })?;
                for (dst, src) in g[i0 * cols..(i0 + ni) * cols].iter_mut().zip(&vals) {
                    *dst += src;
                }
            }
        }
        Ok(g)
    }
}

/// Dequantise `w` on the device (every row, Hugging Face order): what the matmul multiplies with.
/// The conformance tests compare it with the CPU's dequantisation.
pub fn dequantize(gpu: &Gpu, w: &TensorRef) -> Result<Vec<f32>> {
    let (rows, cols) = (w.rows(), w.cols());
    let mut eye = vec![0.0f32; cols * cols];
    for i in 0..cols {
        eye[i * cols + i] = 1.0;
    }
    // Wᵀ = I · Wᵀ: exact, every product is 1·w or 0·w.
    let mut t = vec![0.0f32; cols * rows];
    gpu.matmul(w, &eye, cols, &mut t)?;
    let mut out = vec![0.0f32; rows * cols];
    for c in 0..cols {
        for r in 0..rows {
            out[r * cols + c] = t[c * rows + r];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: u64) -> Arc<DeviceWeight> {
        Arc::new(DeviceWeight {
            chunks: Vec::new(),
            kernel: (GgmlType::F32, 1),
            interleaved: None,
            grouped: None,
            bytes,
        })
    }

    fn tensor(n: usize) -> TensorRef {
        TensorRef::from_f32("t", vec![n], &vec![0.5; n]).expect("tensor")
    }

    #[test]
    fn the_cache_keeps_the_budget_and_forgets_dropped_tensors() {
        let mut c = WeightCache::new(1000);
        let (a, b, d) = (tensor(4), tensor(4), tensor(4));
        c.insert(Owner::of(&a), entry(400));
        c.insert(Owner::of(&b), entry(400));
        assert!(c.get(&Owner::of(&a)).is_some(), "a is now the most recent");
        assert!(
            c.get(&Owner::of(&d)).is_none(),
            "another tensor's bytes are not a's"
        );
        c.evict_for(400);
        assert!(
            c.get(&Owner::of(&b)).is_none(),
            "b, least recently used, made room"
        );
        assert_eq!(c.used(), 400);
        drop(a);
        assert!(c.get(&Owner::of(&d)).is_none());
        assert_eq!(c.used(), 0, "the dropped tensor's upload is released");
    }
}
