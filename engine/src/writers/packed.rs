//! Hugging Face folders of packed linears, for every format that replaces a linear's `weight` by tensors of
//! its own (GPTQ's `qweight`/`qzeros`/`scales`/`g_idx`, bitsandbytes' `weight`/`weight.absmax`/…, HQQ's
//! `W_q`/`scale`/`zero`/…): one writer, the format supplying which linears it packs, the packed tensors of
//! each, and its `quantization_config`.
//!
//! Packed linears go to a spill file as they are made (memory holds one layer's, not the model's); the
//! folder is then assembled in the source's tensor order through the streaming safetensors sink, everything
//! else written in fp16, with `config.json` (+ `quantization_config`), the tokenizer and generation files as
//! `convert` writes them.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::hf::{
    config_json, generation_config_json, tokenizer_config_json, tokenizer_json, OutDtype,
};
use super::safetensors::{PlannedTensor, SafetensorsSink};
use crate::model::SourceModel;
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// One stored tensor of a packed linear `P.weight`: written as `P.{suffix}`.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedTensor {
    pub suffix: String,
    /// safetensors dtype (`"I32"`, `"U8"`, `"F16"`, `"F32"`, `"I64"`).
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl PackedTensor {
    pub fn new(
        suffix: impl Into<String>,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Self {
        Self {
            suffix: suffix.into(),
            dtype,
            shape,
            bytes,
        }
    }
}

/// Bytes per element of a safetensors dtype.
fn dtype_bytes(dtype: &str) -> usize {
    match dtype {
        "I64" | "U64" | "F64" => 8,
        "I32" | "U32" | "F32" => 4,
        "I16" | "U16" | "F16" | "BF16" => 2,
        _ => 1,
    }
}

/// What a packed format writes besides its linears.
pub struct PackedFolder {
    /// `config.json`'s `quantization_config`.
    pub quantization_config: Value,
    /// Side files written beside `config.json` (GPTQ's `quantize_config.json`).
    pub side_files: Vec<(&'static str, Value)>,
    /// safetensors `__metadata__` entries besides `"format": "pt"`.
    pub metadata: Map<String, Value>,
    /// Largest weight file in bytes of tensor data: more is split into shards.
    pub max_shard_bytes: u64,
    /// Which tensors (Hugging Face names) are packed.
    pub packs: fn(&str) -> bool,
}

/// Where a packed linear's tensors lie in the spill file.
#[derive(Clone, Debug)]
struct SpilledPart {
    suffix: String,
    dtype: &'static str,
    shape: Vec<usize>,
    len: usize,
}

/// Packed linears kept on disk until the folder is written (in its own order), one read back at a time.
pub struct PackedSpill {
    path: PathBuf,
    file: std::fs::File,
    index: HashMap<String, (u64, Vec<SpilledPart>)>,
    end: u64,
}

impl PackedSpill {
    /// A new spill file at `path` (which must not exist).
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            index: HashMap::new(),
            end: 0,
        })
    }

    /// Keep the packed tensors of the linear `name` (its Hugging Face weight name), or the replacement of a
    /// float tensor (one part whose suffix is the name's last component, e.g. `weight` or `bias`).
    pub fn put(&mut self, name: &str, parts: Vec<PackedTensor>) -> Result<()> {
        let io = |e| Error::io(&self.path, e);
        self.file.seek(SeekFrom::Start(self.end)).map_err(io)?;
        let at = self.end;
        let mut meta = Vec::with_capacity(parts.len());
        for p in parts {
            let want = p.shape.iter().product::<usize>() * dtype_bytes(p.dtype);
            if want != p.bytes.len() {
                return Err(Error::Invalid(format!(
                    "{name}: packed {} has {} bytes, {want} expected for {:?} {}",
                    p.suffix,
                    p.bytes.len(),
                    p.shape,
                    p.dtype
                )));
            }
            self.file.write_all(&p.bytes).map_err(io)?;
            self.end += p.bytes.len() as u64;
            meta.push(SpilledPart {
                suffix: p.suffix,
                dtype: p.dtype,
                shape: p.shape,
                len: p.bytes.len(),
            });
        }
        self.index.insert(name.to_owned(), (at, meta));
        Ok(())
    }

    /// Replace the float tensor `name` (a norm's weight, a bias) with `values`, written in fp16.
    pub fn put_f16(&mut self, name: &str, shape: Vec<usize>, values: &[f32]) -> Result<()> {
        let suffix = name.rsplit('.').next().unwrap_or(name);
        let bytes = values
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        self.put(name, vec![PackedTensor::new(suffix, "F16", shape, bytes)])
    }

    fn parts(&self, name: &str) -> Option<&[SpilledPart]> {
        self.index.get(name).map(|(_, m)| m.as_slice())
    }

    /// The packed tensors of `name`, read back (and forgotten).
    pub fn take(&mut self, name: &str) -> Result<Vec<PackedTensor>> {
        let (at, meta) = self
            .index
            .remove(name)
            .ok_or_else(|| Error::Invalid(format!("{name} was not quantized")))?;
        let io = |e| Error::io(&self.path, e);
        self.file.seek(SeekFrom::Start(at)).map_err(io)?;
        meta.into_iter()
            .map(|m| {
                let mut v = vec![0u8; m.len];
                self.file.read_exact(&mut v).map_err(io)?;
                Ok(PackedTensor::new(m.suffix, m.dtype, m.shape, v))
            })
            .collect()
    }

    /// Delete the file (before the folder is put in place).
    pub fn remove(self) -> Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

