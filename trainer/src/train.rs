//! The training loop: AdamW on the adapter parameters only, warmup + decay schedule, gradient
//! accumulation with HF's loss normalisation, global-norm clipping, periodic evaluation,
//! `metrics.jsonl` and `summary.json`, and the adapter exported in PEFT format at the end.
//!
//! [`train`] is four stages of one [`Run`]: `setup` (data, model, output folder), `start`
//! (resume from a checkpoint, or evaluate the untrained adapter), `steps` (the loop, with its
//! evaluations and checkpoints) and `finish` (final evaluation, adapter, plot, summary).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_adapters::lora::WeightStarts;
use ember_adapters::{AdaptedModel, Method};
use ember_data::sft::{self, SftOptions};
use ember_data::text::{Corpus, TextBlocks, TokenBuffer, TokenCache, TokenStream};
use ember_data::{Batch, Dataset, DatasetError, Examples, Format, SftStats, Template};
use ember_models::BaseModel;
use ember_models::device::with_busy_workers;
use rand::{Rng, SeedableRng};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::checkpoint::{self, Position, State};
use crate::error::TrainError;
use crate::fault::{self, Fault};
use crate::interrupt;
use crate::loss::causal_lm_loss;
use crate::optimizer::{AdamW, FlatGradients};
use crate::recipe::{FileGroup, OnNonfinite, Recipe, ReportTo};
use crate::run::{Event, Metrics, StepReport, Summary};
use crate::step;

/// How a run treats its output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run; refused if the folder already holds one.
    Fresh,
    /// Continue from the newest checkpoint in the folder.
    Resume,
    /// A new run that first removes the previous run's files from the folder.
    Overwrite,
}

/// The files a run writes into its output folder.
const RUN_FILES: &[&str] = &["metrics.jsonl", "summary.json", "adapter", "checkpoints", "training_curves.png", "merged", "gguf", "best_adapter"];

/// An advisory lock on the output folder (`.ember.lock`, which holds the holder's PID), so two
/// live processes never write one folder. The kernel releases it when its holder dies, so a
/// killed run never leaves a stale lock.
fn lock_output(dir: &Path) -> Result<std::fs::File, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::write(dir, e))?;
    let path = dir.join(".ember.lock");
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| TrainError::write(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default().trim().to_owned();
            return Err(TrainError::Locked { path: dir.to_path_buf(), pid: if pid.is_empty() { "unknown".into() } else { pid } });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(TrainError::write(&path, e)),
    }
    file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(|e| TrainError::write(&path, e))?;
    Ok(file)
}

/// Refuses to mix two runs in one folder; with `Overwrite`, removes the old run's files first.
fn prepare_output(dir: &Path, start: Start) -> Result<(), TrainError> {
    let present: Vec<&str> = RUN_FILES.iter().copied().filter(|f| dir.join(f).exists()).collect();
    match start {
        Start::Fresh if !present.is_empty() => {
            return Err(TrainError::Output {
                path: dir.to_path_buf(),
                reason: format!("output.dir already holds a run ({}); pass --resume to continue it or --overwrite to replace it", present.join(", ")),
            });
        }
        Start::Overwrite => {
            for name in present {
                let path = dir.join(name);
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.map_err(|e| TrainError::write(&path, e))?;
            }
        }
        _ => {}
    }
    // The folder exists: `lock_output` made it. What a killed run may have left half-written; never read, so safe to drop.
    ember_models::remove_stale_temporaries(dir);
    ember_models::remove_stale_temporaries(&dir.join("checkpoints"));
    Ok(())
}

/// The recipe's prompt or chat template.
pub fn template(recipe: &Recipe) -> Result<Format, TrainError> {
    let d = &recipe.data;
    let setting = |reason: String| TrainError::Setting { key: "data.template", reason };
    if d.template == "custom" {
        return match (&d.prompt_input, &d.prompt_no_input) {
            (Some(with), Some(without)) => Ok(Format::Prompt(Template { prompt_input: with.clone(), prompt_no_input: without.clone() })),
            _ => Err(setting("\"custom\" needs data.prompt_input and data.prompt_no_input".into())),
        };
    }
    ember_models::template(&d.template, &recipe.model.path)
        .map_err(setting)?
        .ok_or_else(|| setting(format!("'{}' is unknown (built in: {}, or custom, or a .jinja file)", d.template, ember_data::sft::template_names().join(", "))))
}

/// The recipe's options for turning records into examples.
pub fn sft_options(recipe: &Recipe) -> SftOptions {
    let d = &recipe.data;
    SftOptions { cutoff_len: d.cutoff_len, train_on_inputs: d.train_on_inputs, last_turn_only: d.mask_history }
}

/// The data files' records, and the indices of the training and held-out records: each
/// dataset's records as [`kept_records`] keeps them, shuffled with the seed, the last
/// `data.val_size` (a number, or a fraction rounded up) held out; or the kept records of
/// `data.eval_path` held out.
pub fn split_records(recipe: &Recipe) -> Result<(Dataset, Vec<usize>, Vec<usize>), TrainError> {
    let mappings = recipe.data.mappings();
    let [train_groups, eval_groups] = recipe.data.groups();
    let mut dataset = Dataset::load_all(&recipe.data.paths, &mappings)?;
    let kept = kept_records(&dataset, train_groups, recipe, 0);
    let mut eval = Vec::new();
    if !recipe.data.eval_paths.is_empty() {
        let held = Dataset::load_all(&recipe.data.eval_paths, &mappings)?;
        eval = kept_records(&held, eval_groups, recipe, dataset.samples.len());
        dataset.append(held);
    }
    let (order, held_out) = split_order(kept.len(), recipe)?;
    let mut train: Vec<usize> = order.into_iter().map(|i| kept[i as usize]).collect();
    if recipe.data.eval_paths.is_empty() {
        eval = train.split_off(train.len() - held_out);
    }
    Ok((dataset, train, eval))
}

