//! The 1.5- and 1.75-bit i-quants, IQ1_S and IQ1_M: every 8 weights snap to one of 2048 ternary points
//! ({−1, 0, 1}⁸, [`IQ1S_GRID`]) shifted by ±1/8 and scaled.
//!
//! **Layouts** (256 weights per block, little-endian):
//! * IQ1_S, 50 bytes: `f16 d; u8 qs[32]; u16 qh[8]`. 32-weight group g has `qh[g]`: bits 3l..3l+2 are the
//!   high bits of 8-group l's 11-bit grid index (low byte `qs[4g+l]`), bits 12..14 a scale code s, bit 15
//!   the shift sign. A weight is `(d·(2s+1))·(grid + δ)` with δ = ∓0.125 (minus when the bit is set).
//! * IQ1_M, 56 bytes: `u8 qs[32]; u8 qh[16]; u8 scales[8]`. Each 16-weight half-block h has its own
//!   3-bit scale code (bits 3(h%4).. of the u16 `scales[h/4]`) and in `qh[h]` the high index bits and
//!   the shift sign of both its 8-groups (bits 0..2 + 3 for the first, 4..6 + 7 for the second). There
//!   is no d field: the f16 d is scattered over the top nibbles of the four scale u16s (lowest nibble of
//!   d in `scales[0]`'s top nibble).
//!
//! **Quantizers** (`quantize_row_iq1_s_impl` / `quantize_row_iq1_m_impl` in llama.cpp's
//! ggml-quants.c, reproduced bit for bit): per 32-group (IQ1_S) or 16-block (IQ1_M) the weights are
//! sorted by value and the two cut points splitting them into levels 0/1/2 (values −1/0/+1, shifted by
//! the shift sign) are found exhaustively by the weighted least-squares score `(Σwqx)²/Σwq²`; IQ1_M tries
//! its four shift-sign pairs per block. A level vector that is not a grid point is replaced by the
//! nearest listed neighbour (`iq1_find_best_neighbour2`: weighted distance in the shifted values) and the
//! scale refitted. The block scale d is the largest group scale / 15 (stored ×1.125 for IQ1_S); IQ1_M
//! stores a least-squares refit of d over all its blocks (×1.1125) instead. The weights are
//! `imatrix·sqrt(σ² + x²)` with σ² = 2·mean(x²) over the super-block; without an importance matrix IQ1_M
//! uses `x²` as llama.cpp does, while IQ1_S (whose llama.cpp quantizer asserts an imatrix) takes all
//! importances as 1. Everything is local to one 256-block, so `src` may hold any whole number of blocks;
//! `importance`, when given, holds one weight per element of `src`.
//!
//! Details that matter for bit-identity: every f32 expression keeps C's association order (no FMA),
//! sums run sequentially from +0.0, the sort breaks ties like glibc's `qsort` (its stable merge sort,
//! emulated exactly), all searches keep the first strict optimum, and blocks that quantize to nothing
//! keep grid index 0 and scale code 0 — they do not dequantize to zero, and IQ1_M's refit of d counts them.

use super::f16_at;
use super::iq_lowbit::{iq1m_d, iq1m_scales, Lattice, Which, IQ1S_GRID};
use super::kquants::nearest_int;
use super::legacy::put_f16;

/// `IQ1S_DELTA` / `IQ1M_DELTA`: the shift of the ternary values.
const DELTA: f32 = 0.125;
/// The three levels shifted up (shift sign +) …
const X_P: [f32; 3] = [-1.0 + DELTA, DELTA, 1.0 + DELTA];
/// … and down (shift sign −).
const X_M: [f32; 3] = [-1.0 - DELTA, -DELTA, 1.0 - DELTA];

/// `GROUP_MAX_EPS_IQ1_S` / `GROUP_MAX_EPS_IQ1_M`: groups with a smaller largest magnitude are zero groups.
const EPS_S: f32 = 1e-12;
const EPS_M: f32 = 1e-7;

