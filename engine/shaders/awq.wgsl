// AutoAWQ GEMM (after `grouped.wgsl`): qweight [in, out/8] and qzeros [in/group, out/8] as int32 words of
// eight 4-bit values in AutoAWQ's interleaved order; group size `p.format`. W[r, c] = f16(s · (q − z)) with
// g = c / group, rounded to f16 as the CPU's dequantiser (and AutoAWQ's fp16 arithmetic) does.

// Output `col`'s nibble of a word (value i sits at nibble (i >> 1) + 4 (i & 1)).
fn nibble(word: u32, col: u32) -> u32 {
    let i = col % 8u;
    return (word >> (4u * ((i >> 1u) + 4u * (i & 1u)))) & 15u;
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
    let g = c / p.format;
    let q = nibble(qweight[c * wpr + r / 8u], r);
    let z = nibble(qzeros[g * wpr + r / 8u], r);
    return round_f16(scale_at(g * p.out_features + r) * (f32(q) - f32(z)));
}
