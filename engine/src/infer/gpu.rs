//! The decoder forward pass on the GPU backend: every layer of a micro-batch recorded as one submission
//! (norms, linears, RoPE, the KV cache write, attention, SwiGLU and residuals all on the device), the
//! hidden states kept there, the logits read back. The host computes only the embedding rows and the RoPE
//! tables (so every RoPE scaling type is the host's). Used for exact arithmetic without an observer;
//! `llama-cpu` rounding and importance-matrix observation run the per-matmul path.

use ::wgpu as wg;

use super::kv_cache::KvCache;
use super::model::Model;
use crate::backend::wgpu::ops::{Buf, DeviceConsts, LayerConsts, Session};
use crate::backend::wgpu::{self, Gpu};
use crate::{Error, Result};

/// Chunks scored on the device so far (tests check the evaluation really scored there).
pub(crate) static DEVICE_SCORED: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Logits rows kept on the device (a KL-divergence base).
pub(crate) struct DeviceLogits {
    buf: Buf,
    rows: usize,
    vocab: usize,
}

/// What a device forward does with the logits of its wanted rows.
pub(crate) enum Head<'a> {
    /// None are wanted (the keys and values stay on the device too).
    None,
    /// Read them back.
    Logits,
    /// Keep them on the device, in `keep` from row `at` on.
    Keep { keep: &'a DeviceLogits, at: usize },
    /// Score them against `targets` (one per wanted row) into `out` from row `at` on (8 floats per row,
    /// `logits.wgsl`): alone, or against `base`'s rows from `at` on.
    Score {
        targets: &'a [u32],
        base: Option<&'a DeviceLogits>,
        out: &'a Buf,
        at: usize,
    },
}

/// One scored row from the device: `logits.wgsl`'s eight numbers.
pub(crate) type ScoredRow = [f32; 8];

/// Micro-batches run on the device so far (tests check the device path really ran).
pub(crate) static DEVICE_BATCHES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

impl Model {
    fn device_consts(&self, gpu: &Gpu) -> &DeviceConsts {
        self.gpu_consts().get_or_init(|| DeviceConsts {
            layers: (0..self.config().num_layers)
                .map(|li| {
                    let (attn, ffn) = self.norm_weights(li).unwrap_or((&[], &[]));
                    let [q, k, v] = self.qkv_biases(li);
                    LayerConsts {
                        attn_norm: gpu.upload_f32(attn),
                        ffn_norm: gpu.upload_f32(ffn),
                        bias: [q, k, v].map(|b| b.map(|b| gpu.upload_f32(b))),
                    }
                })
                .collect(),
            norm: gpu.upload_f32(self.final_norm()),
        })
    }

    /// [`Model::forward_gpu_batch`] returning the logits of rows `from..`.
    pub(crate) fn forward_gpu_logits(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        from: usize,
    ) -> Result<Vec<f32>> {
        self.forward_gpu_batch(tokens, cache, from, Head::Logits, None)
    }

