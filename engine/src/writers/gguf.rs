//! A streaming GGUF v3 writer for llama/qwen2 models (see `shared/reference/gguf.md` §1 and §7).
//!
//! Layout: header, metadata, tensor infos (offsets = running sum of sizes padded to 32), zero padding to
//! 32, then each tensor followed by zero padding to 32 (the last one too). Every size is known from
//! shapes and types, so the metadata is written first and tensors are streamed after it, one in memory
//! at a time, to the path it is given: callers write through an [`crate::output::Staged`] temporary.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::codecs::GgmlType;
use crate::model::gguf::{GgufArray, GgufValue};
use crate::model::{Arch, RopeScaling, SourceFormat, SourceModel};
use crate::tensor::TensorRef;
use crate::{Error, Result};

const ALIGN: u64 = 32;

/// Fills the bytes of one tensor as the given type, in the row order of the tensor it is handed.
pub type QuantizeTensorFn<'a> = dyn FnMut(&TensorRef, GgmlType, &mut Vec<u8>) -> Result<()> + 'a;

/// Which type one tensor (by Hugging Face name) gets in the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufPlanTensor {
    pub hf_name: String,
    pub ty: GgmlType,
}

/// One tensor as it goes into the file.
struct OutTensor<'a> {
    gguf_name: String,
    /// ggml `ne` order (innermost first).
    ne: Vec<u64>,
    ty: GgmlType,
    nbytes: u64,
    src: OutSource<'a>,
    /// `Some(heads)` for a llama Q/K tensor (interleaved on disk).
    permute: Option<usize>,
}

enum OutSource<'a> {
    Tensor(&'a TensorRef),
    /// Generated f32 values (`rope_freqs.weight`).
    F32(Vec<f32>),
}

pub use crate::model::gguf::gguf_tensor_name;

/// `Some(heads)` when `t` must be written in llama.cpp's interleaved-RoPE row order.
fn permute_heads(src: &SourceModel, hf_name: &str) -> Option<usize> {
    if src.config.arch == Arch::Qwen2 {
        return None;
    }
    if hf_name.contains(".self_attn.q_proj.") {
        Some(src.config.num_heads)
    } else if hf_name.contains(".self_attn.k_proj.") {
        Some(src.config.num_kv_heads)
    } else {
        None
    }
}

use crate::tensor::hf_row_of_interleaved as hf_row_of_gguf_row;

/// The tensor handed to `quantize_tensor`: `t` with its rows in GGUF order. Only a llama Q/K tensor
/// differs: a GGUF source's rows are already stored interleaved (the read-side mapping is dropped, no
/// copy); an HF source's rows are copied, still in their stored type, into llama.cpp's interleaved order
/// (one tensor in memory). A Q/K bias is permuted element-wise as f32.
fn gguf_order(t: &TensorRef, heads: Option<usize>) -> Result<std::borrow::Cow<'_, TensorRef>> {
    use std::borrow::Cow;
    let Some(heads) = heads else {
        return Ok(Cow::Borrowed(t));
    };
    let n_rows = if t.shape.len() == 1 {
        t.numel()
    } else {
        t.rows()
    };
    if heads == 0 || !n_rows.is_multiple_of(heads) || !(n_rows / heads).is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "tensor {}: {n_rows} rows do not split into {heads} heads of even size",
            t.name
        )));
    }
    if t.shape.len() == 1 || t.is_grouped() {
        // Vectors, and grouped (GPTQ) layers, whose rows are only available dequantised: one f32 tensor.
        let v = t.to_f32();
        if t.shape.len() > 1 {
            let cols = t.cols();
            let mut p = Vec::with_capacity(v.len());
            for r in 0..n_rows {
                let h = hf_row_of_gguf_row(r, n_rows, heads);
                p.extend_from_slice(&v[h * cols..(h + 1) * cols]);
            }
            return Ok(Cow::Owned(TensorRef::from_f32(
                t.name.clone(),
                t.shape.clone(),
                &p,
            )?));
        }
        let p: Vec<f32> = (0..n_rows)
            .map(|r| v[hf_row_of_gguf_row(r, n_rows, heads)])
            .collect();
        return Ok(Cow::Owned(TensorRef::from_f32(
            t.name.clone(),
            t.shape.clone(),
            &p,
        )?));
    }
    if t.rope_interleaved_heads == Some(heads) {
        let mut c = t.clone();
        c.rope_interleaved_heads = None;
        return Ok(Cow::Owned(c));
    }
    let Some(ty) = t.block_type() else {
        unreachable!("grouped tensors are handled above")
    };
    let mut bytes = Vec::with_capacity(t.stored_bytes());
    for r in 0..n_rows {
        bytes.extend_from_slice(t.row_data(hf_row_of_gguf_row(r, n_rows, heads)));
    }
    let mut c = TensorRef::new(
        t.name.clone(),
        t.shape.clone(),
        ty,
        crate::tensor::Bytes::owned(bytes),
    )?;
    c.rope_interleaved_heads = None;
    Ok(Cow::Owned(c))
}

