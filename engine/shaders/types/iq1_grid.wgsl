// The IQ1 grid ({−1, 0, 1}⁸, stored as bytes 0xFF/0/1) shifted by ±1/8 and scaled, shared by IQ1_S and
// IQ1_M: 8 values dl · (g + delta) from grid point e.
const WORDS_PER_POINT: u32 = 2u;
const SIGNS_OFF: u32 = 4096u;

fn expand(e: u32, dl: f32, delta: f32, o: u32) {
    for (var j = 0u; j < 8u; j++) {
        let g = (i32(grid_byte(e, j)) << 24u) >> 24u;
        emit(o + j, dl * (f32(g) + delta));
    }
}

fn delta_of(bit_set: bool) -> f32 {
    return select(0.125, -0.125, bit_set);
}
