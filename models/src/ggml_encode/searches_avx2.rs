//! ggml's K-quant and IQ4 scale searches for eight sub-blocks at once in AVX2: lane `j` is sub-block `j`,
//! and every lane runs the scalar search's operations in its order (no fused multiply-add), so
//! each sub-block gets the same floats, codes and choice as on its own. The compiler's own
//! vectorisation of the lane-by-lane code left most of the sums scalar.

use std::arch::x86_64::*;

use super::ScaleSearch;

/// Sub-blocks a call searches: one a lane of a 256-bit register.
pub(super) const LANES: usize = 8;

/// [`super::scale_and_min`] (`make_qkx2_quants`: Q2_K, Q4_K, Q5_K) over eight consecutive
/// `N`-value sub-blocks of `x` (and `weights`): their scales and `-mins`, codes into `codes`
/// (`8 · N` of them).
#[target_feature(enable = "avx2")]
pub(super) fn scale_and_min<const N: usize>(x: &[f32], weights: &[f32], codes: &mut [u8], search: ScaleSearch) -> ([f32; LANES], [f32; LANES]) {
    let ScaleSearch { nmax, rmin, rdelta, steps, absolute_error } = search;
    // x[i], w[i]: value i of each sub-block, a lane each.
    let (x, w) = (columns::<N>(x), columns::<N>(weights));
    let sign = _mm256_set1_ps(-0.0);
    let error_of = |diff: __m256| if absolute_error { _mm256_andnot_ps(sign, diff) } else { _mm256_mul_ps(diff, diff) };
    let quantize = |iscale: __m256, v: __m256, min: __m256| _mm256_cvtepi32_ps(nearest_int_clamped(_mm256_mul_ps(iscale, _mm256_sub_ps(v, min)), 0, nmax));
    let (mut min, mut max, mut sum_w, mut sum_x) = (x[0], x[0], w[0], _mm256_mul_ps(w[0], x[0]));
    for i in 1..N {
        min = _mm256_blendv_ps(min, x[i], _mm256_cmp_ps::<_CMP_LT_OQ>(x[i], min));
        max = _mm256_blendv_ps(max, x[i], _mm256_cmp_ps::<_CMP_GT_OQ>(x[i], max));
        sum_w = _mm256_add_ps(sum_w, w[i]);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w[i], x[i]));
    }
    min = _mm256_blendv_ps(min, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_GT_OQ>(min, _mm256_setzero_ps()));
    let constant = _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min);
    let iscale = _mm256_div_ps(_mm256_set1_ps(nmax as f32), _mm256_sub_ps(max, min));
    let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);
    let mut best = [_mm256_setzero_ps(); N];
    let mut best_error = _mm256_setzero_ps();
    for i in 0..N {
        best[i] = quantize(iscale, x[i], min);
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, best[i]), min), x[i]);
        best_error = _mm256_add_ps(best_error, _mm256_mul_ps(w[i], error_of(diff)));
    }
    let mut candidate = [_mm256_setzero_ps(); N];
    for step in 0..=steps {
        // Against the minimum as it stands: an improvement moves it.
        let iscale = _mm256_div_ps(_mm256_set1_ps(rmin + rdelta * step as f32 + nmax as f32), _mm256_sub_ps(max, min));
        let (mut sum_l, mut sum_l2, mut sum_xl) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        for i in 0..N {
            let l = quantize(iscale, x[i], min);
            candidate[i] = l;
            let wl = _mm256_mul_ps(w[i], l);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, l));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x[i]));
        }
        let det = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        let fitted = _mm256_cmp_ps::<_CMP_GT_OQ>(det, _mm256_setzero_ps());
        let fit_scale = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)), det);
        let fit_min = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)), det);
        let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(fit_min, _mm256_setzero_ps());
        let this_scale = _mm256_blendv_ps(fit_scale, _mm256_div_ps(sum_xl, sum_l2), positive);
        let this_min = _mm256_blendv_ps(fit_min, _mm256_setzero_ps(), positive);
        let mut error = _mm256_setzero_ps();
        for i in 0..N {
            let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(this_scale, candidate[i]), this_min), x[i]);
            error = _mm256_add_ps(error, _mm256_mul_ps(w[i], error_of(diff)));
        }
        let better = _mm256_andnot_ps(constant, _mm256_and_ps(fitted, _mm256_cmp_ps::<_CMP_LT_OQ>(error, best_error)));
        if _mm256_movemask_ps(better) == 0 {
            continue;
        }
        best_error = _mm256_blendv_ps(best_error, error, better);
        scale = _mm256_blendv_ps(scale, this_scale, better);
        min = _mm256_blendv_ps(min, this_min, better);
        for (best, &candidate) in best.iter_mut().zip(&candidate) {
            *best = _mm256_blendv_ps(*best, candidate, better);
        }
    }
    let scale = _mm256_blendv_ps(scale, _mm256_setzero_ps(), constant);
    let constant = _mm256_movemask_ps(constant);
    for (i, best) in best.iter().enumerate() {
        let best = lanes(*best);
        for j in 0..LANES {
            codes[N * j + i] = if constant >> j & 1 == 1 { 0 } else { best[j] as u8 };
        }
    }
    (lanes(scale), lanes(_mm256_xor_ps(min, sign)))
}

