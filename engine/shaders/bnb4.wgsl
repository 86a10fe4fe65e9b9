// bitsandbytes NF4/FP4 (after `grouped.wgsl`): 4-bit codes two per byte (high nibble first) over the
// flattened weight, blocks of `blocksize` sharing an absmax. W = round_dtype(level[code] · absmax[block]).
// Double-quantised absmaxes are expanded once on the host (one f32 per block, exactly as the CPU computes
// them), so the arithmetic here is one product and one rounding, bit for bit as on the CPU.

@group(0) @binding(0) var<storage, read> codes: array<u32>;
@group(0) @binding(1) var<storage, read> absmax: array<f32>;
// [blocksize, dtype, level bits × 16]
@group(0) @binding(3) var<storage, read> info: array<u32>;

fn weight(r: u32, c: u32) -> f32 {
    let i = r * p.in_features + c;
    let byte = (codes[i / 8u] >> (8u * ((i / 2u) % 4u))) & 0xffu;
    let code = select(byte & 15u, byte >> 4u, i % 2u == 0u);
    let level = bitcast<f32>(info[2u + code]);
    return round_to(info[1u], level * absmax[i / info[0]]);
}
