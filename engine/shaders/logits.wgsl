// Per-token scores of logits rows on the device, so a few numbers per token come back instead of a row
// of the vocabulary: `nll` (perplexity: −log softmax at the target, and the top token) and `kld` (the
// KL-divergence of the variant's rows from the base's, the host's `token_kld_both`: with the base
// log-probabilities as they are and compressed to 16 bits as llama-perplexity stores them). One workgroup
// per row; f32 sums (the host sums in f64, so results agree to rounding).
//
// Output per row (8 floats from `out[(out_row0 + r) · 8]`):
//   nll: [nll, top token, 0, …]
//   kld: [nll, top token, KLD (16-bit base), base nll (16-bit), base top (16-bit),
//         KLD (full base), base nll (full), base top (full)]

@group(0) @binding(0) var<storage, read> v: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

struct Params {
    vocab: u32,
    rows: u32,
    // Base row of the first row, its output row, and its target's index.
    base_row0: u32,
    out_row0: u32,
    target0: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 256u;
var<workgroup> red: array<f32, 256>;
var<workgroup> red_i: array<u32, 256>;

// The workgroup's first maximum of (red, red_i) pairs: the larger value, the lower index on ties.
fn reduce_first_max(li: u32) -> vec2<f32> {
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (li < k) {
            let a = red[li];
            let c = red[li + k];
            if (c > a || (c == a && red_i[li + k] < red_i[li])) {
                red[li] = c;
                red_i[li] = red_i[li + k];
            }
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red[0], f32(red_i[0]));
    workgroupBarrier();
    return r;
}

fn reduce_sum(li: u32) -> f32 {
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (li < k) {
            red[li] += red[li + k];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_min(li: u32) -> f32 {
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (li < k) {
            red[li] = min(red[li], red[li + k]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Max (first index) of row `at` of v (which = 0) or b (which = 1).
fn row_max(which: u32, at: u32, li: u32) -> vec2<f32> {
    var best = -3.4028235e38;
    var bi = 0xffffffffu;
    for (var i = li; i < p.vocab; i += WG) {
        var x: f32;
        if (which == 0u) {
            x = v[at + i];
        } else {
            x = b[at + i];
        }
        if (x > best || bi == 0xffffffffu) {
            best = x;
            bi = i;
        }
    }
    red[li] = best;
    red_i[li] = bi;
    return reduce_first_max(li);
}

fn row_sum_exp(which: u32, at: u32, mx: f32, li: u32) -> f32 {
    var s = 0.0;
    for (var i = li; i < p.vocab; i += WG) {
        if (which == 0u) {
            s += exp(v[at + i] - mx);
        } else {
            s += exp(b[at + i] - mx);
        }
    }
    red[li] = s;
    return reduce_sum(li);
}

@compute @workgroup_size(256)
fn nll(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = wg.x;
    if (r >= p.rows) {
        return;
    }
    let at = r * p.vocab;
    let m = row_max(0u, at, li);
    let s = row_sum_exp(0u, at, m.x, li);
    if (li == 0u) {
        let o = (p.out_row0 + r) * 8u;
        let t = targets[p.target0 + r];
        out[o] = m.x + log(s) - v[at + t];
        out[o + 1u] = m.y;
    }
}

@compute @workgroup_size(256)
fn kld(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = wg.x;
    if (r >= p.rows) {
        return;
    }
    let at = r * p.vocab;
    let bat = (p.base_row0 + r) * p.vocab;
    let t = targets[p.target0 + r];
    let vm = row_max(0u, at, li);
    let bm = row_max(1u, bat, li);
    var lo = 3.4028235e38;
    for (var i = li; i < p.vocab; i += WG) {
        lo = min(lo, b[bat + i]);
    }
    red[li] = lo;
    let bmin = reduce_min(li);
    let vlse = log(row_sum_exp(0u, at, vm.x, li));
    let blse = log(row_sum_exp(1u, bat, bm.x, li));
    // The variant's log q_i = v[i] − (max + lse).
    let mpl = vm.x + vlse;
    let shift = bm.x + blse;
    // llama.cpp's 16-bit compression of the base row: the top 16 nats in 65535 steps.
    let min_logit = max(bmin, bm.x - 16.0);
    let min_log_prob = min_logit - bm.x - blse;
    let scale = (bm.x - min_logit) / 65535.0;
    var inv = 0.0;
    if (scale != 0.0) {
        inv = 1.0 / scale;
    }
    var kq = 0.0;
    var kf = 0.0;
    var bq = -3.4028235e38;
    var iq = 0xffffffffu;
    var bf = -3.4028235e38;
    var jf = 0xffffffffu;
    for (var i = li; i < p.vocab; i += WG) {
        let l = b[bat + i];
        let lv = v[at + i];
        let lp = l - shift;
        if (lp > -16.0) {
            kf += exp(lp) * (lp - lv + mpl);
        }
        if (lp > bf || jf == 0xffffffffu) {
            bf = lp;
            jf = i;
        }
        var q = 0.0;
        if (scale != 0.0 && l > min_logit) {
            q = clamp(round(inv * (l - min_logit)), 0.0, 65535.0);
        }
        let lq = scale * q + min_log_prob;
        if (lq > -16.0) {
            kq += exp(lq) * (lq - lv + mpl);
        }
        if (lq > bq || iq == 0xffffffffu) {
            bq = lq;
            iq = i;
        }
    }
    red[li] = kq;
    let sq = reduce_sum(li);
    red[li] = kf;
    let sf = reduce_sum(li);
    red[li] = bq;
    red_i[li] = iq;
    let topq = reduce_first_max(li);
    red[li] = bf;
    red_i[li] = jf;
    let topf = reduce_first_max(li);
    if (li == 0u) {
        let o = (p.out_row0 + r) * 8u;
        let lt = b[bat + t];
        var qt = 0.0;
        if (scale != 0.0 && lt > min_logit) {
            qt = clamp(round(inv * (lt - min_logit)), 0.0, 65535.0);
        }
        out[o] = mpl - v[at + t];
        out[o + 1u] = vm.y;
        out[o + 2u] = sq;
        out[o + 3u] = -(scale * qt + min_log_prob);
        out[o + 4u] = topq.y;
        out[o + 5u] = sf;
        out[o + 6u] = -(lt - shift);
        out[o + 7u] = topf.y;
    }
}
