//! Prompt templates: how a record becomes the source text the model sees before its answer.

use crate::dataset::Record;

/// A prompt with `{instruction}` and `{input}` placeholders, one for records with an input and
/// one for records without.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub prompt_input: String,
    pub prompt_no_input: String,
}

const STANFORD_HEAD_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. \
Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
const STANFORD_HEAD_NO_INPUT: &str = "Below is an instruction that describes a task. \
Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// Names accepted by [`Template::builtin`].
pub const PROMPT_TEMPLATES: &[&str] = &["alpaca", "alpaca-lora"];

impl Template {
    /// - `alpaca`: stanford_alpaca's PROMPT_DICT, byte for byte.
    /// - `alpaca-lora`: the same with a newline after `### Response:` (tloen/alpaca-lora).
    ///
    /// ChatGLM's and other chat formats are chat templates (`crate::chat`).
    pub fn builtin(name: &str) -> Option<Self> {
        let pair = |with: String, without: String| Some(Self { prompt_input: with, prompt_no_input: without });
        match name {
            "alpaca" => pair(STANFORD_HEAD_INPUT.into(), STANFORD_HEAD_NO_INPUT.into()),
            "alpaca-lora" => pair(format!("{STANFORD_HEAD_INPUT}\n"), format!("{STANFORD_HEAD_NO_INPUT}\n")),
            _ => None,
        }
    }

    /// The source text of `record`. Placeholders are filled in one pass, so braces inside the
    /// record's own text are never interpreted.
    pub fn render(&self, record: &Record) -> String {
        let template = if record.input.is_empty() { &self.prompt_no_input } else { &self.prompt_input };
        let mut out = String::with_capacity(template.len() + record.instruction.len() + record.input.len());
        let mut rest = template.as_str();
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let tail = &rest[start..];
            if let Some(after) = tail.strip_prefix("{instruction}") {
                out.push_str(&record.instruction);
                rest = after;
            } else if let Some(after) = tail.strip_prefix("{input}") {
                out.push_str(&record.input);
                rest = after;
            } else {
                out.push('{');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanford_prompt_is_byte_exact() {
        let record = Record { instruction: "Give three tips for staying healthy.".into(), input: String::new(), output: String::new() };
        assert_eq!(
            Template::builtin("alpaca").unwrap().render(&record),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nGive three tips for staying healthy.\n\n### Response:"
        );
    }

    #[test]
    fn record_braces_are_not_placeholders() {
        let record = Record { instruction: "say {input}".into(), input: "x".into(), output: String::new() };
        let t = Template { prompt_input: "{instruction}|{input}|{other}".into(), prompt_no_input: String::new() };
        assert_eq!(t.render(&record), "say {input}|x|{other}");
    }
}
