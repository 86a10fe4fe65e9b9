// Driver: llama.cpp's round-to-nearest quantization of f32 rows into ggml blocks (the reference
// quantizers, `quantize_row_*_ref`), byte for byte as the CPU's, with `exact.wgsl`'s arithmetic. A type file
// (`quant/*.wgsl`) defines QBLOCK_BYTES, QBLOCKS (blocks per invocation, so an invocation writes whole
// words) and `quantize_block(first element, first byte)`, which fills `bytes` with `put_byte`/`put_f16`.

// The values as bits (so no load or compare flushes a subnormal).
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

struct Params {
    blocks: u32,
    // Invocations per grid row.
    stride: u32,
    _a: u32,
    _b: u32,
}
@group(0) @binding(2) var<uniform> p: Params;

// One byte per entry, the invocation's blocks back to back.
var<private> bytes: array<u32, 68>;

fn xv(i: u32) -> f32 {
    return bitcast<f32>(x[i]);
}

fn put_byte(i: u32, v: u32) {
    bytes[i] = v & 0xffu;
}

fn put_f16(i: u32, v: f32) {
    let h = f16_bits(v);
    put_byte(i, h);
    put_byte(i + 1u, h >> 8u);
}

// Of 32 values from s: the one of largest magnitude (first on ties; 0 for a zero block).
fn signed_absmax(s: u32) -> f32 {
    var amax = 0u;
    var mx = 0.0;
    for (var j = 0u; j < 32u; j++) {
        let a = abs_bits(xv(s + j));
        if (amax < a) {
            amax = a;
            mx = xv(s + j);
        }
    }
    return mx;
}

// Minimum and maximum of 32 values from s, from ±FLT_MAX like ggml.
fn min_max(s: u32) -> vec2<f32> {
    var mn = 3.4028235e38;
    var mx = -3.4028235e38;
    for (var j = 0u; j < 32u; j++) {
        let v = xv(s + j);
        if (lt_exact(v, mn)) {
            mn = v;
        }
        if (lt_exact(mx, v)) {
            mx = v;
        }
    }
    return vec2<f32>(mn, mx);
}

// 1/d, or 0 for d = 0.
fn inverse(d: f32) -> f32 {
    if (abs_bits(d) == 0u) {
        return 0.0;
    }
    return div_rn(1.0, d);
}

// The symmetric types' scale: d = max / −half (max: the signed value of largest magnitude of the block at
// s) stored as f16 at byte o; returns 1/d.
fn symmetric_scale(s: u32, o: u32, half: f32) -> f32 {
    let d = div_rn(signed_absmax(s), -half);
    put_f16(o, d);
    return inverse(d);
}

// The `_1` types' scale and offset: d = (max − min) / levels and m = min stored as f16 at bytes o and o + 2;
// returns (min, 1/d).
fn asymmetric_scale(s: u32, o: u32, levels: f32) -> vec2<f32> {
    let mm = min_max(s);
    let d = div_rn(sub_rn(mm.y, mm.x), levels);
    put_f16(o, d);
    put_f16(o + 2u, mm.x);
    return vec2<f32>(mm.x, inverse(d));
}

// Five-bit values l[0..32] (in `lq`) as ggml packs them: qh (bit e = fifth bit of element e) at byte
// `h`, the low nibbles (elements j and j + 16 in byte j) at byte `q`.
var<private> lq: array<u32, 32>;

fn pack_q5(h: u32, q: u32) {
    var qh = 0u;
    for (var j = 0u; j < 16u; j++) {
        put_byte(q + j, (lq[j] & 15u) | ((lq[j + 16u] & 15u) << 4u));
        qh = qh | (((lq[j] >> 4u) & 1u) << j) | (((lq[j + 16u] >> 4u) & 1u) << (j + 16u));
    }
    put_byte(h, qh);
    put_byte(h + 1u, qh >> 8u);
    put_byte(h + 2u, qh >> 16u);
    put_byte(h + 3u, qh >> 24u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let inv = gid.x + gid.y * p.stride;
    let b0 = inv * QBLOCKS;
    if (b0 >= p.blocks) {
        return;
    }
    for (var i = 0u; i < QBLOCKS * QBLOCK_BYTES; i++) {
        bytes[i] = 0u;
    }
    for (var k = 0u; k < QBLOCKS; k++) {
        if (b0 + k < p.blocks) {
            quantize_block((b0 + k) * 32u, k * QBLOCK_BYTES);
        }
    }
    let words = QBLOCKS * QBLOCK_BYTES / 4u;
    for (var w = 0u; w < words; w++) {
        out[inv * words + w] = bytes[4u * w] | (bytes[4u * w + 1u] << 8u) | (bytes[4u * w + 2u] << 16u)
            | (bytes[4u * w + 3u] << 24u);
    }
}
