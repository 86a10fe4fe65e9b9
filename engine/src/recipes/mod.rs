//! Recipes: what a quantize job makes. One [`Recipe`] value per output kind carries everything the job
//! needs (the format's options and, for calibrated formats, where the calibration data comes from); the
//! [`catalogue`] lists every kind with its CLI name, label, container, calibration needs and nominal bits
//! per weight, and [`Recipe::estimate`] prices a run before it starts. The CLI's `--format` help and the
//! studio's target list are built from here: no front end holds a format table of its own.
//!
//! * [`gguf`] — llama-quantize's per-tensor type mixes (`Q4_K_M`, `Q3_K_S`, `--pure`, `--tensor-type`).
//! * GPTQ — [`crate::quantize_gptq::GptqQuantizeOptions`] (solver options, calibration, spill budget).
//! * AWQ — [`crate::quantize_awq::AwqQuantizeOptions`] (grid, layout, calibration, search settings).
//! * EXL2 — [`crate::quantize_exl2::Exl2QuantizeOptions`] (target bpw, head bits, calibration, measurement).
//!
//! Adding a format: a codec or packing (`codecs/`), a format module (reader in `model/`, writer in
//! `writers/`), a variant here with its catalogue entry and estimate, and its job body in
//! `jobs/worker.rs`'s one `Quantize` arm.

pub mod gguf;

use std::path::{Path, PathBuf};

pub use gguf::{plan_gguf_mix, GgufMix, MixBudget, TensorOverride};

use crate::calib::{CalibOptions, CalibSource};
use crate::codecs::bnb::Bnb4Kind;
use crate::codecs::GgmlType;
use crate::imatrix::ImatrixOptions;
use crate::model::summary::ModelSummary;
use crate::quantize_awq::AwqQuantizeOptions;
use crate::quantize_exl2::Exl2QuantizeOptions;
use crate::quantize_gptq::GptqQuantizeOptions;
use crate::solvers::gptq::GptqOptions;
use crate::writers::awq::AwqLayout;
use crate::writers::bnb::Bnb4Options;
use crate::writers::hqq::HqqOptions;
use crate::writers::packed::LinearPacker;
use crate::{Error, Result};

/// What a quantize job makes.
#[derive(Clone, Debug, PartialEq)]
pub enum Recipe {
    /// A GGUF file with one of llama-quantize's mixes.
    Gguf(GgufRecipe),
    /// A Hugging Face GPTQ folder.
    Gptq(Box<GptqQuantizeOptions>),
    /// A Hugging Face AWQ folder (AutoAWQ GEMM or compressed-tensors).
    Awq(Box<AwqQuantizeOptions>),
    /// An ExLlamaV2 EXL2 folder at a target bits per weight, its mix chosen by measured error.
    Exl2(Box<Exl2QuantizeOptions>),
    /// A Hugging Face folder of a calibration-free packed format (bitsandbytes NF4/FP4).
    Packed(PackedRecipe),
}

impl Recipe {
    /// Run the recipe's computing steps (calibration capture, importance matrix, GPTQ/AWQ/EXL2 forward
    /// passes and solvers, HQQ's solver, the legacy types' round-to-nearest quantizers) on `backend`.
    pub fn set_backend(&mut self, backend: crate::backend::Backend) {
        match self {
            Recipe::Gguf(g) => {
                g.backend = backend;
                if let ImatrixSource::Compute { options, .. } = &mut g.imatrix {
                    options.backend = backend;
                }
            }
            Recipe::Gptq(o) => o.backend = backend,
            Recipe::Awq(o) => o.backend = backend,
            Recipe::Exl2(o) => o.backend = backend,
            Recipe::Packed(PackedRecipe::Hqq(o)) => o.backend = backend,
            Recipe::Packed(PackedRecipe::Bnb4(_)) => {}
        }
    }
}

/// The calibration-free packed formats: each linear quantized on its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PackedRecipe {
    /// bitsandbytes 4-bit (NF4/FP4), optionally double-quantized.
    Bnb4(Bnb4Options),
    /// HQQ at 1–8 bits.
    Hqq(HqqOptions),
}

impl PackedRecipe {
    /// The packer the pipeline runs.
    pub fn packer(&self) -> &dyn LinearPacker {
        match self {
            PackedRecipe::Bnb4(o) => o,
            PackedRecipe::Hqq(o) => o,
        }
    }

    /// Bits per weight of a packed linear.
    pub fn linear_bpw(&self) -> f64 {
        match self {
            PackedRecipe::Bnb4(o) => o.bpw(),
            PackedRecipe::Hqq(o) => o.params.bpw(),
        }
    }

