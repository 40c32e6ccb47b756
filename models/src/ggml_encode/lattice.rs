//! ggml's lattice quantizers, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M, as
//! llama-quantize runs them, and their decoding. A sub-block's magnitudes are cut into groups of 4
//! (IQ3) or 8 (IQ2) values whose levels (`value ≈ scale·(2l + 1)`) must form a point of a fixed
//! grid (`grids.rs`); a group off the grid takes the nearest grid point by weighted error.
//! The signs go apart, 8 bits a group (IQ3_S, IQ2_S) or 7 with the eighth implied by even parity
//! (the XXS/XS types, which flip the sign of the group's least important value when the count is
//! odd). IQ1's values are −1, 0 or 1 (plus a shift of ±⅛), signed in the grid itself, chosen by
//! an exact search over the splits of the sorted values (see [`encode_iq1_s`], [`encode_iq1_m`]).
//!
//! Layouts (little-endian, one 256-value super-block after another, f16 `d` first):
//! - IQ3_XXS, 98 bytes: 64 grid indices (one a group of 4), then per 32 values a u32 of four
//!   7-bit signs and a 4-bit scale `s` on top; value = `d·(0.5 + s)·0.5·grid·sign`.
//! - IQ3_S, 110 bytes: 64 low bytes of 9-bit grid indices, 8 bytes of their ninth bits, 32 sign
//!   bytes, 4 bytes of 4-bit scales per 32 values; value = `d·(1 + 2s)·grid·sign`.
//! - IQ2_XXS, 66 bytes: per 32 values a u32 of four grid indices (groups of 8) and a u32 of four
//!   7-bit signs and a 4-bit scale on top; value = `d·(0.5 + s)·0.25·grid·sign`.
//! - IQ2_XS, 74 bytes: per 8 values a u16 of a 9-bit grid index and 7 sign bits, then 8 bytes of
//!   4-bit scales per 16 values; value = `d·(0.5 + s)·0.25·grid·sign`.
//! - IQ2_S, 82 bytes: 32 low bytes of 10-bit grid indices, 32 sign bytes, 8 bytes of their top
//!   bit pairs, 8 bytes of 4-bit scales per 16 values; value = `d·(0.5 + s)·0.25·grid·sign`.
//!
//! The decoded grid values are not always `2l + 1` times a constant: IQ3_XXS's top level is 62
//! (not 60), IQ2's levels are 8, 25 and 43.

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use super::importance::positive_scale;
use super::{GROUP_MAX_EPS, QK_K, grids, nearest_int};
use crate::gguf::GgmlType;

/// A grid of allowed level groups, with every other group's nearest grid points.
pub(crate) struct Lattice {
    /// Values a group holds: 4 or 8.
    dim: usize,
    /// Bits of a level in a group's key: 3 or 2.
    bits: usize,
    /// Each grid point's levels.
    points: Vec<[u8; 8]>,
    /// For every key (levels packed from the lowest bits): its grid index, or `-(list + 1)` of
    /// its neighbour list in `lists`, as ggml's `kmap`.
    map: Vec<i32>,
    lists: Vec<NeighbourList>,
    /// The lists' grid indices, each list padded to whole chunks of [`LANES`] with its last.
    neighbours: Vec<u16>,
    /// Their levels a chunk at a time, level-major (`[level i][lane]`), so that a chunk's
    /// distances are computed side by side.
    neighbour_levels: Vec<[[u8; LANES]; 8]>,
}

/// Neighbours whose distances are computed side by side, each in ggml's operations and order.
const LANES: usize = 8;

/// An off-grid key's nearest grid points: `count` of them from chunk `first_chunk`.
struct NeighbourList {
    first_chunk: u32,
    count: u16,
}

/// ggml's grids, one a type but IQ1_S and IQ1_M, which share theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grid {
    Iq3Xxs,
    Iq3S,
    Iq2Xxs,
    Iq2Xs,
    Iq2S,
    Iq1,
}

impl Grid {
    /// The packed grid points and the group shape: (points, values a group, bits a level).
    fn table(self) -> (&'static [u16], usize, usize) {
        match self {
            Self::Iq3Xxs => (&grids::IQ3_XXS, 4, 3),
            Self::Iq3S => (&grids::IQ3_S, 4, 3),
            Self::Iq2Xxs => (&grids::IQ2_XXS, 8, 2),
            Self::Iq2Xs => (&grids::IQ2_XS, 8, 2),
            Self::Iq2S => (&grids::IQ2_S, 8, 2),
            Self::Iq1 => (&grids::IQ1, 8, 2),
        }
    }

    /// How many distinct distances an off-grid group's neighbours span.
    fn neighbour_distances(self) -> usize {
        match self {
            Self::Iq3Xxs | Self::Iq2Xxs | Self::Iq2Xs => 2,
            Self::Iq3S | Self::Iq1 => 3,
            Self::Iq2S => 1,
        }
    }

    /// The grid with its map and neighbour lists, built on first use (ggml's
    /// `iq2xs_init_impl`/`iq3xs_init_impl`).
    pub(crate) fn lattice(self) -> &'static Lattice {
        static LATTICES: [OnceLock<Lattice>; 6] = [const { OnceLock::new() }; 6];
        LATTICES[self as usize].get_or_init(|| Lattice::new(self))
    }
}

impl Lattice {
    fn new(grid: Grid) -> Self {
        let (packed, dim, bits) = grid.table();
        let mask = (1u16 << bits) - 1;
        let points: Vec<[u8; 8]> = packed.iter().map(|&p| std::array::from_fn(|i| if i < dim { ((p >> (bits * i)) & mask) as u8 } else { 0 })).collect();
        let keys = 1usize << (bits * dim);
        let mut map = vec![-1i32; keys];
        for (index, &p) in packed.iter().enumerate() {
            map[p as usize] = index as i32;
        }
        // Every key off the grid: the grid points at its `neighbour_distances` smallest squared
        // distances, nearest first, then by index. (ggml measures between the odd values 2l + 1,
        // four times the distance between levels: the same order.)
        let by_level: Vec<Vec<u8>> = (0..dim).map(|i| points.iter().map(|p| p[i]).collect()).collect();
        let lists: Vec<Vec<u16>> = (0..keys)
            .into_par_iter()
            .map_init(
                || vec![0u16; points.len()],
                |distances, key| {
                    if map[key] >= 0 {
                        return Vec::new();
                    }
                    // Side by side over the points, a level at a time.
                    distances.fill(0);
                    for (i, levels) in by_level.iter().enumerate() {
                        let level = ((key >> (bits * i)) as u16 & mask) as u8;
                        for (d, &p) in distances.iter_mut().zip(levels) {
                            let diff = u16::from(p.abs_diff(level));
                            *d += diff * diff;
                        }
                    }
                    // At most 4·7² (IQ3) or 8·3² (IQ2, IQ1).
                    let mut present = [false; 197];
                    for &d in distances.iter() {
                        present[d as usize] = true;
                    }
                    let mut nearest = (0..present.len()).filter(|&d| present[d]);
                    let limit = nearest.clone().nth(grid.neighbour_distances() - 1).or_else(|| nearest.next_back()).expect("a grid") as u16;
                    let mut list: Vec<u16> = (0..points.len() as u16).filter(|&j| distances[j as usize] <= limit).collect();
                    list.sort_by_key(|&j| distances[j as usize]);
                    list
                },
            )
            .collect();
        let (mut neighbour_lists, mut neighbours, mut neighbour_levels) = (Vec::new(), Vec::new(), Vec::new());
        for (key, mut list) in lists.into_iter().enumerate() {
            if map[key] >= 0 {
                continue;
            }
            map[key] = -(neighbour_lists.len() as i32 + 1);
            neighbour_lists.push(NeighbourList { first_chunk: neighbour_levels.len() as u32, count: list.len() as u16 });
            // A repeated last neighbour is never nearer than itself: the first of equals wins.
            let last = *list.last().expect("a grid point is always near");
            list.resize(list.len().div_ceil(LANES) * LANES, last);
            for chunk in list.chunks(LANES) {
                neighbour_levels.push(std::array::from_fn(|i| std::array::from_fn(|j| points[chunk[j] as usize][i])));
            }
            neighbours.extend(list);
        }
        Self { dim, bits, points, map, lists: neighbour_lists, neighbours, neighbour_levels }
    }

