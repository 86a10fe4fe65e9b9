//! KL-divergence of a variant (a quantized model) from its base, as `llama-perplexity
//! --kl-divergence` computes it — but with both models run chunk by chunk side by side, so no logits
//! file is needed.
//!
//! **Base log-probabilities.** llama.cpp stores the base model's log-probabilities in its logits file
//! compressed to 16 bits per token (the top 16 nats below the largest logit, in 65535 steps), and its
//! KLD, Δp, same-top and PPL(base) numbers are computed from that compressed copy. The compression moves
//! mean KLD in about the 4th significant digit. We compute both at once (it costs one extra pass over
//! the vocabulary per scored token, small next to two forward passes): [`KldReport::stats`] mimics
//! llama.cpp exactly ([`BaseLogProbs::Quantized16`]), so our numbers compare with published ones, and
//! [`KldReport::full_precision`] uses the `f32` log-probabilities ([`BaseLogProbs::Full`]), with the same
//! −16 cut-off so that the two differ only by the compression.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::stats::{token_kld_both, BaseLogProbs, KldChunkLine, KldStats, KldSums, TokenKld};
#[cfg(test)]
use super::ChunkForward;
use super::{check_logits, check_target, chunk_bos, tokenize_text, ChunkClock, ChunkPlan};
use super::{ChunkProgress, EvalOptions};
use crate::infer::{Logits, Model};
use crate::model::TextTokenizer;
use crate::{Error, Result};

/// The result of a KL-divergence run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KldReport {
    pub n_ctx: usize,
    pub n_chunks: usize,
    /// Tokens in the whole text (with BOS).
    pub n_text_tokens: usize,
    /// How [`stats`](Self::stats) treats the base log-probabilities (always
    /// [`BaseLogProbs::Quantized16`], as llama.cpp).
    pub base_log_probs: BaseLogProbs,
    /// llama-perplexity's statistics, base log-probabilities compressed to 16 bits as in its file.
    pub stats: KldStats,
    /// The same statistics from full-precision base log-probabilities.
    pub full_precision: KldStats,
    /// The running per-chunk columns (llama.cpp's numbers, 16-bit base).
    pub chunk_lines: Vec<KldChunkLine>,
    pub elapsed_secs: f64,
    /// Chunk tokens (each through both models) per second.
    pub tokens_per_sec: f64,
}

/// KL-divergence of `variant` from `base` on `text`, tokenized with `tok` (both models must share the
/// vocabulary). `on_chunk` is called after each chunk; returning `false` cancels with
/// [`Error::Cancelled`].
pub fn kl_divergence(
    base: &Model,
    variant: &Model,
    tok: &TextTokenizer,
    text: &str,
    opts: &EvalOptions,
    on_chunk: &mut dyn FnMut(&ChunkProgress) -> bool,
) -> Result<KldReport> {
    let vocab = base.config().vocab_size;
    let vocab_variant = variant.config().vocab_size;
    if vocab != vocab_variant {
        return Err(Error::Invalid(format!(
            "the models have different vocabularies ({vocab} and {vocab_variant} tokens): KL-divergence \
             needs a variant of the same base model"
        )));
    }
    let tokens = tokenize_text(tok, text)?;
    let mut cache_base = base.new_cache(opts.n_ctx);
    let mut cache_variant = variant.new_cache(opts.n_ctx);
    let mut score = |chunk: &[u32], first: usize, targets: &[u32]| -> Result<Vec<TokenPair>> {
        if base.forwards_on_device() && variant.forwards_on_device() {
            // Both models on the device; the base's logits stay there and only eight numbers per
            // scored row come back.
            // (The chunk's last token has no target: its logits are not needed.)
            cache_base.clear();
            cache_variant.clear();
            let used = &chunk[..(first + targets.len()).min(chunk.len())];
            let rows = base
                .logits_on_device(used, &mut cache_base, first)
                .and_then(|b| {
                    variant.score_on_device(used, &mut cache_variant, first, targets, Some(&b))
                });
            match rows {
                Ok(rows) => return Ok(rows.iter().map(token_pair_of_scores).collect()),
                Err(e @ Error::Gpu(_)) => crate::backend::gpu_failed(&e),
                Err(e) => return Err(e),
            }
        }
        cache_base.clear();
        let base_logits = base.forward(chunk, &mut cache_base, Logits::From(first))?;
        cache_variant.clear();
        let logits = variant.forward(chunk, &mut cache_variant, Logits::From(first))?;
        pairs_of_logits(&base_logits, &logits, targets, vocab)
    };
    kld_scored(&tokens, chunk_bos(tok), vocab, opts, &mut score, on_chunk)
}

/// A scored token's contributions under both treatments of the base (16-bit, full).
type TokenPair = (TokenKld, TokenKld);

