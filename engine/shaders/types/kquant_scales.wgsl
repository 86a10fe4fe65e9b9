// The 6-bit scale and min of sub-block j from the 12 packed bytes at `s` (ggml's `get_scale_min_k4`),
// shared by Q4_K and Q5_K.
fn scale_min_k4(j: u32, s: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(u8_at(s + j) & 63u, u8_at(s + j + 4u) & 63u);
    }
    let sc = (u8_at(s + j + 4u) & 15u) | ((u8_at(s + j - 4u) >> 6u) << 4u);
    let m = (u8_at(s + j + 4u) >> 4u) | ((u8_at(s + j) >> 6u) << 4u);
    return vec2<u32>(sc, m);
}

// The scale and min of sub-block j as floats, (d · scale, dmin · min), for the super-block at byte offset b
// (f16 d, f16 dmin, then the 12 packed bytes).
fn sub_scale_min(j: u32, b: u32) -> vec2<f32> {
    let sm = scale_min_k4(j, b + 4u);
    return vec2<f32>(f16_at(b) * f32(sm.x), f16_at(b + 2u) * f32(sm.y));
}
