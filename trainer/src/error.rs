//! What can stop a run, each with its cause, and whose fault it is: the input (exit code 2) or
//! the run itself (exit code 1).

use std::path::PathBuf;

use ember_adapters::AdapterError;
use ember_data::DatasetError;
use ember_data::tokenizer::TokenizerError;
use ember_models::LoadError;

use crate::recipe::RecipeError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// A recipe value that only the data or the model shows to be wrong (`val_size`, the template).
    #[error("{key}: {reason}")]
    Setting { key: &'static str, reason: String },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Model(#[from] LoadError),
    /// Building, loading or saving the adapter.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// `--resume` found no checkpoint, or one that does not fit the recipe.
    #[error("{}: {reason}", path.display())]
    Resume { path: PathBuf, reason: String },
    /// The output folder holds another run, or cannot be prepared.
    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    /// Writing an output (metrics, checkpoint, summary) failed.
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// A checkpoint's parameter or optimizer file could not be written.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// Training went wrong (a NaN loss, an adapter that never moved).
    #[error("{0}")]
    Stopped(String),
    /// Another live process holds the output folder's lock.
    #[error("{}: output.dir is in use by another ember run (pid {pid}); wait for it to end or choose another output.dir", path.display())]
    Locked { path: PathBuf, pid: String },
    /// The adapter is saved, but the recipe's `[export]` failed.
    #[error("adapter saved to {}, but [export] failed: {source}", adapter.display())]
    Export { adapter: PathBuf, source: crate::merge::MergeError },
    /// SIGINT or SIGTERM stopped the run after a finished optimizer step.
    #[error("interrupted by {} after step {step}: {}", crate::interrupt::signal_name(*signal), match checkpoint {
        Some(dir) => format!("checkpoint {}; ember train --resume continues from it", dir.display()),
        None => "no step was finished, nothing to save".into(),
    })]
    Interrupted { signal: i32, step: usize, checkpoint: Option<PathBuf> },
    /// SIGINT or SIGTERM arrived by the time the adapter was saved: the `[export]` did not run.
    #[error("interrupted by {} with the adapter saved to {}: [export] not run", crate::interrupt::signal_name(*signal), adapter.display())]
    InterruptedBeforeExport { signal: i32, adapter: PathBuf },
}

impl TrainError {
    /// True when the recipe, the data or the model files are at fault (exit code 2); false when
    /// the run failed on its own (exit code 1).
    pub fn is_input(&self) -> bool {
        match self {
            TrainError::Recipe(_) | TrainError::Setting { .. } | TrainError::Dataset(_) | TrainError::Tokenizer(_) => true,
            TrainError::Resume { .. } | TrainError::Output { .. } | TrainError::Locked { .. } => true,
            TrainError::Model(e) => e.is_input(),
            TrainError::Adapter(e) => e.is_input(),
            TrainError::Export { source, .. } => source.is_input(),
            TrainError::Write { .. } | TrainError::Checkpoint { .. } | TrainError::Stopped(_) => false,
            TrainError::Interrupted { .. } | TrainError::InterruptedBeforeExport { .. } => false,
        }
    }

    /// The exit code: 128 + the signal for an interrupted run, else 2 for bad input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainError::Interrupted { signal, .. } | TrainError::InterruptedBeforeExport { signal, .. } => 128 + signal,
            _ if self.is_input() => 2,
            _ => 1,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Write { path: ember_models::destination_path(&path.into()), source }
    }
}
