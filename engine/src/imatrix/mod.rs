//! Importance matrices: for every weight matrix, the per-column mean of the squared activations that
//! multiply it — llama.cpp's `llama-imatrix` statistics (`shared/reference/gguf.md` §6).
//!
//! * [`Imatrix`] — sums of squares and token counts per GGUF weight name, read from and written to both
//!   llama.cpp formats: the GGUF-based one (`<name>.in_sum2` / `<name>.counts` tensors, `imatrix.*` keys)
//!   and the legacy `.dat`.
//! * [`Imatrix::weights`] — the per-column means llama-quantize hands to the weighted quantizers.
//! * [`collect`] — computing one with our forward pass on calibration text.

pub mod collect;

use std::collections::BTreeMap;
use std::path::Path;

use crate::codecs::GgmlType;
use crate::model::gguf::{GgufArray, GgufFile, GgufValue};
use crate::writers::gguf::{write_gguf_blobs, GgufBlob};
use crate::{Error, Result};

/// Largest importance matrix file read (a 405B model's is about 100 MiB).
pub const MAX_IMATRIX_BYTES: u64 = 2 << 30;

pub use collect::{compute_imatrix, ImatrixOptions};

/// Statistics for one weight matrix (`n_mat` = 1 for dense weights, the number of experts for MoE).
#[derive(Clone, Debug, PartialEq)]
pub struct ImatrixEntry {
    /// Σ x_j² over the tokens seen, `[n_mat][ne0]` (legacy files: mean·ncall, see [`Imatrix::legacy`]).
    pub sums: Vec<f32>,
    /// Tokens seen, per matrix (legacy files: one value, `ncall`).
    pub counts: Vec<f32>,
}

/// An importance matrix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    /// Calibration files it was computed on.
    pub datasets: Vec<String>,
    /// Chunks processed.
    pub chunk_count: u32,
    /// Tokens per chunk (0 when unknown, as in legacy files).
    pub chunk_size: u32,
    /// By GGUF weight name (`blk.0.attn_q.weight`), sorted.
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Read from a legacy `.dat` file: `sums` hold mean·ncall and `counts` ncall.
    pub legacy: bool,
}

/// The bundled default calibration text: literature, speeches, chat turns, technical prose, source code
/// and 26 languages, interleaved (public domain or permissive licences, attribution in
/// `assets/calibration/README.md`, built by `assets/calibration/build_default.py`), about 460 kB.
pub const DEFAULT_CALIBRATION_TEXT: &str = include_str!("../../../assets/calibration/default.txt");

/// Name recorded as the dataset of importance matrices computed on [`DEFAULT_CALIBRATION_TEXT`].
pub const DEFAULT_CALIBRATION_NAME: &str = "quant-studio:default.txt";

/// Largest entry count and vector length we accept from a file (hostile input).
const MAX_ENTRIES: usize = 1 << 20;

impl Imatrix {
    /// The per-column importance of weight `gguf_name` as llama-quantize computes it: sums / count per
    /// matrix, 1.0 where a matrix saw no tokens (legacy files: value / ncall).
    pub fn weights(&self, gguf_name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(gguf_name)?;
        if self.legacy {
            let ncall = e.counts.first().copied().unwrap_or(0.0);
            return Some(if ncall > 0.0 {
                e.sums.iter().map(|s| s / ncall).collect()
            } else {
                e.sums.clone()
            });
        }
        let n_mat = e.counts.len().max(1);
        let ne0 = e.sums.len() / n_mat;
        let mut w = vec![0.0f32; e.sums.len()];
        for (j, &count) in e.counts.iter().enumerate() {
            for i in 0..ne0 {
                w[j * ne0 + i] = if count > 0.0 {
                    e.sums[j * ne0 + i] / count
                } else {
                    1.0
                };
            }
        }
        Some(w)
    }

    /// Read either llama.cpp format (GGUF when the file starts with `GGUF`, else legacy `.dat`).
    pub fn read(path: &Path) -> Result<Imatrix> {
        let bytes = crate::bounded::read_capped(path, MAX_IMATRIX_BYTES, "importance matrix")?;
        if bytes.starts_with(b"GGUF") {
            Self::parse_gguf(path, &bytes)
        } else {
            Self::parse_dat(path, &bytes)
        }
    }

