//! Round-to-nearest quantization on the device (`shaders/quantize.wgsl` and `shaders/quant/*.wgsl`):
//! llama.cpp's reference quantizers of the legacy types, byte for byte as the CPU's, their arithmetic done
//! exactly in integer operations (`shaders/exact.wgsl`).

use ::wgpu as wg;

use super::kernels::{gpu_quantizes, Key};
use super::Gpu;
use crate::codecs::GgmlType;
use crate::{Error, Result};

/// Tensors quantized on the device so far (tests check the pipeline used it).
pub(crate) static QUANTIZED_ON_DEVICE: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

impl Gpu {
    /// Run `p` (bindings: `input`, an output of `out_words` words, params `[n, stride, 0, 0]`) over
    /// `invocations` and read the output back.
    fn run_and_read(
        &self,
        what: &str,
        p: &wg::ComputePipeline,
        input: &[u8],
        n: u32,
        invocations: u32,
        out_words: usize,
    ) -> Result<Vec<f32>> {
        let xb = self.upload_with("input", input, wg::BufferUsages::empty());
        let size = (out_words.max(1) * 4) as u64;
        let ob = self.device.create_buffer(&wg::BufferDescriptor {
            label: Some(what),
            size,
            usage: wg::BufferUsages::STORAGE | wg::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let (gx, gy, stride) = self.grid(invocations);
        let params = self.uniform(&[n, stride, 0, 0]);
        let bg = self.bind(p, &[&xb, &ob, &params]);
        self.record_and_read(what, out_words, |enc, staging| {
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(p);
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
            enc.copy_buffer_to_buffer(&ob, 0, staging, 0, size);
        })
    }

    /// `x` (rows of `ty`'s whole blocks, back to back) quantized to `ty` without an importance matrix:
    /// the bytes `ty`'s CPU quantizer writes.
    pub fn quantize_blocks(&self, ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
        let tr = ty.traits();
        if !gpu_quantizes(ty) || !x.len().is_multiple_of(tr.block_elems) {
            return Err(Error::Invalid(format!(
                "the GPU does not quantize {} values to {}",
                x.len(),
                tr.name
            )));
        }
        // Blocks per invocation: whole words.
        let per = if tr.block_bytes.is_multiple_of(4) {
            1
        } else {
            2
        };
        let words = per * tr.block_bytes / 4;
        let blocks = x.len() / tr.block_elems;
        let max_blocks = ((self.max_binding() as usize / 4 / tr.block_elems) / per * per).max(per);
        let mut out = Vec::with_capacity(blocks * tr.block_bytes);
        let _guard = self.begin()?;
        let p = self.pipeline(Key::Quant(ty));
        for b0 in (0..blocks).step_by(max_blocks) {
            let nb = max_blocks.min(blocks - b0);
            let src = &x[b0 * tr.block_elems..(b0 + nb) * tr.block_elems];
            let invs = nb.div_ceil(per) as u32;
            let vals = self.run_and_read(
                "quantizing",
                &p,
                bytemuck::cast_slice(src),
                nb as u32,
                invs,
                invs as usize * words,
            )?;
            let bytes: &[u8] = bytemuck::cast_slice(&vals);
            out.extend_from_slice(&bytes[..nb * tr.block_bytes]);
        }
        QUANTIZED_ON_DEVICE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// `exact.wgsl`'s `[a·b, a/b, a+b, a−b, a<b]` of each pair (bits; the quotient 0 where b = ±0).
    #[cfg(test)]
    pub(crate) fn exact_ops(&self, pairs: &[(f32, f32)]) -> Result<Vec<[u32; 5]>> {
        let flat: Vec<f32> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        let _guard = self.begin()?;
        let p = self.pipeline(Key::Op("exact_check", "main"));
        let n = pairs.len();
        let vals = self.run_and_read(
            "exact arithmetic",
            &p,
            bytemuck::cast_slice(&flat),
            n as u32,
            n as u32,
            n * 5,
        )?;
        Ok(vals
            .chunks_exact(5)
            .map(|c| std::array::from_fn(|i| c[i].to_bits()))
            .collect())
    }
}
