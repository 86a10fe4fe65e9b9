//! Perplexity of a model on a text, as `llama-perplexity -f FILE -c N_CTX [--chunks N]` computes it.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::stats::{NllSums, RowSoftmax};
use super::{check_logits, check_target, chunk_bos, tokenize_text, ChunkClock, ChunkPlan};
use super::{ChunkForwardRows, ChunkProgress, EvalOptions, LOGIT_ROWS_PER_PART};
use crate::infer::{Logits, Model};
use crate::model::TextTokenizer;
use crate::{Error, Result};

/// The result of a perplexity run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    pub n_ctx: usize,
    pub n_chunks: usize,
    /// Tokens in the whole text (with BOS), of which `n_chunks · n_ctx` were used.
    pub n_text_tokens: usize,
    /// Tokens scored: `n_chunks · (n_ctx − 1 − n_ctx/2)`.
    pub n_scored: usize,
    /// Mean negative log-likelihood (nats per token).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// `ppl · sqrt(var(nll) / (n − 1))` ("Final estimate: PPL = X +/- Y"); NaN if it cannot be estimated.
    pub ppl_err: f64,
    /// The running PPL printed after each chunk (`[1]x,[2]y,…`).
    pub chunk_ppl: Vec<f64>,
    pub elapsed_secs: f64,
    /// Chunk tokens evaluated per second.
    pub tokens_per_sec: f64,
}

/// Perplexity of `model` on `text`. `on_chunk` is called after each chunk; returning `false` cancels
/// the run with [`Error::Cancelled`].
pub fn perplexity(
    model: &Model,
    tok: &TextTokenizer,
    text: &str,
    opts: &EvalOptions,
    on_chunk: &mut dyn FnMut(&ChunkProgress) -> bool,
) -> Result<PerplexityReport> {
    let tokens = tokenize_text(tok, text)?;
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache(opts.n_ctx);
    let mut score = |chunk: &[u32], first: usize, targets: &[u32]| -> Result<Vec<f64>> {
        if model.forwards_on_device() {
            // The whole chunk on the device, only −log p(target) per row read back.
            // (The chunk's last token has no target: its logits are not needed.)
            cache.clear();
            let used = &chunk[..(first + targets.len()).min(chunk.len())];
            match model.score_on_device(used, &mut cache, first, targets, None) {
                Ok(rows) => return Ok(rows.iter().map(|r| f64::from(r[0])).collect()),
                Err(e @ Error::Gpu(_)) => crate::backend::gpu_failed(&e),
                Err(e) => return Err(e),
            }
        }
        let mut forward =
            |chunk: &[u32], first: usize, rows: std::ops::Range<usize>| -> Result<Vec<f32>> {
                if rows.start == 0 {
                    cache.clear();
                    model.forward(&chunk[..first], &mut cache, Logits::None)?;
                }
                model.forward(
                    &chunk[first + rows.start..first + rows.end],
                    &mut cache,
                    Logits::All,
                )
            };
        nll_of_rows(chunk, first, targets, vocab, &mut forward)
    };
    perplexity_scored(&tokens, chunk_bos(tok), vocab, opts, &mut score, on_chunk)
}

/// −log p(target) of each scored row of a chunk from a logits function, asking for
/// [`LOGIT_ROWS_PER_PART`] rows at a time.
fn nll_of_rows(
    input: &[u32],
    first: usize,
    targets: &[u32],
    vocab: usize,
    forward: &mut ChunkForwardRows<'_>,
) -> Result<Vec<f64>> {
    let mut nlls: Vec<f64> = Vec::with_capacity(targets.len());
    for lo in (0..targets.len()).step_by(LOGIT_ROWS_PER_PART) {
        let hi = (lo + LOGIT_ROWS_PER_PART).min(targets.len());
        let logits = forward(input, first, lo..hi)?;
        check_logits(&logits, hi - lo, vocab)?;
        nlls.par_extend(targets[lo..hi].par_iter().enumerate().map(|(i, &t)| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            RowSoftmax::of(row).nll(row, t as usize)
        }));
    }
    Ok(nlls)
}

