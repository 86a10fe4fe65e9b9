// F32, F16 and BF16 "blocks" of one element: one invocation per element.

@compute @workgroup_size(64)
fn f32_(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    dst[i] = bitcast<f32>(src[p.first + i]);
}

@compute @workgroup_size(64)
fn f16_(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    dst[i] = f16_at((p.first + i) * 2u);
}

@compute @workgroup_size(64)
fn bf16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    dst[i] = bitcast<f32>(u16_at((p.first + i) * 2u) << 16u);
}
