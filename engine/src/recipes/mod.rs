//! Recipes: which type each tensor of an output file gets.
//!
//! * [`gguf`] — llama-quantize's per-tensor type mixes (`Q4_K_M`, `Q3_K_S`, `--pure`, `--tensor-type`).

pub mod gguf;

pub use gguf::{plan_gguf_mix, GgufMix, TensorOverride};
