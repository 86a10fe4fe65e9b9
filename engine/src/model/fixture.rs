//! Tiny, deterministic model folders for tests: a Hugging Face folder (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json, generation_config.json) that transformers loads as it loads a
//! real Llama / Mistral / Qwen2 checkpoint.
//!
//! Weights are pseudo-random (a SplitMix64 stream, uniform with a chosen standard deviation, no
//! transcendental functions, so the bytes are the same on every platform); the tokenizer is a real
//! byte-level BPE whose merges are learned here, deterministically, from a few KB of English, with
//! ChatML's special tokens. The same [`FixtureSpec`] always produces the same bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use super::config::{Arch, ModelConfig, RopeScaling};
use crate::codecs::GgmlType;
use crate::tensor::{Bytes, TensorRef};
use crate::{Error, Result};

/// The stored type of a fixture's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixtureDtype {
    F32,
    F16,
    BF16,
}

impl FixtureDtype {
    /// safetensors' dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FixtureDtype::F32 => "F32",
            FixtureDtype::F16 => "F16",
            FixtureDtype::BF16 => "BF16",
        }
    }

    /// config.json's `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            FixtureDtype::F32 => "float32",
            FixtureDtype::F16 => "float16",
            FixtureDtype::BF16 => "bfloat16",
        }
    }

    /// The matching ggml type.
    pub fn ggml_type(self) -> GgmlType {
        match self {
            FixtureDtype::F32 => GgmlType::F32,
            FixtureDtype::F16 => GgmlType::F16,
            FixtureDtype::BF16 => GgmlType::BF16,
        }
    }

    /// `v` rounded to this type (round to nearest even), as f32.
    fn round(self, v: f32) -> f32 {
        match self {
            FixtureDtype::F32 => v,
            FixtureDtype::F16 => half::f16::from_f32(v).to_f32(),
            FixtureDtype::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    /// Little-endian bytes of `v` (already rounded) in this type.
    fn push_bytes(self, v: f32, out: &mut Vec<u8>) {
        match self {
            FixtureDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            FixtureDtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            FixtureDtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }
}

/// What tiny model to build. The vocabulary comes from the fixture tokenizer ([`FIXTURE_VOCAB`] tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct FixtureSpec {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tie_embeddings: bool,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// Llama's `attention_bias` (q/k/v/o biases). Qwen2 always has q/k/v biases, whatever this says.
    pub attention_bias: bool,
    pub dtype: FixtureDtype,
    pub seed: u64,
}

/// Size of the fixture tokenizer's vocabulary (and of every fixture model's embedding).
pub const FIXTURE_VOCAB: usize = 384;
/// `<|endoftext|>`
pub const ENDOFTEXT_ID: u32 = 0;
/// `<|im_start|>`
pub const IM_START_ID: u32 = 1;
/// `<|im_end|>` (the end-of-turn / EOS token)
pub const IM_END_ID: u32 = 2;
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The ChatML template the fixtures ship.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl FixtureSpec {
    /// Llama with tied embeddings and grouped-query attention (4 heads over 2 KV heads).
    pub fn tiny_llama() -> Self {
        Self {
            arch: Arch::Llama,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            tie_embeddings: true,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            dtype: FixtureDtype::F32,
            seed: 1,
        }
    }

    /// Qwen2: q/k/v biases, untied head, rms eps 1e-6.
    pub fn tiny_qwen2() -> Self {
        Self {
            arch: Arch::Qwen2,
            tie_embeddings: false,
            rope_theta: 1_000_000.0,
            seed: 2,
            ..Self::tiny_llama()
        }
    }

    /// Mistral: untied head, multi-query attention (one KV head).
    pub fn tiny_mistral() -> Self {
        Self {
            arch: Arch::Mistral,
            kv_heads: 1,
            tie_embeddings: false,
            seed: 3,
            ..Self::tiny_llama()
        }
    }

    /// Llama 3.1-style RoPE scaling, untied head. The original context (64) is chosen so that the head's
    /// frequencies fall in all three bands (kept, smoothed, divided).
    pub fn tiny_llama3_rope() -> Self {
        Self {
            tie_embeddings: false,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
            seed: 4,
            ..Self::tiny_llama()
        }
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn rms_norm_eps(&self) -> f32 {
        match self.arch {
            Arch::Qwen2 => 1e-6,
            Arch::Llama | Arch::Mistral => 1e-5,
        }
    }

    fn has_qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2 || self.attention_bias
    }

    fn has_o_bias(&self) -> bool {
        self.arch == Arch::Llama && self.attention_bias
    }

    fn max_positions(&self) -> usize {
        match self.rope_scaling {
            Some(RopeScaling::Llama3 {
                factor,
                original_max_position_embeddings,
                ..
            }) => (original_max_position_embeddings as f32 * factor) as usize,
            _ => 512,
        }
    }

    /// The [`ModelConfig`] a reader should find in this fixture's config.json.
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: self.arch,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim(),
            vocab_size: FIXTURE_VOCAB,
            rms_norm_eps: self.rms_norm_eps(),
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling,
            max_position_embeddings: self.max_positions(),
            tie_word_embeddings: self.tie_embeddings,
            attention_bias: self.has_qkv_bias(),
            torch_dtype: Some(self.dtype.torch_name().to_string()),
            rope_freq_factors: None,
        }
    }

    fn check(&self) -> Result<()> {
        let ok = self.hidden > 0
            && self.heads > 0
            && self.kv_heads > 0
            && self.layers > 0
            && self.intermediate > 0
            && self.hidden.is_multiple_of(self.heads)
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim().is_multiple_of(2);
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "fixture spec is inconsistent: {self:?}"
            )))
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Weights

