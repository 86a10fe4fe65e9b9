// Q8_0: d = amax / 127, q = roundf(x · (1/d)).
const QBLOCK_BYTES: u32 = 34u;
const QBLOCKS: u32 = 2u;

fn quantize_block(s: u32, o: u32) {
    var amax = 0u;
    for (var j = 0u; j < 32u; j++) {
        // MAX(amax, fabsf(v))
        amax = max(amax, abs_bits(xv(s + j)));
    }
    let d = div_rn(bitcast<f32>(amax), 127.0);
    let id = inverse(d);
    put_f16(o, d);
    for (var j = 0u; j < 32u; j++) {
        put_byte(o + 2u + j, u32(i32(round_away(mul_rn(xv(s + j), id)))));
    }
}
