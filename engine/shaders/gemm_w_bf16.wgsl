// The GEMM's W as BF16 weights read in place: two per word, the high half of an f32 (exact).
@group(0) @binding(1) var<storage, read> w: array<u32>;

fn w_val(i: u32) -> f32 {
    return bitcast<f32>(((w[i / 2u] >> (16u * (i % 2u))) & 0xffffu) << 16u);
}
