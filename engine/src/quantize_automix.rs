//! Error-aware GGUF mixes: measure every decoder linear under every ggml type its rows can take, then choose
//! one type per tensor so the file meets a budget (bits per weight or bytes) with the least total error
//! ([`crate::solvers::mix`]), instead of llama-quantize's fixed rules. The result is an ordinary GGUF file
//! (per-tensor types are free in GGUF: llama.cpp loads it unchanged), written by the same pipeline as every
//! mix with the chosen types as anchored per-tensor overrides — which also reproduce the mix in llama.cpp as
//! `llama-quantize --tensor-type` arguments.
//!
//! Each type is quantized exactly as the file will hold it (the imatrix-weighted quantizers), and its error is
//! first what it adds to the linear's own output on calibration data, `E‖(W − Ŵ)x‖² ≈ Σ_j E[x_j²] Σ_i
//! (W − Ŵ)²_ij` with `E[x_j²]` the importance matrix (the diagonal of the input covariance, as llama-imatrix
//! collects it). That ranks one tensor's types, but not one tensor against another: an error in q or gate
//! passes through attention or the MLP before it reaches the residual stream, an error in down adds to it
//! directly, and how much of a layer's error the later layers pass on differs from layer to layer (on
//! SmolLM2 the divergence per unit of weighted error differs 70-fold between ffn_down tensors, while within a
//! tensor it is nearly constant from IQ1_S to Q4_K). So the model is
//! also run on calibration rows with one tensor at a time quantized to a few probe types (its cheapest, one
//! near 2.5 and one near 4.5 bits per weight), and the KL-divergence of its output from the float model's is
//! measured ([`OutputProbe`]); every candidate's error becomes that divergence, interpolated between the
//! probes in log–log against the weighted error (slope 1 past the 4-bit probe, where the divergence is
//! quadratic in the error). The total is then an estimate of the mix's KL-divergence, additive over tensors
//! as it is for small independent errors. Tensors outside the decoder layers (embeddings, output head,
//! norms) keep the base mix's types.

use rayon::prelude::*;

use crate::codecs::GgmlType;
use crate::infer::{KvCache, LinearKind, Model};
use crate::model::SourceModel;
use crate::quantize::{gguf_entries, imatrix_kvs, quantize_measured, ImatrixInput};
use crate::recipes::{plan_gguf_mix, GgufMix, TensorOverride};
use crate::solvers::mix::{choose, reachable, Choice};
use crate::tensor::{Bytes, Derived, Storage, TensorRef};
use crate::writers::gguf::{gguf_file_bytes, padded_bytes, GgufPlanTensor};
use crate::{Error, Result};

/// The types an auto mix chooses from (each tensor: those whose block divides its rows): the k-, i- and
/// legacy types, the low-bit i-quants (1.56–3.44 bpw) included.
pub const AUTOMIX_TYPES: [GgmlType; 19] = [
    GgmlType::Iq1S,
    GgmlType::Iq1M,
    GgmlType::Iq2Xxs,
    GgmlType::Iq2Xs,
    GgmlType::Iq2S,
    GgmlType::Iq3Xxs,
    GgmlType::Iq3S,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Iq4Xs,
    GgmlType::Q4K,
    GgmlType::Q4_0,
    GgmlType::Iq4Nl,
    GgmlType::Q4_1,
    GgmlType::Q5K,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q6K,
    GgmlType::Q8_0,
];

/// The mix whose rules type what the optimiser does not choose (embeddings, output head) and whose
/// `general.file_type` the file records.
pub const AUTOMIX_BASE: GgufMix = GgufMix::Q4KM;

pub use crate::recipes::MixBudget;

/// One tensor the optimiser types: each candidate type with its bytes in the file and its error.
#[derive(Clone, Debug, PartialEq)]
pub struct MixSlot {
    pub gguf_name: String,
    pub hf_name: String,
    /// `(type, padded bytes, error)`.
    pub options: Vec<(GgmlType, u64, f64)>,
}

/// Every slot's measured options, and what the rest of the file takes.
#[derive(Clone, Debug, PartialEq)]
pub struct MixMeasurement {
    pub slots: Vec<MixSlot>,
    /// Header and the tensors outside the slots, in bytes.
    pub fixed_bytes: u64,
    /// The header alone (keys, tensor infos, padding) and any tensor the source does not hold.
    pub header_bytes: u64,
    /// Parameters of the model (for bits per weight).
    pub params: u64,
    /// Bytes of llama.cpp's default f16 KV cache per token of context (keys and values, every layer).
    pub kv_bytes_per_token: u64,
    /// Calibration tokens each probe ran the model on: the errors are then estimated KL-divergences of the
    /// output (per token, additive over slots); 0 when they are the imatrix-weighted errors alone.
    pub probed_tokens: usize,
}

/// Calibration tokens an auto mix's measurement runs the model on by default, per probe ([`OutputProbe`]).
pub const DEFAULT_PROBE_TOKENS: usize = 512;
/// The most probe tokens a measurement takes (its memory grows with tokens × (layers × hidden + vocab)).
pub const MAX_PROBE_TOKENS: usize = 4096;

/// The types a slot whose rows take `candidates` is probed with: the cheapest, the one nearest 2.5 bits per
/// weight (when it is below 3.5) and the one nearest 4.5, each once.
fn probe_types(candidates: &[(GgmlType, f64)]) -> Vec<GgmlType> {
    let nearest = |b: f64| {
        candidates
            .iter()
            .min_by(|x, y| (x.1 - b).abs().total_cmp(&(y.1 - b).abs()))
            .copied()
    };
    let cheapest = candidates
        .iter()
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .copied();
    let mut out: Vec<GgmlType> = Vec::new();
    for c in [cheapest, nearest(2.5).filter(|c| c.1 < 3.5), nearest(4.5)]
        .into_iter()
        .flatten()
    {
        if !out.contains(&c.0) {
            out.push(c.0);
        }
    }
    out
}

