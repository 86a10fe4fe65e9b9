// Element-wise steps of a decoder layer, one invocation per element: `add` (y += x, the residual),
// `bias` (y[t, j] += b[j]) and `swiglu` (y = silu(y) · x); and `sumsq`, one invocation per column:
// y[off + c] += Σ_t x[t, c]² over the `m` rows of a `count`-wide x (an importance matrix's sums).

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;

struct Params {
    count: u32,
    // Row length (for `bias`), rows (for `sumsq`).
    m: u32,
    stride: u32,
    // Offset into y (for `sumsq`).
    off: u32,
}
@group(0) @binding(2) var<uniform> p: Params;

fn index(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * p.stride;
}

@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i < p.count) {
        y[i] += x[i];
    }
}

@compute @workgroup_size(64)
fn bias(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i < p.count) {
        y[i] += x[i % p.m];
    }
}

@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = index(gid);
    if (i < p.count) {
        let g = y[i];
        y[i] = g / (1.0 + exp(-g)) * x[i];
    }
}

@compute @workgroup_size(64)
fn sumsq(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = index(gid);
    if (c < p.count) {
        var acc = 0.0;
        for (var t = 0u; t < p.m; t++) {
            let v = x[t * p.count + c];
            acc = fma(v, v, acc);
        }
        y[p.off + c] += acc;
    }
}
