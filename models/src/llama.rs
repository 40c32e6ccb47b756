//! LLaMA 1/2/3 and compatible checkpoints (SmolLM2, Vicuna, Chinese-LLaMA, Qwen2):
//! grouped-query attention, RMSNorm, SwiGLU, RoPE in HF's `rotate_half` convention, so q/k load
//! as stored and adapters export without un-permuting.

use crate::LoadError;
use crate::config::{Architecture, HF_SHAPE_KEYS, JsonConfig, ModelConfig, RopeConfig, RopePairing, RopeScaling};
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
    // Qwen2 always has q/k/v biases and none on o_proj; LLaMA's `attention_bias` covers all four.
    let (qkv_bias, o_bias) = if model_type == "qwen2" {
        (true, false)
    } else {
        let bias = json.bool_or("attention_bias", false)?;
        (bias, bias)
    };
    let rope = |head_dim: usize| {
        Ok(RopeConfig {
            theta: json.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rotary_dim: partial_rotary_factor.map_or(head_dim, |factor| (head_dim as f64 * factor) as usize),
            pairing: RopePairing::Half,
            scaling: parse_rope_scaling(json)?,
        })
    };
    let rms_norm_eps = json.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
    Ok(ModelConfig {
        qkv_bias,
        o_bias,
        mlp_bias: json.bool_or("mlp_bias", false)?,
        ..json.base_config(&HF_SHAPE_KEYS, Architecture::Llama, model_type, rms_norm_eps, rope)?
    })
}

/// `rope_scaling`: absent/null/"default", "linear" or "llama3".
fn parse_rope_scaling(json: &JsonConfig) -> Result<Option<RopeScaling>, LoadError> {
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
        other => Err(json.invalid(key, format!("unsupported rope_type '{other}' (supported: default, linear, llama3)"))),
    }
}
