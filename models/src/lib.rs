//! Base architectures for ember: LLaMA-family and GLM-family decoders in burn, loaded from
//! Hugging Face model folders (config.json + safetensors), with every base weight frozen.

pub mod checkpoint;
pub mod device;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod glm;
pub mod layers;
pub mod llama;
pub mod transformer;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use checkpoint::{Checkpoint, LoadDtype};
pub use config::{Architecture, ModelConfig};
pub use transformer::{BaseModel, CausalLm, KvCache, LayerExtras, Projection};

/// Everything that can go wrong reading a model folder. Each variant names the file and,
/// where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: missing {what}", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: key '{key}': {reason}", path.display())]
    ConfigKey { path: PathBuf, key: String, reason: String },
    #[error("{}: missing tensor '{key}'", path.display())]
    MissingTensor { path: PathBuf, key: String },
    #[error("{}: tensor '{key}' has shape {found:?}, expected {expected:?}", path.display())]
    Shape { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return LoadError::Missing { path: path.to_path_buf(), what: "file" };
        }
        LoadError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        LoadError::Json { path: path.to_path_buf(), source }
    }
}

/// Writes a folder through `write` into a temporary sibling, then renames it to `out`, so a
/// crash never leaves a half-written output. An existing `out` is replaced only once the new
/// one is complete. `io_error` turns a failed file operation into the caller's error type.
pub fn write_dir_atomically<E>(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
    io_error: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    let result = write(&tmp).and_then(|()| {
        for entry in std::fs::read_dir(&tmp).map_err(|e| io_error(&tmp, e))? {
            let path = entry.map_err(|e| io_error(&tmp, e))?.path();
            File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io_error(&path, e))?;
        }
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| io_error(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| io_error(out, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
