// Q5_1: 32-element blocks of 24 bytes.

const BLOCK_ELEMS: u32 = 32u;
const BLOCK_BYTES: u32 = 24u;

// Emit sub-block s (the only one: s = 0) of the block at byte offset `b`: `emit(j, value)` for every
// element j.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let m = f16_at(b + 2u);
    let qh = u32_at(b + 4u);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(b + 8u + j);
        let q0 = (q & 15u) | (((qh >> j) & 1u) << 4u);
        let q1 = (q >> 4u) | (((qh >> (j + 16u)) & 1u) << 4u);
        emit(j, f32(q0) * d + m);
        emit(j + 16u, f32(q1) * d + m);
    }
}
