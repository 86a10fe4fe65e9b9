//! A llama/qwen2 GGUF file as a [`SourceModel`] in Hugging Face terms: config from the metadata, the
//! tokenizer rebuilt from `tokenizer.ggml.*` ([`super::gguf_tokenizer`]), tensors under Hugging Face
//! names over the memory-mapped file (the container itself is read by [`super::gguf`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::gguf::*;
use super::{Arch, ModelConfig, RopeScaling, SourceFormat, SourceModel};
use crate::tensor::{Backing, Bytes, TensorRef};
use crate::{Error, Result};

/// Open a llama or qwen2 GGUF as a [`SourceModel`]: config and tokenizer from the metadata, tensors under
/// Hugging Face names over the memory-mapped file.
pub fn open(path: &Path) -> Result<SourceModel> {
    let (g, backing) = GgufFile::read(path)?;
    from_parsed(&g, &backing)
}

/// Build a [`SourceModel`] from an already parsed file and its bytes.
pub fn from_parsed(g: &GgufFile, backing: &Arc<Backing>) -> Result<SourceModel> {
    let path = g.path.as_path();
    let arch_name = g
        .get_str("general.architecture")?
        .ok_or_else(|| Error::malformed(path, "GGUF", "general.architecture is missing"))?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::unsupported(
                path,
                format!("architecture {other:?} (supported: llama, qwen2)"),
            ))
        }
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let bad = |d: String| Error::malformed(path, "GGUF", d);

    let hidden = g.require(&k("embedding_length"), g.get_usize(&k("embedding_length"))?)?;
    let num_layers = g.require(&k("block_count"), g.get_usize(&k("block_count"))?)?;
    let num_heads = g.require(
        &k("attention.head_count"),
        g.get_uniform_usize(&k("attention.head_count"))?,
    )?;
    let num_kv_heads = g
        .get_uniform_usize(&k("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let intermediate = g.require(
        &k("feed_forward_length"),
        g.get_uniform_usize(&k("feed_forward_length"))?,
    )?;
    let rms_eps = g.require(
        &k("attention.layer_norm_rms_epsilon"),
        g.get_f32(&k("attention.layer_norm_rms_epsilon"))?,
    )?;
    let ctx = g.require(&k("context_length"), g.get_usize(&k("context_length"))?)?;
    let rope_theta = g.get_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0);
    if hidden == 0 || num_layers == 0 || num_heads == 0 || num_kv_heads == 0 || intermediate == 0 {
        return Err(bad(format!(
            "zero size: hidden {hidden}, layers {num_layers}, heads {num_heads}, kv heads {num_kv_heads}, ffn {intermediate}"
        )));
    }
    // Each layer has at least nine tensors; checked before anything is sized by the layer count.
    if num_layers > g.tensors().len() / 9 {
        return Err(bad(format!(
            "block_count is {num_layers}, but the file has only {} tensors",
            g.tensors().len()
        )));
    }
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(bad(format!(
            "{num_heads} heads are not a multiple of {num_kv_heads} kv heads"
        )));
    }
    let head_dim = match g.get_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None if hidden.is_multiple_of(num_heads) => hidden / num_heads,
        None => {
            return Err(bad(format!(
                "embedding length {hidden} is not a multiple of {num_heads} heads"
            )))
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(format!(
            "head dimension {head_dim} must be even and nonzero"
        )));
    }
    if let Some(v) = g.get_usize(&k("attention.value_length"))? {
        if v != head_dim {
            return Err(Error::unsupported(
                path,
                format!("value length {v} differs from key length {head_dim}"),
            ));
        }
    }
    if !(rms_eps.is_finite() && rms_eps > 0.0 && rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(bad(format!(
            "rms epsilon {rms_eps} / rope base {rope_theta} out of range"
        )));
    }

    let factor = match g.get_f32(&k("rope.scaling.factor"))? {
        Some(f) => Some(f),
        None => g.get_f32(&k("rope.scale_linear"))?,
    };
    let scaling_type = g.get_str(&k("rope.scaling.type"))?.unwrap_or("linear");
    let rope_scaling = match (scaling_type, factor) {
        ("none", _) | (_, None) => None,
        (_, Some(f)) if f == 1.0 || f == 0.0 => None,
        ("linear", Some(f)) if f.is_finite() && f > 0.0 => Some(RopeScaling::Linear { factor: f }),
        ("linear", Some(f)) => return Err(bad(format!("rope scaling factor {f} out of range"))),
        (other, Some(f)) => {
            return Err(Error::unsupported(
                path,
                format!("rope scaling type {other:?} (factor {f})"),
            ))
        }
    };

    let vocab_size = g
        .get_str_array("tokenizer.ggml.tokens")?
        .map(<[String]>::len)
        .ok_or_else(|| bad("tokenizer.ggml.tokens is missing".into()))?;

    let rope_freq_factors = match g.tensor("rope_freqs.weight") {
        None => None,
        Some(t) => {
            if t.n_elements() != (head_dim / 2) as u64 {
                return Err(bad(format!(
                    "rope_freqs.weight has {} values, expected {}",
                    t.n_elements(),
                    head_dim / 2
                )));
            }
            Some(tensor_f32(g, backing, t)?)
        }
    };

    let config = ModelConfig {
        arch,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: rms_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings: ctx,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        attention_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        torch_dtype: None,
        rope_freq_factors,
    };

    let mut tensors = BTreeMap::new();
    for t in g.tensors() {
        if t.name == "rope_freqs.weight" {
            continue;
        }
        let hf = hf_tensor_name(&t.name).ok_or_else(|| {
            Error::unsupported(
                path,
                format!(
                    "tensor {} has no Hugging Face counterpart in a {arch_name} model",
                    t.name
                ),
            )
        })?;
        if let Some(layer) = hf
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
        {
            if layer.parse::<usize>().map_or(true, |l| l >= num_layers) {
                return Err(bad(format!(
                    "tensor {} is beyond the {num_layers} layers",
                    t.name
                )));
            }
        }
        let ty = t.ty().ok_or_else(|| unsupported_type(g, t))?;
        let shape = t.torch_shape();
        let interleave = match (arch, t.name.rsplit('.').nth(1)) {
            (Arch::Llama, Some("attn_q")) => Some(num_heads),
            (Arch::Llama, Some("attn_k")) => Some(num_kv_heads),
            _ => None,
        };
        let tr = match interleave {
            Some(heads) if shape.len() == 1 => {
                // A bias is one row, so the row remapping of TensorRef cannot undo the permutation:
                // store it (tiny) as f32 in Hugging Face order instead.
                if shape[0] != heads * head_dim {
                    return Err(bad(format!(
                        "tensor {} has shape {shape:?}, expected [{}]",
                        t.name,
                        heads * head_dim
                    )));
                }
                let stored = tensor_f32(g, backing, t)?;
                let hf_order = unpermute_rows(&stored, heads, 1).ok_or_else(|| {
                    bad(format!(
                        "tensor {}: {} rows do not split into {heads} heads of even size",
                        t.name,
                        stored.len()
                    ))
                })?;
                TensorRef::from_f32(hf.clone(), shape, &hf_order)?
            }
            _ => {
                let r = g
                    .tensor_range(t)
                    .ok_or_else(|| bad(format!("tensor {} is out of range", t.name)))?;
                let data = Bytes::slice_of(backing, r.start, r.len())
                    .ok_or_else(|| bad(format!("tensor {} is out of range", t.name)))?;
                let mut tr = TensorRef::new(hf.clone(), shape, ty, data)?;
                if let Some(heads) = interleave {
                    let rows = tr.rows();
                    if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
                        return Err(bad(format!(
                            "tensor {}: {rows} rows do not split into {heads} heads of even size",
                            t.name
                        )));
                    }
                    tr.rope_interleaved_heads = Some(heads);
                }
                tr
            }
        };
        tensors.insert(hf, tr);
    }
    check_tensors(&config, &tensors).map_err(bad)?;

    let tokenizer = super::gguf_tokenizer::from_gguf(g)?;
    let name = match g.get_str("general.name")? {
        Some(n) if !n.trim().is_empty() => n.to_string(),
        _ => path
            .file_stem()
            .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned()),
    };
    Ok(SourceModel {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        name,
        config,
        tensors,
        tokenizer,
        file_size_bytes: g.file_size,
        calibration_dataset: g
            .get_str("quantize.imatrix.dataset")
            .ok()
            .flatten()
            .map(str::to_owned),
        gguf_metadata: Some(Arc::new(g.metadata().to_vec())),
    })
}

