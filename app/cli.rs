//! The command line: `inspect`, `eval`, `generate`, `chat`, `convert`, `quantize`, `imatrix`, `bench`,
//! `bench-quantize`. Every command is a job sent to the
//! engine thread; this module only parses arguments, draws progress and prints results.

/// `println!` that returns an `io::Result` instead of panicking when stdout is closed (`| head`).
macro_rules! outln {
    () => {
        std::io::Write::write_all(&mut std::io::stdout().lock(), b"\n")
    };
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(
            &mut std::io::stdout().lock(),
            format_args!("{}\n", format_args!($($arg)*)),
        )
    };
}

mod bench;
mod bench_quantize;
mod eval;
mod generate;
mod progress;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use quant_engine::backend::Backend;
use quant_engine::bench::BenchOptions;
use quant_engine::calib::{CalibOptions, CalibSource};
use quant_engine::imatrix::ImatrixOptions;
use quant_engine::infer::{GenerateOptions, SamplerConfig};
use quant_engine::jobs::OutDtype;
use quant_engine::jobs::{Command, EngineHandle, Event, ImatrixSource, JobId, JobOutput};
use quant_engine::quantize_automix::MixBudget;
use quant_engine::quantize_awq::AwqQuantizeOptions;
use quant_engine::quantize_exl2::Exl2QuantizeOptions;
use quant_engine::quantize_gptq::GptqQuantizeOptions;
use quant_engine::recipes::{self, GgufRecipe, Recipe};
use quant_engine::solvers::gptq::GptqOptions;

/// Quantize LLMs to GGUF and GPTQ, measure them, and chat with them.
/// Without a command, opens the window.
#[derive(Debug, Parser)]
#[command(name = "quant-studio", version, about)]
pub struct Cli {
    /// Threads for the numerical work (default: one per core).
    #[arg(long, global = true, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub threads: Option<usize>,
    /// Where the arithmetic runs: cpu, gpu (wgpu: Vulkan, Metal or DX12), or auto (a hardware GPU when
    /// there is one, else the CPU).
    #[arg(long, global = true, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// The GPU to use: part of its name, or its number in `quant-studio gpus` (default: a discrete GPU
    /// first).
    #[arg(long, global = true, value_name = "NAME")]
    pub gpu: Option<String>,
    /// Open the window with the demo flow.
    #[arg(long)]
    pub demo: bool,
    /// Open the window with this model (a Hugging Face folder or a .gguf file) already loading.
    #[arg(long, value_name = "MODEL")]
    pub open: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<CliCommand>,
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Auto,
    Cpu,
    Gpu,
}

static BACKEND: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();

/// Resolve `--backend`/`--gpu` once, before any command runs: an explicit `gpu` without a usable adapter
/// is an error here, not a silent CPU run.
pub fn configure_backend(arg: BackendArg, gpu: Option<&str>) -> anyhow::Result<Backend> {
    if let Some(g) = gpu {
        quant_engine::backend::wgpu::prefer_adapter(g);
    }
    let b = match arg {
        BackendArg::Cpu => Backend::Cpu,
        BackendArg::Auto => Backend::auto(),
        BackendArg::Gpu => {
            quant_engine::backend::wgpu::adapter()?;
            Backend::Gpu
        }
    };
    if b == Backend::Gpu {
        eprintln!("backend: {}", b.describe());
    }
    let _ = BACKEND.set(b);
    Ok(b)
}

/// Where this run's arithmetic goes (`--backend`).
pub fn backend() -> Backend {
    BACKEND.get().copied().unwrap_or_default()
}

