//! `ember chat`: a conversation with a base model and optionally an adapter, one message a line
//! of standard input (LLaMA-Factory's `chat`, llama.cpp's conversation mode). The KV cache is
//! kept between turns: each turn runs only the tokens the conversation added.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use ember_adapters::AdaptedModel;
use ember_data::{Conversation, Format, Message, Record, Role, Sample, Tokenizer};
use ember_models::BaseModel;
use ember_models::LoadDtype;
use ember_models::generate::{GenerationOptions, Session};
use serde_json::json;

use crate::bad_input;

pub struct Request<'a> {
    pub base: &'a Path,
    pub adapter: Option<&'a Path>,
    pub template: &'a str,
    pub system: Option<&'a str>,
    /// A JSON file of function schemas.
    pub tools: Option<&'a Path>,
    pub options: GenerationOptions,
    pub device: &'a str,
    /// One JSON object a turn instead of the streamed answer.
    pub json: bool,
}

/// What the user can type besides a message.
const COMMANDS: &str = "/tool RESULT gives a tool call's result back, /clear starts a new conversation, /exit (or end of input) ends";

pub fn run(request: &Request) -> anyhow::Result<()> {
    let device = crate::device(request.device)?;
    let tokenizer = ember_models::load_tokenizer(request.base)?;
    let format = crate::format(request.template, request.base, request.adapter)?;
    match format {
        Format::Text => return Err(bad_input(anyhow::anyhow!("--template text is plain text, not a conversation: give a chat or prompt template"))),
        Format::Prompt(_) if request.system.is_some() || request.tools.is_some() => {
            let option = if request.system.is_some() { "--system" } else { "--tools" };
            return Err(bad_input(anyhow::anyhow!("{option} needs a chat template; '{}' is a prompt template", request.template)));
        }
        Format::Chat(ref template) if request.tools.is_some() && !template.renders_tools() => {
            return Err(bad_input(anyhow::anyhow!(
                "--tools needs a chat template that renders tools (chatglm3, glm4, auto of a checkpoint whose template has them, or a .jinja file); '{}' has no tool calls",
                request.template
            )));
        }
        _ => {}
    }
    let tools = match request.tools {
        Some(path) => ember_data::read_tools(path).map_err(|e| bad_input(anyhow::anyhow!(e)))?,
        None => Vec::new(),
    };
    if !tools.is_empty() {
        // A template that drops the tools is refused now, not at the first message.
        prompt_ids(&format, &tokenizer, &[Message::new(Role::User, "?")], &tools)?;
    }
    let base = BaseModel::load(request.base, LoadDtype::F32, &device)?;
    let mut options = request.options.clone();
    options.stop_ids.extend(crate::generate::stop_ids(request.base, &base, &tokenizer, Some(&format))?);
    let model = match request.adapter {
        Some(dir) => ember_adapters::Method::load(dir, base, &device)?.0,
        None => AdaptedModel::base_only(base),
    }
    // LoRA is folded in for generation: no low-rank matmuls per token.
    .into_inference();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        let history = match format {
            Format::Prompt(_) => format!("'{}' is a prompt template: each message is answered on its own", request.template),
            _ => "the conversation is kept".into(),
        };
        eprintln!("ember chat ({history}); {COMMANDS}");
    }
    let system: Vec<Message> = request.system.map(|s| Message::new(Role::System, s)).into_iter().collect();
    let mut messages = system.clone();
    let mut session = Session::default();
    let (mut turn, mut line) = (0, String::new());
    let mut stdout = std::io::stdout().lock();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/exit" => return Ok(()),
            "/clear" => {
                messages.clone_from(&system);
                session = Session::default();
                continue;
            }
            text => match text.strip_prefix("/tool") {
                // A call's result answers the model's last turn, as a record's tool turn does.
                Some(result) if result.is_empty() || result.starts_with(char::is_whitespace) => {
                    if messages.last().is_none_or(|m| m.role != Role::Assistant) {
                        eprintln!("ember chat: /tool gives back the result of a call the model made; there is no answer of the model's to follow");
                        continue;
                    }
                    messages.push(Message::new(Role::Observation, result.trim()));
                }
                _ => messages.push(Message::new(Role::User, text)),
            },
        }
        turn += 1;
        let prompt = prompt_ids(&format, &tokenizer, &messages, &tools)?;
        let mut stream = Stream { tokenizer: &tokenizer, ids: Vec::new(), shown: String::new(), out: (!request.json).then_some(&mut stdout) };
        let ids = session.generate(|ids, cache| model.next_token_logits(ids, cache), &prompt, &options, &device, |token| stream.push(token));
        let answer = tokenizer.decode(&ids, true)?;
        match stream.out.take() {
            Some(out) => {
                writeln!(out, "{}", answer.strip_prefix(stream.shown.as_str()).unwrap_or_default())?;
                out.flush()?;
            }
            None => {
                let result = json!({"turn": turn, "prompt_tokens": prompt.len(), "reused_tokens": session.reused(), "answer_tokens": ids.len(), "answer": answer});
                writeln!(stdout, "{result}")?;
            }
        }
        match &format {
            Format::Chat(template) => {
                // The reply as generated, special tokens kept but the stop token, read back as
                // the template reads it (GLM's calls).
                let reply = match ids.split_last() {
                    Some((last, rest)) if options.stop_ids.contains(last) => rest,
                    _ => &ids[..],
                };
                messages.push(template.reply_message(&tokenizer.decode(reply, false)?));
            }
            _ => messages.clone_from(&system),
        }
    }
}

/// The prompt of `messages` (the last one the user's or a tool's) up to where the answer starts.
fn prompt_ids(format: &Format, tokenizer: &Tokenizer, messages: &[Message], tools: &[serde_json::Value]) -> anyhow::Result<Vec<u32>> {
    let sample = match format {
        Format::Prompt(_) => {
            let instruction = messages.last().map(|m| m.content.clone()).unwrap_or_default();
            Sample::Instruction(Record { instruction, input: String::new(), output: String::new() })
        }
        // The answer to come, empty: the prompt stops where it starts.
        _ => {
            let answer = Message::new(Role::Assistant, "");
            Sample::Chat(Conversation { messages: messages.iter().cloned().chain([answer]).collect(), tools: tools.to_vec() })
        }
    };
    format.prompt_ids(tokenizer, &sample).map_err(|e| bad_input(anyhow::anyhow!(e)))
}

/// An answer written out as its tokens come: the decoded text so far, once it is whole
/// characters (a token can hold part of one).
struct Stream<'a, W: Write> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    shown: String,
    out: Option<&'a mut W>,
}

impl<W: Write> Stream<'_, W> {
    fn push(&mut self, token: u32) {
        let Some(out) = self.out.as_mut() else { return };
        self.ids.push(token);
        let Ok(text) = self.tokenizer.decode(&self.ids, true) else { return };
        if let Some(new) = text.strip_prefix(self.shown.as_str()).filter(|_| !text.ends_with('\u{FFFD}')) {
            // A failed write shows again at the answer's end, where it is an error.
            let _ = out.write_all(new.as_bytes()).and_then(|()| out.flush());
            self.shown = text;
        }
    }
}
