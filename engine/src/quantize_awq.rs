//! AWQ end to end (activation-aware weight quantization, as AutoAWQ and llm-compressor run it): calibration
//! rows → layer by layer, one pass of the float layer that records each linear input's mean magnitude per
//! channel (all rows) and the inputs of a few "search" rows, and leaves the next layer's inputs → per group of
//! linears sharing an input, the per-channel scale `s = x̄^α / w̄^(1−α)` whose quantized weights best
//! reproduce the group's module output on the search rows (q/k/v: the attention block; o: o_proj, when v
//! can take the inverse scale; gate/up: the MLP; down: down_proj) → the scales folded into what precedes
//! the group (the RMSNorm weights, v_proj's or up_proj's rows) → the clipping search (all but q/k) → min–max
//! 4-bit (2–8) groups with zero points → an AutoAWQ GEMM or compressed-tensors folder.
//!
//! As in AutoAWQ, every layer is searched on the float model's activations (the next layer's inputs come
//! from the float layer), so the searches of one layer are independent of the others' quantization.
//! Memory: the calibration hidden states of one layer boundary (spilled to disk above a budget), the
//! search rows' linear inputs, and one layer's weights in f32.

use std::time::Instant;

use crate::calib::activations::ActStore;
use crate::calib::{load_documents, sample_rows, CalibOptions, CalibSource};
use crate::infer::{LinearKind, MatmulInput, MatmulObserver, Model};
use crate::model::SourceModel;
use crate::output::{OutputSpec, Staged};
use crate::quantize_packed::{PackedModuleMetrics, PackedReport};
use crate::solvers::awq::{
    apply_clip, candidate_scales, clip_search, scaled_fake_quantize, weight_mean, AwqGrid,
};
use crate::tensor::TensorRef;
use crate::writers::awq::{AwqFolderConfig, AwqLayout};
use crate::writers::packed::{
    folder_bytes, is_decoder_linear, write_packed_folder, PackedFolder, PackedSpill, PackedTensor,
};
use crate::{Error, Result};

/// What to make of a model as AWQ.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqQuantizeOptions {
    pub grid: AwqGrid,
    pub layout: AwqLayout,
    pub calib: CalibSource,
    /// Calibration rows: all of them give the activation statistics.
    pub calib_opts: CalibOptions,
    /// How many of the rows the scale and clipping searches score candidates on.
    pub search_rows: usize,
    /// Ratios tried: `α = i / n_grid`, `i < n_grid` (AutoAWQ: 20).
    pub n_grid: usize,
    /// Divide by the weights' normalised magnitude too (`x̄^α / w̄^(1−α)`, AutoAWQ's default) instead of
    /// `x̄^α` alone.
    pub duo_scaling: bool,
    /// Run the clipping search.
    pub clip: bool,
    /// Round-to-nearest on the same grid, no scales, no clipping, no calibration (the baseline AWQ is
    /// judged against; same files).
    pub rtn: bool,
    /// Keep calibration hidden states in memory up to this many bytes; spill to a temporary file above.
    pub activation_budget_bytes: u64,
    /// Largest weight file of the folder in bytes of tensor data (`None`: 5 GB).
    pub max_shard_bytes: Option<u64>,
    pub backend: crate::backend::Backend,
}

impl Default for AwqQuantizeOptions {
    fn default() -> Self {
        Self {
            grid: AwqGrid {
                bits: 4,
                group_size: 128,
            },
            layout: AwqLayout::Gemm,
            calib: CalibSource::Bundled,
            // AutoAWQ's defaults: 128 samples of 512 tokens.
            calib_opts: CalibOptions {
                rows: 128,
                seq_len: 512,
                seed: 0,
            },
            search_rows: 8,
            n_grid: 20,
            duo_scaling: true,
            clip: true,
            rtn: false,
            activation_budget_bytes: crate::calib::activations::DEFAULT_ACTIVATION_BUDGET_MIB << 20,
            max_shard_bytes: None,
            backend: crate::backend::Backend::Cpu,
        }
    }
}

impl AwqQuantizeOptions {
    /// The folder these options write.
    pub fn folder_config(&self) -> AwqFolderConfig {
        AwqFolderConfig {
            layout: self.layout,
            bits: self.grid.bits,
            group_size: self.grid.group_size,
            calibration_dataset: (!self.rtn).then(|| self.calib.dataset_name()),
            max_shard_bytes: self.max_shard_bytes,
        }
    }

    /// `"AWQ int4 g128"`, `"RTN int4 g128 (AWQ grid)"`.
    pub fn codec(&self) -> String {
        format!(
            "{} int{} g{}{}",
            if self.rtn { "RTN" } else { "AWQ" },
            self.grid.bits,
            self.grid.group_size,
            match self.layout {
                AwqLayout::Gemm => "",
                AwqLayout::CompressedTensors => " (compressed-tensors)",
            }
        )
    }
}

