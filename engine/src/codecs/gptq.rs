//! GPTQ's "v1" checkpoint layout (AutoGPTQ / GPTQModel / optimum; `shared/reference/hf-formats.md` §2):
//! integer codes packed into int32 words along the input dimension (`qweight [in·bits/32, out]`), zero
//! points packed along the output dimension and stored minus one (`qzeros [G, out·bits/32]`), fp16
//! `scales [G, out]`, and `g_idx [in]` (the group of each input column, act-order aware).
//!
//! 2, 4 and 8 bits put `32/bits` fields in a word, lowest index in the lowest bits. 3 bits pack each run of
//! 32 values into three words (10 fields | 1 straddling | 10 | 1 straddling | 10). Both are written and
//! read by [`pack_along`] / [`unpack_at`]; dequantisation is `scale · (q − (zs + 1))` in f32, as every v1
//! reader does.

use crate::{Error, Result};

/// Bits per code GPTQ checkpoints use.
pub const GPTQ_BITS: [u32; 4] = [2, 3, 4, 8];

/// Number of int32 words that hold `n` codes of `bits` bits (`n` a multiple of 32).
pub fn packed_len(n: usize, bits: u32) -> usize {
    n / 32 * bits as usize
}

/// Bit position and word (within a 32-value run) of value `r` (0..32) of a 3-bit run: the first part
/// `(word, shift, nbits)` and, for the two straddling values, the second part.
fn three_bit_parts(r: usize) -> [(usize, u32, u32); 2] {
    match r {
        0..=9 => [(0, 3 * r as u32, 3), (0, 0, 0)],
        10 => [(0, 30, 2), (1, 0, 1)],
        11..=20 => [(1, 3 * (r as u32 - 11) + 1, 3), (0, 0, 0)],
        21 => [(1, 31, 1), (2, 0, 2)],
        _ => [(2, 3 * (r as u32 - 22) + 2, 3), (0, 0, 0)],
    }
}

/// Pack `values` (each < 2^bits; `values.len()` a multiple of 32) into words, value `i` going to the
/// word(s) of its 32-value run as GPTQ lays them out. `put(word_index, bits_to_or)` receives each part.
pub fn pack_along(values: &[u32], bits: u32, mut put: impl FnMut(usize, u32)) {
    let per_run = bits as usize; // words per 32 values
    for (run, vals) in values.chunks_exact(32).enumerate() {
        for (r, &v) in vals.iter().enumerate() {
            if bits == 3 {
                let [(w0, s0, n0), (w1, s1, n1)] = three_bit_parts(r);
                put(run * 3 + w0, (v & ((1 << n0) - 1)) << s0);
                if n1 > 0 {
                    put(run * 3 + w1, (v >> n0) << s1);
                }
            } else {
                let pf = 32 / bits as usize;
                put(run * per_run + r / pf, v << (bits * (r % pf) as u32));
            }
        }
    }
}

/// Value `i` of a packed sequence; `word(j)` returns word `j` of the sequence.
pub fn unpack_at(i: usize, bits: u32, word: impl Fn(usize) -> u32) -> u32 {
    let (run, r) = (i / 32, i % 32);
    if bits == 3 {
        let [(w0, s0, n0), (w1, s1, n1)] = three_bit_parts(r);
        let lo = (word(run * 3 + w0) >> s0) & ((1 << n0) - 1);
        if n1 == 0 {
            return lo;
        }
        let hi = (word(run * 3 + w1) >> s1) & ((1 << n1) - 1);
        lo | hi << n0
    } else {
        let pf = 32 / bits as usize;
        (word(run * bits as usize + r / pf) >> (bits * (r % pf) as u32)) & ((1 << bits) - 1)
    }
}

/// One GPTQ linear layer's stored tensors, little-endian as in the safetensors file.
#[derive(Clone, Copy, Debug)]
pub struct GptqParts<'a> {
    pub bits: u32,
    /// Input features (K).
    pub in_features: usize,
    /// Output features (N).
    pub out_features: usize,
    pub groups: usize,
    /// int32 `[packed_len(in), out]`.
    pub qweight: &'a [u8],
    /// int32 `[groups, packed_len(out)]`, zero points minus one.
    pub qzeros: &'a [u8],
    /// f16 `[groups, out]`.
    pub scales: &'a [u8],
    /// int32 `[in]`.
    pub g_idx: &'a [u8],
}

fn word_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

