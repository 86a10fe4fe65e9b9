//! The WGSL kernels (`engine/shaders/`): each block type is one file (`types/*.wgsl`) that emits its
//! values, and drivers (dequantise, fused matvec) turn it into kernels, so every type gets every driver;
//! the tiled GEMM. Pipelines are compiled once per (driver, type) or GEMM variant and cached on the
//! [`Gpu`]; the dispatch helpers the backend's operations are recorded with.

use std::borrow::Cow;

use ::wgpu as wg;
use wg::util::DeviceExt;

use super::{lock, Gpu};
use crate::codecs::GgmlType;

/// Exact f16 decoding, the first part of every kernel that reads stored weights.
const HALF: &str = include_str!("../../../shaders/half.wgsl");
/// Byte readers, after [`HALF`] in every block-type kernel.
const COMMON: &str = include_str!("../../../shaders/common.wgsl");
/// The driver of the grouped linears read in place, and their format files (each after [`HALF`] and it).
const GROUPED: &str = include_str!("../../../shaders/grouped.wgsl");
const GROUPED_FORMATS: [(&str, &str); 6] = [
    ("awq", include_str!("../../../shaders/awq.wgsl")),
    ("bnb4", include_str!("../../../shaders/bnb4.wgsl")),
    ("ct", include_str!("../../../shaders/ct.wgsl")),
    ("exl2", include_str!("../../../shaders/exl2.wgsl")),
    ("gptq", include_str!("../../../shaders/gptq.wgsl")),
    ("hqq", include_str!("../../../shaders/hqq.wgsl")),
];

/// Exact f32 arithmetic in integer operations (after [`HALF`]), the round-to-nearest quantizers' driver and
/// their type files, and the arithmetic's test entry.
const EXACT: &str = include_str!("../../../shaders/exact.wgsl");
const QUANTIZE: &str = include_str!("../../../shaders/quantize.wgsl");
const EXACT_CHECK: &str = include_str!("../../../shaders/exact_check.wgsl");
const QUANT_FILES: [(GgmlType, &str); 5] = [
    (
        GgmlType::Q4_0,
        include_str!("../../../shaders/quant/q4_0.wgsl"),
    ),
    (
        GgmlType::Q4_1,
        include_str!("../../../shaders/quant/q4_1.wgsl"),
    ),
    (
        GgmlType::Q5_0,
        include_str!("../../../shaders/quant/q5_0.wgsl"),
    ),
    (
        GgmlType::Q5_1,
        include_str!("../../../shaders/quant/q5_1.wgsl"),
    ),
    (
        GgmlType::Q8_0,
        include_str!("../../../shaders/quant/q8_0.wgsl"),
    ),
];

/// Whether the GPU quantizes `ty` (round to nearest, without an importance matrix) byte for byte as the
/// CPU.
pub fn gpu_quantizes(ty: GgmlType) -> bool {
    QUANT_FILES.iter().any(|(t, _)| *t == ty)
}

/// The round-to-nearest quantizer of `ty`'s full WGSL text.
fn quant_source(ty: GgmlType) -> Option<String> {
    let (_, file) = QUANT_FILES.iter().find(|(t, _)| *t == ty)?;
    Some(format!("{HALF}\n{EXACT}\n{QUANTIZE}\n{file}"))
}

/// Drivers: what is done with the values a block type emits.
const DEQUANT: &str = include_str!("../../../shaders/dequant.wgsl");
const MATVEC: &str = include_str!("../../../shaders/matvec.wgsl");
/// The matvec's entry points: partial sums added in workgroup memory, or with subgroup operations.
const MATVEC_WG: &str = include_str!("../../../shaders/matvec_wg.wgsl");
const MATVEC_SG: &str = include_str!("../../../shaders/matvec_sg.wgsl");
/// How the matvec's invocations share a row: sub-blocks of a quantized type, or elements of a float one.
const MATVEC_UNITS: &str = include_str!("../../../shaders/matvec_units.wgsl");
const MATVEC_ELEMS: &str = include_str!("../../../shaders/matvec_elems.wgsl");
const GEMM: &str = include_str!("../../../shaders/gemm.wgsl");
/// The GEMM's tile core (after `gemm.wgsl`, and in the grouped formats' kernels).
const GEMM_TILE: &str = include_str!("../../../shaders/gemm_tile.wgsl");
/// How the GEMM reads W: element by element (`gemm_w_elems.wgsl` after a file defining `w` and `w_val`),
/// or a quantized type's sub-blocks decoded in its staging step (`gemm_w_blocks.wgsl`).
const GEMM_W_ELEMS: &str = include_str!("../../../shaders/gemm_w_elems.wgsl");
const GEMM_W_F32: &str = include_str!("../../../shaders/gemm_w_f32.wgsl");
const GEMM_W_F16: &str = include_str!("../../../shaders/gemm_w_f16.wgsl");
const GEMM_W_F16_BITS: &str = include_str!("../../../shaders/gemm_w_f16_bits.wgsl");
const GEMM_W_BF16: &str = include_str!("../../../shaders/gemm_w_bf16.wgsl");
const GEMM_W_BLOCKS: &str = include_str!("../../../shaders/gemm_w_blocks.wgsl");

