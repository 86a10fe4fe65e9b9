//! ExLlamaV2's quantizer (`shared/reference/exl2.md` §3.3–§4), written from its description:
//!
//! * **Options** ([`QParams`]): a list of `(bits, proportion, group size)`, widths descending; the input rows
//!   (act-order permuted) are cut into groups — each width gets `ceil(min(K·p, left)/gs)` groups in turn, the
//!   last group of the last width possibly short ([`QParams::groups`]). ExLlamaV2's option tables for attention,
//!   MLP and the output head are here as data ([`attn_options`], [`mlp_options`], [`head_option`]).
//! * **Cost** ([`QParams::total_bits`]): codes, 4-bit scales per (group, column), an fp16 maximum and two int16
//!   per group, an int32 per input row, fp16 bias — exactly 8 × the bytes the layer takes in the file.
//! * **Adaptive GPTQ** ([`Exl2Prepared::quantize`]): act-order, damping `0.12 · mean(diag H)`, the lazy batch
//!   being the group; at each group start the scales are searched on the error-updated rows: per output column
//!   `base = max|w| / ((2^b − 1)/2)`, `M = max base`, a 4-bit code `clamp(round(16·√(base/M)), 1, 16)`, then the
//!   multiplier `p ∈ {0.70 + 0.5·j/96}` minimising `Σ |ŵ − w|^3.5`; `q_scale_max = f16(M·p)` and the
//!   weights rounded against the exact fp16 scales the file implies.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatRef, Par};
use rayon::prelude::*;
use std::borrow::Cow;

use super::gptq::{hessian_inverse_upper, row_major_mut, GptqOptions, Hessian};
use crate::codecs::exl2::{exl2_scale, exl2_value, pack_exl2, Exl2Packed};
use crate::simd::round_even;
use crate::{Error, Result};

/// One quantization option of a linear: `(bits, proportion, group size)` parts, widths descending.
#[derive(Clone, Debug, PartialEq)]
pub struct QParams {
    pub parts: Vec<(u8, f64, usize)>,
}

fn qp(parts: &[(u8, f64, usize)]) -> QParams {
    QParams {
        parts: parts.to_vec(),
    }
}

impl QParams {
    /// ExLlamaV2's description: `0.05:3b_64g/0.95:2b_64g s4`.
    pub fn desc(&self) -> String {
        let p: Vec<String> = self
            .parts
            .iter()
            .map(|(b, p, g)| format!("{p}:{b}b_{g}g"))
            .collect();
        format!("{} s4", p.join("/"))
    }

