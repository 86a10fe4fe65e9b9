// Correctly rounded f32 addition, multiplication and division done in integer operations, and exact
// comparisons. A GPU may fuse a product and a sum into one rounding, flush subnormals, and divides to
// within 2.5 ulp; llama.cpp's round-to-nearest quantizers, computed on the CPU in IEEE single precision,
// decide codes at exact halfway points, so the quantization kernels compute their arithmetic here to
// write the CPU's bytes. Operands are finite (weights).

struct Fp {
    neg: bool,
    // |x| = m · 2^e with m < 2^24 (0 for ±0); normalised (bit 23 set) by `fp_norm`.
    e: i32,
    m: u32,
}

fn fp_of(x: f32) -> Fp {
    let b = bitcast<u32>(x);
    let ex = (b >> 23u) & 0xffu;
    var m = b & 0x7fffffu;
    var e = -149;
    if (ex != 0u) {
        m = m | 0x800000u;
        e = i32(ex) - 150;
    }
    return Fp((b >> 31u) == 1u, e, m);
}

fn fp_norm(x: Fp) -> Fp {
    if (x.m == 0u) {
        return x;
    }
    let s = countLeadingZeros(x.m) - 8u;
    return Fp(x.neg, x.e - i32(s), x.m << s);
}

fn signed_zero(neg: bool) -> f32 {
    return bitcast<f32>(select(0u, 0x80000000u, neg));
}

// m · 2^e (with nonzero bits below m when `sticky`, which then lie below half of m's last place) rounded
// to the nearest f32, ties to even, subnormals kept.
fn fp_round(neg: bool, e: i32, m: u32, sticky: bool) -> f32 {
    let sign = select(0u, 0x80000000u, neg);
    if (m == 0u) {
        return bitcast<f32>(sign);
    }
    let top = 31 - i32(countLeadingZeros(m));
    var biased = e + top + 127;
    var shift = top - 23;
    if (biased < 1) {
        shift += 1 - biased;
        biased = 0;
    }
    var mant: u32;
    if (shift <= 0) {
        mant = m << u32(-shift);
    } else if (shift >= 32) {
        mant = 0u;
    } else {
        let rem = m & ((1u << u32(shift)) - 1u);
        let half = 1u << u32(shift - 1);
        mant = m >> u32(shift);
        if (rem > half || (rem == half && (sticky || (mant & 1u) == 1u))) {
            mant += 1u;
        }
    }
    if (biased == 0) {
        // Subnormal; a carry into bit 23 is the smallest normal, the same bits.
        return bitcast<f32>(sign | mant);
    }
    if (mant >= 0x1000000u) {
        mant >>= 1u;
        biased += 1;
    }
    if (biased >= 255) {
        return bitcast<f32>(sign | 0x7f800000u);
    }
    return bitcast<f32>(sign | (u32(biased) << 23u) | (mant & 0x7fffffu));
}

fn mul_rn(a: f32, b: f32) -> f32 {
    let x = fp_of(a);
    let y = fp_of(b);
    let neg = x.neg != y.neg;
    if (x.m == 0u || y.m == 0u) {
        return signed_zero(neg);
    }
    // The 48-bit product in (hi, lo).
    let a0 = x.m & 0xffffu;
    let a1 = x.m >> 16u;
    let b0 = y.m & 0xffffu;
    let b1 = y.m >> 16u;
    let p00 = a0 * b0;
    let mid = a0 * b1 + a1 * b0;
    let lo = p00 + (mid << 16u);
    let hi = a1 * b1 + (mid >> 16u) + select(0u, 1u, lo < p00);
    var top: u32;
    if (hi != 0u) {
        top = 63u - countLeadingZeros(hi);
    } else {
        top = 31u - countLeadingZeros(lo);
    }
    if (top <= 25u) {
        return fp_round(neg, x.e + y.e, lo, false);
    }
    let s = top - 25u;
    let m = (lo >> s) | (hi << (32u - s));
    let sticky = (lo & ((1u << s) - 1u)) != 0u;
    return fp_round(neg, x.e + y.e + i32(s), m, sticky);
}

