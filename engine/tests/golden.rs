//! The forward pass against transformers (float32, eager attention) on tiny fixture models.
//!
//! The fixture folders under `tests/golden/<name>/` are written by the engine's fixture builder
//! (`cargo test -p quant_engine --test golden -- --ignored regenerate_golden_fixtures`), and
//! `tests/golden/make_golden.py` stores transformers' logits and greedy continuation beside them in
//! `golden.json`.

use std::path::{Path, PathBuf};

use quant_engine::infer::{generate, GenerateOptions, Logits, Model, StopReason};
use quant_engine::model::fixture::{
    fixture_files, fixture_tensor_refs, golden_cases, FixtureSpec, IM_END_ID,
};
use quant_engine::model::SourceModel;
use serde_json::Value;

/// Name and builder spec of every golden case.
fn cases() -> Vec<(&'static str, FixtureSpec)> {
    golden_cases()
}

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The committed folders are byte-for-byte what the builder writes, so the golden numbers stay tied to
/// the builder.
#[test]
fn committed_fixtures_match_the_builder() {
    for (name, spec) in cases() {
        let dir = golden_root().join(name);
        for (file, bytes) in fixture_files(&spec).expect("fixture files") {
            let on_disk = std::fs::read(dir.join(file))
                .unwrap_or_else(|e| panic!("{name}/{file}: {e} (run regenerate_golden_fixtures)"));
            assert!(
                on_disk == bytes,
                "{name}/{file} differs from the builder's output"
            );
        }
    }
}

fn load_golden(name: &str) -> Value {
    let path = golden_root().join(name).join("golden.json");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/golden/make_golden.py)", path.display()));
    serde_json::from_slice(&bytes).expect("golden json")
}

/// Logits at the stored positions within 1e-3 of max |logit|, top-1 agreement everywhere, and the
/// greedy continuation token by token through the cache. Returns the worst relative error.
fn check_logits_and_greedy(
    name: &str,
    model: &Model,
    golden: &Value,
    is_eos: &dyn Fn(u32) -> bool,
) -> f32 {
    let ids = u32s(&golden["input_ids"]);
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache(64);
    let logits = model
        .forward(&ids, &mut cache, Logits::All)
        .expect("forward");
    assert_eq!(logits.len(), ids.len() * vocab);

    let positions = u32s(&golden["logits"]["positions"]);
    let rows = golden["logits"]["rows"].as_array().expect("rows");
    let mut worst = 0.0f32;
    for (&p, want) in positions.iter().zip(rows) {
        let want = f32s(want);
        let got = &logits[p as usize * vocab..(p as usize + 1) * vocab];
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        worst = worst.max(err);
        assert!(err <= 1e-3, "{name}: position {p}: relative error {err}");
    }
    let want_top = u32s(&golden["argmax"]);
    let max_abs = f32s(&golden["max_abs"]);
    for (p, row) in logits.chunks_exact(vocab).enumerate() {
        assert_eq!(argmax(row), want_top[p], "{name}: top-1 at position {p}");
        let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            (m - max_abs[p]).abs() <= 1e-3 * max_abs[p],
            "{name}: max |logit| at {p}"
        );
    }

    let want_greedy = u32s(&golden["greedy"]);
    let mut got = Vec::new();
    let mut last = logits[(ids.len() - 1) * vocab..].to_vec();
    for _ in 0..want_greedy.len() {
        let t = argmax(&last);
        got.push(t);
        if is_eos(t) {
            break;
        }
        last = model.forward(&[t], &mut cache, Logits::Last).expect("step");
    }
    assert_eq!(got, want_greedy, "{name}: greedy continuation");
    worst
}

/// The forward pass alone, on the builder's tensors (no file reader involved).
#[test]
fn forward_matches_transformers_on_builder_tensors() {
    for (name, spec) in cases() {
        let golden = load_golden(name);
        let tensors = fixture_tensor_refs(&spec).expect("tensors");
        let model = Model::from_parts(Path::new(name), &spec.config(), &tensors).expect("model");
        let worst = check_logits_and_greedy(name, &model, &golden, &|t| t == IM_END_ID);
        eprintln!("{name}: worst relative logit error {worst:.2e}");
    }
}

