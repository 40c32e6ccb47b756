//! Recipe files: one TOML file describes a whole run, so it runs the same on a laptop, a GPU
//! box and in CI. `EMBER_<SECTION>__<KEY>=value` environment variables, then
//! `--set section.key=value`, override any key.

use std::path::{Path, PathBuf};

use ember_adapters::Method;
use ember_models::LoadDtype;
use ember_models::gguf_write::ExportType;
use ember_models::hub::{self, Fetch};
use ember_models::nf4::Quantization;
use ember_models::device::DeviceName;
use serde::Deserialize;
use toml::Value;

use crate::merge::MergeDtype;
pub use crate::schedule::{LrScheduler, SchedulerKwargs};
use crate::step::StepOptions;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// `model.path` (a hub id) or a data path (a hub dataset's file) could not be found or
    /// downloaded.
    #[error("{}: '{key}': {source}", path.display())]
    Hub { path: PathBuf, key: &'static str, source: ember_models::LoadError },
}

impl RecipeError {
    /// Whether the recipe is at fault, not the run (a download that failed on the network).
    pub fn is_input(&self) -> bool {
        match self {
            RecipeError::Hub { source, .. } => source.is_input(),
            _ => true,
        }
    }
}

/// A whole run: the recipe file after overrides, validated, its paths absolute.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
    pub export: ExportSection,
    /// The recipe as applied (environment and `--set` overrides included), as TOML.
    pub text: String,
}

/// The file as written; `[adapter]` is read by the chosen method.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    model: ModelSection,
    adapter: toml::Table,
    data: DataSection,
    #[serde(default)]
    train: TrainSection,
    output: OutputSection,
    #[serde(default)]
    export: ExportSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF model folder.
    pub path: PathBuf,
    /// `flex` (CPU), `libtorch`, `cuda`, `cuda:N`.
    #[serde(default = "default_device")]
    pub device: DeviceName,
    /// Frozen base dtype: `f32`, `bf16`, or `checkpoint` to keep the file's (bf16/f16 on GPUs).
    /// Adapter parameters and optimizer state are f32 in every case.
    #[serde(default = "default_dtype")]
    pub dtype: LoadDtype,
    /// `none`, `nf4` (QLoRA: the decoder projections in 4 bits) or `int8`, quantized while loading.
    #[serde(default)]
    pub quantize: QuantizeKind,
    /// With `nf4`: the block scales in 8 bits too (bitsandbytes' `bnb_4bit_use_double_quant`).
    #[serde(default)]
    pub double_quant: bool,
    /// Grow the embedding and LM head to the tokenizer's vocabulary when it has more ids (an
    /// extended vocabulary); new rows start at the mean of the old ones.
    #[serde(default)]
    pub resize_embeddings: bool,
}

impl ModelSection {
    /// The vocabulary the model must have for `tokenizer_ids` ids: its own, or the tokenizer's
    /// with `resize_embeddings`. A tokenizer with more ids than the embedding has rows is an
    /// error otherwise.
    pub fn vocab_for(&self, tokenizer_ids: usize, model_vocab: usize) -> Result<usize, String> {
        if tokenizer_ids <= model_vocab {
            return Ok(model_vocab);
        }
        if self.resize_embeddings {
            return Ok(tokenizer_ids);
        }
        Err(format!(
            "the tokenizer has {tokenizer_ids} ids but the model's embedding has {model_vocab} rows; set model.resize_embeddings = true to grow it (an extended vocabulary)"
        ))
    }
}

/// `model.quantize`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizeKind {
    #[default]
    None,
    Nf4,
    Int8,
}

impl ModelSection {
    /// `quantize` with `double_quant`.
    pub fn quantization(&self) -> Option<Quantization> {
        self.checked_quantization().expect("checked when the recipe loaded")
    }

    fn checked_quantization(&self) -> Result<Option<Quantization>, String> {
        let name = match self.quantize {
            QuantizeKind::None => "none",
            QuantizeKind::Nf4 => "nf4",
            QuantizeKind::Int8 => "int8",
        };
        Quantization::from_name(name, self.double_quant)
    }
}

