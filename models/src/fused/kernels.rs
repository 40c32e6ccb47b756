//! Row kernels on contiguous f32 slices behind the fused operations, and the GEMM call behind
//! the fused product (strided operands). Each row kernel makes one or two passes over a row, and
//! rows, like a product's column shares, are spread over rayon's global pool: flex's own, so
//! `RAYON_NUM_THREADS` (`ember bench --threads`) bounds them too.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::config::RopePairing;

/// Defines a row kernel compiled three times: for AVX-512, for AVX2 with FMA, and for the build's
/// baseline (SSE2 on x86-64), the widest the CPU has chosen at each call. The baseline compiles
/// [`exp`] to scalar code (mulss, addss), where the LM head's cross-entropy and attention's softmax
/// take one exponential a value. Every copy runs the same operations in the same order (Rust
/// never fuses a multiply and an add, nor reorders a sum), so every copy computes the same values.
macro_rules! widest {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn baseline($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { baseline($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { baseline($($arg),*) }
                match vector_unit() {
                    // SAFETY: the CPU has the features each copy is compiled for.
                    VectorUnit::Avx512 => return unsafe { avx512($($arg),*) },
                    VectorUnit::Avx2 => return unsafe { avx2($($arg),*) },
                    VectorUnit::Baseline => {}
                }
            }
            baseline($($arg),*)
        }
    };
}

/// The widest vector unit of this CPU that [`widest!`] compiles for.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
enum VectorUnit {
    Avx512,
    Avx2,
    Baseline,
}

/// The vector unit [`widest!`] kernels run on (in tests, the one a test asks for).
#[cfg(target_arch = "x86_64")]
fn vector_unit() -> VectorUnit {
    #[cfg(test)]
    if let Some(unit) = tests::FORCED_UNIT.get() {
        return unit;
    }
    *VECTOR_UNIT
}

#[cfg(target_arch = "x86_64")]
static VECTOR_UNIT: std::sync::LazyLock<VectorUnit> = std::sync::LazyLock::new(|| {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") && has!("avx2") && has!("fma") {
        VectorUnit::Avx512
    } else if has!("avx2") && has!("fma") {
        VectorUnit::Avx2
    } else {
        VectorUnit::Baseline
    }
});

/// Rows per rayon task: about 16k values, so that small tensors stay on one thread (waking the
/// other costs more than it saves).
fn min_rows(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// An output of `len` values for a kernel that writes every one of them: no pass zeroes it first,
/// which would run on the calling thread alone, before the rows are spread over the pool.
fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut values = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialization.
    unsafe { values.set_len(len) };
    values
}

/// The values of an [`uninit`] output.
///
/// # Safety
/// Every value has been written.
unsafe fn assume_init(values: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut values = std::mem::ManuallyDrop::new(values);
    // SAFETY: the caller wrote every value; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { Vec::from_raw_parts(values.as_mut_ptr().cast::<f32>(), values.len(), values.capacity()) }
}

/// A part of an [`uninit`] output as values.
///
/// # Safety
/// Every value of `part` has been written.
unsafe fn written(part: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: as for `assume_init`.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// e^x within 2 ulp (Cephes' `expf` polynomial), written as plain arithmetic that the compiler
/// vectorizes; libm's `expf` is one call per value (9% of a training step). Below -87 it returns
/// exactly 0 rather than a denormal, which masked attention scores (-inf) rely on; above 88.3
/// (e^88.3 ≈ 2·10³⁸), infinity.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.3);
    let t = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 in two parts, so that `n·ln2` is exact to f32 precision.
    let r = clamped - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ from the exponent bits; n ∈ [-126, 127] after the clamp.
    let two_n = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else if x > 88.3 {
        f32::INFINITY
    } else {
        e * two_n
    }
}

