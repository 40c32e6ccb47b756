//! (IA)³ (Liu et al. 2022), PEFT's `IA3`: a learned vector rescales each targeted projection:
//! its output (`y = l ⊙ (W x + b)`, `l` `[out, 1]`) or, for feed-forward modules, its input
//! (`y = W (l ⊙ x) + b`, `l` `[1, in]`). PEFT starts `l` at 1, so the model starts at the base.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Tensor};
use ember_models::Projection;
use ember_models::fused::KeptActivations;
use ember_models::layers::{Linear, output_surrogate};
use ember_models::{BaseModel, Checkpoint, LoadDtype, ModelConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::method::{AdapterFolder, MethodConfig, PEFT_VERSION, PeftMethod, WeightMerge};
use crate::registry::{ProjectionAdapter, ProjectionBranch};
use crate::target::{Exclude, Target, TargetModules, projections};
use crate::{AdaptedModel, AdapterError, SavedTensor, save_adapter_dir};

#[derive(Debug, Clone)]
pub struct Ia3Config {
    pub target: Target,
    /// The targets whose input, not output, is scaled (a subset of `target`).
    pub feedforward: Target,
    /// Modules never scaled (PEFT `exclude_modules`).
    pub exclude: Exclude,
}

impl Ia3Config {
    /// `Some(feed-forward?)` for a targeted module.
    fn role(&self, name: &str) -> Option<bool> {
        (!self.exclude.excludes(name) && self.target.matches(name, None)).then(|| self.feedforward.matches(name, None))
    }

    /// (feed-forward?, `[out, in]`) of every targeted projection, from shapes alone.
    fn targeted_shapes(&self, model: &ModelConfig) -> Vec<(bool, [usize; 2])> {
        projections(model).into_iter().filter_map(|(name, shape, _)| self.role(&name).map(|ff| (ff, shape))).collect()
    }
}

impl fmt::Display for Ia3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(IA)³ on {} (feed-forward: {})", self.target, self.feedforward)
    }
}

/// The recipe's `[adapter]` keys of (IA)³.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ia3Section {
    /// Modules whose output (or, for feed-forward ones, input) is rescaled.
    pub target_modules: TargetModules,
    /// The targets scaled at their input.
    pub feedforward_modules: TargetModules,
    /// Modules never scaled, as a list of suffixes or a regex.
    pub exclude_modules: Option<TargetModules>,
}

impl Default for Ia3Section {
    /// PEFT's defaults for LLaMA.
    fn default() -> Self {
        Self {
            target_modules: TargetModules::List(vec!["k_proj".into(), "v_proj".into(), "down_proj".into()]),
            feedforward_modules: TargetModules::List(vec!["down_proj".into()]),
            exclude_modules: None,
        }
    }
}

/// One module's scale: `[out, 1]` on the output, or `[1, in]` on the input (feed-forward).
#[derive(Module, Debug)]
pub struct Ia3Vector {
    pub scale: Param<Tensor<2>>,
    pub feedforward: bool,
}

impl Ia3Vector {
    /// The scale as `[1, 1, width]`, f32.
    fn broadcast_scale(&self) -> Tensor<3> {
        let l = self.scale.val();
        let width = l.shape().num_elements();
        l.reshape([1, 1, width])
    }

    /// `x ⊙ l` of a feed-forward (input) scale, computed in f32.
    ///
    /// # Shapes
    /// - x, output: `[batch, seq, in]`
    fn scaled_input(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        (x.cast(DType::F32) * self.broadcast_scale()).cast(dtype)
    }
}

impl ProjectionBranch for Ia3Vector {
    fn forward(&self, base: &Linear, x: Tensor<3>) -> Tensor<3> {
        if self.feedforward {
            return base.forward(self.scaled_input(x));
        }
        let y = base.forward(x);
        let dtype = y.dtype();
        (y.cast(DType::F32) * self.broadcast_scale()).cast(dtype)
    }

    /// An input scale leaves the frozen product to the base's surrogate; an output scale needs
    /// the product itself for its own gradient.
    fn surrogate(&self, base: &Linear, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        if self.feedforward {
            return base.surrogate(self.scaled_input(x), grad);
        }
        output_surrogate(self.forward(base, x), grad)
    }

    /// `W ⊙ l` (rows for an output scale, columns for an input scale); an output scale also
    /// scales the bias.
    fn merged(self, base: Linear) -> Linear {
        let weight = base.dense_weight();
        let l = self.scale.val();
        let merged = (weight.clone().cast(DType::F32) * l.clone()).cast(weight.dtype());
        let bias = base.bias.map(|b| {
            let b = b.val();
            if self.feedforward { b } else { (b.clone().cast(DType::F32) * l.reshape([b.dims()[0]])).cast(b.dtype()) }
        });
        Linear::new(merged, bias)
    }

