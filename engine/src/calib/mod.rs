//! Calibration data for the quantizers that need activations (GPTQ, AWQ, EXL2, importance matrices).
//!
//! Two steps:
//! * [`load_documents`] reads calibration *documents* from the bundled text
//!   ([`crate::imatrix::DEFAULT_CALIBRATION_TEXT`]), a plain UTF-8 text file (one document), JSON lines
//!   (`.jsonl`, `.ndjson`, `.json`: one object per line with a string field, `text` unless told otherwise;
//!   a `.json` file holding one array of such objects is read too) or a Parquet file (`.parquet`: a string
//!   column, `text` unless told otherwise; nulls and empty strings are skipped), e.g. the Hugging Face
//!   WikiText files.
//! * [`sample_rows`] cuts rows of token ids from them as GPTQModel/AutoGPTQ do: the documents joined with
//!   `"\n\n"`, tokenized once without special tokens, then `rows` windows of `seq_len` tokens at seeded
//!   random offsets (BOS first when the tokenizer adds one).
//!
//! Files are hostile: sizes are bounded before reading, and the Parquet reader is fenced so that a file it
//! chokes on becomes an error, not a crash.

pub(crate) mod activations;

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::imatrix::{DEFAULT_CALIBRATION_NAME, DEFAULT_CALIBRATION_TEXT};
use crate::model::TextTokenizer;
use crate::{Error, Result};

/// Most bytes of calibration text read from one file (all documents together).
pub const MAX_CALIBRATION_BYTES: u64 = 1 << 30;

/// Most tokens [`sample_rows`] hands out (`rows × seq_len`).
pub const MAX_SAMPLE_TOKENS: usize = 1 << 28;

/// Field (JSON lines) or column (Parquet) read when none is named.
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// Records decoded at a time from a Parquet column.
const PARQUET_BATCH: usize = 1024;

/// Where calibration documents come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CalibSource {
    /// The bundled text ([`DEFAULT_CALIBRATION_TEXT`]), one document.
    #[default]
    Bundled,
    /// A file: `.parquet`, `.jsonl`/`.ndjson`/`.json`, anything else is plain text. `column` names the
    /// Parquet column or JSON field (default `text`); it is refused for plain text.
    File {
        path: PathBuf,
        column: Option<String>,
    },
}

impl CalibSource {
    /// The name recorded as the dataset of what is computed from this source (the bundled text's
    /// [`DEFAULT_CALIBRATION_NAME`], else the file's name).
    pub fn dataset_name(&self) -> String {
        match self {
            Self::Bundled => DEFAULT_CALIBRATION_NAME.to_owned(),
            Self::File { path, .. } => path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
        }
    }
}

/// File formats [`load_documents`] reads, chosen by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    JsonLines,
    Parquet,
}

fn format_of(path: &Path) -> Format {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "parquet" => Format::Parquet,
        "jsonl" | "ndjson" | "json" => Format::JsonLines,
        _ => Format::Text,
    }
}

/// The calibration documents of `src`, in file order. Empty documents are skipped; a source without any
/// document is an error.
pub fn load_documents(src: &CalibSource) -> Result<Vec<String>> {
    let (path, column) = match src {
        CalibSource::Bundled => return Ok(vec![DEFAULT_CALIBRATION_TEXT.to_owned()]),
        CalibSource::File { path, column } => (path.as_path(), column.as_deref()),
    };
    // (A missing file is left to the read below, which says so.)
    if let Some(why) = crate::bounded::irregular(path).filter(|_| path.symlink_metadata().is_ok()) {
        return Err(Error::Invalid(format!(
            "{}: the calibration file {why}",
            path.display()
        )));
    }
    let docs = match format_of(path) {
        Format::Text => {
            if let Some(c) = column {
                return Err(Error::Invalid(format!(
                    "{}: a plain text file is one document; a column (`{c}`) applies only to \
                     .parquet and .jsonl/.json files",
                    path.display()
                )));
            }
            read_text(path)?
        }
        Format::JsonLines => read_json_lines(path, column.unwrap_or(DEFAULT_TEXT_FIELD))?,
        Format::Parquet => read_parquet(path, column.unwrap_or(DEFAULT_TEXT_FIELD))?,
    };
    if docs.is_empty() {
        return Err(Error::malformed(
            path,
            "calibration data",
            "no non-empty text in the file",
        ));
    }
    Ok(docs)
}

