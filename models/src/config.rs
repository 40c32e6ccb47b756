//! One normalized view of an HF `config.json`, whatever the architecture wrote.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::LoadError;

/// The checkpoint families ember understands. They share one decoder
/// ([`crate::transformer::CausalLm`]) and differ in tensor names, fused projections and RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `model_type` llama (and qwen2): separate q/k/v and gate/up, RoPE `rotate_half`.
    Llama,
    /// HF-native `model_type` glm: separate q/k/v (+bias), fused `gate_up_proj`, partial interleaved RoPE.
    Glm,
    /// Remote-code `model_type` chatglm (ChatGLM2/3, GLM-4-9b-chat): fused `query_key_value`
    /// and `dense_h_to_4h`, RoPE on half of each head, interleaved.
    ChatGlm,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Glm => "glm",
            Architecture::ChatGlm => "chatglm",
        }
    }
}

/// How RoPE pairs up the rotated dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairing {
    /// HF `rotate_half`: dim i pairs with i + rotary_dim/2.
    Half,
    /// GLM: dims (2i, 2i+1) form a pair.
    Interleaved,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// YaRN (Peng et al. 2023; Qwen2.5's long context): frequencies blended between the original
    /// and `1/factor` of it over a ramp of dimensions, and cos/sin scaled by an attention factor.
    /// The optional keys are kept as the config gives them (None: transformers' default).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    /// Dynamic NTK (transformers' `dynamic`): a sequence longer than `max_position_embeddings`
    /// rotates with theta grown to its length; a shorter one with the plain frequencies.
    Dynamic { factor: f64, max_position_embeddings: f64 },
    /// LongRoPE (Phi-3's, transformers' `longrope`): each frequency divided by its short factor,
    /// or by its long one in a call longer than `original_max_position_embeddings`; cos/sin
    /// scaled by `attention_factor`.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: f64, attention_factor: f64 },
}

