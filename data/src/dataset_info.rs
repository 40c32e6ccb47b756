//! LLaMA-Factory's `dataset_info.json`: datasets by name (`data.dataset = ["alpaca_zh_demo",
//! "identity"]`), each a file or folder beside it (`file_name`) or a Hugging Face dataset
//! (`hf_hub_url`), with its `formatting` (alpaca or sharegpt), `columns` and `tags`, so that a
//! LLaMA-Factory data folder trains as it is. What ember does not do (preference pairs, other
//! hubs, loading scripts) is an error naming the dataset and the key.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::columns::{Columns, Mapping, Tags};

/// Where a dataset's records are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file or folder, relative to the folder of `dataset_info.json`.
    File(PathBuf),
    /// A Hugging Face dataset id (its train split).
    Hub(String),
}

/// One entry of `dataset_info.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub source: Source,
    /// The hub dataset's split (`train` unless the entry names another).
    pub split: String,
    pub mapping: Mapping,
    /// How many records to draw (`num_samples`): every record once in a seeded order before
    /// any is drawn again, as LLaMA-Factory samples.
    pub num_samples: Option<usize>,
}

impl Entry {
    /// The mapping for plain text (`template = "text"`): LLaMA-Factory's pretraining entries name
    /// the text column `prompt` (`"columns": {"prompt": "text"}`).
    pub fn text_mapping(&self) -> Mapping {
        let columns = Columns { text: self.mapping.columns.prompt.clone(), ..Default::default() };
        Mapping { columns, tags: Tags::default() }
    }
}

/// The entries of the `dataset_info.json` in `dir`.
pub struct DatasetInfo {
    path: PathBuf,
    entries: Map<String, Value>,
}

impl DatasetInfo {
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join("dataset_info.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        match serde_json::from_str(&text) {
            Ok(Value::Object(entries)) => Ok(Self { path, entries }),
            Ok(_) => Err(format!("{}: expected an object of datasets by name", path.display())),
            Err(e) => Err(format!("{}: malformed JSON: {e}", path.display())),
        }
    }

    /// The entry of dataset `name`.
    pub fn entry(&self, name: &str) -> Result<Entry, String> {
        let fail = |reason: String| format!("{}: dataset '{name}': {reason}", self.path.display());
        let Some(Value::Object(attr)) = self.entries.get(name) else {
            let mut known: Vec<&str> = self.entries.keys().map(String::as_str).collect();
            known.sort();
            return Err(format!("{}: no dataset '{name}' (it has: {})", self.path.display(), known.join(", ")));
        };
        let string = |key: &str| optional_string(attr, "", key).map_err(&fail);
        for key in ["ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "subset", "folder"] {
            if attr.get(key).is_some_and(|v| !v.is_null()) && !(key.ends_with("_url") && attr.contains_key("hf_hub_url")) {
                return Err(fail(format!("'{key}' is not supported (ember reads local files and Hugging Face datasets)")));
            }
        }
        if attr.get("ranking").and_then(Value::as_bool) == Some(true) {
            return Err(fail("'ranking': preference pairs are not supported (ember trains on instructions and conversations)".into()));
        }
        let num_samples = match attr.get("num_samples") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64().filter(|&n| n > 0) {
                Some(n) => Some(n as usize),
                None => return Err(fail(format!("'num_samples' must be a number of records (at least 1), found {value}"))),
            },
        };
        let split = string("split")?.unwrap_or_else(|| "train".into());
        let source = match (string("hf_hub_url")?, string("file_name")?) {
            (Some(id), _) => Source::Hub(id),
            (None, Some(file)) => Source::File(PathBuf::from(file)),
            (None, None) => return Err(fail("no 'file_name' nor 'hf_hub_url'".into())),
        };
        // A local file is one split, `train`, as `datasets` loads it.
        if matches!(source, Source::File(_)) && split != "train" {
            return Err(fail(format!("'split' is '{split}': a file is read whole (its one split is train)")));
        }
        let formatting = string("formatting")?.unwrap_or_else(|| "alpaca".into());
        let table = |key: &str| match attr.get(key) {
            None | Some(Value::Null) => Ok(Map::new()),
            Some(Value::Object(map)) => Ok(map.clone()),
            Some(other) => Err(fail(format!("'{key}' must be an object, found {other}"))),
        };
        let (columns, tags) = (table("columns")?, table("tags")?);
        let column = |key: &str| optional_string(&columns, "columns.", key).map_err(&fail);
        for key in columns.keys() {
            if !["prompt", "query", "response", "history", "system", "messages", "tools"].contains(&key.as_str()) && column(key)?.is_some() {
                return Err(fail(format!("'columns.{key}' is not supported (ember reads text records and tools: no images, videos, audios or preference columns)")));
            }
        }
        let mut mapping = Mapping {
            columns: Columns {
                prompt: column("prompt")?,
                query: column("query")?,
                response: column("response")?,
                system: column("system")?,
                history: column("history")?,
                tools: column("tools")?,
                ..Default::default()
            },
            tags: Tags::default(),
        };
        match formatting.as_str() {
            "alpaca" => {}
            "sharegpt" => {
                mapping.columns.messages = Some(column("messages")?.unwrap_or_else(|| "conversations".into()));
                let tag = |key: &str| optional_string(&tags, "tags.", key).map_err(&fail);
                mapping.tags = Tags {
                    role_tag: tag("role_tag")?,
                    content_tag: tag("content_tag")?,
                    user_tag: tag("user_tag")?,
                    assistant_tag: tag("assistant_tag")?,
                    system_tag: tag("system_tag")?,
                    observation_tag: tag("observation_tag")?,
                    function_tag: tag("function_tag")?,
                };
            }
            other => return Err(fail(format!("'formatting' is '{other}': expected alpaca or sharegpt"))),
        }
        Ok(Entry { source, split, mapping, num_samples })
    }
}

