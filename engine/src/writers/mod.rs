//! Output containers written from a [`SourceModel`](crate::model::SourceModel), streaming one tensor at a
//! time.

pub mod gguf;
pub mod gptq;

pub use gguf::{quantize_tensor_rows, write_gguf, GgufPlanTensor};

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `out` with a per-process suffix: where a file is written before it is renamed into place.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(format!(".partial-{}", std::process::id()));
    PathBuf::from(s)
}

/// Write `data` to `path` through a temporary name renamed when complete (a failure leaves nothing).
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let partial = partial_path(path);
    let res = std::fs::write(&partial, data)
        .and_then(|()| std::fs::File::open(&partial)?.sync_all())
        .and_then(|()| std::fs::rename(&partial, path));
    res.map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Error::io(path, e)
    })
}
