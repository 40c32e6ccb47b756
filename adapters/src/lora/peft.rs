//! PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `…lora_B.weight` `[out, r]`. DoRA
//! shares it (`use_dora: true` plus `…lora_magnitude_vector` `[out]`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::tensor::{Device, Tensor};
use ember_models::config::Architecture;
use ember_models::family::{KeyLayout, ProjectionSpec};
use ember_models::layers::Linear;
use ember_models::{BaseModel, Checkpoint, LoadDtype, ModelConfig, VocabModule};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BiasTraining, LoraBranch, LoraConfig, LoraInit};
use crate::method::{AdapterFolder, PEFT_VERSION};
use crate::registry::ProjectionAdapter;
use crate::target::{Exclude, Patterns, Target, layers_from_peft};
use crate::vocab::{EmbeddingBranch, TrainableTokens, VocabBranches, token_rows};
use crate::{AdaptedLinear, AdaptedModel, AdapterError, SavedTensor, save_adapter_dir};

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
        "exclude_modules": config.exclude.to_peft(),
        "layers_to_transform": config.layers_to_transform,
        "bias": config.bias.peft_name(),
        "lora_bias": config.lora_bias,
        "trainable_token_indices": config.trainable_token_indices,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": config.init.to_peft(),
        "modules_to_save": (!config.modules_to_save.is_empty()).then_some(&config.modules_to_save),
        "use_dora": use_dora,
        "rank_pattern": config.rank_pattern.to_json(),
        "alpha_pattern": config.alpha_pattern.to_json(),
        "revision": null,
        "peft_version": PEFT_VERSION,
    });
    save_adapter_dir(dir, AdapterFolder::PEFT_WEIGHTS, tensors, &[(AdapterFolder::PEFT_CONFIG, &adapter_config)])
}

/// PEFT's key of a projection's trained bias: under `base_layer` where the projection carries
/// a branch (PEFT's wrapper holds the base layer there), under the module's own name elsewhere.
pub fn bias_key(module: &str, branched: bool) -> String {
    if branched { format!("base_model.model.{module}.base_layer.bias") } else { format!("base_model.model.{module}.bias") }
}

/// PEFT's key of the bias on a branch's B (`lora_bias`).
pub fn lora_bias_key(module: &str) -> String {
    format!("base_model.model.{module}.lora_B.bias")
}

/// `model` with the base biases `config.bias` trains made trainable f32 parameters, each
/// starting at `value(PEFT key, the base's bias)`: the base's own at init, the adapter's on load.
pub(crate) fn train_biases(
    config: &LoraConfig,
    mut model: AdaptedModel,
    mut value: impl FnMut(&str, Tensor<1>) -> Result<Tensor<1>, AdapterError>,
) -> Result<AdaptedModel, AdapterError> {
    if config.bias == BiasTraining::None {
        return Ok(model);
    }
    let mut first_error = None;
    model.model = model.model.map_projections(|name, mut p: AdaptedLinear| {
        let branched = p.branch.is_some();
        if let Some(bias) = p.base.bias.as_ref().filter(|_| first_error.is_none() && config.bias.trains(branched)) {
            match value(&bias_key(name, branched), bias.val()) {
                Ok(start) => p.train_bias(start),
                Err(e) => first_error = Some(e),
            }
        }
        p
    });
    first_error.map_or(Ok(model), Err)
}

/// The biases that train in `model` (the base's under `bias`, B's under `lora_bias`), with their
/// PEFT keys and parameter ids.
pub(crate) fn bias_parameters(model: &AdaptedModel) -> Vec<(String, ParamId, Tensor<1>)> {
    let mut biases = Vec::new();
    for (name, p) in model.model.projections() {
        if let Some(bias) = p.trained_bias() {
            biases.push((bias_key(&name, p.branch.is_some()), bias.id, bias.val()));
        }
        if let Some(ProjectionAdapter::Lora(branch)) = &p.branch
            && let Some(bias) = &branch.lora_b_bias
        {
            biases.push((lora_bias_key(&name), bias.id, bias.val()));
        }
    }
    biases
}

/// The bias values `config` trains on projection `p`: its base bias, and B's.
fn trained_bias_values(config: &LoraConfig, p: &ProjectionSpec) -> usize {
    let branched = config.targets(&p.name);
    let base = if p.bias && config.bias.trains(branched) { p.shape[0] } else { 0 };
    base + if config.lora_bias && branched { p.shape[0] } else { 0 }
}

/// The number of bias values `config` trains on a model of `model`'s config.
pub(crate) fn bias_parameter_count(config: &LoraConfig, model: &ModelConfig) -> usize {
    let keys = KeyLayout::of(model.architecture);
    (0..model.num_layers).flat_map(|layer| keys.projections(model, layer)).map(|p| trained_bias_values(config, &p)).sum()
}

