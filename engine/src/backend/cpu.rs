//! The CPU backend's kernels: the matmul over weights in their stored form (tiles of rows dequantised into a
//! per-thread scratch and multiplied with the GEMM of `sgemm.rs` for prompts, dotted directly for decoding) and the small
//! f32 GEMMs of attention. SIMD primitives are in `crate::simd`.

use rayon::prelude::*;

use super::sgemm::{gemm_nt, WLayout};
use crate::codecs::GgmlType;
use crate::tensor::TensorRef;

/// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `n` activation rows `x` (`[n, cols]`), `out` is `[n, rows]`.
///
/// The weight stays in its stored type: tiles of rows are dequantised into a per-thread scratch and
/// multiplied with a GEMM (prompt processing) or dotted directly (decoding, `n == 1`).
pub fn matmul(w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "{}: activation size", w.name);
    assert_eq!(out.len(), n * rows, "{}: output size", w.name);
    if n == 1 {
        matvec(w, x, out);
        return;
    }
    if w.block_type() == Some(GgmlType::F16) {
        // Converted while packed: no f32 copy of the tile.
        f16_tiles(w, out, |rows, y, ldy| {
            // SAFETY: forwarded from `f16_tiles`.
            #[allow(unsafe_code)]
            unsafe {
                super::sgemm::gemm_nt_f16(n, cols, x, rows, y, ldy)
            }
        });
        return;
    }
    let tile = tile_rows(rows, cols, false);
    let dst = SharedOut(out.as_mut_ptr());
    super::spin::for_each(rows.div_ceil(tile), &|ti| {
        TILE.with_borrow_mut(|tile_buf| {
            let r0 = ti * tile;
            let r1 = (r0 + tile).min(rows);
            let m = r1 - r0;
            tile_buf.resize(m * cols, 0.0);
            for (i, row) in tile_buf.chunks_exact_mut(cols).enumerate() {
                w.dequant_row(r0 + i, row);
            }
            // SAFETY: tiles are disjoint column ranges r0..r1 of the n×rows output, which outlives
            // this parallel loop; each tile writes only its own columns.
            #[allow(unsafe_code)]
            unsafe {
                gemm_nt(n, m, cols, x, tile_buf, WLayout::RowMajor, dst.at(r0), rows);
            }
        });
    });
}

/// [`matmul`] of an F16 weight with `n` activation rows given as little-endian f16 bytes (`2·n·cols`): the
/// products `matmul` makes of their f32 values, bit for bit, reading half the bytes per tile (the llama-cpu
/// arithmetic, whose F16 activations are f16 values).
pub fn matmul_f16_acts(w: &TensorRef, x: &[u8], n: usize, out: &mut [f32]) {
    let cols = w.cols();
    assert_eq!(
        w.block_type(),
        Some(GgmlType::F16),
        "{}: an F16 weight",
        w.name
    );
    assert_eq!(x.len(), 2 * n * cols, "{}: activation size", w.name);
    assert_eq!(out.len(), n * w.rows(), "{}: output size", w.name);
    f16_tiles(w, out, |rows, y, ldy| {
        // SAFETY: forwarded from `f16_tiles`.
        #[allow(unsafe_code)]
        unsafe {
            super::sgemm::gemm_nt_f16_acts(n, cols, x, rows, y, ldy)
        }
    });
}

/// The tiles of an F16 weight's rows in parallel: `product(rows, y, ldy)` writes the tile's columns of
/// the output (`y` its first, `ldy` apart), and no other tile's.
fn f16_tiles(w: &TensorRef, out: &mut [f32], product: impl Fn(&[&[u8]], *mut f32, usize) + Sync) {
    let (rows, cols) = (w.rows(), w.cols());
    let tile = tile_rows(rows, cols, true);
    let dst = SharedOut(out.as_mut_ptr());
    // On the spinning pool, as the rest of a forward pass is: rayon's workers computing while the pool's
    // spun after attention put three busy threads on two cores.
    super::spin::for_each(rows.div_ceil(tile), &|ti| {
        let (r0, r1) = (ti * tile, (ti * tile + tile).min(rows));
        let f16_rows: Vec<&[u8]> = (r0..r1).map(|r| w.row_data(r)).collect();
        // Tiles are disjoint column ranges r0..r1 of the n × rows output, which outlives this loop.
        product(&f16_rows, dst.at(r0), rows);
    });
}

thread_local! {
    /// A worker's dequantised tile, kept from call to call: a fresh 256 KiB block per tile would be an
    /// mmap (the engine fixes glibc's mmap threshold at 128 KiB) and a page fault per 4 KiB of it.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn matvec(w: &TensorRef, x: &[f32], out: &mut [f32]) {
    let cols = w.cols();
    let chunk = (out.len() / (rayon::current_num_threads() * 8)).clamp(8, 256);
    out.par_chunks_mut(chunk).enumerate().for_each_init(
        || vec![0.0f32; cols],
        |scratch, (ci, o)| {
            for (k, v) in o.iter_mut().enumerate() {
                dot_row(w, ci * chunk + k, 1, x, scratch, |_, d| *v = d);
            }
        },
    );
}

