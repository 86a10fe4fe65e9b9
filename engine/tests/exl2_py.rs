//! EXL2 folders against an independent numpy packer and dequantiser written from ExLlamaV2's layout
//! (`tests/exl2_py/exl2_np.py`): a folder the packer makes (`output.safetensors`, no index, mixed widths
//! 8/6/5/4/3/2, random act-order permutations, padded output head) reads into our engine with exactly the
//! weights the layout defines and runs; the folders our EXL2 quantizer writes decode, in the numpy
//! dequantiser, to exactly the weights our engine evaluates. Needs `python3` with `numpy`.

use quant_engine::calib::{CalibOptions, CalibSource};
use quant_engine::infer::{Logits, Model};
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::SourceModel;
use quant_engine::output::OutputSpec;
use quant_engine::quantize_exl2::{quantize_exl2, Exl2QuantizeOptions};
use quant_engine::tensor::TensorRef;
use quant_engine::testing::{assert_bits_equal, read_f32_file, run_python_oracle};

fn check_against_numpy(folder: &std::path::Path, dequant: &std::path::Path) -> usize {
    let q = SourceModel::open(folder).expect("open the EXL2 folder");
    let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
    for t in &packed {
        assert!(t.type_label().starts_with("EXL2"), "{}", t.type_label());
        let p = dequant.join(format!("{}.f32", t.name.trim_end_matches(".weight")));
        let theirs = read_f32_file(&p);
        let ours = t.to_f32();
        // numpy writes the padded rows too; ours stops at the model's width.
        assert!(theirs.len() >= ours.len() && theirs.len() - ours.len() < 32 * t.cols());
        assert_bits_equal(&t.name, &ours, &theirs[..ours.len()]);
        assert!(theirs[ours.len()..].iter().all(|&x| x == 0.0));
    }
    packed.len()
}

#[test]
fn exl2_folders_from_an_independent_packer_read_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, spec) in [
        ("llama", FixtureSpec::tiny_llama()),
        ("qwen2", FixtureSpec::tiny_qwen2()),
        // One KV head of 16: k/v have 16 outputs, padded to 32 in the file.
        (
            "llama-kv1",
            FixtureSpec {
                kv_heads: 1,
                ..FixtureSpec::tiny_llama()
            },
        ),
    ] {
        let src_dir = tmp.path().join(name);
        write_fixture(&spec, &src_dir).expect("fixture");
        let out = tmp.path().join(format!("{name}-exl2"));
        run_python_oracle("exl2_py/exl2_np.py", &[&"pack", &src_dir, &out]);
        assert!(out.join("output.safetensors").exists());
        assert_eq!(
            check_against_numpy(&out, &out.join("dequant")),
            15,
            "{name}"
        );
        let src = SourceModel::open(&src_dir).expect("open");
        let toks = src
            .tokenizer
            .encode("the cat sat on the mat", false)
            .expect("encode");
        let m = Model::load(&SourceModel::open(&out).expect("open")).expect("load EXL2");
        let got = m
            .forward(&toks, &mut m.new_cache(64), Logits::Last)
            .expect("fwd");
        assert!(got.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn our_exl2_folders_decode_in_numpy_to_what_we_evaluate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    // One KV head: k/v's 16 outputs are padded to 32 in the file.
    let spec = FixtureSpec {
        kv_heads: 1,
        ..FixtureSpec::tiny_llama()
    };
    write_fixture(&spec, &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    let text = tmp.path().join("calib.txt");
    std::fs::write(
        &text,
        "The keeper counted the boats in the harbour every evening and wrote the number down. "
            .repeat(40),
    )
    .expect("text");
    let out = tmp.path().join("exl2");
    let opts = Exl2QuantizeOptions {
        budget: quant_engine::recipes::MixBudget::Bpw(4.5),
        head_bits: 4,
        calib: CalibSource::File {
            path: text,
            column: None,
        },
        calib_opts: CalibOptions {
            rows: 6,
            seq_len: 40,
            seed: 1,
        },
        measure_rows: 3,
        ..Exl2QuantizeOptions::default()
    };
    quantize_exl2(&src, &opts, &OutputSpec::folder(&out), &mut |_, _, _, _| {
        true
    })
    .expect("exl2");
    let deq = tmp.path().join("deq");
    run_python_oracle("exl2_py/exl2_np.py", &[&"dequant", &out, &deq]);
    assert_eq!(check_against_numpy(&out, &deq), 15);
}
