// GPTQ v1 (after `grouped.wgsl`): qweight holds codes packed along the input, one column per output; qzeros the
// stored zero − 1 packed along the output; g_idx [in]. W[r, c] = scale[g, r] · (q − z) with g = g_idx[c].
// Codes of 2, 3, 4 or 8 bits (`p.format`) lie contiguously in runs of `bits` words per 32 values (3-bit
// values may straddle two words).

@group(0) @binding(0) var<storage, read> qweight: array<u32>;
@group(0) @binding(1) var<storage, read> qzeros: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> g_idx: array<u32>;

// fp16 scale number i.
fn scale_at(i: u32) -> f32 {
    return dtype_value(1u, scales[i / 2u], i);
}


// Value i of a packed sequence whose word w is at `base + w · stride` of qweight (or of qzeros).
fn unpack(i: u32, base: u32, stride: u32, from_qweight: bool) -> u32 {
    let bits = p.format;
    let bit = bits * (i % 32u);
    let w = (i / 32u) * bits + bit / 32u;
    let s = bit % 32u;
    let straddles = s + bits > 32u;
    var lo: u32;
    var hi = 0u;
    if (from_qweight) {
        lo = qweight[base + w * stride];
        if (straddles) {
            hi = qweight[base + (w + 1u) * stride];
        }
    } else {
        lo = qzeros[base + w * stride];
        if (straddles) {
            hi = qzeros[base + (w + 1u) * stride];
        }
    }
    return field_of(lo, hi, s, bits);
}

fn weight(r: u32, c: u32) -> f32 {
    let g = g_idx[c];
    let q = unpack(c, r, p.out_features, true);
    let z = unpack(r, g * (p.out_features / 32u * p.format), 1u, false) + 1u;
    return scale_at(g * p.out_features + r) * (f32(q) - f32(z));
}
