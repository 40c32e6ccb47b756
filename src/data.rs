//! `ember data preview`: a recipe's records as the model sees them, so users can check their
//! template and loss mask before training; `ember data stats`: how long its examples are.

use std::path::Path;

use ember_data::sft::{IGNORE_INDEX, build_examples};
use ember_data::text::Corpus;
use ember_data::{Example, Format, SftOptions, Tokenizer};
use ember_models::hub::Fetch;
use ember_trainer::recipe::env_overrides;
use ember_trainer::train::{held_out_records, sft_options, split_records, template};
use ember_trainer::{Recipe, TrainError};
use serde_json::json;

pub fn preview(recipe_path: &Path, overrides: &[String], limit: usize, as_json: bool) -> anyhow::Result<()> {
    let recipe = Recipe::load_with_env(recipe_path, &env_overrides(), overrides, Fetch::Download)?;
    let tokenizer = ember_models::load_tokenizer(&recipe.model.path).map_err(TrainError::from)?;
    let format = template(&recipe)?;
    let options = sft_options(&recipe);
    // A plain-text corpus is read as a stream: only the records shown are held.
    // The records a run reads, in file order (`data.max_samples` and `num_samples` keep some).
    let (dataset, shown, held_out) = match format {
        Format::Text => {
            let corpus = Corpus::count(&recipe.data.all_paths())?.mapped(recipe.data.mappings());
            let dataset = corpus.head(limit)?;
            let shown = (0..dataset.samples.len()).collect();
            (dataset, shown, held_out_records(&corpus.counts(), &recipe)?)
        }
        _ => {
            let (dataset, train, eval) = split_records(&recipe)?;
            let mut held_out = vec![false; dataset.samples.len()];
            eval.iter().for_each(|&i| held_out[i] = true);
            let mut shown: Vec<usize> = train.into_iter().chain(eval).collect();
            shown.sort_unstable();
            shown.dedup();
            (dataset, shown, held_out)
        }
    };
    if matches!(format, ember_data::Format::Text) && !as_json {
        println!("plain text: training joins the records (text + EOS) and cuts them into blocks of {} tokens; each record is shown alone\n", options.cutoff_len);
    }
    for index in shown.into_iter().take(limit) {
        let sample = &dataset.samples[index];
        let record_error = |e: String| dataset.record_error(index, e);
        let (example, truncated) = format.example(&tokenizer, sample, &options).map_err(record_error)?;
        let text = format.text(&tokenizer, sample, &options).map_err(record_error)?;
        let held_out = held_out[index];
        if as_json {
            let line = json!({"index": index, "held_out": held_out, "truncated": truncated, "text": text,
                "input_ids": example.input_ids, "labels": example.labels});
            println!("{line}");
            continue;
        }
        let with_loss = example.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        println!(
            "record {index} ({}{}, {} tokens, {with_loss} with loss)",
            if held_out { "held out" } else { "train" },
            if truncated { format!(", truncated to {}", options.cutoff_len) } else { String::new() },
            example.input_ids.len()
        );
        println!("text:\n{text}");
        println!("tokens (loss in ⟦ ⟧):\n{}", marked_tokens(&tokenizer, &example.input_ids, &example.labels)?);
        println!("ids: {:?}\n", example.input_ids);
    }
    Ok(())
}

