//! `ember inspect`: what a model folder holds, read from its config and safetensors headers
//! without loading the weights.

use std::collections::BTreeMap;
use std::path::Path;

use ember_data::Tokenizer;
use ember_models::config::RopePairing;
use ember_models::transformer::check_checkpoint;
use ember_models::{Checkpoint, ModelConfig};

use crate::bad_input;

/// `ember inspect --recipe r.toml`: the recipe's model, then what its adapter would train.
pub fn recipe(path: &Path) -> anyhow::Result<()> {
    let recipe = ember_trainer::Recipe::load(path, &[]).map_err(bad_input)?;
    run(&recipe.model.path)?;
    let model = ModelConfig::from_dir(&recipe.model.path).map_err(bad_input)?;
    let lora = ember_trainer::train::lora_config(&recipe).map_err(bad_input)?;
    let trainable = ember_adapters::lora::count_trainable(&model, &lora);
    let all = model.num_params() + trainable;
    println!(
        "adapter:        lora r={} alpha={} on {}: {} trainable of {} ({:.4}%)",
        lora.r, lora.alpha, lora.target, group_digits(trainable), group_digits(all), 100.0 * trainable as f64 / all as f64
    );
    Ok(())
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let config = ModelConfig::from_dir(dir).map_err(bad_input)?;
    let checkpoint = Checkpoint::open_dir(dir).map_err(bad_input)?;
    check_checkpoint(&config, &checkpoint).map_err(bad_input)?;
    let num_params = config.num_params();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut stored = 0usize;
    for key in checkpoint.keys() {
        let (shape, dtype) = checkpoint.info(key).expect("key listed by the checkpoint");
        *dtypes.entry(format!("{dtype:?}")).or_default() += 1;
        stored += shape.iter().product::<usize>();
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} ({n} tensors)")).collect();
    let rope = &config.rope;
    let pairing = match rope.pairing {
        RopePairing::Half => "rotate_half",
        RopePairing::Interleaved => "interleaved pairs",
    };

    println!("model:          {}", dir.display());
    println!("architecture:   {} (model_type {})", config.architecture.name(), config.model_type);
    println!("layers:         {}", config.num_layers);
    println!("hidden size:    {}", config.hidden_size);
    println!("attention:      {} heads, {} kv heads, head dim {}", config.num_heads, config.num_kv_heads, config.head_dim);
    println!("mlp:            {} (SwiGLU)", config.intermediate_size);
    println!("vocab:          {}", config.vocab_size);
    println!("rope:           theta {}, {} of {} dims, {pairing}{}", rope.theta, rope.rotary_dim, config.head_dim,
        rope.scaling.as_ref().map(|s| format!(", scaling {s:?}")).unwrap_or_default());
    println!("tied embedding: {}", if config.tie_word_embeddings { "yes" } else { "no" });
    println!("parameters:     {} ({})", group_digits(num_params), human(num_params));
    println!("checkpoint:     {} tensors, {} values, dtype {}", checkpoint.keys().count(), group_digits(stored), dtypes.join(", "));
    match Tokenizer::from_dir(dir) {
        Ok(t) => println!("tokenizer:      {} tokens, bos {:?}, eos {:?}, pad {:?}", t.vocab_size(), t.bos_id, t.eos_id, t.pad_id),
        Err(e) => println!("tokenizer:      none ({e})"),
    }
    Ok(())
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
