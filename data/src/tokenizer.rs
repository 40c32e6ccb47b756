//! A tokenizer plus the special-token ids a trainer needs.
//!
//! `tokenizer.json` is read as it is. Without one (or with `use_fast: false` in
//! `tokenizer_config.json`, as transformers reads it), `tokenizer.model` is converted on load:
//! a SentencePiece model (LLaMA, Chinese-LLaMA, ChatGLM2/3 with THUDM's added specials) or
//! GLM-4's tiktoken ranks. `ember import tokenizer` writes the same conversion to disk.
//!
//! The ids come, in this order, from `tokenizer_config.json` (token strings looked up in the
//! vocabulary), `generation_config.json` and `config.json` (numeric ids), as transformers does,
//! and last from the converted model's own defaults.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::sentencepiece::{self, Affixes, BpeEncoder, ModelProto};
use crate::tiktoken;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: missing file", .0.display())]
    Missing(PathBuf),
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// sentencepiece's own BPE, for a BPE `tokenizer.model` (see [`BpeEncoder`]); `inner` then
    /// still decodes and looks up ids.
    native: Option<NativeBpe>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// Which tokenizer a `tokenizer.model` is, which decides the specials added to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// SentencePiece as LLaMA's `LlamaTokenizer`: BOS per `add_bos_token`.
    SentencePiece,
    /// THUDM's ChatGLM2 tokenizer: five specials after the pieces, `[gMASK] sop` before every text.
    ChatGlm2,
    /// ChatGLM3: ChatGLM2's specials plus the four role tokens.
    ChatGlm3,
    /// GLM-4's tiktoken ranks with its fourteen specials and `[gMASK] <sop>`.
    Glm4,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::SentencePiece => "sentencepiece",
            Flavour::ChatGlm2 => "chatglm2",
            Flavour::ChatGlm3 => "chatglm3",
            Flavour::Glm4 => "glm4",
        }
    }

    /// THUDM's tokenizers read role strings in text as plain text (`encode_special_tokens` off):
    /// their specials only come from templates, as ids.
    fn literal_specials(self) -> bool {
        self != Flavour::SentencePiece
    }

    /// The special tokens THUDM's SentencePiece tokenizers number after the model's pieces.
    pub fn chatglm_specials(self) -> &'static [&'static str] {
        match self {
            Flavour::ChatGlm2 => CHATGLM2_SPECIALS,
            Flavour::ChatGlm3 => CHATGLM3_SPECIALS,
            Flavour::SentencePiece | Flavour::Glm4 => &[],
        }
    }
}

/// `dir/tokenizer.model` converted to `tokenizer.json`, with the default special ids.
pub struct Converted {
    pub json: Value,
    pub flavour: Flavour,
    defaults: [Option<u32>; 3],
    native: Option<NativeBpe>,
}

/// sentencepiece BPE with what the HF pipeline around it does: specials in text (unless
/// literal), and the post-processor's prefix and suffix ids.
struct NativeBpe {
    encoder: BpeEncoder,
    /// Special tokens matched in text, longest first; empty when specials are literal.
    specials: Vec<(String, u32)>,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

const CHATGLM2_SPECIALS: &[&str] = &["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"];
const CHATGLM3_SPECIALS: &[&str] =
    &["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"];

/// Converts `dir/tokenizer.model`; the folder's config files tell a ChatGLM tokenizer from a
/// LLaMA one and whether BOS/EOS are added.
pub fn convert_model(dir: &Path) -> Result<Converted, TokenizerError> {
    let path = dir.join("tokenizer.model");
    let invalid = |reason: String| TokenizerError::Invalid { path: path.clone(), reason };
    let bytes = std::fs::read(&path).map_err(|e| invalid(e.to_string()))?;
    let configs = Configs::read(dir)?;
    // A serialized ModelProto starts with its first piece (field 1, length-delimited: 0x0a);
    // a tiktoken file starts with base64 text.
    if bytes.first() != Some(&0x0a) {
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid("neither a SentencePiece model nor a tiktoken ranks file".into()))?;
        let ranks = tiktoken::parse_ranks(text).map_err(|reason| invalid(format!("tiktoken ranks: {reason}")))?;
        let id = |token: &str| tiktoken::GLM4_SPECIALS.iter().position(|t| *t == token).map(|i| (token.to_string(), (ranks.len() + i) as u32));
        let affixes = Affixes { prefix: vec![id("[gMASK]").unwrap(), id("<sop>").unwrap()], suffix: vec![] };
        let endoftext = Some(ranks.len() as u32);
        return Ok(Converted {
            json: tiktoken::tokenizer_json(&ranks, tiktoken::GLM4_PATTERN, tiktoken::GLM4_SPECIALS, &affixes),
            flavour: Flavour::Glm4,
            defaults: [None, endoftext, endoftext],
            native: None,
        });
    }
    let model = ModelProto::parse(&bytes).map_err(|reason| invalid(format!("SentencePiece model: {reason}")))?;
    let flavour = configs.chatglm_flavour(dir).unwrap_or(Flavour::SentencePiece);
    Ok(convert_sentencepiece(&model, flavour, &configs, false))
}

