//! The CI smoke of the parsers' fuzzer: every target, a few seconds each, from the committed corpus
//! (`tests/fuzz/corpus/<target>/`). Long runs: `cargo run --release -p quant_engine --example fuzz`.

use std::path::Path;
use std::time::Duration;

use quant_engine::fuzz::{fuzz, Target};

#[test]
fn every_parser_survives_a_short_fuzz_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crashes = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
    let seconds: u64 = std::env::var("QS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut failures = Vec::new();
    for t in Target::ALL {
        let corpus = root.join("tests/fuzz/corpus").join(t.name());
        let r = fuzz(
            t,
            0x5eed,
            Duration::from_secs(seconds),
            u64::MAX,
            Some(&corpus),
            false,
            &crashes,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", t.name()));
        eprintln!(
            "{}: {} executions, {} ok, {} error kinds, slowest {:?}",
            t.name(),
            r.executions,
            r.ok,
            r.signatures,
            r.slowest
        );
        assert!(
            r.executions >= 20,
            "{}: only {} executions",
            t.name(),
            r.executions
        );
        assert!(
            r.signatures >= 3,
            "{}: the mutations reached only {} checks",
            t.name(),
            r.signatures
        );
        for c in r.crashes {
            failures.push(format!("{}: {}", t.name(), c.display()));
        }
    }
    assert!(failures.is_empty(), "failing inputs: {failures:?}");
}
