// Q5_K: 256-element blocks of 176 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 176u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    let d = f16_at(b);
    let dmin = f16_at(b + 2u);
    for (var c = 0u; c < 4u; c++) {
        let sm1 = scale_min_k4(2u * c, b + 4u);
        let sm2 = scale_min_k4(2u * c + 1u, b + 4u);
        let d1 = d * f32(sm1.x);
        let m1 = dmin * f32(sm1.y);
        let d2 = d * f32(sm2.x);
        let m2 = dmin * f32(sm2.y);
        let q = b + 48u + 32u * c;
        for (var l = 0u; l < 32u; l++) {
            let v = u8_at(q + l);
            let qh = u8_at(b + 16u + l);
            let h1 = ((qh >> (2u * c)) & 1u) << 4u;
            let h2 = ((qh >> (2u * c + 1u)) & 1u) << 4u;
            emit(64u * c + l, d1 * f32((v & 15u) | h1) - m1);
            emit(64u * c + 32u + l, d2 * f32((v >> 4u) | h2) - m2);
        }
    }
}
