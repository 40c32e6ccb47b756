//! The decoder shared by LLaMA, GLM and ChatGLM: pre-norm blocks of grouped-query attention with
//! RoPE and a SwiGLU MLP. Architectures differ only in tensor names ([`KeyLayout`]), fused
//! projections and RoPE pairing, all decided by [`ModelConfig`].

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

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

    /// HF module names of layer `i`'s projections, in [`DecoderLayer::projections`] order.
    pub fn projection_names(&self, i: usize) -> Vec<String> {
        let attn = format!("{}.{}", self.layer(i), self.attention);
        let mlp = format!("{}.{}", self.layer(i), self.mlp);
        let mut names = match self.qkv {
            QkvKeys::Separate { q, k, v } => vec![format!("{attn}.{q}"), format!("{attn}.{k}"), format!("{attn}.{v}")],
            QkvKeys::Fused(name) => vec![format!("{attn}.{name}")],
        };
        names.push(format!("{attn}.{}", self.o_proj));
        match self.gate_up {
            GateUpKeys::Separate { gate, up } => names.extend([format!("{mlp}.{gate}"), format!("{mlp}.{up}")]),
            GateUpKeys::Fused(name) => names.push(format!("{mlp}.{name}")),
        }
        names.push(format!("{mlp}.{}", self.down));
        names
    }
}

/// A learned linear map inside a decoder block (q/k/v/o, gate/up/down). The base model uses
/// [`Linear`]; an adapter substitutes its own layer (LoRA's) without the decoder knowing.
pub trait Projection: Module {
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Projection for Linear {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        Linear::forward(self, x)
    }
}

#[derive(Module, Debug)]
pub struct SeparateQkv<P> {
    pub q_proj: P,
    pub k_proj: P,
    pub v_proj: P,
}

#[derive(Module, Debug)]
pub enum QkvProjection<P> {
    Separate(SeparateQkv<P>),
    /// ChatGLM `query_key_value`: rows `[q | k | v]`.
    Fused(P),
}

/// What an adapter adds inside one layer's attention; the decoder knows no method beyond this.
#[derive(Debug, Clone, Default)]
pub struct LayerExtras {
    /// Keys and values placed before every other key, without RoPE and visible to every query
    /// (prefix tuning, P-Tuning v2). Shapes `[batch, kv_heads, prefix, head_dim]`.
    pub prefix: Option<(Tensor<4>, Tensor<4>)>,
    /// Whether the prefix occupies the first positions, so real tokens start at position
    /// `prefix` (PEFT on transformers, whose cache positions count the prefix), or no positions,
    /// so they start at 0 (THUDM's ChatGLM P-Tuning v2).
    pub prefix_takes_positions: bool,
    /// A gated adaption prompt (LLaMA-Adapter): prompt `[1, len, hidden]` and gate `[1]`. Its
    /// keys/values come from this layer's frozen k/v projections, the layer's (RoPE'd) queries
    /// attend to them alone, and `o_proj(gate · softmax(q kᵀ/√d) v)` is added to the output.
    pub adaption: Option<(Tensor<3>, Tensor<1>)>,
}

