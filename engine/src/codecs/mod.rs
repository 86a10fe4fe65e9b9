//! How a block of weights is stored.
//!
//! One entry per ggml block type in a table ([`GgmlType::traits`]), like ggml's `type_traits`, so generic
//! code never switches on a type's name: it asks the table for the block geometry and the dequantiser.
//! Later formats (GPTQ, EXL2, NF4, HQQ, AWQ) join the same table.

pub mod awq;
pub mod bnb;
pub mod ct;
pub mod exl2;
mod float;
pub mod gptq;
pub mod hqq;
mod iq1;
mod iq2;
mod iq3;
mod iq_grids;
mod iq_lowbit;
mod iquants;
mod kquants;
mod legacy;
mod x86;

pub(crate) use iq_lowbit::int_reading as lowbit_int_reading;
pub(crate) use iq_lowbit::{
    iq1m_d, iq1m_scales, IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID,
    KSIGNS_IQ2XS,
};
pub use iquants::KVALUES_IQ4NL;
pub(crate) use kquants::q3_k_scales;
pub(crate) use x86::scale_min_k4;

/// The lookup table (lattice grid and sign table) the GPU kernels of a low-bit i-quant read, as u32 words;
/// `None` for types without one.
pub fn gpu_table(ty: GgmlType) -> Option<Vec<u32>> {
    iq_lowbit::gpu_table(ty)
}

/// A ggml tensor type, with its stable on-disk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Iq4Nl,
    Iq4Xs,
    Iq2Xxs,
    Iq2Xs,
    Iq2S,
    Iq3Xxs,
    Iq3S,
    Iq1S,
    Iq1M,
}

/// Quantise whole blocks with llama.cpp's reference quantizer: `src.len()` is a multiple of
/// `block_elems`, `dst.len()` the matching number of bytes. `importance` (one weight per element of
/// `src`, from an importance matrix) selects the weighted search where the type has one.
///
/// With `importance`, `src` must be exactly ONE tensor row (`n_per_row` elements, the imatrix's column
/// weights): the legacy types' weighted search (Q4_0..Q5_1) weighs every element with the mean square of
/// its whole row, so several rows in one call would give different bytes from llama.cpp. (The k-quants
/// and IQ4 types only use statistics of their own (super-)block, so for them any whole number of blocks
/// gives the same bytes; callers should still pass one row.) Without `importance`, any whole number of
/// blocks is fine.
pub type QuantizeFn = fn(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>);

/// Dequantise whole blocks: `src.len()` is a multiple of `block_bytes`, `dst.len()` the matching number of
/// elements.
pub type DequantFn = fn(src: &[u8], dst: &mut [f32]);

/// What generic code needs to know about a block type.
#[derive(Clone, Copy, Debug)]
pub struct TypeTraits {
    pub ty: GgmlType,
    /// Name as ggml and gguf-py spell it (`"Q4_K"`).
    pub name: &'static str,
    /// The ggml type id stored in GGUF files.
    pub ggml_id: u32,
    /// Elements per block.
    pub block_elems: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    pub dequantize: DequantFn,
    /// `None` while a type has no quantizer yet.
    pub quantize: Option<QuantizeFn>,
    /// What llama.cpp's CPU backend converts activations to before multiplying them with this type
    /// (`type_traits_cpu[ty].vec_dot_type`).
    pub vec_dot: VecDotType,
}

/// The form llama.cpp's CPU backend converts activations to before multiplying them with weights of a type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VecDotType {
    F32,
    F16,
    BF16,
    /// Q8_0 and Q8_1 (the same values; Q8_1 also stores the block sum).
    Q8_0,
    Q8K,
}

impl TypeTraits {
    /// Bits per weight of this type.
    pub fn bits_per_weight(&self) -> f64 {
        (self.block_bytes * 8) as f64 / self.block_elems as f64
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(&self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_elems)
            .then(|| n / self.block_elems * self.block_bytes)
    }
}

