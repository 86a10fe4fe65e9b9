// Shared by the dequantisation kernels: a weight chunk's raw bytes as `array<u32>` (ggml blocks are not
// 4-byte aligned), read a byte, a little-endian u16/u32 or an f16 at any byte offset. f16 is decoded with
// integer operations, so subnormals, infinities and NaNs come out exactly as the CPU's `half` gives them,
// with or without the adapter's shader-f16.

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;

struct Params {
    // First block (element for F32/F16/BF16) of the weight chunk to dequantise.
    first: u32,
    // Blocks to dequantise.
    count: u32,
    // Invocations per row of the dispatch grid (workgroups along x times the workgroup size).
    stride: u32,
    _pad: u32,
}
@group(0) @binding(2) var<uniform> p: Params;

fn u8_at(off: u32) -> u32 {
    return (src[off >> 2u] >> ((off & 3u) * 8u)) & 0xffu;
}

fn i8_at(off: u32) -> i32 {
    return (i32(u8_at(off)) << 24u) >> 24u;
}

fn u16_at(off: u32) -> u32 {
    return u8_at(off) | (u8_at(off + 1u) << 8u);
}

fn u32_at(off: u32) -> u32 {
    return u16_at(off) | (u16_at(off + 2u) << 16u);
}

fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // Zero or subnormal: m · 2⁻²⁴, exact in f32.
        let v = f32(m) * 5.9604644775390625e-8;
        return bitcast<f32>(bitcast<u32>(v) | sign);
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn f16_at(off: u32) -> f32 {
    return f16_bits_to_f32(u16_at(off));
}

// The block this invocation dequantises, or `count` or more when it has none.
fn block_id(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * p.stride;
}
