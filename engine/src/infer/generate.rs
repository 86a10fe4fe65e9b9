//! Text generation: prompt → streamed text, and multi-turn chat sessions that keep their KV cache.

use std::time::Instant;

use super::kv_cache::KvCache;
use super::model::{Logits, Model};
use super::sampling::{Sampler, SamplerConfig};
use super::speculative::{self, Draft, DEFAULT_DRAFT_P_MIN, DEFAULT_DRAFT_TOKENS};
use super::stream::Output;
pub use super::stream::StopReason;
use crate::model::{ChatMessage, TextTokenizer};
use crate::{Error, Result};

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to sample.
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends at the first of these in the text; it and anything after it are dropped.
    pub stop_strings: Vec<String>,
    /// Accept a context longer than the model's trained one.
    pub allow_long_context: bool,
    /// Where the arithmetic runs.
    pub backend: crate::backend::Backend,
    /// The arithmetic (a job sets it on the model): `llama-cpu`, the integer fast path on the CPU, by
    /// default; `exact` for f32 activations throughout.
    pub numerics: super::numerics::Numerics,
    /// A draft model for speculative decoding (same tokenizer as the model; a job loads it, on the same
    /// backend); `None` decodes without one.
    pub draft: Option<std::path::PathBuf>,
    /// Tokens the draft proposes per step (1..=16, [`DEFAULT_DRAFT_TOKENS`] by default).
    pub draft_tokens: usize,
    /// The draft stops proposing after the first token it gives less than this probability (0: always
    /// `draft_tokens`), so it guesses far only where it is confident ([`DEFAULT_DRAFT_P_MIN`]).
    pub draft_p_min: f32,
    /// The draft's arithmetic, when not the model's (`llama-cpu` dots Q4_0/Q8_0 rows in integers, a faster
    /// draft; the model's own arithmetic, which decides every token, is unchanged).
    pub draft_numerics: Option<super::numerics::Numerics>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampler: SamplerConfig::default(),
            stop_strings: Vec::new(),
            allow_long_context: false,
            backend: crate::backend::Backend::Cpu,
            numerics: super::numerics::Numerics::LlamaCpu,
            draft: None,
            draft_tokens: DEFAULT_DRAFT_TOKENS,
            draft_p_min: DEFAULT_DRAFT_P_MIN,
            draft_numerics: None,
        }
    }
}

/// Counts and timings of one [`generate`] call.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateStats {
    /// Prompt tokens run through the model by this call (the prompt less the prefix reused from the cache).
    pub prompt_tokens: usize,
    /// Tokens sampled, not counting a final end-of-sequence token.
    pub generated_tokens: usize,
    /// Seconds spent on the prompt (until the first token's logits).
    pub prompt_secs: f64,
    /// Seconds spent after that (sampling and decoding).
    pub decode_secs: f64,
    pub stop_reason: StopReason,
    /// Tokens a draft model proposed (0 without one).
    pub drafted_tokens: usize,
    /// Of those, the tokens the model accepted.
    pub accepted_tokens: usize,
    /// The arithmetic the model ran in.
    pub numerics: super::numerics::Numerics,
}

impl GenerateStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }

    /// Generated tokens per second.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.generated_tokens as f64 / self.decode_secs.max(1e-9)
    }

    /// Accepted ÷ drafted tokens; `None` when nothing was drafted.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafted_tokens > 0).then(|| self.accepted_tokens as f64 / self.drafted_tokens as f64)
    }
}

