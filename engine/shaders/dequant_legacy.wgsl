// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 32-element blocks, one invocation per block. Each value is formed with the
// same operations, in the same order, as the CPU's dequantisers (`codecs/legacy.rs`).

@compute @workgroup_size(64)
fn q4_0(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 18u;
    let o = i * 32u;
    let d = f16_at(b);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(b + 2u + j);
        dst[o + j] = f32(i32(q & 15u) - 8) * d;
        dst[o + j + 16u] = f32(i32(q >> 4u) - 8) * d;
    }
}

@compute @workgroup_size(64)
fn q4_1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 20u;
    let o = i * 32u;
    let d = f16_at(b);
    let m = f16_at(b + 2u);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(b + 4u + j);
        dst[o + j] = f32(q & 15u) * d + m;
        dst[o + j + 16u] = f32(q >> 4u) * d + m;
    }
}

@compute @workgroup_size(64)
fn q5_0(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 22u;
    let o = i * 32u;
    let d = f16_at(b);
    let qh = u32_at(b + 2u);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(b + 6u + j);
        let q0 = (q & 15u) | (((qh >> j) & 1u) << 4u);
        let q1 = (q >> 4u) | (((qh >> (j + 16u)) & 1u) << 4u);
        dst[o + j] = f32(i32(q0) - 16) * d;
        dst[o + j + 16u] = f32(i32(q1) - 16) * d;
    }
}

@compute @workgroup_size(64)
fn q5_1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 24u;
    let o = i * 32u;
    let d = f16_at(b);
    let m = f16_at(b + 2u);
    let qh = u32_at(b + 4u);
    for (var j = 0u; j < 16u; j++) {
        let q = u8_at(b + 8u + j);
        let q0 = (q & 15u) | (((qh >> j) & 1u) << 4u);
        let q1 = (q >> 4u) | (((qh >> (j + 16u)) & 1u) << 4u);
        dst[o + j] = f32(q0) * d + m;
        dst[o + j + 16u] = f32(q1) * d + m;
    }
}

@compute @workgroup_size(64)
fn q8_0(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 34u;
    let o = i * 32u;
    let d = f16_at(b);
    for (var j = 0u; j < 32u; j++) {
        dst[o + j] = f32(i8_at(b + 2u + j)) * d;
    }
}
