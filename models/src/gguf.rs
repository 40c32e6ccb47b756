//! Reading GGUF files (llama.cpp's format) and converting a LLaMA-architecture GGUF into an HF
//! model folder: config.json, model.safetensors (f32), tokenizer.json and its config files.
//!
//! Every length and offset in the header is checked against the file before it is used, so a
//! truncated or lying file is an error, never a panic or a huge allocation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, View};
use serde_json::{Map, Value, json};

use crate::family::Role;
use crate::{LoadError, llama};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// Tensor element types this reader can dequantize (ggml type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    fn block(self) -> (u64, u64) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
        }
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
                .ok_or_else(|| invalid(format!("ggml type {type_id} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)")))?;
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

/// Dequantizes ggml blocks. Layouts as in ggml-quants.c: Q4 blocks keep element j in the low
/// nibble of byte j and element j+16 in the high nibble.
fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match kind {
        GgmlType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        GgmlType::BF16 => bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|b| {
                let d = half_at(b, 0);
                b[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let block_bytes = kind.block().1 as usize;
            let mut out = Vec::with_capacity(bytes.len() / block_bytes * 32);
            for b in bytes.chunks_exact(block_bytes) {
                let d = half_at(b, 0);
                let (min, qs) = if kind == GgmlType::Q4_1 { (half_at(b, 2), &b[4..]) } else { (-8.0 * d, &b[2..]) };
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + min));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + min));
            }
            out
        }
    }
}

/// llama.cpp stores q/k rows permuted for its interleaved RoPE; this restores HF's
/// `rotate_half` order: GGUF row `h·2d + 2i + j` is HF row `h·2d + j·d + i`.
pub(crate) fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0f32; values.len()];
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
    tensor: &'a GgufTensor,
    /// Heads to un-permute q/k rows with.
    unpermute_heads: Option<usize>,
}

impl View for &LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut values = self.file.dequantize(self.tensor);
        if let Some(heads) = self.unpermute_heads {
            let [rows, cols] = [self.tensor.shape[0], self.tensor.shape[1]];
            values = unpermute_rows(&values, rows, cols, heads);
        }
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.tensor.shape.iter().product::<usize>() * 4
    }
}

/// llama.cpp's names of the per-layer projections of a LLaMA model, by role.
const GGUF_PROJECTIONS: [(&str, Role); 7] = [
    ("attn_q", Role::Q),
    ("attn_k", Role::K),
    ("attn_v", Role::V),
    ("attn_output", Role::O),
    ("ffn_gate", Role::Gate),
    ("ffn_up", Role::Up),
    ("ffn_down", Role::Down),
];

/// HF name of a GGUF tensor in a LLaMA checkpoint (from LLaMA's table, [`llama::KEYS`]), and
/// the projection's role if it is one.
pub(crate) fn hf_name(gguf: &str) -> Option<(String, Option<Role>)> {
    let keys = &llama::KEYS;
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
        _ => {
            let role = GGUF_PROJECTIONS.iter().find(|(n, _)| *n == module)?.1;
            (keys.roles(layer).into_iter().find(|(_, r)| *r == role)?.0, Some(role))
        }
    };
    Some((format!("{name}.{suffix}"), role))
}

/// What [`import_llama`] wrote.
#[derive(Debug)]
pub struct ImportSummary {
    pub tensors: usize,
    pub parameters: usize,
    pub tokenizer_model: String,
    pub skipped: Vec<String>,
}

