//! GGUF files: a reader that treats its input as hostile, and the mapping of GGUF names to Hugging Face
//! names ([`super::gguf_model`] presents a llama/qwen2 GGUF as a `SourceModel` with it).
//!
//! Container layout: gguf.md §1. The reader checks every length, count and offset against the bytes that
//! are actually there before it allocates or slices, uses checked arithmetic throughout, and reports
//! problems as [`Error::Malformed`] naming the file and what is wrong. Allocations stay within a small
//! constant multiple of the file's size whatever the header claims.
//!
//! Tensors stay in the memory-mapped file: `gguf_model::open` builds `TensorRef`s over slices of the map. A
//! `llama` GGUF's `attn_q`/`attn_k` rows are in llama.cpp's interleaved-RoPE order (gguf.md §1.8); their
//! handles carry `rope_interleaved_heads` so readers see Hugging Face's order.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codecs::GgmlType;
use crate::tensor::Backing;
use crate::{Error, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// Longest metadata key or tensor name we accept (llama.cpp itself stops tensor names at 63 bytes).
const MAX_NAME_BYTES: usize = 65_536;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Fixed header: magic, version, n_tensors, n_kv.
const HEADER_BYTES: usize = 24;

/// GGUF value type ids (`gguf_type`).
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;

    /// The name gguf.h uses for type `id`.
    pub fn name(id: u32) -> &'static str {
        match id {
            U8 => "UINT8",
            I8 => "INT8",
            U16 => "UINT16",
            I16 => "INT16",
            U32 => "UINT32",
            I32 => "INT32",
            F32 => "FLOAT32",
            BOOL => "BOOL",
            STRING => "STRING",
            ARRAY => "ARRAY",
            U64 => "UINT64",
            I64 => "INT64",
            F64 => "FLOAT64",
            _ => "unknown",
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: all elements of one scalar or string type (GGUF has no nested arrays).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    /// The GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        use value_type as t;
        match self {
            GgufValue::U8(_) => t::U8,
            GgufValue::I8(_) => t::I8,
            GgufValue::U16(_) => t::U16,
            GgufValue::I16(_) => t::I16,
            GgufValue::U32(_) => t::U32,
            GgufValue::I32(_) => t::I32,
            GgufValue::F32(_) => t::F32,
            GgufValue::Bool(_) => t::BOOL,
            GgufValue::Str(_) => t::STRING,
            GgufValue::Array(_) => t::ARRAY,
            GgufValue::U64(_) => t::U64,
            GgufValue::I64(_) => t::I64,
            GgufValue::F64(_) => t::F64,
        }
    }

    /// A readable type name: `UINT32`, `ARRAY[STRING]`.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("ARRAY[{}]", value_type::name(a.elem_type_id())),
            v => value_type::name(v.type_id()).to_string(),
        }
    }

    /// Any integer type, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float (F32 or F64) or an integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    /// A bool, or an integer (nonzero is true, as llama.cpp reads bools).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => self.as_i128().map(|v| v != 0),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufArray {
    /// The GGUF type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        use value_type as t;
        match self {
            GgufArray::U8(_) => t::U8,
            GgufArray::I8(_) => t::I8,
            GgufArray::U16(_) => t::U16,
            GgufArray::I16(_) => t::I16,
            GgufArray::U32(_) => t::U32,
            GgufArray::I32(_) => t::I32,
            GgufArray::F32(_) => t::F32,
            GgufArray::Bool(_) => t::BOOL,
            GgufArray::Str(_) => t::STRING,
            GgufArray::U64(_) => t::U64,
            GgufArray::I64(_) => t::I64,
            GgufArray::F64(_) => t::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::Str(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as strings, if this is a string array.
    pub fn as_strs(&self) -> Option<&[String]> {
        match self {
            GgufArray::Str(v) => Some(v),
            _ => None,
        }
    }

    /// The elements widened to i128, if this is an integer (or bool) array.
    pub fn to_ints(&self) -> Option<Vec<i128>> {
        fn w<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            GgufArray::U8(v) => w(v),
            GgufArray::I8(v) => w(v),
            GgufArray::U16(v) => w(v),
            GgufArray::I16(v) => w(v),
            GgufArray::U32(v) => w(v),
            GgufArray::I32(v) => w(v),
            GgufArray::U64(v) => w(v),
            GgufArray::I64(v) => w(v),
            GgufArray::Bool(v) => v.iter().map(|&b| i128::from(b)).collect(),
            _ => return None,
        })
    }

    /// The elements as f32, if this is a float or integer array.
    pub fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            GgufArray::F32(v) => Some(v.clone()),
            GgufArray::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => self
                .to_ints()
                .map(|v| v.into_iter().map(|x| x as f32).collect()),
        }
    }
}

/// Block geometry `(name, elements per block, bytes per block)` of every ggml type id llama.cpp defines,
/// decodable by us or not, so the reader can lay out any file. `None` for retired or unknown ids.
pub fn ggml_type_geometry(id: u32) -> Option<(&'static str, u64, u64)> {
    if let Some(t) = GgmlType::from_ggml_id(id) {
        let t = t.traits();
        return Some((t.name, t.block_elems as u64, t.block_bytes as u64));
    }
    Some(match id {
        9 => ("Q8_1", 32, 36),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        40 => ("NVFP4", 64, 36),
        41 => ("Q1_0", 128, 18),
        42 => ("Q2_0", 64, 18),
        _ => return None,
    })
}

