//! Rebuild a `tokenizers::Tokenizer` from a GGUF's `tokenizer.ggml.*` keys (gguf.md §1.6), so a GGUF file
//! alone gives the same token ids as llama.cpp.
//!
//! * `gpt2` (byte-level BPE): the vocabulary and ranked merges as stored; the pre-tokenizer is the chain
//!   of split regexes llama.cpp's `llm_tokenizer_bpe` uses for the file's `tokenizer.ggml.pre` (each regex
//!   splits the pieces of the previous one, matches and gaps both kept: HF's `Split` with `Isolated`),
//!   then the byte-to-unicode mapping. Unknown `pre` values fall back to the GPT-2 regex.
//! * `llama` (SentencePiece-style): BPE with byte fallback, merges derived from the vocabulary and scores
//!   as Hugging Face's SentencePiece converter derives them, `▁` for spaces and an optional prepended
//!   space, and the matching decoder.
//!
//! Control (and, for SentencePiece, unknown) tokens become special added tokens and user-defined tokens
//! plain added tokens, so each is matched in text as one id, as llama.cpp does.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::gguf::GgufFile;
use super::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// llama.cpp token types (`llama_token_type`).
pub mod token_type {
    pub const UNDEFINED: i64 = 0;
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// GPT-2's split regex, as llama.cpp spells it.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's regex with the case-insensitive group spelled out (llama.cpp's adaptation).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's regex: Llama 3's with single digits.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes for a `tokenizer.ggml.pre` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpePre {
    /// Split regexes, applied one after the other.
    pub regexes: Vec<&'static str>,
    /// A whole pre-token found in the vocabulary is taken as is (Llama 3's `ignore_merges`).
    pub ignore_merges: bool,
    /// llama.cpp's `add_bos` default when `tokenizer.ggml.add_bos_token` is absent.
    pub add_bos_default: bool,
    /// Whether the name was recognised (else the GPT-2 regex is used).
    pub known: bool,
}

