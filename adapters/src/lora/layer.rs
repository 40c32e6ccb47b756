//! The LoRA layer: a frozen base projection plus an optional trainable low-rank branch.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, Device, Tensor, TensorData};
use ember_models::Projection;
use ember_models::layers::Linear;
use rand::Rng;
use rand::rngs::StdRng;

use super::LoraConfig;

/// The trainable part: `s · dropout(x) Aᵀ Bᵀ`.
#[derive(Module, Debug)]
pub struct LoraBranch {
    /// `[r, in]`, PEFT's `lora_A.weight`.
    pub lora_a: Param<Tensor<2>>,
    /// `[out, r]`, PEFT's `lora_B.weight`.
    pub lora_b: Param<Tensor<2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl LoraBranch {
    /// A as PEFT's Kaiming-uniform(a=√5), i.e. U(-1/√in, 1/√in); B zero.
    pub fn init(base: &Linear, config: &LoraConfig, rng: &mut StdRng, device: &Device) -> Self {
        let (r, fan_in, fan_out) = (config.r, base.in_features(), base.out_features());
        let bound = 1.0 / (fan_in as f64).sqrt();
        let a: Vec<f32> = (0..r * fan_in).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let a = Tensor::from_data(TensorData::new(a, [r, fan_in]), device);
        let b = Tensor::zeros([fan_out, r], device);
        Self::from_tensors(a, b, config.scale(), config.dropout)
    }

    pub fn from_tensors(lora_a: Tensor<2>, lora_b: Tensor<2>, scale: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            scale,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[0]
    }
}

/// A base projection with an optional LoRA branch. `name` is the HF module path, the key
/// under which PEFT saves the branch.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora: Option<LoraBranch>,
    #[module(skip)]
    pub name: String,
}

impl LoraLinear {
    pub fn new(name: &str, base: Linear, lora: Option<LoraBranch>) -> Self {
        Self { base, lora, name: name.to_owned() }
    }

    /// The base with `s·B·A` added to its weight, for export.
    pub fn merged(self) -> Linear {
        let Some(branch) = self.lora else { return self.base };
        let delta = branch.lora_b.val().matmul(branch.lora_a.val()).mul_scalar(branch.scale);
        let weight = self.base.weight.val();
        let merged = (weight.clone().cast(delta.dtype()) + delta).cast(weight.dtype());
        Linear::new(merged, self.base.bias.map(|b| b.val()))
    }
}

impl Projection for LoraLinear {
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let Some(branch) = &self.lora else { return self.base.forward(x) };
        let y = self.base.forward(x.clone());
        let [b, s, i] = x.dims();
        // The branch computes in its own dtype (f32) under a bf16/f16 base, as PEFT does.
        let h = branch.dropout.forward(x).cast(DType::F32).reshape([b * s, i]);
        // b·s,in -> b·s,r -> b·s,out: never an in×out matrix.
        let delta = h.matmul(branch.lora_a.val().transpose()).matmul(branch.lora_b.val().transpose());
        let dtype = y.dtype();
        y + delta.mul_scalar(branch.scale).cast(dtype).reshape([b, s, self.base.out_features()])
    }
}
