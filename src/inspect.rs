//! `ember inspect`: what a model folder holds, read from its config and safetensors headers
//! without loading the weights; or what a training run did, read from its summary, adapter
//! config and checkpoints.

use std::collections::BTreeMap;
use std::path::Path;

use ember_models::config::RopePairing;
use ember_models::family::check_checkpoint;
use ember_models::gguf::GgufFile;
use ember_models::hub::Fetch;
use ember_models::{Checkpoint, ModelConfig};
use ember_trainer::Summary;
use ember_trainer::checkpoint;
use ember_trainer::memory::{self, BatchShape};
use ember_trainer::recipe::env_overrides;
use serde_json::Value;

use crate::bad_input;

/// `ember inspect --recipe r.toml [--shape s]`: the recipe's model (or a model shape, for a
/// checkpoint not on this machine), what its adapter would train, and the estimated peak memory.
pub fn recipe(path: &Path, shape: Option<&str>, overrides: &[String]) -> anyhow::Result<()> {
    let recipe = ember_trainer::Recipe::load_with_env(path, &env_overrides(), overrides, Fetch::Download)?;
    let model = match shape {
        Some(shape) => {
            let (json, source) = ember_trainer::bench::shape_config(shape).map_err(|e| bad_input(anyhow::anyhow!("--shape {e}")))?;
            println!("model:          shape {} (the recipe's model {} is not read)", source.display(), recipe.model.path.display());
            ModelConfig::from_json(&json, &source)?
        }
        None => {
            run(&recipe.model.path)?;
            let mut config = ModelConfig::from_dir(&recipe.model.path)?;
            // The vocabulary training will have (grown to the tokenizer's with resize_embeddings).
            if let Ok(tokenizer) = ember_models::load_tokenizer(&recipe.model.path) {
                config.vocab_size = recipe.model.vocab_for(tokenizer.vocab_size(), config.vocab_size).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
            }
            config
        }
    };
    let method = &recipe.adapter.method;
    let trainable = method.config().count_trainable(&model);
    let all = model.num_params() + trainable;
    println!(
        "adapter:        {method}: {} trainable of {} ({:.4}%)",
        group_digits(trainable), group_digits(all), 100.0 * trainable as f64 / all as f64
    );
    let t = &recipe.train;
    let batch = BatchShape::worst_case(t.micro_batch_size, recipe.data.cutoff_len);
    let projection_bytes = match shape {
        Some(_) => recipe.model.quantization().map(ember_models::nf4::bytes_per_value),
        None => memory::projection_bytes(&recipe.model.path, recipe.model.quantization(), memory::weight_bytes(recipe.model.dtype, &model))?,
    };
    let estimate = memory::estimate(&model, method, memory::weight_bytes(recipe.model.dtype, &model), projection_bytes, &batch, t.step_options(), recipe.model.device);
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    println!(
        "memory:         ~{:.1} GiB peak (estimate; {} sequences of {} tokens, checkpointing {}, loss chunk {}): \
         weights {:.1}, adapter + AdamW {:.2}, activations {:.1}, loss {:.2} GiB",
        gib(estimate.total()), t.micro_batch_size, recipe.data.cutoff_len,
        match (t.gradient_checkpointing, t.gradient_checkpointing_every) {
            (false, _) => "off".to_string(),
            (true, 1) => "on".to_string(),
            (true, k) => format!("on for 1 layer in {k}"),
        },
        if t.loss_chunk_tokens == 0 { "off".to_string() } else { format!("{} tokens", t.loss_chunk_tokens) },
        gib(estimate.weights), gib(estimate.adapter), gib(estimate.activations), gib(estimate.loss)
    );
    Ok(())
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let config = ModelConfig::from_dir(dir)?;
    let num_params = config.num_params();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut stored = 0usize;
    let mut tensors = 0;
    // A GGUF base's projections stay in their blocks: what a value of them takes in memory.
    let mut in_blocks = None;
    if GgufFile::is_gguf(dir) {
        let file = GgufFile::open(dir)?;
        for tensor in &file.tensors {
            *dtypes.entry(format!("{:?}", tensor.ggml_type)).or_default() += 1;
            stored += tensor.shape.iter().product::<usize>();
        }
        tensors = file.tensors.len();
        in_blocks = file.projection_bytes_per_value(4.0);
    } else {
        let checkpoint = Checkpoint::open_dir(dir)?;
        check_checkpoint(&config, &checkpoint)?;
        for key in checkpoint.keys() {
            let (shape, dtype) = checkpoint.info(key).expect("key listed by the checkpoint");
            *dtypes.entry(format!("{dtype:?}")).or_default() += 1;
            stored += shape.iter().product::<usize>();
            tensors += 1;
        }
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} ({n} tensor{})", if *n == 1 { "" } else { "s" })).collect();
    let rope = &config.rope;
    let pairing = match rope.pairing {
        RopePairing::Half => "rotate_half",
        RopePairing::Interleaved => "interleaved pairs",
    };

    println!("model:          {}", dir.display());
    println!("architecture:   {} (model_type {})", config.architecture.name(), config.model_type);
    println!("layers:         {}", config.num_layers);
    println!("hidden size:    {}", config.hidden_size);
    let qk_norm = if config.qk_norm { ", q/k norm per head" } else { "" };
    let window = config.sliding_window.as_ref().map_or(String::new(), |w| {
        let sliding = w.layers.iter().filter(|&&s| s).count();
        format!(", sliding window {} tokens in {sliding} of {} layers", w.size, config.num_layers)
    });
    println!("attention:      {} heads, {} kv heads, head dim {}{qk_norm}{window}", config.num_heads, config.num_kv_heads, config.head_dim);
    println!("mlp:            {} ({})", config.intermediate_size, config.hidden_act.mlp_name());
    println!("vocab:          {}", config.vocab_size);
    println!("rope:           theta {}, {} of {} dims, {pairing}{}", rope.theta, rope.rotary_dim, config.head_dim,
        rope.scaling.as_ref().map(|s| format!(", scaling {s}")).unwrap_or_default());
    println!("tied embedding: {}", if config.tie_word_embeddings { "yes" } else { "no" });
    println!("parameters:     {} ({})", group_digits(num_params), human(num_params));
    println!("checkpoint:     {tensors} tensors, {} values, dtype {}", group_digits(stored), dtypes.join(", "));
    if let Some(bytes) = in_blocks {
        println!("as a base:      projections kept in their blocks, {bytes:.2} bytes a value in memory");
    }
    let id = |id: Option<u32>| id.map_or("none".to_string(), |id| id.to_string());
    match ember_models::load_tokenizer(dir) {
        Ok(t) => println!("tokenizer:      {} tokens, bos {}, eos {}, pad {}", t.vocab_size(), id(t.bos_id), id(t.eos_id), id(t.pad_id)),
        Err(e) => println!("tokenizer:      none ({e})"),
    }
    Ok(())
}

