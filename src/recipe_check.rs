//! `ember recipe check`: what `ember train` would trip over, found without training: keys and
//! types, the files the recipe points at, whether the method fits the model's architecture, the
//! template and the data.

use std::path::Path;

use ember_adapters::AdapterFolder;
use ember_models::gguf::GgufFile;
use ember_models::family::check_checkpoint;
use ember_models::{Checkpoint, ModelConfig};
use ember_trainer::Recipe;
use ember_models::hub::Fetch;
use ember_trainer::recipe::env_overrides;
use ember_trainer::train::template;

use crate::bad_input;
use crate::inspect::group_digits;

/// Checks every file, printing `ok <file>: <summary>` or `error: <file>: <reason>` for each;
/// bad input if any is wrong. `EMBER_<SECTION>__<KEY>` variables apply, as in `ember train`.
pub fn run(files: &[std::path::PathBuf], skip_missing_paths: bool) -> anyhow::Result<()> {
    let env = env_overrides();
    let mut failed = 0;
    for file in files {
        match check(file, &env, skip_missing_paths) {
            Ok(summary) => println!("ok {}: {summary}", file.display()),
            Err(reason) => {
                eprintln!("error: {reason}");
                failed += 1;
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(bad_input(anyhow::anyhow!("{n} of {} recipe(s) failed the check", files.len()))),
    }
}

/// A one-line summary of a good recipe, or the reason (naming the file and key) it is not.
fn check(file: &Path, env: &[(String, String)], skip_missing_paths: bool) -> Result<String, String> {
    let recipe = Recipe::load_with_env(file, env, &[], Fetch::CacheOnly).map_err(|e| e.to_string())?;
    let fail = |reason: String| format!("{}: {reason}", file.display());
    let present = |key: &str, path: &Path| -> Result<bool, String> {
        if path.exists() {
            return Ok(true);
        }
        let reason = format!("'{key}': {} does not exist", path.display());
        match skip_missing_paths {
            true => {
                eprintln!("warning: {}: {reason}; its checks are skipped", file.display());
                Ok(false)
            }
            false => Err(fail(reason)),
        }
    };
    let template_name = template(&recipe).map(|_| recipe.data.template.clone()).map_err(|e| fail(e.to_string()))?;
    let mut summary = Vec::new();

    if let Some(dir) = &recipe.adapter.init_from
        && present("adapter.init_from", dir)?
    {
        AdapterFolder::read(dir).map_err(|e| fail(format!("'adapter.init_from': {e}")))?;
        summary.push(format!("starts from the adapter in {}", dir.display()));
    }
    let method = recipe.adapter.method.config();
    if recipe.adapter.init_from.is_none() {
        summary.push(method.to_string());
    }
    if present("model.path", &recipe.model.path)? {
        let config = ModelConfig::from_dir(&recipe.model.path).map_err(|e| fail(e.to_string()))?;
        if GgufFile::is_gguf(&recipe.model.path) {
            GgufFile::open(&recipe.model.path).and_then(|file| file.checked_tensors(&config).map(drop)).map_err(|e| fail(e.to_string()))?;
        } else {
            let checkpoint = Checkpoint::open_dir(&recipe.model.path).map_err(|e| fail(e.to_string()))?;
            check_checkpoint(&config, &checkpoint).map_err(|e| fail(e.to_string()))?;
        }
        let tokenizer = ember_models::load_tokenizer(&recipe.model.path).map_err(|e| fail(e.to_string()))?;
        recipe.model.vocab_for(tokenizer.vocab_size(), config.vocab_size).map_err(|e| fail(format!("'model.resize_embeddings': {e}")))?;
        if recipe.adapter.init_from.is_none() {
            method.check(&config).map_err(|e| fail(format!("[adapter]: {e}")))?;
            let trainable = method.count_trainable(&config);
            let all = config.num_params() + trainable;
            summary.push(format!("{} trainable of {} parameters ({:.4}%)", group_digits(trainable), group_digits(all), 100.0 * trainable as f64 / all as f64));
        }
        ember_trainer::run_export::check(&recipe).map_err(|e| fail(e.to_string()))?;
        let name = recipe.model.path.file_name().map_or_else(|| recipe.model.path.display().to_string(), |n| n.to_string_lossy().into_owned());
        summary.push(format!("model {name} ({}, {} layers)", config.architecture.name(), config.num_layers));
    }
    let mut data_present = true;
    for (key, paths) in [("data.path", &recipe.data.paths), ("data.eval_path", &recipe.data.eval_paths)] {
        for path in paths {
            data_present &= present(key, path)?;
        }
    }
    if data_present {
        let [train, eval] = ember_trainer::train::record_counts(&recipe).map_err(|e| fail(e.to_string()))?;
        summary.push(format!("{} records ({} held out for eval)", group_digits(train + eval), eval));
    }
    summary.push(format!("template {template_name}"));
    if recipe.export.any() {
        let mut exports: Vec<String> = recipe.export.gguf.iter().map(|ty| format!("gguf {ty}")).collect();
        exports.extend(recipe.export.merged.iter().map(|dtype| format!("merged {dtype}")));
        summary.push(format!("exports {}", exports.join(", ")));
    }
    Ok(summary.join("; "))
}
