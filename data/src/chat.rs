//! Conversations and chat templates: how a multi-turn record becomes ids and labels.
//!
//! A template renders a conversation into [`Piece`]s: text or special tokens, each marked with
//! whether it carries loss. Two ways to turn pieces into ids, as the references do:
//! - **per piece** (THUDM's ChatGLM2/3 and GLM-4 fine-tuning code): every text is encoded on
//!   its own, specials are inserted as ids;
//! - **joined** (transformers' `apply_chat_template`): the pieces are one string, encoded once;
//!   a token carries loss when its bytes overlap a piece that does.
//!
//! An assistant turn's loss covers its content and what ends the turn (`<|im_end|>`,
//! `<|eot_id|>`, ` </s>`, the next role token or EOS), so the model learns to stop.

use std::ops::Range;
use std::path::Path;

use minijinja::value::ValueKind;
use serde_json::Value;

use crate::python::{self, JsonStyle};
use crate::sft::{Example, IGNORE_INDEX};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (ChatGLM3's `observation`, OpenAI's `tool`).
    Observation,
}

impl Role {
    /// The role's name in OpenAI-style messages and in templates.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Observation => "observation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The tools an assistant turn calls (LLaMA-Factory's `function_call` turns, OpenAI's
    /// `tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool's result answers (OpenAI's `tool_call_id`), for templates that pair them
    /// (Mistral's).
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A call of one of the conversation's tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// Usually an object of the arguments by name.
    pub arguments: Value,
    /// OpenAI's call `id`, where the data has one.
    pub id: Option<String>,
}

/// A system message (optional, first), then turns ending with the assistant's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The functions the assistant may call, as bare JSON schemas (`{"name", "description",
    /// "parameters"}`); the dataset reader unwraps OpenAI's `{"type": "function", …}`.
    pub tools: Vec<Value>,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages, tools: Vec::new() }
    }

    /// Whether the conversation offers or calls tools.
    pub fn uses_tools(&self) -> bool {
        !self.tools.is_empty() || self.messages.iter().any(|m| !m.tool_calls.is_empty())
    }

    /// Checks what every template needs: at least one assistant turn, the system message only
    /// first, and an assistant turn last (nothing after it would be learned).
    pub fn validate(&self) -> Result<(), String> {
        let Some(last) = self.messages.last() else { return Err("empty conversation".into()) };
        if let Some(i) = self.messages.iter().skip(1).position(|m| m.role == Role::System) {
            return Err(format!("message {}: a system message may only come first", i + 1));
        }
        if last.role != Role::Assistant {
            return Err(format!("the last message is {}'s; a conversation must end with the assistant's", last.role.name()));
        }
        Ok(())
    }
}

/// Text, or a special token by its text (`<|user|>`), or the tokenizer's EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Token(&'static str),
    Eos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub part: Part,
    pub loss: bool,
}

/// Which assistant turns carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossPolicy {
    /// Only the last assistant turn (LLaMA-Factory's `mask_history`).
    pub last_turn_only: bool,
    /// Every token (alpaca-lora's `train_on_inputs`).
    pub train_on_inputs: bool,
}

/// Names accepted by [`ChatTemplate::named`].
pub const CHAT_TEMPLATES: &[&str] = &["chatglm2", "chatglm3", "glm4", "llama2-chat", "llama3", "chatml", "auto"];

#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// `[Round N]\n\n问：…\n\n答：` (THUDM's ChatGLM2 `build_prompt`).
    ChatGlm2,
    /// `[gMASK] sop` then `<|role|>` + `\n` + content per message (ChatGLM3's `build_chat_input`).
    ChatGlm3,
    /// GLM-4's chat format (`[gMASK]<sop><|role|>\ncontent`).
    Glm4,
    /// Meta's LLaMA-2 chat format, as its HF chat template.
    Llama2Chat,
    /// LLaMA-3's header format.
    Llama3,
    /// `<|im_start|>role\ncontent<|im_end|>\n` (Qwen2, SmolLM2, …).
    ChatMl,
    /// The checkpoint's own Jinja `chat_template`, with its special-token variables.
    Jinja(Box<JinjaTemplate>),
}

impl ChatTemplate {
    /// The template called `name`; `auto` reads `model_dir/tokenizer_config.json`, and a path
    /// ending in `.jinja` is a Jinja chat template of one's own (with the checkpoint's special
    /// tokens), as TRL's `chat_template_path` and LLaMA-Factory's templates put one on any model.
    pub fn named(name: &str, model_dir: &Path) -> Result<Option<Self>, String> {
        Ok(Some(match name {
            "chatglm2" => ChatTemplate::ChatGlm2,
            "chatglm3" => ChatTemplate::ChatGlm3,
            "glm4" => ChatTemplate::Glm4,
            "llama2-chat" => ChatTemplate::Llama2Chat,
            "llama3" => ChatTemplate::Llama3,
            "chatml" => ChatTemplate::ChatMl,
            "auto" => ChatTemplate::Jinja(Box::new(JinjaTemplate::from_dir(model_dir)?)),
            file if is_jinja_file(file) => ChatTemplate::Jinja(Box::new(JinjaTemplate::from_file(Path::new(file), &tokenizer_config(model_dir)?)?)),
            _ => return Ok(None),
        }))
    }

