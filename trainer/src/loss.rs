//! The causal-LM loss exactly as transformers computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};
use ember_models::Rows;

/// Label value of positions that carry no loss (prompt tokens, padding), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy over every supervised token of the batch: position `t` predicts
/// `labels[t + 1]`; labels equal to [`IGNORE_INDEX`] are skipped. Returns `None` when the batch
/// has no supervised token.
///
/// Only the hidden states of supervised positions go through `head` (the LM head): the prompt
/// and the padding, often most of an Alpaca batch, never cost the `[tokens, vocab]` GEMM, its
/// gradient, or the f32 log-softmax buffers. The result is the masked mean of transformers.
///
/// # Shapes
/// - hidden: `[batch, seq, hidden]` (final-norm hidden states)
/// - labels: `batch · seq` values, row-major
/// - head: `[1, n, hidden] -> [1, n, vocab]`
/// - output: `[1]`
pub fn causal_lm_loss(hidden: Tensor<3>, labels: &[i64], head: impl FnOnce(Tensor<3>) -> Tensor<3>) -> Option<Tensor<1>> {
    let [batch, seq, _] = hidden.dims();
    let (rows, targets) = supervised_rows(labels, batch, seq);
    let n = rows.len();
    if n == 0 {
        return None;
    }
    let logits = head(Rows::new(&rows, &hidden.device()).select(hidden));
    Some(nll_sum(logits, targets).div_scalar(n as f64))
}

/// Summed negative log-likelihood of `targets` under `logits`, one target per position.
/// The log-softmax is f32 whatever the model's dtype, as transformers upcasts logits for the loss.
///
/// # Shapes
/// - logits: `[1, n, vocab]`
/// - output: `[1]`
pub fn nll_sum(logits: Tensor<3>, targets: Vec<i64>) -> Tensor<1> {
    let [_, n, vocab] = logits.dims();
    let logits = logits.reshape([n, vocab]);
    if let Some(total) = ember_models::fused::cross_entropy_sum(&logits, &targets) {
        return total;
    }
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &logits.device());
    log_softmax(logits.cast(DType::F32), 1).gather(1, targets).sum().neg()
}

/// The positions that predict a supervised token, as rows of the flattened `[batch · seq]`
/// hidden states, and the token each predicts: position `t` predicts `labels[t + 1]`.
pub fn supervised_rows(labels: &[i64], batch: usize, seq: usize) -> (Vec<i64>, Vec<i64>) {
    assert_eq!(labels.len(), batch * seq, "labels must be [batch, seq]");
    (0..batch)
        .flat_map(|b| (0..seq.saturating_sub(1)).map(move |t| (b * seq + t, labels[b * seq + t + 1])))
        .filter(|&(_, label)| label != IGNORE_INDEX)
        .map(|(row, label)| (row as i64, label))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The same number as the plain masked mean over every position's logits.
    #[test]
    fn equals_the_masked_mean_over_all_positions() {
        let device = Device::flex();
        let (batch, seq, width, vocab) = (2, 5, 3, 7);
        let hidden = Tensor::<3>::from_data(TensorData::new((0..batch * seq * width).map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0).collect(), [batch, seq, width]), &device);
        let head = Tensor::<2>::from_data(TensorData::new((0..width * vocab).map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0).collect(), [width, vocab]), &device);
        let labels = [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 6, IGNORE_INDEX, 1, IGNORE_INDEX, 2, IGNORE_INDEX];
        let project = |h: Tensor<3>| {
            let [b, s, w] = h.dims();
            h.reshape([b * s, w]).matmul(head.clone()).reshape([b, s, vocab])
        };
        let loss = causal_lm_loss(hidden.clone(), &labels, project).unwrap().into_scalar::<f32>();
        let log_probs = log_softmax(project(hidden).reshape([batch * seq, vocab]), 1).into_data().try_to_vec::<f32>().unwrap();
        let (mut total, mut count) = (0f32, 0);
        for b in 0..batch {
            for t in 0..seq - 1 {
                let label = labels[b * seq + t + 1];
                if label != IGNORE_INDEX {
                    total -= log_probs[(b * seq + t) * vocab + label as usize];
                    count += 1;
                }
            }
        }
        assert!((loss - total / count as f32).abs() < 1e-6, "{loss} vs {}", total / count as f32);
        assert!(causal_lm_loss(Tensor::<3>::zeros([1, 2, width], &device), &[IGNORE_INDEX, IGNORE_INDEX], project).is_none());
    }
}
