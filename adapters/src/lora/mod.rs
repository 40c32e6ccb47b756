//! LoRA (Hu et al. 2021) as PEFT implements it: `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with the
//! base weight frozen and the low-rank branch kept separate (never folded into W while
//! training, so no weight-sized gradient exists).

mod config;
mod init;
mod layer;
pub mod peft;

pub use config::{BiasTraining, LoraConfig, LoraSection};
pub use init::{InitLoraWeights, LoraInit};
pub use layer::LoraBranch;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use burn::module::ParamId;
use burn::tensor::{Device, Tensor};
use ember_models::family::{KeyLayout, LayerActivation};
use ember_models::fused::KeptActivations;
use ember_models::layers::{Linear, Weight};
use ember_models::{BaseModel, Checkpoint, ModelConfig, VocabModule};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::method::{AdapterFolder, MethodConfig, PeftMethod, WeightMerge};
use crate::registry::ProjectionAdapter;
use crate::{AdaptedModel, AdapterError, SavedTensor};

use crate::target;
pub use crate::target::Target;

impl fmt::Display for LoraConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoRA r={} on {}", self.r, self.target)?;
        if self.has_patterns() {
            f.write_str(", ranks/alphas by pattern")?;
        }
        if !self.modules_to_save.is_empty() {
            write!(f, ", {} trained in full", self.modules_to_save.join(" and "))?;
        }
        if self.init != LoraInit::Kaiming {
            write!(f, ", init_lora_weights = {}", self.init)?;
        }
        Ok(())
    }
}

/// `[out, in]` of every projection `config` targets on a model of this config, from shapes
/// alone (no weights read).
pub fn targeted_shapes(model: &ModelConfig, config: &LoraConfig) -> Vec<(String, [usize; 2])> {
    target::projections(model).into_iter().filter(|(name, _, _)| config.targets(name)).map(|(name, shape, _)| (name, shape)).collect()
}

/// What the branches keep for backward, per token: each its f32 `x·A`, and its input in the
/// activations' dtype, one tensor for the branches that read the same activation of a layer
/// (none for SwiGLU's output where the branch makes it again); under dropout each branch's own
/// dropped copy and its mask.
pub fn branch_activation_bytes_per_token(model: &ModelConfig, config: &LoraConfig, kept: KeptActivations) -> f64 {
    let keys = KeyLayout::of(model.architecture);
    let mut bytes = 0;
    for layer in 0..model.num_layers {
        let targeted: Vec<_> = keys.projections(model, layer).into_iter().filter(|p| config.targets(&p.name)).collect();
        bytes += targeted.iter().map(|p| 4 * config.rank_of(&p.name)).sum::<usize>();
        let mut read = Vec::new();
        for p in &targeted {
            let input = p.role.input();
            if config.dropout > 0.0 {
                bytes += 2 * kept.bytes * p.shape[1];
            } else if !read.contains(&input) && !(input == LayerActivation::MlpProduct && kept.swiglu_output_remade) {
                read.push(input);
                bytes += kept.bytes * p.shape[1];
            }
        }
    }
    bytes as f64
}

/// The lowest layer with a targeted projection.
pub fn first_targeted_layer(model: &ModelConfig, config: &LoraConfig) -> usize {
    // A trained embedding needs the gradient all the way down.
    let embedding = |modules: Vec<VocabModule>| modules.contains(&VocabModule::Embedding);
    if embedding(peft::whole_modules(config, model).unwrap_or_default())
        || embedding(peft::vocab_modules(config, model))
        || config.trainable_token_indices.is_some()
    {
        return 0;
    }
    let branch = target::projections(model).into_iter().find(|(name, _, _)| config.targets(name)).map_or(0, |(_, _, layer)| layer);
    // Under `bias = "all"` a layer below the first branch may train its biases.
    (0..branch).find(|&layer| peft::trains_bias_in_layer(config, model, layer)).unwrap_or(branch)
}

