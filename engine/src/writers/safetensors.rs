//! The one streaming safetensors writer every Hugging Face folder format uses. The plan (every tensor's
//! name, dtype, shape and byte size, in file order) is fixed up front, so each shard's header is written
//! before its data; tensors are then appended in order as they are produced — in pieces (a row at a time)
//! if the producer likes — and nothing is held beyond the piece being written. Above `max_shard_bytes` the
//! weights go to `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`, filled as
//! `huggingface_hub`'s `split_torch_state_dict_into_shards` fills them (a tensor larger than the limit gets
//! a shard of its own) and indexed as transformers writes it (`sort_keys=True`).

use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// One tensor of the output, before its bytes exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    /// The safetensors dtype name (`"F16"`, `"BF16"`, `"I32"`).
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub nbytes: u64,
}

/// Split entries of `sizes` bytes, in order, into runs of at most `limit` bytes (an entry larger than
/// `limit` alone in its run).
pub fn shard_ranges(sizes: &[u64], limit: u64) -> Vec<Range<usize>> {
    let mut shards: Vec<Range<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, &b) in sizes.iter().enumerate() {
        match shards.last_mut() {
            Some(cur) if size.saturating_add(b) <= limit => {
                cur.end = i + 1;
                size += b;
            }
            _ => {
                shards.push(i..i + 1);
                size = b;
            }
        }
    }
    if shards.is_empty() {
        shards.push(0..0);
    }
    shards
}

/// The weight file of shard `i` of `n` (transformers' names).
pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", i + 1)
    }
}

/// An open writer over a planned set of tensors.
pub struct SafetensorsSink {
    dir: PathBuf,
    plan: Vec<PlannedTensor>,
    shards: Vec<Range<usize>>,
    metadata: Map<String, Value>,
    /// The shard being written and its file.
    shard: usize,
    file: Option<(PathBuf, BufWriter<std::fs::File>)>,
    /// The tensor being written and how many of its bytes are in.
    next: usize,
    written: u64,
}

impl SafetensorsSink {
    /// Plan the shards of `plan` in `dir` (which must exist); `metadata` goes into every header's
    /// `__metadata__` (string values, as safetensors requires).
    pub fn new(
        dir: &Path,
        plan: Vec<PlannedTensor>,
        max_shard_bytes: u64,
        metadata: Map<String, Value>,
    ) -> Self {
        let sizes: Vec<u64> = plan.iter().map(|t| t.nbytes).collect();
        let shards = shard_ranges(&sizes, max_shard_bytes);
        Self {
            dir: dir.to_path_buf(),
            plan,
            shards,
            metadata,
            shard: 0,
            file: None,
            next: 0,
            written: 0,
        }
    }

