//! Prefix tuning (Li & Liang 2021) / P-Tuning v2 (Liu et al. 2021): `num_virtual_tokens`
//! trainable key/value vectors per layer, prepended to the layer's keys and values, with no RoPE
//! and visible to every query. Optionally reparameterized by an MLP (`prefix_projection`:
//! embedding → Linear → tanh → Linear) during training.
//!
//! Two on-disk formats: PEFT `PREFIX_TUNING` (`prompt_embeddings`, the MLP output as PEFT saves
//! it) and THUDM's ChatGLM P-Tuning v2 (`transformer.prefix_encoder.*` + `pre_seq_len`).

use std::fmt;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use ember_models::{Architecture, BaseModel, Checkpoint, LayerExtras, LoadDtype, ModelConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::method::{AdapterFolder, FolderFormat, MethodConfig, PEFT_VERSION, PeftMethod, at_least_one, read_json};
use crate::registry::{DecoderInputs, ModelAdapter};
use crate::{AdaptedModel, AdapterError, SavedTensor, save_adapter_dir};

/// What a run trains: `num_virtual_tokens` prefixes, optionally through the MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    pub prefix_projection: bool,
    /// Width of the MLP's hidden layer (PEFT's default: the token width; ChatGLM: hidden size).
    pub encoder_hidden_size: Option<usize>,
}

/// The format a model family uses for prefixes: THUDM's P-Tuning v2 for remote-code ChatGLM
/// (whose modelling code implements it), PEFT `PREFIX_TUNING` for everything else.
pub fn is_chatglm_ptuning(model: &ModelConfig) -> bool {
    model.architecture == Architecture::ChatGlm
}

/// A trainable linear layer of the reparameterization MLP, `[out, in]` weight as PyTorch.
#[derive(Module, Debug)]
pub struct TrainableLinear {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl TrainableLinear {
    fn new(weight: Tensor<2>, bias: Tensor<1>) -> Self {
        Self { weight: Param::from_tensor(weight), bias: Param::from_tensor(bias) }
    }

    fn out_features(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// # Shapes
    /// - x: `[1, n, in]`
    /// - output: `[1, n, out]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, i] = x.dims();
        (x.reshape([b * n, i]).matmul(self.weight.val().transpose()) + self.bias.val().unsqueeze_dim(0)).reshape([b, n, self.out_features()])
    }
}

/// `second(tanh(first(embedding)))`.
#[derive(Module, Debug)]
pub struct PrefixMlp {
    pub first: TrainableLinear,
    pub second: TrainableLinear,
}

/// The prefix parameters and how the per-layer keys/values are laid out in the table.
#[derive(Module, Debug)]
pub struct PrefixEncoder {
    /// `[n, layers·2·kv_heads·head_dim]`, or `[n, token_dim]` with a projection.
    pub embedding: Param<Tensor<2>>,
    pub projection: Option<PrefixMlp>,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// PEFT's prefix counts as positions (real tokens start at `n`); ChatGLM's does not.
    pub takes_positions: bool,
}

impl PrefixEncoder {
    pub fn new(embedding: Tensor<2>, projection: Option<PrefixMlp>, model: &ModelConfig, takes_positions: bool) -> Self {
        Self {
            embedding: Param::from_tensor(embedding),
            projection,
            num_layers: model.num_layers,
            num_kv_heads: model.num_kv_heads,
            head_dim: model.head_dim,
            takes_positions,
        }
    }

    /// The `[n, layers·2·kv_dim]` table: the embedding, or the MLP's output for it.
    pub fn table(&self) -> Tensor<2> {
        let embedding = self.embedding.val();
        match &self.projection {
            None => embedding,
            Some(mlp) => {
                let x = embedding.unsqueeze::<3>();
                let hidden = burn::tensor::activation::tanh(mlp.first.forward(x));
                mlp.second.forward(hidden).squeeze_dim(0)
            }
        }
    }

