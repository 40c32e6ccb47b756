//! A frozen weight kept in a GGUF file's quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
//! Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, the lattice types IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS,
//! IQ2_S, IQ1_S, IQ1_M, Q1_0, Q2_0, TQ1_0, TQ2_0, MXFP4 and NVFP4), so that a model is fine-tuned on the very file llama.cpp runs: the blocks' bits
//! are split into a plane of codes and planes of scales (and minimums), and dequantized a band of
//! rows at a time in the forward pass, each value as ggml computes it.
//!
//! Layouts (ggml-common.h, ggml-quants.c), blocks of consecutive values of a row:
//! - Q8_0 (32): f16 `d`, 32 i8 `q`; value `q·d`.
//! - Q4_0 (32): f16 `d`, 16 bytes; element `j` in the low nibble of byte `j`, element `j + 16` in
//!   its high nibble; value `(q − 8)·d`. Q4_1: f16 `d`, f16 `m`, then as Q4_0; value `q·d + m`.
//! - Q5_0/Q5_1 (32): as Q4_0/Q4_1 with a u32 of fifth bits before the nibbles; `(q − 16)·d`,
//!   `q·d + m`.
//! - Q4_K/Q5_K (256): f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit scales `sc` and minimums `m`,
//!   (Q5_K: 32 bytes of fifth bits), 128 bytes of nibbles; value `(d·sc)·q − dmin·m` per
//!   sub-block of 32.
//! - Q6_K (256): 128 bytes of low nibbles, 64 of high bit pairs, sixteen i8 scales, f16 `d`;
//!   value `(d·sc)·(q − 32)` per sub-block of 16.
//! - Q2_K (256): sixteen bytes of 4-bit scale and minimum, 64 bytes of 2-bit codes, f16 `d` and
//!   `dmin`; value `(d·sc)·q − dmin·m` per sub-block of 16.
//! - Q3_K (256): 32 bytes of third bits, 64 of 2-bit codes, twelve bytes of sixteen 6-bit scales,
//!   f16 `d`; value `(d·(sc − 32))·(q − 4)` per sub-block of 16.
//! - IQ4_NL (32): as Q4_0, but a code stands for `kvalues_iq4nl[q]`, a non-linear grid; value
//!   `d·kvalues[q]`. IQ4_XS (256): f16 `d`, u16 of high scale bits, 4 bytes of low scale nibbles,
//!   then eight IQ4_NL runs of nibbles; value `(d·(sc − 32))·kvalues[q]` per sub-block of 32.
//! - The lattice types (256; `crate::ggml_encode::lattice`): a value's grid level and sign (IQ1:
//!   its shift's) become a 4-bit code, its sub-block's scale a byte; value
//!   `(d·sc)·code_value(q)`, exact in f32 and so ggml's value bit for bit.
//! - Q1_0 (128), Q2_0 (64), TQ1_0 and TQ2_0 (256; `crate::ggml_encode::low_bit`): a sign or a
//!   code `q` (TQ1_0's trits unpacked from base 3) and an f16 `d`; value `±d` or `(q − 1)·d`.
//! - MXFP4 (32): an E8M0 exponent byte, then nibbles as Q4_0; NVFP4 (64): four UE4M3 scale bytes,
//!   then per 16 values nibbles as Q4_0's; value `kvalues_mxfp4[q]·scale/2`. NVFP4's per-tensor
//!   scale (the file's `.scale`, which llama.cpp multiplies the product by) is folded into each
//!   scale byte's value. They keep only their scale bytes, no f16 `d`.
//!
//! In memory, 1-bit codes keep eight a byte and 2-bit codes (and trits) four (in value order), 3- and 4-bit codes two (the first
//! half of each scale's group in the low nibbles, as Q4_0), 8-bit codes one. 5- and 6-bit codes
//! keep their low four bits as 4-bit codes and the rest in a second plane, eight fifth bits (or
//! four pairs of fifth and sixth bits) a byte in value order: byte-table lookups make any of them
//! dense, and a code's two parts add up exactly before the scale. With their scales, Q2_K then
//! holds 0.39 bytes a value, Q3_K 0.57, IQ4_XS 0.54, Q5_0 0.69, Q5_K 0.70 and Q6_K 0.82 (as the
//! file), MXFP4 0.53 and NVFP4 0.56 (as the file); the lattice types 0.54 (IQ3_XXS, IQ3_S, IQ2_XXS,
//! IQ1_S) or 0.57 (IQ2_XS, IQ2_S, IQ1_M), against their files' 0.43 (IQ3_S) to 0.20 (IQ1_S).

