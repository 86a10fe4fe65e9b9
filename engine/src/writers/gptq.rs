//! Hugging Face GPTQ checkpoints (the v1 `"gptq"` layout that transformers/optimum, vLLM, TGI and
//! ExLlamaV2 load; `shared/reference/hf-formats.md` §1–2): every linear inside the decoder layers becomes
//! `qweight`/`qzeros`/`scales`/`g_idx` (+ its bias in fp16), everything else is written in fp16;
//! `config.json` carries `quantization_config`, `quantize_config.json` repeats it, tokenizer files and the
//! chat template are written as `convert` writes them. The weights are written tensor by tensor (memory
//! bounded by one layer) as one `model.safetensors`, or, above [`GptqConfig::max_shard_bytes`], as
//! `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`, laid out as
//! transformers' `save_pretrained(max_shard_size=…)` does; everything is written in a temporary folder
//! renamed when complete.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::packed::{
    is_decoder_linear, pack_linears, write_packed_folder, PackedFolder, PackedSpill, PackedTensor,
};
use crate::codecs::gptq::{packed_len, GptqPacked};
use crate::model::SourceModel;
use crate::tensor::TensorRef;
use crate::{Error, Result};

/// Default largest weight file: 5 GB, the `max_shard_size` of transformers 4.x's `save_pretrained` and of
/// `huggingface_hub`'s `split_torch_state_dict_into_shards` (transformers 5 raised its own to 50 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The GPTQ settings recorded in `quantization_config`, and how the weights are split into files.
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
    /// The calibration text's name (recorded in `meta.calibration_dataset`, so that an evaluation on the same
    /// text can say that it flatters the model).
    pub calibration_dataset: Option<String>,
    /// Largest weight file in bytes of tensor data (`None`: [`DEFAULT_MAX_SHARD_BYTES`]); more data is
    /// split into shards, a tensor larger than this getting a shard of its own. Not recorded in the config.
    pub max_shard_bytes: Option<u64>,
}

impl GptqConfig {
    /// The `quantization_config` object, as the reference recommends for the widest compatibility.
    pub fn to_json(&self) -> Value {
        let mut meta =
            json!({"quantizer": [format!("quant-studio:{}", env!("CARGO_PKG_VERSION"))]});
        if let Some(d) = &self.calibration_dataset {
            meta["calibration_dataset"] = json!(d);
        }
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
            "meta": meta,
        })
    }

    /// Groups of a layer with `in_features` inputs.
    pub fn groups(&self, in_features: usize) -> usize {
        self.group_size.map_or(1, |g| in_features.div_ceil(g))
    }
}

/// GPTQ's packing needs input and output sizes that are multiples of 32.
pub fn check_gptq_shape(t: &TensorRef) -> Result<()> {
    let (n, k) = (t.rows(), t.cols());
    if n % 32 != 0 || k % 32 != 0 {
        return Err(Error::Invalid(format!(
            "{}: GPTQ needs input and output sizes that are multiples of 32 (got {n}×{k})",
            t.name
        )));
    }
    Ok(())
}

/// The folder format: `quantization_config`, `quantize_config.json`, the linears packed.
pub fn gptq_folder(cfg: &GptqConfig) -> PackedFolder {
    let mut metadata = Map::new();
    metadata.insert("gptq_bits".into(), json!(cfg.bits.to_string()));
    PackedFolder {
        quantization_config: cfg.to_json(),
        side_files: vec![("quantize_config.json", cfg.to_json())],
        metadata,
        max_shard_bytes: cfg.max_shard_bytes.unwrap_or(DEFAULT_MAX_SHARD_BYTES),
        packs: is_decoder_linear,
    }
}

/// The stored tensors of a packed `[n, k]` linear: `qweight`, `qzeros`, `scales`, `g_idx`.
pub fn gptq_parts(cfg: &GptqConfig, n: usize, k: usize, p: GptqPacked) -> Vec<PackedTensor> {
    let (g, b) = (cfg.groups(k), cfg.bits);
    vec![
        PackedTensor::new("qweight", "I32", vec![packed_len(k, b), n], p.qweight),
        PackedTensor::new("qzeros", "I32", vec![g, packed_len(n, b)], p.qzeros),
        PackedTensor::new("scales", "F16", vec![g, n], p.scales),
        PackedTensor::new("g_idx", "I32", vec![k], p.g_idx),
    ]
}