    /// Weights quantized, measured and written per second on a 2-core machine (SmolLM2 from an F16
    /// folder: NF4 2 s; HQQ's solver 27 s for 4 bits, plain rounding on its grid as fast as NF4).
    fn weights_per_s(&self) -> f64 {
        match self {
            PackedRecipe::Bnb4(_) => 60e6,
            PackedRecipe::Hqq(o) if o.params.optimize => 5e6,
            PackedRecipe::Hqq(_) => 40e6,
        }
    }

    /// `"NF4"`, `"NF4-dq"`.
    pub fn label(&self) -> String {
        match self {
            PackedRecipe::Bnb4(o) => format!(
                "{}{}",
                o.kind.name().to_uppercase(),
                if o.double_quant { "-dq" } else { "" }
            ),
            PackedRecipe::Hqq(o) => format!(
                "HQQ-{}bit-g{}{}{}",
                o.params.nbits,
                o.params.group_size,
                if o.params.axis == 0 { "-axis0" } else { "" },
                if o.params.optimize { "" } else { "-rtn" }
            ),
        }
    }
}

/// A GGUF mix with its per-tensor overrides and importance matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufRecipe {
    pub mix: GgufMix,
    pub overrides: Vec<TensorOverride>,
    pub imatrix: ImatrixSource,
    /// An error-aware mix instead of `mix`'s rules: every decoder linear's type chosen by measured error
    /// to fit this budget (`mix` then types the rest; see [`crate::quantize_automix`]).
    pub auto: Option<MixBudget>,
    /// The types an auto mix chooses from (empty: [`crate::quantize_automix::AUTOMIX_TYPES`]).
    pub auto_types: Vec<GgmlType>,
    /// Calibration tokens an auto mix's measurement runs the model on to weigh each tensor's error by its
    /// effect on the output (0: the imatrix-weighted errors alone; see [`crate::quantize_automix`]). The
    /// text is the importance matrix's calibration source, or the bundled one with an imatrix file.
    pub auto_probe_tokens: usize,
    /// An auto mix's measurement file: read when it exists (no measuring; the candidates narrowed to
    /// `auto_types`), else written there after measuring, so other budgets can be met without measuring
    /// again.
    pub auto_measurement: Option<PathBuf>,
    /// Where the round-to-nearest quantizers run (the GPU writes the legacy types without an importance
    /// matrix, byte for byte as the CPU).
    pub backend: crate::backend::Backend,
}

/// Where a GGUF quantization's importance matrix comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ImatrixSource {
    /// None: the unweighted quantizers.
    #[default]
    None,
    /// A llama.cpp imatrix file (GGUF or legacy `.dat`).
    File(PathBuf),
    /// Computed on calibration data before quantizing (llama-imatrix's method).
    Compute {
        source: CalibSource,
        options: ImatrixOptions,
    },
}

/// What an output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Container {
    /// One `.gguf` file.
    GgufFile,
    /// A Hugging Face folder (`config.json`, safetensors, tokenizer files).
    HfFolder,
}

/// Whether a recipe uses calibration data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrationNeed {
    /// Never.
    None,
    /// Optionally (an importance matrix for a GGUF mix).
    Optional,
    /// Always (GPTQ's Hessians).
    Required,
}

/// One kind of output, as the front ends list it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecipeKind {
    /// The CLI's `--format` value (`"q4_k_m"`, `"gptq"`).
    pub id: String,
    /// Display name (`"Q4_K_M"`, `"GPTQ"`).
    pub label: String,
    /// The format family (`"GGUF"`, `"GPTQ"`).
    pub family: &'static str,
    pub container: Container,
    pub calibration: CalibrationNeed,
    /// Bits per weight of the quantized linears at the default options.
    pub nominal_bpw: f64,
    /// Which engines load the output.
    pub loads_in: &'static str,
}

/// Bit widths a GPTQ recipe offers.
pub const GPTQ_BITS: [u8; 4] = [2, 3, 4, 8];
/// Group sizes a GPTQ recipe offers (`None`: one group per output channel).
pub const GPTQ_GROUPS: [Option<usize>; 4] = [Some(32), Some(64), Some(128), None];

