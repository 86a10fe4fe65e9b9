// Rotate-half RoPE in place on x = [n, heads · hd] with tables cos/sin = [n, hd/2] (computed on the host
// from the model's frequencies, so every scaling type is the host's): one invocation per rotated pair.

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> cs: array<f32>;
@group(0) @binding(2) var<storage, read> sn: array<f32>;

struct Params {
    // n · heads · hd/2.
    total: u32,
    heads: u32,
    hd: u32,
    // Invocations per row of the dispatch grid.
    stride: u32,
}
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.stride;
    if (i >= p.total) {
        return;
    }
    let half = p.hd / 2u;
    let j = i % half;
    let th = i / half;
    let t = th / p.heads;
    let base = th * p.hd;
    let x1 = x[base + j];
    let x2 = x[base + half + j];
    let c = cs[t * half + j];
    let s = sn[t * half + j];
    x[base + j] = x1 * c - x2 * s;
    x[base + half + j] = x2 * c + x1 * s;
}
