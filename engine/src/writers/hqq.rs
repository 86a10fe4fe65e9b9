//! HQQ folders in the layout transformers' HQQ integration saves (`HQQLinear.state_dict()` with hqq's
//! encoded metadata; `shared/reference/hf-formats.md` §5.4): every decoder linear `P` becomes `P.W_q` (the
//! packed codes), `P.scale` and `P.zero` (fp16, one per group), and hqq's metadata as small tensors (`nbits`,
//! `group_size`, `axis` int32 scalars, `shape` int64, `packing`/`unpack_view_dtype`/`compute_dtype` as
//! character codes, flags as uint8); `quantization_config` names the method and its weight parameters.

use serde_json::{json, Map, Value};

use super::gptq::DEFAULT_MAX_SHARD_BYTES;
use super::packed::{is_decoder_linear, LinearPacker, PackedFolder, PackedTensor};
use crate::codecs::hqq::{pack, quantize, HqqDtype, HqqParams};
use crate::tensor::{Bytes, Grouped, HqqLinear, TensorRef};
use crate::{Error, Result};

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct HqqOptions {
    pub params: HqqParams,
    /// Where the solver's steps run (the GPU's sums round differently: a code may differ from the CPU's
    /// near a boundary).
    #[serde(default)]
    pub backend: crate::backend::Backend,
}

impl HqqOptions {
    /// `quantization_config` as transformers' `HqqConfig` writes it.
    pub fn quantization_config(&self) -> Value {
        let p = &self.params;
        json!({
            "quant_method": "hqq",
            "skip_modules": ["lm_head"],
            "quant_config": {
                "weight_quant_params": {
                    "nbits": p.nbits,
                    "channel_wise": true,
                    "group_size": p.group_size,
                    "optimize": p.optimize,
                    "round_zero": p.round_zero,
                    "axis": p.axis,
                    "view_as_float": false,
                },
                "scale_quant_params": null,
                "zero_quant_params": null,
                "offload_meta": false,
            },
        })
    }
}

fn chars(s: &str) -> Vec<u8> {
    s.bytes().collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
}

impl LinearPacker for HqqOptions {
    fn folder(&self) -> PackedFolder {
        PackedFolder {
            quantization_config: self.quantization_config(),
            side_files: Vec::new(),
            metadata: Map::new(),
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            packs: is_decoder_linear,
        }
    }

    fn codec(&self) -> String {
        let p = &self.params;
        format!(
            "HQQ {}-bit g{}{}{}",
            p.nbits,
            p.group_size,
            if p.axis == 0 { " axis 0" } else { "" },
            if p.optimize { "" } else { " RTN" }
        )
    }

    fn check(&self, t: &TensorRef) -> Result<()> {
        self.params
            .check(t.rows(), t.cols())
            .map_err(|e| Error::Invalid(format!("{}: HQQ cannot take it: {e}", t.name)))
    }

    fn pack(&self, t: &TensorRef) -> Result<(Vec<PackedTensor>, Grouped)> {
        self.check(t)?;
        let p = self.params;
        let (n, k) = (t.rows(), t.cols());
        // The source as transformers would hold it (fp16), quantized in f32 as hqq does on the CPU.
        let w: Vec<f32> = t
            .to_f32()
            .into_iter()
            .map(|x| half::f16::from_f32(x).to_f32())
            .collect();
        let on_device = || crate::backend::on_gpu(|g| g.hqq_quantize(&w, &p));
        let q = match self.backend {
            crate::backend::Backend::Gpu if p.optimize => on_device(),
            _ => None,
        }
        .unwrap_or_else(|| quantize(&w, &p));
        let (rows, cols) = p.grouped_dims(w.len());
        let packed = pack(&q.codes, rows, cols, &p);
        let groups = p.groups(w.len());
        let side = if p.axis == 1 {
            vec![groups, 1]
        } else {
            vec![1, groups]
        };
        let (scale, zero) = (f16_bytes(&q.scale), f16_bytes(&q.zero));
        let (wq_dtype, view) = if p.nbits == 3 {
            ("I32", "torch.int32")
        } else {
            ("U8", "torch.uint8")
        };
        let i32s = |v: i32| v.to_le_bytes().to_vec();
        let flag = |b: bool| vec![u8::from(b)];
        let dtype = HqqDtype::F16;
        let text = |suffix: &str, s: &str| PackedTensor::new(suffix, "U8", vec![s.len()], chars(s));
        let parts = vec![
            PackedTensor::new(
                "W_q",
                wq_dtype,
                vec![p.packed_rows(rows), cols],
                packed.clone(),
            ),
            PackedTensor::new("scale", "F16", side.clone(), scale.clone()),
            PackedTensor::new("zero", "F16", side, zero.clone()),
            PackedTensor::new("nbits", "I32", vec![], i32s(i32::from(p.nbits))),
            PackedTensor::new("group_size", "I32", vec![], i32s(p.group_size as i32)),
            PackedTensor::new("axis", "I32", vec![], i32s(i32::from(p.axis))),
            PackedTensor::new(
                "shape",
                "I64",
                vec![2],
                [n as i64, k as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            text("packing", p.packing()),
            text("unpack_view_dtype", view),
            text("compute_dtype", dtype.torch_name()),
            PackedTensor::new("view_as_float", "U8", vec![], flag(false)),
            PackedTensor::new("quant_scale", "U8", vec![], flag(false)),
            PackedTensor::new("quant_zero", "U8", vec![], flag(false)),
            PackedTensor::new("offload_meta", "U8", vec![], flag(false)),
            PackedTensor::new("encoded_state_dict", "U8", vec![], flag(true)),
            PackedTensor::new("stores_quant_config", "U8", vec![], flag(true)),
            PackedTensor::new("channel_wise", "U8", vec![], flag(true)),
            PackedTensor::new("optimize", "U8", vec![], flag(p.optimize)),
            PackedTensor::new("round_zero", "U8", vec![], flag(p.round_zero)),
        ];
        let g = Grouped::Hqq(HqqLinear {
            params: p,
            out_features: n,
            in_features: k,
            dtype,
            packed: Bytes::owned(packed),
            scale: Bytes::owned(scale),
            zero: Bytes::owned(zero),
        });
        Ok((parts, g))
    }
}
