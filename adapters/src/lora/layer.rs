//! The LoRA branch beside a frozen base projection.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand_distr::{Distribution, Normal};
use ember_models::Projection;
use ember_models::fused::{low_rank, low_rank_onto, matmul};
use ember_models::layers::{Linear, output_surrogate};
use rand::Rng;
use rand::rngs::StdRng;

use super::{LoraConfig, LoraInit};
use crate::registry::ProjectionBranch;

/// The trainable part: `s · (dropout(x) Aᵀ Bᵀ + b)`, `b` only under PEFT's `lora_bias`.
#[derive(Module, Debug)]
pub struct LoraBranch {
    /// `[r, in]`, PEFT's `lora_A.weight`.
    pub lora_a: Param<Tensor<2>>,
    /// `[out, r]`, PEFT's `lora_B.weight`.
    pub lora_b: Param<Tensor<2>>,
    /// `[out]`, PEFT's `lora_B.bias`.
    pub lora_b_bias: Option<Param<Tensor<1>>>,
    pub scale: f64,
    pub dropout: Dropout,
    /// `(A₀, B₀)` where the start was taken out of the base weight (PiSSA, OLoRA): the saved
    /// adapter is `s·(BA − B₀A₀)` on the original base.
    #[module(skip)]
    pub start: Option<(TensorData, TensorData)>,
}

impl LoraBranch {
    /// A as PEFT's Kaiming-uniform(a=√5), i.e. U(-1/√in, 1/√in), or N(0, 1/r²) under
    /// `gaussian`; B (and its bias) zero.
    pub fn init(name: &str, base: &Linear, config: &LoraConfig, rng: &mut StdRng, device: &Device) -> Self {
        Self::init_for([base.out_features(), base.in_features()], name, config, rng, device)
    }

    /// [`Self::init`] for a weight of shape `[out, in]`.
    pub fn init_for([fan_out, fan_in]: [usize; 2], name: &str, config: &LoraConfig, rng: &mut StdRng, device: &Device) -> Self {
        let r = config.rank_of(name);
        let a: Vec<f32> = match config.init {
            LoraInit::Gaussian => {
                let normal = Normal::new(0.0, 1.0 / r as f64).expect("a positive deviation");
                (0..r * fan_in).map(|_| normal.sample(rng) as f32).collect()
            }
            _ => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..r * fan_in).map(|_| rng.random_range(-bound..bound) as f32).collect()
            }
        };
        let a = Tensor::from_data(TensorData::new(a, [r, fan_in]), device);
        let b = Tensor::zeros([fan_out, r], device);
        Self::from_tensors(a, b, config.scale_of(name), config.dropout).with_zero_bias_if(config.lora_bias)
    }

    pub fn from_tensors(lora_a: Tensor<2>, lora_b: Tensor<2>, scale: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            lora_b_bias: None,
            scale,
            dropout: DropoutConfig::new(dropout).init(),
            start: None,
        }
    }

    /// A branch that starts at `(A₀, B₀)` taken out of the base weight, kept for the saved
    /// adapter's conversion.
    pub fn from_start(lora_a: Tensor<2>, lora_b: Tensor<2>, config: &LoraConfig, name: &str) -> Self {
        let start = Some((lora_a.clone().into_data(), lora_b.clone().into_data()));
        Self { start, ..Self::from_tensors(lora_a, lora_b, config.scale_of(name), config.dropout) }.with_zero_bias_if(config.lora_bias)
    }

    /// The branch with a zero bias on B where `lora_bias` asks for one: B·x + b starts as B·x.
    fn with_zero_bias_if(self, lora_bias: bool) -> Self {
        if !lora_bias {
            return self;
        }
        let out = self.lora_b.shape().dims::<2>()[0];
        let device = self.lora_b.val().device();
        self.with_bias(Tensor::zeros([out], &device))
    }

    /// `(A, B)` as saved on the original base: the branch's own, or `([A; A₀], [B, −B₀])` (rank
    /// 2r) for a start taken out of the base, as PEFT's `subtract_mutated_init`.
    pub fn saved_factors(&self) -> (Tensor<2>, Tensor<2>) {
        let (a, b) = (self.lora_a.val(), self.lora_b.val());
        match &self.start {
            None => (a, b),
            Some((a0, b0)) => {
                let device = a.device();
                let a0 = Tensor::from_data(a0.clone(), (&device, DType::F32));
                let b0 = Tensor::<2>::from_data(b0.clone(), (&device, DType::F32));
                (Tensor::cat(vec![a, a0], 0), Tensor::cat(vec![b, b0.neg()], 1))
            }
        }
    }

    /// The branch with B's bias `[out]` (PEFT's `lora_bias`).
    pub fn with_bias(self, bias: Tensor<1>) -> Self {
        Self { lora_b_bias: Some(Param::from_tensor(bias)), ..self }
    }

    /// `y + s·b` where B has a bias.
    fn plus_bias(&self, y: Tensor<3>) -> Tensor<3> {
        match &self.lora_b_bias {
            Some(bias) => {
                let out = bias.shape().dims::<1>()[0];
                let dtype = y.dtype();
                y + bias.val().mul_scalar(self.scale).cast(dtype).reshape([1, 1, out])
            }
            None => y,
        }
    }

    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[0]
    }

    /// `s · (x Aᵀ Bᵀ + b)` in f32 (the branch computes in its own dtype under a bf16/f16 base, as
    /// PEFT does); `x` has been through the branch's dropout.
    ///
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    pub fn delta(&self, x: Tensor<3>) -> Tensor<3> {
        if let Some(delta) = low_rank(&x, &self.lora_a.val(), &self.lora_b.val(), self.scale) {
            return self.plus_bias(delta);
        }
        let [b, s, i] = x.dims();
        let out = self.lora_b.shape().dims::<2>()[0];
        let h = x.cast(DType::F32).reshape([b * s, i]);
        // b·s,in -> b·s,r -> b·s,out: never an in×out matrix.
        let down = matmul(h, self.lora_a.val().transpose());
        self.plus_bias(matmul(down, self.lora_b.val().transpose()).mul_scalar(self.scale).reshape([b, s, out]))
    }

    /// `s·B·A`, `[out, in]` in f32.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.lora_b.val().matmul(self.lora_a.val()).mul_scalar(self.scale)
    }
}

