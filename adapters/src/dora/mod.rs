//! DoRA (Liu et al. 2024), PEFT's `LoraConfig(use_dora=True)`: the LoRA branch plus a trainable
//! magnitude per output feature. With `V = W + s·B·A` and `n = ‖V‖` over each row of the
//! `[out, in]` weight (detached, as PEFT and the paper's §4.3 do):
//! `y = (m / n) ⊙ (W x + s·B A x) + b`.

use std::fmt;
use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{DType, Device, Tensor};
use ember_models::fused::KeptActivations;
use ember_models::layers::Linear;
use ember_models::{BaseModel, Checkpoint, LoadDtype, ModelConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::lora::{self, LoraBranch, LoraConfig, LoraSection, peft};
use crate::method::{AdapterFolder, MethodConfig, PeftMethod, WeightMerge};
use crate::registry::{ProjectionAdapter, ProjectionBranch};
use crate::{AdaptedModel, AdapterError, SavedTensor};

/// The magnitude vector's key in PEFT's file (no `.weight` suffix there).
const MAGNITUDE: &str = "lora_magnitude_vector";

/// DoRA's settings are LoRA's.
#[derive(Debug, Clone)]
pub struct DoraConfig(pub LoraConfig);

impl fmt::Display for DoraConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DoRA r={} on {}", self.0.r, self.0.target)
    }
}

/// A LoRA branch with the magnitude `m` `[out]`.
#[derive(Module, Debug)]
pub struct DoraBranch {
    pub lora: LoraBranch,
    pub magnitude: Param<Tensor<1>>,
}

impl DoraBranch {
    /// `n = ‖W + s·B·A‖` per output row, f32 `[out]`, no gradient.
    fn weight_norm(&self, base: &Linear) -> Tensor<1> {
        let v = base.dense_weight().cast(DType::F32) + self.lora.delta_weight().detach();
        let out = v.dims()[0];
        v.powi_scalar(2).sum_dim(1).sqrt().reshape([out]).detach()
    }
}

/// `x Wᵀ` without the bias.
fn weight_only(base: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, s, i] = x.dims();
    let weight = base.dense_weight().cast(x.dtype());
    ember_models::fused::matmul(x.reshape([b * s, i]), weight.transpose()).reshape([b, s, base.out_features()])
}

impl ProjectionBranch for DoraBranch {
    /// As PEFT: `base(x) + (g − 1) ⊙ W·dropout(x) + g ⊙ s·B A dropout(x)`, `g = m / n`; without
    /// dropout that is `g ⊙ (W x + s·B A x) + b`.
    fn forward(&self, base: &Linear, x: Tensor<3>) -> Tensor<3> {
        let y = base.forward(x.clone());
        let dtype = y.dtype();
        let out = base.out_features();
        let g = (self.magnitude.val() / self.weight_norm(base)).reshape([1, 1, out]);
        let dropped = self.lora.dropout.forward(x.clone());
        let without_bias = match (&base.bias, self.lora.dropout.prob == 0.0) {
            (None, true) => y.clone(),
            (Some(bias), true) => y.clone() - bias.val().cast(dtype).reshape([1, 1, out]),
            (_, false) => weight_only(base, dropped.clone()),
        };
        let scaled = (g.clone() - 1.0) * without_bias.cast(DType::F32) + g * self.lora.delta(dropped);
        y + scaled.cast(dtype)
    }

    /// `W' = (m / n)[:, None] ⊙ (W + s·B·A)`, the bias unchanged.
    fn merged(self, base: Linear) -> Linear {
        let weight = base.dense_weight();
        let g = (self.magnitude.val() / self.weight_norm(&base)).unsqueeze_dim::<2>(1);
        let merged = ((weight.clone().cast(DType::F32) + self.lora.delta_weight()) * g).cast(weight.dtype());
        Linear::new(merged, base.bias.map(|b| b.val()))
    }

    /// The magnitude starts as the weight norm, so even a zero B does not pin the output.
    fn leaves_base_unchanged(&self) -> bool {
        false
    }
}

impl MethodConfig for DoraConfig {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn merges_into_weights(&self) -> bool {
        true
    }