/// The driver, over any "forward one chunk, logits from position `first` on" function.
#[cfg(test)]
pub(crate) fn perplexity_tokens(
    tokens: &[u32],
    bos: Option<u32>,
    vocab: usize,
    opts: &EvalOptions,
    forward: &mut ChunkForwardRows<'_>,
    on_chunk: &mut dyn FnMut(&ChunkProgress) -> bool,
) -> Result<PerplexityReport> {
    perplexity_scored(
        tokens,
        bos,
        vocab,
        opts,
        &mut |input, first, targets| nll_of_rows(input, first, targets, vocab, forward),
        on_chunk,
    )
}

/// "Score one chunk": −log p(target) of the rows from position `first` on, given their targets.
type ChunkScore<'a> = dyn FnMut(&[u32], usize, &[u32]) -> Result<Vec<f64>> + 'a;

/// The driver, over a chunk-scoring function.
fn perplexity_scored(
    tokens: &[u32],
    bos: Option<u32>,
    vocab: usize,
    opts: &EvalOptions,
    score: &mut ChunkScore<'_>,
    on_chunk: &mut dyn FnMut(&ChunkProgress) -> bool,
) -> Result<PerplexityReport> {
    let plan = ChunkPlan::new(tokens, opts, bos)?;
    let first = plan.first();
    let n_scored = plan.scored_per_chunk();
    let clock = ChunkClock::start();
    let mut sums = NllSums::default();
    let mut chunk_ppl = Vec::with_capacity(plan.n_chunks);
    for k in 0..plan.n_chunks {
        let input = plan.input(k);
        let targets = (0..n_scored)
            .map(|i| check_target(plan.target(k, i), vocab).map(|t| t as u32))
            .collect::<Result<Vec<_>>>()?;
        let nlls = score(&input, first, &targets)?;
        if nlls.len() != n_scored {
            return Err(Error::Invalid(format!(
                "scored {} rows of a chunk, expected {n_scored}",
                nlls.len()
            )));
        }
        for nll in nlls {
            sums.add(nll);
        }
        let ppl = sums.ppl();
        chunk_ppl.push(ppl);
        if !on_chunk(&clock.progress(&plan, k, ppl, None)) {
            return Err(Error::Cancelled);
        }
    }
    let (ppl, ppl_err) = sums.final_estimate();
    let elapsed_secs = clock.elapsed_secs();
    Ok(PerplexityReport {
        n_ctx: plan.n_ctx,
        n_chunks: plan.n_chunks,
        n_text_tokens: tokens.len(),
        n_scored: sums.count,
        mean_nll: sums.nll / sums.count as f64,
        ppl,
        ppl_err,
        chunk_ppl,
        elapsed_secs,
        tokens_per_sec: if elapsed_secs > 0.0 {
            (plan.n_chunks * plan.n_ctx) as f64 / elapsed_secs
        } else {
            0.0
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake model: at every position it gives the *next token id modulo vocab* logit `boost`, others 0,
    /// and records what it was fed.
    pub(crate) fn fake_forward(
        vocab: usize,
        boost: f32,
        fed: &mut Vec<Vec<u32>>,
    ) -> impl FnMut(&[u32], usize) -> Result<Vec<f32>> + '_ {
        move |chunk: &[u32], first: usize| {
            fed.push(chunk.to_vec());
            let mut out = vec![0.0f32; (chunk.len() - first) * vocab];
            for (r, &t) in chunk[first..].iter().enumerate() {
                // predicts t + 1
                out[r * vocab + (t as usize + 1) % vocab] = boost;
            }
            Ok(out)
        }
    }

    /// [`fake_forward`] asked for slices of rows, as perplexity asks.
    pub(crate) fn fake_forward_rows(
        vocab: usize,
        boost: f32,
        fed: &mut Vec<Vec<u32>>,
    ) -> impl FnMut(&[u32], usize, std::ops::Range<usize>) -> Result<Vec<f32>> + '_ {
        move |chunk: &[u32], first: usize, rows: std::ops::Range<usize>| {
            if rows.start == 0 {
                fed.push(chunk.to_vec());
            }
            let mut out = vec![0.0f32; rows.len() * vocab];
            for (r, &t) in chunk[first + rows.start..first + rows.end]
                .iter()
                .enumerate()
            {
                out[r * vocab + (t as usize + 1) % vocab] = boost;
            }
            Ok(out)
        }
    }

    #[test]
    fn uniform_logits_give_ppl_equal_to_vocab() {
        let tokens: Vec<u32> = (0..40).map(|i| i % 7).collect();
        let opts = EvalOptions {
            n_ctx: 10,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let mut fwd =
            |_: &[u32], _: usize, rows: std::ops::Range<usize>| Ok(vec![0.25f32; rows.len() * 7]);
        let mut seen = Vec::new();
        let r = perplexity_tokens(&tokens, None, 7, &opts, &mut fwd, &mut |p| {
            seen.push(*p);
            true
        })
        .expect("ppl");
        assert_eq!(r.n_chunks, 4);
        assert_eq!(r.n_scored, 4 * 4); // 10 − 1 − 5 per chunk
        assert!((r.ppl - 7.0).abs() < 1e-5, "{}", r.ppl);
        // constant nll → zero variance (up to rounding)
        assert!(r.ppl_err.is_nan() || r.ppl_err < 1e-6, "{}", r.ppl_err);
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3].chunk, 3);
        assert_eq!(seen[3].n_chunks, 4);
        assert_eq!(seen[3].eta_secs, 0.0);
    }

    #[test]
    fn scores_the_second_half_against_the_original_tokens() {
        // Text 0,1,2,…: the fake predicts t+1 with a boost, so every scored target is the boosted one
        // except where BOS substitution would matter (it never is a target).
        let vocab = 50;
        let tokens: Vec<u32> = (0..24).collect();
        let opts = EvalOptions {
            n_ctx: 8,
            max_chunks: Some(2),
            ..EvalOptions::default()
        };
        let mut fed = Vec::new();
        let boost = 3.0f32;
        let r = {
            let mut fwd = fake_forward_rows(vocab, boost, &mut fed);
            perplexity_tokens(&tokens, Some(49), vocab, &opts, &mut fwd, &mut |_| true)
                .expect("ppl")
        };
        assert_eq!(
            fed,
            vec![
                vec![49, 1, 2, 3, 4, 5, 6, 7],
                vec![49, 9, 10, 11, 12, 13, 14, 15]
            ]
        );
        // p(target) = e^3 / (e^3 + 49)
        let nll = -(f64::from(boost) - (f64::from(boost).exp() + 49.0).ln());
        assert!((r.mean_nll - nll).abs() < 1e-6);
        assert_eq!(r.n_scored, 6);
        assert_eq!(r.chunk_ppl.len(), 2);
    }

    #[test]
    fn error_matches_the_final_estimate_formula() {
        // Two chunks of n_ctx 4 → 1 scored token each, targets tokens[3] and tokens[7].
        // Logits over vocab 2 are [0, 0] for chunk 0 (nll ln 2) and [0, ln 3] with target 1 for chunk 1.
        let tokens = vec![0u32, 0, 0, 0, 0, 0, 0, 1];
        let opts = EvalOptions {
            n_ctx: 4,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let mut calls = 0;
        let mut fwd = |_: &[u32], _: usize, rows: std::ops::Range<usize>| {
            assert_eq!(rows, 0..1, "one scored row per chunk of 4");
            calls += 1;
            Ok(if calls == 1 {
                vec![0.0, 0.0]
            } else {
                vec![0.0, 3f32.ln()]
            })
        };
        let r = perplexity_tokens(&tokens, None, 2, &opts, &mut fwd, &mut |_| true).expect("ppl");
        let (a, b) = (2f64.ln(), (4.0f64 / 3.0).ln());
        let mean = (a + b) / 2.0;
        let var = (a * a + b * b) / 2.0 - mean * mean;
        assert!((r.ppl - mean.exp()).abs() < 1e-6);
        assert!((r.ppl_err - mean.exp() * var.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn returning_false_cancels() {
        let tokens = vec![0u32; 40];
        let opts = EvalOptions {
            n_ctx: 8,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let mut fwd =
            |_: &[u32], _: usize, rows: std::ops::Range<usize>| Ok(vec![0.0f32; rows.len() * 3]);
        let mut n = 0;
        let r = perplexity_tokens(&tokens, None, 3, &opts, &mut fwd, &mut |_| {
            n += 1;
            n < 2
        });
        assert!(matches!(r, Err(Error::Cancelled)));
        assert_eq!(n, 2);
    }

    /// The tiny fixture Llama as a runnable model and its tokenizer (BOS added, as llama.cpp would for a
    /// model whose vocabulary says `add_bos`).
    pub(crate) fn fixture_model(seed: u64) -> (Model, TextTokenizer) {
        use crate::model::fixture::{
            fixture_tensor_refs, fixture_tokenizer, FixtureSpec, IM_END_ID, IM_START_ID,
        };
        let mut spec = FixtureSpec::tiny_llama();
        spec.seed = seed;
        let tensors = fixture_tensor_refs(&spec).expect("tensors");
        let model = Model::from_parts(std::path::Path::new("fixture"), &spec.config(), &tensors)
            .expect("model");
        let tok = TextTokenizer {
            inner: fixture_tokenizer().expect("tokenizer"),
            bos_token_id: Some(IM_START_ID),
            eos_token_ids: vec![IM_END_ID],
            add_bos: true,
            chat_template: None,
            chat_template_origin: None,
            bos_token: None,
            eos_token: None,
        };
        (model, tok)
    }

    pub(crate) const TEXT: &str = "The keeper counted the boats in the harbour every evening, and \
        wrote the number in a small book. Some nights the wind came from the sea and the boats knocked \
        together like wooden bells; other nights the water lay still and the lamps on the pier shone in \
        it. The children of the village asked him why he counted, and he said that a harbour is a promise, \
        and a promise should be kept in numbers.\n";

    #[test]
    fn fixture_model_matches_a_naive_computation() {
        let (model, tok) = fixture_model(1);
        let text = TEXT.repeat(3);
        let opts = EvalOptions {
            n_ctx: 32,
            max_chunks: Some(4),
            ..EvalOptions::default()
        };
        let r = perplexity(&model, &tok, &text, &opts, &mut |_| true).expect("ppl");
        assert_eq!(r.n_chunks, 4);
        assert_eq!(r.n_scored, 4 * 15);
        // Naive: all logits, log-softmax in f64, BOS over each chunk's first token.
        let ids = tok
            .encode(text.strip_suffix('\n').expect("newline"), true)
            .expect("ids");
        assert_eq!(ids[0], 1);
        let vocab = model.config().vocab_size;
        let (mut sum, mut n) = (0.0f64, 0usize);
        for k in 0..4 {
            let mut chunk = ids[k * 32..(k + 1) * 32].to_vec();
            chunk[0] = 1;
            let mut cache = model.new_cache(32);
            let all = model
                .forward(&chunk, &mut cache, Logits::All)
                .expect("forward");
            for pos in 16..31 {
                let row: Vec<f64> = all[pos * vocab..(pos + 1) * vocab]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                sum += lse - row[ids[k * 32 + pos + 1] as usize];
                n += 1;
            }
        }
        let naive = (sum / n as f64).exp();
        assert!((r.ppl - naive).abs() < 1e-5 * naive, "{} vs {naive}", r.ppl);
        assert!(r.ppl.is_finite() && r.ppl_err.is_finite() && r.ppl_err > 0.0);
        // The number of chunks is ⌊tokens / n_ctx⌋ without a cap.
        let all = perplexity(
            &model,
            &tok,
            &text,
            &EvalOptions {
                n_ctx: 32,
                max_chunks: None,
                ..EvalOptions::default()
            },
            &mut |_| true,
        )
        .expect("ppl");
        assert_eq!(all.n_chunks, ids.len() / 32);
    }

    #[test]
    fn rejects_token_ids_outside_the_vocabulary() {
        let tokens = vec![9u32; 16];
        let opts = EvalOptions {
            n_ctx: 8,
            max_chunks: None,
            ..EvalOptions::default()
        };
        let mut fwd =
            |_: &[u32], _: usize, rows: std::ops::Range<usize>| Ok(vec![0.0f32; rows.len() * 4]);
        let err = perplexity_tokens(&tokens, None, 4, &opts, &mut fwd, &mut |_| true)
            .expect_err("bad id");
        assert!(err.to_string().contains("outside"), "{err}");
    }
}