/// Feeds `prompt` (reusing whatever prefix of it the cache already holds), then samples until an
/// end-of-sequence token, a stop string, `max_new_tokens`, a full cache or cancellation.
///
/// Decoded text is streamed to `on_text` in pieces that are whole UTF-8 characters; a stop string and
/// anything after it are never sent. `on_text` returns `false` to cancel. Returns the whole text and
/// the statistics. The cache ends holding the prompt and the generated tokens (all but the last one
/// sampled, which was never run). `opts.draft` is ignored here: see [`generate_with_draft`].
pub fn generate(
    model: &Model,
    tok: &TextTokenizer,
    prompt: &[u32],
    cache: &mut KvCache,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(String, GenerateStats)> {
    generate_with_draft(model, tok, prompt, cache, None, opts, on_text)
}

/// [`generate`], with speculative decoding when `draft` is given: the draft proposes
/// `opts.draft_tokens` tokens, the model checks them in one pass (see [`speculative`](super::speculative)).
/// Greedy output, the text streamed and the cache at the end are those of [`generate`], token for token;
/// sampled output follows the same distribution.
pub fn generate_with_draft(
    model: &Model,
    tok: &TextTokenizer,
    prompt: &[u32],
    cache: &mut KvCache,
    draft: Option<&mut Draft>,
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(String, GenerateStats)> {
    opts.sampler.validate()?;
    if draft.is_some() {
        speculative::validate_draft_tokens(opts.draft_tokens)?;
        speculative::validate_draft_p_min(opts.draft_p_min)?;
    }
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    if prompt.len() > cache.capacity() {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens, more than the context of {}",
            prompt.len(),
            cache.capacity()
        )));
    }
    let t0 = Instant::now();
    // Reuse the common prefix, but always run at least the last prompt token to get its logits.
    let common = cache
        .tokens()
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len() - 1);
    cache.truncate(common);
    let logits = model.forward(&prompt[common..], cache, Logits::Last)?;
    let mut draft = draft;
    if let Some(d) = draft.as_deref_mut() {
        d.prefill(prompt, cache.capacity())?;
    }
    let prompt_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let mut sampler = Sampler::new(opts.sampler.clone());
    let mut out = Output::new(
        tok,
        opts.max_new_tokens,
        prompt,
        &opts.stop_strings,
        on_text,
        cache.capacity(),
    );
    let mut counts = speculative::Counts::default();
    let reason = match draft {
        None => decode(model, cache, &mut sampler, logits, &mut out)?,
        Some(d) => speculative::decode(
            model,
            cache,
            d,
            &mut sampler,
            logits,
            &mut out,
            &mut counts,
            opts.draft_tokens,
            opts.draft_p_min,
        )?,
    };
    // A verification pass ran further than the tokens kept.
    cache.truncate(out.ran);
    let generated = out.generated;
    let prompt_tokens = prompt.len() - common;
    let text = out.finish(reason)?;
    let stats = GenerateStats {
        prompt_tokens,
        generated_tokens: generated,
        prompt_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        stop_reason: reason,
        drafted_tokens: counts.drafted,
        accepted_tokens: counts.accepted,
        numerics: model.numerics(),
    };
    Ok((text, stats))
}

/// One token per forward pass, from the prompt's `logits` on.
fn decode(
    model: &Model,
    cache: &mut KvCache,
    sampler: &mut Sampler,
    mut logits: Vec<f32>,
    out: &mut Output<'_>,
) -> Result<StopReason> {
    loop {
        if out.full() {
            return Ok(StopReason::MaxTokens);
        }
        let id = sampler.sample(&logits, &out.history);
        if let Some(reason) = out.push(id)? {
            return Ok(reason);
        }
        logits = model.forward(&[id], cache, Logits::Last)?;
    }
}

/// A conversation: system prompt, messages, and a KV cache reused across turns (the tokens of the
/// previous turns stay cached, so only the new part of each rendered prompt is computed).
#[derive(Debug)]
pub struct ChatSession {
    system_prompt: Option<String>,
    messages: Vec<ChatMessage>,
    cache: KvCache,
    /// Replies regenerated so far (each draws with a seed this much past the configured one).
    regenerations: u64,
    /// The draft model of speculative decoding, with its own cache.
    draft: Option<Draft>,
}