/// A candidate's effect on the output given its weighted error `e`, from the probes' `(weighted error,
/// divergence)` points: log–log interpolation between them, slope 1 below the smallest error (the quadratic
/// regime) and the last segment's slope (between 1 and 3) above the largest.
fn output_error(probes: &[(f64, f64)], e: f64) -> f64 {
    const TINY: f64 = 1e-30;
    let mut p: Vec<(f64, f64)> = probes
        .iter()
        .map(|&(e, d)| (e.max(TINY).ln(), d.max(TINY).ln()))
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&first) = p.first() else {
        return e;
    };
    let x = e.max(TINY).ln();
    if x <= first.0 {
        return (first.1 + x - first.0).exp();
    }
    for w in p.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x <= x1 {
            let t = if x1 > x0 { (x - x0) / (x1 - x0) } else { 1.0 };
            return (y0 + t * (y1 - y0)).exp();
        }
    }
    let last = p[p.len() - 1];
    let slope = match p.len() {
        1 => 1.0,
        n => {
            let (x0, y0) = p[n - 2];
            if last.0 > x0 {
                ((last.1 - y0) / (last.0 - x0)).clamp(1.0, 3.0)
            } else {
                1.0
            }
        }
    };
    (last.1 + slope * (x - last.0)).exp()
}

/// The float model run on calibration rows with one decoder linear at a time replaced by a quantized copy:
/// the mean per-token KL-divergence of its output distribution from the float model's. The float model's
/// state at every layer's input and its log-probabilities are kept (`layers × tokens × hidden` and `tokens ×
/// vocab` floats), so probing a tensor of layer `l` runs layers `l..` and the head.
struct OutputProbe {
    model: Model,
    seq: usize,
    /// `[layer][row]`: the states entering the layer, `[seq, hidden]`.
    states: Vec<Vec<Vec<f32>>>,
    /// `[row]`: the float model's log-probabilities, `[seq, vocab]`.
    clean: Vec<Vec<f32>>,
    cache: KvCache,
}

impl OutputProbe {
    fn new(src: &SourceModel, rows: &[Vec<u32>]) -> Result<Self> {
        let model = Model::load(src)?;
        let seq = rows.first().map_or(0, Vec::len);
        if seq == 0 || rows.iter().any(|r| r.len() != seq) {
            return Err(Error::Invalid(
                "the probe rows must be non-empty and of one length".into(),
            ));
        }
        let (layers, vocab) = (model.config().num_layers, model.vocab_size());
        if let Some(t) = rows.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let mut cache = model.new_cache(seq);
        let mut states = vec![Vec::with_capacity(rows.len()); layers];
        let mut clean = Vec::with_capacity(rows.len());
        for r in rows {
            let mut x = model.embed_tokens(r);
            for (li, s) in states.iter_mut().enumerate() {
                s.push(x.clone());
                model.run_layer(li, &mut x, seq, &mut cache, None)?;
            }
            let mut lp = model.logits_of_states(&x, seq)?;
            lp.par_chunks_mut(vocab).for_each(log_softmax);
            clean.push(lp);
        }
        Ok(Self {
            model,
            seq,
            states,
            clean,
            cache,
        })
    }

    fn tokens(&self) -> usize {
        self.seq * self.clean.len()
    }

    /// The divergence with layer `li`'s `kind` replaced by `w` (the float weight is put back after).
    fn kld(&mut self, li: usize, kind: LinearKind, w: TensorRef) -> Result<f64> {
        let original = self
            .model
            .linear(li, kind)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("no linear {}", kind.hf_name(li))))?;
        self.model.replace_linear(li, kind, w)?;
        let d = self.kld_from(li);
        self.model.replace_linear(li, kind, original)?;
        d
    }

    fn kld_from(&mut self, li: usize) -> Result<f64> {
        let (vocab, seq) = (self.model.vocab_size(), self.seq);
        let mut sum = 0.0f64;
        for (ri, clean) in self.clean.iter().enumerate() {
            let mut x = self.states[li][ri].clone();
            for l in li..self.states.len() {
                self.model
                    .run_layer(l, &mut x, seq, &mut self.cache, None)?;
            }
            let logits = self.model.logits_of_states(&x, seq)?;
            sum += logits
                .par_chunks(vocab)
                .zip(clean.par_chunks(vocab))
                .map(|(q, p)| kld_row(p, q))
                .sum::<f64>();
        }
        Ok(sum / self.tokens().max(1) as f64)
    }
}

/// `v` ← log-softmax(`v`).
fn log_softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max)
        + v.iter()
            .map(|&x| f64::from(x - max).exp())
            .sum::<f64>()
            .ln();
    for x in v {
        *x = (f64::from(*x) - lse) as f32;
    }
}

/// `KL(p ‖ q)` for log-probabilities `lp` and logits `q`.
fn kld_row(lp: &[f32], q: &[f32]) -> f64 {
    let max = q.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(max)
        + q.iter()
            .map(|&x| f64::from(x - max).exp())
            .sum::<f64>()
            .ln();
    lp.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let a = f64::from(a);
            a.exp() * (a - (f64::from(b) - lse))
        })
        .sum::<f64>()
        .max(0.0)
}

/// The decoder linear a Hugging Face tensor name is: `(layer, kind)`.
fn linear_of(hf: &str) -> Option<(usize, LinearKind)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (li, _) = rest.split_once('.')?;
    let li: usize = li.parse().ok()?;
    LinearKind::ALL
        .into_iter()
        .find(|k| k.hf_name(li) == hf)
        .map(|k| (li, k))
}

