//! Which modules get LoRA and with what rank and scale, with PEFT's matching rules.

use std::fmt;

use regex::Regex;

/// PEFT `target_modules`.
#[derive(Debug, Clone)]
pub enum Target {
    /// A list: a module matches if its name equals an entry or ends with `.` + entry.
    Suffixes(Vec<String>),
    /// A string: the regex must match the whole module name.
    Regex(Regex),
    /// `all-linear`: every projection of the decoder (never the LM head).
    AllLinear,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Suffixes(list) => write!(f, "[{}]", list.join(", ")),
            Target::Regex(re) => write!(f, "regex '{}'", re.as_str()),
            Target::AllLinear => f.write_str("all-linear"),
        }
    }
}

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
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// Whether the module `name` (HF path, e.g. `model.layers.3.self_attn.q_proj`) gets LoRA.
    pub fn targets(&self, name: &str) -> bool {
        let matched = match &self.target {
            Target::Suffixes(list) => list.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Target::Regex(re) => re.find(name).is_some_and(|m| m.start() == 0 && m.end() == name.len()),
            Target::AllLinear => true,
        };
        matched
            && match &self.layers_to_transform {
                None => true,
                Some(layers) => layer_index(name).is_some_and(|i| layers.contains(&i)),
            }
    }
}

/// `model.layers.12.self_attn.q_proj` -> 12
fn layer_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(part) = parts.next() {
        if part == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(target: Target) -> LoraConfig {
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, use_rslora: false, target, layers_to_transform: None }
    }

    #[test]
    fn suffix_list_matches_whole_name_segments() {
        let c = config(Target::Suffixes(vec!["q_proj".into(), "dense".into()]));
        assert!(c.targets("model.layers.0.self_attn.q_proj"));
        assert!(c.targets("transformer.encoder.layers.1.self_attention.dense"));
        assert!(!c.targets("model.layers.0.self_attn.qq_proj"));
        assert!(!c.targets("transformer.encoder.layers.1.mlp.dense_4h_to_h"));
    }

    #[test]
    fn regex_must_match_the_full_name() {
        let c = config(Target::Regex(Regex::new(r".*\.(q|v)_proj").unwrap()));
        assert!(c.targets("model.layers.0.self_attn.v_proj"));
        assert!(!c.targets("model.layers.0.self_attn.v_proj_extra"));
    }

    #[test]
    fn layers_to_transform_filters_by_index() {
        let mut c = config(Target::AllLinear);
        c.layers_to_transform = Some(vec![1]);
        assert!(!c.targets("model.layers.0.mlp.down_proj"));
        assert!(c.targets("model.layers.1.mlp.down_proj"));
    }

    #[test]
    fn rslora_scales_by_sqrt_rank() {
        let mut c = config(Target::AllLinear);
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert!((c.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    }
}
