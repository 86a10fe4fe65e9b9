// Q5_0: 32-element blocks of 22 bytes.

const BLOCK_ELEMS: u32 = 32u;
const BLOCK_BYTES: u32 = 22u;

// Emit sub-block s (the only one: s = 0) of the block at byte offset `b`: `emit(j, value)` for every
// element j.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let qh = u32_at(b + 2u);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(b + 6u + j);
        let q0 = (q & 15u) | (((qh >> j) & 1u) << 4u);
        let q1 = (q >> 4u) | (((qh >> (j + 16u)) & 1u) << 4u);
        emit(j, f32(i32(q0) - 16) * d);
        emit(j + 16u, f32(i32(q1) - 16) * d);
    }
}