/// SplitMix64: tiny, portable, deterministic.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }
}

/// One tensor of a fixture: Hugging Face name, shape, values (already rounded to the stored type).
#[derive(Clone, Debug)]
pub struct FixtureTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// The fixture's tensors, in a fixed order, values rounded to `spec.dtype`.
pub fn fixture_tensors(spec: &FixtureSpec) -> Result<Vec<FixtureTensor>> {
    spec.check()?;
    let (h, i, hd) = (spec.hidden, spec.intermediate, spec.head_dim());
    let (q_rows, kv_rows) = (spec.heads * hd, spec.kv_heads * hd);
    let mut rng = SplitMix(spec.seed.wrapping_mul(0xD134_2543_DE82_EF95) ^ 0x5EED);
    let mut out = Vec::new();
    // Uniform on [-a, a) has standard deviation a/√3.
    let mut add = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
        let a = std * 3f32.sqrt();
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|_| spec.dtype.round(mean + a * rng.uniform()))
            .collect();
        out.push(FixtureTensor {
            name,
            shape,
            values,
        });
    };
    let w = 0.1;
    add(
        "model.embed_tokens.weight".into(),
        vec![FIXTURE_VOCAB, h],
        0.0,
        w,
    );
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 1.0, 0.1);
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q_rows, h],
            0.0,
            w,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_rows, h],
            0.0,
            w,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_rows, h],
            0.0,
            w,
        );
        if spec.has_qkv_bias() {
            add(format!("{p}.self_attn.q_proj.bias"), vec![q_rows], 0.0, 0.2);
            add(
                format!("{p}.self_attn.k_proj.bias"),
                vec![kv_rows],
                0.0,
                0.2,
            );
            add(
                format!("{p}.self_attn.v_proj.bias"),
                vec![kv_rows],
                0.0,
                0.2,
            );
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_rows],
            0.0,
            w,
        );
        if spec.has_o_bias() {
            add(format!("{p}.self_attn.o_proj.bias"), vec![h], 0.0, 0.1);
        }
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            0.1,
        );
        add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], 0.0, w);
        add(format!("{p}.mlp.up_proj.weight"), vec![i, h], 0.0, w);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i], 0.0, w);
    }
    add("model.norm.weight".into(), vec![h], 1.0, 0.1);
    if !spec.tie_embeddings {
        add("lm_head.weight".into(), vec![FIXTURE_VOCAB, h], 0.0, w);
    }
    Ok(out)
}

/// The fixture's tensors as owned [`TensorRef`]s in their stored type, by name (what a reader of the
/// written folder would map).
pub fn fixture_tensor_refs(spec: &FixtureSpec) -> Result<BTreeMap<String, TensorRef>> {
    let mut map = BTreeMap::new();
    for t in fixture_tensors(spec)? {
        let mut bytes = Vec::with_capacity(t.values.len() * 4);
        for &v in &t.values {
            spec.dtype.push_bytes(v, &mut bytes);
        }
        let r = TensorRef::new(
            t.name.clone(),
            t.shape,
            spec.dtype.ggml_type(),
            Bytes::owned(bytes),
        )?;
        map.insert(t.name, r);
    }
    Ok(map)
}