/// The chosen types.
#[derive(Clone, Debug, PartialEq)]
pub struct MixPlan {
    /// One anchored override per slot (`^blk\.3\.attn_v\.weight$` → type).
    pub overrides: Vec<TensorOverride>,
    /// The file's exact size.
    pub file_bytes: u64,
    /// Summed error of the choice.
    pub err: f64,
    /// The smallest and largest files the candidates allow.
    pub reachable_bytes: (u64, u64),
}

fn escape(name: &str) -> String {
    name.replace('.', "\\.")
}

/// A tensor the optimiser types: a decoder matrix that the base mix quantizes.
fn is_slot(g: &str, ne: &[u64], ty: GgmlType) -> bool {
    g.starts_with("blk.") && ne.len() == 2 && ty != GgmlType::F32 && ty != GgmlType::F16
}

/// The tensor bytes the smallest and the largest auto mix of `src` over `types` take (every slot at its
/// cheapest, or dearest, type its rows allow; the rest as the base mix has it): front ends bound their
/// budgets with it before anything is measured.
pub fn reachable_bytes(src: &SourceModel, types: &[GgmlType]) -> Result<(u64, u64)> {
    let entries = gguf_entries(src)?;
    let list: Vec<(String, Vec<u64>)> = entries
        .iter()
        .map(|(_, g, ne)| (g.clone(), ne.clone()))
        .collect();
    let base = plan_gguf_mix(&AUTOMIX_BASE, &src.config, &list, &[], true)?;
    let (mut lo, mut hi) = (0u64, 0u64);
    for ((hf, g, ne), (_, ty)) in entries.iter().zip(&base) {
        if hf == "lm_head.weight" && src.config.tie_word_embeddings {
            continue;
        }
        let t = &src.tensors[hf];
        let ty = if t.shape.len() <= 1 {
            GgmlType::F32
        } else {
            *ty
        };
        let bytes = |ty: GgmlType| {
            ty.traits()
                .row_bytes(t.cols())
                .map(|r| (r * t.rows()) as u64)
        };
        if is_slot(g, ne, ty) {
            let costs: Vec<u64> = types.iter().filter_map(|&c| bytes(c)).collect();
            lo += costs.iter().min().copied().unwrap_or(0);
            hi += costs.iter().max().copied().unwrap_or(0);
        } else {
            let b = bytes(ty).unwrap_or((t.cols() * 4 * t.rows()) as u64);
            lo += b;
            hi += b;
        }
    }
    Ok((lo, hi))
}

/// What an auto mix of `src` holds besides the slots' types: the slots (Hugging Face and GGUF names, in file
/// order), the bytes of everything else, the header's, the parameters and the KV cache per token.
struct MixLayout {
    slots: Vec<(String, String)>,
    fixed_bytes: u64,
    header_bytes: u64,
}

fn mix_layout(src: &SourceModel, imatrix: &ImatrixInput) -> Result<MixLayout> {
    let entries = gguf_entries(src)?;
    let list: Vec<(String, Vec<u64>)> = entries
        .iter()
        .map(|(_, g, ne)| (g.clone(), ne.clone()))
        .collect();
    let base = plan_gguf_mix(&AUTOMIX_BASE, &src.config, &list, &[], true)?;
    let plan: Vec<GgufPlanTensor> = entries
        .iter()
        .zip(&base)
        .map(|((hf, _, _), (_, ty))| GgufPlanTensor {
            hf_name: hf.clone(),
            ty: *ty,
        })
        .collect();
    let whole = gguf_file_bytes(src, &plan, AUTOMIX_BASE.file_type(), &imatrix_kvs(imatrix))?;
    let data: u64 = entries
        .iter()
        .zip(&base)
        .filter(|((hf, _, _), _)| !(hf == "lm_head.weight" && src.config.tie_word_embeddings))
        .map(|((hf, _, _), (_, ty))| {
            let t = &src.tensors[hf];
            let ty = if t.shape.len() <= 1 {
                GgmlType::F32
            } else {
                *ty
            };
            let row = ty.traits().row_bytes(t.cols()).unwrap_or(t.cols() * 4);
            padded_bytes((row * t.rows()) as u64)
        })
        .sum();
    let mut slots = Vec::new();
    let mut fixed = whole;
    for ((hf, g, ne), (_, base_ty)) in entries.iter().zip(&base) {
        if !is_slot(g, ne, *base_ty) {
            continue;
        }
        let t = &src.tensors[hf];
        let (rows, cols) = (t.rows(), t.cols());
        fixed -= padded_bytes((base_ty.traits().row_bytes(cols).unwrap_or(cols * 4) * rows) as u64);
        slots.push((hf.clone(), g.clone()));
    }
    Ok(MixLayout {
        slots,
        fixed_bytes: fixed,
        header_bytes: whole.saturating_sub(data),
    })
}

impl MixLayout {
    fn measurement(
        self,
        src: &SourceModel,
        slots: Vec<MixSlot>,
        probed_tokens: usize,
    ) -> MixMeasurement {
        let c = &src.config;
        MixMeasurement {
            slots,
            fixed_bytes: self.fixed_bytes,
            header_bytes: self.header_bytes,
            params: src.tensors.values().map(|t| t.numel() as u64).sum(),
            kv_bytes_per_token: (2 * c.num_layers * c.num_kv_heads * c.head_dim * 2) as u64,
            probed_tokens,
        }
    }
}