/// Every output kind: the named GGUF mixes in llama-quantize's order, then GPTQ.
pub fn catalogue() -> Vec<RecipeKind> {
    let mut v: Vec<RecipeKind> = GgufMix::all()
        .map(|mix| RecipeKind {
            id: mix.name().to_ascii_lowercase(),
            label: mix.name().to_string(),
            family: "GGUF",
            container: Container::GgufFile,
            // The low-bit i-quant mixes need an importance matrix (llama-quantize refuses without one).
            calibration: if mix.needs_imatrix() {
                CalibrationNeed::Required
            } else {
                CalibrationNeed::Optional
            },
            nominal_bpw: mix.nominal_bpw(),
            loads_in: "llama.cpp, LM Studio, Ollama",
        })
        .collect();
    v.push(RecipeKind {
        id: "gptq".into(),
        label: "GPTQ".into(),
        family: "GPTQ",
        container: Container::HfFolder,
        calibration: CalibrationNeed::Required,
        nominal_bpw: gptq_bpw(4, Some(128)),
        loads_in: "transformers, vLLM, TGI, ExLlamaV2",
    });
    for (id, label, loads_in) in [
        ("awq", "AWQ", "transformers (gptqmodel), vLLM, TGI, SGLang"),
        (
            "awq-ct",
            "AWQ (compressed-tensors)",
            "vLLM (its default for llm-compressor), transformers + compressed-tensors",
        ),
    ] {
        v.push(RecipeKind {
            id: id.into(),
            label: label.into(),
            family: "AWQ",
            container: Container::HfFolder,
            calibration: CalibrationNeed::Required,
            nominal_bpw: gptq_bpw(4, Some(128)),
            loads_in,
        });
    }
    v.push(RecipeKind {
        id: "exl2".into(),
        label: "EXL2".into(),
        family: "EXL2",
        container: Container::HfFolder,
        calibration: CalibrationNeed::Required,
        nominal_bpw: 4.0,
        loads_in: "ExLlamaV2, TabbyAPI, text-generation-webui",
    });
    for (id, kind) in [("nf4", Bnb4Kind::Nf4), ("fp4", Bnb4Kind::Fp4)] {
        let o = Bnb4Options {
            kind,
            double_quant: false,
        };
        v.push(RecipeKind {
            id: id.into(),
            label: id.to_uppercase(),
            family: "bitsandbytes",
            container: Container::HfFolder,
            calibration: CalibrationNeed::None,
            nominal_bpw: o.bpw(),
            loads_in: "transformers + bitsandbytes, vLLM",
        });
    }
    v.push(RecipeKind {
        id: "hqq".into(),
        label: "HQQ".into(),
        family: "HQQ",
        container: Container::HfFolder,
        calibration: CalibrationNeed::None,
        nominal_bpw: crate::codecs::hqq::HqqParams::new(4, 64, 1).bpw(),
        loads_in: "hqq (HQQLinear), transformers 4.x, vLLM (4-bit g64)",
    });
    v
}

/// The packed recipe named `format` (`nf4`, `fp4`, `hqq`), if it is one. `bits`/`group_size`/`axis` apply
/// to HQQ (`None`: 4 bits, groups of 64, axis 1).
pub fn parse_packed(
    format: &str,
    double_quant: bool,
    bits: Option<u8>,
    group_size: Option<usize>,
    axis: Option<u8>,
) -> Option<PackedRecipe> {
    let f = format.to_ascii_lowercase();
    if f == "hqq" {
        let params = crate::codecs::hqq::HqqParams::new(
            bits.unwrap_or(4),
            group_size.unwrap_or(64),
            axis.unwrap_or(1),
        );
        return Some(PackedRecipe::Hqq(HqqOptions {
            params,
            backend: crate::backend::Backend::Cpu,
        }));
    }
    let kind = Bnb4Kind::parse(&f)?;
    Some(PackedRecipe::Bnb4(Bnb4Options { kind, double_quant }))
}

/// The AWQ layout a `--format` names (`awq`: AutoAWQ GEMM, `awq-ct`: compressed-tensors), if it is one.
pub fn parse_awq(format: &str) -> Option<AwqLayout> {
    match format.to_ascii_lowercase().as_str() {
        "awq" | "awq-gemm" => Some(AwqLayout::Gemm),
        "awq-ct" | "compressed-tensors" => Some(AwqLayout::CompressedTensors),
        _ => None,
    }
}

/// The `--format` help line, from the catalogue.
pub fn format_help() -> String {
    let gguf: Vec<String> = catalogue()
        .iter()
        .filter(|k| k.family == "GGUF")
        .map(|k| k.id.clone())
        .collect();
    format!(
        "What to make: a GGUF mix ({}, or pure:TYPE), gptq (a Hugging Face GPTQ folder), awq / awq-ct (AWQ as AutoAWQ's GEMM layout or \
         compressed-tensors' pack-quantized), exl2 (an ExLlamaV2 folder at --bpw, 2.1–8.1, mixed by measured \
         error; --head-bits, --measurement to reuse one), auto or gguf (a GGUF mix whose per-tensor types are chosen by \
         measured error to fit --bpw or --size; needs --imatrix or --calib), nf4 / fp4 (a \
         bitsandbytes 4-bit folder; --double-quant) or hqq (--bits 8/4/3/2/1, --group-size, --axis)",
        gguf.join(", ")
    )
}

