//! Fault injection for the reliability tests, read from `EMBER_FAULT` (comma-separated):
//! `nan-loss@N` makes optimizer step N's loss NaN; `kill-in-checkpoint@N` SIGKILLs the process
//! halfway through writing the step-N checkpoint. Unset in normal use: then nothing happens.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    NanLoss,
    KillInCheckpoint,
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