/// A SentencePiece `model` of `flavour` as `tokenizer.json` and sentencepiece's own BPE, with
/// BOS/EOS added as `configs` say. `user_defined_apart`: user-defined pieces are matched in text
/// as control tokens are, each text between them encoded on its own with its word-start `▁`
/// (llama.cpp's tokenizer, and HF's legacy conversion); otherwise they stay inside the text, as
/// sentencepiece itself encodes them.
fn convert_sentencepiece(model: &ModelProto, flavour: Flavour, configs: &Configs, user_defined_apart: bool) -> Converted {
    let (specials, affixes, defaults) = match flavour {
        Flavour::SentencePiece => {
            let piece = |id: Option<u32>| model.piece(id).map(|text| (text.to_string(), id.unwrap()));
            let flag = |key: &str, default: bool| configs.tokenizer.as_ref().and_then(|c| c.get(key)).and_then(Value::as_bool).unwrap_or(default);
            let affixes = Affixes {
                prefix: piece(model.bos_id).filter(|_| flag("add_bos_token", true)).into_iter().collect(),
                suffix: piece(model.eos_id).filter(|_| flag("add_eos_token", false)).into_iter().collect(),
            };
            (&[][..], affixes, [model.bos_id, model.eos_id, model.pad_id])
        }
        Flavour::ChatGlm2 | Flavour::ChatGlm3 => {
            let specials = flavour.chatglm_specials();
            let id = |token: &str| (token.to_string(), (model.pieces.len() + specials.iter().position(|t| *t == token).unwrap()) as u32);
            // THUDM's tokenizer: no BOS; EOS `</s>`; pad = unk.
            (specials, Affixes { prefix: vec![id("[gMASK]"), id("sop")], suffix: vec![] }, [None, model.eos_id, model.unk_id])
        }
        Flavour::Glm4 => unreachable!("GLM-4 ships tiktoken ranks"),
    };
    let native = BpeEncoder::new(model).map(|encoder| {
        use sentencepiece::PieceType::{Control, Unknown, UserDefined};
        let mut matched: Vec<(String, u32)> = Vec::new();
        if !flavour.literal_specials() {
            matched = model.pieces.iter().enumerate()
                .filter(|(_, p)| (matches!(p.kind, Control | Unknown) || (user_defined_apart && p.kind == UserDefined)) && !p.text.is_empty())
                .map(|(id, p)| (p.text.clone(), id as u32))
                .collect();
            matched.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        }
        let ids = |tokens: &[(String, u32)]| tokens.iter().map(|(_, id)| *id).collect();
        NativeBpe { encoder, specials: matched, prefix: ids(&affixes.prefix), suffix: ids(&affixes.suffix) }
    });
    Converted { json: sentencepiece::tokenizer_json(model, specials, &affixes), flavour, defaults, native }
}

/// A checkpoint's `tokenizer_config.json`, `generation_config.json` and `config.json`, each
/// absent or parsed.
#[derive(Debug, Clone, Default)]
pub struct Configs {
    pub tokenizer: Option<Value>,
    pub generation: Option<Value>,
    pub model: Option<Value>,
}

impl Configs {
    fn read(dir: &Path) -> Result<Self, TokenizerError> {
        Ok(Self {
            tokenizer: read_json_if_present(&dir.join("tokenizer_config.json"))?,
            generation: read_json_if_present(&dir.join("generation_config.json"))?,
            model: read_json_if_present(&dir.join("config.json"))?,
        })
    }

    fn tokenizer_class(&self) -> Option<&str> {
        self.tokenizer.as_ref()?.get("tokenizer_class")?.as_str()
    }