    /// Per-layer prefix keys/values for a batch: table element
    /// `[t, ((2·layer + kv)·kv_heads + h)·head_dim + d]`, as PEFT and ChatGLM lay it out.
    pub fn extras(&self, batch: usize) -> Vec<LayerExtras> {
        let keys_values = self.keys_values();
        (0..self.num_layers).map(|i| self.layer_extras(&keys_values, i, batch)).collect()
    }

    /// Every layer's keys and values, `[layers·2, kv_heads, n, head_dim]`: layer `i`'s keys at
    /// `2i`, its values at `2i + 1`.
    pub fn keys_values(&self) -> Tensor<4> {
        let table = self.table();
        let n = table.dims()[0];
        // n, layers·2·kv·d -> layers·2, kv, n, d
        table.reshape([n, self.num_layers * 2, self.num_kv_heads, self.head_dim]).permute([1, 2, 0, 3])
    }

    /// Layer `i`'s entry of [`extras`](Self::extras), read from [`keys_values`](Self::keys_values).
    pub fn layer_extras(&self, keys_values: &Tensor<4>, i: usize, batch: usize) -> LayerExtras {
        let [_, kv, n, d] = keys_values.dims();
        let take = |j: usize| keys_values.clone().narrow(0, j, 1).expand([batch, kv, n, d]);
        LayerExtras { prefix: Some((take(2 * i), take(2 * i + 1))), prefix_takes_positions: self.takes_positions, adaption: None }
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.shape().dims::<2>()[0]
    }

    /// Fresh parameters as PEFT / THUDM initialise them: embedding ~ N(0, 1), MLP layers as
    /// torch's `nn.Linear` (U(±1/√in) for weight and bias). PEFT's embedding with a projection is
    /// one token wide (`kv_dim`); ChatGLM's is the full table wide.
    pub fn init(model: &ModelConfig, config: &PrefixConfig, seed: u64, device: &Device) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let chatglm = is_chatglm_ptuning(model);
        let (n, width) = (config.num_virtual_tokens, table_width(model));
        let normal = |rng: &mut StdRng, shape: [usize; 2]| {
            let values: Vec<f32> = (0..shape[0] * shape[1]).map(|_| StandardNormal.sample(rng)).collect();
            Tensor::from_data(TensorData::new(values, shape), device)
        };
        if !config.prefix_projection {
            return Self::new(normal(&mut rng, [n, width]), None, model, !chatglm);
        }
        let (token, hidden) = mlp_widths(model, config);
        let embedding = normal(&mut rng, [n, token]);
        let mut linear = |inp: usize, out: usize| {
            let bound = 1.0 / (inp as f64).sqrt();
            let mut uniform = |len: usize| (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect::<Vec<f32>>();
            let weight = Tensor::from_data(TensorData::new(uniform(out * inp), [out, inp]), device);
            let bias = Tensor::from_data(TensorData::new(uniform(out), [out]), device);
            TrainableLinear::new(weight, bias)
        };
        let mlp = PrefixMlp { first: linear(token, hidden), second: linear(hidden, width) };
        Self::new(embedding, Some(mlp), model, !chatglm)
    }

    /// Saves in the model family's format (see [`is_chatglm_ptuning`]).
    pub fn save(&self, model: &ModelConfig, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        if is_chatglm_ptuning(model) { self.save_chatglm_ptuning(dir) } else { self.save_peft(model, base_model, dir) }
    }

