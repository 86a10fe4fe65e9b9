// Driver: fused dequantisation × vector for decoding (and a few tokens at once): y[t, r] = Σ_c W[r, c] ·
// x[t, c] straight from the stored blocks, one workgroup per (row, token); its 64 invocations share the row
// (`accumulate`: `matvec_units.wgsl` for a quantized type, every 64th 32-element sub-block per invocation;
// `matvec_elems.wgsl` for a float type, every 64th element), and an entry file adds their partial sums:
// `matvec_wg.wgsl` in workgroup memory, `matvec_sg.wgsl` with subgroup operations where the adapter has
// them.

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

struct Params {
    // Rows of the chunk (all of them are computed).
    rows: u32,
    cols: u32,
    // Workgroups along x (rows are wg.x + wg.y · gx).
    gx: u32,
    // y[t · ldy + c(r)]: c(r) = col0 + r, or its Hugging Face row for interleaved Q/K weights.
    ldy: u32,
    col0: u32,
    perm_rows: u32,
    perm_heads: u32,
    _pad: u32,
}
@group(0) @binding(3) var<uniform> p: Params;

var<private> acc: f32;
var<private> x_base: u32;
var<workgroup> partial: array<f32, 64>;

// Row r of wg, or rows + 1 when the workgroup has none.
fn row_of(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * p.gx;
}

fn out_col(r: u32) -> u32 {
    let c = p.col0 + r;
    if (p.perm_heads == 0u) {
        return c;
    }
    let hd = p.perm_rows / p.perm_heads;
    let w = c % hd;
    return (c / hd) * hd + (w % 2u) * (hd / 2u) + w / 2u;
}

fn emit(j: u32, v: f32) {
    acc = fma(v, x[x_base + j], acc);
}

