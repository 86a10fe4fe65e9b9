//! GPTQ quantization end to end: calibration rows → layer-sequential capture → Hessians → GPTQ solve per
//! linear → packed weights put back into the model (so the next inputs are those of the quantized model) →
//! a Hugging Face GPTQ folder.
//!
//! Layer by layer, "true sequential" as GPTQModel does it: the attention inputs are captured and q, k, v
//! solved; then o_proj's input is captured through the quantized q/k/v; then gate/up; then down; finally the
//! fully quantized layer produces the next layer's inputs. Memory holds the calibration activations of one
//! layer (`rows × seq_len × hidden` f32), spilled to a temporary file above a budget, plus one Hessian per
//! input and the packed outputs.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

use crate::calib::activations::ActStore;
use crate::calib::{load_documents, sample_rows, CalibOptions, CalibSource};
use crate::codecs::gptq::{pack_gptq, GptqPacked};
use crate::infer::{LinearKind, MatmulInput, MatmulObserver, Model};
use crate::model::SourceModel;
use crate::output::OutputSpec;
use crate::solvers::gptq::{
    gptq_quantize, gptq_quantize_owned, rtn_quantize, GptqOptions, Hessian,
};
use crate::tensor::{Bytes, GptqLinear, Grouped, TensorRef};
use crate::writers::gptq::{check_gptq_shape, gptq_folder, gptq_parts, GptqConfig};
use crate::writers::packed::{folder_bytes, is_decoder_linear, write_packed_folder, PackedSpill};
use crate::{Error, Result};

pub use crate::calib::activations::DEFAULT_ACTIVATION_BUDGET_MIB;

/// What to make of a model as GPTQ.

#[derive(Clone, Debug, PartialEq)]
pub struct GptqQuantizeOptions {
    pub solver: GptqOptions,
    pub calib: CalibSource,
    pub calib_opts: CalibOptions,
    /// Capture each linear's inputs through the already-quantized linears of its layer.
    pub true_sequential: bool,
    /// Keep calibration activations in memory up to this many bytes; spill to a temporary file above.
    pub activation_budget_bytes: u64,
    /// Round-to-nearest on the same grid instead of GPTQ's error feedback (the baseline GPTQ is judged
    /// against; same file format).
    pub rtn: bool,
    /// Fold AWQ's activation-aware scales into the model before solving
    /// ([`crate::quantize_awq::AwqScaling`], scored on a grid of the solver's bits).
    pub awq_scales: Option<crate::quantize_awq::AwqScaling>,
    /// Largest weight file of the output folder, in bytes of tensor data (`None`: 5 GB, see
    /// [`DEFAULT_MAX_SHARD_BYTES`](crate::writers::gptq::DEFAULT_MAX_SHARD_BYTES)); above it the weights are
    /// written as `model-0000i-of-0000N.safetensors` shards with `model.safetensors.index.json`.
    pub max_shard_bytes: Option<u64>,
    /// Where calibration capture runs.
    pub backend: crate::backend::Backend,
}

/// One quantized linear.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GptqModuleMetrics {
    pub layer: usize,
    /// Hugging Face weight name.
    pub tensor: String,
    /// GPTQ's loss (its summed per-column losses).
    pub loss: f64,
    /// Round-to-nearest on the same grid: `½ Σ_rows (W − Ŵ) H_d (W − Ŵ)ᵀ` (`H_d` the damped Hessian).
    pub rtn_loss: f64,
    /// The same measure of the written result (equal to `loss` up to rounding; `rtn_loss` for `--rtn`).
    pub gptq_output_loss: f64,
    /// ‖W − Ŵ‖ / ‖W‖.
    pub rel_rms_error: f64,
    pub max_error: f64,
    pub bits_per_weight: f64,
    pub damp_percent: f32,
    /// Seconds the solver took for this linear.
    pub solve_s: f64,
}

/// Where the time went.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GptqTimings {
    /// Forward passes through the layers (without the Hessian updates).
    pub capture_s: f64,
    pub hessian_s: f64,
    pub solve_s: f64,
    pub write_s: f64,
}

/// What a finished GPTQ quantization wrote.
#[derive(Clone, Debug, Serialize)]
pub struct GptqReport {
    pub config: String,
    pub modules: Vec<GptqModuleMetrics>,
    pub timings: GptqTimings,
    pub calib_rows: usize,
    pub calib_seq_len: usize,
    /// Bytes of calibration activations held (in memory or in the spill file).
    pub activation_bytes: u64,
    pub spilled: bool,
    pub folder_size_bytes: u64,
}

