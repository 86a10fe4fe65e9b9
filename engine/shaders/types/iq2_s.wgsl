// IQ2_S: f16 d; u8 qs[32]; u8 signs[32]; u8 qh[8]; u8 scales[8] (10-bit grid index, explicit signs).

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 82u;
const WORDS_PER_POINT: u32 = 2u;
const SIGNS_OFF: u32 = 2048u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let sc = u8_at(b + 74u + s);
    let db0 = d * (0.5 + f32(sc & 15u)) * 0.25;
    let db1 = d * (0.5 + f32(sc >> 4u)) * 0.25;
    let qh = u8_at(b + 66u + s);
    for (var l = 0u; l < 4u; l++) {
        let t = 4u * s + l;
        let e = u8_at(b + 2u + t) | ((qh << (8u - 2u * l)) & 0x300u);
        let signs = u8_at(b + 34u + t);
        let db = select(db1, db0, l < 2u);
        for (var j = 0u; j < 8u; j++) {
            emit(8u * t + j, signed(db, grid_byte(e, j), signs, j));
        }
    }
}
