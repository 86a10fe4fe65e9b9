// Q2_K … Q6_K: 256-element super-blocks, one invocation per super-block. The sub-block products are formed
// first, exactly as the CPU's dequantisers (`codecs/kquants.rs`) and ggml form them.

// The 6-bit scale and min of sub-block j from the 12 packed bytes at `s` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: u32, s: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(u8_at(s + j) & 63u, u8_at(s + j + 4u) & 63u);
    }
    let sc = (u8_at(s + j + 4u) & 15u) | ((u8_at(s + j - 4u) >> 6u) << 4u);
    let m = (u8_at(s + j + 4u) >> 4u) | ((u8_at(s + j) >> 6u) << 4u);
    return vec2<u32>(sc, m);
}

// u8 scales[16]; u8 qs[64]; f16 d; f16 dmin
@compute @workgroup_size(64)
fn q2_k(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 84u;
    let o = i * 256u;
    let d = f16_at(b + 80u);
    let dmin = f16_at(b + 82u);
    for (var h = 0u; h < 2u; h++) {
        for (var g = 0u; g < 4u; g++) {
            let shift = 2u * g;
            for (var half = 0u; half < 2u; half++) {
                let sc = u8_at(b + 8u * h + 2u * g + half);
                let dl = d * f32(sc & 15u);
                let ml = dmin * f32(sc >> 4u);
                let base = o + 128u * h + 32u * g + 16u * half;
                let q = b + 16u + 32u * h + 16u * half;
                for (var l = 0u; l < 16u; l++) {
                    dst[base + l] = dl * f32((u8_at(q + l) >> shift) & 3u) - ml;
                }
            }
        }
    }
}

// u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d
@compute @workgroup_size(64)
fn q3_k(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 110u;
    let o = i * 256u;
    let d = f16_at(b + 108u);
    let s = b + 96u;
    for (var h = 0u; h < 2u; h++) {
        for (var g = 0u; g < 4u; g++) {
            let shift = 2u * g;
            let hbit = 4u * h + g;
            for (var half = 0u; half < 2u; half++) {
                let j = 8u * h + 2u * g + half;
                var low: u32;
                if (j < 8u) {
                    low = u8_at(s + j) & 15u;
                } else {
                    low = u8_at(s + j - 8u) >> 4u;
                }
                let high = (u8_at(s + 8u + j % 4u) >> (2u * (j / 4u))) & 3u;
                let dl = d * f32(i32(low | (high << 4u)) - 32);
                let base = o + 128u * h + 32u * g + 16u * half;
                let q = b + 32u + 32u * h + 16u * half;
                let hm = b + 16u * half;
                for (var l = 0u; l < 16u; l++) {
                    let lo = i32((u8_at(q + l) >> shift) & 3u);
                    var sub = 4;
                    if (((u8_at(hm + l) >> hbit) & 1u) != 0u) {
                        sub = 0;
                    }
                    dst[base + l] = dl * f32(lo - sub);
                }
            }
        }
    }
}

// f16 d; f16 dmin; u8 scales[12]; u8 qs[128]
@compute @workgroup_size(64)
fn q4_k(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 144u;
    let o = i * 256u;
    let d = f16_at(b);
    let dmin = f16_at(b + 2u);
    for (var c = 0u; c < 4u; c++) {
        let sm1 = scale_min_k4(2u * c, b + 4u);
        let sm2 = scale_min_k4(2u * c + 1u, b + 4u);
        let d1 = d * f32(sm1.x);
        let m1 = dmin * f32(sm1.y);
        let d2 = d * f32(sm2.x);
        let m2 = dmin * f32(sm2.y);
        let q = b + 16u + 32u * c;
        for (var l = 0u; l < 32u; l++) {
            let v = u8_at(q + l);
            dst[o + 64u * c + l] = d1 * f32(v & 15u) - m1;
            dst[o + 64u * c + 32u + l] = d2 * f32(v >> 4u) - m2;
        }
    }
}

// f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
@compute @workgroup_size(64)
fn q5_k(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 176u;
    let o = i * 256u;
    let d = f16_at(b);
    let dmin = f16_at(b + 2u);
    for (var c = 0u; c < 4u; c++) {
        let sm1 = scale_min_k4(2u * c, b + 4u);
        let sm2 = scale_min_k4(2u * c + 1u, b + 4u);
        let d1 = d * f32(sm1.x);
        let m1 = dmin * f32(sm1.y);
        let d2 = d * f32(sm2.x);
        let m2 = dmin * f32(sm2.y);
        let q = b + 48u + 32u * c;
        for (var l = 0u; l < 32u; l++) {
            let v = u8_at(q + l);
            let qh = u8_at(b + 16u + l);
            let h1 = ((qh >> (2u * c)) & 1u) << 4u;
            let h2 = ((qh >> (2u * c + 1u)) & 1u) << 4u;
            dst[o + 64u * c + l] = d1 * f32((v & 15u) | h1) - m1;
            dst[o + 64u * c + 32u + l] = d2 * f32((v >> 4u) | h2) - m2;
        }
    }
}

// u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d
@compute @workgroup_size(64)
fn q6_k(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 210u;
    let o = i * 256u;
    let d = f16_at(b + 208u);
    for (var h = 0u; h < 2u; h++) {
        let ql = b + 64u * h;
        let qh = b + 128u + 32u * h;
        let sc = b + 192u + 8u * h;
        let out = o + 128u * h;
        for (var l = 0u; l < 32u; l++) {
            let is = l / 16u;
            let a = u8_at(ql + l);
            let c = u8_at(ql + l + 32u);
            let hh = u8_at(qh + l);
            let q1 = i32((a & 15u) | ((hh & 3u) << 4u)) - 32;
            let q2 = i32((c & 15u) | (((hh >> 2u) & 3u) << 4u)) - 32;
            let q3 = i32((a >> 4u) | (((hh >> 4u) & 3u) << 4u)) - 32;
            let q4 = i32((c >> 4u) | (((hh >> 6u) & 3u) << 4u)) - 32;
            dst[out + l] = (d * f32(i8_at(sc + is))) * f32(q1);
            dst[out + l + 32u] = (d * f32(i8_at(sc + is + 2u))) * f32(q2);
            dst[out + l + 64u] = (d * f32(i8_at(sc + is + 4u))) * f32(q3);
            dst[out + l + 96u] = (d * f32(i8_at(sc + is + 6u))) * f32(q4);
        }
    }
}
