//! ExLlamaV2's EXL2 linear layout (`shared/reference/exl2.md` §1.2, §2), read and written exactly as its loader
//! and kernels take it:
//!
//! * the input features are processed in an act-order permutation `perm` (stored as its inverse
//!   `q_invperm[i]` = permuted position of input `i`, int32);
//! * the permuted rows form contiguous groups, each with its own bit width `b ∈ {8, 6, 5, 4, 3, 2}`, groups of
//!   one width adjacent and widths non-increasing; `q_groups` (int16) holds `(b, first q_weight word-row)` per
//!   group;
//! * `q_weight` (int32 `[Σ rows·b/32, N']`): per output column, each group's codes as one little-endian
//!   bitstream, permuted row `i` of the group at bit `i·b` (fields may straddle words);
//! * per (group, output column) a 4-bit scale code `nib` (8 per int32 of `q_scale [G, N'/8]`) and per group an
//!   fp16 `q_scale_max`: the scale is `f16(f16((nib+1)²) · f16(q_scale_max/256))` and a weight is
//!   `f16((q − 2^(b−1)) · scale)` — symmetric, no zero points;
//! * `N'` is the output width rounded up to 32; the padded columns hold zeros.

use crate::{Error, Result};

/// Bit widths EXL2 stores, in storage order.
pub const EXL2_BITS: [u8; 6] = [8, 6, 5, 4, 3, 2];

/// One group of permuted input rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exl2Group {
    pub bits: u8,
    /// First permuted row.
    pub row: usize,
    pub rows: usize,
    /// First `q_weight` word-row.
    pub word: usize,
}

/// `f16(f16((nib+1)²) · f16(q_scale_max / 256))`: the scale of a (group, column) whose code is `nib + 1`.
#[inline]
pub fn exl2_scale(nib: u32, q_scale_max: half::f16) -> f32 {
    let m = half::f16::from_f32(q_scale_max.to_f32() / 256.0).to_f32();
    let c = ((nib + 1) * (nib + 1)) as f32;
    half::f16::from_f32(c * m).to_f32()
}

/// A weight's value: `f16((q − 2^(b−1)) · scale)`.
#[inline]
pub fn exl2_value(q: u32, bits: u8, scale: f32) -> f32 {
    let z = 1i32 << (bits - 1);
    half::f16::from_f32((q as i32 - z) as f32 * scale).to_f32()
}

/// The groups of a layer from its `q_groups` pairs and `q_weight`'s height, checked; and the act-order
/// permutation (permuted row → input feature) from `q_invperm`.
pub fn exl2_layout(
    q_groups: &[i16],
    words: usize,
    q_invperm: &[i64],
) -> Result<(Vec<Exl2Group>, Vec<u32>)> {
    let bad = |d: String| Err(Error::Invalid(format!("EXL2: {d}")));
    if q_groups.is_empty() || !q_groups.len().is_multiple_of(2) {
        return bad(format!("q_groups has {} entries", q_groups.len()));
    }
    let n = q_groups.len() / 2;
    let mut groups = Vec::with_capacity(n);
    let mut row = 0usize;
    for g in 0..n {
        let (b, start) = (q_groups[2 * g], q_groups[2 * g + 1]);
        if !EXL2_BITS.contains(&(b as u8)) || b < 0 {
            return bad(format!("group {g} has bit width {b}"));
        }
        let end = if g + 1 < n {
            i64::from(q_groups[2 * g + 3])
        } else {
            words as i64
        };
        let start = i64::from(start);
        let expected = groups.last().map_or(0, |p: &Exl2Group| {
            (p.word + p.rows * usize::from(p.bits) / 32) as i64
        });
        if start != expected || end < start || end > words as i64 {
            return bad(format!(
                "group {g} spans q_weight rows {start}..{end} (expected to start at {expected}, of {words})"
            ));
        }
        let bits = b as usize;
        let span = (end - start) as usize * 32;
        if !span.is_multiple_of(bits) || span == 0 {
            return bad(format!(
                "group {g}: {} words do not hold whole {bits}-bit rows",
                end - start
            ));
        }
        let rows = span / bits;
        groups.push(Exl2Group {
            bits: b as u8,
            row,
            rows,
            word: start as usize,
        });
        row += rows;
    }
    if row != q_invperm.len() {
        return bad(format!(
            "the groups cover {row} input rows, q_invperm has {}",
            q_invperm.len()
        ));
    }
    let mut perm = vec![u32::MAX; row];
    for (i, &p) in q_invperm.iter().enumerate() {
        let Some(slot) = usize::try_from(p).ok().and_then(|p| perm.get_mut(p)) else {
            return bad(format!("q_invperm[{i}] = {p} is out of range"));
        };
        if *slot != u32::MAX {
            return bad(format!("q_invperm repeats {p}"));
        }
        *slot = i as u32;
    }
    Ok((groups, perm))
}

