//! Plain-text corpora for continued pretraining, read as streams. A corpus of gigabytes is never
//! held as text: each file is read twice, a line, a JSON array element or a Parquet row at a time
//! (once to count its records, so that the seeded split is the one [`crate::Dataset`] gives, once
//! to tokenize them on every core), and only its token ids stay, 4 bytes a token, in memory or in
//! a [`TokenCache`] folder that later runs read instead of tokenizing again. Blocks are cut from
//! them when a batch asks.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::columns::{Mapping, Mappings};
use crate::dataset::{self, Dataset, DatasetError, Sample};
use crate::sft::{Example, all_trained, text_ids};
use crate::tokenizer::Tokenizer;

/// Text read and tokenized at a time: enough to keep every core busy, little to hold.
const BATCH_BYTES: usize = 4 << 20;

/// The record files of a plain-text corpus, counted.
pub struct Corpus {
    files: Vec<CorpusFile>,
    /// How JSON and Parquet records' keys are renamed before they are read.
    mappings: Mappings,
}

struct CorpusFile {
    path: PathBuf,
    records: Records,
    /// Whether `records` counts all of the file's records ([`Corpus::first`] may keep fewer).
    whole: bool,
}

enum Records {
    /// One record a non-blank line: the line itself (`.txt`) or a JSON object. Read again to
    /// tokenize.
    Lines { count: usize, json: bool },
    /// A JSON array's elements, parsed one at a time on a reader thread (see [`array_elements`]).
    Array { count: usize },
    /// A Parquet file's rows, read a row group at a time.
    Parquet { count: usize },
}

impl Records {
    fn count(&self) -> usize {
        match self {
            Records::Lines { count, .. } | Records::Array { count } | Records::Parquet { count } => *count,
        }
    }
}

impl Corpus {
    /// The records of `paths` in order, counted: a `.txt` file (gzipped if it ends in `.gz`)
    /// has one a non-blank line, a JSON Lines file one an object, a JSON array one an element, a
    /// Parquet file one a row.
    /// Invalid UTF-8 is an error here; a bad record is one when [`Self::tokenize`] reaches it.
    pub fn count(paths: &[PathBuf]) -> Result<Self, DatasetError> {
        let files = paths.iter().map(|path| Ok(CorpusFile { path: path.clone(), records: count_records(path)?, whole: true })).collect::<Result<_, DatasetError>>()?;
        Ok(Self { files, mappings: Mappings::default() })
    }

    /// The records read with their keys renamed by each file's mapping (`[data.columns]`).
    pub fn mapped(self, mappings: impl Into<Mappings>) -> Self {
        Self { mappings: mappings.into(), ..self }
    }

    /// All files' records.
    pub fn records(&self) -> usize {
        self.files.iter().map(|f| f.records.count()).sum()
    }

    /// Each file's number of records.
    pub fn counts(&self) -> Vec<usize> {
        self.files.iter().map(|f| f.records.count()).collect()
    }

    /// Only the first `limit` records (what `ember eval --limit` scores): tokenizing stops there.
    pub fn first(mut self, limit: usize) -> Self {
        let mut left = limit;
        for file in &mut self.files {
            match &mut file.records {
                Records::Lines { count, .. } | Records::Array { count } | Records::Parquet { count } => {
                    file.whole = *count <= left;
                    *count = (*count).min(left);
                }
            }
            left -= file.records.count();
        }
        self.files.retain(|f| f.records.count() > 0);
        self
    }

    /// The first `limit` records, read as [`Self::tokenize`] reads them (what `ember data preview`
    /// shows).
    pub fn head(&self, limit: usize) -> Result<Dataset, DatasetError> {
        let (mut files, mut samples) = (Vec::new(), Vec::new());
        for file in &self.files {
            if samples.len() >= limit {
                break;
            }
            files.push((file.path.clone(), samples.len()));
            for pending in file.pending()?.take(limit - samples.len()) {
                samples.push(pending?.sample(&file.path, self.mappings.of(&file.path))?);
            }
        }
        Ok(Dataset::from_parts(files, samples))
    }