/// Bits per weight of a GPTQ linear: codes, plus an fp16 scale and a packed zero point per group.
pub fn gptq_bpw(bits: u8, group: Option<usize>) -> f64 {
    let b = f64::from(bits);
    match group {
        Some(g) => b + (16.0 + b) / g.max(1) as f64,
        None => b,
    }
}

/// Parse `"PATTERN=TYPE"` overrides (llama-quantize's `--tensor-type`).
pub fn parse_overrides(list: &[String]) -> Result<Vec<TensorOverride>> {
    list.iter()
        .map(|o| {
            let (pattern, ty) = o
                .rsplit_once('=')
                .ok_or_else(|| Error::Invalid(format!("override {o:?} is not PATTERN=TYPE")))?;
            let ty = GgmlType::all()
                .find(|t| t.name().eq_ignore_ascii_case(ty))
                .ok_or_else(|| Error::Invalid(format!("override {o:?}: unknown type {ty:?}")))?;
            Ok(TensorOverride {
                pattern: pattern.to_owned(),
                ty,
            })
        })
        .collect()
}

/// A GGUF mix by name, with the known names in the error.
pub fn parse_mix(format: &str) -> Result<GgufMix> {
    GgufMix::parse(format).ok_or_else(|| {
        let known: Vec<String> = catalogue().into_iter().map(|k| k.id).collect();
        Error::Invalid(format!(
            "unknown format {format:?} (known: {}, pure:TYPE)",
            known.join(", ")
        ))
    })
}

/// How much slower than the k-quants llama.cpp's quantizer for `ty` runs (the low-bit i-quants search
/// lattices for every 8 or 4 weights): measured single-threaded on real weights with an imatrix, relative
/// to Q4_K (`codecs::iq_lowbit::speed`).
fn lattice_search_cost(ty: crate::codecs::GgmlType) -> f64 {
    use crate::codecs::GgmlType as T;
    match ty {
        T::Iq2Xs => 8.0,
        T::Iq3Xxs => 4.3,
        T::Iq2Xxs => 3.4,
        T::Iq3S => 2.6,
        T::Iq1M | T::Iq2S => 1.8,
        T::Iq1S | T::Iq4Xs => 1.5,
        _ => 1.0,
    }
}

/// What a recipe is expected to cost, before it runs.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Bits per weight over every parameter (embeddings and norms included).
    pub bpw: f64,
    /// Bits per weight of the quantized linears alone.
    pub linear_bpw: f64,
    pub size_bytes: u64,
    pub peak_memory_bytes: u64,
    pub seconds: f64,
}

/// Throughputs of a 2-core machine, measured with the CLI on SmolLM2-135M (F16 GGUF source; 128 chunks or
/// rows of 512 tokens): a GGUF mix end to end (read, quantize, write) ≈ 70 M weights/s (Q4_K_M: 1.3 s from
/// the CLI, ~3 s from the studio); an importance matrix's forward passes ≈ 5e10 weight·tokens/s (168 s);
/// GPTQ's layer-sequential capture, Hessians and solve ≈ 1.6e10 weight·tokens/s (542 s). The studio
/// corrects each from its finished runs.
const QUANTIZE_WEIGHTS_PER_S: f64 = 70e6;
const IMATRIX_WEIGHT_TOKENS_PER_S: f64 = 5e10;
const GPTQ_WEIGHT_TOKENS_PER_S: f64 = 1.6e10;
/// AWQ's scale search: every ratio of the grid runs the group's module over the search rows once, plus
/// the clipping search — in weight·tokens·ratios per second (fitted on SmolLM2, 8 search rows × 512).
const AWQ_SEARCH_WEIGHT_TOKENS_PER_S: f64 = 2.8e10;

impl Recipe {
    /// The GPTQ recipe with the engine's defaults (4-bit, group 128, act-order off, bundled text).
    pub fn gptq_default() -> Self {
        Recipe::Gptq(Box::default())
    }

