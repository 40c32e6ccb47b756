//! Building blocks shared by every architecture: a frozen linear layer in HF layout, RMSNorm,
//! rotary position embeddings and the attention core.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use crate::config::{RopeConfig, RopePairing, RopeScaling};
use crate::device::compute_dtype;
use crate::fused::{DenseWeight, RopeTables};
use crate::ggml::GgmlWeight;
use crate::nf4::{Int8Weight, Nf4Weight};

/// A frozen weight `[out, in]` (PyTorch layout): as the checkpoint stores it, quantized while
/// loading (NF4, int8), or in a GGUF file's quantized blocks.
#[derive(Module, Debug)]
pub enum Weight {
    Dense(Param<Tensor<2>>),
    Nf4(Nf4Weight),
    Int8(Int8Weight),
    Ggml(GgmlWeight),
}

impl Weight {
    /// The stored tensor, or the quantized one dequantized to f32.
    fn dense(&self) -> Tensor<2> {
        match self {
            Weight::Dense(weight) => weight.val(),
            Weight::Nf4(weight) => weight.dequantize(),
            Weight::Int8(weight) => weight.dequantize(),
            Weight::Ggml(weight) => weight.dequantize(),
        }
    }

    /// Rows `rows` of a quantized weight dequantized to `dtype` (they start on a multiple of
    /// [`Self::align`] values).
    fn dequantize_rows(&self, rows: Range<usize>, dtype: DType) -> Tensor<2> {
        match self {
            Weight::Dense(weight) => weight.val().slice(rows).cast(dtype),
            Weight::Nf4(weight) => weight.dequantize_rows(rows, dtype),
            Weight::Int8(weight) => weight.dequantize_rows(rows, dtype),
            Weight::Ggml(weight) => weight.dequantize_rows(rows, dtype),
        }
    }

    /// Values of the flattened weight a band of its rows must start on a multiple of.
    fn align(&self) -> usize {
        match self {
            Weight::Nf4(weight) => weight.align(),
            Weight::Int8(_) => crate::nf4::BLOCK,
            // GGUF rows are whole blocks.
            Weight::Dense(_) | Weight::Ggml(_) => 1,
        }
    }
}

/// `y = x Wᵀ + b` with `W` kept as the checkpoint stores it, `[out, in]`, or NF4-quantized.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::with_weight(Weight::Dense(Param::from_tensor(weight).set_require_grad(false)), bias)
    }

    pub fn with_weight(weight: Weight, bias: Option<Tensor<1>>) -> Self {
        Self { weight, bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)) }
    }

    /// The weight `[out, in]` as a dense tensor: the stored one, or dequantized to f32 (a
    /// transient the caller drops after use).
    pub fn dense_weight(&self) -> Tensor<2> {
        self.weight.dense()
    }

    fn shape(&self) -> [usize; 2] {
        match &self.weight {
            Weight::Dense(weight) => weight.shape().dims::<2>(),
            Weight::Nf4(weight) => weight.shape,
            Weight::Int8(weight) => weight.shape,
            Weight::Ggml(weight) => weight.shape,
        }
    }

    pub fn in_features(&self) -> usize {
        self.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.shape()[0]
    }

    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, i] = x.dims();
        let x = x.reshape([b * s, i]);
        let y = match &self.weight {
            Weight::Dense(weight) => stored_product(x, weight.val()),
            // Dequantized in the activations' dtype for this product only.
            Weight::Nf4(_) | Weight::Int8(_) | Weight::Ggml(_) => frozen_product(x, self.bands()),
        };
        // A bf16 checkpoint's bias under f32 activations (flex computes a bf16 base in f32).
        let y = match &self.bias {
            Some(bias) => {
                let dtype = y.dtype();
                y + bias.val().cast(dtype).unsqueeze_dim(0)
            }
            None => y,
        };
        y.reshape([b, s, self.out_features()])
    }

    /// The weight rebuilt dense band by band, in f32 when quantized, in its stored dtype when
    /// not.
    fn bands(&self) -> DenseWeight {
        match &self.weight {
            Weight::Dense(weight) => dense_bands(weight.val().inner()),
            quantized => {
                let quantized = quantized.valid();
                DenseWeight::new(self.shape(), quantized.align(), DType::F32, move |rows, dtype| quantized.dequantize_rows(rows, dtype))
            }
        }
    }

    /// Whether the weight trains (a projection's never does; the LM head's may).
    fn weight_trains(&self) -> bool {
        matches!(&self.weight, Weight::Dense(w) if w.is_require_grad())
    }

    /// Makes the bias a trainable f32 parameter starting at `value` (`[out]`), as PEFT's `bias`
    /// option trains the base's biases.
    pub fn train_bias(&mut self, value: Tensor<1>) {
        self.bias = Some(Param::from_tensor(value.cast(DType::F32)).set_require_grad(true));
    }
}

