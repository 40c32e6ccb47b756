//! Attention on LibTorch through its own scaled-dot-product attention, which picks a fused
//! kernel for the device (flash attention on the CPU, memory-efficient attention with a bias on
//! CUDA) and never materializes the `[batch, heads, seq, keys]` probabilities that burn's composed
//! ops keep for backward. Its backward is LibTorch's as well: the forward runs on detached leaves
//! with LibTorch's autograd on, and backward asks that graph for the leaves' gradients.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};

/// `softmax(q kᵀ · scale + bias) v` with LibTorch's fused attention, or `None` where it does
/// not apply (not LibTorch, f16, or `EMBER_FUSED=0`); then the caller composes it from burn ops.
/// `bias: None` is the plain causal mask over as many keys as queries (a packed sequence without
/// a prefix): LibTorch then skips the masked blocks, and on CUDA may use flash attention, which
/// takes no mask tensor.
///
/// f16 stays composed: its most negative value cannot hold the f32 mask of a padded row.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`
/// - k, v: `[batch, kv_heads, keys, head_dim]`, `heads` a multiple of `kv_heads`
/// - bias: `[batch, 1, seq, keys]`
/// - output: `[batch, heads, seq, head_dim]`
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bias: Option<&Tensor<4>>, scale: f64) -> Option<Tensor<4>> {
    let applies = super::enabled()
        && matches!(q.dtype(), DType::F32 | DType::BF16)
        && matches!(q.device().inner().as_dispatch(), DispatchDevice::LibTorch(_));
    applies.then(|| {
        let [q, k, v] = [q, k, v].map(|t| t.clone().into_dispatch());
        Tensor::from_dispatch(match bias {
            Some(bias) => <Dispatch as TorchAttentionOps>::torch_attention(q, k, v, bias.clone().into_dispatch(), scale),
            None => <Dispatch as TorchAttentionOps>::torch_causal_attention(q, k, v, scale),
        })
    })
}

#[backend_extension(LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait TorchAttentionOps: Backend {
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
    fn torch_causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
}

/// LibTorch's attention with grouped K/V heads: head `h` reads K/V group `h / (heads / kv_heads)`,
/// as transformers' `repeat_kv`. No bias: causal.
fn sdpa(q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor, bias: Option<&tch::Tensor>, scale: f64) -> tch::Tensor {
    // A padded query's row is all f32::MIN, which rounds to -inf in bf16 (and a row of -inf
    // is NaN); bf16's most negative finite value is as good a zero probability.
    let bias = bias.map(|b| b.clamp_min(f64::from(half::bf16::MIN)).to_kind(q.kind()));
    let grouped = q.size()[1] != k.size()[1];
    tch::Tensor::scaled_dot_product_attention(q, k, v, bias.as_ref(), 0.0, bias.is_none(), scale, grouped)
}

impl TorchAttentionOps for LibTorch {
    fn torch_attention(q: TchTensor, k: TchTensor, v: TchTensor, bias: TchTensor, scale: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| sdpa(&q.tensor, &k.tensor, &v.tensor, Some(&bias.tensor), scale)))
    }

    fn torch_causal_attention(q: TchTensor, k: TchTensor, v: TchTensor, scale: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| sdpa(&q.tensor, &k.tensor, &v.tensor, None, scale)))
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

impl<C: CheckpointStrategy> TorchAttentionOps for Autodiff<LibTorch, C> {
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        tracked_attention::<C>(q, k, v, Some(bias.into_primitive()), scale)
    }

    fn torch_causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        tracked_attention::<C>(q, k, v, None, scale)
    }
}

/// [`sdpa`] under burn's autodiff: with LibTorch's graph kept for backward where an input is
/// tracked.
fn tracked_attention<C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<LibTorch, C>>,
    k: FloatTensor<Autodiff<LibTorch, C>>,
    v: FloatTensor<Autodiff<LibTorch, C>>,
    bias: Option<TchTensor>,
    scale: f64,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let prep = TorchAttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
    let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
    let bias = bias.as_ref().map(|b| &b.tensor);
    match prep {
        OpsKind::Tracked(prep) => {
            let leaves = [q, k, v].map(|t| TchTensor::from_existing(t.tensor.detach().set_requires_grad(true), t.storage));
            let output = tch::with_grad(|| sdpa(&leaves[0].tensor, &leaves[1].tensor, &leaves[2].tensor, bias, scale));
            // burn's ops on the output must not grow LibTorch's graph.
            let y = TchTensor::new(output.detach());
            let output = TchTensor::from_existing(output, y.storage.clone());
            prep.finish(TorchGraph { leaves, output }, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(TchTensor::new(tch::no_grad(|| sdpa(&q.tensor, &k.tensor, &v.tensor, bias, scale)))),
    }
}
