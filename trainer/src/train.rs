//! The training loop: AdamW on the adapter parameters only, warmup + decay schedule, gradient
//! accumulation with HF's loss normalisation, global-norm clipping, periodic evaluation,
//! `metrics.jsonl` and `summary.json`, and the adapter exported in PEFT format at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_adapters::{AdaptedModel, Method};
use ember_data::sft::{self, SftOptions};
use ember_data::{Batch, Example, Template, Tokenizer, alpaca};
use ember_models::BaseModel;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::checkpoint::{self, Position, State};
use crate::fault::{self, Fault};
use crate::loss::causal_lm_loss;
use crate::recipe::{LrScheduler, OnNonfinite, Recipe};
use crate::step;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The recipe, data or model files are wrong: exit code 2.
    #[error("{0}")]
    Input(String),
    /// Training itself failed (NaN, an empty adapter, I/O): exit code 1.
    #[error("{0}")]
    Run(String),
}

fn input(e: impl std::fmt::Display) -> TrainError {
    TrainError::Input(e.to_string())
}

fn run_error(e: impl std::fmt::Display) -> TrainError {
    TrainError::Run(e.to_string())
}

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
const RUN_FILES: &[&str] = &["metrics.jsonl", "summary.json", "adapter", "checkpoints", "training_curves.png"];

/// Refuses to mix two runs in one folder; with `Overwrite`, removes the old run's files first.
fn prepare_output(dir: &Path, start: Start) -> Result<(), TrainError> {
    let present: Vec<&str> = RUN_FILES.iter().copied().filter(|f| dir.join(f).exists()).collect();
    match start {
        Start::Fresh if !present.is_empty() => {
            return Err(input(format!(
                "output.dir {} already holds a run ({}); pass --resume to continue it or --overwrite to replace it",
                dir.display(),
                present.join(", ")
            )));
        }
        Start::Overwrite => {
            for name in present {
                let path = dir.join(name);
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.map_err(|e| run_error(format!("{}: {e}", path.display())))?;
            }
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(|e| run_error(format!("{}: {e}", dir.display())))?;
    // What a killed run may have left half-written; never read, so safe to drop.
    ember_models::remove_stale_temporaries(dir);
    ember_models::remove_stale_temporaries(&dir.join("checkpoints"));
    Ok(())
}

/// One optimizer step, as the loop reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    /// True every `logging_steps` steps and at the last one: the steps worth a log line.
    #[serde(skip)]
    pub log_line: bool,
}

impl std::fmt::Display for StepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}/{} epoch {:.2} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s eta {:.0}s",
            self.step, self.total_steps, self.epoch, self.loss, self.lr, self.grad_norm, self.tokens_per_second, self.eta_seconds
        )
    }
}

/// What the loop tells its caller while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A line worth printing (data and model summary, evaluations, checkpoints).
    Info(String),
    Step(StepReport),
}

/// What a finished run reports (also written to `summary.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub epochs_completed: f64,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub skipped_empty_records: Vec<usize>,
    /// Optimizer steps skipped for a NaN/inf loss or gradient (`train.on_nonfinite = "skip"`).
    #[serde(default)]
    pub skipped_nonfinite_steps: Vec<usize>,
    pub truncated_records: usize,
    pub trainable_parameters: usize,
    pub total_parameters: usize,
    pub first_train_loss: Option<f64>,
    pub final_train_loss: Option<f64>,
    pub first_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub tokens_per_second: f64,
    pub seconds: f64,
    pub adapter_dir: PathBuf,
    pub metrics: PathBuf,
    /// `training_curves.png`; none if it could not be drawn. (Absent from checkpoints written
    /// before plots existed.)
    #[serde(default)]
    pub plot: Option<PathBuf>,
}