    fn key(&self, levels: &[u8]) -> usize {
        levels.iter().enumerate().fold(0, |key, (i, &l)| key | (l as usize) << (self.bits * i))
    }

    /// The grid index of `levels`, if they are a grid point.
    fn index(&self, levels: &[u8]) -> Option<usize> {
        let entry = self.map[self.key(levels)];
        (entry >= 0).then_some(entry as usize)
    }

    /// The neighbours of `levels` (off the grid): their grid indices, and their levels a chunk at
    /// a time.
    fn neighbours_of(&self, levels: &[u8]) -> (&[u16], &[[[u8; LANES]; 8]]) {
        let list = &self.lists[(-self.map[self.key(levels)] - 1) as usize];
        let first = list.first_chunk as usize;
        let chunks = (list.count as usize).div_ceil(LANES);
        (&self.neighbours[first * LANES..(first + chunks) * LANES], &self.neighbour_levels[first..first + chunks])
    }

    /// The neighbour of `levels` (off the grid) nearest `x` at `scale` when level `l` stands for
    /// `values[l]`, by `weights`-weighted squared error, the first of equals; its levels go into
    /// `levels`.
    fn nearest(&self, levels: &mut [u8], x: &[f32], weights: &[f32], scale: f32, values: &[f32; 8]) -> usize {
        let (indices, chunks) = self.neighbours_of(levels);
        let best = match self.dim {
            8 => nearest_chunk::<8>(indices, chunks, x, weights, scale, values),
            _ => nearest_chunk::<4>(indices, chunks, x, weights, scale, values),
        };
        levels.copy_from_slice(&self.points[best][..self.dim]);
        best
    }

    /// ggml's `iq*_find_best_neighbour`: level `l` stands for `2l + 1`.
    fn snap(&self, levels: &mut [u8], x: &[f32], weights: &[f32], scale: f32) -> usize {
        const ODD: [f32; 8] = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0];
        self.nearest(levels, x, weights, scale, &ODD)
    }

    /// ggml's `iq1_find_best_neighbour2`: level `l` stands for `values[l]`.
    fn snap_to_values(&self, levels: &mut [u8], x: &[f32], weights: &[f32], scale: f32, values: &[f32; 3]) -> usize {
        self.nearest(levels, x, weights, scale, &[values[0], values[1], values[2], 0.0, 0.0, 0.0, 0.0, 0.0])
    }

    /// Each group of `x` rounded to levels at `inverse` (`l = round((inverse·x − 1)/2)` within
    /// `0..max_level`) into `levels`, snapped to the grid where off it (at `1 / inverse` for
    /// neighbours, or `scale` where given): whether each group was on the grid.
    fn round_groups(&self, x: &[f32], weights: &[f32], inverse: f32, scale: f32, max_level: i32, levels: &mut [u8], groups: impl Fn(usize) -> bool) -> [bool; 8] {
        let mut on_grid = [true; 8];
        for (k, ((levels, x), w)) in levels.chunks_mut(self.dim).zip(x.chunks(self.dim)).zip(weights.chunks(self.dim)).enumerate() {
            if !groups(k) {
                continue;
            }
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = nearest_int(0.5 * (inverse * v - 1.0)).clamp(0, max_level - 1) as u8;
            }
            if self.index(levels).is_none() {
                on_grid[k] = false;
                self.snap(levels, x, w, scale);
            }
        }
        on_grid
    }
}

/// The grid index in `indices` whose levels in `chunks` are nearest `x` when level `l` stands
/// for `values[l]` (see [`Lattice::nearest`]): with AVX2 where the processor has it, a chunk's
/// eight distances in one register.
fn nearest_chunk<const DIM: usize>(indices: &[u16], chunks: &[[[u8; LANES]; 8]], x: &[f32], weights: &[f32], scale: f32, values: &[f32; 8]) -> usize {
    let (x, weights): (&[f32; DIM], &[f32; DIM]) = (x.try_into().expect("a group"), weights.try_into().expect("a group"));
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the processor has AVX2, checked above.
        return unsafe { nearest_avx2::<DIM>(indices, chunks, x, weights, scale, values) };
    }
    nearest_in_turn::<DIM>(indices, chunks, x, weights, scale, values)
}

/// [`nearest_chunk`] one neighbour at a time, as ggml's loop.
fn nearest_in_turn<const DIM: usize>(indices: &[u16], chunks: &[[[u8; LANES]; 8]], x: &[f32; DIM], weights: &[f32; DIM], scale: f32, values: &[f32; 8]) -> usize {
    let mut best = (f32::MAX, usize::MAX);
    for (indices, chunk) in indices.chunks_exact(LANES).zip(chunks) {
        for j in 0..LANES {
            let mut d2 = 0f32;
            for i in 0..DIM {
                let diff = scale * values[chunk[i][j] as usize] - x[i];
                d2 += weights[i] * diff * diff;
            }
            if d2 < best.0 {
                best = (d2, indices[j] as usize);
            }
        }
    }
    best.1
}

/// [`nearest_chunk`] in AVX2: each lane one neighbour in ggml's operations and order (no fused
/// multiply-add), so the same distances; of a chunk, the first lane of the least distance wins if
/// below the best so far, as in ggml's `if (d2 < best_d2)` in turn (NaN never wins there, nor
/// here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nearest_avx2<const DIM: usize>(indices: &[u16], chunks: &[[[u8; LANES]; 8]], x: &[f32; DIM], weights: &[f32; DIM], scale: f32, values: &[f32; 8]) -> usize {
    use std::arch::x86_64::*;
    // SAFETY: `values` holds 8 floats.
    let table = unsafe { _mm256_loadu_ps(values.as_ptr()) };
    let scale = _mm256_set1_ps(scale);
    let infinity = _mm256_set1_ps(f32::INFINITY);
    let mut best = (f32::MAX, usize::MAX);
    for (indices, chunk) in indices.chunks_exact(LANES).zip(chunks) {
        let mut d2 = _mm256_setzero_ps();
        for i in 0..DIM {
            // SAFETY: a row of a chunk is LANES = 8 bytes.
            let levels = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(chunk[i].as_ptr().cast()) });
            let diff = _mm256_sub_ps(_mm256_mul_ps(scale, _mm256_permutevar8x32_ps(table, levels)), _mm256_set1_ps(x[i]));
            d2 = _mm256_add_ps(d2, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(weights[i]), diff), diff));
        }
        let d2 = _mm256_blendv_ps(d2, infinity, _mm256_cmp_ps::<_CMP_UNORD_Q>(d2, d2));
        let least = _mm256_min_ps(d2, _mm256_permute2f128_ps::<1>(d2, d2));
        let least = _mm256_min_ps(least, _mm256_permute_ps::<0b01_00_11_10>(least));
        let least = _mm256_min_ps(least, _mm256_permute_ps::<0b10_11_00_01>(least));
        let least_value = _mm256_cvtss_f32(least);
        if least_value < best.0 {
            let first = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(d2, least)).trailing_zeros();
            best = (least_value, indices[first as usize] as usize);
        }
    }
    best.1
}

/// When the best candidate scale's off-grid groups are rounded again at that scale.
#[derive(Clone, Copy, PartialEq)]
enum Refit {
    /// Those groups (IQ3_XXS, IQ2_XS, IQ2_S).
    OffGrid,
    /// All groups, if any was off (IQ3_S).
    AllIfAnyOff,
    /// All groups, always (IQ2_XXS).
    All,
}

/// A type's scale search over one sub-block.
struct Search {
    grid: Grid,
    /// Levels per value: 8 (IQ3) or 3 (IQ2).
    max_level: i32,
    /// Candidates `(2·max_level − 1 + step·stride) / reference` for `step` in `-steps..=steps`.
    steps: i32,
    stride: f32,
    refit: Refit,
}

