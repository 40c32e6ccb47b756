//! Prompt tuning (Lester et al. 2021), PEFT's `PROMPT_TUNING`: `n` trainable embeddings take the
//! first `n` positions of every sequence, in front of the tokens' own. They are ordinary
//! positions: causal attention, RoPE positions 0..n−1, real tokens from n on (unlike prefix
//! tuning). PEFT's logits include the virtual positions; the loss ignores them. The embeddings
//! start random (PEFT's `RANDOM`) or as the embeddings of a text's tokens (`TEXT`, `init_text`).

use std::fmt;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use ember_models::{BaseModel, LoadDtype, ModelConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::method::{AdapterFolder, MethodConfig, PEFT_VERSION, PeftMethod, at_least_one};
use crate::registry::{DecoderInputs, ModelAdapter};
use crate::{AdaptedModel, AdapterError, SavedTensor, save_adapter_dir};

#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    /// PEFT's `TEXT` init: the virtual tokens start as the embeddings of this text's tokens;
    /// `None` is `RANDOM`, N(0, 1).
    pub init_text: Option<String>,
}

impl fmt::Display for PromptTuningConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prompt tuning, {} virtual tokens", self.num_virtual_tokens)?;
        match &self.init_text {
            Some(text) => write!(f, " initialised from {text:?}"),
            None => Ok(()),
        }
    }
}

/// The recipe's `[adapter]` keys of prompt tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTuningSection {
    pub num_virtual_tokens: usize,
    /// PEFT's `prompt_tuning_init_text`, tokenized by the base model's tokenizer.
    pub init_text: Option<String>,
}

impl Default for PromptTuningSection {
    fn default() -> Self {
        Self { num_virtual_tokens: 20, init_text: None }
    }
}

/// PEFT's `TEXT` init: the embeddings of `text`'s tokens, special tokens included (PEFT calls
/// the tokenizer with its defaults), repeated and cut to `n` rows.
///
/// # Shapes
/// - output: `[n, hidden]`, f32
fn text_embeddings(base: &BaseModel, text: &str, n: usize) -> Result<Tensor<2>, AdapterError> {
    let fail = |reason: String| AdapterError::Config(format!("'adapter.init_text': {reason}"));
    let dir = base.name_or_path.as_deref().ok_or_else(|| fail("needs the base model's folder for its tokenizer".into()))?;
    let tokenizer = ember_models::load_tokenizer(dir).map_err(|e| fail(e.to_string()))?;
    let ids = tokenizer.encode(text, true).map_err(|e| fail(e.to_string()))?;
    if ids.is_empty() {
        return Err(fail(format!("{text:?} has no tokens")));
    }
    let rows: Vec<i64> = ids.iter().cycle().take(n).map(|&id| i64::from(id)).collect();
    let weight = base.embed_tokens.weight.val();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &weight.device());
    Ok(weight.select(0, rows).cast(DType::F32))
}

/// The virtual tokens' embeddings `[n, hidden]`.
#[derive(Module, Debug)]
pub struct PromptEmbedding {
    pub embedding: Param<Tensor<2>>,
}

impl DecoderInputs for PromptEmbedding {
    fn virtual_embeddings(&self) -> Option<Tensor<2>> {
        Some(self.embedding.val())
    }
}

impl MethodConfig for PromptTuningConfig {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn count_trainable(&self, model: &ModelConfig) -> usize {
        self.num_virtual_tokens * model.hidden_size
    }

    fn virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// `RANDOM` init: N(0, 1), as PEFT's `nn.Embedding`; `TEXT` init: see [`text_embeddings`].
    fn init(&self, base: BaseModel, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        let table = match &self.init_text {
            Some(text) => text_embeddings(&base, text, self.num_virtual_tokens)?,
            None => {
                let mut rng = StdRng::seed_from_u64(seed);
                let shape = [self.num_virtual_tokens, base.config.hidden_size];
                let values: Vec<f32> = (0..shape[0] * shape[1]).map(|_| StandardNormal.sample(&mut rng)).collect();
                Tensor::from_data(TensorData::new(values, shape), device)
            }
        };
        let embedding = Param::from_tensor(table);
        Ok(AdaptedModel::with_inputs(base, Some(ModelAdapter::PromptTuning(PromptEmbedding { embedding }))))
    }

    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let prompt = model.required_inputs::<PromptEmbedding>()?;
        let config = model.config();
        let adapter_config = json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": config.hidden_size,
            "num_attention_heads": config.num_heads,
            "num_layers": config.num_layers,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": if self.init_text.is_some() { "TEXT" } else { "RANDOM" },
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": self.init_text.as_ref().map(|_| base_model),
            "tokenizer_kwargs": null,
            "inference_mode": true,
            "modules_to_save": null,
            "revision": null,
            "peft_version": PEFT_VERSION,
        });
        let tensors = [SavedTensor::new("prompt_embeddings", prompt.embedding.val())];
        save_adapter_dir(dir, AdapterFolder::PEFT_WEIGHTS, &tensors, &[(AdapterFolder::PEFT_CONFIG, &adapter_config)])
    }

    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)> {
        model.inputs_of::<PromptEmbedding>().map(|p| vec![(p.embedding.id, "prompt_encoder.embedding.weight".to_owned())]).unwrap_or_default()
    }
}

impl PeftMethod for PromptTuningConfig {
    const NAME: &'static str = "prompt_tuning";
    type Section = PromptTuningSection;

    fn from_section(section: PromptTuningSection) -> Result<Self, String> {
        at_least_one(Self::NAME, &[("num_virtual_tokens", section.num_virtual_tokens)])?;
        if section.init_text.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err("'adapter.init_text' is empty".into());
        }
        Ok(Self { num_virtual_tokens: section.num_virtual_tokens, init_text: section.init_text })
    }

    fn recognises(folder: &AdapterFolder) -> bool {
        folder.peft_type() == Some("PROMPT_TUNING")
    }

    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError> {
        Ok(Self { num_virtual_tokens: folder.count("num_virtual_tokens")?, init_text: init_text(folder) })
    }

    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError> {
        let n = folder.count("num_virtual_tokens")?;
        if folder.get("num_transformer_submodules").and_then(serde_json::Value::as_u64).is_some_and(|k| k != 1) {
            return Err(folder.invalid("'num_transformer_submodules' must be 1 (a decoder-only model)"));
        }
        let (weights, path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
        let table = weights
            .float::<2>("prompt_embeddings", [n, base.config.hidden_size], LoadDtype::F32, device)
            .map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
        let inputs = ModelAdapter::PromptTuning(PromptEmbedding { embedding: Param::from_tensor(table) });
        Ok((AdaptedModel::with_inputs(base, Some(inputs)), Self { num_virtual_tokens: n, init_text: init_text(folder) }))
    }
}

/// The text a PEFT `TEXT` init started from (for display and re-export; loading never re-initialises).
fn init_text(folder: &AdapterFolder) -> Option<String> {
    let is_text = folder.get("prompt_tuning_init").and_then(serde_json::Value::as_str) == Some("TEXT");
    is_text.then(|| folder.get("prompt_tuning_init_text").and_then(serde_json::Value::as_str).map(str::to_owned)).flatten()
}