#[derive(Debug, Subcommand)]
// Parsed once per run: the size of the quantize variant (all its flags) costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum CliCommand {
    /// Summarise a model: architecture, sizes, tensors, tokenizer.
    Inspect {
        /// A Hugging Face folder or a .gguf file.
        model: PathBuf,
        /// Print JSON instead of the text card.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity on a text, as llama-perplexity computes it; with --base, the KL-divergence from the base.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt (streamed to stdout; speed on stderr).
    Generate(generate::GenerateArgs),
    /// Chat interactively (lines from stdin; /reset forgets, /exit quits).
    Chat(generate::ChatArgs),
    /// Write a model as a Hugging Face folder (safetensors) in f16 or bf16.
    Convert {
        model: PathBuf,
        /// The output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
        dtype: DtypeArg,
        /// Replace the output folder if it exists (never the input).
        #[arg(long)]
        force: bool,
    },
    /// Quantize to GGUF (llama-quantize mixes: q4_k_m, q8_0, …, pure:TYPE) or to a GPTQ folder (--format gptq); prints each tensor's error.
    Quantize {
        model: PathBuf,
        /// (Written at startup from the engine's recipe list: see `command()`.)
        #[arg(long)]
        format: String,
        /// The output: a .gguf file, or a folder for the Hugging Face formats.
        #[arg(long, value_name = "FILE", required_unless_present = "estimate")]
        out: Option<PathBuf>,
        /// Print the estimate (size, bits per weight, peak memory, time on a 2-core machine) and stop.
        #[arg(long)]
        estimate: bool,
        /// Give tensors whose GGUF name matches PATTERN (glob or regex) the type TYPE, e.g. 'blk.*.attn_v.weight=q8_0'.
        #[arg(long = "override", value_name = "PATTERN=TYPE")]
        overrides: Vec<String>,
        /// Use this importance matrix (llama.cpp's GGUF imatrix or legacy .dat).
        #[arg(long, value_name = "FILE", conflicts_with = "calib")]
        imatrix: Option<PathBuf>,
        /// Compute an importance matrix on this text first ("default": the bundled calibration text).
        #[arg(long, value_name = "TEXT")]
        calib: Option<PathBuf>,
        #[command(flatten)]
        calib_opts: CalibArgs,
        #[command(flatten)]
        gptq: GptqArgs,
        /// NF4/FP4: quantize the block scales to 8 bits too (bitsandbytes' double quantization).
        #[arg(long)]
        double_quant: bool,
        /// --format auto: the bits per weight the file may spend (tensor data over every parameter); --format
        /// exl2: the decoder linears' target (side tensors counted, as ExLlamaV2 counts; default 4.0).
        #[arg(long, conflicts_with = "size")]
        bpw: Option<f64>,
        /// --format auto: the size the file may take; exl2: the weight files' (5GB, 500MB, 2GiB, or bytes).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// --format auto: the memory llama.cpp may use for the weights and an f16 KV cache of --ctx tokens;
        /// exl2: the GPU memory ExLlamaV2 needs for them (its embedding stays in system memory).
        #[arg(long, value_parser = parse_size, requires = "ctx")]
        memory: Option<u64>,
        /// --format auto with --memory: the context the KV cache must hold.
        #[arg(long)]
        ctx: Option<u64>,
        /// --format auto: the types to choose from, comma-separated (default: iq1_s, iq1_m, iq2_xxs,
        /// iq2_xs, iq2_s, iq3_xxs, iq3_s, q2_k, q3_k, iq4_xs, q4_k, q4_0, iq4_nl, q4_1, q5_k, q5_0, q5_1,
        /// q6_k, q8_0).
        #[arg(long = "auto-types", value_name = "TYPES", value_delimiter = ',')]
        auto_types: Vec<String>,
        /// --format auto: calibration tokens the measurement runs the model on, per tensor and probe type,
        /// to weigh each tensor's error by its effect on the output distribution (KL-divergence); 0 ranks
        /// by the imatrix-weighted error alone (faster, worse below ~4 bpw); at most 4096.
        #[arg(long = "probe-tokens", value_name = "N", default_value_t = quant_engine::quantize_automix::DEFAULT_PROBE_TOKENS)]
        probe_tokens: usize,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Replace the output if it exists (never the input).
        #[arg(long)]
        force: bool,
    },
    /// Compute an importance matrix as llama-imatrix does and write it (GGUF format, or .dat).
    Imatrix {
        model: PathBuf,
        /// Calibration text ("default" or omitted: the bundled calibration text).
        #[arg(long, value_name = "TEXT", default_value = "default")]
        calib: PathBuf,
        /// The output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        calib_opts: CalibArgs,
        /// Write llama.cpp's legacy .dat format instead of GGUF.
        #[arg(long)]
        dat: bool,
        /// Replace the output if it exists (never the input).
        #[arg(long)]
        force: bool,
    },
    /// Quantization time and peak memory, against a llama-quantize binary when given (ratio printed).
    BenchQuantize(bench_quantize::BenchQuantizeArgs),
    /// List the GPUs the GPU backend can use (`--gpu NAME|NUMBER` picks one).
    Gpus {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prompt-processing and decoding speed, as llama-bench measures it (pp512, tg128).
    Bench {
        model: PathBuf,
        /// Prompt tokens for the pp test (0 skips it).
        #[arg(long = "n-prompt", short = 'p', default_value_t = 512)]
        n_prompt: usize,
        /// Generated tokens for the tg test (0 skips it).
        #[arg(long = "n-gen", short = 'n', default_value_t = 128)]
        n_gen: usize,
        /// Context both tests start from, as llama-bench's `-d` (tokens run first, untimed): decoding deep
        /// in a context, where the KV cache is read per token.
        #[arg(long = "n-depth", short = 'd', default_value_t = 0)]
        n_depth: usize,
        /// Timed repetitions of each test (after one warm-up).
        #[arg(long, short = 'r', default_value_t = 3)]
        repetitions: usize,
        /// Arithmetic: `llama-cpu` (activations quantized as llama.cpp's CPU backend does, packed rows
        /// dotted in integers) or `exact` (f32 activations); default: the backend's fastest (llama-cpu on
        /// the CPU, exact on the GPU, where a whole token is one submission)
        #[arg(long, value_parser = eval::parse_numerics)]
        numerics: Option<quant_engine::infer::Numerics>,
        /// A llama-bench binary: run it right after ours with the same tests, threads and repetitions,
        /// and print the ratio per test.
        #[arg(long, value_name = "BIN")]
        llama_bench: Option<PathBuf>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// How calibration text is cut into chunks (llama-imatrix's `-c` and `--chunks`).
#[derive(Clone, Copy, Debug, Args)]
pub struct CalibArgs {
    /// Tokens per calibration chunk.
    #[arg(long = "calib-ctx", value_name = "N", default_value_t = ImatrixOptions::default().n_ctx)]
    pub n_ctx: usize,
    /// Use at most N calibration chunks.
    #[arg(long = "calib-chunks", value_name = "N")]
    pub chunks: Option<usize>,
}

impl CalibArgs {
    fn options(self) -> ImatrixOptions {
        ImatrixOptions {
            n_ctx: self.n_ctx,
            max_chunks: self.chunks,
            backend: backend(),
        }
    }
}

/// GPTQ settings (`quantize --format gptq`).
#[derive(Clone, Debug, Args)]
pub struct GptqArgs {
    /// Bits per weight: GPTQ 2, 3, 4, 8; HQQ 8, 4, 3, 2, 1 (default 4).
    #[arg(long)]
    pub bits: Option<u8>,
    /// Columns per group: GPTQ (-1: one group per output channel; default 128), HQQ (a multiple of 8;
    /// default 64).
    #[arg(long = "group-size", allow_negative_numbers = true)]
    pub group_size: Option<i64>,
    /// HQQ: 1 groups runs of the input dimension, 0 strided groups down the flattened weight (default 1).
    #[arg(long)]
    pub axis: Option<u8>,
    /// GPTQ: act-order (desc_act), columns by decreasing Hessian diagonal.
    #[arg(long = "act-order")]
    pub act_order: bool,
    /// GPTQ: with --act-order, fit group parameters on the original column blocks (g_idx stays k/gs).
    #[arg(long = "static-groups")]
    pub static_groups: bool,
    /// GPTQ: symmetric grid (zero point 2^(bits−1)); asymmetric without.
    #[arg(long)]
    pub sym: bool,
    /// GPTQ: damping, a fraction of the mean Hessian diagonal (GPTQModel's default; AutoGPTQ used 0.01).
    #[arg(long, default_value_t = GptqOptions::default().damp_percent)]
    pub damp: f32,
    /// GPTQ, AWQ: calibration rows (samples; default 128).
    #[arg(long)]
    pub rows: Option<usize>,
    /// GPTQ, AWQ: tokens per calibration row (default: GPTQ 2048, AWQ 512).
    #[arg(long = "seq-len")]
    pub seq_len: Option<usize>,
    /// AWQ: how many calibration rows the scale and clipping searches score candidates on (the
    /// activation statistics use all of them).
    #[arg(long = "search-rows", default_value_t = AwqQuantizeOptions::default().search_rows)]
    pub search_rows: usize,
    /// AWQ: skip the clipping search.
    #[arg(long = "no-clip")]
    pub no_clip: bool,
    /// EXL2: the output head's bits (2, 3, 4, 5, 6 or 8).
    #[arg(long = "head-bits", default_value_t = Exl2QuantizeOptions::default().head_bits)]
    pub head_bits: u8,
    /// EXL2: reuse a measurement.json (ours or ExLlamaV2's) instead of measuring. Auto mix: read FILE
    /// when it exists (no measuring), else measure and save the measurement there.
    #[arg(long, value_name = "FILE")]
    pub measurement: Option<PathBuf>,
    /// EXL2, GPTQ: fold AWQ's activation-aware scales into the model before measuring and quantizing
    /// (searched on the first 32 calibration rows; the folder loads unchanged: the norms carry the inverse
    /// scales).
    #[arg(long = "awq-scales")]
    pub awq_scales: bool,
    /// EXL2: calibration rows the measurement runs each option on (the first of --rows).
    #[arg(long = "measure-rows", default_value_t = Exl2QuantizeOptions::default().measure_rows)]
    pub measure_rows: usize,
    /// GPTQ: seed of the calibration row offsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GPTQ: the text column of a Parquet / field of a JSON-lines calibration file.
    #[arg(long = "calib-column", value_name = "NAME")]
    pub calib_column: Option<String>,
    /// GPTQ: keep calibration activations in memory up to this many MiB, spill to disk above.
    #[arg(long = "activation-budget", value_name = "MIB", default_value_t = quant_engine::quantize_gptq::DEFAULT_ACTIVATION_BUDGET_MIB)]
    pub activation_budget_mib: u64,
    /// GPTQ: capture all of a layer's inputs from the unquantized layer (default: true sequential).
    #[arg(long = "no-true-sequential")]
    pub no_true_sequential: bool,
    /// Round-to-nearest on the same grid, the baseline the solver is compared with (GPTQ, AWQ, HQQ).
    #[arg(long)]
    pub rtn: bool,
    /// GPTQ: largest weight file (5GB, 500MB, 2GiB, or bytes); more is written as
    /// model-0000i-of-0000N.safetensors shards plus model.safetensors.index.json.
    #[arg(long = "max-shard-size", value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
}

/// A size as transformers' `max_shard_size` takes it: `5GB`, `500MB` (powers of 10), `2GiB` (powers of 2),
/// or a number of bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown unit {u:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 5GB, 500MB or 2GiB"))?;
    let bytes = (v * scale as f64).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{s:?}: the size must be at least one byte"));
    }
    Ok(bytes as u64)
}

impl Cli {
    /// The command line, with `quantize --format`'s help written from the engine's recipe list.
    pub fn command_with_recipes() -> clap::Command {
        Self::command().mut_subcommand("quantize", |c| {
            c.mut_arg("format", |a| a.help(recipes::format_help()))
        })
    }

    /// Parse the process arguments (exits with clap's message on a bad command line).
    pub fn parse_args() -> Self {
        let m = Self::command_with_recipes().get_matches();
        Self::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
    }
}

impl GptqArgs {
    fn options(&self, calib: Option<PathBuf>) -> anyhow::Result<GptqQuantizeOptions> {
        let defaults = GptqOptions::default();
        let group_size = match self.group_size {
            None => defaults.group_size,
            Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => bail!("--group-size {g}: use a positive size or -1"),
        };
        if self.axis.is_some() {
            bail!("--axis is for hqq");
        }
        Ok(GptqQuantizeOptions {
            solver: GptqOptions {
                bits: self.bits.unwrap_or(defaults.bits),
                group_size,
                act_order: self.act_order,
                static_groups: self.static_groups,
                sym: self.sym,
                damp_percent: self.damp,
                ..GptqOptions::default()
            },
            calib: calib.map_or(CalibSource::Bundled, |p| {
                calib_source(p, self.calib_column.clone())
            }),
            calib_opts: CalibOptions {
                rows: self.rows.unwrap_or(CalibOptions::default().rows),
                seq_len: self.seq_len.unwrap_or(CalibOptions::default().seq_len),
                seed: self.seed,
            },
            true_sequential: !self.no_true_sequential,
            activation_budget_bytes: self.activation_budget_mib * 1024 * 1024,
            rtn: self.rtn,
            awq_scales: self
                .awq_scales
                .then(|| quant_engine::quantize_awq::AwqScaling {
                    bits: self.bits.unwrap_or(defaults.bits),
                    ..Default::default()
                }),
            max_shard_bytes: Some(self.max_shard_size),
            backend: backend(),
        })
    }
}

impl GptqArgs {
    /// EXL2's options (`--format exl2`): 64 rows of 512 tokens, 8 of them measured, unless told.
    fn exl2_options(
        &self,
        calib: Option<PathBuf>,
        budget: Option<MixBudget>,
    ) -> anyhow::Result<Exl2QuantizeOptions> {
        let d = Exl2QuantizeOptions::default();
        if self.bits.is_some()
            || self.group_size.is_some()
            || self.axis.is_some()
            || self.act_order
            || self.static_groups
            || self.sym
            || self.rtn
        {
            bail!("--bits, --group-size, --axis, --act-order, --static-groups, --sym and --rtn are not EXL2 options: EXL2 mixes bit widths to fit --bpw");
        }
        Ok(Exl2QuantizeOptions {
            budget: budget.unwrap_or(d.budget),
            head_bits: self.head_bits,
            calib: calib.map_or(CalibSource::Bundled, |p| {
                calib_source(p, self.calib_column.clone())
            }),
            calib_opts: CalibOptions {
                rows: self.rows.unwrap_or(d.calib_opts.rows),
                seq_len: self.seq_len.unwrap_or(d.calib_opts.seq_len),
                seed: self.seed,
            },
            measure_rows: self.measure_rows,
            measurement: self.measurement.clone(),
            awq_scales: self
                .awq_scales
                .then(quant_engine::quantize_awq::AwqScaling::default),
            activation_budget_bytes: self.activation_budget_mib * 1024 * 1024,
            max_shard_bytes: Some(self.max_shard_size),
            backend: backend(),
        })
    }

    /// AWQ's options (`--format awq|awq-ct`): 4 bits, groups of 128, 128 rows of 512 tokens unless told.
    fn awq_options(
        &self,
        calib: Option<PathBuf>,
        layout: quant_engine::writers::awq::AwqLayout,
    ) -> anyhow::Result<AwqQuantizeOptions> {
        let d = AwqQuantizeOptions::default();
        let group_size = match self.group_size {
            None => d.grid.group_size,
            Some(g) if g > 0 => g as usize,
            Some(g) => bail!("--group-size {g}: AWQ takes a positive group size (e.g. 128)"),
        };
        if self.axis.is_some() || self.act_order || self.static_groups || self.sym {
            bail!("--axis, --act-order, --static-groups and --sym are not AWQ options");
        }
        if self.awq_scales {
            bail!("--awq-scales is for gptq and exl2 (AWQ searches its scales anyway)");
        }
        Ok(AwqQuantizeOptions {
            grid: quant_engine::solvers::awq::AwqGrid {
                bits: self.bits.unwrap_or(d.grid.bits),
                group_size,
            },
            layout,
            calib: calib.map_or(CalibSource::Bundled, |p| {
                calib_source(p, self.calib_column.clone())
            }),
            calib_opts: CalibOptions {
                rows: self.rows.unwrap_or(d.calib_opts.rows),
                seq_len: self.seq_len.unwrap_or(d.calib_opts.seq_len),
                seed: self.seed,
            },
            search_rows: self.search_rows,
            clip: !self.no_clip,
            rtn: self.rtn,
            activation_budget_bytes: self.activation_budget_mib * 1024 * 1024,
            max_shard_bytes: Some(self.max_shard_size),
            backend: backend(),
            ..d
        })
    }
}

/// ggml type names (`q4_k,iq4_nl`).
fn parse_types(names: &[String]) -> anyhow::Result<Vec<quant_engine::codecs::GgmlType>> {
    names
        .iter()
        .map(|n| {
            quant_engine::codecs::GgmlType::all()
                .find(|t| t.name().eq_ignore_ascii_case(n.trim()))
                .ok_or_else(|| anyhow!("--auto-types: unknown type {n:?}"))
        })
        .collect()
}

/// A calibration source from a path argument (`default`: the bundled text).
fn calib_source(p: PathBuf, column: Option<String>) -> CalibSource {
    if p.as_os_str() == "default" {
        CalibSource::Bundled
    } else {
        CalibSource::File { path: p, column }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F16,
    Bf16,
}

/// Sampling flags shared by `generate` and `chat`. The defaults are greedy decoding.
#[derive(Clone, Debug, Args)]
pub struct SamplingArgs {
    /// Arithmetic: `llama-cpu` (activations quantized as llama.cpp's CPU backend does, packed rows dotted
    /// in integers) or `exact` (f32 activations throughout); default: the backend's fastest (llama-cpu on
    /// the CPU, exact on the GPU, where a whole token is one submission).
    #[arg(long, value_parser = eval::parse_numerics)]
    pub numerics: Option<quant_engine::infer::Numerics>,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the top token's probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Seed of the random draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens to generate (per reply in chat).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when this text appears (may be repeated).
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
    /// Accept a context (prompt and reply, or --ctx) longer than the model's trained context
    /// (max_position_embeddings); quality degrades past it.
    #[arg(long)]
    pub allow_long_context: bool,
    /// Speculative decoding: a draft model with the same tokenizer (a smaller model or a low-bit quant of
    /// this one; a Hugging Face folder or a .gguf file) proposes tokens that the model checks in one pass.
    /// Greedy output is unchanged; sampled output keeps its distribution.
    #[arg(long, value_name = "DRAFT_MODEL")]
    pub draft: Option<PathBuf>,
    /// Tokens the draft proposes per step (1..=16).
    #[arg(long, value_name = "K", default_value_t = quant_engine::infer::DEFAULT_DRAFT_TOKENS)]
    pub draft_tokens: usize,
    /// The draft stops proposing after the first token it gives less than this probability (0..=1; 0 always
    /// proposes --draft-tokens): fewer wasted guesses for the model to check.
    #[arg(long, value_name = "P", default_value_t = quant_engine::infer::DEFAULT_DRAFT_P_MIN)]
    pub draft_p_min: f32,
    /// The draft's arithmetic (default: the model's, --numerics); the model's arithmetic, which decides
    /// every token, is unchanged by it.
    #[arg(long, value_name = "NUMERICS", value_parser = eval::parse_numerics)]
    pub draft_numerics: Option<quant_engine::infer::Numerics>,
}

/// Said whenever a command is allowed past the model's trained context.
pub fn warn_long_context() {
    eprintln!(
        "warning: --allow-long-context: positions past the model's trained context (max_position_embeddings) \
         give degraded output"
    );
}

impl SamplingArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed: self.seed,
            },
            stop_strings: self.stop.clone(),
            backend: backend(),
            numerics: self
                .numerics
                .unwrap_or_else(|| quant_engine::infer::Numerics::fastest(backend())),
            allow_long_context: self.allow_long_context,
            draft: self.draft.clone(),
            draft_tokens: self.draft_tokens,
            draft_p_min: self.draft_p_min,
            draft_numerics: self.draft_numerics,
        }
    }
}