/// `(Σ w·x·q, Σ w·q²)` of levels `q = 2l + 1`, in ggml's order.
fn fit(x: &[f32], weights: &[f32], levels: &[u8]) -> (f32, f32) {
    let (mut sum_qx, mut sum_q2) = (0f32, 0f32);
    for ((&v, &w), &l) in x.iter().zip(weights).zip(levels) {
        let q = f32::from(2 * l + 1);
        sum_qx += w * v * q;
        sum_q2 += w * q * q;
    }
    (sum_qx, sum_q2)
}

impl Search {
    /// The scale of the magnitudes `x` (weighted by `weights`, `root_weights` their square roots)
    /// and their levels, all on the grid: the best of the candidate scales around `reference`
    /// (else `scale`), then the refit. The scale is what ggml computes; it may be negative.
    fn run(&self, x: &[f32], weights: &[f32], root_weights: &[f32], reference: f32, mut scale: f32, levels: &mut [u8]) -> f32 {
        let lattice = self.grid.lattice();
        let groups = x.len() / lattice.dim;
        let mut on_grid = [self.refit != Refit::AllIfAnyOff; 8];
        let mut candidate = [0u8; 32];
        let candidate = &mut candidate[..x.len()];
        let mut best = 0f32;
        for step in -self.steps..=self.steps {
            let inverse = ((2 * self.max_level - 1) as f32 + step as f32 * self.stride) / reference;
            let candidate_on_grid = lattice.round_groups(x, root_weights, inverse, 1.0 / inverse, self.max_level, candidate, |_| true);
            let (sum_qx, sum_q2) = fit(x, weights, candidate);
            if sum_q2 > 0.0 && sum_qx * sum_qx > best * sum_q2 {
                scale = sum_qx / sum_q2;
                best = scale * sum_qx;
                levels.copy_from_slice(candidate);
                on_grid = candidate_on_grid;
            }
        }
        let any_off = on_grid[..groups].contains(&false);
        let refit = match self.refit {
            Refit::All => scale > 0.0,
            Refit::OffGrid | Refit::AllIfAnyOff => any_off && scale > 0.0,
        };
        if refit {
            let only_off = self.refit == Refit::OffGrid;
            lattice.round_groups(x, root_weights, 1.0 / scale, scale, self.max_level, levels, |k| !only_off || !on_grid[k]);
            let (sum_qx, sum_q2) = fit(x, weights, levels);
            if sum_q2 > 0.0 {
                scale = sum_qx / sum_q2;
            }
        }
        scale
    }
}

/// The magnitudes of `x` and its signs, a byte a group of 8 (bit `i` set: value `i` negative).
/// With `even_parity`, a group with an odd count of negatives instead flips the sign of its value
/// of least `weight·x²` (the first of equals), whose magnitude then goes negative, and keeps 7 bits.
fn signs(x: &[f32], weights: &[f32], even_parity: bool, magnitudes: &mut [f32], signs: &mut [u8]) {
    for (k, sign) in signs.iter_mut().enumerate() {
        let group = 8 * k..8 * k + 8;
        let mut s = 0u8;
        for i in group.clone() {
            if x[i] >= 0.0 {
                magnitudes[i] = x[i];
            } else {
                magnitudes[i] = -x[i];
                s |= 1 << (i - 8 * k);
            }
        }
        if even_parity {
            if s.count_ones() % 2 == 1 {
                let least = group.clone().fold(8 * k, |least, i| if weights[i] * x[i] * x[i] < weights[least] * x[least] * x[least] { i } else { least });
                magnitudes[least] = -magnitudes[least];
                s ^= 1 << (least - 8 * k);
            }
            s &= 127;
        }
        *sign = s;
    }
}

/// ggml's `MAX` fold from the first value.
fn largest(x: &[f32]) -> f32 {
    x[1..].iter().fold(x[0], |m, &v| if m > v { m } else { v })
}

/// A sub-block's values' weights: `importance·sqrt(σ² + x²)` with an importance matrix, else the
/// type's own (`x²`, or IQ2_S's `σ²/4 + x²`).
fn sub_block_weights(x: &[f32], importance: Option<&[f32]>, sigma2: f32, plain: fn(f32, f32) -> f32, weights: &mut [f32]) {
    for (i, w) in weights.iter_mut().enumerate() {
        *w = match importance {
            Some(qw) => qw[i] * (sigma2 + x[i] * x[i]).sqrt(),
            None => plain(x[i], sigma2),
        };
    }
}

fn square(x: f32, _sigma2: f32) -> f32 {
    x * x
}

/// The sub-block scales as 4-bit codes against `d = largest / 31`: `round((s/d − 1)/2)`.
fn scale_codes(scales: &[f32], d: f32) -> impl Iterator<Item = u32> + '_ {
    let inverse = 1.0 / d;
    scales.iter().map(move |&s| nearest_int(0.5 * (inverse * s - 1.0)).clamp(0, 15) as u32)
}

/// `values` in super-blocks of `bytes`, each by `encode` with its importance (the matching
/// columns of a row of `importance.len()`), spread over the threads.
fn encode_super_blocks(values: &[f32], importance: Option<&[f32]>, bytes: usize, encode: impl Fn(&[f32], Option<&[f32]>, &mut [u8]) + Sync) -> Vec<u8> {
    let row = importance.map_or(QK_K, <[f32]>::len);
    assert!(row % QK_K == 0 && values.len() % row == 0, "whole rows of whole {QK_K}-value blocks");
    let mut out = vec![0u8; values.len() / QK_K * bytes];
    out.par_chunks_mut(16 * bytes).zip(values.par_chunks(16 * QK_K)).enumerate().for_each(|(task, (out, values))| {
        for (b, (out, x)) in out.chunks_mut(bytes).zip(values.chunks(QK_K)).enumerate() {
            let at = (task * 16 + b) * QK_K % row;
            encode(x, importance.map(|qw| &qw[at..at + QK_K]), out);
        }
    });
    out
}

fn sum_of_squares(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |sum, v| sum + v * v)
}

const IQ3_XXS_SEARCH: Search = Search { grid: Grid::Iq3Xxs, max_level: 8, steps: 15, stride: 0.2, refit: Refit::OffGrid };
const IQ3_S_SEARCH: Search = Search { grid: Grid::Iq3S, max_level: 8, steps: 9, stride: 0.2, refit: Refit::AllIfAnyOff };
const IQ2_XXS_SEARCH: Search = Search { grid: Grid::Iq2Xxs, max_level: 3, steps: 6, stride: 0.1, refit: Refit::All };
const IQ2_XS_SEARCH: Search = Search { grid: Grid::Iq2Xs, max_level: 3, steps: 9, stride: 0.1, refit: Refit::OffGrid };
const IQ2_S_SEARCH: Search = Search { grid: Grid::Iq2S, max_level: 3, steps: 9, stride: 0.1, refit: Refit::OffGrid };

/// A sub-block's fit: a positive scale, levels on the grid, and its sign bytes (a group of 8
/// each, 7 bits under even parity).
struct Fit {
    scale: f32,
    levels: [u8; 32],
    signs: [u8; 4],
}

/// `xb`'s fit on `search`'s grid with its values' `weights`: `start` gives the search's reference
/// and first scale from the magnitudes (`None`: ggml leaves the sub-block zero); a negative scale
/// turns positive with the signs flipped.
fn fit_sub_block(xb: &[f32], weights: &[f32], search: &Search, even_parity: bool, start: impl FnOnce(&[f32], &mut [u8]) -> Option<(f32, f32)>) -> Option<Fit> {
    let n = xb.len();
    let mut root = [0f32; 32];
    for (r, w) in root.iter_mut().zip(weights) {
        *r = w.sqrt();
    }
    let mut x = [0f32; 32];
    let mut fit = Fit { scale: 0.0, levels: [0; 32], signs: [0; 4] };
    signs(xb, weights, even_parity, &mut x[..n], &mut fit.signs[..n / 8]);
    let (reference, initial) = start(&x[..n], &mut fit.levels[..n])?;
    fit.scale = search.run(&x[..n], weights, &root[..n], reference, initial, &mut fit.levels[..n]);
    if fit.scale < 0.0 {
        fit.scale = -fit.scale;
        let kept = if even_parity { 127 } else { 255 };
        fit.signs[..n / 8].iter_mut().for_each(|s| *s = !*s & kept);
    }
    Some(fit)
}

