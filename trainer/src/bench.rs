//! `ember bench`: the training-throughput workload of `shared/bench/peft_reference.py`, step for
//! step, so ember and HF PEFT can be compared on one machine.
//!
//! Workload: Alpaca records rendered with the Stanford template, target = output + EOS, prompt
//! masked, truncated to `cutoff`; step `s` takes examples `(s·batch + i) mod n` right-padded;
//! forward, backward, AdamW (lr 3e-4, torch's defaults: betas 0.9/0.999, eps 1e-8, weight decay
//! 0.01), no accumulation, no clipping. Tokens/s counts non-pad tokens of the timed steps (warm-up
//! steps excluded).

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::GradientsAccumulator;
use burn::tensor::{DType, Tensor};
use ember_adapters::Method;
use ember_data::sft::{SftOptions, build_example};
use ember_data::{Batch, Dataset, Template};
use ember_models::gguf::GgufFile;
use ember_models::device::{DeviceName, with_busy_workers};
use ember_models::nf4::Quantization;
use ember_models::{BaseModel, LoadDtype, ModelConfig};
use serde_json::{Value, json};

use crate::memory::{self, BatchShape, estimate};
use crate::optimizer::AdamW;
use crate::step::{StepOptions, forward_backward};

/// Where the base comes from.
#[derive(Debug, Clone)]
pub enum BenchModel {
    /// An HF model folder (weights and tokenizer).
    Dir(PathBuf),
    /// Random weights of a given shape (a preset such as `llama-7b`, or a config.json), with the
    /// tokenizer of `tokenizer`.
    Synthetic { shape: String, tokenizer: PathBuf },
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: BenchModel,
    pub data: PathBuf,
    pub method: Method,
    pub batch: usize,
    pub cutoff: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: Option<usize>,
    pub device: DeviceName,
    pub dtype: LoadDtype,
    pub quantization: Option<Quantization>,
    pub step: StepOptions,
    /// Wait for the device after the backward pass and after the optimizer, and report how long
    /// each phase took to issue and to finish (the waits change the timing a little).
    pub phase_times: bool,
}

/// config.json of a model shape: a preset (`llama-7b`, `llama-13b`, `llama3-8b`,
/// `smollm2-135m`, bf16 like their checkpoints) or the path of a config.json; and where it came from.
pub fn shape_config(shape: &str) -> Result<(Value, PathBuf), String> {
    let preset = ember_models::config::preset(shape);
    if let Some(json) = preset {
        return Ok((json, PathBuf::from(format!("{shape} (preset)"))));
    }
    let path = PathBuf::from(shape);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{shape}: not a preset ({}) nor a readable config.json: {e}", ember_models::config::PRESETS.join(", ")))?;
    Ok((serde_json::from_str(&text).map_err(|e| format!("{shape}: invalid JSON: {e}"))?, path))
}

