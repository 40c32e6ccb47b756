//! ggml's quantizers for Q8_0, Q4_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and
//! IQ4_XS, as `llama-quantize` runs them without an importance matrix: the same search for each
//! block's scales, in the same f32 operations, so that ember's GGUF files hold the blocks
//! llama.cpp would write from the same f32 weights. [`importance`] has their variants weighted by
//! an importance matrix, [`lattice`] the grid types (IQ3_XXS, IQ3_S, IQ2_*, IQ1_S, IQ1_M).
//!
//! Layouts (little-endian, one block after another):
//! - Q8_0, 32 values in 34 bytes: f16 `d`, 32 i8 codes; value = `q·d`.
//! - Q4_0, 32 values in 18 bytes: f16 `d`, 16 bytes of nibbles (value `j` low, value `j + 16`
//!   high); value = `(q − 8)·d`.
//! - Q5_0, 32 values in 22 bytes: f16 `d`, a u32 of fifth bits (bit `j` for value `j`), 16 bytes
//!   of low nibbles (value `j` low, value `j + 16` high); value = `(q − 16)·d`.
//! - Q5_1, 32 values in 24 bytes: as Q5_0 with an f16 minimum `m` after `d`; value = `q·d + m`.
//! - Q2_K, 256 values in 84 bytes: sixteen bytes of 4-bit scale (low) and minimum (high), 64 of
//!   2-bit codes (per 128 values, byte `l` holds values `l`, `l+32`, `l+64`, `l+96`), f16 `d`,
//!   f16 `dmin`; value = `d·sc·q − dmin·m` per 16-value sub-block.
//! - Q3_K, 256 values in 110 bytes: 32 bytes of third bits (byte `j % 32`, bit `j / 32`), 64 of
//!   2-bit codes (per 128 values, byte `l` holds values `l`, `l+32`, `l+64`, `l+96`), sixteen
//!   6-bit scales in 12 bytes (offset by 32), f16 `d`; value = `d·(sc − 32)·(q − 4)`.
//! - Q4_K, 256 values in 144 bytes: f16 `d`, f16 `dmin`, eight 6-bit scales and minimums packed
//!   in 12 bytes, 128 bytes of nibbles (per 64 values: the first 32 low, the next 32 high);
//!   value = `d·sc·q − dmin·m` per 32-value sub-block.
//! - Q5_K, 256 values in 176 bytes: Q4_K's 16-byte head, 32 bytes of fifth bits (byte `j`, bit
//!   pair `2k, 2k+1` for values `64k + j` and `64k + 32 + j`), then Q4_K's nibbles.
//! - Q6_K, 256 values in 210 bytes: 128 bytes of low nibbles, 64 of high bit pairs, sixteen i8
//!   scales, f16 `d`; value = `d·sc·(q − 32)` per 16-value sub-block.
//! - IQ4_NL, 32 values in 18 bytes: f16 `d`, 16 bytes of nibbles as Q4_0; value =
//!   `d·kvalues[q]`, a non-linear grid of 16 values.
//! - IQ4_XS, 256 values in 136 bytes: f16 `d`, a u16 of scales' top bit pairs, 4 bytes of their
//!   low nibbles, then IQ4_NL's nibbles per 32 values; value = `d·(sc − 32)·kvalues[q]`.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::gguf::IQ4_VALUES;

mod grids;
pub mod importance;
pub mod lattice;
pub mod low_bit;
#[cfg(target_arch = "x86_64")]
mod searches_avx2;

/// Below this a block counts as all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// Whether the processor has AVX2: the searches below then run eight sub-blocks a register
/// (`searches_avx2`), or their lane-by-lane code compiled for it (the baseline x86-64 build has
/// 4-wide SSE2 without i32 min/max or `round`). Without FMA every lane's operations round as in
/// the scalar code, so the bytes do not change.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// ggml's `nearest_int`: round half to even by adding 1.5·2²³ and reading the mantissa (for
/// |x| < 2²²). Plain SSE2 arithmetic: `f32::round_ties_even` is a libm call without SSE4.1, and
/// took two thirds of a K-quant export.
fn nearest_int(x: f32) -> i32 {
    let shifted = x + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The value of largest magnitude, the first of equals (as ggml's quantizers pick it).
fn largest_magnitude(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// The largest value, or 0 if none is positive.
fn largest_or_zero(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v > m { v } else { m })
}

/// `values` encoded block by block with `encode_block`, blocks of `block` values in `bytes` bytes
/// each, spread over the threads (blocks are independent).
fn encode_blocks(values: &[f32], block: usize, bytes: usize, encode_block: impl Fn(&[f32], &mut [u8]) + Sync) -> Vec<u8> {
    assert_eq!(values.len() % block, 0, "a whole number of {block}-value blocks");
    let mut out = vec![0u8; values.len() / block * bytes];
    // 64 blocks a task: enough work to outweigh the scheduling.
    out.par_chunks_mut(64 * bytes).zip(values.par_chunks(64 * block)).for_each(|(out, values)| {
        for (out, values) in out.chunks_mut(bytes).zip(values.chunks(block)) {
            encode_block(values, out);
        }
    });
    out
}

/// Q8_0 blocks of `values` (a multiple of 32).
pub fn encode_q8_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 32, 34, |x, out| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // Where `round` is an instruction rather than libm's `roundf` (SSE4.1), with the same
            // result. SAFETY: the processor has AVX2.
            #[target_feature(enable = "avx2")]
            fn avx2(x: &[f32], out: &mut [u8]) {
                q8_0_block(x, out)
            }
            return unsafe { avx2(x, out) };
        }
        q8_0_block(x, out)
    })
}

/// One Q8_0 block: d = max|x| / 127, q = round(x / d) (half away from zero, as C's roundf).
#[inline(always)]
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (code, &v) in out[2..].iter_mut().zip(x) {
        *code = (v * inverse).round() as i8 as u8;
    }
}

/// Q4_0 blocks of `values` (a multiple of 32).
pub fn encode_q4_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 32, 18, |x, out| {
        // d = (the value of largest magnitude) / −8; q = min(15, trunc(x / d + 8.5))
        let d = largest_magnitude(x) / -8.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * inverse + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            out[2 + j] = q(x[j]) | q(x[j + 16]) << 4;
        }
    })
}

/// Five-bit codes of a 32-value block: low nibbles (value `j` low, `j + 16` high) into
/// `nibbles`, the fifth bits into a u32 (bit `j` for value `j`) into `high`.
fn pack_five_bits(codes: impl Fn(usize) -> u8, high: &mut [u8], nibbles: &mut [u8]) {
    let mut bits = 0u32;
    for j in 0..16 {
        let (q0, q1) = (codes(j), codes(j + 16));
        nibbles[j] = (q0 & 0x0F) | (q1 & 0x0F) << 4;
        bits |= u32::from((q0 & 0x10) >> 4) << j;
        bits |= u32::from((q1 & 0x10) >> 4) << (j + 16);
    }
    high.copy_from_slice(&bits.to_le_bytes());
}

