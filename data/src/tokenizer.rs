//! An HF `tokenizer.json` plus the special-token ids a trainer needs.
//!
//! The ids come, in this order, from `tokenizer_config.json` (token strings looked up in the
//! vocabulary), `generation_config.json` and `config.json` (numeric ids), as transformers does.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: missing file", .0.display())]
    Missing(PathBuf),
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and the special ids from the folder's config files.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let inner = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json_if_present(&dir.join("generation_config.json"))?;
        let model_config = read_json_if_present(&dir.join("config.json"))?;
        let lookup = |token_key: &str, id_key: &str| -> Option<u32> {
            let by_name = tokenizer_config
                .as_ref()
                .and_then(|c| c.get(token_key))
                .and_then(token_content)
                .and_then(|t| inner.token_to_id(t));
            let by_id = |config: &Option<Value>| {
                let value = config.as_ref()?.get(id_key)?;
                // eos_token_id is often a list; the first entry is the primary one.
                let first = value.as_array().and_then(|a| a.first()).unwrap_or(value);
                first.as_u64().and_then(|n| u32::try_from(n).ok())
            };
            by_name.or_else(|| by_id(&generation_config)).or_else(|| by_id(&model_config))
        };
        Ok(Self {
            bos_id: lookup("bos_token", "bos_token_id"),
            eos_id: lookup("eos_token", "eos_token_id"),
            pad_id: lookup("pad_token", "pad_token_id"),
            inner,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Ok(Self { inner: load_tokenizer_json(path)?, bos_id: None, eos_id: None, pad_id: None })
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (BOS, `[gMASK]<sop>`…).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The EOS token's text (appended to answers as text, as stanford_alpaca does).
    pub fn eos_token(&self) -> Option<String> {
        self.eos_id.and_then(|id| self.inner.id_to_token(id))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    if !path.is_file() {
        return Err(TokenizerError::Missing(path.to_path_buf()));
    }
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| TokenizerError::Invalid { path: path.to_path_buf(), reason: e.to_string() })
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TokenizerError::Invalid { path: path.to_path_buf(), reason: format!("invalid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TokenizerError::Invalid { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

/// `"</s>"` or `{"content": "</s>", ...}` (older tokenizer_config files).
fn token_content(value: &Value) -> Option<&str> {
    value.as_str().or_else(|| value.get("content").and_then(Value::as_str))
}
