// Q5_K: 256-element blocks of 176 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 176u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
// Sub-blocks 2c and 2c + 1 are the low and high nibbles of the same 32 bytes; bit s of each qh byte is
// the fifth bit.
fn dequant_sub(b: u32, s: u32) {
    let sm = sub_scale_min(s, b);
    let q = b + 48u + 32u * (s / 2u);
    let shift = 4u * (s % 2u);
    for (var l = 0u; l < 32u; l++) {
        let v = (u8_at(q + l) >> shift) & 15u;
        let h = ((u8_at(b + 16u + l) >> s) & 1u) << 4u;
        emit(32u * s + l, sm.x * f32(v | h) - sm.y);
    }
}
