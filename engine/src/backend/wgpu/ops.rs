//! A decoder forward pass recorded on the device: [`Session`] holds one command encoder, so a whole batch
//! of tokens (a decoding step, a prompt chunk) is one submission, and the hidden states, the layer's
//! intermediates and the KV cache ([`DeviceKv`]) stay on the device; only the wanted logits come back.

use ::wgpu as wg;

use super::kernels::{Gemm, Key};
use super::Gpu;
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// An f32 array on the device (a pooled one goes back to the pool when dropped).
pub struct Buf {
    pub(crate) buf: wg::Buffer,
    pub len: usize,
    pooled: bool,
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Ok(g) = super::gpu() {
            if self.pooled {
                g.recycle(self.buf.clone());
            } else {
                g.freed();
            }
        }
    }
}

/// One model's keys and values on the device, per layer `[kv_heads][capacity][head_dim]` (the host
/// cache's layout, so the two copy into each other directly).
pub struct DeviceKv {
    pub(crate) k: Vec<Buf>,
    pub(crate) v: Vec<Buf>,
}

/// The norms and biases of a model on the device, made once per model (shared by its clones).
pub struct DeviceConsts {
    /// Per layer: attention norm, FFN norm, q/k/v biases.
    pub layers: Vec<LayerConsts>,
    pub norm: Buf,
}

/// One decoder layer's norms and q/k/v biases on the device.
pub struct LayerConsts {
    pub attn_norm: Buf,
    pub ffn_norm: Buf,
    pub bias: [Option<Buf>; 3],
}

/// Where a model keeps its [`DeviceConsts`] (made on first use on the GPU, shared by the model's clones).
pub type ConstsSlot = std::sync::Arc<std::sync::OnceLock<DeviceConsts>>;

const WG: u32 = 64;

impl Gpu {
    /// A zeroed f32 array of `len` elements (usable as storage, copied from and to).
    pub fn alloc(&self, len: usize) -> Buf {
        let buf = self.device.create_buffer(&wg::BufferDescriptor {
            label: Some("f32"),
            size: (len.max(1) * 4) as u64,
            usage: wg::BufferUsages::STORAGE
                | wg::BufferUsages::COPY_SRC
                | wg::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Buf {
            buf,
            len,
            pooled: false,
        }
    }

    /// An f32 array of `len` elements from the pool, contents undefined (a forward pass's intermediates,
    /// written before they are read); sizes are bucketed to powers of two so batches of any length share.
    pub fn scratch(&self, len: usize) -> Buf {
        let exact = ((len.max(1) * 4) as u64).next_multiple_of(256);
        let size = match exact.next_power_of_two() {
            p if p <= self.max_binding() => p,
            _ => exact,
        };
        let usage =
            wg::BufferUsages::STORAGE | wg::BufferUsages::COPY_SRC | wg::BufferUsages::COPY_DST;
        Buf {
            buf: self.take(size, usage),
            len,
            pooled: true,
        }
    }

    /// [`Gpu::scratch`] holding `data`.
    pub fn scratch_with(&self, data: &[f32]) -> Buf {
        let b = self.scratch(data.len());
        self.write_f32(&b, 0, data);
        b
    }

    /// `data` on the device.
    pub fn upload_f32(&self, data: &[f32]) -> Buf {
        let b = self.alloc(data.len());
        if !data.is_empty() {
            self.queue
                .write_buffer(&b.buf, 0, bytemuck::cast_slice(data));
        }
        b
    }

    /// Overwrite `dst[off..off + data.len()]`.
    pub fn write_f32(&self, dst: &Buf, off: usize, data: &[f32]) {
        if !data.is_empty() {
            self.queue
                .write_buffer(&dst.buf, (off * 4) as u64, bytemuck::cast_slice(data));
        }
    }

    /// A device KV cache for `layers` layers of `per_layer` floats, each a single storage binding.
    pub fn alloc_kv(&self, layers: usize, per_layer: usize) -> Result<DeviceKv> {
        if (per_layer * 4) as u64 > self.max_binding() {
            return Err(Error::Gpu(format!(
                "a KV cache layer of {} MiB does not fit a storage binding",
                (per_layer * 4) >> 20
            )));
        }
        let _guard = self.begin()?;
        self.checked("allocating the KV cache", || {
            Ok(DeviceKv {
                k: (0..layers).map(|_| self.alloc(per_layer)).collect(),
                v: (0..layers).map(|_| self.alloc(per_layer)).collect(),
            })
        })
    }

    /// Start recording.
    pub fn session(&self) -> Result<Session<'_>> {
        let guard = self.begin()?;
        self.binds_cached
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Session {
            gpu: self,
            pass: None,
            enc: Some(self.device.create_command_encoder(&Default::default())),
            _guard: guard,
        })
    }

