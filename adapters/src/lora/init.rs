//! How LoRA's branches start (PEFT's `init_lora_weights`). The default and `gaussian` draw A
//! and zero B, so the model starts at the base. PiSSA and OLoRA instead take the branch's start
//! from the base weight itself and move that part out of the frozen weight, `W_res = W − s·B₀A₀`:
//! the model still starts at the base, but training moves the weight's principal directions.
//!
//! The saved adapter is converted to plain LoRA on the original base, as PEFT's `save_pretrained`
//! with `path_initial_model_for_weight_conversion` does: `ΔW = s·(BA − B₀A₀)`, written as a branch
//! of rank 2r with `A' = [A; A₀]` and `B' = [B, −B₀]`.

use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// PEFT's `init_lora_weights` as a recipe writes it: `true` or a name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Switch(bool),
    Name(String),
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = InitLoraWeights;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "'init_lora_weights' as {NAMES}")
            }
            fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
                Ok(InitLoraWeights::Switch(value))
            }
            fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
                Ok(InitLoraWeights::Name(value.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Switch(true)
    }
}

/// The start of every branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// A Kaiming-uniform (a = √5), B zero: PEFT's `true`.
    #[default]
    Kaiming,
    /// A ~ N(0, 1/r²), B zero.
    Gaussian,
    /// PiSSA (Meng et al. 2024): from W's r largest singular triplets, `B = U_r·√(S_r/s)`,
    /// `A = √(S_r/s)·V_rᵀ`. `power_iterations`: `None` for the exact SVD, else torch's
    /// `svd_lowrank` with that many (PEFT's `pissa_niter_N`), which 7B-sized weights need.
    Pissa { power_iterations: Option<usize> },
    /// OLoRA (Büyükakyüz 2024): from W's QR, `B = Q[:, :r]`, `A = R[:r]`.
    Olora,
}

impl std::fmt::Display for LoraInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraInit::Kaiming => f.write_str("true"),
            LoraInit::Gaussian => f.write_str("\"gaussian\""),
            LoraInit::Pissa { power_iterations: None } => f.write_str("\"pissa\""),
            LoraInit::Pissa { power_iterations: Some(n) } => write!(f, "\"pissa_niter_{n}\""),
            LoraInit::Olora => f.write_str("\"olora\""),
        }
    }
}

const NAMES: &str = "true, \"gaussian\", \"pissa\", \"pissa_niter_<n>\" or \"olora\"";

impl LoraInit {
    pub fn from_recipe(value: &InitLoraWeights) -> Result<Self, String> {
        let name = match value {
            InitLoraWeights::Switch(true) => return Ok(LoraInit::Kaiming),
            InitLoraWeights::Switch(false) => {
                return Err(format!("'adapter.init_lora_weights' = false (PEFT's debugging start, B random) is not supported; use {NAMES}"));
            }
            InitLoraWeights::Name(name) => name,
        };
        Self::from_name(name).ok_or_else(|| format!("'adapter.init_lora_weights' = \"{name}\" is not supported; use {NAMES}"))
    }

    /// The value of a saved PEFT config's `init_lora_weights`, where `None` is a start whose
    /// adapter only fits a base ember does not have (PiSSA or OLoRA saved without conversion,
    /// LoftQ, CorDA…).
    pub fn from_peft(value: Option<&Value>) -> Result<Self, String> {
        match value {
            None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(LoraInit::Kaiming),
            Some(Value::String(name)) => match Self::from_name(name) {
                Some(LoraInit::Gaussian) => Ok(LoraInit::Gaussian),
                _ => Err(format!(
                    "'init_lora_weights' is \"{name}\": this adapter was saved for a base with its start taken out of the weights; \
                     save it again with PEFT's save_pretrained(path_initial_model_for_weight_conversion=…) for the original base"
                )),
            },
            Some(other) => Err(format!("'init_lora_weights' must be a boolean or a name, found {other}")),
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "gaussian" => Some(LoraInit::Gaussian),
            "pissa" => Some(LoraInit::Pissa { power_iterations: None }),
            "olora" => Some(LoraInit::Olora),
            other => other.strip_prefix("pissa_niter_").and_then(|n| n.parse().ok()).map(|n| LoraInit::Pissa { power_iterations: Some(n) }),
        }
    }

    /// PEFT's config value of an adapter as ember saves it: a start read from the base is saved
    /// converted, which PEFT marks `true`.
    pub fn to_peft(self) -> Value {
        match self {
            LoraInit::Gaussian => json!("gaussian"),
            _ => json!(true),
        }
    }

