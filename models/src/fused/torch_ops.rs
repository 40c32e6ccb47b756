//! What LibTorch computes in one operation with its own backward, in place of a chain of burn ops
//! each of which keeps its inputs for backward:
//! - attention, through LibTorch's scaled-dot-product attention, which picks a fused kernel for
//!   the device (flash attention on the CPU, memory-efficient or flash attention on CUDA) and never
//!   materializes the `[batch, heads, seq, keys]` probabilities. Its backward is LibTorch's as
//!   well: the forward runs on detached leaves with LibTorch's autograd on, and backward asks that
//!   graph for the leaves' gradients;
//! - RMSNorm, which keeps `x` in its dtype and one `1/rms` a row instead of an f32 copy of `x`;
//! - SwiGLU, which keeps `gate` and `up` instead of also `silu(gate)`, and leaves them for LoRA's
//!   branch on down_proj to make its input again in backward ([`SwigluOutput`]);
//! - LoRA's branch, which keeps its input in the activations' dtype, shared with every branch
//!   that reads it;
//! - RoPE, which keeps nothing but its tables (backward is the rotation back);
//! - the LM head's cross-entropy, which keeps the logits and one log-sum-exp a row instead of f32
//!   copies of the `[tokens, vocab]` block (the cast, the shifted logits, their exponentials).
//!
//! All but attention have hand-written backwards in LibTorch ops. On a bf16 7B model at 4 × 512
//! without checkpointing the copies RMSNorm and SwiGLU no longer keep are about 3.5 GB.
//!
//! Also here, without a graph: a packed frozen weight made dense in the activations' dtype
//! ([`lookup_and_scale`]) in three kernels.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Int, Tensor};

use super::kernels::Packing;
use super::{Op, PackedBand, RopeTables};
use crate::config::RopePairing;

/// `softmax(q kᵀ · scale + bias) v` with LibTorch's fused attention, or `None` where it does
/// not apply (not LibTorch, or `EMBER_FUSED=0`); then the caller composes it from burn ops.
/// `causal`: the bias is the plain causal mask over as many keys as queries (a packed sequence
/// without a prefix), so LibTorch gets no mask tensor: it skips the masked blocks, and on CUDA may
/// use flash attention, which takes none.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`
/// - k, v: `[batch, kv_heads, keys, head_dim]`, `heads` a multiple of `kv_heads`
/// - bias: `[batch, 1, seq, keys]`
/// - output: `[batch, heads, seq, head_dim]`
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bias: &Tensor<4>, causal: bool, scale: f64) -> Option<Tensor<4>> {
    on_libtorch(Op::Attention, q).then(|| {
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.clone().into_dispatch());
        Tensor::from_dispatch(<Dispatch as TorchOps>::torch_attention(q, k, v, bias, causal, scale))
    })
}

/// Attention of sequences packed into one row, each causal over its own keys after the shared
/// `prefix` keys and values (if any), with LibTorch's fused attention once per sequence, or `None`
/// where it does not apply (not LibTorch, or `EMBER_FUSED` without `attention`). The same as
/// [`attention`] on each sequence's slices with the outputs concatenated, but the gradients come
/// back whole: burn's slices would each add a zero-filled `[1, heads, Σ len, head_dim]` gradient
/// per sequence and input, and its concatenations with the prefix their copies.
///
/// # Shapes
/// - q, output: `[1, heads, Σ len, head_dim]`
/// - k, v: `[1, kv_heads, Σ len, head_dim]`, `heads` a multiple of `kv_heads`
/// - prefix: `[1, kv_heads, prefix, head_dim]` each, in `k`'s dtype
pub fn packed_attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, prefix: Option<(&Tensor<4>, &Tensor<4>)>, lengths: &[usize], scale: f64) -> Option<Tensor<4>> {
    on_libtorch(Op::Attention, q).then(|| {
        let [q, k, v] = [q, k, v].map(|t| t.clone().into_dispatch());
        Tensor::from_dispatch(match prefix {
            None => <Dispatch as TorchOps>::torch_packed_causal_attention(q, k, v, lengths.to_vec(), scale),
            Some((prefix_k, prefix_v)) => {
                let [prefix_k, prefix_v] = [prefix_k, prefix_v].map(|t| t.clone().into_dispatch());
                <Dispatch as TorchOps>::torch_packed_prefix_attention(q, k, v, prefix_k, prefix_v, lengths.to_vec(), scale)
            }
        })
    })
}

/// LoRA's branch `scale · x Aᵀ Bᵀ` in f32 in one LibTorch operation, or `None` where it does not
/// apply (not LibTorch, or `EMBER_FUSED` without `low_rank`). burn's composition (a cast, two
/// reshapes, two transposes, two products and a scaling) is eight graph nodes and about twenty
/// LibTorch calls forward and backward; this is five forward and nine backward (one more each
/// for a cast from bf16).
///
/// # Shapes
/// - x: `[batch, seq, in]`; a: `[rank, in]`, b: `[out, rank]`, both f32
/// - output: `[batch, seq, out]`, f32
pub fn low_rank(x: &Tensor<3>, a: &Tensor<2>, b: &Tensor<2>, scale: f64) -> Option<Tensor<3>> {
    low_rank_applies(x, a, b).then(|| {
        let [x, a, b] = [x.clone().into_dispatch(), a.clone().into_dispatch(), b.clone().into_dispatch()];
        Tensor::from_dispatch(<Dispatch as TorchOps>::torch_low_rank(x, a, b, scale))
    })
}

