// Q4_1: d = (max − min) / 15, m = min, q = min(15, trunc((x − min) · (1/d) + 0.5)).
const QBLOCK_BYTES: u32 = 20u;
const QBLOCKS: u32 = 1u;

fn quantize_block(s: u32, o: u32) {
    let mm = min_max(s);
    let d = div_rn(sub_rn(mm.y, mm.x), 15.0);
    let id = inverse(d);
    put_f16(o, d);
    put_f16(o + 2u, mm.x);
    for (var j = 0u; j < 16u; j++) {
        let q0 = min(15, i32(add_rn(mul_rn(sub_rn(xv(s + j), mm.x), id), 0.5)));
        let q1 = min(15, i32(add_rn(mul_rn(sub_rn(xv(s + j + 16u), mm.x), id), 0.5)));
        put_byte(o + 4u + j, u32(q0) | (u32(q1) << 4u));
    }
}
