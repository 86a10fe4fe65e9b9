// The matvec's entry point adding the 64 partial sums with subgroup operations (adapters with the
// `subgroups` feature): each subgroup sums its lanes in registers, one lane per subgroup stores the sum,
// and the first invocation adds those few.

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) width: u32,
) {
    let r = row_of(wg);
    let t = wg.z;
    if (r >= p.rows) {
        return;
    }
    accumulate(r, t, li);
    let s = subgroupAdd(acc);
    if (lane == 0u) {
        partial[li / width] = s;
    }
    workgroupBarrier();
    if (li == 0u) {
        var total = 0.0;
        for (var i = 0u; i < (64u + width - 1u) / width; i++) {
            total += partial[i];
        }
        y[t * p.ldy + out_col(r)] = total;
    }
}