/// [`super::low_rank_onto`] on LibTorch.
pub fn low_rank_onto(y: Tensor<3>, x: &Tensor<3>, a: &Tensor<2>, b: &Tensor<2>, scale: f64) -> Result<Tensor<3>, Tensor<3>> {
    if !low_rank_applies(x, a, b) {
        return Err(y);
    }
    let [x, a, b] = [x.clone().into_dispatch(), a.clone().into_dispatch(), b.clone().into_dispatch()];
    Ok(Tensor::from_dispatch(<Dispatch as TorchOps>::torch_low_rank_onto(y.into_dispatch(), x, a, b, scale)))
}

/// Whether LoRA's fused branch serves `x` (on LibTorch) with f32 `a` and `b`.
fn low_rank_applies(x: &Tensor<3>, a: &Tensor<2>, b: &Tensor<2>) -> bool {
    on_libtorch(Op::LowRank, x) && a.dtype() == DType::F32 && b.dtype() == DType::F32
}

/// Whether `t` is a float tensor on LibTorch (with or without autodiff) and the fused `op` is on.
fn on_libtorch<const D: usize>(op: Op, t: &Tensor<D>) -> bool {
    super::enabled_for(op)
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
    (on_libtorch(Op::RmsNorm, x) && !weight.is_require_grad()).then(|| {
        Tensor::from_dispatch(<Dispatch as TorchOps>::torch_rms_norm(x.clone().into_dispatch(), weight.clone().into_dispatch(), eps))
    })
}

/// SwiGLU's `silu(gate) · up`, or `None` where it does not apply (not LibTorch).
///
/// # Shapes
/// - gate, up, output: `[batch, seq, intermediate]`
pub fn swiglu(gate: &Tensor<3>, up: &Tensor<3>) -> Option<Tensor<3>> {
    on_libtorch(Op::Swiglu, gate).then(|| Tensor::from_dispatch(<Dispatch as TorchOps>::torch_swiglu(gate.clone().into_dispatch(), up.clone().into_dispatch())))
}

/// Rotary embedding of the first `rotary` dims of every head, in `x`'s dtype as transformers
/// computes it, or `None` where it does not apply (not LibTorch).
///
/// # Shapes
/// - x, output: `[batch, heads, seq, head_dim]`
pub fn rope(x: &Tensor<4>, tables: &RopeTables) -> Option<Tensor<4>> {
    on_libtorch(Op::Rope, x).then(|| Tensor::from_dispatch(<Dispatch as TorchOps>::torch_rope(x.clone().into_dispatch(), tables.clone())))
}

/// Summed negative log-likelihood of one target per row, in f32 whatever the logits' dtype (as
/// transformers upcasts them for the loss), or `None` where it does not apply (not LibTorch).
///
/// # Shapes
/// - logits: `[n, vocab]`; targets: `n` ids in `0..vocab`
/// - output: `[1]`, f32
pub fn cross_entropy_sum(logits: &Tensor<2>, targets: &[i64]) -> Option<Tensor<1>> {
    on_libtorch(Op::CrossEntropy, logits).then(|| {
        Tensor::from_dispatch(<Dispatch as TorchOps>::torch_cross_entropy_sum(logits.clone().into_dispatch(), targets.to_vec()))
    })
}

