//! LLaMA-Adapter's gated adaption prompts (Zhang et al. 2023), as PEFT `ADAPTION_PROMPT`: in the
//! top `adapter_layers` layers, a learned prompt `[1, adapter_len, hidden]` is projected by the
//! layer's frozen k/v projections, attended by the layer's queries, scaled by a zero-initialised
//! gate and added through o_proj. PEFT supports LLaMA only; the same math runs on GLM/ChatGLM
//! here (their fused projections give the prompt's k and v).

use std::fmt;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use ember_models::family::KeyLayout;
use ember_models::{BaseModel, LayerExtras, LoadDtype, ModelConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::method::{AdapterFolder, MethodConfig, PEFT_VERSION, PeftMethod, at_least_one};
use crate::registry::{DecoderInputs, ModelAdapter};
use crate::{AdaptedModel, AdapterError, SavedTensor, save_adapter_dir};

/// What a run trains: `adapter_len` prompt vectors in each of the top `adapter_layers` layers.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptionConfig {
    pub adapter_len: usize,
    pub adapter_layers: usize,
}

#[derive(Module, Debug)]
pub struct AdaptionLayer {
    /// `[1, adapter_len, hidden]`
    pub prompt: Param<Tensor<3>>,
    /// `[1]`, zero at initialisation so the model starts exactly at the base.
    pub gate: Param<Tensor<1>>,
}

/// One entry per decoder layer; `None` below the adapted top layers.
#[derive(Module, Debug)]
pub struct AdaptionPrompts {
    pub layers: Vec<Option<AdaptionLayer>>,
}

/// PEFT key of a layer's parameter, e.g. `base_model.model.model.layers.1.self_attn.adaption_gate`.
pub fn key(model: &ModelConfig, layer: usize, name: &str) -> String {
    let keys = KeyLayout::of(model.architecture);
    format!("base_model.model.{}.{}.{name}", keys.layer(layer), keys.attention)
}

/// Trainable parameters of fresh prompts, from the shapes alone: a prompt and a gate per layer.
pub fn count_trainable(model: &ModelConfig, config: &AdaptionConfig) -> usize {
    config.adapter_layers.min(model.num_layers) * (config.adapter_len * model.hidden_size + 1)
}

impl AdaptionPrompts {
    /// Fresh prompts ~ N(0, 1) (as PEFT) in the top `adapter_layers` layers, gates 0.
    pub fn init(model: &ModelConfig, adapter_len: usize, adapter_layers: usize, seed: u64, device: &Device) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let first = model.num_layers.saturating_sub(adapter_layers);
        let layers = (0..model.num_layers)
            .map(|i| {
                (i >= first).then(|| {
                    let values: Vec<f32> = (0..adapter_len * model.hidden_size).map(|_| StandardNormal.sample(&mut rng)).collect();
                    AdaptionLayer {
                        prompt: Param::from_tensor(Tensor::from_data(TensorData::new(values, [1, adapter_len, model.hidden_size]), device)),
                        gate: Param::from_tensor(Tensor::zeros([1], device)),
                    }
                })
            })
            .collect();
        Self { layers }
    }

    pub fn extras(&self) -> Vec<LayerExtras> {
        self.layers
            .iter()
            .map(|l| LayerExtras { adaption: l.as_ref().map(|l| (l.prompt.val(), l.gate.val())), ..Default::default() })
            .collect()
    }

    pub fn num_trainable(&self) -> usize {
        self.layers.iter().flatten().map(|l| l.prompt.shape().num_elements() + 1).sum()
    }

    pub fn config(&self) -> AdaptionConfig {
        let adapted: Vec<&AdaptionLayer> = self.layers.iter().flatten().collect();
        AdaptionConfig { adapter_len: adapted.first().map_or(0, |l| l.prompt.shape().dims::<3>()[1]), adapter_layers: adapted.len() }
    }

    /// True while every gate is exactly zero: the model still equals the base.
    pub fn all_gates_zero(&self) -> bool {
        self.layers.iter().flatten().all(|l| l.gate.val().abs().max().into_scalar::<f32>() == 0.0)
    }

    /// PEFT `ADAPTION_PROMPT` folder. The target module is PEFT's name for LLaMA's attention;
    /// for GLM models (which PEFT cannot load) the same keys use the GLM attention path.
    pub fn save_peft(&self, model: &ModelConfig, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let mut tensors = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(layer) = layer else { continue };
            tensors.push(SavedTensor::new(key(model, i, "adaption_prompt"), layer.prompt.val()));
            tensors.push(SavedTensor::new(key(model, i, "adaption_gate"), layer.gate.val()));
        }
        let AdaptionConfig { adapter_len, adapter_layers } = self.config();
        let config = serde_json::json!({
            "peft_type": "ADAPTION_PROMPT",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "adapter_len": adapter_len,
            "adapter_layers": adapter_layers,
            "target_modules": KeyLayout::of(model.architecture).attention,
            "inference_mode": true,
            "revision": null,
            "peft_version": PEFT_VERSION,
        });
        save_adapter_dir(dir, "adapter_model.safetensors", &tensors, &[("adapter_config.json", &config)])
    }
}

