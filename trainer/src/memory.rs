//! Peak-memory estimate of a training run from shapes alone: frozen weights, adapter and AdamW
//! state, the activations backward keeps, and the loss. Counts follow what ember's forward pass
//! leaves for backward (see `models/transformer.rs`), per token and per decoder layer; the
//! comparison with measured peaks is in BENCHMARKS.md.

use ember_adapters::Method;
use std::path::Path;

use ember_models::device::DeviceName;
use ember_models::fused;
use ember_models::family::KeyLayout;
use ember_models::gguf::GgufFile;
use ember_models::nf4::{self, Quantization};
use ember_models::{LoadDtype, LoadError, ModelConfig};

use crate::step::StepOptions;

/// What a run holds at its peak, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Frozen base weights in their training dtype.
    pub weights: f64,
    /// Adapter parameters, their gradient and its accumulation, AdamW's two moments (f32).
    pub adapter: f64,
    /// Activations kept for backward, plus the working set of one layer's backward.
    pub activations: f64,
    /// LM head output, f32 log-softmax and its gradient for one loss chunk.
    pub loss: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.weights + self.adapter + self.activations + self.loss
    }
}

/// One micro-batch: its sequences' lengths as computed (with padding, every sequence as long as
/// the longest; padding-free, the real lengths) and its supervised tokens.
#[derive(Debug, Clone)]
pub struct BatchShape {
    pub lengths: Vec<usize>,
    pub supervised_tokens: usize,
}

impl BatchShape {
    /// The worst case of a recipe: `micro_batch` sequences at `cutoff_len`, all supervised.
    pub fn worst_case(micro_batch: usize, cutoff_len: usize) -> Self {
        Self { lengths: vec![cutoff_len; micro_batch], supervised_tokens: micro_batch * cutoff_len }
    }
}