/// Whether `config` trains a bias of `model`'s layer `layer`.
pub(crate) fn trains_bias_in_layer(config: &LoraConfig, model: &ModelConfig, layer: usize) -> bool {
    KeyLayout::of(model.architecture).projections(model, layer).iter().any(|p| trained_bias_values(config, p) > 0)
}

/// PEFT's key of a module trained in full: `base_model.model.<module>.weight` (its
/// `modules_to_save.default` copy, saved under the module's own name).
pub fn whole_key(module: &str) -> String {
    format!("base_model.model.{module}.weight")
}

/// The modules `config.modules_to_save` names in `model`.
pub(crate) fn whole_modules(config: &LoraConfig, model: &ModelConfig) -> Result<Vec<VocabModule>, String> {
    config
        .modules_to_save
        .iter()
        .map(|name| {
            let module = VocabModule::named(name, model).ok_or_else(|| {
                format!(
                    "'modules_to_save': '{name}' is neither the embedding ({}) nor the LM head ({}); those are the modules ember trains in full",
                    VocabModule::Embedding.hf_name(model),
                    VocabModule::LmHead.hf_name(model)
                )
            })?;
            if module == VocabModule::LmHead && model.tie_word_embeddings {
                return Err(format!("'modules_to_save': '{name}' is tied to the embedding in this model; list the embedding alone"));
            }
            Ok(module)
        })
        .collect()
}

/// `base` with `config`'s whole modules trainable, starting from the base's own weights.
pub(crate) fn train_whole_modules(config: &LoraConfig, mut base: BaseModel) -> Result<BaseModel, AdapterError> {
    for module in whole_modules(config, &base.config).map_err(AdapterError::Config)? {
        let weight = base.vocab_weight(module).expect("an untied LM head is dense").val();
        base = base.train_whole(module, weight).map_err(AdapterError::Config)?;
    }
    Ok(base)
}

/// The whole modules of `model` with their PEFT keys and parameter ids.
pub(crate) fn whole_parameters(config: &LoraConfig, model: &AdaptedModel) -> Vec<(String, ParamId, Tensor<2>)> {
    let modules = whole_modules(config, model.config()).unwrap_or_default();
    modules
        .into_iter()
        .filter_map(|m| {
            let param = model.model.vocab_weight(m)?;
            Some((whole_key(m.hf_name(model.config())), param.id, param.val()))
        })
        .collect()
}

/// The LoRA tensors of one branch, keyed as PEFT saves them.
pub(crate) fn branch_tensors(module: &str, branch: &LoraBranch) -> [SavedTensor; 2] {
    let (a, b) = branch.saved_factors();
    [SavedTensor::new(key(module, "lora_A"), a), SavedTensor::new(key(module, "lora_B"), b)]
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
    // Modules trained in full replace the base's (growing its vocabulary to theirs).
    let mut base = base;
    for module in whole_modules(config, &base.config).map_err(|e| folder.invalid(e))? {
        let k = whole_key(module.hf_name(&base.config));
        let (shape, _) = weights.info(&k).ok_or_else(|| AdapterError::invalid(&weights_path, format!("modules_to_save: no tensor '{k}'")))?;
        let [rows, cols] = shape[..] else { return Err(AdapterError::invalid(&weights_path, format!("'{k}' has shape {shape:?}, expected [vocab, hidden]"))) };
        let weight = weights.float::<2>(&k, [rows, cols], LoadDtype::F32, device).map_err(read_error)?;
        base = base.train_whole(module, weight).map_err(|e| AdapterError::invalid(&weights_path, e))?;
        used.borrow_mut().insert(k);
    }
    check_vocab_modules(config, &base.config).map_err(|e| folder.invalid(e))?;
    // PEFT saves the base weight of an embedding or head it puts a branch on (`base_layer`), and
    // loads it over the base's: the same weights, or those of the vocabulary it was resized to.
    for module in vocab_modules(config, &base.config) {
        let k = format!("base_model.model.{}.base_layer.weight", module.hf_name(&base.config));
        let Some((shape, _)) = weights.info(&k) else { continue };
        let [rows, cols] = shape[..] else { return Err(AdapterError::invalid(&weights_path, format!("'{k}' has shape {shape:?}, expected [vocab, hidden]"))) };
        // A tied head's weight is the embedding's.
        let module = if base.config.tie_word_embeddings { VocabModule::Embedding } else { module };
        let dtype = base.vocab_weight(module).map_or(burn::tensor::DType::F32, |w| w.val().dtype());
        let weight = weights.float::<2>(&k, [rows, cols], LoadDtype::F32, device).map_err(read_error)?.cast(dtype);
        base = base.replace_vocab_weight(module, weight).map_err(|e| AdapterError::invalid(&weights_path, e))?;
        used.borrow_mut().insert(k);
    }
    let vocab_only = !vocab_modules(config, &base.config).is_empty() && super::targeted_shapes(&base.config, config).is_empty();
    let model = if vocab_only {
        AdaptedModel::base_only(base)
    } else {
        AdaptedModel::with_branches(
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
                let r = config.rank_of(name);
                let a = matrix("lora_A", [r, linear.in_features()])?;
                let b = matrix("lora_B", [linear.out_features(), r])?;
                let vector = |part: &str, len: usize| {
                    // PEFT drops the `.weight` of the magnitude vector in the file.
                    let k = format!("base_model.model.{name}.{part}");
                    used.borrow_mut().insert(k.clone());
                    weights.float::<1>(&k, [len], LoadDtype::F32, device).map_err(read_error)
                };
                let branch = LoraBranch::from_tensors(a, b, config.scale_of(name), config.dropout);
                let branch = if config.lora_bias { branch.with_bias(vector("lora_B.bias", linear.out_features())?) } else { branch };
                make(name, linear, branch, &vector).map(Some)
            },
            || folder.invalid(format!("target_modules {} match no module of the base model", config.target)),
        )?
    };
    let model = match load_vocab_branches(config, model.config(), |k, shape| {
        used.borrow_mut().insert(k.to_owned());
        weights.float::<2>(k, shape, LoadDtype::F32, device).map_err(read_error)
    })? {
        Some(vocab) => model.with_vocab_branches(vocab),
        None => model,
    };
    let model = train_biases(config, model, |k, base| {
        used.borrow_mut().insert(k.to_owned());
        weights.float::<1>(k, [base.dims()[0]], LoadDtype::F32, device).map_err(read_error)
    })?;
    if let Some(extra) = weights.keys().find(|k| !used.borrow().contains(*k)) {
        return Err(AdapterError::invalid(&weights_path, format!("tensor '{extra}' belongs to no module this config targets in the base model")));
    }
    Ok(model)
}

