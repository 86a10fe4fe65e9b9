// `exact.wgsl`'s operations on pairs of values, for the conformance tests: out[5i..5i + 5] =
// [a·b, a/b, a+b, a−b, a<b] (bits; the division where b ≠ 0).

@group(0) @binding(0) var<storage, read> ab: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

struct Params {
    n: u32,
    stride: u32,
    _a: u32,
    _b: u32,
}
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.stride;
    if (i >= p.n) {
        return;
    }
    let a = bitcast<f32>(ab[2u * i]);
    let b = bitcast<f32>(ab[2u * i + 1u]);
    out[5u * i] = bitcast<u32>(mul_rn(a, b));
    if ((ab[2u * i + 1u] & 0x7fffffffu) != 0u) {
        out[5u * i + 1u] = bitcast<u32>(div_rn(a, b));
    }
    out[5u * i + 2u] = bitcast<u32>(add_rn(a, b));
    out[5u * i + 3u] = bitcast<u32>(sub_rn(a, b));
    out[5u * i + 4u] = select(0u, 1u, lt_exact(a, b));
}
