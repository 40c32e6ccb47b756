//! Base architectures for ember: LLaMA-family and GLM-family decoders in burn, loaded from
//! Hugging Face model folders (config.json + safetensors), with every base weight frozen.

pub mod attention;
pub mod batch;
pub mod checkpoint;
pub mod device;
pub mod files;
pub mod config;
pub mod generate;
pub mod ggml;
pub mod gguf;
mod gguf_pre;
pub mod gguf_write;
pub mod ggml_encode;
pub mod family;
pub mod fused;
pub mod glm;
pub mod hub;
pub mod imatrix;
pub mod layers;
pub mod llama;
pub mod nf4;
pub mod pickle;
pub mod torch;
pub mod transformer;

use std::path::{Path, PathBuf};

pub use checkpoint::{Checkpoint, LoadDtype};
pub use config::{Architecture, ModelConfig};
pub use files::{destination_path, remove_stale_temporaries, write_dir_atomically, write_file_atomically, write_json, write_safetensors, write_safetensors_with};
pub use attention::LayerExtras;
pub use batch::{KvCache, Layout, Masks, TokenBatch};
pub use layers::Projection;
pub use transformer::{BaseModel, CausalLm, Rows, VocabModule};

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
    /// A valid config that asks for something ember does not implement (an architecture, a RoPE
    /// scaling, an activation): the model is not wrong, ember cannot run it.
    #[error("{}: key '{key}': {reason}", path.display())]
    Unsupported { path: PathBuf, key: String, reason: String },
    #[error("{}: missing tensor '{key}'", path.display())]
    MissingTensor { path: PathBuf, key: String },
    #[error("{}: tensor '{key}' has shape {found:?}, expected {expected:?}", path.display())]
    Shape { path: PathBuf, key: String, expected: Vec<usize>, found: Vec<usize> },
    /// Writing an output (an imported model) failed: the run's fault, not the input's.
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// Downloading a model by hub id failed for a reason other than the id: the network, the
    /// disk. The run's fault, not the input's.
    #[error("{id}: {reason}")]
    Download { id: String, reason: String },
}

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return LoadError::Missing { path: path.to_path_buf(), what: "file" };
        }
        LoadError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn write(path: &Path, source: std::io::Error) -> Self {
        LoadError::Write { path: files::destination_path(path), source }
    }

    /// True when the input (a file, a key, a shape) is at fault; false when writing failed.
    pub fn is_input(&self) -> bool {
        !matches!(self, LoadError::Write { .. } | LoadError::Download { .. })
    }

    pub(crate) fn json(path: &Path, source: serde_json::Error) -> Self {
        LoadError::Json { path: path.to_path_buf(), source }
    }
}

/// The tokenizer of a model folder, or of a GGUF file (built from its vocabulary metadata).
pub fn load_tokenizer(path: &Path) -> Result<ember_data::Tokenizer, ember_data::TokenizerError> {
    if !gguf::GgufFile::is_gguf(path) {
        return ember_data::Tokenizer::from_dir(path);
    }
    let invalid = |e: LoadError| ember_data::TokenizerError::Invalid { path: path.to_path_buf(), reason: e.to_string() };
    let file = gguf::GgufFile::open(path).map_err(invalid)?;
    let [tokenizer, generation] = file.tokenizer_configs().map_err(invalid)?;
    let configs = ember_data::tokenizer::Configs { tokenizer: Some(tokenizer), generation: Some(generation), model: None };
    // A `llama` vocabulary is a SentencePiece model: encoded as from tokenizer.model, with
    // user-defined pieces split out as llama.cpp does.
    match gguf::sentencepiece_model(&file.metadata).map_err(invalid)? {
        Some((model, flavour)) => ember_data::Tokenizer::from_gguf_sentencepiece(&model, flavour, &configs, path),
        None => ember_data::Tokenizer::from_json(&gguf::tokenizer_json(&file.metadata).map_err(invalid)?, &configs, path),
    }
}

/// The prompt or chat template `name` for the model at `path` (`auto`: the model's own chat
/// template, from its folder or from a GGUF file's `tokenizer.chat_template`; a `.jinja` file:
/// that template with the model's special tokens); `Ok(None)` for a name that is not built in.
pub fn template(name: &str, path: &Path) -> Result<Option<ember_data::Format>, String> {
    let jinja_file = ember_data::chat::is_jinja_file(name);
    if !(name == "auto" || jinja_file) || !gguf::GgufFile::is_gguf(path) {
        return ember_data::Format::named(name, path);
    }
    let file = gguf::GgufFile::open(path).map_err(|e| e.to_string())?;
    let [tokenizer_config, _] = file.tokenizer_configs().map_err(|e| e.to_string())?;
    let jinja = match jinja_file {
        true => ember_data::chat::JinjaTemplate::from_file(Path::new(name), &tokenizer_config)?,
        false => ember_data::chat::JinjaTemplate::from_config(&tokenizer_config, path, None)?,
    };
    Ok(Some(ember_data::Format::Chat(ember_data::chat::ChatTemplate::Jinja(Box::new(jinja)))))
}