/// Accumulates the Hessians of the inputs a stage needs.
pub(crate) struct HessianCollector {
    pub(crate) layer: usize,
    pub(crate) wanted: Vec<MatmulInput>,
    pub(crate) hessians: HashMap<u8, Hessian>,
    pub(crate) seconds: f64,
    pub(crate) error: Option<Error>,
    /// Where `XᵀX` is computed: on the GPU backend, the GPU (the CPU if it fails).
    pub(crate) backend: crate::backend::Backend,
}

/// A stage's Hessian as one linear gets it.
pub(crate) enum HessianUse<'a> {
    Borrowed(&'a Hessian),
    Owned(Hessian),
}

pub(crate) fn input_key(i: MatmulInput) -> u8 {
    match i {
        MatmulInput::Attention => 0,
        MatmulInput::AttentionOutput => 1,
        MatmulInput::Ffn => 2,
        MatmulInput::FfnDown => 3,
    }
}

impl MatmulObserver for HessianCollector {
    fn observe(&mut self, layer: usize, input: MatmulInput, x: &[f32], n: usize) {
        if layer != self.layer || !self.wanted.contains(&input) || self.error.is_some() {
            return;
        }
        let t = Instant::now();
        let cols = x.len() / n.max(1);
        let h = self
            .hessians
            .entry(input_key(input))
            .or_insert_with(|| Hessian::new(cols));
        let gram = match self.backend {
            crate::backend::Backend::Gpu => crate::backend::on_gpu(|g| g.gram(x, n, cols)),
            crate::backend::Backend::Cpu => None,
        };
        let r = match gram {
            Some(g) => h.add_gram(&g, n),
            None => h.add_batch(x, n),
        };
        if let Err(e) = r {
            self.error = Some(e);
        }
        self.seconds += t.elapsed().as_secs_f64();
    }
}

/// The stages of one layer: linears solved together from one capture pass.
fn stages(true_sequential: bool) -> Vec<Vec<LinearKind>> {
    use LinearKind::*;
    if true_sequential {
        vec![vec![Q, K, V], vec![O], vec![Gate, Up], vec![Down]]
    } else {
        vec![vec![Q, K, V, O, Gate, Up, Down]]
    }
}

/// The `quantization_config` these options write.
pub fn gptq_config(o: &GptqQuantizeOptions) -> GptqConfig {
    GptqConfig {
        bits: u32::from(o.solver.bits),
        group_size: o.solver.group_size,
        desc_act: o.solver.act_order,
        static_groups: o.solver.static_groups,
        sym: o.solver.sym,
        damp_percent: o.solver.damp_percent,
        true_sequential: o.true_sequential,
        calibration_dataset: Some(o.calib.dataset_name()),
        max_shard_bytes: o.max_shard_bytes,
    }
}

/// Bytes a GPTQ folder of `src` takes: packed decoder linears (codes, scales, zeros, g_idx), the rest in
/// f16 — an estimate for the free-space check.
pub fn estimated_folder_bytes(src: &SourceModel, opts: &GptqQuantizeOptions) -> u64 {
    let bits = f64::from(opts.solver.bits);
    let group = opts.solver.group_size.unwrap_or(4096).max(1) as f64;
    src.tensors
        .values()
        .map(|t| {
            let n = t.numel() as f64;
            if t.name.contains(".layers.") && t.name.ends_with("_proj.weight") {
                // codes + f16 scale and packed zero per group + int32 g_idx per input column.
                (n * bits / 8.0 + n / group * (2.0 + bits / 8.0) + t.cols() as f64 * 4.0) as u64
            } else {
                t.numel() as u64 * 2
            }
        })
        .sum()
}

/// Progress of a GPTQ run: `(the linear just quantized, done, total)` after each linear, or `(None, done,
/// total)` after each layer of the AWQ-scale pass (`awq_scales`); `false` cancels.
pub type OnGptqStep<'a> = dyn FnMut(Option<&GptqModuleMetrics>, usize, usize) -> bool + 'a;

