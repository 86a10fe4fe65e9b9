//! Hugging Face folders: `config.json`, safetensors weights (`model.safetensors`, or shards named by
//! `model.safetensors.index.json`), and the tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`, `generation_config.json`).
//!
//! Every file is treated as hostile: sizes and offsets are checked against the file before anything is
//! sliced, and every failure is an error naming the file, never a panic. Weights are memory-mapped and each
//! tensor is a zero-copy [`TensorRef`] on its bytes, under its own (unchanged) name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Arch, ModelConfig, RopeScaling, SourceFormat, SourceModel, TextTokenizer};
use crate::codecs::GgmlType;
use crate::tensor::{Backing, Bytes, GptqLinear, Grouped, TensorRef};
use crate::{Error, Result};

/// Largest safetensors header we read (the JSON before the data).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Largest JSON side file (config, tokenizer config, index) we read.
const MAX_SIDE_FILE_BYTES: u64 = 64 << 20;
/// Largest tokenizer.json we read.
const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

const MAX_LAYERS: usize = 1_000_000;
const MAX_HIDDEN: usize = 1 << 20;
const MAX_INTERMEDIATE: usize = 1 << 22;
const MAX_HEADS: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 24;
const MAX_CONTEXT: usize = u32::MAX as usize;

/// The error for a folder without `config.json`: what a model folder holds, and what in this folder (a
/// `.gguf` file, a model folder one level down) could be opened instead.
fn not_a_model_folder(dir: &Path) -> Error {
    let mut ggufs = Vec::new();
    let mut folders = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten().take(10_000) {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.to_lowercase().ends_with(".gguf") && p.is_file() {
                ggufs.push(name);
            } else if p.is_dir() && p.join("config.json").is_file() {
                folders.push(name);
            }
        }
    }
    ggufs.sort();
    folders.sort();
    let list = |v: &[String]| {
        let mut s = v.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
        if v.len() > 3 {
            s.push_str(&format!(" and {} more", v.len() - 3));
        }
        s
    };
    let what_to_do = if !ggufs.is_empty() {
        format!("it holds GGUF files ({}): open one of them", list(&ggufs))
    } else if !folders.is_empty() {
        format!("open the model folder inside it ({})", list(&folders))
    } else {
        "open the folder that holds the model's config.json, or a .gguf file".to_owned()
    };
    Error::Invalid(format!(
        "{}: not a model folder. A Hugging Face model folder holds config.json, tokenizer.json and \
         *.safetensors; this one has no config.json. To fix: {what_to_do}.",
        dir.display()
    ))
}

/// Open the Hugging Face model folder `dir`.
pub fn open(dir: &Path) -> Result<SourceModel> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(not_a_model_folder(dir));
    }
    let config_json = read_json(&config_path, "config")?;
    let mut config = parse_config(&config_path, &config_json)?;

    let (mut tensors, mut raw, file_size_bytes) = load_weights(dir)?;
    quantized_linears(&config_path, &config_json, &config, &mut tensors, &mut raw)?;
    if !config.tie_word_embeddings && !tensors.contains_key("lm_head.weight") {
        // Checkpoints that share the embedding often leave lm_head out without saying so.
        config.tie_word_embeddings = true;
    }

    let tokenizer = load_tokenizer(dir, &config_json, config.vocab_size)?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_string());
    Ok(SourceModel {
        path: dir.to_path_buf(),
        format: SourceFormat::HfFolder,
        name,
        config,
        tensors,
        tokenizer,
        file_size_bytes,
        gguf_metadata: None,
        calibration_dataset: config_json
            .get("quantization_config")
            .and_then(|q| q.get("meta"))
            .and_then(|m| m.get("calibration_dataset"))
            .and_then(Value::as_str)
            .map(|s| s.chars().take(1024).collect()),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Small file helpers
// ---------------------------------------------------------------------------------------------------------

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    crate::bounded::read_capped(path, cap, "file")
}

/// A JSON object from `path` (which must exist).
fn read_json(path: &Path, what: &'static str) -> Result<Map<String, Value>> {
    let bytes = read_capped(path, MAX_SIDE_FILE_BYTES)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::malformed(path, what, "not a JSON object")),
        Err(e) => Err(Error::malformed(path, what, format!("not valid JSON: {e}"))),
    }
}

/// Like [`read_json`], `None` when the file does not exist.
fn read_json_opt(path: &Path, what: &'static str) -> Result<Option<Map<String, Value>>> {
    if path.exists() {
        read_json(path, what).map(Some)
    } else {
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------------------

/// Typed reads of config.json keys, with errors that name the file and the key.
struct Keys<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Keys<'_> {
    fn err(&self, detail: String) -> Error {
        Error::malformed(self.path, "config", detail)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be a non-negative integer, got {v}"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("{key} is missing")))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be a finite number, got {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("{key} must be true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
}

fn check_range(keys: &Keys<'_>, key: &str, v: usize, max: usize) -> Result<usize> {
    if v == 0 {
        return Err(keys.err(format!("{key} is 0")));
    }
    if v > max {
        return Err(keys.err(format!("{key} = {v} is larger than the limit of {max}")));
    }
    Ok(v)
}

/// The architecture named by `architectures[0]`, else by `model_type`.
fn parse_arch(keys: &Keys<'_>) -> Result<Arch> {
    const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
    let from_class = |c: &str| match c {
        "LlamaForCausalLM" => Some(Arch::Llama),
        "MistralForCausalLM" => Some(Arch::Mistral),
        "Qwen2ForCausalLM" => Some(Arch::Qwen2),
        _ => None,
    };
    if let Some(first) = keys
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        let class = first
            .as_str()
            .ok_or_else(|| keys.err(format!("architectures[0] must be a string, got {first}")))?;
        return from_class(class).ok_or_else(|| {
            Error::unsupported(
                keys.path,
                format!("architecture {class} is not supported (supported: {SUPPORTED})"),
            )
        });
    }
    match keys.str_opt("model_type") {
        Some("llama") => Ok(Arch::Llama),
        Some("mistral") => Ok(Arch::Mistral),
        Some("qwen2") => Ok(Arch::Qwen2),
        Some(other) => Err(Error::unsupported(
            keys.path,
            format!("model_type {other} is not supported (supported: llama, mistral, qwen2)"),
        )),
        None => Err(keys.err("neither architectures nor model_type is given".into())),
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
fn parse_rope_scaling(keys: &Keys<'_>) -> Result<Option<RopeScaling>> {
    let Some(v) = keys
        .get("rope_scaling")
        .or_else(|| keys.get("rope_parameters"))
    else {
        return Ok(None);
    };
    let obj = v
        .as_object()
        .ok_or_else(|| keys.err(format!("rope_scaling must be an object, got {v}")))?;
    let sub = Keys {
        path: keys.path,
        obj,
    };
    let kind = sub
        .str_opt("rope_type")
        .or_else(|| sub.str_opt("type"))
        .unwrap_or("default");
    let positive = |key: &str| -> Result<f32> {
        let f = sub
            .f64_opt(key)?
            .ok_or_else(|| keys.err(format!("rope_scaling ({kind}) lacks {key}")))?;
        if f <= 0.0 || f > 1e9 {
            return Err(keys.err(format!("rope_scaling {key} = {f} must be positive")));
        }
        Ok(f as f32)
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: positive("factor")?,
        })),
        "llama3" => {
            let factor = positive("factor")?;
            let low_freq_factor = positive("low_freq_factor")?;
            let high_freq_factor = positive("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(keys.err(format!(
                    "rope_scaling high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"
                )));
            }
            let original = sub
                .usize_opt("original_max_position_embeddings")?
                .ok_or_else(|| {
                    keys.err("rope_scaling (llama3) lacks original_max_position_embeddings".into())
                })?;
            let original = check_range(
                &sub,
                "original_max_position_embeddings",
                original,
                MAX_CONTEXT,
            )?;
            Ok(Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            }))
        }
        other => Err(Error::unsupported(
            keys.path,
            format!(
                "rope scaling type {other} is not supported (supported: default, linear, llama3)"
            ),
        )),
    }
}

