// Store n new keys and values ([n, kv_heads · hd] each) at positions pos.. of one layer's cache, laid out
// [kv_heads][capacity][hd] as the host cache is.

@group(0) @binding(0) var<storage, read> kn: array<f32>;
@group(0) @binding(1) var<storage, read> vn: array<f32>;
@group(0) @binding(2) var<storage, read_write> kc: array<f32>;
@group(0) @binding(3) var<storage, read_write> vc: array<f32>;

struct Params {
    // n · kv_heads · hd.
    total: u32,
    kv_dim: u32,
    hd: u32,
    cap: u32,
    pos: u32,
    stride: u32,
    _a: u32,
    _b: u32,
}
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.stride;
    if (i >= p.total) {
        return;
    }
    let t = i / p.kv_dim;
    let r = i % p.kv_dim;
    let g = r / p.hd;
    let d = r % p.hd;
    let dst = (g * p.cap + p.pos + t) * p.hd + d;
    kc[dst] = kn[i];
    vc[dst] = vn[i];
}
