//! A one-screen summary of a model: what `quant-studio info` prints (as a table, or JSON with `--json`).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::{RopeScaling, SourceFormat, SourceModel};

/// The facts about a model a user asks for first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    /// Display name (folder name, or GGUF `general.name`).
    pub name: String,
    /// `hf-folder` or `gguf`.
    pub format: &'static str,
    /// The Hugging Face class (`LlamaForCausalLM`).
    pub arch: &'static str,
    /// Elements of every tensor.
    pub parameter_count: u64,
    /// The stored tensor type (`BF16`, `Q4_K`), or `mixed: Q4_K 85.0%, Q6_K 14.9%, F32 0.1%` (shares of
    /// the parameters) when no single type holds 99.5% of them.
    pub dtype: String,
    /// Total size of the weight files.
    pub size_on_disk_bytes: u64,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// Training context (`max_position_embeddings`).
    pub context: usize,
    pub rope_theta: f32,
    /// `linear ×4`, `llama3 ×8 (original context 8192)`, `per-frequency factors` or `none`.
    pub rope_scaling: String,
    /// `lm_head` shares the embedding.
    pub tied: bool,
    pub chat_template_present: bool,
    /// Tensor bytes of each named GGUF mix (llama-quantize's plan for this model), when the engine
    /// computed them (the inspect job does); for size estimates before quantizing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gguf_mix_bytes: Vec<(String, u64)>,
    /// Tensor bytes of the smallest and largest error-aware GGUF mix (default candidates), when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_mix_bytes: Option<(u64, u64)>,
}

impl ModelSummary {
    /// Bits per parameter as stored (the weight files' size over the parameter count).
    pub fn stored_bpw(&self) -> f64 {
        self.size_on_disk_bytes as f64 * 8.0 / self.parameter_count.max(1) as f64
    }

    /// A warning when the model is already quantized (stored below 16 bits): quantizing it again starts
    /// from its rounding errors and cannot beat it, and error numbers measured against it understate the
    /// loss against the original. `None` for F32/F16/BF16 sources.
    pub fn already_quantized(&self) -> Option<String> {
        let float = ["F32", "F16", "BF16"].contains(&self.dtype.as_str());
        if float || self.stored_bpw() >= 15.5 {
            return None;
        }
        Some(format!(
            "This model is already quantized ({}, {:.2} bits per weight as stored). Quantizing it again \
             starts from its rounding errors: a result can be larger or worse than this file, and errors \
             are measured against it, not the original. Start from an F16/BF16 model for real numbers.",
            self.dtype,
            self.stored_bpw()
        ))
    }

    /// Summarise `m`.
    pub fn of(m: &SourceModel) -> Self {
        let c = &m.config;
        let rope_scaling = match (c.rope_scaling, &c.rope_freq_factors) {
            (Some(RopeScaling::Linear { factor }), _) => format!("linear ×{factor}"),
            (
                Some(RopeScaling::Llama3 {
                    factor,
                    original_max_position_embeddings,
                    ..
                }),
                _,
            ) => format!("llama3 ×{factor} (original context {original_max_position_embeddings})"),
            (None, Some(_)) => "per-frequency factors".to_string(),
            (None, None) => "none".to_string(),
        };
        Self {
            name: m.name.clone(),
            format: match m.format {
                SourceFormat::HfFolder => "hf-folder",
                SourceFormat::Gguf => "gguf",
            },
            arch: c.arch.hf_class(),
            parameter_count: m.parameter_count(),
            dtype: dominant_dtype(m),
            size_on_disk_bytes: m.file_size_bytes,
            layers: c.num_layers,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            context: c.max_position_embeddings,
            rope_theta: c.rope_theta,
            rope_scaling,
            tied: c.tie_word_embeddings,
            chat_template_present: m.tokenizer.chat_template.is_some(),
            gguf_mix_bytes: Vec::new(),
            auto_mix_bytes: None,
        }
    }
}

/// The tensor type holding (nearly) all parameters, or the mix.
fn dominant_dtype(m: &SourceModel) -> String {
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for t in m.tensors.values() {
        *by_type.entry(t.type_label()).or_default() += t.numel() as u64;
    }
    let total: u64 = by_type.values().sum();
    if total == 0 {
        return "none".to_string();
    }
    let mut shares: Vec<(String, u64)> = by_type.into_iter().collect();
    shares.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    if shares[0].1 as f64 >= 0.995 * total as f64 {
        return shares[0].0.clone();
    }
    let parts: Vec<String> = shares
        .iter()
        .map(|(name, n)| format!("{name} {:.1}%", 100.0 * *n as f64 / total as f64))
        .collect();
    format!("mixed: {}", parts.join(", "))
}

