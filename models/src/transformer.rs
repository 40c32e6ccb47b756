//! The decoder shared by LLaMA, GLM and ChatGLM: pre-norm blocks of grouped-query attention with
//! RoPE and a gated MLP (SwiGLU; GeGLU where a config names GELU). Families differ only in their projection tables
//! ([`crate::family::KeyLayout`]) and RoPE pairing, all decided by [`ModelConfig`].

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::attention::{Attention, LayerExtras, QkNorm, QkvProjection, SeparateQkv};
use crate::batch::{KvCache, Layout, Masks, TokenBatch};
use crate::checkpoint::{Checkpoint, LoadDtype};
use crate::config::{MlpActivation, ModelConfig};
use crate::family::{KeyLayout, Role, check_checkpoint};
use crate::layers::{stored_product, Embedding, Linear, Projection, RmsNorm, Rope, Weight, attention_bias, output_surrogate};
use crate::ggml::GgmlWeight;
use crate::gguf::{GgmlType, GgufFile, HfTensor};
use crate::nf4::Quantization;
use crate::LoadError;

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

/// SwiGLU: `down(silu(gate(x)) · up(x))`, or GeGLU with GELU in SiLU's place.
#[derive(Module, Debug)]
pub struct Mlp<P> {
    pub gate_up: GateUpProjection<P>,
    pub down_proj: P,
    #[module(skip)]
    pub activation: MlpActivation,
}

