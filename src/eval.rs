//! `ember eval`: how well the base, and the base with an adapter, predict the answers of an
//! Alpaca file, or a plain-text corpus (mean loss over answer tokens, or over every token of the
//! text, and its exponential, the perplexity); with `--generate N`, also the greedy answers of
//! both to the first N instructions, side by side.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use ember_adapters::AdaptedModel;
use ember_data::sft::{SftOptions, TEXT_TEMPLATE, build_examples};
use ember_data::text::{Corpus, TextBlocks, TokenBuffer};
use ember_data::{Dataset, Examples, Format, Role, Sample, Tokenizer};
use ember_models::generate::{GenerationOptions, generate};
use ember_models::{BaseModel, LoadDtype};
use serde_json::{Value, json};

use crate::bad_input;

pub struct Request<'a> {
    pub base: &'a Path,
    pub adapter: Option<&'a Path>,
    pub data: &'a Path,
    /// How the records' keys are renamed (`--columns`, `--tags`).
    pub mapping: &'a ember_data::Mapping,
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
    format: &'a Format,
    options: GenerationOptions,
    device: &'a Device,
}

impl Answerer<'_> {
    /// The model's greedy answer to each record's last question (special tokens removed).
    fn answer(&self, model: &AdaptedModel, dataset: &Dataset, count: usize) -> anyhow::Result<Vec<String>> {
        dataset.samples[..count]
            .iter()
            .enumerate()
            .map(|(index, sample)| {
                let ids = self.format.prompt_ids(self.tokenizer, sample).map_err(|e| bad_input(dataset.record_error(index, e)))?;
                let answer = generate(|ids, cache| model.next_token_logits(ids, cache), &ids, &self.options, self.device);
                Ok(self.tokenizer.decode(&answer, true)?)
            })
            .collect()
    }
}

/// What is scored: the examples, and what the result says of them.
struct Scored {
    examples: Examples,
    /// Records read; those without an answer token left; those cut at the cutoff.
    records: usize,
    skipped: usize,
    truncated: usize,
    /// Tokens the loss is taken over.
    tokens: usize,
}

/// A dataset's records as training renders them, the answers supervised.
fn record_examples(request: &Request, tokenizer: &Tokenizer, format: &Format, dataset: &Dataset) -> anyhow::Result<Scored> {
    let records = if request.limit > 0 { request.limit.min(dataset.samples.len()) } else { dataset.samples.len() };
    let indices: Vec<usize> = (0..records).collect();
    let options = SftOptions { cutoff_len: request.cutoff_len, train_on_inputs: false, last_turn_only: false };
    let (examples, stats) = build_examples(tokenizer, format, dataset, &indices, &options)?;
    let tokens = examples.iter().map(|e| e.supervised_tokens()).sum();
    Ok(Scored { examples: Examples::Records(examples), records, skipped: stats.empty.len(), truncated: stats.truncated, tokens })
}

/// A plain-text corpus (`--template text`) streamed as training streams it: cut into blocks of
/// `cutoff_len`, every token scored; only the first `limit` records are read and tokenized.
fn text_examples(request: &Request, tokenizer: &Tokenizer, files: &[PathBuf]) -> anyhow::Result<Scored> {
    let corpus = Corpus::count(files)?.mapped(request.mapping.clone());
    let corpus = if request.limit > 0 { corpus.first(request.limit) } else { corpus };
    let records = corpus.records();
    let mut buffers = [TokenBuffer::default(), TokenBuffer::default()];
    corpus.tokenize(tokenizer, &vec![false; records], &mut buffers)?;
    let [ids, _] = buffers;
    let blocks = TextBlocks::new(ids.into(), request.cutoff_len, tokenizer.added_bos());
    // Position t predicts token t + 1: a block scores all its tokens but the first.
    let tokens = (0..blocks.len()).map(|i| blocks.input_len(i) - 1).sum();
    Ok(Scored { examples: Examples::Blocks(blocks), records, skipped: 0, truncated: 0, tokens })
}