/// `[adapter]`: the method with its own keys (see each method's section type in the adapters
/// crate), or an existing adapter to start from.
#[derive(Debug, Clone)]
pub struct AdapterSection {
    pub method: Method,
    /// Start from an existing adapter (e.g. one trained by PEFT) instead of a fresh one; its own
    /// config (r, alpha, targets…) then applies.
    pub init_from: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSON arrays, JSONL or Parquet of Alpaca, ShareGPT or OpenAI-messages records (key
    /// `path`): one file, or a list of files whose records are concatenated (LLaMA-Factory's
    /// `dataset: a,b`); a folder or a file-name pattern stands for the data files it holds or
    /// matches ([`ember_data::dataset::expand_paths`]).
    #[serde(default, rename = "path", deserialize_with = "one_or_more_paths")]
    pub paths: Vec<PathBuf>,
    /// Files held out for evaluation (key `eval_path`, one or a list), instead of `val_size`
    /// records of `path` (HF's `eval_dataset`, LLaMA-Factory's `eval_dataset`).
    #[serde(default, rename = "eval_path", deserialize_with = "one_or_more_paths")]
    pub eval_paths: Vec<PathBuf>,
    /// Prompt template (alpaca, alpaca-lora, or `custom`), or chat template (chatglm2, chatglm3,
    /// glm4, llama2-chat, llama3, chatml, `auto`: the checkpoint's own, or a `.jinja` file,
    /// relative to the recipe).
    #[serde(default = "default_template")]
    pub template: String,
    /// With `template = "custom"`: prompts with `{instruction}` and `{input}` placeholders.
    pub prompt_input: Option<String>,
    pub prompt_no_input: Option<String>,
    #[serde(default = "default_cutoff")]
    pub cutoff_len: usize,
    #[serde(default)]
    pub train_on_inputs: bool,
    /// Conversations: loss on the last assistant turn only (default: every assistant turn).
    #[serde(default)]
    pub mask_history: bool,
    /// Records held out for evaluation (taken after a seeded shuffle): a number, or a fraction
    /// below 1.
    #[serde(default)]
    pub val_size: ValSize,
    /// Batch examples of similar length together (fewer pad tokens), as HF `group_by_length`.
    #[serde(default)]
    pub group_by_length: bool,
    /// Plain text (`template = "text"`): a folder where the first run keeps the corpus's token
    /// ids, which later runs read instead of tokenizing again (LLaMA-Factory's `tokenized_path`).
    pub tokenized_path: Option<PathBuf>,
    /// Records whose keys are not ember's: which key holds the instruction, input, answer, …
    /// (`[data.columns]`, LLaMA-Factory's `columns`: prompt, query, response, system, history,
    /// messages, text).
    #[serde(default)]
    pub columns: ember_data::columns::Columns,
    /// A conversation's turn keys and role names (`[data.tags]`, LLaMA-Factory's `tags`).
    #[serde(default)]
    pub tags: ember_data::columns::Tags,
    /// Datasets by name in `dataset_dir`'s `dataset_info.json` (LLaMA-Factory's `dataset`: "a,b"
    /// or a list); their files come after `path`'s, each read with its entry's columns and tags.
    #[serde(default, deserialize_with = "names")]
    pub dataset: Vec<String>,
    /// The same for evaluation (LLaMA-Factory's `eval_dataset`), after `eval_path`'s files.
    #[serde(default, deserialize_with = "names")]
    pub eval_dataset: Vec<String>,
    /// The folder of `dataset_info.json` (default `data`, as LLaMA-Factory's).
    pub dataset_dir: Option<PathBuf>,
    /// At most this many records of each dataset, its first (LLaMA-Factory's `max_samples`, for
    /// quick runs): each entry of `path` and `eval_path` (a file, folder or pattern) and each
    /// name of `dataset` and `eval_dataset` is one dataset.
    pub max_samples: Option<usize>,
    /// The data entries' own mappings, by file (filled while loading).
    #[serde(skip)]
    file_mappings: Vec<(PathBuf, ember_data::Mapping)>,
    /// The datasets that `paths`' and `eval_paths`' files make up, in file order (filled while
    /// loading).
    #[serde(skip)]
    groups: [Vec<FileGroup>; 2],
}

/// One dataset's files, consecutive in `data.path`'s (or `data.eval_path`'s) list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileGroup {
    pub files: usize,
    /// Records drawn with the seed instead of the records as they are (a `dataset_info.json`
    /// entry's `num_samples`).
    pub num_samples: Option<usize>,
}

impl DataSection {
    /// How each file's records' keys are renamed before they are read.
    pub fn mappings(&self) -> ember_data::Mappings {
        let default = ember_data::Mapping { columns: self.columns.clone(), tags: self.tags.clone() };
        ember_data::Mappings::new(default, self.file_mappings.clone())
    }

    /// `dataset`'s and `eval_dataset`'s files after `path`'s and `eval_path`'s, with their
    /// entries' mappings: a file or folder beside `dataset_info.json` (relative to
    /// `dataset_dir`, itself relative to `base`), or a hub dataset's train split.
    fn add_datasets(&mut self, base: &Path, fetch: Fetch) -> Result<(), String> {
        if self.dataset.is_empty() && self.eval_dataset.is_empty() {
            return Ok(());
        }
        let dir = base.join(self.dataset_dir.clone().unwrap_or_else(|| PathBuf::from("data")));
        let info = ember_data::dataset_info::DatasetInfo::read(&dir).map_err(|e| format!("'data.dataset_dir': {e}"))?;
        let [train_groups, eval_groups] = &mut self.groups;
        for (key, names, paths, groups) in [("data.dataset", &self.dataset, &mut self.paths, train_groups), ("data.eval_dataset", &self.eval_dataset, &mut self.eval_paths, eval_groups)] {
            for name in names {
                let entry = info.entry(name).map_err(|e| format!("'{key}': {e}"))?;
                let files = match &entry.source {
                    ember_data::dataset_info::Source::File(file) => ember_data::dataset::expand_paths(&[dir.join(file)]).map_err(|e| format!("'{key}': dataset '{name}': {e}"))?,
                    ember_data::dataset_info::Source::Hub(id) => hub::dataset_files(Path::new(&format!("hf://datasets/{id}")), &entry.split, fetch).map_err(|e| format!("'{key}': dataset '{name}': {e}"))?,
                };
                let mapping = if self.template == ember_data::sft::TEXT_TEMPLATE { entry.text_mapping() } else { entry.mapping.clone() };
                if entry.num_samples.is_some() && self.template == ember_data::sft::TEXT_TEMPLATE {
                    return Err(format!("'{key}': dataset '{name}': 'num_samples' draws records, and a plain-text corpus (template \"text\") is read whole"));
                }
                groups.push(FileGroup { files: files.len(), num_samples: entry.num_samples });
                for file in files {
                    self.file_mappings.push((file.clone(), mapping.clone()));
                    paths.push(file);
                }
            }
        }
        Ok(())
    }

    /// The datasets that `path`'s files make up, and those of `eval_path`'s.
    pub fn groups(&self) -> &[Vec<FileGroup>; 2] {
        &self.groups
    }

    /// `path`'s files, then `eval_path`'s.
    pub fn all_paths(&self) -> Vec<PathBuf> {
        [self.paths.as_slice(), self.eval_paths.as_slice()].concat()
    }

    /// The data files as messages name them: `a.json`, or `a.json + b.json`, then the
    /// evaluation files if any.
    pub fn describe(&self) -> String {
        let join = |paths: &[PathBuf]| paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" + ");
        match self.eval_paths.is_empty() {
            true => join(&self.paths),
            false => format!("{} (eval: {})", join(&self.paths), join(&self.eval_paths)),
        }
    }
}

/// `data.val_size`: a number of records, or a fraction of them (LLaMA-Factory's `val_size = 0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ValSize {
    #[default]
    None,
    Records(usize),
    /// Above 0 and below 1.
    Fraction(f64),
}

impl ValSize {
    /// Whether any record is held out.
    pub fn holds_out(self) -> bool {
        self != ValSize::None
    }

    /// How many of `records` are held out: a fraction rounds up, as `datasets`' `train_test_split`.
    pub fn of(self, records: usize) -> usize {
        match self {
            ValSize::None => 0,
            ValSize::Records(n) => n,
            ValSize::Fraction(f) => (f * records as f64).ceil() as usize,
        }
    }
}

