// The matvec's share of a row for a float type: every 64th element, so neighbouring invocations read
// neighbouring weights.
fn accumulate(r: u32, t: u32, li: u32) {
    acc = 0.0;
    for (var c = li; c < p.cols; c += 64u) {
        x_base = t * p.cols + c;
        dequant_block((r * p.cols + c) * BLOCK_BYTES);
    }
}