#[derive(Module, Debug)]
pub struct Attention<P> {
    pub qkv: QkvProjection<P>,
    pub o_proj: P,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<P: Projection> Attention<P> {
    /// q, k, v projections of `x`: `[batch, seq, heads·d]`, `[batch, seq, kv_heads·d]` ×2.
    fn project(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        let (q_dim, kv_dim) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        match &self.qkv {
            QkvProjection::Separate(p) => (p.q_proj.forward(x.clone()), p.k_proj.forward(x.clone()), p.v_proj.forward(x)),
            QkvProjection::Fused(p) => {
                let qkv = p.forward(x);
                (qkv.clone().narrow(2, 0, q_dim), qkv.clone().narrow(2, q_dim, kv_dim), qkv.narrow(2, q_dim + kv_dim, kv_dim))
            }
        }
    }

    /// Returns `(output, k, v)`, with `k`, `v` the keys/values of past + new positions (after
    /// RoPE, without any prefix) for the cache.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - past: `[batch, kv_heads, past, head_dim]` each
    /// - bias: `[batch, 1, seq, prefix + past + seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        past: Option<(Tensor<4>, Tensor<4>)>,
        bias: Tensor<4>,
        extras: Option<&LayerExtras>,
    ) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let (q, k, v) = self.project_heads(x);
        let past_len = past.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        let start = past_len + position_shift(extras);
        let q = rope.apply(q, start);
        let mut k = rope.apply(k, start);
        let mut v = v;
        if let Some((past_k, past_v)) = past {
            k = Tensor::cat(vec![past_k, k], 2);
            v = Tensor::cat(vec![past_v, v], 2);
        }
        let (keys, values) = with_prefix(k.clone(), v.clone(), extras);
        let attended = grouped_attention(q.clone(), keys, values, bias);
        (self.output(attended, q, extras), k, v)
    }

    /// Attention over sequences packed into one row without padding: each sequence attends
    /// causally within itself, with positions from 0, as if it were alone in the batch.
    ///
    /// # Shapes
    /// - x, output: `[1, Σ len, hidden]`
    /// - biases: `[1, 1, len, prefix + len]` per sequence, in order
    pub fn forward_packed(&self, x: Tensor<3>, rope: &Rope, biases: &[Tensor<4>], extras: Option<&LayerExtras>) -> Tensor<3> {
        let (q, k, v) = self.project_heads(x);
        let start = position_shift(extras);
        let (mut queries, mut attended, mut offset) = (Vec::new(), Vec::new(), 0);
        for bias in biases {
            let len = bias.dims()[2];
            let segment = |t: &Tensor<4>| t.clone().narrow(2, offset, len);
            let q = rope.apply(segment(&q), start);
            let (keys, values) = with_prefix(rope.apply(segment(&k), start), segment(&v), extras);
            attended.push(grouped_attention(q.clone(), keys, values, bias.clone()));
            queries.push(q);
            offset += len;
        }
        self.output(Tensor::cat(attended, 2), Tensor::cat(queries, 2), extras)
    }

    /// q, k, v projections of `x` split into heads: b,s,h*d -> b,h,s,d.
    fn project_heads(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, s, _] = x.dims();
        let (q, k, v) = self.project(x);
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, self.head_dim]).swap_dims(1, 2);
        (heads(q, self.num_heads), heads(k, self.num_kv_heads), heads(v, self.num_kv_heads))
    }

    /// `o_proj` of the attended values, plus the gated adaption prompt's share read by the
    /// (RoPE'd) queries `q`.
    fn output(&self, attended: Tensor<4>, q: Tensor<4>, extras: Option<&LayerExtras>) -> Tensor<3> {
        let out = self.o_proj.forward(self.merge_heads(attended));
        match extras.and_then(|e| e.adaption.clone()) {
            Some((prompt, gate)) => out + self.o_proj.forward(self.merge_heads(self.adaption_attention(q, prompt, gate))),
            None => out,
        }
    }

    /// b,h,s,d -> b,s,h*d
    fn merge_heads(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, h, s, d] = x.dims();
        x.swap_dims(1, 2).reshape([b, s, h * d])
    }

    /// `gate · softmax(q kᵀ/√d) v` over the prompt's keys only (no mask, no RoPE on the prompt).
    ///
    /// # Shapes
    /// - q: `[batch, heads, seq, head_dim]`; prompt: `[1, len, hidden]`; gate: `[1]`
    /// - output: `[batch, heads, seq, head_dim]`
    fn adaption_attention(&self, q: Tensor<4>, prompt: Tensor<3>, gate: Tensor<1>) -> Tensor<4> {
        let [b, heads, s, d] = q.dims();
        let len = prompt.dims()[1];
        let kv = self.num_kv_heads;
        let dtype = q.dtype();
        let (_, k, v) = self.project(prompt.cast(dtype));
        // 1,len,kv*d -> 1,kv,len,d
        let k = k.reshape([1, len, kv, d]).swap_dims(1, 2);
        let v = v.reshape([1, len, kv, d]).swap_dims(1, 2);
        let q = q.reshape([b, kv, heads / kv * s, d]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((d as f64).powf(-0.5));
        let probs = softmax(scores.cast(DType::F32), 3).cast(dtype) * gate.cast(dtype).reshape([1, 1, 1, 1]);
        probs.matmul(v).reshape([b, heads, s, d])
    }
}

