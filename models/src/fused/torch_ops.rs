//! What LibTorch computes in one operation with its own backward, in place of a chain of burn ops
//! each of which keeps its inputs for backward:
//! - attention, through LibTorch's scaled-dot-product attention, which picks a fused kernel for
//!   the device (flash attention on the CPU, memory-efficient or flash attention on CUDA) and never
//!   materializes the `[batch, heads, seq, keys]` probabilities. Its backward is LibTorch's as
//!   well: the forward runs on detached leaves with LibTorch's autograd on, and backward asks that
//!   graph for the leaves' gradients;
//! - RMSNorm, which keeps `x` in its dtype and one `1/rms` a row instead of an f32 copy of `x`;
//! - SwiGLU, which keeps `gate` and `up` instead of also `silu(gate)`.
//!
//! The last two have hand-written backwards in LibTorch ops. On a bf16 7B model at 4 × 512
//! without checkpointing those copies are about 3.5 GB.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};

/// `softmax(q kᵀ · scale + bias) v` with LibTorch's fused attention, or `None` where it does
/// not apply (not LibTorch, f16, or `EMBER_FUSED=0`); then the caller composes it from burn ops.
/// `causal`: the bias is the plain causal mask over as many keys as queries (a packed sequence
/// without a prefix), so LibTorch gets no mask tensor: it skips the masked blocks, and on CUDA may
/// use flash attention, which takes none.
///
/// f16 stays composed: its most negative value cannot hold the f32 mask of a padded row.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`
/// - k, v: `[batch, kv_heads, keys, head_dim]`, `heads` a multiple of `kv_heads`
/// - bias: `[batch, 1, seq, keys]`
/// - output: `[batch, heads, seq, head_dim]`
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bias: &Tensor<4>, causal: bool, scale: f64) -> Option<Tensor<4>> {
    let applies = on_libtorch(q) && q.dtype() != DType::F16;
    applies.then(|| {
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.clone().into_dispatch());
        Tensor::from_dispatch(<Dispatch as TorchOps>::torch_attention(q, k, v, bias, causal, scale))
    })
}

/// Whether `t` is a float tensor on LibTorch (with or without autodiff) and fused ops are on.
fn on_libtorch<const D: usize>(t: &Tensor<D>) -> bool {
    super::enabled()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && matches!(t.device().inner().as_dispatch(), DispatchDevice::LibTorch(_))
}

/// HF's RMSNorm, `weight · (x / √(mean(x²) + eps))` with the normalization in f32 and its result
/// cast back to `x`'s dtype before the weight, or `None` where it does not apply (not LibTorch, a
/// trained weight).
///
/// # Shapes
/// - x, output: `[batch, seq, hidden]`; weight: `[hidden]`, in `x`'s dtype
pub fn rms_norm(x: &Tensor<3>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<3>> {
    (on_libtorch(x) && !weight.is_require_grad()).then(|| {
        Tensor::from_dispatch(<Dispatch as TorchOps>::torch_rms_norm(x.clone().into_dispatch(), weight.clone().into_dispatch(), eps))
    })
}

/// SwiGLU's `silu(gate) · up`, or `None` where it does not apply (not LibTorch).
///
/// # Shapes
/// - gate, up, output: `[batch, seq, intermediate]`
pub fn swiglu(gate: &Tensor<3>, up: &Tensor<3>) -> Option<Tensor<3>> {
    on_libtorch(gate).then(|| Tensor::from_dispatch(<Dispatch as TorchOps>::torch_swiglu(gate.clone().into_dispatch(), up.clone().into_dispatch())))
}

#[backend_extension(LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait TorchOps: Backend {
    fn torch_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    fn torch_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self>;
}

/// LibTorch's attention with grouped K/V heads: head `h` reads K/V group `h / (heads / kv_heads)`,
/// as transformers' `repeat_kv`. `causal`: LibTorch's own causal mask instead of `bias`.
fn sdpa(q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor, bias: &tch::Tensor, causal: bool, scale: f64) -> tch::Tensor {
    // A padded query's row is all f32::MIN, which rounds to -inf in bf16 (and a row of -inf
    // is NaN); bf16's most negative finite value is as good a zero probability.
    let bias = (!causal).then(|| bias.clamp_min(f64::from(half::bf16::MIN)).to_kind(q.kind()));
    let grouped = q.size()[1] != k.size()[1];
    tch::Tensor::scaled_dot_product_attention(q, k, v, bias.as_ref(), 0.0, bias.is_none(), scale, grouped)
}

/// `(output, 1/rms)` of [`rms_norm`], the latter `[.., 1]` in f32.
fn rms_norm_forward(x: &tch::Tensor, weight: &tch::Tensor, eps: f64) -> (tch::Tensor, tch::Tensor) {
    let x32 = x.to_kind(tch::Kind::Float);
    let inv_rms = (x32.square().mean_dim(-1, true, tch::Kind::Float) + eps).rsqrt();
    ((x32 * &inv_rms).to_kind(x.kind()) * weight, inv_rms)
}