/// The hyper-parameters of config.json (`path` is only used in messages).
pub(crate) fn parse_config(path: &Path, obj: &Map<String, Value>) -> Result<ModelConfig> {
    let keys = Keys { path, obj };
    let arch = parse_arch(&keys)?;

    let hidden_size = check_range(
        &keys,
        "hidden_size",
        keys.usize_req("hidden_size")?,
        MAX_HIDDEN,
    )?;
    let intermediate_size = check_range(
        &keys,
        "intermediate_size",
        keys.usize_req("intermediate_size")?,
        MAX_INTERMEDIATE,
    )?;
    let num_layers = check_range(
        &keys,
        "num_hidden_layers",
        keys.usize_req("num_hidden_layers")?,
        MAX_LAYERS,
    )?;
    let num_heads = check_range(
        &keys,
        "num_attention_heads",
        keys.usize_req("num_attention_heads")?,
        MAX_HEADS,
    )?;
    let num_kv_heads = check_range(
        &keys,
        "num_key_value_heads",
        keys.usize_opt("num_key_value_heads")?.unwrap_or(num_heads),
        MAX_HEADS,
    )?;
    if num_kv_heads > num_heads || num_heads % num_kv_heads != 0 {
        return Err(keys.err(format!(
            "num_key_value_heads ({num_kv_heads}) must divide num_attention_heads ({num_heads})"
        )));
    }
    let head_dim = match keys.usize_opt("head_dim")? {
        Some(d) => check_range(&keys, "head_dim", d, MAX_HIDDEN)?,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(keys.err(format!(
                    "num_attention_heads ({num_heads}) does not divide hidden_size ({hidden_size}) and head_dim is not given"
                )));
            }
            hidden_size / num_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(keys.err(format!(
            "head_dim ({head_dim}) must be even for rotary embeddings"
        )));
    }
    let vocab_size = check_range(
        &keys,
        "vocab_size",
        keys.usize_req("vocab_size")?,
        MAX_VOCAB,
    )?;

    let rms_norm_eps = keys.f64_opt("rms_norm_eps")?.unwrap_or(1e-6);
    if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
        return Err(keys.err(format!("rms_norm_eps = {rms_norm_eps} must be in (0, 1)")));
    }
    let rope_params = keys.get("rope_parameters").and_then(Value::as_object);
    let rope_theta = match keys.f64_opt("rope_theta")? {
        Some(t) => t,
        None => match rope_params {
            Some(obj) => Keys { path, obj }
                .f64_opt("rope_theta")?
                .unwrap_or(10_000.0),
            None => 10_000.0,
        },
    };
    if !(rope_theta > 1.0 && rope_theta < 1e12) {
        return Err(keys.err(format!("rope_theta = {rope_theta} must be in (1, 1e12)")));
    }
    let rope_scaling = parse_rope_scaling(&keys)?;

    let default_context = match arch {
        Arch::Llama => 2048,
        Arch::Mistral => 4096 * 32,
        Arch::Qwen2 => 32_768,
    };
    let max_position_embeddings = check_range(
        &keys,
        "max_position_embeddings",
        keys.usize_opt("max_position_embeddings")?
            .unwrap_or(default_context),
        MAX_CONTEXT,
    )?;
    let tie_word_embeddings = keys.bool_opt("tie_word_embeddings")?.unwrap_or(false);
    let attention_bias = match arch {
        Arch::Qwen2 => true,
        Arch::Llama => keys.bool_opt("attention_bias")?.unwrap_or(false),
        Arch::Mistral => false,
    };
    let torch_dtype = keys
        .str_opt("torch_dtype")
        .or_else(|| keys.str_opt("dtype"))
        .map(str::to_string);

    Ok(ModelConfig {
        arch,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: rms_norm_eps as f32,
        rope_theta: rope_theta as f32,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias,
        torch_dtype,
        rope_freq_factors: None,
    })
}

// ---------------------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------------------

/// Every tensor of the folder's weight files, and the files' total size.
/// A folder's weights: float tensors by name, the integer tensors of packed formats by name, total size.
type Weights = (
    BTreeMap<String, TensorRef>,
    BTreeMap<String, RawTensor>,
    u64,
);

fn load_weights(dir: &Path) -> Result<Weights> {
    let single = dir.join("model.safetensors");
    let index_path = dir.join("model.safetensors.index.json");
    if single.is_file() {
        let (list, raw_list, size) = read_safetensors_all(&single)?;
        let tensors = list.into_iter().map(|t| (t.name.clone(), t)).collect();
        let raw = raw_list.into_iter().map(|t| (t.name.clone(), t)).collect();
        return Ok((tensors, raw, size));
    }
    if index_path.is_file() {
        return load_sharded(dir, &index_path);
    }
    // No `model.safetensors` and no index: every `*.safetensors` of the folder, as ExLlamaV2's loader reads
    // its `output.safetensors` / `output-0000i-of-0000N.safetensors`.
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if !files.is_empty() {
        files.sort();
        let (mut tensors, mut raw, mut size) = (BTreeMap::new(), BTreeMap::new(), 0u64);
        for f in &files {
            let (list, raw_list, n) = read_safetensors_all(f)?;
            size += n;
            for t in list {
                if tensors.contains_key(&t.name) || raw.contains_key(&t.name) {
                    return Err(Error::malformed(
                        f,
                        "safetensors",
                        format!("tensor {} is in two files", t.name),
                    ));
                }
                tensors.insert(t.name.clone(), t);
            }
            for t in raw_list {
                if tensors.contains_key(&t.name) || raw.contains_key(&t.name) {
                    return Err(Error::malformed(
                        f,
                        "safetensors",
                        format!("tensor {} is in two files", t.name),
                    ));
                }
                raw.insert(t.name.clone(), t);
            }
        }
        return Ok((tensors, raw, size));
    }
    if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        return Err(Error::unsupported(
            dir,
            "PyTorch .bin weights are not supported; re-save the model with safetensors \
             (model.save_pretrained(path, safe_serialization=True))",
        ));
    }
    Err(Error::io(
        &single,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors, model.safetensors.index.json or other *.safetensors in this folder",
        ),
    ))
}

fn load_sharded(dir: &Path, index_path: &Path) -> Result<Weights> {
    let index = read_json(index_path, "safetensors index")?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Error::malformed(
                index_path,
                "safetensors index",
                "weight_map is missing or not an object",
            )
        })?;
    let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::malformed(
                index_path,
                "safetensors index",
                format!("weight_map[{tensor}] is not a file name"),
            )
        })?;
        let rel = Path::new(file);
        let plain = !file.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(Error::malformed(
                index_path,
                "safetensors index",
                format!("shard name {file:?} must be a relative path inside the folder"),
            ));
        }
        wanted.entry(file).or_default().push(tensor);
    }
    if wanted.is_empty() {
        return Err(Error::malformed(
            index_path,
            "safetensors index",
            "weight_map is empty",
        ));
    }
    let mut tensors = BTreeMap::new();
    let mut raw = BTreeMap::new();
    let mut total = 0u64;
    for (file, names) in wanted {
        let shard = dir.join(file);
        if !shard.is_file() {
            return Err(Error::malformed(
                index_path,
                "safetensors index",
                format!("shard {file} (holding {}) is missing", names[0]),
            ));
        }
        let (list, raw_list, size) = read_safetensors_all(&shard)?;
        total += size;
        let have: BTreeSet<&str> = list
            .iter()
            .map(|t| t.name.as_str())
            .chain(raw_list.iter().map(|t| t.name.as_str()))
            .collect();
        if let Some(missing) = names.iter().find(|n| !have.contains(**n)) {
            return Err(Error::malformed(
                index_path,
                "safetensors index",
                format!("tensor {missing} is listed in {file} but that shard does not hold it"),
            ));
        }
        let twice = |name: &str| {
            Error::malformed(
                &shard,
                "safetensors",
                format!("tensor {name} is stored in two shards"),
            )
        };
        for t in list {
            if tensors.contains_key(&t.name) || raw.contains_key(&t.name) {
                return Err(twice(&t.name));
            }
            tensors.insert(t.name.clone(), t);
        }
        for t in raw_list {
            if tensors.contains_key(&t.name) || raw.contains_key(&t.name) {
                return Err(twice(&t.name));
            }
            raw.insert(t.name.clone(), t);
        }
    }
    Ok((tensors, raw, total))
}

/// Names of the int32 tensors of a GPTQ linear.
const GPTQ_INT_SUFFIXES: [&str; 3] = [".qweight", ".qzeros", ".g_idx"];

/// Replace each GPTQ linear's `qweight`/`qzeros`/`scales`/`g_idx` with one packed `P.weight` tensor, as
/// `quantization_config` in config.json describes them (v1 `"gptq"` checkpoints).
/// Regroup a quantized checkpoint's linears as its `quantization_config.quant_method` says (GPTQ, AWQ,
/// bitsandbytes 4-bit, HQQ); every integer tensor must end up in a layer.
fn quantized_linears(
    config_path: &Path,
    cfg: &Map<String, Value>,
    model: &ModelConfig,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    let qc = cfg.get("quantization_config").and_then(Value::as_object);
    let method = qc
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str);
    match (method, qc) {
        (Some("gptq"), Some(qc)) => gptq_linears(config_path, qc, tensors, raw)?,
        (Some("awq"), Some(qc)) => awq_linears(config_path, qc, tensors, raw)?,
        (Some("bitsandbytes"), _) => bnb4_linears(config_path, tensors, raw)?,
        (Some("hqq"), _) => hqq_linears(config_path, tensors, raw)?,
        (Some("compressed-tensors"), Some(qc)) => ct_linears(config_path, qc, tensors, raw)?,
        (Some("exl2"), _) => exl2_linears(config_path, model, tensors, raw)?,
        _ => {}
    }
    match raw.values().next() {
        Some(r) => Err(Error::unsupported(
            &r.file,
            format!(
                "tensor {} ({} {:?}) belongs to no quantized layer: quantization_config.quant_method is \
                 {method:?}, and GPTQ, AWQ, compressed-tensors pack-quantized, bitsandbytes 4-bit, HQQ and \
                 EXL2 checkpoints are read",
                r.name, r.dtype, r.shape
            ),
        )),
        None => Ok(()),
    }
}