    /// PEFT `PREFIX_TUNING`: the table (the MLP's output, as PEFT saves it) as `prompt_embeddings`.
    pub fn save_peft(&self, model: &ModelConfig, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let encoder_hidden_size = self.projection.as_ref().map_or(model.kv_dim(), |mlp| mlp.first.out_features());
        let config = json!({
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens(),
            // PEFT's GQA convention: one token is kv_heads·head_dim wide.
            "token_dim": model.kv_dim(),
            "num_attention_heads": model.num_kv_heads,
            "num_layers": model.num_layers,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": encoder_hidden_size,
            "prefix_projection": self.projection.is_some(),
            "inference_mode": true,
            "modules_to_save": null,
            "revision": null,
            "peft_version": PEFT_VERSION,
        });
        let tensors = [SavedTensor::new("prompt_embeddings", self.table())];
        save_adapter_dir(dir, "adapter_model.safetensors", &tensors, &[("adapter_config.json", &config)])
    }

    /// THUDM's P-Tuning v2 layout: `prefix_encoder.safetensors` with the training parameters
    /// and a `config.json` holding `pre_seq_len` / `prefix_projection`, to be merged into the
    /// base's config as ChatGLM's `ptuning/main.py` does.
    pub fn save_chatglm_ptuning(&self, dir: &Path) -> Result<(), AdapterError> {
        let prefix = "transformer.prefix_encoder";
        let mut tensors = vec![SavedTensor::new(format!("{prefix}.embedding.weight"), self.embedding.val())];
        if let Some(mlp) = &self.projection {
            for (name, layer) in [("trans.0", &mlp.first), ("trans.2", &mlp.second)] {
                tensors.push(SavedTensor::new(format!("{prefix}.{name}.weight"), layer.weight.val()));
                tensors.push(SavedTensor::new(format!("{prefix}.{name}.bias"), layer.bias.val()));
            }
        }
        let config = json!({ "pre_seq_len": self.num_virtual_tokens(), "prefix_projection": self.projection.is_some() });
        save_adapter_dir(dir, "prefix_encoder.safetensors", &tensors, &[("config.json", &config)])
    }
}

/// Input and hidden width of the reparameterization MLP: PEFT feeds a token-width embedding and
/// keeps that width inside; THUDM's ChatGLM feeds the table width and uses the hidden size.
fn mlp_widths(model: &ModelConfig, config: &PrefixConfig) -> (usize, usize) {
    let chatglm = is_chatglm_ptuning(model);
    let token = if chatglm { table_width(model) } else { model.kv_dim() };
    (token, config.encoder_hidden_size.unwrap_or(if chatglm { model.hidden_size } else { token }))
}

/// Trainable parameters of a fresh encoder, from the shapes alone.
pub fn count_trainable(model: &ModelConfig, config: &PrefixConfig) -> usize {
    let (n, width) = (config.num_virtual_tokens, table_width(model));
    if !config.prefix_projection {
        return n * width;
    }
    let (token, hidden) = mlp_widths(model, config);
    n * token + (token + 1) * hidden + (hidden + 1) * width
}

fn table_width(model: &ModelConfig) -> usize {
    model.num_layers * 2 * model.kv_dim()
}

/// PEFT `PREFIX_TUNING` folder: `prompt_embeddings` `[n, layers·2·kv_dim]`, loaded as a table
/// (PEFT saves the projection's output, so both variants load the same way).
pub fn load_peft(dir: &Path, model: &ModelConfig, device: &Device) -> Result<PrefixEncoder, AdapterError> {
    let config_path = dir.join("adapter_config.json");
    let config = read_json(&config_path)?;
    if config["peft_type"].as_str() != Some("PREFIX_TUNING") {
        return Err(AdapterError::invalid(&config_path, format!("peft_type {} is not PREFIX_TUNING", config["peft_type"])));
    }
    let n = config["num_virtual_tokens"].as_u64().ok_or_else(|| AdapterError::invalid(&config_path, "'num_virtual_tokens' must be an integer"))?;
    let path = dir.join("adapter_model.safetensors");
    let weights = Checkpoint::open_file(&path).map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
    let table = weights
        .float("prompt_embeddings", [n as usize, table_width(model)], LoadDtype::F32, device)
        .map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
    Ok(PrefixEncoder::new(table, None, model, true))
}

/// THUDM's ChatGLM P-Tuning v2 checkpoint: `config.json` with `pre_seq_len` and
/// `prefix_projection`, and `transformer.prefix_encoder.{embedding,trans.0,trans.2}.*` in
/// `prefix_encoder.safetensors` (or `pytorch_model`-style `model.safetensors`).
pub fn load_chatglm_ptuning(dir: &Path, model: &ModelConfig, device: &Device) -> Result<PrefixEncoder, AdapterError> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let n = config["pre_seq_len"].as_u64().ok_or_else(|| AdapterError::invalid(&config_path, "'pre_seq_len' must be an integer"))? as usize;
    let projection = config["prefix_projection"].as_bool().unwrap_or(false);
    let path = ["prefix_encoder.safetensors", "model.safetensors"].iter().map(|f| dir.join(f)).find(|p| p.is_file())
        .ok_or_else(|| AdapterError::invalid(dir, "no prefix_encoder.safetensors"))?;
    let weights = Checkpoint::open_file(&path).map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
    let width = table_width(model);
    let load2 = |k: &str, shape: [usize; 2]| weights.float::<2>(k, shape, LoadDtype::F32, device).map_err(|e| AdapterError::invalid(&path, e.to_string()));
    let load1 = |k: &str, len: usize| weights.float::<1>(k, [len], LoadDtype::F32, device).map_err(|e| AdapterError::invalid(&path, e.to_string()));
    let prefix = "transformer.prefix_encoder";
    let embedding = load2(&format!("{prefix}.embedding.weight"), [n, width])?;
    let mlp = if projection {
        let hidden = model.hidden_size;
        Some(PrefixMlp {
            first: TrainableLinear::new(load2(&format!("{prefix}.trans.0.weight"), [hidden, width])?, load1(&format!("{prefix}.trans.0.bias"), hidden)?),
            second: TrainableLinear::new(load2(&format!("{prefix}.trans.2.weight"), [width, hidden])?, load1(&format!("{prefix}.trans.2.bias"), width)?),
        })
    } else {
        None
    };
    Ok(PrefixEncoder::new(embedding, mlp, model, false))
}

