//! The text side of decoding, shared by every decoding loop: token ids become streamed UTF-8 pieces, stop
//! strings cut the text, and end-of-sequence, cancellation, the token budget and a full cache end it.

use crate::model::TextTokenizer;
use crate::Result;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence / end-of-turn token.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` were sampled.
    MaxTokens,
    /// The text callback asked to stop.
    Cancelled,
    /// The KV cache is full.
    ContextFull,
}

/// Turns a growing list of token ids into text pieces, holding back bytes of incomplete characters.
///
/// Decodes a window that starts a few tokens back (`prefix`), so tokenizers that treat the first token
/// specially (SentencePiece's leading space) decode the same as in the full text.
pub(super) struct TextStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextStream {
    pub(super) fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Add `id`; returns the text that became complete.
    pub(super) fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(piece) = now.get(before.len()..) {
                if now.starts_with(&before) {
                    let piece = piece.to_string();
                    self.prefix = self.read;
                    self.read = self.ids.len();
                    return Ok(piece);
                }
            }
        }
        Ok(String::new())
    }

    /// Whatever is still held back (incomplete characters become U+FFFD).
    pub(super) fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

/// Streams text to the caller, cutting at stop strings and holding back what might begin one.
pub(super) struct StopFilter<'a> {
    stops: &'a [String],
    pub(super) text: String,
    sent: usize,
}

impl<'a> StopFilter<'a> {
    pub(super) fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            sent: 0,
        }
    }

    /// Add `piece`; returns `(text safe to emit now, whether a stop string was found)`.
    pub(super) fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self
            .sent
            .saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        self.text.push_str(piece);
        let mut start = search_from;
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[start..].find(s.as_str()).map(|i| start + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            let out = self.text.get(self.sent..).unwrap_or_default().to_string();
            self.sent = self.text.len();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of a stop string.
        let mut hold = 0;
        for s in self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let end = (self.text.len() - hold).max(self.sent);
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        (out, false)
    }

    /// Everything not yet emitted.
    pub(super) fn finish(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

/// What every decoding loop shares: the history, streamed text, stop strings, cancellation and the
/// count of tokens; both loops (with and without a draft) hand it each token the model chose.
pub(super) struct Output<'a> {
    tok: &'a TextTokenizer,
    max_new_tokens: usize,
    /// The prompt and the tokens generated so far.
    pub(super) history: Vec<u32>,
    stream: TextStream,
    filter: StopFilter<'a>,
    pub(super) generated: usize,
    on_text: &'a mut dyn FnMut(&str) -> bool,
    /// Tokens of `history` the model had run when it chose the last token: where its cache ends.
    pub(super) ran: usize,
    /// Positions of the model's cache.
    capacity: usize,
}

impl<'a> Output<'a> {
    pub(super) fn new(
        tok: &'a TextTokenizer,
        max_new_tokens: usize,
        prompt: &[u32],
        stop_strings: &'a [String],
        on_text: &'a mut dyn FnMut(&str) -> bool,
        capacity: usize,
    ) -> Self {
        Self {
            tok,
            max_new_tokens,
            history: prompt.to_vec(),
            stream: TextStream::new(),
            filter: StopFilter::new(stop_strings),
            generated: 0,
            on_text,
            ran: prompt.len(),
            capacity,
        }
    }

    /// Whether `max_new_tokens` are out.
    pub(super) fn full(&self) -> bool {
        self.generated >= self.max_new_tokens
    }

    /// Tokens still to generate.
    pub(super) fn left(&self) -> usize {
        self.max_new_tokens.saturating_sub(self.generated)
    }

    /// Take `id`, chosen by the model after running all of `history`; returns why generation ends with
    /// it, if it does.
    pub(super) fn push(&mut self, id: u32) -> Result<Option<StopReason>> {
        self.ran = self.history.len();
        if self.tok.is_eos(id) {
            return Ok(Some(StopReason::Eos));
        }
        self.generated += 1;
        self.history.push(id);
        let piece = self.stream.push(self.tok, id)?;
        let (out, stopped) = self.filter.push(&piece);
        if !(out.is_empty() || (self.on_text)(&out)) {
            return Ok(Some(StopReason::Cancelled));
        }
        if stopped {
            return Ok(Some(StopReason::StopString));
        }
        if self.full() {
            return Ok(Some(StopReason::MaxTokens));
        }
        if self.ran >= self.capacity {
            return Ok(Some(StopReason::ContextFull));
        }
        Ok(None)
    }

    /// Send what is held back (unless a stop string or the caller ended it) and return the whole text.
    pub(super) fn finish(mut self, reason: StopReason) -> Result<String> {
        if !matches!(reason, StopReason::StopString | StopReason::Cancelled) {
            let tail = self.stream.flush(self.tok)?;
            let (mut out, stopped) = self.filter.push(&tail);
            if !stopped {
                out.push_str(&self.filter.finish());
            }
            // The caller is told of the rest even if it then asks to stop: there is nothing left to cancel.
            if !out.is_empty() {
                let _ = (self.on_text)(&out);
            }
        }
        Ok(self.filter.text)
    }
}