    /// Every record's `text + EOS` ids in file order: those `held_out` marks (by index over all
    /// files) in the second stream, the others in the first. A bad record is an error naming its
    /// file and index.
    pub fn tokenize<S: TokenSink>(&self, tokenizer: &Tokenizer, held_out: &[bool], streams: &mut [S; 2]) -> Result<(), DatasetError> {
        let mut first = 0;
        for file in &self.files {
            let mut batch = Vec::new();
            let mut bytes = 0;
            let mut flush = |batch: &mut Vec<Pending>| -> Result<(), DatasetError> {
                let ids: Vec<Result<Vec<u32>, DatasetError>> = batch.par_iter().map(|pending| pending.ids(tokenizer, &file.path, self.mappings.of(&file.path))).collect();
                for (pending, ids) in batch.drain(..).zip(ids) {
                    streams[usize::from(held_out[first + pending.index])].push(&ids?)?;
                }
                Ok(())
            };
            let (mut records, count) = (file.pending()?, file.records.count());
            let mut read = 0;
            for pending in records.by_ref().take(count) {
                let pending = pending?;
                (bytes, read) = (bytes + pending.text_len(), read + 1);
                batch.push(pending);
                if bytes >= BATCH_BYTES {
                    flush(&mut batch)?;
                    bytes = 0;
                }
            }
            flush(&mut batch)?;
            // A file written to between the two readings would shift the split: never used so.
            if read < count || (file.whole && records.next().is_some()) {
                let reason = format!("changed while it was read: {count} records counted, {} read", if read < count { read.to_string() } else { "more".into() });
                return Err(DatasetError::Invalid { path: file.path.clone(), reason });
            }
            first += count;
        }
        Ok(())
    }
}

impl CorpusFile {
    /// The file's records in order, read again.
    fn pending(&self) -> Result<Box<dyn Iterator<Item = Result<Pending, DatasetError>> + '_>, DatasetError> {
        Ok(match &self.records {
            Records::Array { .. } => {
                let elements = array_elements(&self.path)?;
                Box::new(elements.enumerate().map(|(index, value)| Ok(Pending { index, line: 0, record: Record::Value(value?) })))
            }
            Records::Parquet { .. } => {
                let rows = crate::parquet::stream(&self.path)?;
                Box::new(rows.enumerate().map(|(index, value)| Ok(Pending { index, line: 0, record: Record::Value(value?) })))
            }
            Records::Lines { json, .. } => {
                let (mut lines, json) = (Lines::open(&self.path)?, *json);
                let mut index = 0;
                Box::new(std::iter::from_fn(move || {
                    let (line, text) = match lines.next_line().transpose()? {
                        Ok(next) => next,
                        Err(e) => return Some(Err(e)),
                    };
                    let record = if json { Record::Json(text) } else { Record::Sample(Sample::Text(text)) };
                    index += 1;
                    Some(Ok(Pending { index: index - 1, line, record }))
                }))
            }
        })
    }
}

/// A record on its way to ids, with its index in its file and line number (JSON Lines).
struct Pending {
    index: usize,
    line: usize,
    record: Record,
}

enum Record {
    Sample(Sample),
    /// A JSON Lines record, parsed on the worker that tokenizes it.
    Json(String),
    /// A JSON array's element or a Parquet row.
    Value(serde_json::Value),
}

impl Pending {
    /// Bytes of text the record carries, as read.
    fn text_len(&self) -> usize {
        match &self.record {
            Record::Json(text) | Record::Sample(Sample::Text(text)) => text.len(),
            Record::Value(value) => value.get("text").and_then(serde_json::Value::as_str).map_or(0, str::len),
            Record::Sample(_) => 0,
        }
    }

    fn sample(self, path: &Path, mapping: &Mapping) -> Result<Sample, DatasetError> {
        match self.record {
            Record::Sample(sample) => Ok(sample),
            Record::Json(ref text) => self.parse(text, path, mapping),
            Record::Value(ref value) => self.sample_of(value, path, mapping),
        }
    }

    fn parse(&self, text: &str, path: &Path, mapping: &Mapping) -> Result<Sample, DatasetError> {
        let value = serde_json::from_str(text).map_err(|e| DatasetError::Invalid { path: path.to_path_buf(), reason: format!("line {}: malformed JSON: {e}", self.line) })?;
        self.sample_of(&value, path, mapping)
    }

