//! The parsers' fuzzer, on stable Rust (see `quant_engine::fuzz`).
//!
//! ```sh
//! cargo run --release -p quant_engine --example fuzz -- gguf --seconds 600        # one target
//! cargo run --release -p quant_engine --example fuzz -- all --seconds 60 --save   # every target, corpus grows
//! ```
//! Corpus: `tests/fuzz/corpus/<target>/`; failing inputs: `target/fuzz-crashes/`. Exits non-zero when an
//! input panicked or ran too long; an input over the memory limit aborts with the size it asked for.

use std::path::PathBuf;
use std::time::Duration;

use quant_engine::fuzz::{fuzz, Target};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut targets = Vec::new();
    let (mut seconds, mut runs, mut seed, mut save) = (60u64, u64::MAX, 1u64, false);
    if let Some(at) = args.iter().position(|a| a == "--replay") {
        // Run one saved input with the panic message shown: `fuzz -- TARGET --replay FILE`.
        let (Some(t), Some(file)) = (
            args.first().and_then(|t| Target::parse(t)),
            args.get(at + 1),
        ) else {
            eprintln!("usage: fuzz TARGET --replay FILE");
            return std::process::ExitCode::FAILURE;
        };
        let data = std::fs::read(file).unwrap_or_default();
        let ws = quant_engine::fuzz::Workspace::new().unwrap_or_else(|e| panic!("{e}"));
        match quant_engine::fuzz::run_one(&ws, t, &data) {
            Ok(r) => println!("{r:?}"),
            Err(_) => return std::process::ExitCode::FAILURE,
        }
        return std::process::ExitCode::SUCCESS;
    }
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match args[i].as_str() {
            "--seconds" => seconds = value(i).unwrap_or(seconds),
            "--runs" => runs = value(i).unwrap_or(runs),
            "--seed" => seed = value(i).unwrap_or(seed),
            "--save" => {
                save = true;
                i += 1;
                continue;
            }
            "all" => targets.extend(Target::ALL),
            t => match Target::parse(t) {
                Some(t) => targets.push(t),
                None => {
                    eprintln!(
                        "usage: fuzz TARGET|all [--seconds N] [--runs N] [--seed N] [--save]; targets: {}",
                        Target::ALL.map(Target::name).join(", ")
                    );
                    return std::process::ExitCode::FAILURE;
                }
            },
        }
        i += if args[i].starts_with("--") { 2 } else { 1 };
    }
    if targets.is_empty() {
        targets.extend(Target::ALL);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let crashes = root.join("target/fuzz-crashes");
    let mut failed = false;
    for t in targets {
        let corpus = root.join("tests/fuzz/corpus").join(t.name());
        match fuzz(
            t,
            seed,
            Duration::from_secs(seconds),
            runs,
            Some(&corpus),
            save,
            &crashes,
        ) {
            Ok(r) => {
                println!(
                    "{:<12} {:>10} execs ({:.0}/s), {} ok, {} error kinds, corpus {}, slowest {:.1} ms, largest allocation {:.1} MiB, {} failing",
                    t.name(),
                    r.executions,
                    r.executions as f64 / r.elapsed.as_secs_f64().max(1e-9),
                    r.ok,
                    r.signatures,
                    r.corpus,
                    r.slowest.as_secs_f64() * 1e3,
                    r.largest_request as f64 / f64::from(1u32 << 20),
                    r.crashes.len()
                );
                for c in &r.crashes {
                    println!("  failing input: {}", c.display());
                }
                failed |= !r.crashes.is_empty();
            }
            Err(e) => {
                eprintln!("{}: {e}", t.name());
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
