//! The seam every PEFT method plugs into. A method lives in its own folder and implements
//! [`MethodConfig`] (what a run needs of it, object-safe) and [`PeftMethod`] (its recipe
//! section and its on-disk format); `registry.rs` lists it once. Nothing outside a method's
//! folder and the registry names a method.

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::tensor::{Device, Tensor};
use ember_models::fused::KeptActivations;
use ember_models::{BaseModel, Checkpoint, ModelConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{AdaptedModel, AdapterError, Method};

/// What a run asks of a method's settings: shapes, memory, initialisation and export.
pub trait MethodConfig: fmt::Debug + fmt::Display {
    /// The recipe's `adapter.method` value.
    fn name(&self) -> &'static str;

    /// Whether the method fits `model`'s architecture (targets that exist, layer counts).
    fn check(&self, _model: &ModelConfig) -> Result<(), String> {
        Ok(())
    }

    /// Parameters a fresh adapter trains on `model`, from the shapes alone (no weights read).
    fn count_trainable(&self, model: &ModelConfig) -> usize;

    /// Base parameters the adapter replaces with trainable copies (modules trained in full):
    /// the frozen originals are not held.
    fn replaced_base_parameters(&self, _model: &ModelConfig) -> usize {
        0
    }

    /// The lowest decoder layer holding or feeding a trainable parameter: backward stops there.
    fn first_trainable_layer(&self, _model: &ModelConfig) -> usize {
        0
    }

    /// Bytes the method's own layers keep for backward per token, over the whole model, beside
    /// base activations kept as `kept` says (the memory estimator's share).
    fn activation_bytes_per_token(&self, _model: &ModelConfig, _kept: KeptActivations) -> f64 {
        0.0
    }

    /// Keys every query sees before its sequence's own (prefix tuning): widens each score row.
    fn prefix_keys(&self) -> usize {
        0
    }

    /// Positions prepended to every sequence (prompt tuning): lengthens each sequence.
    fn virtual_tokens(&self) -> usize {
        0
    }

    /// Whether a trained adapter folds into the base weights (`ember merge`, `export gguf
    /// --adapter`): its parameters are a change of weights, not extra inputs.
    fn merges_into_weights(&self) -> bool {
        false
    }

    /// Dropout on the method's input (packing then draws other masks than padding).
    fn dropout(&self) -> f64 {
        0.0
    }

    /// Fresh trainable parameters on `base`, seeded by `seed`.
    fn init(&self, base: BaseModel, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError>;

    /// Writes `model`'s parameters in the method's export format (PEFT's, or THUDM's for
    /// ChatGLM P-Tuning v2).
    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError>;

    /// Every trainable parameter under the name PEFT gives it (the adapter file's key; for
    /// prompt-learning methods PEFT's parameter name), for gradient parity and reports.
    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)>;
}

/// A method's recipe section and on-disk format: how it is named, read and recognised.
pub trait PeftMethod: MethodConfig + Clone + Sized + Into<Method> {
    /// The recipe's `adapter.method` value.
    const NAME: &'static str;

    /// The method's keys of the recipe's `[adapter]` table (serde, unknown keys refused). Its
    /// `Default` serializes every key, which gives the "did you mean" list.
    type Section: DeserializeOwned + Serialize + Default;

    /// The settings a recipe section asks for, validated.
    fn from_section(section: Self::Section) -> Result<Self, String>;

    /// Whether `folder` holds an adapter of this method.
    fn recognises(folder: &AdapterFolder) -> bool;

    /// The settings an adapter folder of this method was saved with (its weights unread).
    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError>;

    /// Reads `folder` (PEFT's files, or ember's) onto `base`.
    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError>;

    /// What `ember merge` folds into the base weights of a model of `model`'s config, tensor by
    /// tensor; `None` for a method whose parameters are not a function of the weights (prefixes,
    /// prompts).
    fn weight_merge(_folder: &AdapterFolder, _model: &ModelConfig) -> Option<Result<Box<dyn WeightMerge>, AdapterError>> {
        None
    }
}

/// A merge streamed over the base checkpoint: which tensors change and how.
pub trait WeightMerge {
    /// HF keys of the base tensors the merge changes (`<module>.weight`, maybe `.bias`).
    fn keys(&self) -> Vec<String>;

    /// Checks every changed tensor against the base's shapes before anything is written.
    fn check(&self, base: &Checkpoint) -> Result<(), AdapterError>;

    /// The merged value of `key` from its base value, in f32 (`[1, n]` for a vector).
    fn apply(&self, key: &str, base: Tensor<2>, device: &Device) -> Tensor<2>;

    /// The shape of `key` in the merged model (a module trained in full with a grown
    /// vocabulary has more rows than the base's).
    fn output_shape(&self, _key: &str, base_shape: &[usize]) -> Vec<usize> {
        base_shape.to_vec()
    }

    /// The merged model's vocabulary, when the adapter grows it.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
}

/// How an adapter folder stores its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderFormat {
    /// PEFT: `adapter_config.json` + `adapter_model.safetensors`.
    Peft,
    /// THUDM's ChatGLM P-Tuning v2: `config.json` with `pre_seq_len` + `prefix_encoder.safetensors`.
    ChatGlmPtuning,
}