/// [`super::weighted_symmetric_scale`] (`make_qx_quants` with `rmse_type = 1`: Q6_K's search)
/// over eight consecutive `N`-value sub-blocks of `x`, weighted by `weights` or x²: their scales,
/// codes `q + nmax` into `codes`.
#[target_feature(enable = "avx2")]
pub(super) fn symmetric_scales<const N: usize>(x: &[f32], codes: &mut [i8], nmax: i32, weights: Option<&[f32]>) -> [f32; LANES] {
    const CANDIDATES: usize = 19;
    let x = columns::<N>(x);
    let w = match weights {
        Some(weights) => columns::<N>(weights),
        None => std::array::from_fn(|i| _mm256_mul_ps(x[i], x[i])),
    };
    let wx: [__m256; N] = std::array::from_fn(|i| _mm256_mul_ps(w[i], x[i]));
    let (max, blank) = largest_magnitude(&x);
    let quantize = |iscale: __m256, v: __m256| nearest_int_clamped(_mm256_mul_ps(iscale, v), -nmax, nmax - 1);
    // ggml's candidates in its order: −nmax/max, then −(nmax + 0.1·step)/max for steps −9..=9 but 0.
    let mut numerators = [-(nmax as f32); CANDIDATES];
    for (numerator, step) in numerators[1..].iter_mut().zip((-9..=9).filter(|&s| s != 0)) {
        *numerator = -(nmax as f32 + 0.1 * step as f32);
    }
    let (mut chosen, mut scale, mut best) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    for (c, &numerator) in numerators.iter().enumerate() {
        let iscale = _mm256_div_ps(_mm256_set1_ps(numerator), max);
        let (mut sum_lx, mut sum_l2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in 0..N {
            let l = _mm256_cvtepi32_ps(quantize(iscale, x[i]));
            sum_lx = _mm256_add_ps(sum_lx, _mm256_mul_ps(wx[i], l));
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(_mm256_mul_ps(w[i], l), l));
        }
        let this_scale = _mm256_div_ps(sum_lx, sum_l2);
        if c == 0 {
            chosen = iscale;
            scale = _mm256_and_ps(this_scale, _mm256_cmp_ps::<_CMP_NEQ_UQ>(sum_l2, _mm256_setzero_ps()));
            best = _mm256_mul_ps(scale, sum_lx);
            continue;
        }
        let fits = _mm256_cmp_ps::<_CMP_GT_OQ>(sum_l2, _mm256_setzero_ps());
        let better = _mm256_and_ps(fits, _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(sum_lx, sum_lx), _mm256_mul_ps(best, sum_l2)));
        chosen = _mm256_blendv_ps(chosen, iscale, better);
        scale = _mm256_blendv_ps(scale, this_scale, better);
        best = _mm256_blendv_ps(best, _mm256_mul_ps(this_scale, sum_lx), better);
    }
    store_codes::<N>(std::array::from_fn(|i| quantize(chosen, x[i])), nmax, blank, codes);
    lanes(_mm256_andnot_ps(blank, scale))
}