    fn parse_gguf(path: &Path, bytes: &[u8]) -> Result<Imatrix> {
        let bad = |d: String| Error::malformed(path, "imatrix", d);
        let g = GgufFile::parse(path, bytes)?;
        let datasets = g.get_str_array("imatrix.datasets")?;
        let chunk_count = g.get_u32("imatrix.chunk_count")?;
        let chunk_size = g.get_u32("imatrix.chunk_size")?;
        let (Some(datasets), Some(chunk_count), Some(chunk_size)) =
            (datasets, chunk_count, chunk_size)
        else {
            return Err(bad(
                "the imatrix.datasets, imatrix.chunk_count and imatrix.chunk_size keys are required \
                 (llama-quantize refuses files without them)"
                    .into(),
            ));
        };
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let t = g
                .tensor(name)
                .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
            if t.ggml_type != 0 {
                return Err(bad(format!("tensor {name} is {}, not F32", t.type_name())));
            }
            let r = g
                .tensor_range(t)
                .filter(|r| r.end <= bytes.len())
                .ok_or_else(|| bad(format!("tensor {name} lies outside the file")))?;
            Ok(bytes[r]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut entries = BTreeMap::new();
        for t in g.tensors() {
            let Some(name) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = f32s(&t.name)?;
            let counts = f32s(&format!("{name}.counts"))?;
            if counts.is_empty() || sums.is_empty() || !sums.len().is_multiple_of(counts.len()) {
                return Err(bad(format!(
                    "{name}: {} sums do not split into {} matrices",
                    sums.len(),
                    counts.len()
                )));
            }
            if counts.iter().any(|c| !c.is_finite() || *c < 0.0) {
                return Err(bad(format!("{name}: counts must be finite and ≥ 0")));
            }
            entries.insert(name.to_owned(), ImatrixEntry { sums, counts });
        }
        if entries.is_empty() {
            return Err(bad("no *.in_sum2 tensors".into()));
        }
        Ok(Imatrix {
            datasets: datasets.to_vec(),
            chunk_count,
            chunk_size,
            entries,
            legacy: false,
        })
    }

    fn parse_dat(path: &Path, b: &[u8]) -> Result<Imatrix> {
        let bad = |d: String| Error::malformed(path, "imatrix (legacy .dat)", d);
        let mut p = 0usize;
        let i32_at = |p: &mut usize| -> Result<i32> {
            let v = b
                .get(*p..*p + 4)
                .ok_or_else(|| bad(format!("truncated at byte {p}")))?;
            *p += 4;
            Ok(i32::from_le_bytes([v[0], v[1], v[2], v[3]]))
        };
        let n = i32_at(&mut p)?;
        if n < 1 || n as usize > MAX_ENTRIES {
            return Err(bad(format!(
                "{n} entries (not a GGUF file either: it does not start with \"GGUF\")"
            )));
        }
        let mut entries = BTreeMap::new();
        for i in 0..n {
            let len = i32_at(&mut p)?;
            let name = usize::try_from(len)
                .ok()
                .and_then(|l| b.get(p..p.checked_add(l)?))
                .ok_or_else(|| bad(format!("entry {i}: bad name length {len}")))?;
            p += name.len();
            let name = String::from_utf8_lossy(name).into_owned();
            let ncall = i32_at(&mut p)?;
            let nval = i32_at(&mut p)?;
            let vals = usize::try_from(nval)
                .ok()
                .filter(|&v| v >= 1)
                .and_then(|v| b.get(p..p.checked_add(v.checked_mul(4)?)?))
                .ok_or_else(|| bad(format!("entry {name}: bad value count {nval}")))?;
            p += vals.len();
            let sums = vals
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            entries.insert(
                name,
                ImatrixEntry {
                    sums,
                    counts: vec![ncall as f32],
                },
            );
        }
        let mut m = Imatrix {
            entries,
            legacy: true,
            ..Imatrix::default()
        };
        // Optional trailer: chunk count and the dataset's file name.
        if p < b.len() {
            m.chunk_count = i32_at(&mut p)?.max(0) as u32;
            if p < b.len() {
                let len = i32_at(&mut p)?;
                if let Some(s) = usize::try_from(len)
                    .ok()
                    .filter(|&l| l > 0)
                    .and_then(|l| b.get(p..p.checked_add(l)?))
                {
                    m.datasets.push(String::from_utf8_lossy(s).into_owned());
                }
            }
        }
        Ok(m)
    }

    /// Sums and counts as the GGUF format stores them (legacy data converted: count = ncall·chunk_size
    /// is unknown, so sums become means and counts 1).
    fn sums_and_counts(&self, e: &ImatrixEntry) -> (Vec<f32>, Vec<f32>) {
        if self.legacy {
            let w = {
                let ncall = e.counts.first().copied().unwrap_or(0.0);
                if ncall > 0.0 {
                    e.sums.iter().map(|s| s / ncall).collect()
                } else {
                    e.sums.clone()
                }
            };
            (w, vec![1.0])
        } else {
            (e.sums.clone(), e.counts.clone())
        }
    }

    /// Write llama.cpp's GGUF imatrix format (what `llama-imatrix` writes by default).
    pub fn write_gguf(&self, path: &Path) -> Result<()> {
        let kvs = vec![
            ("general.type".to_owned(), GgufValue::Str("imatrix".into())),
            (
                "imatrix.datasets".to_owned(),
                GgufValue::Array(GgufArray::Str(self.datasets.clone())),
            ),
            (
                "imatrix.chunk_count".to_owned(),
                GgufValue::U32(self.chunk_count),
            ),
            (
                "imatrix.chunk_size".to_owned(),
                GgufValue::U32(self.chunk_size),
            ),
        ];
        let mut data: Vec<(String, Vec<u64>, Vec<u8>)> = Vec::new();
        for (name, e) in &self.entries {
            let (sums, counts) = self.sums_and_counts(e);
            let n_mat = counts.len().max(1);
            let ne0 = (sums.len() / n_mat) as u64;
            let (ne_s, ne_c) = if n_mat == 1 {
                (vec![ne0], vec![1])
            } else {
                (vec![ne0, n_mat as u64], vec![1, n_mat as u64])
            };
            let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            data.push((format!("{name}.in_sum2"), ne_s, le(&sums)));
            data.push((format!("{name}.counts"), ne_c, le(&counts)));
        }
        let blobs: Vec<GgufBlob<'_>> = data
            .iter()
            .map(|(n, ne, d)| GgufBlob {
                name: n,
                ne: ne.clone(),
                ty: GgmlType::F32,
                data: d,
            })
            .collect();
        write_gguf_blobs(path, &kvs, &blobs)
    }

    /// Write llama.cpp's legacy `.dat` format (`llama-imatrix --output-format dat`): per entry
    /// `ncall = ⌈max count / chunk_size⌉` and values `mean · ncall`, entries without data skipped.
    pub fn write_dat(&self, path: &Path) -> Result<()> {
        let mut o = Vec::new();
        let mut stored = Vec::new();
        for (name, e) in &self.entries {
            if self.legacy || e.counts.iter().any(|&c| c > 0.0) {
                stored.push((name, e));
            }
        }
        o.extend_from_slice(&(stored.len() as i32).to_le_bytes());
        for (name, e) in stored {
            o.extend_from_slice(&(name.len() as i32).to_le_bytes());
            o.extend_from_slice(name.as_bytes());
            if self.legacy {
                o.extend_from_slice(
                    &(e.counts.first().copied().unwrap_or(0.0) as i32).to_le_bytes(),
                );
                o.extend_from_slice(&(e.sums.len() as i32).to_le_bytes());
                e.sums
                    .iter()
                    .for_each(|v| o.extend_from_slice(&v.to_le_bytes()));
                continue;
            }
            let chunk = i64::from(self.chunk_size.max(1));
            let max_count = e.counts.iter().fold(0.0f32, |m, &c| m.max(c)) as i64;
            let ncall = ((max_count + chunk - 1) / chunk) as i32;
            o.extend_from_slice(&ncall.to_le_bytes());
            o.extend_from_slice(&(e.sums.len() as i32).to_le_bytes());
            let per = e.sums.len() / e.counts.len().max(1);
            for (i, &v) in e.sums.iter().enumerate() {
                let (mut value, mut count) = (v, e.counts[i / per.max(1)]);
                if count == 0.0 {
                    value = 1.0;
                    count = 1.0;
                }
                o.extend_from_slice(&((value / count) * ncall as f32).to_le_bytes());
            }
        }
        o.extend_from_slice(&(self.chunk_count as i32).to_le_bytes());
        let ds = self.datasets.last().map_or("", String::as_str);
        o.extend_from_slice(&(ds.len() as i32).to_le_bytes());
        o.extend_from_slice(ds.as_bytes());
        std::fs::write(path, &o).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Imatrix {
        let mut entries = BTreeMap::new();
        entries.insert(
            "blk.0.attn_q.weight".to_owned(),
            ImatrixEntry {
                sums: vec![4.0, 0.0, 10.0, 2.5],
                counts: vec![2.0],
            },
        );
        entries.insert(
            "blk.0.ffn_down.weight".to_owned(),
            ImatrixEntry {
                sums: vec![1.0, 3.0, 5.0, 7.0],
                counts: vec![4.0, 0.0], // two experts, the second unused
            },
        );
        Imatrix {
            datasets: vec!["calib.txt".into()],
            chunk_count: 3,
            chunk_size: 2,
            entries,
            legacy: false,
        }
    }

    #[test]
    fn weights_are_means_and_one_where_unseen() {
        let m = sample();
        assert_eq!(
            m.weights("blk.0.attn_q.weight"),
            Some(vec![2.0, 0.0, 5.0, 1.25])
        );
        assert_eq!(
            m.weights("blk.0.ffn_down.weight"),
            Some(vec![0.25, 0.75, 1.0, 1.0])
        );
        assert_eq!(m.weights("blk.0.attn_k.weight"), None);
    }

    #[test]
    fn gguf_and_dat_round_trip() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = sample();
        let g = tmp.path().join("m.gguf");
        m.write_gguf(&g).expect("write gguf");
        assert_eq!(Imatrix::read(&g).expect("read gguf"), m);

        let d = tmp.path().join("m.dat");
        m.write_dat(&d).expect("write dat");
        let back = Imatrix::read(&d).expect("read dat");
        assert!(back.legacy);
        assert_eq!(back.chunk_count, 3);
        assert_eq!(back.datasets, vec!["calib.txt".to_owned()]);
        // ncall = ⌈2/2⌉ = 1 and ⌈4/2⌉ = 2; values mean·ncall; the unseen expert stores 1·ncall.
        let q = &back.entries["blk.0.attn_q.weight"];
        assert_eq!(
            (q.counts.clone(), q.sums.clone()),
            (vec![1.0], vec![2.0, 0.0, 5.0, 1.25])
        );
        let f = &back.entries["blk.0.ffn_down.weight"];
        assert_eq!(
            (f.counts.clone(), f.sums.clone()),
            (vec![2.0], vec![0.5, 1.5, 2.0, 2.0])
        );
        for name in m.entries.keys() {
            assert_eq!(back.weights(name), m.weights(name), "{name}");
        }
        // And a legacy matrix written as GGUF keeps its weights.
        let g2 = tmp.path().join("m2.gguf");
        back.write_gguf(&g2).expect("write gguf from dat");
        let back2 = Imatrix::read(&g2).expect("read");
        for name in m.entries.keys() {
            assert_eq!(back2.weights(name), m.weights(name), "{name}");
        }
    }

    #[test]
    fn hostile_files_are_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("bad.dat");
        for bytes in [
            vec![],
            vec![0, 0, 0, 0],
            (-1i32).to_le_bytes().to_vec(),
            [1i32.to_le_bytes(), 1000i32.to_le_bytes()].concat(),
            [1i32, 1, 0x41, 1, i32::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ] {
            std::fs::write(&p, &bytes).expect("write");
            assert!(Imatrix::read(&p).is_err(), "{bytes:?}");
        }
        // A GGUF without the imatrix keys.
        let g = tmp.path().join("nokeys.gguf");
        write_gguf_blobs(
            &g,
            &[],
            &[GgufBlob {
                name: "a.in_sum2",
                ne: vec![1],
                ty: GgmlType::F32,
                data: &[0, 0, 128, 63],
            }],
        )
        .expect("write");
        let e = Imatrix::read(&g).expect_err("no keys").to_string();
        assert!(e.contains("imatrix.datasets"), "{e}");
    }
}