/// The branches on the embedding and LM head `config` targets, read by `matrix(key, shape)`.
fn load_vocab_branches(
    config: &LoraConfig,
    model: &ModelConfig,
    matrix: impl Fn(&str, [usize; 2]) -> Result<Tensor<2>, AdapterError>,
) -> Result<Option<VocabBranches>, AdapterError> {
    let modules = vocab_modules(config, model);
    if modules.is_empty() && config.trainable_token_indices.is_none() {
        return Ok(None);
    }
    let (vocab, hidden) = (model.vocab_size, model.hidden_size);
    let tokens = match &config.trainable_token_indices {
        Some(indices) => {
            let values = matrix(&tokens_key(VocabModule::Embedding.hf_name(model)), [indices.len(), hidden])?;
            Some(TrainableTokens::new(values, indices.clone(), model.tie_word_embeddings))
        }
        None => None,
    };
    let embedding = if modules.contains(&VocabModule::Embedding) {
        let name = VocabModule::Embedding.hf_name(model);
        let r = config.rank_of(name);
        Some(EmbeddingBranch::from_tensors(matrix(&embedding_key(name, "A"), [r, vocab])?, matrix(&embedding_key(name, "B"), [hidden, r])?, config.scale_of(name)))
    } else {
        None
    };
    let head = if modules.contains(&VocabModule::LmHead) {
        let name = VocabModule::LmHead.hf_name(model);
        let r = config.rank_of(name);
        let (a, b) = (matrix(&key(name, "lora_A"), [r, hidden])?, matrix(&key(name, "lora_B"), [vocab, r])?);
        Some(LoraBranch::from_tensors(a, b, config.scale_of(name), config.dropout))
    } else {
        None
    };
    Ok(Some(VocabBranches { embedding, head, tokens }))
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
    let bias = match get("bias") {
        None | Some(Value::Null) => BiasTraining::None,
        Some(value) => value.as_str().and_then(BiasTraining::from_peft).ok_or_else(|| format!("'bias': {value} is not one of \"none\", \"all\", \"lora_only\""))?,
    };
    // LoRA variants whose forward differs from `x Wᵀ + s·x Aᵀ Bᵀ` (aLoRA's invocation-gated
    // branch, QALoRA's pooled input, Arrow's routing, MonteCLoRA, BD-LoRA, KaSA) or that reshape
    // the model: refused rather than run as plain LoRA.
    let variants = ["layer_replication", "target_parameters", "alora_invocation_tokens", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config"];
    for k in variants {
        if get(k).is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())) {
            return unsupported(k, "a non-empty value");
        }
    }
    if get("use_qalora").and_then(Value::as_bool) == Some(true) {
        return unsupported("use_qalora", "QALoRA's pooled input");
    }
    let modules_to_save = match get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(names)) => names.iter().map(|n| n.as_str().map(str::to_string).ok_or("'modules_to_save' must list module names")).collect::<Result<_, _>>()?,
        Some(_) => return Err("'modules_to_save' must be a list of module names".into()),
    };
    let target = Target::from_peft(get("target_modules"), "target_modules")?;
    let r = get("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or("'r' must be a positive integer")? as usize;
    let patterns = PatternMaps::read(&folder.config_path)?;
    let rank_pattern = patterns.rank_pattern.map(|p| p.values("rank_pattern", |v| v.as_u64().filter(|&r| r > 0).map(|r| r as usize))).transpose()?;
    let alpha_pattern = patterns.alpha_pattern.map(|p| p.values("alpha_pattern", Value::as_f64)).transpose()?;
    let alpha = get("lora_alpha").and_then(Value::as_f64).ok_or("'lora_alpha' must be a number")?;
    Ok(LoraConfig {
        r,
        alpha,
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target,
        exclude: Exclude::from_peft(get("exclude_modules"))?,
        layers_to_transform: layers_from_peft(get("layers_to_transform"))?,
        modules_to_save,
        rank_pattern: Patterns::new(rank_pattern.unwrap_or_default(), "rank_pattern")?,
        alpha_pattern: Patterns::new(alpha_pattern.unwrap_or_default(), "alpha_pattern")?,
        bias,
        lora_bias: get("lora_bias").and_then(Value::as_bool).unwrap_or(false),
        trainable_token_indices: trainable_token_indices(get("trainable_token_indices"))?,
        init: LoraInit::from_peft(get("init_lora_weights"))?,
    })
}

