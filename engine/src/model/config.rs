//! The model's hyper-parameters, in Hugging Face's terms, whatever file they came from.

use serde::{Deserialize, Serialize};

/// The decoder architectures we run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// `LlamaForCausalLM`
    Llama,
    /// `MistralForCausalLM` (a Llama without biases; sliding window ignored for contexts below it)
    Mistral,
    /// `Qwen2ForCausalLM` (q/k/v biases)
    Qwen2,
}

impl Arch {
    /// The `architectures[0]` string of config.json.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1's per-frequency scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// Training context length.
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens`.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2, or Llama with `attention_bias`).
    pub attention_bias: bool,
    /// The stored dtype named by config.json (`"bfloat16"`), if any.
    pub torch_dtype: Option<String>,
    /// Per-frequency divisors from a GGUF's `rope_freqs.weight` (Llama 3.1+ files), applied on top of
    /// `rope_theta` when `rope_scaling` is `None`: θ_i = base_i / factor_i, as llama.cpp does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl ModelConfig {
    /// Per-dimension inverse frequencies `θ_i` for rotate-half RoPE (length `head_dim / 2`), with scaling
    /// applied exactly as transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`
    /// do. Linear scaling is applied here too (positions / factor ≡ frequencies / factor).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / f64::from(self.rope_theta).powf((2 * i) as f64 / d as f64))
            .collect();
        match self.rope_scaling {
            None => match &self.rope_freq_factors {
                Some(fac) => base
                    .iter()
                    .zip(fac.iter().chain(std::iter::repeat(&1.0)))
                    .map(|(&f, &k)| (f / f64::from(k)) as f32)
                    .collect(),
                None => base.iter().map(|&f| f as f32).collect(),
            },
            Some(RopeScaling::Linear { factor }) => base
                .iter()
                .map(|&f| (f / f64::from(factor)) as f32)
                .collect(),
            Some(RopeScaling::Llama3 { .. }) => {
                let div = self.llama3_rope_divisors().unwrap_or_default();
                base.iter()
                    .zip(&div)
                    .map(|(&f, &k)| (f / k) as f32)
                    .collect()
            }
        }
    }

    /// Llama 3.1 scaling as one divisor per frequency (1 for high frequencies, `factor` for low ones,
    /// interpolated between): what transformers' `_compute_llama3_parameters` applies and what llama.cpp
    /// stores as `rope_freqs.weight`. `None` for other scalings.
    pub fn llama3_rope_divisors(&self) -> Option<Vec<f64>> {
        let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = self.rope_scaling
        else {
            return None;
        };
        let d = self.head_dim;
        let (factor, lo, hi) = (
            f64::from(factor),
            f64::from(low_freq_factor),
            f64::from(high_freq_factor),
        );
        let old = original_max_position_embeddings as f64;
        let (low_wavelen, high_wavelen) = (old / lo, old / hi);
        Some(
            (0..d / 2)
                .map(|i| {
                    let freq = 1.0 / f64::from(self.rope_theta).powf((2 * i) as f64 / d as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect(),
        )
    }
}
