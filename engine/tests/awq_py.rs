//! AWQ checkpoints (AutoAWQ GEMM and compressed-tensors pack-quantized) made by an independent numpy packer
//! written from the published layouts (`tests/awq_py/pack_awq.py`) read into our engine with exactly the
//! weights the packer says a loader computes, and run; the folders our AWQ quantizer writes decode, in an
//! independent numpy dequantiser (`tests/awq_py/dequantize_awq.py`), to exactly the weights our engine
//! evaluates. Needs `python3` with `numpy`.

use quant_engine::calib::{CalibOptions, CalibSource};
use quant_engine::infer::{Logits, Model};
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::SourceModel;
use quant_engine::output::OutputSpec;
use quant_engine::quantize_awq::{quantize_awq, AwqQuantizeOptions};
use quant_engine::solvers::awq::AwqGrid;
use quant_engine::tensor::TensorRef;
use quant_engine::testing::{assert_bits_equal, read_f32_file, run_python_oracle};
use quant_engine::writers::awq::AwqLayout;

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

#[test]
fn compressed_tensors_checkpoints_read_with_the_weights_their_layout_defines() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    let toks = src.tokenizer.encode("the cat sat", false).expect("encode");
    // 4-bit asymmetric (llm-compressor's AWQ), 3-bit (fields straddle words), 8-bit symmetric (no zeros).
    for (layout, bits, label) in [
        ("ct", "4", "int4 g32 asym"),
        ("ct", "3", "int3 g32 asym"),
        ("ct-sym", "8", "int8 g32"),
    ] {
        let out = tmp.path().join(format!("{layout}-{bits}"));
        run_python_oracle(
            "awq_py/pack_awq.py",
            &[&src_dir, &out, &"32", &layout, &bits],
        );
        let q = SourceModel::open(&out).expect("open the compressed-tensors folder");
        let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
        assert_eq!(packed.len(), 14);
        for t in packed {
            assert_eq!(t.type_label(), format!("{label} (compressed-tensors)"));
            let p = out
                .join("dequant")
                .join(format!("{}.f32", t.name.trim_end_matches(".weight")));
            assert_bits_equal(
                &format!("{layout} {bits} {}", t.name),
                &t.to_f32(),
                &read_f32_file(&p),
            );
        }
        let m = Model::load(&q).expect("load");
        let got = m
            .forward(&toks, &mut m.new_cache(16), Logits::Last)
            .expect("fwd");
        assert!(got.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn our_awq_folders_decode_independently_to_the_weights_we_evaluate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src_dir = tmp.path().join("src");
    write_fixture(&FixtureSpec::tiny_llama(), &src_dir).expect("fixture");
    let src = SourceModel::open(&src_dir).expect("open");
    let text = tmp.path().join("calib.txt");
    std::fs::write(
        &text,
        "A lighthouse keeper wrote down the ships that passed, the weather and the tides. "
            .repeat(40),
    )
    .expect("text");
    for (layout, bits) in [
        (AwqLayout::Gemm, 4u8),
        (AwqLayout::CompressedTensors, 4),
        (AwqLayout::CompressedTensors, 3),
    ] {
        let out = tmp.path().join(format!("{layout:?}-{bits}"));
        let o = AwqQuantizeOptions {
            grid: AwqGrid {
                bits,
                group_size: 32,
            },
            layout,
            calib: CalibSource::File {
                path: text.clone(),
                column: None,
            },
            calib_opts: CalibOptions {
                rows: 4,
                seq_len: 32,
                seed: 1,
            },
            search_rows: 2,
            ..AwqQuantizeOptions::default()
        };
        quantize_awq(&src, &o, &OutputSpec::folder(&out), &mut |_, _, _| true).expect("awq");
        let dq = tmp.path().join(format!("dq-{layout:?}-{bits}"));
        run_python_oracle("awq_py/dequantize_awq.py", &[&out, &dq]);
        let q = SourceModel::open(&out).expect("open ours");
        let packed: Vec<&TensorRef> = q.tensors.values().filter(|t| t.is_grouped()).collect();
        assert_eq!(packed.len(), 14);
        for t in packed {
            let p = dq.join(format!("{}.f32", t.name.trim_end_matches(".weight")));
            assert_bits_equal(
                &format!("{layout:?} {bits} {}", t.name),
                &t.to_f32(),
                &read_f32_file(&p),
            );
        }
    }
}