const IQ1S_BYTES: usize = 50;
const IQ1M_BYTES: usize = 56;

/// Grid point `idx`'s 8 coordinates plus `delta`, scaled by `dl`, into `y`.
#[inline]
fn expand(idx: usize, dl: f32, delta: f32, y: &mut [f32]) {
    for (o, &g) in y[..8].iter_mut().zip(&IQ1S_GRID[idx]) {
        *o = dl * (g as i8 as f32 + delta);
    }
}

#[inline]
fn delta_of(bit_set: bool) -> f32 {
    if bit_set {
        -DELTA
    } else {
        DELTA
    }
}

/// `dequantize_row_iq1_s`: whole 50-byte blocks into 256 floats each.
pub(super) fn dequant_iq1_s(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(IQ1S_BYTES).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        let qs = &b[2..34];
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let h = u16::from_le_bytes([b[34 + 2 * g], b[35 + 2 * g]]);
            let dl = d * (2 * ((h >> 12) & 7) + 1) as f32;
            let delta = delta_of(h & 0x8000 != 0);
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let idx = qs[4 * g + l] as usize | (((h >> (3 * l)) & 7) as usize) << 8;
                expand(idx, dl, delta, y);
            }
        }
    }
}

/// `dequantize_row_iq1_m`: whole 56-byte blocks into 256 floats each.
pub(super) fn dequant_iq1_m(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(IQ1M_BYTES).zip(dst.chunks_exact_mut(256)) {
        let sc = iq1m_scales(b);
        let d = iq1m_d(&sc);
        let (qs, qh) = (&b[..32], &b[32..48]);
        // One 16-weight half-block h at a time (ggml walks 32-groups; the scale bits read are the same).
        for (h, y) in y.chunks_exact_mut(16).enumerate() {
            let s = (sc[h / 4] >> (3 * (h % 4))) & 7;
            let dl = d * (2 * s + 1) as f32;
            let q = qh[h];
            let (lo, hi) = y.split_at_mut(8);
            let idx0 = qs[2 * h] as usize | ((q as usize) << 8 & 0x700);
            let idx1 = qs[2 * h + 1] as usize | ((q as usize) << 4 & 0x700);
            expand(idx0, dl, delta_of(q & 0x08 != 0), lo);
            expand(idx1, dl, delta_of(q & 0x80 != 0), hi);
        }
    }
}

/// glibc's `qsort` for these small arrays (`msort_with_tmp`): top-down merge sort, left half `n/2`,
/// taking from the left run unless its key compares greater (`iq1_sort_helper` looks at the value only).
/// Stable, so equal values (−0.0 and +0.0 included) keep their index order; emulated rather than
/// `sort_by` so that even a NaN sorts as in llama.cpp and cannot trip Rust's order checks.
fn glibc_msort(b: &mut [(f32, u8)], tmp: &mut [(f32, u8)]) {
    let n = b.len();
    if n <= 1 {
        return;
    }
    let n1 = n / 2;
    {
        let (b1, b2) = b.split_at_mut(n1);
        glibc_msort(b1, tmp);
        glibc_msort(b2, tmp);
    }
    let (mut i, mut j, mut k) = (0, n1, 0);
    while i < n1 && j < n {
        if b[i].0 > b[j].0 {
            tmp[k] = b[j];
            j += 1;
        } else {
            tmp[k] = b[i];
            i += 1;
        }
        k += 1;
    }
    // What is left of the right run is already in place.
    while i < n1 {
        tmp[k] = b[i];
        i += 1;
        k += 1;
    }
    b[..k].copy_from_slice(&tmp[..k]);
}

/// Sort the group's (value, index) pairs as llama.cpp does.
#[inline]
fn sort_pairs(xb: &[f32], pairs: &mut [(f32, u8)], tmp: &mut [(f32, u8)]) {
    for (j, (p, &x)) in pairs.iter_mut().zip(xb).enumerate() {
        *p = (x, j as u8);
    }
    glibc_msort(pairs, tmp);
}