/// `logits.wgsl`'s `kld` row as the host's [`token_kld_both`] would have made it.
fn token_pair_of_scores(r: &[f32; 8]) -> TokenPair {
    let make = |kld: f32, nll_base: f32, top_base: f32| TokenKld {
        nll: r[0],
        nll_base,
        kld: f64::from(kld),
        same_top: r[1] == top_base,
        p_diff: (-r[0]).exp() - (-nll_base).exp(),
    };
    (make(r[2], r[3], r[4]), make(r[5], r[6], r[7]))
}

/// Each scored row's contributions from the two models' logits rows.
fn pairs_of_logits(
    base_logits: &[f32],
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
) -> Result<Vec<TokenPair>> {
    check_logits(base_logits, targets.len(), vocab)?;
    check_logits(logits, targets.len(), vocab)?;
    Ok(targets
        .par_iter()
        .enumerate()
        .map(|(i, &t)| {
            let rows = i * vocab..(i + 1) * vocab;
            token_kld_both(&base_logits[rows.clone()], &logits[rows], t as usize)
        })
        .collect())
}

/// The driver, over two "forward one chunk, logits from position `first` on" functions.
#[cfg(test)]
pub(crate) fn kld_tokens(
    tokens: &[u32],
    bos: Option<u32>,
    vocab: usize,
    opts: &EvalOptions,
    forward_base: &mut ChunkForward<'_>,
    forward_variant: &mut ChunkForward<'_>,
    on_chunk: &mut dyn FnMut(&ChunkProgress) -> bool,
) -> Result<KldReport> {
    kld_scored(
        tokens,
        bos,
        vocab,
        opts,
        &mut |input, first, targets| {
            let base_logits = forward_base(input, first)?;
            let logits = forward_variant(input, first)?;
            pairs_of_logits(&base_logits, &logits, targets, vocab)
        },
        on_chunk,
    )
}

/// "Score one chunk": each scored row's contributions, given the rows' targets.
type ChunkKld<'a> = dyn FnMut(&[u32], usize, &[u32]) -> Result<Vec<TokenPair>> + 'a;

