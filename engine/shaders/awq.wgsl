// AutoAWQ GEMM linears read in place: qweight [in, out/8] and qzeros [in/group, out/8] as int32 words of eight
// 4-bit values in AutoAWQ's interleaved order, fp16 scales [in/group, out]. W[r, c] = f16(s · (q − z)) with
// g = c / group, rounded to f16 as the CPU's dequantiser (and AutoAWQ's fp16 arithmetic) does. Entry points
// as `gptq.wgsl`: `dequant` (a tile of rows into f32) and `matvec` (decoding).

@group(0) @binding(0) var<storage, read> qweight: array<u32>;
@group(0) @binding(1) var<storage, read> qzeros: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read_write> io: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

struct Params {
    out_features: u32,
    in_features: u32,
    group_size: u32,
    row0: u32,
    rows: u32,
    stride: u32,
    y_off: u32,
    ldy: u32,
}
@group(0) @binding(6) var<uniform> p: Params;

// Output `col`'s nibble of row `row` (AutoAWQ's order: value i of a word sits at nibble (i >> 1) + 4 (i & 1)).
fn nibble(word: u32, col: u32) -> u32 {
    let i = col % 8u;
    return (word >> (4u * ((i >> 1u) + 4u * (i & 1u)))) & 15u;
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

// x rounded to the nearest f16 (ties to even), as an f32.
fn round_f16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let sign = b & 0x80000000u;
    let a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) {
        return x;
    }
    if (a >= 0x477ff000u) {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    if (a < 0x38800000u) {
        // Below f16's smallest normal: multiples of 2⁻²⁴ (the scaling by 2²⁴ is exact; round() ties to even).
        let v = round(bitcast<f32>(a) * 16777216.0) * 5.9604644775390625e-8;
        return bitcast<f32>(bitcast<u32>(v) | sign);
    }
    let r = (a + 0xfffu + ((a >> 13u) & 1u)) & 0xffffe000u;
    return bitcast<f32>(sign | r);
}

fn weight(r: u32, c: u32) -> f32 {
    let wpr = p.out_features / 8u;
    let g = c / p.group_size;
    let q = nibble(qweight[c * wpr + r / 8u], r);
    let z = nibble(qzeros[g * wpr + r / 8u], r);
    let s = f16_word(g * p.out_features + r);
    return round_f16(s * (f32(q) - f32(z)));
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