/// C's `MAX(a, b)`: `a > b ? a : b`.
#[inline]
fn cmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Largest magnitude of a group, `MAX`-folded from the first element.
#[inline]
fn group_max(xb: &[f32]) -> f32 {
    xb[1..].iter().fold(xb[0].abs(), |m, v| cmax(m, v.abs()))
}

/// σ² of a super-block: `2·Σx²/256`, the sum sequential from +0.0.
#[inline]
fn sigma2(xbl: &[f32]) -> f32 {
    let mut sumx2 = 0.0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    2.0 * sumx2 / 256.0
}

/// `iq1_find_best_neighbour2`: of the listed grid points, the one minimising
/// `Σ (w·(scale·xg[level] − x))·(scale·xg[level] − x)` (the first on ties); its levels go to `l`.
///
/// llama.cpp falls back to a scan of the whole grid when no listed distance is below `f32::MAX` (only
/// NaN or infinite distances, i.e. non-finite data), and that scan reads `xval` with the grid index
/// instead of the coordinate (out of bounds). It is not reachable with finite data; here the scan uses
/// the coordinate, and where even it finds nothing (llama.cpp aborts) the first listed point is taken.
fn best_neighbour2(
    lat: &Lattice,
    list: &[u16],
    xval: &[f32],
    w: &[f32],
    scale: f32,
    xg: &[f32; 3],
    l: &mut [i8],
) -> usize {
    let dist = |k: usize| {
        let mut d2 = 0.0f32;
        for (c, &p) in lat.positions(k).iter().enumerate() {
            let q = xg[((p - 1) / 2) as usize];
            let diff = scale * q - xval[c];
            d2 += w[c] * diff * diff;
        }
        d2
    };
    let mut best = f32::MAX;
    let mut index = None;
    for &j in list {
        let d2 = dist(j as usize);
        if d2 < best {
            best = d2;
            index = Some(j as usize);
        }
    }
    if index.is_none() {
        for k in 0..IQ1S_GRID.len() {
            let d2 = dist(k);
            if d2 < best {
                best = d2;
                index = Some(k);
            }
        }
    }
    let index = index.unwrap_or(list[0] as usize);
    lat.levels_of(index, l);
    index
}

/// The 8-groups' grid indices for levels `l` (off-grid groups snapped by [`best_neighbour2`], which
/// rewrites their levels); `xx(k)` gives group k's shifted values. Returns whether all were on the grid.
#[inline]
fn snap_groups(
    lat: &Lattice,
    l: &mut [i8],
    xb: &[f32],
    weight: &[f32],
    scale: f32,
    xx: impl Fn(usize) -> &'static [f32; 3],
    index: &mut [u16],
) -> bool {
    let mut all_on_grid = true;
    for (k, ix) in index.iter_mut().enumerate() {
        let r = 8 * k..8 * k + 8;
        let g = match lat.lookup(lat.pack(&l[r.clone()])) {
            Ok(g) => g,
            Err(list) => {
                all_on_grid = false;
                best_neighbour2(
                    lat,
                    list,
                    &xb[r.clone()],
                    &weight[r.clone()],
                    scale,
                    xx(k),
                    &mut l[r],
                )
            }
        };
        *ix = g as u16;
    }
    all_on_grid
}

/// The least-squares scale of the snapped groups, `Σ(w·q)·x / Σ(w·q)·q` with `q = xx(k)[level]`, or
/// `scale` unless both sums are positive.
#[inline]
fn refit(
    lat: &Lattice,
    index: &[u16],
    xb: &[f32],
    weight: &[f32],
    xx: impl Fn(usize) -> &'static [f32; 3],
    scale: f32,
) -> f32 {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for (k, &ix) in index.iter().enumerate() {
        let t = xx(k);
        for (j, &p) in lat.positions(ix as usize).iter().enumerate() {
            let w = weight[8 * k + j];
            let q = t[((p - 1) / 2) as usize];
            sumqx += w * q * xb[8 * k + j];
            sumq2 += w * q * q;
        }
    }
    if sumqx > 0.0 && sumq2 > 0.0 {
        sumqx / sumq2
    } else {
        scale
    }
}