/// Bytes of one row of `t` quantized to `ty`; an error when `ty` has no quantizer or the rows are not
/// whole blocks.
pub(crate) fn quantized_row_bytes(t: &TensorRef, ty: GgmlType) -> Result<usize> {
    let tr = ty.traits();
    let cols = t.cols();
    if tr.quantize.is_none() {
        return Err(Error::Invalid(format!("type {} has no quantizer", tr.name)));
    }
    tr.row_bytes(cols).ok_or_else(|| {
        Error::Invalid(format!(
            "tensor {}: row length {cols} is not a multiple of {}'s block of {}",
            t.name, tr.name, tr.block_elems
        ))
    })
}

/// Fill `out` with the bytes of `t` as type `ty`, row by row in `t`'s row order: dequantise one row,
/// quantise it with `ty`'s reference quantizer. [`write_gguf`] hands its callback llama Q/K tensors already
/// in llama.cpp's interleaved row order (GGUF row `g·hd + 2i + j` = HF row `g·hd + j·hd/2 + i`), so this
/// function writes them correctly when used as that callback.
pub fn quantize_tensor_rows(t: &TensorRef, ty: GgmlType, out: &mut Vec<u8>) -> Result<()> {
    let row_bytes = quantized_row_bytes(t, ty)?;
    let (rows, cols) = (t.rows(), t.cols());
    out.clear();
    out.resize(rows * row_bytes, 0);
    let mut buf = vec![0.0f32; cols];
    for (r, dst) in out.chunks_exact_mut(row_bytes.max(1)).enumerate() {
        t.dequant_row(r, &mut buf);
        ty.quantize(&buf, dst, None);
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------------
// Byte encoding
// -------------------------------------------------------------------------------------------------------

fn put_str(o: &mut Vec<u8>, s: &str) {
    o.extend_from_slice(&(s.len() as u64).to_le_bytes());
    o.extend_from_slice(s.as_bytes());
}

fn put_array(o: &mut Vec<u8>, a: &GgufArray) {
    o.extend_from_slice(&a.elem_type_id().to_le_bytes());
    o.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        GgufArray::U8(v) => o.extend_from_slice(v),
        GgufArray::I8(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U16(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I16(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U32(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I32(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F32(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::Bool(v) => v.iter().for_each(|&x| o.push(u8::from(x))),
        GgufArray::Str(v) => v.iter().for_each(|s| put_str(o, s)),
        GgufArray::U64(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I64(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F64(v) => v.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())),
    }
}

fn put_kv(o: &mut Vec<u8>, key: &str, v: &GgufValue) {
    put_str(o, key);
    o.extend_from_slice(&v.type_id().to_le_bytes());
    match v {
        GgufValue::U8(x) => o.push(*x),
        GgufValue::I8(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => o.push(u8::from(*x)),
        GgufValue::Str(s) => put_str(o, s),
        GgufValue::Array(a) => put_array(o, a),
        GgufValue::U64(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => o.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => o.extend_from_slice(&x.to_le_bytes()),
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

// -------------------------------------------------------------------------------------------------------
// Metadata
// -------------------------------------------------------------------------------------------------------

fn model_metadata(src: &SourceModel, file_type: u32) -> Result<Vec<(String, GgufValue)>> {
    let c = &src.config;
    let arch = match c.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
    };
    let u = |x: usize| -> Result<GgufValue> {
        u32::try_from(x)
            .map(GgufValue::U32)
            .map_err(|_| Error::Invalid(format!("{x} does not fit a GGUF UINT32")))
    };
    let k = |s: &str| format!("{arch}.{s}");
    let mut kv: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::Str(arch.into())),
        ("general.name".into(), GgufValue::Str(src.name.clone())),
        ("general.file_type".into(), GgufValue::U32(file_type)),
        ("general.quantization_version".into(), GgufValue::U32(2)),
        (k("vocab_size"), u(c.vocab_size)?),
        (k("context_length"), u(c.max_position_embeddings)?),
        (k("embedding_length"), u(c.hidden_size)?),
        (k("block_count"), u(c.num_layers)?),
        (k("feed_forward_length"), u(c.intermediate_size)?),
        (k("attention.head_count"), u(c.num_heads)?),
        (k("attention.head_count_kv"), u(c.num_kv_heads)?),
        (
            k("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(c.rms_norm_eps),
        ),
        (k("rope.freq_base"), GgufValue::F32(c.rope_theta)),
        (k("rope.dimension_count"), u(c.head_dim)?),
    ];
    // llama.cpp derives the head size as embedding_length / head_count unless these say otherwise
    // (a GGUF source that has them keeps them where they were, see `in_source_order`).
    if c.head_dim * c.num_heads != c.hidden_size {
        kv.push((k("attention.key_length"), u(c.head_dim)?));
        kv.push((k("attention.value_length"), u(c.head_dim)?));
    }
    if let Some(RopeScaling::Linear { factor }) = c.rope_scaling {
        kv.push((k("rope.scaling.type"), GgufValue::Str("linear".into())));
        kv.push((k("rope.scaling.factor"), GgufValue::F32(factor)));
    }
    // A GGUF source's other general.* facts (type, size label, licence, …) carry over, as llama-quantize
    // keeps them; alignment is ours to choose and is left at the default.
    if let Some(meta) = &src.gguf_metadata {
        for (key, v) in meta.iter() {
            if key.starts_with("general.")
                && key != "general.alignment"
                && !kv.iter().any(|(k, _)| k == key)
            {
                kv.push((key.clone(), v.clone()));
            }
        }
    }
    Ok(kv)
}

/// For a GGUF source, the keys in llama-quantize's order: the source's keys where they were (keeping their
/// values), then keys the source lacked, then `general.quantization_version` and `general.file_type` last
/// (llama-quantize sets those two, which moves them to the end). Other sources keep our order.
fn in_source_order(src: &SourceModel, ours: Vec<(String, GgufValue)>) -> Vec<(String, GgufValue)> {
    let Some(meta) = &src.gguf_metadata else {
        return ours;
    };
    let last = ["general.quantization_version", "general.file_type"];
    let mut out: Vec<(String, GgufValue)> = meta
        .iter()
        .filter(|(k, _)| k != "general.alignment" && !last.contains(&k.as_str()))
        .cloned()
        .collect();
    let mut tail = Vec::new();
    for (k, v) in ours {
        if last.contains(&k.as_str()) {
            tail.push((k, v));
        } else if !out.iter().any(|(o, _)| *o == k) {
            out.push((k, v));
        }
    }
    tail.sort_by_key(|(k, _)| last.iter().position(|l| *l == k));
    out.extend(tail);
    out
}

/// llama.cpp's per-frequency divisors for Llama 3.1 rope scaling (`rope_freqs.weight`), or the source's
/// own factors when it had them.
fn rope_freq_factors(src: &SourceModel) -> Option<Vec<f32>> {
    let c = &src.config;
    if let Some(f) = &c.rope_freq_factors {
        return Some(f.clone());
    }
    c.llama3_rope_divisors()
        .map(|v| v.iter().map(|&k| k as f32).collect())
}

/// llama.cpp's converter probe text (`conversion/base.py`, `chktxt`): its token ids, formatted as Python's
/// `str(list)` and SHA-256'ed, identify the BPE pre-tokenizer.
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1F680} (normal) \u{1F636}\u{200d}\u{1F32B}\u{FE0F} (multiple emojis concatenated) \u{2705} \u{1F999}\u{1F999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17B6}\u{1793}\u{17CB}\u{178F}\u{17C2}\u{1796}\u{17B7}\u{179F}\u{17C1}\u{179F}\u{17A2}\u{17B6}\u{1785}\u{1F601} ?\u{6211}\u{60F3}\u{5728}apple\u{5DE5}\u{4F5C}1314151\u{5929}\u{FF5E} ------======= \u{043D}\u{0435}\u{0449}\u{043E} \u{043D}\u{0430} \u{0411}\u{044A}\u{043B}\u{0433}\u{0430}\u{0440}\u{0441}\u{043A}\u{0438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// Known probe hashes → `tokenizer.ggml.pre` (a subset of llama.cpp's table).
const PRE_TABLE: &[(&str, &str)] = &[
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ),
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ),
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ),
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ),
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ),
];

/// The `tokenizer.ggml.pre` for `tok`, computed as llama.cpp's converter does. NOTE: an unknown hash
/// falls back to "default" (llama.cpp's converter would refuse the model instead); "default" is llama.cpp's
/// generic GPT-2-style split, which may tokenise some text differently from the original tokenizer.
fn bpe_pre(tok: &tokenizers::Tokenizer) -> Result<&'static str> {
    let enc = tok
        .encode(CHKTXT, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids: Vec<String> = enc.get_ids().iter().map(u32::to_string).collect();
    let s = format!("[{}]", ids.join(", "));
    let h = hex(&sha256(s.as_bytes()));
    Ok(PRE_TABLE
        .iter()
        .find(|(k, _)| *k == h)
        .map_or("default", |(_, v)| v))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256, for the pre-tokenizer probe hash.
fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// `tokenizer.*` keys: copied verbatim from a GGUF source, derived from tokenizer.json for an HF folder.
fn tokenizer_metadata(src: &SourceModel) -> Result<Vec<(String, GgufValue)>> {
    if let Some(meta) = &src.gguf_metadata {
        return Ok(meta
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect());
    }
    if src.format != SourceFormat::HfFolder {
        return Err(Error::unsupported(
            &src.path,
            "GGUF output needs the source's tokenizer files or GGUF tokenizer metadata",
        ));
    }
    let tj = src.path.join("tokenizer.json");
    if !tj.is_file() {
        return Err(Error::unsupported(
            &src.path,
            "GGUF output from a SentencePiece (tokenizer.model) tokenizer is not supported yet",
        ));
    }
    let text = std::fs::read_to_string(&tj).map_err(|e| Error::io(&tj, e))?;
    let j: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::malformed(&tj, "tokenizer.json", e.to_string()))?;
    let bad = |d: &str| Error::malformed(&tj, "tokenizer.json", d.to_string());
    let model = &j["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(Error::unsupported(
            &tj,
            "GGUF output supports byte-level BPE tokenizers only for now",
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is missing"))?;
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut put = |id: usize, s: &str, ty: i32| {
        if id >= by_id.len() {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((s.to_string(), ty));
    };
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("vocab id is not an integer"))? as usize;
        if id > 10_000_000 {
            return Err(bad("vocab id out of range"));
        }
        put(id, s, 1);
    }
    if let Some(added) = j["added_tokens"].as_array() {
        for a in added {
            let id = a["id"].as_u64().ok_or_else(|| bad("added token id"))? as usize;
            if id > 10_000_000 {
                return Err(bad("added token id out of range"));
            }
            let s = a["content"]
                .as_str()
                .ok_or_else(|| bad("added token content"))?;
            let ty = if a["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
            put(id, s, ty);
        }
    }
    let n = by_id.len().max(src.config.vocab_size);
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n {
        match by_id.get(i).cloned().flatten() {
            Some((s, t)) => {
                tokens.push(s);
                types.push(t);
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(5);
            }
        }
    }
    let mut merges = Vec::new();
    for m in model["merges"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        match m {
            serde_json::Value::String(s) => merges.push(s.clone()),
            serde_json::Value::Array(p) if p.len() == 2 => {
                let a = p[0].as_str().ok_or_else(|| bad("merge part"))?;
                let b = p[1].as_str().ok_or_else(|| bad("merge part"))?;
                merges.push(format!("{a} {b}"));
            }
            _ => return Err(bad("a merge is neither \"a b\" nor [a, b]")),
        }
    }
    let t = &src.tokenizer;
    let pre = bpe_pre(&t.inner)?;
    let mut kv: Vec<(String, GgufValue)> = vec![
        ("tokenizer.ggml.model".into(), GgufValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::Str(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::Str(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::Str(merges)),
        ),
    ];
    if let Some(b) = t.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(b)));
    }
    if let Some(&e) = t.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
    }
    if let Some(p) = pad_token_id(src, &tj) {
        kv.push(("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(p)));
    }
    kv.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(t.add_bos),
    ));
    if let Some(ct) = &t.chat_template {
        kv.push(("tokenizer.chat_template".into(), GgufValue::Str(ct.clone())));
    }
    Ok(kv)
}

/// The padding token id from tokenizer_config.json's `pad_token` (a string or `{content}`), if any.
fn pad_token_id(src: &SourceModel, _tj: &Path) -> Option<u32> {
    let p = src.path.join("tokenizer_config.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    let pad = &j["pad_token"];
    let s = pad.as_str().or_else(|| pad["content"].as_str())?;
    src.tokenizer.inner.token_to_id(s)
}

// -------------------------------------------------------------------------------------------------------
// The writer
// -------------------------------------------------------------------------------------------------------

/// Write `src` as a GGUF v3 file at `out`, each tensor in the type `plan` gives it (1-D tensors are always
/// F32). `quantize_tensor` fills one tensor's bytes, row by row in the order of the tensor it is given
/// (e.g. [`quantize_tensor_rows`]): llama Q/K tensors are handed over already in GGUF row order. `progress(done, total)` returning `false` cancels
/// with `Error::Cancelled` (the caller's [`crate::output::Staged`] removes what was written).
pub fn write_gguf(
    src: &SourceModel,
    plan: &[GgufPlanTensor],
    file_type: u32,
    out: &Path,
    quantize_tensor: &mut QuantizeTensorFn<'_>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    write_gguf_with(src, plan, file_type, &[], out, quantize_tensor, progress)
}

/// [`write_gguf`] with `extra_kvs` appended after every other key (where llama-quantize puts its
/// `quantize.imatrix.*` keys); an extra key replaces a key of the same name.
pub fn write_gguf_with(
    src: &SourceModel,
    plan: &[GgufPlanTensor],
    file_type: u32,
    extra_kvs: &[(String, GgufValue)],
    out: &Path,
    quantize_tensor: &mut QuantizeTensorFn<'_>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let tensors = plan_tensors(src, plan)?;
    let mut kvs = model_metadata(src, file_type)?;
    kvs.extend(tokenizer_metadata(src)?);
    let mut kvs = in_source_order(src, kvs);
    kvs.retain(|(k, _)| !extra_kvs.iter().any(|(e, _)| e == k));
    kvs.extend(extra_kvs.iter().cloned());

    write_file(out, &kvs, &tensors, quantize_tensor, progress)
}

/// The exact size in bytes of the file [`write_gguf_with`] writes for `plan` (header with every key and
/// tensor info, each tensor's data padded to the alignment) — without reading or quantizing any tensor.
pub fn gguf_file_bytes(
    src: &SourceModel,
    plan: &[GgufPlanTensor],
    file_type: u32,
    extra_kvs: &[(String, GgufValue)],
) -> Result<u64> {
    let tensors = plan_tensors(src, plan)?;
    let mut kvs = model_metadata(src, file_type)?;
    kvs.extend(tokenizer_metadata(src)?);
    let mut kvs = in_source_order(src, kvs);
    kvs.retain(|(k, _)| !extra_kvs.iter().any(|(e, _)| e == k));
    kvs.extend(extra_kvs.iter().cloned());
    let head = gguf_header(
        &kvs,
        tensors
            .iter()
            .map(|t| (t.gguf_name.as_str(), t.ne.as_slice(), t.ty, t.nbytes)),
    )?;
    Ok(head.len() as u64 + tensors.iter().map(|t| pad(t.nbytes)).sum::<u64>())
}

/// `n` bytes of tensor data as they lie in a GGUF file: padded to the alignment.
pub fn padded_bytes(n: u64) -> u64 {
    pad(n)
}

fn plan_tensors<'a>(src: &'a SourceModel, plan: &[GgufPlanTensor]) -> Result<Vec<OutTensor<'a>>> {
    let mut v = Vec::new();
    let mut push = |hf: &str, t: &'a TensorRef, ty: GgmlType| -> Result<()> {
        let gguf_name = gguf_tensor_name(hf).ok_or_else(|| {
            Error::unsupported(&src.path, format!("tensor {hf} has no GGUF name"))
        })?;
        let ty = if t.shape.len() <= 1 {
            GgmlType::F32
        } else {
            ty
        };
        let tr = ty.traits();
        let cols = t.cols();
        let row_bytes = tr.row_bytes(cols).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor {hf}: row length {cols} is not a multiple of {}'s block of {}",
                tr.name, tr.block_elems
            ))
        })?;
        let ne: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        v.push(OutTensor {
            gguf_name,
            ne,
            ty,
            nbytes: (row_bytes * t.rows()) as u64,
            src: OutSource::Tensor(t),
            permute: permute_heads(src, hf),
        });
        Ok(())
    };
    let ty_of = |hf: &str| -> Result<GgmlType> {
        plan.iter()
            .find(|p| p.hf_name == hf)
            .map(|p| p.ty)
            .ok_or_else(|| Error::Invalid(format!("the plan has no type for tensor {hf}")))
    };
    for p in plan {
        if !src.tensors.contains_key(&p.hf_name) {
            return Err(Error::Invalid(format!(
                "the plan names tensor {}, which the model does not have",
                p.hf_name
            )));
        }
    }
    let mut names: Vec<&String> = src.tensors.keys().collect();
    let rank = |n: &str| -> (usize, usize, String) {
        if n == "model.embed_tokens.weight" {
            (0, 0, String::new())
        } else if let Some(r) = n.strip_prefix("model.layers.") {
            let (l, rest) = r.split_once('.').unwrap_or((r, ""));
            (1, l.parse().unwrap_or(usize::MAX), rest.to_string())
        } else {
            (2, 0, n.to_string())
        }
    };
    // llama-quantize's order (it sorts the weights it visits): tensors outside the layers first, then by
    // layer number, each group by GGUF name.
    names.sort_by_key(|n| {
        let g = gguf_tensor_name(n).unwrap_or_default();
        (rank(n).0 == 1, rank(n).1, g)
    });
    for hf in names {
        if hf == "lm_head.weight" && src.config.tie_word_embeddings {
            continue;
        }
        let t = &src.tensors[hf];
        push(hf, t, ty_of(hf)?)?;
    }
    if let Some(f) = rope_freq_factors(src) {
        v.push(OutTensor {
            gguf_name: "rope_freqs.weight".into(),
            ne: vec![f.len() as u64],
            ty: GgmlType::F32,
            nbytes: (f.len() * 4) as u64,
            src: OutSource::F32(f),
            permute: None,
        });
    }
    Ok(v)
}

