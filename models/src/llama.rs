//! LLaMA 1/2/3 and compatible checkpoints (SmolLM2, Vicuna, Chinese-LLaMA, Qwen2, Qwen3, Mistral):
//! grouped-query attention, RMSNorm, SwiGLU, RoPE in HF's `rotate_half` convention, so q/k load
//! as stored and adapters export without un-permuting.

use crate::LoadError;
use crate::config::{Architecture, HF_SHAPE_KEYS, JsonConfig, ModelConfig, RopeConfig, RopePairing, RopeScaling, SlidingWindow};
use serde_json::Value;
use crate::family::{GateUpKeys, KeyLayout, QkvKeys};

/// Tensor names of `LlamaForCausalLM`.
pub const KEYS: KeyLayout = KeyLayout {
    embed: "model.embed_tokens",
    layers: "model.layers",
    attention: "self_attn",
    qkv: QkvKeys::Separate { q: "q_proj", k: "k_proj", v: "v_proj" },
    o_proj: "o_proj",
    mlp: "mlp",
    gate_up: GateUpKeys::Separate { gate: "gate_proj", up: "up_proj" },
    down: "down_proj",
    input_norm: "input_layernorm",
    post_attention_norm: "post_attention_layernorm",
    final_norm: "model.norm",
    lm_head: "lm_head",
};

pub(crate) fn parse_config(json: &JsonConfig, model_type: &str) -> Result<ModelConfig, LoadError> {
    let partial_rotary_factor = json.opt_f64("partial_rotary_factor")?;
    // Qwen2 always has q/k/v biases and none on o_proj; LLaMA's (and Qwen3's) `attention_bias`
    // covers all four.
    let (qkv_bias, o_bias) = if model_type == "qwen2" {
        (true, false)
    } else {
        let bias = json.bool_or("attention_bias", false)?;
        (bias, bias)
    };
    let rope = |head_dim: usize| {
        let rotary_dim = partial_rotary_factor.map_or(head_dim, |factor| (head_dim as f64 * factor) as usize);
        Ok(RopeConfig {
            theta: json.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rotary_dim,
            pairing: RopePairing::Half,
            scaling: parse_rope_scaling(json, rotary_dim)?,
        })
    };
    let rms_norm_eps = json.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
    Ok(ModelConfig {
        qkv_bias,
        o_bias,
        mlp_bias: json.bool_or("mlp_bias", false)?,
        qk_norm: model_type == "qwen3",
        sliding_window: parse_sliding_window(json, model_type)?,
        ..json.base_config(&HF_SHAPE_KEYS, Architecture::Llama, model_type, rms_norm_eps, rope)?
    })
}

/// Mistral's `sliding_window` applies to every layer (null: none). Qwen2/Qwen3 use their
/// `sliding_window` only with `use_sliding_window`, in the layers `layer_types` names
/// `sliding_attention`, or by default from `max_window_layers` on, as transformers.
fn parse_sliding_window(json: &JsonConfig, model_type: &str) -> Result<Option<SlidingWindow>, LoadError> {
    let layers = json.usize(HF_SHAPE_KEYS.layers)?;
    let size = match model_type {
        "mistral" => json.opt_usize("sliding_window")?,
        "qwen2" | "qwen3" if json.bool_or("use_sliding_window", false)? => json.opt_usize("sliding_window")?,
        _ => None,
    };
    let Some(size) = size else { return Ok(None) };
    if size == 0 {
        return Err(json.invalid("sliding_window", "a window of 0 tokens"));
    }
    let sliding = match (model_type, json.get("layer_types")) {
        ("mistral", _) | (_, None | Some(Value::Null)) => {
            let first = if model_type == "mistral" { 0 } else { json.opt_usize("max_window_layers")?.unwrap_or(28) };
            (0..layers).map(|i| i >= first).collect::<Vec<_>>()
        }
        (_, Some(types)) => {
            let types = types.as_array().filter(|t| t.len() == layers).ok_or_else(|| json.invalid("layer_types", format!("expected a list of {layers} layer types")))?;
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(json.unsupported("layer_types", format!("layer type {t} is not supported"))),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(sliding.contains(&true).then_some(SlidingWindow { size, layers: sliding }))
}

/// `rope_scaling`: absent/null/"default", "linear", "llama3", "yarn", "dynamic" or "longrope"
/// (whose factors are one per frequency of the `rotary_dim` rotated dims).
pub(crate) fn parse_rope_scaling(json: &JsonConfig, rotary_dim: usize) -> Result<Option<RopeScaling>, LoadError> {
    let Some(value) = json.get("rope_scaling") else { return Ok(None) };
    let key = "rope_scaling";
    let obj = value.as_object().ok_or_else(|| json.invalid(key, format!("expected an object, found {value}")))?;
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    let number = |name: &str| {
        obj.get(name)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| json.invalid(key, format!("'{kind}' scaling needs a number '{name}'")))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: number("factor")? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        })),
        "yarn" => {
            let optional = |name: &str| obj.get(name).and_then(|v| v.as_f64());
            // transformers prefers a top-level original_max_position_embeddings, then the
            // scaling's own, then max_position_embeddings.
            let original = match json.opt_f64("original_max_position_embeddings")?.or_else(|| optional("original_max_position_embeddings")) {
                Some(original) => original,
                None => json.opt_f64("max_position_embeddings")?.ok_or_else(|| json.invalid(key, "'yarn' scaling needs 'original_max_position_embeddings'"))?,
            };
            Ok(Some(RopeScaling::Yarn {
                factor: number("factor")?,
                original_max_position_embeddings: original,
                beta_fast: optional("beta_fast"),
                beta_slow: optional("beta_slow"),
                attention_factor: optional("attention_factor"),
                mscale: optional("mscale"),
                mscale_all_dim: optional("mscale_all_dim"),
                truncate: obj.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
            }))
        }
        "dynamic" => Ok(Some(RopeScaling::Dynamic {
            factor: number("factor")?,
            max_position_embeddings: json.opt_f64("max_position_embeddings")?.unwrap_or(2048.0),
        })),
        "longrope" => {
            let original = match obj.get("original_max_position_embeddings").and_then(Value::as_f64) {
                Some(original) => original,
                None => json.opt_f64("original_max_position_embeddings")?.ok_or_else(|| json.invalid(key, "'longrope' scaling needs 'original_max_position_embeddings'"))?,
            };
            let half = rotary_dim / 2;
            let factors = |name: &str| {
                let list = obj.get(name).and_then(Value::as_array).ok_or_else(|| json.invalid(key, format!("'longrope' scaling needs a list '{name}'")))?;
                let values: Option<Vec<f64>> = list.iter().map(Value::as_f64).collect();
                values.filter(|v| v.len() == half).ok_or_else(|| json.invalid(key, format!("'{name}' must hold {half} numbers (half the rotary dimension)")))
            };
            let factor = match obj.get("factor").and_then(Value::as_f64) {
                Some(factor) => factor,
                None => json.opt_f64("max_position_embeddings")?.unwrap_or(2048.0) / original,
            };
            Ok(Some(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor: obj.get("attention_factor").and_then(Value::as_f64).unwrap_or_else(|| RopeScaling::longrope_default_attention(factor, original)),
            }))
        }
        other => Err(json.unsupported(key, format!("unsupported rope_type '{other}' (supported: default, linear, llama3, yarn, dynamic, longrope)"))),
    }
}
