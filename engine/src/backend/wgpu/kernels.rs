//! The WGSL kernels (`engine/shaders/`, one file per kernel family), their pipelines — compiled once per
//! (file, entry point, constants) and cached on the [`Gpu`] — and the dispatch helpers the backend's
//! operations are recorded with.

use std::borrow::Cow;

use ::wgpu as wg;
use wg::util::DeviceExt;

use super::{lock, Gpu};
use crate::codecs::GgmlType;

/// Byte readers and f16 decoding, prepended to every dequantisation kernel.
const COMMON: &str = include_str!("../../../shaders/common.wgsl");

/// Every kernel file: (name, source, whether it starts with [`COMMON`]).
pub const SHADERS: [(&str, &str, bool); 5] = [
    (
        "dequant_float",
        include_str!("../../../shaders/dequant_float.wgsl"),
        true,
    ),
    (
        "dequant_legacy",
        include_str!("../../../shaders/dequant_legacy.wgsl"),
        true,
    ),
    (
        "dequant_kquants",
        include_str!("../../../shaders/dequant_kquants.wgsl"),
        true,
    ),
    (
        "dequant_iq4",
        include_str!("../../../shaders/dequant_iq4.wgsl"),
        true,
    ),
    ("gemm", include_str!("../../../shaders/gemm.wgsl"), false),
];

/// The full WGSL text of kernel file `name`.
pub fn source(name: &str) -> Option<String> {
    SHADERS
        .iter()
        .find(|(n, ..)| *n == name)
        .map(|(_, src, common)| {
            if *common {
                format!("{COMMON}\n{src}")
            } else {
                (*src).to_string()
            }
        })
}

/// Invocations per workgroup of the dequantisation kernels.
const DEQUANT_WG: u32 = 64;

/// The kernel that dequantises blocks of `ty` into f32: (file, entry point), or `None` for the types that
/// have none yet (their rows are dequantised on the CPU and uploaded as f32).
pub fn dequant_kernel(ty: GgmlType) -> Option<(&'static str, &'static str)> {
    use GgmlType as T;
    Some(match ty {
        T::F32 => ("dequant_float", "f32_"),
        T::F16 => ("dequant_float", "f16_"),
        T::BF16 => ("dequant_float", "bf16"),
        T::Q4_0 => ("dequant_legacy", "q4_0"),
        T::Q4_1 => ("dequant_legacy", "q4_1"),
        T::Q5_0 => ("dequant_legacy", "q5_0"),
        T::Q5_1 => ("dequant_legacy", "q5_1"),
        T::Q8_0 => ("dequant_legacy", "q8_0"),
        T::Q2K => ("dequant_kquants", "q2_k"),
        T::Q3K => ("dequant_kquants", "q3_k"),
        T::Q4K => ("dequant_kquants", "q4_k"),
        T::Q5K => ("dequant_kquants", "q5_k"),
        T::Q6K => ("dequant_kquants", "q6_k"),
        T::Iq4Nl => ("dequant_iq4", "iq4_nl"),
        T::Iq4Xs => ("dequant_iq4", "iq4_xs"),
        T::Iq2Xxs | T::Iq2Xs | T::Iq2S | T::Iq3Xxs | T::Iq3S | T::Iq1S | T::Iq1M => return None,
    })
}

/// A compiled pipeline's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub file: &'static str,
    pub entry: &'static str,
    /// `W_KMAJOR` of the GEMM.
    pub kmajor: bool,
}

impl Gpu {
    /// The pipeline for `key`, compiled on first use.
    pub(crate) fn pipeline(&self, key: Key) -> wg::ComputePipeline {
        let mut cache = lock(&self.pipelines);
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let src = source(key.file).unwrap_or_default();
        let module = self
            .device
            .create_shader_module(wg::ShaderModuleDescriptor {
                label: Some(key.file),
                source: wg::ShaderSource::Wgsl(Cow::Owned(src)),
            });
        let constants: &[(&str, f64)] = if key.file == "gemm" {
            &[("W_KMAJOR", if key.kmajor { 1.0 } else { 0.0 })]
        } else {
            &[]
        };
        let p = self
            .device
            .create_compute_pipeline(&wg::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wg::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        cache.insert(key, p.clone());
        p
    }

    fn uniform(&self, words: &[u32]) -> wg::Buffer {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.device
            .create_buffer_init(&wg::util::BufferInitDescriptor {
                label: Some("params"),
                contents: &bytes,
                usage: wg::BufferUsages::UNIFORM,
            })
    }

    fn bind(&self, pipeline: &wg::ComputePipeline, buffers: &[&wg::Buffer]) -> wg::BindGroup {
        let entries: Vec<wg::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wg::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wg::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Record: dequantise `count` blocks of `kernel`'s type starting at block `first` of `src` into `dst`
    /// (f32, from element 0).
    pub(crate) fn record_dequant(
        &self,
        pass: &mut wg::ComputePass<'_>,
        kernel: (&'static str, &'static str),
        src: &wg::Buffer,
        first: u32,
        count: u32,
        dst: &wg::Buffer,
    ) {
        let p = self.pipeline(Key {
            file: kernel.0,
            entry: kernel.1,
            kmajor: false,
        });
        let groups = count.div_ceil(DEQUANT_WG).max(1);
        let gx = groups.min(self.max_groups());
        let gy = groups.div_ceil(gx);
        let params = self.uniform(&[first, count, gx * DEQUANT_WG, 0]);
        let bg = self.bind(&p, &[src, dst, &params]);
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
    }

    /// Record `y[y_off + t·ldy + j] = Σ_k x[x_off + t·k + kk] · W(j, kk)` for `t < n`, `j < m` (see
    /// `gemm.wgsl` for W's two layouts).
    pub(crate) fn record_gemm(
        &self,
        pass: &mut wg::ComputePass<'_>,
        bufs: [&wg::Buffer; 3],
        g: Gemm,
    ) {
        let p = self.pipeline(Key {
            file: "gemm",
            entry: "main",
            kmajor: g.kmajor,
        });
        let params = self.uniform(&[g.n, g.m, g.k, g.w_off, g.ldw, g.y_off, g.ldy, g.x_off]);
        let bg = self.bind(&p, &[bufs[0], bufs[1], bufs[2], &params]);
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(g.m.div_ceil(64), g.n.div_ceil(64), 1);
    }
}

/// One GEMM's shape and offsets (elements).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Gemm {
    pub n: u32,
    pub m: u32,
    pub k: u32,
    pub x_off: u32,
    pub w_off: u32,
    pub ldw: u32,
    pub y_off: u32,
    pub ldy: u32,
    pub kmajor: bool,
}
