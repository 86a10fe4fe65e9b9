//! bitsandbytes 4-bit blockwise quantization (NF4 and FP4) and its 8-bit "double quantization" of the
//! block scales, as transformers saves a `load_in_4bit` model. Written from the layout in
//! `shared/reference/hf-formats.md` §4; `tests/bnb_py` checks it against bitsandbytes itself.
//!
//! The weight `[out, in]` is flattened row-major and cut into blocks of 64 contiguous elements (a block
//! may span two rows). Per block: `absmax = max |x|`, each element's code is the nearest of 16 levels to
//! `x / absmax` (ties to the lower level), two codes per byte, the first in the high nibble. Dequantized:
//! `level[code] · absmax`, rounded to the dtype the model had. With double quantization the f32 absmax
//! values minus their mean are themselves quantized to 8 bits in blocks of 256 with bitsandbytes'
//! signed "dynamic" map.

use serde::{Deserialize, Serialize};

/// Elements per block: bitsandbytes' default, which transformers offers no way to change.
pub const BLOCK: usize = 64;
/// Absmax values per block of the double quantization.
pub const NESTED_BLOCK: usize = 256;

/// The 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Bnb4Kind {
    /// 4-bit NormalFloat (QLoRA): quantiles of a normal distribution.
    Nf4,
    /// bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

/// NF4 levels, index → value (bitsandbytes' table, float32; written with the digits bitsandbytes lists).
#[allow(clippy::excessive_precision)]
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// FP4 levels, index → value: bit 3 is the sign; the magnitudes of codes 0..8 are
/// `0, 0.0625, 8, 12, 4, 6, 2, 3` (exponent bias 3, one mantissa bit) divided by 12 in f32, the largest
/// (code 8, "−0", is +0.0, as bitsandbytes builds it).
pub const FP4_LEVELS: [f32; 16] = fp4_levels();

const fn fp4_levels() -> [f32; 16] {
    let mags: [f32; 8] = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
    let mut out = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        let m = mags[i & 7] / 12.0;
        out[i] = if i >= 8 && m != 0.0 { -m } else { m };
        i += 1;
    }
    out
}

/// The levels sorted (stably) by value, the midpoints between neighbours, and each sorted position's code:
/// bitsandbytes' `bucketize` quantizer.
struct Buckets {
    bounds: [f32; 15],
    code_of: [u8; 16],
}

fn buckets(levels: &[f32; 16]) -> Buckets {
    let mut order: Vec<usize> = (0..16).collect();
    order.sort_by(|&a, &b| levels[a].total_cmp(&levels[b]));
    let mut bounds = [0.0f32; 15];
    for i in 0..15 {
        bounds[i] = (levels[order[i]] + levels[order[i + 1]]) / 2.0;
    }
    let mut code_of = [0u8; 16];
    for (i, &o) in order.iter().enumerate() {
        code_of[i] = o as u8;
    }
    Buckets { bounds, code_of }
}

static NF4_BUCKETS: std::sync::LazyLock<Buckets> =
    std::sync::LazyLock::new(|| buckets(&NF4_LEVELS));
static FP4_BUCKETS: std::sync::LazyLock<Buckets> =
    std::sync::LazyLock::new(|| buckets(&FP4_LEVELS));

impl Bnb4Kind {
    /// `"nf4"` / `"fp4"`, as `bnb_4bit_quant_type` and the quant-state key spell it.
    pub fn name(self) -> &'static str {
        match self {
            Bnb4Kind::Nf4 => "nf4",
            Bnb4Kind::Fp4 => "fp4",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(Bnb4Kind::Nf4),
            "fp4" => Some(Bnb4Kind::Fp4),
            _ => None,
        }
    }

    /// The 16 levels, index → value.
    pub fn levels(self) -> &'static [f32; 16] {
        match self {
            Bnb4Kind::Nf4 => &NF4_LEVELS,
            Bnb4Kind::Fp4 => &FP4_LEVELS,
        }
    }

    /// The code of `v` (already divided by the block's absmax): as bitsandbytes' `bucketize` over the
    /// midpoints of the sorted levels, a value on a midpoint going to the lower level.
    #[inline]
    pub fn encode(self, v: f32) -> u8 {
        let b = match self {
            Bnb4Kind::Nf4 => &*NF4_BUCKETS,
            Bnb4Kind::Fp4 => &*FP4_BUCKETS,
        };
        b.code_of[b.bounds.partition_point(|&m| m < v)]
    }
}

/// bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map(signed=True)`): for `i = 0..7` the
/// midpoints of `linspace(0.1, 1, 2^i + 1)` scaled by `10^(i−6)`, both signs, then 0 and 1; sorted.
pub fn dynamic_map() -> [f32; 256] {
    let mut v: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = (1usize << i) + 1;
        let bounds = linspace_f32(0.1, 1.0, n);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            v.push(scale * mean);
            v.push(-scale * mean);
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&v);
    out
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: the first half stepped from the start, the
/// second from the end, each a fused multiply-add.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' CPU 8-bit quantizer (`quantize_cpu`): `[-1, 1]` cut into 65 536 bins, each mapped once to
/// the entry of `map` whose midpoints enclose the bin's left edge; a value takes its bin's entry.
struct Lut8 {
    lut: Vec<u8>,
}

impl Lut8 {
    const BINS: usize = 65_536;

    fn new(map: &[f32; 256]) -> Self {
        let mid: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = Vec::with_capacity(Self::BINS);
        let mut code = 0usize;
        for i in 0..Self::BINS {
            let val = -1.0 + (2.0 * i as f32) / (Self::BINS - 1) as f32;
            while code < mid.len() && mid[code] < val {
                code += 1;
            }
            lut.push(code as u8);
        }
        Self { lut }
    }

    #[inline]
    fn code(&self, v: f32) -> u8 {
        let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
        let i = t.mul_add((Self::BINS - 1) as f32, 0.5) as usize;
        self.lut[i.min(Self::BINS - 1)]
    }
}

/// Double-quantized block scales: `absmax[b] = map[codes[b]] · nested_absmax[b / 256] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
    pub map: [f32; 256],
}

impl DoubleQuant {
    /// Quantize `absmax` (8-bit blockwise over `absmax − mean`).
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset =
            (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let map = dynamic_map();
        let lut = Lut8::new(&map);
        let mut codes = Vec::with_capacity(absmax.len());
        let mut nested = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
        for block in absmax.chunks(NESTED_BLOCK) {
            let centred: Vec<f32> = block.iter().map(|&a| a - offset).collect();
            let m = centred.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
            nested.push(m);
            if m == 0.0 {
                codes.extend(std::iter::repeat_n(0u8, centred.len()));
                continue;
            }
            let inv = 1.0 / m;
            codes.extend(centred.iter().map(|&x| lut.code(x * inv)));
        }
        DoubleQuant {
            codes,
            nested_absmax: nested,
            offset,
            map,
        }
    }

    /// Block `b`'s absmax.
    #[inline]
    pub fn absmax(&self, b: usize) -> f32 {
        self.map[self.codes[b] as usize] * self.nested_absmax[b / NESTED_BLOCK] + self.offset
    }
}

/// Quantize the flattened weight `x`: packed codes (`ceil(n/2)` bytes) and the f32 absmax of each block.
pub fn quantize(x: &[f32], kind: Bnb4Kind) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; x.len().div_ceil(2)];
    let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCK));
    for (b, block) in x.chunks(BLOCK).enumerate() {
        let m = block.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
        absmax.push(m);
        // As bitsandbytes: whole blocks multiply by the reciprocal, a partial last block divides.
        let partial = block.len() < BLOCK;
        let d = m.max(1e-38);
        let inv = 1.0 / d;
        for (j, &v) in block.iter().enumerate() {
            let s = if partial { v / d } else { v * inv };
            let c = kind.encode(s.clamp(-1.0, 1.0));
            let i = b * BLOCK + j;
            codes[i / 2] |= if i.is_multiple_of(2) { c << 4 } else { c };
        }
    }
    (codes, absmax)
}