/// The bytes of `path`, refusing files over [`MAX_CALIBRATION_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > MAX_CALIBRATION_BYTES {
        return Err(too_large(path));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    file.take(MAX_CALIBRATION_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_CALIBRATION_BYTES {
        return Err(too_large(path));
    }
    Ok(bytes)
}

fn too_large(path: &Path) -> Error {
    Error::unsupported(
        path,
        format!("more than {MAX_CALIBRATION_BYTES} bytes of calibration text; use a smaller file"),
    )
}

/// `bytes` as UTF-8 without a leading byte-order mark.
fn utf8(path: &Path, what: &'static str, bytes: Vec<u8>) -> Result<String> {
    let mut s = String::from_utf8(bytes).map_err(|e| {
        Error::malformed(
            path,
            what,
            format!(
                "not UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if s.starts_with('\u{feff}') {
        s.drain(..'\u{feff}'.len_utf8());
    }
    Ok(s)
}

/// A plain text file: one document (none when it holds only whitespace).
fn read_text(path: &Path) -> Result<Vec<String>> {
    let text = utf8(path, "text file", read_bounded(path)?)?;
    Ok(if text.trim().is_empty() {
        Vec::new()
    } else {
        vec![text]
    })
}

/// JSON lines (or one JSON array of objects in a `.json` file): the string `field` of every object.
fn read_json_lines(path: &Path, field: &str) -> Result<Vec<String>> {
    const WHAT: &str = "JSON lines";
    let text = utf8(path, WHAT, read_bounded(path)?)?;
    let mut docs = Vec::new();
    if text.trim_start().starts_with('[') {
        let items: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| Error::malformed(path, "JSON file", e.to_string()))?;
        for (i, item) in items.into_iter().enumerate() {
            if let Some(d) = document_of(item, field)
                .map_err(|e| Error::malformed(path, "JSON file", format!("item {i}: {e}")))?
            {
                docs.push(d);
            }
        }
        return Ok(docs);
    }
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::malformed(path, WHAT, format!("line {n}: {e}")))?;
        if let Some(d) = document_of(value, field)
            .map_err(|e| Error::malformed(path, WHAT, format!("line {n}: {e}")))?
        {
            docs.push(d);
        }
    }
    Ok(docs)
}

/// The string `field` of a JSON object; `None` when it is null or empty.
fn document_of(value: serde_json::Value, field: &str) -> Result<Option<String>, String> {
    let serde_json::Value::Object(mut obj) = value else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_kind(&value)
        ));
    };
    match obj.remove(field) {
        Some(serde_json::Value::String(s)) => Ok((!s.is_empty()).then_some(s)),
        Some(serde_json::Value::Null) => Ok(None),
        Some(other) => Err(format!(
            "field `{field}` is {}, not a string",
            json_kind(&other)
        )),
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).take(32).collect();
            Err(format!(
                "no field `{field}` (fields: {})",
                if keys.is_empty() {
                    "none".to_owned()
                } else {
                    keys.join(", ")
                }
            ))
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A Parquet file: the non-null, non-empty values of string column `column`. The parquet crate is fenced
/// with `catch_unwind`: a hostile file it panics on is reported as malformed.
fn read_parquet(path: &Path, column: &str) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match crate::bounded::catch_quietly(|| read_parquet_column(path, file, column)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the Parquet reader failed".to_owned());
            Err(Error::malformed(path, "Parquet file", msg))
        }
    }
}

