//! Training data from a JSON array, JSONL or Parquet, one record per element, line or row, in any
//! of:
//! - Alpaca: `instruction`, optional `input`, `output`; with LLaMA-Factory's optional `system`
//!   and `history: [[query, answer], …]` it is a conversation;
//! - ShareGPT: `conversations: [{from: human|gpt|system|observation, value}]`, optional `system`;
//! - OpenAI: `messages: [{role: system|user|assistant|tool, content}]`;
//! - plain text: `text` (continued pretraining); a `.txt` file is one such record per non-empty
//!   line.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::chat::{Conversation, Message, Role, ToolCall};
use crate::columns::{Mapping, Mappings};

/// One record: a single instruction (rendered by prompt or chat templates), a conversation
/// (chat templates only) or plain text (the `text` template only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    Instruction(Record),
    Chat(Conversation),
    Text(String),
}

impl Sample {
    /// The record as a conversation: the instruction (and its input on the next line, as
    /// LLaMA-Factory joins them) from the user, the output from the assistant. Plain text is
    /// none.
    pub fn conversation(&self) -> Option<Conversation> {
        match self {
            Sample::Chat(c) => Some(c.clone()),
            Sample::Instruction(r) => Some(Conversation::new(r.turns())),
            Sample::Text(_) => None,
        }
    }

    /// The record as one instruction, if it is one: a conversation of one user and one
    /// assistant message is one too.
    pub fn instruction(&self) -> Option<Record> {
        match self {
            Sample::Instruction(r) => Some(r.clone()),
            Sample::Chat(c) if c.uses_tools() => None,
            Sample::Chat(c) => match c.messages.as_slice() {
                [q, a] if q.role == Role::User && a.role == Role::Assistant => {
                    Some(Record { instruction: q.content.clone(), input: String::new(), output: a.content.clone() })
                }
                _ => None,
            },
            Sample::Text(_) => None,
        }
    }
}

/// The records of one data file, or of several one after the other.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Each file with the index of its first record in `samples`.
    files: Vec<(PathBuf, usize)>,
    pub samples: Vec<Sample>,
}

impl Dataset {
    pub fn load(path: &Path) -> Result<Self, DatasetError> {
        Self::load_all(std::slice::from_ref(&path.to_path_buf()), &Mappings::default())
    }