/// The search's start from the largest magnitude (`max / (2·max_level − 1)`), unless it is below
/// `epsilon`.
fn from_largest(epsilon: f32, max_level: i32) -> impl FnOnce(&[f32], &mut [u8]) -> Option<(f32, f32)> {
    move |x, _| {
        let max = largest(x);
        // As ggml's `if (max < epsilon)`, which lets NaN through.
        (!(max < epsilon)).then(|| (max, max / (2 * max_level - 1) as f32))
    }
}

/// ggml's `MAX` fold of the sub-block scales from 0.
fn largest_scale(scales: &[f32]) -> f32 {
    scales.iter().fold(0f32, |m, &s| if m > s { m } else { s })
}

/// The 4-bit scale codes against `d`, two a byte (the first low).
fn pack_scale_pairs(scales: &[f32], d: f32, bytes: &mut [u8]) {
    let codes: Vec<u32> = scale_codes(scales, d).collect();
    for (byte, pair) in bytes.iter_mut().zip(codes.chunks(2)) {
        *byte = (pair[0] | pair[1] << 4) as u8;
    }
}

/// The grid index of each group of `fit`'s levels.
fn grid_indices<'a>(grid: Grid, fit: &'a Fit, n: usize) -> impl Iterator<Item = usize> + 'a {
    let lattice = grid.lattice();
    fit.levels[..n].chunks(lattice.dim).map(|group| lattice.index(group).expect("levels on the grid"))
}

/// IQ3_XXS super-blocks of `values` (whole rows of `importance.len()` when given).
pub fn encode_iq3_xxs(values: &[f32], importance: Option<&[f32]>) -> Vec<u8> {
    encode_super_blocks(values, importance, 98, |xbl, importance, out| {
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        let (head, body) = out.split_at_mut(2);
        let (indices, rest) = body.split_at_mut(64);
        let mut scales = [0f32; 8];
        let mut words = [0u32; 8];
        for (ib, xb) in xbl.chunks(32).enumerate() {
            let mut weights = [0f32; 32];
            sub_block_weights(xb, importance.map(|qw| &qw[32 * ib..]), sigma2, square, &mut weights);
            let Some(fit) = fit_sub_block(xb, &weights, &IQ3_XXS_SEARCH, true, from_largest(1e-8, 8)) else { continue };
            for (k, index) in grid_indices(Grid::Iq3Xxs, &fit, 32).enumerate() {
                indices[8 * ib + k] = index as u8;
            }
            words[ib] = fit.signs.iter().enumerate().fold(0, |w, (k, &s)| w | u32::from(s) << (7 * k));
            scales[ib] = fit.scale;
        }
        let max_scale = largest_scale(&scales);
        if max_scale == 0.0 {
            indices.fill(0);
            return;
        }
        let d = max_scale / 31.0;
        head.copy_from_slice(&f16::from_f32(d * 1.0125).to_le_bytes());
        for ((word, code), out) in words.iter().zip(scale_codes(&scales, d)).zip(rest.chunks_mut(4)) {
            out.copy_from_slice(&(word | code << 28).to_le_bytes());
        }
    })
}

/// IQ3_S super-blocks of `values` (whole rows of `importance.len()` when given).
pub fn encode_iq3_s(values: &[f32], importance: Option<&[f32]>) -> Vec<u8> {
    encode_super_blocks(values, importance, 110, |xbl, importance, out| {
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        let (head, body) = out.split_at_mut(2);
        let (indices, rest) = body.split_at_mut(64);
        let (high, rest) = rest.split_at_mut(8);
        let (sign_bytes, scale_bytes) = rest.split_at_mut(32);
        let mut scales = [0f32; 8];
        // ggml moves on through indices and signs only past a sub-block that is not all zeros.
        let mut written = 0;
        for (ib, xb) in xbl.chunks(32).enumerate() {
            let mut weights = [0f32; 32];
            sub_block_weights(xb, importance.map(|qw| &qw[32 * ib..]), sigma2, square, &mut weights);
            let nonzero = |x: &[f32], _: &mut [u8]| {
                let max = largest(x);
                (max != 0.0).then(|| (max, max / 15.0))
            };
            let Some(fit) = fit_sub_block(xb, &weights, &IQ3_S_SEARCH, false, nonzero) else { continue };
            for (k, index) in grid_indices(Grid::Iq3S, &fit, 32).enumerate() {
                indices[8 * written + k] = index as u8;
                high[ib] |= ((index >> 8) as u8) << k;
            }
            sign_bytes[4 * written..4 * written + 4].copy_from_slice(&fit.signs);
            written += 1;
            scales[ib] = fit.scale;
        }
        let max_scale = largest_scale(&scales);
        if max_scale == 0.0 {
            return;
        }
        let d = max_scale / 31.0;
        head.copy_from_slice(&f16::from_f32(d * 1.033).to_le_bytes());
        pack_scale_pairs(&scales, d, scale_bytes);
    })
}

/// IQ2_XXS super-blocks of whole rows of `importance.len()` (ggml requires the importance).
pub fn encode_iq2_xxs(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_super_blocks(values, Some(importance), 66, |xbl, importance, out| {
        let sigma2 = sum_of_squares(xbl) / QK_K as f32;
        let mut scales = [0f32; 8];
        let mut words = [0u32; 16];
        for (ib, xb) in xbl.chunks(32).enumerate() {
            let mut weights = [0f32; 32];
            sub_block_weights(xb, importance.map(|qw| &qw[32 * ib..]), sigma2, square, &mut weights);
            // The search starts from make_qp_quants' scale of the magnitudes.
            let from_levels = |x: &[f32], levels: &mut [u8]| {
                if largest(x) < GROUP_MAX_EPS {
                    return None;
                }
                let start = positive_scale(x, 4, &weights, levels);
                (!(start * 3.0 <= 0.0)).then_some((start * 3.0, start))
            };
            let Some(fit) = fit_sub_block(xb, &weights, &IQ2_XXS_SEARCH, true, from_levels) else { continue };
            for (k, index) in grid_indices(Grid::Iq2Xxs, &fit, 32).enumerate() {
                words[2 * ib] |= (index as u32) << (8 * k);
                words[2 * ib + 1] |= u32::from(fit.signs[k]) << (7 * k);
            }
            scales[ib] = fit.scale;
        }
        let max_scale = largest_scale(&scales);
        if max_scale == 0.0 {
            return;
        }
        let d = max_scale / 31.0;
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (ib, code) in scale_codes(&scales, d).enumerate() {
            words[2 * ib + 1] |= code << 28;
        }
        for (word, out) in words.iter().zip(out[2..].chunks_mut(4)) {
            out.copy_from_slice(&word.to_le_bytes());
        }
    })
}

/// IQ2_XS super-blocks of whole rows of `importance.len()` (ggml requires the importance).
pub fn encode_iq2_xs(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_super_blocks(values, Some(importance), 74, |xbl, importance, out| {
        let sigma2 = sum_of_squares(xbl) / QK_K as f32;
        let mut scales = [0f32; 16];
        let mut halves = [0u16; 32];
        for (ib, xb) in xbl.chunks(16).enumerate() {
            let mut weights = [0f32; 16];
            sub_block_weights(xb, importance.map(|qw| &qw[16 * ib..]), sigma2, square, &mut weights);
            let Some(fit) = fit_sub_block(xb, &weights, &IQ2_XS_SEARCH, true, from_largest(GROUP_MAX_EPS, 3)) else { continue };
            for (k, index) in grid_indices(Grid::Iq2Xs, &fit, 16).enumerate() {
                halves[2 * ib + k] = index as u16 | u16::from(fit.signs[k]) << 9;
            }
            scales[ib] = fit.scale;
        }
        let max_scale = largest_scale(&scales);
        if max_scale == 0.0 {
            return;
        }
        let d = max_scale / 31.0;
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (half, out) in halves.iter().zip(out[2..66].chunks_mut(2)) {
            out.copy_from_slice(&half.to_le_bytes());
        }
        pack_scale_pairs(&scales, d, &mut out[66..]);
    })
}