impl std::fmt::Display for ValSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValSize::None => write!(f, "0"),
            ValSize::Records(n) => write!(f, "{n}"),
            ValSize::Fraction(x) => write!(f, "{x}"),
        }
    }
}

impl<'de> Deserialize<'de> for ValSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Records(u64),
            Fraction(f64),
        }
        match Raw::deserialize(deserializer) {
            Ok(Raw::Records(0)) => Ok(ValSize::None),
            Ok(Raw::Records(n)) => Ok(ValSize::Records(n as usize)),
            Ok(Raw::Fraction(f)) if f > 0.0 && f < 1.0 => Ok(ValSize::Fraction(f)),
            _ => Err(serde::de::Error::custom("expected a number of records, or a fraction above 0 and below 1")),
        }
    }
}

/// A recipe value given as one item or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMore<T> {
    One(T),
    More(Vec<T>),
}

/// `data.dataset`: names separated by commas (LLaMA-Factory's form), or a list.
fn names<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let names = match OneOrMore::<String>::deserialize(deserializer) {
        Ok(OneOrMore::One(names)) => names.split(',').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect(),
        Ok(OneOrMore::More(names)) => names,
        Err(_) => return Err(serde::de::Error::custom("expected dataset names: \"a,b\" or a list")),
    };
    match names.is_empty() {
        true => Err(serde::de::Error::custom("no dataset names")),
        false => Ok(names),
    }
}

