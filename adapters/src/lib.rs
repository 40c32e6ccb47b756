//! Parameter-efficient fine-tuning methods, one module per method (as PEFT's `tuners/`):
//! each wraps or feeds the frozen base of `ember-models` and reads/writes PEFT's on-disk format.

pub mod adaption;
pub mod lora;
pub mod prefix;

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
}

impl AdapterError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        AdapterError::Invalid { path: path.into(), reason: reason.into() }
    }
}
