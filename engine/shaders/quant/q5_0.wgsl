// Q5_0: d = max / −16, q = min(31, trunc(x · (1/d) + 16.5)).
const QBLOCK_BYTES: u32 = 22u;
const QBLOCKS: u32 = 2u;

fn quantize_block(s: u32, o: u32) {
    let id = symmetric_scale(s, o, 16.0);
    for (var j = 0u; j < 32u; j++) {
        lq[j] = u32(min(31, i32(add_rn(mul_rn(xv(s + j), id), 16.5))));
    }
    pack_q5(o + 2u, o + 6u);
}