fn safetensors_bytes(spec: &FixtureSpec, tensors: &[FixtureTensor]) -> Vec<u8> {
    // Sorted by name, as safetensors' own writer orders same-dtype tensors.
    let mut sorted: Vec<&FixtureTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data = Vec::new();
    for t in sorted {
        let start = data.len();
        for &v in &t.values {
            spec.dtype.push_bytes(v, &mut data);
        }
        let shape: Vec<String> = t.shape.iter().map(ToString::to_string).collect();
        let _ = write!(
            header,
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_str(&t.name),
            spec.dtype.safetensors_name(),
            shape.join(","),
            start,
            data.len()
        );
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

// ---------------------------------------------------------------------------------------------------
// Tokenizer

/// Text the fixture tokenizer's merges are learned from (written for this purpose).
const CORPUS: &str = "\
The little lighthouse stood at the end of the harbour wall, and every evening the keeper climbed \
its ninety-one steps to light the lamp. She had done this for thirty years. The town below her \
changed slowly: the bakery became a bookshop, the bookshop became a cafe, and the cafe, one windy \
spring, became a bakery again. The sea did not change at all.

When the fishing boats came home they followed the beam across the water. The keeper liked to \
count them as they passed the rocks: one, two, three, four, five. On a good night there were \
twelve. On a bad night she counted them twice, and then a third time, and waited on the gallery \
with a blanket around her shoulders until the last one was safe inside the wall.

People in the town asked her whether she was lonely up there. She said that she was not. She had \
the radio, the gulls, a shelf of books, and a cat called Pepper who slept in the warm room under \
the lamp. She had the weather, which was never the same two days running, and the stars, which \
were almost always the same, and that was a comfort of a different kind.

In the winter storms the waves broke over the wall and the spray reached the windows of the lamp \
room. The whole tower hummed in the wind. Those were the nights she liked best, though she would \
never have said so to anyone in the town. She made tea, checked the lamp, wrote the time and the \
weather in the log book, and listened to the sea arguing with the stones.

One morning a letter arrived to say that the light would be made automatic. A machine would turn \
the lamp on at dusk and off at dawn, and a sensor would tell an office in the city if anything \
went wrong. The keeper read the letter twice, folded it, and put it under the clock on the \
kitchen shelf. Then she went up the ninety-one steps and cleaned the glass, as she did every \
morning, because the glass did not know about the letter.

The engineers came in the spring. They were polite young people with laptops and cables, and \
they asked her a great many questions about the lamp, the weather and the boats. She answered all \
of them. When they had finished, the lamp turned itself on at dusk, exactly on time, and the \
engineers cheered. The keeper watched the beam sweep across the harbour and said nothing.

She still lives in the cottage at the foot of the tower. Each evening she walks to the end of the \
wall, counts the boats as they come home, and looks up at the light. It has never once been late. \
Sometimes, she admits, she wishes it would be, just by a minute, so that somebody would have to \
climb the steps and see to it.

Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 -1 +2 = 50% (a) [b] {c} <d> #e @f & | ~ ^ $ \
* / \\ \" ' ` ; : ! ? , . _
Other languages and marks: café, naïve, façade, déjà vu, Straße, smörgåsbord, señor, 東京, こんにちは, \
Привет, 안녕하세요, emoji 🙂 and 🚀 — dashes – and “quotes” … done.
def add(a, b):
    return a + b
for i in range(10): print(i)
";

/// GPT-2's byte ⇄ printable-character table: byte `b` is written as `BYTE_CHARS[b]`.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(256 + extra).unwrap_or('?');
                extra += 1;
                c
            }
        })
        .collect()
}

/// BPE merges in rank order.
type Merges = Vec<(String, String)>;