/// How the GEMM's W is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WStore {
    /// f32 (weights dequantised into scratch, attention's K and V, a Hessian's inputs).
    #[default]
    F32,
    /// F16 weights read in place, decoded with integer operations (every adapter).
    F16Bits,
    /// F16 weights read in place as WGSL `f16` (adapters with shader-f16).
    F16,
    /// BF16 weights read in place.
    Bf16,
    /// Stored blocks of a quantized type, decoded sub-block by sub-block as the GEMM stages them (`w_off`
    /// counts rows).
    Blocks(GgmlType),
}

impl WStore {
    /// The stores read element by element.
    pub const ELEMS: [WStore; 4] = [WStore::F32, WStore::F16Bits, WStore::F16, WStore::Bf16];

    /// Every store: [`WStore::ELEMS`] and the block types built of sub-blocks.
    pub fn all() -> Vec<WStore> {
        let blocks = GgmlType::all().filter(|&t| has_sub_blocks(t));
        Self::ELEMS
            .into_iter()
            .chain(blocks.map(WStore::Blocks))
            .collect()
    }
}

/// Whether block type `ty` is built of 32-element sub-blocks (`dequant_sub`): every quantized type, not
/// the float ones.
pub fn has_sub_blocks(ty: GgmlType) -> bool {
    ty.traits().block_elems >= 32
}

/// The GEMM's full WGSL text for W stored as `w`.
fn gemm_source(w: WStore) -> String {
    match w {
        WStore::F32 => format!("{GEMM_W_F32}\n{GEMM_W_ELEMS}\n{GEMM}\n{GEMM_TILE}"),
        WStore::F16Bits => {
            format!("{HALF}\n{GEMM_W_F16_BITS}\n{GEMM_W_ELEMS}\n{GEMM}\n{GEMM_TILE}")
        }
        WStore::F16 => format!("enable f16;\n{GEMM_W_F16}\n{GEMM_W_ELEMS}\n{GEMM}\n{GEMM_TILE}"),
        WStore::Bf16 => format!("{GEMM_W_BF16}\n{GEMM_W_ELEMS}\n{GEMM}\n{GEMM_TILE}"),
        WStore::Blocks(ty) => {
            let mut s = format!("{HALF}\n{COMMON}\n{GEMM_W_BLOCKS}\n{GEMM}\n{GEMM_TILE}\n");
            for f in block_files(ty).unwrap_or_default() {
                if let Some((_, text)) = TYPE_FILES.iter().find(|(n, _)| n == f) {
                    s.push_str(text);
                    s.push('\n');
                }
            }
            s
        }
    }
}

/// The decoder layer's other steps, one file each.
const OPS: [(&str, &str); 7] = [
    ("hqq_solve", include_str!("../../../shaders/hqq_solve.wgsl")),
    ("logits", include_str!("../../../shaders/logits.wgsl")),
    ("rms_norm", include_str!("../../../shaders/rms_norm.wgsl")),
    ("rope", include_str!("../../../shaders/rope.wgsl")),
    (
        "elementwise",
        include_str!("../../../shaders/elementwise.wgsl"),
    ),
    ("kv_write", include_str!("../../../shaders/kv_write.wgsl")),
    ("softmax", include_str!("../../../shaders/softmax.wgsl")),
];