    /// `(bits, rows)` of every group in permuted row order, for `k` input rows.
    pub fn groups(&self, k: usize) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let (mut left, mut row) = (k as i64, 0usize);
        for &(b, p, gs) in &self.parts {
            let want = (k as f64 * p).min(left.max(0) as f64);
            let g = (want / gs as f64).ceil() as usize;
            for _ in 0..g {
                if row >= k {
                    break;
                }
                let rows = gs.min(k - row);
                out.push((b, rows));
                row += rows;
            }
            left -= (g * gs) as i64;
        }
        out
    }

    /// Bits the layer takes in the file: `(k, n_pad)` its shape (`n_pad` the output width rounded up to 32),
    /// `bias` its bias length (0 without).
    pub fn total_bits(&self, k: usize, n_pad: usize, bias: usize) -> u64 {
        let groups = self.groups(k);
        let g = groups.len() as u64;
        let codes: u64 = groups
            .iter()
            .map(|&(b, r)| r as u64 * n_pad as u64 * u64::from(b))
            .sum();
        codes + 16 * g + 32 * g + 4 * g * n_pad as u64 + 32 * k as u64 + 16 * bias as u64
    }

    /// ExLlamaV2's `measurement.json` form: `{"group_size": {"3": 64, …}, "bits": […], "bits_prop": […],
    /// "scale_bits": 4}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut gs = serde_json::Map::new();
        for (b, _, g) in &self.parts {
            gs.insert(b.to_string(), serde_json::json!(g));
        }
        serde_json::json!({
            "group_size": gs,
            "bits": self.parts.iter().map(|p| p.0).collect::<Vec<_>>(),
            "bits_prop": self.parts.iter().map(|p| p.1).collect::<Vec<_>>(),
            "scale_bits": 4,
        })
    }

    /// Read the JSON form (group size as a number, a list parallel to `bits`, or a map keyed by bits).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let bad = |d: &str| Error::Invalid(format!("EXL2 option {v}: {d}"));
        let bits: Vec<u8> = v["bits"]
            .as_array()
            .ok_or_else(|| bad("no bits list"))?
            .iter()
            .map(|b| b.as_u64().map(|b| b as u8))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("bits must be integers"))?;
        let props: Vec<f64> = v["bits_prop"]
            .as_array()
            .ok_or_else(|| bad("no bits_prop list"))?
            .iter()
            .map(serde_json::Value::as_f64)
            .collect::<Option<_>>()
            .ok_or_else(|| bad("bits_prop must be numbers"))?;
        if bits.is_empty() || bits.len() != props.len() {
            return Err(bad("bits and bits_prop differ in length"));
        }
        if v.get("scale_bits")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(4)
            != 4
        {
            return Err(bad("only 4-bit scales exist"));
        }
        let gs_of = |i: usize, b: u8| -> Option<usize> {
            let g = &v["group_size"];
            let x = match g {
                serde_json::Value::Number(_) => g.as_u64(),
                serde_json::Value::Array(a) => a.get(i).and_then(serde_json::Value::as_u64),
                serde_json::Value::Object(m) => {
                    m.get(&b.to_string()).and_then(serde_json::Value::as_u64)
                }
                _ => None,
            }?;
            usize::try_from(x).ok()
        };
        let mut parts = Vec::with_capacity(bits.len());
        for (i, (&b, &p)) in bits.iter().zip(&props).enumerate() {
            let g = gs_of(i, b).ok_or_else(|| bad("no group size for a width"))?;
            parts.push((b, p, g));
        }
        let q = QParams { parts };
        q.validate()?;
        Ok(q)
    }

    /// Widths EXL2 stores, descending; group sizes multiples of 32; proportions summing to 1.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(Error::Invalid(format!("EXL2 option {}: {d}", self.desc())));
        let mut last = u8::MAX;
        for &(b, p, g) in &self.parts {
            if !crate::codecs::exl2::EXL2_BITS.contains(&b) || b > last {
                return bad(format!("bit width {b} (2, 3, 4, 5, 6 or 8, descending)"));
            }
            if g == 0 || g % 32 != 0 || g > 4096 {
                return bad(format!("group size {g} (a multiple of 32)"));
            }
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("proportion {p}"));
            }
            last = b;
        }
        let sum: f64 = self.parts.iter().map(|p| p.1).sum();
        if (sum - 1.0).abs() > 1e-6 {
            return bad(format!("proportions sum to {sum}"));
        }
        Ok(())
    }
}

/// ExLlamaV2's 19 attention options: `[q, k, v, o]` per row, cheapest first (`qparams_attn`).
pub fn attn_options() -> Vec<[QParams; 4]> {
    let a = |b1: u8, p1: f64, b2: u8, g: usize| qp(&[(b1, p1, g), (b2, 1.0 - p1, g)]);
    let one = |b: u8, g: usize| qp(&[(b, 1.0, g)]);
    let same = |x: QParams| [x.clone(), x.clone(), x.clone(), x];
    let qk = |x: QParams, v: QParams, o: QParams| [x.clone(), x, v, o];
    vec![
        same(qp(&[(3, 0.05, 64), (2, 0.95, 64)])),
        qk(a(3, 0.1, 2, 64), a(3, 0.25, 2, 64), a(3, 0.1, 2, 64)),
        qk(a(3, 0.1, 2, 64), a(4, 0.1, 3, 128), a(3, 0.1, 2, 64)),
        qk(a(3, 0.1, 2, 64), a(4, 0.1, 3, 128), a(4, 0.1, 3, 128)),
        same(a(4, 0.1, 3, 128)),
        qk(a(4, 0.1, 3, 128), a(4, 0.1, 3, 64), a(4, 0.1, 3, 128)),
        same(one(4, 128)),
        qk(one(4, 128), one(4, 64), one(4, 128)),
        qk(one(4, 64), one(4, 32), one(4, 64)),
        same(one(4, 32)),
        qk(a(5, 0.1, 4, 128), a(5, 0.1, 4, 64), a(5, 0.1, 4, 128)),
        qk(a(5, 0.1, 4, 64), a(5, 0.1, 4, 32), a(5, 0.1, 4, 64)),
        qk(a(5, 0.1, 4, 64), one(5, 64), a(5, 0.1, 4, 64)),
        qk(a(5, 0.1, 4, 32), one(5, 32), a(5, 0.1, 4, 32)),
        qk(a(6, 0.1, 5, 128), one(6, 128), a(6, 0.1, 5, 128)),
        qk(a(6, 0.1, 5, 32), one(6, 32), a(6, 0.1, 5, 32)),
        same(one(6, 128)),
        qk(one(6, 32), one(8, 32), one(6, 32)),
        same(one(8, 128)),
    ]
}

