//! ggml's quantizers given an importance matrix (llama-quantize `--imatrix`): each column of a
//! weight has an importance (the mean squared activation it sees on calibration text), and each
//! value's error is weighed by `importance · sqrt(σ² + x²)`, σ² a mean square of its row or
//! super-block. The searches differ from the plain ones: K-quants fit each sub-block's scale and
//! minimum over 37 candidates (`make_qkx3_quants`) and the block's 6-bit scales by a weighted fit
//! (`make_qp_quants`) instead of by their largest; Q4_0/Q5_0 use `make_qx_quants`, Q4_1/Q5_1
//! `make_qkx3_quants`. Q8_0 ignores the importance, as llama.cpp does.
//!
//! Every function takes whole rows of `importance.len()` values; rows are spread over the threads.

use half::f16;
use rayon::prelude::*;

use super::{
    GROUP_MAX_EPS, QK_K, ScaleSearch, SubBlockSearch, eight_iq4_nl_blocks, finish_q2_k, finish_q3_k, finish_q6_k, iq4_nl_block,
    iq4_xs_block, nearest_int, pack_five_bits, pack_k4_head, pack_q3_k_scales, pack_q4_k_codes, pack_q5_k_codes, requantize_k4,
    scale_and_min, sub_block_scales, weighted_symmetric_scale,
};

/// `make_qkx3_quants`' candidates as the weighted quantizers call it.
fn weighted_search(nmax: i32) -> ScaleSearch {
    ScaleSearch { nmax, rmin: -0.9, rdelta: 0.05, steps: 36, absolute_error: false }
}

fn sum_of_squares(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |sum, v| sum + v * v)
}

/// Each of `N` values' weight: its column's importance times `sqrt(σ² + x²)`.
fn weights<const N: usize>(x: &[f32], importance: &[f32], sigma2: f32) -> [f32; N] {
    std::array::from_fn(|i| importance[i] * (sigma2 + x[i] * x[i]).sqrt())
}

fn total(weights: &[f32]) -> f32 {
    weights.iter().fold(0f32, |sum, w| sum + w)
}

/// `values` (whole rows of `importance.len()`) encoded row by row: blocks of `block` values in
/// `bytes` bytes, each by `encode_block(block values, its importance, the row's mean square, out)`.
fn encode_rows(
    values: &[f32],
    importance: &[f32],
    block: usize,
    bytes: usize,
    encode_block: impl Fn(&[f32], &[f32], f32, &mut [u8]) + Sync,
) -> Vec<u8> {
    let row = importance.len();
    assert!(row % block == 0 && values.len() % row == 0, "whole rows of whole {block}-value blocks");
    let row_bytes = row / block * bytes;
    let mut out = vec![0u8; values.len() / row * row_bytes];
    out.par_chunks_mut(row_bytes).zip(values.par_chunks(row)).for_each(|(out, x)| {
        let mean_square = sum_of_squares(x) / row as f32;
        for ((out, xb), qw) in out.chunks_mut(bytes).zip(x.chunks(block)).zip(importance.chunks(block)) {
            encode_block(xb, qw, mean_square, out);
        }
    });
    out
}

