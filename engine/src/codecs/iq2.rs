//! IQ2_XXS, IQ2_XS and IQ2_S: 2-bit i-quants whose 8-element groups are points of an E8-like lattice.
//!
//! Layouts (iquants-lowbit.md §3), 256 elements per block, `d` an f16 super-block scale:
//! * IQ2_XXS (66 B, 2.06 bpw): `d; u16 qs[32]`. Per 32 elements two u32: four 8-bit grid indices, then
//!   four 7-bit sign codes (the 8th sign is the parity of the seven) and a 4-bit scale `s`;
//!   value = `d·(0.5 + s)·0.25 · grid · ±1`.
//! * IQ2_XS (74 B, 2.31 bpw): `d; u16 qs[32]; u8 scales[8]`. Each u16 is a 9-bit index and a 7-bit sign
//!   code; a 4-bit scale per 16 elements.
//! * IQ2_S (82 B, 2.56 bpw): `d; u8 qs[64]; u8 qh[8]; u8 scales[8]`. 10-bit indices (low byte in qs, two
//!   high bits in qh), all 8 signs stored (qs[32..]), a 4-bit scale per 16 elements.
//!
//! The quantizers are llama.cpp's (`quantize_row_iq2_xxs_impl`, `_xs_impl`, `_s_impl`) bit for bit: per
//! group, signs are taken out, then [`GroupSearch`] tries a range of scales, snapping each 8-element
//! subgroup to the lattice (or its nearest listed neighbour), and refits; the super-block keeps the
//! largest group scale over 31 and 4-bit codes for the groups. IQ2_XXS and IQ2_XS need importance
//! weights (llama.cpp asserts; our planners refuse without an imatrix): called without, they weigh
//! every column 1.

use super::f16_at;
use super::iq_lowbit::{
    gmax, group_weights, scale_code, signed8, sum_sq, take_signs, GroupSearch, Repass, Which,
    IQ2S_GRID_F32, IQ2XS_GRID_F32, IQ2XXS_GRID_F32, KSIGNS_IQ2XS,
};
use super::kquants::make_qp_quants;
use super::legacy::put_f16;

/// `f16 d; u16 qs[32]`.
pub(super) fn dequant_iq2_xxs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(66).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let q = &b[2 + 8 * g..10 + 8 * g];
            let a1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
            let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
                signed8(db, &IQ2XXS_GRID_F32[q[l] as usize], signs, y);
            }
        }
    }
}

/// `f16 d; u16 qs[32]; u8 scales[8]`.
pub(super) fn dequant_iq2_xs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(74).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        let scales = &b[66..74];
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let db = [
                d * (0.5 + (scales[g] & 15) as f32) * 0.25,
                d * (0.5 + (scales[g] >> 4) as f32) * 0.25,
            ];
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let o = 2 + 2 * (4 * g + l);
                let v = u16::from_le_bytes([b[o], b[o + 1]]);
                let signs = KSIGNS_IQ2XS[(v >> 9) as usize];
                signed8(db[l / 2], &IQ2XS_GRID_F32[(v & 511) as usize], signs, y);
            }
        }
    }
}

/// `f16 d; u8 qs[32]; u8 signs[32]; u8 qh[8]; u8 scales[8]`.
pub(super) fn dequant_iq2_s(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(82).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let db = [
                d * (0.5 + (scales[g] & 15) as f32) * 0.25,
                d * (0.5 + (scales[g] >> 4) as f32) * 0.25,
            ];
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let t = 4 * g + l;
                let idx = qs[t] as usize | ((qh[g] as usize) << (8 - 2 * l) & 0x300);
                signed8(db[l / 2], &IQ2S_GRID_F32[idx], signs[t], y);
            }
        }
    }
}

