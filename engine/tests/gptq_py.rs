//! Our GPTQ folders, decoded by an independent numpy dequantiser written from the published layout
//! (`tests/gptq_py/dequantize_gptq.py`), give bit for bit the weights our engine evaluates — for 2, 3, 4
//! and 8 bits, grouped, per-channel and act-order `g_idx`, in one `model.safetensors` or in shards named by
//! `model.safetensors.index.json`. Needs `python3` with `numpy`.

use quant_engine::codecs::gptq::{pack_gptq, GptqPacked};
use quant_engine::infer::{Logits, Model};
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::SourceModel;
use quant_engine::tensor::TensorRef;
use quant_engine::testing::{assert_bits_equal, read_f32_file, run_python_oracle};
use quant_engine::writers::gptq::{write_gptq_folder, GptqConfig};

/// Round-to-nearest on GPTQ's asymmetric grid (zero kept in 1..=maxq), groups in `g_idx` order.
fn rtn(t: &TensorRef, cfg: &GptqConfig, act_order: bool) -> GptqPacked {
    let (n, k) = (t.rows(), t.cols());
    let maxq = (1u32 << cfg.bits) - 1;
    let gs = cfg.group_size.unwrap_or(k);
    let groups = k / gs;
    // Act-order style: group of column c is (c·7 mod k) / gs, a permutation of the columns.
    let g_idx: Vec<u32> = (0..k)
        .map(|c| (if act_order { c * 7 % k } else { c } / gs) as u32)
        .collect();
    let w = t.to_f32();
    let (mut q, mut zeros, mut scales) = (
        vec![0u8; n * k],
        vec![0u32; groups * n],
        vec![0f32; groups * n],
    );
    for r in 0..n {
        for g in 0..groups {
            let cols: Vec<usize> = (0..k).filter(|&c| g_idx[c] as usize == g).collect();
            let lo = cols.iter().map(|&c| w[r * k + c]).fold(0.0f32, f32::min);
            let hi = cols.iter().map(|&c| w[r * k + c]).fold(0.0f32, f32::max);
            let s = half::f16::from_f32(((hi - lo) / maxq as f32).max(1e-6)).to_f32();
            let z = ((-lo / s).round() as u32).clamp(1, maxq);
            scales[g * n + r] = s;
            zeros[g * n + r] = z;
            for &c in &cols {
                q[r * k + c] =
                    ((w[r * k + c] / s).round() + z as f32).clamp(0.0, maxq as f32) as u8;
            }
        }
    }
    pack_gptq(cfg.bits, n, k, &q, &zeros, &scales, &g_idx).expect("pack")
}

#[test]
fn numpy_dequantizer_reproduces_the_weights_we_evaluate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    let base = Model::load(&src).expect("load");
    let toks = src
        .tokenizer
        .encode("the cat sat on the mat", false)
        .expect("encode");
    let want = base
        .forward(&toks, &mut base.new_cache(64), Logits::Last)
        .expect("fwd");
    let mut checked = 0;
    // The last element: largest weight file (`None`: the 5 GB default, one file).
    for (bits, group_size, act_order, max_shard_bytes) in [
        (4, Some(32), false, None),
        (4, Some(32), true, None),
        (3, Some(32), false, None),
        (2, None, false, None),
        (8, Some(64), true, None),
        (4, Some(32), true, Some(16 << 10)),
    ] {
        let cfg = GptqConfig {
            bits,
            group_size,
            desc_act: act_order,
            static_groups: false,
            sym: false,
            damp_percent: 0.01,
            true_sequential: true,
            calibration_dataset: None,
            max_shard_bytes,
        };
        let tag = format!("{bits}-{group_size:?}-{act_order}-{max_shard_bytes:?}");
        let out = tmp.path().join(format!("gptq-{tag}"));
        write_gptq_folder(
            &src,
            &cfg,
            &out,
            &mut |t| Ok(rtn(t, &cfg, act_order)),
            &mut |_, _| true,
        )
        .expect("write");
        assert_eq!(
            out.join("model.safetensors").is_file(),
            max_shard_bytes.is_none()
        );
        if max_shard_bytes.is_some() {
            let shards = std::fs::read_dir(&out)
                .expect("ls")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count();
            assert!(shards >= 3, "{shards} shards");
        }
        let dq = tmp.path().join(format!("dq-{tag}"));
        std::fs::create_dir(&dq).expect("mkdir");
        run_python_oracle("gptq_py/dequantize_gptq.py", &[&out, &dq]);

        let q = SourceModel::open(&out).expect("open the GPTQ folder");
        let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
        assert_eq!(packed.len(), 7 * 2, "every decoder linear is packed");
        for t in packed {
            let p = dq.join(format!("{}.f32", t.name.trim_end_matches(".weight")));
            let theirs = read_f32_file(&p);
            let ours = t.to_f32();
            assert_bits_equal(&format!("{bits}-bit {}", t.name), &ours, &theirs);
            checked += 1;
        }
        // The folder runs; at 8 bits the next-token choice is the source's.
        let m = Model::load(&q).expect("load GPTQ");
        let got = m
            .forward(&toks, &mut m.new_cache(64), Logits::Last)
            .expect("fwd");
        if bits == 8 {
            assert_eq!(
                quant_engine::infer::argmax(&got),
                quant_engine::infer::argmax(&want)
            );
        }
        let cfg_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
                .expect("json");
        assert_eq!(cfg_json["quantization_config"]["bits"], bits);
        assert_eq!(cfg_json["quantization_config"]["checkpoint_format"], "gptq");
        assert!(out.join("quantize_config.json").is_file() && out.join("tokenizer.json").is_file());
    }
    assert_eq!(checked, 6 * 14);
}