/// Run one CLI command.
pub fn run(command: CliCommand) -> anyhow::Result<()> {
    let engine = EngineHandle::spawn();
    let result = match command {
        CliCommand::Inspect { model, json } => inspect(&engine, model, json),
        CliCommand::Eval(args) => eval::run(&engine, &args),
        CliCommand::Generate(args) => generate::run_generate(&engine, &args),
        CliCommand::Chat(args) => generate::run_chat(&engine, &args),
        CliCommand::Convert {
            model,
            out,
            dtype,
            force,
        } => convert(&engine, model, out, dtype, force),
        CliCommand::BenchQuantize(args) => bench_quantize::run(&engine, &args),
        CliCommand::Quantize {
            model,
            format,
            out,
            overrides,
            imatrix,
            calib,
            calib_opts,
            gptq,
            json,
            force,
            estimate,
            double_quant,
            bpw,
            size,
            memory,
            ctx,
            auto_types,
            probe_tokens,
        } => {
            let is_exl2 = format.eq_ignore_ascii_case("exl2");
            let budget = match (bpw, size, memory) {
                (Some(b), None, None) => Some(MixBudget::Bpw(b)),
                (None, Some(n), None) => Some(MixBudget::FileBytes(n)),
                (None, None, Some(bytes)) => Some(MixBudget::Memory {
                    bytes,
                    ctx: ctx.unwrap_or(0),
                }),
                (None, None, None) => None,
                _ => bail!("give one of --bpw B, --size SIZE or --memory SIZE --ctx N"),
            };
            if budget.is_none() && ctx.is_some() {
                bail!("--ctx goes with --memory");
            }
            // `--format gguf` with a budget is the error-aware GGUF mix too.
            let is_auto =
                format.eq_ignore_ascii_case("auto") || format.eq_ignore_ascii_case("gguf");
            let auto = match (is_auto, budget) {
                (true, Some(b)) => Some(b),
                (true, None) => {
                    bail!(
                        "--format {format} needs one of --bpw B, --size SIZE or --memory SIZE --ctx N"
                    )
                }
                (false, None) if auto_types.is_empty() => None,
                (false, Some(_)) if is_exl2 && auto_types.is_empty() => None,
                (false, _) => {
                    bail!("--bpw, --size, --memory, --ctx and --auto-types are for --format auto (and the first three for exl2)")
                }
            };
            let group = match gptq.group_size {
                Some(g) if g > 0 => Some(g as usize),
                Some(g) if format.eq_ignore_ascii_case("hqq") => {
                    bail!("--group-size {g}: HQQ takes a positive multiple of 8")
                }
                _ => None,
            };
            let mut packed =
                recipes::parse_packed(&format, double_quant, gptq.bits, group, gptq.axis);
            if let Some(recipes::PackedRecipe::Hqq(o)) = &mut packed {
                // Round-to-nearest on HQQ's grid: the baseline its solver is measured against.
                o.params.optimize = !gptq.rtn;
            }
            if let Some(recipes::PackedRecipe::Bnb4(_)) = packed {
                if gptq.bits.is_some() || gptq.group_size.is_some() || gptq.axis.is_some() {
                    bail!("{format}: bitsandbytes 4-bit has fixed bits and blocks of 64 (no --bits/--group-size/--axis)");
                }
            }
            if double_quant && packed.is_none() {
                bail!("--double-quant is for nf4 and fp4");
            }
            if gptq.awq_scales
                && !(is_exl2
                    || format.eq_ignore_ascii_case("gptq")
                    || recipes::parse_awq(&format).is_some())
            {
                bail!("--awq-scales is for gptq and exl2");
            }
            let mut recipe = if let Some(p) = packed {
                if imatrix.is_some() || calib.is_some() {
                    bail!("{format} needs no calibration: drop --imatrix/--calib");
                }
                Recipe::Packed(p)
            } else if is_exl2 {
                if imatrix.is_some() {
                    bail!("--imatrix is for GGUF formats; EXL2 measures its options on --calib");
                }
                Recipe::Exl2(Box::new(gptq.exl2_options(calib, budget)?))
            } else if let Some(layout) = recipes::parse_awq(&format) {
                if imatrix.is_some() {
                    bail!("--imatrix is for GGUF formats; AWQ measures activations on --calib");
                }
                Recipe::Awq(Box::new(gptq.awq_options(calib, layout)?))
            } else if format.eq_ignore_ascii_case("gptq") {
                if imatrix.is_some() {
                    bail!("--imatrix is for GGUF formats; GPTQ computes Hessians from --calib");
                }
                Recipe::Gptq(Box::new(gptq.options(calib)?))
            } else {
                let imatrix = match (imatrix, calib) {
                    (Some(f), _) => ImatrixSource::File(f),
                    (None, Some(t)) => ImatrixSource::Compute {
                        source: calib_source(t, None),
                        options: calib_opts.options(),
                    },
                    (None, None) => ImatrixSource::None,
                };
                Recipe::Gguf(GgufRecipe {
                    mix: match auto {
                        Some(_) => quant_engine::quantize_automix::AUTOMIX_BASE,
                        None => recipes::parse_mix(&format)?,
                    },
                    overrides: recipes::parse_overrides(&overrides)?,
                    imatrix,
                    auto,
                    auto_types: parse_types(&auto_types)?,
                    auto_probe_tokens: probe_tokens,
                    auto_measurement: gptq.measurement.clone(),
                    backend: backend(),
                })
            };
            // Every recipe's computing steps (calibration passes, solvers) on the chosen backend.
            recipe.set_backend(backend());
            let out = match out {
                Some(out) if !estimate => out,
                _ => return print_estimate(&engine, model, &recipe, json),
            };
            match recipe {
                Recipe::Gguf(_) | Recipe::Packed(_) | Recipe::Awq(_) | Recipe::Exl2(_) => {
                    quantize(&engine, model, out, recipe, json, force)
                }
                Recipe::Gptq(_) => quantize_gptq(&engine, model, out, recipe, json, force),
            }
        }
        CliCommand::Imatrix {
            model,
            calib,
            out,
            calib_opts,
            dat,
            force,
        } => imatrix(
            &engine,
            model,
            calib_source(calib, None),
            out,
            calib_opts.options(),
            dat,
            force,
        ),
        CliCommand::Bench {
            model,
            n_prompt,
            n_gen,
            n_depth,
            repetitions,
            numerics,
            llama_bench,
            json,
        } => {
            let options = BenchOptions {
                n_prompt,
                n_gen,
                n_depth,
                repetitions,
                backend: backend(),
                numerics: numerics
                    .unwrap_or_else(|| quant_engine::infer::Numerics::fastest(backend())),
            };
            bench::run(&engine, model, options, llama_bench.as_deref(), json)
        }
        CliCommand::Gpus { json } => gpus(json),
    };
    engine.shutdown();
    result
}

