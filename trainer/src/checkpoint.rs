//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `<out>/checkpoints/step-<N>/` holds the adapter (PEFT format), the AdamW state
//! (`optimizer.bpk`, burn's burnpack format, keyed by parameter id), `metrics.jsonl` up to step N
//! and `state.json` (position in the data, parameter ids, running summary). Data order and
//! dropout are functions of the seed and the step, so no RNG state needs saving. Each checkpoint
//! is written to a temporary folder and renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::Device;
use ember_adapters::lora::{self, LoraConfig, LoraModel};
use ember_models::{Checkpoint, LoadDtype};
use serde::{Deserialize, Serialize};

use crate::train::Summary;

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
    /// Module name -> (lora_A id, lora_B id): the optimizer state is keyed by these.
    pub param_ids: BTreeMap<String, (u64, u64)>,
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
    model: &LoraModel,
    config: &LoraConfig,
    optimizer: &ModuleOptimizer,
    state: &State,
    metrics: &Path,
    base_name: &str,
    keep: usize,
) -> Result<PathBuf, String> {
    let dir = dir_for(root, state.position.step);
    let io = |path: &Path, e: std::io::Error| format!("{}: {e}", path.display());
    ember_models::write_dir_atomically(
        &dir,
        |tmp| {
            lora::save_peft(model, config, base_name, &tmp.join("adapter")).map_err(|e| e.to_string())?;
            let optimizer_path = tmp.join("optimizer.bpk");
            optimizer.to_record().save(&optimizer_path).map_err(|e| format!("{}: {e:?}", optimizer_path.display()))?;
            std::fs::copy(metrics, tmp.join("metrics.jsonl")).map_err(|e| io(metrics, e))?;
            let path = tmp.join("state.json");
            std::fs::write(&path, serde_json::to_string_pretty(state).expect("state serializes")).map_err(|e| io(&path, e))
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

/// The parameter ids of every branch, by module name.
pub fn param_ids(model: &LoraModel) -> BTreeMap<String, (u64, u64)> {
    model
        .projections()
        .into_iter()
        .filter_map(|(name, p)| p.lora.as_ref().map(|b| (name, (b.lora_a.id.val(), b.lora_b.id.val()))))
        .collect()
}

/// Reads `dir/state.json`.
pub fn read_state(dir: &Path) -> Result<State, String> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Puts the checkpoint's A/B values and ids into `model` and its AdamW state into `optimizer`.
pub fn restore(
    dir: &Path,
    state: &State,
    model: LoraModel,
    optimizer: ModuleOptimizer,
    device: &Device,
) -> Result<(LoraModel, ModuleOptimizer), String> {
    let weights_path = dir.join("adapter/adapter_model.safetensors");
    let weights = Checkpoint::open_file(&weights_path).map_err(|e| e.to_string())?;
    let mut error = None;
    let model = model.map_projections(|name, mut layer| {
        let (Some(branch), Some(&(a_id, b_id))) = (layer.lora.as_mut(), state.param_ids.get(name)) else { return layer };
        for (part, param, id) in [("lora_A", &mut branch.lora_a, a_id), ("lora_B", &mut branch.lora_b, b_id)] {
            let key = format!("base_model.model.{name}.{part}.weight");
            match weights.float::<2>(&key, param.shape().dims(), LoadDtype::F32, device) {
                Ok(tensor) => {
                    let mut restored = Param::from_tensor(tensor);
                    restored.id = ParamId::from(id);
                    *param = restored;
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        layer
    });
    if let Some(e) = error {
        return Err(e);
    }
    if param_ids(&model).len() != state.param_ids.len() {
        return Err(format!("{}: the checkpoint's adapter modules differ from the recipe's", dir.display()));
    }
    let path = dir.join("optimizer.bpk");
    let record = OptimizerRecord::load(&path).map_err(|e| format!("{}: {e:?}", path.display()))?;
    Ok((model, optimizer.load_record(record)))
}
