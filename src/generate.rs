//! `ember generate`: answer one instruction with a base model and optionally an adapter.

use std::path::Path;

use burn::tensor::Device;
use ember_data::{Format, Record, Sample, Tokenizer};
use ember_models::generate::{GenerationOptions, generate};
use ember_models::{BaseModel, LoadDtype};

use crate::bad_input;

pub struct Request<'a> {
    pub base: &'a Path,
    pub adapter: Option<&'a Path>,
    pub prompt: &'a str,
    pub input: &'a str,
    /// A prompt or chat template name, or `none` for the raw prompt.
    pub template: &'a str,
    pub options: GenerationOptions,
    pub device: &'a str,
}

/// The completion text of `request` (special tokens removed).
pub fn complete(request: &Request) -> anyhow::Result<String> {
    let device: Device = ember_models::device::parse_device(request.device).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    let tokenizer = Tokenizer::from_dir(request.base)?;
    let prompt = match request.template {
        "none" => tokenizer.encode(request.prompt, true)?,
        name => {
            let format = Format::named(name, request.base)
                .map_err(|e| bad_input(anyhow::anyhow!(e)))?
                .ok_or_else(|| bad_input(anyhow::anyhow!("unknown template '{name}'")))?;
            let sample = Sample::Instruction(Record { instruction: request.prompt.into(), input: request.input.into(), output: String::new() });
            format.prompt_ids(&tokenizer, &sample).map_err(|e| bad_input(anyhow::anyhow!(e)))?
        }
    };
    let base = BaseModel::load(request.base, LoadDtype::F32, &device)?;
    let mut options = request.options.clone();
    options.stop_ids.extend(base.config.eos_token_ids.iter().copied().chain(tokenizer.eos_id));
    let ids = match request.adapter {
        // LoRA is folded in for generation: no low-rank matmuls per token.
        Some(dir) => {
            let model = ember_adapters::Method::load(dir, base, &device)?.0.into_inference();
            generate(|ids, cache| model.forward_cached(ids, cache), &prompt, &options, &device)
        }
        None => generate(|ids, cache| base.forward_cached(ids, cache), &prompt, &options, &device),
    };
    Ok(tokenizer.decode(&ids, true)?)
}