/// `data.path`: a path, or a list of paths (empty: none, where `data.dataset` names the data).
fn one_or_more_paths<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<PathBuf>, D::Error> {
    match OneOrMore::<PathBuf>::deserialize(deserializer) {
        Ok(OneOrMore::One(path)) => Ok(vec![path]),
        Ok(OneOrMore::More(paths)) => Ok(paths),
        Err(_) => Err(serde::de::Error::custom("expected a path string or a list of path strings")),
    }
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
    /// By transformers' names ([`LrScheduler`]).
    pub lr_scheduler: LrScheduler,
    /// The schedule's own arguments (`num_cycles`, `min_lr_rate`, …), as transformers'
    /// `lr_scheduler_kwargs`.
    pub lr_scheduler_kwargs: SchedulerKwargs,
    pub warmup_steps: usize,
    /// Warmup as a fraction of the run's optimizer steps, `⌈ratio · steps⌉` (transformers'
    /// `warmup_ratio`, LLaMA-Factory's); instead of `warmup_steps`.
    pub warmup_ratio: f64,
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
    pub on_nonfinite: OnNonfinite,
    /// Activation checkpointing per decoder layer: keep each layer's input and post-attention
    /// residual only, recompute the layer in backward without its o/down products (less memory,
    /// about a fifth more compute; same gradients).
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`: recompute one trainable decoder layer in this many (from
    /// the lowest), the others keeping their graph: 1 recomputes all; 2 half of them, for about
    /// half the extra compute and more memory (torchtune's selective activation checkpointing).
    pub gradient_checkpointing_every: usize,
    /// LM head + cross-entropy over at most this many supervised tokens at a time (0: all at
    /// once); bounds the `[tokens, vocab]` f32 logits. Same loss and gradients.
    pub loss_chunk_tokens: usize,
    /// Pack each micro-batch's sequences into one row without padding, so no compute goes to
    /// pad tokens (HF's padding-free training). Same loss and gradients up to float rounding.
    pub padding_free: bool,
    /// Where else to log: `["tensorboard"]` writes event files under `<output.dir>/tensorboard/`.
    pub report_to: Vec<ReportTo>,
    /// Stop when this many evaluations in a row do not lower the best eval loss (transformers'
    /// `EarlyStoppingCallback`). 0: off. Needs held-out data and `eval_steps`.
    pub early_stopping_patience: usize,
    /// The saved adapter is the one of the best evaluation, not the last step's (transformers'
    /// `load_best_model_at_end`); kept in `<output.dir>/best_adapter/` while training.
    pub load_best_model_at_end: bool,
    /// LoRA+ (PEFT's `create_loraplus_optimizer`): B matrices and every vector (biases, DoRA's
    /// magnitudes) at this multiple of the learning rate. 0: off. LoRA and DoRA only.
    pub loraplus_lr_ratio: f64,
    /// With LoRA+: the learning rate of a LoRA on the embedding (PEFT's default 1e-6).
    pub loraplus_lr_embedding: f64,
    /// NEFTune: uniform noise on the token embeddings while training, of magnitude
    /// `alpha / √(len · hidden)` (transformers' `neftune_noise_alpha`; the paper's Alpaca runs
    /// used 5). 0: off. Evaluation and generation see no noise.
    pub neftune_noise_alpha: f64,
}

/// `train.report_to` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    Tensorboard,
}

impl TrainSection {
    /// How each micro-batch is computed.
    pub fn step_options(&self) -> StepOptions {
        StepOptions {
            checkpoint_every: StepOptions::checkpoint_every(self.gradient_checkpointing, self.gradient_checkpointing_every),
            loss_chunk_tokens: self.loss_chunk_tokens,
            padding_free: self.padding_free,
        }
    }

    /// NEFTune's alpha when it is on.
    pub fn neftune(&self) -> Option<f64> {
        (self.neftune_noise_alpha > 0.0).then_some(self.neftune_noise_alpha)
    }

    /// Warmup steps of a run of `total` optimizer steps.
    pub fn warmup(&self, total: usize) -> usize {
        if self.warmup_ratio > 0.0 { (self.warmup_ratio * total as f64).ceil() as usize } else { self.warmup_steps }
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
            lr_scheduler: LrScheduler::Linear,
            lr_scheduler_kwargs: SchedulerKwargs::default(),
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            eval_steps: 0,
            logging_steps: 10,
            save_steps: 0,
            keep_checkpoints: 2,
            on_nonfinite: OnNonfinite::Stop,
            gradient_checkpointing: false,
            gradient_checkpointing_every: 1,
            loss_chunk_tokens: 0,
            padding_free: true,
            report_to: Vec::new(),
            neftune_noise_alpha: 0.0,
            loraplus_lr_ratio: 0.0,
            loraplus_lr_embedding: 1e-6,
            early_stopping_patience: 0,
            load_best_model_at_end: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
}

/// `[export]`: what the run writes after its adapter, for serving: the merged model as llama.cpp
/// files (`ember export gguf`) and as an HF folder (`ember merge`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSection {
    /// GGUF types (`f16`, `q8_0`, `q4_k_m`, …), each written to `<output.dir>/gguf/model-<type>.gguf`.
    pub gguf: Vec<String>,
    /// Quantize them with an importance matrix of the training examples (`ember imatrix`,
    /// written to `<output.dir>/gguf/imatrix.gguf`).
    pub imatrix: bool,
    /// The matrix's chunks of 512 tokens, at most.
    pub imatrix_chunks: usize,
    /// llama.cpp's pre-tokenizer name for a byte-level BPE it does not recognise (`--pre`).
    pub pre: Option<String>,
    /// The merged model as an HF folder in `<output.dir>/merged/`, in `keep`, `f32`, `bf16` or `f16`.
    pub merged: Option<String>,
}

impl Default for ExportSection {
    fn default() -> Self {
        Self { gguf: Vec::new(), imatrix: false, imatrix_chunks: 100, pre: None, merged: None }
    }
}

impl ExportSection {
    /// Whether the run writes anything besides its adapter.
    pub fn any(&self) -> bool {
        !self.gguf.is_empty() || self.merged.is_some()
    }

    /// `gguf` as types, in order.
    pub fn gguf_types(&self) -> Vec<ExportType> {
        self.gguf.iter().map(|name| ExportType::parse(name).expect("checked when the recipe loaded")).collect()
    }

    /// `merged` as a dtype.
    pub fn merged_dtype(&self) -> Option<MergeDtype> {
        self.merged.as_deref().map(|name| MergeDtype::parse(name).expect("checked when the recipe loaded"))
    }

    fn check(&self, method: &Method) -> Result<(), String> {
        let mut types = Vec::new();
        for name in &self.gguf {
            let ty = ExportType::parse(name).ok_or_else(|| format!("'export.gguf': '{name}' is not a GGUF type (expected {})", ExportType::names()))?;
            if types.contains(&ty) {
                return Err(format!("'export.gguf': '{name}' is listed twice"));
            }
            types.push(ty);
        }
        if let Some(name) = &self.merged {
            MergeDtype::parse(name).ok_or_else(|| format!("'export.merged': '{name}' is not a dtype (expected keep, f32, bf16 or f16)"))?;
        }
        if self.imatrix && !types.iter().any(|ty| ty.quantized()) {
            return Err("'export.imatrix' weighs quantization: list a quantized type (q4_k_m, iq4_xs, …) in 'export.gguf'".into());
        }
        if self.imatrix && self.imatrix_chunks == 0 {
            return Err("'export.imatrix_chunks' must be at least 1".into());
        }
        if !self.imatrix && let Some(name) = self.gguf.iter().find(|name| ExportType::parse(name).is_some_and(ExportType::requires_importance)) {
            return Err(format!("'export.gguf': '{name}' needs an importance matrix, as llama-quantize does: set export.imatrix = true"));
        }
        if self.any() && !method.config().merges_into_weights() {
            return Err(format!(
                "'export': a {} adapter does not merge into the weights (its parameters are extra inputs, not a change of weights); export needs lora, dora or ia3",
                method.config().name()
            ));
        }
        Ok(())
    }
}

/// What a NaN/inf loss or gradient norm does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonfinite {
    /// Exit 1, naming the last good checkpoint.
    Stop,
    /// Skip the optimizer step.
    Skip,
}

fn default_device() -> DeviceName {
    DeviceName::Flex
}
fn default_dtype() -> LoadDtype {
    LoadDtype::F32
}
fn default_template() -> String {
    "alpaca".into()
}
fn default_cutoff() -> usize {
    256
}

/// Every key a recipe may hold, by section (for "did you mean" suggestions).
const KEYS: &[(&str, &[&str])] = &[
    ("model", &["path", "device", "dtype", "quantize", "double_quant", "resize_embeddings"]),
    // The method's own keys come from its section type (`adapter_keys`).
    ("adapter", &["method", "init_from"]),
    ("data", &["path", "eval_path", "template", "prompt_input", "prompt_no_input", "cutoff_len", "train_on_inputs", "mask_history", "val_size", "group_by_length", "tokenized_path", "columns", "tags", "dataset", "eval_dataset", "dataset_dir", "max_samples"]),
    ("train", &["seed", "micro_batch_size", "gradient_accumulation_steps", "epochs", "max_steps", "lr", "lr_scheduler", "lr_scheduler_kwargs",
        "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "eval_steps", "logging_steps",
        "save_steps", "keep_checkpoints", "on_nonfinite", "gradient_checkpointing", "gradient_checkpointing_every", "loss_chunk_tokens", "padding_free", "report_to",
        "neftune_noise_alpha", "loraplus_lr_ratio", "loraplus_lr_embedding", "early_stopping_patience", "load_best_model_at_end"]),
    ("output", &["dir"]),
    ("export", &["gguf", "imatrix", "imatrix_chunks", "pre", "merged"]),
];

impl Recipe {
    /// Reads `path`, applies `overrides` (`section.key=value`, value in TOML syntax or a bare
    /// string) and resolves relative paths against the recipe's folder.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        Self::load_with_env(path, &[], overrides, Fetch::Download)
    }

    /// As [`Recipe::load`], with `env` (`EMBER_<SECTION>__<KEY>` variables as (name, value), see
    /// [`env_overrides`]) applied before `overrides`, so `--set` wins. A `model.path` that is a
    /// hub id is downloaded into the cache only if `fetch` says so.
    pub fn load_with_env(path: &Path, env: &[(String, String)], overrides: &[String], fetch: Fetch) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io { path: path.to_path_buf(), source })?;
        Self::parse(path, &text, env, overrides, fetch)
    }

    /// A recipe from its `text`, then `env` and `overrides` as in [`Recipe::load_with_env`];
    /// `path` names it in errors and anchors its relative paths.
    pub fn parse(path: &Path, text: &str, env: &[(String, String)], overrides: &[String], fetch: Fetch) -> Result<Self, RecipeError> {
        let invalid = |reason: String| RecipeError::Invalid { path: path.to_path_buf(), reason };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| invalid(format!("invalid TOML: {}", e.message())))?;
        for (name, value) in env {
            // `__` separates as `.` does (`EMBER_TRAIN__LR_SCHEDULER_KWARGS__MIN_LR_RATE`).
            let key = name.strip_prefix(ENV_PREFIX).unwrap_or(name).to_lowercase().replace("__", ".");
            // Checked here, not with the rest, so that the error names the variable.
            let mut parts = key.split('.');
            let (section, first) = (parts.next().unwrap_or_default(), parts.next());
            first.map_or(Err(format!("unknown key '{key}'")), |name| check_key(section, name, None))
                .and_then(|()| apply_override(&mut table, &format!("{key}={value}")))
                .map_err(|e| invalid(format!("environment variable {name}: {e}")))?;
        }
        for item in overrides {
            apply_override(&mut table, item).map_err(invalid)?;
        }
        check_keys(&table).map_err(invalid)?;
        // Through text so that type errors carry a span, which names the key.
        let text = toml::to_string(&table).map_err(|e| invalid(e.to_string()))?;
        let file: RecipeFile = toml::from_str(&text).map_err(|e| {
            let message = e.message().replace('\n', " ");
            match e.span().and_then(|span| key_at(&text, span.start)) {
                Some(key) => invalid(format!("'{key}': {message}")),
                None => invalid(message),
            }
        })?;
        let adapter = AdapterSection::from_table(file.adapter).map_err(invalid)?;
        let mut recipe = Recipe { model: file.model, adapter, data: file.data, train: file.train, output: file.output, export: file.export, text };
        recipe.validate().map_err(invalid)?;
        // Absolute, so adapters record a base path that works from any folder.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        // model.path may be a hub id (`org/name[@revision]`) when no such folder exists here.
        let model = base.join(&recipe.model.path);
        if recipe.model.path.is_relative() && !model.exists() && hub::is_hub_id(&recipe.model.path.to_string_lossy()) {
            recipe.model.path = hub::model_dir(&recipe.model.path, fetch).map_err(|source| RecipeError::Hub { path: path.to_path_buf(), key: "model.path", source })?;
        }
        // Data files may be hub datasets' files (`hf://datasets/org/name/file.json`, or a pattern
        // of them).
        // A folder or pattern is the files it holds or matches; each entry is one dataset.
        let [train_groups, eval_groups] = &mut recipe.data.groups;
        for (key, paths, groups) in [("data.path", &mut recipe.data.paths, train_groups), ("data.eval_path", &mut recipe.data.eval_paths, eval_groups)] {
            let mut files = Vec::new();
            for p in paths.iter() {
                let resolved = match hub::is_dataset_url(&p.to_string_lossy()) {
                    true => hub::data_files(p, fetch).map_err(|source| RecipeError::Hub { path: path.to_path_buf(), key, source })?,
                    false => vec![base.join(p)],
                };
                let expanded = ember_data::dataset::expand_paths(&resolved).map_err(|reason| invalid(format!("'{key}': {reason}")))?;
                groups.push(FileGroup { files: expanded.len(), num_samples: None });
                files.extend(expanded);
            }
            *paths = files;
        }
        for p in [&mut recipe.model.path, &mut recipe.output.dir].into_iter().chain(recipe.adapter.init_from.as_mut()).chain(recipe.data.tokenized_path.as_mut()) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if ember_data::chat::is_jinja_file(&recipe.data.template) && Path::new(&recipe.data.template).is_relative() {
            recipe.data.template = base.join(&recipe.data.template).to_string_lossy().into_owned();
        }
        recipe.data.add_datasets(&base, fetch).map_err(|reason| invalid(reason))?;
        if recipe.export.any() && ember_models::gguf::GgufFile::is_gguf(&recipe.model.path) {
            return Err(invalid("'export': model.path is a GGUF file; the merged model is written from a full-precision folder (export the adapter with `ember export gguf-lora` instead)".into()));
        }
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), String> {
        if self.data.paths.is_empty() && self.data.dataset.is_empty() {
            return Err("no training data: give 'data.path' (files) or 'data.dataset' (names in dataset_info.json)".into());
        }
        self.model.checked_quantization().map_err(|e| format!("'model.double_quant': {e}"))?;
        let t = &self.train;
        let positive = [("train.micro_batch_size", t.micro_batch_size), ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
            ("train.gradient_checkpointing_every", t.gradient_checkpointing_every),
            ("data.cutoff_len", self.data.cutoff_len)];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("'{key}' must be at least 1"));
            }
        }
        // As torch's AdamW checks its arguments; NaN fails every range.
        let at_least_zero = [("train.lr", t.lr), ("train.weight_decay", t.weight_decay), ("train.adam_epsilon", t.adam_epsilon), ("train.max_grad_norm", t.max_grad_norm)];
        for (key, value) in at_least_zero {
            finite_at_least_zero(key, value)?;
        }
        for (key, value) in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(format!("'{key}' is {value}; expected 0 <= beta < 1"));
            }
        }
        t.lr_scheduler.check(&t.lr_scheduler_kwargs, t.lr)?;
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(format!("'train.warmup_ratio' is {}; expected 0 <= ratio < 1", t.warmup_ratio));
        }
        if t.warmup_ratio > 0.0 && t.warmup_steps > 0 {
            return Err("'train.warmup_steps' and 'train.warmup_ratio' are both set: give one".into());
        }
        if t.lr_scheduler == LrScheduler::Constant && (t.warmup_steps > 0 || t.warmup_ratio > 0.0) {
            return Err("'train.lr_scheduler': \"constant\" has no warmup (transformers' ignores its warmup steps): use \"constant_with_warmup\", or no warmup".into());
        }
        if !(t.neftune_noise_alpha >= 0.0 && t.neftune_noise_alpha.is_finite()) {
            return Err(format!("'train.neftune_noise_alpha' is {}; expected a finite alpha >= 0 (0: off)", t.neftune_noise_alpha));
        }
        if self.data.tokenized_path.is_some() && self.data.template != ember_data::sft::TEXT_TEMPLATE {
            return Err(format!("'data.tokenized_path' keeps a plain-text corpus's token ids: it needs data.template = \"{}\"", ember_data::sft::TEXT_TEMPLATE));
        }
        if self.data.max_samples.is_some() && self.data.template == ember_data::sft::TEXT_TEMPLATE {
            return Err("'data.max_samples' keeps a dataset's first records; a plain-text corpus (template \"text\") is read whole: cut its files instead".into());
        }
        if self.data.max_samples == Some(0) {
            return Err("'data.max_samples' must be at least 1".into());
        }
        if !self.data.eval_paths.is_empty() && self.data.val_size.holds_out() {
            return Err("'data.val_size' and 'data.eval_path' both hold records out for evaluation: give one".into());
        }
        if !(t.loraplus_lr_ratio >= 0.0 && t.loraplus_lr_ratio.is_finite()) || !(t.loraplus_lr_embedding > 0.0 && t.loraplus_lr_embedding.is_finite()) {
            return Err(format!("'train.loraplus_lr_ratio' ({}) must be >= 0 (0: off) and 'train.loraplus_lr_embedding' ({}) > 0", t.loraplus_lr_ratio, t.loraplus_lr_embedding));
        }
        if t.loraplus_lr_ratio > 0.0 && !matches!(self.adapter.method, Method::Lora(_) | Method::Dora(_)) {
            return Err(format!("'train.loraplus_lr_ratio': LoRA+ sets the rates of LoRA's A and B; method '{}' has neither", self.adapter.method.config().name()));
        }
        let held_out = self.data.val_size.holds_out() || !self.data.eval_paths.is_empty();
        if (t.early_stopping_patience > 0 || t.load_best_model_at_end) && !held_out {
            return Err("'train.early_stopping_patience' and 'train.load_best_model_at_end' judge by the eval loss: hold records out (data.val_size or data.eval_path)".into());
        }
        if t.early_stopping_patience > 0 && t.eval_steps == 0 {
            return Err("'train.early_stopping_patience' counts evaluations: set train.eval_steps".into());
        }
        if t.epochs == 0 && t.max_steps == 0 {
            return Err("'train.epochs' and 'train.max_steps' are both 0: nothing to train".into());
        }
        self.export.check(&self.adapter.method)
    }
}

