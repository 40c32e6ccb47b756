//! bitsandbytes' NF4 (QLoRA's 4-bit NormalFloat), so a frozen base takes 4.5 bits a weight (4.1
//! with double quantization) and never exists in full precision: weights are quantized tensor by
//! tensor while loading and dequantized one projection at a time in the forward pass.
//!
//! Layout, as `bitsandbytes.functional.quantize_4bit` (blocksize 64, uint8 storage): the weight
//! `[out, in]` is flattened row-major into blocks of 64 consecutive values (a block may straddle
//! rows); each block keeps its absolute maximum in f32 and each value the index of the nearest
//! NF4 code to `w / absmax`, two a byte, the first in the high nibble. Double quantization stores
//! the absmax values themselves in 8 bits: minus their mean, in blocks of 256 with an f32 scale
//! each, as indices into bitsandbytes' signed dynamic 8-bit map.

use std::ops::Range;
use std::sync::{Mutex, OnceLock, PoisonError};

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::fused::kernels::Packing;
use crate::fused::PackedBand;

/// Values per 4-bit block.
pub const BLOCK: usize = 64;
/// Absmax values per 8-bit block (double quantization).
pub const ABSMAX_BLOCK: usize = 256;

/// `bitsandbytes.functional.get_4bit_type("nf4")`, as f32 bits (index = 4-bit code).
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// `bitsandbytes.functional.create_dynamic_map(signed=True)`, ascending, as f32 bits: the 8-bit
/// codes of double-quantized absmax values.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

fn table<const N: usize>(bits: &[u32; N]) -> [f32; N] {
    bits.map(f32::from_bits)
}

/// The midpoints between neighbours of the ascending `codes`, computed in f32 as bitsandbytes does.
fn midpoints(codes: &[f32]) -> Vec<f32> {
    codes.windows(2).map(|pair| (pair[0] + pair[1]) / 2.0).collect()
}

/// The index of the nearest code: the number of `midpoints` strictly below `x`, as
/// `torch.bucketize` (a value on a midpoint takes the lower code).
fn nearest(midpoints: &[f32], x: f32) -> u8 {
    midpoints.partition_point(|&m| m < x) as u8
}

/// The 8-bit codes of `scaled` values in [−1, 1], as bitsandbytes' CPU `quantize_blockwise` picks
/// them (shared/fixtures/README.md, "Double quantization"): not a search for the nearest code but a
/// 65,536-step table over [−1, 1]. A value falls on step `⌊(v + 1)·0.5·65535 + 0.5⌋` (f32), whose
/// entry counts the midpoints below the step's left end, so near a midpoint the farther code can win.
fn dynamic_map_codes(scaled: &[f32]) -> Vec<u8> {
    const STEPS: u32 = 1 << 16;
    // Built once per process: a model quantizes hundreds of weights with it.
    static CODE_OF_STEP: OnceLock<Vec<u8>> = OnceLock::new();
    let steps = CODE_OF_STEP.get_or_init(|| {
        let map = midpoints(&table(&DYNAMIC_MAP_BITS));
        (0..STEPS)
            .map(|i| {
                let left = -1.0 + (2.0 * i as f32) / (STEPS - 1) as f32;
                map.partition_point(|&m| m < left) as u8
            })
            .collect()
    });
    scaled.iter().map(|&v| steps[((v + 1.0) * 0.5 * (STEPS - 1) as f32 + 0.5) as u16 as usize]).collect()
}

/// The f32 sum of `values` in the order of torch's single-threaded CPU `sum` (8-wide vectors, then
/// the remainder and the lanes one by one), so that double quantization's offset,
/// `torch.mean(absmax)`, matches to the last bit: it decides codes near a rounding boundary.
/// (On very large arrays torch splits the sum across threads; there the last bit may differ.)
fn torch_sum(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let vectors: Vec<[f32; LANES]> = values.chunks_exact(LANES).map(|c| c.try_into().expect("8 values")).collect();
    if vectors.is_empty() {
        let scalars: Vec<[f32; 1]> = values.iter().map(|&v| [v]).collect();
        return cascade_sum(&scalars)[0];
    }
    let lanes = cascade_sum(&vectors);
    values[vectors.len() * LANES..].iter().chain(&lanes).fold(0.0, |total, &v| total + v)
}

