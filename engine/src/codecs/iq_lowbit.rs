//! What llama.cpp's low-bit i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) share: the
//! lattices their 8- or 4-element groups snap to, in two forms.
//!
//! * **Dequantisation grids** (ggml-common.h's `iq2xxs_grid` …): the byte magnitudes a stored grid index
//!   expands to — {8, 25, 43} for the 2-bit IQ2 lattices, {4, 12, …, 52, 62} for IQ3_XXS, the odd numbers
//!   1..15 for IQ3_S, {−1, 0, 1} for IQ1.
//! * **Quantizer lattices** (`iq2xs_init_impl` / `iq3xs_init_impl`): the same points in odd integer
//!   "positions" `2l + 1`, a map from a packed level vector to its grid index, and for every level vector
//!   that is not a grid point the list of grid points nearest it (all points at the `nwant` smallest
//!   distinct squared distances, ordered by (distance, index)). The quantizers search in positions and
//!   store indices; the mismatch with the dequantisation bytes is llama.cpp's, kept on purpose.
//!
//! Both come from the six point lists in [`super::iq_grids`] (data, MIT, the ggml authors) by the rules
//! of `shared/reference/iquants-lowbit.md` §2 and §4.1; tests check the derived grids against the sha256
//! sums of ggml-common.h's tables.

use std::sync::OnceLock;

use super::kquants::nearest_int;

use super::iq_grids::{
    KGRID_1BIT_2048, KGRID_256, KGRID_2BIT_1024, KGRID_2BIT_256, KGRID_2BIT_512, KGRID_512,
};

