//! A frozen weight kept in a GGUF file's quantized blocks (Q4_0, Q4_1, Q8_0), so that a model is
//! fine-tuned on the very file llama.cpp runs: the blocks' bits are kept as they are, split into
//! a plane of codes and planes of f16 scales (and minimums), and dequantized one projection at a
//! time in the forward pass, as ggml computes it.
//!
//! Layouts (ggml-quants.c), blocks of 32 consecutive values of a row:
//! - Q8_0: f16 `d`, 32 i8 `q`; value `q·d`.
//! - Q4_0: f16 `d`, 16 bytes; element `j` in the low nibble of byte `j`, element `j + 16` in its
//!   high nibble; value `(q − 8)·d`.
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes as Q4_0; value `q·d + m`.

use std::ops::Range;

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::fused::kernels::Packing;
use crate::gguf::{GgmlType, GgufFile, HfTensor, unpermute_rows};
use crate::nf4::{lookup_bytes, u8_tensor};
use crate::LoadError;

/// Values per ggml block.
pub const BLOCK: usize = 32;

/// A GGUF-quantized frozen weight `[out, in]`.
#[derive(Module, Debug)]
pub struct GgmlWeight {
    /// Q4: two codes a byte, `[out · in / 2]`; Q8_0: one i8 a byte, `[out · in]` (u8).
    pub codes: Tensor<1, Int>,
    /// One f16 scale `d` per block, `[out · in / 32]`.
    pub scales: Tensor<1>,
    /// Q4_1's f16 minimum per block.
    pub mins: Option<Tensor<1>>,
    pub shape: [usize; 2],
    #[module(skip)]
    pub kind: GgmlType,
}

/// A block's bytes of scales (and minimum) before its codes, and its bytes of codes.
fn block_layout(kind: GgmlType) -> (usize, usize) {
    match kind {
        GgmlType::Q8_0 => (2, 32),
        GgmlType::Q4_0 => (2, 16),
        GgmlType::Q4_1 => (4, 16),
        other => unreachable!("{other:?} blocks are read only when GgmlWeight::reads them"),
    }
}