/// The block types' files (`shaders/types/`), and the helpers some of them share.
const TYPE_FILES: [(&str, &str); 27] = [
    (
        "sub_blocks",
        include_str!("../../../shaders/types/sub_blocks.wgsl"),
    ),
    (
        "iq_tables",
        include_str!("../../../shaders/types/iq_tables.wgsl"),
    ),
    (
        "iq2_xxs",
        include_str!("../../../shaders/types/iq2_xxs.wgsl"),
    ),
    ("iq2_xs", include_str!("../../../shaders/types/iq2_xs.wgsl")),
    ("iq2_s", include_str!("../../../shaders/types/iq2_s.wgsl")),
    (
        "iq3_xxs",
        include_str!("../../../shaders/types/iq3_xxs.wgsl"),
    ),
    ("iq3_s", include_str!("../../../shaders/types/iq3_s.wgsl")),
    (
        "iq1_grid",
        include_str!("../../../shaders/types/iq1_grid.wgsl"),
    ),
    ("iq1_s", include_str!("../../../shaders/types/iq1_s.wgsl")),
    ("iq1_m", include_str!("../../../shaders/types/iq1_m.wgsl")),
    ("f32", include_str!("../../../shaders/types/f32.wgsl")),
    ("f16", include_str!("../../../shaders/types/f16.wgsl")),
    ("bf16", include_str!("../../../shaders/types/bf16.wgsl")),
    ("q4_0", include_str!("../../../shaders/types/q4_0.wgsl")),
    ("q4_1", include_str!("../../../shaders/types/q4_1.wgsl")),
    ("q5_0", include_str!("../../../shaders/types/q5_0.wgsl")),
    ("q5_1", include_str!("../../../shaders/types/q5_1.wgsl")),
    ("q8_0", include_str!("../../../shaders/types/q8_0.wgsl")),
    (
        "kquant_scales",
        include_str!("../../../shaders/types/kquant_scales.wgsl"),
    ),
    ("q2_k", include_str!("../../../shaders/types/q2_k.wgsl")),
    ("q3_k", include_str!("../../../shaders/types/q3_k.wgsl")),
    ("q4_k", include_str!("../../../shaders/types/q4_k.wgsl")),
    ("q5_k", include_str!("../../../shaders/types/q5_k.wgsl")),
    ("q6_k", include_str!("../../../shaders/types/q6_k.wgsl")),
    (
        "iq4_grid",
        include_str!("../../../shaders/types/iq4_grid.wgsl"),
    ),
    ("iq4_nl", include_str!("../../../shaders/types/iq4_nl.wgsl")),
    ("iq4_xs", include_str!("../../../shaders/types/iq4_xs.wgsl")),
];

/// What a kernel does with stored blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Driver {
    /// Write the values out as f32 (before the tiled GEMM).
    Dequant,
    /// Fused dequantisation × vector (decoding).
    Matvec,
    /// [`Driver::Matvec`] adding its partial sums with subgroup operations.
    MatvecSubgroups,
}

impl Driver {
    pub const ALL: [Driver; 3] = [Driver::Dequant, Driver::Matvec, Driver::MatvecSubgroups];

    /// The driver's text for block type `ty`.
    fn source(self, ty: GgmlType) -> String {
        let share = if has_sub_blocks(ty) {
            MATVEC_UNITS
        } else {
            MATVEC_ELEMS
        };
        match self {
            Driver::Dequant => DEQUANT.to_string(),
            Driver::Matvec => format!("{MATVEC}\n{share}\n{MATVEC_WG}"),
            Driver::MatvecSubgroups => format!("{MATVEC}\n{share}\n{MATVEC_SG}"),
        }
    }
}