fn read_parquet_column(path: &Path, file: std::fs::File, column: &str) -> Result<Vec<String>> {
    use parquet::basic::Type as PhysicalType;
    use parquet::column::reader::ColumnReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    const WHAT: &str = "Parquet file";
    let pq = |e: parquet::errors::ParquetError| Error::malformed(path, WHAT, e.to_string());

    let reader = SerializedFileReader::new(file).map_err(pq)?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let names: Vec<String> = (0..schema.num_columns())
        .map(|i| schema.column(i).path().string())
        .collect();
    let Some(idx) = names.iter().position(|n| n == column) else {
        return Err(Error::Invalid(format!(
            "{}: no column `{column}`; the file's columns are: {}",
            path.display(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )));
    };
    let descr = schema.column(idx);
    if descr.physical_type() != PhysicalType::BYTE_ARRAY {
        return Err(Error::unsupported(
            path,
            format!(
                "column `{column}` holds {}, not strings",
                descr.physical_type()
            ),
        ));
    }
    if descr.max_rep_level() > 0 {
        return Err(Error::unsupported(
            path,
            format!(
                "column `{column}` is a repeated (list) column; name a column of single strings"
            ),
        ));
    }

    let mut docs = Vec::new();
    let mut total: u64 = 0;
    let mut n_value: u64 = 0;
    let mut defs: Vec<i16> = Vec::with_capacity(PARQUET_BATCH);
    let mut values: Vec<parquet::data_type::ByteArray> = Vec::with_capacity(PARQUET_BATCH);
    for rg in 0..reader.num_row_groups() {
        let row_group = reader.get_row_group(rg).map_err(pq)?;
        let ColumnReader::ByteArrayColumnReader(mut col) =
            row_group.get_column_reader(idx).map_err(pq)?
        else {
            return Err(Error::malformed(
                path,
                WHAT,
                format!("column `{column}` did not decode as byte arrays"),
            ));
        };
        loop {
            defs.clear();
            values.clear();
            let (records, _, levels) = col
                .read_records(PARQUET_BATCH, Some(&mut defs), None, &mut values)
                .map_err(pq)?;
            if records == 0 && levels == 0 && values.is_empty() {
                break;
            }
            for v in values.drain(..) {
                n_value += 1;
                let bytes: &[u8] = v.as_ref();
                if bytes.is_empty() {
                    continue;
                }
                total += bytes.len() as u64;
                if total > MAX_CALIBRATION_BYTES {
                    return Err(too_large(path));
                }
                let s = std::str::from_utf8(bytes).map_err(|_| {
                    Error::malformed(
                        path,
                        WHAT,
                        format!("value {n_value} of column `{column}` is not UTF-8"),
                    )
                })?;
                docs.push(s.to_owned());
            }
        }
    }
    Ok(docs)
}

/// How calibration rows are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibOptions {
    /// Number of rows (samples), default 128.
    pub rows: usize,
    /// Tokens per row, BOS included when the tokenizer adds one; default 2048.
    pub seq_len: usize,
    /// Seed of the offsets, default 0.
    pub seed: u64,
}

impl Default for CalibOptions {
    fn default() -> Self {
        Self {
            rows: 128,
            seq_len: 2048,
            seed: 0,
        }
    }
}

