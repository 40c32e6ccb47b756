//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `<out>/checkpoints/step-<N>/` holds the adapter in its export format (usable as is), the
//! trainable parameters with their ids (`trainable.bpk`, burn's burnpack: exact values, and the
//! ids the optimizer state is laid out by), the AdamW moments (`optimizer.safetensors`), `metrics.jsonl` up to
//! step N and `state.json` (position in the data, running summary). Data order and dropout are
//! functions of the seed and the step, so no RNG state needs saving. Each checkpoint is written
//! to a temporary folder and renamed into place.

use std::path::{Path, PathBuf};

use burn::module::{Module, ParamGroup};
use burn::store::ModuleRecord;
use ember_adapters::{AdaptedModel, Method};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::optimizer::AdamW;
use crate::run::Summary;

/// Where the next optimizer step starts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Position {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Index of the next gradient-accumulation group within `epoch`.
    pub next_group: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub position: Position,
    pub summary: Summary,
    pub tokens_seen: usize,
    pub train_seconds: f64,
}

pub fn dir_for(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && p.join("state.json").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Writes a checkpoint and keeps only the newest `keep` (0 keeps all).
#[allow(clippy::too_many_arguments)]
pub fn save(
    root: &Path,
    model: &AdaptedModel,
    method: &Method,
    optimizer: &AdamW,
    state: &State,
    metrics: &Path,
    base_name: &str,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let dir = dir_for(root, state.position.step);
    let io = |path: &Path, e: std::io::Error| TrainError::write(path, e);
    // burn's recorder errors quote the path they wrote: named as the checkpoint, not its temporary.
    let failed = |path: &Path, reason: String| {
        let reason = match path.parent() {
            Some(tmp) => reason.replace(&*tmp.to_string_lossy(), &dir.to_string_lossy()),
            None => reason,
        };
        TrainError::Checkpoint { path: ember_models::destination_path(path), reason }
    };
    ember_models::write_dir_atomically(
        &dir,
        |tmp| {
            method.config().save(model, base_name, &tmp.join("adapter"))?;
            let trainable_path = tmp.join("trainable.bpk");
            let group = ParamGroup::from_ids(model.trainable_ids());
            model.clone().into_record_group(group).save(&trainable_path).map_err(|e| failed(&trainable_path, e.to_string()))?;
            if crate::fault::armed(crate::fault::Fault::KillInCheckpoint, state.position.step) {
                crate::fault::kill_self();
            }
            if crate::fault::armed(crate::fault::Fault::DiskFullInCheckpoint, state.position.step) {
                return Err(io(&tmp.join("optimizer.safetensors"), crate::fault::disk_full()));
            }
            let optimizer_path = tmp.join("optimizer.safetensors");
            optimizer.save(&optimizer_path).map_err(|e| io(&optimizer_path, e))?;
            std::fs::copy(metrics, tmp.join("metrics.jsonl")).map_err(|e| io(metrics, e))?;
            let path = tmp.join("state.json");
            ember_models::write_json(&path, state).map_err(|e| io(&path, e))
        },
        io,
    )?;
    if keep > 0 {
        let mut all: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| io(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect();
        all.sort();
        for old in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
        }
    }
    Ok(dir)
}

/// Reads `dir/state.json`.
pub fn read_state(dir: &Path) -> Result<State, TrainError> {
    let path = dir.join("state.json");
    let unreadable = |reason: String| TrainError::Resume { path: path.clone(), reason };
    let text = std::fs::read_to_string(&path).map_err(|e| unreadable(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))
}

/// Puts the checkpoint's trainable values and ids into `model` and its AdamW state into
/// `optimizer`.
pub fn restore(dir: &Path, model: AdaptedModel, mut optimizer: AdamW) -> Result<(AdaptedModel, AdamW), TrainError> {
    let unreadable = |path: &Path, reason: String| TrainError::Resume { path: path.to_path_buf(), reason };
    let path = dir.join("trainable.bpk");
    let record = ModuleRecord::load(&path).map_err(|e| unreadable(&path, e.to_string()))?.allow_partial(true);
    let model = model
        .try_load_record(record)
        .map_err(|e| unreadable(&path, format!("the checkpoint does not fit the recipe's adapter ({e})")))?;
    let path = dir.join("optimizer.safetensors");
    if !path.exists() && dir.join("optimizer.bpk").exists() {
        return Err(unreadable(&path, "absent: the checkpoint has an optimizer.bpk, written by an ember before 2026-12-04; resume it with that version".into()));
    }
    optimizer.load(&path, &model).map_err(|e| unreadable(&path, e))?;
    Ok((model, optimizer))
}