/// The WGSL files of block type `ty` (helpers first). Every ggml type has them; the grouped formats do
/// not yet (their rows are dequantised on the CPU and uploaded as f32).
pub fn block_files(ty: GgmlType) -> Option<&'static [&'static str]> {
    use GgmlType as T;
    // Each quantized type's file is followed by `sub_blocks` (its `dequant_block` from `dequant_sub`).
    Some(match ty {
        T::F32 => &["f32"],
        T::F16 => &["f16"],
        T::BF16 => &["bf16"],
        T::Q4_0 => &["q4_0", "sub_blocks"],
        T::Q4_1 => &["q4_1", "sub_blocks"],
        T::Q5_0 => &["q5_0", "sub_blocks"],
        T::Q5_1 => &["q5_1", "sub_blocks"],
        T::Q8_0 => &["q8_0", "sub_blocks"],
        T::Q2K => &["q2_k", "sub_blocks"],
        T::Q3K => &["q3_k", "sub_blocks"],
        T::Q4K => &["kquant_scales", "q4_k", "sub_blocks"],
        T::Q5K => &["kquant_scales", "q5_k", "sub_blocks"],
        T::Q6K => &["q6_k", "sub_blocks"],
        T::Iq4Nl => &["iq4_grid", "iq4_nl", "sub_blocks"],
        T::Iq4Xs => &["iq4_grid", "iq4_xs", "sub_blocks"],
        T::Iq2Xxs => &["iq_tables", "iq2_xxs", "sub_blocks"],
        T::Iq2Xs => &["iq_tables", "iq2_xs", "sub_blocks"],
        T::Iq2S => &["iq_tables", "iq2_s", "sub_blocks"],
        T::Iq3Xxs => &["iq_tables", "iq3_xxs", "sub_blocks"],
        T::Iq3S => &["iq_tables", "iq3_s", "sub_blocks"],
        T::Iq1S => &["iq_tables", "iq1_grid", "iq1_s", "sub_blocks"],
        T::Iq1M => &["iq_tables", "iq1_grid", "iq1_m", "sub_blocks"],
    })
}

/// The WGSL text of `driver` over block type `ty`.
pub fn block_source(driver: Driver, ty: GgmlType) -> Option<String> {
    let files = block_files(ty)?;
    let mut s = format!("{HALF}\n{COMMON}\n{}\n", driver.source(ty));
    for f in files {
        let (_, text) = TYPE_FILES.iter().find(|(n, _)| n == f)?;
        s.push_str(text);
        s.push('\n');
    }
    Some(s)
}

/// The WGSL text of op or grouped-format file `file`.
fn op_source(file: &str) -> Option<String> {
    if let Some((_, s)) = GROUPED_FORMATS.iter().find(|(n, _)| *n == file) {
        return Some(format!("{HALF}\n{GROUPED}\n{GEMM_TILE}\n{s}"));
    }
    if file == "exact_check" {
        return Some(format!("{HALF}\n{EXACT}\n{EXACT_CHECK}"));
    }
    OPS.iter()
        .find(|(n, _)| *n == file)
        .map(|(_, s)| (*s).to_string())
}

/// Every kernel's full WGSL text with a name: each driver over each block type, the ops, the grouped
/// formats and the GEMM.
pub fn all_sources() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = WStore::all()
        .into_iter()
        .map(|w| (format!("gemm ({w:?} W)"), gemm_source(w)))
        .collect();
    for n in OPS
        .iter()
        .chain(&GROUPED_FORMATS)
        .map(|(n, _)| *n)
        .chain(["exact_check"])
    {
        v.push((n.to_string(), op_source(n).unwrap_or_default()));
    }
    for (ty, _) in QUANT_FILES {
        v.push((
            format!("quantize {}", ty.traits().name),
            quant_source(ty).unwrap_or_default(),
        ));
    }
    for ty in GgmlType::all() {
        for d in Driver::ALL {
            if let Some(src) = block_source(d, ty) {
                v.push((format!("{d:?} {}", ty.traits().name), src));
            }
        }
    }
    v
}

/// Invocations per workgroup of the block kernels.
const BLOCK_WG: u32 = 64;

/// A compiled pipeline's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A driver over a block type.
    Block(Driver, GgmlType),
    /// The tiled GEMM, with `W_KMAJOR`, `X_KMAJOR` and `SUBTRACT`, W stored as `w`.
    Gemm {
        kmajor: bool,
        xkmajor: bool,
        subtract: bool,
        w: WStore,
    },
    /// Entry point `entry` of op file `file` ([`OPS`], or a grouped format run by `grouped.wgsl`).
    Op(&'static str, &'static str),
    /// The round-to-nearest quantizer of a type.
    Quant(GgmlType),
}

