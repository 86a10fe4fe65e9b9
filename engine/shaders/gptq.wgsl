// GPTQ v1 linears read in place: qweight (codes packed along the input, one column per output), qzeros
// (stored zero − 1, packed along the output), fp16 scales [groups, out], g_idx [in]. Weight W[r, c] =
// scale[g, r] · (q − z) with g = g_idx[c], computed as the CPU's dequantiser computes it. Codes of 2, 3, 4
// or 8 bits lie contiguously in runs of `bits` words per 32 values (3-bit values may straddle two words).
// Entry points: `dequant` (a tile of rows into f32, before the GEMM) and `matvec` (decoding).

@group(0) @binding(0) var<storage, read> qweight: array<u32>;
@group(0) @binding(1) var<storage, read> qzeros: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> g_idx: array<u32>;
@group(0) @binding(4) var<storage, read_write> io: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

struct Params {
    out_features: u32,
    in_features: u32,
    bits: u32,
    // First row of the tile (dequant) or of the dispatch (matvec), and its row count.
    row0: u32,
    rows: u32,
    // dequant: invocations per grid row; matvec: workgroups along x.
    stride: u32,
    // matvec: y[y_off + t · ldy + r].
    y_off: u32,
    ldy: u32,
}
@group(0) @binding(6) var<uniform> p: Params;

// Value i of a packed sequence starting at word `base` of `words` (qweight column r: stride out_features;
// qzeros row g: stride 1).
fn unpack(i: u32, base: u32, stride: u32, from_qweight: bool) -> u32 {
    let run = i / 32u;
    let bit = p.bits * (i % 32u);
    let w = run * p.bits + bit / 32u;
    let s = bit % 32u;
    let mask = (1u << p.bits) - 1u;
    var lo: u32;
    var hi = 0u;
    if (from_qweight) {
        lo = qweight[base + w * stride];
        if (s + p.bits > 32u) {
            hi = qweight[base + (w + 1u) * stride];
        }
    } else {
        lo = qzeros[base + w * stride];
        if (s + p.bits > 32u) {
            hi = qzeros[base + (w + 1u) * stride];
        }
    }
    var v = lo >> s;
    if (s + p.bits > 32u) {
        v = v | (hi << (32u - s));
    }
    return v & mask;
}

fn f16_word(i: u32) -> f32 {
    let h = (scales[i / 2u] >> (16u * (i % 2u))) & 0xffffu;
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(bitcast<u32>(f32(m) * 5.9604644775390625e-8) | sign);
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn weight(r: u32, c: u32) -> f32 {
    let g = g_idx[c];
    let q = unpack(c, r, p.out_features, true);
    let zwords = p.out_features / 32u * p.bits;
    let z = unpack(r, g * zwords, 1u, false) + 1u;
    let s = f16_word(g * p.out_features + r);
    return s * (f32(q) - f32(z));
}

@compute @workgroup_size(64)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.stride;
    if (i >= p.rows * p.in_features) {
        return;
    }
    let r = i / p.in_features;
    let c = i % p.in_features;
    io[i] = weight(p.row0 + r, c);
}

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = wg.x + wg.y * p.stride;
    let t = wg.z;
    if (r >= p.rows) {
        return;
    }
    var acc = 0.0;
    for (var c = li; c < p.in_features; c += 64u) {
        acc = fma(weight(p.row0 + r, c), io[t * p.in_features + c], acc);
    }
    part[li] = acc;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k >>= 1u) {
        if (li < k) {
            part[li] += part[li + k];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        y[p.y_off + t * p.ldy + p.row0 + r] = part[0];
    }
}
