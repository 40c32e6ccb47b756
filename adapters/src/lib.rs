//! Parameter-efficient fine-tuning methods, one folder per method (as PEFT's `tuners/`): each
//! wraps or feeds the frozen base of `ember-models` and reads/writes PEFT's on-disk format.
//! `method.rs` is the seam every method implements, `registry.rs` the one list of them.

pub mod adaption;
pub mod dora;
pub mod ia3;
pub mod lora;
pub mod method;
pub mod model;
pub mod prefix;
pub mod prompt_tuning;
pub mod registry;
pub mod target;
pub mod vocab;

pub use method::{AdapterFolder, MethodConfig, PeftMethod, WeightMerge};
pub use model::{AdaptedLinear, AdaptedModel};
pub use registry::Method;

use std::path::PathBuf;

/// Errors reading or applying an adapter; each names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    /// Writing the adapter failed: the run's fault, not the input's.
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

impl AdapterError {
    /// True when the input (a file, a key, the recipe) is at fault; false when writing failed.
    pub fn is_input(&self) -> bool {
        !matches!(self, AdapterError::Write { .. })
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        AdapterError::Invalid { path: path.into(), reason: reason.into() }
    }
}

/// One tensor of an adapter file: key, shape, little-endian f32 bytes.
pub(crate) struct SavedTensor {
    key: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl SavedTensor {
    pub(crate) fn new<const D: usize>(key: impl Into<String>, tensor: burn::tensor::Tensor<D>) -> Self {
        let data = tensor.cast(burn::tensor::DType::F32).into_data();
        Self { key: key.into(), shape: data.shape().to_vec(), bytes: data.as_bytes().to_vec() }
    }
}

/// Writes an adapter folder atomically: `weights_file` (safetensors, `format: pt` as PyTorch
/// writes it) plus JSON files.
pub(crate) fn save_adapter_dir(
    dir: &std::path::Path,
    weights_file: &str,
    tensors: &[SavedTensor],
    json_files: &[(&str, &serde_json::Value)],
) -> Result<(), AdapterError> {
    use safetensors::tensor::{Dtype, TensorView};
    let io = |path: &std::path::Path, e: std::io::Error| AdapterError::Write { path: ember_models::destination_path(path), source: e };
    ember_models::write_dir_atomically(
        dir,
        |tmp| {
            let views: Vec<(String, TensorView)> = tensors
                .iter()
                .map(|t| (t.key.clone(), TensorView::new(Dtype::F32, t.shape.clone(), &t.bytes).expect("f32 bytes match shape")))
                .collect();
            let weights = tmp.join(weights_file);
            ember_models::write_safetensors(&weights, views).map_err(|e| io(&weights, e))?;
            for (name, value) in json_files {
                let path = tmp.join(name);
                ember_models::write_json(&path, value).map_err(|e| io(&path, e))?;
            }
            Ok(())
        },
        io,
    )
}
