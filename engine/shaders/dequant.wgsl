// Driver: dequantise `count` blocks starting at block `first` of the chunk into `dst` (f32, from element
// 0), one invocation per block. The values are formed exactly as the CPU's dequantisers form them.

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

struct Params {
    first: u32,
    count: u32,
    // Invocations per row of the dispatch grid (workgroups along x times 64).
    stride: u32,
    _pad: u32,
}
@group(0) @binding(2) var<uniform> p: Params;

var<private> out_base: u32;

fn emit(j: u32, v: f32) {
    dst[out_base + j] = v;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.stride;
    if (i >= p.count) {
        return;
    }
    out_base = i * BLOCK_ELEMS;
    dequant_block((p.first + i) * BLOCK_BYTES);
}