fn gptq_linears(
    config_path: &Path,
    qc: &Map<String, Value>,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    if !raw.keys().any(|k| k.ends_with(".qweight")) {
        // Nothing GPTQ-packed: whatever integer tensors there are, the caller reports.
        return Ok(());
    }
    let bad = |d: String| Error::unsupported(config_path, d);
    let format = qc
        .get("checkpoint_format")
        .or_else(|| qc.get("format"))
        .and_then(Value::as_str)
        .unwrap_or("gptq");
    if format != "gptq" {
        return Err(bad(format!(
            "GPTQ checkpoint_format {format:?}: only the v1 \"gptq\" layout is read (GPTQModel's \"gptq_v2\" \
             stores zero points without the −1)"
        )));
    }
    let bits = qc
        .get("bits")
        .and_then(Value::as_u64)
        .filter(|b| crate::codecs::gptq::GPTQ_BITS.contains(&(*b as u32)))
        .ok_or_else(|| bad("quantization_config.bits must be 2, 3, 4 or 8".into()))?
        as u32;
    let prefixes: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".qweight").map(str::to_owned))
        .collect();
    for p in prefixes {
        let mut take_raw = |suffix: &str| {
            let t = raw
                .remove(&format!("{p}.{suffix}"))
                .ok_or_else(|| bad(format!("GPTQ layer {p} has no {suffix}")))?;
            if t.dtype != "I32" {
                return Err(bad(format!(
                    "GPTQ layer {p}: {suffix} must be I32, not {}",
                    t.dtype
                )));
            }
            Ok(t)
        };
        let (qweight, qzeros, g_idx) = (
            take_raw("qweight")?,
            take_raw("qzeros")?,
            take_raw("g_idx")?,
        );
        let scales = tensors
            .remove(&format!("{p}.scales"))
            .ok_or_else(|| bad(format!("GPTQ layer {p} has no scales")))?;
        if scales.block_type() != Some(GgmlType::F16) || scales.shape.len() != 2 {
            return Err(bad(format!(
                "GPTQ layer {p}: scales must be a 2-D F16 tensor"
            )));
        }
        let scales_bytes = scales
            .block_bytes()
            .cloned()
            .ok_or_else(|| bad(format!("GPTQ layer {p}: scales is not a plain tensor")))?;
        let t = TensorRef::grouped(
            format!("{p}.weight"),
            Grouped::Gptq(GptqLinear {
                bits,
                in_features: g_idx.numel(),
                out_features: scales.shape[1],
                groups: scales.shape[0],
                qweight: qweight.data,
                qzeros: qzeros.data,
                scales: scales_bytes,
                g_idx: g_idx.data,
            }),
        )
        .map_err(|e| bad(e.to_string()))?;
        tensors.insert(t.name.clone(), t);
    }
    if let Some(k) = raw
        .keys()
        .find(|k| GPTQ_INT_SUFFIXES.iter().any(|s| k.ends_with(s)))
    {
        return Err(bad(format!("tensor {k} belongs to no complete GPTQ layer")));
    }
    Ok(())
}

/// The output width the model expects of the linear `prefix` (`model.layers.3.mlp.down_proj`, `lm_head`).
fn expected_out_features(c: &ModelConfig, prefix: &str) -> Option<usize> {
    let last = prefix.rsplit('.').next()?;
    Some(match last {
        "q_proj" => c.num_heads * c.head_dim,
        "k_proj" | "v_proj" => c.num_kv_heads * c.head_dim,
        "o_proj" | "down_proj" => c.hidden_size,
        "gate_proj" | "up_proj" => c.intermediate_size,
        "lm_head" => c.vocab_size,
        _ => return None,
    })
}

/// Regroup ExLlamaV2 EXL2 linears (`P.q_weight` / `P.q_scale` int32, `P.q_scale_max` fp16, `P.q_groups`
/// int16, `P.q_invperm` int32/int64; `exl2.md` §1.2) into [`Grouped::Exl2`] tensors. Output widths padded to
/// 32 are cut back to the model's.
fn exl2_linears(
    config_path: &Path,
    model: &ModelConfig,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    use crate::tensor::Exl2Linear;
    let bad = |d: String| Error::unsupported(config_path, d);
    let prefixes: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".q_weight").map(str::to_owned))
        .collect();
    for p in prefixes {
        let mut take = |suffix: &str, dtypes: &[&str], dims: usize| {
            let t = raw
                .remove(&format!("{p}.{suffix}"))
                .ok_or_else(|| bad(format!("EXL2 layer {p} has no {suffix}")))?;
            if !dtypes.contains(&t.dtype) || t.shape.len() != dims {
                return Err(bad(format!(
                    "EXL2 layer {p}: {suffix} is {} {:?}, a {dims}-D {} tensor expected",
                    t.dtype,
                    t.shape,
                    dtypes.join("/")
                )));
            }
            Ok(t)
        };
        let q_weight = take("q_weight", &["I32"], 2)?;
        let q_scale = take("q_scale", &["I32"], 2)?;
        let q_groups = take("q_groups", &["I16"], 1)?;
        let q_invperm = take("q_invperm", &["I32", "I64", "I16"], 1)?;
        // A stored q_perm is ignored by ExLlamaV2 (rebuilt from q_invperm); so here.
        raw.remove(&format!("{p}.q_perm"));
        let q_scale_max = tensors
            .remove(&format!("{p}.q_scale_max"))
            .ok_or_else(|| bad(format!("EXL2 layer {p} has no q_scale_max")))?;
        let scale_max = q_scale_max
            .block_bytes()
            .filter(|_| {
                q_scale_max.block_type() == Some(GgmlType::F16) && q_scale_max.shape.len() == 1
            })
            .cloned()
            .ok_or_else(|| {
                bad(format!(
                    "EXL2 layer {p}: q_scale_max must be a 1-D F16 tensor"
                ))
            })?;
        let groups: Vec<i16> = q_groups
            .data
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        let invperm: Vec<i64> = match q_invperm.dtype {
            "I64" => q_invperm
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect(),
            "I16" => q_invperm
                .data
                .chunks_exact(2)
                .map(|b| i64::from(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            _ => q_invperm
                .data
                .chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
        };
        let (layout, perm) = crate::codecs::exl2::exl2_layout(&groups, q_weight.shape[0], &invperm)
            .map_err(|e| bad(format!("layer {p}: {e}")))?;
        let n_pad = q_weight.shape[1];
        if q_scale.shape != [layout.len(), n_pad / 8] {
            return Err(bad(format!(
                "EXL2 layer {p}: q_scale is {:?}, [{}, {}] expected",
                q_scale.shape,
                layout.len(),
                n_pad / 8
            )));
        }
        let out_features = expected_out_features(model, &p).unwrap_or(n_pad);
        let t = TensorRef::grouped(
            format!("{p}.weight"),
            Grouped::Exl2(Exl2Linear {
                in_features: perm.len(),
                out_features,
                n_pad,
                groups: layout,
                perm,
                q_weight: q_weight.data,
                q_scale: q_scale.data,
                q_scale_max: scale_max,
                index_bytes: q_groups.data.len() + q_invperm.data.len(),
            }),
        )
        .map_err(|e| bad(e.to_string()))?;
        tensors.insert(t.name.clone(), t);
        // ExLlamaV2 pads a bias to the padded width too.
        let bias_name = format!("{p}.bias");
        if let Some(b) = tensors.get(&bias_name) {
            if b.shape.len() == 1 && b.shape[0] == n_pad && n_pad != out_features {
                let mut v = vec![0f32; n_pad];
                b.dequant_row(0, &mut v);
                v.truncate(out_features);
                let t = TensorRef::from_f32(bias_name.clone(), vec![out_features], &v)
                    .map_err(|e| bad(e.to_string()))?;
                tensors.insert(bias_name, t);
            }
        }
    }
    if let Some(k) = raw.keys().find(|k| {
        [".q_scale", ".q_groups", ".q_invperm"]
            .iter()
            .any(|s| k.ends_with(s))
    }) {
        return Err(bad(format!("tensor {k} belongs to no complete EXL2 layer")));
    }
    Ok(())
}

/// Regroup AutoAWQ GEMM linears (`P.qweight [in, out/8]`, `P.qzeros [in/gs, out/8]` int32, `P.scales
/// [in/gs, out]` fp16) into [`Grouped::Awq`] tensors.
fn awq_linears(
    config_path: &Path,
    qc: &Map<String, Value>,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    use crate::tensor::AwqLinear;
    let bad = |d: String| Error::unsupported(config_path, d);
    let field = |a: &str, b: &str| qc.get(a).or_else(|| qc.get(b));
    let version = field("version", "format")
        .and_then(Value::as_str)
        .unwrap_or("gemm")
        .to_ascii_lowercase();
    if version != "gemm" {
        return Err(bad(format!(
            "AWQ version {version:?}: only the GEMM layout is read (GEMV and Marlin pack differently)"
        )));
    }
    let bits = field("bits", "w_bit").and_then(Value::as_u64).unwrap_or(4);
    if bits != 4 {
        return Err(bad(format!(
            "AWQ bits {bits}: only 4-bit checkpoints exist in the GEMM layout"
        )));
    }
    if field("zero_point", "zero_point").and_then(Value::as_bool) == Some(false) {
        return Err(bad(
            "AWQ without zero points is not read (GEMM stores them)".into(),
        ));
    }
    let prefixes: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".qweight").map(str::to_owned))
        .collect();
    for p in prefixes {
        let mut take = |suffix: &str| {
            let t = raw
                .remove(&format!("{p}.{suffix}"))
                .ok_or_else(|| bad(format!("AWQ layer {p} has no {suffix}")))?;
            if t.dtype != "I32" || t.shape.len() != 2 {
                return Err(bad(format!(
                    "AWQ layer {p}: {suffix} must be a 2-D I32 tensor"
                )));
            }
            Ok(t)
        };
        let (qweight, qzeros) = (take("qweight")?, take("qzeros")?);
        let scales = tensors
            .remove(&format!("{p}.scales"))
            .ok_or_else(|| bad(format!("AWQ layer {p} has no scales")))?;
        if scales.block_type() != Some(GgmlType::F16) || scales.shape.len() != 2 {
            return Err(bad(format!(
                "AWQ layer {p}: scales must be a 2-D F16 tensor"
            )));
        }
        let (in_f, out_f, groups) = (qweight.shape[0], scales.shape[1], scales.shape[0]);
        if groups == 0 || in_f % groups != 0 {
            return Err(bad(format!(
                "AWQ layer {p}: {groups} groups do not divide {in_f} inputs"
            )));
        }
        let scales_bytes = scales
            .block_bytes()
            .cloned()
            .ok_or_else(|| bad(format!("AWQ layer {p}: scales is not a plain tensor")))?;
        let t = TensorRef::grouped(
            format!("{p}.weight"),
            Grouped::Awq(AwqLinear {
                in_features: in_f,
                out_features: out_f,
                group_size: in_f / groups,
                qweight: qweight.data,
                qzeros: qzeros.data,
                scales: scales_bytes,
            }),
        )
        .map_err(|e| bad(e.to_string()))?;
        tensors.insert(t.name.clone(), t);
    }
    if let Some(k) = raw.keys().find(|k| k.ends_with(".qzeros")) {
        return Err(bad(format!("tensor {k} belongs to no complete AWQ layer")));
    }
    Ok(())
}

