//! The checkpoint families: one table each (tensor names, which projections are fused) and the
//! one place where a config's `model_type` picks its family. Loading, the checkpoint check,
//! parameter counts, adapters' targets and GGUF names all read these tables, so a new family is
//! a new table and a config parser, not edits across the decoder.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, JsonConfig, ModelConfig};
use crate::{LoadError, glm, llama};

/// Every family: its `model_type` values, its table and its config parser.
struct Family {
    model_types: &'static [&'static str],
    architecture: Architecture,
    keys: &'static KeyLayout,
    parse: fn(&JsonConfig, &str) -> Result<ModelConfig, LoadError>,
}

const FAMILIES: [Family; 3] = [
    Family { model_types: &["llama", "qwen2", "qwen3", "mistral"], architecture: Architecture::Llama, keys: &llama::KEYS, parse: llama::parse_config },
    Family { model_types: &["glm", "glm4"], architecture: Architecture::Glm, keys: &glm::GLM_KEYS, parse: glm::parse_glm_config },
    Family { model_types: &["chatglm"], architecture: Architecture::ChatGlm, keys: &glm::CHATGLM_KEYS, parse: |json, _| glm::parse_chatglm_config(json) },
];

/// transformers 5 saves RoPE's keys inside `rope_parameters` (`rope_theta`, `rope_type` with its
/// scaling numbers, `partial_rotary_factor`) where transformers 4 kept them at the top level, as
/// the parsers read them: they are put back there, without overriding a top-level key.
fn with_rope_keys_at_top_level(obj: &Map<String, Value>) -> Cow<'_, Map<String, Value>> {
    let Some(Value::Object(params)) = obj.get("rope_parameters") else { return Cow::Borrowed(obj) };
    let mut obj = obj.clone();
    let absent = |obj: &Map<String, Value>, key: &str| obj.get(key).is_none_or(Value::is_null);
    for key in ["rope_theta", "partial_rotary_factor"] {
        if let Some(value) = params.get(key).filter(|_| absent(&obj, key)) {
            obj.insert(key.into(), value.clone());
        }
    }
    let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
    if kind != "default" && absent(&obj, "rope_scaling") {
        obj.insert("rope_scaling".into(), Value::Object(params.clone()));
    }
    Cow::Owned(obj)
}

impl ModelConfig {
    /// Parses a config.json by its family's parser. `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &std::path::Path) -> Result<Self, LoadError> {
        let obj = value
            .as_object()
            .ok_or_else(|| LoadError::Invalid { path: path.to_path_buf(), reason: "not a JSON object".into() })?;
        let obj = with_rope_keys_at_top_level(obj);
        let json = JsonConfig { obj: &obj, path: path.to_path_buf() };
        let model_type = json.string("model_type")?;
        match FAMILIES.iter().find(|f| f.model_types.contains(&model_type.as_str())) {
            Some(family) => (family.parse)(&json, &model_type),
            None => {
                let supported: Vec<&str> = FAMILIES.iter().flat_map(|f| f.model_types.iter().copied()).collect();
                Err(LoadError::Unsupported {
                    path: path.to_path_buf(),
                    key: "model_type".into(),
                    reason: format!("unsupported architecture '{model_type}' (supported: {})", supported.join(", ")),
                })
            }
        }
    }

    /// Number of base parameters, from the shapes alone.
    pub fn num_params(&self) -> usize {
        expected_tensors(self).iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }
}

impl KeyLayout {
    /// The table of `architecture`.
    pub fn of(architecture: Architecture) -> &'static KeyLayout {
        FAMILIES.iter().find(|f| f.architecture == architecture).expect("every architecture has a family").keys
    }
}

/// What a projection computes, whatever its family calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Q,
    K,
    V,
    /// Rows `[q | k | v]`.
    Qkv,
    O,
    Gate,
    Up,
    /// Rows `[gate | up]`.
    GateUp,
    Down,
}