/// llama.cpp's IQ2_XXS quantizer. Needs importance weights (see the module notes).
pub(super) fn quantize_iq2_xxs(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    const EPS: f32 = 1e-15;
    let search = GroupSearch::iq2(Which::Iq2xxs, -6, Repass::Always);
    let (mut w, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
    let mut l = [0i8; 32];
    let mut lu = [0u8; 32];
    let mut idx = [0u16; 4];
    for (ibl, (x, b)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(66))
        .enumerate()
    {
        b.fill(0);
        let mut q2 = [0u32; 16];
        let mut scales = [0f32; 8];
        let mut max_scale = 0.0f32;
        let sigma2 = sum_sq(x) / 256.0;
        for ib in 0..8 {
            let xb = &x[32 * ib..32 * ib + 32];
            let qw = importance.map(|q| &q[256 * ibl + 32 * ib..256 * ibl + 32 * ib + 32]);
            group_weights(xb, qw, sigma2, |_| 1.0, &mut w, &mut waux);
            let mut signs = [0u8; 4];
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                signs[k] = take_signs(&xb[r.clone()], &w[r.clone()], &mut xval[r], true);
            }
            let max = xval[1..].iter().fold(xval[0], |m, &v| gmax(m, v));
            if max < EPS {
                continue;
            }
            let scale0 = make_qp_quants(4, &xval, &mut lu, &w);
            let eff_max = scale0 * 3.0;
            if eff_max <= 0.0 {
                continue;
            }
            for (o, &v) in l.iter_mut().zip(&lu) {
                *o = v as i8;
            }
            let mut scale = search.run(&xval, &w, &waux, eff_max, scale0, &mut l, &mut idx);
            if scale < 0.0 {
                scale = -scale;
                for s in signs.iter_mut() {
                    *s = !*s & 127;
                }
            }
            for k in 0..4 {
                q2[2 * ib] |= (idx[k] as u32) << (8 * k);
                q2[2 * ib + 1] |= (signs[k] as u32) << (7 * k);
            }
            scales[ib] = scale;
            max_scale = gmax(max_scale, scale);
        }
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / 31.0;
        put_f16(b, d);
        let id = 1.0 / d;
        for ib in 0..8 {
            q2[2 * ib + 1] |= (scale_code(id, scales[ib]) as u32) << 28;
        }
        for (o, v) in b[2..].chunks_exact_mut(4).zip(q2) {
            o.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The IQ2_XS / IQ2_S flow: 16-element groups of two 8-element subgroups.
struct Iq2Pair {
    search: GroupSearch,
    eps: f32,
    /// σ² = `sigma_mul·Σx²/256`.
    sigma_mul: f32,
    /// IQ2_XS stores 7 sign bits (parity), IQ2_S all 8.
    parity: bool,
    /// Stored `d` = f16(max_scale/31 · fudge).
    fudge: f32,
}

impl Iq2Pair {
    /// Quantise one super-block: group scales, their signs and grid indices through `put(group, subgroup,
    /// index, signs)`, and the block scale `d` and 4-bit group codes (returned; `None` for an all-zero block).
    fn block(
        &self,
        x: &[f32],
        qw: Option<&[f32]>,
        mut put: impl FnMut(usize, usize, u16, u8),
    ) -> Option<(f32, [u8; 16])> {
        let (mut w, mut waux, mut xval) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        let mut l = [0i8; 16];
        let mut idx = [0u16; 2];
        let mut scales = [0f32; 16];
        let mut max_scale = 0.0f32;
        let sigma2 = self.sigma_mul * sum_sq(x) / 256.0;
        for ib in 0..16 {
            let xb = &x[16 * ib..16 * ib + 16];
            let q = qw.map(|q| &q[16 * ib..16 * ib + 16]);
            group_weights(xb, q, sigma2, |v| 0.25 * sigma2 + v * v, &mut w, &mut waux);
            let mut signs = [0u8; 2];
            for k in 0..2 {
                let r = 8 * k..8 * k + 8;
                signs[k] = take_signs(&xb[r.clone()], &w[r.clone()], &mut xval[r], self.parity);
            }
            let max = xval[1..].iter().fold(xval[0], |m, &v| gmax(m, v));
            l.fill(0);
            if max < self.eps {
                continue;
            }
            let mut scale = self
                .search
                .run(&xval, &w, &waux, max, max / 5.0, &mut l, &mut idx);
            if scale < 0.0 {
                scale = -scale;
                for s in signs.iter_mut() {
                    *s = if self.parity { !*s & 127 } else { !*s };
                }
            }
            for k in 0..2 {
                put(ib, k, idx[k], signs[k]);
            }
            scales[ib] = scale;
            max_scale = gmax(max_scale, scale);
        }
        if max_scale == 0.0 {
            return None;
        }
        let d = max_scale / 31.0;
        let id = 1.0 / d;
        let mut codes = [0u8; 16];
        for ib in 0..16 {
            codes[ib] = scale_code(id, scales[ib]);
        }
        Some((d * self.fudge, codes))
    }
}

/// llama.cpp's IQ2_XS quantizer. Needs importance weights (see the module notes).
pub(super) fn quantize_iq2_xs(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    let pair = Iq2Pair {
        search: GroupSearch::iq2(Which::Iq2xs, -9, Repass::OffGrid),
        eps: 1e-15,
        sigma_mul: 1.0,
        parity: true,
        fudge: 1.0,
    };
    let ones = [1.0f32; 256];
    for (ibl, (x, b)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(74))
        .enumerate()
    {
        b.fill(0);
        let qw = importance.map_or(&ones[..], |q| &q[256 * ibl..256 * ibl + 256]);
        let mut q2 = [0u16; 32];
        let Some((d, codes)) = pair.block(x, Some(qw), |ib, k, idx, s| {
            q2[2 * ib + k] = idx | (s as u16) << 9;
        }) else {
            continue;
        };
        put_f16(b, d);
        for (o, v) in b[2..66].chunks_exact_mut(2).zip(q2) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        for ib in 0..16 {
            b[66 + ib / 2] |= codes[ib] << (4 * (ib % 2));
        }
    }
}

/// llama.cpp's IQ2_S quantizer, with or without importance weights.
pub(super) fn quantize_iq2_s(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    let pair = Iq2Pair {
        search: GroupSearch::iq2(Which::Iq2s, -9, Repass::OffGrid),
        eps: 1e-8,
        sigma_mul: 2.0,
        parity: false,
        fudge: 0.9875,
    };
    for (ibl, (x, b)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(82))
        .enumerate()
    {
        b.fill(0);
        let qw = importance.map(|q| &q[256 * ibl..256 * ibl + 256]);
        let mut body = [0u8; 72];
        let coded = pair.block(x, qw, |ib, k, idx, s| {
            let t = 2 * ib + k;
            body[t] = (idx & 255) as u8;
            body[64 + t / 4] |= ((idx >> 8) as u8) << (2 * (t % 4));
            body[32 + t] = s;
        });
        // As llama.cpp, the groups' bytes stay even when every group scale came out 0.
        b[2..74].copy_from_slice(&body);
        let Some((d, codes)) = coded else {
            continue;
        };
        put_f16(b, d);
        for ib in 0..16 {
            b[74 + ib / 2] |= codes[ib] << (4 * (ib % 2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::iq_lowbit::fixture;

    #[test]
    fn iq2_quantizers_are_byte_identical_to_llama_cpp() {
        assert_eq!(fixture::check(16, 66, quantize_iq2_xxs), 1);
        assert_eq!(fixture::check(17, 74, quantize_iq2_xs), 1);
        assert_eq!(fixture::check(22, 82, quantize_iq2_s), 2);
    }
}
