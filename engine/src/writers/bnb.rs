//! bitsandbytes 4-bit folders (NF4/FP4, optionally double-quantized), as transformers saves a model loaded
//! with `BitsAndBytesConfig(load_in_4bit=True)` (`shared/reference/hf-formats.md` §4): every decoder
//! linear `P` becomes `P.weight` (packed codes, uint8 `[ceil(n/2), 1]`), `P.weight.absmax`,
//! `P.weight.quant_map`, with double quantization `P.weight.nested_absmax` and `P.weight.nested_quant_map`,
//! and `P.weight.quant_state.bitsandbytes__nf4` (the quant state's JSON as bytes); everything else is fp16.

use serde_json::{json, Map, Value};

use super::gptq::DEFAULT_MAX_SHARD_BYTES;
use super::packed::{is_decoder_linear, LinearPacker, PackedFolder, PackedTensor};
use crate::codecs::bnb::{quantize, Bnb4Dtype, Bnb4Kind, DoubleQuant, BLOCK, NESTED_BLOCK};
use crate::tensor::{Bnb4Linear, Bnb4Nested, Bytes, Grouped, TensorRef};
use crate::Result;

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Bnb4Options {
    pub kind: Bnb4Kind,
    /// Quantize the block scales to 8 bits (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Bnb4Options {
    /// Bits per weight of a packed linear: 4-bit codes plus the block scales.
    pub fn bpw(&self) -> f64 {
        let scale_bits = if self.double_quant {
            8.0 + 32.0 / NESTED_BLOCK as f64
        } else {
            32.0
        };
        4.0 + scale_bits / BLOCK as f64
    }

    /// `quantization_config` as transformers writes it.
    pub fn quantization_config(&self) -> Value {
        json!({
            "quant_method": "bitsandbytes",
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": self.kind.name(),
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": "float16",
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": null,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
        })
    }
}

/// Python's `repr` of a float (what `json.dumps` writes): the shortest round-trip digits, in exponent form
/// below 1e-4 or from 1e16 up.
pub fn py_float(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return if x == 0.0 {
            format!("{x:.1}")
        } else {
            "NaN".into()
        };
    }
    let a = x.abs();
    if (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Rust: "1.5e-5"; Python: "1.5e-05".
        let s = format!("{x:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
        format!("{m}e{sign}{digits:0>2}")
    }
}

/// The quant state's JSON, byte for byte as bitsandbytes writes it (`json.dumps` with default separators).
pub fn quant_state_json(
    o: &Bnb4Options,
    dtype: Bnb4Dtype,
    shape: [usize; 2],
    offset: Option<f32>,
) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {BLOCK}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
        o.kind.name(),
        dtype.name(),
        shape[0],
        shape[1]
    );
    if let Some(off) = offset {
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            py_float(f64::from(off))
        ));
    }
    s.push('}');
    s
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl LinearPacker for Bnb4Options {
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
        format!(
            "{}{}",
            self.kind.name().to_uppercase(),
            if self.double_quant { " dq" } else { "" }
        )
    }

    fn check(&self, _t: &TensorRef) -> Result<()> {
        // Blocks run over the flattened weight (a partial last block is allowed): any shape will do.
        Ok(())
    }

    fn pack(&self, t: &TensorRef) -> Result<(Vec<PackedTensor>, Grouped)> {
        let (n, k) = (t.rows(), t.cols());
        // The source is written and dequantized in fp16, as the folder's other tensors are.
        let dtype = Bnb4Dtype::F16;
        let w: Vec<f32> = t.to_f32().into_iter().map(|x| dtype.round(x)).collect();
        let (codes, absmax) = quantize(&w, self.kind);
        let levels = *self.kind.levels();
        let blocks = absmax.len();
        let mut parts = vec![PackedTensor::new(
            "weight",
            "U8",
            vec![codes.len(), 1],
            codes.clone(),
        )];
        let (absmax_bytes, nested, offset) = if self.double_quant {
            let dq = DoubleQuant::quantize(&absmax);
            parts.push(PackedTensor::new(
                "weight.absmax",
                "U8",
                vec![blocks],
                dq.codes.clone(),
            ));
            (
                dq.codes.clone(),
                Some(Box::new(Bnb4Nested {
                    absmax: dq.nested_absmax.clone(),
                    blocksize: NESTED_BLOCK,
                    offset: dq.offset,
                    map: dq.map,
                })),
                Some(dq),
            )
        } else {
            let b = f32_bytes(&absmax);
            parts.push(PackedTensor::new(
                "weight.absmax",
                "F32",
                vec![blocks],
                b.clone(),
            ));
            (b, None, None)
        };
        parts.push(PackedTensor::new(
            "weight.quant_map",
            "F32",
            vec![16],
            f32_bytes(&levels),
        ));
        if let Some(dq) = &offset {
            parts.push(PackedTensor::new(
                "weight.nested_absmax",
                "F32",
                vec![dq.nested_absmax.len()],
                f32_bytes(&dq.nested_absmax),
            ));
            parts.push(PackedTensor::new(
                "weight.nested_quant_map",
                "F32",
                vec![256],
                f32_bytes(&dq.map),
            ));
        }
        let state = quant_state_json(self, dtype, [n, k], offset.as_ref().map(|d| d.offset));
        parts.push(PackedTensor::new(
            format!("weight.quant_state.bitsandbytes__{}", self.kind.name()),
            "U8",
            vec![state.len()],
            state.into_bytes(),
        ));
        let g = Grouped::Bnb4(Bnb4Linear {
            kind: self.kind,
            out_features: n,
            in_features: k,
            dtype,
            blocksize: BLOCK,
            levels,
            codes: Bytes::owned(codes),
            absmax: Bytes::owned(absmax_bytes),
            nested,
        });
        Ok((parts, g))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float(0.0123), "0.0123");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(1.5e-5), "1.5e-05");
        assert_eq!(py_float(f64::from(0.1f32)), "0.10000000149011612");
    }

    #[test]
    fn quant_state_json_is_bitsandbytes_bytes() {
        let o = Bnb4Options {
            kind: Bnb4Kind::Nf4,
            double_quant: true,
        };
        assert_eq!(
            quant_state_json(&o, Bnb4Dtype::BF16, [576, 1536], Some(0.015625)),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [576, 1536], \
             \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.015625}"
        );
        assert!((o.bpw() - 4.127).abs() < 1e-3);
    }
}
