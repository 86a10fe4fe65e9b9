// The GEMM's W in f32.
@group(0) @binding(1) var<storage, read> w: array<f32>;

fn w_val(i: u32) -> f32 {
    return w[i];
}
