// Q8_0: 32-element blocks of 34 bytes.

const BLOCK_ELEMS: u32 = 32u;
const BLOCK_BYTES: u32 = 34u;

// Emit sub-block s (the only one: s = 0) of the block at byte offset `b`: `emit(j, value)` for every
// element j.
fn dequant_sub(b: u32, s: u32) {
    let d = f16_at(b);
    for (var j = 0u; j < 32u; j++) {
        emit(j, f32(i8_at(b + 2u + j)) * d);
    }
}