/// ggml's `make_qp_quants`: non-negative `x` (a block's sub-block scales or minimums) as codes
/// `0..=nmax` of one scale, chosen by the `weights`-weighted squared error over 9 candidates, then
/// up to 5 rounds of single-code moves. Codes are bytes as ggml keeps them (a negative wraps).
pub(super) fn positive_scale(x: &[f32], nmax: i32, weights: &[f32], codes: &mut [u8]) -> f32 {
    let max = x.iter().fold(0f32, |m, &v| if m > v { m } else { v });
    if max < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (code, &v) in codes.iter_mut().zip(x) {
        *code = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..x.len() {
        let diff = x[i] - scale * f32::from(codes[i]);
        best += weights[i] * diff * diff;
    }
    for step in (-4..=4).filter(|&s| s != 0) {
        let candidate = (0.1 * step as f32 + nmax as f32) / max;
        let candidate_scale = 1.0 / candidate;
        let mut error = 0f32;
        for i in 0..x.len() {
            let l = nearest_int(candidate * x[i]).min(nmax);
            let diff = x[i] - candidate_scale * l as f32;
            error += weights[i] * diff * diff;
        }
        if error < best {
            best = error;
            iscale = candidate;
        }
    }
    let (mut sum_lx, mut sum_l2) = (0f32, 0f32);
    for i in 0..x.len() {
        let l = nearest_int(iscale * x[i]).min(nmax);
        codes[i] = l as u8;
        let (w, l) = (weights[i], l as f32);
        sum_lx += w * x[i] * l;
        sum_l2 += w * l * l;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..x.len() {
            let (w, l) = (weights[i], f32::from(codes[i]));
            let mut slx = sum_lx - w * x[i] * l;
            let mut sl2 = sum_l2 - w * l * l;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != i32::from(codes[i]) {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * sum_l2 > sum_lx * sum_lx * sl2 {
                        codes[i] = new_l as u8;
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
    if sum_l2 > 0.0 { sum_lx / sum_l2 } else { 0.0 }
}

/// Q4_0 blocks of whole rows.
pub fn encode_q4_0(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, 32, 18, |x, qw, mean_square, out| {
        let mut codes = [0i8; 32];
        let d = weighted_symmetric_scale(x, &mut codes, 8, Some(&weights::<32>(x, qw, mean_square)));
        out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..16 {
            out[2 + j] = codes[j] as u8 | (codes[j + 16] as u8) << 4;
        }
    })
}

/// Q5_0 blocks of whole rows.
pub fn encode_q5_0(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, 32, 22, |x, qw, mean_square, out| {
        let mut codes = [0i8; 32];
        let d = weighted_symmetric_scale(x, &mut codes, 16, Some(&weights::<32>(x, qw, mean_square)));
        out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let (high, nibbles) = out[2..].split_at_mut(4);
        pack_five_bits(|j| codes[j] as u8, high, nibbles);
    })
}

/// A Q4_1 / Q5_1 block's scale and minimum into `out[0..4]`, its codes `0..=nmax` returned.
fn scale_and_minimum(x: &[f32], qw: &[f32], mean_square: f32, nmax: i32, out: &mut [u8]) -> [u8; 32] {
    let mut codes = [0u8; 32];
    let ([scale], [offset]) = scale_and_min::<1, 32>(x, &weights::<32>(x, qw, mean_square), &mut codes, weighted_search(nmax));
    out[0..2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
    out[2..4].copy_from_slice(&f16::from_f32(-offset).to_le_bytes());
    codes
}

/// Q4_1 blocks of whole rows.
pub fn encode_q4_1(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, 32, 20, |x, qw, mean_square, out| {
        let codes = scale_and_minimum(x, qw, mean_square, 15, out);
        for j in 0..16 {
            out[4 + j] = codes[j] | codes[j + 16] << 4;
        }
    })
}

/// Q5_1 blocks of whole rows.
pub fn encode_q5_1(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, 32, 24, |x, qw, mean_square, out| {
        let codes = scale_and_minimum(x, qw, mean_square, 31, out);
        let (high, nibbles) = out[4..].split_at_mut(4);
        pack_five_bits(|j| codes[j], high, nibbles);
    })
}

/// Q2_K super-blocks of whole rows.
pub fn encode_q2_k(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, QK_K, 84, |x, qw, _, out| {
        let sigma2 = sum_of_squares(x) / QK_K as f32;
        let mut codes = [0u8; QK_K];
        let w = weights::<QK_K>(x, qw, sigma2);
        let sums: [f32; 16] = std::array::from_fn(|j| total(&w[16 * j..16 * j + 16]));
        let (scales, mins) = scale_and_min::<16, 16>(x, &w, &mut codes, weighted_search(3));
        let (mut levels, mut min_levels) = ([0u8; 16], [0u8; 16]);
        let d = positive_scale(&scales, 15, &sums, &mut levels);
        let dmin = positive_scale(&mins, 15, &sums, &mut min_levels);
        for j in 0..16 {
            out[j] = levels[j] | min_levels[j] << 4;
        }
        out[80..82].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        out[82..84].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
        finish_q2_k(x, &mut codes, out);
    })
}

/// Q3_K super-blocks of whole rows.
pub fn encode_q3_k(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, QK_K, 110, |x, qw, _, out| {
        let sigma2 = 2.0 * sum_of_squares(x) / QK_K as f32;
        let mut codes = [0i8; QK_K];
        let w = weights::<QK_K>(x, qw, sigma2);
        let sums: [f32; 16] = std::array::from_fn(|j| total(&w[16 * j..16 * j + 16]));
        let scales = sub_block_scales(x, &mut codes, SubBlockSearch::Symmetric { nmax: 4, weights: Some(&w) });
        out.fill(0);
        let mut levels = [0i8; 16];
        let d = weighted_symmetric_scale(&scales, &mut levels, 32, Some(&sums));
        pack_q3_k_scales(&levels.map(|l| l as u8), &mut out[96..108]);
        out[108..110].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        finish_q3_k(x, &mut codes, out);
    })
}