/// Q5_0 blocks of `values` (a multiple of 32).
pub fn encode_q5_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 32, 22, |x, out| {
        // d = (the value of largest magnitude) / −16; q = min(31, trunc(x / d + 16.5))
        let d = largest_magnitude(x) / -16.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let (high, nibbles) = out[2..].split_at_mut(4);
        pack_five_bits(|j| ((x[j] * inverse + 16.5) as i8).min(31) as u8, high, nibbles);
    })
}

/// A Q4_1 / Q5_1 block's head: `d = (max − min) / steps` and `m = min` as f16 into `out[0..4]`;
/// returns the minimum and `1 / d` (0 for a flat block).
fn offset_head(x: &[f32], steps: f32, out: &mut [u8]) -> (f32, f32) {
    let (min, max) = x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }));
    let d = (max - min) / steps;
    out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    out[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
    (min, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// Q5_1 blocks of `values` (a multiple of 32).
pub fn encode_q5_1(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 32, 24, |x, out| {
        // q = trunc((x − min) / d + 0.5)
        let (min, inverse) = offset_head(x, 31.0, out);
        let (high, nibbles) = out[4..].split_at_mut(4);
        pack_five_bits(|j| ((x[j] - min) * inverse + 0.5) as u8, high, nibbles);
    })
}

/// Q4_1 blocks of `values` (a multiple of 32).
pub fn encode_q4_1(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 32, 20, |x, out| {
        // q = min(15, trunc((x − min) / d + 0.5))
        let (min, inverse) = offset_head(x, 15.0, out);
        let q = |v: f32| (((v - min) * inverse + 0.5) as i8).min(15) as u8;
        for j in 0..16 {
            out[4 + j] = q(x[j]) | q(x[j + 16]) << 4;
        }
    })
}

/// How Q2_K, Q4_K and Q5_K search each sub-block's scale: codes `0..=nmax`, candidates
/// `(rmin + rdelta·step + nmax) / (max − min)` for `step` in `0..=steps`, judged by the weighted
/// squared error (or absolute error, Q2_K's choice).
#[derive(Clone, Copy)]
struct ScaleSearch {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    steps: i32,
    absolute_error: bool,
}

const Q2_K_SEARCH: ScaleSearch = ScaleSearch { nmax: 3, rmin: -0.5, rdelta: 0.1, steps: 15, absolute_error: true };
const Q4_K_SEARCH: ScaleSearch = ScaleSearch { nmax: 15, rmin: -1.0, rdelta: 0.1, steps: 20, absolute_error: false };
const Q5_K_SEARCH: ScaleSearch = ScaleSearch { nmax: 31, rmin: -0.5, rdelta: 0.1, steps: 15, absolute_error: false };

/// ggml's `make_qkx2_quants` over each of the `L` consecutive `N`-value sub-blocks of `x`: the
/// scale and minimum minimising the `weights`-weighted error over `search`'s candidate scales,
/// returned as `(scales, -mins)` (each minimum as a non-negative offset); `codes` gets the
/// sub-blocks' codes.
///
/// One sub-block's candidates depend on each other (an improvement moves the minimum the next
/// one starts from); the sub-blocks do not. So they run side by side, sub-block `j` in lane `j`,
/// each in ggml's operations and order (the same floats as on its own): eight at a time in AVX2
/// where the processor has it, else as the compiler vectorises the lanes.
fn scale_and_min<const L: usize, const N: usize>(x: &[f32], weights: &[f32], codes: &mut [u8], search: ScaleSearch) -> ([f32; L], [f32; L]) {
    #[cfg(target_arch = "x86_64")]
    if L % searches_avx2::LANES == 0 && has_avx2() {
        use searches_avx2::LANES;
        let (mut scales, mut mins) = ([0f32; L], [0f32; L]);
        for group in 0..L / LANES {
            let span = N * LANES * group..N * LANES * (group + 1);
            // SAFETY: the processor has AVX2.
            let (s, m) = unsafe { searches_avx2::scale_and_min::<N>(&x[span.clone()], &weights[span.clone()], &mut codes[span], search) };
            scales[LANES * group..][..LANES].copy_from_slice(&s);
            mins[LANES * group..][..LANES].copy_from_slice(&m);
        }
        return (scales, mins);
    }
    scale_and_min_lanes::<L, N>(x, weights, codes, search)
}

fn scale_and_min_lanes<const L: usize, const N: usize>(x: &[f32], weights: &[f32], codes: &mut [u8], search: ScaleSearch) -> ([f32; L], [f32; L]) {
    let ScaleSearch { nmax, rmin, rdelta, steps, absolute_error } = search;
    let error_of = |diff: f32| if absolute_error { diff.abs() } else { diff * diff };
    let quantize = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax) as f32;
    // x[i][j], w[i][j]: value i of sub-block j.
    let x: [[f32; L]; N] = std::array::from_fn(|i| std::array::from_fn(|j| x[N * j + i]));
    let w: [[f32; L]; N] = std::array::from_fn(|i| std::array::from_fn(|j| weights[N * j + i]));
    let (mut min, mut max, mut sum_w) = (x[0], x[0], w[0]);
    let mut sum_x: [f32; L] = std::array::from_fn(|j| w[0][j] * x[0][j]);
    for i in 1..N {
        for j in 0..L {
            min[j] = if x[i][j] < min[j] { x[i][j] } else { min[j] };
            max[j] = if x[i][j] > max[j] { x[i][j] } else { max[j] };
            sum_w[j] += w[i][j];
            sum_x[j] += w[i][j] * x[i][j];
        }
    }
    for m in &mut min {
        if *m > 0.0 {
            *m = 0.0;
        }
    }
    // A constant sub-block: codes 0, scale 0, its minimum kept (its lane's arithmetic below
    // never counts as better).
    let constant: [bool; L] = std::array::from_fn(|j| max[j] == min[j]);
    let iscale: [f32; L] = std::array::from_fn(|j| nmax as f32 / (max[j] - min[j]));
    let mut scale = iscale.map(|i| 1.0 / i);
    let mut best = [[0f32; L]; N];
    let mut best_error = [0f32; L];
    for i in 0..N {
        for j in 0..L {
            let l = quantize(iscale[j], x[i][j], min[j]);
            best[i][j] = l;
            best_error[j] += w[i][j] * error_of(scale[j] * l + min[j] - x[i][j]);
        }
    }
    let mut candidate = [[0f32; L]; N];
    for step in 0..=steps {
        let iscale: [f32; L] = std::array::from_fn(|j| (rmin + rdelta * step as f32 + nmax as f32) / (max[j] - min[j]));
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; L], [0f32; L], [0f32; L]);
        for i in 0..N {
            for j in 0..L {
                let l = quantize(iscale[j], x[i][j], min[j]);
                candidate[i][j] = l;
                sum_l[j] += w[i][j] * l;
                sum_l2[j] += w[i][j] * l * l;
                sum_xl[j] += w[i][j] * l * x[i][j];
            }
        }
        // Selects rather than branches, so that the lanes stay in vectors.
        let (mut this_scale, mut this_min, mut fitted) = ([0f32; L], [0f32; L], [false; L]);
        for j in 0..L {
            let det = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            fitted[j] = det > 0.0;
            let scale = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / det;
            let min = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / det;
            this_scale[j] = if min > 0.0 { sum_xl[j] / sum_l2[j] } else { scale };
            this_min[j] = if min > 0.0 { 0.0 } else { min };
        }
        let mut error = [0f32; L];
        for i in 0..N {
            for j in 0..L {
                error[j] += w[i][j] * error_of(this_scale[j] * candidate[i][j] + this_min[j] - x[i][j]);
            }
        }
        let better: [bool; L] = std::array::from_fn(|j| !constant[j] & fitted[j] & (error[j] < best_error[j]));
        for j in 0..L {
            best_error[j] = if better[j] { error[j] } else { best_error[j] };
            scale[j] = if better[j] { this_scale[j] } else { scale[j] };
            min[j] = if better[j] { this_min[j] } else { min[j] };
        }
        for (best, candidate) in best.iter_mut().zip(&candidate) {
            for j in 0..L {
                best[j] = if better[j] { candidate[j] } else { best[j] };
            }
        }
    }
    for j in 0..L {
        scale[j] = if constant[j] { 0.0 } else { scale[j] };
        for i in 0..N {
            codes[N * j + i] = if constant[j] { 0 } else { best[i][j] as u8 };
        }
    }
    (scale, min.map(|m| -m))
}