impl Role {
    /// `[out, in]` of this projection in `config`.
    pub fn shape(self, config: &ModelConfig) -> [usize; 2] {
        let (h, q, kv, ffn) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.intermediate_size);
        match self {
            Role::Q => [q, h],
            Role::K | Role::V => [kv, h],
            Role::Qkv => [q + 2 * kv, h],
            Role::O => [h, q],
            Role::Gate | Role::Up => [ffn, h],
            Role::GateUp => [2 * ffn, h],
            Role::Down => [h, ffn],
        }
    }

    /// The activation of its layer this projection reads.
    pub fn input(self) -> LayerActivation {
        match self {
            Role::Q | Role::K | Role::V | Role::Qkv => LayerActivation::AttentionInput,
            Role::O => LayerActivation::AttentionOutput,
            Role::Gate | Role::Up | Role::GateUp => LayerActivation::MlpInput,
            Role::Down => LayerActivation::MlpProduct,
        }
    }

    pub fn bias(self, config: &ModelConfig) -> bool {
        match self {
            Role::Q | Role::K | Role::V | Role::Qkv => config.qkv_bias,
            Role::O => config.o_bias,
            Role::Gate | Role::Up | Role::GateUp | Role::Down => config.mlp_bias,
        }
    }
}

/// The activations of a decoder layer that its projections read: projections that read the same
/// one (q, k and v; gate and up) read one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerActivation {
    /// The input norm's output.
    AttentionInput,
    /// The attention's output, heads concatenated.
    AttentionOutput,
    /// The post-attention norm's output.
    MlpInput,
    /// `act(gate) · up`.
    MlpProduct,
}

/// One row of a family's projection table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionSpec {
    /// HF module name (`model.layers.0.self_attn.q_proj`); tensors `{name}.weight`, `{name}.bias`.
    pub name: String,
    pub role: Role,
    /// `[out, in]`, HF layout.
    pub shape: [usize; 2],
    pub bias: bool,
}