/// Σ aᵢ·bᵢ with 16 partial sums, which the compiler keeps in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0f32; 16];
    let (chunks_a, chunks_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..16 {
            partial[i] += ca[i] * cb[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Σ rowᵢ with 16 partial sums, as [`dot`]: one running sum waits on each addition's latency.
#[inline(always)]
fn sum(row: &[f32]) -> f32 {
    let mut partial = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            partial[i] += c[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(row: &[f32]) -> f32 {
    let mut partial = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..16 {
            partial[i] = partial[i].max(c[i]);
        }
    }
    partial.iter().fold(tail, |m, &v| m.max(v))
}

widest! {
    /// Writes `exp(row − shift)` into `out` and returns its sum.
    fn exp_shifted(row: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        for (o, &v) in out.iter_mut().zip(row) {
            *o = exp(v - shift);
        }
        sum(out)
    }
}

/// RMSNorm of each `weight.len()`-wide row: `y = x·r·w` with `r = 1/√(mean(x²) + eps)`.
/// Returns `(y, r)`, `r` one value per row (what backward needs besides `x`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = weight.len();
    // Whole rows: each is written in full (the output is not zeroed).
    assert_eq!(x.len() % width, 0, "RMSNorm takes whole rows");
    let mut y = uninit(x.len());
    let mut r = vec![0f32; x.len() / width];
    y.par_chunks_mut(width)
        .zip(r.par_iter_mut())
        .zip(x.par_chunks(width))
        .with_min_len(min_rows(width))
        .for_each(|((y, r), x)| *r = rms_norm_row(y, x, weight, eps));
    // SAFETY: every row was written above.
    (unsafe { assume_init(y) }, r)
}

widest! {
    /// One row of [`rms_norm`]; returns its `r`.
    fn rms_norm_row(y: &mut [MaybeUninit<f32>], x: &[f32], weight: &[f32], eps: f32) -> f32 {
        let r = 1.0 / (dot(x, x) / weight.len() as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
            y.write(x * r * w);
        }
        r
    }
}

/// ∂L/∂x of [`rms_norm`] with the weight frozen: `r·(w·dy − x·r²·mean(w·dy·x))` per row.
pub fn rms_norm_backward(x: &[f32], weight: &[f32], r: &[f32], dy: &[f32]) -> Vec<f32> {
    let width = weight.len();
    assert!(x.len() % width == 0 && dy.len() == x.len() && r.len() == x.len() / width, "RMSNorm's backward takes whole rows");
    let mut dx = uninit(x.len());
    dx.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .zip(dy.par_chunks(width))
        .zip(r.par_iter())
        .with_min_len(min_rows(width))
        .for_each(|(((dx, x), dy), &r)| rms_norm_backward_row(dx, x, dy, weight, r));
    // SAFETY: every row was written above.
    unsafe { assume_init(dx) }
}

widest! {
    /// One row of [`rms_norm_backward`].
    fn rms_norm_backward_row(dx: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32], weight: &[f32], r: f32) {
        // dx first holds w·dy, then the result.
        for ((d, &dy), &w) in dx.iter_mut().zip(dy).zip(weight) {
            d.write(w * dy);
        }
        // SAFETY: the whole row was written just above.
        let dx = unsafe { written(dx) };
        let mean = dot(dx, x) / weight.len() as f32;
        for (d, &x) in dx.iter_mut().zip(x) {
            *d = r * (*d - x * mean * r * r);
        }
    }
}

/// SwiGLU's product `silu(g)·u = g·σ(g)·u`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "SwiGLU's halves have one size");
    let mut y = uninit(gate.len());
    y.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096))
        .zip(up.par_chunks(4096))
        .with_min_len(4)
        .for_each(|((y, g), u)| swiglu_chunk(y, g, u));
    // SAFETY: every chunk was written above.
    unsafe { assume_init(y) }
}

widest! {
    /// One chunk of [`swiglu`].
    fn swiglu_chunk(y: &mut [MaybeUninit<f32>], gate: &[f32], up: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            y.write(g / (1.0 + exp(-g)) * u);
        }
    }
}

/// ∂L/∂g and ∂L/∂u of [`swiglu`]: `dy·u·σ(g)·(1 + g·(1 − σ(g)))` and `dy·g·σ(g)`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(up.len() == gate.len() && dy.len() == gate.len(), "SwiGLU's halves and gradient have one size");
    let (mut dg, mut du) = (uninit(gate.len()), uninit(gate.len()));
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            gate.par_chunks(4096)
                .zip(up.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .with_min_len(4)
        .for_each(|((dg, du), ((g, u), dy))| swiglu_backward_chunk(dg, du, g, u, dy));
    // SAFETY: every chunk of both was written above.
    unsafe { (assume_init(dg), assume_init(du)) }
}

widest! {
    /// One chunk of [`swiglu_backward`].
    fn swiglu_backward_chunk(dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32], dy: &[f32]) {
        let len = dg.len();
        let (du, g, u, dy) = (&mut du[..len], &g[..len], &u[..len], &dy[..len]);
        for i in 0..len {
            let sigmoid = 1.0 / (1.0 + exp(-g[i]));
            du[i].write(dy[i] * g[i] * sigmoid);
            dg[i].write(dy[i] * u[i] * sigmoid * (1.0 + g[i] * (1.0 - sigmoid)));
        }
    }
}