/// One tensor-info record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml dimensions, `ne[0]` (the row length) first; as many as the file stores.
    pub ne: Vec<u64>,
    /// The ggml type id.
    pub ggml_type: u32,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Stored size in bytes (without padding).
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The type, if we can decode it.
    pub fn ty(&self) -> Option<GgmlType> {
        GgmlType::from_ggml_id(self.ggml_type)
    }

    /// The ggml name of the type (`"Q4_K"`).
    pub fn type_name(&self) -> &'static str {
        ggml_type_geometry(self.ggml_type).map_or("unknown", |g| g.0)
    }

    /// PyTorch shape order: `ne` reversed, with `ne`'s trailing 1s dropped (at least one dimension).
    pub fn torch_shape(&self) -> Vec<usize> {
        let mut n = self.ne.len();
        while n > 1 && self.ne[n - 1] == 1 {
            n -= 1;
        }
        if n == 0 {
            return vec![1];
        }
        self.ne[..n].iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF header: metadata, tensor infos and where the data lives.
#[derive(Clone, Debug)]
pub struct GgufFile {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// 2 or 3.
    pub version: u32,
    /// `general.alignment`, or 32.
    pub alignment: u32,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// Length of the file in bytes.
    pub file_size: u64,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// Up to `buf.len()` bytes from the start of `file`.
fn read_head(mut file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read as _;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The error for a file that is not a GGUF file, judged by its first bytes `head`: what was expected, what the
/// file looks like instead, and what to open. `None` when `head` starts with the GGUF magic.
pub fn not_gguf(path: &Path, head: &[u8]) -> Option<Error> {
    if head.starts_with(&GGUF_MAGIC) {
        return None;
    }
    let found = describe_head(head);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let folder_file = name == "config.json"
        || name.ends_with(".safetensors")
        || name.starts_with("tokenizer")
        || name == "generation_config.json"
        || name.ends_with(".safetensors.index.json");
    let what_to_do = match path
        .parent()
        .filter(|p| folder_file && !p.as_os_str().is_empty())
    {
        Some(dir) => format!(
            "it belongs to a Hugging Face model folder: open the folder itself ({})",
            dir.display()
        ),
        None => {
            "open a .gguf file, or a Hugging Face model folder (the folder that holds config.json, \
                 tokenizer.json and *.safetensors)"
                .to_owned()
        }
    };
    Some(Error::Invalid(format!(
        "{}: not a model file. A .gguf file starts with the letters \"GGUF\"; this one {found}. To fix: \
         {what_to_do}.",
        path.display()
    )))
}

/// A short description of what a file starting with `head` looks like, for error messages.
fn describe_head(head: &[u8]) -> String {
    if head.is_empty() {
        return "is empty".into();
    }
    if head.len() >= 9 && head[8] == b'{' {
        let n = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        if n > 1 && n < 1 << 30 {
            return "is a safetensors file (weights only)".into();
        }
    }
    if head.starts_with(b"PK\x03\x04") {
        return "is a zip archive (a .zip, a .whl, or a PyTorch .bin/.pt checkpoint); unpack it, or convert a \
                PyTorch checkpoint to safetensors first"
            .into();
    }
    if head.starts_with(&[0x1f, 0x8b]) || head.starts_with(b"7z") || head.starts_with(b"\xfd7zXZ") {
        return "is a compressed archive; unpack it first".into();
    }
    let text = String::from_utf8_lossy(head);
    let printable = text
        .chars()
        .filter(|c| *c != char::REPLACEMENT_CHARACTER)
        .all(|c| !c.is_control() || c.is_whitespace());
    if printable && !text.starts_with(char::REPLACEMENT_CHARACTER) {
        let start: String = text
            .chars()
            .take(24)
            .map(|c| if c.is_whitespace() { ' ' } else { c })
            .collect();
        return format!("holds text (\"{}…\")", start.trim_end());
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("starts with the bytes {}", hex.join(" "))
}

impl GgufFile {
    /// Memory-map `path` and parse its header. The map is returned for zero-copy tensor access.
    pub fn read(path: &Path) -> Result<(GgufFile, Arc<Backing>)> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = [0u8; 64];
        let n = read_head(&file, &mut head).map_err(|e| Error::io(path, e))?;
        if let Some(e) = not_gguf(path, &head[..n]) {
            return Err(e);
        }
        if len < HEADER_BYTES as u64 {
            return Err(Error::malformed(
                path,
                "GGUF",
                format!("file is {len} bytes, too short for a GGUF header ({HEADER_BYTES} bytes)"),
            ));
        }
        let map = map_file(path, &file)?;
        let g = GgufFile::parse(path, &map)?;
        Ok((g, Arc::new(Backing::Mmap(map))))
    }

    /// Parse a whole GGUF file held in `bytes`; `path` only names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
        Parser {
            r: Cursor { buf: bytes, pos: 0 },
            path,
        }
        .file()
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor named `name` (GGUF name).
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    fn wrong_type(&self, key: &str, v: &GgufValue, want: &str) -> Error {
        Error::malformed(
            &self.path,
            "GGUF",
            format!("key {key} has type {}, expected {want}", v.type_name()),
        )
    }

    fn int_in<T: TryFrom<i128>>(&self, key: &str, want: &str) -> Result<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let i = v.as_i128().ok_or_else(|| self.wrong_type(key, v, want))?;
        T::try_from(i).map(Some).map_err(|_| {
            Error::malformed(
                &self.path,
                "GGUF",
                format!("key {key} = {i} does not fit {want}"),
            )
        })
    }

    /// An integer key of any integer type that fits u32. `Ok(None)` when absent; an error when it has
    /// another type or does not fit.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.int_in(key, "an unsigned 32-bit integer")
    }

    /// An integer key of any integer type that fits u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.int_in(key, "an unsigned 64-bit integer")
    }

    /// An integer key of any integer type that fits i64.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.int_in(key, "a 64-bit integer")
    }

    /// An integer key of any integer type that fits usize.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.int_in(key, "a non-negative integer")
    }

    /// A float key (F32, F64, or an integer).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|f| Some(f as f32))
                .ok_or_else(|| self.wrong_type(key, v, "a number")),
        }
    }

    /// A bool key (BOOL, or an integer: nonzero is true).
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "BOOL")),
        }
    }

    /// A string key.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "STRING")),
        }
    }

    /// A string-array key.
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .and_then(GgufArray::as_strs)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "ARRAY[STRING]")),
        }
    }

    /// An integer-array key (any integer element type), as i64.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let ints = v
            .as_array()
            .and_then(GgufArray::to_ints)
            .ok_or_else(|| self.wrong_type(key, v, "an integer array"))?;
        ints.into_iter()
            .map(|i| {
                i64::try_from(i).map_err(|_| {
                    Error::malformed(
                        &self.path,
                        "GGUF",
                        format!("key {key}: element {i} does not fit i64"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A float-array key (F32, F64 or integer elements), as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_array()
            .and_then(GgufArray::to_f32s)
            .map(Some)
            .ok_or_else(|| self.wrong_type(key, v, "a number array"))
    }

    /// A per-model integer that may be stored per layer (an array): the single value, or an error if the
    /// layers differ (which we do not support).
    pub(crate) fn get_uniform_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            Some(GgufValue::Array(_)) => {
                let v = self.get_int_array(key)?.unwrap_or_default();
                let Some(&first) = v.first() else {
                    return Err(Error::malformed(
                        &self.path,
                        "GGUF",
                        format!("key {key} is an empty array"),
                    ));
                };
                if v.iter().any(|&x| x != first) {
                    return Err(Error::unsupported(
                        &self.path,
                        format!("{key} differs between layers; only uniform layers are supported"),
                    ));
                }
                usize::try_from(first).map(Some).map_err(|_| {
                    Error::malformed(
                        &self.path,
                        "GGUF",
                        format!("key {key} = {first} is negative"),
                    )
                })
            }
            _ => self.get_usize(key),
        }
    }

    pub(crate) fn require<T>(&self, key: &str, v: Option<T>) -> Result<T> {
        v.ok_or_else(|| {
            Error::malformed(&self.path, "GGUF", format!("required key {key} is missing"))
        })
    }

    /// Absolute byte range of tensor `t` in the file.
    pub fn tensor_range(&self, t: &GgufTensorInfo) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(self.data_offset.checked_add(t.offset)?).ok()?;
        let end = start.checked_add(usize::try_from(t.n_bytes).ok()?)?;
        Some(start..end)
    }
}

/// Map `file` read-only.
#[allow(unsafe_code)]
fn map_file(path: &Path, file: &File) -> Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and private to this process. memmap2 requires that the file is not
    // truncated or modified by anyone while mapped (that would change or unmap bytes behind `&[u8]`s);
    // model files are treated as immutable while open, as in every mmap-based model loader, and nothing
    // in this program writes to a file it has mapped.
    unsafe { memmap2::Mmap::map(file) }.map_err(|e| Error::io(path, e))
}

