//! Reading GGUF files (llama.cpp's format) and converting a `llama`, `qwen2`, `qwen3`, `chatglm`
//! or `glm4` GGUF into an HF model folder in the family's layout: config.json,
//! model.safetensors (f32), tokenizer.json and its config files.
//!
//! Every length and offset in the header is checked against the file before it is used, so a
//! truncated or lying file is an error, never a panic or a huge allocation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, View};
use serde_json::{Map, Value, json};

use ember_data::sentencepiece::{self, Affixes, ModelProto, ModelType, Piece, PieceType};
use ember_data::tiktoken::split_then_byte_level;
use ember_data::tokenizer::Flavour;

use crate::config::{Architecture, RopeScaling};
use crate::ggml_encode::lattice::{self, Grid};
use crate::family::{KeyLayout, Role};
use crate::{LoadError, glm, llama};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// Tensor element types this reader can dequantize (ggml type ids), under ggml's names.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    IQ2_XXS,
    IQ2_XS,
    IQ2_S,
    IQ3_XXS,
    IQ3_S,
    IQ1_S,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    Q1_0,
    Q2_0,
    MXFP4,
    NVFP4,
}

impl GgmlType {
    /// Every type with its ggml id (ggml.h's `ggml_type`): the one table readers and writers share.
    const IDS: [(Self, u32); 28] = [
        (Self::F32, 0), (Self::F16, 1), (Self::Q4_0, 2), (Self::Q4_1, 3), (Self::Q5_0, 6), (Self::Q5_1, 7),
        (Self::Q8_0, 8), (Self::Q2_K, 10), (Self::Q3_K, 11), (Self::Q4_K, 12), (Self::Q5_K, 13),
        (Self::Q6_K, 14), (Self::IQ2_XXS, 16), (Self::IQ2_XS, 17), (Self::IQ3_XXS, 18), (Self::IQ1_S, 19),
        (Self::IQ4_NL, 20), (Self::IQ3_S, 21), (Self::IQ2_S, 22), (Self::IQ4_XS, 23), (Self::IQ1_M, 29),
        (Self::BF16, 30), (Self::TQ1_0, 34), (Self::TQ2_0, 35), (Self::MXFP4, 39), (Self::NVFP4, 40), (Self::Q1_0, 41), (Self::Q2_0, 42),
    ];

    fn from_id(id: u32) -> Option<Self> {
        Self::IDS.iter().find(|&&(_, known)| known == id).map(|&(ty, _)| ty)
    }

    /// ggml's id of this type.
    pub(crate) fn id(self) -> u32 {
        Self::IDS.iter().find(|&&(ty, _)| ty == self).map(|&(_, id)| id).expect("every type is in IDS")
    }

    /// The types ember reads, by ggml's names: "F32, F16, …, IQ3_S".
    fn names() -> String {
        let names: Vec<String> = Self::IDS.iter().map(|&(_, id)| ggml_type_name(id).split(' ').next().unwrap_or_default().to_string()).collect();
        names.join(", ")
    }

    /// Bytes per block.
    pub(crate) fn block_bytes(self) -> usize {
        self.block().1 as usize
    }

    /// Whether values come in blocks with their scales (every type but the float ones).
    pub fn quantized(self) -> bool {
        self.block().0 > 1
    }

    /// (elements per block, bytes per block)
    pub(crate) fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::IQ4_NL => (32, 18),
            Self::IQ4_XS => (256, 136),
            Self::IQ2_XXS => (256, 66),
            Self::IQ2_XS => (256, 74),
            Self::IQ2_S => (256, 82),
            Self::IQ3_XXS => (256, 98),
            Self::IQ3_S => (256, 110),
            Self::IQ1_S => (256, 50),
            Self::IQ1_M => (256, 56),
            Self::TQ1_0 => (256, 54),
            Self::TQ2_0 => (256, 66),
            Self::Q1_0 => (128, 18),
            Self::Q2_0 => (64, 18),
            Self::MXFP4 => (32, 17),
            Self::NVFP4 => (64, 36),
        }
    }

    /// The lattice of an IQ1/IQ2/IQ3 type, whose blocks hold grid indices rather than codes.
    pub(crate) fn lattice(self) -> Option<Grid> {
        Some(match self {
            Self::IQ2_XXS => Grid::Iq2Xxs,
            Self::IQ2_XS => Grid::Iq2Xs,
            Self::IQ2_S => Grid::Iq2S,
            Self::IQ3_XXS => Grid::Iq3Xxs,
            Self::IQ3_S => Grid::Iq3S,
            Self::IQ1_S | Self::IQ1_M => Grid::Iq1,
            _ => return None,
        })
    }
}

/// ggml's name of a type id (ggml.h's `ggml_type`), for errors about the ones ember does not read.
fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 43] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32",
        "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8",
        "IQ4_NL_8_8", "MXFP4", "NVFP4", "Q1_0", "Q2_0",
    ];
    match NAMES.get(id as usize) {
        Some(name) => format!("{name} (id {id})"),
        None => format!("id {id}"),
    }
}

/// The llama.cpp architectures ember writes and reads: LLaMA's layout under llama.cpp's `llama` (q/k rows
/// permuted for its interleaved RoPE), `qwen2` (q/k/v biases; NEOX RoPE, which is HF's
/// `rotate_half`, so rows stay in HF order), and the GLM family under `chatglm` (RoPE on interleaved
/// pairs of the first part of each head, as ember's GLM decoder, so rows stay too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Qwen2,
    /// Qwen3: as `qwen2` without biases, with per-head q/k norms (`attn_q_norm`, `attn_k_norm`).
    Qwen3,
    ChatGlm,
    /// GLM-4-0414: as `chatglm` with q/k/v apart, plus RMSNorms on the attention's and the MLP's
    /// output (`post_attention_norm`, `post_ffw_norm`).
    Glm4,
}

impl GgufArch {
    /// llama.cpp's architecture for a model ember reads.
    pub fn of(config: &crate::ModelConfig) -> Self {
        match config.architecture {
            Architecture::Llama if config.model_type == "qwen2" => Self::Qwen2,
            Architecture::Llama if config.model_type == "qwen3" => Self::Qwen3,
            Architecture::Llama => Self::Llama,
            Architecture::Glm if config.output_norms => Self::Glm4,
            Architecture::Glm | Architecture::ChatGlm => Self::ChatGlm,
        }
    }

    /// `general.architecture` and the prefix of the hyperparameter keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::ChatGlm => "chatglm",
            Self::Glm4 => "glm4",
        }
    }

    /// The architecture of a file's `general.architecture`.
    fn of_name(name: &str) -> Option<Self> {
        [Self::Llama, Self::Qwen2, Self::Qwen3, Self::ChatGlm, Self::Glm4].into_iter().find(|arch| arch.name() == name)
    }

    /// Whether llama.cpp keeps q/k rows (and biases) in its interleaved order.
    pub fn permutes_qk(self) -> bool {
        self == Self::Llama
    }
}

#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// PyTorch order (outermost first); GGUF stores the reverse.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte range in the file.
    range: std::ops::Range<usize>,
}

/// GGUF key/value metadata as JSON values, with errors naming the file and key.
pub struct GgufMetadata {
    pub path: PathBuf,
    pub values: BTreeMap<String, Value>,
}

impl GgufMetadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    fn error(&self, key: &str, reason: &str) -> LoadError {
        LoadError::ConfigKey { path: self.path.clone(), key: key.into(), reason: reason.into() }
    }

    fn u64(&self, key: &str) -> Result<u64, LoadError> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| self.error(key, "missing or not an integer"))
    }

    fn str(&self, key: &str) -> Result<&str, LoadError> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| self.error(key, "missing or not a string"))
    }
}