    /// The name recipes give the template.
    pub fn name(&self) -> &'static str {
        match self {
            ChatTemplate::ChatGlm2 => "chatglm2",
            ChatTemplate::ChatGlm3 => "chatglm3",
            ChatTemplate::Glm4 => "glm4",
            ChatTemplate::Llama2Chat => "llama2-chat",
            ChatTemplate::Llama3 => "llama3",
            ChatTemplate::ChatMl => "chatml",
            ChatTemplate::Jinja(_) => "auto",
        }
    }

    /// The special tokens after which the assistant's turn is over, where generation stops
    /// besides EOS: THUDM's chat stops at the next role (`<|user|>`, or `<|observation|>` after a
    /// call); a Jinja template's are its checkpoint's `eos_token_id`s.
    pub fn turn_ends(&self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatGlm3 | ChatTemplate::Glm4 => &["<|user|>", "<|observation|>"],
            ChatTemplate::Llama3 => &["<|eot_id|>"],
            ChatTemplate::ChatMl => &["<|im_end|>"],
            ChatTemplate::ChatGlm2 | ChatTemplate::Llama2Chat | ChatTemplate::Jinja(_) => &[],
        }
    }

    /// Whether `tools` and tool calls render (the others refuse them rather than drop them).
    pub fn renders_tools(&self) -> bool {
        matches!(self, ChatTemplate::ChatGlm3 | ChatTemplate::Glm4 | ChatTemplate::Jinja(_))
    }

    /// The assistant message of `reply`, a generated answer (special tokens kept, the stop token
    /// not), as the conversation holds it for the next turn's prompt: GLM's reply is items split
    /// at `<|assistant|>`, each `metadata\ntext`, where the metadata names a function called with
    /// the JSON text (GLM-4) or a `tool_call(…)` code block (ChatGLM3), as THUDM's
    /// `process_response` reads them; any other reply is its text.
    pub fn reply_message(&self, reply: &str) -> Message {
        if !matches!(self, ChatTemplate::ChatGlm3 | ChatTemplate::Glm4) {
            return Message::new(Role::Assistant, reply);
        }
        let mut message = Message::new(Role::Assistant, "");
        for item in reply.split("<|assistant|>") {
            let (metadata, text) = item.split_once('\n').unwrap_or((item, ""));
            let call = match self {
                ChatTemplate::Glm4 => serde_json::from_str::<Value>(text.trim()).ok().filter(Value::is_object),
                _ => chatglm3_arguments(text),
            };
            match (metadata.trim(), call) {
                ("", _) => message.content.push_str(text.trim()),
                (name, Some(arguments)) => message.tool_calls.push(ToolCall { name: name.to_string(), arguments, id: None }),
                (_, None) => message.content.push_str(item.trim()),
            }
        }
        message
    }

    /// Per-piece encoding (THUDM's code) rather than one string.
    fn per_piece(&self) -> bool {
        matches!(self, ChatTemplate::ChatGlm2 | ChatTemplate::ChatGlm3 | ChatTemplate::Glm4)
    }

    /// The pieces of `conversation`; with `generation_prompt`, the conversation is a prompt
    /// (ending with a user turn) and what starts the assistant's answer is appended.
    pub fn render(&self, conversation: &Conversation, policy: LossPolicy, generation_prompt: bool) -> Result<Vec<Piece>, String> {
        if conversation.uses_tools() && !self.renders_tools() {
            return Err(format!(
                "template '{}' has no tool calls: use template = \"chatglm3\" or \"glm4\" for those models, or \"auto\" with a checkpoint whose chat template renders them (Qwen2.5's, for one)",
                self.name()
            ));
        }
        let messages = &conversation.messages;
        let last_assistant = messages.iter().rposition(|m| m.role == Role::Assistant);
        let trained = |i: usize| messages[i].role == Role::Assistant && (!policy.last_turn_only || Some(i) == last_assistant);
        let mut out = Pieces::default();
        match self {
            ChatTemplate::ChatGlm3 | ChatTemplate::Glm4 => {
                let glm4 = matches!(self, ChatTemplate::Glm4);
                out.token("[gMASK]", false);
                out.token(if glm4 { "<sop>" } else { "sop" }, false);
                if !conversation.tools.is_empty() {
                    out.token("<|system|>", false);
                    let prompt = if glm4 { glm4_tools_prompt(&conversation.tools) } else { chatglm3_tools_prompt(&conversation.tools) };
                    out.item("", prompt, glm4, false);
                }
                for (i, m) in messages.iter().enumerate() {
                    // The role token ends the previous assistant turn.
                    out.token(role_token(m.role), i > 0 && trained(i - 1));
                    // A call is an assistant item of its own, the function's name as its
                    // metadata; THUDM's `process_response` splits a reply into such items at
                    // `<|assistant|>`.
                    let calls = m.tool_calls.iter().map(|call| {
                        let text = if glm4 { python::json(&call.arguments, &JsonStyle { indent: None, sort_keys: false, ensure_ascii: false }) } else { chatglm3_call(call)? };
                        Ok::<_, String>((call.name.as_str(), text))
                    });
                    let text = (m.tool_calls.is_empty() || !m.content.is_empty()).then(|| Ok(("", m.content.clone())));
                    for (k, item) in text.into_iter().chain(calls).enumerate() {
                        let (metadata, content) = item?;
                        if k > 0 {
                            out.token("<|assistant|>", trained(i));
                        }
                        out.item(metadata, content, glm4, trained(i));
                    }
                }
                if generation_prompt {
                    out.token("<|assistant|>", false);
                } else {
                    out.eos(last_assistant.is_some_and(trained));
                }
            }
            ChatTemplate::ChatGlm2 => {
                out.token("[gMASK]", false);
                out.token("sop", false);
                let mut round = 0;
                for (i, m) in messages.iter().enumerate() {
                    match m.role {
                        Role::User => {
                            round += 1;
                            let gap = if round > 1 { "\n\n" } else { "" };
                            out.text(format!("{gap}[Round {round}]\n\n问：{}\n\n答：", m.content), false);
                        }
                        Role::Assistant => out.text(m.content.clone(), trained(i)),
                        role => return Err(format!("template 'chatglm2' has no {} role", role.name())),
                    }
                }
                if !generation_prompt {
                    out.eos(last_assistant.is_some_and(trained));
                }
            }
            ChatTemplate::Llama2Chat => {
                let (system, turns) = split_system(messages);
                for (k, m) in turns.iter().enumerate() {
                    let i = k + usize::from(system.is_some());
                    let user_expected = k % 2 == 0;
                    if (m.role == Role::User) != user_expected || !matches!(m.role, Role::User | Role::Assistant) {
                        return Err(format!("template 'llama2-chat' needs user and assistant turns alternating from user; message {i} is {}'s", m.role.name()));
                    }
                    if m.role == Role::User {
                        let content = match system.filter(|_| k == 0) {
                            Some(system) => format!("<<SYS>>\n{}\n<</SYS>>\n\n{}", system.trim(), m.content.trim()),
                            None => m.content.trim().to_string(),
                        };
                        out.token("<s>", false);
                        out.text(format!("[INST] {content} [/INST]"), false);
                    } else {
                        out.text(format!(" {} ", m.content.trim()), trained(i));
                        out.token("</s>", trained(i));
                    }
                }
            }
            ChatTemplate::Llama3 => {
                out.token("<|begin_of_text|>", false);
                for (i, m) in messages.iter().enumerate() {
                    let role = if m.role == Role::Observation { "ipython" } else { m.role.name() };
                    out.text(format!("<|start_header_id|>{role}<|end_header_id|>\n\n"), false);
                    out.text(m.content.trim().to_string(), trained(i));
                    out.token("<|eot_id|>", trained(i));
                }
                if generation_prompt {
                    out.text("<|start_header_id|>assistant<|end_header_id|>\n\n".into(), false);
                }
            }
            ChatTemplate::ChatMl => {
                for (i, m) in messages.iter().enumerate() {
                    let role = if m.role == Role::Observation { "tool" } else { m.role.name() };
                    out.text(format!("<|im_start|>{role}\n"), false);
                    out.text(m.content.clone(), trained(i));
                    out.token("<|im_end|>", trained(i));
                    out.text("\n".into(), false);
                }
                if generation_prompt {
                    out.text("<|im_start|>assistant\n".into(), false);
                }
            }
            ChatTemplate::Jinja(template) => return template.render(conversation, &trained, generation_prompt),
        }
        Ok(out.pieces)
    }

    /// The text the pieces stand for, specials written out (what `data preview` shows).
    pub fn text(&self, tokenizer: &Tokenizer, pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|p| match &p.part {
                Part::Text(t) => t.clone(),
                Part::Token(t) => t.to_string(),
                Part::Eos => tokenizer.eos_token().unwrap_or_default(),
            })
            .collect()
    }

    /// Ids and labels of `conversation` (already validated), truncated to `cutoff_len`; also
    /// whether it was truncated.
    pub fn example(&self, tokenizer: &Tokenizer, conversation: &Conversation, policy: LossPolicy, cutoff_len: usize) -> Result<(Example, bool), String> {
        let pieces = self.render(conversation, policy, false)?;
        let (input_ids, loss) = self.encode(tokenizer, &pieces)?;
        let mut labels: Vec<i64> =
            input_ids.iter().zip(&loss).map(|(&id, &l)| if l || policy.train_on_inputs { id as i64 } else { IGNORE_INDEX }).collect();
        let truncated = input_ids.len() > cutoff_len;
        let mut input_ids = input_ids;
        input_ids.truncate(cutoff_len);
        labels.truncate(cutoff_len);
        Ok((Example { input_ids, labels }, truncated))
    }

    /// The ids a model is given to answer `conversation`'s last user turn.
    pub fn prompt_ids(&self, tokenizer: &Tokenizer, conversation: &Conversation) -> Result<Vec<u32>, String> {
        let policy = LossPolicy { last_turn_only: false, train_on_inputs: false };
        Ok(self.encode(tokenizer, &self.render(conversation, policy, true)?)?.0)
    }

    /// Ids, and for each whether it carries loss.
    fn encode(&self, tokenizer: &Tokenizer, pieces: &[Piece]) -> Result<(Vec<u32>, Vec<bool>), String> {
        let token_id = |token: &str| tokenizer.token_to_id(token).ok_or_else(|| format!("the tokenizer has no token {token:?}, which this template needs"));
        let eos_id = || tokenizer.eos_id.ok_or_else(|| "the tokenizer has no EOS token".to_string());
        let (mut ids, mut loss) = (Vec::new(), Vec::new());
        if self.per_piece() {
            for piece in pieces {
                let piece_ids = match &piece.part {
                    Part::Text(text) => tokenizer.encode(text, false).map_err(|e| e.to_string())?,
                    Part::Token(token) => vec![token_id(token)?],
                    Part::Eos => vec![eos_id()?],
                };
                loss.extend(std::iter::repeat_n(piece.loss, piece_ids.len()));
                ids.extend(piece_ids);
            }
            return Ok((ids, loss));
        }
        // Joined: one string; specials by their text, which the tokenizer matches.
        let mut text = String::new();
        let mut loss_spans: Vec<Range<usize>> = Vec::new();
        for piece in pieces {
            let start = text.len();
            match &piece.part {
                Part::Text(t) => text.push_str(t),
                Part::Token(token) => {
                    token_id(token)?;
                    text.push_str(token)
                }
                Part::Eos => text.push_str(&tokenizer.eos_token().ok_or("the tokenizer has no EOS token")?),
            }
            if piece.loss && text.len() > start {
                loss_spans.push(start..text.len());
            }
        }
        let (ids, offsets) = tokenizer.encode_with_offsets(&text, false).map_err(|e| e.to_string())?;
        let mut loss: Vec<bool> = offsets.iter().map(|&(s, e)| loss_spans.iter().any(|span| s < span.end && span.start < e.max(s + 1))).collect();
        if let ChatTemplate::Jinja(template) = self
            && template.ends_by_next_token
        {
            // The token after each answer (the next role token) is what ends it; where the
            // template puts a line break before an end token after all but the last answer
            // (Apriel's `\n<|end|>`), through that special token.
            let special = |id: u32| tokenizer.decode(&[id], true).is_ok_and(|text| text.is_empty());
            let blank = |id: u32| tokenizer.decode(&[id], false).is_ok_and(|text| !text.is_empty() && text.trim().is_empty());
            let answers = loss.clone();
            for k in (1..loss.len()).filter(|&k| answers[k - 1] && !answers[k]) {
                let through = (k..ids.len()).find(|&j| !blank(ids[j])).filter(|&j| j > k && special(ids[j]) && !answers[j]).unwrap_or(k);
                loss[k..=through].iter_mut().for_each(|l| *l = true);
            }
        }
        Ok((ids, loss))
    }
}