/// `x Wᵀ` for a weight as the checkpoint stores it (or trained): directly when it is in `x`'s
/// dtype or trains, the transposed weight a strided view that flex and torch GEMMs read without a
/// copy; a frozen bf16 weight under f32 activations through [`frozen_product`].
///
/// # Shapes
/// - x: `[rows, in]`; weight: `[out, in]`
/// - output: `[rows, out]`
pub fn stored_product(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    if weight.dtype() == x.dtype() || weight.is_require_grad() {
        return crate::fused::matmul(x, weight.transpose());
    }
    frozen_product(x, dense_bands(weight.inner()))
}

/// A stored weight's bands: its rows, cast (bf16 or f16 to f32 on flex over the thread pool).
fn dense_bands(weight: Tensor<2>) -> DenseWeight {
    DenseWeight::new(weight.dims(), 1, weight.dtype(), move |rows, dtype| {
        let band = weight.clone().slice(rows);
        let widened = (dtype == DType::F32).then(|| crate::fused::widen(&band)).flatten();
        widened.unwrap_or_else(|| band.cast(dtype))
    })
}

/// `x Wᵀ` for a frozen `W` that `weight` makes dense (a cast, a dequantization) on the plain
/// device, band by band, in `x`'s dtype. Backward makes it dense again rather than the graph
/// keeping the dense copy of every projection until then.
///
/// # Shapes
/// - x: `[rows, in]`; weight: `[out, in]`
/// - output: `[rows, out]`
fn frozen_product(x: Tensor<2>, weight: DenseWeight) -> Tensor<2> {
    let weight = weight.cast(x.dtype());
    crate::fused::frozen_matmul(&x, weight.clone()).unwrap_or_else(|| x.matmul(weight.all().transpose()))
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn new(weight: Tensor<2>) -> Self {
        Self { weight: Param::from_tensor(weight).set_require_grad(false) }
    }

    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let hidden = self.weight.shape().dims::<2>()[1];
        let embeddings = self.weight.val().select(0, ids.reshape([b * s])).reshape([b, s, hidden]);
        let dtype = compute_dtype(embeddings.dtype(), &embeddings.device());
        embeddings.cast(dtype)
    }
}

/// `x / sqrt(mean(x²) + eps) · weight`, as LLaMA and GLM compute it.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor<1>, eps: f64) -> Self {
        Self { weight: Param::from_tensor(weight).set_require_grad(false), eps }
    }

    /// # Shapes
    /// - x, output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if let Some(y) = crate::fused::rms_norm(&x, &self.weight.val().cast(x.dtype()), self.eps) {
            return y;
        }
        // In f32 whatever the activations' dtype, then back, as transformers does.
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        let normed = (x * (variance + self.eps).sqrt().recip()).cast(dtype);
        normed * self.weight.val().cast(dtype).unsqueeze::<3>()
    }
}