    /// Number of weight files.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.plan.iter().map(|t| t.nbytes).sum()
    }

    /// The tensor the next bytes belong to (`None` when all are written).
    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.plan.get(self.next)
    }

    fn open_shard(&mut self) -> Result<()> {
        let n = self.shards.len();
        let path = self.dir.join(shard_file_name(self.shard, n));
        let mut header = Map::new();
        header.insert("__metadata__".into(), Value::Object(self.metadata.clone()));
        let mut offset = 0u64;
        for t in &self.plan[self.shards[self.shard].clone()] {
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}),
            );
            offset += t.nbytes;
        }
        let mut h = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        h.resize(h.len().next_multiple_of(8), b' ');
        let io = |e| Error::io(&path, e);
        let mut w = BufWriter::with_capacity(4 << 20, std::fs::File::create(&path).map_err(io)?);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        self.file = Some((path, w));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((path, w)) = self.file.take() {
            let f = w
                .into_inner()
                .map_err(|e| Error::io(&path, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Append `bytes` to tensor `name`, which must be the planned next one (or the one being written);
    /// a tensor may come in several pieces but never more than its planned size.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let Some(t) = self.plan.get(self.next) else {
            return Err(Error::Invalid(format!(
                "safetensors writer: {name} is beyond the planned tensors"
            )));
        };
        if t.name != name {
            return Err(Error::Invalid(format!(
                "safetensors writer: {name} written where {} was planned",
                t.name
            )));
        }
        let planned = t.nbytes;
        if self.written + bytes.len() as u64 > planned {
            return Err(Error::Invalid(format!(
                "{name}: more than the planned {planned} bytes produced"
            )));
        }
        if self.file.is_none() {
            self.open_shard()?;
        }
        if let Some((path, w)) = self.file.as_mut() {
            w.write_all(bytes).map_err(|e| Error::io(&*path, e))?;
        }
        self.written += bytes.len() as u64;
        if self.written == planned {
            self.next += 1;
            self.written = 0;
            if self.next == self.shards[self.shard].end && self.shard + 1 < self.shards.len() {
                self.close_shard()?;
                self.shard += 1;
            }
        }
        Ok(())
    }

    /// Close the last file and write the index (when there are shards). Every planned tensor must be
    /// complete.
    pub fn finish(mut self) -> Result<()> {
        if let Some(t) = self.plan.get(self.next) {
            return Err(Error::Invalid(format!(
                "safetensors writer: {} was never completed",
                t.name
            )));
        }
        if self.file.is_none() {
            // No tensor at all: still one valid, empty file.
            self.open_shard()?;
        }
        self.close_shard()?;
        let n = self.shards.len();
        if n > 1 {
            let mut names: Vec<(&str, usize)> = Vec::with_capacity(self.plan.len());
            for (i, r) in self.shards.iter().enumerate() {
                names.extend(self.plan[r.clone()].iter().map(|t| (t.name.as_str(), i)));
            }
            names.sort_unstable();
            let mut weight_map = Map::new();
            for (name, i) in names {
                weight_map.insert(name.to_owned(), Value::from(shard_file_name(i, n)));
            }
            let index =
                json!({"metadata": {"total_size": self.total_bytes()}, "weight_map": weight_map});
            let mut s =
                serde_json::to_string_pretty(&index).map_err(|e| Error::Invalid(e.to_string()))?;
            s.push('\n');
            let p = self.dir.join("model.safetensors.index.json");
            std::fs::write(&p, s).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shards_fill_in_order_like_huggingface_hub() {
        assert_eq!(
            shard_ranges(&[6, 6, 2, 6, 2, 2], 10),
            vec![0..1, 1..3, 3..6]
        );
        // A tensor over the limit gets a shard of its own.
        assert_eq!(shard_ranges(&[3, 20, 3], 10), vec![0..1, 1..2, 2..3]);
        assert_eq!(shard_ranges(&[3, 3, 4], 10), vec![0..3]);
        assert_eq!(shard_ranges(&[], 10), vec![0..0]);
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(1, 12), "model-00002-of-00012.safetensors");
    }

    fn planned(name: &str, n: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            dtype: "F16",
            shape: vec![n],
            nbytes: 2 * n as u64,
        }
    }

    #[test]
    fn pieces_shards_index_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = vec![planned("b", 4), planned("a", 4), planned("c", 2)];
        let mut s = SafetensorsSink::new(tmp.path(), plan, 12, Map::new());
        assert_eq!(s.shard_count(), 2);
        assert!(s.write("a", &[0; 2]).is_err(), "out of order");
        s.write("b", &[1; 3]).unwrap();
        s.write("b", &[2; 5]).unwrap();
        assert!(s.write("a", &[0; 9]).is_err(), "too long");
        s.write("a", &[3; 8]).unwrap();
        s.write("c", &[4; 4]).unwrap();
        s.finish().unwrap();
        let f1 = std::fs::read(tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&f1).unwrap();
        assert_eq!(st.tensor("b").unwrap().data(), &[1, 1, 1, 2, 2, 2, 2, 2]);
        let f2 = std::fs::read(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&f2).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &[3; 8]);
        assert_eq!(st.tensor("c").unwrap().data(), &[4; 4]);
        let index: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let keys: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "b", "c"], "sorted as transformers writes it");
        assert_eq!(index["metadata"]["total_size"], 20);
        // An incomplete tensor is an error at the end.
        let tmp2 = tempfile::tempdir().unwrap();
        let mut s = SafetensorsSink::new(tmp2.path(), vec![planned("x", 4)], 100, Map::new());
        s.write("x", &[0; 4]).unwrap();
        assert!(s.finish().is_err());
    }
}