/// Where q, k and v come from: three projections, or one fused `[q | k | v]` projection.
#[derive(Debug, Clone, Copy)]
pub enum QkvKeys {
    Separate { q: &'static str, k: &'static str, v: &'static str },
    Fused(&'static str),
}

/// Where the SwiGLU gate and up projections come from: two, or one fused `[gate | up]`.
#[derive(Debug, Clone, Copy)]
pub enum GateUpKeys {
    Separate { gate: &'static str, up: &'static str },
    Fused(&'static str),
}

/// HF module names of one architecture (tensor key = module name + `.weight` / `.bias`).
#[derive(Debug, Clone, Copy)]
pub struct KeyLayout {
    pub embed: &'static str,
    /// Layer `i` lives under `{layers}.{i}.`
    pub layers: &'static str,
    pub attention: &'static str,
    pub qkv: QkvKeys,
    pub o_proj: &'static str,
    pub mlp: &'static str,
    pub gate_up: GateUpKeys,
    pub down: &'static str,
    pub input_norm: &'static str,
    pub post_attention_norm: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
}

impl KeyLayout {
    pub fn layer(&self, i: usize) -> String {
        format!("{}.{i}", self.layers)
    }

    /// Layer `i`'s norms of the attention's and the MLP's output (GLM-4-0414), as modules.
    pub fn output_norms(&self, i: usize) -> [String; 2] {
        [format!("{}.post_self_attn_layernorm", self.layer(i)), format!("{}.post_mlp_layernorm", self.layer(i))]
    }

    /// Layer `i`'s per-head q and k norms (Qwen3), as modules.
    pub fn qk_norms(&self, i: usize) -> [String; 2] {
        let attn = format!("{}.{}", self.layer(i), self.attention);
        [format!("{attn}.q_norm"), format!("{attn}.k_norm")]
    }

    /// Layer `i`'s projections, each with its HF module name and what it computes, in
    /// [`DecoderLayer::projections`](crate::transformer::DecoderLayer::projections) order.
    pub fn roles(&self, i: usize) -> Vec<(String, Role)> {
        let attn = format!("{}.{}", self.layer(i), self.attention);
        let mlp = format!("{}.{}", self.layer(i), self.mlp);
        let mut out = match self.qkv {
            QkvKeys::Separate { q, k, v } => vec![(format!("{attn}.{q}"), Role::Q), (format!("{attn}.{k}"), Role::K), (format!("{attn}.{v}"), Role::V)],
            QkvKeys::Fused(name) => vec![(format!("{attn}.{name}"), Role::Qkv)],
        };
        out.push((format!("{attn}.{}", self.o_proj), Role::O));
        match self.gate_up {
            GateUpKeys::Separate { gate, up } => out.extend([(format!("{mlp}.{gate}"), Role::Gate), (format!("{mlp}.{up}"), Role::Up)]),
            GateUpKeys::Fused(name) => out.push((format!("{mlp}.{name}"), Role::GateUp)),
        }
        out.push((format!("{mlp}.{}", self.down), Role::Down));
        out
    }

    /// HF module names of layer `i`'s projections, in [`KeyLayout::roles`] order.
    pub fn projection_names(&self, i: usize) -> Vec<String> {
        self.roles(i).into_iter().map(|(name, _)| name).collect()
    }

    /// The projection table of layer `i` of `config`: name, role, `[out, in]` and bias. Loading,
    /// the checkpoint check, parameter counts and adapters' targets all read it.
    pub fn projections(&self, config: &ModelConfig, i: usize) -> Vec<ProjectionSpec> {
        self.roles(i).into_iter().map(|(name, role)| ProjectionSpec { shape: role.shape(config), bias: role.bias(config), name, role }).collect()
    }
}

/// Every tensor the model reads from a checkpoint, with its shape.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let keys = KeyLayout::of(config.architecture);
    let h = config.hidden_size;
    let mut out = Vec::new();
    let mut norms = Vec::new();
    for i in 0..config.num_layers {
        for p in keys.projections(config, i) {
            if p.bias {
                out.push((format!("{}.bias", p.name), vec![p.shape[0]]));
            }
            out.push((format!("{}.weight", p.name), p.shape.to_vec()));
        }
        for norm in [keys.input_norm, keys.post_attention_norm] {
            norms.push((format!("{}.{norm}.weight", keys.layer(i)), vec![h]));
        }
        if config.qk_norm {
            norms.extend(keys.qk_norms(i).map(|norm| (format!("{norm}.weight"), vec![config.head_dim])));
        }
        if config.output_norms {
            norms.extend(keys.output_norms(i).map(|norm| (format!("{norm}.weight"), vec![h])));
        }
    }
    out.extend(norms);
    out.push((format!("{}.weight", keys.embed), vec![config.vocab_size, h]));
    out.push((format!("{}.weight", keys.final_norm), vec![h]));
    if !config.tie_word_embeddings {
        out.push((format!("{}.weight", keys.lm_head), vec![config.vocab_size, h]));
    }
    out
}

/// Checks that `checkpoint` holds every tensor the model needs, with the right shapes, from the
/// safetensors headers alone.
pub fn check_checkpoint(config: &ModelConfig, checkpoint: &Checkpoint) -> Result<(), LoadError> {
    for (key, shape) in expected_tensors(config) {
        let (found, _) = checkpoint
            .info(&key)
            .ok_or_else(|| LoadError::MissingTensor { path: checkpoint.first_path().to_path_buf(), key: key.clone() })?;
        if found != shape.as_slice() {
            let path = checkpoint.path_of(&key).unwrap_or(checkpoint.first_path()).to_path_buf();
            return Err(LoadError::Shape { path, key, expected: shape, found: found.to_vec() });
        }
    }
    Ok(())
}