/// The indices (from `first`) of the records of `dataset` that a run reads, dataset by dataset
/// (`groups`): `num_samples` drawn with the seed (every record once, in a shuffled order,
/// before any is drawn again, as LLaMA-Factory draws them), then the first `data.max_samples`.
fn kept_records(dataset: &Dataset, groups: &[FileGroup], recipe: &Recipe, first: usize) -> Vec<usize> {
    let counts: Vec<usize> = dataset.files().map(|(_, records)| records).collect();
    let mut rng = StdRng::seed_from_u64(recipe.train.seed);
    let (mut kept, mut file, mut start) = (Vec::new(), 0, first);
    for group in groups {
        let len: usize = counts[file..file + group.files].iter().sum();
        let mut records: Vec<usize> = (start..start + len).collect();
        if let Some(n) = group.num_samples {
            records.shuffle(&mut rng);
            records.truncate(n);
            while records.len() < n && len > 0 {
                records.push(start + rng.random_range(0..len));
            }
        }
        records.truncate(recipe.data.max_samples.unwrap_or(usize::MAX));
        kept.extend(records);
        (file, start) = (file + group.files, start + len);
    }
    kept.extend(start..first + dataset.samples.len());
    kept
}

/// The seeded order of `records` training records, and how many at its end `data.val_size`
/// holds out (none where `data.eval_path` gives the evaluation records). Indices are `u32`: a
/// corpus of a hundred million lines costs 400 MB here.
fn split_order(records: usize, recipe: &Recipe) -> Result<(Vec<u32>, usize), TrainError> {
    let held_out = if recipe.data.eval_paths.is_empty() { recipe.data.val_size.of(records) } else { 0 };
    if held_out >= records {
        return Err(TrainError::Setting {
            key: "data.val_size",
            reason: format!("{} leaves no training record ({} has {records} records)", recipe.data.val_size, recipe.data.describe()),
        });
    }
    let records = u32::try_from(records).map_err(|_| TrainError::Setting { key: "data.path", reason: format!("{records} records: at most {} are read", u32::MAX) })?;
    let mut order: Vec<u32> = (0..records).collect();
    order.shuffle(&mut StdRng::seed_from_u64(recipe.train.seed));
    Ok((order, held_out))
}

/// A plain-text corpus as a run sees it.
pub struct TextData {
    pub train: Examples,
    pub eval: Examples,
    /// Each file (`data.path`, then `data.eval_path`) and its records.
    pub files: Vec<(PathBuf, usize)>,
    /// Training and held-out records.
    pub records: [usize; 2],
}

/// Continued pretraining's train and eval blocks, the corpus streamed (no text is held: see
/// [`Corpus`]) and split as [`split_records`] splits it, or its ids read from
/// `data.tokenized_path`.
pub fn text_data(recipe: &Recipe, tokenizer: &ember_data::Tokenizer, on_event: &mut dyn FnMut(Event)) -> Result<TextData, TrainError> {
    let d = &recipe.data;
    let (paths, mappings) = (d.all_paths(), d.mappings());
    let waiting = |dir: &Path| Event::Info(format!("data: waiting for another run writing {} (data.tokenized_path)", dir.display()));
    let mut cache = d.tokenized_path.as_deref().map(|dir| TokenCache::open(dir, &paths, tokenizer, || on_event(waiting(dir))).map(|c| c.of_column(mappings.text_columns(&paths)))).transpose()?;
    // A cache of these files says how many records each has: the text is not read at all.
    let (counted, counts) = match cache.as_ref().and_then(TokenCache::records) {
        Some(counts) => (None, counts),
        None => {
            let corpus = Corpus::count(&paths)?.mapped(mappings.clone());
            let counts = corpus.counts();
            (Some(corpus), counts)
        }
    };
    let held_out = held_out_records(&counts, recipe)?;
    let corpus = || counted.map_or_else(|| Corpus::count(&paths).map(|c| c.mapped(mappings.clone())), Ok);
    let [train, eval] = match &mut cache {
        None => {
            let mut buffers = [TokenBuffer::default(), TokenBuffer::default()];
            corpus()?.tokenize(tokenizer, &held_out, &mut buffers)?;
            buffers.map(TokenStream::from)
        }
        Some(cache) => match cache.streams(&held_out)? {
            Ok(streams) => {
                on_event(Event::Info(format!("data: token ids read from {} (data.tokenized_path), not tokenized again", cache.dir().display())));
                streams
            }
            Err(reason) => {
                on_event(Event::Info(format!("data: tokenizing into {} (data.tokenized_path): {reason}", cache.dir().display())));
                cache.write(&corpus()?, tokenizer, &held_out)?
            }
        },
    };
    let blocks = |ids| Examples::Blocks(TextBlocks::new(ids, d.cutoff_len, tokenizer.added_bos()));
    Ok(TextData { train: blocks(train), eval: blocks(eval), files: paths.into_iter().zip(counts).collect(), records: split_sizes(&held_out) })
}

/// Training and held-out records of a [`held_out_records`] split.
fn split_sizes(held_out: &[bool]) -> [usize; 2] {
    let eval = held_out.iter().filter(|&&held| held).count();
    [held_out.len() - eval, eval]
}