/// [`super::lookup_and_scale`] on LibTorch tensors, in as few passes over a band as stock ops
/// allow: the bytes widened to i32 indices (burn's select takes i64, twice the bytes), one
/// `index_select` from the f32 table, the high bits added, and the scaling written straight in
/// `dtype` (a product, or a sum, with an output of that dtype computes in f32 and rounds once, as
/// the cast after it did). For NF4 into bf16 that moves about 14.5 bytes a value, where the
/// composition moved 26.5 (i64 indices, the f32 values, their f32 product, the cast), and holds
/// 8 bytes a value at once instead of 14. `None` for other dtypes or non-f32 scales.
///
/// # Shapes
/// - bytes: `[out · in / per_byte]` u8, `per_byte = table.len() / 256`; scales, mins: `[blocks]`
/// - output: `shape`, `[out, in]`
pub fn lookup_and_scale(band: &PackedBand, dtype: DType) -> Option<Tensor<2>> {
    let PackedBand { bytes, table, high, scales, mins, shape, packing } = *band;
    let kind = match dtype {
        DType::F32 => tch::Kind::Float,
        DType::BF16 => tch::Kind::BFloat16,
        DType::F16 => tch::Kind::Half,
        _ => return None,
    };
    let device = bytes.device();
    let int = |t: &Tensor<1, Int>| t.clone().try_into_primitive::<LibTorch>().ok().map(|t| t.tensor);
    let float = |t: &Tensor<1>| (t.dtype() == DType::F32).then(|| t.clone().try_into_primitive::<LibTorch>().ok()).flatten().map(|t| t.tensor);
    // Each byte's row of a 256-row table (uploaded once per device).
    let lookup = |bytes: &tch::Tensor, table: Vec<f32>| {
        let table = crate::nf4::uploaded_table(table, &device).try_into_primitive::<LibTorch>().ok()?.tensor;
        Some(table.index_select(0, &bytes.to_kind(tch::Kind::Int)))
    };
    let blocks = scales.dims()[0] as i64;
    let block = (shape[0] * shape[1]) as i64 / blocks;
    // [blocks, 2, block/2] for split halves (byte j's values at j and j + block/2), so that the
    // reordering is a strided view the scaling reads; [blocks, 1, block] side by side.
    let (halves, width) = if packing == Packing::SplitHalves { (2, block / 2) } else { (1, block) };
    let codes = lookup(&int(bytes)?, table.to_vec())?;
    let codes = match packing {
        Packing::SplitHalves => codes.view([blocks, width, 2]).transpose(1, 2),
        Packing::Adjacent => codes.view([blocks, 1, block]),
    };
    let mut codes = match high {
        Some((plane, bits)) => codes + lookup(&int(plane)?, crate::ggml::high_table(bits))?.view([blocks, halves, width]),
        None => codes,
    };
    let per_block = |t: tch::Tensor| t.view([blocks, 1, 1]);
    let out = tch::Tensor::empty([blocks, halves, width], (kind, codes.device()));
    let _ = match mins {
        None => codes.mul_out(&out, &per_block(float(scales)?)),
        Some(mins) => {
            let _ = codes.g_mul_(&per_block(float(scales)?));
            codes.add_out(&out, &per_block(float(mins)?))
        }
    };
    let [rows, cols] = shape.map(|d| d as i64);
    Some(Tensor::from_primitive::<LibTorch>(TchTensor::new(out.view([rows, cols]))))
}

#[backend_extension(LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait TorchOps: Backend {
    fn torch_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    fn torch_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    fn torch_rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self>;
    fn torch_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self>;
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self>;
    fn torch_low_rank(x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    fn torch_low_rank_onto(y: FloatTensor<Self>, x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    fn torch_packed_causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, lengths: Vec<usize>, scale: f64) -> FloatTensor<Self>;
    fn torch_packed_prefix_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        prefix_k: FloatTensor<Self>,
        prefix_v: FloatTensor<Self>,
        lengths: Vec<usize>,
        scale: f64,
    ) -> FloatTensor<Self>;
}

/// LibTorch's attention with grouped K/V heads: head `h` reads K/V group `h / (heads / kv_heads)`,
/// as transformers' `repeat_kv`. `causal`: LibTorch's own causal mask instead of `bias`.
fn sdpa(q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor, bias: &tch::Tensor, causal: bool, scale: f64) -> tch::Tensor {
    // A padded query's row is all f32::MIN, which rounds to -inf in bf16 and f16 (and a row of
    // -inf is NaN). Any large finite value is as good a zero probability: bf16's most negative,
    // or half of f16's, so that adding a score to it stays finite in f16.
    let floor = match q.kind() {
        tch::Kind::Half => f64::from(half::f16::MIN) / 2.0,
        _ => f64::from(half::bf16::MIN),
    };
    let bias = (!causal).then(|| bias.clamp_min(floor).to_kind(q.kind()));
    let grouped = q.size()[1] != k.size()[1];
    tch::Tensor::scaled_dot_product_attention(q, k, v, bias.as_ref(), 0.0, bias.is_none(), scale, grouped)
}

/// Each sequence's rows of q, k and v (narrowed views, no copies).
fn sequences(inputs: &[TchTensor; 3], lengths: &[usize]) -> Vec<[tch::Tensor; 3]> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&len| {
            let at = start;
            start += len as i64;
            inputs.each_ref().map(|t| t.tensor.narrow(2, at, len as i64))
        })
        .collect()
}

/// [`packed_attention`] of LibTorch tensors: each sequence's q, k, v attended causally after the
/// `prefix` keys and values, the outputs concatenated.
fn packed_sdpa(sequences: &[[tch::Tensor; 3]], prefix: Option<&[TchTensor; 2]>, scale: f64) -> tch::Tensor {
    let outputs: Vec<_> = sequences
        .iter()
        .map(|[q, k, v]| {
            let grouped = q.size()[1] != k.size()[1];
            match prefix {
                None => tch::Tensor::scaled_dot_product_attention(q, k, v, None::<tch::Tensor>, 0.0, true, scale, grouped),
                Some([prefix_k, prefix_v]) => {
                    let (k, v) = (tch::Tensor::cat(&[&prefix_k.tensor, k], 2), tch::Tensor::cat(&[&prefix_v.tensor, v], 2));
                    let visible = prefix_mask(q.size()[2], prefix_k.tensor.size()[2], q.device());
                    tch::Tensor::scaled_dot_product_attention(q, &k, &v, Some(visible), 0.0, false, scale, grouped)
                }
            }
        })
        // Tokens-major, `[1, len, heads, head_dim]` (each output's own memory on flash attention).
        .map(|output| output.transpose(1, 2))
        .collect();
    // End to end tokens-major, handed back as the `[1, heads, tokens, head_dim]` view: the
    // caller's swap to `[1, tokens, hidden]` for o_proj is then a view, not one more copy that
    // o_proj's LoRA branch would keep.
    tch::Tensor::cat(&outputs, 1).transpose(1, 2)
}

