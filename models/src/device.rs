//! Choosing the compute device by name, so recipes, tests and CI pick backends without code
//! changes. `flex` (pure-Rust CPU) is always there; `libtorch` and `cuda[:N]` need the `tch`
//! cargo feature (LibTorch, see scripts/libtorch.sh).

use burn::tensor::Device;

/// Environment variable that overrides the default device (`flex`).
pub const DEVICE_ENV: &str = "EMBER_DEVICE";

/// `flex`, `libtorch` (LibTorch on the CPU) or `cuda` / `cuda:N` (LibTorch on GPU N).
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        "flex" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "tch")]
        #[allow(deprecated)] // burn-tch is deprecated upstream; it is still the only GPU backend that builds offline
        "libtorch" => Ok(Device::libtorch()),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let index = cuda.strip_prefix("cuda:").map_or(Ok(0), str::parse::<usize>).map_err(|_| format!("bad device '{name}'"))?;
            Ok(Device::libtorch_cuda(index))
        }
        #[cfg(not(feature = "tch"))]
        other if other == "libtorch" || other == "cuda" || other.starts_with("cuda:") => {
            Err(format!("device '{name}' needs ember built with `--features tch`"))
        }
        other => Err(format!("unknown device '{other}' (expected flex, libtorch, cuda or cuda:N)")),
    }
}

/// The device named by `$EMBER_DEVICE`, else `flex`.
pub fn default_device() -> Result<Device, String> {
    match std::env::var(DEVICE_ENV) {
        Ok(name) if !name.is_empty() => parse_device(&name).map_err(|e| format!("{DEVICE_ENV}: {e}")),
        _ => Ok(Device::flex()),
    }
}