/// PEFT's `trainable_token_indices`: a list (rows of the input embedding), or a map from module
/// name to list of which ember trains the embedding's alone.
fn trainable_token_indices(value: Option<&Value>) -> Result<Option<Vec<usize>>, String> {
    let key = "trainable_token_indices";
    let list = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(Value::Object(map)) => {
            let embeddings: Vec<&str> = [Architecture::Llama, Architecture::Glm, Architecture::ChatGlm].into_iter().map(|a| KeyLayout::of(a).embed).collect();
            let is_embedding = |name: &str| embeddings.iter().any(|full| *full == name || full.ends_with(&format!(".{name}")));
            match map.iter().collect::<Vec<_>>()[..] {
                [(name, Value::Array(list))] if is_embedding(name) => list,
                _ => return Err(format!("'{key}': tokens of modules other than the input embedding are not supported ({value:?})")),
            }
        }
        Some(other) => return Err(format!("'{key}' must be a list of token ids, found {other}")),
    };
    let ids: Option<Vec<usize>> = list.iter().map(|v| v.as_u64().map(|id| id as usize)).collect();
    ids.map(|ids| (!ids.is_empty()).then_some(ids)).ok_or_else(|| format!("'{key}' must be a list of token ids"))
}

/// PEFT's key of the trained rows of `embedding` (`[n, hidden]`).
pub fn tokens_key(embedding: &str) -> String {
    format!("base_model.model.{embedding}.token_adapter.trainable_tokens_delta")
}

/// Fresh trainable tokens: the embedding's own rows.
fn init_trainable_tokens(config: &LoraConfig, base: &BaseModel) -> Option<TrainableTokens> {
    let indices = config.trainable_token_indices.clone()?;
    let weight = base.vocab_weight(VocabModule::Embedding).expect("an embedding").val();
    let rows = token_rows(&indices, &weight.device());
    Some(TrainableTokens::new(weight.select(0, rows).cast(burn::tensor::DType::F32), indices, base.config.tie_word_embeddings))
}

/// The embedding and LM head `config` puts a LoRA branch on (PEFT's `lora.Embedding`, and a
/// `lora.Linear` on the head): named in `target_modules` (`all-linear` never takes them, and
/// `layers_to_transform` keeps to decoder layers).
pub fn vocab_modules(config: &LoraConfig, model: &ModelConfig) -> Vec<VocabModule> {
    if matches!(config.target, Target::AllLinear) {
        return Vec::new();
    }
    [VocabModule::Embedding, VocabModule::LmHead].into_iter().filter(|m| config.targets(m.hf_name(model))).collect()
}

/// The embedding or LM head of any family that `config` puts a branch on, for a reader that does
/// not know the model's family (a DoRA adapter's merge, `gguf-lora`).
pub fn any_vocab_module(config: &LoraConfig) -> Option<&'static str> {
    if matches!(config.target, Target::AllLinear) {
        return None;
    }
    [Architecture::Llama, Architecture::Glm, Architecture::ChatGlm]
        .into_iter()
        .map(KeyLayout::of)
        .flat_map(|keys| [keys.embed, keys.lm_head])
        .find(|name| config.targets(name))
}