/// `gpus`: every adapter, best first, numbered for `--gpu`.
fn gpus(json: bool) -> anyhow::Result<()> {
    let all = quant_engine::backend::wgpu::adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        bail!("no GPU adapter found (Vulkan, Metal or DX12); on Linux without a GPU, Mesa's lavapipe (Debian: mesa-vulkan-drivers) provides a software one");
    }
    for (i, a) in all.iter().enumerate() {
        let note = if a.is_software() {
            "  (software: slower than --backend cpu)"
        } else {
            ""
        };
        let features = if a.features.is_empty() {
            "none".to_string()
        } else {
            a.features.join(", ")
        };
        println!(
            "{i}  {}  [{}; {}; optional features: {features}]{note}",
            a.label(),
            a.kind,
            a.driver
        );
    }
    Ok(())
}

/// Newlines folded, so an error prints as one line.
pub fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Start a job and return its id.
fn start(engine: &EngineHandle, command: Command) -> anyhow::Result<JobId> {
    engine
        .submit(command)?
        .ok_or_else(|| anyhow!("internal error: the command did not start a job"))
}

/// Wait for job `job` to end, passing its other events to `on_event`; its output, or its error.
fn wait(
    engine: &EngineHandle,
    job: JobId,
    mut on_event: impl FnMut(&Event) -> anyhow::Result<()>,
) -> anyhow::Result<JobOutput> {
    loop {
        let ev = engine
            .events
            .recv()
            .context("the engine stopped before the job ended")?;
        if ev.job() != job {
            continue;
        }
        match ev {
            Event::Finished { output, .. } => return Ok(output),
            Event::Failed { error, .. } => bail!(error),
            Event::Cancelled { .. } => bail!("cancelled"),
            other => on_event(&other)?,
        }
    }
}

