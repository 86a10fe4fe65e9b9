//! Non-linear 4-bit grids: IQ4_NL and IQ4_XS.
//!
//! Layouts and formulas: gguf.md §2; bit-exact with ggml's `dequantize_row_iq4_*` and gguf-py.

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

#[cfg(test)]
mod tests {
    use super::*;

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