/// Refuses a branch on a module `modules_to_save` trains in full as well, B's bias on the
/// embedding's or head's branch, and trainable tokens beside another way of training the
/// embedding or outside the vocabulary. (On a model whose head is tied to its embedding, branches on
/// either train as PEFT's do, and a merge changes the one weight, as PEFT's merge does.)
pub(crate) fn check_vocab_modules(config: &LoraConfig, model: &ModelConfig) -> Result<(), String> {
    let modules = vocab_modules(config, model);
    let whole = whole_modules(config, model)?;
    for module in modules {
        let name = module.hf_name(model);
        if whole.contains(&module) {
            return Err(format!("'{name}' is both a LoRA target and in modules_to_save"));
        }
        if config.lora_bias {
            return Err(format!("'lora_bias' with a branch on '{name}' (the embedding or the LM head) is not supported"));
        }
    }
    if let Some(indices) = &config.trainable_token_indices {
        let embedding = VocabModule::Embedding.hf_name(model);
        if whole.contains(&VocabModule::Embedding) || config.targets(embedding) {
            return Err(format!("'trainable_token_indices' with '{embedding}' also a LoRA target or in modules_to_save"));
        }
        if let Some(id) = indices.iter().find(|&&id| id >= model.vocab_size) {
            return Err(format!("'trainable_token_indices': token {id} is outside the vocabulary of {} ids", model.vocab_size));
        }
        if (1..indices.len()).any(|i| indices[..i].contains(&indices[i])) {
            return Err("'trainable_token_indices' lists a token twice".into());
        }
    }
    Ok(())
}

/// PEFT's keys of the embedding's branch: `base_model.model.<embedding>.lora_embedding_A`
/// `[r, vocab]` and `…_B` `[hidden, r]` (no `.weight`).
pub fn embedding_key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.lora_embedding_{part}")
}

/// The tensors of the branches on the embedding and LM head, keyed as PEFT saves them.
pub(crate) fn vocab_tensors(model: &AdaptedModel) -> Vec<SavedTensor> {
    let mut tensors = Vec::new();
    let Some(vocab) = &model.vocab else { return tensors };
    if let Some(e) = &vocab.embedding {
        let module = VocabModule::Embedding.hf_name(model.config());
        tensors.push(SavedTensor::new(embedding_key(module, "A"), e.lora_a.val()));
        tensors.push(SavedTensor::new(embedding_key(module, "B"), e.lora_b.val()));
    }
    if let Some(head) = &vocab.head {
        tensors.extend(branch_tensors(VocabModule::LmHead.hf_name(model.config()), head));
    }
    if let Some(tokens) = &vocab.tokens {
        tensors.push(SavedTensor::new(tokens_key(VocabModule::Embedding.hf_name(model.config())), tokens.values.val()));
    }
    tensors
}

/// The parameter ids of those branches under their PEFT keys.
pub(crate) fn vocab_parameter_names(model: &AdaptedModel) -> Vec<(ParamId, String)> {
    let mut names = Vec::new();
    let Some(vocab) = &model.vocab else { return names };
    if let Some(e) = &vocab.embedding {
        let module = VocabModule::Embedding.hf_name(model.config());
        names.push((e.lora_a.id, embedding_key(module, "A")));
        names.push((e.lora_b.id, embedding_key(module, "B")));
    }
    if let Some(head) = &vocab.head {
        let module = VocabModule::LmHead.hf_name(model.config());
        names.push((head.lora_a.id, key(module, "lora_A")));
        names.push((head.lora_b.id, key(module, "lora_B")));
    }
    if let Some(tokens) = &vocab.tokens {
        names.push((tokens.values.id, tokens_key(VocabModule::Embedding.hf_name(model.config()))));
    }
    names
}

/// Fresh branches on the modules `config` targets among the embedding and LM head, and its
/// trainable tokens, or `None`.
pub(crate) fn init_vocab_branches(config: &LoraConfig, base: &BaseModel, rng: &mut rand::rngs::StdRng, device: &Device) -> Option<VocabBranches> {
    let model = &base.config;
    let modules = vocab_modules(config, model);
    let tokens = init_trainable_tokens(config, base);
    if modules.is_empty() && tokens.is_none() {
        return None;
    }
    let (vocab, hidden) = (model.vocab_size, model.hidden_size);
    let embedding = modules.contains(&VocabModule::Embedding).then(|| {
        let name = VocabModule::Embedding.hf_name(model);
        EmbeddingBranch::init(vocab, hidden, config.rank_of(name), config.scale_of(name), rng, device)
    });
    let head = modules.contains(&VocabModule::LmHead).then(|| {
        LoraBranch::init_for([vocab, hidden], VocabModule::LmHead.hf_name(model), config, rng, device)
    });
    Some(VocabBranches { embedding, head, tokens })
}

/// adapter_config.json's `rank_pattern` and `alpha_pattern` with their entries in the file's
/// order, which is the order PEFT tries them in (a parsed `Value` keeps maps sorted by key).
#[derive(Deserialize)]
struct PatternMaps {
    #[serde(default)]
    rank_pattern: Option<InFileOrder>,
    #[serde(default)]
    alpha_pattern: Option<InFileOrder>,
}

impl PatternMaps {
    fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| format!("'rank_pattern' / 'alpha_pattern': {e}"))
    }
}

/// A JSON object's entries in the order the file has them.
struct InFileOrder(Vec<(String, Value)>);