const TABLE: [TypeTraits; 22] = [
    TypeTraits {
        ty: GgmlType::F32,
        vec_dot: VecDotType::F32,
        name: "F32",
        ggml_id: 0,
        block_elems: 1,
        block_bytes: 4,
        dequantize: float::dequant_f32,
        quantize: Some(float::quantize_f32),
    },
    TypeTraits {
        ty: GgmlType::F16,
        vec_dot: VecDotType::F16,
        name: "F16",
        ggml_id: 1,
        block_elems: 1,
        block_bytes: 2,
        dequantize: float::dequant_f16,
        quantize: Some(float::quantize_f16),
    },
    TypeTraits {
        ty: GgmlType::BF16,
        vec_dot: VecDotType::BF16,
        name: "BF16",
        ggml_id: 30,
        block_elems: 1,
        block_bytes: 2,
        dequantize: float::dequant_bf16,
        quantize: Some(float::quantize_bf16),
    },
    TypeTraits {
        ty: GgmlType::Q4_0,
        vec_dot: VecDotType::Q8_0,
        name: "Q4_0",
        ggml_id: 2,
        block_elems: 32,
        block_bytes: 18,
        dequantize: legacy::dequant_q4_0,
        quantize: Some(legacy::quantize_q4_0),
    },
    TypeTraits {
        ty: GgmlType::Q4_1,
        vec_dot: VecDotType::Q8_0,
        name: "Q4_1",
        ggml_id: 3,
        block_elems: 32,
        block_bytes: 20,
        dequantize: legacy::dequant_q4_1,
        quantize: Some(legacy::quantize_q4_1),
    },
    TypeTraits {
        ty: GgmlType::Q5_0,
        vec_dot: VecDotType::Q8_0,
        name: "Q5_0",
        ggml_id: 6,
        block_elems: 32,
        block_bytes: 22,
        dequantize: legacy::dequant_q5_0,
        quantize: Some(legacy::quantize_q5_0),
    },
    TypeTraits {
        ty: GgmlType::Q5_1,
        vec_dot: VecDotType::Q8_0,
        name: "Q5_1",
        ggml_id: 7,
        block_elems: 32,
        block_bytes: 24,
        dequantize: legacy::dequant_q5_1,
        quantize: Some(legacy::quantize_q5_1),
    },
    TypeTraits {
        ty: GgmlType::Q8_0,
        vec_dot: VecDotType::Q8_0,
        name: "Q8_0",
        ggml_id: 8,
        block_elems: 32,
        block_bytes: 34,
        dequantize: legacy::dequant_q8_0,
        quantize: Some(legacy::quantize_q8_0),
    },
    TypeTraits {
        ty: GgmlType::Q2K,
        vec_dot: VecDotType::Q8K,
        name: "Q2_K",
        ggml_id: 10,
        block_elems: 256,
        block_bytes: 84,
        dequantize: kquants::dequant_q2_k,
        quantize: Some(kquants::quantize_q2_k),
    },
    TypeTraits {
        ty: GgmlType::Q3K,
        vec_dot: VecDotType::Q8K,
        name: "Q3_K",
        ggml_id: 11,
        block_elems: 256,
        block_bytes: 110,
        dequantize: kquants::dequant_q3_k,
        quantize: Some(kquants::quantize_q3_k),
    },
    TypeTraits {
        ty: GgmlType::Q4K,
        vec_dot: VecDotType::Q8K,
        name: "Q4_K",
        ggml_id: 12,
        block_elems: 256,
        block_bytes: 144,
        dequantize: kquants::dequant_q4_k,
        quantize: Some(kquants::quantize_q4_k),
    },
    TypeTraits {
        ty: GgmlType::Q5K,
        vec_dot: VecDotType::Q8K,
        name: "Q5_K",
        ggml_id: 13,
        block_elems: 256,
        block_bytes: 176,
        dequantize: kquants::dequant_q5_k,
        quantize: Some(kquants::quantize_q5_k),
    },
    TypeTraits {
        ty: GgmlType::Q6K,
        vec_dot: VecDotType::Q8K,
        name: "Q6_K",
        ggml_id: 14,
        block_elems: 256,
        block_bytes: 210,
        dequantize: kquants::dequant_q6_k,
        quantize: Some(kquants::quantize_q6_k),
    },
    TypeTraits {
        ty: GgmlType::Iq4Nl,
        vec_dot: VecDotType::Q8_0,
        name: "IQ4_NL",
        ggml_id: 20,
        block_elems: 32,
        block_bytes: 18,
        dequantize: iquants::dequant_iq4_nl,
        quantize: Some(iquants::quantize_iq4_nl),
    },
    TypeTraits {
        ty: GgmlType::Iq4Xs,
        vec_dot: VecDotType::Q8K,
        name: "IQ4_XS",
        ggml_id: 23,
        block_elems: 256,
        block_bytes: 136,
        dequantize: iquants::dequant_iq4_xs,
        quantize: Some(iquants::quantize_iq4_xs),
    },
    TypeTraits {
        ty: GgmlType::Iq2Xxs,
        vec_dot: VecDotType::Q8K,
        name: "IQ2_XXS",
        ggml_id: 16,
        block_elems: 256,
        block_bytes: 66,
        dequantize: iq2::dequant_iq2_xxs,
        quantize: Some(iq2::quantize_iq2_xxs),
    },
    TypeTraits {
        ty: GgmlType::Iq2Xs,
        vec_dot: VecDotType::Q8K,
        name: "IQ2_XS",
        ggml_id: 17,
        block_elems: 256,
        block_bytes: 74,
        dequantize: iq2::dequant_iq2_xs,
        quantize: Some(iq2::quantize_iq2_xs),
    },
    TypeTraits {
        ty: GgmlType::Iq2S,
        vec_dot: VecDotType::Q8K,
        name: "IQ2_S",
        ggml_id: 22,
        block_elems: 256,
        block_bytes: 82,
        dequantize: iq2::dequant_iq2_s,
        quantize: Some(iq2::quantize_iq2_s),
    },
    TypeTraits {
        ty: GgmlType::Iq3Xxs,
        vec_dot: VecDotType::Q8K,
        name: "IQ3_XXS",
        ggml_id: 18,
        block_elems: 256,
        block_bytes: 98,
        dequantize: iq3::dequant_iq3_xxs,
        quantize: Some(iq3::quantize_iq3_xxs),
    },
    TypeTraits {
        ty: GgmlType::Iq3S,
        vec_dot: VecDotType::Q8K,
        name: "IQ3_S",
        ggml_id: 21,
        block_elems: 256,
        block_bytes: 110,
        dequantize: iq3::dequant_iq3_s,
        quantize: Some(iq3::quantize_iq3_s),
    },
    TypeTraits {
        ty: GgmlType::Iq1S,
        vec_dot: VecDotType::Q8K,
        name: "IQ1_S",
        ggml_id: 19,
        block_elems: 256,
        block_bytes: 50,
        dequantize: iq1::dequant_iq1_s,
        quantize: Some(iq1::quantize_iq1_s),
    },
    TypeTraits {
        ty: GgmlType::Iq1M,
        vec_dot: VecDotType::Q8K,
        name: "IQ1_M",
        ggml_id: 29,
        block_elems: 256,
        block_bytes: 56,
        dequantize: iq1::dequant_iq1_m,
        quantize: Some(iq1::quantize_iq1_m),
    },
];

