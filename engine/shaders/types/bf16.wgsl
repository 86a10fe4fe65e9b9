// BF16: one element per "block": the high half of an f32.

const BLOCK_ELEMS: u32 = 1u;
const BLOCK_BYTES: u32 = 2u;

fn dequant_block(b: u32) {
    emit(0u, bitcast<f32>(u16_at(b) << 16u));
}
