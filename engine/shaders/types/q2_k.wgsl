// Q2_K: 256-element blocks of 84 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 84u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b + 80u);
    let dmin = f16_at(b + 82u);
    let h = s / 4u;
    let g = s % 4u;
    let shift = 2u * g;
    for (var half = 0u; half < 2u; half++) {
        let sc = u8_at(b + 8u * h + 2u * g + half);
        let dl = d * f32(sc & 15u);
        let ml = dmin * f32(sc >> 4u);
        let base = 32u * s + 16u * half;
        let q = b + 16u + 32u * h + 16u * half;
        for (var l = 0u; l < 16u; l++) {
            emit(base + l, dl * f32((u8_at(q + l) >> shift) & 3u) - ml);
        }
    }
}