/// Peak resident memory of this process (VmHWM), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Runs the workload and returns the result line (the reference's fields).
pub fn run(o: &BenchOptions) -> Result<Value, String> {
    let device = o.device.device()?;
    let autodiff = device.clone().autodiff();
    autodiff.seed(0);
    let dtype = o.dtype;

    let (tokenizer_dir, base) = match &o.model {
        BenchModel::Dir(dir) => (dir.clone(), BaseModel::load_quantized(dir, dtype, o.quantization, &autodiff).map_err(|e| e.to_string())?),
        BenchModel::Synthetic { shape, tokenizer } => {
            let (mut json, source) = shape_config(shape).map_err(|e| format!("--synthetic {e}"))?;
            // Token ids must fit the embedding: widen the vocabulary to the tokenizer's.
            let vocab = ember_models::load_tokenizer(tokenizer).map_err(|e| e.to_string())?.vocab_size();
            if json["vocab_size"].as_u64().is_some_and(|v| (v as usize) < vocab) {
                json["vocab_size"] = json!(vocab);
            }
            let config = ModelConfig::from_json(&json, &source).map_err(|e| e.to_string())?;
            let float = if dtype == LoadDtype::F32 { DType::F32 } else { DType::BF16 };
            (tokenizer.clone(), BaseModel::synthetic(config, float, o.quantization, 0, &autodiff))
        }
    };
    let tokenizer = ember_models::load_tokenizer(&tokenizer_dir).map_err(|e| e.to_string())?;
    let pad_id = tokenizer.pad_id.unwrap_or(0);
    let method = &o.method;
    method.config().check(&base.config)?;
    let model = method.config().init(base, 0, &autodiff).map_err(|e| e.to_string())?;
    let (trainable, _) = model.parameter_counts();

    let dataset = Dataset::load(&o.data).map_err(|e| e.to_string())?;
    let template = Template::builtin("alpaca").expect("built in");
    let options = SftOptions { cutoff_len: o.cutoff, train_on_inputs: false, last_turn_only: false };
    let examples = dataset
        .samples
        .iter()
        .enumerate()
        .map(|(index, sample)| {
            let record = sample.instruction().ok_or_else(|| dataset.record_error(index, "the benchmark renders single instructions").to_string())?;
            build_example(&tokenizer, &template, &record, &options).map(|(e, _)| e).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if examples.is_empty() {
        return Err(format!("{}: no records", o.data.display()));
    }

    let mut optimizer = AdamW::torch_defaults();
    // Milliseconds summed over the timed steps: forward + backward issued (the loss read waits
    // for the forward), backward finished, optimizer issued, optimizer finished.
    let mut phases = [0f64; 4];
    let inner = autodiff.clone().inner();
    let wait = || Tensor::<1>::zeros([1], &inner).into_scalar::<f32>();
    // Each batch's shape, for the estimate of `ember inspect --recipe` beside the measured peak.
    let mut shapes = Vec::new();
    let mut model = model;
    let (mut tokens, mut losses, mut started) = (0usize, Vec::new(), None);
    for step in 0..o.warmup + o.steps {
        if step == o.warmup {
            started = Some(Instant::now());
        }
        let chunk: Vec<_> = (0..o.batch).map(|i| &examples[(step * o.batch + i) % examples.len()]).collect();
        let batch = Batch::collate(&chunk, pad_id);
        shapes.push(BatchShape {
            lengths: if o.step.padding_free { batch.lengths() } else { vec![batch.seq; batch.batch] },
            supervised_tokens: batch.supervised_tokens(),
        });
        let mut grads = GradientsAccumulator::new();
        let mut clock = Instant::now();
        let mut lap = |phase: usize| {
            if o.phase_times && step >= o.warmup {
                phases[phase] += clock.elapsed().as_secs_f64() * 1e3;
            }
            clock = Instant::now();
        };
        // Reading the loss waits for the forward pass, as the reference's float(loss) does.
        let Some(loss) = with_busy_workers(&autodiff, || forward_backward(&model, &batch, 1.0, o.step, None, step as u64, &autodiff, &mut grads)) else { continue };
        lap(0);
        if o.phase_times {
            wait();
            lap(1);
        }
        let grads = AdamW::gather(&model, grads.grads());
        model = optimizer.step(3e-4, model, grads);
        if o.phase_times {
            lap(2);
            wait();
            lap(3);
        }
        losses.push(loss);
        if step >= o.warmup {
            tokens += batch.real_tokens();
        }
    }
    let seconds = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let weight_bytes = memory::weight_bytes(o.dtype, model.config());
    let projection_bytes = match &o.model {
        BenchModel::Dir(dir) => memory::projection_bytes(dir, o.quantization, weight_bytes).map_err(|e| e.to_string())?,
        BenchModel::Synthetic { .. } => o.quantization.map(ember_models::nf4::bytes_per_value),
    };
    let estimated = shapes.iter().map(|shape| estimate(model.config(), method, weight_bytes, projection_bytes, shape, o.step, o.device).total()).fold(0.0, f64::max);
    Ok(json!({
        "impl": "ember", "burn": "0.22.1", "method": method.config().name(), "device": o.device.to_string(),
        "flush_denormal": false, "dtype": o.dtype.name(), "threads": o.threads,
        "quantize": match o.quantization {
            None if matches!(&o.model, BenchModel::Dir(dir) if GgufFile::is_gguf(dir)) => "gguf",
            None => "none",
            Some(Quantization::Nf4 { double_quant: false }) => "nf4",
            Some(Quantization::Nf4 { double_quant: true }) => "nf4+double_quant",
            Some(Quantization::Int8) => "int8",
        },
        "batch": o.batch, "cutoff": o.cutoff, "timed_steps": o.steps, "trainable_params": trainable,
        "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens as f64 / seconds.max(1e-9), 1),
        "first_loss": losses.first().map(|l| round(*l, 4)), "last_loss": losses.last().map(|l| round(*l, 4)),
        "peak_rss_mib": peak_rss_mib().map(|m| round(m, 1)), "estimated_peak_mib": round(estimated / (1u64 << 20) as f64, 1),
        "gradient_checkpointing": o.step.checkpoint_every > 0, "gradient_checkpointing_every": o.step.checkpoint_every, "loss_chunk_tokens": o.step.loss_chunk_tokens, "padding_free": o.step.padding_free,
        "phase_ms_per_step": o.phase_times.then(|| {
            let per_step = |ms: f64| round(ms / o.steps.max(1) as f64, 2);
            json!({"forward_backward_issued": per_step(phases[0]), "backward_finished": per_step(phases[1]),
                   "optimizer_issued": per_step(phases[2]), "optimizer_finished": per_step(phases[3])})
        }),
    }))
}