/// Learn byte-level BPE merges from [`CORPUS`]: `(vocab in id order, merges in rank order)`.
fn learn_bpe() -> Result<(Vec<String>, Merges)> {
    let mut vocab: Vec<String> = SPECIALS.iter().map(|s| (*s).to_string()).collect();
    let mut ids: HashMap<String, u32> = HashMap::new();
    for c in byte_chars() {
        ids.insert(c.to_string(), vocab.len() as u32);
        vocab.push(c.to_string());
    }
    // Words as the byte-level pre-tokenizer splits them.
    let bl = ByteLevel::new(false, true, true);
    let mut pts = PreTokenizedString::from(CORPUS);
    bl.pre_tokenize(&mut pts)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (w, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(w.to_string()).or_default() += 1;
    }
    let mut words: Vec<(Vec<u32>, u64)> = counts
        .iter()
        .map(|(w, &n)| (w.chars().map(|c| ids[&c.to_string()]).collect(), n))
        .collect();
    let mut merges = Vec::new();
    while vocab.len() < FIXTURE_VOCAB {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        // Most frequent pair; ties go to the smallest pair of ids, so the result is deterministic.
        let best = pairs
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(&p, &n)| (p, n));
        let Some(((a, b), n)) = best else { break };
        if n < 2 {
            break;
        }
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let id = match ids.get(&merged) {
            Some(&id) => id,
            None => {
                let id = vocab.len() as u32;
                ids.insert(merged.clone(), id);
                vocab.push(merged);
                id
            }
        };
        merges.push((vocab[a as usize].clone(), vocab[b as usize].clone()));
        for (w, _) in &mut words {
            let mut j = 0;
            let mut out = Vec::with_capacity(w.len());
            while j < w.len() {
                if j + 1 < w.len() && w[j] == a && w[j + 1] == b {
                    out.push(id);
                    j += 2;
                } else {
                    out.push(w[j]);
                    j += 1;
                }
            }
            *w = out;
        }
    }
    if vocab.len() != FIXTURE_VOCAB {
        return Err(Error::Invalid(format!(
            "fixture tokenizer: corpus yields only {} tokens",
            vocab.len()
        )));
    }
    Ok((vocab, merges))
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The fixture's tokenizer.json text.
pub fn fixture_tokenizer_json() -> Result<String> {
    let (vocab, merges) = learn_bpe()?;
    let mut s = String::from("{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": [\n");
    for (i, t) in SPECIALS.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {{\"id\": {i}, \"content\": {}, \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}}{}",
            json_str(t),
            if i + 1 < SPECIALS.len() { "," } else { "" }
        );
    }
    s.push_str("  ],\n  \"normalizer\": null,\n");
    s.push_str("  \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true},\n");
    s.push_str("  \"post_processor\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": false, \"use_regex\": true},\n");
    s.push_str("  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true},\n");
    s.push_str("  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": false,\n    \"byte_fallback\": false,\n    \"ignore_merges\": false,\n    \"vocab\": {\n");
    for (i, t) in vocab.iter().enumerate() {
        let _ = writeln!(
            s,
            "      {}: {i}{}",
            json_str(t),
            if i + 1 < vocab.len() { "," } else { "" }
        );
    }
    s.push_str("    },\n    \"merges\": [\n");
    for (i, (a, b)) in merges.iter().enumerate() {
        let _ = writeln!(
            s,
            "      [{}, {}]{}",
            json_str(a),
            json_str(b),
            if i + 1 < merges.len() { "," } else { "" }
        );
    }
    s.push_str("    ]\n  }\n}\n");
    Ok(s)
}

/// The fixture tokenizer, loaded with the `tokenizers` crate.
pub fn fixture_tokenizer() -> Result<tokenizers::Tokenizer> {
    let json = fixture_tokenizer_json()?;
    json.parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::Tokenizer(format!("fixture tokenizer: {e}")))
}

// ---------------------------------------------------------------------------------------------------
// Folder

/// A JSON object with keys in the given order (values are JSON text), one key per line.
fn json_object(pairs: &[(&str, String)]) -> String {
    let mut s = String::from("{\n");
    for (i, (k, v)) in pairs.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {}: {v}{}",
            json_str(k),
            if i + 1 < pairs.len() { "," } else { "" }
        );
    }
    s.push_str("}\n");
    s
}

