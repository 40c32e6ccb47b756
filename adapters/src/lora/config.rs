//! Which modules get LoRA and with what rank and scale, with PEFT's matching rules.

use serde::{Deserialize, Serialize};

use crate::target::{Target, TargetModules};

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Scale `alpha/sqrt(r)` instead of `alpha/r`.
    pub use_rslora: bool,
    pub target: Target,
    /// Only these layer indices (PEFT `layers_to_transform`).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Modules trained in full beside the branches (PEFT `modules_to_save`): the embedding
    /// and/or the LM head, by their names (`embed_tokens`, `lm_head`).
    pub modules_to_save: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// Whether the module `name` (HF path, e.g. `model.layers.3.self_attn.q_proj`) gets LoRA.
    pub fn targets(&self, name: &str) -> bool {
        self.target.matches(name, self.layers_to_transform.as_deref())
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
    pub use_rslora: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    /// `["embed_tokens", "lm_head"]`: train these in full too (an extended vocabulary).
    pub modules_to_save: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            layers_to_transform: None,
            modules_to_save: Vec::new(),
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
        Ok(LoraConfig {
            r: s.r,
            alpha: s.alpha,
            dropout: s.dropout,
            use_rslora: s.use_rslora,
            target: Target::from_recipe(&s.target_modules)?,
            layers_to_transform: s.layers_to_transform,
            modules_to_save: s.modules_to_save,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rslora_scales_by_sqrt_rank() {
        let mut c = LoraConfig::try_from(LoraSection::default()).unwrap();
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert!((c.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}