    /// One micro-batch of [`Model::forward`] on the GPU (see the module documentation): runs `tokens` at
    /// positions `cache.len()..`, appends them to the cache, and hands the logits of rows `from..` to
    /// `head` (returning them, `[tokens.len() - from, vocab]`, for [`Head::Logits`]). Only with
    /// [`Head::Logits`] are the new keys and values read back to the host. On an error the cache is as it
    /// was.
    pub(crate) fn forward_gpu_batch(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        from: usize,
        head: Head<'_>,
        squares: Option<&Buf>,
    ) -> Result<Vec<f32>> {
        let gpu = wgpu::gpu()?;
        let c = self.config().clone();
        let (h, hd, heads, kvh) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (inter, vocab, layers) = (c.intermediate_size, c.vocab_size, c.num_layers);
        let cap = cache.capacity();
        if cache.is_f16() {
            return Err(Error::Invalid(
                "an f16 KV cache (made for the llama-cpu arithmetic on the CPU) cannot run on the GPU".into(),
            ));
        }
        if cache.device.is_none() {
            cache.device = Some(gpu.alloc_kv(layers, kvh * cap * hd)?);
            cache.device_len = 0;
        }
        let p0 = cache.len();
        let kv = cache
            .device
            .as_ref()
            .ok_or_else(|| Error::Gpu("no device KV cache".into()))?;
        if cache.device_len < p0 {
            gpu.upload_kv(
                kv,
                (&cache.k, &cache.v),
                (kvh, hd, cap),
                (cache.device_len, p0),
            );
        }
        let consts = self.device_consts(gpu);
        let m = tokens.len();
        let max_floats = (gpu.max_binding() / 4) as usize;
        // Every intermediate from the pool: decoding a token creates no buffers once warm.
        let x = gpu.scratch_with(&self.embed_tokens(tokens));
        let (cos, sin) = self.rope_tables(p0, m);
        let (cos, sin) = (gpu.scratch_with(&cos), gpu.scratch_with(&sin));
        let xn = gpu.scratch(m * h);
        let q = gpu.scratch(m * heads * hd);
        let k = gpu.scratch(m * kvh * hd);
        let v = gpu.scratch(m * kvh * hd);
        let attn = gpu.scratch(m * heads * hd);
        let proj = gpu.scratch(m * h);
        let gate = gpu.scratch(m * inter);
        let up = gpu.scratch(m * inter);
        let scores = gpu.scratch((heads * m * (p0 + m)).min(max_floats));
        let mut s = gpu.session()?;
        for li in 0..layers {
            use super::model::LinearKind as L;
            let lc = &consts.layers[li];
            let lin = |s: &mut Session<'_>, which, x: &Buf, y: &Buf| -> Result<()> {
                let w = self
                    .linear(li, which)
                    .ok_or_else(|| Error::Gpu(format!("layer {li}: missing weight")))?;
                s.linear(w, x, m, y)
            };
            let sq = squares.map(|b| (b, li * self.squares_per_layer()));
            s.rms_norm(&x, &lc.attn_norm, &xn, m, h, c.rms_norm_eps);
            if let Some((b, o)) = sq {
                s.sum_squares(b, o, &xn, m, h);
            }
            lin(&mut s, L::Q, &xn, &q)?;
            lin(&mut s, L::K, &xn, &k)?;
            lin(&mut s, L::V, &xn, &v)?;
            for (b, y) in lc.bias.iter().zip([&q, &k, &v]) {
                if let Some(b) = b {
                    s.bias(y, b, y.len);
                }
            }
            s.rope(&q, &cos, &sin, m, heads, hd);
            s.rope(&k, &cos, &sin, m, kvh, hd);
            s.kv_write(kv, li, (&k, &v), m, (kvh, hd, cap, p0));
            s.attention(kv, li, (&q, &attn, &scores), m, p0, (heads, kvh, hd, cap))?;
            if let Some((b, o)) = sq {
                s.sum_squares(b, o + h, &attn, m, heads * hd);
            }
            lin(&mut s, L::O, &attn, &proj)?;
            s.add(&x, &proj, m * h);
            s.rms_norm(&x, &lc.ffn_norm, &xn, m, h, c.rms_norm_eps);
            if let Some((b, o)) = sq {
                s.sum_squares(b, o + h + heads * hd, &xn, m, h);
            }
            lin(&mut s, L::Gate, &xn, &gate)?;
            lin(&mut s, L::Up, &xn, &up)?;
            s.swiglu(&gate, &up, m * inter);
            if let Some((b, o)) = sq {
                s.sum_squares(b, o + 2 * h + heads * hd, &gate, m, inter);
            }
            lin(&mut s, L::Down, &gate, &proj)?;
            s.add(&x, &proj, m * h);
        }
        // The wanted rows' logits, in groups whose logits fit one binding; the first group rides the layers'
        // submission (a decoded token is one submission, its logits and new K/V rows one read).
        let mut layers = Some(s);
        let from = from.min(m);
        let mirror = matches!(head, Head::Logits);
        let mut logits = vec![0.0f32; if mirror { (m - from) * vocab } else { 0 }];
        let targets = match &head {
            Head::Score { targets, .. } => {
                if targets.len() < m - from || targets.iter().any(|&t| t as usize >= vocab) {
                    return Err(Error::Invalid(
                        "scoring: targets outside the vocabulary".into(),
                    ));
                }
                Some(gpu.upload_with(
                    "targets",
                    bytemuck::cast_slice(&targets[..m - from]),
                    wg::BufferUsages::empty(),
                ))
            }
            _ => None,
        };
        let rows_per = (max_floats / vocab.max(1)).max(1);
        let mut r = from;
        let mut kv_read = false;
        while r < m && !matches!(head, Head::None) {
            let k = rows_per.min(m - r);
            let xr = gpu.scratch(k * h);
            let out = gpu.scratch(k * vocab);
            let mut s = match layers.take() {
                Some(s) => s,
                None => gpu.session()?,
            };
            s.copy(&x, r * h, &xr, 0, k * h);
            s.rms_norm(&xr, &consts.norm, &xn, k, h, c.rms_norm_eps);
            s.linear(self.lm_head(), &xn, k, &out)?;
            match &head {
                Head::None => {}
                Head::Logits if mirror && r + k == m && !kv_read => {
                    let host = cache.host_len;
                    let vals = s.finish_read_with_kv(
                        (&out, 0, k * vocab),
                        kv,
                        (&mut cache.k, &mut cache.v),
                        (kvh, hd, cap),
                        (host, p0 + m - host),
                    )?;
                    kv_read = true;
                    let at = (r - from) * vocab;
                    logits[at..at + k * vocab].copy_from_slice(&vals);
                }
                Head::Logits => {
                    let vals = s.finish_read(&out, 0, k * vocab)?;
                    let at = (r - from) * vocab;
                    logits[at..at + k * vocab].copy_from_slice(&vals);
                }
                Head::Keep { keep, at } => {
                    let row = at + r - from;
                    if row + k > keep.rows || keep.vocab != vocab {
                        return Err(Error::Invalid("device logits: rows out of range".into()));
                    }
                    s.copy(&out, 0, &keep.buf, row * vocab, k * vocab);
                    s.submit()?;
                }
                Head::Score {
                    base, out: dst, at, ..
                } => {
                    let row = at + r - from;
                    if let Some(b) = base {
                        if row + k > b.rows || b.vocab != vocab {
                            return Err(Error::Invalid(
                                "KL-divergence base: rows out of range".into(),
                            ));
                        }
                    }
                    if (row + k) * 8 > dst.len {
                        return Err(Error::Invalid("scores: rows out of range".into()));
                    }
                    let tb = targets
                        .as_ref()
                        .ok_or_else(|| Error::Gpu("no targets".into()))?;
                    s.score_rows(
                        &out,
                        base.map(|b| (&b.buf, row)),
                        tb,
                        r - from,
                        dst,
                        row,
                        (k, vocab),
                    );
                    s.submit()?;
                }
            }
            r += k;
        }
        if let Some(s) = layers {
            s.submit()?;
        }
        if mirror && !kv_read {
            let host = cache.host_len;
            gpu.download_kv(
                kv,
                (&mut cache.k, &mut cache.v),
                (kvh, hd, cap),
                (host, p0 + m - host),
            )?;
        }
        cache.push_tokens(tokens, mirror && cache.host_len == p0);
        cache.device_len = cache.len();
        DEVICE_BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(logits)
    }
}