/// ExLlamaV2's 17 MLP options: `[gate, up, down]` per row (`qparams_mlp`).
pub fn mlp_options() -> Vec<[QParams; 3]> {
    let a = |b1: u8, p1: f64, b2: u8, g: usize| qp(&[(b1, p1, g), (b2, 1.0 - p1, g)]);
    let one = |b: u8, g: usize| qp(&[(b, 1.0, g)]);
    let d3 = |b: [u8; 3], p: [f64; 3], g: [usize; 3]| {
        qp(&[(b[0], p[0], g[0]), (b[1], p[1], g[1]), (b[2], p[2], g[2])])
    };
    let d2 = |b: [u8; 2], p: [f64; 2], g: [usize; 2]| qp(&[(b[0], p[0], g[0]), (b[1], p[1], g[1])]);
    let low = d3([6, 3, 2], [0.05, 0.2, 0.75], [32, 64, 64]);
    vec![
        [a(3, 0.05, 2, 64), a(3, 0.05, 2, 64), low.clone()],
        [a(3, 0.1, 2, 64), a(3, 0.25, 2, 64), low],
        [
            a(3, 0.1, 2, 64),
            a(3, 0.3, 2, 64),
            d2([5, 3], [0.05, 0.95], [32, 32]),
        ],
        [
            a(3, 0.1, 2, 64),
            a(3, 0.3, 2, 64),
            d2([5, 4], [0.05, 0.95], [32, 32]),
        ],
        [
            a(4, 0.1, 3, 128),
            a(4, 0.25, 3, 128),
            d3([8, 4, 3], [0.05, 0.1, 0.85], [32, 128, 128]),
        ],
        [
            a(4, 0.1, 3, 32),
            a(4, 0.25, 3, 32),
            d3([8, 4, 3], [0.05, 0.1, 0.85], [32, 32, 32]),
        ],
        [
            a(4, 0.1, 3, 32),
            a(4, 0.25, 3, 32),
            d2([8, 4], [0.05, 0.95], [32, 128]),
        ],
        [one(4, 128), one(4, 32), d2([8, 4], [0.05, 0.95], [32, 128])],
        [one(4, 32), one(4, 32), d2([8, 4], [0.05, 0.95], [32, 32])],
        [
            a(5, 0.1, 4, 128),
            a(5, 0.25, 4, 128),
            d3([8, 5, 4], [0.05, 0.1, 0.85], [32, 128, 128]),
        ],
        [
            a(5, 0.1, 4, 32),
            a(5, 0.25, 4, 32),
            d3([8, 5, 4], [0.05, 0.1, 0.85], [32, 32, 32]),
        ],
        [
            a(6, 0.1, 5, 128),
            a(6, 0.25, 5, 128),
            d3([8, 6, 5], [0.05, 0.1, 0.85], [32, 128, 128]),
        ],
        [
            a(6, 0.1, 5, 32),
            a(6, 0.25, 5, 32),
            d3([8, 6, 5], [0.05, 0.1, 0.85], [32, 32, 32]),
        ],
        [
            one(6, 128),
            one(6, 128),
            d2([8, 6], [0.05, 0.95], [32, 128]),
        ],
        [a(8, 0.1, 6, 128), a(8, 0.1, 6, 128), a(8, 0.15, 6, 128)],
        [a(8, 0.1, 6, 128), a(8, 0.1, 6, 128), one(8, 128)],
        [one(8, 128), one(8, 128), one(8, 128)],
    ]
}

