//! Fuzz targets for every parser of a file a user may be handed, and a mutation fuzzer that runs them on
//! stable Rust (no sanitizer flags, no nightly): `cargo run --release -p quant_engine --example fuzz`.
//!
//! Each target takes bytes, puts them where the real code reads them (a GGUF file, one file of a Hugging
//! Face or GPTQ folder otherwise valid, an importance matrix) and runs what a user's click runs: open the
//! model, load it, run two tokens, render its chat template, tokenize. An input passes when that ends
//! in `Ok` or a clear `Err`; it fails when it panics, runs longer than the time limit, or asks for more
//! than the memory limit (the allocator's per-thread budget, [`crate::bounded`], aborts with the size).
//!
//! Without compiler coverage the fuzzer uses what it can see as feedback: an input whose error message
//! (numbers stripped) was not seen before joins the corpus, so the search spreads over the parsers'
//! distinct checks instead of repeating the first one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::infer::{Logits, Model};
use crate::model::fixture::FixtureSpec;
use crate::model::{ChatMessage, SourceModel};
use crate::{Error, Result};

/// Most memory one execution may hold.
pub const MAX_EXEC_BYTES: usize = 1 << 30;
/// Longest one execution may run.
pub const MAX_EXEC_TIME: Duration = Duration::from_secs(10);
/// New corpus files one run saves at most (the corpus is committed: kept small).
const MAX_SAVED: usize = 24;
/// Largest input the mutator makes.
const MAX_INPUT: usize = 1 << 20;

/// The parsers under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A whole `.gguf` file (header, metadata, tensor table, tokenizer keys, chat template).
    Gguf,
    /// `model.safetensors` of a Hugging Face folder (its JSON header and offsets).
    Safetensors,
    /// `config.json` of a Hugging Face folder.
    Config,
    /// `tokenizer.json` (first byte 0…127) or `tokenizer_config.json` (128…255) of a folder.
    Tokenizer,
    /// A GPTQ folder: the first byte picks `model.safetensors`, `config.json` (with its
    /// `quantization_config`) or `quantize_config.json`.
    Gptq,
    /// An importance matrix file (llama.cpp's GGUF format or the legacy `.dat`).
    Imatrix,
    /// A compressed-tensors pack-quantized folder (our AWQ writer's): the first byte picks
    /// `model.safetensors` or `config.json`.
    CompressedTensors,
    /// An EXL2 folder (our writer's): the first byte picks `model.safetensors` or `config.json`.
    Exl2,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::Gguf,
        Target::Safetensors,
        Target::Config,
        Target::Tokenizer,
        Target::Gptq,
        Target::Imatrix,
        Target::CompressedTensors,
        Target::Exl2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::Safetensors => "safetensors",
            Target::Config => "config",
            Target::Tokenizer => "tokenizer",
            Target::Gptq => "gptq",
            Target::Imatrix => "imatrix",
            Target::CompressedTensors => "compressed-tensors",
            Target::Exl2 => "exl2",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// A scratch folder with the valid files each target starts from.
pub struct Workspace {
    dir: PathBuf,
    /// A valid Hugging Face folder.
    hf: PathBuf,
    /// A valid GPTQ folder.
    gptq: PathBuf,
    /// A valid compressed-tensors folder.
    ct: PathBuf,
    /// A valid EXL2 folder.
    exl2: PathBuf,
    /// The valid files of both folders, to put back after each input.
    originals: Vec<(PathBuf, Vec<u8>)>,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(p, e)
}

