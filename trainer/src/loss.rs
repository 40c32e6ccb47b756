//! The causal-LM loss exactly as transformers computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};

/// Label value of positions that carry no loss (prompt tokens, padding), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy over every supervised token of the batch: position `t` predicts
/// `labels[t + 1]`; labels equal to [`IGNORE_INDEX`] are skipped. Returns `None` when the batch
/// has no supervised token.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - labels: `batch · seq` values, row-major
/// - output: `[1]`
pub fn causal_lm_loss(logits: Tensor<3>, labels: &[i64]) -> Option<Tensor<1>> {
    let [batch, seq, vocab] = logits.dims();
    assert_eq!(labels.len(), batch * seq, "labels must be [batch, seq]");
    let rows = batch * (seq - 1);
    let mut targets = Vec::with_capacity(rows);
    let mut weights = Vec::with_capacity(rows);
    for b in 0..batch {
        for t in 1..seq {
            let label = labels[b * seq + t];
            let supervised = label != IGNORE_INDEX;
            targets.push(if supervised { label } else { 0 });
            weights.push(if supervised { 1f32 } else { 0f32 });
        }
    }
    let count = weights.iter().filter(|&&w| w > 0.0).count();
    if count == 0 {
        return None;
    }
    let device = logits.device();
    // b,s,v -> b,s-1,v -> b·(s-1),v
    // f32 log-softmax whatever the model's dtype, as transformers upcasts logits for the loss.
    let shifted = logits.narrow(1, 0, seq - 1).reshape([rows, vocab]).cast(DType::F32);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
    let weights = Tensor::<2>::from_data(TensorData::new(weights, [rows, 1]), &device);
    let picked = log_softmax(shifted, 1).gather(1, targets);
    Some((picked * weights).sum().neg().div_scalar(count as f64))
}
