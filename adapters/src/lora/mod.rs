//! LoRA (Hu et al. 2021) as PEFT implements it: `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with the
//! base weight frozen and the low-rank branch kept separate (never folded into W while
//! training, so no weight-sized gradient exists).

mod config;
mod layer;
mod peft;

pub use config::{LoraConfig, Target};
pub use layer::{LoraBranch, LoraLinear};
pub use peft::{load_peft, peft_branches, read_peft_config, save_peft};

use burn::tensor::Device;
use ember_models::{BaseModel, CausalLm};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::AdapterError;

/// The base model with LoRA branches on the projections `config` targets.
pub type LoraModel = CausalLm<LoraLinear>;

/// Wraps every targeted projection of `model` with a fresh branch: A Kaiming-uniform(a=√5) as
/// PEFT (U(±1/√in)), B zero, so the model starts exactly at the base. Seeded by `seed`.
pub fn apply(model: BaseModel, config: &LoraConfig, seed: u64, device: &Device) -> Result<LoraModel, AdapterError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut matched = 0;
    let wrapped = model.map_projections(|name, linear| {
        if config.targets(name) {
            matched += 1;
            let branch = LoraBranch::init(&linear, config, &mut rng, device);
            LoraLinear::new(name, linear, Some(branch))
        } else {
            LoraLinear::new(name, linear, None)
        }
    });
    if matched == 0 {
        return Err(AdapterError::Config(format!("lora: target {} matches no module of the model", config.target)));
    }
    Ok(wrapped)
}

/// (trainable LoRA parameters, all parameters)
pub fn parameter_counts(model: &LoraModel) -> (usize, usize) {
    let trainable = model
        .projections()
        .iter()
        .filter_map(|(_, p)| p.lora.as_ref())
        .map(|b| b.lora_a.shape().num_elements() + b.lora_b.shape().num_elements())
        .sum::<usize>();
    (trainable, burn::module::Module::num_params(model))
}

/// True when every B matrix is exactly zero: the adapter equals the base (a run that never
/// updated it, the known PEFT failure of saving an untrained adapter).
pub fn all_b_zero(model: &LoraModel) -> bool {
    model.projections().iter().filter_map(|(_, p)| p.lora.as_ref()).all(|b| {
        b.lora_b.val().abs().max().into_scalar::<f32>() == 0.0
    })
}

/// Folds every branch into its base weight (`W + s·B·A`) and drops the branches.
pub fn merge(model: LoraModel) -> BaseModel {
    model.map_projections(|_, lora| lora.merged())
}