/// The code of element `i` of the flattened weight.
#[inline]
pub fn code_at(codes: &[u8], i: usize) -> u8 {
    let byte = codes[i / 2];
    if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// The dtype dequantized values are rounded to (bitsandbytes returns the dtype the weight had).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Bnb4Dtype {
    F32,
    F16,
    BF16,
}

impl Bnb4Dtype {
    /// `"float16"`, as the quant state records it.
    pub fn name(self) -> &'static str {
        match self {
            Bnb4Dtype::F32 => "float32",
            Bnb4Dtype::F16 => "float16",
            Bnb4Dtype::BF16 => "bfloat16",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim_start_matches("torch.") {
            "float32" => Some(Bnb4Dtype::F32),
            "float16" => Some(Bnb4Dtype::F16),
            "bfloat16" => Some(Bnb4Dtype::BF16),
            _ => None,
        }
    }

    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Bnb4Dtype::F32 => x,
            Bnb4Dtype::F16 => half::f16::from_f32(x).to_f32(),
            Bnb4Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// The stored block scales of a [`Bnb4Parts`].
#[derive(Clone, Copy, Debug)]
pub enum StoredAbsmax<'a> {
    /// Little-endian f32, one per block.
    F32(&'a [u8]),
    /// One 8-bit code per block into `map`, scaled per `nested_block` codes.
    Double {
        codes: &'a [u8],
        nested_absmax: &'a [f32],
        nested_block: usize,
        offset: f32,
        map: &'a [f32; 256],
    },
}

impl StoredAbsmax<'_> {
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match *self {
            StoredAbsmax::F32(bytes) => {
                let mut w = [0u8; 4];
                w.copy_from_slice(&bytes[4 * b..4 * b + 4]);
                f32::from_le_bytes(w)
            }
            StoredAbsmax::Double {
                codes,
                nested_absmax,
                nested_block,
                offset,
                map,
            } => map[codes[b] as usize] * nested_absmax[b / nested_block] + offset,
        }
    }

    pub fn blocks(&self) -> usize {
        match *self {
            StoredAbsmax::F32(bytes) => bytes.len() / 4,
            StoredAbsmax::Double { codes, .. } => codes.len(),
        }
    }
}

/// A bitsandbytes 4-bit linear `[out, in]` as stored, borrowed: what dequantization needs.
#[derive(Clone, Copy, Debug)]
pub struct Bnb4Parts<'a> {
    pub levels: &'a [f32; 16],
    pub dtype: Bnb4Dtype,
    pub blocksize: usize,
    pub out_features: usize,
    pub in_features: usize,
    pub codes: &'a [u8],
    pub absmax: StoredAbsmax<'a>,
}