/// The driver, over a chunk-scoring function.
fn kld_scored(
    tokens: &[u32],
    bos: Option<u32>,
    vocab: usize,
    opts: &EvalOptions,
    score: &mut ChunkKld<'_>,
    on_chunk: &mut dyn FnMut(&ChunkProgress) -> bool,
) -> Result<KldReport> {
    let plan = ChunkPlan::new(tokens, opts, bos)?;
    let first = plan.first();
    let n_scored = plan.scored_per_chunk();
    let clock = ChunkClock::start();
    let mut q16 = KldSums::default();
    let mut full = KldSums::default();
    let mut chunk_lines = Vec::with_capacity(plan.n_chunks);
    for k in 0..plan.n_chunks {
        let input = plan.input(k);
        let targets = (0..n_scored)
            .map(|i| check_target(plan.target(k, i), vocab).map(|t| t as u32))
            .collect::<Result<Vec<_>>>()?;
        let per_token = score(&input, first, &targets)?;
        if per_token.len() != n_scored {
            return Err(Error::Invalid(format!(
                "scored {} rows of a chunk, expected {n_scored}",
                per_token.len()
            )));
        }
        for (a, b) in &per_token {
            q16.add(a);
            full.add(b);
        }
        let line = q16.chunk_line();
        chunk_lines.push(line);
        if !on_chunk(&clock.progress(&plan, k, line.ppl.value, Some(line))) {
            return Err(Error::Cancelled);
        }
    }
    let elapsed_secs = clock.elapsed_secs();
    Ok(KldReport {
        n_ctx: plan.n_ctx,
        n_chunks: plan.n_chunks,
        n_text_tokens: tokens.len(),
        base_log_probs: BaseLogProbs::Quantized16,
        stats: q16.stats(),
        full_precision: full.stats(),
        chunk_lines,
        elapsed_secs,
        tokens_per_sec: if elapsed_secs > 0.0 {
            (plan.n_chunks * plan.n_ctx) as f64 / elapsed_secs
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::perplexity::perplexity_tokens;
    use super::super::perplexity::tests::{fake_forward, fake_forward_rows};
    use super::*;

    #[test]
    fn a_model_against_itself_has_zero_divergence() {
        let vocab = 30;
        let tokens: Vec<u32> = (0..64).map(|i| (i * 7 + 3) % 30).collect();
        let opts = EvalOptions {
            n_ctx: 16,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        let r = {
            let mut a = fake_forward(vocab, 2.0, &mut fa);
            let mut b = fake_forward(vocab, 2.0, &mut fb);
            kld_tokens(&tokens, Some(0), vocab, &opts, &mut a, &mut b, &mut |_| {
                true
            })
            .expect("kld")
        };
        assert_eq!(fa, fb);
        assert_eq!(r.stats.count, 4 * 7);
        assert!(r.full_precision.kld.mean.value.abs() < 1e-7);
        assert!(r.stats.kld.mean.value.abs() < 1e-4);
        assert_eq!(r.full_precision.same_top.value, 1.0);
        assert!((r.full_precision.ppl.value - r.full_precision.ppl_base.value).abs() < 1e-5);
    }

    #[test]
    fn matches_hand_computed_kl_and_the_perplexity_driver() {
        // Base: boost 2 on the predicted token; variant: boost 1. Per position over vocab V with
        // the same argmax, KL(p‖q) = Σ p_i (ln p_i − ln q_i) has a closed form.
        let vocab = 10usize;
        let tokens: Vec<u32> = (0..40).map(|i| i % 10).collect();
        let opts = EvalOptions {
            n_ctx: 8,
            max_chunks: Some(3),
            ..EvalOptions::default()
        };
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        let mut seen = Vec::new();
        let r = {
            let mut a = fake_forward(vocab, 2.0, &mut fa);
            let mut b = fake_forward(vocab, 1.0, &mut fb);
            kld_tokens(&tokens, None, vocab, &opts, &mut a, &mut b, &mut |p| {
                seen.push(*p);
                true
            })
            .expect("kld")
        };
        let v = vocab as f64;
        let (zp, zq) = (2f64.exp() + v - 1.0, 1f64.exp() + v - 1.0);
        let (p_top, q_top) = (2f64.exp() / zp, 1f64.exp() / zq);
        let (p_o, q_o) = (1.0 / zp, 1.0 / zq);
        let kl = p_top * (p_top / q_top).ln() + (v - 1.0) * p_o * (p_o / q_o).ln();
        assert!((r.full_precision.kld.mean.value - kl).abs() < 1e-6);
        assert!((r.stats.kld.mean.value - kl).abs() < 1e-4);
        // The targets are the boosted tokens: Δp = q_top − p_top on every token.
        assert!((r.full_precision.p_diff.mean.value - (q_top - p_top)).abs() < 1e-6);
        assert_eq!(r.full_precision.same_top.value, 1.0);
        // PPL(Q) is the variant's perplexity (in f32 nll, so to ~1e-6).
        let mut fd = Vec::new();
        let ppl_q = {
            let mut b = fake_forward_rows(vocab, 1.0, &mut fd);
            perplexity_tokens(&tokens, None, vocab, &opts, &mut b, &mut |_| true).expect("ppl")
        };
        assert!((r.stats.ppl.value - ppl_q.ppl).abs() < 1e-5 * ppl_q.ppl);
        assert!((r.full_precision.ppl_base.value - 1.0 / p_top).abs() < 1e-5);
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|p| p.kld.is_some()));
        assert_eq!(r.chunk_lines.len(), 3);
    }

    #[test]
    fn fixture_models_against_each_other() {
        use super::super::perplexity::perplexity;
        use super::super::perplexity::tests::{fixture_model, TEXT};
        let (base, tok) = fixture_model(1);
        let (other, _) = fixture_model(2);
        let text = TEXT.repeat(3);
        let opts = EvalOptions {
            n_ctx: 32,
            max_chunks: Some(4),
            ..EvalOptions::default()
        };
        let same = kl_divergence(&base, &base, &tok, &text, &opts, &mut |_| true).expect("kld");
        assert!(same.full_precision.kld.mean.value.abs() < 1e-6);
        assert_eq!(same.full_precision.same_top.value, 1.0);
        let r = kl_divergence(&base, &other, &tok, &text, &opts, &mut |_| true).expect("kld");
        let st = &r.stats;
        assert_eq!(st.count, 60);
        assert!(st.kld.mean.value > 0.0 && st.kld.mean.unc > 0.0);
        assert!(st.kld.min >= -1e-6 && st.kld.min <= st.kld.median && st.kld.median <= st.kld.max);
        // The 16-bit base moves KLD only a little.
        let rel = (st.kld.mean.value - r.full_precision.kld.mean.value).abs() / st.kld.mean.value;
        assert!(rel < 1e-2, "{rel}");
        // PPL(Q) and PPL(base) are the two models' perplexities (f32 nll here, f64 there).
        let pq = perplexity(&other, &tok, &text, &opts, &mut |_| true).expect("ppl");
        let pb = perplexity(&base, &tok, &text, &opts, &mut |_| true).expect("ppl");
        assert!((st.ppl.value - pq.ppl).abs() < 1e-4 * pq.ppl);
        assert!((r.full_precision.ppl_base.value - pb.ppl).abs() < 1e-4 * pb.ppl);
        assert!((st.ppl_base.value - pb.ppl).abs() < 1e-3 * pb.ppl);
        let json = serde_json::to_string(&r).expect("json");
        assert!(json.contains("full_precision"));
    }

    #[test]
    fn cancel_stops_after_the_chunk() {
        let tokens = vec![1u32; 64];
        let opts = EvalOptions {
            n_ctx: 8,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        let mut a = fake_forward(4, 1.0, &mut fa);
        let mut b = fake_forward(4, 1.0, &mut fb);
        let r = kld_tokens(&tokens, None, 4, &opts, &mut a, &mut b, &mut |_| false);
        assert!(matches!(r, Err(Error::Cancelled)));
    }
}