/// The pre-tokenizer llama.cpp uses for `pre` (`src/llama-vocab.cpp`, `llm_tokenizer_bpe`).
pub fn bpe_pre(pre: &str) -> BpePre {
    let (regexes, ignore_merges, add_bos_default, known): (Vec<&'static str>, bool, bool, bool) =
        match pre {
            "default" => (
                vec![
                    r"[\p{P}\$\+<=>\^~\|]+",
                    RE_GPT2,
                    r"\p{N}+",
                    "[0-9][0-9][0-9]",
                ],
                false,
                false,
                true,
            ),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => (vec![RE_LLAMA3], true, true, true),
            "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => (vec![RE_LLAMA3], false, false, true),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" | "mellum2" => (vec![r"\p{N}", RE_GPT2], false, false, true),
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en"
            | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion"
            | "granite-docling" | "exaone4" => (vec![RE_GPT2], false, false, true),
            "falcon" => (
                vec![r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"],
                false,
                false,
                true,
            ),
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "megrez"
            | "hunyuan" | "solar-open" => (vec![RE_QWEN2], false, false, true),
            "qwen35" => (vec![RE_QWEN35], false, false, true),
            "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => {
                (vec![RE_GPT4O], false, false, true)
            }
            "tekken" => (vec![RE_TEKKEN], true, true, true),
            "poro-chat" | "bloom" | "gpt3-finnish" => {
                (vec![r" ?[^(\s|.,!?…。，、।۔،)]+"], false, false, true)
            }
            _ => (vec![RE_GPT2], false, false, false),
        };
    BpePre {
        regexes,
        ignore_merges,
        add_bos_default,
        known,
    }
}

/// Names llama.cpp treats as end-of-generation when they are in the vocabulary.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Build the tokenizer, special ids and chat template of GGUF file `g`.
pub fn from_gguf(g: &GgufFile) -> Result<TextTokenizer> {
    let path = g.path.as_path();
    let bad = |d: String| Error::malformed(path, "GGUF", d);
    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| bad("tokenizer.ggml.model is missing".into()))?;
    let raw_tokens = g
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| bad("tokenizer.ggml.tokens is missing".into()))?;
    let n = raw_tokens.len();
    if n == 0 || u32::try_from(n).is_err() {
        return Err(bad(format!("tokenizer.ggml.tokens has {n} entries")));
    }
    // llama.cpp replaces empty token texts so every id has a distinct string.
    let tokens: Vec<String> = raw_tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.clone()
            }
        })
        .collect();
    let types = match g.get_int_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() >= n => t,
        Some(t) => {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                t.len()
            )))
        }
        None => vec![token_type::NORMAL; n],
    };
    let scores = match g.get_f32_array("tokenizer.ggml.scores")? {
        Some(s) if s.len() >= n => Some(s),
        Some(s) => {
            return Err(bad(format!(
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                s.len()
            )))
        }
        None => None,
    };

    let spm = match model {
        "llama" => true,
        "gpt2" => false,
        other => {
            return Err(Error::unsupported(
                path,
                format!("tokenizer model {other:?} (supported: gpt2, llama)"),
            ))
        }
    };

    let special_id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
        let v = match g.get_i64(key)? {
            Some(v) => u32::try_from(v).ok(),
            None => default,
        };
        // Out-of-range ids are ignored, as llama.cpp does.
        Ok(v.filter(|&id| (id as usize) < n))
    };
    let (bos_default, eos_default) = if spm {
        (Some(1), Some(2))
    } else {
        (Some(11), Some(11))
    };
    let bos = special_id("tokenizer.ggml.bos_token_id", bos_default)?;
    let eos = special_id("tokenizer.ggml.eos_token_id", eos_default)?;
    let eot = special_id("tokenizer.ggml.eot_token_id", None)?;
    let eom = special_id("tokenizer.ggml.eom_token_id", None)?;
    let unk = special_id(
        "tokenizer.ggml.unknown_token_id",
        if spm { Some(0) } else { None },
    )?;

    let pre_name = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre = bpe_pre(pre_name);
    let add_bos = match g.get_bool("tokenizer.ggml.add_bos_token")? {
        Some(b) => b,
        None => spm || pre.add_bos_default,
    };

    let inner = if spm {
        let add_space_prefix = g
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        build_spm(&tokens, &types, scores.as_deref(), unk, add_space_prefix)?
    } else {
        let merges = g.get_str_array("tokenizer.ggml.merges")?.ok_or_else(|| {
            bad("tokenizer.ggml.merges is missing (required for a gpt2 tokenizer)".into())
        })?;
        build_bpe(&tokens, &types, merges, &pre)?
    };

    let mut eos_token_ids: Vec<u32> = Vec::new();
    let mut push = |id: u32| {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    };
    eos.into_iter().chain(eot).chain(eom).for_each(&mut push);
    for (i, t) in tokens.iter().enumerate() {
        if EOG_NAMES.contains(&t.as_str()) && types[i] == token_type::CONTROL {
            push(i as u32);
        }
    }

    let chat_template = g.get_str("tokenizer.chat_template")?.map(str::to_string);
    let chat_template_origin = chat_template
        .as_ref()
        .map(|_| format!("{}, key tokenizer.chat_template", g.path.display()));
    Ok(TextTokenizer {
        inner,
        bos_token_id: bos,
        eos_token_ids,
        add_bos,
        chat_template,
        chat_template_origin,
        bos_token: bos.map(|i| tokens[i as usize].clone()),
        eos_token: eos.map(|i| tokens[i as usize].clone()),
    })
}

/// The vocabulary map; a text that occurs twice keeps its last id, as llama.cpp's `token_to_id` does.
fn vocab_of(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// Added tokens for control (special), user-defined (plain) and, with `unknown_special`, unknown tokens.
fn added_tokens(
    tokens: &[String],
    types: &[i64],
    unknown_special: bool,
) -> (Vec<AddedToken>, Vec<AddedToken>) {
    let mut special = Vec::new();
    let mut plain = Vec::new();
    for (t, &ty) in tokens.iter().zip(types) {
        if ty == token_type::CONTROL || (unknown_special && ty == token_type::UNKNOWN) {
            special.push(AddedToken::from(t.clone(), true).normalized(false));
        } else if ty == token_type::USER_DEFINED {
            plain.push(AddedToken::from(t.clone(), false).normalized(false));
        }
    }
    (special, plain)
}

fn finish(mut tk: Tokenizer, tokens: &[String], types: &[i64], unknown_special: bool) -> Tokenizer {
    let (special, plain) = added_tokens(tokens, types, unknown_special);
    tk.add_special_tokens(&special);
    tk.add_tokens(&plain);
    tk
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
fn build_bpe(
    tokens: &[String],
    types: &[i64],
    merges_raw: &[String],
    pre: &BpePre,
) -> Result<Tokenizer> {
    let vocab = vocab_of(tokens);
    // "left right", split at the first space after position 0 (llama.cpp); a merge whose parts or result
    // are not in the vocabulary can never apply and is dropped; a repeated merge keeps its first rank.
    let mut merges: Merges = Vec::with_capacity(merges_raw.len());
    let mut seen = HashSet::with_capacity(merges_raw.len());
    for m in merges_raw {
        let Some(pos) = m.bytes().skip(1).position(|c| c == b' ').map(|p| p + 1) else {
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        if a.is_empty() || b.is_empty() || !vocab.contains_key(a) || !vocab.contains_key(b) {
            continue;
        }
        let joined = format!("{a}{b}");
        if !vocab.contains_key(&joined) || !seen.insert((a, b)) {
            continue;
        }
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(tok_err)?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for re in &pre.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(steps))));
    tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    ))));
    Ok(finish(tk, tokens, types, false))
}