/// Measure every decoder linear of `src` under each of `types` its rows can take (quantized with `imatrix`, as the file
/// will be), each turned into its effect on the output by probing the model on `probe_rows` (token rows of one
/// length; none: the imatrix-weighted errors alone). `progress(done, total)` after each tensor; `false`
/// cancels.
pub fn measure_mix(
    src: &SourceModel,
    imatrix: &ImatrixInput,
    types: &[GgmlType],
    probe_rows: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<MixMeasurement> {
    let mut probe = if probe_rows.is_empty() {
        None
    } else {
        Some(OutputProbe::new(src, probe_rows)?)
    };
    let layout = mix_layout(src, imatrix)?;
    let total = layout.slots.len();
    let mut slots = Vec::with_capacity(total);
    let mut buf = Vec::new();
    for (hf, g) in &layout.slots {
        let t = &src.tensors[hf];
        let (rows, cols) = (t.rows(), t.cols());
        let weights = imatrix.matrix.weights(g).filter(|w| w.len() == cols).ok_or_else(|| {
            Error::Invalid(format!(
                "the importance matrix has no entry for {g} (or one of another width): it was computed \
                 for another model"
            ))
        })?;
        // Σ_j w_j Σ_i W²_ij: the weighted error is relative to it.
        let mut wnorm2 = 0.0f64;
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            t.dequant_row(r, &mut row);
            wnorm2 += row
                .iter()
                .zip(&weights)
                .map(|(v, w)| f64::from(w * v * v))
                .sum::<f64>();
        }
        let candidates: Vec<(GgmlType, f64)> = types
            .iter()
            .filter_map(|&ty| {
                let row = ty.traits().row_bytes(cols)?;
                Some((ty, (row * 8) as f64 / cols as f64))
            })
            .collect();
        let probed = match (&probe, linear_of(hf)) {
            (Some(_), Some(at)) => Some((at, probe_types(&candidates))),
            (Some(_), None) => {
                return Err(Error::Invalid(format!(
                    "{hf} is not a decoder linear the model runs: it cannot be probed (measure without \
                     probes)"
                )))
            }
            (None, _) => None,
        };
        let mut options = Vec::new();
        let mut points = Vec::new();
        for &(ty, _) in &candidates {
            let m = quantize_measured(
                t,
                ty,
                Some(&weights),
                g,
                &mut buf,
                crate::backend::Backend::Cpu,
            )?;
            let rel = m.weighted_rel_rms_error.unwrap_or(m.rel_rms_error);
            let e = rel * rel * wnorm2;
            options.push((ty, padded_bytes(m.bytes), e));
            if let (Some(p), Some(((li, kind), wanted))) = (probe.as_mut(), &probed) {
                if wanted.contains(&ty) {
                    let q = TensorRef {
                        storage: Storage::Blocks {
                            ty,
                            data: Bytes::owned(buf.clone()),
                        },
                        // `buf` holds the rows in Hugging Face order.
                        rope_interleaved_heads: None,
                        derived: Derived::default(),
                        ..t.clone()
                    };
                    points.push((e, p.kld(*li, *kind, q)?));
                }
            }
        }
        if options.is_empty() {
            return Err(Error::Invalid(format!(
                "{g}: rows of {cols} fit no block type of an auto mix"
            )));
        }
        if !points.is_empty() {
            for o in &mut options {
                o.2 = output_error(&points, o.2);
            }
        }
        slots.push(MixSlot {
            gguf_name: g.clone(),
            hf_name: hf.clone(),
            options,
        });
        if !progress(slots.len(), total) {
            return Err(Error::Cancelled);
        }
    }
    let probed = probe.as_ref().map_or(0, OutputProbe::tokens);
    Ok(layout.measurement(src, slots, probed))
}

/// The largest measurement file read (a 200-layer model's is well under 1 MiB).
const MAX_MEASUREMENT_BYTES: u64 = 64 << 20;
const MEASUREMENT_FORMAT: &str = "quant-studio gguf mix measurement";

/// A measurement as `--measurement FILE` holds it: each slot's candidates with their errors (their bytes
/// follow from the model's shapes and are recomputed on reading).
#[derive(serde::Serialize, serde::Deserialize)]
struct MeasurementFile {
    format: String,
    version: u32,
    probed_tokens: usize,
    slots: Vec<SlotFile>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SlotFile {
    tensor: String,
    /// `(ggml type name, error)`.
    options: Vec<(String, f64)>,
}

impl MixMeasurement {
    /// Save for [`read_measurement`] (a temporary name renamed when complete).
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let file = MeasurementFile {
            format: MEASUREMENT_FORMAT.into(),
            version: 1,
            probed_tokens: self.probed_tokens,
            slots: self
                .slots
                .iter()
                .map(|s| SlotFile {
                    tensor: s.gguf_name.clone(),
                    options: s
                        .options
                        .iter()
                        .map(|&(ty, _, e)| (ty.name().to_owned(), e))
                        .collect(),
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| Error::Invalid(format!("measurement: {e}")))?;
        crate::output::write_bytes(crate::output::OutputSpec::file(path).overwrite(true), &json)?;
        Ok(())
    }

    /// Only the candidates of `types` (a measurement made over more types, narrowed without measuring
    /// again); an error names a slot none of them fits.
    pub fn restricted_to(mut self, types: &[GgmlType]) -> Result<Self> {
        for s in &mut self.slots {
            s.options.retain(|o| types.contains(&o.0));
            if s.options.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: the measurement has none of the types asked for",
                    s.gguf_name
                )));
            }
        }
        Ok(self)
    }
}