/// A PEFT-style encoder from explicit tensors (PEFT's training-time parameters: `embedding`
/// `[n, token_dim]` and the MLP `transform.0` / `transform.2`).
pub fn from_training_params(
    embedding: Tensor<2>,
    mlp: Option<(Tensor<2>, Tensor<1>, Tensor<2>, Tensor<1>)>,
    model: &ModelConfig,
) -> PrefixEncoder {
    let projection = mlp.map(|(w0, b0, w2, b2)| PrefixMlp { first: TrainableLinear::new(w0, b0), second: TrainableLinear::new(w2, b2) });
    PrefixEncoder::new(embedding, projection, model, true)
}

impl fmt::Display for PrefixConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prefix tuning, {} virtual tokens{}", self.num_virtual_tokens, if self.prefix_projection { " through the MLP" } else { "" })
    }
}

/// The recipe's `[adapter]` keys of prefix tuning / P-Tuning v2.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixSection {
    /// Virtual tokens per layer (ChatGLM's `pre_seq_len`).
    pub num_virtual_tokens: usize,
    /// Train through the embedding → Linear → tanh → Linear reparameterization.
    pub prefix_projection: bool,
    /// Hidden width of that MLP (default: PEFT's token width; ChatGLM's hidden size).
    pub encoder_hidden_size: Option<usize>,
}

impl Default for PrefixSection {
    fn default() -> Self {
        Self { num_virtual_tokens: 0, prefix_projection: false, encoder_hidden_size: None }
    }
}

impl DecoderInputs for PrefixEncoder {
    fn extras(&self, batch: usize) -> Vec<LayerExtras> {
        PrefixEncoder::extras(self, batch)
    }

    fn prefix_keys_values(&self) -> Option<Tensor<4>> {
        Some(self.keys_values())
    }

