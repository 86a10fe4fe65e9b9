//! K-quants: 256-element super-blocks.
//!
//! Layouts and formulas: gguf.md §2. Each value is `(d·scale)·q` or `(d·scale)·q − dmin·min`, with the
//! sub-block products formed first, exactly as ggml's `dequantize_row_q*_K` (and gguf-py) do, so results
//! are bit-exact.

use super::f16_at;
use super::x86::scale_min_k4;

const QK_K: usize = 256;

/// `u8 scales[16]; u8 qs[64]; f16 d; f16 dmin`.
pub fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(QK_K)) {
        let scales = &b[0..16];
        let qs = &b[16..80];
        let d = f16_at(&b[80..]);
        let dmin = f16_at(&b[82..]);
        for h in 0..2 {
            let q = &qs[32 * h..32 * h + 32];
            for g in 0..4 {
                let shift = 2 * g;
                for half in 0..2 {
                    let sc = scales[8 * h + 2 * g + half];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    let base = 128 * h + 32 * g + 16 * half;
                    let out = &mut y[base..base + 16];
                    let qq = &q[16 * half..16 * half + 16];
                    for l in 0..16 {
                        out[l] = dl * ((qq[l] >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// `u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d`.
pub fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(QK_K)) {
        let hmask = &b[0..32];
        let qs = &b[32..96];
        let sc = &b[96..108];
        let d = f16_at(&b[108..]);
        let scales = q3_k_scales(sc);
        for h in 0..2 {
            let q = &qs[32 * h..32 * h + 32];
            for g in 0..4 {
                let shift = 2 * g;
                let hbit = 4 * h + g;
                for half in 0..2 {
                    let dl = d * scales[8 * h + 2 * g + half] as f32;
                    let base = 128 * h + 32 * g + 16 * half;
                    let out = &mut y[base..base + 16];
                    let qq = &q[16 * half..16 * half + 16];
                    let hm = &hmask[16 * half..16 * half + 16];
                    for l in 0..16 {
                        let low = ((qq[l] >> shift) & 3) as i32;
                        let sub = if (hm[l] >> hbit) & 1 != 0 { 0 } else { 4 };
                        out[l] = dl * (low - sub) as f32;
                    }
                }
            }
        }
    }
}

/// Q3_K's sixteen signed 6-bit scales (`scales[12]` unpacked, less 32), one per 16 elements.
pub(crate) fn q3_k_scales(sc: &[u8]) -> [i32; 16] {
    let mut scales = [0i32; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = (low | (high << 4)) as i32 - 32;
    }
    scales
}

/// `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`.
pub fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q4_k(src, dst) {
        dequant_q4_k_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q4_k`].
pub(super) fn dequant_q4_k_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b);
        let dmin = f16_at(&b[2..]);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &qs[32 * c..32 * c + 32];
            let (lo, hi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                hi[l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`.
pub fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b);
        let dmin = f16_at(&b[2..]);
        let scales = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, scales);
            let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &qs[32 * c..32 * c + 32];
            let (s1, s2) = (2 * c, 2 * c + 1);
            let (lo, hi) = y[64 * c..64 * c + 64].split_at_mut(32);
            for l in 0..32 {
                let h1 = ((qh[l] >> s1) & 1) << 4;
                let h2 = ((qh[l] >> s2) & 1) << 4;
                lo[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - m1;
                hi[l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
            }
        }
    }
}

/// `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`.
pub fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q6_k(src, dst) {
        dequant_q6_k_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q6_k`].
pub(super) fn dequant_q6_k_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let ql_all = &b[0..128];
        let qh_all = &b[128..192];
        let scales = &b[192..208];
        let d = f16_at(&b[208..]);
        for h in 0..2 {
            let ql = &ql_all[64 * h..64 * h + 64];
            let qh = &qh_all[32 * h..32 * h + 32];
            let sc = &scales[8 * h..8 * h + 8];
            let out = &mut y[128 * h..128 * h + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                out[l] = (d * (sc[is] as i8) as f32) * q1 as f32;
                out[l + 32] = (d * (sc[is + 2] as i8) as f32) * q2 as f32;
                out[l + 64] = (d * (sc[is + 4] as i8) as f32) * q3 as f32;
                out[l + 96] = (d * (sc[is + 6] as i8) as f32) * q4 as f32;
            }
        }
    }
}

// ===================== Quantizers =====================
//
// Bit-exact ports of llama.cpp's reference K-quant quantizers (gguf.md §3; `ggml-quants.c`, compiled
// without `-mfma`/`-ffast-math`, so every `a*b + c` rounds twice and every sum runs left to right). Each
// float expression below keeps ggml's operation order; changing it changes bytes.

/// ggml's smallest group maximum still treated as nonzero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, via the 1.5·2²³ trick ggml uses (valid for |f| ≤ 4194303).
#[inline]
pub(super) fn nearest_int(f: f32) -> i32 {
    let val = f + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Symmetric search (ggml's `make_qx_quants`): returns the scale, `l[i]` in `0..2·nmax` (offset by `nmax`).
/// `rmse_type` 1 weighs by x² (or by `qw` when given); negative values return after the first fit.
pub(super) fn make_qx_quants(
    nmax: i32,
    x: &[f32],
    l_out: &mut [i8],
    rmse_type: i32,
    qw: Option<&[f32]>,
) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    if rmse_type == 0 {
        for (o, &v) in l_out.iter_mut().zip(x) {
            let l = nearest_int(iscale * v);
            *o = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
        }
        return 1.0 / iscale;
    }
    let (rmse_type, return_early) = if rmse_type < 0 {
        (-rmse_type, true)
    } else {
        (rmse_type, false)
    };
    // The weights once, so the search loops are branch-free (sums keep ggml's order).
    let mut wbuf = [0.0f32; 32];
    let mut wvec = Vec::new();
    let w: &mut [f32] = if n <= 32 {
        &mut wbuf[..n]
    } else {
        wvec.resize(n, 0.0);
        &mut wvec
    };
    for (i, (wi, &v)) in w.iter_mut().zip(x).enumerate() {
        *wi = match qw {
            Some(q) => q[i],
            None => match rmse_type {
                1 => v * v,
                2 => 1.0,
                3 => v.abs(),
                _ => v.abs().sqrt(),
            },
        };
    }
    let w = &*w;
    let l_out = &mut l_out[..n];
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((o, &xi), &wi) in l_out.iter_mut().zip(x).zip(w) {
        let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *o = (l + nmax) as i8;
        let lf = l as f32;
        sumlx += wi * xi * lf;
        suml2 += wi * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    if return_early {
        return if suml2 > 0.0 {
            0.5 * (scale + 1.0 / iscale)
        } else {
            1.0 / iscale
        };
    }
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (&xi, &wi) in x.iter().zip(w) {
            let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1) as f32;
            sumlx += wi * xi * l;
            suml2 += wi * l * l;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &xi) in l_out.iter_mut().zip(x) {
                let l = nearest_int(iscale * xi);
                *o = (nmax + l.clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants`: symmetric search with x² weights and coordinate descent; `l` offset by `nmax`.
pub(super) fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8], do_rmse: bool) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    if do_rmse {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            l_out[i] = l as i8;
            let w = x[i] * x[i];
            sumlx += w * x[i] * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        for _ in 0..5 {
            let mut n_changed = 0;
            for i in 0..n {
                let w = x[i] * x[i];
                let li = l_out[i] as f32;
                let mut slx = sumlx - w * x[i] * li;
                if slx > 0.0 {
                    let mut sl2 = suml2 - w * li * li;
                    let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                    if new_l != l_out[i] as i32 {
                        let nl = new_l as f32;
                        slx += w * x[i] * nl;
                        sl2 += w * nl * nl;
                        if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                            l_out[i] = new_l as i8;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed += 1;
                        }
                    }
                }
            }
            if n_changed == 0 {
                break;
            }
        }
        for l in l_out[..n].iter_mut() {
            *l += nmax as i8;
        }
        return if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    }
    for (o, &v) in l_out.iter_mut().zip(x) {
        *o = (nearest_int(iscale * v).clamp(-nmax, nmax - 1) + nmax) as i8;
    }
    1.0 / iscale
}

