//! The decoder forward pass on the GPU backend: every layer of a micro-batch recorded as one submission
//! (norms, linears, RoPE, the KV cache write, attention, SwiGLU and residuals all on the device), the
//! hidden states kept there, the logits read back. The host computes only the embedding rows and the RoPE
//! tables (so every RoPE scaling type is the host's). Used for exact arithmetic without an observer;
//! `llama-cpu` rounding and importance-matrix observation run the per-matmul path.

use super::kv_cache::KvCache;
use super::model::Model;
use crate::backend::wgpu::ops::{Buf, DeviceConsts, LayerConsts, Session};
use crate::backend::wgpu::{self, Gpu};
use crate::{Error, Result};

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

    /// One micro-batch of [`Model::forward`] on the GPU (see the module documentation): runs `tokens` at
    /// positions `cache.len()..`, appends them to the cache, and returns the logits of rows `from..`
    /// (`[tokens.len() - from, vocab]`). On an error the cache is as it was.
    pub(crate) fn forward_gpu_batch(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        from: usize,
    ) -> Result<Vec<f32>> {
        let gpu = wgpu::gpu()?;
        let c = self.config().clone();
        let (h, hd, heads, kvh) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (inter, vocab, layers) = (c.intermediate_size, c.vocab_size, c.num_layers);
        let cap = cache.capacity();
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
        let x = gpu.upload_f32(&self.embed_tokens(tokens));
        let (cos, sin) = self.rope_tables(p0, m);
        let (cos, sin) = (gpu.upload_f32(&cos), gpu.upload_f32(&sin));
        let xn = gpu.alloc(m * h);
        let q = gpu.alloc(m * heads * hd);
        let k = gpu.alloc(m * kvh * hd);
        let v = gpu.alloc(m * kvh * hd);
        let attn = gpu.alloc(m * heads * hd);
        let proj = gpu.alloc(m * h);
        let gate = gpu.alloc(m * inter);
        let up = gpu.alloc(m * inter);
        let scores = gpu.alloc((heads * m * (p0 + m)).min(max_floats));
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
            s.rms_norm(&x, &lc.attn_norm, &xn, m, h, c.rms_norm_eps);
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
            lin(&mut s, L::O, &attn, &proj)?;
            s.add(&x, &proj, m * h);
            s.rms_norm(&x, &lc.ffn_norm, &xn, m, h, c.rms_norm_eps);
            lin(&mut s, L::Gate, &xn, &gate)?;
            lin(&mut s, L::Up, &xn, &up)?;
            s.swiglu(&gate, &up, m * inter);
            lin(&mut s, L::Down, &gate, &proj)?;
            s.add(&x, &proj, m * h);
        }
        s.submit()?;
        // Logits of the wanted rows, in groups whose logits fit one binding.
        let mut logits = vec![0.0f32; (m - from.min(m)) * vocab];
        let rows_per = (max_floats / vocab.max(1)).max(1);
        let mut r = from.min(m);
        while r < m {
            let k = rows_per.min(m - r);
            let xr = gpu.alloc(k * h);
            let out = gpu.alloc(k * vocab);
            let mut s = gpu.session()?;
            s.copy(&x, r * h, &xr, 0, k * h);
            s.rms_norm(&xr, &consts.norm, &xn, k, h, c.rms_norm_eps);
            s.linear(self.lm_head(), &xn, k, &out)?;
            let vals = s.finish_read(&out, 0, k * vocab)?;
            let at = (r - from) * vocab;
            logits[at..at + k * vocab].copy_from_slice(&vals);
            r += k;
        }
        gpu.download_kv(kv, (&mut cache.k, &mut cache.v), (kvh, hd, cap), (p0, m))?;
        cache.push_tokens(tokens);
        cache.device_len = cache.len();
        DEVICE_BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(logits)
    }
}
