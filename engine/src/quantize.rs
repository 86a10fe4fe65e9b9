//! Quantization jobs, end to end: source model → recipe plans each tensor → codec per tensor → writer,
//! with per-tensor metrics as each tensor is done. Memory stays bounded by one tensor.

use serde::Serialize;

use crate::codecs::GgmlType;
use crate::imatrix::Imatrix;
use crate::model::gguf::GgufValue;
use crate::model::SourceModel;
use crate::output::OutputSpec;
use crate::recipes::gguf::{plan_gguf_mix, tensor_requires_imatrix, GgufMix, TensorOverride};
use crate::tensor::TensorRef;
use crate::writers::gguf::{
    gguf_tensor_name, quantized_row_bytes, write_gguf_with, GgufPlanTensor,
};
use crate::{Error, Result};

/// What to make of a model as GGUF.
#[derive(Clone, Debug)]
pub struct GgufQuantizeOptions {
    pub mix: GgufMix,
    /// Per-tensor type overrides (patterns on GGUF names).
    pub overrides: Vec<TensorOverride>,
    /// Importance matrix for the weighted quantizers.
    pub imatrix: Option<ImatrixInput>,
    /// Where the round-to-nearest quantizers run.
    pub backend: crate::backend::Backend,
}

/// An importance matrix and where it came from (recorded in the file's `quantize.imatrix.*` keys as
/// llama-quantize does).
#[derive(Clone, Debug)]
pub struct ImatrixInput {
    pub matrix: Imatrix,
    /// The imatrix file as the user named it (`None` when computed for this job).
    pub file: Option<String>,
}

/// Quality of one quantized tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorMetrics {
    /// Decoder layer index (`None` for embeddings, the output head, final norm).
    pub layer: Option<usize>,
    /// Hugging Face tensor name.
    pub tensor: String,
    /// GGUF tensor name.
    pub gguf_name: String,
    pub ty: &'static str,
    pub bits_per_weight: f64,
    /// ‖W − Ŵ‖ / ‖W‖ over the whole tensor.
    pub rel_rms_error: f64,
    /// With an importance matrix: √(Σ wⱼ(W − Ŵ)² / Σ wⱼW²), wⱼ the column's importance.
    pub weighted_rel_rms_error: Option<f64>,
    /// max |W − Ŵ|.
    pub max_error: f64,
    pub bytes: u64,
}

/// What a finished quantization wrote.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    pub mix: &'static str,
    pub tensors: Vec<TensorMetrics>,
    pub file_size_bytes: u64,
    /// Bits per weight over every tensor's elements.
    pub bits_per_weight: f64,
    /// Whether an importance matrix was used.
    pub imatrix: bool,
    /// For an auto mix: the chosen types as `llama-quantize --tensor-type` arguments.
    pub tensor_type_args: Vec<String>,
    /// For an auto mix measured with output probes: the optimiser's estimate of the file's KL-divergence
    /// from the source (the chosen types' probed divergences, summed).
    pub predicted_kld: Option<f64>,
}

