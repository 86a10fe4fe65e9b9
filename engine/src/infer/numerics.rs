//! How the forward pass rounds its intermediate values.
//!
//! [`Numerics::Exact`] keeps every activation in f32 (what transformers computes in float32). llama.cpp's CPU
//! backend does not: before each matmul it converts the activations to the weight type's "vec_dot type" and
//! multiplies in that form — F16 weights meet f16 activations, Q4_0/Q5_0/Q8_0/IQ4_NL weights meet Q8_0
//! blocks, Q4_1/Q5_1 Q8_1 blocks, the k-quants and IQ4_XS Q8_K blocks — and it keeps the KV cache in f16, so
//! the attention scores are `f16(q) · f16(k)` and the probabilities are rounded to f16 before they weight
//! `f16(v)`. [`Numerics::LlamaCpu`] applies the same roundings (the block quantizers below follow
//! `quantize_row_q8_0` on x86 and `quantize_row_q8_K_ref` to the bit) and then multiplies in f32, so its
//! results differ from llama.cpp's only by the order of the sums: perplexities agree to a few hundredths of
//! a percent, where exact f32 activations differ from llama.cpp by up to a few tenths on 2–3-bit files.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::codecs::GgmlType;
use crate::tensor::TensorRef;

/// The arithmetic of a forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Numerics {
    /// f32 activations throughout (the reference; what transformers computes in float32).
    #[default]
    Exact,
    /// Activations rounded as llama.cpp's CPU backend rounds them (vec_dot types, f16 KV cache).
    LlamaCpu,
}

impl Numerics {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::LlamaCpu => "llama-cpu",
        }
    }

    /// The fastest arithmetic on `backend`, the default of chat, generate and bench: llama.cpp's packed
    /// integer dot products on the CPU; exact f32 on the GPU, where a whole micro-batch (a decoded token
    /// too) is one submission only when no per-matmul rounding has to run on the host.
    pub fn fastest(backend: crate::backend::Backend) -> Self {
        match backend {
            crate::backend::Backend::Cpu => Self::LlamaCpu,
            crate::backend::Backend::Gpu => Self::Exact,
        }
    }

    /// Parse [`Numerics::name`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exact" => Some(Self::Exact),
            "llama-cpu" | "llama.cpp" => Some(Self::LlamaCpu),
            _ => None,
        }
    }
}

pub use crate::codecs::VecDotType;

/// `type_traits_cpu[ty].vec_dot_type` of ggml's CPU backend (the codec table's `vec_dot`).
pub fn vec_dot_type(ty: GgmlType) -> VecDotType {
    ty.traits().vec_dot
}

/// Round `x` (rows of `cols` values) in place to what llama.cpp multiplies with weights of type `ty`.
/// `cols` must be a multiple of the vec_dot type's block (it is, for any row length `ty` can store).
pub fn round_activations(ty: GgmlType, x: &mut [f32], cols: usize) {
    match vec_dot_type(ty) {
        VecDotType::F32 => {}
        VecDotType::F16 => round_f16(x),
        VecDotType::BF16 => {
            for v in x.iter_mut() {
                *v = half::bf16::from_f32(*v).to_f32();
            }
        }
        VecDotType::Q8_0 => {
            debug_assert!(cols.is_multiple_of(32));
            x.chunks_exact_mut(32).for_each(round_q8_0_block);
        }
        VecDotType::Q8K => {
            debug_assert!(cols.is_multiple_of(256));
            x.chunks_exact_mut(256).for_each(round_q8_k_block);
        }
    }
}

/// Round every value to the nearest f16 (ties to even, as F16C's `vcvtps2ph` does).
pub use crate::simd::round_f16;

/// One Q8_0 block as ggml-cpu's x86 `quantize_row_q8_0` makes it, read back: `d = amax/127` stored as f16,
/// `q = round_half_even(x · 127/amax)`, value `f16(d) · q`.
fn round_q8_0_block(b: &mut [f32]) {
    let (d, id) = q8_0_scales(b);
    let d = half::f16::from_f32(d).to_f32();
    for v in b.iter_mut() {
        *v = d * crate::simd::round_even(*v * id);
    }
}