impl ChatSession {
    /// A new conversation with a cache of `context_tokens` positions.
    pub fn new(model: &Model, context_tokens: usize, system_prompt: Option<String>) -> Self {
        Self {
            system_prompt,
            messages: Vec::new(),
            cache: model.new_cache(context_tokens),
            regenerations: 0,
            draft: None,
        }
    }

    /// Decode the next replies speculatively with `draft` (checked against the model with
    /// [`Draft::new`]), or without a draft (`None`).
    pub fn set_draft(&mut self, draft: Option<Draft>) {
        self.draft = draft;
    }

    /// The draft model, if one is set.
    pub fn draft(&self) -> Option<&Draft> {
        self.draft.as_ref()
    }

    /// The messages so far (user and assistant turns, without the system prompt).
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    pub fn system_prompt(&self) -> Option<&str> {
        self.system_prompt.as_deref()
    }

    /// Change the system prompt (the next turn recomputes from where the prompt changed).
    pub fn set_system_prompt(&mut self, system_prompt: Option<String>) {
        self.system_prompt = system_prompt;
    }

    /// Forget the conversation (the system prompt stays).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.cache.clear();
        if let Some(d) = &mut self.draft {
            d.clear();
        }
    }

    /// The KV cache (its tokens are the last rendered prompt plus the reply).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Every message the template sees: the system prompt first, when set.
    pub fn rendered_messages(&self) -> Vec<ChatMessage> {
        let mut all = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system_prompt {
            all.push(ChatMessage::new("system", s.clone()));
        }
        all.extend(self.messages.iter().cloned());
        all
    }

    /// Token ids of the conversation rendered with the chat template and the assistant's opening.
    pub fn prompt_tokens(&self, tok: &TextTokenizer) -> Result<Vec<u32>> {
        let text = tok.render_chat(&self.rendered_messages(), true)?;
        // The template writes BOS itself when the model wants one; add it only when it did not.
        let has_bos = tok
            .bos_token
            .as_deref()
            .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        tok.encode(&text, !has_bos)
    }

    /// Replace the last reply with a new one for the same user message (streamed to `on_text`). Sampling
    /// draws with the configured seed plus the number of regenerations so far, so a sampled reply changes;
    /// greedy decoding (temperature 0) gives the same reply again. `Ok(None)` when there is no reply yet.
    pub fn regenerate(
        &mut self,
        model: &Model,
        tok: &TextTokenizer,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Option<(String, GenerateStats)>> {
        let n = self.messages.len();
        if n < 2 || self.messages[n - 1].role != "assistant" || self.messages[n - 2].role != "user"
        {
            return Ok(None);
        }
        let reply = self.messages.pop();
        let user = self.messages.pop();
        let Some(user) = user else {
            return Ok(None);
        };
        self.regenerations += 1;
        let mut opts = opts.clone();
        opts.sampler.seed = opts.sampler.seed.wrapping_add(self.regenerations);
        match self.send(model, tok, &user.content, &opts, on_text) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                // The conversation stays as it was.
                self.messages.push(user);
                self.messages.extend(reply);
                Err(e)
            }
        }
    }

    /// Add the user's message, generate the reply (streamed to `on_text`), and add the reply.
    pub fn send(
        &mut self,
        model: &Model,
        tok: &TextTokenizer,
        user_text: &str,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(String, GenerateStats)> {
        self.messages.push(ChatMessage::new("user", user_text));
        let result = self.prompt_tokens(tok).and_then(|prompt| {
            let draft = self.draft.as_mut();
            generate_with_draft(model, tok, &prompt, &mut self.cache, draft, opts, on_text)
        });
        match result {
            Ok((text, stats)) => {
                self.messages
                    .push(ChatMessage::new("assistant", text.clone()));
                Ok((text, stats))
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::{StopFilter, TextStream};
    use super::*;

    #[test]
    fn stop_filter_holds_back_partial_matches() {
        let stops = vec!["STOP".to_string(), "\n\n".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("hello S"), ("hello ".to_string(), false));
        assert_eq!(f.push("T"), (String::new(), false));
        assert_eq!(f.push("x"), ("STx".to_string(), false));
        assert_eq!(f.push(" end\n"), (" end".to_string(), false));
        assert_eq!(f.push("\nmore"), (String::new(), true));
        assert_eq!(f.text, "hello STx end");
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("aSTOPb"), ("a".to_string(), true));
        let mut f = StopFilter::new(&[]);
        assert_eq!(f.push("é"), ("é".to_string(), false));
        let one = vec!["é!".to_string()];
        let mut f = StopFilter::new(&one);
        assert_eq!(f.push("aé"), ("a".to_string(), false));
        assert_eq!(f.finish(), "é");
    }

    fn fixture() -> (tempfile::TempDir, Model, TextTokenizer) {
        use crate::model::fixture::{write_fixture, FixtureSpec};
        let dir = tempfile::tempdir().expect("tempdir");
        write_fixture(&FixtureSpec::tiny_qwen2(), dir.path()).expect("fixture");
        let src = crate::model::SourceModel::open(dir.path()).expect("open");
        let model = Model::load(&src).expect("load");
        (dir, model, src.tokenizer)
    }

    fn run(
        model: &Model,
        tok: &TextTokenizer,
        prompt: &[u32],
        cache: &mut KvCache,
        opts: &GenerateOptions,
    ) -> (String, GenerateStats, Vec<String>) {
        let mut pieces = Vec::new();
        let (text, stats) = generate(model, tok, prompt, cache, opts, &mut |s| {
            pieces.push(s.to_string());
            true
        })
        .expect("generate");
        assert_eq!(pieces.concat(), text);
        (text, stats, pieces)
    }

    #[test]
    fn text_stream_holds_back_incomplete_characters() {
        let (_d, _m, tok) = fixture();
        let text = "a é東🙂 done";
        let ids = tok.encode(text, false).expect("encode");
        assert!(
            ids.len() > text.chars().count(),
            "multi-byte characters span tokens"
        );
        let mut st = TextStream::new();
        let mut out = String::new();
        for &id in &ids {
            let piece = st.push(&tok, id).expect("push");
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
        }
        out.push_str(&st.flush(&tok).expect("flush"));
        assert_eq!(out, text);
    }

    #[test]
    fn generate_reuses_the_cached_prefix_and_stops_where_asked() {
        let (_d, model, tok) = fixture();
        let prompt = tok
            .encode("The keeper counted the boats", false)
            .expect("encode");
        let opts = GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        };
        let mut cache = model.new_cache(128);
        let (text, stats, _) = run(&model, &tok, &prompt, &mut cache, &opts);
        assert_eq!(stats.stop_reason, StopReason::MaxTokens);
        assert_eq!(stats.generated_tokens, 12);
        assert_eq!(stats.prompt_tokens, prompt.len());
        // The cache holds the prompt and all but the last sampled token.
        assert_eq!(cache.len(), prompt.len() + 11);

        // Same prompt again: only its last token is recomputed, and the result is the same.
        let (again, stats, _) = run(&model, &tok, &prompt, &mut cache, &opts);
        assert_eq!(again, text);
        assert_eq!(stats.prompt_tokens, 1);

        // A longer prompt that extends the cached tokens reuses them.
        let mut longer = cache.tokens().to_vec();
        longer.extend(tok.encode(" and the", false).expect("encode"));
        let cached = cache.len();
        let (a, stats, _) = run(&model, &tok, &longer, &mut cache, &opts);
        assert_eq!(stats.prompt_tokens, longer.len() - cached);
        let (b, _, _) = run(&model, &tok, &longer, &mut model.new_cache(128), &opts);
        assert_eq!(a, b);

        // Stop string: cut at its first occurrence, never streamed.
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let (s0, s1) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 2].0);
        let stop = text[s0..s1].to_string();
        let first = text.find(&stop).expect("present");
        let opts_stop = GenerateOptions {
            stop_strings: vec!["never-there".into(), stop.clone()],
            ..opts.clone()
        };
        let (cut, stats, pieces) =
            run(&model, &tok, &prompt, &mut model.new_cache(128), &opts_stop);
        assert_eq!(stats.stop_reason, StopReason::StopString);
        assert_eq!(cut, text[..first]);
        assert!(!pieces.concat().contains(&stop));

        // Full context.
        let mut small = model.new_cache(prompt.len() + 3);
        let (_, stats, _) = run(&model, &tok, &prompt, &mut small, &opts);
        assert_eq!(stats.stop_reason, StopReason::ContextFull);
        assert_eq!(stats.generated_tokens, 4);
        let mut tiny = model.new_cache(prompt.len() - 1);
        assert!(generate(&model, &tok, &prompt, &mut tiny, &opts, &mut |_| true).is_err());

        // Cancellation from the callback.
        let mut calls = 0;
        let (_, stats) = generate(
            &model,
            &tok,
            &prompt,
            &mut model.new_cache(128),
            &opts,
            &mut |_| {
                calls += 1;
                false
            },
        )
        .expect("generate");
        assert_eq!(stats.stop_reason, StopReason::Cancelled);
        assert_eq!(calls, 1);
        assert!(stats.generated_tokens < 12);
    }

    #[test]
    fn seeded_generation_is_reproducible() {
        let (_d, model, tok) = fixture();
        let prompt = tok.encode("Once upon a time", false).expect("encode");
        let opts = GenerateOptions {
            backend: crate::backend::Backend::Cpu,
            numerics: crate::infer::Numerics::Exact,
            max_new_tokens: 16,
            allow_long_context: false,
            sampler: SamplerConfig {
                temperature: 0.9,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.02,
                repetition_penalty: 1.1,
                repeat_last_n: 64,
                seed: 1234,
            },
            stop_strings: Vec::new(),
            draft: None,
            draft_tokens: DEFAULT_DRAFT_TOKENS,
            draft_p_min: crate::infer::DEFAULT_DRAFT_P_MIN,
            draft_numerics: None,
        };
        let (a, _, _) = run(&model, &tok, &prompt, &mut model.new_cache(64), &opts);
        let (b, _, _) = run(&model, &tok, &prompt, &mut model.new_cache(64), &opts);
        assert_eq!(a, b);
        let other = GenerateOptions {
            sampler: SamplerConfig {
                seed: 99,
                ..opts.sampler.clone()
            },
            ..opts.clone()
        };
        let (c, _, _) = run(&model, &tok, &prompt, &mut model.new_cache(64), &other);
        assert_ne!(a, c);
    }

    #[test]
    fn chat_session_keeps_history_and_reuses_the_cache() {
        let (_d, model, tok) = fixture();
        let opts = GenerateOptions {
            max_new_tokens: 6,
            ..Default::default()
        };
        let mut chat = ChatSession::new(&model, 256, Some("You are terse.".into()));
        let first = chat.prompt_tokens(&tok).expect("render");
        assert_eq!(
            tok.decode(&first, false).expect("decode"),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>assistant\n"
        );
        let (r1, s1) = chat
            .send(&model, &tok, "Hello there", &opts, &mut |_| true)
            .expect("turn 1");
        assert_eq!(chat.messages().len(), 2);
        assert_eq!(chat.messages()[1].content, r1);
        let (_, s2) = chat
            .send(&model, &tok, "And again", &opts, &mut |_| true)
            .expect("turn 2");
        assert_eq!(chat.messages().len(), 4);
        let full = chat.prompt_tokens(&tok).expect("render");
        // Turn 2 recomputed only what the first turn had not already put in the cache.
        assert!(
            s2.prompt_tokens < full.len() - 4,
            "{} of {}",
            s2.prompt_tokens,
            full.len()
        );
        assert!(s1.prompt_tokens > 10);
        chat.clear();
        assert!(chat.messages().is_empty() && chat.cache().is_empty());
    }

    #[test]
    fn regenerate_replaces_the_last_reply() {
        let (_d, model, tok) = fixture();
        let greedy = GenerateOptions {
            max_new_tokens: 8,
            ..Default::default()
        };
        let mut chat = ChatSession::new(&model, 256, None);
        assert!(chat
            .regenerate(&model, &tok, &greedy, &mut |_| true)
            .expect("nothing to redo")
            .is_none());
        let (r1, _) = chat
            .send(&model, &tok, "Hello there", &greedy, &mut |_| true)
            .expect("turn");
        // Greedy: the same reply again, in place of the first.
        let (r2, _) = chat
            .regenerate(&model, &tok, &greedy, &mut |_| true)
            .expect("regenerate")
            .expect("a reply");
        assert_eq!(r1, r2);
        assert_eq!(chat.messages().len(), 2);
        assert_eq!(chat.messages()[0].content, "Hello there");
        assert_eq!(chat.messages()[1].content, r2);
        // Sampled: each regeneration draws with the next seed, so the replies differ from a plain resend.
        let sampled = GenerateOptions {
            max_new_tokens: 12,
            sampler: SamplerConfig {
                temperature: 1.5,
                seed: 7,
                ..SamplerConfig::default()
            },
            ..Default::default()
        };
        let mut fresh = ChatSession::new(&model, 256, None);
        let (s1, _) = fresh
            .send(&model, &tok, "Hello there", &sampled, &mut |_| true)
            .expect("turn");
        let replies: Vec<String> = (0..3)
            .map(|_| {
                fresh
                    .regenerate(&model, &tok, &sampled, &mut |_| true)
                    .expect("regenerate")
                    .expect("a reply")
                    .0
            })
            .collect();
        assert!(replies.iter().any(|r| *r != s1), "{s1:?} {replies:?}");
        assert_eq!(fresh.messages().len(), 2);
    }

    /// Speed and sanity on the real SmolLM2-135M-Instruct Q4_1 GGUF:
    /// `cargo test -p quant_engine --lib smollm2 -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh); prints speeds"]
    fn smollm2_chat_speed() {
        let path = crate::testing::smollm2_gguf();
        let src = crate::model::SourceModel::open(&path).expect("open");
        let model = Model::load(&src).expect("load");
        let tok = &src.tokenizer;
        let threads = rayon::current_num_threads();

        // Prompt processing: 256 tokens of text.
        let text = include_str!("generate.rs");
        let ids = tok.encode(text, false).expect("encode");
        let prompt = &ids[..256];
        let mut cache = model.new_cache(1024);
        let t = Instant::now();
        model
            .forward(prompt, &mut cache, Logits::Last)
            .expect("prompt");
        let pp = t.elapsed().as_secs_f64();
        eprintln!(
            "prompt: 256 tokens in {pp:.3}s = {:.1} tok/s ({threads} threads)",
            256.0 / pp
        );

        // Decoding: 64 tokens after the prompt.
        let t = Instant::now();
        for i in 0..64 {
            model
                .forward(&[ids[256 + i]], &mut cache, Logits::Last)
                .expect("decode");
        }
        let tg = t.elapsed().as_secs_f64();
        eprintln!("decode: 64 tokens in {tg:.3}s = {:.1} tok/s", 64.0 / tg);

        // A chat answer.
        let mut chat = ChatSession::new(&model, 1024, None);
        let opts = GenerateOptions {
            max_new_tokens: 32,
            ..Default::default()
        };
        let (answer, stats) = chat
            .send(
                &model,
                tok,
                "What is the capital of France?",
                &opts,
                &mut |_| true,
            )
            .expect("chat");
        eprintln!(
            "chat: {answer:?} ({:?}; prompt {:.1} tok/s, decode {:.1} tok/s)",
            stats.stop_reason,
            stats.prompt_tokens_per_sec(),
            stats.decode_tokens_per_sec()
        );
        assert!(answer.contains("Paris"), "{answer}");
    }
}
