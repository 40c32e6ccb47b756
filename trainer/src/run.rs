//! What a run reports: each step and event as it happens, `metrics.jsonl` as it goes, and the
//! [`Summary`] at the end (also kept in every checkpoint, so a resumed run reports the whole run).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::TrainError;

/// One optimizer step, as the loop reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    /// True every `logging_steps` steps and at the last one: the steps worth a log line.
    #[serde(skip)]
    pub log_line: bool,
}

impl std::fmt::Display for StepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}/{} epoch {:.2} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s eta {:.0}s",
            self.step, self.total_steps, self.epoch, self.loss, self.lr, self.grad_norm, self.tokens_per_second, self.eta_seconds
        )
    }
}

/// What the loop tells its caller while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A line worth printing (data and model summary, evaluations, checkpoints).
    Info(String),
    Step(StepReport),
}

/// What a finished run reports (also written to `summary.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub epochs_completed: f64,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub skipped_empty_records: Vec<usize>,
    /// Optimizer steps skipped for a NaN/inf loss or gradient (`train.on_nonfinite = "skip"`).
    #[serde(default)]
    pub skipped_nonfinite_steps: Vec<usize>,
    pub truncated_records: usize,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub first_train_loss: Option<f64>,
    pub final_train_loss: Option<f64>,
    pub first_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    /// The step of the best evaluation.
    #[serde(default)]
    pub best_eval_step: Option<usize>,
    /// Evaluations since the best one (`train.early_stopping_patience` counts them).
    #[serde(default)]
    pub evals_since_best: usize,
    /// The step at which `train.early_stopping_patience` stopped the run.
    #[serde(default)]
    pub stopped_early_at: Option<usize>,
    pub tokens_per_second: f64,
    pub seconds: f64,
    pub adapter_dir: PathBuf,
    pub metrics: PathBuf,
    /// `training_curves.png`; none if it could not be drawn. (Absent from checkpoints written
    /// before plots existed.)
    #[serde(default)]
    pub plot: Option<PathBuf>,
    /// What the recipe's `[export]` wrote (merged folder, GGUF files, importance matrix).
    #[serde(default)]
    pub exports: Vec<PathBuf>,
}

/// `metrics.jsonl`: one JSON object per training step or evaluation, flushed as written.
pub(crate) struct Metrics {
    pub(crate) path: PathBuf,
    file: std::fs::File,
    /// TensorBoard's copy of every line, when the recipe asks for it.
    tensorboard: Option<crate::tensorboard::EventFile>,
}

impl Metrics {
    /// A new file, or, when resuming, the checkpoint's metrics (put in place atomically) to
    /// append to: lines written after the checkpoint by the killed run are dropped. With
    /// `tensorboard` (the run folder and the recipe's text), the event files are rebuilt from
    /// those lines and follow every new one.
    pub(crate) fn create(path: PathBuf, resume_from: Option<&Path>, tensorboard: Option<(&Path, &str)>) -> Result<Self, TrainError> {
        let error = |e: std::io::Error| TrainError::write(&path, e);
        let file = match resume_from {
            Some(saved) => {
                let bytes = std::fs::read(saved).map_err(|e| TrainError::Resume { path: saved.to_path_buf(), reason: e.to_string() })?;
                ember_models::write_file_atomically(&path, &bytes).map_err(error)?;
                std::fs::OpenOptions::new().append(true).open(&path).map_err(error)?
            }
            None => std::fs::File::create(&path).map_err(error)?,
        };
        let tensorboard = tensorboard.map(|(run, recipe)| crate::tensorboard::EventFile::create(run, recipe, &path)).transpose()?;
        Ok(Self { path, file, tensorboard })
    }

    pub(crate) fn write(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{value}").and_then(|()| self.file.flush()).map_err(|e| TrainError::write(&self.path, e))?;
        match &mut self.tensorboard {
            Some(events) => events.scalars(&value),
            None => Ok(()),
        }
    }
}

