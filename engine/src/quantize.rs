//! Quantization jobs, end to end: source model → recipe plans each tensor → codec per tensor → writer,
//! with per-tensor metrics as each tensor is done. Memory stays bounded by one tensor.

use std::path::Path;

use serde::Serialize;

use crate::codecs::GgmlType;
use crate::model::SourceModel;
use crate::recipes::gguf::{plan_gguf_mix, GgufMix, TensorOverride};
use crate::tensor::TensorRef;
use crate::writers::gguf::{gguf_tensor_name, quantize_tensor_rows, write_gguf, GgufPlanTensor};
use crate::{Error, Result};

/// What to make of a model as GGUF.
#[derive(Clone, Debug)]
pub struct GgufQuantizeOptions {
    pub mix: GgufMix,
    /// Per-tensor type overrides (patterns on GGUF names).
    pub overrides: Vec<TensorOverride>,
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

/// Quantize `src` to a GGUF file at `out` (written under a temporary name, renamed when complete).
/// `on_tensor` is called after each tensor; returning `false` cancels (nothing is left behind).
pub fn quantize_gguf(
    src: &SourceModel,
    opts: &GgufQuantizeOptions,
    out: &Path,
    on_tensor: &mut dyn FnMut(&TensorMetrics, usize, usize) -> bool,
) -> Result<QuantizeReport> {
    // The tensors that go into the file, in the writer's order, with GGUF names and ne (row length first).
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
    let list: Vec<(String, Vec<u64>)> = entries
        .iter()
        .map(|(_, g, ne)| (g.clone(), ne.clone()))
        .collect();
    let chosen = plan_gguf_mix(&opts.mix, &src.config, &list, &opts.overrides, false)?;
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
        quantize_tensor_rows(t, ty, buf)?;
        let m = measure(
            t,
            ty,
            buf,
            by_hf.get(t.name.as_str()).copied().unwrap_or(""),
        );
        if !on_tensor(&m, metrics.len() + 1, total) {
            cancelled.set(true);
        }
        metrics.push(m);
        Ok(())
    };
    let mut progress = |_done: usize, _total: usize| !cancelled.get();
    write_gguf(
        src,
        &plan,
        opts.mix.file_type(),
        out,
        &mut quantize_tensor,
        &mut progress,
    )?;
    let file_size_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let elems: u64 = src.tensors.values().map(|t| t.numel() as u64).sum();
    let bits: f64 = metrics.iter().map(|m| m.bytes as f64 * 8.0).sum();
    Ok(QuantizeReport {
        mix: opts.mix.name(),
        tensors: metrics,
        file_size_bytes,
        bits_per_weight: bits / elems.max(1) as f64,
    })
}

/// token_embd first, then the layers, then the final norm and the output head (the writer's order).
fn gguf_order(g: &str) -> u8 {
    if g.starts_with("token_embd") {
        0
    } else if g.starts_with("blk.") {
        1
    } else {
        2
    }
}

/// Error of `bytes` (tensor `t` quantized to `ty`, rows in `t`'s order) against `t`, one row at a time.
fn measure(t: &TensorRef, ty: GgmlType, bytes: &[u8], gguf_name: &str) -> TensorMetrics {
    let cols = t.cols();
    let rows = t.rows().max(1);
    let row_bytes = bytes.len() / rows;
    let mut w = vec![0.0f32; cols];
    let mut q = vec![0.0f32; cols];
    let (mut err2, mut norm2, mut max_error) = (0.0f64, 0.0f64, 0.0f64);
    for r in 0..rows {
        t.dequant_row(r, &mut w);
        ty.dequantize(&bytes[r * row_bytes..(r + 1) * row_bytes], &mut q);
        for (a, b) in w.iter().zip(&q) {
            let d = f64::from(a - b);
            err2 += d * d;
            norm2 += f64::from(*a) * f64::from(*a);
            max_error = max_error.max(d.abs());
        }
    }
    TensorMetrics {
        layer: layer_of(&t.name),
        tensor: t.name.clone(),
        gguf_name: gguf_name.to_owned(),
        ty: ty.name(),
        bits_per_weight: bytes.len() as f64 * 8.0 / t.numel().max(1) as f64,
        rel_rms_error: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
        max_error,
        bytes: bytes.len() as u64,
    }
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
        };
        let mut seen = 0;
        let report = quantize_gguf(&src, &opts, &out, &mut |_, done, _| {
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
        };
        let r = quantize_gguf(&src, &opts, &out, &mut |_, done, _| done < 3);
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
        let q41 = SourceModel::open(&crate::testing::smollm2_gguf()).expect("open SmolLM2");
        let f16_path = dir.path().join("f16.gguf");
        let f16_opts = GgufQuantizeOptions {
            mix: GgufMix::parse("f16").expect("mix"),
            overrides: Vec::new(),
        };
        quantize_gguf(&q41, &f16_opts, &f16_path, &mut |_, _, _| true).expect("f16");
        let f16 = SourceModel::open(&f16_path).expect("open f16");
        let mixes = want.as_object().expect("object");
        assert_eq!(mixes.len(), 8);
        for (mix, tensors) in mixes {
            let out = dir.path().join(format!("{mix}.gguf"));
            let opts = GgufQuantizeOptions {
                mix: GgufMix::parse(mix).expect("mix"),
                overrides: Vec::new(),
            };
            quantize_gguf(&f16, &opts, &out, &mut |_, _, _| true).expect("quantize");
            let (file, _) = crate::model::gguf::GgufFile::read(&out).expect("read back");
            let data = std::fs::read(&out).expect("bytes");
            let tensors = tensors.as_object().expect("tensors");
            assert_eq!(file.tensors().len(), tensors.len(), "{mix}: tensor count");
            for t in file.tensors() {
                let [ty, hash] = tensors[&t.name].as_array().expect("pair").as_slice() else {
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
            std::fs::remove_file(&out).expect("rm");
        }
    }
}