/// Parameters of the modules `config` trains in full (`vocab · hidden` each).
pub fn whole_module_parameters(model: &ModelConfig, config: &LoraConfig) -> usize {
    peft::whole_modules(config, model).unwrap_or_default().len() * model.vocab_size * model.hidden_size
}

/// Parameters of the branches on the embedding and LM head (`r · (vocab + hidden)` each).
pub fn vocab_branch_parameters(model: &ModelConfig, config: &LoraConfig) -> usize {
    peft::vocab_modules(config, model).iter().map(|m| config.rank_of(m.hf_name(model)) * (model.vocab_size + model.hidden_size)).sum()
}

/// Whether `config`'s layers exist and it targets at least one projection of `model`.
pub fn check_targets(model: &ModelConfig, config: &LoraConfig) -> Result<(), String> {
    peft::whole_modules(config, model)?;
    peft::check_vocab_modules(config, model)?;
    if let Some(layer) = config.layers_to_transform.iter().flatten().find(|&&i| i >= model.num_layers) {
        return Err(format!("'adapter.layers_to_transform': layer {layer} does not exist (the model has {} layers)", model.num_layers));
    }
    if config.init.reads_base() {
        if let Some(module) = peft::vocab_modules(config, model).first() {
            return Err(format!("'adapter.init_lora_weights' = {} starts projections from their weight; not the {}", config.init, module.hf_name(model)));
        }
        if let Some((name, [out, inp])) = targeted_shapes(model, config).into_iter().find(|(name, [out, inp])| config.rank_of(name) > *out.min(inp)) {
            return Err(format!("'adapter.init_lora_weights' = {}: rank {} is above {name}'s smaller side ([{out}, {inp}])", config.init, config.rank_of(&name)));
        }
    }
    if targeted_shapes(model, config).is_empty() && peft::vocab_modules(config, model).is_empty() {
        let keys = KeyLayout::of(model.architecture);
        let names: Vec<String> = keys.projection_names(0).iter().map(|n| n.rsplit('.').next().unwrap_or(n).to_owned()).collect();
        return Err(format!(
            "'adapter.target_modules' = {} matches no projection of this {} model (its projections: {})",
            config.target,
            model.architecture.name(),
            names.join(", ")
        ));
    }
    Ok(())
}

impl MethodConfig for LoraConfig {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn merges_into_weights(&self) -> bool {
        true
    }

    fn check(&self, model: &ModelConfig) -> Result<(), String> {
        check_targets(model, self)
    }

    /// `r·(in + out)` per targeted projection, embedding and LM head, plus the modules trained
    /// in full, the biases and the trained tokens' rows.
    fn count_trainable(&self, model: &ModelConfig) -> usize {
        let projections: usize = targeted_shapes(model, self).iter().map(|(name, [out, inp])| self.rank_of(name) * (out + inp)).sum();
        let tokens = self.trainable_token_indices.as_ref().map_or(0, |indices| indices.len() * model.hidden_size);
        projections + vocab_branch_parameters(model, self) + whole_module_parameters(model, self) + peft::bias_parameter_count(self, model) + tokens
    }

    /// The embedding and LM head trained in full replace the base's.
    fn replaced_base_parameters(&self, model: &ModelConfig) -> usize {
        whole_module_parameters(model, self)
    }

    fn first_trainable_layer(&self, model: &ModelConfig) -> usize {
        first_targeted_layer(model, self)
    }

    fn activation_bytes_per_token(&self, model: &ModelConfig, kept: KeptActivations) -> f64 {
        branch_activation_bytes_per_token(model, self, kept)
    }

    fn dropout(&self) -> f64 {
        self.dropout
    }

    /// A Kaiming-uniform(a=√5) as PEFT (U(±1/√in)), B zero: the model starts exactly at the base.
    /// Under PiSSA or OLoRA both start from the weight, and the weight keeps the rest.
    fn init(&self, base: BaseModel, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        self.init_with_starts(base, None, seed, device)
    }

