//! IQ3_XXS and IQ3_S: 3-bit i-quants whose 4-element groups are points of a lattice of odd levels.
//!
//! Layouts (iquants-lowbit.md §3), 256 elements per block, `d` an f16 super-block scale:
//! * IQ3_XXS (98 B, 3.06 bpw): `d; u8 qs[64]; u32 scales_and_signs[8]`. One 8-bit grid index per 4
//!   elements; per 32 elements four 7-bit sign codes (parity implied) and a 4-bit scale `s`;
//!   value = `d·(0.5 + s)·0.5 · grid · ±1`.
//! * IQ3_S (110 B, 3.44 bpw): `d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4]`. 9-bit indices (the
//!   high bit in qh), all 8 signs per 8 elements, a 4-bit scale per 32: value = `d·(1 + 2s) · grid · ±1`.
//!
//! The quantizers are llama.cpp's `quantize_row_iq3_xxs_impl` and `quantize_row_iq3_s_impl` bit for bit,
//! with or without importance weights (without: `w = x²`), including IQ3_S's write cursors that skip
//! all-zero groups (later groups of the block then sit one slot early in `qs`/`signs`).

use super::f16_at;
use super::iq_lowbit::{
    gmax, group_weights, scale_code, signed4x2, sum_sq, take_signs, GroupSearch, Lattice, Repass,
    Which, IQ3S_GRID_F32, IQ3XXS_GRID_F32, KSIGNS_IQ2XS,
};
use super::legacy::put_f16;

/// `f16 d; u8 qs[64]; u32 scales_and_signs[8]`.
pub(super) fn dequant_iq3_xxs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(98).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        let qs = &b[2..66];
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let o = 66 + 4 * g;
            let a = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let db = d * (0.5 + (a >> 28) as f32) * 0.5;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS_IQ2XS[((a >> (7 * l)) & 127) as usize];
                let g1 = &IQ3XXS_GRID_F32[qs[8 * g + 2 * l] as usize];
                let g2 = &IQ3XXS_GRID_F32[qs[8 * g + 2 * l + 1] as usize];
                signed4x2(db, g1, g2, signs, y);
            }
        }
    }
}

/// `f16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4]`.
pub(super) fn dequant_iq3_s(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b);
        let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let s = (scales[g / 2] >> (4 * (g % 2))) & 15;
            let db = d * (1 + 2 * s as i32) as f32;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let k = 2 * l;
                let i1 = qs[8 * g + k] as usize | ((qh[g] as usize >> k) & 1) << 8;
                let i2 = qs[8 * g + k + 1] as usize | ((qh[g] as usize >> (k + 1)) & 1) << 8;
                signed4x2(
                    db,
                    &IQ3S_GRID_F32[i1],
                    &IQ3S_GRID_F32[i2],
                    signs[4 * g + l],
                    y,
                );
            }
        }
    }
}