impl AdapterSection {
    /// `[adapter]`: `method`, `init_from`, and the method's keys read by its section type.
    fn from_table(mut table: toml::Table) -> Result<Self, String> {
        let method = match table.remove("method") {
            Some(Value::String(name)) => name,
            Some(other) => return Err(format!("'adapter.method' must be a string, found {other}")),
            None => return Err(format!("'adapter.method' is missing (one of {})", Method::NAMES.join(", "))),
        };
        let init_from = match table.remove("init_from") {
            Some(Value::String(path)) => Some(PathBuf::from(path)),
            Some(other) => return Err(format!("'adapter.init_from' must be a path string, found {other}")),
            None => None,
        };
        let method = Method::from_recipe(&method, table).map_err(|e| if e.starts_with('\'') { e } else { format!("[adapter] of method '{method}': {e}") })?;
        Ok(Self { method, init_from })
    }
}

/// The `[adapter]` keys: `method` and `init_from`, then those of `method` (of every method when
/// it is not known yet).
fn adapter_keys(method: Option<&str>) -> Vec<String> {
    let mut keys = vec!["method".to_owned(), "init_from".to_owned()];
    match method.map(Method::section_keys) {
        Some(Ok(own)) => keys.extend(own),
        _ => {
            for name in Method::NAMES {
                keys.extend(Method::section_keys(name).unwrap_or_default().into_iter().filter(|k| !keys.contains(k)).collect::<Vec<_>>());
            }
        }
    }
    keys
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

/// `value` of recipe key `key` is a finite number >= 0 (NaN is not).
pub(crate) fn finite_at_least_zero(key: &str, value: f64) -> Result<(), String> {
    if value >= 0.0 && value.is_finite() { Ok(()) } else { Err(format!("'{key}' is {value}; expected a finite number >= 0")) }
}

/// `train.lr=1e-4` -> table["train"]["lr"] = 1e-4
fn apply_override(table: &mut toml::Table, item: &str) -> Result<(), String> {
    let (key, raw) = item.split_once('=').ok_or_else(|| format!("--set '{item}': expected section.key=value"))?;
    // `section.key`, or deeper into a table key: `train.lr_scheduler_kwargs.min_lr_rate`.
    let path: Vec<&str> = key.trim().split('.').collect();
    let Some((name, tables)) = path.split_last().filter(|(_, tables)| !tables.is_empty()) else {
        return Err(format!("--set '{item}': key must be section.key"));
    };
    let mut table = table;
    for (depth, part) in tables.iter().enumerate() {
        let inner = table.entry(part.to_string()).or_insert_with(|| Value::Table(Default::default()));
        table = inner.as_table_mut().ok_or_else(|| format!("--set '{item}': '{}' is not a table", path[..=depth].join(".")))?;
    }
    table.insert(name.to_string(), override_value(raw));
    Ok(())
}

/// An override's value: TOML if it parses as TOML (`3`, `true`, `["a"]`), else the raw text as
/// a string (`all-linear`).
pub fn override_value(raw: &str) -> Value {
    format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| Value::String(raw.to_owned()))
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
    let method = table.get("adapter").and_then(|a| a.get("method")).and_then(Value::as_str);
    for (section, value) in table {
        check_key(section, "", method)?;
        let Some(inner) = value.as_table() else { return Err(format!("'{section}' must be a table ([{section}])")) };
        for key in inner.keys() {
            check_key(section, key, method)?;
        }
    }
    Ok(())
}

