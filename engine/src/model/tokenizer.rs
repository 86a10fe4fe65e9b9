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
    /// Where the chat template came from (a file, a GGUF key), for errors.
    pub chat_template_origin: Option<String>,
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

// ---------------------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------------------

/// The template used when a model ships none: ChatML, as transformers' old `default_chat_template` wrote it
/// (`<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n` when a
/// generation prompt is asked for). No system prompt is added.
pub const FALLBACK_CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl TextTokenizer {
    /// The chat rendered by the model's template, as transformers'
    /// `tokenizer.apply_chat_template(messages, add_generation_prompt=.., tokenize=False)` renders it.
    ///
    /// The template sees what transformers gives it: `messages`, `add_generation_prompt`, `tools` and
    /// `documents` (none), `bos_token`/`eos_token` (when known), the `raise_exception` and `strftime_now`
    /// functions, a `tojson` filter that writes what Python's `json.dumps` writes, Python string/dict methods
    /// (`.strip()`, `.startswith()`, `.split()`, `.items()`, ..), loop controls, `trim_blocks` and
    /// `lstrip_blocks`. `strftime_now` reads the clock in UTC (Python uses local time).
    ///
    /// A model without a template is rendered with [`FALLBACK_CHATML_TEMPLATE`].
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs = serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?;
        self.render_chat_json(&msgs, None, add_generation_prompt)
    }

    /// [`render_chat`](Self::render_chat) with tool definitions (a JSON list of JSON-schema function specs,
    /// passed to the template as `tools`).
    pub fn render_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs = serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?;
        self.render_chat_json(&msgs, Some(tools), add_generation_prompt)
    }

    /// The most general form: `messages` is a JSON list of message objects (so assistant `tool_calls`,
    /// `tool` messages, list contents work), `tools` an optional JSON list. Keys whose value is `null` are
    /// dropped from each message, as transformers does. Object keys reach the template (and `tojson`) in
    /// the order `serde_json::Map` iterates them: sorted, unless serde_json's `preserve_order` feature is
    /// on, in which case they keep the order they were given in, as Python dicts do.
    pub fn render_chat_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.render_chat_at(messages, tools, add_generation_prompt, now)
    }

    /// Render with `strftime_now` reading `now_unix` (seconds since the epoch, UTC).
    pub(crate) fn render_chat_at(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        now_unix: i64,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .unwrap_or(FALLBACK_CHATML_TEMPLATE);
        let origin = match (&self.chat_template, &self.chat_template_origin) {
            (None, _) => "the built-in ChatML fallback",
            (Some(_), Some(o)) => o.as_str(),
            (Some(_), None) => "shipped with the model",
        };
        chat_template::render(
            template,
            origin,
            &chat_template::RenderInput {
                messages,
                tools,
                add_generation_prompt,
                bos_token: self.bos_token.as_deref(),
                eos_token: self.eos_token.as_deref(),
                now_unix,
            },
        )
    }
}

/// Jinja rendering of Hugging Face chat templates with minijinja, matching transformers' environment.
pub(crate) mod chat_template {
    use std::fmt::Write as _;

    use minijinja::value::{Kwargs, Rest, ValueKind};
    use minijinja::{AutoEscape, Environment, ErrorKind, Value};

    use crate::{Error, Result};

