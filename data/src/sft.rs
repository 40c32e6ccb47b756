//! Supervised fine-tuning examples: tokenized prompt + answer with the prompt masked out of the
//! loss. Single instructions follow stanford_alpaca's `preprocess`; conversations follow their
//! chat template (`crate::chat`).

use std::path::Path;

use rayon::prelude::*;

use crate::dataset::Record;
use crate::chat::{ChatTemplate, LossPolicy};
use crate::dataset::{Dataset, DatasetError, Sample};
use crate::template::{PROMPT_TEMPLATES, Template};
use crate::text::{TextBlocks, TokenBuffer};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Label of tokens that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, Clone)]
pub struct SftOptions {
    /// Examples are truncated to this many tokens.
    pub cutoff_len: usize,
    /// Also train on the prompt tokens (alpaca-lora's `train_on_inputs`).
    pub train_on_inputs: bool,
    /// In conversations, only the last assistant turn carries loss (LLaMA-Factory's `mask_history`).
    pub last_turn_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens that contribute to the loss: position t predicts labels[t + 1].
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A run's examples: one a record, or a plain-text corpus's blocks, cut when a batch asks.
pub enum Examples {
    Records(Vec<Example>),
    Blocks(TextBlocks),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Records(examples) => examples.len(),
            Examples::Blocks(blocks) => blocks.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`; an error only where blocks are read from a file that cannot be read.
    pub fn get(&self, i: usize) -> Result<std::borrow::Cow<'_, Example>, DatasetError> {
        match self {
            Examples::Records(examples) => Ok(std::borrow::Cow::Borrowed(&examples[i])),
            Examples::Blocks(blocks) => blocks.example(i).map(std::borrow::Cow::Owned),
        }
    }

    /// The right-padded batch of the examples at `indices`.
    pub fn collate(&self, indices: impl IntoIterator<Item = usize>, pad_id: u32) -> Result<Batch, DatasetError> {
        let examples = indices.into_iter().map(|i| self.get(i)).collect::<Result<Vec<_>, _>>()?;
        Ok(Batch::collate(&examples.iter().map(|e| e.as_ref()).collect::<Vec<_>>(), pad_id))
    }

    /// Example `i`'s tokens.
    pub fn input_len(&self, i: usize) -> usize {
        match self {
            Examples::Records(examples) => examples[i].input_ids.len(),
            Examples::Blocks(blocks) => blocks.input_len(i),
        }
    }
}

/// What happened to a dataset on its way to examples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SftStats {
    pub records: usize,
    pub truncated: usize,
    /// Indices of records left with no supervised token after truncation (not trained on).
    pub empty: Vec<usize>,
}

/// How records become text: a prompt template for single instructions, a chat template, or
/// plain text (continued pretraining).
#[derive(Debug, Clone)]
pub enum Format {
    Prompt(Template),
    Chat(ChatTemplate),
    /// `{"text": …}` records, every token trained on; [`build_examples`] packs them into blocks.
    Text,
}

/// The name of [`Format::Text`].
pub const TEXT_TEMPLATE: &str = "text";

/// Every template name `Format::named` accepts.
pub fn template_names() -> Vec<&'static str> {
    PROMPT_TEMPLATES.iter().chain(crate::chat::CHAT_TEMPLATES).copied().chain([TEXT_TEMPLATE]).collect()
}

impl Format {
    /// The template called `name` (`auto` reads `model_dir`'s chat template); `Ok(None)` for a
    /// name that is not built in.
    pub fn named(name: &str, model_dir: &Path) -> Result<Option<Self>, String> {
        if name == TEXT_TEMPLATE {
            return Ok(Some(Format::Text));
        }
        if let Some(template) = Template::builtin(name) {
            return Ok(Some(Format::Prompt(template)));
        }
        Ok(ChatTemplate::named(name, model_dir)?.map(Format::Chat))
    }

    /// The example of `sample`, and whether it was truncated; errors say what is wrong with it.
    /// Plain text becomes `text + EOS` (BOS first where the tokenizer adds it), truncated.
    pub fn example(&self, tokenizer: &Tokenizer, sample: &Sample, options: &SftOptions) -> Result<(Example, bool), String> {
        match self {
            Format::Prompt(template) => {
                let record = sample.instruction().ok_or_else(|| single_instruction_only(sample))?;
                build_example(tokenizer, template, &record, options).map_err(|e| e.to_string())
            }
            Format::Chat(template) => {
                let policy = LossPolicy { last_turn_only: options.last_turn_only, train_on_inputs: options.train_on_inputs };
                template.example(tokenizer, &conversation(sample)?, policy, options.cutoff_len)
            }
            Format::Text => {
                let mut input_ids: Vec<u32> = tokenizer.added_bos().into_iter().collect();
                input_ids.extend(text_ids(tokenizer, sample)?);
                let truncated = input_ids.len() > options.cutoff_len;
                input_ids.truncate(options.cutoff_len);
                Ok((all_trained(input_ids), truncated))
            }
        }
    }

    /// The text `sample` becomes, specials written out (what `ember data preview` shows).
    pub fn text(&self, tokenizer: &Tokenizer, sample: &Sample, options: &SftOptions) -> Result<String, String> {
        match self {
            Format::Prompt(template) => {
                let record = sample.instruction().ok_or_else(|| single_instruction_only(sample))?;
                Ok(format!("{}{}{}", template.render(&record), record.output, tokenizer.eos_token().unwrap_or_default()))
            }
            Format::Chat(template) => {
                let policy = LossPolicy { last_turn_only: options.last_turn_only, train_on_inputs: options.train_on_inputs };
                Ok(template.text(tokenizer, &template.render(&conversation(sample)?, policy, false)?))
            }
            Format::Text => Ok(format!("{}{}", plain_text(sample)?, tokenizer.eos_token().unwrap_or_default())),
        }
    }

    /// The ids a model answers: `sample` without its last answer, as the template prompts.
    pub fn prompt_ids(&self, tokenizer: &Tokenizer, sample: &Sample) -> Result<Vec<u32>, String> {
        match self {
            Format::Prompt(template) => {
                let record = sample.instruction().ok_or_else(|| single_instruction_only(sample))?;
                let prompt = template.render(&Record { output: String::new(), ..record });
                tokenizer.encode(&prompt, true).map_err(|e| e.to_string())
            }
            Format::Chat(template) => {
                let mut conversation = conversation(sample)?;
                conversation.messages.pop();
                template.prompt_ids(tokenizer, &conversation)
            }
            Format::Text => Err("plain text has no question to answer".into()),
        }
    }
}

fn single_instruction_only(sample: &Sample) -> String {
    match sample {
        Sample::Text(_) => text_needs_text_template(),
        _ => format!("a conversation needs a chat template ({}); prompt templates render single instructions", crate::chat::CHAT_TEMPLATES.join(", ")),
    }
}

fn text_needs_text_template() -> String {
    format!("a plain-text record ('text') needs data.template = \"{TEXT_TEMPLATE}\" (continued pretraining)")
}

fn conversation(sample: &Sample) -> Result<crate::chat::Conversation, String> {
    sample.conversation().ok_or_else(text_needs_text_template)
}

fn plain_text(sample: &Sample) -> Result<&str, String> {
    match sample {
        Sample::Text(text) => Ok(text),
        _ => Err(format!("data.template = \"{TEXT_TEMPLATE}\" trains on plain-text records ({{\"text\": …}} or .txt lines); this one is an instruction or a conversation")),
    }
}

/// `text + EOS` without other special tokens, as LLaMA-Factory's pretraining stage encodes it.
pub(crate) fn text_ids(tokenizer: &Tokenizer, sample: &Sample) -> Result<Vec<u32>, String> {
    let eos = tokenizer.eos_id.ok_or("the tokenizer has no EOS token")?;
    let mut ids = tokenizer.encode(plain_text(sample)?, false).map_err(|e| e.to_string())?;
    ids.push(eos);
    Ok(ids)
}

/// Continued pretraining's examples from `dataset`'s records at `indices`: their `text + EOS`
/// in file order, tokenized on every core and cut into [`TextBlocks`].
fn text_blocks(tokenizer: &Tokenizer, dataset: &Dataset, indices: &[usize], cutoff_len: usize) -> Result<Vec<Example>, DatasetError> {
    let mut ordered = indices.to_vec();
    ordered.sort_unstable();
    let ids: Vec<Result<Vec<u32>, DatasetError>> =
        ordered.par_iter().map(|&index| text_ids(tokenizer, &dataset.samples[index]).map_err(|e| dataset.record_error(index, e))).collect();
    let mut buffer = TokenBuffer::default();
    for ids in ids {
        buffer.append(&ids?);
    }
    let blocks = TextBlocks::new(buffer.into(), cutoff_len, tokenizer.added_bos());
    (0..blocks.len()).map(|i| blocks.example(i)).collect()
}

/// An example whose every token carries loss.
pub(crate) fn all_trained(input_ids: Vec<u32>) -> Example {
    let labels = input_ids.iter().map(|&id| id as i64).collect();
    Example { input_ids, labels }
}

/// `input_ids = tok(source + output) + [eos]`, `labels = input_ids` with the first
/// `len(tok(source))` positions set to -100 (unless `train_on_inputs`); then truncated to
/// `cutoff_len`. stanford_alpaca appends the EOS token's text, which its tokenizer reads as that
/// one id: the same ids.
pub fn build_example(tokenizer: &Tokenizer, template: &Template, record: &Record, options: &SftOptions) -> Result<(Example, bool), TokenizerError> {
    let eos = tokenizer.eos_id.ok_or_else(|| TokenizerError::Encode("the tokenizer has no EOS token".into()))?;
    let source = template.render(record);
    let full = format!("{source}{}", record.output);
    let source_len = tokenizer.encode(&source, true)?.len();
    let mut input_ids = tokenizer.encode(&full, true)?;
    input_ids.push(eos);
    let mut labels: Vec<i64> = input_ids.iter().map(|&id| id as i64).collect();
    if !options.train_on_inputs {
        labels.iter_mut().take(source_len).for_each(|l| *l = IGNORE_INDEX);
    }
    let truncated = input_ids.len() > options.cutoff_len;
    let mut example = Example { input_ids, labels };
    example.input_ids.truncate(options.cutoff_len);
    example.labels.truncate(options.cutoff_len);
    Ok((example, truncated))
}

/// The examples of `dataset`'s records at `indices`; records with no supervised token left are
/// reported in the stats and left out. Plain text becomes blocks ([`Format::Text`]). An error
/// names the record.
pub fn build_examples(
    tokenizer: &Tokenizer,
    format: &Format,
    dataset: &Dataset,
    indices: &[usize],
    options: &SftOptions,
) -> Result<(Vec<Example>, SftStats), DatasetError> {
    let mut stats = SftStats { records: indices.len(), ..Default::default() };
    if let Format::Text = format {
        return Ok((text_blocks(tokenizer, dataset, indices, options.cutoff_len)?, stats));
    }
    let mut examples = Vec::with_capacity(indices.len());
    for &index in indices {
        let (example, truncated) = format.example(tokenizer, &dataset.samples[index], options).map_err(|e| dataset.record_error(index, e))?;
        stats.truncated += usize::from(truncated);
        if example.supervised_tokens() == 0 {
            stats.empty.push(index);
        } else {
            examples.push(example);
        }
    }
    Ok((examples, stats))
}

/// `rows` of ids right-padded with `pad_id` to the longest: its length, then the ids and the
/// attention mask (0 on padding), each `[rows, seq]` row-major.
pub fn right_pad(rows: &[&[u32]], pad_id: u32) -> (usize, Vec<i64>, Vec<i64>) {
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * seq), Vec::with_capacity(rows.len() * seq));
    for row in rows {
        let pad = seq - row.len();
        ids.extend(row.iter().map(|&i| i as i64).chain(std::iter::repeat_n(pad_id as i64, pad)));
        mask.extend(std::iter::repeat_n(1, row.len()).chain(std::iter::repeat_n(0, pad)));
    }
    (seq, ids, mask)
}

/// A right-padded batch, row-major `[batch, seq]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
}

impl Batch {
    /// Pads to the longest example with `pad_id` (labels -100, mask 0 on padding).
    pub fn collate(examples: &[&Example], pad_id: u32) -> Self {
        let rows: Vec<&[u32]> = examples.iter().map(|e| e.input_ids.as_slice()).collect();
        let (seq, input_ids, attention_mask) = right_pad(&rows, pad_id);
        let labels = examples.iter().flat_map(|e| e.labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, seq - e.labels.len()))).collect();
        Batch { batch: examples.len(), seq, input_ids, attention_mask, labels }
    }

    pub fn supervised_tokens(&self) -> usize {
        (0..self.batch).map(|b| self.labels[b * self.seq + 1..(b + 1) * self.seq].iter().filter(|&&l| l != IGNORE_INDEX).count()).sum()
    }

    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }

    /// The batch with `n` positions in front of every row (prompt tuning's virtual tokens):
    /// placeholder id 0, attention 1, label -100, as PEFT extends its inputs.
    pub fn with_virtual_tokens(&self, n: usize) -> Self {
        if n == 0 {
            return self.clone();
        }
        let extend = |values: &[i64], fill: i64| prepend_to_rows(values, self.seq, n, fill);
        Batch {
            batch: self.batch,
            seq: self.seq + n,
            input_ids: extend(&self.input_ids, 0),
            attention_mask: extend(&self.attention_mask, 1),
            labels: extend(&self.labels, IGNORE_INDEX),
        }
    }

    /// Real tokens of each row: right padding puts them first.
    pub fn lengths(&self) -> Vec<usize> {
        self.attention_mask.chunks(self.seq.max(1)).map(|row| row.iter().take_while(|&&m| m == 1).count()).collect()
    }

    /// Whether every row is its real tokens, then padding (as ember's batches are): only then do
    /// [`Self::lengths`] give each row's tokens.
    pub fn right_padded(&self) -> bool {
        self.attention_mask.chunks(self.seq.max(1)).all(|row| row.iter().skip_while(|&&m| m == 1).all(|&m| m == 0))
    }
}

/// Row-major `[rows, row_len]` values with `n` copies of `fill` in front of every row: how PEFT
/// extends ids, masks and labels for prompt tuning's virtual tokens.
pub fn prepend_to_rows(values: &[i64], row_len: usize, n: usize, fill: i64) -> Vec<i64> {
    values.chunks(row_len.max(1)).flat_map(|row| std::iter::repeat_n(fill, n).chain(row.iter().copied())).collect()
}