/// Quantize `src` with GPTQ into a Hugging Face GPTQ folder at `out.path` (through [`crate::output`]:
/// checked before calibration starts, written under a temporary name, renamed when complete; activations
/// spilled to disk live inside that temporary). `on_module` reports progress ([`OnGptqStep`]); `false`
/// cancels (nothing is left behind).
pub fn quantize_gptq(
    src: &SourceModel,
    opts: &GptqQuantizeOptions,
    out: &OutputSpec,
    on_module: &mut OnGptqStep<'_>,
) -> Result<GptqReport> {
    // What the v1 file stores: f16 scales and zero points in 1..=maxq, seen by the solver's error feedback.
    let solver = GptqOptions {
        fp16_scales: true,
        v1_safe_zeros: true,
        backend: opts.backend,
        ..opts.solver.clone()
    };
    let mut spec = out
        .clone()
        .input(&src.path)
        .estimated_bytes(estimated_folder_bytes(src, opts));
    spec.kind = crate::output::OutputKind::Folder;
    if let crate::calib::CalibSource::File { path, .. } = &opts.calib {
        spec = spec.input(path);
    }
    crate::output::preflight(&spec)?;
    let trained = src.config.max_position_embeddings;
    let seq = opts.calib_opts.seq_len;
    if seq == 0 || (trained > 0 && seq > trained) {
        return Err(Error::Invalid(format!(
            "--seq-len {seq}: use 1..={trained} (the model's context, max_position_embeddings)"
        )));
    }
    let cfg = gptq_config(opts);
    for t in src.tensors.values().filter(|t| is_decoder_linear(&t.name)) {
        check_gptq_shape(t)?;
    }
    let docs = load_documents(&opts.calib)?;
    let rows = sample_rows(&src.tokenizer, &docs, &opts.calib_opts)?;
    drop(docs);
    // With AWQ scales, the solver and the files are of the rescaled model.
    let rescaled = crate::quantize_awq::rescaled_model(
        src,
        opts.awq_scales.as_ref(),
        &rows,
        seq,
        opts.backend,
        &out.path,
        &mut |done, total| on_module(None, done, total),
    )?;
    let src = rescaled.as_ref().map_or(src, |r| &r.src);
    let mut model = Model::load(src)?;
    model.set_backend(opts.backend);
    model.check_context(opts.calib_opts.seq_len, false)?;
    let c = model.config().clone();
    let seq = opts.calib_opts.seq_len;
    let activation_bytes = (rows.len() * seq * c.hidden_size * 4) as u64;
    let mut timings = GptqTimings::default();
    let t = Instant::now();
    let (staged, mut store) = crate::calib::activations::stage_embeddings(
        &model,
        &rows,
        spec,
        opts.activation_budget_bytes,
    )?;
    let spilled = store.spilled();
    timings.capture_s += t.elapsed().as_secs_f64();
    let total = c.num_layers * 7;
    let mut modules = Vec::with_capacity(total);
    // Finished layers go to disk at once: memory holds one layer's packed weights, not the model's.
    let mut packed = PackedSpill::create(&staged.path().join(".packed-linears"))?;
    let mut solve =
        |model: &Model, li: usize, kind: LinearKind, h: HessianUse<'_>| -> Result<TensorRef> {
            let name = kind.hf_name(li);
            let w_ref = model
                .linear(li, kind)
                .ok_or_else(|| Error::Invalid(format!("no linear {name}")))?;
            let (n, k) = (w_ref.rows(), w_ref.cols());
            let w = w_ref.to_f32();
            let t = Instant::now();
            let r = match (opts.rtn, h) {
                (true, HessianUse::Borrowed(h)) => rtn_quantize(&w, n, k, h, &solver)?,
                (true, HessianUse::Owned(h)) => rtn_quantize(&w, n, k, &h, &solver)?,
                (false, HessianUse::Borrowed(h)) => gptq_quantize(&w, n, k, h, &solver)?,
                (false, HessianUse::Owned(h)) => gptq_quantize_owned(&w, n, k, h, &solver)?,
            };
            let solve_s = t.elapsed().as_secs_f64();
            let p = pack_gptq(u32::from(r.bits), n, k, &r.q, &r.zeros, &r.scales, &r.g_idx)?;
            let (mut e2, mut n2, mut max) = (0.0f64, 0.0f64, 0.0f64);
            for (a, b) in w.iter().zip(&r.dequantised) {
                let d = f64::from(a - b);
                e2 += d * d;
                n2 += f64::from(*a).powi(2);
                max = max.max(d.abs());
            }
            let bytes = p.qweight.len() + p.qzeros.len() + p.scales.len() + p.g_idx.len();
            let m = GptqModuleMetrics {
                layer: li,
                tensor: name.clone(),
                loss: r.loss,
                rtn_loss: r.rtn_loss,
                gptq_output_loss: r.loss,
                rel_rms_error: if n2 > 0.0 { (e2 / n2).sqrt() } else { 0.0 },
                max_error: max,
                bits_per_weight: bytes as f64 * 8.0 / (n * k) as f64,
                damp_percent: r.damp_percent,
                solve_s,
            };
            let t = packed_tensor(&name, u32::from(r.bits), n, k, r.n_groups, &p)?;
            packed.put(&name, gptq_parts(&cfg, n, k, p))?;
            modules.push(m);
            if !on_module(Some(&modules[modules.len() - 1]), modules.len(), total) {
                return Err(Error::Cancelled);
            }
            Ok(t)
        };
    run_sequential(
        &mut model,
        &mut store,
        rows.len(),
        seq,
        &stages(opts.true_sequential),
        &mut timings,
        &mut solve,
    )?;
    timings.solve_s = modules.iter().map(|m| m.solve_s).sum();
    drop(store);
    drop(model);
    let t = Instant::now();
    write_packed_folder(
        src,
        &gptq_folder(&cfg),
        staged.path(),
        &mut packed,
        &mut |_, _| true,
    )?;
    packed.remove()?;
    let out = &staged.commit()?;
    timings.write_s = t.elapsed().as_secs_f64();
    let folder_size_bytes = folder_bytes(out, false)?;
    Ok(GptqReport {
        config: format!(
            "{} int{} {}{}{}",
            if opts.rtn { "RTN" } else { "GPTQ" },
            cfg.bits,
            cfg.group_size
                .map_or("per-channel".into(), |g| format!("g{g}")),
            if cfg.desc_act { " act-order" } else { "" },
            if cfg.sym { " sym" } else { " asym" }
        ),
        modules,
        timings,
        calib_rows: rows.len(),
        calib_seq_len: seq,
        activation_bytes,
        spilled,
        folder_size_bytes,
    })
}

