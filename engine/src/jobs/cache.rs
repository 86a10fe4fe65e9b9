//! Models loaded by earlier jobs, kept by path so that chat turns and repeated evaluations do not
//! reload them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::infer::Model;
use crate::model::SourceModel;
use crate::Result;

/// A model opened and ready to run.
#[derive(Debug)]
pub(crate) struct LoadedModel {
    pub source: SourceModel,
    pub model: Model,
}

/// Identifies a model on disk: its canonical path and modification time (a rewritten file or folder is
/// loaded again).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    path: PathBuf,
    modified: Option<SystemTime>,
}

impl Key {
    fn of(path: &Path) -> Self {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        Self { path, modified }
    }
}

/// The most recently used models, at most `capacity`.
pub(crate) struct ModelCache {
    capacity: usize,
    /// Least recently used first.
    entries: Mutex<Vec<(Key, Arc<LoadedModel>)>>,
}

impl ModelCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(Key, Arc<LoadedModel>)>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The model at `path`, loaded now unless cached. Loading happens outside the lock, so two jobs may
    /// load the same model at once; the later one is kept.
    pub fn get_or_load(&self, path: &Path) -> Result<Arc<LoadedModel>> {
        let key = Key::of(path);
        {
            let mut entries = self.lock();
            if let Some(i) = entries.iter().position(|(k, _)| *k == key) {
                let e = entries.remove(i);
                let m = Arc::clone(&e.1);
                entries.push(e);
                return Ok(m);
            }
        }
        let source = SourceModel::open(path)?;
        let model = Model::load(&source)?;
        let loaded = Arc::new(LoadedModel { source, model });
        let mut entries = self.lock();
        entries.retain(|(k, _)| k.path != key.path);
        entries.push((key, Arc::clone(&loaded)));
        let excess = entries.len().saturating_sub(self.capacity);
        entries.drain(..excess);
        Ok(loaded)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}