/// Which records of files with `counts` records each (`data.path`'s, then `data.eval_path`'s)
/// are held out for evaluation, as [`split_records`] holds them out.
pub fn held_out_records(counts: &[usize], recipe: &Recipe) -> Result<Vec<bool>, TrainError> {
    let records = counts[..recipe.data.paths.len()].iter().sum();
    let (order, held) = split_order(records, recipe)?;
    let mut held_out = vec![false; counts.iter().sum()];
    held_out[records..].fill(true);
    for &i in &order[records - held..] {
        held_out[i as usize] = true;
    }
    Ok(held_out)
}

/// The records a recipe trains and evaluates on; a plain-text corpus is counted a line at a time.
pub fn record_counts(recipe: &Recipe) -> Result<[usize; 2], TrainError> {
    if recipe.data.template != ember_data::sft::TEXT_TEMPLATE {
        let (_, train, eval) = split_records(recipe)?;
        return Ok([train.len(), eval.len()]);
    }
    Ok(split_sizes(&held_out_records(&Corpus::count(&recipe.data.all_paths())?.counts(), recipe)?))
}

fn int_tensor(values: &[i64], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Learning rate at optimizer step `step` (0-based) of `total`: warmup, then the recipe's
/// schedule, as transformers' schedulers. As there, warmup starts from 0: the first step's rate
/// is 0 (its AdamW moments still count).
pub fn learning_rate(recipe: &Recipe, step: usize, total: usize) -> f64 {
    let t = &recipe.train;
    t.lr * t.lr_scheduler.factor(&t.lr_scheduler_kwargs, t.lr, step, t.warmup(total), total)
}

/// The examples of one epoch in a seeded order, read `micro_batch_size` at a time; with
/// `group_by_length`, examples of similar length share a batch (megabatches of 50 batches sorted
/// by length, as HF's sampler).
fn epoch_order(examples: &Examples, recipe: &Recipe, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = StdRng::seed_from_u64(recipe.train.seed.wrapping_add(1 + epoch as u64));
    order.shuffle(&mut rng);
    let mbs = recipe.train.micro_batch_size;
    if recipe.data.group_by_length {
        for mega in order.chunks_mut(50 * mbs) {
            mega.sort_by_key(|&i| std::cmp::Reverse(examples.input_len(i)));
        }
    }
    order
}

/// Mean loss over every supervised token of `examples`, without building a graph.
pub fn evaluate(model: &AdaptedModel, examples: &Examples, batch_size: usize, pad_id: u32, device: &Device) -> Result<Option<f64>, DatasetError> {
    if examples.is_empty() {
        return Ok(None);
    }
    let model = model.valid();
    let (mut total, mut tokens) = (0f64, 0usize);
    for start in (0..examples.len()).step_by(batch_size.max(1)) {
        let batch = examples.collate(start..(start + batch_size).min(examples.len()), pad_id)?;
        let shape = [batch.batch, batch.seq];
        let hidden = model.hidden_states(int_tensor(&batch.input_ids, shape, device), Some(int_tensor(&batch.attention_mask, shape, device)));
        // The hidden states include prompt tuning's virtual positions; so must the labels.
        let batch = batch.with_virtual_tokens(model.virtual_tokens());
        let count = batch.supervised_tokens();
        if let Some(loss) = causal_lm_loss(hidden, &batch.labels, |h| model.logits(h)) {
            total += loss.into_scalar::<f32>() as f64 * count as f64;
            tokens += count;
        }
    }
    Ok((tokens > 0).then(|| total / tokens as f64))
}

/// The global L2 norm of the gradients, which are scaled to `max_norm` if above it (0: no
/// clipping). Returns the norm before clipping.
fn clip_global_norm(grads: FlatGradients, max_norm: f64) -> (FlatGradients, f64) {
    let norm = grads.norm();
    if max_norm > 0.0 && norm > max_norm { (grads.scale(max_norm / (norm + 1e-6)), norm) } else { (grads, norm) }
}

/// What stops or skips a step whose loss or gradient norm is NaN/inf.
fn nonfinite(recipe: &Recipe, step: usize, what: &str, value: f64, last_checkpoint: Option<&Path>) -> Result<(), TrainError> {
    if recipe.train.on_nonfinite == OnNonfinite::Skip {
        return Ok(());
    }
    let resume = match last_checkpoint {
        Some(dir) => format!("the last good checkpoint is {} (ember train --resume continues from it)", dir.display()),
        None => "no checkpoint was written before it".into(),
    };
    Err(TrainError::Stopped(format!(
        "step {step}: {what} is {value}; stopping without saving the adapter; {resume}; train.on_nonfinite = \"skip\" skips such steps instead"
    )))
}

/// Runs the recipe into its output folder (see [`Start`]). `on_event` hears about every step
/// and every notable event.
pub fn train(recipe: &Recipe, start: Start, on_event: &mut dyn FnMut(Event)) -> Result<Summary, TrainError> {
    let mut run = Run::setup(recipe, start, on_event)?;
    run.start(on_event)?;
    run.steps(on_event)?;
    run.finish(on_event)
}

/// One run in progress: what it trains, on what, and how far it got.
struct Run<'a> {
    recipe: &'a Recipe,
    started: Instant,
    device: Device,
    train_set: Examples,
    eval_set: Examples,
    pad_id: u32,
    /// What starts each importance-matrix chunk (`[export]`), where the tokenizer adds BOS.
    bos: Option<u32>,
    model: AdaptedModel,
    method: Method,
    optimizer: AdamW,
    total_steps: usize,
    metrics: Metrics,
    summary: Summary,
    /// The next optimizer step.
    position: Position,
    tokens_seen: usize,
    train_seconds: f64,
    last_checkpoint: Option<PathBuf>,
    /// Held for the whole run (see [`lock_output`]).
    _lock: std::fs::File,
}

