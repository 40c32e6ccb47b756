//! tiktoken ranks files (`<base64 bytes> <rank>` per line) as HF byte-level BPE `tokenizer.json`,
//! as GLM-4's remote code ships them under the name `tokenizer.model`.
//!
//! tiktoken merges the adjacent pair whose concatenation has the lowest rank, and takes a whole
//! pre-token as it is when it is in the table. As HF BPE that is: merges ranked by the merged
//! token's rank (transformers' `TikTokenConverter`) and `ignore_merges = true`.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::sentencepiece::{Affixes, added_token};

/// GLM-4's split regex (`tokenization_chatglm.py`, `ChatGLM4Tokenizer.pat_str`).
pub const GLM4_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GLM-4's special tokens, numbered from the end of the ranks (`ChatGLM4Tokenizer.special_tokens`).
pub const GLM4_SPECIALS: &[&str] = &[
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
];

/// The ranks of a tiktoken file, indexed by rank; errors name the line (1-based).
pub fn parse_ranks(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut ranks: Vec<Option<Vec<u8>>> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let (token, rank) = line.split_once(' ').ok_or_else(|| bad("expected '<base64> <rank>'"))?;
        let token = decode_base64(token).ok_or_else(|| bad("invalid base64"))?;
        let rank: usize = rank.trim().parse().map_err(|_| bad("rank is not a number"))?;
        if rank >= ranks.len() {
            ranks.resize(rank + 1, None);
        }
        if ranks[rank].replace(token).is_some() {
            return Err(bad(&format!("rank {rank} given twice")));
        }
    }
    if ranks.is_empty() {
        return Err("no ranks (not a tiktoken file)".into());
    }
    ranks.into_iter().enumerate().map(|(rank, t)| t.ok_or_else(|| format!("rank {rank} is missing"))).collect()
}

/// `tokenizer.json` for `ranks` split by `pattern`, with `specials` numbered after the ranks.
pub fn tokenizer_json(ranks: &[Vec<u8>], pattern: &str, specials: &[&str], affixes: &Affixes) -> Value {
    let to_text = byte_level_alphabet();
    let as_text = |bytes: &[u8]| -> String { bytes.iter().map(|&b| to_text[b as usize]).collect() };
    let rank_of: HashMap<&[u8], usize> = ranks.iter().enumerate().map(|(r, t)| (t.as_slice(), r)).collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (rank, token) in ranks.iter().enumerate().filter(|(_, t)| t.len() > 1) {
        for split in 1..token.len() {
            if let (Some(&l), Some(&r)) = (rank_of.get(&token[..split]), rank_of.get(&token[split..])) {
                merges.push((rank, l, r));
            }
        }
    }
    merges.sort_unstable();
    let merges: Vec<Value> = merges.iter().map(|&(_, l, r)| json!([as_text(&ranks[l]), as_text(&ranks[r])])).collect();
    let vocab: Map<String, Value> = ranks.iter().enumerate().map(|(rank, t)| (as_text(t), json!(rank))).collect();
    let added: Vec<Value> = specials.iter().enumerate().map(|(i, t)| added_token(ranks.len() + i, t, true)).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": split_then_byte_level(&[pattern]),
        "post_processor": affixes.post_processor(),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
            "vocab": vocab, "merges": merges},
    })
}

/// The pre-tokenizer of a byte-level BPE that splits text by each regex of `patterns` in turn
/// (tiktoken's, Llama 3's, Qwen2's, DeepSeek's several) before mapping bytes to GPT-2's characters.
pub fn split_then_byte_level(patterns: &[&str]) -> Value {
    let splits = patterns.iter().map(|pattern| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false}));
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    json!({"type": "Sequence", "pretokenizers": splits.chain([byte_level]).collect::<Vec<_>>()})
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others map to
/// code points from 256 up, so every byte string is a readable string.
fn byte_level_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap()
        };
    }
    table
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let n = chunk.iter().try_fold(0u32, |n, &c| Some(n << 6 | value(c)?))? << (6 * (4 - chunk.len()));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        assert_eq!(decode_base64("Zg==").unwrap(), b"f");
        assert_eq!(decode_base64("Zm8=").unwrap(), b"fo");
        assert_eq!(decode_base64("Zm9vYmFy").unwrap(), b"foobar");
        assert!(decode_base64("Z").is_none() && decode_base64("Z!==").is_none());
    }

    #[test]
    fn alphabet_is_gpt2s() {
        let table = byte_level_alphabet();
        assert_eq!((table[b'a' as usize], table[b' ' as usize], table[b'\n' as usize]), ('a', 'Ġ', 'Ċ'));
    }

    #[test]
    fn bad_lines_are_named() {
        assert!(parse_ranks("YQ== 0\nYg== x\n").unwrap_err().starts_with("line 2"));
        assert!(parse_ranks("YQ== 1\n").unwrap_err().contains("rank 0 is missing"));
        assert!(parse_ranks("YQ== 0\nYg== 0\n").unwrap_err().contains("given twice"));
    }
}