    /// Workgroups of 64 for `count` invocations: `(x, y, invocations per grid row)`.
    pub(crate) fn grid(&self, count: u32) -> (u32, u32, u32) {
        let groups = count.div_ceil(WG).max(1);
        let gx = groups.min(self.max_groups());
        (gx, groups.div_ceil(gx), gx * WG)
    }
}

/// Work recorded for one submission: the dispatches share one compute pass (each dispatch is its own usage
/// scope, so wgpu orders them by the buffers they read and write), ended only for buffer copies.
pub struct Session<'g> {
    gpu: &'g Gpu,
    // Declared before the encoder it records into, so it ends first.
    pass: Option<wg::ComputePass<'static>>,
    enc: Option<wg::CommandEncoder>,
    _guard: super::Work<'g>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // Binds outside a forward pass (buffers made per call) are not cached.
        self.gpu
            .binds_cached
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Session<'_> {
    /// The open compute pass (begun on first use).
    fn pass(&mut self) -> Option<&mut wg::ComputePass<'static>> {
        if self.pass.is_none() {
            let enc = self.enc.as_mut()?;
            self.pass = Some(
                enc.begin_compute_pass(&Default::default())
                    .forget_lifetime(),
            );
        }
        self.pass.as_mut()
    }

    /// End the open compute pass (before a copy or the submission).
    fn end_pass(&mut self) {
        self.pass = None;
    }

    fn dispatch(
        &mut self,
        key: Key,
        bufs: &[&wg::Buffer],
        params: &[u32],
        groups: (u32, u32, u32),
    ) {
        let g = self.gpu;
        let p = g.pipeline(key);
        let u = g.uniform(params);
        let mut all: Vec<&wg::Buffer> = bufs.to_vec();
        all.push(&u);
        let bg = g.bind(&p, &all);
        let Some(pass) = self.pass() else { return };
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ` (Hugging Face row order), the weight uploaded on first use.
    pub fn linear(&mut self, w: &TensorRef, x: &Buf, n: usize, y: &Buf) -> Result<()> {
        let g = self.gpu;
        let dw = g.weight(w)?;
        let Some(pass) = self.pass() else {
            return Ok(());
        };
        g.record_linear(pass, &dw, w.cols(), n, [&x.buf, &y.buf]);
        Ok(())
    }

    /// `y = rms_norm(x) · w` over rows of `h`.
    pub fn rms_norm(&mut self, x: &Buf, w: &Buf, y: &Buf, n: usize, h: usize, eps: f32) {
        self.dispatch(
            Key::Op("rms_norm", "main"),
            &[&x.buf, &w.buf, &y.buf],
            &[h as u32, eps.to_bits(), 0, 0],
            (n as u32, 1, 1),
        );
    }

    /// Rotate-half RoPE in place on `x` = `[n, heads · hd]`, tables `[n, hd/2]`.
    pub fn rope(&mut self, x: &Buf, cos: &Buf, sin: &Buf, n: usize, heads: usize, hd: usize) {
        let total = (n * heads * hd / 2) as u32;
        let (gx, gy, stride) = self.gpu.grid(total);
        self.dispatch(
            Key::Op("rope", "main"),
            &[&x.buf, &cos.buf, &sin.buf],
            &[total, heads as u32, hd as u32, stride],
            (gx, gy, 1),
        );
    }

    fn elementwise(&mut self, entry: &'static str, y: &Buf, x: &Buf, count: usize, m: usize) {
        let (gx, gy, stride) = self.gpu.grid(count as u32);
        self.dispatch(
            Key::Op("elementwise", entry),
            &[&y.buf, &x.buf],
            &[count as u32, m.max(1) as u32, stride, 0],
            (gx, gy, 1),
        );
    }

    /// `sums[off + c] += Σ_t x[t, c]²` over the `n` rows of `x` (`[n, cols]`).
    pub fn sum_squares(&mut self, sums: &Buf, off: usize, x: &Buf, n: usize, cols: usize) {
        let (gx, gy, stride) = self.gpu.grid(cols as u32);
        self.dispatch(
            Key::Op("elementwise", "sumsq"),
            &[&sums.buf, &x.buf],
            &[cols as u32, n as u32, stride, off as u32],
            (gx, gy, 1),
        );
    }

    /// `y += x` (first `count` elements).
    pub fn add(&mut self, y: &Buf, x: &Buf, count: usize) {
        self.elementwise("add", y, x, count, 1);
    }

    /// `y[t, j] += b[j]` over `count` elements of rows of `b.len`.
    pub fn bias(&mut self, y: &Buf, b: &Buf, count: usize) {
        self.elementwise("bias", y, b, count, b.len);
    }

    /// `gate = silu(gate) · up`.
    pub fn swiglu(&mut self, gate: &Buf, up: &Buf, count: usize) {
        self.elementwise("swiglu", gate, up, count, 1);
    }

    /// Store `n` keys and values (`[n, kv_heads · hd]`) at positions `pos..` of layer `layer`.
    pub fn kv_write(
        &mut self,
        kv: &DeviceKv,
        layer: usize,
        (k, v): (&Buf, &Buf),
        n: usize,
        (kv_heads, hd, cap, pos): (usize, usize, usize, usize),
    ) {
        let total = (n * kv_heads * hd) as u32;
        let (gx, gy, stride) = self.gpu.grid(total);
        self.dispatch(
            Key::Op("kv_write", "main"),
            &[&k.buf, &v.buf, &kv.k[layer].buf, &kv.v[layer].buf],
            &[
                total,
                (kv_heads * hd) as u32,
                hd as u32,
                cap as u32,
                pos as u32,
                stride,
                0,
                0,
            ],
            (gx, gy, 1),
        );
    }

    /// Causal attention of `n` queries `q` (`[n, heads · hd]`, positions `pos0..`) over positions
    /// `0..pos0 + n` of layer `layer`'s cache: `out` = `[n, heads · hd]`. `scores` holds
    /// `[heads][n][pos0 + n]` (heads are done in groups when it is smaller).
    pub fn attention(
        &mut self,
        kv: &DeviceKv,
        layer: usize,
        (q, out, scores): (&Buf, &Buf, &Buf),
        n: usize,
        pos0: usize,
        (heads, kv_heads, hd, cap): (usize, usize, usize, usize),
    ) -> Result<()> {
        let len = pos0 + n;
        let group = heads / kv_heads.max(1);
        let per_head = n * len;
        let fit = (scores.len / per_head.max(1)).min(heads);
        // Whole KV groups per pass, so a pass's heads map onto whole cached heads.
        let chunk = (fit / group.max(1)) * group.max(1);
        if chunk == 0 {
            return Err(Error::Gpu(format!(
                "attention scores of {n} × {len} per head do not fit the scratch of {} floats",
                scores.len
            )));
        }
        let scale = (hd as f64).powf(-0.5) as f32;
        let (kc, vc) = (&kv.k[layer], &kv.v[layer]);
        for h0 in (0..heads).step_by(chunk) {
            let hs = chunk.min(heads - h0);
            let qk = Gemm {
                n: n as u32,
                m: len as u32,
                k: hd as u32,
                x_off: (h0 * hd) as u32,
                ldx: (heads * hd) as u32,
                w_off: ((h0 / group) * cap * hd) as u32,
                ldw: hd as u32,
                ldy: len as u32,
                batch: hs as u32,
                x_bz: hd as u32,
                w_bz: (cap * hd) as u32,
                y_bz: per_head as u32,
                group: group as u32,
                ..Gemm::default()
            };
            self.gemm([q, kc, scores], qk);
            let rows = (hs * n) as u32;
            self.dispatch(
                Key::Op("softmax", "main"),
                &[&scores.buf],
                &[
                    n as u32,
                    len as u32,
                    pos0 as u32,
                    scale.to_bits(),
                    rows,
                    0,
                    0,
                    0,
                ],
                (rows.min(65535), rows.div_ceil(65535), 1),
            );
            let pv = Gemm {
                n: n as u32,
                m: hd as u32,
                k: len as u32,
                ldx: len as u32,
                w_off: ((h0 / group) * cap * hd) as u32,
                ldw: hd as u32,
                y_off: (h0 * hd) as u32,
                ldy: (heads * hd) as u32,
                kmajor: true,
                batch: hs as u32,
                x_bz: per_head as u32,
                w_bz: (cap * hd) as u32,
                y_bz: hd as u32,
                group: group as u32,
                ..Gemm::default()
            };
            self.gemm([scores, vc, out], pv);
        }
        Ok(())
    }

    fn gemm(&mut self, [x, w, y]: [&Buf; 3], g: Gemm) {
        let gpu = self.gpu;
        let Some(pass) = self.pass() else { return };
        gpu.record_gemm(pass, [&x.buf, &w.buf, &y.buf], g);
    }

    /// Score `rows` logits rows of `logits` (`[rows, vocab]`) against `targets[target0..]` into `out` from row
    /// `out_row0` (8 floats per row, see `logits.wgsl`): alone (perplexity) or against `base`'s rows from
    /// `base_row0` (KL-divergence).
    #[allow(clippy::too_many_arguments)]
    pub fn score_rows(
        &mut self,
        logits: &Buf,
        base: Option<(&Buf, usize)>,
        targets: &wg::Buffer,
        target0: usize,
        out: &Buf,
        out_row0: usize,
        (rows, vocab): (usize, usize),
    ) {
        let g = self.gpu;
        let entry = if base.is_some() { "kld" } else { "nll" };
        let p = g.pipeline(Key::Op("logits", entry));
        let base_row0 = base.map_or(0, |(_, r)| r);
        let u = g.uniform(&[
            vocab as u32,
            rows as u32,
            base_row0 as u32,
            out_row0 as u32,
            target0 as u32,
            0,
            0,
            0,
        ]);
        // `nll` shares the row helpers that name the base, so binding 1 is always bound (to the rows
        // themselves when there is no base).
        let b = base.map_or(&logits.buf, |(b, _)| &b.buf);
        // The targets are uploaded per call: a fresh bind group, not a cached one.
        let bg = g.bind_fresh(
            &p,
            &[
                (0, &logits.buf),
                (1, b),
                (2, targets),
                (3, &out.buf),
                (4, &u),
            ],
        );
        let Some(pass) = self.pass() else { return };
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(rows as u32, 1, 1);
    }

    /// `dst[dst_off..][..len] = src[src_off..][..len]`.
    pub fn copy(&mut self, src: &Buf, src_off: usize, dst: &Buf, dst_off: usize, len: usize) {
        self.end_pass();
        if let Some(enc) = self.enc.as_mut() {
            enc.copy_buffer_to_buffer(
                &src.buf,
                (src_off * 4) as u64,
                &dst.buf,
                (dst_off * 4) as u64,
                (len * 4) as u64,
            );
        }
    }

    /// End the open pass and hand over the encoder (once).
    fn encoder(&mut self) -> Result<wg::CommandEncoder> {
        self.end_pass();
        self.enc
            .take()
            .ok_or_else(|| Error::Gpu("session used twice".into()))
    }

    /// Submit everything recorded.
    pub fn submit(mut self) -> Result<()> {
        let gpu = self.gpu;
        let enc = self.encoder()?;
        gpu.checked("forward pass", || {
            gpu.submit(enc.finish());
            Ok(())
        })
    }

    /// [`Session::finish_read`] reading positions `pos..pos + n` of every layer's keys and values back
    /// into the host arrays `(k, v)` in the same submission (a decoded token: one submission, one wait).
    pub fn finish_read_with_kv(
        mut self,
        (buf, off, len): (&Buf, usize, usize),
        kv: &DeviceKv,
        (k, v): (&mut [Vec<f32>], &mut [Vec<f32>]),
        dims: (usize, usize, usize),
        rows: (usize, usize),
    ) -> Result<Vec<f32>> {
        let gpu = self.gpu;
        let enc = self.encoder()?;
        let kv_len = kv_rows_len(k.len(), dims, rows);
        let mut vals = gpu.read_after("forward pass", len + kv_len, enc, |enc, staging| {
            enc.copy_buffer_to_buffer(&buf.buf, (off * 4) as u64, staging, 0, (len * 4) as u64);
            record_kv_rows(enc, kv, staging, (len * 4) as u64, dims, rows);
        })?;
        scatter_kv_rows(&vals[len..], (k, v), dims, rows);
        vals.truncate(len);
        Ok(vals)
    }

    /// Submit everything recorded and read `buf[off..off + len]` back.
    pub fn finish_read(mut self, buf: &Buf, off: usize, len: usize) -> Result<Vec<f32>> {
        let gpu = self.gpu;
        let enc = self.encoder()?;
        gpu.read_after("forward pass", len, enc, |enc, staging| {
            enc.copy_buffer_to_buffer(&buf.buf, (off * 4) as u64, staging, 0, (len * 4) as u64);
        })
    }
}

impl Gpu {
    /// Copy host cache positions `from..to` of every layer (`[kv_heads][cap][hd]` per layer) to `kv`.
    pub fn upload_kv(
        &self,
        kv: &DeviceKv,
        (k, v): (&[Vec<f32>], &[Vec<f32>]),
        (kv_heads, hd, cap): (usize, usize, usize),
        (from, to): (usize, usize),
    ) {
        if to <= from {
            return;
        }
        for (l, (kl, vl)) in k.iter().zip(v).enumerate() {
            for g in 0..kv_heads {
                let a = (g * cap + from) * hd;
                let b = (g * cap + to) * hd;
                self.write_f32(&kv.k[l], a, &kl[a..b]);
                self.write_f32(&kv.v[l], a, &vl[a..b]);
            }
        }
    }

    /// Read positions `pos..pos + n` of every layer back into the host cache arrays.
    pub fn download_kv(
        &self,
        kv: &DeviceKv,
        (k, v): (&mut [Vec<f32>], &mut [Vec<f32>]),
        dims: (usize, usize, usize),
        rows: (usize, usize),
    ) -> Result<()> {
        let total = kv_rows_len(k.len(), dims, rows).max(1);
        let _guard = self.begin()?;
        let vals = self.record_and_read("reading the KV cache back", total, |enc, staging| {
            record_kv_rows(enc, kv, staging, 0, dims, rows);
        })?;
        scatter_kv_rows(&vals, (k, v), dims, rows);
        Ok(())
    }
}

/// Floats that positions `pos..pos + n` of every layer's keys and values take read back.
fn kv_rows_len(
    layers: usize,
    (kv_heads, hd, _): (usize, usize, usize),
    (_, n): (usize, usize),
) -> usize {
    layers * 2 * kv_heads * n * hd
}

/// Record copies of positions `pos..pos + n` of every layer's keys and values into `staging` from byte
/// `at`: per layer, each head's keys, then each head's values.
fn record_kv_rows(
    enc: &mut wg::CommandEncoder,
    kv: &DeviceKv,
    staging: &wg::Buffer,
    at: u64,
    (kv_heads, hd, cap): (usize, usize, usize),
    (pos, n): (usize, usize),
) {
    let run = n * hd;
    let per_layer = 2 * kv_heads * run;
    for l in 0..kv.k.len() {
        for g in 0..kv_heads {
            let src = ((g * cap + pos) * hd * 4) as u64;
            let dk = at + ((l * per_layer + g * run) * 4) as u64;
            let dv = at + ((l * per_layer + (kv_heads + g) * run) * 4) as u64;
            enc.copy_buffer_to_buffer(&kv.k[l].buf, src, staging, dk, (run * 4) as u64);
            enc.copy_buffer_to_buffer(&kv.v[l].buf, src, staging, dv, (run * 4) as u64);
        }
    }
}

/// Put rows read by [`record_kv_rows`] into the host cache's arrays.
fn scatter_kv_rows(
    vals: &[f32],
    (k, v): (&mut [Vec<f32>], &mut [Vec<f32>]),
    (kv_heads, hd, cap): (usize, usize, usize),
    (pos, n): (usize, usize),
) {
    let run = n * hd;
    let per_layer = 2 * kv_heads * run;
    for (l, (kl, vl)) in k.iter_mut().zip(v.iter_mut()).enumerate() {
        for g in 0..kv_heads {
            let dst = (g * cap + pos) * hd;
            let sk = l * per_layer + g * run;
            let sv = l * per_layer + (kv_heads + g) * run;
            kl[dst..dst + run].copy_from_slice(&vals[sk..sk + run]);
            vl[dst..dst + run].copy_from_slice(&vals[sv..sv + run]);
        }
    }
}
