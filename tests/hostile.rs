//! The binary as a hostile or careless user meets it: chat templates that loop or explode, outputs over
//! inputs, arguments out of range, special files, and jobs interrupted by signals or `kill -9`. Every case
//! ends in one clear error line (or the documented behaviour), in bounded time, with nothing lost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use quant_engine::model::fixture::{write_fixture, FixtureSpec};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quant-studio"))
}

fn run(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = bin().args(args).output().expect("run quant-studio");
    (o, t.elapsed())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run failed with exit code 1 and an error line containing `want`.
fn assert_error(o: &Output, want: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {e}");
    assert!(!e.contains("panicked"), "a panic: {e}");
    let line = e
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in: {e}"));
    assert!(line.contains(want), "want {want:?} in: {line}");
}

fn tiny(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    write_fixture(&FixtureSpec::tiny_llama(), &m).expect("fixture");
    m
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ------------------------------------------------------------------------------------------------
// Chat templates
// ------------------------------------------------------------------------------------------------

/// Run `generate` with `template` as the model's chat_template.jinja: the error, the time, and the
/// peak resident memory of the process (VmHWM, read while it runs).
fn generate_with_template(template: &str) -> (Output, Duration, u64) {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny(dir.path());
    std::fs::write(m.join("chat_template.jinja"), template).expect("template");
    let t = Instant::now();
    let mut child = bin()
        .args(["generate", s(&m), "--prompt", "hi", "--max-tokens", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Some(v) = std::fs::read_to_string(&status).ok().and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        }) {
            peak_kib = peak_kib.max(v);
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "hung");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("output");
    (o, t.elapsed(), peak_kib * 1024)
}

#[test]
fn a_template_that_loops_for_ever_fails_in_bounded_time_and_memory() {
    let (o, took, peak) = generate_with_template(
        "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    );
    assert_error(&o, "chat_template.jinja: stopped");
    eprintln!("looping template: {took:?}, peak RSS {} MiB", peak >> 20);
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(peak < 512 << 20, "peak {peak}");
}

#[test]
fn a_template_that_doubles_a_string_fails_in_bounded_time_and_memory() {
    let (o, took, peak) = generate_with_template(
        "{% set ns = namespace(s=\"x\") %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    );
    assert_error(&o, "needed more than 128 MiB of memory");
    eprintln!("doubling template: {took:?}, peak RSS {} MiB", peak >> 20);
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(peak < 512 << 20, "peak {peak}");
}

// ------------------------------------------------------------------------------------------------
// Outputs
// ------------------------------------------------------------------------------------------------

#[test]
fn quantize_never_writes_over_its_input_and_replaces_an_output_only_with_force() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny(dir.path());
    let gguf = dir.path().join("m.gguf");
    let (o, _) = run(&["quantize", s(&m), "--format", "f16", "--out", s(&gguf)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(&gguf).expect("read");
    // Its own input, even with --force, by any spelling.
    for out in [
        gguf.clone(),
        dir.path().join("./m.gguf"),
        dir.path().join("tiny/../m.gguf"),
    ] {
        let (o, _) = run(&[
            "quantize",
            s(&gguf),
            "--format",
            "q8_0",
            "--out",
            s(&out),
            "--force",
        ]);
        assert_error(&o, "this is the input");
    }
    assert_eq!(
        std::fs::read(&gguf).expect("read"),
        before,
        "the input changed"
    );
    // A file of an input folder.
    let (o, _) = run(&[
        "quantize",
        s(&m),
        "--format",
        "q8_0",
        "--out",
        s(&m.join("model.safetensors")),
        "--force",
    ]);
    assert_error(&o, "a file of the input folder");
    // An existing output: refused, then replaced with --force.
    let out = dir.path().join("q8.gguf");
    std::fs::write(&out, b"keep me").expect("write");
    let (o, _) = run(&["quantize", s(&gguf), "--format", "q8_0", "--out", s(&out)]);
    assert_error(&o, "already exists; pass --force");
    assert_eq!(std::fs::read(&out).expect("read"), b"keep me");
    let (o, _) = run(&[
        "quantize",
        s(&gguf),
        "--format",
        "q8_0",
        "--out",
        s(&out),
        "--force",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&out).expect("read").starts_with(b"GGUF"));
    assert_eq!(entries(dir.path()), ["m.gguf", "q8.gguf", "tiny"]);
    // convert and imatrix follow the same rules.
    let (o, _) = run(&["convert", s(&m), "--out", s(dir.path()), "--force"]);
    assert_error(&o, "holding the input");
    let (o, _) = run(&["convert", s(&gguf), "--out", s(&m)]);
    assert_error(&o, "already exists");
    let (o, _) = run(&[
        "imatrix",
        s(&gguf),
        "--out",
        s(&out),
        "--calib-chunks",
        "1",
        "--calib-ctx",
        "32",
    ]);
    assert_error(&o, "already exists");
}

#[test]
fn gptq_refuses_a_bad_output_before_any_work() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny(dir.path());
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).expect("mkdir");
    std::fs::write(busy.join("x"), b"x").expect("write");
    // Thousands of calibration rows: it would take minutes if the check came after them.
    let (o, took) = run(&[
        "quantize",
        s(&m),
        "--format",
        "gptq",
        "--rows",
        "4096",
        "--seq-len",
        "64",
        "--out",
        s(&busy),
    ]);
    assert_error(&o, "already exists");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (o, _) = run(&[
        "quantize",
        s(&m),
        "--format",
        "gptq",
        "--out",
        "/proc/quant-studio/gptq",
    ]);
    assert_error(&o, "/proc");
}

// ------------------------------------------------------------------------------------------------
// Interrupted jobs
// ------------------------------------------------------------------------------------------------

/// A model big enough that quantizing it takes a second or two.
fn medium(dir: &Path) -> PathBuf {
    let m = dir.join("medium");
    let spec = FixtureSpec {
        hidden: 384,
        intermediate: 1536,
        layers: 8,
        heads: 6,
        kv_heads: 2,
        ..FixtureSpec::tiny_llama()
    };
    write_fixture(&spec, &m).expect("fixture");
    m
}

/// Start `args`, wait until a `.partial-` entry appears in `dir`, and return the child.
fn start_and_wait_for_partial(args: &[&str], dir: &Path) -> Child {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t = Instant::now();
    loop {
        if entries(dir).iter().any(|n| n.contains(".partial-")) {
            return child;
        }
        if let Some(st) = child.try_wait().expect("wait") {
            panic!("finished ({st}) before its temporary was seen");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no temporary appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

#[test]
fn sigint_and_sigterm_leave_nothing_half_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = medium(dir.path());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let q = out_dir.join("q.gguf");
    let c = out_dir.join("hf");
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "-INT",
            vec!["quantize", s(&m), "--format", "q4_k_m", "--out", s(&q)],
        ),
        (
            "-TERM",
            vec!["quantize", s(&m), "--format", "q4_k_m", "--out", s(&q)],
        ),
        ("-TERM", vec!["convert", s(&m), "--out", s(&c)]),
    ];
    let mut interrupted = 0;
    for (sig, args) in cases {
        let child = start_and_wait_for_partial(&args, &out_dir);
        signal(&child, sig);
        let o = child.wait_with_output().expect("wait");
        if o.status.code() == Some(0) {
            // It finished between the last look and the signal: only the finished output is there.
            let left = entries(&out_dir);
            assert!(
                left.len() == 1 && !left[0].contains(".partial-"),
                "{left:?}"
            );
            let done = out_dir.join(&left[0]);
            std::fs::remove_dir_all(&done)
                .or_else(|_| std::fs::remove_file(&done))
                .expect("rm");
            continue;
        }
        interrupted += 1;
        assert_eq!(o.status.code(), Some(130), "{sig} {args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
        assert!(
            entries(&out_dir).is_empty(),
            "{sig} {args:?} left {:?}",
            entries(&out_dir)
        );
    }
    assert!(
        interrupted >= 2,
        "only {interrupted} of 3 runs were still going when signalled"
    );
}

#[test]
fn the_leftover_of_a_killed_run_is_removed_by_the_next_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = medium(dir.path());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let q = out_dir.join("q.gguf");
    let args = ["quantize", s(&m), "--format", "q4_k_m", "--out", s(&q)];
    let child = start_and_wait_for_partial(&args, &out_dir);
    signal(&child, "-KILL");
    let _ = child.wait_with_output();
    let left = entries(&out_dir);
    assert!(
        left.len() == 1 && left[0].starts_with("q.gguf.partial-"),
        "{left:?}"
    );
    // No finished-looking file was left.
    assert!(!q.exists());
    let (o, _) = run(&["quantize", s(&m), "--format", "q8_0", "--out", s(&q)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(entries(&out_dir), ["q.gguf"]);
}

// ------------------------------------------------------------------------------------------------
// Arguments
// ------------------------------------------------------------------------------------------------

#[test]
fn absurd_numbers_get_the_allowed_range() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny(dir.path());
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "one two three four five six seven eight nine ten. ".repeat(200),
    )
    .expect("text");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "eval",
                s(&m),
                "--text",
                s(&text),
                "--ctx",
                "18446744073709551615",
            ],
            "longer than the model's",
        ),
        (
            vec!["eval", s(&m), "--text", s(&text), "--ctx", "100000"],
            "use 1..=",
        ),
        (
            vec![
                "eval",
                s(&m),
                "--text",
                s(&text),
                "--ctx",
                "18446744073709551615",
                "--allow-long-context",
            ],
            "too large to size",
        ),
        (
            vec!["chat", s(&m), "--ctx", "1000000000"],
            "longer than the model's",
        ),
        (
            vec!["chat", s(&m), "--ctx", "1000000000", "--allow-long-context"],
            "more than this machine's",
        ),
        (
            vec!["generate", s(&m), "--prompt", "hi", "--temp", "NaN"],
            "temperature NaN",
        ),
        (
            vec!["generate", s(&m), "--prompt", "hi", "--top-p", "NaN"],
            "top-p NaN",
        ),
        (
            vec!["generate", s(&m), "--prompt", "hi", "--min-p", "2"],
            "min-p 2",
        ),
        (
            vec!["--threads", "100000", "inspect", s(&m)],
            "--threads 100000: use 1..=",
        ),
        (
            vec!["bench", s(&m), "-p", "1000000000"],
            "longer than the model's",
        ),
        (
            vec![
                "quantize",
                s(&m),
                "--format",
                "q4_k_m",
                "--override",
                "blk.*.atn_v.weight=q8_0",
                "--out",
                "/tmp/qs-never.gguf",
            ],
            "matches no tensor",
        ),
        (
            vec![
                "quantize",
                s(&m),
                "--format",
                "gptq",
                "--seq-len",
                "100000",
                "--out",
                "/tmp/qs-never-gptq",
            ],
            "--seq-len 100000: use 1..=",
        ),
    ];
    for (args, want) in cases {
        let (o, took) = run(&args);
        assert!(took < Duration::from_secs(20), "{args:?} took {took:?}");
        eprintln!("{args:?}");
        assert_error(&o, want);
    }
    assert!(!Path::new("/tmp/qs-never.gguf").exists());
}