/// An EXL2 linear `[out, in]` as stored, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Exl2Parts<'a> {
    pub in_features: usize,
    /// The model's output width (`≤ n_pad`).
    pub out_features: usize,
    /// `q_weight`'s width (`N'`, a multiple of 32).
    pub n_pad: usize,
    pub groups: &'a [Exl2Group],
    /// Permuted row → input feature.
    pub perm: &'a [u32],
    /// int32 `[words, n_pad]`.
    pub q_weight: &'a [u8],
    /// int32 `[G, n_pad/8]`.
    pub q_scale: &'a [u8],
    /// fp16 `[G]`.
    pub q_scale_max: &'a [u8],
}

#[inline]
fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl Exl2Parts<'_> {
    /// The scale of group `g`, output column `n`.
    #[inline]
    pub fn scale(&self, g: usize, n: usize) -> f32 {
        let nib = (word(self.q_scale, 4 * (g * self.n_pad / 8 + n / 8)) >> (4 * (n % 8))) & 15;
        let m = half::f16::from_le_bytes([self.q_scale_max[2 * g], self.q_scale_max[2 * g + 1]]);
        exl2_scale(nib, m)
    }

    /// Dequantise output row `n` (`out.len() == in_features`).
    pub fn dequant_row(&self, n: usize, out: &mut [f32]) {
        let stride = 4 * self.n_pad;
        for (gi, g) in self.groups.iter().enumerate() {
            let s = self.scale(gi, n);
            let b = usize::from(g.bits);
            let mask = (1u64 << b) - 1;
            for i in 0..g.rows {
                let pos = i * b;
                let w0 = g.word + pos / 32;
                let sh = pos % 32;
                let mut v = u64::from(word(self.q_weight, w0 * stride + 4 * n));
                if sh + b > 32 {
                    v |= u64::from(word(self.q_weight, (w0 + 1) * stride + 4 * n)) << 32;
                }
                let q = ((v >> sh) & mask) as u32;
                out[self.perm[g.row + i] as usize] = exl2_value(q, g.bits, s);
            }
        }
    }

    /// Sizes agree with the groups (checked once, when a checkpoint is opened).
    pub fn validate(&self, name: &str) -> Result<()> {
        let bad = |d: String| Err(Error::Invalid(format!("{name}: {d}")));
        let (k, n, g) = (self.in_features, self.n_pad, self.groups.len());
        if n % 32 != 0 || self.out_features > n || self.out_features + 31 < n {
            return bad(format!(
                "EXL2 q_weight is {n} wide for {} outputs (must be them rounded up to 32)",
                self.out_features
            ));
        }
        let words: usize = self
            .groups
            .iter()
            .map(|g| g.rows * usize::from(g.bits) / 32)
            .sum();
        let rows: usize = self.groups.iter().map(|g| g.rows).sum();
        let want = [words * n * 4, g * n / 2, g * 2];
        let got = [
            self.q_weight.len(),
            self.q_scale.len(),
            self.q_scale_max.len(),
        ];
        if want != got || rows != k || self.perm.len() != k {
            return bad(format!(
                "EXL2 q_weight/q_scale/q_scale_max hold {got:?} bytes, {want:?} expected for {n}×{k} in {g} groups"
            ));
        }
        Ok(())
    }
}

