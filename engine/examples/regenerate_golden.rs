//! Rewrite the golden-test fixture folders (`tests/golden/<name>/`) from the fixture builder. Run it when the
//! builder changes, then `python3 tests/golden/make_golden.py` to recompute the transformers references.

use std::path::PathBuf;

use quant_engine::model::fixture::{golden_cases, write_fixture};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    for (name, spec) in golden_cases() {
        let dir = root.join(name);
        write_fixture(&spec, &dir)?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}