/// [`super::q3_scale`] (`make_q3_quants` with `do_rmse`, Q3_K's search) over eight consecutive
/// 16-value sub-blocks of `x`: their scales, codes `q + 4` into `codes`. A lane whose round
/// changed nothing would change nothing in the next either, so running the rounds while any lane
/// changes leaves each lane as ggml's loop, which stops it there.
#[target_feature(enable = "avx2")]
pub(super) fn q3_scales(x: &[f32], codes: &mut [i8]) -> [f32; LANES] {
    const N: usize = 16;
    const NMAX: i32 = 4;
    let x = columns::<N>(x);
    let w: [__m256; N] = std::array::from_fn(|i| _mm256_mul_ps(x[i], x[i]));
    let wx: [__m256; N] = std::array::from_fn(|i| _mm256_mul_ps(w[i], x[i]));
    let (max, blank) = largest_magnitude(&x);
    let quantize = |v: __m256| nearest_int_clamped(v, -NMAX, NMAX - 1);
    let iscale = _mm256_div_ps(_mm256_set1_ps(-(NMAX as f32)), max);
    let mut code = [_mm256_setzero_si256(); N];
    let (mut sum_lx, mut sum_l2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in 0..N {
        code[i] = quantize(_mm256_mul_ps(iscale, x[i]));
        let l = _mm256_cvtepi32_ps(code[i]);
        sum_lx = _mm256_add_ps(sum_lx, _mm256_mul_ps(wx[i], l));
        sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(_mm256_mul_ps(w[i], l), l));
    }
    let zero = _mm256_setzero_ps();
    for _ in 0..5 {
        let mut changed = _mm256_setzero_ps();
        for i in 0..N {
            let l = _mm256_cvtepi32_ps(code[i]);
            let slx = _mm256_sub_ps(sum_lx, _mm256_mul_ps(wx[i], l));
            let sl2 = _mm256_sub_ps(sum_l2, _mm256_mul_ps(_mm256_mul_ps(w[i], l), l));
            let new_code = quantize(_mm256_div_ps(_mm256_mul_ps(x[i], sl2), slx));
            let new_l = _mm256_cvtepi32_ps(new_code);
            let moved = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(new_code, code[i])), _mm256_cmp_ps::<_CMP_GT_OQ>(slx, zero));
            let slx = _mm256_add_ps(slx, _mm256_mul_ps(wx[i], new_l));
            let sl2 = _mm256_add_ps(sl2, _mm256_mul_ps(_mm256_mul_ps(w[i], new_l), new_l));
            let closer = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(_mm256_mul_ps(slx, slx), sum_l2), _mm256_mul_ps(_mm256_mul_ps(sum_lx, sum_lx), sl2));
            let take = _mm256_and_ps(moved, _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(sl2, zero), closer));
            code[i] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(code[i]), _mm256_castsi256_ps(new_code), take));
            sum_lx = _mm256_blendv_ps(sum_lx, slx, take);
            sum_l2 = _mm256_blendv_ps(sum_l2, sl2, take);
            changed = _mm256_or_ps(changed, take);
        }
        if _mm256_movemask_ps(changed) == 0 {
            break;
        }
    }
    store_codes::<N>(code, NMAX, blank, codes);
    let scale = _mm256_and_ps(_mm256_div_ps(sum_lx, sum_l2), _mm256_cmp_ps::<_CMP_GT_OQ>(sum_l2, zero));
    lanes(_mm256_andnot_ps(blank, scale))
}