/// A Q4_K / Q5_K super-block's head from the weighted fits; its codes `0..=nmax`. `clamp`: Q5_K
/// clamps the 6-bit levels to 63 before packing, Q4_K does not.
fn k4_head(x: &[f32], qw: &[f32], head: &mut [u8], nmax: i32, clamp: bool) -> [u8; QK_K] {
    let sigma2 = 2.0 * sum_of_squares(x) / QK_K as f32;
    let mut codes = [0u8; QK_K];
    let w = weights::<QK_K>(x, qw, sigma2);
    let sums: [f32; 8] = std::array::from_fn(|j| total(&w[32 * j..32 * j + 32]));
    let (scales, mins) = scale_and_min::<8, 32>(x, &w, &mut codes, weighted_search(nmax));
    let (mut levels, mut min_levels) = ([0u8; 8], [0u8; 8]);
    let d = positive_scale(&scales, 63, &sums, &mut levels);
    let dmin = positive_scale(&mins, 63, &sums, &mut min_levels);
    if clamp {
        levels = levels.map(|l| l.min(63));
        min_levels = min_levels.map(|l| l.min(63));
    }
    pack_k4_head(head, levels, min_levels, d, dmin);
    requantize_k4(x, head, nmax, &mut codes);
    codes
}

/// Q4_K super-blocks of whole rows.
pub fn encode_q4_k(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, QK_K, 144, |x, qw, _, out| {
        let (head, nibbles) = out.split_at_mut(16);
        let codes = k4_head(x, qw, head, 15, false);
        pack_q4_k_codes(&codes, nibbles);
    })
}

/// Q5_K super-blocks of whole rows.
pub fn encode_q5_k(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, QK_K, 176, |x, qw, _, out| {
        let (head, rest) = out.split_at_mut(16);
        let codes = k4_head(x, qw, head, 31, true);
        pack_q5_k_codes(&codes, rest);
    })
}

/// Q6_K super-blocks of whole rows: the plain search with the importance as its weights.
pub fn encode_q6_k(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, QK_K, 210, |x, qw, _, out| {
        let mut codes = [0i8; QK_K];
        let scales = sub_block_scales(x, &mut codes, SubBlockSearch::Symmetric { nmax: 32, weights: Some(qw) });
        finish_q6_k(x, &scales, &mut codes, out);
    })
}

/// IQ4_NL blocks of whole rows (σ² over each 32-value block), eight at a time in rows of 256s.
pub fn encode_iq4_nl(values: &[f32], importance: &[f32]) -> Vec<u8> {
    if importance.len() % QK_K == 0 {
        return encode_rows(values, importance, QK_K, 8 * 18, |x, qw, _, out| {
            let mut w = [0f32; QK_K];
            for ((w, x), qw) in w.chunks_mut(32).zip(x.chunks(32)).zip(qw.chunks(32)) {
                w.copy_from_slice(&weights::<32>(x, qw, sum_of_squares(x) * (2.0 / 32.0)));
            }
            eight_iq4_nl_blocks(x, &w, out);
        });
    }
    encode_rows(values, importance, 32, 18, |x, qw, _, out| {
        iq4_nl_block(x, &weights::<32>(x, qw, sum_of_squares(x) * (2.0 / 32.0)), out);
    })
}