/// Rotary position embedding for a range of positions, per the architecture's pairing.
#[derive(Debug, Clone)]
pub struct Rope {
    pub config: RopeConfig,
    inv_freq: Vec<f32>,
    /// The tables of positions `0..n` on the device that last asked, grown as needed: made
    /// and uploaded once instead of at every call (on a GPU each upload waits for the queue).
    uploaded: Arc<Mutex<Option<UploadedRope>>>,
    /// The last packed row's tables (its sequences' lengths and first position): every layer of
    /// a step asks for the same.
    packed: Arc<Mutex<Option<(Vec<usize>, usize, RopeTables)>>>,
    /// The last call's own tables (dynamic NTK or LongRoPE beyond the context) with its start,
    /// length and longest position + 1: every layer of a step asks for the same.
    own: Arc<Mutex<Option<([usize; 3], RopeTables)>>>,
}

/// [`Rope`]'s uploaded f32 tables, and them in the dtype last asked.
#[derive(Debug)]
struct UploadedRope {
    cos: Tensor<2>,
    sin: Tensor<2>,
    tables: RopeTables,
}

impl PartialEq for Rope {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config && self.inv_freq == other.inv_freq
    }
}

impl Rope {
    pub fn new(config: RopeConfig) -> Self {
        let half = config.rotary_dim / 2;
        // f32 throughout, as transformers computes its tables.
        let base = config.theta as f32;
        let mut inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / config.rotary_dim as f32)).collect();
        match &config.scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= *factor as f32),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let (factor, low, high, old) =
                    (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
                let low_freq_wavelen = old / low;
                let high_freq_wavelen = old / high;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen { *f / factor } else { *f };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
            Some(yarn @ RopeScaling::Yarn { .. }) => inv_freq = yarn.yarn_inv_freq(config.theta, config.rotary_dim).expect("yarn"),
            // Each call makes its own where they differ from these ([`Self::tables`]).
            Some(RopeScaling::Dynamic { .. }) => {}
            Some(longrope @ RopeScaling::LongRope { .. }) => inv_freq = longrope.longrope_short_inv_freq(config.theta, config.rotary_dim).expect("longrope"),
        }
        Self { config, inv_freq, uploaded: Arc::default(), packed: Arc::default(), own: Arc::default() }
    }

    /// The tables of positions `start..start+len` on `device` (its plain side) in `dtype`, views
    /// of the uploaded ones, for a call whose positions end at `seq_len - 1`. Dynamic NTK beyond
    /// the context and LongRoPE's long factors make them for that call alone, as transformers
    /// recomputes its frequencies from the call's longest position.
    fn tables(&self, start: usize, len: usize, seq_len: usize, device: &Device, dtype: DType) -> RopeTables {
        let device = device.clone().inner();
        if let Some(inv_freq) = self.config.scaling.as_ref().and_then(|s| s.call_inv_freq(self.config.theta, self.config.rotary_dim, seq_len)) {
            let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
            let same = |(key, t): &([usize; 3], RopeTables)| *key == [start, len, seq_len] && t.cos.device() == device && t.cos.dtype() == dtype;
            if let Some((_, tables)) = own.as_ref().filter(|o| same(o)) {
                return tables.clone();
            }
            let (cos, sin) = self.host_tables(&inv_freq, start, len);
            let table = |values: Vec<f32>| Tensor::<2>::from_data(TensorData::new(values, [len, self.config.rotary_dim]), &device);
            let tables = RopeTables::new(table(cos), table(sin), self.config.pairing, dtype);
            *own = Some(([start, len, seq_len], tables.clone()));
            return tables;
        }
        let mut uploaded = self.uploaded.lock().unwrap_or_else(PoisonError::into_inner);
        let covers = |u: &UploadedRope| u.cos.device() == device && u.cos.dims()[0] >= start + len;
        if !uploaded.as_ref().is_some_and(covers) {
            // Whole powers of two: a few uploads over a run of growing lengths.
            let n = (start + len).next_power_of_two();
            let (cos, sin) = self.host_tables(&self.inv_freq, 0, n);
            let table = |values: Vec<f32>| Tensor::<2>::from_data(TensorData::new(values, [n, self.config.rotary_dim]), &device);
            let (cos, sin) = (table(cos), table(sin));
            let tables = RopeTables::new(cos.clone(), sin.clone(), self.config.pairing, dtype);
            *uploaded = Some(UploadedRope { cos, sin, tables });
        }
        let uploaded = uploaded.as_mut().expect("uploaded above");
        if uploaded.tables.cos.dtype() != dtype {
            uploaded.tables = RopeTables::new(uploaded.cos.clone(), uploaded.sin.clone(), self.config.pairing, dtype);
        }
        uploaded.tables.rows(start, len)
    }

    /// cos and sin tables of `inv_freq` for positions `start..start+len`, laid out to match the
    /// pairing. Shapes: `[len, rotary_dim]` each.
    fn host_tables(&self, inv_freq: &[f32], start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let dim = self.config.rotary_dim;
        let scaling = self.config.scaling.as_ref().map_or(1.0, RopeScaling::attention_scaling) as f32;
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for pos in start..start + len {
            let angle = |i: usize| pos as f32 * inv_freq[i];
            for d in 0..dim {
                let i = match self.config.pairing {
                    RopePairing::Half => d % (dim / 2),
                    RopePairing::Interleaved => d / 2,
                };
                cos.push(angle(i).cos() * scaling);
                sin.push(angle(i).sin() * scaling);
            }
        }
        (cos, sin)
    }

    /// Rotates the first `rotary_dim` dims of every head; the rest pass through.
    ///
    /// # Shapes
    /// - x, output: `[batch, heads, seq, head_dim]`
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let len = x.dims()[2];
        let tables = self.tables(start, len, start + len, &x.device(), x.dtype());
        self.rotate(x, tables)
    }

    /// [`Self::apply`] on sequences packed into one row, each from position `start`: one
    /// operation for the row rather than one per sequence.
    ///
    /// # Shapes
    /// - x, output: `[1, heads, Σ lengths, head_dim]`
    pub fn apply_packed(&self, x: Tensor<4>, lengths: &[usize], start: usize) -> Tensor<4> {
        let device = x.device().inner();
        let mut packed = self.packed.lock().unwrap_or_else(PoisonError::into_inner);
        let dtype = x.dtype();
        let same = |(l, s, t): &(Vec<usize>, usize, RopeTables)| l == lengths && *s == start && t.cos.device() == device && t.cos.dtype() == dtype;
        if !packed.as_ref().is_some_and(same) {
            // One call: its longest sequence decides dynamic NTK's frequencies for all.
            let seq_len = start + lengths.iter().copied().max().unwrap_or(0);
            let tables = RopeTables::cat(lengths.iter().map(|&len| self.tables(start, len, seq_len, &device, dtype)).collect());
            *packed = Some((lengths.to_vec(), start, tables));
        }
        let tables = packed.as_ref().expect("made above").2.clone();
        drop(packed);
        self.rotate(x, tables)
    }

    /// x rotated by `tables`, one row of them a position of `x`.
    fn rotate(&self, x: Tensor<4>, tables: RopeTables) -> Tensor<4> {
        let [b, h, s, head_dim] = x.dims();
        let dim = self.config.rotary_dim;
        if let Some(y) = crate::fused::rope(&x, tables.clone()) {
            return y;
        }
        let (cos, sin) = (tables.cos.unsqueeze::<4>(), tables.sin.unsqueeze::<4>());
        let rot = x.clone().narrow(3, 0, dim);
        let rotated = match self.config.pairing {
            // rotate_half: [x1, x2] -> [-x2, x1]
            RopePairing::Half => {
                let x1 = rot.clone().narrow(3, 0, dim / 2);
                let x2 = rot.clone().narrow(3, dim / 2, dim / 2);
                Tensor::cat(vec![x2.neg(), x1], 3)
            }
            // pairs (x0, x1) -> (-x1, x0)
            RopePairing::Interleaved => {
                let pairs = rot.clone().reshape([b, h, s, dim / 2, 2]);
                let even = pairs.clone().narrow(4, 0, 1);
                let odd = pairs.narrow(4, 1, 1);
                Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, s, dim])
            }
        };
        let out = rot * cos + rotated * sin;
        if dim == head_dim { out } else { Tensor::cat(vec![out, x.narrow(3, dim, head_dim - dim)], 3) }
    }
}