/// A Q8_0/Q8_1 block's unrounded scale `d = amax/127` and the multiplier `127/amax` (0 for an all-zero block).
fn q8_0_scales(b: &[f32]) -> (f32, f32) {
    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (amax / 127.0, id)
}

/// One Q8_K block as `quantize_row_q8_K_ref` makes it, read back: the value of largest magnitude `max`
/// maps to −127, `q = min(127, nearest_int(−127/max · x))`, value `(1/iscale) · q` in f32.
fn round_q8_k_block(b: &mut [f32]) {
    let mut q = [0i8; 256];
    let d = crate::backend::cpu_q8::q8_k_block(b, &mut q);
    for (v, &q) in b.iter_mut().zip(&q) {
        *v = d * f32::from(q);
    }
}

/// Tokens up to which the CPU's llama-cpu matmul dots packed rows directly (decoding) rather than taking
/// the prompt paths of [`matmul_with`].
const FUSED_TOKENS: usize = 4;

/// `w.matmul(x)`, first rounding a copy of the activations to what llama.cpp's CPU backend multiplies
/// with `w`'s type when `numerics` asks for it (packed GPTQ weights have no llama.cpp counterpart).
pub(crate) fn matmul_with(
    backend: Backend,
    w: &TensorRef,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    numerics: Numerics,
) {
    // Decoding on the CPU: packed rows dotted with 8-bit activations in integers, as ggml does.
    if numerics == Numerics::LlamaCpu
        && backend == Backend::Cpu
        && n <= FUSED_TOKENS
        && fused_rows(w, x, n, out)
    {
        return;
    }
    // Prompts on the CPU: the repacked decoding panels, four tokens at a time, where the type has them (the
    // Q8_0 family, Q4_K, Q6_K, IQ4_XS; 5–20 % faster than tiles repacked per call, and the same numbers);
    // else integer tiles where the CPU has AVX-512 VNNI (the other k-quants); else rows dotted with four
    // tokens at a time where those kernels decode a block once for the four.
    if numerics == Numerics::LlamaCpu
        && backend == Backend::Cpu
        && ((crate::backend::cpu_q8_repack::repacked(w).is_some() && fused_rows(w, x, n, out))
            || crate::backend::cpu_q8_tile::matmul(w, x, n, out)
            || (w
                .block_type()
                .is_some_and(crate::backend::cpu_q8::many_tokens_fast)
                && fused_rows(w, x, n, out)))
    {
        return;
    }
    // F16 prompts on the CPU: the activations kept as the f16 values ggml multiplies with, in half the
    // bytes (every tile of rows re-reads them all); the same products.
    if numerics == Numerics::LlamaCpu
        && backend == Backend::Cpu
        && w.block_type() == Some(GgmlType::F16)
    {
        HALVES.with_borrow_mut(|h| {
            h.resize(2 * x.len(), 0);
            crate::simd::f32_to_f16(x, h);
            crate::backend::cpu::matmul_f16_acts(w, h, n, out);
        });
        return;
    }
    match numerics {
        Numerics::LlamaCpu
            if w.block_type()
                .is_some_and(|ty| vec_dot_type(ty) != VecDotType::F32) =>
        {
            let Some(ty) = w.block_type() else {
                unreachable!("guarded above")
            };
            ROUNDED.with_borrow_mut(|xr| {
                xr.clear();
                xr.extend_from_slice(x);
                round_activations(ty, xr, w.cols());
                backend.matmul(w, xr, n, out);
            });
            add_q8_1_sum_terms(w, x, n, out);
        }
        _ => backend.matmul(w, x, n, out),
    }
}