/// GLM-4's system prompt offering `tools`, as glm-4-9b-chat's `tokenization_chatglm.py` writes it
/// ("GhatGLM" included): each function's schema as `json.dumps(indent=4, ensure_ascii=False)`.
fn glm4_tools_prompt(tools: &[Value]) -> String {
    let mut prompt = String::from("你是一个名为 GhatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具");
    for function in tools {
        let schema = python::json(function, &JsonStyle { indent: Some(4), sort_keys: false, ensure_ascii: false });
        prompt.push_str(&format!("\n\n## {}\n\n{schema}\n在调用上述函数时，请使用 Json 格式表示调用的参数。", function["name"].as_str().unwrap_or_default()));
    }
    prompt
}

/// ChatGLM3's system prompt offering `tools`, as THUDM's tool fine-tuning data (and its OpenAI
/// demo) puts it: the list of schemas as `json.dumps(indent=4, ensure_ascii=False)`.
fn chatglm3_tools_prompt(tools: &[Value]) -> String {
    let schemas = python::json(&Value::Array(tools.to_vec()), &JsonStyle { indent: Some(4), sort_keys: false, ensure_ascii: false });
    format!("Answer the following questions as best as you can. You have access to the following tools:\n{schemas}")
}

/// A ChatGLM3 call's text: Python's `tool_call(name=value, …)` in a python code block, as THUDM's
/// `format_function_call` writes it (values as `repr`); its `process_response` evaluates it.
fn chatglm3_call(call: &ToolCall) -> Result<String, String> {
    let Value::Object(arguments) = &call.arguments else {
        return Err(format!("template 'chatglm3': the arguments of '{}' are not a JSON object; ChatGLM3's calls take them by name", call.name));
    };
    let keywords: Vec<String> = arguments.iter().map(|(name, value)| format!("{name}={}", python::repr(value))).collect();
    Ok(format!("```python\ntool_call({})\n```", keywords.join(", ")))
}