/// Where real tokens' positions start: after the prefix when it takes positions (PEFT).
fn position_shift(extras: Option<&LayerExtras>) -> usize {
    match extras {
        Some(LayerExtras { prefix: Some((prefix_k, _)), prefix_takes_positions: true, .. }) => prefix_k.dims()[2],
        _ => 0,
    }
}

/// Keys and values with the prefix's (if any) placed before them.
fn with_prefix(k: Tensor<4>, v: Tensor<4>, extras: Option<&LayerExtras>) -> (Tensor<4>, Tensor<4>) {
    match extras.and_then(|e| e.prefix.clone()) {
        Some((prefix_k, prefix_v)) => {
            let (k_dtype, v_dtype) = (k.dtype(), v.dtype());
            (Tensor::cat(vec![prefix_k.cast(k_dtype), k], 2), Tensor::cat(vec![prefix_v.cast(v_dtype), v], 2))
        }
        None => (k, v),
    }
}

#[derive(Module, Debug)]
pub struct SeparateGateUp<P> {
    pub gate_proj: P,
    pub up_proj: P,
}

#[derive(Module, Debug)]
pub enum GateUpProjection<P> {
    Separate(SeparateGateUp<P>),
    /// GLM `gate_up_proj` / ChatGLM `dense_h_to_4h`: rows `[gate | up]`.
    Fused(P),
}

/// SwiGLU: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<P> {
    pub gate_up: GateUpProjection<P>,
    pub down_proj: P,
}

impl<P: Projection> Mlp<P> {
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
pub struct DecoderLayer<P> {
    pub input_norm: RmsNorm,
    pub attention: Attention<P>,
    pub post_attention_norm: RmsNorm,
    pub mlp: Mlp<P>,
}

impl<P: Projection> DecoderLayer<P> {
    /// One pre-norm block: `x + attend(attention, norm(x))`, then `+ mlp(norm(·))`.
    ///
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, attend: impl FnOnce(&Attention<P>, Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let x = x.clone() + attend(&self.attention, self.input_norm.forward(x));
        x.clone() + self.mlp.forward(self.post_attention_norm.forward(x))
    }
}

impl<P> DecoderLayer<P> {
    /// q, k, v (or fused qkv), o, gate, up (or fused gate_up), down.
    pub fn projections(&self) -> Vec<&P> {
        let mut out = match &self.attention.qkv {
            QkvProjection::Separate(p) => vec![&p.q_proj, &p.k_proj, &p.v_proj],
            QkvProjection::Fused(p) => vec![p],
        };
        out.push(&self.attention.o_proj);
        match &self.mlp.gate_up {
            GateUpProjection::Separate(p) => out.extend([&p.gate_proj, &p.up_proj]),
            GateUpProjection::Fused(p) => out.push(p),
        }
        out.push(&self.mlp.down_proj);
        out
    }
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

/// The tokens of a training batch: right-padded rows, or the same sequences packed into one
/// row without their padding (no compute spent on padding; the same values at every real token).
#[derive(Debug, Clone)]
pub enum TokenBatch {
    /// `input_ids` of `shape` `[batch, seq]`, `attention_mask` 1 on real tokens.
    Padded { shape: [usize; 2], input_ids: Vec<i64>, attention_mask: Vec<i64> },
    /// Sequences of `lengths` concatenated: `input_ids` has `Σ lengths` tokens.
    Packed { lengths: Vec<usize>, input_ids: Vec<i64> },
}

impl TokenBatch {
    /// `[batch, seq]`, or `[1, Σ len]` when packed.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            TokenBatch::Padded { shape, .. } => *shape,
            TokenBatch::Packed { lengths, .. } => [1, lengths.iter().sum()],
        }
    }