    /// The records of `paths` concatenated in order (LLaMA-Factory's `dataset: a,b`), their keys
    /// renamed by each file's mapping.
    pub fn load_all(paths: &[PathBuf], mappings: &Mappings) -> Result<Self, DatasetError> {
        let mut dataset = Self { files: Vec::new(), samples: Vec::new() };
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| DatasetError::Io { path: path.clone(), source })?;
            dataset.files.push((path.clone(), dataset.samples.len()));
            dataset.samples.extend(parse(path, bytes, mappings.of(path))?);
        }
        Ok(dataset)
    }

    /// The records `samples` of `files`, each with the index of its first record.
    pub(crate) fn from_parts(files: Vec<(PathBuf, usize)>, samples: Vec<Sample>) -> Self {
        Self { files, samples }
    }

    /// Each file and its number of records.
    pub fn files(&self) -> impl Iterator<Item = (&Path, usize)> {
        let ends = self.files.iter().skip(1).map(|(_, first)| *first).chain([self.samples.len()]);
        self.files.iter().zip(ends).map(|((path, first), end)| (path.as_path(), end - first))
    }

    /// `other`'s records after these.
    pub fn append(&mut self, other: Dataset) {
        let offset = self.samples.len();
        self.files.extend(other.files.into_iter().map(|(path, first)| (path, first + offset)));
        self.samples.extend(other.samples);
    }

    /// The error for record `index` (of all files' records): it names the file and the index
    /// within that file.
    pub fn record_error(&self, index: usize, reason: impl Into<String>) -> DatasetError {
        let (path, first) = self.files.iter().rev().find(|(_, first)| *first <= index).expect("a loaded dataset has a file");
        DatasetError::Record { path: path.clone(), index: index - first, reason: reason.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

impl Record {
    /// The user's turn (the instruction, and its input on the next line, as LLaMA-Factory
    /// joins them) and the assistant's (the output).
    fn turns(&self) -> Vec<Message> {
        let query = if self.input.is_empty() { self.instruction.clone() } else { format!("{}\n{}", self.instruction, self.input) };
        vec![Message::new(Role::User, query), Message::new(Role::Assistant, self.output.clone())]
    }
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

/// Whether `path`'s name is that of a data file ember reads: JSON, JSON Lines or text (each
/// gzipped too), or Parquet.
pub fn is_data_file(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    [".json", ".jsonl", ".txt"].iter().any(|ext| name.ends_with(ext)) || crate::parquet::is_parquet(path)
}

/// `paths` with each folder replaced by the data files in it and each file-name pattern (`*`: any
/// characters, `?`: one) by the files it matches, in name order, as `datasets` reads a `data_dir`
/// or a `data_files` pattern (a dataset's shards, `train-*.parquet`). A pattern that matches
/// nothing stays, to be named as missing; a folder without data files is an error.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut expanded = Vec::new();
    for path in paths {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let folder = path.parent().unwrap_or(Path::new(""));
        let pattern = name.contains(['*', '?']);
        if folder.to_string_lossy().contains(['*', '?']) {
            return Err(format!("{}: a pattern may only match file names, not folders", path.display()));
        }
        if !pattern && !path.is_dir() {
            expanded.push(path.clone());
            continue;
        }
        let (dir, wanted) = if pattern { (folder, Some(name.as_str())) } else { (path.as_path(), None) };
        let mut found: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_data_file(p))
                .filter(|p| wanted.is_none_or(|w| p.file_name().is_some_and(|n| wildcard_match(w, &n.to_string_lossy()))))
                .collect(),
            Err(_) if pattern => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        match (found.is_empty(), pattern) {
            (true, true) => expanded.push(path.clone()),
            (true, false) => return Err(format!("{}: a folder without data files (.json, .jsonl, .txt, gzipped too, or .parquet)", path.display())),
            (false, _) => {
                found.sort();
                expanded.extend(found);
            }
        }
    }
    Ok(expanded)
}

/// Whether `name` matches `pattern`, whose `*` stands for any characters and `?` for one.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // The last `*` seen and the name position it was tried at: on a mismatch it takes one more.
    let (mut p, mut n, mut star) = (0, 0, None);
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => (p, n) = (p + 1, n + 1),
            _ => match star {
                Some((sp, sn)) => {
                    (p, n) = (sp + 1, sn + 1);
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// The records of a data file's `bytes` (gzip-compressed if `path` ends in `.gz`), their keys
/// renamed by `mapping`; `path` names the file in errors.
///
/// A JSON array (`[...]`), one JSON object per line, or a Parquet file (`.parquet`, a row a
/// record). Any bad record is an error naming its index (0-based) and key: nothing is dropped
/// silently.
pub fn parse(path: &Path, bytes: Vec<u8>, mapping: &Mapping) -> Result<Vec<Sample>, DatasetError> {
    if crate::parquet::is_parquet(path) {
        return samples(path, crate::parquet::values(path, bytes)?, mapping);
    }
    let text = decode(path, bytes)?;
    let name = path.to_string_lossy();
    if name.ends_with(".txt") || name.ends_with(".txt.gz") {
        let lines: Vec<Sample> = text.lines().filter(|line| !line.trim().is_empty()).map(|line| Sample::Text(line.to_string())).collect();
        return if lines.is_empty() { Err(DatasetError::Invalid { path: path.to_path_buf(), reason: "no records".into() }) } else { Ok(lines) };
    }
    samples(path, json_values(path, &text)?, mapping)
}

/// The records of the file at `path` as JSON values, whatever holds them: a JSON array, JSON
/// Lines (either gzipped) or Parquet.
pub fn read_values(path: &Path) -> Result<Vec<Value>, DatasetError> {
    let bytes = std::fs::read(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
    match crate::parquet::is_parquet(path) {
        true => crate::parquet::values(path, bytes),
        false => json_values(path, &decode(path, bytes)?),
    }
}

fn samples(path: &Path, values: Vec<Value>, mapping: &Mapping) -> Result<Vec<Sample>, DatasetError> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| mapped_sample(value, mapping).map_err(|reason| DatasetError::Record { path: path.to_path_buf(), index, reason }))
        .collect()
}

/// A record read after `mapping` renames its keys.
pub(crate) fn mapped_sample(value: &Value, mapping: &Mapping) -> Result<Sample, String> {
    match mapping.is_identity() {
        true => parse_sample(value),
        false => parse_sample(&mapping.apply(value.clone())?),
    }
}

/// A text file's `bytes` (gunzipped if `path` ends in `.gz`) as text.
fn decode(path: &Path, mut bytes: Vec<u8>) -> Result<String, DatasetError> {
    if path.extension().is_some_and(|e| e == "gz") {
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes.as_slice()), &mut plain)
            .map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
        bytes = plain;
    }
    String::from_utf8(bytes).map_err(|e| DatasetError::Invalid { path: path.to_path_buf(), reason: format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()) })
}

