//! Quant Studio's engine: everything that is not UI.
//!
//! * [`model`]  — source models: Hugging Face folders (safetensors) and GGUF files, tokenizers, chat templates.
//! * [`codecs`] — how a block of weights is stored (ggml block types), with dequantisation.
//! * [`tensor`] — weight matrices that stay in their stored type, and the matmuls over them.
//! * [`infer`]  — the Llama-family forward pass, KV cache, sampling, chat sessions.
//! * [`eval`]   — perplexity and KL-divergence, computed as llama.cpp's `llama-perplexity` does.
//! * [`imatrix`] — importance matrices: computed on calibration text, llama.cpp's file formats.
//! * [`solvers`] — calibration-based quantization solvers (GPTQ), independent of any model type.
//! * [`calib`]  — calibration data: documents from text, JSON lines or Parquet files, seeded token rows.
//! * [`demo`]   — the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) fetched from PyPI into the user cache.
//! * [`bounded`] — the allocator's per-thread budgets: untrusted work (chat templates) with bounded memory and time.
//! * [`output`] — every output written under a temporary name, checked before work starts, renamed when complete.
//! * [`jobs`]   — the engine thread: `Command`/`Event` over bounded channels, cancellation, progress.
//! * [`backend`] — where the arithmetic runs: the CPU kernels, or the GPU through wgpu (`engine/shaders/`).

pub mod backend;
pub mod bench;
pub mod bounded;
pub mod calib;
pub mod codecs;
#[cfg(test)]
mod conformance;
pub mod demo;
pub mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzz;
pub mod imatrix;
pub mod infer;
pub mod jobs;
pub mod model;
pub mod output;
pub mod quantize;
pub mod quantize_automix;
pub mod quantize_awq;
pub mod quantize_exl2;
pub mod quantize_gptq;
pub mod quantize_packed;
pub mod recipes;
pub mod simd;
pub mod solvers;
pub mod tensor;
#[doc(hidden)]
pub mod testing;
pub mod writers;

pub use error::{Error, Result};
