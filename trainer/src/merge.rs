//! `ember merge`: folds an adapter into its base and writes a complete HF folder, for every
//! method whose parameters are a change of the weights (LoRA, DoRA, (IA)³: each method's
//! `WeightMerge` says how).
//!
//! Streams tensor by tensor from the memory-mapped base: each output tensor is computed when
//! the writer reaches it (the method's merge for adapted tensors, a copy otherwise), so a 7B
//! merge holds one tensor in memory, never two models.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{bf16, f16, DType, Device, Tensor, TensorData};
use ember_adapters::{AdapterError, Method, WeightMerge};
use ember_models::checkpoint::{burn_dtype, safetensors_dtype};
use ember_models::{Checkpoint, LoadError, ModelConfig};
use safetensors::tensor::{Dtype, View};

/// Shards above this size are split, as transformers' default `max_shard_size="5GB"`.
const MAX_SHARD_BYTES: usize = 5_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// Each tensor keeps the base checkpoint's dtype.
    Keep,
    F32,
    Bf16,
    F16,
}

impl MergeDtype {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "keep" => Self::Keep,
            "f32" => Self::F32,
            "bf16" => Self::Bf16,
            "f16" => Self::F16,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct MergeSummary {
    /// Base tensors the adapter changed.
    pub merged_tensors: usize,
    pub tensors: usize,
    pub shards: usize,
    pub bytes: usize,
}

/// One output tensor, produced on demand.
struct OutputTensor<'a> {
    base: &'a Checkpoint,
    key: String,
    /// In the base checkpoint, and in the output (more rows for a grown vocabulary).
    base_shape: Vec<usize>,
    shape: Vec<usize>,
    dtype: DType,
    /// The adapter's merge, for a tensor it changes.
    merge: Option<&'a dyn WeightMerge>,
    device: &'a Device,
}

impl View for &OutputTensor<'_> {
    fn dtype(&self) -> Dtype {
        safetensors_dtype(self.dtype)
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let out = self.merged();
        // The base's pages of this tensor are dropped once copied: otherwise the process maps
        // in the whole base (13.5 GB of a 7B bf16) as the shards are written.
        self.base.release(&self.key);
        Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * safetensors_dtype(self.dtype).bitsize() / 8
    }
}

impl OutputTensor<'_> {
    /// The output tensor's bytes: the base's, merged with the adapter's change if it has one, in
    /// the output dtype.
    fn merged(&self) -> Vec<u8> {
        let (bytes, _, file_dtype) = self.base.bytes(&self.key).expect("key listed by the base checkpoint");
        if self.merge.is_none() && burn_dtype(file_dtype) == Some(self.dtype) {
            return bytes.to_vec();
        }
        let dims: [usize; 2] = match self.base_shape.as_slice() {
            [a, b] => [*a, *b],
            [a] => [1, *a],
            other => [1, other.iter().product()],
        };
        let values = decode_f32(bytes, burn_dtype(file_dtype).expect("float checked before"));
        let mut tensor = Tensor::<2>::from_data(TensorData::new(values, dims), self.device);
        if let Some(merge) = self.merge {
            // Shapes were checked before writing started.
            tensor = merge.apply(&self.key, tensor, self.device);
        }
        let values = tensor.into_data().try_into_vec::<f32>().expect("merges compute in f32");
        encode_f32(&values, self.dtype)
    }
}

// The casts to and from f32 write their output in the same pass, rather than burn's cast
// followed by a copy into the bytes safetensors takes: a 7B merge moves 13.5 GB each way.

/// Little-endian F32/BF16/F16 `bytes` as f32 values.
fn decode_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => unreachable!("merge reads F32/BF16/F16, not {other:?}"),
    }
}

/// `values` as little-endian bytes of `dtype` (F32, BF16 or F16; round to nearest even).
fn encode_f32(values: &[f32], dtype: DType) -> Vec<u8> {
    fn encode<const N: usize>(values: &[f32], to_bytes: impl Fn(f32) -> [u8; N]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * N];
        for (out, &v) in out.chunks_exact_mut(N).zip(values) {
            out.copy_from_slice(&to_bytes(v));
        }
        out
    }
    match dtype {
        DType::F32 => encode(values, f32::to_le_bytes),
        DType::BF16 => encode(values, |v| bf16::from_f32(v).to_le_bytes()),
        DType::F16 => encode(values, |v| f16::from_f32(v).to_le_bytes()),
        other => unreachable!("merge writes F32/BF16/F16, not {other:?}"),
    }
}

