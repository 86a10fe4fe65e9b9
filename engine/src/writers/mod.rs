//! Output containers written from a [`SourceModel`](crate::model::SourceModel), streaming one tensor at a
//! time.

pub mod awq;
pub mod bnb;
pub mod exl2;
pub mod gguf;
pub mod gptq;
pub mod hf;
pub mod hqq;
pub mod packed;
pub mod safetensors;

pub use gguf::{quantize_tensor_rows, write_gguf, GgufPlanTensor};
