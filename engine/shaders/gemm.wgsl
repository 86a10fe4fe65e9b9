// y[t, c(j)] = Σ_k x[t, k] · W(j, k) in f32: 64 × 64 output tiles per workgroup of 16 × 16 invocations,
// each computing 4 × 4 outputs from BK-deep slices of x and W staged in workgroup memory (the core is
// `gemm_tile.wgsl`, assembled after this file). Any n, m, k
// (edges are masked). W(j, k) is `w[w_off + j·ldw + k]` (a weight, rows of k: the "NT" product) or, with
// `W_KMAJOR`, `w[w_off + k·ldw + j]` (attention's values: the "NN" product). The z dimension of the
// dispatch is a batch (attention heads): batch z reads x and y at z·x_bz and z·y_bz and W at
// (z / group)·w_bz (grouped-query attention). Output column c(j) = col0 + j, or its Hugging Face row when
// the weight's rows are in llama.cpp's interleaved-RoPE order (perm_heads > 0).

override W_KMAJOR: bool = false;
// x(t, k) = `x[x_off + k·ldx + t]` instead (a transposed left operand: the Gram matrix XᵀX of a
// Hessian).
override X_KMAJOR: bool = false;
// y −= the product instead of y = it (GPTQ's lazy-batch update of the later columns).
override SUBTRACT: bool = false;

// W's binding, the depth BK of a k-step and `stage_w` (W(j0.., k0..) into `ws`, [BK][BN]) come from a
// storage file before this one: `gemm_w_elems.wgsl` after `gemm_w_f32.wgsl`, or for weights read in
// place `gemm_w_f16.wgsl` (shader-f16), `gemm_w_f16_bits.wgsl` or `gemm_w_bf16.wgsl` (every adapter); or
// `gemm_w_blocks.wgsl` with a block type, whose sub-blocks are decoded straight into `ws` (quantized
// weights: no dequantised copy).
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

struct Params {
    n: u32,
    m: u32,
    k: u32,
    // Element offset of W(0, 0) in `w`, and the stride between its rows (or its k-slices with W_KMAJOR).
    w_off: u32,
    ldw: u32,
    // Element offset of y[0, 0] in `y`, and the stride between its rows.
    y_off: u32,
    ldy: u32,
    // Element offset of x[0, 0] in `x`, and the stride between its rows.
    x_off: u32,
    ldx: u32,
    // Batch strides (elements) and query heads per W batch.
    x_bz: u32,
    w_bz: u32,
    y_bz: u32,
    group: u32,
    // The first output column, and the interleaved-row permutation (rows, heads; heads 0: none).
    col0: u32,
    perm_rows: u32,
    perm_heads: u32,
}
@group(0) @binding(3) var<uniform> p: Params;

// The Hugging Face row held by interleaved row r (`tensor::hf_row_of_interleaved`).
fn out_col(j: u32) -> u32 {
    let c = p.col0 + j;
    if (p.perm_heads == 0u) {
        return c;
    }
    let hd = p.perm_rows / p.perm_heads;
    let w = c % hd;
    return (c / hd) * hd + (w % 2u) * (hd / 2u) + w / 2u;
}

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let t0 = wg.y * BM;
    let j0 = wg.x * BN;
    let xb = p.x_off + wg.z * p.x_bz;
    let wb = p.w_off + (wg.z / max(p.group, 1u)) * p.w_bz;
    let yb = p.y_off + wg.z * p.y_bz;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage x[t0.., k0..]: BK · 64 values, BK / 4 per invocation.
        for (var e = 0u; e < BK / 4u; e++) {
            let idx = li + 256u * e;
            // x: BK consecutive k for each of 64 rows, so neighbouring invocations read neighbouring k.
            let r = idx / BK;
            let kk = idx % BK;
            var xv = 0.0;
            if (X_KMAJOR) {
                let c = idx % BM;
                let kr = idx / BM;
                if (t0 + c < p.n && k0 + kr < p.k) {
                    xv = x[xb + (k0 + kr) * p.ldx + t0 + c];
                }
                xs[kr * BM + c] = xv;
            } else {
                if (t0 + r < p.n && k0 + kk < p.k) {
                    xv = x[xb + (t0 + r) * p.ldx + k0 + kk];
                }
                xs[kk * BM + r] = xv;
            }
        }
        stage_w(wb, j0, k0, li);
        workgroupBarrier();
        tile_mac(lid.y, lid.x, &acc);
        workgroupBarrier();
    }
    for (var a = 0u; a < 4u; a++) {
        let t = t0 + lid.y * 4u + a;
        if (t >= p.n) { continue; }
        for (var c = 0u; c < 4u; c++) {
            let j = j0 + lid.x * 4u + c;
            if (j < p.m) {
                let at = yb + t * p.ldy + out_col(j);
                if (SUBTRACT) {
                    y[at] = y[at] - acc[a * 4u + c];
                } else {
                    y[at] = acc[a * 4u + c];
                }
            }
        }
    }
}