/// Attention probabilities `softmax(scale·s + bias)` over each `keys`-wide row of scores laid out
/// `[batch, heads, seq, keys]`, written over the scores; `bias` is `[batch, seq, keys]`, shared by
/// the heads. Returns each row's maximum and sum of exponentials, from which
/// [`probabilities_in_place`] makes the same probabilities again (a fully masked row included).
pub fn softmax_in_place(s: &mut [f32], bias: &[f32], scale: f32, heads: usize, seq: usize, keys: usize) -> Vec<[f32; 2]> {
    let mut stats = vec![[0f32; 2]; s.len() / keys.max(1)];
    s.par_chunks_mut(keys).zip(stats.par_iter_mut()).enumerate().with_min_len(min_rows(keys)).for_each(|(row, (y, stats))| {
        *stats = softmax_row(y, bias_row(bias, row, heads, seq, keys), scale);
    });
    stats
}

widest! {
    /// One row of [`softmax_in_place`]; returns its maximum and sum of exponentials.
    fn softmax_row(y: &mut [f32], bias: &[f32], scale: f32) -> [f32; 2] {
        for (y, &b) in y.iter_mut().zip(bias) {
            *y = *y * scale + b;
        }
        let shift = max(y);
        y.iter_mut().for_each(|v| *v = exp(*v - shift));
        let sum = sum(y);
        y.iter_mut().for_each(|v| *v /= sum);
        [shift, sum]
    }
}

/// The probabilities of [`softmax_in_place`] made again from the scores and each row's maximum
/// and sum, written over the scores: the same operations, so the same values.
pub fn probabilities_in_place(s: &mut [f32], bias: &[f32], stats: &[[f32; 2]], scale: f32, heads: usize, seq: usize, keys: usize) {
    s.par_chunks_mut(keys).zip(stats.par_iter()).enumerate().with_min_len(min_rows(keys)).for_each(|(row, (y, &stats))| {
        probabilities_row(y, bias_row(bias, row, heads, seq, keys), scale, stats);
    });
}

widest! {
    /// One row of [`probabilities_in_place`].
    fn probabilities_row(y: &mut [f32], bias: &[f32], scale: f32, stats: [f32; 2]) {
        let [shift, sum] = stats;
        for (y, &b) in y.iter_mut().zip(bias) {
            *y = exp(*y * scale + b - shift) / sum;
        }
    }
}

/// The bias of score row `row` (`[batch, heads, seq]` order): its batch's, at its query.
fn bias_row(bias: &[f32], row: usize, heads: usize, seq: usize, keys: usize) -> &[f32] {
    &bias[(row / (heads * seq) * seq + row % seq) * keys..][..keys]
}

/// ∂L/∂s of [`softmax_in_place`] from its output `y`: `scale·y·(dy − Σ dy·y)` per row.
pub fn softmax_backward(y: &[f32], dy: &[f32], scale: f32, keys: usize) -> Vec<f32> {
    assert!(dy.len() == y.len() && y.len() % keys == 0, "softmax's backward takes whole rows");
    let mut ds = uninit(y.len());
    ds.par_chunks_mut(keys)
        .zip(y.par_chunks(keys))
        .zip(dy.par_chunks(keys))
        .with_min_len(min_rows(keys))
        .for_each(|((ds, y), dy)| softmax_backward_row(ds, y, dy, scale));
    // SAFETY: every row was written above.
    unsafe { assume_init(ds) }
}

widest! {
    /// One row of [`softmax_backward`].
    fn softmax_backward_row(ds: &mut [MaybeUninit<f32>], y: &[f32], dy: &[f32], scale: f32) {
        let inner = dot(y, dy);
        for ((d, &y), &dy) in ds.iter_mut().zip(y).zip(dy) {
            d.write(scale * y * (dy - inner));
        }
    }
}

/// Cross-entropy of each `vocab`-wide row of logits against its target. Returns the summed
/// negative log-likelihood and each row's log-sum-exp (what backward needs besides the logits).
pub fn cross_entropy(logits: &[f32], targets: &[i64], vocab: usize) -> (f64, Vec<f32>) {
    let mut lse = vec![0f32; targets.len()];
    let total = lse
        .par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .with_min_len(min_rows(vocab))
        .map_init(
            || vec![0f32; vocab],
            |scratch, ((lse, row), &target)| {
                let shift = max(row);
                *lse = shift + exp_shifted(row, shift, scratch).ln();
                f64::from(*lse - row[target as usize])
            },
        )
        .sum();
    (total, lse)
}

