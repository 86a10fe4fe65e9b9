// y[t, i] = w[i] · (x[t, i] / sqrt(mean(x[t, :]²) + eps)): one workgroup per row.

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> wt: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

struct Params {
    h: u32,
    // f32 bits.
    eps: u32,
    _a: u32,
    _b: u32,
}
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = wg.x * p.h;
    var s = 0.0;
    for (var i = li; i < p.h; i += 64u) {
        let v = x[base + i];
        s = fma(v, v, s);
    }
    part[li] = s;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (li < k) {
            part[li] += part[li + k];
        }
        workgroupBarrier();
    }
    let r = 1.0 / sqrt(part[0] / f32(p.h) + bitcast<f32>(p.eps));
    for (var i = li; i < p.h; i += 64u) {
        y[base + i] = wt[i] * (x[base + i] * r);
    }
}
