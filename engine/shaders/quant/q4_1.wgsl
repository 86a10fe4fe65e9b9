// Q4_1: d = (max − min) / 15, m = min, q = min(15, trunc((x − min) · (1/d) + 0.5)).
const QBLOCK_BYTES: u32 = 20u;
const QBLOCKS: u32 = 1u;

fn quantize_block(s: u32, o: u32) {
    let mi = asymmetric_scale(s, o, 15.0);
    for (var j = 0u; j < 16u; j++) {
        let q0 = min(15, i32(add_rn(mul_rn(sub_rn(xv(s + j), mi.x), mi.y), 0.5)));
        let q1 = min(15, i32(add_rn(mul_rn(sub_rn(xv(s + j + 16u), mi.x), mi.y), 0.5)));
        put_byte(o + 4u + j, u32(q0) | (u32(q1) << 4u));
    }
}
