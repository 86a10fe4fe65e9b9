//! EXL2 end to end (`shared/reference/exl2.md` §3): measure, choose, quantize, write.
//!
//! 1. **Measurement** (skipped when a `measurement.json` is given, ours or ExLlamaV2's): layer by layer on the
//!    float model's own states, each linear is quantized once per distinct option of ExLlamaV2's tables
//!    (adaptive GPTQ against the Hessian of its inputs), and for each of the 19 attention and 17 MLP option rows
//!    the block runs with those packed weights; its error is `1 − accuracy`, accuracy being ExLlamaV2's
//!    `1 − mean_rows ‖y_q − y‖ / ‖y‖` on the residual stream after the block.
//! 2. **Choice**: one option row per block under the budget `⌊bpw · Σ K·N'⌋` bits (the decoder linears, every
//!    side tensor counted, as ExLlamaV2 counts), minimising `Σ err²` with the exact multiple-choice knapsack of
//!    [`crate::solvers::mix`] instead of ExLlamaV2's simulated annealing. Budgets out of reach are refused with
//!    the reachable range before any quantization.
//! 3. **Quantization**: layer-sequential on the quantized model's states (attention, then the MLP on the
//!    quantized attention's output), each linear with its chosen option; the output head with the head option
//!    on the final norm's outputs; packed, checked against the weights the solver evaluated (ExLlamaV2's repack
//!    check, here exact), and written with `measurement.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::calib::{load_documents, sample_rows, CalibOptions, CalibSource};
use crate::codecs::exl2::Exl2Packed;
use crate::infer::{LinearKind, MatmulInput, Model};
use crate::model::SourceModel;
use crate::output::OutputSpec;
use crate::quantize_gptq::{run_sequential, GptqTimings, HessianCollector, HessianUse};
use crate::quantize_packed::{PackedModuleMetrics, PackedReport};
use crate::solvers::exl2::{attn_options, head_option, mlp_options, Exl2Prepared, QParams};
use crate::solvers::gptq::Hessian;
use crate::solvers::mix::MixBudget;
use crate::solvers::mix::{choose, reachable, Choice};
use crate::tensor::{Bytes, Exl2Linear, Grouped, TensorRef};
use crate::writers::exl2::{exl2_parts, Exl2FolderConfig};
use crate::writers::packed::{folder_bytes, is_decoder_linear, write_packed_folder, PackedSpill};
use crate::{Error, Result};

/// What to make of a model as EXL2.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2QuantizeOptions {
    /// What the choice must fit: bits per weight of the decoder linears (side tensors included, as ExLlamaV2
    /// counts), the weight files' bytes, or the GPU memory ExLlamaV2 needs (everything but the embedding,
    /// which it keeps in system memory, plus an f16 KV cache of `ctx` tokens).
    pub budget: MixBudget,
    /// The output head's option: 2, 3, 4, 5, 6 or 8.
    pub head_bits: u8,
    /// Calibration of the quantization pass (`rows × seq_len`); the measurement uses its first
    /// `measure_rows` rows.
    pub calib: CalibSource,
    pub calib_opts: CalibOptions,
    pub measure_rows: usize,
    /// A saved `measurement.json` (ours or ExLlamaV2's): no measuring.
    pub measurement: Option<PathBuf>,
    /// Fold AWQ's activation-aware scales into the model before measuring and quantizing
    /// ([`crate::quantize_awq::AwqScaling`]).
    pub awq_scales: Option<crate::quantize_awq::AwqScaling>,
    pub activation_budget_bytes: u64,
    pub max_shard_bytes: Option<u64>,
    pub backend: crate::backend::Backend,
}

impl Default for Exl2QuantizeOptions {
    fn default() -> Self {
        Self {
            budget: MixBudget::Bpw(4.0),
            head_bits: 6,
            calib: CalibSource::Bundled,
            calib_opts: CalibOptions {
                rows: 64,
                seq_len: 512,
                seed: 0,
            },
            measure_rows: 8,
            measurement: None,
            awq_scales: None,
            activation_budget_bytes: crate::calib::activations::DEFAULT_ACTIVATION_BUDGET_MIB << 20,
            max_shard_bytes: None,
            backend: crate::backend::Backend::Cpu,
        }
    }
}

impl Exl2QuantizeOptions {
    /// `"EXL2 4.00 bpw h6"`, `"EXL2 95MB h6"`.
    pub fn codec(&self) -> String {
        match self.budget {
            MixBudget::Bpw(b) => format!("EXL2 {b:.2} bpw h{}", self.head_bits),
            other => format!("EXL2 {} h{}", other.label(), self.head_bits),
        }
    }
}

/// One measured option row of a block.
#[derive(Clone, Debug, PartialEq)]
pub struct OptionMeasurement {
    pub accuracy: f64,
    pub total_bits: u64,
    /// `(projection, option)`: `q_proj`… or `gate_proj`….
    pub options: Vec<(String, QParams)>,
}

/// Every block's measured options: `blocks[2·l]` layer `l`'s attention, `blocks[2·l + 1]` its MLP.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2Measurement {
    pub blocks: Vec<Vec<OptionMeasurement>>,
}

fn block_key(i: usize) -> String {
    format!(
        "model.layers.{}.{}",
        i / 2,
        if i.is_multiple_of(2) {
            "self_attn"
        } else {
            "mlp"
        }
    )
}

