//! Fused operations with their own backward: RMSNorm, RoPE, SwiGLU, attention (its
//! probabilities made again in backward rather than kept) and the LM-head cross-entropy, each
//! one pass over a row instead of a chain of burn ops (with a full-size temporary per op and one
//! thread for most of them); the product with a frozen weight
//! that is made dense for forward and again for backward; the lookup that makes NF4/int8 bytes
//! dense; every product on flex, through one GEMM call of ember's that writes its output once and
//! shares the weight's packing among the threads.
//!
//! burn routes them through `#[backend_extension]`: the forward runs on flex's buffers
//! ([`kernels`]), and under autodiff a hand-written `Backward` step registers the input
//! gradients. They serve f32 tensors on flex; anything else (LibTorch, bf16) returns `None` and the
//! caller keeps its composed burn ops, which stay the reference the tests compare against. Some
//! are served on LibTorch as well: the frozen product (two GEMMs on any backend), RMSNorm, SwiGLU,
//! RoPE and the cross-entropy (LibTorch ops with a hand-written backward), and attention, which
//! there is LibTorch's own fused scaled-dot-product attention ([`attention`]; `torch_ops`).
//! `EMBER_FUSED=0` turns them off, `EMBER_FUSED=rope,attention` keeps only those named ([`Op`]), to
//! measure what they are worth. On CUDA, LibTorch's attention needs cuDNN's attention kept out of
//! the way ([`crate::device::avoid_cudnn_attention`]): it builds a graph for each new sequence
//! length, 83 ms of host time a call on an H200, which cost 7B LoRA 3.1× its speed.

#![allow(deprecated)] // the macro's glue names burn-dispatch's deprecated aliases.

pub mod kernels;
#[cfg(feature = "tch")]
mod torch_ops;

use std::any::Any;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{
    Autodiff, Backend, Dispatch, DispatchKindConversion, DispatchTensor, Flex,
    backend_extension, tensor::FloatTensor,
};
use burn::tensor::{Bytes, DType, Int, Shape, Slice, Tensor};
use burn_flex::{FlexTensor, Layout};

use crate::config::RopePairing;

/// The fused operations, each switchable by name in `EMBER_FUSED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    RmsNorm,
    Swiglu,
    Rope,
    Attention,
    CrossEntropy,
    Matmul,
    FrozenMatmul,
    Dequantize,
    LowRank,
}

impl Op {
    pub const ALL: [Op; 9] = [Op::RmsNorm, Op::Swiglu, Op::Rope, Op::Attention, Op::CrossEntropy, Op::Matmul, Op::FrozenMatmul, Op::Dequantize, Op::LowRank];

    /// The name `EMBER_FUSED` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::Swiglu => "swiglu",
            Op::Rope => "rope",
            Op::Attention => "attention",
            Op::CrossEntropy => "cross_entropy",
            Op::Matmul => "matmul",
            Op::FrozenMatmul => "frozen_matmul",
            Op::Dequantize => "dequantize",
            Op::LowRank => "low_rank",
        }
    }
}

/// What `EMBER_FUSED` asks for.
enum Selection {
    /// Unset or `1`: every fused operation.
    All,
    /// `0` (none), or a comma list of [`Op`] names: only those.
    Only(Vec<Op>),
}

fn selection() -> &'static Selection {
    static SELECTION: OnceLock<Selection> = OnceLock::new();
    SELECTION.get_or_init(|| match std::env::var("EMBER_FUSED").ok().as_deref().map(str::trim) {
        None | Some("" | "1") => Selection::All,
        Some("0") => Selection::Only(Vec::new()),
        Some(list) => Selection::Only(
            list.split(',')
                .map(str::trim)
                .filter_map(|name| {
                    let op = Op::ALL.into_iter().find(|op| op.name() == name);
                    if op.is_none() {
                        let known: Vec<_> = Op::ALL.iter().map(|op| op.name()).collect();
                        eprintln!("warning: EMBER_FUSED names no fused operation `{name}` (known: {})", known.join(", "));
                    }
                    op
                })
                .collect(),
        ),
    })
}

/// Whether the fused operation `op` is used where it applies.
pub fn enabled_for(op: Op) -> bool {
    match selection() {
        Selection::All => true,
        Selection::Only(ops) => ops.contains(&op),
    }
}

/// What a training step's forward keeps for backward, as far as the memory estimate of a
/// method's own layers depends on the device.
#[derive(Debug, Clone, Copy)]
pub struct KeptActivations {
    /// Bytes a value of the activations.
    pub bytes: usize,
    /// LoRA's branch on SwiGLU's output keeps gate and up (which SwiGLU keeps) instead of it, and
    /// makes it again in backward (LibTorch).
    pub swiglu_output_remade: bool,
}

impl KeptActivations {
    /// Activations of `bytes` a value; on LibTorch or not.
    pub fn new(bytes: usize, on_libtorch: bool) -> Self {
        let swiglu_output_remade = on_libtorch && enabled_for(Op::Swiglu) && enabled_for(Op::LowRank);
        Self { bytes, swiglu_output_remade }
    }
}

/// Whether the fused kernel `op` serves this tensor: f32 on flex, with or without autodiff.
fn applies<const D: usize>(op: Op, t: &Tensor<D>) -> bool {
    enabled_for(op) && t.dtype() == DType::F32 && crate::device::is_flex(&t.device())
}

/// `x / √(mean(x²) + eps) · weight` over the last dim, or `None` where it does not apply
/// (then the caller computes it with burn ops). The weight is frozen: no gradient reaches it.
///
/// # Shapes
/// - x, output: `[batch, seq, hidden]`; weight: `[hidden]`
pub fn rms_norm(x: &Tensor<3>, weight: &Tensor<1>, eps: f64) -> Option<Tensor<3>> {
    #[cfg(feature = "tch")]
    if let Some(y) = torch_ops::rms_norm(x, weight, eps) {
        return Some(y);
    }
    (applies(Op::RmsNorm, x) && applies(Op::RmsNorm, weight) && !weight.is_require_grad()).then(|| {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rms_norm(
            x.clone().into_dispatch(),
            weight.clone().into_dispatch(),
            eps,
        ))
    })
}

/// SwiGLU's `silu(gate) · up`, or `None` where it does not apply.
///
/// # Shapes
/// - gate, up, output: `[batch, seq, intermediate]`
pub fn swiglu(gate: &Tensor<3>, up: &Tensor<3>) -> Option<Tensor<3>> {
    #[cfg(feature = "tch")]
    if let Some(y) = torch_ops::swiglu(gate, up) {
        return Some(y);
    }
    (applies(Op::Swiglu, gate) && applies(Op::Swiglu, up)).then(|| {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_swiglu(
            gate.clone().into_dispatch(),
            up.clone().into_dispatch(),
        ))
    })
}

/// Summed negative log-likelihood of one target per row, or `None` where it does not apply.
/// Every target must lie in `0..vocab`.
///
/// # Shapes
/// - logits: `[n, vocab]`; targets: `n` ids
/// - output: `[1]`
pub fn cross_entropy_sum(logits: &Tensor<2>, targets: &[i64]) -> Option<Tensor<1>> {
    let vocab = logits.dims()[1];
    assert!(
        targets.iter().all(|&t| (0..vocab as i64).contains(&t)),
        "cross-entropy target outside the vocabulary"
    );
    #[cfg(feature = "tch")]
    if let Some(total) = torch_ops::cross_entropy_sum(logits, targets) {
        return Some(total);
    }
    applies(Op::CrossEntropy, logits).then(|| {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_cross_entropy_sum(
            logits.clone().into_dispatch(),
            targets.to_vec(),
        ))
    })
}

/// `lhs · rhs` over the last two dims; f32 on flex through [`kernels::matmul`], which writes its
/// output once; elsewhere (LibTorch, bf16, batch dims that broadcast) burn's matmul.
///
/// # Shapes
/// - lhs: `[..., m, k]`; rhs: `[..., k, n]` with the same leading dims
/// - output: `[..., m, n]`
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    if !(applies(Op::Matmul, &lhs) && applies(Op::Matmul, &rhs) && lhs.dims()[..D - 2] == rhs.dims()[..D - 2]) {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_matmul(lhs.into_dispatch(), rhs.into_dispatch()))
}

/// Rows of a packed weight `[out, in]`, as [`kernels::lookup_and_scale`] reads them: u8 `bytes`
/// that each stand for their row of the 256-row `table`, placed per `packing`, maybe `high` bits
/// (a plane and its bits a value), f32 `scales` and `mins` a block.
pub struct PackedBand<'a> {
    pub bytes: &'a Tensor<1, Int>,
    pub table: &'a [f32],
    pub high: Option<(&'a Tensor<1, Int>, usize)>,
    pub scales: &'a Tensor<1>,
    pub mins: Option<&'a Tensor<1>>,
    pub shape: [usize; 2],
    pub packing: kernels::Packing,
}

/// `band` made dense in `dtype` (each value computed in f32, rounded once), on plain flex or
/// LibTorch tensors; `None` elsewhere.
pub fn lookup_and_scale(band: &PackedBand, dtype: DType) -> Option<Tensor<2>> {
    if !enabled_for(Op::Dequantize) {
        return None;
    }
    #[cfg(feature = "tch")]
    if let burn::backend::DispatchDevice::LibTorch(_) = band.bytes.device().inner().as_dispatch() {
        return torch_ops::lookup_and_scale(band, dtype);
    }
    let PackedBand { bytes, table, high, scales, mins, shape, packing } = *band;
    // A band of a weight is a contiguous view into its planes: read in place, not copied.
    let contiguous = |t: FlexTensor| if t.is_contiguous() { t } else { t.to_contiguous() };
    let flex = |t: &Tensor<1>| (t.dtype() == DType::F32).then(|| t.clone().try_into_primitive::<Flex>().ok()).flatten().map(contiguous);
    let bytes = contiguous(bytes.clone().try_into_primitive::<Flex>().ok()?);
    let high = match high {
        Some((bytes, bits)) => Some((contiguous(bytes.clone().try_into_primitive::<Flex>().ok()?), bits)),
        None => None,
    };
    let scales = flex(scales)?;
    let mins = match mins {
        Some(mins) => Some(flex(mins)?),
        None => None,
    };
    let block = shape[0] * shape[1] / scales.layout().num_elements();
    let high = match &high {
        Some((bytes, bits)) => Some((bytes.as_slice::<u8>()?, *bits)),
        None => None,
    };
    let values = kernels::lookup_and_scale(bytes.as_slice::<u8>()?, table, high, values(&scales), mins.as_ref().map(values), block, packing);
    Some(Tensor::<2>::from_primitive::<Flex>(tensor(values, Shape::new(shape))).cast(dtype))
}

/// A bf16 or f16 `weight` on flex as f32, widened over the thread pool; `None` elsewhere
/// (LibTorch casts on its own threads) or with `dequantize` off.
pub fn widen(weight: &Tensor<2>) -> Option<Tensor<2>> {
    if !enabled_for(Op::Dequantize) || !matches!(weight.dtype(), DType::BF16 | DType::F16) {
        return None;
    }
    let flex = weight.clone().try_into_primitive::<Flex>().ok()?;
    let flex = if flex.is_contiguous() { flex } else { flex.to_contiguous() };
    let values = match weight.dtype() {
        DType::BF16 => kernels::widen_bf16(flex.as_slice::<half::bf16>()?),
        _ => kernels::widen_f16(flex.as_slice::<half::f16>()?),
    };
    Some(Tensor::<2>::from_primitive::<Flex>(tensor(values, Shape::new(weight.dims()))))
}