    fn sample_of(&self, value: &serde_json::Value, path: &Path, mapping: &Mapping) -> Result<Sample, DatasetError> {
        dataset::mapped_sample(value, mapping).map_err(|reason| DatasetError::Record { path: path.to_path_buf(), index: self.index, reason })
    }

    fn ids(&self, tokenizer: &Tokenizer, path: &Path, mapping: &Mapping) -> Result<Vec<u32>, DatasetError> {
        let parsed;
        let sample = match &self.record {
            Record::Sample(sample) => sample,
            Record::Json(text) => {
                parsed = self.parse(text, path, mapping)?;
                &parsed
            }
            Record::Value(value) => {
                parsed = self.sample_of(value, path, mapping)?;
                &parsed
            }
        };
        text_ids(tokenizer, sample).map_err(|reason| DatasetError::Record { path: path.to_path_buf(), index: self.index, reason })
    }
}

fn count_records(path: &Path) -> Result<Records, DatasetError> {
    if crate::parquet::is_parquet(path) {
        return Ok(Records::Parquet { count: crate::parquet::count(path)? });
    }
    let mut lines = Lines::open(path)?;
    let name = path.to_string_lossy();
    let json = !(name.ends_with(".txt") || name.ends_with(".txt.gz"));
    let mut count = 0;
    while let Some((_, text)) = lines.next_line()? {
        if json && count == 0 && text.trim_start().starts_with('[') {
            count = for_each_element(open(path)?, |_: serde::de::IgnoredAny| true).map_err(|e| malformed(path, &e))?;
            return match count {
                0 => Err(no_records(path)),
                count => Ok(Records::Array { count }),
            };
        }
        count += 1;
    }
    match count {
        0 => Err(no_records(path)),
        count => Ok(Records::Lines { count, json }),
    }
}

fn no_records(path: &Path) -> DatasetError {
    DatasetError::Invalid { path: path.to_path_buf(), reason: "no records".into() }
}

