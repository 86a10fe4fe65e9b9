//! Calibration activations of one layer boundary (`rows × seq_len × hidden` f32), kept in memory up to a
//! budget and spilled to a temporary file above it: what the layer-sequential pipelines (GPTQ, AWQ) carry
//! from one decoder layer to the next.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::{Error, Result};

/// Calibration activations kept in memory before they spill to disk, unless a front end says otherwise.
pub const DEFAULT_ACTIVATION_BUDGET_MIB: u64 = 4096;

/// Begin the staged output `spec` and put the calibration rows' embeddings into an activation store inside it
/// (kept in memory up to `budget` bytes, spilled to a file in the staged output above; the free-space check
/// then counts the spill). What the calibrated pipelines (GPTQ, AWQ, EXL2) start from.
pub(crate) fn stage_embeddings(
    model: &crate::infer::Model,
    rows: &[Vec<u32>],
    mut spec: crate::output::OutputSpec,
    budget: u64,
) -> Result<(crate::output::Staged, ActStore)> {
    let row_len = rows.first().map_or(0, Vec::len) * model.config().hidden_size;
    let spill = (rows.len() * row_len * 4) as u64;
    if spill > budget {
        spec.estimated_bytes += spill;
    }
    let staged = crate::output::Staged::begin(spec)?;
    let mut store = ActStore::new(
        rows.len(),
        row_len,
        budget,
        &staged.path().join("activations"),
    )?;
    for (i, r) in rows.iter().enumerate() {
        store.put(i, model.embed_tokens(r))?;
    }
    Ok((staged, store))
}

/// Calibration activations of one layer boundary, one row (sequence) at a time.
pub(crate) enum ActStore {
    Memory(Vec<Vec<f32>>),
    File {
        file: std::fs::File,
        _dir: tempfile_dir::TempDir,
        row_len: usize,
    },
}

/// A temporary directory removed on drop (std only).
mod tempfile_dir {
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl ActStore {
    pub(crate) fn new(rows: usize, row_len: usize, budget: u64, near: &Path) -> Result<Self> {
        let bytes = (rows * row_len * 4) as u64;
        if bytes <= budget {
            return Ok(Self::Memory(vec![Vec::new(); rows]));
        }
        let dir = near.with_file_name(format!(
            ".{}.activations-{}",
            near.file_name()
                .map_or("gptq".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("rows.f32");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self::File {
            file,
            _dir: tempfile_dir::TempDir(dir),
            row_len,
        })
    }

    /// Whether the rows live in a file.
    pub(crate) fn spilled(&self) -> bool {
        matches!(self, Self::File { .. })
    }

    pub(crate) fn put(&mut self, i: usize, x: Vec<f32>) -> Result<()> {
        match self {
            Self::Memory(v) => v[i] = x,
            Self::File { file, row_len, .. } => {
                let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
                file.seek(SeekFrom::Start((i * *row_len * 4) as u64))
                    .and_then(|_| file.write_all(&b))
                    .map_err(|e| Error::io("activation spill file", e))?;
            }
        }
        Ok(())
    }

    pub(crate) fn get(&mut self, i: usize) -> Result<Vec<f32>> {
        match self {
            Self::Memory(v) => Ok(v[i].clone()),
            Self::File { file, row_len, .. } => {
                let mut b = vec![0u8; *row_len * 4];
                file.seek(SeekFrom::Start((i * *row_len * 4) as u64))
                    .and_then(|_| file.read_exact(&mut b))
                    .map_err(|e| Error::io("activation spill file", e))?;
                Ok(b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            }
        }
    }
}