impl GgmlType {
    /// Every type in the table.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|t| t.ty)
    }

    /// This type's entry in the table.
    pub fn traits(self) -> &'static TypeTraits {
        // The table is ordered like the enum.
        &TABLE[self as usize]
    }

    /// The type with ggml id `id`, if we handle it.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|t| t.ggml_id == id).map(|t| t.ty)
    }

    /// Name as ggml spells it.
    pub fn name(self) -> &'static str {
        self.traits().name
    }

    /// Quantise `src` (whole blocks) into `dst`; `None` if this type has no quantizer.
    pub fn quantize(self, src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) -> Option<()> {
        let t = self.traits();
        let q = t.quantize?;
        assert_eq!(src.len() % t.block_elems, 0, "{}: partial block", t.name);
        assert_eq!(
            src.len() / t.block_elems * t.block_bytes,
            dst.len(),
            "{}: output size",
            t.name
        );
        if let Some(w) = importance {
            assert_eq!(w.len(), src.len(), "{}: importance length", t.name);
        }
        q(src, dst, importance);
        Some(())
    }

    /// Dequantise `src` (whole blocks) into `dst`.
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) {
        let t = self.traits();
        debug_assert_eq!(src.len() % t.block_bytes, 0);
        debug_assert_eq!(src.len() / t.block_bytes * t.block_elems, dst.len());
        (t.dequantize)(src, dst);
    }
}