impl InFileOrder {
    /// Each entry's value as `value` reads it; `key` names the map in errors.
    fn values<T>(self, key: &str, value: impl Fn(&Value) -> Option<T>) -> Result<Vec<(String, T)>, String> {
        self.0
            .into_iter()
            .map(|(pattern, v)| value(&v).map(|v| (pattern.clone(), v)).ok_or(format!("'{key}': '{pattern}' has {v}, expected a positive number")))
            .collect()
    }
}

impl<'de> Deserialize<'de> for InFileOrder {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = InFileOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of patterns")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<InFileOrder, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(InFileOrder(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// A LoRA (or DoRA) adapter's branches as `ember merge` streams them: per adapted weight key,
/// its module name.
pub struct PeftBranches {
    pub weights: Checkpoint,
    pub path: PathBuf,
    pub config: LoraConfig,
    /// `<module>.weight` -> module
    pub modules: HashMap<String, String>,
    /// `<module>.weight` of each module trained in full -> its shape in the adapter
    pub whole: HashMap<String, Vec<usize>>,
    /// `<embedding>.weight` -> the embedding module, when it has a branch (`lora_embedding_A/B`)
    pub embeddings: HashMap<String, String>,
    /// `<module>.weight` of each `base_layer` weight PEFT saved beside an embedding's or head's
    /// branch -> its shape: the weight the branch adds to.
    pub base_layers: HashMap<String, Vec<usize>>,
    /// On a model whose LM head is its embedding: the embedding's `<module>.weight` and the head
    /// module whose branch merges into it ([`Self::tie_head`]).
    pub tied_head: Option<(String, String)>,
    /// `<module>.bias` -> the adapter's key of its trained value (PEFT's `bias`)
    pub biases: HashMap<String, String>,
    /// `<module>.bias` -> the module whose B has a bias (`lora_bias`), added scaled
    pub lora_biases: HashMap<String, String>,
    /// The embedding's `<module>.weight` and the adapter's key of its trained rows
    /// (`trainable_token_indices`)
    pub tokens: Option<(String, String)>,
}

impl PeftBranches {
    /// Every `…lora_A.weight` of the file with its `…lora_B.weight`; `extra` names the other
    /// per-module tensors the variant has (DoRA's `lora_magnitude_vector`).
    pub fn read(folder: &AdapterFolder, extra: &[&str]) -> Result<Self, AdapterError> {
        let config = read_config(folder)?;
        let (weights, path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
        let mut modules = HashMap::new();
        let mut whole = HashMap::new();
        let mut embeddings = HashMap::new();
        let mut base_layers = HashMap::new();
        let (mut biases, mut lora_biases, mut tokens) = (HashMap::new(), HashMap::new(), None);
        let saved = |module: &str| config.modules_to_save.iter().any(|name| module == name || module.ends_with(&format!(".{name}")));
        for k in weights.keys() {
            let whole_module = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".weight")).filter(|m| saved(m));
            let embedding = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".lora_embedding_A"));
            let base_layer = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".base_layer.weight"));
            let bias = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".bias"));
            let trained_rows = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".token_adapter.trainable_tokens_delta"));
            if let Some(module) = trained_rows {
                if config.trainable_token_indices.is_none() {
                    return Err(AdapterError::invalid(&path, format!("'{k}' without 'trainable_token_indices' in adapter_config.json")));
                }
                tokens = Some((format!("{module}.weight"), k.to_owned()));
            } else if let Some(module) = bias.and_then(|m| m.strip_suffix(".lora_B")) {
                lora_biases.insert(format!("{module}.bias"), module.to_owned());
            } else if let Some(module) = bias {
                biases.insert(format!("{}.bias", module.trim_end_matches(".base_layer")), k.to_owned());
            } else if let Some(module) = base_layer {
                base_layers.insert(format!("{module}.weight"), weights.info(k).expect("listed").0.to_vec());
            } else if let Some(module) = whole_module {
                whole.insert(format!("{module}.weight"), weights.info(k).expect("listed").0.to_vec());
            } else if let Some(module) = embedding {
                let b = embedding_key(module, "B");
                if !weights.contains(&b) {
                    return Err(AdapterError::invalid(&path, format!("'{k}' has no matching '{b}'")));
                }
                embeddings.insert(format!("{module}.weight"), module.to_owned());
            } else if let Some(module) = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".lora_A.weight")) {
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
            } else if !k.ends_with(".lora_B.weight") && !k.ends_with(".lora_embedding_B") && !extra.iter().any(|part| k.ends_with(&format!(".{part}"))) {
                return Err(AdapterError::invalid(&path, format!("unexpected tensor '{k}' in a LoRA adapter")));
            }
        }
        for module in base_layers.keys() {
            if !modules.contains_key(module) && !embeddings.contains_key(module) {
                return Err(AdapterError::invalid(&path, format!("'base_model.model.{}.base_layer.weight' belongs to no branch of the adapter", module.trim_end_matches(".weight"))));
            }
        }
        if let Some(module) = lora_biases.values().find(|m| !modules.contains_key(&format!("{m}.weight"))) {
            return Err(AdapterError::invalid(&path, format!("'{}' belongs to no branch of the adapter", lora_bias_key(module))));
        }
        if tokens.is_none() && config.trainable_token_indices.is_some() {
            return Err(AdapterError::invalid(&path, "no '…token_adapter.trainable_tokens_delta' for the config's 'trainable_token_indices'"));
        }
        Ok(Self { weights, path, config, modules, whole, embeddings, base_layers, tied_head: None, biases, lora_biases, tokens })
    }

    /// On a model of `model`'s config whose LM head is its embedding (tied), a branch on the head
    /// changes that one weight, as PEFT's merge does: its delta goes onto the embedding's key. The
    /// head's `base_layer` PEFT saved is that same weight.
    pub fn tie_head(&mut self, model: &ModelConfig) {
        if !model.tie_word_embeddings {
            return;
        }
        let head = format!("{}.weight", VocabModule::LmHead.hf_name(model));
        self.base_layers.remove(&head);
        if let Some(module) = self.modules.remove(&head) {
            self.tied_head = Some((format!("{}.weight", VocabModule::Embedding.hf_name(model)), module));
        }
    }

    /// Every base key the merge writes: adapted weights, modules trained in full and biases.
    pub fn keys(&self) -> Vec<String> {
        let tied = self.tied_head.iter().map(|(key, _)| key);
        let biases = self.biases.keys().chain(self.lora_biases.keys());
        let tokens = self.tokens.iter().map(|(key, _)| key);
        let mut keys: Vec<String> =
            self.modules.keys().chain(self.whole.keys()).chain(self.embeddings.keys()).chain(tied).chain(biases).chain(tokens).cloned().collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// `base` (the embedding's `key`, `[vocab, hidden]` f32) with the trained tokens' rows, where
    /// the adapter trains some.
    pub fn with_trained_tokens(&self, key: &str, base: Tensor<2>, device: &Device) -> Tensor<2> {
        let (Some((weight_key, adapter_key)), Some(indices)) = (&self.tokens, &self.config.trainable_token_indices) else { return base };
        if weight_key != key {
            return base;
        }
        let rows = token_rows(indices, device);
        let values = self.load(adapter_key, device);
        let shift = values - base.clone().select(0, rows.clone());
        base.select_assign(0, rows, shift, burn::tensor::IndexingUpdateOp::Add)
    }

    /// Whether the adapter changes the bias `key` (`<module>.bias`).
    pub fn changes_bias(&self, key: &str) -> bool {
        self.biases.contains_key(key) || self.lora_biases.contains_key(key)
    }

    /// The merged bias `key`, `[1, out]` f32: its trained value (or `base`'s) plus `s·b` of B's
    /// bias, as PEFT's merge adds it.
    pub fn merged_bias(&self, key: &str, base: Tensor<2>, device: &Device) -> Tensor<2> {
        let out = base.dims()[1];
        let vector = |k: &str| self.weights.float::<1>(k, [out], LoadDtype::F32, device).expect("checked").reshape([1, out]);
        let bias = self.biases.get(key).map_or(base, |k| vector(k));
        match self.lora_biases.get(key) {
            Some(module) => bias + vector(&lora_bias_key(module)).mul_scalar(self.config.scale_of(module)),
            None => bias,
        }
    }

    /// A module trained in full: its saved weight, `[vocab, hidden]` f32.
    pub fn whole_weight(&self, key: &str, device: &Device) -> Option<Tensor<2>> {
        let shape = self.whole.get(key)?;
        let module = key.strip_suffix(".weight").expect("whole keys end in .weight");
        Some(self.weights.float::<2>(&whole_key(module), [shape[0], shape[1]], LoadDtype::F32, device).expect("checked"))
    }

    /// The merged model's vocabulary when the adapter's modules grow it.
    pub fn vocab_size(&self) -> Option<usize> {
        self.whole.values().chain(self.base_layers.values()).map(|shape| shape[0]).max()
    }

    /// The `base_layer` weight saved for `key`, `[vocab, hidden]` f32: what the branch adds to
    /// in place of the base's.
    pub fn base_layer(&self, key: &str, device: &Device) -> Option<Tensor<2>> {
        self.base_layers.contains_key(key).then(|| self.load(&format!("base_model.model.{}", key.replace(".weight", ".base_layer.weight")), device))
    }

    /// Checks each branch against its base weight's `[out, in]`, and each module trained in
    /// full against the base's `[vocab, hidden]` (more rows: a grown vocabulary).
    pub fn check(&self, base: &Checkpoint) -> Result<(), AdapterError> {
        self.check_shapes(|key| base.info(key).map(|(shape, _)| shape.to_vec()))
    }

    /// [`Self::check`] against the base weights' shapes as `shape_of(HF key)` gives them.
    pub fn check_shapes(&self, shape_of: impl Fn(&str) -> Option<Vec<usize>>) -> Result<(), AdapterError> {
        for (weight_key, shape) in &self.whole {
            let Some(base_shape) = shape_of(weight_key) else {
                return Err(AdapterError::invalid(&self.path, format!("modules_to_save: '{weight_key}' is not in the base model")));
            };
            if shape.len() != 2 || shape[1] != base_shape[1] || shape[0] < base_shape[0] {
                return Err(AdapterError::invalid(&self.path, format!("modules_to_save: '{weight_key}' has shape {shape:?}, the base {base_shape:?}")));
            }
        }
        for (weight_key, shape) in &self.base_layers {
            let Some(base_shape) = shape_of(weight_key) else {
                return Err(AdapterError::invalid(&self.path, format!("'{weight_key}' (a base_layer weight) is not in the base model")));
            };
            if shape.len() != 2 || shape[1] != base_shape[1] || shape[0] < base_shape[0] {
                return Err(AdapterError::invalid(&self.path, format!("base_layer of '{weight_key}' has shape {shape:?}, the base {base_shape:?}")));
            }
        }
        if let (Some((weight_key, adapter_key)), Some(indices)) = (&self.tokens, &self.config.trainable_token_indices) {
            let base = shape_of(weight_key).ok_or_else(|| AdapterError::invalid(&self.path, format!("'{adapter_key}': the base has no '{weight_key}'")))?;
            let (shape, _) = self.weights.info(adapter_key).expect("listed");
            if shape != [indices.len(), base[1]] || indices.iter().any(|&id| id >= base[0]) {
                return Err(AdapterError::invalid(&self.path, format!("'{adapter_key}' has shape {shape:?}: it must hold the rows of tokens {indices:?} of '{weight_key}' {base:?}")));
            }
        }
        let bias_keys = self.biases.iter().map(|(bias, k)| (bias, k.clone())).chain(self.lora_biases.iter().map(|(bias, m)| (bias, lora_bias_key(m))));
        for (bias_key, adapter_key) in bias_keys {
            let (shape, _) = self.weights.info(&adapter_key).expect("listed");
            match shape_of(bias_key) {
                None => return Err(AdapterError::invalid(&self.path, format!("'{adapter_key}': the base has no '{bias_key}' to merge it into"))),
                Some(base) if base != shape => {
                    return Err(AdapterError::invalid(&self.path, format!("'{adapter_key}' has shape {shape:?}, the base's bias {base:?}")));
                }
                Some(_) => {}
            }
        }
        // A branch fits the weight it adds to: the saved base_layer where there is one.
        let shape_of = |key: &str| self.base_layers.get(key).cloned().or_else(|| shape_of(key));
        // An embedding's A is `[r, vocab]` and its B `[hidden, r]`, the transpose of a projection's.
        let embeddings = self.embeddings.iter().map(|(weight_key, module)| (weight_key, module, ["lora_embedding_A", "lora_embedding_B"], [embedding_key(module, "A"), embedding_key(module, "B")], true));
        let projections = self.modules.iter().chain(self.tied_head.iter().map(|(key, module)| (key, module)));
        let projections = projections.map(|(weight_key, module)| (weight_key, module, ["lora_A", "lora_B"], [key(module, "lora_A"), key(module, "lora_B")], false));
        for (weight_key, module, [a_name, b_name], [a_key, b_key], transposed) in embeddings.chain(projections) {
            let r = self.config.rank_of(module);
            let Some(shape) = shape_of(weight_key) else {
                return Err(AdapterError::invalid(&self.path, format!("adapter module '{module}' is not in the base model")));
            };
            let [out, inp] = if transposed { [shape[1], shape[0]] } else { [shape[0], shape[1]] };
            let (a_shape, _) = self.weights.info(&a_key).expect("listed");
            let (b_shape, _) = self.weights.info(&b_key).expect("listed");
            if a_shape != [r, inp] || b_shape != [out, r] {
                return Err(AdapterError::invalid(&self.path, format!("'{module}': {a_name} {a_shape:?} / {b_name} {b_shape:?} do not fit base weight {shape:?} with r={r}")));
            }
        }
        Ok(())
    }

    /// `s·B·A` of `module`, `[out, in]` f32 (shapes checked before).
    pub fn delta(&self, module: &str, device: &Device) -> Tensor<2> {
        self.load(&key(module, "lora_B"), device).matmul(self.load(&key(module, "lora_A"), device)).mul_scalar(self.config.scale_of(module))
    }

    /// `s·(B·A)ᵀ` of the embedding `module`, `[vocab, hidden]` f32 (shapes checked before).
    pub fn embedding_delta(&self, module: &str, device: &Device) -> Tensor<2> {
        let product = self.load(&embedding_key(module, "B"), device).matmul(self.load(&embedding_key(module, "A"), device));
        product.transpose().mul_scalar(self.config.scale_of(module))
    }

    fn load(&self, k: &str, device: &Device) -> Tensor<2> {
        let (shape, _) = self.weights.info(k).expect("checked");
        self.weights.float::<2>(k, [shape[0], shape[1]], LoadDtype::F32, device).expect("checked")
    }
}