    pub struct RenderInput<'a> {
        pub messages: &'a serde_json::Value,
        pub tools: Option<&'a serde_json::Value>,
        pub add_generation_prompt: bool,
        pub bos_token: Option<&'a str>,
        pub eos_token: Option<&'a str>,
        pub now_unix: i64,
    }

    /// Steps (minijinja fuel) a template may take for one rendering: a thousand-turn chat through the most
    /// elaborate templates shipped takes well under a million.
    pub const MAX_FUEL: u64 = 20_000_000;
    /// Most text a rendering may produce (a million-token context is about 4 MiB of text).
    pub const MAX_OUTPUT_BYTES: usize = 16 << 20;
    /// Most memory a rendering may hold (values, strings built on the way).
    pub const MAX_MEMORY_BYTES: usize = 128 << 20;
    /// Wall-clock limit of one rendering.
    pub const MAX_TIME: std::time::Duration = std::time::Duration::from_secs(10);

    /// Templates that already went over a limit (by hash): refused at once, so a hostile template costs
    /// its budget only once.
    static REFUSED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

    fn template_hash(t: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        t.hash(&mut h);
        h.finish()
    }

    /// Render `template` (which came from `origin`, named in errors) for `input`, within the limits above:
    /// a template that loops too long, writes too much or holds too much memory is an error, never a hang
    /// or an abort.
    pub fn render(template: &str, origin: &str, input: &RenderInput<'_>) -> Result<String> {
        let key = template_hash(template);
        let refused = |why: &str| {
            Error::Template(format!(
                "{origin}: stopped, {why}; this template cannot be used (fix or replace it)"
            ))
        };
        let known_bad = match REFUSED.lock() {
            Ok(v) => v.contains(&key),
            Err(p) => p.into_inner().contains(&key),
        };
        if known_bad {
            return Err(refused("it went over its limits before"));
        }
        let owned = OwnedInput {
            template: template.to_owned(),
            messages: input.messages.clone(),
            tools: input.tools.cloned(),
            add_generation_prompt: input.add_generation_prompt,
            bos_token: input.bos_token.map(str::to_owned),
            eos_token: input.eos_token.map(str::to_owned),
            now_unix: input.now_unix,
        };
        let res =
            crate::bounded::run_bounded("quant-template", MAX_MEMORY_BYTES, MAX_TIME, move || {
                owned.render()
            });
        let remember = || match REFUSED.lock() {
            Ok(mut v) => v.push(key),
            Err(p) => p.into_inner().push(key),
        };
        match res {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(RenderError::Fuel)) => {
                remember();
                Err(refused(&format!("it ran more than {MAX_FUEL} steps")))
            }
            Ok(Err(RenderError::Output)) => {
                remember();
                Err(refused(&format!(
                    "it wrote more than {} MiB",
                    MAX_OUTPUT_BYTES >> 20
                )))
            }
            Ok(Err(RenderError::Other(e))) => Err(match e {
                Error::Template(m) => Error::Template(format!("{origin}: {m}")),
                e => e,
            }),
            Err(b) => {
                remember();
                Err(refused(&b.to_string()))
            }
        }
    }

    /// What one rendering needs, owned (it runs on its own thread).
    struct OwnedInput {
        template: String,
        messages: serde_json::Value,
        tools: Option<serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: Option<String>,
        eos_token: Option<String>,
        now_unix: i64,
    }

    enum RenderError {
        Fuel,
        Output,
        Other(Error),
    }

    impl OwnedInput {
        fn render(&self) -> std::result::Result<String, RenderError> {
            let input = RenderInput {
                messages: &self.messages,
                tools: self.tools.as_ref(),
                add_generation_prompt: self.add_generation_prompt,
                bos_token: self.bos_token.as_deref(),
                eos_token: self.eos_token.as_deref(),
                now_unix: self.now_unix,
            };
            render_unbounded(&self.template, &input)
        }
    }

    /// Text written by a rendering, up to [`MAX_OUTPUT_BYTES`].
    struct CappedOutput {
        buf: Vec<u8>,
        over: bool,
    }

    impl std::io::Write for CappedOutput {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.buf.len() + b.len() > MAX_OUTPUT_BYTES {
                self.over = true;
                return Err(std::io::Error::other("output cap"));
            }
            self.buf.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn render_unbounded(
        template: &str,
        input: &RenderInput<'_>,
    ) -> std::result::Result<String, RenderError> {
        let source = rewrite_generation_tags(template);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            if value.is_undefined() {
                return Ok(());
            }
            if let Some(s) = value.as_str() {
                return out
                    .write_str(s)
                    .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure));
            }
            let text = py_str(value);
            out.write_str(&text)
                .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
        });
        env.add_filter("tojson", tojson_filter);
        env.add_function(
            "raise_exception",
            |msg: Value| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    py_str(&msg),
                ))
            },
        );
        let now = input.now_unix;
        env.add_function("strftime_now", move |fmt: String| -> String {
            strftime(&fmt, now)
        });

        env.set_fuel(Some(MAX_FUEL));
        let tmpl = env
            .template_from_str(&source)
            .map_err(|e| RenderError::Other(Error::Template(format!("cannot parse it: {e}"))))?;

        let messages = normalize_messages(input.messages).map_err(RenderError::Other)?;
        let tools = match input.tools {
            None | Some(serde_json::Value::Null) => Value::from(()),
            Some(t @ serde_json::Value::Array(_)) => Value::from_serialize(t),
            Some(_) => {
                return Err(RenderError::Other(Error::Template(
                    "tools must be a JSON list".into(),
                )))
            }
        };
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", messages),
            ("tools", tools),
            ("documents", Value::from(())),
            (
                "add_generation_prompt",
                Value::from(input.add_generation_prompt),
            ),
        ];
        if let Some(b) = input.bos_token {
            ctx.push(("bos_token", Value::from(b)));
        }
        if let Some(e) = input.eos_token {
            ctx.push(("eos_token", Value::from(e)));
        }
        let ctx: Value = ctx.into_iter().collect();
        let mut out = CappedOutput {
            buf: Vec::new(),
            over: false,
        };
        let res = tmpl.render_captured_to(ctx, &mut out).map(|_| ());
        match res {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| RenderError::Other(Error::Template("it wrote invalid UTF-8".into()))),
            Err(_) if out.over => Err(RenderError::Output),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(RenderError::Fuel),
            Err(e) => Err(RenderError::Other(Error::Template(e.to_string()))),
        }
    }

    /// Messages as transformers hands them to the template: a list of objects with `null` values dropped,
    /// and `reasoning_content`/`thinking` aliased from whichever of them (or `reasoning`) is set.
    fn normalize_messages(messages: &serde_json::Value) -> Result<Value> {
        let list = messages
            .as_array()
            .ok_or_else(|| Error::Template("messages must be a JSON list".into()))?;
        let mut out = Vec::with_capacity(list.len());
        for m in list {
            let obj = m.as_object().ok_or_else(|| {
                Error::Template(format!("a chat message must be an object, got {m}"))
            })?;
            // `{"thinking": r, **message, "reasoning_content": r}` over the message without its null keys.
            let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
            let reasoning = ["reasoning_content", "thinking", "reasoning"]
                .iter()
                .find_map(|k| present(k));
            let mut pairs: Vec<(String, Value)> = Vec::new();
            if let Some(r) = reasoning {
                pairs.push((
                    "thinking".into(),
                    Value::from_serialize(present("thinking").unwrap_or(r)),
                ));
            }
            for (k, v) in obj {
                if v.is_null() || (reasoning.is_some() && k == "thinking") {
                    continue;
                }
                let v = match (k.as_str(), reasoning) {
                    ("reasoning_content", Some(r)) => Value::from_serialize(r),
                    _ => Value::from_serialize(v),
                };
                pairs.push((k.clone(), v));
            }
            if let Some(r) = reasoning {
                if present("reasoning_content").is_none() {
                    pairs.push(("reasoning_content".into(), Value::from_serialize(r)));
                }
            }
            out.push(pairs.into_iter().collect::<Value>());
        }
        Ok(Value::from(out))
    }

    /// `{% generation %}`/`{% endgeneration %}` (transformers' assistant-mask extension) become a block that
    /// always renders its body, with the same whitespace control.
    pub fn rewrite_generation_tags(src: &str) -> String {
        let mut out = String::with_capacity(src.len());
        let mut rest = src;
        while let Some(i) = rest.find("{%") {
            out.push_str(&rest[..i]);
            let tag = &rest[i..];
            let Some(end) = tag.find("%}") else {
                out.push_str(tag);
                return out;
            };
            let inner = &tag[2..end];
            let (lead, body) = match inner.strip_prefix(['-', '+']) {
                Some(b) => (&inner[..1], b),
                None => ("", inner),
            };
            let (body, trail) = match body.strip_suffix(['-', '+']) {
                Some(b) => (b, &body[body.len() - 1..]),
                None => (body, ""),
            };
            let replacement = match body.trim() {
                "generation" => Some("if true"),
                "endgeneration" => Some("endif"),
                _ => None,
            };
            match replacement {
                Some(r) => {
                    let _ = write!(out, "{{%{lead} {r} {trail}%}}");
                }
                None => out.push_str(&tag[..end + 2]),
            }
            rest = &tag[end + 2..];
        }
        out.push_str(rest);
        out
    }

    /// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
    fn tojson_filter(
        value: &Value,
        args: Rest<Value>,
        kwargs: Kwargs,
    ) -> std::result::Result<Value, minijinja::Error> {
        let mut opts = JsonOpts::default();
        let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
        if args.len() > names.len() {
            return Err(minijinja::Error::from(ErrorKind::TooManyArguments));
        }
        let mut given: Vec<(&str, Value)> =
            names.iter().copied().zip(args.iter().cloned()).collect();
        for n in names {
            if kwargs.has(n) {
                given.push((n, kwargs.get::<Value>(n)?));
            }
        }
        kwargs.assert_all_used()?;
        for (name, v) in given {
            match name {
                "ensure_ascii" => opts.ensure_ascii = v.is_true(),
                "sort_keys" => opts.sort_keys = v.is_true(),
                "indent" => {
                    opts.indent = if v.is_none() || v.is_undefined() {
                        None
                    } else if let Some(s) = v.as_str() {
                        Some(s.to_string())
                    } else {
                        let n = v.as_i64().ok_or_else(|| {
                            minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                "tojson: indent must be an integer",
                            )
                        })?;
                        Some(" ".repeat(n.clamp(0, 64) as usize))
                    }
                }
                "separators" if !(v.is_none() || v.is_undefined()) => {
                    let items: Vec<Value> = v.try_iter()?.collect();
                    match items.as_slice() {
                        [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                            opts.separators = Some((
                                a.as_str().unwrap_or_default().to_string(),
                                b.as_str().unwrap_or_default().to_string(),
                            ));
                        }
                        _ => {
                            return Err(minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                "tojson: separators must be two strings",
                            ))
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = String::new();
        write_json(&mut out, value, &opts, 0)?;
        Ok(Value::from(out))
    }

    #[derive(Default)]
    struct JsonOpts {
        ensure_ascii: bool,
        indent: Option<String>,
        separators: Option<(String, String)>,
        sort_keys: bool,
    }

    impl JsonOpts {
        fn item_sep(&self) -> &str {
            match (&self.separators, &self.indent) {
                (Some((a, _)), _) => a,
                (None, Some(_)) => ",",
                (None, None) => ", ",
            }
        }
        fn key_sep(&self) -> &str {
            match &self.separators {
                Some((_, b)) => b,
                None => ": ",
            }
        }
    }

    fn newline_indent(out: &mut String, opts: &JsonOpts, level: usize) {
        if let Some(ind) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    /// Python's `json.dumps` on a template value.
    fn write_json(
        out: &mut String,
        v: &Value,
        opts: &JsonOpts,
        level: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        if level > 512 {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: nesting too deep",
            ));
        }
        match v.kind() {
            ValueKind::Undefined => {
                return Err(minijinja::Error::new(
                    ErrorKind::UndefinedError,
                    "tojson: Object of type Undefined is not JSON serializable",
                ))
            }
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&py_number(v)),
            ValueKind::String => {
                json_string(out, v.as_str().unwrap_or_default(), opts.ensure_ascii)
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(opts.item_sep());
                    }
                    newline_indent(out, opts, level + 1);
                    write_json(out, item, opts, level + 1)?;
                }
                newline_indent(out, opts, level);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for k in v.try_iter()? {
                    let val = v.get_item(&k)?;
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
                        ValueKind::None => "null".to_string(),
                        ValueKind::Number => py_number(&k),
                        _ => {
                            return Err(minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                "tojson: keys must be str, int, float, bool or None",
                            ))
                        }
                    };
                    entries.push((key, val));
                }
                if opts.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (k, val)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(opts.item_sep());
                    }
                    newline_indent(out, opts, level + 1);
                    json_string(out, k, opts.ensure_ascii);
                    out.push_str(opts.key_sep());
                    write_json(out, val, opts, level + 1)?;
                }
                newline_indent(out, opts, level);
                out.push('}');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a {} is not JSON serializable", v.kind()),
                ))
            }
        }
        Ok(())
    }

    /// A JSON string literal as Python's `json` module writes it.
    fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    /// A number as Python's `repr` writes it (`1.0`, `1e-05`, `1e+16`, `inf`).
    fn py_number(v: &Value) -> String {
        if v.is_integer() {
            return v.to_string();
        }
        match f64::try_from(v.clone()) {
            Ok(f) => py_float_repr(f),
            Err(_) => v.to_string(),
        }
    }

    /// Python's `repr(float)`: the shortest round-trip digits, in fixed notation when the decimal exponent is
    /// in `-4..16`, else `d.ddde±XX`. (`json.dumps` writes `NaN`/`Infinity`, which is what we use here too.)
    pub fn py_float_repr(f: f64) -> String {
        if f.is_nan() {
            return "NaN".into();
        }
        if f.is_infinite() {
            return if f > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            };
        }
        if f == 0.0 {
            return if f.is_sign_negative() {
                "-0.0".into()
            } else {
                "0.0".into()
            };
        }
        // `{:e}` gives the shortest round-trip mantissa: "1.2345e-5".
        let sci = format!("{f:e}");
        let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let neg = mant.starts_with('-');
        let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
        let mut s = String::new();
        if neg {
            s.push('-');
        }
        if (-4..16).contains(&exp) {
            if exp < 0 {
                s.push_str("0.");
                for _ in 0..(-exp - 1) {
                    s.push('0');
                }
                s.push_str(&digits);
            } else {
                let int_len = exp as usize + 1;
                if digits.len() <= int_len {
                    s.push_str(&digits);
                    for _ in digits.len()..int_len {
                        s.push('0');
                    }
                    s.push_str(".0");
                } else {
                    s.push_str(&digits[..int_len]);
                    s.push('.');
                    s.push_str(&digits[int_len..]);
                }
            }
        } else {
            s.push_str(&digits[..1]);
            if digits.len() > 1 {
                s.push('.');
                s.push_str(&digits[1..]);
            }
            let _ = write!(s, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
        }
        s
    }

    /// What Jinja2 prints for a value (`str(x)` in Python): `True`, `None`, `1.0`, `['a', 1]`, `{'k': 'v'}`.
    pub fn py_str(v: &Value) -> String {
        match v.kind() {
            ValueKind::String => v.as_str().unwrap_or_default().to_string(),
            ValueKind::Undefined => String::new(),
            _ => py_repr(v, 0),
        }
    }

    fn py_repr(v: &Value, depth: usize) -> String {
        if depth > 64 {
            return "...".into();
        }
        match v.kind() {
            ValueKind::None | ValueKind::Undefined => "None".into(),
            ValueKind::Bool => (if v.is_true() { "True" } else { "False" }).into(),
            ValueKind::Number => {
                if v.is_integer() {
                    v.to_string()
                } else {
                    match f64::try_from(v.clone()) {
                        Ok(f) if f.is_nan() => "nan".into(),
                        Ok(f) if f.is_infinite() => (if f > 0.0 { "inf" } else { "-inf" }).into(),
                        Ok(f) => py_float_repr(f),
                        Err(_) => v.to_string(),
                    }
                }
            }
            ValueKind::String => py_str_repr(v.as_str().unwrap_or_default()),
            ValueKind::Seq => {
                let items: Vec<String> = v
                    .try_iter()
                    .map(|it| it.map(|x| py_repr(&x, depth + 1)).collect())
                    .unwrap_or_default();
                format!("[{}]", items.join(", "))
            }
            ValueKind::Map => {
                let mut parts = Vec::new();
                if let Ok(keys) = v.try_iter() {
                    for k in keys {
                        let val = v.get_item(&k).unwrap_or_default();
                        parts.push(format!(
                            "{}: {}",
                            py_repr(&k, depth + 1),
                            py_repr(&val, depth + 1)
                        ));
                    }
                }
                format!("{{{}}}", parts.join(", "))
            }
            _ => v.to_string(),
        }
    }

    /// Python's `repr(str)`.
    fn py_str_repr(s: &str) -> String {
        let quote = if s.contains('\'') && !s.contains('"') {
            '"'
        } else {
            '\''
        };
        let mut out = String::with_capacity(s.len() + 2);
        out.push(quote);
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c == quote => {
                    out.push('\\');
                    out.push(c);
                }
                c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c => out.push(c),
            }
        }
        out.push(quote);
        out
    }

    /// A UTC calendar time.
    struct Civil {
        year: i64,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
        /// 0 = Monday.
        weekday: u32,
        /// 1-based.
        yday: u32,
    }

    fn civil(unix: i64) -> Civil {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400) as u32;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUM[month as usize - 1] + day + u32::from(leap && month > 2);
        Civil {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            weekday: (days + 3).rem_euclid(7) as u32,
            yday,
        }
    }

    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];

    /// C's `strftime` in the C locale for the common conversions (`%d %b %Y %B %m %y %H %M %S %I %p %a %A
    /// %j %e %%`, and glibc's `-` no-padding flag). Unknown conversions are copied as written.
    pub fn strftime(fmt: &str, unix: i64) -> String {
        let t = civil(unix);
        let mut out = String::new();
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let no_pad = chars.peek() == Some(&'-');
            if no_pad {
                chars.next();
            }
            let Some(conv) = chars.next() else {
                out.push('%');
                break;
            };
            let num = |out: &mut String, v: i64, width: usize| {
                if no_pad {
                    let _ = write!(out, "{v}");
                } else {
                    let _ = write!(out, "{v:0width$}");
                }
            };
            match conv {
                'd' => num(&mut out, t.day.into(), 2),
                'e' => {
                    if no_pad {
                        let _ = write!(out, "{}", t.day);
                    } else {
                        let _ = write!(out, "{:>2}", t.day);
                    }
                }
                'm' => num(&mut out, t.month.into(), 2),
                'Y' => {
                    let _ = write!(out, "{}", t.year);
                }
                'y' => num(&mut out, t.year.rem_euclid(100), 2),
                'H' => num(&mut out, t.hour.into(), 2),
                'I' => num(&mut out, ((t.hour + 11) % 12 + 1).into(), 2),
                'M' => num(&mut out, t.minute.into(), 2),
                'S' => num(&mut out, t.second.into(), 2),
                'j' => num(&mut out, t.yday.into(), 3),
                'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
                'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
                'B' => out.push_str(MONTHS[t.month as usize - 1]),
                'a' => out.push_str(&DAYS[t.weekday as usize][..3]),
                'A' => out.push_str(DAYS[t.weekday as usize]),
                'u' => num(&mut out, (t.weekday + 1).into(), 1),
                'w' => num(&mut out, ((t.weekday + 1) % 7).into(), 1),
                'F' => {
                    let _ = write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day);
                }
                'T' => {
                    let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
                }
                '%' => out.push('%'),
                other => {
                    out.push('%');
                    if no_pad {
                        out.push('-');
                    }
                    out.push(other);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::chat_template::{
        py_float_repr, render, rewrite_generation_tags, strftime, RenderInput,
    };
    use super::*;

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/templates")
    }

    fn read_json(name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture");
        serde_json::from_str(&text).expect("fixture json")
    }

    /// Render `template` for one user turn, timed.
    fn render_hostile(template: &str) -> (Result<String>, std::time::Duration) {
        let tok = tiny_tokenizer(Some(template));
        let t = std::time::Instant::now();
        let r = tok.render_chat(&[ChatMessage::new("user", "hi")], true);
        (r, t.elapsed())
    }

    #[test]
    fn a_template_that_loops_for_ever_is_stopped_by_its_fuel() {
        // Ten billion iterations, each writing ten bytes.
        let (r, took) = render_hostile(
            "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
        );
        let e = r.expect_err("must fail").to_string();
        assert!(e.contains("chat template: test template: stopped"), "{e}");
        assert!(e.contains("MiB") || e.contains("steps"), "{e}");
        assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    }

    #[test]
    fn a_template_that_doubles_a_string_is_stopped_by_its_memory_budget() {
        let (r, took) = render_hostile(
            "{% set ns = namespace(s=\"x\") %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        );
        let e = r.expect_err("must fail").to_string();
        assert!(e.contains("more than 128 MiB of memory"), "{e}");
        assert!(took < std::time::Duration::from_secs(30), "{took:?}");
        // Refused at once the second time, without rendering again.
        let (r, took) = render_hostile(
            "{% set ns = namespace(s=\"x\") %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        );
        assert!(r.expect_err("must fail").to_string().contains("before"));
        assert!(took < std::time::Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn a_template_that_writes_too_much_is_stopped_at_the_output_cap() {
        // 100 MB of output in 1000 steps: neither fuel nor memory stops it first.
        let (r, _) = render_hostile("{% for i in range(1000) %}{{ 'y' * 100000 }}{% endfor %}");
        let e = r.expect_err("must fail").to_string();
        assert!(e.contains("wrote more than 16 MiB"), "{e}");
    }

    #[test]
    fn a_long_chat_renders_within_the_limits() {
        let tok = tiny_tokenizer(Some(FALLBACK_CHATML_TEMPLATE));
        let msgs: Vec<ChatMessage> = (0..2000)
            .map(|i| {
                ChatMessage::new(
                    if i % 2 == 0 { "user" } else { "assistant" },
                    "word ".repeat(200),
                )
            })
            .collect();
        let text = tok.render_chat(&msgs, true).expect("render");
        assert!(text.len() > 2000 * 1000);
    }

    fn tiny_tokenizer(template: Option<&str>) -> TextTokenizer {
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab([("<unk>".to_string(), 0u32)].into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .expect("wordlevel");
        TextTokenizer {
            inner: tokenizers::Tokenizer::new(model),
            bos_token_id: None,
            eos_token_ids: vec![],
            add_bos: false,
            chat_template: template.map(str::to_string),
            chat_template_origin: Some("test template".into()),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        }
    }

    /// Every case of tests/fixtures/templates/cases.json equals what transformers rendered (expected.json).
    #[test]
    fn templates_render_like_transformers() {
        let cases = read_json("cases.json");
        let expected = read_json("expected.json");
        let now = cases["now_unix"].as_i64().expect("now_unix");
        let list = cases["cases"].as_array().expect("cases");
        assert!(list.len() >= 25);
        let mut failures = Vec::new();
        for case in list {
            let name = case["name"].as_str().expect("name");
            let template = match case["template"].as_str() {
                Some(file) => std::fs::read_to_string(fixtures().join(file)).expect("template"),
                None => FALLBACK_CHATML_TEMPLATE.to_string(),
            };
            let tools = (!case["tools"].is_null()).then(|| &case["tools"]);
            let got = render(
                &template,
                name,
                &RenderInput {
                    messages: &case["messages"],
                    tools,
                    add_generation_prompt: case["add_generation_prompt"].as_bool().expect("flag"),
                    bos_token: case["bos_token"].as_str(),
                    eos_token: case["eos_token"].as_str(),
                    now_unix: now,
                },
            );
            let want = &expected[name];
            match (got, want["text"].as_str(), want["error"].as_str()) {
                (Ok(text), Some(w), _) if text == w => {}
                (Err(e), None, Some(msg)) if e.to_string().contains(msg) => {}
                (got, _, _) => failures.push(format!("{name}:\n got: {got:?}\nwant: {want}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    #[test]
    fn render_chat_uses_the_tokenizers_template_and_tokens() {
        let tok = tiny_tokenizer(Some("{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}{{ eos_token }}"));
        let msgs = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "yo"),
        ];
        assert_eq!(
            tok.render_chat(&msgs, false).expect("render"),
            "<s>user=hi;assistant=yo;</s>"
        );
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let tok = tiny_tokenizer(Some("{{ tools | length }} {{ tools[0].function.name }}"));
        assert_eq!(
            tok.render_chat_with_tools(&msgs, &tools, true)
                .expect("render"),
            "1 f"
        );
        assert!(tok
            .render_chat_with_tools(&msgs, &serde_json::json!({"a": 1}), true)
            .is_err());
    }

    #[test]
    fn missing_template_falls_back_to_chatml() {
        let tok = tiny_tokenizer(None);
        let msgs = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "U"),
        ];
        assert_eq!(
            tok.render_chat(&msgs, true).expect("render"),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_bad_templates_are_errors() {
        let msgs = [ChatMessage::new("user", "x")];
        let tok = tiny_tokenizer(Some("{{ raise_exception('roles must alternate') }}"));
        let err = tok.render_chat(&msgs, false).expect_err("raise");
        assert!(err.to_string().contains("roles must alternate"), "{err}");
        let tok = tiny_tokenizer(Some("{% for m in messages %}"));
        assert!(tok.render_chat(&msgs, false).is_err());
        let tok = tiny_tokenizer(Some("{{ messages[0].content.nope() }}"));
        assert!(tok.render_chat(&msgs, false).is_err());
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation %}b{% endgeneration -%} c{%raw%}"),
            "a{%- if true %}b{% endif -%} c{%raw%}"
        );
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(py_float_repr(f), s);
        }
    }

    #[test]
    fn strftime_matches_c_locale() {
        // 2024-02-29 23:59:58 UTC, a Thursday; 1969-12-31 is before the epoch.
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %a %j %-m/%e %%", 1_709_251_198),
            "29 Feb 2024 23:59:58 Thu 060 2/29 %"
        );
        assert_eq!(
            strftime("%Y-%m-%d %A %B %I %p", -86_400),
            "1969-12-31 Wednesday December 12 AM"
        );
    }
}