impl Exl2Measurement {
    /// ExLlamaV2's `measurement.json`.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (i, opts) in self.blocks.iter().enumerate() {
            let rows: Vec<Value> = opts
                .iter()
                .map(|o| {
                    let mut e = serde_json::Map::new();
                    e.insert("accuracy".into(), json!(o.accuracy));
                    e.insert("total_bits".into(), json!(o.total_bits));
                    for (p, q) in &o.options {
                        e.insert(p.clone(), q.to_json());
                    }
                    Value::Object(e)
                })
                .collect();
            m.insert(block_key(i), Value::Array(rows));
        }
        json!({ "measurement": m, "last_module_idx": self.blocks.len() })
    }

    /// Read a `measurement.json` for a model of `layers` layers (keys may carry a prefix, as ExLlamaV2's
    /// multimodal models write them).
    pub fn from_json(v: &Value, layers: usize, path: &Path) -> Result<Self> {
        let bad = |d: String| Error::malformed(path, "EXL2 measurement", d);
        let m = v
            .get("measurement")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no \"measurement\" object".into()))?;
        let mut blocks = Vec::with_capacity(2 * layers);
        for i in 0..2 * layers {
            let key = block_key(i);
            let rows = m
                .iter()
                .find(|(k, _)| k.as_str() == key || k.ends_with(&format!(".{key}")))
                .and_then(|(_, v)| v.as_array())
                .ok_or_else(|| {
                    bad(format!(
                        "no measurement of {key} (was it made for this model?)"
                    ))
                })?;
            let projections: &[&str] = if i % 2 == 0 {
                &["q_proj", "k_proj", "v_proj", "o_proj"]
            } else {
                &["gate_proj", "up_proj", "down_proj"]
            };
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let accuracy = r["accuracy"]
                    .as_f64()
                    .filter(|a| a.is_finite())
                    .ok_or_else(|| bad(format!("{key}: an entry has no accuracy")))?;
                let mut options = Vec::new();
                for p in projections {
                    let q =
                        QParams::from_json(&r[*p]).map_err(|e| bad(format!("{key}.{p}: {e}")))?;
                    options.push(((*p).to_owned(), q));
                }
                out.push(OptionMeasurement {
                    accuracy,
                    total_bits: r["total_bits"].as_u64().unwrap_or(0),
                    options,
                });
            }
            if out.is_empty() {
                return Err(bad(format!("{key} has no options")));
            }
            blocks.push(out);
        }
        Ok(Self { blocks })
    }
}

const ATTN: [LinearKind; 4] = [LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O];
const MLP: [LinearKind; 3] = [LinearKind::Gate, LinearKind::Up, LinearKind::Down];

fn proj_name(kind: LinearKind) -> &'static str {
    match kind {
        LinearKind::Q => "q_proj",
        LinearKind::K => "k_proj",
        LinearKind::V => "v_proj",
        LinearKind::O => "o_proj",
        LinearKind::Gate => "gate_proj",
        LinearKind::Up => "up_proj",
        LinearKind::Down => "down_proj",
    }
}

/// A packed linear as the model runs it.
pub(crate) fn exl2_tensor(name: &str, p: &Exl2Packed, out_features: usize) -> Result<TensorRef> {
    TensorRef::grouped(
        name,
        Grouped::Exl2(Exl2Linear {
            in_features: p.in_features,
            out_features,
            n_pad: p.n_pad,
            groups: p.groups.clone(),
            perm: p.perm.clone(),
            q_weight: Bytes::owned(p.q_weight.clone()),
            q_scale: Bytes::owned(p.q_scale.clone()),
            q_scale_max: Bytes::owned(p.q_scale_max.clone()),
            index_bytes: p.q_groups.len() + p.q_invperm.len(),
        }),
    )
}

/// `(K, N', bias length)` of a linear of the model.
fn shape_of(model: &Model, li: usize, kind: LinearKind) -> Result<(usize, usize, usize)> {
    let w = model
        .linear(li, kind)
        .ok_or_else(|| Error::Invalid(format!("no linear {}", kind.hf_name(li))))?;
    let bias = if model.config().attention_bias
        && matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V)
    {
        w.rows()
    } else {
        0
    };
    Ok((w.cols(), w.rows().div_ceil(32) * 32, bias))
}

/// `Σ ‖a − b‖ / ‖b‖` parts: the relative error of one row.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut e, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        e += f64::from(x - y).powi(2);
        n += f64::from(*y).powi(2);
    }
    if n > 0.0 {
        (e / n).sqrt()
    } else {
        0.0
    }
}

/// The per-row references one block's options are judged against.
struct BlockRefs {
    /// The block's normed input, per row.
    inputs: Vec<Vec<f32>>,
    /// The residual stream before the block, per row.
    before: Vec<Vec<f32>>,
    /// … and after it, with the float weights.
    after: Vec<Vec<f32>>,
}

