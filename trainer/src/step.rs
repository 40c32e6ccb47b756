//! One micro-batch's forward and backward, in stages that can trade compute for memory: the
//! decoder layers, then the final norm, LM head and cross-entropy. Each stage back-propagates
//! from the gradient of its output (`sum(out · grad_out)`), so checkpointing, loss chunking and
//! packing change what is kept in memory and computed, not the loss or the gradients
//! (checkpointing: bit for bit; chunking and packing: up to float rounding).

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Distribution, Gradients, Tensor, TensorData};
use ember_adapters::AdaptedModel;
use ember_data::Batch;
use ember_models::{Rows, TokenBatch};

use crate::loss::{nll_sum, supervised_rows};

/// How one micro-batch is computed (recipe keys `train.gradient_checkpointing` and
/// `train.gradient_checkpointing_every`, `train.loss_chunk_tokens` and `train.padding_free`).
/// None of them changes the loss or the gradients beyond float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// 0: keep the whole graph. k ≥ 1: for one trainable decoder layer in k (counted from the
    /// lowest), keep only its input and post-attention residual from the forward pass and
    /// recompute it with its graph in backward, one half at a time, without the o and down
    /// products (about two thirds of an extra forward pass of compute over those layers); the
    /// other layers keep their graph, each back-propagated on its own.
    pub checkpoint_every: usize,
    /// LM head and cross-entropy over at most this many supervised tokens at a time, each chunk
    /// back-propagated before the next, so `[tokens, vocab]` f32 logits never exist whole.
    /// 0: all tokens in one chunk.
    pub loss_chunk_tokens: usize,
    /// Pack the batch's sequences into one row without their padding: no compute or memory is
    /// spent on pad tokens (HF's padding-free training).
    pub padding_free: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self { checkpoint_every: 0, loss_chunk_tokens: 0, padding_free: true }
    }
}

impl StepOptions {
    /// `checkpoint_every` from the switch and its period as recipes and the CLI give them
    /// (`gradient_checkpointing`, `gradient_checkpointing_every`): the period when on, else 0.
    pub fn checkpoint_every(on: bool, every: usize) -> usize {
        if on { every } else { 0 }
    }
}