fn slot(i: MatmulInput) -> usize {
    match i {
        MatmulInput::Attention => 0,
        MatmulInput::AttentionOutput => 1,
        MatmulInput::Ffn => 2,
        MatmulInput::FfnDown => 3,
    }
}

/// Per-channel Σ|x| of each linear input over every row, and the inputs themselves for the search rows.
struct Capture {
    layer: usize,
    /// The row being run; rows below `search_rows` are kept.
    row: usize,
    search_rows: usize,
    abs_sum: [Vec<f64>; 4],
    tokens: usize,
    kept: [Vec<f32>; 4],
}

impl MatmulObserver for Capture {
    fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], n: usize) {
        if layer != self.layer {
            return;
        }
        let s = slot(input);
        let cols = x.len() / n.max(1);
        let sum = &mut self.abs_sum[s];
        sum.resize(cols, 0.0);
        for row in x.chunks_exact(cols) {
            for (a, v) in sum.iter_mut().zip(row) {
                *a += f64::from(v.abs());
            }
        }
        if s == 0 {
            self.tokens += n;
        }
        if self.row < self.search_rows {
            self.kept[s].extend_from_slice(x);
        }
    }
}

/// A group of linears sharing an input, searched together.
struct Group {
    linears: &'static [LinearKind],
    input: MatmulInput,
    /// Where the inverse scale goes.
    prev: Prev,
}

#[derive(Clone, Copy, PartialEq)]
enum Prev {
    AttnNorm,
    FfnNorm,
    Linear(LinearKind),
}

const GROUPS: [Group; 4] = [
    Group {
        linears: &[LinearKind::Q, LinearKind::K, LinearKind::V],
        input: MatmulInput::Attention,
        prev: Prev::AttnNorm,
    },
    Group {
        linears: &[LinearKind::O],
        input: MatmulInput::AttentionOutput,
        prev: Prev::Linear(LinearKind::V),
    },
    Group {
        linears: &[LinearKind::Gate, LinearKind::Up],
        input: MatmulInput::Ffn,
        prev: Prev::FfnNorm,
    },
    Group {
        linears: &[LinearKind::Down],
        input: MatmulInput::FfnDown,
        prev: Prev::Linear(LinearKind::Up),
    },
];

const ALL: [LinearKind; 7] = [
    LinearKind::Q,
    LinearKind::K,
    LinearKind::V,
    LinearKind::O,
    LinearKind::Gate,
    LinearKind::Up,
    LinearKind::Down,
];