/// A measurement saved by [`MixMeasurement::write`] for this model: every slot of its auto mix must be there
/// with types its rows take and finite errors; sizes are computed from `src` (and `imatrix`, whose datasets
/// the header records).
pub fn read_measurement(
    path: &std::path::Path,
    src: &SourceModel,
    imatrix: &ImatrixInput,
) -> Result<MixMeasurement> {
    let bytes = crate::bounded::read_capped(path, MAX_MEASUREMENT_BYTES, "a mix measurement")?;
    let bad = |d: String| Error::malformed(path, "mix measurement", d);
    let file: MeasurementFile =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a measurement: {e}")))?;
    if file.format != MEASUREMENT_FORMAT || file.version != 1 {
        return Err(bad(format!(
            "format {:?} version {}: expected {MEASUREMENT_FORMAT:?} version 1",
            file.format, file.version
        )));
    }
    let layout = mix_layout(src, imatrix)?;
    if file.slots.len() != layout.slots.len() {
        return Err(bad(format!(
            "{} tensors measured; this model's auto mix has {}: it was measured on another model",
            file.slots.len(),
            layout.slots.len()
        )));
    }
    let mut slots = Vec::with_capacity(layout.slots.len());
    for ((hf, g), f) in layout.slots.iter().zip(file.slots) {
        if *g != f.tensor {
            return Err(bad(format!(
                "{} where this model has {g}: it was measured on another model",
                f.tensor
            )));
        }
        let t = &src.tensors[hf];
        let mut options = Vec::with_capacity(f.options.len());
        for (name, err) in f.options {
            let ty = GgmlType::all()
                .find(|t| t.name().eq_ignore_ascii_case(&name))
                .ok_or_else(|| bad(format!("{g}: unknown type {name:?}")))?;
            let row = ty
                .traits()
                .row_bytes(t.cols())
                .ok_or_else(|| bad(format!("{g}: rows of {} do not take {name}", t.cols())))?;
            if !(err.is_finite() && err >= 0.0) {
                return Err(bad(format!("{g}: error {err} of {name}")));
            }
            options.push((ty, padded_bytes((row * t.rows()) as u64), err));
        }
        if options.is_empty() {
            return Err(bad(format!("{g}: no candidates")));
        }
        slots.push(MixSlot {
            gguf_name: g.clone(),
            hf_name: hf.clone(),
            options,
        });
    }
    Ok(layout.measurement(src, slots, file.probed_tokens))
}

/// Choose a type per slot so the file fits `budget` with the least total error.
pub fn plan_mix(m: &MixMeasurement, budget: MixBudget) -> Result<MixPlan> {
    let choices: Vec<Vec<Choice>> = m
        .slots
        .iter()
        .map(|s| {
            s.options
                .iter()
                .map(|&(_, bits, err)| Choice { bits, err })
                .collect()
        })
        .collect();
    let (lo, hi) = reachable(&choices);
    let (lo, hi) = (lo + m.fixed_bytes, hi + m.fixed_bytes);
    let bpw = |bytes: u64| bytes as f64 * 8.0 / m.params.max(1) as f64;
    let target = match budget {
        MixBudget::FileBytes(n) => n,
        // Tensor data bits per parameter: the header is not counted.
        MixBudget::Bpw(b) if b.is_finite() && b > 0.0 => {
            (b * m.params as f64 / 8.0) as u64 + m.header_bytes
        }
        MixBudget::Bpw(b) => {
            return Err(Error::Invalid(format!("--bpw {b}: give a positive number")))
        }
        // The weights in memory are the file's tensor data.
        MixBudget::Memory { bytes, ctx } => {
            let kv = ctx.saturating_mul(m.kv_bytes_per_token);
            if kv >= bytes {
                return Err(Error::Invalid(format!(
                    "a memory budget of {bytes} bytes cannot hold the KV cache of {ctx} tokens alone ({kv} \
                     bytes in f16)"
                )));
            }
            bytes - kv + m.header_bytes
        }
    };
    if target < lo {
        return Err(Error::Invalid(format!(
            "an auto mix of {} cannot be made: the smallest these types allow is {:.2} bpw ({} bytes), the \
             largest {:.2} bpw ({} bytes)",
            budget.label(),
            bpw(lo - m.header_bytes),
            lo,
            bpw(hi - m.header_bytes),
            hi
        )));
    }
    let sel = choose(&choices, target.saturating_sub(m.fixed_bytes))?;
    let overrides = m
        .slots
        .iter()
        .zip(&sel.picks)
        .map(|(s, &p)| TensorOverride {
            pattern: format!("^{}$", escape(&s.gguf_name)),
            ty: s.options[p].0,
        })
        .collect();
    Ok(MixPlan {
        overrides,
        file_bytes: sel.bits + m.fixed_bytes,
        err: sel.err,
        reachable_bytes: (lo, hi),
    })
}

