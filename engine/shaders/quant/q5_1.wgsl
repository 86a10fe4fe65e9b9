// Q5_1: d = (max − min) / 31, m = min, q = trunc((x − min) · (1/d) + 0.5).
const QBLOCK_BYTES: u32 = 24u;
const QBLOCKS: u32 = 1u;

fn quantize_block(s: u32, o: u32) {
    let mi = asymmetric_scale(s, o, 31.0);
    for (var j = 0u; j < 32u; j++) {
        lq[j] = u32(min(31, i32(add_rn(mul_rn(sub_rn(xv(s + j), mi.x), mi.y), 0.5))));
    }
    pack_q5(o + 4u, o + 8u);
}
