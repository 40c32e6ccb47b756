//! Choosing the compute device by name, so recipes, tests and CI pick backends without code
//! changes. `flex` (pure-Rust CPU) is always there; `libtorch` and `cuda[:N]` need the `tch`
//! cargo feature (LibTorch, see scripts/libtorch.sh).

use std::fmt;
use std::str::FromStr;

use burn::backend::DispatchDevice;
use burn::tensor::{DType, Device};

/// Environment variable that overrides the default device (`flex`).
pub const DEVICE_ENV: &str = "EMBER_DEVICE";

/// A device as recipes and `EMBER_DEVICE` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceName {
    /// burn's pure-Rust CPU backend (`flex`, also `cpu`).
    Flex,
    /// LibTorch on the CPU.
    Libtorch,
    /// LibTorch on GPU N (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "flex" | "cpu" => Ok(DeviceName::Flex),
            "libtorch" => Ok(DeviceName::Libtorch),
            "cuda" => Ok(DeviceName::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(DeviceName::Cuda(index)),
                _ => Err(format!("unknown device '{other}' (expected flex, libtorch, cuda or cuda:N)")),
            },
        }
    }
}

impl TryFrom<String> for DeviceName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceName::Flex => f.write_str("flex"),
            DeviceName::Libtorch => f.write_str("libtorch"),
            DeviceName::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl DeviceName {
    /// The device, or why this build cannot run on it.
    pub fn device(self) -> Result<Device, String> {
        match self {
            DeviceName::Flex => Ok(Device::flex()),
            #[cfg(feature = "tch")]
            #[allow(deprecated)] // burn-tch is deprecated upstream; it is still the only GPU backend that builds offline
            DeviceName::Libtorch => Ok(Device::libtorch()),
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            DeviceName::Cuda(index) => Ok(Device::libtorch_cuda(index)),
            #[cfg(not(feature = "tch"))]
            other => Err(format!("device '{other}' needs ember built with `--features tch`")),
        }
    }
}

/// `flex`, `libtorch` (LibTorch on the CPU) or `cuda` / `cuda:N` (LibTorch on GPU N).
pub fn parse_device(name: &str) -> Result<Device, String> {
    name.parse::<DeviceName>()?.device()
}

/// The device named by `$EMBER_DEVICE`, else `flex`.
pub fn default_device() -> Result<Device, String> {
    match std::env::var(DEVICE_ENV) {
        Ok(name) if !name.is_empty() => parse_device(&name).map_err(|e| format!("{DEVICE_ENV}: {e}")),
        _ => Ok(Device::flex()),
    }
}

/// The dtype activations compute in over weights stored in `stored`. flex has no half-precision
/// arithmetic of its own (its bf16 matmul copies both operands to f32 on one thread, the
/// transposed weight included), so a bf16/f16 base computes in f32 there and keeps its storage;
/// LibTorch computes in the stored dtype, as transformers does.
pub fn compute_dtype(stored: DType, device: &Device) -> DType {
    let half = matches!(stored, DType::BF16 | DType::F16);
    if half && matches!(device.clone().inner().as_dispatch(), DispatchDevice::Flex(_)) { DType::F32 } else { stored }
}