/// RoPE tables for a range of positions: `[seq, rotary]` values each on the activations' plain
/// device in their dtype, laid out per `pairing`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor<2>,
    pub sin: Tensor<2>,
    /// `sin` with the rotation's signs in it: `rotate(x) · sin = turn(x) · turned_sin`, where
    /// `turn` only moves values (`rotate_half`'s halves swapped, or each pair's two values), so
    /// that LibTorch rotates in one copy and three elementwise kernels.
    pub turned_sin: Tensor<2>,
    pub pairing: RopePairing,
}

impl RopeTables {
    /// Tables from f32 `cos` and `sin`, in `dtype` (transformers: `cos.to(x.dtype)`).
    pub fn new(cos: Tensor<2>, sin: Tensor<2>, pairing: RopePairing, dtype: DType) -> Self {
        let [len, dim] = sin.dims();
        let turned_sin = match pairing {
            // rotate_half: [x1, x2] -> [-x2, x1] = [x2, x1] · [-1, 1]
            RopePairing::Half => Tensor::cat(vec![sin.clone().narrow(1, 0, dim / 2).neg(), sin.clone().narrow(1, dim / 2, dim / 2)], 1),
            // pairs (x0, x1) -> (-x1, x0) = (x1, x0) · (-1, 1)
            RopePairing::Interleaved => {
                let pairs = sin.clone().reshape([len, dim / 2, 2]);
                Tensor::cat(vec![pairs.clone().narrow(2, 0, 1).neg(), pairs.narrow(2, 1, 1)], 2).reshape([len, dim])
            }
        };
        Self { cos: cos.cast(dtype), sin: sin.cast(dtype), turned_sin: turned_sin.cast(dtype), pairing }
    }

    /// Positions `start..start + len` of these (views).
    pub fn rows(&self, start: usize, len: usize) -> Self {
        let rows = |t: &Tensor<2>| t.clone().narrow(0, start, len);
        Self { cos: rows(&self.cos), sin: rows(&self.sin), turned_sin: rows(&self.turned_sin), pairing: self.pairing }
    }

    /// The tables of sequences packed one after the other.
    pub fn cat(parts: Vec<Self>) -> Self {
        let pairing = parts[0].pairing;
        let cat = |pick: fn(&Self) -> &Tensor<2>| Tensor::cat(parts.iter().map(|t| pick(t).clone()).collect(), 0);
        Self { cos: cat(|t| &t.cos), sin: cat(|t| &t.sin), turned_sin: cat(|t| &t.turned_sin), pairing }
    }
}

/// Rotary embedding of the first `rotary` dims of every head, or `None` where it does not apply.
///
/// # Shapes
/// - x, output: `[batch, heads, seq, head_dim]`
pub fn rope(x: &Tensor<4>, tables: RopeTables) -> Option<Tensor<4>> {
    #[cfg(feature = "tch")]
    if let Some(y) = torch_ops::rope(x, &tables) {
        return Some(y);
    }
    applies(Op::Rope, x).then(|| Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rope(x.clone().into_dispatch(), tables)))
}

/// Values of a frozen weight made dense at once for a product on flex: 64M, 256 MiB in f32. A
/// 7B model's projections (45M values) stay whole; its head goes in 4 bands instead of an
/// 805 MB f32 copy at once. Smaller bands cost flex speed: on a 7B NF4 step (198 tokens) bands of
/// 4M values took 101 s, of 16M 96 s, of 64M 78 s and 87 s (two runs), unbanded 86 s.
pub const FLEX_BAND_VALUES: usize = 1 << 26;

/// The same on LibTorch, where dequantizing into bf16 holds 8 bytes a value (i32 indices, the
/// looked-up f32 values, the result): 16M values, 128 MB, instead of 360 MB for a 7B MLP
/// projection. Bands of 48M (a 7B projection in one) cut a 7B NF4 step's LibTorch calls by 27%,
/// but made it 15% slower on the CPU (89.3 against 77.9 s, alternating pairs, 2026-12-04); on a
/// GPU, not measured.
pub const TORCH_BAND_VALUES: usize = 1 << 24;

/// Band size of backend `B`.
fn band_values<B: Backend>() -> usize {
    #[cfg(test)]
    if let Some(values) = tests::BAND_VALUES.get() {
        return values;
    }
    if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Flex>() { FLEX_BAND_VALUES } else { TORCH_BAND_VALUES }
}

/// How a frozen weight `[out, in]` becomes dense on the plain device (a cast of a bf16 base, a
/// dequantization of packed blocks), a band of rows at a time: for the forward product and again
/// for backward, so that no dense copy lives in the graph between them and at most one band of it
/// exists at once.
#[derive(Clone)]
pub struct DenseWeight {
    shape: [usize; 2],
    /// Bands start on a multiple of this many values of the flattened weight.
    align: usize,
    /// The dtype the bands come in.
    dtype: DType,
    rows: Arc<dyn Fn(Range<usize>, DType) -> Tensor<2> + Send + Sync>,
}

impl std::fmt::Debug for DenseWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DenseWeight({:?})", self.shape)
    }
}

impl DenseWeight {
    /// A weight of `shape` whose rows `r` `rows(r, dtype)` makes dense in `dtype`, for bands that
    /// start on a multiple of `align` values of the flattened weight (a quantization block, a
    /// group of blocks); in `dtype` until [`Self::cast`].
    pub fn new(shape: [usize; 2], align: usize, dtype: DType, rows: impl Fn(Range<usize>, DType) -> Tensor<2> + Send + Sync + 'static) -> Self {
        Self { shape, align, dtype, rows: Arc::new(rows) }
    }

    /// The same weight made dense in `dtype` (a dequantization writes it directly).
    pub fn cast(self, dtype: DType) -> Self {
        Self { dtype, ..self }
    }

    /// The whole weight, dense.
    pub fn all(&self) -> Tensor<2> {
        (self.rows)(0..self.shape[0], self.dtype)
    }

    /// The row ranges of bands of about `values` values, in order.
    fn bands(&self, values: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let [out, inp] = self.shape;
        let align_rows = self.align / gcd(inp.max(1), self.align);
        // At least one aligned band, at most the whole weight (which may be shorter than one).
        let band = ((values / inp.max(1)) / align_rows * align_rows).max(align_rows).min(out.max(1));
        (0..out).step_by(band).map(move |start| start..(start + band).min(out))
    }

    /// Rows `rows` of the weight as backend `B`'s primitive (flex or LibTorch, never autodiff).
    fn band<B: Backend>(&self, rows: Range<usize>) -> FloatTensor<B>
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        (self.rows)(rows, self.dtype).try_into_primitive::<B>().expect("a frozen weight rebuilds on the plain device")
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `x Wᵀ` with the frozen `W` rebuilt by `weight`, band by band, for the product and again for
/// backward, or `None` where it does not apply (`EMBER_FUSED=0`). Where the graph would keep the
/// dense copy of every projection until backward (4 bytes a value in f32, 2 in bf16, over a
/// 0.5-byte NF4 base), it keeps only the recipe to rebuild it. On flex and on LibTorch, in any
/// float dtype: on a GPU this is what keeps a 4-bit base 4-bit through backward.
///
/// # Shapes
/// - x: `[rows, in]`; weight: `[out, in]`
/// - output: `[rows, out]`
pub fn frozen_matmul(x: &Tensor<2>, weight: DenseWeight) -> Option<Tensor<2>> {
    enabled_for(Op::FrozenMatmul).then(|| Tensor::from_dispatch(<Dispatch as FrozenOps>::frozen_matmul(x.clone().into_dispatch(), weight)))
}

/// `softmax(q kᵀ · scale + bias) v` in one fused operation with its own backward, the bias (the
/// mask) taking no gradient. On LibTorch (f32, bf16 or f16) LibTorch's scaled-dot-product
/// attention; `causal`: `bias` is the plain causal mask (as many keys as queries), which LibTorch
/// then applies itself. On flex in f32, products and a softmax whose `[batch, heads, seq, keys]`
/// probabilities, where they are large ([`keeps_probabilities`]), are not kept: backward makes
/// the same ones again from each row's maximum and sum. `None` elsewhere: then the caller
/// composes it from burn ops.
///
/// # Shapes
/// - q: `[batch, heads, seq, head_dim]`
/// - k, v: `[batch, kv_heads, keys, head_dim]`, `heads` a multiple of `kv_heads`
/// - bias: `[batch, 1, seq, keys]`
/// - output: `[batch, heads, seq, head_dim]`
#[cfg_attr(not(feature = "tch"), allow(unused_variables))]
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bias: &Tensor<4>, causal: bool, scale: f64) -> Option<Tensor<4>> {
    #[cfg(feature = "tch")]
    if let Some(y) = torch_ops::attention(q, k, v, bias, causal, scale) {
        return Some(y);
    }
    let on_flex = [q, k, v, bias].into_iter().all(|t| applies(Op::Attention, t)) && !bias.is_require_grad();
    on_flex.then(|| {
        Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
            q.clone().into_dispatch(),
            k.clone().into_dispatch(),
            v.clone().into_dispatch(),
            bias.clone().into_dispatch(),
            scale,
        ))
    })
}

/// LoRA's branch `scale · x Aᵀ Bᵀ` in f32 whatever `x`'s dtype, as one operation whose backward is
/// four products, on LibTorch; `None` elsewhere (then the caller composes it from burn ops).
///
/// # Shapes
/// - x: `[batch, seq, in]`; a: `[rank, in]`, b: `[out, rank]`, both f32
/// - output: `[batch, seq, out]`, f32
#[allow(unused_variables)]
pub fn low_rank(x: &Tensor<3>, a: &Tensor<2>, b: &Tensor<2>, scale: f64) -> Option<Tensor<3>> {
    #[cfg(feature = "tch")]
    return torch_ops::low_rank(x, a, b, scale);
    #[cfg(not(feature = "tch"))]
    None
}

/// `y + scale · x Aᵀ Bᵀ` in `y`'s dtype, the sum computed in f32 and rounded once, as PEFT adds
/// its f32 branch to a bf16 base output and casts the sum (a cast of the branch first rounds
/// twice), on LibTorch, in place of `y` where nothing else holds it; `Err(y)` elsewhere.
///
/// # Shapes
/// - y: `[batch, seq, out]`; x: `[batch, seq, in]`; a: `[rank, in]`, b: `[out, rank]`, both f32
/// - output: `[batch, seq, out]`, in `y`'s dtype
#[allow(unused_variables)]
pub fn low_rank_onto(y: Tensor<3>, x: &Tensor<3>, a: &Tensor<2>, b: &Tensor<2>, scale: f64) -> Result<Tensor<3>, Tensor<3>> {
    #[cfg(feature = "tch")]
    return torch_ops::low_rank_onto(y, x, a, b, scale);
    #[cfg(not(feature = "tch"))]
    Err(y)
}

/// Attention of sequences packed into one row, each over its own keys after the shared prefix's
/// (if any), in one operation whose backward hands back whole gradients: [`attention`] once per
/// sequence. On LibTorch for `causal` masks (no window); on flex in f32 through each sequence's
/// `biases` (which a window is in). The per-sequence slices it replaces cost flex a zeroed
/// full-size gradient and an addition per sequence for each of q, k and v in backward. `None`
/// elsewhere: then the caller attends to each sequence's slices.
///
/// # Shapes
/// - q, output: `[1, heads, Σ lengths, head_dim]`
/// - k, v: `[1, kv_heads, Σ lengths, head_dim]`, `heads` a multiple of `kv_heads`
/// - prefix: `[1, kv_heads, prefix, head_dim]` each, in `k`'s dtype
/// - biases: `[1, 1, length, prefix + length]` each, in order
#[allow(unused_variables, clippy::too_many_arguments)]
pub fn packed_attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, prefix: Option<(&Tensor<4>, &Tensor<4>)>, lengths: &[usize], biases: &[Tensor<4>], causal: bool, scale: f64) -> Option<Tensor<4>> {
    #[cfg(feature = "tch")]
    if causal && let Some(y) = torch_ops::packed_attention(q, k, v, prefix, lengths, scale) {
        return Some(y);
    }
    let prefix_tensors = prefix.into_iter().flat_map(|(k, v)| [k, v]);
    let on_flex = [q, k, v].into_iter().chain(prefix_tensors).chain(biases).all(|t| applies(Op::Attention, t)) && biases.iter().all(|b| !b.is_require_grad());
    on_flex.then(|| {
        let biases = SequenceBiases(biases.iter().map(|b| b.clone().inner()).collect());
        let [q, k, v] = [q, k, v].map(|t| t.clone().into_dispatch());
        Tensor::from_dispatch(match prefix {
            None => <Dispatch as FusedOps>::fused_packed_attention(q, k, v, biases, scale),
            Some((prefix_k, prefix_v)) => {
                let [prefix_k, prefix_v] = [prefix_k, prefix_v].map(|t| t.clone().into_dispatch());
                <Dispatch as FusedOps>::fused_packed_prefix_attention(q, k, v, prefix_k, prefix_v, biases, scale)
            }
        })
    })
}

