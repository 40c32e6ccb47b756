//! Grouped-query attention with RoPE, and what adapters add to it (a prefix of keys and values,
//! LLaMA-Adapter's gated prompt) through [`LayerExtras`].

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor};

use crate::layers::{Projection, RmsNorm, Rope, grouped_attention};

#[derive(Module, Debug)]
pub struct SeparateQkv<P> {
    pub q_proj: P,
    pub k_proj: P,
    pub v_proj: P,
}

#[derive(Module, Debug)]
pub enum QkvProjection<P> {
    Separate(SeparateQkv<P>),
    /// ChatGLM `query_key_value`: rows `[q | k | v]`.
    Fused(P),
}

/// What an adapter adds inside one layer's attention; the decoder knows no method beyond this.
#[derive(Debug, Clone, Default)]
pub struct LayerExtras {
    /// Keys and values placed before every other key, without RoPE and visible to every query
    /// (prefix tuning, P-Tuning v2). Shapes `[batch, kv_heads, prefix, head_dim]`.
    pub prefix: Option<(Tensor<4>, Tensor<4>)>,
    /// Whether the prefix occupies the first positions, so real tokens start at position
    /// `prefix` (PEFT on transformers, whose cache positions count the prefix), or no positions,
    /// so they start at 0 (THUDM's ChatGLM P-Tuning v2).
    pub prefix_takes_positions: bool,
    /// A gated adaption prompt (LLaMA-Adapter): prompt `[1, len, hidden]` and gate `[1]`. Its
    /// keys/values come from this layer's frozen k/v projections, the layer's (RoPE'd) queries
    /// attend to them alone, and `o_proj(gate · softmax(q kᵀ/√d) v)` is added to the output.
    pub adaption: Option<(Tensor<3>, Tensor<1>)>,
}

/// Qwen3's RMSNorm over each head of the queries and of the keys, before RoPE.
#[derive(Module, Debug)]
pub struct QkNorm {
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Attention<P> {
    pub qkv: QkvProjection<P>,
    pub o_proj: P,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub qk_norm: Option<QkNorm>,
}

impl<P: Projection> Attention<P> {
    /// q, k, v projections of `x`: `[batch, seq, heads·d]`, `[batch, seq, kv_heads·d]` ×2.
    fn project(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        let (q_dim, kv_dim) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        match &self.qkv {
            QkvProjection::Separate(p) => (p.q_proj.forward(x.clone()), p.k_proj.forward(x.clone()), p.v_proj.forward(x)),
            QkvProjection::Fused(p) => {
                let qkv = p.forward(x);
                (qkv.clone().narrow(2, 0, q_dim), qkv.clone().narrow(2, q_dim, kv_dim), qkv.narrow(2, q_dim + kv_dim, kv_dim))
            }
        }
    }

    /// Returns `(output, k, v)`, with `k`, `v` the keys/values of past + new positions (after
    /// RoPE, without any prefix) for the cache.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - past: `[batch, kv_heads, past, head_dim]` each
    /// - bias: `[batch, 1, seq, prefix + past + seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        past: Option<(Tensor<4>, Tensor<4>)>,
        bias: Tensor<4>,
        extras: Option<&LayerExtras>,
    ) -> (Tensor<3>, Tensor<4>, Tensor<4>) {
        let (contexts, k, v) = self.contexts(x, rope, past, bias, extras);
        (self.output(contexts), k, v)
    }