use std::ops::Range;

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::fused::kernels::Packing;
use crate::fused::PackedBand;
use crate::ggml_encode::lattice;
use crate::gguf::{block_codes, code_value, e8m0_half, iq4_xs_scale, nvfp4_scale, k_scale_min, q3_k_scale, GgmlType, GgufFile, HfTensor, unpermute_rows};
use crate::nf4::{lookup_bytes, u8_tensor};
use crate::LoadError;

/// A GGUF-quantized frozen weight `[out, in]`.
#[derive(Module, Debug)]
pub struct GgmlWeight {
    /// `[out · in / codes a byte]`: eight signs or four 2-bit codes a byte, two 3- or 4-bit codes (or the low
    /// four bits of 5- and 6-bit codes), else one.
    pub codes: Tensor<1, Int>,
    /// 5- and 6-bit codes: the bits above the fourth, in value order, eight (Q5) or four (Q6_K)
    /// codes' worth a byte.
    pub high_bits: Option<Tensor<1, Int>>,
    /// One f16 `d` per block (of 32 values, or a K-quant's 256); none for MXFP4 and NVFP4, whose
    /// scales are all in `sub_scales`.
    pub scales: Option<Tensor<1>>,
    /// The f16 minimum per block: `m` (Q4_1, Q5_1) or `dmin` (Q2_K, Q4_K, Q5_K).
    pub mins: Option<Tensor<1>>,
    /// K-quants: each sub-block's scale as a byte (Q3_K's and Q6_K's are i8); MXFP4's E8M0
    /// exponents and NVFP4's UE4M3 scales, a byte per 32 or 16 values.
    pub sub_scales: Option<Tensor<1, Int>>,
    /// Q2_K, Q4_K and Q5_K: each sub-block's minimum.
    pub sub_mins: Option<Tensor<1, Int>>,
    pub shape: [usize; 2],
    #[module(skip)]
    pub kind: GgmlType,
    /// NVFP4's per-tensor scale (the file's `.scale` tensor), folded into each sub-block's scale.
    #[module(skip)]
    pub tensor_scale: Option<f32>,
}

/// How ember keeps a type's blocks.
struct Layout {
    /// Values one f16 `d` (and minimum) covers.
    block: usize,
    /// Values one scale covers once a K-quant's sub-block scales are applied (`block` otherwise).
    group: usize,
    /// Codes a byte in `codes`: 8 (1-bit), 4 (2-bit), 2 (3- to 6-bit) or 1.
    per_byte: usize,
    /// Per-block minimums.
    mins: bool,
    /// Bits of a code kept in the high plane: 1 (Q5), 2 (Q6_K) or none.
    high_bits: usize,
    /// An f16 `d` per block; MXFP4 and NVFP4 have only a scale byte per group.
    block_scales: bool,
}