/// Each lane's value of largest magnitude, the first of equals, from 0 (`largest_magnitude`), and
/// the lanes where it is below ggml's `GROUP_MAX_EPS` (all-zero sub-blocks).
#[target_feature(enable = "avx2")]
#[inline]
fn largest_magnitude(x: &[__m256]) -> (__m256, __m256) {
    let sign = _mm256_set1_ps(-0.0);
    let mut max = _mm256_setzero_ps();
    for &v in x {
        max = _mm256_blendv_ps(max, v, _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_andnot_ps(sign, v), _mm256_andnot_ps(sign, max)));
    }
    (max, _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_andnot_ps(sign, max), _mm256_set1_ps(super::GROUP_MAX_EPS)))
}

/// ggml's `nearest_int` (`super::nearest_int`: add 1.5·2²³, read the mantissa) in each lane,
/// clamped to `low..=high`.
#[target_feature(enable = "avx2")]
#[inline]
fn nearest_int_clamped(v: __m256, low: i32, high: i32) -> __m256i {
    let shifted = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12_582_912.0)));
    let int = _mm256_sub_epi32(_mm256_and_si256(shifted, _mm256_set1_epi32(0x007f_ffff)), _mm256_set1_epi32(0x0040_0000));
    _mm256_min_epi32(_mm256_max_epi32(int, _mm256_set1_epi32(low)), _mm256_set1_epi32(high))
}

/// IQ4's grid as two registers, values 0..8 and 8..16.
#[target_feature(enable = "avx2")]
fn iq4_grid() -> (__m256, __m256) {
    let grid = |half: usize| from_lanes(|j| f32::from(crate::gguf::IQ4_VALUES[8 * half + j]));
    (grid(0), grid(1))
}

/// [`super::nearest_iq4_code`] in each lane: the code and its grid value. Below the grid's end the
/// count of grid values `<= x` is one past ggml's binary search's lower end; NaN takes 15, as
/// its search ends there.
#[target_feature(enable = "avx2")]
#[inline]
fn nearest_iq4(x: __m256, grid: (__m256, __m256)) -> (__m256i, __m256) {
    let mut count = _mm256_setzero_si256();
    for &value in &crate::gguf::IQ4_VALUES {
        // A true compare is −1: subtracting counts it.
        count = _mm256_sub_epi32(count, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_set1_ps(f32::from(value)), x)));
    }
    let (one, fifteen) = (_mm256_set1_epi32(1), _mm256_set1_epi32(15));
    // Lower end in 0..15 (below the grid: 0, past it: 14), upper end one above.
    let low = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(count, one), _mm256_setzero_si256()), _mm256_set1_epi32(14));
    let high = _mm256_add_epi32(low, one);
    let value = |code: __m256i| {
        let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(code, _mm256_set1_epi32(7)));
        _mm256_blendv_ps(_mm256_permutevar8x32_ps(grid.0, code), _mm256_permutevar8x32_ps(grid.1, code), upper)
    };
    let (low_value, high_value) = (value(low), value(high));
    let nearer_low = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_sub_ps(x, low_value), _mm256_sub_ps(high_value, x));
    let mut code = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(high), _mm256_castsi256_ps(low), nearer_low));
    // The ends: at or below the first value 0, at or above the last 15, NaN 15.
    let first = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(x, _mm256_set1_ps(f32::from(crate::gguf::IQ4_VALUES[0]))));
    let last = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(f32::from(crate::gguf::IQ4_VALUES[15]))));
    code = _mm256_andnot_si256(first, code);
    code = _mm256_or_si256(_mm256_andnot_si256(last, code), _mm256_and_si256(last, fifteen));
    (code, value(code))
}