fn inspect(engine: &EngineHandle, path: PathBuf, json: bool) -> anyhow::Result<()> {
    let job = start(engine, Command::Inspect { path })?;
    match wait(engine, job, |_| Ok(()))? {
        JobOutput::Summary(s) if json => {
            outln!("{}", serde_json::to_string_pretty(&s)?)?;
            Ok(())
        }
        JobOutput::Summary(s) => {
            outln!("{s}")?;
            Ok(())
        }
        other => bail!("internal error: unexpected output {other:?}"),
    }
}

/// `quantize --estimate`: what the recipe would make of the model, from its summary (nothing is quantized).
fn print_estimate(
    engine: &EngineHandle,
    model: PathBuf,
    recipe: &Recipe,
    json: bool,
) -> anyhow::Result<()> {
    let job = start(engine, Command::Inspect { path: model })?;
    let summary = match wait(engine, job, |_| Ok(()))? {
        JobOutput::Summary(s) => s,
        other => bail!("internal error: unexpected output {other:?}"),
    };
    let e = recipe.estimate(&summary);
    if json {
        outln!("{}", serde_json::to_string_pretty(&e)?)?;
    } else {
        outln!(
            "{}: {:.1} MiB, {:.3} bits per weight ({:.3} for the quantized linears), peak memory ~{:.0} MiB, \
             ~{:.0} s on a 2-core machine",
            recipe.label(),
            e.size_bytes as f64 / (1024.0 * 1024.0),
            e.bpw,
            e.linear_bpw,
            e.peak_memory_bytes as f64 / (1024.0 * 1024.0),
            e.seconds
        )?;
    }
    Ok(())
}

