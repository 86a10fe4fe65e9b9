// Q6_K: 256-element blocks of 210 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 210u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    let d = f16_at(b + 208u);
    for (var h = 0u; h < 2u; h++) {
        let ql = b + 64u * h;
        let qh = b + 128u + 32u * h;
        let sc = b + 192u + 8u * h;
        let out = 128u * h;
        for (var l = 0u; l < 32u; l++) {
            let is = l / 16u;
            let a = u8_at(ql + l);
            let c = u8_at(ql + l + 32u);
            let hh = u8_at(qh + l);
            let q1 = i32((a & 15u) | ((hh & 3u) << 4u)) - 32;
            let q2 = i32((c & 15u) | (((hh >> 2u) & 3u) << 4u)) - 32;
            let q3 = i32((a >> 4u) | (((hh >> 4u) & 3u) << 4u)) - 32;
            let q4 = i32((c >> 4u) | (((hh >> 6u) & 3u) << 4u)) - 32;
            emit(out + l, (d * f32(i8_at(sc + is))) * f32(q1));
            emit(out + l + 32u, (d * f32(i8_at(sc + is + 2u))) * f32(q2));
            emit(out + l + 64u, (d * f32(i8_at(sc + is + 4u))) * f32(q3));
            emit(out + l + 96u, (d * f32(i8_at(sc + is + 6u))) * f32(q4));
        }
    }
}
