//! PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `…lora_B.weight` `[out, r]`.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::Device;
use ember_models::{BaseModel, Checkpoint, LoadDtype};
use regex::Regex;
use serde_json::{Value, json};

use super::{LoraBranch, LoraConfig, LoraLinear, LoraModel, Target};
use crate::{AdapterError, SavedTensor, save_adapter_dir};

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

fn key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}.weight")
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (atomically).
pub fn save_peft(model: &LoraModel, config: &LoraConfig, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
    let mut tensors = Vec::new();
    let mut modules = BTreeSet::new();
    for (name, layer) in model.projections() {
        let Some(branch) = &layer.lora else { continue };
        for (part, param) in [("lora_A", &branch.lora_a), ("lora_B", &branch.lora_b)] {
            tensors.push(SavedTensor::new(key(&name, part), param.val()));
        }
        modules.insert(name.rsplit('.').next().unwrap_or(&name).to_owned());
    }
    let target_modules = match &config.target {
        Target::Suffixes(list) => json!(list),
        Target::Regex(re) => json!(re.as_str()),
        Target::AllLinear => json!(modules.iter().collect::<Vec<_>>()),
    };
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": target_modules,
        "layers_to_transform": config.layers_to_transform,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "peft_version": concat!("ember ", env!("CARGO_PKG_VERSION")),
    });
    save_adapter_dir(dir, WEIGHTS, &tensors, &[(CONFIG, &adapter_config)])
}

/// Reads a PEFT LoRA folder (as written by PEFT or by ember) and attaches it to `model`.
pub fn load_peft(dir: &Path, model: BaseModel, device: &Device) -> Result<(LoraModel, LoraConfig), AdapterError> {
    let config_path = dir.join(CONFIG);
    let config = read_peft_config(dir)?;
    let weights_path = dir.join(WEIGHTS);
    let weights = Checkpoint::open_file(&weights_path).map_err(|e| AdapterError::invalid(&weights_path, e.to_string()))?;

    let mut used = BTreeSet::new();
    let mut first_error = None;
    let lora = model.map_projections(|name, linear| {
        if !config.targets(name) || first_error.is_some() {
            return LoraLinear::new(name, linear, None);
        }
        let mut load = |part: &str, shape: [usize; 2]| {
            let k = key(name, part);
            used.insert(k.clone());
            weights.float(&k, shape, LoadDtype::F32, device).map_err(|e| AdapterError::invalid(&weights_path, e.to_string()))
        };
        let a = load("lora_A", [config.r, linear.in_features()]);
        let b = load("lora_B", [linear.out_features(), config.r]);
        match (a, b) {
            (Ok(a), Ok(b)) => {
                let branch = LoraBranch::from_tensors(a, b, config.scale(), config.dropout);
                LoraLinear::new(name, linear, Some(branch))
            }
            (Err(e), _) | (_, Err(e)) => {
                first_error = Some(e);
                LoraLinear::new(name, linear, None)
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(extra) = weights.keys().find(|k| !used.contains(*k)) {
        return Err(AdapterError::invalid(
            &weights_path,
            format!("tensor '{extra}' belongs to no module this config targets in the base model"),
        ));
    }
    if used.is_empty() {
        return Err(AdapterError::invalid(&config_path, format!("target_modules {} match no module of the base model", config.target)));
    }
    Ok((lora, config))
}

/// Reads `dir/adapter_config.json`.
pub fn read_peft_config(dir: &Path) -> Result<LoraConfig, AdapterError> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| AdapterError::Io { path: path.clone(), source: e })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| AdapterError::invalid(&path, format!("invalid JSON: {e}")))?;
    parse_config(&json).map_err(|reason| AdapterError::invalid(&path, reason))
}

/// Tensor names of one saved branch.
#[derive(Debug, Clone)]
pub struct BranchKeys {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub lora_a: String,
    pub lora_b: String,
}

/// The adapter's weights file and the tensor names of every branch in it.
pub fn peft_branches(dir: &Path) -> Result<(Checkpoint, Vec<BranchKeys>), AdapterError> {
    let path = dir.join(WEIGHTS);
    let weights = Checkpoint::open_file(&path).map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
    let mut branches = Vec::new();
    for k in weights.keys() {
        if let Some(module) = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".lora_A.weight")) {
            let b = key(module, "lora_B");
            if !weights.contains(&b) {
                return Err(AdapterError::invalid(&path, format!("'{k}' has no matching '{b}'")));
            }
            branches.push(BranchKeys { module: module.to_owned(), lora_a: k.to_owned(), lora_b: b });
        } else if !k.ends_with(".lora_B.weight") {
            return Err(AdapterError::invalid(&path, format!("unexpected tensor '{k}' in a LoRA adapter")));
        }
    }
    Ok((weights, branches))
}

/// PEFT's LoRA config, refusing the options whose math ember does not implement.
fn parse_config(json: &Value) -> Result<LoraConfig, String> {
    let get = |k: &str| json.get(k).filter(|v| !v.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return Err(format!("peft_type {other:?} is not LORA")),
    }
    let unsupported = |k: &str, reason: &str| Err(format!("'{k}': {reason} is not supported"));
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return unsupported("use_dora", "DoRA");
    }
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
    let target = match get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Target::AllLinear,
        Some(Value::String(s)) => Target::Regex(Regex::new(s).map_err(|e| format!("'target_modules' regex: {e}"))?),
        Some(Value::Array(items)) => Target::Suffixes(
            items.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<_>>().ok_or("'target_modules' must list strings")?,
        ),
        _ => return Err("'target_modules' must be a list, a regex or \"all-linear\"".into()),
    };
    let layers_to_transform = match get("layers_to_transform") {
        None => None,
        Some(Value::Array(items)) => {
            Some(items.iter().map(|v| v.as_u64().map(|n| n as usize)).collect::<Option<_>>().ok_or("'layers_to_transform' must list layer indices")?)
        }
        Some(v) => Some(vec![v.as_u64().ok_or("'layers_to_transform' must be a layer index or a list")? as usize]),
    };
    Ok(LoraConfig {
        r,
        alpha,
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target,
        layers_to_transform,
    })
}