#[test]
fn a_long_prompt_is_refused_and_max_tokens_is_capped_by_the_context() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny(dir.path());
    let long = "word ".repeat(5000);
    let (o, _) = run(&["generate", s(&m), "--raw", "--prompt", &long]);
    assert_error(&o, "the model's context is 512");
    let (o, _) = run(&[
        "generate",
        s(&m),
        "--prompt",
        "hi",
        "--max-tokens",
        "18446744073709551615",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Stopped by the end of text or the full context, and said so with the true count.
    let e = stderr(&o);
    let n: u64 = e
        .split("generated: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {e}"));
    assert!(n <= 512, "{e}");
}

#[test]
fn special_files_are_named_as_such() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny(dir.path());
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::os::unix::fs::symlink(&b, &a).expect("symlink");
    std::os::unix::fs::symlink(&a, &b).expect("symlink");
    let missing = dir.path().join("missing");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inspect", s(&fifo)], "named pipe"),
        (vec!["inspect", "/dev/zero"], "a device"),
        (vec!["inspect", s(&a)], "symbolic-link loop"),
        (vec!["inspect", s(&missing)], "does not exist"),
        (vec!["eval", s(&m), "--text", "/dev/zero"], "a device"),
        (vec!["eval", s(&m), "--text", s(&fifo)], "named pipe"),
        (
            vec![
                "quantize",
                s(&m),
                "--format",
                "q4_k_m",
                "--imatrix",
                "/dev/zero",
                "--out",
                "/tmp/qs-never.gguf",
            ],
            "a device",
        ),
        (
            vec![
                "quantize",
                s(&m),
                "--format",
                "gptq",
                "--seq-len",
                "64",
                "--calib",
                s(&fifo),
                "--out",
                "/tmp/qs-never-gptq",
            ],
            "named pipe",
        ),
    ];
    for (args, want) in cases {
        let (o, took) = run(&args);
        assert!(took < Duration::from_secs(20), "{args:?} took {took:?}");
        eprintln!("{args:?}");
        assert_error(&o, want);
    }
}

