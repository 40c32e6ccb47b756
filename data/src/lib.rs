//! Data side of ember: records (Alpaca, ShareGPT, OpenAI messages), prompt and chat templates,
//! tokenization (HF `tokenizer.json`, or `tokenizer.model` converted), supervised examples with
//! prompt masking, and padded batches.

pub mod chat;
pub mod columns;
pub mod dataset;
pub mod dataset_info;
pub mod parquet;
mod python;
pub mod sentencepiece;
pub mod sft;
pub mod template;
pub mod text;
pub mod tiktoken;
pub mod tokenizer;

pub use chat::{ChatTemplate, Conversation, Message, Role, ToolCall};
pub use columns::{Mapping, Mappings};
pub use dataset::{read_tools, Dataset, DatasetError, Record, Sample};
pub use sft::{Batch, Example, Examples, Format, SftOptions, SftStats};
pub use template::Template;
pub use tokenizer::{Tokenizer, TokenizerError};
