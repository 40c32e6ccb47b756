//! Data side of ember: Alpaca records, prompt templates, tokenization (HF `tokenizer.json`),
//! supervised examples with prompt masking, and padded batches.

pub mod alpaca;
pub mod sft;
pub mod template;
pub mod tokenizer;

pub use alpaca::{DatasetError, Record};
pub use sft::{Batch, Example, SftOptions, SftStats};
pub use template::Template;
pub use tokenizer::{Tokenizer, TokenizerError};