/// The output head's option for `head_bits` 2, 3, 4, 5, 6 or 8 (`qparams_headoptions`).
pub fn head_option(head_bits: u8) -> Option<QParams> {
    Some(match head_bits {
        2 => qp(&[(4, 0.3, 32), (2, 0.7, 32)]),
        3 => qp(&[(4, 0.15, 32), (3, 0.85, 32)]),
        4 => qp(&[(6, 0.15, 32), (4, 0.85, 32)]),
        5 => qp(&[(6, 0.15, 128), (5, 0.85, 128)]),
        6 => qp(&[(8, 0.15, 128), (6, 0.85, 128)]),
        8 => qp(&[(8, 1.0, 128)]),
        _ => return None,
    })
}

/// The damping ExLlamaV2 uses (`percdamp`), added again cumulatively when a factorisation fails.
pub const EXL2_DAMP: f32 = 0.12;

/// The act-order permutation and `chol_upper(H⁻¹)` of one input, shared by every option of the linears
/// that read it.
pub struct Exl2Prepared {
    k: usize,
    /// Processing position → input feature.
    perm: Vec<usize>,
    /// Row-major `[k, k]`, processing order.
    u: Vec<f32>,
    /// Inputs no calibration token reached (their weights are zeroed, as GPTQ does).
    dead: Vec<bool>,
    /// Where the lazy-batch updates run.
    backend: crate::backend::Backend,
}

/// One quantized linear: the packed tensors and the weights they decode to.
pub struct Exl2Quantized {
    pub packed: Exl2Packed,
    /// `[n, k]`, original order, what the file decodes to.
    pub dequantised: Vec<f32>,
}

impl Exl2Prepared {
    /// Factorise `h` (its permutation by decreasing `diag(H)`).
    pub fn new(h: &Hessian) -> Result<Self> {
        let k = h.cols();
        if h.nsamples() == 0 {
            return Err(Error::Invalid(
                "EXL2: the Hessian has no calibration samples".into(),
            ));
        }
        let m = h.matrix();
        let mut diag: Vec<f64> = (0..k).map(|i| m[i * k + i]).collect();
        let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
        for (d, &z) in diag.iter_mut().zip(&dead) {
            if z {
                *d = 1.0;
            }
        }
        let mut perm: Vec<usize> = (0..k).collect();
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        let opts = GptqOptions {
            damp_percent: EXL2_DAMP,
            damp_auto_increment: EXL2_DAMP,
            ..GptqOptions::default()
        };
        let (u, _, _) = hessian_inverse_upper(Cow::Borrowed(h), &diag, k, &perm, &opts)?;
        Ok(Self {
            k,
            perm,
            u,
            dead,
            backend: crate::backend::Backend::Cpu,
        })
    }