/// The masks of a packed batch's sequences, one `[1, 1, length, keys]` bias each on the plain
/// device, passed to flex's packed attention as they are.
#[derive(Debug, Clone)]
pub struct SequenceBiases(Vec<Tensor<4>>);

/// The product with a frozen weight, as its own extension because it is served on LibTorch too
/// (GEMMs, nothing to fuse there; what it saves is memory).
#[backend_extension(Flex, LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait FrozenOps: Backend {
    fn frozen_matmul(x: FloatTensor<Self>, weight: DenseWeight) -> FloatTensor<Self>;
}

/// rows,in · (out,in)ᵀ -> rows,out, one band of the weight's rows (of the output's columns) at a
/// time.
fn frozen_forward<B: Backend>(x: FloatTensor<B>, weight: &DenseWeight) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let mut parts: Vec<_> = weight.bands(band_values::<B>()).map(|rows| plain_matmul::<B>(x.clone(), B::float_transpose(weight.band::<B>(rows)))).collect();
    match parts.len() {
        1 => parts.pop().expect("one band"),
        _ => B::float_cat(parts, 1),
    }
}

/// `lhs · rhs` on backend `B`'s primitives: [`forward::matmul`] for f32 on flex, `B`'s own
/// matmul elsewhere.
fn plain_matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    let mut operands = Some((lhs, rhs));
    if let Some(flex) = (&mut operands as &mut dyn Any).downcast_mut::<Option<(FlexTensor, FlexTensor)>>()
        && enabled_for(Op::Matmul)
        && flex.as_ref().is_some_and(|(l, r)| l.dtype() == DType::F32 && r.dtype() == DType::F32)
    {
        let (lhs, rhs) = flex.take().expect("the operands");
        let mut product = Some(forward::matmul(&forward::positive(lhs), &forward::positive(rhs)));
        return (&mut product as &mut dyn Any).downcast_mut::<Option<FloatTensor<B>>>().and_then(Option::take).expect("B is flex");
    }
    let (lhs, rhs) = operands.expect("the operands");
    B::float_matmul(lhs, rhs)
}

/// rows,out · out,in -> rows,in, summed over the bands of out: backward of [`frozen_forward`].
fn transposed_product<B: Backend>(dy: FloatTensor<B>, weight: &DenseWeight) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    weight
        .bands(band_values::<B>())
        .map(|rows| plain_matmul::<B>(B::float_slice(dy.clone(), &[Slice::full(), Slice::from(rows.clone())]), weight.band::<B>(rows)))
        .reduce(B::float_add)
        .expect("a weight has at least one band")
}

/// `dy W` for the frozen `W` that `weight` rebuilds band by band: the gradient backward of
/// `x Wᵀ` hands `x`, computed without a graph (a constant under autodiff), for a layer
/// recomputed in backward once the gradient of its output is known.
///
/// # Shapes
/// - dy: `[rows, out]`; weight: `[out, in]`
/// - output: `[rows, in]`
pub fn frozen_transposed_matmul(dy: Tensor<2>, weight: &DenseWeight) -> Tensor<2> {
    let dy = dy.inner();
    #[cfg(feature = "tch")]
    if let burn::backend::DispatchDevice::LibTorch(_) = dy.device().as_dispatch() {
        type Torch = burn::backend::LibTorch;
        let dy = dy.try_into_primitive::<Torch>().expect("a LibTorch tensor");
        return Tensor::from_primitive::<Torch>(transposed_product::<Torch>(dy, weight));
    }
    let dy = dy.try_into_primitive::<Flex>().expect("frozen weights live on flex or LibTorch");
    Tensor::from_primitive::<Flex>(transposed_product::<Flex>(dy, weight))
}

impl FrozenOps for Flex {
    fn frozen_matmul(x: FloatTensor<Self>, weight: DenseWeight) -> FloatTensor<Self> {
        frozen_forward::<Self>(x, &weight)
    }
}

#[cfg(feature = "tch")]
impl FrozenOps for burn::backend::LibTorch {
    fn frozen_matmul(x: FloatTensor<Self>, weight: DenseWeight) -> FloatTensor<Self> {
        frozen_forward::<Self>(x, &weight)
    }
}

#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: Backend> Backward<B, 1> for FrozenMatmulBackward
where
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = DenseWeight;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [Some(node_x)] = ops.parents else { return };
        let dy = grads.consume::<B>(&ops.node);
        grads.register::<B>(node_x.id, transposed_product::<B>(dy, &ops.state));
    }
}

impl<B: Backend, C: CheckpointStrategy> FrozenOps for Autodiff<B, C>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    fn frozen_matmul(x: FloatTensor<Self>, weight: DenseWeight) -> FloatTensor<Self> {
        let prep = FrozenMatmulBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let y = frozen_forward::<B>(x.into_primitive(), &weight);
        finish(prep, weight, y)
    }
}

/// The fused operations as a burn backend extension: flex computes them, autodiff over flex adds
/// their backward.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
    fn fused_packed_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, biases: SequenceBiases, scale: f64) -> FloatTensor<Self>;
    fn fused_packed_prefix_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        prefix_k: FloatTensor<Self>,
        prefix_v: FloatTensor<Self>,
        biases: SequenceBiases,
        scale: f64,
    ) -> FloatTensor<Self>;
    fn fused_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self>;
    fn fused_rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self>;
    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// A contiguous f32 tensor's values.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused ops take contiguous f32 tensors")
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// How the values of a `[batch, heads, seq, head_dim]` tensor lie. Splitting a projection's
/// output into heads leaves the heads view of a contiguous `[batch, seq, heads, head_dim]`
/// (tokens-major); RoPE and packed attention read and write that as it is, and merging the heads
/// back is then a view too. Copying it heads-major cost flex a transposing copy of q, k and v, the
/// output and their gradients in every layer, on the calling thread.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeadsLayout {
    HeadsMajor,
    TokensMajor,
}

impl HeadsLayout {
    /// `t` (`[batch, heads, seq, head_dim]`) and how its values lie; copied heads-major if they lie
    /// neither way.
    fn of(t: FlexTensor) -> (FlexTensor, HeadsLayout) {
        let layout = t.layout();
        if let &[batch, heads, seq, head_dim] = &layout.shape()[..] {
            let tokens_major = [seq * heads * head_dim, head_dim, heads * head_dim, 1];
            let size = batch * seq * heads * head_dim;
            // A dim of one value can have any stride.
            let strides_match = layout.strides().iter().zip(tokens_major).zip([batch, heads, seq, head_dim]).all(|((&have, want), n)| n == 1 || have == want as isize);
            if heads > 1 && strides_match && layout.start_offset() == 0 && t.dtype() == DType::F32 && t.storage::<f32>().len() == size {
                return (t, HeadsLayout::TokensMajor);
            }
        }
        let t = if t.is_contiguous() { t } else { t.to_contiguous() };
        (t, HeadsLayout::HeadsMajor)
    }

    /// The values of a tensor of this layout, in memory order.
    fn values(self, t: &FlexTensor) -> &[f32] {
        match self {
            HeadsLayout::HeadsMajor => values(t),
            HeadsLayout::TokensMajor => t.storage::<f32>(),
        }
    }

    /// `[batch, heads, seq, head_dim]` `values` laid out this way, as a tensor.
    fn tensor(self, values: Vec<f32>, [batch, heads, seq, head_dim]: [usize; 4]) -> FlexTensor {
        match self {
            HeadsLayout::HeadsMajor => tensor(values, Shape::new([batch, heads, seq, head_dim])),
            HeadsLayout::TokensMajor => tensor(values, Shape::new([batch, seq, heads, head_dim])).transpose(1, 2),
        }
    }
}

/// The forwards, each returning what its backward keeps besides the inputs.
mod forward {
    use super::*;

    pub fn rms_norm(x: &FlexTensor, weight: &FlexTensor, eps: f64) -> (FlexTensor, Vec<f32>) {
        let (y, r) = kernels::rms_norm(values(x), values(weight), eps as f32);
        (tensor(y, x.layout().shape().clone()), r)
    }

    pub fn swiglu(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
        tensor(
            kernels::swiglu(values(gate), values(up)),
            gate.layout().shape().clone(),
        )
    }

    /// Attention's output, and its probabilities with each score row's maximum and sum. The
    /// queries are regrouped so that each K/V head's group of query heads is one product (as
    /// transformers' `repeat_kv`, without copying K/V).
    pub fn attention(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, bias: &FlexTensor, scale: f64) -> (FlexTensor, Vec<f32>, Vec<[f32; 2]>) {
        let dims = AttentionDims::of(q, k);
        let mut probs = dims.scores(q, k);
        let stats = kernels::softmax_in_place(&mut probs, values(bias), scale as f32, dims.heads, dims.seq, dims.keys);
        let out = kernels::matmul(&dims.operand(&probs, dims.rows(), dims.keys, false), &dims.operand(values(v), dims.keys, dims.head_dim, false), dims.rows(), dims.keys, dims.head_dim);
        (tensor(out, q.layout().shape().clone()), probs, stats)
    }

    /// [`attention`] of each sequence of a packed batch over its bias, the outputs joined and laid
    /// out as the queries are; and what each sequence's backward starts from. A prefix's keys and
    /// values (contiguous `[1, kv_heads, prefix, head_dim]`) go before each sequence's.
    pub fn packed_attention(inputs: &[(FlexTensor, HeadsLayout); 3], prefix: Option<&[FlexTensor; 2]>, biases: &SequenceBiases, scale: f64) -> (FlexTensor, Vec<SequenceAttention>) {
        let [(q, q_layout), (k, k_layout), (v, v_layout)] = inputs;
        let packed = PackedDims::of(q, k);
        let [prefix_k, prefix_v]: [&[f32]; 2] = prefix.map_or([&[], &[]], |[k, v]| [values(k), values(v)]);
        let mut start = 0;
        let (outputs, sequences): (Vec<FlexTensor>, Vec<SequenceAttention>) = biases
            .0
            .iter()
            .map(|bias| {
                let bias = bias.clone().try_into_primitive::<Flex>().expect("attention masks beside the activations").to_contiguous();
                let len = bias.layout().shape()[2];
                let [q, k, v] = [(q, *q_layout, packed.heads, &[][..]), (k, *k_layout, packed.kv_heads, prefix_k), (v, *v_layout, packed.kv_heads, prefix_v)]
                    .map(|(t, layout, heads, before)| packed.slice(t, layout, heads, start..start + len, before));
                start += len;
                let (y, probs, stats) = attention(&q, &k, &v, &bias, scale);
                let probs = match keeps_probabilities(probs.len()) {
                    true => Probabilities::Kept(probs),
                    false => Probabilities::Remade(stats, bias),
                };
                (y, SequenceAttention { q, k, v, probs })
            })
            .unzip();
        assert_eq!(start, packed.total, "the biases' sequences make up the packed batch");
        let parts: Vec<&[f32]> = outputs.iter().map(values).collect();
        (packed.join(&parts, *q_layout, packed.heads), sequences)
    }

