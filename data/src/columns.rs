//! Datasets whose records name things differently: `[data.columns]` says which of a record's
//! keys holds the instruction, input, answer, system prompt, history, conversation or text, and
//! `[data.tags]` which keys and names a conversation's turns use, with the keys of
//! LLaMA-Factory's `dataset_info.json` (`columns`: prompt, query, response, system, history,
//! messages, text, tools; `tags`: role_tag, content_tag, user_tag, assistant_tag, system_tag,
//! observation_tag, function_tag). A record is renamed into ember's own keys before it is read, so every
//! format and error is the same as for a record that used them.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Which key holds what (`None`: ember's own key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// The instruction (ember's `instruction`).
    pub prompt: Option<String>,
    /// Its input (`input`).
    pub query: Option<String>,
    /// The answer (`output`).
    pub response: Option<String>,
    pub system: Option<String>,
    /// Earlier `[query, answer]` pairs (`history`).
    pub history: Option<String>,
    /// A conversation's list of turns (`conversations` or `messages`).
    pub messages: Option<String>,
    /// Plain text for continued pretraining (`text`).
    pub text: Option<String>,
    /// The functions a conversation's assistant may call (`tools`).
    pub tools: Option<String>,
}

/// A conversation's turns: the keys of a turn's role and content, and the role names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    pub role_tag: Option<String>,
    pub content_tag: Option<String>,
    pub user_tag: Option<String>,
    pub assistant_tag: Option<String>,
    pub system_tag: Option<String>,
    pub observation_tag: Option<String>,
    /// An assistant's tool call (LLaMA-Factory's `function_call`).
    pub function_tag: Option<String>,
}

/// `[data.columns]` and `[data.tags]` together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    pub columns: Columns,
    pub tags: Tags,
}

/// Each data file's [`Mapping`]: its own where a dataset entry gave it one
/// (`data.dataset`), else the recipe's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mappings {
    default: Mapping,
    files: Vec<(std::path::PathBuf, Mapping)>,
}

impl Mappings {
    /// `default` for every file but those of `files`.
    pub fn new(default: Mapping, files: Vec<(std::path::PathBuf, Mapping)>) -> Self {
        Self { default, files }
    }

    pub fn of(&self, path: &std::path::Path) -> &Mapping {
        self.files.iter().find(|(file, _)| file == path).map_or(&self.default, |(_, mapping)| mapping)
    }

    /// Which key holds each file's plain text, where any is not `text`: what a token cache of
    /// the files depends on.
    pub fn text_columns(&self, paths: &[std::path::PathBuf]) -> Option<String> {
        let columns: Vec<&str> = paths.iter().map(|p| self.of(p).columns.text.as_deref().unwrap_or("text")).collect();
        columns.iter().any(|c| *c != "text").then(|| columns.join(","))
    }
}

impl From<Mapping> for Mappings {
    fn from(default: Mapping) -> Self {
        Self::new(default, Vec::new())
    }
}

impl Mapping {
    pub fn is_identity(&self) -> bool {
        *self == Self::default()
    }

    /// `record` under ember's keys: each mapped column moved to ember's name for it (where the
    /// record also has ember's name, the mapped column wins), a conversation's turns rewritten to
    /// `{"role", "content"}` with ember's role names. A record that is not an object, or a
    /// mapped column that is absent, is left for the reader to name.
    pub fn apply(&self, record: Value) -> Result<Value, String> {
        let Value::Object(mut fields) = record else { return Ok(record) };
        if self.is_identity() {
            return Ok(Value::Object(fields));
        }
        let c = &self.columns;
        let mut renamed = Map::new();
        let moves = [(&c.prompt, "instruction"), (&c.query, "input"), (&c.response, "output"), (&c.system, "system"), (&c.history, "history"), (&c.text, "text"), (&c.tools, "tools")];
        for (theirs, ours) in moves {
            if let Some(value) = theirs.as_deref().and_then(|key| fields.remove(key)) {
                renamed.insert(ours.to_owned(), value);
            }
        }
        let turns_key = match &c.messages {
            Some(key) => Some(key.as_str()),
            None if self.tags != Tags::default() => ["conversations", "messages"].into_iter().find(|k| fields.contains_key(*k)),
            None => None,
        };
        if let Some(key) = turns_key
            && let Some(turns) = fields.remove(key)
        {
            renamed.insert("messages".to_owned(), self.turns(key, turns)?);
        }
        for (key, value) in fields {
            renamed.entry(key).or_insert(value);
        }
        Ok(Value::Object(renamed))
    }