    /// ChatGLM2 or 3 when the folder is a ChatGLM one (by tokenizer class or model type): 3 when
    /// THUDM's tokenizer code names the role tokens or the name does not say 2.
    fn chatglm_flavour(&self, dir: &Path) -> Option<Flavour> {
        let model_type = self.model.as_ref().and_then(|c| c.get("model_type")).and_then(Value::as_str);
        let is_chatglm = self.tokenizer_class().is_some_and(|c| c.starts_with("ChatGLM")) || model_type == Some("chatglm");
        if !is_chatglm {
            return None;
        }
        if let Ok(code) = std::fs::read_to_string(dir.join("tokenization_chatglm.py")) {
            return Some(if code.contains("<|user|>") { Flavour::ChatGlm3 } else { Flavour::ChatGlm2 });
        }
        let name = self.tokenizer.as_ref().and_then(|c| c.get("name_or_path")).and_then(Value::as_str).unwrap_or_default();
        Some(if name.to_lowercase().contains("chatglm2") { Flavour::ChatGlm2 } else { Flavour::ChatGlm3 })
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (or converts `dir/tokenizer.model`) and the special ids from
    /// the folder's config files.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let configs = Configs::read(dir)?;
        let json_path = dir.join("tokenizer.json");
        let model_path = dir.join("tokenizer.model");
        // `use_fast: false` (Chinese-LLaMA-2) asks for the sentencepiece model, as transformers reads it.
        let slow = configs.tokenizer.as_ref().and_then(|c| c.get("use_fast")) == Some(&Value::Bool(false)) && model_path.is_file();
        let (inner, literal_specials, defaults, native) = if json_path.is_file() && !slow {
            let chatglm = configs.tokenizer_class().is_some_and(|c| c.starts_with("ChatGLM"));
            (load_tokenizer_json(&json_path)?, chatglm, [None; 3], None)
        } else if model_path.is_file() {
            return Self::from_converted(convert_model(dir)?, &configs, &model_path);
        } else {
            return Err(TokenizerError::Missing(json_path));
        };
        Ok(Self::with_configs(inner, literal_specials, defaults, native, &configs))
    }

    /// `dir/tokenizer.model` converted once: the tokenizer (as [`Tokenizer::from_dir`] loads it
    /// from a folder without tokenizer.json), the `tokenizer.json` it was built from, and whose
    /// tokenizer it is.
    pub fn from_model(dir: &Path) -> Result<(Self, Value, Flavour), TokenizerError> {
        let configs = Configs::read(dir)?;
        let converted = convert_model(dir)?;
        let (json, flavour) = (converted.json.clone(), converted.flavour);
        Ok((Self::from_converted(converted, &configs, &dir.join("tokenizer.model"))?, json, flavour))
    }

    /// A GGUF file's SentencePiece vocabulary of `flavour` (LLaMA's, or ChatGLM2/3's without their
    /// specials), encoded with sentencepiece's own BPE as `tokenizer.model` is, except that a
    /// LLaMA vocabulary's user-defined pieces are split out first, as llama.cpp does when it runs
    /// the file (each following text then starts a word: `<tool>call` is `<tool>`, `▁call`).
    pub fn from_gguf_sentencepiece(model: &ModelProto, flavour: Flavour, configs: &Configs, source: &Path) -> Result<Self, TokenizerError> {
        Self::from_converted(convert_sentencepiece(model, flavour, configs, true), configs, source)
    }

    fn from_converted(converted: Converted, configs: &Configs, source: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(converted.json.to_string())
            .map_err(|e| TokenizerError::Invalid { path: source.to_path_buf(), reason: format!("converted tokenizer does not load: {e}") })?;
        Ok(Self::with_configs(inner, converted.flavour.literal_specials(), converted.defaults, converted.native, configs))
    }