impl Workspace {
    /// Build the valid folders under `root` (in memory-backed `/dev/shm` when it exists).
    pub fn new() -> Result<Self> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("qs-fuzz-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let ws = Self {
            hf: dir.join("hf"),
            gptq: dir.join("gptq"),
            ct: dir.join("ct"),
            exl2: dir.join("exl2"),
            dir,
            originals: Vec::new(),
        };
        let spec = FixtureSpec::tiny_llama();
        crate::model::fixture::write_fixture(&spec, &ws.hf)?;
        let src = SourceModel::open(&ws.hf)?;
        let opts = crate::quantize_gptq::GptqQuantizeOptions {
            solver: crate::solvers::gptq::GptqOptions {
                bits: 4,
                group_size: Some(32),
                ..crate::solvers::gptq::GptqOptions::default()
            },
            calib: crate::calib::CalibSource::Bundled,
            calib_opts: crate::calib::CalibOptions {
                rows: 2,
                seq_len: 16,
                seed: 0,
            },
            true_sequential: false,
            activation_budget_bytes: 1 << 30,
            rtn: true,
            awq_scales: None,
            max_shard_bytes: None,
            backend: crate::backend::Backend::Cpu,
        };
        crate::quantize_gptq::quantize_gptq(
            &src,
            &opts,
            &crate::output::OutputSpec::folder(&ws.gptq),
            &mut |_, _, _| true,
        )?;
        // Round-to-nearest AWQ in compressed-tensors' layout: no calibration, a moment to write.
        let awq = crate::quantize_awq::AwqQuantizeOptions {
            grid: crate::solvers::awq::AwqGrid {
                bits: 4,
                group_size: 32,
            },
            layout: crate::writers::awq::AwqLayout::CompressedTensors,
            rtn: true,
            ..crate::quantize_awq::AwqQuantizeOptions::default()
        };
        crate::quantize_awq::quantize_awq(
            &src,
            &awq,
            &crate::output::OutputSpec::folder(&ws.ct),
            &mut |_, _, _| true,
        )?;
        // EXL2 on two rows of 16 tokens: measured and written in a moment.
        let exl2 = crate::quantize_exl2::Exl2QuantizeOptions {
            calib_opts: crate::calib::CalibOptions {
                rows: 2,
                seq_len: 16,
                seed: 0,
            },
            measure_rows: 1,
            budget: crate::solvers::mix::MixBudget::Bpw(5.0),
            ..crate::quantize_exl2::Exl2QuantizeOptions::default()
        };
        crate::quantize_exl2::quantize_exl2(
            &src,
            &exl2,
            &crate::output::OutputSpec::folder(&ws.exl2),
            &mut |_, _, _, _| true,
        )?;
        // measurement.json is not read when a folder is opened.
        let _ = std::fs::remove_file(ws.exl2.join("measurement.json"));
        let mut originals = Vec::new();
        for d in [&ws.hf, &ws.gptq, &ws.ct, &ws.exl2] {
            for e in std::fs::read_dir(d).map_err(io(d))?.flatten() {
                let p = e.path();
                let b = std::fs::read(&p).map_err(io(&p))?;
                originals.push((p, b));
            }
        }
        let mut ws = ws;
        ws.originals = originals;
        Ok(ws)
    }

    /// Where target `t`'s bytes go, and the folder (or file) then opened.
    fn place(&self, t: Target, data: &[u8]) -> Result<(PathBuf, PathBuf)> {
        let (file, open) = match t {
            Target::Gguf => (self.dir.join("model.gguf"), self.dir.join("model.gguf")),
            Target::Imatrix => (self.dir.join("imatrix.dat"), self.dir.join("imatrix.dat")),
            Target::Safetensors => (self.hf.join("model.safetensors"), self.hf.clone()),
            Target::Config => (self.hf.join("config.json"), self.hf.clone()),
            Target::Tokenizer => {
                let name = if data.first().is_some_and(|b| *b >= 128) {
                    "tokenizer_config.json"
                } else {
                    "tokenizer.json"
                };
                (self.hf.join(name), self.hf.clone())
            }
            Target::Gptq => {
                let name = match data.first().map_or(0, |b| b % 3) {
                    0 => "model.safetensors",
                    1 => "config.json",
                    _ => "quantize_config.json",
                };
                (self.gptq.join(name), self.gptq.clone())
            }
            Target::CompressedTensors | Target::Exl2 => {
                let name = match data.first().map_or(0, |b| b % 2) {
                    0 => "model.safetensors",
                    _ => "config.json",
                };
                let dir = if t == Target::Exl2 {
                    &self.exl2
                } else {
                    &self.ct
                };
                (dir.join(name), dir.clone())
            }
        };
        let body = match t {
            Target::Tokenizer | Target::Gptq | Target::CompressedTensors | Target::Exl2 => {
                data.get(1..).unwrap_or(&[])
            }
            _ => data,
        };
        std::fs::write(&file, body).map_err(io(&file))?;
        Ok((file, open))
    }

    /// The valid bytes each target starts from (what [`place`](Self::place) takes).
    pub fn seeds(&self, t: Target) -> Result<Vec<Vec<u8>>> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(io(&p));
        Ok(match t {
            Target::Gguf => {
                let src = SourceModel::open(&self.hf)?;
                let out = self.dir.join("seed.gguf");
                let mut v = Vec::new();
                for mix in ["q8_0", "q4_k_m"] {
                    let opts = crate::quantize::GgufQuantizeOptions {
                        mix: crate::recipes::gguf::GgufMix::parse(mix)
                            .ok_or_else(|| Error::Invalid(format!("mix {mix}")))?,
                        overrides: Vec::new(),
                        imatrix: None,
                        backend: crate::backend::Backend::Cpu,
                    };
                    crate::quantize::quantize_gguf(
                        &src,
                        &opts,
                        &crate::output::OutputSpec::file(&out).overwrite(true),
                        &mut |_, _, _| true,
                    )?;
                    v.push(read(out.clone())?);
                }
                v
            }
            Target::Safetensors => vec![read(self.hf.join("model.safetensors"))?],
            Target::Config => vec![read(self.hf.join("config.json"))?],
            Target::Tokenizer => {
                let mut a = vec![0u8];
                a.extend(read(self.hf.join("tokenizer.json"))?);
                let mut b = vec![200u8];
                b.extend(read(self.hf.join("tokenizer_config.json"))?);
                vec![a, b]
            }
            Target::Gptq => ["model.safetensors", "config.json", "quantize_config.json"]
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let mut v = vec![i as u8];
                    v.extend(read(self.gptq.join(n))?);
                    Ok(v)
                })
                .collect::<Result<_>>()?,
            Target::CompressedTensors | Target::Exl2 => ["model.safetensors", "config.json"]
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let dir = if t == Target::Exl2 {
                        &self.exl2
                    } else {
                        &self.ct
                    };
                    let mut v = vec![i as u8];
                    v.extend(read(dir.join(n))?);
                    Ok(v)
                })
                .collect::<Result<_>>()?,
            Target::Imatrix => {
                let mut m = crate::imatrix::Imatrix {
                    datasets: vec!["fuzz".into()],
                    chunk_count: 2,
                    chunk_size: 16,
                    ..Default::default()
                };
                for name in ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"] {
                    m.entries.insert(
                        name.into(),
                        crate::imatrix::ImatrixEntry {
                            sums: (0..64).map(|i| i as f32 * 0.5).collect(),
                            counts: vec![32.0],
                        },
                    );
                }
                let g = self.dir.join("seed.imatrix");
                m.write_gguf(&g)?;
                let d = self.dir.join("seed.dat");
                m.write_dat(&d)?;
                vec![read(g)?, read(d)?]
            }
        })
    }

    /// Put back the valid file that an input replaced.
    fn restore(&self, file: &Path) -> Result<()> {
        match self.originals.iter().find(|(p, _)| p == file) {
            Some((p, b)) => std::fs::write(p, b).map_err(io(p)),
            None => Ok(()),
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Run target `t` on `data` once, as the product would: `Ok` or a clear error are both a pass; `Err` of
/// the outer result is a panic (the valid file is put back either way).
pub fn run_one(ws: &Workspace, t: Target, data: &[u8]) -> std::thread::Result<Result<()>> {
    let (file, open) = match ws.place(t, data) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_placed(t, &open)));
    if let Err(e) = ws.restore(&file) {
        return Ok(Err(e));
    }
    r
}