thread_local! {
    /// The rounded copy of a matmul's activations, kept from call to call (a prompt's activations are
    /// megabytes: a fresh copy per matmul is an mmap and a page fault per 4 KiB).
    static ROUNDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A matmul's activations as f16 bytes (F16 weights), kept likewise.
    static HALVES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[t, r] = W[r] · x[t]` for the `n` activation rows with the CPU's integer dot products (each row
/// quantized to the type's 8-bit activation type, each weight row read once for all `n`), or `false` when
/// `w`'s type has no integer kernel. Row `t`'s results do not depend on `n`: a batch computes every row
/// exactly as a one-row call does.
pub(crate) fn fused_rows(w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) -> bool {
    use crate::backend::cpu_q8;
    let cols = w.cols();
    if w.block_type() == Some(GgmlType::F16) {
        // ggml_vec_dot_f16: f16 activations, products summed in f32; the row is converted on the fly.
        let mut xr = x[..n * cols].to_vec();
        round_f16(&mut xr);
        if n == 1 {
            // Decoding: rows two at a time against the one token.
            f16_rows_pairs(w, &xr, out);
            return true;
        }
        // Several tokens per pass over a row: each 8 weights converted once for all of them.
        each_row_and_tokens(w, n, out, |row, t, res| {
            fn some<const T: usize>(row: &[u8], xs: &[f32], res: &mut [f32]) -> usize {
                let mut r = [0.0f32; T];
                crate::simd::dot_f16_n(row, xs, &mut r);
                res[..T].copy_from_slice(&r);
                T
            }
            let take = (n - t).min(cpu_q8::TOKENS);
            let xs = &xr[t * cols..(t + take) * cols];
            match take {
                4 => some::<4>(row, xs, res),
                3 => some::<3>(row, xs, res),
                2 => some::<2>(row, xs, res),
                _ => {
                    res[0] = crate::simd::dot_f16(row, xs);
                    1
                }
            }
        });
        return true;
    }
    let Some(ty) = w.block_type().filter(|&t| cpu_q8::fused(t)) else {
        return false;
    };
    let acts: Vec<cpu_q8::Q8Row> = if n > FUSED_TOKENS {
        // On the spinning pool, where the product runs next.
        crate::backend::spin::map(n, &|t| {
            cpu_q8::Q8Row::for_type(ty, &x[t * cols..(t + 1) * cols])
        })
    } else {
        x[..n * cols]
            .chunks_exact(cols)
            .map(|xt| cpu_q8::Q8Row::for_type(ty, xt))
            .collect()
    };
    // Rows repacked 16 at a time where the type has panels (the Q8_0 family, Q4_K, Q6_K, IQ4_XS; AVX-512 VNNI or
    // AVX2 kernels, the prompt tiles' arithmetic).
    if let Some(rp) = crate::backend::cpu_q8_repack::repacked(w) {
        rp.dot(&acts, &mut out[..n * w.rows()]);
        return true;
    }
    each_row_and_tokens(w, n, out, |row, t0, res| {
        if t0 + cpu_q8::TOKENS <= n {
            let xs: &[cpu_q8::Q8Row; cpu_q8::TOKENS] = acts[t0..t0 + cpu_q8::TOKENS]
                .try_into()
                .unwrap_or_else(|_| unreachable!("a slice of TOKENS"));
            cpu_q8::vec_dot4(ty, row, xs, res);
            cpu_q8::TOKENS
        } else {
            res[0] = cpu_q8::vec_dot(ty, row, &acts[t0]);
            1
        }
    });
    true
}

/// Weight rows per task of the row kernels: about four tasks per thread, 16 to 128 rows.
fn rows_per_task(rows: usize) -> usize {
    (rows / (4 * rayon::current_num_threads())).clamp(16, 128)
}

/// Row `r` (`start <= r < end`) of `w` by a task that owns those rows: sliced from the rows' one stored run
/// where they are stored in order (all but RoPE-interleaved Q/K; no division per row), else `row_data`.
fn chunk_rows<'w>(w: &'w TensorRef, start: usize, end: usize) -> impl Fn(usize) -> &'w [u8] {
    let rb = w.row_bytes();
    let run = w.rows_run(start, end);
    move |r| match run {
        Some(b) => &b[(r - start) * rb..(r - start + 1) * rb],
        None => w.row_data(r),
    }
}

/// `outs[k] = ws[k] · x` for one token (`x` one row), each exactly as [`fused_rows`] computes it, with the
/// activations rounded or quantized once per activation type and every matrix's tasks in one job of the
/// spinning pool: the decoding step of matrices that read the same input (Q, K and V; gate and up), which
/// then share one start and one end of a job, where each ends waiting for its slowest task. `false`, with
/// nothing written, where a matrix has no one-token integer or F16 path.
pub(crate) fn decode_group(ws: &[&TensorRef], x: &[f32], outs: &mut [&mut [f32]]) -> bool {
    use crate::backend::{cpu_q8, cpu_q8_repack, spin};
    let f16 = |w: &TensorRef| w.block_type() == Some(GgmlType::F16);
    let int = |w: &TensorRef| w.block_type().filter(|&t| cpu_q8::fused(t));
    if ws.len() != outs.len()
        || ws
            .iter()
            .any(|w| w.cols() != x.len() || !(f16(w) || int(w).is_some()))
    {
        return false;
    }
    let q8k = |ty: GgmlType| vec_dot_type(ty) == VecDotType::Q8K;
    let rounded = ws.iter().any(|w| f16(w)).then(|| {
        let mut v = x.to_vec();
        round_f16(&mut v);
        v
    });
    let q8_0 = ws
        .iter()
        .any(|w| int(w).is_some_and(|t| !q8k(t)))
        .then(|| cpu_q8::Q8Row::q8_0(x));
    let q8_k = ws
        .iter()
        .any(|w| int(w).is_some_and(q8k))
        .then(|| cpu_q8::Q8Row::q8_k(x));
    let mut parts: Vec<spin::Part> = Vec::with_capacity(ws.len());
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        let out: &mut [f32] = out;
        match (int(w), &rounded, &q8_0, &q8_k) {
            (None, Some(xr), _, _) => parts.push(f16_part(w, xr, out)),
            (Some(ty), _, a, b) => {
                let Some(act) = (if q8k(ty) { b } else { a }) else {
                    unreachable!("made above for every type present")
                };
                parts.push(match cpu_q8_repack::repacked(w) {
                    Some(rp) => rp.token_part(act, out),
                    None => rows_part(w, ty, act, out),
                });
            }
            _ => unreachable!("checked above"),
        }
    }
    spin::for_each_group(&parts);
    true
}

/// `out[r] = vec_dot(row r of w, act)` for one token as the tasks of a [`crate::backend::spin`] part (the
/// row path of [`fused_rows`]: the same tasks, the same numbers).
fn rows_part<'a>(
    w: &'a TensorRef,
    ty: GgmlType,
    act: &'a crate::backend::cpu_q8::Q8Row,
    out: &'a mut [f32],
) -> crate::backend::spin::Part<'a> {
    let rows = w.rows();
    let chunk = rows_per_task(rows);
    let o = crate::backend::spin::Disjoint::new(&mut out[..rows]);
    (
        rows.div_ceil(chunk),
        Box::new(move |ci| {
            let (start, end) = (ci * chunk, ((ci + 1) * chunk).min(rows));
            let row = chunk_rows(w, start, end);
            for r in start..end {
                o.set(r, crate::backend::cpu_q8::vec_dot(ty, row(r), act));
            }
        }),
    )
}

/// `out[r] = dot_f16(row r of w, x)` for one token, on the spinning pool, two rows per kernel call where
/// they are short ([`f16_pairs`]; the same bits as one row per call).
fn f16_rows_pairs(w: &TensorRef, x: &[f32], out: &mut [f32]) {
    let (tasks, task) = f16_part(w, x, out);
    crate::backend::spin::for_each(tasks, &*task);
}

/// [`f16_rows_pairs`] as the tasks of a [`crate::backend::spin`] part.
fn f16_part<'a>(
    w: &'a TensorRef,
    x: &'a [f32],
    out: &'a mut [f32],
) -> crate::backend::spin::Part<'a> {
    let rows = w.rows();
    let chunk = rows_per_task(rows);
    let pairs = f16_pairs(w.cols());
    let o = crate::backend::spin::Disjoint::new(&mut out[..rows]);
    (
        rows.div_ceil(chunk),
        Box::new(move |ci| {
            let (start, end) = (ci * chunk, ((ci + 1) * chunk).min(rows));
            let row = chunk_rows(w, start, end);
            let mut r = start;
            while pairs && r + 2 <= end {
                let (a, b) = crate::simd::dot_f16_2(row(r), row(r + 1), x);
                o.set(r, a);
                o.set(r + 1, b);
                r += 2;
            }
            while r < end {
                o.set(r, crate::simd::dot_f16(row(r), x));
                r += 1;
            }
        }),
    )
}

/// Whether F16 rows of `cols` values are dotted two at a time: where a pair shares a 4 KiB page. Longer
/// rows are read one at a time, in one stream: two streams a page or more apart read 15–20 % slower on
/// the 1B shape (2048 and 8192 columns, 2 threads, both with the 8 KB prefetch), while SmolLM2's 576-column
/// rows gain 2–3 % from pairs (the reduction of each row shared by two).
fn f16_pairs(cols: usize) -> bool {
    4 * cols <= 4096
}

/// Tokens a task takes through all of its rows before the next ones (their 8-bit activations, up to
/// ~600 KB at 8192 columns, stay in the L2 cache while the rows' blocks come from L1).
const TOKEN_GROUP: usize = 64;

/// `out[t, r] = dot(row r of w, t)` for the `n` tokens, on the spinning pool: each task takes a block of
/// weight rows and goes through the tokens a group at a time; `dot(row, t0, res)` fills `res` from token
/// `t0` on and says how many it did.
fn each_row_and_tokens(
    w: &TensorRef,
    n: usize,
    out: &mut [f32],
    dot: impl Fn(&[u8], usize, &mut [f32; crate::backend::cpu_q8::TOKENS]) -> usize + Sync,
) {
    use crate::backend::spin;
    let rows = w.rows();
    let chunk = rows_per_task(rows);
    let o = spin::Disjoint::new(&mut out[..n * rows]);
    spin::for_each(rows.div_ceil(chunk), &|ci| {
        let mut res = [0.0f32; crate::backend::cpu_q8::TOKENS];
        let (start, end) = (ci * chunk, ((ci + 1) * chunk).min(rows));
        let chunk_row = chunk_rows(w, start, end);
        for g0 in (0..n).step_by(TOKEN_GROUP) {
            let g1 = (g0 + TOKEN_GROUP).min(n);
            for r in start..end {
                let row = chunk_row(r);
                let mut t = g0;
                while t < g1 {
                    let done = dot(row, t, &mut res).min(g1 - t);
                    for (k, &v) in res[..done].iter().enumerate() {
                        o.set((t + k) * rows + r, v);
                    }
                    t += done;
                }
            }
        }
    });
}

/// The part of llama.cpp's Q4_1/Q5_1 × Q8_1 dot product that rounded activations cannot express: the weight
/// block's offset `m` multiplies the activation block's stored sum `s = f16(d · Σq)` (with the unrounded
/// `d`), where the dequantised product has `f16(d) · Σq`. Adds `Σ_b m[r, b] · (s_b − f16(d_b) · Σq_b)` to
/// `out[t, r]` for the `n` rows of the *unrounded* activations `x`. A no-op for other types.
pub(crate) fn add_q8_1_sum_terms(w: &TensorRef, x: &[f32], n: usize, out: &mut [f32]) {
    let block_bytes = match w.block_type() {
        Some(ty @ (GgmlType::Q4_1 | GgmlType::Q5_1)) => ty.traits().block_bytes,
        _ => return,
    };
    let (rows, cols) = (w.rows(), w.cols());
    let blocks = cols / 32;
    // δ[t, b] per activation row and block.
    let mut delta = vec![0f32; n * blocks];
    for (xb, dl) in x.chunks_exact(32).zip(delta.iter_mut()) {
        let (d, id) = q8_0_scales(xb);
        let sq: f32 = xb.iter().map(|v| crate::simd::round_even(v * id)).sum();
        let s = half::f16::from_f32(d * sq).to_f32();
        *dl = s - half::f16::from_f32(d).to_f32() * sq;
    }
    let mut m = vec![0f32; blocks];
    for r in 0..rows {
        let data = w.row_data(r);
        for (b, mv) in m.iter_mut().enumerate() {
            let o = b * block_bytes + 2;
            *mv = half::f16::from_le_bytes([data[o], data[o + 1]]).to_f32();
        }
        for t in 0..n {
            let dl = &delta[t * blocks..(t + 1) * blocks];
            out[t * rows + r] += m.iter().zip(dl).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One job for several matrices of mixed types (repacked panels, k panels, rows, F16) gives each the
    /// bits of its own one-token product.
    #[test]
    fn a_decoding_group_equals_each_matrix_alone() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let cols = 512;
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4K,
            GgmlType::Q3K,
            GgmlType::Iq2Xs,
            GgmlType::F16,
            GgmlType::Q8_0,
        ];
        let ws: Vec<TensorRef> = types
            .iter()
            .enumerate()
            .map(|(i, &ty)| {
                let rows = 40 + 24 * i;
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut raw = vec![0u8; rows * ty.traits().row_bytes(cols).expect("row")];
                for (r, out) in w
                    .chunks_exact(cols)
                    .zip(raw.chunks_exact_mut(ty.traits().row_bytes(cols).expect("row")))
                {
                    ty.quantize(r, out, None);
                }
                TensorRef::new("w", vec![rows, cols], ty, crate::tensor::Bytes::owned(raw))
                    .expect("tensor")
            })
            .collect();
        let refs: Vec<&TensorRef> = ws.iter().collect();
        let mut got: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; w.rows()]).collect();
        let mut outs: Vec<&mut [f32]> = got.iter_mut().map(Vec::as_mut_slice).collect();
        assert!(decode_group(&refs, &x, &mut outs));
        for ((w, g), ty) in ws.iter().zip(&got).zip(types) {
            let mut want = vec![0f32; w.rows()];
            assert!(fused_rows(w, &x, 1, &mut want), "{ty:?}");
            let same = g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{ty:?}: the group's products differ");
        }
        // A type without a one-token path declines the whole group, writing nothing.
        let bf = TensorRef::from_f32("b", vec![8, cols], &vec![0.5; 8 * cols]).expect("f32");
        let mut o = vec![f32::NAN; 8];
        assert!(!decode_group(
            &[&bf, refs[0]],
            &x,
            &mut [&mut o, &mut got[0]]
        ));
        assert!(o.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn q8_0_rounding_follows_ggml() {
        // amax 254 → d = 2, 127/amax = 0.5: ties go to even (−63.5 → −64, 0.5 → 0, 1.5 → 2, 2.5 → 2).
        let mut b = [0.0f32; 32];
        b[..5].copy_from_slice(&[254.0, -127.0, 1.0, 3.0, 5.0]);
        round_activations(GgmlType::Q4_0, &mut b, 32);
        assert_eq!(&b[..5], &[254.0, -128.0, 0.0, 4.0, 4.0]);
        assert!(b[5..].iter().all(|&v| v == 0.0));
        // d is stored as f16: amax 1 gives d = f16(1/127), not 1/127.
        let mut c = [0.0f32; 32];
        c[0] = 1.0;
        c[1] = 0.5;
        round_activations(GgmlType::Iq4Nl, &mut c, 32);
        let d = half::f16::from_f32(1.0 / 127.0).to_f32();
        assert_eq!(c[0], d * 127.0);
        assert_eq!(c[1], d * 64.0); // 63.5 → 64
        assert_ne!(c[0], 1.0);
        // An all-zero block stays zero (no division by zero).
        let mut z = [0.0f32; 32];
        round_activations(GgmlType::Q8_0, &mut z, 32);
        assert!(z.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q8_k_rounding_follows_ggml() {
        let mut b: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 50.0).collect();
        let orig = b.clone();
        round_activations(GgmlType::Q4K, &mut b, 256);
        // The extreme (+3.1 at i = 255) maps to −127 with iscale = −127/3.1.
        let iscale = -127.0f32 / orig[255];
        for (i, (&r, &o)) in b.iter().zip(&orig).enumerate() {
            let q = (iscale * o).round_ties_even().min(127.0);
            // ggml stores d = 1/iscale and reads back d·q (not q/iscale, which rounds differently).
            assert_eq!(r, (1.0 / iscale) * q, "element {i}");
            assert!((r - o).abs() <= 0.5 / iscale.abs() + 1e-6);
        }
        // The largest magnitude is reproduced up to f32 rounding.
        assert!((b[255] - orig[255]).abs() < 1e-6);
        // Types that keep f32 activations are untouched; F16 rounds to f16.
        let mut f = vec![0.1f32, 1.0 / 3.0];
        round_activations(GgmlType::F32, &mut f, 2);
        assert_eq!(f, [0.1, 1.0 / 3.0]);
        round_activations(GgmlType::F16, &mut f, 2);
        assert_eq!(f[1], half::f16::from_f32(1.0 / 3.0).to_f32());
        assert_ne!(f[1], 1.0 / 3.0);
    }

    /// ggml's own CPU matmuls (tests/fixtures/numerics/make_mul_mat_fixture.py: `ggml_mul_mat` of a weight in
    /// each type with f32 activations, which ggml converts to the vec_dot type) against ours in llama-cpu
    /// arithmetic: equal up to the order of the sums, where exact f32 activations are ~1e-3 away.
    #[test]
    fn llama_cpu_matmuls_equal_ggml() {
        use crate::model::gguf::GgufFile;
        use crate::tensor::Bytes;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/numerics/mul_mat.gguf");
        let (g, map) = GgufFile::read(&path).expect("read fixture");
        let f32s = |name: &str| -> (Vec<f32>, Vec<usize>) {
            let t = g.tensor(name).expect(name);
            assert_eq!(t.ggml_type, 0, "{name}");
            let v = map[g.tensor_range(t).expect("range")]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (v, t.ne.iter().map(|&d| d as usize).collect())
        };
        let mut seen = Vec::new();
        let mut tiled = 0;
        for t in g.tensors().iter().filter(|t| t.name.ends_with(".w")) {
            let ty = t.ty().expect("type");
            let stem = t.name.trim_end_matches(".w");
            let (k, m) = (t.ne[0] as usize, t.ne[1] as usize);
            let raw = map[g.tensor_range(t).expect("range")].to_vec();
            let w = TensorRef::new(stem, vec![m, k], ty, Bytes::owned(raw)).expect("weight");
            let (x, xne) = f32s(&format!("{stem}.x"));
            let (y, _) = f32s(&format!("{stem}.y"));
            let n = xne[1];
            let scale = y.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = |numerics| {
                let mut out = vec![0f32; n * m];
                matmul_with(Backend::Cpu, &w, &x, n, &mut out, numerics);
                out.iter()
                    .zip(&y)
                    .fold(0f32, |a, (o, e)| a.max((o - e).abs()))
                    / scale
            };
            let (llama, exact) = (err(Numerics::LlamaCpu), err(Numerics::Exact));
            assert!(llama < 1e-6, "{stem}: llama-cpu {llama:e} from ggml");
            // The prompt path's integer tiles (where the CPU has them) too.
            let mut out = vec![0f32; n * m];
            if crate::backend::cpu_q8_tile::matmul(&w, &x, n, &mut out) {
                let tiles = out
                    .iter()
                    .zip(&y)
                    .fold(0f32, |a, (o, e)| a.max((o - e).abs()))
                    / scale;
                assert!(tiles < 1e-6, "{stem}: integer tiles {tiles:e} from ggml");
                tiled += 1;
            }
            assert!(
                exact > 3e-5,
                "{stem}: exact {exact:e} from ggml (the fixture must show rounding)"
            );
            seen.push(ty);
        }
        assert_eq!(seen.len(), 21, "{seen:?}");
        // The Q8_0 family and the k-quants with IQ4_XS.
        let takes = seen
            .iter()
            .filter(|&&t| crate::backend::cpu_q8_tile::supports(t))
            .count();
        assert_eq!(takes, 12);
        let want = if crate::backend::cpu_q8_tile::available() {
            12
        } else {
            0
        };
        assert_eq!(tiled, want);
    }

    #[test]
    fn names_round_trip() {
        for n in [Numerics::Exact, Numerics::LlamaCpu] {
            assert_eq!(Numerics::parse(n.name()), Some(n));
        }
        assert_eq!(Numerics::parse("fast"), None);
    }
}
