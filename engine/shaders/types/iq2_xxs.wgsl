// IQ2_XXS: f16 d; u16 qs[32] (per 32-group: four grid indices, then 4 × 7 sign bits and a 4-bit scale).

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 66u;
const WORDS_PER_POINT: u32 = 2u;
const SIGNS_OFF: u32 = 512u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let q = b + 2u + 8u * s;
    let a1 = u32_at(q + 4u);
    let db = d * (0.5 + f32(a1 >> 28u)) * 0.25;
    for (var l = 0u; l < 4u; l++) {
        let signs = ksigns((a1 >> (7u * l)) & 127u);
        let e = u8_at(q + l);
        for (var j = 0u; j < 8u; j++) {
            emit(32u * s + 8u * l + j, signed(db, grid_byte(e, j), signs, j));
        }
    }
}