/// torch's `row_sum`: four accumulators over groups of four items, each accumulator a cascade
/// of four levels (a level is emptied into the next every `2^level_power` groups).
fn cascade_sum<const W: usize>(items: &[[f32; W]]) -> [f32; W] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let add = |a: [f32; W], b: [f32; W]| -> [f32; W] { std::array::from_fn(|i| a[i] + b[i]) };
    let groups = items.len() / ILP;
    let ceil_log2 = if groups <= 1 { 0 } else { (usize::BITS - (groups - 1).leading_zeros()) as usize };
    let level_power = 4.max(ceil_log2 / LEVELS);
    let (step, mask) = (1usize << level_power, (1usize << level_power) - 1);
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= groups {
        for _ in 0..step {
            for k in 0..ILP {
                acc[0][k] = add(acc[0][k], items[i * ILP + k]);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                acc[j][k] = add(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = [0.0; W];
            }
            if i & (mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for group in i..groups {
        for k in 0..ILP {
            acc[0][k] = add(acc[0][k], items[group * ILP + k]);
        }
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            acc[0][k] = add(acc[0][k], acc[j][k]);
        }
    }
    let mut partial = acc[0];
    for &item in &items[groups * ILP..] {
        partial[0] = add(partial[0], item);
    }
    (1..ILP).fold(partial[0], |total, k| add(total, partial[k]))
}

/// Per block of `block` values: the absolute maximum, and every value scaled by its reciprocal
/// and clamped to [−1, 1] (an f32 product with the reciprocal, as bitsandbytes computes it).
/// Blocks in parallel: quantizing while loading is host work (a 7B model's 6.5G values).
fn blockwise(values: &[f32], block: usize) -> (Vec<f32>, Vec<f32>) {
    let absmax: Vec<f32> = values.par_chunks(block).map(|chunk| chunk.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    let mut scaled = vec![0f32; values.len()];
    scaled.par_chunks_mut(block).zip(values.par_chunks(block)).zip(absmax.par_iter()).for_each(|((scaled, chunk), &max)| {
        let inverse = 1.0 / max;
        // An all-zero block has no scale: its values are the code 0.0.
        for (s, &v) in scaled.iter_mut().zip(chunk) {
            *s = if max == 0.0 { 0.0 } else { (v * inverse).clamp(-1.0, 1.0) };
        }
    });
    (absmax, scaled)
}

/// How a base's decoder projections are stored (recipe `model.quantize`). Embeddings, the LM
/// head and the norms stay in the checkpoint's precision, as transformers leaves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// bitsandbytes' NF4, optionally with double-quantized block scales.
    Nf4 { double_quant: bool },
    /// ember's 8-bit blocks ([`Int8Weight`]).
    Int8,
}

impl Quantization {
    /// From its recipe / command-line name (`none`, `nf4`, `int8`) and the double-quantization
    /// switch, which only NF4 has.
    pub fn from_name(name: &str, double_quant: bool) -> Result<Option<Self>, String> {
        let quantization = match name {
            "none" => None,
            "nf4" => Some(Quantization::Nf4 { double_quant }),
            "int8" => Some(Quantization::Int8),
            other => return Err(format!("'{other}' is not a quantization (none, nf4, int8)")),
        };
        if double_quant && !matches!(quantization, Some(Quantization::Nf4 { .. })) {
            return Err("double quantization needs nf4".into());
        }
        Ok(quantization)
    }

    /// Why an `[out, in]` weight cannot be stored this way, if it cannot.
    pub fn unfit(self, [out, inp]: [usize; 2]) -> Option<String> {
        ((out * inp) % BLOCK != 0).then(|| format!("quantization stores blocks of {BLOCK} values; this [{out}, {inp}] weight has {}", out * inp))
    }

    /// `weight` stored this way.
    pub fn store(self, weight: Tensor<2>) -> crate::layers::Weight {
        match self {
            Quantization::Nf4 { double_quant } => crate::layers::Weight::Nf4(Nf4Weight::from_tensor(weight, double_quant)),
            Quantization::Int8 => crate::layers::Weight::Int8(Int8Weight::from_tensor(weight)),
        }
    }
}

/// A block's absmax values, as stored.
#[derive(Module, Debug)]
pub enum Absmax {
    /// One f32 per block.
    Exact(Tensor<1>),
    Double(DoubleQuant),
}

/// Double-quantized absmax values: 8-bit codes `[blocks]`, one f32 scale per 256 blocks and
/// the mean that was subtracted.
#[derive(Module, Debug)]
pub struct DoubleQuant {
    pub codes: Tensor<1, Int>,
    pub scales: Tensor<1>,
    pub offset: f32,
}

/// An NF4-quantized frozen weight `[out, in]`.
#[derive(Module, Debug)]
pub struct Nf4Weight {
    /// Two 4-bit codes a byte, `[out · in / 2]` (u8).
    pub packed: Tensor<1, Int>,
    pub absmax: Absmax,
    pub shape: [usize; 2],
}

impl Nf4Weight {
    /// Quantizes `values` (`[out, in]` row-major, f32) on the host.
    pub fn quantize(values: &[f32], shape: [usize; 2], double_quant: bool, device: &Device) -> Self {
        let n = shape[0] * shape[1];
        assert!(values.len() == n && n % BLOCK == 0, "NF4 needs [out, in] with out·in a multiple of {BLOCK} (checked by the loader)");
        let codes = midpoints(&table(&NF4_BITS));
        let (absmax, scaled) = blockwise(values, BLOCK);
        let packed: Vec<u8> = scaled.par_chunks(2).map(|pair| (nearest(&codes, pair[0]) << 4) | nearest(&codes, pair[1])).collect();
        let absmax = if double_quant {
            let offset = torch_sum(&absmax) / absmax.len() as f32;
            let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
            let (scales, scaled) = blockwise(&centred, ABSMAX_BLOCK);
            let codes = dynamic_map_codes(&scaled);
            Absmax::Double(DoubleQuant { codes: u8_tensor(codes, device), scales: f32_tensor(scales, device), offset })
        } else {
            Absmax::Exact(f32_tensor(absmax, device))
        };
        Self { packed: u8_tensor(packed, device), absmax, shape }
    }

    /// Quantizes a weight already on `weight`'s device (copied to the host once, then dropped by
    /// the caller), so that a model is quantized tensor by tensor while it loads.
    pub fn from_tensor(weight: Tensor<2>, double_quant: bool) -> Self {
        let (shape, device, values) = host_values(weight);
        Self::quantize(&values, shape, double_quant, &device)
    }

    /// The absmax of every block, f32 `[blocks]` (recovered from the 8-bit codes with double
    /// quantization: `map[code] · scale + offset`, an f32 multiply then add).
    pub fn block_absmax(&self) -> Tensor<1> {
        self.absmax_of(0..self.shape[0] * self.shape[1] / BLOCK)
    }

    /// The absmax of blocks `blocks`; with double quantization they start a group of 256.
    fn absmax_of(&self, blocks: Range<usize>) -> Tensor<1> {
        match &self.absmax {
            Absmax::Exact(absmax) => absmax.clone().slice(blocks),
            Absmax::Double(DoubleQuant { codes, scales, offset }) => {
                debug_assert_eq!(blocks.start % ABSMAX_BLOCK, 0, "bands start on a group of blocks");
                let len = blocks.len();
                let groups = len.div_ceil(ABSMAX_BLOCK);
                let first_group = blocks.start / ABSMAX_BLOCK;
                let device = codes.device();
                let map = uploaded_table(table(&DYNAMIC_MAP_BITS).to_vec(), &device).reshape([256]);
                let values = map.select(0, codes.clone().slice(blocks).cast(DType::I64));
                let scales = scales.clone().slice(first_group..first_group + groups).reshape([groups, 1]);
                let scaled = if len == groups * ABSMAX_BLOCK {
                    (values.reshape([groups, ABSMAX_BLOCK]) * scales).reshape([len])
                } else {
                    // Pad to whole groups of 256 so each group meets its scale by broadcasting.
                    let padded = Tensor::cat(vec![values, Tensor::zeros([groups * ABSMAX_BLOCK - len], &device)], 0);
                    (padded.reshape([groups, ABSMAX_BLOCK]) * scales).reshape([groups * ABSMAX_BLOCK]).narrow(0, 0, len)
                };
                scaled.add_scalar(*offset)
            }
        }
    }

    /// The f32 weight `[out, in]`: `code[q] · absmax[block]`.
    pub fn dequantize(&self) -> Tensor<2> {
        self.dequantize_rows(0..self.shape[0], DType::F32)
    }

    /// Rows `rows` of the weight in `dtype` (each value computed in f32, rounded once), `[rows,
    /// in]`, starting on a multiple of [`Self::align`] values. Each byte looks up its two values at
    /// once in a 256-row table (high nibble first), so the codes are never unpacked.
    pub fn dequantize_rows(&self, rows: Range<usize>, dtype: DType) -> Tensor<2> {
        let inp = self.shape[1];
        let values = rows.start * inp..rows.end * inp;
        let codes = table(&NF4_BITS);
        let pairs: Vec<f32> = (0..256).flat_map(|byte| [codes[byte >> 4], codes[byte & 0xF]]).collect();
        let bytes = self.packed.clone().slice(values.start / 2..values.end / 2);
        lookup_and_scale(&bytes, pairs, self.absmax_of(values.start / BLOCK..values.end / BLOCK), [rows.len(), inp], dtype)
    }

    /// Values of the flattened weight a band of rows starts on a multiple of: a block, or with
    /// double quantization a group of blocks sharing a scale.
    pub fn align(&self) -> usize {
        match self.absmax {
            Absmax::Exact(_) => BLOCK,
            Absmax::Double(_) => BLOCK * ABSMAX_BLOCK,
        }
    }

    /// Bytes this weight takes (packed codes and block scales).
    pub fn bytes(&self) -> usize {
        let n = self.shape[0] * self.shape[1];
        n / 2 + match &self.absmax {
            Absmax::Exact(_) => n / BLOCK * 4,
            Absmax::Double(double) => n / BLOCK + double.scales.dims()[0] * 4 + 4,
        }
    }
}

/// `weight`'s shape, device and values as f32 on the host (one copy, for quantizing it).
fn host_values(weight: Tensor<2>) -> ([usize; 2], Device, Vec<f32>) {
    let (shape, device) = (weight.dims(), weight.device());
    let values = weight.cast(DType::F32).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values");
    (shape, device, values)
}

/// The weight `[out, in]` in `dtype` from one byte a lookup: `table` has 256 rows of the values a
/// byte stands for (`per_byte` each), then every block of 64 values is scaled by its absmax.
fn lookup_and_scale(bytes: &Tensor<1, Int>, table: Vec<f32>, absmax: Tensor<1>, shape: [usize; 2], dtype: DType) -> Tensor<2> {
    let band = PackedBand { bytes, table: &table, high: None, scales: &absmax, mins: None, shape, packing: Packing::Adjacent };
    if let Some(values) = crate::fused::lookup_and_scale(&band, dtype) {
        return values;
    }
    let n = shape[0] * shape[1];
    let values = lookup_bytes(bytes, table).reshape([n / BLOCK, BLOCK]);
    (values * absmax.reshape([n / BLOCK, 1])).reshape(shape).cast(dtype)
}

/// `[bytes, per_byte]`: each byte's row of `table`, which has 256 rows of the values a byte
/// stands for.
pub(crate) fn lookup_bytes(bytes: &Tensor<1, Int>, table: Vec<f32>) -> Tensor<2> {
    uploaded_table(table, &bytes.device()).select(0, bytes.clone().cast(DType::I64))
}

/// `values` as a `[256, values / 256]` table on `device`'s plain side, uploaded once: the same few
/// tables serve every product, and on a GPU every upload waits for the queue to drain.
pub(crate) fn uploaded_table(values: Vec<f32>, device: &Device) -> Tensor<2> {
    static TABLES: Mutex<Vec<(Vec<f32>, Device, Tensor<2>)>> = Mutex::new(Vec::new());
    let device = device.clone().inner();
    let mut tables = TABLES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, _, table)) = tables.iter().find(|(v, d, _)| *d == device && *v == values) {
        return table.clone();
    }
    let per_byte = values.len() / 256;
    let table = Tensor::<2>::from_data(TensorData::new(values.clone(), [256, per_byte]), &device);
    tables.push((values, device, table.clone()));
    table
}