/// The values of a JSON array (`[...]`) or of JSON Lines (blank lines skipped); a malformed one
/// names its line, and a file without any is an error.
fn json_values(path: &Path, text: &str) -> Result<Vec<Value>, DatasetError> {
    let invalid = |reason: String| DatasetError::Invalid { path: path.to_path_buf(), reason };
    let values: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| invalid(format!("malformed JSON: {e}")))?
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
    Ok(values)
}

pub(crate) fn parse_sample(value: &Value) -> Result<Sample, String> {
    let obj = value.as_object().ok_or_else(|| format!("expected an object, found {}", kind(value)))?;
    let system = string_field(obj, "system", false)?;
    let tools = tools(obj.get("tools"))?;
    let mut messages: Vec<Message> = Vec::new();
    if !system.is_empty() {
        messages.push(Message::new(Role::System, system));
    }
    if let Some(list) = obj.get("messages") {
        messages.extend(turns(list, "messages", "role", "content")?);
    } else if let Some(list) = obj.get("conversations") {
        messages.extend(turns(list, "conversations", "from", "value")?);
    } else if obj.contains_key("text") && !obj.contains_key("instruction") {
        if !messages.is_empty() || !tools.is_empty() {
            return Err("a plain-text record ('text') has no 'system' nor 'tools'".into());
        }
        return Ok(Sample::Text(string_field(obj, "text", true)?));
    } else {
        let record = Record {
            instruction: string_field(obj, "instruction", true)?,
            input: string_field(obj, "input", false)?,
            output: string_field(obj, "output", true)?,
        };
        let history = match obj.get("history") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(pairs)) => pairs.iter().enumerate().map(|(i, pair)| history_pair(i, pair)).collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("'history' must be a list of [query, answer] pairs, found {}", kind(other))),
        };
        if messages.is_empty() && history.is_empty() && tools.is_empty() {
            return Ok(Sample::Instruction(record));
        }
        for (query, answer) in history {
            messages.push(Message::new(Role::User, query));
            messages.push(Message::new(Role::Assistant, answer));
        }
        messages.extend(record.turns());
    }
    let conversation = Conversation { messages, tools };
    conversation.validate()?;
    Ok(Sample::Chat(conversation))
}

fn string_field(obj: &Map<String, Value>, key: &str, required: bool) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None => Err(format!("missing '{key}'")),
        Some(other) => Err(format!("'{key}' must be a string, found {}", kind(other))),
    }
}

/// A field that may be absent or null, else a string; errors name it as `name`.
pub(crate) fn optional_string(value: Option<&Value>, name: &str) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("'{name}' must be a string, found {}", kind(other))),
    }
}

fn history_pair(i: usize, pair: &Value) -> Result<(String, String), String> {
    match pair.as_array().map(Vec::as_slice) {
        Some([Value::String(q), Value::String(a)]) => Ok((q.clone(), a.clone())),
        _ => Err(format!("history[{i}] must be a [query, answer] pair of strings")),
    }
}

