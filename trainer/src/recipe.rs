//! Recipe files: one TOML file describes a whole run, so it runs the same on a laptop, a GPU
//! box and in CI. `EMBER_<SECTION>__<KEY>=value` environment variables, then
//! `--set section.key=value`, override any key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Value;

use crate::step::StepOptions;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF model folder.
    pub path: PathBuf,
    /// `flex` (CPU), `libtorch`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Frozen base dtype: `f32`, `bf16`, or `checkpoint` to keep the file's (bf16/f16 on GPUs).
    /// Adapter parameters and optimizer state are f32 in every case.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// `lora`, `prefix` (prefix tuning / P-Tuning v2) or `adaption` (LLaMA-Adapter gated prompts).
    pub method: String,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// A list of module-name suffixes, a regex string, or "all-linear".
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Start from an existing PEFT LoRA adapter (e.g. one trained by PEFT) instead of a fresh
    /// one; its own config (r, alpha, targets) then applies.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// prefix: virtual tokens per layer (ChatGLM's `pre_seq_len`).
    #[serde(default)]
    pub num_virtual_tokens: Option<usize>,
    /// prefix: train through the embedding → Linear → tanh → Linear reparameterization.
    #[serde(default)]
    pub prefix_projection: bool,
    /// prefix: hidden width of that MLP (default: PEFT's token width; ChatGLM's hidden size).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// adaption: prompt tokens per adapted layer.
    #[serde(default)]
    pub adapter_len: Option<usize>,
    /// adaption: how many of the top layers get a prompt.
    #[serde(default)]
    pub adapter_layers: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Alpaca JSON array or JSONL.
    pub path: PathBuf,
    /// Built-in template name (alpaca, alpaca-lora, chatglm2, chatglm3, glm4), or `custom`.
    #[serde(default = "default_template")]
    pub template: String,
    /// With `template = "custom"`: prompts with `{instruction}` and `{input}` placeholders.
    pub prompt_input: Option<String>,
    pub prompt_no_input: Option<String>,
    #[serde(default = "default_cutoff")]
    pub cutoff_len: usize,
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Records held out for evaluation (taken after a seeded shuffle).
    #[serde(default)]
    pub val_size: usize,
    /// Batch examples of similar length together (fewer pad tokens), as HF `group_by_length`.
    #[serde(default)]
    pub group_by_length: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub seed: u64,
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run all epochs).
    pub max_steps: usize,
    pub lr: f64,
    /// `constant`, `linear` or `cosine` (after warmup).
    pub lr_scheduler: String,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Clip the global gradient norm (0: off).
    pub max_grad_norm: f64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_steps: usize,
    pub logging_steps: usize,
    /// Write a checkpoint every N steps (0: none); `ember train --resume` continues from the newest.
    pub save_steps: usize,
    /// Checkpoints kept on disk (0: all).
    pub keep_checkpoints: usize,
    /// A NaN/inf loss or gradient norm: `stop` (exit 1, the last checkpoint kept) or `skip`
    /// the optimizer step.
    pub on_nonfinite: String,
    /// Activation checkpointing per decoder layer: keep each layer's input only, recompute the
    /// layer in backward (less memory, about a third more compute; same gradients).
    pub gradient_checkpointing: bool,
    /// LM head + cross-entropy over at most this many supervised tokens at a time (0: all at
    /// once); bounds the `[tokens, vocab]` f32 logits. Same loss and gradients.
    pub loss_chunk_tokens: usize,
    /// Pack each micro-batch's sequences into one row without padding, so no compute goes to
    /// pad tokens (HF's padding-free training). Same loss and gradients up to float rounding.
    pub padding_free: bool,
}

