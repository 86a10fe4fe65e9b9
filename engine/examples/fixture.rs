//! Write a random-weight llama-architecture model of any shape as a Hugging Face folder (the fixture
//! builder), for speed and memory measurements:
//!
//! ```sh
//! cargo run --release -p quant_engine --example fixture -- OUT_DIR --hidden 896 --intermediate 4864 \
//!     --layers 24 --heads 14 --kv-heads 2 --dtype bf16
//! ```
//! The vocabulary is the fixture tokenizer's (384 tokens); the context is 512 positions.

use quant_engine::model::fixture::{write_fixture, FixtureDtype, FixtureSpec};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: fixture OUT_DIR [--hidden N] [--intermediate N] [--layers N] [--heads N] [--kv-heads N] [--dtype f32|f16|bf16] [--seed N]");
        return std::process::ExitCode::FAILURE;
    };
    let mut spec = FixtureSpec::tiny_llama();
    let mut i = 1;
    while i + 1 < args.len() {
        let n = args[i + 1].parse::<usize>();
        match (args[i].as_str(), n) {
            ("--hidden", Ok(n)) => spec.hidden = n,
            ("--intermediate", Ok(n)) => spec.intermediate = n,
            ("--layers", Ok(n)) => spec.layers = n,
            ("--heads", Ok(n)) => spec.heads = n,
            ("--kv-heads", Ok(n)) => spec.kv_heads = n,
            ("--seed", Ok(n)) => spec.seed = n as u64,
            ("--dtype", _) => {
                spec.dtype = match args[i + 1].as_str() {
                    "f32" => FixtureDtype::F32,
                    "f16" => FixtureDtype::F16,
                    "bf16" => FixtureDtype::BF16,
                    d => {
                        eprintln!("unknown dtype {d}: use f32, f16 or bf16");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            }
            (a, _) => {
                eprintln!("bad argument {a} {}", args[i + 1]);
                return std::process::ExitCode::FAILURE;
            }
        }
        i += 2;
    }
    match write_fixture(&spec, std::path::Path::new(out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
