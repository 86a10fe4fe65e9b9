//! Perplexity and KL-divergence, computed exactly as llama.cpp's `llama-perplexity` does (see
//! `shared/reference/gguf.md` §5), so our numbers can be compared with the ones people publish.
//!
//! * [`perplexity`] — `llama-perplexity -f text -c n_ctx [--chunks N]`.
//! * [`kl_divergence`] — `--kl-divergence-base` followed by `--kl-divergence`, but both models run chunk
//!   by chunk side by side, so no logits file is written.
//! * [`stats`] — the formulas (log-softmax, the 16-bit log-prob compression, means with uncertainty,
//!   percentiles), each tested by hand.
//!
//! The drivers are written over a "forward one chunk" closure, so the chunking, BOS substitution,
//! scoring window and statistics are tested with synthetic logits, independently of the forward pass.

pub mod kld;
pub mod perplexity;
pub mod stats;

use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use kld::{kl_divergence, KldReport};
pub use perplexity::{perplexity, PerplexityReport};
pub use stats::{BaseLogProbs, KldChunkLine, KldStats, ValueUnc};

use crate::infer::Numerics;
use crate::model::TextTokenizer;
use crate::{Error, Result};

/// "Run one chunk from an empty cache and return the logits of positions `first..`" — what the drivers
/// need of a model (tests pass synthetic ones).
#[cfg(test)]
pub(crate) type ChunkForward<'a> = dyn FnMut(&[u32], usize) -> Result<Vec<f32>> + 'a;

/// "Return the logits of positions `first + rows`" of a chunk, called with consecutive `rows` ranges
/// starting at 0 for each chunk (the model starts from an empty cache at `rows.start == 0`). Perplexity
/// asks for the scored rows in slices so a chunk's logits never sit in memory at once.
pub(crate) type ChunkForwardRows<'a> =
    dyn FnMut(&[u32], usize, std::ops::Range<usize>) -> Result<Vec<f32>> + 'a;

/// Rows of logits perplexity asks for at a time (32 × a 128k vocabulary = 16 MiB).
pub(crate) const LOGIT_ROWS_PER_PART: usize = 32;

/// How the text is cut into chunks, and the arithmetic the models run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalOptions {
    /// Tokens per chunk (llama-perplexity's `-c`, default 512).
    pub n_ctx: usize,
    /// Evaluate at most this many chunks (`--chunks`).
    pub max_chunks: Option<usize>,
    /// Exact f32 activations, or rounded as llama.cpp's CPU backend rounds them (to compare with
    /// `llama-perplexity` to a few hundredths of a percent). Applies to the base of a KL-divergence too.
    #[serde(default)]
    pub numerics: Numerics,
    /// Accept a context longer than the model's trained one.
    #[serde(default)]
    pub allow_long_context: bool,
    /// Where the arithmetic runs.
    #[serde(default)]
    pub backend: crate::backend::Backend,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            n_ctx: 512,
            max_chunks: None,
            numerics: Numerics::Exact,
            allow_long_context: false,
            backend: crate::backend::Backend::Cpu,
        }
    }
}

/// Smallest context we accept: at least one scored token per chunk (`n_ctx − 1 − n_ctx/2 ≥ 1`).
pub const MIN_N_CTX: usize = 4;

/// The bundled evaluation text: chapters 16 and 17 of *The Rust Programming Language* (MIT licence,
/// `assets/calibration/README.md`), about 120 kB — held out: the bundled calibration text stops in chapter 10.
pub const DEFAULT_EVAL_TEXT: &str =
    include_str!("../../../assets/calibration/rust-book-heldout.txt");

/// The name evaluations on [`DEFAULT_EVAL_TEXT`] report.
pub const DEFAULT_EVAL_NAME: &str = "quant-studio:rust-book-heldout.txt";

/// Whether `calibration` (the dataset name a quantized file records) and `text` (an evaluation text's name)
/// name the same text: equal, or the same file name (files record a path or a bare name).
pub fn same_text(calibration: &str, text: &str) -> bool {
    let file_name = |s: &str| {
        let s = s.strip_prefix("quant-studio:").unwrap_or(s);
        std::path::Path::new(s)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| s.to_owned())
    };
    calibration == text || (!text.is_empty() && file_name(calibration) == file_name(text))
}

