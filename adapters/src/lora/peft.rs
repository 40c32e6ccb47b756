//! PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `…lora_B.weight` `[out, r]`. DoRA
//! shares it (`use_dora: true` plus `…lora_magnitude_vector` `[out]`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use ember_models::layers::Linear;
use ember_models::{BaseModel, Checkpoint, LoadDtype};
use serde_json::{Value, json};

use super::{LoraBranch, LoraConfig};
use crate::method::{AdapterFolder, PEFT_VERSION};
use crate::registry::ProjectionAdapter;
use crate::target::{Target, layers_from_peft};
use crate::{AdaptedModel, AdapterError, SavedTensor, save_adapter_dir};

/// `base_model.model.<module>.<part>.weight`
pub fn key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}.weight")
}

/// Whether `folder` is a PEFT LoRA adapter, and whether it is DoRA (`use_dora`).
pub fn lora_variant(folder: &AdapterFolder) -> Option<bool> {
    (folder.peft_type() == Some("LORA")).then(|| folder.get("use_dora").and_then(Value::as_bool) == Some(true))
}

/// Writes a PEFT LORA folder: `tensors` (already keyed) and the config of `config`, with
/// `target_modules` listing the adapted module names for `all-linear`.
pub(crate) fn save_peft(config: &LoraConfig, use_dora: bool, modules: &[String], tensors: &[SavedTensor], base_model: &str, dir: &Path) -> Result<(), AdapterError> {
    let short: BTreeSet<String> = modules.iter().map(|m| m.rsplit('.').next().unwrap_or(m).to_owned()).collect();
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": config.target.to_peft(&short),
        "layers_to_transform": config.layers_to_transform,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": use_dora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "peft_version": PEFT_VERSION,
    });
    save_adapter_dir(dir, AdapterFolder::PEFT_WEIGHTS, tensors, &[(AdapterFolder::PEFT_CONFIG, &adapter_config)])
}

/// The LoRA tensors of one branch, keyed as PEFT saves them.
pub(crate) fn branch_tensors(module: &str, branch: &LoraBranch) -> [SavedTensor; 2] {
    [SavedTensor::new(key(module, "lora_A"), branch.lora_a.val()), SavedTensor::new(key(module, "lora_B"), branch.lora_b.val())]
}

/// The adapter's weights with every branch's A and B checked against `base`'s projections, for
/// a loader that builds its branch from them (`make(module, linear, A, B)`). Every tensor of
/// the file must be used.
pub(crate) fn load_branches(
    folder: &AdapterFolder,
    config: &LoraConfig,
    base: BaseModel,
    device: &Device,
    mut make: impl FnMut(&str, &Linear, LoraBranch, &dyn Fn(&str, usize) -> Result<Tensor<1>, AdapterError>) -> Result<ProjectionAdapter, AdapterError>,
) -> Result<AdaptedModel, AdapterError> {
    let (weights, weights_path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
    let used = std::cell::RefCell::new(BTreeSet::new());
    let read_error = |e: ember_models::LoadError| AdapterError::invalid(&weights_path, e.to_string());
    let model = AdaptedModel::with_branches(
        base,
        |name, linear| {
            if !config.targets(name) {
                return Ok(None);
            }
            let matrix = |part: &str, shape: [usize; 2]| {
                let k = key(name, part);
                used.borrow_mut().insert(k.clone());
                weights.float::<2>(&k, shape, LoadDtype::F32, device).map_err(read_error)
            };
            let a = matrix("lora_A", [config.r, linear.in_features()])?;
            let b = matrix("lora_B", [linear.out_features(), config.r])?;
            let vector = |part: &str, len: usize| {
                // PEFT drops the `.weight` of the magnitude vector in the file.
                let k = format!("base_model.model.{name}.{part}");
                used.borrow_mut().insert(k.clone());
                weights.float::<1>(&k, [len], LoadDtype::F32, device).map_err(read_error)
            };
            let branch = LoraBranch::from_tensors(a, b, config.scale(), config.dropout);
            make(name, linear, branch, &vector).map(Some)
        },
        || folder.invalid(format!("target_modules {} match no module of the base model", config.target)),
    )?;
    if let Some(extra) = weights.keys().find(|k| !used.borrow().contains(*k)) {
        return Err(AdapterError::invalid(&weights_path, format!("tensor '{extra}' belongs to no module this config targets in the base model")));
    }
    Ok(model)
}

/// PEFT's LoRA config, refusing the options whose math ember does not implement. DoRA's
/// `use_dora` is the caller's to tell apart.
pub fn read_config(folder: &AdapterFolder) -> Result<LoraConfig, AdapterError> {
    parse_config(folder).map_err(|reason| folder.invalid(reason))
}

fn parse_config(folder: &AdapterFolder) -> Result<LoraConfig, String> {
    let get = |k: &str| folder.get(k);
    let unsupported = |k: &str, reason: &str| Err(format!("'{k}': {reason} is not supported"));
    if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return unsupported("fan_in_fan_out", "Conv1D (fan_in_fan_out) weights");
    }
    if let Some(bias) = get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return unsupported("bias", &format!("bias '{bias}'"));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return unsupported(k, "a per-module pattern");
        }
    }
    for k in ["modules_to_save", "layer_replication", "target_parameters", "trainable_token_indices"] {
        if get(k).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return unsupported(k, "a non-empty value");
        }
    }
    let r = get("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or("'r' must be a positive integer")? as usize;
    let alpha = get("lora_alpha").and_then(Value::as_f64).ok_or("'lora_alpha' must be a number")?;
    Ok(LoraConfig {
        r,
        alpha,
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target: Target::from_peft(get("target_modules"), "target_modules")?,
        layers_to_transform: layers_from_peft(get("layers_to_transform"))?,
    })
}