fn run_placed(t: Target, open: &Path) -> Result<()> {
    if t == Target::Imatrix {
        let m = crate::imatrix::Imatrix::read(open)?;
        for name in m.entries.keys() {
            let _ = m.weights(name);
        }
        return Ok(());
    }
    let src = SourceModel::open(open)?;
    let _ = crate::model::summary::ModelSummary::of(&src);
    let tok = &src.tokenizer;
    let ids = tok.encode("Hello, world", true)?;
    let _ = tok.decode(&ids, false)?;
    let _ = tok.render_chat(&[ChatMessage::new("user", "hi")], true);
    // Run it when it is small enough to run quickly.
    let c = &src.config;
    if c.hidden_size <= 4096
        && c.num_layers <= 8
        && c.vocab_size <= 1 << 17
        && src.file_size_bytes < 64 << 20
    {
        let model = Model::load(&src)?;
        let ids: Vec<u32> = ids
            .into_iter()
            .filter(|&i| (i as usize) < c.vocab_size)
            .take(4)
            .collect();
        if !ids.is_empty() {
            model.check_context(ids.len(), false)?;
            let mut cache = model.new_cache(ids.len());
            model.forward(&ids, &mut cache, Logits::Last)?;
        }
    }
    Ok(())
}

/// A small, fast pseudo-random generator (xorshift64*), seeded: runs are repeatable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// One to eight random edits of `data` (`other` is a second corpus entry to splice from).
pub fn mutate(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        let len = d.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next_u64() as u8;
            }
            2 | 3 if len >= 8 => {
                // An interesting integer, 1/2/4/8 bytes little-endian, maybe off by one.
                let w = 1 << rng.below(4);
                let i = rng.below(len - w + 1);
                let mut v = INTERESTING[rng.below(INTERESTING.len())];
                match rng.below(4) {
                    0 => v = v.wrapping_add(1),
                    1 => v = v.wrapping_sub(1),
                    _ => {}
                }
                d[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            4 if len > 1 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                d.drain(a..b);
            }
            5 if len < MAX_INPUT => {
                let at = rng.below(len + 1);
                let k = 1 + rng.below(16);
                let ins: Vec<u8> = (0..k).map(|_| rng.next_u64() as u8).collect();
                d.splice(at..at, ins);
            }
            6 if len > 1 && len < MAX_INPUT => {
                // Duplicate a range.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(256)).min(len);
                let piece = d[a..b].to_vec();
                let at = rng.below(len + 1);
                d.splice(at..at, piece);
            }
            7 if len > 0 => {
                d.truncate(rng.below(len));
            }
            8 if !other.is_empty() => {
                // Splice: a prefix of this one and a suffix of the other.
                let a = rng.below(d.len() + 1);
                let b = rng.below(other.len());
                d.truncate(a);
                d.extend_from_slice(&other[b..]);
            }
            9 if len > 0 => {
                // Text inputs: a JSON-ish token at a random place.
                const TOKENS: [&[u8]; 12] = [
                    b"null",
                    b"-1",
                    b"1e309",
                    b"18446744073709551616",
                    b"[]",
                    b"{}",
                    b"\"\"",
                    b"\"F16\"",
                    b"\"I64\"",
                    b"0",
                    b"true",
                    b"\"\\u0000\"",
                ];
                let t = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(len + 1);
                d.splice(at..at, t.iter().copied());
            }
            _ if len > 4 => {
                // Overwrite a range with copies of one byte.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                let v = rng.next_u64() as u8;
                d[a..b].iter_mut().for_each(|x| *x = v);
            }
            _ => d.push(rng.next_u64() as u8),
        }
    }
    d.truncate(MAX_INPUT);
    d
}