/// Progress after each chunk (perplexity or KL-divergence).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkProgress {
    /// Index of the chunk just finished (0-based; llama-perplexity prints `chunk + 1`).
    pub chunk: usize,
    /// Chunks in the whole run.
    pub n_chunks: usize,
    /// Perplexity over all chunks so far (of the variant, in KL-divergence mode).
    pub ppl: f64,
    /// Text tokens (chunks × n_ctx) processed per second so far; in KL-divergence mode each token runs
    /// through both models.
    pub tokens_per_sec: f64,
    pub elapsed_secs: f64,
    /// Estimated seconds to the end, from the mean time per chunk so far.
    pub eta_secs: f64,
    /// The running KL-divergence columns (KL-divergence mode only).
    pub kld: Option<KldChunkLine>,
}

impl ChunkProgress {
    /// Chunks done so far.
    pub fn done(&self) -> usize {
        self.chunk + 1
    }
}

/// The evaluation text as llama-perplexity reads it: one trailing `'\n'` removed, tokenized once with
/// special tokens (BOS first iff the model's `add_bos`).
pub fn tokenize_text(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    tok.encode(text, true)
}

/// The chunks of a tokenized text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChunkPlan<'t> {
    pub tokens: &'t [u32],
    pub n_ctx: usize,
    pub n_chunks: usize,
    /// Written over each chunk's first token (llama.cpp does this iff `add_bos`).
    pub bos: Option<u32>,
}

impl<'t> ChunkPlan<'t> {
    /// Plans `⌊n_tokens / n_ctx⌋` chunks, capped by `max_chunks`; errors if the text has fewer than
    /// `2·n_ctx` tokens.
    pub fn new(tokens: &'t [u32], opts: &EvalOptions, bos: Option<u32>) -> Result<Self> {
        let n_ctx = opts.n_ctx;
        if n_ctx < MIN_N_CTX {
            return Err(Error::Invalid(format!(
                "context of {n_ctx} tokens is too small for perplexity: use at least {MIN_N_CTX}"
            )));
        }
        if tokens.len() < 2 * n_ctx {
            return Err(Error::Invalid(format!(
                "the text has {} tokens, but perplexity with a context of {n_ctx} needs at least {} \
                 (2 × context): use a longer text or a smaller context",
                tokens.len(),
                2 * n_ctx
            )));
        }
        let mut n_chunks = tokens.len() / n_ctx;
        if let Some(max) = opts.max_chunks {
            if max == 0 {
                return Err(Error::Invalid(
                    "the number of chunks must be at least 1".into(),
                ));
            }
            n_chunks = n_chunks.min(max);
        }
        Ok(Self {
            tokens,
            n_ctx,
            n_chunks,
            bos,
        })
    }

    /// The first position whose logits are scored (`n_ctx / 2`).
    pub fn first(&self) -> usize {
        self.n_ctx / 2
    }

    /// Tokens scored per chunk: `n_ctx − 1 − n_ctx/2`.
    pub fn scored_per_chunk(&self) -> usize {
        self.n_ctx - 1 - self.first()
    }

    /// The tokens fed for chunk `k`, first token replaced by BOS when the model adds one.
    pub fn input(&self, k: usize) -> Vec<u32> {
        let start = k * self.n_ctx;
        let mut v = self.tokens[start..start + self.n_ctx].to_vec();
        if let Some(b) = self.bos {
            v[0] = b;
        }
        v
    }

    /// The target of scored row `i` of chunk `k` (the original token at position `first + 1 + i`).
    pub fn target(&self, k: usize, i: usize) -> u32 {
        self.tokens[k * self.n_ctx + self.first() + 1 + i]
    }
}

/// The BOS that llama-perplexity writes over each chunk's first token, if any.
pub(crate) fn chunk_bos(tok: &TextTokenizer) -> Option<u32> {
    if tok.add_bos {
        tok.bos_token_id
    } else {
        None
    }
}

