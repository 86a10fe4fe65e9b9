//! An AWQ (AutoAWQ GEMM) checkpoint made by an independent numpy packer written from the published layout
//! (`tests/awq_py/pack_awq.py`) reads into our engine with exactly the weights the packer says a loader
//! computes, and runs. Needs `python3` with `numpy`.

use quant_engine::infer::{Logits, Model};
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::SourceModel;
use quant_engine::tensor::TensorRef;
use quant_engine::testing::{assert_bits_equal, read_f32_file, run_python_oracle};

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
        run_python_oracle("awq_py/pack_awq.py", &[&src_dir, &out, &gs.to_string()]);
        let q = SourceModel::open(&out).expect("open the AWQ folder");
        let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
        assert_eq!(packed.len(), 14, "every decoder linear is an AWQ linear");
        for t in packed {
            assert_eq!(t.type_label(), format!("AWQ 4-bit g{gs}"));
            let p = out
                .join("dequant")
                .join(format!("{}.f32", t.name.trim_end_matches(".weight")));
            let theirs = read_f32_file(&p);
            let ours = t.to_f32();
            assert_bits_equal(&format!("g{gs} {}", t.name), &ours, &theirs);
        }
        let m = Model::load(&q).expect("load AWQ");
        let got = m
            .forward(&toks, &mut m.new_cache(64), Logits::Last)
            .expect("fwd");
        assert!(got.iter().all(|x| x.is_finite()));
    }
}