/// The whole path: open the folder, load, forward, tokenize, generate.
#[test]
fn forward_matches_transformers() {
    for (name, _) in cases() {
        let dir = golden_root().join(name);
        let golden = load_golden(name);
        let src = SourceModel::open(&dir).expect("open fixture");
        let model = Model::load(&src).expect("load");
        let ids = u32s(&golden["input_ids"]);
        // The folder's tokenizer agrees with transformers'.
        let text = golden["text"].as_str().expect("text");
        let ours = src.tokenizer.encode(text, false).expect("encode");
        assert_eq!(&ours[..ids.len()], ids.as_slice(), "{name}: tokenization");

        check_logits_and_greedy(name, &model, &golden, &|t| src.tokenizer.is_eos(t));

        // Greedy through `generate` (fresh cache), as text.
        let want_greedy = u32s(&golden["greedy"]);
        let mut cache = model.new_cache(64);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            ..Default::default()
        };
        let mut streamed = String::new();
        let (text, stats) = generate(&model, &src.tokenizer, &ids, &mut cache, &opts, &mut |s| {
            streamed.push_str(s);
            true
        })
        .expect("generate");
        assert_eq!(
            text,
            golden["greedy_text"].as_str().expect("greedy_text"),
            "{name}"
        );
        assert_eq!(streamed, text, "{name}: streamed pieces add up to the text");
        let ended_on_eos = want_greedy.last().is_some_and(|&t| src.tokenizer.is_eos(t));
        let want_reason = if ended_on_eos {
            StopReason::Eos
        } else {
            StopReason::MaxTokens
        };
        assert_eq!(stats.stop_reason, want_reason, "{name}");
        assert_eq!(stats.prompt_tokens, ids.len());
        assert_eq!(
            stats.generated_tokens,
            want_greedy.len() - usize::from(ended_on_eos)
        );
    }
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF against transformers on gguf-py's dequantised weights
/// (`tests/golden/make_smollm2_golden.py`): reader, codecs, Q/K row order and forward pass together.
#[test]
fn smollm2_gguf_matches_transformers() {
    let golden = load_golden("smollm2");
    let path = quant_engine::testing::smollm2_gguf();
    let src = SourceModel::open(&path).expect("open SmolLM2");
    let model = Model::load(&src).expect("load");
    let ids = u32s(&golden["input_ids"]);
    let prompt = golden["prompt"].as_str().expect("prompt");
    assert_eq!(
        src.tokenizer.encode(prompt, false).expect("encode"),
        ids,
        "tokenization"
    );

    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache(64);
    let logits = model
        .forward(&ids, &mut cache, Logits::All)
        .expect("forward");
    let max_abs = f32s(&golden["max_abs"]);
    let mut worst = 0.0f32;
    for (p, row) in logits.chunks_exact(vocab).enumerate() {
        let top = golden["top"][p].as_array().expect("top");
        assert_eq!(
            argmax(row) as u64,
            top[0][0].as_u64().expect("id"),
            "top-1 at {p}"
        );
        for pair in top {
            let (id, v) = (
                pair[0].as_u64().expect("id") as usize,
                pair[1].as_f64().expect("v") as f32,
            );
            let err = (row[id] - v).abs() / max_abs[p];
            worst = worst.max(err);
            assert!(err <= 1e-3, "position {p}, id {id}: {} vs {v}", row[id]);
        }
    }
    let probe_ids = u32s(&golden["probe_ids"]);
    for (&p, want) in u32s(&golden["probe_positions"])
        .iter()
        .zip(golden["probe_rows"].as_array().expect("rows"))
    {
        let row = &logits[p as usize * vocab..(p as usize + 1) * vocab];
        for (&id, w) in probe_ids.iter().zip(f32s(want)) {
            let err = (row[id as usize] - w).abs() / max_abs[p as usize];
            worst = worst.max(err);
            assert!(
                err <= 1e-3,
                "position {p}, id {id}: {} vs {w}",
                row[id as usize]
            );
        }
    }

    let want = u32s(&golden["greedy"]);
    let mut got = Vec::new();
    let mut last = logits[(ids.len() - 1) * vocab..].to_vec();
    for _ in 0..want.len() {
        let t = argmax(&last);
        got.push(t);
        if src.tokenizer.is_eos(t) {
            break;
        }
        last = model.forward(&[t], &mut cache, Logits::Last).expect("step");
    }
    assert_eq!(got, want, "greedy continuation");
    eprintln!("smollm2: worst relative logit error {worst:.2e}");
}