/// The recipe's prompt template.
pub fn template(recipe: &Recipe) -> Result<Template, TrainError> {
    let d = &recipe.data;
    if d.template == "custom" {
        return match (&d.prompt_input, &d.prompt_no_input) {
            (Some(with), Some(without)) => Ok(Template { prompt_input: with.clone(), prompt_no_input: without.clone() }),
            _ => Err(input("data.template = \"custom\" needs data.prompt_input and data.prompt_no_input")),
        };
    }
    Template::builtin(&d.template).ok_or_else(|| {
        input(format!("data.template '{}' is unknown (built in: {}, or custom)", d.template, ember_data::template::BUILTIN_TEMPLATES.join(", ")))
    })
}

fn int_tensor(values: &[i64], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Learning rate at optimizer step `step` (0-based): linear warmup, then constant, linear or
/// cosine decay to 0 at `total`, as transformers' schedulers.
pub fn learning_rate(recipe: &Recipe, step: usize, total: usize) -> f64 {
    let t = &recipe.train;
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let progress = (step - t.warmup_steps) as f64 / (total.saturating_sub(t.warmup_steps)).max(1) as f64;
    match t.lr_scheduler {
        LrScheduler::Linear => t.lr * (1.0 - progress).max(0.0),
        LrScheduler::Cosine => t.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrScheduler::Constant => t.lr,
    }
}

/// Micro-batches of one epoch, in a seeded order; with `group_by_length`, examples of similar
/// length share a batch (megabatches of 50 batches sorted by length, as HF's sampler).
fn epoch_batches(examples: &[Example], recipe: &Recipe, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut rng = StdRng::seed_from_u64(recipe.train.seed.wrapping_add(1 + epoch as u64));
    order.shuffle(&mut rng);
    let mbs = recipe.train.micro_batch_size;
    if recipe.data.group_by_length {
        for mega in order.chunks_mut(50 * mbs) {
            mega.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
        }
    }
    order.chunks(mbs).map(<[usize]>::to_vec).collect()
}

/// Mean loss over every supervised token of `examples`, without building a graph.
pub fn evaluate(model: &AdaptedModel, examples: &[Example], batch_size: usize, pad_id: u32, device: &Device) -> Option<f64> {
    if examples.is_empty() {
        return None;
    }
    let model = model.valid();
    let (mut total, mut tokens) = (0f64, 0usize);
    for chunk in examples.chunks(batch_size) {
        let batch = Batch::collate(&chunk.iter().collect::<Vec<_>>(), pad_id);
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
    (tokens > 0).then(|| total / tokens as f64)
}

fn info(on_event: &mut dyn FnMut(Event), line: String) {
    on_event(Event::Info(line));
}

/// `metrics.jsonl`: one JSON object per training step or evaluation, flushed as written.
struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    /// A new file, or, when resuming, the checkpoint's metrics (put in place atomically) to
    /// append to: lines written after the checkpoint by the killed run are dropped.
    fn create(path: PathBuf, resume_from: Option<&Path>) -> Result<Self, TrainError> {
        let error = |e: std::io::Error| run_error(format!("{}: {e}", path.display()));
        let file = match resume_from {
            Some(saved) => {
                let bytes = std::fs::read(saved).map_err(|e| run_error(format!("{}: {e}", saved.display())))?;
                ember_models::write_file_atomically(&path, &bytes).map_err(error)?;
                std::fs::OpenOptions::new().append(true).open(&path).map_err(error)?
            }
            None => std::fs::File::create(&path).map_err(error)?,
        };
        Ok(Self { path, file })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{value}").and_then(|()| self.file.flush()).map_err(|e| run_error(format!("{}: {e}", self.path.display())))
    }
}

/// The held-out examples and how to batch them.
struct Evaluator<'a> {
    examples: &'a [Example],
    batch_size: usize,
    pad_id: u32,
    device: Device,
}

impl Evaluator<'_> {
    /// Evaluates, logs, and records the loss in the metrics and the summary.
    fn run(&self, model: &AdaptedModel, step: usize, metrics: &mut Metrics, summary: &mut Summary, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let Some(loss) = evaluate(model, self.examples, self.batch_size, self.pad_id, &self.device) else { return Ok(()) };
        info(on_event, format!("eval step {step}: loss {loss:.4}"));
        summary.first_eval_loss.get_or_insert(loss);
        summary.final_eval_loss = Some(loss);
        summary.best_eval_loss = Some(summary.best_eval_loss.map_or(loss, |b| b.min(loss)));
        metrics.write(json!({"step": step, "eval_loss": loss}))
    }
}

