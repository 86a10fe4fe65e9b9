// HQQ (after `grouped.wgsl`): codes of 1–8 bits packed down the rows of the grouped view of the flattened
// weight (`[numel/group, group]` for axis 1, `[group, numel/group]` for axis 0; 3-bit: ten codes per
// int32, else codes per byte), zero and scale per group in the compute dtype.
// W = round(round(q − zero) · scale), each step rounded to the compute dtype as hqq (and the CPU) does.

@group(0) @binding(0) var<storage, read> packed: array<u32>;
@group(0) @binding(1) var<storage, read> zero: array<u32>;
@group(0) @binding(2) var<storage, read> scale: array<u32>;
// [bits, axis, cols of the grouped view, packing step, bytes per packed word, codes per word, dtype]
@group(0) @binding(3) var<storage, read> info: array<u32>;

fn weight(r: u32, c: u32) -> f32 {
    let bits = info[0];
    let cols = info[2];
    let word_bytes = info[4];
    let fields = info[5];
    let dt = info[6];
    let i = r * p.in_features + c;
    let gr = i / cols;
    let gc = i % cols;
    let g = select(gc, gr, info[1] == 1u);
    let k = gr % info[3];
    let j = gr / info[3];
    let at = (k * cols + gc) * word_bytes;
    var v = packed[at / 4u];
    if (word_bytes == 1u) {
        v = (v >> (8u * (at % 4u))) & 0xffu;
    }
    let q = f32((v >> (bits * (fields - 1u - j))) & ((1u << bits) - 1u));
    let z = dtype_value(dt, zero[dtype_word(dt, g)], g);
    let s = dtype_value(dt, scale[dtype_word(dt, g)], g);
    return round_to(dt, round_to(dt, q - z) * s);
}