/// Regroup compressed-tensors `pack-quantized` linears (`P.weight_packed`, `P.weight_scale`,
/// `P.weight_zero_point`, `P.weight_shape`, `P.weight_g_idx`) into [`Grouped::Ct`] tensors, as the
/// weights scheme of `quantization_config.config_groups` describes them.
fn ct_linears(
    config_path: &Path,
    qc: &Map<String, Value>,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    use crate::codecs::ct::ScaleType;
    use crate::tensor::CtLinear;
    let bad = |d: String| Error::unsupported(config_path, d);
    let format = qc.get("format").and_then(Value::as_str).unwrap_or("dense");
    if !raw.keys().any(|k| k.ends_with(".weight_packed")) {
        if format != "pack-quantized" && raw.values().next().is_some() {
            return Err(bad(format!(
                "compressed-tensors format {format:?}: only \"pack-quantized\" (integer weights packed in \
                 int32) is read"
            )));
        }
        return Ok(());
    }
    if format != "pack-quantized" {
        return Err(bad(format!(
            "compressed-tensors format {format:?} with weight_packed tensors: only \"pack-quantized\" is read"
        )));
    }
    let groups = qc
        .get("config_groups")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("quantization_config has no config_groups".into()))?;
    let mut schemes = groups.values().filter_map(|g| g.get("weights"));
    let w = match (schemes.next(), schemes.next()) {
        (Some(w), None) => w,
        (None, _) => return Err(bad("no config group quantizes weights".into())),
        (Some(_), Some(_)) => {
            return Err(bad(
                "several weight schemes in config_groups (mixed-precision compressed-tensors) are not read"
                    .into(),
            ))
        }
    };
    let get = |k: &str| w.get(k).filter(|v| !v.is_null());
    let ty = get("type").and_then(Value::as_str).unwrap_or("int");
    if ty != "int" {
        return Err(bad(format!(
            "weights type {ty:?}: only integer weights are read"
        )));
    }
    let bits = get("num_bits")
        .and_then(Value::as_u64)
        .filter(|b| (1..=8).contains(b))
        .ok_or_else(|| bad("weights.num_bits must be 1..=8".into()))? as u32;
    let symmetric = get("symmetric").and_then(Value::as_bool).unwrap_or(true);
    let strategy = get("strategy").and_then(Value::as_str).unwrap_or("group");
    let group = match strategy {
        "group" => Some(
            get("group_size")
                .and_then(Value::as_u64)
                .filter(|g| *g > 0)
                .ok_or_else(|| bad("weights.strategy \"group\" needs a group_size".into()))?
                as usize,
        ),
        "channel" => None,
        other => {
            return Err(bad(format!(
                "weights.strategy {other:?}: group and channel strategies are read"
            )))
        }
    };
    let prefixes: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".weight_packed").map(str::to_owned))
        .collect();
    for p in prefixes {
        let take_int = |raw: &mut BTreeMap<String, RawTensor>, suffix: &str, dtype: &str| {
            raw.remove(&format!("{p}.{suffix}"))
                .map(|t| {
                    if t.dtype != dtype {
                        return Err(bad(format!(
                            "{p}.{suffix} must be {dtype}, not {}",
                            t.dtype
                        )));
                    }
                    Ok(t)
                })
                .transpose()
        };
        let packed = take_int(raw, "weight_packed", "I32")?
            .ok_or_else(|| bad(format!("{p} has no weight_packed")))?;
        let shape = take_int(raw, "weight_shape", "I64")?
            .ok_or_else(|| bad(format!("{p} has no weight_shape")))?;
        let zero = take_int(raw, "weight_zero_point", "I32")?;
        let g_idx = take_int(raw, "weight_g_idx", "I32")?;
        if shape.numel() != 2 || packed.shape.len() != 2 {
            return Err(bad(format!(
                "{p}: weight_shape must hold 2 values, weight_packed be 2-D"
            )));
        }
        let dim = |i: usize| {
            let b = &shape.data[8 * i..8 * i + 8];
            let v = i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            usize::try_from(v)
                .ok()
                .filter(|v| *v > 0 && *v <= 1 << 24)
                .ok_or_else(|| bad(format!("{p}: weight_shape holds {v}")))
        };
        let (out_f, in_f) = (dim(0)?, dim(1)?);
        if zero.is_some() == symmetric {
            return Err(bad(format!(
                "{p}: the scheme is {}symmetric but weight_zero_point is {}",
                if symmetric { "" } else { "a" },
                if zero.is_some() { "present" } else { "missing" }
            )));
        }
        let scale = tensors
            .remove(&format!("{p}.weight_scale"))
            .ok_or_else(|| bad(format!("{p} has no weight_scale")))?;
        let scale_type = match scale.block_type() {
            Some(GgmlType::F16) => ScaleType::F16,
            Some(GgmlType::BF16) => ScaleType::BF16,
            Some(GgmlType::F32) => ScaleType::F32,
            _ => return Err(bad(format!("{p}: weight_scale must be F16, BF16 or F32"))),
        };
        let n_groups = scale.shape.last().copied().unwrap_or(0);
        let group_size = group.unwrap_or(in_f);
        if g_idx.is_none() && n_groups != in_f.div_ceil(group_size) {
            return Err(bad(format!(
                "{p}: weight_scale has {n_groups} groups, {} expected for {in_f} inputs in groups of \
                 {group_size}",
                in_f.div_ceil(group_size)
            )));
        }
        let scale_bytes = scale
            .block_bytes()
            .cloned()
            .ok_or_else(|| bad(format!("{p}: weight_scale is not a plain tensor")))?;
        let t = TensorRef::grouped(
            format!("{p}.weight"),
            Grouped::Ct(CtLinear {
                bits,
                in_features: in_f,
                out_features: out_f,
                group_size,
                packed: packed.data,
                scale: scale_bytes,
                scale_type,
                zero_point: zero.map(|z| z.data),
                g_idx: g_idx.map(|g| g.data),
            }),
        )
        .map_err(|e| bad(e.to_string()))?;
        tensors.insert(t.name.clone(), t);
    }
    if let Some(k) = raw.keys().find(|k| k.contains(".weight_")) {
        return Err(bad(format!(
            "tensor {k} belongs to no complete pack-quantized layer"
        )));
    }
    Ok(())
}

/// Regroup bitsandbytes 4-bit linears (`P.weight` codes, `P.weight.absmax`, `P.weight.quant_map`, nested
/// scales, `P.weight.quant_state.bitsandbytes__nf4|fp4`) into [`Grouped::Bnb4`] tensors.
fn bnb4_linears(
    config_path: &Path,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    use crate::codecs::bnb::{Bnb4Dtype, Bnb4Kind};
    use crate::tensor::{Bnb4Linear, Bnb4Nested};
    const STATE: &str = ".weight.quant_state.bitsandbytes__";
    let states: Vec<String> = raw.keys().filter(|k| k.contains(STATE)).cloned().collect();
    let bad = |d: String| Error::unsupported(config_path, d);
    let f32s = |t: &TensorRef, what: &str, p: &str| -> Result<Vec<f32>> {
        if t.block_type() != Some(GgmlType::F32) {
            return Err(bad(format!("bitsandbytes layer {p}: {what} must be F32")));
        }
        Ok(t.to_f32())
    };
    for key in states {
        let Some((p, kind)) = key.split_once(STATE) else {
            continue;
        };
        let p = p.to_owned();
        let kind = Bnb4Kind::parse(kind)
            .ok_or_else(|| bad(format!("{key}: unknown 4-bit type {kind:?} (nf4 or fp4)")))?;
        let state = raw
            .remove(&key)
            .map(|t| t.data)
            .unwrap_or_else(|| Bytes::owned(Vec::new()));
        let state: Value = serde_json::from_slice(&state)
            .map_err(|e| bad(format!("{key}: the quant state is not JSON: {e}")))?;
        let field = |k: &str| state.get(k);
        let usize_of = |k: &str| {
            field(k)
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .filter(|v| *v > 0 && *v <= 1 << 20)
                .ok_or_else(|| bad(format!("{key}: {k} is missing or not a size")))
        };
        let blocksize = usize_of("blocksize")?;
        let shape: Vec<usize> = field("shape")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as usize)
                    .collect()
            })
            .filter(|s: &Vec<usize>| s.len() == 2 && s.iter().all(|&d| d > 0 && d <= 1 << 24))
            .ok_or_else(|| bad(format!("{key}: shape is missing or not [out, in]")))?;
        let dtype = field("dtype")
            .and_then(Value::as_str)
            .and_then(Bnb4Dtype::parse)
            .ok_or_else(|| bad(format!("{key}: dtype must be float32, float16 or bfloat16")))?;
        let codes = raw.remove(&format!("{p}.weight")).ok_or_else(|| {
            bad(format!(
                "bitsandbytes layer {p} has no packed weight (uint8 storage)"
            ))
        })?;
        if codes.dtype != "U8" {
            return Err(bad(format!(
                "bitsandbytes layer {p}: the packed weight is {}; only bnb_4bit_quant_storage uint8 is read",
                codes.dtype
            )));
        }
        let quant_map = tensors
            .remove(&format!("{p}.weight.quant_map"))
            .ok_or_else(|| bad(format!("bitsandbytes layer {p} has no weight.quant_map")))?;
        let levels: [f32; 16] = f32s(&quant_map, "quant_map", &p)?.try_into().map_err(|_| {
            bad(format!(
                "bitsandbytes layer {p}: quant_map must hold 16 values"
            ))
        })?;
        let nested = match field("nested_blocksize") {
            None => None,
            Some(_) => {
                let nb = usize_of("nested_blocksize")?;
                let offset = field("nested_offset")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| bad(format!("{key}: nested_offset is missing")))?
                    as f32;
                let na = tensors
                    .remove(&format!("{p}.weight.nested_absmax"))
                    .ok_or_else(|| {
                        bad(format!(
                            "bitsandbytes layer {p} has no weight.nested_absmax"
                        ))
                    })?;
                let nm = tensors
                    .remove(&format!("{p}.weight.nested_quant_map"))
                    .ok_or_else(|| {
                        bad(format!(
                            "bitsandbytes layer {p} has no weight.nested_quant_map"
                        ))
                    })?;
                let map: [f32; 256] =
                    f32s(&nm, "nested_quant_map", &p)?.try_into().map_err(|_| {
                        bad(format!(
                            "bitsandbytes layer {p}: nested_quant_map must hold 256 values"
                        ))
                    })?;
                Some(Box::new(Bnb4Nested {
                    absmax: f32s(&na, "nested_absmax", &p)?,
                    blocksize: nb,
                    offset,
                    map,
                }))
            }
        };
        let absmax = match &nested {
            Some(_) => {
                let a = raw
                    .remove(&format!("{p}.weight.absmax"))
                    .ok_or_else(|| bad(format!("bitsandbytes layer {p} has no weight.absmax")))?;
                if a.dtype != "U8" {
                    return Err(bad(format!(
                        "bitsandbytes layer {p}: double-quantized absmax must be U8"
                    )));
                }
                a.data
            }
            None => {
                let a = tensors
                    .remove(&format!("{p}.weight.absmax"))
                    .ok_or_else(|| bad(format!("bitsandbytes layer {p} has no weight.absmax")))?;
                if a.block_type() != Some(GgmlType::F32) {
                    return Err(bad(format!("bitsandbytes layer {p}: absmax must be F32")));
                }
                a.block_bytes().cloned().ok_or_else(|| {
                    bad(format!(
                        "bitsandbytes layer {p}: absmax is not a plain tensor"
                    ))
                })?
            }
        };
        let t = TensorRef::grouped(
            format!("{p}.weight"),
            Grouped::Bnb4(Bnb4Linear {
                kind,
                out_features: shape[0],
                in_features: shape[1],
                dtype,
                blocksize,
                levels,
                codes: codes.data,
                absmax,
                nested,
            }),
        )
        .map_err(|e| bad(e.to_string()))?;
        tensors.insert(t.name.clone(), t);
    }
    Ok(())
}

