//! K-quants: 256-element super-blocks.
//!
//! Layouts and formulas: gguf.md §2. Each value is `(d·scale)·q` or `(d·scale)·q − dmin·min`, with the
//! sub-block products formed first, exactly as ggml's `dequantize_row_q*_K` (and gguf-py) do, so results
//! are bit-exact.

use super::f16_at;

const QK_K: usize = 256;

/// Q4_K/Q5_K packed 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
#[inline]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

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
        let mut scales = [0i32; 16];
        for (j, s) in scales.iter_mut().enumerate() {
            let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
            let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
            *s = (low | (high << 4)) as i32 - 32;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