impl TorchOps for LibTorch {
    fn torch_rms_norm(x: TchTensor, weight: TchTensor, eps: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| rms_norm_forward(&x.tensor, &weight.tensor, eps).0))
    }

    fn torch_swiglu(gate: TchTensor, up: TchTensor) -> TchTensor {
        TchTensor::new(tch::no_grad(|| gate.tensor.silu() * &up.tensor))
    }

    fn torch_attention(q: TchTensor, k: TchTensor, v: TchTensor, bias: TchTensor, causal: bool, scale: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| sdpa(&q.tensor, &k.tensor, &v.tensor, &bias.tensor, causal, scale)))
    }
}

/// The forward's LibTorch graph: leaves q, k, v and the output that depends on them. Each shares
/// its storage handle with the tensor burn holds, so burn never writes over what LibTorch's
/// backward reads.
#[derive(Debug, Clone)]
struct TorchGraph {
    leaves: [TchTensor; 3],
    output: TchTensor,
}

#[derive(Debug)]
struct TorchAttentionBackward;

impl Backward<LibTorch, 3> for TorchAttentionBackward {
    type State = TorchGraph;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node);
        let TorchGraph { leaves, output } = ops.state;
        let wanted: Vec<_> = ops.parents.iter().zip(&leaves).filter_map(|(parent, leaf)| parent.as_ref().map(|p| (p.id, leaf))).collect();
        if wanted.is_empty() {
            return;
        }
        let inputs: Vec<_> = wanted.iter().map(|(_, leaf)| &leaf.tensor).collect();
        // Gradients of Σ output · dy: the vector-Jacobian product with dy.
        let surrogate = (&output.tensor * &dy.tensor).sum(output.tensor.kind());
        let input_grads = tch::with_grad(|| tch::Tensor::run_backward(&[surrogate], &inputs, false, false));
        for ((id, _), grad) in wanted.into_iter().zip(input_grads) {
            grads.register::<LibTorch>(id, TchTensor::new(grad));
        }
    }
}

/// Backward of [`rms_norm`] from `x`, the weight and `1/rms`.
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<LibTorch, 1> for RmsNormBackward {
    type State = (TchTensor, TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [Some(node)] = ops.parents else { return };
        let dy = grads.consume::<LibTorch>(&ops.node).tensor;
        let (x, weight, inv_rms) = ops.state;
        let dx = tch::no_grad(|| {
            // d(normed) in f32, then through x̂ = x / rms: (g - x̂ · mean(g · x̂)) / rms.
            let g = (dy * &weight.tensor).to_kind(tch::Kind::Float);
            let x_hat = x.tensor.to_kind(tch::Kind::Float) * &inv_rms.tensor;
            let mean = (&g * &x_hat).mean_dim(-1, true, tch::Kind::Float);
            (g.addcmul(&x_hat, &-mean) * &inv_rms.tensor).to_kind(x.tensor.kind())
        });
        grads.register::<LibTorch>(node.id, TchTensor::new(dx));
    }
}

/// Backward of [`swiglu`] from `gate` and `up`: `silu(gate)` is recomputed.
#[derive(Debug)]
struct SwigluBackward;

impl Backward<LibTorch, 2> for SwigluBackward {
    type State = (TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node).tensor;
        let (gate, up) = ops.state;
        let [node_gate, node_up] = ops.parents;
        tch::no_grad(|| {
            if let Some(node) = node_up {
                grads.register::<LibTorch>(node.id, TchTensor::new(&dy * gate.tensor.silu()));
            }
            if let Some(node) = node_gate {
                grads.register::<LibTorch>(node.id, TchTensor::new(gate.tensor.silu_backward(&(dy * &up.tensor))));
            }
        });
    }
}

impl<C: CheckpointStrategy> TorchOps for Autodiff<LibTorch, C> {
    fn torch_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let prep = RmsNormBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let (y, inv_rms) = tch::no_grad(|| rms_norm_forward(&x.tensor, &weight.tensor, eps));
        super::finish(prep, (x, weight, TchTensor::new(inv_rms)), TchTensor::new(y))
    }

    fn torch_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful();
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        let y = tch::no_grad(|| gate.tensor.silu() * &up.tensor);
        super::finish(prep, (gate, up), TchTensor::new(y))
    }

    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prep = TorchAttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.into_primitive());
        let attend = |q: &TchTensor, k: &TchTensor, v: &TchTensor| sdpa(&q.tensor, &k.tensor, &v.tensor, &bias.tensor, causal, scale);
        match prep {
            // LibTorch's graph kept for backward.
            OpsKind::Tracked(prep) => {
                let leaves = [q, k, v].map(|t| TchTensor::from_existing(t.tensor.detach().set_requires_grad(true), t.storage));
                let output = tch::with_grad(|| attend(&leaves[0], &leaves[1], &leaves[2]));
                // burn's ops on the output must not grow LibTorch's graph.
                let y = TchTensor::new(output.detach());
                let output = TchTensor::from_existing(output, y.storage.clone());
                prep.finish(TorchGraph { leaves, output }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(TchTensor::new(tch::no_grad(|| attend(&q, &k, &v)))),
        }
    }
}
