// ExLlamaV2's EXL2 (after `grouped.wgsl`): act-ordered groups of 2–8-bit codes packed down q_weight's
// columns (`[words, n_pad]` int32), a 4-bit scale code per (group, output) under an fp16 maximum per group.
// The host gives each input feature its code's first bit in its column and its group (the inverse of the
// act-order permutation, flattened): W[n, c] = f16((q − 2^(b−1)) · f16((nib+1)² · f16(max/256))).

@group(0) @binding(0) var<storage, read> q_weight: array<u32>;
@group(0) @binding(1) var<storage, read> q_scale: array<u32>;
@group(0) @binding(2) var<storage, read> q_scale_max: array<u32>;
// [n_pad, then per input feature: first bit, group << 8 | bits]
@group(0) @binding(3) var<storage, read> info: array<u32>;

fn weight(n: u32, c: u32) -> f32 {
    let n_pad = info[0];
    let pos = info[1u + 2u * c];
    let gb = info[2u + 2u * c];
    let bits = gb & 0xffu;
    let g = gb >> 8u;
    let w0 = pos / 32u;
    let sh = pos % 32u;
    var hi = 0u;
    if (sh + bits > 32u) {
        hi = q_weight[(w0 + 1u) * n_pad + n];
    }
    let q = i32(field_of(q_weight[w0 * n_pad + n], hi, sh, bits)) - i32(1u << (bits - 1u));
    let nib = (q_scale[g * (n_pad / 8u) + n / 8u] >> (4u * (n % 8u))) & 15u;
    let m = round_f16(dtype_value(1u, q_scale_max[g / 2u], g) * 0.00390625);
    let s = round_f16(f32((nib + 1u) * (nib + 1u)) * m);
    return round_f16(f32(q) * s);
}
