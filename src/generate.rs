//! `ember generate`: answer one instruction with a base model and optionally an adapter.

use std::cell::RefCell;
use std::path::Path;

use burn::tensor::{DType, Int, Tensor, TensorData};
use ember_data::{Format, Record, Sample};
use ember_models::generate::{GenerationOptions, generate};
use ember_models::{BaseModel, KvCache, LoadDtype};

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
    /// Also write the prompt's ids, the answer's ids and the logits at the prompt's last
    /// position here (JSON), to compare with another runtime.
    pub logits_out: Option<&'a Path>,
}

/// Where generation stops, as transformers' `generate` and the chat formats stop: the model's
/// end-of-sequence ids (`config.json`, and `generation_config.json` where the base folder has
/// one), the tokenizer's, and the tokens that end the assistant's turn in a chat template
/// (ChatGLM3's config names only `</s>`; its chat stops at `<|user|>` and `<|observation|>`).
pub fn stop_ids(base_dir: &Path, base: &BaseModel, tokenizer: &ember_data::Tokenizer, format: Option<&Format>) -> anyhow::Result<Vec<u32>> {
    let mut ids: Vec<u32> = base.config.eos_token_ids.iter().copied().chain(tokenizer.eos_id).collect();
    ids.extend(ember_models::ModelConfig::generation_eos_token_ids(base_dir)?);
    if let Some(Format::Chat(template)) = format {
        ids.extend(template.turn_ends().iter().filter_map(|token| tokenizer.token_to_id(token)));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The completion text of `request` (special tokens removed).
pub fn complete(request: &Request) -> anyhow::Result<String> {
    let device = crate::device(request.device)?;
    let tokenizer = ember_models::load_tokenizer(request.base)?;
    let format = match request.template {
        "none" => None,
        name => Some(crate::format(name, request.base, request.adapter)?),
    };
    let prompt = match &format {
        None => tokenizer.encode(request.prompt, true)?,
        Some(format) => {
            let sample = Sample::Instruction(Record { instruction: request.prompt.into(), input: request.input.into(), output: String::new() });
            format.prompt_ids(&tokenizer, &sample).map_err(|e| bad_input(anyhow::anyhow!(e)))?
        }
    };
    let base = BaseModel::load(request.base, LoadDtype::F32, &device)?;
    let mut options = request.options.clone();
    options.stop_ids.extend(stop_ids(request.base, &base, &tokenizer, format.as_ref())?);
    let run = |forward: &dyn Fn(Tensor<2, Int>, &mut KvCache) -> Tensor<3>| -> anyhow::Result<Vec<u32>> {
        // The prompt's logits are generation's first step: kept from it, not run again.
        let prompt_logits = RefCell::new(None);
        let answer = generate(
            |ids, cache: &mut KvCache| {
                let logits = forward(ids, cache);
                if request.logits_out.is_some() && prompt_logits.borrow().is_none() {
                    *prompt_logits.borrow_mut() = Some(logits.clone());
                }
                logits
            },
            &prompt,
            &options,
            &device,
        );
        if let Some(path) = request.logits_out {
            let last = prompt_logits.into_inner().unwrap_or_else(|| {
                // No new token asked for: the prompt did not run.
                let ids = Tensor::<2, Int>::from_data(TensorData::new(prompt.iter().map(|&t| t as i64).collect(), [1, prompt.len()]), &device);
                forward(ids, &mut KvCache::default())
            });
            let last = last.cast(DType::F32);
            let logits: Vec<f32> = last.into_data().try_into_vec::<f32>().expect("f32 logits");
            let json = serde_json::json!({"prompt_ids": prompt, "answer_ids": answer, "last_logits": logits});
            ember_models::write_file_atomically(path, json.to_string().as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(answer)
    };
    let ids = match request.adapter {
        // LoRA is folded in for generation: no low-rank matmuls per token.
        Some(dir) => {
            let model = ember_adapters::Method::load(dir, base, &device)?.0.into_inference();
            run(&|ids, cache| model.next_token_logits(ids, cache))?
        }
        None => run(&|ids, cache| base.next_token_logits(ids, cache))?,
    };
    Ok(tokenizer.decode(&ids, true)?)
}
