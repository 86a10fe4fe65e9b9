//! gguf-py (llama.cpp's Python GGUF package) reads every kind of file our writer makes, and its own
//! dequantizers give, bit for bit, the values ours give: one pure file per block type, a llama-quantize mix
//! with an importance matrix, for a Llama and a Qwen2 fixture. Needs `python3` with `gguf` and `numpy`
//! (`.ci/run` installs them); the test fails, not skips, without them.

use std::path::Path;
use std::process::Command;

use quant_engine::codecs::GgmlType;
use quant_engine::imatrix::{compute_imatrix, ImatrixOptions};
use quant_engine::infer::Model;
use quant_engine::model::fixture::{write_fixture, FixtureSpec};
use quant_engine::model::gguf::{GgufArray, GgufFile, GgufValue};
use quant_engine::model::SourceModel;
use quant_engine::quantize::{quantize_gguf, GgufQuantizeOptions, ImatrixInput};
use quant_engine::recipes::gguf::GgufMix;
use serde_json::Value;

/// Wide enough for 256-element super-blocks everywhere.
fn spec(base: FixtureSpec) -> FixtureSpec {
    FixtureSpec {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ..base
    }
}

fn quantize(src: &SourceModel, mix: &str, imatrix: Option<ImatrixInput>, out: &Path) {
    let opts = GgufQuantizeOptions {
        mix: GgufMix::parse(mix).unwrap_or_else(|| panic!("mix {mix}")),
        overrides: Vec::new(),
        imatrix,
        backend: quant_engine::backend::Backend::Cpu,
    };
    quantize_gguf(
        src,
        &opts,
        &quant_engine::output::OutputSpec::file(out),
        &mut |_, _, _| true,
    )
    .unwrap_or_else(|e| panic!("{mix}: {e}"));
}

/// Our value as the JSON the script writes.
fn json_of(v: &GgufValue) -> Value {
    fn arr(a: &GgufArray) -> (usize, Vec<Value>) {
        let head: Vec<Value> = match a {
            GgufArray::Str(v) => v.iter().take(8).map(|s| Value::from(s.as_str())).collect(),
            GgufArray::F32(v) => v
                .iter()
                .take(8)
                .map(|&x| Value::from(f64::from(x)))
                .collect(),
            GgufArray::F64(v) => v.iter().take(8).map(|&x| Value::from(x)).collect(),
            GgufArray::Bool(v) => v.iter().take(8).map(|&x| Value::from(x)).collect(),
            other => other
                .to_ints()
                .expect("integer array")
                .into_iter()
                .take(8)
                .map(|x| Value::from(x as i64))
                .collect(),
        };
        (a.len(), head)
    }
    match v {
        GgufValue::Str(s) => Value::from(s.as_str()),
        GgufValue::F32(x) => Value::from(f64::from(*x)),
        GgufValue::F64(x) => Value::from(*x),
        GgufValue::Bool(b) => Value::from(*b),
        GgufValue::Array(a) => {
            let (len, head) = arr(a);
            serde_json::json!({ "len": len, "head": head })
        }
        other => Value::from(other.as_i128().expect("integer") as i64),
    }
}

fn check_file(path: &Path, dir: &Path) -> usize {
    let stem = path.file_stem().and_then(|s| s.to_str()).expect("stem");
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).expect("report"))
            .expect("json");
    let (g, _) = GgufFile::read(path).expect("read");
    let bytes = std::fs::read(path).expect("bytes");

    let kv = report["kv"].as_object().expect("kv");
    assert_eq!(kv.len(), g.metadata().len(), "{stem}: number of keys");
    for (k, v) in g.metadata() {
        let py = &kv
            .get(k)
            .unwrap_or_else(|| panic!("{stem}: gguf-py lacks {k}"));
        assert_eq!(
            py["type"],
            Value::from(v.type_name()),
            "{stem}: type of {k}"
        );
        assert_eq!(py["value"], json_of(v), "{stem}: value of {k}");
    }

    let tensors = report["tensors"].as_array().expect("tensors");
    assert_eq!(tensors.len(), g.tensors().len(), "{stem}: tensor count");
    for (t, py) in g.tensors().iter().zip(tensors) {
        assert_eq!(py["name"], Value::from(t.name.as_str()), "{stem}: order");
        assert_eq!(py["type"], Value::from(t.type_name()), "{stem} {}", t.name);
        let ne: Vec<u64> = py["ne"]
            .as_array()
            .expect("ne")
            .iter()
            .map(|d| d.as_u64().expect("dim"))
            .collect();
        assert_eq!(ne, t.ne, "{stem} {}: shape", t.name);
        let ty = GgmlType::from_ggml_id(t.ggml_type).expect("known type");
        let mut ours = vec![0.0f32; t.n_elements() as usize];
        let range = g.tensor_range(t).expect("range");
        ty.dequantize(&bytes[range], &mut ours);
        let theirs: Vec<f32> = std::fs::read(dir.join(py["data"].as_str().expect("data")))
            .expect("values")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(theirs.len(), ours.len(), "{stem} {}: element count", t.name);
        if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
            panic!(
                "{stem} {} ({}): element {i} is {} here, {} in gguf-py",
                t.name,
                t.type_name(),
                ours[i],
                theirs[i]
            );
        }
    }
    tensors.len()
}

#[test]
fn gguf_py_reads_every_file_we_write_and_dequantizes_like_us() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut files = Vec::new();
    for (arch, base) in [
        ("llama", FixtureSpec::tiny_llama()),
        ("qwen2", FixtureSpec::tiny_qwen2()),
    ] {
        let src_dir = tmp.path().join(arch);
        write_fixture(&spec(base), &src_dir).expect("fixture");
        let src = SourceModel::open(&src_dir).expect("open");
        let model = Model::load(&src).expect("load");
        let text = "Importance matrices weigh each column by how much it matters. ".repeat(30);
        let matrix = compute_imatrix(
            &model,
            &src.tokenizer,
            &text,
            "fixture.txt",
            &ImatrixOptions {
                n_ctx: 64,
                max_chunks: Some(4),
                ..ImatrixOptions::default()
            },
            &mut |_, _| true,
        )
        .expect("imatrix");
        let im = || ImatrixInput {
            matrix: matrix.clone(),
            file: Some("fixture.imatrix".into()),
        };
        if arch == "llama" {
            for ty in GgmlType::all() {
                let out = tmp.path().join(format!("{arch}-pure-{}.gguf", ty.name()));
                // The low-bit i-quants need importance weights (as in llama-quantize).
                let pure = GgufMix::Pure(ty);
                quantize(&src, pure.name(), pure.needs_imatrix().then(im), &out);
                files.push(out);
            }
        }
        for mix in [
            "q4_k_m", "q3_k_s", "iq4_xs", "q5_1", "iq1_m", "iq2_m", "iq3_xs",
        ] {
            let out = tmp.path().join(format!("{arch}-{mix}-imatrix.gguf"));
            quantize(&src, mix, Some(im()), &out);
            files.push(out);
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/gguf_py/dequantize_all.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(tmp.path())
        .args(&files)
        .output()
        .expect("python3 must be installed (with `pip install gguf numpy`)");
    assert!(
        out.status.success(),
        "gguf-py failed (pip install gguf numpy):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut checked = 0;
    for f in &files {
        checked += check_file(f, tmp.path());
    }
    // 22 pure files and 14 mixes, each with token_embd, output (qwen2) and 9 tensors per layer + norm.
    assert!(checked >= 36 * 20, "{checked} tensors checked");
}