/// Measure every block of `model` on the float model's states over `rows`.
fn measure(
    model: &mut Model,
    rows: &[Vec<u32>],
    on_block: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Exl2Measurement> {
    let c = model.config().clone();
    let seq = rows.first().map_or(0, Vec::len);
    let mut states: Vec<Vec<f32>> = rows.iter().map(|r| model.embed_tokens(r)).collect();
    let mut cache = model.new_cache(seq.max(1));
    let attn_rows = attn_options();
    let mlp_rows = mlp_options();
    let mut blocks = Vec::with_capacity(2 * c.num_layers);
    for li in 0..c.num_layers {
        let mut col = HessianCollector {
            layer: li,
            wanted: vec![
                MatmulInput::Attention,
                MatmulInput::AttentionOutput,
                MatmulInput::Ffn,
                MatmulInput::FfnDown,
            ],
            hessians: HashMap::new(),
            seconds: 0.0,
            error: None,
            backend: model.backend(),
        };
        let mut attn = BlockRefs {
            inputs: Vec::new(),
            before: Vec::new(),
            after: Vec::new(),
        };
        let mut mlp = BlockRefs {
            inputs: Vec::new(),
            before: Vec::new(),
            after: Vec::new(),
        };
        for x in states.iter_mut() {
            let xn = model.attention_input(li, x)?;
            let a = model.attention_output(li, &xn, seq, &mut cache)?;
            let mid: Vec<f32> = x.iter().zip(&a).map(|(u, v)| u + v).collect();
            let xn2 = model.ffn_input(li, &mid)?;
            let m = model.mlp_output(li, &xn2, seq)?;
            let out: Vec<f32> = mid.iter().zip(&m).map(|(u, v)| u + v).collect();
            let before = x.clone();
            // The Hessians of the four inputs (x becomes the layer's output, `out`).
            model.run_layer(li, x, seq, &mut cache, Some(&mut col))?;
            if let Some(e) = col.error.take() {
                return Err(e);
            }
            attn.inputs.push(xn);
            attn.before.push(before);
            attn.after.push(mid.clone());
            mlp.inputs.push(xn2);
            mlp.before.push(mid);
            mlp.after.push(out.clone());
            *x = out;
        }
        let hess = |k: MatmulInput| {
            col.hessians
                .get(&crate::quantize_gptq::input_key(k))
                .ok_or_else(|| Error::Invalid(format!("no inputs were captured for layer {li}")))
        };
        for (bi, (kinds, table_len)) in [(&ATTN[..], attn_rows.len()), (&MLP[..], mlp_rows.len())]
            .into_iter()
            .enumerate()
        {
            let refs = if bi == 0 { &attn } else { &mlp };
            // Each projection quantized once per distinct option, as packed tensors the model runs.
            let mut packed: Vec<HashMap<String, TensorRef>> = Vec::new();
            let mut prepared: HashMap<u8, Exl2Prepared> = HashMap::new();
            for (pi, &kind) in kinds.iter().enumerate() {
                let input = kind.input();
                let key = crate::quantize_gptq::input_key(input);
                if let std::collections::hash_map::Entry::Vacant(e) = prepared.entry(key) {
                    e.insert(Exl2Prepared::new(hess(input)?)?.on_backend(model.backend()));
                }
                let prep = &prepared[&key];
                let w_ref = model
                    .linear(li, kind)
                    .ok_or_else(|| Error::Invalid(format!("no linear {}", kind.hf_name(li))))?;
                let (n, w) = (w_ref.rows(), w_ref.to_f32());
                let mut by_desc = HashMap::new();
                for r in 0..table_len {
                    let q = if bi == 0 {
                        &attn_rows[r][pi]
                    } else {
                        &mlp_rows[r][pi]
                    };
                    if by_desc.contains_key(&q.desc()) {
                        continue;
                    }
                    let p = prep.quantize(&w, n, q)?.packed;
                    by_desc.insert(q.desc(), exl2_tensor(&kind.hf_name(li), &p, n)?);
                }
                packed.push(by_desc);
            }
            let originals: Vec<TensorRef> = kinds
                .iter()
                .map(|&k| model.linear(li, k).cloned())
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Invalid(format!("layer {li} lacks a linear")))?;
            let mut measured = Vec::with_capacity(table_len);
            for r in 0..table_len {
                let row: Vec<QParams> = if bi == 0 {
                    attn_rows[r].to_vec()
                } else {
                    mlp_rows[r].to_vec()
                };
                let mut total_bits = 0u64;
                for (pi, &kind) in kinds.iter().enumerate() {
                    let (k, n_pad, bias) = shape_of(model, li, kind)?;
                    total_bits += row[pi].total_bits(k, n_pad, bias);
                    model.replace_linear(li, kind, packed[pi][&row[pi].desc()].clone())?;
                }
                let mut err = 0f64;
                for i in 0..refs.inputs.len() {
                    let y = if bi == 0 {
                        model.attention_output(li, &refs.inputs[i], seq, &mut cache)?
                    } else {
                        model.mlp_output(li, &refs.inputs[i], seq)?
                    };
                    let yq: Vec<f32> = refs.before[i].iter().zip(&y).map(|(u, v)| u + v).collect();
                    err += rel_err(&yq, &refs.after[i]);
                }
                let accuracy = (1.0 - err / refs.inputs.len().max(1) as f64).max(1e-6);
                measured.push(OptionMeasurement {
                    accuracy,
                    total_bits,
                    options: kinds
                        .iter()
                        .zip(row)
                        .map(|(&k, q)| (proj_name(k).to_owned(), q))
                        .collect(),
                });
            }
            for (&k, t) in kinds.iter().zip(originals) {
                model.replace_linear(li, k, t)?;
            }
            blocks.push(measured);
            if !on_block(blocks.len(), 2 * c.num_layers) {
                return Err(Error::Cancelled);
            }
        }
    }
    Ok(Exl2Measurement { blocks })
}

/// The option row chosen for every block, and the bits they take.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2Strategy {
    pub picks: Vec<usize>,
    pub bits: u64,
    /// `Σ K·N'` of the decoder linears.
    pub weights: u64,
}

/// Choose one measured option per block so that its bits fit `budget_bits` (for the decoder linears) and
/// `Σ (1 − accuracy)²` is least; `what` names the budget in the user's terms for an out-of-reach error, given
/// the reachable decoder bits.
pub fn choose_strategy(
    m: &Exl2Measurement,
    costs: &[Vec<u64>],
    weights: u64,
    budget_bits: f64,
    what: &dyn Fn(u64, u64) -> String,
) -> Result<Exl2Strategy> {
    let slots: Vec<Vec<Choice>> = m
        .blocks
        .iter()
        .zip(costs)
        .map(|(b, c)| {
            b.iter()
                .zip(c)
                .map(|(o, &bits)| Choice {
                    bits,
                    err: (1.0 - o.accuracy).max(0.0).powi(2),
                })
                .collect()
        })
        .collect();
    let (lo, hi) = reachable(&slots);
    let budget = budget_bits.floor();
    if !(budget.is_finite() && budget >= lo as f64) {
        return Err(Error::Invalid(what(lo, hi)));
    }
    let s = choose(&slots, budget.min(u64::MAX as f64) as u64)?;
    Ok(Exl2Strategy {
        picks: s.picks,
        bits: s.bits,
        weights,
    })
}