    /// RoPE of `x` (`[batch, heads, seq, head_dim]`), or its transpose when `inverse`, laid out
    /// as `x` is.
    pub fn rope(x: FlexTensor, tables: &RopeTables, inverse: bool) -> FlexTensor {
        let (x, layout) = HeadsLayout::of(x);
        let &[batch, heads, seq, head_dim] = &x.layout().shape()[..] else { panic!("RoPE takes [batch, heads, seq, head_dim]") };
        let host = |t: &Tensor<2>| t.clone().try_into_primitive::<Flex>().expect("RoPE tables beside the activations").to_contiguous();
        let (cos, sin) = (host(&tables.cos), host(&tables.sin));
        let heads_inner = if layout == HeadsLayout::TokensMajor { heads } else { 1 };
        let y = kernels::rope(layout.values(&x), values(&cos), values(&sin), seq, head_dim, heads_inner, tables.pairing, inverse);
        layout.tensor(y, [batch, heads, seq, head_dim])
    }

    /// `lhs · rhs` over the last two dims, for operands with non-negative strides (views read in
    /// place: a transposed weight is not copied).
    pub fn matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> FlexTensor {
        let shape = lhs.layout().shape();
        let rank = shape.num_dims();
        let (m, k, n) = (shape[rank - 2], shape[rank - 1], rhs.layout().shape()[rank - 1]);
        let mut dims = shape[..rank - 2].to_vec();
        dims.extend([m, n]);
        tensor(kernels::matmul(&operand(lhs), &operand(rhs), m, k, n), Shape::from(dims))
    }

    /// A tensor as a GEMM operand: where each of its matrices starts in its buffer, and the
    /// strides of their rows and columns.
    fn operand(t: &FlexTensor) -> kernels::Operand<'_> {
        let layout = t.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        let rank = strides.len();
        let mut offsets = vec![layout.start_offset()];
        for d in 0..rank - 2 {
            offsets = offsets.iter().flat_map(|&o| (0..shape[d]).map(move |i| o + i * strides[d] as usize)).collect();
        }
        kernels::Operand { values: t.storage::<f32>(), offsets, row_stride: strides[rank - 2] as usize, col_stride: strides[rank - 1] as usize }
    }

    /// The tensor itself, or a contiguous copy where a stride is negative (a flipped view).
    pub fn positive(t: FlexTensor) -> FlexTensor {
        if t.layout().has_positive_strides() { t } else { t.to_contiguous() }
    }

    pub fn cross_entropy_sum(logits: &FlexTensor, targets: &[i64]) -> (FlexTensor, Vec<f32>) {
        let vocab = logits.layout().shape()[1];
        let (total, lse) = kernels::cross_entropy(values(logits), targets, vocab);
        (tensor(vec![total as f32], Shape::new([1])), lse)
    }
}

impl FusedOps for Flex {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        forward::rms_norm(&x.to_contiguous(), &weight.to_contiguous(), eps).0
    }
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        forward::swiglu(&gate.to_contiguous(), &up.to_contiguous())
    }
    fn fused_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, bias: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        forward::attention(&q.to_contiguous(), &k.to_contiguous(), &v.to_contiguous(), &bias.to_contiguous(), scale).0
    }
    fn fused_packed_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, biases: SequenceBiases, scale: f64) -> FloatTensor<Self> {
        forward::packed_attention(&[q, k, v].map(HeadsLayout::of), None, &biases, scale).0
    }
    fn fused_packed_prefix_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        prefix_k: FloatTensor<Self>,
        prefix_v: FloatTensor<Self>,
        biases: SequenceBiases,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prefix = [prefix_k.to_contiguous(), prefix_v.to_contiguous()];
        forward::packed_attention(&[q, k, v].map(HeadsLayout::of), Some(&prefix), &biases, scale).0
    }
    fn fused_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self> {
        forward::cross_entropy_sum(&logits.to_contiguous(), &targets).0
    }
    fn fused_rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        forward::rope(x, &tables, false)
    }
    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        forward::matmul(&forward::positive(lhs), &forward::positive(rhs))
    }
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = RopeTables;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [Some(node_x)] = ops.parents else { return };
        let dy = grads.consume::<Flex>(&ops.node);
        grads.register::<Flex>(node_x.id, forward::rope(dy, &ops.state, true));
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 1> for RmsNormBackward {
    /// x, weight, r per row.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [Some(node_x)] = ops.parents else { return };
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x, weight, r) = ops.state;
        let dx = kernels::rms_norm_backward(values(&x), values(&weight), &r, values(&dy));
        grads.register::<Flex>(node_x.id, tensor(dx, x.layout().shape().clone()));
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// gate, up.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (gate, up) = ops.state;
        let (dg, du) = kernels::swiglu_backward(values(&gate), values(&up), values(&dy));
        let shape = gate.layout().shape().clone();
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, tensor(dg, shape.clone()));
        }
        if let Some(node) = node_up {
            grads.register::<Flex>(node.id, tensor(du, shape));
        }
    }
}

/// The sizes of an attention: `q` `[batch, heads, seq, head_dim]`, `k` `[batch, kv_heads, keys,
/// head_dim]`; its products run over `batch · kv_heads` groups of `heads / kv_heads · seq` query
/// rows.
struct AttentionDims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    keys: usize,
    head_dim: usize,
}

impl AttentionDims {
    fn of(q: &FlexTensor, k: &FlexTensor) -> Self {
        let (&[batch, heads, seq, head_dim], &[_, kv_heads, keys, _]) = (&q.layout().shape()[..], &k.layout().shape()[..]) else {
            panic!("attention takes q [batch, heads, seq, head_dim] and k, v [batch, kv_heads, keys, head_dim]")
        };
        Self { batch, heads, kv_heads, seq, keys, head_dim }
    }

    /// Query rows a group: the query heads that read one K/V head, each `seq` rows.
    fn rows(&self) -> usize {
        self.heads / self.kv_heads * self.seq
    }

    /// A contiguous buffer of `batch · kv_heads` matrices `[rows, cols]` as a GEMM operand, or
    /// their transposes (`[cols, rows]`, read in place).
    fn operand<'a>(&self, values: &'a [f32], rows: usize, cols: usize, transposed: bool) -> kernels::Operand<'a> {
        let offsets = (0..self.batch * self.kv_heads).map(|g| g * rows * cols).collect();
        let (row_stride, col_stride) = if transposed { (1, cols) } else { (cols, 1) };
        kernels::Operand { values, offsets, row_stride, col_stride }
    }

    /// q kᵀ per group: `[rows, keys]` each.
    fn scores(&self, q: &FlexTensor, k: &FlexTensor) -> Vec<f32> {
        let (rows, d) = (self.rows(), self.head_dim);
        kernels::matmul(&self.operand(values(q), rows, d, false), &self.operand(values(k), self.keys, d, true), rows, d, self.keys)
    }
}

/// Probabilities of at most this many bytes (a sequence's, in a layer) are kept for backward;
/// larger ones are made again there. Measured on SmolLM2 LoRA (2 cores, Zen 3) with every one
/// made again: 3% slower at 4 × 256; on tool-call records at cutoff 1024, 7% faster (no fresh
/// pages for them) and 37% lighter.
const KEPT_PROBABILITIES_BYTES: usize = 8 << 20;

/// Whether attention over `score_cells` f32 scores (`batch · heads · seq · keys`) keeps its
/// probabilities for backward (rather than each row's maximum and sum) on flex.
pub fn keeps_probabilities(score_cells: usize) -> bool {
    score_cells * 4 <= KEPT_PROBABILITIES_BYTES
}

/// What attention's backward starts from besides q, k, v.
#[derive(Debug, Clone)]
enum Probabilities {
    Kept(Vec<f32>),
    /// Each score row's maximum and sum, and the bias: enough to make them again.
    Remade(Vec<[f32; 2]>, FlexTensor),
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// q, k, v, the probabilities, the scale.
    type State = (FlexTensor, FlexTensor, FlexTensor, Probabilities, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let nodes = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (q, k, v, probs, scale) = ops.state;
        let gradients = attention_gradients(&q, &k, &v, &probs, scale, values(&dy), nodes.each_ref().map(Option::is_some));
        for ((node, gradient), input) in nodes.into_iter().zip(gradients).zip([&q, &k, &v]) {
            if let (Some(node), Some(gradient)) = (node, gradient) {
                grads.register::<Flex>(node.id, tensor(gradient, input.layout().shape().clone()));
            }
        }
    }
}

/// The gradients of q, k and v of [`forward::attention`] from the output's `dy`, those `wanted`.
fn attention_gradients(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, probs: &Probabilities, scale: f64, dy: &[f32], wanted: [bool; 3]) -> [Option<Vec<f32>>; 3] {
    let dims = AttentionDims::of(q, k);
    let (rows, keys, d) = (dims.rows(), dims.keys, dims.head_dim);
    let remade;
    let probs = match probs {
        Probabilities::Kept(probs) => probs,
        Probabilities::Remade(stats, bias) => {
            let mut probs = dims.scores(q, k);
            kernels::probabilities_in_place(&mut probs, values(bias), stats, scale as f32, dims.heads, dims.seq, keys);
            remade = probs;
            &remade
        }
    };
    let [want_q, want_k, want_v] = wanted;
    // dV = Pᵀ dO, summed over the group's query heads by the product.
    let dv = want_v.then(|| kernels::matmul(&dims.operand(probs, rows, keys, true), &dims.operand(dy, rows, d, false), keys, rows, d));
    if !want_q && !want_k {
        return [None, None, dv];
    }
    // dS = scale · P ∘ (dP − Σ dP ∘ P), with dP = dO vᵀ.
    let dp = kernels::matmul(&dims.operand(dy, rows, d, false), &dims.operand(values(v), keys, d, true), rows, d, keys);
    let ds = kernels::softmax_backward(probs, &dp, scale as f32, keys);
    drop(dp);
    let dq = want_q.then(|| kernels::matmul(&dims.operand(&ds, rows, keys, false), &dims.operand(values(k), keys, d, false), rows, keys, d));
    let dk = want_k.then(|| kernels::matmul(&dims.operand(&ds, rows, keys, true), &dims.operand(values(q), rows, d, false), keys, rows, d));
    [dq, dk, dv]
}

/// The sizes of a packed batch's attention: `q` `[1, heads, total, head_dim]`, `k` and `v` `[1,
/// kv_heads, total, head_dim]`, the sequences one after another along `total`.
struct PackedDims {
    heads: usize,
    kv_heads: usize,
    total: usize,
    head_dim: usize,
}

impl PackedDims {
    fn of(q: &FlexTensor, k: &FlexTensor) -> Self {
        let (&[1, heads, total, head_dim], &[1, kv_heads, keys, _]) = (&q.layout().shape()[..], &k.layout().shape()[..]) else {
            panic!("packed attention takes q [1, heads, total, head_dim] and k, v [1, kv_heads, total, head_dim]")
        };
        assert_eq!(keys, total, "packed attention's keys are its queries' sequences");
        Self { heads, kv_heads, total, head_dim }
    }