/// Bounds-checked little-endian reads over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
}

struct Parser<'a, 'p> {
    r: Cursor<'a>,
    path: &'p Path,
}

macro_rules! read_le {
    ($name:ident, $t:ty) => {
        fn $name(&mut self, what: &str) -> Result<$t> {
            match self.r.array() {
                Some(b) => Ok(<$t>::from_le_bytes(b)),
                None => Err(self.truncated(what)),
            }
        }
    };
}

impl<'a> Parser<'a, '_> {
    fn err(&self, detail: impl Into<String>) -> Error {
        Error::malformed(self.path, "GGUF", detail)
    }

    fn truncated(&self, what: &str) -> Error {
        self.err(format!(
            "file ends at byte {} while reading {what} (truncated?)",
            self.r.buf.len()
        ))
    }

    read_le!(u8, u8);
    read_le!(i8, i8);
    read_le!(u16, u16);
    read_le!(i16, i16);
    read_le!(u32, u32);
    read_le!(i32, i32);
    read_le!(u64, u64);
    read_le!(i64, i64);
    read_le!(f32, f32);
    read_le!(f64, f64);

    /// A count of items each taking at least `min_bytes` in the file: rejected unless that many bytes
    /// remain, so a hostile count can never drive an allocation.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_bytes.max(1)))
            .is_some_and(|need| need <= self.r.remaining());
        if !fits {
            return Err(self.err(format!(
                "{what} is {n}, but only {} bytes remain after byte {}",
                self.r.remaining(),
                self.r.pos
            )));
        }
        Ok(n as usize)
    }

    fn raw_string(&mut self, what: &str, max: usize) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        if len > max as u64 {
            return Err(self.err(format!("{what} claims {len} bytes (limit {max})")));
        }
        if len > self.r.remaining() as u64 {
            return Err(self.err(format!(
                "{what} claims {len} bytes, but only {} remain after byte {}",
                self.r.remaining(),
                self.r.pos
            )));
        }
        self.r
            .take(len as usize)
            .ok_or_else(|| self.truncated(what))
    }

    /// A key or tensor name: non-empty, valid UTF-8.
    fn name(&mut self, what: &str) -> Result<String> {
        let at = self.r.pos;
        let b = self.raw_string(what, MAX_NAME_BYTES)?;
        if b.is_empty() {
            return Err(self.err(format!("{what} at byte {at} is empty")));
        }
        String::from_utf8(b.to_vec())
            .map_err(|_| self.err(format!("{what} at byte {at} is not valid UTF-8")))
    }

    /// A string value. Invalid UTF-8 is replaced (U+FFFD) rather than rejected: some vocabularies carry
    /// byte-level junk and llama.cpp reads them as bytes.
    fn string_value(&mut self, what: &str) -> Result<String> {
        let b = self.raw_string(what, usize::MAX)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue> {
        use value_type as t;
        Ok(match ty {
            t::U8 => GgufValue::U8(self.u8(key)?),
            t::I8 => GgufValue::I8(self.i8(key)?),
            t::U16 => GgufValue::U16(self.u16(key)?),
            t::I16 => GgufValue::I16(self.i16(key)?),
            t::U32 => GgufValue::U32(self.u32(key)?),
            t::I32 => GgufValue::I32(self.i32(key)?),
            t::F32 => GgufValue::F32(self.f32(key)?),
            t::BOOL => GgufValue::Bool(self.u8(key)? != 0),
            t::STRING => GgufValue::Str(self.string_value(key)?),
            t::ARRAY => GgufValue::Array(self.array(key)?),
            t::U64 => GgufValue::U64(self.u64(key)?),
            t::I64 => GgufValue::I64(self.i64(key)?),
            t::F64 => GgufValue::F64(self.f64(key)?),
            other => return Err(self.err(format!("key {key} has unknown value type {other}"))),
        })
    }

    fn array(&mut self, key: &str) -> Result<GgufArray> {
        use value_type as t;
        let et = self.u32(key)?;
        let size = match et {
            t::U8 | t::I8 | t::BOOL => 1,
            t::U16 | t::I16 => 2,
            t::U32 | t::I32 | t::F32 => 4,
            t::U64 | t::I64 | t::F64 | t::STRING => 8,
            t::ARRAY => {
                return Err(self.err(format!("key {key} is a nested array (not allowed in GGUF)")))
            }
            other => return Err(self.err(format!("key {key} is an array of unknown type {other}"))),
        };
        let what = format!("element count of array {key}");
        let n = self.count(&what, size)?;
        if et == t::STRING {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(self.string_value(key)?);
            }
            return Ok(GgufArray::Str(v));
        }
        // n * size bytes are known to be there.
        let bytes = self.r.take(n * size).ok_or_else(|| self.truncated(key))?;
        fn each<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match et {
            t::U8 => GgufArray::U8(bytes.to_vec()),
            t::I8 => GgufArray::I8(bytes.iter().map(|&b| b as i8).collect()),
            t::BOOL => GgufArray::Bool(bytes.iter().map(|&b| b != 0).collect()),
            t::U16 => GgufArray::U16(each(bytes, u16::from_le_bytes)),
            t::I16 => GgufArray::I16(each(bytes, i16::from_le_bytes)),
            t::U32 => GgufArray::U32(each(bytes, u32::from_le_bytes)),
            t::I32 => GgufArray::I32(each(bytes, i32::from_le_bytes)),
            t::F32 => GgufArray::F32(each(bytes, f32::from_le_bytes)),
            t::U64 => GgufArray::U64(each(bytes, u64::from_le_bytes)),
            t::I64 => GgufArray::I64(each(bytes, i64::from_le_bytes)),
            _ => GgufArray::F64(each(bytes, f64::from_le_bytes)),
        })
    }

    fn tensor_info(&mut self, i: usize) -> Result<GgufTensorInfo> {
        let name = self.name(&format!("name of tensor {i}"))?;
        let n_dims = self.u32(&format!("dimension count of tensor {name}"))?;
        if n_dims > MAX_DIMS {
            return Err(self.err(format!(
                "tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = self.i64(&format!("dimensions of tensor {name}"))?;
            let d = u64::try_from(d)
                .map_err(|_| self.err(format!("tensor {name} has a negative dimension {d}")))?;
            ne.push(d);
        }
        let ggml_type = self.u32(&format!("type of tensor {name}"))?;
        let offset = self.u64(&format!("offset of tensor {name}"))?;
        let Some((tname, blck, tsize)) = ggml_type_geometry(ggml_type) else {
            return Err(self.err(format!(
                "tensor {name} has unknown ggml type id {ggml_type}"
            )));
        };
        let ne0 = ne.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(blck) {
            return Err(self.err(format!(
                "tensor {name}: row length {ne0} is not a multiple of {tname}'s block size {blck}"
            )));
        }
        let too_big = || self.err(format!("tensor {name}: size of shape {ne:?} overflows"));
        let rows = ne
            .iter()
            .skip(1)
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(too_big)?;
        ne.iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(too_big)?;
        let n_bytes = (ne0 / blck)
            .checked_mul(tsize)
            .and_then(|rb| rb.checked_mul(rows))
            .ok_or_else(too_big)?;
        Ok(GgufTensorInfo {
            name,
            ne,
            ggml_type,
            offset,
            n_bytes,
        })
    }

    fn file(mut self) -> Result<GgufFile> {
        let file_size = self.r.buf.len() as u64;
        let magic: [u8; 4] = self.r.array().ok_or_else(|| self.truncated("the magic"))?;
        if magic != GGUF_MAGIC {
            let head = &self.r.buf[..self.r.buf.len().min(64)];
            return Err(not_gguf(self.path, head)
                .unwrap_or_else(|| self.err("not a GGUF file: it does not start with \"GGUF\"")));
        }
        let version = self.u32("the version")?;
        match version {
            2 | 3 => {}
            0 => return Err(self.err("GGUF version 0 is invalid")),
            1 => {
                return Err(
                    self.err("GGUF version 1 is obsolete and not supported (re-convert the model)")
                )
            }
            v if v & 0xFFFF == 0 => {
                return Err(self.err(format!(
                    "version field {v:#x} looks byte-swapped: big-endian GGUF is not supported"
                )))
            }
            v => return Err(self.err(format!("GGUF version {v} is not supported (2 and 3 are)"))),
        }
        let n_tensors = self.i64("the tensor count")?;
        let n_kv = self.i64("the metadata count")?;
        if n_tensors < 0 || n_kv < 0 {
            return Err(self.err(format!(
                "negative counts: {n_tensors} tensors, {n_kv} metadata keys"
            )));
        }
        // Each KV takes at least 8 (key length) + 1 (key) + 4 (type) + 1 bytes; each tensor info at
        // least 8 + 1 + 4 + 4 + 8.
        let check = |n: i64, min: u64, what: &str| -> Result<usize> {
            let rem = self.r.remaining() as u64;
            match (n as u64).checked_mul(min) {
                Some(need) if need <= rem => Ok(n as usize),
                _ => Err(self.err(format!(
                    "header claims {n} {what}, more than the {rem} remaining bytes can hold"
                ))),
            }
        };
        let n_kv = check(n_kv, 14, "metadata keys")?;
        let n_tensors = check(n_tensors, 25, "tensors")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = self.name(&format!("metadata key {i}"))?;
            let ty = self.u32(&format!("type of key {key}"))?;
            let v = self.value(ty, &key)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(self.err(format!("duplicate metadata key {key}")));
            }
            metadata.push((key, v));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => *a,
            Some(GgufValue::U32(a)) => {
                return Err(self.err(format!("general.alignment = {a} is not a power of two")))
            }
            Some(v) => {
                return Err(self.err(format!(
                    "general.alignment has type {}, expected UINT32",
                    v.type_name()
                )))
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let t = self.tensor_info(i)?;
            if tensor_index.insert(t.name.clone(), i).is_some() {
                return Err(self.err(format!("duplicate tensor name {}", t.name)));
            }
            tensors.push(t);
        }

        let end_of_infos = self.r.pos as u64;
        let data_offset = if n_tensors > 0 {
            let a = u64::from(alignment);
            end_of_infos.div_ceil(a) * a
        } else {
            end_of_infos
        };
        if n_tensors > 0 && data_offset > file_size {
            return Err(self.err(format!(
                "data section would start at byte {data_offset}, past the end of the {file_size}-byte file (truncated?)"
            )));
        }

        // Every tensor inside the file, no two overlapping.
        let mut ranges = Vec::with_capacity(n_tensors);
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes))
                .filter(|&e| e <= file_size);
            let Some(end) = end else {
                return Err(self.err(format!(
                    "tensor {} ({} bytes at data offset {}) extends past the end of the {file_size}-byte file (truncated?)",
                    t.name, t.n_bytes, t.offset
                )));
            };
            if t.n_bytes > 0 {
                ranges.push((end - t.n_bytes, end, &t.name));
            }
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(self.err(format!("tensors {} and {} overlap", w[0].2, w[1].2)));
            }
        }

        Ok(GgufFile {
            path: self.path.to_path_buf(),
            version,
            alignment,
            data_offset,
            file_size,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }
}