fn convert(
    engine: &EngineHandle,
    model: PathBuf,
    out: PathBuf,
    dtype: DtypeArg,
    overwrite: bool,
) -> anyhow::Result<()> {
    let dtype = match dtype {
        DtypeArg::F16 => OutDtype::F16,
        DtypeArg::Bf16 => OutDtype::BF16,
    };
    let output = run_with_bars(
        engine,
        Command::Convert {
            model,
            out,
            dtype,
            overwrite,
        },
        |_, _| Ok(()),
    );
    match output? {
        JobOutput::Converted { path } => {
            outln!("wrote {}", path.display())?;
            Ok(())
        }
        other => bail!("internal error: unexpected output {other:?}"),
    }
}

/// `quantize` for the per-tensor formats (GGUF mixes, the calibration-free folders): a line per tensor, then a
/// summary.
fn quantize(
    engine: &EngineHandle,
    model: PathBuf,
    out: PathBuf,
    recipe: Recipe,
    json: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    let weighted = matches!(&recipe, Recipe::Gguf(g) if g.imatrix != ImatrixSource::None);
    if !json {
        outln!(
            "{:<34} {:>7} {:>6} {:>12} {:>11}{}",
            "tensor",
            "type",
            "bpw",
            "rel. RMS err",
            "max err",
            if weighted {
                "  imatrix-weighted err"
            } else {
                ""
            }
        )?;
    }
    let command = Command::Quantize {
        model,
        out,
        recipe,
        overwrite,
    };
    let output = run_with_bars(engine, command, |bars, ev| {
        if let (false, Event::LayerDone { metrics: m, .. }) = (json, ev) {
            bars.suspend(|| {
                let w = match (weighted, m.weighted_rel_rms_error) {
                    (true, Some(w)) => format!(" {w:>21.3e}"),
                    (true, None) => format!(" {:>21}", "-"),
                    (false, _) => String::new(),
                };
                outln!(
                    "{:<34} {:>7} {:>6.3} {:>12.3e} {:>11.3e}{w}",
                    m.tensor.trim_start_matches("model."),
                    m.codec,
                    m.bits_per_weight,
                    m.rel_rms_error,
                    m.max_error
                )
            })?;
        }
        Ok(())
    });
    match output? {
        JobOutput::Quantized(report) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                outln!(
                    "{}: {} tensors, {:.2} MiB ({} bytes), {:.3} bits per weight",
                    if report.tensor_type_args.is_empty() {
                        report.mix
                    } else {
                        "auto mix"
                    },
                    report.tensors.len(),
                    report.file_size_bytes as f64 / (1024.0 * 1024.0),
                    report.file_size_bytes,
                    report.bits_per_weight
                )?;
                if !report.tensor_type_args.is_empty() {
                    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
                    for t in &report.tensors {
                        *counts.entry(t.ty).or_default() += 1;
                    }
                    let list: Vec<String> =
                        counts.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
                    outln!("types: {}", list.join(", "))?;
                    if let Some(k) = report.predicted_kld {
                        outln!(
                            "predicted KL-divergence from the source: {k:.4} (the tensors' probed divergences summed; `eval --base` measures it)"
                        )?;
                    }
                    outln!(
                        "the same mix with llama.cpp: llama-quantize --imatrix IMATRIX {} MODEL-F16.gguf OUT.gguf q4_k_m",
                        report.tensor_type_args.join(" ")
                    )?;
                }
            }
            Ok(())
        }
        JobOutput::QuantizedPacked(r) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                outln!(
                    "{}: {} linears at {:.3} bits per weight; {:.2} MiB folder, {:.3} bits per parameter; {:.1} s",
                    r.codec,
                    r.modules.len(),
                    r.linear_bits_per_weight,
                    r.folder_size_bytes as f64 / (1024.0 * 1024.0),
                    r.bits_per_weight,
                    r.seconds
                )?;
            }
            Ok(())
        }
        other => bail!("internal error: unexpected output {other:?}"),
    }
}

