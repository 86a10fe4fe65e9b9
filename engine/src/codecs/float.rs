//! Plain float storage: F32, F16, BF16.

pub fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

pub fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    crate::simd::f16_to_f32(src, dst);
}

pub fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32::from_bits(u32::from(u16::from_le_bytes([s[0], s[1]])) << 16);
    }
}

pub fn quantize_f32(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

/// ggml's f32 → f16: IEEE round-to-nearest-even, overflow to ±inf, NaN → `0x7E00 | sign`.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7E00 | ((x.to_bits() >> 16) as u16 & 0x8000);
    }
    half::f16::from_f32(x).to_bits()
}

pub fn quantize_f16(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&f32_to_f16_bits(s).to_le_bytes());
    }
}

/// ggml's f32 → bf16: NaN → quiet NaN with the top bits kept, else round-to-nearest-even.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub fn quantize_bf16(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&f32_to_bf16_bits(s).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_conversions_round_like_ggml() {
        // f16: 1 + 2^-11 is a tie between 1 and 1 + 2^-10 → even (1.0); 1 + 3·2^-11 → up.
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
        assert_eq!(f32_to_f16_bits(70000.0), 0x7C00);
        assert_eq!(f32_to_f16_bits(-f32::NAN), 0xFE00);
        assert_eq!(f32_to_f16_bits(f32::NAN), 0x7E00);
        // bf16: ties to even on the 16 dropped bits.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7FC0_0001)), 0x7FC0);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7F80_0001)), 0x7FC0);
        // Round trips through the codec table.
        let x = [0.5f32, -1.25, 3.0e-5, 1234.5];
        for ty in [
            crate::codecs::GgmlType::F32,
            crate::codecs::GgmlType::F16,
            crate::codecs::GgmlType::BF16,
        ] {
            let mut q = vec![0u8; x.len() * ty.traits().block_bytes];
            ty.quantize(&x, &mut q, None).expect("has a quantizer");
            let mut back = [0.0f32; 4];
            ty.dequantize(&q, &mut back);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 4e-3, "{}: {a} → {b}", ty.name());
            }
        }
    }
}
