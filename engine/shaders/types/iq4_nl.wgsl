// IQ4_NL: 32-element blocks of 18 bytes.

const BLOCK_ELEMS: u32 = 32u;
const BLOCK_BYTES: u32 = 18u;

// Emit sub-block s (the only one: s = 0) of the block at byte offset `b`: `emit(j, value)` for every
// element j.
fn dequant_sub(b: u32, s: u32) {
    nibbles(b + 2u, f16_at(b), 0u);
}