/// Levels from the sorted order and the two cut points: sorted positions `< i1` → 0, `< i2` → 1, else 2.
#[inline]
fn assign_levels(pairs: &[(f32, u8)], i1: usize, i2: usize, l: &mut [i8]) {
    for (j, &(_, i)) in pairs.iter().enumerate() {
        l[i as usize] = if j < i1 {
            0
        } else if j < i2 {
            1
        } else {
            2
        };
    }
}

/// `quantize_iq1_s` (`quantize_row_iq1_s_impl`) over whole 256-blocks. llama.cpp requires importance
/// weights for IQ1_S; without them this takes every importance as 1 (callers should refuse instead).
pub(super) fn quantize_iq1_s(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    const BS: usize = 32;
    let lat = Lattice::get(Which::Iq1);
    let mut scales = [0.0f32; 8];
    let mut shifts = [0i8; 8];
    let mut weight = [0.0f32; BS];
    let mut pairs = [(0.0f32, 0u8); BS];
    let mut tmp = [(0.0f32, 0u8); BS];
    let mut sumx = [0.0f32; BS + 1];
    let mut sumw = [0.0f32; BS + 1];
    let mut l = [0i8; BS];
    let mut index = [0u16; BS / 8];

    for (ibl, (xbl, y)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(IQ1S_BYTES))
        .enumerate()
    {
        // d = +0, qs and qh cleared.
        y.fill(0);
        let mut max_scale = 0.0f32;
        let sigma2 = sigma2(xbl);

        for ib in 0..256 / BS {
            let xb = &xbl[BS * ib..BS * ib + BS];
            match importance {
                Some(qw) => {
                    let qw = &qw[256 * ibl + BS * ib..256 * ibl + BS * ib + BS];
                    for i in 0..BS {
                        weight[i] = qw[i] * (sigma2 + xb[i] * xb[i]).sqrt();
                    }
                }
                None => {
                    for i in 0..BS {
                        weight[i] = (sigma2 + xb[i] * xb[i]).sqrt();
                    }
                }
            }
            let max = group_max(xb);
            scales[ib] = 0.0;
            shifts[ib] = 1;
            if max < EPS_S {
                continue;
            }
            sort_pairs(xb, &mut pairs, &mut tmp);
            for (j, &(_, i)) in pairs.iter().enumerate() {
                let i = i as usize;
                sumx[j + 1] = sumx[j] + weight[i] * xb[i];
                sumw[j + 1] = sumw[j] + weight[i];
            }
            // Exhaustive search of the two cut points, shift + then − for each.
            let mut best_score = -f32::MAX;
            let mut scale = max;
            let (mut besti1, mut besti2, mut best_shift) = (0, 0, 0i8);
            for i1 in 0..=BS {
                for i2 in i1..=BS {
                    let (a, b, c) = (sumx[i1] - sumx[0], sumx[i2] - sumx[i1], sumx[BS] - sumx[i2]);
                    let (aw, bw, cw) =
                        (sumw[i1] - sumw[0], sumw[i2] - sumw[i1], sumw[BS] - sumw[i2]);
                    for (t, shift) in [(&X_P, 1i8), (&X_M, -1)] {
                        let sumqx = a * t[0] + b * t[1] + c * t[2];
                        let sumq2 = aw * t[0] * t[0] + bw * t[1] * t[1] + cw * t[2] * t[2];
                        if sumq2 > 0.0 && sumqx * sumqx > best_score * sumq2 {
                            scale = sumqx / sumq2;
                            best_score = scale * sumqx;
                            besti1 = i1;
                            besti2 = i2;
                            best_shift = shift;
                        }
                    }
                }
            }
            if best_shift == 0 {
                continue;
            }
            assign_levels(&pairs, besti1, besti2, &mut l);
            if scale < 0.0 {
                for v in l.iter_mut() {
                    *v = 2 - *v;
                }
                scale = -scale;
                best_shift = -best_shift;
            }
            let xx: &'static [f32; 3] = if best_shift == 1 { &X_P } else { &X_M };
            if !snap_groups(lat, &mut l, xb, &weight, scale, |_| xx, &mut index) {
                scale = refit(lat, &index, xb, &weight, |_| xx, scale);
            }
            let mut h = 0u16;
            for (k, &ix) in index.iter().enumerate() {
                y[2 + 4 * ib + k] = ix as u8;
                h |= (ix >> 8) << (3 * k);
            }
            y[34 + 2 * ib..36 + 2 * ib].copy_from_slice(&h.to_le_bytes());
            scales[ib] = scale;
            shifts[ib] = best_shift;
            max_scale = cmax(max_scale, scale);
        }

        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / 15.0;
        put_f16(&mut y[..2], d * 1.125);
        let id = 1.0 / d;
        for ib in 0..256 / BS {
            let mut code = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7) as u16;
            if shifts[ib] == -1 {
                code |= 8;
            }
            let q = &mut y[34 + 2 * ib..36 + 2 * ib];
            let h = u16::from_le_bytes([q[0], q[1]]) | code << 12;
            q.copy_from_slice(&h.to_le_bytes());
        }
    }
}