/// `[len, prefix + len]`, true where a query attends: every prefix key, then the sequence's own up
/// to the query. Kept for the sequences of the step in hand, as every layer asks for the same
/// (two kernels each on a GPU, otherwise 2 · sequences · layers a step).
fn prefix_mask(len: i64, prefix: i64, device: tch::Device) -> tch::Tensor {
    type Masks = Vec<((i64, i64, tch::Device), tch::Tensor)>;
    static MASKS: Mutex<Masks> = Mutex::new(Vec::new());
    let mut masks = MASKS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, mask)) = masks.iter().find(|(key, _)| *key == (len, prefix, device)) {
        return mask.shallow_clone();
    }
    // A step brings a few lengths: past 64M entries (bytes), the older steps' are dropped.
    if masks.iter().map(|(_, mask)| mask.numel()).sum::<usize>() + (len * (prefix + len)) as usize > 1 << 26 {
        masks.clear();
    }
    let mask = tch::Tensor::ones([len, prefix + len], (tch::Kind::Bool, device)).tril(prefix);
    masks.push(((len, prefix, device), mask.shallow_clone()));
    mask
}

/// `(scale · x Aᵀ Bᵀ, x as rows, scale · x Aᵀ)` of [`low_rank`]: the output, and what its
/// backward reads. In rows, `[batch · seq, ..]`, so that each product is one GEMM call.
fn low_rank_forward(x: &tch::Tensor, a: &tch::Tensor, b: &tch::Tensor, scale: f64) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
    let rows = x.flatten(0, -2);
    // rows,in -> rows,r -> rows,out: never an in×out matrix; the scale on the narrow middle.
    let mut down = to_f32(rows.shallow_clone()).linear::<tch::Tensor>(a, None);
    let _ = down.g_mul_scalar_(scale);
    let mut shape = x.size();
    *shape.last_mut().expect("x has dims") = b.size()[0];
    (down.linear::<tch::Tensor>(b, None).view(shape.as_slice()), rows, down)
}

/// `t` in f32, itself when it is already.
fn to_f32(t: tch::Tensor) -> tch::Tensor {
    if t.kind() == tch::Kind::Float { t } else { t.to_kind(tch::Kind::Float) }
}

/// `(output, 1/rms)` of [`rms_norm`], the latter `[.., 1]` in f32.
fn rms_norm_forward(x: &tch::Tensor, weight: &tch::Tensor, eps: f64) -> (tch::Tensor, tch::Tensor) {
    let x32 = x.to_kind(tch::Kind::Float);
    let inv_rms = (x32.square().mean_dim(-1, true, tch::Kind::Float) + eps).rsqrt();
    ((x32 * &inv_rms).to_kind(x.kind()) * weight, inv_rms)
}

/// `rot·cos + rotate(rot)·sin` on the first `rotary` dims of `x`, the rest passed through; with
/// `inverse` the rotation back (`-sin`), which is also its vector-Jacobian product. `rotate(rot) ·
/// sin` is `turn(rot) · turned_sin` (a roll by half, or a swap within pairs): the same products,
/// bit for bit, without negating `x`.
fn rope_forward(x: &tch::Tensor, tables: &RopeTables, inverse: bool) -> tch::Tensor {
    let [b, h, s, head_dim] = x.size()[..] else { unreachable!("rope takes [batch, heads, seq, head_dim]") };
    let dim = tables.cos.dims()[1] as i64;
    let table = |t: &Tensor<2>| {
        let t = t.clone().try_into_primitive::<LibTorch>().expect("RoPE tables beside the activations").tensor;
        if t.kind() == x.kind() { t } else { t.to_kind(x.kind()) }
    };
    let (cos, sin) = (table(&tables.cos), table(&tables.turned_sin));
    let rot = if dim == head_dim { x.shallow_clone() } else { x.narrow(3, 0, dim) };
    let turned = match tables.pairing {
        RopePairing::Half => rot.roll([dim / 2], [3]),
        RopePairing::Interleaved => rot.reshape([b, h, s, dim / 2, 2]).flip([4]).reshape([b, h, s, dim]),
    } * sin;
    let straight = &rot * cos;
    let out = if inverse { straight - turned } else { straight + turned };
    if dim == head_dim { out } else { tch::Tensor::cat(&[out, x.narrow(3, dim, head_dim - dim)], 3) }
}

/// The targets as a LibTorch `[n, 1]` index tensor on `device`.
fn target_ids(targets: &[i64], device: tch::Device) -> tch::Tensor {
    tch::Tensor::from_slice(targets).view([targets.len() as i64, 1]).to_device(device)
}