/// llama.cpp's IQ3_XXS quantizer, with or without importance weights.
pub(super) fn quantize_iq3_xxs(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    let search = GroupSearch {
        lat: Lattice::get(Which::Iq3xxs),
        kmaxq: 8,
        is_lo: -15,
        is_hi: 15,
        step: 0.2,
        on_grid_init: true,
        repass: Repass::OffGrid,
    };
    let (mut w, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
    let mut l = [0i8; 32];
    let mut idx = [0u16; 8];
    for (ibl, (x, b)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(98))
        .enumerate()
    {
        b.fill(0);
        let mut qs = [0u8; 64];
        let mut ss = [0u32; 8];
        let mut scales = [0f32; 8];
        let mut max_scale = 0.0f32;
        let sigma2 = 2.0 * sum_sq(x) / 256.0;
        for ib in 0..8 {
            let xb = &x[32 * ib..32 * ib + 32];
            let qw = importance.map(|q| &q[256 * ibl + 32 * ib..256 * ibl + 32 * ib + 32]);
            group_weights(xb, qw, sigma2, |v| v * v, &mut w, &mut waux);
            let mut signs = [0u8; 4];
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                signs[k] = take_signs(&xb[r.clone()], &w[r.clone()], &mut xval[r], true);
            }
            let max = xval[1..].iter().fold(xval[0], |m, &v| gmax(m, v));
            l.fill(0);
            if max < 1e-8 {
                continue;
            }
            let mut scale = search.run(&xval, &w, &waux, max, max / 15.0, &mut l, &mut idx);
            if scale < 0.0 {
                scale = -scale;
                for s in signs.iter_mut() {
                    *s = !*s & 127;
                }
            }
            for k in 0..8 {
                qs[8 * ib + k] = idx[k] as u8;
            }
            ss[ib] = signs[0] as u32
                | (signs[1] as u32) << 7
                | (signs[2] as u32) << 14
                | (signs[3] as u32) << 21;
            scales[ib] = scale;
            max_scale = gmax(max_scale, scale);
        }
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / 31.0;
        put_f16(b, d * 1.0125);
        let id = 1.0 / d;
        b[2..66].copy_from_slice(&qs);
        for ib in 0..8 {
            let v = ss[ib] | (scale_code(id, scales[ib]) as u32) << 28;
            b[66 + 4 * ib..70 + 4 * ib].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// llama.cpp's IQ3_S quantizer, with or without importance weights.
pub(super) fn quantize_iq3_s(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    let search = GroupSearch {
        lat: Lattice::get(Which::Iq3s),
        kmaxq: 8,
        is_lo: -9,
        is_hi: 9,
        step: 0.2,
        on_grid_init: false,
        repass: Repass::AllIfAnyOffGrid,
    };
    let (mut w, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
    let mut l = [0i8; 32];
    let mut idx = [0u16; 8];
    for (ibl, (x, b)) in src
        .chunks_exact(256)
        .zip(dst.chunks_exact_mut(110))
        .enumerate()
    {
        b.fill(0);
        let mut scales = [0f32; 8];
        let mut max_scale = 0.0f32;
        let sigma2 = 2.0 * sum_sq(x) / 256.0;
        // llama.cpp's write cursors into qs and signs advance only past non-zero groups.
        let (mut qs_at, mut signs_at) = (2usize, 74usize);
        for ib in 0..8 {
            let xb = &x[32 * ib..32 * ib + 32];
            let qw = importance.map(|q| &q[256 * ibl + 32 * ib..256 * ibl + 32 * ib + 32]);
            group_weights(xb, qw, sigma2, |v| v * v, &mut w, &mut waux);
            let mut signs = [0u8; 4];
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                signs[k] = take_signs(&xb[r.clone()], &w[r.clone()], &mut xval[r], false);
            }
            let max = xval[1..].iter().fold(xval[0], |m, &v| gmax(m, v));
            l.fill(0);
            if max == 0.0 {
                continue;
            }
            let mut scale = search.run(&xval, &w, &waux, max, max / 15.0, &mut l, &mut idx);
            if scale < 0.0 {
                scale = -scale;
                for s in signs.iter_mut() {
                    *s = !*s;
                }
            }
            for k in 0..8 {
                b[qs_at + k] = (idx[k] & 255) as u8;
                b[66 + ib] |= ((idx[k] >> 8) as u8) << k;
            }
            qs_at += 8;
            b[signs_at..signs_at + 4].copy_from_slice(&signs);
            signs_at += 4;
            scales[ib] = scale;
            max_scale = gmax(max_scale, scale);
        }
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / 31.0;
        put_f16(b, d * 1.033);
        let id = 1.0 / d;
        for p in 0..4 {
            b[106 + p] = scale_code(id, scales[2 * p]) | scale_code(id, scales[2 * p + 1]) << 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::iq_lowbit::fixture;

    #[test]
    fn iq3_quantizers_are_byte_identical_to_llama_cpp() {
        assert_eq!(fixture::check(18, 98, quantize_iq3_xxs), 2);
        assert_eq!(fixture::check(21, 110, quantize_iq3_s), 2);
    }
}
