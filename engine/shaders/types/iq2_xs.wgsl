// IQ2_XS: f16 d; u16 qs[32] (9-bit grid index, 7-bit sign index); u8 scales[8].

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 74u;
const WORDS_PER_POINT: u32 = 2u;
const SIGNS_OFF: u32 = 1024u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let sc = u8_at(b + 66u + s);
    let db0 = d * (0.5 + f32(sc & 15u)) * 0.25;
    let db1 = d * (0.5 + f32(sc >> 4u)) * 0.25;
    for (var l = 0u; l < 4u; l++) {
        let v = u16_at(b + 2u + 2u * (4u * s + l));
        let signs = ksigns(v >> 9u);
        let db = select(db1, db0, l < 2u);
        for (var j = 0u; j < 8u; j++) {
            emit(32u * s + 8u * l + j, signed(db, grid_byte(v & 511u, j), signs, j));
        }
    }
}
