//! `ember import gguf` rebuilds tokenizer.json from GGUF metadata. For SentencePiece ("llama")
//! vocabularies the merges must be derived from piece scores; this rebuilds a LLaMA-2-layout
//! tokenizer (`tokenizer_reference/llama_sentencepiece`) from its vocabulary the way a GGUF
//! stores it (pieces, scores, token types) and checks it against its reference ids.

mod common;

use std::collections::BTreeMap;

use ember_data::Tokenizer;
use common::fixtures;
use ember_models::gguf::{GgufMetadata, tokenizer_json};
use serde_json::{Value, json};

#[test]
fn sentencepiece_vocabulary_rebuilds_the_llama2_tokenizer() {
    let original: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_reference/llama_sentencepiece/tokenizer.json")).unwrap()).unwrap();
    let vocab = original["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (piece, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = piece.clone();
    }
    // As a LLaMA-2 GGUF stores it: <unk> (type 2), <s>/</s> (3, control), 256 byte pieces (6),
    // then pieces whose scores fall with their id, except runs of "▁", which LLaMA-2 scores
    // -1e9 so they merge last.
    let token_type: Vec<u64> = (0..tokens.len()).map(|i| match i { 0 => 2, 1 | 2 => 3, 3..=258 => 6, _ => 1 }).collect();
    let scores: Vec<f64> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match i {
            0..=258 => 0.0,
            _ if t.chars().count() > 1 && t.chars().all(|c| c == '▁') => -1e9,
            _ => -((i - 259) as f64),
        })
        .collect();
    let values: BTreeMap<String, Value> = [
        ("tokenizer.ggml.model", json!("llama")),
        ("tokenizer.ggml.tokens", json!(tokens)),
        ("tokenizer.ggml.scores", json!(scores)),
        ("tokenizer.ggml.token_type", json!(token_type)),
        ("tokenizer.ggml.bos_token_id", json!(1)),
        ("tokenizer.ggml.eos_token_id", json!(2)),
        ("tokenizer.ggml.unknown_token_id", json!(0)),
        ("tokenizer.ggml.add_bos_token", json!(true)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let rebuilt = tokenizer_json(&GgufMetadata { path: "test.gguf".into(), values }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, rebuilt.to_string()).unwrap();
    let tokenizer = Tokenizer::from_file(&path).unwrap();

    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_reference/llama_sentencepiece/reference.json")).unwrap()).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.encode(text, true).unwrap(), expected, "{text:?}");
        assert_eq!(tokenizer.decode(&expected, true).unwrap(), case["decoded_skip_special"].as_str().unwrap(), "{text:?}");
    }
}
