//! The model a run trains or serves: the frozen base plus the parameters of one method. LoRA
//! lives inside the projections; prefix tuning and adaption prompts feed each layer's
//! attention through `LayerExtras`. Methods stay in their own modules; this file only routes.

use std::fmt;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Int, Tensor};
use ember_models::{BaseModel, KvCache, LayerExtras, ModelConfig};

use crate::AdapterError;
use crate::adaption::{self, AdaptionConfig, AdaptionPrompts};
use crate::lora::{self, LoraConfig, LoraLinear, LoraModel};
use crate::prefix::{self, PrefixConfig, PrefixEncoder};

/// A method and its settings.
#[derive(Debug, Clone)]
pub enum Method {
    Lora(LoraConfig),
    Prefix(PrefixConfig),
    Adaption(AdaptionConfig),
}

impl Method {
    /// The name used in recipes and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora(_) => "lora",
            Method::Prefix(_) => "prefix",
            Method::Adaption(_) => "adaption",
        }
    }

    /// Parameters a fresh adapter of this method trains on `model`, from the shapes alone (no
    /// weights loaded: a 7B recipe can be sized on any machine).
    pub fn count_trainable(&self, model: &ModelConfig) -> usize {
        match self {
            Method::Lora(c) => lora::count_trainable(model, c),
            Method::Prefix(c) => prefix::count_trainable(model, c),
            Method::Adaption(c) => adaption::count_trainable(model, c),
        }
    }

    /// The lowest decoder layer a fresh adapter of this method trains or feeds, from the shapes
    /// alone (as [`AdaptedModel::first_trainable_layer`]): backward never goes below it.
    pub fn first_trainable_layer(&self, model: &ModelConfig) -> usize {
        match self {
            Method::Lora(c) => {
                let keys = ember_models::transformer::KeyLayout::of(model.architecture);
                (0..model.num_layers).find(|&i| keys.projection_names(i).iter().any(|name| c.targets(name))).unwrap_or(0)
            }
            Method::Prefix(_) => 0,
            Method::Adaption(c) => model.num_layers.saturating_sub(c.adapter_layers),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Lora(c) => write!(f, "LoRA r={} on {}", c.r, c.target),
            Method::Prefix(c) => {
                write!(f, "prefix tuning, {} virtual tokens{}", c.num_virtual_tokens, if c.prefix_projection { " through the MLP" } else { "" })
            }
            Method::Adaption(c) => write!(f, "gated adaption prompts, {} tokens in the top {} layers", c.adapter_len, c.adapter_layers),
        }
    }
}

#[derive(Module, Debug)]
pub struct AdaptedModel {
    /// The base; its projections carry LoRA branches when the method is LoRA.
    pub model: LoraModel,
    pub prefix: Option<PrefixEncoder>,
    pub adaption: Option<AdaptionPrompts>,
}

fn without_lora(base: BaseModel) -> LoraModel {
    base.map_projections(|name, linear| LoraLinear::new(name, linear, None))
}

impl AdaptedModel {
    /// The base alone, with no method's parameters.
    pub fn base_only(base: BaseModel) -> Self {
        Self { model: without_lora(base), prefix: None, adaption: None }
    }

    /// Fresh parameters for `method`, seeded by `seed`; the model starts exactly at the base
    /// for LoRA (B = 0) and adaption prompts (gates = 0).
    pub fn init(base: BaseModel, method: &Method, seed: u64, device: &Device) -> Result<Self, AdapterError> {
        Ok(match method {
            Method::Lora(config) => Self { model: lora::apply(base, config, seed, device)?, prefix: None, adaption: None },
            Method::Prefix(config) => {
                let prefix = PrefixEncoder::init(&base.config, config, seed, device);
                Self { model: without_lora(base), prefix: Some(prefix), adaption: None }
            }
            Method::Adaption(config) => {
                if config.adapter_layers == 0 || config.adapter_layers > base.config.num_layers {
                    return Err(AdapterError::Config(format!(
                        "adapter_layers {} must be between 1 and the model's {} layers",
                        config.adapter_layers, base.config.num_layers
                    )));
                }
                let prompts = AdaptionPrompts::init(&base.config, config.adapter_len, config.adapter_layers, seed, device);
                Self { model: without_lora(base), prefix: None, adaption: Some(prompts) }
            }
        })
    }

