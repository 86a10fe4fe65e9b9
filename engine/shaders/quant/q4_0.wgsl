// Q4_0: d = max / −8 (max: the signed value of largest magnitude), q = min(15, trunc(x · (1/d) + 8.5)).
const QBLOCK_BYTES: u32 = 18u;
const QBLOCKS: u32 = 2u;

fn quantize_block(s: u32, o: u32) {
    let id = symmetric_scale(s, o, 8.0);
    for (var j = 0u; j < 16u; j++) {
        let q0 = min(15, i32(add_rn(mul_rn(xv(s + j), id), 8.5)));
        let q1 = min(15, i32(add_rn(mul_rn(xv(s + j + 16u), id), 8.5)));
        put_byte(o + 2u + j, u32(q0) | (u32(q1) << 4u));
    }
}
