// IQ1_S: f16 d; u8 qs[32]; u16 qh[8] (3 high index bits per point, a 3-bit scale, the delta's sign).

const BLOCK_ELEMS: u32 = 256u;
const BLOCK_BYTES: u32 = 50u;

// Emit sub-block s (elements 32s..32s+32) of the block at byte offset `b`: `emit(j, value)` for each.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    let h = u16_at(b + 34u + 2u * s);
    let dl = d * f32(2u * ((h >> 12u) & 7u) + 1u);
    let delta = delta_of((h & 0x8000u) != 0u);
    for (var l = 0u; l < 4u; l++) {
        let e = u8_at(b + 2u + 4u * s + l) | (((h >> (3u * l)) & 7u) << 8u);
        expand(e, dl, delta, 32u * s + 8u * l);
    }
}
