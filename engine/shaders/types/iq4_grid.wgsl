// The non-linear IQ4 grid both IQ4 types index (`codecs/iquants.rs`).

const KVALUES: array<f32, 16> = array<f32, 16>(
    -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
    1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0,
);

// 16 bytes of nibble pairs at `q`: elements o+j (low nibble) and o+j+16 (high) of the block.
fn nibbles(q: u32, dl: f32, o: u32) {
    for (var j = 0u; j < 16u; j++) {
        let v = u8_at(q + j);
        emit(o + j, dl * KVALUES[v & 15u]);
        emit(o + j + 16u, dl * KVALUES[v >> 4u]);
    }
}