    fn leaves_base_unchanged(&self) -> bool {
        (self.scale.val() - 1.0).abs().max().into_scalar::<f32>() == 0.0
    }
}

/// `base_model.model.<module>.ia3_l`
fn key(module: &str) -> String {
    format!("base_model.model.{module}.ia3_l")
}

fn vector_shape(feedforward: bool, linear: &Linear) -> [usize; 2] {
    if feedforward { [1, linear.in_features()] } else { [linear.out_features(), 1] }
}

impl MethodConfig for Ia3Config {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn merges_into_weights(&self) -> bool {
        true
    }

    fn check(&self, model: &ModelConfig) -> Result<(), String> {
        if self.targeted_shapes(model).is_empty() {
            return Err(format!("target_modules {} match no module of this {} model", self.target, model.architecture.name()));
        }
        Ok(())
    }

    fn count_trainable(&self, model: &ModelConfig) -> usize {
        self.targeted_shapes(model).iter().map(|(ff, [out, inp])| if *ff { *inp } else { *out }).sum()
    }

    fn first_trainable_layer(&self, model: &ModelConfig) -> usize {
        projections(model).into_iter().find(|(name, _, _)| self.role(name).is_some()).map_or(0, |(_, _, layer)| layer)
    }

    /// The scaled side (input or output) is kept for the vector's gradient.
    fn activation_bytes_per_token(&self, model: &ModelConfig, kept: KeptActivations) -> f64 {
        self.targeted_shapes(model).iter().map(|(ff, [out, inp])| (kept.bytes * if *ff { *inp } else { *out }) as f64).sum()
    }

    fn init(&self, base: BaseModel, _seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        AdaptedModel::with_branches(
            base,
            |name, linear| {
                Ok(self.role(name).map(|feedforward| {
                    ProjectionAdapter::Ia3(Ia3Vector { scale: Param::from_tensor(Tensor::ones(vector_shape(feedforward, linear), device)), feedforward })
                }))
            },
            || AdapterError::Config(format!("ia3: target {} matches no module of the model", self.target)),
        )
    }

    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let (mut tensors, mut targets, mut feedforward) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
        for (name, branch) in model.branches() {
            if let ProjectionAdapter::Ia3(v) = branch {
                tensors.push(SavedTensor::new(key(&name), v.scale.val()));
                let short = name.rsplit('.').next().unwrap_or(&name).to_owned();
                if v.feedforward {
                    feedforward.insert(short.clone());
                }
                targets.insert(short);
            }
        }
        let config = json!({
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "target_modules": self.target.to_peft(&targets),
            "feedforward_modules": self.feedforward.to_peft(&feedforward),
            "exclude_modules": self.exclude.to_peft(),
            "fan_in_fan_out": false,
            "init_ia3_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "revision": null,
            "peft_version": PEFT_VERSION,
        });
        save_adapter_dir(dir, AdapterFolder::PEFT_WEIGHTS, &tensors, &[(AdapterFolder::PEFT_CONFIG, &config)])
    }

    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)> {
        model
            .branches()
            .into_iter()
            .filter_map(|(module, branch)| match branch {
                ProjectionAdapter::Ia3(v) => Some((v.scale.id, key(&module))),
                _ => None,
            })
            .collect()
    }
}

fn read_config(folder: &AdapterFolder) -> Result<Ia3Config, AdapterError> {
    let target = Target::from_peft(folder.get("target_modules"), "target_modules").map_err(|e| folder.invalid(e))?;
    let feedforward = match folder.get("feedforward_modules") {
        None => Target::Suffixes(Vec::new()),
        some => Target::from_peft(some, "feedforward_modules").map_err(|e| folder.invalid(e))?,
    };
    if folder.get("fan_in_fan_out").and_then(serde_json::Value::as_bool) == Some(true) {
        return Err(folder.invalid("'fan_in_fan_out': Conv1D (fan_in_fan_out) weights are not supported"));
    }
    let exclude = Exclude::from_peft(folder.get("exclude_modules")).map_err(|e| folder.invalid(e))?;
    Ok(Ia3Config { target, feedforward, exclude })
}

impl PeftMethod for Ia3Config {
    const NAME: &'static str = "ia3";
    type Section = Ia3Section;