fn quantize_gptq(
    engine: &EngineHandle,
    model: PathBuf,
    out: PathBuf,
    recipe: Recipe,
    json: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    if !json {
        outln!(
            "{:<34} {:>14} {:>6} {:>11} {:>11} {:>7} {:>12}",
            "tensor",
            "codec",
            "bpw",
            "GPTQ loss",
            "RTN loss",
            "ratio",
            "rel. RMS err"
        )?;
    }
    let command = Command::Quantize {
        model,
        out,
        recipe,
        overwrite,
    };
    let output = run_with_bars(engine, command, |bars, ev| {
        if let (false, Event::LayerDone { metrics: m, .. }) = (json, ev) {
            let (g, r) = (m.gptq_loss.unwrap_or(0.0), m.rtn_loss.unwrap_or(0.0));
            bars.suspend(|| {
                outln!(
                    "{:<34} {:>14} {:>6.3} {:>11.4e} {:>11.4e} {:>7.3} {:>12.3e}",
                    m.tensor.trim_start_matches("model."),
                    m.codec,
                    m.bits_per_weight,
                    g,
                    r,
                    if r > 0.0 { g / r } else { 0.0 },
                    m.rel_rms_error
                )
            })?;
        }
        Ok(())
    });
    match output? {
        JobOutput::QuantizedGptq(r) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                let (g, rt): (f64, f64) = r.modules.iter().fold((0.0, 0.0), |a, m| {
                    (a.0 + m.gptq_output_loss, a.1 + m.rtn_loss)
                });
                let t = &r.timings;
                outln!(
                    "{}: {} linears, {:.2} MiB folder; GPTQ/RTN loss {:.3}; calibration {} × {} tokens \
                     ({:.1} MiB of activations{}); time: capture {:.1} s, Hessians {:.1} s, solve {:.1} s, write {:.1} s",
                    r.config,
                    r.modules.len(),
                    r.folder_size_bytes as f64 / (1024.0 * 1024.0),
                    if rt > 0.0 { g / rt } else { 0.0 },
                    r.calib_rows,
                    r.calib_seq_len,
                    r.activation_bytes as f64 / (1024.0 * 1024.0),
                    if r.spilled { ", spilled to disk" } else { "" },
                    t.capture_s,
                    t.hessian_s,
                    t.solve_s,
                    t.write_s
                )?;
            }
            Ok(())
        }
        other => bail!("internal error: unexpected output {other:?}"),
    }
}

