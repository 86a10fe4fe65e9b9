// The GEMM's W as F16 weights read in place with shader-f16 (after `enable f16;`): f16 → f32 is exact.
@group(0) @binding(1) var<storage, read> w: array<f16>;

fn w_val(i: u32) -> f32 {
    return f32(w[i]);
}