    fn layer_extras(&self, batch: usize, i: usize, prefix_keys_values: Option<&Tensor<4>>) -> Option<LayerExtras> {
        prefix_keys_values.map(|kv| PrefixEncoder::layer_extras(self, kv, i, batch))
    }

    fn prefix_keys(&self) -> usize {
        self.num_virtual_tokens()
    }
}

impl MethodConfig for PrefixConfig {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn count_trainable(&self, model: &ModelConfig) -> usize {
        count_trainable(model, self)
    }

    fn prefix_keys(&self) -> usize {
        self.num_virtual_tokens
    }

    fn init(&self, base: BaseModel, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        let prefix = PrefixEncoder::init(&base.config, self, seed, device);
        Ok(AdaptedModel::with_inputs(base, Some(ModelAdapter::Prefix(prefix))))
    }

    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let prefix = model.required_inputs::<PrefixEncoder>()?;
        prefix.save(model.config(), base_model, dir)
    }

    /// PEFT's training-time names (`prompt_encoder.*`), or THUDM's (`transformer.prefix_encoder.*`).
    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)> {
        let Some(p) = model.inputs_of::<PrefixEncoder>() else { return Vec::new() };
        let (root, first, second) =
            if is_chatglm_ptuning(model.config()) { ("transformer.prefix_encoder", "trans.0", "trans.2") } else { ("prompt_encoder", "transform.0", "transform.2") };
        let mut names = vec![(p.embedding.id, format!("{root}.embedding.weight"))];
        if let Some(mlp) = &p.projection {
            for (name, layer) in [(first, &mlp.first), (second, &mlp.second)] {
                names.push((layer.weight.id, format!("{root}.{name}.weight")));
                names.push((layer.bias.id, format!("{root}.{name}.bias")));
            }
        }
        names
    }
}

impl PeftMethod for PrefixConfig {
    const NAME: &'static str = "prefix";
    type Section = PrefixSection;

    fn from_section(section: PrefixSection) -> Result<Self, String> {
        at_least_one(Self::NAME, &[("num_virtual_tokens", section.num_virtual_tokens)])?;
        Ok(Self { num_virtual_tokens: section.num_virtual_tokens, prefix_projection: section.prefix_projection, encoder_hidden_size: section.encoder_hidden_size })
    }

    fn recognises(folder: &AdapterFolder) -> bool {
        folder.format == FolderFormat::ChatGlmPtuning || folder.peft_type() == Some("PREFIX_TUNING")
    }

    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError> {
        let tokens = match folder.format {
            FolderFormat::ChatGlmPtuning => "pre_seq_len",
            FolderFormat::Peft => "num_virtual_tokens",
        };
        Ok(Self {
            num_virtual_tokens: folder.count(tokens)?,
            prefix_projection: folder.get("prefix_projection").and_then(Value::as_bool).unwrap_or(false),
            encoder_hidden_size: folder.get("encoder_hidden_size").and_then(Value::as_u64).map(|n| n as usize),
        })
    }

    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError> {
        let (prefix, projection) = match folder.format {
            FolderFormat::ChatGlmPtuning => {
                let prefix = load_chatglm_ptuning(&folder.dir, &base.config, device)?;
                let projection = prefix.projection.is_some();
                (prefix, projection)
            }
            // PEFT saves the MLP's output: the table loads the same either way.
            FolderFormat::Peft => (load_peft(&folder.dir, &base.config, device)?, folder.get("prefix_projection").and_then(Value::as_bool).unwrap_or(false)),
        };
        let config = PrefixConfig {
            num_virtual_tokens: prefix.num_virtual_tokens(),
            prefix_projection: projection,
            encoder_hidden_size: prefix.projection.as_ref().map(|mlp| mlp.first.out_features()),
        };
        Ok((AdaptedModel::with_inputs(base, Some(ModelAdapter::Prefix(prefix))), config))
    }
}