/// Regroup HQQ linears (`P.W_q`, `P.scale`, `P.zero` and hqq's encoded metadata tensors, as transformers'
/// HQQ integration saves them) into [`Grouped::Hqq`] tensors.
fn hqq_linears(
    config_path: &Path,
    tensors: &mut BTreeMap<String, TensorRef>,
    raw: &mut BTreeMap<String, RawTensor>,
) -> Result<()> {
    use crate::codecs::hqq::{HqqDtype, HqqParams};
    use crate::tensor::HqqLinear;
    let prefixes: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_suffix(".W_q").map(str::to_owned))
        .collect();
    let bad = |d: String| Error::unsupported(config_path, d);
    const FLAGS: [&str; 10] = [
        "view_as_float",
        "quant_scale",
        "quant_zero",
        "offload_meta",
        "encoded_state_dict",
        "stores_quant_config",
        "channel_wise",
        "optimize",
        "round_zero",
        "unpack_view_dtype",
    ];
    for p in prefixes {
        let mut take = |k: &str| {
            raw.remove(&format!("{p}.{k}"))
                .ok_or_else(|| bad(format!("HQQ layer {p} has no {k}")))
        };
        let int = |t: &RawTensor, k: &str| -> Result<i64> {
            let b: &[u8] = &t.data;
            match (t.dtype, b.len()) {
                ("I32", 4) => Ok(i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                ("I64", 8) => Ok(i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))),
                _ => Err(bad(format!("HQQ layer {p}: {k} is not an integer scalar"))),
            }
        };
        let text = |t: &RawTensor| String::from_utf8_lossy(&t.data).into_owned();
        let wq = take("W_q")?;
        let nbits = int(&take("nbits")?, "nbits")?;
        let group_size = int(&take("group_size")?, "group_size")?;
        let axis = int(&take("axis")?, "axis")?;
        let shape_t = take("shape")?;
        let packing = text(&take("packing")?);
        let compute = text(&take("compute_dtype")?);
        let flags: Vec<(String, bool)> = FLAGS
            .iter()
            .filter_map(|k| {
                raw.remove(&format!("{p}.{k}"))
                    .map(|t| ((*k).to_owned(), t.data.first() == Some(&1)))
            })
            .collect();
        let flag = |k: &str| flags.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        if flag("quant_scale") == Some(true) || flag("quant_zero") == Some(true) {
            return Err(bad(format!(
                "HQQ layer {p}: quantized scales or zeros are not read"
            )));
        }
        if flag("view_as_float") == Some(true) {
            return Err(bad(format!(
                "HQQ layer {p}: view_as_float packing is not read"
            )));
        }
        if shape_t.dtype != "I64" || shape_t.data.len() != 16 {
            return Err(bad(format!(
                "HQQ layer {p}: shape must be two int64 values"
            )));
        }
        let dim = |i: usize| {
            let b = &shape_t.data[8 * i..8 * i + 8];
            usize::try_from(i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).unwrap_or(0)
        };
        let (out_f, in_f) = (dim(0), dim(1));
        let params = HqqParams {
            nbits: u8::try_from(nbits).map_err(|_| bad(format!("HQQ layer {p}: nbits {nbits}")))?,
            group_size: usize::try_from(group_size)
                .map_err(|_| bad(format!("HQQ layer {p}: group_size {group_size}")))?,
            axis: u8::try_from(axis).map_err(|_| bad(format!("HQQ layer {p}: axis {axis}")))?,
            optimize: flag("optimize").unwrap_or(true),
            round_zero: flag("round_zero").unwrap_or(false),
        };
        if packing != params.packing() {
            return Err(bad(format!(
                "HQQ layer {p}: packing {packing:?} for {}-bit (only 8bit_u8, 4bit_u8, 3bit_32, 2bit_u8, 1bit_u8 are read)",
                params.nbits
            )));
        }
        let dtype = HqqDtype::parse(&compute)
            .ok_or_else(|| bad(format!("HQQ layer {p}: compute_dtype {compute:?}")))?;
        // Scales and zeros in the compute dtype (hqq converts them when it loads).
        let mut side = |k: &str| -> Result<Bytes> {
            let t = tensors
                .remove(&format!("{p}.{k}"))
                .ok_or_else(|| bad(format!("HQQ layer {p} has no {k}")))?;
            let same = matches!(
                (t.block_type(), dtype),
                (Some(GgmlType::F16), HqqDtype::F16)
                    | (Some(GgmlType::BF16), HqqDtype::BF16)
                    | (Some(GgmlType::F32), HqqDtype::F32)
            );
            if same {
                return t
                    .block_bytes()
                    .cloned()
                    .ok_or_else(|| bad(format!("HQQ layer {p}: {k} is not a plain tensor")));
            }
            let v = t.to_f32();
            Ok(Bytes::owned(match dtype {
                HqqDtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                HqqDtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                HqqDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }))
        };
        let (scale, zero) = (side("scale")?, side("zero")?);
        let t = TensorRef::grouped(
            format!("{p}.weight"),
            Grouped::Hqq(HqqLinear {
                params,
                out_features: out_f,
                in_features: in_f,
                dtype,
                packed: wq.data,
                scale,
                zero,
            }),
        )
        .map_err(|e| bad(e.to_string()))?;
        tensors.insert(t.name.clone(), t);
    }
    Ok(())
}

/// The ggml type (`None` for an integer tensor, kept raw for a packed format's reader) and element size of
/// a safetensors dtype we read.
fn safetensors_dtype(path: &Path, name: &str, dtype: &str) -> Result<(Option<GgmlType>, usize)> {
    match dtype {
        "F32" => Ok((Some(GgmlType::F32), 4)),
        "F16" => Ok((Some(GgmlType::F16), 2)),
        "BF16" => Ok((Some(GgmlType::BF16), 2)),
        "I64" | "U64" => Ok((None, 8)),
        "I32" | "U32" => Ok((None, 4)),
        "I16" | "U16" => Ok((None, 2)),
        "I8" | "U8" | "BOOL" => Ok((None, 1)),
        other => Err(Error::unsupported(
            path,
            format!(
                "tensor {name} has dtype {other}; only F32, F16, BF16 and the integer types of packed \
                 formats are read"
            ),
        )),
    }
}

fn raw_dtype_name(dtype: &str) -> &'static str {
    const NAMES: [&str; 9] = ["I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL"];
    NAMES.iter().find(|n| **n == dtype).copied().unwrap_or("?")
}

/// Map the safetensors file at `path` and check every tensor of its header against the file.
#[cfg(test)]
pub(crate) fn read_safetensors(path: &Path) -> Result<(Vec<TensorRef>, u64)> {
    let (tensors, raw, size) = read_safetensors_all(path)?;
    if let Some(r) = raw.first() {
        return Err(Error::unsupported(
            path,
            format!(
                "tensor {} has dtype {}; only F32, F16 and BF16 tensors are read here",
                r.name, r.dtype
            ),
        ));
    }
    Ok((tensors, size))
}

