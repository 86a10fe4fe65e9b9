// Q6_K: 256-element blocks of 210 bytes.

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 210u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
// Each half (128 elements) takes four sub-blocks: quarter k reads the low (k < 2) or high nibbles of
// ql[32·(k % 2) + l], bits 2k..2k+2 of qh[l], and the scales 2k and 2k + 1.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b + 208u);
    let h = s / 4u;
    let k = s % 4u;
    let ql = b + 64u * h + 32u * (k % 2u);
    let qh = b + 128u + 32u * h;
    let sc = b + 192u + 8u * h + 2u * k;
    let shift = 4u * (k / 2u);
    for (var l = 0u; l < 32u; l++) {
        let lo = (u8_at(ql + l) >> shift) & 15u;
        let hi = (u8_at(qh + l) >> (2u * k)) & 3u;
        let q = i32(lo | (hi << 4u)) - 32;
        emit(32u * s + l, (d * f32(i8_at(sc + l / 16u))) * f32(q));
    }
}