/// The arguments of a ChatGLM3 call's text (see [`chatglm3_call`]), as its `process_response`
/// reads them: the lines between the first and the last.
fn chatglm3_arguments(text: &str) -> Option<Value> {
    let lines: Vec<&str> = text.trim().lines().collect();
    let (name, arguments) = python::read_call(&lines.get(1..lines.len().checked_sub(1)?)?.join("\n"))?;
    (name == "tool_call").then_some(Value::Object(arguments))
}

fn role_token(role: Role) -> &'static str {
    match role {
        Role::System => "<|system|>",
        Role::User => "<|user|>",
        Role::Assistant => "<|assistant|>",
        Role::Observation => "<|observation|>",
    }
}

fn split_system(messages: &[Message]) -> (Option<&str>, &[Message]) {
    match messages.first() {
        Some(m) if m.role == Role::System => (Some(&m.content), &messages[1..]),
        _ => (None, messages),
    }
}

#[derive(Default)]
struct Pieces {
    pieces: Vec<Piece>,
}

impl Pieces {
    fn text(&mut self, text: String, loss: bool) {
        self.pieces.push(Piece { part: Part::Text(text), loss });
    }

    /// A special token: its id in per-piece templates, its text in joined ones.
    fn token(&mut self, token: &'static str, loss: bool) {
        self.pieces.push(Piece { part: Part::Token(token), loss });
    }

    /// THUDM's `build_single_message` after the role token: `metadata` + "\n", then the content,
    /// each encoded on its own (ChatGLM3's SentencePiece pieces); GLM-4's as one text.
    fn item(&mut self, metadata: &str, content: String, glm4: bool, loss: bool) {
        if glm4 {
            self.text(format!("{metadata}\n{content}"), loss);
        } else {
            self.text(format!("{metadata}\n"), loss);
            self.text(content, loss);
        }
    }

    fn eos(&mut self, loss: bool) {
        self.pieces.push(Piece { part: Part::Eos, loss });
    }
}

/// A checkpoint's `chat_template` (transformers' `apply_chat_template`), rendered with
/// minijinja and Python-compatible string methods.
#[derive(Debug, Clone)]
pub struct JinjaTemplate {
    /// The compiled template "chat", with transformers' filters and functions; compiled once,
    /// as rendering a conversation renders it 1 + 2 × its assistant turns times.
    env: std::sync::Arc<minijinja::Environment<'static>>,
    /// The template puts nothing after an answer (GLM's): the next role token ends it, or EOS
    /// at the end, trained as THUDM's fine-tuning code trains them.
    ends_by_next_token: bool,
    /// `bos_token`, `eos_token`… as the template sees them.
    specials: Vec<(String, String)>,
}

/// The file in an adapter's folder that holds the Jinja template it was trained with (a
/// `.jinja` `data.template`), as transformers' tokenizer names it.
pub const ADAPTER_CHAT_TEMPLATE: &str = "chat_template.jinja";

/// Whether a template name is the path of a Jinja file.
pub fn is_jinja_file(name: &str) -> bool {
    name.ends_with(".jinja")
}