    /// [`Self::forward`] up to `o_proj`: the inputs whose `o_proj` products sum to the output
    /// (the attended values, then the adaption prompt's share), and the cache's `k`, `v`.
    ///
    /// # Shapes
    /// - x, contexts: `[batch, seq, hidden]`; the rest as [`Self::forward`]
    pub fn contexts(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        past: Option<(Tensor<4>, Tensor<4>)>,
        bias: Tensor<4>,
        extras: Option<&LayerExtras>,
    ) -> (Vec<Tensor<3>>, Tensor<4>, Tensor<4>) {
        let (q, k, v) = self.project_heads(x);
        let past_len = past.as_ref().map_or(0, |(k, _)| k.dims()[2]);
        let start = past_len + position_shift(extras);
        let q = rope.apply(q, start);
        let mut k = rope.apply(k, start);
        let mut v = v;
        if let Some((past_k, past_v)) = past {
            k = Tensor::cat(vec![past_k, k], 2);
            v = Tensor::cat(vec![past_v, v], 2);
        }
        let prefix = prefix_like(extras, &k, &v);
        let (keys, values) = with_prefix(k.clone(), v.clone(), prefix.as_ref());
        let attended = grouped_attention(q.clone(), keys, values, bias, false);
        (self.o_inputs(attended, q, extras), k, v)
    }

    /// Attention over sequences packed into one row without padding, up to `o_proj` as
    /// [`Self::contexts`]: each sequence attends causally within itself, with positions from 0,
    /// as if it were alone in the batch.
    ///
    /// # Shapes
    /// - x, contexts: `[1, Σ len, hidden]`
    /// - biases: `[1, 1, len, prefix + len]` per sequence, in order; `causal`: each is the plain
    ///   causal mask after the prefix (no sliding window)
    pub fn contexts_packed(&self, x: Tensor<3>, rope: &Rope, biases: &[Tensor<4>], causal: bool, extras: Option<&LayerExtras>) -> Vec<Tensor<3>> {
        let (q, k, v) = self.project_heads(x);
        let start = position_shift(extras);
        let lengths: Vec<usize> = biases.iter().map(|bias| bias.dims()[2]).collect();
        let (q, k) = (rope.apply_packed(q, &lengths, start), rope.apply_packed(k, &lengths, start));
        let prefix = prefix_like(extras, &k, &v);
        let scale = (self.head_dim as f64).powf(-0.5);
        let fused = crate::fused::packed_attention(&q, &k, &v, prefix.as_ref().map(|(k, v)| (k, v)), &lengths, biases, causal, scale);
        if let Some(attended) = fused {
            return self.o_inputs(attended, q, extras);
        }
        let (mut attended, mut offset) = (Vec::new(), 0);
        for (bias, &len) in biases.iter().zip(&lengths) {
            let segment = |t: &Tensor<4>| t.clone().narrow(2, offset, len);
            let (keys, values) = with_prefix(segment(&k), segment(&v), prefix.as_ref());
            // Without a prefix or a window, a packed sequence's bias is the plain causal mask.
            let plain = causal && keys.dims()[2] == len;
            attended.push(grouped_attention(segment(&q), keys, values, bias.clone(), plain));
            offset += len;
        }
        self.o_inputs(Tensor::cat(attended, 2), q, extras)
    }