/// Estimated peak memory of training `method` on `model` on `device` with weights of
/// `weight_bytes` per value, the decoder projections stored quantized at `projection_bytes` per
/// value when it is given ([`projection_bytes`]). On LibTorch activations take the weights' dtype
/// (norms, softmax and LoRA branches compute in f32); flex computes in f32 over any base. A frozen
/// projection made dense for its product (a 4-bit base; a 16-bit base on flex) is made dense again
/// for backward, unless `EMBER_FUSED=0`: then the graph keeps each dense copy until backward, and
/// flex's fused operations keep more than they do.
pub fn estimate(
    model: &ModelConfig,
    method: &Method,
    weight_bytes: usize,
    projection_bytes: Option<f64>,
    batch: &BatchShape,
    options: StepOptions,
    device: DeviceName,
) -> MemoryEstimate {
    let on_flex = device == DeviceName::Flex;
    let flex_fused = |op: fused::Op| on_flex && fused::enabled_for(op);
    let stored = weight_bytes as f64;
    let a = if on_flex { 4.0 } else { stored };
    let (h, kv, f) = (model.q_dim() as f64, model.kv_dim() as f64, model.intermediate_size as f64);
    let hidden = model.hidden_size as f64;
    let heads = model.num_heads as f64;
    let method = method.config();
    // Prompt tuning's virtual tokens lengthen every sequence.
    let lengths: Vec<f64> = batch.lengths.iter().map(|&s| (s + method.virtual_tokens()) as f64).collect();
    let tokens: f64 = lengths.iter().sum();
    // Every sequence's scores, [heads, len, prefix + len].
    let prefix = method.prefix_keys() as f64;
    let cells = |s: f64| heads * s * (s + prefix);
    let score_cells: f64 = lengths.iter().map(|&s| cells(s)).sum();

    // Per token and layer, what backward needs (a frozen projection keeps only its weight):
    // each RMSNorm's input (f32 composed), RoPE'd q and k and v for the attention, SwiGLU's
    // gate, sigmoid, silu and up (fused: gate and up); per score cell, the f32 exp and the
    // probabilities. LibTorch's fused attention keeps no score cells but its output twice (each
    // sequence's, and the packed row's); flex's keeps the probabilities where they are small, and
    // else each score row's maximum and sum.
    let norms = 2.0 * if fused::enabled_for(fused::Op::RmsNorm) { a } else { 4.0 } * hidden;
    let torch_attention = !on_flex && fused::enabled_for(fused::Op::Attention);
    let flex_attention = flex_fused(fused::Op::Attention);
    let attention = a * (h + 2.0 * kv)
        + if torch_attention {
            2.0 * a * h
        } else if flex_attention {
            8.0 * heads
        } else {
            0.0
        };
    let mlp = if fused::enabled_for(fused::Op::Swiglu) { 2.0 } else { 4.0 } * a * f;
    // Flex's attention runs per sequence (the whole padded batch at once); where it makes the
    // probabilities again, its backward holds them, their gradient and the scores': three f32
    // score cells.
    let attended: Vec<f64> = if options.padding_free { lengths.iter().map(|&s| cells(s)).collect() } else { vec![score_cells] };
    let kept_by_flex = |cells: f64| fused::keeps_probabilities(cells as usize);
    let kept_scores = if torch_attention {
        0.0
    } else if flex_attention {
        4.0 * attended.iter().filter(|&&c| kept_by_flex(c)).sum::<f64>()
    } else {
        (4.0 + a) * score_cells
    };
    let remade_scores = match flex_attention {
        true => 12.0 * attended.iter().filter(|&&c| !kept_by_flex(c)).fold(0.0, |m: f64, &c| m.max(c)),
        false => 0.0,
    };
    // What the method's own layers keep (a LoRA branch: its input, shared with the branches
    // that read the same activation, and its f32 `x·A`).
    let own = method.activation_bytes_per_token(model, fused::KeptActivations::new(a as usize, !on_flex)) / model.num_layers as f64;
    let layer = tokens * (norms + attention + mlp + own) + kept_scores;
    // Layers below the lowest trainable one build no graph.
    let layers = (model.num_layers - method.first_trainable_layer(model)) as f64;
    // Without the frozen product, the graph keeps each projection made dense (dequantized, or
    // cast to f32 on flex) until backward: per layer with a graph, its projections at `a` bytes.
    let made_dense = projection_bytes.is_some() || (on_flex && stored != 4.0);
    let dequantized = match made_dense && !fused::enabled_for(fused::Op::FrozenMatmul) {
        true => projection_sizes(model).iter().sum::<usize>() as f64 / model.num_layers as f64 * a,
        false => 0.0,
    };
    let kept = match options.checkpoint_every {
        0 => layers * (layer + dequantized),
        // One layer in k keeps its input and post-attention residual and is recomputed with its
        // graph, one at a time; the others keep their graph.
        k => {
            let recomputed = (layers / k as f64).ceil();
            recomputed * tokens * 2.0 * a * hidden + (layers - recomputed) * (layer + dequantized) + layer + dequantized
        }
    };
    // Backward of one layer allocates about as much again as it frees.
    let activations = kept + layer + remade_scores;

    let vocab = model.vocab_size as f64;
    let chunk = match options.loss_chunk_tokens {
        0 => batch.supervised_tokens,
        n => n.min(batch.supervised_tokens),
    } as f64;
    // Per logit: f32 logits, exp and log-softmax, then the gradient (flex's fused cross-entropy:
    // the logits and the gradient; LibTorch's: the head's output, one f32 copy and the gradient
    // in the head's dtype); composed under 16-bit activations also the head's own output and the
    // gradient's cast.
    let per_logit = match a {
        _ if flex_fused(fused::Op::CrossEntropy) => 8.0,
        _ if !on_flex && fused::enabled_for(fused::Op::CrossEntropy) => 4.0 + 2.0 * a,
        4.0 => 12.0,
        _ => 16.0 + 2.0 * a,
    };
    let loss = chunk * vocab * per_logit;

    let trainable = method.count_trainable(model) as f64;
    MemoryEstimate {
        weights: stored_weight_bytes(model, stored, projection_bytes, a, on_flex) - method.replaced_base_parameters(model) as f64 * stored,
        adapter: trainable * 4.0 * 5.0,
        activations,
        loss,
    }
}