/// The decoder bits per weight EXL2's option tables can reach on a model of this shape: `(cheapest,
/// dearest)`, exact (costs depend only on shapes), for front ends to bound their inputs before measuring.
pub fn reachable_bpw(s: &crate::model::summary::ModelSummary) -> (f64, f64) {
    let pad = |n: usize| n.div_ceil(32) * 32;
    let (h, q, kv, i) = (
        s.hidden,
        s.heads * s.head_dim,
        s.kv_heads * s.head_dim,
        s.intermediate,
    );
    let bias = s.arch.starts_with("Qwen2");
    let attn_shapes = [
        (h, pad(q), if bias { pad(q) } else { 0 }),
        (h, pad(kv), if bias { pad(kv) } else { 0 }),
        (h, pad(kv), if bias { pad(kv) } else { 0 }),
        (q, pad(h), 0),
    ];
    let mlp_shapes = [(h, pad(i), 0), (h, pad(i), 0), (i, pad(h), 0)];
    let range = |rows: Vec<Vec<u64>>| {
        let lo = rows
            .iter()
            .map(|r| r.iter().sum::<u64>())
            .min()
            .unwrap_or(0);
        let hi = rows
            .iter()
            .map(|r| r.iter().sum::<u64>())
            .max()
            .unwrap_or(0);
        (lo, hi)
    };
    let a = range(
        attn_options()
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&attn_shapes)
                    .map(|(q, &(k, n, b))| q.total_bits(k, n, b))
                    .collect()
            })
            .collect(),
    );
    let m = range(
        mlp_options()
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&mlp_shapes)
                    .map(|(q, &(k, n, b))| q.total_bits(k, n, b))
                    .collect()
            })
            .collect(),
    );
    let weights: usize = attn_shapes
        .iter()
        .chain(&mlp_shapes)
        .map(|&(k, n, _)| k * n)
        .sum();
    let w = weights.max(1) as f64;
    ((a.0 + m.0) as f64 / w, (a.1 + m.1) as f64 / w)
}

/// Bytes an EXL2 folder of `src` at `bpw` takes (an estimate for the free-space check).
pub fn estimated_folder_bytes(src: &SourceModel, opts: &Exl2QuantizeOptions) -> u64 {
    let head = f64::from(opts.head_bits) + 0.4;
    src.tensors
        .values()
        .map(|t| {
            let n = t.numel() as f64;
            if is_decoder_linear(&t.name) {
                let bpw = match opts.budget {
                    MixBudget::Bpw(b) => b,
                    _ => 8.0,
                };
                (n * bpw / 8.0) as u64
            } else if t.name == "lm_head.weight" {
                (n * head / 8.0) as u64
            } else if t.name == "model.embed_tokens.weight" && src.config.tie_word_embeddings {
                (n * 2.0 + n * head / 8.0) as u64
            } else {
                t.numel() as u64 * 2
            }
        })
        .sum()
}

/// Progress of an EXL2 run: `(phase, the linear just quantized, done, total)`; `false` cancels.
pub type OnStep<'a> = dyn FnMut(&str, Option<&PackedModuleMetrics>, usize, usize) -> bool + 'a;

/// The knapsack's choice for `budget` over `measurement`, costed on `model`'s shapes (the rest of the folder from
/// `src`'s tensors); an out-of-reach budget is refused with the reachable range.
fn plan(
    model: &Model,
    src: &SourceModel,
    measurement: &Exl2Measurement,
    head: &QParams,
    budget: MixBudget,
) -> Result<Exl2Strategy> {
    let c = model.config().clone();
    // The cost of every option of every block, on this model's shapes.
    let mut weights = 0u64;
    for li in 0..c.num_layers {
        for kind in ATTN.iter().chain(&MLP) {
            let (k, n_pad, _) = shape_of(model, li, *kind)?;
            weights += (k * n_pad) as u64;
        }
    }
    let mut costs = Vec::with_capacity(measurement.blocks.len());
    for (i, b) in measurement.blocks.iter().enumerate() {
        let kinds: &[LinearKind] = if i % 2 == 0 { &ATTN } else { &MLP };
        let mut v = Vec::with_capacity(b.len());
        for o in b {
            let mut bits = 0u64;
            for (kind, (_, q)) in kinds.iter().zip(&o.options) {
                let (k, n_pad, bias) = shape_of(model, i / 2, *kind)?;
                bits += q.total_bits(k, n_pad, bias);
            }
            v.push(bits);
        }
        costs.push(v);
    }
    // What the rest of the folder takes: fp16 tensors, the packed head, the safetensors header (bounded).
    let pad = |n: usize| n.div_ceil(32) * 32;
    let head_bytes = head.total_bits(c.hidden_size, pad(c.vocab_size), 0) / 8;
    // (The head's five tensor names counted here; a tied model has no lm_head.weight below.)
    let (mut fixed, mut embed) = (head_bytes + 5 * 110, 0u64);
    for t in src.tensors.values() {
        let stored = if is_decoder_linear(&t.name) || t.name == "lm_head.weight" {
            5
        } else {
            fixed += t.numel() as u64 * 2;
            if t.name == "model.embed_tokens.weight" {
                embed = t.numel() as u64 * 2;
            }
            1
        };
        fixed += stored * (t.name.len() as u64 + 96);
    }
    let kv_per_token = (2 * c.num_layers * c.num_kv_heads * c.head_dim * 2) as u64;
    let budget_bits = match budget {
        MixBudget::Bpw(b) => b * weights as f64,
        MixBudget::FileBytes(n) => (n as f64 - fixed as f64) * 8.0,
        MixBudget::Memory { bytes, ctx } => {
            (bytes as f64 - (fixed - embed) as f64 - (kv_per_token * ctx) as f64) * 8.0
        }
    };
    let what = |lo: u64, hi: u64| -> String {
        let bpw = |b: u64| b as f64 / weights as f64;
        let size = |b: u64| b / 8 + fixed;
        match budget {
            MixBudget::Bpw(b) => format!(
                "EXL2 at {b} bits per weight is out of reach for this model: its options give {:.3} to {:.3} bpw",
                bpw(lo),
                bpw(hi)
            ),
            MixBudget::FileBytes(n) => format!(
                "an EXL2 folder of {n} bytes is out of reach for this model: its weights take {} to {} bytes \
                 ({:.3} to {:.3} bpw)",
                size(lo),
                size(hi),
                bpw(lo),
                bpw(hi)
            ),
            MixBudget::Memory { bytes, ctx } => format!(
                "{bytes} bytes of GPU memory is out of reach for this model with a {ctx}-token f16 KV cache: \
                 ExLlamaV2 needs {} to {} bytes ({:.3} to {:.3} bpw)",
                size(lo) - embed + kv_per_token * ctx,
                size(hi) - embed + kv_per_token * ctx,
                bpw(lo),
                bpw(hi)
            ),
        }
    };
    choose_strategy(measurement, &costs, weights, budget_bits, &what)
}

