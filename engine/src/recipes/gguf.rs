//! llama-quantize's per-tensor type choice (`llama_tensor_get_type` in llama.cpp's
//! `src/llama-quant.cpp`), for dense Llama/Mistral/Qwen2 models; see `shared/reference/gguf.md` §4.
//!
//! Order of decisions for one tensor, as llama-quantize takes them:
//! 1. tensors that are never quantized (fewer than 2 dimensions, names not ending in `weight`, norms,
//!    a few special tensors) keep their stored type — F32 for every GGUF that convert_hf_to_gguf writes;
//! 2. otherwise the mix's default type; when that is a block type: the first matching user override,
//!    else (not `--pure`) the category rules below, then the shape fallback when the row length `ne0`
//!    is not a multiple of the type's block.
//!
//! The counters of llama-quantize (`i_attention_wv`, `i_ffn_down`) advance only when the category
//! rules run, in the order the tensors are given (llama.cpp's loader order: by layer, then by name).

use crate::codecs::GgmlType;
use crate::model::config::{Arch, ModelConfig};
use crate::{Error, Result};

/// A llama-quantize file type (`llama_ftype`), or `--pure` with one block type everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufMix {
    /// `--pure`: every quantizable tensor gets this type (shape fallbacks still apply).
    Pure(GgmlType),
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3KS,
    Q3KM,
    Q3KL,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
    Iq4Nl,
    Iq4Xs,
    Iq2Xxs,
    Iq2Xs,
    Iq2S,
    Iq2M,
    Iq3Xxs,
    Iq3Xs,
    Iq3S,
    Iq3M,
    Iq1S,
    Iq1M,
}

/// The named mixes: (mix, llama-quantize's name, `llama_ftype` value, default type, nominal bits per
/// weight of the linears as `llama-quantize --help` lists them).
const NAMED: [(GgufMix, &str, u32, GgmlType, f64); 28] = [
    (GgufMix::F16, "F16", 1, GgmlType::F16, 16.0),
    (GgufMix::BF16, "BF16", 32, GgmlType::BF16, 16.0),
    (GgufMix::Q8_0, "Q8_0", 7, GgmlType::Q8_0, 8.5),
    (GgufMix::Q4_0, "Q4_0", 2, GgmlType::Q4_0, 4.5),
    (GgufMix::Q4_1, "Q4_1", 3, GgmlType::Q4_1, 5.0),
    (GgufMix::Q5_0, "Q5_0", 8, GgmlType::Q5_0, 5.5),
    (GgufMix::Q5_1, "Q5_1", 9, GgmlType::Q5_1, 6.0),
    (GgufMix::Q2K, "Q2_K", 10, GgmlType::Q2K, 3.35),
    (GgufMix::Q3KS, "Q3_K_S", 11, GgmlType::Q3K, 3.5),
    (GgufMix::Q3KM, "Q3_K_M", 12, GgmlType::Q3K, 3.91),
    (GgufMix::Q3KL, "Q3_K_L", 13, GgmlType::Q3K, 4.27),
    (GgufMix::Q4KS, "Q4_K_S", 14, GgmlType::Q4K, 4.58),
    (GgufMix::Q4KM, "Q4_K_M", 15, GgmlType::Q4K, 4.89),
    (GgufMix::Q5KS, "Q5_K_S", 16, GgmlType::Q5K, 5.54),
    (GgufMix::Q5KM, "Q5_K_M", 17, GgmlType::Q5K, 5.69),
    (GgufMix::Q6K, "Q6_K", 18, GgmlType::Q6K, 6.5625),
    (GgufMix::Iq4Nl, "IQ4_NL", 25, GgmlType::Iq4Nl, 4.5),
    (GgufMix::Iq4Xs, "IQ4_XS", 30, GgmlType::Iq4Xs, 4.25),
    (GgufMix::Iq2Xxs, "IQ2_XXS", 19, GgmlType::Iq2Xxs, 2.06),
    (GgufMix::Iq2Xs, "IQ2_XS", 20, GgmlType::Iq2Xs, 2.31),
    // llama-quantize's IQ2_S mix is IQ2_XS by default and IQ2_M is IQ2_S (lq.cpp's default types).
    (GgufMix::Iq2S, "IQ2_S", 28, GgmlType::Iq2Xs, 2.5),
    (GgufMix::Iq2M, "IQ2_M", 29, GgmlType::Iq2S, 2.7),
    (GgufMix::Iq3Xxs, "IQ3_XXS", 23, GgmlType::Iq3Xxs, 3.06),
    (GgufMix::Iq3Xs, "IQ3_XS", 22, GgmlType::Iq3S, 3.3),
    (GgufMix::Iq3S, "IQ3_S", 26, GgmlType::Iq3S, 3.44),
    (GgufMix::Iq3M, "IQ3_M", 27, GgmlType::Iq3S, 3.66),
    (GgufMix::Iq1S, "IQ1_S", 24, GgmlType::Iq1S, 1.56),
    (GgufMix::Iq1M, "IQ1_M", 31, GgmlType::Iq1M, 1.75),
];