    fn save(&self, model: &AdaptedModel, base_model: &str, dir: &Path) -> Result<(), AdapterError> {
        let (mut modules, mut tensors) = (Vec::new(), Vec::new());
        for (name, branch) in model.branches() {
            if let ProjectionAdapter::Lora(branch) = branch {
                tensors.extend(peft::branch_tensors(&name, branch));
                modules.push(name);
            }
        }
        tensors.extend(peft::whole_parameters(self, model).into_iter().map(|(key, _, weight)| SavedTensor::new(key, weight)));
        tensors.extend(peft::bias_parameters(model).into_iter().map(|(key, _, bias)| SavedTensor::new(key, bias)));
        tensors.extend(peft::vocab_tensors(model));
        modules.extend(peft::vocab_modules(self, model.config()).into_iter().map(|m| m.hf_name(model.config()).to_owned()));
        // Every branch of such a start took it out of the base, and saves converted.
        let config = if self.init.reads_base() { self.converted() } else { self.clone() };
        peft::save_peft(&config, false, &modules, &tensors, base_model, dir)
    }

    fn parameter_names(&self, model: &AdaptedModel) -> Vec<(ParamId, String)> {
        let mut names = Vec::new();
        for (module, branch) in model.branches() {
            if let ProjectionAdapter::Lora(b) = branch {
                names.push((b.lora_a.id, peft::key(&module, "lora_A")));
                names.push((b.lora_b.id, peft::key(&module, "lora_B")));
            }
        }
        names.extend(peft::whole_parameters(self, model).into_iter().map(|(key, id, _)| (id, key)));
        names.extend(peft::bias_parameters(model).into_iter().map(|(key, id, _)| (id, key)));
        names.extend(peft::vocab_parameter_names(model));
        names
    }
}

impl LoraConfig {
    /// [`MethodConfig::init`] with the starts `taken` out of the weights while the base loaded
    /// (QPiSSA: [`WeightStarts`]); the others are read from the base here.
    pub fn init_with_starts(&self, base: BaseModel, taken: Option<WeightStarts>, seed: u64, device: &Device) -> Result<AdaptedModel, AdapterError> {
        let mut rng = StdRng::seed_from_u64(seed);
        peft::check_vocab_modules(self, &base.config).map_err(AdapterError::Config)?;

        let vocab = peft::init_vocab_branches(self, &base, &mut rng, device);
        let base = peft::train_whole_modules(self, base)?;
        // Under a start read from the base no vocabulary branch draws from `rng` (the check
        // refuses them), so a fresh stream of `seed` draws what `rng` would.
        let mut starts = taken.unwrap_or_else(|| WeightStarts::new(self, seed));
        let base = starts.take_all(base)?;
        let mut starts = starts.starts;
        let model = if vocab.is_some() && targeted_shapes(&base.config, self).is_empty() {
            AdaptedModel::base_only(base)
        } else {
            AdaptedModel::with_branches(
                base,
                |name, linear| {
                    Ok(self.targets(name).then(|| {
                        ProjectionAdapter::Lora(starts.remove(name).unwrap_or_else(|| LoraBranch::init(name, linear, self, &mut rng, device)))
                    }))
                },
                || AdapterError::Config(format!("lora: target {} matches no module of the model", self.target)),
            )?
        };
        let model = match vocab {
            Some(vocab) => model.with_vocab_branches(vocab),
            None => model,
        };
        peft::train_biases(self, model, |_, base| Ok(base))
    }

    /// The config of the adapter saved from a start taken out of the base: plain LoRA of twice
    /// the rank at the same scale (PEFT's `save_pretrained` with
    /// `path_initial_model_for_weight_conversion`).
    fn converted(&self) -> Self {
        let alpha = if self.use_rslora { self.alpha * 2f64.sqrt() } else { 2.0 * self.alpha };
        Self {
            r: 2 * self.r,
            alpha,
            rank_pattern: self.rank_pattern.map_values(|r| 2 * r),
            alpha_pattern: self.alpha_pattern.map_values(|a| 2.0 * a),
            init: LoraInit::Kaiming,
            ..self.clone()
        }
    }
}

