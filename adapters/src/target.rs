//! PEFT's rules for which modules a method adapts (`target_modules`, `layers_to_transform`),
//! shared by the methods that wrap projections (LoRA, DoRA, (IA)³).

use std::fmt;

use regex::Regex;
use serde::{Deserialize, Serialize};

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

impl Target {
    /// A recipe's `target_modules`: a list of suffixes, `"all-linear"`, or a regex string.
    pub fn from_recipe(modules: &TargetModules) -> Result<Self, String> {
        Ok(match modules {
            TargetModules::List(list) => Target::Suffixes(list.clone()),
            TargetModules::One(s) if s == "all-linear" => Target::AllLinear,
            TargetModules::One(s) => Target::Regex(Regex::new(s).map_err(|e| format!("'adapter.target_modules': {}", regex_error(&e)))?),
        })
    }

    /// PEFT's `target_modules` from an adapter_config.json value.
    pub fn from_peft(value: Option<&serde_json::Value>, key: &str) -> Result<Self, String> {
        use serde_json::Value;
        Ok(match value {
            Some(Value::String(s)) if s == "all-linear" => Target::AllLinear,
            Some(Value::String(s)) => Target::Regex(Regex::new(s).map_err(|e| format!("'{key}' regex: {}", regex_error(&e)))?),
            Some(Value::Array(items)) => Target::Suffixes(
                items.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<_>>().ok_or(format!("'{key}' must list strings"))?,
            ),
            _ => return Err(format!("'{key}' must be a list, a regex or \"all-linear\"")),
        })
    }

    /// A regex that must match whole module names; `key` names it in the error.
    fn regex(pattern: &str, key: &str) -> Result<Self, String> {
        Regex::new(pattern).map(Target::Regex).map_err(|e| format!("'{key}' regex: {}", regex_error(&e)))
    }

    /// As PEFT writes it: the list, the regex, or (for all-linear) the names `modules` matched.
    pub fn to_peft(&self, modules: &std::collections::BTreeSet<String>) -> serde_json::Value {
        match self {
            Target::Suffixes(list) => serde_json::json!(list),
            Target::Regex(re) => serde_json::json!(re.as_str()),
            Target::AllLinear => serde_json::json!(modules.iter().collect::<Vec<_>>()),
        }
    }

    /// Whether the module `name` (HF path, e.g. `model.layers.3.self_attn.q_proj`) matches,
    /// and sits in one of `layers` when given.
    pub fn matches(&self, name: &str, layers: Option<&[usize]>) -> bool {
        let matched = match self {
            Target::Suffixes(list) => list.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Target::Regex(re) => re.find(name).is_some_and(|m| m.start() == 0 && m.end() == name.len()),
            Target::AllLinear => true,
        };
        matched
            && match layers {
                None => true,
                Some(layers) => layer_index(name).is_some_and(|i| layers.contains(&i)),
            }
    }
}

/// PEFT's `exclude_modules`: modules never adapted, whatever `target_modules` says. A list
/// matches as `target_modules`' (the name or its `.`-suffix), a string as a regex over the whole
/// name.
#[derive(Debug, Clone, Default)]
pub struct Exclude(Option<Target>);

impl Exclude {
    /// From an adapter_config.json value (absent or null: nothing excluded).
    pub fn from_peft(value: Option<&serde_json::Value>) -> Result<Self, String> {
        use serde_json::Value;
        match value {
            None | Some(Value::Null) => Ok(Self(None)),
            Some(Value::String(s)) => Target::regex(s, "exclude_modules").map(|re| Self(Some(re))),
            some => Target::from_peft(some, "exclude_modules").map(|t| Self(Some(t))),
        }
    }

    /// A recipe's `exclude_modules`: a list of suffixes or a regex string.
    pub fn from_recipe(modules: Option<&TargetModules>) -> Result<Self, String> {
        match modules {
            None => Ok(Self(None)),
            Some(TargetModules::List(list)) => Ok(Self(Some(Target::Suffixes(list.clone())))),
            Some(TargetModules::One(s)) => Target::regex(s, "adapter.exclude_modules").map(|re| Self(Some(re))),
        }
    }

    pub fn excludes(&self, name: &str) -> bool {
        self.0.as_ref().is_some_and(|t| t.matches(name, None))
    }

    /// As PEFT writes it: null, the list or the regex.
    pub fn to_peft(&self) -> serde_json::Value {
        self.0.as_ref().map_or(serde_json::Value::Null, |t| t.to_peft(&Default::default()))
    }
}

/// Every projection of a model of this config, as `(HF module name, [out, in], layer)`, from
/// the shapes alone (no weights read): what the target rules select from.
pub fn projections(model: &ember_models::ModelConfig) -> Vec<(String, [usize; 2], usize)> {
    let keys = ember_models::family::KeyLayout::of(model.architecture);
    (0..model.num_layers).flat_map(|i| keys.projections(model, i).into_iter().map(move |p| (p.name, p.shape, i))).collect()
}

/// `target_modules` as a recipe writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// PEFT's `layers_to_transform`: one index or a list.
pub fn layers_from_peft(value: Option<&serde_json::Value>) -> Result<Option<Vec<usize>>, String> {
    use serde_json::Value;
    Ok(match value {
        None => None,
        Some(Value::Array(items)) => {
            Some(items.iter().map(|v| v.as_u64().map(|n| n as usize)).collect::<Option<_>>().ok_or("'layers_to_transform' must list layer indices")?)
        }
        Some(v) => Some(vec![v.as_u64().ok_or("'layers_to_transform' must be a layer index or a list")? as usize]),
    })
}

