//! The decoder shared by LLaMA, GLM and ChatGLM: pre-norm blocks of grouped-query attention with
//! RoPE and a SwiGLU MLP. Architectures differ only in tensor names ([`KeyLayout`]), fused
//! projections and RoPE pairing, all decided by [`ModelConfig`].

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor};

use crate::checkpoint::{Checkpoint, LoadDtype};
use crate::config::{Architecture, ModelConfig};
use crate::layers::{Embedding, Linear, RmsNorm, Rope, attention_bias, grouped_attention};
use crate::{LoadError, glm, llama};

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
    pub fn of(architecture: Architecture) -> &'static KeyLayout {
        match architecture {
            Architecture::Llama => &llama::KEYS,
            Architecture::Glm => &glm::GLM_KEYS,
            Architecture::ChatGlm => &glm::CHATGLM_KEYS,
        }
    }

    pub fn layer(&self, i: usize) -> String {
        format!("{}.{i}", self.layers)
    }
}

#[derive(Module, Debug)]
pub struct SeparateQkv {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
}

#[derive(Module, Debug)]
pub enum QkvProjection {
    Separate(SeparateQkv),
    /// ChatGLM `query_key_value`: rows `[q | k | v]`.
    Fused(Linear),
}

#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: QkvProjection,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// Returns `(output, k, v)`, with `k`, `v` the full keys/values (past + new, after RoPE)
    /// for the cache.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - past: `[batch, kv_heads, past, head_dim]` each
    /// - bias: `[batch, 1, seq, past + seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        past: Option<(Tensor<4>, Tensor<4>)>,
        bias: Tensor<4>,
    ) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let [b, s, _] = x.dims();
        let (q_dim, kv_dim) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let (q, k, v) = match &self.qkv {
            QkvProjection::Separate(p) => (p.q_proj.forward(x.clone()), p.k_proj.forward(x.clone()), p.v_proj.forward(x)),
            QkvProjection::Fused(p) => {
                let qkv = p.forward(x);
                (qkv.clone().narrow(2, 0, q_dim), qkv.clone().narrow(2, q_dim, kv_dim), qkv.narrow(2, q_dim + kv_dim, kv_dim))
            }
        };
        // b,s,h*d -> b,h,s,d
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, self.head_dim]).swap_dims(1, 2);
        let past_len = past.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        let q = rope.apply(heads(q, self.num_heads), past_len);
        let mut k = rope.apply(heads(k, self.num_kv_heads), past_len);
        let mut v = heads(v, self.num_kv_heads);
        if let Some((past_k, past_v)) = past {
            k = Tensor::cat(vec![past_k, k], 2);
            v = Tensor::cat(vec![past_v, v], 2);
        }
        let out = grouped_attention(q, k.clone(), v.clone(), bias);
        // b,h,s,d -> b,s,h*d
        let out = out.swap_dims(1, 2).reshape([b, s, q_dim]);
        (self.o_proj.forward(out), k, v)
    }
}

#[derive(Module, Debug)]
pub struct SeparateGateUp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
}

#[derive(Module, Debug)]
pub enum GateUpProjection {
    Separate(SeparateGateUp),
    /// GLM `gate_up_proj` / ChatGLM `dense_h_to_4h`: rows `[gate | up]`.
    Fused(Linear),
}

/// SwiGLU: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_up: GateUpProjection,
    pub down_proj: Linear,
}

