// Q5_K: 256-element blocks of 176 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 176u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    for (var c = 0u; c < 4u; c++) {
        let s1 = sub_scale_min(2u * c, b);
        let s2 = sub_scale_min(2u * c + 1u, b);
        let q = b + 48u + 32u * c;
        for (var l = 0u; l < 32u; l++) {
            let v = u8_at(q + l);
            let qh = u8_at(b + 16u + l);
            let h1 = ((qh >> (2u * c)) & 1u) << 4u;
            let h2 = ((qh >> (2u * c + 1u)) & 1u) << 4u;
            emit(64u * c + l, s1.x * f32((v & 15u) | h1) - s1.y);
            emit(64u * c + 32u + l, s2.x * f32((v >> 4u) | h2) - s2.y);
        }
    }
}