/// Whether `dir` is a training run's output folder rather than a model.
pub fn is_training_run(dir: &Path) -> bool {
    dir.join("summary.json").is_file() || dir.join("checkpoints").is_dir() || dir.join("adapter").is_dir()
}

/// `ember inspect <run dir>`: method and settings, trainable parameters, steps, losses and
/// output paths of a finished run, or of an unfinished one from its newest checkpoint.
pub fn training_run(dir: &Path) -> anyhow::Result<()> {
    let summary_path = dir.join("summary.json");
    let newest_checkpoint = checkpoint::latest(&dir.join("checkpoints"));
    let (summary, status) = if summary_path.is_file() {
        let text = std::fs::read_to_string(&summary_path).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", summary_path.display())))?;
        let summary: Summary = serde_json::from_str(&text).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", summary_path.display())))?;
        (Some(summary), "finished".to_owned())
    } else if let Some(checkpoint) = &newest_checkpoint {
        let state = checkpoint::read_state(checkpoint)?;
        (Some(state.summary), format!("unfinished (no summary.json); newest checkpoint {}", checkpoint.display()))
    } else {
        (None, "unfinished (no summary.json, no checkpoint)".to_owned())
    };
    let adapter = [Some(dir.join("adapter")), newest_checkpoint.as_ref().map(|c| c.join("adapter"))].into_iter().flatten().find(|d| d.is_dir());

    println!("run:            {}", dir.display());
    println!("status:         {status}");
    match &adapter {
        Some(adapter) => {
            let (method, base) = describe_adapter(adapter)?;
            println!("method:         {method}");
            if base != "-" {
                println!("base model:     {base}");
            }
        }
        None => println!("method:         unknown (no adapter folder yet)"),
    }
    let Some(s) = summary else { return Ok(()) };
    let percent = 100.0 * s.trainable_parameters as f64 / s.total_parameters.max(1) as f64;
    println!("trainable:      {} of {} parameters ({percent:.4}%)", group_digits(s.trainable_parameters), group_digits(s.total_parameters));
    println!("steps:          {} ({:.2} epochs, {} train / {} eval examples)", s.steps, s.epochs_completed, s.train_examples, s.eval_examples);
    println!("train loss:     {} -> {}", loss(s.first_train_loss), loss(s.final_train_loss));
    let best_step = s.best_eval_step.map_or(String::new(), |step| format!(" at step {step}"));
    println!("eval loss:      {} -> {} (best {}{best_step})", loss(s.first_eval_loss), loss(s.final_eval_loss), loss(s.best_eval_loss));
    if let Some(step) = s.stopped_early_at {
        println!("stopped early:  at step {step} (train.early_stopping_patience)");
    }
    if let Some(adapter) = adapter {
        println!("adapter:        {}", adapter.display());
    }
    println!("metrics:        {}", dir.join("metrics.jsonl").display());
    let plot = dir.join(ember_trainer::plot::PLOT_FILE);
    if plot.is_file() {
        println!("curves:         {}", plot.display());
    }
    if let Some(checkpoint) = newest_checkpoint {
        println!("checkpoint:     {}", checkpoint.display());
    }
    Ok(())
}

fn loss(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |l| format!("{l:.4}"))
}

/// The method with its settings, and the base model name, from an adapter folder's config.
fn describe_adapter(dir: &Path) -> anyhow::Result<(String, String)> {
    let method = ember_adapters::Method::read(dir)?;
    let folder = ember_adapters::AdapterFolder::read(dir)?;
    let base = ["base_model_name_or_path", "_name_or_path"].iter().find_map(|k| folder.get(k).and_then(Value::as_str)).unwrap_or("-");
    Ok((method.to_string(), base.to_owned()))
}

/// 134515008 -> "134,515,008"
pub fn group_digits(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// 134515008 -> "134.5M"
pub fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
