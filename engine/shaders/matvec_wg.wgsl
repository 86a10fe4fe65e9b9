// The matvec's entry point adding the 64 partial sums in workgroup memory (every adapter).

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_of(wg);
    let t = wg.z;
    if (r >= p.rows) {
        return;
    }
    accumulate(r, t, li);
    partial[li] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) {
            partial[li] += partial[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        y[t * p.ldy + out_col(r)] = partial[0];
    }
}
