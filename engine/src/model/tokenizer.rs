//! Text ⇄ token ids, and the chat template.
//!
//! Wraps a `tokenizers::Tokenizer` (loaded from `tokenizer.json`, or rebuilt from a GGUF's
//! `tokenizer.ggml.*` keys) with the special-token facts that llama.cpp and transformers agree on.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config/generation_config/GGUF eos and eot).
    pub eos_token_ids: Vec<u32>,
    /// Whether `encode(text, true)` prepends BOS (llama.cpp's `add_bos`).
    pub add_bos: bool,
    /// The Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    /// Token strings the template may reference (`bos_token`, `eos_token`).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TextTokenizer {
    /// Token ids of `text`. With `add_special`, BOS is prepended when the model asks for it (`add_bos`),
    /// as llama.cpp's `common_tokenize(.., add_special=true, parse_special=false)` does. No other post
    /// processing is applied.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some(b) = self.bos_token_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }
}