/// An error message with its numbers and paths taken out: what kind of check failed.
fn signature(e: &Error) -> String {
    let s = e.to_string();
    let mut out = String::with_capacity(s.len());
    let mut last_digit = false;
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            if !last_digit {
                out.push('#');
            }
            last_digit = true;
        } else {
            last_digit = false;
            out.push(ch);
        }
    }
    out.chars().take(160).collect()
}

/// What a fuzzing run found.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: u64,
    pub ok: u64,
    /// Distinct error kinds seen.
    pub signatures: usize,
    pub corpus: usize,
    /// Inputs that panicked or ran too long, saved under the crash folder.
    pub crashes: Vec<PathBuf>,
    pub slowest: Duration,
    pub elapsed: Duration,
    /// The largest single allocation any execution asked for.
    pub largest_request: usize,
}

/// Fuzz target `t` for `budget` (time) or `max_execs`, starting from the built-in seeds plus the files
/// in `corpus` (new interesting inputs are saved there when `save` is set); failing inputs go to `crashes`.
pub fn fuzz(
    t: Target,
    seed: u64,
    budget: Duration,
    max_execs: u64,
    corpus: Option<&Path>,
    save: bool,
    crashes: &Path,
) -> Result<Report> {
    let ws = Workspace::new()?;
    let mut inputs = ws.seeds(t)?;
    if let Some(dir) = corpus {
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                if let Ok(b) = std::fs::read(&f) {
                    inputs.push(b);
                }
            }
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let mut saved = 0usize;
    let start = Instant::now();
    // Hook panics quietly: they are counted and saved, not printed for every input.
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    crate::bounded::take_largest_request();
    let result = (|| -> Result<()> {
        let mut i = 0u64;
        while report.executions < max_execs && start.elapsed() < budget {
            let input = if i < inputs.len() as u64 {
                inputs[i as usize].clone()
            } else {
                let a = &inputs[rng.below(inputs.len())];
                let b = &inputs[rng.below(inputs.len())];
                mutate(&mut rng, a, b)
            };
            i += 1;
            let t0 = Instant::now();
            crate::bounded::set_thread_budget(MAX_EXEC_BYTES, crate::bounded::Exceeded::Abort);
            let r = run_one(&ws, t, &input);
            crate::bounded::set_thread_budget(0, crate::bounded::Exceeded::Abort);
            let took = t0.elapsed();
            report.executions += 1;
            report.slowest = report.slowest.max(took);
            let failed = match &r {
                Err(_) => Some("panic"),
                Ok(_) if took > MAX_EXEC_TIME => Some("slow"),
                _ => None,
            };
            if let Some(kind) = failed {
                std::fs::create_dir_all(crashes).map_err(io(crashes))?;
                let p = crashes.join(format!("{}-{kind}-{}.bin", t.name(), report.executions));
                std::fs::write(&p, &input).map_err(io(&p))?;
                report.crashes.push(p);
            }
            let sig = match &r {
                Ok(Ok(())) => {
                    report.ok += 1;
                    "ok".to_owned()
                }
                Ok(Err(e)) => signature(e),
                Err(_) => "panic".to_owned(),
            };
            if seen.insert(sig) && i > inputs.len() as u64 && inputs.len() < 4096 {
                if save && saved < MAX_SAVED {
                    saved += 1;
                    if let Some(dir) = corpus {
                        std::fs::create_dir_all(dir).map_err(io(dir))?;
                        let p = dir.join(format!("{:016x}", fnv(&input)));
                        std::fs::write(&p, &input).map_err(io(&p))?;
                    }
                }
                inputs.push(input);
            }
        }
        Ok(())
    })();
    std::panic::set_hook(prev_hook);
    result?;
    report.signatures = seen.len();
    report.elapsed = start.elapsed();
    report.corpus = inputs.len();
    report.largest_request = crate::bounded::take_largest_request();
    Ok(report)
}

/// FNV-1a 64 of `b` (corpus file names).
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_accepts_its_seeds() {
        let ws = Workspace::new().expect("workspace");
        for t in Target::ALL {
            for (i, s) in ws.seeds(t).expect("seeds").iter().enumerate() {
                match run_one(&ws, t, s) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => panic!("{} seed {i}: {e}", t.name()),
                    Err(_) => panic!("{} seed {i} panicked", t.name()),
                }
            }
        }
    }

    #[test]
    fn mutations_are_repeatable_and_bounded() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let d = vec![1u8; 100];
        for _ in 0..1000 {
            let x = mutate(&mut a, &d, &d);
            assert_eq!(x, mutate(&mut b, &d, &d));
            assert!(x.len() <= MAX_INPUT);
        }
    }
}
