//! Write any [`SourceModel`] (a Hugging Face folder, or a GGUF file with its quantised tensors) as a
//! Hugging Face folder that transformers loads: `config.json`, `generation_config.json`, safetensors
//! weights in F16 or BF16, `tokenizer.json` and `tokenizer_config.json`.
//!
//! The weights are streamed: the safetensors header is computed from names and shapes alone, then each
//! tensor is dequantised one row at a time and written, so memory stays bounded by a row and the output
//! buffer whatever the model's size. The folder is built under a temporary name by [`crate::output`] and
//! renamed only once complete; on error or cancellation it is removed.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::safetensors::{PlannedTensor, SafetensorsSink};
use crate::model::{Arch, ModelConfig, RopeScaling, SourceModel};
use crate::output::OutputSpec;
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// The float type the weights are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F16,
    BF16,
}

impl OutDtype {
    /// The safetensors dtype name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            OutDtype::F16 => "F16",
            OutDtype::BF16 => "BF16",
        }
    }

    /// The `torch_dtype` of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
        }
    }

    fn encode(self, src: &[f32], dst: &mut Vec<u8>) {
        dst.clear();
        match self {
            OutDtype::F16 => dst.extend(
                src.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes()),
            ),
            OutDtype::BF16 => dst.extend(
                src.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()),
            ),
        }
    }
}

/// Weight files are split into shards of at most this many bytes (a tensor larger than this gets a shard
/// of its own).
pub const SHARD_BYTES: u64 = 2_000_000_000;

/// Bytes written between two progress reports inside a tensor.
const PROGRESS_STEP: usize = 32 << 20;

/// Write `src` as a Hugging Face folder at `out.path` (through [`crate::output`]: checked first, an
/// existing folder replaced only with `out.overwrite`, written under a temporary name), with every
/// tensor in `dtype`. `progress(done, total)` is called with bytes of weights written so far; returning
/// `false` cancels (the result is then [`Error::Cancelled`] and nothing is left behind).
///
/// `lm_head.weight` is left out when the embeddings are tied. Every other tensor is written under its own
/// name, norms included, in `dtype` (as transformers' `save_pretrained` does after `.to(dtype)`).
pub fn write_hf_folder(
    src: &SourceModel,
    out: &OutputSpec,
    dtype: OutDtype,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let spec = hf_folder_spec(src, out);
    crate::output::write_staged(spec, |tmp| {
        write_hf_folder_with(src, tmp, dtype, SHARD_BYTES, progress)
    })?;
    Ok(())
}

/// `out` as a folder written from `src` (2 bytes per weight, F16 or BF16), with its size.
pub fn hf_folder_spec(src: &SourceModel, out: &OutputSpec) -> OutputSpec {
    let weights: u64 = src.tensors.values().map(|t| t.numel() as u64 * 2).sum();
    let mut spec = out.clone().input(&src.path).estimated_bytes(weights);
    spec.kind = crate::output::OutputKind::Folder;
    spec
}