/// Write `src` as a GPTQ folder into `out` (created if missing; callers write through an
/// [`crate::output::Staged`] temporary). `quantize_linear` packs one decoder linear (given in PyTorch
/// order `[out, in]`); `progress(done, total)` returning `false` cancels.
pub fn write_gptq_folder(
    src: &SourceModel,
    cfg: &GptqConfig,
    out: &Path,
    quantize_linear: &mut dyn FnMut(&TensorRef) -> Result<GptqPacked>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    for t in src.tensors.values().filter(|t| is_decoder_linear(&t.name)) {
        check_gptq_shape(t)?;
    }
    let fmt = gptq_folder(cfg);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut spill = PackedSpill::create(&out.join(".packed-linears"))?;
    pack_linears(
        src,
        &fmt,
        &mut spill,
        &mut |t| Ok(gptq_parts(cfg, t.rows(), t.cols(), quantize_linear(t)?)),
        &mut |_, _| true,
    )?;
    write_packed_folder(src, &fmt, out, &mut spill, progress)?;
    spill.remove()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::gptq::pack_gptq;
    use crate::infer::{Logits, Model};
    use crate::model::fixture::{write_fixture, FixtureSpec};

    fn rtn(t: &TensorRef, cfg: &GptqConfig) -> Result<GptqPacked> {
        let (n, k) = (t.rows(), t.cols());
        let gs = cfg.group_size.unwrap_or(k);
        let maxq = (1u32 << cfg.bits) - 1;
        let w = t.to_f32();
        let groups = k / gs;
        let (mut q, mut zeros, mut scales) = (
            vec![0u8; n * k],
            vec![0u32; groups * n],
            vec![0f32; groups * n],
        );
        for r in 0..n {
            for g in 0..groups {
                let cols = &w[r * k + g * gs..r * k + (g + 1) * gs];
                let lo = cols.iter().copied().fold(0.0f32, f32::min);
                let hi = cols.iter().copied().fold(0.0f32, f32::max);
                let s = half::f16::from_f32(((hi - lo) / maxq as f32).max(1e-6)).to_f32();
                let z = ((-lo / s).round() as u32).clamp(1, maxq);
                (scales[g * n + r], zeros[g * n + r]) = (s, z);
                for (c, &x) in cols.iter().enumerate() {
                    q[r * k + g * gs + c] =
                        ((x / s).round() + z as f32).clamp(0.0, maxq as f32) as u8;
                }
            }
        }
        let g_idx: Vec<u32> = (0..k).map(|c| (c / gs) as u32).collect();
        pack_gptq(cfg.bits, n, k, &q, &zeros, &scales, &g_idx)
    }

    fn header(bytes: &[u8]) -> Map<String, Value> {
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        serde_json::from_slice(&bytes[8..8 + n]).expect("header")
    }

    #[test]
    fn sharded_folder_holds_the_single_files_tensors_and_runs_the_same() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src_dir = tmp.path().join("src");
        write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let mut cfg = GptqConfig {
            bits: 4,
            group_size: Some(32),
            desc_act: false,
            static_groups: false,
            sym: false,
            damp_percent: 0.01,
            true_sequential: true,
            calibration_dataset: Some("calib.txt".into()),
            max_shard_bytes: None,
        };
        let single = tmp.path().join("single");
        let c = cfg.clone();
        write_gptq_folder(&src, &cfg, &single, &mut |t| rtn(t, &c), &mut |_, _| true)
            .expect("single");
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .expect("ls")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("model"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&single), ["model.safetensors"]);
        // The calibration text is recorded and read back (for the evaluation's overlap notice).
        let back = SourceModel::open(&single).expect("reopen");
        assert_eq!(back.calibration_dataset.as_deref(), Some("calib.txt"));
        let one = std::fs::read(single.join("model.safetensors")).expect("read");
        let one_header = header(&one);
        let data_bytes =
            (one.len() - 8 - (u64::from_le_bytes(one[..8].try_into().expect("8")) as usize)) as u64;

        // A tenth of the data per shard.
        let limit = data_bytes / 10;
        cfg.max_shard_bytes = Some(limit);
        let sharded = tmp.path().join("sharded");
        let c = cfg.clone();
        let mut calls = 0;
        write_gptq_folder(
            &src,
            &cfg,
            &sharded,
            &mut |t| {
                calls += 1;
                rtn(t, &c)
            },
            &mut |_, _| true,
        )
        .expect("sharded");
        assert_eq!(calls, 14, "each linear is packed once");
        let files = names(&sharded);
        let n = files.len() - 1;
        assert!(n >= 5, "{files:?}");
        assert_eq!(files[n], "model.safetensors.index.json");
        for (i, f) in files[..n].iter().enumerate() {
            assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        }
        let index: Value = serde_json::from_slice(
            &std::fs::read(sharded.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("json");
        assert_eq!(index["metadata"]["total_size"], data_bytes);
        let map = index["weight_map"].as_object().expect("weight_map");
        let keys: Vec<&String> = map.keys().collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "sorted like sort_keys=True"
        );
        // Every tensor of the single file is in exactly one shard, the one the index names, with the same
        // bytes; shards stay under the limit unless they hold one tensor.
        let mut seen = std::collections::BTreeMap::new();
        let mut total = 0u64;
        for f in &files[..n] {
            let bytes = std::fs::read(sharded.join(f)).expect("shard");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("shard parses");
            let size: u64 = st
                .tensors()
                .iter()
                .map(|(_, t)| t.data().len() as u64)
                .sum();
            assert!(size <= limit || st.len() == 1, "{f}: {size} bytes");
            total += size;
            for (name, t) in st.tensors() {
                assert_eq!(map[&name], Value::from(f.as_str()), "{name}");
                assert!(
                    seen.insert(name.clone(), t.data().to_vec()).is_none(),
                    "{name} twice"
                );
            }
            assert_eq!(header(&bytes)["__metadata__"]["format"], "pt");
        }
        assert_eq!(total, data_bytes);
        let a = safetensors::SafeTensors::deserialize(&one).expect("single parses");
        assert_eq!(seen.len(), a.len());
        assert_eq!(map.len(), a.len());
        assert_eq!(one_header.len(), a.len() + 1);
        for (name, t) in a.tensors() {
            assert_eq!(seen[&name], t.data(), "{name}");
        }

        // Our reader sees the same model.
        let (p, q) = (
            SourceModel::open(&single).expect("open single"),
            SourceModel::open(&sharded).expect("open sharded"),
        );
        assert_eq!(
            p.tensors.keys().collect::<Vec<_>>(),
            q.tensors.keys().collect::<Vec<_>>()
        );
        assert_eq!(q.tensors.values().filter(|t| t.is_grouped()).count(), 14);
        for (x, y) in p.tensors.values().zip(q.tensors.values()) {
            let (x, y) = (x.to_f32(), y.to_f32());
            assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let toks = p
            .tokenizer
            .encode("the cat sat on the mat", false)
            .expect("toks");
        let (mp, mq) = (Model::load(&p).expect("p"), Model::load(&q).expect("q"));
        let lp = mp
            .forward(&toks, &mut mp.new_cache(64), Logits::All)
            .expect("p");
        let lq = mq
            .forward(&toks, &mut mq.new_cache(64), Logits::All)
            .expect("q");
        assert!(lp.iter().zip(&lq).all(|(a, b)| a.to_bits() == b.to_bits()));

        // Cancelled half way through the shards: nothing is left behind.
        let cancelled = tmp.path().join("cancelled");
        let c = cfg.clone();
        let r = crate::output::write_staged(crate::output::OutputSpec::folder(&cancelled), |tmp| {
            write_gptq_folder(&src, &cfg, tmp, &mut |t| rtn(t, &c), &mut |d, _| d < 8)
        });
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["sharded", "single", "src"]);
    }
}