/// A LoRA (or DoRA) adapter's branches as `ember merge` streams them: per adapted weight key,
/// its module name.
pub struct PeftBranches {
    pub weights: Checkpoint,
    pub path: PathBuf,
    pub config: LoraConfig,
    /// `<module>.weight` -> module
    pub modules: HashMap<String, String>,
}

impl PeftBranches {
    /// Every `…lora_A.weight` of the file with its `…lora_B.weight`; `extra` names the other
    /// per-module tensors the variant has (DoRA's `lora_magnitude_vector`).
    pub fn read(folder: &AdapterFolder, extra: &[&str]) -> Result<Self, AdapterError> {
        let config = read_config(folder)?;
        let (weights, path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
        let mut modules = HashMap::new();
        for k in weights.keys() {
            if let Some(module) = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".lora_A.weight")) {
                let b = key(module, "lora_B");
                if !weights.contains(&b) {
                    return Err(AdapterError::invalid(&path, format!("'{k}' has no matching '{b}'")));
                }
                for part in extra {
                    let e = format!("base_model.model.{module}.{part}");
                    if !weights.contains(&e) {
                        return Err(AdapterError::invalid(&path, format!("'{k}' has no matching '{e}'")));
                    }
                }
                modules.insert(format!("{module}.weight"), module.to_owned());
            } else if !k.ends_with(".lora_B.weight") && !extra.iter().any(|part| k.ends_with(&format!(".{part}"))) {
                return Err(AdapterError::invalid(&path, format!("unexpected tensor '{k}' in a LoRA adapter")));
            }
        }
        Ok(Self { weights, path, config, modules })
    }

    /// Checks each branch against its base weight's `[out, in]`.
    pub fn check(&self, base: &Checkpoint) -> Result<(), AdapterError> {
        let r = self.config.r;
        for (weight_key, module) in &self.modules {
            let Some((shape, _)) = base.info(weight_key) else {
                return Err(AdapterError::invalid(&self.path, format!("adapter module '{module}' is not in the base model")));
            };
            let (a_shape, _) = self.weights.info(&key(module, "lora_A")).expect("listed");
            let (b_shape, _) = self.weights.info(&key(module, "lora_B")).expect("listed");
            if a_shape != [r, shape[1]] || b_shape != [shape[0], r] {
                return Err(AdapterError::invalid(
                    &self.path,
                    format!("'{module}': lora_A {a_shape:?} / lora_B {b_shape:?} do not fit base weight {shape:?} with r={r}"),
                ));
            }
        }
        Ok(())
    }

    /// `s·B·A` of `module`, `[out, in]` f32 (shapes checked before).
    pub fn delta(&self, module: &str, device: &Device) -> Tensor<2> {
        let load = |k: &str| {
            let (shape, _) = self.weights.info(k).expect("checked");
            self.weights.float::<2>(k, [shape[0], shape[1]], LoadDtype::F32, device).expect("checked")
        };
        load(&key(module, "lora_B")).matmul(load(&key(module, "lora_A"))).mul_scalar(self.config.scale())
    }
}
