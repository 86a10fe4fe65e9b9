//! What each grouped linear puts on the device for its kernel file (`shaders/<format>.wgsl`, run by
//! `grouped.wgsl`): the stored tensors as they are, and where a kernel needs them, small tables built here
//! (a format's parameters, EXL2's inverse permutation, bitsandbytes' expanded double-quantised scales).
//! Every format of [`Grouped`] has one, so no grouped linear is dequantised on the host for the GPU.

use std::borrow::Cow;

use crate::codecs::bnb::Bnb4Dtype;
use crate::codecs::ct::ScaleType;
use crate::codecs::hqq::HqqDtype;
use crate::tensor::Grouped;

/// The kernel file, its buffers by binding, and the format's uniform parameter.
pub(crate) struct GroupedLayout<'a> {
    pub file: &'static str,
    pub parts: Vec<(u32, Cow<'a, [u8]>)>,
    pub param: u32,
}

fn words(v: &[u32]) -> Cow<'static, [u8]> {
    Cow::Owned(v.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// `half.wgsl`'s dtype codes.
fn bnb_dtype(d: Bnb4Dtype) -> u32 {
    match d {
        Bnb4Dtype::F32 => 0,
        Bnb4Dtype::F16 => 1,
        Bnb4Dtype::BF16 => 2,
    }
}

fn hqq_dtype(d: HqqDtype) -> u32 {
    match d {
        HqqDtype::F32 => 0,
        HqqDtype::F16 => 1,
        HqqDtype::BF16 => 2,
    }
}

fn scale_dtype(d: ScaleType) -> u32 {
    match d {
        ScaleType::F32 => 0,
        ScaleType::F16 => 1,
        ScaleType::BF16 => 2,
    }
}

/// The device layout of `g`.
pub(crate) fn layout(g: &Grouped) -> GroupedLayout<'_> {
    fn b(x: &[u8]) -> Cow<'_, [u8]> {
        Cow::Borrowed(x)
    }
    match g {
        Grouped::Gptq(p) => GroupedLayout {
            file: "gptq",
            parts: vec![
                (0, b(&p.qweight)),
                (1, b(&p.qzeros)),
                (2, b(&p.scales)),
                (3, b(&p.g_idx)),
            ],
            param: p.bits,
        },
        Grouped::Awq(p) => GroupedLayout {
            file: "awq",
            parts: vec![(0, b(&p.qweight)), (1, b(&p.qzeros)), (2, b(&p.scales))],
            param: p.group_size as u32,
        },
        Grouped::Bnb4(p) => {
            let parts = p.parts();
            let absmax: Vec<u8> = (0..parts.absmax.blocks())
                .flat_map(|i| parts.absmax.get(i).to_le_bytes())
                .collect();
            let mut meta = vec![p.blocksize as u32, bnb_dtype(p.dtype)];
            meta.extend(p.levels.iter().map(|l| l.to_bits()));
            GroupedLayout {
                file: "bnb4",
                parts: vec![(0, b(&p.codes)), (1, Cow::Owned(absmax)), (3, words(&meta))],
                param: 0,
            }
        }
        Grouped::Hqq(p) => {
            let q = &p.params;
            let numel = p.out_features * p.in_features;
            let (rows, cols) = q.grouped_dims(numel);
            let (fields, word) = q.fields();
            let step = if q.nbits == 3 {
                q.packed_rows(rows)
            } else {
                rows / fields
            };
            let meta = [
                u32::from(q.nbits),
                u32::from(q.axis),
                cols as u32,
                step as u32,
                word as u32,
                fields as u32,
                hqq_dtype(p.dtype),
            ];
            GroupedLayout {
                file: "hqq",
                parts: vec![
                    (0, b(&p.packed)),
                    (1, b(&p.zero)),
                    (2, b(&p.scale)),
                    (3, words(&meta)),
                ],
                param: 0,
            }
        }
        Grouped::Ct(p) => {
            let parts = p.parts();
            let mut meta = vec![
                p.bits,
                crate::codecs::ct::packed_words(p.in_features, p.bits) as u32,
                parts.groups() as u32,
                p.group_size as u32,
                u32::from(p.zero_point.is_some()),
                u32::from(p.g_idx.is_some()),
                scale_dtype(p.scale_type),
                0,
            ];
            if let Some(gi) = &p.g_idx {
                meta.extend(
                    gi.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            let zero = match &p.zero_point {
                Some(z) => b(z),
                None => Cow::Owned(vec![0u8; 4]),
            };
            GroupedLayout {
                file: "ct",
                parts: vec![
                    (0, b(&p.packed)),
                    (1, zero),
                    (2, b(&p.scale)),
                    (3, words(&meta)),
                ],
                param: 0,
            }
        }
        Grouped::Exl2(p) => {
            // Per input feature: its code's first bit in q_weight's column, and its group and bits.
            let mut meta = vec![0u32; 1 + 2 * p.in_features];
            meta[0] = p.n_pad as u32;
            for (gi, g) in p.groups.iter().enumerate() {
                for i in 0..g.rows {
                    let c = p.perm[g.row + i] as usize;
                    if c >= p.in_features {
                        continue;
                    }
                    meta[1 + 2 * c] = (g.word * 32 + i * usize::from(g.bits)) as u32;
                    meta[2 + 2 * c] = ((gi as u32) << 8) | u32::from(g.bits);
                }
            }
            GroupedLayout {
                file: "exl2",
                parts: vec![
                    (0, b(&p.q_weight)),
                    (1, b(&p.q_scale)),
                    (2, b(&p.q_scale_max)),
                    (3, words(&meta)),
                ],
                param: 0,
            }
        }
    }
}
