//! LoRA (Hu et al. 2021) as PEFT implements it: `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with the
//! base weight frozen and the low-rank branch kept separate (never folded into W while
//! training, so no weight-sized gradient exists).

mod config;
mod layer;
mod peft;

pub use config::{LoraConfig, Target};
pub use layer::{LoraBranch, LoraLinear};
pub use peft::{BranchKeys, load_peft, peft_branches, read_peft_config, save_peft};

use burn::tensor::Device;
use ember_models::transformer::{KeyLayout, expected_tensors};
use ember_models::{BaseModel, CausalLm, ModelConfig};
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

/// `[out, in]` of every projection `config` targets on a model of this config, from shapes
/// alone (no weights read).
pub fn targeted_shapes(model: &ModelConfig, config: &LoraConfig) -> Vec<[usize; 2]> {
    let keys = KeyLayout::of(model.architecture);
    let shapes: std::collections::HashMap<String, Vec<usize>> = expected_tensors(model).into_iter().collect();
    (0..model.num_layers)
        .flat_map(|i| keys.projection_names(i))
        .filter(|name| config.targets(name))
        .map(|name| {
            let shape = &shapes[&format!("{name}.weight")];
            [shape[0], shape[1]]
        })
        .collect()
}

/// Trainable parameters LoRA would add to a model of this config: `r·(in + out)` per targeted
/// projection.
pub fn count_trainable(model: &ModelConfig, config: &LoraConfig) -> usize {
    targeted_shapes(model, config).iter().map(|[out, inp]| config.r * (out + inp)).sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_7b_r8_on_q_v_trains_4_194_304_parameters() {
        let json = serde_json::json!({
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000,
        });
        let model = ModelConfig::from_json(&json, std::path::Path::new("config.json")).unwrap();
        let config = LoraConfig {
            r: 8, alpha: 16.0, dropout: 0.05, use_rslora: false,
            target: Target::Suffixes(vec!["q_proj".into(), "v_proj".into()]), layers_to_transform: None,
        };
        let trainable = count_trainable(&model, &config);
        assert_eq!(trainable, 4_194_304);
        // PEFT's "all params" counts the base plus the adapter.
        assert_eq!(model.num_params() + trainable, 6_742_609_920);
    }
}
