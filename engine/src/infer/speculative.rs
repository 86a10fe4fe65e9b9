//! Speculative decoding: a draft model that shares the model's tokenizer (a smaller model, or a low-bit
//! quant of the same one) proposes up to `k` tokens one at a time (stopping after one it is unsure of);
//! the model checks all of them in one pass ([`Model::forward_as_steps`] over the pending token and the
//! proposals), keeps the longest prefix it agrees with and adds one token of its own. Both caches are
//! then cut back to the tokens kept.
//!
//! * Greedy: a proposal is kept when it is the token the model picks. The verification pass computes
//!   every row with one-token arithmetic, so the output and the cache at the end are those of decoding
//!   without a draft, token for token, bit for bit.
//! * Sampling: speculative sampling (Leviathan et al. 2023, Chen et al. 2023). With `p` and `q` the
//!   distributions the model's and the draft's samplers draw from (after repetition penalty, temperature,
//!   top-k, top-p, min-p), a proposal `x ~ q` is kept with probability `min(1, p(x)/q(x))`; otherwise the
//!   token is drawn from `normalize(max(0, p − q))`. Every token kept is distributed as `p`.
//!
//! The streaming, stop strings, end-of-sequence, cancellation and full-context rules are
//! `generate.rs`'s, shared through its `Output`.

use super::kv_cache::KvCache;
use super::model::{Logits, Model};
use super::sampling::{Sampler, SamplerConfig};
use super::stream::{Output, StopReason};
use crate::model::TextTokenizer;
use crate::{Error, Result};

/// Tokens a draft proposes per step unless told otherwise (with [`DEFAULT_DRAFT_P_MIN`] a step usually ends
/// earlier, at a token the draft is unsure of).
pub const DEFAULT_DRAFT_TOKENS: usize = 8;
/// Most tokens a draft may propose per step.
pub const MAX_DRAFT_TOKENS: usize = 16;

/// The draft's confidence below which it stops proposing, unless told otherwise (see
/// [`GenerateOptions::draft_p_min`](super::GenerateOptions::draft_p_min)).
/// SmolLM2 F16 and Q8_0 with a Q4_0 draft (README): 8 tokens with 0.8 gave 1.06× and 0.95× where 4 tokens
/// without a minimum gave 0.84× and 0.61×.
pub const DEFAULT_DRAFT_P_MIN: f32 = 0.8;

/// Mixed into the seed of the draft's sampler, so the draft and the model draw different streams.
const DRAFT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// `k` within `1..=MAX_DRAFT_TOKENS`, with a message that gives the range.
pub fn validate_draft_tokens(k: usize) -> Result<()> {
    if (1..=MAX_DRAFT_TOKENS).contains(&k) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "draft tokens {k}: use 1..={MAX_DRAFT_TOKENS} (default {DEFAULT_DRAFT_TOKENS})"
        )))
    }
}

/// `p` within `0..=1`, with a message that gives the range.
pub fn validate_draft_p_min(p: f32) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "draft minimum probability {p}: use 0..=1 (0 always proposes the full number of draft tokens)"
        )))
    }
}

/// The softmax probability of token `id` under `logits` (temperature 1, nothing filtered); `buf` is
/// scratch space.
fn softmax_prob(logits: &[f32], id: u32, buf: &mut Vec<f32>) -> f32 {
    buf.clear();
    buf.extend_from_slice(logits);
    super::model::softmax(buf);
    buf.get(id as usize).copied().unwrap_or(0.0)
}

