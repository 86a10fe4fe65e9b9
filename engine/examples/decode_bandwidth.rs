//! How close the CPU's decoding matvecs come to the machine's memory bandwidth: one token against every
//! linear of a model-shaped stack of weights of one type (Llama-3.2-1B's shapes by default), far larger than
//! the caches, in three ways interleaved round by round (this machine's throughput drifts by a third from
//! minute to minute, so only numbers from one run compare):
//!
//! - `repacked`: the decoding kernels over the repacked panels (`cpu_q8_repack`, AVX-512 VNNI machines);
//! - `rows`: the row-by-row dot products (`cpu_q8::vec_dot`, the path of every other machine; F16 rows'
//!   `simd::dot_f16`, the only path for F16);
//! - `read`: the same bytes XOR-ed together with 512-bit loads — what streaming them costs, the ceiling.
//!
//! ```text
//! cargo run --release -p quant_engine --example decode_bandwidth -- q6_k [LAYERS=16] [ROUNDS=10] [smollm2]
//! ```
//!
//! Weights are random bytes (timing does not depend on their values); `LAYERS = 0` takes two 512 × 2048
//! matrices that stay in cache, which measures the kernels' arithmetic instead of memory.
#![allow(unsafe_code)]

use quant_engine::backend::{cpu_q8, cpu_q8_repack, spin};
use quant_engine::codecs::GgmlType;
use quant_engine::tensor::{Bytes, TensorRef};
use std::time::Instant;

type Pass<'a> = Box<dyn Fn(&mut [f32]) + 'a>;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("q6_k", String::as_str);
    let ty = GgmlType::all()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .filter(|&t| cpu_q8::fused(t) || t == GgmlType::F16)
        .ok_or(format!(
            "{name}: not F16 or a type with integer dot products"
        ))?;
    let num =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (layers, rounds) = (num(1, 16), num(2, 10).max(1));
    let smol = args.get(3).is_some_and(|s| s == "smollm2");
    let shapes: &[(usize, usize)] = if layers == 0 {
        &[(512, 2048); 2]
    } else if smol {
        // SmolLM2-135M's decoder linears: small matrices, where each one's start and end cost the most.
        &[
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ]
    } else {
        &[
            (2048, 2048),
            (512, 2048),
            (512, 2048),
            (2048, 2048),
            (8192, 2048),
            (8192, 2048),
            (2048, 8192),
        ]
    };
    let mut ws = Vec::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..layers.max(1) {
        for &(rows, cols) in shapes {
            let row_bytes = ty.traits().row_bytes(cols).ok_or("row length")?;
            let mut raw = vec![0u8; rows * row_bytes];
            for c in raw.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                c.copy_from_slice(&seed.to_le_bytes()[..c.len()]);
            }
            ws.push(
                TensorRef::new("w", vec![rows, cols], ty, Bytes::owned(raw))
                    .map_err(|e| e.to_string())?,
            );
        }
    }
    let bytes: usize = ws.iter().map(|w| w.rows() * w.row_data(0).len()).sum();
    // One token's activations for each row length, as f32 (F16 rows) and as the type's 8-bit blocks.
    let xs: Vec<f32> = (0..8192).map(|i| (i as f32 * 0.37).sin()).collect();
    let f16 = ty == GgmlType::F16;
    let widths: std::collections::BTreeSet<usize> = ws.iter().map(TensorRef::cols).collect();
    let acts: std::collections::BTreeMap<usize, Option<cpu_q8::Q8Row>> = widths
        .iter()
        .map(|&c| (c, (!f16).then(|| cpu_q8::Q8Row::for_type(ty, &xs[..c]))))
        .collect();
    let x = |w: &TensorRef| &xs[..w.cols()];
    let act = |w: &TensorRef| &acts[&w.cols()];
    let repacked: Vec<_> = ws.iter().filter_map(cpu_q8_repack::repacked).collect();

    let mut passes: Vec<(&str, Pass)> = Vec::new();
    if repacked.len() == ws.len() {
        passes.push((
            "repacked",
            Box::new(|out: &mut [f32]| {
                for (w, rp) in ws.iter().zip(&repacked) {
                    let a = act(w)
                        .as_ref()
                        .map(std::slice::from_ref)
                        .unwrap_or_default();
                    rp.dot(a, &mut out[..w.rows()]);
                }
            }),
        ));
    }
    passes.push((
        "rows",
        Box::new(|out: &mut [f32]| {
            for w in &ws {
                let (x, a) = (x(w), act(w));
                tasks(w, out, &|r| {
                    r.map(|r| match a {
                        Some(a) => cpu_q8::vec_dot(ty, w.row_data(r), a),
                        None => quant_engine::simd::dot_f16(w.row_data(r), x),
                    })
                    .sum()
                });
            }
        }),
    ));
    if std::arch::is_x86_feature_detected!("avx512f") {
        passes.push((
            "read",
            Box::new(|out: &mut [f32]| {
                for w in &ws {
                    tasks(w, out, &|r| {
                        let len = w.row_data(0).len();
                        let first = w.row_data(r.start).as_ptr();
                        // SAFETY: a tensor's rows are one contiguous allocation; AVX-512F is present.
                        unsafe { xor_all(std::slice::from_raw_parts(first, r.len() * len)) as f32 }
                    });
                }
            }),
        ));
    }

    let mut out = vec![0f32; 8192];
    let mut rates = vec![Vec::new(); passes.len()];
    for _ in 0..rounds {
        for ((_, pass), r) in passes.iter().zip(&mut rates) {
            let t = Instant::now();
            pass(&mut out);
            r.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    println!(
        "{} × {layers} layers, {:.0} MB, {} threads:",
        ty.name(),
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
    for ((name, _), mut r) in passes.iter().zip(rates) {
        r.sort_by(f64::total_cmp);
        println!(
            "  {name:9} best {:5.1} GB/s  median {:5.1} GB/s",
            r[r.len() - 1],
            r[r.len() / 2]
        );
    }
    Ok(())
}

/// `f(rows)` for blocks of `w`'s rows on the spinning pool, as the row path splits them (each block one
/// contiguous run of bytes); each block's result into `out`.
fn tasks(w: &TensorRef, out: &mut [f32], f: &(dyn Fn(std::ops::Range<usize>) -> f32 + Sync)) {
    let rows = w.rows();
    let chunk = (rows / (4 * rayon::current_num_threads())).clamp(16, 128);
    let o = spin::Disjoint::new(&mut out[..rows]);
    spin::for_each(rows.div_ceil(chunk), &|ci| {
        let r = ci * chunk..((ci + 1) * chunk).min(rows);
        o.set(ci, f(r));
    });
}

/// Every 64-byte line of `v` (whole 256-byte groups) XOR-ed together, reduced to a number the caller keeps.
#[target_feature(enable = "avx512f")]
unsafe fn xor_all(v: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_si512(); 4];
    let p = v.as_ptr();
    for i in 0..v.len() / 256 {
        for (k, ak) in a.iter_mut().enumerate() {
            // SAFETY: inside `v`.
            *ak = _mm512_xor_si512(*ak, unsafe {
                _mm512_loadu_si512(p.add(i * 256 + k * 64).cast())
            });
        }
    }
    let x = _mm512_xor_si512(_mm512_xor_si512(a[0], a[1]), _mm512_xor_si512(a[2], a[3]));
    _mm512_reduce_add_epi64(x) as u64
}
