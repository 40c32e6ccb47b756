//! Fault injection for the reliability tests, read from `EMBER_FAULT` (comma-separated):
//! `nan-loss@N` makes optimizer step N's loss NaN; `kill-in-checkpoint@N` SIGKILLs the process
//! halfway through writing the step-N checkpoint; `disk-full-in-checkpoint@N` fails that write
//! as a full disk would (ENOSPC); `signal-in-merge@1` sends the process SIGTERM halfway through
//! writing a merged model. Unset in normal use: then nothing happens.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    NanLoss,
    KillInCheckpoint,
    DiskFullInCheckpoint,
    SignalInMerge,
}

fn faults() -> &'static [(Fault, usize)] {
    static FAULTS: OnceLock<Vec<(Fault, usize)>> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let spec = std::env::var("EMBER_FAULT").unwrap_or_default();
        spec.split(',')
            .filter_map(|item| {
                let (name, step) = item.trim().split_once('@')?;
                let fault = match name {
                    "nan-loss" => Fault::NanLoss,
                    "kill-in-checkpoint" => Fault::KillInCheckpoint,
                    "disk-full-in-checkpoint" => Fault::DiskFullInCheckpoint,
                    "signal-in-merge" => Fault::SignalInMerge,
                    _ => return None,
                };
                Some((fault, step.parse().ok()?))
            })
            .collect()
    })
}

/// Whether `fault` is armed for optimizer step `step` (1-based).
pub fn armed(fault: Fault, step: usize) -> bool {
    faults().contains(&(fault, step))
}

/// Dies as `kill -9` would, with no unwinding, flushing or cleanup.
pub fn kill_self() -> ! {
    let _ = std::process::Command::new("kill").args(["-KILL", &std::process::id().to_string()]).status();
    std::process::abort()
}

/// The error a write gets from a full disk.
pub fn disk_full() -> std::io::Error {
    const ENOSPC: i32 = 28; // Linux
    std::io::Error::from_raw_os_error(ENOSPC)
}

/// Sends this process SIGTERM, as `kill` would.
pub fn terminate_self() {
    let _ = std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status();
}
