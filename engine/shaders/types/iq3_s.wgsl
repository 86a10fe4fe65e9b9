// IQ3_S: f16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4] (9-bit indices of 4-element points).

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;
const WORDS_PER_POINT: u32 = 1u;
const SIGNS_OFF: u32 = 512u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let sc = (u8_at(b + 106u + s / 2u) >> (4u * (s % 2u))) & 15u;
    let db = d * f32(1 + 2 * i32(sc));
    let qh = u8_at(b + 66u + s);
    for (var l = 0u; l < 4u; l++) {
        let k = 2u * l;
        let e1 = u8_at(b + 2u + 8u * s + k) | (((qh >> k) & 1u) << 8u);
        let e2 = u8_at(b + 2u + 8u * s + k + 1u) | (((qh >> (k + 1u)) & 1u) << 8u);
        let signs = u8_at(b + 74u + 4u * s + l);
        for (var j = 0u; j < 4u; j++) {
            emit(32u * s + 8u * l + j, signed(db, grid_byte(e1, j), signs, j));
            emit(32u * s + 8u * l + 4u + j, signed(db, grid_byte(e2, j), signs, j + 4u));
        }
    }
}