pub fn run(request: &Request) -> anyhow::Result<()> {
    let device = crate::device(request.device)?;
    let tokenizer = ember_models::load_tokenizer(request.base)?;
    let format = crate::format(request.template, request.base, request.adapter)?;
    // A file, a folder, a file-name pattern, a hub dataset's file, pattern or train split.
    let files = ember_models::hub::data_files(request.data, ember_models::hub::Fetch::Download)?;
    let files = ember_data::dataset::expand_paths(&files).map_err(|e| bad_input(anyhow::anyhow!("--data: {e}")))?;
    if matches!(format, Format::Text) && request.generate > 0 {
        return Err(bad_input(anyhow::anyhow!("--generate answers instructions: plain text (--template {TEXT_TEMPLATE}) has no question to answer")));
    }
    // Plain text is streamed, never held as records; there is nothing to answer.
    let dataset = match format {
        Format::Text => None,
        _ => Some(Dataset::load_all(&files, &request.mapping.clone().into())?),
    };
    let scored = match &dataset {
        None => text_examples(request, &tokenizer, &files)?,
        Some(dataset) => record_examples(request, &tokenizer, &format, dataset)?,
    };
    let Scored { examples, records, skipped, truncated, tokens } = scored;
    if examples.is_empty() {
        return Err(bad_input(anyhow::anyhow!("{}: no record has an answer token within {} tokens", request.data.display(), request.cutoff_len)));
    }
    let samples = dataset.as_ref().map_or(&[][..], |d| &d.samples[..request.generate.min(d.samples.len())]);
    let pad_id = tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0);
    let score = |model: &AdaptedModel| -> Result<serde_json::Value, ember_data::DatasetError> {
        let loss = ember_trainer::train::evaluate(model, &examples, request.batch.max(1), pad_id, &device)?.unwrap_or(f64::NAN);
        Ok(json!({"loss": loss, "perplexity": loss.exp()}))
    };
    let base = BaseModel::load(request.base, LoadDtype::F32, &device)?;
    let stop_ids = crate::generate::stop_ids(request.base, &base, &tokenizer, Some(&format))?;
    let answerer = Answerer {
        tokenizer: &tokenizer,
        format: &format,
        options: GenerationOptions::greedy(request.max_new_tokens, stop_ids),
        device: &device,
    };
    let answers = |model: &AdaptedModel| dataset.as_ref().map_or(Ok(Vec::new()), |d| answerer.answer(model, d, samples.len()));
    let mut result = json!({
        "data": request.data, "records": records, "examples": examples.len(),
        "skipped_without_answer": skipped, "truncated": truncated, "answer_tokens": tokens,
    });
    let base_model = AdaptedModel::base_only(base);
    result["base"] = score(&base_model)?;
    let base_answers = answers(&base_model)?;
    let mut adapter_answers = Vec::new();
    if let Some(dir) = request.adapter {
        let (model, method) = with_adapter(base_model, dir, &device)?;
        result["adapter"] = score(&model)?;
        result["method"] = json!(method.config().name());
        adapter_answers = answers(&model.into_inference())?;
    }
    if let Some(path) = request.answers {
        write_answers(path, samples, &base_answers, &adapter_answers)?;
        result["answers"] = json!(path);
        result["answered"] = json!(samples.len());
    }
    println!("{result}");
    Ok(())
}

/// `dir`'s adapter on the base that `base` scored: the same weights again, unwrapped, never two
/// copies of the base.
pub fn with_adapter(base: AdaptedModel, dir: &Path, device: &Device) -> anyhow::Result<(AdaptedModel, ember_adapters::Method)> {
    Ok(ember_adapters::Method::load(dir, base.model.map_projections(|_, p| p.merged()), device)?)
}

/// One JSON object per record, written to a temporary file and renamed: a reader never sees a
/// half-written file.
/// A conversation's `instruction` is its last user message and its `reference` the answer to it.
fn write_answers(path: &Path, samples: &[Sample], base: &[String], adapter: &[String]) -> anyhow::Result<()> {
    let lines: String = samples
        .iter()
        .enumerate()
        .map(|(index, sample)| {
            let (instruction, input, reference) = match sample.instruction() {
                Some(r) => (r.instruction, r.input, r.output),
                None => {
                    let messages = sample.conversation().map(|c| c.messages).unwrap_or_default();
                    let last = |role: Role| messages.iter().rev().find(|m| m.role == role).map(|m| m.content.clone()).unwrap_or_default();
                    (last(Role::User), String::new(), last(Role::Assistant))
                }
            };
            let line = json!({
                "index": index, "instruction": instruction, "input": input, "reference": reference,
                "base": base[index], "adapter": adapter.get(index).map_or(Value::Null, |a| json!(a)),
            });
            format!("{line}\n")
        })
        .collect();
    ember_models::write_file_atomically(path, lines.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