/// GGUF ↔ Hugging Face tensor names (llama/qwen2 naming), one table for both directions: whole-model
/// tensors, then the parts of decoder layer `N` (`blk.N.<gguf>.{weight,bias}` ↔
/// `model.layers.N.<hf>.{weight,bias}`).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// A layer index as written in a tensor name: digits, no leading zero.
fn layer_index(s: &str) -> Option<&str> {
    let ok = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && !(s.len() > 1 && s.starts_with('0'));
    ok.then_some(s)
}

/// The Hugging Face name of GGUF tensor `name` (llama/qwen2 naming), `None` if it has none.
pub fn hf_tensor_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == name) {
        return Some((*hf).to_string());
    }
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let layer = layer_index(layer)?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The GGUF name of Hugging Face tensor `hf` (llama/qwen2 naming), `None` if it has none.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some((*g).to_string());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer = layer_index(layer)?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == part)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Undo llama.cpp's Q/K row permutation for `rows × cols` values stored row-major (see
/// [`crate::tensor::interleaved_row`]). `None` if the rows do not split into `heads` heads of even size.
pub fn unpermute_rows(stored: &[f32], heads: usize, cols: usize) -> Option<Vec<f32>> {
    if heads == 0 || cols == 0 || !stored.len().is_multiple_of(cols) {
        return None;
    }
    let rows = stored.len() / cols;
    if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let mut out = vec![0.0f32; stored.len()];
    for (dst, row) in out.chunks_exact_mut(cols).enumerate() {
        let src = crate::tensor::interleaved_row(dst, rows, heads);
        row.copy_from_slice(&stored[src * cols..(src + 1) * cols]);
    }
    Some(out)
}