/// Decoder layer index of a Hugging Face tensor name.
pub fn layer_of(hf_name: &str) -> Option<usize> {
    hf_name
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// llama-quantize's `quantize.imatrix.*` keys (strings cut to 127 bytes as its `strncpy` does).
pub(crate) fn imatrix_kvs(im: &ImatrixInput) -> Vec<(String, GgufValue)> {
    fn cut(s: &str) -> String {
        let mut n = s.len().min(127);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s[..n].to_owned()
    }
    let mut kvs = Vec::new();
    if let Some(f) = &im.file {
        kvs.push(("quantize.imatrix.file".to_owned(), GgufValue::Str(cut(f))));
    }
    if let Some(d) = im.matrix.datasets.first() {
        kvs.push((
            "quantize.imatrix.dataset".to_owned(),
            GgufValue::Str(cut(d)),
        ));
    }
    kvs.push((
        "quantize.imatrix.entries_count".to_owned(),
        GgufValue::U32(im.matrix.entries.len() as u32),
    ));
    if im.matrix.chunk_count > 0 {
        kvs.push((
            "quantize.imatrix.chunks_count".to_owned(),
            GgufValue::U32(im.matrix.chunk_count),
        ));
    }
    kvs
}

/// Bytes of tensor data a GGUF file of `src` with `mix` (no overrides, no importance matrix) will hold,
/// from llama-quantize's per-tensor plan — exact for the tensors, without the metadata. For estimates
/// before quantizing; cheap (no tensor is read).
pub fn gguf_tensor_bytes(src: &SourceModel, mix: &GgufMix) -> Result<u64> {
    let entries = gguf_entries(src)?;
    let list: Vec<(String, Vec<u64>)> = entries
        .iter()
        .map(|(_, g, ne)| (g.clone(), ne.clone()))
        .collect();
    // A mix that needs an importance matrix is only ever made with one.
    let plan = plan_gguf_mix(mix, &src.config, &list, &[], mix.needs_imatrix())?;
    let mut total = 0u64;
    for ((hf, _, _), (_, ty)) in entries.iter().zip(&plan) {
        let t = &src.tensors[hf];
        let row = if *ty == GgmlType::F32 {
            t.cols() * 4
        } else {
            quantized_row_bytes(t, *ty)?
        };
        total += row as u64 * t.rows() as u64;
    }
    Ok(total)
}

/// The tensors that go into a GGUF file of `src`, in llama-quantize's visiting order: `(Hugging Face name,
/// GGUF name, ne (row length first))`.
pub(crate) fn gguf_entries(src: &SourceModel) -> Result<Vec<(String, String, Vec<u64>)>> {
    let mut entries: Vec<(String, String, Vec<u64>)> = Vec::new();
    for (hf, t) in &src.tensors {
        let g = gguf_tensor_name(hf).ok_or_else(|| {
            Error::unsupported(&src.path, format!("tensor {hf} has no GGUF name"))
        })?;
        entries.push((
            hf.clone(),
            g,
            t.shape.iter().rev().map(|&d| d as u64).collect(),
        ));
    }
    entries.sort_by_key(|(hf, g, _)| (gguf_order(g), layer_of(hf), g.clone()));
    Ok(entries)
}

/// Quantize `src` to a GGUF file at `out.path` (through [`crate::output`]: checked first, written under a
/// temporary name, renamed when complete). `on_tensor` is called after each tensor; returning `false`
/// cancels (nothing is left behind).
pub fn quantize_gguf(
    src: &SourceModel,
    opts: &GgufQuantizeOptions,
    out: &OutputSpec,
    on_tensor: &mut dyn FnMut(&TensorMetrics, usize, usize) -> bool,
) -> Result<QuantizeReport> {
    let entries = gguf_entries(src)?;
    let list: Vec<(String, Vec<u64>)> = entries
        .iter()
        .map(|(_, g, ne)| (g.clone(), ne.clone()))
        .collect();
    let imatrix = opts.imatrix.as_ref();
    if let Some(im) = imatrix {
        for (k, e) in &im.matrix.entries {
            if e.sums.iter().any(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "the importance matrix has a non-finite value in {k}"
                )));
            }
        }
    }
    let chosen = plan_gguf_mix(
        &opts.mix,
        &src.config,
        &list,
        &opts.overrides,
        imatrix.is_some(),
    )?;
    // llama-quantize's imatrix requirement (the lattice searches of IQ1/IQ2/IQ3_XXS weigh every element
    // by it): refused before any work, with the way to get one.
    for (name, ty) in &chosen {
        if !tensor_requires_imatrix(name, *ty) {
            continue;
        }
        match imatrix {
            None => {
                return Err(Error::Invalid(format!(
                    "{} needs an importance matrix ({name} is {}): pass --imatrix FILE (from \
                     `quant-studio imatrix` or llama-imatrix) or --calib TEXT (or --calib default) to \
                     compute one first",
                    opts.mix.name(),
                    ty.name()
                )))
            }
            Some(im) if !im.matrix.entries.contains_key(name.as_str()) => {
                return Err(Error::Invalid(format!(
                    "the importance matrix has no data for {name}, which {} quantizes to {}: it was \
                     computed for another model or on too little text",
                    opts.mix.name(),
                    ty.name()
                )))
            }
            Some(_) => {}
        }
    }
    let plan: Vec<GgufPlanTensor> = entries
        .iter()
        .zip(&chosen)
        .map(|((hf, _, _), (_, ty))| GgufPlanTensor {
            hf_name: hf.clone(),
            ty: *ty,
        })
        .collect();
    let by_hf: std::collections::HashMap<&str, &str> = entries
        .iter()
        .map(|(hf, g, _)| (hf.as_str(), g.as_str()))
        .collect();
    let total = plan.len();
    let mut metrics: Vec<TensorMetrics> = Vec::with_capacity(total);
    let cancelled = std::cell::Cell::new(false);
    let mut quantize_tensor = |t: &TensorRef, ty: GgmlType, buf: &mut Vec<u8>| -> Result<()> {
        let gguf_name = by_hf.get(t.name.as_str()).copied().unwrap_or("");
        let weights = match imatrix.and_then(|im| im.matrix.weights(gguf_name)) {
            Some(w) if w.len() == t.cols() => Some(w),
            Some(w) if !gguf_name.starts_with("token_embd") => {
                return Err(Error::Invalid(format!(
                    "the importance matrix has {} values for {gguf_name}, whose rows have {}:                      it was computed for another model",
                    w.len(),
                    t.cols()
                )))
            }
            _ => None,
        };
        let m = quantize_measured(t, ty, weights.as_deref(), gguf_name, buf, opts.backend)?;
        if !on_tensor(&m, metrics.len() + 1, total) {
            cancelled.set(true);
        }
        metrics.push(m);
        Ok(())
    };
    let mut progress = |_done: usize, _total: usize| !cancelled.get();
    let extra = imatrix.map(imatrix_kvs).unwrap_or_default();
    let estimated: u64 = entries
        .iter()
        .zip(&chosen)
        .map(|((_, _, ne), (_, ty))| {
            let row = ne.first().copied().unwrap_or(1) as usize;
            let rows: u64 = ne.iter().skip(1).product();
            ty.traits().row_bytes(row).unwrap_or(row * 4) as u64 * rows
        })
        .sum();
    let mut spec = out.clone().input(&src.path).estimated_bytes(estimated);
    spec.kind = crate::output::OutputKind::File;
    let out = &crate::output::write_staged(spec, |tmp| {
        write_gguf_with(
            src,
            &plan,
            opts.mix.file_type(),
            &extra,
            tmp,
            &mut quantize_tensor,
            &mut progress,
        )
    })?;
    let file_size_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let elems: u64 = src.tensors.values().map(|t| t.numel() as u64).sum();
    let bits: f64 = metrics.iter().map(|m| m.bytes as f64 * 8.0).sum();
    Ok(QuantizeReport {
        mix: opts.mix.name(),
        tensors: metrics,
        file_size_bytes,
        bits_per_weight: bits / elems.max(1) as f64,
        imatrix: imatrix.is_some(),
        tensor_type_args: Vec::new(),
        predicted_kld: None,
    })
}

