//! Solvers: algorithms that choose quantized weights by minimising a layer's output error on calibration
//! activations, rather than rounding each weight on its own.
//!
//! * [`gptq`] — GPTQ (Frantar et al., 2022) as AutoGPTQ / GPTQModel's `GPTQ.fasterquant` and `Quantizer` do it:
//!   the Hessian `2/n Σ x xᵀ`, damping, Cholesky of `H⁻¹`, lazy block updates, act-order, static groups,
//!   symmetric and asymmetric grids, plus the round-to-nearest baseline on the same grid.
//! * [`awq`] — AWQ (Lin et al., 2023) as AutoAWQ / llm-compressor run it: min–max groups with zero points,
//!   activation-aware per-channel scales over a ratio grid, the clipping search.
//!
//! The solvers know nothing about models: they take a row-major weight `[out, in]` (PyTorch `Linear` layout) and the
//! activations (or their Hessian) of that layer's input, and return integer codes with their group parameters.

pub mod awq;
pub mod exl2;
pub mod gptq;
pub mod mix;

pub use gptq::{gptq_quantize, rtn_quantize, GptqOptions, GptqResult, Hessian};
