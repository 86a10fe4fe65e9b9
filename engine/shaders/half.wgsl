// f16 bits → f32 with integer operations: exact for subnormals, infinities and NaNs as the CPU's `half`
// gives them, with or without the adapter's shader-f16. The first part of every kernel that reads f16.

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

// x rounded to the nearest f16 (ties to even), as an f32: what `half::f16::from_f32(x).to_f32()` gives.
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

// x rounded to the nearest bf16 (ties to even), as an f32.
fn round_bf16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return bitcast<f32>((b & 0xffff0000u) | 0x00400000u);
    }
    return bitcast<f32>((b + 0x7fffu + ((b >> 16u) & 1u)) & 0xffff0000u);
}

// Dtype codes of the grouped formats' side tensors and results: 0 f32, 1 f16, 2 bf16.
fn round_to(dtype: u32, x: f32) -> f32 {
    if (dtype == 1u) {
        return round_f16(x);
    }
    if (dtype == 2u) {
        return round_bf16(x);
    }
    return x;
}

// Value i of an array of `dtype` values held in little-endian u32 words, from the word that holds it.
fn dtype_value(dtype: u32, word: u32, i: u32) -> f32 {
    if (dtype == 0u) {
        return bitcast<f32>(word);
    }
    let h = (word >> (16u * (i % 2u))) & 0xffffu;
    if (dtype == 1u) {
        return f16_bits_to_f32(h);
    }
    return bitcast<f32>(h << 16u);
}

// The word of a `dtype` array that holds value i.
fn dtype_word(dtype: u32, i: u32) -> u32 {
    if (dtype == 0u) {
        return i;
    }
    return i / 2u;
}