/// token_embd first, then the layers, then the final norm and the output head (the writer's order).
pub(crate) fn gguf_order(g: &str) -> u8 {
    if g.starts_with("token_embd") {
        0
    } else if g.starts_with("blk.") {
        1
    } else {
        2
    }
}

/// Error sums of a run of rows.
#[derive(Clone, Copy, Default)]
struct ErrSums {
    err2: f64,
    norm2: f64,
    werr2: f64,
    wnorm2: f64,
    max: f64,
}

/// Add one row's error to `s`: sums in eight f32 lanes (vectorised), then into the f64 totals.
fn row_error(w: &[f32], q: &[f32], weights: Option<&[f32]>, s: &mut ErrSums) {
    const L: usize = 8;
    let (mut e, mut n, mut m) = ([0.0f32; L], [0.0f32; L], [0.0f32; L]);
    let (mut we, mut wn) = ([0.0f32; L], [0.0f32; L]);
    let mut lane = |i: usize, a: f32, b: f32, wt: f32| {
        let d = a - b;
        e[i] += d * d;
        n[i] += a * a;
        m[i] = m[i].max(d.abs());
        we[i] += wt * d * d;
        wn[i] += wt * a * a;
    };
    let ones = [1.0f32; L];
    let mut wc = weights.map(|w| w.chunks_exact(L));
    for (a, b) in w.chunks_exact(L).zip(q.chunks_exact(L)) {
        let wt = wc.as_mut().and_then(Iterator::next).unwrap_or(&ones);
        for i in 0..L {
            lane(i, a[i], b[i], wt[i]);
        }
    }
    let tail = w.len() - w.len() % L;
    for j in tail..w.len() {
        lane(j - tail, w[j], q[j], weights.map_or(1.0, |wt| wt[j]));
    }
    let sum = |v: [f32; L]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    s.err2 += sum(e);
    s.norm2 += sum(n);
    s.werr2 += sum(we);
    s.wnorm2 += sum(wn);
    s.max = s
        .max
        .max(f64::from(m.iter().fold(0.0f32, |a, &b| a.max(b))));
}