/// Asymmetric search shared by ggml's `make_qkx2_quants` (`weights` given) and `make_qkx3_quants`
/// (`weights` may be `None`: x² weights; an empty range is `max <= min`). Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx_quants(
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    qkx3: bool,
) -> (f32, f32) {
    let n = x.len();
    assert!(n <= 32, "make_qkx_quants works on at most 32 values");
    // The weights once (x² without an imatrix), so the search loops below are branch-free; every sum
    // keeps ggml's order, so results are unchanged.
    let mut wbuf = [0.0f32; 32];
    match weights {
        Some(w) => wbuf[..n].copy_from_slice(&w[..n]),
        None => wbuf[..n].iter_mut().zip(x).for_each(|(w, &v)| *w = v * v),
    }
    let w = &wbuf[..n];
    let l_out = &mut l_out[..n];
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for (&xi, &wi) in x.iter().zip(w).skip(1) {
        if xi < min {
            min = xi;
        }
        if xi > max {
            max = xi;
        }
        sum_w += wi;
        sum_x += wi * xi;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if (qkx3 && max <= min) || (!qkx3 && max == min) {
        l_out.fill(0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((o, &xi), &wi) in l_out.iter_mut().zip(x).zip(w) {
        let l = nearest_int(iscale * (xi - min)).clamp(0, nmax);
        *o = l as u8;
        best_error += wi * err(scale * l as f32 + min - xi);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut lbuf = [0u8; 32];
    let laux = &mut lbuf[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((la, &xi), &wi) in laux.iter_mut().zip(x).zip(w) {
            let l = nearest_int(iscale * (xi - min)).clamp(0, nmax);
            *la = l as u8;
            let lf = l as f32;
            sum_l += wi * lf;
            sum_l2 += wi * lf * lf;
            sum_xl += wi * lf * xi;
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for ((&la, &xi), &wi) in laux.iter().zip(x).zip(w) {
                cur_error += wi * err(this_scale * la as f32 + this_min - xi);
            }
            if cur_error < best_error {
                l_out.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qkx2_quants`. Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    make_qkx_quants(
        nmax,
        x,
        Some(weights),
        l_out,
        rmin,
        rdelta,
        nstep,
        use_mad,
        false,
    )
}

/// ggml's `make_qkx3_quants`. Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    make_qkx_quants(nmax, x, weights, l_out, rmin, rdelta, nstep, use_mad, true)
}

/// ggml's `make_qp_quants`: positive values only, weighted; `l` in `0..=nmax`.
pub(super) fn make_qp_quants(nmax: i32, x: &[f32], l_out: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for i in 0..n {
        l_out[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l_out[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).min(nmax);
        l_out[i] = l as u8;
        let w = qw[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l_out[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Store 6-bit scale `ls` and min `lm` of sub-block `j` (inverse of [`scale_min_k4`]); bytes start zeroed.
#[inline]
pub(super) fn pack_scale_min_k4(j: usize, ls: u8, lm: u8, s: &mut [u8]) {
    if j < 4 {
        s[j] = ls;
        s[j + 4] = lm;
    } else {
        s[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
        s[j - 4] |= (ls >> 4) << 6;
        s[j] |= (lm >> 4) << 6;
    }
}

fn block_importance(importance: Option<&[f32]>, b: usize) -> Option<&[f32]> {
    importance.map(|w| &w[QK_K * b..QK_K * b + QK_K])
}

/// Q6_K, llama.cpp's `quantize_row_q6_K_ref` (or `_impl` with an importance matrix).
pub fn quantize_q6_k(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (b, (x, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(210))
        .enumerate()
    {
        let qw = block_importance(importance, b);
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..16 {
            let w = qw.map(|w| &w[16 * ib..16 * ib + 16]);
            let scale = make_qx_quants(
                32,
                &x[16 * ib..16 * ib + 16],
                &mut l[16 * ib..16 * ib + 16],
                1,
                w,
            );
            scales[ib] = scale;
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = scale;
            }
        }
        y.fill(0);
        if max_abs_scale < GROUP_MAX_EPS {
            continue;
        }
        let iscale = -128.0 / max_scale;
        y[208..210].copy_from_slice(&f16_bytes(1.0 / iscale));
        let d_all = f16_round(1.0 / iscale);
        for ib in 0..16 {
            y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }
        for j in 0..16 {
            let d = d_all * (y[192 + j] as i8) as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let (ql, rest) = y.split_at_mut(128);
        let qh = &mut rest[..64];
        for h in 0..2 {
            let j = 128 * h;
            for i in 0..32 {
                let q = |o: usize| l[j + i + o] as u8;
                ql[64 * h + i] = (q(0) & 0x0F) | ((q(64) & 0x0F) << 4);
                ql[64 * h + i + 32] = (q(32) & 0x0F) | ((q(96) & 0x0F) << 4);
                qh[32 * h + i] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
    }
}

/// Shared Q4_K/Q5_K scale search: fills `l` (values `0..=nmax`), the 12 scale bytes, and returns `(d, dmin)`
/// as stored (f16-rounded).
fn qk_scales_4_5(
    x: &[f32],
    qw: Option<&[f32]>,
    nmax: i32,
    l: &mut [u8; QK_K],
    sc_bytes: &mut [u8],
) -> [u8; 4] {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut weights = [0.0f32; 32];
    let mut out = [0u8; 4];
    sc_bytes.fill(0);
    match qw {
        None => {
            let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
            let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
            for j in 0..8 {
                let xs = &x[32 * j..32 * j + 32];
                let mut sum_x2 = 0.0f32;
                for &v in xs {
                    sum_x2 += v * v;
                }
                let av_x = (sum_x2 / 32.0).sqrt();
                for (w, &v) in weights.iter_mut().zip(xs) {
                    *w = av_x + v.abs();
                }
                let (s, m) = make_qkx2_quants(
                    nmax,
                    xs,
                    &weights,
                    &mut l[32 * j..32 * j + 32],
                    rmin,
                    0.1,
                    nstep,
                    false,
                );
                scales[j] = s;
                mins[j] = m;
                if s > max_scale {
                    max_scale = s;
                }
                if m > max_min {
                    max_min = m;
                }
            }
            let inv_scale = if max_scale > 0.0 {
                63.0 / max_scale
            } else {
                0.0
            };
            let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
            for j in 0..8 {
                let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
                pack_scale_min_k4(j, ls, lm, sc_bytes);
            }
            out[0..2].copy_from_slice(&f16_bytes(max_scale / 63.0));
            out[2..4].copy_from_slice(&f16_bytes(max_min / 63.0));
        }
        Some(qw) => {
            let mut sum_x2 = 0.0f32;
            for &v in &x[..QK_K] {
                sum_x2 += v * v;
            }
            let sigma2 = 2.0 * sum_x2 / QK_K as f32;
            let mut sw = [0.0f32; 8];
            for j in 0..8 {
                let xs = &x[32 * j..32 * j + 32];
                for (i, w) in weights.iter_mut().enumerate() {
                    *w = qw[32 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
                }
                let mut sumw = 0.0f32;
                for &w in &weights {
                    sumw += w;
                }
                sw[j] = sumw;
                let (s, m) = make_qkx3_quants(
                    nmax,
                    xs,
                    Some(&weights),
                    &mut l[32 * j..32 * j + 32],
                    -0.9,
                    0.05,
                    36,
                    false,
                );
                scales[j] = s;
                mins[j] = m;
            }
            let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
            let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
            let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
            for j in 0..8 {
                pack_scale_min_k4(j, ls[j], lm[j], sc_bytes);
            }
            out[0..2].copy_from_slice(&f16_bytes(d_block));
            out[2..4].copy_from_slice(&f16_bytes(m_block));
        }
    }
    let d_all = f16_at(&out[0..]);
    let dmin_all = f16_at(&out[2..]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, sc_bytes);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    out
}

/// Q4_K, llama.cpp's `quantize_row_q4_K_ref` (or `_impl` with an importance matrix).
pub fn quantize_q4_k(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (b, (x, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(144))
        .enumerate()
    {
        let mut l = [0u8; QK_K];
        let dd = qk_scales_4_5(
            x,
            block_importance(importance, b),
            15,
            &mut l,
            &mut y[4..16],
        );
        y[0..4].copy_from_slice(&dd);
        let q = &mut y[16..144];
        for c in 0..4 {
            for i in 0..32 {
                q[32 * c + i] = l[64 * c + i] | (l[64 * c + i + 32] << 4);
            }
        }
    }
}

/// Q5_K, llama.cpp's `quantize_row_q5_K_ref` (or `_impl` with an importance matrix).
pub fn quantize_q5_k(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (b, (x, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(176))
        .enumerate()
    {
        let mut l = [0u8; QK_K];
        let dd = qk_scales_4_5(
            x,
            block_importance(importance, b),
            31,
            &mut l,
            &mut y[4..16],
        );
        y[0..4].copy_from_slice(&dd);
        let (qh, ql) = y[16..176].split_at_mut(32);
        qh.fill(0);
        for c in 0..4 {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for i in 0..32 {
                let mut l1 = l[64 * c + i];
                if l1 > 15 {
                    l1 -= 16;
                    qh[i] |= m1;
                }
                let mut l2 = l[64 * c + i + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[i] |= m2;
                }
                ql[32 * c + i] = l1 | (l2 << 4);
            }
        }
    }
}

/// Pack Q3_K's sixteen 6-bit scales (`0..=63`, offset by 32) into its 12 scale bytes (zeroed first).
fn pack_q3_scales(ls: &[i32; 16], sc: &mut [u8]) {
    sc.fill(0);
    for (j, &q) in ls.iter().enumerate() {
        if j < 8 {
            sc[j] = (q & 0x0F) as u8;
        } else {
            sc[j - 8] |= ((q & 0x0F) << 4) as u8;
        }
        sc[8 + j % 4] |= ((q >> 4) << (2 * (j / 4))) as u8;
    }
}

/// Q3_K, llama.cpp's `quantize_row_q3_K_ref`, or `quantize_row_q3_K_impl` with an importance matrix.
pub fn quantize_q3_k(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (b, (x, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(110))
        .enumerate()
    {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        y.fill(0);
        if let Some(qw) = block_importance(importance, b) {
            let mut sumx2 = 0.0f32;
            for &v in x {
                sumx2 += v * v;
            }
            let sigma2 = 2.0 * sumx2 / QK_K as f32;
            let mut weight = [0.0f32; 16];
            let mut sw = [0.0f32; 16];
            for j in 0..16 {
                let xs = &x[16 * j..16 * j + 16];
                for (i, w) in weight.iter_mut().enumerate() {
                    *w = qw[16 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
                }
                let mut sumw = 0.0f32;
                for &w in &weight {
                    sumw += w;
                }
                sw[j] = sumw;
                scales[j] = make_qx_quants(4, xs, &mut l[16 * j..16 * j + 16], 1, Some(&weight));
            }
            let mut ls8 = [0i8; 16];
            let d_block = make_qx_quants(32, &scales, &mut ls8, 1, Some(&sw));
            pack_q3_scales(&ls8.map(|v| v as i32), &mut y[96..108]);
            y[108..110].copy_from_slice(&f16_bytes(d_block));
        } else {
            let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
            for j in 0..16 {
                let (xs, ls) = (&x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
                scales[j] = make_q3_quants(4, xs, ls, true);
                let s = scales[j].abs();
                if s > amax {
                    amax = s;
                    max_scale = scales[j];
                }
            }
            if max_scale != 0.0 {
                let iscale = -32.0 / max_scale;
                let ls = scales.map(|s| (nearest_int(iscale * s) as i8 as i32).clamp(-32, 31) + 32);
                pack_q3_scales(&ls, &mut y[96..108]);
                y[108..110].copy_from_slice(&f16_bytes(1.0 / iscale));
            }
        }
        let d_all = f16_at(&y[108..]);
        for j in 0..16 {
            let sc = &y[96..108];
            let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
            let s = (low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
            let d = d_all * s as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
                l[16 * j + ii] = (q + 4) as i8;
            }
        }
        let (hmask, rest) = y.split_at_mut(32);
        for (j, lj) in l.iter_mut().enumerate() {
            if *lj > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                *lj -= 4;
            }
        }
        let qs = &mut rest[..64];
        for h in 0..2 {
            for i in 0..32 {
                let q = |o: usize| l[128 * h + i + o] as u8;
                qs[32 * h + i] = q(0) | (q(32) << 2) | (q(64) << 4) | (q(96) << 6);
            }
        }
    }
}

/// Q2_K reference scale search: sub-block quants into `l`, scales and `d`/`dmin` into `y`.
fn q2_k_ref_scales(x: &[f32], l: &mut [u8; QK_K], y: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut weights = [0.0f32; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut l[16 * j..16 * j + 16],
            -0.5,
            0.1,
            15,
            true,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    y.fill(0);
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            y[j] = nearest_int(iscale * scales[j]) as u8;
        }
        y[80..82].copy_from_slice(&f16_bytes(max_scale / Q4SCALE));
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            y[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        y[82..84].copy_from_slice(&f16_bytes(max_min / Q4SCALE));
    }
}

/// Q2_K weighted scale search (`quantize_row_q2_K_impl`).
fn q2_k_weighted_scales(x: &[f32], qw: &[f32], l: &mut [u8; QK_K], y: &mut [u8]) {
    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;
    let mut weight = [0.0f32; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (i, w) in weight.iter_mut().enumerate() {
            *w = qw[16 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        for &w in &weight {
            sw[j] += w;
        }
        let ls = &mut l[16 * j..16 * j + 16];
        (scales[j], mins[j]) = make_qkx3_quants(3, xs, Some(&weight), ls, -0.9, 0.05, 36, false);
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    y.fill(0);
    y[80..82].copy_from_slice(&f16_bytes(dm));
    y[82..84].copy_from_slice(&f16_bytes(mm));
    for j in 0..16 {
        y[j] = ls[j] | (lm[j] << 4);
    }
}

/// Q2_K, llama.cpp's `quantize_row_q2_K_ref`, or `quantize_row_q2_K_impl` with an importance matrix.
pub fn quantize_q2_k(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (b, (x, y)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(84))
        .enumerate()
    {
        let mut l = [0u8; QK_K];
        if let Some(qw) = block_importance(importance, b) {
            q2_k_weighted_scales(x, qw, &mut l, y);
        } else {
            q2_k_ref_scales(x, &mut l, y);
        }
        let d_all = f16_at(&y[80..]);
        let dmin_all = f16_at(&y[82..]);
        for j in 0..16 {
            let d = d_all * (y[j] & 0x0F) as f32;
            if d == 0.0 {
                continue;
            }
            let dm = dmin_all * (y[j] >> 4) as f32;
            for ii in 0..16 {
                l[16 * j + ii] = nearest_int((x[16 * j + ii] + dm) / d).clamp(0, 3) as u8;
            }
        }
        let qs = &mut y[16..80];
        for h in 0..2 {
            for i in 0..32 {
                let q = |o: usize| l[128 * h + i + o];
                qs[32 * h + i] = q(0) | (q(32) << 2) | (q(64) << 4) | (q(96) << 6);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DequantFn, QuantizeFn};
    use super::*;

    /// llama.cpp's own output (`ggml_quantize_chunk`), from tests/fixtures/quants/make_kquant_fixtures.py.
    const FIXTURE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/quants/kquants.bin"
    ));

    struct Fixture {
        n_per_row: usize,
        src: Vec<f32>,
        imatrix: Vec<f32>,
        /// (ggml type id, with imatrix, bytes)
        cases: Vec<(u32, bool, Vec<u8>)>,
    }

    fn le4(b: &[u8]) -> [u8; 4] {
        [b[0], b[1], b[2], b[3]]
    }

    fn fixture() -> Fixture {
        let mut pos = 0usize;
        let mut take = |n: usize| {
            let s = &FIXTURE[pos..pos + n];
            pos += n;
            s
        };
        assert_eq!(take(4), b"KQF1");
        let u32_at =
            |take: &mut dyn FnMut(usize) -> &'static [u8]| u32::from_le_bytes(le4(take(4)));
        let nrows = u32_at(&mut take) as usize;
        let n_per_row = u32_at(&mut take) as usize;
        let floats = |b: &[u8]| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(le4(c)))
                .collect::<Vec<_>>()
        };
        let src = floats(take(4 * nrows * n_per_row));
        let imatrix = floats(take(4 * n_per_row));
        let ncases = u32_at(&mut take);
        let cases = (0..ncases)
            .map(|_| {
                let ty = u32_at(&mut take);
                let with_im = u32_at(&mut take) != 0;
                let n = u32_at(&mut take) as usize;
                (ty, with_im, take(n).to_vec())
            })
            .collect();
        Fixture {
            n_per_row,
            src,
            imatrix,
            cases,
        }
    }

    /// (ggml id, quantizer, dequantizer, block bytes, weighted path ported)
    type Case = (u32, QuantizeFn, DequantFn, usize, bool);
    const QUANTIZERS: [Case; 5] = [
        (14, quantize_q6_k, dequant_q6_k, 210, true),
        (12, quantize_q4_k, dequant_q4_k, 144, true),
        (13, quantize_q5_k, dequant_q5_k, 176, true),
        (11, quantize_q3_k, dequant_q3_k, 110, true),
        (10, quantize_q2_k, dequant_q2_k, 84, true),
    ];

    #[test]
    fn kquant_quantizers_match_llama_cpp() {
        let fx = fixture();
        // The importance matrix is per column; ours is per element.
        let importance: Vec<f32> = fx
            .src
            .iter()
            .enumerate()
            .map(|(i, _)| fx.imatrix[i % fx.n_per_row])
            .collect();
        let mut checked = 0;
        for &(id, quant, _, bpb, weighted) in &QUANTIZERS {
            for (ty, with_im, want) in &fx.cases {
                if *ty != id || (*with_im && !weighted) {
                    continue;
                }
                let mut got = vec![0u8; fx.src.len() / QK_K * bpb];
                quant(&fx.src, &mut got, with_im.then_some(&importance[..]));
                let bad: Vec<usize> = (0..got.len() / bpb)
                    .filter(|&b| got[b * bpb..][..bpb] != want[b * bpb..][..bpb])
                    .collect();
                assert!(
                    bad.is_empty(),
                    "type {id} imatrix={with_im}: blocks {bad:?} differ from llama.cpp"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 10);
    }

    #[test]
    fn kquant_roundtrip_error() {
        let fx = fixture();
        // RMS error relative to each row's RMS, bounded per type.
        for &(id, quant, dequant, bpb, _) in &QUANTIZERS {
            let bound = match id {
                14 => 0.04,
                13 => 0.07,
                12 => 0.13,
                11 => 0.28,
                _ => 0.5,
            };
            let mut q = vec![0u8; fx.src.len() / QK_K * bpb];
            quant(&fx.src, &mut q, None);
            let mut y = vec![0.0f32; fx.src.len()];
            dequant(&q, &mut y);
            for (r, (xr, yr)) in fx
                .src
                .chunks(fx.n_per_row)
                .zip(y.chunks(fx.n_per_row))
                .enumerate()
            {
                let rms = |v: &mut dyn Iterator<Item = f32>| {
                    (v.map(|a| (a as f64).powi(2)).sum::<f64>() / fx.n_per_row as f64).sqrt()
                };
                let sig = rms(&mut xr.iter().copied());
                let err = rms(&mut xr.iter().zip(yr).map(|(a, b)| a - b));
                if sig == 0.0 {
                    assert_eq!(err, 0.0, "type {id} row {r}");
                } else if sig < 1e-4 {
                    // Tiny rows: the f16 super-block scale underflows (in llama.cpp too), so only the
                    // absolute error is small.
                    assert!(err < 1e-5, "type {id} row {r}: rms error {err}");
                } else {
                    assert!(
                        err <= bound * sig,
                        "type {id} row {r}: rel rms error {}",
                        err / sig
                    );
                }
            }
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.6), -1);
        assert_eq!(nearest_int(31.49), 31);
    }

    #[test]
    fn kquant_scale_packing() {
        // Sub-blocks 0..3 use the low 6 bits of bytes 0..3 / 4..7; 4..7 combine a nibble of bytes 8..11
        // with the top 2 bits of bytes 0..3 / 4..7.
        let mut s = [0u8; 12];
        s[1] = 0b11_000101; // sc1 = 5, top bits 3 → sc5 high
        s[5] = 0b01_000111; // m1 = 7, top bits 1 → m5 high
        s[9] = 0xA2; // sc5 low = 2, m5 low = 10
        assert_eq!(scale_min_k4(1, &s), (5, 7));
        assert_eq!(scale_min_k4(5, &s), (2 | 3 << 4, 10 | 1 << 4));
        // Q6_K: all-zero quants are −32, scaled by d·scale of each 16-element group.
        let mut b = vec![0u8; 210];
        for (g, sc) in b[192..208].iter_mut().enumerate() {
            *sc = (g as i8 - 8) as u8;
        }
        b[208..210].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        let mut y = [0.0f32; 256];
        dequant_q6_k(&b, &mut y);
        for (e, v) in y.iter().enumerate() {
            assert_eq!(*v, 0.5 * ((e / 16) as f32 - 8.0) * -32.0, "element {e}");
        }
    }
}