/// Forward and backward of `weight · loss` for one micro-batch, adding the gradients to
/// `grads`. Returns `weight · loss`, or `None` when no token of the batch is supervised.
/// `neftune_alpha`: noise on the token embeddings ([`with_embedding_noise`]).
///
/// Each half of layer `i` (attention, MLP) draws its dropout from `device` seeded with
/// [`block_seed`], so a recomputed half draws the masks of its forward pass.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &AdaptedModel,
    batch: &Batch,
    weight: f64,
    options: StepOptions,
    neftune_alpha: Option<f64>,
    seed: u64,
    device: &Device,
    grads: &mut GradientsAccumulator<AdaptedModel>,
) -> Option<f64> {
    // Prompt tuning's virtual positions are ordinary positions of every sequence.
    let virtual_tokens = model.virtual_tokens();
    let (tokens, rows, targets) = tokens_and_targets(&batch.with_virtual_tokens(virtual_tokens), options.padding_free);
    if rows.is_empty() {
        return None;
    }
    // Prefix keys/values are expanded to the token tensor's rows (1 when packed).
    let batch_rows = tokens.shape()[0];
    let layout = model.model.layout(&tokens, model.prefix_keys(), device);
    let (first, layers) = (model.first_trainable_layer(), model.model.layers.len());
    // Trainable embeddings (prompt tuning's, or the token embedding trained in full): the
    // gradient must reach the input of the first layer.
    let embeddings_train = virtual_tokens > 0 || model.trains_embedding();

    // Layers, forward. With checkpointing the pass runs on a frozen view (no graph) and keeps
    // the input and the post-attention residual of each layer that backward will recompute; a
    // trainable layer that is not recomputed (`checkpoint_every` > 1) runs with its graph from a
    // detached input, and backward goes through that graph alone.
    let checkpointing = options.checkpoint_every > 0;
    let recomputed = |i: usize| (i - first) % options.checkpoint_every.max(1) == 0;
    let frozen = checkpointing.then(|| model.clone().no_grad());
    let forward_model = frozen.as_ref().unwrap_or(model);
    let extras = forward_model.extras(batch_rows);
    // Prefix keys/values of all layers come from one encoder: computed once with its graph, read
    // by the layers that backward goes through through a leaf whose gradient sums over layers,
    // then back-propagated through the encoder once, as the stored graph does.
    let prefix = checkpointing.then(|| model.prefix_keys_values()).flatten();
    let prefix_leaf = prefix.as_ref().map(|kv| kv.clone().detach().require_grad());
    // The lowest trainable layer's input comes from frozen layers: no gradient needed, unless the
    // embeddings themselves train.
    let input_grad = |i: usize| i > first || embeddings_train;
    let leaf = |x: Tensor<3>, i: usize| if input_grad(i) { x.detach().require_grad() } else { x.detach() };
    // Only the supervised rows of the last layer's output reach the loss: that layer computes
    // o_proj, its residual and its MLP at those rows alone.
    let last_rows = Rows::new(&rows, device);
    let at = |i: usize| (i + 1 == layers).then_some(&last_rows);
    let mut kept = Vec::new();
    let mut x = forward_model.embed(&tokens, device);
    if let Some(alpha) = neftune_alpha {
        // Seeded as one more half after the last layer's.
        device.seed(block_seed(seed, layers, Half::Attention));
        x = with_embedding_noise(x, alpha, batch.seq, &tokens, virtual_tokens);
    }
    for i in 0..layers {
        if checkpointing && i >= first && !recomputed(i) {
            let input = leaf(x, i);
            let extras = model.layer_extras(batch_rows, i, prefix_leaf.as_ref());
            device.seed(block_seed(seed, i, Half::Attention));
            let residual = model.model.attention_block(i, input.clone(), &layout, extras.as_ref(), at(i));
            device.seed(block_seed(seed, i, Half::Mlp));
            let output = model.model.mlp_block(i, residual);
            x = output.clone().detach();
            kept.push(Kept::Graph { input, output });
            continue;
        }
        device.seed(block_seed(seed, i, Half::Attention));
        let residual = forward_model.model.attention_block(i, x.clone(), &layout, extras.get(i), at(i));
        if checkpointing && i >= first {
            kept.push(Kept::Recompute { input: x, residual: residual.clone() });
        }
        device.seed(block_seed(seed, i, Half::Mlp));
        x = forward_model.model.mlp_block(i, residual);
    }

    let (loss, mut grad) = loss_backward(model, x.clone().detach().require_grad(), targets, weight, options.loss_chunk_tokens, grads);

    // Layers, backward.
    if !checkpointing {
        let layer_grads = (x * grad).sum().backward();
        grads.accumulate(model, GradientsParams::from_grads(layer_grads, model));
        return Some(loss);
    }
    let mut prefix_grad: Option<Tensor<4>> = None;
    let mut take_prefix_grad = |layer_grads: &mut Gradients| {
        if let Some(g) = prefix_leaf.as_ref().and_then(|leaf| leaf.grad_remove(layer_grads)) {
            prefix_grad = Some(prefix_grad.take().map_or(g.clone(), |sum| sum + g));
        }
    };
    for i in (first..layers).rev() {
        let (input, residual) = match kept.pop().expect("one kept entry per trainable layer") {
            Kept::Graph { input, output } => {
                if !output.is_tracked() {
                    continue;
                }
                let mut layer_grads = (output * grad.clone()).sum().backward();
                if input_grad(i) {
                    grad = input.grad_remove(&mut layer_grads).expect("a tracked layer input has a gradient");
                }
                take_prefix_grad(&mut layer_grads);
                grads.accumulate(model, GradientsParams::from_grads(layer_grads, model));
                continue;
            }
            Kept::Recompute { input, residual } => (input, residual),
        };
        // Each half back-propagates from its output gradient through surrogates
        // (`Projection::surrogate`) that skip the forward of o_proj and down_proj: their outputs
        // only fed the residual stream, whose gradient is already known.
        // MLP half, from the kept residual.
        let residual = residual.detach().require_grad();
        device.seed(block_seed(seed, i, Half::Mlp));
        let mut mlp_grads = model.model.mlp_surrogate(i, residual.clone(), &grad).backward();
        grad = grad + residual.grad_remove(&mut mlp_grads).expect("the residual has a gradient");
        grads.accumulate(model, GradientsParams::from_grads(mlp_grads, model));

        // Attention half.
        let input = leaf(input, i);
        device.seed(block_seed(seed, i, Half::Attention));
        let extras = model.layer_extras(batch_rows, i, prefix_leaf.as_ref());
        let surrogate = model.model.attention_surrogate(i, input.clone(), &layout, extras.as_ref(), at(i), &grad);
        // Nothing to train in the lowest layer's attention (LoRA on the MLP alone).
        if !surrogate.is_tracked() {
            continue;
        }
        let mut attention_grads = surrogate.backward();
        if input_grad(i) {
            if let Some(rows) = at(i) {
                let [batch, seq, _] = input.dims();
                grad = rows.scatter(grad, [batch, seq]);
            }
            grad = grad + input.grad_remove(&mut attention_grads).expect("a tracked layer input has a gradient");
        }
        take_prefix_grad(&mut attention_grads);
        grads.accumulate(model, GradientsParams::from_grads(attention_grads, model));
    }
    if let (Some(prefix), Some(grad)) = (prefix, prefix_grad) {
        let encoder_grads = (prefix * grad).sum().backward();
        grads.accumulate(model, GradientsParams::from_grads(encoder_grads, model));
    }
    if embeddings_train {
        let embedding_grads = (model.embed(&tokens, device) * grad).sum().backward();
        grads.accumulate(model, GradientsParams::from_grads(embedding_grads, model));
    }
    Some(loss)
}

