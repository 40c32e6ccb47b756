//! Ctrl-C (SIGINT) and SIGTERM, which schedulers (Slurm, Kubernetes, spot instances) send before
//! they kill. While training, the first one asks the run to stop after its current optimizer
//! step with a checkpoint ([`requested`]); a second one, or any one in another command, removes
//! what is half-written and exits at once with 128 + the signal's number.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// The first signal received while a run may stop gracefully; 0 for none.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Whether a first signal still only asks the training loop to stop.
static GRACEFUL: AtomicBool = AtomicBool::new(true);

/// Handles SIGINT and SIGTERM for the rest of the process on a thread of its own. With
/// `graceful`, the first signal only sets [`requested`] for the training loop.
pub fn install(graceful: bool) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if graceful && GRACEFUL.load(Ordering::SeqCst) && REQUESTED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                continue;
            }
            ember_models::files::exit_removing_temporaries(128 + signal);
        }
    });
    Ok(())
}

/// From now on every signal exits at once, removing what is half-written: the run's `[export]`
/// has no step to stop after.
pub fn end_graceful() {
    GRACEFUL.store(false, Ordering::SeqCst);
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<i32> {
    Some(REQUESTED.load(Ordering::SeqCst)).filter(|&signal| signal != 0)
}

/// `SIGINT`, `SIGTERM`, or the number.
pub fn signal_name(signal: i32) -> String {
    match signal {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        other => format!("signal {other}"),
    }
}