    /// Whether the start comes from the base weight (and changes it).
    pub fn reads_base(self) -> bool {
        matches!(self, LoraInit::Pissa { .. } | LoraInit::Olora)
    }
}

/// A branch's start read from `weight` (`[out, in]`): `(A [r, in], B [out, r])` in f32 and the
/// frozen remainder `W − s·B·A` in `weight`'s dtype. Computed in f64 on `weight`'s device.
pub fn start_from_weight(weight: Tensor<2>, r: usize, scale: f64, init: LoraInit, rng: &mut StdRng) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let (dtype, autodiff) = (weight.dtype(), weight.is_autodiff());
    // burn-linalg's SVD is not routed through the autodiff device mode; nothing here needs a graph.
    let w = weight.inner().cast(DType::F64);
    let (a, b) = match init {
        LoraInit::Olora => {
            let [out, _] = w.dims();
            let q = to_device(householder_q(&to_host(w.clone().slice([0..out, 0..r])), out, r), [out, r], &w.device());
            (q.clone().transpose().matmul(w.clone()), q)
        }
        LoraInit::Pissa { power_iterations } => {
            let (u, s, vt) = match power_iterations {
                None => exact_svd(w.clone(), r),
                Some(n) => svd_lowrank(w.clone(), r, n, rng),
            };
            let root = s.div_scalar(scale).sqrt();
            (vt * root.clone().unsqueeze_dim::<2>(1), u * root.unsqueeze_dim::<2>(0))
        }
        LoraInit::Kaiming | LoraInit::Gaussian => unreachable!("{init:?} does not read the base"),
    };
    let (a, b) = (a.cast(DType::F32), b.cast(DType::F32));
    // From the f32 factors the branch holds, so that base + branch is W to f64 rounding.
    let taken = b.clone().cast(DType::F64).matmul(a.clone().cast(DType::F64)).mul_scalar(scale);
    let kept = (w - taken).cast(dtype);
    if autodiff { (a.autodiff(), b.autodiff(), kept.autodiff()) } else { (a, b, kept) }
}

/// The `r` largest singular triplets `(U [m, r], S [r], Vᵀ [r, n])`, each pair's sign fixed by
/// [`with_fixed_signs`].
fn exact_svd(w: Tensor<2>, r: usize) -> (Tensor<2>, Tensor<1>, Tensor<2>) {
    let [m, n] = w.dims();
    let (u, s, vt) = burn::linalg::svd::<2, 1>(w, 200);
    with_fixed_signs(u.slice([0..m, 0..r]), s.slice([0..r]), vt.slice([0..r, 0..n]))
}

/// torch's `svd_lowrank(W, q = r, niter)` (Halko et al. 2009, algorithm 5.1): a Gaussian test
/// matrix, `niter` power iterations re-orthonormalised each half step, then the SVD of the
/// small projection. Costs `(4·niter + 4)·m·n·r` multiply-adds instead of the SVD's `O(m·n²)`.
fn svd_lowrank(w: Tensor<2>, r: usize, niter: usize, rng: &mut StdRng) -> (Tensor<2>, Tensor<1>, Tensor<2>) {
    let [m, n] = w.dims();
    // The algorithm wants a tall matrix: work on Wᵀ when W is wide, and swap the factors back.
    let (a, rows, cols) = if m < n { (w.transpose(), n, m) } else { (w, m, n) };
    let device = a.device();
    let orthonormal = |x: Tensor<2>, len: usize| to_device(householder_q(&to_host(x), len, r), [len, r], &device);
    let gaussian: Vec<f64> = (0..cols * r).map(|_| StandardNormal.sample(rng)).collect();
    let mut q = orthonormal(a.clone().matmul(to_device(gaussian, [cols, r], &device)), rows);
    for _ in 0..niter {
        let back = orthonormal(a.clone().transpose().matmul(q), cols);
        q = orthonormal(a.clone().matmul(back), rows);
    }
    let projected = q.clone().transpose().matmul(a); // r, cols
    let (u, s, vt) = burn::linalg::svd::<2, 1>(projected, 200);
    let (left, right) = (q.matmul(u), vt);
    let (u, vt) = if m < n { (right.transpose(), left.transpose()) } else { (left, right) };
    with_fixed_signs(u, s, vt)
}

