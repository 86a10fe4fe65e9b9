// F32: one element per "block".

const BLOCK_ELEMS: u32 = 1u;
const BLOCK_BYTES: u32 = 4u;

fn dequant_block(b: u32) {
    emit(0u, bitcast<f32>(src[b >> 2u]));
}
