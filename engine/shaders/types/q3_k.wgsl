// Q3_K: 256-element blocks of 110 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    let d = f16_at(b + 108u);
    let s = b + 96u;
    for (var h = 0u; h < 2u; h++) {
        for (var g = 0u; g < 4u; g++) {
            let shift = 2u * g;
            let hbit = 4u * h + g;
            for (var half = 0u; half < 2u; half++) {
                let j = 8u * h + 2u * g + half;
                var low: u32;
                if (j < 8u) {
                    low = u8_at(s + j) & 15u;
                } else {
                    low = u8_at(s + j - 8u) >> 4u;
                }
                let high = (u8_at(s + 8u + j % 4u) >> (2u * (j / 4u))) & 3u;
                let dl = d * f32(i32(low | (high << 4u)) - 32);
                let base = 128u * h + 32u * g + 16u * half;
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
    }
}