/// Storage per quantized value: the code plus its share of the block scales.
pub fn bytes_per_value(quantization: Quantization) -> f64 {
    match quantization {
        Quantization::Nf4 { double_quant: true } => 0.5 + 1.0 / BLOCK as f64 + 4.0 / (BLOCK * ABSMAX_BLOCK) as f64,
        Quantization::Nf4 { double_quant: false } => 0.5 + 4.0 / BLOCK as f64,
        Quantization::Int8 => 1.0 + 4.0 / BLOCK as f64,
    }
}

/// An 8-bit frozen weight `[out, in]` (ember's format, `model.quantize = "int8"`): per block of
/// 64 consecutive values of the flattened weight, its absmax in f32 and each value as
/// `round(127 · w / absmax)` in i8 (stored as its u8 bits). The error is at most half a step,
/// `absmax / 254` per value, below 0.4% of the block's largest magnitude.
#[derive(Module, Debug)]
pub struct Int8Weight {
    /// One code a byte, `[out · in]` (u8 holding i8 bits).
    pub codes: Tensor<1, Int>,
    pub absmax: Tensor<1>,
    pub shape: [usize; 2],
}

impl Int8Weight {
    pub fn from_tensor(weight: Tensor<2>) -> Self {
        let (shape, device, values) = host_values(weight);
        let (absmax, scaled) = blockwise(&values, BLOCK);
        let codes: Vec<u8> = scaled.par_iter().map(|&v| (v * 127.0).round() as i8 as u8).collect();
        Self { codes: u8_tensor(codes, &device), absmax: f32_tensor(absmax, &device), shape }
    }