    /// A short label, also the suffix of an output's name: `"Q4_K_M"`, `"Q4_K_M-imat"`,
    /// `"GPTQ-4bit-g128-ao-asym"`.
    pub fn label(&self) -> String {
        match self {
            Recipe::Gguf(g) => {
                let imat = if g.imatrix == ImatrixSource::None {
                    ""
                } else {
                    "-imat"
                };
                match g.auto {
                    Some(b) => format!("AUTO-{}", b.label()),
                    None => format!("{}{imat}", g.mix.name()),
                }
            }
            Recipe::Gptq(o) => {
                let s = &o.solver;
                let g = s.group_size.map_or("ch".to_string(), |g| format!("g{g}"));
                let ao = if s.act_order { "-ao" } else { "" };
                let sym = if s.sym { "" } else { "-asym" };
                let rtn = if o.rtn { "-rtn" } else { "" };
                let awq = if o.awq_scales.is_some() { "-awqs" } else { "" };
                format!("GPTQ-{}bit-{g}{ao}{sym}{rtn}{awq}", s.bits)
            }
            Recipe::Awq(o) => format!(
                "AWQ{}-{}bit-g{}{}",
                match o.layout {
                    AwqLayout::Gemm => "",
                    AwqLayout::CompressedTensors => "-CT",
                },
                o.grid.bits,
                o.grid.group_size,
                if o.rtn { "-rtn" } else { "" }
            ),
            Recipe::Exl2(o) => {
                let awq = if o.awq_scales.is_some() { "-awqs" } else { "" };
                match o.budget {
                    MixBudget::Bpw(b) => format!("EXL2-{b:.2}bpw-h{}{awq}", o.head_bits),
                    other => format!("EXL2-{}-h{}{awq}", other.label(), o.head_bits),
                }
            }
            Recipe::Packed(p) => p.label(),
        }
    }

