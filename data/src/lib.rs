//! Data side of ember: tokenizers (HF `tokenizer.json`) and their special-token ids.

pub mod tokenizer;

pub use tokenizer::{Tokenizer, TokenizerError};
