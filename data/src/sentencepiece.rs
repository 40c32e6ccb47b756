//! SentencePiece `tokenizer.model` files (a `ModelProto` protobuf) as HF `tokenizer.json`.
//!
//! Only the fields a tokenizer needs are read: the pieces (text, score, type), the trainer's
//! model type, byte fallback and special ids, and the normalizer. The conversion follows
//! transformers' `LlamaConverter` for BPE (merges rebuilt from the scores; no pre-tokenizer) and
//! its `SpmConverter` for Unigram, with sentencepiece's normalization order: charsmap, extra
//! whitespace removal, dummy prefix, whitespace escaping.

use serde_json::{Map, Value, json};

/// How sentencepiece treats a piece (`SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
}

/// What a `tokenizer.model` says, defaults as in `sentencepiece_model.proto`.
#[derive(Debug, Clone)]
pub struct ModelProto {
    pub pieces: Vec<Piece>,
    pub model_type: ModelType,
    pub byte_fallback: bool,
    pub unk_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
}

/// A protobuf wire-format reader over one message's bytes.
struct Wire<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// One field's value: varints and fixed-width numbers as integers, the rest as bytes.
enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl<'a> Wire<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or_else(|| format!("truncated varint at byte {}", self.at))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.at))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("field of {n} bytes at byte {} runs past the end ({} bytes)", self.at, self.bytes.len()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Field::Int(self.varint()?),
            1 => Field::Int(u64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length does not fit in memory".to_string())?;
                Field::Bytes(self.take(len)?)
            }
            5 => Field::Int(u64::from(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))),
            other => return Err(format!("unsupported wire type {other} at byte {}", self.at)),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn text(bytes: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

/// An int32 id field; negative (sentencepiece's -1 = "none") becomes `None`.
fn id(value: u64) -> Option<u32> {
    u32::try_from(value as i64).ok()
}

impl ModelProto {
    /// Parses a serialized `ModelProto`; errors name the byte offset of the problem.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut model = ModelProto {
            pieces: Vec::new(),
            model_type: ModelType::Unigram,
            byte_fallback: false,
            unk_id: Some(0),
            bos_id: Some(1),
            eos_id: Some(2),
            pad_id: None,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
        };
        let mut wire = Wire::new(bytes);
        while let Some((number, field)) = wire.next()? {
            match (number, field) {
                (1, Field::Bytes(piece)) => model.pieces.push(parse_piece(piece)?),
                (2, Field::Bytes(trainer)) => model.read_trainer_spec(trainer)?,
                (3, Field::Bytes(normalizer)) => model.read_normalizer_spec(normalizer)?,
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("no pieces (not a SentencePiece model)".into());
        }
        Ok(model)
    }

    fn read_trainer_spec(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut wire = Wire::new(bytes);
        while let Some((number, field)) = wire.next()? {
            let Field::Int(value) = field else { continue };
            match number {
                3 => {
                    self.model_type = match value {
                        1 => ModelType::Unigram,
                        2 => ModelType::Bpe,
                        3 => return Err("model_type WORD is not supported (supported: BPE, UNIGRAM)".into()),
                        4 => return Err("model_type CHAR is not supported (supported: BPE, UNIGRAM)".into()),
                        other => return Err(format!("unknown model_type {other}")),
                    }
                }
                35 => self.byte_fallback = value != 0,
                40 => self.unk_id = id(value),
                41 => self.bos_id = id(value),
                42 => self.eos_id = id(value),
                43 => self.pad_id = id(value),
                _ => {}
            }
        }
        Ok(())
    }

    fn read_normalizer_spec(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut wire = Wire::new(bytes);
        while let Some((number, field)) = wire.next()? {
            match (number, field) {
                (2, Field::Bytes(charsmap)) => self.precompiled_charsmap = charsmap.to_vec(),
                (3, Field::Int(value)) => self.add_dummy_prefix = value != 0,
                (4, Field::Int(value)) => self.remove_extra_whitespaces = value != 0,
                _ => {}
            }
        }
        Ok(())
    }

    pub fn piece(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|id| self.pieces.get(id as usize)).map(|p| p.text.as_str())
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece, String> {
    let mut piece = Piece { text: String::new(), score: 0.0, kind: PieceType::Normal };
    let mut wire = Wire::new(bytes);
    while let Some((number, field)) = wire.next()? {
        match (number, field) {
            (1, Field::Bytes(t)) => piece.text = text(t, "a piece")?,
            (2, Field::Int(bits)) => piece.score = f32::from_bits(bits as u32),
            (3, Field::Int(kind)) => {
                piece.kind = match kind {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(format!("piece {:?}: unknown type {other}", piece.text)),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// Ids the tokenizer adds around every encoded text (`TemplateProcessing`'s single sequence).
#[derive(Debug, Clone, Default)]
pub struct Affixes {
    pub prefix: Vec<(String, u32)>,
    pub suffix: Vec<(String, u32)>,
}

impl Affixes {
    /// The post-processor adding the affixes, or null when there are none.
    pub fn post_processor(&self) -> Value {
        if self.prefix.is_empty() && self.suffix.is_empty() {
            return Value::Null;
        }
        let special = |(token, _): &(String, u32)| json!({"SpecialToken": {"id": token, "type_id": 0}});
        let single: Vec<Value> = self.prefix.iter().map(special)
            .chain([json!({"Sequence": {"id": "A", "type_id": 0}})])
            .chain(self.suffix.iter().map(special))
            .collect();
        let pair: Vec<Value> = single.iter().cloned()
            .chain(self.prefix.iter().map(special))
            .chain([json!({"Sequence": {"id": "B", "type_id": 1}})])
            .chain(self.suffix.iter().map(special))
            .collect();
        let tokens: Map<String, Value> = self.prefix.iter().chain(&self.suffix)
            .map(|(token, id)| (token.clone(), json!({"id": token, "ids": [id], "tokens": [token]})))
            .collect();
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens})
    }
}

/// An added-token entry of `tokenizer.json`.
pub fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special})
}

/// `tokenizer.json` for `model`, with `extra_specials` appended after its pieces (ChatGLM's
/// `[gMASK]`, `sop`, role tokens…) and `affixes` added around every text.
pub fn tokenizer_json(model: &ModelProto, extra_specials: &[&str], affixes: &Affixes) -> Value {
    // Control and unknown pieces are special tokens; user-defined pieces are matched whole
    // before the model runs, as sentencepiece does.
    let mut added: Vec<Value> = model.pieces.iter().enumerate()
        .filter_map(|(id, p)| match p.kind {
            PieceType::Control | PieceType::Unknown => Some(added_token(id, &p.text, true)),
            PieceType::UserDefined => Some(added_token(id, &p.text, false)),
            _ => None,
        })
        .collect();
    added.extend(extra_specials.iter().enumerate().map(|(i, t)| added_token(model.pieces.len() + i, t, true)));

    let mut normalizers = Vec::new();
    if !model.precompiled_charsmap.is_empty() {
        normalizers.push(json!({"type": "Precompiled", "precompiled_charsmap": base64(&model.precompiled_charsmap)}));
    }
    if model.remove_extra_whitespaces {
        normalizers.push(json!({"type": "Strip", "strip_left": true, "strip_right": true}));
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
    }
    if model.add_dummy_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));

    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if model.add_dummy_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }

    let unk = model.piece(model.unk_id);
    let (pre_tokenizer, tokenizer_model) = match model.model_type {
        ModelType::Bpe => {
            let texts: Vec<&str> = model.pieces.iter().map(|p| p.text.as_str()).collect();
            let scores: Vec<f64> = model.pieces.iter().map(|p| f64::from(p.score)).collect();
            let vocab: Map<String, Value> = texts.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
            (Value::Null, json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": model.byte_fallback, "ignore_merges": false,
                "vocab": vocab, "merges": merges(&texts, &scores)}))
        }
        ModelType::Unigram => {
            let vocab: Vec<Value> = model.pieces.iter().map(|p| json!([p.text, p.score])).collect();
            // Unigram pieces never cross a word boundary: split before every `▁`.
            (json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": true}),
             json!({"type": "Unigram", "unk_id": model.unk_id, "vocab": vocab, "byte_fallback": model.byte_fallback}))
        }
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": pre_tokenizer,
        "post_processor": affixes.post_processor(),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": tokenizer_model,
    })
}

