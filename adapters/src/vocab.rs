//! LoRA branches on the token embedding and the LM head, as PEFT puts them there when
//! `target_modules` names them: a `lora.Embedding`, `E[x] + s · Aᵀ[x] Bᵀ`, and a `lora.Linear`
//! on the head, `h Wᵀ + s · dropout(h) Aᵀ Bᵀ`; and PEFT's trainable tokens, rows of the embedding
//! that train (`trainable_token_indices`). All stay beside the frozen weights, as every LoRA
//! branch does.

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor, TensorData};
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

/// PEFT's trainable tokens (`trainable_token_indices`): the embedding's rows at `indices`
/// replaced by trained values (its `token_adapter.trainable_tokens_delta`, which holds the rows,
/// not a difference). Where the LM head is tied to the embedding its rows change too, as PEFT's
/// tied adapter does.
#[derive(Module, Debug)]
pub struct TrainableTokens {
    /// `[n, hidden]` f32, starting as the embedding's rows.
    pub values: Param<Tensor<2>>,
    #[module(skip)]
    pub indices: Vec<usize>,
    #[module(skip)]
    pub tied_head: bool,
}

impl TrainableTokens {
    pub fn new(values: Tensor<2>, indices: Vec<usize>, tied_head: bool) -> Self {
        Self { values: Param::from_tensor(values), indices, tied_head }
    }

    /// What the trained rows add to the frozen ones, `values − W[rows]`, f32 `[n, hidden]`.
    fn shift(&self, weight: &Tensor<2>, rows: Tensor<1, Int>) -> Tensor<2> {
        self.values.val() - weight.clone().select(0, rows).cast(DType::F32)
    }

    /// `x` with the embeddings of the trained tokens replaced.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (the embeddings of `ids` from `weight`, `[vocab, hidden]`)
    pub fn embed(&self, x: Tensor<3>, ids: Tensor<2, Int>, weight: &Tensor<2>) -> Tensor<3> {
        let ([b, s], [_, hidden], n) = (ids.dims(), weight.dims(), self.indices.len());
        let rows = token_rows(&self.indices, &ids.device());
        // b·s,n: which trained token each position holds, if any.
        let hits = ids.reshape([b * s, 1]).expand([b * s, n]).equal(rows.clone().reshape([1, n]).expand([b * s, n])).float();
        let dtype = x.dtype();
        x + hits.matmul(self.shift(weight, rows)).reshape([b, s, hidden]).cast(dtype)
    }

    /// `logits` with a tied head's columns of the trained tokens replaced: `h · shiftᵀ` added
    /// there.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`; logits: `[batch, seq, vocab]`
    pub fn logits(&self, logits: Tensor<3>, hidden: Tensor<3>, weight: &Tensor<2>) -> Tensor<3> {
        if !self.tied_head {
            return logits;
        }
        let ([b, s, h], n) = (hidden.dims(), self.indices.len());
        let (dtype, rows) = (logits.dtype(), token_rows(&self.indices, &hidden.device()));
        let extra = hidden.cast(DType::F32).reshape([b * s, h]).matmul(self.shift(weight, rows.clone()).transpose()).reshape([b, s, n]).cast(dtype);
        logits.select_assign(2, rows, extra, IndexingUpdateOp::Add)
    }
}

/// Token ids as the index tensor `select` takes.
pub(crate) fn token_rows(indices: &[usize], device: &Device) -> Tensor<1, Int> {
    let rows: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(rows, [indices.len()]), device)
}

/// The branches on the embedding and the LM head a model carries, and its trainable tokens.
#[derive(Module, Debug)]
pub struct VocabBranches {
    pub embedding: Option<EmbeddingBranch>,
    pub head: Option<LoraBranch>,
    pub tokens: Option<TrainableTokens>,
}

impl VocabBranches {
    /// `x + s · Aᵀ[ids] Bᵀ` when the embedding has a branch, with the trained tokens' rows.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` (the base's embeddings of `ids` from `weight`)
    pub fn embed(&self, x: Tensor<3>, ids: Tensor<2, Int>, weight: &Tensor<2>) -> Tensor<3> {
        let x = match &self.tokens {
            Some(tokens) => tokens.embed(x, ids.clone(), weight),
            None => x,
        };
        match &self.embedding {
            Some(branch) => {
                let dtype = x.dtype();
                x + branch.delta(ids).cast(dtype)
            }
            None => x,
        }
    }

    /// `logits + s · dropout(hidden) Aᵀ Bᵀ` when the head has a branch, and the trained tokens'
    /// columns of a head tied to `weight`, the embedding.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`; logits: `[batch, seq, vocab]`
    pub fn logits(&self, logits: Tensor<3>, hidden: Tensor<3>, weight: &Tensor<2>) -> Tensor<3> {
        let logits = match &self.tokens {
            Some(tokens) => tokens.logits(logits, hidden.clone(), weight),
            None => logits,
        };
        match &self.head {
            Some(branch) => {
                let dtype = logits.dtype();
                logits + branch.delta(branch.dropout.forward(hidden)).cast(dtype)
            }
            None => logits,
        }
    }

    /// Every branch still leaves the model at the base (embedding A, head B all zero) and no
    /// token trains.
    pub fn leaves_base_unchanged(&self) -> bool {
        let embedding_unchanged = |e: &EmbeddingBranch| e.lora_a.val().abs().max().into_scalar::<f32>() == 0.0;
        self.tokens.is_none()
            && self.embedding.as_ref().is_none_or(embedding_unchanged)
            && self.head.as_ref().is_none_or(ProjectionBranch::leaves_base_unchanged)
    }
}
