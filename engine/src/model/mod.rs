//! Source models: a Hugging Face folder (config.json + safetensors + tokenizer files) or a GGUF file.
//!
//! Whatever the container, a [`SourceModel`] presents the model the same way: a [`ModelConfig`] in Hugging
//! Face's terms, tensors under their Hugging Face names in PyTorch shape order (memory-mapped, in their
//! stored type, read one at a time), and a [`TextTokenizer`] with the chat template.

pub mod config;
pub mod fixture;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_tokenizer;
pub mod hf;
pub mod summary;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use config::{Arch, ModelConfig, RopeScaling};
pub use tokenizer::{ChatMessage, TextTokenizer};

use crate::tensor::TensorRef;
use crate::{Error, Result};

/// Which container a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// A Hugging Face folder with safetensors weights.
    HfFolder,
    /// A single GGUF file.
    Gguf,
}

/// A model opened for reading: config, tensors (mapped, not loaded), tokenizer.
#[derive(Debug)]
pub struct SourceModel {
    /// The folder or file that was opened.
    pub path: PathBuf,
    pub format: SourceFormat,
    /// A display name (`general.name`, or the folder name).
    pub name: String,
    pub config: ModelConfig,
    /// Tensors by Hugging Face name.
    pub tensors: BTreeMap<String, TensorRef>,
    pub tokenizer: TextTokenizer,
    /// Total size of the weight files.
    pub file_size_bytes: u64,
    /// A GGUF source's raw metadata, in file order (the writers copy its `tokenizer.*` keys verbatim);
    /// `None` for other containers.
    pub gguf_metadata: Option<std::sync::Arc<Vec<(String, gguf::GgufValue)>>>,
    /// The text a quantized model was calibrated on, as its file records it (a GGUF's
    /// `quantize.imatrix.dataset`, our GPTQ folders' `quantization_config.meta.calibration_dataset`).
    pub calibration_dataset: Option<String>,
}

impl SourceModel {
    /// Open a Hugging Face folder or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(why) = crate::bounded::irregular(path) {
            return Err(Error::Invalid(format!(
                "{}: the model {why}; open a .gguf file, or a Hugging Face model folder (the folder that \
                 holds config.json, tokenizer.json and *.safetensors)",
                path.display()
            )));
        }
        if path.is_dir() {
            hf::open(path)
        } else if path.is_file() {
            gguf_model::open(path)
        } else {
            Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ))
        }
    }

    /// The tensor named `name` (Hugging Face name), or a clear error.
    pub fn tensor(&self, name: &str) -> Result<&TensorRef> {
        self.tensors.get(name).ok_or_else(|| {
            Error::malformed(&self.path, "model", format!("tensor {name} is missing"))
        })
    }

    /// Number of parameters (elements of every tensor).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.numel() as u64).sum()
    }
}
