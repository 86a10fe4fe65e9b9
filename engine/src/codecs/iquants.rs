//! Non-linear 4-bit grids: IQ4_NL and IQ4_XS.
//!
//! Layouts and formulas: gguf.md §2; bit-exact with ggml's `dequantize_row_iq4_*` and gguf-py.
//!
//! The quantizers reproduce what llama.cpp's `ggml_quantize_chunk` does for these types
//! (`quantize_iq4_nl` / `quantize_iq4_xs`, i.e. `quantize_row_iq4_nl_impl` with 7 scale tries) bit for
//! bit, with or without importance weights. Everything they use is local to one block (IQ4_NL, 32
//! elements) or super-block (IQ4_XS, 256): the `sigma2` of the importance weighting is the mean square of
//! that (super-)block, not of the row, so `src` may be any whole number of blocks. `importance` holds one
//! weight per element of `src` (llama.cpp's per-column imatrix repeated for every row).

use super::f16_at;

pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The grid as f32, so the inner loop is a lookup and a multiply.
const KF: [f32; 16] = {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = KVALUES_IQ4NL[i] as f32;
        i += 1;
    }
    t
};

/// 32 elements from 16 nibble bytes, Q4_0 placement, scaled by `dl`.
#[inline]
fn nibbles(qs: &[u8], dl: f32, y: &mut [f32]) {
    let (lo, hi) = y.split_at_mut(16);
    for j in 0..16 {
        lo[j] = dl * KF[(qs[j] & 0x0F) as usize];
        hi[j] = dl * KF[(qs[j] >> 4) as usize];
    }
}

/// `f16 d; u8 qs[16]`.
pub fn dequant_iq4_nl(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        nibbles(&b[2..18], f16_at(b), y);
    }
}

/// `f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]`.
pub fn dequant_iq4_xs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(136).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let scales_l = &b[4..8];
        let qs = &b[8..136];
        for ib in 0..8 {
            let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F)
                | ((((scales_h >> (2 * ib)) & 3) as u8) << 4);
            let dl = d * (ls as i32 - 32) as f32;
            nibbles(
                &qs[16 * ib..16 * ib + 16],
                dl,
                &mut y[32 * ib..32 * ib + 32],
            );
        }
    }
}

/// Magnitudes below this count as an all-zero block (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Scale tries either side of the first guess (`quantize_iq4_*` pass 7).
const NTRY: i32 = 7;

/// ggml's `nearest_int`: round to nearest even through the 1.5·2²³ magic number (|x| < 2²²).
#[inline]
pub(super) fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007F_FFFF) - 0x0040_0000
}