impl GgufMix {
    /// Parses llama-quantize's names, case-insensitively: `"Q4_K_M"`, `"q4_k_m"`, the aliases
    /// `"Q3_K"`/`"Q4_K"`/`"Q5_K"` (= `_M`, as llama-quantize), the `llama_ftype` number (`"15"`), and
    /// `"pure:<type>"` (`"pure:q4_k"`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Some(ty) = s.strip_prefix("pure:").or_else(|| s.strip_prefix("PURE:")) {
            return GgmlType::all()
                .find(|t| t.name().eq_ignore_ascii_case(ty.trim()))
                .map(GgufMix::Pure);
        }
        if let Ok(n) = s.parse::<u32>() {
            return NAMED.iter().find(|e| e.2 == n).map(|e| e.0);
        }
        let alias = match s.to_ascii_uppercase().as_str() {
            "Q3_K" => Some(GgufMix::Q3KM),
            "Q4_K" => Some(GgufMix::Q4KM),
            "Q5_K" => Some(GgufMix::Q5KM),
            _ => None,
        };
        alias.or_else(|| {
            NAMED
                .iter()
                .find(|e| e.1.eq_ignore_ascii_case(s))
                .map(|e| e.0)
        })
    }

    /// llama-quantize's name (`"Q4_K_M"`); `"pure:Q4_K"` for a pure mix.
    pub fn name(&self) -> &'static str {
        match self {
            GgufMix::Pure(t) => match t {
                GgmlType::F32 => "pure:F32",
                GgmlType::F16 => "pure:F16",
                GgmlType::BF16 => "pure:BF16",
                GgmlType::Q4_0 => "pure:Q4_0",
                GgmlType::Q4_1 => "pure:Q4_1",
                GgmlType::Q5_0 => "pure:Q5_0",
                GgmlType::Q5_1 => "pure:Q5_1",
                GgmlType::Q8_0 => "pure:Q8_0",
                GgmlType::Q2K => "pure:Q2_K",
                GgmlType::Q3K => "pure:Q3_K",
                GgmlType::Q4K => "pure:Q4_K",
                GgmlType::Q5K => "pure:Q5_K",
                GgmlType::Q6K => "pure:Q6_K",
                GgmlType::Iq4Nl => "pure:IQ4_NL",
                GgmlType::Iq4Xs => "pure:IQ4_XS",
                GgmlType::Iq2Xxs => "pure:IQ2_XXS",
                GgmlType::Iq2Xs => "pure:IQ2_XS",
                GgmlType::Iq2S => "pure:IQ2_S",
                GgmlType::Iq3Xxs => "pure:IQ3_XXS",
                GgmlType::Iq3S => "pure:IQ3_S",
                GgmlType::Iq1S => "pure:IQ1_S",
                GgmlType::Iq1M => "pure:IQ1_M",
            },
            named => NAMED.iter().find(|e| e.0 == *named).map_or("?", |e| e.1),
        }
    }

    /// `general.file_type` (`llama_ftype`, reference §1.5). A pure mix reports the ftype whose default
    /// type it is (`pure:Q4_K` → 15 = Q4_K_M, as llama-quantize's `Q4_K` alias; F32 → 0).
    pub fn file_type(&self) -> u32 {
        match self {
            GgufMix::Pure(GgmlType::F32) => 0,
            GgufMix::Pure(t) => {
                let alias = match t {
                    GgmlType::Q3K => Some(12),
                    GgmlType::Q4K => Some(15),
                    GgmlType::Q5K => Some(17),
                    GgmlType::Iq3S => Some(26),
                    _ => None,
                };
                alias.unwrap_or_else(|| NAMED.iter().find(|e| e.3 == *t).map_or(0, |e| e.2))
            }
            named => NAMED.iter().find(|e| e.0 == *named).map_or(0, |e| e.2),
        }
    }

    /// Every named mix (pure mixes excluded), in llama-quantize's listing order.
    pub fn all() -> impl Iterator<Item = GgufMix> {
        NAMED.iter().map(|e| e.0)
    }

    /// Bits per weight of the decoder's linears, nominally (llama-quantize's listed sizes; a pure mix: its
    /// type's). For estimates before a model's exact plan is known.
    pub fn nominal_bpw(&self) -> f64 {
        match self {
            GgufMix::Pure(t) => t.traits().bits_per_weight(),
            named => NAMED.iter().find(|e| e.0 == *named).map_or(16.0, |e| e.4),
        }
    }

    /// Whether llama-quantize refuses this mix without an importance matrix (some of its tensors get a
    /// type [`tensor_requires_imatrix`] names, on any model whose rows fit the type's blocks).
    pub fn needs_imatrix(&self) -> bool {
        match self {
            GgufMix::Pure(t) => tensor_requires_imatrix("blk.0.attn_q.weight", *t),
            m => matches!(
                m,
                GgufMix::Iq1S
                    | GgufMix::Iq1M
                    | GgufMix::Iq2Xxs
                    | GgufMix::Iq2Xs
                    | GgufMix::Iq2S
                    | GgufMix::Iq2M
                    | GgufMix::Iq3Xxs
                    | GgufMix::Iq3Xs
            ),
        }
    }

    /// `llama_ftype_get_default_type`: the type of tensors no rule singles out.
    pub fn default_type(&self) -> GgmlType {
        match self {
            GgufMix::Pure(t) => *t,
            named => NAMED
                .iter()
                .find(|e| e.0 == *named)
                .map_or(GgmlType::F16, |e| e.3),
        }
    }
}