/// The layer-sequential calibration loop GPTQ and EXL2 share. For every layer, each stage's inputs are
/// captured (through the linears of earlier stages, already replaced) as Hessians, `solve` turns each of
/// the stage's linears into its quantized replacement, and the fully quantized layer produces the next
/// layer's inputs from `store` (`n_rows` sequences of `seq` tokens). With more than one stage, the stage
/// that reaches down's input keeps the state after attention, and only the MLP half runs at the end. The
/// layer's original weights are put back once its outputs are computed.
pub(crate) fn run_sequential(
    model: &mut Model,
    store: &mut ActStore,
    n_rows: usize,
    seq: usize,
    stages: &[Vec<LinearKind>],
    timings: &mut GptqTimings,
    solve: &mut dyn FnMut(&Model, usize, LinearKind, HessianUse<'_>) -> Result<TensorRef>,
) -> Result<()> {
    let mut cache = model.new_cache(seq);
    let split = stages.len() > 1;
    for li in 0..model.config().num_layers {
        // The layer's original weights (mapped, not copied), put back once its outputs are computed.
        let mut originals: Vec<(LinearKind, TensorRef)> = Vec::new();
        for stage in stages {
            let mut col = HessianCollector {
                layer: li,
                wanted: stage.iter().map(|k| k.input()).collect(),
                hessians: HashMap::new(),
                seconds: 0.0,
                error: None,
                backend: model.backend(),
            };
            let t = Instant::now();
            // The layer runs only as far as the stage's last input (in layer order).
            let until = col
                .wanted
                .iter()
                .copied()
                .max_by_key(|m| input_key(*m))
                .unwrap_or(MatmulInput::FfnDown);
            // The stage that reaches down's input runs after q/k/v/o are quantized, so it leaves in `x` the
            // quantized layer's state after attention — all its output still needs (the MLP half): kept
            // instead of the layer's input.
            let keep_mid = split && until == MatmulInput::FfnDown;
            for i in 0..n_rows {
                let mut x = store.get(i)?;
                model.run_layer_until(li, &mut x, seq, &mut cache, &mut col, until)?;
                if keep_mid {
                    store.put(i, x)?;
                }
                if let Some(e) = col.error.take() {
                    return Err(e);
                }
            }
            timings.hessian_s += col.seconds;
            timings.capture_s += t.elapsed().as_secs_f64() - col.seconds;
            for (si, &kind) in stage.iter().enumerate() {
                let name = kind.hf_name(li);
                // The last linear of the stage that reads this input takes its Hessian (the solver frees
                // it once factorised); earlier ones borrow it.
                let last_user = !stage[si + 1..].iter().any(|k| k.input() == kind.input());
                let missing = || Error::Invalid(format!("no inputs were captured for {name}"));
                let h = if last_user {
                    HessianUse::Owned(
                        col.hessians
                            .remove(&input_key(kind.input()))
                            .ok_or_else(missing)?,
                    )
                } else {
                    HessianUse::Borrowed(
                        col.hessians
                            .get(&input_key(kind.input()))
                            .ok_or_else(missing)?,
                    )
                };
                let t = solve(model, li, kind, h)?;
                let original = model
                    .linear(li, kind)
                    .ok_or_else(|| Error::Invalid(format!("no linear {name}")))?
                    .clone();
                originals.push((kind, original));
                model.replace_linear(li, kind, t)?;
            }
        }
        // The quantized layer's outputs are the next layer's inputs.
        let t = Instant::now();
        for i in 0..n_rows {
            let mut x = store.get(i)?;
            if split {
                model.run_ffn(li, &mut x, seq)?;
            } else {
                model.run_layer(li, &mut x, seq, &mut cache, None)?;
            }
            store.put(i, x)?;
        }
        timings.capture_s += t.elapsed().as_secs_f64();
        for (kind, w) in originals {
            model.replace_linear(li, kind, w)?;
        }
    }
    Ok(())
}

pub(crate) fn packed_tensor(
    name: &str,
    bits: u32,
    n: usize,
    k: usize,
    groups: usize,
    p: &GptqPacked,
) -> Result<TensorRef> {
    TensorRef::grouped(
        name,
        Grouped::Gptq(GptqLinear {
            bits,
            in_features: k,
            out_features: n,
            groups,
            qweight: Bytes::owned(p.qweight.clone()),
            qzeros: Bytes::owned(p.qzeros.clone()),
            scales: Bytes::owned(p.scales.clone()),
            g_idx: Bytes::owned(p.g_idx.clone()),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::Logits;
    use crate::model::fixture::{write_fixture, FixtureSpec};
    use std::path::Path;

    const TEXT: &str = "The keeper counted the boats in the harbour every evening, and wrote the number \
        in a small book. Some nights the wind came from the sea and the boats knocked together like wooden \
        bells; other nights the water lay still and the lamps on the pier shone in it. ";

    fn opts(dir: &Path, budget: u64) -> GptqQuantizeOptions {
        let text = dir.join("calib.txt");
        std::fs::write(&text, TEXT.repeat(20)).expect("text");
        GptqQuantizeOptions {
            solver: GptqOptions {
                bits: 4,
                group_size: Some(32),
                act_order: true,
                sym: false,
                ..GptqOptions::default()
            },
            calib: CalibSource::File {
                path: text,
                column: None,
            },
            calib_opts: CalibOptions {
                rows: 8,
                seq_len: 48,
                seed: 3,
            },
            true_sequential: true,
            activation_budget_bytes: budget,
            rtn: false,
            awq_scales: None,
            max_shard_bytes: None,
            backend: crate::backend::Backend::Cpu,
        }
    }

    #[test]
    fn gptq_beats_round_to_nearest_and_the_folder_runs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let out = tmp.path().join("gptq");
        let o = opts(tmp.path(), 1 << 30);
        let mut seen = 0;
        let report = quantize_gptq(
            &src,
            &o,
            &OutputSpec::folder(&out),
            &mut |_, done, total| {
                seen = done;
                assert_eq!(total, 14);
                true
            },
        )
        .expect("gptq");
        assert_eq!(
            (seen, report.modules.len(), report.spilled),
            (14, 14, false)
        );
        let (gptq, rtn): (f64, f64) = report
            .modules
            .iter()
            .map(|m| (m.gptq_output_loss, m.rtn_loss))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert!(gptq < 0.9 * rtn, "GPTQ {gptq} vs RTN {rtn}");
        for m in &report.modules {
            assert!(m.rel_rms_error > 0.0 && m.rel_rms_error < 0.2, "{m:?}");
            assert!((m.bits_per_weight - 4.0).abs() < 2.0, "{m:?}");
        }
        // The folder opens as packed linears, runs, and mostly agrees with the source.
        let q = SourceModel::open(&out).expect("open GPTQ");
        assert_eq!(q.tensors.values().filter(|t| t.is_grouped()).count(), 14);
        let (a, b) = (Model::load(&src).expect("a"), Model::load(&q).expect("b"));
        let toks = src.tokenizer.encode(TEXT, false).expect("toks");
        let la = a
            .forward(&toks, &mut a.new_cache(128), Logits::All)
            .expect("a");
        let lb = b
            .forward(&toks, &mut b.new_cache(128), Logits::All)
            .expect("b");
        let v = a.vocab_size();
        let same = la
            .chunks(v)
            .zip(lb.chunks(v))
            .filter(|(x, y)| crate::infer::argmax(x) == crate::infer::argmax(y))
            .count();
        assert!(
            same * 10 >= toks.len() * 7,
            "{same} of {} top tokens agree",
            toks.len()
        );

        // Spilling the activations to disk gives the same weights (written here as shards too).
        let single = std::fs::read(out.join("model.safetensors")).expect("weights");
        let out2 = tmp.path().join("gptq-spilled");
        let mut o2 = opts(tmp.path(), 0);
        o2.max_shard_bytes = Some(single.len() as u64 / 4);
        let r2 = quantize_gptq(&src, &o2, &OutputSpec::folder(&out2), &mut |_, _, _| true)
            .expect("spill");
        assert!(r2.spilled);
        assert!(!out2.join("model.safetensors").exists());
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out2.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("index json");
        let map = index["weight_map"].as_object().expect("weight_map");
        let a = safetensors::SafeTensors::deserialize(&single).expect("single");
        assert_eq!(map.len(), a.len());
        let mut shards = HashMap::new();
        for (name, ta) in a.tensors() {
            let file = map[&name].as_str().expect("file name");
            let bytes = shards
                .entry(file.to_owned())
                .or_insert_with(|| std::fs::read(out2.join(file)).expect("shard"));
            let b = safetensors::SafeTensors::deserialize(bytes).expect("shard");
            let tb = b.tensor(&name).expect("tensor in its shard");
            assert_eq!(
                (ta.dtype(), ta.shape(), ta.data()),
                (tb.dtype(), tb.shape(), tb.data()),
                "{name}"
            );
        }
        assert!(shards.len() >= 3, "{} shards", shards.len());
        let q2 = SourceModel::open(&out2).expect("open sharded");
        let c = Model::load(&q2).expect("c");
        let lc = c
            .forward(&toks, &mut c.new_cache(128), Logits::All)
            .expect("c");
        assert!(lb.iter().zip(&lc).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(!std::fs::read_dir(tmp.path())
            .expect("ls")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("activations")));
    }

    #[test]
    fn a_cancelled_gptq_run_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let out = tmp.path().join("gptq");
        let r = quantize_gptq(
            &src,
            &opts(tmp.path(), 0),
            &OutputSpec::folder(&out),
            &mut |_, done, _| done < 5,
        );
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "src" && n != "calib.txt")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn with_awq_scales_gptq_solves_the_rescaled_model() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let float = Model::load(&src).expect("float");
        let toks = src.tokenizer.encode(TEXT, false).expect("toks");
        let (mut klds, mut norms, mut scale_steps) = (Vec::new(), Vec::new(), 0);
        for awq in [false, true] {
            let out = tmp.path().join(format!("gptq-{awq}"));
            let mut o = opts(tmp.path(), 1 << 30);
            o.solver.sym = true;
            o.awq_scales = awq.then(|| crate::quantize_awq::AwqScaling {
                rows: 4,
                search_rows: 2,
                ..Default::default()
            });
            let r = quantize_gptq(&src, &o, &OutputSpec::folder(&out), &mut |m, _, _| {
                scale_steps += usize::from(m.is_none());
                true
            })
            .expect("gptq");
            assert_eq!(r.modules.len(), 14);
            let q = SourceModel::open(&out).expect("open GPTQ folder");
            norms.push(q.tensors["model.layers.0.input_layernorm.weight"].to_f32());
            klds.push(crate::testing::mean_kld(
                &float,
                &Model::load(&q).expect("load"),
                &toks,
            ));
        }
        assert_eq!(scale_steps, 2, "one per layer of the scale pass");
        assert_ne!(norms[0], norms[1], "the inverse scales are in the norms");
        eprintln!(
            "KLD from the float model: GPTQ sym {:.5}, with AWQ scales {:.5}",
            klds[0], klds[1]
        );
        assert!(klds[1] < 0.05 && klds[1] < 2.0 * klds[0], "{klds:?}");
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("gptq-"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
