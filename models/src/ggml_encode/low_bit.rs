//! ggml's 1- and 2-bit round-to-nearest quantizers (`quantize_row_*_ref`; llama-quantize runs
//! them with or without an importance matrix, which they ignore): Q1_0 and Q2_0, and the ternary
//! TQ1_0 and TQ2_0 made for BitNet b1.58 and TriLM models.
//!
//! Layouts (little-endian, one block after another):
//! - Q1_0, 128 values in 18 bytes: f16 `d` (the mean magnitude), 16 bytes of signs (value `j` in
//!   bit `j % 8` of byte `j / 8`, set for `x ≥ 0`); value = `±d`.
//! - Q2_0, 64 values in 18 bytes: f16 `d` (the largest magnitude), 16 bytes of 2-bit codes (value
//!   `j` in bits `2·(j % 4)` of byte `j / 4`); value = `(q − 1)·d`.
//! - TQ2_0, 256 values in 66 bytes: 64 bytes of 2-bit codes (per 128 values, byte `m` holds values
//!   `m`, `m+32`, `m+64`, `m+96`, lowest bits first), f16 `d`; value = `(q − 1)·d`.
//! - TQ1_0, 256 values in 54 bytes: 48 bytes of five trits each (the first 32 bytes hold values
//!   `m + 32n`, the next 16 values `160 + m + 16n`, for trit `n` from the most significant), 4
//!   bytes of four (values `240 + j + 4n`), each byte `⌈t·256 / 243⌉` of its trits' base-3 number
//!   `t` (four trits shifted up one), then f16 `d`; value = `(trit − 1)·d`.

use half::f16;

use super::encode_blocks;

/// Q1_0 blocks of `values` (a multiple of 128).
pub fn encode_q1_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 128, 18, |x, out| {
        let sum = x.iter().fold(0f32, |sum, v| sum + v.abs());
        out[..2].copy_from_slice(&f16::from_f32(sum / 128.0).to_le_bytes());
        for (byte, eight) in out[2..].iter_mut().zip(x.chunks_exact(8)) {
            *byte = eight.iter().enumerate().fold(0, |byte, (k, &v)| byte | u8::from(v >= 0.0) << k);
        }
    })
}

/// Q2_0 blocks of `values` (a multiple of 64).
pub fn encode_q2_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 64, 18, |x, out| {
        let d = x.iter().fold(0f32, |amax, v| if v.abs() > amax { v.abs() } else { amax });
        let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (byte, four) in out[2..].iter_mut().zip(x.chunks_exact(4)) {
            *byte = four.iter().enumerate().fold(0, |byte, (k, &v)| byte | ((round_to_int(v * inverse) + 1).clamp(0, 3) as u8) << (2 * k));
        }
    })
}

/// TQ2_0 blocks of `values` (a multiple of 256).
pub fn encode_tq2_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 256, 66, |x, out| {
        let (d, trit) = ternary_scale(x);
        for (half, x) in x.chunks_exact(128).enumerate() {
            for m in 0..32 {
                out[32 * half + m] = (0..4).fold(0, |byte, n| byte | trit(x[m + 32 * n]) << (2 * n));
            }
        }
        out[64..].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    })
}

/// TQ1_0 blocks of `values` (a multiple of 256).
pub fn encode_tq1_0(values: &[f32]) -> Vec<u8> {
    encode_blocks(values, 256, 54, |x, out| {
        let (d, trit) = ternary_scale(x);
        // Trits as a base-3 number, the first the most significant, scaled to a byte rounding up.
        let byte = |trits: &mut dyn Iterator<Item = u8>, shift: u16| {
            let t = trits.fold(0u16, |t, q| 3 * t + u16::from(q)) * shift;
            ((t * 256 + 242) / 243) as u8
        };
        for m in 0..32 {
            out[m] = byte(&mut (0..5).map(|n| trit(x[m + 32 * n])), 1);
        }
        for m in 0..16 {
            out[32 + m] = byte(&mut (0..5).map(|n| trit(x[160 + m + 16 * n])), 1);
        }
        for j in 0..4 {
            out[48 + j] = byte(&mut (0..4).map(|n| trit(x[240 + j + 4 * n])), 3);
        }
        out[52..].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    })
}

/// A ternary block's scale, its largest magnitude as ggml's `MAX` macro finds it, and its trit of
/// a value, `lroundf(x / d) + 1` (a NaN gives 1, as glibc's `long` of it does once cut to `int`).
fn ternary_scale(x: &[f32]) -> (f32, impl Fn(f32) -> u8) {
    let d = super::lattice::largest_magnitude(x);
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, move |v: f32| ((v * inverse).round() as i64 + 1) as u8 & 3)
}

/// C's `(int)roundf(x)` as x86-64 computes it: halves away from zero, and `INT_MIN` for a NaN or
/// a value out of range.
fn round_to_int(x: f32) -> i32 {
    let r = x.round();
    if r.is_nan() || r.abs() >= 2_147_483_648.0 { i32::MIN } else { r as i32 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_encode::tests::values;
    use crate::gguf::{dequantize, GgmlType};

    /// Each type's blocks dequantize to what its quantizer meant: Q1_0 to `d` for `x ≥ 0` and `−d`
    /// below; the others to the step (`(q − 1)·d`) nearest to `x`, up to `d`'s rounding to f16.
    #[test]
    fn low_bit_blocks_hold_the_nearest_step() {
        let x = values(1024);
        let check = |kind: GgmlType, bytes: Vec<u8>, block: usize, steps: &[f32]| {
            let y = dequantize(kind, &bytes);
            for (xb, yb) in x.chunks(block).zip(y.chunks(block)) {
                let d = yb.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (&v, &q) in xb.iter().zip(yb) {
                    if kind == GgmlType::Q1_0 {
                        assert!(q.abs() == d && q.is_sign_positive() == (v >= 0.0), "{kind:?} {v} -> {q}");
                        continue;
                    }
                    let best = steps.iter().map(|s| (v - s * d).abs()).fold(f32::INFINITY, f32::min);
                    assert!((v - q).abs() <= best + d * 1e-3, "{kind:?} {v} -> {q}");
                }
            }
        };
        check(GgmlType::Q1_0, encode_q1_0(&x), 128, &[]);
        check(GgmlType::Q2_0, encode_q2_0(&x), 64, &[-1.0, 0.0, 1.0]);
        check(GgmlType::TQ1_0, encode_tq1_0(&x), 256, &[-1.0, 0.0, 1.0]);
        check(GgmlType::TQ2_0, encode_tq2_0(&x), 256, &[-1.0, 0.0, 1.0]);
    }

    /// TQ1_0's byte for trits `t`: `⌈t·256/243⌉`, which its decoder (`(byte·3ⁿ mod 256)·3 >> 8`)
    /// reads back trit by trit, for every one of the 243 five-trit numbers.
    #[test]
    fn tq1_0_bytes_decode_to_their_trits() {
        for t in 0..243u16 {
            let byte = ((t * 256 + 242) / 243) as u8;
            let trits: Vec<u16> = (0..5).map(|n| (u16::from(byte.wrapping_mul(3u8.pow(n))) * 3) >> 8).collect();
            assert_eq!(trits.iter().fold(0, |acc, q| 3 * acc + q), t);
        }
    }

    #[test]
    fn c_rounding_of_nan_is_int_min() {
        assert_eq!(round_to_int(2.5), 3);
        assert_eq!(round_to_int(-2.5), -3);
        assert_eq!(round_to_int(f32::NAN), i32::MIN);
        assert_eq!(round_to_int(3e9), i32::MIN);
    }
}