    fn check(&self, model: &ModelConfig) -> Result<(), String> {
        check_dora(&self.0, model)?;
        lora::check_targets(model, &self.0)
    }

    /// LoRA's `r·(in + out)` plus `out` magnitudes per targeted projection, plus the modules
    /// trained in full and the biases.
    fn count_trainable(&self, model: &ModelConfig) -> usize {
        lora::targeted_shapes(model, &self.0).iter().map(|(name, [out, inp])| self.0.rank_of(name) * (out + inp) + out).sum::<usize>()
            + lora::whole_module_parameters(model, &self.0)
            + peft::bias_parameter_count(&self.0, model)
    }

    /// The embedding and LM head trained in full replace the base's.
    fn replaced_base_parameters(&self, model: &ModelConfig) -> usize {
        lora::whole_module_parameters(model, &self.0)
    }

    fn first_trainable_layer(&self, model: &ModelConfig) -> usize {
        lora::first_targeted_layer(model, &self.0)
    }

    /// LoRA's share plus the f32 base output and the scaled sum per targeted projection.
    fn activation_bytes_per_token(&self, model: &ModelConfig, kept: KeptActivations) -> f64 {
        let own: usize = lora::targeted_shapes(model, &self.0).iter().map(|(_, [out, _])| 4 * 2 * out).sum();
        lora::branch_activation_bytes_per_token(model, &self.0, kept) + own as f64
    }

    fn dropout(&self) -> f64 {
        self.0.dropout
    }

    /// LoRA's init, and `m = ‖W‖` per row as PEFT, so the model starts exactly at the base.
    fn init(&self, base: BaseModel, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let model = AdaptedModel::with_branches(
            peft::train_whole_modules(&self.0, base)?,
            |name, linear| {
                Ok(self.0.targets(name).then(|| {
                    let lora = LoraBranch::init(name, linear, &self.0, &mut rng, device);
                    let norm = linear.dense_weight().cast(DType::F32).powi_scalar(2).sum_dim(1).sqrt().reshape([linear.out_features()]);
                    ProjectionAdapter::Dora(DoraBranch { lora, magnitude: Param::from_tensor(norm.detach()) })
                }))
            },
            || AdapterError::Config(format!("dora: target {} matches no module of the model", self.0.target)),
        )?;
        peft::train_biases(&self.0, model, |_, base| Ok(base))
    }

    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let (mut modules, mut tensors) = (Vec::new(), Vec::new());
        for (name, branch) in model.branches() {
            if let ProjectionAdapter::Dora(branch) = branch {
                tensors.extend(peft::branch_tensors(&name, &branch.lora));
                tensors.push(SavedTensor::new(format!("base_model.model.{name}.{MAGNITUDE}"), branch.magnitude.val()));
                modules.push(name);
            }
        }
        tensors.extend(peft::whole_parameters(&self.0, model).into_iter().map(|(key, _, weight)| SavedTensor::new(key, weight)));
        tensors.extend(peft::bias_parameters(model).into_iter().map(|(key, _, bias)| SavedTensor::new(key, bias)));
        peft::save_peft(&self.0, true, &modules, &tensors, base_model, dir)
    }

    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)> {
        let mut names = Vec::new();
        for (module, branch) in model.branches() {
            if let ProjectionAdapter::Dora(b) = branch {
                names.push((b.lora.lora_a.id, peft::key(&module, "lora_A")));
                names.push((b.lora.lora_b.id, peft::key(&module, "lora_B")));
                names.push((b.magnitude.id, format!("base_model.model.{module}.{MAGNITUDE}")));
            }
        }
        names.extend(peft::whole_parameters(&self.0, model).into_iter().map(|(key, id, _)| (id, key)));
        names.extend(peft::bias_parameters(model).into_iter().map(|(key, id, _)| (id, key)));
        names
    }
}

impl PeftMethod for DoraConfig {
    const NAME: &'static str = "dora";
    type Section = LoraSection;

    fn from_section(section: LoraSection) -> Result<Self, String> {
        let config: LoraConfig = section.try_into()?;
        if config.init.reads_base() {
            // PEFT's conversion to the original base drops DoRA's magnitudes.
            return Err(format!("'adapter.init_lora_weights' = {} is for method = \"lora\"; DoRA takes true or \"gaussian\"", config.init));
        }
        Ok(DoraConfig(config))
    }