/// SentencePiece BPE merges pieces by the score of the result; as HF merges those are all
/// splits of every piece into two vocabulary pieces, ranked by the merged piece's score.
pub fn merges(pieces: &[&str], scores: &[f64]) -> Vec<Value> {
    let ids: std::collections::HashMap<&str, usize> = pieces.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in pieces.iter().enumerate() {
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), l, r, left, right));
            }
        }
    }
    // Highest score first; ties by the ids of the parts, as transformers' converter.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, _, l, r)| json!([l, r])).collect()
}

/// sentencepiece's own BPE encoder, for models loaded from `tokenizer.model`.
///
/// HF's BPE ranks merges uniquely, so when two merges tie on score it applies the one listed
/// first; sentencepiece applies the leftmost. Vocabularies extended with score-0 pieces (the
/// Chinese-LLaMA family) tie everywhere, so their ids need this encoder.
#[derive(Debug, Clone)]
pub struct BpeEncoder {
    /// Pieces merges may produce (normal, user-defined, unused), with their ids.
    mergeable: std::collections::HashMap<String, u32>,
    scores: Vec<f32>,
    /// User-defined pieces, kept whole, longest first.
    user_defined: Vec<(String, u32)>,
    /// `<0x00>`… `<0xFF>` ids, when the model falls back to bytes.
    byte_ids: Option<Vec<u32>>,
    unk_id: u32,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
}

