// One step of HQQ's proximal solver (`codecs::hqq::step`), one invocation per group of `gs` weights held
// group after group: q = clamp(round(x·s + z), 0, max_v), r = (q − z)/s, e = shrink_p(x − r); the group's
// new zero is mean(q − (x − e)·s) and its error Σ|x − r|. The CPU sums in f64; here both sums are kept as
// an unevaluated pair of f32 (a compensated sum) and rounded once.
@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read> s: array<f32>;
@group(0) @binding(2) var<storage, read> z: array<f32>;
// [new zeros (groups) | error sums (groups)].
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

struct Params {
    groups: u32,
    gs: u32,
    // Invocations per row of the dispatch grid.
    stride: u32,
    _pad: u32,
    max_v: f32,
    // 1/β and p − 1 of the shrinkage operator sign(x)·max(|x| − |x|^(p−1)/β, 0).
    beta_inv: f32,
    p_minus_1: f32,
    _pad2: u32,
}
@group(0) @binding(4) var<uniform> p: Params;

// (hi, lo) + v with the rounding error kept in lo (Knuth's two-sum).
fn add2(acc: vec2<f32>, v: f32) -> vec2<f32> {
    let t = acc.x + v;
    let bv = t - acc.x;
    let err = (acc.x - (t - bv)) + (v - bv);
    return vec2<f32>(t, acc.y + err);
}

fn shrink(x: f32) -> f32 {
    let a = abs(x);
    if (a == 0.0) {
        return 0.0;
    }
    let v = max(a - p.beta_inv * pow(a, p.p_minus_1), 0.0);
    return select(v, -v, x < 0.0);
}

@compute @workgroup_size(64)
fn step(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x + gid.y * p.stride;
    if (g >= p.groups) {
        return;
    }
    let sg = s[g];
    let zg = z[g];
    var sum = vec2<f32>(0.0, 0.0);
    var err = vec2<f32>(0.0, 0.0);
    for (var j = 0u; j < p.gs; j++) {
        let x = w[g * p.gs + j];
        let q = round(clamp(x * sg + zg, 0.0, p.max_v));
        let r = (q - zg) / sg;
        let e = shrink(x - r);
        sum = add2(sum, q - (x - e) * sg);
        err = add2(err, abs(x - r));
    }
    out[g] = (sum.x + sum.y) / f32(p.gs);
    out[p.groups + g] = err.x + err.y;
}