impl Layout {
    fn of(kind: GgmlType) -> Self {
        let (block, group, per_byte, mins, high_bits) = match kind {
            GgmlType::Q8_0 => (32, 32, 1, false, 0),
            GgmlType::Q5_0 => (32, 32, 2, false, 1),
            GgmlType::Q5_1 => (32, 32, 2, true, 1),
            GgmlType::Q4_0 => (32, 32, 2, false, 0),
            GgmlType::Q4_1 => (32, 32, 2, true, 0),
            GgmlType::Q2_K => (256, 16, 4, true, 0),
            GgmlType::Q3_K => (256, 16, 2, false, 0),
            GgmlType::Q4_K => (256, 32, 2, true, 0),
            GgmlType::Q5_K => (256, 32, 2, true, 1),
            GgmlType::Q6_K => (256, 16, 2, false, 2),
            GgmlType::IQ4_NL => (32, 32, 2, false, 0),
            GgmlType::IQ4_XS => (256, 32, 2, false, 0),
            GgmlType::Q1_0 => (128, 128, 8, false, 0),
            GgmlType::Q2_0 => (64, 64, 4, false, 0),
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => (256, 256, 4, false, 0),
            kind if kind.lattice().is_some() => (256, lattice::sub_block(kind), 2, false, 0),
            GgmlType::MXFP4 => (32, 32, 2, false, 0),
            GgmlType::NVFP4 => (64, 16, 2, false, 0),
            other => unreachable!("{other:?} blocks are read only when GgmlWeight::reads them"),
        };
        let block_scales = !matches!(kind, GgmlType::MXFP4 | GgmlType::NVFP4);
        Self { block, group, per_byte, mins, high_bits, block_scales }
    }

    /// Whether each group has a scale byte of its own.
    fn sub_blocks(&self) -> bool {
        self.block != self.group || !self.block_scales
    }

    /// Bytes of codes per group.
    fn code_bytes(&self) -> usize {
        self.group / self.per_byte
    }

    /// Bytes of the high plane per group.
    fn high_bytes(&self) -> usize {
        self.group * self.high_bits / 8
    }

    /// What each byte of the high plane adds to its codes' values, `16 · bits` side by side.
    fn high_table(&self) -> Vec<f32> {
        high_table(self.high_bits)
    }

    /// Where the codes of a byte go: two a byte split over the group's halves (ggml's 4-bit
    /// order), four a byte side by side.
    fn packing(&self) -> Packing {
        if self.per_byte == 2 { Packing::SplitHalves } else { Packing::Adjacent }
    }

    /// The values each byte stands for, in [`Layout::packing`]'s order (for 5- and 6-bit codes,
    /// those of their low four bits, with the type's offset).
    fn table(&self, kind: GgmlType) -> Vec<f32> {
        byte_table(8 / self.per_byte, |code| code_value(kind, code))
    }
}

/// What a byte of a high-bit plane adds to each of its `8 / bits` codes (16 a step), for a
/// 256-row lookup.
pub(crate) fn high_table(bits: usize) -> Vec<f32> {
    byte_table(bits, |high| (16 * high) as f32)
}

/// For each byte, `value` of each of its `bits`-wide fields, lowest first: 256 rows of
/// `8 / bits` values.
fn byte_table(bits: usize, value: impl Fn(u8) -> f32) -> Vec<f32> {
    let mask = ((1u16 << bits) - 1) as u8;
    (0..=255u8).flat_map(|b| (0..8 / bits).map(move |k| b >> (bits * k) & mask)).map(value).collect()
}

/// `field` of each code, `bits` wide, packed `8 / bits` a byte side by side, lowest first (the
/// order [`byte_table`] reads).
fn side_by_side(codes: &[u8], bits: usize, field: impl Fn(u8) -> u8) -> impl Iterator<Item = u8> {
    codes.chunks_exact(8 / bits).map(move |c| c.iter().enumerate().fold(0u8, |byte, (k, &q)| byte | field(q) << (bits * k)))
}

/// A block's bits split into the planes of a [`GgmlWeight`].
#[derive(Default)]
struct Planes {
    codes: Vec<u8>,
    high_bits: Vec<u8>,
    scales: Vec<half::f16>,
    mins: Vec<half::f16>,
    sub_scales: Vec<u8>,
    sub_mins: Vec<u8>,
    /// One block's codes in value order.
    block: Vec<u8>,
}

