// IQ4_XS: 256-element blocks of 136 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 136u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let scales_h = u16_at(b + 2u);
    let ls = ((u8_at(b + 4u + s / 2u) >> (4u * (s % 2u))) & 15u) | (((scales_h >> (2u * s)) & 3u) << 4u);
    let dl = d * f32(i32(ls) - 32);
    nibbles(b + 8u + 16u * s, dl, 32u * s);
}