/// `(Σ lse − logit[target], lse)`: the summed loss `[1]` and the log-sum-exp `[n, 1]`, in f32.
/// LibTorch's `logsumexp` steps (max, exp(x − max) summed, log, + max), on one f32 copy of the
/// logits shifted and exponentiated in place: at the step's peak (every layer's activations
/// still held) that is 4 bytes a logit less than `logsumexp`'s own second temporary.
fn cross_entropy_forward(logits: &tch::Tensor, ids: &tch::Tensor) -> (tch::Tensor, tch::Tensor) {
    let mut x = writable_f32(logits);
    let target = x.gather(1, ids, false);
    let mut max = x.amax([-1].as_slice(), true);
    let infinite = max.isinf();
    let _ = max.masked_fill_(&infinite, 0.0);
    let _ = x.g_sub_(&max);
    let _ = x.exp_();
    let mut lse = x.sum_dim_intlist([-1].as_slice(), true, tch::Kind::Float);
    let _ = lse.log_();
    let _ = lse.g_add_(&max);
    let total = (&lse - target).sum(tch::Kind::Float).reshape([1]);
    (total, lse)
}

/// `t` as an f32 tensor of its own, to be written in place (a copy even when `t` is f32).
fn writable_f32(t: &tch::Tensor) -> tch::Tensor {
    if t.kind() == tch::Kind::Float { t.copy() } else { t.to_kind(tch::Kind::Float) }
}

/// `y + delta` in `y`'s dtype, computed in f32 and rounded once: in place when burn holds `y`
/// nowhere else (one kernel), otherwise a new tensor.
fn add_rounding_once(y: TchTensor, delta: &tch::Tensor) -> TchTensor {
    if y.storage.can_mut() {
        let mut sum = y.tensor.shallow_clone();
        let _ = sum.g_add_(delta);
        TchTensor::from_existing(sum, y.storage)
    } else {
        TchTensor::new((&y.tensor + delta).to_kind(y.tensor.kind()))
    }
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

    fn torch_rope(x: TchTensor, tables: RopeTables) -> TchTensor {
        TchTensor::new(tch::no_grad(|| rope_forward(&x.tensor, &tables, false)))
    }

    fn torch_cross_entropy_sum(logits: TchTensor, targets: Vec<i64>) -> TchTensor {
        TchTensor::new(tch::no_grad(|| cross_entropy_forward(&logits.tensor, &target_ids(&targets, logits.tensor.device())).0))
    }

    fn torch_low_rank(x: TchTensor, a: TchTensor, b: TchTensor, scale: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| low_rank_forward(&x.tensor, &a.tensor, &b.tensor, scale).0))
    }

    fn torch_low_rank_onto(y: TchTensor, x: TchTensor, a: TchTensor, b: TchTensor, scale: f64) -> TchTensor {
        tch::no_grad(|| add_rounding_once(y, &low_rank_forward(&x.tensor, &a.tensor, &b.tensor, scale).0))
    }

    fn torch_packed_causal_attention(q: TchTensor, k: TchTensor, v: TchTensor, lengths: Vec<usize>, scale: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| packed_sdpa(&sequences(&[q, k, v], &lengths), None, scale)))
    }

    fn torch_packed_prefix_attention(q: TchTensor, k: TchTensor, v: TchTensor, prefix_k: TchTensor, prefix_v: TchTensor, lengths: Vec<usize>, scale: f64) -> TchTensor {
        TchTensor::new(tch::no_grad(|| packed_sdpa(&sequences(&[q, k, v], &lengths), Some(&[prefix_k, prefix_v]), scale)))
    }
}

/// The forward's LibTorch graph, kept for backward: leaves q, k, v (one triple a packed
/// sequence, or the whole tensors), the prefix's keys and values as two more (if any), and the
/// output that depends on them. Each leaf shares the storage handle of the tensor burn holds, so
/// burn never writes over what LibTorch's backward reads.
#[derive(Debug, Clone)]
struct TorchGraph {
    sequences: Vec<[TchTensor; 3]>,
    prefix: Option<[TchTensor; 2]>,
    output: TchTensor,
}

impl TorchGraph {
    /// `forward` run with LibTorch's autograd on leaves made of `sequences` (parts of `inputs`)
    /// and `prefix`; returns the graph and the output for burn.
    fn record(
        inputs: &[TchTensor; 3],
        sequences: Vec<[tch::Tensor; 3]>,
        prefix: Option<[TchTensor; 2]>,
        forward: impl FnOnce(&[[tch::Tensor; 3]], Option<&[TchTensor; 2]>) -> tch::Tensor,
    ) -> (Self, TchTensor) {
        let leaf = |owner: &TchTensor, part: &tch::Tensor| TchTensor::from_existing(part.detach().set_requires_grad(true), owner.storage.clone());
        let sequences: Vec<[TchTensor; 3]> = sequences.iter().map(|parts| [0, 1, 2].map(|i| leaf(&inputs[i], &parts[i]))).collect();
        let prefix = prefix.map(|kv| kv.each_ref().map(|t| leaf(t, &t.tensor)));
        let leaves: Vec<_> = sequences.iter().map(|parts| parts.each_ref().map(|t| t.tensor.shallow_clone())).collect();
        let output = tch::with_grad(|| forward(&leaves, prefix.as_ref()));
        // burn's ops on the output must not grow LibTorch's graph.
        let y = TchTensor::new(output.detach());
        let output = TchTensor::from_existing(output, y.storage.clone());
        (Self { sequences, prefix, output }, y)
    }
}

/// Backward of an attention run on LibTorch's graph ([`TorchGraph`]): inputs q, k, v, then the
/// prefix's keys and values if any.
#[derive(Debug)]
struct TorchGraphBackward;