/// IQ2_S super-blocks of `values` (whole rows of `importance.len()` when given).
pub fn encode_iq2_s(values: &[f32], importance: Option<&[f32]>) -> Vec<u8> {
    encode_super_blocks(values, importance, 82, |xbl, importance, out| {
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        let (head, body) = out.split_at_mut(2);
        let (indices, rest) = body.split_at_mut(32);
        let (sign_bytes, rest) = rest.split_at_mut(32);
        let (high, scale_bytes) = rest.split_at_mut(8);
        let mut scales = [0f32; 16];
        for (ib, xb) in xbl.chunks(16).enumerate() {
            let mut weights = [0f32; 16];
            sub_block_weights(xb, importance.map(|qw| &qw[16 * ib..]), sigma2, |x, sigma2| 0.25 * sigma2 + x * x, &mut weights);
            let Some(fit) = fit_sub_block(xb, &weights, &IQ2_S_SEARCH, false, from_largest(1e-8, 3)) else { continue };
            for (k, index) in grid_indices(Grid::Iq2S, &fit, 16).enumerate() {
                let group = 2 * ib + k;
                indices[group] = index as u8;
                high[group / 4] |= ((index >> 8) as u8) << (2 * (group % 4));
                sign_bytes[group] = fit.signs[k];
            }
            scales[ib] = fit.scale;
        }
        let max_scale = largest_scale(&scales);
        if max_scale == 0.0 {
            return;
        }
        let d = max_scale / 31.0;
        head.copy_from_slice(&f16::from_f32(d * 0.9875).to_le_bytes());
        pack_scale_pairs(&scales, d, scale_bytes);
    })
}

/// IQ1's three values per level (−1, 0, 1) shifted by +⅛ or −⅛.
const IQ1_PLUS: [f32; 3] = [-1.0 + 0.125, 0.125, 1.0 + 0.125];
const IQ1_MINUS: [f32; 3] = [-1.0 - 0.125, -0.125, 1.0 - 0.125];

/// Positions of `x` in ascending order, equals in place (glibc 2.36's `qsort`, which llama.cpp's
/// IQ1 quantizers call, is a merge sort and keeps them so).
fn ascending(x: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].partial_cmp(&x[b]).unwrap_or(std::cmp::Ordering::Equal));
    order
}

/// The largest magnitude, ggml's `MAX` fold of `fabsf` from the first value (a NaN is kept until
/// the next value replaces it).
pub(super) fn largest_magnitude(x: &[f32]) -> f32 {
    x[1..].iter().fold(x[0].abs(), |m, v| if m > v.abs() { m } else { v.abs() })
}

/// The levels (0, 1, 2) of a split of the values in `order` (below `first` 0, below `second` 1)
/// into `levels`; with a negative `scale`, levels `2 − l` and the scale positive. Returns the
/// scale and whether it flipped (which flips the shifts' signs too).
fn split_levels(order: &[usize], first: usize, second: usize, scale: f32, levels: &mut [u8]) -> (f32, bool) {
    let flip = scale < 0.0;
    for (j, &i) in order.iter().enumerate() {
        let level = if j < first { 0 } else if j < second { 1 } else { 2 };
        levels[i] = if flip { 2 - level } else { level };
    }
    (if flip { -scale } else { scale }, flip)
}

/// The groups of 8 `levels` on the IQ1 grid (each group's values from `values_of(group)`): their
/// indices, snapping those off it; the scale refitted if any was off (and the fit is positive).
fn iq1_groups(x: &[f32], weights: &[f32], levels: &mut [u8], mut scale: f32, values_of: impl Fn(usize) -> [f32; 3], indices: &mut [usize]) -> f32 {
    let lattice = Grid::Iq1.lattice();
    let mut all_on_grid = true;
    for (k, index) in indices.iter_mut().enumerate() {
        let group = 8 * k..8 * k + 8;
        *index = match lattice.index(&levels[group.clone()]) {
            Some(index) => index,
            None => {
                all_on_grid = false;
                lattice.snap_to_values(&mut levels[group.clone()], &x[group.clone()], &weights[group], scale, &values_of(k))
            }
        };
    }
    if !all_on_grid {
        let (mut sum_qx, mut sum_q2) = (0f32, 0f32);
        for (k, &index) in indices.iter().enumerate() {
            let values = values_of(k);
            for j in 0..8 {
                let (w, q) = (weights[8 * k + j], values[lattice.points[index][j] as usize]);
                sum_qx += w * q * x[8 * k + j];
                sum_q2 += w * q * q;
            }
        }
        if sum_qx > 0.0 && sum_q2 > 0.0 {
            scale = sum_qx / sum_q2;
        }
    }
    scale
}

/// IQ1_S super-blocks of whole rows of `importance.len()` (ggml requires the importance): 32
/// values a scale, each value −1, 0 or 1 shifted by ±⅛ per 32; 50 bytes: f16 `d`, 32 low bytes of
/// 11-bit grid indices, per 32 values a u16 of their top 3 bits ×4, a 3-bit scale `s` and the
/// shift's sign on top; value = `d·(2s + 1)·(grid ± ⅛)`.
pub fn encode_iq1_s(values: &[f32], importance: &[f32]) -> Vec<u8> {
    encode_super_blocks(values, Some(importance), 50, |xbl, importance, out| {
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        let (head, body) = out.split_at_mut(2);
        let (index_bytes, high) = body.split_at_mut(32);
        let mut scales = [0f32; 8];
        let mut minus = [false; 8];
        let mut words = [0u16; 8];
        for (ib, xb) in xbl.chunks(32).enumerate() {
            let mut weights = [0f32; 32];
            sub_block_weights(xb, importance.map(|qw| &qw[32 * ib..]), sigma2, square, &mut weights);
            if largest_magnitude(xb) < 1e-12 {
                continue;
            }
            // The exact weighted fit over every split of the sorted values into −1, 0, 1.
            let order = ascending(xb);
            let (mut sum_x, mut sum_w) = ([0f32; 33], [0f32; 33]);
            for (j, &i) in order.iter().enumerate() {
                sum_x[j + 1] = sum_x[j] + weights[i] * xb[i];
                sum_w[j + 1] = sum_w[j] + weights[i];
            }
            let (mut best_score, mut scale, mut best) = (-f32::MAX, largest_magnitude(xb), None);
            for first in 0..=32 {
                for second in first..=32 {
                    for (is_minus, v) in [(false, IQ1_PLUS), (true, IQ1_MINUS)] {
                        let sum_qx = (sum_x[first] - sum_x[0]) * v[0] + (sum_x[second] - sum_x[first]) * v[1] + (sum_x[32] - sum_x[second]) * v[2];
                        let sum_q2 = (sum_w[first] - sum_w[0]) * v[0] * v[0] + (sum_w[second] - sum_w[first]) * v[1] * v[1] + (sum_w[32] - sum_w[second]) * v[2] * v[2];
                        if sum_q2 > 0.0 && sum_qx * sum_qx > best_score * sum_q2 {
                            scale = sum_qx / sum_q2;
                            best_score = scale * sum_qx;
                            best = Some((first, second, is_minus));
                        }
                    }
                }
            }
            let Some((first, second, is_minus)) = best else { continue };
            let mut levels = [0u8; 32];
            let (mut scale, flipped) = split_levels(&order, first, second, scale, &mut levels);
            let is_minus = is_minus != flipped;
            let values = if is_minus { IQ1_MINUS } else { IQ1_PLUS };
            let mut indices = [0usize; 4];
            scale = iq1_groups(xb, &weights, &mut levels, scale, |_| values, &mut indices);
            for (k, &index) in indices.iter().enumerate() {
                index_bytes[4 * ib + k] = index as u8;
                words[ib] |= ((index >> 8) as u16) << (3 * k);
            }
            scales[ib] = scale;
            minus[ib] = is_minus;
        }
        let max_scale = largest_scale(&scales);
        if max_scale != 0.0 {
            let d = max_scale / 15.0;
            head.copy_from_slice(&f16::from_f32(d * 1.125).to_le_bytes());
            let inverse = 1.0 / d;
            for ((word, &scale), &minus) in words.iter_mut().zip(&scales).zip(&minus) {
                let l = nearest_int(0.5 * (inverse * scale - 1.0)).clamp(0, 7) as u16;
                *word |= (l | if minus { 8 } else { 0 }) << 12;
            }
        }
        for (word, out) in words.iter().zip(high.chunks_mut(2)) {
            out.copy_from_slice(&word.to_le_bytes());
        }
    })
}

