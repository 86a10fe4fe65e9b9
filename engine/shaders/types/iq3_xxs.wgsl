// IQ3_XXS: f16 d; u8 qs[64] (grid indices of 4-element points); u32 scales_and_signs[8].

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 98u;
const WORDS_PER_POINT: u32 = 1u;
const SIGNS_OFF: u32 = 256u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let a = u32_at(b + 66u + 4u * s);
    let db = d * (0.5 + f32(a >> 28u)) * 0.5;
    for (var l = 0u; l < 4u; l++) {
        let signs = ksigns((a >> (7u * l)) & 127u);
        let e1 = u8_at(b + 2u + 8u * s + 2u * l);
        let e2 = u8_at(b + 2u + 8u * s + 2u * l + 1u);
        for (var j = 0u; j < 4u; j++) {
            emit(32u * s + 8u * l + j, signed(db, grid_byte(e1, j), signs, j));
            emit(32u * s + 8u * l + 4u + j, signed(db, grid_byte(e2, j), signs, j + 4u));
        }
    }
}
