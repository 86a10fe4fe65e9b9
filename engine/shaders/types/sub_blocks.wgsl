// After a block type built of 32-element sub-blocks (every quantized type): the whole block is its
// sub-blocks in order. The tiled GEMM (`gemm_w_blocks.wgsl`) decodes one sub-block per row and k-step.
fn dequant_block(b: u32) {
    for (var s = 0u; s < BLOCK_ELEMS / 32u; s++) {
        dequant_sub(b, s);
    }
}