/// Squared L2 norm of every adapter gradient, then scales them to `max_norm` if above it.
/// Returns the norm before clipping. Frozen parameters have no gradient and add nothing.
fn clip_global_norm(model: &AdaptedModel, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SquaredNorm<'a>(&'a GradientsParams, f64);
    impl ModuleVisitor for SquaredNorm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1 += g.powi_scalar(2).sum().into_scalar::<f32>() as f64;
            }
        }
    }
    struct Scale<'a>(&'a mut GradientsParams, f64);
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                self.0.register(param.id, g.mul_scalar(self.1));
            }
        }
    }
    let mut squared = SquaredNorm(grads, 0.0);
    model.visit(&mut squared);
    let norm = squared.1.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        model.visit(&mut Scale(grads, max_norm / (norm + 1e-6)));
    }
    norm
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
    Err(run_error(format!(
        "step {step}: {what} is {value}; stopping without saving the adapter; {resume}; train.on_nonfinite = \"skip\" skips such steps instead"
    )))
}

/// Runs the recipe into its output folder (see [`Start`]). `on_event` hears about every step
/// and every notable event.
pub fn train(recipe: &Recipe, start_mode: Start, on_event: &mut dyn FnMut(Event)) -> Result<Summary, TrainError> {
    let started = Instant::now();
    let device = recipe.model.device.device().map_err(|e| input(format!("model.device: {e}")))?;
    let autodiff = device.clone().autodiff();
    autodiff.seed(recipe.train.seed);
    let t = &recipe.train;

    // Data: seeded split, then examples; nothing dropped without a count.
    let tokenizer = Tokenizer::from_dir(&recipe.model.path).map_err(input)?;
    let template = template(recipe)?;
    let mut records = alpaca::load(&recipe.data.path).map_err(input)?;
    if recipe.data.val_size >= records.len() {
        return Err(input(format!("data.val_size {} leaves no training record ({} records)", recipe.data.val_size, records.len())));
    }
    records.shuffle(&mut StdRng::seed_from_u64(t.seed));
    let eval_records = records.split_off(records.len() - recipe.data.val_size);
    let options = SftOptions { cutoff_len: recipe.data.cutoff_len, train_on_inputs: recipe.data.train_on_inputs };
    let (train_set, stats) = sft::build_examples(&tokenizer, &template, &records, &options).map_err(input)?;
    let (eval_set, _) = sft::build_examples(&tokenizer, &template, &eval_records, &options).map_err(input)?;
    if train_set.is_empty() {
        return Err(input(format!("{}: no record has a supervised token within cutoff_len {}", recipe.data.path.display(), recipe.data.cutoff_len)));
    }
    info(on_event, format!(
        "data: {} train / {} eval examples from {} ({} truncated to {} tokens, {} without any answer token after truncation, skipped)",
        train_set.len(), eval_set.len(), recipe.data.path.display(), stats.truncated, recipe.data.cutoff_len, stats.empty.len()
    ));
    let pad_id = tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0);

    // Model: frozen base + fresh LoRA branches.
    let base = BaseModel::load(&recipe.model.path, recipe.model.dtype, &autodiff).map_err(input)?;
    let (mut model, method) = match &recipe.adapter.init_from {
        Some(dir) => Method::load(dir, base, &autodiff).map_err(input)?,
        None => {
            let method = recipe.adapter.method.clone();
            method.config().check(&base.config).map_err(|e| input(format!("adapter: {e}")))?;
            (method.config().init(base, t.seed, &autodiff).map_err(input)?, method)
        }
    };
    let (trainable, total) = model.parameter_counts();
    info(on_event, format!("model: {} with {method}: {trainable} trainable of {total} parameters ({:.4}%)",
        recipe.model.path.display(), 100.0 * trainable as f64 / total as f64));

    let mut optimizer = AdamWConfig::new()
        .with_beta_1(t.adam_beta1 as f32)
        .with_beta_2(t.adam_beta2 as f32)
        .with_epsilon(t.adam_epsilon as f32)
        .with_weight_decay(t.weight_decay as f32)
        .init();

    let steps_per_epoch = train_set.len().div_ceil(t.micro_batch_size * t.gradient_accumulation_steps);
    let total_steps = if t.max_steps > 0 { t.max_steps } else { steps_per_epoch * t.epochs };
    prepare_output(&recipe.output.dir, start_mode)?;
    let checkpoints = recipe.output.dir.join("checkpoints");
    let resume_from = match start_mode {
        Start::Resume => Some(checkpoint::latest(&checkpoints).ok_or_else(|| input(format!("--resume: no checkpoint in {}", checkpoints.display())))?),
        Start::Fresh | Start::Overwrite => None,
    };
    let mut last_checkpoint = resume_from.clone();
    let mut metrics = Metrics::create(recipe.output.dir.join("metrics.jsonl"), resume_from.as_deref().map(|d| d.join("metrics.jsonl")).as_deref())?;

    let mut summary = Summary {
        steps: 0, epochs_completed: 0.0, train_examples: train_set.len(), eval_examples: eval_set.len(),
        skipped_empty_records: stats.empty.clone(), skipped_nonfinite_steps: Vec::new(), truncated_records: stats.truncated,
        trainable_parameters: trainable, total_parameters: total,
        first_train_loss: None, final_train_loss: None, first_eval_loss: None, final_eval_loss: None, best_eval_loss: None,
        tokens_per_second: 0.0, seconds: 0.0, adapter_dir: recipe.output.dir.join("adapter"), metrics: metrics.path.clone(), plot: None,
    };
    let evaluator = Evaluator { examples: &eval_set, batch_size: t.micro_batch_size, pad_id, device: autodiff.clone().inner() };
    let base_name = recipe.model.path.to_string_lossy().into_owned();

    let (mut tokens_seen, mut train_seconds) = (0usize, 0f64);
    let mut start = Position::default();
    match &resume_from {
        Some(dir) => {
            let state = checkpoint::read_state(dir).map_err(input)?;
            (model, optimizer) = checkpoint::restore(dir, model, optimizer).map_err(input)?;
            (start, tokens_seen, train_seconds) = (state.position, state.tokens_seen, state.train_seconds);
            summary = Summary { adapter_dir: summary.adapter_dir, metrics: summary.metrics, plot: None, ..state.summary };
            info(on_event, format!("resumed from {} at step {}", dir.display(), start.step));
        }
        None => evaluator.run(&model, 0, &mut metrics, &mut summary, on_event)?,
    }

    let options = t.step_options();
    let mut step = start.step;
    'epochs: for epoch in start.epoch.. {
        let batches = epoch_batches(&train_set, recipe, epoch);
        let first_group = if epoch == start.epoch { start.next_group } else { 0 };
        for (group_index, group) in batches.chunks(t.gradient_accumulation_steps).enumerate().skip(first_group) {
            if step >= total_steps {
                break 'epochs;
            }
            let step_started = Instant::now();
            let micro: Vec<Batch> = group
                .iter()
                .map(|ids| Batch::collate(&ids.iter().map(|&i| &train_set[i]).collect::<Vec<_>>(), pad_id))
                .collect();
            // HF normalises by the supervised tokens of the whole accumulated batch.
            let step_tokens: usize = micro.iter().map(Batch::supervised_tokens).sum();
            let mut accumulator = GradientsAccumulator::<AdaptedModel>::new();
            let mut step_loss = 0f64;
            for (index, batch) in micro.iter().enumerate() {
                // Dropout masks depend on the seed, step and micro-batch only: a resumed run draws the same.
                let seed = t.seed.wrapping_add(step as u64).wrapping_mul(1 << 16).wrapping_add(index as u64);
                let weight = batch.supervised_tokens() as f64 / step_tokens as f64;
                if let Some(loss) = step::forward_backward(&model, batch, weight, options, seed, &autodiff, &mut accumulator) {
                    step_loss += loss;
                    tokens_seen += batch.real_tokens();
                }
            }
            if fault::armed(Fault::NanLoss, step + 1) {
                step_loss = f64::NAN;
            }
            let mut grads = accumulator.grads();
            let grad_norm = clip_global_norm(&model, &mut grads, t.max_grad_norm);
            let lr = learning_rate(recipe, step, total_steps);
            let bad = [("loss", step_loss), ("gradient norm", grad_norm)].into_iter().find(|(_, v)| !v.is_finite());
            match bad {
                Some((what, value)) => {
                    nonfinite(recipe, step + 1, what, value, last_checkpoint.as_deref())?;
                    info(on_event, format!("step {}: {what} is {value}; step skipped (train.on_nonfinite = \"skip\")", step + 1));
                    summary.skipped_nonfinite_steps.push(step + 1);
                }
                None => model = optimizer.step(lr, model, grads),
            }
            train_seconds += step_started.elapsed().as_secs_f64();
            step += 1;
            summary.steps = step;
            summary.epochs_completed = epoch as f64 + ((group_index + 1) * t.gradient_accumulation_steps).min(batches.len()) as f64 / batches.len() as f64;
            if step_loss.is_finite() {
                summary.first_train_loss.get_or_insert(step_loss);
                summary.final_train_loss = Some(step_loss);
            }
            let tokens_per_second = tokens_seen as f64 / train_seconds;
            metrics.write(json!({"step": step, "epoch": summary.epochs_completed, "loss": step_loss, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_second": tokens_per_second, "elapsed_s": started.elapsed().as_secs_f64()}))?;
            on_event(Event::Step(StepReport {
                step,
                total_steps,
                epoch: summary.epochs_completed,
                loss: step_loss,
                lr,
                grad_norm,
                tokens_per_second,
                eta_seconds: train_seconds / step as f64 * (total_steps - step) as f64,
                log_line: step % t.logging_steps.max(1) == 0 || step == total_steps,
            }));
            if t.eval_steps > 0 && step % t.eval_steps == 0 && step < total_steps {
                evaluator.run(&model, step, &mut metrics, &mut summary, on_event)?;
            }
            if t.save_steps > 0 && step % t.save_steps == 0 && step < total_steps {
                let state = State {
                    position: Position { step, epoch, next_group: group_index + 1 },
                    summary: summary.clone(),
                    tokens_seen,
                    train_seconds,
                };
                let dir = checkpoint::save(&checkpoints, &model, &method, &optimizer, &state, &metrics.path, &base_name, t.keep_checkpoints)
                    .map_err(run_error)?;
                info(on_event, format!("checkpoint {}", dir.display()));
                last_checkpoint = Some(dir);
            }
        }
        if t.max_steps == 0 && epoch + 1 >= t.epochs {
            break;
        }
    }
    evaluator.run(&model, step, &mut metrics, &mut summary, on_event)?;
    summary.tokens_per_second = tokens_seen as f64 / train_seconds.max(1e-9);

    if let Some(reason) = model.unchanged_reason() {
        return Err(run_error(format!("{reason} after training: the adapter would equal the base model; not saving it")));
    }
    method.config().save(&model, &base_name, &summary.adapter_dir).map_err(run_error)?;
    // The adapter is saved: a plot that cannot be drawn is worth a message, not a failed run.
    let run_name = recipe.output.dir.file_name().map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    match crate::plot::plot_run(&recipe.output.dir, &run_name) {
        Ok(path) => summary.plot = Some(path),
        Err(e) => info(on_event, format!("warning: no training curves: {e}")),
    }
    summary.seconds = started.elapsed().as_secs_f64();
    let summary_path = recipe.output.dir.join("summary.json");
    ember_models::write_file_atomically(&summary_path, (serde_json::to_string_pretty(&summary).expect("summary serializes") + "\n").as_bytes())
        .map_err(|e| run_error(format!("{}: {e}", summary_path.display())))?;
    info(on_event, format!("saved adapter to {} ({:.0}s)", summary.adapter_dir.display(), summary.seconds));
    Ok(summary)
}