/// `dir/tokenizer_config.json`, or an empty object where there is none.
fn tokenizer_config(dir: &Path) -> Result<Value, String> {
    let path = dir.join("tokenizer_config.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Object(Default::default())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl JinjaTemplate {
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("template 'auto' reads {}: {e}", path.display()))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
        Self::from_config(&config, &path, Some(&dir.join("chat_template.jinja")))
    }

    /// The template in `file`, with the special tokens of a `tokenizer_config.json` held as
    /// `config`.
    pub fn from_file(file: &Path, config: &Value) -> Result<Self, String> {
        let source = std::fs::read_to_string(file).map_err(|e| format!("chat template {}: {e}", file.display()))?;
        let mut config = if config.is_object() { config.clone() } else { Value::Object(Default::default()) };
        config["chat_template"] = Value::String(source);
        Self::from_config(&config, file, None).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// The template of a `tokenizer_config.json` held as `config` (`path` names it in errors),
    /// or of `jinja_file` when the config has none.
    pub fn from_config(config: &Value, path: &Path, jinja_file: Option<&Path>) -> Result<Self, String> {
        let source = match &config["chat_template"] {
            Value::String(s) => s.clone(),
            // A list of named templates: the "default" one.
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("{}: chat_template has no \"default\" entry", path.display()))?,
            _ => jinja_file
                .and_then(|jinja| std::fs::read_to_string(jinja).ok())
                .ok_or_else(|| format!("{}: no chat_template (and no chat_template.jinja): name a template instead of 'auto'", path.display()))?,
        };
        let specials = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|key| {
                let value = &config[*key];
                let text = value.as_str().or_else(|| value["content"].as_str())?;
                Some((key.to_string(), text.to_string()))
            })
            .collect();
        let mut template = Self::compile(source, specials)?;
        // Checked on a conversation every template takes (some index `messages[0]`).
        template.render_string(&[Message::new(Role::User, "Hi")], &[], true)?;
        let probe = [Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Hello\u{e000}")];
        template.ends_by_next_token = template.render_string(&probe, &[], false).is_ok_and(|text| text.trim_end().ends_with('\u{e000}'));
        Ok(template)
    }

    /// `source` compiled in an environment as transformers sets up Jinja's: blocks trimmed,
    /// `raise_exception`, `strftime_now`, Python's `tojson`, and `{% generation %}` blocks
    /// (TRL's assistant masks) rendered as their content.
    fn compile(source: String, specials: Vec<(String, String)>) -> Result<Self, String> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| format!("chat_template: {e}"))?);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", strftime_now);
        // Jinja2's tests, which differ from minijinja's: None is not iterable; strings and
        // dicts are sequences (they have len and []).
        env.add_test("iterable", |v: minijinja::Value| v.is_undefined() || matches!(v.kind(), ValueKind::String | ValueKind::Bytes | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable));
        env.add_test("sequence", |v: minijinja::Value| v.is_undefined() || matches!(v.kind(), ValueKind::String | ValueKind::Bytes | ValueKind::Seq | ValueKind::Map));
        env.add_filter("tojson", python_tojson);
        // Jinja2 prints a float as Python's `str` does (`1e+20`, `1.5e-07`), minijinja positionally.
        env.set_formatter(|out, state, value| match python_float(value) {
            Some(text) => Ok(out.write_str(&text)?),
            None => minijinja::escape_formatter(out, state, value),
        });
        env.add_filter("string", |state: &minijinja::State, value: minijinja::Value| match python_float(&value) {
            Some(text) => Ok(minijinja::Value::from(text)),
            None => minijinja::filters::string(state, &value),
        });
        env.add_template_owned("chat", without_generation_tags(&source)).map_err(|e| format!("chat_template: {e}"))?;
        Ok(Self { env: std::sync::Arc::new(env), ends_by_next_token: false, specials })
    }

    /// The template's text for `messages`, in transformers' message format: a tool's result
    /// has role `tool`, an assistant's calls are its `tool_calls`, and `tools` are passed as
    /// `{"type": "function", "function": schema}`.
    fn render_string(&self, messages: &[Message], tools: &[Value], generation_prompt: bool) -> Result<String, String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let role = if m.role == Role::Observation { "tool" } else { m.role.name() };
                let mut message = serde_json::json!({"role": role, "content": m.content});
                if !m.tool_calls.is_empty() {
                    let calls = m.tool_calls.iter().map(|c| {
                        let mut call = serde_json::json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}});
                        if let Some(id) = &c.id {
                            call["id"] = Value::String(id.clone());
                        }
                        call
                    });
                    message["tool_calls"] = Value::Array(calls.collect());
                }
                if let Some(id) = &m.tool_call_id {
                    message["tool_call_id"] = Value::String(id.clone());
                }
                message
            })
            .collect();
        let mut context: serde_json::Map<String, Value> =
            self.specials.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        context.insert("messages".into(), Value::Array(messages));
        // transformers passes `tools` and `documents` as None when there are none.
        let wrapped = tools.iter().map(|function| serde_json::json!({"type": "function", "function": function}));
        context.insert("tools".into(), if tools.is_empty() { Value::Null } else { Value::Array(wrapped.collect()) });
        context.insert("documents".into(), Value::Null);
        context.insert("add_generation_prompt".into(), Value::Bool(generation_prompt));
        let template = self.env.get_template("chat").map_err(|e| format!("chat_template: {e}"))?;
        template.render(minijinja::value::Serde(&context)).map_err(|e| format!("chat_template: {e}"))
    }

    /// One text piece per stretch between assistant turns, cut from the text of the whole
    /// conversation. An assistant turn's text is what rendering it adds to the conversation
    /// before it with the generation prompt, found in the whole text by [`turn_span`] where the
    /// template renders a turn differently once later messages follow (thinking templates).
    fn render(&self, conversation: &Conversation, trained: &dyn Fn(usize) -> bool, generation_prompt: bool) -> Result<Vec<Piece>, String> {
        let (messages, tools) = (&conversation.messages, &conversation.tools);
        let full = self.render_string(messages, tools, generation_prompt)?;
        // A template without tools drops them silently: each tool and call must be in the text.
        for tool in tools {
            let name = tool["name"].as_str().unwrap_or_default();
            if !full.contains(name) {
                return Err(format!("template 'auto': the checkpoint's chat_template does not render the tools (no '{name}' in its text); use a checkpoint whose template does"));
            }
        }
        let mut pieces = Vec::new();
        let mut done = 0;
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == Role::Assistant) {
            let before = self.render_string(&messages[..i], tools, true)?;
            let through = self.render_string(&messages[..=i], tools, false)?;
            // The texts of the messages it answers, which its span must not hold (unless the
            // answer repeats them).
            let asked: Vec<&str> = messages[..i].iter().rev().take_while(|p| p.role != Role::Assistant).map(|p| p.content.trim()).filter(|c| c.chars().count() >= 4 && !m.content.contains(c)).collect();
            let Some(span) = locate_turn(&full, done, &before, &through, m, &asked) else {
                return Err(format!(
                    "template 'auto': the checkpoint's chat_template does not render message {i} ({}) where the messages before it end; name a template instead",
                    m.role.name()
                ));
            };
            if let Some(call) = m.tool_calls.iter().find(|call| !full[span.clone()].contains(call.name.as_str())) {
                return Err(format!("template 'auto': the checkpoint's chat_template does not render tool calls (message {i}'s call of '{}' is not in its text); use a checkpoint whose template does", call.name));
            }
            pieces.push(Piece { part: Part::Text(full[done..span.start].to_string()), loss: false });
            pieces.push(Piece { part: Part::Text(full[span.clone()].to_string()), loss: trained(i) });
            done = span.end;
        }
        pieces.push(Piece { part: Part::Text(full[done..].to_string()), loss: false });
        pieces.retain(|p| p.part != Part::Text(String::new()));
        if self.ends_by_next_token && !generation_prompt && full[done..].trim().is_empty() {
            let last = messages.len() - 1;
            pieces.push(Piece { part: Part::Eos, loss: messages[last].role == Role::Assistant && trained(last) });
        }
        Ok(pieces)
    }
}