/// `ember data stats`: the recipe's data files and split, and its examples' lengths before
/// and after the cutoff.
pub fn stats(recipe_path: &Path, overrides: &[String], as_json: bool) -> anyhow::Result<()> {
    let recipe = Recipe::load_with_env(recipe_path, &env_overrides(), overrides, Fetch::Download)?;
    let tokenizer = ember_models::load_tokenizer(&recipe.model.path).map_err(TrainError::from)?;
    let format = template(&recipe)?;
    let cutoff = recipe.data.cutoff_len;
    if matches!(format, Format::Text) {
        return print_stats(&text_stats(&recipe, &tokenizer)?, as_json);
    }
    let (dataset, train, eval) = split_records(&recipe)?;
    let files: Vec<_> = dataset.files().map(|(path, records)| json!({"path": path, "records": records})).collect();
    let mut out = json!({"files": files, "template": recipe.data.template, "cutoff_len": cutoff});
    for (name, indices) in [("train", &train), ("eval", &eval)] {
        // Untruncated (plain text: the blocks themselves), to see what the cutoff cuts; training's
        // examples are these cut at the cutoff, those left with a supervised token.
        let whole = SftOptions { cutoff_len: if matches!(format, Format::Text) { cutoff } else { usize::MAX }, ..sft_options(&recipe) };
        let (examples, stats) = build_examples(&tokenizer, &format, &dataset, indices, &whole)?;
        let cut: Vec<Example> = examples
            .iter()
            .map(|e| Example { input_ids: e.input_ids.iter().take(cutoff).copied().collect(), labels: e.labels.iter().take(cutoff).copied().collect() })
            .filter(|e| e.supervised_tokens() > 0)
            .collect();
        let without_answer = stats.empty.len() + examples.len() - cut.len();
        let mut lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
        lengths.sort_unstable();
        let at = |q: f64| lengths.get(((lengths.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        out[name] = json!({
            "records": indices.len(), "examples": cut.len(), "without_answer": without_answer,
            "truncated": lengths.iter().filter(|&&l| l > cutoff).count(),
            "length": {"min": at(0.0), "median": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)},
            "tokens": cut.iter().map(|e| e.input_ids.len()).sum::<usize>(),
            "supervised_tokens": cut.iter().map(Example::supervised_tokens).sum::<usize>(),
        });
    }
    print_stats(&out, as_json)
}

/// [`stats`] of a plain-text corpus, streamed as training reads it (and from
/// `data.tokenized_path`, which this fills): its blocks, none of them truncated.
fn text_stats(recipe: &Recipe, tokenizer: &Tokenizer) -> anyhow::Result<serde_json::Value> {
    let data = ember_trainer::train::text_data(recipe, tokenizer, &mut |event| {
        if let ember_trainer::run::Event::Info(line) = event {
            eprintln!("{line}");
        }
    })?;
    let files: Vec<_> = data.files.iter().map(|(path, records)| json!({"path": path, "records": records})).collect();
    let mut out = json!({"files": files, "template": recipe.data.template, "cutoff_len": recipe.data.cutoff_len});
    for (name, blocks, records) in [("train", &data.train, data.records[0]), ("eval", &data.eval, data.records[1])] {
        // Every block is full but the last.
        let lengths: Vec<usize> = (0..blocks.len()).map(|i| blocks.input_len(i)).collect();
        let (min, max) = (lengths.iter().min().copied().unwrap_or(0), lengths.iter().max().copied().unwrap_or(0));
        let tokens: usize = lengths.iter().sum();
        out[name] = json!({
            "records": records, "examples": blocks.len(), "without_answer": 0, "truncated": 0,
            "length": {"min": min, "median": max, "p90": max, "p99": max, "max": max},
            "tokens": tokens, "supervised_tokens": tokens - lengths.len(),
        });
    }
    Ok(out)
}

fn print_stats(out: &serde_json::Value, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{out}");
        return Ok(());
    }
    let files: Vec<String> = out["files"].as_array().into_iter().flatten().map(|f| format!("{} ({} records)", f["path"].as_str().unwrap_or_default(), f["records"])).collect();
    println!("data: {}; template {}; cutoff_len {}", files.join(" + "), out["template"].as_str().unwrap_or_default(), out["cutoff_len"]);
    for name in ["train", "eval"] {
        let s = &out[name];
        let l = &s["length"];
        println!(
            "{name}: {} examples from {} records ({} without an answer token within the cutoff); length before the cutoff: min {}, median {}, p90 {}, p99 {}, max {}; {} truncated; {} tokens, {} with loss",
            s["examples"], s["records"], s["without_answer"], l["min"], l["median"], l["p90"], l["p99"], l["max"], s["truncated"], s["tokens"], s["supervised_tokens"]
        );
    }
    Ok(())
}

/// The ids decoded in runs of equal masking, the runs that carry loss in ⟦ ⟧.
fn marked_tokens(tokenizer: &Tokenizer, ids: &[u32], labels: &[i64]) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let loss = labels[start] != IGNORE_INDEX;
        let end = (start..ids.len()).find(|&i| (labels[i] != IGNORE_INDEX) != loss).unwrap_or(ids.len());
        let text = tokenizer.decode(&ids[start..end], false)?;
        if loss {
            out.push_str(&format!("⟦{text}⟧"));
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}
