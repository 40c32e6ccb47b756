//! Memory-mapped safetensors checkpoints (one file or an HF shard index).
//!
//! The files stay mapped; a tensor's bytes are copied once into the backend tensor and its
//! pages of the mapping are then dropped, so the base never exists twice in process memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor, TensorData};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};

use crate::LoadError;

/// Float dtype that loaded base weights are converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadDtype {
    /// Keep the checkpoint's dtype (bf16/f16 frozen bases on the GPU).
    Checkpoint,
    /// Convert to f32 (the CPU default).
    F32,
    /// Convert to bf16 (halves a f32 checkpoint's memory).
    Bf16,
}

impl LoadDtype {
    const ALL: [LoadDtype; 3] = [LoadDtype::F32, LoadDtype::Bf16, LoadDtype::Checkpoint];

    /// `f32`, `bf16` or `checkpoint`, as recipes and flags write it.
    pub fn name(self) -> &'static str {
        match self {
            LoadDtype::F32 => "f32",
            LoadDtype::Bf16 => "bf16",
            LoadDtype::Checkpoint => "checkpoint",
        }
    }

    /// The dtype named `name`, or an error listing the names.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|d| d.name() == name).ok_or_else(|| format!("'{name}': expected f32, bf16 or checkpoint"))
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + JSON header).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// Every tensor of a checkpoint, by HF key.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    /// key -> index into `files`
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| LoadError::io(&index_path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::json(&index_path, e))?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                LoadError::Invalid { path: index_path.clone(), reason: "no \"weight_map\" object".into() }
            })?;
            let mut shards: Vec<String> = map
                .values()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| LoadError::Invalid {
                    path: index_path.clone(),
                    reason: "\"weight_map\" values must be file names".into(),
                })?;
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open_files(&paths);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(LoadError::Missing {
            path: single,
            what: "model weights (model.safetensors or model.safetensors.index.json)",
        })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self, LoadError> {
        Self::open_files(&[path.to_path_buf()])
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
            // SAFETY: the file is opened read-only; a checkpoint changing underneath a run is
            // outside what any loader (PyTorch's included) can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                LoadError::Invalid { path: path.clone(), reason: format!("not a valid safetensors file: {e}") }
            })?;
            let tensors: HashMap<String, TensorInfo> =
                metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
            for key in tensors.keys() {
                if let Some(prev) = index.insert(key.clone(), files.len()) {
                    let prev: &MappedFile = &files[prev];
                    return Err(LoadError::Invalid {
                        path: path.clone(),
                        reason: format!("tensor '{key}' also in {}", prev.path.display()),
                    });
                }
            }
            files.push(MappedFile { path: path.clone(), mmap, data_start: 8 + header_len, tensors });
        }
        Ok(Self { files, index })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Shape and dtype of a tensor, without reading it.
    pub fn info(&self, key: &str) -> Option<(&[usize], Dtype)> {
        let file = &self.files[*self.index.get(key)?];
        let info = &file.tensors[key];
        Some((&info.shape, info.dtype))
    }

    /// Path of the file holding `key` (for error messages).
    pub fn path_of(&self, key: &str) -> Option<&Path> {
        self.index.get(key).map(|&i| self.files[i].path.as_path())
    }

    /// The first file's path (for error messages about the checkpoint as a whole).
    pub fn first_path(&self) -> &Path {
        &self.files[0].path
    }

    /// Raw little-endian bytes of a tensor, borrowed from the mapping.
    pub fn bytes(&self, key: &str) -> Result<(&[u8], &[usize], Dtype), LoadError> {
        let &i = self.index.get(key).ok_or_else(|| LoadError::MissingTensor {
            path: self.files[0].path.clone(),
            key: key.to_owned(),
        })?;
        let file = &self.files[i];
        let info = &file.tensors[key];
        let (start, end) = info.data_offsets;
        Ok((&file.mmap[file.data_start + start..file.data_start + end], &info.shape, info.dtype))
    }

    /// Drops `key`'s pages of the mapping from this process's memory once its bytes are
    /// copied: otherwise the mapped file stays resident beside the loaded copy until the
    /// checkpoint is closed, and peak memory holds the base twice. The mapping is read-only, so
    /// a later read faults the same bytes back in from the file.
    pub fn release(&self, key: &str) {
        let Some(&i) = self.index.get(key) else { return };
        let file = &self.files[i];
        let (start, end) = file.tensors[key].data_offsets;
        // SAFETY: MADV_DONTNEED on a read-only, file-backed shared mapping only evicts clean
        // pages; their contents stay those of the file.
        let _ = unsafe { file.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, file.data_start + start, end - start) };
    }

    /// Loads `key` as a float tensor, checking its shape against `expected`.
    pub fn float<const D: usize>(
        &self,
        key: &str,
        expected: [usize; D],
        dtype: LoadDtype,
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        let (bytes, shape, file_dtype) = self.bytes(key)?;
        let path = || self.path_of(key).unwrap_or(self.first_path()).to_path_buf();
        if shape != expected {
            return Err(LoadError::Shape {
                path: path(),
                key: key.to_owned(),
                expected: expected.to_vec(),
                found: shape.to_vec(),
            });
        }
        let Some(burn_dtype) = burn_dtype(file_dtype) else {
            return Err(LoadError::Invalid {
                path: path(),
                reason: format!("tensor '{key}' has dtype {file_dtype:?}; expected F32, BF16 or F16"),
            });
        };
        let data = TensorData::from_bytes_vec(bytes.to_vec(), expected, burn_dtype);
        self.release(key);
        // The file's dtype, explicitly: without one, burn converts to the device's default (f32).
        let tensor = Tensor::<D>::from_data(data, (device, burn_dtype));
        Ok(match dtype {
            LoadDtype::F32 if burn_dtype != DType::F32 => tensor.cast(DType::F32),
            LoadDtype::Bf16 if burn_dtype != DType::BF16 => tensor.cast(DType::BF16),
            _ => tensor,
        })
    }
}

/// burn's dtype of a floating-point safetensors dtype; `None` for the others.
pub fn burn_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// The safetensors dtype a burn float tensor is written as (f32 for anything but bf16/f16).
pub fn safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        _ => Dtype::F32,
    }
}