    /// A list of turns as `{"role", "content"}` objects, roles renamed by the tags. Without
    /// `role_tag`/`content_tag`, a turn's keys are `role`/`content` or ShareGPT's `from`/`value`.
    fn turns(&self, key: &str, turns: Value) -> Result<Value, String> {
        let Value::Array(turns) = turns else { return Err(format!("'{key}' must be a list of turns")) };
        let t = &self.tags;
        let names = [(&t.user_tag, "user"), (&t.assistant_tag, "assistant"), (&t.system_tag, "system"), (&t.observation_tag, "tool"), (&t.function_tag, "function_call")];
        let turns = turns.into_iter().enumerate().map(|(i, turn)| {
            let Value::Object(mut turn) = turn else { return Err(format!("{key}[{i}] must be an object")) };
            let mut take = |tag: &Option<String>, usual: [&str; 2]| {
                let found = match tag {
                    Some(tag) => turn.remove(tag.as_str()).map(|v| (tag.clone(), v)),
                    None => usual.iter().find_map(|k| turn.remove(*k).map(|v| (k.to_string(), v))),
                };
                found.ok_or_else(|| format!("{key}[{i}]: no '{}'", tag.as_deref().unwrap_or(&usual.join("' or '"))))
            };
            let (role_key, role) = take(&t.role_tag, ["role", "from"])?;
            let (_, content) = take(&t.content_tag, ["content", "value"])?;
            let role = match role {
                Value::String(name) => names.iter().find(|(tag, _)| tag.as_deref() == Some(name.as_str())).map_or(name, |(_, ours)| ours.to_string()),
                _ => return Err(format!("{key}[{i}]: '{role_key}' must be a string")),
            };
            let mut renamed = serde_json::json!({"role": role, "content": content});
            if let Some(calls) = turn.remove("tool_calls") {
                renamed["tool_calls"] = calls;
            }
            Ok(renamed)
        });
        Ok(Value::Array(turns.collect::<Result<_, String>>()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(columns: Value, tags: Value) -> Mapping {
        Mapping { columns: serde_json::from_value(columns).unwrap(), tags: serde_json::from_value(tags).unwrap() }
    }

    #[test]
    fn columns_move_to_embers_keys() {
        // databricks-dolly-15k and OpenOrca's columns.
        let dolly = mapping(json!({"query": "context", "response": "response"}), json!({}));
        let record = json!({"instruction": "Sum up", "context": "A text.", "response": "Short.", "category": "summarization"});
        assert_eq!(dolly.apply(record).unwrap(), json!({"instruction": "Sum up", "input": "A text.", "output": "Short.", "category": "summarization"}));
        let orca = mapping(json!({"prompt": "question", "response": "response", "system": "system_prompt"}), json!({}));
        let record = json!({"id": "1", "system_prompt": "Be brief.", "question": "Why?", "response": "Because.", "instruction": "stale"});
        assert_eq!(orca.apply(record).unwrap(), json!({"instruction": "Why?", "output": "Because.", "system": "Be brief.", "id": "1"}));
        assert_eq!(Mapping::default().apply(json!({"a": 1})).unwrap(), json!({"a": 1}));
    }

    #[test]
    fn turns_take_embers_keys_and_role_names() {
        let m = mapping(json!({"messages": "dialog"}), json!({"role_tag": "speaker", "content_tag": "text", "user_tag": "USER", "assistant_tag": "BOT"}));
        let record = json!({"dialog": [{"speaker": "USER", "text": "Hi"}, {"speaker": "BOT", "text": "Hello", "extra": 1}]});
        assert_eq!(m.apply(record).unwrap(), json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}));
        // Tags alone rename the turns of `conversations`; ShareGPT's keys are found without them.
        let m = mapping(json!({}), json!({"user_tag": "human_1", "assistant_tag": "model"}));
        let record = json!({"conversations": [{"from": "human_1", "value": "Q"}, {"from": "model", "value": "A"}]});
        assert_eq!(m.apply(record).unwrap()["messages"], json!([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]));
        for (record, needle) in [
            (json!({"dialog": "text"}), "'dialog' must be a list of turns"),
            (json!({"dialog": [{"speaker": "USER"}]}), "dialog[0]: no 'text'"),
            (json!({"dialog": [{"speaker": 3, "text": "x"}]}), "dialog[0]: 'speaker' must be a string"),
        ] {
            let m = mapping(json!({"messages": "dialog"}), json!({"role_tag": "speaker", "content_tag": "text"}));
            assert!(m.apply(record).unwrap_err().contains(needle), "{needle}");
        }
    }
}
