// IQ1_M: u8 qs[32]; u8 qh[16]; u16 scales[4] (3-bit scales; the f16 d spread over their top nibbles).

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 56u;

// Emit sub-block s (elements 32s..32s+32: the 16-element halves 2s and 2s + 1) of the block at byte
// offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let s0 = u16_at(b + 48u);
    let s1 = u16_at(b + 50u);
    let s2 = u16_at(b + 52u);
    let s3 = u16_at(b + 54u);
    let d = f16_bits_to_f32((s0 >> 12u) | ((s1 >> 8u) & 0xf0u) | ((s2 >> 4u) & 0xf00u) | (s3 & 0xf000u));
    for (var h = 2u * s; h < 2u * s + 2u; h++) {
        let sc = u16_at(b + 48u + 2u * (h / 4u));
        let k = (sc >> (3u * (h % 4u))) & 7u;
        let dl = d * f32(2u * k + 1u);
        let q = u8_at(b + 32u + h);
        let e0 = u8_at(b + 2u * h) | ((q << 8u) & 0x700u);
        let e1 = u8_at(b + 2u * h + 1u) | ((q << 4u) & 0x700u);
        expand(e0, dl, delta_of((q & 0x08u) != 0u), 16u * h);
        expand(e1, dl, delta_of((q & 0x80u) != 0u), 16u * h + 8u);
    }
}