impl GptqParts<'_> {
    /// Check sizes and that every `g_idx` names a group; called once when a checkpoint is opened.
    pub fn validate(&self, name: &str) -> Result<()> {
        let bad = |d: String| Error::Invalid(format!("GPTQ tensor {name}: {d}"));
        if !GPTQ_BITS.contains(&self.bits) {
            return Err(bad(format!("{} bits (GPTQ has 2, 3, 4, 8)", self.bits)));
        }
        let (k, n, g) = (self.in_features, self.out_features, self.groups);
        if k % 32 != 0 || n % 32 != 0 || g == 0 {
            return Err(bad(format!(
                "in {k} and out {n} must be multiples of 32, with at least one group"
            )));
        }
        let want = [
            (
                "qweight",
                self.qweight.len(),
                packed_len(k, self.bits) * n * 4,
            ),
            (
                "qzeros",
                self.qzeros.len(),
                g * packed_len(n, self.bits) * 4,
            ),
            ("scales", self.scales.len(), g * n * 2),
            ("g_idx", self.g_idx.len(), k * 4),
        ];
        for (what, got, want) in want {
            if got != want {
                return Err(bad(format!("{what} has {got} bytes, {want} expected")));
            }
        }
        if let Some(i) = (0..k).find(|&i| word_at(self.g_idx, i) as usize >= g) {
            return Err(bad(format!(
                "g_idx[{i}] = {} but there are {g} groups",
                word_at(self.g_idx, i) as i32
            )));
        }
        Ok(())
    }

    /// The integer code of weight `W[n, k]`.
    pub fn code(&self, n: usize, k: usize) -> u32 {
        let cols = self.out_features;
        unpack_at(k, self.bits, |j| word_at(self.qweight, j * cols + n))
    }

    /// The real zero point (stored value + 1, v1) of output `n` in group `g`.
    pub fn zero(&self, g: usize, n: usize) -> u32 {
        let words = packed_len(self.out_features, self.bits);
        let zs = unpack_at(n, self.bits, |j| word_at(self.qzeros, g * words + j));
        zs + 1
    }

    /// The scale of output `n` in group `g`, as f32.
    pub fn scale(&self, g: usize, n: usize) -> f32 {
        let i = 2 * (g * self.out_features + n);
        half::f16::from_le_bytes([self.scales[i], self.scales[i + 1]]).to_f32()
    }

    /// Row `n` of the weight in PyTorch order (`W[n, 0..in]`): `scale · (q − z)` per element.
    pub fn dequant_row(&self, n: usize, out: &mut [f32]) {
        let scale: Vec<f32> = (0..self.groups).map(|g| self.scale(g, n)).collect();
        let zero: Vec<f32> = (0..self.groups).map(|g| self.zero(g, n) as f32).collect();
        let k = self.in_features.min(out.len());
        let put = |kk: usize, q: u32, o: &mut f32| {
            let g = word_at(self.g_idx, kk) as usize;
            *o = scale[g] * (q as f32 - zero[g]);
        };
        if self.bits == 3 {
            for (kk, o) in out[..k].iter_mut().enumerate() {
                put(kk, self.code(n, kk), o);
            }
            return;
        }
        // Whole words: 32/bits codes per word of column n.
        let pf = 32 / self.bits as usize;
        let mask = (1u32 << self.bits) - 1;
        for (w, chunk) in out[..k].chunks_mut(pf).enumerate() {
            let word = word_at(self.qweight, w * self.out_features + n);
            for (j, o) in chunk.iter_mut().enumerate() {
                put(w * pf + j, (word >> (self.bits as usize * j)) & mask, o);
            }
        }
    }
}

/// Packed tensors of one layer, owned, as [`GptqParts`] borrows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GptqPacked {
    pub qweight: Vec<u8>,
    pub qzeros: Vec<u8>,
    pub scales: Vec<u8>,
    pub g_idx: Vec<u8>,
}

