// The GEMM's W read element by element through the storage file's `w_val(i)` (f32, or F16/BF16 read in
// place), 16-deep k-steps.
const BK: u32 = 16u;

fn w_at(base: u32, j: u32, kk: u32) -> f32 {
    if (W_KMAJOR) {
        return w_val(base + kk * p.ldw + j);
    }
    return w_val(base + j * p.ldw + kk);
}

// W(j0.., k0..) into `ws` ([BK][BN]): 1024 values, 4 per invocation, zero past the edges.
fn stage_w(wb: u32, j0: u32, k0: u32, li: u32) {
    for (var e = 0u; e < 4u; e++) {
        let idx = li + 256u * e;
        var wv = 0.0;
        if (W_KMAJOR) {
            let c = idx % BN;
            let kr = idx / BN;
            if (j0 + c < p.m && k0 + kr < p.k) {
                wv = w_at(wb, j0 + c, k0 + kr);
            }
            ws[kr * BN + c] = wv;
        } else {
            let r = idx / BK;
            let kk = idx % BK;
            if (j0 + r < p.m && k0 + kk < p.k) {
                wv = w_at(wb, j0 + r, k0 + kk);
            }
            ws[kk * BN + r] = wv;
        }
    }
}
