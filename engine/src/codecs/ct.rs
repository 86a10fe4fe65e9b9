//! compressed-tensors' `pack-quantized` layout (llm-compressor's output, vLLM's default loader for integer
//! weight-only checkpoints; `shared/reference/hf-formats.md`): `B`-bit integer codes (1–8 bits) packed densely
//! into little-endian int32 words along the *input* dimension — element `j` of a row at bit `j·B` of the
//! row's bit stream, words `[out, ⌈in·B/32⌉]` — stored with an offset of `2^(B−1)` (signed codes `q − 2^(B−1)`);
//! `weight_scale` `[out, groups]` in the model's float type; for asymmetric schemes `weight_zero_point`
//! packed the same way along the *output* dimension (`[⌈out·B/32⌉, groups]`); optionally `weight_g_idx`
//! (activation order: the group of each input column). Dequantised as the library does it, in the scale's
//! type: `W[n, k] = round_T((q − z) · s[n, g(k)])` with signed `q` and `z` (`z = 0` when symmetric).

/// The float type of the stored scales (the dequantised weights are rounded to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleType {
    F16,
    BF16,
    F32,
}

impl ScaleType {
    /// Bytes per stored scale.
    pub fn size(self) -> usize {
        match self {
            ScaleType::F16 | ScaleType::BF16 => 2,
            ScaleType::F32 => 4,
        }
    }

    /// safetensors dtype name.
    pub fn name(self) -> &'static str {
        match self {
            ScaleType::F16 => "F16",
            ScaleType::BF16 => "BF16",
            ScaleType::F32 => "F32",
        }
    }

    /// Scale `i` of `bytes`.
    #[inline]
    fn read(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            ScaleType::F16 => half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            ScaleType::BF16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            ScaleType::F32 => f32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]),
        }
    }

    /// `x` rounded to this type.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleType::F16 => half::f16::from_f32(x).to_f32(),
            ScaleType::BF16 => half::bf16::from_f32(x).to_f32(),
            ScaleType::F32 => x,
        }
    }
}

/// int32 words a packed row of `len` `bits`-bit values takes.
pub fn packed_words(len: usize, bits: u32) -> usize {
    (len * bits as usize).div_ceil(32)
}