/// A user override (llama-quantize's `--tensor-type PATTERN=TYPE`): the first override whose pattern
/// matches a tensor's GGUF name decides its type, before (and instead of) the mix's rules; the shape
/// fallback still applies. As in llama-quantize, overrides are ignored by the F16/BF16/pure-float
/// mixes. The pattern matches when it is found as a regular expression anywhere in the name
/// (`std::regex_search`, a subset: literals, `.`, `[..]`, `\d`/`\w`/`\.` escapes, `* + ?`, `^ $`) or
/// when it matches the whole name as a glob (`*`, `?`), e.g. `blk.*.attn_v.weight`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorOverride {
    pub pattern: String,
    pub ty: GgmlType,
}

impl TensorOverride {
    /// Whether this override applies to the tensor `name`.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.pattern.as_bytes(), name.as_bytes()) || regex_search(&self.pattern, name)
    }
}

/// What a tensor is to llama-quantize's rules (`tensor_get_category`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    /// attn_v, fused attn_qkv, attn_kv_b: the "attn_v-like" tensors sharing the attn_v rules and counter.
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        Category::TokenEmbd
    } else if ["attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"]
        .iter()
        .any(|p| name.contains(p))
    {
        Category::AttnV
    } else if name.contains("attn_k.weight") {
        Category::AttnK
    } else if name.contains("attn_q.weight") {
        Category::AttnQ
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_up") {
        Category::FfnUp
    } else if name.contains("ffn_gate") {
        Category::FfnGate
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// ggml_n_dims: trailing dimensions of 1 do not count.
fn n_dims(ne: &[u64]) -> usize {
    ne.iter().rposition(|&n| n > 1).map_or(1, |i| i + 1)
}

/// `tensor_allows_quantization` for the tensors a Llama-family GGUF can hold.
fn allows_quantization(name: &str, ne: &[u64]) -> bool {
    const NEVER: [&str; 8] = [
        "_norm.weight",
        "ffn_gate_inp.weight",
        ".position_embd",
        "attn_rel_b.weight",
        "ssm_conv1d",
        ".rel_pos",
        ".patch_embd",
        "per_layer_model_proj",
    ];
    n_dims(ne) >= 2 && name.ends_with("weight") && !NEVER.iter().any(|p| name.contains(p))
}

fn is_block_type(t: GgmlType) -> bool {
    !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// llama-quantize's `use_more_bits`: the first and last eighth of the layers and every third in between.
fn use_more_bits(i: usize, n: usize) -> bool {
    let (i, n) = (i as i64, n as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// What the rules need to know about the model, and llama-quantize's running counters.
struct State {
    mix: GgufMix,
    n_gqa: usize,
    is_70b: bool,
    tied: bool,
    n_attention_wv: usize,
    n_layer: usize,
    has_imatrix: bool,
    i_attention_wv: usize,
    i_ffn_down: usize,
    i_ffn_gate: usize,
    i_ffn_up: usize,
}

impl State {
    /// `llama_tensor_get_type_impl` for the ftypes of [`GgufMix`] on a dense, non-Falcon model: one
    /// else-if chain, like llama.cpp's, so the IQ1/IQ2 mixes only ever see their own group of rules.
    fn rules(&mut self, ty: GgmlType, cat: Category, ne0: u64) -> GgmlType {
        use GgmlType as T;
        use GgufMix as M;
        let mix = self.mix;
        let gqa4 = self.n_gqa >= 4;
        // Mixes whose tied output / embedding gets Q5_K instead of Q6_K.
        let q5k_output = matches!(
            mix,
            M::Iq2Xxs | M::Iq2Xs | M::Iq3Xxs | M::Iq1S | M::Iq2S | M::Iq2M | M::Iq1M
        );
        // The IQ1/IQ2 ftypes (their own branch of the chain).
        let low = matches!(
            mix,
            M::Iq2Xxs | M::Iq2Xs | M::Iq1S | M::Iq2S | M::Iq2M | M::Iq1M
        );
        let s_or_m = matches!(mix, M::Iq2S | M::Iq2M);
        if cat == Category::Output || (self.tied && cat == Category::TokenEmbd) {
            return if !ne0.is_multiple_of(ty.traits().block_elems as u64) {
                T::Q8_0
            } else if q5k_output {
                T::Q5K
            } else if ty != T::Q8_0 {
                T::Q6K
            } else {
                ty
            };
        }
        if cat == Category::TokenEmbd {
            return match mix {
                M::Iq2Xxs | M::Iq2Xs | M::Iq1S | M::Iq1M => T::Q2K,
                M::Iq2S | M::Iq2M | M::Iq3Xxs => T::Iq3S,
                _ => ty,
            };
        }
        if low {
            return match cat {
                Category::AttnV => {
                    self.i_attention_wv += 1;
                    if gqa4 {
                        T::Q4K
                    } else if s_or_m {
                        T::Iq3S
                    } else {
                        T::Q2K
                    }
                }
                Category::FfnDown => {
                    let i = self.i_ffn_down;
                    self.i_ffn_down += 1;
                    match () {
                        _ if i < self.n_layer / 8 && s_or_m => T::Iq3S,
                        _ if i < self.n_layer / 8 => T::Q2K,
                        _ => ty,
                    }
                }
                Category::AttnOutput if matches!(mix, M::Iq1S | M::Iq1M) => T::Iq2Xxs,
                Category::AttnOutput if s_or_m => T::Iq3S,
                _ => ty,
            };
        }
        match cat {
            Category::AttnV => {
                let i = self.i_attention_wv;
                let mut t = match mix {
                    M::Q2K => {
                        if gqa4 {
                            T::Q4K
                        } else {
                            T::Q3K
                        }
                    }
                    M::Iq3Xxs if gqa4 => T::Q4K,
                    M::Iq3Xxs if !self.has_imatrix => T::Iq3S,
                    M::Iq3Xxs => T::Iq3Xxs,
                    M::Iq3Xs | M::Iq3S if gqa4 => T::Q4K,
                    M::Iq3M => T::Q4K,
                    M::Q3KM if i < 2 => T::Q5K,
                    M::Q3KM => T::Q4K,
                    M::Q3KL => T::Q5K,
                    M::Iq4Nl | M::Iq4Xs if gqa4 => T::Q5K,
                    M::Q4KM | M::Q5KM if use_more_bits(i, self.n_attention_wv) => T::Q6K,
                    M::Q4KS if i < 4 => T::Q5K,
                    _ => ty,
                };
                if self.is_70b && matches!(t, T::Q3K | T::Q4K) {
                    t = T::Q5K;
                }
                self.i_attention_wv += 1;
                t
            }
            Category::AttnK | Category::AttnQ => match mix {
                M::Iq3Xs => T::Iq3Xxs,
                M::Iq3Xxs => T::Iq2S,
                _ => ty,
            },
            Category::FfnDown => {
                let (i, n) = (self.i_ffn_down, self.n_layer);
                let t = match mix {
                    M::Q2K => T::Q3K,
                    M::Iq3Xxs if !self.has_imatrix && i < n / 8 => T::Q4K,
                    M::Iq3Xxs if !self.has_imatrix => T::Q3K,
                    M::Q3KM if i < n / 16 => T::Q5K,
                    M::Q3KM => T::Q4K,
                    M::Iq3M if i < n / 8 => T::Q4K,
                    M::Q3KL => T::Q5K,
                    M::Q4KM | M::Q5KM if use_more_bits(i, n) => T::Q6K,
                    M::Iq4Nl | M::Iq4Xs if i < n / 8 && !self.has_imatrix => T::Q5K,
                    M::Q4KS if i < n / 8 => T::Q5K,
                    M::Q4_0 if self.has_imatrix && i < n / 8 => T::Q4_1,
                    M::Q5_0 if self.has_imatrix && i < n / 8 => T::Q5_1,
                    _ => ty,
                };
                self.i_ffn_down += 1;
                t
            }
            Category::AttnOutput => match mix {
                M::Q2K => T::Q3K,
                M::Iq3Xxs => T::Iq3S,
                M::Q3KM | M::Iq3M => T::Q4K,
                M::Q3KL => T::Q5K,
                _ => ty,
            },
            Category::FfnGate | Category::FfnUp => {
                let counter = if cat == Category::FfnGate {
                    &mut self.i_ffn_gate
                } else {
                    &mut self.i_ffn_up
                };
                let (i, n) = (*counter, self.n_layer);
                *counter += 1;
                if mix == M::Iq3Xs && i >= n / 8 && i < 7 * n / 8 {
                    T::Iq3Xxs
                } else {
                    ty
                }
            }
            _ => ty,
        }
    }
}

/// llama-quantize's `tensor_requires_imatrix`: tensors of these types need importance data (the lattice
/// searches weigh every element by it), except the token embedding and the output head.
pub fn tensor_requires_imatrix(name: &str, ty: GgmlType) -> bool {
    let exempt = name.starts_with("token_embd.") || name.starts_with("output.");
    !exempt
        && matches!(
            ty,
            GgmlType::Iq3Xxs
                | GgmlType::Iq2Xxs
                | GgmlType::Iq2Xs
                | GgmlType::Iq2S
                | GgmlType::Iq1M
                | GgmlType::Iq1S
        )
}

/// `tensor_type_fallback`: a type whose block does not divide the row length `ne0` is replaced.
fn fallback(name: &str, ne0: u64, ty: GgmlType) -> Result<GgmlType> {
    use GgmlType as T;
    if ne0.is_multiple_of(ty.traits().block_elems as u64) {
        return Ok(ty);
    }
    let alt = match ty {
        T::Iq4Xs | T::Iq2Xxs | T::Iq2Xs | T::Iq2S | T::Iq3Xxs | T::Iq3S | T::Iq1S | T::Iq1M => {
            T::Iq4Nl
        }
        T::Q2K | T::Q3K => T::Q4_0,
        T::Q4K => T::Q5_0,
        T::Q5K => T::Q5_1,
        T::Q6K => T::Q8_0,
        _ => {
            return Err(Error::Invalid(format!(
            "{name}: rows of {ne0} are not a multiple of {}'s block and it has no fallback type",
            ty.name()
        )))
        }
    };
    Ok(if ne0.is_multiple_of(alt.traits().block_elems as u64) {
        alt
    } else {
        T::F16
    })
}

/// GGUF tensor names (`token_embd.weight`, `blk.3.attn_v.weight`, ...) with their `ne` (row length
/// first), in llama.cpp's visiting order (by layer number, then by name) → the type llama-quantize
/// gives each tensor for `mix`. Tensors that are never quantized (norms, 1-D) are reported as F32.
/// `has_imatrix` only changes IQ4_NL/IQ4_XS and Q4_0/Q5_0 ffn_down choices; none of these mixes needs
/// an importance matrix.
pub fn plan_gguf_mix(
    mix: &GgufMix,
    cfg: &ModelConfig,
    tensors: &[(String, Vec<u64>)],
    overrides: &[TensorOverride],
    has_imatrix: bool,
) -> Result<Vec<(String, GgmlType)>> {
    // An override that matches nothing is a typo, not a no-op.
    if let Some(o) = overrides
        .iter()
        .find(|o| !tensors.iter().any(|(n, _)| o.matches(n)))
    {
        let example = tensors
            .iter()
            .map(|(n, _)| n.as_str())
            .find(|n| n.contains("attn_v"))
            .unwrap_or("blk.0.attn_v.weight");
        return Err(Error::Invalid(format!(
            "override {}={}: the pattern matches no tensor of this model (patterns match GGUF names, \
             e.g. {example})",
            o.pattern,
            o.ty.name()
        )));
    }
    let default = mix.default_type();
    let n_gqa = cfg.num_heads.checked_div(cfg.num_kv_heads).unwrap_or(0);
    // llama.cpp's LLM_TYPE_70B: 80 layers (Llama: with grouped-query attention).
    let is_70b =
        cfg.num_layers == 80 && (cfg.arch == Arch::Qwen2 || cfg.num_heads != cfg.num_kv_heads);
    let mut st = State {
        mix: *mix,
        n_gqa,
        is_70b,
        tied: !tensors.iter().any(|(n, _)| n == "output.weight"),
        n_attention_wv: tensors
            .iter()
            .filter(|(n, _)| category(n) == Category::AttnV)
            .count(),
        n_layer: cfg.num_layers,
        has_imatrix,
        i_attention_wv: 0,
        i_ffn_down: 0,
        i_ffn_gate: 0,
        i_ffn_up: 0,
    };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, ne) in tensors {
        if !allows_quantization(name, ne) {
            out.push((name.clone(), GgmlType::F32));
            continue;
        }
        let mut ty = default;
        if is_block_type(default) {
            let ne0 = ne.first().copied().unwrap_or(1);
            if let Some(o) = overrides.iter().find(|o| o.matches(name)) {
                ty = o.ty;
            } else if !matches!(mix, GgufMix::Pure(_)) {
                ty = st.rules(ty, category(name), ne0);
            }
            ty = fallback(name, ne0, ty)?;
        }
        out.push((name.clone(), ty));
    }
    Ok(out)
}

/// Whole-string glob match: `*` any run, `?` any one byte.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// One regex atom: what a single character may be.
#[derive(Debug)]
enum Atom {
    Any,
    Byte(u8),
    /// (negated, ranges)
    Class(bool, Vec<(u8, u8)>),
}

impl Atom {
    fn accepts(&self, c: u8) -> bool {
        match self {
            Atom::Any => true,
            Atom::Byte(b) => *b == c,
            Atom::Class(neg, ranges) => ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *neg,
        }
    }
}

/// (atom, min, max) pieces of a pattern, `None` when it uses syntax we do not handle.
fn regex_parse(p: &[u8]) -> Option<Vec<(Atom, usize, usize)>> {
    let escape = |c: u8| -> Atom {
        match c {
            b'd' => Atom::Class(false, vec![(b'0', b'9')]),
            b'w' => Atom::Class(
                false,
                vec![(b'a', b'z'), (b'A', b'Z'), (b'0', b'9'), (b'_', b'_')],
            ),
            other => Atom::Byte(other),
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let atom = match p[i] {
            b'.' => Atom::Any,
            b'\\' => {
                i += 1;
                escape(*p.get(i)?)
            }
            b'[' => {
                i += 1;
                let neg = p.get(i) == Some(&b'^');
                if neg {
                    i += 1;
                }
                let mut ranges = Vec::new();
                while *p.get(i)? != b']' {
                    let lo = if p[i] == b'\\' {
                        i += 1;
                        match escape(*p.get(i)?) {
                            Atom::Class(_, r) => {
                                ranges.extend(r);
                                i += 1;
                                continue;
                            }
                            Atom::Byte(b) => b,
                            Atom::Any => return None,
                        }
                    } else {
                        p[i]
                    };
                    if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&c| c != b']') {
                        ranges.push((lo, p[i + 2]));
                        i += 3;
                    } else {
                        ranges.push((lo, lo));
                        i += 1;
                    }
                }
                Atom::Class(neg, ranges)
            }
            b'(' | b')' | b'|' | b'{' | b'}' | b'*' | b'+' | b'?' | b'^' | b'$' => return None,
            c => Atom::Byte(c),
        };
        i += 1;
        let (min, max) = match p.get(i) {
            Some(b'*') => (0, usize::MAX),
            Some(b'+') => (1, usize::MAX),
            Some(b'?') => (0, 1),
            _ => (1, 1),
        };
        if (min, max) != (1, 1) {
            i += 1;
        }
        out.push((atom, min, max));
    }
    Some(out)
}

fn regex_here(pieces: &[(Atom, usize, usize)], s: &[u8], anchored_end: bool) -> bool {
    let Some(((atom, min, max), rest)) = pieces.split_first() else {
        return !anchored_end || s.is_empty();
    };
    let mut n = 0;
    while n < *max && n < s.len() && atom.accepts(s[n]) {
        n += 1;
    }
    (*min..=n)
        .rev()
        .any(|k| regex_here(rest, &s[k..], anchored_end))
}

/// `std::regex_search` for the subset [`regex_parse`] reads; false for anything else.
fn regex_search(pattern: &str, name: &str) -> bool {
    let mut p = pattern.as_bytes();
    let start = p.first() == Some(&b'^');
    if start {
        p = &p[1..];
    }
    let end = p.last() == Some(&b'$') && !p.ends_with(b"\\$");
    if end {
        p = &p[..p.len() - 1];
    }
    let Some(pieces) = regex_parse(p) else {
        return false;
    };
    let s = name.as_bytes();
    if start {
        regex_here(&pieces, s, end)
    } else {
        (0..=s.len()).any(|k| regex_here(&pieces, &s[k..], end))
    }
}

pub use crate::solvers::mix::MixBudget;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::config::Arch;
    use serde_json::Value;

    fn config(
        arch: Arch,
        hidden: usize,
        ffn: usize,
        layers: usize,
        heads: usize,
        kv: usize,
    ) -> ModelConfig {
        ModelConfig {
            arch,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            vocab_size: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            attention_bias: false,
            torch_dtype: None,
            rope_freq_factors: None,
        }
    }

    /// Every ftype of a fixture written by `tests/fixtures/mixes/make_mix_fixture.py` from real
    /// llama-quantize runs; returns how many ftypes were compared.
    fn check_fixture(json: &str, cfg: &ModelConfig) -> usize {
        let v: Value = serde_json::from_str(json).unwrap();
        let tensors: Vec<(String, Vec<u64>)> = v["_tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let ne = t[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect();
                (t[0].as_str().unwrap().to_string(), ne)
            })
            .collect();
        let mut compared = 0;
        for (ftype, expected) in v.as_object().unwrap() {
            if ftype.starts_with('_') {
                continue;
            }
            // "<FTYPE>+imatrix": llama-quantize ran with an importance matrix.
            let (name, imatrix) = match ftype.strip_suffix("+imatrix") {
                Some(n) => (n, true),
                None => (ftype.as_str(), false),
            };
            let mix = GgufMix::parse(name).unwrap_or_else(|| panic!("unknown ftype {ftype}"));
            let plan = plan_gguf_mix(&mix, cfg, &tensors, &[], imatrix).unwrap();
            assert_eq!(plan.len(), expected.as_object().unwrap().len(), "{ftype}");
            for (name, ty) in &plan {
                assert_eq!(
                    ty.name(),
                    expected[name].as_str().unwrap(),
                    "{ftype}: {name}"
                );
            }
            compared += 1;
        }
        compared
    }

    #[test]
    fn smollm2_matches_llama_quantize() {
        // SmolLM2-135M: n_embd 576 (not a multiple of 256), 30 layers, 9 heads / 3 KV heads, tied.
        let cfg = config(Arch::Llama, 576, 1536, 30, 9, 3);
        let json = include_str!("../../../tests/fixtures/mixes/smollm2_llama_quantize.json");
        assert_eq!(check_fixture(json, &cfg), 13);
    }

    #[test]
    fn synthetic_512_matches_llama_quantize() {
        // Random llama written by the fixture script: hidden 512, ffn 1024, 8 layers, n_gqa 4, untied.
        let cfg = config(Arch::Llama, 512, 1024, 8, 8, 2);
        let json = include_str!("../../../tests/fixtures/mixes/synthetic512_llama_quantize.json");
        assert_eq!(check_fixture(json, &cfg), 13 + 10);
    }

    #[test]
    fn synthetic_512_mha_matches_llama_quantize() {
        // The second random llama: 16 layers, n_gqa 1, tied output (the low-bit mixes' other branches).
        let cfg = config(Arch::Llama, 512, 1024, 16, 8, 8);
        let json =
            include_str!("../../../tests/fixtures/mixes/synthetic512mha_llama_quantize.json");
        assert_eq!(check_fixture(json, &cfg), 13 + 10);
    }

    #[test]
    fn names_parse_and_file_types() {
        for mix in GgufMix::all() {
            assert_eq!(GgufMix::parse(mix.name()), Some(mix));
            assert_eq!(GgufMix::parse(&mix.name().to_lowercase()), Some(mix));
            assert_eq!(GgufMix::parse(&mix.file_type().to_string()), Some(mix));
        }
        assert_eq!(GgufMix::parse("q4_k_m"), Some(GgufMix::Q4KM));
        assert_eq!(GgufMix::parse("Q4_K"), Some(GgufMix::Q4KM));
        assert_eq!(
            GgufMix::parse("pure:q4_k"),
            Some(GgufMix::Pure(GgmlType::Q4K))
        );
        assert_eq!(GgufMix::Pure(GgmlType::Q4K).name(), "pure:Q4_K");
        assert_eq!(GgufMix::Pure(GgmlType::Q4K).file_type(), 15);
        assert_eq!(GgufMix::Q4KM.file_type(), 15);
        assert_eq!(GgufMix::Iq4Xs.file_type(), 30);
        assert_eq!(GgufMix::BF16.file_type(), 32);
        assert_eq!(GgufMix::parse("q4_k_x"), None);
        assert_eq!(GgufMix::parse("pure:q9"), None);
    }

    fn tiny() -> Vec<(String, Vec<u64>)> {
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![512, 512]),
            ("output.weight".to_string(), vec![512, 512]),
            ("output_norm.weight".to_string(), vec![512]),
        ];
        for i in 0..8 {
            t.push((format!("blk.{i}.attn_norm.weight"), vec![512]));
            t.push((format!("blk.{i}.attn_v.weight"), vec![512, 128]));
            t.push((format!("blk.{i}.ffn_down.weight"), vec![1024, 512]));
        }
        t
    }

    #[test]
    fn pure_overrides_and_float_mixes() {
        let cfg = config(Arch::Llama, 512, 1024, 8, 8, 2);
        let t = tiny();
        let pure = plan_gguf_mix(&GgufMix::Pure(GgmlType::Q4K), &cfg, &t, &[], false).unwrap();
        for (name, ty) in &pure {
            let want = if name.contains("norm") {
                GgmlType::F32
            } else {
                GgmlType::Q4K
            };
            assert_eq!(*ty, want, "{name}");
        }
        let ov = [
            TensorOverride {
                pattern: r"blk\.[0-3]\.attn_v".into(),
                ty: GgmlType::Q8_0,
            },
            TensorOverride {
                pattern: "blk.*.ffn_down.weight".into(),
                ty: GgmlType::Q6K,
            },
        ];
        let plan = plan_gguf_mix(&GgufMix::Q4KM, &cfg, &t, &ov, false).unwrap();
        let get = |n: &str| plan.iter().find(|p| p.0 == n).unwrap().1;
        assert_eq!(get("blk.2.attn_v.weight"), GgmlType::Q8_0);
        // Layer 4 is not overridden, and the attn_v counter only counted layers 4.. (llama-quantize):
        // use_more_bits(0, 8) → Q6_K.
        assert_eq!(get("blk.4.attn_v.weight"), GgmlType::Q6K);
        assert_eq!(get("blk.5.ffn_down.weight"), GgmlType::Q6K);
        assert_eq!(get("output.weight"), GgmlType::Q6K);
        let f16 = plan_gguf_mix(&GgufMix::F16, &cfg, &t, &[], false).unwrap();
        assert!(f16.iter().all(|(n, ty)| *ty
            == if n.contains("norm") {
                GgmlType::F32
            } else {
                GgmlType::F16
            }));
        // imatrix-only choices: IQ4_XS ffn_down of the first eighth gets Q5_K only without one.
        let with = plan_gguf_mix(&GgufMix::Iq4Xs, &cfg, &t, &[], true).unwrap();
        let without = plan_gguf_mix(&GgufMix::Iq4Xs, &cfg, &t, &[], false).unwrap();
        let down0 =
            |p: &[(String, GgmlType)]| p.iter().find(|x| x.0 == "blk.0.ffn_down.weight").unwrap().1;
        assert_eq!(down0(&with), GgmlType::Iq4Xs);
        assert_eq!(down0(&without), GgmlType::Q5K);
        let q40 = plan_gguf_mix(&GgufMix::Q4_0, &cfg, &t, &[], true).unwrap();
        assert_eq!(down0(&q40), GgmlType::Q4_1);
        let typo = [TensorOverride {
            pattern: "blk.*.atn_v.weight".into(),
            ty: GgmlType::Q8_0,
        }];
        let e = plan_gguf_mix(&GgufMix::Q4KM, &cfg, &t, &typo, false)
            .expect_err("no tensor matches")
            .to_string();
        assert!(
            e.contains("matches no tensor") && e.contains("blk.0.attn_v.weight"),
            "{e}"
        );
    }

    #[test]
    fn fallbacks_and_errors() {
        assert_eq!(fallback("x", 576, GgmlType::Q4K).unwrap(), GgmlType::Q5_0);
        assert_eq!(fallback("x", 576, GgmlType::Q5K).unwrap(), GgmlType::Q5_1);
        assert_eq!(fallback("x", 576, GgmlType::Q6K).unwrap(), GgmlType::Q8_0);
        assert_eq!(fallback("x", 576, GgmlType::Q2K).unwrap(), GgmlType::Q4_0);
        assert_eq!(
            fallback("x", 576, GgmlType::Iq4Xs).unwrap(),
            GgmlType::Iq4Nl
        );
        assert_eq!(fallback("x", 100, GgmlType::Q4K).unwrap(), GgmlType::F16);
        assert!(fallback("x", 100, GgmlType::Q8_0).is_err());
        assert!(
            use_more_bits(0, 32)
                && use_more_bits(6, 32)
                && !use_more_bits(5, 32)
                && use_more_bits(28, 32)
        );
    }

    #[test]
    fn pattern_matching() {
        let o = |p: &str| TensorOverride {
            pattern: p.into(),
            ty: GgmlType::Q8_0,
        };
        assert!(o("attn_v").matches("blk.3.attn_v.weight"));
        assert!(o("^blk\\.1[0-9]\\.").matches("blk.12.attn_v.weight"));
        assert!(!o("^blk\\.1[0-9]\\.").matches("blk.2.attn_v.weight"));
        assert!(o("blk.?.attn_q.weight").matches("blk.7.attn_q.weight"));
        assert!(o("output\\.weight$").matches("output.weight"));
        assert!(!o("^output").matches("blk.0.attn_output.weight"));
    }
}
