// Q8_0: 32-element blocks of 34 bytes.

const BLOCK_ELEMS: u32 = 32u;
const BLOCK_BYTES: u32 = 34u;

// Emit the block at byte offset `b`: `emit(j, value)` for every element j.
fn dequant_block(b: u32) {
    let d = f16_at(b);
    for (var j = 0u; j < 32u; j++) {
        emit(j, f32(i8_at(b + 2u + j)) * d);
    }
}