impl<const N: usize> Backward<LibTorch, N> for TorchGraphBackward {
    type State = TorchGraph;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node);
        let TorchGraph { sequences, prefix, output } = ops.state;
        let wanted: Vec<_> = ops.parents.iter().enumerate().filter_map(|(input, parent)| parent.as_ref().map(|p| (p.id, input))).collect();
        if wanted.is_empty() {
            return;
        }
        // An input's gradient comes in one part per sequence; a prefix's whole.
        let leaves = |input: usize| -> Vec<&tch::Tensor> {
            match input {
                0..3 => sequences.iter().map(|sequence| &sequence[input].tensor).collect(),
                _ => vec![&prefix.as_ref().expect("the inputs after v are the prefix's")[input - 3].tensor],
            }
        };
        let inputs: Vec<_> = wanted.iter().flat_map(|&(_, input)| leaves(input)).collect();
        // Gradients of Σ output · dy: the vector-Jacobian product with dy.
        let surrogate = (&output.tensor * &dy.tensor).sum(output.tensor.kind());
        let mut input_grads = tch::with_grad(|| tch::Tensor::run_backward(&[surrogate], &inputs, false, false)).into_iter();
        for (id, input) in wanted {
            let parts: Vec<_> = input_grads.by_ref().take(leaves(input).len()).collect();
            // The sequences' parts end to end: one copy, no zero fill.
            let grad = if parts.len() == 1 { parts.into_iter().next().unwrap() } else { tch::no_grad(|| tch::Tensor::cat(&parts, 2)) };
            grads.register::<LibTorch>(id, TchTensor::new(grad));
        }
    }
}

/// Backward of [`low_rank`], in rows: with `d = s · x Aᵀ` (kept from the forward),
/// dB = dyᵀ d, dd = s · dy B, dA = ddᵀ x, dx = dd A in `x`'s dtype. `x` is kept in its own dtype
/// (the tensor the layer holds anyway, shared by every branch that reads it) and cast to f32 here:
/// a bf16 activation kept as f32 rows for each of a layer's seven branches cost 2.9× its size.
#[derive(Debug)]
struct LowRankBackward;

#[derive(Debug, Clone)]
struct LowRankState {
    input: BranchInput,
    x_shape: Vec<i64>,
    x_kind: tch::Kind,
    /// `s · x Aᵀ`, rows.
    down: TchTensor,
    a: TchTensor,
    b: TchTensor,
    scale: f64,
}

/// What a LoRA branch keeps to have its input `x` in backward, as `[batch · seq, in]` rows.
#[derive(Debug, Clone)]
enum BranchInput {
    /// A view of `x` (sharing its storage handle, so burn never writes over it).
    Rows(TchTensor),
    /// `x = silu(gate) · up`, made again (the same kernels, the same values).
    Swiglu { gate: TchTensor, up: TchTensor },
}

impl BranchInput {
    /// `dA = ddᵀ x`, `x` in f32 (exact: every bf16/f16 value is an f32).
    fn a_gradient(&self, d_down: &tch::Tensor) -> tch::Tensor {
        let remade;
        let rows = match self {
            BranchInput::Rows(rows) => &rows.tensor,
            BranchInput::Swiglu { gate, up } => {
                remade = (gate.tensor.silu() * &up.tensor).flatten(0, -2);
                &remade
            }
        };
        if rows.kind() == tch::Kind::Float { d_down.tr().mm(rows) } else { d_down.tr().mm(&rows.to_kind(tch::Kind::Float)) }
    }
}

impl Backward<LibTorch, 3> for LowRankBackward {
    type State = LowRankState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node).tensor;
        low_rank_gradients(&dy, ops.state, ops.parents.map(|p| p.map(|node| node.id)), grads);
    }
}

/// Backward of [`low_rank_onto`]: `y`'s gradient is the output's, the branch's as [`low_rank`]'s
/// from it in f32.
#[derive(Debug)]
struct LowRankOntoBackward;

impl Backward<LibTorch, 4> for LowRankOntoBackward {
    type State = LowRankState;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<LibTorch>(&ops.node).tensor;
        let [node_y, node_x, node_a, node_b] = ops.parents.map(|p| p.map(|node| node.id));
        if let Some(id) = node_y {
            grads.register::<LibTorch>(id, TchTensor::new(dy.shallow_clone()));
        }
        let dy = tch::no_grad(|| to_f32(dy));
        low_rank_gradients(&dy, ops.state, [node_x, node_a, node_b], grads);
    }
}

/// Registers the gradients of x, A and B (the nodes that want one) from the output's `dy`.
fn low_rank_gradients(dy: &tch::Tensor, state: LowRankState, [node_x, node_a, node_b]: [Option<NodeId>; 3], grads: &mut Gradients) {
    let dy = dy.flatten(0, -2);
    let LowRankState { input, x_shape, x_kind, down, a, b, scale } = state;
    tch::no_grad(|| {
        if let Some(id) = node_b {
            grads.register::<LibTorch>(id, TchTensor::new(dy.tr().mm(&down.tensor)));
        }
        let mut d_down = dy.mm(&b.tensor);
        let _ = d_down.g_mul_scalar_(scale);
        if let Some(id) = node_a {
            grads.register::<LibTorch>(id, TchTensor::new(input.a_gradient(&d_down)));
        }
        if let Some(id) = node_x {
            let dx = d_down.mm(&a.tensor).view(x_shape.as_slice());
            grads.register::<LibTorch>(id, TchTensor::new(if x_kind == tch::Kind::Float { dx } else { dx.to_kind(x_kind) }));
        }
    });
}

