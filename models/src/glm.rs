//! GLM family. Two checkpoint layouts, one decoder:
//! - HF-native `glm` (`GlmForCausalLM`, GLM-4 architecture): separate q/k/v with bias, fused
//!   `gate_up_proj`, RoPE on the first `partial_rotary_factor` of each head, interleaved pairs.
//! - Remote-code `chatglm` (ChatGLM2/3, GLM-4-9b-chat): fused `query_key_value`, multi-query
//!   groups, fused `dense_h_to_4h`, RoPE on the first half of each head (interleaved), base
//!   `10000 · rope_ratio`.

use crate::LoadError;
use crate::config::{Architecture, JsonConfig, ModelConfig, RopeConfig, RopePairing};
use crate::transformer::{GateUpKeys, KeyLayout, QkvKeys};

/// Tensor names of `GlmForCausalLM`.
pub const GLM_KEYS: KeyLayout = KeyLayout {
    embed: "model.embed_tokens",
    layers: "model.layers",
    attention: "self_attn",
    qkv: QkvKeys::Separate { q: "q_proj", k: "k_proj", v: "v_proj" },
    o_proj: "o_proj",
    mlp: "mlp",
    gate_up: GateUpKeys::Fused("gate_up_proj"),
    down: "down_proj",
    input_norm: "input_layernorm",
    post_attention_norm: "post_attention_layernorm",
    final_norm: "model.norm",
    lm_head: "lm_head",
};

/// Tensor names of THUDM's `ChatGLMForConditionalGeneration`.
pub const CHATGLM_KEYS: KeyLayout = KeyLayout {
    embed: "transformer.embedding.word_embeddings",
    layers: "transformer.encoder.layers",
    attention: "self_attention",
    qkv: QkvKeys::Fused("query_key_value"),
    o_proj: "dense",
    mlp: "mlp",
    gate_up: GateUpKeys::Fused("dense_h_to_4h"),
    down: "dense_4h_to_h",
    input_norm: "input_layernorm",
    post_attention_norm: "post_attention_layernorm",
    final_norm: "transformer.encoder.final_layernorm",
    lm_head: "transformer.output_layer",
};

pub(crate) fn parse_glm_config(json: &JsonConfig) -> Result<ModelConfig, LoadError> {
    let shapes = json.hf_shapes()?;
    let factor = json.opt_f64("partial_rotary_factor")?.unwrap_or(0.5);
    let (bos_token_id, eos_token_ids, pad_token_id) = json.special_tokens()?;
    Ok(ModelConfig {
        architecture: Architecture::Glm,
        model_type: "glm".into(),
        vocab_size: shapes.vocab_size,
        hidden_size: shapes.hidden_size,
        intermediate_size: shapes.intermediate_size,
        num_layers: shapes.num_layers,
        num_heads: shapes.num_heads,
        num_kv_heads: shapes.num_kv_heads,
        head_dim: shapes.head_dim,
        rms_norm_eps: json.opt_f64("rms_norm_eps")?.unwrap_or(1.5625e-7),
        rope: RopeConfig {
            theta: json.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rotary_dim: (shapes.head_dim as f64 * factor) as usize,
            pairing: RopePairing::Interleaved,
            scaling: None,
        },
        qkv_bias: json.bool_or("attention_bias", true)?,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: json.bool_or("tie_word_embeddings", false)?,
        max_position_embeddings: json.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        torch_dtype: json.string("torch_dtype").ok(),
    })
}

pub(crate) fn parse_chatglm_config(json: &JsonConfig) -> Result<ModelConfig, LoadError> {
    // Variants of the remote code that this decoder does not implement.
    let require = |key: &str, expected: bool, default: bool| -> Result<(), LoadError> {
        if json.bool_or(key, default)? != expected {
            return Err(json.invalid(key, format!("only {expected} is supported")));
        }
        Ok(())
    };
    require("rmsnorm", true, true)?;
    require("post_layer_norm", true, true)?;
    require("apply_residual_connection_post_layernorm", false, false)?;
    if json.get("quantization_bit").and_then(|v| v.as_u64()).is_some_and(|bits| bits != 0) {
        return Err(json.invalid("quantization_bit", "quantized ChatGLM checkpoints are not supported"));
    }
    let num_heads = json.usize("num_attention_heads")?;
    let num_kv_heads = if json.bool_or("multi_query_attention", false)? {
        json.usize("multi_query_group_num")?
    } else {
        num_heads
    };
    json.check_heads(num_heads, num_kv_heads, "multi_query_group_num")?;
    let hidden_size = json.usize("hidden_size")?;
    let head_dim = json.opt_usize("kv_channels")?.unwrap_or(hidden_size / num_heads);
    let add_bias_linear = json.bool_or("add_bias_linear", false)?;
    let (bos_token_id, eos_token_ids, pad_token_id) = json.special_tokens()?;
    Ok(ModelConfig {
        architecture: Architecture::ChatGlm,
        model_type: "chatglm".into(),
        vocab_size: json.usize("padded_vocab_size")?,
        hidden_size,
        intermediate_size: json.usize("ffn_hidden_size")?,
        num_layers: json.usize("num_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: json.opt_f64("layernorm_epsilon")?.unwrap_or(1e-5),
        rope: RopeConfig {
            theta: 10_000.0 * json.opt_f64("rope_ratio")?.unwrap_or(1.0),
            rotary_dim: head_dim / 2,
            pairing: RopePairing::Interleaved,
            scaling: None,
        },
        qkv_bias: json.bool_or("add_qkv_bias", false)?,
        o_bias: add_bias_linear,
        mlp_bias: add_bias_linear,
        tie_word_embeddings: false,
        max_position_embeddings: json.opt_usize("seq_length")?.unwrap_or(8192),
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        torch_dtype: json.string("torch_dtype").ok(),
    })
}