/// ∂L/∂logits of `grad ·` [`cross_entropy`]: `grad·(softmax − onehot(target))` per row.
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[i64],
    lse: &[f32],
    grad: f32,
    vocab: usize,
) -> Vec<f32> {
    assert!(logits.len() == targets.len() * vocab && lse.len() == targets.len(), "one target and log-sum-exp a row of logits");
    let mut dx = uninit(logits.len());
    dx.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(lse.par_iter()))
        .with_min_len(min_rows(vocab))
        .for_each(|((dx, row), (&target, &lse))| {
            scaled_exp(dx, row, lse, grad);
            // SAFETY: the whole row was written just above.
            let dx = unsafe { written(dx) };
            dx[target as usize] -= grad;
        });
    // SAFETY: every row was written above.
    unsafe { assume_init(dx) }
}

widest! {
    /// Writes `scale · exp(row − shift)` into `out`.
    fn scaled_exp(out: &mut [MaybeUninit<f32>], row: &[f32], shift: f32, scale: f32) {
        for (o, &v) in out.iter_mut().zip(row) {
            o.write(scale * exp(v - shift));
        }
    }
}

/// Where the values a byte stands for go within its block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Packing {
    /// Side by side (NF4: high nibble, then low; int8 and Q8_0: one value a byte).
    Adjacent,
    /// Byte `j`'s two values at `j` and `j + block/2` (ggml's Q4_0/Q4_1: low nibbles first).
    SplitHalves,
}

/// A packed weight made dense: each byte stands for `table.len() / 256` values (its row of
/// `table`), placed per `packing`, and each run of `block` values is scaled by its `scales` entry
/// and shifted by its `mins` entry if there are minimums: `value · scale (+ min)`. With
/// `high = (plane, bits)`, value `i` of the weight also has `bits` bits at bit `i · bits` of
/// `plane`, worth 16 each step (the high bits of 5- and 6-bit codes, which come with two codes a
/// byte in split halves and at most 64 bits a block): they are added before the scaling, a sum
/// of small integers and so exact.
pub fn lookup_and_scale(bytes: &[u8], table: &[f32], high: Option<(&[u8], usize)>, scales: &[f32], mins: Option<&[f32]>, block: usize, packing: Packing) -> Vec<f32> {
    let per_byte = table.len() / 256;
    if let Some((_, bits)) = high {
        assert!(packing == Packing::SplitHalves && per_byte == 2 && block * bits <= 64, "high bits come with 4-bit codes in split halves");
    }
    let mut values = uninit(bytes.len() * per_byte);
    values.par_chunks_mut(block).zip(bytes.par_chunks(block / per_byte)).enumerate().with_min_len(min_rows(block)).for_each(
        |(b, (values, bytes))| {
            // This block's bytes of the high plane.
            let high = high.map(|(plane, bits)| (&plane[b * block * bits / 8..][..block * bits / 8], bits));
            dequantize_block(values, bytes, table, high, scales[b], mins.map(|mins| mins[b]), packing);
        },
    );
    // SAFETY: every block was written above.
    unsafe { assume_init(values) }
}

/// bf16 values as f32, exactly (a bf16 is the upper half of an f32), over the pool: a frozen
/// bf16 weight made dense for an f32 product (burn's cast runs on one thread).
pub fn widen_bf16(values: &[half::bf16]) -> Vec<f32> {
    widen(values, widen_bf16_chunk)
}

widest! {
    fn widen_bf16_chunk(out: &mut [MaybeUninit<f32>], values: &[half::bf16]) {
        for (out, value) in out.iter_mut().zip(values) {
            out.write(f32::from_bits((value.to_bits() as u32) << 16));
        }
    }
}

/// f16 values as f32, exactly, over the pool, as [`widen_bf16`] (half's conversion, with F16C
/// where the CPU has it).
pub fn widen_f16(values: &[half::f16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    widen(values, |out, values| {
        let mut buffer = [0f32; 1024];
        for (out, values) in out.chunks_mut(buffer.len()).zip(values.chunks(buffer.len())) {
            let buffer = &mut buffer[..values.len()];
            values.convert_to_f32_slice(buffer);
            for (out, &value) in out.iter_mut().zip(buffer.iter()) {
                out.write(value);
            }
        }
    })
}

/// `values` as f32, `chunk` writing each chunk of 16K values' output, chunks over the pool.
fn widen<T: Sync>(values: &[T], chunk: impl Fn(&mut [MaybeUninit<f32>], &[T]) + Sync) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    let mut out = uninit(values.len());
    out.par_chunks_mut(CHUNK).zip(values.par_chunks(CHUNK)).for_each(|(out, values)| chunk(out, values));
    // SAFETY: `chunk` wrote every value of each chunk.
    unsafe { assume_init(out) }
}

