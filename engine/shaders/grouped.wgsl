// Driver for the grouped linears read in place (assembled after `half.wgsl`, before a format file such as
// `gptq.wgsl`). The format declares its tensors at bindings 0–3 (as u32 words) and defines `weight(r, c)`,
// the value of W[r, c] exactly as the CPU's dequantiser computes it. Entry points: `dequant` (a tile of rows
// into f32), `matvec` (decoding: one workgroup per output row and token) and `gemm` (prompts: the tiled
// product of `gemm_tile.wgsl`, W's values decoded as they are staged).
@group(0) @binding(4) var<storage, read_write> io: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

struct Params {
    out_features: u32,
    in_features: u32,
    // The format's parameter: GPTQ's bits, AWQ's group size (the others read theirs from binding 3).
    format: u32,
    // First row of the tile (dequant) or of the dispatch (matvec), and its row count.
    row0: u32,
    rows: u32,
    // dequant: invocations per grid row; matvec: workgroups along x; gemm: tokens.
    stride: u32,
    // matvec and gemm: y[y_off + t · ldy + row0 + r].
    y_off: u32,
    ldy: u32,
}
@group(0) @binding(6) var<uniform> p: Params;

// `bits` bits from bit `off` of the word pair (lo, hi), hi supplying what runs past lo's top (the packed
// formats' codes may straddle two words).
fn field_of(lo: u32, hi: u32, off: u32, bits: u32) -> u32 {
    var v = lo >> off;
    if (off + bits > 32u) {
        v = v | (hi << (32u - off));
    }
    return v & ((1u << bits) - 1u);
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

// The GEMM's k-step: W(r, c) is decoded element by element, 4 per invocation.
const BK: u32 = 16u;

@compute @workgroup_size(16, 16)
fn gemm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let n = p.stride;
    let k = p.in_features;
    let t0 = wg.y * BM;
    let j0 = wg.x * BN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < k; k0 += BK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = li + 256u * e;
            let r = idx / BK;
            let kk = idx % BK;
            var xv = 0.0;
            if (t0 + r < n && k0 + kk < k) {
                xv = io[(t0 + r) * k + k0 + kk];
            }
            xs[kk * BM + r] = xv;
            var wv = 0.0;
            if (j0 + r < p.rows && k0 + kk < k) {
                wv = weight(p.row0 + j0 + r, k0 + kk);
            }
            ws[kk * BN + r] = wv;
        }
        workgroupBarrier();
        tile_mac(lid.y, lid.x, &acc);
        workgroupBarrier();
    }
    for (var a = 0u; a < 4u; a++) {
        let t = t0 + lid.y * 4u + a;
        if (t >= n) { continue; }
        for (var c = 0u; c < 4u; c++) {
            let j = j0 + lid.x * 4u + c;
            if (j < p.rows) {
                y[p.y_off + t * p.ldy + p.row0 + j] = acc[a * 4u + c];
            }
        }
    }
}