/// A symbol of the working segmentation: a byte range of the normalized text, linked to its
/// neighbours, `None` once merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    frozen: bool,
}

impl BpeEncoder {
    /// The encoder for a BPE `model` without a precompiled charsmap (sentencepiece's identity
    /// normalizer); `None` otherwise.
    pub fn new(model: &ModelProto) -> Option<Self> {
        if model.model_type != ModelType::Bpe || !model.precompiled_charsmap.is_empty() {
            return None;
        }
        let mut mergeable = std::collections::HashMap::new();
        let mut user_defined = Vec::new();
        let mut bytes = vec![None; 256];
        for (id, piece) in model.pieces.iter().enumerate() {
            let id = id as u32;
            match piece.kind {
                PieceType::Normal | PieceType::Unused => {
                    mergeable.entry(piece.text.clone()).or_insert(id);
                }
                PieceType::UserDefined => {
                    mergeable.entry(piece.text.clone()).or_insert(id);
                    // An empty piece would match everywhere without consuming anything.
                    if !piece.text.is_empty() {
                        user_defined.push((piece.text.clone(), id));
                    }
                }
                PieceType::Byte => {
                    let hex = piece.text.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                    if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        bytes[byte as usize] = Some(id);
                    }
                }
                PieceType::Control | PieceType::Unknown => {}
            }
        }
        user_defined.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        let byte_ids = if model.byte_fallback { bytes.into_iter().collect::<Option<Vec<u32>>>() } else { None };
        Some(Self {
            mergeable,
            scores: model.pieces.iter().map(|p| p.score).collect(),
            user_defined,
            byte_ids,
            unk_id: model.unk_id.unwrap_or(0),
            add_dummy_prefix: model.add_dummy_prefix,
            remove_extra_whitespaces: model.remove_extra_whitespaces,
        })
    }

    /// The normalized text and, for each of its bytes, the byte of `text` it came from.
    fn normalize(&self, text: &str) -> (String, Vec<usize>) {
        let mut out = String::with_capacity(text.len() + 3);
        let mut origin = Vec::with_capacity(text.len() + 3);
        let mut push = |out: &mut String, c: char, from: usize| {
            let c = if c == ' ' { '▁' } else { c };
            out.push(c);
            origin.extend(std::iter::repeat_n(from, c.len_utf8()));
        };
        let body = if self.remove_extra_whitespaces { text.trim_matches(' ') } else { text };
        let body_start = text.len() - text.trim_start_matches(' ').len();
        let body_start = if self.remove_extra_whitespaces { body_start } else { 0 };
        if body.is_empty() {
            return (out, origin);
        }
        if self.add_dummy_prefix {
            push(&mut out, ' ', body_start);
        }
        let mut previous_space = false;
        for (at, c) in body.char_indices() {
            if self.remove_extra_whitespaces && c == ' ' && previous_space {
                continue;
            }
            previous_space = c == ' ';
            push(&mut out, c, body_start + at);
        }
        (out, origin)
    }

    /// Ids of `text` and the byte range of `text` each comes from.
    pub fn encode(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        let (normalized, origin) = self.normalize(text);
        // The dummy prefix maps to an empty range before the first character.
        let source_range = |start: usize, end: usize| (origin[start], if end < origin.len() { origin[end] } else { text.len() });
        // One symbol per character, or per user-defined piece found at that position.
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut at = 0;
        while at < normalized.len() {
            let rest = &normalized[at..];
            let (len, frozen) = match self.user_defined.iter().find(|(piece, _)| rest.starts_with(piece.as_str())) {
                Some((piece, _)) => (piece.len(), true),
                None => (rest.chars().next().unwrap().len_utf8(), false),
            };
            let index = symbols.len();
            symbols.push(Symbol { start: at, end: at + len, prev: index.checked_sub(1), next: Some(index + 1), frozen });
            at += len;
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        // Highest score first; ties to the leftmost pair (sentencepiece's SymbolPairComparator).
        let mut agenda = std::collections::BinaryHeap::new();
        let candidate = |symbols: &[Symbol], left: usize, right: usize| -> Option<(OrderedScore, std::cmp::Reverse<usize>, usize, usize, usize)> {
            let (l, r) = (symbols[left], symbols[right]);
            if l.frozen || r.frozen {
                return None;
            }
            let id = *self.mergeable.get(&normalized[l.start..r.end])?;
            Some((OrderedScore(self.scores[id as usize]), std::cmp::Reverse(l.start), left, right, r.end - l.start))
        };
        for i in 1..symbols.len() {
            agenda.extend(candidate(&symbols, i - 1, i));
        }
        while let Some((_, _, left, right, len)) = agenda.pop() {
            // Stale: one side merged away or grown since this pair was queued.
            if symbols[left].end - symbols[left].start == 0 || symbols[right].end - symbols[right].start == 0
                || symbols[left].next != Some(right) || symbols[right].end - symbols[left].start != len
            {
                continue;
            }
            symbols[left].end = symbols[right].end;
            symbols[left].next = symbols[right].next;
            if let Some(next) = symbols[right].next {
                symbols[next].prev = Some(left);
            }
            symbols[right].end = symbols[right].start;
            if let Some(prev) = symbols[left].prev {
                agenda.extend(candidate(&symbols, prev, left));
            }
            if let Some(next) = symbols[left].next {
                agenda.extend(candidate(&symbols, left, next));
            }
        }
        let (mut ids, mut ranges) = (Vec::new(), Vec::new());
        let mut current = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = current {
            let Symbol { start, end, .. } = symbols[i];
            let piece = &normalized[start..end];
            match (self.mergeable.get(piece), &self.byte_ids) {
                (Some(&id), _) => {
                    ids.push(id);
                    ranges.push(source_range(start, end));
                }
                (None, Some(byte_ids)) => {
                    for (k, byte) in piece.bytes().enumerate() {
                        ids.push(byte_ids[byte as usize]);
                        ranges.push(source_range(start + k, start + k + 1));
                    }
                }
                (None, None) => {
                    ids.push(self.unk_id);
                    ranges.push(source_range(start, end));
                }
            }
            current = symbols[i].next;
        }
        (ids, ranges)
    }
}