impl Gpu {
    /// The pipeline for `key`, compiled on first use.
    pub(crate) fn pipeline(&self, key: Key) -> wg::ComputePipeline {
        let mut cache = lock(&self.pipelines);
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let (src, constants): (String, Vec<(&str, f64)>) = match key {
            Key::Block(d, ty) => (block_source(d, ty).unwrap_or_default(), Vec::new()),
            Key::Op(file, _) => (op_source(file).unwrap_or_default(), Vec::new()),
            Key::Quant(ty) => (quant_source(ty).unwrap_or_default(), Vec::new()),
            Key::Gemm {
                kmajor,
                xkmajor,
                subtract,
                w,
            } => (
                gemm_source(w),
                vec![
                    ("W_KMAJOR", flag(kmajor)),
                    ("X_KMAJOR", flag(xkmajor)),
                    ("SUBTRACT", flag(subtract)),
                ],
            ),
        };
        let module = self
            .device
            .create_shader_module(wg::ShaderModuleDescriptor {
                label: Some("kernel"),
                source: wg::ShaderSource::Wgsl(Cow::Owned(src)),
            });
        let p = self
            .device
            .create_compute_pipeline(&wg::ComputePipelineDescriptor {
                label: Some("kernel"),
                layout: None,
                module: &module,
                entry_point: Some(match key {
                    Key::Op(_, entry) => entry,
                    _ => "main",
                }),
                compilation_options: wg::PipelineCompilationOptions {
                    constants: &constants,
                    ..Default::default()
                },
                cache: None,
            });
        cache.insert(key, p.clone());
        p
    }

    /// The lookup table of a low-bit type on the device (uploaded once).
    fn table(&self, ty: GgmlType) -> Option<wg::Buffer> {
        let mut tables = lock(&self.tables);
        if let Some(t) = tables.get(&ty) {
            return Some(t.clone());
        }
        let words = crate::codecs::gpu_table(ty)?;
        let buf = self
            .device
            .create_buffer_init(&wg::util::BufferInitDescriptor {
                label: Some("lookup table"),
                contents: bytemuck::cast_slice(&words),
                usage: wg::BufferUsages::STORAGE,
            });
        tables.insert(ty, buf.clone());
        Some(buf)
    }

    /// A uniform block holding `words` from the next submission on ([`Gpu::submit`] uploads the
    /// submission's blocks together), from the pool (it returns there when the current [`super::Work`]
    /// ends; call under one).
    pub(crate) fn uniform(&self, words: &[u32]) -> wg::Buffer {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let size = (bytes.len() as u64).next_multiple_of(16).max(16);
        let b = self.take(size, wg::BufferUsages::UNIFORM | wg::BufferUsages::COPY_DST);
        let mut p = lock(&self.pool);
        let off = p.uniform_data.len() as u64;
        p.uniform_data.extend_from_slice(&bytes);
        p.uniform_data.resize((off + size) as usize, 0);
        p.uniform_parts.push((b.clone(), off, size));
        p.in_use.push(b.clone());
        b
    }

    pub(crate) fn bind(
        &self,
        pipeline: &wg::ComputePipeline,
        buffers: &[&wg::Buffer],
    ) -> wg::BindGroup {
        self.bind_with_table(pipeline, buffers, None)
    }

    /// A bind group with explicit binding numbers: inside a forward pass's session from the bind
    /// cache (made on first use), else a fresh one.
    pub(crate) fn bind_at(
        &self,
        pipeline: &wg::ComputePipeline,
        buffers: &[(u32, &wg::Buffer)],
    ) -> wg::BindGroup {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.binds_cached.load(Relaxed) {
            return self.bind_fresh(pipeline, buffers);
        }
        let key = (
            pipeline.clone(),
            buffers
                .iter()
                .map(|&(i, b)| (i, b.clone()))
                .collect::<Vec<_>>(),
        );
        let frees = self.frees.load(Relaxed);
        let mut cache = lock(&self.binds);
        if cache.stamp != frees || cache.map.len() >= super::BIND_CACHE_MAX {
            cache.map.clear();
            cache.stamp = frees;
        }
        if let Some(bg) = cache.map.get(&key) {
            return bg.clone();
        }
        let bg = self.bind_fresh(pipeline, buffers);
        cache.map.insert(key, bg.clone());
        bg
    }

