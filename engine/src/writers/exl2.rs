//! EXL2 folders as ExLlamaV2 loads them (`shared/reference/exl2.md` §1): per quantized linear `q_weight`,
//! `q_scale` (int32), `q_scale_max` (fp16), `q_groups` (int16) and `q_invperm` (int32); the output head
//! quantized too (from the embedding when the two are tied); embeddings and norms fp16; `config.json` with an
//! informational `quantization_config` (`quant_method: "exl2"`). ExLlamaV2 reads every `*.safetensors` of the
//! folder with no index, so the folder holds only model shards; `measurement.json` lies beside them.

use serde_json::{json, Map, Value};

use super::packed::{is_decoder_linear, PackedFolder, PackedTensor};
use crate::codecs::exl2::Exl2Packed;

/// What an EXL2 folder records.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2FolderConfig {
    /// The target bits per weight of the decoder linears.
    pub bits: f64,
    pub head_bits: u8,
    pub calib_rows: usize,
    pub calib_length: usize,
    pub dataset: String,
    /// AWQ's scales were folded into the model first (recorded for people; loaders ignore it).
    pub awq_scales: bool,
    pub max_shard_bytes: Option<u64>,
}

/// The tensors EXL2 packs: the decoder linears and the output head.
pub fn is_exl2_linear(hf_name: &str) -> bool {
    is_decoder_linear(hf_name) || hf_name == "lm_head.weight"
}

impl Exl2FolderConfig {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "quant_method": "exl2",
            "version": "0.2.7",
            "bits": self.bits,
            "head_bits": self.head_bits,
            "calibration": {
                "rows": self.calib_rows,
                "length": self.calib_length,
                "dataset": self.dataset,
            },
            "quantizer": format!("quant-studio {}", env!("CARGO_PKG_VERSION")),
        });
        if self.awq_scales {
            v["awq_scales"] = json!(true);
        }
        v
    }

    pub fn folder(&self) -> PackedFolder {
        PackedFolder {
            quantization_config: self.to_json(),
            side_files: Vec::new(),
            metadata: Map::new(),
            max_shard_bytes: self
                .max_shard_bytes
                .unwrap_or(crate::writers::gptq::DEFAULT_MAX_SHARD_BYTES),
            packs: is_exl2_linear,
        }
    }
}

/// The stored tensors of one packed linear.
pub fn exl2_parts(p: Exl2Packed) -> Vec<PackedTensor> {
    let words = p.words();
    let g = p.groups.len();
    vec![
        PackedTensor::new("q_weight", "I32", vec![words, p.n_pad], p.q_weight),
        PackedTensor::new("q_invperm", "I32", vec![p.in_features], p.q_invperm),
        PackedTensor::new("q_scale", "I32", vec![g, p.n_pad / 8], p.q_scale),
        PackedTensor::new("q_scale_max", "F16", vec![g], p.q_scale_max),
        PackedTensor::new("q_groups", "I16", vec![2 * g], p.q_groups),
    ]
}