impl<P: Projection> Mlp<P> {
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(self.activations(x))
    }

    /// [`Projection::surrogate`] of [`Self::forward`]: `down_proj`'s backward without its forward.
    pub fn surrogate(&self, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        self.down_proj.surrogate(self.activations(x), grad)
    }

    /// `act(gate(x)) · up(x)`, the input of `down_proj`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, intermediate]`
    fn activations(&self, x: Tensor<3>) -> Tensor<3> {
        let (gate, up) = match &self.gate_up {
            GateUpProjection::Separate(p) => (p.gate_proj.forward(x.clone()), p.up_proj.forward(x)),
            GateUpProjection::Fused(p) => {
                let gu = p.forward(x);
                let half = gu.dims()[2] / 2;
                (gu.clone().narrow(2, 0, half), gu.narrow(2, half, half))
            }
        };
        match self.activation {
            MlpActivation::Silu => crate::fused::swiglu(&gate, &up).unwrap_or_else(|| silu(gate) * up),
            // Rare enough to run composed; the GELU of a bf16 gate in f32, as PyTorch's kernel.
            MlpActivation::Gelu => {
                let dtype = gate.dtype();
                gelu(gate.cast(DType::F32)).cast(dtype) * up
            }
            MlpActivation::GeluTanh => {
                let dtype = gate.dtype();
                gelu_approximate(gate.cast(DType::F32)).cast(dtype) * up
            }
        }
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<P> {
    pub input_norm: RmsNorm,
    pub attention: Attention<P>,
    pub post_attention_norm: RmsNorm,
    pub mlp: Mlp<P>,
    /// GLM-4-0414's norms of the attention's and the MLP's output, before each residual add.
    pub output_norms: Option<OutputNorms>,
}

/// GLM-4-0414's `post_self_attn_layernorm` and `post_mlp_layernorm`.
#[derive(Module, Debug)]
pub struct OutputNorms {
    pub attention: RmsNorm,
    pub mlp: RmsNorm,
}

impl<P: Projection> DecoderLayer<P> {
    /// One pre-norm block: `x + attend(attention, norm(x))`, then `+ mlp(norm(·))`.
    ///
    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, attend: impl FnOnce(&Attention<P>, Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let out = attend(&self.attention, self.input_norm.forward(x.clone()));
        self.mlp_block(self.add_attention(x, out))
    }

    /// The attention half: `x + o_proj(contexts(attention, norm(x)))`, the post-attention
    /// residual; `contexts` runs the attention up to `o_proj` ([`Attention::contexts`]). With
    /// `rows`, o_proj and the residual run at those rows of the flattened positions alone
    /// ([`Rows`]).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: as x, or `[1, rows, hidden]`
    pub fn attention_block(
        &self,
        x: Tensor<3>,
        rows: Option<&Rows>,
        contexts: impl FnOnce(&Attention<P>, Tensor<3>) -> Vec<Tensor<3>>,
    ) -> Tensor<3> {
        let contexts = at_rows(contexts(&self.attention, self.input_norm.forward(x.clone())), rows);
        let x = match rows {
            Some(rows) => rows.select(x),
            None => x,
        };
        let out = self.attention.output(contexts);
        self.add_attention(x, out)
    }

    /// `x + out`, through GLM-4-0414's norm of the attention's output.
    fn add_attention(&self, x: Tensor<3>, out: Tensor<3>) -> Tensor<3> {
        x + match &self.output_norms {
            Some(norms) => norms.attention.forward(out),
            None => out,
        }
    }

    /// The MLP half: `h + mlp(norm(h))` of the post-attention residual `h`.
    pub fn mlp_block(&self, h: Tensor<3>) -> Tensor<3> {
        let out = self.mlp.forward(self.post_attention_norm.forward(h.clone()));
        h + match &self.output_norms {
            Some(norms) => norms.mlp.forward(out),
            None => out,
        }
    }

    /// A scalar with the gradients of `sum(attention_block(x, rows) · grad)` less its residual
    /// term `sum(x · grad)`, which the caller adds as `grad` itself (at `rows`:
    /// [`Rows::scatter`]).
    pub fn attention_surrogate(
        &self,
        x: Tensor<3>,
        rows: Option<&Rows>,
        contexts: impl FnOnce(&Attention<P>, Tensor<3>) -> Vec<Tensor<3>>,
        grad: &Tensor<3>,
    ) -> Tensor<1> {
        let contexts = at_rows(contexts(&self.attention, self.input_norm.forward(x)), rows);
        match &self.output_norms {
            // A norm after o_proj needs its product.
            Some(norms) => output_surrogate(norms.attention.forward(self.attention.output(contexts)), grad),
            None => self.attention.output_surrogate(contexts, grad),
        }
    }

    /// [`Self::attention_surrogate`] for the MLP half.
    pub fn mlp_surrogate(&self, h: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        let x = self.post_attention_norm.forward(h);
        match &self.output_norms {
            Some(norms) => output_surrogate(norms.mlp.forward(self.mlp.forward(x)), grad),
            None => self.mlp.surrogate(x, grad),
        }
    }
}

/// Rows of a layer's flattened `[batch · seq]` positions: those whose output a loss reads.
/// The last layer computes its o_proj, residual and MLP at these alone, since nothing reads its
/// other positions; keys and values still come from every position.
pub struct Rows {
    indices: Tensor<1, Int>,
}

impl Rows {
    pub fn new(rows: &[i64], device: &Device) -> Self {
        Self { indices: Tensor::from_data(TensorData::new(rows.to_vec(), [rows.len()]), device) }
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[1, rows, hidden]`
    pub fn select(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, width] = x.dims();
        let n = self.indices.dims()[0];
        // b,s,h -> b·s,h -> n,h -> 1,n,h
        x.reshape([batch * seq, width]).select(0, self.indices.clone()).reshape([1, n, width])
    }

    /// The inverse of [`Self::select`], zero at the other positions: `[1, rows, hidden]` ->
    /// `[batch, seq, hidden]`.
    pub fn scatter(&self, x: Tensor<3>, [batch, seq]: [usize; 2]) -> Tensor<3> {
        let [_, n, width] = x.dims();
        let zeros = Tensor::<2>::zeros([batch * seq, width], (&x.device(), x.dtype()));
        zeros.select_assign(0, self.indices.clone(), x.reshape([n, width]), IndexingUpdateOp::Add).reshape([batch, seq, width])
    }
}

/// `[batch, seq, hidden] -> [batch, 1, hidden]`: the last position's hidden states.
pub fn last_position(hidden: Tensor<3>) -> Tensor<3> {
    let seq = hidden.dims()[1];
    hidden.narrow(1, seq - 1, 1)
}

/// The attention's contexts at `rows`, or whole.
fn at_rows(contexts: Vec<Tensor<3>>, rows: Option<&Rows>) -> Vec<Tensor<3>> {
    match rows {
        Some(rows) => contexts.into_iter().map(|c| rows.select(c)).collect(),
        None => contexts,
    }
}

impl<P> DecoderLayer<P> {
    /// q, k, v (or fused qkv), o, gate, up (or fused gate_up), down: the order of the family's
    /// table ([`KeyLayout::roles`]).
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

    /// The same layer with each projection replaced by `f(projection)`, in [`Self::projections`] order.
    fn map<Q>(self, mut f: impl FnMut(P) -> Q) -> DecoderLayer<Q> {
        let qkv = match self.attention.qkv {
            QkvProjection::Separate(p) => QkvProjection::Separate(SeparateQkv { q_proj: f(p.q_proj), k_proj: f(p.k_proj), v_proj: f(p.v_proj) }),
            QkvProjection::Fused(p) => QkvProjection::Fused(f(p)),
        };
        let o_proj = f(self.attention.o_proj);
        let gate_up = match self.mlp.gate_up {
            GateUpProjection::Separate(p) => GateUpProjection::Separate(SeparateGateUp { gate_proj: f(p.gate_proj), up_proj: f(p.up_proj) }),
            GateUpProjection::Fused(p) => GateUpProjection::Fused(f(p)),
        };
        let down_proj = f(self.mlp.down_proj);
        let (num_heads, num_kv_heads, head_dim) = (self.attention.num_heads, self.attention.num_kv_heads, self.attention.head_dim);
        DecoderLayer {
            input_norm: self.input_norm,
            attention: Attention { qkv, o_proj, num_heads, num_kv_heads, head_dim, qk_norm: self.attention.qk_norm },
            post_attention_norm: self.post_attention_norm,
            mlp: Mlp { gate_up, down_proj, activation: self.mlp.activation },
            output_norms: self.output_norms,
        }
    }

    /// A layer from its norms and its projections by role, as a family's table lists them.
    fn from_table(config: &ModelConfig, norms: LayerNorms, projections: Vec<(Role, P)>) -> Self {
        let LayerNorms { input_norm, post_attention_norm, qk_norm, output_norms } = norms;
        let mut by_role: Vec<(Role, Option<P>)> = projections.into_iter().map(|(r, p)| (r, Some(p))).collect();
        let mut take = |role: Role| by_role.iter_mut().find(|(r, _)| *r == role).and_then(|(_, p)| p.take());
        let qkv = match take(Role::Qkv) {
            Some(p) => QkvProjection::Fused(p),
            None => QkvProjection::Separate(SeparateQkv {
                q_proj: take(Role::Q).expect("a table has q, k and v or a fused qkv"),
                k_proj: take(Role::K).expect("a table has q, k and v or a fused qkv"),
                v_proj: take(Role::V).expect("a table has q, k and v or a fused qkv"),
            }),
        };
        let gate_up = match take(Role::GateUp) {
            Some(p) => GateUpProjection::Fused(p),
            None => GateUpProjection::Separate(SeparateGateUp {
                gate_proj: take(Role::Gate).expect("a table has gate and up or a fused gate_up"),
                up_proj: take(Role::Up).expect("a table has gate and up or a fused gate_up"),
            }),
        };
        let attention = Attention {
            qkv,
            o_proj: take(Role::O).expect("a table has o"),
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            qk_norm,
        };
        let mlp = Mlp { gate_up, down_proj: take(Role::Down).expect("a table has down"), activation: config.hidden_act };
        DecoderLayer { input_norm, attention, post_attention_norm, mlp, output_norms }
    }
}

/// A layer's norms as the checkpoint holds them.
struct LayerNorms {
    input_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    qk_norm: Option<QkNorm>,
    output_norms: Option<OutputNorms>,
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
    /// The folder the weights came from, as transformers' `name_or_path` (its tokenizer is
    /// there); `None` for synthetic weights.
    #[module(skip)]
    pub name_or_path: Option<std::path::PathBuf>,
}

/// The base model as loaded from a checkpoint.
pub type BaseModel = CausalLm<Linear>;

impl CausalLm<Linear> {
    /// Loads an HF model folder (config.json + safetensors). Every parameter is frozen.
    pub fn load(dir: &Path, dtype: LoadDtype, device: &Device) -> Result<Self, LoadError> {
        Self::load_quantized(dir, dtype, None, device)
    }

    /// [`Self::load`], with the decoder projections quantized tensor by tensor as they load: the
    /// full-precision model never exists in memory.
    pub fn load_quantized(dir: &Path, dtype: LoadDtype, quantization: Option<Quantization>, device: &Device) -> Result<Self, LoadError> {
        Self::load_prepared(dir, dtype, quantization, device, &mut |_, weight| weight)
    }

    /// [`Self::load_quantized`] with `prepare(module, weight)` applied to each decoder
    /// projection's full-precision weight as it loads, before it is stored (a LoRA start taken
    /// out of it, then quantized: QPiSSA). Projections a GGUF file keeps in blocks skip it.
    pub fn load_prepared(
        dir: &Path,
        dtype: LoadDtype,
        quantization: Option<Quantization>,
        device: &Device,
        prepare: &mut dyn FnMut(&str, Tensor<2>) -> Tensor<2>,
    ) -> Result<Self, LoadError> {
        if GgufFile::is_gguf(dir) {
            return Self::from_gguf(dir, dtype, quantization, device, prepare);
        }
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open_dir(dir)?;
        Ok(Self { name_or_path: Some(dir.to_path_buf()), ..Self::from_checkpoint(config, &checkpoint, dtype, quantization, device, prepare)? })
    }

    fn from_checkpoint(
        config: ModelConfig,
        checkpoint: &Checkpoint,
        dtype: LoadDtype,
        quantization: Option<Quantization>,
        device: &Device,
        prepare: &mut dyn FnMut(&str, Tensor<2>) -> Tensor<2>,
    ) -> Result<Self, LoadError> {
        // Every name and shape is checked from the headers before any weight is read.
        check_checkpoint(&config, checkpoint)?;
        Self::from_tensors(
            config,
            quantization,
            |key, [out, inp]| checkpoint.float(key, [out, inp], dtype, device),
            |key, len| checkpoint.float(key, [len], dtype, device),
            |_, _| Ok(None),
            prepare,
        )
    }

    /// A LLaMA-architecture GGUF file as the frozen base: its quantized projections stay
    /// in their blocks ([`GgmlWeight`]); other tensors (and quantized embeddings or heads, which
    /// transformers keeps in full precision too) are read as floats in `dtype`.
    fn from_gguf(
        path: &Path,
        dtype: LoadDtype,
        quantization: Option<Quantization>,
        device: &Device,
        prepare: &mut dyn FnMut(&str, Tensor<2>) -> Tensor<2>,
    ) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_json(&file.config_json()?, path)?;
        // Every name and shape is checked from the header before any weight is read.
        let named = file.checked_tensors(&config)?;
        let find = |key: &str| -> Result<&HfTensor, LoadError> {
            named.iter().find(|hf| hf.name == key).ok_or_else(|| LoadError::MissingTensor { path: path.into(), key: key.into() })
        };
        let float = |key: &str, shape: &[usize]| -> Result<Tensor<1>, LoadError> {
            let hf = find(key)?;
            let values = file.hf_values(hf);
            file.release(hf.tensor);
            let tensor = Tensor::<1>::from_data(TensorData::new(values, [shape.iter().product::<usize>()]), device);
            Ok(match (dtype, hf.tensor.ggml_type) {
                (LoadDtype::F32, _) => tensor,
                (LoadDtype::Bf16, _) | (LoadDtype::Checkpoint, GgmlType::BF16) => tensor.cast(DType::BF16),
                (LoadDtype::Checkpoint, GgmlType::F16) => tensor.cast(DType::F16),
                (LoadDtype::Checkpoint, _) => tensor,
            })
        };
        let model = Self::from_tensors(
            config,
            quantization,
            |key, shape| Ok(float(key, &shape)?.reshape(shape)),
            |key, len| float(key, &[len]),
            |key, _| {
                let hf = find(key)?;
                let weight = GgmlWeight::reads(hf.tensor.ggml_type).then(|| GgmlWeight::from_gguf(&file, hf, device)).transpose()?;
                if weight.is_some() {
                    file.release(hf.tensor);
                }
                Ok(weight.map(Weight::Ggml))
            },
            prepare,
        )?;
        Ok(Self { name_or_path: Some(path.to_path_buf()), ..model })
    }

    /// A model of `config`'s shape with random weights (N(0, 0.02²), norms 1) in `dtype`, for
    /// benchmarks of checkpoints one does not have (e.g. LLaMA-7B-shaped). Seeded: the same
    /// values on every device and thread count.
    pub fn synthetic(config: ModelConfig, dtype: DType, quantization: Option<Quantization>, seed: u64, device: &Device) -> Self {
        let model = Self::from_tensors(
            config,
            quantization,
            |key, [out, inp]| {
                let key_seed = key.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                let bytes = random_normal_bytes(out * inp, 0.02, dtype, key_seed);
                Ok(Tensor::from_data(TensorData::from_bytes_vec(bytes, [out, inp], dtype), (device, dtype)))
            },
            |key, len| {
                Ok(if key.ends_with("bias") { Tensor::<1>::zeros([len], device) } else { Tensor::<1>::ones([len], device) }.cast(dtype))
            },
            |_, _| Ok(None),
            &mut |_, weight| weight,
        );
        model.expect("synthetic tensors have the expected shapes")
    }

    /// Builds the model from `matrix(key, [out, in])` and `vector(key, len)` (HF keys), each
    /// decoder projection quantized as soon as it is read when `quantization` says so, or taken
    /// as `stored(key, [out, in])` gives it when the source keeps it quantized already.
    fn from_tensors(
        config: ModelConfig,
        quantization: Option<Quantization>,
        matrix: impl Fn(&str, [usize; 2]) -> Result<Tensor<2>, LoadError>,
        vector: impl Fn(&str, usize) -> Result<Tensor<1>, LoadError>,
        stored: impl Fn(&str, [usize; 2]) -> Result<Option<Weight>, LoadError>,
        prepare: &mut dyn FnMut(&str, Tensor<2>) -> Tensor<2>,
    ) -> Result<Self, LoadError> {
        let keys = KeyLayout::of(config.architecture);
        let h = config.hidden_size;
        let mut linear = |name: &str, [out, inp]: [usize; 2], bias: bool, quantize: Option<Quantization>| -> Result<Linear, LoadError> {
            let bias = if bias { Some(vector(&format!("{name}.bias"), out)?) } else { None };
            if let Some(weight) = stored(&format!("{name}.weight"), [out, inp])? {
                if quantize.is_some() {
                    return Err(LoadError::ConfigKey {
                        path: name.into(),
                        key: "quantize".into(),
                        reason: "this base's projections are quantized already (GGUF blocks are trained as they are): remove model.quantize".into(),
                    });
                }
                return Ok(Linear::with_weight(weight, bias));
            }
            if let Some(reason) = quantize.and_then(|q| q.unfit([out, inp])) {
                return Err(LoadError::ConfigKey { path: name.into(), key: "quantize".into(), reason });
            }
            let weight = prepare(name, matrix(&format!("{name}.weight"), [out, inp])?);
            let weight = match quantize {
                Some(q) => q.store(weight),
                None => Weight::Dense(Param::from_tensor(weight).set_require_grad(false)),
            };
            Ok(Linear::with_weight(weight, bias))
        };
        let norm_of = |name: &str, len: usize| -> Result<RmsNorm, LoadError> { Ok(RmsNorm::new(vector(&format!("{name}.weight"), len)?, config.rms_norm_eps)) };
        let norm = |name: &str| norm_of(name, h);

        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let layer = keys.layer(i);
            let projections = keys
                .projections(&config, i)
                .into_iter()
                .map(|p| Ok((p.role, linear(&p.name, p.shape, p.bias, quantization)?)))
                .collect::<Result<Vec<_>, LoadError>>()?;
            let input_norm = norm(&format!("{layer}.{}", keys.input_norm))?;
            let post_attention_norm = norm(&format!("{layer}.{}", keys.post_attention_norm))?;
            let [q_norm, k_norm] = keys.qk_norms(i);
            let qk_norm = match config.qk_norm {
                true => Some(QkNorm { q_norm: norm_of(&q_norm, config.head_dim)?, k_norm: norm_of(&k_norm, config.head_dim)? }),
                false => None,
            };
            let [attention, mlp] = keys.output_norms(i);
            let output_norms = match config.output_norms {
                true => Some(OutputNorms { attention: norm(&attention)?, mlp: norm(&mlp)? }),
                false => None,
            };
            let norms = LayerNorms { input_norm, post_attention_norm, qk_norm, output_norms };
            layers.push(DecoderLayer::from_table(&config, norms, projections));
        }
        let embed_tokens = Embedding::new(matrix(&format!("{}.weight", keys.embed), [config.vocab_size, h])?);
        // The head stays in full precision, as transformers keeps it.
        let lm_head = if config.tie_word_embeddings { None } else { Some(Linear::new(matrix(&format!("{}.weight", keys.lm_head), [config.vocab_size, h])?, None)) };
        Ok(Self {
            embed_tokens,
            layers,
            norm: norm(keys.final_norm)?,
            lm_head,
            rope: Rope::new(config.rope.clone()),
            config,
            name_or_path: None,
        })
    }

}

/// The embedding and the LM head, the modules a vocabulary lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabModule {
    Embedding,
    LmHead,
}

impl VocabModule {
    /// The module's HF name in `config`'s architecture (`model.embed_tokens`, `lm_head`…).
    pub fn hf_name(self, config: &ModelConfig) -> &'static str {
        let keys = KeyLayout::of(config.architecture);
        match self {
            VocabModule::Embedding => keys.embed,
            VocabModule::LmHead => keys.lm_head,
        }
    }

    /// The module PEFT's `modules_to_save` entry `name` means: the module's HF name or its last
    /// parts (`embed_tokens`, `lm_head`).
    pub fn named(name: &str, config: &ModelConfig) -> Option<Self> {
        [VocabModule::Embedding, VocabModule::LmHead].into_iter().find(|m| {
            let full = m.hf_name(config);
            full == name || full.ends_with(&format!(".{name}"))
        })
    }
}

/// `rows` rows equal to the mean of `weight`'s rows, in its dtype.
fn mean_rows(weight: &Tensor<2>, rows: usize) -> Tensor<2> {
    let [_, width] = weight.dims();
    weight.clone().cast(DType::F32).mean_dim(0).expand([rows, width]).cast(weight.dtype())
}

impl<P> CausalLm<P> {
    /// Grows the vocabulary to `vocab` ids: the embedding and the LM head get rows equal to
    /// the mean of their old rows (transformers' `resize_token_embeddings(mean_resizing=True)`
    /// draws them from N(mean, 1e-9·covariance): within about 1e-4 of the mean, which ember
    /// takes exactly). A smaller `vocab` is an error naming both sizes.
    pub fn resize_vocab(mut self, vocab: usize) -> Result<Self, String> {
        let old = self.config.vocab_size;
        if vocab < old {
            return Err(format!("cannot shrink the vocabulary from {old} to {vocab} ids"));
        }
        if vocab == old {
            return Ok(self);
        }
        let grow = |weight: Tensor<2>| Tensor::cat(vec![weight.clone(), mean_rows(&weight, vocab - old)], 0);
        self.embed_tokens = Embedding::new(grow(self.embed_tokens.weight.val()));
        if let Some(head) = &self.lm_head {
            self.lm_head = Some(Linear::new(grow(head.dense_weight()), None));
        }
        self.config.vocab_size = vocab;
        Ok(self)
    }

    /// Replaces `module`'s weight with `weight` (`[vocab, hidden]`) as a trainable f32
    /// parameter: PEFT's `modules_to_save`, a module trained in full. The vocabulary grows to
    /// the weight's rows first if it has more.
    pub fn train_whole(self, module: VocabModule, weight: Tensor<2>) -> Result<Self, String> {
        self.with_vocab_weight(module, Param::from_tensor(weight.cast(DType::F32)).set_require_grad(true))
    }

    /// Replaces `module`'s frozen weight with `weight` (`[vocab, hidden]`), as PEFT loads the
    /// `base_layer` weights it saves beside a LoRA on the embedding or LM head. The vocabulary
    /// grows to the weight's rows first if it has more.
    pub fn replace_vocab_weight(self, module: VocabModule, weight: Tensor<2>) -> Result<Self, String> {
        self.with_vocab_weight(module, Param::from_tensor(weight).set_require_grad(false))
    }

    fn with_vocab_weight(mut self, module: VocabModule, weight: Param<Tensor<2>>) -> Result<Self, String> {
        let [rows, width] = weight.shape().dims::<2>();
        if width != self.config.hidden_size {
            return Err(format!("{}: {width} columns, the model's hidden size is {}", module.hf_name(&self.config), self.config.hidden_size));
        }
        self = self.resize_vocab(rows)?;
        if rows != self.config.vocab_size {
            return Err(format!("{}: {rows} rows, the model's vocabulary has {} ids", module.hf_name(&self.config), self.config.vocab_size));
        }
        match module {
            VocabModule::Embedding => self.embed_tokens = Embedding { weight },
            VocabModule::LmHead if self.lm_head.is_none() => {
                return Err("lm_head is tied to the embedding in this model: train embed_tokens alone".into());
            }
            VocabModule::LmHead => self.lm_head = Some(Linear::with_weight(Weight::Dense(weight), None)),
        }
        Ok(self)
    }

    /// `module`'s current weight (`[vocab, hidden]`).
    pub fn vocab_weight(&self, module: VocabModule) -> Option<&Param<Tensor<2>>> {
        match module {
            VocabModule::Embedding => Some(&self.embed_tokens.weight),
            VocabModule::LmHead => match self.lm_head.as_ref().map(|head| &head.weight) {
                Some(Weight::Dense(weight)) => Some(weight),
                _ => None,
            },
        }
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
                let mut names = keys.projection_names(i).into_iter();
                layer.map(|p| f(&names.next().expect("one name per projection"), p))
            })
            .collect();
        CausalLm {
            embed_tokens: self.embed_tokens,
            layers,
            norm: self.norm,
            lm_head: self.lm_head,
            config: self.config,
            rope: self.rope,
            name_or_path: self.name_or_path,
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

    /// Logits of the last of the new tokens, reading and extending `cache` (generation; no
    /// padding). The LM head runs at that position alone: in a prompt's first pass it would
    /// otherwise cost as much per position as eight of SmolLM2's 30 layers.
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]`
    /// - output: `[batch, 1, vocab]`
    pub fn next_token_logits(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        self.logits(last_position(self.hidden_states(input_ids, None, Some(cache), &[])))
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
        let bias = self.attention_bias([b, s], past, prefix, attention_mask, None, &embeddings.device());
        let windowed = self.window_masking(prefix + past + s).map(|window| self.attention_bias([b, s], past, prefix, attention_mask, Some(window), &embeddings.device()));
        let mut x = embeddings;
        for (i, layer) in self.layers.iter().enumerate() {
            let past_kv = cache.as_ref().and_then(|c| c.layers.get(i).cloned());
            let mut new_kv = None;
            let bias = match &windowed {
                Some(windowed) if self.slides(i) => windowed,
                _ => &bias,
            };
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
    /// masked, and `prefix` keys (prefix tuning) visible to every query, as PEFT extends the mask;
    /// with a sliding `window`, the prefix keys count as the first positions.
    pub fn attention_bias(
        &self,
        [batch, seq]: [usize; 2],
        past: usize,
        prefix: usize,
        attention_mask: Option<&Tensor<2, Int>>,
        window: Option<usize>,
        device: &Device,
    ) -> Tensor<4> {
        let attention_mask = attention_mask.map(|mask| match prefix {
            0 => mask.clone(),
            _ => Tensor::cat(vec![Tensor::ones([batch, prefix], device), mask.clone()], 1),
        });
        attention_bias(batch, seq, prefix + past, attention_mask.as_ref(), window, device)
    }

    /// The sliding window's size, where some layer has one and it masks some of `keys` keys.
    fn window_masking(&self, keys: usize) -> Option<usize> {
        self.config.sliding_window.as_ref().filter(|window| window.masks(keys)).map(|window| window.size)
    }

    /// Whether layer `i` attends through the sliding window.
    fn slides(&self, i: usize) -> bool {
        self.config.sliding_window.as_ref().is_some_and(|window| window.applies(i))
    }

    /// The layout of a training batch: what each query of it may attend to.
    pub fn layout(&self, batch: &TokenBatch, prefix: usize, device: &Device) -> Layout {
        let masks = |window: Option<usize>| match batch {
            TokenBatch::Padded { shape, attention_mask, .. } => {
                let mask = Tensor::<2, Int>::from_data(TensorData::new(attention_mask.clone(), *shape), device);
                Masks::Padded(self.attention_bias(*shape, 0, prefix, Some(&mask), window, device))
            }
            TokenBatch::Packed { lengths, .. } => Masks::Packed {
                biases: lengths.iter().map(|&len| self.attention_bias([1, len], 0, prefix, None, window, device)).collect(),
                causal: window.is_none(),
            },
        };
        let longest = match batch {
            TokenBatch::Padded { shape, .. } => shape[1],
            TokenBatch::Packed { lengths, .. } => lengths.iter().copied().max().unwrap_or(0),
        };
        Layout { full: masks(None), windowed: self.window_masking(prefix + longest).map(|window| masks(Some(window))) }
    }

    /// The attention half of decoder layer `i` without a cache (training): its post-attention
    /// residual. The layer's output is [`Self::mlp_block`] of it.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (padded) or `[1, Σ len, hidden]` (packed)
    /// - output: as x, or `[1, rows, hidden]` at `rows` ([`DecoderLayer::attention_block`])
    pub fn attention_block(&self, i: usize, x: Tensor<3>, layout: &Layout, extras: Option<&LayerExtras>, rows: Option<&Rows>) -> Tensor<3> {
        self.layers[i].attention_block(x, rows, |attention, h| self.contexts(attention, h, self.masks(i, layout), extras))
    }

    /// The masks layer `i` attends through.
    fn masks<'a>(&self, i: usize, layout: &'a Layout) -> &'a Masks {
        match &layout.windowed {
            Some(windowed) if self.slides(i) => windowed,
            _ => &layout.full,
        }
    }

    /// A layer's attention of the normed `h` up to `o_proj`, padded or packed
    /// ([`Attention::contexts`], [`Attention::contexts_packed`]).
    fn contexts(&self, attention: &Attention<P>, h: Tensor<3>, masks: &Masks, extras: Option<&LayerExtras>) -> Vec<Tensor<3>> {
        match masks {
            Masks::Padded(bias) => attention.contexts(h, &self.rope, None, bias.clone(), extras).0,
            Masks::Packed { biases, causal } => attention.contexts_packed(h, &self.rope, biases, *causal, extras),
        }
    }

    /// The MLP half of decoder layer `i`, from its post-attention residual `h`.
    pub fn mlp_block(&self, i: usize, h: Tensor<3>) -> Tensor<3> {
        self.layers[i].mlp_block(h)
    }

    /// For backward of a recomputed layer whose output gradient `grad` is known: a scalar with
    /// the gradients of `sum(attention_block(i, x, rows) · grad)`, less the residual's `grad`
    /// ([`DecoderLayer::attention_surrogate`]). `o_proj`'s product is not recomputed.
    pub fn attention_surrogate(
        &self,
        i: usize,
        x: Tensor<3>,
        layout: &Layout,
        extras: Option<&LayerExtras>,
        rows: Option<&Rows>,
        grad: &Tensor<3>,
    ) -> Tensor<1> {
        self.layers[i].attention_surrogate(x, rows, |attention, h| self.contexts(attention, h, self.masks(i, layout), extras), grad)
    }

    /// [`Self::attention_surrogate`] of the MLP half: `down_proj`'s product is not recomputed.
    pub fn mlp_surrogate(&self, i: usize, h: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        self.layers[i].mlp_surrogate(h, grad)
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
                stored_product(hidden.reshape([b * s, h]), self.embed_tokens.weight.val()).reshape([b, s, self.config.vocab_size])
            }
        }
    }
}