/// The tensors of the output file, in order: `(name, dtype, shape, source tensor, packed linear's name)`.
struct Entry<'a> {
    planned: PlannedTensor,
    src: &'a TensorRef,
    /// For packed tensors: the part's index within its linear.
    part: Option<usize>,
}

fn plan<'a>(
    src: &'a SourceModel,
    fmt: &PackedFolder,
    spill: &PackedSpill,
) -> Result<Vec<Entry<'a>>> {
    let mut v = Vec::new();
    for t in src.tensors.values() {
        if src.config.tie_word_embeddings && t.name == "lm_head.weight" {
            continue;
        }
        // A float tensor a format changed (AWQ folds its scales into the norms) is in the spill as its
        // own `weight`-suffixed part; every other float tensor is the source's, in fp16.
        if !(fmt.packs)(&t.name) && spill.parts(&t.name).is_none() {
            v.push(Entry {
                planned: PlannedTensor {
                    name: t.name.clone(),
                    dtype: "F16",
                    shape: t.shape.clone(),
                    nbytes: t.numel() as u64 * 2,
                },
                src: t,
                part: None,
            });
            continue;
        }
        let parts = spill
            .parts(&t.name)
            .ok_or_else(|| Error::Invalid(format!("{} was not quantized", t.name)))?;
        let prefix = t
            .name
            .strip_suffix(".weight")
            .or_else(|| t.name.strip_suffix(".bias"))
            .unwrap_or(&t.name);
        for (i, p) in parts.iter().enumerate() {
            v.push(Entry {
                planned: PlannedTensor {
                    name: format!("{prefix}.{}", p.suffix),
                    dtype: p.dtype,
                    shape: p.shape.clone(),
                    nbytes: p.len as u64,
                },
                src: t,
                part: Some(i),
            });
        }
    }
    // A format that packs the output head (EXL2) stores it even when it shares the embedding.
    let head = "lm_head.weight";
    if (fmt.packs)(head) && !v.iter().any(|e| e.src.name == head) {
        let embed = src
            .tensors
            .get("model.embed_tokens.weight")
            .ok_or_else(|| {
                Error::Invalid("no model.embed_tokens.weight for the output head".into())
            })?;
        let parts = spill
            .parts(head)
            .ok_or_else(|| Error::Invalid(format!("{head} was not quantized")))?;
        for (i, p) in parts.iter().enumerate() {
            v.push(Entry {
                planned: PlannedTensor {
                    name: format!("lm_head.{}", p.suffix),
                    dtype: p.dtype,
                    shape: p.shape.clone(),
                    nbytes: p.len as u64,
                },
                src: embed,
                part: Some(i),
            });
        }
    }
    Ok(v)
}

/// Pack every linear `fmt` packs with `quantize_linear` (given in PyTorch order `[out, in]`) into `spill`;
/// `progress(done, total)` returning `false` cancels.
pub fn pack_linears(
    src: &SourceModel,
    fmt: &PackedFolder,
    spill: &mut PackedSpill,
    quantize_linear: &mut dyn FnMut(&TensorRef) -> Result<Vec<PackedTensor>>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let linears: Vec<&TensorRef> = src
        .tensors
        .values()
        .filter(|t| (fmt.packs)(&t.name))
        .collect();
    for (i, t) in linears.iter().enumerate() {
        let parts = quantize_linear(t)?;
        spill.put(&t.name, parts)?;
        if !progress(i + 1, linears.len()) {
            return Err(Error::Cancelled);
        }
    }
    Ok(())
}