/// What stops a merge: the base or the adapter (input), or writing the output (run).
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Base(#[from] LoadError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

impl MergeError {
    /// True when the base or the adapter is at fault; false when writing failed.
    pub fn is_input(&self) -> bool {
        match self {
            MergeError::Base(e) => e.is_input(),
            MergeError::Adapter(e) => e.is_input(),
            MergeError::Write { .. } => false,
        }
    }
}

/// `template` as the chat template of the tokenizer in `dir`: its `tokenizer_config.json`'s
/// `chat_template`, and its `chat_template.jinja` where there is one (transformers reads that
/// first).
fn with_chat_template(dir: &Path, template: &str) -> Result<(), (PathBuf, std::io::Error)> {
    let path = dir.join("tokenizer_config.json");
    let mut config = match std::fs::read_to_string(&path) {
        Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(config) if config.is_object() => config,
            _ => return Err((path, std::io::Error::other("not a JSON object, so its chat_template cannot be set"))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err((path, e)),
    };
    config["chat_template"] = template.into();
    ember_models::write_json(&path, &config).map_err(|e| (path.clone(), e))?;
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        std::fs::write(&jinja, template).map_err(|e| (jinja.clone(), e))?;
    }
    Ok(())
}

/// Merges `adapter_dir` into `base_dir`, writing `out_dir` atomically; with `chat_template`
/// (the Jinja template the adapter was trained with), the merged tokenizer carries it instead of
/// the base's.
pub fn merge(base_dir: &Path, adapter_dir: &Path, out_dir: &Path, dtype: MergeDtype, chat_template: Option<&str>) -> Result<MergeSummary, MergeError> {
    if ember_models::gguf::GgufFile::is_gguf(base_dir) {
        return Err(LoadError::Invalid {
            path: base_dir.to_path_buf(),
            reason: "merge writes an HF folder from a safetensors base: run `ember import gguf` on the file first (it dequantizes to f32), \
                     or keep the GGUF and apply the adapter in llama.cpp with `ember export gguf-lora`".into(),
        }
        .into());
    }
    let device = Device::flex();
    let config = ModelConfig::from_dir(base_dir)?;
    let base = Checkpoint::open_dir(base_dir)?;
    ember_models::family::check_checkpoint(&config, &base)?;
    let merge = Method::weight_merge(adapter_dir, &config)?;
    merge.check(&base)?;
    let changed: std::collections::HashSet<String> = merge.keys().into_iter().collect();

    let mut outputs = Vec::new();
    for key in base.keys() {
        let (shape, file_dtype) = base.info(key).expect("listed");
        let Some(source) = burn_dtype(file_dtype) else {
            let path = base.path_of(key).unwrap().to_path_buf();
            return Err(LoadError::Invalid { path, reason: format!("tensor '{key}' has dtype {file_dtype:?}; merge handles F32/BF16/F16") }.into());
        };
        let out_dtype = match dtype {
            MergeDtype::Keep => source,
            MergeDtype::F32 => DType::F32,
            MergeDtype::Bf16 => DType::BF16,
            MergeDtype::F16 => DType::F16,
        };
        let merge = changed.contains(key).then_some(merge.as_ref());
        let out_shape = merge.map_or_else(|| shape.to_vec(), |m| m.output_shape(key, shape));
        outputs.push(OutputTensor { base: &base, key: key.to_owned(), base_shape: shape.to_vec(), shape: out_shape, dtype: out_dtype, merge, device: &device });
    }

    // Shards of at most MAX_SHARD_BYTES, in key order.
    let mut shards: Vec<Vec<&OutputTensor>> = vec![Vec::new()];
    let mut shard_bytes = 0;
    for t in &outputs {
        let len = t.data_len();
        if shard_bytes > 0 && shard_bytes + len > MAX_SHARD_BYTES {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += len;
        shards.last_mut().unwrap().push(t);
    }
    let total_bytes: usize = outputs.iter().map(|t| t.data_len()).sum();
    let shard_count = shards.len();

    let mut config_json = ModelConfig::read_json(&base_dir.join("config.json"))?;
    // Modules trained in full with an extended vocabulary grow the model's.
    if let Some(vocab) = merge.vocab_size().filter(|&v| v > config.vocab_size) {
        let key = if config_json.get("padded_vocab_size").is_some() { "padded_vocab_size" } else { "vocab_size" };
        config_json[key] = vocab.into();
    }
    if let Some(name) = match dtype {
        MergeDtype::Keep => None,
        MergeDtype::F32 => Some("float32"),
        MergeDtype::Bf16 => Some("bfloat16"),
        MergeDtype::F16 => Some("float16"),
    } {
        config_json["torch_dtype"] = name.into();
    }

    let io = |path: &Path, e: std::io::Error| MergeError::Write { path: ember_models::destination_path(path), source: e };
    ember_models::write_dir_atomically(
        out_dir,
        |tmp| {
            // Everything but the weights (tokenizer, generation config, templates…) is copied.
            for entry in std::fs::read_dir(base_dir).map_err(|e| io(base_dir, e))? {
                let path = entry.map_err(|e| io(base_dir, e))?.path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let is_weights = name.ends_with(".safetensors") || name.ends_with(".bin") || name == "model.safetensors.index.json";
                if path.is_file() && !is_weights && name != "config.json" {
                    std::fs::copy(&path, tmp.join(&name)).map_err(|e| io(&path, e))?;
                }
            }
            if let Some(template) = chat_template {
                with_chat_template(tmp, template).map_err(|(path, e)| io(&path, e))?;
            }
            let config_path = tmp.join("config.json");
            ember_models::write_json(&config_path, &config_json).map_err(|e| io(&config_path, e))?;
            let mut weight_map = BTreeMap::new();
            for (i, shard) in shards.iter().enumerate() {
                let name = if shard_count == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{shard_count:05}.safetensors", i + 1) };
                let path: PathBuf = tmp.join(&name);
                ember_models::write_safetensors(&path, shard.iter().map(|t| (t.key.as_str(), *t))).map_err(|e| io(&path, e))?;
                if crate::fault::armed(crate::fault::Fault::SignalInMerge, i + 1) {
                    crate::fault::terminate_self();
                    // The signal thread removes the temporary and exits.
                    std::thread::sleep(std::time::Duration::from_secs(60));
                }
                for t in shard {
                    weight_map.insert(t.key.clone(), name.clone());
                }
            }
            if shard_count > 1 {
                let index = serde_json::json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
                let path = tmp.join("model.safetensors.index.json");
                ember_models::write_json(&path, &index).map_err(|e| io(&path, e))?;
            }
            Ok(())
        },
        io,
    )?;
    let merged_tensors = outputs.iter().filter(|t| t.merge.is_some()).count();
    Ok(MergeSummary { merged_tensors, tensors: outputs.len(), shards: shard_count, bytes: total_bytes })
}
