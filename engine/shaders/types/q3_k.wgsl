// Q3_K: 256-element blocks of 110 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b + 108u);
    let sb = b + 96u;
    let h = s / 4u;
    let g = s % 4u;
    let shift = 2u * g;
    let hbit = 4u * h + g;
    for (var half = 0u; half < 2u; half++) {
        let j = 8u * h + 2u * g + half;
        var low: u32;
        if (j < 8u) {
            low = u8_at(sb + j) & 15u;
        } else {
            low = u8_at(sb + j - 8u) >> 4u;
        }
        let high = (u8_at(sb + 8u + j % 4u) >> (2u * (j / 4u))) & 3u;
        let dl = d * f32(i32(low | (high << 4u)) - 32);
        let base = 32u * s + 16u * half;
        let q = b + 32u + 32u * h + 16u * half;
        let hm = b + 16u * half;
        for (var l = 0u; l < 16u; l++) {
            let lo = i32((u8_at(q + l) >> shift) & 3u);
            var sub = 4;
            if (((u8_at(hm + l) >> hbit) & 1u) != 0u) {
                sub = 0;
            }
            emit(base + l, dl * f32(lo - sub));
        }
    }
}