    /// A new bind group with explicit binding numbers (buffers made for one call bind this way).
    pub(crate) fn bind_fresh(
        &self,
        pipeline: &wg::ComputePipeline,
        buffers: &[(u32, &wg::Buffer)],
    ) -> wg::BindGroup {
        #[cfg(test)]
        super::BIND_GROUPS.with(|n| n.set(n.get() + 1));
        let entries: Vec<wg::BindGroupEntry> = buffers
            .iter()
            .map(|&(i, b)| wg::BindGroupEntry {
                binding: i,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wg::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// [`Gpu::bind`], plus a low-bit type's lookup table at binding 7.
    fn bind_with_table(
        &self,
        pipeline: &wg::ComputePipeline,
        buffers: &[&wg::Buffer],
        table: Option<&wg::Buffer>,
    ) -> wg::BindGroup {
        let entries: Vec<(u32, &wg::Buffer)> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32, *b))
            .chain(table.map(|t| (7, t)))
            .collect();
        self.bind_at(pipeline, &entries)
    }

    /// Record: dequantise `count` blocks of `ty` starting at block `first` of `src` into `dst`
    /// (f32, from element 0).
    pub(crate) fn record_dequant(
        &self,
        pass: &mut wg::ComputePass<'_>,
        ty: GgmlType,
        src: &wg::Buffer,
        first: u32,
        count: u32,
        dst: &wg::Buffer,
    ) {
        let p = self.pipeline(Key::Block(Driver::Dequant, ty));
        let groups = count.div_ceil(BLOCK_WG).max(1);
        let gx = groups.min(self.max_groups());
        let gy = groups.div_ceil(gx);
        let params = self.uniform(&[first, count, gx * BLOCK_WG, 0]);
        let table = self.table(ty);
        let bg = self.bind_with_table(&p, &[src, dst, &params], table.as_ref());
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
        let p = self.pipeline(Key::Gemm {
            kmajor: g.kmajor,
            xkmajor: g.xkmajor,
            subtract: g.subtract,
            w: g.w,
        });
        let ldx = match (g.ldx, g.xkmajor) {
            (0, false) => g.k,
            (0, true) => g.n,
            (l, _) => l,
        };
        let params = self.uniform(&[
            g.n,
            g.m,
            g.k,
            g.w_off,
            g.ldw,
            g.y_off,
            g.ldy,
            g.x_off,
            ldx,
            g.x_bz,
            g.w_bz,
            g.y_bz,
            g.group.max(1),
            g.col0,
            g.perm_rows,
            g.perm_heads,
        ]);
        let table = match g.w {
            WStore::Blocks(ty) => self.table(ty),
            _ => None,
        };
        let bg = self.bind_with_table(&p, &[bufs[0], bufs[1], bufs[2], &params], table.as_ref());
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(g.m.div_ceil(64), g.n.div_ceil(64), g.batch.max(1));
    }
}

impl Gpu {
    /// Record `y[t·ldy + c(r)] = Σ_c W[r, c] · x[t·cols + c]` for every row `r` of the chunk `src` (blocks
    /// of `ty`, rows of `cols`) and `t < n`; `c(r)` as `matvec.wgsl` says.
    pub(crate) fn record_matvec(
        &self,
        pass: &mut wg::ComputePass<'_>,
        ty: GgmlType,
        bufs: [&wg::Buffer; 3],
        mv: Matvec,
    ) {
        let driver = if self.uses_subgroups() {
            Driver::MatvecSubgroups
        } else {
            Driver::Matvec
        };
        let p = self.pipeline(Key::Block(driver, ty));
        let gx = mv.rows.min(self.max_groups()).max(1);
        let gy = mv.rows.div_ceil(gx).max(1);
        let params = self.uniform(&[
            mv.rows,
            mv.cols,
            gx,
            mv.ldy,
            mv.col0,
            mv.perm_rows,
            mv.perm_heads,
            0,
        ]);
        let table = self.table(ty);
        let bg = self.bind_with_table(&p, &[bufs[0], bufs[1], bufs[2], &params], table.as_ref());
        pass.set_pipeline(&p);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(gx, gy, mv.n);
    }
}

/// One fused matvec's shape (rows and elements).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Matvec {
    pub rows: u32,
    pub cols: u32,
    pub n: u32,
    pub ldy: u32,
    pub col0: u32,
    pub perm_rows: u32,
    pub perm_heads: u32,
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
    /// x read transposed (see `gemm.wgsl`).
    pub xkmajor: bool,
    /// y −= the product.
    pub subtract: bool,
    /// How W is stored.
    pub w: WStore,
    /// Row stride of x (0: k).
    pub ldx: u32,
    /// Batches (the dispatch's z), their strides, and query heads per W batch.
    pub batch: u32,
    pub x_bz: u32,
    pub w_bz: u32,
    pub y_bz: u32,
    pub group: u32,
    /// First output column; interleaved-row permutation (rows, heads; 0 heads: none).
    pub col0: u32,
    pub perm_rows: u32,
    pub perm_heads: u32,
}