/// A PEFT `ADAPTION_PROMPT` folder (`adapter_len`, `adapter_layers`; one prompt and gate per
/// adapted layer).
pub fn load_peft(folder: &AdapterFolder, model: &ModelConfig, device: &Device) -> Result<AdaptionPrompts, AdapterError> {
    let (len, count) = (folder.count("adapter_len")?, folder.count("adapter_layers")?);
    if count > model.num_layers {
        return Err(folder.invalid(format!("adapter_layers {count} exceeds the model's {} layers", model.num_layers)));
    }
    let (weights, path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
    let error = |e: ember_models::LoadError| AdapterError::invalid(&path, e.to_string());
    let first = model.num_layers - count;
    let layers = (0..model.num_layers)
        .map(|i| {
            if i < first {
                return Ok(None);
            }
            Ok(Some(AdaptionLayer {
                prompt: Param::from_tensor(weights.float(&key(model, i, "adaption_prompt"), [1, len, model.hidden_size], LoadDtype::F32, device).map_err(error)?),
                gate: Param::from_tensor(weights.float(&key(model, i, "adaption_gate"), [1], LoadDtype::F32, device).map_err(error)?),
            }))
        })
        .collect::<Result<_, AdapterError>>()?;
    Ok(AdaptionPrompts { layers })
}

impl fmt::Display for AdaptionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gated adaption prompts, {} tokens in the top {} layers", self.adapter_len, self.adapter_layers)
    }
}

/// The recipe's `[adapter]` keys of LLaMA-Adapter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptionSection {
    /// Prompt tokens per adapted layer.
    pub adapter_len: usize,
    /// How many of the top layers get a prompt.
    pub adapter_layers: usize,
}

impl DecoderInputs for AdaptionPrompts {
    fn extras(&self, _batch: usize) -> Vec<LayerExtras> {
        AdaptionPrompts::extras(self)
    }

    fn layer_extras(&self, _batch: usize, i: usize, _prefix_keys_values: Option<&Tensor<4>>) -> Option<LayerExtras> {
        AdaptionPrompts::extras(self).into_iter().nth(i)
    }

    fn first_trainable_layer(&self) -> usize {
        self.layers.iter().position(Option::is_some).unwrap_or(0)
    }

    fn unchanged_reason(&self) -> Option<&'static str> {
        self.all_gates_zero().then_some("every adaption_gate is still zero")
    }
}

impl MethodConfig for AdaptionConfig {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn check(&self, model: &ModelConfig) -> Result<(), String> {
        if self.adapter_layers > model.num_layers {
            return Err(format!("'adapter.adapter_layers' is {} but the model has only {} layers", self.adapter_layers, model.num_layers));
        }
        Ok(())
    }

    fn count_trainable(&self, model: &ModelConfig) -> usize {
        count_trainable(model, self)
    }

    fn first_trainable_layer(&self, model: &ModelConfig) -> usize {
        model.num_layers.saturating_sub(self.adapter_layers)
    }

    fn init(&self, base: BaseModel, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        self.check(&base.config).map_err(AdapterError::Config)?;
        let prompts = AdaptionPrompts::init(&base.config, self.adapter_len, self.adapter_layers, seed, device);
        Ok(AdaptedModel::with_inputs(base, Some(ModelAdapter::Adaption(prompts))))
    }

    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let prompts = model.required_inputs::<AdaptionPrompts>()?;
        prompts.save_peft(model.config(), base_model, dir)
    }

    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)> {
        let Some(p) = model.inputs_of::<AdaptionPrompts>() else { return Vec::new() };
        let config = model.config();
        p.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i, l)))
            .flat_map(|(i, l)| [(l.prompt.id, key(config, i, "adaption_prompt")), (l.gate.id, key(config, i, "adaption_gate"))])
            .collect()
    }
}

impl PeftMethod for AdaptionConfig {
    const NAME: &'static str = "adaption";
    type Section = AdaptionSection;

    fn from_section(section: AdaptionSection) -> Result<Self, String> {
        at_least_one(Self::NAME, &[("adapter_len", section.adapter_len), ("adapter_layers", section.adapter_layers)])?;
        Ok(Self { adapter_len: section.adapter_len, adapter_layers: section.adapter_layers })
    }

    fn recognises(folder: &AdapterFolder) -> bool {
        folder.peft_type() == Some("ADAPTION_PROMPT")
    }

    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError> {
        Ok(Self { adapter_len: folder.count("adapter_len")?, adapter_layers: folder.count("adapter_layers")? })
    }

    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError> {
        let prompts = load_peft(folder, &base.config, device)?;
        let config = prompts.config();
        Ok((AdaptedModel::with_inputs(base, Some(ModelAdapter::Adaption(prompts))), config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_7b_with_10_prompts_in_30_layers_trains_1_228_800_plus_gates() {
        let model = ModelConfig::preset("llama-7b").unwrap();
        let prompts = AdaptionPrompts::init(&model, 10, 30, 0, &Device::flex());
        assert_eq!(prompts.layers.iter().flatten().count(), 30);
        assert!(prompts.layers[..2].iter().all(Option::is_none), "the top 30 of 32 layers");
        assert_eq!(prompts.num_trainable(), 1_228_800 + 30);
        assert_eq!(count_trainable(&model, &AdaptionConfig { adapter_len: 10, adapter_layers: 30 }), 1_228_800 + 30);
    }
}
