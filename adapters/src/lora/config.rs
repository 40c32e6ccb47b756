//! Which modules get LoRA and with what rank and scale, with PEFT's matching rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::init::{InitLoraWeights, LoraInit};
use crate::target::{Exclude, Patterns, Target, TargetModules};

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Scale `alpha/sqrt(r)` instead of `alpha/r`.
    pub use_rslora: bool,
    pub target: Target,
    /// Modules never adapted (PEFT `exclude_modules`).
    pub exclude: Exclude,
    /// Only these layer indices (PEFT `layers_to_transform`).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Modules trained in full beside the branches (PEFT `modules_to_save`): the embedding
    /// and/or the LM head, by their names (`embed_tokens`, `lm_head`).
    pub modules_to_save: Vec<String>,
    /// Ranks other than `r` for the modules a pattern names (PEFT `rank_pattern`).
    pub rank_pattern: Patterns<usize>,
    /// Alphas other than `alpha` for the modules a pattern names (PEFT `alpha_pattern`).
    pub alpha_pattern: Patterns<f64>,
    /// Which of the base's biases train beside the branches (PEFT `bias`).
    pub bias: BiasTraining,
    /// A trainable bias on each branch's B, `s·(x Aᵀ Bᵀ + b)` (PEFT `lora_bias`).
    pub lora_bias: bool,
    /// Rows of the token embedding that train (PEFT `trainable_token_indices`).
    pub trainable_token_indices: Option<Vec<usize>>,
    /// How the branches start (PEFT `init_lora_weights`).
    pub init: LoraInit,
}

/// Which biases of the frozen base train (PEFT's `bias`): a bias is one vector per projection,
/// cheap to train, and Qwen2 and ChatGLM have them on q, k and v.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasTraining {
    #[default]
    None,
    /// Every bias of the model.
    All,
    /// The biases of the projections that carry a branch.
    LoraOnly,
}

impl BiasTraining {
    /// PEFT's name: `none`, `all`, `lora_only`.
    pub fn peft_name(self) -> &'static str {
        match self {
            BiasTraining::None => "none",
            BiasTraining::All => "all",
            BiasTraining::LoraOnly => "lora_only",
        }
    }

    pub fn from_peft(name: &str) -> Option<Self> {
        [BiasTraining::None, BiasTraining::All, BiasTraining::LoraOnly].into_iter().find(|b| b.peft_name() == name)
    }

    /// Whether the bias of a projection trains; `branched`: the projection carries a branch.
    pub fn trains(self, branched: bool) -> bool {
        match self {
            BiasTraining::None => false,
            BiasTraining::All => true,
            BiasTraining::LoraOnly => branched,
        }
    }
}

impl LoraConfig {
    /// The rank of the branch on module `name`.
    pub fn rank_of(&self, name: &str) -> usize {
        self.rank_pattern.get(name).unwrap_or(self.r)
    }

    /// The branch's scale on module `name`: `alpha/r`, or `alpha/sqrt(r)` with rsLoRA, from
    /// that module's rank and alpha.
    pub fn scale_of(&self, name: &str) -> f64 {
        let (r, alpha) = (self.rank_of(name) as f64, self.alpha_pattern.get(name).unwrap_or(self.alpha));
        if self.use_rslora { alpha / r.sqrt() } else { alpha / r }
    }

    /// Whether any module's rank or alpha differs from `r` and `alpha`.
    pub fn has_patterns(&self) -> bool {
        !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty()
    }

    /// Whether the module `name` (HF path, e.g. `model.layers.3.self_attn.q_proj`) gets LoRA.
    pub fn targets(&self, name: &str) -> bool {
        !self.exclude.excludes(name) && self.target.matches(name, self.layers_to_transform.as_deref())
    }
}

