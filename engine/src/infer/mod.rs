//! Running a model: the Llama-family forward pass (Llama, Mistral, Qwen2) over weights in their stored
//! type, the KV cache, sampling, streamed generation and chat sessions.
//!
//! * [`Model`] — load from a [`SourceModel`](crate::model::SourceModel), `forward` tokens through a [`KvCache`].
//! * [`Sampler`] — repetition penalty, temperature, top-k, top-p, min-p, seeded.
//! * [`generate`] — prompt → streamed text; [`ChatSession`] — multi-turn chat reusing the cache.
//! * [`generate_with_draft`] / [`Draft`] — speculative decoding with a smaller or lower-bit draft model.

mod generate;
pub(crate) mod gpu;
mod kv_cache;
mod model;
mod numerics;
mod sampling;
mod speculative;
mod stream;

pub use generate::{
    generate, generate_with_draft, ChatSession, GenerateOptions, GenerateStats, StopReason,
};
pub use kv_cache::KvCache;
pub use model::{LinearKind, Logits, MatmulInput, MatmulObserver, Model};
pub use numerics::{round_activations, vec_dot_type, Numerics, VecDotType};
pub use sampling::{
    apply_repetition_penalty, argmax, min_p_filter, top_p_filter, Sampler, SamplerConfig,
};
pub use speculative::{
    check_draft, speculative_step, validate_draft_p_min, validate_draft_tokens, Draft,
    DEFAULT_DRAFT_P_MIN, DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS,
};