/// Where an assistant turn lies in `full`, the whole conversation's text, given `before`, the
/// messages before it with the generation prompt, and `through`, the conversation ending with it.
/// Where each is a prefix of the next (most templates) that is `before.len()..through.len()`.
/// Thinking templates break this both ways, and the span is then:
/// - from where `full` leaves `before`: the generation prompt opens a `<think>` that an answer
///   rendered among later messages lacks (DeepSeek-R1, GLM-4.7, Gemma 4, Command A), or the
///   message before the answer ends differently when it ends the prompt (Hermes' tool results):
///   the prompt's rest is then skipped where it follows within its own length;
/// - for as long as `full` goes on as the turn does when it is the last, or, where a template
///   adds to the last turn only (Qwen3's empty `<think></think>`), as long as the end of it.
fn turn_span(full: &str, before: &str, through: &str) -> Range<usize> {
    let common = common_prefix(full, before);
    let rest = &before[common..];
    let start = match full[common..].find(rest) {
        Some(skip) if !rest.is_empty() && skip <= rest.len() => common + skip + rest.len(),
        _ => common,
    };
    // The turn as the last message: what `through` adds to `before` (or to where they part).
    let last = &through[common_prefix(through, before).min(through.len())..];
    let after = &full[start..];
    let same_start = common_prefix(after, last);
    let same_end = (0..=last.len()).filter(|&k| last.is_char_boundary(k)).map(|k| &last[k..]).find(|tail| after.starts_with(tail)).map_or(0, str::len);
    start..start + same_start.max(same_end)
}

/// Where assistant message `answer` lies in `full`, the whole conversation's text, after `done`
/// (the end of the turn before it), given `before` (the messages before it, with the generation
/// prompt) and `through` (the conversation ending with it); the span holds none of `asked`.
fn locate_turn(full: &str, done: usize, before: &str, through: &str, answer: &Message, asked: &[&str]) -> Option<Range<usize>> {
    let said = !answer.content.trim().is_empty() || !answer.tool_calls.is_empty();
    // A template that moves the system prompt renders the question differently in `through`.
    let found = |span: &Range<usize>| span.start >= done && (!said || !span.is_empty()) && !asked.iter().any(|c| full[span.clone()].contains(c));
    // Where the template renders earlier messages differently once later ones follow, the turn
    // is looked for after `done`, from a cut of `before`: where `before` takes up `full` again
    // (Qwen3.5 and Step 3.5 think only in the turns after the last query), or else the longest
    // end of `before` found there (Mistral's tools and system prompt go before the last query
    // only). Such a span must hold the answer's text.
    let from_cut = |from: usize, cut: usize| {
        // `through` ends with the same messages' text, where it renders them as `before` does.
        let through_cut = if common_prefix(through, before) >= cut { Some(cut) } else { through.rfind(&before[cut..]) };
        through_cut.map(|t| turn_span(&full[from..], &before[cut..], &through[t..])).map(|span| from + span.start..from + span.end)
    };
    let holds_answer = |span: &Range<usize>| found(span) && full[span.clone()].contains(answer.content.trim());
    Some(turn_span(full, before, through))
        .filter(found)
        .or_else(|| resumption(&full[done..], before).and_then(|cut| from_cut(done, cut)).filter(holds_answer))
        .or_else(|| longest_end(&full[done..], before).and_then(|(at, cut)| from_cut(done + at, cut)).filter(holds_answer))
}

/// Where in `before` the text `rest` (the whole conversation's text after the turn before an
/// answer) starts: the place with the longest common prefix with it, the last one of equals.
fn resumption(rest: &str, before: &str) -> Option<usize> {
    let first = rest.chars().next()?;
    before.char_indices().filter(|&(_, c)| c == first).map(|(q, _)| (common_prefix(rest, &before[q..]), q)).max().map(|(_, q)| q)
}

/// The longest end of `before` that `rest` holds: where it is in `rest` (its first place) and
/// where it starts in `before`.
fn longest_end(rest: &str, before: &str) -> Option<(usize, usize)> {
    // An end found means every shorter end is found too: halve on the cut.
    let ends: Vec<usize> = before.char_indices().map(|(i, _)| i).collect();
    let (mut found, mut missing) = (if rest.contains(before) { 0 } else { ends.len() }, 0);
    while found > missing + 1 {
        let mid = (found + missing) / 2;
        if rest.contains(&before[ends[mid]..]) { found = mid } else { missing = mid }
    }
    let cut = *ends.get(found)?;
    Some((rest.find(&before[cut..])?, cut))
}

/// The length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// transformers' `strftime_now(format)`: the local time in strftime's format, or the time
/// `SOURCE_DATE_EPOCH` names (UTC), so that a recipe renders the same text on any day.
fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    let pinned = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse::<i64>().ok());
    strftime(&format, pinned)
}

/// The time `epoch` names (seconds, UTC), or the local time now, in strftime's `format`.
fn strftime(format: &str, epoch: Option<i64>) -> Result<String, minijinja::Error> {
    let items = chrono::format::StrftimeItems::new(format)
        .parse()
        .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("strftime_now: invalid format {format:?}")))?;
    Ok(match epoch.and_then(|secs| chrono::DateTime::from_timestamp(secs, 0)) {
        Some(time) => time.format_with_items(items.iter()).to_string(),
        None => chrono::Local::now().format_with_items(items.iter()).to_string(),
    })
}

/// `source` with TRL's `{% generation %}` … `{% endgeneration %}` tags (transformers' extension,
/// which minijinja cannot add) turned into an always-true `if`, whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = tag[2..end].trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        let replacement = match inner {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(keyword) => out.push_str(&tag[..end + 2].replacen(inner, keyword, 1)),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A float's text as Python's `str` writes it; `None` for any other value.
fn python_float(value: &minijinja::Value) -> Option<String> {
    let x = f64::try_from(value.clone()).ok().filter(|x| x.is_finite())?;
    (value.kind() == ValueKind::Number && !value.is_integer()).then(|| python::float(x))
}

