//! An AWQ (AutoAWQ GEMM) checkpoint made by an independent numpy packer written from the published layout
//! (`tests/awq_py/pack_awq.py`) reads into our engine with exactly the weights the packer says a loader
//! computes, and runs. Needs `python3` with `numpy`.

use std::path::Path;
use std::process::Command;

use quant_engine::infer::{Logits, Model};
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::SourceModel;
use quant_engine::tensor::TensorRef;

#[test]
fn awq_gemm_checkpoints_read_with_the_weights_their_layout_defines() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    let toks = src
        .tokenizer
        .encode("the cat sat on the mat", false)
        .expect("encode");
    for gs in [32usize, 64] {
        let out = tmp.path().join(format!("awq-g{gs}"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/awq_py/pack_awq.py");
        let run = Command::new("python3")
            .arg(&script)
            .arg(&src_dir)
            .arg(&out)
            .arg(gs.to_string())
            .output()
            .expect("python3 must be installed (with numpy)");
        assert!(
            run.status.success(),
            "numpy packer failed:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let q = SourceModel::open(&out).expect("open the AWQ folder");
        let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
        assert_eq!(packed.len(), 14, "every decoder linear is an AWQ linear");
        for t in packed {
            assert_eq!(t.type_label(), format!("AWQ 4-bit g{gs}"));
            let p = out
                .join("dequant")
                .join(format!("{}.f32", t.name.trim_end_matches(".weight")));
            let theirs: Vec<f32> = std::fs::read(&p)
                .expect("numpy output")
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let ours = t.to_f32();
            assert_eq!(ours.len(), theirs.len(), "{}", t.name);
            if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
                panic!(
                    "g{gs} {}: element {i}: ours {} numpy {}",
                    t.name, ours[i], theirs[i]
                );
            }
        }
        let m = Model::load(&q).expect("load AWQ");
        let got = m
            .forward(&toks, &mut m.new_cache(64), Logits::Last)
            .expect("fwd");
        assert!(got.iter().all(|x| x.is_finite()));
    }
}