/// Test helpers: a byte-wise GGUF writer (independent of the reader) and the real-model path.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn put_str(o: &mut Vec<u8>, s: &str) {
        o.extend_from_slice(&(s.len() as u64).to_le_bytes());
        o.extend_from_slice(s.as_bytes());
    }

    /// The payload of `v` (without its type id).
    pub fn put_value(o: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => o.push(*x),
            GgufValue::I8(x) => o.push(*x as u8),
            GgufValue::U16(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => o.push(u8::from(*x)),
            GgufValue::Str(s) => put_str(o, s),
            GgufValue::U64(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => o.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Array(a) => {
                o.extend_from_slice(&a.elem_type_id().to_le_bytes());
                o.extend_from_slice(&(a.len() as u64).to_le_bytes());
                macro_rules! each {
                    ($v:expr) => {
                        for x in $v {
                            o.extend_from_slice(&x.to_le_bytes());
                        }
                    };
                }
                match a {
                    GgufArray::U8(v) => o.extend_from_slice(v),
                    GgufArray::I8(v) => o.extend(v.iter().map(|&x| x as u8)),
                    GgufArray::Bool(v) => o.extend(v.iter().map(|&x| u8::from(x))),
                    GgufArray::U16(v) => each!(v),
                    GgufArray::I16(v) => each!(v),
                    GgufArray::U32(v) => each!(v),
                    GgufArray::I32(v) => each!(v),
                    GgufArray::F32(v) => each!(v),
                    GgufArray::U64(v) => each!(v),
                    GgufArray::I64(v) => each!(v),
                    GgufArray::F64(v) => each!(v),
                    GgufArray::Str(v) => {
                        for s in v {
                            put_str(o, s);
                        }
                    }
                }
            }
        }
    }

    /// One tensor-info record to write.
    #[derive(Clone, Debug)]
    pub struct TSpec {
        pub name: String,
        pub ne: Vec<i64>,
        pub ty: u32,
        pub offset: u64,
    }

    /// A GGUF file to write, every header field settable (including to lies).
    #[derive(Clone, Debug)]
    pub struct Spec {
        pub magic: [u8; 4],
        pub version: u32,
        /// Override of the tensor / KV counts in the header.
        pub n_tensors: Option<u64>,
        pub n_kv: Option<u64>,
        pub kvs: Vec<(String, GgufValue)>,
        pub tensors: Vec<TSpec>,
        /// Alignment used to place the data section (not written as a key unless in `kvs`).
        pub align: u64,
        pub data: Vec<u8>,
    }

    impl Spec {
        pub fn new(kvs: Vec<(String, GgufValue)>, tensors: Vec<TSpec>, data: Vec<u8>) -> Self {
            Self {
                magic: GGUF_MAGIC,
                version: 3,
                n_tensors: None,
                n_kv: None,
                kvs,
                tensors,
                align: 32,
                data,
            }
        }

        pub fn bytes(&self) -> Vec<u8> {
            let mut o = Vec::new();
            o.extend_from_slice(&self.magic);
            o.extend_from_slice(&self.version.to_le_bytes());
            o.extend_from_slice(
                &self
                    .n_tensors
                    .unwrap_or(self.tensors.len() as u64)
                    .to_le_bytes(),
            );
            o.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
            for (k, v) in &self.kvs {
                put_str(&mut o, k);
                o.extend_from_slice(&v.type_id().to_le_bytes());
                put_value(&mut o, v);
            }
            for t in &self.tensors {
                put_str(&mut o, &t.name);
                o.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
                for d in &t.ne {
                    o.extend_from_slice(&d.to_le_bytes());
                }
                o.extend_from_slice(&t.ty.to_le_bytes());
                o.extend_from_slice(&t.offset.to_le_bytes());
            }
            if !self.tensors.is_empty() {
                while !(o.len() as u64).is_multiple_of(self.align) {
                    o.push(0);
                }
            }
            o.extend_from_slice(&self.data);
            o
        }
    }

    pub fn kv(k: &str, v: GgufValue) -> (String, GgufValue) {
        (k.to_string(), v)
    }

    pub fn t(name: &str, ne: &[i64], ty: u32, offset: u64) -> TSpec {
        TSpec {
            name: name.to_string(),
            ne: ne.to_vec(),
            ty,
            offset,
        }
    }

    /// The SmolLM2-135M-Instruct GGUF: `$QS_SMOLLM2`, else fetched by `../shared/scripts/fetch-smollm2.sh`
    /// (relative to the repository root). Panics (fails the test) when it cannot be had.
    pub fn smollm2_path() -> PathBuf {
        if let Ok(p) = std::env::var("QS_SMOLLM2") {
            if Path::new(&p).is_file() {
                return PathBuf::from(p);
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new("bash")
            .arg("../shared/scripts/fetch-smollm2.sh")
            .current_dir(&root)
            .output()
            .expect("run ../shared/scripts/fetch-smollm2.sh");
        assert!(
            out.status.success(),
            "fetch-smollm2.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().map(str::trim).unwrap_or_default();
        assert!(
            Path::new(last).is_file(),
            "fetch-smollm2.sh printed {last:?}, not a file"
        );
        PathBuf::from(last)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    fn parse(b: &[u8]) -> Result<GgufFile> {
        GgufFile::parse(Path::new("test.gguf"), b)
    }

    /// Parse `b`, which must fail; the message.
    fn fails(b: &[u8]) -> String {
        match parse(b) {
            Ok(g) => panic!("parsed a bad file: {g:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn f16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_bits().to_le_bytes()
    }

    /// A small valid file: three keys, an F32 vector `a` [8] and a Q8_0 matrix `b` (ne [32, 2]) ending
    /// exactly at the end of the file (no trailing padding, so every shorter prefix is truncated).
    fn base() -> Spec {
        let mut data = Vec::new();
        for i in 0..8 {
            data.extend_from_slice(&(i as f32 + 0.5).to_le_bytes());
        }
        data.extend_from_slice(&f16(0.5));
        data.extend((0..32).map(|i: i32| i as u8));
        data.extend_from_slice(&f16(-2.0));
        data.extend((0..32).map(|i: i32| (i - 16) as u8));
        Spec::new(
            vec![
                kv("general.architecture", GgufValue::Str("test".into())),
                kv("test.arr", GgufValue::Array(GgufArray::I32(vec![1, -2, 3]))),
                kv(
                    "test.strs",
                    GgufValue::Array(GgufArray::Str(vec!["a".into(), "bc".into()])),
                ),
            ],
            vec![t("a", &[8], 0, 0), t("b", &[32, 2], 8, 32)],
            data,
        )
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len())
            .position(|w| w == needle)
            .expect("needle in file")
    }

    #[test]
    fn gguf_minimal_file_parses_and_dequantises() {
        let b = base().bytes();
        let g = parse(&b).expect("valid file");
        assert_eq!(g.version, 3);
        assert_eq!(g.alignment, 32);
        assert_eq!(g.data_offset % 32, 0);
        assert_eq!(g.file_size, b.len() as u64);
        assert_eq!(
            g.get_str("general.architecture").expect("str"),
            Some("test")
        );
        assert_eq!(
            g.get_int_array("test.arr").expect("ints"),
            Some(vec![1, -2, 3])
        );
        assert_eq!(
            g.get_str_array("test.strs").expect("strs"),
            Some(&["a".to_string(), "bc".to_string()][..])
        );
        assert!(g.get_u32("test.strs").is_err(), "wrong type is an error");
        assert_eq!(g.get_u32("absent").expect("absent"), None);
        let tb = g.tensor("b").expect("tensor b");
        assert_eq!(
            (tb.ggml_type, tb.n_bytes, tb.torch_shape()),
            (8, 68, vec![2, 32])
        );
        let r = g.tensor_range(tb).expect("range");
        let mut out = vec![0.0f32; 64];
        GgmlType::Q8_0.dequantize(&b[r], &mut out);
        for i in 0..32 {
            assert_eq!(out[i], i as f32 * 0.5);
            assert_eq!(out[32 + i], (i as f32 - 16.0) * -2.0);
        }
    }

    #[test]
    fn gguf_every_value_type_round_trips() {
        let vals = vec![
            GgufValue::U8(200),
            GgufValue::I8(-100),
            GgufValue::U16(60000),
            GgufValue::I16(-30000),
            GgufValue::U32(4_000_000_000),
            GgufValue::I32(-2_000_000_000),
            GgufValue::F32(1.5),
            GgufValue::Bool(true),
            GgufValue::Str("héllo".into()),
            GgufValue::U64(u64::MAX),
            GgufValue::I64(i64::MIN),
            GgufValue::F64(0.1),
            GgufValue::Array(GgufArray::U8(vec![1, 2])),
            GgufValue::Array(GgufArray::I8(vec![-1])),
            GgufValue::Array(GgufArray::U16(vec![7])),
            GgufValue::Array(GgufArray::I16(vec![-7])),
            GgufValue::Array(GgufArray::U32(vec![1, 2, 3])),
            GgufValue::Array(GgufArray::I32(vec![])),
            GgufValue::Array(GgufArray::F32(vec![0.25, -1.0])),
            GgufValue::Array(GgufArray::Bool(vec![true, false])),
            GgufValue::Array(GgufArray::Str(vec!["x".into(), String::new()])),
            GgufValue::Array(GgufArray::U64(vec![9])),
            GgufValue::Array(GgufArray::I64(vec![-9])),
            GgufValue::Array(GgufArray::F64(vec![2.5])),
        ];
        let kvs: Vec<_> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| kv(&format!("k{i}"), v.clone()))
            .collect();
        let g = parse(&Spec::new(kvs.clone(), vec![], vec![]).bytes()).expect("parse");
        assert_eq!(g.metadata(), &kvs[..]);
        assert_eq!(g.get_u32("k4").expect("u32"), Some(4_000_000_000));
        assert_eq!(g.get_i64("k1").expect("i8 as i64"), Some(-100));
        assert!(g.get_u32("k1").is_err(), "negative does not fit u32");
        assert!(g.get_u32("k9").is_err(), "u64::MAX does not fit u32");
        assert_eq!(g.get_f32("k11").expect("f64"), Some(0.1f64 as f32));
        assert_eq!(g.get_bool("k7").expect("bool"), Some(true));
        assert_eq!(
            g.get_f32_array("k18").expect("f32s"),
            Some(vec![0.25, -1.0])
        );
        // Version 2 has the same layout.
        let mut s = Spec::new(kvs, vec![], vec![]);
        s.version = 2;
        assert_eq!(parse(&s.bytes()).expect("v2").version, 2);
    }

    #[test]
    fn gguf_truncated_files_fail_at_every_cut() {
        let b = base().bytes();
        for cut in 0..b.len() {
            assert!(parse(&b[..cut]).is_err(), "prefix of {cut} bytes parsed");
        }
    }

    #[test]
    fn gguf_bad_magic_and_versions_fail() {
        let mut s = base();
        s.magic = *b"GGUG";
        assert!(fails(&s.bytes()).contains("not a model file"));
        for (v, want) in [
            (1, "version 1"),
            (4, "version 4"),
            (0, "version 0"),
            (3 << 24, "big-endian"),
        ] {
            let mut s = base();
            s.version = v;
            let m = fails(&s.bytes());
            assert!(m.contains(want), "{v}: {m}");
        }
    }

    #[test]
    fn gguf_huge_counts_and_lengths_fail_without_allocating() {
        let huge = 1u64 << 60;
        let mut s = base();
        s.n_kv = Some(huge);
        assert!(fails(&s.bytes()).contains("metadata keys"));
        let mut s = base();
        s.n_tensors = Some(huge);
        assert!(fails(&s.bytes()).contains("tensors"));
        let mut s = base();
        s.n_tensors = Some(u64::MAX); // negative as i64
        assert!(fails(&s.bytes()).contains("negative"));

        let b = base().bytes();
        let patch = |at: usize, v: u64| {
            let mut b = b.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            b
        };
        // Length of the first key.
        assert!(fails(&patch(24, huge)).contains("claims"));
        // Length of the first string value.
        let at = find(&b, b"general.architecture") + 20 + 4;
        assert!(fails(&patch(at, huge)).contains("claims"));
        // Element counts of an i32 array and of a string array.
        let at = find(&b, b"test.arr") + 8 + 4 + 4;
        assert!(fails(&patch(at, huge)).contains("element count"));
        let at = find(&b, b"test.strs") + 9 + 4 + 4;
        assert!(fails(&patch(at, huge)).contains("element count"));
        assert!(parse(&patch(at, 3)).is_err(), "one string more than stored");
        // A tensor name length.
        let at = find(&b, b"\x01\x00\x00\x00\x00\x00\x00\x00a");
        assert!(fails(&patch(at, huge)).contains("claims"));
    }

    #[test]
    fn gguf_tensor_layout_errors_fail() {
        let with = |f: &dyn Fn(&mut Spec)| {
            let mut s = base();
            f(&mut s);
            fails(&s.bytes())
        };
        let m = with(&|s| s.tensors[1].offset = 4096);
        assert!(m.contains("past the end"), "{m}");
        let m = with(&|s| s.tensors[1].offset = u64::MAX - 10);
        assert!(m.contains("past the end"), "{m}");
        let m = with(&|s| s.tensors[1].offset = 16);
        assert!(m.contains("overlap"), "{m}");
        let m = with(&|s| s.tensors[1].ty = 99);
        assert!(
            m.contains("unknown ggml type id 99") && m.contains("tensor b"),
            "{m}"
        );
        let m = with(&|s| s.tensors[1].ty = 4); // retired Q4_2
        assert!(m.contains("unknown ggml type id 4"), "{m}");
        let m = with(&|s| s.tensors[1].ne = vec![33, 2]);
        assert!(m.contains("not a multiple"), "{m}");
        let m = with(&|s| s.tensors[1].ne = vec![32, 2, 1, 1, 1]);
        assert!(m.contains("dimensions"), "{m}");
        let m = with(&|s| s.tensors[1].ne = vec![32, -2]);
        assert!(m.contains("negative"), "{m}");
        let m = with(&|s| s.tensors[1].ne = vec![1 << 40, 1 << 40, 1 << 40]);
        assert!(m.contains("overflows"), "{m}");
        let m = with(&|s| s.tensors[1].name = "a".into());
        assert!(m.contains("duplicate tensor"), "{m}");
        let m = with(&|s| s.tensors[1].name = String::new());
        assert!(m.contains("empty"), "{m}");
    }

    #[test]
    fn gguf_metadata_errors_fail() {
        let with = |f: &dyn Fn(&mut Spec)| {
            let mut s = base();
            f(&mut s);
            fails(&s.bytes())
        };
        let m = with(&|s| s.kvs.push(kv("general.alignment", GgufValue::U32(3))));
        assert!(m.contains("power of two"), "{m}");
        let m = with(&|s| s.kvs.push(kv("general.alignment", GgufValue::U32(0))));
        assert!(m.contains("power of two"), "{m}");
        let m = with(&|s| s.kvs.push(kv("general.alignment", GgufValue::I32(32))));
        assert!(m.contains("UINT32"), "{m}");
        let m = with(&|s| s.kvs.push(kv("test.arr", GgufValue::U8(1))));
        assert!(m.contains("duplicate metadata key"), "{m}");
        // Nested array and unknown value / element types, patched into the bytes.
        let b = base().bytes();
        let at = find(&b, b"test.arr") + 8;
        for (off, v, want) in [
            (0, 13u32, "unknown value type"),
            (4, 9, "nested"),
            (4, 13, "unknown type"),
        ] {
            let mut b = b.clone();
            b[at + off..at + off + 4].copy_from_slice(&v.to_le_bytes());
            let m = fails(&b);
            assert!(m.contains(want), "{m}");
        }
    }

    #[test]
    fn gguf_alignment_key_places_data() {
        let mut s = base();
        s.kvs.push(kv("general.alignment", GgufValue::U32(64)));
        s.align = 64;
        s.tensors[1].offset = 64;
        let mut data = s.data[..32].to_vec();
        data.resize(64, 0);
        data.extend_from_slice(&s.data[32..]);
        s.data = data;
        let g = parse(&s.bytes()).expect("aligned to 64");
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset % 64, 0);
        assert_eq!(g.tensor("b").expect("b").offset, 64);
    }

    #[test]
    fn gguf_names_and_shapes_map_to_hugging_face() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.attn_q.weight",
                "model.layers.12.self_attn.q_proj.weight",
            ),
            ("blk.3.attn_k.bias", "model.layers.3.self_attn.k_proj.bias"),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            (
                "blk.1.attn_output.weight",
                "model.layers.1.self_attn.o_proj.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "blk.1.ffn_gate.weight",
                "model.layers.1.mlp.gate_proj.weight",
            ),
            ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
            (
                "blk.1.ffn_down.weight",
                "model.layers.1.mlp.down_proj.weight",
            ),
        ] {
            assert_eq!(hf_tensor_name(g).as_deref(), Some(h), "{g}");
            assert_eq!(gguf_tensor_name(h).as_deref(), Some(g), "{h}");
        }
        for bad in [
            "blk.x.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.0.attn_qkv.weight",
            "blk.0.attn_q.scale",
            "rope_freqs.weight",
            "blk..attn_q.weight",
        ] {
            assert_eq!(hf_tensor_name(bad), None, "{bad}");
        }
        let info = |ne: &[u64]| GgufTensorInfo {
            name: "x".into(),
            ne: ne.to_vec(),
            ggml_type: 0,
            offset: 0,
            n_bytes: 0,
        };
        assert_eq!(info(&[576, 49152]).torch_shape(), vec![49152, 576]);
        assert_eq!(info(&[576]).torch_shape(), vec![576]);
        assert_eq!(info(&[576, 1]).torch_shape(), vec![576]);
        assert_eq!(info(&[4, 1, 3, 1]).torch_shape(), vec![3, 1, 4]);
        assert_eq!(info(&[]).torch_shape(), vec![1]);
    }

    #[test]
    fn gguf_geometry_table_agrees_with_codecs() {
        for ty in GgmlType::all() {
            let t = ty.traits();
            assert_eq!(
                ggml_type_geometry(t.ggml_id),
                Some((t.name, t.block_elems as u64, t.block_bytes as u64))
            );
        }
        assert_eq!(ggml_type_geometry(16), Some(("IQ2_XXS", 256, 66)));
        assert_eq!(ggml_type_geometry(4), None);
        assert_eq!(ggml_type_geometry(43), None);
    }

    #[test]
    fn gguf_unpermute_matches_tensor_row_mapping() {
        // 2 heads of head_dim 8, 3 columns.
        let (heads, rows, cols) = (2, 16, 3);
        let stored: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let hf = unpermute_rows(&stored, heads, cols).expect("splits");
        let mut t =
            crate::tensor::TensorRef::from_f32("q", vec![rows, cols], &stored).expect("tensor");
        t.rope_interleaved_heads = Some(heads);
        assert_eq!(t.to_f32(), hf);
        // hd = 8: HF row 1 is stored row 2, HF row 4 is stored row 1.
        assert_eq!(&hf[cols..2 * cols], &stored[2 * cols..3 * cols]);
        assert_eq!(&hf[4 * cols..5 * cols], &stored[cols..2 * cols]);
        assert!(unpermute_rows(&stored, 3, cols).is_none());
    }

    /// gguf-py's `gguf.quants.dequantize` of every block type, stored next to the raw blocks by
    /// tests/fixtures/gguf/make_dequant_fixture.py, must equal ours bit for bit.
    #[test]
    fn gguf_dequant_fixture_matches_gguf_py() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/dequant.gguf");
        let (g, map) = GgufFile::read(&path).expect("read fixture");
        let mut seen = Vec::new();
        for t in g.tensors() {
            if t.name.ends_with(".dequant") {
                continue;
            }
            let ty = t.ty().expect("decodable type");
            assert_eq!(t.name, ty.name().to_lowercase());
            let want = g
                .tensor(&format!("{}.dequant", t.name))
                .expect("oracle tensor");
            assert_eq!((want.ggml_type, &want.ne), (0, &t.ne));
            let raw = &map[g.tensor_range(t).expect("range")];
            let exp: Vec<f32> = map[g.tensor_range(want).expect("range")]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut got = vec![f32::NAN; exp.len()];
            ty.dequantize(raw, &mut got);
            // Row by row too, as the inference path calls it.
            let cols = t.ne[0] as usize;
            let row_bytes = ty.traits().row_bytes(cols).expect("whole blocks");
            for (r, chunk) in raw.chunks_exact(row_bytes).enumerate() {
                let mut row = vec![0.0f32; cols];
                ty.dequantize(chunk, &mut row);
                assert_eq!(row, got[r * cols..(r + 1) * cols], "{} row {r}", t.name);
            }
            for (i, (a, b)) in got.iter().zip(&exp).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{} element {i}: ours {a}, gguf-py {b}",
                    t.name
                );
            }
            seen.push(ty);
        }
        for ty in GgmlType::all() {
            if ty.traits().block_elems > 1 {
                assert!(seen.contains(&ty), "fixture lacks {}", ty.name());
            }
        }
        assert_eq!(g.get_u32("test.u8").expect("u8"), Some(200));
        assert_eq!(g.get("test.i8"), Some(&GgufValue::I8(-100)));
        assert_eq!(g.get("test.u16"), Some(&GgufValue::U16(60000)));
        assert_eq!(g.get("test.i16"), Some(&GgufValue::I16(-30000)));
        assert_eq!(g.get("test.u32"), Some(&GgufValue::U32(4_000_000_000)));
        assert_eq!(g.get("test.i32"), Some(&GgufValue::I32(-2_000_000_000)));
        assert_eq!(g.get("test.f32"), Some(&GgufValue::F32(1.5)));
        assert_eq!(g.get("test.bool"), Some(&GgufValue::Bool(true)));
        assert_eq!(g.get_str("test.str").expect("str"), Some("héllo"));
        assert_eq!(
            g.get_int_array("test.arr_i32").expect("arr"),
            Some(vec![1, -2, 3])
        );
        assert_eq!(
            g.get_str_array("test.arr_str").expect("arr"),
            Some(&["a".to_string(), String::new(), "ccc".to_string()][..])
        );
        assert_eq!(g.get("test.u64"), Some(&GgufValue::U64((1 << 63) + 5)));
        assert_eq!(g.get("test.i64"), Some(&GgufValue::I64(-(1 << 62))));
        assert_eq!(g.get("test.f64"), Some(&GgufValue::F64(0.1)));
    }
}