impl TrainSection {
    /// How each micro-batch is computed.
    pub fn step_options(&self) -> StepOptions {
        StepOptions { checkpoint_layers: self.gradient_checkpointing, loss_chunk_tokens: self.loss_chunk_tokens, padding_free: self.padding_free }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            seed: 42,
            micro_batch_size: 4,
            gradient_accumulation_steps: 1,
            epochs: 1,
            max_steps: 0,
            lr: 3e-4,
            lr_scheduler: "linear".into(),
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            eval_steps: 0,
            logging_steps: 10,
            save_steps: 0,
            keep_checkpoints: 2,
            on_nonfinite: "stop".into(),
            gradient_checkpointing: false,
            loss_chunk_tokens: 0,
            padding_free: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
}

fn default_device() -> String {
    "flex".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> TargetModules {
    TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
}
fn default_template() -> String {
    "alpaca".into()
}
fn default_cutoff() -> usize {
    256
}

/// Every key a recipe may hold, by section (for "did you mean" suggestions).
const KEYS: &[(&str, &[&str])] = &[
    ("model", &["path", "device", "dtype"]),
    ("adapter", &["method", "r", "alpha", "dropout", "target_modules", "use_rslora", "layers_to_transform", "init_from",
        "num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "adapter_len", "adapter_layers"]),
    ("data", &["path", "template", "prompt_input", "prompt_no_input", "cutoff_len", "train_on_inputs", "val_size", "group_by_length"]),
    ("train", &["seed", "micro_batch_size", "gradient_accumulation_steps", "epochs", "max_steps", "lr", "lr_scheduler",
        "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "eval_steps", "logging_steps",
        "save_steps", "keep_checkpoints", "on_nonfinite", "gradient_checkpointing", "loss_chunk_tokens", "padding_free"]),
    ("output", &["dir"]),
];

impl Recipe {
    /// Reads `path`, applies `overrides` (`section.key=value`, value in TOML syntax or a bare
    /// string) and resolves relative paths against the recipe's folder.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        Self::load_with_env(path, &[], overrides)
    }

    /// As [`Recipe::load`], with `env` (`EMBER_<SECTION>__<KEY>` variables as (name, value), see
    /// [`env_overrides`]) applied before `overrides`, so `--set` wins.
    pub fn load_with_env(path: &Path, env: &[(String, String)], overrides: &[String]) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io { path: path.to_path_buf(), source })?;
        Self::parse(path, &text, env, overrides)
    }

    /// A recipe from its `text`, then `env` and `overrides` as in [`Recipe::load_with_env`];
    /// `path` names it in errors and anchors its relative paths.
    pub fn parse(path: &Path, text: &str, env: &[(String, String)], overrides: &[String]) -> Result<Self, RecipeError> {
        let invalid = |reason: String| RecipeError::Invalid { path: path.to_path_buf(), reason };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| invalid(format!("invalid TOML: {}", e.message())))?;
        for (name, value) in env {
            let key = name.strip_prefix(ENV_PREFIX).unwrap_or(name).to_lowercase().replacen("__", ".", 1);
            // Checked here, not with the rest, so that the error names the variable.
            key.split_once('.').map_or(Err(format!("unknown key '{key}'")), |(section, name)| check_key(section, name))
                .and_then(|()| apply_override(&mut table, &format!("{key}={value}")))
                .map_err(|e| invalid(format!("environment variable {name}: {e}")))?;
        }
        for item in overrides {
            apply_override(&mut table, item).map_err(invalid)?;
        }
        check_keys(&table).map_err(invalid)?;
        // Through text so that type errors carry a span, which names the key.
        let text = toml::to_string(&table).map_err(|e| invalid(e.to_string()))?;
        let mut recipe: Recipe = toml::from_str(&text).map_err(|e| {
            let message = e.message().replace('\n', " ");
            match e.span().and_then(|span| key_at(&text, span.start)) {
                Some(key) => invalid(format!("'{key}': {message}")),
                None => invalid(message),
            }
        })?;
        recipe.validate().map_err(invalid)?;
        // Absolute, so adapters record a base path that works from any folder.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        for p in [&mut recipe.model.path, &mut recipe.data.path, &mut recipe.output.dir].into_iter().chain(recipe.adapter.init_from.as_mut()) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        let positive = [("train.micro_batch_size", t.micro_batch_size), ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("data.cutoff_len", self.data.cutoff_len), ("adapter.r", self.adapter.r)];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("'{key}' must be at least 1"));
            }
        }
        if t.epochs == 0 && t.max_steps == 0 {
            return Err("'train.epochs' and 'train.max_steps' are both 0: nothing to train".into());
        }
        if !["constant", "linear", "cosine"].contains(&t.lr_scheduler.as_str()) {
            return Err(format!("'train.lr_scheduler' is '{}'; expected constant, linear or cosine", t.lr_scheduler));
        }
        if !["stop", "skip"].contains(&t.on_nonfinite.as_str()) {
            return Err(format!("'train.on_nonfinite' is '{}'; expected stop or skip", t.on_nonfinite));
        }
        if !(0.0..1.0).contains(&self.adapter.dropout) {
            return Err(format!("'adapter.dropout' is {}; expected 0 <= dropout < 1", self.adapter.dropout));
        }
        let a = &self.adapter;
        match a.method.as_str() {
            "lora" => {}
            "prefix" if a.init_from.is_some() => {}
            "prefix" => match a.num_virtual_tokens {
                None | Some(0) => return Err("'adapter.num_virtual_tokens' must be at least 1 with method = \"prefix\"".into()),
                Some(_) => {}
            },
            "adaption" if a.init_from.is_some() => {}
            "adaption" => {
                for (key, value) in [("adapter.adapter_len", a.adapter_len), ("adapter.adapter_layers", a.adapter_layers)] {
                    if value.unwrap_or(0) == 0 {
                        return Err(format!("'{key}' must be at least 1 with method = \"adaption\""));
                    }
                }
            }
            other => return Err(format!("'adapter.method' is '{other}'; expected lora, prefix or adaption")),
        }
        Ok(())
    }
}