/// Read a little-endian f16 at `b[0..2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_ordered_like_the_enum() {
        for (i, t) in TABLE.iter().enumerate() {
            assert_eq!(t.ty as usize, i, "{}", t.name);
            assert_eq!(GgmlType::from_ggml_id(t.ggml_id), Some(t.ty));
        }
        assert_eq!(GgmlType::Q4K.traits().bits_per_weight(), 4.5);
        for ty in GgmlType::all() {
            assert!(
                ty.traits().quantize.is_some(),
                "{} has no quantizer",
                ty.name()
            );
        }
        assert_eq!(GgmlType::Q6K.traits().bits_per_weight(), 6.5625);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod x86_tests {
    //! The AVX2 dequantisers against the scalar references, bit for bit.
    use super::{kquants, legacy, x86};

    type Pair = (
        &'static str,
        usize,
        usize,
        &'static [usize],
        fn(&[u8], &mut [f32]) -> bool,
        fn(&[u8], &mut [f32]),
    );

    /// (name, block bytes, block elements, byte offsets of f16 scales, vector, scalar reference).
    const PAIRS: [Pair; 7] = [
        (
            "Q4_0",
            18,
            32,
            &[0],
            x86::dequant_q4_0,
            legacy::dequant_q4_0_scalar,
        ),
        (
            "Q4_1",
            20,
            32,
            &[0, 2],
            x86::dequant_q4_1,
            legacy::dequant_q4_1_scalar,
        ),
        (
            "Q5_0",
            22,
            32,
            &[0],
            x86::dequant_q5_0,
            legacy::dequant_q5_0_scalar,
        ),
        (
            "Q5_1",
            24,
            32,
            &[0, 2],
            x86::dequant_q5_1,
            legacy::dequant_q5_1_scalar,
        ),
        (
            "Q8_0",
            34,
            32,
            &[0],
            x86::dequant_q8_0,
            legacy::dequant_q8_0_scalar,
        ),
        (
            "Q4_K",
            144,
            256,
            &[0, 2],
            x86::dequant_q4_k,
            kquants::dequant_q4_k_scalar,
        ),
        (
            "Q6_K",
            210,
            256,
            &[208],
            x86::dequant_q6_k,
            kquants::dequant_q6_k_scalar,
        ),
    ];

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Random finite f16 bits (any sign, subnormals and zeros included; no inf/NaN).
        fn f16(&mut self) -> [u8; 2] {
            let mut bits = self.next() as u16;
            if (bits >> 10) & 0x1F == 0x1F {
                bits &= !0x4000;
            }
            bits.to_le_bytes()
        }
    }

    /// `nb` blocks: payload bytes from `fill`, then random finite f16 scales written over `scales`.
    fn blocks(rng: &mut Rng, bb: usize, nb: usize, scales: &[usize], counter: bool) -> Vec<u8> {
        let mut src: Vec<u8> = (0..bb * nb)
            .map(|i| if counter { i as u8 } else { rng.next() as u8 })
            .collect();
        for b in src.chunks_exact_mut(bb) {
            for &o in scales {
                let h = rng.f16();
                b[o..o + 2].copy_from_slice(&h);
            }
        }
        src
    }

    #[test]
    fn codecs_avx2_dequant_is_bit_identical_to_scalar() {
        if !x86::avx2() {
            eprintln!("no avx2+f16c on this CPU: vector dequantisers not tested");
            return;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for (name, bb, be, scales, vector, scalar) in PAIRS {
            for (nb, counter) in [
                (0, false),
                (1, false),
                (3, true),
                (300, true),
                (1000, false),
            ] {
                let src = blocks(&mut rng, bb, nb, scales, counter);
                let mut want = vec![f32::NAN; nb * be];
                let mut got = vec![0.0f32; nb * be];
                scalar(&src, &mut want);
                assert!(vector(&src, &mut got), "{name}: vector path not taken");
                for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{name}, {nb} blocks, element {e}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn codecs_table_dequant_takes_the_vector_path_bit_exactly() {
        use crate::codecs::GgmlType;
        let types = [
            (GgmlType::Q4_0, 0),
            (GgmlType::Q4_1, 1),
            (GgmlType::Q5_0, 2),
            (GgmlType::Q5_1, 3),
            (GgmlType::Q8_0, 4),
            (GgmlType::Q4K, 5),
            (GgmlType::Q6K, 6),
        ];
        let mut rng = Rng(12345);
        for (ty, i) in types {
            let (name, bb, be, scales, _, scalar) = PAIRS[i];
            assert_eq!(ty.name(), name);
            let src = blocks(&mut rng, bb, 64, scales, false);
            let mut want = vec![0.0f32; 64 * be];
            let mut got = vec![0.0f32; 64 * be];
            scalar(&src, &mut want);
            ty.dequantize(&src, &mut got);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "{name}");
        }
    }
}