/// IQ4_XS super-blocks of whole rows (σ² over each super-block).
pub fn encode_iq4_xs(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_rows(values, importance, QK_K, 136, |x, qw, _, out| {
        iq4_xs_block(x, &weights::<QK_K>(x, qw, sum_of_squares(x) * (2.0 / QK_K as f32)), out);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgmlType, dequantize};

    fn values(n: usize) -> Vec<f32> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The importance-weighted squared error of `decoded`.
    fn weighted_error(x: &[f32], decoded: &[f32], importance: &[f32]) -> f32 {
        x.iter().zip(decoded).enumerate().map(|(i, (a, b))| importance[i % importance.len()] * (a - b) * (a - b)).sum()
    }

    /// Weighted by importance, each type decodes within its step, and errs less where the
    /// importance is large than the plain quantizer does.
    #[test]
    fn important_columns_are_quantized_more_closely() {
        let (rows, row) = (16, 512);
        let x = values(rows * row);
        // A few columns matter a hundred times more than the rest.
        let importance: Vec<f32> = (0..row).map(|i| if i % 37 == 0 { 100.0 } else { 1.0 }).collect();
        type Encoders = (GgmlType, fn(&[f32], &[f32]) -> Vec<u8>, fn(&[f32]) -> Vec<u8>);
        let types: [Encoders; 11] = [
            (GgmlType::Q4_0, encode_q4_0, super::super::encode_q4_0),
            (GgmlType::Q4_1, encode_q4_1, super::super::encode_q4_1),
            (GgmlType::Q5_0, encode_q5_0, super::super::encode_q5_0),
            (GgmlType::Q5_1, encode_q5_1, super::super::encode_q5_1),
            (GgmlType::Q2_K, encode_q2_k, super::super::encode_q2_k),
            (GgmlType::Q3_K, encode_q3_k, super::super::encode_q3_k),
            (GgmlType::Q4_K, encode_q4_k, super::super::encode_q4_k),
            (GgmlType::Q5_K, encode_q5_k, super::super::encode_q5_k),
            (GgmlType::Q6_K, encode_q6_k, super::super::encode_q6_k),
            (GgmlType::IQ4_NL, encode_iq4_nl, super::super::encode_iq4_nl),
            (GgmlType::IQ4_XS, encode_iq4_xs, super::super::encode_iq4_xs),
        ];
        for (kind, weighted, plain) in types {
            let with = dequantize(kind, &weighted(&x, &importance));
            let without = dequantize(kind, &plain(&x));
            let worst = x.iter().zip(&with).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 0.5, "{kind:?}: max |diff| {worst} (values in ±0.5)");
            let (a, b) = (weighted_error(&x, &with, &importance), weighted_error(&x, &without, &importance));
            assert!(a < b, "{kind:?}: weighted error {a} with the importance, {b} without");
        }
    }

    #[test]
    fn positive_scale_fits_levels_to_the_largest_value() {
        let x = [1.0f32, 2.0, 3.0, 6.3];
        let mut codes = [0u8; 4];
        let scale = positive_scale(&x, 63, &[1.0; 4], &mut codes);
        assert!(codes[3] >= 62 && codes.iter().all(|&c| c <= 63), "{codes:?}");
        assert!(x.iter().zip(codes).all(|(v, c)| (v - scale * f32::from(c)).abs() <= scale), "{scale} {codes:?}");
        assert_eq!(positive_scale(&[0.0; 4], 63, &[1.0; 4], &mut codes), 0.0);
        assert_eq!(codes, [0; 4]);
    }
}
