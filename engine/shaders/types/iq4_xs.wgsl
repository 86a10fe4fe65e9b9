// IQ4_XS: 256-element blocks of 136 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 136u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    let d = f16_at(b);
    let scales_h = u16_at(b + 2u);
    for (var ib = 0u; ib < 8u; ib++) {
        let ls = ((u8_at(b + 4u + ib / 2u) >> (4u * (ib % 2u))) & 15u) | (((scales_h >> (2u * ib)) & 3u) << 4u);
        let dl = d * f32(i32(ls) - 32);
        nibbles(b + 8u + 16u * ib, dl, 32u * ib);
    }
}