/// IQ1_M's shift-sign pair code c (0..3 = (+,+), (+,−), (−,+), (−,−) for the two 8-groups) → group k's
/// shifted values.
#[inline]
fn xx_m(c: u8, k: usize) -> &'static [f32; 3] {
    let plus = if k == 0 { c < 2 } else { c.is_multiple_of(2) };
    if plus {
        &X_P
    } else {
        &X_M
    }
}

/// `quantize_iq1_m` (`quantize_row_iq1_m_impl`) over whole 256-blocks; without importance weights the
/// weights are `x²`, as in llama.cpp.
pub(super) fn quantize_iq1_m(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    const BS: usize = 16;
    const MASKS: [u8; 4] = [0x00, 0x80, 0x08, 0x88];
    let lat = Lattice::get(Which::Iq1);
    let mut scales = [0.0f32; 16];
    let mut shifts = [0u8; 16];
    let mut weights = [0.0f32; 256];
    let mut pairs = [(0.0f32, 0u8); BS];
    let mut tmp = [(0.0f32, 0u8); BS];
    let mut l = [0i8; BS];
    let mut index = [0u16; BS / 8];
    // Per sorted position j and level: the increments `(w·t)·x` and `(w·t)·t` of the four sums.
    let mut incx = [[[0.0f32; 4]; BS]; 3];
    let mut inc2 = [[[0.0f32; 4]; BS]; 3];

    for (ibl, (xbl, y)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(IQ1M_BYTES))
        .enumerate()
    {
        y.fill(0);
        let mut max_scale = 0.0f32;
        let sigma2 = sigma2(xbl);
        match importance {
            Some(qw) => {
                let qw = &qw[256 * ibl..256 * ibl + 256];
                for i in 0..256 {
                    weights[i] = qw[i] * (sigma2 + xbl[i] * xbl[i]).sqrt();
                }
            }
            None => {
                for i in 0..256 {
                    weights[i] = xbl[i] * xbl[i];
                }
            }
        }

        for ib in 0..256 / BS {
            let xb = &xbl[BS * ib..BS * ib + BS];
            let weight = &weights[BS * ib..BS * ib + BS];
            let max = group_max(xb);
            scales[ib] = 0.0;
            shifts[ib] = 0;
            if max < EPS_M {
                continue;
            }
            sort_pairs(xb, &mut pairs, &mut tmp);
            for (j, &(_, i)) in pairs.iter().enumerate() {
                let i = i as usize;
                for lv in 0..3 {
                    let (p, m) = (weight[i] * X_P[lv], weight[i] * X_M[lv]);
                    let (px, mx) = (p * xb[i], m * xb[i]);
                    let (p2, m2) = (p * X_P[lv], m * X_M[lv]);
                    // Sums 0..3: group 0 is shifted + in 0 and 1, group 1 in 0 and 2.
                    (incx[lv][j], inc2[lv][j]) = if i < BS / 2 {
                        ([px, px, mx, mx], [p2, p2, m2, m2])
                    } else {
                        ([px, mx, px, mx], [p2, m2, p2, m2])
                    };
                }
            }
            // llama.cpp recomputes the four sums from scratch for every (i1, i2), walking the sorted
            // positions in order; the partial sums over the first i1 (level 0) and then up to i2
            // (level 1) are the same for every later i2 and are carried instead.
            let add = |s: &mut [f32; 4], d: &[f32; 4]| {
                for c in 0..4 {
                    s[c] += d[c];
                }
            };
            let mut best_score = -f32::MAX;
            let mut scale = max;
            let (mut besti1, mut besti2, mut best_k) = (0, 0, None::<u8>);
            let (mut s0x, mut s0q) = ([0.0f32; 4], [0.0f32; 4]);
            for i1 in 0..=BS {
                if i1 > 0 {
                    add(&mut s0x, &incx[0][i1 - 1]);
                    add(&mut s0q, &inc2[0][i1 - 1]);
                }
                let (mut s1x, mut s1q) = (s0x, s0q);
                for i2 in i1..=BS {
                    if i2 > i1 {
                        add(&mut s1x, &incx[1][i2 - 1]);
                        add(&mut s1q, &inc2[1][i2 - 1]);
                    }
                    let (mut sumqx, mut sumq2) = (s1x, s1q);
                    for j in i2..BS {
                        add(&mut sumqx, &incx[2][j]);
                        add(&mut sumq2, &inc2[2][j]);
                    }
                    for c in 0..4 {
                        if sumq2[c] > 0.0 && sumqx[c] * sumqx[c] > best_score * sumq2[c] {
                            scale = sumqx[c] / sumq2[c];
                            best_score = scale * sumqx[c];
                            besti1 = i1;
                            besti2 = i2;
                            best_k = Some(c as u8);
                        }
                    }
                }
            }
            let Some(mut best_k) = best_k else {
                continue;
            };
            assign_levels(&pairs, besti1, besti2, &mut l);
            if scale < 0.0 {
                for v in l.iter_mut() {
                    *v = 2 - *v;
                }
                scale = -scale;
                best_k = 3 - best_k;
            }
            if !snap_groups(
                lat,
                &mut l,
                xb,
                weight,
                scale,
                |k| xx_m(best_k, k),
                &mut index,
            ) {
                scale = refit(lat, &index, xb, weight, |k| xx_m(best_k, k), scale);
            }
            y[2 * ib] = index[0] as u8;
            y[2 * ib + 1] = index[1] as u8;
            y[32 + ib] = ((index[0] >> 8) | ((index[1] >> 8) << 4)) as u8;
            scales[ib] = scale;
            shifts[ib] = best_k;
            max_scale = cmax(max_scale, scale);
        }

        if max_scale == 0.0 {
            continue;
        }
        let mut sc = [0u16; 4];
        let mut d = max_scale / 15.0;
        let id = 1.0 / d;
        // Scale codes from the max-based d, then a least-squares refit of d over every block (zero
        // blocks too: grid index 0, code 0, both groups shifted +).
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for ib in 0..256 / BS {
            let code = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7);
            sc[ib / 4] |= (code as u16) << (3 * (ib % 4));
            y[32 + ib] |= MASKS[shifts[ib] as usize];
            let m = (2 * code + 1) as f32;
            let qh = y[32 + ib] as usize;
            for k in 0..2 {
                let t = xx_m(shifts[ib], k);
                let ix = y[2 * ib + k] as usize + ((qh << (8 - 4 * k)) & 0x700);
                for (j, &p) in lat.positions(ix).iter().enumerate() {
                    let e = BS * ib + 8 * k + j;
                    let w = weights[e];
                    let q = t[((p - 1) / 2) as usize] * m;
                    sumqx += w * q * xbl[e];
                    sumq2 += w * q * q;
                }
            }
        }
        if sumq2 > 0.0 {
            d = sumqx / sumq2;
        }
        let s = half::f16::from_f32(d * 1.1125).to_bits();
        sc[0] |= (s & 0x000F) << 12;
        sc[1] |= (s & 0x00F0) << 8;
        sc[2] |= (s & 0x0F00) << 4;
        sc[3] |= s & 0xF000;
        for (i, v) in sc.iter().enumerate() {
            y[48 + 2 * i..50 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::iq_lowbit::fixture;
    use super::*;

    #[test]
    fn iq1_quantizers_match_llama_cpp() {
        assert_eq!(fixture::check(19, IQ1S_BYTES, quantize_iq1_s), 1);
        assert_eq!(fixture::check(29, IQ1M_BYTES, quantize_iq1_m), 2);
    }

    fn grid(idx: usize, j: usize) -> f32 {
        IQ1S_GRID[idx][j] as i8 as f32
    }

    #[test]
    fn iq1_s_dequant_by_hand() {
        let mut b = [0u8; IQ1S_BYTES];
        put_f16(&mut b[..2], 1.0);
        // Group 0: scale code 3 (dl = 7), shift sign −, 8-group 0 = point 2047 (all +1), 8-group 1 =
        // point 0x2A5 (high bits 2 at bits 3..5).
        b[2] = 0xFF;
        b[3] = 0xA5;
        let h0: u16 = 0x8000 | 3 << 12 | 7 | 2 << 3;
        b[34..36].copy_from_slice(&h0.to_le_bytes());
        // Group 5: scale code 7, shift +, 8-group 3 = point 0x701.
        b[2 + 4 * 5 + 3] = 0x01;
        let h5: u16 = 7 << 12 | 7 << 9;
        b[34 + 10..36 + 10].copy_from_slice(&h5.to_le_bytes());
        let mut y = [0.0f32; 256];
        dequant_iq1_s(&b, &mut y);
        assert_eq!(&y[..8], &[6.125; 8]);
        for j in 0..8 {
            assert_eq!(y[8 + j], 7.0 * (grid(0x2A5, j) - 0.125));
            assert_eq!(y[16 + j], 7.0 * (grid(0, j) - 0.125));
            assert_eq!(y[160 + 24 + j], 15.0 * (grid(0x701, j) + 0.125));
            // Untouched groups: index 0, code 0, shift +: −0.875·d (grid 0 is all −1).
            assert_eq!(y[32 + j], -0.875);
        }
        // Every element by the layout formula.
        for e in 0..256 {
            let (g, l) = (e / 32, e % 32 / 8);
            let h = u16::from_le_bytes([b[34 + 2 * g], b[35 + 2 * g]]);
            let idx = b[2 + 4 * g + l] as usize + 256 * ((h >> (3 * l)) & 7) as usize;
            let delta = if h >> 15 == 1 { -0.125 } else { 0.125 };
            let want = (2 * ((h >> 12) & 7) + 1) as f32 * (grid(idx, e % 8) + delta);
            assert_eq!(y[e], want, "element {e}");
        }
    }

    #[test]
    fn iq1_m_dequant_by_hand() {
        let mut b = [0u8; IQ1M_BYTES];
        // d = f16 0x3E48 (1.5703125): nibbles 8, 4, E, 3 in the top nibbles of scales u16 0..3.
        let d = half::f16::from_bits(0x3E48).to_f32();
        assert_eq!(d, 1.570_312_5);
        let mut sc = [0x8000u16, 0x4000, 0xE000, 0x3000];
        sc[0] |= 5 | 2 << 3; // half-blocks 0 and 1: codes 5 and 2
        sc[3] |= 6 << 9; // half-block 15: code 6
        for (i, v) in sc.iter().enumerate() {
            b[48 + 2 * i..50 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        // Half-block 0: 8-group 0 = point 2047 shift +, 8-group 1 = point 0x3C2 shift −.
        b[0] = 0xFF;
        b[1] = 0xC2;
        b[32] = 7 | 3 << 4 | 0x80;
        // Half-block 15, 8-group 1: point 0x10A, shift −.
        b[31] = 0x0A;
        b[47] = 1 << 4 | 0x80;
        let mut y = [0.0f32; 256];
        dequant_iq1_m(&b, &mut y);
        for j in 0..8 {
            assert_eq!(y[j], (d * 11.0) * 1.125);
            assert_eq!(y[8 + j], (d * 11.0) * (grid(0x3C2, j) - 0.125));
            assert_eq!(y[16 + j], (d * 5.0) * (grid(0, j) + 0.125));
            assert_eq!(y[248 + j], (d * 13.0) * (grid(0x10A, j) - 0.125));
            assert_eq!(y[240 + j], (d * 13.0) * -0.875);
            assert_eq!(y[32 + j], d * -0.875);
        }
        // ggml's 32-group walk (`sc[g/2] >> 6(g%2)`, +3 for the second half) reads the same codes.
        for g in 0..8 {
            for half in 0..2 {
                let s = (sc[g / 2] >> (6 * (g % 2) + 3 * half)) & 7;
                let h = 2 * g + half;
                assert_eq!(s, (sc[h / 4] >> (3 * (h % 4))) & 7);
            }
        }
    }

    /// Relative RMS error of a quantize → dequantize round trip of one row.
    fn rel_rms(
        x: &[f32],
        q: fixture::Quantize,
        dq: fn(&[u8], &mut [f32]),
        bytes: usize,
        imp: Option<&[f32]>,
    ) -> f64 {
        let mut b = vec![0u8; x.len() / 256 * bytes];
        let mut y = vec![0.0f32; x.len()];
        q(x, &mut b, imp);
        dq(&b, &mut y);
        let (mut e2, mut x2) = (0.0f64, 0.0f64);
        for (&a, &b) in x.iter().zip(&y) {
            e2 += (a as f64 - b as f64).powi(2);
            x2 += (a as f64).powi(2);
        }
        (e2 / x2).sqrt()
    }

    #[test]
    fn iq1_round_trip_error_is_sane() {
        let f = fixture::load();
        // The first 192 rows are real model weights.
        let mut sums = [0.0f64; 3];
        for r in 0..192 {
            let x = &f.src[r * f.n_per_row..(r + 1) * f.n_per_row];
            let imp = Some(&f.imatrix[..]);
            let s = rel_rms(x, quantize_iq1_s, dequant_iq1_s, IQ1S_BYTES, imp);
            let m = rel_rms(x, quantize_iq1_m, dequant_iq1_m, IQ1M_BYTES, imp);
            let m0 = rel_rms(x, quantize_iq1_m, dequant_iq1_m, IQ1M_BYTES, None);
            // IQ1_S without importance: every importance taken as 1 (llama.cpp would refuse).
            let s0 = rel_rms(x, quantize_iq1_s, dequant_iq1_s, IQ1S_BYTES, None);
            // Measured on these rows: at most 0.585 (IQ1_S), 0.542 (IQ1_M) and 0.654 (IQ1_M, w = x²).
            assert!(
                s < 0.6 && m < 0.6 && m0 < 0.7 && s0 < 0.7,
                "row {r}: {s} {m} {m0} {s0}"
            );
            sums = [sums[0] + s, sums[1] + m, sums[2] + m0];
        }
        // Means (measured 0.505, 0.469, 0.583): IQ1_M's extra bits help, the imatrix helps.
        let [s, m, m0] = sums.map(|v| v / 192.0);
        assert!(s < 0.53 && m < 0.5 && m0 < 0.61, "{s} {m} {m0}");
        assert!(m < s && m < m0);
    }
}
