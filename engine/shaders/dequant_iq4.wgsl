// IQ4_NL and IQ4_XS: 4-bit indices into the non-linear IQ4 grid (`codecs/iquants.rs`).

const KVALUES: array<f32, 16> = array<f32, 16>(
    -127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0,
    1.0, 13.0, 25.0, 38.0, 53.0, 69.0, 89.0, 113.0,
);

fn nibbles(q: u32, dl: f32, o: u32) {
    for (var j = 0u; j < 16u; j++) {
        let v = u8_at(q + j);
        dst[o + j] = dl * KVALUES[v & 15u];
        dst[o + j + 16u] = dl * KVALUES[v >> 4u];
    }
}

// f16 d; u8 qs[16]
@compute @workgroup_size(64)
fn iq4_nl(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 18u;
    nibbles(b + 2u, f16_at(b), i * 32u);
}

// f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]
@compute @workgroup_size(64)
fn iq4_xs(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = block_id(gid);
    if (i >= p.count) { return; }
    let b = (p.first + i) * 136u;
    let d = f16_at(b);
    let scales_h = u16_at(b + 2u);
    for (var ib = 0u; ib < 8u; ib++) {
        let ls = ((u8_at(b + 4u + ib / 2u) >> (4u * (ib % 2u))) & 15u) | (((scales_h >> (2u * ib)) & 3u) << 4u);
        let dl = d * f32(i32(ls) - 32);
        nibbles(b + 8u + 16u * ib, dl, i * 256u + 32u * ib);
    }
}
