// Q5_1: d = (max − min) / 31, m = min, q = trunc((x − min) · (1/d) + 0.5).
const QBLOCK_BYTES: u32 = 24u;
const QBLOCKS: u32 = 1u;

fn quantize_block(s: u32, o: u32) {
    let mm = min_max(s);
    let d = div_rn(sub_rn(mm.y, mm.x), 31.0);
    let id = inverse(d);
    put_f16(o, d);
    put_f16(o + 2u, mm.x);
    for (var j = 0u; j < 32u; j++) {
        lq[j] = u32(min(31, i32(add_rn(mul_rn(sub_rn(xv(s + j), mm.x), id), 0.5))));
    }
    pack_q5(o + 4u, o + 8u);
}