impl RopeScaling {
    /// LongRoPE's attention factor where the config gives none: `√(1 + ln(factor) / ln(original))`,
    /// 1 for a factor up to 1 (`factor` defaulting to `max_position_embeddings / original`).
    pub fn longrope_default_attention(factor: f64, original_max_position_embeddings: f64) -> f64 {
        if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / original_max_position_embeddings.ln()).sqrt() }
    }

    /// The inverse frequencies of a call whose positions end at `seq_len - 1` where they are
    /// not the ones a [`crate::layers::Rope`] keeps: dynamic NTK beyond the context, LongRoPE's
    /// long factors beyond the original context; in f32 as transformers computes them.
    pub fn call_inv_freq(&self, theta: f64, rotary_dim: usize, seq_len: usize) -> Option<Vec<f32>> {
        match self {
            Self::Dynamic { .. } => self.dynamic_inv_freq(theta, rotary_dim, seq_len),
            Self::LongRope { long_factor, original_max_position_embeddings, .. } if seq_len as f64 > *original_max_position_embeddings => {
                Some(longrope_inv_freq(theta, rotary_dim, long_factor))
            }
            _ => None,
        }
    }

    /// LongRoPE's frequencies with the short factors, those of a call within the original
    /// context (what a [`crate::layers::Rope`] keeps); `None` for another scaling.
    pub fn longrope_short_inv_freq(&self, theta: f64, rotary_dim: usize) -> Option<Vec<f32>> {
        let Self::LongRope { short_factor, .. } = self else { return None };
        Some(longrope_inv_freq(theta, rotary_dim, short_factor))
    }

    /// Dynamic NTK's inverse frequencies for a call whose positions end at `seq_len - 1`, where
    /// they differ from the plain ones: theta · (factor·seq_len/max − (factor − 1))^(dim/(dim−2)),
    /// in f32 as transformers' `_compute_dynamic_ntk_parameters` computes it.
    pub fn dynamic_inv_freq(&self, theta: f64, rotary_dim: usize, seq_len: usize) -> Option<Vec<f32>> {
        let &Self::Dynamic { factor, max_position_embeddings } = self else { return None };
        if seq_len as f64 <= max_position_embeddings {
            return None;
        }
        let (factor, dim) = (factor as f32, rotary_dim as f32);
        let grown = factor * seq_len as f32 / max_position_embeddings as f32 - (factor - 1.0);
        let base = theta as f32 * grown.powf((rotary_dim as f64 / (rotary_dim as f64 - 2.0)) as f32);
        Some((0..rotary_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim)).collect())
    }

    /// YaRN's inverse frequencies from the unscaled `inv_freq` (`theta^(-2i/dim)`), in f32 as
    /// transformers' `_compute_yarn_parameters` computes them.
    pub fn yarn_inv_freq(&self, theta: f64, rotary_dim: usize) -> Option<Vec<f32>> {
        let &Self::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } = self else { return None };
        let dim = rotary_dim as f64;
        // The dimension whose wavelength turns `rotations` times over the original context.
        let correction_dim = |rotations: f64| dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
        // Python's `x or default`: 0 counts as absent.
        let (fast, slow) = (beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0), beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0));
        let (mut low, mut high) = (correction_dim(fast), correction_dim(slow));
        if truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        let base = theta as f32;
        Some(
            (0..rotary_dim / 2)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f32 / rotary_dim as f32);
                    let (extrapolation, interpolation) = (1.0 / pos_freq, 1.0 / (factor as f32 * pos_freq));
                    let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                })
                .collect(),
        )
    }

    /// What cos and sin are multiplied by: YaRN's attention factor (given, or from `factor`
    /// and `mscale`/`mscale_all_dim` as transformers infers it); 1 for the other scalings.
    pub fn attention_scaling(&self) -> f64 {
        if let Self::LongRope { attention_factor, .. } = self {
            return *attention_factor;
        }
        let &Self::Yarn { factor, attention_factor, mscale, mscale_all_dim, .. } = self else { return 1.0 };
        attention_factor.unwrap_or_else(|| match (mscale.filter(|&m| m != 0.0), mscale_all_dim.filter(|&m| m != 0.0)) {
            (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
            _ => Self::yarn_default_attention(factor),
        })
    }

    /// YaRN's attention factor when the config gives none: `0.1·ln(factor) + 1`.
    pub fn yarn_default_attention(factor: f64) -> f64 {
        yarn_mscale(factor, 1.0)
    }

    /// What llama3 scaling divides each of the `rotary_dim / 2` frequencies by (llama.cpp keeps
    /// them as its `rope_freqs` tensor): 1 for short wavelengths, `factor` for long ones, a
    /// smooth blend between. f32, as [`crate::layers::Rope`] scales the frequencies.
    pub fn llama3_divisors(&self, theta: f64, rotary_dim: usize) -> Option<Vec<f32>> {
        let &Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = self else { return None };
        let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
        let (low_freq_wavelen, high_freq_wavelen) = (old / low, old / high);
        let divisor = |i: usize| {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        };
        Some((0..rotary_dim / 2).map(divisor).collect())
    }
}

impl std::fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Linear { factor } => write!(f, "linear x{factor}"),
            Self::Llama3 { factor, original_max_position_embeddings, .. } => write!(f, "llama3 x{factor} (original context {original_max_position_embeddings})"),
            Self::Yarn { factor, original_max_position_embeddings, .. } => {
                write!(f, "yarn x{factor} (original context {original_max_position_embeddings}, attention x{:.4})", self.attention_scaling())
            }
            Self::Dynamic { factor, max_position_embeddings } => write!(f, "dynamic NTK x{factor} (beyond {max_position_embeddings} positions)"),
            Self::LongRope { original_max_position_embeddings, attention_factor, .. } => {
                write!(f, "longrope (long factors beyond {original_max_position_embeddings} positions, attention x{attention_factor:.4})")
            }
        }
    }
}

/// `1 / (factor_i · theta^(2i/dim))`, LongRoPE's inverse frequencies for one set of factors.
fn longrope_inv_freq(theta: f64, rotary_dim: usize, factors: &[f64]) -> Vec<f32> {
    let base = theta as f32;
    (0..rotary_dim / 2).map(|i| 1.0 / (factors[i] as f32 * base.powf((2 * i) as f32 / rotary_dim as f32))).collect()
}

/// transformers' `get_mscale`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Leading dims of each head that are rotated; the rest pass through.
    pub rotary_dim: usize,
    pub pairing: RopePairing,
    pub scaling: Option<RopeScaling>,
}

/// The MLP's gate activation (`hidden_act`): `down(act(gate(x)) · up(x))`. Every family's own
/// checkpoints use SiLU (SwiGLU); a LLaMA-architecture config may name GELU (GeGLU), which
/// transformers' `LlamaMLP` runs through its `ACT2FN`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MlpActivation {
    #[default]
    Silu,
    /// The exact GELU, `x·Φ(x)` (transformers' `gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`).
    GeluTanh,
}