/// Additive attention bias `[batch, 1, seq, past + seq]`: 0 where a query may attend, a large
/// negative number elsewhere (causal, keys a sliding `window` has left behind, and padded keys
/// when a mask is given).
///
/// `attention_mask`: `[batch, past + seq]`, 1 for real tokens.
pub fn attention_bias(
    batch: usize,
    seq: usize,
    past: usize,
    attention_mask: Option<&Tensor<2, Int>>,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4> {
    let total = past + seq;
    // tril_mask is true above the diagonal shifted by `past`: the future keys.
    let mut masked = Tensor::<2, Bool>::tril_mask([seq, total], past as i64, device);
    if let Some(window) = window.filter(|&window| total > window) {
        // Query i sits at position past + i and sees keys k > past + i - window: triu_mask is
        // true where k - i < past - window + 1.
        masked = masked.bool_or(Tensor::<2, Bool>::triu_mask([seq, total], past as i64 - window as i64 + 1, device));
    }
    let masked = masked.reshape([1, 1, seq, total]).expand([batch, 1, seq, total]);
    let masked = match attention_mask {
        Some(mask) => {
            let padded = mask.clone().equal_elem(0).reshape([batch, 1, 1, total]).expand([batch, 1, seq, total]);
            masked.bool_or(padded)
        }
        None => masked,
    };
    // With padding, a padded query's row has every key masked: the most negative finite value
    // keeps it finite, as in transformers. Without, every row sees its own key, and -inf makes
    // exp() of a masked score a plain 0 instead of an underflow (a slow path of libm's expf:
    // ~5% of a CPU training step). Either way the probability is exactly 0.
    let fill = if attention_mask.is_some() { f32::MIN } else { f32::NEG_INFINITY };
    Tensor::<4>::zeros([batch, 1, seq, total], device).mask_fill(masked, fill)
}

/// Scaled dot-product attention with grouped K/V heads.
///
/// Head `h` reads K/V group `h / (heads / kv_heads)`, as transformers' `repeat_kv`. On LibTorch
/// this is its fused attention ([`crate::fused::attention`]); elsewhere [`composed_attention`].
///
/// `causal`: the bias is the plain causal mask over as many keys as queries (a packed sequence
/// without a prefix), which LibTorch's attention computes without reading it.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`
/// - k, v: `[batch, kv_heads, keys, head_dim]`
/// - bias: `[batch, 1, seq, keys]`
/// - output: `[batch, heads, seq, head_dim]`
pub fn grouped_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>, causal: bool) -> Tensor<4> {
    let scale = (q.dims()[3] as f64).powf(-0.5);
    crate::fused::attention(&q, &k, &v, &bias, causal, scale).unwrap_or_else(|| composed_attention(q, k, v, bias, scale))
}

