//! AutoAWQ's "GEMM" packing (`shared/reference/hf-formats.md` §3.1), the layout transformers (through
//! gptqmodel) and vLLM's `awq` loaders read: 4-bit codes packed along the *output* dimension, eight per int32
//! in the interleaved nibble order `[0, 2, 4, 6, 1, 3, 5, 7]`; raw zero points (no −1) packed the same way per
//! group row; fp16 scales `[in/gs, out]`. Dequantised: `W[n, k] = scale[k/gs, n] · (q[k, n] − z[k/gs, n])`,
//! rounded to fp16 as the loaders compute it.

/// Output column `8c + ORDER[i]` goes to nibble `i` of word `c`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// The nibble of output column `8c + m`.
pub const AWQ_REV: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Pack `q` (`[rows, cols]` row-major, each < 16) along the columns: `[rows, cols/8]` int32 words, little
/// endian. `cols` is a multiple of 8.
pub fn pack_interleaved(q: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols / 2);
    for r in 0..rows {
        for c in 0..cols / 8 {
            let mut w: u32 = 0;
            for (i, &m) in AWQ_ORDER.iter().enumerate() {
                w |= u32::from(q[r * cols + 8 * c + m] & 15) << (4 * i);
            }
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out
}

/// An AWQ GEMM linear `[out, in]` as stored, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct AwqParts<'a> {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
    /// `[in, out/8]` int32.
    pub qweight: &'a [u8],
    /// `[in/gs, out/8]` int32.
    pub qzeros: &'a [u8],
    /// `[in/gs, out]` fp16.
    pub scales: &'a [u8],
}

#[inline]
fn nibble(words: &[u8], row: usize, words_per_row: usize, col: usize) -> u32 {
    let at = 4 * (row * words_per_row + col / 8);
    let w = u32::from_le_bytes([words[at], words[at + 1], words[at + 2], words[at + 3]]);
    (w >> (4 * AWQ_REV[col % 8])) & 15
}

impl AwqParts<'_> {
    /// Dequantise output row `n` (`out.len() == in_features`).
    pub fn dequant_row(&self, n: usize, out: &mut [f32]) {
        let wpr = self.out_features / 8;
        for (k, o) in out.iter_mut().enumerate() {
            let g = k / self.group_size;
            let q = nibble(self.qweight, k, wpr, n) as f32;
            let z = nibble(self.qzeros, g, wpr, n) as f32;
            let at = 2 * (g * self.out_features + n);
            let s = half::f16::from_le_bytes([self.scales[at], self.scales[at + 1]]).to_f32();
            *o = half::f16::from_f32(s * (q - z)).to_f32();
        }
    }

    /// Sizes agree with the shape (checked once, when a checkpoint is opened).
    pub fn validate(&self, name: &str) -> crate::Result<()> {
        let bad = |d: String| Err(crate::Error::Invalid(format!("{name}: {d}")));
        let (k, n, gs) = (self.in_features, self.out_features, self.group_size);
        if gs == 0 || k % gs != 0 || n % 8 != 0 {
            return bad(format!(
                "AWQ needs in % group_size == 0 and out % 8 == 0 (in {k}, out {n}, group {gs})"
            ));
        }
        let want = [k * n / 2, (k / gs) * n / 2, (k / gs) * n * 2];
        let got = [self.qweight.len(), self.qzeros.len(), self.scales.len()];
        if want != got {
            return bad(format!(
                "qweight/qzeros/scales hold {got:?} bytes, {want:?} expected for {n}×{k}, group {gs}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_word_from_the_reference() {
        // hf-formats.md §7: output columns 0..7 with codes 1..8 → 0x86427531.
        let w = pack_interleaved(&[1, 2, 3, 4, 5, 6, 7, 8], 1, 8);
        assert_eq!(u32::from_le_bytes(w[..4].try_into().unwrap()), 0x8642_7531);
    }

    #[test]
    fn dequantises_what_was_packed() {
        let (k, n, gs) = (32usize, 16usize, 16usize);
        // Codes q[k][n] (stored [in, out]), zeros per group row, scales per group row.
        let q: Vec<u8> = (0..k * n).map(|i| ((i * 7) % 16) as u8).collect();
        let z: Vec<u8> = (0..(k / gs) * n).map(|i| ((i * 3) % 16) as u8).collect();
        let s: Vec<f32> = (0..(k / gs) * n).map(|i| 0.01 * (i + 1) as f32).collect();
        let qw = pack_interleaved(&q, k, n);
        let qz = pack_interleaved(&z, k / gs, n);
        let sb: Vec<u8> = s
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let p = AwqParts {
            in_features: k,
            out_features: n,
            group_size: gs,
            qweight: &qw,
            qzeros: &qz,
            scales: &sb,
        };
        p.validate("w").unwrap();
        let mut row = vec![0.0; k];
        for nn in 0..n {
            p.dequant_row(nn, &mut row);
            for kk in 0..k {
                let g = kk / gs;
                let sc = half::f16::from_f32(s[g * n + nn]).to_f32();
                let want = half::f16::from_f32(
                    sc * (f32::from(q[kk * n + nn]) - f32::from(z[g * n + nn])),
                )
                .to_f32();
                assert_eq!(row[kk], want, "n {nn} k {kk}");
            }
        }
    }
}