    pub fn input_ids(&self, device: &Device) -> Tensor<2, Int> {
        let ids = match self {
            TokenBatch::Padded { input_ids, .. } | TokenBatch::Packed { input_ids, .. } => input_ids.clone(),
        };
        Tensor::from_data(TensorData::new(ids, self.shape()), device)
    }
}

/// What each query of a [`TokenBatch`] may attend to, built once per batch by
/// [`CausalLm::layout`] and shared by every layer.
#[derive(Debug, Clone)]
pub enum Layout {
    /// The additive bias `[batch, 1, seq, prefix + seq]` of padded rows.
    Padded(Tensor<4>),
    /// Per packed sequence, its causal bias `[1, 1, len, prefix + len]`.
    Packed(Vec<Tensor<4>>),
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

/// A decoder-only language model with a frozen base. `P` is the type of its projections:
/// [`Linear`] for the plain base, an adapter's layer after [`CausalLm::map_projections`].
#[derive(Module, Debug)]
pub struct CausalLm<P> {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer<P>>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub rope: Rope,
}

/// The base model as loaded from a checkpoint.
pub type BaseModel = CausalLm<Linear>;

impl CausalLm<Linear> {
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
        Self::from_tensors(
            config,
            |key, [out, inp]| checkpoint.float(key, [out, inp], dtype, device),
            |key, len| checkpoint.float(key, [len], dtype, device),
        )
    }

    /// A model of `config`'s shape with random weights (N(0, 0.02²), norms 1) in `dtype`, for
    /// benchmarks of checkpoints one does not have (e.g. LLaMA-7B-shaped). Seeded.
    pub fn synthetic(config: ModelConfig, dtype: DType, seed: u64, device: &Device) -> Self {
        let seeded = |key: &str| {
            let hash = key.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            device.seed(hash);
        };
        let model = Self::from_tensors(
            config,
            |key, shape| {
                seeded(key);
                Ok(Tensor::<2>::random(shape, burn::tensor::Distribution::Normal(0.0, 0.02), device).cast(dtype))
            },
            |key, len| {
                Ok(if key.ends_with("bias") { Tensor::<1>::zeros([len], device) } else { Tensor::<1>::ones([len], device) }.cast(dtype))
            },
        );
        model.expect("synthetic tensors have the expected shapes")
    }