/// [`grouped_attention`] from burn ops: what runs where no fused attention applies, and the
/// reference for the ones that do. The queries are regrouped instead of copying
/// K/V.
pub(crate) fn composed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>, scale: f64) -> Tensor<4> {
    let [b, heads, s, d] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let group = heads / kv_heads;
    // b,h,s,d -> b,kv,group*s,d
    let q = q.reshape([b, kv_heads, group * s, d]);
    let dtype = q.dtype();
    let scores = crate::fused::matmul(q, k.swap_dims(2, 3)).reshape([b, heads, s, keys]);
    // Softmax in f32, probabilities back in the activations' dtype, as transformers' eager path.
    let probs = softmax(scores.mul_scalar(scale).cast(DType::F32) + bias, 3).cast(dtype).reshape([b, kv_heads, group * s, keys]);
    crate::fused::matmul(probs, v).reshape([b, heads, s, d])
}

/// A learned linear map inside a decoder block (q/k/v/o, gate/up/down). The base model uses
/// [`Linear`]; an adapter substitutes its own layer (LoRA's) without the decoder knowing.
pub trait Projection: Module {
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3>;

    /// A scalar with the gradients (w.r.t. `x` and the trainable parameters) of
    /// `sum(forward(x) · grad)` for a constant `grad`: what backward of a recomputed layer needs
    /// from a projection whose output gradient is already known. Its value may differ from that
    /// sum by a constant (a frozen bias's share).
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]`; grad: `[batch, seq, out]`
    /// - output: `[1]`, f32
    fn surrogate(&self, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        output_surrogate(self.forward(x), grad)
    }
}

/// `sum(output · grad)` in f32: the surrogate of an output computed with its graph.
pub fn output_surrogate(output: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
    (output * grad.clone()).sum().cast(DType::F32)
}

impl Projection for Linear {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        Linear::forward(self, x)
    }

    /// `sum(x Wᵀ · g) = sum(x · g W)`: the frozen product's backward (`g W`, no graph) without
    /// its forward, which checkpointing would otherwise recompute only to be multiplied by `g`.
    /// A trained bias adds `sum(b · Σ_rows g)`.
    fn surrogate(&self, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        if self.weight_trains() {
            return output_surrogate(self.forward(x), grad);
        }
        let [b, s, out] = grad.dims();
        let grad = grad.clone().reshape([b * s, out]);
        let dtype = grad.dtype();
        let grad_weight = match &self.weight {
            Weight::Dense(weight) if weight.val().dtype() == dtype => crate::fused::matmul(grad.clone().inner(), weight.val().inner()),
            _ => crate::fused::frozen_transposed_matmul(grad.clone(), &self.bands().cast(dtype)),
        };
        let frozen = (x * grad_weight.reshape([b, s, self.in_features()])).sum().cast(DType::F32);
        match &self.bias {
            Some(bias) if bias.is_require_grad() => frozen + (grad.inner().cast(DType::F32).sum_dim(0).reshape([out]) * bias.val()).sum(),
            _ => frozen,
        }
    }
}


#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;
    use crate::nf4::{Int8Weight, Nf4Weight};

    /// Query i (at position past + i) sees key k where k <= past + i, k > past + i - window,
    /// and k is not padding; a window no shorter than the keys changes nothing.
    #[test]
    fn attention_bias_is_causal_windowed_and_padded() {
        let device = Device::flex();
        let (batch, seq, past) = (2, 4, 3);
        let total = past + seq;
        let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0], [batch, total]), &device);
        for window in [None, Some(2), Some(5), Some(total)] {
            let bias = attention_bias(batch, seq, past, Some(&mask), window, &device).into_data().try_to_vec::<f32>().unwrap();
            for (index, &value) in bias.iter().enumerate() {
                let (b, i, k) = (index / (seq * total), index / total % seq, index % total);
                let position = past + i;
                let visible = k <= position && window.is_none_or(|w| k + w > position) && !(b == 1 && (k == 0 || k == 6));
                assert_eq!(value == 0.0, visible, "window {window:?} row {b} query {i} key {k}");
            }
        }
        let plain = attention_bias(1, seq, past, None, None, &device);
        let wide = attention_bias(1, seq, past, None, Some(total), &device);
        assert_eq!(plain.into_data().try_to_vec::<f32>().unwrap(), wide.into_data().try_to_vec::<f32>().unwrap());
    }

    /// Packed sequences rotate in one call exactly as each would alone, from the same position,
    /// for both pairings and on part of each head; a second layer reuses the tables.
    #[test]
    fn packed_rope_equals_rope_per_sequence() {
        use crate::config::RopeConfig;
        let device = Device::flex();
        let lengths = [5, 1, 7];
        for pairing in [RopePairing::Half, RopePairing::Interleaved] {
            let rope = Rope::new(RopeConfig { theta: 10_000.0, rotary_dim: 8, pairing, scaling: None });
            let x = Tensor::<4>::random([1, 3, 13, 12], Distribution::Normal(0.0, 1.0), &device);
            let mut offset = 0;
            let alone: Vec<_> = lengths
                .iter()
                .map(|&len| {
                    let part = rope.apply(x.clone().narrow(2, offset, len), 2);
                    offset += len;
                    part
                })
                .collect();
            let alone = Tensor::cat(alone, 2).into_data().try_to_vec::<f32>().unwrap();
            for _ in 0..2 {
                assert_eq!(rope.apply_packed(x.clone(), &lengths, 2).into_data().try_to_vec::<f32>().unwrap(), alone, "{pairing:?}");
            }
        }
    }

    /// A frozen projection's surrogate hands `x` the gradient of `sum(forward(x) · g)`, bit for
    /// bit, however the weight is stored: f32, bf16 (rebuilt in f32), NF4, int8.
    #[test]
    fn surrogate_gives_the_gradient_of_the_product() {
        let device = Device::flex().autodiff();
        let (out, inp) = (24, 128);
        let values = Tensor::<2>::random([out, inp], Distribution::Normal(0.0, 0.5), &device);
        let flat = values.clone().into_data().try_to_vec::<f32>().unwrap();
        let weights = [
            ("f32", Weight::Dense(Param::from_tensor(values.clone()).set_require_grad(false))),
            ("bf16", Weight::Dense(Param::from_tensor(values.clone().cast(DType::BF16)).set_require_grad(false))),
            ("nf4", Weight::Nf4(Nf4Weight::quantize(&flat, [out, inp], true, &device))),
            ("int8", Weight::Int8(Int8Weight::from_tensor(values.clone()))),
        ];
        let x = Tensor::<3>::random([2, 3, inp], Distribution::Normal(0.0, 1.0), &device);
        let grad = Tensor::<3>::random([2, 3, out], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<1>::random([out], Distribution::Normal(0.0, 1.0), &device);
        for (name, weight) in weights {
            let linear = Linear::with_weight(weight, Some(bias.clone()));
            let gradient_of = |scalar: Tensor<1>, x: &Tensor<3>| x.grad(&scalar.backward()).unwrap().into_data().try_to_vec::<f32>().unwrap();
            let x = x.clone().require_grad();
            let want = gradient_of(output_surrogate(linear.forward(x.clone()), &grad), &x);
            let got = gradient_of(linear.surrogate(x.clone(), &grad), &x);
            assert_eq!(want, got, "{name}");
        }
    }

    /// A trained bias (PEFT's `bias = "all"`) takes the gradient `Σ_rows g` through the
    /// surrogate, as through the product.
    #[test]
    fn surrogate_gives_a_trained_bias_its_gradient() {
        let device = Device::flex().autodiff();
        let (out, inp) = (6, 8);
        let mut linear = Linear::new(Tensor::random([out, inp], Distribution::Normal(0.0, 0.5), &device), Some(Tensor::zeros([out], &device)));
        linear.train_bias(Tensor::random([out], Distribution::Normal(0.0, 1.0), &device));
        let bias = linear.bias.clone().unwrap();
        let x = Tensor::<3>::random([2, 3, inp], Distribution::Normal(0.0, 1.0), &device);
        let grad = Tensor::<3>::random([2, 3, out], Distribution::Normal(0.0, 1.0), &device);
        let bias_gradient = |scalar: Tensor<1>| bias.val().grad(&scalar.backward()).unwrap().into_data().try_to_vec::<f32>().unwrap();
        let want = bias_gradient(output_surrogate(linear.forward(x.clone()), &grad));
        let got = bias_gradient(linear.surrogate(x, &grad));
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() < 1e-5, "{want:?} vs {got:?}");
        }
    }
}