/// NEFTune (Jain et al., 2023; transformers' `neftune_noise_alpha`): noise drawn from
/// `U(-m, m)`, `m = alpha / √(L·d)`, added to the token embeddings of a training pass, with `L`
/// the batch's padded length (`padded_len`, its longest sequence, as transformers sees a batch
/// padded to it) and `d` the hidden size. The noise is additive, so the gradients of a trained
/// embedding are unchanged. Prompt tuning's virtual positions (the first `virtual_tokens` of
/// each sequence) come from the adapter, not from the embedding module transformers hooks, and
/// stay clean.
///
/// # Shapes
/// - x: `[batch, seq, hidden]` (padded) or `[1, Σ len, hidden]` (packed), as `tokens`
pub fn with_embedding_noise(x: Tensor<3>, alpha: f64, padded_len: usize, tokens: &TokenBatch, virtual_tokens: usize) -> Tensor<3> {
    let [rows, positions, hidden] = x.dims();
    let magnitude = alpha / ((padded_len * hidden) as f64).sqrt();
    let noise = x.random_like(Distribution::Uniform(-magnitude, magnitude));
    if virtual_tokens == 0 {
        return x + noise;
    }
    let lengths = match tokens {
        TokenBatch::Padded { shape: [_, seq], .. } => vec![*seq; rows],
        TokenBatch::Packed { lengths, .. } => lengths.clone(),
    };
    let real: Vec<f32> = lengths.iter().flat_map(|&len| (0..len).map(|j| if j < virtual_tokens { 0.0 } else { 1.0 })).collect();
    let real = Tensor::<1>::from_data(TensorData::new(real, [rows * positions]), &x.device()).reshape([rows, positions, 1]).cast(x.dtype());
    x + noise * real
}

/// What the forward pass keeps of a trainable layer for backward under checkpointing.
enum Kept {
    /// Its input and post-attention residual: backward recomputes it.
    Recompute { input: Tensor<3>, residual: Tensor<3> },
    /// Its graph, from a detached input to its output.
    Graph { input: Tensor<3>, output: Tensor<3> },
}

/// The halves of a decoder layer, each seeded on its own so that backward can recompute them in
/// either order.
#[derive(Debug, Clone, Copy)]
pub enum Half {
    Attention,
    Mlp,
}

/// The dropout seed of one half of layer `i` in a micro-batch seeded `seed`.
pub fn block_seed(seed: u64, i: usize, half: Half) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(2 * i as u64 + half as u64)
}