/// Write `src` as a Hugging Face folder into `out` (created if missing), weight files of at most
/// `shard_bytes`.
pub(crate) fn write_hf_folder_with(
    src: &SourceModel,
    out: &Path,
    dtype: OutDtype,
    shard_bytes: u64,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tmp = out;

    // Everything that can fail on the model's content is checked before the weights are written.
    let config = config_json(&src.config, &src.tokenizer, dtype)?;
    let (tokenizer_json, add_bos) = tokenizer_json(src)?;

    let tensors: Vec<&TensorRef> = src
        .tensors
        .values()
        .filter(|t| !(src.config.tie_word_embeddings && t.name == "lm_head.weight"))
        .collect();
    write_weights(tmp, &tensors, dtype, shard_bytes, progress)?;

    write_text(&tmp.join("config.json"), &pretty(&config)?)?;
    write_text(
        &tmp.join("generation_config.json"),
        &pretty(&generation_config_json(&src.tokenizer))?,
    )?;
    write_text(&tmp.join("tokenizer.json"), &tokenizer_json)?;
    let tc = tokenizer_config_json(src, add_bos);
    write_text(&tmp.join("tokenizer_config.json"), &pretty(&tc)?)?;
    Ok(())
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn pretty(v: &Value) -> Result<String> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

// ---------------------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------------------

/// Bytes `t` takes in the output.
fn out_bytes(t: &TensorRef) -> u64 {
    t.numel() as u64 * 2
}

fn write_weights(
    dir: &Path,
    tensors: &[&TensorRef],
    dtype: OutDtype,
    shard_bytes: u64,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let plan = tensors
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dtype: dtype.safetensors_name(),
            shape: t.shape.clone(),
            nbytes: out_bytes(t),
        })
        .collect();
    let mut meta = Map::new();
    meta.insert("format".into(), json!("pt"));
    let mut sink = SafetensorsSink::new(dir, plan, shard_bytes, meta);
    let total = sink.total_bytes() as usize;
    let mut done = 0usize;
    if !progress(0, total) {
        return Err(Error::Cancelled);
    }
    let mut row = Vec::new();
    let mut bytes = Vec::new();
    for t in tensors {
        let (rows, cols) = (t.rows(), t.cols());
        row.resize(cols, 0.0f32);
        let mut since_report = 0usize;
        for r in 0..rows {
            t.dequant_row(r, &mut row);
            dtype.encode(&row, &mut bytes);
            sink.write(&t.name, &bytes)?;
            done += bytes.len();
            since_report += bytes.len();
            if since_report >= PROGRESS_STEP {
                since_report = 0;
                if !progress(done, total) {
                    return Err(Error::Cancelled);
                }
            }
        }
        if !progress(done, total) {
            return Err(Error::Cancelled);
        }
    }
    sink.finish()
}

// ---------------------------------------------------------------------------------------------------------
// config.json, generation_config.json
// ---------------------------------------------------------------------------------------------------------

/// An f32 as the JSON number its shortest decimal form means (`1e-5`, not `9.999999747378752e-6`).
fn num(x: f32) -> Value {
    format!("{x}")
        .parse::<f64>()
        .map(Value::from)
        .unwrap_or(Value::Null)
}

/// The `rope_scaling` to write. A GGUF's per-frequency factors (`rope_freqs.weight`) are turned back into
/// Llama 3 scaling when a standard parameter set reproduces them; anything else cannot be written.
fn export_rope_scaling(cfg: &ModelConfig) -> Result<Option<RopeScaling>> {
    if cfg.rope_scaling.is_some() {
        return Ok(cfg.rope_scaling);
    }
    let Some(factors) = &cfg.rope_freq_factors else {
        return Ok(None);
    };
    if factors.iter().all(|&f| (f - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    let want = cfg.rope_inv_freq();
    let factor = factors.iter().copied().fold(1.0f32, f32::max);
    for original in [8192usize, 4096, 2048, 16_384, 32_768, 65_536, 131_072] {
        for (lo, hi) in [(1.0f32, 4.0f32), (1.0, 2.0), (2.0, 4.0)] {
            let candidate = RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: original,
            };
            let trial = ModelConfig {
                rope_scaling: Some(candidate),
                rope_freq_factors: None,
                ..cfg.clone()
            };
            let got = trial.rope_inv_freq();
            let same = got.len() == want.len()
                && got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1e-30));
            if same {
                return Ok(Some(candidate));
            }
        }
    }
    Err(Error::Invalid(
        "this model's RoPE frequency factors are not a Llama 3 scaling that config.json can express".into(),
    ))
}

fn rope_scaling_json(s: Option<RopeScaling>) -> Value {
    match s {
        None => Value::Null,
        Some(RopeScaling::Linear { factor }) => {
            json!({"rope_type": "linear", "factor": num(factor)})
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            json!({
                "rope_type": "llama3",
                "factor": num(factor),
                "low_freq_factor": num(low_freq_factor),
                "high_freq_factor": num(high_freq_factor),
                "original_max_position_embeddings": original_max_position_embeddings,
            })
        }
    }
}

fn eos_value(ids: &[u32]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => Value::from(*one),
        many => Value::from(many.to_vec()),
    }
}

