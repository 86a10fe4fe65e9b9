// The GEMM's W as F16 weights read in place without shader-f16: two per word, decoded exactly with
// integer operations (`half.wgsl`).
@group(0) @binding(1) var<storage, read> w: array<u32>;

fn w_val(i: u32) -> f32 {
    return f16_bits_to_f32((w[i / 2u] >> (16u * (i % 2u))) & 0xffffu);
}