/// Merges of a SentencePiece vocabulary, as Hugging Face's `SentencePieceExtractor` derives them: every
/// split of a token into two in-vocabulary pieces, ordered by the token's score (highest first; ties in
/// vocabulary order, then by the pieces' ids).
pub fn spm_merges(tokens: &[String], scores: Option<&[f32]>) -> Merges {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut all: Vec<(f32, usize, usize, usize)> = Vec::new(); // (score, token, left id, right id)
    for (i, t) in tokens.iter().enumerate() {
        let score = scores.map_or(-(i as f32), |s| s[i]);
        let start = all.len();
        for (pos, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(pos);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                all.push((score, i, li, ri));
            }
        }
        all[start..].sort_by_key(|&(_, _, l, r)| (l, r));
    }
    // Stable: equal scores keep the order above.
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    all.into_iter()
        .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

/// SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`).
fn build_spm(
    tokens: &[String],
    types: &[i64],
    scores: Option<&[f32]>,
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let vocab = vocab_of(tokens);
    let merges = spm_merges(tokens, scores);
    let mut b = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        b = b.unk_token(tokens[u as usize].clone());
    }
    let bpe = b.build().map_err(tok_err)?;
    let mut tk = Tokenizer::new(bpe);
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norm.push(Prepend::new("▁".to_string()).into());
    }
    norm.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
    tk.with_normalizer(Some(NormalizerWrapper::Sequence(
        tokenizers::normalizers::Sequence::new(norm),
    )));
    let mut dec: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(tok_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(dec))));
    Ok(finish(tk, tokens, types, true))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::gguf::test_util::smollm2_path;

    fn load(path: &Path) -> TextTokenizer {
        let (g, _map) = GgufFile::read(path).expect("read GGUF");
        from_gguf(&g).expect("tokenizer")
    }

    /// Expected ids: llama.cpp (build of the tree in gguf.md, `llama_tokenize(vocab, text, len, ..,
    /// add_special=false, parse_special=true)` on a vocab-only load of SmolLM2-135M-Instruct.Q4_1.gguf).
    const SMOLLM2_CASES: &[(&str, &[u32])] = &[
        ("12345", &[33, 34, 35, 36, 37]),
        (
            "Hello  world   with    multiple     spaces",
            &[19556, 216, 905, 256, 351, 333, 2701, 289, 5600],
        ),
        (
            "line one\nline two\n\n\ttabbed\r\nend",
            &[
                1311, 582, 198, 1311, 827, 1116, 197, 15999, 5776, 201, 198, 486,
            ],
        ),
        (
            "héllo wörld — naïve café 日本語 🤖 Ελληνικά",
            &[
                88, 2756, 31394, 267, 29989, 400, 1841, 15486, 46494, 37366, 17097, 241, 115,
                40993, 179, 120, 248, 15107, 114, 240, 5664, 239, 17162, 17162, 25723, 11517,
                12001, 21118, 26112,
            ],
        ),
        (
            "don't won't I'm we'll they've she'd it's DON'T",
            &[
                12420, 982, 3763, 982, 339, 5248, 392, 3060, 502, 3543, 1041, 6737, 357, 506, 422,
                2154, 23, 68,
            ],
        ),
        (
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
            &[
                7853, 1085, 1000, 1662, 472, 1628, 34115, 17, 43331, 1002, 216, 33, 1232, 216, 34,
                4258, 198, 109, 198,
            ],
        ),
        ("  leading and trailing  ", &[216, 2899, 284, 35079, 256]),
        (
            "3.14159 and 2,000,000 or 1e-9",
            &[
                35, 30, 33, 36, 33, 37, 41, 284, 216, 34, 28, 32, 32, 32, 28, 32, 32, 32, 355, 216,
                33, 85, 29, 41,
            ],
        ),
        (
            "The quick brown fox jumps over the lazy dog.",
            &[504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
        ),
        (
            "<|im_start|>user\nHi there<|im_end|>\n",
            &[1, 4093, 198, 26843, 665, 2, 198],
        ),
        ("", &[]),
    ];

    #[test]
    #[ignore = "needs SmolLM2 (fetch-smollm2.sh)"]
    fn gguf_tokenizer_smollm2_matches_llama_cpp() {
        let tk = load(&smollm2_path());
        assert_eq!(tk.vocab_size(), 49152);
        for &(text, want) in SMOLLM2_CASES {
            assert_eq!(tk.encode(text, false).expect("encode"), want, "{text:?}");
            assert_eq!(
                tk.decode(want, false).expect("decode"),
                text,
                "decode {want:?}"
            );
        }
        // SmolLM2's GGUF says add_bos_token = false.
        assert!(!tk.add_bos);
        assert_eq!(tk.encode("Hi", true).expect("encode"), vec![26843]);
        assert_eq!(
            (tk.bos_token_id, tk.bos_token.as_deref()),
            (Some(1), Some("<|im_start|>"))
        );
        assert_eq!(tk.eos_token.as_deref(), Some("<|im_end|>"));
        // eos (2, <|im_end|>), then <|endoftext|> (0), which llama.cpp also ends generation on.
        assert_eq!(tk.eos_token_ids, vec![2, 0]);
        assert!(tk
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("<|im_start|>")));
        assert_eq!(tk.decode(&[1, 4093, 2], true).expect("decode"), "user");
    }

    /// Expected ids: llama.cpp as above (add_special=false, parse_special=true) on
    /// tests/fixtures/gguf/tiny_spm.gguf, written by make_spm_fixture.py. Ids: 0 <unk>, 1 <s>, 2 </s>,
    /// 3 <start_of_turn>, 4 <tool>, 5.. bytes, 261.. merged pieces, 297.. single characters.
    const SPM_CASES: &[(&str, &[u32], bool)] = &[
        ("hello world", &[277, 274], true),
        ("the thing is it's", &[266, 286, 292, 294, 296], true),
        (
            "Hello World!",
            &[282, 302, 276, 297, 326, 269, 273, 339],
            true,
        ),
        (
            " leading space",
            &[289, 309, 302, 298, 301, 279, 271, 313, 298, 300, 302],
            true,
        ),
        ("a  b    c", &[263, 289, 299, 290, 300], true),
        (
            "héllo 日本 🤖",
            &[
                297, 305, 200, 174, 276, 297, 235, 156, 170, 235, 161, 177, 297, 245, 164, 169, 155,
            ],
            true,
        ),
        (
            "line\nbreak\ttab",
            &[
                297, 309, 264, 302, 15, 299, 315, 302, 298, 308, 14, 317, 298, 299,
            ],
            true,
        ),
        ("12345", &[280, 281, 331, 332], true),
        (
            "x<start_of_turn>y <tool> z",
            &[297, 321, 3, 297, 322, 297, 4, 289, 323],
            false,
        ),
        (
            "unknownQ",
            &[297, 318, 311, 308, 311, 312, 320, 311, 86],
            true,
        ),
    ];

    #[test]
    fn gguf_tokenizer_spm_matches_llama_cpp() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/tiny_spm.gguf");
        let tk = load(&path);
        for &(text, want, round_trips) in SPM_CASES {
            assert_eq!(tk.encode(text, false).expect("encode"), want, "{text:?}");
            if round_trips {
                assert_eq!(
                    tk.decode(want, false).expect("decode"),
                    text,
                    "decode {want:?}"
                );
            }
        }
        assert!(tk.add_bos);
        assert_eq!(tk.encode("hello", true).expect("encode"), vec![1, 277]);
        assert_eq!(tk.eos_token_ids, vec![2]);
        assert_eq!(
            (tk.bos_token.as_deref(), tk.eos_token.as_deref()),
            (Some("<s>"), Some("</s>"))
        );
    }

    #[test]
    fn gguf_tokenizer_spm_merges_follow_scores() {
        let toks: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let m = spm_merges(&toks, Some(&scores));
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // bc (-1) before ab (-2) before the two ways to make abc (-3), those in (left id, right id) order.
        assert_eq!(
            pairs,
            vec![("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
        );
    }

    #[test]
    fn gguf_tokenizer_pre_table() {
        assert_eq!(bpe_pre("smollm").regexes, vec![r"\p{N}", RE_GPT2]);
        let l3 = bpe_pre("llama-bpe");
        assert!(l3.ignore_merges && l3.add_bos_default && l3.known);
        assert_eq!(bpe_pre("qwen2").regexes, vec![RE_QWEN2]);
        assert_eq!(bpe_pre("default").regexes.len(), 4);
        let other = bpe_pre("no-such-pre");
        assert!(!other.known && other.regexes == vec![RE_GPT2]);
        // Every regex compiles with the tokenizer's engine.
        for pre in [
            "default", "llama3", "smollm", "gpt-2", "falcon", "qwen2", "qwen35", "gpt-4o",
            "tekken", "bloom",
        ] {
            for re in bpe_pre(pre).regexes {
                Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{pre}: {re}: {e}"));
            }
        }
    }
}