/// The values of IQ1_M's `group` (0 or 1 of a sub-block) under the sub-block's `shifts`: 0 is
/// (+, +), 1 (+, −), 2 (−, +), 3 (−, −).
fn iq1_m_values(shifts: usize, group: usize) -> [f32; 3] {
    let plus = if group == 0 { shifts < 2 } else { shifts % 2 == 0 };
    if plus { IQ1_PLUS } else { IQ1_MINUS }
}

/// IQ1_M super-blocks of `values` (whole rows of `importance.len()` when given): 16 values a
/// 3-bit scale, each group of 8 its own ±⅛ shift; 56 bytes: 32 low bytes of 11-bit grid indices,
/// per 16 values a byte of both groups' top 3 bits and shift signs (bits 3 and 7), then four u16
/// of 3-bit scales whose top nibbles hold the f16 `d`.
pub fn encode_iq1_m(values: &[f32], importance: Option<&[f32]>) -> Vec<u8> {
    encode_super_blocks(values, importance, 56, |xbl, importance, out| {
        let sigma2 = 2.0 * sum_of_squares(xbl) / QK_K as f32;
        let (index_bytes, rest) = out.split_at_mut(32);
        let (high, scale_bytes) = rest.split_at_mut(16);
        let mut scales = [0f32; 16];
        let mut shifts = [0usize; 16];
        let mut all_weights = [[0f32; 16]; 16];
        for (ib, xb) in xbl.chunks(16).enumerate() {
            let weights = &mut all_weights[ib];
            sub_block_weights(xb, importance.map(|qw| &qw[16 * ib..]), sigma2, square, weights);
            if largest_magnitude(xb) < 1e-7 {
                continue;
            }
            // As IQ1_S, with each half's sums apart, since each half has its own shift.
            let order = ascending(xb);
            let (mut px, mut pw) = ([[0f32; 17]; 2], [[0f32; 17]; 2]);
            for (j, &i) in order.iter().enumerate() {
                let h = usize::from(i >= 8);
                px[h][j + 1] = px[h][j] + weights[i] * xb[i];
                px[1 - h][j + 1] = px[1 - h][j];
                pw[h][j + 1] = pw[h][j] + weights[i];
                pw[1 - h][j + 1] = pw[1 - h][j];
            }
            let (totals_x, totals_w) = ([px[0][16], px[1][16]], [pw[0][16], pw[1][16]]);
            let (p2, m2) = (IQ1_PLUS[2], IQ1_MINUS[2]);
            let cp1 = IQ1_PLUS[0] * IQ1_PLUS[0] - IQ1_PLUS[1] * IQ1_PLUS[1];
            let cp2 = IQ1_PLUS[1] * IQ1_PLUS[1] - IQ1_PLUS[2] * IQ1_PLUS[2];
            let cm1 = IQ1_MINUS[0] * IQ1_MINUS[0] - IQ1_MINUS[1] * IQ1_MINUS[1];
            let cm2 = IQ1_MINUS[1] * IQ1_MINUS[1] - IQ1_MINUS[2] * IQ1_MINUS[2];
            let (mut best_score, mut scale, mut best) = (-f32::MAX, largest_magnitude(xb), None);
            for first in 0..=16 {
                for second in first..=16 {
                    let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) = ([0f32; 2], [0f32; 2], [0f32; 2], [0f32; 2]);
                    for h in 0..2 {
                        let sx = px[h][first] + px[h][second];
                        qx_p[h] = totals_x[h] * p2 - sx;
                        qx_m[h] = totals_x[h] * m2 - sx;
                        q2_p[h] = totals_w[h] * p2 * p2 + pw[h][first] * cp1 + pw[h][second] * cp2;
                        q2_m[h] = totals_w[h] * m2 * m2 + pw[h][first] * cm1 + pw[h][second] * cm2;
                    }
                    let sum_qx = [qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]];
                    let sum_q2 = [q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]];
                    for k in 0..4 {
                        if sum_q2[k] > 0.0 && sum_qx[k] * sum_qx[k] > best_score * sum_q2[k] {
                            scale = sum_qx[k] / sum_q2[k];
                            best_score = scale * sum_qx[k];
                            best = Some((first, second, k));
                        }
                    }
                }
            }
            let Some((first, second, k)) = best else { continue };
            let mut levels = [0u8; 16];
            let (mut scale, flipped) = split_levels(&order, first, second, scale, &mut levels);
            let k = if flipped { 3 - k } else { k };
            let mut indices = [0usize; 2];
            scale = iq1_groups(xb, weights, &mut levels, scale, |group| iq1_m_values(k, group), &mut indices);
            index_bytes[2 * ib] = indices[0] as u8;
            index_bytes[2 * ib + 1] = indices[1] as u8;
            high[ib] = (indices[0] >> 8 | (indices[1] >> 8) << 4) as u8;
            scales[ib] = scale;
            shifts[ib] = k;
        }
        let max_scale = largest_scale(&scales);
        if max_scale == 0.0 {
            return;
        }
        // The 3-bit scales against max / 15, then `d` refitted to the coded values.
        let mut d = max_scale / 15.0;
        let inverse = 1.0 / d;
        let mut packed = [0u16; 4];
        let (mut sum_qx, mut sum_q2) = (0f32, 0f32);
        let lattice = Grid::Iq1.lattice();
        for (ib, xb) in xbl.chunks(16).enumerate() {
            let l = nearest_int(0.5 * (inverse * scales[ib] - 1.0)).clamp(0, 7);
            packed[ib / 4] |= (l as u16) << (3 * (ib % 4));
            high[ib] |= [0x00, 0x80, 0x08, 0x88][shifts[ib]];
            for group in 0..2 {
                let values = iq1_m_values(shifts[ib], group);
                let index = index_bytes[2 * ib + group] as usize + ((high[ib] as usize) << (8 - 4 * group) & 0x700);
                for j in 0..8 {
                    let w = all_weights[ib][8 * group + j];
                    let q = values[lattice.points[index][j] as usize] * (2 * l + 1) as f32;
                    sum_qx += w * q * xb[8 * group + j];
                    sum_q2 += w * q * q;
                }
            }
        }
        if sum_q2 > 0.0 {
            d = sum_qx / sum_q2;
        }
        let bits = f16::from_f32(d * 1.1125).to_bits();
        packed[0] |= (bits & 0x000f) << 12;
        packed[1] |= (bits & 0x00f0) << 8;
        packed[2] |= (bits & 0x0f00) << 4;
        packed[3] |= bits & 0xf000;
        for (word, out) in packed.iter().zip(scale_bytes.chunks_mut(2)) {
            out.copy_from_slice(&word.to_le_bytes());
        }
    })
}

/// ggml's `ksigns_iq2xs`: 7 stored sign bits with the eighth that makes their count even.
fn with_parity(signs: u32) -> u8 {
    let signs = (signs & 127) as u8;
    signs | ((signs.count_ones() % 2) as u8) << 7
}

/// Values one sub-block scale covers in `kind`'s super-block.
pub(crate) fn sub_block(kind: GgmlType) -> usize {
    match kind {
        GgmlType::IQ2_XS | GgmlType::IQ2_S | GgmlType::IQ1_M => 16,
        _ => 32,
    }
}