/// Write `src` as a folder of packed linears into `out` (created if missing; callers write through an
/// [`crate::output::Staged`] temporary), the packed tensors taken from `spill`; `progress(done, total)`
/// over the source tensors, returning `false`, cancels.
pub fn write_packed_folder(
    src: &SourceModel,
    fmt: &PackedFolder,
    out: &Path,
    spill: &mut PackedSpill,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let entries = plan(src, fmt, spill)?;
    let mut config = config_json(&src.config, &src.tokenizer, OutDtype::F16)?;
    // A float folder (a rescaled model, not yet quantized) has no quantization config.
    if let (Value::Object(m), false) = (&mut config, fmt.quantization_config.is_null()) {
        m.insert(
            "quantization_config".into(),
            fmt.quantization_config.clone(),
        );
    }
    let (tok_json, add_bos) = tokenizer_json(src)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let text = |name: &str, v: &Value| -> Result<()> {
        let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
        s.push('\n');
        let p = out.join(name);
        std::fs::write(&p, s).map_err(|e| Error::io(&p, e))
    };
    let mut meta = Map::new();
    meta.insert("format".into(), json!("pt"));
    meta.extend(fmt.metadata.clone());
    let planned = entries.iter().map(|e| e.planned.clone()).collect();
    let mut sink = SafetensorsSink::new(out, planned, fmt.max_shard_bytes, meta);
    let total = entries.iter().filter(|e| e.part.unwrap_or(0) == 0).count();
    let mut done = 0;
    // The linear being written: its parts are appended one after the other.
    let mut packed: Vec<PackedTensor> = Vec::new();
    let mut row = Vec::new();
    let mut bytes = Vec::new();
    for e in &entries {
        match e.part {
            None => {
                row.resize(e.src.cols(), 0.0f32);
                for r in 0..e.src.rows() {
                    e.src.dequant_row(r, &mut row);
                    bytes.clear();
                    bytes.extend(
                        row.iter()
                            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes()),
                    );
                    sink.write(&e.planned.name, &bytes)?;
                }
            }
            Some(part) => {
                if part == 0 {
                    // The packed head of a tied model is stored under its own name.
                    let name = if e.planned.name.starts_with("lm_head.") {
                        "lm_head.weight"
                    } else {
                        e.src.name.as_str()
                    };
                    packed = spill.take(name)?;
                }
                let p = packed.get(part).ok_or_else(|| {
                    Error::Invalid(format!("{}: packed parts out of order", e.planned.name))
                })?;
                sink.write(&e.planned.name, &p.bytes)?;
            }
        }
        if e.part.unwrap_or(0) == 0 {
            done += 1;
            if !progress(done, total) {
                return Err(Error::Cancelled);
            }
        }
    }
    sink.finish()?;
    text("config.json", &config)?;
    for (name, v) in &fmt.side_files {
        text(name, v)?;
    }
    text(
        "generation_config.json",
        &generation_config_json(&src.tokenizer),
    )?;
    text(
        "tokenizer_config.json",
        &tokenizer_config_json(src, add_bos),
    )?;
    let p = out.join("tokenizer.json");
    std::fs::write(&p, &tok_json).map_err(|e| Error::io(&p, e))?;
    Ok(())
}

/// Bytes of the files in the folder `dir` (only its `.safetensors` files when `weights_only`).
pub fn folder_bytes(dir: &Path, weights_only: bool) -> Result<u64> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter(|e| !weights_only || e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum())
}

/// The decoder linears every packed format quantizes (embeddings, norms and the output head stay float).
pub fn is_decoder_linear(hf_name: &str) -> bool {
    const LINEARS: [&str; 7] = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    hf_name.starts_with("model.layers.") && LINEARS.iter().any(|l| hf_name.ends_with(l))
}

/// A calibration-free packed format: quantizes one linear at a time (bitsandbytes NF4/FP4, HQQ).
pub trait LinearPacker {
    /// The folder's `quantization_config` and side files.
    fn folder(&self) -> PackedFolder;
    /// The codec's display name (`"NF4"`, `"HQQ 4-bit g64"`).
    fn codec(&self) -> String;
    /// Check that the format can take `t` (a packed linear), naming the tensor and the fix otherwise.
    fn check(&self, t: &TensorRef) -> Result<()>;
    /// Quantize `t`: its stored tensors, and the same weights as the reader sees them (for errors).
    fn pack(&self, t: &TensorRef) -> Result<(Vec<PackedTensor>, crate::tensor::Grouped)>;
}