/// Elements per parallel task: enough to amortise scheduling, small enough to balance two threads on a
/// 576-wide model's smallest tensors.
const TASK_ELEMS: usize = 1 << 16;

/// Quantize `t` to `ty` into `out` (rows in `t`'s order), rows in parallel, each row with `weights` as
/// its importance when given, and measure the error of each row while it is at hand.
pub(crate) fn quantize_measured(
    t: &TensorRef,
    ty: GgmlType,
    weights: Option<&[f32]>,
    gguf_name: &str,
    out: &mut Vec<u8>,
    backend: crate::backend::Backend,
) -> Result<TensorMetrics> {
    use rayon::prelude::*;
    let row_bytes = quantized_row_bytes(t, ty)?;
    let (rows, cols) = (t.rows(), t.cols());
    out.clear();
    out.resize(rows * row_bytes, 0);
    let rows_per_task = (TASK_ELEMS / cols.max(1)).max(1);
    // The legacy types' round-to-nearest quantizers run on the GPU backend's device (same bytes).
    let on_device = backend == crate::backend::Backend::Gpu
        && weights.is_none()
        && crate::backend::wgpu::kernels::gpu_quantizes(ty)
        && crate::backend::gpu_usable()
        && {
            let mut x = vec![0.0f32; rows * cols];
            x.par_chunks_mut(cols.max(1))
                .enumerate()
                .for_each(|(r, row)| t.dequant_row(r, row));
            match crate::backend::on_gpu(|g| g.quantize_blocks(ty, &x)) {
                Some(bytes) if bytes.len() == out.len() => {
                    out.copy_from_slice(&bytes);
                    true
                }
                _ => false,
            }
        };
    let parts: Vec<ErrSums> = out
        .par_chunks_mut((rows_per_task * row_bytes).max(1))
        .enumerate()
        .map(|(task, dst)| {
            let mut w = vec![0.0f32; cols];
            let mut q = vec![0.0f32; cols];
            let mut s = ErrSums::default();
            for (i, row) in dst.chunks_exact_mut(row_bytes.max(1)).enumerate() {
                t.dequant_row(task * rows_per_task + i, &mut w);
                if !on_device {
                    ty.quantize(&w, row, weights);
                }
                ty.dequantize(row, &mut q);
                row_error(&w, &q, weights, &mut s);
            }
            s
        })
        .collect();
    let mut s = ErrSums::default();
    for p in parts {
        s.err2 += p.err2;
        s.norm2 += p.norm2;
        s.werr2 += p.werr2;
        s.wnorm2 += p.wnorm2;
        s.max = s.max.max(p.max);
    }
    let ratio = |e: f64, n: f64| if n > 0.0 { (e / n).sqrt() } else { 0.0 };
    Ok(TensorMetrics {
        layer: layer_of(&t.name),
        tensor: t.name.clone(),
        gguf_name: gguf_name.to_owned(),
        ty: ty.name(),
        bits_per_weight: out.len() as f64 * 8.0 / t.numel().max(1) as f64,
        rel_rms_error: ratio(s.err2, s.norm2),
        weighted_rel_rms_error: weights.map(|_| ratio(s.werr2, s.wnorm2)),
        max_error: s.max,
        bytes: out.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::{Logits, Model};
    use crate::model::fixture::{write_fixture, FixtureSpec};

    #[test]
    fn q8_0_gguf_of_a_fixture_runs_like_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_dir = dir.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let out = dir.path().join("q8.gguf");
        let opts = GgufQuantizeOptions {
            mix: GgufMix::parse("q8_0").expect("mix"),
            overrides: Vec::new(),
            imatrix: None,
            backend: crate::backend::Backend::Cpu,
        };
        let mut seen = 0;
        let report = quantize_gguf(&src, &opts, &OutputSpec::file(&out), &mut |_, done, _| {
            seen = done;
            true
        })
        .expect("quantize");
        assert_eq!(seen, report.tensors.len());
        assert_eq!(report.tensors.len(), src.tensors.len());
        for m in &report.tensors {
            let bound = if m.ty == "F32" { 0.0 } else { 0.01 };
            assert!(
                m.rel_rms_error <= bound,
                "{}: {}",
                m.tensor,
                m.rel_rms_error
            );
        }
        // The file reopens, and the model's next-token choice is the source's.
        let q = SourceModel::open(&out).expect("reopen");
        // The size plan is the file's tensor data, for this mix and for a k-mix with fallbacks.
        let stored = |m: &SourceModel| -> u64 {
            m.tensors
                .values()
                .map(|t| (t.row_bytes() * t.rows()) as u64)
                .sum()
        };
        assert_eq!(
            gguf_tensor_bytes(&src, &opts.mix).expect("plan"),
            stored(&q)
        );
        let km = GgufQuantizeOptions {
            mix: GgufMix::parse("q4_k_m").expect("mix"),
            ..opts.clone()
        };
        let out_km = dir.path().join("q4km.gguf");
        quantize_gguf(&src, &km, &OutputSpec::file(&out_km), &mut |_, _, _| true)
            .expect("quantize q4_k_m");
        let q_km = SourceModel::open(&out_km).expect("reopen q4_k_m");
        assert_eq!(
            gguf_tensor_bytes(&src, &km.mix).expect("plan"),
            stored(&q_km)
        );
        assert_ne!(stored(&q_km), stored(&q));
        let (a, b) = (
            Model::load(&src).expect("load"),
            Model::load(&q).expect("load q"),
        );
        let toks = src
            .tokenizer
            .encode("the cat sat on the mat", false)
            .expect("encode");
        let la = a
            .forward(&toks, &mut a.new_cache(64), Logits::Last)
            .expect("fwd");
        let lb = b
            .forward(&toks, &mut b.new_cache(64), Logits::Last)
            .expect("fwd");
        let argmax = |v: &[f32]| crate::infer::argmax(v);
        assert_eq!(argmax(&la), argmax(&lb));
        let max_abs = la.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        let max_diff = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff <= 0.05 * max_abs, "{max_diff} vs {max_abs}");
    }

    #[test]
    fn a_cancelled_quantization_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_dir = dir.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let out = dir.path().join("q.gguf");
        let opts = GgufQuantizeOptions {
            mix: GgufMix::parse("q4_0").expect("mix"),
            overrides: Vec::new(),
            imatrix: None,
            backend: crate::backend::Backend::Cpu,
        };
        let r = quantize_gguf(&src, &opts, &OutputSpec::file(&out), &mut |_, done, _| {
            done < 3
        });
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "src")
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn fnv1a64(data: &[u8]) -> String {
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01B3);
        }
        format!("{h:016x}")
    }

    /// Every tensor of the GGUF file `out` has the type and FNV-1a-64 hash `want` (`name → [type, hash]`) gives.
    fn assert_tensor_hashes(out: &std::path::Path, want: &serde_json::Value, mix: &str) {
        let (file, _) = crate::model::gguf::GgufFile::read(out).expect("read back");
        let data = std::fs::read(out).expect("bytes");
        let want = want.as_object().expect("tensors");
        assert_eq!(file.tensors().len(), want.len(), "{mix}: tensor count");
        for t in file.tensors() {
            let [ty, hash] = want[&t.name].as_array().expect("pair").as_slice() else {
                panic!("{mix} {}: bad fixture entry", t.name)
            };
            let start = file.data_offset as usize + t.offset as usize;
            let bytes = &data[start..start + t.n_bytes as usize];
            assert_eq!(
                t.type_name(),
                ty.as_str().expect("type"),
                "{mix} {}: type",
                t.name
            );
            assert_eq!(
                fnv1a64(bytes),
                hash.as_str().expect("hash"),
                "{mix} {}: bytes",
                t.name
            );
        }
    }

    /// The shipped Q4_1 SmolLM2 → F16 GGUF → each mix, compared tensor by tensor with llama-quantize's
    /// output on the same input (hashes in tests/fixtures/smollm2, made by make_mix_hashes.py).
    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn smollm2_mixes_are_byte_identical_to_llama_quantize() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("tests/fixtures/smollm2/smollm2_mix_hashes.json"))
                .expect("hashes"),
        )
        .expect("json");
        let dir = tempfile::tempdir().expect("tempdir");
        let f16 = crate::testing::smollm2_f16(dir.path());
        let mixes = want.as_object().expect("object");
        assert_eq!(mixes.len(), 8);
        for (mix, tensors) in mixes {
            let out = dir.path().join(format!("{mix}.gguf"));
            let opts = GgufQuantizeOptions {
                mix: GgufMix::parse(mix).expect("mix"),
                overrides: Vec::new(),
                imatrix: None,
                backend: crate::backend::Backend::Cpu,
            };
            quantize_gguf(&f16, &opts, &OutputSpec::file(&out), &mut |_, _, _| true)
                .expect("quantize");
            assert_tensor_hashes(&out, tensors, mix);
            std::fs::remove_file(&out).expect("rm");
        }
    }

    /// With an importance matrix (llama-imatrix's, pruned to four layers so both the weighted and the plain
    /// paths run), every tensor of every mix equals llama-quantize's, and the quantize.imatrix.* keys match.
    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn smollm2_imatrix_mixes_match_llama_quantize() {
        let root =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2");
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("smollm2_imatrix_hashes.json")).expect("hashes"),
        )
        .expect("json");
        let im_path = root.join("smollm2_imatrix_l0-2_29.gguf");
        let matrix = Imatrix::read(&im_path).expect("imatrix");
        assert_eq!(matrix.entries.len(), 4 * 7);
        let dir = tempfile::tempdir().expect("tempdir");
        let f16 = crate::testing::smollm2_f16(dir.path());
        let mixes = want.as_object().expect("object");
        assert_eq!(mixes.len(), 7);
        for (mix, w) in mixes {
            let out = dir.path().join(format!("{mix}.gguf"));
            let opts = GgufQuantizeOptions {
                mix: GgufMix::parse(mix).expect("mix"),
                overrides: Vec::new(),
                imatrix: Some(ImatrixInput {
                    matrix: matrix.clone(),
                    file: Some("imatrix.gguf".into()),
                }),
                backend: crate::backend::Backend::Cpu,
            };
            let mut weighted = 0;
            let report = quantize_gguf(&f16, &opts, &OutputSpec::file(&out), &mut |m, _, _| {
                weighted += usize::from(m.weighted_rel_rms_error.is_some());
                true
            })
            .expect("quantize");
            assert!(report.imatrix);
            assert_eq!(
                weighted,
                4 * 7,
                "{mix}: tensors quantized with importance weights"
            );
            let (file, _) = crate::model::gguf::GgufFile::read(&out).expect("read back");
            for (k, v) in w["kv"].as_object().expect("kv") {
                let got = file.get(k).unwrap_or_else(|| panic!("{mix}: no {k}"));
                match v {
                    serde_json::Value::String(s) => {
                        assert_eq!(got.as_str(), Some(s.as_str()), "{k}")
                    }
                    n => assert_eq!(got, &GgufValue::U32(n.as_u64().expect("n") as u32), "{k}"),
                }
            }
            assert_eq!(
                file.get("quantize.imatrix.file")
                    .and_then(GgufValue::as_str),
                Some("imatrix.gguf")
            );
            assert_tensor_hashes(&out, &w["tensors"], mix);
            std::fs::remove_file(&out).expect("rm");
        }
    }

    /// The ten low-bit mixes (IQ1_S … IQ3_M) with one importance matrix (llama-imatrix's, covering every
    /// ffn_down — SmolLM2's only linears with rows of whole 256-blocks — and all of layers 0 and 29):
    /// every tensor equals llama-quantize's output with the same imatrix, and so does `general.file_type`.
    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn smollm2_lowbit_mixes_match_llama_quantize() {
        let root =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2");
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("smollm2_lowbit_hashes.json")).expect("hashes"),
        )
        .expect("json");
        let matrix = Imatrix::read(&root.join("smollm2_imatrix_lowbit.gguf")).expect("imatrix");
        let dir = tempfile::tempdir().expect("tempdir");
        let f16 = crate::testing::smollm2_f16(dir.path());
        let mixes = want.as_object().expect("object");
        assert_eq!(mixes.len(), 10);
        for (mix, w) in mixes {
            let out = dir.path().join(format!("{mix}.gguf"));
            let mix = GgufMix::parse(mix).expect("mix");
            assert!(mix.needs_imatrix() || mix.name().starts_with("IQ3_"));
            let no_imatrix = GgufQuantizeOptions {
                mix,
                overrides: Vec::new(),
                imatrix: None,
                backend: crate::backend::Backend::Cpu,
            };
            // Without the imatrix the IQ1/IQ2 mixes are refused (their ffn_down types need one); SmolLM2's
            // IQ3_XXS and IQ3_XS put no imatrix-only type on a tensor whose rows fit its blocks.
            if !matches!(mix, GgufMix::Iq3Xxs | GgufMix::Iq3Xs) && mix.needs_imatrix() {
                let r = quantize_gguf(
                    &f16,
                    &no_imatrix,
                    &OutputSpec::file(&out),
                    &mut |_, _, _| true,
                );
                let Err(e) = r else {
                    panic!("{}: quantized without an imatrix", mix.name())
                };
                assert!(e.to_string().contains("--imatrix"), "{e}");
                assert!(!out.exists());
            }
            let opts = GgufQuantizeOptions {
                imatrix: Some(ImatrixInput {
                    matrix: matrix.clone(),
                    file: Some("imatrix.gguf".into()),
                }),
                ..no_imatrix
            };
            quantize_gguf(&f16, &opts, &OutputSpec::file(&out), &mut |_, _, _| true)
                .expect("quantize");
            let (file, _) = crate::model::gguf::GgufFile::read(&out).expect("read back");
            assert_eq!(
                file.get("general.file_type"),
                Some(&GgufValue::U32(
                    w["file_type"].as_u64().expect("ftype") as u32
                )),
                "{}",
                mix.name()
            );
            assert_tensor_hashes(&out, &w["tensors"], mix.name());
            std::fs::remove_file(&out).expect("rm");
        }
    }

    #[test]
    fn an_imatrix_for_another_model_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_dir = dir.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let mut matrix = Imatrix::default();
        matrix.entries.insert(
            "blk.0.attn_q.weight".into(),
            crate::imatrix::ImatrixEntry {
                sums: vec![1.0; 7],
                counts: vec![1.0],
            },
        );
        let opts = GgufQuantizeOptions {
            mix: GgufMix::parse("q4_0").expect("mix"),
            overrides: Vec::new(),
            imatrix: Some(ImatrixInput { matrix, file: None }),
            backend: crate::backend::Backend::Cpu,
        };
        let out = dir.path().join("q.gguf");
        let e = quantize_gguf(&src, &opts, &OutputSpec::file(&out), &mut |_, _, _| true)
            .expect_err("mismatch");
        assert!(e.to_string().contains("another model"), "{e}");
        assert!(!out.exists());
    }
}