impl Planes {
    fn push_block(&mut self, kind: GgmlType, b: &[u8]) {
        self.block.clear();
        // A lattice block as 4-bit codes of its grid levels and signs, with sub-block scales.
        let lattice_d = kind.lattice().is_some().then(|| lattice::split(kind, b, &mut self.block, &mut self.sub_scales));
        if lattice_d.is_none() {
            block_codes(kind, b, &mut self.block);
        }
        let layout = Layout::of(kind);
        match layout.per_byte {
            // Q4_0's order in each group: value j in the low nibble of byte j, j + group/2 high.
            2 => {
                for run in self.block.chunks_exact(layout.group) {
                    let half = layout.group / 2;
                    self.codes.extend((0..half).map(|j| run[j] & 0x0f | (run[j + half] & 0x0f) << 4));
                }
            }
            4 => self.codes.extend(side_by_side(&self.block, 2, |q| q)),
            8 => self.codes.extend(side_by_side(&self.block, 1, |q| q)),
            _ => self.codes.extend_from_slice(&self.block),
        }
        if layout.high_bits > 0 {
            self.high_bits.extend(side_by_side(&self.block, layout.high_bits, |q| q >> 4));
        }
        if let Some(d) = lattice_d {
            self.scales.push(d);
            return;
        }
        let half_at = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]);
        match kind {
            GgmlType::Q6_K => {
                self.sub_scales.extend_from_slice(&b[192..208]);
                self.scales.push(half_at(208));
            }
            GgmlType::Q2_K => {
                self.sub_scales.extend(b[..16].iter().map(|sc| sc & 0x0f));
                self.sub_mins.extend(b[..16].iter().map(|sc| sc >> 4));
                self.scales.push(half_at(80));
                self.mins.push(half_at(82));
            }
            GgmlType::Q3_K => {
                self.sub_scales.extend((0..16).map(|sub| q3_k_scale(&b[96..108], sub) as u8));
                self.scales.push(half_at(108));
            }
            GgmlType::IQ4_XS => {
                self.sub_scales.extend((0..8).map(|sub| iq4_xs_scale(b, sub) as u8));
                self.scales.push(half_at(0));
            }
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => self.scales.push(half_at(b.len() - 2)),
            GgmlType::MXFP4 => self.sub_scales.push(b[0]),
            GgmlType::NVFP4 => self.sub_scales.extend_from_slice(&b[..4]),
            _ => {
                self.scales.push(half_at(0));
                if layout.mins {
                    self.mins.push(half_at(2));
                }
                if matches!(kind, GgmlType::Q4_K | GgmlType::Q5_K) {
                    for sub in 0..8 {
                        let (sc, m) = k_scale_min(&b[4..16], sub);
                        self.sub_scales.push(sc);
                        self.sub_mins.push(m);
                    }
                }
            }
        }
    }
}

impl GgmlWeight {
    /// Whether ember trains on `kind`'s blocks (the float types load dense).
    pub fn reads(kind: GgmlType) -> bool {
        kind.quantized()
    }

    /// Bytes a value of `kind` takes in memory: its code and its share of the scales.
    pub fn bytes_per_value(kind: GgmlType) -> f64 {
        let layout = Layout::of(kind);
        let code = 1.0 / layout.per_byte as f64 + layout.high_bits as f64 / 8.0;
        let f16s = if layout.mins { 2.0 } else { 1.0 };
        let per_block = if layout.block_scales { 2.0 * f16s / layout.block as f64 } else { 0.0 };
        // A K-quant sub-block's scale byte (and minimum byte).
        let per_group = if layout.sub_blocks() { f16s / layout.group as f64 } else { 0.0 };
        code + per_block + per_group
    }

    /// The blocks of `hf` (a quantized projection) split into planes, rows in HF order.
    pub fn from_gguf(file: &GgufFile, hf: &HfTensor, device: &Device) -> Result<Self, LoadError> {
        let &[out, inp] = hf.tensor.shape.as_slice() else {
            return Err(LoadError::Invalid { path: file.metadata.path.clone(), reason: format!("GGUF tensor '{}' is not a matrix", hf.tensor.name) });
        };
        Ok(Self { tensor_scale: hf.scale, ..Self::from_blocks(hf.tensor.ggml_type, file.data(hf.tensor), [out, inp], hf.unpermute_heads, device) })
    }

