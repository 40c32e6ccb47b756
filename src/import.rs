//! `ember import`: other checkpoint formats into HF model folders.

use std::path::Path;

use ember_data::tokenizer::{Flavour, convert_model};
use ember_models::gguf;

use crate::inspect::group_digits;

pub fn gguf(file: &Path, out: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let summary = gguf::import_folder(file, out)?;
    println!(
        "imported {} -> {}: {} tensors, {} parameters (f32), {} tokenizer, {:.1}s",
        file.display(),
        out.display(),
        summary.tensors,
        group_digits(summary.parameters),
        summary.tokenizer_model,
        started.elapsed().as_secs_f64()
    );
    if !summary.skipped.is_empty() {
        println!("not converted (llama.cpp's own: RoPE factors, recomputed from the config; activation scales): {}", summary.skipped.join(", "));
    }
    Ok(())
}

pub fn torch(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let summary = ember_models::torch::import_dir(dir, out)?;
    println!(
        "imported {} -> {}: {} tensors in {} safetensors file(s), {:.1} MB, {:.1}s",
        dir.display(), out.display(), summary.tensors, summary.shards, summary.bytes as f64 / 1e6, started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Files that say how a tokenizer is used, copied along when the output is another folder.
const TOKENIZER_CONFIGS: &[&str] = &["tokenizer_config.json", "special_tokens_map.json"];

/// `dir/tokenizer.model` (SentencePiece or GLM-4's tiktoken ranks) as `out/tokenizer.json`.
pub fn tokenizer(dir: &Path, out: &Path) -> anyhow::Result<()> {
    if !dir.join("tokenizer.model").is_file() {
        return Err(crate::bad_input(anyhow::anyhow!("{}: no tokenizer.model", dir.display())));
    }
    let converted = convert_model(dir)?;
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let same_folder = std::fs::canonicalize(dir).ok() == std::fs::canonicalize(out).ok();
    if !same_folder {
        for name in TOKENIZER_CONFIGS.iter().filter(|n| dir.join(n).is_file()) {
            let bytes = std::fs::read(dir.join(name)).map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(name).display()))?;
            ember_models::write_file_atomically(&out.join(name), &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", out.join(name).display()))?;
        }
    }
    let path = out.join("tokenizer.json");
    let text = serde_json::to_string(&converted.json)? + "\n";
    ember_models::write_file_atomically(&path, text.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let ids = ember_data::Tokenizer::from_file(&path)?.vocab_size();
    println!("converted {} ({}, {ids} ids) -> {}", dir.join("tokenizer.model").display(), converted.flavour.name(), path.display());
    if converted.flavour == Flavour::SentencePiece {
        println!(
            "note: tokenizer.json uses HF's BPE, which breaks ties between equally scored merges by rank where sentencepiece takes the leftmost; \
             ember reads tokenizer.model itself when tokenizer.json is absent or tokenizer_config.json says \"use_fast\": false"
        );
    }
    Ok(())
}
