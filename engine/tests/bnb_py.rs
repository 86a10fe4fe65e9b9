//! Our bitsandbytes 4-bit folders (NF4/FP4, with and without double quantization), decoded by an
//! independent numpy dequantiser written from the published layout (`tests/bnb_py/dequantize_bnb.py`), give
//! bit for bit the weights our engine evaluates; the folder reads back into a model whose output is close to
//! the source's. Needs `python3` with `numpy`.

use quant_engine::codecs::bnb::Bnb4Kind;
use quant_engine::infer::{Logits, Model};
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::SourceModel;
use quant_engine::output::OutputSpec;
use quant_engine::quantize_packed::quantize_packed;
use quant_engine::tensor::TensorRef;
use quant_engine::testing::{assert_bits_equal, read_f32_file, run_python_oracle};
use quant_engine::writers::bnb::Bnb4Options;

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
    for kind in [Bnb4Kind::Nf4, Bnb4Kind::Fp4] {
        for double_quant in [false, true] {
            let o = Bnb4Options { kind, double_quant };
            let tag = format!("{}-{double_quant}", kind.name());
            let out = tmp.path().join(format!("bnb-{tag}"));
            let mut seen = 0;
            let report = quantize_packed(&src, &o, &OutputSpec::folder(&out), &mut |_, _, _| {
                seen += 1;
                true
            })
            .expect("quantize");
            assert_eq!(seen, 14, "every decoder linear reported");
            // Codes and block scales, plus per linear the 16-entry map, the nested map and the quant state's
            // JSON (a lot for these tiny linears).
            for m in &report.modules {
                let n = src.tensor(&m.tensor).expect("source").numel();
                let blocks = n.div_ceil(64);
                let scales = if double_quant {
                    blocks + 4 * blocks.div_ceil(256) + 1024
                } else {
                    4 * blocks
                };
                let fixed = n.div_ceil(2) + scales + 64;
                let bytes = (m.bits_per_weight * n as f64 / 8.0).round() as usize;
                assert!(
                    (fixed + 60..fixed + 200).contains(&bytes),
                    "{tag} {}: {bytes} bytes, {fixed} + JSON",
                    m.tensor
                );
            }
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
                    .expect("json");
            assert_eq!(
                cfg["quantization_config"]["bnb_4bit_quant_type"],
                kind.name()
            );
            assert_eq!(
                cfg["quantization_config"]["bnb_4bit_use_double_quant"],
                double_quant
            );

            let dq = tmp.path().join(format!("dq-{tag}"));
            std::fs::create_dir(&dq).expect("mkdir");
            run_python_oracle("bnb_py/dequantize_bnb.py", &[&out, &dq]);

            let q = SourceModel::open(&out).expect("open the bitsandbytes folder");
            let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
            assert_eq!(packed.len(), 14, "every decoder linear is packed");
            for t in packed {
                let p = dq.join(format!("{}.f32", t.name.trim_end_matches(".weight")));
                let theirs = read_f32_file(&p);
                let ours = t.to_f32();
                assert_bits_equal(&format!("{tag} {}", t.name), &ours, &theirs);
                // And close to the source.
                let s = src.tensor(&t.name).expect("source").to_f32();
                let (e2, n2) = s
                    .iter()
                    .zip(&ours)
                    .fold((0.0f64, 0.0f64), |(e, n), (a, b)| {
                        (e + f64::from(a - b).powi(2), n + f64::from(*a).powi(2))
                    });
                assert!(
                    (e2 / n2).sqrt() < 0.2,
                    "{tag} {}: rel. error {}",
                    t.name,
                    (e2 / n2).sqrt()
                );
            }
            // The packed model runs and stays near the source.
            let m = Model::load(&q).expect("load packed");
            let got = m
                .forward(&toks, &mut m.new_cache(64), Logits::Last)
                .expect("fwd");
            let diff = want
                .iter()
                .zip(&got)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            let scale = want.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            assert!(
                diff < 0.5 * scale.max(1.0),
                "{tag}: logits moved by {diff} (scale {scale})"
            );
            assert!(diff > 0.0, "{tag}: quantization changed nothing");
        }
    }
}
