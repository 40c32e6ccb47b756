//! What one forward pass is given: a padded or packed batch of tokens, the attention layout built
//! from it once for every layer, and the key/value cache of incremental decoding.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor<4>, Tensor<4>)>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the last `n` positions of every layer.
    pub(crate) fn drop_last(&mut self, n: usize) {
        for (k, v) in &mut self.layers {
            let keep = k.dims()[2] - n;
            *k = k.clone().narrow(2, 0, keep);
            *v = v.clone().narrow(2, 0, keep);
        }
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
pub struct Layout {
    /// The masks of the layers without a sliding window.
    pub full: Masks,
    /// The masks of the sliding-window layers, where the window masks some key of this batch.
    pub windowed: Option<Masks>,
}

/// Attention biases of a batch's rows.
#[derive(Debug, Clone)]
pub enum Masks {
    /// The additive bias `[batch, 1, seq, prefix + seq]` of padded rows.
    Padded(Tensor<4>),
    /// Per packed sequence, its bias `[1, 1, len, prefix + len]`; `causal`: each is the plain
    /// causal mask after the prefix (no window), which fused kernels compute without reading it.
    Packed { biases: Vec<Tensor<4>>, causal: bool },
}