fn json_f32(v: f32) -> String {
    // Shortest text that reads back as the same f32, always with a decimal point.
    let s = format!("{v:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

fn config_json(spec: &FixtureSpec) -> String {
    let c = spec.config();
    let rope_scaling = match c.rope_scaling {
        None => "null".to_string(),
        Some(RopeScaling::Linear { factor }) => format!(
            "{{\"rope_type\": \"linear\", \"factor\": {}}}",
            json_f32(factor)
        ),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => format!(
            "{{\"rope_type\": \"llama3\", \"factor\": {}, \"low_freq_factor\": {}, \"high_freq_factor\": {}, \"original_max_position_embeddings\": {original_max_position_embeddings}}}",
            json_f32(factor),
            json_f32(low_freq_factor),
            json_f32(high_freq_factor)
        ),
    };
    let mut pairs: Vec<(&str, String)> = vec![
        (
            "architectures",
            format!("[{}]", json_str(c.arch.hf_class())),
        ),
        ("model_type", json_str(c.arch.model_type())),
        ("hidden_size", c.hidden_size.to_string()),
        ("intermediate_size", c.intermediate_size.to_string()),
        ("num_hidden_layers", c.num_layers.to_string()),
        ("num_attention_heads", c.num_heads.to_string()),
        ("num_key_value_heads", c.num_kv_heads.to_string()),
        ("head_dim", c.head_dim.to_string()),
        ("vocab_size", c.vocab_size.to_string()),
        ("hidden_act", json_str("silu")),
        ("rms_norm_eps", json_f32(c.rms_norm_eps)),
        ("rope_theta", json_f32(c.rope_theta)),
        ("rope_scaling", rope_scaling),
        (
            "max_position_embeddings",
            c.max_position_embeddings.to_string(),
        ),
        ("tie_word_embeddings", c.tie_word_embeddings.to_string()),
        ("initializer_range", "0.02".into()),
        ("attention_dropout", "0.0".into()),
        ("bos_token_id", IM_START_ID.to_string()),
        ("eos_token_id", IM_END_ID.to_string()),
        ("use_cache", "true".into()),
        ("torch_dtype", json_str(spec.dtype.torch_name())),
    ];
    match spec.arch {
        Arch::Llama => {
            pairs.push(("attention_bias", spec.attention_bias.to_string()));
            pairs.push(("mlp_bias", "false".into()));
        }
        Arch::Mistral => pairs.push(("sliding_window", "null".into())),
        Arch::Qwen2 => {
            pairs.push(("use_sliding_window", "false".into()));
            pairs.push(("sliding_window", "null".into()));
            pairs.push(("max_window_layers", spec.layers.to_string()));
        }
    }
    json_object(&pairs)
}

fn tokenizer_config_json() -> String {
    let added: Vec<String> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "\"{i}\": {{\"content\": {}, \"lstrip\": false, \"normalized\": false, \"rstrip\": false, \"single_word\": false, \"special\": true}}",
                json_str(t)
            )
        })
        .collect();
    json_object(&[
        ("add_prefix_space", "false".into()),
        ("added_tokens_decoder", format!("{{{}}}", added.join(", "))),
        (
            "additional_special_tokens",
            format!("[{}, {}]", json_str(SPECIALS[1]), json_str(SPECIALS[2])),
        ),
        ("bos_token", json_str(SPECIALS[1])),
        ("chat_template", json_str(CHATML_TEMPLATE)),
        ("clean_up_tokenization_spaces", "false".into()),
        ("eos_token", json_str(SPECIALS[2])),
        ("model_max_length", "2048".into()),
        ("pad_token", json_str(SPECIALS[2])),
        ("tokenizer_class", json_str("GPT2Tokenizer")),
        ("unk_token", json_str(SPECIALS[0])),
    ])
}

fn generation_config_json() -> String {
    json_object(&[
        ("bos_token_id", IM_START_ID.to_string()),
        ("eos_token_id", IM_END_ID.to_string()),
        ("pad_token_id", IM_END_ID.to_string()),
    ])
}

/// Every file of the fixture folder: `(file name, bytes)`.
pub fn fixture_files(spec: &FixtureSpec) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let tensors = fixture_tensors(spec)?;
    Ok(vec![
        ("config.json", config_json(spec).into_bytes()),
        (
            "generation_config.json",
            generation_config_json().into_bytes(),
        ),
        ("model.safetensors", safetensors_bytes(spec, &tensors)),
        ("tokenizer.json", fixture_tokenizer_json()?.into_bytes()),
        (
            "tokenizer_config.json",
            tokenizer_config_json().into_bytes(),
        ),
    ])
}

