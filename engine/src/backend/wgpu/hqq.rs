//! HQQ's proximal solver on the device (`shaders/hqq_solve.wgsl`): the weight is uploaded once, group
//! after group, in chunks of whole groups no larger than a storage binding; each step of the solver is one
//! dispatch per chunk, one invocation per group, and only the groups' new zeros and error sums come back,
//! so the host's loop (`codecs::hqq::quantize_with`) keeps hqq's early stop and writes the codes.

use ::wgpu as wg;

use super::kernels::Key;
use super::Gpu;
use crate::codecs::hqq::{self, HqqParams, HqqQuantized};
use crate::Result;

/// Tensors whose HQQ solve ran on the device so far (tests check the writer used it).
static SOLVED_ON_DEVICE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tensors' HQQ solves have run on the device in this process.
pub fn solved_on_device() -> usize {
    SOLVED_ON_DEVICE.load(std::sync::atomic::Ordering::Relaxed)
}

impl Gpu {
    /// [`hqq::quantize`] with the solver's steps on the device. The zeros are summed in compensated f32
    /// instead of f64 and `pow` is the device's, so a code may differ from the CPU's where a value lies
    /// within rounding of a step's boundary.
    pub fn hqq_quantize(&self, w: &[f32], p: &HqqParams) -> Result<HqqQuantized> {
        let gs = p.group_size.max(1);
        let groups = p.groups(w.len());
        let per_chunk = ((self.max_binding() / 4) as usize / gs).clamp(1, groups.max(1));
        let grouped = hqq::group_major(w, p);
        let _guard = self.begin()?;
        let pipeline = self.pipeline(Key::Op("hqq_solve", "step"));
        let chunks: Vec<(usize, usize, wg::Buffer)> = (0..groups)
            .step_by(per_chunk)
            .map(|g0| {
                let ng = per_chunk.min(groups - g0);
                let data = &grouped[g0 * gs..(g0 + ng) * gs];
                let b = self.upload_with(
                    "hqq weight",
                    bytemuck::cast_slice(data),
                    wg::BufferUsages::empty(),
                );
                (g0, ng, b)
            })
            .collect();
        let [max_v, beta_inv, p_minus_1] = hqq::solver_constants(p);
        // Per chunk, made once for the solve: the zeros (rewritten each step), the step's output and the
        // inverse scales (fixed for the solve: uploaded at the first step).
        let storage = |label: &str, bytes: usize, usage: wg::BufferUsages| {
            self.device.create_buffer(&wg::BufferDescriptor {
                label: Some(label),
                size: bytes.max(4) as u64,
                usage: wg::BufferUsages::STORAGE | usage,
                mapped_at_creation: false,
            })
        };
        let bufs: Vec<(wg::Buffer, wg::Buffer)> = chunks
            .iter()
            .map(|&(_, ng, _)| {
                (
                    storage("hqq zeros", ng * 4, wg::BufferUsages::COPY_DST),
                    storage("hqq step", 2 * ng * 4, wg::BufferUsages::COPY_SRC),
                )
            })
            .collect();
        let mut scales: Vec<wg::Buffer> = Vec::new();
        let q = hqq::quantize_with(w, p, |s, z| {
            if scales.is_empty() {
                scales = chunks
                    .iter()
                    .map(|&(g0, ng, _)| {
                        let part = bytemuck::cast_slice(&s[g0..g0 + ng]);
                        self.upload_with("hqq scales", part, wg::BufferUsages::empty())
                    })
                    .collect();
            }
            let mut err = 0.0f64;
            for (((g0, ng, wb), (zb, ob)), sb) in chunks.iter().zip(&bufs).zip(&scales) {
                let (g0, ng) = (*g0, *ng);
                self.queue
                    .write_buffer(zb, 0, bytemuck::cast_slice(&z[g0..g0 + ng]));
                let (gx, gy, stride) = self.grid(ng as u32);
                let params = self.uniform(&[
                    ng as u32,
                    gs as u32,
                    stride,
                    0,
                    max_v.to_bits(),
                    beta_inv.to_bits(),
                    p_minus_1.to_bits(),
                    0,
                ]);
                let bg = self.bind(&pipeline, &[wb, sb, zb, ob, &params]);
                let size = (2 * ng * 4) as u64;
                let vals = self.record_and_read("HQQ solver step", 2 * ng, |enc, staging| {
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        pass.set_pipeline(&pipeline);
                        pass.set_bind_group(0, &bg, &[]);
                        pass.dispatch_workgroups(gx, gy, 1);
                    }
                    enc.copy_buffer_to_buffer(ob, 0, staging, 0, size);
                })?;
                z[g0..g0 + ng].copy_from_slice(&vals[..ng]);
                err += vals[ng..].iter().map(|&e| f64::from(e)).sum::<f64>();
            }
            Ok(err)
        })?;
        SOLVED_ON_DEVICE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(q)
    }
}