/// Starts taken out of the base's weights while it loads (`BaseModel::load_prepared`), so that a
/// quantized base stores what the start leaves (QPiSSA) and never exists in full precision.
pub struct WeightStarts {
    config: LoraConfig,
    rng: StdRng,
    starts: HashMap<String, LoraBranch>,
    seconds: f64,
}

impl WeightStarts {
    /// Seeded as [`MethodConfig::init`] seeds its own draws.
    pub fn new(config: &LoraConfig, seed: u64) -> Self {
        Self { config: config.clone(), rng: StdRng::seed_from_u64(seed), starts: HashMap::new(), seconds: 0.0 }
    }

    /// The weight to store for projection `name`: what the start leaves of it where one is taken.
    /// A rank above the weight's smaller side takes none (the method's check then says so).
    pub fn take(&mut self, name: &str, weight: Tensor<2>) -> Tensor<2> {
        let [out, inp] = weight.dims();
        let r = self.config.rank_of(name);
        if !self.config.targets(name) || r > out.min(inp) {
            return weight;
        }
        let started = std::time::Instant::now();
        let (a, b, kept) = init::start_from_weight(weight, r, self.config.scale_of(name), self.config.init, &mut self.rng);
        self.starts.insert(name.to_owned(), LoraBranch::from_start(a, b, &self.config, name));
        self.seconds += started.elapsed().as_secs_f64();
        kept
    }

    /// Time spent taking the starts.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    /// `base` with every targeted weight not taken while it loaded replaced by what its start
    /// leaves ([`Self::take`]). A quantized one cannot give its start: an error names it.
    fn take_all(&mut self, base: BaseModel) -> Result<BaseModel, AdapterError> {
        if !self.config.init.reads_base() {
            return Ok(base);
        }
        let mut quantized = None;
        let base = base.map_projections(|name, linear: Linear| {
            if !self.config.targets(name) || quantized.is_some() || self.starts.contains_key(name) {
                return linear;
            }
            let Weight::Dense(weight) = &linear.weight else {
                quantized = Some(name.to_owned());
                return linear;
            };
            let kept = self.take(name, weight.val());
            Linear::new(kept, linear.bias.map(|b| b.val()))
        });
        match quantized {
            Some(name) => Err(AdapterError::Config(format!(
                "'adapter.init_lora_weights' = {} changes the frozen weight, and {name} is quantized already (a GGUF base's blocks): start from a full-precision checkpoint (model.quantize may then quantize what the start leaves)",
                self.config.init
            ))),
            None => Ok(base),
        }
    }
}

impl PeftMethod for LoraConfig {
    const NAME: &'static str = "lora";
    type Section = LoraSection;

    fn from_section(section: LoraSection) -> Result<Self, String> {
        section.try_into()
    }

    fn recognises(folder: &AdapterFolder) -> bool {
        peft::lora_variant(folder) == Some(false)
    }

    fn from_folder(folder: &AdapterFolder) -> Result<Self, AdapterError> {
        peft::read_config(folder)
    }

    fn load(folder: &AdapterFolder, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Self), AdapterError> {
        let config = peft::read_config(folder)?;
        let model = peft::load_branches(folder, &config, base, device, |_, _, branch, _| Ok(ProjectionAdapter::Lora(branch)))?;
        Ok((model, config))
    }

    fn weight_merge(folder: &AdapterFolder, model: &ModelConfig) -> Option<Result<Box<dyn WeightMerge>, AdapterError>> {
        Some(peft::PeftBranches::read(folder, &[]).map(|mut b| {
            b.tie_head(model);
            Box::new(LoraMerge(b)) as Box<dyn WeightMerge>
        }))
    }
}

/// `W + s·B·A` for every adapted weight.
struct LoraMerge(peft::PeftBranches);

impl WeightMerge for LoraMerge {
    fn keys(&self) -> Vec<String> {
        self.0.keys()
    }