impl Mlp {
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (gate, up) = match &self.gate_up {
            GateUpProjection::Separate(p) => (p.gate_proj.forward(x.clone()), p.up_proj.forward(x)),
            GateUpProjection::Fused(p) => {
                let gu = p.forward(x);
                let half = gu.dims()[2] / 2;
                (gu.clone().narrow(2, 0, half), gu.narrow(2, half, half))
            }
        };
        self.down_proj.forward(silu(gate) * up)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attention: Attention,
    pub post_attention_norm: RmsNorm,
    pub mlp: Mlp,
}

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor<4>, Tensor<4>)>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every tensor the model reads from a checkpoint, with its shape.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let keys = KeyLayout::of(config.architecture);
    let (h, q_dim, kv_dim, ffn) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.intermediate_size);
    let mut out = Vec::new();
    let mut norms = Vec::new();
    let mut linear = |name: String, rows: usize, cols: usize, bias: bool| {
        if bias {
            out.push((format!("{name}.bias"), vec![rows]));
        }
        out.push((format!("{name}.weight"), vec![rows, cols]));
    };
    for i in 0..config.num_layers {
        let layer = keys.layer(i);
        let attn = format!("{layer}.{}", keys.attention);
        let mlp = format!("{layer}.{}", keys.mlp);
        match keys.qkv {
            QkvKeys::Separate { q, k, v } => {
                linear(format!("{attn}.{q}"), q_dim, h, config.qkv_bias);
                linear(format!("{attn}.{k}"), kv_dim, h, config.qkv_bias);
                linear(format!("{attn}.{v}"), kv_dim, h, config.qkv_bias);
            }
            QkvKeys::Fused(name) => linear(format!("{attn}.{name}"), q_dim + 2 * kv_dim, h, config.qkv_bias),
        }
        linear(format!("{attn}.{}", keys.o_proj), h, q_dim, config.o_bias);
        match keys.gate_up {
            GateUpKeys::Separate { gate, up } => {
                linear(format!("{mlp}.{gate}"), ffn, h, config.mlp_bias);
                linear(format!("{mlp}.{up}"), ffn, h, config.mlp_bias);
            }
            GateUpKeys::Fused(name) => linear(format!("{mlp}.{name}"), 2 * ffn, h, config.mlp_bias),
        }
        linear(format!("{mlp}.{}", keys.down), h, ffn, config.mlp_bias);
        for norm in [keys.input_norm, keys.post_attention_norm] {
            norms.push((format!("{layer}.{norm}.weight"), vec![h]));
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

/// A decoder-only language model with a frozen base.
#[derive(Module, Debug)]
pub struct CausalLm {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub rope: Rope,
}

impl CausalLm {
    /// Loads an HF model folder (config.json + safetensors). Every parameter is frozen.
    pub fn load(dir: &Path, dtype: LoadDtype, device: &Device) -> Result<Self, LoadError> {
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        Self::from_checkpoint(config, &checkpoint, dtype, device)
    }

    pub fn from_checkpoint(
        config: ModelConfig,
        checkpoint: &Checkpoint,
        dtype: LoadDtype,
        device: &Device,
    ) -> Result<Self, LoadError> {
        // Every name and shape is checked from the headers before any weight is read.
        check_checkpoint(&config, checkpoint)?;
        let keys = KeyLayout::of(config.architecture);
        let (h, q_dim, kv_dim) = (config.hidden_size, config.q_dim(), config.kv_dim());
        let ffn = config.intermediate_size;
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
            let weight = checkpoint.float(&format!("{name}.weight"), [out, inp], dtype, device)?;
            let bias = if bias { Some(checkpoint.float(&format!("{name}.bias"), [out], dtype, device)?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let norm = |name: &str| -> Result<RmsNorm, LoadError> {
            Ok(RmsNorm::new(checkpoint.float(&format!("{name}.weight"), [h], dtype, device)?, config.rms_norm_eps))
        };

        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let layer = keys.layer(i);
            let attn = format!("{layer}.{}", keys.attention);
            let mlp = format!("{layer}.{}", keys.mlp);
            let qkv = match keys.qkv {
                QkvKeys::Separate { q, k, v } => QkvProjection::Separate(SeparateQkv {
                    q_proj: linear(&format!("{attn}.{q}"), q_dim, h, config.qkv_bias)?,
                    k_proj: linear(&format!("{attn}.{k}"), kv_dim, h, config.qkv_bias)?,
                    v_proj: linear(&format!("{attn}.{v}"), kv_dim, h, config.qkv_bias)?,
                }),
                QkvKeys::Fused(name) => {
                    QkvProjection::Fused(linear(&format!("{attn}.{name}"), q_dim + 2 * kv_dim, h, config.qkv_bias)?)
                }
            };
            let gate_up = match keys.gate_up {
                GateUpKeys::Separate { gate, up } => GateUpProjection::Separate(SeparateGateUp {
                    gate_proj: linear(&format!("{mlp}.{gate}"), ffn, h, config.mlp_bias)?,
                    up_proj: linear(&format!("{mlp}.{up}"), ffn, h, config.mlp_bias)?,
                }),
                GateUpKeys::Fused(name) => GateUpProjection::Fused(linear(&format!("{mlp}.{name}"), 2 * ffn, h, config.mlp_bias)?),
            };
            layers.push(DecoderLayer {
                input_norm: norm(&format!("{layer}.{}", keys.input_norm))?,
                attention: Attention {
                    qkv,
                    o_proj: linear(&format!("{attn}.{}", keys.o_proj), h, q_dim, config.o_bias)?,
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: config.head_dim,
                },
                post_attention_norm: norm(&format!("{layer}.{}", keys.post_attention_norm))?,
                mlp: Mlp { gate_up, down_proj: linear(&format!("{mlp}.{}", keys.down), h, ffn, config.mlp_bias)? },
            });
        }
        let embed_tokens =
            Embedding::new(checkpoint.float(&format!("{}.weight", keys.embed), [config.vocab_size, h], dtype, device)?);
        let lm_head = if config.tie_word_embeddings { None } else { Some(linear(keys.lm_head, config.vocab_size, h, false)?) };
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm(keys.final_norm)?,
            lm_head,
            rope: Rope::new(config.rope.clone()),
            config,
        })
    }

    /// Logits for a right-padded batch, all positions.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - attention_mask: `[batch, seq]`, 1 for real tokens
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> Tensor<3> {
        let hidden = self.hidden_states(input_ids, attention_mask.as_ref(), None);
        self.logits(hidden)
    }

    /// Logits of the new tokens, reading and extending `cache` (generation; no padding).
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]`
    /// - output: `[batch, new, vocab]`
    pub fn forward_cached(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let hidden = self.hidden_states(input_ids, None, Some(cache));
        self.logits(hidden)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let device = input_ids.device();
        let bias = attention_bias(b, s, past, attention_mask, &device);
        let mut x = self.embed_tokens.forward(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let past_kv = cache.as_ref().and_then(|c| c.layers.get(i).cloned());
            let (attn, k, v) = layer.attention.forward(layer.input_norm.forward(x.clone()), &self.rope, past_kv, bias.clone());
            if let Some(cache) = cache.as_mut() {
                if i < cache.layers.len() {
                    cache.layers[i] = (k, v);
                } else {
                    cache.layers.push((k, v));
                }
            }
            x = x + attn;
            x = x.clone() + layer.mlp.forward(layer.post_attention_norm.forward(x));
        }
        self.norm.forward(x)
    }

    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`
    /// - output: `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                hidden.reshape([b * s, h]).matmul(self.embed_tokens.weight.val().transpose()).reshape([b, s, self.config.vocab_size])
            }
        }
    }
}