    /// `bytes`, ggml blocks of `kind` holding a `[out, in]` weight (checked by the GGUF reader),
    /// split into planes; with `unpermute_heads`, q/k rows are put back in HF order.
    fn from_blocks(kind: GgmlType, bytes: &[u8], [out, inp]: [usize; 2], unpermute_heads: Option<usize>, device: &Device) -> Self {
        let mut planes = Planes::default();
        for block in bytes.chunks_exact(kind.block_bytes()) {
            planes.push_block(kind, block);
        }
        if let Some(heads) = unpermute_heads {
            // A row is whole blocks, so un-permuting rows moves each plane's rows as they are.
            fn rows<T: Copy + Default>(plane: &mut Vec<T>, out: usize, heads: usize) {
                if !plane.is_empty() {
                    *plane = unpermute_rows(plane, out, plane.len() / out, heads);
                }
            }
            rows(&mut planes.codes, out, heads);
            rows(&mut planes.high_bits, out, heads);
            rows(&mut planes.scales, out, heads);
            rows(&mut planes.mins, out, heads);
            rows(&mut planes.sub_scales, out, heads);
            rows(&mut planes.sub_mins, out, heads);
        }
        let bytes = |plane: Vec<u8>| (!plane.is_empty()).then(|| u8_tensor(plane, device));
        Self {
            codes: u8_tensor(planes.codes, device),
            high_bits: bytes(planes.high_bits),
            scales: (!planes.scales.is_empty()).then(|| f16_tensor(planes.scales, device)),
            mins: (!planes.mins.is_empty()).then(|| f16_tensor(planes.mins, device)),
            sub_scales: bytes(planes.sub_scales),
            sub_mins: bytes(planes.sub_mins),
            shape: [out, inp],
            kind,
            tensor_scale: None,
        }
    }

    /// The f32 weight `[out, in]`, each value as ggml dequantizes it.
    pub fn dequantize(&self) -> Tensor<2> {
        self.dequantize_rows(0..self.shape[0], DType::F32)
    }

    /// Rows `rows` of the weight in `dtype` (a row is whole blocks; each value computed in f32,
    /// rounded once). Each byte looks up the values it stands for in a 256-row table, so the codes
    /// are never unpacked.
    pub fn dequantize_rows(&self, rows: Range<usize>, dtype: DType) -> Tensor<2> {
        let shape = [rows.len(), self.shape[1]];
        let layout = Layout::of(self.kind);
        let values = rows.start * self.shape[1]..rows.end * self.shape[1];
        let groups = values.start / layout.group..values.end / layout.group;
        let blocks = values.start / layout.block..values.end / layout.block;
        let codes = self.codes.clone().slice(groups.start * layout.code_bytes()..groups.end * layout.code_bytes());
        let (table, packing) = (layout.table(self.kind), layout.packing());
        let high = self.high_bits.as_ref().map(|h| h.clone().slice(groups.start * layout.high_bytes()..groups.end * layout.high_bytes()));
        let per_block = |t: &Tensor<1>| t.clone().slice(blocks.clone()).cast(DType::F32);
        let mut mins = self.mins.as_ref().map(per_block);
        let scales = match &self.sub_scales {
            Some(sub_scales) => {
                // K-quants: `d·sc` and `−dmin·m` per sub-block, each product in f32 as ggml's.
                let spread = |t: Tensor<1>| t.reshape([blocks.len(), 1]).repeat_dim(1, layout.block / layout.group).reshape([groups.len()]);
                let sub = |t: &Tensor<1, Int>, table: Vec<f32>| lookup_bytes(&t.clone().slice(groups.clone()), table).reshape([groups.len()]);
                mins = mins.zip(self.sub_mins.as_ref()).map(|(dmin, m)| (spread(dmin) * sub(m, byte_values(|b| b as f32))).neg());
                let sub_scales = sub(sub_scales, self.sub_scale_table());
                match &self.scales {
                    Some(d) => spread(per_block(d)) * sub_scales,
                    None => sub_scales,
                }
            }
            None => per_block(self.scales.as_ref().expect("a type without sub-block scales has block scales")),
        };
        let band = PackedBand { bytes: &codes, table: &table, high: high.as_ref().map(|h| (h, layout.high_bits)), scales: &scales, mins: mins.as_ref(), shape, packing };
        if let Some(values) = crate::fused::lookup_and_scale(&band, dtype) {
            return values;
        }
        let n = groups.len();
        let q = lookup_bytes(&codes, table);
        let q = match packing {
            // [n·group/2, 2] (low, high) -> [n, 2, group/2]: the low nibbles are the first half.
            Packing::SplitHalves => q.reshape([n, layout.group / 2, 2]).swap_dims(1, 2).reshape([n, layout.group]),
            Packing::Adjacent => q.reshape([n, layout.group]),
        };
        let q = match high {
            Some(high) => q + lookup_bytes(&high, layout.high_table()).reshape([n, layout.group]),
            None => q,
        };
        let values = match mins {
            Some(mins) => q * scales.reshape([n, 1]) + mins.reshape([n, 1]),
            None => q * scales.reshape([n, 1]),
        };
        values.reshape(shape).cast(dtype)
    }

