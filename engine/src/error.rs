//! The engine's error type. Messages name the file and say what the user can do.

use std::path::PathBuf;

/// Every failure the engine reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not what it claims to be (truncated, inconsistent, hostile).
    #[error("{path}: malformed {what}: {detail}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    /// A valid file that uses something we do not handle.
    #[error("{path}: unsupported: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    /// The GPU backend failed (no adapter, out of device memory, a lost device, a timeout).
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("cancelled")]
    Cancelled,
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-file error on `path`.
    pub fn malformed(
        path: impl Into<PathBuf>,
        what: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self::Malformed {
            path: path.into(),
            what,
            detail: detail.into(),
        }
    }

    /// An unsupported-feature error on `path`.
    pub fn unsupported(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