/// Whether `draft` (with its tokenizer) can draft for `model`: the same vocabulary size in both models
/// and both tokenizers, the same BOS and end-of-sequence ids, the same token at every id.
pub fn check_draft(
    model: &Model,
    tok: &TextTokenizer,
    draft: &Model,
    draft_tok: &TextTokenizer,
) -> Result<()> {
    let bad = |what: String| {
        Err(Error::Invalid(format!(
            "the draft model does not share the model's tokenizer: {what}; use a draft made from the same \
             model family (a smaller model or a low-bit quant of this one)"
        )))
    };
    if model.vocab_size() != draft.vocab_size() {
        return bad(format!(
            "its logits cover {} tokens, the model's {}",
            draft.vocab_size(),
            model.vocab_size()
        ));
    }
    if tok.vocab_size() != draft_tok.vocab_size() {
        return bad(format!(
            "its tokenizer has {} tokens, the model's {}",
            draft_tok.vocab_size(),
            tok.vocab_size()
        ));
    }
    let sorted = |ids: &[u32]| {
        let mut v = ids.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    if sorted(&tok.eos_token_ids) != sorted(&draft_tok.eos_token_ids) {
        return bad(format!(
            "its end-of-sequence ids are {:?}, the model's {:?}",
            draft_tok.eos_token_ids, tok.eos_token_ids
        ));
    }
    if tok.bos_token_id != draft_tok.bos_token_id {
        return bad(format!(
            "its BOS id is {:?}, the model's {:?}",
            draft_tok.bos_token_id, tok.bos_token_id
        ));
    }
    for id in 0..tok.vocab_size() as u32 {
        let (a, b) = (tok.inner.id_to_token(id), draft_tok.inner.id_to_token(id));
        if a != b {
            return bad(format!("token {id} is {b:?} there, {a:?} in the model"));
        }
    }
    Ok(())
}

/// A draft model and its own KV cache (kept between the turns of a chat).
#[derive(Clone)]
pub struct Draft {
    model: Model,
    cache: Option<KvCache>,
}

impl std::fmt::Debug for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draft")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Draft {
    /// `draft` as the draft of `model`, after [`check_draft`].
    pub fn new(
        model: &Model,
        tok: &TextTokenizer,
        draft: Model,
        draft_tok: &TextTokenizer,
    ) -> Result<Self> {
        check_draft(model, tok, &draft, draft_tok)?;
        Ok(Self {
            model: draft,
            cache: None,
        })
    }

    /// The draft model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The draft's cache, once it has run.
    pub fn cache(&self) -> Option<&KvCache> {
        self.cache.as_ref()
    }

    /// Forget the cached positions.
    pub fn clear(&mut self) {
        if let Some(c) = &mut self.cache {
            c.clear();
        }
    }

    /// Run the prompt but its last token (what the first proposal runs), so the draft's prompt is
    /// timed with the model's.
    pub(crate) fn prefill(&mut self, prompt: &[u32], capacity: usize) -> Result<()> {
        let cache = cache_for(&self.model, &mut self.cache, capacity, prompt);
        let end = prompt.len().saturating_sub(1);
        if cache.len() < end {
            self.model
                .forward(&prompt[cache.len()..end], cache, Logits::None)?;
        }
        Ok(())
    }

    /// Propose up to `k` tokens after `history`, each drawn by `sampler` (greedy: its pick); with sampling,
    /// also the distribution each was drawn from. Stops after the first token the draft gives less than
    /// probability `p_min` (greedy: its softmax; sampling: the distribution it was drawn from) — a choice
    /// made on the draft's numbers alone, so sampling keeps the model's distribution.
    fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        p_min: f32,
        capacity: usize,
        sampler: &mut Sampler,
    ) -> Result<Proposal> {
        let mut p = Proposal::default();
        if k == 0 || history.is_empty() {
            return Ok(p);
        }
        let greedy = sampler.config().is_greedy();
        let model = &self.model;
        let cache = cache_for(model, &mut self.cache, capacity, history);
        // What the draft has not run: the pending token, and the last proposal when all were kept. So
        // few tokens run as rows (one pass over the weights), not through the prompt's GEMM, whose
        // dequantised tiles cost as much for two tokens as for hundreds.
        let run = &history[cache.len()..];
        let mut logits = if run.len() <= MAX_DRAFT_TOKENS {
            let rows = model.forward_as_steps(run, cache)?;
            rows[(run.len() - 1) * model.vocab_size()..].to_vec()
        } else {
            model.forward(run, cache, Logits::Last)?
        };
        let mut hist = history.to_vec();
        let mut buf = Vec::new();
        for j in 0..k {
            let (d, sure) = if greedy {
                let d = sampler.sample(&logits, &hist);
                (
                    d,
                    p_min <= 0.0 || softmax_prob(&logits, d, &mut buf) >= p_min,
                )
            } else {
                let q = sampler.distribution(&logits, &hist);
                let d = draw(&q, sampler.uniform());
                let sure = p_min <= 0.0 || prob(&q, d) as f32 >= p_min;
                p.dists.push(q);
                (d, sure)
            };
            // An unsure token is still proposed (its step is paid for; checking one more token costs the
            // model little), but the draft guesses no further past it.
            p.tokens.push(d);
            hist.push(d);
            if !sure {
                break;
            }
            if j + 1 < k {
                logits = model.forward(&[d], cache, Logits::Last)?;
            }
        }
        Ok(p)
    }
}