/// The header of a GGUF v3 file: magic, counts, `kvs`, the tensor infos with their offsets, padded to the
/// alignment. `tensors` are `(name, ne, type, bytes)` in file order.
fn gguf_header<'a>(
    kvs: &[(String, GgufValue)],
    tensors: impl ExactSizeIterator<Item = (&'a str, &'a [u64], GgmlType, u64)>,
) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as i64).to_le_bytes());
    head.extend_from_slice(&(kvs.len() as i64).to_le_bytes());
    for (k, v) in kvs {
        put_kv(&mut head, k, v);
    }
    let mut offset = 0u64;
    for (name, ne, ty, nbytes) in tensors {
        if name.len() >= 64 {
            return Err(Error::Invalid(format!("tensor name {name} is too long")));
        }
        put_str(&mut head, name);
        head.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for &d in ne {
            head.extend_from_slice(&(d as i64).to_le_bytes());
        }
        head.extend_from_slice(&ty.traits().ggml_id.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += pad(nbytes);
    }
    head.resize(pad(head.len() as u64) as usize, 0);
    Ok(head)
}

fn write_file(
    path: &Path,
    kvs: &[(String, GgufValue)],
    tensors: &[OutTensor<'_>],
    quantize_tensor: &mut QuantizeTensorFn<'_>,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<()> {
    let io = |e| Error::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let head = gguf_header(
        kvs,
        tensors
            .iter()
            .map(|t| (t.gguf_name.as_str(), t.ne.as_slice(), t.ty, t.nbytes)),
    )?;
    w.write_all(&head).map_err(io)?;
    drop(head);

    let total = tensors.len();
    if !progress(0, total) {
        return Err(Error::Cancelled);
    }
    let mut buf = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        match &t.src {
            OutSource::Tensor(tr) => {
                let view = gguf_order(tr, t.permute)?;
                quantize_tensor(&view, t.ty, &mut buf)?;
            }
            OutSource::F32(v) => {
                buf.clear();
                v.iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            }
        }
        if buf.len() as u64 != t.nbytes {
            return Err(Error::Invalid(format!(
                "tensor {}: {} bytes produced, {} expected",
                t.gguf_name,
                buf.len(),
                t.nbytes
            )));
        }
        w.write_all(&buf).map_err(io)?;
        let zeros = [0u8; ALIGN as usize];
        w.write_all(&zeros[..(pad(t.nbytes) - t.nbytes) as usize])
            .map_err(io)?;
        if !progress(i + 1, total) {
            return Err(Error::Cancelled);
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// One tensor of a small GGUF file written whole by [`write_gguf_blobs`].
pub struct GgufBlob<'a> {
    pub name: &'a str,
    /// ggml dimensions, row length first.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    pub data: &'a [u8],
}

/// Write a GGUF v3 file of `kvs` and in-memory `tensors` (for small files such as importance matrices),
/// at `path` (callers write through an [`crate::output::Staged`] temporary).
pub fn write_gguf_blobs(
    path: &Path,
    kvs: &[(String, GgufValue)],
    tensors: &[GgufBlob<'_>],
) -> Result<()> {
    let io = |e| Error::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    for t in tensors {
        let elems: u64 = t.ne.iter().product();
        let tr = t.ty.traits();
        if tr.row_bytes(elems as usize) != Some(t.data.len()) {
            return Err(Error::Invalid(format!(
                "GGUF tensor {}: {} bytes for {elems} elements of {}",
                t.name,
                t.data.len(),
                tr.name
            )));
        }
    }
    let head = gguf_header(
        kvs,
        tensors
            .iter()
            .map(|t| (t.name, t.ne.as_slice(), t.ty, t.data.len() as u64)),
    )?;
    w.write_all(&head).map_err(io)?;
    let zeros = [0u8; ALIGN as usize];
    for t in tensors {
        w.write_all(t.data).map_err(io)?;
        let n = t.data.len() as u64;
        w.write_all(&zeros[..(pad(n) - n) as usize]).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixture::{write_fixture, FixtureSpec};
    use std::path::PathBuf;

    fn plan_all(src: &SourceModel, ty: GgmlType) -> Vec<GgufPlanTensor> {
        src.tensors
            .keys()
            .map(|k| GgufPlanTensor {
                hf_name: k.clone(),
                ty,
            })
            .collect()
    }

    fn roundtrip(spec: &FixtureSpec, ty: GgmlType, file_type: u32) {
        let tmp = tempfile::tempdir().expect("test step");
        let dir = tmp.path().join("m");
        write_fixture(spec, &dir).expect("test step");
        let src = SourceModel::open(&dir).expect("test step");
        let out = tmp.path().join("m.gguf");
        write_gguf(
            &src,
            &plan_all(&src, ty),
            file_type,
            &out,
            &mut quantize_tensor_rows,
            &mut |_, _| true,
        )
        .expect("test step");
        let back = crate::model::gguf_model::open(&out).expect("test step");
        let mut want_cfg = src.config.clone();
        want_cfg.torch_dtype = None;
        assert_eq!(back.config, want_cfg);
        assert_eq!(
            back.tensors.len(),
            src.tensors.len()
                - usize::from(
                    src.config.tie_word_embeddings && src.tensors.contains_key("lm_head.weight")
                )
        );
        for (name, b) in &back.tensors {
            let s = &src.tensors[name];
            assert_eq!(b.shape, s.shape, "{name}");
            let want_ty = if s.shape.len() == 1 {
                GgmlType::F32
            } else {
                ty
            };
            assert_eq!(b.block_type(), Some(want_ty), "{name}");
            // The source after the type's rounding, row by row in HF order.
            let sv = s.to_f32();
            let mut q = vec![0u8; want_ty.traits().row_bytes(s.cols()).expect("test step")];
            let mut r = vec![0.0f32; s.cols()];
            let bv = b.to_f32();
            for (row, (sr, br)) in sv.chunks(s.cols()).zip(bv.chunks(s.cols())).enumerate() {
                want_ty.quantize(sr, &mut q, None).expect("test step");
                want_ty.dequantize(&q, &mut r);
                assert_eq!(br, &r[..], "{name} row {row}");
            }
        }
        let text = "The quick brown fox jumps over the lazy dog, twice.";
        assert_eq!(
            back.tokenizer.encode(text, true).expect("test step"),
            src.tokenizer.encode(text, true).expect("test step")
        );
        assert_eq!(back.tokenizer.bos_token_id, src.tokenizer.bos_token_id);
        assert_eq!(back.tokenizer.add_bos, src.tokenizer.add_bos);
        assert_eq!(back.tokenizer.chat_template, src.tokenizer.chat_template);
        // GGUF → GGUF copies the tokenizer keys verbatim.
        let out2 = tmp.path().join("m2.gguf");
        write_gguf(
            &back,
            &plan_all(&back, ty),
            file_type,
            &out2,
            &mut quantize_tensor_rows,
            &mut |_, _| true,
        )
        .expect("test step");
        let again = crate::model::gguf_model::open(&out2).expect("test step");
        let tk = |m: &SourceModel| -> Vec<(String, GgufValue)> {
            m.gguf_metadata
                .as_ref()
                .expect("test step")
                .iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .cloned()
                .collect()
        };
        assert_eq!(tk(&again), tk(&back));
        assert_eq!(again.config, back.config);
        for (name, b) in &back.tensors {
            assert_eq!(again.tensors[name].to_f32(), b.to_f32(), "{name}");
        }
    }

    #[test]
    fn writers_gguf_f32_roundtrip() {
        roundtrip(&FixtureSpec::tiny_llama(), GgmlType::F32, 0);
    }

    #[test]
    fn writers_gguf_f16_roundtrip() {
        roundtrip(&FixtureSpec::tiny_llama(), GgmlType::F16, 1);
    }

    #[test]
    fn writers_gguf_q8_0_roundtrip() {
        roundtrip(&FixtureSpec::tiny_llama(), GgmlType::Q8_0, 7);
    }

    #[test]
    fn writers_gguf_qwen2_roundtrip() {
        roundtrip(&FixtureSpec::tiny_qwen2(), GgmlType::F16, 1);
    }

    #[test]
    fn writers_qk_permutation() {
        // GGUF row g*hd + 2i + j holds HF row g*hd + j*(hd/2) + i; hd = 8 → 0,4,1,5,2,6,3,7.
        let order: Vec<usize> = (0..16).map(|r| hf_row_of_gguf_row(r, 16, 2)).collect();
        assert_eq!(
            order,
            [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
        );
        let v: Vec<f32> = (0..16 * 32).map(|x| x as f32).collect();
        let t = TensorRef::from_f32("q", vec![16, 32], &v).expect("test step");
        let g = gguf_order(&t, Some(2)).expect("test step");
        let stored = g.to_f32();
        assert_eq!(&stored[32..64], &v[4 * 32..5 * 32]);
        let back = crate::model::gguf::unpermute_rows(&stored, 2, 32).expect("test step");
        assert_eq!(back, v);
        // A reader-side interleaved tensor over those bytes reads back in HF order.
        let mut r = TensorRef::from_f32("q", vec![16, 32], &stored).expect("test step");
        r.rope_interleaved_heads = Some(2);
        assert_eq!(r.to_f32(), v);
        assert_eq!(gguf_order(&r, Some(2)).expect("test step").to_f32(), stored);
    }

    #[test]
    fn writers_cancel_leaves_no_file() {
        let tmp = tempfile::tempdir().expect("test step");
        let dir = tmp.path().join("m");
        write_fixture(&FixtureSpec::tiny_llama(), &dir).expect("test step");
        let src = SourceModel::open(&dir).expect("test step");
        let out = tmp.path().join("c.gguf");
        let err = crate::output::write_staged(crate::output::OutputSpec::file(&out), |tmp| {
            write_gguf(
                &src,
                &plan_all(&src, GgmlType::F16),
                1,
                tmp,
                &mut quantize_tensor_rows,
                &mut |done, _| done < 3,
            )
        })
        .expect_err("must fail");
        assert!(matches!(err, Error::Cancelled));
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("test step")
            .map(|e| e.expect("test step").file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn writers_sha256() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// Writes SmolLM2 as F16 GGUF to `$QS_GGUF_OUT` (or a temp file) and reopens it.
    #[test]
    #[ignore = "needs the SmolLM2 GGUF"]
    fn writers_smollm2_f16() {
        let src =
            crate::model::gguf_model::open(&crate::testing::smollm2_gguf()).expect("test step");
        let tmp = tempfile::tempdir().expect("test step");
        let out = std::env::var_os("QS_GGUF_OUT")
            .map_or_else(|| tmp.path().join("smollm2-f16.gguf"), PathBuf::from);
        write_gguf(
            &src,
            &plan_all(&src, GgmlType::F16),
            1,
            &out,
            &mut quantize_tensor_rows,
            &mut |_, _| true,
        )
        .expect("test step");
        let back = crate::model::gguf_model::open(&out).expect("test step");
        assert_eq!(back.config, src.config);
        let text = "Hello, world! How are you today?";
        assert_eq!(
            back.tokenizer.encode(text, true).expect("test step"),
            src.tokenizer.encode(text, true).expect("test step")
        );
    }
}