    /// Which runs share a time model (the estimates' throughputs): learned corrections are kept per key.
    pub fn timing_key(&self) -> &'static str {
        match self {
            Recipe::Gguf(g) if matches!(g.imatrix, ImatrixSource::Compute { .. }) => "gguf-imatrix",
            Recipe::Gguf(_) => "gguf",
            Recipe::Gptq(_) => "gptq",
            Recipe::Awq(_) => "awq",
            Recipe::Exl2(_) => "exl2",
            Recipe::Packed(PackedRecipe::Bnb4(_)) => "bnb4",
            Recipe::Packed(PackedRecipe::Hqq(_)) => "hqq",
        }
    }

    pub fn container(&self) -> Container {
        match self {
            Recipe::Gguf(_) => Container::GgufFile,
            Recipe::Gptq(_) | Recipe::Awq(_) | Recipe::Exl2(_) | Recipe::Packed(_) => {
                Container::HfFolder
            }
        }
    }

    /// Whether this run reads calibration data.
    pub fn calibrated(&self) -> bool {
        match self {
            Recipe::Gguf(g) => matches!(g.imatrix, ImatrixSource::Compute { .. }),
            Recipe::Gptq(_) => true,
            Recipe::Awq(o) => !o.rtn,
            Recipe::Exl2(_) => true,
            Recipe::Packed(_) => false,
        }
    }

    /// Where the output goes in `dir` for a model named `stem`.
    pub fn output_in(&self, dir: &Path, stem: &str) -> PathBuf {
        match self.container() {
            Container::GgufFile => dir.join(format!("{stem}-{}.gguf", self.label())),
            Container::HfFolder => dir.join(format!("{stem}-{}", self.label())),
        }
    }

    /// Files the run reads besides the model (calibration text, imatrix file): never to be overwritten.
    pub fn inputs(&self) -> Vec<PathBuf> {
        let calib = |s: &CalibSource| match s {
            CalibSource::File { path, .. } => Some(path.clone()),
            CalibSource::Bundled => None,
        };
        match self {
            Recipe::Gguf(g) => {
                let imatrix = match &g.imatrix {
                    ImatrixSource::None => None,
                    ImatrixSource::File(p) => Some(p.clone()),
                    ImatrixSource::Compute { source, .. } => calib(source),
                };
                // A measurement file is read when it exists (and written when it does not).
                let measurement = g.auto_measurement.clone().filter(|p| p.exists());
                return imatrix.into_iter().chain(measurement).collect();
            }
            Recipe::Gptq(o) => calib(&o.calib),
            Recipe::Awq(o) if !o.rtn => calib(&o.calib),
            Recipe::Exl2(o) => {
                return calib(&o.calib)
                    .into_iter()
                    .chain(o.measurement.clone())
                    .collect()
            }
            Recipe::Awq(_) | Recipe::Packed(_) => None,
        }
        .into_iter()
        .collect()
    }

    /// Bits per weight of the quantized linears (llama.cpp's listed sizes for a mix; the packing for GPTQ).
    pub fn linear_bpw(&self) -> f64 {
        match self {
            Recipe::Gguf(GgufRecipe {
                auto: Some(MixBudget::Bpw(b)),
                ..
            }) => *b,
            Recipe::Gguf(g) => g.mix.nominal_bpw(),
            Recipe::Gptq(o) => gptq_bpw(o.solver.bits, o.solver.group_size),
            Recipe::Awq(o) => gptq_bpw(o.grid.bits, Some(o.grid.group_size)),
            Recipe::Exl2(o) => match o.budget {
                MixBudget::Bpw(b) => b,
                // Sized by bytes: the estimate below works from the budget itself.
                _ => 4.0,
            },
            Recipe::Packed(p) => p.linear_bpw(),
        }
    }

    /// Calibration tokens the run pushes through the model.
    fn calibration_tokens(&self) -> f64 {
        match self {
            Recipe::Gguf(GgufRecipe {
                imatrix: ImatrixSource::Compute { options, source },
                ..
            }) => match options.max_chunks {
                Some(c) => (c * options.n_ctx) as f64,
                // All of the text: the bundled one is ~100k tokens (4 bytes a token); a file's size says.
                None => match source {
                    CalibSource::Bundled => {
                        crate::imatrix::DEFAULT_CALIBRATION_TEXT.len() as f64 / 4.0
                    }
                    CalibSource::File { path, .. } => {
                        std::fs::metadata(path).map_or(64.0 * 512.0, |m| m.len() as f64 / 4.0)
                    }
                },
            },
            Recipe::Gguf(_) | Recipe::Packed(_) => 0.0,
            Recipe::Gptq(o) => (o.calib_opts.rows * o.calib_opts.seq_len) as f64,
            Recipe::Awq(o) if o.rtn => 0.0,
            Recipe::Awq(o) => (o.calib_opts.rows * o.calib_opts.seq_len) as f64,
            Recipe::Exl2(o) => (o.calib_opts.rows * o.calib_opts.seq_len) as f64,
        }
    }

    /// Size, bits per weight, peak memory and time of this recipe on a model, before it runs. A GGUF mix
    /// uses the engine's exact per-tensor plan when the summary has one.
    pub fn estimate(&self, s: &ModelSummary) -> Estimate {
        let embd = (s.vocab * s.hidden) as f64;
        let heads = if s.tied { embd } else { 2.0 * embd };
        let params = s.parameter_count as f64;
        let linears = (params - heads).max(0.0);
        let linear_bpw = self.linear_bpw();
        let (head_bpw, planned) = match self {
            // llama.cpp: the output (or a tied embedding) is Q6_K unless the mix is finer.
            Recipe::Gguf(g) => (
                linear_bpw.max(6.5625),
                s.gguf_mix_bytes
                    .iter()
                    .find(|(m, _)| m == g.mix.name())
                    .map(|(_, b)| *b as f64 * 8.0),
            ),
            // Embeddings and the head stay fp16.
            Recipe::Exl2(o) => (f64::from(o.head_bits) + 0.4, None),
            Recipe::Gptq(_) | Recipe::Awq(_) | Recipe::Packed(_) => (16.0, None),
        };
        let bits = match self {
            Recipe::Gguf(GgufRecipe {
                auto: Some(MixBudget::FileBytes(n)),
                ..
            }) => *n as f64 * 8.0,
            Recipe::Gguf(GgufRecipe {
                auto: Some(MixBudget::Bpw(b)),
                ..
            }) => *b * params,
            Recipe::Gguf(GgufRecipe {
                auto: Some(MixBudget::Memory { bytes, ctx }),
                ..
            }) => {
                let kv = (2 * s.layers * s.kv_heads * s.head_dim * 2) as f64 * *ctx as f64;
                (*bytes as f64 - kv).max(0.0) * 8.0
            }
            Recipe::Exl2(o) => match o.budget {
                MixBudget::FileBytes(n) => n as f64 * 8.0,
                MixBudget::Memory { bytes, ctx } => {
                    let kv = (2 * s.layers * s.kv_heads * s.head_dim * 2) as f64 * ctx as f64;
                    (bytes as f64 - kv).max(0.0) * 8.0 + embd * 16.0
                }
                // The embedding stays fp16 and the head is quantized, tied or not.
                MixBudget::Bpw(_) => linears * linear_bpw + embd * (16.0 + head_bpw),
            },
            _ => planned.unwrap_or(linears * linear_bpw + heads * head_bpw),
        };
        let largest = (s.vocab.max(s.intermediate) * s.hidden) as f64 * 4.0;
        let tokens = self.calibration_tokens();
        let (peak, seconds) = match self {
            Recipe::Gguf(g) => {
                // An auto mix's probes run the model from a linear's layer on (half of it on average) and
                // the head, ~1.5 probes per linear, keeping every layer's input and the float model's
                // log-probabilities of their tokens.
                let measuring =
                    g.auto.is_some() && g.auto_measurement.as_ref().is_none_or(|p| !p.exists());
                let probe = if measuring {
                    g.auto_probe_tokens as f64
                } else {
                    0.0
                };
                let probes = 1.5 * 7.0 * s.layers as f64;
                (
                    3.0 * largest + 64e6 + probe * (s.layers * s.hidden + 2 * s.vocab) as f64 * 4.0,
                    // An auto mix's chosen types include the i-quants' searches and the weighted
                    // quantizers: ~5 plain passes (10 s measured on SmolLM2).
                    params / QUANTIZE_WEIGHTS_PER_S
                        * if g.auto.is_some() {
                            5.0
                        } else {
                            lattice_search_cost(g.mix.default_type())
                        }
                        + tokens * params / IMATRIX_WEIGHT_TOKENS_PER_S
                        // An auto mix first quantizes every linear to each candidate type (19, the
                        // weighted quantizers and the i-quants' searches slower than the plain ones:
                        // ~60 passes measured on SmolLM2).
                        + if measuring {
                            60.0 * linears / QUANTIZE_WEIGHTS_PER_S
                                + probes * probe * (linears / 2.0 + heads) / IMATRIX_WEIGHT_TOKENS_PER_S
                        } else {
                            0.0
                        },
                )
            }
            Recipe::Packed(p) => (3.0 * largest + 64e6, params / p.weights_per_s()),
            Recipe::Awq(o) => {
                let acts = tokens * s.hidden as f64 * 4.0;
                // The search rows' inputs of the four linear inputs, the layer's weights in f32 twice.
                let search = (o.search_rows * o.calib_opts.seq_len) as f64;
                let kept = search * (3 * s.hidden + s.intermediate) as f64 * 4.0;
                let layer = (linears / s.layers.max(1) as f64) * 4.0 * 2.0;
                let search_s = if o.rtn {
                    0.0
                } else {
                    search * linears * o.n_grid as f64 / AWQ_SEARCH_WEIGHT_TOKENS_PER_S
                };
                (
                    acts + kept + layer + 3.0 * largest + 64e6,
                    params / QUANTIZE_WEIGHTS_PER_S
                        + tokens * params / IMATRIX_WEIGHT_TOKENS_PER_S
                        + search_s,
                )
            }
            Recipe::Exl2(o) => {
                // The measurement: ~97 GPTQ solves per layer and 36 runs of a block over its rows.
                let acts = tokens * s.hidden as f64 * 4.0 * 2.0;
                let hess = (s.intermediate * s.intermediate) as f64 * 8.0 * 2.0;
                let measured = if o.measurement.is_some() {
                    0.0
                } else {
                    let mt = (o.measure_rows * o.calib_opts.seq_len) as f64;
                    36.0 * mt * linears / 2.0 / GPTQ_WEIGHT_TOKENS_PER_S * 4.0
                        + 14.0 * linears * s.hidden as f64 / GPTQ_WEIGHT_TOKENS_PER_S
                };
                (
                    acts + hess + 4.0 * largest + 64e6,
                    tokens * params / GPTQ_WEIGHT_TOKENS_PER_S
                        + measured
                        + awq_scale_s(o.awq_scales.as_ref(), o.calib_opts.seq_len, params, linears),
                )
            }
            Recipe::Gptq(o) => {
                let acts = tokens * s.hidden as f64 * 4.0 * 2.0;
                // The widest Hessian (f64) and its factorisation's working copy.
                let hess = (s.intermediate * s.intermediate) as f64 * 8.0 * 2.0;
                (
                    acts + hess + 3.0 * largest + 64e6,
                    tokens * params / GPTQ_WEIGHT_TOKENS_PER_S
                        + awq_scale_s(o.awq_scales.as_ref(), o.calib_opts.seq_len, params, linears),
                )
            }
        };
        Estimate {
            bpw: bits / s.parameter_count.max(1) as f64,
            linear_bpw,
            size_bytes: (bits / 8.0) as u64,
            peak_memory_bytes: peak as u64,
            seconds,
        }
    }
}