/// config.json in transformers' (4.x-compatible) form.
pub(crate) fn config_json(
    cfg: &ModelConfig,
    tok: &crate::model::TextTokenizer,
    dtype: OutDtype,
) -> Result<Value> {
    let mut c = Map::new();
    c.insert("architectures".into(), json!([cfg.arch.hf_class()]));
    c.insert("model_type".into(), json!(cfg.arch.model_type()));
    c.insert("hidden_size".into(), json!(cfg.hidden_size));
    c.insert("intermediate_size".into(), json!(cfg.intermediate_size));
    c.insert("num_hidden_layers".into(), json!(cfg.num_layers));
    c.insert("num_attention_heads".into(), json!(cfg.num_heads));
    c.insert("num_key_value_heads".into(), json!(cfg.num_kv_heads));
    c.insert("head_dim".into(), json!(cfg.head_dim));
    c.insert("vocab_size".into(), json!(cfg.vocab_size));
    c.insert("rms_norm_eps".into(), num(cfg.rms_norm_eps));
    c.insert("rope_theta".into(), num(cfg.rope_theta));
    c.insert(
        "rope_scaling".into(),
        rope_scaling_json(export_rope_scaling(cfg)?),
    );
    c.insert(
        "max_position_embeddings".into(),
        json!(cfg.max_position_embeddings),
    );
    c.insert("tie_word_embeddings".into(), json!(cfg.tie_word_embeddings));
    c.insert("torch_dtype".into(), json!(dtype.torch_name()));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("initializer_range".into(), json!(0.02));
    c.insert("attention_dropout".into(), json!(0.0));
    c.insert("use_cache".into(), json!(true));
    c.insert(
        "bos_token_id".into(),
        tok.bos_token_id.map_or(Value::Null, Value::from),
    );
    c.insert("eos_token_id".into(), eos_value(&tok.eos_token_ids));
    match cfg.arch {
        Arch::Llama => {
            c.insert("attention_bias".into(), json!(cfg.attention_bias));
            c.insert("mlp_bias".into(), json!(false));
        }
        Arch::Mistral => {
            if cfg.attention_bias {
                return Err(Error::Invalid(
                    "MistralForCausalLM has no attention biases; this model cannot be written as one".into(),
                ));
            }
            c.insert("sliding_window".into(), Value::Null);
        }
        Arch::Qwen2 => {
            if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
                return Err(Error::Invalid(format!(
                    "Qwen2ForCausalLM needs head_dim × heads = hidden_size ({} × {} ≠ {})",
                    cfg.head_dim, cfg.num_heads, cfg.hidden_size
                )));
            }
            c.insert("use_sliding_window".into(), json!(false));
            c.insert("sliding_window".into(), Value::Null);
            c.insert("max_window_layers".into(), json!(cfg.num_layers));
        }
    }
    Ok(Value::Object(c))
}

pub(crate) fn generation_config_json(tok: &crate::model::TextTokenizer) -> Value {
    let mut g = Map::new();
    if let Some(b) = tok.bos_token_id {
        g.insert("bos_token_id".into(), json!(b));
    }
    if !tok.eos_token_ids.is_empty() {
        g.insert("eos_token_id".into(), json!(tok.eos_token_ids));
    }
    Value::Object(g)
}

// ---------------------------------------------------------------------------------------------------------
// Tokenizer files
// ---------------------------------------------------------------------------------------------------------

fn is_bos_template(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some("TemplateProcessing")
}

/// tokenizer.json, with its post-processor made to agree with `add_bos` (transformers' generic fast
/// tokenizer takes BOS insertion from the post-processor alone). Returns the text and the `add_bos_token`
/// to write.
pub(crate) fn tokenizer_json(src: &SourceModel) -> Result<(String, bool)> {
    let tok = &src.tokenizer;
    let bad = |e: String| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}"));
    let text = tok.inner.to_string(false).map_err(|e| bad(e.to_string()))?;
    let inserts = crate::model::hf::post_processor_adds_bos(&tok.inner, tok.bos_token_id);
    let bos = tok
        .bos_token_id
        .and_then(|id| tok.inner.id_to_token(id).map(|t| (id, t)));
    if inserts == tok.add_bos || (tok.add_bos && bos.is_none()) {
        return Ok((text, inserts));
    }
    let mut v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let current = v.get("post_processor").cloned().unwrap_or(Value::Null);
    let new = match bos {
        Some((id, token)) if tok.add_bos => {
            let special = |type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
            let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
            let mut special_tokens = Map::new();
            special_tokens.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
            let template = json!({
                "type": "TemplateProcessing",
                "single": [special(0), seq("A", 0)],
                "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                "special_tokens": special_tokens,
            });
            if current.is_null() {
                template
            } else {
                json!({"type": "Sequence", "processors": [current, template]})
            }
        }
        _ => {
            if is_bos_template(&current) {
                Value::Null
            } else if let Some(list) = current.get("processors").and_then(Value::as_array) {
                let kept: Vec<Value> = list
                    .iter()
                    .filter(|p| !is_bos_template(p))
                    .cloned()
                    .collect();
                json!({"type": "Sequence", "processors": kept})
            } else {
                current
            }
        }
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("post_processor".into(), new);
    }
    let text = serde_json::to_string(&v).map_err(|e| bad(e.to_string()))?;
    let check: tokenizers::Tokenizer = text
        .parse()
        .map_err(|e: tokenizers::Error| bad(e.to_string()))?;
    let now_inserts = crate::model::hf::post_processor_adds_bos(&check, tok.bos_token_id);
    Ok((text, now_inserts))
}

