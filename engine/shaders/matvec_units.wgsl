// The matvec's share of a row for a quantized type: every 64th 32-element sub-block (`dequant_sub`), so a
// row of a few 256-element blocks still keeps the workgroup busy.
fn accumulate(r: u32, t: u32, li: u32) {
    let nb = p.cols / BLOCK_ELEMS;
    acc = 0.0;
    for (var u = li; u < p.cols / 32u; u += 64u) {
        let blk = (32u * u) / BLOCK_ELEMS;
        x_base = t * p.cols + blk * BLOCK_ELEMS;
        dequant_sub((r * nb + blk) * BLOCK_BYTES, (32u * u) % BLOCK_ELEMS / 32u);
    }
}