/// The messages of a ShareGPT `conversations` or OpenAI `messages` list. An assistant's tool
/// calls are OpenAI's `tool_calls`, or a LLaMA-Factory `function_call` turn (its content the
/// JSON of a call, or of a list of calls).
fn turns(list: &Value, key: &str, role_key: &str, content_key: &str) -> Result<Vec<Message>, String> {
    let list = list.as_array().ok_or_else(|| format!("'{key}' must be a list, found {}", kind(list)))?;
    list.iter()
        .enumerate()
        .map(|(i, turn)| {
            let obj = turn.as_object().ok_or_else(|| format!("{key}[{i}] must be an object, found {}", kind(turn)))?;
            let role_name = string_field(obj, role_key, true).map_err(|e| format!("{key}[{i}]: {e}"))?;
            let role = match role_name.as_str() {
                "system" => Role::System,
                "user" | "human" => Role::User,
                "assistant" | "gpt" | "function_call" => Role::Assistant,
                "tool" | "observation" | "function" => Role::Observation,
                other => return Err(format!("{key}[{i}]: unknown {role_key} '{other}' (known: system, user/human, assistant/gpt, function_call, tool/observation/function)")),
            };
            let mut calls = match obj.get("tool_calls") {
                None | Some(Value::Null) => Vec::new(),
                Some(list) if role == Role::Assistant => tool_calls(list).map_err(|e| format!("{key}[{i}]: 'tool_calls': {e}"))?,
                Some(_) => return Err(format!("{key}[{i}]: only an assistant turn has 'tool_calls'")),
            };
            // A message that calls tools may have no content (OpenAI's `null`).
            let content = string_field(obj, content_key, calls.is_empty() && role_name != "function_call").map_err(|e| format!("{key}[{i}]: {e}"))?;
            let tool_call_id = optional_string(obj.get("tool_call_id"), "tool_call_id").map_err(|e| format!("{key}[{i}]: {e}"))?;
            if tool_call_id.is_some() && role != Role::Observation {
                return Err(format!("{key}[{i}]: only a tool's result has a 'tool_call_id'"));
            }
            if role_name == "function_call" {
                let call: Value = serde_json::from_str(&content).map_err(|e| format!("{key}[{i}]: a function_call is the JSON of {{\"name\", \"arguments\"}} (or a list of them): {e}"))?;
                calls.extend(tool_calls(&call).map_err(|e| format!("{key}[{i}]: {e}"))?);
                return Ok(Message { role, content: String::new(), tool_calls: calls, tool_call_id });
            }
            Ok(Message { role, content, tool_calls: calls, tool_call_id })
        })
        .collect()
}

/// Calls as OpenAI writes them (`{"type": "function", "function": {"name", "arguments"}}`) or
/// as LLaMA-Factory does (`{"name", "arguments"}`), one or a list; arguments given as JSON
/// text are parsed.
fn tool_calls(value: &Value) -> Result<Vec<ToolCall>, String> {
    let one = |call: &Value| {
        let id = optional_string(call.get("id"), "id").map_err(|e| format!("a tool call's {e}"))?;
        let call = if call.get("type").is_some_and(|t| t == "function") { &call["function"] } else { call };
        let name = call.get("name").and_then(Value::as_str).ok_or("a tool call needs a 'name' string")?;
        let arguments = match call.get("arguments") {
            Some(Value::String(text)) => serde_json::from_str(text).map_err(|e| format!("the arguments of '{name}' are not JSON: {e}"))?,
            Some(arguments) => arguments.clone(),
            None => Value::Object(Map::new()),
        };
        Ok(ToolCall { name: name.to_string(), arguments, id })
    };
    match value {
        Value::Array(calls) if !calls.is_empty() => calls.iter().map(one).collect(),
        Value::Object(_) => Ok(vec![one(value)?]),
        other => Err(format!("expected a tool call or a list of them, found {}", kind(other))),
    }
}

/// The function schemas of a JSON file holding a list of them (or OpenAI's `{"type":
/// "function", "function": …}` wrappers), read as a record's `tools`.
pub fn read_tools(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    tools(Some(&value)).map_err(|e| format!("{}: {e}", path.display()))
}