impl MlpActivation {
    /// transformers' `ACT2FN` names this reads.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" | "gelu_python" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    /// SwiGLU or GeGLU, as `ember inspect` says it.
    pub fn mlp_name(self) -> &'static str {
        match self {
            Self::Silu => "SwiGLU",
            Self::Gelu => "GeGLU, exact GELU",
            Self::GeluTanh => "GeGLU, tanh GELU",
        }
    }
}

/// A query at position `p` of a sliding layer sees the keys at positions `p - size + 1 ..= p`,
/// as transformers' `sliding_window_overlay` (prefix keys count as the first positions).
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// Per layer, whether the window applies to it.
    pub layers: Vec<bool>,
}

impl SlidingWindow {
    pub fn applies(&self, layer: usize) -> bool {
        self.layers.get(layer).copied().unwrap_or(false)
    }

    /// Whether the window masks anything when queries see `keys` keys.
    pub fn masks(&self, keys: usize) -> bool {
        keys > self.size
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's RMSNorm over each head of q and k before RoPE (`…self_attn.q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// GLM-4-0414's RMSNorm on the attention's and the MLP's output before each residual add
    /// (`post_self_attn_layernorm`, `post_mlp_layernorm`).
    pub output_norms: bool,
    /// Sliding-window attention (Mistral; Qwen2/Qwen3 with `use_sliding_window`).
    pub sliding_window: Option<SlidingWindow>,
    /// The MLP's gate activation.
    pub hidden_act: MlpActivation,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` as written in config.json, if any.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Reads `dir/config.json`, or a GGUF file's metadata when `dir` is one.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        if crate::gguf::GgufFile::is_gguf(dir) {
            return Self::from_json(&crate::gguf::GgufFile::open(dir)?.config_json()?, dir);
        }
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        Self::from_json(&Self::read_json(path)?, path)
    }

    /// A config.json as JSON, for the writers that copy it with changes.
    pub fn read_json(path: &Path) -> Result<Value, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| LoadError::json(path, e))
    }

    /// The `eos_token_id`s (one id or a list) of `dir/generation_config.json`, where
    /// transformers' `generate` stops besides config.json's; none without that file.
    pub fn generation_eos_token_ids(dir: &Path) -> Result<Vec<u32>, LoadError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Vec::new());
        }
        let value = Self::read_json(&path)?;
        let obj = value.as_object().ok_or_else(|| LoadError::Invalid { path: path.clone(), reason: "not a JSON object".into() })?;
        JsonConfig { obj, path }.token_ids("eos_token_id")
    }

    /// A [`preset`] shape as a config.
    pub fn preset(name: &str) -> Option<Self> {
        Self::from_json(&preset(name)?, Path::new(name)).ok()
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Where a family's config.json keeps each shape.
pub(crate) struct ShapeKeys {
    pub vocab: &'static str,
    pub hidden: &'static str,
    pub ffn: &'static str,
    pub layers: &'static str,
    pub heads: &'static str,
    /// Absent: as many key/value heads as query heads.
    pub kv_heads: &'static str,
    /// Absent: hidden / heads.
    pub head_dim: &'static str,
}

/// transformers-native configs (llama, qwen2, glm).
pub(crate) const HF_SHAPE_KEYS: ShapeKeys = ShapeKeys {
    vocab: "vocab_size",
    hidden: "hidden_size",
    ffn: "intermediate_size",
    layers: "num_hidden_layers",
    heads: "num_attention_heads",
    kv_heads: "num_key_value_heads",
    head_dim: "head_dim",
};

/// Names of the shapes [`preset`] knows.
pub const PRESETS: [&str; 4] = ["llama-7b", "llama-13b", "llama3-8b", "smollm2-135m"];

/// config.json of a well-known LLaMA-family shape, bf16 as its checkpoints are: for estimates and
/// synthetic benchmarks without downloading the model.
pub fn preset(name: &str) -> Option<Value> {
    let (hidden, ffn, layers, heads, kv, vocab) = match name {
        "llama-7b" => (4096, 11008, 32, 32, 32, 32000),
        "llama-13b" => (5120, 13824, 40, 40, 40, 32000),
        "llama3-8b" => (4096, 14336, 32, 32, 8, 128256),
        "smollm2-135m" => (576, 1536, 30, 9, 3, 49152),
        _ => return None,
    };
    Some(serde_json::json!({"model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16"}))
}

/// Typed access to config.json keys, with errors that name the file and key.
pub(crate) struct JsonConfig<'a> {
    pub obj: &'a Map<String, Value>,
    pub path: PathBuf,
}

impl JsonConfig<'_> {
    fn error(&self, key: &str, reason: impl Into<String>) -> LoadError {
        LoadError::ConfigKey { path: self.path.clone(), key: key.into(), reason: reason.into() }
    }

    /// `None` when the key is absent or null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn string(&self, key: &str) -> Result<String, LoadError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.error(key, format!("expected a string, found {other}"))),
            None => Err(self.error(key, "missing")),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize, LoadError> {
        self.opt_usize(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.error(key, format!("expected a positive integer, found {v}"))),
            },
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.error(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, LoadError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(key, format!("expected true or false, found {v}"))),
        }
    }

    /// A token id or a list of them (`eos_token_id` is often a list).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>, LoadError> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.error(key, format!("expected a token id, found {v}")))
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    pub fn token_id(&self, key: &str) -> Result<Option<u32>, LoadError> {
        Ok(self.token_ids(key)?.first().copied())
    }

    /// A config with the shapes under `keys`, RoPE `rope(head_dim)` and `rms_norm_eps`, what
    /// every family reads the same way (special tokens, `tie_word_embeddings`,
    /// `max_position_embeddings`, `torch_dtype`) and no biases; a family overrides what it
    /// decides otherwise.
    pub fn base_config(
        &self,
        keys: &ShapeKeys,
        architecture: Architecture,
        model_type: &str,
        rms_norm_eps: f64,
        rope: impl FnOnce(usize) -> Result<RopeConfig, LoadError>,
    ) -> Result<ModelConfig, LoadError> {
        // An activation ember does not compute would run silently wrong.
        let hidden_act = match self.get("hidden_act") {
            None | Some(Value::Null) => MlpActivation::Silu,
            Some(act) => {
                let name = act.as_str().ok_or_else(|| self.invalid("hidden_act", format!("expected a string, found {act}")))?;
                MlpActivation::from_hf(name).ok_or_else(|| {
                    self.unsupported("hidden_act", format!("'{name}' is not supported (ember's MLP gate takes silu, gelu or gelu_pytorch_tanh)"))
                })?
            }
        };
        let hidden_size = self.usize(keys.hidden)?;
        let num_heads = self.usize(keys.heads)?;
        let num_kv_heads = self.opt_usize(keys.kv_heads)?.unwrap_or(num_heads);
        self.check_heads(num_heads, num_kv_heads, keys.kv_heads)?;
        let head_dim = self.opt_usize(keys.head_dim)?.unwrap_or(hidden_size / num_heads);
        let (bos_token_id, eos_token_ids, pad_token_id) = self.special_tokens()?;
        Ok(ModelConfig {
            architecture,
            model_type: model_type.to_owned(),
            vocab_size: self.usize(keys.vocab)?,
            hidden_size,
            intermediate_size: self.usize(keys.ffn)?,
            num_layers: self.usize(keys.layers)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope: rope(head_dim)?,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            output_norms: false,
            sliding_window: None,
            hidden_act,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            torch_dtype: self.string("torch_dtype").ok(),
        })
    }

    /// `bos_token_id`, `eos_token_id` (one or a list), `pad_token_id`.
    #[allow(clippy::type_complexity)]
    pub fn special_tokens(&self) -> Result<(Option<u32>, Vec<u32>, Option<u32>), LoadError> {
        Ok((self.token_id("bos_token_id")?, self.token_ids("eos_token_id")?, self.token_id("pad_token_id")?))
    }

    /// Positive check shared by every architecture: heads must divide evenly.
    pub fn check_heads(&self, num_heads: usize, num_kv_heads: usize, key: &str) -> Result<(), LoadError> {
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(self.error(key, format!("{num_kv_heads} does not divide num heads {num_heads}")));
        }
        Ok(())
    }

    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> LoadError {
        self.error(key, reason)
    }

    /// A value ember understands but does not implement.
    pub fn unsupported(&self, key: &str, reason: impl Into<String>) -> LoadError {
        LoadError::Unsupported { path: self.path.clone(), key: key.into(), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    /// transformers' `_compute_yarn_parameters` (transformers 5.23.0) for head_dim 16: the
    /// inverse frequencies bit for bit, and the attention factor.
    #[test]
    fn yarn_frequencies_and_attention_factor_are_transformers() {
        let plain = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 128.0,
            beta_fast: None,
            beta_slow: None,
            attention_factor: None,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        };
        let expected = [0x3f800000u32, 0x3e72dce8, 0x3d4ccccc, 0x3c0186e3, 0x3b23d70a, 0x3a4f3e38, 0x3983126f, 0x38a5cb60];
        assert_eq!(plain.yarn_inv_freq(10_000.0, 16).unwrap(), expected.map(f32::from_bits));
        assert!((plain.attention_scaling() - 1.138629436111989).abs() < 1e-15);
        let options = RopeScaling::Yarn {
            factor: 8.0,
            original_max_position_embeddings: 64.0,
            beta_fast: Some(16.0),
            beta_slow: Some(2.0),
            attention_factor: None,
            mscale: Some(0.7),
            mscale_all_dim: Some(1.0),
            truncate: false,
        };
        let expected = [0x3f800000u32, 0x3cc693b0, 0x3b9a08c8, 0x3a6ef74f, 0x39395d21, 0x380fc8f8, 0x36df10c4, 0x35ad07a7];
        assert_eq!(options.yarn_inv_freq(500_000.0, 16).unwrap(), expected.map(f32::from_bits));
        assert!((options.attention_scaling() - 0.9483558523503399).abs() < 1e-15);
    }

    use super::*;

    fn parse(json: Value) -> Result<ModelConfig, LoadError> {
        ModelConfig::from_json(&json, Path::new("config.json"))
    }

    #[test]
    fn llama2_7b_has_its_published_parameter_count() {
        let config = parse(preset("llama-7b").unwrap()).unwrap();
        assert_eq!(config.num_params(), 6_738_415_616);
    }

    #[test]
    fn unknown_architecture_names_the_key_and_value() {
        let error = parse(serde_json::json!({"model_type": "gpt_neox"})).unwrap_err().to_string();
        assert!(error.contains("'model_type'") && error.contains("gpt_neox"), "{error}");
    }

    /// What ember cannot run is refused as unsupported, naming the key: an activation other than
    /// SiLU and GELU, an unknown RoPE scaling or layer type.
    #[test]
    fn configs_ember_cannot_run_are_unsupported() {
        let config = |extra: Value| {
            let mut json = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 32768});
            json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            parse(json)
        };
        for (extra, key) in [
            (serde_json::json!({"hidden_act": "quick_gelu"}), "hidden_act"),
            (serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 4096, "layer_types": ["chunked_attention"]}), "layer_types"),
            (serde_json::json!({"rope_scaling": {"rope_type": "su", "factor": 2.0}}), "rope_scaling"),
            (serde_json::json!({"model_type": "gpt_neox"}), "model_type"),
        ] {
            match config(extra.clone()) {
                Err(LoadError::Unsupported { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        for extra in [serde_json::json!({"model_type": "mistral", "sliding_window": null}), serde_json::json!({"hidden_act": "silu"})] {
            assert_eq!(config(extra.clone()).unwrap().architecture, Architecture::Llama, "{extra}");
        }
        let act = |name: &str| config(serde_json::json!({"hidden_act": name})).unwrap().hidden_act;
        assert_eq!((act("gelu"), act("gelu_pytorch_tanh"), act("swish")), (MlpActivation::Gelu, MlpActivation::GeluTanh, MlpActivation::Silu));
    }

    /// Dynamic NTK: plain frequencies up to the context, beyond it theta grown by
    /// (factor·len/max − (factor − 1))^(dim/(dim−2)).
    #[test]
    fn dynamic_ntk_grows_theta_beyond_the_context() {
        let dynamic = RopeScaling::Dynamic { factor: 2.0, max_position_embeddings: 2048.0 };
        assert_eq!(dynamic.dynamic_inv_freq(10000.0, 128, 2048), None);
        let freq = dynamic.dynamic_inv_freq(10000.0, 128, 4096).unwrap();
        let base = 10000.0 * 3f64.powf(128.0 / 126.0);
        for (i, f) in freq.iter().enumerate() {
            let want = base.powf(-(2.0 * i as f64) / 128.0);
            assert!((*f as f64 - want).abs() <= 1e-5 * want, "{i}: {f} vs {want}");
        }
    }

    /// GLM's rotary embedding takes LLaMA's scalings over its rotated half (it used to drop them).
    #[test]
    fn glm_reads_rope_scaling_over_its_rotary_dims() {
        let config = parse(serde_json::json!({"model_type": "glm", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "head_dim": 16, "vocab_size": 10, "partial_rotary_factor": 0.5,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}))
        .unwrap();
        assert_eq!(config.rope.rotary_dim, 8);
        assert!(matches!(config.rope.scaling, Some(RopeScaling::Yarn { factor, .. }) if factor == 4.0));
    }

    /// LongRoPE: one factor per frequency, the long ones beyond the original context, Phi-3's
    /// attention factor from the context ratio when the config gives none.
    #[test]
    fn longrope_reads_its_factors_and_attention() {
        let config = |scaling: Value| {
            parse(serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 4, "vocab_size": 10, "max_position_embeddings": 4096, "rope_scaling": scaling}))
        };
        let short: Vec<f64> = (0..8).map(|i| 1.0 + i as f64).collect();
        let rope = config(serde_json::json!({"rope_type": "longrope", "original_max_position_embeddings": 1024, "short_factor": short, "long_factor": vec![2.0; 8]}))
            .unwrap()
            .rope;
        let scaling = rope.scaling.unwrap();
        assert!((scaling.attention_scaling() - (1.0 + 4f64.ln() / 1024f64.ln()).sqrt()).abs() < 1e-12);
        assert_eq!(scaling.call_inv_freq(10000.0, 16, 1024), None, "within the context: the short factors Rope keeps");
        let plain = scaling.longrope_short_inv_freq(10000.0, 16).unwrap();
        let long = scaling.call_inv_freq(10000.0, 16, 1025).unwrap();
        assert_eq!((plain[3], long[3]), (1.0 / (4.0 * 10000f32.powf(6.0 / 16.0)), 1.0 / (2.0 * 10000f32.powf(6.0 / 16.0))));
        let error = config(serde_json::json!({"rope_type": "longrope", "original_max_position_embeddings": 1024, "short_factor": [1.0], "long_factor": vec![2.0; 8]}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("short_factor") && error.contains("8 numbers"), "{error}");
    }

    /// Which layers slide, as transformers decides: Mistral all of them; Qwen2/Qwen3 only with
    /// `use_sliding_window`, from `max_window_layers` on or as `layer_types` lists them.
    #[test]
    fn sliding_windows_follow_transformers() {
        let window = |extra: Value| {
            let mut json = serde_json::json!({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                "num_attention_heads": 4, "vocab_size": 10});
            json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            parse(json).unwrap().sliding_window.map(|w| (w.size, w.layers))
        };
        assert_eq!(window(serde_json::json!({"model_type": "mistral", "sliding_window": 4096})), Some((4096, vec![true; 3])));
        assert_eq!(window(serde_json::json!({"model_type": "mistral", "sliding_window": null})), None);
        assert_eq!(window(serde_json::json!({"model_type": "qwen2", "sliding_window": 4096})), None);
        assert_eq!(window(serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1})), Some((8, vec![false, true, true])));
        assert_eq!(window(serde_json::json!({"model_type": "qwen3", "use_sliding_window": true, "sliding_window": 8})), None);
        let types = serde_json::json!(["sliding_attention", "full_attention", "sliding_attention"]);
        assert_eq!(window(serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8, "layer_types": types})), Some((8, vec![true, false, true])));
        assert_eq!(window(serde_json::json!({"model_type": "llama", "sliding_window": 8})), None);
    }

    #[test]
    fn llama3_rope_scaling_is_parsed() {
        let config = parse(serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        }))
        .unwrap();
        assert!(matches!(config.rope.scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
    }

    /// transformers 5's `rope_parameters` reads as transformers 4's top-level keys.
    #[test]
    fn transformers_5_rope_parameters_are_read() {
        for family in ["tiny_llama", "tiny_glm"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(family);
            let read = |file: &str| parse(serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()).unwrap();
            assert_eq!(read("config.transformers_v5.json").rope, read("config.json").rope, "{family}");
        }
        let config = parse(serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "partial_rotary_factor": 0.5},
        }))
        .unwrap();
        assert_eq!(config.rope.theta, 500000.0);
        assert_eq!(config.rope.rotary_dim, 8);
        assert!(matches!(config.rope.scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
    }
}