impl<'a> Run<'a> {
    /// Data (seeded split, then examples; nothing dropped without a count), the frozen base with
    /// a fresh or loaded adapter, the optimizer, and the output folder.
    fn setup(recipe: &'a Recipe, start: Start, on_event: &mut dyn FnMut(Event)) -> Result<Self, TrainError> {
        let started = Instant::now();
        let t = &recipe.train;
        let device = recipe.model.device.device().map_err(|e| TrainError::Setting { key: "model.device", reason: e.to_string() })?.autodiff();
        device.seed(t.seed);

        let tokenizer = ember_models::load_tokenizer(&recipe.model.path)?;
        let template = template(recipe)?;
        let (train_set, eval_set, stats) = match &template {
            Format::Text => {
                let data = text_data(recipe, &tokenizer, on_event)?;
                (data.train, data.eval, SftStats { records: data.records[0], ..Default::default() })
            }
            _ => {
                let (dataset, train_records, eval_records) = split_records(recipe)?;
                let options = sft_options(recipe);
                let (train_set, stats) = sft::build_examples(&tokenizer, &template, &dataset, &train_records, &options)?;
                let (eval_set, _) = sft::build_examples(&tokenizer, &template, &dataset, &eval_records, &options)?;
                (Examples::Records(train_set), Examples::Records(eval_set), stats)
            }
        };
        if train_set.is_empty() {
            return Err(TrainError::Setting {
                key: "data.cutoff_len",
                reason: format!("no record of {} has a supervised token within {} tokens", recipe.data.describe(), recipe.data.cutoff_len),
            });
        }
        // A GGUF export llama.cpp could not take fails now, not after training.
        crate::run_export::check(recipe)?;
        // After the checks of the tokenizer and the data, so that a bad recipe leaves no output
        // folder behind; before the model loads, so that a second run on the folder stops at once.
        let lock = lock_output(&recipe.output.dir)?;
        on_event(Event::Info(match template {
            Format::Text => format!(
                "data: {} train / {} eval blocks of up to {} tokens from {} (plain text: {} records)",
                train_set.len(), eval_set.len(), recipe.data.cutoff_len, recipe.data.describe(), stats.records
            ),
            _ => format!(
                "data: {} train / {} eval examples from {} ({} truncated to {} tokens, {} without any answer token after truncation, skipped)",
                train_set.len(), eval_set.len(), recipe.data.describe(), stats.truncated, recipe.data.cutoff_len, stats.empty.len()
            ),
        }));
        let pad_id = tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0);
        let bos = tokenizer.added_bos();

        let start_reads_base = matches!(&recipe.adapter.method, Method::Lora(c) if c.init.reads_base());
        if start_reads_base && recipe.adapter.init_from.is_some() {
            return Err(TrainError::Setting { key: "adapter.init_lora_weights", reason: "the start comes from adapter.init_from; set one of the two".into() });
        }
        // A start read from the base's weights needs them in full precision: on a quantized base
        // each is taken out as its weight loads, and what it leaves is quantized (QPiSSA).
        let (base, taken) = match &recipe.adapter.method {
            Method::Lora(c) if start_reads_base && recipe.model.quantization().is_some() => {
                let mut starts = WeightStarts::new(c, t.seed);
                let base = BaseModel::load_prepared(&recipe.model.path, recipe.model.dtype, recipe.model.quantization(), &device, &mut |name, weight| starts.take(name, weight))?;
                (base, Some(starts))
            }
            _ => (BaseModel::load_quantized(&recipe.model.path, recipe.model.dtype, recipe.model.quantization(), &device)?, None),
        };
        let vocab = recipe.model.vocab_for(tokenizer.vocab_size(), base.config.vocab_size)
            .map_err(|reason| TrainError::Setting { key: "model.resize_embeddings", reason })?;
        if vocab > base.config.vocab_size {
            on_event(Event::Info(format!("model: embedding and LM head grown from {} to {vocab} ids", base.config.vocab_size)));
        }
        let base = base.resize_vocab(vocab).map_err(|reason| TrainError::Setting { key: "model.resize_embeddings", reason })?;
        let (model, method) = match &recipe.adapter.init_from {
            Some(dir) => Method::load(dir, base, &device)?,
            None => {
                let method = recipe.adapter.method.clone();
                method.config().check(&base.config).map_err(|e| TrainError::Setting { key: "adapter", reason: e.to_string() })?;
                let started = Instant::now();
                // Starts taken while the base loaded were timed there.
                let (model, while_loading) = match (&method, taken) {
                    (Method::Lora(c), Some(starts)) => {
                        let seconds = starts.seconds();
                        (c.init_with_starts(base, Some(starts), t.seed, &device)?, seconds)
                    }
                    _ => (method.config().init(base, t.seed, &device)?, 0.0),
                };
                if let Method::Lora(c) = &method
                    && start_reads_base
                {
                    let seconds = while_loading + started.elapsed().as_secs_f64();
                    on_event(Event::Info(format!("adapter: start {} read from the base's weights in {seconds:.1} s", c.init)));
                }
                (model, method)
            }
        };
        let (trainable, total) = model.parameter_counts();
        on_event(Event::Info(format!("model: {} with {method}: {trainable} trainable of {total} parameters ({:.4}%)",
            recipe.model.path.display(), 100.0 * trainable as f64 / total as f64)));