pub(crate) fn tokenizer_config_json(src: &SourceModel, add_bos: bool) -> Value {
    let tok = &src.tokenizer;
    let bos = tok
        .bos_token
        .clone()
        .or_else(|| tok.bos_token_id.and_then(|id| tok.inner.id_to_token(id)));
    let eos = tok.eos_token.clone().or_else(|| {
        tok.eos_token_ids
            .first()
            .and_then(|&id| tok.inner.id_to_token(id))
    });
    let mut c: BTreeMap<&str, Value> = BTreeMap::new();
    c.insert("tokenizer_class", json!("PreTrainedTokenizerFast"));
    c.insert("bos_token", bos.map_or(Value::Null, Value::from));
    c.insert("eos_token", eos.map_or(Value::Null, Value::from));
    c.insert("add_bos_token", json!(add_bos));
    c.insert("add_eos_token", json!(false));
    c.insert(
        "model_max_length",
        json!(src.config.max_position_embeddings),
    );
    c.insert("clean_up_tokenization_spaces", json!(false));
    if let Some(t) = &tok.chat_template {
        c.insert("chat_template", json!(t));
    }
    json!(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::GgmlType;
    use crate::model::hf::testutil::{
        tokenizer_json as test_tokenizer_json, values, write_tiny_llama,
    };
    use crate::model::{hf, SourceFormat, TextTokenizer};
    use crate::tensor::Bytes;

    fn tiny() -> (tempfile::TempDir, SourceModel) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("src");
        write_tiny_llama(&dir);
        let m = hf::open(&dir).expect("open");
        (tmp, m)
    }

    fn round(x: f32, dtype: OutDtype) -> f32 {
        match dtype {
            OutDtype::F16 => half::f16::from_f32(x).to_f32(),
            OutDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    fn assert_same_model(a: &SourceModel, b: &SourceModel, dtype: OutDtype) {
        let mut want_cfg = a.config.clone();
        want_cfg.torch_dtype = Some(dtype.torch_name().into());
        if want_cfg.rope_freq_factors.is_some() {
            // Written back as rope_scaling; compare the frequencies instead.
            let (fa, fb) = (a.config.rope_inv_freq(), b.config.rope_inv_freq());
            for (x, y) in fa.iter().zip(&fb) {
                assert!((x - y).abs() <= 1e-4 * x.abs(), "{fa:?} vs {fb:?}");
            }
            want_cfg.rope_freq_factors = None;
            want_cfg.rope_scaling = b.config.rope_scaling;
        }
        assert_eq!(b.config, want_cfg);
        let skip_head = a.config.tie_word_embeddings;
        let names: Vec<&String> = a
            .tensors
            .keys()
            .filter(|n| !(skip_head && *n == "lm_head.weight"))
            .collect();
        assert_eq!(b.tensors.keys().collect::<Vec<_>>(), names);
        for (name, t) in &b.tensors {
            let src = &a.tensors[name];
            assert_eq!(t.shape, src.shape, "{name}");
            assert_eq!(t.type_label(), dtype.safetensors_name(), "{name}");
            let want: Vec<f32> = src.to_f32().iter().map(|&x| round(x, dtype)).collect();
            assert_eq!(t.to_f32(), want, "{name}");
        }
        let (ta, tb) = (&a.tokenizer, &b.tokenizer);
        assert_eq!(tb.bos_token_id, ta.bos_token_id);
        assert_eq!(tb.eos_token_ids, ta.eos_token_ids);
        assert_eq!(tb.add_bos, ta.add_bos);
        assert_eq!(tb.chat_template, ta.chat_template);
        assert_eq!(
            (&tb.bos_token, &tb.eos_token),
            (&ta.bos_token, &ta.eos_token)
        );
        for text in ["hello world", "the cat sat on the mat"] {
            assert_eq!(
                tb.encode(text, true).expect("enc"),
                ta.encode(text, true).expect("enc")
            );
        }
    }

    #[test]
    fn round_trip_f16_and_bf16() {
        let (tmp, m) = tiny();
        for dtype in [OutDtype::F16, OutDtype::BF16] {
            let out = tmp.path().join(format!("out-{dtype:?}"));
            let mut calls = vec![];
            write_hf_folder(&m, &OutputSpec::folder(&out), dtype, &mut |d, t| {
                calls.push((d, t));
                true
            })
            .expect("convert");
            let total = m.tensors.values().map(|t| t.numel() * 2).sum::<usize>();
            assert_eq!(calls.first(), Some(&(0, total)));
            assert_eq!(calls.last(), Some(&(total, total)));
            assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
            let back = hf::open(&out).expect("reopen");
            assert_same_model(&m, &back, dtype);
            assert!(out.join("model.safetensors").is_file());
            assert!(!out.join("model.safetensors.index.json").exists());
            // Nothing else is left next to the output.
            let siblings: Vec<_> = std::fs::read_dir(tmp.path())
                .expect("ls")
                .map(|e| e.expect("e").file_name())
                .collect();
            assert!(
                siblings
                    .iter()
                    .all(|n| !n.to_string_lossy().contains(".partial-")),
                "{siblings:?}"
            );
        }
    }

    #[test]
    fn shards_when_over_the_limit_and_skips_tied_head() {
        let (tmp, mut m) = tiny();
        m.config.tie_word_embeddings = true;
        let out = tmp.path().join("sharded");
        write_hf_folder_with(&m, &out, OutDtype::F16, 600, &mut |_, _| true).expect("convert");
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("json");
        let files: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .expect("map")
            .values()
            .map(|v| v.as_str().expect("str"))
            .collect();
        assert!(files.len() > 2, "{files:?}");
        let n = files.len();
        assert!(files.contains(format!("model-00001-of-{n:05}.safetensors").as_str()));
        assert!(index["weight_map"].get("lm_head.weight").is_none());
        let back = hf::open(&out).expect("reopen");
        assert!(!back.tensors.contains_key("lm_head.weight"));
        assert_same_model(&m, &back, OutDtype::F16);
        let total: u64 = m
            .tensors
            .values()
            .filter(|t| t.name != "lm_head.weight")
            .map(|t| t.numel() as u64 * 2)
            .sum();
        assert_eq!(index["metadata"]["total_size"], json!(total));
    }

    #[test]
    fn cancel_and_refusals_leave_nothing_behind() {
        let (tmp, m) = tiny();
        let out = tmp.path().join("cancelled");
        let mut n = 0;
        let r = write_hf_folder(&m, &OutputSpec::folder(&out), OutDtype::F16, &mut |_, _| {
            n += 1;
            n < 3
        });
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(tmp.path()).expect("ls").count(),
            1,
            "only the source folder remains"
        );
        // A non-empty folder is refused; an empty one is filled.
        let busy = tmp.path().join("busy");
        std::fs::create_dir(&busy).expect("mkdir");
        std::fs::write(busy.join("keep.txt"), "x").expect("w");
        let e = write_hf_folder(
            &m,
            &OutputSpec::folder(&busy),
            OutDtype::F16,
            &mut |_, _| true,
        )
        .expect_err("refuse");
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(busy.join("keep.txt").exists());
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        write_hf_folder(
            &m,
            &OutputSpec::folder(&empty),
            OutDtype::BF16,
            &mut |_, _| true,
        )
        .expect("convert into empty");
        assert!(empty.join("config.json").is_file());
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").expect("w");
        assert!(write_hf_folder(
            &m,
            &OutputSpec::folder(&file),
            OutDtype::F16,
            &mut |_, _| true
        )
        .is_err());
    }

    /// A GGUF-like source: a Q8_0 tensor, rows stored in llama.cpp's interleaved order, RoPE factors
    /// instead of rope_scaling, a tokenizer whose post-processor does not add the BOS it asks for.
    #[test]
    fn quantised_gguf_like_source() {
        let (tmp, base) = tiny();
        let mut cfg = base.config.clone();
        let scaled = cfg.rope_inv_freq();
        cfg.rope_scaling = None;
        let plain = cfg.rope_inv_freq();
        cfg.rope_freq_factors = Some(plain.iter().zip(&scaled).map(|(p, s)| p / s).collect());
        cfg.tie_word_embeddings = true;

        let mut tensors = base.tensors.clone();
        tensors.remove("lm_head.weight");
        let mut q8 = Vec::new();
        for r in 0..8 {
            q8.extend_from_slice(&half::f16::from_f32(0.01 * (r + 1) as f32).to_le_bytes());
            q8.extend((0..32).map(|c| ((c * 7 + r * 3) % 255 - 127) as i8 as u8));
        }
        let t = TensorRef::new(
            "model.extra_q8.weight",
            vec![8, 32],
            GgmlType::Q8_0,
            Bytes::owned(q8),
        )
        .expect("q8");
        tensors.insert(t.name.clone(), t);
        let mut q = TensorRef::from_f32(
            "model.layers.0.self_attn.q_proj.weight",
            vec![8, 8],
            &values(64, 9),
        )
        .expect("q");
        q.rope_interleaved_heads = Some(2);
        tensors.insert(q.name.clone(), q);

        let inner: tokenizers::Tokenizer = test_tokenizer_json(false).parse().expect("tok");
        let tokenizer = TextTokenizer {
            inner,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            add_bos: true,
            chat_template: None,
            chat_template_origin: None,
            bos_token: None,
            eos_token: None,
        };
        let src = SourceModel {
            path: tmp.path().join("fake.gguf"),
            format: SourceFormat::Gguf,
            name: "fake".into(),
            config: cfg,
            tensors,
            tokenizer,
            file_size_bytes: 0,
            gguf_metadata: None,
            calibration_dataset: None,
        };
        let out = tmp.path().join("from-gguf");
        write_hf_folder(
            &src,
            &OutputSpec::folder(&out),
            OutDtype::F16,
            &mut |_, _| true,
        )
        .expect("convert");
        let back = hf::open(&out).expect("reopen");
        let mut src_named = src;
        src_named.tokenizer.bos_token = Some("<s>".into());
        src_named.tokenizer.eos_token = Some("</s>".into());
        assert_same_model(&src_named, &back, OutDtype::F16);
        assert!(back.config.rope_scaling.is_some());
        assert!(back.tokenizer.add_bos, "the BOS post-processor was added");
    }

    /// The real SmolLM2 GGUF (Q4_1 and Q6_K/F32 tensors, rebuilt tokenizer) written as a BF16 folder
    /// and read back: same config, every tensor equal to the dequantised source after rounding, same
    /// tokenizer behaviour and chat template. With `QS_HF_CHECK_DIR` set, the folder is kept there as
    /// `smollm2-out` for a check with Python transformers.
    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn smollm2_gguf_round_trips_through_a_hf_folder() {
        let src = SourceModel::open(&crate::testing::smollm2_gguf()).expect("open SmolLM2");
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = match std::env::var_os("QS_HF_CHECK_DIR") {
            Some(d) => std::path::PathBuf::from(d).join("smollm2-out"),
            None => tmp.path().join("smollm2-out"),
        };
        if out.exists() {
            std::fs::remove_dir_all(&out).expect("clean");
        }
        let mut last = (0, 0);
        write_hf_folder(
            &src,
            &OutputSpec::folder(&out),
            OutDtype::BF16,
            &mut |d, t| {
                last = (d, t);
                true
            },
        )
        .expect("convert");
        assert_eq!(last.0, last.1);
        let back = hf::open(&out).expect("reopen");
        assert_same_model(&src, &back, OutDtype::BF16);
        let msgs = [
            crate::model::ChatMessage::new("user", "What is the capital of France?"),
            crate::model::ChatMessage::new("assistant", "Paris."),
            crate::model::ChatMessage::new("user", "And of Italy?"),
        ];
        assert_eq!(
            back.tokenizer.render_chat(&msgs, true).expect("render"),
            src.tokenizer.render_chat(&msgs, true).expect("render")
        );
        for text in [
            "Hello, world! 123",
            "  leading spaces\nand été ünïcødé",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            assert_eq!(
                back.tokenizer.encode(text, true).expect("enc"),
                src.tokenizer.encode(text, true).expect("enc")
            );
        }
    }
}