fn imatrix(
    engine: &EngineHandle,
    model: PathBuf,
    source: CalibSource,
    out: PathBuf,
    options: ImatrixOptions,
    legacy_dat: bool,
    overwrite: bool,
) -> anyhow::Result<()> {
    let command = Command::Imatrix {
        model,
        source,
        options,
        out,
        legacy_dat,
        overwrite,
    };
    match run_with_bars(engine, command, |_, _| Ok(()))? {
        JobOutput::Imatrix {
            path,
            entries,
            chunks,
            tokens_per_chunk,
        } => {
            outln!(
                "{}: {entries} entries from {chunks} chunks of {tokens_per_chunk} tokens",
                path.display()
            )?;
            Ok(())
        }
        other => bail!("internal error: unexpected output {other:?}"),
    }
}

/// Start `command`, draw its progress bars, and wait for its output; `on_event` sees every event too
/// (with the bars, to print above them).
fn run_with_bars(
    engine: &EngineHandle,
    command: Command,
    mut on_event: impl FnMut(&progress::Bars, &Event) -> anyhow::Result<()>,
) -> anyhow::Result<JobOutput> {
    let job = start(engine, command)?;
    let mut bars = progress::Bars::new();
    let output = wait(engine, job, |ev| {
        bars.on_event(ev);
        on_event(&bars, ev)
    });
    bars.finish();
    output
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn max_shard_sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5gb"), Ok(1_500_000_000));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
        assert_eq!(parse_size("123456"), Ok(123_456));
        for bad in ["", "GB", "5XB", "0MB", "-1GB", "1e3MB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