widest! {
    /// One block of [`lookup_and_scale`], scaled by `scale` and shifted by `min` if any.
    fn dequantize_block(values: &mut [MaybeUninit<f32>], bytes: &[u8], table: &[f32], high: Option<(&[u8], usize)>, scale: f32, min: Option<f32>, packing: Packing) {
        let per_byte = table.len() / 256;
        match high {
            Some((plane, 1)) => split_halves_with_high::<1>(values, bytes, table, plane, scale),
            Some((plane, 2)) => split_halves_with_high::<2>(values, bytes, table, plane, scale),
            Some((_, bits)) => unreachable!("{bits} high bits a code"),
            None if packing == Packing::SplitHalves && per_byte == 2 => split_halves_with_high::<0>(values, bytes, table, &[], scale),
            // One value a byte (int8, Q8_0), or two side by side (NF4): fixed widths, which the
            // compiler turns into vector gathers.
            None if per_byte == 1 => {
                for (value, &byte) in values.iter_mut().zip(bytes) {
                    value.write(table[byte as usize] * scale);
                }
            }
            None if packing == Packing::Adjacent && per_byte == 2 => {
                for (pair, &byte) in values.chunks_exact_mut(2).zip(bytes) {
                    let codes = &table[2 * byte as usize..][..2];
                    pair[0].write(codes[0] * scale);
                    pair[1].write(codes[1] * scale);
                }
            }
            None => {
                for (j, &byte) in bytes.iter().enumerate() {
                    for (k, &t) in table[byte as usize * per_byte..][..per_byte].iter().enumerate() {
                        let at = match packing {
                            Packing::Adjacent => j * per_byte + k,
                            Packing::SplitHalves => j + k * bytes.len(),
                        };
                        values[at].write(t * scale);
                    }
                }
            }
        }
        // SAFETY: each byte wrote its values: the block's bytes stand for all of it.
        let values = unsafe { written(values) };
        if let Some(min) = min {
            values.iter_mut().for_each(|v| *v += min);
        }
    }
}

/// One block of [`lookup_and_scale`] with two codes a byte in split halves and `BITS` (0, 1 or 2)
/// more bits a code in `high` (at most 8 bytes), scaled.
#[inline(always)]
fn split_halves_with_high<const BITS: usize>(values: &mut [MaybeUninit<f32>], bytes: &[u8], table: &[f32], high: &[u8], scale: f32) {
    let mut word = [0u8; 8];
    word[..high.len()].copy_from_slice(high);
    let word = u64::from_le_bytes(word);
    let code = |t: f32, at: usize| if BITS == 0 { t } else { t + (16 * (word >> (at * BITS) & ((1 << BITS) - 1))) as f32 };
    let half = bytes.len();
    for (j, &byte) in bytes.iter().enumerate() {
        let pair = &table[2 * byte as usize..][..2];
        values[j].write(code(pair[0], j) * scale);
        values[j + half].write(code(pair[1], j + half) * scale);
    }
}

/// The dims RoPE rotates together as pair `j` of a `rotary`-wide part: `(j, j + rotary/2)`
/// (`rotate_half`) or `(2j, 2j + 1)`.
fn pair_dims(pairing: RopePairing, j: usize, rotary: usize) -> (usize, usize) {
    match pairing {
        RopePairing::Half => (j, j + rotary / 2),
        RopePairing::Interleaved => (2 * j, 2 * j + 1),
    }
}

/// RoPE over rows of `head_dim` laid out `[batch, heads, seq, head_dim]`, or `[batch, seq, heads,
/// head_dim]` with `heads_inner` the number of heads (else 1): the first `rotary` dims
/// of a row at position `p` turn by the angles in `cos`/`sin` row `p` (`[seq, rotary]`, laid out
/// per the pairing as transformers builds them), `(a, b) -> (a·cos − b·sin, b·cos + a·sin)`; the
/// rest pass through. `inverse` turns the other way: the transpose, which is backward.
#[allow(clippy::too_many_arguments)]
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], seq: usize, head_dim: usize, heads_inner: usize, pairing: RopePairing, inverse: bool) -> Vec<f32> {
    let rotary = cos.len() / seq;
    assert!(rotary % 2 == 0 && rotary <= head_dim && x.len() % head_dim == 0, "RoPE turns pairs of whole heads' dims");
    let mut y = uninit(x.len());
    y.par_chunks_mut(head_dim).zip(x.par_chunks(head_dim)).enumerate().with_min_len(min_rows(head_dim)).for_each(
        |(row, (y, x))| {
            let position = row / heads_inner % seq;
            let (cos, sin) = (&cos[position * rotary..][..rotary], &sin[position * rotary..][..rotary]);
            for j in 0..rotary / 2 {
                let (i, k) = pair_dims(pairing, j, rotary);
                let (a, b) = (x[i], x[k]);
                if inverse {
                    y[i].write(a * cos[i] + b * sin[k]);
                    y[k].write(b * cos[k] - a * sin[i]);
                } else {
                    y[i].write(a * cos[i] - b * sin[i]);
                    y[k].write(b * cos[k] + a * sin[k]);
                }
            }
            for (y, &x) in y[rotary..].iter_mut().zip(&x[rotary..]) {
                y.write(x);
            }
        },
    );
    // SAFETY: the pairs cover the first `rotary` dims of every row, the loop after them the rest.
    unsafe { assume_init(y) }
}