/// Every tensor a decoder layer stack needs is there, and every tensor has the shape the config implies
/// (llama.cpp checks the same at load), so nothing downstream meets a surprise shape.
fn check_tensors(
    c: &ModelConfig,
    tensors: &BTreeMap<String, TensorRef>,
) -> std::result::Result<(), String> {
    let (h, ffn, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut want: Vec<(String, Vec<usize>, bool)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h], true),
        ("model.norm.weight".into(), vec![h], true),
        ("lm_head.weight".into(), vec![v, h], false),
    ];
    for l in 0..c.num_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        want.extend([
            (p("input_layernorm.weight"), vec![h], true),
            (p("post_attention_layernorm.weight"), vec![h], true),
            (p("self_attn.q_proj.weight"), vec![q, h], true),
            (p("self_attn.k_proj.weight"), vec![kv, h], true),
            (p("self_attn.v_proj.weight"), vec![kv, h], true),
            (p("self_attn.o_proj.weight"), vec![h, q], true),
            (p("self_attn.q_proj.bias"), vec![q], false),
            (p("self_attn.k_proj.bias"), vec![kv], false),
            (p("self_attn.v_proj.bias"), vec![kv], false),
            (p("self_attn.o_proj.bias"), vec![h], false),
            (p("mlp.gate_proj.weight"), vec![ffn, h], true),
            (p("mlp.up_proj.weight"), vec![ffn, h], true),
            (p("mlp.down_proj.weight"), vec![h, ffn], true),
        ]);
    }
    for (name, shape, required) in &want {
        match tensors.get(name) {
            None if *required => return Err(format!("tensor {name} is missing")),
            None => {}
            Some(t) if t.shape != *shape => {
                return Err(format!(
                    "tensor {name} has shape {:?}, expected {shape:?} from the model's metadata",
                    t.shape
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !want.iter().any(|w| &w.0 == *k)) {
        return Err(format!("unexpected tensor {extra}"));
    }
    Ok(())
}

/// Dequantise a whole (small) tensor to f32 in stored order.
fn tensor_f32(g: &GgufFile, backing: &Arc<Backing>, t: &GgufTensorInfo) -> Result<Vec<f32>> {
    let ty = t.ty().ok_or_else(|| unsupported_type(g, t))?;
    let r = g.tensor_range(t).ok_or_else(|| {
        Error::malformed(
            &g.path,
            "GGUF",
            format!("tensor {} is out of range", t.name),
        )
    })?;
    let bytes = backing.get(r).ok_or_else(|| {
        Error::malformed(
            &g.path,
            "GGUF",
            format!("tensor {} is out of range", t.name),
        )
    })?;
    let mut out = vec![0.0f32; t.n_elements() as usize];
    ty.dequantize(bytes, &mut out);
    Ok(out)
}

fn unsupported_type(g: &GgufFile, t: &GgufTensorInfo) -> Error {
    Error::unsupported(
        &g.path,
        format!(
            "tensor {} has ggml type {} (id {}), which Quant Studio cannot decode",
            t.name,
            t.type_name(),
            t.ggml_type
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::super::gguf::test_util::*;
    use super::*;

    /// A tiny llama GGUF (F32 tensors, gpt2 tokenizer) written in-test.
    fn tiny_llama(
        arch: &str,
        extra: &[(String, GgufValue)],
        drop: &[&str],
        bad_type: Option<(&str, u32)>,
    ) -> Vec<u8> {
        let (hidden, ffn, heads, kv_heads, hd) = (8i64, 16i64, 2i64, 1i64, 4i64);
        let tokens: Vec<String> = [
            "<|endoftext|>",
            "a",
            "b",
            "ab",
            "Ġ",
            "Ġa",
            "c",
            "<|im_end|>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let vocab = tokens.len() as i64;
        let names: Vec<(&str, Vec<i64>)> = vec![
            ("token_embd.weight", vec![hidden, vocab]),
            ("output_norm.weight", vec![hidden]),
            ("rope_freqs.weight", vec![hd / 2]),
            ("blk.0.attn_norm.weight", vec![hidden]),
            ("blk.0.attn_q.weight", vec![hidden, heads * hd]),
            ("blk.0.attn_q.bias", vec![heads * hd]),
            ("blk.0.attn_k.weight", vec![hidden, kv_heads * hd]),
            ("blk.0.attn_k.bias", vec![kv_heads * hd]),
            ("blk.0.attn_v.weight", vec![hidden, kv_heads * hd]),
            ("blk.0.attn_v.bias", vec![kv_heads * hd]),
            ("blk.0.attn_output.weight", vec![heads * hd, hidden]),
            ("blk.0.ffn_norm.weight", vec![hidden]),
            ("blk.0.ffn_gate.weight", vec![hidden, ffn]),
            ("blk.0.ffn_up.weight", vec![hidden, ffn]),
            ("blk.0.ffn_down.weight", vec![ffn, hidden]),
        ];
        let mut tensors = Vec::new();
        let mut data = Vec::new();
        for (i, (name, ne)) in names.iter().enumerate() {
            if drop.contains(name) {
                continue;
            }
            while !data.len().is_multiple_of(32) {
                data.push(0);
            }
            let n: i64 = ne.iter().product();
            let ty = match bad_type {
                Some((b, ty)) if b == *name => ty,
                _ => 0,
            };
            tensors.push(t(name, ne, ty, data.len() as u64));
            for k in 0..n {
                let v = if *name == "rope_freqs.weight" {
                    1.0 + k as f32
                } else {
                    (i * 1000) as f32 + k as f32
                };
                data.extend_from_slice(&v.to_le_bytes());
            }
        }
        let p = |k: &str| format!("{arch}.{k}");
        let mut kvs = vec![
            kv("general.architecture", GgufValue::Str(arch.into())),
            kv(&p("context_length"), GgufValue::U32(128)),
            kv(&p("embedding_length"), GgufValue::U32(hidden as u32)),
            kv(&p("block_count"), GgufValue::U32(1)),
            kv(&p("feed_forward_length"), GgufValue::I32(ffn as i32)),
            kv(&p("attention.head_count"), GgufValue::U32(heads as u32)),
            kv(
                &p("attention.head_count_kv"),
                GgufValue::U64(kv_heads as u64),
            ),
            kv(&p("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5)),
            kv(&p("rope.freq_base"), GgufValue::F32(500_000.0)),
            kv("tokenizer.ggml.model", GgufValue::Str("gpt2".into())),
            kv("tokenizer.ggml.pre", GgufValue::Str("gpt-2".into())),
            kv(
                "tokenizer.ggml.tokens",
                GgufValue::Array(GgufArray::Str(tokens)),
            ),
            kv(
                "tokenizer.ggml.token_type",
                GgufValue::Array(GgufArray::I32(vec![3, 1, 1, 1, 1, 1, 1, 3])),
            ),
            kv(
                "tokenizer.ggml.merges",
                GgufValue::Array(GgufArray::Str(vec!["a b".into(), "Ġ a".into()])),
            ),
            kv("tokenizer.ggml.bos_token_id", GgufValue::U32(0)),
            kv("tokenizer.ggml.eos_token_id", GgufValue::U32(0)),
            kv("tokenizer.chat_template", GgufValue::Str("{{ x }}".into())),
        ];
        for (k, v) in extra {
            match kvs.iter_mut().find(|(name, _)| name == k) {
                Some(slot) => slot.1 = v.clone(),
                None => kvs.push((k.clone(), v.clone())),
            }
        }
        Spec::new(kvs, tensors, data).bytes()
    }

    fn open_bytes(b: &[u8]) -> Result<SourceModel> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tiny-model.gguf");
        std::fs::write(&p, b).expect("write");
        open(&p)
    }

    #[test]
    fn gguf_open_tiny_llama() {
        let extra = [
            kv("llama.rope.scaling.type", GgufValue::Str("linear".into())),
            kv("llama.rope.scaling.factor", GgufValue::F32(2.0)),
        ];
        let m = open_bytes(&tiny_llama("llama", &extra, &[], None)).expect("open");
        assert_eq!(m.format, SourceFormat::Gguf);
        assert_eq!(m.name, "tiny-model");
        let c = &m.config;
        assert_eq!(
            (
                c.arch,
                c.hidden_size,
                c.intermediate_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            ),
            (Arch::Llama, 8, 16, 1, 2, 1, 4)
        );
        assert_eq!((c.vocab_size, c.max_position_embeddings), (8, 128));
        assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 500_000.0));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.rope_freq_factors, Some(vec![1.0, 2.0]));
        assert!(c.tie_word_embeddings && c.attention_bias);
        assert_eq!(m.tensors.len(), 14, "rope_freqs is not a model tensor");
        assert_eq!(
            m.tensor("model.embed_tokens.weight").expect("emb").shape,
            vec![8, 8]
        );
        assert_eq!(
            m.tensor("model.layers.0.mlp.down_proj.weight")
                .expect("down")
                .shape,
            vec![8, 16]
        );
        // q: tensor 4 of the list, 8 rows × 8 cols; rows within each 4-row head are (0, 2, 1, 3) on disk.
        let q = m
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .expect("q");
        assert_eq!(q.rope_interleaved_heads, Some(2));
        let qv = q.to_f32();
        let stored_row_of_hf = [0, 2, 1, 3, 4, 6, 5, 7];
        for (r, &s) in stored_row_of_hf.iter().enumerate() {
            assert_eq!(qv[r * 8], 4000.0 + (s * 8) as f32, "q row {r}");
        }
        let qb = m
            .tensor("model.layers.0.self_attn.q_proj.bias")
            .expect("q bias");
        assert_eq!(qb.rope_interleaved_heads, None);
        let want: Vec<f32> = stored_row_of_hf
            .iter()
            .map(|&s| 5000.0 + s as f32)
            .collect();
        assert_eq!(qb.to_f32(), want);
        let kb = m
            .tensor("model.layers.0.self_attn.k_proj.bias")
            .expect("k bias");
        assert_eq!(kb.to_f32(), vec![7000.0, 7002.0, 7001.0, 7003.0]);
        let k = m
            .tensor("model.layers.0.self_attn.k_proj.weight")
            .expect("k");
        assert_eq!(k.rope_interleaved_heads, Some(1));
        let v = m
            .tensor("model.layers.0.self_attn.v_proj.weight")
            .expect("v");
        assert_eq!(v.rope_interleaved_heads, None);
        // Tokenizer.
        let tk = &m.tokenizer;
        assert_eq!(tk.encode("ab a", true).expect("encode"), vec![3, 5]);
        assert_eq!(tk.decode(&[3, 5], false).expect("decode"), "ab a");
        assert_eq!(tk.encode("a<|im_end|>", false).expect("encode"), vec![1, 7]);
        assert!(!tk.add_bos);
        assert_eq!(
            (tk.bos_token_id, tk.bos_token.as_deref()),
            (Some(0), Some("<|endoftext|>"))
        );
        assert_eq!(tk.eos_token_ids, vec![0, 7]);
        assert_eq!(tk.chat_template.as_deref(), Some("{{ x }}"));

        // qwen2 files are not permuted; an output.weight-free file is tied either way.
        let m = open_bytes(&tiny_llama("qwen2", &[], &["rope_freqs.weight"], None)).expect("qwen2");
        assert_eq!(m.config.arch, Arch::Qwen2);
        assert_eq!(m.config.rope_scaling, None);
        assert_eq!(m.config.rope_freq_factors, None);
        let q = m
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .expect("q");
        assert_eq!(q.rope_interleaved_heads, None);
        let qb = m
            .tensor("model.layers.0.self_attn.q_proj.bias")
            .expect("q bias");
        assert_eq!(
            qb.to_f32(),
            (0..8).map(|k| 5000.0 + k as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn gguf_open_rejects_what_it_cannot_run() {
        let e = open_bytes(&tiny_llama("gemma", &[], &[], None)).expect_err("gemma");
        assert!(
            matches!(e, Error::Unsupported { .. }) && e.to_string().contains("gemma"),
            "{e}"
        );
        let e = open_bytes(&tiny_llama(
            "llama",
            &[],
            &[],
            Some(("blk.0.ffn_up.weight", 24)),
        ))
        .expect_err("i8");
        let m = e.to_string();
        assert!(
            m.contains("blk.0.ffn_up.weight") && m.contains("I8") && m.contains("24"),
            "{m}"
        );
        let extra = [
            kv("llama.rope.scaling.type", GgufValue::Str("yarn".into())),
            kv("llama.rope.scaling.factor", GgufValue::F32(4.0)),
        ];
        let e = open_bytes(&tiny_llama("llama", &extra, &[], None)).expect_err("yarn");
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = open_bytes(&tiny_llama("llama", &[], &["blk.0.attn_norm.weight"], None))
            .expect_err("missing");
        assert!(
            e.to_string()
                .contains("model.layers.0.input_layernorm.weight is missing"),
            "{e}"
        );
        let extra = [kv("llama.feed_forward_length", GgufValue::U32(32))];
        let e = open_bytes(&tiny_llama("llama", &extra, &[], None)).expect_err("ffn shape");
        assert!(
            e.to_string()
                .contains("gate_proj.weight has shape [16, 8], expected [32, 8]"),
            "{e}"
        );
        let extra = [kv("llama.attention.head_count", GgufValue::U32(3))];
        let e =
            open_bytes(&tiny_llama("llama", &extra, &[], None)).expect_err("heads do not divide");
        assert!(e.to_string().contains("not a multiple of 3 heads"), "{e}");
        let extra = [kv("llama.attention.head_count_kv", GgufValue::U32(2))];
        let e = open_bytes(&tiny_llama("llama", &extra, &[], None)).expect_err("k shape");
        assert!(
            e.to_string()
                .contains("attn_k.bias has shape [4], expected [8]"),
            "{e}"
        );
        let extra = [kv(
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufArray::Str(vec!["a".into(); 9])),
        )];
        let e = open_bytes(&tiny_llama("llama", &extra, &[], None)).expect_err("vocab");
        assert!(
            e.to_string()
                .contains("embed_tokens.weight has shape [8, 8], expected [9, 8]"),
            "{e}"
        );
    }

    /// Every single-byte corruption of a valid model file is either read or rejected, never a panic.
    #[test]
    fn gguf_corrupted_bytes_never_panic() {
        let good = tiny_llama("llama", &[], &[], None);
        let (mut opened, mut rejected) = (0, 0);
        for i in 0..good.len() {
            for v in [0x00, 0xFF, 0x80, good[i] ^ 0x01, good[i].wrapping_add(8)] {
                if v == good[i] {
                    continue;
                }
                let mut b = good.clone();
                b[i] = v;
                let backing = Arc::new(Backing::Owned(b));
                let r = GgufFile::parse(Path::new("corrupt.gguf"), &backing)
                    .and_then(|g| from_parsed(&g, &backing));
                match r {
                    Ok(m) => {
                        for t in m.tensors.values() {
                            let _ = t.to_f32();
                        }
                        opened += 1;
                    }
                    Err(_) => rejected += 1,
                }
            }
        }
        assert!(
            opened > 0 && rejected > 0,
            "{opened} opened, {rejected} rejected"
        );
    }

    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn gguf_smollm2_open_config_and_q_proj() {
        let path = smollm2_path();
        let m = open(&path).expect("open SmolLM2");
        let c = &m.config;
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads),
            (30, 576, 9, 3)
        );
        assert_eq!(
            (c.head_dim, c.intermediate_size, c.vocab_size),
            (64, 1536, 49152)
        );
        assert_eq!((c.rope_theta, c.max_position_embeddings), (100_000.0, 8192));
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert_eq!((c.rope_scaling, c.rope_freq_factors.as_ref()), (None, None));
        assert_eq!(m.tensors.len(), 272);
        assert!(!m.tensors.contains_key("lm_head.weight"));
        assert_eq!(m.name, "Smollm2 135M 8k Lc100K Mix1 Ep2");
        assert_eq!(
            m.file_size_bytes,
            std::fs::metadata(&path).expect("stat").len()
        );

        // Expected values: gguf-py 0.19 `gguf.quants.dequantize` of blk.0.attn_{q,k}.weight (Q4_1), rows
        // un-permuted with numpy (reshape (heads, hd/2, 2, cols), swap axes 1 and 2); f64 sums of all
        // values and bit patterns of single elements.
        type Case = (&'static str, usize, f64, f64, [(usize, usize, u32); 8]);
        let cases: [Case; 2] = [
            (
                "model.layers.0.self_attn.q_proj.weight",
                576,
                59.22322082519531,
                63395.39872741699,
                [
                    (0, 0, 3183820800),
                    (1, 5, 3197685760),
                    (32, 7, 3173728256),
                    (33, 100, 1050445824),
                    (63, 575, 3178946560),
                    (64, 1, 1038532608),
                    (100, 200, 990904320),
                    (575, 575, 3196256256),
                ],
            ),
            (
                "model.layers.0.self_attn.k_proj.weight",
                192,
                26.937057495117188,
                29794.78126525879,
                [
                    (0, 0, 3189702656),
                    (1, 5, 1054527488),
                    (32, 7, 3201171456),
                    (33, 100, 3204501504),
                    (63, 575, 1026752512),
                    (64, 1, 1062727680),
                    (100, 200, 3180396544),
                    (191, 575, 1052389376),
                ],
            ),
        ];
        for (name, rows, sum, abs_sum, samples) in cases {
            let t = m.tensor(name).expect("tensor");
            assert_eq!(
                (t.block_type(), t.shape.as_slice()),
                (Some(crate::codecs::GgmlType::Q4_1), &[rows, 576][..])
            );
            let v = t.to_f32();
            let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
            let a: f64 = v.iter().map(|&x| f64::from(x).abs()).sum();
            assert!(
                (s - sum).abs() < 1e-6 && (a - abs_sum).abs() < 1e-6,
                "{name}: sums {s} {a}"
            );
            for (r, c, bits) in samples {
                assert_eq!(v[r * 576 + c].to_bits(), bits, "{name}[{r}, {c}]");
            }
        }
    }
}