/// PEFT's `rank_pattern` / `alpha_pattern`: values for the modules a pattern names, the first
/// matching pattern in order winning. A pattern is a regex that must match the end of the module
/// name from a `.` boundary on (PEFT: `re.match(rf"(.*\.)?({key})$", name)`), so `q_proj`
/// names every q_proj and `model.layers.0.self_attn.q_proj` one.
#[derive(Debug, Clone)]
pub struct Patterns<T> {
    entries: Vec<(String, Regex, T)>,
}

impl<T> Default for Patterns<T> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<T: Copy + Serialize> Patterns<T> {
    /// `entries` in the order they are tried; `key` names the config key in errors.
    pub fn new(entries: Vec<(String, T)>, key: &str) -> Result<Self, String> {
        let entries = entries
            .into_iter()
            .map(|(pattern, value)| {
                let re = Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| format!("'{key}': pattern '{pattern}': {}", regex_error(&e)))?;
                Ok((pattern, re, value))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { entries })
    }

    /// The value of the first pattern that names the module `name`.
    pub fn get(&self, name: &str) -> Option<T> {
        self.entries.iter().find(|(_, re, _)| re.is_match(name)).map(|&(_, _, value)| value)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The same patterns with each value through `f`.
    pub fn map_values(&self, f: impl Fn(T) -> T) -> Self {
        Self { entries: self.entries.iter().map(|(pattern, re, value)| (pattern.clone(), re.clone(), f(*value))).collect() }
    }

    /// `{pattern: value}` as adapter_config.json holds it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.entries.iter().map(|(pattern, _, value)| (pattern.clone(), serde_json::json!(value))).collect())
    }
}

/// A regex error on one line (the regex crate draws the pattern with a caret under it).
fn regex_error(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines().last().unwrap_or_default().trim().trim_start_matches("error: ").to_owned()
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

    #[test]
    fn suffix_list_matches_whole_name_segments() {
        let t = Target::Suffixes(vec!["q_proj".into(), "dense".into()]);
        assert!(t.matches("model.layers.0.self_attn.q_proj", None));
        assert!(t.matches("transformer.encoder.layers.1.self_attention.dense", None));
        assert!(!t.matches("model.layers.0.self_attn.qq_proj", None));
        assert!(!t.matches("transformer.encoder.layers.1.mlp.dense_4h_to_h", None));
    }

    #[test]
    fn regex_must_match_the_full_name() {
        let t = Target::Regex(Regex::new(r".*\.(q|v)_proj").unwrap());
        assert!(t.matches("model.layers.0.self_attn.v_proj", None));
        assert!(!t.matches("model.layers.0.self_attn.v_proj_extra", None));
    }

    /// As PEFT's `get_pattern_key`: a pattern names a whole trailing part of the module name.
    #[test]
    fn patterns_match_from_a_dot_to_the_end() {
        let ranks = Patterns::new(vec![("model.layers.1.self_attn.q_proj".into(), 2), ("q_proj".into(), 4), ("(up|down)_proj".into(), 6)], "rank_pattern").unwrap();
        assert_eq!(ranks.get("model.layers.1.self_attn.q_proj"), Some(2));
        assert_eq!(ranks.get("model.layers.11.self_attn.q_proj"), Some(4));
        assert_eq!(ranks.get("model.layers.0.mlp.down_proj"), Some(6));
        assert_eq!(ranks.get("model.layers.0.self_attn.qq_proj"), None);
        assert_eq!(ranks.get("model.layers.0.self_attn.q_proj_extra"), None);
        assert!(Patterns::<usize>::new(vec![("(".into(), 1)], "rank_pattern").unwrap_err().contains("'rank_pattern'"));
    }

    /// PEFT's `exclude_modules`: a list by name or suffix, a string as a whole-name regex (even
    /// "all-linear", which only `target_modules` reads as a keyword).
    #[test]
    fn exclusions_match_as_peft_reads_them() {
        let list = Exclude::from_peft(Some(&serde_json::json!(["o_proj", "model.layers.0.mlp.down_proj"]))).unwrap();
        assert!(list.excludes("model.layers.3.self_attn.o_proj"));
        assert!(list.excludes("model.layers.0.mlp.down_proj"));
        assert!(!list.excludes("model.layers.10.mlp.down_proj"));
        let regex = Exclude::from_peft(Some(&serde_json::json!(r".*\.0\..*"))).unwrap();
        assert!(regex.excludes("model.layers.0.self_attn.k_proj") && !regex.excludes("model.layers.1.self_attn.k_proj"));
        assert!(!Exclude::from_peft(Some(&serde_json::json!("all-linear"))).unwrap().excludes("model.layers.0.self_attn.q_proj"));
        assert!(!Exclude::from_peft(None).unwrap().excludes("model.layers.0.self_attn.q_proj"));
        assert_eq!(list.to_peft(), serde_json::json!(["o_proj", "model.layers.0.mlp.down_proj"]));
        assert!(Exclude::from_recipe(Some(&TargetModules::One("(".into()))).unwrap_err().contains("'adapter.exclude_modules'"));
    }

    #[test]
    fn layers_to_transform_filters_by_index() {
        assert!(!Target::AllLinear.matches("model.layers.0.mlp.down_proj", Some(&[1])));
        assert!(Target::AllLinear.matches("model.layers.1.mlp.down_proj", Some(&[1])));
    }
}