/// The batch's tokens, padded or packed, with the rows of the flattened hidden states that
/// predict a supervised token and the tokens they predict.
fn tokens_and_targets(batch: &Batch, padding_free: bool) -> (TokenBatch, Vec<i64>, Vec<i64>) {
    // Packing takes each row's leading real tokens: a batch padded otherwise (on the left, as
    // some callers build them) stays padded, positions and all, as transformers runs it.
    if !padding_free || !batch.right_padded() {
        let (rows, targets) = supervised_rows(&batch.labels, batch.batch, batch.seq);
        let tokens = TokenBatch::Padded {
            shape: [batch.batch, batch.seq],
            input_ids: batch.input_ids.clone(),
            attention_mask: batch.attention_mask.clone(),
        };
        return (tokens, rows, targets);
    }
    let lengths = batch.lengths();
    let (mut input_ids, mut rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (b, &len) in lengths.iter().enumerate() {
        let real = b * batch.seq..b * batch.seq + len;
        let offset = input_ids.len() as i64;
        // Per sequence, so a sequence's last token never predicts the next one's first.
        let (seq_rows, seq_targets) = supervised_rows(&batch.labels[real.clone()], 1, len);
        rows.extend(seq_rows.into_iter().map(|r| r + offset));
        targets.extend(seq_targets);
        input_ids.extend_from_slice(&batch.input_ids[real]);
    }
    (TokenBatch::Packed { lengths, input_ids }, rows, targets)
}

/// Final norm, LM head and `weight ·` mean cross-entropy of `targets` over `last` (the last
/// layer's output at the supervised rows, a fresh leaf). Returns the loss and its gradient
/// w.r.t. `last`; an LM head trained in full gets its gradient added to `grads`, chunk by chunk.
///
/// # Shapes
/// - last, gradient: `[1, targets, hidden]`
fn loss_backward(
    model: &AdaptedModel,
    last: Tensor<3>,
    targets: Vec<i64>,
    weight: f64,
    chunk: usize,
    grads: &mut GradientsAccumulator<AdaptedModel>,
) -> (f64, Tensor<3>) {
    let [_, n, width] = last.dims();
    let selected = model.model.final_norm(last.clone()).reshape([n, width]);
    let chunk = if chunk == 0 { n } else { chunk.min(n) };
    let (mut loss, mut row_grads) = (0f64, Vec::new());
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let leaf = selected.clone().detach().narrow(0, start, len).require_grad();
        let logits = model.logits(leaf.clone().reshape([1, len, width]));
        let chunk_loss = nll_sum(logits, targets[start..start + len].to_vec()).mul_scalar(weight / n as f64);
        loss += chunk_loss.clone().into_scalar::<f32>() as f64;
        let mut chunk_grads = chunk_loss.backward();
        row_grads.push(leaf.grad_remove(&mut chunk_grads).expect("a chunk's rows have a gradient"));
        grads.accumulate(model, GradientsParams::from_grads(chunk_grads, model));
    }
    let mut norm_grads = (selected * Tensor::cat(row_grads, 0)).sum().backward();
    let grad = last.grad_remove(&mut norm_grads).expect("the last layer's output has a gradient");
    (loss, grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::{DType, Int, TensorData};
    use ember_adapters::Method;
    use ember_adapters::adaption::AdaptionConfig;
    use ember_adapters::dora::DoraConfig;
    use ember_adapters::ia3::Ia3Config;
    use ember_adapters::lora::{BiasTraining, LoraConfig, Target};
    use ember_adapters::prefix::PrefixConfig;
    use ember_adapters::prompt_tuning::PromptTuningConfig;
    use ember_models::nf4::Quantization;
    use ember_models::{BaseModel, ModelConfig};
    use serde_json::json;

    use crate::loss::{IGNORE_INDEX, causal_lm_loss};

    /// The device RNG is global: tests that seed it (dropout, synthetic weights) run one at a time.
    static SEEDED_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn configs() -> Vec<ModelConfig> {
        let llama = json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97});
        let chatglm = json!({"model_type": "chatglm", "num_layers": 3, "padded_vocab_size": 97, "hidden_size": 32,
            "ffn_hidden_size": 48, "kv_channels": 8, "num_attention_heads": 4, "seq_length": 64, "layernorm_epsilon": 1e-5,
            "rmsnorm": true, "add_bias_linear": false, "add_qkv_bias": true, "multi_query_attention": true,
            "multi_query_group_num": 2, "original_rope": true});
        [llama, chatglm].iter().map(|j| ModelConfig::from_json(j, std::path::Path::new("config.json")).unwrap()).collect()
    }

    fn methods() -> Vec<Method> {
        let lora_config = |dropout, target, layers| LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            use_rslora: false,
            target,
            exclude: Default::default(),
            layers_to_transform: layers,
            modules_to_save: Vec::new(),
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            bias: BiasTraining::None,
            lora_bias: false,
            trainable_token_indices: None,
            init: Default::default(),
        };
        let lora = |dropout, target, layers| Method::Lora(lora_config(dropout, target, layers));
        let mlp = Target::Suffixes(["gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h"].map(String::from).to_vec());
        vec![
            lora(0.0, Target::AllLinear, None),
            // Dropout: the recomputed layers must draw the forward pass's masks.
            lora(0.2, Target::AllLinear, None),
            // Only the top layer: backward stops there.
            lora(0.0, Target::AllLinear, Some(vec![2])),
            // Only the top layer's MLP: nothing to recompute in its attention.
            lora(0.0, mlp, Some(vec![2])),
            // Branches on the top layer, every bias trained (ChatGLM's q/k/v): backward goes down
            // to layer 0 for the biases alone.
            Method::Lora(LoraConfig { bias: BiasTraining::All, lora_bias: true, ..lora_config(0.0, Target::AllLinear, Some(vec![2])) }),
            Method::Prefix(PrefixConfig { num_virtual_tokens: 3, prefix_projection: false, encoder_hidden_size: None }),
            Method::Prefix(PrefixConfig { num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: Some(16) }),
            Method::Adaption(AdaptionConfig { adapter_len: 2, adapter_layers: 2 }),
            Method::Dora(DoraConfig(lora_config(0.0, Target::AllLinear, None))),
            Method::Ia3(Ia3Config { target: Target::AllLinear, feedforward: Target::Suffixes(vec!["down_proj".into(), "dense_4h_to_h".into()]), exclude: Default::default() }),
            Method::PromptTuning(PromptTuningConfig { num_virtual_tokens: 3, init_text: None }),
        ]
    }

    /// Two right-padded sequences with masked prompts.
    fn batch() -> Batch {
        let (batch, seq) = (2, 9);
        let input_ids: Vec<i64> = (0..batch * seq).map(|i| (i * 31 % 90 + 1) as i64).collect();
        let attention_mask = [vec![1; 9], [vec![1; 6], vec![0; 3]].concat()].concat();
        let labels: Vec<i64> = (0..batch * seq)
            .map(|i| if i % seq < 3 || attention_mask[i] == 0 { IGNORE_INDEX } else { input_ids[i] })
            .collect();
        Batch { batch, seq, input_ids, attention_mask, labels }
    }

    /// Every trainable parameter's gradient, in visiting order.
    fn gradients(model: &AdaptedModel, grads: burn::optim::GradientsParams) -> Vec<Vec<f32>> {
        struct Collect<'a>(&'a burn::optim::GradientsParams, Vec<Vec<f32>>);
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.0.get::<D>(param.id) {
                    self.1.push(g.into_data().try_to_vec::<f32>().unwrap());
                }
            }
        }
        let mut collect = Collect(&grads, Vec::new());
        model.visit(&mut collect);
        collect.1
    }

    fn run(model: &AdaptedModel, memory: StepOptions, device: &Device) -> (f64, Vec<Vec<f32>>) {
        run_on(model, &batch(), memory, device)
    }

    fn run_on(model: &AdaptedModel, batch: &Batch, memory: StepOptions, device: &Device) -> (f64, Vec<Vec<f32>>) {
        let mut grads = GradientsAccumulator::new();
        let loss = forward_backward(model, batch, 0.5, memory, None, 7, device, &mut grads).unwrap();
        (loss, gradients(model, grads.grads()))
    }

    /// Checkpointing changes memory only: the same loss and bit-identical gradients, for every
    /// method on both families, with and without dropout. Chunking the loss and packing the
    /// batch change GEMM shapes, hence float rounding, and nothing else.
    #[test]
    fn checkpointing_gives_identical_gradients_chunking_and_packing_the_same_up_to_rounding() {
        let _rng = SEEDED_RNG.lock().unwrap();
        let device = Device::flex().autodiff();
        // Frozen weights in f32, in bf16 and in NF4: each rebuilds its product's backward its own way.
        let bases = [(DType::F32, None), (DType::BF16, None), (DType::F32, Some(Quantization::Nf4 { double_quant: true }))];
        for config in configs() {
            for method in methods() {
                for (dtype, quantization) in bases {
                    let base = BaseModel::synthetic(config.clone(), dtype, quantization, 3, &device);
                    let mut model = method.config().init(base, 5, &device).unwrap();
                    // Non-zero LoRA B and gates, so every parameter has a non-trivial gradient.
                    let mut grads = GradientsAccumulator::new();
                    forward_backward(&model, &batch(), 1.0, StepOptions::default(), None, 1, &device, &mut grads).unwrap();
                    model = burn::optim::AdamConfig::new().init().step(1e-2, model, grads.grads());

                    let what = |options: StepOptions| format!("{:?} {dtype:?} {quantization:?} {method} {options:?}", config.architecture);
                    let dropout = method.config().dropout() > 0.0;
                    let mut reference = None;
                    for padding_free in [false, true] {
                        for chunk in [0, 4] {
                            let stored = StepOptions { checkpoint_every: 0, loss_chunk_tokens: chunk, padding_free };
                            let (loss, expected) = run(&model, stored, &device);
                            assert!(!expected.is_empty() && expected.iter().flatten().any(|g| *g != 0.0), "{}: no gradient", what(stored));
                            // Every layer recomputed, and one in two (the others keeping their graph).
                            for every in [1, 2] {
                                let recomputed = StepOptions { checkpoint_every: every, ..stored };
                                let (other_loss, other) = run(&model, recomputed, &device);
                                assert_eq!(loss, other_loss, "{}", what(recomputed));
                                assert_eq!(expected, other, "{}: gradients differ", what(recomputed));
                            }

                            // Packing draws other dropout masks; without dropout it changes rounding only.
                            if dropout && padding_free {
                                continue;
                            }
                            let (reference_loss, reference) = reference.get_or_insert_with(|| (loss, expected.clone()));
                            assert!((*reference_loss - loss).abs() < 1e-6, "{}: loss {reference_loss} vs {loss}", what(stored));
                            for (a, b) in reference.iter().zip(&expected) {
                                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                                let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                                assert!(worst <= 1e-5 * scale, "{}: gradient differs by {worst} (scale {scale})", what(stored));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The staged backward equals one backward of transformers' loss through the whole model,
    /// for right-padded rows and for left-padded ones (which are not packed).
    #[test]
    fn staged_backward_matches_a_single_backward() {
        let _rng = SEEDED_RNG.lock().unwrap();
        let device = Device::flex().autodiff();
        let config = configs().remove(0);
        let method = Method::Prefix(PrefixConfig { num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: Some(16) });
        let model = method.config().init(BaseModel::synthetic(config, DType::F32, None, 3, &device), 5, &device).unwrap();
        let right = batch();
        let mut left = right.clone();
        for values in [&mut left.input_ids, &mut left.attention_mask, &mut left.labels] {
            values[right.seq..].rotate_right(3);
        }
        assert!(right.right_padded() && !left.right_padded());
        for b in [right, left] {
            staged_matches_single(&model, b, &device);
        }
    }

    fn staged_matches_single(model: &AdaptedModel, b: Batch, device: &Device) {
        let shape = [b.batch, b.seq];
        let ids = Tensor::<2, Int>::from_data(TensorData::new(b.input_ids.clone(), shape), device);
        let mask = Tensor::<2, Int>::from_data(TensorData::new(b.attention_mask.clone(), shape), device);
        let loss = causal_lm_loss(model.hidden_states(ids, Some(mask)), &b.labels, |h| model.logits(h)).unwrap().mul_scalar(0.5);
        let expected_loss = loss.clone().into_scalar::<f32>() as f64;
        let expected = gradients(model, burn::optim::GradientsParams::from_grads(loss.backward(), model));
        let (staged_loss, staged) = run_on(model, &b, StepOptions { checkpoint_every: 1, loss_chunk_tokens: 4, padding_free: true }, device);
        assert!((expected_loss - staged_loss).abs() < 1e-6, "{expected_loss} vs {staged_loss}");
        assert_eq!(expected.len(), staged.len());
        for (a, b) in expected.iter().zip(&staged) {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-5 * scale, "gradient differs by {worst} (scale {scale})");
        }
    }

    /// NEFTune's noise: within ±alpha/√(L·d), uniform (standard deviation m/√3), none on prompt
    /// tuning's virtual positions, padded or packed.
    #[test]
    fn embedding_noise_is_uniform_within_its_magnitude_and_spares_virtual_positions() {
        let _rng = SEEDED_RNG.lock().unwrap();
        let device = Device::flex();
        device.seed(3);
        let (alpha, padded_len, hidden) = (5.0, 50, 64);
        let magnitude = alpha / ((padded_len * hidden) as f64).sqrt();
        let padded = TokenBatch::Padded { shape: [2, padded_len], input_ids: vec![0; 2 * padded_len], attention_mask: vec![1; 2 * padded_len] };
        let noise = with_embedding_noise(Tensor::zeros([2, padded_len, hidden], &device), alpha, padded_len, &padded, 0);
        let values = noise.into_data().try_to_vec::<f32>().unwrap();
        assert!(values.iter().all(|v| (v.abs() as f64) <= magnitude));
        let std = (values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        assert!((std / (magnitude / 3f64.sqrt()) - 1.0).abs() < 0.03, "std {std} for magnitude {magnitude}");

        let packed = TokenBatch::Packed { lengths: vec![4, 6], input_ids: vec![0; 10] };
        for (tokens, rows, positions) in [(packed, 1, 10), (TokenBatch::Padded { shape: [2, 5], input_ids: vec![0; 10], attention_mask: vec![1; 10] }, 2, 5)] {
            let noise = with_embedding_noise(Tensor::zeros([rows, positions, hidden], &device), alpha, 5, &tokens, 2);
            let starts: Vec<usize> = match &tokens {
                TokenBatch::Packed { .. } => vec![0, 4],
                TokenBatch::Padded { .. } => vec![0, 5],
            };
            let values = noise.reshape([rows * positions, hidden]).into_data().try_to_vec::<f32>().unwrap();
            for (position, row) in values.chunks(hidden).enumerate() {
                let is_virtual = starts.iter().any(|&start| (start..start + 2).contains(&position));
                assert_eq!(is_virtual, row.iter().all(|v| *v == 0.0), "position {position} of {tokens:?}");
            }
        }
    }

    /// With NEFTune on, a step is as deterministic as without: checkpointing recomputes the
    /// layers from the noisy embeddings of the forward pass, so gradients stay bit-identical.
    #[test]
    fn embedding_noise_is_drawn_once_per_step() {
        let _rng = SEEDED_RNG.lock().unwrap();
        let device = Device::flex().autodiff();
        let config = configs().remove(0);
        let run_noisy = |model: &AdaptedModel, options: StepOptions, alpha: Option<f64>| {
            let mut grads = GradientsAccumulator::new();
            let loss = forward_backward(model, &batch(), 1.0, options, alpha, 7, &device, &mut grads).unwrap();
            (loss, gradients(model, grads.grads()))
        };
        for method in [methods().remove(0), Method::PromptTuning(PromptTuningConfig { num_virtual_tokens: 3, init_text: None })] {
            let base = BaseModel::synthetic(config.clone(), DType::F32, None, 3, &device);
            let model = method.config().init(base, 5, &device).unwrap();
            let stored = StepOptions::default();
            let noisy = run_noisy(&model, stored, Some(5.0));
            assert_ne!(noisy.0, run_noisy(&model, stored, None).0, "{method}: the noise changes the loss");
            assert_eq!(noisy, run_noisy(&model, StepOptions { checkpoint_every: 1, ..stored }, Some(5.0)), "{method}");
        }
    }
}