/// A record's `tools`: a list of function schemas, or its JSON text (LLaMA-Factory's column),
/// as the bare schemas [`Conversation::tools`](crate::Conversation::tools) holds.
pub fn tools(value: Option<&Value>) -> Result<Vec<Value>, String> {
    let parsed;
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(text)) if text.trim().is_empty() => return Ok(Vec::new()),
        Some(Value::String(text)) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|e| format!("'tools' is not JSON: {e}"))?;
            &parsed
        }
        Some(list) => list,
    };
    match list {
        Value::Array(tools) if tools.iter().all(Value::is_object) => tools.iter().enumerate().map(|(i, tool)| function_schema(i, tool)).collect(),
        other => Err(format!("'tools' must be a list of function schemas (objects), found {}", kind(other))),
    }
}

/// The function schema of OpenAI's `{"type": "function", "function": schema}` or of a bare
/// schema (LLaMA-Factory's), so that templates read one form.
fn function_schema(i: usize, tool: &Value) -> Result<Value, String> {
    let schema = match tool.get("type").and_then(Value::as_str) {
        Some("function") => &tool["function"],
        Some(other) => return Err(format!("tools[{i}] has type '{other}'; ember renders function tools only")),
        None => tool,
    };
    match schema.get("name") {
        Some(Value::String(_)) => Ok(schema.clone()),
        _ => Err(format!("tools[{i}] has no 'name' string")),
    }
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

    /// A folder reads as its data files and a file-name pattern as the files it matches, in
    /// name order; a pattern without a match is left to be named as missing.
    #[test]
    fn data_folders_and_patterns_expand_to_their_files() {
        let dir = std::env::temp_dir().join(format!("ember-data-paths-{}", std::process::id()));
        let shards = dir.join("shards");
        std::fs::create_dir_all(&shards).unwrap();
        for name in ["train-00001-of-00002.parquet", "train-00000-of-00002.parquet", "test-00000-of-00001.parquet", "notes.md", "extra.jsonl.gz"] {
            std::fs::write(shards.join(name), "").unwrap();
        }
        std::fs::create_dir(shards.join("sub.json")).unwrap();
        let names = |paths: Vec<PathBuf>| paths.iter().map(|p| p.strip_prefix(&shards).unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>();
        assert_eq!(
            names(expand_paths(&[shards.join("train-*.parquet"), shards.join("test-?????-of-00001.parquet")]).unwrap()),
            ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "test-00000-of-00001.parquet"]
        );
        assert_eq!(names(expand_paths(std::slice::from_ref(&shards)).unwrap()), ["extra.jsonl.gz", "test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]);
        let missing = shards.join("valid-*.parquet");
        assert_eq!(expand_paths(std::slice::from_ref(&missing)).unwrap(), [missing]);
        let e = expand_paths(&[dir.join("*/a.json")]).unwrap_err();
        assert!(e.contains("only match file names"), "{e}");
        let empty = dir.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(expand_paths(&[empty]).unwrap_err().contains("a folder without data files"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wildcards_match_any_characters_or_one() {
        for (pattern, name, matches) in [("*", "", true), ("a*b*c", "aXbYbc", true), ("a*b?c", "abc", false), ("a*b?c", "abbc", true), ("*.json", "x.json.gz", false), ("?", "字", true)] {
            assert_eq!(wildcard_match(pattern, name), matches, "{pattern} {name}");
        }
    }

    fn load_text(text: &[u8]) -> Result<Vec<Sample>, DatasetError> {
        let dir = std::env::temp_dir().join(format!("ember-alpaca-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.json");
        std::fs::write(&path, text).unwrap();
        let samples = Dataset::load(&path).map(|d| d.samples);
        std::fs::remove_dir_all(&dir).unwrap();
        samples
    }

    #[test]
    fn reads_arrays_and_jsonl() {
        let array = load_text(br#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]"#).unwrap();
        assert_eq!(array[0], Sample::Instruction(Record { instruction: "a".into(), input: "".into(), output: "b".into() }));
        let lines = load_text(b"{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"output\": \"e\"}\n").unwrap();
        assert_eq!(lines.len(), 2);
    }

    /// OpenAI's wrapped tools and LLaMA-Factory's bare schemas read as the same bare schema.
    #[test]
    fn tools_read_as_bare_function_schemas() {
        let schema = serde_json::json!({"name": "f", "parameters": {"type": "object"}});
        let wrapped = serde_json::json!([{"type": "function", "function": schema}]);
        assert_eq!(tools(Some(&wrapped)).unwrap(), [schema.clone()]);
        assert_eq!(tools(Some(&Value::String(serde_json::json!([schema]).to_string()))).unwrap(), [schema]);
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

    /// Several files are one dataset; a record's error names its own file and index there.
    #[test]
    fn files_concatenate_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("ember-files-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.json"), dir.join("b.jsonl"));
        std::fs::write(&a, br#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]"#).unwrap();
        std::fs::write(&b, b"{\"messages\": [{\"role\": \"user\", \"content\": \"e\"}, {\"role\": \"assistant\", \"content\": \"f\"}]}\n").unwrap();
        let mut dataset = Dataset::load_all(&[a.clone(), b.clone()], &Mappings::default()).unwrap();
        dataset.append(Dataset::load(&a).unwrap());
        assert_eq!(dataset.samples.len(), 5);
        assert!(matches!(&dataset.samples[2], Sample::Chat(_)));
        let e = dataset.record_error(2, "bad").to_string();
        assert!(e.starts_with(&b.display().to_string()) && e.ends_with("record 0: bad"), "{e}");
        let e = dataset.record_error(4, "bad").to_string();
        assert!(e.starts_with(&a.display().to_string()) && e.ends_with("record 1: bad"), "{e}");
        std::fs::write(&b, b"{\"instruction\": 1}\n").unwrap();
        let e = Dataset::load_all(&[a, b.clone()], &Mappings::default()).unwrap_err().to_string();
        assert!(e.starts_with(&b.display().to_string()) && e.contains("record 0"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn chat(turns: &[(Role, &str)]) -> Sample {
        Sample::Chat(Conversation::new(turns.iter().map(|&(role, c)| Message::new(role, c)).collect()))
    }

    #[test]
    fn reads_every_chat_format() {
        let expected = chat(&[(Role::System, "s"), (Role::User, "q1"), (Role::Assistant, "a1"), (Role::User, "q2\nin"), (Role::Assistant, "a2")]);
        let alpaca = br#"[{"system": "s", "history": [["q1", "a1"]], "instruction": "q2", "input": "in", "output": "a2"}]"#;
        assert_eq!(load_text(alpaca).unwrap(), [expected.clone()]);
        let sharegpt = br#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2\nin"}, {"from": "gpt", "value": "a2"}]}"#;
        assert_eq!(load_text(sharegpt).unwrap(), [expected.clone()]);
        let openai = br#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2\nin"}, {"role": "assistant", "content": "a2"}]}"#;
        assert_eq!(load_text(openai).unwrap(), [expected]);
    }

    #[test]
    fn bad_conversations_name_the_record() {
        let cases: [(&[u8], &str); 5] = [
            (br#"[{"messages": []}]"#, "empty conversation"),
            (br#"[{"instruction": "a", "output": "b"}, {"conversations": [{"from": "human"}]}]"#, "record 1: conversations[0]: missing 'value'"),
            (br#"[{"messages": [{"content": "x"}]}]"#, "messages[0]: missing 'role'"),
            (br#"[{"messages": [{"role": "robot", "content": "x"}]}]"#, "unknown role 'robot'"),
            (br#"[{"messages": [{"role": "user", "content": "x"}]}]"#, "must end with the assistant's"),
        ];
        for (text, expected) in cases {
            let e = load_text(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
        let e = load_text(br#"[{"instruction": "a", "output": "b", "history": [["q"]]}]"#).unwrap_err().to_string();
        assert!(e.contains("history[0] must be a [query, answer] pair"), "{e}");
    }
}
