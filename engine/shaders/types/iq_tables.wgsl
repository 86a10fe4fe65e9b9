// The lattice grids and the IQ2 sign table of the low-bit i-quants, as u32 words built on the host from the
// same tables the CPU dequantises with (`codecs/iq_lowbit.rs`): grid point e's byte j is byte j % 4 of
// word e · WORDS_PER_POINT + j / 4; then KSIGNS_IQ2XS, one word per entry, at SIGNS_OFF.
@group(0) @binding(7) var<storage, read> table: array<u32>;

fn grid_byte(e: u32, j: u32) -> u32 {
    return (table[e * WORDS_PER_POINT + j / 4u] >> (8u * (j % 4u))) & 0xffu;
}

fn ksigns(i: u32) -> u32 {
    return table[SIGNS_OFF + i];
}

// db · g, negated when bit j of `signs` is set (flipping the sign bit, exactly as the CPU does).
fn signed(db: f32, g: u32, signs: u32, j: u32) -> f32 {
    return bitcast<f32>(bitcast<u32>(db * f32(g)) ^ (((signs >> j) & 1u) << 31u));
}