/// `section.key` of the `key = value` line at byte `offset` of a serialized recipe.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let section = before[..line_start].lines().rev().find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))?;
    Some(format!("{section}.{key}"))
}

/// `train.lr=1e-4` -> table["train"]["lr"] = 1e-4
fn apply_override(table: &mut toml::Table, item: &str) -> Result<(), String> {
    let (key, raw) = item.split_once('=').ok_or_else(|| format!("--set '{item}': expected section.key=value"))?;
    let (section, name) = key.trim().split_once('.').ok_or_else(|| format!("--set '{item}': key must be section.key"))?;
    // A TOML value if it parses as one, else the raw text as a string.
    let value = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| Value::String(raw.to_owned()));
    let section = table.entry(section.to_owned()).or_insert_with(|| Value::Table(Default::default()));
    let section = section.as_table_mut().ok_or_else(|| format!("--set '{item}': '{key}' is not in a section"))?;
    section.insert(name.to_owned(), value);
    Ok(())
}

/// Prefix of the environment variables that override recipe keys: `EMBER_TRAIN__MAX_STEPS=3`
/// sets `train.max_steps`.
pub const ENV_PREFIX: &str = "EMBER_";

/// The process's `EMBER_<SECTION>__<KEY>` variables, sorted by name. Other `EMBER_` variables
/// (`EMBER_DEVICE`, `EMBER_FIXTURES`) have no `__` and are not recipe keys.
pub fn env_overrides() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> =
        std::env::vars().filter(|(name, _)| name.strip_prefix(ENV_PREFIX).is_some_and(|rest| rest.contains("__"))).collect();
    vars.sort();
    vars
}

fn check_keys(table: &toml::Table) -> Result<(), String> {
    for (section, value) in table {
        check_key(section, "")?;
        let Some(inner) = value.as_table() else { return Err(format!("'{section}' must be a table ([{section}])")) };
        for key in inner.keys() {
            check_key(section, key)?;
        }
    }
    Ok(())
}

/// Whether `section.key` is a recipe key (with an empty `key`: whether `section` is a section).
fn check_key(section: &str, key: &str) -> Result<(), String> {
    let Some((_, keys)) = KEYS.iter().find(|(s, _)| *s == section) else {
        let sections: Vec<&str> = KEYS.iter().map(|(s, _)| *s).collect();
        return Err(unknown(section, &sections));
    };
    if key.is_empty() || keys.contains(&key) {
        return Ok(());
    }
    let full: Vec<String> = keys.iter().map(|k| format!("{section}.{k}")).collect();
    Err(unknown(&format!("{section}.{key}"), &full.iter().map(String::as_str).collect::<Vec<_>>()))
}

