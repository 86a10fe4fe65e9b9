// Q2_K: 256-element blocks of 84 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 84u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    let d = f16_at(b + 80u);
    let dmin = f16_at(b + 82u);
    for (var h = 0u; h < 2u; h++) {
        for (var g = 0u; g < 4u; g++) {
            let shift = 2u * g;
            for (var half = 0u; half < 2u; half++) {
                let sc = u8_at(b + 8u * h + 2u * g + half);
                let dl = d * f32(sc & 15u);
                let ml = dmin * f32(sc >> 4u);
                let base = 128u * h + 32u * g + 16u * half;
                let q = b + 16u + 32u * h + 16u * half;
                for (var l = 0u; l < 16u; l++) {
                    emit(base + l, dl * f32((u8_at(q + l) >> shift) & 3u) - ml);
                }
            }
        }
    }
}