impl ProjectionBranch for LoraBranch {
    fn forward(&self, base: &Linear, x: Tensor<3>) -> Tensor<3> {
        let y = base.forward(x.clone());
        let x = self.dropout.forward(x);
        match low_rank_onto(y, &x, &self.lora_a.val(), &self.lora_b.val(), self.scale) {
            Ok(sum) => self.plus_bias(sum),
            Err(y) => {
                let dtype = y.dtype();
                y + self.delta(x).cast(dtype)
            }
        }
    }

    /// The base's surrogate (no frozen forward) plus the branch's own, as [`Self::forward`] adds them.
    fn surrogate(&self, base: &Linear, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        let branch = output_surrogate(self.delta(self.dropout.forward(x.clone())).cast(grad.dtype()), grad);
        base.surrogate(x, grad) + branch
    }

    /// `W + s·B·A`, and the bias plus `s·b` (in memory a bias-free base gets one).
    fn merged(self, base: Linear) -> Linear {
        let weight = base.dense_weight();
        let merged = (weight.clone().cast(DType::F32) + self.delta_weight()).cast(weight.dtype());
        let shift = self.lora_b_bias.map(|b| b.val().mul_scalar(self.scale));
        let bias = match (base.bias.map(|b| b.val()), shift) {
            (Some(bias), Some(shift)) => Some((bias.clone().cast(DType::F32) + shift).cast(bias.dtype())),
            (bias, shift) => bias.or(shift),
        };
        Linear::new(merged, bias)
    }

    /// B zero, or still the start taken out of the base.
    fn leaves_base_unchanged(&self) -> bool {
        let zero = |t: Tensor<1>| t.abs().max().into_scalar::<f32>() == 0.0;
        let product_unchanged = match &self.start {
            None => zero(self.lora_b.val().flatten(0, 1)),
            Some((a0, b0)) => self.lora_a.val().into_data() == *a0 && self.lora_b.val().into_data() == *b0,
        };
        product_unchanged && self.lora_b_bias.as_ref().is_none_or(|b| zero(b.val()))
    }
}