/// `len` values drawn from N(0, std²) as little-endian `dtype` (f32, bf16 or f16) bytes, drawn on
/// the host over all cores: chunks of 1M values, each from its own generator seeded by `seed` and
/// its index, written straight into the output (no f32 copy of the whole tensor).
fn random_normal_bytes(len: usize, std: f32, dtype: DType, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let size = dtype.size();
    let normal = rand_distr::Normal::new(0.0f32, std).expect("a positive standard deviation");
    let mut bytes = vec![0u8; len * size];
    bytes.par_chunks_mut(CHUNK * size).enumerate().for_each(|(index, out)| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add((index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        for value in out.chunks_exact_mut(size) {
            let v: f32 = rng.sample(normal);
            match dtype {
                DType::BF16 => value.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                DType::F16 => value.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                _ => value.copy_from_slice(&v.to_le_bytes()),
            }
        }
    });
    bytes
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// `scatter` puts the selected rows back where `select` took them, zeros elsewhere.
    #[test]
    fn rows_scatter_undoes_select() {
        let device = Device::flex();
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let x = Tensor::<3>::from_data(TensorData::new(values.clone(), [2, 3, 4]), &device);
        let rows = Rows::new(&[1, 3, 5], &device);
        let selected = rows.select(x);
        assert_eq!(selected.dims(), [1, 3, 4]);
        let back = rows.scatter(selected, [2, 3]).into_data().try_to_vec::<f32>().unwrap();
        let expected: Vec<f32> = values.iter().enumerate().map(|(i, &v)| if [1, 3, 5].contains(&(i / 4)) { v } else { 0.0 }).collect();
        assert_eq!(back, expected);
    }

    /// Generation through the cache sees what the full forward sees: with a sliding window of 3,
    /// the logits of every position agree, and differ from the same weights without the window.
    #[test]
    fn cached_generation_keeps_the_sliding_window() {
        let device = Device::flex();
        let config = |window: Value| {
            let json = serde_json::json!({"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
                "sliding_window": window});
            ModelConfig::from_json(&json, Path::new("config.json")).unwrap()
        };
        let logits = |model: &CausalLm<Linear>, ids: &[i64]| {
            let input = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
            model.logits(model.hidden_states(input, None, None, &[])).into_data().try_to_vec::<f32>().unwrap()
        };
        let ids = [3i64, 17, 5, 42, 8, 11, 29, 1];
        let windowed = CausalLm::synthetic(config(serde_json::json!(3)), DType::F32, None, 7, &device);
        let full = logits(&windowed, &ids);
        let mut cache = KvCache::default();
        // A first pass of two tokens gives the second position's logits, then one a token.
        let mut cached = logits_cached(&windowed, &ids[..2], &mut cache, &device);
        for &id in &ids[2..] {
            cached.extend(logits_cached(&windowed, &[id], &mut cache, &device));
        }
        let vocab = 50;
        assert_eq!(cached.len(), full.len() - vocab);
        let max_abs = full[vocab..].iter().zip(&cached).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_abs < 1e-6, "cached against full forward: {max_abs}");
        let unwindowed = logits(&CausalLm::synthetic(config(Value::Null), DType::F32, None, 7, &device), &ids);
        assert_eq!(full[..3 * vocab], unwindowed[..3 * vocab], "the first 3 positions see the same keys");
        assert!(full[3 * vocab..].iter().zip(&unwindowed[3 * vocab..]).any(|(a, b)| (a - b).abs() > 1e-4));
    }

    /// A cache cut back to the positions a new prompt shares (`ember chat` after an answer that
    /// tokenizes differently) goes on as a cache that only ever held them.
    #[test]
    fn a_cache_cut_back_goes_on_as_a_fresh_one() {
        let device = Device::flex();
        let json = serde_json::json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50});
        let model = CausalLm::synthetic(ModelConfig::from_json(&json, Path::new("config.json")).unwrap(), DType::F32, None, 7, &device);
        let (mut cut, mut fresh) = (KvCache::default(), KvCache::default());
        logits_cached(&model, &[3, 17, 5, 42, 8, 11], &mut cut, &device);
        cut.drop_last(3);
        logits_cached(&model, &[3, 17, 5], &mut fresh, &device);
        assert_eq!(cut.len(), 3);
        let (from_cut, from_fresh) = (logits_cached(&model, &[29, 1], &mut cut, &device), logits_cached(&model, &[29, 1], &mut fresh, &device));
        // The cut cache's keys came from a product over 6 rows, the fresh one's over 3: the last bits.
        let max_abs = from_cut.iter().zip(&from_fresh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_abs < 1e-6, "cut against fresh cache: {max_abs}");
    }

    fn logits_cached(model: &CausalLm<Linear>, ids: &[i64], cache: &mut KvCache, device: &Device) -> Vec<f32> {
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device);
        model.next_token_logits(input, cache).into_data().try_to_vec::<f32>().unwrap()
    }

    /// The same bytes on one thread and on many, near N(0, 0.02²), and bf16 the rounding of f32.
    #[test]
    fn synthetic_draws_are_seeded_not_scheduled() {
        let len = 3 * (1 << 20) + 17;
        let many = random_normal_bytes(len, 0.02, DType::F32, 9);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| random_normal_bytes(len, 0.02, DType::F32, 9));
        assert_eq!(many, one);
        let values: Vec<f32> = many.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64).sqrt();
        assert!(mean.abs() < 1e-4 && (std - 0.02).abs() < 1e-4, "mean {mean} std {std}");
        let bf16 = random_normal_bytes(len, 0.02, DType::BF16, 9);
        let rounded: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(bf16, rounded);
        assert_ne!(random_normal_bytes(16, 0.02, DType::F32, 10), many[..64]);
    }
}