/// Each singular pair `(uᵢ, vᵢ)` is only defined up to a common sign: make the largest-magnitude
/// entry of every `uᵢ` positive, so that ember's start does not depend on the SVD's internals.
fn with_fixed_signs(u: Tensor<2>, s: Tensor<1>, vt: Tensor<2>) -> (Tensor<2>, Tensor<1>, Tensor<2>) {
    let [m, r] = u.dims();
    let host = to_host(u.clone());
    let signs: Vec<f64> = (0..r)
        .map(|j| {
            let largest = (0..m).map(|i| host[i * r + j]).fold(0.0f64, |best, x| if x.abs() > best.abs() { x } else { best });
            if largest < 0.0 { -1.0 } else { 1.0 }
        })
        .collect();
    let signs = to_device(signs, [r], &u.device());
    (u * signs.clone().unsqueeze_dim::<2>(0), s, vt * signs.unsqueeze_dim::<2>(1))
}

/// The orthonormal `Q` (`[m, k]`) of the Householder QR of `x` (`[m, k]` row-major, m ≥ k) as
/// LAPACK's `geqrf` + `orgqr` give it (and so torch's `linalg.qr`): each reflection sends its
/// column to `β = −sign(α)·‖x‖`, so R's diagonal has the opposite sign of the pivot.
fn householder_q(x: &[f64], m: usize, k: usize) -> Vec<f64> {
    let mut a = x.to_vec();
    let mut reflectors = Vec::with_capacity(k);
    for j in 0..k {
        let alpha = a[j * k + j];
        let tail = (j + 1..m).map(|i| a[i * k + j] * a[i * k + j]).sum::<f64>().sqrt();
        if tail == 0.0 {
            // Nothing below the pivot: LAPACK's reflection is the identity.
            reflectors.push((Vec::new(), 0.0));
            continue;
        }
        let beta = -alpha.hypot(tail).copysign(alpha);
        let tau = (beta - alpha) / beta;
        let v: Vec<f64> = (j..m).map(|i| if i == j { 1.0 } else { a[i * k + j] / (alpha - beta) }).collect();
        reflect(&mut a, k, j, j..k, &v, tau);
        reflectors.push((v, tau));
    }
    // Q = H₀·H₁·…·H_{k−1} times the first k columns of the identity, applied from the last.
    let mut q = vec![0.0; m * k];
    for j in 0..k {
        q[j * k + j] = 1.0;
    }
    for (j, (v, tau)) in reflectors.iter().enumerate().rev() {
        if *tau != 0.0 {
            reflect(&mut q, k, j, 0..k, v, *tau);
        }
    }
    q
}

/// `(I − τ·v·vᵀ)` applied to `columns` of row-major `a` (`k` columns), `v` starting at row `from`.
fn reflect(a: &mut [f64], k: usize, from: usize, columns: std::ops::Range<usize>, v: &[f64], tau: f64) {
    for c in columns {
        let dot: f64 = v.iter().enumerate().map(|(i, vi)| vi * a[(from + i) * k + c]).sum();
        for (i, vi) in v.iter().enumerate() {
            a[(from + i) * k + c] -= tau * dot * vi;
        }
    }
}

fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.cast(DType::F64).into_data().try_into_vec::<f64>().expect("an f64 tensor")
}