    /// Run the lazy-batch updates on `backend` (the CPU if the GPU fails).
    pub fn on_backend(mut self, backend: crate::backend::Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Quantize `w` (`[n, k]`, PyTorch order) with the option `qp`.
    pub fn quantize(&self, w: &[f32], n: usize, qp: &QParams) -> Result<Exl2Quantized> {
        let k = self.k;
        qp.validate()?;
        if w.len() != n * k {
            return Err(Error::Invalid(format!(
                "EXL2: weight has {} values, not {n}×{k}",
                w.len()
            )));
        }
        if !k.is_multiple_of(32) {
            return Err(Error::Invalid(format!(
                "EXL2 needs input widths that are multiples of 32 (this one is {k})"
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "EXL2: weight value {i} is {}",
                w[i]
            )));
        }
        let n_pad = n.div_ceil(32) * 32;
        let groups = qp.groups(k);
        // Working weight in processing order, `[n, k]`.
        let mut wp = vec![0f32; n * k];
        for (dst, src) in wp.chunks_exact_mut(k).zip(w.chunks_exact(k)) {
            for (d, &p) in dst.iter_mut().zip(&self.perm) {
                *d = if self.dead[p] { 0.0 } else { src[p] };
            }
        }
        let mut codes_t = vec![0u8; n * k]; // [n, k] processing order
        let mut scale_codes = vec![1u8; groups.len() * n_pad];
        let mut scale_max = Vec::with_capacity(groups.len());
        let mut deq_p = vec![0f32; n * k];
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(2 * threads).clamp(1, 256);
        let device_params = if self.backend == crate::backend::Backend::Gpu {
            crate::backend::on_gpu(|g| {
                self.sweep_on_device(g, &wp, n, &groups, &mut codes_t, &mut deq_p)
            })
        } else {
            None
        };
        let on_device = device_params.is_some();
        for (gi, (codes, qsm)) in device_params.into_iter().flatten().enumerate() {
            scale_codes[gi * n_pad..gi * n_pad + n].copy_from_slice(&codes);
            scale_max.push(qsm);
        }
        let mut a = 0usize;
        for (gi, &(bits, rows)) in groups.iter().enumerate() {
            if on_device {
                break;
            }
            let b = a + rows;
            let (codes, qsm) = find_params(&wp, n, k, a, b, bits);
            scale_max.push(qsm);
            scale_codes[gi * n_pad..gi * n_pad + n].copy_from_slice(&codes);
            let scales: Vec<f32> = codes
                .iter()
                .map(|&c| exl2_scale(u32::from(c) - 1, qsm))
                .collect();
            let u = &self.u;
            wp.par_chunks_mut(chunk * k)
                .zip(codes_t.par_chunks_mut(chunk * k))
                .zip(deq_p.par_chunks_mut(chunk * k))
                .enumerate()
                .for_each(|(ci, ((wc, qc), dc))| {
                    let nr = wc.len() / k;
                    let mut err = vec![0f32; nr * rows];
                    for r in 0..nr {
                        let s = scales[ci * chunk + r];
                        let out = (&mut qc[r * k..(r + 1) * k], &mut dc[r * k..(r + 1) * k]);
                        let e = &mut err[r * rows..(r + 1) * rows];
                        self.sweep_row(&mut wc[r * k..(r + 1) * k], 0, (a, b), (s, bits), out, e);
                    }
                    if b < k {
                        // W[:, b..] -= E · U[a..b, b..].
                        let e_mat = MatRef::from_row_major_slice(&err, nr, rows);
                        let u_blk = MatRef::from_row_major_slice_with_stride(
                            &u[a * k + b..],
                            rows,
                            k - b,
                            k,
                        );
                        let w_rest = row_major_mut(&mut wc[b..], nr, k - b, k);
                        matmul(w_rest, Accum::Add, e_mat, u_blk, -1.0f32, Par::Seq);
                    }
                });
            a = b;
        }
        // Codes transposed to `[k, n_pad]` (permuted rows) for packing; padded columns hold `z` (value 0).
        let mut codes = vec![0u8; k * n_pad];
        let mut a = 0usize;
        for &(bits, rows) in &groups {
            let z = 1u8 << (bits - 1);
            for r in a..a + rows {
                let dst = &mut codes[r * n_pad..(r + 1) * n_pad];
                for (c, d) in dst.iter_mut().enumerate() {
                    *d = if c < n { codes_t[c * k + r] } else { z };
                }
            }
            a += rows;
        }
        let perm: Vec<u32> = self.perm.iter().map(|&p| p as u32).collect();
        let packed = pack_exl2(n_pad, &groups, &codes, &scale_codes, &scale_max, &perm)?;
        let mut dequantised = vec![0f32; n * k];
        for (dst, src) in dequantised.chunks_exact_mut(k).zip(deq_p.chunks_exact(k)) {
            for (&v, &p) in src.iter().zip(&self.perm) {
                dst[p] = v;
            }
        }
        Ok(Exl2Quantized {
            packed,
            dequantised,
        })
    }
}

impl Exl2Prepared {
    /// The in-group sweep of one row over columns `a..b` (processing order): `row[c − base]` holds column
    /// `c` (error-updated so far); codes and values go to `qc[c]`, `dc[c]`, the scaled errors to
    /// `err[c − a]`.
    fn sweep_row(
        &self,
        row: &mut [f32],
        base: usize,
        (a, b): (usize, usize),
        (s, bits): (f32, u8),
        (qc, dc): (&mut [u8], &mut [f32]),
        err: &mut [f32],
    ) {
        let (k, u) = (self.k, &self.u);
        let maxq = (1i32 << bits) - 1;
        let z = 1i32 << (bits - 1);
        for c in a..b {
            let x = row[c - base];
            let q = round_even((x / s).clamp(-z as f32, (maxq - z) as f32)) as i32 + z;
            let v = exl2_value(q as u32, bits, s);
            qc[c] = q as u8;
            dc[c] = v;
            let e = (x - v) / u[c * k + c];
            err[c - a] = e;
            let urow = &u[c * k + c + 1..c * k + b];
            for (xx, &uu) in row[c + 1 - base..b - base].iter_mut().zip(urow) {
                *xx -= e * uu;
            }
        }
    }