    fn check(&self, base: &Checkpoint) -> Result<(), AdapterError> {
        self.0.check(base)
    }

    fn apply(&self, key: &str, base: Tensor<2>, device: &Device) -> Tensor<2> {
        if let Some(weight) = self.0.whole_weight(key, device) {
            return weight;
        }
        if self.0.changes_bias(key) {
            return self.0.merged_bias(key, base, device);
        }
        let base = self.0.base_layer(key, device).unwrap_or(base);
        let base = self.0.with_trained_tokens(key, base, device);
        let merged = match (self.0.embeddings.get(key), self.0.modules.get(key)) {
            (Some(embedding), _) => base + self.0.embedding_delta(embedding, device),
            (None, Some(module)) => base + self.0.delta(module, device),
            (None, None) => base,
        };
        match &self.0.tied_head {
            Some((embedding, head)) if embedding == key => merged + self.0.delta(head, device),
            _ => merged,
        }
    }

    fn output_shape(&self, key: &str, base_shape: &[usize]) -> Vec<usize> {
        self.0.whole.get(key).or_else(|| self.0.base_layers.get(key)).cloned().unwrap_or_else(|| base_shape.to_vec())
    }

    fn vocab_size(&self) -> Option<usize> {
        self.0.vocab_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ProjectionBranch;

    #[test]
    fn llama_7b_r8_on_q_v_trains_4_194_304_parameters() {
        let model = ModelConfig::preset("llama-7b").unwrap();
        let config = LoraConfig::try_from(LoraSection::default()).unwrap();
        let trainable = config.count_trainable(&model);
        assert_eq!(trainable, 4_194_304);
        // PEFT's "all params" counts the base plus the adapter.
        assert_eq!(model.num_params() + trainable, 6_742_609_920);
    }

    /// `init_lora_weights = "gaussian"`: A ~ N(0, 1/r²) as PEFT's `nn.init.normal_(std = 1/r)`, B zero.
    #[test]
    fn gaussian_start_draws_a_with_deviation_one_over_r() {
        let config = LoraConfig { r: 4, init: LoraInit::Gaussian, ..LoraConfig::try_from(LoraSection::default()).unwrap() };
        let branch = LoraBranch::init_for([64, 4096], "q_proj", &config, &mut StdRng::seed_from_u64(0), &Device::default());
        let a = branch.lora_a.val().into_data().try_to_vec::<f32>().unwrap();
        let std = (a.iter().map(|x| (x * x) as f64).sum::<f64>() / a.len() as f64).sqrt();
        assert!((std - 0.25).abs() < 0.005, "{std}");
        assert!(branch.leaves_base_unchanged());
    }

    /// q, k and v read one tensor, gate and up another; with dropout each branch keeps its own.
    #[test]
    fn branches_that_read_one_activation_keep_it_once() {
        let model = ModelConfig::preset("llama-7b").unwrap();
        let mut config = LoraConfig { r: 16, dropout: 0.0, target: Target::AllLinear, ..LoraConfig::try_from(LoraSection::default()).unwrap() };
        let (h, f, layers) = (4096, 11008, 32);
        let per_layer = 7 * 4 * 16 + 2 * (h + h + h + f);
        let flex = KeptActivations { bytes: 2, swiglu_output_remade: false };
        assert_eq!(branch_activation_bytes_per_token(&model, &config, flex), (layers * per_layer) as f64);
        // LibTorch's branch on down_proj makes its input again from SwiGLU's gate and up.
        let libtorch = KeptActivations { bytes: 2, swiglu_output_remade: true };
        assert_eq!(branch_activation_bytes_per_token(&model, &config, libtorch), (layers * (per_layer - 2 * f)) as f64);
        config.dropout = 0.05;
        let per_layer = 7 * 4 * 16 + 2 * 2 * (6 * h + f);
        assert_eq!(branch_activation_bytes_per_token(&model, &config, libtorch), (layers * per_layer) as f64);
    }
}