/// Seconds of the AWQ-scale pass before GPTQ or EXL2: its rows through the float model, then the search.
fn awq_scale_s(
    a: Option<&crate::quantize_awq::AwqScaling>,
    seq: usize,
    params: f64,
    linears: f64,
) -> f64 {
    a.map_or(0.0, |a| {
        (a.rows * seq) as f64 * params / IMATRIX_WEIGHT_TOKENS_PER_S
            + (a.search_rows * seq) as f64 * linears * a.n_grid as f64
                / AWQ_SEARCH_WEIGHT_TOKENS_PER_S
    })
}

impl Default for GptqQuantizeOptions {
    fn default() -> Self {
        Self {
            solver: GptqOptions::default(),
            calib: CalibSource::Bundled,
            calib_opts: CalibOptions::default(),
            true_sequential: true,
            activation_budget_bytes: crate::calib::activations::DEFAULT_ACTIVATION_BUDGET_MIB << 20,
            rtn: false,
            awq_scales: None,
            max_shard_bytes: None,
            backend: crate::backend::Backend::Cpu,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_lists_every_mix_then_gptq_awq_exl2_then_the_packed_formats_and_parses_back() {
        let c = catalogue();
        let mixes = GgufMix::all().count();
        assert_eq!(c.len(), mixes + 7);
        for k in &c[..mixes] {
            assert_eq!(parse_mix(&k.id).unwrap().name(), k.label);
        }
        assert_eq!(c[mixes].id, "gptq");
        assert!((c[mixes].nominal_bpw - 4.15625).abs() < 1e-12);
        let awq: Vec<&str> = c[mixes + 1..mixes + 3]
            .iter()
            .map(|k| k.id.as_str())
            .collect();
        assert_eq!(awq, ["awq", "awq-ct"]);
        for k in &c[mixes + 1..mixes + 3] {
            assert_eq!(k.calibration, CalibrationNeed::Required);
            assert!(parse_awq(&k.id).is_some());
            assert!((k.nominal_bpw - 4.15625).abs() < 1e-12);
        }
        assert_eq!(
            (c[mixes + 3].id.as_str(), c[mixes + 3].calibration),
            ("exl2", CalibrationNeed::Required)
        );
        let ids: Vec<&str> = c[mixes + 4..].iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["nf4", "fp4", "hqq"]);
        for k in &c[mixes + 4..] {
            let p = parse_packed(&k.id, false, None, None, None).unwrap();
            assert!((p.linear_bpw() - k.nominal_bpw).abs() < 1e-12, "{}", k.id);
            assert_eq!(k.calibration, CalibrationNeed::None);
        }
        assert_eq!(
            parse_packed("hqq", false, Some(3), Some(32), Some(0))
                .unwrap()
                .label(),
            "HQQ-3bit-g32-axis0"
        );
        assert_eq!(
            parse_packed("NF4", true, None, None, None).unwrap().label(),
            "NF4-dq"
        );
        assert!(parse_packed("q4_k_m", false, None, None, None).is_none());
        assert!(
            format_help().contains("q4_k_m")
                && format_help().contains("gptq")
                && format_help().contains("hqq")
        );
        let e = parse_mix("q9_k").unwrap_err().to_string();
        assert!(e.contains("q4_k_m") && e.contains("gptq"), "{e}");
    }

    #[test]
    fn labels_and_outputs() {
        let g = Recipe::Gguf(GgufRecipe {
            mix: GgufMix::parse("q4_k_m").unwrap(),
            overrides: Vec::new(),
            imatrix: ImatrixSource::Compute {
                source: CalibSource::Bundled,
                options: ImatrixOptions::default(),
            },
            auto: None,
            auto_types: Vec::new(),
            auto_probe_tokens: 0,
            auto_measurement: None,
            backend: crate::backend::Backend::Cpu,
        });
        assert_eq!(g.label(), "Q4_K_M-imat");
        assert!(g.calibrated());
        assert_eq!(
            g.output_in(Path::new("/o"), "m"),
            PathBuf::from("/o/m-Q4_K_M-imat.gguf")
        );
        let mut o = GptqQuantizeOptions::default();
        o.solver.act_order = true;
        o.solver.sym = false;
        let q = Recipe::Gptq(Box::new(o));
        assert_eq!(q.label(), "GPTQ-4bit-g128-ao-asym");
        assert_eq!(q.container(), Container::HfFolder);
        assert_eq!(
            q.output_in(Path::new("/o"), "m"),
            PathBuf::from("/o/m-GPTQ-4bit-g128-ao-asym")
        );
    }

    #[test]
    fn overrides_parse_or_say_why() {
        let o = parse_overrides(&["blk.*.attn_v.weight=q8_0".into()]).unwrap();
        assert_eq!(o[0].ty, GgmlType::Q8_0);
        assert!(parse_overrides(&["novalue".into()]).is_err());
        assert!(parse_overrides(&["x=q9".into()]).is_err());
    }
}