/// `1.24B`, `134.5M`, `12.3K`, `999`.
pub fn human_count(n: u64) -> String {
    let f = n as f64;
    if n >= 1_000_000_000 {
        format!("{:.2}B", f / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.1}M", f / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

/// `2.47 GiB`, `512.0 MiB`, `3.0 KiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    const K: f64 = 1024.0;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{n} B")
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or_default())
        .collect();
    groups.join(",")
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        let rows: Vec<(&str, String)> = vec![
            ("name", self.name.clone()),
            (
                "format",
                match self.format {
                    "gguf" => "GGUF".to_string(),
                    _ => "Hugging Face folder (safetensors)".to_string(),
                },
            ),
            ("architecture", self.arch.to_string()),
            (
                "parameters",
                format!(
                    "{} ({})",
                    human_count(self.parameter_count),
                    thousands(self.parameter_count)
                ),
            ),
            ("dtype", self.dtype.clone()),
            (
                "size on disk",
                format!(
                    "{} ({} bytes)",
                    human_bytes(self.size_on_disk_bytes),
                    thousands(self.size_on_disk_bytes)
                ),
            ),
            ("layers", self.layers.to_string()),
            ("hidden size", self.hidden.to_string()),
            ("intermediate size", self.intermediate.to_string()),
            ("attention heads", self.heads.to_string()),
            ("KV heads", self.kv_heads.to_string()),
            ("head dim", self.head_dim.to_string()),
            ("vocabulary", self.vocab.to_string()),
            ("context", self.context.to_string()),
            ("rope theta", self.rope_theta.to_string()),
            ("rope scaling", self.rope_scaling.clone()),
            ("tied embeddings", yes_no(self.tied).to_string()),
            (
                "chat template",
                yes_no(self.chat_template_present).to_string(),
            ),
        ];
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        for (k, v) in rows {
            writeln!(f, "{k:<width$}  {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::GgmlType;
    use crate::model::hf;
    use crate::tensor::{Bytes, TensorRef};

    #[test]
    fn already_quantized_sources_are_flagged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("m");
        hf::testutil::write_tiny_llama(&dir);
        let mut s = ModelSummary::of(&hf::open(&dir).expect("open"));
        assert_eq!(s.already_quantized(), None, "{}", s.dtype);
        s.dtype = "mixed: Q4_1 80.0%, Q8_0 20.0%".into();
        s.size_on_disk_bytes = s.parameter_count * 6 / 8;
        let w = s.already_quantized().expect("flagged");
        assert!(w.contains("Q4_1") && w.contains("6.00 bits"), "{w}");
    }

    #[test]
    fn summary_of_the_tiny_llama() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("Tiny");
        hf::testutil::write_tiny_llama(&dir);
        let m = hf::open(&dir).expect("open");
        let s = ModelSummary::of(&m);
        assert_eq!(s.arch, "LlamaForCausalLM");
        assert_eq!(s.format, "hf-folder");
        assert_eq!(s.parameter_count, m.parameter_count());
        assert_eq!(
            (
                s.layers,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.hidden,
                s.intermediate
            ),
            (2, 2, 1, 4, 8, 16)
        );
        assert_eq!(
            (s.vocab, s.context, s.tied, s.chat_template_present),
            (16, 256, false, true)
        );
        assert_eq!(s.rope_scaling, "llama3 ×8 (original context 64)");
        assert_eq!(s.size_on_disk_bytes, m.file_size_bytes);
        // BF16 matrices with F32 norms: 40 of 1448 parameters are F32, so the mix is reported.
        assert!(s.dtype.starts_with("mixed: BF16 9"), "{}", s.dtype);
        assert!(s.dtype.contains("F32"), "{}", s.dtype);

        let text = s.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 18);
        let col = lines[0].find("Tiny").expect("value column");
        for l in &lines {
            assert_eq!(l.chars().nth(col - 1), Some(' '), "aligned: {l:?}");
            assert_ne!(l.chars().nth(col), Some(' '), "aligned: {l:?}");
        }
        assert!(
            text.contains("architecture       LlamaForCausalLM"),
            "{text}"
        );

        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["arch"], "LlamaForCausalLM");
        assert_eq!(json["kv_heads"], 1);
        assert_eq!(json["chat_template_present"], true);
    }

    #[test]
    fn dominant_type_and_formatting() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("m");
        hf::testutil::write_tiny_llama(&dir);
        let mut m = hf::open(&dir).expect("open");
        m.tensors
            .retain(|_, t| t.block_type() == Some(GgmlType::BF16));
        assert_eq!(ModelSummary::of(&m).dtype, "BF16");
        let small = TensorRef::from_f32("x", vec![4], &[0.0; 4]).expect("f32");
        m.tensors.insert("x".into(), small);
        assert_eq!(
            ModelSummary::of(&m).dtype,
            "BF16",
            "a 0.3% minority does not make a mix"
        );
        let q = TensorRef::new(
            "q",
            vec![4, 32],
            GgmlType::Q8_0,
            Bytes::owned(vec![0; 4 * 34]),
        )
        .expect("q8");
        m.tensors.insert("q".into(), q);
        assert_eq!(
            ModelSummary::of(&m).dtype,
            "mixed: BF16 91.4%, Q8_0 8.3%, F32 0.3%"
        );
        assert_eq!(human_count(1_235_814_400), "1.24B");
        assert_eq!(human_count(134_515_008), "134.5M");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_bytes(2_650_000_000), "2.47 GiB");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(100), "100");
    }
}