/// Checks a forward pass's logits: `rows × vocab` values.
pub(crate) fn check_logits(logits: &[f32], rows: usize, vocab: usize) -> Result<()> {
    if logits.len() < rows * vocab || vocab == 0 {
        return Err(Error::Invalid(format!(
            "the forward pass returned {} logits, expected at least {rows} rows of {vocab}",
            logits.len()
        )));
    }
    Ok(())
}

/// Checks that a target token id has a logit.
pub(crate) fn check_target(target: u32, vocab: usize) -> Result<usize> {
    let t = target as usize;
    if t >= vocab {
        return Err(Error::Invalid(format!(
            "token id {target} is outside the model's vocabulary of {vocab}: the tokenizer does not \
             match the model"
        )));
    }
    Ok(t)
}

/// Wall clock for a chunked run.
pub(crate) struct ChunkClock {
    start: Instant,
}

impl ChunkClock {
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Progress after chunk `chunk` (0-based) of `plan`.
    pub fn progress(
        &self,
        plan: &ChunkPlan<'_>,
        chunk: usize,
        ppl: f64,
        kld: Option<KldChunkLine>,
    ) -> ChunkProgress {
        let elapsed = self.elapsed_secs();
        let done = chunk + 1;
        let tokens = (done * plan.n_ctx) as f64;
        let tokens_per_sec = if elapsed > 0.0 { tokens / elapsed } else { 0.0 };
        let eta_secs = elapsed / done as f64 * plan.n_chunks.saturating_sub(done) as f64;
        ChunkProgress {
            chunk,
            n_chunks: plan.n_chunks,
            ppl,
            tokens_per_sec,
            elapsed_secs: elapsed,
            eta_secs,
            kld,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_evaluation_text_is_held_out_from_the_calibration_text() {
        let calib = crate::imatrix::DEFAULT_CALIBRATION_TEXT;
        let paragraphs: Vec<&str> = DEFAULT_EVAL_TEXT
            .split("\n\n")
            .map(str::trim)
            .filter(|p| p.len() > 80)
            .collect();
        assert!(paragraphs.len() > 200, "{}", paragraphs.len());
        let shared: Vec<&&str> = paragraphs.iter().filter(|p| calib.contains(**p)).collect();
        assert!(shared.is_empty(), "{shared:?}");
        assert!(DEFAULT_EVAL_TEXT.len() > 100_000);
        assert!(!same_text(
            crate::imatrix::DEFAULT_CALIBRATION_NAME,
            DEFAULT_EVAL_NAME
        ));
        assert!(same_text(
            crate::imatrix::DEFAULT_CALIBRATION_NAME,
            crate::imatrix::DEFAULT_CALIBRATION_NAME
        ));
        assert!(same_text("/data/groups_merged.txt", "groups_merged.txt"));
        assert!(same_text("groups_merged.txt", "/tmp/x/groups_merged.txt"));
        assert!(!same_text("groups_merged.txt", "wiki.test.raw"));
    }

    #[test]
    fn plan_counts_chunks_and_substitutes_bos() {
        let toks: Vec<u32> = (10..10 + 37).collect();
        let opts = EvalOptions {
            n_ctx: 8,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let p = ChunkPlan::new(&toks, &opts, Some(1)).expect("plan");
        assert_eq!(p.n_chunks, 4); // ⌊37/8⌋
        assert_eq!(p.first(), 4);
        assert_eq!(p.scored_per_chunk(), 3);
        assert_eq!(p.input(1), vec![1, 19, 20, 21, 22, 23, 24, 25]);
        assert_eq!(p.target(1, 0), 23); // position 8 + 4 + 1
        assert_eq!(p.target(1, 2), 25);
        let capped = ChunkPlan::new(
            &toks,
            &EvalOptions {
                n_ctx: 8,
                max_chunks: Some(2),
                ..EvalOptions::default()
            },
            None,
        )
        .expect("plan");
        assert_eq!(capped.n_chunks, 2);
        assert_eq!(capped.input(1)[0], 18);
    }

    #[test]
    fn plan_rejects_short_text_saying_how_many_tokens_are_needed() {
        let toks = vec![0u32; 15];
        let err = ChunkPlan::new(
            &toks,
            &EvalOptions {
                n_ctx: 8,
                max_chunks: None,
                ..EvalOptions::default()
            },
            None,
        )
        .expect_err("too short");
        let msg = err.to_string();
        assert!(
            msg.contains("15 tokens") && msg.contains("at least 16"),
            "{msg}"
        );
        assert!(ChunkPlan::new(
            &toks,
            &EvalOptions {
                n_ctx: 2,
                max_chunks: None,
                ..EvalOptions::default()
            },
            None
        )
        .is_err());
    }

    /// SmolLM2-135M-Instruct (Q4_1 GGUF) on the first 4 chunks of `shared/data/groups_merged.txt`,
    /// against `llama-perplexity -c 512 --chunks 4` (llama.cpp as vendored in llama-cpp-python 0.3.36)
    /// run on an F32 copy of the same file made by `llama-quantize --allow-requantize .. F32`. The copy
    /// holds exactly the dequantised Q4_1 weights, so it is the same function our forward pass computes
    /// (llama.cpp's own Q4_1 run differs by ~0.6 % because it rounds activations to 8 bits).
    #[test]
    #[ignore = "needs SmolLM2-135M (../shared/scripts/fetch-smollm2.sh) and ~1 min"]
    fn smollm2_matches_llama_perplexity() {
        use crate::infer::Model;
        use crate::model::SourceModel;
        let path = crate::testing::smollm2_gguf();
        let src = SourceModel::open(&path).expect("open");
        let model = Model::load(&src).expect("load");
        let text_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/groups_merged.txt");
        let text =
            std::fs::read_to_string(&text_path).expect("groups_merged.txt beside the repository");
        let opts = EvalOptions {
            n_ctx: 512,
            max_chunks: Some(4),
            ..EvalOptions::default()
        };
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();

        // `[1]16.8284,[2]13.8479,[3]13.0852,[4]16.4798` and `Final estimate: PPL = 16.4798 +/- 1.58847`.
        let r = perplexity(&model, &src.tokenizer, &text, &opts, &mut |_| true).expect("ppl");
        for (ours, theirs) in r.chunk_ppl.iter().zip([16.8284, 13.8479, 13.0852, 16.4798]) {
            assert!(rel(*ours, theirs) < 2e-4, "{:?}", r.chunk_ppl);
        }
        assert!(rel(r.ppl_err, 1.58847) < 1e-3, "{}", r.ppl_err);

        // `--kl-divergence` of the file from itself: only the 16-bit compression of the base shows.
        let k = kl_divergence(&model, &model, &src.tokenizer, &text, &opts, &mut |_| true)
            .expect("kld");
        let s = &k.stats;
        assert_eq!(s.count, 4 * 255);
        assert!(rel(s.ppl.value, 16.479761) < 2e-4, "{:?}", s.ppl);
        assert!(rel(s.ppl.unc, 1.588473) < 1e-3, "{:?}", s.ppl);
        assert!(rel(s.ppl_base.value, 16.422880) < 2e-4, "{:?}", s.ppl_base);
        assert!(
            (s.ln_ppl_ratio.value - 0.003458).abs() < 2e-5,
            "{:?}",
            s.ln_ppl_ratio
        );
        assert!(
            (s.ln_ppl_ratio.unc - 0.003031).abs() < 2e-5,
            "{:?}",
            s.ln_ppl_ratio
        );
        assert!(
            s.kld.mean.value.abs() < 1e-6 && s.kld.max < 1e-4,
            "{:?}",
            s.kld
        );
        assert_eq!(s.same_top.value, 1.0);
        // Full precision: the base is the variant, so no divergence and no clipping of PPL(base).
        let f = &k.full_precision;
        assert!(
            f.kld.mean.value.abs() < 1e-9 && f.kld.max.abs() < 1e-6,
            "{:?}",
            f.kld
        );
        assert!(rel(f.ppl_base.value, r.ppl) < 1e-5);
    }
}