/// [`super::iq4_scale`] (`quantize_row_iq4_nl_impl`'s search) over eight consecutive 32-value
/// blocks of `x` with their `weights`: their scales.
#[target_feature(enable = "avx2")]
pub(super) fn iq4_scales(x: &[f32], weights: &[f32]) -> [f32; LANES] {
    const N: usize = 32;
    let (x, w) = (columns::<N>(x), columns::<N>(weights));
    let grid = iq4_grid();
    let (max, blank) = largest_magnitude(&x);
    let fit = |inverse: __m256| {
        let (mut sum_qx, mut sum_q2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in 0..N {
            let (_, q) = nearest_iq4(_mm256_mul_ps(inverse, x[i]), grid);
            let wq = _mm256_mul_ps(w[i], q);
            sum_qx = _mm256_add_ps(sum_qx, _mm256_mul_ps(wq, x[i]));
            sum_q2 = _mm256_add_ps(sum_q2, _mm256_mul_ps(wq, q));
        }
        (sum_qx, sum_q2)
    };
    let zero = _mm256_setzero_ps();
    let first = f32::from(crate::gguf::IQ4_VALUES[0]);
    let (sum_qx, sum_q2) = fit(_mm256_div_ps(_mm256_set1_ps(1.0), _mm256_div_ps(_mm256_xor_ps(max, _mm256_set1_ps(-0.0)), _mm256_set1_ps(first))));
    let mut scale = _mm256_and_ps(_mm256_div_ps(sum_qx, sum_q2), _mm256_cmp_ps::<_CMP_GT_OQ>(sum_q2, zero));
    let mut best = _mm256_mul_ps(scale, sum_qx);
    for step in -7..=7 {
        let (sum_qx, sum_q2) = fit(_mm256_div_ps(_mm256_set1_ps((step + i32::from(crate::gguf::IQ4_VALUES[0])) as f32), max));
        let better = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(sum_q2, zero), _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(sum_qx, sum_qx), _mm256_mul_ps(best, sum_q2)));
        let this_scale = _mm256_div_ps(sum_qx, sum_q2);
        scale = _mm256_blendv_ps(scale, this_scale, better);
        best = _mm256_blendv_ps(best, _mm256_mul_ps(this_scale, sum_qx), better);
    }
    lanes(_mm256_andnot_ps(blank, scale))
}

/// IQ4 codes of eight consecutive 32-value blocks of `x`, block `j`'s values times `inverses[j]`.
#[target_feature(enable = "avx2")]
pub(super) fn iq4_codes(x: &[f32], inverses: [f32; LANES], codes: &mut [u8]) {
    const N: usize = 32;
    let grid = iq4_grid();
    let inverse = from_lanes(|j| inverses[j]);
    let x = columns::<N>(x);
    for i in 0..N {
        let (code, _) = nearest_iq4(_mm256_mul_ps(inverse, x[i]), grid);
        let code = lanes_i32(code);
        for j in 0..LANES {
            codes[N * j + i] = code[j] as u8;
        }
    }
}

/// Eight consecutive `N`-value sub-blocks of `x` as `N` registers: value `i` of sub-block `j` in
/// lane `j` of register `i`.
#[target_feature(enable = "avx2")]
#[inline]
fn columns<const N: usize>(x: &[f32]) -> [__m256; N] {
    std::array::from_fn(|i| from_lanes(|j| x[N * j + i]))
}

/// Codes `q + offset` of eight `N`-value sub-blocks (`q[i]`: value `i` of each, a lane each) into
/// `codes`, sub-block after sub-block; 0 throughout the `blank` lanes.
#[target_feature(enable = "avx2")]
fn store_codes<const N: usize>(q: [__m256i; N], offset: i32, blank: __m256, codes: &mut [i8]) {
    let blank = _mm256_movemask_ps(blank);
    for (i, &q) in q.iter().enumerate() {
        let q = lanes_i32(_mm256_add_epi32(q, _mm256_set1_epi32(offset)));
        for j in 0..LANES {
            codes[N * j + i] = if blank >> j & 1 == 1 { 0 } else { q[j] as i8 };
        }
    }
}

/// A register from its eight lanes, lane `j` from `lane(j)`.
#[inline(always)]
fn from_lanes(lane: impl Fn(usize) -> f32) -> __m256 {
    let values: [f32; LANES] = std::array::from_fn(lane);
    // SAFETY: eight floats.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

#[inline(always)]
fn lanes(v: __m256) -> [f32; LANES] {
    let mut out = [0f32; LANES];
    // SAFETY: eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

#[inline(always)]
fn lanes_i32(v: __m256i) -> [i32; LANES] {
    let mut out = [0i32; LANES];
    // SAFETY: eight i32s.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
    out
}