/// Row `r` of `w` dotted with each of the `n` activation rows of `x` (`d(t, value)`), with the arithmetic
/// of decoding: an F16 row is dotted in place, any other row is dequantised into `scratch` once.
fn dot_row(
    w: &TensorRef,
    r: usize,
    n: usize,
    x: &[f32],
    scratch: &mut [f32],
    mut d: impl FnMut(usize, f32),
) {
    let cols = w.cols();
    match w.block_type() {
        Some(GgmlType::F16) => {
            for (t, xt) in x.chunks_exact(cols).take(n).enumerate() {
                d(t, crate::simd::dot_f16(w.row_data(r), xt));
            }
        }
        _ => {
            w.dequant_row(r, scratch);
            for (t, xt) in x.chunks_exact(cols).take(n).enumerate() {
                d(t, crate::simd::dot_f32(scratch, xt));
            }
        }
    }
}

/// [`matmul`] of `n` activation rows with the arithmetic of `n` one-row calls: every output equals what
/// `matmul(w, x_t, 1, ..)` gives for its row `x_t`, bit for bit, while each weight row is read once for all
/// `n` (a speculative decoder's verification pass).
pub fn matmul_as_rows(w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "{}: activation size", w.name);
    assert_eq!(out.len(), n * rows, "{}: output size", w.name);
    if n == 1 {
        matvec(w, x, out);
        return;
    }
    // Computed as [rows, n] (each task owns whole rows), then transposed into [n, rows].
    let mut by_row = vec![0.0f32; rows * n];
    let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(8, 256);
    by_row.par_chunks_mut(chunk * n).enumerate().for_each_init(
        || vec![0.0f32; cols],
        |scratch, (ci, o)| {
            for (k, ov) in o.chunks_exact_mut(n).enumerate() {
                dot_row(w, ci * chunk + k, n, x, scratch, |t, d| ov[t] = d);
            }
        },
    );
    for (r, ov) in by_row.chunks_exact(n).enumerate() {
        for (t, &v) in ov.iter().enumerate() {
            out[t * rows + r] = v;
        }
    }
}

/// Rows per tile of the f32 GEMM path (each worker dequantises, packs and multiplies one at a time).
fn tile_rows(rows: usize, cols: usize, fused: bool) -> usize {
    // Every tile streams all of the prompt's activations (n × cols floats, megabytes) through the cache
    // once, so tiles are tall: 128–256 rows (up to 4 MiB of dequantised weights per worker), as long as
    // each worker still gets two tiles. F16 rows are packed a column block at a time without a
    // dequantised copy (256 columns of 512 rows: 512 KiB), so their tiles are 512 rows at any width.
    let per_worker = rows
        .div_ceil(2 * rayon::current_num_threads().max(1))
        .next_multiple_of(16);
    let tall = if fused {
        512
    } else {
        ((4 << 20) / 4 / cols.max(1)).clamp(128, 256)
    };
    tall.min(per_worker).max(16).min(rows.max(1))
}

/// `y[n, m] = x[n, k] · w[m, k]ᵀ`, single-threaded (callers parallelise over tiles).
#[allow(unsafe_code)]
pub fn sgemm_nt(n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!(y.len() >= n * m);
    // SAFETY: `y` holds n rows of m (asserted) and is borrowed exclusively.
    unsafe { gemm_nt(n, m, k, x, w, WLayout::RowMajor, y.as_mut_ptr(), m) }
}

/// The output of a parallel matmul, written by disjoint tiles.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// The pointer `i` elements in (captured as a whole struct by closures, so it stays `Sync`).
    #[allow(unsafe_code)]
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: each tile writes a disjoint set of columns; see `TensorRef::matmul`.
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

/// `y[n, m] = x[n, k] · w[k, m]` with row-major `w`, single-threaded. For activations × activations
/// (attention).
#[allow(unsafe_code)]
pub fn sgemm_nn(n: usize, m: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= k * m && y.len() >= n * m);
    // SAFETY: `y` holds n rows of m (asserted) and is borrowed exclusively.
    unsafe { gemm_nt(n, m, k, x, w, WLayout::KMajor, y.as_mut_ptr(), m) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, w: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * m];
        for t in 0..n {
            for r in 0..m {
                y[t * m + r] = (0..k).map(|c| x[t * k + c] * w[r * k + c]).sum();
            }
        }
        y
    }

    #[test]
    fn matmul_matches_naive_for_batches_and_vectors() {
        // 1100 rows of 64 make three tiles, the last one partial.
        let (m, k) = (1100, 64);
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let t = TensorRef::from_f32("w", vec![m, k], &w).unwrap();
        for n in [1, 5] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let mut y = vec![0.0; n * m];
            matmul(&t, &x, n, &mut y);
            let want = naive(&x, n, &w, m, k);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }
}