fn to_device<const D: usize>(values: Vec<f64>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), (device, DType::F64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn device() -> Device {
        Device::default()
    }

    fn matrix(rows: usize, cols: usize, seed: u64) -> Tensor<2> {
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f64> = (0..rows * cols).map(|_| StandardNormal.sample(&mut rng)).collect();
        to_device(values, [rows, cols], &device())
    }

    fn max_abs_diff(a: Tensor<2>, b: Tensor<2>) -> f64 {
        to_host(a - b).into_iter().fold(0.0, |m, x| m.max(x.abs()))
    }

    /// torch.linalg.qr's Q (LAPACK's signs; a last column with nothing below its pivot is left
    /// as it is), and QᵀQ = I with R = QᵀX upper triangular on a tall case.
    #[test]
    fn householder_q_follows_lapack() {
        for (x, m, want) in [
            (vec![3.0, 2.0, 4.0, 6.0], 2, vec![-0.6, -0.8, -0.8, 0.6]),
            (vec![3.0, 2.0, 4.0, 6.0, 1.0, 1.0], 3, vec![-0.5883484054145522, 0.7846979774097266, -0.7844645405527361, -0.6124472018807623, -0.19611613513818402, 0.09569487529386897]),
        ] {
            let q = householder_q(&x, m, 2);
            assert!(q.iter().zip(&want).all(|(got, want)| (got - want).abs() < 1e-12), "{q:?}");
        }
        let x = matrix(40, 6, 1);
        let q = to_device(householder_q(&to_host(x.clone()), 40, 6), [40, 6], &device());
        assert!(max_abs_diff(q.clone().transpose().matmul(q.clone()), Tensor::<2>::eye(6, &device()).cast(DType::F64)) < 1e-12);
        let r = to_host(q.transpose().matmul(x));
        assert!((0..6).all(|i| (0..i).all(|j| r[i * 6 + j].abs() < 1e-12)), "{r:?}");
    }

    /// PiSSA takes the top-r part of W: the residual's largest singular value is W's (r+1)-th,
    /// and the power-iteration variant finds the same part on a matrix with a spectral gap.
    #[test]
    fn pissa_takes_the_principal_part_of_the_weight() {
        let (m, n, r, scale) = (24, 40, 4, 2.0);
        // Singular values 10, 9, 8, 7, then at most 1: a clear gap after the fourth.
        let (u, _, vt) = burn::linalg::svd::<2, 1>(matrix(m, n, 2), 200);
        let values: Vec<f64> = (0..m).map(|i| if i < r { 10.0 - i as f64 } else { 1.0 / (1.0 + i as f64) }).collect();
        let w = (u * to_device(values, [m], &device()).unsqueeze_dim::<2>(0)).matmul(vt);
        let mut rng = StdRng::seed_from_u64(0);
        let exact = start_from_weight(w.clone(), r, scale, LoraInit::Pissa { power_iterations: None }, &mut rng);
        let (_, s, _) = burn::linalg::svd::<2, 1>(exact.2.clone().cast(DType::F64), 200);
        assert!((to_host(s)[0] - 1.0 / (1.0 + r as f64)).abs() < 1e-5);
        let lowrank = start_from_weight(w.clone(), r, scale, LoraInit::Pissa { power_iterations: Some(4) }, &mut rng);
        let product = |(a, b, _): (Tensor<2>, Tensor<2>, Tensor<2>)| b.cast(DType::F64).matmul(a.cast(DType::F64)).mul_scalar(scale);
        assert!(max_abs_diff(product(exact.clone()), product(lowrank)) < 1e-5);
        // The model starts at the base: residual + s·B·A = W.
        assert!(max_abs_diff(exact.2.clone().cast(DType::F64) + product(exact), w) < 1e-5);
    }

    /// OLoRA: B is Q's first r columns and A is R's first r rows, so W − s·B·A keeps W's
    /// columns beyond the first r up to their component in span(Q_r).
    #[test]
    fn olora_takes_the_qr_of_the_first_columns() {
        let (w, r, scale) = (matrix(12, 20, 3), 3, 0.5);
        let (a, b, residual) = start_from_weight(w.clone(), r, scale, LoraInit::Olora, &mut StdRng::seed_from_u64(0));
        let (a, b) = (a.cast(DType::F64), b.cast(DType::F64));
        assert!(max_abs_diff(b.clone().transpose().matmul(b.clone()), Tensor::<2>::eye(r, &device()).cast(DType::F64)) < 1e-6);
        // The first r columns of B·A are W's own.
        assert!(max_abs_diff(b.clone().matmul(a.clone()).slice([0..12, 0..r]), w.clone().slice([0..12, 0..r])) < 1e-5);
        assert!(max_abs_diff(residual.cast(DType::F64) + b.matmul(a).mul_scalar(scale), w) < 1e-5);
    }

    #[test]
    fn recipe_and_peft_names() {
        let name = |n: &str| LoraInit::from_recipe(&InitLoraWeights::Name(n.into()));
        assert_eq!(name("pissa_niter_16"), Ok(LoraInit::Pissa { power_iterations: Some(16) }));
        assert_eq!(name("OLoRA"), Ok(LoraInit::Olora));
        assert!(name("loftq").unwrap_err().contains("\"pissa_niter_<n>\""));
        assert!(LoraInit::from_recipe(&InitLoraWeights::Switch(false)).is_err());
        assert!(LoraInit::from_peft(Some(&json!("pissa_niter_4"))).unwrap_err().contains("path_initial_model_for_weight_conversion"));
        assert_eq!(LoraInit::from_peft(Some(&json!("gaussian"))), Ok(LoraInit::Gaussian));
    }
}

