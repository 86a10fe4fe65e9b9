// compressed-tensors `pack-quantized` (after `grouped.wgsl`): codes of 1–8 bits, offset by 2^(bits−1),
// packed along each output row into int32 words; optional zero points packed down the output dimension
// (`[⌈out·bits/32⌉, groups]`); scale per (row, group); optional g_idx (activation order).
// W = round_scale_type((q − z) · s), as the CPU's dequantiser computes it.

@group(0) @binding(0) var<storage, read> packed: array<u32>;
// A single unused word when the scheme is symmetric.
@group(0) @binding(1) var<storage, read> zero_point: array<u32>;
@group(0) @binding(2) var<storage, read> scale: array<u32>;
// [bits, words per packed row, groups, group size, has zero points, has g_idx, scale dtype, 0,
//  g_idx × in_features when present]
@group(0) @binding(3) var<storage, read> info: array<u32>;

// `bits` bits at bit `bit` of the packed sequence whose word w is `first + w · stride`.
fn field(from_zero: bool, first: u32, stride: u32, bit: u32, bits: u32) -> u32 {
    let w = bit / 32u;
    let off = bit % 32u;
    var lo: u32;
    var hi = 0u;
    let straddles = off + bits > 32u;
    if (from_zero) {
        lo = zero_point[first + w * stride];
        if (straddles) {
            hi = zero_point[first + (w + 1u) * stride];
        }
    } else {
        lo = packed[first + w * stride];
        if (straddles) {
            hi = packed[first + (w + 1u) * stride];
        }
    }
    return field_of(lo, hi, off, bits);
}

fn weight(n: u32, k: u32) -> f32 {
    let bits = info[0];
    let groups = info[2];
    let dt = info[6];
    let offset = i32(1u << (bits - 1u));
    var g = k / info[3];
    if (info[5] != 0u) {
        g = info[8u + k];
    }
    let q = i32(field(false, n * info[1], 1u, k * bits, bits)) - offset;
    var z = 0;
    if (info[4] != 0u) {
        z = i32(field(true, g, groups, n * bits, bits)) - offset;
    }
    let si = n * groups + g;
    let s = dtype_value(dt, scale[dtype_word(dt, si)], si);
    return round_to(dt, f32(q - z) * s);
}
