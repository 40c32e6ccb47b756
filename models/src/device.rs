//! Choosing the compute device by name, so recipes, tests and CI pick backends without code
//! changes. `flex` (pure-Rust CPU) is always there; `libtorch` and `cuda[:N]` need the `tch`
//! cargo feature (LibTorch, see scripts/libtorch.sh).

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::sync::atomic::{AtomicBool, Ordering};

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
            DeviceName::Libtorch => {
                return_freed_memory();
                Ok(Device::libtorch())
            }
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            DeviceName::Cuda(index) => {
                return_freed_memory();
                Ok(Device::libtorch_cuda(index))
            }
            #[cfg(not(feature = "tch"))]
            other => Err(format!("device '{other}' needs ember built with `--features tch`")),
        }
    }
}

/// Keeps freed memory in the process, for flex: glibc hands every buffer above 32 MiB back to
/// the kernel on free, and flex allocates a fresh buffer for every op's output, so each step's
/// activations and logits came back as fresh zeroed pages: on the tiny CI recipe 16 of 30 seconds
/// went to page faults; with this, 0.4 of 12. One arena for all threads: a step runs on a worker of
/// the thread pool ([`with_busy_workers`]), and a thread's own arena grows in heaps of 64 MiB at
/// most, so larger buffers went back to fresh pages (and the LoRA workload's peak grew by 110 MiB).
/// Called at startup, before any other thread exists;
/// [`DeviceName::device`] undoes it for LibTorch.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds, under the main arena's lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Environment variable LibTorch (2.9 and later) reads once, at its first attention call: set, its
/// scaled-dot-product attention on Hopper and Blackwell GPUs stops preferring cuDNN's kernel.
const CUDNN_ATTENTION_ENV: &str = "TORCH_CUDNN_SDPA_DEPRIORITIZED";

/// Keeps LibTorch's attention on flash / memory-efficient kernels instead of cuDNN's, unless
/// `TORCH_CUDNN_SDPA_DEPRIORITIZED` is set already. cuDNN's builds a graph for every new shape,
/// and packed sequences bring a new length almost every call: on an H200 (cuDNN 9.19) one
/// attention forward + backward took 83 ms of host time at an unseen length and 0.2 ms with flash
/// attention, and 7B LoRA trained at 649 tokens/s instead of 1,907. Called at startup, before any
/// other thread exists.
pub fn avoid_cudnn_attention() {
    if std::env::var_os(CUDNN_ATTENTION_ENV).is_none() {
        // SAFETY: no other thread exists yet to read the environment concurrently.
        unsafe { std::env::set_var(CUDNN_ATTENTION_ENV, "1") };
    }
}

/// glibc's own thresholds back (32 MiB, where its dynamic threshold tops out), for LibTorch. There
/// the transients of a 4-bit base's dequantization come in many sizes between long-lived
/// activations, and kept memory fragmented: an 8-layer LLaMA-7B-width NF4 base with LoRA peaked at
/// 12.1 GB instead of 3.2 GB on the CPU. LibTorch's dense runs lose no speed without it.
#[cfg(feature = "tch")]
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as in keep_freed_memory; glibc's free() itself rewrites these thresholds from any
    // thread, so other threads running is no concern.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        // glibc's default: eight arenas a core, for LibTorch's threads that allocate at once.
        libc::mallopt(libc::M_ARENA_MAX, (8 * *CORES).min(i32::MAX as usize) as i32);
    }
}

/// The cores this process may use (a CPU quota counted), read once: finding it reads cgroup
/// files, and [`with_busy_workers`] asks at every step.
static CORES: LazyLock<usize> = LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

/// Runs `work` on a worker of flex's thread pool while the pool's other workers look for jobs
/// without sleeping, as OpenMP's threads spin between PyTorch's parallel regions. A training step
/// hands the pool thousands of short parallel operations: from a thread outside the pool each one
/// was a hand-off and a wait on a futex, and between them a sleeping worker needed waking (on a
/// 2-core host, 11,000 context switches a step of the LoRA workload, and 14% of the cores' time
/// idle). A polling worker yields its core whenever it finds nothing: polling without yielding
/// took that workload from 433 to 57 tokens/s with 4 threads on 2 cores. On LibTorch, which has
/// threads of its own, and with one thread, `work` runs where it is.
pub fn with_busy_workers<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if !is_flex(device) || threads < 2 {
        return work();
    }
    // More threads than cores (`--threads` above them, a CPU quota): polling workers would take
    // turns on the cores with the one doing the work.
    if threads > *CORES {
        return rayon::scope(|_| work());
    }
    rayon::scope(|_| {
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let (caller, stop_flag) = (rayon::current_thread_index(), stop.0.clone());
        rayon::spawn_broadcast(move |worker| {
            if Some(worker.index()) == caller {
                return;
            }
            while !stop_flag.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    // The core goes to any other thread that wants it (rayon's own idle loop
                    // yields too, but sleeps after 32 rounds).
                    std::thread::yield_now();
                }
            }
        });
        work()
    })
}

/// Tells the polling workers of [`with_busy_workers`] to stop, also when the work panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Whether `device` is flex (with or without autodiff).
pub fn is_flex(device: &Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Flex(_))
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
    if half && is_flex(device) { DType::F32 } else { stored }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// The work runs on a worker of the pool (where it has two threads) and hands its result back;
    /// a panic in it reaches the caller, and the pool serves the next step.
    #[test]
    fn busy_workers_run_the_step_in_the_pool_and_pass_its_panic_on() {
        let device = DeviceName::Flex.device().unwrap();
        assert_eq!(with_busy_workers(&device, || (0..1000u64).into_par_iter().sum::<u64>()), 499_500);
        if rayon::current_num_threads() >= 2 {
            assert!(with_busy_workers(&device, rayon::current_thread_index).is_some());
        }
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| with_busy_workers(&device, || panic!("the step failed"))));
        assert!(failed.is_err());
        assert_eq!(with_busy_workers(&device, || (0..100u64).into_par_iter().sum::<u64>()), 4_950);
    }
}