/// The stored tensors of one EXL2 linear.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2Packed {
    pub in_features: usize,
    pub n_pad: usize,
    pub groups: Vec<Exl2Group>,
    pub perm: Vec<u32>,
    pub q_weight: Vec<u8>,
    pub q_scale: Vec<u8>,
    pub q_scale_max: Vec<u8>,
    pub q_groups: Vec<u8>,
    pub q_invperm: Vec<u8>,
}

impl Exl2Packed {
    /// `q_weight`'s height.
    pub fn words(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.rows * usize::from(g.bits) / 32)
            .sum()
    }

    /// Bytes of the five stored tensors.
    pub fn stored_bytes(&self) -> usize {
        self.q_weight.len()
            + self.q_scale.len()
            + self.q_scale_max.len()
            + self.q_groups.len()
            + self.q_invperm.len()
    }

    /// A borrowed view (`out_features` the model's width).
    pub fn parts(&self, out_features: usize) -> Exl2Parts<'_> {
        Exl2Parts {
            in_features: self.in_features,
            out_features,
            n_pad: self.n_pad,
            groups: &self.groups,
            perm: &self.perm,
            q_weight: &self.q_weight,
            q_scale: &self.q_scale,
            q_scale_max: &self.q_scale_max,
        }
    }
}

/// Pack one layer. `codes` are `[k, n_pad]` in *permuted* row order (`codes[r][n]` < `2^bits` of `r`'s
/// group), `scale_codes` `[G, n_pad]` in `1..=16`, `scale_max` one fp16 per group, `group_rows` the
/// `(bits, rows)` of each group in row order, `perm[r]` the input feature of permuted row `r`.
pub fn pack_exl2(
    n_pad: usize,
    group_rows: &[(u8, usize)],
    codes: &[u8],
    scale_codes: &[u8],
    scale_max: &[half::f16],
    perm: &[u32],
) -> Result<Exl2Packed> {
    let bad = |d: String| Err(Error::Invalid(format!("EXL2 pack: {d}")));
    let k = perm.len();
    let g_count = group_rows.len();
    if !n_pad.is_multiple_of(32)
        || codes.len() != k * n_pad
        || scale_codes.len() != g_count * n_pad
        || scale_max.len() != g_count
    {
        return bad(format!(
            "{} codes, {} scale codes, {} maxima for {k}×{n_pad} in {g_count} groups",
            codes.len(),
            scale_codes.len(),
            scale_max.len()
        ));
    }
    let mut groups = Vec::with_capacity(g_count);
    let (mut row, mut words) = (0usize, 0usize);
    for (gi, &(bits, rows)) in group_rows.iter().enumerate() {
        if !EXL2_BITS.contains(&bits) || rows % 32 != 0 || rows == 0 {
            return bad(format!("group {gi}: {rows} rows of {bits} bits"));
        }
        if gi > 0 && bits > group_rows[gi - 1].0 {
            return bad("groups must be ordered by non-increasing bit width".into());
        }
        groups.push(Exl2Group {
            bits,
            row,
            rows,
            word: words,
        });
        row += rows;
        words += rows * usize::from(bits) / 32;
    }
    if row != k {
        return bad(format!("the groups cover {row} rows of {k}"));
    }
    if words > i16::MAX as usize || k > u16::MAX as usize {
        return bad(format!(
            "{words} q_weight rows / {k} inputs exceed EXL2's int16 offsets"
        ));
    }
    let mut q_weight = vec![0u8; words * n_pad * 4];
    let mut acc = vec![0u64; n_pad];
    for g in &groups {
        let b = usize::from(g.bits);
        let max = 1u64 << b;
        acc.iter_mut().for_each(|a| *a = 0);
        let mut filled = 0usize;
        let mut w = g.word;
        for i in 0..g.rows {
            let src = &codes[(g.row + i) * n_pad..(g.row + i + 1) * n_pad];
            for (a, &q) in acc.iter_mut().zip(src) {
                if u64::from(q) >= max {
                    return Err(Error::Invalid(format!(
                        "EXL2 pack: code {q} does not fit {b} bits"
                    )));
                }
                *a |= u64::from(q) << filled;
            }
            filled += b;
            while filled >= 32 {
                let dst = &mut q_weight[w * n_pad * 4..(w + 1) * n_pad * 4];
                for (d, a) in dst.chunks_exact_mut(4).zip(acc.iter_mut()) {
                    d.copy_from_slice(&(*a as u32).to_le_bytes());
                    *a >>= 32;
                }
                filled -= 32;
                w += 1;
            }
        }
        debug_assert_eq!(filled, 0);
    }
    let mut q_scale = Vec::with_capacity(g_count * n_pad / 2);
    for g in 0..g_count {
        for c in 0..n_pad / 8 {
            let mut w = 0u32;
            for j in 0..8 {
                let code = scale_codes[g * n_pad + 8 * c + j];
                if !(1..=16).contains(&code) {
                    return bad(format!("scale code {code} is not in 1..=16"));
                }
                w |= u32::from(code - 1) << (4 * j);
            }
            q_scale.extend_from_slice(&w.to_le_bytes());
        }
    }
    let q_scale_max = scale_max.iter().flat_map(|m| m.to_le_bytes()).collect();
    let q_groups = groups
        .iter()
        .flat_map(|g| [i16::from(g.bits), g.word as i16])
        .flat_map(i16::to_le_bytes)
        .collect();
    let mut invperm = vec![0u32; k];
    for (r, &p) in perm.iter().enumerate() {
        match invperm.get_mut(p as usize) {
            Some(slot) => *slot = r as u32,
            None => return bad(format!("perm entry {p} is out of range")),
        }
    }
    Ok(Exl2Packed {
        in_features: k,
        n_pad,
        groups,
        perm: perm.to_vec(),
        q_weight,
        q_scale,
        q_scale_max,
        q_groups,
        q_invperm: invperm.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn words_of(p: &Exl2Packed, col: usize) -> Vec<u32> {
        (0..p.words())
            .map(|w| word(&p.q_weight, 4 * (w * p.n_pad + col)))
            .collect()
    }

    #[test]
    fn bitstreams_match_the_reference_test_vectors() {
        // exl2.md §2.4: values `i mod 2^b` over one packing period.
        let vectors: [(u8, &[u32]); 6] = [
            (2, &[0xe4e4_e4e4]),
            (4, &[0x7654_3210]),
            (8, &[0x0302_0100]),
            (3, &[0x88fa_c688, 0xc688_fac6, 0xfac6_88fa]),
            (6, &[0x440c_2040, 0xa248_1c61, 0x3ce3_4c2c]),
            (
                5,
                &[
                    0x8a41_8820,
                    0xc5a9_2839,
                    0xca30_7b9a,
                    0x38bd_ab49,
                    0xffbb_cdeb,
                ],
            ),
        ];
        for (bits, want) in vectors {
            // One period is `period` rows holding `0, 1, 2, …`; 32 rows repeat it.
            let k = 32;
            let period = want.len() * 32 / usize::from(bits);
            let codes: Vec<u8> = (0..k * 32)
                .map(|i| ((i / 32) % period % (1 << bits)) as u8)
                .collect();
            let perm: Vec<u32> = (0..k as u32).collect();
            let p =
                pack_exl2(32, &[(bits, k)], &codes, &[1; 32], &[half::f16::ONE], &perm).unwrap();
            let got = words_of(&p, 5);
            assert_eq!(got.len(), k * usize::from(bits) / 32, "{bits} bits");
            for (i, w) in got.iter().enumerate() {
                assert_eq!(*w, want[i % want.len()], "{bits} bits, word {i}");
            }
        }
    }

    #[test]
    fn scale_nibbles_and_the_worked_example() {
        // exl2.md §2.5: nibbles [0,1,2,3,4,5,6,15] pack to 0xf6543210.
        let codes = [1u8, 2, 3, 4, 5, 6, 7, 16];
        let mut sc = vec![1u8; 32];
        sc[..8].copy_from_slice(&codes);
        let p = pack_exl2(
            32,
            &[(4, 32)],
            &[0; 32 * 32],
            &sc,
            &[half::f16::from_f32(0.0123)],
            &(0..32).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(word(&p.q_scale, 0), 0xf654_3210);
        // q_scale_max 0.0123 → 0.012298583984375; nibble 15, b = 4, q = 3 → −0.061492919921875.
        let m = half::f16::from_f32(0.0123);
        assert_eq!(m.to_f32(), 0.012_298_584);
        let s = exl2_scale(15, m);
        assert_eq!(s, 0.012_298_584);
        assert_eq!(exl2_value(3, 4, s), -0.061_492_92);
        // Nibble 0 goes through the fp16 subnormal path: 4.8041e-05.
        let s0 = exl2_scale(0, m);
        assert!((s0 - 4.8041e-5).abs() < 1e-8, "{s0}");
    }

    #[test]
    fn mixed_groups_round_trip_through_the_layout() {
        let (k, n) = (32 * 5, 64);
        let group_rows = [(8u8, 32usize), (6, 32), (5, 32), (3, 32), (2, 32)];
        let mut codes = vec![0u8; k * n];
        for (gi, &(b, _)) in group_rows.iter().enumerate() {
            for r in 0..32 {
                for c in 0..n {
                    codes[(gi * 32 + r) * n + c] = ((r * 7 + c * 3 + gi) % (1 << b)) as u8;
                }
            }
        }
        let sc: Vec<u8> = (0..5 * n).map(|i| (i % 16 + 1) as u8).collect();
        let maxes: Vec<half::f16> = (0..5)
            .map(|g| half::f16::from_f32(0.01 + g as f32 * 0.003))
            .collect();
        // A permutation: reversed.
        let perm: Vec<u32> = (0..k as u32).rev().collect();
        let p = pack_exl2(n, &group_rows, &codes, &sc, &maxes, &perm).unwrap();
        let qg: Vec<i16> = p
            .q_groups
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        let inv: Vec<i64> = p
            .q_invperm
            .chunks_exact(4)
            .map(|b| i64::from(u32::from_le_bytes(b.try_into().unwrap())))
            .collect();
        let (groups, perm2) = exl2_layout(&qg, p.words(), &inv).unwrap();
        assert_eq!((groups.clone(), perm2.clone()), (p.groups.clone(), perm));
        let parts = p.parts(n);
        parts.validate("w").unwrap();
        let mut row = vec![0f32; k];
        for c in 0..n {
            parts.dequant_row(c, &mut row);
            for (gi, g) in groups.iter().enumerate() {
                let s = exl2_scale(u32::from(sc[gi * n + c]) - 1, maxes[gi]);
                for i in 0..g.rows {
                    let r = g.row + i;
                    let want = exl2_value(u32::from(codes[r * n + c]), g.bits, s);
                    assert_eq!(row[perm2[r] as usize], want, "col {c} row {r}");
                }
            }
        }
        // Broken layouts are refused.
        assert!(exl2_layout(&[7, 0], 7, &[0; 32]).is_err());
        assert!(exl2_layout(&qg, p.words() + 1, &inv).is_err());
        let mut dup = inv.clone();
        dup[1] = dup[0];
        assert!(exl2_layout(&qg, p.words(), &dup).is_err());
        assert!(pack_exl2(
            n,
            &[(2, 32), (4, 128)],
            &codes,
            &sc,
            &maxes,
            &(0..k as u32).collect::<Vec<_>>()
        )
        .is_err());
    }
}