    /// A `tokenizer.json` held in memory (e.g. built from a GGUF file's vocabulary) with its
    /// checkpoint's configs; `source` names it in errors.
    pub fn from_json(json: &Value, configs: &Configs, source: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string())
            .map_err(|e| TokenizerError::Invalid { path: source.to_path_buf(), reason: format!("tokenizer does not load: {e}") })?;
        Ok(Self::with_configs(inner, false, [None; 3], None, configs))
    }

    /// The special ids from `configs` (token strings first, then numeric ids, then `defaults`).
    fn with_configs(mut inner: tokenizers::Tokenizer, literal_specials: bool, defaults: [Option<u32>; 3], native: Option<NativeBpe>, configs: &Configs) -> Self {
        inner.set_encode_special_tokens(literal_specials);
        let lookup = |token_key: &str, id_key: &str, default: Option<u32>| -> Option<u32> {
            let by_name = configs
                .tokenizer
                .as_ref()
                .and_then(|c| c.get(token_key))
                .and_then(token_content)
                .and_then(|t| inner.token_to_id(t));
            let by_id = |config: &Option<Value>| {
                let value = config.as_ref()?.get(id_key)?;
                // eos_token_id is often a list; the first entry is the primary one.
                let first = value.as_array().and_then(|a| a.first()).unwrap_or(value);
                first.as_u64().and_then(|n| u32::try_from(n).ok())
            };
            by_name.or_else(|| by_id(&configs.generation)).or_else(|| by_id(&configs.model)).or(default)
        };
        Self {
            bos_id: lookup("bos_token", "bos_token_id", defaults[0]),
            eos_id: lookup("eos_token", "eos_token_id", defaults[1]),
            pad_id: lookup("pad_token", "pad_token_id", defaults[2]),
            inner,
            native,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Ok(Self { inner: load_tokenizer_json(path)?, native: None, bos_id: None, eos_id: None, pad_id: None })
    }

    /// A digest of what decides the ids of text: the tokenizer as loaded (vocabulary, merges,
    /// normalizer, pre-tokenizer), which encoder runs it, and the special ids.
    pub fn fingerprint(&self) -> Result<String, TokenizerError> {
        use sha2::Digest;
        let json = self.inner.to_string(false).map_err(|e| TokenizerError::Encode(format!("the tokenizer does not serialize: {e}")))?;
        let mut hash = sha2::Sha256::new();
        hash.update(json.as_bytes());
        hash.update(format!("{} {} {:?} {:?} {:?}", self.native.is_some(), self.inner.get_encode_special_tokens(), self.bos_id, self.eos_id, self.pad_id));
        Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (BOS, `[gMASK]<sop>`…).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    /// Token ids of `text` and the byte range of `text` each comes from (empty for ids the
    /// post-processor adds).
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Vec<(usize, usize)>), TokenizerError> {
        let Some(native) = &self.native else {
            let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
            return Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()));
        };
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        if add_special_tokens {
            ids.extend(&native.prefix);
            offsets.resize(ids.len(), (0, 0));
        }
        // Sections between special tokens are encoded on their own, as HF's added vocabulary does.
        let mut section_start = 0;
        let mut at = 0;
        while at <= text.len() {
            let special = native.specials.iter().find(|(token, _)| text[at..].starts_with(token.as_str()));
            if special.is_none() && at < text.len() {
                at += text[at..].chars().next().unwrap().len_utf8();
                continue;
            }
            let (section_ids, section_offsets) = native.encoder.encode(&text[section_start..at]);
            ids.extend(section_ids);
            offsets.extend(section_offsets.into_iter().map(|(s, e)| (s + section_start, e + section_start)));
            let Some((token, id)) = special else { break };
            ids.push(*id);
            offsets.push((at, at + token.len()));
            at += token.len();
            section_start = at;
        }
        if add_special_tokens {
            ids.extend(&native.suffix);
            offsets.resize(ids.len(), (text.len(), text.len()));
        }
        Ok((ids, offsets))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Whether encoding with special tokens puts BOS first (llama.cpp's `add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.bos_id.is_some_and(|bos| self.encode("", true).is_ok_and(|ids| ids.first() == Some(&bos)))
    }

    /// The BOS id, where encoding with special tokens puts it first.
    pub fn added_bos(&self) -> Option<u32> {
        self.bos_id.filter(|_| self.adds_bos())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The EOS token's text (joined chat templates write it out; single instructions append the id).
    pub fn eos_token(&self) -> Option<String> {
        self.eos_id.and_then(|id| self.inner.id_to_token(id))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    if !path.is_file() {
        return Err(TokenizerError::Missing(path.to_path_buf()));
    }
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| TokenizerError::Invalid { path: path.to_path_buf(), reason: e.to_string() })
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TokenizerError::Invalid { path: path.to_path_buf(), reason: format!("invalid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TokenizerError::Invalid { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

/// `"</s>"` or `{"content": "</s>", ...}` (older tokenizer_config files).
fn token_content(value: &Value) -> Option<&str> {
    value.as_str().or_else(|| value.get("content").and_then(Value::as_str))
}