    /// The positions `range` of every head of `t`, laid out `layout`, each head's after its rows
    /// of `before` (heads-major `[heads, rows, head_dim]`, or empty): `[1, heads, rows +
    /// range.len(), head_dim]`, heads-major.
    fn slice(&self, t: &FlexTensor, layout: HeadsLayout, heads: usize, range: Range<usize>, before: &[f32]) -> FlexTensor {
        let (all, d) = (layout.values(t), self.head_dim);
        let rows_before = before.len() / (heads * d);
        let mut part = Vec::with_capacity(heads * (rows_before + range.len()) * d);
        for head in 0..heads {
            part.extend_from_slice(&before[head * rows_before * d..][..rows_before * d]);
            match layout {
                HeadsLayout::HeadsMajor => part.extend_from_slice(&all[(head * self.total + range.start) * d..(head * self.total + range.end) * d]),
                HeadsLayout::TokensMajor => range.clone().for_each(|token| part.extend_from_slice(&all[(token * heads + head) * d..][..d])),
            }
        }
        tensor(part, Shape::new([1, heads, rows_before + range.len(), d]))
    }

    /// The sequences' heads-major `[1, heads, len, head_dim]` parts, in order, as one `[1, heads,
    /// total, head_dim]` tensor laid out `layout`.
    fn join(&self, parts: &[&[f32]], layout: HeadsLayout, heads: usize) -> FlexTensor {
        let d = self.head_dim;
        let mut all = Vec::with_capacity(heads * self.total * d);
        match layout {
            HeadsLayout::HeadsMajor => {
                for head in 0..heads {
                    for part in parts {
                        let values_a_head = part.len() / heads;
                        all.extend_from_slice(&part[head * values_a_head..][..values_a_head]);
                    }
                }
            }
            HeadsLayout::TokensMajor => {
                for part in parts {
                    let len = part.len() / (heads * d);
                    for token in 0..len {
                        (0..heads).for_each(|head| all.extend_from_slice(&part[(head * len + token) * d..][..d]));
                    }
                }
            }
        }
        assert_eq!(all.len(), heads * self.total * d, "the parts make up the packed batch");
        layout.tensor(all, [1, heads, self.total, d])
    }
}

/// One sequence of a packed attention: its slices of q, k, v and what its backward starts from.
#[derive(Debug, Clone)]
struct SequenceAttention {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: Probabilities,
}

/// Backward of packed attention: of q, k, v (3 parents), and of a prefix's keys and values too
/// (5).
#[derive(Debug)]
struct PackedAttentionBackward;

impl<const N: usize> Backward<Flex, N> for PackedAttentionBackward {
    /// Each sequence's slices (a prefix's rows first) and probabilities, how q, k and v are laid
    /// out, the scale.
    type State = (Vec<SequenceAttention>, [HeadsLayout; 3], f64);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (sequences, layouts, scale) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let wanted = std::array::from_fn(|i| ops.parents.get(i).is_some_and(Option::is_some));
        let gradients = packed_gradients(&sequences, layouts, scale, dy, wanted);
        for (node, gradient) in ops.parents.into_iter().zip(gradients) {
            if let (Some(node), Some(gradient)) = (node, gradient) {
                grads.register::<Flex>(node.id, gradient);
            }
        }
    }
}

/// The gradients of a packed attention's q, k, v (laid out `layouts`) and of the keys and values
/// of its prefix (`[1, kv_heads, prefix, head_dim]`, summed over the sequences, which all read
/// them) from its output's gradient `dy`, those `wanted`.
fn packed_gradients(sequences: &[SequenceAttention], layouts: [HeadsLayout; 3], scale: f64, dy: FlexTensor, wanted: [bool; 5]) -> [Option<FlexTensor>; 5] {
    let (dy, dy_layout) = HeadsLayout::of(dy);
    let (Some(first), &[1, heads, total, head_dim]) = (sequences.first(), &dy.layout().shape()[..]) else { return Default::default() };
    let (kv_heads, keys) = (first.k.layout().shape()[1], first.k.layout().shape()[2]);
    // Each sequence's keys are the prefix's, then its own as many as its queries.
    let prefix = keys - first.q.layout().shape()[2];
    let packed = PackedDims { heads, kv_heads, total, head_dim };
    let [want_q, want_k, want_v, want_prefix_k, want_prefix_v] = wanted;
    let mut start = 0;
    // Per input (q, k, v), each sequence's gradient without its prefix rows, which go to `prefixes`.
    let mut parts: [Vec<Vec<f32>>; 3] = Default::default();
    let mut prefixes = [want_prefix_k, want_prefix_v].map(|wanted| wanted.then(|| vec![0f32; kv_heads * prefix * head_dim]));
    for sequence in sequences {
        let len = sequence.q.layout().shape()[2];
        let dy = packed.slice(&dy, dy_layout, heads, start..start + len, &[]);
        start += len;
        let gradients = attention_gradients(&sequence.q, &sequence.k, &sequence.v, &sequence.probs, scale, values(&dy), [want_q, want_k || want_prefix_k, want_v || want_prefix_v]);
        let [dq, dk, dv] = gradients;
        parts[0].extend(dq);
        for ((part, prefix_sum), gradient) in parts[1..].iter_mut().zip(&mut prefixes).zip([dk, dv]) {
            let Some(gradient) = gradient else { continue };
            // Each head's rows: the prefix's `prefix`, then the sequence's `len`.
            let rows = (prefix + len) * head_dim;
            if let Some(sum) = prefix_sum {
                for (sum, head) in sum.chunks_mut(prefix * head_dim).zip(gradient.chunks(rows)) {
                    sum.iter_mut().zip(head).for_each(|(s, g)| *s += g);
                }
            }
            part.push(if prefix == 0 { gradient } else { gradient.chunks(rows).flat_map(|head| &head[prefix * head_dim..]).copied().collect() });
        }
    }
    let mut out: [Option<FlexTensor>; 5] = Default::default();
    for (i, ((part, heads), layout)) in parts.into_iter().zip([heads, kv_heads, kv_heads]).zip(layouts).enumerate() {
        if wanted[i] {
            let part: Vec<&[f32]> = part.iter().map(Vec::as_slice).collect();
            out[i] = Some(packed.join(&part, layout, heads));
        }
    }
    for (slot, sum) in out[3..].iter_mut().zip(prefixes) {
        *slot = sum.map(|sum| tensor(sum, Shape::new([1, kv_heads, prefix, head_dim])));
    }
    out
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// logits, targets, log-sum-exp per row.
    type State = (FlexTensor, Vec<i64>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [Some(node_logits)] = ops.parents else {
            return;
        };
        let grad = values(&grads.consume::<Flex>(&ops.node).to_contiguous())[0];
        let (logits, targets, lse) = ops.state;
        let shape = logits.layout().shape().clone();
        let dx = kernels::cross_entropy_backward(values(&logits), &targets, &lse, grad, shape[1]);
        grads.register::<Flex>(node_logits.id, tensor(dx, shape));
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    /// lhs if rhs takes a gradient, rhs if lhs does.
    type State = (Option<FlexTensor>, Option<FlexTensor>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_lhs, node_rhs] = ops.parents;
        let dy = forward::positive(grads.consume::<Flex>(&ops.node));
        let rank = dy.layout().num_dims();
        let (lhs, rhs) = ops.state;
        // d lhs = dy · rhsᵀ, d rhs = lhsᵀ · dy, the transposes as views.
        if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
            grads.register::<Flex>(node.id, forward::matmul(&dy, &rhs.transpose(rank - 2, rank - 1)));
        }
        if let (Some(node), Some(lhs)) = (node_rhs, lhs) {
            grads.register::<Flex>(node.id, forward::matmul(&lhs.transpose(rank - 2, rank - 1), &dy));
        }
    }
}