impl Model {
    /// Whether [`Model::forward`] runs whole micro-batches on the device (GPU backend, exact arithmetic, a
    /// usable GPU): the evaluation then scores on the device too.
    pub(crate) fn forwards_on_device(&self) -> bool {
        self.backend() == crate::backend::Backend::Gpu
            && self.numerics() == super::Numerics::Exact
            && crate::backend::gpu_usable()
    }

    /// Run `tokens` from position `cache.len()` and hand the logits of rows `from..` to `head` micro-batch
    /// by micro-batch (`at` counting from `from`).
    fn forward_to_head<'h>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        from: usize,
        head: &dyn Fn(usize) -> Head<'h>,
    ) -> Result<()> {
        let from = from.min(tokens.len());
        // The unscored prefix: no logits, and its keys and values stay on the device too.
        for c0 in (0..from).step_by(super::model::UBATCH) {
            let c1 = (c0 + super::model::UBATCH).min(from);
            self.forward_gpu_batch(&tokens[c0..c1], cache, c1 - c0, Head::None, None)?;
        }
        for c0 in (from..tokens.len()).step_by(super::model::UBATCH) {
            let c1 = (c0 + super::model::UBATCH).min(tokens.len());
            self.forward_gpu_batch(&tokens[c0..c1], cache, 0, head(c0 - from), None)?;
        }
        Ok(())
    }

    /// The logits of rows `from..` of `tokens` (run from position `cache.len()`), kept on the device.
    pub(crate) fn logits_on_device(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        from: usize,
    ) -> Result<DeviceLogits> {
        let gpu = wgpu::gpu()?;
        let vocab = self.config().vocab_size;
        let rows = tokens.len() - from.min(tokens.len());
        if (rows * vocab * 4) as u64 > gpu.max_binding() {
            return Err(Error::Gpu(format!(
                "{rows} rows of logits do not fit a storage binding"
            )));
        }
        let keep = DeviceLogits {
            buf: gpu.alloc(rows * vocab),
            rows,
            vocab,
        };
        self.forward_to_head(tokens, cache, from, &|at| Head::Keep { keep: &keep, at })?;
        Ok(keep)
    }

    /// Rows `from..` of `tokens` (run from position `cache.len()`) scored on the device against
    /// `targets` (one per row), alone or against `base` (see [`Head::Score`]).
    pub(crate) fn score_on_device(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        from: usize,
        targets: &[u32],
        base: Option<&DeviceLogits>,
    ) -> Result<Vec<ScoredRow>> {
        let gpu = wgpu::gpu()?;
        let rows = tokens.len() - from.min(tokens.len());
        if targets.len() != rows || base.is_some_and(|b| b.rows != rows) {
            return Err(Error::Invalid(
                "scoring: one target (and base row) per row".into(),
            ));
        }
        let out = gpu.alloc(rows * 8);
        self.forward_to_head(tokens, cache, from, &|at| Head::Score {
            targets: &targets[at..],
            base,
            out: &out,
            at,
        })?;
        let vals = gpu.session()?.finish_read(&out, 0, rows * 8)?;
        DEVICE_SCORED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(vals
            .chunks_exact(8)
            .map(|c| {
                let mut r = [0f32; 8];
                r.copy_from_slice(c);
                r
            })
            .collect())
    }

    /// Floats of a layer's importance-matrix sums: the inputs of q/k/v (hidden), of o (heads · head_dim),
    /// of gate/up (hidden) and of down (intermediate), in that order.
    pub(crate) fn squares_per_layer(&self) -> usize {
        let c = self.config();
        2 * c.hidden_size + c.num_heads * c.head_dim + c.intermediate_size
    }

    /// Run `tokens` from an empty `cache` on the device and return, per layer, the sums of squares of each
    /// matmul input's columns over the tokens ([`Model::squares_per_layer`] floats per layer): an importance
    /// matrix's chunk without a single activation leaving the device.
    pub(crate) fn squares_on_device(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let gpu = wgpu::gpu()?;
        let len = self.squares_per_layer() * self.config().num_layers;
        let sums = gpu.alloc(len);
        for c0 in (0..tokens.len()).step_by(super::model::UBATCH) {
            let c1 = (c0 + super::model::UBATCH).min(tokens.len());
            let n = c1 - c0;
            self.forward_gpu_batch(&tokens[c0..c1], cache, n, Head::None, Some(&sums))?;
        }
        gpu.session()?.finish_read(&sums, 0, len)
    }

    /// Read the positions only the device holds back into the host arrays.
    pub(crate) fn sync_host(&self, cache: &mut KvCache) -> Result<()> {
        let (host, len) = (cache.host_len, cache.len());
        if host >= len {
            return Ok(());
        }
        let gpu = wgpu::gpu()?;
        let (kvh, hd, cap) = (cache.kv_heads, cache.head_dim, cache.capacity());
        let kv = cache
            .device
            .as_ref()
            .filter(|_| cache.device_len >= len)
            .ok_or_else(|| Error::Gpu("the cache's positions are on no device".into()))?;
        gpu.download_kv(
            kv,
            (&mut cache.k, &mut cache.v),
            (kvh, hd, cap),
            (host, len - host),
        )?;
        cache.host_len = len;
        Ok(())
    }
}