// a / b for b ≠ 0.
fn div_rn(a: f32, b: f32) -> f32 {
    let x = fp_norm(fp_of(a));
    let y = fp_norm(fp_of(b));
    let neg = x.neg != y.neg;
    if (x.m == 0u) {
        return signed_zero(neg);
    }
    // 26 quotient bits of x.m / y.m (in (1/2, 2)), the remainder's bits sticky.
    var r = x.m;
    var q = 0u;
    for (var i = 0; i < 26; i++) {
        q = q << 1u;
        if (r >= y.m) {
            r -= y.m;
            q = q | 1u;
        }
        r = r << 1u;
    }
    return fp_round(neg, x.e - y.e - 25, q, r != 0u);
}

fn add_rn(a: f32, b: f32) -> f32 {
    var x = fp_norm(fp_of(a));
    var y = fp_norm(fp_of(b));
    if (x.m == 0u && y.m == 0u) {
        // ±0 + ±0: −0 only when both are.
        return signed_zero(x.neg && y.neg);
    }
    if (y.m == 0u) {
        return a;
    }
    if (x.m == 0u) {
        return b;
    }
    if (y.e > x.e || (y.e == x.e && y.m > x.m)) {
        let t = x;
        x = y;
        y = t;
    }
    // Three guard bits; the smaller operand aligned, what falls off kept as a sticky bit.
    let d = u32(x.e - y.e);
    var ym = y.m << 3u;
    var sticky = false;
    if (d >= 32u) {
        sticky = ym != 0u;
        ym = 0u;
    } else if (d > 0u) {
        sticky = (ym & ((1u << d) - 1u)) != 0u;
        ym = ym >> d;
    }
    let xm = x.m << 3u;
    var s: u32;
    if (x.neg == y.neg) {
        s = xm + ym;
    } else {
        s = xm - ym;
        if (sticky) {
            // The true difference lies just below: one less, with bits below it.
            s -= 1u;
        }
        if (s == 0u && !sticky) {
            return 0.0;
        }
    }
    return fp_round(x.neg, x.e - 3, s, sticky);
}

fn sub_rn(a: f32, b: f32) -> f32 {
    return add_rn(a, bitcast<f32>(bitcast<u32>(b) ^ 0x80000000u));
}

// a < b for finite a and b, as IEEE compares them (−0 = +0, subnormals kept).
fn lt_exact(a: f32, b: f32) -> bool {
    let x = bitcast<u32>(a);
    let y = bitcast<u32>(b);
    if (((x | y) & 0x7fffffffu) == 0u) {
        return false;
    }
    let kx = select(x | 0x80000000u, ~x, (x >> 31u) == 1u);
    let ky = select(y | 0x80000000u, ~y, (y >> 31u) == 1u);
    return kx < ky;
}

// |x| as bits (ordered like the magnitudes).
fn abs_bits(x: f32) -> u32 {
    return bitcast<u32>(x) & 0x7fffffffu;
}

// C's roundf: halfway cases away from zero.
fn round_away(v: f32) -> f32 {
    let a = bitcast<f32>(abs_bits(v));
    var t = trunc(a);
    if (sub_rn(a, t) >= 0.5) {
        t = t + 1.0;
    }
    return select(t, -t, (bitcast<u32>(v) >> 31u) == 1u);
}

// The f16 bits nearest x (ties to even), as `half::f16::from_f32`.
fn f16_bits(x: f32) -> u32 {
    let r = round_f16(x);
    let b = bitcast<u32>(r);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) {
        return sign | 0x7c00u;
    }
    if (a < 0x38800000u) {
        // Subnormal f16: r = k · 2⁻²⁴ exactly.
        return sign | u32(bitcast<f32>(a) * 16777216.0);
    }
    return sign | (((a >> 23u) - 112u) << 10u) | ((a >> 13u) & 0x3ffu);
}
