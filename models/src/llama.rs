//! LLaMA 1/2/3 and compatible checkpoints (SmolLM2, Vicuna, Chinese-LLaMA, Qwen2):
//! grouped-query attention, RMSNorm, SwiGLU, RoPE in HF's `rotate_half` convention, so q/k load
//! as stored and adapters export without un-permuting.

use crate::LoadError;
use crate::config::{Architecture, JsonConfig, ModelConfig, RopeConfig, RopePairing, RopeScaling};
use crate::transformer::{GateUpKeys, KeyLayout, QkvKeys};

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
    let shapes = json.hf_shapes()?;
    let rotary_dim = match json.opt_f64("partial_rotary_factor")? {
        Some(factor) => (shapes.head_dim as f64 * factor) as usize,
        None => shapes.head_dim,
    };
    // Qwen2 always has q/k/v biases and none on o_proj; LLaMA's `attention_bias` covers all four.
    let (qkv_bias, o_bias) = if model_type == "qwen2" {
        (true, false)
    } else {
        let bias = json.bool_or("attention_bias", false)?;
        (bias, bias)
    };
    let (bos_token_id, eos_token_ids, pad_token_id) = json.special_tokens()?;
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        model_type: model_type.to_owned(),
        vocab_size: shapes.vocab_size,
        hidden_size: shapes.hidden_size,
        intermediate_size: shapes.intermediate_size,
        num_layers: shapes.num_layers,
        num_heads: shapes.num_heads,
        num_kv_heads: shapes.num_kv_heads,
        head_dim: shapes.head_dim,
        rms_norm_eps: json.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope: RopeConfig {
            theta: json.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rotary_dim,
            pairing: RopePairing::Half,
            scaling: parse_rope_scaling(json)?,
        },
        qkv_bias,
        o_bias,
        mlp_bias: json.bool_or("mlp_bias", false)?,
        tie_word_embeddings: json.bool_or("tie_word_embeddings", false)?,
        max_position_embeddings: json.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        torch_dtype: json.string("torch_dtype").ok(),
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
