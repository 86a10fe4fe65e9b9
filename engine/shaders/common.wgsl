// Shared by every kernel that reads stored blocks: the weight chunk's raw bytes as `array<u32>` named
// `src` (declared by the driver; ggml blocks are not 4-byte aligned), read as a byte, a little-endian
// u16/u32 or an f16 at any byte offset. f16 is decoded with integer operations, so subnormals, infinities
// and NaNs come out exactly as the CPU's `half` gives them (`half.wgsl`), with or without shader-f16.
//
// A kernel is assembled from `half.wgsl`, this file, a driver (`dequant.wgsl`, `matvec.wgsl`, the GEMM's
// `gemm_w_blocks.wgsl`) and a block type (`types/*.wgsl`): the type defines BLOCK_ELEMS, BLOCK_BYTES and a
// decoder that hands values to the driver's `emit(j, value)` (j: the element within the block) —
// `dequant_sub(b, s)` for the 32 elements of sub-block s of the block at byte offset b (every quantized
// type; `types/sub_blocks.wgsl` makes the whole-block `dequant_block(b)` of it), or `dequant_block(b)`
// itself (the one-element float types).

fn u8_at(off: u32) -> u32 {
    return (src[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

fn i8_at(off: u32) -> i32 {
    return (i32(u8_at(off)) << 24u) >> 24u;
}

fn u16_at(off: u32) -> u32 {
    return u8_at(off) | (u8_at(off + 1u) << 8u);
}

fn u32_at(off: u32) -> u32 {
    return u16_at(off) | (u16_at(off + 2u) << 16u);
}

fn f16_at(off: u32) -> f32 {
    return f16_bits_to_f32(u16_at(off));
}
