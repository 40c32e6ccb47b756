//! A recipe's `[export]`: after the adapter is saved, the merged model for serving, as
//! `ember merge`, `ember imatrix` and `ember export gguf` would write it from the run's folder:
//! `merged/` (an HF folder), `gguf/imatrix.gguf` (an importance matrix of the training
//! examples) and `gguf/model-<type>.gguf`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ember_models::gguf::GgufArch;
use ember_models::{LoadError, ModelConfig};

use crate::export::export_gguf;
use crate::imatrix::{Calibration, collect};
use crate::merge::{MergeError, merge};
use crate::recipe::Recipe;

/// llama-imatrix's chunk length.
const IMATRIX_CHUNK: usize = 512;

/// Refuses, before training, a GGUF export llama.cpp could not take: a tokenizer whose
/// pre-tokenizer it does not know (without `export.pre`), a tensor it has no name for.
pub fn check(recipe: &Recipe) -> Result<(), LoadError> {
    if recipe.export.gguf.is_empty() {
        return Ok(());
    }
    let base = &recipe.model.path;
    let config = ModelConfig::from_dir(base)?;
    ember_models::gguf_write::tokenizer_metadata(base, GgufArch::of(&config), config.vocab_size, recipe.export.pre.as_deref(), None).map(drop).map_err(|e| match e {
        // The recipe's name for the command line's --pre.
        LoadError::Invalid { path, reason } => LoadError::Invalid { path, reason: reason.replace("--pre", "export.pre") },
        other => other,
    })
}

/// Writes what `recipe.export` asks for from the saved adapter in `adapter_dir`; the importance
/// matrix runs over `calibration` (the training examples' ids, one after another; `bos` starts
/// each chunk where the tokenizer adds it). Reports each file through `info`; returns their paths.
pub fn export(
    recipe: &Recipe,
    adapter_dir: &Path,
    calibration: &[u32],
    bos: Option<u32>,
    info: &mut dyn FnMut(String),
) -> Result<Vec<PathBuf>, MergeError> {
    let (base, dir, export) = (&recipe.model.path, &recipe.output.dir, &recipe.export);
    // A template of one's own (`data.template = "x.jinja"`) goes with the model it trained.
    let chat_template = match ember_data::chat::is_jinja_file(&recipe.data.template) {
        true => Some(std::fs::read_to_string(&recipe.data.template).map_err(|source| LoadError::Io { path: PathBuf::from(&recipe.data.template), source })?),
        false => None,
    };
    let mut written = Vec::new();
    if let Some(dtype) = export.merged_dtype() {
        let started = Instant::now();
        let out = dir.join("merged");
        let summary = merge(base, adapter_dir, &out, dtype, chat_template.as_deref())?;
        info(format!("export: merged model {} ({:.1} MB, {:.1}s)", out.display(), summary.bytes as f64 / 1e6, started.elapsed().as_secs_f64()));
        written.push(out);
    }
    if export.gguf.is_empty() {
        return Ok(written);
    }
    let gguf_dir = dir.join("gguf");
    std::fs::create_dir_all(&gguf_dir).map_err(|source| MergeError::Write { path: gguf_dir.clone(), source })?;
    let importance = match export.imatrix {
        true => Some(importance_matrix(recipe, adapter_dir, &gguf_dir, calibration, bos, info)?),
        false => None,
    };
    written.extend(importance.clone());
    for (name, ty) in export.gguf.iter().zip(export.gguf_types()) {
        let started = Instant::now();
        let out = gguf_dir.join(format!("model-{name}.gguf"));
        let matrix = importance.as_deref().filter(|_| ty.quantized());
        let summary = export_gguf(base, Some(adapter_dir), &out, ty, export.pre.as_deref(), matrix, chat_template.as_deref())?;
        info(format!("export: {} ({:.1} MB, {:.1}s)", out.display(), summary.bytes as f64 / 1e6, started.elapsed().as_secs_f64()));
        written.push(out);
    }
    Ok(written)
}

/// How many of the training examples' tokens the importance matrix can use.
pub fn calibration_tokens(recipe: &Recipe) -> usize {
    IMATRIX_CHUNK * recipe.export.imatrix_chunks
}

/// `gguf_dir/imatrix.gguf` of the merged model over `calibration`, in chunks of 512 tokens (fewer
/// when the examples hold fewer), at most `export.imatrix_chunks` of them.
fn importance_matrix(
    recipe: &Recipe,
    adapter_dir: &Path,
    gguf_dir: &Path,
    calibration: &[u32],
    bos: Option<u32>,
    info: &mut dyn FnMut(String),
) -> Result<PathBuf, MergeError> {
    let started = Instant::now();
    let chunk_size = IMATRIX_CHUNK.min(calibration.len());
    if chunk_size < 16 {
        let reason = format!("'export.imatrix': the training examples hold {} tokens, fewer than the 16 a chunk needs", calibration.len());
        return Err(LoadError::Invalid { path: recipe.data.paths[0].clone(), reason }.into());
    }
    let calibration = Calibration { tokens: calibration, chunk_size, bos, max_chunks: Some(recipe.export.imatrix_chunks), output: false };
    let device = recipe.model.device.device().map_err(|e| LoadError::Invalid { path: recipe.model.path.clone(), reason: e.to_string() })?;
    // As the run trained it (its dtype and quantization), so that the matrix fits where training did.
    let (dtype, quantization) = (recipe.model.dtype, recipe.model.quantization());
    let collected = collect(&recipe.model.path, Some(adapter_dir), dtype, quantization, &calibration, &device, |_, _| {})?;
    let out = gguf_dir.join("imatrix.gguf");
    let datasets: Vec<String> = recipe.data.paths.iter().map(|p| p.display().to_string()).collect();
    ember_models::imatrix::write_gguf(&out, &collected.entries, &datasets, collected.chunks as u32, chunk_size as u32)?;
    info(format!(
        "export: importance matrix {} ({} chunks of {chunk_size} training tokens, {:.1}s)",
        out.display(), collected.chunks, started.elapsed().as_secs_f64()
    ));
    Ok(out)
}
