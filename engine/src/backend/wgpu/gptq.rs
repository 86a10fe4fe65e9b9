//! GPTQ's lazy-batch updates on the device: a chunk of the weight's rows kept there transposed (`Wᵀ`,
//! `[cols, rows]`, so a block of columns is contiguous), each block's columns read back for the in-block
//! sweep on the host, and `W[:, i2..] −= E · U[i1..i2, i2..]` as one subtracting GEMM.

use ::wgpu as wg;

use super::kernels::Gemm;
use super::Gpu;
use crate::{Error, Result};

/// Rows `[rows, cols]` of a weight being swept, transposed on the device.
pub struct LazyColumns {
    buf: wg::Buffer,
    rows: usize,
    cols: usize,
}

impl Gpu {
    /// Rows of a `cols`-wide weight that fit one storage binding.
    pub fn lazy_rows_max(&self, cols: usize) -> usize {
        ((self.max_binding() / 4) as usize / cols.max(1)).max(1)
    }

    /// Upload `w` (`[rows, cols]` row-major) as `Wᵀ`.
    pub fn lazy_columns(&self, w: &[f32], rows: usize, cols: usize) -> Result<LazyColumns> {
        if w.len() != rows * cols || rows > self.lazy_rows_max(cols) {
            return Err(Error::Gpu(format!(
                "GPTQ: {rows} × {cols} weights do not fit a storage binding"
            )));
        }
        let mut t = vec![0f32; rows * cols];
        for (r, row) in w.chunks_exact(cols).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                t[c * rows + r] = v;
            }
        }
        let _guard = self.begin()?;
        let buf = self.checked("uploading a GPTQ weight", || {
            Ok(self.upload_with(
                "gptq weight",
                bytemuck::cast_slice(&t),
                wg::BufferUsages::COPY_SRC,
            ))
        })?;
        Ok(LazyColumns { buf, rows, cols })
    }

    /// `W[:, c0..c1]` as `[rows, c1 − c0]` row-major.
    pub fn lazy_read(&self, lc: &LazyColumns, c0: usize, c1: usize) -> Result<Vec<f32>> {
        let _guard = self.begin()?;
        self.read_columns(
            lc,
            self.device.create_command_encoder(&Default::default()),
            c0,
            c1,
        )
    }

    /// `W[:, i2..] −= E · U[i1..i2, i2..]` with `u_rows` = rows `i1..i2` of `U` (`[count, cols]`) and `e`
    /// (`[rows, count]`), then [`Gpu::lazy_read`] of `c0..c1`, in one submission.
    pub fn lazy_update_read(
        &self,
        lc: &LazyColumns,
        u_rows: &[f32],
        i2: usize,
        e: &[f32],
        (c0, c1): (usize, usize),
    ) -> Result<Vec<f32>> {
        let count = e.len() / lc.rows.max(1);
        if u_rows.len() != count * lc.cols || e.len() != lc.rows * count || i2 > lc.cols {
            return Err(Error::Invalid("GPTQ lazy update: sizes".into()));
        }
        let _guard = self.begin()?;
        let ub = self.upload_with(
            "U rows",
            bytemuck::cast_slice(u_rows),
            wg::BufferUsages::empty(),
        );
        let eb = self.upload_with("E", bytemuck::cast_slice(e), wg::BufferUsages::empty());
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            // Wᵀ[i2 + t, r] −= Σ_k U[i1 + k, i2 + t] · E[r, k]: x is U's rows read k-major.
            let g = Gemm {
                n: (lc.cols - i2) as u32,
                m: lc.rows as u32,
                k: count as u32,
                x_off: i2 as u32,
                ldx: lc.cols as u32,
                xkmajor: true,
                ldw: count as u32,
                y_off: (i2 * lc.rows) as u32,
                ldy: lc.rows as u32,
                subtract: true,
                ..Gemm::default()
            };
            self.record_gemm(&mut pass, [&ub, &eb, &lc.buf], g);
        }
        self.read_columns(lc, enc, c0, c1)
    }

    fn read_columns(
        &self,
        lc: &LazyColumns,
        enc: wg::CommandEncoder,
        c0: usize,
        c1: usize,
    ) -> Result<Vec<f32>> {
        let (rows, w) = (lc.rows, c1.min(lc.cols).saturating_sub(c0));
        if w == 0 {
            return Ok(Vec::new());
        }
        let t = self.read_after("GPTQ columns", w * rows, enc, |enc, staging| {
            enc.copy_buffer_to_buffer(
                &lc.buf,
                (c0 * rows * 4) as u64,
                staging,
                0,
                (w * rows * 4).max(4) as u64,
            );
        })?;
        let mut out = vec![0f32; rows * w];
        for (c, col) in t.chunks_exact(rows).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                out[r * w + c] = v;
            }
        }
        Ok(out)
    }
}