        let optimizer = AdamW::new(t.adam_beta1 as f32, t.adam_beta2 as f32, t.adam_epsilon as f32, t.weight_decay as f32);
        let optimizer = parameter_groups(recipe, &method, &model, optimizer);
        let steps_per_epoch = train_set.len().div_ceil(t.micro_batch_size * t.gradient_accumulation_steps);
        let total_steps = if t.max_steps > 0 { t.max_steps } else { steps_per_epoch * t.epochs };

        prepare_output(&recipe.output.dir, start)?;
        let checkpoints = recipe.output.dir.join("checkpoints");
        let resume_from = match start {
            Start::Resume => Some(checkpoint::latest(&checkpoints).ok_or_else(|| TrainError::Resume { path: checkpoints, reason: "--resume: no checkpoint here".into() })?),
            Start::Fresh | Start::Overwrite => None,
        };
        let tensorboard = recipe.train.report_to.contains(&ReportTo::Tensorboard).then_some((recipe.output.dir.as_path(), recipe.text.as_str()));
        let metrics = Metrics::create(recipe.output.dir.join("metrics.jsonl"), resume_from.as_deref().map(|d| d.join("metrics.jsonl")).as_deref(), tensorboard)?;
        let summary = Summary {
            steps: 0, epochs_completed: 0.0, train_examples: train_set.len(), eval_examples: eval_set.len(),
            skipped_empty_records: stats.empty.clone(), skipped_nonfinite_steps: Vec::new(), truncated_records: stats.truncated,
            trainable_parameters: trainable, total_parameters: total,
            first_train_loss: None, final_train_loss: None, first_eval_loss: None, final_eval_loss: None, best_eval_loss: None,
            best_eval_step: None, evals_since_best: 0, stopped_early_at: None,
            tokens_per_second: 0.0, seconds: 0.0, adapter_dir: recipe.output.dir.join("adapter"), metrics: metrics.path.clone(), plot: None,
            exports: Vec::new(),
        };
        Ok(Self {
            recipe, started, device, train_set, eval_set, pad_id, bos, model, method, optimizer, total_steps, metrics, summary,
            position: Position::default(), tokens_seen: 0, train_seconds: 0.0, last_checkpoint: resume_from, _lock: lock,
        })
    }

    fn checkpoints(&self) -> PathBuf {
        self.recipe.output.dir.join("checkpoints")
    }

    /// Evaluates, logs, and records the loss in the metrics and the summary.
    fn evaluate(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let step = self.position.step;
        let (batch_size, device) = (self.recipe.train.micro_batch_size, self.device.clone().inner());
        let Some(loss) = evaluate(&self.model, &self.eval_set, batch_size, self.pad_id, &device)? else { return Ok(()) };
        on_event(Event::Info(format!("eval step {step}: loss {loss:.4}")));
        let summary = &mut self.summary;
        summary.first_eval_loss.get_or_insert(loss);
        summary.final_eval_loss = Some(loss);
        // As transformers' early stopping: better means strictly lower.
        if summary.best_eval_loss.is_none_or(|best| loss < best) {
            (summary.best_eval_loss, summary.best_eval_step, summary.evals_since_best) = (Some(loss), Some(step), 0);
            // The untrained adapter (step 0) is a yardstick, never the one saved.
            if self.recipe.train.load_best_model_at_end && step > 0 {
                self.method.config().save(&self.model, &self.recipe.model.path.to_string_lossy(), &best_adapter_dir(self.recipe))?;
            }
        } else {
            summary.evals_since_best += 1;
        }
        self.metrics.write(json!({"step": step, "eval_loss": loss}))
    }

    /// When resuming, puts the checkpoint's parameters, optimizer state, position and summary in
    /// place; otherwise evaluates the untrained adapter (step 0).
    fn start(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let Some(dir) = self.last_checkpoint.clone() else { return self.evaluate(on_event) };
        let state = checkpoint::read_state(&dir)?;
        let (model, optimizer) = checkpoint::restore(&dir, self.model.clone(), self.optimizer.clone())?;
        // The checkpoint's parameters come with their ids.
        let optimizer = parameter_groups(self.recipe, &self.method, &model, optimizer);
        (self.model, self.optimizer) = (model, optimizer);
        (self.position, self.tokens_seen, self.train_seconds) = (state.position, state.tokens_seen, state.train_seconds);
        self.summary = Summary { adapter_dir: self.summary.adapter_dir.clone(), metrics: self.summary.metrics.clone(), plot: None, exports: Vec::new(), ..state.summary };
        on_event(Event::Info(format!("resumed from {} at step {}", dir.display(), self.position.step)));
        Ok(())
    }

    /// Optimizer steps until `total_steps` (or the last epoch), with evaluations and checkpoints.
    fn steps(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let t = &self.recipe.train;
        let start = self.position;
        'epochs: for epoch in start.epoch.. {
            let order = epoch_order(&self.train_set, self.recipe, epoch);
            let batches: Vec<&[usize]> = order.chunks(t.micro_batch_size).collect();
            let first_group = if epoch == start.epoch { start.next_group } else { 0 };
            for (group_index, group) in batches.chunks(t.gradient_accumulation_steps).enumerate().skip(first_group) {
                if self.position.step >= self.total_steps {
                    break 'epochs;
                }
                if let Some(signal) = interrupt::requested() {
                    return self.interrupted(signal, on_event);
                }
                let epoch_progress = ((group_index + 1) * t.gradient_accumulation_steps).min(batches.len()) as f64 / batches.len() as f64;
                self.step(group, epoch as f64 + epoch_progress, on_event)?;
                let step = self.position.step;
                self.position = Position { step, epoch, next_group: group_index + 1 };
                if t.eval_steps > 0 && step % t.eval_steps == 0 && step < self.total_steps {
                    self.evaluate(on_event)?;
                    let patience = t.early_stopping_patience;
                    if patience > 0 && self.summary.evals_since_best >= patience {
                        self.summary.stopped_early_at = Some(step);
                        on_event(Event::Info(format!(
                            "step {step}: stopping early, {patience} evaluations without a lower eval loss than {:.4} (step {})",
                            self.summary.best_eval_loss.unwrap_or(f64::NAN), self.summary.best_eval_step.unwrap_or(0)
                        )));
                        break 'epochs;
                    }
                }
                if t.save_steps > 0 && step % t.save_steps == 0 && step < self.total_steps {
                    self.save_checkpoint(on_event)?;
                }
            }
            if t.max_steps == 0 && epoch + 1 >= t.epochs {
                break;
            }
        }
        Ok(())
    }

    /// One optimizer step over the micro-batches of `group` (indices into the training set).
    fn step(&mut self, group: &[&[usize]], epoch: f64, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let t = &self.recipe.train;
        let step = self.position.step;
        let step_started = Instant::now();
        let micro = group.iter().map(|ids| self.train_set.collate(ids.iter().copied(), self.pad_id)).collect::<Result<Vec<Batch>, _>>()?;
        // HF normalises by the supervised tokens of the whole accumulated batch.
        let step_tokens: usize = micro.iter().map(Batch::supervised_tokens).sum();
        let (model, device) = (&self.model, &self.device);
        let (mut loss, tokens, mut accumulator) = with_busy_workers(device, || {
            let mut accumulator = GradientsAccumulator::<AdaptedModel>::new();
            let (mut loss, mut tokens) = (0f64, 0);
            for (index, batch) in micro.iter().enumerate() {
                // Dropout masks depend on the seed, step and micro-batch only: a resumed run draws the same.
                let seed = t.seed.wrapping_add(step as u64).wrapping_mul(1 << 16).wrapping_add(index as u64);
                let weight = batch.supervised_tokens() as f64 / step_tokens as f64;
                if let Some(micro_loss) = step::forward_backward(model, batch, weight, t.step_options(), t.neftune(), seed, device, &mut accumulator) {
                    loss += micro_loss;
                    tokens += batch.real_tokens();
                }
            }
            (loss, tokens, accumulator)
        });
        self.tokens_seen += tokens;
        if fault::armed(Fault::NanLoss, step + 1) {
            loss = f64::NAN;
        }
        let (grads, grad_norm) = clip_global_norm(AdamW::gather(&self.model, accumulator.grads()), t.max_grad_norm);
        let lr = learning_rate(self.recipe, step, self.total_steps);
        match [("loss", loss), ("gradient norm", grad_norm)].into_iter().find(|(_, v)| !v.is_finite()) {
            Some((what, value)) => {
                nonfinite(self.recipe, step + 1, what, value, self.last_checkpoint.as_deref())?;
                on_event(Event::Info(format!("step {}: {what} is {value}; step skipped (train.on_nonfinite = \"skip\")", step + 1)));
                self.summary.skipped_nonfinite_steps.push(step + 1);
            }
            None => self.model = self.optimizer.step(lr, self.model.clone(), grads),
        }
        self.train_seconds += step_started.elapsed().as_secs_f64();
        let step = step + 1;
        self.position.step = step;
        self.summary.steps = step;
        self.summary.epochs_completed = epoch;
        if loss.is_finite() {
            self.summary.first_train_loss.get_or_insert(loss);
            self.summary.final_train_loss = Some(loss);
        }
        let tokens_per_second = self.tokens_seen as f64 / self.train_seconds;
        self.metrics.write(json!({"step": step, "epoch": epoch, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_second": tokens_per_second, "elapsed_s": self.started.elapsed().as_secs_f64()}))?;
        on_event(Event::Step(StepReport {
            step,
            total_steps: self.total_steps,
            epoch,
            loss,
            lr,
            grad_norm,
            tokens_per_second,
            eta_seconds: self.train_seconds / step as f64 * (self.total_steps - step) as f64,
            log_line: step % t.logging_steps.max(1) == 0 || step == self.total_steps,
        }));
        Ok(())
    }

    /// Stops the run for `signal` after the last finished step, with a checkpoint of it (unless
    /// one exists already, or no step was finished).
    fn interrupted(&mut self, signal: i32, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let step = self.position.step;
        let checkpoint = if step == 0 {
            None
        } else {
            if self.last_checkpoint.as_deref() != Some(checkpoint::dir_for(&self.checkpoints(), step).as_path()) {
                self.save_checkpoint(on_event)?;
            }
            self.last_checkpoint.clone()
        };
        Err(TrainError::Interrupted { signal, step, checkpoint })
    }

    fn save_checkpoint(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let state = State { position: self.position, summary: self.summary.clone(), tokens_seen: self.tokens_seen, train_seconds: self.train_seconds };
        let base_name = self.recipe.model.path.to_string_lossy();
        let dir = checkpoint::save(&self.checkpoints(), &self.model, &self.method, &self.optimizer, &state, &self.metrics.path, &base_name, self.recipe.train.keep_checkpoints)?;
        on_event(Event::Info(format!("checkpoint {}", dir.display())));
        self.last_checkpoint = Some(dir);
        Ok(())
    }

    /// The last evaluation, then the adapter, the training curves and `summary.json`.
    fn finish(mut self, on_event: &mut dyn FnMut(Event)) -> Result<Summary, TrainError> {
        // Early stopping has just evaluated this step.
        if self.summary.stopped_early_at != Some(self.position.step) {
            self.evaluate(on_event)?;
        }
        let mut summary = self.summary;
        summary.tokens_per_second = self.tokens_seen as f64 / self.train_seconds.max(1e-9);
        if let Some(reason) = self.model.unchanged_reason() {
            // A run of one step with warmup never moves: warmup starts from a rate of 0.
            let cause = match self.total_steps == 1 && self.recipe.train.warmup(1) > 0 {
                true => " (its only step had a learning rate of 0: warmup starts from 0, as in transformers; set train.warmup_steps = 0)",
                false => "",
            };
            return Err(TrainError::Stopped(format!("{reason} after training{cause}: the adapter would equal the base model; not saving it")));
        }
        let dir = &self.recipe.output.dir;
        let best = best_adapter_dir(self.recipe);
        if self.recipe.train.load_best_model_at_end && best.is_dir() {
            // The best evaluation's adapter becomes the run's.
            std::fs::rename(&best, &summary.adapter_dir).map_err(|e| TrainError::write(&summary.adapter_dir, e))?;
            on_event(Event::Info(format!("adapter: the best evaluation's (step {}, eval loss {:.4})", summary.best_eval_step.unwrap_or(0), summary.best_eval_loss.unwrap_or(f64::NAN))));
        } else {
            if self.recipe.train.load_best_model_at_end {
                on_event(Event::Info("adapter: the last step's (no evaluation after step 0 had a lower eval loss than the untrained adapter)".into()));
            }
            self.method.config().save(&self.model, &self.recipe.model.path.to_string_lossy(), &summary.adapter_dir)?;
        }
        // A template of one's own goes with the adapter, where transformers' tokenizer saves it:
        // chat, generate, eval, merge and export find it there.
        if ember_data::chat::is_jinja_file(&self.recipe.data.template) {
            let source = std::fs::read(&self.recipe.data.template).map_err(|e| TrainError::write(&self.recipe.data.template, e))?;
            let path = summary.adapter_dir.join(ember_data::chat::ADAPTER_CHAT_TEMPLATE);
            ember_models::write_file_atomically(&path, &source).map_err(|e| TrainError::write(&path, e))?;
        }
        // The adapter is saved: a plot that cannot be drawn is worth a message, not a failed run.
        let run_name = dir.file_name().map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
        match crate::plot::plot_run(dir, &run_name) {
            Ok(path) => summary.plot = Some(path),
            Err(e) => on_event(Event::Info(format!("warning: no training curves: {e}"))),
        }
        summary.seconds = self.started.elapsed().as_secs_f64();
        let summary_path = dir.join("summary.json");
        let write_summary = |summary: &Summary| {
            let text = serde_json::to_string_pretty(summary).expect("summary serializes") + "\n";
            ember_models::write_file_atomically(&summary_path, text.as_bytes()).map_err(|e| TrainError::write(&summary_path, e))
        };
        write_summary(&summary)?;
        on_event(Event::Info(format!("saved adapter to {} ({:.0}s)", summary.adapter_dir.display(), summary.seconds)));
        if self.recipe.export.any() {
            // A signal from here on stops at once; one that came during the last step or
            // evaluation already asked to stop.
            crate::interrupt::end_graceful();
            if let Some(signal) = crate::interrupt::requested() {
                return Err(TrainError::InterruptedBeforeExport { signal, adapter: summary.adapter_dir.clone() });
            }
            // The exports read the base again: the training copy goes first.
            drop(self.model);
            let wanted = crate::run_export::calibration_tokens(self.recipe);
            let mut calibration = Vec::new();
            for i in 0..self.train_set.len() {
                if calibration.len() >= wanted {
                    break;
                }
                calibration.extend_from_slice(&self.train_set.get(i)?.input_ids);
            }
            calibration.truncate(wanted);
            let mut info = |line: String| on_event(Event::Info(line));
            summary.exports = crate::run_export::export(self.recipe, &summary.adapter_dir, &calibration, self.bos, &mut info)
                .map_err(|source| TrainError::Export { adapter: summary.adapter_dir.clone(), source })?;
            write_summary(&summary)?;
        }
        Ok(summary)
    }
}

/// Where `train.load_best_model_at_end` keeps the best evaluation's adapter.
fn best_adapter_dir(recipe: &Recipe) -> PathBuf {
    recipe.output.dir.join("best_adapter")
}

/// `optimizer` with `model`'s parameter groups: those transformers' `Trainer` leaves out of the
/// weight decay (named `bias`), and with LoRA+ the rates of PEFT's `create_loraplus_optimizer`:
/// a LoRA on the embedding at `loraplus_lr_embedding`, every B and every vector at
/// `loraplus_lr_ratio` times the rate, the rest (A, whole modules, trained tokens) at the rate.
fn parameter_groups(recipe: &Recipe, method: &Method, model: &AdaptedModel, optimizer: AdamW) -> AdamW {
    let names = method.config().parameter_names(model);
    let undecayed = names.iter().filter(|(_, name)| name.contains("bias")).map(|(id, _)| *id).collect();
    let optimizer = optimizer.without_decay(undecayed);
    let t = &recipe.train;
    if t.loraplus_lr_ratio == 0.0 {
        return optimizer;
    }
    let vectors = vector_parameters(model);
    let scale = |id: &burn::module::ParamId, name: &str| {
        if name.contains("lora_embedding_") {
            Some(t.loraplus_lr_embedding / t.lr)
        } else if name.contains("lora_B") || vectors.contains(id) {
            Some(t.loraplus_lr_ratio)
        } else {
            None
        }
    };
    let scales = names.into_iter().filter_map(|(id, name)| scale(&id, &name).map(|s| (id, s))).collect();
    optimizer.with_lr_scales(scales)
}

/// The trainable parameters with one dimension.
fn vector_parameters(model: &AdaptedModel) -> Vec<burn::module::ParamId> {
    struct Vectors(Vec<burn::module::ParamId>);
    impl burn::module::ModuleVisitor for Vectors {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if D == 1 && param.val().is_require_grad() {
                self.0.push(param.id);
            }
        }
    }
    let mut visitor = Vectors(Vec::new());
    model.visit(&mut visitor);
    visitor.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_models::hub::Fetch;

    fn recipe(train: &str) -> Recipe {
        let text = format!("[model]\npath = \"m\"\n[adapter]\nmethod = \"lora\"\n[data]\npath = \"d.json\"\n[output]\ndir = \"out\"\n[train]\nlr = 1.0\n{train}\n");
        Recipe::parse(Path::new("r.toml"), &text, &[], &[], Fetch::CacheOnly).unwrap()
    }

    /// The rate of each of 10 optimizer steps with 3 of warmup (lr 1), as transformers'
    /// `get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=10,
    /// scheduler_specific_kwargs=…)` sets it for each `optimizer.step()` (transformers 5.23.0);
    /// warmup 0.25 of 10 steps is ⌈2.5⌉ = 3.
    #[test]
    fn schedules_are_transformers() {
        let cases = [
            ("linear", "", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.857142857143, 0.714285714286, 0.571428571429, 0.428571428571, 0.285714285714, 0.142857142857]),
            ("cosine", "", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.950484433951, 0.811744900929, 0.611260466978, 0.388739533022, 0.188255099071, 0.049515566049]),
            ("constant_with_warmup", "", [0.0, 0.333333333333, 0.666666666667, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
            ("cosine", "{ num_cycles = 1.5 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.611260466978, 0.049515566049, 0.188255099071, 0.811744900929, 0.950484433951, 0.388739533022]),
            ("cosine_with_restarts", "", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.950484433951, 0.811744900929, 0.611260466978, 0.388739533022, 0.188255099071, 0.049515566049]),
            ("cosine_with_restarts", "{ num_cycles = 2 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.811744900929, 0.388739533022, 0.049515566049, 0.950484433951, 0.611260466978, 0.188255099071]),
            ("cosine_with_min_lr", "{ min_lr_rate = 0.1 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.955435990556, 0.830570410836, 0.650134420280, 0.449865579720, 0.269429589164, 0.144564009444]),
            ("cosine_with_min_lr", "{ min_lr = 0.2 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.960387547161, 0.849395920743, 0.689008373583, 0.510991626417, 0.350604079257, 0.239612452839]),
            ("polynomial", "", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.857142871429, 0.714285742857, 0.571428614286, 0.428571485714, 0.285714357143, 0.142857228571]),
            ("polynomial", "{ lr_end = 0.1, power = 2.0 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.761224489796, 0.559183673469, 0.393877551020, 0.265306122449, 0.173469387755, 0.118367346939]),
            ("inverse_sqrt", "", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.866025403784, 0.774596669241, 0.707106781187, 0.654653670708, 0.612372435696, 0.577350269190]),
            ("inverse_sqrt", "{ timescale = 5 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 0.912870929175, 0.845154254729, 0.790569415042, 0.745355992500, 0.707106781187, 0.674199862463]),
            ("warmup_stable_decay", "{ num_decay_steps = 4 }", [0.0, 0.333333333333, 0.666666666667, 1.0, 1.0, 1.0, 1.0, 0.853553390593, 0.5, 0.146446609407]),
            (
                "warmup_stable_decay",
                "{ num_decay_steps = 3, num_stable_steps = 2, warmup_type = \"cosine\", decay_type = \"1-sqrt\", min_lr_ratio = 0.1 }",
                [0.1, 0.325, 0.775, 1.0, 1.0, 1.0, 0.480384757729, 0.265153077165, 0.1, 0.1],
            ),
            (
                "warmup_stable_decay",
                "{ num_decay_steps = 4, decay_type = \"linear\", warmup_type = \"1-sqrt\" }",
                [0.0, 0.183503419072, 0.422649730810, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25],
            ),
        ];
        for (name, kwargs, want) in cases {
            for warmup in ["warmup_steps = 3", "warmup_ratio = 0.25"] {
                let kwargs = if kwargs.is_empty() { String::new() } else { format!("lr_scheduler_kwargs = {kwargs}\n") };
                let r = recipe(&format!("lr_scheduler = \"{name}\"\n{kwargs}{warmup}"));
                let got: Vec<f64> = (0..10).map(|step| learning_rate(&r, step, 10)).collect();
                assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-11), "{name} {kwargs}, {warmup}: {got:?}");
            }
        }
        assert_eq!(learning_rate(&recipe("lr_scheduler = \"linear\""), 0, 10), 1.0);
        assert_eq!(learning_rate(&recipe("lr_scheduler = \"constant\""), 0, 10), 1.0);
    }
}