/// An adapter folder with its config read once, for methods to recognise their format.
#[derive(Debug, Clone)]
pub struct AdapterFolder {
    pub dir: PathBuf,
    pub format: FolderFormat,
    /// The config file's path (`adapter_config.json`, or `config.json` for ChatGLM).
    pub config_path: PathBuf,
    pub config: Value,
}

impl AdapterFolder {
    pub const PEFT_CONFIG: &str = "adapter_config.json";
    pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";

    /// Reads the folder's config, in whichever format it has.
    pub fn read(dir: &Path) -> Result<Self, AdapterError> {
        let peft = dir.join(Self::PEFT_CONFIG);
        let (format, config_path) = if peft.is_file() {
            (FolderFormat::Peft, peft)
        } else if dir.join("config.json").is_file() && dir.join("prefix_encoder.safetensors").is_file() {
            (FolderFormat::ChatGlmPtuning, dir.join("config.json"))
        } else {
            return Err(AdapterError::invalid(dir, "no adapter_config.json (PEFT) nor config.json + prefix_encoder.safetensors (ChatGLM P-Tuning v2)"));
        };
        let config = read_json(&config_path)?;
        Ok(Self { dir: dir.to_path_buf(), format, config_path, config })
    }

    /// PEFT's `peft_type` (`None` for the ChatGLM format).
    pub fn peft_type(&self) -> Option<&str> {
        match self.format {
            FolderFormat::Peft => self.config["peft_type"].as_str(),
            FolderFormat::ChatGlmPtuning => None,
        }
    }

    /// A config key that is present and not null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.config.get(key).filter(|v| !v.is_null())
    }

    /// An error naming the config file.
    pub fn invalid(&self, reason: impl Into<String>) -> AdapterError {
        AdapterError::invalid(&self.config_path, reason)
    }

    /// A positive integer config key.
    pub fn count(&self, key: &str) -> Result<usize, AdapterError> {
        self.get(key).and_then(Value::as_u64).map(|n| n as usize).ok_or_else(|| self.invalid(format!("'{key}' must be an integer")))
    }

    /// A weights file of the folder, memory-mapped.
    pub fn weights(&self, file: &str) -> Result<(Checkpoint, PathBuf), AdapterError> {
        let path = self.dir.join(file);
        let weights = Checkpoint::open_file(&path).map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
        Ok((weights, path))
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, AdapterError> {
    let text = std::fs::read_to_string(path).map_err(|e| AdapterError::Io { path: path.to_path_buf(), source: e })?;
    serde_json::from_str(&text).map_err(|e| AdapterError::invalid(path, format!("invalid JSON: {e}")))
}

/// `peft_version` in the configs ember writes.
pub(crate) const PEFT_VERSION: &str = concat!("ember ", env!("CARGO_PKG_VERSION"));

/// Every `(recipe key, value)` of `method`'s section is at least 1.
pub(crate) fn at_least_one(method: &str, keys: &[(&str, usize)]) -> Result<(), String> {
    match keys.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(format!("'adapter.{key}' must be at least 1 with method = \"{method}\"")),
        None => Ok(()),
    }
}