    fn from_section(section: Ia3Section) -> Result<Self, String> {
        Ok(Ia3Config {
            target: Target::from_recipe(&section.target_modules)?,
            feedforward: Target::from_recipe(&section.feedforward_modules)?,
            exclude: Exclude::from_recipe(section.exclude_modules.as_ref())?,
        })
    }

    fn recognises(folder: &AdapterFolder) -> bool {
        folder.peft_type() == Some("IA3")
    }

    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError> {
        read_config(folder)
    }

    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError> {
        let config = read_config(folder)?;
        let (weights, path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
        let used = std::cell::RefCell::new(BTreeSet::new());
        let model = AdaptedModel::with_branches(
            base,
            |name, linear| {
                let Some(feedforward) = config.role(name) else { return Ok(None) };
                let k = key(name);
                used.borrow_mut().insert(k.clone());
                let scale = weights.float::<2>(&k, vector_shape(feedforward, linear), LoadDtype::F32, device).map_err(|e| AdapterError::invalid(&path, e.to_string()))?;
                Ok(Some(ProjectionAdapter::Ia3(Ia3Vector { scale: Param::from_tensor(scale), feedforward })))
            },
            || folder.invalid(format!("target_modules {} match no module of the base model", config.target)),
        )?;
        if let Some(extra) = weights.keys().find(|k| !used.borrow().contains(*k)) {
            return Err(AdapterError::invalid(&path, format!("tensor '{extra}' belongs to no module this config targets in the base model")));
        }
        Ok((model, config))
    }

    fn weight_merge(folder: &AdapterFolder, _model: &ModelConfig) -> Option<Result<Box<dyn WeightMerge>, AdapterError>> {
        let merge = || -> Result<Box<dyn WeightMerge>, AdapterError> {
            let config = read_config(folder)?;
            let (weights, path) = folder.weights(AdapterFolder::PEFT_WEIGHTS)?;
            let mut modules = Vec::new();
            for k in weights.keys() {
                let module = k.strip_prefix("base_model.model.").and_then(|m| m.strip_suffix(".ia3_l"))
                    .ok_or_else(|| AdapterError::invalid(&path, format!("unexpected tensor '{k}' in an IA3 adapter")))?;
                modules.push((module.to_owned(), config.feedforward.matches(module, None)));
            }
            Ok(Box::new(Ia3Merge { weights, path, modules }))
        };
        Some(merge())
    }
}

/// `W ⊙ l` per adapted module (and `l ⊙ b` for an output scale's bias).
struct Ia3Merge {
    weights: Checkpoint,
    path: std::path::PathBuf,
    /// (module, feed-forward?)
    modules: Vec<(String, bool)>,
}

impl Ia3Merge {
    fn find(&self, key: &str) -> Option<(&str, bool, bool)> {
        self.modules.iter().find_map(|(m, ff)| {
            if key == format!("{m}.weight") {
                Some((m.as_str(), *ff, false))
            } else if !ff && key == format!("{m}.bias") {
                Some((m.as_str(), *ff, true))
            } else {
                None
            }
        })
    }
}

impl WeightMerge for Ia3Merge {
    fn keys(&self) -> Vec<String> {
        self.modules.iter().flat_map(|(m, ff)| {
            let mut keys = vec![format!("{m}.weight")];
            if !ff {
                keys.push(format!("{m}.bias"));
            }
            keys
        }).collect()
    }

    fn check(&self, base: &Checkpoint) -> Result<(), AdapterError> {
        for (module, ff) in &self.modules {
            let Some((shape, _)) = base.info(&format!("{module}.weight")) else {
                return Err(AdapterError::invalid(&self.path, format!("adapter module '{module}' is not in the base model")));
            };
            let expected = if *ff { vec![1, shape[1]] } else { vec![shape[0], 1] };
            let (found, _) = self.weights.info(&key(module)).expect("listed");
            if found != expected.as_slice() {
                return Err(AdapterError::invalid(&self.path, format!("'{}' has shape {found:?}, expected {expected:?}", key(module))));
            }
        }
        Ok(())
    }

    fn apply(&self, key_name: &str, base: Tensor<2>, device: &Device) -> Tensor<2> {
        let (module, ff, bias) = self.find(key_name).expect("a key the merge listed");
        let (shape, _) = self.weights.info(&key(module)).expect("checked");
        let l = self.weights.float::<2>(&key(module), [shape[0], shape[1]], LoadDtype::F32, device).expect("checked");
        match (ff, bias) {
            // A bias comes as `[1, out]`.
            (_, true) => base * l.reshape([1, shape[0]]),
            _ => base * l,
        }
    }
}
