//! GLM family. Two checkpoint layouts, one decoder:
//! - HF-native `glm` (`GlmForCausalLM`, GLM-4 architecture): separate q/k/v with bias, fused
//!   `gate_up_proj`, RoPE on the first `partial_rotary_factor` of each head, interleaved pairs.
//! - Remote-code `chatglm` (ChatGLM2/3, GLM-4-9b-chat): fused `query_key_value`, multi-query
//!   groups, fused `dense_h_to_4h`, RoPE on the first half of each head (interleaved), base
//!   `10000 · rope_ratio`.

use crate::{LoadError, llama};
use crate::config::{Architecture, HF_SHAPE_KEYS, JsonConfig, ModelConfig, RopeConfig, RopePairing, ShapeKeys};
use crate::family::{GateUpKeys, KeyLayout, QkvKeys};

/// Tensor names of `GlmForCausalLM`: LLaMA's, with `gate_up_proj` fused.
pub const GLM_KEYS: KeyLayout = KeyLayout { gate_up: GateUpKeys::Fused("gate_up_proj"), ..llama::KEYS };

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

/// HF's `glm` (GLM-4-9b-chat-hf) and `glm4` (GLM-4-0414: the same decoder with norms on the
/// attention's and the MLP's output).
pub(crate) fn parse_glm_config(json: &JsonConfig, model_type: &str) -> Result<ModelConfig, LoadError> {
    let factor = json.opt_f64("partial_rotary_factor")?.unwrap_or(0.5);
    let rope = |head_dim: usize| {
        let rotary_dim = (head_dim as f64 * factor) as usize;
        Ok(RopeConfig {
            theta: json.opt_f64("rope_theta")?.unwrap_or(10_000.0),
            rotary_dim,
            pairing: RopePairing::Interleaved,
            // transformers' GLM rotary embedding takes LLaMA's `rope_scaling` types.
            scaling: crate::llama::parse_rope_scaling(json, rotary_dim)?,
        })
    };
    let rms_norm_eps = json.opt_f64("rms_norm_eps")?.unwrap_or(1.5625e-7);
    Ok(ModelConfig {
        qkv_bias: json.bool_or("attention_bias", true)?,
        output_norms: model_type == "glm4",
        max_position_embeddings: json.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
        ..json.base_config(&HF_SHAPE_KEYS, Architecture::Glm, model_type, rms_norm_eps, rope)?
    })
}

pub(crate) fn parse_chatglm_config(json: &JsonConfig) -> Result<ModelConfig, LoadError> {
    // Variants of the remote code that this decoder does not implement.
    let require = |key: &str, expected: bool, default: bool| -> Result<(), LoadError> {
        if json.bool_or(key, default)? != expected {
            return Err(json.unsupported(key, format!("only {expected} is supported")));
        }
        Ok(())
    };
    require("rmsnorm", true, true)?;
    require("post_layer_norm", true, true)?;
    require("apply_residual_connection_post_layernorm", false, false)?;
    if json.get("quantization_bit").and_then(|v| v.as_u64()).is_some_and(|bits| bits != 0) {
        return Err(json.unsupported("quantization_bit", "quantized ChatGLM checkpoints are not supported"));
    }
    let multi_query = json.bool_or("multi_query_attention", false)?;
    if multi_query {
        json.usize("multi_query_group_num")?;
    }
    let keys = ShapeKeys {
        vocab: "padded_vocab_size",
        hidden: "hidden_size",
        ffn: "ffn_hidden_size",
        layers: "num_layers",
        heads: "num_attention_heads",
        // Without multi-query attention every head has its own keys and values.
        kv_heads: if multi_query { "multi_query_group_num" } else { "num_attention_heads" },
        head_dim: "kv_channels",
    };
    let rope_ratio = json.opt_f64("rope_ratio")?.unwrap_or(1.0);
    let rope = |head_dim: usize| {
        Ok(RopeConfig { theta: 10_000.0 * rope_ratio, rotary_dim: head_dim / 2, pairing: RopePairing::Interleaved, scaling: None })
    };
    let rms_norm_eps = json.opt_f64("layernorm_epsilon")?.unwrap_or(1e-5);
    let add_bias_linear = json.bool_or("add_bias_linear", false)?;
    Ok(ModelConfig {
        qkv_bias: json.bool_or("add_qkv_bias", false)?,
        o_bias: add_bias_linear,
        mlp_bias: add_bias_linear,
        tie_word_embeddings: false,
        max_position_embeddings: json.opt_usize("seq_length")?.unwrap_or(8192),
        ..json.base_config(&keys, Architecture::ChatGlm, "chatglm", rms_norm_eps, rope)?
    })
}