/// The recipe's `[adapter]` keys of LoRA (and DoRA, which adds a magnitude to the same branch).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// A list of module-name suffixes, a regex string, or "all-linear".
    pub target_modules: TargetModules,
    /// Modules never adapted, as a list of suffixes or a regex (PEFT's `exclude_modules`).
    pub exclude_modules: Option<TargetModules>,
    pub use_rslora: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    /// `["embed_tokens", "lm_head"]`: train these in full too (an extended vocabulary).
    pub modules_to_save: Vec<String>,
    /// `{ "down_proj" = 4 }`: other ranks for the modules a pattern names, PEFT's `rank_pattern`
    /// (patterns tried in alphabetical order, as they are saved).
    pub rank_pattern: BTreeMap<String, usize>,
    /// `{ "v_proj" = 32.0 }`: other alphas, PEFT's `alpha_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `"none"`, `"all"` or `"lora_only"`: which of the base's biases train, PEFT's `bias`.
    pub bias: BiasTraining,
    /// A trainable bias on each branch's B, PEFT's `lora_bias`.
    pub lora_bias: bool,
    /// `[32000, 32001]`: these rows of the token embedding train (new special tokens), PEFT's
    /// `trainable_token_indices`.
    pub trainable_token_indices: Option<Vec<usize>>,
    /// `true`, `"gaussian"`, `"pissa"`, `"pissa_niter_16"` or `"olora"`: PEFT's `init_lora_weights`.
    pub init_lora_weights: InitLoraWeights,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            exclude_modules: None,
            use_rslora: false,
            layers_to_transform: None,
            modules_to_save: Vec::new(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            bias: BiasTraining::None,
            lora_bias: false,
            trainable_token_indices: None,
            init_lora_weights: InitLoraWeights::default(),
        }
    }
}

impl TryFrom<LoraSection> for LoraConfig {
    type Error = String;

    fn try_from(s: LoraSection) -> Result<Self, String> {
        if s.r == 0 {
            return Err("'adapter.r' must be at least 1".into());
        }
        if !(0.0..1.0).contains(&s.dropout) {
            return Err(format!("'adapter.dropout' is {}; expected 0 <= dropout < 1", s.dropout));
        }
        if let Some((pattern, _)) = s.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(format!("'adapter.rank_pattern': '{pattern}' must have a rank of at least 1"));
        }
        let init = LoraInit::from_recipe(&s.init_lora_weights)?;
        if init.reads_base() && s.use_rslora && !(s.rank_pattern.is_empty() && s.alpha_pattern.is_empty()) {
            // The converted adapter doubles r and each pattern's rank, which rsLoRA's alpha/√r cannot follow per pattern.
            return Err("'adapter.init_lora_weights' reads the base: its adapter is saved as plain LoRA of rank 2r, which PEFT cannot express with use_rslora and rank_pattern or alpha_pattern together".into());
        }
        Ok(LoraConfig {
            init,
            r: s.r,
            alpha: s.alpha,
            dropout: s.dropout,
            use_rslora: s.use_rslora,
            target: Target::from_recipe(&s.target_modules)?,
            exclude: Exclude::from_recipe(s.exclude_modules.as_ref())?,
            layers_to_transform: s.layers_to_transform,
            modules_to_save: s.modules_to_save,
            rank_pattern: Patterns::new(s.rank_pattern.into_iter().collect(), "adapter.rank_pattern")?,
            alpha_pattern: Patterns::new(s.alpha_pattern.into_iter().collect(), "adapter.alpha_pattern")?,
            bias: s.bias,
            lora_bias: s.lora_bias,
            trainable_token_indices: s.trainable_token_indices.filter(|indices| !indices.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rslora_scales_by_sqrt_rank() {
        let mut c = LoraConfig::try_from(LoraSection::default()).unwrap();
        let q = "model.layers.0.self_attn.q_proj";
        assert_eq!(c.scale_of(q), 2.0);
        c.use_rslora = true;
        assert!((c.scale_of(q) - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }

    /// A module's own rank and alpha give its scale, as PEFT's `update_layer`.
    #[test]
    fn patterns_give_a_module_its_rank_and_scale() {
        let section = LoraSection {
            rank_pattern: BTreeMap::from([("q_proj".into(), 4)]),
            alpha_pattern: BTreeMap::from([("v_proj".into(), 32.0)]),
            ..LoraSection::default()
        };
        let mut c = LoraConfig::try_from(section).unwrap();
        let (q, v) = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj");
        assert_eq!((c.rank_of(q), c.scale_of(q)), (4, 4.0));
        assert_eq!((c.rank_of(v), c.scale_of(v)), (8, 4.0));
        c.use_rslora = true;
        assert_eq!(c.scale_of(q), 8.0);
        let zero = LoraSection { rank_pattern: BTreeMap::from([("k_proj".into(), 0)]), ..LoraSection::default() };
        assert!(LoraConfig::try_from(zero).unwrap_err().contains("'k_proj'"));
    }
}