/// Sub-block `j`'s 6-bit scale and minimum from Q4_K's 12 packed bytes.
fn scale_min_k4(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        ((packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
    }
}

/// One Q4_K / Q5_K super-block's 16-byte head (f16 `d` and `dmin`, the eight 6-bit scales and
/// minimums) written to `head`, and its codes `0..=nmax`.
fn scales_and_mins(x: &[f32], head: &mut [u8], search: ScaleSearch) -> [u8; QK_K] {
    let mut codes = [0u8; QK_K];
    // Weights: each sub-block's RMS plus each value's magnitude.
    let mut weights = [0f32; QK_K];
    for (weights, sub) in weights.chunks_mut(32).zip(x.chunks(32)) {
        let sum_x2 = sub.iter().fold(0f32, |s, v| s + v * v);
        let rms = (sum_x2 / 32.0).sqrt();
        weights.iter_mut().zip(sub).for_each(|(w, v)| *w = rms + v.abs());
    }
    let (scales, mins) = scale_and_min::<8, 32>(x, &weights, &mut codes, search);
    let (max_scale, max_min) = (largest_or_zero(&scales), largest_or_zero(&mins));
    // Scales and minimums in 6 bits against the block's f16 `d` and `dmin`.
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // ggml keeps these in a u8 before clamping: a negative value wraps.
    let six_bits = |inverse: f32, v: &[f32; 8]| v.map(|v| (nearest_int(inverse * v) as u8).min(63));
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);
    pack_k4_head(head, six_bits(inv_scale, &scales), six_bits(inv_min, &mins), d, dmin);
    requantize_k4(x, head, search.nmax, &mut codes);
    codes
}

/// A Q4_K / Q5_K head: f16 `d` and `dmin`, then the eight 6-bit scales and minimums packed in 12
/// bytes (ggml's shifts: bits above the sixth of the last four are dropped).
fn pack_k4_head(head: &mut [u8], scales: [u8; 8], mins: [u8; 8], d: f32, dmin: f32) {
    let packed = &mut head[4..16];
    packed.fill(0);
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    head[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    head[2..4].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
}

/// Codes `0..=nmax` again against a Q4_K / Q5_K head's scales as stored; a zero scale keeps the
/// search's codes.
fn requantize_k4(x: &[f32], head: &[u8], nmax: i32, codes: &mut [u8; QK_K]) {
    let d = f16::from_le_bytes([head[0], head[1]]);
    let dmin = f16::from_le_bytes([head[2], head[3]]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &head[4..16]);
        let d = d.to_f32() * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            codes[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

/// Q4_K super-blocks of `values` (a multiple of 256).
pub fn encode_q4_k(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, QK_K, 144, |x, out| {
        let (head, nibbles) = out.split_at_mut(16);
        let codes = scales_and_mins(x, head, Q4_K_SEARCH);
        pack_q4_k_codes(&codes, nibbles);
    })
}

/// Q4_K's nibbles: per 64 values, the first 32 low, the next 32 high.
fn pack_q4_k_codes(codes: &[u8; QK_K], nibbles: &mut [u8]) {
    for (quarter, nibbles) in nibbles.chunks_mut(32).enumerate() {
        let base = 64 * quarter;
        for l in 0..32 {
            nibbles[l] = codes[base + l] | codes[base + l + 32] << 4;
        }
    }
}

/// Q5_K super-blocks of `values` (a multiple of 256).
pub fn encode_q5_k(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, QK_K, 176, |x, out| {
        let (head, rest) = out.split_at_mut(16);
        let codes = scales_and_mins(x, head, Q5_K_SEARCH);
        pack_q5_k_codes(&codes, rest);
    })
}

/// Q5_K's fifth bits (32 bytes) and nibbles (as Q4_K's).
fn pack_q5_k_codes(codes: &[u8; QK_K], rest: &mut [u8]) {
    let (high, nibbles) = rest.split_at_mut(32);
    high.fill(0);
    for (quarter, nibbles) in nibbles.chunks_mut(32).enumerate() {
        let base = 64 * quarter;
        for l in 0..32 {
            let (q0, q1) = (codes[base + l], codes[base + l + 32]);
            high[l] |= (q0 >> 4) << (2 * quarter) | (q1 >> 4) << (2 * quarter + 1);
            nibbles[l] = (q0 & 0xF) | (q1 & 0xF) << 4;
        }
    }
}

/// Q2_K super-blocks of `values` (a multiple of 256).
pub fn encode_q2_k(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, QK_K, 84, |x, out| {
        let mut codes = [0u8; QK_K];
        // Weights: each value's magnitude.
        let weights: [f32; QK_K] = std::array::from_fn(|i| x[i].abs());
        let (scales, mins) = scale_and_min::<16, 16>(x, &weights, &mut codes, Q2_K_SEARCH);
        let (max_scale, max_min) = (largest_or_zero(&scales), largest_or_zero(&mins));
        let (packed, rest) = out.split_at_mut(16);
        let tail = &mut rest[64..];
        // Scales (low nibbles) and minimums (high nibbles) in 4 bits against the f16 `d`, `dmin`;
        // ggml stores the rounded int in a byte unclamped.
        packed.fill(0);
        let mut d = f16::from_f32(0.0);
        if max_scale > 0.0 {
            let inverse = 15.0 / max_scale;
            packed.iter_mut().zip(&scales).for_each(|(p, s)| *p = nearest_int(inverse * s) as u8);
            d = f16::from_f32(max_scale / 15.0);
        }
        let mut dmin = f16::from_f32(0.0);
        if max_min > 0.0 {
            let inverse = 15.0 / max_min;
            packed.iter_mut().zip(&mins).for_each(|(p, m)| *p |= (nearest_int(inverse * m) << 4) as u8);
            dmin = f16::from_f32(max_min / 15.0);
        }
        tail[0..2].copy_from_slice(&d.to_le_bytes());
        tail[2..4].copy_from_slice(&dmin.to_le_bytes());
        finish_q2_k(x, &mut codes, out);
    })
}