/// A file's bytes, gunzipped if its name ends in `.gz`.
fn open(path: &Path) -> Result<Box<dyn BufRead + Send>, DatasetError> {
    let file = File::open(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
    Ok(match path.extension().is_some_and(|e| e == "gz") {
        true => Box::new(BufReader::new(flate2::read::GzDecoder::new(BufReader::new(file)))),
        false => Box::new(BufReader::new(file)),
    })
}

fn malformed(path: &Path, error: &serde_json::Error) -> DatasetError {
    DatasetError::Invalid { path: path.to_path_buf(), reason: format!("malformed JSON: {error}") }
}

/// Hands each element of the JSON array in `reader` to `each` as it is parsed, until `each`
/// returns false; the number of elements. Nothing but the element at hand is held.
fn for_each_element<T: serde::de::DeserializeOwned>(reader: impl std::io::Read, each: impl FnMut(T) -> bool) -> Result<usize, serde_json::Error> {
    struct Elements<T, F>(F, std::marker::PhantomData<T>);
    impl<'de, T: serde::de::DeserializeOwned, F: FnMut(T) -> bool> serde::de::Visitor<'de> for Elements<T, F> {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of records")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<usize, A::Error> {
            let mut count = 0;
            while let Some(element) = seq.next_element::<T>()? {
                count += 1;
                if !(self.0)(element) {
                    return Err(serde::de::Error::custom("stopped"));
                }
            }
            Ok(count)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let count = serde::Deserializer::deserialize_seq(&mut deserializer, Elements(each, std::marker::PhantomData))?;
    deserializer.end()?;
    Ok(count)
}

/// The elements of the JSON array in `path`, parsed on a thread of their own a little ahead of
/// the reader; dropping the iterator stops the thread.
fn array_elements(path: &Path) -> Result<impl Iterator<Item = Result<serde_json::Value, DatasetError>> + use<>, DatasetError> {
    let (reader, path) = (open(path)?, path.to_path_buf());
    let (sender, receiver) = std::sync::mpsc::sync_channel(256);
    std::thread::spawn(move || {
        if let Err(e) = for_each_element(reader, |value| sender.send(Ok(value)).is_ok()) {
            // Nobody is there to receive it when the reader stopped early.
            let _ = sender.send(Err(malformed(&path, &e)));
        }
    });
    Ok(receiver.into_iter())
}

/// The non-blank lines of a file (gunzipped if its name ends in `.gz`), one at a time.
struct Lines {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    buffer: Vec<u8>,
    number: usize,
    /// Bytes read so far, to name where invalid UTF-8 starts.
    offset: usize,
}

impl Lines {
    fn open(path: &Path) -> Result<Self, DatasetError> {
        Ok(Self { path: path.to_path_buf(), reader: open(path)?, buffer: Vec::new(), number: 0, offset: 0 })
    }

    /// The next non-blank line without its line ending, and its number (from 1).
    fn next_line(&mut self) -> Result<Option<(usize, String)>, DatasetError> {
        loop {
            self.buffer.clear();
            let read = self.reader.read_until(b'\n', &mut self.buffer).map_err(|source| DatasetError::Io { path: self.path.clone(), source })?;
            if read == 0 {
                return Ok(None);
            }
            let start = self.offset;
            (self.number, self.offset) = (self.number + 1, self.offset + read);
            let text = std::str::from_utf8(&self.buffer)
                .map_err(|e| DatasetError::Invalid { path: self.path.clone(), reason: format!("invalid UTF-8 at byte {}", start + e.valid_up_to()) })?;
            let text = text.strip_suffix('\n').map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
            if !text.trim().is_empty() {
                return Ok(Some((self.number, text.to_owned())));
            }
        }
    }
}

/// Where [`Corpus::tokenize`] puts each record's ids.
pub trait TokenSink {
    fn push(&mut self, ids: &[u32]) -> Result<(), DatasetError>;
}

/// Token ids gathered in memory, in chunks so that growing never copies what is there.
#[derive(Default)]
pub struct TokenBuffer {
    chunks: Vec<Vec<u32>>,
    len: usize,
}

/// Ids a chunk of a [`TokenBuffer`] holds (16 MiB).
const CHUNK: usize = 1 << 22;

impl TokenBuffer {
    pub fn append(&mut self, mut ids: &[u32]) {
        self.len += ids.len();
        while !ids.is_empty() {
            if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                self.chunks.push(Vec::with_capacity(CHUNK.min(ids.len().next_power_of_two())));
            }
            let last = self.chunks.last_mut().expect("a chunk was just pushed");
            let take = (CHUNK - last.len()).min(ids.len());
            last.extend_from_slice(&ids[..take]);
            ids = &ids[take..];
        }
    }
}

impl TokenSink for TokenBuffer {
    fn push(&mut self, ids: &[u32]) -> Result<(), DatasetError> {
        self.append(ids);
        Ok(())
    }
}

/// Token ids in order: gathered in memory, or read from a [`TokenCache`] file (little-endian
/// `u32`s) a block at a time. Read, not mapped: blocks come in a shuffled order, and a mapping
/// would keep every page read resident (with the kernel's neighbours of each) until it is the
/// file's size; reads leave them to the page cache.
pub enum TokenStream {
    Memory(TokenBuffer),
    Stored { file: File, path: PathBuf, len: usize },
}

impl From<TokenBuffer> for TokenStream {
    fn from(buffer: TokenBuffer) -> Self {
        TokenStream::Memory(buffer)
    }
}

impl TokenStream {
    pub fn len(&self) -> usize {
        match self {
            TokenStream::Memory(buffer) => buffer.len,
            TokenStream::Stored { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids at `range`, appended to `out`.
    fn copy_range(&self, range: std::ops::Range<usize>, out: &mut Vec<u32>) -> Result<(), DatasetError> {
        match self {
            TokenStream::Memory(buffer) => {
                let mut at = range.start;
                while at < range.end {
                    let chunk = &buffer.chunks[at / CHUNK];
                    let within = at % CHUNK;
                    let take = (chunk.len() - within).min(range.end - at);
                    out.extend_from_slice(&chunk[within..within + take]);
                    at += take;
                }
            }
            TokenStream::Stored { file, path, .. } => {
                let mut bytes = vec![0u8; 4 * range.len()];
                std::os::unix::fs::FileExt::read_exact_at(file, &mut bytes, 4 * range.start as u64)
                    .map_err(|source| DatasetError::Io { path: path.clone(), source })?;
                out.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
        }
        Ok(())
    }
}

/// `data.tokenized_path`: a corpus's token ids kept in a folder by the first run and read from
/// there by the next ones, which then neither read nor tokenize the text (LLaMA-Factory's
/// `tokenized_path`). `corpus.json` says what the ids are of: the files (path, size, modification
/// time) with their record counts, the tokenizer's fingerprint and the held-out records; a run
/// with anything else tokenizes again and replaces them. The folder is locked while a run
/// reads or writes it.
pub struct TokenCache {
    dir: PathBuf,
    tokenizer: String,
    /// The records' text column where `[data.columns]` names one.
    text_column: Option<String>,
    sources: Vec<Source>,
    found: Option<CacheInfo>,
    _lock: File,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Source {
    path: PathBuf,
    bytes: u64,
    modified_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheInfo {
    version: u32,
    tokenizer: String,
    sources: Vec<Source>,
    records: Vec<usize>,
    /// Digest of the held-out records' indices.
    held_out: String,
    #[serde(default)]
    text_column: Option<String>,
    /// Ids in `train.u32` and `eval.u32`.
    tokens: [usize; 2],
}

const CACHE_VERSION: u32 = 1;
const CACHE_FILES: [&str; 2] = ["train.u32", "eval.u32"];
const CACHE_INFO: &str = "corpus.json";

impl TokenCache {
    /// `dir` (created if missing) for the corpus of `paths` tokenized by `tokenizer`. Where
    /// another run holds it, calls `waiting` and waits.
    pub fn open(dir: &Path, paths: &[PathBuf], tokenizer: &Tokenizer, waiting: impl FnOnce()) -> Result<Self, DatasetError> {
        let io = |path: &Path| { let path = path.to_path_buf(); move |source| DatasetError::Io { path, source } };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(".ember.lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                waiting();
                lock.lock().map_err(io(&lock_path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let sources = paths
            .iter()
            .map(|path| {
                let meta = std::fs::metadata(path).map_err(io(path))?;
                let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64);
                Ok(Source { path: std::path::absolute(path).unwrap_or_else(|_| path.clone()), bytes: meta.len(), modified_ns: modified })
            })
            .collect::<Result<_, DatasetError>>()?;
        let tokenizer = tokenizer.fingerprint().map_err(|e| DatasetError::Invalid { path: dir.to_path_buf(), reason: e.to_string() })?;
        // Unreadable or from another version: written again.
        let found = std::fs::read(dir.join(CACHE_INFO)).ok().and_then(|bytes| serde_json::from_slice::<CacheInfo>(&bytes).ok()).filter(|info| info.version == CACHE_VERSION);
        Ok(Self { dir: dir.to_path_buf(), tokenizer, text_column: None, sources, found, _lock: lock })
    }

    /// The ids there are of the records' `column` (`data.columns.text`), not of `text`.
    pub fn of_column(self, column: Option<String>) -> Self {
        Self { text_column: column, ..self }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Each file's record count, where the ids there are of these files and this tokenizer.
    pub fn records(&self) -> Option<Vec<usize>> {
        self.found.as_ref().filter(|info| info.sources == self.sources && info.tokenizer == self.tokenizer && info.text_column == self.text_column).map(|info| info.records.clone())
    }

    /// The ids there, if they are of these files, tokenizer and held-out records; else why not.
    pub fn streams(&self, held_out: &[bool]) -> Result<Result<[TokenStream; 2], String>, DatasetError> {
        let Some(info) = &self.found else { return Ok(Err("nothing there yet".into())) };
        if info.sources.iter().map(|s| &s.path).ne(self.sources.iter().map(|s| &s.path)) {
            return Ok(Err("it holds other files".into()));
        }
        if let Some(changed) = info.sources.iter().zip(&self.sources).find(|(was, now)| was != now) {
            return Ok(Err(format!("{} changed", changed.1.path.display())));
        }
        if info.tokenizer != self.tokenizer {
            return Ok(Err("it was tokenized by another tokenizer".into()));
        }
        if info.text_column != self.text_column {
            return Ok(Err("it holds another column's text (data.columns.text changed)".into()));
        }
        if info.held_out != digest(held_out) {
            return Ok(Err("it holds other records out for evaluation (data.val_size, data.eval_path or train.seed changed)".into()));
        }
        let open = |i: usize| -> Result<Result<TokenStream, String>, DatasetError> {
            let (path, tokens) = (self.dir.join(CACHE_FILES[i]), info.tokens[i]);
            let Ok(file) = File::open(&path) else { return Ok(Err(format!("{} is missing", path.display()))) };
            let bytes = file.metadata().map_err(|source| DatasetError::Io { path: path.clone(), source })?.len();
            if bytes != 4 * tokens as u64 {
                return Ok(Err(format!("{} holds {bytes} bytes, not the {} of {tokens} ids", path.display(), 4 * tokens)));
            }
            Ok(Ok(TokenStream::Stored { file, path, len: tokens }))
        };
        Ok(match (open(0)?, open(1)?) {
            (Ok(train), Ok(eval)) => Ok([train, eval]),
            (Err(reason), _) | (_, Err(reason)) => Err(reason),
        })
    }

    /// Tokenizes `corpus` into the folder (each file written whole, then renamed into place;
    /// `corpus.json` last) and opens the ids there.
    pub fn write(&mut self, corpus: &Corpus, tokenizer: &Tokenizer, held_out: &[bool]) -> Result<[TokenStream; 2], DatasetError> {
        let info_path = self.dir.join(CACHE_INFO);
        match std::fs::remove_file(&info_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(DatasetError::Io { path: info_path, source: e }),
            _ => {}
        }
        let temporary = |name: &str| self.dir.join(format!("{name}.tmp-{}", std::process::id()));
        let mut sinks = [FileSink::create(&temporary(CACHE_FILES[0]))?, FileSink::create(&temporary(CACHE_FILES[1]))?];
        corpus.tokenize(tokenizer, held_out, &mut sinks)?;
        let mut tokens = [0; 2];
        for ((sink, name), count) in sinks.into_iter().zip(CACHE_FILES).zip(&mut tokens) {
            *count = sink.finish()?;
            let from = temporary(name);
            std::fs::rename(&from, self.dir.join(name)).map_err(|source| DatasetError::Io { path: from, source })?;
        }
        let info = CacheInfo { version: CACHE_VERSION, tokenizer: self.tokenizer.clone(), sources: self.sources.clone(), records: corpus.counts(), held_out: digest(held_out), text_column: self.text_column.clone(), tokens };
        let written = temporary(CACHE_INFO);
        std::fs::write(&written, serde_json::to_vec_pretty(&info).expect("plain data serializes"))
            .and_then(|()| std::fs::rename(&written, &info_path))
            .map_err(|source| DatasetError::Io { path: info_path, source })?;
        self.found = Some(info);
        self.streams(held_out)?.map_err(|reason| DatasetError::Invalid { path: self.dir.clone(), reason: format!("just written, but {reason}") })
    }
}

/// The held-out records' indices, digested.
fn digest(held_out: &[bool]) -> String {
    let mut hash = sha2::Sha256::new();
    hash.update((held_out.len() as u64).to_le_bytes());
    for (i, _) in held_out.iter().enumerate().filter(|(_, held)| **held) {
        hash.update((i as u64).to_le_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Ids written to a file as little-endian `u32`s.
struct FileSink {
    path: PathBuf,
    writer: BufWriter<File>,
    tokens: usize,
}

impl FileSink {
    fn create(path: &Path) -> Result<Self, DatasetError> {
        let file = File::create(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
        Ok(Self { path: path.to_path_buf(), writer: BufWriter::with_capacity(1 << 20, file), tokens: 0 })
    }

    /// The number of ids written, once they are on disk.
    fn finish(self) -> Result<usize, DatasetError> {
        let file = self.writer.into_inner().map_err(|e| DatasetError::Io { path: self.path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(|source| DatasetError::Io { path: self.path, source })?;
        Ok(self.tokens)
    }
}

impl TokenSink for FileSink {
    fn push(&mut self, ids: &[u32]) -> Result<(), DatasetError> {
        self.tokens += ids.len();
        let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        self.writer.write_all(&bytes).map_err(|source| DatasetError::Io { path: self.path.clone(), source })
    }
}

/// Continued pretraining's examples: a token stream cut into blocks of `cutoff_len` tokens, every
/// token trained on (LLaMA-Factory's and transformers' `run_clm` `group_texts`). Where the
/// tokenizer adds BOS, each block starts with it (LLaMA-Factory writes it over the block's first
/// token; here it comes first, so no token is lost). The last, shorter block is kept.
pub struct TextBlocks {
    ids: TokenStream,
    /// Stream tokens a block.
    block: usize,
    bos: Option<u32>,
}

impl TextBlocks {
    pub fn new(ids: TokenStream, cutoff_len: usize, bos: Option<u32>) -> Self {
        let block = cutoff_len.saturating_sub(usize::from(bos.is_some())).max(1);
        Self { ids, block, bos }
    }

    pub fn len(&self) -> usize {
        self.ids.len().div_ceil(self.block)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        i * self.block..((i + 1) * self.block).min(self.ids.len())
    }

    /// Block `i`'s tokens, BOS included.
    pub fn input_len(&self, i: usize) -> usize {
        self.range(i).len() + usize::from(self.bos.is_some())
    }

    /// Block `i`; an error only where a stored stream's file cannot be read.
    pub fn example(&self, i: usize) -> Result<Example, DatasetError> {
        let mut input_ids = Vec::with_capacity(self.input_len(i));
        input_ids.extend(self.bos);
        self.ids.copy_range(self.range(i), &mut input_ids)?;
        Ok(all_trained(input_ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_reads_back_across_chunks() {
        let ids: Vec<u32> = (0..(2 * CHUNK + 5) as u32).collect();
        let mut buffer = TokenBuffer::default();
        for piece in ids.chunks(CHUNK / 3 + 7) {
            buffer.append(piece);
        }
        let stream = TokenStream::from(buffer);
        assert_eq!(stream.len(), ids.len());
        let mut out = Vec::new();
        stream.copy_range(CHUNK - 3..2 * CHUNK + 2, &mut out).unwrap();
        assert_eq!(out, ids[CHUNK - 3..2 * CHUNK + 2]);
    }

    #[test]
    fn blocks_start_with_bos_and_keep_the_short_last_one() {
        let mut buffer = TokenBuffer::default();
        buffer.append(&[10, 11, 12, 13, 14, 15, 16]);
        let blocks = TextBlocks::new(buffer.into(), 4, Some(1));
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks.example(0).unwrap().input_ids, [1, 10, 11, 12]);
        assert_eq!(blocks.example(2).unwrap().input_ids, [1, 16]);
        assert_eq!(blocks.example(2).unwrap().labels, [1, 16]);
        assert_eq!(blocks.input_len(2), 2);
    }

    #[test]
    fn lines_skip_blanks_name_invalid_utf8_and_a_corpus_keeps_its_first_records() {
        let dir = std::env::temp_dir().join(format!("ember-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("corpus.txt");
        std::fs::write(&path, b"one\r\n\n  \ntwo\nthree").unwrap();
        assert_eq!(Corpus::count(std::slice::from_ref(&path)).unwrap().records(), 3);
        let mut lines = Lines::open(&path).unwrap();
        assert_eq!(lines.next_line().unwrap(), Some((1, "one".to_owned())));
        assert_eq!(lines.next_line().unwrap(), Some((4, "two".to_owned())));
        let other = dir.join("more.jsonl");
        std::fs::write(&other, "{\"text\": \"four\"}\n{\"text\": \"five\"}\n").unwrap();
        let both = [path.clone(), other];
        assert_eq!(Corpus::count(&both).unwrap().first(4).counts(), [3, 1]);
        assert_eq!(Corpus::count(&both).unwrap().first(2).counts(), [2]);
        std::fs::write(&path, b"ok\nbad \xff\n").unwrap();
        let e = Corpus::count(std::slice::from_ref(&path)).err().unwrap().to_string();
        assert!(e.contains("invalid UTF-8 at byte 7"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