/// Bytes of a 2-bit-per-coordinate point list expanded through `map` (one byte per coordinate).
const fn expand2<const N: usize>(k: &[u16; N], map: [u8; 3]) -> [[u8; 8]; N] {
    let mut t = [[0u8; 8]; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 8 {
            t[i][j] = map[((k[i] >> (2 * j)) & 3) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

/// Bytes of a 3-bit-per-coordinate point list expanded through `map`.
const fn expand3<const N: usize>(k: &[u16; N], map: [u8; 8]) -> [[u8; 4]; N] {
    let mut t = [[0u8; 4]; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 4 {
            t[i][j] = map[((k[i] >> (3 * j)) & 7) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

/// `iq2xxs_grid`: IQ2_XXS's 256 points.
pub(crate) static IQ2XXS_GRID: [[u8; 8]; 256] = expand2(&KGRID_2BIT_256, [8, 25, 43]);
/// `iq2xs_grid`: IQ2_XS's 512 points.
pub(crate) static IQ2XS_GRID: [[u8; 8]; 512] = expand2(&KGRID_2BIT_512, [8, 25, 43]);
/// `iq2s_grid`: IQ2_S's 1024 points.
pub(crate) static IQ2S_GRID: [[u8; 8]; 1024] = expand2(&KGRID_2BIT_1024, [8, 25, 43]);
/// `iq3xxs_grid`: IQ3_XXS's 256 points (level 7 is 62, not 60).
pub(crate) static IQ3XXS_GRID: [[u8; 4]; 256] =
    expand3(&KGRID_256, [4, 12, 20, 28, 36, 44, 52, 62]);
/// `iq3s_grid`: IQ3_S's 512 points.
pub(crate) static IQ3S_GRID: [[u8; 4]; 512] = expand3(&KGRID_512, [1, 3, 5, 7, 9, 11, 13, 15]);
/// `iq1s_grid`: IQ1_S/IQ1_M's 2048 points, each byte an int8 in {−1, 0, 1} (stored as its two's
/// complement byte).
pub(crate) static IQ1S_GRID: [[u8; 8]; 2048] = expand2(&KGRID_1BIT_2048, [0xFF, 0, 1]);

/// `ksigns_iq2xs`: 7 explicit sign bits and the parity bit that makes their count even.
pub(crate) const KSIGNS_IQ2XS: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = i as u8 | (((i as u32).count_ones() & 1) << 7) as u8;
        i += 1;
    }
    t
};

/// A dequantisation grid as f32 (exact: the bytes are small integers), so expanding a point is a load.
const fn grid_f32<const N: usize, const D: usize>(t: &[[u8; D]; N]) -> [[f32; D]; N] {
    let mut o = [[0.0f32; D]; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < D {
            o[i][j] = t[i][j] as f32;
            j += 1;
        }
        i += 1;
    }
    o
}

pub(super) static IQ2XXS_GRID_F32: [[f32; 8]; 256] = grid_f32(&IQ2XXS_GRID);
pub(super) static IQ2XS_GRID_F32: [[f32; 8]; 512] = grid_f32(&IQ2XS_GRID);
pub(super) static IQ2S_GRID_F32: [[f32; 8]; 1024] = grid_f32(&IQ2S_GRID);
pub(super) static IQ3XXS_GRID_F32: [[f32; 4]; 256] = grid_f32(&IQ3XXS_GRID);
pub(super) static IQ3S_GRID_F32: [[f32; 4]; 512] = grid_f32(&IQ3S_GRID);

/// The grid (and, after it, `KSIGNS_IQ2XS`) a GPU kernel of `ty` reads, as little-endian u32 words: the
/// layout `shaders/types/iq_tables.wgsl` documents. `None` for the other types.
pub(super) fn gpu_table(ty: super::GgmlType) -> Option<Vec<u32>> {
    use super::GgmlType as T;
    fn words<const N: usize>(grid: &[[u8; N]]) -> Vec<u32> {
        grid.iter()
            .flat_map(|p| {
                p.chunks(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
    let mut w = match ty {
        T::Iq2Xxs => words(&IQ2XXS_GRID),
        T::Iq2Xs => words(&IQ2XS_GRID),
        T::Iq2S => words(&IQ2S_GRID),
        T::Iq3Xxs => words(&IQ3XXS_GRID),
        T::Iq3S => words(&IQ3S_GRID),
        T::Iq1S | T::Iq1M => return Some(words(&IQ1S_GRID)),
        _ => return None,
    };
    w.extend(KSIGNS_IQ2XS.iter().map(|&s| s as u32));
    Some(w)
}

/// For a sign byte, the f32 sign bit of each of its 8 elements (bit j set → negate element j).
static SIGN_BITS: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut i = 0;
    while i < 256 {
        let mut j = 0;
        while j < 8 {
            t[i][j] = ((i as u32 >> j) & 1) << 31;
            j += 1;
        }
        i += 1;
    }
    t
};

/// 8 values `db · g[j]`, negated where bit j of `signs` is set: the dequantisers' inner step, branch-free
/// (flipping the sign bit is exactly ggml's `· −1.f`).
#[inline(always)]
pub(super) fn signed8(db: f32, g: &[f32; 8], signs: u8, y: &mut [f32]) {
    let m = &SIGN_BITS[signs as usize];
    for j in 0..8 {
        y[j] = f32::from_bits((db * g[j]).to_bits() ^ m[j]);
    }
}

/// As [`signed8`] for two 4-element points (the IQ3 grids).
#[inline(always)]
pub(super) fn signed4x2(db: f32, g1: &[f32; 4], g2: &[f32; 4], signs: u8, y: &mut [f32]) {
    let m = &SIGN_BITS[signs as usize];
    for j in 0..4 {
        y[j] = f32::from_bits((db * g1[j]).to_bits() ^ m[j]);
        y[j + 4] = f32::from_bits((db * g2[j]).to_bits() ^ m[j + 4]);
    }
}

/// IQ1_M's f16 d from the top nibbles of its four scale u16s (`iq1m_scale_t`).
#[inline]
pub(crate) fn iq1m_d(sc: &[u16; 4]) -> f32 {
    let bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000);
    half::f16::from_bits(bits).to_f32()
}

#[inline]
pub(crate) fn iq1m_scales(b: &[u8]) -> [u16; 4] {
    std::array::from_fn(|i| u16::from_le_bytes([b[48 + 2 * i], b[49 + 2 * i]]))
}

/// One low-bit i-quant block read as integers, as llama.cpp's `ggml_vec_dot_iq*_q8_K` multiply it: every
/// value is `mult · scales[i/16] · codes[i]` with small signed integer codes (grid point × sign; for IQ1,
/// `8·grid ± 1`, the ±1/8 shift folded in) and odd integer scales `2s + 1`. Returns `mult` (`f16(d)` times
/// 1/8, 1/4 or 1, exactly). `None` for other types.
pub(crate) fn int_reading(
    ty: super::GgmlType,
    b: &[u8],
    codes: &mut [i8; 256],
    scales: &mut [i16; 16],
) -> Option<f32> {
    use super::GgmlType as T;
    let d = || super::f16_at(b);
    // 8 grid bytes with signs (bit j of `signs` negates element j).
    let put8 = |codes: &mut [i8; 256], at: usize, g: &[u8; 8], signs: u8| {
        for j in 0..8 {
            let v = g[j] as i8;
            codes[at + j] = if signs >> j & 1 != 0 { -v } else { v };
        }
    };
    let put4x2 = |codes: &mut [i8; 256], at: usize, g1: &[u8; 4], g2: &[u8; 4], signs: u8| {
        let mut g = [0u8; 8];
        g[..4].copy_from_slice(g1);
        g[4..].copy_from_slice(g2);
        put8(codes, at, &g, signs);
    };
    // IQ1's points: 8·grid ± 1 (the shift is −1/8 where the bit is set).
    let put1 = |codes: &mut [i8; 256], at: usize, idx: usize, minus: bool| {
        let delta = if minus { -1 } else { 1 };
        for j in 0..8 {
            codes[at + j] = 8 * (IQ1S_GRID[idx][j] as i8) + delta;
        }
    };
    let odd = |s: u32| (2 * s + 1) as i16;
    match ty {
        T::Iq2Xxs => {
            for g in 0..8 {
                let q = &b[2 + 8 * g..10 + 8 * g];
                let a1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
                scales[2 * g..2 * g + 2].fill(odd(a1 >> 28));
                for l in 0..4 {
                    let signs = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
                    put8(codes, 32 * g + 8 * l, &IQ2XXS_GRID[q[l] as usize], signs);
                }
            }
            Some(d() * 0.125)
        }
        T::Iq2Xs => {
            for g in 0..8 {
                scales[2 * g] = odd(u32::from(b[66 + g] & 15));
                scales[2 * g + 1] = odd(u32::from(b[66 + g] >> 4));
                for l in 0..4 {
                    let o = 2 + 2 * (4 * g + l);
                    let v = u16::from_le_bytes([b[o], b[o + 1]]);
                    let signs = KSIGNS_IQ2XS[(v >> 9) as usize];
                    put8(
                        codes,
                        32 * g + 8 * l,
                        &IQ2XS_GRID[(v & 511) as usize],
                        signs,
                    );
                }
            }
            Some(d() * 0.125)
        }
        T::Iq2S => {
            let (qs, signs, qh, sc) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
            for g in 0..8 {
                scales[2 * g] = odd(u32::from(sc[g] & 15));
                scales[2 * g + 1] = odd(u32::from(sc[g] >> 4));
                for l in 0..4 {
                    let t = 4 * g + l;
                    let idx = qs[t] as usize | ((qh[g] as usize) << (8 - 2 * l) & 0x300);
                    put8(codes, 32 * g + 8 * l, &IQ2S_GRID[idx], signs[t]);
                }
            }
            Some(d() * 0.125)
        }
        T::Iq3Xxs => {
            let qs = &b[2..66];
            for g in 0..8 {
                let o = 66 + 4 * g;
                let a = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                scales[2 * g..2 * g + 2].fill(odd(a >> 28));
                for l in 0..4 {
                    let signs = KSIGNS_IQ2XS[((a >> (7 * l)) & 127) as usize];
                    let g1 = &IQ3XXS_GRID[qs[8 * g + 2 * l] as usize];
                    let g2 = &IQ3XXS_GRID[qs[8 * g + 2 * l + 1] as usize];
                    put4x2(codes, 32 * g + 8 * l, g1, g2, signs);
                }
            }
            Some(d() * 0.25)
        }
        T::Iq3S => {
            let (qs, qh, signs, sc) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
            for g in 0..8 {
                scales[2 * g..2 * g + 2].fill(odd(u32::from((sc[g / 2] >> (4 * (g % 2))) & 15)));
                for l in 0..4 {
                    let k = 2 * l;
                    let i1 = qs[8 * g + k] as usize | ((qh[g] as usize >> k) & 1) << 8;
                    let i2 = qs[8 * g + k + 1] as usize | ((qh[g] as usize >> (k + 1)) & 1) << 8;
                    put4x2(
                        codes,
                        32 * g + 8 * l,
                        &IQ3S_GRID[i1],
                        &IQ3S_GRID[i2],
                        signs[4 * g + l],
                    );
                }
            }
            Some(d())
        }
        T::Iq1S => {
            let qs = &b[2..34];
            for g in 0..8 {
                let h = u16::from_le_bytes([b[34 + 2 * g], b[35 + 2 * g]]);
                scales[2 * g..2 * g + 2].fill(odd(u32::from((h >> 12) & 7)));
                for l in 0..4 {
                    let idx = qs[4 * g + l] as usize | (((h >> (3 * l)) & 7) as usize) << 8;
                    put1(codes, 32 * g + 8 * l, idx, h & 0x8000 != 0);
                }
            }
            Some(d() * 0.125)
        }
        T::Iq1M => {
            let sc = iq1m_scales(b);
            let (qs, qh) = (&b[..32], &b[32..48]);
            for h in 0..16 {
                scales[h] = odd(u32::from((sc[h / 4] >> (3 * (h % 4))) & 7));
                let q = qh[h];
                let idx0 = qs[2 * h] as usize | ((q as usize) << 8 & 0x700);
                let idx1 = qs[2 * h + 1] as usize | ((q as usize) << 4 & 0x700);
                put1(codes, 16 * h, idx0, q & 0x08 != 0);
                put1(codes, 16 * h + 8, idx1, q & 0x80 != 0);
            }
            Some(iq1m_d(&sc) * 0.125)
        }
        _ => None,
    }
}

/// The lattices the quantizers search, one per grid (IQ1_S and IQ1_M share one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Which {
    Iq2xxs,
    Iq2xs,
    Iq2s,
    Iq1,
    Iq3xxs,
    Iq3s,
}

/// A quantizer lattice: grid points as positions, the level-vector map and the neighbour lists.
pub(super) struct Lattice {
    /// Coordinates per point (8 or 4).
    dim: usize,
    /// Bits per coordinate in a packed level vector (2 or 3).
    bits: u32,
    /// Grid point `k`'s positions `2l + 1`; only the first `dim` are used.
    pos: Vec<[i8; 8]>,
    /// Packed level vector → grid index (≥ 0), or `−(offset + 1)` of its neighbour list in
    /// `neighbours` (`[n, index_1, …, index_n]`); `i32::MIN` where no list was built (unreachable levels).
    map: Vec<i32>,
    neighbours: Vec<u16>,
}

impl Lattice {
    /// `iq2xs_init_impl` / `iq3xs_init_impl`: `levels` is the largest level the quantizer ever packs
    /// (its `kMaxQ − 1`); level vectors beyond it are never looked up and get no neighbour list.
    fn build(kgrid: &[u16], dim: usize, bits: u32, nwant: usize, levels: u16) -> Self {
        let mask = (1u16 << bits) - 1;
        let pos: Vec<[i8; 8]> = kgrid
            .iter()
            .map(|&k| {
                let mut p = [0i8; 8];
                for (c, v) in p.iter_mut().enumerate().take(dim) {
                    *v = 2 * ((k >> (bits as usize * c)) & mask) as i8 + 1;
                }
                p
            })
            .collect();
        let size = 1usize << (bits as usize * dim);
        let mut map = vec![i32::MIN; size];
        for (i, &k) in kgrid.iter().enumerate() {
            map[k as usize] = i as i32;
        }
        let mut neighbours = Vec::new();
        let mut dist: Vec<(i32, u16)> = Vec::with_capacity(kgrid.len());
        for u in 0..size {
            if map[u] >= 0 {
                continue;
            }
            let fields = (0..dim).map(|c| (u >> (bits as usize * c)) as u16 & mask);
            if fields.clone().any(|f| f > levels) {
                continue;
            }
            let mut p = [0i32; 8];
            for (c, f) in fields.enumerate() {
                p[c] = 2 * f as i32 + 1;
            }
            dist.clear();
            dist.extend(pos.iter().enumerate().map(|(j, g)| {
                let d2: i32 = (0..dim).map(|c| (g[c] as i32 - p[c]).pow(2)).sum();
                (d2, j as u16)
            }));
            dist.sort_unstable();
            // Every point at the `nwant` smallest distinct distances, in (distance, index) order.
            let (mut have, mut last, mut n) = (1, dist[0].0, 0);
            for &(d, _) in &dist {
                if d > last {
                    if have == nwant {
                        break;
                    }
                    last = d;
                    have += 1;
                }
                n += 1;
            }
            map[u] = -(neighbours.len() as i32 + 1);
            neighbours.push(n as u16);
            neighbours.extend(dist[..n].iter().map(|&(_, j)| j));
        }
        Lattice {
            dim,
            bits,
            pos,
            map,
            neighbours,
        }
    }

    /// The lattice for `which`, built on first use.
    pub(super) fn get(which: Which) -> &'static Lattice {
        static CELLS: [OnceLock<Lattice>; 6] = [const { OnceLock::new() }; 6];
        CELLS[which as usize].get_or_init(|| match which {
            Which::Iq2xxs => Lattice::build(&KGRID_2BIT_256, 8, 2, 2, 2),
            Which::Iq2xs => Lattice::build(&KGRID_2BIT_512, 8, 2, 2, 2),
            Which::Iq2s => Lattice::build(&KGRID_2BIT_1024, 8, 2, 1, 2),
            Which::Iq1 => Lattice::build(&KGRID_1BIT_2048, 8, 2, 3, 2),
            Which::Iq3xxs => Lattice::build(&KGRID_256, 4, 3, 2, 7),
            Which::Iq3s => Lattice::build(&KGRID_512, 4, 3, 3, 7),
        })
    }

    /// The packed level vector of `levels` (`dim` levels, coordinate 0 lowest).
    #[inline]
    pub(super) fn pack(&self, levels: &[i8]) -> usize {
        levels[..self.dim]
            .iter()
            .enumerate()
            .fold(0, |u, (c, &l)| u | (l as usize) << (self.bits as usize * c))
    }

    /// The grid index of packed level vector `u`, or the neighbour list to search when `u` is not a point.
    #[inline]
    pub(super) fn lookup(&self, u: usize) -> Result<usize, &[u16]> {
        let m = self.map[u];
        if m >= 0 {
            return Ok(m as usize);
        }
        assert!(m != i32::MIN, "level vector {u:#x} beyond the lattice");
        let off = (-(m + 1)) as usize;
        let n = self.neighbours[off] as usize;
        Err(&self.neighbours[off + 1..off + 1 + n])
    }

    /// Grid point `k` as positions `2l + 1`.
    #[inline]
    pub(super) fn positions(&self, k: usize) -> &[i8] {
        &self.pos[k][..self.dim]
    }

    /// Write grid point `k`'s levels `(pos − 1)/2` into `l`.
    #[inline]
    pub(super) fn levels_of(&self, k: usize, l: &mut [i8]) {
        for (o, &p) in l.iter_mut().zip(self.positions(k)) {
            *o = (p - 1) / 2;
        }
    }

    /// `iq2_find_best_neighbour` / `iq3_find_best_neighbour`: the listed point minimising
    /// `Σ (w·(scale·pos − x))·(scale·pos − x)` (the first on ties); its levels go to `l`.
    pub(super) fn best_neighbour(
        &self,
        list: &[u16],
        xval: &[f32],
        w: &[f32],
        scale: f32,
        l: &mut [i8],
    ) -> usize {
        let mut best = f32::MAX;
        let mut index = usize::MAX;
        for &j in list {
            let pg = self.positions(j as usize);
            let mut d2 = 0.0f32;
            for c in 0..self.dim {
                let diff = scale * pg[c] as f32 - xval[c];
                d2 += w[c] * diff * diff;
            }
            if d2 < best {
                best = d2;
                index = j as usize;
            }
        }
        // Only non-finite input (NaN or overflowing distances) leaves no strict minimum; llama.cpp aborts
        // there, we take the first listed point so a hostile tensor cannot crash a run.
        if index == usize::MAX {
            index = list.first().map_or(0, |&j| j as usize);
        }
        self.levels_of(index, l);
        index
    }

    /// Number of grid points.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.pos.len()
    }
}

/// Which subgroups the second pass (at the chosen scale) revisits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repass {
    /// Every subgroup, whenever the scale is positive (IQ2_XXS).
    Always,
    /// Only the subgroups the winning candidate had off the grid (IQ2_XS, IQ2_S, IQ3_XXS).
    OffGrid,
    /// Every subgroup when any was off the grid (IQ3_S).
    AllIfAnyOffGrid,
}

/// The scale search of the IQ2/IQ3 quantizers (`quantize_row_iq2_*_impl`, `quantize_row_iq3_*_impl`) for
/// one group of magnitudes `xval` (signs already taken out) made of subgroups of the lattice's dimension.
pub(super) struct GroupSearch {
    pub lat: &'static Lattice,
    /// Levels per coordinate (`kMaxQ`): 3 for the IQ2 lattices, 8 for IQ3.
    pub kmaxq: i32,
    /// Candidate steps `is` (inclusive) and their size: `id = (2·kMaxQ − 1 + is·step)/den`.
    pub is_lo: i32,
    pub is_hi: i32,
    pub step: f32,
    /// Whether subgroups count as on the grid before any candidate is accepted.
    pub on_grid_init: bool,
    pub repass: Repass,
}

impl GroupSearch {
    /// The IQ2 lattices' search: 3 levels, candidates `is_lo..=−is_lo` in steps of 0.1.
    pub(super) fn iq2(which: Which, is_lo: i32, repass: Repass) -> Self {
        GroupSearch {
            lat: Lattice::get(which),
            kmaxq: 3,
            is_lo,
            is_hi: -is_lo,
            step: 0.1,
            on_grid_init: true,
            repass,
        }
    }

    /// Levels of `x` at inverse scale `id`: `clamp(nearest_int(0.5·(id·x − 1)), 0, kMaxQ − 1)`.
    #[inline]
    fn levels(&self, id: f32, x: &[f32], l: &mut [i8]) {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = nearest_int(0.5 * (id * v - 1.0)).clamp(0, self.kmaxq - 1) as i8;
        }
    }

    /// Snap subgroup levels `l` to the lattice at `scale`: unchanged when they are a grid point,
    /// else the best listed neighbour. Returns whether they were on the grid.
    #[inline]
    fn snap(&self, x: &[f32], waux: &[f32], scale: f32, l: &mut [i8]) -> bool {
        match self.lat.lookup(self.lat.pack(l)) {
            Ok(_) => true,
            Err(list) => {
                self.lat.best_neighbour(list, x, waux, scale, l);
                false
            }
        }
    }

    /// `Σ (w·x)·q` and `Σ (w·q)·q` with `q = 2l + 1`, in element order.
    #[inline]
    fn sums(xval: &[f32], w: &[f32], l: &[i8]) -> (f32, f32) {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for i in 0..xval.len() {
            let q = (2 * l[i] as i32 + 1) as f32;
            sumqx += w[i] * xval[i] * q;
            sumq2 += w[i] * q * q;
        }
        (sumqx, sumq2)
    }

    /// Search the group: candidates `is_lo..=is_hi` from `den` (the group's maximum, or IQ2_XXS's
    /// `eff_max`), then the second pass at the chosen scale and a least-squares refit. `scale` and `l`
    /// enter as the fallbacks used when no candidate is accepted; `l` leaves holding grid points only
    /// (as levels) and `idx` their grid indices, one per subgroup. Returns the group's scale.
    pub(super) fn run(
        &self,
        xval: &[f32],
        w: &[f32],
        waux: &[f32],
        den: f32,
        mut scale: f32,
        l: &mut [i8],
        idx: &mut [u16],
    ) -> f32 {
        let g = self.lat.dim;
        let n = xval.len();
        let nsub = n / g;
        let mut laux = [0i8; 32];
        let mut on_grid = [self.on_grid_init; 8];
        let mut on_grid_aux = [true; 8];
        let mut best = 0.0f32;
        let base = (2 * self.kmaxq - 1) as f32;
        for is in self.is_lo..=self.is_hi {
            let id = (base + is as f32 * self.step) / den;
            let this_scale = 1.0 / id;
            for k in 0..nsub {
                let r = g * k..g * k + g;
                self.levels(id, &xval[r.clone()], &mut laux[r.clone()]);
                on_grid_aux[k] =
                    self.snap(&xval[r.clone()], &waux[r.clone()], this_scale, &mut laux[r]);
            }
            let (sumqx, sumq2) = Self::sums(xval, w, &laux[..n]);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                l[..n].copy_from_slice(&laux[..n]);
                on_grid[..nsub].copy_from_slice(&on_grid_aux[..nsub]);
            }
        }
        let any_off = on_grid[..nsub].iter().any(|&o| !o);
        let repass = match self.repass {
            Repass::Always => scale > 0.0,
            Repass::OffGrid | Repass::AllIfAnyOffGrid => any_off && scale > 0.0,
        };
        if repass {
            let id = 1.0 / scale;
            for k in 0..nsub {
                if self.repass == Repass::OffGrid && on_grid[k] {
                    continue;
                }
                let r = g * k..g * k + g;
                self.levels(id, &xval[r.clone()], &mut l[r.clone()]);
                self.snap(&xval[r.clone()], &waux[r.clone()], scale, &mut l[r]);
            }
            let (sumqx, sumq2) = Self::sums(xval, w, &l[..n]);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        // Levels outside the lattice only come from a fallback no candidate replaced (IQ2_XXS's
        // make_qp_quants levels, on non-finite input where llama.cpp aborts): clamp them first.
        for v in l[..n].iter_mut() {
            *v = (*v).clamp(0, (self.kmaxq - 1) as i8);
        }
        for k in 0..nsub {
            let r = g * k..g * k + g;
            idx[k] = match self.lat.lookup(self.lat.pack(&l[r.clone()])) {
                Ok(i) => i as u16,
                // Only levels that never came out of the searches above (llama.cpp aborts: "found point
                // not on grid"): snap them like any other off-grid vector.
                Err(list) => self.lat.best_neighbour(
                    list,
                    &xval[r.clone()],
                    &waux[r.clone()],
                    scale,
                    &mut l[r],
                ) as u16,
            };
        }
        scale
    }
}

/// A group's importance weights, `qw·sqrt(σ² + x²)` with an imatrix, else `fallback(x)` (`x²`, or IQ2_S's
/// `σ²/4 + x²`), and their square roots (the neighbour searches' weights).
#[inline]
pub(super) fn group_weights(
    x: &[f32],
    qw: Option<&[f32]>,
    sigma2: f32,
    fallback: impl Fn(f32) -> f32,
    w: &mut [f32],
    waux: &mut [f32],
) {
    for i in 0..x.len() {
        w[i] = match qw {
            Some(q) => q[i] * (sigma2 + x[i] * x[i]).sqrt(),
            None => fallback(x[i]),
        };
        waux[i] = w[i].sqrt();
    }
}

/// `Σ x²` of a super-block, in element order from +0.
#[inline]
pub(super) fn sum_sq(x: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// Take the signs out of 8 values: magnitudes into `xval`, bit i set where `x[i] < 0` (−0.0 counts as
/// non-negative). With `parity`, an odd number of negatives flips the element of least `(w·x)·x` (the
/// first on ties) so the count is even — the 8th bit is then implied and only the low 7 are returned.
#[inline]
pub(super) fn take_signs(x: &[f32], w: &[f32], xval: &mut [f32], parity: bool) -> u8 {
    let mut s = 0u8;
    for i in 0..8 {
        if x[i] >= 0.0 {
            xval[i] = x[i];
        } else {
            xval[i] = -x[i];
            s |= 1 << i;
        }
    }
    if !parity {
        return s;
    }
    if s.count_ones() % 2 == 1 {
        let mut imin = 0;
        let mut min = w[0] * x[0] * x[0];
        for i in 1..8 {
            let ax = w[i] * x[i] * x[i];
            if ax < min {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    s & 127
}

/// ggml's `MAX(a, b)`: `a > b ? a : b`.
#[inline]
pub(super) fn gmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// A group scale's 4-bit code under super-block scale `id = 1/d`: `clamp(nearest_int(0.5·(id·s − 1)), 0, 15)`.
#[inline]
pub(super) fn scale_code(id: f32, s: f32) -> u8 {
    nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u8
}

#[cfg(test)]
pub(super) mod fixture {
    //! The oracle fixture `tests/fixtures/quants/iq_lowbit.bin`, written by `make_iq_lowbit_fixtures.py`
    //! from llama.cpp's `ggml_quantize_chunk`: 213 rows of 512 (real SmolLM2 weights, then edge cases)
    //! with a real imatrix, and llama.cpp's bytes for each low-bit type with and without it.

    /// The quantizer contract (`codecs::QuantizeFn`): one row, importance per element or none.
    pub type Quantize = fn(&[f32], &mut [u8], Option<&[f32]>);

    pub struct Fixture {
        pub nrows: usize,
        pub n_per_row: usize,
        pub src: Vec<f32>,
        pub imatrix: Vec<f32>,
        /// (ggml type id, with imatrix, llama.cpp's bytes for all rows).
        pub cases: Vec<(u32, bool, Vec<u8>)>,
    }

    pub fn load() -> Fixture {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/quants/iq_lowbit.bin");
        let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&b[..4], b"QSIQ");
        let mut p = 4;
        let u32_at = |p: &mut usize| {
            let v = u32::from_le_bytes(b[*p..*p + 4].try_into().expect("4 bytes"));
            *p += 4;
            v
        };
        assert_eq!(u32_at(&mut p), 1);
        let nrows = u32_at(&mut p) as usize;
        let n_per_row = u32_at(&mut p) as usize;
        let n = nrows * n_per_row;
        let src = b[p..p + 2 * n]
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        p += 2 * n;
        let imatrix = b[p..p + 4 * n_per_row]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        p += 4 * n_per_row;
        let ncases = u32_at(&mut p);
        let mut cases = Vec::new();
        for _ in 0..ncases {
            let ty = u32_at(&mut p);
            let with = u32_at(&mut p) != 0;
            let len = u32_at(&mut p) as usize;
            cases.push((ty, with, b[p..p + len].to_vec()));
            p += len;
        }
        assert_eq!(p, b.len());
        Fixture {
            nrows,
            n_per_row,
            src,
            imatrix,
            cases,
        }
    }

    /// Quantise every row with `q` (ggml type `ggml_id`, `block_bytes` per 256 elements), with and
    /// without the imatrix as the fixture has cases, and assert llama.cpp's bytes; returns the number of
    /// cases checked. A mismatch names the row and the first differing byte of its block.
    pub fn check(ggml_id: u32, block_bytes: usize, q: Quantize) -> usize {
        let f = load();
        let row_bytes = f.n_per_row / 256 * block_bytes;
        let mut checked = 0;
        for (ty, with, want) in &f.cases {
            if *ty != ggml_id {
                continue;
            }
            assert_eq!(want.len(), row_bytes * f.nrows);
            let mut got = vec![0u8; row_bytes];
            let mut bad = Vec::new();
            for r in 0..f.nrows {
                let x = &f.src[r * f.n_per_row..(r + 1) * f.n_per_row];
                got.fill(0xA5);
                q(x, &mut got, with.then_some(&f.imatrix[..]));
                let w = &want[r * row_bytes..(r + 1) * row_bytes];
                if let Some(i) = (0..row_bytes).find(|&i| got[i] != w[i]) {
                    bad.push(format!(
                        "row {r} block {} byte {}: {} vs llama.cpp {}",
                        i / block_bytes,
                        i % block_bytes,
                        got[i],
                        w[i]
                    ));
                }
            }
            assert!(
                bad.is_empty(),
                "type {ty}, imatrix {with}: {} of {} rows differ, e.g. {:?}",
                bad.len(),
                f.nrows,
                &bad[..bad.len().min(5)]
            );
            checked += 1;
        }
        checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn sha(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn derived_grids_equal_ggml_common_tables() {
        // sha256 of ggml-common.h's little-endian arrays (iquants-lowbit.md §2): the u64/u32 entries' byte j
        // is coordinate j, so the flattened byte arrays hash the same.
        let h8 = |t: &[[u8; 8]]| sha(&t.concat());
        let h4 = |t: &[[u8; 4]]| sha(&t.concat());
        assert_eq!(
            h8(&IQ2XXS_GRID),
            "05826b5d3e472a3a78f196be62ac78acf81df0f909626e12ab9fa2a5d490dd54"
        );
        assert_eq!(
            h8(&IQ2XS_GRID),
            "06e47aaca60b4dc1d9b5a3f34540437058a6b142b4d7a59d5ded769b4d1bf1de"
        );
        assert_eq!(
            h8(&IQ2S_GRID),
            "e1aa1473412b0552c2174c30ef22ab4073f6a181b85a17056e8249bd2932fd88"
        );
        assert_eq!(
            h4(&IQ3XXS_GRID),
            "46e35f5a997efdee6c99ce57854c8a0d4f0ff8ca57e5e8a60c0793ea580acf5d"
        );
        assert_eq!(
            h4(&IQ3S_GRID),
            "bd1af4945a1717c65610b0284e4628b9a1ba3b306fae3a06f6e5f597356e349f"
        );
        assert_eq!(
            h8(&IQ1S_GRID),
            "07540ffc1aeaf6ad4d97e96b0fcc765aae39671d4ae4a27bbd0e796fde167c6a"
        );
        assert_eq!(
            sha(&KSIGNS_IQ2XS),
            "a76742a603f8beca5212ecce0f1f02f11a4887fd2f7c8b15aca0ea3eb3380c31"
        );
        let lists: [(&[u16], &str); 6] = [
            (
                &KGRID_2BIT_256,
                "915952ebc4af8ddba8113583ca1316fc818843f7b825bbf1a25ae1c39bf0e16d",
            ),
            (
                &KGRID_2BIT_512,
                "f66435966ca8d64e9e4a6e3c91e64afcf9015e700ec85962f527283ebae207b9",
            ),
            (
                &KGRID_1BIT_2048,
                "e9ffebfc997ad6023063a667c0bf4eedd8ebf7f56b3da399cbc7d1b1f7ea52c6",
            ),
            (
                &KGRID_2BIT_1024,
                "e6e75e121b65e8afa5c1f92b71463cfbe217b83893f438acde22fd5db06a43f7",
            ),
            (
                &KGRID_256,
                "c9678803c61b2210fbd8cbbb3f965a835409cd7d88a04d086d236261bd221d11",
            ),
            (
                &KGRID_512,
                "353274c58dd7d8dc5ee960dc8fc54ff9164eaf2b49206b841cd49415cf393f81",
            ),
        ];
        for (list, want) in lists {
            let bytes: Vec<u8> = list.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(sha(&bytes), want);
        }
        // Spot values (§2).
        assert_eq!(u64::from_le_bytes(IQ2XXS_GRID[0]), 0x0808_0808_0808_0808);
        assert_eq!(u64::from_le_bytes(IQ2XXS_GRID[255]), 0x2b2b_2b19_0808_1908);
        assert_eq!(u64::from_le_bytes(IQ1S_GRID[2047]), 0x0101_0101_0101_0101);
    }

    /// ggml's `dequantize_row_iq2_xxs` … `_iq3_s`, element by element as the C code writes them (byte
    /// grids, `db · grid · (sign ? −1 : 1)`): the reference the table-driven dequantisers must equal.
    fn reference(ty: crate::codecs::GgmlType, b: &[u8]) -> Vec<f32> {
        use crate::codecs::GgmlType as T;
        let d = crate::codecs::f16_at(b);
        let sgn = |s: u8, j: usize| if s & (1 << j) != 0 { -1.0f32 } else { 1.0 };
        let mut y = Vec::with_capacity(256);
        for g in 0..8 {
            match ty {
                T::Iq2Xxs => {
                    let q = &b[2 + 8 * g..10 + 8 * g];
                    let a1 = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
                    let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
                    for l in 0..4 {
                        let s = KSIGNS_IQ2XS[((a1 >> (7 * l)) & 127) as usize];
                        let grid = IQ2XXS_GRID[q[l] as usize];
                        y.extend((0..8).map(|j| db * grid[j] as f32 * sgn(s, j)));
                    }
                }
                T::Iq2Xs | T::Iq2S => {
                    let sc = if ty == T::Iq2Xs { b[66 + g] } else { b[74 + g] };
                    let db = [
                        d * (0.5 + (sc & 15) as f32) * 0.25,
                        d * (0.5 + (sc >> 4) as f32) * 0.25,
                    ];
                    for l in 0..4 {
                        let t = 4 * g + l;
                        let (grid, s) = if ty == T::Iq2Xs {
                            let v = u16::from_le_bytes([b[2 + 2 * t], b[3 + 2 * t]]);
                            (
                                IQ2XS_GRID[(v & 511) as usize],
                                KSIGNS_IQ2XS[(v >> 9) as usize],
                            )
                        } else {
                            let idx =
                                b[2 + t] as usize | ((b[66 + g] as usize) << (8 - 2 * l) & 0x300);
                            (IQ2S_GRID[idx], b[34 + t])
                        };
                        y.extend((0..8).map(|j| db[l / 2] * grid[j] as f32 * sgn(s, j)));
                    }
                }
                T::Iq3Xxs => {
                    let o = 66 + 4 * g;
                    let a = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                    let db = d * (0.5 + (a >> 28) as f32) * 0.5;
                    for l in 0..4 {
                        let s = KSIGNS_IQ2XS[((a >> (7 * l)) & 127) as usize];
                        let g1 = IQ3XXS_GRID[b[2 + 8 * g + 2 * l] as usize];
                        let g2 = IQ3XXS_GRID[b[2 + 8 * g + 2 * l + 1] as usize];
                        y.extend((0..4).map(|j| db * g1[j] as f32 * sgn(s, j)));
                        y.extend((0..4).map(|j| db * g2[j] as f32 * sgn(s, j + 4)));
                    }
                }
                T::Iq3S => {
                    let sc = (b[106 + g / 2] >> (4 * (g % 2))) & 15;
                    let db = d * (1 + 2 * sc as i32) as f32;
                    let qh = b[66 + g] as usize;
                    for l in 0..4 {
                        let i1 = b[2 + 8 * g + 2 * l] as usize | ((qh << (8 - 2 * l)) & 256);
                        let i2 = b[2 + 8 * g + 2 * l + 1] as usize | ((qh << (7 - 2 * l)) & 256);
                        let s = b[74 + 4 * g + l];
                        let (g1, g2) = (IQ3S_GRID[i1], IQ3S_GRID[i2]);
                        y.extend((0..4).map(|j| db * g1[j] as f32 * sgn(s, j)));
                        y.extend((0..4).map(|j| db * g2[j] as f32 * sgn(s, j + 4)));
                    }
                }
                _ => unreachable!(),
            }
        }
        y
    }

    #[test]
    fn table_dequantisers_equal_ggmls_formulas_bit_for_bit() {
        use crate::codecs::GgmlType as T;
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for ty in [T::Iq2Xxs, T::Iq2Xs, T::Iq2S, T::Iq3Xxs, T::Iq3S] {
            let bb = ty.traits().block_bytes;
            for _ in 0..200 {
                let mut b: Vec<u8> = (0..bb).map(|_| next() as u8).collect();
                // A random finite f16 d (subnormals and both zeros included).
                let mut h = next() as u16;
                if (h >> 10) & 0x1F == 0x1F {
                    h &= !0x4000;
                }
                b[..2].copy_from_slice(&h.to_le_bytes());
                let mut got = vec![0.0f32; 256];
                ty.dequantize(&b, &mut got);
                let want = reference(ty, &b);
                for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{} element {e}", ty.name());
                }
            }
        }
    }

    #[test]
    fn hostile_weights_quantize_without_panicking() {
        use crate::codecs::GgmlType as T;
        let mut x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        for (i, v) in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3e38,
            -3e38,
            1e-40,
            -0.0,
        ]
        .into_iter()
        .enumerate()
        {
            x[40 * i + 3] = v;
        }
        x[300..332].fill(f32::NAN);
        let imatrix: Vec<f32> = (0..512)
            .map(|i| if i % 7 == 0 { 0.0 } else { 1.5 })
            .collect();
        for ty in [
            T::Iq2Xxs,
            T::Iq2Xs,
            T::Iq2S,
            T::Iq3Xxs,
            T::Iq3S,
            T::Iq1S,
            T::Iq1M,
        ] {
            let mut out = vec![0u8; 2 * ty.traits().block_bytes];
            for w in [Some(&imatrix[..]), None] {
                ty.quantize(&x, &mut out, w).expect("quantizer");
                let mut y = vec![0.0f32; 512];
                ty.dequantize(&out, &mut y);
            }
        }
    }

    #[test]
    fn lattices_map_points_and_list_nearest_neighbours() {
        for (which, n, nwant) in [
            (Which::Iq2xxs, 256, 2),
            (Which::Iq2xs, 512, 2),
            (Which::Iq2s, 1024, 1),
            (Which::Iq1, 2048, 3),
            (Which::Iq3xxs, 256, 2),
            (Which::Iq3s, 512, 3),
        ] {
            let lat = Lattice::get(which);
            assert_eq!(lat.len(), n);
            let mut l = [0i8; 8];
            for k in 0..n {
                lat.levels_of(k, &mut l);
                assert_eq!(lat.lookup(lat.pack(&l)), Ok(k), "{which:?} point {k}");
            }
            // An off-grid vector's list holds exactly the points at its nwant nearest distinct distances.
            let levels = if lat.dim == 8 { 3 } else { 8 };
            let mut off = 0;
            for u in 0..lat.map.len() {
                let fields: Vec<i32> = (0..lat.dim)
                    .map(|c| ((u >> (lat.bits as usize * c)) & ((1 << lat.bits) - 1)) as i32)
                    .collect();
                if fields.iter().any(|&f| f >= levels) || lat.map[u] >= 0 {
                    continue;
                }
                off += 1;
                let Err(list) = lat.lookup(u) else {
                    panic!("{which:?}: {u:#x} has no list")
                };
                let d = |k: usize| -> i32 {
                    (0..lat.dim)
                        .map(|c| (lat.pos[k][c] as i32 - (2 * fields[c] + 1)).pow(2))
                        .sum()
                };
                let mut all: Vec<i32> = (0..n).map(d).collect();
                all.sort_unstable();
                all.dedup();
                let cut = all[nwant - 1];
                let want: Vec<u16> = {
                    let mut v: Vec<(i32, u16)> = (0..n)
                        .filter(|&k| d(k) <= cut)
                        .map(|k| (d(k), k as u16))
                        .collect();
                    v.sort_unstable();
                    v.into_iter().map(|(_, k)| k).collect()
                };
                assert_eq!(list, &want[..], "{which:?} {u:#x}");
                if off > 300 {
                    break;
                }
            }
            assert!(off > 0);
        }
    }
}

#[cfg(test)]
mod speed {
    /// Weights per second of each low-bit quantizer on the oracle fixture's rows (with the imatrix),
    /// against Q4_K's: `cargo test -p quant_engine --release --lib iq_quantizer_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing, not a check"]
    fn iq_quantizer_speed() {
        use crate::codecs::GgmlType as T;
        let f = super::fixture::load();
        for ty in [
            T::Q4K,
            T::Iq4Xs,
            T::Iq3S,
            T::Iq3Xxs,
            T::Iq2S,
            T::Iq2Xs,
            T::Iq2Xxs,
            T::Iq1M,
            T::Iq1S,
        ] {
            let rb = f.n_per_row / 256 * ty.traits().block_bytes;
            let mut out = vec![0u8; rb];
            // Build the lattice first (once per process, as in a real run).
            ty.quantize(&f.src[..f.n_per_row], &mut out, Some(&f.imatrix));
            let t = std::time::Instant::now();
            for r in 0..f.nrows {
                let x = &f.src[r * f.n_per_row..(r + 1) * f.n_per_row];
                ty.quantize(x, &mut out, Some(&f.imatrix));
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{:8} {:>8.2} M weights/s",
                ty.name(),
                (f.nrows * f.n_per_row) as f64 / s / 1e6
            );
        }
    }
}