/// Quantize `src` to EXL2 into a folder at `out.path` (checked before any work, written under a temporary
/// name, renamed when complete). `on_step(phase, metrics, done, total)` is called after each measured block
/// (`"measuring"`, no metrics) and each quantized linear (`"EXL2"`); `false` cancels.
pub fn quantize_exl2(
    src: &SourceModel,
    opts: &Exl2QuantizeOptions,
    out: &OutputSpec,
    on_step: &mut OnStep<'_>,
) -> Result<PackedReport> {
    let start = Instant::now();
    let head = head_option(opts.head_bits).ok_or_else(|| {
        Error::Invalid(format!(
            "--head-bits {}: use 2, 3, 4, 5, 6 or 8",
            opts.head_bits
        ))
    })?;
    if let MixBudget::Bpw(b) = opts.budget {
        if !(b.is_finite() && b > 0.0 && b <= 16.0) {
            return Err(Error::Invalid(format!(
                "--bpw {b}: EXL2 targets lie between about 2.1 and 8.1 bits per weight"
            )));
        }
    }
    for t in src.tensors.values().filter(|t| is_decoder_linear(&t.name)) {
        if t.is_grouped() {
            return Err(Error::Invalid(format!(
                "{}: {} is already quantized ({}); start from a float model",
                src.path.display(),
                t.name,
                t.type_label()
            )));
        }
        if t.cols() % 32 != 0 {
            return Err(Error::Invalid(format!(
                "{}: {} has {} inputs; EXL2 needs input widths that are multiples of 32",
                src.path.display(),
                t.name,
                t.cols()
            )));
        }
        if src.config.attention_bias && t.rows() % 32 != 0 {
            return Err(Error::Invalid(format!(
                "{}: {} has a bias and {} outputs; EXL2 pads outputs to 32, which ExLlamaV2 cannot do for biased layers",
                src.path.display(),
                t.name,
                t.rows()
            )));
        }
    }
    let given = match &opts.measurement {
        Some(p) => {
            let text = crate::bounded::read_text_file(p, 64 << 20, "EXL2 measurement")?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::malformed(p, "EXL2 measurement", e.to_string()))?;
            Some(Exl2Measurement::from_json(&v, src.config.num_layers, p)?)
        }
        None => None,
    };
    let mut spec = out
        .clone()
        .input(&src.path)
        .estimated_bytes(estimated_folder_bytes(src, opts));
    spec.kind = crate::output::OutputKind::Folder;
    if let CalibSource::File { path, .. } = &opts.calib {
        spec = spec.input(path);
    }
    if let Some(p) = &opts.measurement {
        spec = spec.input(p);
    }
    crate::output::preflight(&spec)?;
    let seq = opts.calib_opts.seq_len;
    let trained = src.config.max_position_embeddings;
    if seq == 0 || (trained > 0 && seq > trained) {
        return Err(Error::Invalid(format!(
            "--seq-len {seq}: use 1..={trained} (the model's context, max_position_embeddings)"
        )));
    }
    let docs = load_documents(&opts.calib)?;
    let rows = sample_rows(&src.tokenizer, &docs, &opts.calib_opts)?;
    drop(docs);
    if let (Some(m), Some(_)) = (&given, &opts.awq_scales) {
        // An out-of-reach budget is refused before the scale pass (the shapes are the source's).
        plan(&Model::load(src)?, src, m, &head, opts.budget)?;
    }
    // With AWQ scales, everything from here on (measurement, solver, files) is of the rescaled model.
    let rescaled = crate::quantize_awq::rescaled_model(
        src,
        opts.awq_scales.as_ref(),
        &rows,
        seq,
        opts.backend,
        &out.path,
        &mut |done, total| on_step("AWQ scales", None, done, total),
    )?;
    let src = rescaled.as_ref().map_or(src, |r| &r.src);
    let mut model = Model::load(src)?;
    model.set_backend(opts.backend);
    let c = model.config().clone();
    model.check_context(seq, false)?;
    let measure_rows = opts.measure_rows.clamp(1, rows.len().max(1));
    let measurement = match given {
        Some(m) => m,
        None => measure(
            &mut model,
            &rows[..measure_rows.min(rows.len())],
            &mut |done, total| on_step("measuring", None, done, total),
        )?,
    };
    let strategy = plan(&model, src, &measurement, &head, opts.budget)?;

    let (staged, mut store) = crate::calib::activations::stage_embeddings(
        &model,
        &rows,
        spec,
        opts.activation_budget_bytes,
    )?;
    let mut packed = PackedSpill::create(&staged.path().join(".packed-linears"))?;
    let total = c.num_layers * 7 + 1;
    let mut modules: Vec<PackedModuleMetrics> = Vec::with_capacity(total);
    let mut stored_bits = 0f64;
    let mut linear_weights = 0usize;
    let record = |name: &str,
                  layer: usize,
                  w: &[f32],
                  r: &crate::solvers::exl2::Exl2Quantized,
                  n: usize,
                  packed: &mut PackedSpill,
                  modules: &mut Vec<PackedModuleMetrics>|
     -> Result<TensorRef> {
        let p = &r.packed;
        // The repack check: the stored tensors decode to exactly what the solver evaluated.
        let t = exl2_tensor(name, p, n)?;
        let k = p.in_features;
        let mut row = vec![0f32; k];
        for probe in [0, n / 2, n.saturating_sub(1)] {
            t.dequant_row(probe, &mut row);
            if row != r.dequantised[probe * k..(probe + 1) * k] {
                return Err(Error::Invalid(format!(
                    "{name}: the packed EXL2 tensors do not decode to the quantized weights (row {probe})"
                )));
            }
        }
        let bytes = p.stored_bytes();
        let (mut e2, mut n2, mut max) = (0f64, 0f64, 0f64);
        for (a, b) in w.iter().zip(&r.dequantised) {
            let d = f64::from(a - b);
            e2 += d * d;
            n2 += f64::from(*a).powi(2);
            max = max.max(d.abs());
        }
        let m = PackedModuleMetrics {
            layer,
            tensor: name.to_owned(),
            bits_per_weight: bytes as f64 * 8.0 / (n * k) as f64,
            rel_rms_error: if n2 > 0.0 { (e2 / n2).sqrt() } else { 0.0 },
            max_error: max,
        };
        packed.put(name, exl2_parts(p.clone()))?;
        modules.push(m);
        Ok(t)
    };
    let mut timings = GptqTimings::default();
    {
        let mut prepared: Option<(usize, u8, Exl2Prepared)> = None;
        let mut solve =
            |model: &Model, li: usize, kind: LinearKind, h: HessianUse<'_>| -> Result<TensorRef> {
                let name = kind.hf_name(li);
                let key = crate::quantize_gptq::input_key(kind.input());
                if !matches!(&prepared, Some((l, k, _)) if *l == li && *k == key) {
                    let h = match &h {
                        HessianUse::Borrowed(h) => *h,
                        HessianUse::Owned(h) => h,
                    };
                    prepared = Some((li, key, Exl2Prepared::new(h)?.on_backend(model.backend())));
                }
                let Some((_, _, prep)) = &prepared else {
                    unreachable!("prepared above")
                };
                let block = 2 * li + usize::from(!ATTN.contains(&kind));
                let pick = strategy.picks[block];
                let pi = if block.is_multiple_of(2) {
                    ATTN.iter().position(|&k| k == kind)
                } else {
                    MLP.iter().position(|&k| k == kind)
                }
                .unwrap_or(0);
                let q = &measurement.blocks[block][pick].options[pi].1;
                let w_ref = model
                    .linear(li, kind)
                    .ok_or_else(|| Error::Invalid(format!("no linear {name}")))?;
                let (n, w) = (w_ref.rows(), w_ref.to_f32());
                let r = prep.quantize(&w, n, q)?;
                stored_bits += r.packed.stored_bytes() as f64 * 8.0;
                linear_weights += w.len();
                let t = record(&name, li, &w, &r, n, &mut packed, &mut modules)?;
                let last = modules.last().cloned();
                if !on_step("EXL2", last.as_ref(), modules.len(), total) {
                    return Err(Error::Cancelled);
                }
                Ok(t)
            };
        run_sequential(
            &mut model,
            &mut store,
            rows.len(),
            seq,
            &[ATTN.to_vec(), MLP.to_vec()],
            &mut timings,
            &mut solve,
        )?;
    }
    // The output head, on the final norm's outputs of the quantized model.
    let mut h = Hessian::new(c.hidden_size);
    for i in 0..rows.len() {
        let x = store.get(i)?;
        h.add_batch(&model.head_input(&x), seq)?;
    }
    drop(store);
    let head_w = model.lm_head().to_f32();
    let n_vocab = model.lm_head().rows();
    let r = Exl2Prepared::new(&h)?
        .on_backend(model.backend())
        .quantize(&head_w, n_vocab, &head)?;
    record(
        "lm_head.weight",
        c.num_layers,
        &head_w,
        &r,
        n_vocab,
        &mut packed,
        &mut modules,
    )?;
    drop((head_w, r));
    let last = modules.last().cloned();
    if !on_step("EXL2", last.as_ref(), modules.len(), total) {
        return Err(Error::Cancelled);
    }
    drop(model);
    let cfg = Exl2FolderConfig {
        bits: match opts.budget {
            MixBudget::Bpw(b) => b,
            _ => strategy.bits as f64 / strategy.weights as f64,
        },
        head_bits: opts.head_bits,
        calib_rows: rows.len(),
        calib_length: seq,
        dataset: opts.calib.dataset_name(),
        awq_scales: opts.awq_scales.is_some(),
        max_shard_bytes: opts.max_shard_bytes,
    };
    write_packed_folder(
        src,
        &cfg.folder(),
        staged.path(),
        &mut packed,
        &mut |_, _| true,
    )?;
    packed.remove()?;
    let mut mj = serde_json::to_string_pretty(&measurement.to_json())
        .map_err(|e| Error::Invalid(e.to_string()))?;
    mj.push('\n');
    let mp = staged.path().join("measurement.json");
    std::fs::write(&mp, mj).map_err(|e| Error::io(&mp, e))?;
    let out_dir = staged.commit()?;
    let folder_size_bytes = folder_bytes(&out_dir, false)?;
    let weight_bytes = folder_bytes(&out_dir, true)?;
    let params: usize = src.tensors.values().map(TensorRef::numel).sum::<usize>()
        + if src.config.tie_word_embeddings && !src.tensors.contains_key("lm_head.weight") {
            c.vocab_size * c.hidden_size
        } else {
            0
        };
    Ok(PackedReport {
        codec: format!(
            "{} ({:.3} bpw chosen)",
            opts.codec(),
            strategy.bits as f64 / strategy.weights as f64
        ),
        modules,
        linear_bits_per_weight: stored_bits / linear_weights.max(1) as f64,
        bits_per_weight: weight_bytes as f64 * 8.0 / params.max(1) as f64,
        folder_size_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::fixture::{write_fixture, FixtureSpec};

    const TEXT: &str = "The keeper counted the boats in the harbour every evening, and wrote the number \
        in a small book. Some nights the wind came from the sea and the boats knocked together like wooden \
        bells; other nights the water lay still and the lamps on the pier shone in it. ";

    fn opts(dir: &Path, bpw: f64) -> Exl2QuantizeOptions {
        let budget = MixBudget::Bpw(bpw);
        let text = dir.join("calib.txt");
        std::fs::write(&text, TEXT.repeat(20)).unwrap();
        Exl2QuantizeOptions {
            budget,
            calib: CalibSource::File {
                path: text,
                column: None,
            },
            calib_opts: CalibOptions {
                rows: 8,
                seq_len: 48,
                seed: 3,
            },
            measure_rows: 4,
            ..Exl2QuantizeOptions::default()
        }
    }

    use crate::testing::mean_kld as kld;

    #[test]
    fn measures_chooses_quantizes_and_requantizes_from_the_measurement() {
        let tmp = tempfile::tempdir().unwrap();
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).unwrap();
        let src = SourceModel::open(&src_dir).unwrap();
        let float = Model::load(&src).unwrap();
        let toks = src.tokenizer.encode(TEXT, false).unwrap();

        let out4 = tmp.path().join("exl2-4");
        let mut measured = 0;
        let r4 = quantize_exl2(
            &src,
            &opts(tmp.path(), 4.0),
            &OutputSpec::folder(&out4),
            &mut |phase, _, _, _| {
                measured += usize::from(phase == "measuring");
                true
            },
        )
        .unwrap();
        assert_eq!(measured, 4, "two layers × (attention, MLP)");
        assert_eq!(r4.modules.len(), 15, "14 linears and the head");
        // The measurement: ExLlamaV2's schema, 19 and 17 rows, accuracy rising with the bits overall.
        let mj: Value =
            serde_json::from_slice(&std::fs::read(out4.join("measurement.json")).unwrap()).unwrap();
        let m = Exl2Measurement::from_json(&mj, 2, &out4).unwrap();
        assert_eq!(
            m.blocks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![19, 17, 19, 17]
        );
        for b in &m.blocks {
            assert!(
                b[0].accuracy < b[b.len() - 1].accuracy,
                "{:?}",
                b.iter().map(|o| o.accuracy).collect::<Vec<_>>()
            );
            assert!(b[b.len() - 1].accuracy > 0.99);
        }
        assert_eq!(
            mj["measurement"]["model.layers.1.mlp"][3]["down_proj"]["bits"],
            json!([5, 4])
        );
        // The folder: EXL2 tensors with ExLlamaV2's names and dtypes, the tied head stored as lm_head.*.
        let st = std::fs::read(out4.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let dtype = |n: &str| format!("{:?}", st.tensor(n).unwrap().dtype());
        assert_eq!(dtype("model.layers.0.mlp.down_proj.q_weight"), "I32");
        assert_eq!(dtype("model.layers.0.mlp.down_proj.q_groups"), "I16");
        assert_eq!(dtype("model.layers.0.mlp.down_proj.q_scale_max"), "F16");
        assert_eq!(dtype("lm_head.q_weight"), "I32");
        assert_eq!(
            st.tensor("model.layers.0.self_attn.k_proj.q_invperm")
                .unwrap()
                .shape(),
            [64]
        );
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(out4.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["quantization_config"]["quant_method"], "exl2");
        assert_eq!(cfg["quantization_config"]["head_bits"], 6);
        // It reads back and runs close to the float model; the decoder bits fit the budget.
        let q = SourceModel::open(&out4).unwrap();
        assert_eq!(q.tensors.values().filter(|t| t.is_grouped()).count(), 15);
        let q4 = Model::load(&q).unwrap();
        let k4 = kld(&float, &q4, &toks);
        assert!(k4 < 0.05, "KLD {k4}");
        let chosen: f64 = r4
            .codec
            .split('(')
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(chosen <= 4.0 && chosen > 3.0, "{}", r4.codec);
        assert!(r4.codec.contains("EXL2 4.00 bpw h6"), "{}", r4.codec);

        // Requantized at the cheapest reachable rate and at 8 bpw from the saved measurement (the tiny model's
        // side tensors weigh much): nothing is measured again.
        let mut o = opts(tmp.path(), 3.64);
        o.measurement = Some(out4.join("measurement.json"));
        let mut kl = Vec::new();
        for bpw in [3.64, 8.0] {
            o.budget = MixBudget::Bpw(bpw);
            let out = tmp.path().join(format!("exl2-{bpw}"));
            quantize_exl2(
                &src,
                &o,
                &OutputSpec::folder(&out),
                &mut |phase, _, _, _| {
                    assert_ne!(phase, "measuring");
                    true
                },
            )
            .unwrap();
            let q = Model::load(&SourceModel::open(&out).unwrap()).unwrap();
            kl.push(kld(&float, &q, &toks));
        }
        assert!(
            kl[0] > kl[1] && k4 > kl[1],
            "KLD at 3.64 / 4 / 8 bpw: {} {k4} {}",
            kl[0],
            kl[1]
        );

        // A size budget: the weight file fits it (the header bounded from above) and is not far under.
        let target = std::fs::metadata(out4.join("model.safetensors"))
            .unwrap()
            .len()
            + 20_000;
        o.budget = MixBudget::FileBytes(target);
        let out = tmp.path().join("exl2-size");
        quantize_exl2(&src, &o, &OutputSpec::folder(&out), &mut |_, _, _, _| true).unwrap();
        let got = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len();
        assert!(
            got <= target && got + 60_000 > target,
            "{got} for a budget of {target}"
        );
        o.budget = MixBudget::Memory {
            bytes: 1000,
            ctx: 64,
        };
        let e = quantize_exl2(
            &src,
            &o,
            &OutputSpec::folder(tmp.path().join("m")),
            &mut |_, _, _, _| true,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("GPU memory") && e.to_string().contains("KV cache"),
            "{e}"
        );

        // Out of reach: refused before anything is written, naming the range.
        o.budget = MixBudget::Bpw(1.5);
        let out = tmp.path().join("exl2-1.5");
        let e =
            quantize_exl2(&src, &o, &OutputSpec::folder(&out), &mut |_, _, _, _| true).unwrap_err();
        assert!(
            e.to_string().contains("out of reach") && e.to_string().contains("bpw"),
            "{e}"
        );
        assert!(!out.exists());
        // With AWQ scales too: refused before the scale pass starts.
        o.awq_scales = Some(crate::quantize_awq::AwqScaling::default());
        let mut steps = 0;
        let e = quantize_exl2(&src, &o, &OutputSpec::folder(&out), &mut |_, _, _, _| {
            steps += 1;
            true
        })
        .unwrap_err();
        assert!(e.to_string().contains("out of reach"), "{e}");
        assert_eq!(steps, 0);
        assert!(!out.exists());
    }

    #[test]
    fn the_reachable_range_is_what_the_optimiser_can_reach() {
        let tmp = tempfile::tempdir().unwrap();
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).unwrap();
        let src = SourceModel::open(&src_dir).unwrap();
        let (lo, hi) = reachable_bpw(&crate::model::summary::ModelSummary::of(&src));
        // The measured run's refusal names the same range (3.637 to 8.509 on this shape).
        assert!(
            (lo - 3.637).abs() < 5e-4 && (hi - 8.509).abs() < 5e-4,
            "{lo} {hi}"
        );
    }

    #[test]
    fn biased_untied_models_and_cancelling() {
        let tmp = tempfile::tempdir().unwrap();
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_qwen2(), &src_dir).unwrap();
        let src = SourceModel::open(&src_dir).unwrap();
        let out = tmp.path().join("exl2");
        quantize_exl2(
            &src,
            &opts(tmp.path(), 5.0),
            &OutputSpec::folder(&out),
            &mut |_, _, _, _| true,
        )
        .unwrap();
        let q = SourceModel::open(&out).unwrap();
        assert!(q
            .tensors
            .contains_key("model.layers.0.self_attn.q_proj.bias"));
        let (a, b) = (Model::load(&src).unwrap(), Model::load(&q).unwrap());
        let toks = src.tokenizer.encode(TEXT, false).unwrap();
        assert!(kld(&a, &b, &toks) < 0.05);
        // Cancelled part way: nothing left behind.
        let out2 = tmp.path().join("exl2-cancelled");
        let r = quantize_exl2(
            &src,
            &opts(tmp.path(), 5.0),
            &OutputSpec::folder(&out2),
            &mut |p, _, done, _| p == "measuring" || done < 3,
        );
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "src" && n != "calib.txt" && n != "exl2")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn with_awq_scales_the_rescaled_model_is_measured_quantized_and_written() {
        let tmp = tempfile::tempdir().unwrap();
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).unwrap();
        let src = SourceModel::open(&src_dir).unwrap();
        let float = Model::load(&src).unwrap();
        let toks = src.tokenizer.encode(TEXT, false).unwrap();
        let mut phases = Vec::new();
        let (mut klds, mut norms) = (Vec::new(), Vec::new());
        for awq in [false, true] {
            let out = tmp.path().join(format!("exl2-{awq}"));
            let o = Exl2QuantizeOptions {
                awq_scales: awq.then(|| crate::quantize_awq::AwqScaling {
                    rows: 4,
                    search_rows: 2,
                    ..Default::default()
                }),
                ..opts(tmp.path(), 4.0)
            };
            quantize_exl2(
                &src,
                &o,
                &OutputSpec::folder(&out),
                &mut |phase, _, _, _| {
                    if !phases.iter().any(|p| p == phase) {
                        phases.push(phase.to_owned());
                    }
                    true
                },
            )
            .unwrap();
            let q = SourceModel::open(&out).unwrap();
            norms.push(q.tensors["model.layers.1.post_attention_layernorm.weight"].to_f32());
            klds.push(kld(&float, &Model::load(&q).unwrap(), &toks));
        }
        assert_eq!(phases, ["measuring", "EXL2", "AWQ scales"]);
        assert_ne!(norms[0], norms[1], "the inverse scales are in the norms");
        let cfg = |d: &str| -> Value {
            serde_json::from_slice(&std::fs::read(tmp.path().join(d).join("config.json")).unwrap())
                .unwrap()
        };
        assert_eq!(cfg("exl2-true")["quantization_config"]["awq_scales"], true);
        assert!(cfg("exl2-false")["quantization_config"]
            .get("awq_scales")
            .is_none());
        // Near the float model either way (a norm left undivided would not be).
        assert!(klds[1] < 0.05 && klds[1] < 2.0 * klds[0], "{klds:?}");
        // Only the two folders and the inputs are left: the rescaled model's temporary is gone.
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["calib.txt", "exl2-false", "exl2-true", "src"]);
    }
}