/// One linear of the layer being quantized: its float weight as it will be quantized (scaled, clipped),
/// and the scales folded into its columns (`col`) and rows (`row`) so the effective weight can be compared
/// with the original.
struct Work {
    kind: LinearKind,
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    col: Option<Vec<f32>>,
    row: Option<Vec<f32>>,
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// An estimate of the folder's size for the free-space check: the packed linears at their bits plus an
/// fp16 scale and a zero point per group, the rest in fp16.
pub fn estimated_folder_bytes(src: &SourceModel, opts: &AwqQuantizeOptions) -> u64 {
    let bits = f64::from(opts.grid.bits);
    let group = opts.grid.group_size.max(1) as f64;
    src.tensors
        .values()
        .map(|t| {
            let n = t.numel() as f64;
            if is_decoder_linear(&t.name) {
                (n * bits / 8.0 + n / group * (2.0 + bits / 8.0)) as u64
            } else {
                t.numel() as u64 * 2
            }
        })
        .sum()
}

/// The layer's linears in f32, nothing folded yet.
fn layer_work(model: &Model, li: usize) -> Result<Vec<Work>> {
    ALL.iter()
        .map(|&kind| {
            let t = model
                .linear(li, kind)
                .ok_or_else(|| Error::Invalid(format!("no linear {}", kind.hf_name(li))))?;
            Ok(Work {
                kind,
                rows: t.rows(),
                cols: t.cols(),
                w: t.to_f32(),
                col: None,
                row: None,
            })
        })
        .collect()
}

/// How each layer's scales are searched.
struct Search {
    /// The grid candidates are scored on.
    grid: AwqGrid,
    n_grid: usize,
    duo_scaling: bool,
    /// Rows whose module outputs score the candidates.
    search_rows: usize,
    backend: crate::backend::Backend,
}

/// One layer with its scales folded in: the linears (columns × s, the preceding linear's rows ÷ s), the
/// RMSNorm weights and v_proj's bias ÷ s, and the search rows' linear inputs ÷ s (what the scaled weights
/// see, for the clipping search).
struct ScaledLayer {
    work: Vec<Work>,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    v_bias: Option<Vec<f32>>,
    kept: [Vec<f32>; 4],
}

/// Run the float layer `li` over the `n_rows` rows of `store` (leaving the next layer's inputs there), search
/// each group's scale on the search rows, and fold the scales into the layer (`model` itself is left as it
/// was).
#[allow(clippy::too_many_arguments)]
fn scale_layer(
    model: &mut Model,
    src: &SourceModel,
    li: usize,
    n_rows: usize,
    store: &mut ActStore,
    seq: usize,
    cache: &mut crate::infer::KvCache,
    search: &Search,
) -> Result<ScaledLayer> {
    let c = model.config().clone();
    let grid = search.grid;
    let mut work = layer_work(model, li)?;
    let idx = |k: LinearKind| ALL.iter().position(|&a| a == k).unwrap_or(0);
    let (mut attn_norm, mut ffn_norm) = model
        .norm_weights(li)
        .map(|(a, f)| (a.to_vec(), f.to_vec()))
        .ok_or_else(|| Error::Invalid(format!("no layer {li}")))?;
    let v_bias_name = format!("model.layers.{li}.self_attn.v_proj.bias");
    let mut v_bias: Option<Vec<f32>> = src.tensors.get(&v_bias_name).map(TensorRef::to_f32);
    // One pass of the float layer: statistics, search inputs, and the next layer's inputs.
    let mut cap = Capture {
        layer: li,
        row: 0,
        search_rows: search.search_rows,
        abs_sum: Default::default(),
        tokens: 0,
        kept: Default::default(),
    };
    for i in 0..n_rows {
        cap.row = i;
        let mut x = store.get(i)?;
        model.run_layer(li, &mut x, seq, cache, Some(&mut cap))?;
        store.put(i, x)?;
    }
    let x_mean: Vec<Vec<f32>> = cap
        .abs_sum
        .iter()
        .map(|s| {
            s.iter()
                .map(|v| (v / cap.tokens.max(1) as f64) as f32)
                .collect()
        })
        .collect();
    let originals: Vec<TensorRef> = ALL
        .iter()
        .filter_map(|&k| model.linear(li, k).cloned())
        .collect();
    let mut scales: Vec<Option<Vec<f32>>> = vec![None; GROUPS.len()];
    for (gi, g) in GROUPS.iter().enumerate() {
        if let Prev::Linear(p) = g.prev {
            // v (or up) must produce exactly the inputs the scale divides.
            if work[idx(p)].rows != work[idx(g.linears[0])].cols {
                continue;
            }
        }
        let x = &cap.kept[slot(g.input)];
        let cols = work[idx(g.linears[0])].cols;
        let n_tok = x.len() / cols;
        // What the group's module computes on the search rows, in float.
        let inspect = |model: &Model, cache: &mut crate::infer::KvCache| -> Result<Vec<f32>> {
            match g.input {
                MatmulInput::Attention => {
                    let mut out = Vec::with_capacity(n_tok * c.hidden_size);
                    for r in x.chunks_exact(seq * cols) {
                        out.extend(model.attention_output(li, r, seq, cache)?);
                    }
                    Ok(out)
                }
                MatmulInput::Ffn => model.mlp_output(li, x, n_tok),
                MatmulInput::AttentionOutput | MatmulInput::FfnDown => {
                    let w = model
                        .linear(li, g.linears[0])
                        .ok_or_else(|| Error::Invalid("no linear".into()))?;
                    let mut out = vec![0.0f32; n_tok * w.rows()];
                    search.backend.matmul(w, x, n_tok, &mut out);
                    Ok(out)
                }
            }
        };
        let reference = inspect(model, cache)?;
        let ws: Vec<&[f32]> = g
            .linears
            .iter()
            .map(|&k| work[idx(k)].w.as_slice())
            .collect();
        let w_mean = search
            .duo_scaling
            .then(|| weight_mean(&ws, cols, grid.group_size));
        let (mut best, mut best_loss) = (None, f64::INFINITY);
        for i in 0..search.n_grid {
            let ratio = i as f32 / search.n_grid as f32;
            let s = candidate_scales(&x_mean[slot(g.input)], w_mean.as_deref(), ratio);
            for &k in g.linears {
                let wk = &work[idx(k)];
                let q = scaled_fake_quantize(&wk.w, wk.cols, &s, grid);
                let t = TensorRef::from_f32(k.hf_name(li), vec![wk.rows, wk.cols], &q)?;
                model.replace_linear(li, k, t)?;
            }
            let loss = mse(&reference, &inspect(model, cache)?);
            if loss < best_loss {
                best_loss = loss;
                best = Some(s);
            }
        }
        for &k in g.linears {
            model.replace_linear(li, k, originals[idx(k)].clone())?;
        }
        scales[gi] = Some(best.ok_or_else(|| {
            Error::Invalid(format!(
                "layer {li}: no AWQ scale gave a finite loss (the calibration activations hold \
                     NaN or infinity)"
            ))
        })?);
    }
    // Fold: the group's columns × s, what precedes it ÷ s (and the search inputs ÷ s for clipping).
    for (g, s) in GROUPS.iter().zip(&scales) {
        let Some(s) = s else { continue };
        for &k in g.linears {
            let wk = &mut work[idx(k)];
            for row in wk.w.chunks_exact_mut(wk.cols) {
                for (v, f) in row.iter_mut().zip(s) {
                    *v *= f;
                }
            }
            wk.col = Some(s.clone());
        }
        match g.prev {
            Prev::AttnNorm => attn_norm.iter_mut().zip(s).for_each(|(v, f)| *v /= f),
            Prev::FfnNorm => ffn_norm.iter_mut().zip(s).for_each(|(v, f)| *v /= f),
            Prev::Linear(p) => {
                let wp = &mut work[idx(p)];
                for (row, f) in wp.w.chunks_exact_mut(wp.cols).zip(s) {
                    row.iter_mut().for_each(|v| *v /= f);
                }
                wp.row = Some(s.clone());
                if p == LinearKind::V {
                    if let Some(b) = &mut v_bias {
                        b.iter_mut().zip(s).for_each(|(v, f)| *v /= f);
                    }
                }
            }
        }
        let x = &mut cap.kept[slot(g.input)];
        for row in x.chunks_exact_mut(s.len()) {
            row.iter_mut().zip(s).for_each(|(v, f)| *v /= f);
        }
    }
    Ok(ScaledLayer {
        work,
        attn_norm,
        ffn_norm,
        v_bias,
        kept: cap.kept,
    })
}

/// The layer's norms (and v_proj's bias) with the scales folded in, as replacements of the source's.
fn put_side_tensors(
    packed: &mut PackedSpill,
    li: usize,
    attn_norm: &[f32],
    ffn_norm: &[f32],
    v_bias: Option<&[f32]>,
) -> Result<()> {
    let prefix = format!("model.layers.{li}.");
    for (name, v) in [
        ("input_layernorm.weight", attn_norm),
        ("post_attention_layernorm.weight", ffn_norm),
    ] {
        packed.put_f16(&format!("{prefix}{name}"), vec![v.len()], v)?;
    }
    if let Some(b) = v_bias {
        packed.put_f16(&format!("{prefix}self_attn.v_proj.bias"), vec![b.len()], b)?;
    }
    Ok(())
}

/// Quantize `src` with AWQ into a folder at `out.path` (checked before calibration starts, written under a
/// temporary name, renamed when complete). `on_module(metrics, done, total)` is called after each linear;
/// `false` cancels (nothing is left behind).
pub fn quantize_awq(
    src: &SourceModel,
    opts: &AwqQuantizeOptions,
    out: &OutputSpec,
    on_module: &mut dyn FnMut(&PackedModuleMetrics, usize, usize) -> bool,
) -> Result<PackedReport> {
    let start = Instant::now();
    let cfg = opts.folder_config();
    let grid = opts.grid;
    let mut linears = 0usize;
    for t in src.tensors.values().filter(|t| is_decoder_linear(&t.name)) {
        if t.is_grouped() {
            return Err(Error::Invalid(format!(
                "{}: {} is already quantized ({}); start from a float model",
                src.path.display(),
                t.name,
                t.type_label()
            )));
        }
        cfg.check_shape(&t.name, t.rows(), t.cols())?;
        linears += 1;
    }
    if linears == 0 {
        return Err(Error::Invalid(format!(
            "{}: no decoder linears to quantize",
            src.path.display()
        )));
    }
    if opts.n_grid == 0 || opts.search_rows == 0 {
        return Err(Error::Invalid(
            "AWQ needs a ratio grid of at least one point and at least one search row".into(),
        ));
    }
    let mut spec = out
        .clone()
        .input(&src.path)
        .estimated_bytes(estimated_folder_bytes(src, opts));
    spec.kind = crate::output::OutputKind::Folder;
    if let (CalibSource::File { path, .. }, false) = (&opts.calib, opts.rtn) {
        spec = spec.input(path);
    }
    crate::output::preflight(&spec)?;
    let mut model = Model::load(src)?;
    model.set_backend(opts.backend);
    let c = model.config().clone();
    let seq = opts.calib_opts.seq_len;
    let rows = if opts.rtn {
        Vec::new()
    } else {
        let trained = c.max_position_embeddings;
        if seq == 0 || (trained > 0 && seq > trained) {
            return Err(Error::Invalid(format!(
                "--seq-len {seq}: use 1..={trained} (the model's context, max_position_embeddings)"
            )));
        }
        model.check_context(seq, false)?;
        let docs = load_documents(&opts.calib)?;
        sample_rows(&src.tokenizer, &docs, &opts.calib_opts)?
    };
    let (staged, mut store) = crate::calib::activations::stage_embeddings(
        &model,
        &rows,
        spec,
        opts.activation_budget_bytes,
    )?;
    let search_rows = opts.search_rows.min(rows.len());
    let mut cache = model.new_cache(seq.max(1));
    let mut packed = PackedSpill::create(&staged.path().join(".packed-linears"))?;
    let total = c.num_layers * ALL.len();
    let mut modules: Vec<PackedModuleMetrics> = Vec::with_capacity(total);
    let (mut stored_bits, mut weights) = (0.0f64, 0usize);
    let search = Search {
        grid,
        n_grid: opts.n_grid,
        duo_scaling: opts.duo_scaling,
        search_rows,
        backend: opts.backend,
    };
    for li in 0..c.num_layers {
        let work = if opts.rtn {
            layer_work(&model, li)?
        } else {
            let ScaledLayer {
                mut work,
                attn_norm,
                ffn_norm,
                v_bias,
                kept,
            } = scale_layer(
                &mut model,
                src,
                li,
                rows.len(),
                &mut store,
                seq,
                &mut cache,
                &search,
            )?;
            if opts.clip {
                for wk in work.iter_mut() {
                    if matches!(wk.kind, LinearKind::Q | LinearKind::K) {
                        continue;
                    }
                    let x = &kept[slot(wk.kind.input())];
                    // About 512 tokens, evenly spaced (AutoAWQ's `n_sample_token`).
                    let n_tok = x.len() / wk.cols;
                    let step = (n_tok / 512).max(1);
                    let sample: Vec<f32> = x
                        .chunks_exact(wk.cols)
                        .step_by(step)
                        .flatten()
                        .copied()
                        .collect();
                    let bounds = clip_search(&wk.w, wk.cols, &sample, grid, opts.n_grid, 0.5);
                    apply_clip(&mut wk.w, wk.cols, grid.group_size, &bounds);
                }
            }
            put_side_tensors(&mut packed, li, &attn_norm, &ffn_norm, v_bias.as_deref())?;
            work
        };
        for wk in &work {
            let name = wk.kind.hf_name(li);
            let q = grid.quantize(&wk.w, wk.cols);
            let parts = cfg.parts(wk.rows, wk.cols, &q);
            // The effective weight (scales undone) against the original.
            let orig = model
                .linear(li, wk.kind)
                .ok_or_else(|| Error::Invalid(format!("no linear {name}")))?
                .to_f32();
            let gs = grid.group_size;
            let groups = wk.cols / gs;
            let (mut e2, mut n2, mut max) = (0.0f64, 0.0f64, 0.0f64);
            for r in 0..wk.rows {
                let rs = wk.row.as_ref().map_or(1.0, |s| s[r]);
                for k in 0..wk.cols {
                    let g = r * groups + k / gs;
                    let (s, z) = (q.scales[g], f32::from(q.zeros[g]));
                    let deq =
                        half::f16::from_f32(s * (f32::from(q.codes[r * wk.cols + k]) - z)).to_f32();
                    let cs = wk.col.as_ref().map_or(1.0, |s| s[k]);
                    let d = f64::from(orig[r * wk.cols + k] - deq / cs * rs);
                    e2 += d * d;
                    n2 += f64::from(orig[r * wk.cols + k]).powi(2);
                    max = max.max(d.abs());
                }
            }
            let bytes: usize = parts.iter().map(|p| p.bytes.len()).sum();
            stored_bits += bytes as f64 * 8.0;
            weights += wk.rows * wk.cols;
            packed.put(&name, parts)?;
            modules.push(PackedModuleMetrics {
                layer: li,
                tensor: name,
                bits_per_weight: bytes as f64 * 8.0 / (wk.rows * wk.cols).max(1) as f64,
                rel_rms_error: if n2 > 0.0 { (e2 / n2).sqrt() } else { 0.0 },
                max_error: max,
            });
            if !on_module(&modules[modules.len() - 1], modules.len(), total) {
                return Err(Error::Cancelled);
            }
        }
    }
    drop(store);
    drop(model);
    write_packed_folder(
        src,
        &cfg.folder(),
        staged.path(),
        &mut packed,
        &mut |_, _| true,
    )?;
    packed.remove()?;
    let out = staged.commit()?;
    let folder_size_bytes = folder_bytes(&out, false)?;
    let params: usize = src.tensors.values().map(TensorRef::numel).sum();
    Ok(PackedReport {
        codec: opts.codec(),
        modules,
        linear_bits_per_weight: stored_bits / weights.max(1) as f64,
        bits_per_weight: folder_size_bytes as f64 * 8.0 / params.max(1) as f64,
        folder_size_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// AWQ's activation-aware scales as a step before another solver (`--awq-scales` with GPTQ or EXL2): each
/// layer's scales are searched as [`quantize_awq`] searches them, scored on a min–max grid of `bits` bits
/// (groups of 128, or 64 or 32 where the widths need it), and folded into the model — the input columns of
/// each group of linears × s, what precedes them (the RMSNorm weights, v_proj's or up_proj's rows) ÷ s. The
/// rescaled model computes the same function in exact arithmetic; the quantizer that follows then spends its
/// error away from the input channels that carry large activations, which a symmetric grid (EXL2's, GPTQ's
/// `--sym`) cannot otherwise do.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqScaling {
    /// Bits of the grid candidates are scored on.
    pub bits: u8,
    /// Calibration rows whose activations give the statistics (the first of the quantizer's rows).
    pub rows: usize,
    /// How many of them score the candidates.
    pub search_rows: usize,
    /// Ratios tried: `α = i / n_grid`.
    pub n_grid: usize,
}

impl Default for AwqScaling {
    fn default() -> Self {
        Self {
            bits: 4,
            rows: 32,
            search_rows: 8,
            n_grid: 20,
        }
    }
}

/// A rescaled copy of a model ([`rescaled_model`]), in a temporary folder beside the output that is removed
/// when this is dropped.
pub struct Rescaled {
    pub src: SourceModel,
    // Dropped after `src` (fields drop in order), which maps the folder's files.
    _dir: Staged,
}

/// A linear's scaled weights as a float replacement: f16, or f32 where f16 cannot hold a value.
fn put_float(
    packed: &mut PackedSpill,
    name: &str,
    rows: usize,
    cols: usize,
    w: &[f32],
) -> Result<()> {
    if w.iter().all(|v| half::f16::from_f32(*v).is_finite()) {
        return packed.put_f16(name, vec![rows, cols], w);
    }
    let suffix = name.rsplit('.').next().unwrap_or(name);
    let bytes = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    packed.put(
        name,
        vec![PackedTensor::new(suffix, "F32", vec![rows, cols], bytes)],
    )
}

/// `src` with AWQ's scales folded in (see [`AwqScaling`]), searched on the first `scaling.rows` of `rows`
/// (`seq` tokens each), written as a Hugging Face folder in a temporary beside `beside` (the output being
/// made) and opened from there; `None` without `scaling` (the solver reads `src` itself).
/// `on_layer(done, total)` after each layer; `false` cancels.
pub fn rescaled_model(
    src: &SourceModel,
    scaling: Option<&AwqScaling>,
    rows: &[Vec<u32>],
    seq: usize,
    backend: crate::backend::Backend,
    beside: &std::path::Path,
    on_layer: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Option<Rescaled>> {
    let Some(scaling) = scaling else {
        return Ok(None);
    };
    let linears: Vec<&TensorRef> = src
        .tensors
        .values()
        .filter(|t| is_decoder_linear(&t.name))
        .collect();
    let group_size = [128usize, 64, 32]
        .into_iter()
        .find(|g| linears.iter().all(|t| t.cols() % g == 0))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: AWQ scales need decoder linears whose input widths are multiples of 32",
                src.path.display()
            ))
        })?;
    if !(2..=8).contains(&scaling.bits) || scaling.n_grid == 0 || scaling.search_rows == 0 {
        return Err(Error::Invalid(
            "AWQ scales need a 2–8-bit grid, a ratio grid of at least one point and at least one search row"
                .into(),
        ));
    }
    let rows = &rows[..scaling.rows.min(rows.len())];
    if rows.is_empty() {
        return Err(Error::Invalid("AWQ scales need calibration rows".into()));
    }
    let mut model = Model::load(src)?;
    model.set_backend(backend);
    model.check_context(seq, false)?;
    let c = model.config().clone();
    let name = beside
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let spec = OutputSpec::folder(beside.with_file_name(format!("{name}.awq-scaled")))
        .input(&src.path)
        .overwrite(true)
        .estimated_bytes(src.tensors.values().map(|t| t.numel() as u64 * 2).sum());
    let (staged, mut store) = crate::calib::activations::stage_embeddings(
        &model,
        rows,
        spec,
        crate::calib::activations::DEFAULT_ACTIVATION_BUDGET_MIB << 20,
    )?;
    let mut cache = model.new_cache(seq.max(1));
    let mut packed = PackedSpill::create(&staged.path().join(".scaled-linears"))?;
    let search = Search {
        grid: AwqGrid {
            bits: scaling.bits,
            group_size,
        },
        n_grid: scaling.n_grid,
        duo_scaling: true,
        search_rows: scaling.search_rows.min(rows.len()),
        backend,
    };
    for li in 0..c.num_layers {
        let l = scale_layer(
            &mut model,
            src,
            li,
            rows.len(),
            &mut store,
            seq,
            &mut cache,
            &search,
        )?;
        put_side_tensors(
            &mut packed,
            li,
            &l.attn_norm,
            &l.ffn_norm,
            l.v_bias.as_deref(),
        )?;
        for wk in &l.work {
            put_float(&mut packed, &wk.kind.hf_name(li), wk.rows, wk.cols, &wk.w)?;
        }
        if !on_layer(li + 1, c.num_layers) {
            return Err(Error::Cancelled);
        }
    }
    drop(store);
    drop(model);
    let fmt = PackedFolder {
        quantization_config: serde_json::Value::Null,
        side_files: Vec::new(),
        metadata: serde_json::Map::new(),
        max_shard_bytes: crate::writers::gptq::DEFAULT_MAX_SHARD_BYTES,
        packs: is_decoder_linear,
    };
    write_packed_folder(src, &fmt, staged.path(), &mut packed, &mut |_, _| true)?;
    packed.remove()?;
    let src = SourceModel::open(staged.path())?;
    Ok(Some(Rescaled { src, _dir: staged }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixture::{write_fixture, FixtureSpec};
    use std::path::Path;

    const TEXT: &str = "The keeper counted the boats in the harbour every evening, and wrote the number \
        in a small book. Some nights the wind came from the sea and the boats knocked together like wooden \
        bells; other nights the water lay still and the lamps on the pier shone in it. ";

    fn opts(dir: &Path, layout: AwqLayout, rtn: bool) -> AwqQuantizeOptions {
        let text = dir.join("calib.txt");
        std::fs::write(&text, TEXT.repeat(20)).expect("text");
        AwqQuantizeOptions {
            grid: AwqGrid {
                bits: 4,
                group_size: 32,
            },
            layout,
            calib: CalibSource::File {
                path: text,
                column: None,
            },
            calib_opts: CalibOptions {
                rows: 8,
                seq_len: 48,
                seed: 3,
            },
            search_rows: 4,
            rtn,
            ..AwqQuantizeOptions::default()
        }
    }

    use crate::testing::mean_kld as kld;

    #[test]
    fn awq_beats_round_to_nearest_in_both_layouts_and_the_folders_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let float = Model::load(&src).expect("float");
        let toks = src.tokenizer.encode(&TEXT.repeat(2), false).expect("toks");
        let mut results = Vec::new();
        for (name, layout, rtn) in [
            ("rtn", AwqLayout::Gemm, true),
            ("gemm", AwqLayout::Gemm, false),
            ("ct", AwqLayout::CompressedTensors, false),
        ] {
            let out = tmp.path().join(name);
            let mut seen = 0;
            let r = quantize_awq(
                &src,
                &opts(tmp.path(), layout, rtn),
                &OutputSpec::folder(&out),
                &mut |_, done, total| {
                    seen = done;
                    assert_eq!(total, 14);
                    true
                },
            )
            .expect(name);
            assert_eq!((seen, r.modules.len()), (14, 14));
            assert!(
                (r.linear_bits_per_weight - 4.0 - 20.0 / 32.0).abs() < 0.2,
                "{r:?}"
            );
            let q = SourceModel::open(&out).expect("open AWQ folder");
            assert_eq!(q.tensors.values().filter(|t| t.is_grouped()).count(), 14);
            results.push((name, kld(&float, &Model::load(&q).expect("load"), &toks), q));
        }
        let (rtn, gemm, ct) = (results[0].1, results[1].1, results[2].1);
        eprintln!("KLD from the float model: RTN {rtn:.5}, AWQ {gemm:.5}");
        assert!(gemm < 0.9 * rtn, "AWQ {gemm} vs RTN {rtn}");
        // Same numbers, two layouts: the models the readers build are identical.
        assert!(
            (gemm - ct).abs() < 1e-12,
            "GEMM {gemm} vs compressed-tensors {ct}"
        );
        let (g, c) = (&results[1].2, &results[2].2);
        for (name, t) in &g.tensors {
            let u = c.tensors.get(name).expect("same tensors");
            assert_eq!(t.to_f32(), u.to_f32(), "{name}");
        }
        // The scales went into the norms.
        let n0 = "model.layers.0.input_layernorm.weight";
        assert_ne!(src.tensors[n0].to_f32(), g.tensors[n0].to_f32());
        assert_eq!(
            g.calibration_dataset.as_deref(),
            Some(
                opts(tmp.path(), AwqLayout::Gemm, false)
                    .calib
                    .dataset_name()
                    .as_str()
            )
        );
    }

    #[test]
    fn with_full_attention_o_proj_is_scaled_into_v_and_its_bias() {
        // Qwen2 with as many KV heads as heads: v's outputs are o's inputs, so o's scale folds into v's rows
        // and bias.
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        let spec = FixtureSpec {
            kv_heads: 4,
            ..FixtureSpec::tiny_qwen2()
        };
        write_fixture(&spec, &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let float = Model::load(&src).expect("float");
        let toks = src.tokenizer.encode(&TEXT.repeat(2), false).expect("toks");
        let mut kl = Vec::new();
        for rtn in [true, false] {
            let out = tmp.path().join(format!("awq-{rtn}"));
            quantize_awq(
                &src,
                &opts(tmp.path(), AwqLayout::CompressedTensors, rtn),
                &OutputSpec::folder(&out),
                &mut |_, _, _| true,
            )
            .expect("awq");
            let q = SourceModel::open(&out).expect("open");
            let vb = "model.layers.1.self_attn.v_proj.bias";
            // (Float tensors are written in fp16.)
            let written: Vec<f32> = src.tensors[vb]
                .to_f32()
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            let changed = written != q.tensors[vb].to_f32();
            assert_eq!(
                changed, !rtn,
                "v's bias carries o's scale only when AWQ runs"
            );
            kl.push(kld(&float, &Model::load(&q).expect("load"), &toks));
        }
        assert!(kl[1] < 0.9 * kl[0], "AWQ {} vs RTN {}", kl[1], kl[0]);
    }

    #[test]
    fn shapes_awq_cannot_take_are_refused_before_any_work() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let mut o = opts(tmp.path(), AwqLayout::Gemm, false);
        o.grid.group_size = 48;
        let e = quantize_awq(
            &src,
            &o,
            &OutputSpec::folder(tmp.path().join("x")),
            &mut |_, _, _| true,
        )
        .expect_err("group 48");
        assert!(
            e.to_string()
                .contains("not a multiple of the group size 48"),
            "{e}"
        );
        o.grid.group_size = 32;
        o.grid.bits = 3;
        let e = quantize_awq(
            &src,
            &o,
            &OutputSpec::folder(tmp.path().join("x")),
            &mut |_, _, _| true,
        )
        .expect_err("3-bit GEMM");
        assert!(e.to_string().contains("awq-ct"), "{e}");
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn a_rescaled_model_computes_the_same_function_and_its_folder_goes_away() {
        // Full attention, so o_proj's scale folds into v's rows and bias too.
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        let spec = FixtureSpec {
            kv_heads: 4,
            ..FixtureSpec::tiny_qwen2()
        };
        write_fixture(&spec, &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let float = Model::load(&src).expect("float");
        let o = opts(tmp.path(), AwqLayout::Gemm, false);
        let docs = load_documents(&o.calib).expect("docs");
        let rows = sample_rows(&src.tokenizer, &docs, &o.calib_opts).expect("rows");
        let scaling = AwqScaling {
            rows: 6,
            search_rows: 2,
            ..AwqScaling::default()
        };
        let out = tmp.path().join("out");
        let mut layers = Vec::new();
        let r = rescaled_model(
            &src,
            Some(&scaling),
            &rows,
            48,
            o.backend,
            &out,
            &mut |d, t| {
                layers.push((d, t));
                true
            },
        )
        .expect("rescale")
        .expect("scaled");
        assert_eq!(layers, vec![(1, 2), (2, 2)]);
        let temps = || {
            std::fs::read_dir(tmp.path())
                .expect("ls")
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("out."))
                .collect::<Vec<_>>()
        };
        assert_eq!(temps().len(), 1, "{:?}", temps());
        assert!(r.src.tensors.values().all(|t| !t.is_grouped()));
        // Every norm, v's bias and every linear changed; the function did not (f16 rounding aside).
        for li in 0..2 {
            for n in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.v_proj.bias",
                "self_attn.q_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                let n = format!("model.layers.{li}.{n}");
                assert_ne!(src.tensors[&n].to_f32(), r.src.tensors[&n].to_f32(), "{n}");
            }
        }
        let toks = src.tokenizer.encode(&TEXT.repeat(2), false).expect("toks");
        let k = kld(&float, &Model::load(&r.src).expect("load"), &toks);
        assert!(k < 1e-5, "KLD {k}");
        drop(r);
        assert!(temps().is_empty(), "{:?}", temps());
        // Cancelled after the first layer: nothing left either.
        let e = rescaled_model(
            &src,
            Some(&scaling),
            &rows,
            48,
            o.backend,
            &out,
            &mut |_, _| false,
        )
        .err()
        .expect("cancelled");
        assert!(matches!(e, Error::Cancelled), "{e}");
        assert!(temps().is_empty(), "{:?}", temps());
    }
}