/// A score as a total order (scores are never NaN in a valid model; NaN sorts last).
#[derive(Clone, Copy, PartialEq)]
struct OrderedScore(f32);

impl Eq for OrderedScore {}

impl PartialOrd for OrderedScore {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedScore {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Standard base64 with padding (tokenizer.json stores the precompiled charsmap this way).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A varint-encoded protobuf key.
    fn key(number: u64, wire_type: u64) -> Vec<u8> {
        varint(number << 3 | wire_type)
    }

    fn varint(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(number: u64, bytes: &[u8]) -> Vec<u8> {
        [key(number, 2), varint(bytes.len() as u64), bytes.to_vec()].concat()
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let body = [bytes_field(1, text.as_bytes()), key(2, 5), score.to_bits().to_le_bytes().to_vec(), key(3, 0), varint(kind)].concat();
        bytes_field(1, &body)
    }

    #[test]
    fn parses_pieces_trainer_and_normalizer_fields() {
        let trainer = [key(3, 0), varint(2), key(35, 0), varint(1), key(43, 0), varint(-1i64 as u64)].concat();
        let normalizer = [key(3, 0), varint(1), key(4, 0), varint(0)].concat();
        let proto = [piece("<unk>", 0.0, 2), piece("<s>", 0.0, 3), piece("▁a", -1.5, 1), bytes_field(2, &trainer), bytes_field(3, &normalizer)].concat();
        let model = ModelProto::parse(&proto).unwrap();
        assert_eq!(model.pieces.len(), 3);
        assert_eq!(model.pieces[2], Piece { text: "▁a".into(), score: -1.5, kind: PieceType::Normal });
        assert_eq!(model.pieces[1].kind, PieceType::Control);
        assert_eq!(model.model_type, ModelType::Bpe);
        assert!(model.byte_fallback && model.add_dummy_prefix && !model.remove_extra_whitespaces);
        assert_eq!((model.unk_id, model.pad_id), (Some(0), None));
    }

    #[test]
    fn truncated_input_is_an_error_naming_the_offset() {
        let proto = piece("<unk>", 0.0, 2);
        let e = ModelProto::parse(&proto[..proto.len() - 2]).unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
        assert!(ModelProto::parse(b"").unwrap_err().contains("no pieces"));
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    fn bpe_model(pieces: &[(&str, f32, PieceType)]) -> ModelProto {
        ModelProto {
            pieces: pieces.iter().map(|&(t, score, kind)| Piece { text: t.into(), score, kind }).collect(),
            model_type: ModelType::Bpe,
            byte_fallback: false,
            unk_id: Some(0),
            bos_id: None,
            eos_id: None,
            pad_id: None,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: false,
        }
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        use PieceType::*;
        // "今天天气": 今天, 天天 and 天气 all score 0; sentencepiece takes 今天 first, then 天气.
        let model = bpe_model(&[("<unk>", 0.0, Unknown), ("▁", -1.0, Normal), ("今", -2.0, Normal), ("天", -3.0, Normal),
            ("气", -4.0, Normal), ("天天", 0.0, Normal), ("今天", 0.0, Normal), ("天气", 0.0, Normal)]);
        let encoder = BpeEncoder::new(&model).unwrap();
        let (ids, ranges) = encoder.encode("今天天气");
        assert_eq!(ids, [1, 6, 7]);
        // Byte ranges in the original text; the dummy prefix is empty.
        assert_eq!(ranges, [(0, 0), (0, 6), (6, 12)]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_or_unk() {
        use PieceType::*;
        let mut pieces: Vec<(String, f32, PieceType)> = vec![("<unk>".into(), 0.0, Unknown), ("▁".into(), -1.0, Normal), ("a".into(), -2.0, Normal)];
        pieces.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, Byte)));
        let borrowed: Vec<(&str, f32, PieceType)> = pieces.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        let mut model = bpe_model(&borrowed);
        assert_eq!(BpeEncoder::new(&model).unwrap().encode("aé").0, [1, 2, 0]);
        model.byte_fallback = true;
        assert_eq!(BpeEncoder::new(&model).unwrap().encode("aé").0, [1, 2, 3 + 0xC3, 3 + 0xA9]);
    }
}
