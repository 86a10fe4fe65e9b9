// F16: one element per "block", decoded exactly (subnormals, infinities, NaN) with integer operations.

const BLOCK_ELEMS: u32 = 1u;
const BLOCK_BYTES: u32 = 2u;

fn dequant_block(b: u32) {
    emit(0u, f16_at(b));
}
