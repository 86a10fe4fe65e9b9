//! The Llama-family decoder (Llama, Mistral, Qwen2), exact against transformers in float32.
//!
//! Weights stay in their stored type ([`TensorRef`] clones share the mapped file); only norms and biases
//! are copied to f32. Prompts run in batches through [`TensorRef::matmul`] (GEMM over dequantised tiles)
//! and attention through GEMMs per KV head, parallel over heads and row blocks; one-token decoding takes
//! the matrix-vector and dot-product paths.

use std::collections::BTreeMap;
use std::path::Path;

use super::kv_cache::{KvCache, KvLayer};
use super::numerics::{matmul_with, round_f16, Numerics};
use crate::backend::sgemm::{product_packed, Packed, WLayout};
use crate::backend::Backend;
use crate::model::{ModelConfig, SourceModel};
use crate::simd::dot;
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// Which rows of logits [`Model::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None (only fill the cache).
    None,
    /// The last token's.
    Last,
    /// Every token's.
    All,
    /// Those of tokens `i..` of the batch.
    From(usize),
}

/// The input of a group of matmuls that share it, as an imatrix collector sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulInput {
    /// The normed hidden state going into q, k and v.
    Attention,
    /// The attention output going into o.
    AttentionOutput,
    /// The normed hidden state going into gate and up.
    Ffn,
    /// `silu(gate) · up` going into down.
    FfnDown,
}

impl MatmulInput {
    /// The GGUF names (without `blk.N.` and `.weight`) of the matmuls that read this input.
    pub fn gguf_weights(self) -> &'static [&'static str] {
        match self {
            Self::Attention => &["attn_q", "attn_k", "attn_v"],
            Self::AttentionOutput => &["attn_output"],
            Self::Ffn => &["ffn_gate", "ffn_up"],
            Self::FfnDown => &["ffn_down"],
        }
    }
}

/// Sees every decoder-layer matmul input: `x` is `[n, cols]` row-major.
pub trait MatmulObserver {
    fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], n: usize);
}

/// The linear layers of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The Hugging Face name of this linear's weight in layer `li`.
    pub fn hf_name(self, li: usize) -> String {
        let m = match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        };
        format!("model.layers.{li}.{m}.weight")
    }

    /// The matmul input this linear reads.
    pub fn input(self) -> MatmulInput {
        match self {
            Self::Q | Self::K | Self::V => MatmulInput::Attention,
            Self::O => MatmulInput::AttentionOutput,
            Self::Gate | Self::Up => MatmulInput::Ffn,
            Self::Down => MatmulInput::FfnDown,
        }
    }
}

/// Activation buffers of one micro-batch.
struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Compute each token with the arithmetic of a one-token batch ([`Model::forward_as_steps`]).
    as_steps: bool,
}

impl Scratch {
    fn new(c: &ModelConfig, n: usize) -> Self {
        let (h, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        Self {
            xn: vec![0.0; n * h],
            q: vec![0.0; n * c.num_heads * hd],
            k: vec![0.0; n * c.num_kv_heads * hd],
            v: vec![0.0; n * c.num_kv_heads * hd],
            attn: vec![0.0; n * c.num_heads * hd],
            proj: vec![0.0; n * h],
            gate: vec![0.0; n * i],
            up: vec![0.0; n * i],
            as_steps: false,
        }
    }
}

/// Tokens per internal micro-batch: bounds the activation buffers of long prompts.
pub(crate) const UBATCH: usize = 512;
/// Query rows per attention task.
const ATTN_ROWS: usize = 64;

/// How a linear runs: where, and with which activation rounding.
#[derive(Clone, Copy, Debug)]
struct Exec {
    backend: Backend,
    numerics: Numerics,
    /// Each of the `n` rows computed exactly as a one-row call computes it.
    as_steps: bool,
}

/// `out[n, rows] = x[n, cols] · Wᵀ` as `ex` says.
fn matmul_exec(w: &TensorRef, x: &[f32], n: usize, out: &mut [f32], ex: Exec) {
    if !ex.as_steps || n == 1 {
        matmul_with(ex.backend, w, x, n, out, ex.numerics);
    } else if ex.backend == Backend::Cpu && ex.numerics == Numerics::Exact {
        // The decoding matvec's dots, each weight row read once for all rows.
        crate::backend::cpu::matmul_as_rows(w, x, n, out);
    } else if ex.backend == Backend::Cpu
        && ex.numerics == Numerics::LlamaCpu
        && super::numerics::fused_rows(w, x, n, out)
    {
        // The integer dots, each weight row read once for all rows.
    } else {
        let (rows, cols) = (w.rows(), w.cols());
        for (xt, ot) in x.chunks_exact(cols).zip(out.chunks_exact_mut(rows)) {
            matmul_with(ex.backend, w, xt, 1, ot, ex.numerics);
        }
    }
}

/// A linear layer: weight in its stored type, optional f32 bias.
#[derive(Clone, Debug)]
struct Linear {
    w: TensorRef,
    b: Option<Vec<f32>>,
}

impl Linear {
    /// `out[n, rows] = x[n, cols] · Wᵀ + b` on `ex.backend`, activations rounded as `ex.numerics` says.
    fn forward(&self, x: &[f32], n: usize, out: &mut [f32], ex: Exec) {
        matmul_exec(&self.w, x, n, out, ex);
        if let Some(b) = &self.b {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, &bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
    }

    fn rows(&self) -> usize {
        self.w.rows()
    }

    /// `outs[k] = lins[k](x)` for linears that read the same activations: when one token is decoded on the
    /// CPU in the llama-cpu arithmetic, all of their rows in one job of the spinning pool with the
    /// activations quantized once ([`super::numerics::decode_group`]; the same numbers), else one after
    /// another.
    fn forward_group(lins: &[&Linear], x: &[f32], n: usize, outs: &mut [&mut [f32]], ex: Exec) {
        let grouped = n == 1
            && ex.backend == Backend::Cpu
            && ex.numerics == Numerics::LlamaCpu
            && super::numerics::decode_group(
                &lins.iter().map(|l| &l.w).collect::<Vec<_>>(),
                x,
                outs,
            );
        if !grouped {
            for (l, out) in lins.iter().zip(outs.iter_mut()) {
                l.forward(x, n, out, ex);
            }
            return;
        }
        for (l, out) in lins.iter().zip(outs.iter_mut()) {
            if let Some(b) = &l.b {
                for (o, &bb) in out.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A model ready to run.
#[derive(Clone)]
pub struct Model {
    cfg: ModelConfig,
    embed: TensorRef,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: TensorRef,
    inv_freq: Vec<f32>,
    numerics: Numerics,
    backend: Backend,
    /// Norms and biases on the GPU, made on first use there (shared by clones).
    gpu: crate::backend::wgpu::ops::ConstsSlot,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.cfg)
            .field("embed", &self.embed.type_label())
            .field("lm_head", &self.lm_head.name)
            .finish_non_exhaustive()
    }
}

/// A 1-D tensor as f32, undoing llama.cpp's interleaved-RoPE order if the handle carries it.
fn vector_f32(t: &TensorRef) -> Vec<f32> {
    let v = t.to_f32();
    match t.rope_interleaved_heads {
        Some(heads)
            if heads > 0
                && v.len().is_multiple_of(heads)
                && (v.len() / heads).is_multiple_of(2) =>
        {
            let hd = v.len() / heads;
            let half = hd / 2;
            (0..v.len())
                .map(|r| {
                    let (g, w) = (r / hd, r % hd);
                    let (j, i) = (w / half, w % half);
                    v[g * hd + 2 * i + j]
                })
                .collect()
        }
        _ => v,
    }
}

struct Loader<'a> {
    path: &'a Path,
    tensors: &'a BTreeMap<String, TensorRef>,
}

impl Loader<'_> {
    fn err(&self, detail: String) -> Error {
        Error::malformed(self.path, "model", detail)
    }

    fn opt(&self, name: &str, shape: &[usize]) -> Result<Option<TensorRef>> {
        match self.tensors.get(name) {
            None => Ok(None),
            Some(t) if t.shape == shape => Ok(Some(t.clone())),
            Some(t) => Err(self.err(format!(
                "tensor {name} has shape {:?}, but the config implies {shape:?}",
                t.shape
            ))),
        }
    }

    fn req(&self, name: &str, shape: &[usize]) -> Result<TensorRef> {
        self.opt(name, shape)?
            .ok_or_else(|| self.err(format!("tensor {name} (shape {shape:?}) is missing")))
    }

    fn vec(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(vector_f32(&self.req(name, &[len])?))
    }

    fn linear(&self, prefix: &str, rows: usize, cols: usize, bias: bool) -> Result<Linear> {
        let w = self.req(&format!("{prefix}.weight"), &[rows, cols])?;
        let bname = format!("{prefix}.bias");
        let b = if bias {
            Some(self.vec(&bname, rows)?)
        } else {
            self.opt(&bname, &[rows])?.map(|t| vector_f32(&t))
        };
        Ok(Linear { w, b })
    }
}

impl Model {
    /// Take the tensors of `src`, checking every shape against its config.
    pub fn load(src: &SourceModel) -> Result<Model> {
        Self::from_parts(&src.path, &src.config, &src.tensors)
    }