    /// q, k, v projections of `x` split into heads: b,s,h*d -> b,h,s,d.
    fn project_heads(&self, x: Tensor<3>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, s, _] = x.dims();
        let (q, k, v) = self.project(x);
        let (q, k) = match &self.qk_norm {
            Some(norm) => (per_head(q, &norm.q_norm, self.head_dim), per_head(k, &norm.k_norm, self.head_dim)),
            None => (q, k),
        };
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, self.head_dim]).swap_dims(1, 2);
        (heads(q, self.num_heads), heads(k, self.num_kv_heads), heads(v, self.num_kv_heads))
    }

    /// The inputs of `o_proj`: the attended values, and the gated adaption prompt's share read
    /// by the (RoPE'd) queries `q`.
    fn o_inputs(&self, attended: Tensor<4>, q: Tensor<4>, extras: Option<&LayerExtras>) -> Vec<Tensor<3>> {
        let mut inputs = vec![self.merge_heads(attended)];
        if let Some((prompt, gate)) = extras.and_then(|e| e.adaption.clone()) {
            inputs.push(self.merge_heads(self.adaption_attention(q, prompt, gate)));
        }
        inputs
    }

    /// The sum of `o_proj` over the contexts: the attention's output.
    pub fn output(&self, contexts: Vec<Tensor<3>>) -> Tensor<3> {
        contexts.into_iter().map(|c| self.o_proj.forward(c)).reduce(|sum, out| sum + out).expect("attention has a context")
    }

    /// [`Projection::surrogate`] of [`Self::output`]: `o_proj`'s backward without its forward.
    pub fn output_surrogate(&self, contexts: Vec<Tensor<3>>, grad: &Tensor<3>) -> Tensor<1> {
        contexts.into_iter().map(|c| self.o_proj.surrogate(c, grad)).reduce(|sum, s| sum + s).expect("attention has a context")
    }

    /// b,h,s,d -> b,s,h*d
    fn merge_heads(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, h, s, d] = x.dims();
        x.swap_dims(1, 2).reshape([b, s, h * d])
    }

    /// `gate · softmax(q kᵀ/√d) v` over the prompt's keys only (no mask, no RoPE on the prompt).
    ///
    /// # Shapes
    /// - q: `[batch, heads, seq, head_dim]`; prompt: `[1, len, hidden]`; gate: `[1]`
    /// - output: `[batch, heads, seq, head_dim]`
    fn adaption_attention(&self, q: Tensor<4>, prompt: Tensor<3>, gate: Tensor<1>) -> Tensor<4> {
        let [b, heads, s, d] = q.dims();
        let len = prompt.dims()[1];
        let kv = self.num_kv_heads;
        let dtype = q.dtype();
        let (_, k, v) = self.project(prompt.cast(dtype));
        let k = match &self.qk_norm {
            Some(norm) => per_head(k, &norm.k_norm, d),
            None => k,
        };
        // 1,len,kv*d -> 1,kv,len,d
        let k = k.reshape([1, len, kv, d]).swap_dims(1, 2);
        let v = v.reshape([1, len, kv, d]).swap_dims(1, 2);
        let q = q.reshape([b, kv, heads / kv * s, d]);
        let scores = crate::fused::matmul(q, k.swap_dims(2, 3)).mul_scalar((d as f64).powf(-0.5));
        let probs = softmax(scores.cast(DType::F32), 3).cast(dtype) * gate.cast(dtype).reshape([1, 1, 1, 1]);
        crate::fused::matmul(probs, v).reshape([b, heads, s, d])
    }
}

/// `norm` over each head's `d` values of `x`.
///
/// # Shapes
/// - x, output: `[batch, seq, heads·d]`
fn per_head(x: Tensor<3>, norm: &RmsNorm, d: usize) -> Tensor<3> {
    let [b, s, width] = x.dims();
    // b,s,n·d -> b,s·n,d: RMSNorm runs over the last dim.
    norm.forward(x.reshape([b, s * width / d, d])).reshape([b, s, width])
}

/// Where real tokens' positions start: after the prefix when it takes positions (PEFT).
fn position_shift(extras: Option<&LayerExtras>) -> usize {
    match extras {
        Some(LayerExtras { prefix: Some((prefix_k, _)), prefix_takes_positions: true, .. }) => prefix_k.dims()[2],
        _ => 0,
    }
}

/// The prefix's keys and values (if any) in the dtypes of `k` and `v`.
fn prefix_like(extras: Option<&LayerExtras>, k: &Tensor<4>, v: &Tensor<4>) -> Option<(Tensor<4>, Tensor<4>)> {
    extras.and_then(|e| e.prefix.clone()).map(|(prefix_k, prefix_v)| (prefix_k.cast(k.dtype()), prefix_v.cast(v.dtype())))
}

/// Keys and values with `prefix`'s placed before them.
fn with_prefix(k: Tensor<4>, v: Tensor<4>, prefix: Option<&(Tensor<4>, Tensor<4>)>) -> (Tensor<4>, Tensor<4>) {
    match prefix {
        Some((prefix_k, prefix_v)) => (Tensor::cat(vec![prefix_k.clone(), k], 2), Tensor::cat(vec![prefix_v.clone(), v], 2)),
        None => (k, v),
    }
}
