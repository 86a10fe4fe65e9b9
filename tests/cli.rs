//! The `quant-studio` binary end to end, on the tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quant_engine::eval::{perplexity, EvalOptions};
use quant_engine::infer::Model;
use quant_engine::model::fixture::{write_fixture, FixtureSpec, FIXTURE_VOCAB};
use quant_engine::model::SourceModel;

const TEXT: &str = "The keeper counted the boats in the harbour every evening, and wrote the number in a \
    small book. Some nights the wind came from the sea and the boats knocked together like wooden bells; \
    other nights the water lay still and the lamps on the pier shone in it. The children of the village \
    asked him why he counted, and he said that a harbour is a promise.\n";

struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    text: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny-llama");
    write_fixture(&FixtureSpec::tiny_llama(), &model).expect("fixture");
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT.repeat(4)).expect("text");
    Fixture {
        _dir: dir,
        model,
        text,
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quant-studio"))
        .args(args)
        .output()
        .expect("run quant-studio")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

#[test]
fn inspect_json_reports_the_fixture() {
    let f = fixture();
    let o = run(&["inspect", s(&f.model), "--json"]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON on stdout");
    let spec = FixtureSpec::tiny_llama();
    assert_eq!(v["arch"], "LlamaForCausalLM", "{v}");
    assert_eq!(v["layers"].as_u64(), Some(spec.layers as u64), "{v}");
    assert_eq!(v["hidden"].as_u64(), Some(spec.hidden as u64), "{v}");
    assert_eq!(
        v["intermediate"].as_u64(),
        Some(spec.intermediate as u64),
        "{v}"
    );
    assert_eq!(v["heads"].as_u64(), Some(spec.heads as u64), "{v}");
    assert_eq!(v["kv_heads"].as_u64(), Some(spec.kv_heads as u64), "{v}");
    assert_eq!(v["vocab"].as_u64(), Some(FIXTURE_VOCAB as u64), "{v}");
    assert_eq!(v["tied"].as_bool(), Some(true), "{v}");
    let src = SourceModel::open(&f.model).expect("open");
    assert_eq!(
        v["parameter_count"].as_u64(),
        Some(src.parameter_count()),
        "{v}"
    );
    let text = run(&["inspect", s(&f.model)]);
    assert_ok(&text);
    assert!(!stdout(&text).trim().is_empty());
}

/// The number after `key` in `text` (up to the next space).
fn number_after(text: &str, key: &str) -> f64 {
    let rest = &text[text
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in:\n{text}"))
        + key.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|w| w.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in:\n{text}"))
}

#[test]
fn eval_prints_llama_perplexity_lines_and_the_engines_number() {
    let f = fixture();
    let o = run(&[
        "eval",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
        "--chunks",
        "3",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("[1]") && out.contains("[3]"), "{out}");
    let ppl = number_after(&out, "Final estimate: PPL = ");
    assert!(ppl.is_finite() && ppl > 1.0, "{out}");
    assert!(out.contains("+/-"), "{out}");

    let o = run(&[
        "eval",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
        "--chunks",
        "3",
        "--json",
    ]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let ppl_json = v["ppl"].as_f64().expect("ppl");
    assert_eq!(v["n_chunks"].as_u64(), Some(3));
    assert!((ppl - ppl_json).abs() < 1e-4 * ppl_json);

    // The same number from the engine directly.
    let src = SourceModel::open(&f.model).expect("open");
    let model = Model::load(&src).expect("load");
    let opts = EvalOptions {
        n_ctx: 32,
        max_chunks: Some(3),
        ..EvalOptions::default()
    };
    let text = std::fs::read_to_string(&f.text).expect("text");
    let direct = perplexity(&model, &src.tokenizer, &text, &opts, &mut |_| true).expect("ppl");
    assert!(
        (direct.ppl - ppl_json).abs() <= 1e-9 * direct.ppl,
        "{} vs {ppl_json}",
        direct.ppl
    );
}

#[test]
fn eval_with_base_prints_the_kld_block() {
    let f = fixture();
    let o = run(&[
        "eval",
        s(&f.model),
        "--base",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
        "--chunks",
        "2",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    for needle in [
        "Mean PPL(Q)",
        "Mean    KLD:",
        "Median  KLD",
        "RMS Δp",
        "Same top p",
    ] {
        assert!(out.contains(needle), "{needle:?} missing:\n{out}");
    }
    assert!(number_after(&out, "Mean    KLD:").abs() < 1e-3, "{out}");
}

#[test]
fn a_bad_path_exits_1_with_one_error_line() {
    let o = run(&["inspect", "/nonexistent/no-model-here"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("/nonexistent/no-model-here"), "{err}");
}

#[test]
fn eval_on_too_short_a_text_says_how_many_tokens_are_needed() {
    let f = fixture();
    let o = run(&[
        "eval",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "4096",
        "--allow-long-context",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("at least 8192"), "{err}");
}

#[test]
fn generate_prints_text() {
    let f = fixture();
    let o = run(&[
        "generate",
        s(&f.model),
        "--prompt",
        "The keeper counted",
        "--max-tokens",
        "5",
        "--raw",
    ]);
    assert_ok(&o);
    assert!(!stdout(&o).trim().is_empty(), "no text on stdout");
    assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
    // With the chat template too.
    let o = run(&[
        "generate",
        s(&f.model),
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--threads",
        "1",
    ]);
    assert_ok(&o);
}

#[test]
fn generate_with_a_draft_prints_the_same_text_and_its_acceptance() {
    let f = fixture();
    let args = [
        "generate",
        s(&f.model),
        "--prompt",
        "The keeper counted",
        "--max-tokens",
        "9",
        "--raw",
    ];
    let plain = run(&args);
    assert_ok(&plain);
    let mut with_draft = args.to_vec();
    with_draft.extend(["--draft", s(&f.model), "--draft-tokens", "3"]);
    let o = run(&with_draft);
    assert_ok(&o);
    assert_eq!(stdout(&o), stdout(&plain));
    assert!(stderr(&o).contains("accepted, 100.0%"), "{}", stderr(&o));
    // Out of range: one line that gives the range.
    let last = with_draft.len() - 1;
    with_draft[last] = "0";
    let o = run(&with_draft);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("1..=16"), "{}", stderr(&o));
    // A minimum draft probability: the same text, fewer tokens drafted; out of range refused.
    with_draft[last] = "3";
    with_draft.extend(["--draft-p-min", "0.5"]);
    let o = run(&with_draft);
    assert_ok(&o);
    assert_eq!(stdout(&o), stdout(&plain));
    let last = with_draft.len() - 1;
    with_draft[last] = "1.5";
    let o = run(&with_draft);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("0..=1"), "{}", stderr(&o));
}

#[test]
fn convert_writes_a_folder_that_evaluates_like_the_source() {
    let f = fixture();
    let out = f.model.with_file_name("converted");
    let o = run(&["convert", s(&f.model), "--out", s(&out), "--dtype", "bf16"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("wrote"), "{}", stdout(&o));
    let src = SourceModel::open(&out).expect("open the converted folder");
    assert_eq!(src.config.torch_dtype.as_deref(), Some("bfloat16"));
    // KL-divergence of the bf16 copy from the f32 source: small but not zero.
    let o = run(&[
        "eval",
        s(&out),
        "--base",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
        "--json",
    ]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let kld = v["full_precision"]["kld"]["mean"]["value"]
        .as_f64()
        .expect("kld");
    assert!(kld > 0.0 && kld < 0.01, "{kld}");
    // Converting onto an existing, non-empty folder fails with one line.
    let o = run(&["convert", s(&f.model), "--out", s(&f.model)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn chat_reads_turns_from_stdin() {
    use std::io::Write as _;
    let f = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quant-studio"))
        .args(["chat", s(&f.model), "--max-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Hello\n/reset\nHello again\n/exit\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    assert_ok(&o);
    assert_eq!(
        stderr(&o).matches("generated:").count(),
        2,
        "{}",
        stderr(&o)
    );
}

#[test]
fn imatrix_then_quantize_with_it() {
    use quant_engine::imatrix::Imatrix;
    use quant_engine::model::gguf::{GgufFile, GgufValue};
    let f = fixture();
    let im = f.model.with_file_name("m.imatrix.gguf");
    let o = run(&[
        "imatrix",
        s(&f.model),
        "--calib",
        s(&f.text),
        "--calib-ctx",
        "32",
        "--out",
        s(&im),
    ]);
    assert_ok(&o);
    assert!(stdout(&o).contains("14 entries from"), "{}", stdout(&o));
    let m = Imatrix::read(&im).expect("our imatrix file");
    assert_eq!((m.entries.len(), m.chunk_size), (14, 32));
    assert_eq!(m.datasets, vec![s(&f.text).to_owned()]);
    let dat = f.model.with_file_name("m.imatrix.dat");
    let o = run(&[
        "imatrix",
        s(&f.model),
        "--calib",
        s(&f.text),
        "--calib-ctx",
        "32",
        "--out",
        s(&dat),
        "--dat",
    ]);
    assert_ok(&o);
    let d = Imatrix::read(&dat).expect("our .dat file");
    assert!(d.legacy);
    let w = d.weights("blk.1.ffn_down.weight").expect("entry");
    let g = m.weights("blk.1.ffn_down.weight").expect("entry");
    assert!(w
        .iter()
        .zip(&g)
        .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1e-3)));

    let plain = f.model.with_file_name("plain.gguf");
    assert_ok(&run(&[
        "quantize",
        s(&f.model),
        "--format",
        "q4_0",
        "--out",
        s(&plain),
    ]));
    let weighted = f.model.with_file_name("weighted.gguf");
    let o = run(&[
        "quantize",
        s(&f.model),
        "--format",
        "q4_0",
        "--imatrix",
        s(&im),
        "--out",
        s(&weighted),
    ]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("imatrix-weighted err"),
        "{}",
        stdout(&o)
    );
    let (g, _) = GgufFile::read(&weighted).expect("read");
    assert_eq!(
        g.get("quantize.imatrix.entries_count"),
        Some(&GgufValue::U32(14))
    );
    assert_eq!(
        g.get("quantize.imatrix.file").and_then(GgufValue::as_str),
        Some(s(&im))
    );
    assert_ne!(
        std::fs::read(&plain).expect("plain"),
        std::fs::read(&weighted).expect("weighted")
    );
    // The weighted file evaluates; --calib default computes a matrix from the bundled text first.
    assert_ok(&run(&[
        "eval",
        s(&weighted),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
    ]));
    let bundled = f.model.with_file_name("bundled.gguf");
    let o = run(&[
        "quantize",
        s(&f.model),
        "--format",
        "q4_0",
        "--calib",
        "default",
        "--calib-chunks",
        "2",
        "--out",
        s(&bundled),
    ]);
    assert_ok(&o);
    let (g, _) = GgufFile::read(&bundled).expect("read");
    assert_eq!(
        g.get("quantize.imatrix.dataset")
            .and_then(GgufValue::as_str),
        Some("quant-studio:default.txt")
    );
    assert_eq!(
        g.get("quantize.imatrix.chunks_count"),
        Some(&GgufValue::U32(2))
    );
}

#[test]
fn quantize_gptq_writes_a_folder_that_evaluates() {
    let f = fixture();
    let out = f.model.with_file_name("gptq");
    let o = run(&[
        "quantize",
        s(&f.model),
        "--format",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--act-order",
        "--calib",
        s(&f.text),
        "--rows",
        "4",
        "--seq-len",
        "32",
        "--out",
        s(&out),
    ]);
    assert_ok(&o);
    let text = stdout(&o);
    let rows = text
        .lines()
        .filter(|l| l.starts_with("layers.") && l.contains("GPTQ int4 g32"));
    assert_eq!(rows.count(), 14, "{text}");
    assert!(text.contains("GPTQ/RTN loss"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("json");
    let qc = &cfg["quantization_config"];
    assert_eq!(
        (qc["bits"].as_u64(), qc["group_size"].as_i64()),
        (Some(4), Some(32))
    );
    assert_eq!(
        (qc["desc_act"].as_bool(), qc["sym"].as_bool()),
        (Some(true), Some(false))
    );
    let q = SourceModel::open(&out).expect("open");
    assert_eq!(q.tensors.values().filter(|t| t.is_grouped()).count(), 14);
    let o = run(&[
        "eval",
        s(&out),
        "--base",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
    ]);
    assert_ok(&o);
    // An existing output is refused with one line; --imatrix does not mix with GPTQ.
    let o = run(&[
        "quantize",
        s(&f.model),
        "--format",
        "gptq",
        "--rows",
        "4",
        "--seq-len",
        "32",
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn quantize_awq_writes_both_layouts_that_evaluate() {
    let f = fixture();
    for (format, method) in [("awq", "awq"), ("awq-ct", "compressed-tensors")] {
        let out = f.model.with_file_name(format);
        let o = run(&[
            "quantize",
            s(&f.model),
            "--format",
            format,
            "--group-size",
            "32",
            "--calib",
            s(&f.text),
            "--rows",
            "4",
            "--seq-len",
            "32",
            "--search-rows",
            "2",
            "--out",
            s(&out),
        ]);
        assert_ok(&o);
        let text = stdout(&o);
        let rows = text
            .lines()
            .filter(|l| l.starts_with("layers.") && l.contains("AWQ int4 g32"));
        assert_eq!(rows.count(), 14, "{text}");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
                .expect("json");
        assert_eq!(
            cfg["quantization_config"]["quant_method"].as_str(),
            Some(method)
        );
        let q = SourceModel::open(&out).expect("open");
        assert_eq!(q.tensors.values().filter(|t| t.is_grouped()).count(), 14);
        let o = run(&[
            "eval",
            s(&out),
            "--base",
            s(&f.model),
            "--text",
            s(&f.text),
            "--ctx",
            "32",
        ]);
        assert_ok(&o);
    }
    // GEMM is 4-bit only; a group that does not divide the widths is refused before any work.
    for (extra, says) in [
        (["--bits", "3"], "awq-ct"),
        (["--group-size", "48"], "group size 48"),
        (
            ["--awq-scales", "--no-clip"],
            "AWQ searches its scales anyway",
        ),
    ] {
        let mut args = vec![
            "quantize",
            s(&f.model),
            "--format",
            "awq",
            "--calib",
            s(&f.text),
        ];
        args.extend(extra);
        let out = f.model.with_file_name("refused");
        args.extend(["--out", s(&out)]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert!(!out.exists());
    }
}

#[test]
fn quantize_exl2_measures_writes_evaluates_and_requantizes_from_its_measurement() {
    let f = fixture();
    let out = f.model.with_file_name("exl2");
    let common = [
        "--calib",
        s(&f.text),
        "--rows",
        "4",
        "--seq-len",
        "32",
        "--measure-rows",
        "2",
    ];
    let mut args = vec!["quantize", s(&f.model), "--format", "exl2", "--bpw", "4.5"];
    args.extend(common);
    args.extend(["--out", s(&out)]);
    let o = run(&args);
    assert_ok(&o);
    let text = stdout(&o);
    assert_eq!(
        text.lines()
            .filter(|l| (l.starts_with("layers.") || l.starts_with("lm_head"))
                && l.contains("EXL2 4.50 bpw h6"))
            .count(),
        15,
        "{text}"
    );
    assert!(out.join("measurement.json").exists());
    let o = run(&[
        "eval",
        s(&out),
        "--base",
        s(&f.model),
        "--text",
        s(&f.text),
        "--ctx",
        "32",
    ]);
    assert_ok(&o);
    // From the saved measurement, at another rate and head; a rate out of reach is refused up front.
    let out2 = f.model.with_file_name("exl2-b");
    let m = out.join("measurement.json");
    let mut args = vec![
        "quantize",
        s(&f.model),
        "--format",
        "exl2",
        "--bpw",
        "6",
        "--head-bits",
        "8",
        "--measurement",
        s(&m),
    ];
    args.extend(common);
    args.extend(["--out", s(&out2)]);
    assert_ok(&run(&args));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(cfg["quantization_config"]["head_bits"], 8);
    let out3 = f.model.with_file_name("exl2-c");
    let mut args = vec![
        "quantize",
        s(&f.model),
        "--format",
        "exl2",
        "--bpw",
        "1.0",
        "--measurement",
        s(&m),
    ];
    args.extend(common);
    args.extend(["--out", s(&out3)]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("out of reach"), "{}", stderr(&o));
    assert!(!out3.exists());
}

#[test]
fn quantize_auto_chooses_types_within_the_budget_and_prints_the_llama_quantize_arguments() {
    let f = fixture();
    let out = f.model.with_file_name("auto.gguf");
    let measurement = f.model.with_file_name("auto.measurement.json");
    // `--format gguf` with a budget is the auto mix (the refusals below say `auto`).
    let o = run(&[
        "quantize",
        s(&f.model),
        "--format",
        "gguf",
        "--bpw",
        "6",
        "--calib",
        s(&f.text),
        "--calib-ctx",
        "32",
        "--measurement",
        s(&measurement),
        "--out",
        s(&out),
    ]);
    assert_ok(&o);
    let text = stdout(&o);
    assert!(text.contains("auto mix:"), "{text}");
    assert!(
        text.contains("predicted KL-divergence from the source: "),
        "{text}"
    );
    // The saved measurement meets another budget without measuring (and without probing again).
    let out2 = f.model.with_file_name("auto-5.7.gguf");
    let o = run(&[
        "quantize",
        s(&f.model),
        "--format",
        "auto",
        "--bpw",
        "5.7",
        "--calib",
        s(&f.text),
        "--calib-ctx",
        "32",
        "--measurement",
        s(&measurement),
        "--out",
        s(&out2),
    ]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("predicted KL-divergence"),
        "{}",
        stdout(&o)
    );
    assert!(
        std::fs::metadata(&out2).expect("out2").len() < std::fs::metadata(&out).expect("out").len()
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("auto mix:"))
        .expect("summary");
    let reported: f64 = line
        .split(", ")
        .last()
        .and_then(|p| p.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("bits per weight");
    assert!(reported <= 6.0, "{line}");
    assert!(
        text.contains("llama-quantize --imatrix IMATRIX --tensor-type '^blk"),
        "{text}"
    );
    let q = SourceModel::open(&out).expect("open");
    assert!(q.tensors.len() > 14);
    // A budget is required, overrides do not mix, and no importance matrix is refused with the fix.
    for (extra, says) in [
        (vec!["--calib", s(&f.text)], "--bpw"),
        (vec!["--bpw", "5"], "importance matrix"),
        (
            vec![
                "--bpw",
                "5",
                "--calib",
                s(&f.text),
                "--override",
                "blk.0.attn_v.weight=q8_0",
            ],
            "drop --override",
        ),
        (
            vec![
                "--bpw",
                "6",
                "--calib",
                s(&f.text),
                "--probe-tokens",
                "100000",
            ],
            "--probe-tokens 100000: at most 4096",
        ),
        (
            vec!["--bpw", "6", "--calib", s(&f.text), "--awq-scales"],
            "--awq-scales is for gptq and exl2",
        ),
    ] {
        let mut args = vec!["quantize", s(&f.model), "--format", "auto"];
        args.extend(extra);
        let out = f.model.with_file_name("refused.gguf");
        args.extend(["--out", s(&out)]);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert!(!out.exists());
    }
}

/// `quantize --help` lists every recipe the engine has, from the engine's catalogue.
#[test]
fn quantize_help_lists_the_engines_recipes() {
    let o = run(&["quantize", "--help"]);
    assert_ok(&o);
    let help = stdout(&o);
    for kind in quant_engine::recipes::catalogue() {
        assert!(help.contains(&kind.id), "{} missing from:\n{help}", kind.id);
    }
    // An unknown format names the known ones.
    let fx = fixture();
    let o = run(&[
        "quantize",
        s(&fx.model),
        "--format",
        "q9_z",
        "--out",
        s(&fx.text.with_extension("gguf")),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q4_k_m"), "{}", stderr(&o));
}