/// The rest of a Q2_K block whose scales, `d` and `dmin` are written: codes again against the
/// scales as stored (a zero scale keeps the search's codes), then packed.
fn finish_q2_k(x: &[f32], codes: &mut [u8; QK_K], out: &mut [u8]) {
    let (packed, rest) = out.split_at_mut(16);
    let (quants, tail) = rest.split_at_mut(64);
    let d = f16::from_le_bytes([tail[0], tail[1]]).to_f32();
    let dmin = f16::from_le_bytes([tail[2], tail[3]]).to_f32();
    for j in 0..16 {
        let scale = d * f32::from(packed[j] & 0xF);
        if scale == 0.0 {
            continue;
        }
        let offset = dmin * f32::from(packed[j] >> 4);
        for i in 16 * j..16 * j + 16 {
            codes[i] = nearest_int((x[i] + offset) / scale).clamp(0, 3) as u8;
        }
    }
    for (half, quants) in quants.chunks_mut(32).enumerate() {
        let base = 128 * half;
        for l in 0..32 {
            quants[l] = codes[base + l] | codes[base + l + 32] << 2 | codes[base + l + 64] << 4 | codes[base + l + 96] << 6;
        }
    }
}

/// ggml's `make_q3_quants` with `do_rmse` for Q3_K (`nmax = 4`) over one 16-value sub-block:
/// codes from `−nmax / max`, then up to 5 rounds of moving single codes while the x²-weighted
/// fit improves; returns the fitted scale, `codes` gets `q + 4` in `0..8`.
fn q3_scale(x: &[f32], codes: &mut [i8]) -> f32 {
    const NMAX: i32 = 4;
    let max = largest_magnitude(x);
    if max.abs() < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let iscale = -(NMAX as f32) / max;
    let (mut sum_lx, mut sum_l2) = (0f32, 0f32);
    for (code, &v) in codes.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-NMAX, NMAX - 1);
        *code = l as i8;
        let (w, l) = (v * v, l as f32);
        sum_lx += w * v * l;
        sum_l2 += w * l * l;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (code, &v) in codes.iter_mut().zip(x) {
            let w = v * v;
            let l = f32::from(*code);
            let mut slx = sum_lx - w * v * l;
            if slx > 0.0 {
                let mut sl2 = sum_l2 - w * l * l;
                let new_l = nearest_int(v * sl2 / slx).clamp(-NMAX, NMAX - 1);
                if new_l != i32::from(*code) {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * sum_l2 > sum_lx * sum_lx * sl2 {
                        *code = new_l as i8;
                        (sum_lx, sum_l2) = (slx, sl2);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    codes.iter_mut().for_each(|code| *code += NMAX as i8);
    if sum_l2 > 0.0 { sum_lx / sum_l2 } else { 0.0 }
}

/// The 16-value sub-block searches of Q3_K and Q6_K (and of their importance-matrix variants).
#[derive(Clone, Copy)]
enum SubBlockSearch<'a> {
    /// [`q3_scale`].
    Q3K,
    /// [`weighted_symmetric_scale`] with codes `−nmax..nmax`, weighted by the super-block's
    /// `weights` or by x².
    Symmetric { nmax: i32, weights: Option<&'a [f32]> },
}

impl SubBlockSearch<'_> {
    /// The sub-block of `x` at `span`.
    fn alone(self, x: &[f32], codes: &mut [i8], span: Range<usize>) -> f32 {
        match self {
            Self::Q3K => q3_scale(&x[span], codes),
            Self::Symmetric { nmax, weights } => weighted_symmetric_scale(&x[span.clone()], codes, nmax, weights.map(|w| &w[span])),
        }
    }

    /// The eight sub-blocks of `x` at `span`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn eight(self, x: &[f32], codes: &mut [i8], span: Range<usize>) -> [f32; 8] {
        match self {
            Self::Q3K => searches_avx2::q3_scales(&x[span], codes),
            Self::Symmetric { nmax, weights } => searches_avx2::symmetric_scales::<16>(&x[span.clone()], codes, nmax, weights.map(|w| &w[span])),
        }
    }
}

/// Each 16-value sub-block's scale from `search`, its codes into `codes`: eight at a time in AVX2
/// where the processor has it.
fn sub_block_scales(x: &[f32], codes: &mut [i8; QK_K], search: SubBlockSearch) -> [f32; 16] {
    let mut scales = [0f32; 16];
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        for (half, scales) in scales.chunks_mut(8).enumerate() {
            let span = 128 * half..128 * (half + 1);
            // SAFETY: the processor has AVX2.
            scales.copy_from_slice(&unsafe { search.eight(x, &mut codes[span.clone()], span) });
        }
        return scales;
    }
    for (j, (scale, codes)) in scales.iter_mut().zip(codes.chunks_mut(16)).enumerate() {
        *scale = search.alone(x, codes, 16 * j..16 * j + 16);
    }
    scales
}

/// Q3_K super-blocks of `values` (a multiple of 256).
pub fn encode_q3_k(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, QK_K, 110, |x, out| {
        let mut codes = [0i8; QK_K];
        let scales = sub_block_scales(x, &mut codes, SubBlockSearch::Q3K);
        let max_scale = largest_magnitude(&scales);
        out.fill(0);
        let (packed, d_bytes) = out[96..].split_at_mut(12);
        // Sub-block scales in 6 bits (offset by 32).
        let d = if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            let levels = scales.map(|scale| (nearest_int(iscale * scale).clamp(-32, 31) + 32) as u8);
            pack_q3_k_scales(&levels, packed);
            f16::from_f32(1.0 / iscale)
        } else {
            f16::from_f32(0.0)
        };
        d_bytes.copy_from_slice(&d.to_le_bytes());
        finish_q3_k(x, &mut codes, out);
    })
}