    fn recognises(folder: &AdapterFolder) -> bool {
        peft::lora_variant(folder) == Some(true)
    }

    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError> {
        peft::read_config(folder).map(DoraConfig)
    }

    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError> {
        let config = peft::read_config(folder)?;
        check_dora(&config, &base.config).map_err(|e| folder.invalid(e))?;
        let model = peft::load_branches(folder, &config, base, device, |_, linear, lora, vector| {
            Ok(ProjectionAdapter::Dora(DoraBranch { lora, magnitude: Param::from_tensor(vector(MAGNITUDE, linear.out_features())?) }))
        })?;
        Ok((model, DoraConfig(config)))
    }

    fn weight_merge(folder: &AdapterFolder, _model: &ModelConfig) -> Option<Result<Box<dyn WeightMerge>, AdapterError>> {
        let branches = peft::PeftBranches::read(folder, &[MAGNITUDE]).and_then(|b| match peft::any_vocab_module(&b.config) {
            Some(module) => Err(folder.invalid(format!("DoRA on '{module}' (the embedding or the LM head) is not supported"))),
            None if b.config.lora_bias || b.config.trainable_token_indices.is_some() => {
                Err(folder.invalid("'lora_bias' and 'trainable_token_indices' are not supported with DoRA"))
            }
            None => Ok(b),
        });
        Some(branches.map(|b| Box::new(DoraMerge(b)) as Box<dyn WeightMerge>))
    }
}

/// DoRA's branches live on decoder projections only: PEFT's DoRA on the embedding or LM head is
/// refused, naming the module, and so is a bias on B (PEFT refuses `lora_bias` with DoRA).
fn check_dora(config: &LoraConfig, model: &ModelConfig) -> Result<(), String> {
    if config.lora_bias {
        return Err("'lora_bias' is not supported with DoRA (PEFT refuses it too)".into());
    }
    if config.trainable_token_indices.is_some() {
        return Err("'trainable_token_indices' is not supported with DoRA".into());
    }
    match peft::vocab_modules(config, model).first() {
        Some(module) => Err(format!("DoRA on '{}' (the embedding or the LM head) is not supported", module.hf_name(model))),
        None => Ok(()),
    }
}

/// `(m / n)[:, None] ⊙ (W + s·B·A)` for every adapted weight.
struct DoraMerge(peft::PeftBranches);

impl WeightMerge for DoraMerge {
    fn keys(&self) -> Vec<String> {
        self.0.keys()
    }

    fn check(&self, base: &Checkpoint) -> Result<(), AdapterError> {
        self.0.check(base)?;
        for (weight_key, module) in &self.0.modules {
            let out = base.info(weight_key).expect("checked").0[0];
            let key = format!("base_model.model.{module}.{MAGNITUDE}");
            let (shape, _) = self.0.weights.info(&key).expect("listed");
            if shape != [out] {
                return Err(AdapterError::invalid(&self.0.path, format!("'{key}' has shape {shape:?}, expected [{out}]")));
            }
        }
        Ok(())
    }

    fn apply(&self, key: &str, base: Tensor<2>, device: &Device) -> Tensor<2> {
        if let Some(weight) = self.0.whole_weight(key, device) {
            return weight;
        }
        if self.0.changes_bias(key) {
            return self.0.merged_bias(key, base, device);
        }
        let module = &self.0.modules[key];
        let v = base + self.0.delta(module, device);
        let out = v.dims()[0];
        let norm = v.clone().powi_scalar(2).sum_dim(1).sqrt().reshape([out]);
        let magnitude = self.0.weights.float::<1>(&format!("base_model.model.{module}.{MAGNITUDE}"), [out], LoadDtype::F32, device).expect("checked");
        v * (magnitude / norm).unsqueeze_dim::<2>(1)
    }

    fn output_shape(&self, key: &str, base_shape: &[usize]) -> Vec<usize> {
        self.0.whole.get(key).cloned().unwrap_or_else(|| base_shape.to_vec())
    }

    fn vocab_size(&self) -> Option<usize> {
        self.0.vocab_size()
    }
}
