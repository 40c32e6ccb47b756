//! LoRA branches on the token embedding and the LM head, as PEFT puts them there when
//! `target_modules` names them: a `lora.Embedding`, `E[x] + s · Aᵀ[x] Bᵀ`, and a `lora.Linear`
//! on the head, `h Wᵀ + s · dropout(h) Aᵀ Bᵀ`. Both stay beside the frozen weights, as every
//! LoRA branch does.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::lora::LoraBranch;
use crate::registry::ProjectionBranch;

/// PEFT's `lora_embedding_A` / `lora_embedding_B` of the token embedding.
#[derive(Module, Debug)]
pub struct EmbeddingBranch {
    /// `[r, vocab]`, zero at init.
    pub lora_a: Param<Tensor<2>>,
    /// `[hidden, r]`, N(0, 1) at init.
    pub lora_b: Param<Tensor<2>>,
    pub scale: f64,
}

impl EmbeddingBranch {
    /// PEFT's initialisation of an embedding's LoRA: A zero, B N(0, 1) (the reverse of a
    /// projection's), so the model starts at the base.
    pub fn init(vocab: usize, hidden: usize, r: usize, scale: f64, rng: &mut StdRng, device: &Device) -> Self {
        let normal = Normal::new(0.0f32, 1.0).expect("a positive standard deviation");
        let b: Vec<f32> = (0..hidden * r).map(|_| normal.sample(rng)).collect();
        Self::from_tensors(Tensor::zeros([r, vocab], device), Tensor::from_data(TensorData::new(b, [hidden, r]), device), scale)
    }

    pub fn from_tensors(lora_a: Tensor<2>, lora_b: Tensor<2>, scale: f64) -> Self {
        Self { lora_a: Param::from_tensor(lora_a), lora_b: Param::from_tensor(lora_b), scale }
    }

    /// `s · Aᵀ[ids] Bᵀ` in f32.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn delta(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let hidden = self.lora_b.shape().dims::<2>()[0];
        // The columns of A the ids pick: b·s,r -> b·s,hidden.
        let picked = self.lora_a.val().transpose().select(0, ids.reshape([b * s]));
        picked.matmul(self.lora_b.val().transpose()).mul_scalar(self.scale).reshape([b, s, hidden])
    }
}

/// The branches on the embedding and the LM head a model carries (either or both).
#[derive(Module, Debug)]
pub struct VocabBranches {
    pub embedding: Option<EmbeddingBranch>,
    pub head: Option<LoraBranch>,
}

impl VocabBranches {
    /// `x + s · Aᵀ[ids] Bᵀ` when the embedding has a branch.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (the base's embeddings of `ids`)
    pub fn embed(&self, x: Tensor<3>, ids: Tensor<2, Int>) -> Tensor<3> {
        match &self.embedding {
            Some(branch) => {
                let dtype = x.dtype();
                x + branch.delta(ids).cast(dtype)
            }
            None => x,
        }
    }

    /// `logits + s · dropout(hidden) Aᵀ Bᵀ` when the head has a branch.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`; logits: `[batch, seq, vocab]`
    pub fn logits(&self, logits: Tensor<3>, hidden: Tensor<3>) -> Tensor<3> {
        match &self.head {
            Some(branch) => {
                let dtype = logits.dtype();
                logits + branch.delta(branch.dropout.forward(hidden)).cast(dtype)
            }
            None => logits,
        }
    }

    /// Every branch still leaves the model at the base (embedding A, head B all zero).
    pub fn leaves_base_unchanged(&self) -> bool {
        let embedding_unchanged = |e: &EmbeddingBranch| e.lora_a.val().abs().max().into_scalar::<f32>() == 0.0;
        self.embedding.as_ref().is_none_or(embedding_unchanged) && self.head.as_ref().is_none_or(ProjectionBranch::leaves_base_unchanged)
    }
}
