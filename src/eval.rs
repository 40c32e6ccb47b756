//! `ember eval`: how well the base, and the base with an adapter, predict the answers of an
//! Alpaca file (mean loss over answer tokens, and its exponential, the perplexity); with
//! `--generate N`, also the greedy answers of both to the first N instructions, side by side.

use std::path::Path;

use burn::tensor::Device;
use ember_adapters::AdaptedModel;
use ember_data::sft::{SftOptions, build_examples};
use ember_data::{Record, Template, Tokenizer, alpaca};
use ember_models::generate::{GenerationOptions, generate};
use ember_models::{BaseModel, LoadDtype};
use serde_json::{Value, json};

use crate::bad_input;

pub struct Request<'a> {
    pub base: &'a Path,
    pub adapter: Option<&'a Path>,
    pub data: &'a Path,
    pub template: &'a str,
    pub cutoff_len: usize,
    pub batch: usize,
    pub limit: usize,
    pub device: &'a str,
    /// Greedy answers to this many records (0: none), written to `answers`.
    pub generate: usize,
    pub answers: Option<&'a Path>,
    pub max_new_tokens: usize,
}

/// What answering needs besides a model.
struct Answerer<'a> {
    tokenizer: &'a Tokenizer,
    template: &'a Template,
    options: GenerationOptions,
    device: &'a Device,
}

impl Answerer<'_> {
    /// The model's greedy answer to each record (special tokens removed).
    fn answer(&self, model: &AdaptedModel, records: &[Record]) -> anyhow::Result<Vec<String>> {
        records
            .iter()
            .map(|record| {
                let prompt = self.template.render(&Record { output: String::new(), ..record.clone() });
                let ids = self.tokenizer.encode(&prompt, true)?;
                let answer = generate(|ids, cache| model.forward_cached(ids, cache), &ids, &self.options, self.device);
                Ok(self.tokenizer.decode(&answer, true)?)
            })
            .collect()
    }
}

pub fn run(request: &Request) -> anyhow::Result<()> {
    let device = ember_models::device::parse_device(request.device).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    let tokenizer = Tokenizer::from_dir(request.base)?;
    let template = Template::builtin(request.template).ok_or_else(|| bad_input(anyhow::anyhow!("unknown template '{}'", request.template)))?;
    let mut records = alpaca::load(request.data)?;
    let to_answer: Vec<Record> = records.iter().take(request.generate).cloned().collect();
    if request.limit > 0 {
        records.truncate(request.limit);
    }
    let options = SftOptions { cutoff_len: request.cutoff_len, train_on_inputs: false };
    let (examples, stats) = build_examples(&tokenizer, &template, &records, &options)?;
    if examples.is_empty() {
        return Err(bad_input(anyhow::anyhow!("{}: no record has an answer token within {} tokens", request.data.display(), request.cutoff_len)));
    }
    let pad_id = tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0);
    let tokens: usize = examples.iter().map(|e| e.supervised_tokens()).sum();
    let score = |model: &AdaptedModel| {
        let loss = ember_trainer::train::evaluate(model, &examples, request.batch.max(1), pad_id, &device).unwrap_or(f64::NAN);
        json!({"loss": loss, "perplexity": loss.exp()})
    };
    let base = BaseModel::load(request.base, LoadDtype::F32, &device)?;
    let stop_ids = base.config.eos_token_ids.iter().copied().chain(tokenizer.eos_id).collect();
    let answerer = Answerer {
        tokenizer: &tokenizer,
        template: &template,
        options: GenerationOptions { max_new_tokens: request.max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, stop_ids },
        device: &device,
    };
    let mut result = json!({
        "data": request.data, "records": records.len(), "examples": examples.len(),
        "skipped_without_answer": stats.empty.len(), "truncated": stats.truncated, "answer_tokens": tokens,
    });
    let base_model = AdaptedModel::base_only(base);
    result["base"] = score(&base_model);
    let base_answers = answerer.answer(&base_model, &to_answer)?;
    let mut adapter_answers = Vec::new();
    if let Some(dir) = request.adapter {
        // The same weights again, unwrapped: never two copies of the base.
        let base = base_model.model.map_projections(|_, p| p.merged());
        let (model, method) = ember_adapters::Method::load(dir, base, &device)?;
        result["adapter"] = score(&model);
        result["method"] = json!(method.config().name());
        adapter_answers = answerer.answer(&model.into_inference(), &to_answer)?;
    }
    if let Some(path) = request.answers {
        write_answers(path, &to_answer, &base_answers, &adapter_answers)?;
        result["answers"] = json!(path);
        result["answered"] = json!(to_answer.len());
    }
    println!("{result}");
    Ok(())
}

/// One JSON object per record, written to a temporary file and renamed: a reader never sees a
/// half-written file.
fn write_answers(path: &Path, records: &[Record], base: &[String], adapter: &[String]) -> anyhow::Result<()> {
    let lines: String = records
        .iter()
        .enumerate()
        .map(|(index, record)| {
            let line = json!({
                "index": index, "instruction": record.instruction, "input": record.input, "reference": record.output,
                "base": base[index], "adapter": adapter.get(index).map_or(Value::Null, |a| json!(a)),
            });
            format!("{line}\n")
        })
        .collect();
    ember_models::write_file_atomically(path, lines.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