impl GgmlWeight {
    /// Whether ember trains on `kind`'s blocks as they are.
    pub fn reads(kind: GgmlType) -> bool {
        matches!(kind, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    /// The blocks of `hf` (a quantized projection) split into planes, rows in HF order.
    pub fn from_gguf(file: &GgufFile, hf: &HfTensor, device: &Device) -> Result<Self, LoadError> {
        let &[out, inp] = hf.tensor.shape.as_slice() else {
            return Err(LoadError::Invalid { path: file.metadata.path.clone(), reason: format!("GGUF tensor '{}' is not a matrix", hf.tensor.name) });
        };
        Ok(Self::from_blocks(hf.tensor.ggml_type, file.data(hf.tensor), [out, inp], hf.unpermute_heads, device))
    }

    /// `bytes`, ggml blocks of `kind` holding a `[out, in]` weight (checked by the GGUF reader),
    /// split into planes; with `unpermute_heads`, q/k rows are put back in HF order.
    fn from_blocks(kind: GgmlType, bytes: &[u8], [out, inp]: [usize; 2], unpermute_heads: Option<usize>, device: &Device) -> Self {
        let (header, code_bytes) = block_layout(kind);
        let blocks = bytes.len() / (header + code_bytes);
        let mut codes = Vec::with_capacity(blocks * code_bytes);
        let mut scales = Vec::with_capacity(blocks);
        let mut mins = Vec::with_capacity(if kind == GgmlType::Q4_1 { blocks } else { 0 });
        for block in bytes.chunks_exact(header + code_bytes) {
            scales.push(half::f16::from_le_bytes([block[0], block[1]]));
            if kind == GgmlType::Q4_1 {
                mins.push(half::f16::from_le_bytes([block[2], block[3]]));
            }
            codes.extend_from_slice(&block[header..]);
        }
        if let Some(heads) = unpermute_heads {
            // A row is whole blocks, so un-permuting rows moves each plane's rows as they are.
            let blocks_per_row = inp / BLOCK;
            codes = unpermute_rows(&codes, out, blocks_per_row * code_bytes, heads);
            scales = unpermute_rows(&scales, out, blocks_per_row, heads);
            if !mins.is_empty() {
                mins = unpermute_rows(&mins, out, blocks_per_row, heads);
            }
        }
        Self {
            codes: u8_tensor(codes, device),
            scales: f16_tensor(scales, device),
            mins: (kind == GgmlType::Q4_1).then(|| f16_tensor(mins, device)),
            shape: [out, inp],
            kind,
        }
    }

    /// The f32 weight `[out, in]`, each value as ggml dequantizes it.
    pub fn dequantize(&self) -> Tensor<2> {
        self.dequantize_rows(0..self.shape[0])
    }

    /// Rows `rows` of the f32 weight (a row is whole blocks). Each byte looks up the values it
    /// stands for in a 256-row table, so the codes are never unpacked.
    pub fn dequantize_rows(&self, rows: Range<usize>) -> Tensor<2> {
        let shape = [rows.len(), self.shape[1]];
        let blocks_per_row = self.shape[1] / BLOCK;
        let code_bytes = block_layout(self.kind).1;
        let block_range = rows.start * blocks_per_row..rows.end * blocks_per_row;
        let blocks = block_range.len();
        let codes = self.codes.clone().slice(block_range.start * code_bytes..block_range.end * code_bytes);
        let (table, packing): (Vec<f32>, _) = match self.kind {
            GgmlType::Q8_0 => ((0..=255u8).map(|b| b as i8 as f32).collect(), Packing::Adjacent),
            _ => {
                let offset = if self.kind == GgmlType::Q4_0 { 8 } else { 0 };
                ((0..256i32).flat_map(|b| [(b & 0xF) - offset, (b >> 4) - offset]).map(|q| q as f32).collect(), Packing::SplitHalves)
            }
        };
        let plane = |t: &Tensor<1>| t.clone().slice(block_range.clone()).cast(DType::F32);
        let (scales, mins) = (plane(&self.scales), self.mins.as_ref().map(plane));
        if let Some(values) = crate::fused::lookup_and_scale(&codes, &table, &scales, mins.as_ref(), shape, packing) {
            return values;
        }
        let d = scales.reshape([blocks, 1]);
        let lookup = |table: Vec<f32>| lookup_bytes(&codes, table);
        let values = match self.kind {
            GgmlType::Q8_0 => lookup(table).reshape([blocks, BLOCK]) * d,
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                // [blocks·16, 2] (low, high) -> [blocks, 2, 16]: the low nibbles are elements 0..16.
                let q = lookup(table).reshape([blocks, BLOCK / 2, 2]).swap_dims(1, 2).reshape([blocks, BLOCK]);
                match mins {
                    Some(mins) => q * d + mins.reshape([blocks, 1]),
                    None => q * d,
                }
            }
            other => unreachable!("{other:?} is not stored as a GgmlWeight"),
        };
        values.reshape(shape)
    }
}

fn f16_tensor(values: Vec<half::f16>, device: &Device) -> Tensor<1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    /// Blocks of every type with varied scales, minimums and codes, dequantized on the device,
    /// equal the GGUF reader's host dequantization (ggml's formulas) bit for bit, also with q/k
    /// rows un-permuted: by the fused lookup (plain flex) and by burn ops (under autodiff).
    #[test]
    fn dequantizes_as_ggml_and_unpermutes_rows() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            dequantizes_as_ggml_on(&device);
        }
    }

    fn dequantizes_as_ggml_on(device: &Device) {
        let [out, inp] = [8, 64];
        for kind in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (header, code_bytes) = block_layout(kind);
            let blocks = out * inp / BLOCK;
            let bytes: Vec<u8> = (0..blocks)
                .flat_map(|b| {
                    let d = half::f16::from_f32(0.013 * (b as f32 + 1.0)).to_le_bytes();
                    let m = half::f16::from_f32(-0.07 * b as f32).to_le_bytes();
                    let header_bytes: Vec<u8> = if header == 4 { [d, m].concat() } else { d.to_vec() };
                    header_bytes.into_iter().chain((0..code_bytes).map(move |j| (j * 37 + b * 11) as u8))
                })
                .collect();
            let host = dequantize(kind, &bytes);
            for heads in [None, Some(2)] {
                let weight = GgmlWeight::from_blocks(kind, &bytes, [out, inp], heads, device);
                let expected = match heads {
                    Some(h) => unpermute_rows(&host, out, inp, h),
                    None => host.clone(),
                };
                let ours = weight.dequantize().into_data().try_to_vec::<f32>().unwrap();
                assert!(ours.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} heads {heads:?}");
                let band = weight.dequantize_rows(3..6).into_data().try_to_vec::<f32>().unwrap();
                assert!(band.iter().zip(&expected[3 * inp..6 * inp]).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} heads {heads:?}, rows 3..6");
            }
        }
    }
}