    /// Build from a config and tensors by Hugging Face name (`path` names the model in errors).
    pub fn from_parts(
        path: &Path,
        cfg: &ModelConfig,
        tensors: &BTreeMap<String, TensorRef>,
    ) -> Result<Model> {
        let c = cfg;
        let bad = |d: String| Error::malformed(path, "config", d);
        if c.hidden_size == 0 || c.num_layers == 0 || c.num_heads == 0 || c.num_kv_heads == 0 {
            return Err(bad(
                "hidden size, layers, heads and KV heads must be non-zero".into(),
            ));
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                c.num_heads, c.num_kv_heads
            )));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even and non-zero",
                c.head_dim
            )));
        }
        if c.vocab_size == 0 || c.intermediate_size == 0 {
            return Err(bad("vocab and intermediate sizes must be non-zero".into()));
        }
        let ld = Loader { path, tensors };
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let embed = ld.req("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = ld
            .opt("lm_head.weight", &[c.vocab_size, h])?
            .unwrap_or_else(|| embed.clone());
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let i = c.intermediate_size;
            layers.push(Layer {
                attn_norm: ld.vec(&format!("{p}.input_layernorm.weight"), h)?,
                q: ld.linear(&format!("{a}.q_proj"), qd, h, c.attention_bias)?,
                k: ld.linear(&format!("{a}.k_proj"), kvd, h, c.attention_bias)?,
                v: ld.linear(&format!("{a}.v_proj"), kvd, h, c.attention_bias)?,
                o: ld.linear(&format!("{a}.o_proj"), h, qd, false)?,
                ffn_norm: ld.vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate: ld.linear(&format!("{m}.gate_proj"), i, h, false)?,
                up: ld.linear(&format!("{m}.up_proj"), i, h, false)?,
                down: ld.linear(&format!("{m}.down_proj"), h, i, false)?,
            });
        }
        let norm = ld.vec("model.norm.weight", h)?;
        let inv_freq = c.rope_inv_freq();
        Ok(Model {
            cfg: c.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            numerics: Numerics::Exact,
            backend: Backend::Cpu,
            gpu: Default::default(),
        })
    }

    /// Where the GPU forward keeps this model's norms and biases.
    pub(crate) fn gpu_consts(&self) -> &crate::backend::wgpu::ops::ConstsSlot {
        &self.gpu
    }

    /// The q, k and v biases of layer `li` (Qwen2), where present.
    pub(crate) fn qkv_biases(&self, li: usize) -> [Option<&[f32]>; 3] {
        let l = &self.layers[li];
        [&l.q, &l.k, &l.v].map(|lin| lin.b.as_deref())
    }

    /// The final norm's weights.
    pub(crate) fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// Round activations as `numerics` says from now on (a clone of a shared model can differ from it).
    pub fn set_numerics(&mut self, numerics: Numerics) {
        self.numerics = numerics;
    }

    /// How activations are rounded.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }

    /// Run on `backend` from now on.
    pub fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    /// A copy of this model (weights shared) that runs on `backend`.
    pub fn on_backend(&self, backend: Backend) -> Self {
        let mut m = self.clone();
        m.backend = backend;
        m
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How the linears run: backend and activation rounding.
    fn exec(&self) -> Exec {
        Exec {
            backend: self.backend,
            numerics: self.numerics,
            as_steps: false,
        }
    }

    /// [`exec`](Self::exec) for a batch computed as `s` says.
    fn exec_for(&self, s: &Scratch) -> Exec {
        Exec {
            as_steps: s.as_steps,
            ..self.exec()
        }
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Size of a row of logits.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Check that `tokens` positions fit the model and the machine, before anything that size is made:
    /// at most the model's trained context (`max_position_embeddings`) unless `allow_long`, and the KV
    /// cache plus a chunk's logits (sized with checked arithmetic) within the machine's memory.
    pub fn check_context(&self, tokens: usize, allow_long: bool) -> Result<()> {
        let trained = self.cfg.max_position_embeddings;
        if tokens == 0 {
            return Err(Error::Invalid(
                "a context of 0 tokens: use at least 1".into(),
            ));
        }
        if !allow_long && trained > 0 && tokens > trained {
            return Err(Error::Invalid(format!(
                "a context of {tokens} tokens is longer than the model's {trained} \
                 (max_position_embeddings): use 1..={trained}, or --allow-long-context to go past it \
                 (quality degrades)"
            )));
        }
        let c = &self.cfg;
        let bytes = (|| {
            let kv = (c.num_layers as u64)
                .checked_mul(2)?
                .checked_mul(c.num_kv_heads as u64)?
                .checked_mul(c.head_dim as u64)?
                .checked_mul(tokens as u64)?
                .checked_mul(4)?;
            let logits = (tokens as u64)
                .checked_mul(c.vocab_size as u64)?
                .checked_mul(4)?;
            kv.checked_add(logits)
        })();
        let memory = crate::bounded::total_memory_bytes();
        match (bytes, memory) {
            (None, _) => Err(Error::Invalid(format!(
                "a context of {tokens} tokens is too large to size its KV cache"
            ))),
            (Some(b), Some(m)) if b > m => Err(Error::Invalid(format!(
                "a context of {tokens} tokens needs {:.1} GiB for the KV cache and logits, more than \
                 this machine's {:.1} GiB of memory: use a smaller context",
                b as f64 / f64::from(1u32 << 30),
                m as f64 / f64::from(1u32 << 30)
            ))),
            _ => Ok(()),
        }
    }

    /// An empty cache for up to `capacity_tokens` positions: f16 (half the memory, as llama.cpp's default)
    /// for the `llama-cpu` arithmetic on the CPU, whose keys and values are f16-rounded anyway, f32
    /// otherwise (the exact arithmetic keeps them unrounded; the GPU's attention reads f32). Make it after
    /// [`set_numerics`](Self::set_numerics): an f16 cache refuses the exact arithmetic.
    pub fn new_cache(&self, capacity_tokens: usize) -> KvCache {
        KvCache::new(
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            capacity_tokens,
            self.numerics == Numerics::LlamaCpu && self.backend == Backend::Cpu,
        )
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their keys and values to the cache, and returns
    /// logits row-major `[k, vocab]` for the rows `want` selects.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, want: Logits) -> Result<Vec<f32>> {
        self.forward_observed(tokens, cache, want, None)
    }

    /// [`Model::forward`], showing every decoder-layer matmul input to `observer` (for importance
    /// matrices).
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        want: Logits,
        observer: Option<&mut dyn MatmulObserver>,
    ) -> Result<Vec<f32>> {
        self.forward_impl(tokens, cache, want, observer, false)
    }

    /// Every token's logits (as [`Logits::All`]), each row computed with the arithmetic of a one-token
    /// [`forward`](Self::forward): the logits and the cache's keys and values equal, bit for bit, those of
    /// feeding `tokens` one at a time, while on the CPU each weight row is read once for the whole batch.
    /// A speculative decoder verifies its draft with this, so greedy output never depends on the draft.
    /// (On the GPU the tokens do run one at a time.)
    pub fn forward_as_steps(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        if self.backend == Backend::Gpu {
            let mut all = Vec::with_capacity(tokens.len() * self.cfg.vocab_size);
            for &t in tokens {
                all.extend(self.forward(&[t], cache, Logits::Last)?);
            }
            return Ok(all);
        }
        self.forward_impl(tokens, cache, Logits::All, None, true)
    }

    fn forward_impl(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        want: Logits,
        mut observer: Option<&mut dyn MatmulObserver>,
        as_steps: bool,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if cache.layers() != c.num_layers
            || cache.kv_heads != c.num_kv_heads
            || cache.head_dim != c.head_dim
        {
            return Err(Error::Invalid(
                "the KV cache was made for a different model".into(),
            ));
        }
        if cache.is_f16() && (self.numerics != Numerics::LlamaCpu || self.backend == Backend::Gpu) {
            return Err(Error::Invalid(
                "this KV cache stores f16 keys and values (made for the llama-cpu arithmetic on the CPU): \
                 the exact arithmetic and the GPU need an f32 one (make the cache after choosing them)"
                    .into(),
            ));
        }
        if tokens.len() > cache.remaining() {
            return Err(Error::Invalid(format!(
                "context full: {} tokens do not fit after {} of {} positions",
                tokens.len(),
                cache.len(),
                cache.capacity()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let n = tokens.len();
        let from = match want {
            Logits::None => n,
            Logits::Last => n.saturating_sub(1),
            Logits::All => 0,
            Logits::From(i) => i.min(n),
        };
        let vocab = c.vocab_size;
        let mut logits = vec![0.0f32; (n - from) * vocab];
        let mut c0 = 0;
        // The GPU runs whole micro-batches on the device when nothing needs to see inside them.
        let on_device =
            self.backend == Backend::Gpu && self.numerics == Numerics::Exact && observer.is_none();
        while c0 < n {
            let c1 = (c0 + UBATCH).min(n);
            if on_device && crate::backend::gpu_usable() {
                let w0 = from.max(c0);
                match self.forward_gpu_logits(&tokens[c0..c1], cache, w0 - c0) {
                    Ok(l) => {
                        logits[(w0 - from) * vocab..(c1 - from) * vocab].copy_from_slice(&l);
                        c0 = c1;
                        continue;
                    }
                    Err(e) => crate::backend::gpu_failed(&e),
                }
            }
            if cache.host_len < cache.len() {
                // The host path reads every earlier position from the host arrays.
                self.sync_host(cache)?;
            }
            let hidden = self.run_batch(&tokens[c0..c1], cache, &mut observer, as_steps);
            let w0 = from.max(c0);
            if w0 < c1 {
                let k = c1 - w0;
                let h = c.hidden_size;
                let mut x = hidden[(w0 - c0) * h..].to_vec();
                rms_norm(&mut x, &self.norm, c.rms_norm_eps);
                let out = &mut logits[(w0 - from) * vocab..(c1 - from) * vocab];
                let ex = Exec {
                    as_steps,
                    ..self.exec()
                };
                matmul_exec(&self.lm_head, &x, k, out, ex);
            }
            c0 = c1;
        }
        Ok(logits)
    }

    /// Run one micro-batch through every layer, filling the cache; returns the final hidden states
    /// `[n, hidden]` (before the final norm).
    fn run_batch(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: &mut Option<&mut dyn MatmulObserver>,
        as_steps: bool,
    ) -> Vec<f32> {
        let n = tokens.len();
        let p0 = cache.len();
        let mut x = self.embed_tokens(tokens);
        let (cos, sin) = self.rope_tables(p0, n);
        let mut s = Scratch::new(&self.cfg, n);
        s.as_steps = as_steps;
        for li in 0..self.layers.len() {
            self.layer_step(
                li,
                &mut x,
                n,
                p0,
                (&cos, &sin),
                cache,
                &mut s,
                observer,
                None,
            );
        }
        cache.push_tokens(tokens, true);
        x
    }

    /// The embeddings of `tokens`, `[n, hidden]`.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            self.embed.dequant_row(t as usize, row);
        }
        x
    }

    /// Run decoder layer `li` alone over the hidden states `x` (`[n, hidden]`, positions `0..n` of one
    /// sequence), in place, showing its matmul inputs to `observer`; `cache` (any cache of this model with
    /// room for `n`, its contents are overwritten) holds the layer's keys and values meanwhile. Layer-wise
    /// calibration (GPTQ) runs a model this way, one layer at a time.
    pub fn run_layer(
        &self,
        li: usize,
        x: &mut [f32],
        n: usize,
        cache: &mut KvCache,
        observer: Option<&mut dyn MatmulObserver>,
    ) -> Result<()> {
        self.run_layer_to(li, x, n, cache, observer, None)
    }

    /// [`run_layer`](Self::run_layer), stopping once the observer has seen `until` (when given).
    fn run_layer_to(
        &self,
        li: usize,
        x: &mut [f32],
        n: usize,
        cache: &mut KvCache,
        observer: Option<&mut dyn MatmulObserver>,
        until: Option<MatmulInput>,
    ) -> Result<()> {
        if li >= self.layers.len() || x.len() != n * self.cfg.hidden_size || n > cache.capacity() {
            return Err(Error::Invalid(format!(
                "run_layer: layer {li} of {}, {} values for {n} tokens, cache of {}",
                self.layers.len(),
                x.len(),
                cache.capacity()
            )));
        }
        // q/k/v's input comes before RoPE: no tables needed to stop there.
        let (cos, sin) = if until == Some(MatmulInput::Attention) {
            (Vec::new(), Vec::new())
        } else {
            self.rope_tables(0, n)
        };
        let mut s = Scratch::new(&self.cfg, n);
        let mut observer = observer;
        self.layer_step(
            li,
            x,
            n,
            0,
            (&cos, &sin),
            cache,
            &mut s,
            &mut observer,
            until,
        );
        Ok(())
    }

    /// The MLP half of layer `li` over `x`, the state after attention (`x` + o's output) — what
    /// [`run_layer_until`](Self::run_layer_until) leaves in `x` when it stops at gate/up's or down's
    /// input. Together they compute exactly what [`run_layer`](Self::run_layer) computes.
    pub fn run_ffn(&self, li: usize, x: &mut [f32], n: usize) -> Result<()> {
        if li >= self.layers.len() || x.len() != n * self.cfg.hidden_size {
            return Err(Error::Invalid(format!(
                "run_ffn: layer {li} of {}, {} values for {n} tokens",
                self.layers.len(),
                x.len()
            )));
        }
        let mut s = Scratch::new(&self.cfg, n);
        self.ffn_step(li, x, n, &mut s, &mut None, None);
        Ok(())
    }

    /// [`run_layer`](Self::run_layer) only as far as the observer has seen `until` (calibration needs a
    /// stage's inputs, not the layer's output: q/k/v's input needs no matmul, o's needs q/k/v and the
    /// attention, gate/up's needs o too, down's needs gate/up). `x` is left part way.
    pub fn run_layer_until(
        &self,
        li: usize,
        x: &mut [f32],
        n: usize,
        cache: &mut KvCache,
        observer: &mut dyn MatmulObserver,
        until: MatmulInput,
    ) -> Result<()> {
        self.run_layer_to(li, x, n, cache, Some(observer), Some(until))
    }

    /// The input of layer `li`'s q/k/v projections for hidden states `x` (`[n, hidden]`): the RMS-normed
    /// states, exactly as [`Model::run_layer`] computes them.
    pub fn attention_input(&self, li: usize, x: &[f32]) -> Result<Vec<f32>> {
        let layer = self
            .layers
            .get(li)
            .ok_or_else(|| Error::Invalid(format!("no layer {li}")))?;
        let mut xn = x.to_vec();
        rms_norm(&mut xn, &layer.attn_norm, self.cfg.rms_norm_eps);
        Ok(xn)
    }

    /// The input of layer `li`'s gate/up projections for the state after attention `x` (`[n, hidden]`).
    pub fn ffn_input(&self, li: usize, x: &[f32]) -> Result<Vec<f32>> {
        let layer = self
            .layers
            .get(li)
            .ok_or_else(|| Error::Invalid(format!("no layer {li}")))?;
        let mut xn = x.to_vec();
        rms_norm(&mut xn, &layer.ffn_norm, self.cfg.rms_norm_eps);
        Ok(xn)
    }

    /// The output head's input for the last layer's states `x` (`[n, hidden]`): the final RMSNorm.
    pub fn head_input(&self, x: &[f32]) -> Vec<f32> {
        let mut xn = x.to_vec();
        rms_norm(&mut xn, &self.norm, self.cfg.rms_norm_eps);
        xn
    }

    /// The logits `[n, vocab]` of the last layer's states `x` (`[n, hidden]`): the final RMSNorm and the
    /// output head, as [`forward`](Self::forward) computes them.
    pub fn logits_of_states(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if x.len() != n * self.cfg.hidden_size {
            return Err(Error::Invalid(format!(
                "logits_of_states: {} values for {n} tokens of {}",
                x.len(),
                self.cfg.hidden_size
            )));
        }
        let xn = self.head_input(x);
        let mut out = vec![0.0f32; n * self.cfg.vocab_size];
        matmul_exec(&self.lm_head, &xn, n, &mut out, self.exec());
        Ok(out)
    }

    /// The output head's weight (the embedding when they are tied).
    pub fn lm_head(&self) -> &TensorRef {
        &self.lm_head
    }

    /// The output of layer `li`'s attention block (o_proj's output, before the residual) for its normed
    /// input `xn` (`[n, hidden]`, positions `0..n` of one sequence), with the layer's current linears; `cache`
    /// as for [`run_layer`](Self::run_layer). What AWQ scores q/k/v's candidate scales on.
    pub fn attention_output(
        &self,
        li: usize,
        xn: &[f32],
        n: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if li >= self.layers.len() || xn.len() != n * c.hidden_size || n > cache.capacity() {
            return Err(Error::Invalid(format!(
                "attention_output: layer {li} of {}, {} values for {n} tokens, cache of {}",
                self.layers.len(),
                xn.len(),
                cache.capacity()
            )));
        }
        let layer = &self.layers[li];
        let (cos, sin) = self.rope_tables(0, n);
        let mut s = Scratch::new(c, n);
        layer.q.forward(xn, n, &mut s.q, self.exec());
        layer.k.forward(xn, n, &mut s.k, self.exec());
        layer.v.forward(xn, n, &mut s.v, self.exec());
        apply_rope(&mut s.q, c.head_dim, &cos, &sin);
        apply_rope(&mut s.k, c.head_dim, &cos, &sin);
        cache.write(li, 0, &s.k, &s.v);
        self.attention(&s.q, cache, li, 0, n, ATTN_ROWS, &mut s.attn);
        layer.o.forward(&s.attn, n, &mut s.proj, self.exec());
        Ok(s.proj)
    }

    /// The output of layer `li`'s MLP (`down(silu(gate(xn)) · up(xn))`, before the residual) for its normed
    /// input `xn` (`[n, hidden]`), with the layer's current linears.
    pub fn mlp_output(&self, li: usize, xn: &[f32], n: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if li >= self.layers.len() || xn.len() != n * c.hidden_size {
            return Err(Error::Invalid(format!(
                "mlp_output: layer {li} of {}, {} values for {n} tokens",
                self.layers.len(),
                xn.len()
            )));
        }
        let layer = &self.layers[li];
        let mut s = Scratch::new(c, n);
        layer.gate.forward(xn, n, &mut s.gate, self.exec());
        layer.up.forward(xn, n, &mut s.up, self.exec());
        swiglu(&mut s.gate, &s.up);
        layer.down.forward(&s.gate, n, &mut s.proj, self.exec());
        Ok(s.proj)
    }

    /// The RMSNorm weights of layer `li`: `(input_layernorm, post_attention_layernorm)`.
    pub fn norm_weights(&self, li: usize) -> Option<(&[f32], &[f32])> {
        let l = self.layers.get(li)?;
        Some((&l.attn_norm, &l.ffn_norm))
    }

    /// The weight of one linear of layer `li`.
    pub fn linear(&self, li: usize, which: LinearKind) -> Option<&TensorRef> {
        let l = self.layers.get(li)?;
        Some(match which {
            LinearKind::Q => &l.q.w,
            LinearKind::K => &l.k.w,
            LinearKind::V => &l.v.w,
            LinearKind::O => &l.o.w,
            LinearKind::Gate => &l.gate.w,
            LinearKind::Up => &l.up.w,
            LinearKind::Down => &l.down.w,
        })
    }

    /// Replace the weight of one linear of layer `li` (same shape), e.g. with its quantized version.
    pub fn replace_linear(&mut self, li: usize, which: LinearKind, w: TensorRef) -> Result<()> {
        let layer = self
            .layers
            .get_mut(li)
            .ok_or_else(|| Error::Invalid(format!("no layer {li}")))?;
        let slot = match which {
            LinearKind::Q => &mut layer.q,
            LinearKind::K => &mut layer.k,
            LinearKind::V => &mut layer.v,
            LinearKind::O => &mut layer.o,
            LinearKind::Gate => &mut layer.gate,
            LinearKind::Up => &mut layer.up,
            LinearKind::Down => &mut layer.down,
        };
        if slot.w.shape != w.shape {
            return Err(Error::Invalid(format!(
                "replacing {} ({:?}) with a tensor of shape {:?}",
                slot.w.name, slot.w.shape, w.shape
            )));
        }
        slot.w = w;
        Ok(())
    }

    /// One decoder layer over `x` at positions `p0..p0+n`.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        li: usize,
        x: &mut [f32],
        n: usize,
        p0: usize,
        (cos, sin): (&[f32], &[f32]),
        cache: &mut KvCache,
        s: &mut Scratch,
        observer: &mut Option<&mut dyn MatmulObserver>,
        until: Option<MatmulInput>,
    ) {
        let c = &self.cfg;
        let hd = c.head_dim;
        let layer = &self.layers[li];
        let ex = self.exec_for(s);
        s.xn.copy_from_slice(x);
        rms_norm(&mut s.xn, &layer.attn_norm, c.rms_norm_eps);
        if let Some(o) = observer.as_deref_mut() {
            o.observe(li, MatmulInput::Attention, &s.xn, n);
        }
        if until == Some(MatmulInput::Attention) {
            return;
        }
        Linear::forward_group(
            &[&layer.q, &layer.k, &layer.v],
            &s.xn,
            n,
            &mut [&mut s.q, &mut s.k, &mut s.v],
            ex,
        );
        apply_rope(&mut s.q, hd, cos, sin);
        apply_rope(&mut s.k, hd, cos, sin);
        if self.numerics == Numerics::LlamaCpu {
            // llama.cpp keeps its KV cache in f16 and converts the queries to f16 for `k · q`.
            round_f16(&mut s.q);
            round_f16(&mut s.k);
            round_f16(&mut s.v);
        }
        cache.write(li, p0, &s.k, &s.v);
        let rows_per_task = if s.as_steps { 1 } else { ATTN_ROWS };
        self.attention(&s.q, cache, li, p0, n, rows_per_task, &mut s.attn);
        if let Some(o) = observer.as_deref_mut() {
            o.observe(li, MatmulInput::AttentionOutput, &s.attn, n);
        }
        if until == Some(MatmulInput::AttentionOutput) {
            return;
        }
        layer.o.forward(&s.attn, n, &mut s.proj, ex);
        add_into(x, &s.proj);
        self.ffn_step(li, x, n, s, observer, until);
    }

    /// The second half of layer `li`: `x += down(silu(gate(norm(x))) · up(norm(x)))`.
    fn ffn_step(
        &self,
        li: usize,
        x: &mut [f32],
        n: usize,
        s: &mut Scratch,
        observer: &mut Option<&mut dyn MatmulObserver>,
        until: Option<MatmulInput>,
    ) {
        let c = &self.cfg;
        let layer = &self.layers[li];
        let ex = self.exec_for(s);
        s.xn.copy_from_slice(x);
        rms_norm(&mut s.xn, &layer.ffn_norm, c.rms_norm_eps);
        debug_assert_eq!(layer.gate.rows(), c.intermediate_size);
        if let Some(o) = observer.as_deref_mut() {
            o.observe(li, MatmulInput::Ffn, &s.xn, n);
        }
        if until == Some(MatmulInput::Ffn) {
            return;
        }
        Linear::forward_group(
            &[&layer.gate, &layer.up],
            &s.xn,
            n,
            &mut [&mut s.gate, &mut s.up],
            ex,
        );
        swiglu(&mut s.gate, &s.up);
        if let Some(o) = observer.as_deref_mut() {
            o.observe(li, MatmulInput::FfnDown, &s.gate, n);
        }
        if until == Some(MatmulInput::FfnDown) {
            return;
        }
        layer.down.forward(&s.gate, n, &mut s.proj, ex);
        add_into(x, &s.proj);
    }

    /// cos/sin of `position · inv_freq` for positions `p0..p0+n`, `[n, head_dim/2]` each, computed as
    /// transformers does (f32 product, f32 cos/sin).
    pub(super) fn rope_tables(&self, p0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for t in 0..n {
            let pos = (p0 + t) as f32;
            for &f in &self.inv_freq {
                let a = pos * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    /// Causal attention of the `n` new query rows `q` (`[n, heads·head_dim]`, positions `p0..p0+n`) over the
    /// cache of `layer`; writes `out` (`[n, heads·head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        cache: &KvCache,
        layer: usize,
        p0: usize,
        n: usize,
        rows_per_task: usize,
        out: &mut [f32],
    ) {
        let c = &self.cfg;
        let (nh, hd, cap) = (c.num_heads, c.head_dim, cache.capacity());
        let group = nh / c.num_kv_heads;
        let scale = (hd as f64).powf(-0.5) as f32;
        let kv = cache.layer(layer);
        // llama.cpp converts the probabilities to f16 before multiplying them with its f16 values.
        let f16_probs = self.numerics == Numerics::LlamaCpu;
        let backend = self.backend;
        let blocks = n.div_ceil(rows_per_task);
        // A prompt's keys and values packed once per head group for the CPU's GEMM, not once per task (a
        // one-row task dots the cache in place: nothing to pack).
        let pack = backend == Backend::Cpu && blocks > 1 && rows_per_task > 1;
        let len_all = p0 + n;
        // An f16 cache's keys and values of group g as f32, for the prompt's matrix products.
        let widen = |g: usize| -> (Vec<f32>, Vec<f32>) {
            let KvLayer::F16(k16, v16) = kv else {
                unreachable!("only an f16 cache is widened")
            };
            let at = 2 * g * cap * hd..2 * (g * cap + len_all) * hd;
            let mut k = vec![0f32; len_all * hd];
            let mut v = vec![0f32; len_all * hd];
            crate::simd::f16_to_f32(&k16[at.clone()], &mut k);
            crate::simd::f16_to_f32(&v16[at], &mut v);
            (k, v)
        };
        let widened: Vec<(Vec<f32>, Vec<f32>)> = match kv {
            KvLayer::F16(..) if rows_per_task > 1 && n > 1 && !pack => {
                (0..c.num_kv_heads).map(widen).collect()
            }
            _ => Vec::new(),
        };
        // Group g's keys and values over the first `len` positions as f32, where the prompt path needs them.
        let f32_kv = |g: usize, len: usize| -> (&[f32], &[f32]) {
            match kv {
                KvLayer::F32(kc, vc) => (
                    &kc[g * cap * hd..(g * cap + len) * hd],
                    &vc[g * cap * hd..(g * cap + len) * hd],
                ),
                KvLayer::F16(..) => (&widened[g].0[..len * hd], &widened[g].1[..len * hd]),
            }
        };
        // The groups packed side by side on the spinning pool (one thread packing them all while the other
        // waited was a visible part of a prompt deep in a context).
        let packed: Vec<(Packed, Packed)> = if pack {
            crate::backend::spin::map(c.num_kv_heads, &|g| {
                let one = |keys: &[f32], vals: &[f32]| {
                    (
                        Packed::new(len_all, hd, keys, WLayout::RowMajor),
                        Packed::new(hd, len_all, vals, WLayout::KMajor),
                    )
                };
                match kv {
                    KvLayer::F32(..) => {
                        let (keys, vals) = f32_kv(g, len_all);
                        one(keys, vals)
                    }
                    KvLayer::F16(..) => {
                        let (keys, vals) = widen(g);
                        one(&keys, &vals)
                    }
                }
            })
        } else {
            Vec::new()
        };
        // On the spinning pool: decoding's nine-odd tasks per layer would wake rayon's sleeping workers.
        let dst = crate::backend::spin::Disjoint::new(out);
        crate::backend::spin::for_each(nh * blocks, &|task| {
            let (head, b) = (task / blocks, task % blocks);
            let r0 = b * rows_per_task;
            let r1 = (r0 + rows_per_task).min(n);
            let rows = r1 - r0;
            let g = head / group;
            let len = p0 + r1;
            let mut o = vec![0.0f32; rows * hd];
            if rows == 1 {
                let qrow = &q[r0 * nh * hd + head * hd..][..hd];
                // The f16 kernels have the bits of the f32 ones on the same values (each converted
                // exactly): an f16 cache of f16-rounded keys and values changes no score and no output.
                let mut s = vec![0f32; len];
                let span = |elem: usize| elem * g * cap * hd..elem * (g * cap + len) * hd;
                match kv {
                    KvLayer::F32(kc, _) => {
                        crate::simd::scores_f32(&kc[span(1)], qrow, scale, &mut s)
                    }
                    KvLayer::F16(kc, _) => {
                        crate::simd::scores_f16(&kc[span(2)], qrow, scale, &mut s)
                    }
                }
                softmax(&mut s);
                if f16_probs {
                    round_f16(&mut s);
                }
                match kv {
                    KvLayer::F32(_, vc) => crate::simd::add_weighted_f32(&s, &vc[span(1)], &mut o),
                    KvLayer::F16(_, vc) => crate::simd::add_weighted_f16(&s, &vc[span(2)], &mut o),
                }
            } else {
                // Only where the group is not packed (`f32_kv` has nothing for a packed f16 group).
                let kv_f32 = || f32_kv(g, len);
                let mut qb = vec![0.0f32; rows * hd];
                for (r, dst) in qb.chunks_exact_mut(hd).enumerate() {
                    let src = (r0 + r) * nh * hd + head * hd;
                    dst.copy_from_slice(&q[src..src + hd]);
                }
                // The score matrix in this worker's buffer, kept from call to call: deep in a context it is
                // megabytes, and a fresh one per task was an mmap and a page fault per 4 KiB (12 % of a
                // prompt at depth 4096).
                let mut buf = SCORES.with(|b| std::mem::take(&mut *b.borrow_mut()));
                buf.clear();
                buf.resize(rows * len, 0.0);
                let s = &mut buf[..];
                if let Some((pk, _)) = packed.get(g) {
                    product_packed(rows, len, hd, &qb, pk, s);
                } else {
                    backend.sgemm_nt(rows, len, hd, &qb, kv_f32().0, s);
                }
                for (r, srow) in s.chunks_exact_mut(len).enumerate() {
                    let visible = p0 + r0 + r + 1;
                    let (vis, masked) = srow.split_at_mut(visible);
                    for x in vis.iter_mut() {
                        *x *= scale;
                    }
                    softmax(vis);
                    if f16_probs {
                        round_f16(vis);
                    }
                    masked.fill(0.0);
                }
                if let Some((_, pv)) = packed.get(g) {
                    product_packed(rows, hd, len, s, pv, &mut o);
                } else {
                    backend.sgemm_nn(rows, hd, len, s, kv_f32().1, &mut o);
                }
                SCORES.with(|b| *b.borrow_mut() = buf);
            }
            // Task (head, block) owns rows r0..r1 of its head's columns.
            for (r, src) in o.chunks_exact(hd).enumerate() {
                let at = (r0 + r) * nh * hd + head * hd;
                for (i, &v) in src.iter().enumerate() {
                    dst.set(at + i, v);
                }
            }
        });
    }
}

thread_local! {
    /// A worker's attention score matrix (`rows × positions`), reused from task to task.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// In-place RMSNorm of each row: `x · rsqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let h = w.len();
    for row in x.chunks_exact_mut(h) {
        let ms = dot(row, row) / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for (v, &ww) in row.iter_mut().zip(w) {
            *v = ww * (*v * r);
        }
    }
}

/// Rotate-half RoPE on every head of every row: `x` is `[n, heads·hd]`, tables `[n, hd/2]`.
fn apply_rope(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    let n = cos.len() / half.max(1);
    if n == 0 {
        return;
    }
    let row_len = x.len() / n;
    for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in row.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for j in 0..half {
                let (x1, x2) = (a[j], b[j]);
                a[j] = x1 * c[j] - x2 * s[j];
                b[j] = x2 * c[j] + x1 * s[j];
            }
        }
    }
}

/// In-place softmax (max-subtracted, f32).
pub(super) fn softmax(x: &mut [f32]) {
    let m = max_lanes(x);
    for v in x.iter_mut() {
        *v -= m;
    }
    crate::simd::exp_in_place(x);
    let sum = sum_lanes(x);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Lanes of [`sum_lanes`] and [`max_lanes`]: independent accumulators the compiler keeps in vector
/// registers (one serial chain of adds over a 512-position score row was 3 % of a small model's prompt).
const LANES: usize = 16;

/// Σ x: lane `i` sums `x[i], x[i + 16], …` in order, the lanes are added pairwise, then the tail in order —
/// the same bits however the compiler vectorises it.
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    tail.iter().fold(acc[0], |s, &v| s + v)
}

/// The largest value of `x` (−∞ for none; NaN is passed over, as `f32::max` does), in lanes like
/// [`sum_lanes`] (a maximum does not depend on the order).
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `gate = silu(gate) · up`, element by element; spread over the spinning pool for a prompt's worth of rows
/// (one thread idling while the other runs this was ~2 % of prompt processing).
fn swiglu(gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 16 * 1024;
    let one = |g: &mut [f32], u: &[f32]| {
        // silu(g) = g / (1 + e^−g), the exponentials vectorised.
        let mut e: Vec<f32> = g.iter().map(|v| -v).collect();
        crate::simd::exp_in_place(&mut e);
        for ((g, &u), &e) in g.iter_mut().zip(u).zip(&e) {
            *g = *g / (1.0 + e) * u;
        }
    };
    if gate.len() <= CHUNK {
        one(gate, up);
    } else {
        crate::backend::spin::for_each_chunk(gate, CHUNK, &|i, g| {
            one(g, &up[i * CHUNK..i * CHUNK + g.len()]);
        });
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixture::{fixture_tensor_refs, FixtureSpec};

    fn model(spec: &FixtureSpec) -> Model {
        let tensors = fixture_tensor_refs(spec).expect("tensors");
        Model::from_parts(Path::new("fixture"), &spec.config(), &tensors).expect("load")
    }

    #[test]
    fn lane_sums_and_maxima_are_the_plain_ones() {
        for len in [0, 1, 15, 16, 17, 100, 512, 1000] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
            // Small integers: every order of summation is exact.
            assert_eq!(sum_lanes(&x), x.iter().sum::<f32>(), "{len}");
            assert_eq!(
                max_lanes(&x),
                x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                "{len}"
            );
        }
        // The order is the lanes', fixed: 16 values of 1 then 2⁻²³ sixteen times (one per lane) keep
        // them (16 + 2⁻¹⁹), where a serial sum would drop each against 16.
        let mut x = vec![1.0f32; 16];
        x.extend([2f32.powi(-23); 16]);
        assert_eq!(sum_lanes(&x), 16.0 + 16.0 * 2f32.powi(-23));
        assert_eq!(x.iter().sum::<f32>(), 16.0);
        assert_eq!(max_lanes(&[f32::NAN, 2.0, -1.0]), 2.0);
        let mut p = vec![0.5f32, 1.5, -3.0, 0.0];
        softmax(&mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[1] > p[0] && p[0] > p[3]);
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let m = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f32, |d, (x, y)| d.max((x - y).abs()))
            / m
    }

    fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 37 + 5) % 384).collect()
    }

    #[test]
    fn batched_forward_equals_token_by_token() {
        for spec in [
            FixtureSpec::tiny_llama(),
            FixtureSpec::tiny_qwen2(),
            FixtureSpec::tiny_mistral(),
        ] {
            let m = model(&spec);
            let toks = tokens(70);
            let mut cache = m.new_cache(128);
            let all = m.forward(&toks, &mut cache, Logits::All).expect("batch");
            assert_eq!(cache.len(), 70);
            assert_eq!(cache.tokens(), toks.as_slice());
            let mut inc = m.new_cache(128);
            let v = m.vocab_size();
            for (i, &t) in toks.iter().enumerate() {
                let row = m.forward(&[t], &mut inc, Logits::Last).expect("step");
                let d = max_rel(&row, &all[i * v..(i + 1) * v]);
                assert!(d < 1e-4, "{:?} position {i}: {d}", spec.arch);
            }
            // Mixed: a prefix, then chunks, with Logits::From.
            let mut mix = m.new_cache(128);
            m.forward(&toks[..40], &mut mix, Logits::None)
                .expect("prefix");
            let tail = m
                .forward(&toks[40..], &mut mix, Logits::From(10))
                .expect("tail");
            assert_eq!(tail.len(), 20 * v);
            assert!(max_rel(&tail, &all[50 * v..]) < 1e-4);
        }
    }

    /// In the llama-cpu arithmetic the f16 cache `new_cache` makes changes no logit bit against an f32 cache
    /// (its keys and values are f16-rounded before they are stored), for a prompt (the widened, packed
    /// path), one-token steps (the in-place f16 dots) and a second prompt after them; it takes half the
    /// bytes; the exact arithmetic and the GPU refuse it.
    #[test]
    fn an_f16_cache_changes_no_bit_in_the_llama_cpu_arithmetic() {
        // Heads of 64 (SmolLM2's, Llama's) and of 80 (a tail after the 32-wide steps).
        for (hidden, heads) in [(256, 4), (160, 2)] {
            let spec = FixtureSpec {
                hidden,
                heads,
                kv_heads: 2.min(heads),
                ..FixtureSpec::tiny_qwen2()
            };
            f16_cache_case(&spec);
        }
    }

    fn f16_cache_case(spec: &FixtureSpec) {
        let mut m = model(spec);
        m.set_numerics(Numerics::LlamaCpu);
        let c = m.config().clone();
        let toks = tokens(89);
        let mut half = m.new_cache(96);
        let mut full = KvCache::new(c.num_layers, c.num_kv_heads, c.head_dim, 96, false);
        assert!(half.is_f16() && !full.is_f16());
        assert_eq!(2 * half.allocated_bytes(), full.allocated_bytes());
        // 70 rows: more than one attention block (packed keys); 15: one block (widened only).
        let mut pieces = vec![&toks[..70]];
        pieces.extend(toks[70..74].chunks(1));
        pieces.push(&toks[74..89]);
        for (i, p) in pieces.into_iter().enumerate() {
            let a = m.forward(p, &mut half, Logits::All).expect("f16 cache");
            let b = m.forward(p, &mut full, Logits::All).expect("f32 cache");
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "piece {i}: logits differ"
            );
        }
        assert!(
            !half.same_held(&full),
            "stores of different types never compare equal"
        );
        m.set_numerics(Numerics::Exact);
        let err = m.forward(&toks[..3], &mut m.new_cache(8).clone(), Logits::Last);
        assert!(err.is_ok(), "a cache made for the exact arithmetic is f32");
        let mut stale = half.clone();
        stale.truncate(0);
        let err = m
            .forward(&toks[..3], &mut stale, Logits::Last)
            .expect_err("an f16 cache in the exact arithmetic");
        assert!(err.to_string().contains("f16"), "{err}");
    }

    #[test]
    fn forward_as_steps_equals_one_token_forwards_bit_for_bit() {
        for spec in [
            FixtureSpec::tiny_llama(),
            FixtureSpec::tiny_qwen2(),
            FixtureSpec {
                dtype: crate::model::fixture::FixtureDtype::F16,
                ..FixtureSpec::tiny_mistral()
            },
        ] {
            for numerics in [Numerics::Exact, Numerics::LlamaCpu] {
                let mut m = model(&spec);
                m.set_numerics(numerics);
                let toks = tokens(19);
                let v = m.vocab_size();
                // A batched prefix, then six tokens as one verification batch…
                let mut batch = m.new_cache(64);
                m.forward(&toks[..13], &mut batch, Logits::None)
                    .expect("prefix");
                let rows = m.forward_as_steps(&toks[13..], &mut batch).expect("steps");
                assert_eq!(rows.len(), 6 * v);
                // …against the same prefix, then one token at a time.
                let mut steps = m.new_cache(64);
                m.forward(&toks[..13], &mut steps, Logits::None)
                    .expect("prefix");
                for (i, &t) in toks[13..].iter().enumerate() {
                    let row = m.forward(&[t], &mut steps, Logits::Last).expect("step");
                    let same = row
                        .iter()
                        .zip(&rows[i * v..(i + 1) * v])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{:?} {numerics:?}: row {i} differs", spec.arch);
                }
                assert_eq!(batch.tokens(), steps.tokens());
                assert_eq!(batch.is_f16(), numerics == Numerics::LlamaCpu);
                assert!(
                    batch.same_held(&steps),
                    "{numerics:?}: keys and values differ"
                );
            }
        }
    }

    #[test]
    fn the_observer_sees_each_matmul_input() {
        #[derive(Default)]
        struct Seen(Vec<(usize, MatmulInput, Vec<f32>)>);
        impl MatmulObserver for Seen {
            fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], n: usize) {
                assert_eq!(x.len() % n, 0);
                self.0.push((layer, input, x.to_vec()));
            }
        }
        let m = model(&FixtureSpec::tiny_llama());
        let toks = tokens(5);
        let mut seen = Seen::default();
        let mut cache = m.new_cache(8);
        m.forward_observed(&toks, &mut cache, Logits::None, Some(&mut seen))
            .expect("forward");
        let c = m.config();
        assert_eq!(seen.0.len(), 4 * c.num_layers);
        // Layer 0's attention input: the RMS-normed embeddings; its q projection is layer.q applied to it.
        let (l, input, x) = &seen.0[0];
        assert_eq!((*l, *input), (0, MatmulInput::Attention));
        let h = c.hidden_size;
        let mut want = vec![0.0f32; 5 * h];
        for (row, &t) in want.chunks_exact_mut(h).zip(&toks) {
            m.embed.dequant_row(t as usize, row);
        }
        rms_norm(&mut want, &m.layers[0].attn_norm, c.rms_norm_eps);
        assert_eq!(x, &want);
        // The down projection's input has the intermediate width and sits last in each layer.
        let (l, input, x) = &seen.0[3];
        assert_eq!(
            (*l, *input, x.len()),
            (0, MatmulInput::FfnDown, 5 * c.intermediate_size)
        );
        assert_eq!(seen.0[4].1, MatmulInput::Attention);
        assert_eq!(seen.0[4].0, 1);
    }

    #[test]
    fn layers_run_one_at_a_time_equal_the_forward_pass() {
        #[derive(Default)]
        struct Seen(Vec<(usize, MatmulInput, Vec<f32>)>);
        impl MatmulObserver for Seen {
            fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], _n: usize) {
                self.0.push((layer, input, x.to_vec()));
            }
        }
        let mut m = model(&FixtureSpec::tiny_qwen2());
        let toks = tokens(40);
        let mut whole = Seen::default();
        m.forward_observed(&toks, &mut m.new_cache(64), Logits::None, Some(&mut whole))
            .expect("forward");
        let mut layered = Seen::default();
        let mut x = m.embed_tokens(&toks);
        let mut cache = m.new_cache(64);
        for li in 0..m.config().num_layers {
            m.run_layer(li, &mut x, 40, &mut cache, Some(&mut layered))
                .expect("layer");
        }
        assert_eq!(whole.0, layered.0);
        let x0 = m.embed_tokens(&toks);
        assert_eq!(m.attention_input(0, &x0).expect("norm"), whole.0[0].2);
        // Replacing a linear changes what follows it, and only with a tensor of the same shape.
        let q = m.layers[1].q.w.clone();
        let zero = TensorRef::from_f32(q.name.clone(), q.shape.clone(), &vec![0.0; q.numel()])
            .expect("zeros");
        m.replace_linear(1, LinearKind::Q, zero).expect("replace");
        let bad = TensorRef::from_f32("x", vec![2, 2], &[0.0; 4]).expect("t");
        assert!(m.replace_linear(1, LinearKind::K, bad).is_err());
        let mut again = Seen::default();
        m.forward_observed(&toks, &mut m.new_cache(64), Logits::None, Some(&mut again))
            .expect("forward");
        assert_eq!(again.0[..5], whole.0[..5]);
        assert_ne!(again.0[5], whole.0[5]);
        assert_eq!(
            LinearKind::Down.hf_name(3),
            "model.layers.3.mlp.down_proj.weight"
        );
    }

    #[test]
    fn long_prompts_run_in_micro_batches() {
        let m = model(&FixtureSpec::tiny_mistral());
        let n = UBATCH + 88;
        let toks = tokens(n);
        let mut cache = m.new_cache(n + 8);
        let all = m
            .forward(&toks, &mut cache, Logits::From(UBATCH - 20))
            .expect("all");
        let v = m.vocab_size();
        assert_eq!(all.len(), 108 * v);
        let mut split = m.new_cache(n + 8);
        m.forward(&toks[..300], &mut split, Logits::None)
            .expect("head");
        let tail = m
            .forward(&toks[300..], &mut split, Logits::All)
            .expect("tail");
        let tail = &tail[(UBATCH - 20 - 300) * v..];
        assert!(max_rel(&all, tail) < 1e-4);
        let last = m.forward(&[7], &mut cache, Logits::Last).expect("one more");
        let last2 = m.forward(&[7], &mut split, Logits::Last).expect("one more");
        assert!(max_rel(&last, &last2) < 1e-4);
    }

    #[test]
    fn truncate_then_rerun_matches() {
        let m = model(&FixtureSpec::tiny_llama());
        let toks = tokens(20);
        let mut cache = m.new_cache(32);
        let a = m.forward(&toks, &mut cache, Logits::Last).expect("a");
        cache.truncate(12);
        assert_eq!(cache.len(), 12);
        let b = m.forward(&toks[12..], &mut cache, Logits::Last).expect("b");
        assert!(max_rel(&b, &a) < 1e-5);
    }

    #[test]
    fn errors_are_clear() {
        let spec = FixtureSpec::tiny_llama();
        let m = model(&spec);
        let mut cache = m.new_cache(4);
        let e = m
            .forward(&tokens(5), &mut cache, Logits::Last)
            .expect_err("full");
        assert!(e.to_string().contains("context full"), "{e}");
        let e = m
            .forward(&[9999], &mut cache, Logits::Last)
            .expect_err("vocab");
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
        let mut tensors = fixture_tensor_refs(&spec).expect("tensors");
        let mut cfg = spec.config();
        cfg.intermediate_size = 96;
        let e = Model::from_parts(Path::new("x"), &cfg, &tensors).expect_err("shape");
        assert!(
            e.to_string().contains("mlp.gate_proj.weight has shape"),
            "{e}"
        );
        tensors.remove("model.layers.1.self_attn.v_proj.weight");
        let e = Model::from_parts(Path::new("x"), &spec.config(), &tensors).expect_err("missing");
        assert!(
            e.to_string()
                .contains("v_proj.weight (shape [32, 64]) is missing"),
            "{e}"
        );
        assert!(m
            .forward(&[], &mut cache, Logits::Last)
            .expect("empty")
            .is_empty());
    }
}