/// The output of an operation under autodiff: with `state` kept for its backward step when an
/// input is tracked, as is.
fn finish<B, BO, C, const N: usize>(prep: OpsKind<BO, B, BO::State, C, N>, state: BO::State, output: FloatTensor<B>) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    BO: Backward<B, N>,
    C: CheckpointStrategy,
{
    match prep {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_rope(x: FloatTensor<Self>, tables: RopeTables) -> FloatTensor<Self> {
        let prep = RopeBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let y = Flex::fused_rope(x.into_primitive(), tables.clone());
        finish(prep, tables, y)
    }

    fn fused_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let prep = RmsNormBackward.prepare::<C>([x.node()]).compute_bound().stateful();
        let (x, weight) = (x.into_primitive().to_contiguous(), weight.into_primitive().to_contiguous());
        let (y, r) = forward::rms_norm(&x, &weight, eps);
        finish(prep, (x, weight, r), y)
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful();
        let (gate, up) = (gate.into_primitive().to_contiguous(), up.into_primitive().to_contiguous());
        let y = forward::swiglu(&gate, &up);
        finish(prep, (gate, up), y)
    }

    fn fused_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, bias: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let prep = AttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        let [q, k, v, bias] = [q, k, v, bias].map(|t| t.into_primitive().to_contiguous());
        let (y, probs, stats) = forward::attention(&q, &k, &v, &bias, scale);
        let probs = match keeps_probabilities(probs.len()) {
            true => Probabilities::Kept(probs),
            false => Probabilities::Remade(stats, bias),
        };
        finish(prep, (q, k, v, probs, scale), y)
    }

    fn fused_packed_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, biases: SequenceBiases, scale: f64) -> FloatTensor<Self> {
        let prep = PackedAttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful();
        let inputs = [q, k, v].map(|t| HeadsLayout::of(t.into_primitive()));
        let (y, sequences) = forward::packed_attention(&inputs, None, &biases, scale);
        finish(prep, (sequences, inputs.map(|(_, layout)| layout), scale), y)
    }

    fn fused_packed_prefix_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        prefix_k: FloatTensor<Self>,
        prefix_v: FloatTensor<Self>,
        biases: SequenceBiases,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prep = PackedAttentionBackward.prepare::<C>([q.node(), k.node(), v.node(), prefix_k.node(), prefix_v.node()]).compute_bound().stateful();
        let inputs = [q, k, v].map(|t| HeadsLayout::of(t.into_primitive()));
        let prefix = [prefix_k, prefix_v].map(|t| t.into_primitive().to_contiguous());
        let (y, sequences) = forward::packed_attention(&inputs, Some(&prefix), &biases, scale);
        finish(prep, (sequences, inputs.map(|(_, layout)| layout), scale), y)
    }

    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        let prep = MatmulBackward.prepare::<C>([lhs.node(), rhs.node()]).compute_bound().stateful();
        let (lhs, rhs) = (forward::positive(lhs.into_primitive()), forward::positive(rhs.into_primitive()));
        let y = forward::matmul(&lhs, &rhs);
        finish(prep, (rhs_tracked.then_some(lhs), lhs_tracked.then_some(rhs)), y)
    }

    fn fused_cross_entropy_sum(logits: FloatTensor<Self>, targets: Vec<i64>) -> FloatTensor<Self> {
        let prep = CrossEntropyBackward.prepare::<C>([logits.node()]).compute_bound().stateful();
        let logits = logits.into_primitive().to_contiguous();
        let (total, lse) = forward::cross_entropy_sum(&logits, &targets);
        finish(prep, (logits, targets, lse), total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::{log_softmax, silu};
    use burn::tensor::{Device, Distribution, Int, TensorData};

    std::thread_local! {
        /// Band size for this thread's frozen products instead of the backend's.
        pub(super) static BAND_VALUES: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.5), device)
    }

    fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: Tensor<D>, tolerance: f32) {
        let (got, want) = (
            got.into_data().to_vec::<f32>().unwrap(),
            want.into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
            .fold(0f32, f32::max);
        assert!(worst < tolerance, "{what}: worst difference {worst:e}");
    }

    /// Runs `op` on leaves built from `inputs` (fused, then composed) and compares the outputs and
    /// the gradients of `Σ output · probe` with respect to every input.
    fn check<const D: usize, const N: usize>(
        what: &str,
        inputs: [Tensor<D>; N],
        fused: impl Fn(&[Tensor<D>; N]) -> Tensor<D>,
        composed: impl Fn(&[Tensor<D>; N]) -> Tensor<D>,
    ) {
        check_within(what, inputs, fused, composed, [2e-6, 2e-5]);
    }

    /// [`check`] with the tolerances of the output and of the gradients.
    fn check_within<const D: usize, const N: usize>(
        what: &str,
        inputs: [Tensor<D>; N],
        fused: impl Fn(&[Tensor<D>; N]) -> Tensor<D>,
        composed: impl Fn(&[Tensor<D>; N]) -> Tensor<D>,
        [output_tolerance, gradient_tolerance]: [f32; 2],
    ) {
        let leaves = || inputs.clone().map(|t| t.require_grad());
        let (fused_leaves, composed_leaves) = (leaves(), leaves());
        let (y_fused, y_composed) = (fused(&fused_leaves), composed(&composed_leaves));
        let probe = random(y_fused.dims(), &y_fused.device());
        let (g_fused, g_composed) = (
            (y_fused.clone() * probe.clone()).sum().backward(),
            (y_composed.clone() * probe).sum().backward(),
        );
        assert_close(what, y_fused, y_composed, output_tolerance);
        for (i, (f, c)) in fused_leaves.iter().zip(&composed_leaves).enumerate() {
            assert_close(
                &format!("{what}: gradient of input {i}"),
                f.grad(&g_fused).unwrap(),
                c.grad(&g_composed).unwrap(),
                gradient_tolerance,
            );
        }
    }

    /// RMSNorm from burn ops: `x / √(mean(x²) + eps) · weight`.
    fn composed_rms_norm(x: &Tensor<3>, weight: &Tensor<1>, eps: f64) -> Tensor<3> {
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        x.clone() * (variance + eps).sqrt().recip() * weight.clone().unsqueeze::<3>()
    }

    fn rms_norm_matches_burn_ops_on(device: Device) {
        let weight = random([40], &device);
        check(
            "rms_norm",
            [random([2, 7, 40], &device)],
            |[x]| rms_norm(x, &weight, 1e-5).unwrap(),
            |[x]| composed_rms_norm(x, &weight, 1e-5),
        );
    }

    #[test]
    fn rms_norm_matches_burn_ops() {
        rms_norm_matches_burn_ops_on(Device::flex().autodiff());
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn rms_norm_on_libtorch_matches_burn_ops() {
        rms_norm_matches_burn_ops_on(Device::libtorch().autodiff());
    }

    #[test]
    fn matmul_matches_burn_ops_on_views() {
        let device = Device::flex().autodiff();
        // A projection by a transposed weight, a narrowed and a flipped operand.
        check(
            "matmul 2-D",
            [random([7, 40], &device), random([300, 40], &device)],
            |[x, w]| matmul(x.clone(), w.clone().transpose()),
            |[x, w]| x.clone().matmul(w.clone().transpose()),
        );
        check(
            "matmul of views",
            [random([9, 12], &device), random([12, 6], &device)],
            |[a, b]| matmul(a.clone().narrow(1, 2, 8), b.clone().flip([0]).narrow(0, 1, 8)),
            |[a, b]| a.clone().narrow(1, 2, 8).matmul(b.clone().flip([0]).narrow(0, 1, 8)),
        );
        // Attention's q kᵀ over a batch of heads, below and above the threads' thresholds.
        for [b, h, s, d] in [[2, 3, 6, 4], [1, 4, 200, 64], [1, 2, 256, 128]] {
            check(
                "matmul 4-D",
                [random([b, h, s, d], &device), random([b, h, s, d], &device)],
                |[q, k]| matmul(q.clone(), k.clone().swap_dims(2, 3)),
                |[q, k]| q.clone().matmul(k.clone().swap_dims(2, 3)),
            );
        }
        // A frozen right operand: no gradient for it, and the product still matches.
        let w = random([5, 40], &device);
        let x = random([3, 40], &device).require_grad();
        let grads = matmul(x.clone(), w.clone().transpose()).sum().backward();
        assert_close("frozen rhs", x.grad(&grads).unwrap(), Tensor::<2>::ones([3, 5], &device).matmul(w.clone()), 2e-6);
        assert!(w.grad(&grads).is_none());
    }

    fn swiglu_matches_burn_ops_on_strided_halves_on(device: Device) {
        // Halves of one fused projection, as GLM's gate_up_proj: views with the row stride of both.
        let halves = |gu: &Tensor<3>| (gu.clone().narrow(2, 0, 33), gu.clone().narrow(2, 33, 33));
        check(
            "swiglu",
            [random([3, 5, 66], &device)],
            |[gu]| {
                let (gate, up) = halves(gu);
                swiglu(&gate, &up).unwrap()
            },
            |[gu]| {
                let (gate, up) = halves(gu);
                silu(gate) * up
            },
        );
    }

    #[test]
    fn swiglu_matches_burn_ops_on_strided_halves() {
        swiglu_matches_burn_ops_on_strided_halves_on(Device::flex().autodiff());
    }

    /// `fused` on a bf16 copy of `x` against `reference` on `x` in f32: output and input gradient
    /// within bf16's rounding.
    #[cfg(feature = "tch")]
    fn bf16_follows_f32<const D: usize, const E: usize>(
        what: &str,
        x: &Tensor<D>,
        fused: impl Fn(&Tensor<D>) -> Tensor<E>,
        reference: impl Fn(&Tensor<D>) -> Tensor<E>,
    ) {
        let (leaf_bf16, leaf_f32) = (x.clone().cast(DType::BF16).require_grad(), x.clone().require_grad());
        let (y_bf16, y_f32) = (fused(&leaf_bf16).cast(DType::F32), reference(&leaf_f32));
        let probe = random(y_f32.dims(), &x.device());
        let grads_bf16 = (y_bf16.clone() * probe.clone()).sum().backward();
        let grads_f32 = (y_f32.clone() * probe).sum().backward();
        assert_close(what, y_bf16, y_f32, 2e-2);
        let grad_bf16 = leaf_bf16.grad(&grads_bf16).unwrap().cast(DType::F32);
        assert_close(&format!("{what}: gradient"), grad_bf16, leaf_f32.grad(&grads_f32).unwrap(), 5e-2);
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn rms_norm_and_swiglu_on_libtorch_in_bf16_follow_f32() {
        let device = Device::libtorch().autodiff();
        let (x, weight, up) = (random([2, 7, 40], &device), random([40], &device), random([2, 7, 40], &device));
        bf16_follows_f32(
            "rms_norm",
            &x,
            |x| rms_norm(x, &weight.clone().cast(DType::BF16), 1e-5).unwrap(),
            |x| composed_rms_norm(x, &weight, 1e-5),
        );
        bf16_follows_f32("swiglu", &x, |x| swiglu(x, &up.clone().cast(DType::BF16)).unwrap(), |x| silu(x.clone()) * up.clone());
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn swiglu_on_libtorch_matches_burn_ops_on_strided_halves() {
        swiglu_matches_burn_ops_on_strided_halves_on(Device::libtorch().autodiff());
    }

    /// With K/V groups, a prefix every query sees, causal keys and padding; and a plain causal
    /// mask. Kept or made again in backward, the probabilities give the composed ops' gradients.
    #[test]
    fn attention_on_flex_matches_burn_ops_with_groups_a_prefix_and_padding() {
        let device = Device::flex().autodiff();
        let (batch, heads, kv_heads, seq, prefix, d) = (2, 6, 2, 5, 3, 8);
        let scale = (d as f64).powf(-0.5);
        for (bias, prefix) in [(prefixed_padded_bias(batch, seq, prefix, true, &device), prefix), (crate::layers::attention_bias(batch, seq, 0, None, None, &device), 0)] {
            check(
                "attention on flex",
                attention_inputs([batch, heads, kv_heads, seq, prefix + seq, d], &device),
                |[q, k, v]| attention(q, k, v, &bias, false, scale).unwrap(),
                |[q, k, v]| crate::layers::composed_attention(q.clone(), k.clone(), v.clone(), bias.clone(), scale),
            );
        }
        // Probabilities too large to keep, made again in backward (the same values as kept:
        // `kernels`' test). Long rows sum more of the last bits in which the composed softmax's
        // exp and the fused one's differ.
        let (long_heads, long_seq) = (16, 380);
        assert!(!keeps_probabilities(long_heads * long_seq * long_seq));
        let causal = crate::layers::attention_bias(1, long_seq, 0, None, None, &device);
        check_within(
            "attention on flex, probabilities made again",
            attention_inputs([1, long_heads, kv_heads, long_seq, long_seq, d], &device),
            |[q, k, v]| attention(q, k, v, &causal, false, scale).unwrap(),
            |[q, k, v]| crate::layers::composed_attention(q.clone(), k.clone(), v.clone(), causal.clone(), scale),
            [1e-5, 1e-4],
        );
        let bias = prefixed_padded_bias(batch, seq, prefix, false, &device);
        assert_a_frozen_k_leaves_q_and_v_their_gradients([batch, heads, kv_heads, seq, prefix + seq, d], &bias, scale, &device);
    }

    /// Sequences packed into one row, each causal over its own keys (or within a window), give what
    /// attending to each sequence's slices gives (`Attention::contexts_packed` without the fused
    /// operation); a long sequence's probabilities are made again in backward.
    #[test]
    fn packed_attention_on_flex_matches_burn_ops_per_sequence() {
        let device = Device::flex().autodiff();
        let (kv_heads, d) = (2, 8);
        let scale = (d as f64).powf(-0.5);
        for (heads, lengths, window, tolerances) in [
            (4, vec![3, 5, 1, 4], None, [2e-6, 2e-5]),
            (4, vec![3, 5, 1, 4], Some(2), [2e-6, 2e-5]),
            (16, vec![7, 380], None, [1e-5, 1e-4]),
        ] {
            let total = lengths.iter().sum();
            assert_eq!(keeps_probabilities(heads * 380 * 380), heads != 16);
            let biases: Vec<Tensor<4>> = lengths.iter().map(|&len| crate::layers::attention_bias(1, len, 0, None, window, &device)).collect();
            let per_sequence = |[q, k, v]: &[Tensor<4>; 3]| {
                let mut start = 0;
                let outputs = lengths.iter().zip(&biases).map(|(&len, bias)| {
                    let [q, k, v] = [q, k, v].map(|t| t.clone().narrow(2, start, len));
                    start += len;
                    crate::layers::composed_attention(q, k, v, bias.clone(), scale)
                });
                Tensor::cat(outputs.collect(), 2)
            };
            // Heads-major, and tokens-major as projections split into heads leave them.
            let tokens_major = [heads, kv_heads, kv_heads].map(|h| random([1, total, h, d], &device).swap_dims(1, 2));
            for (inputs, layout) in [(attention_inputs([1, heads, kv_heads, total, total, d], &device), "heads-major"), (tokens_major, "tokens-major")] {
                check_within(
                    &format!("packed attention on flex, {heads} heads, lengths {lengths:?}, window {window:?}, {layout}"),
                    inputs,
                    |[q, k, v]| packed_attention(q, k, v, None, &lengths, &biases, window.is_none(), scale).unwrap(),
                    per_sequence,
                    tolerances,
                );
            }
        }
    }

    /// After a prefix that every sequence reads (prefix tuning): its keys and values get the
    /// sequences' gradients summed.
    #[test]
    fn packed_attention_after_a_prefix_on_flex_matches_burn_ops_per_sequence() {
        let device = Device::flex().autodiff();
        let (heads, kv_heads, d, prefix, lengths) = (4, 2, 8, 3, [3, 5, 1, 4]);
        let total = lengths.iter().sum();
        let scale = (d as f64).powf(-0.5);
        let biases: Vec<Tensor<4>> = lengths.iter().map(|&len| crate::layers::attention_bias(1, len, prefix, None, None, &device)).collect();
        let per_sequence = |[q, k, v, prefix_k, prefix_v]: &[Tensor<4>; 5]| {
            let mut start = 0;
            let outputs = lengths.iter().zip(&biases).map(|(&len, bias)| {
                let [q, k, v] = [q, k, v].map(|t| t.clone().narrow(2, start, len));
                start += len;
                let (k, v) = (Tensor::cat(vec![prefix_k.clone(), k], 2), Tensor::cat(vec![prefix_v.clone(), v], 2));
                crate::layers::composed_attention(q, k, v, bias.clone(), scale)
            });
            Tensor::cat(outputs.collect(), 2)
        };
        let kv = |len| random([1, kv_heads, len, d], &device);
        check(
            "packed attention after a prefix on flex",
            [random([1, total, heads, d], &device).swap_dims(1, 2), kv(total), kv(total), kv(prefix), kv(prefix)],
            |[q, k, v, prefix_k, prefix_v]| packed_attention(q, k, v, Some((prefix_k, prefix_v)), &lengths, &biases, true, scale).unwrap(),
            per_sequence,
        );
    }

    /// Random q `[batch, heads, seq, d]`, k and v `[batch, kv_heads, keys, d]`.
    fn attention_inputs([batch, heads, kv_heads, seq, keys, d]: [usize; 6], device: &Device) -> [Tensor<4>; 3] {
        [random([batch, heads, seq, d], device), random([batch, kv_heads, keys, d], device), random([batch, kv_heads, keys, d], device)]
    }

    /// Only some inputs tracked (a frozen k): the others still get their gradients.
    fn assert_a_frozen_k_leaves_q_and_v_their_gradients(sizes: [usize; 6], bias: &Tensor<4>, scale: f64, device: &Device) {
        let [q, k, v] = attention_inputs(sizes, device);
        let (q, v) = (q.require_grad(), v.require_grad());
        let grads = attention(&q, &k, &v, bias, false, scale).unwrap().sum().backward();
        assert!(q.grad(&grads).is_some() && v.grad(&grads).is_some() && k.grad(&grads).is_none());
    }

    /// Attention bias for `seq` queries over `prefix` keys every query sees and then `seq` causal
    /// keys; in the second row the last key is padding, and with `padded_query` query 0 is too
    /// (every key masked).
    fn prefixed_padded_bias(batch: usize, seq: usize, prefix: usize, padded_query: bool, device: &Device) -> Tensor<4> {
        let keys = prefix + seq;
        let bias: Vec<f32> = (0..batch * seq * keys)
            .map(|i| {
                let (b, q, k) = (i / (seq * keys), i / keys % seq, i % keys);
                let masked = (k >= prefix && k - prefix > q) || (b == 1 && (k == keys - 1 || (padded_query && q == 0)));
                if masked { f32::MIN } else { 0.0 }
            })
            .collect();
        Tensor::<4>::from_data(TensorData::new(bias, [batch, 1, seq, keys]), device)
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn attention_on_libtorch_matches_burn_ops_with_groups_a_prefix_padding_or_causal() {
        let device = Device::libtorch().autodiff();
        let (batch, heads, kv_heads, seq, prefix, d) = (2, 4, 2, 5, 3, 8);
        // No padded query: LibTorch's backward gives its row no gradient and the composed ops a
        // uniform one, which training never sees (no loss reaches a padded position).
        let bias = prefixed_padded_bias(batch, seq, prefix, false, &device);
        let scale = (d as f64).powf(-0.5);
        check(
            "attention on LibTorch",
            attention_inputs([batch, heads, kv_heads, seq, prefix + seq, d], &device),
            |[q, k, v]| attention(q, k, v, &bias, false, scale).unwrap(),
            |[q, k, v]| crate::layers::composed_attention(q.clone(), k.clone(), v.clone(), bias.clone(), scale),
        );
        // The plain causal mask, as a packed sequence without a prefix has, left to LibTorch.
        let causal = crate::layers::attention_bias(1, seq, 0, None, None, &device);
        check(
            "causal attention on LibTorch",
            attention_inputs([1, heads, kv_heads, seq, seq, d], &device),
            |[q, k, v]| attention(q, k, v, &causal, true, scale).unwrap(),
            |[q, k, v]| crate::layers::composed_attention(q.clone(), k.clone(), v.clone(), causal.clone(), scale),
        );
        assert_a_frozen_k_leaves_q_and_v_their_gradients([batch, heads, kv_heads, seq, prefix + seq, d], &bias, scale, &device);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn low_rank_on_libtorch_matches_burn_ops_from_f32_and_bf16_inputs() {
        let device = Device::libtorch().autodiff();
        let (batch, seq, input, rank, output, scale) = (2, 3, 8, 4, 6, 0.5);
        let composed = |x: &Tensor<3>, a: &Tensor<2>, b: &Tensor<2>| {
            let rows = x.clone().cast(DType::F32).reshape([batch * seq, input]);
            rows.matmul(a.clone().transpose()).matmul(b.clone().transpose()).mul_scalar(scale).reshape([batch, seq, output])
        };
        for dtype in [DType::F32, DType::BF16] {
            let x = random([batch, seq, input], &device).cast(dtype);
            let (a, b) = (random([rank, input], &device), random([output, rank], &device));
            let probe = random([batch, seq, output], &device);
            let run = |op: &dyn Fn(&Tensor<3>, &Tensor<2>, &Tensor<2>) -> Tensor<3>| {
                let (x, a, b) = (x.clone().require_grad(), a.clone().require_grad(), b.clone().require_grad());
                let y = op(&x, &a, &b);
                let grads = (y.clone() * probe.clone()).sum().backward();
                (y, x.grad(&grads).unwrap().cast(DType::F32), a.grad(&grads).unwrap(), b.grad(&grads).unwrap())
            };
            let (y, dx, da, db) = run(&|x, a, b| low_rank(x, a, b, scale).unwrap());
            let (y_want, dx_want, da_want, db_want) = run(&composed);
            assert_eq!(y.dtype(), DType::F32);
            let tolerance = if dtype == DType::F32 { 2e-5 } else { 1e-2 };
            assert_close(&format!("low rank from {dtype:?}"), y, y_want, 2e-5);
            assert_close(&format!("low rank from {dtype:?}: dx"), dx, dx_want, tolerance);
            assert_close(&format!("low rank from {dtype:?}: dA"), da, da_want, 2e-5);
            assert_close(&format!("low rank from {dtype:?}: dB"), db, db_want, 2e-5);
        }
        // A frozen input (the first layer's): A and B still get theirs.
        let (x, a, b) = (random([batch, seq, input], &device), random([rank, input], &device).require_grad(), random([output, rank], &device).require_grad());
        let grads = low_rank(&x, &a, &b, scale).unwrap().sum().backward();
        assert!(a.grad(&grads).is_some() && b.grad(&grads).is_some() && x.grad(&grads).is_none());
    }

    /// The sum with the base output is PEFT's: computed in f32, rounded once to the base's dtype;
    /// the gradients are those of the cast-up sum.
    #[cfg(feature = "tch")]
    #[test]
    fn low_rank_onto_on_libtorch_rounds_the_sum_once() {
        let device = Device::libtorch().autodiff();
        let (batch, seq, input, rank, output, scale) = (2, 5, 8, 4, 6, 0.5);
        for dtype in [DType::F32, DType::BF16] {
            let (x, y) = (random([batch, seq, input], &device).cast(dtype), random([batch, seq, output], &device).cast(dtype));
            let (a, b) = (random([rank, input], &device), random([output, rank], &device));
            let probe = random([batch, seq, output], &device).cast(dtype);
            let run = |onto: bool| {
                let (x, y, a, b) = (x.clone().require_grad(), y.clone().require_grad(), a.clone().require_grad(), b.clone().require_grad());
                // An intermediate, as a projection's output is: burn holds it nowhere else.
                let base = y.clone().mul_scalar(1.0);
                let sum = match onto {
                    true => low_rank_onto(base, &x, &a, &b, scale).unwrap(),
                    false => (base.cast(DType::F32) + low_rank(&x, &a, &b, scale).unwrap()).cast(dtype),
                };
                let grads = (sum.clone() * probe.clone()).sum().backward();
                let of = |t: &Tensor<3>| t.grad(&grads).unwrap().cast(DType::F32).into_data();
                [sum.cast(DType::F32).into_data(), of(&y), of(&x), a.grad(&grads).unwrap().into_data(), b.grad(&grads).unwrap().into_data()]
            };
            assert_eq!(run(true), run(false), "{dtype:?}");
        }
    }

    /// A branch reading SwiGLU's output keeps gate and up and makes the product again: the same
    /// gradients, bit for bit, as keeping it; an output written since (dropout's in-place
    /// product) is kept as itself.
    #[cfg(feature = "tch")]
    #[test]
    fn low_rank_on_libtorch_after_swiglu_gives_the_gradients_of_its_input() {
        let device = Device::libtorch().autodiff();
        let (batch, seq, input, rank, output, scale) = (2, 3, 8, 4, 6, 0.5);
        let (a, b) = (random([rank, input], &device), random([output, rank], &device));
        let (gate, up) = (random([batch, seq, input], &device).cast(DType::BF16), random([batch, seq, input], &device).cast(DType::BF16));
        let probe = random([batch, seq, output], &device);
        let run = |through: &dyn Fn(Tensor<3>) -> Tensor<3>| {
            let (gate, up, a, b) = (gate.clone().require_grad(), up.clone().require_grad(), a.clone().require_grad(), b.clone().require_grad());
            let x = through(swiglu(&gate, &up).unwrap());
            let grads = (low_rank(&x, &a, &b, scale).unwrap() * probe.clone()).sum().backward();
            let of_input = |t: &Tensor<3>| t.grad(&grads).unwrap().cast(DType::F32).into_data();
            [of_input(&gate), of_input(&up), a.grad(&grads).unwrap().into_data(), b.grad(&grads).unwrap().into_data()]
        };
        // A copy of the product is not SwiGLU's output: the branch keeps it as it is.
        assert_eq!(run(&|x| x), run(&|x| x.cast(DType::F32).cast(DType::BF16)));
        // Written in place (a sole owner's scaling): the branch must read the scaled values.
        let [_, _, da, _] = run(&|x| x.mul_scalar(2.0));
        let [_, _, da_copy, _] = run(&|x| x.cast(DType::F32).cast(DType::BF16).mul_scalar(2.0));
        assert_eq!(da, da_copy);
    }

    #[cfg(feature = "tch")]
    #[test]
    fn packed_attention_on_libtorch_matches_burn_ops_per_sequence_with_or_without_a_prefix() {
        let device = Device::libtorch().autodiff();
        let (heads, kv_heads, d, prefix, lengths) = (4, 2, 8, 3, [3, 5, 1, 4]);
        let total = lengths.iter().sum();
        let scale = (d as f64).powf(-0.5);
        // Each sequence's slices with the prefix before its keys, as `Attention::contexts_packed`.
        let per_sequence = |[q, k, v, prefix_k, prefix_v]: &[Tensor<4>; 5], with_prefix: bool| {
            let (mut start, visible) = (0, if with_prefix { prefix } else { 0 });
            let outputs = lengths.map(|len| {
                let [q, mut k, mut v] = [q, k, v].map(|t| t.clone().narrow(2, start, len));
                start += len;
                if with_prefix {
                    (k, v) = (Tensor::cat(vec![prefix_k.clone(), k], 2), Tensor::cat(vec![prefix_v.clone(), v], 2));
                }
                crate::layers::composed_attention(q, k, v, crate::layers::attention_bias(1, len, visible, None, None, &device), scale)
            });
            Tensor::cat(outputs.to_vec(), 2)
        };
        let packed = |[q, k, v, prefix_k, prefix_v]: &[Tensor<4>; 5], with_prefix: bool| {
            packed_attention(q, k, v, with_prefix.then_some((prefix_k, prefix_v)), &lengths, &[], true, scale).unwrap()
        };
        let inputs = || {
            let kv = |len| random([1, kv_heads, len, d], &device);
            [random([1, heads, total, d], &device), kv(total), kv(total), kv(prefix), kv(prefix)]
        };
        let [q, k, v, prefix_k, prefix_v] = inputs();
        let with = |[q, k, v]: &[Tensor<4>; 3]| [q.clone(), k.clone(), v.clone(), prefix_k.clone(), prefix_v.clone()];
        check("packed attention on LibTorch", [q, k, v], |t| packed(&with(t), false), |t| per_sequence(&with(t), false));
        check("packed attention after a prefix on LibTorch", inputs(), |t| packed(t, true), |t| per_sequence(t, true));
        // Only some inputs tracked (a frozen k): the others still get theirs.
        let [q, k, v, prefix_k, prefix_v] = inputs();
        let (q, v, prefix_v) = (q.require_grad(), v.require_grad(), prefix_v.require_grad());
        let grads = packed_attention(&q, &k, &v, Some((&prefix_k, &prefix_v)), &lengths, &[], true, scale).unwrap().sum().backward();
        assert!(q.grad(&grads).is_some() && v.grad(&grads).is_some() && prefix_v.grad(&grads).is_some());
        assert!(k.grad(&grads).is_none() && prefix_k.grad(&grads).is_none());
        // Without autodiff.
        let plain = Device::libtorch();
        let inputs = inputs().map(|t| Tensor::from_data(t.into_data(), &plain));
        for with_prefix in [false, true] {
            let want = Tensor::from_data(per_sequence(&inputs, with_prefix).into_data(), &plain);
            assert_close("packed attention without autodiff", packed(&inputs, with_prefix), want, 2e-6);
        }
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn attention_on_libtorch_in_bf16_and_f16_stays_finite_on_padded_rows() {
        let device = Device::libtorch();
        let (batch, heads, seq, d) = (2, 2, 6, 16);
        let bias = prefixed_padded_bias(batch, seq, 0, true, &device);
        let qkv = [0; 3].map(|_| random([batch, heads, seq, d], &device));
        let scale = (d as f64).powf(-0.5);
        let [q, k, v] = qkv.clone();
        let want = crate::layers::composed_attention(q, k, v, bias.clone(), scale);
        for dtype in [DType::BF16, DType::F16] {
            let [q, k, v] = qkv.clone().map(|t| t.cast(dtype));
            let got = attention(&q, &k, &v, &bias, false, scale).unwrap().cast(DType::F32);
            assert!(got.clone().into_data().to_vec::<f32>().unwrap().iter().all(|x| x.is_finite()), "{dtype:?}");
            // The padded query (query 0 of the second sequence) reads every key through the same
            // floor: uniform in bf16, whose floor swamps the scores, a softmax of the scores in
            // f16. No loss reaches it; every other row must follow f32.
            let rows = |t: &Tensor<4>, b: Range<usize>, q: Range<usize>| t.clone().slice([b, 0..heads, q, 0..d]);
            for (b, q) in [(0..1, 0..seq), (1..2, 1..seq)] {
                assert_close(&format!("{dtype:?} attention"), rows(&got, b.clone(), q.clone()), rows(&want, b, q), 5e-2);
            }
            if dtype == DType::BF16 {
                assert_close("bf16 attention, padded query", got, want.clone(), 5e-2);
            }
        }
    }

    /// The composed loss: `-Σ log_softmax(logits)[target]` in f32.
    fn composed_cross_entropy(logits: &Tensor<2>, targets: &[i64]) -> Tensor<2> {
        let ids = Tensor::<2, Int>::from_data(TensorData::new(targets.to_vec(), [targets.len(), 1]), &logits.device());
        log_softmax(logits.clone().cast(DType::F32), 1).gather(1, ids).sum().neg().unsqueeze::<2>()
    }

    const CROSS_ENTROPY_TARGETS: [i64; 6] = [0, 49, 7, 7, 23, 1];

    fn cross_entropy_matches_burn_ops_on(device: Device) {
        check(
            "cross_entropy",
            [random([CROSS_ENTROPY_TARGETS.len(), 50], &device).mul_scalar(4.0)],
            |[logits]| cross_entropy_sum(logits, &CROSS_ENTROPY_TARGETS).unwrap().unsqueeze::<2>(),
            |[logits]| composed_cross_entropy(logits, &CROSS_ENTROPY_TARGETS),
        );
    }

    #[test]
    fn cross_entropy_matches_burn_ops() {
        cross_entropy_matches_burn_ops_on(Device::flex().autodiff());
    }

    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn cross_entropy_and_rope_on_libtorch_match_burn_ops_and_follow_f32_in_bf16() {
        let device = Device::libtorch().autodiff();
        cross_entropy_matches_burn_ops_on(device.clone());
        rope_matches_burn_ops_for_both_pairings_on(device.clone());
        let logits = random([CROSS_ENTROPY_TARGETS.len(), 50], &device).mul_scalar(4.0);
        bf16_follows_f32(
            "cross_entropy",
            &logits,
            |x| cross_entropy_sum(x, &CROSS_ENTROPY_TARGETS).unwrap().unsqueeze::<2>(),
            |x| composed_cross_entropy(x, &CROSS_ENTROPY_TARGETS),
        );
        let rope = crate::layers::Rope::new(crate::config::RopeConfig { theta: 10_000.0, rotary_dim: 8, pairing: RopePairing::Half, scaling: None });
        bf16_follows_f32("rope", &random([2, 3, 5, 12], &device), |x| rope.apply(x.clone(), 4), |x| rope.apply(x.clone(), 4));
    }

    #[test]
    fn frozen_matmul_rebuilds_the_weight_band_by_band_for_backward() {
        let device = Device::flex().autodiff();
        // A bf16 weight on the plain device, made dense in f32 for each product.
        let weight = random([9, 12], &Device::flex()).cast(DType::BF16);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dense = {
            let (weight, calls) = (weight.clone(), calls.clone());
            let rows = move |rows: Range<usize>, dtype| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                weight.clone().slice(rows).cast(dtype)
            };
            DenseWeight::new([9, 12], 1, DType::F32, rows)
        };
        let constant = weight.cast(DType::F32).to_device(&device);
        // Bands of 4 rows: 0..4, 4..8, 8..9.
        BAND_VALUES.set(Some(4 * 12));
        check(
            "frozen_matmul",
            [random([5, 12], &device)],
            |[x]| frozen_matmul(x, dense.clone()).unwrap(),
            |[x]| x.clone().matmul(constant.clone().transpose()),
        );
        BAND_VALUES.set(None);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2 * 3, "each band once forward, once backward");
    }

    /// Widening a bf16 or f16 weight (or a band of its rows, a view at an offset) over the pool
    /// gives the cast's values bit for bit, infinities and subnormals included.
    #[test]
    fn widened_16_bit_weights_are_the_cast() {
        let device = Device::flex();
        let mut values: Vec<f32> = random([70, 1000], &device).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        values[..5].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, 1e-39, 1e-7, -0.0]);
        let weight = Tensor::<2>::from_data(TensorData::new(values, [70, 1000]), &device);
        for dtype in [DType::BF16, DType::F16] {
            let weight = weight.clone().cast(dtype);
            for band in [weight.clone(), weight.clone().slice(17..53)] {
                let bits = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>();
                assert_eq!(bits(widen(&band).unwrap()), bits(band.cast(DType::F32)), "{dtype:?}");
            }
        }
        assert!(widen(&weight).is_none());
    }

    /// Bands hold about the values asked for, start on the quantization's alignment and cover
    /// every row once.
    #[test]
    fn bands_cover_the_rows_on_whole_blocks() {
        let bands = |shape, align, values| DenseWeight::new(shape, align, DType::F32, |_, _| unreachable!()).bands(values).collect::<Vec<_>>();
        // A 7B MLP projection in NF4 with double quantization, in bands of 4M values.
        let mlp = bands([11008, 4096], 64 * 256, 1 << 22);
        assert_eq!((mlp.len(), mlp[0].clone(), mlp[10].clone()), (11, 0..1024, 10240..11008));
        // 576 values a row: a group of 256 blocks is 16,384 / gcd(576, 16,384) = 256 rows.
        assert!(bands([49152, 576], 64 * 256, 1 << 22).iter().all(|r| r.start % 256 == 0 && r.len() == 7168 || r.end == 49152));
        assert_eq!(bands([1536, 576], 64, FLEX_BAND_VALUES), vec![0..1536]);
        // A weight shorter than a group of blocks: one band.
        assert_eq!(bands([64, 64], 64 * 256, 1 << 22), vec![0..64]);
        // Rows wider than a band: one row at a time.
        assert_eq!(bands([3, 1 << 23], 1, 1 << 22), vec![0..1, 1..2, 2..3]);
    }

    /// Both pairings, on part of each head, from a position offset. The composed reference runs
    /// in f64, where the fused kernels do not apply.
    fn rope_matches_burn_ops_for_both_pairings_on(device: Device) {
        use crate::config::RopeConfig;
        use crate::layers::Rope;
        for pairing in [RopePairing::Half, RopePairing::Interleaved] {
            let rope = Rope::new(RopeConfig { theta: 10_000.0, rotary_dim: 8, pairing, scaling: None });
            // Heads-major, and tokens-major as a projection split into heads leaves it.
            for x in [random([2, 3, 5, 12], &device), random([2, 5, 3, 12], &device).swap_dims(1, 2)] {
                check(
                    &format!("rope {pairing:?}"),
                    [x],
                    |[x]| rope.apply(x.clone(), 4),
                    |[x]| rope.apply(x.clone().cast(DType::F64), 4).cast(DType::F32),
                );
            }
        }
    }

    #[test]
    fn rope_matches_burn_ops_for_both_pairings() {
        rope_matches_burn_ops_for_both_pairings_on(Device::flex().autodiff());
    }

    /// Bit for bit what the composed lookup computes, for one and two values a byte (GGUF's
    /// split halves and minimums: `ggml::tests`).
    #[test]
    fn lookup_and_scale_equals_the_composed_lookup() {
        let device = Device::flex();
        let bytes: Vec<u8> = (0..4 * 64).map(|i| (i * 37 % 256) as u8).collect();
        let absmax = random([8], &device);
        for per_byte in [1, 2] {
            let table: Vec<f32> = (0..256 * per_byte).map(|i| (i as f32 * 0.37).sin()).collect();
            let n = bytes.len() * per_byte;
            let shape = [n / 64, 64];
            let packed = crate::nf4::u8_tensor(bytes.clone(), &device);
            let scales = absmax.clone().slice(0..n / 64);
            let band = PackedBand { bytes: &packed, table: &table, high: None, scales: &scales, mins: None, shape, packing: kernels::Packing::Adjacent };
            let fused = lookup_and_scale(&band, DType::F32).unwrap();
            let composed = crate::nf4::lookup_bytes(&packed, table).reshape([n / 64, 64]) * absmax.clone().slice(0..n / 64).reshape([n / 64, 1]);
            assert_eq!(fused.into_data().to_vec::<f32>().unwrap(), composed.into_data().to_vec::<f32>().unwrap());
        }
    }

    /// Outside autodiff (generation) the same kernels run, and bf16 or a trained weight fall back.
    #[test]
    fn plain_flex_runs_fused_and_other_cases_fall_back() {
        let device = Device::flex();
        let x = random([1, 3, 8], &device);
        let weight = random([8], &device);
        let y = rms_norm(&x, &weight, 1e-6).unwrap();
        assert_close("plain rms_norm", y, composed_rms_norm(&x, &weight, 1e-6), 2e-6);
        assert!(rms_norm(&x.clone().cast(DType::BF16), &weight, 1e-6).is_none());
        let trained = Tensor::<1>::ones([8], &device.clone().autodiff()).require_grad();
        assert!(rms_norm(&x.clone().to_device(&trained.device()), &trained, 1e-6).is_none());
    }
}