/// Converts a LLaMA-architecture GGUF into an HF folder at `out` (written to a temporary
/// folder, then renamed).
pub fn import_llama(path: &Path, out: &Path) -> Result<ImportSummary, LoadError> {
    let gguf = GgufFile::open(path)?;
    let arch = gguf.metadata.str("general.architecture")?;
    if arch != "llama" {
        return Err(gguf.metadata.error("general.architecture", &format!("'{arch}' is not supported (supported: llama)")));
    }
    let heads = gguf.metadata.u64("llama.attention.head_count")? as usize;
    let kv_heads = gguf.metadata.get("llama.attention.head_count_kv").and_then(Value::as_u64).map_or(heads, |n| n as usize);
    let hidden = gguf.metadata.u64("llama.embedding_length")? as usize;
    let tokens = gguf.metadata.get("tokenizer.ggml.tokens").and_then(Value::as_array)
        .ok_or_else(|| gguf.metadata.error("tokenizer.ggml.tokens", "missing or not an array"))?;
    let embed = gguf.tensor("token_embd.weight").ok_or_else(|| LoadError::MissingTensor { path: path.to_path_buf(), key: "token_embd.weight".into() })?;
    let vocab = embed.shape[0];
    let tied = gguf.tensor("output.weight").is_none();

    let mut views = Vec::new();
    let mut skipped = Vec::new();
    let mut parameters = 0;
    for tensor in &gguf.tensors {
        let Some((name, role)) = hf_name(&tensor.name) else {
            // e.g. rope_freqs.weight: recomputed from the config.
            skipped.push(tensor.name.clone());
            continue;
        };
        // llama.cpp stores q/k rows permuted for its RoPE pairing; HF's rotate_half wants them back.
        let unpermute_heads = match role {
            Some(Role::Q) if name.ends_with(".weight") => Some(heads),
            Some(Role::K) if name.ends_with(".weight") => Some(kv_heads),
            _ => None,
        };
        parameters += tensor.shape.iter().product::<usize>();
        views.push((name, LazyTensor { file: &gguf, tensor, unpermute_heads }));
    }
    views.sort_by(|a, b| a.0.cmp(&b.0));

    let get_f64 = |key: &str| gguf.metadata.get(key).and_then(Value::as_f64);
    let token_id = |key: &str| gguf.metadata.get(key).and_then(Value::as_u64);
    let head_dim = gguf.metadata.get("llama.rope.dimension_count").and_then(Value::as_u64).map_or(hidden / heads, |n| n as usize);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": gguf.metadata.u64("llama.feed_forward_length")?,
        "num_hidden_layers": gguf.metadata.u64("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": gguf.metadata.get("llama.context_length").and_then(Value::as_u64).unwrap_or(2048),
        "rms_norm_eps": get_f64("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": get_f64("llama.rope.freq_base").unwrap_or(10000.0),
        "rope_scaling": Value::Null,
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    });
    let tokenizer = tokenizer_json(&gguf.metadata)?;
    let token_name = |key: &str| token_id(key).and_then(|id| tokens.get(id as usize)).cloned().unwrap_or(Value::Null);
    let add_bos = gguf.metadata.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_name("tokenizer.ggml.bos_token_id"),
        "eos_token": token_name("tokenizer.ggml.eos_token_id"),
        "pad_token": token_name("tokenizer.ggml.padding_token_id"),
        "unk_token": token_name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": false,
        "chat_template": gguf.metadata.get("tokenizer.chat_template").cloned().unwrap_or(Value::Null),
    });
    let generation_config = json!({
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
    });

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
        crate::write_safetensors(&weights, views.iter().map(|(n, v)| (n.as_str(), v))).map_err(|e| LoadError::write(&weights, e))
    }, LoadError::write)?;
    Ok(ImportSummary {
        tensors: views.len(),
        parameters,
        tokenizer_model: gguf.metadata.str("tokenizer.ggml.model").unwrap_or("?").to_owned(),
        skipped,
    })
}

/// Builds an HF `tokenizer.json` from the GGUF vocabulary: byte-level BPE for `gpt2`
/// tokenizers, SentencePiece-style BPE with byte fallback for `llama` ones.
pub fn tokenizer_json(meta: &GgufMetadata) -> Result<Value, LoadError> {
    let model = meta.str("tokenizer.ggml.model")?;
    let tokens = meta.get("tokenizer.ggml.tokens").and_then(Value::as_array)
        .ok_or_else(|| meta.error("tokenizer.ggml.tokens", "missing or not an array"))?;
    let tokens: Vec<&str> = tokens.iter().map(|t| t.as_str().unwrap_or_default()).collect();
    let types: Vec<u64> = meta.get("tokenizer.ggml.token_type").and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect()).unwrap_or_default();
    // ggml token types: 3 = control, 4 = user-defined; both are matched before the model runs.
    let added_tokens: Vec<Value> = tokens.iter().enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": types.get(i) == Some(&3)}))
        .collect();
    let vocab: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    let bos = meta.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let add_bos = meta.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool);
    let post_processor = |default_add_bos: bool| match bos {
        Some(id) if add_bos.unwrap_or(default_add_bos) => {
            let bos = tokens.get(id as usize).copied().unwrap_or_default();
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}}})
        }
        _ => Value::Null,
    };
    match model {
        "gpt2" => {
            let merges = meta.get("tokenizer.ggml.merges").and_then(Value::as_array)
                .ok_or_else(|| meta.error("tokenizer.ggml.merges", "missing for a gpt2 tokenizer"))?;
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": null,
                "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
                "post_processor": post_processor(false),
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges},
            }))
        }
        "llama" => {
            let scores: Vec<f64> = meta.get("tokenizer.ggml.scores").and_then(Value::as_array)
                .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect())
                .ok_or_else(|| meta.error("tokenizer.ggml.scores", "missing for a llama tokenizer"))?;
            let unk = meta.get("tokenizer.ggml.unknown_token_id").and_then(Value::as_u64)
                .and_then(|id| tokens.get(id as usize)).copied();
            Ok(json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "▁"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
                "pre_tokenizer": null,
                "post_processor": post_processor(true),
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": ember_data::sentencepiece::merges(&tokens, &scores)},
            }))
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

    #[test]
    fn unpermute_restores_rotate_half_order() {
        // one head, head_dim 4: llama.cpp order [0, 2, 1, 3] -> HF order [0, 1, 2, 3]
        let gguf = [0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 4, 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }
}