/// Index of the grid value nearest `x` (the upper one on ties), by bisection like ggml's
/// `best_index_int8`.
#[inline]
fn best_index(x: f32) -> u8 {
    if x <= KF[0] {
        return 0;
    }
    if x >= KF[15] {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < KF[mav] {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - KF[mu - 1] < KF[mu] - x {
        (mu - 1) as u8
    } else {
        mu as u8
    }
}

/// `Σ w·q·x` and `Σ w·q²` of a block quantised with inverse scale `id`, in ggml's order.
#[inline]
fn sums(xb: &[f32], w: &[f32], id: f32, mut lb: Option<&mut [u8]>) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for j in 0..xb.len() {
        let l = best_index(id * xb[j]);
        if let Some(lb) = lb.as_deref_mut() {
            lb[j] = l;
        }
        let q = KF[l as usize];
        sumqx += w[j] * q * xb[j];
        sumq2 += w[j] * q * q;
    }
    (sumqx, sumq2)
}

/// One (super-)block of `x.len()` elements in 32-element sub-blocks, as ggml's
/// `quantize_row_iq4_nl_impl(x.len(), 32, …, ntry = 7)`. Returns the f16 scale `d`, and fills `l` (grid
/// indices) and, when there are several sub-blocks, the 6-bit sub-block scales `ls` (biased by 32).
fn iq4_block(x: &[f32], qw: Option<&[f32]>, l: &mut [u8], ls: &mut [u8]) -> f32 {
    const BS: usize = 32;
    let n = x.len();
    let mut sigma2 = 0.0f32;
    for &v in x {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / n as f32;

    let nsub = n / BS;
    let mut scales = [0.0f32; 8];
    let mut weight = [0.0f32; BS];
    let (mut max_scale, mut amax_scale) = (0.0f32, 0.0f32);
    for ib in 0..nsub {
        let xb = &x[ib * BS..ib * BS + BS];
        let lb = &mut l[ib * BS..ib * BS + BS];
        match qw {
            Some(qw) => {
                let qw = &qw[ib * BS..ib * BS + BS];
                for j in 0..BS {
                    weight[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
                }
            }
            None => {
                for j in 0..BS {
                    weight[j] = xb[j] * xb[j];
                }
            }
        }
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let d0 = -max / KF[0];
        let (sumqx, sumq2) = sums(xb, &weight, 1.0 / d0, Some(lb));
        let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -NTRY..=NTRY {
            let id = (itry + KVALUES_IQ4NL[0] as i32) as f32 / max;
            let (sumqx, sumq2) = sums(xb, &weight, id, None);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }

    if nsub > 1 {
        let d = -max_scale / 32.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for ib in 0..nsub {
            let li = nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * li as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            for (o, &v) in l[ib * BS..ib * BS + BS]
                .iter_mut()
                .zip(&x[ib * BS..ib * BS + BS])
            {
                *o = best_index(idl * v);
            }
            ls[ib] = (li + 32) as u8;
        }
        d
    } else {
        let d = scales[0];
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (o, &v) in l.iter_mut().zip(x) {
            *o = best_index(id * v);
        }
        d
    }
}

/// Pack 32-element groups of grid indices into nibbles, Q4_0 placement.
fn pack_nibbles(l: &[u8], qs: &mut [u8]) {
    for (lg, qg) in l.chunks_exact(32).zip(qs.chunks_exact_mut(16)) {
        for j in 0..16 {
            qg[j] = lg[j] | (lg[j + 16] << 4);
        }
    }
}

/// llama.cpp's IQ4_NL quantizer (`quantize_iq4_nl`), with or without importance weights.
pub fn quantize_iq4_nl(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    let mut l = [0u8; 32];
    for (i, (x, b)) in src
        .chunks_exact(32)
        .zip(dst.chunks_exact_mut(18))
        .enumerate()
    {
        let qw = importance.map(|w| &w[32 * i..32 * i + 32]);
        let d = iq4_block(x, qw, &mut l, &mut []);
        super::legacy::put_f16(b, d);
        pack_nibbles(&l, &mut b[2..18]);
    }
}

/// llama.cpp's IQ4_XS quantizer (`quantize_iq4_xs`), with or without importance weights.
pub fn quantize_iq4_xs(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    let mut l = [0u8; 256];
    let mut ls = [0u8; 8];
    for (i, (x, b)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(136))
        .enumerate()
    {
        let qw = importance.map(|w| &w[256 * i..256 * i + 256]);
        let d = iq4_block(x, qw, &mut l, &mut ls);
        super::legacy::put_f16(b, d);
        let mut scales_h = 0u16;
        let mut scales_l = [0u8; 4];
        for (ib, &s) in ls.iter().enumerate() {
            scales_l[ib / 2] |= (s & 0x0F) << (4 * (ib % 2));
            scales_h |= ((s >> 4) as u16) << (2 * ib);
        }
        b[2..4].copy_from_slice(&scales_h.to_le_bytes());
        b[4..8].copy_from_slice(&scales_l);
        pack_nibbles(&l, &mut b[8..136]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::GgmlType;

    #[test]
    fn iq4_quantizers_match_llama_cpp() {
        // Without and with an importance matrix. The weighted scale search may give up accuracy on the
        // block's extreme element for the rest (and IQ4_XS rounds sub-block scales to 6 bits), so the
        // per-element bound is loose: 0.3 / 0.4 of the block's largest magnitude.
        assert_eq!(
            crate::codecs::legacy::fixture::check(GgmlType::Iq4Nl, 0.3),
            2
        );
        assert_eq!(
            crate::codecs::legacy::fixture::check(GgmlType::Iq4Xs, 0.4),
            2
        );
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, -7.6].map(nearest_int),
            [0, 2, 2, 0, -2, 2, -8]
        );
    }

    #[test]
    fn iq4_grid_and_xs_scales() {
        let mut b = half::f16::from_f32(1.0).to_bits().to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0.0f32; 32];
        dequant_iq4_nl(&b, &mut y);
        for j in 0..16 {
            assert_eq!(
                (y[j], y[j + 16]),
                (KVALUES_IQ4NL[j] as f32, KVALUES_IQ4NL[15 - j] as f32)
            );
        }
        // IQ4_XS: sub-block ib's 6-bit scale = nibble ib%2 of scales_l[ib/2] | bits 2ib..2ib+2 of scales_h.
        let mut b = vec![0u8; 136];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&(0b11u16 << 6).to_le_bytes()); // sub-block 3: high bits 3
        b[5] = 0x70; // sub-block 3: low nibble 7
        let mut y = [0.0f32; 256];
        dequant_iq4_xs(&b, &mut y);
        assert_eq!(y[0], 0.5 * -32.0 * -127.0);
        assert_eq!(y[96], 0.5 * ((7 | 3 << 4) as f32 - 32.0) * -127.0);
    }
}