/// `map[key]` as a string, if given; errors name the key after `prefix` (`'columns.prompt'`).
fn optional_string(map: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<String>, String> {
    crate::dataset::optional_string(map.get(key), &format!("{prefix}{key}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(entries: Value) -> DatasetInfo {
        DatasetInfo { path: PathBuf::from("data/dataset_info.json"), entries: entries.as_object().unwrap().clone() }
    }

    /// Entries as LLaMA-Factory's own `data/dataset_info.json` writes them.
    #[test]
    fn entries_give_a_source_and_a_mapping() {
        let info = info(json!({
            "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
            "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en", "om_hub_url": "HaM/alpaca_en"},
            "sharegpt4": {"hf_hub_url": "shibing624/sharegpt_gpt4", "formatting": "sharegpt"},
            "openai": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}},
            "dolly": {"file_name": "dolly", "columns": {"prompt": "instruction", "query": "context", "response": "response"}},
            "dpo": {"file_name": "dpo.json", "ranking": true, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
            "glaive": {"file_name": "glaive.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}},
            "mllm": {"file_name": "mllm.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}},
            "c4": {"hf_hub_url": "allenai/c4", "subset": "en"},
            "bad": {"file_name": "x.json", "formatting": "jsonl"},
            "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
            "ultrachat": {"hf_hub_url": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "formatting": "sharegpt", "columns": {"messages": "messages"}},
            "split_file": {"file_name": "x.json", "split": "test"},
            "sampled": {"file_name": "x.json", "num_samples": 500},
            "no_samples": {"file_name": "x.json", "num_samples": 0},
        }));
        assert_eq!(info.entry("sampled").unwrap().num_samples, Some(500));
        assert_eq!(info.entry("glaive").unwrap().mapping.columns.tools.as_deref(), Some("tools"));
        assert_eq!(info.entry("alpaca_zh_demo").unwrap(), Entry { source: Source::File("alpaca_zh_demo.json".into()), split: "train".into(), mapping: Mapping::default(), num_samples: None });
        assert_eq!(info.entry("c4_demo").unwrap().text_mapping().columns.text.as_deref(), Some("text"));
        assert_eq!(info.entry("ultrachat").unwrap().split, "train_sft");
        assert_eq!(info.entry("alpaca_en").unwrap().source, Source::Hub("llamafactory/alpaca_en".into()));
        assert_eq!(info.entry("sharegpt4").unwrap().mapping.columns.messages.as_deref(), Some("conversations"));
        let openai = info.entry("openai").unwrap().mapping;
        assert_eq!((openai.tags.role_tag.as_deref(), openai.tags.user_tag.as_deref()), (Some("role"), Some("user")));
        assert_eq!(info.entry("dolly").unwrap().mapping.columns.query.as_deref(), Some("context"));
        for (name, needle) in [("dpo", "'ranking'"), ("mllm", "'columns.images'"), ("c4", "'subset'"), ("bad", "'formatting' is 'jsonl'"), ("split_file", "a file is read whole"), ("no_samples", "'num_samples' must be a number of records (at least 1), found 0"), ("missing", "no dataset 'missing' (it has: alpaca_en, ")] {
            let e = info.entry(name).unwrap_err();
            assert!(e.starts_with("data/dataset_info.json: ") && e.contains(needle), "{name}: {e}");
        }
    }
}