/// A wrong file or folder opened as a model: the message says what a model is, what was found and what to
/// open instead, and names the path once.
#[test]
fn wrong_files_opened_as_models_say_what_to_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "hello notes, not a model").expect("write");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let with_gguf = dir.path().join("downloads");
    std::fs::create_dir(&with_gguf).expect("mkdir");
    std::fs::write(with_gguf.join("model-Q4_K_M.gguf"), b"GGUF").expect("write");
    let parent = dir.path().join("parent");
    std::fs::create_dir_all(parent.join("Llama-3-8B")).expect("mkdir");
    std::fs::write(parent.join("Llama-3-8B/config.json"), "{}").expect("write");
    let st = dir.path().join("model.safetensors");
    let mut bytes = 2u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&st, bytes).expect("write");
    let cases: Vec<(&std::path::Path, &str)> = vec![
        (
            &notes,
            "this one holds text (\"hello notes, not a model…\")",
        ),
        (&empty, "this one has no config.json"),
        (
            &with_gguf,
            "it holds GGUF files (model-Q4_K_M.gguf): open one of them",
        ),
        (&parent, "open the model folder inside it (Llama-3-8B)"),
        (&st, "is a safetensors file"),
    ];
    for (path, want) in cases {
        let (o, _) = run(&["inspect", s(path)]);
        assert_error(&o, want);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.matches(s(path)).count(), 1, "the path once: {err}");
    }
}