/// What a value's 4-bit code (see [`split`]) stands for before its scale `d·sub_scale`.
pub(crate) fn code_value(kind: GgmlType, code: u8) -> f32 {
    let level = (code & 7) as usize;
    let negative = code & 8 != 0;
    if matches!(kind, GgmlType::IQ1_S | GgmlType::IQ1_M) {
        return level as f32 - 1.0 + if negative { -0.125 } else { 0.125 };
    }
    let magnitude = match kind {
        GgmlType::IQ3_XXS => [4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0][level] / 4.0,
        GgmlType::IQ3_S => (2 * level + 1) as f32,
        _ => [8.0, 25.0, 43.0, 0.0, 0.0, 0.0, 0.0, 0.0][level] / 8.0,
    };
    if negative { -magnitude } else { magnitude }
}

/// One super-block of a lattice type as a 4-bit code a value (the grid level, with the sign, or
/// IQ1's shift, in bit 3), appended to `codes`, and a scale byte per [`sub_block`] values, appended
/// to `sub_scales`; returns the f16 `d`. Value = `(d·sub_scale)·code_value(code)`: every factor is
/// exact in f32 and so is their product, which is therefore ggml's `dequantize_row_*` value bit for
/// bit, whatever order ggml multiplies in.
pub(crate) fn split(kind: GgmlType, b: &[u8], codes: &mut Vec<u8>, sub_scales: &mut Vec<u8>) -> f16 {
    let grid = kind.lattice().expect("a lattice type");
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let (packed, dim, bits) = grid.table();
    let level = |index: usize, i: usize| (packed[index] >> (bits * i)) as u8 & ((1 << bits) - 1) as u8;
    // A group of `dim` values of grid point `index`, negative where `signs` has bit `first + i`.
    let group = |index: usize, first: usize, signs: u8, codes: &mut Vec<u8>| {
        codes.extend((0..dim).map(|i| level(index, i) | ((signs >> (first + i)) & 1) << 3));
    };
    match kind {
        GgmlType::IQ3_XXS => {
            for ib in 0..8 {
                let word = u32_at(66 + 4 * ib);
                sub_scales.push(2 * (word >> 28) as u8 + 1);
                for l in 0..4 {
                    let signs = with_parity(word >> (7 * l));
                    group(b[2 + 8 * ib + 2 * l] as usize, 0, signs, codes);
                    group(b[2 + 8 * ib + 2 * l + 1] as usize, 4, signs, codes);
                }
            }
        }
        GgmlType::IQ3_S => {
            for ib in 0..8 {
                sub_scales.push(1 + 2 * ((b[106 + ib / 2] >> (4 * (ib % 2))) & 0xf));
                let high = b[66 + ib] as usize;
                for l in 0..4 {
                    for half in 0..2 {
                        let index = b[2 + 8 * ib + 2 * l + half] as usize | ((high >> (2 * l + half)) & 1) << 8;
                        group(index, 4 * half, b[74 + 4 * ib + l], codes);
                    }
                }
            }
        }
        GgmlType::IQ2_XXS => {
            for ib in 0..8 {
                let (indices, word) = (u32_at(2 + 8 * ib), u32_at(6 + 8 * ib));
                sub_scales.push(2 * (word >> 28) as u8 + 1);
                for l in 0..4 {
                    group((indices >> (8 * l)) as usize & 255, 0, with_parity(word >> (7 * l)), codes);
                }
            }
        }
        GgmlType::IQ2_XS => {
            for ib in 0..8 {
                sub_scales.extend([b[66 + ib] & 0xf, b[66 + ib] >> 4].map(|s| 2 * s + 1));
                for l in 0..4 {
                    let half = u16_at(2 + 2 * (4 * ib + l));
                    group((half & 511) as usize, 0, with_parity(u32::from(half >> 9)), codes);
                }
            }
        }
        GgmlType::IQ2_S => {
            for ib in 0..8 {
                sub_scales.extend([b[74 + ib] & 0xf, b[74 + ib] >> 4].map(|s| 2 * s + 1));
                for l in 0..4 {
                    let index = b[2 + 4 * ib + l] as usize | ((b[66 + ib] as usize) << (8 - 2 * l) & 0x300);
                    group(index, 0, b[34 + 4 * ib + l], codes);
                }
            }
        }
        GgmlType::IQ1_S => {
            for ib in 0..8 {
                let word = u16_at(34 + 2 * ib);
                sub_scales.push(2 * ((word >> 12) & 7) as u8 + 1);
                // The shift's sign, for all 32 values, in bit 3 of each code.
                let shift = if word & 0x8000 != 0 { 0xff } else { 0 };
                for l in 0..4 {
                    group(b[2 + 4 * ib + l] as usize | ((word as usize >> (3 * l)) & 7) << 8, 0, shift, codes);
                }
            }
        }
        GgmlType::IQ1_M => {
            let scales: [u16; 4] = std::array::from_fn(|i| u16_at(48 + 2 * i));
            for sub in 0..16 {
                sub_scales.push(2 * ((scales[sub / 4] >> (3 * (sub % 4))) & 7) as u8 + 1);
                let high = b[32 + sub] as usize;
                for k in 0..2 {
                    let index = b[2 * sub + k] as usize | (high << (8 - 4 * k) & 0x700);
                    let shift = if high & (0x08 << (4 * k)) != 0 { 0xff } else { 0 };
                    group(index, 0, shift, codes);
                }
            }
            let bits = (scales[0] >> 12) | ((scales[1] >> 8) & 0x00f0) | ((scales[2] >> 4) & 0x0f00) | (scales[3] & 0xf000);
            return f16::from_bits(bits);
        }
        other => unreachable!("{other:?} is not a lattice type"),
    }
    f16::from_le_bytes([b[0], b[1]])
}