/// A memory-mapped GGUF file: metadata as JSON values, tensors by name.
pub struct GgufFile {
    mmap: Mmap,
    pub metadata: GgufMetadata,
    pub tensors: Vec<GgufTensor>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: impl Into<String>) -> LoadError {
        LoadError::Invalid { path: self.path.to_path_buf(), reason: format!("GGUF header at byte {}: {}", self.pos, reason.into()) }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| self.error("truncated file"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, min_size: usize) -> Result<usize, LoadError> {
        let n = self.u64()?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > remaining {
            return Err(self.error(format!("count {n} exceeds the file size")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, LoadError> {
        let len = self.count(1)?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("string is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, LoadError> {
        Ok(match kind {
            0 => json!(self.take(1)?[0]),
            1 => json!(self.take(1)?[0] as i8),
            2 => json!(u16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            3 => json!(i16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            4 => json!(self.u32()?),
            5 => json!(self.u32()? as i32),
            6 => json!(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => json!(self.take(1)?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.error("arrays nested too deeply"));
                }
                let item_kind = self.u32()?;
                let len = self.count(1)?;
                let mut items = Vec::with_capacity(len.min(1 << 20));
                for _ in 0..len {
                    items.push(self.value(item_kind, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => json!(self.u64()?),
            11 => json!(self.u64()? as i64),
            12 => json!(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => return Err(self.error(format!("unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        let mut r = Reader { bytes: &mmap, pos: 0, path };
        if r.take(4)? != MAGIC {
            return Err(r.error("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.error(format!("unsupported GGUF version {version} (supported: 2, 3)")));
        }
        let tensor_count = r.count(24)?;
        let kv_count = r.count(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(r.error(format!("general.alignment {alignment} is not a power of two")));
        }
        let mut infos = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.error(format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let type_id = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, type_id, offset));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, type_id, offset) in infos {
            let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason: format!("GGUF tensor '{name}': {reason}") };
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| invalid(format!("ggml type {} is not supported (supported: {})", ggml_type_name(type_id), GgmlType::names())))?;
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n > 0)
                .ok_or_else(|| invalid(format!("dimensions {dims:?} are empty or overflow")))?;
            let (block_elems, block_bytes) = ggml_type.block();
            if elements % block_elems != 0 || dims[0] % block_elems != 0 {
                return Err(invalid(format!("{elements} elements do not fill whole {ggml_type:?} blocks")));
            }
            let size = elements / block_elems * block_bytes;
            let start = data_start.checked_add(offset).ok_or_else(|| invalid("offset overflows".into()))?;
            let end = start.checked_add(size).filter(|&e| e <= file_len)
                .ok_or_else(|| invalid(format!("data [{start}, {start}+{size}) runs past the end of the file ({file_len} bytes)")))?;
            tensors.push(GgufTensor {
                name,
                shape: dims.iter().rev().map(|&d| d as usize).collect(),
                ggml_type,
                range: start as usize..end as usize,
            });
        }
        Ok(Self { mmap, metadata: GgufMetadata { path: path.to_path_buf(), values: metadata }, tensors })
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's values as f32, row-major in PyTorch order.
    pub fn dequantize(&self, tensor: &GgufTensor) -> Vec<f32> {
        dequantize(tensor.ggml_type, &self.mmap[tensor.range.clone()])
    }
}

fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let mant = (bits & 0x3ff) as u32;
    let magnitude = match (exp, mant) {
        (0, 0) => 0,
        (0, m) => {
            // subnormal: value = m · 2^-24
            return f32::from_bits(sign) + if sign != 0 { -(m as f32) } else { m as f32 } * 2f32.powi(-24);
        }
        (0x1f, m) => 0x7f80_0000 | (m << 13),
        (e, m) => ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(sign | magnitude)
}

fn half_at(bytes: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[i], bytes[i + 1]]))
}

/// Dequantizes ggml blocks, each value as ggml-quants.c's `dequantize_row_*` computes it (the
/// same f32 operations in the same order), so that the device path can be checked bit for bit.
pub(crate) fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
    dequantize_scaled(kind, bytes, None)
}

/// [`dequantize`] of an NVFP4 weight with the per-tensor scale of llama.cpp's `.scale` tensor
/// (ModelOpt's `weight_scale_2`). llama.cpp multiplies the product by it; ember folds it into
/// each sub-block's scale, `kv·(d·s)`, as its packed weight does, so the two agree bit for bit.
pub(crate) fn dequantize_scaled(kind: GgmlType, bytes: &[u8], tensor_scale: Option<f32>) -> Vec<f32> {
    match kind {
        GgmlType::F32 => return bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        GgmlType::F16 => return bytes.chunks_exact(2).map(|c| half_at(c, 0)).collect(),
        GgmlType::BF16 => return bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
        _ => {}
    }
    let (per_block, block_bytes) = kind.block();
    let mut out = Vec::with_capacity(bytes.len() / block_bytes as usize * per_block as usize);
    if kind.lattice().is_some() {
        for b in bytes.chunks_exact(block_bytes as usize) {
            lattice::decode(kind, b, &mut out);
        }
        return out;
    }
    let mut q = Vec::with_capacity(per_block as usize);
    for b in bytes.chunks_exact(block_bytes as usize) {
        q.clear();
        block_codes(kind, b, &mut q);
        let value = |c: u8| code_value(kind, c);
        match kind {
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                for (sub, codes) in q.chunks_exact(32).enumerate() {
                    let (sc, m) = k_scale_min(&b[4..16], sub);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    out.extend(codes.iter().map(|&c| d1 * value(c) - m1));
                }
            }
            GgmlType::Q2_K => {
                let (d, dmin) = (half_at(b, 80), half_at(b, 82));
                for (sub, codes) in q.chunks_exact(16).enumerate() {
                    let (d1, m1) = (d * (b[sub] & 0x0f) as f32, dmin * (b[sub] >> 4) as f32);
                    out.extend(codes.iter().map(|&c| d1 * value(c) - m1));
                }
            }
            GgmlType::Q3_K => {
                let d = half_at(b, 108);
                for (sub, codes) in q.chunks_exact(16).enumerate() {
                    let d1 = d * q3_k_scale(&b[96..108], sub) as f32;
                    out.extend(codes.iter().map(|&c| d1 * value(c)));
                }
            }
            GgmlType::IQ4_XS => {
                let d = half_at(b, 0);
                for (sub, codes) in q.chunks_exact(32).enumerate() {
                    let d1 = d * iq4_xs_scale(b, sub) as f32;
                    out.extend(codes.iter().map(|&c| d1 * value(c)));
                }
            }
            GgmlType::Q6_K => {
                let d = half_at(b, 208);
                for (sub, codes) in q.chunks_exact(16).enumerate() {
                    let scale = b[192 + sub] as i8 as f32;
                    out.extend(codes.iter().map(|&c| d * scale * value(c)));
                }
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => out.extend(q.iter().map(|&c| value(c) * half_at(b, 0) + half_at(b, 2))),
            // MXFP4: one E8M0 exponent a block; NVFP4: a UE4M3 scale per 16 values, times the
            // tensor's scale if it has one.
            GgmlType::MXFP4 => out.extend(q.iter().map(|&c| value(c) * e8m0_half(b[0]))),
            GgmlType::NVFP4 => {
                for (sub, codes) in q.chunks_exact(16).enumerate() {
                    let d = nvfp4_scale(b[sub], tensor_scale);
                    out.extend(codes.iter().map(|&c| value(c) * d));
                }
            }
            // The ternary types keep `d` after their codes.
            GgmlType::TQ1_0 | GgmlType::TQ2_0 => out.extend(q.iter().map(|&c| value(c) * half_at(b, b.len() - 2))),
            // Q8_0, Q4_0, Q5_0, IQ4_NL, Q1_0, Q2_0. ggml: Q4_0 is (q − 8)·d, not q·d − 8d, which rounds differently.
            _ => out.extend(q.iter().map(|&c| value(c) * half_at(b, 0))),
        }
    }
    out
}

/// A code's value before scaling: the offset or sign each type gives its codes.
pub(crate) fn code_value(kind: GgmlType, code: u8) -> f32 {
    match kind {
        GgmlType::Q8_0 => code as i8 as f32,
        GgmlType::Q4_0 => (code as i32 - 8) as f32,
        GgmlType::Q5_0 => (code as i32 - 16) as f32,
        GgmlType::Q3_K => (code as i32 - 4) as f32,
        GgmlType::Q6_K => (code as i32 - 32) as f32,
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => IQ4_VALUES[code as usize] as f32,
        GgmlType::MXFP4 | GgmlType::NVFP4 => FP4_VALUES[code as usize] as f32,
        GgmlType::Q1_0 => if code == 0 { -1.0 } else { 1.0 },
        GgmlType::Q2_0 | GgmlType::TQ1_0 | GgmlType::TQ2_0 => (code as i32 - 1) as f32,
        kind if kind.lattice().is_some() => lattice::code_value(kind, code),
        _ => code as f32,
    }
}

/// A quantized block's codes in value order, appended to `out`, before the offset a type
/// subtracts or the scales (ggml-common.h's layouts, see `crate::ggml`).
pub(crate) fn block_codes(kind: GgmlType, b: &[u8], out: &mut Vec<u8>) {
    match kind {
        GgmlType::Q8_0 => out.extend_from_slice(&b[2..]),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::IQ4_NL | GgmlType::IQ4_XS | GgmlType::MXFP4 | GgmlType::NVFP4 => {
            // Per 32 values, element j in the low nibble of byte j, element j + 16 in its high
            // nibble (IQ4_XS: eight such runs after its scales; NVFP4: per 16 values, after
            // its four scales).
            let (qs, run) = match kind {
                GgmlType::Q4_1 => (&b[4..], 16),
                GgmlType::IQ4_XS => (&b[8..], 16),
                GgmlType::MXFP4 => (&b[1..], 16),
                GgmlType::NVFP4 => (&b[4..], 8),
                _ => (&b[2..], 16),
            };
            for run in qs.chunks_exact(run) {
                out.extend(run.iter().map(|&q| q & 0x0f));
                out.extend(run.iter().map(|&q| q >> 4));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // As Q4_0, with element j's fifth bit in bit j of a u32 before the nibbles.
            let at = if kind == GgmlType::Q5_1 { 4 } else { 2 };
            let high = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            let qs = &b[at + 4..];
            out.extend((0..32).map(|j| {
                let nibble = if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 };
                nibble | (((high >> j) & 1) as u8) << 4
            }));
        }
        GgmlType::Q2_K | GgmlType::Q3_K => {
            // In each half of 128 values, quarter k's value l is bits 2k of qs[l] (of that half's
            // 32 bytes); Q3_K's third bit is bit 4·half + k of hmask[l], set meaning "no − 4".
            let (hmask, qs) = if kind == GgmlType::Q3_K { (Some(&b[..32]), &b[32..96]) } else { (None, &b[16..80]) };
            out.extend((0..256).map(|i| {
                let (half, quarter, l) = (i / 128, i % 128 / 32, i % 32);
                let low = qs[half * 32 + l] >> (2 * quarter) & 3;
                low | hmask.map_or(0, |h| (h[l] >> (4 * half + quarter) & 1) << 2)
            }));
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            // Each 64 values are 32 bytes, low nibbles first; Q5_K's fifth bits for sub-block s
            // are bit s of 32 bytes after the scales.
            let (high, qs) = if kind == GgmlType::Q5_K { (Some(&b[16..48]), &b[48..]) } else { (None, &b[16..]) };
            for sub in 0..8 {
                let bytes = &qs[sub / 2 * 32..][..32];
                out.extend((0..32).map(|l| {
                    let nibble = if sub % 2 == 0 { bytes[l] & 0x0f } else { bytes[l] >> 4 };
                    nibble | high.map_or(0, |h| (h[l] >> sub & 1) << 4)
                }));
            }
        }
        GgmlType::Q6_K => {
            // 128 bytes of low nibbles and 64 of high bit pairs: in each half of 128 values,
            // quarter k's value l is nibble k/2 of ql[l + 32·(k%2)] and bits 2k of qh[l].
            let (ql, qh) = (&b[..128], &b[128..192]);
            out.extend((0..256).map(|i| {
                let (half, l, quarter) = (i / 128, i % 32, i % 128 / 32);
                let low = ql[half * 64 + l + (quarter % 2) * 32] >> (4 * (quarter / 2)) & 0x0f;
                low | (qh[half * 32 + l] >> (2 * quarter) & 3) << 4
            }));
        }
        // Q1_0: value j's sign in bit j % 8 of byte j / 8 after `d`; Q2_0: its code in bits
        // 2·(j % 4) of byte j / 4.
        GgmlType::Q1_0 => out.extend((0..128).map(|j| b[2 + j / 8] >> (j % 8) & 1)),
        GgmlType::Q2_0 => out.extend((0..64).map(|j| b[2 + j / 4] >> (2 * (j % 4)) & 3)),
        GgmlType::TQ2_0 => {
            // Per 128 values, quarter k's value m is bits 2k of byte m (of that half's 32).
            out.extend((0..256).map(|i| b[i / 128 * 32 + i % 32] >> (2 * (i % 128 / 32)) & 3));
        }
        GgmlType::TQ1_0 => {
            // Trit n (most significant first) of a byte holding ⌈t·256/243⌉ of its trits' number
            // t: `(byte·3ⁿ mod 256)·3 >> 8`. The first 32 bytes hold values m + 32n, the next 16
            // values 160 + m + 16n, the last 4 (four trits) values 240 + j + 4n.
            let trit = |byte: u8, n: u32| ((u16::from(byte.wrapping_mul(3u8.pow(n))) * 3) >> 8) as u8;
            for (bytes, trits) in [(&b[..32], 5), (&b[32..48], 5), (&b[48..52], 4)] {
                out.extend((0..trits).flat_map(|n| bytes.iter().map(move |&byte| trit(byte, n))));
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("{kind:?} is not a block type"),
        GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ2_S | GgmlType::IQ3_XXS | GgmlType::IQ3_S | GgmlType::IQ1_S | GgmlType::IQ1_M => {
            unreachable!("{kind:?} holds grid indices, not codes")
        }
    }
}

/// MXFP4's and NVFP4's code values (ggml-common.h's `kvalues_mxfp4`): E2M1 numbers doubled, their
/// scales halved to match.
pub(crate) const FP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// An MXFP4 block's E8M0 exponent as a scale, halved (ggml's `ggml_e8m0_to_fp32_half`): `2^(e−128)`,
/// the two smallest as f32 subnormals.
pub(crate) fn e8m0_half(e: u8) -> f32 {
    f32::from_bits(if e < 2 { 0x0020_0000 << e } else { (e as u32 - 1) << 23 })
}

/// An NVFP4 sub-block's unsigned E4M3 scale, halved (ggml's `ggml_ue4m3_to_fp32`): 0 and 0x7F
/// (NaN in E4M3) are 0.
fn ue4m3_half(x: u8) -> f32 {
    if x == 0 || x == 0x7f {
        return 0.0;
    }
    let (exp, man) = ((x >> 3 & 0x0f) as i32, (x & 7) as f32);
    let raw = if exp == 0 { man * 2f32.powi(-9) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) };
    raw * 0.5
}

/// An NVFP4 sub-block's scale: its UE4M3 byte's value times the tensor's scale, if it has one.
/// The host dequantization and the packed weight's lookup table both take it from here, so they
/// agree bit for bit.
pub(crate) fn nvfp4_scale(byte: u8, tensor_scale: Option<f32>) -> f32 {
    ue4m3_half(byte) * tensor_scale.unwrap_or(1.0)
}

/// IQ4_NL's and IQ4_XS's code values (ggml-common.h's `kvalues_iq4nl`): a non-linear 4-bit grid.
pub(crate) const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Sub-block `j`'s scale of an IQ4_XS super-block (ggml's `dequantize_row_iq4_xs`): six bits, the
/// low four a nibble of `scales_l` (bytes 4..8, low nibble first), the top two bits 2j of the
/// u16 `scales_h` (bytes 2..4), less 32.
pub(crate) fn iq4_xs_scale(b: &[u8], j: usize) -> i8 {
    let low = b[4 + j / 2] >> (4 * (j % 2)) & 0x0f;
    let high = (u16::from_le_bytes([b[2], b[3]]) >> (2 * j) & 3) as u8;
    (low | high << 4) as i8 - 32
}

/// Sub-block `j`'s scale of a Q3_K super-block (ggml's `dequantize_row_q3_K`): six bits, the
/// low four a nibble of bytes 0..8 (low nibbles for the first eight), the top two from bytes
/// 8..12, less 32.
pub(crate) fn q3_k_scale(scales: &[u8], j: usize) -> i8 {
    let low = if j < 8 { scales[j] & 0x0f } else { scales[j - 8] >> 4 };
    let high = scales[8 + j % 4] >> (2 * (j / 4)) & 3;
    (low | high << 4) as i8 - 32
}

/// Sub-block `j`'s 6-bit scale and minimum of a Q4_K/Q5_K super-block (ggml's
/// `get_scale_min_k4`): the first four in bytes 0..8, the rest split over bytes 8..12 and the
/// top two bits of bytes 0..8.
pub(crate) fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0x0f) | (scales[j - 4] >> 6) << 4, (scales[j + 4] >> 4) | (scales[j] >> 6) << 4)
    }
}

/// llama.cpp stores q/k rows permuted for its interleaved RoPE; this restores HF's
/// `rotate_half` order: GGUF row `h·2d + 2i + j` is HF row `h·2d + j·d + i`.
pub(crate) fn unpermute_rows<T: Copy + Default>(values: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    let half = rows / heads / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + 2 * i + j;
                let dst = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A tensor dequantized only when the safetensors writer asks for its bytes, so a conversion
/// holds one tensor at a time.
struct LazyTensor<'a> {
    file: &'a GgufFile,
    hf: &'a HfTensor<'a>,
}

impl View for &LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.hf.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let bytes = self.file.hf_values(self.hf).iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.release(self.hf.tensor);
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.hf.tensor.shape.iter().product::<usize>() * 4
    }
}

/// llama.cpp's name of a projection of `role`; fused ones are llama.cpp's fused tensors
/// (`[q | k | v]` rows as `attn_qkv`, `[gate | up]` as `ffn_up`, which its SwiGLU splits in halves).
pub(crate) fn gguf_projection(role: Role) -> &'static str {
    match role {
        Role::Q => "attn_q",
        Role::K => "attn_k",
        Role::V => "attn_v",
        Role::Qkv => "attn_qkv",
        Role::O => "attn_output",
        Role::Gate => "ffn_gate",
        Role::Up | Role::GateUp => "ffn_up",
        Role::Down => "ffn_down",
    }
}

/// HF name of a GGUF tensor in a checkpoint laid out as `keys`, and the projection's role if it
/// is one.
pub(crate) fn hf_name(keys: &KeyLayout, gguf: &str) -> Option<(String, Option<Role>)> {
    let fixed = match gguf {
        "token_embd.weight" => Some(keys.embed),
        "output_norm.weight" => Some(keys.final_norm),
        "output.weight" => Some(keys.lm_head),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((format!("{name}.weight"), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let (name, role) = match module {
        "attn_norm" => (format!("{}.{}", keys.layer(layer), keys.input_norm), None),
        "ffn_norm" => (format!("{}.{}", keys.layer(layer), keys.post_attention_norm), None),
        "attn_q_norm" => (keys.qk_norms(layer)[0].clone(), None),
        "attn_k_norm" => (keys.qk_norms(layer)[1].clone(), None),
        "post_attention_norm" => (keys.output_norms(layer)[0].clone(), None),
        "post_ffw_norm" => (keys.output_norms(layer)[1].clone(), None),
        _ => keys.roles(layer).into_iter().find(|(_, role)| gguf_projection(*role) == module).map(|(name, role)| (name, Some(role)))?,
    };
    Some((format!("{name}.{suffix}"), role))
}

/// A GGUF tensor under its HF name, with the heads its q/k rows are un-permuted with.
pub struct HfTensor<'a> {
    pub name: String,
    pub tensor: &'a GgufTensor,
    /// llama.cpp stores q/k rows permuted for its RoPE pairing; HF's rotate_half wants them back.
    pub unpermute_heads: Option<usize>,
    /// An NVFP4 projection's per-tensor scale (its `.scale` tensor).
    pub scale: Option<f32>,
}

impl GgufFile {
    /// Whether `path` names a GGUF file (by its extension), which ember reads wherever it reads a
    /// model folder.
    pub fn is_gguf(path: &Path) -> bool {
        path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) && !path.is_dir()
    }

    /// The bytes of `tensor` as stored (ggml blocks for quantized types).
    pub fn data(&self, tensor: &GgufTensor) -> &[u8] {
        &self.mmap[tensor.range.clone()]
    }

    /// Drops `tensor`'s pages of the mapping from this process's memory once its bytes are
    /// copied (as [`crate::Checkpoint`] does): otherwise the whole file stays resident beside
    /// the loaded blocks until it is closed, and a 7B Q4_K_M base peaks at twice its size. The
    /// mapping is read-only, so a later read faults the same bytes back in.
    pub fn release(&self, tensor: &GgufTensor) {
        // SAFETY: MADV_DONTNEED on a read-only, file-backed mapping only evicts clean pages;
        // their contents stay those of the file.
        let _ = unsafe { self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, tensor.range.start, tensor.range.len()) };
    }

    /// The file's architecture, if ember reads it.
    pub fn arch(&self) -> Result<GgufArch, LoadError> {
        let arch = self.metadata.str("general.architecture")?;
        GgufArch::of_name(arch).ok_or_else(|| self.metadata.error("general.architecture", &format!("'{arch}' is not supported (supported: llama, qwen2, qwen3, chatglm, glm4)")))
    }

    /// The hyperparameter `key` under the architecture's prefix (`llama.block_count`).
    fn key(&self, key: &str) -> Result<String, LoadError> {
        Ok(format!("{}.{key}", self.arch()?.name()))
    }

    fn heads(&self) -> Result<(usize, usize), LoadError> {
        let heads = self.metadata.u64(&self.key("attention.head_count")?)? as usize;
        let kv_heads = self.metadata.get(&self.key("attention.head_count_kv")?).and_then(Value::as_u64).map_or(heads, |n| n as usize);
        Ok((heads, kv_heads))
    }

    /// The HF checkpoint layout the file's tensors are named in: LLaMA's; for `chatglm`,
    /// ChatGLM's (`query_key_value`) when q, k and v are one tensor, HF's `glm` otherwise.
    fn keys(&self) -> Result<&'static KeyLayout, LoadError> {
        Ok(match self.arch()? {
            GgufArch::Llama | GgufArch::Qwen2 | GgufArch::Qwen3 => &llama::KEYS,
            GgufArch::ChatGlm if self.fused_qkv() => &glm::CHATGLM_KEYS,
            GgufArch::ChatGlm | GgufArch::Glm4 => &glm::GLM_KEYS,
        })
    }

    /// Whether q, k and v are one tensor (`attn_qkv`), as in ChatGLM's layout.
    fn fused_qkv(&self) -> bool {
        self.tensor("blk.0.attn_qkv.weight").is_some()
    }

    /// The tensors under their HF names, sorted, and the GGUF names that have none (e.g.
    /// rope_freqs.weight, recomputed from the config).
    pub fn hf_tensors(&self) -> Result<(Vec<HfTensor<'_>>, Vec<String>), LoadError> {
        let keys = self.keys()?;
        let permuted = self.arch()?.permutes_qk();
        let (heads, kv_heads) = self.heads()?;
        let mut named = Vec::new();
        let mut skipped = Vec::new();
        for tensor in &self.tensors {
            // A weight's `.scale` goes with the weight; its activation scale (ModelOpt's
            // `input_scale`) is for 4-bit activations, which llama.cpp does not use either.
            let of_weight = |suffix: &str| tensor.name.strip_suffix(suffix).is_some_and(|stem| self.tensor(&format!("{stem}.weight")).is_some());
            if of_weight(".scale") {
                continue;
            }
            let Some((name, role)) = hf_name(keys, &tensor.name).filter(|_| !of_weight(".input_scale")) else {
                skipped.push(tensor.name.clone());
                continue;
            };
            let unpermute_heads = match role {
                Some(Role::Q) if permuted => Some(heads),
                Some(Role::K) if permuted => Some(kv_heads),
                _ => None,
            };
            let scale = self.tensor_scale(tensor)?;
            named.push(HfTensor { name, tensor, unpermute_heads, scale });
        }
        named.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((named, skipped))
    }

    /// The `.scale` tensor beside projection `weight`, which llama.cpp multiplies its product by:
    /// one f32, read for NVFP4 weights (the only ones llama.cpp's converter gives one).
    fn tensor_scale(&self, weight: &GgufTensor) -> Result<Option<f32>, LoadError> {
        let Some(stem) = weight.name.strip_suffix(".weight") else {
            return Ok(None);
        };
        let Some(scale) = self.tensor(&format!("{stem}.scale")) else {
            return Ok(None);
        };
        let invalid = |reason: String| LoadError::Invalid { path: self.metadata.path.clone(), reason: format!("GGUF tensor '{}': {reason}", scale.name) };
        if weight.ggml_type != GgmlType::NVFP4 {
            return Err(invalid(format!("ember reads a per-tensor scale only beside an NVFP4 weight, and this weight is {:?}", weight.ggml_type)));
        }
        match (scale.ggml_type, self.dequantize(scale).as_slice()) {
            (GgmlType::F32, &[value]) if value.is_finite() => Ok(Some(value)),
            (ty, values) => Err(invalid(format!("a per-tensor scale must be one finite F32, found {} {ty:?} values", values.len()))),
        }
    }

    /// Bytes per value of the decoder projections as ember holds them in memory: in their blocks
    /// ([`crate::ggml::GgmlWeight`]), or dense at `dense_bytes` (float and lattice types); `None`
    /// when none keeps its blocks.
    pub fn projection_bytes_per_value(&self, dense_bytes: f64) -> Option<f64> {
        use crate::ggml::GgmlWeight;
        let keys = self.keys().ok()?;
        let projections = self.tensors.iter().filter(|t| hf_name(keys, &t.name).is_some_and(|(_, role)| role.is_some()));
        let (bytes, values, in_blocks) = projections.fold((0.0, 0.0, false), |(bytes, values, in_blocks), t| {
            let n = t.shape.iter().product::<usize>() as f64;
            let reads = GgmlWeight::reads(t.ggml_type);
            let per_value = if reads { GgmlWeight::bytes_per_value(t.ggml_type) } else { dense_bytes };
            (bytes + n * per_value, values + n, in_blocks || reads)
        });
        (in_blocks && values > 0.0).then(|| bytes / values)
    }

    /// The tensor's f32 values in HF order (dequantized, q/k rows un-permuted).
    pub fn hf_values(&self, hf: &HfTensor) -> Vec<f32> {
        let values = dequantize_scaled(hf.tensor.ggml_type, self.data(hf.tensor), hf.scale);
        match hf.unpermute_heads {
            // A bias is a column of rows.
            Some(heads) => unpermute_rows(&values, hf.tensor.shape[0], hf.tensor.shape.get(1).copied().unwrap_or(1), heads),
            None => values,
        }
    }

    /// The tensors under their HF names, every one `config` needs checked present with its shape
    /// from the header alone.
    pub fn checked_tensors(&self, config: &crate::ModelConfig) -> Result<Vec<HfTensor<'_>>, LoadError> {
        let (named, _) = self.hf_tensors()?;
        let path = &self.metadata.path;
        for (key, shape) in crate::family::expected_tensors(config) {
            let hf = named.iter().find(|hf| hf.name == key).ok_or_else(|| LoadError::MissingTensor { path: path.clone(), key: key.clone() })?;
            if hf.tensor.shape != shape {
                return Err(LoadError::Shape { path: path.clone(), key, expected: shape, found: hf.tensor.shape.clone() });
            }
        }
        Ok(named)
    }

    /// The model's HF `config.json`, from the metadata.
    pub fn config_json(&self) -> Result<Value, LoadError> {
        let arch = self.arch()?;
        let meta = &self.metadata;
        let (heads, kv_heads) = self.heads()?;
        let key = |k: &str| format!("{}.{k}", arch.name());
        let hidden = meta.u64(&key("embedding_length"))? as usize;
        let embed = self.tensor("token_embd.weight").ok_or_else(|| LoadError::MissingTensor { path: meta.path.clone(), key: "token_embd.weight".into() })?;
        let get_f64 = |k: &str| meta.get(&key(k)).and_then(Value::as_f64);
        let token_id = |key: &str| meta.get(key).and_then(Value::as_u64);
        let theta = get_f64("rope.freq_base").unwrap_or(10000.0);
        if arch == GgufArch::ChatGlm && self.fused_qkv() {
            return self.chatglm_config_json(hidden, embed.shape[0], theta);
        }
        // llama.cpp's GLM rotates `rope.dimension_count` dims of heads of `key_length`.
        let rope_dims = meta.get(&key("rope.dimension_count")).and_then(Value::as_u64).map(|n| n as usize);
        let head_dim = match arch {
            GgufArch::ChatGlm | GgufArch::Glm4 | GgufArch::Qwen3 => meta.get(&key("attention.key_length")).and_then(Value::as_u64).map_or(hidden / heads, |n| n as usize),
            _ => rope_dims.unwrap_or(hidden / heads),
        };
        let (model_type, class) = match arch {
            GgufArch::Llama => ("llama", "LlamaForCausalLM"),
            GgufArch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            GgufArch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            GgufArch::ChatGlm => ("glm", "GlmForCausalLM"),
            GgufArch::Glm4 => ("glm4", "Glm4ForCausalLM"),
        };
        let mut config = json!({
            "architectures": [class],
            "model_type": model_type,
            "attention_bias": false,
            "mlp_bias": false,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": meta.u64(&key("feed_forward_length"))?,
            "num_hidden_layers": meta.u64(&key("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": meta.get(&key("context_length")).and_then(Value::as_u64).unwrap_or(2048),
            "rms_norm_eps": get_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            "rope_theta": theta,
            "rope_scaling": self.rope_scaling(arch, theta, head_dim)?,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "vocab_size": embed.shape[0],
            "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.end_ids(),
            "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
            "torch_dtype": "float32",
        });
        if matches!(arch, GgufArch::ChatGlm | GgufArch::Glm4) {
            config["attention_bias"] = json!(self.tensor("blk.0.attn_q.bias").is_some());
            config["partial_rotary_factor"] = json!(rope_dims.unwrap_or(head_dim / 2) as f64 / head_dim as f64);
        }
        Ok(config)
    }

    /// HF's `eos_token_id`: the file's end of text, and its end of turn (GLM's `<|user|>`) when
    /// that is another token (llama.cpp stops at either): one id, a list, or null.
    fn end_ids(&self) -> Value {
        let mut ids: Vec<u64> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"].iter().filter_map(|k| self.metadata.get(k)?.as_u64()).collect();
        ids.dedup();
        match ids.as_slice() {
            [] => Value::Null,
            [id] => json!(id),
            _ => json!(ids),
        }
    }

    /// The `config.json` of a `chatglm` file whose q, k and v are one tensor, in ChatGLM's layout
    /// (RoPE on half of each head, base `10000 · rope_ratio`).
    fn chatglm_config_json(&self, hidden: usize, vocab: usize, theta: f64) -> Result<Value, LoadError> {
        let meta = &self.metadata;
        let (heads, kv_heads) = self.heads()?;
        let key = |k: &str| format!("chatglm.{k}");
        let head_dim = meta.get(&key("attention.key_length")).and_then(Value::as_u64).map_or(hidden / heads, |n| n as usize);
        let rotary_key = key("rope.dimension_count");
        let rotary = meta.get(&rotary_key).and_then(Value::as_u64).map_or(head_dim / 2, |n| n as usize);
        let token_id = |key: &str| meta.get(key).and_then(Value::as_u64);
        let has = |name: &str| self.tensor(name).is_some();
        if rotary != head_dim / 2 {
            return Err(meta.error(&rotary_key, &format!("{rotary} rotary dims of {head_dim}: ChatGLM's layout rotates half of each head")));
        }
        if !has("output.weight") {
            return Err(LoadError::MissingTensor { path: meta.path.clone(), key: "output.weight".into() });
        }
        Ok(json!({
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "num_layers": meta.u64(&key("block_count"))?,
            "padded_vocab_size": vocab,
            "hidden_size": hidden,
            "ffn_hidden_size": meta.u64(&key("feed_forward_length"))?,
            "kv_channels": head_dim,
            "num_attention_heads": heads,
            "multi_query_attention": kv_heads != heads,
            "multi_query_group_num": kv_heads,
            "add_qkv_bias": has("blk.0.attn_qkv.bias"),
            "add_bias_linear": has("blk.0.attn_output.bias"),
            "layernorm_epsilon": meta.get(&key("attention.layer_norm_rms_epsilon")).and_then(Value::as_f64).unwrap_or(1e-5),
            "rmsnorm": true,
            "post_layer_norm": true,
            "apply_residual_connection_post_layernorm": false,
            "seq_length": meta.get(&key("context_length")).and_then(Value::as_u64).unwrap_or(8192),
            "rope_ratio": theta / 10000.0,
            "tie_word_embeddings": false,
            "eos_token_id": self.end_ids(),
            "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
            "torch_dtype": "float32",
        }))
    }

    /// HF's `rope_scaling` for the file: `linear` and `yarn` from the metadata keys, `llama3` from the
    /// `rope_freqs` tensor llama.cpp's converter writes for it. Every Llama 3.x uses low and high
    /// frequency factors 1 and 4 and an original context of 8,192 with its own `factor` (the
    /// largest divisor); divisors that are not those are refused, never dropped.
    fn rope_scaling(&self, arch: GgufArch, theta: f64, rotary_dim: usize) -> Result<Value, LoadError> {
        let meta = &self.metadata;
        let kind_key = format!("{}.rope.scaling.type", arch.name());
        match meta.get(&kind_key).and_then(Value::as_str) {
            None | Some("none") => {}
            Some("linear") => {
                let factor_key = format!("{}.rope.scaling.factor", arch.name());
                let factor = meta.get(&factor_key).and_then(Value::as_f64).ok_or_else(|| meta.error(&factor_key, "missing or not a number"))?;
                return Ok(json!({"rope_type": "linear", "factor": factor}));
            }
            Some("yarn") => {
                let number = |k: &str| meta.get(&format!("{}.rope.scaling.{k}", arch.name())).and_then(Value::as_f64);
                let factor_key = format!("{}.rope.scaling.factor", arch.name());
                let factor = number("factor").ok_or_else(|| meta.error(&factor_key, "missing or not a number"))?;
                let context_key = format!("{}.context_length", arch.name());
                let original = number("original_context_length").or_else(|| meta.get(&context_key).and_then(Value::as_f64))
                    .ok_or_else(|| meta.error(&context_key, "missing or not a number"))?;
                let mut scaling = json!({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original});
                // llama.cpp multiplies its own 0.1·ln(factor) + 1 by `attn_factor`.
                if let Some(extra) = number("attn_factor").filter(|&f| f != 1.0) {
                    scaling["attention_factor"] = json!(RopeScaling::yarn_default_attention(factor) * extra);
                }
                return Ok(scaling);
            }
            Some(other) => return Err(meta.error(&kind_key, &format!("'{other}' is not supported (supported: none, linear, yarn; llama3 as rope_freqs.weight)"))),
        }
        let Some(tensor) = self.tensor("rope_freqs.weight") else { return Ok(Value::Null) };
        let divisors = self.dequantize(tensor);
        let factor = divisors.iter().fold(1f32, |m, &d| m.max(d)) as f64;
        let scaling = RopeScaling::Llama3 { factor, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
        let expected = scaling.llama3_divisors(theta, rotary_dim).expect("llama3");
        let close = |(a, b): (&f32, &f32)| (a - b).abs() <= 1e-6 * b.abs();
        if expected.len() != divisors.len() || !expected.iter().zip(&divisors).all(close) {
            return Err(LoadError::Invalid {
                path: meta.path.clone(),
                reason: "GGUF tensor 'rope_freqs.weight': per-dimension RoPE divisors other than Llama 3's scaling (low/high frequency factors 1 and 4, original context 8192) are not supported".into(),
            });
        }
        Ok(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    }

    /// `tokenizer_config.json` and `generation_config.json` from the metadata (`tokenizer.json`
    /// is [`tokenizer_json`]).
    pub fn tokenizer_configs(&self) -> Result<[Value; 2], LoadError> {
        let meta = &self.metadata;
        let tokens = meta.get("tokenizer.ggml.tokens").and_then(Value::as_array)
            .ok_or_else(|| meta.error("tokenizer.ggml.tokens", "missing or not an array"))?;
        let token_id = |key: &str| meta.get(key).and_then(Value::as_u64);
        let token_name = |key: &str| token_id(key).and_then(|id| tokens.get(id as usize)).cloned().unwrap_or(Value::Null);
        // LLaMA's SentencePiece tokenizers add BOS unless the file says otherwise.
        let add_bos = meta.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(meta.str("tokenizer.ggml.model")? == "llama");
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token_name("tokenizer.ggml.bos_token_id"),
            "eos_token": token_name("tokenizer.ggml.eos_token_id"),
            "pad_token": token_name("tokenizer.ggml.padding_token_id"),
            "unk_token": token_name("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": add_bos,
            "clean_up_tokenization_spaces": false,
            "chat_template": meta.get("tokenizer.chat_template").cloned().unwrap_or(Value::Null),
        });
        let generation_config = json!({
            "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.end_ids(),
        });
        Ok([tokenizer_config, generation_config])
    }
}

/// What [`import_folder`] wrote.
#[derive(Debug)]
pub struct ImportSummary {
    pub tensors: usize,
    pub parameters: usize,
    pub tokenizer_model: String,
    pub skipped: Vec<String>,
}

/// Converts a GGUF into an HF folder at `out` (written to a temporary folder, then renamed).
pub fn import_folder(path: &Path, out: &Path) -> Result<ImportSummary, LoadError> {
    let gguf = GgufFile::open(path)?;
    let config = gguf.config_json()?;
    let tokenizer = tokenizer_json(&gguf.metadata)?;
    let [tokenizer_config, generation_config] = gguf.tokenizer_configs()?;
    let (named, skipped) = gguf.hf_tensors()?;
    let views: Vec<(&str, LazyTensor)> = named.iter().map(|hf| (hf.name.as_str(), LazyTensor { file: &gguf, hf })).collect();
    let parameters = named.iter().map(|hf| hf.tensor.shape.iter().product::<usize>()).sum();

    crate::write_dir_atomically(out, |tmp| {
        let write_json = |name: &str, value: &Value| {
            let path = tmp.join(name);
            crate::write_json(&path, value).map_err(|e| LoadError::write(&path, e))
        };
        write_json("config.json", &config)?;
        write_json("tokenizer.json", &tokenizer)?;
        write_json("tokenizer_config.json", &tokenizer_config)?;
        write_json("generation_config.json", &generation_config)?;
        let weights = tmp.join("model.safetensors");
        crate::write_safetensors(&weights, views.iter().map(|(n, v)| (*n, v))).map_err(|e| LoadError::write(&weights, e))
    }, LoadError::write)?;
    Ok(ImportSummary {
        tensors: views.len(),
        parameters,
        tokenizer_model: gguf.metadata.str("tokenizer.ggml.model").unwrap_or("?").to_owned(),
        skipped,
    })
}

/// The SentencePiece BPE model a `llama` GGUF vocabulary was converted from (llama.cpp's
/// converter copies pieces, scores and types; the normalizer is LLaMA's: a dummy prefix, spaces
/// kept), so that ember reads it as it reads `tokenizer.model`.
fn proto_of(meta: &GgufMetadata, tokens: &[&str], types: &[u64], scores: &[Value]) -> ModelProto {
    let kind = |id: usize| match types.get(id) {
        Some(2) => PieceType::Unknown,
        Some(3) => PieceType::Control,
        Some(4) => PieceType::UserDefined,
        Some(5) => PieceType::Unused,
        Some(6) => PieceType::Byte,
        _ => PieceType::Normal,
    };
    let id = |key: &str| meta.get(key).and_then(Value::as_u64).map(|id| id as u32).filter(|&id| (id as usize) < tokens.len());
    ModelProto {
        pieces: tokens.iter().enumerate()
            .map(|(i, text)| Piece { text: text.to_string(), score: scores.get(i).and_then(Value::as_f64).unwrap_or(0.0) as f32, kind: kind(i) })
            .collect(),
        model_type: ModelType::Bpe,
        byte_fallback: true,
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        pad_id: id("tokenizer.ggml.padding_token_id"),
        precompiled_charsmap: Vec::new(),
        add_dummy_prefix: meta.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true),
        remove_extra_whitespaces: false,
    }
}

/// The SentencePiece model of a `llama` vocabulary and whose tokenizer it is; `None` for other
/// tokenizer models. ChatGLM2/3's (`tokenizer.ggml.pre` `chatglm-spm`, as llama.cpp's converter
/// writes them) are the model's pieces, THUDM's specials from `[MASK]` on, then padding: the
/// model ends before the specials, which the ChatGLM flavours number the same way after it.
pub fn sentencepiece_model(meta: &GgufMetadata) -> Result<Option<(ModelProto, Flavour)>, LoadError> {
    if meta.str("tokenizer.ggml.model")? != "llama" {
        return Ok(None);
    }
    let (tokens, types) = vocabulary(meta)?;
    let scores = meta.get("tokenizer.ggml.scores").and_then(Value::as_array)
        .ok_or_else(|| meta.error("tokenizer.ggml.scores", "missing for a llama tokenizer"))?;
    let mut model = proto_of(meta, &tokens, &types, scores);
    if meta.get("tokenizer.ggml.pre").and_then(Value::as_str) != Some("chatglm-spm") {
        return Ok(Some((model, Flavour::SentencePiece)));
    }
    let start = tokens.iter().position(|t| *t == "[MASK]");
    let flavour = [Flavour::ChatGlm3, Flavour::ChatGlm2].into_iter().find(|f| start.is_some_and(|at| tokens[at..].starts_with(f.chatglm_specials())));
    let (Some(start), Some(flavour)) = (start, flavour) else {
        return Err(meta.error("tokenizer.ggml.tokens", "a chatglm-spm vocabulary without THUDM's special tokens ([MASK], [gMASK], [sMASK], sop, eop…) after its pieces"));
    };
    model.pieces.truncate(start);
    Ok(Some((model, flavour)))
}

/// The ids of `[gMASK]` and `sop` (ChatGLM2/3's name; GLM-4's is `<sop>`), which THUDM's
/// tokenizers put before every text.
fn chatglm_prefix(tokens: &[&str], sop: &str) -> Option<Vec<u32>> {
    let id = |token: &str| tokens.iter().position(|t| *t == token).map(|i| i as u32);
    Some(vec![id("[gMASK]")?, id(sop)?])
}

/// The tokens and their ggml types.
fn vocabulary(meta: &GgufMetadata) -> Result<(Vec<&str>, Vec<u64>), LoadError> {
    let tokens = meta.get("tokenizer.ggml.tokens").and_then(Value::as_array)
        .ok_or_else(|| meta.error("tokenizer.ggml.tokens", "missing or not an array"))?;
    let types = meta.get("tokenizer.ggml.token_type").and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect()).unwrap_or_default();
    Ok((tokens.iter().map(|t| t.as_str().unwrap_or_default()).collect(), types))
}

/// HF's normalizer, pre-tokenizer and `ignore_merges` for a byte-level BPE whose
/// `tokenizer.ggml.pre` names it ([`crate::gguf_pre::BYTE_LEVEL_SPLITS`]; GPT-2's also when the
/// key is absent, as in older files). Any other name is refused: splitting text another way would
/// change the ids without a word.
fn byte_level_pre_tokenizer(meta: &GgufMetadata) -> Result<(Value, Value, bool), LoadError> {
    let key = "tokenizer.ggml.pre";
    let name = meta.get(key).and_then(Value::as_str).unwrap_or("gpt-2");
    let splits = crate::gguf_pre::BYTE_LEVEL_SPLITS;
    let Some(split) = splits.iter().find(|s| s.names.contains(&name)) else {
        if let Some((_, why)) = crate::gguf_pre::REFUSED.iter().find(|(names, _)| names.contains(&name)) {
            return Err(meta.error(key, &format!("pre-tokenizer '{name}' is not read by ember: {why}; read the model from its HF folder instead")));
        }
        let known: Vec<&str> = splits.iter().flat_map(|s| s.names.iter().copied()).collect();
        return Err(meta.error(key, &format!("pre-tokenizer '{name}' is not known to ember (known: {}); read the model from its HF folder instead", known.join(", "))));
    };
    let pre_tokenizer = if split.regexes.is_empty() {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
    } else {
        split_then_byte_level(split.regexes)
    };
    let normalizer = if split.nfc { json!({"type": "NFC"}) } else { Value::Null };
    Ok((normalizer, pre_tokenizer, split.ignore_merges))
}

/// Builds an HF `tokenizer.json` from the GGUF vocabulary: byte-level BPE for `gpt2`
/// tokenizers, SentencePiece-style BPE with byte fallback for `llama` ones.
pub fn tokenizer_json(meta: &GgufMetadata) -> Result<Value, LoadError> {
    let model = meta.str("tokenizer.ggml.model")?;
    let (tokens, types) = vocabulary(meta)?;
    let add_bos = meta.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool);
    match model {
        "gpt2" => {
            let bos_id = meta.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64).map(|id| id as u32).filter(|&id| (id as usize) < tokens.len());
            // ggml token types: 3 = control, 4 = user-defined; both are matched before the model runs.
            let added_tokens: Vec<Value> = tokens.iter().enumerate()
                .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
                .map(|(i, t)| sentencepiece::added_token(i, t, types.get(i) == Some(&3)))
                .collect();
            let vocab: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
            // GLM-4 starts every text with `[gMASK]<sop>`; others with BOS if the file says so.
            let prefix = match meta.get("general.architecture").and_then(Value::as_str) {
                Some("chatglm" | "glm4") => chatglm_prefix(&tokens, "<sop>").ok_or_else(|| meta.error("tokenizer.ggml.tokens", "no [gMASK] and <sop> tokens"))?,
                _ => bos_id.filter(|_| add_bos.unwrap_or(false)).into_iter().collect(),
            };
            let affixes = Affixes { prefix: prefix.into_iter().map(|id| (tokens[id as usize].to_string(), id)).collect(), suffix: Vec::new() };
            let merges = meta.get("tokenizer.ggml.merges").and_then(Value::as_array)
                .ok_or_else(|| meta.error("tokenizer.ggml.merges", "missing for a gpt2 tokenizer"))?;
            let (normalizer, pre_tokenizer, ignore_merges) = byte_level_pre_tokenizer(meta)?;
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": affixes.post_processor(),
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                    "vocab": vocab, "merges": merges},
            }))
        }
        "llama" => {
            let (model, flavour) = sentencepiece_model(meta)?.expect("a llama vocabulary");
            let prefix = match flavour {
                // LLaMA's tokenizers add BOS unless the file says otherwise.
                Flavour::SentencePiece => model.bos_id.filter(|_| add_bos.unwrap_or(true)).into_iter().collect(),
                _ => chatglm_prefix(&tokens, "sop").ok_or_else(|| meta.error("tokenizer.ggml.tokens", "no [gMASK] and sop tokens"))?,
            };
            let affixes = Affixes { prefix: prefix.into_iter().map(|id| (tokens[id as usize].to_string(), id)).collect(), suffix: Vec::new() };
            Ok(sentencepiece::tokenizer_json(&model, flavour.chatglm_specials(), &affixes))
        }
        other => Err(meta.error("tokenizer.ggml.model", &format!("'{other}' is not supported (supported: gpt2, llama)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn q4_1_block_dequantizes_low_then_high_nibbles() {
        // d = 1.0, m = -8.0; byte j holds element j (low) and j+16 (high)
        let mut block = vec![0x00, 0x3c, 0x00, 0xc8];
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let values = dequantize(GgmlType::Q4_1, &block);
        assert_eq!(values[0], -8.0);
        assert_eq!(values[15], 7.0);
        assert_eq!(values[16], 7.0);
        assert_eq!(values[31], -8.0);
    }

    /// Every type's blocks (tests/fixtures/ggml_quants/blocks.safetensors) dequantize to the
    /// values llama.cpp's Python package (`gguf.quants.dequantize`) gives, bit for bit.
    #[test]
    fn dequantizes_as_llama_cpps_python_package() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/ggml_quants/blocks.safetensors");
        let bytes = std::fs::read(path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (kind, id) in [
            (GgmlType::Q4_0, 2),
            (GgmlType::Q4_1, 3),
            (GgmlType::Q5_0, 6),
            (GgmlType::Q5_1, 7),
            (GgmlType::Q8_0, 8),
            (GgmlType::Q2_K, 10),
            (GgmlType::Q3_K, 11),
            (GgmlType::Q4_K, 12),
            (GgmlType::Q5_K, 13),
            (GgmlType::Q6_K, 14),
            (GgmlType::IQ4_NL, 20),
            (GgmlType::IQ4_XS, 23),
            (GgmlType::IQ2_XXS, 16),
            (GgmlType::IQ2_XS, 17),
            (GgmlType::IQ2_S, 22),
            (GgmlType::IQ3_XXS, 18),
            (GgmlType::IQ3_S, 21),
            (GgmlType::IQ1_S, 19),
            (GgmlType::IQ1_M, 29),
            (GgmlType::TQ1_0, 34),
            (GgmlType::TQ2_0, 35),
            (GgmlType::MXFP4, 39),
            (GgmlType::NVFP4, 40),
        ] {
            assert_eq!(GgmlType::from_id(id), Some(kind));
            let name = format!("{kind:?}");
            let blocks = file.tensor(&format!("{name}.blocks")).unwrap();
            let expected: Vec<f32> = file.tensor(&format!("{name}.values")).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let ours = dequantize(kind, blocks.data());
            assert_eq!(ours.len(), expected.len(), "{name}");
            let differ = ours.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{name}: {differ} values differ");
        }
    }

    /// Q1_0 and Q2_0 (gguf-py has no reader for them), from ggml's `dequantize_row_*`: a set bit
    /// is `d`, a clear one `−d`; a 2-bit code `q` is `(q − 1)·d`.
    #[test]
    fn q1_0_and_q2_0_blocks_dequantize_as_ggml() {
        let mut block = vec![0x00, 0x3c];
        block.extend((0..16u8).map(|j| if j == 0 { 0b1000_0101 } else { 0 }));
        let values = dequantize(GgmlType::Q1_0, &block);
        assert_eq!(&values[..8], &[1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]);
        assert!(values[8..].iter().all(|&v| v == -1.0));
        let mut block = vec![0x00, 0x40];
        block.extend((0..16u8).map(|j| if j == 0 { 0b11_10_01_00 } else { 0x55 }));
        let values = dequantize(GgmlType::Q2_0, &block);
        assert_eq!(&values[..4], &[-2.0, 0.0, 2.0, 4.0]);
        assert!(values[4..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn unpermute_restores_rotate_half_order() {
        // one head, head_dim 4: llama.cpp order [0, 2, 1, 3] -> HF order [0, 1, 2, 3]
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 4, 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }
}