/// Whether `section.key` is a recipe key (with an empty `key`: whether `section` is a section);
/// `[adapter]` keys are those of `method`.
fn check_key(section: &str, key: &str, method: Option<&str>) -> Result<(), String> {
    let Some((_, keys)) = KEYS.iter().find(|(s, _)| *s == section) else {
        let sections: Vec<&str> = KEYS.iter().map(|(s, _)| *s).collect();
        return Err(unknown(section, &sections));
    };
    let keys: Vec<String> = if section == "adapter" { adapter_keys(method) } else { keys.iter().map(|k| k.to_string()).collect() };
    if key.is_empty() || keys.iter().any(|k| k == key) {
        return Ok(());
    }
    let full: Vec<String> = keys.iter().map(|k| format!("{section}.{k}")).collect();
    let message = unknown(&format!("{section}.{key}"), &full.iter().map(String::as_str).collect::<Vec<_>>());
    Err(match (section, method) {
        ("adapter", Some(m)) => format!("{message}, for method '{m}'"),
        _ => message,
    })
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
        // A template of one's own is a file beside the recipe; built-in names stay names.
        let jinja = load(MINIMAL, &["data.template=\"templates/qwen.jinja\""]).unwrap().data.template;
        assert!(Path::new(&jinja).is_absolute() && jinja.ends_with("templates/qwen.jinja"), "{jinja}");
        assert_eq!(load(MINIMAL, &["data.template=\"chatml\""]).unwrap().data.template, "chatml");
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

    /// `data.path` takes one file or a list, each resolved against the recipe's folder.
    #[test]
    fn data_path_takes_a_list_of_files() {
        let r = load(MINIMAL, &["data.path=[\"en.json\", \"zh.jsonl.gz\"]"]).unwrap();
        assert_eq!(r.data.paths.len(), 2);
        assert!(r.data.paths.iter().all(|p| p.is_absolute()) && r.data.paths[1].ends_with("zh.jsonl.gz"));
        assert!(r.data.describe().contains(".json + /"), "{}", r.data.describe());
        let r = load(MINIMAL, &["data.eval_path=\"dev.json\""]).unwrap();
        assert!(r.data.eval_paths.len() == 1 && r.data.describe().ends_with("dev.json)"), "{}", r.data.describe());
        let cases = [
            ("data.path=[]", "no training data: give 'data.path' (files) or 'data.dataset'"),
            ("data.path=3", "'data.path': expected a path string or a list"),
        ];
        for (set, want) in cases {
            let e = load(MINIMAL, &[set]).unwrap_err();
            assert!(e.contains(want), "{set}: {e}");
        }
    }

    #[test]
    fn schedule_arguments_are_checked() {
        let r = load(MINIMAL, &["train.lr_scheduler=\"cosine_with_min_lr\"", "train.lr_scheduler_kwargs={ min_lr_rate = 0.1 }"]).unwrap();
        assert_eq!(r.train.lr_scheduler_kwargs.min_lr_rate, Some(0.1));
        // A key of the table on its own, from --set and from the environment.
        let text = format!("{MINIMAL}[train]\nlr_scheduler = \"cosine_with_min_lr\"\nlr_scheduler_kwargs = {{ min_lr_rate = 0.1 }}\n");
        let r = load(&text, &["train.lr_scheduler_kwargs.num_cycles=1"]).unwrap();
        assert_eq!((r.train.lr_scheduler_kwargs.min_lr_rate, r.train.lr_scheduler_kwargs.num_cycles), (Some(0.1), Some(1.0)));
        let env = [("EMBER_TRAIN__LR_SCHEDULER_KWARGS__MIN_LR_RATE", "0.2")];
        assert_eq!(load_with_env(&text, &env, &[]).unwrap().train.lr_scheduler_kwargs.min_lr_rate, Some(0.2));
        assert!(load(&text, &["train.lr_scheduler.x=1"]).unwrap_err().contains("'train.lr_scheduler' is not a table"));
        let cases: [(&[&str], &str); 8] = [
            (&["train.lr_scheduler_kwargs={ num_cycles = 2 }"], "'train.lr_scheduler_kwargs.num_cycles': lr_scheduler \"linear\" takes no arguments"),
            (&["train.lr_scheduler=\"cosine\"", "train.lr_scheduler_kwargs={ min_lr_rate = 0.1 }"], "lr_scheduler \"cosine\" takes num_cycles"),
            (&["train.lr_scheduler=\"cosine_with_min_lr\""], "needs 'train.lr_scheduler_kwargs.min_lr' or"),
            (&["train.lr_scheduler=\"cosine_with_min_lr\"", "train.lr_scheduler_kwargs={ min_lr = 1e-5, min_lr_rate = 0.1 }"], "give one"),
            (&["train.lr_scheduler=\"polynomial\"", "train.lr=1e-4", "train.lr_scheduler_kwargs={ lr_end = 1e-3 }"], "'train.lr_scheduler_kwargs.lr_end' (0.001) must be below train.lr (0.0001)"),
            (&["train.lr_scheduler=\"warmup_stable_decay\""], "needs 'train.lr_scheduler_kwargs.num_decay_steps'"),
            (&["train.lr_scheduler=\"warmup_stable_decay\"", "train.lr_scheduler_kwargs={ num_decay_steps = 5, min_lr_ratio = 2.0 }"], "min_lr_ratio' is 2; expected 0 to 1"),
            (&["train.lr_scheduler_kwargs={ num_cycle = 2 }"], "unknown field `num_cycle`"),
        ];
        for (overrides, want) in cases {
            let e = load(MINIMAL, overrides).unwrap_err();
            assert!(e.contains(want), "{overrides:?}: {e}");
        }
    }

    #[test]
    fn warmup_ratio_and_neftune_are_checked() {
        let r = load(MINIMAL, &["train.warmup_ratio=0.03", "train.neftune_noise_alpha=5"]).unwrap();
        assert_eq!((r.train.warmup(1000), r.train.neftune()), (30, Some(5.0)));
        assert_eq!((load(MINIMAL, &[]).unwrap().train.neftune()), None);
        let cases: [(&[&str], &str); 8] = [
            (&["train.lr=-1e-4"], "'train.lr' is -0.0001; expected a finite number >= 0"),
            (&["train.lr=nan"], "'train.lr' is NaN"),
            (&["train.weight_decay=-0.1"], "'train.weight_decay' is -0.1"),
            (&["train.adam_beta2=1.0"], "'train.adam_beta2' is 1; expected 0 <= beta < 1"),
            (&["train.warmup_ratio=1.5"], "'train.warmup_ratio' is 1.5; expected 0 <= ratio < 1"),
            (&["train.warmup_ratio=0.1", "train.warmup_steps=10"], "both set: give one"),
            (&["train.neftune_noise_alpha=-1.0"], "'train.neftune_noise_alpha' is -1"),
            (&["train.lr_scheduler=constant", "train.warmup_steps=5"], "use \"constant_with_warmup\""),
        ];
        let e = load(MINIMAL, &["train.early_stopping_patience=2", "train.eval_steps=5"]).unwrap_err();
        assert!(e.contains("hold records out"), "{e}");
        let e = load(MINIMAL, &["train.early_stopping_patience=2", "data.val_size=5"]).unwrap_err();
        assert!(e.contains("set train.eval_steps"), "{e}");
        let e = load(MINIMAL, &["train.loraplus_lr_ratio=16", "adapter.method=ia3"]).unwrap_err();
        assert!(e.contains("LoRA+ sets the rates of LoRA's A and B; method 'ia3'"), "{e}");
        assert!(load(MINIMAL, &["train.loraplus_lr_ratio=-1"]).unwrap_err().contains("must be >= 0"));
        assert_eq!(load(MINIMAL, &["data.val_size=0.1"]).unwrap().data.val_size.of(52002), 5201);
        assert_eq!(load(MINIMAL, &["data.val_size=2000"]).unwrap().data.val_size.of(52002), 2000);
        for bad in ["data.val_size=1.5", "data.val_size=-3"] {
            assert!(load(MINIMAL, &[bad]).unwrap_err().contains("'data.val_size': expected a number of records, or a fraction"), "{bad}");
        }
        let e = load(MINIMAL, &["data.eval_path=\"dev.json\"", "data.val_size=10"]).unwrap_err();
        assert!(e.contains("'data.val_size' and 'data.eval_path' both"), "{e}");
        for (overrides, want) in cases {
            let e = load(MINIMAL, overrides).unwrap_err();
            assert!(e.contains(want), "{overrides:?}: {e}");
        }
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
    fn method_keys_and_values_are_typed() {
        let e = load(MINIMAL, &["adapter.num_virtual_tokens=3"]).unwrap_err();
        assert!(e.contains("unknown key 'adapter.num_virtual_tokens'") && e.contains("for method 'lora'"), "{e}");
        let e = load(MINIMAL, &["adapter.method=lorra"]).unwrap_err();
        assert!(e.contains("expected one of lora, dora, ia3, prefix, adaption, prompt_tuning"), "{e}");
        let e = load(MINIMAL, &["train.lr_scheduler=cosin"]).unwrap_err();
        assert!(e.contains("'train.lr_scheduler'") && e.contains("constant") && e.contains("cosine"), "{e}");
        let r = load(MINIMAL, &["adapter.method=ia3"]).unwrap();
        assert_eq!(r.adapter.method.config().name(), "ia3");
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

    /// `[export]`: types and dtypes checked by name, the importance matrix only with a quantized
    /// type (and required by q2_k_s and the 2- and 3-bit lattice types but iq3_s/iq3_m), and only for methods that merge into the weights.
    #[test]
    fn export_section_is_checked_when_the_recipe_loads() {
        let r = load(MINIMAL, &["export.gguf=[\"q4_k_m\", \"f16\"]", "export.imatrix=true", "export.merged=bf16"]).unwrap();
        assert_eq!(r.export.gguf_types(), [ExportType::Q4_K_M, ExportType::F16]);
        assert_eq!((r.export.imatrix_chunks, r.export.merged_dtype()), (100, Some(MergeDtype::Bf16)));
        assert!(!load(MINIMAL, &[]).unwrap().export.any());
        let cases: [(&[&str], &str); 7] = [
            (&["export.gguf=[\"q4_k\"]"], "'export.gguf': 'q4_k' is not a GGUF type"),
            (&["export.gguf=[\"q8_0\", \"q8_0\"]"], "'q8_0' is listed twice"),
            (&["export.merged=f8"], "'export.merged': 'f8' is not a dtype"),
            (&["export.gguf=[\"f16\"]", "export.imatrix=true"], "'export.imatrix' weighs quantization"),
            (&["export.gguf=[\"q2_k_s\"]"], "'q2_k_s' needs an importance matrix"),
            (&["export.gguf=[\"iq3_m\", \"iq2_xxs\"]"], "'iq2_xxs' needs an importance matrix"),
            (&["export.merged=keep", "adapter.method=prompt_tuning", "adapter.num_virtual_tokens=4"], "a prompt_tuning adapter does not merge into the weights"),
        ];
        for (overrides, want) in cases {
            let e = load(MINIMAL, overrides).unwrap_err();
            assert!(e.contains(want), "{overrides:?}: {e}");
        }
    }

    fn load_with_env(text: &str, env: &[(&str, &str)], overrides: &[&str]) -> Result<Recipe, String> {
        let dir = std::env::temp_dir().join(format!("ember-recipe-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.toml");
        std::fs::write(&path, text).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let recipe = Recipe::load_with_env(&path, &env, &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>(), Fetch::CacheOnly).map_err(|e| e.to_string());
        std::fs::remove_dir_all(&dir).unwrap();
        recipe
    }

    #[test]
    fn env_variables_override_and_set_wins() {
        let env = [("EMBER_TRAIN__MAX_STEPS", "3"), ("EMBER_DATA__CUTOFF_LEN", "64"), ("EMBER_TRAIN__LR", "0.1")];
        let r = load_with_env(MINIMAL, &env, &["train.lr=1e-4"]).unwrap();
        assert_eq!((r.train.max_steps, r.data.cutoff_len, r.train.lr), (3, 64, 1e-4));
        let r = load_with_env(MINIMAL, &[("EMBER_ADAPTER__TARGET_MODULES", "all-linear")], &[]).unwrap();
        assert!(matches!(&r.adapter.method, Method::Lora(c) if matches!(c.target, ember_adapters::target::Target::AllLinear)));
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
        assert!(matches!(&r.adapter.method, Method::Lora(c) if matches!(c.target, ember_adapters::target::Target::AllLinear)));
    }
}