/// The draft's cache in `slot`, sized like the model's (`capacity`), holding the longest prefix of
/// `history` it had, short of the last token.
fn cache_for<'c>(
    model: &Model,
    slot: &'c mut Option<KvCache>,
    capacity: usize,
    history: &[u32],
) -> &'c mut KvCache {
    if slot.as_ref().map(KvCache::capacity) != Some(capacity) {
        *slot = None;
    }
    let cache = slot.get_or_insert_with(|| model.new_cache(capacity));
    let common = cache
        .tokens()
        .iter()
        .zip(history)
        .take_while(|(a, b)| a == b)
        .count()
        .min(history.len().saturating_sub(1));
    cache.truncate(common);
    cache
}

/// What a draft proposed.
#[derive(Default)]
struct Proposal {
    tokens: Vec<u32>,
    /// With sampling: the distribution each token was drawn from.
    dists: Vec<Vec<(u32, f64)>>,
}

/// Drafted and accepted tokens of one generation.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Counts {
    pub drafted: usize,
    pub accepted: usize,
}

/// The probability of `id` in `d` (sorted by id).
fn prob(d: &[(u32, f64)], id: u32) -> f64 {
    d.binary_search_by_key(&id, |x| x.0).map_or(0.0, |i| d[i].1)
}

/// The token at cumulative probability `u` (in `[0, 1)`) of `d` (weights summing to `total`).
fn draw_weighted(d: &[(u32, f64)], u: f64, total: f64) -> u32 {
    let mut r = u * total;
    for &(id, w) in d {
        r -= w;
        if r < 0.0 {
            return id;
        }
    }
    // Rounding left a sliver: the last token with weight takes it.
    d.iter().rev().find(|x| x.1 > 0.0).map_or(0, |x| x.0)
}

fn draw(d: &[(u32, f64)], u: f64) -> u32 {
    draw_weighted(d, u, d.iter().map(|x| x.1).sum())
}

/// One step of speculative sampling: `x` was drawn from the draft's distribution `q`, the model's is
/// `p` (both sorted by id, as [`Sampler::distribution`] gives them). Keeps `x` with probability
/// `min(1, p(x)/q(x))`, else draws from `normalize(max(0, p − q))`; returns the token and whether it is
/// `x` kept. The token is distributed as `p`. `uniform` gives draws in `[0, 1)`.
pub fn speculative_step(
    p: &[(u32, f64)],
    q: &[(u32, f64)],
    x: u32,
    uniform: &mut dyn FnMut() -> f64,
) -> (u32, bool) {
    let (px, qx) = (prob(p, x), prob(q, x));
    if qx > 0.0 && uniform() * qx < px {
        return (x, true);
    }
    let residual: Vec<(u32, f64)> = p
        .iter()
        .map(|&(id, pv)| (id, (pv - prob(q, id)).max(0.0)))
        .filter(|x| x.1 > 0.0)
        .collect();
    let total: f64 = residual.iter().map(|x| x.1).sum();
    if total > 0.0 {
        (draw_weighted(&residual, uniform(), total), false)
    } else {
        // p ≤ q everywhere only when p = q (up to rounding), where x is always kept.
        (draw(p, uniform()), false)
    }
}

