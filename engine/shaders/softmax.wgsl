// Causal softmax of attention scores in place: rows [heads][n][len] of query t (position pos0 + t) see
// keys 0..=pos0 + t; visible scores are scaled, then softmax, the rest set to 0. One workgroup per row.

@group(0) @binding(0) var<storage, read_write> s: array<f32>;

struct Params {
    n: u32,
    len: u32,
    pos0: u32,
    // f32 bits.
    scale: u32,
    rows: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}
@group(0) @binding(1) var<uniform> p: Params;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.x + wg.y * 65535u;
    if (row >= p.rows) {
        return;
    }
    let t = row % p.n;
    let base = row * p.len;
    let visible = min(p.pos0 + t + 1u, p.len);
    let scale = bitcast<f32>(p.scale);
    var m = -3.4028235e38;
    for (var j = li; j < visible; j += 64u) {
        let v = s[base + j] * scale;
        s[base + j] = v;
        m = max(m, v);
    }
    part[li] = m;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (li < k) {
            part[li] = max(part[li], part[li + k]);
        }
        workgroupBarrier();
    }
    let mx = part[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var j = li; j < visible; j += 64u) {
        let e = exp(s[base + j] - mx);
        s[base + j] = e;
        sum += e;
    }
    part[li] = sum;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (li < k) {
            part[li] += part[li + k];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / part[0];
    for (var j = li; j < p.len; j += 64u) {
        if (j < visible) {
            s[base + j] *= inv;
        } else {
            s[base + j] = 0.0;
        }
    }
}
