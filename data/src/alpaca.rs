//! Alpaca-format records (`instruction`, optional `input`, `output`) from a JSON array or JSONL.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: record {index}: {reason}", path.display())]
    Record { path: PathBuf, index: usize, reason: String },
}

/// Reads every record of `path`; a JSON array (`[...]`) or one JSON object per line, optionally
/// gzip-compressed (`.gz`). Any bad record is an error naming its index (0-based) and key:
/// nothing is dropped silently.
pub fn load(path: &Path) -> Result<Vec<Record>, DatasetError> {
    let bytes = std::fs::read(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
    parse(path, bytes)
}

/// The records of a data file's `bytes` (gzip-compressed if `path` ends in `.gz`); `path` names
/// the file in errors.
pub fn parse(path: &Path, mut bytes: Vec<u8>) -> Result<Vec<Record>, DatasetError> {
    if path.extension().is_some_and(|e| e == "gz") {
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes.as_slice()), &mut plain)
            .map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
        bytes = plain;
    }
    let invalid = |reason: String| DatasetError::Invalid { path: path.to_path_buf(), reason };
    let text = String::from_utf8(bytes).map_err(|e| invalid(format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to())))?;
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| invalid(format!("malformed JSON: {e}")))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| serde_json::from_str(line).map_err(|e| invalid(format!("line {}: malformed JSON: {e}", n + 1))))
            .collect::<Result<_, _>>()?
    };
    if values.is_empty() {
        return Err(invalid("no records".into()));
    }
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            parse_record(value).map_err(|reason| DatasetError::Record { path: path.to_path_buf(), index, reason })
        })
        .collect()
}

fn parse_record(value: &Value) -> Result<Record, String> {
    let obj = value.as_object().ok_or_else(|| format!("expected an object, found {}", kind(value)))?;
    let field = |key: &str, required: bool| -> Result<String, String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            None => Err(format!("missing '{key}'")),
            Some(other) => Err(format!("'{key}' must be a string, found {}", kind(other))),
        }
    };
    Ok(Record { instruction: field("instruction", true)?, input: field("input", false)?, output: field("output", true)? })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &[u8]) -> Result<Vec<Record>, DatasetError> {
        let dir = std::env::temp_dir().join(format!("ember-alpaca-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.json");
        std::fs::write(&path, text).unwrap();
        load(&path)
    }

    #[test]
    fn reads_arrays_and_jsonl() {
        let array = load_text(br#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]"#).unwrap();
        assert_eq!(array[0], Record { instruction: "a".into(), input: "".into(), output: "b".into() });
        let lines = load_text(b"{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"output\": \"e\"}\n").unwrap();
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn bad_records_name_index_and_key() {
        let e = load_text(br#"[{"instruction": "a", "output": "b"}, {"instruction": "c"}]"#).unwrap_err().to_string();
        assert!(e.contains("record 1") && e.contains("missing 'output'"), "{e}");
        let e = load_text(br#"[{"instruction": 3, "output": "b"}]"#).unwrap_err().to_string();
        assert!(e.contains("record 0") && e.contains("'instruction' must be a string, found a number"), "{e}");
        let e = load_text(b"[]").unwrap_err().to_string();
        assert!(e.contains("no records"), "{e}");
        let e = load_text(b"[{\"instruction\": \"\xff\"}]").unwrap_err().to_string();
        assert!(e.contains("invalid UTF-8 at byte 18"), "{e}");
        let e = load_text(b"[{\"instruction\": ").unwrap_err().to_string();
        assert!(e.contains("malformed JSON"), "{e}");
    }
}