/// Pack each of the `rows` rows of `v` (`[rows, cols]`, unsigned codes `< 2^bits`, i.e. already offset)
/// into `[rows, ⌈cols·bits/32⌉]` little-endian int32 words.
pub fn pack_rows(v: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let words = packed_words(cols, bits);
    let mut out = vec![0u32; rows * words];
    let mask = (1u64 << bits) - 1;
    for r in 0..rows {
        let dst = &mut out[r * words..(r + 1) * words];
        for (j, &q) in v[r * cols..(r + 1) * cols].iter().enumerate() {
            let bit = j * bits as usize;
            let (w, off) = (bit / 32, bit % 32);
            let x = (u64::from(q) & mask) << off;
            dst[w] |= x as u32;
            if off + bits as usize > 32 {
                dst[w + 1] |= (x >> 32) as u32;
            }
        }
    }
    out.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Pack `v` (`[rows, cols]`, unsigned codes) along its *rows*, as compressed-tensors packs zero points:
/// `[⌈rows·bits/32⌉, cols]` int32 words.
pub fn pack_columns(v: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    // Packed [cols, words], then transposed to [words, cols].
    let p = pack_rows(&transpose(v, rows, cols), cols, rows, bits);
    let words: Vec<[u8; 4]> = p
        .chunks_exact(4)
        .map(|w| [w[0], w[1], w[2], w[3]])
        .collect();
    transpose(&words, cols, packed_words(rows, bits))
        .into_iter()
        .flatten()
        .collect()
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Bits `bit..bit+bits` of a little-endian word stream, where consecutive words lie `stride` words apart.
#[inline]
fn field(words: &[u8], first: usize, stride: usize, bit: usize, bits: u32) -> u32 {
    let word = |i: usize| {
        let at = 4 * (first + i * stride);
        u64::from(u32::from_le_bytes([
            words[at],
            words[at + 1],
            words[at + 2],
            words[at + 3],
        ]))
    };
    let (w, off) = (bit / 32, bit % 32);
    let mut x = word(w) >> off;
    if off + bits as usize > 32 {
        x |= word(w + 1) << (32 - off);
    }
    (x & ((1u64 << bits) - 1)) as u32
}

/// A `pack-quantized` linear `[out, in]` as stored, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct CtParts<'a> {
    pub bits: u32,
    pub in_features: usize,
    pub out_features: usize,
    /// Input columns per group (`in_features` for one group per output channel).
    pub group_size: usize,
    /// `[out, ⌈in·bits/32⌉]` int32.
    pub packed: &'a [u8],
    /// `[out, groups]` in `scale_type`.
    pub scale: &'a [u8],
    pub scale_type: ScaleType,
    /// `[⌈out·bits/32⌉, groups]` int32, for asymmetric schemes.
    pub zero_point: Option<&'a [u8]>,
    /// `[in]` int32 group of each input column (activation order), if stored.
    pub g_idx: Option<&'a [u8]>,
}

impl CtParts<'_> {
    /// Groups per output row.
    pub fn groups(&self) -> usize {
        match self.g_idx {
            Some(_) => self.scale.len() / self.scale_type.size() / self.out_features.max(1),
            None => self.in_features.div_ceil(self.group_size.max(1)),
        }
    }

    #[inline]
    fn group_of(&self, k: usize) -> usize {
        match self.g_idx {
            Some(g) => {
                i32::from_le_bytes([g[4 * k], g[4 * k + 1], g[4 * k + 2], g[4 * k + 3]]) as usize
            }
            None => k / self.group_size,
        }
    }

    /// Dequantise output row `n` (`out.len() == in_features`).
    pub fn dequant_row(&self, n: usize, out: &mut [f32]) {
        let offset = 1i32 << (self.bits - 1);
        let groups = self.groups();
        let words = packed_words(self.in_features, self.bits);
        for (k, o) in out.iter_mut().enumerate() {
            let g = self.group_of(k);
            let q =
                field(self.packed, n * words, 1, k * self.bits as usize, self.bits) as i32 - offset;
            let z = match self.zero_point {
                Some(zp) => field(zp, g, groups, n * self.bits as usize, self.bits) as i32 - offset,
                None => 0,
            };
            let s = self.scale_type.read(self.scale, n * groups + g);
            *o = self.scale_type.round((q - z) as f32 * s);
        }
    }

    /// Sizes agree with the shape and the group indices are in range (checked once, when opened).
    pub fn validate(&self, name: &str) -> crate::Result<()> {
        let bad = |d: String| Err(crate::Error::Invalid(format!("{name}: {d}")));
        let (k, n, b) = (self.in_features, self.out_features, self.bits);
        if !(1..=8).contains(&b) || self.group_size == 0 {
            return bad(format!(
                "pack-quantized needs 1..=8 bits and a group size (got {b} bits, group {})",
                self.group_size
            ));
        }
        let groups = self.groups();
        if groups == 0 {
            return bad(format!(
                "{groups} groups for {k} inputs, group {}",
                self.group_size
            ));
        }
        let want_packed = n * packed_words(k, b) * 4;
        let want_scale = n * groups * self.scale_type.size();
        if self.packed.len() != want_packed || self.scale.len() != want_scale {
            return bad(format!(
                "weight_packed/weight_scale hold {}/{} bytes, {want_packed}/{want_scale} expected for \
                 {n}×{k}, {b} bits, {groups} groups",
                self.packed.len(),
                self.scale.len()
            ));
        }
        if let Some(z) = self.zero_point {
            let want = packed_words(n, b) * groups * 4;
            if z.len() != want {
                return bad(format!(
                    "weight_zero_point holds {} bytes, {want} expected for {n} outputs, {groups} groups",
                    z.len()
                ));
            }
        }
        if let Some(g) = self.g_idx {
            if g.len() != 4 * k {
                return bad(format!(
                    "weight_g_idx holds {} bytes, {} expected",
                    g.len(),
                    4 * k
                ));
            }
            if let Some(bad_k) = (0..k).find(|&i| self.group_of(i) >= groups) {
                return bad(format!(
                    "weight_g_idx[{bad_k}] = {} is not below {groups} groups",
                    self.group_of(bad_k)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn four_bit_rows_pack_nibbles_low_first() {
        // Element j at bit 4j: values 1..8 → 0x87654321.
        let w = pack_rows(&[1, 2, 3, 4, 5, 6, 7, 8], 1, 8, 4);
        assert_eq!(u32::from_le_bytes(w[..4].try_into().unwrap()), 0x8765_4321);
        // Three bits straddle words: element 10 takes bits 30..33.
        let mut v = vec![0u8; 32];
        v[10] = 0b101;
        let w = pack_rows(&v, 1, 32, 3);
        assert_eq!(w.len(), 12);
        assert_eq!(u32::from_le_bytes(w[..4].try_into().unwrap()), 1 << 30);
        assert_eq!(u32::from_le_bytes(w[4..8].try_into().unwrap()), 1);
    }

    #[test]
    fn dequantises_what_was_packed_for_every_width() {
        for bits in 1..=8u32 {
            let (n, k, gs) = (24usize, 64usize, 16usize);
            let groups = k / gs;
            let maxq = (1u32 << bits) - 1;
            let q: Vec<u8> = (0..n * k)
                .map(|i| ((i * 7 + 3) as u32 % (maxq + 1)) as u8)
                .collect();
            let z: Vec<u8> = (0..n * groups)
                .map(|i| ((i * 5) as u32 % (maxq + 1)) as u8)
                .collect();
            let s: Vec<f32> = (0..n * groups).map(|i| 0.01 * (i + 1) as f32).collect();
            let sb: Vec<u8> = s
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect();
            let packed = pack_rows(&q, n, k, bits);
            let zp = pack_columns(&z, n, groups, bits);
            let p = CtParts {
                bits,
                in_features: k,
                out_features: n,
                group_size: gs,
                packed: &packed,
                scale: &sb,
                scale_type: ScaleType::BF16,
                zero_point: Some(&zp),
                g_idx: None,
            };
            p.validate("w").unwrap();
            let mut row = vec![0.0; k];
            for r in 0..n {
                p.dequant_row(r, &mut row);
                for c in 0..k {
                    let g = c / gs;
                    let sc = half::bf16::from_f32(s[r * groups + g]).to_f32();
                    let d = f32::from(q[r * k + c]) - f32::from(z[r * groups + g]);
                    let want = half::bf16::from_f32(sc * d).to_f32();
                    assert_eq!(row[c], want, "bits {bits} r {r} c {c}");
                }
            }
        }
    }
}