/// Jinja's `tojson` as transformers overrides it: Python's `json.dumps` (`", "` and `": "`
/// between items, keys in their order, characters as they are, nothing HTML-escaped), with its
/// `indent`, `sort_keys` and `ensure_ascii` arguments.
fn python_tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let value = serde_json::to_value(&value).map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = JsonStyle { indent, sort_keys: sort_keys.unwrap_or(false), ensure_ascii: ensure_ascii.unwrap_or(false) };
    Ok(minijinja::Value::from_safe_string(python::json(&value, &style)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(turns: &[(Role, &str)]) -> Conversation {
        Conversation::new(turns.iter().map(|&(role, content)| Message::new(role, content)).collect())
    }

    fn texts(pieces: &[Piece]) -> Vec<(String, bool)> {
        pieces
            .iter()
            .map(|p| {
                let text = match &p.part {
                    Part::Text(t) => t.clone(),
                    Part::Token(t) => t.to_string(),
                    Part::Eos => "<eos>".into(),
                };
                (text, p.loss)
            })
            .collect()
    }

    const ALL: LossPolicy = LossPolicy { last_turn_only: false, train_on_inputs: false };

    #[test]
    fn chatglm3_trains_every_answer_and_what_ends_it() {
        let c = conversation(&[(Role::User, "q1"), (Role::Assistant, "a1"), (Role::User, "q2"), (Role::Assistant, "a2")]);
        let pieces = texts(&ChatTemplate::ChatGlm3.render(&c, ALL, false).unwrap());
        let trained: Vec<&str> = pieces.iter().filter(|(_, l)| *l).map(|(t, _)| t.as_str()).collect();
        assert_eq!(trained, ["\n", "a1", "<|user|>", "\n", "a2", "<eos>"]);
        let last = texts(&ChatTemplate::ChatGlm3.render(&c, LossPolicy { last_turn_only: true, ..ALL }, false).unwrap());
        let trained: Vec<&str> = last.iter().filter(|(_, l)| *l).map(|(t, _)| t.as_str()).collect();
        assert_eq!(trained, ["\n", "a2", "<eos>"]);
    }

    #[test]
    fn chatglm2_rounds_match_build_prompt() {
        let c = conversation(&[(Role::User, "q1"), (Role::Assistant, "a1"), (Role::User, "q2"), (Role::Assistant, "a2")]);
        let pieces = texts(&ChatTemplate::ChatGlm2.render(&c, ALL, false).unwrap());
        let text: String = pieces.iter().skip(2).map(|(t, _)| t.as_str()).collect();
        assert_eq!(text, "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：a2<eos>");
        let system = conversation(&[(Role::System, "s"), (Role::User, "q"), (Role::Assistant, "a")]);
        assert!(ChatTemplate::ChatGlm2.render(&system, ALL, false).unwrap_err().contains("no system role"));
    }

    #[test]
    fn llama2_chat_refuses_assistant_first() {
        let c = conversation(&[(Role::Assistant, "a"), (Role::User, "q"), (Role::Assistant, "b")]);
        let e = ChatTemplate::Llama2Chat.render(&c, ALL, false).unwrap_err();
        assert!(e.contains("message 0 is assistant's"), "{e}");
        let ok = conversation(&[(Role::System, "S"), (Role::User, "q"), (Role::Assistant, "a")]);
        let text: String = texts(&ChatTemplate::Llama2Chat.render(&ok, ALL, false).unwrap()).into_iter().map(|(t, _)| t).collect();
        assert_eq!(text, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s>");
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(Conversation::default().validate().unwrap_err().contains("empty"));
        let e = conversation(&[(Role::User, "q"), (Role::System, "s"), (Role::Assistant, "a")]).validate().unwrap_err();
        assert!(e.contains("message 1"), "{e}");
        let e = conversation(&[(Role::User, "q")]).validate().unwrap_err();
        assert!(e.contains("must end with the assistant"), "{e}");
    }

    /// Outputs of Python's `json.dumps`, which transformers' `tojson` calls.
    #[test]
    fn tojson_writes_what_python_writes() {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", python_tojson);
        let value = serde_json::json!({"b": [1, 2.5, {"x": null}], "a": "é\n\"<>&", "e": [], "f": {}, "t": true});
        let render = |source: &str| env.render_str(source, minijinja::context! { v => minijinja::value::Serde(&value), s => "😀é" }).unwrap();
        assert_eq!(render("{{ v | tojson }}"), r#"{"b": [1, 2.5, {"x": null}], "a": "é\n\"<>&", "e": [], "f": {}, "t": true}"#);
        assert_eq!(
            render("{{ v | tojson(indent=2, sort_keys=true) }}"),
            "{\n  \"a\": \"é\\n\\\"<>&\",\n  \"b\": [\n    1,\n    2.5,\n    {\n      \"x\": null\n    }\n  ],\n  \"e\": [],\n  \"f\": {},\n  \"t\": true\n}"
        );
        assert_eq!(render("{{ s | tojson(ensure_ascii=true) }}"), r#""\ud83d\ude00\u00e9""#);
    }

    fn jinja(source: &str) -> JinjaTemplate {
        JinjaTemplate::compile(source.into(), vec![]).unwrap()
    }

    /// transformers' Jinja settings: blocks trimmed, `tools` and `documents` None when absent,
    /// Jinja2's `iterable` and `sequence` tests, `{% generation %}` rendered as its content.
    #[test]
    fn jinja_renders_as_transformers_does() {
        let c = conversation(&[(Role::User, "q"), (Role::Assistant, "a")]);
        let render = |source: &str| jinja(source).render_string(&c.messages, &[], false).unwrap();
        assert_eq!(render("{% for m in messages %}\n  {% if m.role == 'user' %}\n<{{ m.content }}>\n  {% endif %}\n{% endfor %}"), "<q>\n");
        assert_eq!(render("{{ tools is none }} {{ documents is none }} {{ tools is iterable }} {{ 'ab' is sequence }} {{ {} is sequence }}"), "True True False True True");
        assert_eq!(render("{%- for m in messages %}{%- generation -%}\n {{ m.content }}{% endgeneration %}{% endfor %}"), "qa");
        assert_eq!(render("{{ 1e20 }} {{ 1.5e-7 | string }} {{ 2.0 }} {{ 3 | string }} {{ [0.1] | tojson(ensure_ascii=true) }} {{ '\x7f' | tojson(ensure_ascii=true) }}"), r#"1e+20 1.5e-07 2.0 3 [0.1] "\u007f""#);
    }

    #[test]
    fn strftime_formats_a_pinned_time() {
        // 2024-07-26 00:00:00 UTC.
        assert_eq!(strftime("%d %b %Y", Some(1_721_952_000)).unwrap(), "26 Jul 2024");
        assert!(strftime("%Q", None).unwrap_err().to_string().contains("invalid format"));
    }

    /// Templates that render a turn differently once later messages follow: each answer's span
    /// is its text in the whole conversation, with what ends it.
    #[test]
    fn thinking_templates_train_the_answers_as_the_whole_text_has_them() {
        let c = conversation(&[(Role::User, "q1"), (Role::Assistant, "a1"), (Role::User, "q2"), (Role::Assistant, "a2")]);
        let spans = |source: &str| {
            let pieces = texts(&jinja(source).render(&c, &|i| i % 2 == 1, false).unwrap());
            pieces.into_iter().filter(|(_, loss)| *loss).map(|(text, _)| text).collect::<Vec<_>>()
        };
        // Qwen3: an empty thought on the last answer only.
        let qwen3 = "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}{{ m.content }}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        assert_eq!(spans(qwen3), ["a1<end>", "<think></think>a2<end>"]);
        // DeepSeek-R1: the generation prompt opens a thought that rendered answers lack.
        let r1 = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant><think>{% endif %}";
        assert_eq!(spans(r1), ["a1<eos>", "a2<eos>"]);
        // Hermes: the message before an answer ends differently when it ends the prompt.
        let hermes = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'user' and not loop.last %}{{ '\n' }}{% endif %}<end>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        assert_eq!(spans(hermes), ["a1<end>", "a2<end>"]);
        // Qwen3.5: every answer after the last query thinks, so an earlier answer renders
        // differently once a later query follows.
        let qwen35 = "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}\
            {% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and loop.index0 > ns.last %}<think></think>{% endif %}{{ m.content }}<end>{% endfor %}\
            {% if add_generation_prompt %}<assistant><think>{% endif %}";
        let c = conversation(&[(Role::User, "q1"), (Role::Assistant, "a1"), (Role::Observation, "r1"), (Role::Assistant, "a2"), (Role::User, "q2"), (Role::Assistant, "a3")]);
        let pieces = texts(&jinja(qwen35).render(&c, &|i| c.messages[i].role == Role::Assistant, false).unwrap());
        assert_eq!(pieces.iter().map(|(text, _)| text.as_str()).collect::<String>(), "<user>q1<end><assistant>a1<end><tool>r1<end><assistant>a2<end><user>q2<end><assistant><think></think>a3<end>");
        let trained: Vec<_> = pieces.iter().filter(|(_, loss)| *loss).map(|(text, _)| text.as_str()).collect();
        assert_eq!(trained, ["a1<end>", "a2<end>", "</think>a3<end>"]);
        // Mistral: the system prompt goes before the last query only.
        let mistral = "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}\
            {% for m in messages %}{% if m.role == 'user' %}[INST]{% if loop.index0 == ns.last %}(sys) {% endif %}{{ m.content }}[/INST]{% else %}{{ m.content }}</s>{% endif %}{% endfor %}";
        let c = conversation(&[(Role::User, "q1"), (Role::Assistant, "a1"), (Role::User, "q2"), (Role::Assistant, "a2")]);
        let pieces = texts(&jinja(mistral).render(&c, &|i| i % 2 == 1, false).unwrap());
        assert_eq!(pieces, [("[INST]q1[/INST]", false), ("a1</s>", true), ("[INST](sys) q2[/INST]", false), ("a2</s>", true)].map(|(text, loss)| (text.to_string(), loss)));
        // And a conversation ending with an answer (no query last) loses that system prompt:
        // `before` has it, the whole text and `through` do not.
        let mistral = "{% for m in messages %}{% if m.role == 'system' %}{% elif m.role == 'user' %}[INST]{% if loop.last and messages[0].role == 'system' %}{{ messages[0].content }} {% endif %}{{ m.content }}[/INST]{% else %}{{ m.content }}</s>{% endif %}{% endfor %}";
        let c = conversation(&[(Role::System, "Be terse."), (Role::User, "Name a prime."), (Role::Assistant, "7"), (Role::User, "Another one?"), (Role::Assistant, "11")]);
        let pieces = texts(&jinja(mistral).render(&c, &|i| c.messages[i].role == Role::Assistant, false).unwrap());
        assert_eq!(pieces, [("[INST]Name a prime.[/INST]", false), ("7</s>", true), ("[INST]Another one?[/INST]", false), ("11</s>", true)].map(|(text, loss)| (text.to_string(), loss)));
    }

    #[test]
    fn glm_replies_are_read_back_as_thudm_reads_them() {
        let reply = ChatTemplate::Glm4.reply_message("get_time\n{\"city\": \"北京\"}<|assistant|>get_weather\n{\"city\": \"北京\"}");
        assert_eq!((reply.content.as_str(), reply.tool_calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()), ("", vec!["get_time", "get_weather"]));
        assert_eq!(reply.tool_calls[1].arguments, serde_json::json!({"city": "北京"}));
        // An answer starts with the newline the template puts after the role token.
        let answer = ChatTemplate::Glm4.reply_message("\n你好！");
        assert_eq!((answer.content.as_str(), answer.tool_calls.len()), ("你好！", 0));
        assert_eq!(ChatTemplate::ChatGlm3.reply_message("\n Hi").content, "Hi");
        assert_eq!(ChatTemplate::Glm4.reply_message("no call\nhere").content, "no call\nhere");
        assert_eq!(ChatTemplate::ChatMl.reply_message("\nas is").content, "\nas is");
    }

    #[test]
    fn jinja_spans_are_the_assistant_turns() {
        let source = "{% for m in messages %}<{{ m.role }}>{{ m.content.strip() }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let template = JinjaTemplate::compile(source.into(), vec![]).unwrap();
        let c = conversation(&[(Role::User, " q "), (Role::Assistant, "a")]);
        let pieces = texts(&template.render(&c, &|i| i == 1, false).unwrap());
        assert_eq!(pieces, [("<user>q</s><assistant>".to_string(), false), ("a</s>".to_string(), true)]);
    }
}