/// An integer tensor of a packed format (codes, zero points, indices, encoded metadata), as stored: the
/// format's reader regroups it into a [`Grouped`] linear.
#[derive(Debug)]
pub(crate) struct RawTensor {
    pub name: String,
    /// The safetensors dtype (`"I32"`, `"U8"`, `"I64"`, …).
    pub dtype: &'static str,
    /// The file holding it (for errors).
    pub file: std::path::PathBuf,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Map the safetensors file at `path`: its float tensors, its integer tensors, and its size.
pub(crate) fn read_safetensors_all(path: &Path) -> Result<(Vec<TensorRef>, Vec<RawTensor>, u64)> {
    let bad = |detail: String| Error::malformed(path, "safetensors", detail);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes is too short for a header (truncated?)"
        )));
    }
    // SAFETY: the mapping is read-only and private to this process. Like every reader of memory-mapped
    // model files (safetensors, llama.cpp), we rely on the file not being truncated or rewritten while the
    // model is open; all offsets below are checked against the length seen at open time.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let backing = Arc::new(Backing::Mmap(map));
    let bytes: &[u8] = &backing;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len8);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit"
        )));
    }
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file (truncated?)"
        )));
    }
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let header: Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(header) = header else {
        return Err(bad("header is not a JSON object".into()));
    };

    let mut spans: Vec<(usize, usize, &str)> = Vec::with_capacity(header.len());
    let mut tensors = Vec::with_capacity(header.len());
    let mut raw = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let info = info
            .as_object()
            .ok_or_else(|| bad(format!("entry for tensor {name} is not an object")))?;
        let dtype = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor {name} has no dtype")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("tensor {name} has no shape")))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(format!(
                    "tensor {name} has a shape that is not a list of sizes"
                ))
            })?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            })
            .unwrap_or(None)
            .filter(|o: &Vec<usize>| o.len() == 2)
            .ok_or_else(|| bad(format!("tensor {name} has no [begin, end] data_offsets")))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len {
            return Err(bad(format!(
                "tensor {name}: data_offsets [{begin}, {end}] fall outside the {data_len} data bytes (truncated?)"
            )));
        }
        let (ty, elem) = safetensors_dtype(path, name, dtype)?;
        let want = shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
        if want != end - begin {
            return Err(bad(format!(
                "tensor {name}: {} bytes stored, {want} expected for shape {shape:?} {dtype}",
                end - begin
            )));
        }
        let data = Bytes::slice_of(&backing, data_start + begin, end - begin)
            .ok_or_else(|| bad(format!("tensor {name}: data outside the file")))?;
        spans.push((begin, end, name));
        match ty {
            Some(ty) => tensors.push(
                TensorRef::new(name.clone(), shape, ty, data).map_err(|e| bad(e.to_string()))?,
            ),
            None => raw.push(RawTensor {
                name: name.clone(),
                dtype: raw_dtype_name(dtype),
                file: path.to_path_buf(),
                shape,
                data,
            }),
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((_, prev_end, prev), (begin, _, name)) = (w[0], w[1]);
        if begin < prev_end {
            return Err(bad(format!("tensors {prev} and {name} overlap")));
        }
    }
    Ok((tensors, raw, file_len))
}

// ---------------------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------------------

/// Token ids of a config value: an integer, a list of integers, or null.
fn token_ids(path: &Path, key: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let bad = || {
        Error::malformed(
            path,
            "config",
            format!("{key} must be a token id or a list of token ids"),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect(),
        Some(x) => Ok(vec![x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)?]),
    }
}

/// A special token of tokenizer_config.json: a string or an AddedToken object with `content`.
fn special_token(
    path: &Path,
    cfg: Option<&Map<String, Value>>,
    key: &str,
) -> Result<Option<String>> {
    match cfg.and_then(|c| c.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::malformed(
                path,
                "tokenizer config",
                format!("{key} has no string content"),
            )),
        },
        Some(v) => Err(Error::malformed(
            path,
            "tokenizer config",
            format!("{key} must be a string or a token object, got {v}"),
        )),
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of `{name, template}` (the one named
/// `default`, else the first).
fn config_chat_template(path: &Path, cfg: Option<&Map<String, Value>>) -> Result<Option<String>> {
    let bad = |d: &str| Error::malformed(path, "tokenizer config", format!("chat_template {d}"));
    match cfg.and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let mut named = Vec::new();
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => named.push((n, t)),
                    _ => return Err(bad("entries must be {\"name\": .., \"template\": ..}")),
                }
            }
            Ok(named
                .iter()
                .find(|(n, _)| *n == "default")
                .or(named.first())
                .map(|(_, t)| t.to_string()))
        }
        Some(_) => Err(bad("must be a string or a list of named templates")),
    }
}

/// Whether the tokenizer's post-processor puts `bos` in front of an encoded text (TemplateProcessing,
/// Llama 3's `Sequence[ByteLevel, TemplateProcessing]`, ...).
pub(crate) fn post_processor_adds_bos(inner: &tokenizers::Tokenizer, bos: Option<u32>) -> bool {
    let Some(bos) = bos else { return false };
    inner
        .encode("a", true)
        .map(|e| e.get_ids().first() == Some(&bos))
        .unwrap_or(false)
}

fn load_tokenizer(
    dir: &Path,
    config: &Map<String, Value>,
    vocab_size: usize,
) -> Result<TextTokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        let hint = if dir.join("tokenizer.model").is_file() {
            "only a SentencePiece tokenizer.model is present; save the fast tokenizer with transformers \
             (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to get tokenizer.json"
        } else {
            "tokenizer.json is missing"
        };
        return Err(Error::io(
            &tok_path,
            std::io::Error::new(std::io::ErrorKind::NotFound, hint),
        ));
    }
    let bytes = read_capped(&tok_path, MAX_TOKENIZER_BYTES)?;
    // The tokenizers crate panics on some malformed files (its decoder deserialiser unwraps): fenced,
    // so a hostile tokenizer.json is an error like any other.
    let parsed = crate::bounded::catch_quietly(|| tokenizers::Tokenizer::from_bytes(&bytes));
    let mut inner = match parsed {
        Ok(r) => r.map_err(|e| {
            Error::malformed(
                &tok_path,
                "tokenizer",
                format!("tokenizers cannot load it: {e}"),
            )
        })?,
        Err(panic) => {
            let what = crate::bounded::panic_message(panic.as_ref());
            return Err(Error::malformed(
                &tok_path,
                "tokenizer",
                format!("tokenizers cannot load it: {what}"),
            ));
        }
    };
    drop(bytes);
    // transformers encodes without the padding/truncation a tokenizer.json may carry; so do we.
    inner.with_padding(None);
    inner
        .with_truncation(None)
        .map_err(|e| Error::malformed(&tok_path, "tokenizer", e.to_string()))?;

    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json_opt(&tc_path, "tokenizer config")?;
    let gc_path = dir.join("generation_config.json");
    let gc = read_json_opt(&gc_path, "generation config")?;
    let config_path = dir.join("config.json");

    let mut chat_template = config_chat_template(&tc_path, tc.as_ref())?;
    let mut chat_template_origin = chat_template
        .as_ref()
        .map(|_| tc_path.display().to_string());
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let bytes = read_capped(&jinja, MAX_SIDE_FILE_BYTES)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::malformed(&jinja, "chat template", "not UTF-8 text"))?;
        chat_template = Some(text);
        chat_template_origin = Some(jinja.display().to_string());
    }

    let mut bos_token = special_token(&tc_path, tc.as_ref(), "bos_token")?;
    let mut eos_token = special_token(&tc_path, tc.as_ref(), "eos_token")?;

    let mut eos_ids = token_ids(&config_path, "eos_token_id", config.get("eos_token_id"))?;
    if let Some(gc) = &gc {
        eos_ids.extend(token_ids(&gc_path, "eos_token_id", gc.get("eos_token_id"))?);
    }
    let mut seen = BTreeSet::new();
    eos_ids.retain(|id| seen.insert(*id));
    if eos_ids.is_empty() {
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
    }
    let mut bos_id = token_ids(&config_path, "bos_token_id", config.get("bos_token_id"))?
        .first()
        .copied();
    if bos_id.is_none() {
        if let Some(gc) = &gc {
            bos_id = token_ids(&gc_path, "bos_token_id", gc.get("bos_token_id"))?
                .first()
                .copied();
        }
    }
    if bos_id.is_none() {
        bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
    }

    let limit = vocab_size.max(inner.get_vocab_size(true));
    for id in bos_id.iter().chain(&eos_ids) {
        if *id as usize >= limit {
            return Err(Error::malformed(
                &config_path,
                "config",
                format!("special token id {id} is outside the vocabulary of {limit} tokens"),
            ));
        }
    }
    if bos_token.is_none() {
        bos_token = bos_id.and_then(|id| inner.id_to_token(id));
    }
    if eos_token.is_none() {
        eos_token = eos_ids.first().and_then(|&id| inner.id_to_token(id));
    }

    let add_bos = match tc.as_ref().and_then(|c| c.get("add_bos_token")) {
        None | Some(Value::Null) => post_processor_adds_bos(&inner, bos_id),
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::malformed(
                &tc_path,
                "tokenizer config",
                format!("add_bos_token must be true or false, got {v}"),
            ))
        }
    };

    Ok(TextTokenizer {
        inner,
        bos_token_id: bos_id,
        eos_token_ids: eos_ids,
        add_bos,
        chat_template,
        chat_template_origin,
        bos_token,
        eos_token,
    })
}

