//! Hugging Face GPTQ checkpoints (the v1 `"gptq"` layout that transformers/optimum, vLLM, TGI and
//! ExLlamaV2 load; `shared/reference/hf-formats.md` §1–2): every linear inside the decoder layers becomes
//! `qweight`/`qzeros`/`scales`/`g_idx` (+ its bias in fp16), everything else is written in fp16;
//! `config.json` carries `quantization_config`, `quantize_config.json` repeats it, tokenizer files and the
//! chat template are written as `convert` writes them. One `model.safetensors`, written tensor by tensor
//! (memory bounded by one layer), in a temporary folder renamed when complete.

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::codecs::gptq::{packed_len, GptqPacked};
use crate::model::convert::{
    config_json, generation_config_json, tokenizer_config_json, tokenizer_json, OutDtype,
};
use crate::model::SourceModel;
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// The GPTQ settings recorded in `quantization_config`.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqConfig {
    pub bits: u32,
    /// `None`: one group per row (`group_size: -1`).
    pub group_size: Option<usize>,
    pub desc_act: bool,
    pub static_groups: bool,
    pub sym: bool,
    pub damp_percent: f32,
    pub true_sequential: bool,
}

impl GptqConfig {
    /// The `quantization_config` object, as the reference recommends for the widest compatibility.
    pub fn to_json(&self) -> Value {
        json!({
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size.map_or(-1, |g| g as i64),
            "desc_act": self.desc_act,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "damp_percent": self.damp_percent,
            "lm_head": false,
            "checkpoint_format": "gptq",
            "format": "gptq",
            "pack_dtype": "int32",
            "model_name_or_path": null,
            "model_file_base_name": "model",
            "meta": {"quantizer": [format!("quant-studio:{}", env!("CARGO_PKG_VERSION"))]},
        })
    }

    /// Groups of a layer with `in_features` inputs.
    pub fn groups(&self, in_features: usize) -> usize {
        self.group_size.map_or(1, |g| in_features.div_ceil(g))
    }
}

/// Whether GPTQ quantizes this tensor: a linear weight inside the decoder layers.
pub fn is_gptq_linear(hf_name: &str) -> bool {
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

/// One tensor of the output file.
struct Entry<'a> {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    nbytes: usize,
    src: &'a TensorRef,
    /// For GPTQ linears: which of the four packed tensors.
    part: Option<usize>,
}

fn plan<'a>(src: &'a SourceModel, cfg: &GptqConfig) -> Result<Vec<Entry<'a>>> {
    let mut v = Vec::new();
    for t in src.tensors.values() {
        if src.config.tie_word_embeddings && t.name == "lm_head.weight" {
            continue;
        }
        if !is_gptq_linear(&t.name) {
            v.push(Entry {
                name: t.name.clone(),
                dtype: "F16",
                shape: t.shape.clone(),
                nbytes: t.numel() * 2,
                src: t,
                part: None,
            });
            continue;
        }
        let (n, k) = (t.rows(), t.cols());
        if n % 32 != 0 || k % 32 != 0 {
            return Err(Error::Invalid(format!(
                "{}: GPTQ needs input and output sizes that are multiples of 32 (got {n}×{k})",
                t.name
            )));
        }
        let p = t.name.trim_end_matches(".weight");
        let g = cfg.groups(k);
        let b = cfg.bits;
        for (i, (suffix, dtype, shape, elem)) in [
            ("qweight", "I32", vec![packed_len(k, b), n], 4),
            ("qzeros", "I32", vec![g, packed_len(n, b)], 4),
            ("scales", "F16", vec![g, n], 2),
            ("g_idx", "I32", vec![k], 4),
        ]
        .into_iter()
        .enumerate()
        {
            v.push(Entry {
                name: format!("{p}.{suffix}"),
                dtype,
                nbytes: shape.iter().product::<usize>() * elem,
                shape,
                src: t,
                part: Some(i),
            });
        }
    }
    Ok(v)
}

/// Write `src` as a GPTQ folder at `out`. `quantize_linear` packs one decoder linear (given in PyTorch
/// order `[out, in]`); `progress(done, total)` returning `false` cancels and removes the partial folder.
pub fn write_gptq_folder(
    src: &SourceModel,
    cfg: &GptqConfig,
    out: &Path,
    quantize_linear: &mut dyn FnMut(&TensorRef) -> Result<GptqPacked>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    if out.exists() {
        return Err(Error::io(
            out,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the output path exists"),
        ));
    }
    let entries = plan(src, cfg)?;
    let mut config = config_json(&src.config, &src.tokenizer, OutDtype::F16)?;
    if let Value::Object(m) = &mut config {
        m.insert("quantization_config".into(), cfg.to_json());
    }
    let (tok_json, add_bos) = tokenizer_json(src)?;
    let tmp = crate::writers::partial_path(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let res = (|| -> Result<()> {
        write_weights(
            &tmp.join("model.safetensors"),
            cfg,
            &entries,
            quantize_linear,
            progress,
        )?;
        let text = |name: &str, v: &Value| -> Result<()> {
            let mut s =
                serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
            s.push('\n');
            let p = tmp.join(name);
            std::fs::write(&p, s).map_err(|e| Error::io(&p, e))
        };
        text("config.json", &config)?;
        text("quantize_config.json", &cfg.to_json())?;
        text(
            "generation_config.json",
            &generation_config_json(&src.tokenizer),
        )?;
        text(
            "tokenizer_config.json",
            &tokenizer_config_json(src, add_bos),
        )?;
        let p = tmp.join("tokenizer.json");
        std::fs::write(&p, &tok_json).map_err(|e| Error::io(&p, e))
    })();
    match res.and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_weights(
    path: &Path,
    cfg: &GptqConfig,
    entries: &[Entry<'_>],
    quantize_linear: &mut dyn FnMut(&TensorRef) -> Result<GptqPacked>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let mut header = Map::new();
    let mut meta = Map::new();
    meta.insert("format".into(), json!("pt"));
    meta.insert("gptq_bits".into(), json!(cfg.bits.to_string()));
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut offset = 0usize;
    for e in entries {
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}),
        );
        offset += e.nbytes;
    }
    let mut h =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Invalid(e.to_string()))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let io = |e| Error::io(path, e);
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(io)?);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    let total = entries.iter().filter(|e| e.part.unwrap_or(0) == 0).count();
    let mut done = 0;
    let mut packed: Option<GptqPacked> = None;
    let mut row = Vec::new();
    for e in entries {
        let bytes: Vec<u8> = match e.part {
            None => {
                let cols = e.src.cols();
                row.resize(cols, 0.0f32);
                let mut b = Vec::with_capacity(e.nbytes);
                for r in 0..e.src.rows() {
                    e.src.dequant_row(r, &mut row);
                    b.extend(
                        row.iter()
                            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes()),
                    );
                }
                b
            }
            Some(part) => {
                if part == 0 {
                    packed = Some(quantize_linear(e.src)?);
                }
                let p = packed
                    .as_ref()
                    .ok_or_else(|| Error::Invalid("GPTQ parts out of order".into()))?;
                [&p.qweight, &p.qzeros, &p.scales, &p.g_idx][part].clone()
            }
        };
        if bytes.len() != e.nbytes {
            return Err(Error::Invalid(format!(
                "{}: {} bytes produced, {} expected",
                e.name,
                bytes.len(),
                e.nbytes
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        if e.part.unwrap_or(0) == 0 {
            done += 1;
            if !progress(done, total) {
                return Err(Error::Cancelled);
            }
        }
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)
}
