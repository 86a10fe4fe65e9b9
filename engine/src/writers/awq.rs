//! AWQ folders in the two layouts the serving engines read (`shared/reference/hf-formats.md` §3):
//!
//! * AutoAWQ "GEMM" (`quant_method: "awq"`, `version: "gemm"`): per linear `qweight` `[in, out/8]` and `qzeros`
//!   `[in/gs, out/8]` int32 in the interleaved nibble order, `scales` `[in/gs, out]` fp16 — transformers (through
//!   gptqmodel), vLLM's `awq`/`awq_marlin`, TGI.
//! * compressed-tensors `pack-quantized` (`quant_method: "compressed-tensors"`): `weight_packed` `[out, in·B/32]`,
//!   `weight_scale` `[out, in/gs]`, `weight_zero_point` `[out·B/32, in/gs]`, `weight_shape` — what llm-compressor
//!   writes and vLLM loads by default; transformers decompresses it on any device.
//!
//! Both store the same numbers: codes `q ∈ [0, 2^B)`, zero points `z` and fp16 scales `s` with
//! `W = s · (q − z)`.

use serde_json::{json, Map, Value};

use super::packed::{is_decoder_linear, PackedFolder, PackedTensor};
use crate::codecs::awq::pack_interleaved;
use crate::codecs::ct::{pack_columns, pack_rows, packed_words, transpose};
use crate::solvers::awq::QuantizedRows;
use crate::{Error, Result};

/// Which layout an AWQ folder is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwqLayout {
    /// AutoAWQ's GEMM layout (4-bit only).
    Gemm,
    /// compressed-tensors `pack-quantized` (any of 2–8 bits).
    CompressedTensors,
}

/// The settings an AWQ folder records.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqFolderConfig {
    pub layout: AwqLayout,
    pub bits: u8,
    pub group_size: usize,
    /// What the scales were calibrated on (recorded as `quantization_config.meta.calibration_dataset`).
    pub calibration_dataset: Option<String>,
    pub max_shard_bytes: Option<u64>,
}

impl AwqFolderConfig {
    /// `config.json`'s `quantization_config`.
    pub fn to_json(&self) -> Value {
        let meta = json!({
            "quantizer": format!("quant-studio {}", env!("CARGO_PKG_VERSION")),
            "calibration_dataset": self.calibration_dataset,
        });
        match self.layout {
            AwqLayout::Gemm => json!({
                "quant_method": "awq",
                "bits": self.bits,
                "group_size": self.group_size,
                "zero_point": true,
                "version": "gemm",
                "modules_to_not_convert": null,
                "meta": meta,
            }),
            AwqLayout::CompressedTensors => json!({
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "quantization_status": "compressed",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": self.bits,
                            "type": "int",
                            "symmetric": false,
                            "strategy": "group",
                            "group_size": self.group_size,
                            "dynamic": false,
                            "actorder": null,
                            "observer": "minmax",
                            "observer_kwargs": {},
                        },
                        "input_activations": null,
                        "output_activations": null,
                        "format": "pack-quantized",
                    }
                },
                "ignore": ["lm_head"],
                "kv_cache_scheme": null,
                "global_compression_ratio": null,
                "meta": meta,
            }),
        }
    }

    /// The folder description for [`super::packed::write_packed_folder`].
    pub fn folder(&self) -> PackedFolder {
        PackedFolder {
            quantization_config: self.to_json(),
            side_files: Vec::new(),
            metadata: Map::new(),
            max_shard_bytes: self
                .max_shard_bytes
                .unwrap_or(super::gptq::DEFAULT_MAX_SHARD_BYTES),
            packs: is_decoder_linear,
        }
    }

    /// Check that a `[out, in]` linear named `name` fits the layout, naming the fix otherwise.
    pub fn check_shape(&self, name: &str, out: usize, inp: usize) -> Result<()> {
        let gs = self.group_size;
        if gs == 0 || !inp.is_multiple_of(gs) {
            let fits: Vec<String> = [32usize, 64, 128, 256]
                .iter()
                .filter(|g| inp.is_multiple_of(**g))
                .map(ToString::to_string)
                .collect();
            return Err(Error::Invalid(format!(
                "{name}: {inp} inputs are not a multiple of the group size {gs} (AWQ's loaders need whole \
                 groups); choose a --group-size that divides every linear's inputs{}",
                if fits.is_empty() {
                    String::new()
                } else {
                    format!(" ({} divide {inp})", fits.join(", "))
                }
            )));
        }
        match self.layout {
            AwqLayout::Gemm if self.bits != 4 => Err(Error::Invalid(format!(
                "AWQ's GEMM layout is 4-bit only (asked for {} bits); use --format awq-ct for other widths",
                self.bits
            ))),
            AwqLayout::Gemm if !out.is_multiple_of(8) => Err(Error::Invalid(format!(
                "{name}: {out} outputs are not a multiple of 8, which AWQ's GEMM packing needs; use \
                 --format awq-ct"
            ))),
            _ if !(2..=8).contains(&self.bits) => Err(Error::Invalid(format!(
                "AWQ takes 2 to 8 bits, not {}",
                self.bits
            ))),
            _ => Ok(()),
        }
    }

    /// The stored tensors of one quantized `[out, in]` linear.
    pub fn parts(&self, out: usize, inp: usize, q: &QuantizedRows) -> Vec<PackedTensor> {
        let groups = inp / self.group_size;
        let f16 = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        match self.layout {
            AwqLayout::Gemm => {
                let codes_t = transpose(&q.codes, out, inp);
                let zeros_t = transpose(&q.zeros, out, groups);
                let scales_b = f16(&transpose(&q.scales, out, groups));
                vec![
                    PackedTensor::new(
                        "qweight",
                        "I32",
                        vec![inp, out / 8],
                        pack_interleaved(&codes_t, inp, out),
                    ),
                    PackedTensor::new(
                        "qzeros",
                        "I32",
                        vec![groups, out / 8],
                        pack_interleaved(&zeros_t, groups, out),
                    ),
                    PackedTensor::new("scales", "F16", vec![groups, out], scales_b),
                ]
            }
            AwqLayout::CompressedTensors => {
                let b = u32::from(self.bits);
                let shape: Vec<u8> = [out as i64, inp as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                vec![
                    PackedTensor::new(
                        "weight_packed",
                        "I32",
                        vec![out, packed_words(inp, b)],
                        pack_rows(&q.codes, out, inp, b),
                    ),
                    PackedTensor::new("weight_scale", "F16", vec![out, groups], f16(&q.scales)),
                    PackedTensor::new(
                        "weight_zero_point",
                        "I32",
                        vec![packed_words(out, b), groups],
                        pack_columns(&q.zeros, out, groups, b),
                    ),
                    PackedTensor::new("weight_shape", "I64", vec![2], shape),
                ]
            }
        }
    }
}