/// Write the fixture folder for `spec` into `dir` (created if needed).
pub fn write_fixture(spec: &FixtureSpec, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in fixture_files(spec)? {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The fixtures of the golden tests (`tests/golden/<name>/`), by folder name.
/// Regenerate them with `cargo run -p quant_engine --example regenerate_golden`, then run
/// `tests/golden/make_golden.py`.
pub fn golden_cases() -> Vec<(&'static str, FixtureSpec)> {
    vec![
        // Tied embeddings, grouped-query attention.
        ("llama", FixtureSpec::tiny_llama()),
        // Llama 3.1 RoPE scaling, untied head.
        ("llama3_rope", FixtureSpec::tiny_llama3_rope()),
        // Linear RoPE scaling.
        (
            "llama_linear_rope",
            FixtureSpec {
                rope_scaling: Some(RopeScaling::Linear { factor: 4.0 }),
                tie_embeddings: false,
                seed: 5,
                ..FixtureSpec::tiny_llama()
            },
        ),
        // Multi-query attention.
        ("mistral", FixtureSpec::tiny_mistral()),
        // q/k/v biases.
        ("qwen2", FixtureSpec::tiny_qwen2()),
        // F16 storage; Llama with attention_bias (q/k/v/o biases).
        (
            "llama_bias_f16",
            FixtureSpec {
                attention_bias: true,
                dtype: FixtureDtype::F16,
                seed: 6,
                ..FixtureSpec::tiny_llama()
            },
        ),
        // BF16 storage.
        (
            "qwen2_bf16",
            FixtureSpec {
                dtype: FixtureDtype::BF16,
                seed: 7,
                ..FixtureSpec::tiny_qwen2()
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_tokenizer_round_trips_text() {
        let tok = fixture_tokenizer().expect("tokenizer");
        assert_eq!(tok.get_vocab_size(true), FIXTURE_VOCAB);
        for text in [
            "The keeper counted the boats.",
            "café 東京 🙂 — “quotes”",
            "<|im_start|>user\nhi<|im_end|>\n",
        ] {
            let enc = tok.encode(text, false).expect("encode");
            assert_eq!(tok.decode(enc.get_ids(), false).expect("decode"), text);
        }
        let ids = tok
            .encode("<|im_start|>user<|im_end|>", false)
            .expect("encode");
        assert_eq!(ids.get_ids().first(), Some(&IM_START_ID));
        assert_eq!(ids.get_ids().last(), Some(&IM_END_ID));
        // Merges do their job: common words are single tokens.
        assert!(tok.encode(" the", false).expect("encode").len() == 1);
    }

    #[test]
    fn fixtures_are_deterministic() {
        for spec in [FixtureSpec::tiny_llama(), FixtureSpec::tiny_qwen2()] {
            let a = fixture_files(&spec).expect("files");
            let b = fixture_files(&spec).expect("files");
            assert_eq!(a, b);
        }
        let mut other = FixtureSpec::tiny_llama();
        other.seed = 99;
        let a = fixture_tensors(&FixtureSpec::tiny_llama()).expect("tensors");
        let b = fixture_tensors(&other).expect("tensors");
        assert_ne!(a[0].values, b[0].values);
    }

    #[test]
    fn safetensors_file_reads_back() {
        let mut spec = FixtureSpec::tiny_qwen2();
        spec.dtype = FixtureDtype::BF16;
        let tensors = fixture_tensors(&spec).expect("tensors");
        let bytes = safetensors_bytes(&spec, &tensors);
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
        assert_eq!(st.len(), tensors.len());
        let refs = fixture_tensor_refs(&spec).expect("refs");
        for t in &tensors {
            let v = st.tensor(&t.name).expect("tensor");
            assert_eq!(v.shape(), t.shape.as_slice());
            assert_eq!(v.dtype(), safetensors::Dtype::BF16);
            assert_eq!(refs[&t.name].to_f32(), t.values);
            assert_eq!(Some(v.data()), refs[&t.name].block_bytes().map(|b| &b[..]));
        }
    }
}
