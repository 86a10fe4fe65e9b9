//! The pipeline of the calibration-free packed formats (bitsandbytes NF4/FP4, HQQ): each decoder linear is
//! quantized on its own, measured against its source, spilled to disk, and the folder is assembled at the
//! end (memory bounded by one linear).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::model::SourceModel;
use crate::output::OutputSpec;
use crate::writers::packed::{
    folder_bytes, pack_linears, write_packed_folder, LinearPacker, PackedSpill,
};
use crate::{Error, Result};

/// The error of one quantized linear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackedModuleMetrics {
    /// Decoder layer index.
    pub layer: usize,
    /// Hugging Face weight name.
    pub tensor: String,
    /// Stored bits per weight (codes and side tensors).
    pub bits_per_weight: f64,
    /// ‖W − Ŵ‖ / ‖W‖.
    pub rel_rms_error: f64,
    /// max |W − Ŵ|.
    pub max_error: f64,
}

/// What a packed-format run made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackedReport {
    /// The codec (`"NF4 dq"`).
    pub codec: String,
    pub modules: Vec<PackedModuleMetrics>,
    /// Bits per weight of the packed linears together.
    pub linear_bits_per_weight: f64,
    /// Bits per parameter of the whole folder's weight files.
    pub bits_per_weight: f64,
    pub folder_size_bytes: u64,
    pub seconds: f64,
}

/// Layer index of a decoder weight name (`model.layers.12.…` → 12).
fn layer_of(name: &str) -> usize {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Quantize `src` with `packer` into the folder `out`. `on_module(metrics, done, total)` is called after
/// each linear; returning `false` cancels.
pub fn quantize_packed(
    src: &SourceModel,
    packer: &dyn LinearPacker,
    out: &OutputSpec,
    on_module: &mut dyn FnMut(&PackedModuleMetrics, usize, usize) -> bool,
) -> Result<PackedReport> {
    let start = Instant::now();
    let fmt = packer.folder();
    let linears: Vec<_> = src
        .tensors
        .values()
        .filter(|t| (fmt.packs)(&t.name))
        .collect();
    if linears.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no decoder linears to quantize (is it already quantized?)",
            src.path.display()
        )));
    }
    for t in &linears {
        if t.is_grouped() {
            return Err(Error::Invalid(format!(
                "{}: {} is already quantized ({}); start from a float model",
                src.path.display(),
                t.name,
                t.type_label()
            )));
        }
        packer.check(t)?;
    }
    // fp16 for the rest, the packed linears at a nominal 4.5 bits: enough for the free-space check.
    let packed_weights: usize = linears.iter().map(|t| t.numel()).sum();
    let other: usize = src
        .tensors
        .values()
        .filter(|t| !(fmt.packs)(&t.name))
        .map(|t| t.numel())
        .sum();
    let mut spec = out
        .clone()
        .input(&src.path)
        .estimated_bytes((other * 2 + packed_weights * 9 / 16) as u64 * 2);
    spec.kind = crate::output::OutputKind::Folder;
    crate::output::preflight(&spec)?;
    let staged = crate::output::Staged::begin(spec)?;
    let mut spill = PackedSpill::create(&staged.path().join(".packed-linears"))?;
    let mut modules = Vec::with_capacity(linears.len());
    let (mut stored_bits, mut weights) = (0.0f64, 0usize);
    let total = linears.len();
    let mut row = Vec::new();
    let mut qrow = Vec::new();
    pack_linears(
        src,
        &fmt,
        &mut spill,
        &mut |t| {
            let (parts, g) = packer.pack(t)?;
            let (mut e2, mut n2, mut max) = (0.0f64, 0.0f64, 0.0f64);
            row.resize(t.cols(), 0.0f32);
            qrow.resize(t.cols(), 0.0f32);
            for r in 0..t.rows() {
                t.dequant_row(r, &mut row);
                g.dequant_row(r, &mut qrow);
                for (a, b) in row.iter().zip(&qrow) {
                    let d = f64::from(a - b);
                    e2 += d * d;
                    n2 += f64::from(*a).powi(2);
                    max = max.max(d.abs());
                }
            }
            let bytes: usize = parts.iter().map(|p| p.bytes.len()).sum();
            stored_bits += bytes as f64 * 8.0;
            weights += t.numel();
            let m = PackedModuleMetrics {
                layer: layer_of(&t.name),
                tensor: t.name.clone(),
                bits_per_weight: bytes as f64 * 8.0 / t.numel().max(1) as f64,
                rel_rms_error: if n2 > 0.0 { (e2 / n2).sqrt() } else { 0.0 },
                max_error: max,
            };
            modules.push(m);
            if !on_module(&modules[modules.len() - 1], modules.len(), total) {
                return Err(Error::Cancelled);
            }
            Ok(parts)
        },
        &mut |_, _| true,
    )?;
    write_packed_folder(src, &fmt, staged.path(), &mut spill, &mut |_, _| true)?;
    spill.remove()?;
    let out = staged.commit()?;
    let folder_size_bytes = folder_bytes(&out, true)?;
    Ok(PackedReport {
        codec: packer.codec(),
        modules,
        linear_bits_per_weight: stored_bits / weights.max(1) as f64,
        bits_per_weight: folder_size_bytes as f64 * 8.0 / src.parameter_count().max(1) as f64,
        folder_size_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