    /// What each byte of `sub_scales` stands for.
    fn sub_scale_table(&self) -> Vec<f32> {
        match self.kind {
            GgmlType::Q3_K | GgmlType::Q6_K | GgmlType::IQ4_XS => byte_values(|b| b as i8 as f32),
            GgmlType::MXFP4 => byte_values(e8m0_half),
            GgmlType::NVFP4 => byte_values(|b| nvfp4_scale(b, self.tensor_scale)),
            _ => byte_values(|b| b as f32),
        }
    }
}

/// `value` of every byte, for a 256-row lookup.
fn byte_values(value: impl Fn(u8) -> f32) -> Vec<f32> {
    (0..=255u8).map(value).collect()
}

fn f16_tensor(values: Vec<half::f16>, device: &Device) -> Tensor<1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize_scaled;

    /// Blocks of every type with varied scales, minimums and codes, dequantized on the device,
    /// equal the GGUF reader's host dequantization (ggml's formulas) bit for bit, also with q/k
    /// rows un-permuted, and a band in bf16 its values rounded once: by the fused lookup (plain
    /// flex) and by burn ops (under autodiff).
    #[test]
    fn dequantizes_as_ggml_and_unpermutes_rows() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            dequantizes_as_ggml_on(&device);
        }
    }

    /// The same by LibTorch's lookup (plain LibTorch).
    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn dequantizes_as_ggml_on_libtorch() {
        dequantizes_as_ggml_on(&Device::libtorch());
    }

    fn dequantizes_as_ggml_on(device: &Device) {
        let [out, inp] = [8, 512];
        for kind in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
            GgmlType::IQ3_XXS,
            GgmlType::IQ3_S,
            GgmlType::IQ2_XXS,
            GgmlType::IQ2_XS,
            GgmlType::IQ2_S,
            GgmlType::IQ1_S,
            GgmlType::IQ1_M,
            GgmlType::Q1_0,
            GgmlType::Q2_0,
            GgmlType::TQ1_0,
            GgmlType::TQ2_0,
            GgmlType::MXFP4,
            GgmlType::NVFP4,
        ] {
            let bytes = blocks(kind, out * inp);
            // NVFP4 also with a per-tensor scale, folded into its sub-block scales.
            let tensor_scale = (kind == GgmlType::NVFP4).then_some(0.0137);
            let host = dequantize_scaled(kind, &bytes, tensor_scale);
            for heads in [None, Some(2)] {
                let weight = GgmlWeight { tensor_scale, ..GgmlWeight::from_blocks(kind, &bytes, [out, inp], heads, device) };
                let expected = match heads {
                    Some(h) => unpermute_rows(&host, out, inp, h),
                    None => host.clone(),
                };
                let ours = weight.dequantize().into_data().try_to_vec::<f32>().unwrap();
                assert!(ours.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} heads {heads:?}");
                let band = weight.dequantize_rows(3..6, DType::F32).into_data().try_to_vec::<f32>().unwrap();
                assert!(band.iter().zip(&expected[3 * inp..6 * inp]).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} heads {heads:?}, rows 3..6");
                let bf16 = weight.dequantize_rows(3..6, DType::BF16).into_data().convert::<half::bf16>().try_to_vec::<half::bf16>().unwrap();
                assert!(bf16.iter().zip(&expected[3 * inp..6 * inp]).all(|(a, &b)| *a == half::bf16::from_f32(b)), "{kind:?} heads {heads:?}, bf16");
            }
        }
    }

    /// `values` worth of `kind` blocks: every byte varied, the f16 fields set to finite scales of
    /// both signs (for a minimum) and sizes.
    fn blocks(kind: GgmlType, values: usize) -> Vec<u8> {
        let (per_block, block_bytes) = (kind.block().0 as usize, kind.block_bytes());
        let halves: &[usize] = match kind {
            GgmlType::IQ1_M | GgmlType::MXFP4 | GgmlType::NVFP4 => &[],
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::IQ4_NL | GgmlType::IQ4_XS | GgmlType::Q1_0 | GgmlType::Q2_0 => &[0],
            GgmlType::TQ1_0 => &[52],
            GgmlType::TQ2_0 => &[64],
            kind if kind.lattice().is_some() => &[0],
            GgmlType::Q6_K => &[208],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            _ => &[0, 2],
        };
        (0..values / per_block)
            .flat_map(|b| {
                let mut block: Vec<u8> = (0..block_bytes).map(|j| (j * 37 + b * 11 + j * j / 7) as u8).collect();
                for (i, &at) in halves.iter().enumerate() {
                    let value = if i == 0 { 0.013 * (b as f32 + 1.0) } else { -0.07 * b as f32 + 0.02 };
                    block[at..at + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
                }
                if kind == GgmlType::IQ1_M {
                    // Its f16 `d` is the top nibbles of the four u16 scales at byte 48.
                    let d = half::f16::from_f32(0.013 * (b as f32 + 1.0)).to_bits();
                    for i in 0..4 {
                        block[49 + 2 * i] = block[49 + 2 * i] & 0x0f | ((d >> (4 * i)) as u8 & 0x0f) << 4;
                    }
                }
                block
            })
            .collect()
    }

    #[test]
    fn memory_per_value_counts_codes_and_scales() {
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q4_0), 0.5 + 2.0 / 32.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q4_K), 0.5 + 4.0 / 256.0 + 2.0 / 32.0);
        // 5- and 6-bit codes: a nibble plus one or two bits in the high plane. Q6_K as in the file.
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q6_K), 0.5 + 0.25 + 2.0 / 256.0 + 1.0 / 16.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q6_K), GgmlType::Q6_K.block_bytes() as f64 / 256.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q5_K), 0.5 + 0.125 + 4.0 / 256.0 + 2.0 / 32.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q5_0), 0.5 + 0.125 + 2.0 / 32.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q2_K), 0.25 + 4.0 / 256.0 + 2.0 / 16.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q3_K), 0.5 + 2.0 / 256.0 + 1.0 / 16.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::IQ4_XS), 0.5 + 2.0 / 256.0 + 1.0 / 32.0);
        // Lattice types as 4-bit codes, a scale byte per 32 (IQ3, IQ2_XXS, IQ1_S) or 16 values.
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::IQ3_S), 0.5 + 2.0 / 256.0 + 1.0 / 32.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::IQ2_XS), 0.5 + 2.0 / 256.0 + 1.0 / 16.0);
        // Q1_0's signs eight a byte; Q2_0's codes and the ternary types' trits four a byte.
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q1_0), GgmlType::Q1_0.block_bytes() as f64 / 128.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::Q2_0), GgmlType::Q2_0.block_bytes() as f64 / 64.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::TQ2_0), GgmlType::TQ2_0.block_bytes() as f64 / 256.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::TQ1_0), 0.25 + 2.0 / 256.0);
        // MXFP4 and NVFP4 as their files: codes two a byte, an 8-bit scale per 32 or 16 values.
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::MXFP4), GgmlType::MXFP4.block_bytes() as f64 / 32.0);
        assert_eq!(GgmlWeight::bytes_per_value(GgmlType::NVFP4), GgmlType::NVFP4.block_bytes() as f64 / 64.0);
    }
}