/// [`low_rank`]'s output, and what its backward keeps.
fn low_rank_with_state([x, a, b]: [TchTensor; 3], scale: f64) -> (tch::Tensor, LowRankState) {
    let (delta, rows, down) = tch::no_grad(|| low_rank_forward(&x.tensor, &a.tensor, &b.tensor, scale));
    let (x_shape, x_kind) = (x.tensor.size(), x.tensor.kind());
    let input = match SwigluOutput::sources_of(&x) {
        Some((gate, up)) => BranchInput::Swiglu { gate, up },
        None => BranchInput::Rows(TchTensor::from_existing(rows, x.storage)),
    };
    (delta, LowRankState { input, x_shape, x_kind, down: TchTensor::new(down), a, b, scale })
}

/// SwiGLU's latest output under autodiff, with the gate and up it was made from. LoRA's branch on
/// down_proj reads that output next: finding it here (the same buffer, still alive, not written
/// since), the branch keeps gate and up, which SwiGLU's backward keeps anyway, instead of a third
/// `[tokens, intermediate]` tensor (15% of a bf16 LLaMA-7B layer's activations). Taken by the next
/// branch, replaced by the next SwiGLU, dropped by SwiGLU's backward: never held past a layer's
/// forward that did not use it, nor past backward.
struct SwigluOutput {
    buffer: Weak<*mut c_void>,
    data: *mut c_void,
    size: Vec<i64>,
    strides: Vec<i64>,
    version: i64,
    gate: TchTensor,
    up: TchTensor,
}

thread_local! {
    static LATEST_SWIGLU: RefCell<Option<SwigluOutput>> = const { RefCell::new(None) };
}

impl SwigluOutput {
    fn remember(output: &TchTensor, gate: &TchTensor, up: &TchTensor) {
        let latest = SwigluOutput {
            buffer: Arc::downgrade(output.storage.buffer_ref()),
            data: output.tensor.data_ptr(),
            size: output.tensor.size(),
            strides: output.tensor.stride(),
            version: output.tensor.internal_version(),
            gate: gate.clone(),
            up: up.clone(),
        };
        LATEST_SWIGLU.with(|slot| *slot.borrow_mut() = Some(latest));
    }

    fn forget() {
        LATEST_SWIGLU.with(|slot| slot.borrow_mut().take());
    }

    /// Gate and up if `x` is the latest output, unchanged; the record is taken either way.
    fn sources_of(x: &TchTensor) -> Option<(TchTensor, TchTensor)> {
        let latest = LATEST_SWIGLU.with(|slot| slot.borrow_mut().take())?;
        let same_buffer = latest.buffer.upgrade().is_some_and(|buffer| Arc::ptr_eq(&buffer, x.storage.buffer_ref()));
        let t = &x.tensor;
        (same_buffer && t.data_ptr() == latest.data && t.size() == latest.size && t.stride() == latest.strides && t.internal_version() == latest.version)
            .then_some((latest.gate, latest.up))
    }
}

/// Backward step of a one-input operation: registers `dx(dy, state)`, computed outside LibTorch's
/// autograd, as the input's gradient when the input is tracked.
fn input_backward<S>(ops: Ops<S, 1>, grads: &mut Gradients, dx: impl FnOnce(tch::Tensor, S) -> tch::Tensor) {
    let [Some(node)] = ops.parents else { return };
    let dy = grads.consume::<LibTorch>(&ops.node).tensor;
    let dx = tch::no_grad(|| dx(dy, ops.state));
    grads.register::<LibTorch>(node.id, TchTensor::new(dx));
}

/// Backward of [`rms_norm`] from `x`, the weight and `1/rms`.
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<LibTorch, 1> for RmsNormBackward {
    type State = (TchTensor, TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        input_backward(ops, grads, |dy, (x, weight, inv_rms)| {
            // d(normed) in f32, then through x̂ = x / rms: (g - x̂ · mean(g · x̂)) / rms.
            let g = (dy * &weight.tensor).to_kind(tch::Kind::Float);
            let x_hat = x.tensor.to_kind(tch::Kind::Float) * &inv_rms.tensor;
            let mean = (&g * &x_hat).mean_dim(-1, true, tch::Kind::Float);
            (g.addcmul(&x_hat, &-mean) * &inv_rms.tensor).to_kind(x.tensor.kind())
        });
    }
}

/// Backward of [`swiglu`] from `gate` and `up`: `silu(gate)` is recomputed.
#[derive(Debug)]
struct SwigluBackward;