/// One operand of a batched product over a flat buffer: matrix `b` starts at `offsets[b]`,
/// with `row_stride` values between its rows and `col_stride` between its columns (a transposed
/// view swaps them). Strides are non-negative.
pub struct Operand<'a> {
    pub values: &'a [f32],
    pub offsets: Vec<usize>,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Operand<'_> {
    /// Panics unless every `[rows, cols]` matrix lies inside `values` (what makes the GEMM's
    /// pointer reads sound).
    fn check(&self, rows: usize, cols: usize) {
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(self.offsets.iter().all(|&o| o + last < self.values.len()), "a matrix of the product lies outside its buffer");
    }
}

/// The output buffer, shared by the threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the jobs of one product write disjoint ranges of the buffer, which outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Products of fewer multiply-adds run on one thread; batches of fewer in all, too (flex's
/// thresholds). A product alone (no batch) is shared from `PARALLEL_ALONE` on: LoRA's products
/// (about 2M multiply-adds at SmolLM2's sizes) otherwise ran on the calling thread while the
/// others waited, 5% of a step on two cores.
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;
const PARALLEL_BATCH: usize = 128 * 128 * 128;
const PARALLEL_ALONE: usize = 1 << 20;
/// A product alone that reads a weight of this many values or more is shared whatever its rows:
/// with one row (a generated token) it is bound by reading the weight, which two cores do faster
/// than one.
const PARALLEL_READ: usize = 1 << 18;

/// gemm's bound for a small product (rows and columns both at most this): its sums over k run in
/// blocks of 512, a larger product's in blocks sized from the caches.
const SMALL_SIDE: usize = 64;