    /// The group sweep with the lazy-batch updates on the GPU (the weight kept there transposed, see
    /// [`crate::backend::wgpu::gptq`]): per group its columns come back, scales are searched and the
    /// group swept on the host, and one GEMM updates the later columns. Returns each group's scale codes
    /// and maximum; fills `codes_t` and `deq_p` (`[n, k]`, processing order).
    fn sweep_on_device(
        &self,
        gpu: &crate::backend::wgpu::Gpu,
        wp: &[f32],
        n: usize,
        groups: &[(u8, usize)],
        codes_t: &mut [u8],
        deq_p: &mut [f32],
    ) -> Result<Vec<(Vec<u8>, half::f16)>> {
        let k = self.k;
        if n > gpu.lazy_rows_max(k) {
            return Err(Error::Gpu(format!(
                "EXL2: a {n} × {k} weight does not fit a storage binding"
            )));
        }
        let lazy = gpu.lazy_columns(wp, n, k)?;
        let mut params = Vec::with_capacity(groups.len());
        let first = groups.first().map_or(0, |g| g.1);
        let mut src = gpu.lazy_read(&lazy, 0, first)?;
        let mut a = 0usize;
        for (gi, &(bits, rows)) in groups.iter().enumerate() {
            let b = a + rows;
            // `src` is `[n, rows]`: columns a..b of every row.
            let (codes, qsm) = find_params(&src, n, rows, 0, rows, bits);
            let scales: Vec<f32> = codes
                .iter()
                .map(|&c| exl2_scale(u32::from(c) - 1, qsm))
                .collect();
            params.push((codes, qsm));
            let mut err = vec![0f32; n * rows];
            src.par_chunks_mut(rows)
                .zip(err.par_chunks_mut(rows))
                .zip(codes_t.par_chunks_mut(k))
                .zip(deq_p.par_chunks_mut(k))
                .enumerate()
                .for_each(|(r, (((row, e), qc), dc))| {
                    self.sweep_row(row, a, (a, b), (scales[r], bits), (qc, dc), e);
                });
            if b < k {
                let next = groups.get(gi + 1).map_or(0, |g| g.1);
                let u_rows = &self.u[a * k..b * k];
                src = gpu.lazy_update_read(&lazy, u_rows, b, &err, (b, b + next))?;
            }
            a = b;
        }
        Ok(params)
    }
}

const P_GRID: usize = 96;

/// ExLlamaV2's `find_params` for the group `wp[:, a..b]` (`[n, k]`): per column scale codes `1..=16` and the
/// group's fp16 maximum.
fn find_params(
    wp: &[f32],
    n: usize,
    k: usize,
    a: usize,
    b: usize,
    bits: u8,
) -> (Vec<u8>, half::f16) {
    let maxq = ((1u32 << bits) - 1) as f32;
    let z = (1u32 << (bits - 1)) as f32;
    let base: Vec<f32> = (0..n)
        .map(|r| {
            let xmax = wp[r * k + a..r * k + b]
                .iter()
                .fold(0f32, |m, &x| m.max(x.abs()))
                + 1e-12;
            xmax / (maxq / 2.0)
        })
        .collect();
    let m = base.iter().fold(0f32, |a, &b| a.max(b));
    let codes: Vec<u8> = base
        .iter()
        .map(|&x| (16.0 * (x / m).sqrt()).round_ties_even().clamp(1.0, 16.0) as u8)
        .collect();
    let sw: Vec<f32> = codes
        .iter()
        .map(|&c| {
            let c = f32::from(c) / 16.0;
            c * c * m
        })
        .collect();
    let errs: Vec<f64> = (0..=P_GRID)
        .into_par_iter()
        .map(|j| {
            let p = 0.70 + 0.5 * j as f32 / P_GRID as f32;
            let mut total = 0f64;
            for r in 0..n {
                let s = sw[r] * p;
                // 16 independent lanes (groups are multiples of 32 wide), so the loop vectorises.
                let mut acc = [0f32; 16];
                for xs in wp[r * k + a..r * k + b].chunks_exact(16) {
                    for (l, &x) in acc.iter_mut().zip(xs) {
                        let q = round_even((x / s).clamp(-z, maxq - z));
                        let e = (q * s - x).abs();
                        *l += e * e * e * e.sqrt();
                    }
                }
                total += acc.iter().map(|&v| f64::from(v)).sum::<f64>();
            }
            total
        })
        .collect();
    let best = (0..errs.len())
        .min_by(|&x, &y| errs[x].total_cmp(&errs[y]))
        .unwrap_or(0);
    let p = 0.70 + 0.5 * best as f32 / P_GRID as f32;
    // An all-zero group would give a zero maximum (0/0 scales): kept at fp16's smallest normal.
    let qsm = half::f16::from_f32(m * p).max(half::f16::MIN_POSITIVE);
    (codes, qsm)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn normal(rng: &mut StdRng) -> f32 {
        let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
        let u2: f32 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    #[test]
    fn round_even_is_round_ties_even_on_the_code_range() {
        let mut x = -300.0f32;
        while x <= 300.0 {
            for v in [
                x,
                x + 0.5,
                x - 0.5,
                x + 1e-4,
                x - 1e-4,
                x + 0.4999,
                x + 0.5001,
            ] {
                assert_eq!(round_even(v), v.round_ties_even(), "{v}");
            }
            x += 0.25;
        }
        assert_eq!(round_even(-0.3), 0.0);
    }

    #[test]
    fn the_tables_have_exllamav2s_shape_and_costs() {
        let attn = attn_options();
        let mlp = mlp_options();
        assert_eq!((attn.len(), mlp.len()), (19, 17));
        // Distinct options per projection (measure.py's reduced sets): 14/14/15/14 and 13/13/14.
        let distinct = |col: Vec<QParams>| {
            let mut v: Vec<String> = col.iter().map(QParams::desc).collect();
            v.sort();
            v.dedup();
            v.len()
        };
        let a: Vec<usize> = (0..4)
            .map(|i| distinct(attn.iter().map(|r| r[i].clone()).collect()))
            .collect();
        let m: Vec<usize> = (0..3)
            .map(|i| distinct(mlp.iter().map(|r| r[i].clone()).collect()))
            .collect();
        assert_eq!((a, m), (vec![14, 14, 15, 14], vec![13, 13, 14]));
        for r in attn.iter().flatten().chain(mlp.iter().flatten()) {
            r.validate().unwrap();
        }
        // bpw quoted in exl2.md §4.3 for 4096×4096 and the MLP shapes.
        let bpw = |q: &QParams, k: usize, n: usize| q.total_bits(k, n, 0) as f64 / (k * n) as f64;
        let close = |x: f64, y: f64| (x - y).abs() < 0.006;
        assert!(close(bpw(&attn[0][0], 4096, 4096), 2.13));
        assert!(close(bpw(&attn[2][2], 4096, 4096), 3.16));
        assert!(close(bpw(&attn[8][2], 4096, 4096), 4.13));
        assert!(close(bpw(&attn[17][2], 4096, 4096), 8.13));
        assert!(close(bpw(&mlp[0][2], 14336, 4096), 2.48));
        assert!(close(bpw(&mlp[4][2], 14336, 4096), 3.41));
        assert!(close(bpw(&mlp[9][1], 4096, 14336), 4.28));
        assert!(close(bpw(&head_option(6).unwrap(), 4096, 128256), 6.34));
        // The allocation example of §3.4: K = 4096, 3/2 .05/.95 g64 → 4 groups of 3 bits, 60 of 2.
        let g = attn[0][0].groups(4096);
        assert_eq!(g.iter().filter(|x| x.0 == 3).count(), 4);
        assert_eq!(g.iter().filter(|x| x.0 == 2).count(), 60);
        // A short last group only at the end: K = 576, 6/3/2 .05/.2/.75 g32/64/64.
        let g = mlp[0][2].groups(576);
        assert_eq!(g.iter().map(|x| x.1).sum::<usize>(), 576);
        assert_eq!(g.last(), Some(&(2, 32)));
        // JSON round trip.
        for q in [&mlp[4][2], &attn[1][2]] {
            assert_eq!(&QParams::from_json(&q.to_json()).unwrap(), q);
        }
    }

    fn hessian(k: usize, seed: u64) -> Hessian {
        let mut rng = StdRng::seed_from_u64(seed);
        let t = 4 * k;
        // Correlated inputs of unequal variance: each feature leans on the one before.
        let mut x = vec![0f32; t * k];
        for row in x.chunks_exact_mut(k) {
            let mut prev = 0f32;
            for (i, v) in row.iter_mut().enumerate() {
                let z = normal(&mut rng) * (1.0 + i as f32 / k as f32 * 3.0);
                *v = z + 0.8 * prev;
                prev = *v;
            }
        }
        let mut h = Hessian::new(k);
        h.add_batch(&x, t).unwrap();
        h
    }

    #[test]
    fn adaptive_gptq_packs_what_it_evaluates_and_beats_rounding() {
        let (n, k) = (40usize, 128usize);
        let h = hessian(k, 5);
        let mut rng = StdRng::seed_from_u64(9);
        let w: Vec<f32> = (0..n * k).map(|_| normal(&mut rng) * 0.05).collect();
        let prep = Exl2Prepared::new(&h).unwrap();
        for q in [
            qp(&[(4, 1.0, 32)]),
            qp(&[(6, 0.25, 32), (3, 0.5, 32), (2, 0.25, 32)]),
            qp(&[(8, 1.0, 128)]),
        ] {
            let r = prep.quantize(&w, n, &q).unwrap();
            assert_eq!(r.packed.n_pad, 64);
            assert_eq!(
                (r.packed.q_weight.len()
                    + r.packed.q_scale.len()
                    + r.packed.q_scale_max.len()
                    + r.packed.q_groups.len()
                    + r.packed.q_invperm.len()) as u64
                    * 8,
                q.total_bits(k, 64, 0)
            );
            // The packed tensors decode to exactly the weights the solver evaluated.
            let parts = r.packed.parts(n);
            parts.validate("w").unwrap();
            let mut row = vec![0f32; k];
            for c in 0..n {
                parts.dequant_row(c, &mut row);
                assert_eq!(row, r.dequantised[c * k..(c + 1) * k], "{}", q.desc());
            }
            // Output error against the Hessian: GPTQ's error feedback beats its own grid rounded plainly.
            let out_err = |d: &[f32]| -> f64 {
                let hm = h.matrix();
                let mut tot = 0.0;
                for c in 0..n {
                    let e: Vec<f64> = (0..k)
                        .map(|i| f64::from(w[c * k + i] - d[c * k + i]))
                        .collect();
                    for i in 0..k {
                        for j in 0..k {
                            tot += e[i] * hm[i * k + j] * e[j];
                        }
                    }
                }
                tot
            };
            let rtn = {
                // The same grid with no feedback: U = I.
                let ident = Exl2Prepared {
                    k,
                    perm: prep.perm.clone(),
                    u: (0..k * k)
                        .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
                        .collect(),
                    dead: vec![false; k],
                    backend: crate::backend::Backend::Cpu,
                };
                ident.quantize(&w, n, &q).unwrap()
            };
            let (g, r0) = (out_err(&r.dequantised), out_err(&rtn.dequantised));
            assert!(g < 0.9 * r0, "{}: GPTQ {g} vs rounding {r0}", q.desc());
        }
        // More bits, less error.
        let e = |q: QParams| -> f64 {
            let r = prep.quantize(&w, n, &q).unwrap();
            w.iter()
                .zip(&r.dequantised)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum()
        };
        assert!(e(qp(&[(3, 1.0, 32)])) > e(qp(&[(4, 1.0, 32)])));
        assert!(e(qp(&[(4, 1.0, 32)])) > e(qp(&[(6, 1.0, 32)])));
        assert!(prep
            .quantize(&w[..n * k - 1], n, &qp(&[(4, 1.0, 32)]))
            .is_err());
    }
}