/// `opts.rows` rows of `opts.seq_len` token ids, as GPTQModel/AutoGPTQ cut them: `docs` joined with
/// `"\n\n"` and tokenized once without special tokens, then each row a window of that text at a uniformly
/// drawn offset (`StdRng::seed_from_u64(seed)`, so the same seed gives the same rows). When the tokenizer
/// adds BOS, every row is BOS followed by `seq_len - 1` text tokens.
pub fn sample_rows(
    tok: &TextTokenizer,
    docs: &[String],
    opts: &CalibOptions,
) -> Result<Vec<Vec<u32>>> {
    if opts.rows == 0 {
        return Err(Error::Invalid(
            "calibration needs at least one row".to_owned(),
        ));
    }
    let bos = if tok.add_bos { tok.bos_token_id } else { None };
    let n_text = opts.seq_len.saturating_sub(usize::from(bos.is_some()));
    if n_text == 0 {
        return Err(Error::Invalid(format!(
            "calibration sequence length {} leaves no room for text",
            opts.seq_len
        )));
    }
    if opts
        .rows
        .checked_mul(opts.seq_len)
        .is_none_or(|t| t > MAX_SAMPLE_TOKENS)
    {
        return Err(Error::Invalid(format!(
            "{} calibration rows of {} tokens is more than {MAX_SAMPLE_TOKENS} tokens",
            opts.rows, opts.seq_len
        )));
    }
    if docs.iter().all(String::is_empty) {
        return Err(Error::Invalid("no calibration text".to_owned()));
    }
    let text = docs.join("\n\n");
    let ids = tok.encode(&text, false)?;
    if ids.len() < n_text {
        return Err(Error::Invalid(format!(
            "the calibration text has {} tokens; rows of {} tokens need at least {n_text} \
             (use more text or a shorter sequence length)",
            ids.len(),
            opts.seq_len
        )));
    }
    let max_start = ids.len() - n_text;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let rows = (0..opts.rows)
        .map(|_| {
            let start = rng.gen_range(0..=max_start);
            let mut row = Vec::with_capacity(opts.seq_len);
            row.extend(bos);
            row.extend_from_slice(&ids[start..start + n_text]);
            row
        })
        .collect();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::fixture::{fixture_tokenizer, IM_START_ID};

    fn file_src(path: &Path, column: Option<&str>) -> CalibSource {
        CalibSource::File {
            path: path.to_owned(),
            column: column.map(str::to_owned),
        }
    }

    fn tokenizer(add_bos: bool) -> TextTokenizer {
        TextTokenizer {
            inner: fixture_tokenizer().expect("tokenizer"),
            bos_token_id: Some(IM_START_ID),
            eos_token_ids: vec![2],
            add_bos,
            chat_template: None,
            chat_template_origin: None,
            bos_token: None,
            eos_token: None,
        }
    }

    #[test]
    fn bundled_text_is_one_document() {
        let docs = load_documents(&CalibSource::Bundled).expect("bundled");
        assert_eq!(docs, vec![DEFAULT_CALIBRATION_TEXT.to_owned()]);
        assert_eq!(
            CalibSource::Bundled.dataset_name(),
            "quant-studio:default.txt"
        );
    }

    /// The bundled text mixes its kinds from the start: the first 96k characters (~50 chunks of 512
    /// tokens, what a short importance-matrix run reads) already hold chat turns, Python and Rust code,
    /// prose and five scripts.
    #[test]
    fn bundled_text_mixes_domains_from_the_start() {
        let head: String = DEFAULT_CALIBRATION_TEXT.chars().take(96_000).collect();
        for needle in [
            "Call me Ishmael",
            "Fellow-Citizens",
            "User: ",
            "Assistant: ",
            "def ",
            "fn main",
            "SmallVec",
        ] {
            assert!(head.contains(needle), "{needle}");
        }
        let script = |lo: u32, hi: u32| head.chars().any(|c| (lo..=hi).contains(&(c as u32)));
        assert!(script(0x0400, 0x04FF), "Cyrillic");
        assert!(script(0x4E00, 0x9FFF), "CJK");
        assert!(script(0x0600, 0x06FF), "Arabic");
        assert!(script(0x0900, 0x097F), "Devanagari");
        assert!(script(0x3040, 0x309F), "Hiragana");
        // its size, and the chat turns in it
        let total = DEFAULT_CALIBRATION_TEXT.len();
        assert!((400_000..600_000).contains(&total), "{total}");
        let turns = DEFAULT_CALIBRATION_TEXT.matches("\n\nUser: ").count();
        assert!((50..120).contains(&turns), "{turns}");
    }

    #[test]
    fn plain_text_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("calib.txt");
        std::fs::write(&p, "\u{feff}First line.\nSecond line.\n").expect("write");
        let docs = load_documents(&file_src(&p, None)).expect("load");
        assert_eq!(docs, vec!["First line.\nSecond line.\n".to_owned()]);
        assert_eq!(file_src(&p, None).dataset_name(), "calib.txt");

        let err = load_documents(&file_src(&p, Some("text")))
            .expect_err("column on text")
            .to_string();
        assert!(err.contains("plain text file is one document"), "{err}");

        std::fs::write(&p, b"ok \xff\xfe").expect("write");
        let err = load_documents(&file_src(&p, None))
            .expect_err("bad utf-8")
            .to_string();
        assert!(
            err.contains("not UTF-8 (invalid byte at offset 3)"),
            "{err}"
        );

        std::fs::write(&p, " \n\t\n").expect("write");
        let err = load_documents(&file_src(&p, None))
            .expect_err("blank")
            .to_string();
        assert!(err.contains("no non-empty text"), "{err}");

        let missing = dir.path().join("nope.txt");
        assert!(matches!(
            load_documents(&file_src(&missing, None)),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("data.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"alpha\"}\n\n{\"text\": \"beta\", \"id\": 3}\r\n{\"text\": \"\"}\n{\"text\": null}\n  {\"text\": \"gamma\\n\"}\n",
        )
        .expect("write");
        let docs = load_documents(&file_src(&p, None)).expect("load");
        assert_eq!(docs, vec!["alpha", "beta", "gamma\n"]);

        // A custom field.
        std::fs::write(
            &p,
            "{\"content\": \"one\", \"text\": 1}\n{\"content\": \"two\"}\n",
        )
        .expect("write");
        let docs = load_documents(&file_src(&p, Some("content"))).expect("load");
        assert_eq!(docs, vec!["one", "two"]);
        // The default field is a number on line 1.
        let err = load_documents(&file_src(&p, None))
            .expect_err("number")
            .to_string();
        assert!(
            err.contains("line 1: field `text` is a number, not a string"),
            "{err}"
        );
    }

    #[test]
    fn json_lines_errors_name_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("bad.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"text\": \"b\n").expect("write");
        let err = load_documents(&file_src(&p, None)).expect_err("bad line");
        let msg = err.to_string();
        assert!(matches!(
            err,
            Error::Malformed {
                what: "JSON lines",
                ..
            }
        ));
        assert!(msg.starts_with(&p.display().to_string()), "{msg}");
        assert!(msg.contains("malformed JSON lines: line 3: "), "{msg}");

        std::fs::write(&p, "{\"text\": \"a\"}\n{\"body\": \"b\", \"id\": 1}\n").expect("write");
        let msg = load_documents(&file_src(&p, None))
            .expect_err("missing field")
            .to_string();
        assert!(
            msg.contains("line 2: no field `text` (fields: body, id)"),
            "{msg}"
        );

        std::fs::write(&p, "[1, 2]\n").expect("write");
        let msg = load_documents(&file_src(&p, None))
            .expect_err("array line")
            .to_string();
        assert!(
            msg.contains("JSON file: item 0: expected a JSON object, found a number"),
            "{msg}"
        );

        std::fs::write(&p, "\"text\"\n").expect("write");
        let msg = load_documents(&file_src(&p, None))
            .expect_err("string line")
            .to_string();
        assert!(
            msg.contains("line 1: expected a JSON object, found a string"),
            "{msg}"
        );
    }

    #[test]
    fn json_array_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("data.JSON");
        std::fs::write(
            &p,
            "[{\"text\": \"x\"},\n {\"text\": \"y\"}, {\"text\": null}]",
        )
        .expect("write");
        let docs = load_documents(&file_src(&p, None)).expect("load");
        assert_eq!(docs, vec!["x", "y"]);
    }

    /// Writes `values` (None = null) as `optional binary text (STRING)`, snappy-compressed, in row groups
    /// of `per_group` rows, with an extra INT32 column `id`.
    fn write_parquet(path: &Path, values: &[Option<&str>], per_group: usize) {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;

        let schema = Arc::new(
            parse_message_type(
                "message schema { OPTIONAL BYTE_ARRAY text (UTF8); REQUIRED INT32 id; }",
            )
            .expect("schema"),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let file = std::fs::File::create(path).expect("create");
        let mut writer = SerializedFileWriter::new(file, schema, props).expect("writer");
        for (g, chunk) in values.chunks(per_group).enumerate() {
            let mut rg = writer.next_row_group().expect("row group");
            let mut col = rg.next_column().expect("column").expect("text column");
            let vals: Vec<ByteArray> = chunk
                .iter()
                .flatten()
                .map(|s| ByteArray::from(*s))
                .collect();
            let defs: Vec<i16> = chunk.iter().map(|v| i16::from(v.is_some())).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&vals, Some(&defs), None)
                .expect("write text");
            col.close().expect("close text");
            let mut col = rg.next_column().expect("column").expect("id column");
            let ids: Vec<i32> = (0..chunk.len())
                .map(|i| (g * per_group + i) as i32)
                .collect();
            col.typed::<Int32Type>()
                .write_batch(&ids, None, None)
                .expect("write id");
            col.close().expect("close id");
            rg.close().expect("close row group");
        }
        writer.close().expect("close file");
    }

    #[test]
    fn parquet_string_column() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("train-00000-of-00001.parquet");
        let values = [
            Some(""),
            Some(" = Valkyria Chronicles III = \n"),
            None,
            Some(" Senjō no Valkyria 3 : Unrecorded Chronicles \n"),
            None,
            Some(""),
            Some("third"),
        ];
        write_parquet(&p, &values, 3);
        let docs = load_documents(&file_src(&p, None)).expect("load");
        assert_eq!(
            docs,
            vec![
                " = Valkyria Chronicles III = \n",
                " Senjō no Valkyria 3 : Unrecorded Chronicles \n",
                "third"
            ]
        );
        assert_eq!(
            docs,
            load_documents(&file_src(&p, Some("text"))).expect("load")
        );

        // Many rows, more than one decode batch per row group.
        let many: Vec<String> = (0..2500).map(|i| format!("doc {i}")).collect();
        let many_opt: Vec<Option<&str>> = many
            .iter()
            .enumerate()
            .map(|(i, s)| (i % 7 != 0).then_some(s.as_str()))
            .collect();
        write_parquet(&p, &many_opt, 2000);
        let docs = load_documents(&file_src(&p, None)).expect("load many");
        assert_eq!(docs.len(), 2500 - 358);
        assert_eq!(docs[0], "doc 1");
        assert_eq!(docs[docs.len() - 1], "doc 2498");
    }

    #[test]
    fn parquet_column_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("data.parquet");
        write_parquet(&p, &[Some("a"), None], 2);

        let msg = load_documents(&file_src(&p, Some("content")))
            .expect_err("missing column")
            .to_string();
        assert_eq!(
            msg,
            format!(
                "{}: no column `content`; the file's columns are: text, id",
                p.display()
            )
        );

        let msg = load_documents(&file_src(&p, Some("id")))
            .expect_err("int column")
            .to_string();
        assert!(
            msg.contains("unsupported: column `id` holds INT32, not strings"),
            "{msg}"
        );

        // Only nulls → no documents.
        write_parquet(&p, &[None, Some("")], 2);
        let msg = load_documents(&file_src(&p, None))
            .expect_err("empty")
            .to_string();
        assert!(msg.contains("no non-empty text"), "{msg}");
    }

    #[test]
    fn hostile_parquet_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("data.parquet");
        write_parquet(&p, &[Some("hello"), Some("world")], 2);
        let good = std::fs::read(&p).expect("read");

        // Not Parquet at all.
        std::fs::write(&p, b"this is not a parquet file at all").expect("write");
        let err = load_documents(&file_src(&p, None)).expect_err("garbage");
        assert!(
            matches!(
                err,
                Error::Malformed {
                    what: "Parquet file",
                    ..
                }
            ),
            "{err}"
        );

        // Truncated: the footer is gone.
        std::fs::write(&p, &good[..good.len() / 2]).expect("write");
        let err = load_documents(&file_src(&p, None)).expect_err("truncated");
        assert!(
            matches!(
                err,
                Error::Malformed {
                    what: "Parquet file",
                    ..
                }
            ),
            "{err}"
        );

        // Single-byte corruptions (the parquet crate panics on some: those are fenced) give documents or a
        // file error, never a crash.
        let (mut ok, mut failed) = (0, 0);
        for i in 4..good.len().min(200) {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            std::fs::write(&p, &bad).expect("write");
            match load_documents(&file_src(&p, None)) {
                Ok(docs) => {
                    assert!(docs.len() <= 2, "{docs:?}");
                    ok += 1;
                }
                Err(Error::Malformed { .. } | Error::Unsupported { .. } | Error::Invalid(_)) => {
                    failed += 1
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(ok + failed, good.len().min(200) - 4);
        assert!(failed > 0, "no corruption was detected");
    }

    #[test]
    fn sampling_is_deterministic_per_seed() {
        let tok = tokenizer(true);
        let docs = vec![
            crate::eval::perplexity::tests::TEXT.to_owned(),
            "A second document about lamps and boats.".to_owned(),
        ];
        let ids = tok
            .encode(&format!("{}\n\n{}", docs[0], docs[1]), false)
            .expect("encode");
        let opts = CalibOptions {
            rows: 8,
            seq_len: 16,
            seed: 0,
        };
        let a = sample_rows(&tok, &docs, &opts).expect("rows");
        let b = sample_rows(&tok, &docs, &opts).expect("rows");
        let c = sample_rows(&tok, &docs, &CalibOptions { seed: 1, ..opts }).expect("rows");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 8);
        for row in a.iter().chain(&c) {
            assert_eq!(row.len(), 16);
            assert_eq!(row[0], IM_START_ID);
            // Each row's text is a window of the joined text's tokens.
            assert!(
                ids.windows(15).any(|w| w == &row[1..]),
                "row {row:?} is not a window of the text"
            );
        }
        // The offsets themselves are the seeded draws.
        let mut rng = StdRng::seed_from_u64(0);
        for row in &a {
            let start: usize = rng.gen_range(0..=ids.len() - 15);
            assert_eq!(&row[1..], &ids[start..start + 15]);
        }
    }

    #[test]
    fn rows_without_bos_and_exact_fit() {
        let docs = vec![
            "The keeper counted the boats.".to_owned(),
            "Night.".to_owned(),
        ];
        let with = tokenizer(true);
        let ids = with
            .encode("The keeper counted the boats.\n\nNight.", false)
            .expect("encode");
        assert!(ids.len() > 2 && !ids.contains(&IM_START_ID));

        // The text is exactly one row long: every row is the whole text.
        let opts = CalibOptions {
            rows: 3,
            seq_len: ids.len() + 1,
            seed: 9,
        };
        let mut expected = vec![IM_START_ID];
        expected.extend_from_slice(&ids);
        assert_eq!(
            sample_rows(&with, &docs, &opts).expect("rows"),
            vec![expected.clone(); 3]
        );

        // No BOS: seq_len text tokens.
        let without = tokenizer(false);
        let opts = CalibOptions {
            rows: 2,
            seq_len: ids.len(),
            seed: 9,
        };
        assert_eq!(
            sample_rows(&without, &docs, &opts).expect("rows"),
            vec![ids.clone(); 2]
        );
        // A BOS id without add_bos is not used either.
        let mut no_id = tokenizer(true);
        no_id.bos_token_id = None;
        assert_eq!(
            sample_rows(&no_id, &docs, &opts).expect("rows"),
            vec![ids.clone(); 2]
        );
    }

    #[test]
    fn too_short_text_and_bad_options() {
        let tok = tokenizer(true);
        let docs = vec!["Short text.".to_owned()];
        let n = tok.encode("Short text.", false).expect("encode").len();
        let opts = CalibOptions {
            rows: 4,
            seq_len: n + 2,
            seed: 0,
        };
        let msg = sample_rows(&tok, &docs, &opts)
            .expect_err("too short")
            .to_string();
        assert_eq!(
            msg,
            format!(
                "the calibration text has {n} tokens; rows of {} tokens need at least {} \
                 (use more text or a shorter sequence length)",
                n + 2,
                n + 1
            )
        );

        let msg = sample_rows(&tok, &docs, &CalibOptions { rows: 0, ..opts })
            .expect_err("no rows")
            .to_string();
        assert_eq!(msg, "calibration needs at least one row");
        let msg = sample_rows(&tok, &docs, &CalibOptions { seq_len: 1, ..opts })
            .expect_err("no room")
            .to_string();
        assert_eq!(msg, "calibration sequence length 1 leaves no room for text");
        let msg = sample_rows(&tok, &[], &CalibOptions { seq_len: 2, ..opts })
            .expect_err("no docs")
            .to_string();
        assert_eq!(msg, "no calibration text");
        assert!(sample_rows(
            &tok,
            &docs,
            &CalibOptions {
                rows: usize::MAX,
                ..opts
            }
        )
        .is_err());

        assert_eq!(
            CalibOptions::default(),
            CalibOptions {
                rows: 128,
                seq_len: 2048,
                seed: 0
            }
        );
    }
}