/// The frozen base: every weight at `stored` bytes, or the decoder projections quantized, plus
/// the transient of making one band of rows of a weight dense in the compute dtype of `compute`
/// bytes (`FLEX_BAND_VALUES` or `TORCH_BAND_VALUES` values, or the largest weight if smaller; the
/// whole largest one with `EMBER_FUSED=0`): a dequantization (flex's fused lookup writes 4 bytes
/// a value; LibTorch's holds its bytes as i32 indices, the looked-up f32 values and the result in
/// the compute dtype, 6 + `compute` for two values a byte; burn's composition with i64 indices 12),
/// or a cast.
fn stored_weight_bytes(model: &ModelConfig, stored: f64, projection_bytes: Option<f64>, compute: f64, on_flex: bool) -> f64 {
    let projections = projection_sizes(model);
    let band_values = if on_flex { fused::FLEX_BAND_VALUES } else { fused::TORCH_BAND_VALUES };
    let band = |values: usize| if fused::enabled_for(fused::Op::FrozenMatmul) { values.min(band_values) } else { values } as f64;
    let largest = projections.iter().copied().max().unwrap_or(0);
    let head = model.vocab_size * model.hidden_size;
    // A 16-bit head (and dense projections) cast for f32 activations on flex.
    let cast = if compute == stored { 0.0 } else { band(largest.max(head)) * compute };
    let Some(per_value) = projection_bytes else {
        return model.num_params() as f64 * stored + cast;
    };
    let quantized: usize = projections.iter().sum();
    let dequantize = match (on_flex, fused::enabled_for(fused::Op::Dequantize)) {
        // flex's fused lookup writes the f32 values straight from the bytes.
        (true, true) => 4.0,
        (false, true) => 6.0 + compute,
        (_, false) => 12.0,
    };
    (model.num_params() - quantized) as f64 * stored + quantized as f64 * per_value + (band(largest) * dequantize).max(cast)
}

/// Bytes per value of the decoder projections as a recipe's model stores them: quantized while
/// loading (`quantization`), or a GGUF file's blocks (`path`; its projections that load dense at
/// `dense_bytes`); `None` when they are dense.
pub fn projection_bytes(path: &Path, quantization: Option<Quantization>, dense_bytes: usize) -> Result<Option<f64>, LoadError> {
    if GgufFile::is_gguf(path) {
        return Ok(GgufFile::open(path)?.projection_bytes_per_value(dense_bytes as f64));
    }
    Ok(quantization.map(nf4::bytes_per_value))
}

/// Values of every decoder projection, from the family's table.
fn projection_sizes(model: &ModelConfig) -> Vec<usize> {
    let keys = KeyLayout::of(model.architecture);
    (0..model.num_layers).flat_map(|i| keys.projections(model, i)).map(|p| p.shape[0] * p.shape[1]).collect()
}

/// Bytes per weight for a recipe's `model.dtype` (`f32`, `bf16`, or `checkpoint`: the
/// config's `torch_dtype`, f32 when absent).
pub fn weight_bytes(dtype: LoadDtype, model: &ModelConfig) -> usize {
    match dtype {
        LoadDtype::F32 => 4,
        LoadDtype::Bf16 => 2,
        LoadDtype::Checkpoint => match model.torch_dtype.as_deref() {
            Some("bfloat16" | "float16") => 2,
            _ => 4,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_adapters::lora::{LoraConfig, Target};

    fn llama_7b() -> ModelConfig {
        ModelConfig::preset("llama-7b").unwrap()
    }

    /// The user's first job: LLaMA-7B, bf16 base, LoRA r16 on every projection, 4 × 512 tokens.
    /// With checkpointing and a chunked loss it must fit a 24 GB card; without, it must not.
    #[test]
    fn llama_7b_lora_fits_24_gb_only_with_checkpointing() {
        let model = llama_7b();
        let method = Method::Lora(LoraConfig { r: 16, alpha: 32.0, dropout: 0.05, use_rslora: false, target: Target::AllLinear, exclude: Default::default(), layers_to_transform: None, modules_to_save: Vec::new(), rank_pattern: Default::default(), alpha_pattern: Default::default(), bias: Default::default(), lora_bias: false, trainable_token_indices: None, init: Default::default() });
        let batch = BatchShape::worst_case(4, 512);
        let gib = |e: MemoryEstimate| e.total() / (1u64 << 30) as f64;
        let lean = estimate(&model, &method, weight_bytes(LoadDtype::Checkpoint, &model), None, &batch, StepOptions { checkpoint_every: 1, loss_chunk_tokens: 1024, padding_free: true }, DeviceName::Cuda(0));
        let full = estimate(&model, &method, 2, None, &batch, StepOptions { checkpoint_every: 0, loss_chunk_tokens: 0, padding_free: true }, DeviceName::Cuda(0));
        assert!((12.0..16.0).contains(&(lean.weights / (1u64 << 30) as f64)), "{lean:?}");
        assert!(gib(lean) < 18.0, "{} GiB: {lean:?}", gib(lean));
        assert!(gib(full) > 24.0, "{} GiB: {full:?}", gib(full));
    }
}