/// Decode with `draft` from the prompt's `logits` on (the model's cache holds the prompt), handing each
/// token to `out`; returns why generation ended. The caller cuts the cache back to `out.ran`.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode(
    model: &Model,
    cache: &mut KvCache,
    draft: &mut Draft,
    sampler: &mut Sampler,
    logits: Vec<f32>,
    out: &mut Output<'_>,
    counts: &mut Counts,
    draft_tokens: usize,
    draft_p_min: f32,
) -> Result<StopReason> {
    let capacity = cache.capacity();
    let greedy = sampler.config().is_greedy();
    let mut draft_sampler = Sampler::new(SamplerConfig {
        seed: sampler.config().seed ^ DRAFT_SEED,
        ..sampler.config().clone()
    });
    // The first token comes from the prompt's logits, as without a draft.
    if out.full() {
        return Ok(StopReason::MaxTokens);
    }
    let id = sampler.sample(&logits, &out.history);
    if let Some(reason) = out.push(id)? {
        return Ok(reason);
    }
    let vocab = model.vocab_size();
    loop {
        // The last token of the history is chosen but not run; the cache holds all before it.
        let Some(&pending) = out.history.last() else {
            return Err(Error::Invalid("internal error: empty history".into()));
        };
        debug_assert_eq!(cache.len() + 1, out.history.len());
        // Room for the pending token and the proposals; no proposals past the tokens still wanted.
        let k = draft_tokens
            .min(cache.remaining().saturating_sub(1))
            .min(out.left().saturating_sub(1));
        let proposal = draft.propose(&out.history, k, draft_p_min, capacity, &mut draft_sampler)?;
        let mut batch = Vec::with_capacity(k + 1);
        batch.push(pending);
        batch.extend_from_slice(&proposal.tokens);
        let rows = model.forward_as_steps(&batch, cache)?;
        counts.drafted += proposal.tokens.len();
        let mut stop = None;
        for (i, row) in rows.chunks_exact(vocab).enumerate() {
            let (id, kept) = match proposal.tokens.get(i) {
                None => (sampler.sample(row, &out.history), false),
                Some(&d) if greedy => {
                    let t = sampler.sample(row, &out.history);
                    (t, t == d)
                }
                Some(&d) => {
                    let p = sampler.distribution(row, &out.history);
                    speculative_step(&p, &proposal.dists[i], d, &mut || sampler.uniform())
                }
            };
            counts.accepted += usize::from(kept);
            stop = out.push(id)?;
            if stop.is_some() || !kept {
                break;
            }
        }
        cache.truncate(out.ran);
        if let Some(reason) = stop {
            return Ok(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::{
        generate, generate_with_draft, ChatSession, GenerateOptions, GenerateStats,
    };
    use crate::model::fixture::{write_fixture, FixtureSpec};

    fn load(spec: &FixtureSpec) -> (tempfile::TempDir, Model, TextTokenizer) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_fixture(spec, dir.path()).expect("fixture");
        let src = crate::model::SourceModel::open(dir.path()).expect("open");
        let model = Model::load(&src).expect("load");
        (dir, model, src.tokenizer)
    }

    struct Run {
        text: String,
        pieces: Vec<String>,
        stats: GenerateStats,
        cache: KvCache,
    }

    fn run(
        model: &Model,
        tok: &TextTokenizer,
        prompt: &[u32],
        capacity: usize,
        draft: Option<&mut Draft>,
        opts: &GenerateOptions,
    ) -> Run {
        let mut cache = model.new_cache(capacity);
        let mut pieces = Vec::new();
        let (text, stats) =
            generate_with_draft(model, tok, prompt, &mut cache, draft, opts, &mut |s| {
                pieces.push(s.to_string());
                true
            })
            .expect("generate");
        assert_eq!(pieces.concat(), text);
        Run {
            text,
            pieces,
            stats,
            cache,
        }
    }

    /// The held positions' keys and values, bit for bit.
    fn same_cache(a: &KvCache, b: &KvCache) -> bool {
        a.capacity() == b.capacity() && a.same_held(b)
    }

    /// Greedy with a draft: text, streamed pieces, token count, stop reason and cache as without one.
    fn assert_same(
        model: &Model,
        tok: &TextTokenizer,
        prompt: &[u32],
        capacity: usize,
        draft: &mut Draft,
        opts: &GenerateOptions,
    ) -> GenerateStats {
        let plain = run(model, tok, prompt, capacity, None, opts);
        let spec = run(model, tok, prompt, capacity, Some(draft), opts);
        let what = format!("k = {}, {:?}", opts.draft_tokens, plain.stats.stop_reason);
        assert_eq!(spec.text, plain.text, "{what}");
        assert_eq!(spec.pieces, plain.pieces, "{what}");
        assert_eq!(spec.stats.stop_reason, plain.stats.stop_reason, "{what}");
        assert_eq!(
            spec.stats.generated_tokens, plain.stats.generated_tokens,
            "{what}"
        );
        assert!(
            same_cache(&spec.cache, &plain.cache),
            "{what}: caches differ"
        );
        assert!(spec.stats.accepted_tokens <= spec.stats.drafted_tokens);
        spec.stats
    }

    /// Greedy, exactly `k` proposals per step (no minimum probability).
    fn greedy(max_new_tokens: usize, k: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            draft_tokens: k,
            draft_p_min: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_with_the_model_as_its_own_draft_accepts_everything() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let prompt = tok
            .encode("The keeper counted the boats", false)
            .expect("encode");
        for k in [1, 4, 5] {
            let mut draft = Draft::new(&model, &tok, model.clone(), &tok).expect("draft");
            let s = assert_same(&model, &tok, &prompt, 128, &mut draft, &greedy(40, k));
            assert_eq!(s.generated_tokens, 40);
            // After the first token, each step gives k + 1 tokens (the last step fewer).
            assert_eq!(s.drafted_tokens, 39 * k / (k + 1), "{s:?}");
            assert_eq!(s.accepted_tokens, s.drafted_tokens, "k = {k}: {s:?}");
        }
    }

    #[test]
    fn greedy_with_another_model_as_draft_is_unchanged() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let (_e, other, other_tok) = load(&FixtureSpec {
            seed: 77,
            ..FixtureSpec::tiny_llama()
        });
        let prompt = tok.encode("Once upon a time", false).expect("encode");
        // A repetition penalty makes each pick depend on the tokens before it.
        let mut penalised = greedy(48, 5);
        penalised.sampler.repetition_penalty = 1.3;
        for opts in [greedy(48, 1), greedy(48, 5), penalised] {
            let mut draft = Draft::new(&model, &tok, other.clone(), &other_tok).expect("draft");
            let s = assert_same(&model, &tok, &prompt, 128, &mut draft, &opts);
            assert!(s.drafted_tokens > 0);
            assert!(
                s.accepted_tokens < s.drafted_tokens,
                "a random draft should miss: {s:?}"
            );
        }
    }

    #[test]
    fn a_minimum_draft_probability_drafts_less_and_changes_nothing() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let (_e, other, other_tok) = load(&FixtureSpec {
            seed: 77,
            ..FixtureSpec::tiny_llama()
        });
        let prompt = tok.encode("Once upon a time", false).expect("encode");
        for (d, dtok) in [(model.clone(), &tok), (other, &other_tok)] {
            let mut drafted = Vec::new();
            for p_min in [0.0, 0.2, 0.6, 1.0] {
                let mut draft = Draft::new(&model, &tok, d.clone(), dtok).expect("draft");
                let opts = GenerateOptions {
                    draft_p_min: p_min,
                    ..greedy(48, 5)
                };
                let s = assert_same(&model, &tok, &prompt, 128, &mut draft, &opts);
                drafted.push(s.drafted_tokens);
            }
            // Fewer guesses as the bar rises; one per step when it is certainty (a softmax of finite logits
            // over many tokens is below 1, so every first guess is the last), as with k = 1.
            assert!(drafted.windows(2).all(|w| w[1] <= w[0]), "{drafted:?}");
            assert!(drafted[2] < drafted[0], "{drafted:?}");
            let mut draft = Draft::new(&model, &tok, d.clone(), dtok).expect("draft");
            let one = assert_same(&model, &tok, &prompt, 128, &mut draft, &greedy(48, 1));
            assert_eq!(drafted[3], one.drafted_tokens, "{drafted:?}");
        }
        // Sampling: the bar is the draft's own probability of its draw, so the model's distribution is
        // kept; the model as its own draft still has every proposal accepted.
        let mut draft = Draft::new(&model, &tok, model.clone(), &tok).expect("draft");
        let opts = GenerateOptions {
            max_new_tokens: 40,
            draft_tokens: 4,
            draft_p_min: 0.3,
            sampler: SamplerConfig {
                temperature: 0.8,
                seed: 99,
                ..Default::default()
            },
            ..Default::default()
        };
        let a = run(&model, &tok, &prompt, 128, Some(&mut draft), &opts);
        let all = run(
            &model,
            &tok,
            &prompt,
            128,
            Some(&mut draft),
            &GenerateOptions {
                draft_p_min: 0.0,
                ..opts.clone()
            },
        );
        assert_eq!(a.stats.accepted_tokens, a.stats.drafted_tokens);
        assert!(a.stats.drafted_tokens < all.stats.drafted_tokens);
        assert_eq!(a.stats.generated_tokens, 40);
    }

    #[test]
    fn draft_probability_bounds_are_checked() {
        assert!(validate_draft_p_min(0.0).is_ok() && validate_draft_p_min(1.0).is_ok());
        for bad in [-0.1, 1.5, f32::NAN] {
            let e = validate_draft_p_min(bad)
                .expect_err("out of range")
                .to_string();
            assert!(e.contains("0..=1"), "{e}");
        }
    }

    #[test]
    fn greedy_with_a_draft_stops_where_decoding_without_one_stops() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let (_e, other, other_tok) = load(&FixtureSpec {
            seed: 78,
            ..FixtureSpec::tiny_qwen2()
        });
        let prompt = tok
            .encode("The keeper counted the boats", false)
            .expect("encode");
        let drafts = [
            Draft::new(&model, &tok, model.clone(), &tok).expect("self"),
            Draft::new(&model, &tok, other, &other_tok).expect("other"),
        ];
        let long = run(&model, &tok, &prompt, 256, None, &greedy(60, 4));
        for mut draft in drafts {
            for k in [1, 3, 5] {
                // Max tokens at every offset within a step.
                for max in [0, 1, 2, 5, 6, 7, 11] {
                    let s = assert_same(&model, &tok, &prompt, 128, &mut draft, &greedy(max, k));
                    assert_eq!(s.stop_reason, StopReason::MaxTokens);
                }
                // A full context at every offset within a step.
                for extra in 1..=7 {
                    let s = assert_same(
                        &model,
                        &tok,
                        &prompt,
                        prompt.len() + extra,
                        &mut draft,
                        &greedy(60, k),
                    );
                    assert_eq!(s.stop_reason, StopReason::ContextFull);
                }
                // A stop string part way.
                let chars: Vec<(usize, char)> = long.text.char_indices().collect();
                for at in [chars.len() / 3, chars.len() / 2] {
                    let stop = long.text[chars[at].0..chars[at + 2].0].to_string();
                    let opts = GenerateOptions {
                        stop_strings: vec![stop],
                        ..greedy(60, k)
                    };
                    let s = assert_same(&model, &tok, &prompt, 256, &mut draft, &opts);
                    assert_eq!(s.stop_reason, StopReason::StopString);
                }
                // End of sequence: a token the model picks part way counts as one.
                let ids = &long.cache.tokens()[prompt.len()..];
                for &eos in &ids[ids.len() / 2..ids.len() / 2 + 3] {
                    let mut eos_tok = tok.clone();
                    eos_tok.eos_token_ids.push(eos);
                    let mut d = Draft::new(&model, &eos_tok, draft.model().clone(), &eos_tok)
                        .expect("draft");
                    let s = assert_same(&model, &eos_tok, &prompt, 256, &mut d, &greedy(60, k));
                    assert_eq!(s.stop_reason, StopReason::Eos);
                }
            }
        }
    }

    #[test]
    fn cancelling_with_a_draft_stops_at_once() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let prompt = tok.encode("Once upon a time", false).expect("encode");
        let mut draft = Draft::new(&model, &tok, model.clone(), &tok).expect("draft");
        let mut cache = model.new_cache(128);
        let mut calls = 0;
        let (_, stats) = generate_with_draft(
            &model,
            &tok,
            &prompt,
            &mut cache,
            Some(&mut draft),
            &greedy(30, 4),
            &mut |_| {
                calls += 1;
                false
            },
        )
        .expect("generate");
        assert_eq!(stats.stop_reason, StopReason::Cancelled);
        assert_eq!(calls, 1);
        assert_eq!(cache.len(), prompt.len() + stats.generated_tokens - 1);
    }

    #[test]
    fn chat_with_a_draft_replies_as_without_one() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let (_e, other, other_tok) = load(&FixtureSpec {
            seed: 79,
            ..FixtureSpec::tiny_qwen2()
        });
        let opts = greedy(12, 3);
        let mut plain = ChatSession::new(&model, 256, Some("Be brief.".into()));
        let mut spec = ChatSession::new(&model, 256, Some("Be brief.".into()));
        spec.set_draft(Some(
            Draft::new(&model, &tok, other, &other_tok).expect("draft"),
        ));
        for turn in ["Hello there", "And again", "Once more"] {
            let (a, _) = plain
                .send(&model, &tok, turn, &opts, &mut |_| true)
                .expect("plain");
            let (b, s) = spec
                .send(&model, &tok, turn, &opts, &mut |_| true)
                .expect("spec");
            assert_eq!(a, b);
            assert!(s.drafted_tokens > 0);
            assert!(same_cache(plain.cache(), spec.cache()));
        }
        let (a, _) = plain
            .regenerate(&model, &tok, &opts, &mut |_| true)
            .expect("plain")
            .expect("reply");
        let (b, _) = spec
            .regenerate(&model, &tok, &opts, &mut |_| true)
            .expect("spec")
            .expect("reply");
        assert_eq!(a, b);
    }

    #[test]
    fn sampling_with_a_draft_runs_and_is_reproducible() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        let prompt = tok.encode("Once upon a time", false).expect("encode");
        let opts = GenerateOptions {
            max_new_tokens: 40,
            draft_tokens: 4,
            sampler: SamplerConfig {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.02,
                repetition_penalty: 1.1,
                repeat_last_n: 64,
                seed: 1234,
            },
            ..Default::default()
        };
        let mut draft = Draft::new(&model, &tok, model.clone(), &tok).expect("draft");
        let a = run(&model, &tok, &prompt, 128, Some(&mut draft), &opts);
        let b = run(&model, &tok, &prompt, 128, Some(&mut draft), &opts);
        assert_eq!(a.text, b.text);
        assert_eq!(a.stats.generated_tokens, 40);
        // The draft is the model: p = q, so every proposal is kept.
        assert_eq!(a.stats.accepted_tokens, a.stats.drafted_tokens);
        assert_eq!(a.cache.len(), prompt.len() + 39);
        assert_eq!(&a.cache.tokens()[..prompt.len()], prompt.as_slice());
    }

    /// Speculative sampling's step gives the model's distribution, whatever the draft's.
    #[test]
    fn the_speculative_step_yields_the_model_distribution() {
        use rand::{Rng, SeedableRng};
        // Sparse, sorted by id; the draft puts mass where the model puts none (4) and misses 5 and 7.
        let p = [
            (0u32, 0.30),
            (1, 0.05),
            (2, 0.25),
            (3, 0.10),
            (5, 0.2),
            (7, 0.1),
        ];
        let q = [(0u32, 0.10), (1, 0.30), (2, 0.25), (3, 0.05), (4, 0.30)];
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let n = 200_000;
        let mut counts = [0usize; 8];
        let mut kept = 0usize;
        for _ in 0..n {
            let x = draw(&q, rng.gen::<f64>());
            let (y, k) = speculative_step(&p, &q, x, &mut || rng.gen::<f64>());
            counts[y as usize] += 1;
            kept += usize::from(k);
            assert!(!k || y == x);
        }
        let freq = |i: usize| counts[i] as f64 / f64::from(n);
        let mut chi2 = 0.0;
        for i in 0..8 {
            let pi = prob(&p, i as u32);
            assert!(
                (freq(i) - pi).abs() < 0.005,
                "token {i}: {} vs {pi}",
                freq(i)
            );
            if pi > 0.0 {
                chi2 += (counts[i] as f64 - pi * f64::from(n)).powi(2) / (pi * f64::from(n));
            } else {
                assert_eq!(counts[i], 0, "token {i} has no probability");
            }
        }
        // 5 degrees of freedom: P(χ² > 20.5) ≈ 0.001.
        assert!(chi2 < 20.5, "χ² = {chi2}");
        // Kept with probability Σ min(p, q) = 0.1 + 0.05 + 0.25 + 0.05 = 0.45.
        let rate = kept as f64 / f64::from(n);
        assert!((rate - 0.45).abs() < 0.005, "{rate}");
        // The draft alone is far from p: the test tells them apart.
        assert!((prob(&q, 4) - prob(&p, 4)).abs() > 0.1);
    }

    #[test]
    fn greedy_step_keeps_only_the_pick() {
        let p = [(3u32, 1.0)];
        let mut u = || 0.999;
        assert_eq!(speculative_step(&p, &[(3, 1.0)], 3, &mut u), (3, true));
        assert_eq!(speculative_step(&p, &[(5, 1.0)], 5, &mut u), (3, false));
    }

    #[test]
    fn a_draft_with_another_vocabulary_is_refused() {
        let (_d, model, tok) = load(&FixtureSpec::tiny_qwen2());
        // One token more in the draft's tokenizer.
        let mut more = tok.clone();
        more.inner
            .add_special_tokens(&[tokenizers::AddedToken::from("<|extra|>", true)]);
        let e = Draft::new(&model, &tok, model.clone(), &more).expect_err("vocabulary size");
        assert!(e.to_string().contains("tokens"), "{e}");
        // Another end-of-sequence id.
        let mut eos = tok.clone();
        eos.eos_token_ids = vec![7];
        let e = Draft::new(&model, &tok, model.clone(), &eos).expect_err("eos");
        assert!(e.to_string().contains("end-of-sequence"), "{e}");
        // Another BOS id.
        let mut other = tok.clone();
        other.bos_token_id = Some(5);
        assert!(Draft::new(&model, &tok, model.clone(), &other).is_err());
        assert!(Draft::new(&model, &tok, model.clone(), &tok).is_ok());
        // Draft tokens out of range.
        let mut draft = Draft::new(&model, &tok, model.clone(), &tok).expect("draft");
        let prompt = tok.encode("Hi", false).expect("encode");
        for k in [0, 17] {
            let e = generate_with_draft(
                &model,
                &tok,
                &prompt,
                &mut model.new_cache(32),
                Some(&mut draft),
                &greedy(4, k),
                &mut |_| true,
            )
            .expect_err("k out of range");
            assert!(e.to_string().contains("1..=16"), "{e}");
        }
        // Without a draft the same options decode as before.
        assert!(generate(
            &model,
            &tok,
            &prompt,
            &mut model.new_cache(32),
            &greedy(4, 0),
            &mut |_| true
        )
        .is_ok());
    }
}
