// The GEMM's W as stored blocks of a quantized type (after `half.wgsl` and `common.wgsl`; the type file
// follows): each k-step is one 32-element sub-block of each of the tile's 64 rows, decoded by the type's
// `dequant_sub` straight into workgroup memory, with the values the CPU's dequantiser gives. W is the
// chunk's rows of k elements (k a multiple of the block); `w_off` counts rows.
const BK: u32 = 32u;

@group(0) @binding(1) var<storage, read> src: array<u32>;

// The tile row the invocation decodes.
var<private> w_row: u32;

fn emit(j: u32, v: f32) {
    ws[(j % 32u) * BN + w_row] = v;
}

fn stage_w(wb: u32, j0: u32, k0: u32, li: u32) {
    if (li >= BN) {
        return;
    }
    w_row = li;
    if (j0 + li < p.m) {
        let b = ((wb + j0 + li) * (p.k / BLOCK_ELEMS) + k0 / BLOCK_ELEMS) * BLOCK_BYTES;
        dequant_sub(b, (k0 % BLOCK_ELEMS) / 32u);
    } else {
        for (var kk = 0u; kk < BK; kk++) {
            ws[kk * BN + li] = 0.0;
        }
    }
}
