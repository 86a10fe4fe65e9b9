// Q4_K: 256-element blocks of 144 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 144u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
// Sub-blocks 2c and 2c + 1 are the low and high nibbles of the same 32 bytes.
fn dequant_sub(b: u32, s: u32) {
    let sm = sub_scale_min(s, b);
    let q = b + 16u + 32u * (s / 2u);
    let shift = 4u * (s % 2u);
    for (var l = 0u; l < 32u; l++) {
        let v = (u8_at(q + l) >> shift) & 15u;
        emit(32u * s + l, sm.x * f32(v) - sm.y);
    }
}