    /// Builds the model from `matrix(key, [out, in])` and `vector(key, len)` (HF keys).
    fn from_tensors(
        config: ModelConfig,
        matrix: impl Fn(&str, [usize; 2]) -> Result<Tensor<2>, LoadError>,
        vector: impl Fn(&str, usize) -> Result<Tensor<1>, LoadError>,
    ) -> Result<Self, LoadError> {
        let keys = KeyLayout::of(config.architecture);
        let (h, q_dim, kv_dim) = (config.hidden_size, config.q_dim(), config.kv_dim());
        let ffn = config.intermediate_size;
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, LoadError> {
            let weight = matrix(&format!("{name}.weight"), [out, inp])?;
            let bias = if bias { Some(vector(&format!("{name}.bias"), out)?) } else { None };
            Ok(Linear::new(weight, bias))
        };
        let norm = |name: &str| -> Result<RmsNorm, LoadError> { Ok(RmsNorm::new(vector(&format!("{name}.weight"), h)?, config.rms_norm_eps)) };

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
        let embed_tokens = Embedding::new(matrix(&format!("{}.weight", keys.embed), [config.vocab_size, h])?);
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

}

impl<P: Projection> CausalLm<P> {
    /// Replaces every projection through `f(hf_module_name, projection)`, e.g.
    /// `("model.layers.0.self_attn.q_proj", linear)`. The LM head is not a projection.
    pub fn map_projections<Q: Projection>(self, mut f: impl FnMut(&str, P) -> Q) -> CausalLm<Q> {
        let keys = KeyLayout::of(self.config.architecture);
        let layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let attn = format!("{}.{}", keys.layer(i), keys.attention);
                let mlp = format!("{}.{}", keys.layer(i), keys.mlp);
                let qkv = match (layer.attention.qkv, keys.qkv) {
                    (QkvProjection::Separate(p), QkvKeys::Separate { q, k, v }) => QkvProjection::Separate(SeparateQkv {
                        q_proj: f(&format!("{attn}.{q}"), p.q_proj),
                        k_proj: f(&format!("{attn}.{k}"), p.k_proj),
                        v_proj: f(&format!("{attn}.{v}"), p.v_proj),
                    }),
                    (QkvProjection::Fused(p), QkvKeys::Fused(name)) => QkvProjection::Fused(f(&format!("{attn}.{name}"), p)),
                    _ => unreachable!("projections are built from the same key layout"),
                };
                let o_proj = f(&format!("{attn}.{}", keys.o_proj), layer.attention.o_proj);
                let gate_up = match (layer.mlp.gate_up, keys.gate_up) {
                    (GateUpProjection::Separate(p), GateUpKeys::Separate { gate, up }) => {
                        GateUpProjection::Separate(SeparateGateUp {
                            gate_proj: f(&format!("{mlp}.{gate}"), p.gate_proj),
                            up_proj: f(&format!("{mlp}.{up}"), p.up_proj),
                        })
                    }
                    (GateUpProjection::Fused(p), GateUpKeys::Fused(name)) => GateUpProjection::Fused(f(&format!("{mlp}.{name}"), p)),
                    _ => unreachable!("projections are built from the same key layout"),
                };
                let down_proj = f(&format!("{mlp}.{}", keys.down), layer.mlp.down_proj);
                DecoderLayer {
                    input_norm: layer.input_norm,
                    attention: Attention {
                        qkv,
                        o_proj,
                        num_heads: layer.attention.num_heads,
                        num_kv_heads: layer.attention.num_kv_heads,
                        head_dim: layer.attention.head_dim,
                    },
                    post_attention_norm: layer.post_attention_norm,
                    mlp: Mlp { gate_up, down_proj },
                }
            })
            .collect();
        CausalLm {
            embed_tokens: self.embed_tokens,
            layers,
            norm: self.norm,
            lm_head: self.lm_head,
            config: self.config,
            rope: self.rope,
        }
    }

    /// Every projection with its HF module name.
    pub fn projections(&self) -> Vec<(String, &P)> {
        let keys = KeyLayout::of(self.config.architecture);
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| keys.projection_names(i).into_iter().zip(layer.projections()))
            .collect()
    }

    /// Logits for a right-padded batch, all positions.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    /// - attention_mask: `[batch, seq]`, 1 for real tokens
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> Tensor<3> {
        self.forward_with(input_ids, attention_mask, &[])
    }

    /// [`forward`](Self::forward) with an adapter's per-layer extras (empty: none).
    pub fn forward_with(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>, extras: &[LayerExtras]) -> Tensor<3> {
        let hidden = self.hidden_states(input_ids, attention_mask.as_ref(), None, extras);
        self.logits(hidden)
    }

    /// Logits of the new tokens, reading and extending `cache` (generation; no padding).
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]`
    /// - output: `[batch, new, vocab]`
    pub fn forward_cached(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        self.forward_cached_with(input_ids, cache, &[])
    }

    /// [`forward_cached`](Self::forward_cached) with an adapter's per-layer extras.
    pub fn forward_cached_with(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache, extras: &[LayerExtras]) -> Tensor<3> {
        let hidden = self.hidden_states(input_ids, None, Some(cache), extras);
        self.logits(hidden)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`. `extras` is empty or one per layer.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        extras: &[LayerExtras],
    ) -> Tensor<3> {
        self.hidden_states_from(self.embed(input_ids), attention_mask, cache, extras)
    }

    /// [`hidden_states`](Self::hidden_states) from the input embeddings `[batch, seq, hidden]`
    /// (an adapter may have replaced some of them, as prompt tuning does).
    pub fn hidden_states_from(
        &self,
        embeddings: Tensor<3>,
        attention_mask: Option<&Tensor<2, Int>>,
        mut cache: Option<&mut KvCache>,
        extras: &[LayerExtras],
    ) -> Tensor<3> {
        let [b, s, _] = embeddings.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let prefix = extras.iter().find_map(|e| e.prefix.as_ref()).map_or(0, |(k, _)| k.dims()[2]);
        let bias = self.attention_bias([b, s], past, prefix, attention_mask, &embeddings.device());
        let mut x = embeddings;
        for (i, layer) in self.layers.iter().enumerate() {
            let past_kv = cache.as_ref().and_then(|c| c.layers.get(i).cloned());
            let mut new_kv = None;
            x = layer.forward(x, |attention, h| {
                let (out, k, v) = attention.forward(h, &self.rope, past_kv, bias.clone(), extras.get(i));
                new_kv = Some((k, v));
                out
            });
            if let (Some(cache), Some(kv)) = (cache.as_mut(), new_kv) {
                if i < cache.layers.len() {
                    cache.layers[i] = kv;
                } else {
                    cache.layers.push(kv);
                }
            }
        }
        self.final_norm(x)
    }

    /// Token embeddings: `[batch, seq] -> [batch, seq, hidden]`, the input of layer 0.
    pub fn embed(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.embed_tokens.forward(input_ids)
    }

    /// Additive attention bias `[batch, 1, seq, prefix + past + seq]`: causal, padded keys
    /// masked, and `prefix` keys (prefix tuning) visible to every query, as PEFT extends the mask.
    pub fn attention_bias(
        &self,
        [batch, seq]: [usize; 2],
        past: usize,
        prefix: usize,
        attention_mask: Option<&Tensor<2, Int>>,
        device: &Device,
    ) -> Tensor<4> {
        let bias = attention_bias(batch, seq, past, attention_mask, device);
        if prefix == 0 {
            return bias;
        }
        Tensor::cat(vec![Tensor::zeros([batch, 1, seq, prefix], device), bias], 3)
    }

    /// The layout of a training batch: what each query of it may attend to.
    pub fn layout(&self, batch: &TokenBatch, prefix: usize, device: &Device) -> Layout {
        match batch {
            TokenBatch::Padded { shape, attention_mask, .. } => {
                let mask = Tensor::<2, Int>::from_data(TensorData::new(attention_mask.clone(), *shape), device);
                Layout::Padded(self.attention_bias(*shape, 0, prefix, Some(&mask), device))
            }
            TokenBatch::Packed { lengths, .. } => {
                Layout::Packed(lengths.iter().map(|&len| self.attention_bias([1, len], 0, prefix, None, device)).collect())
            }
        }
    }

    /// Decoder layer `i` without a cache (training).
    ///
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]` (padded) or `[1, Σ len, hidden]` (packed)
    pub fn layer_forward(&self, i: usize, x: Tensor<3>, layout: &Layout, extras: Option<&LayerExtras>) -> Tensor<3> {
        self.layers[i].forward(x, |attention, h| match layout {
            Layout::Padded(bias) => attention.forward(h, &self.rope, None, bias.clone(), extras).0,
            Layout::Packed(biases) => attention.forward_packed(h, &self.rope, biases, extras),
        })
    }

    /// The final RMSNorm, applied to the last layer's output.
    pub fn final_norm(&self, x: Tensor<3>) -> Tensor<3> {
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
