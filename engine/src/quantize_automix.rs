//! Error-aware GGUF mixes: measure every decoder linear under every ggml type its rows can take, then choose
//! one type per tensor so the file meets a budget (bits per weight or bytes) with the least total error
//! ([`crate::solvers::mix`]), instead of llama-quantize's fixed rules. The result is an ordinary GGUF file
//! (per-tensor types are free in GGUF: llama.cpp loads it unchanged), written by the same pipeline as every
//! mix with the chosen types as anchored per-tensor overrides — which also reproduce the mix in llama.cpp as
//! `llama-quantize --tensor-type` arguments.
//!
//! The error of a tensor `W` quantized to `Ŵ` is what it adds to its layer's output on calibration data,
//! `E‖(W − Ŵ)x‖² ≈ Σ_j E[x_j²] Σ_i (W − Ŵ)²_ij` with `E[x_j²]` the importance matrix (the diagonal of the input
//! covariance, as llama-imatrix collects it); each type is quantized exactly as the file will hold it (the
//! imatrix-weighted quantizers). Tensors outside the decoder layers (embeddings, output head, norms) keep
//! the base mix's types.

use crate::codecs::GgmlType;
use crate::model::SourceModel;
use crate::quantize::{gguf_entries, imatrix_kvs, quantize_measured, ImatrixInput};
use crate::recipes::{plan_gguf_mix, GgufMix, TensorOverride};
use crate::solvers::mix::{choose, reachable, Choice};
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

/// Measure every decoder linear of `src` under each of `types` its rows can take (quantized with `imatrix`, as the file
/// will be). `progress(done, total)` after each tensor; `false` cancels.
pub fn measure_mix(
    src: &SourceModel,
    imatrix: &ImatrixInput,
    types: &[GgmlType],
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<MixMeasurement> {
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
    let total = entries
        .iter()
        .zip(&base)
        .filter(|((_, g, ne), (_, ty))| is_slot(g, ne, *ty))
        .count();
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
    let header_bytes = whole.saturating_sub(data);
    let mut slots = Vec::with_capacity(total);
    let mut fixed = whole;
    let mut buf = Vec::new();
    for ((hf, g, ne), (_, base_ty)) in entries.iter().zip(&base) {
        if !is_slot(g, ne, *base_ty) {
            continue;
        }
        let t = &src.tensors[hf];
        let (rows, cols) = (t.rows(), t.cols());
        fixed -= padded_bytes((base_ty.traits().row_bytes(cols).unwrap_or(cols * 4) * rows) as u64);
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
        let mut options = Vec::new();
        for &ty in types {
            if !cols.is_multiple_of(ty.traits().block_elems) {
                continue;
            }
            let m = quantize_measured(
                t,
                ty,
                Some(&weights),
                g,
                &mut buf,
                crate::backend::Backend::Cpu,
            )?;
            let rel = m.weighted_rel_rms_error.unwrap_or(m.rel_rms_error);
            options.push((ty, padded_bytes(m.bytes), rel * rel * wnorm2));
        }
        if options.is_empty() {
            return Err(Error::Invalid(format!(
                "{g}: rows of {cols} fit no block type of an auto mix"
            )));
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
    Ok(MixMeasurement {
        slots,
        fixed_bytes: fixed,
        header_bytes,
        params: src.tensors.values().map(|t| t.numel() as u64).sum(),
        kv_bytes_per_token: (2
            * src.config.num_layers
            * src.config.num_kv_heads
            * src.config.head_dim
            * 2) as u64,
    })
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
        let m = measure_mix(&src, &im, &AUTOMIX_TYPES, &mut |_, _| true).expect("measure");
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

    /// On rows that take 256-element blocks the low-bit i-quants are candidates: a budget below the
    /// k-quants' reach is met with them, the mix beats each uniform i-quant at its own size, and the file
    /// written holds the chosen types at the predicted size.
    #[test]
    fn low_budgets_are_met_with_the_low_bit_i_quants() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("src");
        let spec = FixtureSpec {
            hidden: 256,
            intermediate: 512,
            ..FixtureSpec::tiny_llama()
        };
        write_fixture(&spec, &dir).expect("fixture");
        let src = SourceModel::open(&dir).expect("open");
        let im = imatrix(&src);
        let m = measure_mix(&src, &im, &AUTOMIX_TYPES, &mut |_, _| true).expect("measure");
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
}
