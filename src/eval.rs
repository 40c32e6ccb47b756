//! `ember eval`: how well the base, and the base with an adapter, predict the answers of an
//! Alpaca file (mean loss over answer tokens, and its exponential, the perplexity).

use std::path::Path;

use ember_adapters::AdaptedModel;
use ember_data::sft::{SftOptions, build_examples};
use ember_data::{Template, Tokenizer, alpaca};
use ember_models::{BaseModel, LoadDtype};
use serde_json::json;

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
}

pub fn run(request: &Request) -> anyhow::Result<()> {
    let device = ember_models::device::parse_device(request.device).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    let tokenizer = Tokenizer::from_dir(request.base).map_err(bad_input)?;
    let template = Template::builtin(request.template).ok_or_else(|| bad_input(anyhow::anyhow!("unknown template '{}'", request.template)))?;
    let mut records = alpaca::load(request.data).map_err(bad_input)?;
    if request.limit > 0 {
        records.truncate(request.limit);
    }
    let options = SftOptions { cutoff_len: request.cutoff_len, train_on_inputs: false };
    let (examples, stats) = build_examples(&tokenizer, &template, &records, &options).map_err(bad_input)?;
    if examples.is_empty() {
        return Err(bad_input(anyhow::anyhow!("{}: no record has an answer token within {} tokens", request.data.display(), request.cutoff_len)));
    }
    let pad_id = tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0);
    let tokens: usize = examples.iter().map(|e| e.supervised_tokens()).sum();
    let score = |model: &AdaptedModel| {
        let loss = ember_trainer::train::evaluate(model, &examples, request.batch.max(1), pad_id, &device).unwrap_or(f64::NAN);
        json!({"loss": loss, "perplexity": loss.exp()})
    };
    let base = BaseModel::load(request.base, LoadDtype::F32, &device).map_err(bad_input)?;
    let mut result = json!({
        "data": request.data, "records": records.len(), "examples": examples.len(),
        "skipped_without_answer": stats.empty.len(), "truncated": stats.truncated, "answer_tokens": tokens,
    });
    let base_model = AdaptedModel::base_only(base);
    result["base"] = score(&base_model);
    if let Some(dir) = request.adapter {
        // The same weights again, unwrapped: never two copies of the base.
        let base = ember_adapters::lora::merge(base_model.model);
        let (model, method) = AdaptedModel::load(dir, base, &device).map_err(bad_input)?;
        result["adapter"] = score(&model);
        result["method"] = json!(method.name());
    }
    println!("{result}");
    Ok(())
}
