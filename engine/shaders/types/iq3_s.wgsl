// IQ3_S: f16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4] (9-bit indices of 4-element points).

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 110u;
const WORDS_PER_POINT: u32 = 1u;
const SIGNS_OFF: u32 = 512u;

fn dequant_block(b: u32) {
    let d = f16_at(b);
    for (var g = 0u; g < 8u; g++) {
        let s = (u8_at(b + 106u + g / 2u) >> (4u * (g % 2u))) & 15u;
        let db = d * f32(1 + 2 * i32(s));
        let qh = u8_at(b + 66u + g);
        for (var l = 0u; l < 4u; l++) {
            let k = 2u * l;
            let e1 = u8_at(b + 2u + 8u * g + k) | (((qh >> k) & 1u) << 8u);
            let e2 = u8_at(b + 2u + 8u * g + k + 1u) | (((qh >> (k + 1u)) & 1u) << 8u);
            let signs = u8_at(b + 74u + 4u * g + l);
            for (var j = 0u; j < 4u; j++) {
                emit(32u * g + 8u * l + j, signed(db, grid_byte(e1, j), signs, j));
                emit(32u * g + 8u * l + 4u + j, signed(db, grid_byte(e2, j), signs, j + 4u));
            }
        }
    }
}