    /// An adapter folder in any format ember reads: PEFT `LORA`, `PREFIX_TUNING`,
    /// `ADAPTION_PROMPT`, or THUDM's ChatGLM P-Tuning v2 (`config.json` with `pre_seq_len`).
    pub fn load(dir: &Path, base: BaseModel, device: &Device) -> Result<(Self, Method), AdapterError> {
        let config_path = dir.join("adapter_config.json");
        if !config_path.is_file() {
            if dir.join("config.json").is_file() && dir.join("prefix_encoder.safetensors").is_file() {
                let prefix = prefix::load_chatglm_ptuning(dir, &base.config, device)?;
                let method = Method::Prefix(prefix_config(&prefix));
                return Ok((Self { model: without_lora(base), prefix: Some(prefix), adaption: None }, method));
            }
            return Err(AdapterError::invalid(dir, "no adapter_config.json (PEFT) nor config.json + prefix_encoder.safetensors (ChatGLM P-Tuning v2)"));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| AdapterError::Io { path: config_path.clone(), source: e })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| AdapterError::invalid(&config_path, format!("invalid JSON: {e}")))?;
        match json["peft_type"].as_str() {
            Some("LORA") => {
                let (model, config) = lora::load_peft(dir, base, device)?;
                Ok((Self { model, prefix: None, adaption: None }, Method::Lora(config)))
            }
            Some("PREFIX_TUNING") => {
                let prefix = prefix::load_peft(dir, &base.config, device)?;
                let mut config = prefix_config(&prefix);
                config.prefix_projection = json["prefix_projection"].as_bool().unwrap_or(false);
                Ok((Self { model: without_lora(base), prefix: Some(prefix), adaption: None }, Method::Prefix(config)))
            }
            Some("ADAPTION_PROMPT") => {
                let prompts = adaption::load_peft(dir, &base.config, device)?;
                let method = Method::Adaption(prompts.config());
                Ok((Self { model: without_lora(base), prefix: None, adaption: Some(prompts) }, method))
            }
            other => Err(AdapterError::invalid(
                &config_path,
                format!("peft_type {other:?} is not supported (LORA, PREFIX_TUNING, ADAPTION_PROMPT)"),
            )),
        }
    }

    /// Exports the trained parameters in the method's on-disk format.
    pub fn save(&self, method: &Method, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let config = self.config();
        match (method, &self.prefix, &self.adaption) {
            (Method::Lora(c), _, _) => lora::save_peft(&self.model, c, base_model, dir),
            (Method::Prefix(_), Some(prefix), _) => prefix.save(config, base_model, dir),
            (Method::Adaption(_), _, Some(prompts)) => prompts.save_peft(config, base_model, dir),
            _ => Err(AdapterError::Config(format!("the model holds no {} parameters to save", method.name()))),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// Per-layer prefix keys/values or adaption prompts for a batch (empty for LoRA).
    pub fn extras(&self, batch: usize) -> Vec<LayerExtras> {
        match (&self.prefix, &self.adaption) {
            (Some(prefix), _) => prefix.extras(batch),
            (_, Some(prompts)) => prompts.extras(),
            _ => Vec::new(),
        }
    }

    /// Prefix tuning's keys and values of every layer (see [`PrefixEncoder::keys_values`]).
    pub fn prefix_keys_values(&self) -> Option<Tensor<4>> {
        self.prefix.as_ref().map(PrefixEncoder::keys_values)
    }

    /// Layer `i`'s entry of [`extras`](Self::extras) (`None` for LoRA). Prefix tuning reads it
    /// from `prefix_keys_values`, computed once for all layers.
    pub fn layer_extras(&self, batch: usize, i: usize, prefix_keys_values: Option<&Tensor<4>>) -> Option<LayerExtras> {
        match (&self.prefix, prefix_keys_values, &self.adaption) {
            (Some(prefix), Some(keys_values), _) => Some(prefix.layer_extras(keys_values, i, batch)),
            (_, _, Some(prompts)) => prompts.extras().into_iter().nth(i),
            _ => None,
        }
    }

    /// The lowest decoder layer holding or receiving a trainable parameter: backward never
    /// needs to go below it.
    pub fn first_trainable_layer(&self) -> usize {
        match (&self.prefix, &self.adaption) {
            (Some(_), _) => 0,
            (_, Some(prompts)) => prompts.layers.iter().position(Option::is_some).unwrap_or(0),
            _ => {
                let trainable = |layer: &ember_models::transformer::DecoderLayer<LoraLinear>| {
                    layer.projections().iter().any(|p| p.lora.is_some())
                };
                self.model.layers.iter().position(trainable).unwrap_or(0)
            }
        }
    }

    /// # Shapes
    /// - input_ids, attention_mask: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> Tensor<3> {
        let extras = self.extras(input_ids.dims()[0]);
        self.model.forward_with(input_ids, attention_mask, &extras)
    }

    /// Final-norm hidden states, for a loss that needs logits at some positions only
    /// ([`logits`](Self::logits)).
    ///
    /// # Shapes
    /// - input_ids, attention_mask: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> Tensor<3> {
        let extras = self.extras(input_ids.dims()[0]);
        self.model.hidden_states(input_ids, attention_mask.as_ref(), None, &extras)
    }

    /// The LM head: `[batch, seq, hidden] -> [batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.model.logits(hidden)
    }

    /// Logits of the new tokens, reading and extending `cache` (generation).
    pub fn forward_cached(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let extras = self.extras(input_ids.dims()[0]);
        self.model.forward_cached_with(input_ids, cache, &extras)
    }

    /// LoRA folded into the base weights (faster generation); other methods are kept as they are.
    pub fn into_inference(self) -> Self {
        let has_lora = self.model.projections().iter().any(|(_, p)| p.lora.is_some());
        if !has_lora {
            return self;
        }
        Self { model: without_lora(lora::merge(self.model)), ..self }
    }

    /// (trainable parameters, all parameters)
    pub fn parameter_counts(&self) -> (usize, usize) {
        let (lora_params, base_and_lora) = lora::parameter_counts(&self.model);
        let prefix = self.prefix.as_ref().map_or(0, Module::num_params);
        let adaption = self.adaption.as_ref().map_or(0, AdaptionPrompts::num_trainable);
        (lora_params + prefix + adaption, base_and_lora + prefix + adaption)
    }

    /// Why saving would be pointless: the parameters still leave the base unchanged (every
    /// LoRA B or every gate zero — the known PEFT failure of saving an untrained adapter).
    pub fn unchanged_reason(&self, method: &Method) -> Option<&'static str> {
        match method {
            Method::Lora(_) if lora::all_b_zero(&self.model) => Some("every lora_B is still zero"),
            Method::Adaption(_) if self.adaption.as_ref().is_some_and(AdaptionPrompts::all_gates_zero) => {
                Some("every adaption_gate is still zero")
            }
            _ => None,
        }
    }

    /// Ids of the parameters that take gradients (autodiff device).
    pub fn trainable_ids(&self) -> Vec<ParamId> {
        struct Trainable(Vec<ParamId>);
        impl ModuleVisitor for Trainable {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.val().is_require_grad() {
                    self.0.push(param.id);
                }
            }
        }
        let mut visitor = Trainable(Vec::new());
        self.visit(&mut visitor);
        visitor.0
    }
}

fn prefix_config(prefix: &PrefixEncoder) -> PrefixConfig {
    PrefixConfig {
        num_virtual_tokens: prefix.num_virtual_tokens(),
        prefix_projection: prefix.projection.is_some(),
        encoder_hidden_size: prefix.projection.as_ref().map(|mlp| mlp.first.out_features()),
    }
}