/// Q3_K's sixteen 6-bit scales (offset by 32) in 12 bytes: low nibbles first, then their top bit
/// pairs.
fn pack_q3_k_scales(levels: &[u8; 16], packed: &mut [u8]) {
    for (j, &l) in levels.iter().enumerate() {
        if j < 8 {
            packed[j] = l & 0xF;
        } else {
            packed[j - 8] |= (l & 0xF) << 4;
        }
        packed[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
    }
}

/// The rest of a zeroed Q3_K block whose scales and `d` are written: codes again against the
/// scales as stored (a zero scale keeps the search's codes), then the planes of bits.
fn finish_q3_k(x: &[f32], codes: &mut [i8; QK_K], out: &mut [u8]) {
    let (high, rest) = out.split_at_mut(32);
    let (low, rest) = rest.split_at_mut(64);
    let (packed, d_bytes) = rest.split_at_mut(12);
    let d = f16::from_le_bytes([d_bytes[0], d_bytes[1]]);
    for j in 0..16 {
        let low_bits = if j < 8 { packed[j] & 0xF } else { packed[j - 8] >> 4 };
        let sc = (low_bits | ((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) as i8 - 32;
        let d = d.to_f32() * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            // Clamped in f32 (exact for these integers), which vectorises without SSE4.1.
            codes[i] = (nearest_int(x[i] / d) as f32).clamp(-4.0, 3.0) as i8 + 4;
        }
    }
    // Byte l holds the third bits of values l, l + 32, …, l + 224.
    for (l, high) in high.iter_mut().enumerate() {
        *high = (0..8).fold(0, |bits, k| bits | u8::from(codes[32 * k + l] > 3) << k);
    }
    let q = |i: usize| (codes[i] as u8) & 3;
    for (half, low) in low.chunks_mut(32).enumerate() {
        let base = 128 * half;
        for l in 0..32 {
            low[l] = q(base + l) | q(base + l + 32) << 2 | q(base + l + 64) << 4 | q(base + l + 96) << 6;
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (Q6_K's search with `nmax = 32`): codes `q + nmax`
/// for `q` in `−nmax..nmax`, the scale minimising the weighted squared error (weights `weights`,
/// or x²) over 19 candidates around `−nmax / max`.
fn weighted_symmetric_scale(x: &[f32], codes: &mut [i8], nmax: i32, weights: Option<&[f32]>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2")]
        fn avx2(x: &[f32], codes: &mut [i8], nmax: i32, weights: Option<&[f32]>) -> f32 {
            weighted_symmetric_scale_lanes(x, codes, nmax, weights)
        }
        // SAFETY: the processor has AVX2.
        return unsafe { avx2(x, codes, nmax, weights) };
    }
    weighted_symmetric_scale_lanes(x, codes, nmax, weights)
}

#[inline(always)]
fn weighted_symmetric_scale_lanes(x: &[f32], codes: &mut [i8], nmax: i32, weights: Option<&[f32]>) -> f32 {
    const CANDIDATES: usize = 19;
    let max = largest_magnitude(x);
    if max.abs() < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let quantize = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // ggml's candidates in its order: −nmax/max, then −(nmax + 0.1·step)/max for steps −9..=9
    // but 0. None depends on another's outcome, so their sums run side by side (each in ggml's
    // order of values, the same floats), which the compiler vectorises over the candidates.
    let mut iscales = [-(nmax as f32) / max; CANDIDATES];
    for (iscale, step) in iscales[1..].iter_mut().zip((-9..=9).filter(|&s| s != 0)) {
        *iscale = -(nmax as f32 + 0.1 * step as f32) / max;
    }
    let (mut sum_lx, mut sum_l2) = ([0f32; CANDIDATES], [0f32; CANDIDATES]);
    for (i, &v) in x.iter().enumerate() {
        let w = weights.map_or(v * v, |w| w[i]);
        let wv = w * v;
        for c in 0..CANDIDATES {
            let l = quantize(iscales[c], v) as f32;
            sum_lx[c] += wv * l;
            sum_l2[c] += w * l * l;
        }
    }
    let mut chosen = 0;
    let mut scale = if sum_l2[0] != 0.0 { sum_lx[0] / sum_l2[0] } else { 0.0 };
    let mut best = scale * sum_lx[0];
    for c in 1..CANDIDATES {
        if sum_l2[c] > 0.0 && sum_lx[c] * sum_lx[c] > best * sum_l2[c] {
            chosen = c;
            scale = sum_lx[c] / sum_l2[c];
            best = scale * sum_lx[c];
        }
    }
    for (code, &v) in codes.iter_mut().zip(x) {
        *code = (quantize(iscales[chosen], v) + nmax) as i8;
    }
    scale
}

/// Q6_K super-blocks of `values` (a multiple of 256).
pub fn encode_q6_k(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, QK_K, 210, |x, out| {
        let mut codes = [0i8; QK_K];
        let scales = sub_block_scales(x, &mut codes, SubBlockSearch::Symmetric { nmax: 32, weights: None });
        finish_q6_k(x, &scales, &mut codes, out);
    })
}

/// A Q6_K block from its sub-block scales and search codes: scales as i8 against the block's
/// f16 `d`, codes again against them, then packed.
fn finish_q6_k(x: &[f32], scales: &[f32; 16], codes: &mut [i8; QK_K], out: &mut [u8]) {
    let max_scale = largest_magnitude(scales);
    if max_scale.abs() < GROUP_MAX_EPS {
        out.fill(0);
        return;
    }
    // Sub-block scales as i8 against the block's f16 `d`; codes again against them.
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    for (ib, scale) in scales.iter().enumerate() {
        out[192 + ib] = nearest_int(iscale * scale).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let d = d.to_f32() * f32::from(out[192 + j] as i8);
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            codes[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    out[208..210].copy_from_slice(&d.to_le_bytes());
    // Per 128 values: low nibbles of values l and l+64 share a byte (and l+32, l+96); the
    // high bit pairs of l, l+32, l+64, l+96 share one.
    let (low, high) = out[..192].split_at_mut(128);
    for (half, (low, high)) in low.chunks_mut(64).zip(high.chunks_mut(32)).enumerate() {
        let q = |i: usize| codes[128 * half + i] as u8;
        for l in 0..32 {
            low[l] = (q(l) & 0xF) | (q(l + 64) & 0xF) << 4;
            low[l + 32] = (q(l + 32) & 0xF) | (q(l + 96) & 0xF) << 4;
            high[l] = (q(l) >> 4) | (q(l + 32) >> 4) << 2 | (q(l + 64) >> 4) << 4 | (q(l + 96) >> 4) << 6;
        }
    }
}

/// ggml's `best_index_int8` over IQ4's grid: the code whose value is nearest `x`, the upper one
/// of a tie.
fn nearest_iq4_code(x: f32) -> u8 {
    let value = |i: usize| f32::from(IQ4_VALUES[i]);
    if x <= value(0) {
        return 0;
    }
    if x >= value(15) {
        return 15;
    }
    let (mut low, mut high) = (0, 15);
    while high - low > 1 {
        let middle = (low + high) / 2;
        if x < value(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    (if x - value(high - 1) < value(high) - x { high - 1 } else { high }) as u8
}

/// ggml's IQ4 scale search (`quantize_row_iq4_nl_impl`, 7 tries each way) over one 32-value
/// block: the scale from the value of largest magnitude, then the best of 15 candidate scales
/// around it by the `weights`-weighted least-squares fit of the grid values. 0 for a zero block.
fn iq4_scale(x: &[f32], weights: &[f32]) -> f32 {
    let max = largest_magnitude(x);
    if max.abs() < GROUP_MAX_EPS {
        return 0.0;
    }
    let first = f32::from(IQ4_VALUES[0]);
    let fit = |inverse: f32| {
        x.iter().zip(weights).fold((0f32, 0f32), |(sum_qx, sum_q2), (&v, &w)| {
            let q = f32::from(IQ4_VALUES[nearest_iq4_code(inverse * v) as usize]);
            (sum_qx + w * q * v, sum_q2 + w * q * q)
        })
    };
    let (sum_qx, sum_q2) = fit(1.0 / (-max / first));
    let mut scale = if sum_q2 > 0.0 { sum_qx / sum_q2 } else { 0.0 };
    let mut best = scale * sum_qx;
    for step in -7..=7 {
        let (sum_qx, sum_q2) = fit((step + i32::from(IQ4_VALUES[0])) as f32 / max);
        if sum_q2 > 0.0 && sum_qx * sum_qx > best * sum_q2 {
            scale = sum_qx / sum_q2;
            best = scale * sum_qx;
        }
    }
    scale
}

/// IQ4 nibbles of `codes` (value `j` low, value `j + 16` high, per 32 values) into `out`.
fn pack_iq4_nibbles(codes: &[u8], out: &mut [u8]) {
    for (out, codes) in out.chunks_mut(16).zip(codes.chunks(32)) {
        for j in 0..16 {
            out[j] = codes[j] | codes[j + 16] << 4;
        }
    }
}

/// Each of `N` values' square: IQ4's weights without an importance matrix.
fn squares<const N: usize>(x: &[f32]) -> [f32; N] {
    std::array::from_fn(|i| x[i] * x[i])
}

/// IQ4_NL blocks of `values` (a multiple of 32), eight at a time where they come in 256s.
pub fn encode_iq4_nl(values: &[f32]) -> Vec<u8> {
    if values.len() % QK_K == 0 {
        return encode_blocks(values, QK_K, 8 * 18, |x, out| eight_iq4_nl_blocks(x, &squares::<QK_K>(x), out));
    }
    encode_blocks(values, 32, 18, |x, out| iq4_nl_block(x, &squares::<32>(x), out))
}

/// Eight consecutive IQ4_NL blocks of `x` with their values' `weights`, as [`iq4_nl_block`] each.
fn eight_iq4_nl_blocks(x: &[f32], weights: &[f32], out: &mut [u8]) {
    let scales = iq4_scales(x, weights);
    let inverses = scales.map(|scale| if scale != 0.0 { 1.0 / scale } else { 0.0 });
    let mut codes = [0u8; QK_K];
    iq4_codes(x, inverses, &mut codes);
    for ((out, scale), codes) in out.chunks_mut(18).zip(scales).zip(codes.chunks(32)) {
        out[0..2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
        pack_iq4_nibbles(codes, &mut out[2..]);
    }
}

/// One IQ4_NL block of `x` with its values' `weights`.
fn iq4_nl_block(x: &[f32], weights: &[f32], out: &mut [u8]) {
    let scale = iq4_scale(x, weights);
    out[0..2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let codes: Vec<u8> = x.iter().map(|&v| nearest_iq4_code(inverse * v)).collect();
    pack_iq4_nibbles(&codes, &mut out[2..]);
}

/// [`iq4_scale`] of eight consecutive 32-value blocks: at once in AVX2 where the processor has it.
fn iq4_scales(x: &[f32], weights: &[f32]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the processor has AVX2.
        return unsafe { searches_avx2::iq4_scales(x, weights) };
    }
    std::array::from_fn(|j| iq4_scale(&x[32 * j..32 * j + 32], &weights[32 * j..32 * j + 32]))
}

/// The IQ4 codes of eight consecutive 32-value blocks, block `j`'s values times `inverses[j]`.
fn iq4_codes(x: &[f32], inverses: [f32; 8], codes: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the processor has AVX2.
        return unsafe { searches_avx2::iq4_codes(x, inverses, codes) };
    }
    for (i, (code, &v)) in codes.iter_mut().zip(x).enumerate() {
        *code = nearest_iq4_code(inverses[i / 32] * v);
    }
}

/// IQ4_XS super-blocks of `values` (a multiple of 256).
pub fn encode_iq4_xs(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, QK_K, 136, |x, out| iq4_xs_block(x, &squares::<QK_K>(x), out))
}

/// One IQ4_XS super-block of `x` with its values' `weights`.
fn iq4_xs_block(x: &[f32], weights: &[f32], out: &mut [u8]) {
    let scales = iq4_scales(x, weights);
    // Sub-block scales in 6 bits (offset by 32) against the block's `d`; codes against them.
    let d = -largest_magnitude(&scales) / 32.0;
    out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut inverses = [0f32; 8];
    let mut high_bits = 0u16;
    out[4..8].fill(0);
    for (ib, scale) in scales.iter().enumerate() {
        let l = nearest_int(inverse * scale).clamp(-32, 31);
        let sub_scale = d * l as f32;
        inverses[ib] = if sub_scale != 0.0 { 1.0 / sub_scale } else { 0.0 };
        let l = (l + 32) as u8;
        out[4 + ib / 2] |= (l & 0xF) << (4 * (ib % 2));
        high_bits |= u16::from(l >> 4) << (2 * ib);
    }
    out[2..4].copy_from_slice(&high_bits.to_le_bytes());
    let mut codes = [0u8; QK_K];
    iq4_codes(x, inverses, &mut codes);
    pack_iq4_nibbles(&codes, &mut out[8..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with a spread of magnitudes, a zero block and an outlier.
    pub(super) fn values(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut v: Vec<f32> = (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * (1.0 + (i / 256) as f32 * 0.3)
            })
            .collect();
        v[256..512].fill(0.0);
        v[700] = 9.0;
        v
    }

    /// Dequantized Q4_K, for the test: `d·sc·q − dmin·m`.
    fn decode_q4_k(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks(144).flat_map(|b| {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
            (0..QK_K).map(move |i| {
                let (sc, m) = scale_min_k4(i / 32, &b[4..16]);
                let byte = b[16 + 32 * (i / 64) + i % 32];
                let q = if i % 64 < 32 { byte & 0xF } else { byte >> 4 };
                d * f32::from(sc) * f32::from(q) - dmin * f32::from(m)
            })
        }).collect()
    }

    /// Dequantized Q5_K, for the test: Q4_K's with a fifth bit.
    fn decode_q5_k(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks(176).flat_map(|b| {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
            (0..QK_K).map(move |i| {
                let (sc, m) = scale_min_k4(i / 32, &b[4..16]);
                let byte = b[48 + 32 * (i / 64) + i % 32];
                let low = if i % 64 < 32 { byte & 0xF } else { byte >> 4 };
                let high = (b[16 + i % 32] >> (i / 32)) & 1;
                d * f32::from(sc) * f32::from(low | high << 4) - dmin * f32::from(m)
            })
        }).collect()
    }

    /// Dequantized Q3_K, for the test: `d·(sc − 32)·(q − 4)`.
    fn decode_q3_k(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks(110).flat_map(|b| {
            let d = f16::from_le_bytes([b[108], b[109]]).to_f32();
            let packed = &b[96..108];
            (0..QK_K).map(move |i| {
                let j = i / 16;
                let low_bits = if j < 8 { packed[j] & 0xF } else { packed[j - 8] >> 4 };
                let sc = (low_bits | ((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) as i8 - 32;
                let (half, l) = (i / 128, i % 128);
                let low = (b[32 + 32 * half + l % 32] >> (2 * (l / 32))) & 3;
                let high = (b[i % 32] >> (i / 32)) & 1;
                d * f32::from(sc) * (f32::from(low | high << 2) - 4.0)
            })
        }).collect()
    }

    /// Dequantized Q5_1, for the test: `q·d + m`.
    fn decode_q5_1(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks(24).flat_map(|b| {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
            let high = u32::from_le_bytes(b[4..8].try_into().unwrap());
            (0..32).map(move |j| {
                let byte = b[8 + j % 16];
                let low = if j < 16 { byte & 0xF } else { byte >> 4 };
                f32::from(low | (((high >> j) & 1) as u8) << 4) * d + m
            })
        }).collect()
    }

    /// Dequantized Q6_K, for the test: `d·sc·(q − 32)`.
    fn decode_q6_k(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks(210).flat_map(|b| {
            let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
            (0..QK_K).map(move |i| {
                let (half, l) = (i / 128, i % 128);
                let low = b[64 * half + l % 64];
                let low = if l < 64 { low & 0xF } else { low >> 4 };
                let high = (b[128 + 32 * half + l % 32] >> (2 * (l / 32))) & 3;
                d * f32::from(b[192 + i / 16] as i8) * (f32::from(low | high << 4) - 32.0)
            })
        }).collect()
    }

    fn worst_relative_error(original: &[f32], decoded: &[f32], block: usize) -> f32 {
        original.chunks(block).zip(decoded.chunks(block)).map(|(x, y)| {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let error = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            if scale > 0.0 { error / scale } else { error }
        }).fold(0f32, f32::max)
    }

    #[test]
    fn k_quants_decode_within_their_steps() {
        let x = values(8 * QK_K);
        let q4 = encode_q4_k(&x);
        assert_eq!(q4.len(), 8 * 144);
        // 4 bits with an offset: half a step of a 15-step range, plus the 6-bit scale rounding.
        assert!(worst_relative_error(&x, &decode_q4_k(&q4), QK_K) < 0.12);
        let q6 = encode_q6_k(&x);
        assert_eq!(q6.len(), 8 * 210);
        assert!(worst_relative_error(&x, &decode_q6_k(&q6), QK_K) < 0.03);
        let q5 = encode_q5_k(&x);
        assert_eq!(q5.len(), 8 * 176);
        assert!(worst_relative_error(&x, &decode_q5_k(&q5), QK_K) < 0.06);
        let q5_1 = encode_q5_1(&x);
        assert_eq!(q5_1.len(), 8 * 256 / 32 * 24);
        // Half a step of 31 over the block's range (at most twice its largest magnitude).
        assert!(worst_relative_error(&x, &decode_q5_1(&q5_1), 32) < 0.04);
        // The zero super-block decodes to zeros.
        let q3 = encode_q3_k(&x);
        assert_eq!(q3.len(), 8 * 110);
        // 3 bits: half a step of 7 over about twice the largest magnitude, and the scales' 6 bits.
        assert!(worst_relative_error(&x, &decode_q3_k(&q3), QK_K) < 0.3);
        let zeros = [decode_q3_k(&q3), decode_q4_k(&q4), decode_q5_k(&q5), decode_q6_k(&q6)];
        assert!(zeros.iter().all(|decoded| decoded[256..512].iter().all(|&v| v == 0.0)));
    }

    #[test]
    fn q2_k_and_iq4_decode_within_their_steps() {
        use crate::gguf::{GgmlType, dequantize};
        let x = values(8 * QK_K);
        let q2 = encode_q2_k(&x);
        assert_eq!(q2.len(), 8 * 84);
        // 2 bits with an offset: half a step of 3 over the sub-block's range, and 4-bit scales.
        let q2_error = worst_relative_error(&x, &dequantize(GgmlType::Q2_K, &q2), QK_K);
        let nl = encode_iq4_nl(&x);
        assert_eq!(nl.len(), 8 * QK_K / 32 * 18);
        // The grid's widest gap is 24 of 127; the fitted scale may leave the largest value off
        // the grid's end, so a little more than half of it.
        let nl_error = worst_relative_error(&x, &dequantize(GgmlType::IQ4_NL, &nl), 32);
        let xs = encode_iq4_xs(&x);
        assert_eq!(xs.len(), 8 * 136);
        let xs_error = worst_relative_error(&x, &dequantize(GgmlType::IQ4_XS, &xs), QK_K);
        assert!(q2_error < 0.5 && nl_error < 0.12 && xs_error < 0.15, "Q2_K {q2_error}, IQ4_NL {nl_error}, IQ4_XS {xs_error}");
        // A zero block: every code the grid's value nearest 0 (code 8), scale ±0.
        assert!(nl[18 * 8..18 * 9][2..].iter().all(|&b| b == 0x88) && f16::from_le_bytes([nl[144], nl[145]]).to_f32() == 0.0);
        assert!(xs[136..136 + 136][8..].iter().all(|&b| b == 0x88));
        let zeros = [dequantize(GgmlType::Q2_K, &q2), dequantize(GgmlType::IQ4_XS, &xs)];
        assert!(zeros.iter().all(|decoded| decoded[256..512].iter().all(|&v| v == 0.0)));
    }

    #[test]
    fn iq4_codes_are_the_nearest_grid_values() {
        for (x, code) in [(-200.0, 0), (-127.0, 0), (-115.6, 0), (-115.4, 1), (0.0, 8), (-4.5, 8), (-4.6, 7), (113.0, 15), (101.0, 15), (100.9, 14)] {
            assert_eq!(nearest_iq4_code(x), code, "{x}");
        }
    }

    #[test]
    fn q8_0_and_q4_0_blocks_match_ggml_reference_values() {
        let values: Vec<f32> = (0..32).map(|i| i as f32 - 15.5).collect();
        let q8 = encode_q8_0(&values);
        assert_eq!(q8.len(), 34);
        // d = max|x| / 127 = 15.5 / 127: the extremes map to -127 and 127, 0.5 to round(4.1) = 4.
        assert_eq!(f16::from_le_bytes([q8[0], q8[1]]).to_f32(), f16::from_f32(15.5 / 127.0).to_f32());
        assert_eq!((q8[2] as i8, q8[33] as i8, q8[2 + 16] as i8), (-127, 127, 4));
        let q4 = encode_q4_0(&values);
        assert_eq!(q4.len(), 18);
        // The largest magnitude is -15.5 (first): d = 15.5 / 8, so -15.5 -> 0 and 15.5 -> 16 -> 15.
        assert_eq!(f16::from_le_bytes([q4[0], q4[1]]).to_f32(), f16::from_f32(-15.5 / -8.0).to_f32());
        assert_eq!(q4[2] & 0xf, 0);
        assert_eq!(q4[17] >> 4, 15);
    }

    #[test]
    fn q5_0_matches_ggml_on_a_hand_checked_block() {
        // max = -2 (largest magnitude) -> d = 0.125, 1/d = 8: x·8 + 16.5 truncated.
        let mut x = [0f32; 32];
        x[0] = -2.0;
        x[1] = 1.0;
        x[17] = 0.0625;
        let bytes = encode_q5_0(&x);
        assert_eq!(f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(), 0.125);
        let high = u32::from_le_bytes(bytes[2..6].try_into().unwrap());
        // q: x0 -> 0, x1 -> 24, zeros -> 16, x17 -> 17.
        // Byte j: value j's low nibble, then value j + 16's (16: low nibble 0).
        assert_eq!(bytes[6], 0);
        assert_eq!(bytes[7], 24 & 0xF | (17 & 0xF) << 4);
        assert_eq!(high & 1, 0);
        assert_eq!(high >> 1 & 1, 1);
        assert_eq!(high >> 17 & 1, 1);
    }

    /// Sub-blocks searched side by side (one a lane) come out as each searched alone, bit for bit:
    /// random ones, all zeros, constant, all negative, one whose minimum is -0, with NaN and with ∞.
    #[test]
    fn sub_blocks_side_by_side_equal_each_alone() {
        let mut x = values(4 * QK_K)[..QK_K].to_vec();
        x[0..16].fill(0.0);
        x[16..32].fill(0.25);
        x[32..48].fill(-0.5);
        x[48..64].iter_mut().for_each(|v| *v = -v.abs() - 0.01);
        x[64..80].iter_mut().for_each(|v| *v = v.abs());
        x[64] = -0.0;
        (x[100], x[120]) = (f32::NAN, f32::INFINITY);
        let weights: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
        fn check<const L: usize, const N: usize>(x: &[f32], weights: &[f32], search: ScaleSearch) {
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let mut together = [0u8; QK_K];
            let (scales, mins) = scale_and_min::<L, N>(x, weights, &mut together, search);
            for j in 0..L {
                let mut alone = [0u8; N];
                let ([scale], [min]) = scale_and_min::<1, N>(&x[N * j..N * j + N], &weights[N * j..N * j + N], &mut alone, search);
                assert_eq!(bits(&[scales[j], mins[j]]), bits(&[scale, min]), "{L} x {N}, sub-block {j}");
                assert_eq!(together[N * j..N * j + N], alone, "{L} x {N}, sub-block {j}");
            }
        }
        for search in [Q2_K_SEARCH, Q4_K_SEARCH, Q5_K_SEARCH] {
            check::<16, 16>(&x, &weights, search);
            check::<8, 32>(&x, &weights, search);
        }
    }

    /// Eight sub-blocks searched at once in AVX2 come out as each searched alone, bit for bit, for
    /// Q6_K's and Q3_K's searches and the weighted ones of the importance-matrix types.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_value_searches_eight_at_a_time_equal_each_alone() {
        if !has_avx2() {
            return;
        }
        let mut x = values(4 * QK_K)[..QK_K].to_vec();
        x[0..16].fill(0.0);
        x[16..32].fill(0.25);
        x[32..48].iter_mut().for_each(|v| *v = -v.abs() - 0.01);
        x[48..64].fill(1e-16);
        x[64] = -0.0;
        (x[100], x[120], x[140]) = (f32::NAN, f32::INFINITY, f32::NAN);
        let weights: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
        fn check<const N: usize>(x: &[f32], nmax: i32, weights: Option<&[f32]>) {
            let mut together = vec![0i8; 8 * N];
            // SAFETY: checked above that the processor has AVX2.
            let scales = unsafe { searches_avx2::symmetric_scales::<N>(&x[..8 * N], &mut together, nmax, weights) };
            for j in 0..8 {
                let mut alone = [0i8; N];
                let scale = weighted_symmetric_scale_lanes(&x[N * j..N * j + N], &mut alone, nmax, weights.map(|w| &w[N * j..N * j + N]));
                assert_eq!(scales[j].to_bits(), scale.to_bits(), "{N} values, nmax {nmax}, sub-block {j}");
                assert_eq!(together[N * j..N * j + N], alone, "{N} values, nmax {nmax}, sub-block {j}");
            }
        }
        for offset in [0, 128] {
            check::<16>(&x[offset..], 32, None);
            check::<16>(&x[offset..], 4, Some(&weights[offset..]));
        }
        check::<32>(&x, 8, Some(&weights));
        check::<32>(&x, 16, None);
        for offset in [0, 128] {
            let mut together = [0i8; 128];
            // SAFETY: checked above that the processor has AVX2.
            let scales = unsafe { searches_avx2::q3_scales(&x[offset..offset + 128], &mut together) };
            for j in 0..8 {
                let mut alone = [0i8; 16];
                let scale = q3_scale(&x[offset + 16 * j..offset + 16 * j + 16], &mut alone);
                assert_eq!((scales[j].to_bits(), &together[16 * j..16 * j + 16]), (scale.to_bits(), &alone[..]), "Q3_K, sub-block {j} from {offset}");
            }
        }
    }

    /// IQ4's scale search and codes eight blocks at a time in AVX2 equal ggml's one block at a
    /// time, with a zero block, ties between grid values, the grid's ends and NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn iq4_eight_blocks_at_a_time_equal_one_at_a_time() {
        if !has_avx2() {
            return;
        }
        let mut x = values(4 * QK_K);
        (x[40], x[70]) = (f32::NAN, f32::INFINITY);
        for (offset, weights) in [(0, squares::<QK_K>(&x[..QK_K])), (512, squares::<QK_K>(&x[512..768])), (256, [1.0; QK_K])] {
            let x = &x[offset..offset + QK_K];
            // SAFETY: checked above that the processor has AVX2.
            let scales = unsafe { searches_avx2::iq4_scales(x, &weights) };
            for j in 0..8 {
                assert_eq!(scales[j].to_bits(), iq4_scale(&x[32 * j..32 * j + 32], &weights[32 * j..32 * j + 32]).to_bits(), "block {j} from {offset}");
            }
        }
        // Every grid value, the midpoints between neighbours (ties), beyond the ends, NaN.
        let grid: Vec<f32> = IQ4_VALUES.iter().map(|&v| f32::from(v)).collect();
        let mut probes: Vec<f32> = grid.clone();
        probes.extend(grid.windows(2).map(|w| (w[0] + w[1]) / 2.0));
        probes.extend([-1000.0, -127.5, 113.5, 1000.0, f32::NAN, -0.0, 0.0, 1e-30]);
        probes.extend(values(4 * QK_K)[..QK_K].iter().map(|v| v * 300.0));
        probes.resize(QK_K, 0.5);
        let inverses = [1.0, 0.5, 2.0, -1.0, 0.0, 1.5, 0.25, 3.0];
        let mut codes = [0u8; QK_K];
        // SAFETY: as above.
        unsafe { searches_avx2::iq4_codes(&probes, inverses, &mut codes) };
        for (i, &v) in probes.iter().enumerate() {
            assert_eq!(codes[i], nearest_iq4_code(inverses[i / 32] * v), "{v} times {}", inverses[i / 32]);
        }
    }

    /// Q8_0's rounding where it is an instruction (AVX2) equals libm's `roundf`: halves away from
    /// zero, and the float just below a half down.
    #[test]
    fn q8_0_rounds_halves_away_from_zero() {
        let mut x = [0f32; 64];
        x[0] = 127.0;
        let halves = [0.5f32, -0.5, 2.5, -2.5, 126.5, -126.5, 0.499_999_97, -0.499_999_97, 1.499_999_9, 3.5, -3.5, 0.0, -0.0];
        x[1..1 + halves.len()].copy_from_slice(&halves);
        x[32..].copy_from_slice(&values(4 * QK_K)[..32]);
        let mut one_at_a_time = vec![0u8; 68];
        for (out, x) in one_at_a_time.chunks_mut(34).zip(x.chunks(32)) {
            q8_0_block(x, out);
        }
        assert_eq!(encode_q8_0(&x), one_at_a_time);
        assert_eq!(one_at_a_time[2..8].iter().map(|&b| b as i8).collect::<Vec<_>>(), [127, 1, -1, 3, -3, 127]);
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 3.49, -7.51, 14.999, 0.0, -0.0, 62.5, 63.5, -128.0, 4_194_303.0] {
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }
}