/// Builders of small Hugging Face folders for the tests of this and neighbouring modules.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    use serde_json::json;

    /// Words of the test vocabulary (ids in order); `<s>` is 1, `</s>` 2.
    pub const VOCAB: [&str; 16] = [
        "<unk>",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|im_end|>",
        "hello",
        "world",
        "the",
        "a",
        "cat",
        "sat",
        "on",
        "mat",
        "user",
        "assistant",
        "system",
    ];

    /// A word-level tokenizer.json over [`VOCAB`]; with `bos_post_processor`, a TemplateProcessing
    /// post-processor that prepends `<s>` as Llama's does.
    pub fn tokenizer_json(bos_post_processor: bool) -> String {
        let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), json!(i)))
            .collect();
        let added: Vec<_> = [0usize, 1, 2, 3, 4]
            .iter()
            .map(|&i| {
                json!({"id": i, "content": VOCAB[i], "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let post = if bos_post_processor {
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}})
        } else {
            serde_json::Value::Null
        };
        json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
               "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": post,
               "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
               "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}})
        .to_string()
    }

    /// A safetensors file from `(name, dtype, shape, raw little-endian bytes)`, header padded to 8 bytes.
    pub fn safetensors_bytes(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, dtype, shape, data) in tensors {
            header.insert(
                name.to_string(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.len()]}),
            );
            offset += data.len();
        }
        let mut h = serde_json::Value::Object(header).to_string().into_bytes();
        h.resize(h.len().next_multiple_of(8), b' ');
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        for (_, _, _, data) in tensors {
            out.extend_from_slice(data);
        }
        out
    }

    /// Deterministic values in roughly [-1, 1).
    pub fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect()
    }

    /// The config.json of the tiny test Llama (hidden 8, 2 layers, 2 heads, 1 KV head, vocab 16).
    pub fn tiny_config() -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            "max_position_embeddings": 256, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2
        })
    }

    /// Tensors of the tiny Llama: BF16 matrices, F32 norms, an untied lm_head.
    pub fn tiny_tensors() -> Vec<(String, &'static str, Vec<usize>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut seed = 0;
        let mut mat = |name: String, shape: Vec<usize>, out: &mut Vec<_>| {
            seed += 1;
            let n = shape.iter().product();
            out.push((name, "BF16", shape, bf16_bytes(&values(n, seed))));
        };
        mat("model.embed_tokens.weight".into(), vec![16, 8], &mut out);
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            mat(format!("{p}.self_attn.q_proj.weight"), vec![8, 8], &mut out);
            mat(format!("{p}.self_attn.k_proj.weight"), vec![4, 8], &mut out);
            mat(format!("{p}.self_attn.v_proj.weight"), vec![4, 8], &mut out);
            mat(format!("{p}.self_attn.o_proj.weight"), vec![8, 8], &mut out);
            mat(format!("{p}.mlp.gate_proj.weight"), vec![16, 8], &mut out);
            mat(format!("{p}.mlp.up_proj.weight"), vec![16, 8], &mut out);
            mat(format!("{p}.mlp.down_proj.weight"), vec![8, 16], &mut out);
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                let v: Vec<f32> = values(8, l + 50).iter().map(|x| 1.0 + x / 4.0).collect();
                out.push((format!("{p}.{norm}.weight"), "F32", vec![8], f32_bytes(&v)));
            }
        }
        out.push((
            "model.norm.weight".into(),
            "F32",
            vec![8],
            f32_bytes(&[1.0; 8]),
        ));
        mat("lm_head.weight".into(), vec![16, 8], &mut out);
        out
    }

    /// Write the tiny Llama as a complete Hugging Face folder into `dir`.
    pub fn write_tiny_llama(dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("config.json"), tiny_config().to_string()).expect("config");
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json(true)).expect("tokenizer");
        let tc = json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
                        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}",
                        "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"});
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string())
            .expect("tokenizer config");
        std::fs::write(
            dir.join("generation_config.json"),
            json!({"eos_token_id": [2, 4]}).to_string(),
        )
        .expect("generation config");
        let t = tiny_tensors();
        let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = t
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&refs)).expect("weights");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use std::path::PathBuf;

    use super::testutil::*;
    use super::*;

    type ConfigEdit = Box<dyn FnOnce(&mut serde_json::Map<String, serde_json::Value>)>;

    fn folder() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("TinyLlama-test");
        write_tiny_llama(&dir);
        (tmp, dir)
    }

    fn err_text(r: Result<SourceModel>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn opens_the_tiny_llama_folder() {
        let (_tmp, dir) = folder();
        let m = open(&dir).expect("open");
        assert_eq!(m.name, "TinyLlama-test");
        assert_eq!(m.format, SourceFormat::HfFolder);
        let c = &m.config;
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers),
            (8, 16, 2)
        );
        assert_eq!(
            (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
            (2, 1, 4, 16)
        );
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            })
        );
        assert!(!c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(m.tensors.len(), 2 + 2 * 9 + 1);
        let q = m
            .tensor("model.layers.1.self_attn.k_proj.weight")
            .expect("k");
        assert_eq!(
            (q.shape.as_slice(), q.block_type()),
            ([4usize, 8].as_slice(), Some(GgmlType::BF16))
        );
        let want: Vec<f32> = tiny_tensors()
            .into_iter()
            .find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight")
            .map(|t| {
                t.3.chunks(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            })
            .expect("k");
        assert_eq!(q.to_f32(), want);
        assert_eq!(
            m.tensor("model.norm.weight").expect("norm").to_f32(),
            vec![1.0; 8]
        );
        assert_eq!(
            m.file_size_bytes,
            std::fs::metadata(dir.join("model.safetensors"))
                .expect("meta")
                .len()
        );

        let t = &m.tokenizer;
        assert_eq!(t.bos_token_id, Some(1));
        assert_eq!(t.eos_token_ids, vec![2, 4]);
        assert!(t.add_bos, "TemplateProcessing inserts <s>");
        assert_eq!(
            (t.bos_token.as_deref(), t.eos_token.as_deref()),
            (Some("<s>"), Some("</s>"))
        );
        assert_eq!(
            t.encode("hello world", true).expect("encode"),
            vec![1, 5, 6]
        );
        assert!(t
            .chat_template
            .as_deref()
            .is_some_and(|s| s.contains("im_start")));
    }

    #[test]
    fn tokenizer_defaults_and_overrides() {
        let (_tmp, dir) = folder();
        // No post-processor and no add_bos_token: no BOS. chat_template.jinja wins over the config's.
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json(false)).expect("write");
        std::fs::write(dir.join("chat_template.jinja"), "JINJA").expect("write");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
                .to_string(),
        )
        .expect("write");
        std::fs::remove_file(dir.join("generation_config.json")).expect("rm");
        let m = open(&dir).expect("open");
        assert!(!m.tokenizer.add_bos);
        assert_eq!(m.tokenizer.chat_template.as_deref(), Some("JINJA"));
        assert_eq!(m.tokenizer.eos_token_ids, vec![2]);
        assert_eq!(
            m.tokenizer.bos_token.as_deref(),
            Some("<s>"),
            "looked up from bos_token_id"
        );
        std::fs::remove_file(dir.join("chat_template.jinja")).expect("rm");
        assert_eq!(
            open(&dir).expect("open").tokenizer.chat_template.as_deref(),
            Some("D")
        );
        // Padding and truncation stored in tokenizer.json are dropped, as transformers does.
        let mut padded: serde_json::Value =
            serde_json::from_str(&tokenizer_json(true)).expect("json");
        padded["padding"] = json!({"strategy": {"Fixed": 8}, "direction": "Left", "pad_to_multiple_of": null,
                                   "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"});
        padded["truncation"] =
            json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
        std::fs::write(dir.join("tokenizer.json"), padded.to_string()).expect("write");
        let t = open(&dir).expect("open").tokenizer;
        assert!(t.add_bos);
        assert_eq!(
            t.encode("the cat sat", true).expect("encode"),
            vec![1, 7, 9, 10]
        );
        // An explicit add_bos_token wins over the post-processor.
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json(true)).expect("write");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"add_bos_token": false}).to_string(),
        )
        .expect("w");
        assert!(!open(&dir).expect("open").tokenizer.add_bos);
    }

    fn with_config(
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> Result<ModelConfig> {
        let mut c = tiny_config();
        edit(c.as_object_mut().expect("object"));
        parse_config(Path::new("config.json"), c.as_object().expect("object"))
    }

    #[test]
    fn config_variants() {
        // transformers 5 layout: rope_parameters and dtype.
        let c = with_config(|c| {
            c.remove("rope_scaling");
            c.remove("rope_theta");
            c.remove("torch_dtype");
            c.insert("dtype".into(), json!("float16"));
            c.insert(
                "rope_parameters".into(),
                json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
            );
        })
        .expect("config");
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(
            (c.rope_theta, c.torch_dtype.as_deref()),
            (1e6, Some("float16"))
        );
        let c = with_config(|c| {
            c.insert("rope_scaling".into(), json!({"type": "default"}));
            c.remove("rope_theta");
            c.remove("num_key_value_heads");
            c.insert("attention_bias".into(), json!(true));
        })
        .expect("config");
        assert_eq!(
            (
                c.rope_scaling,
                c.rope_theta,
                c.num_kv_heads,
                c.attention_bias
            ),
            (None, 10_000.0, 2, true)
        );
        let c = with_config(|c| {
            c.insert("architectures".into(), json!(["Qwen2ForCausalLM"]));
            c.insert("head_dim".into(), json!(6));
            c.insert("rope_scaling".into(), serde_json::Value::Null);
        })
        .expect("config");
        assert_eq!(
            (c.arch, c.attention_bias, c.head_dim),
            (Arch::Qwen2, true, 6)
        );
        let c = with_config(|c| {
            c.remove("architectures");
            c.insert("model_type".into(), json!("mistral"));
        })
        .expect("config");
        assert_eq!(c.arch, Arch::Mistral);
    }

    #[test]
    fn hostile_configs_are_errors_naming_the_file() {
        let cases: Vec<(&str, ConfigEdit)> = vec![
            (
                "num_attention_heads is 0",
                Box::new(|c| {
                    c.insert("num_attention_heads".into(), json!(0));
                }),
            ),
            (
                "does not divide hidden_size",
                Box::new(|c| {
                    c.insert("num_attention_heads".into(), json!(3));
                    c.insert("num_key_value_heads".into(), json!(3));
                }),
            ),
            (
                "must divide num_attention_heads",
                Box::new(|c| {
                    c.insert("num_key_value_heads".into(), json!(3));
                }),
            ),
            (
                "hidden_size is missing",
                Box::new(|c| {
                    c.remove("hidden_size");
                }),
            ),
            (
                "num_hidden_layers = 2000000",
                Box::new(|c| {
                    c.insert("num_hidden_layers".into(), json!(2_000_000));
                }),
            ),
            (
                "vocab_size must be a non-negative integer",
                Box::new(|c| {
                    c.insert("vocab_size".into(), json!(-5));
                }),
            ),
            (
                "head_dim (3) must be even",
                Box::new(|c| {
                    c.insert("head_dim".into(), json!(3));
                }),
            ),
            (
                "architecture GPT2LMHeadModel is not supported",
                Box::new(|c| {
                    c.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
                }),
            ),
            (
                "rope scaling type yarn",
                Box::new(|c| {
                    c.insert(
                        "rope_scaling".into(),
                        json!({"type": "yarn", "factor": 4.0}),
                    );
                }),
            ),
            (
                "lacks low_freq_factor",
                Box::new(|c| {
                    c.insert(
                        "rope_scaling".into(),
                        json!({"rope_type": "llama3", "factor": 8.0}),
                    );
                }),
            ),
            (
                "rms_norm_eps",
                Box::new(|c| {
                    c.insert("rms_norm_eps".into(), json!(0.0));
                }),
            ),
            (
                "tie_word_embeddings must be true or false",
                Box::new(|c| {
                    c.insert("tie_word_embeddings".into(), json!("yes"));
                }),
            ),
        ];
        for (want, edit) in cases {
            let e = with_config(edit).expect_err(want).to_string();
            assert!(e.contains(want) && e.contains("config.json"), "{want}: {e}");
        }
        // Through open(): a malformed and a missing config.json.
        let (_tmp, dir) = folder();
        std::fs::write(dir.join("config.json"), "{\"hidden_size\": 8,").expect("write");
        let e = err_text(open(&dir));
        assert!(
            e.contains("config.json") && e.contains("not valid JSON"),
            "{e}"
        );
        std::fs::write(dir.join("config.json"), "[1, 2]").expect("write");
        assert!(err_text(open(&dir)).contains("not a JSON object"));
        std::fs::remove_file(dir.join("config.json")).expect("rm");
        assert!(err_text(open(&dir)).contains("config.json"));
    }

    #[test]
    fn hostile_tokenizer_files_are_errors_naming_the_file() {
        let (_tmp, dir) = folder();
        std::fs::write(dir.join("tokenizer.json"), b"\x00\xffgarbage{").expect("write");
        let e = err_text(open(&dir));
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(
            dir.join("tokenizer.json"),
            "{\"model\": {\"type\": \"Nope\"}}",
        )
        .expect("write");
        assert!(err_text(open(&dir)).contains("tokenizer.json"));
        std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
        std::fs::write(dir.join("tokenizer.model"), b"sp").expect("write");
        let e = err_text(open(&dir));
        assert!(
            e.contains("tokenizer.json") && e.contains("SentencePiece"),
            "{e}"
        );

        let (_tmp, dir) = folder();
        std::fs::write(dir.join("tokenizer_config.json"), "{").expect("write");
        assert!(err_text(open(&dir)).contains("tokenizer_config.json"));
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"chat_template": 5}).to_string(),
        )
        .expect("w");
        assert!(err_text(open(&dir)).contains("chat_template"));
        std::fs::write(dir.join("tokenizer_config.json"), "{}").expect("write");
        std::fs::write(
            dir.join("generation_config.json"),
            json!({"eos_token_id": [2, "x"]}).to_string(),
        )
        .expect("w");
        assert!(err_text(open(&dir)).contains("generation_config.json"));
        std::fs::write(
            dir.join("generation_config.json"),
            json!({"eos_token_id": 99999}).to_string(),
        )
        .expect("w");
        assert!(err_text(open(&dir)).contains("outside the vocabulary"));
    }

    /// Write `bytes` as the folder's model.safetensors and return open()'s error text.
    fn weights_error(bytes: &[u8]) -> String {
        let (_tmp, dir) = folder();
        std::fs::write(dir.join("model.safetensors"), bytes).expect("write");
        let e = err_text(open(&dir));
        assert!(
            e.contains("model.safetensors"),
            "error does not name the file: {e}"
        );
        e
    }

    fn raw_file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    #[test]
    fn hostile_safetensors_are_errors_naming_the_file() {
        let good = safetensors_bytes(&[("model.norm.weight", "F32", vec![4], vec![0; 16])]);
        // Truncated: in the length, in the header, in the data.
        assert!(weights_error(&good[..5]).contains("too short"));
        assert!(weights_error(&good[..20]).contains("runs past the end"));
        assert!(weights_error(&good[..good.len() - 1]).contains("outside"));
        // A header length of 2^60.
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(weights_error(&huge).contains("limit"));
        // Header not JSON / not an object / entry not an object.
        assert!(weights_error(&raw_file("{not json", 0)).contains("not valid JSON"));
        assert!(weights_error(&raw_file("[1,2]", 0)).contains("not a JSON object"));
        assert!(weights_error(&raw_file(r#"{"a": 5}"#, 0)).contains("not an object"));
        // Offsets past EOF, reversed, overlapping, wrong size for the shape.
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        ));
        assert!(e.contains("outside"), "{e}");
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
            8,
        ));
        assert!(e.contains("outside"), "{e}");
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ));
        assert!(e.contains("overlap"), "{e}");
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("12 expected"), "{e}");
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("overflows"), "{e}");
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
            8,
        ));
        assert!(e.contains("data_offsets"), "{e}");
        let e = weights_error(&raw_file(
            r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("shape"), "{e}");
        // Unknown / unsupported dtypes.
        for dtype in ["I8", "F64", "Q4"] {
            let e = weights_error(&raw_file(
                &format!(r#"{{"a":{{"dtype":"{dtype}","shape":[8],"data_offsets":[0,8]}}}}"#),
                8,
            ));
            assert!(e.contains("unsupported") && e.contains(dtype), "{e}");
        }
    }

    #[test]
    fn safetensors_truncated_at_every_cut_or_corrupted_never_panics() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("model.safetensors");
        let good = safetensors_bytes(&[
            ("a", "F32", vec![2, 3], f32_bytes(&values(6, 1))),
            ("b", "BF16", vec![4], bf16_bytes(&values(4, 2))),
        ]);
        std::fs::write(&path, &good).expect("write");
        let (tensors, size) = read_safetensors(&path).expect("valid file");
        assert_eq!((tensors.len(), size), (2, good.len() as u64));
        for cut in 0..good.len() {
            std::fs::write(&path, &good[..cut]).expect("write");
            let e = read_safetensors(&path).expect_err("truncated");
            assert!(e.to_string().contains("model.safetensors"), "{e}");
        }
        // Every single-byte corruption of the header is either still a valid file or an error.
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().expect("8 bytes")) as usize;
        for i in 0..header_end {
            for v in [0u8, b'9', b'"', b'}', 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                std::fs::write(&path, &bad).expect("write");
                let _ = read_safetensors(&path);
            }
        }
    }

    #[test]
    fn sharded_folders() {
        let (_tmp, dir) = folder();
        let tensors = tiny_tensors();
        let (a, b) = tensors.split_at(7);
        let refs = |ts: &[(String, &'static str, Vec<usize>, Vec<u8>)]| -> Vec<u8> {
            let r: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = ts
                .iter()
                .map(|(n, d, s, x)| (n.as_str(), *d, s.clone(), x.clone()))
                .collect();
            safetensors_bytes(&r)
        };
        std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
        std::fs::write(dir.join("model-00001-of-00002.safetensors"), refs(a)).expect("w");
        std::fs::write(dir.join("model-00002-of-00002.safetensors"), refs(b)).expect("w");
        let mut map = serde_json::Map::new();
        for (i, part) in [a, b].iter().enumerate() {
            for t in part.iter() {
                map.insert(
                    t.0.clone(),
                    json!(format!("model-0000{}-of-00002.safetensors", i + 1)),
                );
            }
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map.clone()});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("w");
        let m = open(&dir).expect("open sharded");
        assert_eq!(m.tensors.len(), tensors.len());
        let sizes: u64 = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).expect("meta").len())
        .sum();
        assert_eq!(m.file_size_bytes, sizes);

        // The index names a missing shard / a tensor its shard lacks / a path outside the folder.
        let mut bad = map.clone();
        bad.insert(
            "extra.weight".into(),
            json!("model-00003-of-00003.safetensors"),
        );
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"weight_map": bad}).to_string(),
        )
        .expect("w");
        let e = err_text(open(&dir));
        assert!(
            e.contains("model.safetensors.index.json") && e.contains("model-00003-of-00003"),
            "{e}"
        );
        let mut bad = map.clone();
        bad.insert(
            "extra.weight".into(),
            json!("model-00001-of-00002.safetensors"),
        );
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"weight_map": bad}).to_string(),
        )
        .expect("w");
        assert!(err_text(open(&dir)).contains("does not hold it"));
        let mut bad = map;
        bad.insert("extra.weight".into(), json!("../escape.safetensors"));
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            json!({"weight_map": bad}).to_string(),
        )
        .expect("w");
        assert!(err_text(open(&dir)).contains("relative path"));
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            "{\"weight_map\": 3}",
        )
        .expect("w");
        assert!(err_text(open(&dir)).contains("weight_map"));
        // A broken shard is named.
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("w");
        std::fs::write(dir.join("model-00002-of-00002.safetensors"), b"short").expect("w");
        assert!(err_text(open(&dir)).contains("model-00002-of-00002.safetensors"));
    }

    #[test]
    fn missing_lm_head_means_tied_and_missing_weights_are_named() {
        let (_tmp, dir) = folder();
        let t: Vec<_> = tiny_tensors()
            .into_iter()
            .filter(|t| t.0 != "lm_head.weight")
            .collect();
        let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = t
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
            .collect();
        std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&refs)).expect("w");
        assert!(open(&dir).expect("open").config.tie_word_embeddings);
        std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
        assert!(err_text(open(&dir)).contains("model.safetensors"));
        std::fs::write(dir.join("pytorch_model.bin"), b"x").expect("w");
        assert!(err_text(open(&dir)).contains("safetensors"));
    }
}