/// The chosen types as `llama-quantize` arguments, so the same mix can be made with llama.cpp from the same
/// importance matrix: one `--tensor-type PATTERN=TYPE` per tensor kind and type, the layers as an
/// alternation (`'^blk\.(0|3|7)\.ffn_down\.weight$=q4_k'`; llama-quantize matches with `std::regex_search`).
pub fn tensor_type_args(overrides: &[TensorOverride]) -> Vec<String> {
    // (kind, type) → layers, in first-seen order.
    let mut groups: Vec<((String, GgmlType), Vec<String>)> = Vec::new();
    for o in overrides {
        let name = o
            .pattern
            .trim_start_matches('^')
            .trim_end_matches('$')
            .replace("\\.", ".");
        let Some((layer, kind)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
            groups.push(((o.pattern.clone(), o.ty), Vec::new()));
            continue;
        };
        let key = (kind.to_owned(), o.ty);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, layers)) => layers.push(layer.to_owned()),
            None => groups.push((key, vec![layer.to_owned()])),
        }
    }
    groups
        .into_iter()
        .map(|((kind, ty), layers)| {
            let ty = ty.name().to_lowercase();
            if layers.is_empty() {
                format!("--tensor-type '{kind}={ty}'")
            } else {
                format!(
                    "--tensor-type '^blk\\.({})\\.{}$={ty}'",
                    layers.join("|"),
                    escape(&kind)
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imatrix::{Imatrix, ImatrixEntry};
    use crate::model::fixture::{write_fixture, FixtureSpec};
    use crate::output::OutputSpec;
    use crate::quantize::{quantize_gguf, GgufQuantizeOptions};

    /// A deterministic importance matrix for every decoder linear of `src`: uneven column weights.
    fn imatrix(src: &SourceModel) -> ImatrixInput {
        let mut m = Imatrix::default();
        for (hf, g, ne) in gguf_entries(src).expect("entries") {
            if g.starts_with("blk.") && ne.len() == 2 && hf.ends_with("_proj.weight") {
                let cols = ne[0] as usize;
                let sums = (0..cols)
                    .map(|j| 1.0 + ((j * 37 + g.len() * 11) % 17) as f32)
                    .collect();
                m.entries.insert(
                    g,
                    ImatrixEntry {
                        sums,
                        counts: vec![1.0],
                    },
                );
            }
        }
        m.datasets.push("test".into());
        ImatrixInput {
            matrix: m,
            file: None,
        }
    }

    /// Writes `plan` as a GGUF file at `out`; asserts the file is the predicted size and holds the chosen
    /// types.
    fn write_plan(
        src: &SourceModel,
        plan: &MixPlan,
        im: &ImatrixInput,
        out: &std::path::Path,
    ) -> crate::quantize::QuantizeReport {
        let r = quantize_gguf(
            src,
            &GgufQuantizeOptions {
                mix: AUTOMIX_BASE,
                overrides: plan.overrides.clone(),
                imatrix: Some(im.clone()),
                backend: crate::backend::Backend::Cpu,
            },
            &OutputSpec::file(out),
            &mut |_, _, _| true,
        )
        .expect("write");
        assert_eq!(r.file_size_bytes, plan.file_bytes);
        let types: std::collections::HashMap<&str, &str> = r
            .tensors
            .iter()
            .map(|t| (t.gguf_name.as_str(), t.ty))
            .collect();
        for o in &plan.overrides {
            let name = o
                .pattern
                .trim_start_matches('^')
                .trim_end_matches('$')
                .replace("\\.", ".");
            assert_eq!(types[name.as_str()], o.ty.name(), "{name}");
        }
        r
    }

    #[test]
    fn auto_mixes_fit_their_budget_exactly_as_predicted_and_beat_uniform_types() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &dir).expect("fixture");
        let src = SourceModel::open(&dir).expect("open");
        let im = imatrix(&src);
        let m = measure_mix(&src, &im, &AUTOMIX_TYPES, &[], &mut |_, _| true).expect("measure");
        assert_eq!(m.slots.len(), 14);
        for s in &m.slots {
            assert!(s.options.len() >= 6, "{s:?}");
            let q8 = s
                .options
                .iter()
                .find(|o| o.0 == GgmlType::Q8_0)
                .expect("q8_0");
            let q4 = s
                .options
                .iter()
                .find(|o| o.0 == GgmlType::Q4_0)
                .expect("q4_0");
            assert!(q8.2 < q4.2 && q8.1 > q4.1, "{s:?}");
        }
        // Uniform choices at their own sizes: the auto mix of the same size has no more error.
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q4_1] {
            let (bytes, err) = m.slots.iter().fold((m.fixed_bytes, 0.0), |(b, e), s| {
                let o = s.options.iter().find(|o| o.0 == ty).expect("type");
                (b + o.1, e + o.2)
            });
            let plan = plan_mix(&m, MixBudget::FileBytes(bytes)).expect("plan");
            assert!(plan.file_bytes <= bytes);
            assert!(
                plan.err <= err * (1.0 + 1e-9),
                "{ty:?}: auto {} vs uniform {err}",
                plan.err
            );
        }
        // The file written from a plan is exactly the predicted size, its types those chosen.
        let budget = MixBudget::Bpw(6.0);
        let plan = plan_mix(&m, budget).expect("plan");
        // The reach computed without measuring is the measured one's tensor data (header and alignment
        // padding aside).
        let (lo, hi) = reachable_bytes(&src, &AUTOMIX_TYPES).expect("reach");
        let slack = m.header_bytes + 32 * (src.tensors.len() as u64 + 1);
        for (ours, file) in [(lo, plan.reachable_bytes.0), (hi, plan.reachable_bytes.1)] {
            assert!(ours <= file && file - ours <= slack, "{ours} vs {file}");
        }
        let r = write_plan(&src, &plan, &im, &tmp.path().join("auto.gguf"));
        assert!(r.bits_per_weight <= 6.0, "{}", r.bits_per_weight);
        // The llama-quantize arguments name every tensor once, with its type.
        let args = tensor_type_args(&plan.overrides);
        let mut named = std::collections::HashMap::new();
        for a in &args {
            let (pat, ty) = a
                .trim_start_matches("--tensor-type '^blk\\.(")
                .trim_end_matches('\'')
                .split_once("$=")
                .expect("PATTERN=TYPE");
            let (layers, kind) = pat.split_once(")\\.").expect("layers");
            for l in layers.split('|') {
                let name = format!("blk.{l}.{}", kind.replace("\\.", "."));
                assert!(named.insert(name, ty.to_owned()).is_none(), "{a}");
            }
        }
        assert_eq!(named.len(), 14);
        for o in &plan.overrides {
            let name = o
                .pattern
                .trim_start_matches('^')
                .trim_end_matches('$')
                .replace("\\.", ".");
            assert_eq!(named[&name], o.ty.name().to_lowercase(), "{name}");
        }
        // A memory budget leaves room for the KV cache: weights + cache fit.
        let kv = 64 * m.kv_bytes_per_token;
        let mem = plan_mix(
            &m,
            MixBudget::Memory {
                bytes: plan.file_bytes + kv,
                ctx: 64,
            },
        )
        .expect("memory plan");
        assert!(mem.file_bytes - m.header_bytes + kv <= plan.file_bytes + kv);
        assert!(plan_mix(&m, MixBudget::Memory { bytes: kv, ctx: 64 }).is_err());
        // Budgets outside the reachable range say what is reachable.
        let e = plan_mix(&m, MixBudget::Bpw(1.0))
            .expect_err("too small")
            .to_string();
        assert!(e.contains("smallest these types allow"), "{e}");
    }

    /// A tiny Llama with 256-wide rows (every block type fits) in `tmp/src`.
    fn wide_fixture(tmp: &std::path::Path) -> std::path::PathBuf {
        let dir = tmp.join("src");
        let spec = FixtureSpec {
            hidden: 256,
            intermediate: 512,
            ..FixtureSpec::tiny_llama()
        };
        write_fixture(&spec, &dir).expect("fixture");
        dir
    }

    /// On rows that take 256-element blocks the low-bit i-quants are candidates: a budget below the
    /// k-quants' reach is met with them, the mix beats each uniform i-quant at its own size, and the file
    /// written holds the chosen types at the predicted size.
    #[test]
    fn low_budgets_are_met_with_the_low_bit_i_quants() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = wide_fixture(tmp.path());
        let src = SourceModel::open(&dir).expect("open");
        let im = imatrix(&src);
        let m = measure_mix(&src, &im, &AUTOMIX_TYPES, &[], &mut |_, _| true).expect("measure");
        assert_eq!(m.slots.len(), 14);
        for s in &m.slots {
            assert_eq!(s.options.len(), AUTOMIX_TYPES.len(), "{}", s.gguf_name);
            // the i-quants' errors fall with their bytes: IQ1_S > IQ2_XXS > IQ3_XXS > IQ3_S
            let err = |ty| s.options.iter().find(|o| o.0 == ty).expect("type").2;
            let e = [
                err(GgmlType::Iq1S),
                err(GgmlType::Iq2Xxs),
                err(GgmlType::Iq3Xxs),
                err(GgmlType::Iq3S),
            ];
            assert!(e.windows(2).all(|w| w[0] > w[1]), "{}: {e:?}", s.gguf_name);
        }
        let uniform = |ty: GgmlType| {
            m.slots.iter().fold((m.fixed_bytes, 0.0), |(b, e), s| {
                let o = s.options.iter().find(|o| o.0 == ty).expect("type");
                (b + o.1, e + o.2)
            })
        };
        for ty in [
            GgmlType::Iq1M,
            GgmlType::Iq2Xxs,
            GgmlType::Iq2S,
            GgmlType::Iq3Xxs,
        ] {
            let (bytes, err) = uniform(ty);
            let plan = plan_mix(&m, MixBudget::FileBytes(bytes)).expect("plan");
            assert!(plan.file_bytes <= bytes);
            assert!(
                plan.err <= err * (1.0 + 1e-9),
                "{ty:?}: {} vs {err}",
                plan.err
            );
        }
        // Below every slot at Q2_K: only the i-quants reach it.
        let (q2k_bytes, _) = uniform(GgmlType::Q2K);
        let plan = plan_mix(&m, MixBudget::FileBytes(q2k_bytes - 1)).expect("plan");
        assert!(plan.overrides.iter().any(|o| matches!(
            o.ty,
            GgmlType::Iq1S
                | GgmlType::Iq1M
                | GgmlType::Iq2Xxs
                | GgmlType::Iq2Xs
                | GgmlType::Iq2S
                | GgmlType::Iq3Xxs
                | GgmlType::Iq3S
        )));
        write_plan(&src, &plan, &im, &tmp.path().join("low.gguf"));
    }

    /// The probes run the model exactly: a tensor's probed error is the KL-divergence of the model with that
    /// one tensor quantized (written as a file, loaded, run whole), from a GGUF source whose q/k rows are in
    /// llama.cpp's interleaved order; the measurement saves, reads back and refuses damaged files.
    #[test]
    fn probes_measure_each_tensors_output_divergence() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = wide_fixture(tmp.path());
        let gguf = tmp.path().join("f16.gguf");
        let write = |src: &SourceModel, mix: &str, im, out| {
            quantize_gguf(
                src,
                &GgufQuantizeOptions {
                    mix: GgufMix::parse(mix).expect("mix"),
                    overrides: Vec::new(),
                    imatrix: im,
                    backend: crate::backend::Backend::Cpu,
                },
                &OutputSpec::file(out),
                &mut |_, _, _| true,
            )
            .expect("write");
        };
        write(&SourceModel::open(&dir).expect("open"), "f16", None, &gguf);
        let src = SourceModel::open(&gguf).expect("open gguf");
        assert!(src.tensors["model.layers.0.self_attn.q_proj.weight"]
            .rope_interleaved_heads
            .is_some());
        let im = imatrix(&src);
        let vocab = src.config.vocab_size as u32;
        let rows: Vec<Vec<u32>> = (0..2u32)
            .map(|r| (0..24u32).map(|i| (i * 37 + r * 101 + 5) % vocab).collect())
            .collect();
        let m = measure_mix(&src, &im, &AUTOMIX_TYPES, &rows, &mut |_, _| true).expect("measure");
        assert_eq!(m.probed_tokens, 48);
        // Saved and read back (the sizes recomputed from the model): the same measurement.
        let saved = tmp.path().join("m.json");
        m.write(&saved).expect("save");
        let back = read_measurement(&saved, &src, &im).expect("read");
        assert_eq!(back.probed_tokens, m.probed_tokens);
        assert_eq!(
            (back.fixed_bytes, back.header_bytes, back.params),
            (m.fixed_bytes, m.header_bytes, m.params)
        );
        for (a, b) in back.slots.iter().zip(&m.slots) {
            assert_eq!((&a.gguf_name, &a.hf_name), (&b.gguf_name, &b.hf_name));
            for (x, y) in a.options.iter().zip(&b.options) {
                assert_eq!((x.0, x.1), (y.0, y.1));
                assert!((x.2 - y.2).abs() <= 1e-12 * y.2, "{x:?} {y:?}");
            }
        }
        let two = back
            .clone()
            .restricted_to(&[GgmlType::Q8_0, GgmlType::Iq1S])
            .expect("narrowed");
        assert!(two.slots.iter().all(|s| s.options.len() == 2));
        assert!(back.clone().restricted_to(&[]).is_err());
        // Another model's, a damaged or a hostile file: errors that say so.
        let text = std::fs::read_to_string(&saved).expect("text");
        for (bad, says) in [
            (
                text.replace("blk.1.ffn_down", "blk.9.ffn_down"),
                "another model",
            ),
            (text[..text.len() / 2].to_owned(), "not a measurement"),
            (text.replace("\"IQ1_S\"", "\"Q9_K\""), "unknown type"),
            (
                text.replace("\"version\": 1", "\"version\": 7"),
                "version 7",
            ),
        ] {
            std::fs::write(&saved, bad).expect("write");
            let e = read_measurement(&saved, &src, &im)
                .expect_err(says)
                .to_string();
            assert!(e.contains(says), "{e}");
        }
        let err = |s: &MixSlot, ty| s.options.iter().find(|o| o.0 == ty).expect("type").2;
        for s in &m.slots {
            // Q8_0 barely moves the output; IQ1_S moves it a lot (not so if q/k rows were scrambled).
            let (lo, hi) = (err(s, GgmlType::Q8_0), err(s, GgmlType::Iq1S));
            assert!(lo > 0.0 && lo < 0.02 * hi, "{}: {lo} vs {hi}", s.gguf_name);
        }
        // blk.0.attn_q at IQ1_S (a probe type) against the whole model with only that tensor at IQ1_S.
        let slot = m
            .slots
            .iter()
            .find(|s| s.gguf_name == "blk.0.attn_q.weight")
            .expect("slot");
        // The variant: the float model with blk.0's q taken from an all-IQ1_S file as llama.cpp reads it.
        let all = tmp.path().join("iq1_s.gguf");
        write(&src, "pure:iq1_s", Some(im.clone()), &all);
        let q_name = "model.layers.0.self_attn.q_proj.weight";
        let mut tensors = src.tensors.clone();
        let q = SourceModel::open(&all).expect("open iq1_s").tensors[q_name].clone();
        assert_eq!(q.block_type(), Some(GgmlType::Iq1S));
        tensors.insert(q_name.into(), q);
        let base = Model::load(&src).expect("base");
        let variant = Model::from_parts(&all, &src.config, &tensors).expect("variant");
        let mut want = 0.0;
        for r in &rows {
            let mut c = base.new_cache(r.len());
            let mut lp = base
                .forward(r, &mut c, crate::infer::Logits::All)
                .expect("base");
            let v = src.config.vocab_size;
            lp.chunks_mut(v).for_each(log_softmax);
            let mut c = variant.new_cache(r.len());
            let q = variant
                .forward(r, &mut c, crate::infer::Logits::All)
                .expect("variant");
            want += lp
                .chunks(v)
                .zip(q.chunks(v))
                .map(|(p, q)| kld_row(p, q))
                .sum::<f64>();
        }
        want /= 48.0;
        let got = err(slot, GgmlType::Iq1S);
        assert!(
            (got - want).abs() <= 1e-3 * want,
            "probed {got}, whole model {want}"
        );
    }

    #[test]
    fn output_error_interpolates_between_probes_in_log_log() {
        let p = [(1.0, 0.01), (100.0, 10.0)];
        // at the probes: their divergence
        assert!((output_error(&p, 1.0) - 0.01).abs() < 1e-12);
        assert!((output_error(&p, 100.0) - 10.0).abs() < 1e-9);
        // between: slope 1.5 in log-log (10 → 0.01 · 10^1.5)
        assert!((output_error(&p, 10.0) - 0.01 * 10f64.powf(1.5)).abs() < 1e-9);
        // below the smallest: proportional
        assert!((output_error(&p, 0.1) - 0.001).abs() < 1e-12);
        // above the largest: the last slope, capped at 3
        assert!((output_error(&p, 1000.0) - 10.0 * 10f64.powf(1.5)).abs() < 1e-6);
        let steep = [(1.0, 1e-6), (2.0, 1.0)];
        assert!((output_error(&steep, 4.0) - 8.0).abs() < 1e-9);
        // one probe: proportional on both sides
        assert!((output_error(&[(2.0, 0.5)], 8.0) - 2.0).abs() < 1e-12);
        // no probe: the weighted error itself
        assert_eq!(output_error(&[], 3.0), 3.0);
    }

    #[test]
    fn probe_types_span_the_candidates() {
        let bpw = |ty: GgmlType| {
            (
                ty,
                (ty.traits().row_bytes(4096).expect("row") * 8) as f64 / 4096.0,
            )
        };
        let all: Vec<_> = AUTOMIX_TYPES.iter().map(|&t| bpw(t)).collect();
        assert_eq!(
            probe_types(&all),
            [GgmlType::Iq1S, GgmlType::Iq2S, GgmlType::Q4K]
        );
        // 576-wide rows: only the 32-blocks, all above 3.5 bpw
        let legacy: Vec<_> = [
            GgmlType::Q4_0,
            GgmlType::Iq4Nl,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ]
        .into_iter()
        .map(bpw)
        .collect();
        assert_eq!(probe_types(&legacy), [GgmlType::Q4_0]);
    }
}