impl Bnb4Parts<'_> {
    /// Dequantize output row `r`.
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let start = r * self.in_features;
        for (j, o) in out.iter_mut().enumerate() {
            let i = start + j;
            let code = code_at(self.codes, i) as usize;
            *o = self
                .dtype
                .round(self.levels[code] * self.absmax.get(i / self.blocksize));
        }
    }

    /// Sizes agree with the shape (checked once, when a checkpoint is opened).
    pub fn validate(&self, name: &str) -> crate::Result<()> {
        let n = self
            .out_features
            .checked_mul(self.in_features)
            .ok_or_else(|| crate::Error::Invalid(format!("{name}: shape overflows")))?;
        let bad = |d: String| Err(crate::Error::Invalid(format!("{name}: {d}")));
        if self.blocksize == 0 {
            return bad("blocksize 0".into());
        }
        if self.codes.len() != n.div_ceil(2) {
            return bad(format!(
                "{} bytes of 4-bit codes for {} weights (expected {})",
                self.codes.len(),
                n,
                n.div_ceil(2)
            ));
        }
        let blocks = n.div_ceil(self.blocksize);
        if self.absmax.blocks() != blocks {
            return bad(format!(
                "{} block scales for {blocks} blocks of {}",
                self.absmax.blocks(),
                self.blocksize
            ));
        }
        if let StoredAbsmax::Double {
            nested_absmax,
            nested_block,
            ..
        } = self.absmax
        {
            if nested_block == 0 || nested_absmax.len() != blocks.div_ceil(nested_block) {
                return bad(format!(
                    "{} nested scales for {blocks} block scales in blocks of {nested_block}",
                    nested_absmax.len()
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
    fn fp4_levels_are_bitsandbytes_fp4() {
        assert_eq!(FP4_LEVELS[3], 1.0);
        assert_eq!(FP4_LEVELS[11], -1.0);
        assert_eq!(FP4_LEVELS[1], 0.0625 / 12.0);
        assert_eq!(FP4_LEVELS[7], 0.25);
        assert_eq!(FP4_LEVELS[2], 8.0f32 / 12.0);
        assert_eq!(FP4_LEVELS[8].to_bits(), 0, "+0.0, not −0.0");
        // bitsandbytes' bucketize over the stably sorted levels: zero and tiny negatives take code 0, tiny
        // positives the second zero (code 8).
        assert_eq!(Bnb4Kind::Fp4.encode(0.0), 0);
        assert_eq!(Bnb4Kind::Fp4.encode(-0.001), 0);
        assert_eq!(Bnb4Kind::Fp4.encode(0.001), 8);
        assert_eq!(Bnb4Kind::Fp4.encode(0.004), 1);
        assert_eq!(Bnb4Kind::Fp4.encode(-1.0), 11);
    }

    #[test]
    fn golden_pair_and_nibble_order() {
        // hf-formats.md §7: NF4 pair (1.0·absmax, −1.0·absmax) → byte 0xF0.
        let (codes, absmax) = quantize(&[2.0, -2.0], Bnb4Kind::Nf4);
        assert_eq!(codes, [0xF0]);
        assert_eq!(absmax, [2.0]);
        // Ties go to the lower level: the midpoint of levels 7 (0) and 8.
        let mid = NF4_LEVELS[8] / 2.0;
        assert_eq!(Bnb4Kind::Nf4.encode(mid), 7);
        assert_eq!(Bnb4Kind::Nf4.encode(mid + 1e-6), 8);
        // An odd count: the last byte's low nibble is 0.
        let (codes, _) = quantize(&[1.0, 0.0, -1.0], Bnb4Kind::Nf4);
        assert_eq!(codes, [0xF7, 0x00]);
    }

    #[test]
    fn dynamic_map_is_bitsandbytes_signed_map() {
        let m = dynamic_map();
        assert_eq!(m[255], 1.0);
        assert!((m[0] + 0.992_968_75).abs() < 1e-7, "{}", m[0]);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m.iter().filter(|&&x| x == 0.0).count(), 1);
    }

    #[test]
    fn round_trip_error_is_small_and_double_quant_close() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        for kind in [Bnb4Kind::Nf4, Bnb4Kind::Fp4] {
            let (codes, am) = quantize(&x, kind);
            let am_bytes: Vec<u8> = am.iter().flat_map(|a| a.to_le_bytes()).collect();
            let parts = Bnb4Parts {
                levels: kind.levels(),
                dtype: Bnb4Dtype::F32,
                blocksize: BLOCK,
                out_features: 10,
                in_features: 100,
                codes: &codes,
                absmax: StoredAbsmax::F32(&am_bytes),
            };
            parts.validate("x").unwrap();
            let mut y = vec![0.0; x.len()];
            for (r, row) in y.chunks_mut(100).enumerate() {
                parts.dequant_row(r, row);
            }
            let err: f32 =
                x.iter().zip(&y).map(|(a, b)| (a - b).abs()).sum::<f32>() / x.len() as f32;
            assert!(err < 0.05, "{kind:?} {err}");
            let dq = DoubleQuant::quantize(&am);
            for (b, &a) in am.iter().enumerate() {
                assert!(
                    (dq.absmax(b) - a).abs() < 0.01 * a.max(0.05),
                    "{b}: {} vs {a}",
                    dq.absmax(b)
                );
            }
        }
    }
}