    /// The f32 weight `[out, in]`: `i8(code) / 127 · absmax[block]`.
    pub fn dequantize(&self) -> Tensor<2> {
        self.dequantize_rows(0..self.shape[0], DType::F32)
    }

    /// Rows `rows` of the weight in `dtype`, starting on a whole block; each byte looked up in a
    /// 256-entry table.
    pub fn dequantize_rows(&self, rows: Range<usize>, dtype: DType) -> Tensor<2> {
        let inp = self.shape[1];
        let values = rows.start * inp..rows.end * inp;
        let steps: Vec<f32> = (0..=255u8).map(|byte| byte as i8 as f32 / 127.0).collect();
        let absmax = self.absmax.clone().slice(values.start / BLOCK..values.end / BLOCK);
        lookup_and_scale(&self.codes.clone().slice(values), steps, absmax, [rows.len(), inp], dtype)
    }
}

/// Bytes as a u8 tensor (without the dtype, burn would widen them to the default int, i64).
pub(crate) fn u8_tensor(values: Vec<u8>, device: &Device) -> Tensor<1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::U8))
}

fn f32_tensor(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README example: W[0, 0:2] = (−0.09978, −0.18361) in a block of absmax 0.358009
    /// quantizes to byte 0x42 and dequantizes to code · absmax.
    #[test]
    fn quantizes_and_dequantizes_as_bitsandbytes() {
        let device = Device::flex();
        let mut values = vec![0.0f32; BLOCK];
        values[0] = -0.09978;
        values[1] = -0.18361;
        values[2] = 0.358009;
        let weight = Nf4Weight::quantize(&values, [1, BLOCK], false, &device);
        let packed = weight.packed.clone().into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        assert_eq!(packed[0], 0x42);
        let codes = table(&NF4_BITS);
        let deq = weight.dequantize().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(deq[0], codes[4] * 0.358009);
        assert_eq!(deq[1], codes[2] * 0.358009);
        assert_eq!(deq[2], 0.358009);
        assert_eq!(deq[3], 0.0);
    }

    /// torch.sum's bits (torch 2.11, one thread), where a plain sequential or f64 sum differs.
    #[test]
    fn sums_in_torch_order() {
        for (n, bits) in [(7, 0x403ad288u32), (64, 0x42009d49), (1000, 0x43ff399a), (70000, 0x470b7380)] {
            let values: Vec<f32> = (0..n).map(|i| ((i as f64 * 0.7071) % 1.0) as f32 + 0.01f32).collect();
            assert_eq!(torch_sum(&values).to_bits(), bits, "n = {n}");
        }
    }

    /// int8 keeps every value within half a step of the block's scale.
    #[test]
    fn int8_error_is_at_most_half_a_step() {
        let device = Device::flex();
        let values: Vec<f32> = (0..BLOCK * 50).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / BLOCK) as f32)).collect();
        let weight = Int8Weight::from_tensor(Tensor::<2>::from_data(TensorData::new(values.clone(), [50, BLOCK]), &device));
        let deq = weight.dequantize().into_data().try_to_vec::<f32>().unwrap();
        for (block, (v, d)) in values.chunks(BLOCK).zip(deq.chunks(BLOCK)).enumerate() {
            let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = v.iter().zip(d).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= absmax / 254.0 * 1.0001, "block {block}: {worst} > {}", absmax / 254.0);
        }
    }

    /// A band of rows on the weight's alignment dequantizes to those rows of the whole weight,
    /// bit for bit, and in bf16 to their values rounded once: with exact and double-quantized
    /// absmax (a last group of 128 blocks only), int8, fused (plain flex) and composed (autodiff).
    #[test]
    fn bands_of_rows_dequantize_as_the_whole_weight() {
        for device in [Device::flex(), Device::flex().autodiff()] {
            bands_of_rows_dequantize_as_the_whole_weight_on(&device);
        }
    }

    /// The same by LibTorch's lookup (plain LibTorch), also equal to flex's values.
    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn bands_of_rows_dequantize_as_the_whole_weight_on_libtorch() {
        let device = Device::libtorch();
        let libtorch = bands_of_rows_dequantize_as_the_whole_weight_on(&device);
        assert_eq!(libtorch, bands_of_rows_dequantize_as_the_whole_weight_on(&Device::flex()));
        let bytes = u8_tensor(vec![0x42; 32], &device);
        let scales = f32_tensor(vec![2.0], &device);
        let band = PackedBand { bytes: &bytes, table: &[0.5; 512], high: None, scales: &scales, mins: None, shape: [1, 64], packing: Packing::Adjacent };
        let lookup = crate::fused::lookup_and_scale(&band, DType::BF16);
        assert!(lookup.is_some_and(|t| t.dtype() == DType::BF16), "LibTorch's own lookup, not the composition");
    }

    /// The whole weights' values: NF4 without and with double quantization, int8.
    fn bands_of_rows_dequantize_as_the_whole_weight_on(device: &Device) -> Vec<Vec<f32>> {
        let [out, inp] = [48, 512];
        let values: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / BLOCK) as f32 / 100.0)).collect();
        let f32s = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
        let rounded = |t: Tensor<2>| t.into_data().convert::<half::bf16>().try_to_vec::<half::bf16>().unwrap();
        let check = |band: &dyn Fn(Range<usize>, DType) -> Tensor<2>, whole: &[f32], r: Range<usize>, what: &str| {
            assert_eq!(f32s(band(r.clone(), DType::F32)), whole[r.start * inp..r.end * inp], "{what}, rows {r:?}");
            let expected: Vec<_> = whole[r.start * inp..r.end * inp].iter().map(|&v| half::bf16::from_f32(v)).collect();
            assert_eq!(rounded(band(r.clone(), DType::BF16)), expected, "{what} in bf16, rows {r:?}");
        };
        let mut wholes = Vec::new();
        for double_quant in [false, true] {
            let weight = Nf4Weight::quantize(&values, [out, inp], double_quant, device);
            let whole = f32s(weight.dequantize());
            let band = (weight.align() / inp).max(1);
            for r in [0..band, band..out] {
                check(&|r, dtype| weight.dequantize_rows(r, dtype), &whole, r, &format!("double quant {double_quant}"));
            }
            wholes.push(whole);
        }
        let int8 = Int8Weight::from_tensor(Tensor::<2>::from_data(TensorData::new(values.clone(), [out, inp]), device));
        let whole = f32s(int8.dequantize());
        check(&|r, dtype| int8.dequantize_rows(r, dtype), &whole, 5..9, "int8");
        wholes.push(whole);
        wholes
    }

    /// bitsandbytes 0.50.2's `quantize_blockwise` on the CPU (signed dynamic map, blocks of 256):
    /// values it codes one step away from the nearest code, with their block's absmax.
    #[test]
    fn double_quantization_codes_as_bitsandbytes_on_the_cpu() {
        let cases = [
            (0x3e6e011f_u32, 0x3e998ce0_u32, 238_u8),
            (0x3e39eb38, 0x3e99565d, 227),
            (0xbe3e6520, 0x3e9977b8, 26),
            (0x3c554441, 0x3e9853ba, 170),
            (0xbe8db873, 0x3e987006, 5),
            (0x3e8c2678, 0x3e991058, 248),
        ];
        let map = midpoints(&table(&DYNAMIC_MAP_BITS));
        for (value, absmax, expected) in cases {
            let scaled = (f32::from_bits(value) * (1.0 / f32::from_bits(absmax))).clamp(-1.0, 1.0);
            assert_eq!(dynamic_map_codes(&[scaled]), [expected], "{value:#x} / {absmax:#x}");
            assert_ne!(nearest(&map, scaled), expected, "{value:#x}: a case where the nearest code differs");
        }
    }

    /// Double quantization changes only the scales, by at most one step of the 8-bit map.
    #[test]
    fn double_quantization_keeps_the_codes() {
        let device = Device::flex();
        let values: Vec<f32> = (0..BLOCK * 300).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / BLOCK) as f32 / 300.0)).collect();
        let plain = Nf4Weight::quantize(&values, [300, BLOCK], false, &device);
        let double = Nf4Weight::quantize(&values, [300, BLOCK], true, &device);
        assert_eq!(plain.packed.clone().into_data(), double.packed.clone().into_data());
        let exact = plain.block_absmax().into_data().try_to_vec::<f32>().unwrap();
        let recovered = double.block_absmax().into_data().try_to_vec::<f32>().unwrap();
        for (e, r) in exact.iter().zip(&recovered) {
            assert!((e - r).abs() < 0.02 * e.abs().max(1e-3), "{e} vs {r}");
        }
        assert!(double.bytes() < plain.bytes());
    }
}