impl Backward<LibTorch, 2> for SwigluBackward {
    type State = (TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        SwigluOutput::forget();
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

/// Backward of [`rope`]: the rotation back.
#[derive(Debug)]
struct RopeBackward;

impl Backward<LibTorch, 1> for RopeBackward {
    type State = RopeTables;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        input_backward(ops, grads, |dy, tables| rope_forward(&dy, &tables, true));
    }
}

/// Backward of [`cross_entropy_sum`] from the logits, the target ids and the log-sum-exp:
/// `(softmax − one_hot) · dy`, with one f32 `[n, vocab]` temporary.
#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<LibTorch, 1> for CrossEntropyBackward {
    type State = (TchTensor, TchTensor, TchTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        input_backward(ops, grads, |dy, (logits, ids, lse)| {
            let mut probs = writable_f32(&logits.tensor);
            let _ = probs.g_sub_(&lse.tensor);
            let _ = probs.exp_();
            let minus_one = tch::Tensor::full([ids.tensor.size()[0], 1], -1.0, (tch::Kind::Float, probs.device()));
            let _ = probs.scatter_add_(1, &ids.tensor, &minus_one);
            let _ = probs.g_mul_(&dy.to_kind(tch::Kind::Float));
            probs.to_kind(logits.tensor.kind())
        });
    }
}

impl<C: CheckpointStrategy> TorchOps for Autodiff<LibTorch, C> {
    fn torch_rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        let prep = RopeBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let y = tch::no_grad(|| rope_forward(&x.into_primitive().tensor, &tables, false));
        super::finish(prep, tables, TchTensor::new(y))
    }

    fn torch_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self> {
        let prep = CrossEntropyBackward.prepare::<C>([logits.node()]).compute_bound().stateful();
        let logits = logits.into_primitive();
        let ids = target_ids(&targets, logits.tensor.device());
        let (total, lse) = tch::no_grad(|| cross_entropy_forward(&logits.tensor, &ids));
        super::finish(prep, (logits, TchTensor::new(ids), TchTensor::new(lse)), TchTensor::new(total))
    }

    fn torch_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let prep = RmsNormBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let (y, inv_rms) = tch::no_grad(|| rms_norm_forward(&x.tensor, &weight.tensor, eps));
        super::finish(prep, (x, weight, TchTensor::new(inv_rms)), TchTensor::new(y))
    }

    fn torch_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful();
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        let y = TchTensor::new(tch::no_grad(|| gate.tensor.silu() * &up.tensor));
        if let OpsKind::Tracked(_) = &prep {
            SwigluOutput::remember(&y, &gate, &up);
        }
        super::finish(prep, (gate, up), y)
    }

    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prep = TorchGraphBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.into_primitive());
        let attend = |[q, k, v]: &[tch::Tensor; 3]| sdpa(q, k, v, &bias.tensor, causal, scale);
        let whole = [&q, &k, &v].map(|t| t.tensor.shallow_clone());
        match prep {
            // LibTorch's graph kept for backward.
            OpsKind::Tracked(prep) => {
                let (graph, y) = TorchGraph::record(&[q, k, v], vec![whole], None, |leaves, _| attend(&leaves[0]));
                prep.finish(graph, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(TchTensor::new(tch::no_grad(|| attend(&whole)))),
        }
    }

    fn torch_low_rank(x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let prep = LowRankBackward.prepare::<C>([x.node(), a.node(), b.node()]).compute_bound().stateful();
        let (delta, state) = low_rank_with_state([x, a, b].map(|t| t.into_primitive()), scale);
        super::finish(prep, state, TchTensor::new(delta))
    }

    fn torch_low_rank_onto(y: FloatTensor<Self>, x: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let prep = LowRankOntoBackward.prepare::<C>([y.node(), x.node(), a.node(), b.node()]).compute_bound().stateful();
        let y = y.into_primitive();
        let (delta, state) = low_rank_with_state([x, a, b].map(|t| t.into_primitive()), scale);
        super::finish(prep, state, tch::no_grad(|| add_rounding_once(y, &delta)))
    }

    fn torch_packed_causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, lengths: Vec<usize>, scale: f64) -> FloatTensor<Self> {
        let prep = TorchGraphBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        let inputs = [q, k, v].map(|t| t.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let (graph, y) = TorchGraph::record(&inputs, sequences(&inputs, &lengths), None, |leaves, _| packed_sdpa(leaves, None, scale));
                prep.finish(graph, y)
            }
            OpsKind::UnTracked(prep) => {
                let [q, k, v] = inputs;
                prep.finish(LibTorch::torch_packed_causal_attention(q, k, v, lengths, scale))
            }
        }
    }

    fn torch_packed_prefix_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        prefix_k: FloatTensor<Self>,
        prefix_v: FloatTensor<Self>,
        lengths: Vec<usize>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node(), prefix_k.node(), prefix_v.node()];
        let prep = TorchGraphBackward.prepare::<C>(nodes).compute_bound().stateful();
        let inputs = [q, k, v].map(|t| t.into_primitive());
        let prefix = [prefix_k, prefix_v].map(|t| t.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let (graph, y) = TorchGraph::record(&inputs, sequences(&inputs, &lengths), Some(prefix), |leaves, prefix| packed_sdpa(leaves, prefix, scale));
                prep.finish(graph, y)
            }
            OpsKind::UnTracked(prep) => {
                let ([q, k, v], [prefix_k, prefix_v]) = (inputs, prefix);
                prep.finish(LibTorch::torch_packed_prefix_attention(q, k, v, prefix_k, prefix_v, lengths, scale))
            }
        }
    }
}
