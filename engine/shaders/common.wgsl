// Shared by every kernel that reads stored blocks: the weight chunk's raw bytes as `array<u32>` named
// `src` (declared by the driver; ggml blocks are not 4-byte aligned), read as a byte, a little-endian
// u16/u32 or an f16 at any byte offset. f16 is decoded with integer operations, so subnormals, infinities
// and NaNs come out exactly as the CPU's `half` gives them, with or without the adapter's shader-f16.
//
// A kernel is assembled from this file, a driver (`dequant.wgsl`, `matvec.wgsl`) and a block type
// (`types/*.wgsl`): the type defines BLOCK_ELEMS, BLOCK_BYTES and `dequant_block(b)`, which hands every
// value of the block at byte offset b to the driver's `emit(j, value)`.

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