/// Pack codes `q` (`[out, in]`, PyTorch order, each < 2^bits), zero points `zeros` and `scales`
/// (`[groups, out]`) and `g_idx` (`[in]`) into the v1 layout. Zero points must lie in `1..=2^bits − 1` so
/// that the stored `z − 1` is representable (the quantizer keeps them there).
pub fn pack_gptq(
    bits: u32,
    out_features: usize,
    in_features: usize,
    q: &[u8],
    zeros: &[u32],
    scales: &[f32],
    g_idx: &[u32],
) -> Result<GptqPacked> {
    let (n, k) = (out_features, in_features);
    let groups = scales.len() / n.max(1);
    let maxq = (1u32 << bits) - 1;
    if !GPTQ_BITS.contains(&bits) || k % 32 != 0 || n % 32 != 0 {
        return Err(Error::Invalid(format!(
            "GPTQ packing needs 2/3/4/8 bits and in/out multiples of 32 (got {bits} bits, {n}×{k})"
        )));
    }
    if q.len() != n * k || zeros.len() != groups * n || g_idx.len() != k {
        return Err(Error::Invalid("GPTQ packing: inconsistent sizes".into()));
    }
    if let Some(z) = zeros.iter().find(|&&z| z == 0 || z > maxq) {
        return Err(Error::Invalid(format!(
            "GPTQ zero point {z} cannot be stored as z − 1 in {bits} bits"
        )));
    }
    let kw = packed_len(k, bits);
    let mut qweight = vec![0u32; kw * n];
    let mut col = vec![0u32; k];
    for c in 0..n {
        for (kk, v) in col.iter_mut().enumerate() {
            *v = u32::from(q[c * k + kk]) & maxq;
        }
        pack_along(&col, bits, |j, bitsv| qweight[j * n + c] |= bitsv);
    }
    let nw = packed_len(n, bits);
    let mut qzeros = vec![0u32; groups * nw];
    for g in 0..groups {
        let zs: Vec<u32> = zeros[g * n..(g + 1) * n].iter().map(|z| z - 1).collect();
        pack_along(&zs, bits, |j, bitsv| qzeros[g * nw + j] |= bitsv);
    }
    let le = |v: &[u32]| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    Ok(GptqPacked {
        qweight: le(&qweight),
        qzeros: le(&qzeros),
        scales: scales
            .iter()
            .flat_map(|&s| half::f16::from_f32(s).to_le_bytes())
            .collect(),
        g_idx: le(g_idx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(values: &[u32], bits: u32) -> Vec<u32> {
        let mut w = vec![0u32; packed_len(values.len(), bits)];
        pack_along(values, bits, |j, b| w[j] |= b);
        w
    }

    #[test]
    fn worked_examples_from_the_layout_reference() {
        let mut v: Vec<u32> = (1..=8).collect();
        v.resize(32, 0);
        assert_eq!(pack(&v, 4)[0], 0x8765_4321);
        let mut v = vec![1, 2, 3, 4];
        v.resize(32, 0);
        assert_eq!(pack(&v, 8)[0], 0x0403_0201);
        // Symmetric zero points stored as z − 1.
        assert_eq!(pack(&[7; 32], 4), vec![0x7777_7777; 4]);
        assert_eq!(pack(&[127; 32], 8)[0], 0x7F7F_7F7F);
        assert_eq!(pack(&[1; 32], 2), vec![0x5555_5555; 2]);
        assert_eq!(
            pack(&[3; 32], 3),
            vec![0xDB6D_B6DB, 0xB6DB_6DB6, 0x6DB6_DB6D]
        );
    }

    #[test]
    fn every_width_round_trips() {
        let mut seed = 12345u32;
        for bits in GPTQ_BITS {
            let vals: Vec<u32> = (0..96)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) & ((1 << bits) - 1)
                })
                .collect();
            let w = pack(&vals, bits);
            assert_eq!(w.len(), 3 * bits as usize);
            for (i, &v) in vals.iter().enumerate() {
                assert_eq!(unpack_at(i, bits, |j| w[j]), v, "{bits} bits, value {i}");
            }
        }
        // 3-bit straddlers: value 10 has two bits in word 0 and one in word 1; value 21 one and two.
        let mut v = vec![0u32; 32];
        v[10] = 0b111;
        v[21] = 0b111;
        assert_eq!(pack(&v, 3), vec![0xC000_0000, 0x8000_0001, 0x0000_0003]);
    }

    #[test]
    fn packed_layer_dequantizes_to_scale_times_code_minus_zero() {
        let (n, k, gs) = (64, 64, 32);
        let groups = k / gs;
        let q: Vec<u8> = (0..n * k).map(|i| (i * 7 % 16) as u8).collect();
        let zeros: Vec<u32> = (0..groups * n).map(|i| 1 + (i as u32 % 15)).collect();
        let scales: Vec<f32> = (0..groups * n).map(|i| 0.01 * (1 + i % 5) as f32).collect();
        // Act-order style g_idx: alternate groups.
        let g_idx: Vec<u32> = (0..k as u32).map(|c| c % 2).collect();
        let p = pack_gptq(4, n, k, &q, &zeros, &scales, &g_idx).expect("pack");
        let parts = GptqParts {
            bits: 4,
            in_features: k,
            out_features: n,
            groups,
            qweight: &p.qweight,
            qzeros: &p.qzeros,
            scales: &p.scales,
            g_idx: &p.g_idx,
        };
        parts.validate("t").expect("valid");
        let mut row = vec![0.0f32; k];
        for r in [0, 17, 63] {
            parts.dequant_row(r, &mut row);
            for c in 0..k {
                let g = g_idx[c] as usize;
                let s = half::f16::from_f32(scales[g * n + r]).to_f32();
                let want = s * (f32::from(q[r * k + c]) - zeros[g * n + r] as f32);
                assert_eq!(row[c], want, "row {r} col {c}");
            }
        }
        // Hostile: a g_idx beyond the groups, a short qweight, a zero point that cannot be stored.
        let mut bad = p.g_idx.clone();
        bad[0] = 9;
        assert!(GptqParts {
            g_idx: &bad,
            ..parts
        }
        .validate("t")
        .is_err());
        assert!(GptqParts {
            qweight: &p.qweight[4..],
            ..parts
        }
        .validate("t")
        .is_err());
        let mut z0 = zeros.clone();
        z0[3] = 0;
        assert!(pack_gptq(4, n, k, &q, &z0, &scales, &g_idx).is_err());
    }
}
