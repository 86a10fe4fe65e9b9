// AutoAWQ GEMM (after `grouped.wgsl`): qweight [in, out/8] and qzeros [in/group, out/8] as int32 words of
// eight 4-bit values in AutoAWQ's interleaved order; group size `p.format`. W[r, c] = f16(s · (q − z)) with
// g = c / group, rounded to f16 as the CPU's dequantiser (and AutoAWQ's fp16 arithmetic) does.

@group(0) @binding(0) var<storage, read> qweight: array<u32>;
@group(0) @binding(1) var<storage, read> qzeros: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;

// fp16 scale number i.
fn scale_at(i: u32) -> f32 {
    return dtype_value(1u, scales[i / 2u], i);
}

// Output `col`'s nibble of a word (value i sits at nibble (i >> 1) + 4 (i & 1)).
fn nibble(word: u32, col: u32) -> u32 {
    let i = col % 8u;
    return (word >> (4u * ((i >> 1u) + 4u * (i & 1u)))) & 15u;
}

fn weight(r: u32, c: u32) -> f32 {
    let wpr = p.out_features / 8u;
    let g = c / p.format;
    let q = nibble(qweight[c * wpr + r / 8u], r);
    let z = nibble(qzeros[g * wpr + r / 8u], r);
    return round_f16(scale_at(g * p.out_features + r) * (f32(q) - f32(z)));
}