fn unknown(key: &str, valid: &[&str]) -> String {
    let nearest = valid.iter().min_by_key(|v| edit_distance(key, v)).filter(|v| edit_distance(key, v) <= 3);
    match nearest {
        Some(v) => format!("unknown key '{key}' (did you mean '{v}'?)"),
        None => format!("unknown key '{key}' (valid: {})", valid.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npath = \"m\"\n[adapter]\nmethod = \"lora\"\n[data]\npath = \"d.json\"\n[output]\ndir = \"out\"\n";

    fn load(text: &str, overrides: &[&str]) -> Result<Recipe, String> {
        load_with_env(text, &[], overrides)
    }

    #[test]
    fn minimal_recipe_gets_defaults_and_resolved_paths() {
        let r = load(MINIMAL, &[]).unwrap();
        assert_eq!(r.train.micro_batch_size, 4);
        assert!(r.model.path.ends_with("m") && r.model.path.is_absolute());
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let e = load(&format!("{MINIMAL}[train]\nlrr = 1.0\n"), &[]).unwrap_err();
        assert!(e.contains("unknown key 'train.lrr' (did you mean 'train.lr'?)"), "{e}");
        let e = load(MINIMAL, &["trian.lr=1"]).unwrap_err();
        assert!(e.contains("did you mean 'train'"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = load(&format!("{MINIMAL}[train]\nlr = \"fast\"\n"), &[]).unwrap_err();
        assert!(e.contains("'train.lr': invalid type: string \"fast\", expected f64"), "{e}");
    }

    #[test]
    fn every_shipped_recipe_parses_and_validates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        let mut checked = 0;
        for dir in [root.clone(), root.join("ci")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                    checked += 1;
                }
            }
        }
        assert!(checked >= 7, "found {checked} recipes");
    }

    #[test]
    fn prefix_and_adaption_need_their_sizes() {
        let prefix = MINIMAL.replace("method = \"lora\"", "method = \"prefix\"");
        let e = load(&prefix, &[]).unwrap_err();
        assert!(e.contains("'adapter.num_virtual_tokens' must be at least 1"), "{e}");
        let adaption = MINIMAL.replace("method = \"lora\"", "method = \"adaption\"");
        let e = load(&adaption, &["adapter.adapter_len=10"]).unwrap_err();
        assert!(e.contains("'adapter.adapter_layers' must be at least 1"), "{e}");
    }

    fn load_with_env(text: &str, env: &[(&str, &str)], overrides: &[&str]) -> Result<Recipe, String> {
        let dir = std::env::temp_dir().join(format!("ember-recipe-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.toml");
        std::fs::write(&path, text).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Recipe::load_with_env(&path, &env, &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(|e| e.to_string())
    }

    #[test]
    fn env_variables_override_and_set_wins() {
        let env = [("EMBER_TRAIN__MAX_STEPS", "3"), ("EMBER_DATA__CUTOFF_LEN", "64"), ("EMBER_TRAIN__LR", "0.1")];
        let r = load_with_env(MINIMAL, &env, &["train.lr=1e-4"]).unwrap();
        assert_eq!((r.train.max_steps, r.data.cutoff_len, r.train.lr), (3, 64, 1e-4));
        let r = load_with_env(MINIMAL, &[("EMBER_ADAPTER__TARGET_MODULES", "all-linear")], &[]).unwrap();
        assert!(matches!(r.adapter.target_modules, TargetModules::One(ref s) if s == "all-linear"));
    }

    #[test]
    fn unknown_env_keys_name_the_variable() {
        let e = load_with_env(MINIMAL, &[("EMBER_TRAIN__MAX_STEP", "3")], &[]).unwrap_err();
        assert!(e.contains("environment variable EMBER_TRAIN__MAX_STEP: unknown key 'train.max_step' (did you mean 'train.max_steps'?)"), "{e}");
        let e = load_with_env(MINIMAL, &[("EMBER_TRIAN__LR", "3")], &[]).unwrap_err();
        assert!(e.contains("EMBER_TRIAN__LR: unknown key 'trian' (did you mean 'train'?)"), "{e}");
        let e = load_with_env(MINIMAL, &[("EMBER_TRAIN__LR", "fast")], &[]).unwrap_err();
        assert!(e.contains("'train.lr': invalid type"), "{e}");
    }

    #[test]
    fn overrides_parse_toml_values() {
        let r = load(MINIMAL, &["train.lr=1e-4", "adapter.target_modules=all-linear", "train.max_steps=3"]).unwrap();
        assert_eq!(r.train.lr, 1e-4);
        assert_eq!(r.train.max_steps, 3);
        assert!(matches!(r.adapter.target_modules, TargetModules::One(ref s) if s == "all-linear"));
    }
}