/// `lhs_b · rhs_b` (`[m, k] · [k, n]`) for every matrix `b` of the batch, row-major, written once
/// into a fresh buffer by `gemm` (flex's own GEMM). Flex's matmul zeroes its output, then copies
/// the zeros into a re-aligned buffer, before the GEMM writes it: three passes over the largest
/// tensors of a step (the LM head's logits) instead of one.
pub fn matmul(lhs: &Operand, rhs: &Operand, m: usize, k: usize, n: usize) -> Vec<f32> {
    let (count, size) = (lhs.offsets.len(), m * n);
    assert_eq!(count, rhs.offsets.len(), "both operands of a product have the same batch");
    if size == 0 || k == 0 {
        return vec![0f32; count * size];
    }
    lhs.check(m, k);
    rhs.check(k, n);
    let mut out = uninit(count * size);
    // Matrix b's rows `rows` and columns `columns` into `dst`, which starts at the first of them.
    let product = |b: usize, rows: Range<usize>, columns: Range<usize>, dst: *mut f32| {
        // SAFETY: `check` keeps every read inside the operands' buffers; `dst` is the first of
        // the block in matrix b of the m × n output, rows n apart, written by this call alone;
        // with `read_dst` false gemm only writes it (dst = 1 · lhs · rhs).
        unsafe {
            gemm::gemm(
                rows.len(), columns.len(), k,
                dst, 1, n as isize, false,
                lhs.values.as_ptr().add(lhs.offsets[b] + rows.start * lhs.row_stride), lhs.col_stride as isize, lhs.row_stride as isize,
                rhs.values.as_ptr().add(rhs.offsets[b] + columns.start * rhs.col_stride), rhs.col_stride as isize, rhs.row_stride as isize,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            )
        }
    };
    // Work is split by output columns, a share per thread: each thread packs only its share of
    // the weight. (gemm's own threading packs the whole weight on the calling thread first, while
    // the others wait.) Small products run whole, on one thread per matrix.
    let ops = m * n * k;
    let threads = rayon::current_num_threads();
    let alone = count == 1 && (ops >= PARALLEL_ALONE || k * n >= PARALLEL_READ);
    let mut shares = if ops >= PARALLEL_PRODUCT || alone { threads } else { 1 };
    let width = |shares: usize| n.div_ceil(shares).next_multiple_of(16).min(n);
    // gemm blocks the sum over k one way for a product of at most 64 rows and 64 columns, and
    // another for a larger one: a share must not cross that line where the whole product does
    // not, or its values would depend on the number of threads. Fewer, wider shares keep every
    // value what one thread computes.
    // The last share is the narrowest: (n - 1) % width + 1 columns.
    while shares > 1 && m <= SMALL_SIDE && n > SMALL_SIDE && (n - 1) % width(shares) < SMALL_SIDE {
        shares -= 1;
    }
    let width = width(shares);
    // Too few columns to share (LoRA's x Aᵀ has r): shares of the rows instead, each of more than
    // SMALL_SIDE rows, so that none is a small product where the whole is not.
    let row_shares = if width == n && shares > 1 { shares.min(m / (SMALL_SIDE + 1)).max(1) } else { 1 };
    let rows = move |share: usize| m * share / row_shares..m * (share + 1) / row_shares;
    let jobs: Vec<(usize, Range<usize>, Range<usize>)> = (0..count)
        .flat_map(|b| (0..row_shares).flat_map(move |r| (0..n).step_by(width).map(move |c| (b, rows(r), c..(c + width).min(n)))))
        .collect();
    let base = SendPtr(out.as_mut_ptr().cast::<f32>());
    let run = |(b, rows, columns): &(usize, Range<usize>, Range<usize>)| {
        product(*b, rows.clone(), columns.clone(), base.at(b * size + rows.start * n + columns.start))
    };
    if jobs.len() > 1 && (count * ops >= PARALLEL_BATCH || alone) {
        jobs.par_iter().for_each(run);
    } else {
        jobs.iter().for_each(run);
    }
    // SAFETY: the jobs cover every row and column of every matrix.
    unsafe { assume_init(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    std::thread_local! {
        /// The vector unit this thread's row kernels run on instead of the widest.
        pub(super) static FORCED_UNIT: std::cell::Cell<Option<VectorUnit>> = const { std::cell::Cell::new(None) };
    }

    /// Every compiled copy of the row kernels (AVX-512, AVX2, baseline: those this CPU has) gives
    /// the same bits, over rows with a tail shorter than a vector, masked (-inf) and huge scores,
    /// and over blocks of 2-, 4- and 8-bit codes in each packing.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_kernels_give_the_same_values_on_every_vector_unit() {
        let units = match *VECTOR_UNIT {
            VectorUnit::Avx512 => vec![VectorUnit::Baseline, VectorUnit::Avx2, VectorUnit::Avx512],
            VectorUnit::Avx2 => vec![VectorUnit::Baseline, VectorUnit::Avx2],
            VectorUnit::Baseline => vec![VectorUnit::Baseline],
        };
        let width = 1003;
        let values = move |seed: u32| -> Vec<f32> {
            (0..width as u32).map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32 * 60.0 - 30.0).collect()
        };
        let (x, y, z) = (values(1), values(2), values(3));
        let mut bias = values(4);
        bias[5] = f32::NEG_INFINITY;
        bias[7] = f32::MIN;
        let mut big = values(5);
        big[3] = 300.0;
        big[9] = -300.0;
        let fresh = || vec![MaybeUninit::new(0f32); width];
        let init = |v: Vec<MaybeUninit<f32>>| unsafe { assume_init(v) };
        let run = |unit: VectorUnit| -> Vec<u32> {
            FORCED_UNIT.set(Some(unit));
            let mut out = Vec::new();
            let mut scores = big.clone();
            let stats = softmax_row(&mut scores, &bias, 0.125);
            let mut again = big.clone();
            probabilities_row(&mut again, &bias, 0.125, stats);
            let mut shifted = vec![0f32; width];
            let total = exp_shifted(&big, 2.0, &mut shifted);
            let mut scaled = fresh();
            scaled_exp(&mut scaled, &big, 2.0, 0.5);
            let mut silu = fresh();
            swiglu_chunk(&mut silu, &big, &y);
            let (mut dg, mut du) = (fresh(), fresh());
            swiglu_backward_chunk(&mut dg, &mut du, &big, &y, &z);
            let mut normed = fresh();
            let r = rms_norm_row(&mut normed, &x, &y, 1e-5);
            let mut dx = fresh();
            rms_norm_backward_row(&mut dx, &x, &z, &y, r);
            let mut ds = fresh();
            softmax_backward_row(&mut ds, &scores, &z, 0.125);
            // Codes: NF4 (two a byte side by side), int8 and 2-bit codes with minimums, Q4-style
            // split halves with none, one and two high bits a code.
            let bytes: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let (pairs, singles, quads) = (values(6)[..512].to_vec(), values(7)[..256].to_vec(), values(8)[..1003].repeat(2)[..1024].to_vec());
            let plane = [0xa5u8, 0x3c, 0x0f, 0xf0, 0x5a, 0xc3, 0x99, 0x66];
            let mut codes = Vec::new();
            for (bytes, table, high, min, packing) in [
                (&bytes[..], &pairs[..], None, None, Packing::Adjacent),
                (&bytes[..], &singles[..], None, Some(0.25), Packing::Adjacent),
                (&bytes[..], &quads[..], None, Some(-0.5), Packing::Adjacent),
                (&bytes[..16], &pairs[..], None, None, Packing::SplitHalves),
                (&bytes[..16], &pairs[..], Some((&plane[..4], 1)), Some(-1.5), Packing::SplitHalves),
                (&bytes[..16], &pairs[..], Some((&plane[..], 2)), None, Packing::SplitHalves),
            ] {
                let mut block = vec![MaybeUninit::new(0f32); bytes.len() * table.len() / 256];
                dequantize_block(&mut block, bytes, table, high, 0.37, min, packing);
                codes.extend(init(block));
            }
            for part in [scores, again, shifted, init(scaled), init(silu), init(dg), init(du), init(normed), init(dx), init(ds), codes, vec![stats[0], stats[1], total, r]] {
                out.extend(part.iter().map(|v| v.to_bits()));
            }
            FORCED_UNIT.set(None);
            out
        };
        let baseline = run(VectorUnit::Baseline);
        for unit in units {
            assert!(run(unit) == baseline, "{unit:?} gives other values than the baseline");
        }
    }

    /// A product's values do not depend on the number of threads that share it, also where a
    /// share is narrow (few rows, a sum over k long enough for gemm to block it).
    #[test]
    fn products_are_the_same_at_any_thread_count() {
        // The last three are LoRA's x Aᵀ, dB and (x Aᵀ) Bᵀ, shared by rows or columns.
        for (m, k, n) in [(16, 3000, 192), (8, 1600, 130), (64, 2000, 576), (65, 700, 200), (478, 576, 1536), (426, 576, 8), (192, 426, 8), (426, 8, 576), (131, 900, 8)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1013) as f32 * 0.001 - 0.5).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 997) as f32 * 0.001 - 0.5).collect();
            let lhs = Operand { values: &lhs, offsets: vec![0], row_stride: k, col_stride: 1 };
            let rhs = Operand { values: &rhs, offsets: vec![0], row_stride: 1, col_stride: k };
            let product = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| matmul(&lhs, &rhs, m, k, n));
            let one: Vec<u32> = product(1).iter().map(|v| v.to_bits()).collect();
            for threads in [2, 3, 7, 16] {
                assert!(product(threads).iter().map(|v| v.to_bits()).eq(one.iter().copied()), "{m}x{k}x{n} on {threads} threads");
            }
        }
    }

    /// Backward's probabilities, made again from each row's maximum and sum, are the forward's
    /// bit for bit: also in a fully masked row (every bias f32::MIN) and with -inf keys.
    #[test]
    fn remade_probabilities_are_the_softmax_bit_for_bit() {
        let (batch, heads, seq, keys) = (2, 3, 4, 37);
        let scores: Vec<f32> = (0..batch * heads * seq * keys).map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 5.0).collect();
        let bias: Vec<f32> = (0..batch * seq * keys)
            .map(|i| match (i / keys, i % keys) {
                (1, _) => f32::MIN,
                (_, k) if k % 5 == 0 => f32::NEG_INFINITY,
                _ => 0.0,
            })
            .collect();
        let mut probs = scores.clone();
        let stats = softmax_in_place(&mut probs, &bias, 0.125, heads, seq, keys);
        let mut remade = scores;
        probabilities_in_place(&mut remade, &bias, &stats, 0.125, heads, seq, keys);
        assert!(probs.iter().zip(&remade).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn exp_is_within_two_ulp_and_flushes_to_zero() {
        let mut worst = 0f32;
        for i in -87_000..=88_200 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (got, want) = (exp(x), (x as f64).exp() as f32);
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }
}
