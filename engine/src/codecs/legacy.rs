//! Legacy 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Layouts and formulas: gguf.md §2. Every element is computed with a single f32 multiply (and one add
//! for the `_1` types) in the same order as ggml's `dequantize_row_*`, so results are bit-exact.

use super::f16_at;

const QK: usize = 32;

/// `(q - 8) * d`, nibble j → element j, high nibble → element j + 16.
pub fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q4_0(src, dst) {
        dequant_q4_0_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q4_0`].
pub(super) fn dequant_q4_0_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let qs = &b[2..18];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// `q * d + m`.
pub fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q4_1(src, dst) {
        dequant_q4_1_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q4_1`].
pub(super) fn dequant_q4_1_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let m = f16_at(&b[2..]);
        let qs = &b[4..20];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (qs[j] & 0x0F) as f32 * d + m;
            hi[j] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// `(q - 16) * d` with the fifth bit of element e at bit e of `qh`.
pub fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q5_0(src, dst) {
        dequant_q5_0_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q5_0`].
pub(super) fn dequant_q5_0_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let q0 = (qs[j] & 0x0F) as u32 | h0;
            let q1 = (qs[j] >> 4) as u32 | h1;
            lo[j] = (q0 as i32 - 16) as f32 * d;
            hi[j] = (q1 as i32 - 16) as f32 * d;
        }
    }
}

/// `q * d + m`, q in 0..32.
pub fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q5_1(src, dst) {
        dequant_q5_1_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q5_1`].
pub(super) fn dequant_q5_1_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let m = f16_at(&b[2..]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs = &b[8..24];
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            let q0 = (qs[j] & 0x0F) as u32 | h0;
            let q1 = (qs[j] >> 4) as u32 | h1;
            lo[j] = q0 as f32 * d + m;
            hi[j] = q1 as f32 * d + m;
        }
    }
}

/// `qs[e] * d`, signed bytes.
pub fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    if !super::x86::dequant_q8_0(src, dst) {
        dequant_q8_0_scalar(src, dst);
    }
}

/// Scalar reference for [`dequant_q8_0`].
pub(super) fn dequant_q8_0_scalar(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        for (o, &q) in y.iter_mut().zip(&b[2..34]) {
            *o = (q as i8) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn legacy_nibble_and_fifth_bit_placement() {
        // Q4_0: byte j holds element j (low nibble) and element j + 16 (high nibble).
        let mut b = half(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0.0f32; 32];
        dequant_q4_0(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 2.0);
        }
        // Q5_1: bit e of qh is element e's fifth bit; value q·d + m.
        let mut b = half(0.5).to_vec();
        b.extend_from_slice(&half(-1.0));
        b.extend_from_slice(&(1u32 | 1 << 16 | 1 << 31).to_le_bytes());
        b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
        let mut y = [0.0f32; 32];
        dequant_q5_1(&b, &mut y);
        assert_eq!(
            (y[0], y[1], y[16], y[17], y[31]),
            (
                17.0 * 0.5 - 1.0,
                1.0 * 0.5 - 1.0,
                18.0 * 0.5 - 1.0,
                2.0 * 0.5 - 1.0,
                18.0 * 0.5 - 1.0
            )
        );
        // Q8_0: signed bytes.
        let mut b = half(-0.25).to_vec();
        b.extend((0..32).map(|i: i32| (i - 16) as u8));
        dequant_q8_0(&b, &mut y);
        assert_eq!((y[0], y[16], y[31]), (4.0, 0.0, -3.75));
    }
}