/// One super-block of a lattice type, appended to `out` as ggml's `dequantize_row_*` computes it.
pub(crate) fn decode(kind: GgmlType, b: &[u8], out: &mut Vec<f32>) {
    let (mut codes, mut sub_scales) = (Vec::with_capacity(QK_K), Vec::with_capacity(16));
    let d = split(kind, b, &mut codes, &mut sub_scales).to_f32();
    let group = sub_block(kind);
    out.extend(codes.iter().enumerate().map(|(i, &code)| (d * f32::from(sub_scales[i / group])) * code_value(kind, code)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRIDS: [Grid; 6] = [Grid::Iq3Xxs, Grid::Iq3S, Grid::Iq2Xxs, Grid::Iq2Xs, Grid::Iq2S, Grid::Iq1];

    /// Seeded values roughly normal (sums of uniforms), rows of 512 with a larger column here and
    /// there, as weights have.
    fn values(n: usize) -> Vec<f32> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        (0..n).map(|i| (uniform() + uniform() + uniform()) * if i % 97 == 0 { 4.0 } else { 1.0 }).collect()
    }

    fn decoded(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
        crate::gguf::dequantize(kind, bytes)
    }

    fn relative_rms(x: &[f32], y: &[f32]) -> f32 {
        let error: f32 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
        (error / x.iter().map(|a| a * a).sum::<f32>()).sqrt()
    }

    /// ggml-common.h's decoded grid values (its `iq*_grid` tables): coordinate `i` of point `index`.
    fn value(grid: Grid, index: usize, i: usize) -> f32 {
        let (packed, _, bits) = grid.table();
        let level = (packed[index] >> (bits * i)) as usize & ((1 << bits) - 1);
        match grid {
            Grid::Iq3Xxs => [4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0][level],
            Grid::Iq3S => (2 * level + 1) as f32,
            Grid::Iq2Xxs | Grid::Iq2Xs | Grid::Iq2S => [8.0, 25.0, 43.0, 0.0][level],
            Grid::Iq1 => level as f32 - 1.0,
        }
    }

    /// Decoded grid points equal ggml-common.h's tables (entries copied from it), and every key
    /// maps to its grid point or to neighbours nearest first.
    #[test]
    fn lattices_are_ggmls() {
        let packed = |grid: Grid, index: usize, dim: usize| (0..dim).fold(0u64, |p, i| p | (value(grid, index, i) as u64) << (8 * i));
        assert_eq!(packed(Grid::Iq3Xxs, 5, 4), 0x0404_0c3e);
        assert_eq!(packed(Grid::Iq3Xxs, 255, 4), 0x3e34_1c04);
        assert_eq!(packed(Grid::Iq3S, 3, 4), 0x0101_010b);
        assert_eq!(packed(Grid::Iq2Xxs, 1, 8), 0x0808_0808_0808_082b);
        assert_eq!(packed(Grid::Iq2S, 1023, 8), 0x2b2b_2b2b_2b2b_2b2b);
        let iq1 = |index: usize| (0..8).map(|i| value(Grid::Iq1, index, i) as i8).collect::<Vec<_>>();
        assert_eq!(iq1(1), [1, -1, -1, -1, -1, -1, -1, -1], "iq1s_grid[1] = 0xffffffffffffff01");
        assert_eq!(iq1(2047), [1; 8]);
        assert_eq!(packed(Grid::Iq2Xs, 300, 8), 0x1908_1908_0819_1908);
        for grid in GRIDS {
            let lattice = grid.lattice();
            let (packed, _, _) = grid.table();
            for (index, &key) in packed.iter().enumerate() {
                assert_eq!(lattice.map[key as usize], index as i32, "{grid:?}");
            }
            let off: Vec<usize> = (0..lattice.map.len()).filter(|&k| lattice.map[k] < 0).collect();
            assert_eq!(off.len() + packed.len(), lattice.map.len());
            for key in off {
                let levels: Vec<u8> = (0..lattice.dim).map(|i| (key >> (lattice.bits * i) & ((1 << lattice.bits) - 1)) as u8).collect();
                let (indices, chunks) = lattice.neighbours_of(&levels);
                let (list, padding) = indices.split_at(lattice.lists[(-lattice.map[key] - 1) as usize].count as usize);
                assert!(!list.is_empty(), "{grid:?} key {key}");
                assert!(padding.len() < LANES && padding.iter().all(|j| Some(j) == list.last()), "{grid:?} key {key}: padded with the last");
                for (c, chunk) in chunks.iter().enumerate() {
                    for j in 0..LANES {
                        let point = &lattice.points[indices[LANES * c + j] as usize];
                        assert!((0..lattice.dim).all(|i| chunk[i][j] == point[i]), "{grid:?} key {key}: chunk {c} lane {j}");
                    }
                }
                let distance = |j: u16| lattice.points[j as usize].iter().zip(&levels).map(|(&p, &l)| (i32::from(p) - i32::from(l)).pow(2)).sum::<i32>();
                assert!(list.windows(2).all(|w| (distance(w[0]), w[0]) < (distance(w[1]), w[1])), "{grid:?} key {key}: nearest first");
            }
        }
    }

    /// The AVX2 search picks the neighbour ggml's loop picks, ties (integer values) and NaN included.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn side_by_side_search_equals_ggmls_loop() {
        if !crate::ggml_encode::has_avx2() {
            return;
        }
        fn check<const DIM: usize>(grid: Grid, draw: &mut impl FnMut() -> f32) {
            let lattice = grid.lattice();
            let values = [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0];
            for key in (0..lattice.map.len()).filter(|&k| lattice.map[k] < 0).step_by(97) {
                let levels: Vec<u8> = (0..DIM).map(|i| (key >> (lattice.bits * i) & ((1 << lattice.bits) - 1)) as u8).collect();
                let (indices, chunks) = lattice.neighbours_of(&levels);
                let whole = key % 3 == 0;
                let x: [f32; DIM] = std::array::from_fn(|_| if whole { draw().round() } else { draw() });
                let w: [f32; DIM] = std::array::from_fn(|_| if whole { draw().abs().round() } else { draw().abs() });
                for scale in [1.0, 0.37, 0.0, f32::NAN] {
                    let in_turn = nearest_in_turn::<DIM>(indices, chunks, &x, &w, scale, &values);
                    // SAFETY: AVX2 checked above.
                    let avx2 = unsafe { nearest_avx2::<DIM>(indices, chunks, &x, &w, scale, &values) };
                    assert_eq!(avx2, in_turn, "{grid:?} key {key} scale {scale}");
                }
            }
        }
        let mut state = 7u64;
        let mut draw = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 16.0
        };
        check::<4>(Grid::Iq3Xxs, &mut draw);
        check::<4>(Grid::Iq3S, &mut draw);
        for grid in [Grid::Iq2Xxs, Grid::Iq2Xs, Grid::Iq2S, Grid::Iq1] {
            check::<8>(grid, &mut draw);
        }
    }

    /// Encoded and decoded, values land near where they were: about 1.5 bits of error for the 2-
    /// bit types, less for 3 bits; an importance matrix lowers the error of the columns it favours.
    #[test]
    fn encoded_blocks_decode_near_their_values() {
        let x = values(16 * QK_K);
        for (kind, bytes, bound) in [
            (GgmlType::IQ3_XXS, encode_iq3_xxs(&x, None), 0.25),
            (GgmlType::IQ3_S, encode_iq3_s(&x, None), 0.2),
            (GgmlType::IQ2_S, encode_iq2_s(&x, None), 0.35),
            (GgmlType::IQ1_M, encode_iq1_m(&x, None), 0.7),
        ] {
            let error = relative_rms(&x, &decoded(kind, &bytes));
            assert!(error < bound, "{kind:?}: {error}");
        }
        // Rows of 512: even columns count 100 times odd ones.
        let importance: Vec<f32> = (0..512).map(|i| if i % 2 == 0 { 100.0 } else { 1.0 }).collect();
        let favoured = |v: &[f32]| v.iter().step_by(2).copied().collect::<Vec<f32>>();
        for (kind, bytes, bound) in [
            (GgmlType::IQ3_XXS, encode_iq3_xxs(&x, Some(&importance)), 0.25),
            (GgmlType::IQ3_S, encode_iq3_s(&x, Some(&importance)), 0.2),
            (GgmlType::IQ2_XXS, encode_iq2_xxs(&x, &importance), 0.45),
            (GgmlType::IQ2_XS, encode_iq2_xs(&x, &importance), 0.4),
            (GgmlType::IQ2_S, encode_iq2_s(&x, Some(&importance)), 0.35),
            (GgmlType::IQ1_S, encode_iq1_s(&x, &importance), 0.7),
            (GgmlType::IQ1_M, encode_iq1_m(&x, Some(&importance)), 0.7),
        ] {
            let y = decoded(kind, &bytes);
            let error = relative_rms(&x, &y);
            assert!(error < bound, "{kind:?} with importance: {error}");
            assert!(relative_rms(&favoured(&x), &favoured(&y)) <= error, "{kind:?}: the favoured columns fit better");
        }
    }

    /// A zero super-block is all zero bytes; IQ3_S, as ggml, writes the next sub-block's indices
    /// and signs where a zero sub-block's would have gone (its ninth bits stay in place).
    #[test]
    fn zeros_and_ggmls_iq3_s_quirk() {
        let zeros = [0.0; QK_K];
        for (kind, bytes) in [(GgmlType::IQ3_XXS, encode_iq3_xxs(&zeros, None)), (GgmlType::IQ3_S, encode_iq3_s(&zeros, None)), (GgmlType::IQ2_S, encode_iq2_s(&zeros, None)),
            (GgmlType::IQ2_XXS, encode_iq2_xxs(&zeros, &[1.0; QK_K])), (GgmlType::IQ1_S, encode_iq1_s(&zeros, &[1.0; QK_K])), (GgmlType::IQ1_M, encode_iq1_m(&zeros, None))] {
            assert!(bytes.iter().all(|&b| b == 0), "{kind:?}");
        }
        let mut x = values(QK_K);
        x[..32].fill(0.0);
        let shifted = encode_iq3_s(&x, None);
        let mut whole = x.clone();
        whole[..32].copy_from_slice(&x[32..64]);
        let first = encode_iq3_s(&whole, None);
        // Sub-block 1's indices and signs sit where sub-block 0's go (without importance its
        // weights are x², so its search does not see the other sub-blocks).
        assert_eq!(shifted[2..10], first[2..10]);
        assert_eq!(shifted[74..78], first[74..78]);
        assert_eq!(shifted[66], 0, "no ninth bits for the zero sub-block");
    }
}
