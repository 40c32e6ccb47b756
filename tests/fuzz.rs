//! Fuzzing (proptest) of every reader that takes a user's file: Alpaca data, plain-text corpora, recipes and their
//! `--set` overrides, safetensors headers, GGUF headers and a GGUF model's tensors as HF names. Each gets random bytes and random
//! mutations of a valid file and must answer Ok or an error, never panic. `PROPTEST_CASES`
//! sets the cases per test (CI: the default 256; `scripts/fuzz.sh` runs far more).

mod common;

use std::path::{Path, PathBuf};

use ember_models::Checkpoint;
use ember_models::gguf::GgufFile;
use ember_models::hub::Fetch;
use proptest::prelude::*;

/// Byte edits: (position, kind, byte); kind 0 overwrites, 1 inserts, 2 deletes, 3 truncates.
fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), 0u8..4, any::<u8>()), 1..10)
}

fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(at, kind, byte) in edits {
        let at = if bytes.is_empty() { 0 } else { at % bytes.len() };
        match kind {
            0 if !bytes.is_empty() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 if !bytes.is_empty() => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// A scratch file in a folder of its own, removed with the returned guard.
fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("ember-fuzz-").tempdir().unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

const ALPACA: &str = r#"[{"instruction": "Give three tips.", "input": "", "output": "Eat, sleep, move."},
 {"instruction": "Translate", "input": "你好", "output": "Hello"}, {"instruction": "x", "output": "y", "extra": 1}]"#;

const CHAT: &str = "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n\
    {\"conversations\": [{\"from\": \"human\", \"value\": \"你好\"}, {\"from\": \"gpt\", \"value\": \"好\"}]}\n\
    {\"instruction\": \"i\", \"output\": \"o\", \"history\": [[\"q\", \"a\"]], \"system\": \"s\"}\n";

/// Plain-text corpora, one a reader: a JSON array (read an element at a time), JSON Lines, text.
const CORPORA: [(&str, &str); 3] = [
    ("c.json", "[{\"text\": \"first document\"},\n {\"text\": \"第二个\"}, {\"text\": \"\\u00e9t\\u00e9\"}]"),
    ("c.jsonl", "{\"text\": \"first document\"}\n\n{\"text\": \"第二个\"}\n"),
    ("c.txt.gz", "first document\r\n第二个\n"),
];

/// tiny_llama's tokenizer, loaded once.
fn tokenizer() -> &'static ember_data::Tokenizer {
    static TOKENIZER: std::sync::OnceLock<ember_data::Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| ember_data::Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama")).unwrap())
}

/// The small SentencePiece model of tests/fixtures (BPE, byte fallback, a user-defined piece).
fn sentencepiece_model() -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/sp_bpe/tokenizer.model")).unwrap()
}

const RECIPE: &str = "[model]\npath = \"m\"\ndevice = \"flex\"\n[adapter]\nmethod = \"lora\"\nr = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\
    [data]\npath = \"d.json\"\ntemplate = \"alpaca\"\ncutoff_len = 256\n[train]\nlr = 3e-4\nmax_steps = 10\nlr_scheduler = \"cosine\"\n[output]\ndir = \"out\"\n";

/// Opens a safetensors file and reads every tensor's bytes, as loading does.
fn read_safetensors(path: &Path) {
    if let Ok(checkpoint) = Checkpoint::open_file(path) {
        let keys: Vec<String> = checkpoint.keys().map(str::to_owned).collect();
        for key in keys {
            let _ = checkpoint.bytes(&key);
        }
    }
}

fn valid_safetensors() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    common::write_micro_llama(dir.path(), 8);
    std::fs::read(dir.path().join("model.safetensors")).unwrap()
}

/// A small GGUF v3 file: two metadata keys (a string array among them) and two tensors.
fn valid_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(2u64.to_le_bytes()); // tensors
    out.extend(2u64.to_le_bytes()); // metadata keys
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    string(&mut out, "tokenizer.ggml.tokens");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    string(&mut out, "a");
    string(&mut out, "b");
    for (name, dims, ggml_type, offset) in [("w", vec![32u64, 2], 8u32, 0u64), ("n", vec![4u64], 0, 96)] {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend((0..112u32).map(|i| (i * 7) as u8)); // Q8_0: 2 blocks of 34 bytes, padded; then 4 f32
    out
}

fn read_gguf(path: &Path) {
    if let Ok(file) = GgufFile::open(path) {
        for tensor in &file.tensors {
            let _ = file.dequantize(tensor);
        }
        let _ = ember_models::gguf::tokenizer_json(&file.metadata);
    }
}

/// tests/fixtures/ggml_quants/tiny_llama_fp4.gguf (NVFP4 projections with `.scale` and
/// `.input_scale` tensors, an MXFP4 one) and where its tensor infos are: 24 of them, in the
/// 2,048 bytes from the first one's name length.
fn fp4_gguf() -> (Vec<u8>, std::ops::Range<usize>) {
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml_quants/tiny_llama_fp4.gguf")).unwrap();
    let mut needle = 17u64.to_le_bytes().to_vec();
    needle.extend(b"token_embd.weight");
    let start = bytes.windows(needle.len()).position(|w| w == needle).expect("the first tensor info");
    (bytes, start..start + 2048)
}

/// The file's tensors under their HF names, with NVFP4's tensor scales, and its config.
fn read_gguf_model(path: &Path) {
    if let Ok(file) = GgufFile::open(path) {
        let _ = file.hf_tensors();
        let _ = file.config_json();
    }
}

#[test]
fn seeds_are_valid() {
    assert_eq!(ember_data::dataset::parse(Path::new("d.json"), ALPACA.as_bytes().to_vec(), &Default::default()).unwrap().len(), 3);
    assert_eq!(ember_data::dataset::parse(Path::new("d.jsonl"), CHAT.as_bytes().to_vec(), &Default::default()).unwrap().len(), 3);
    assert_eq!(ember_data::sentencepiece::ModelProto::parse(&sentencepiece_model()).unwrap().pieces.len(), 2000);
    for file in ["views.bin", "legacy_views.bin"] {
        let views = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_bin").join(file)).unwrap();
        assert_eq!(ember_models::torch::count_tensors(Path::new(file), &views).unwrap(), 5);
    }
    ember_trainer::Recipe::parse(Path::new("/r/recipe.toml"), RECIPE, &[], &[], Fetch::CacheOnly).unwrap();
    let (_dir, path) = scratch("seed.safetensors");
    std::fs::write(&path, valid_safetensors()).unwrap();
    assert_eq!(Checkpoint::open_file(&path).unwrap().keys().count(), 11);
    let (_dir, path) = scratch("seed.gguf");
    std::fs::write(&path, valid_gguf()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.dequantize(&file.tensors[1]).len(), 4);
    let (bytes, infos) = fp4_gguf();
    let (_dir, path) = scratch("seed-fp4.gguf");
    std::fs::write(&path, &bytes[..]).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensors.len(), 24);
    assert!(file.hf_tensors().unwrap().0.iter().filter(|hf| hf.scale.is_some()).count() == 6 && infos.end < bytes.len());
}

proptest! {
    #[test]
    fn alpaca_reader_never_panics(edits in edits(), raw in prop::collection::vec(any::<u8>(), 0..200), jsonl in any::<bool>()) {
        let name = if jsonl { "d.jsonl" } else { "d.json" };
        let _ = ember_data::dataset::parse(Path::new(name), mutate(ALPACA.as_bytes(), &edits), &Default::default());
        let _ = ember_data::dataset::parse(Path::new(name), raw.clone(), &Default::default());
        let _ = ember_data::dataset::parse(Path::new("d.json.gz"), raw, &Default::default());
    }

    /// A corpus is counted, then read again and tokenized, as training streams it.
    #[test]
    fn text_corpus_reader_never_panics(edits in edits(), which in 0usize..3, gzip in any::<bool>()) {
        use ember_data::text::{Corpus, TokenBuffer};
        let (name, seed) = CORPORA[which];
        let mut bytes = mutate(seed.as_bytes(), &edits);
        if name.ends_with(".gz") && gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &bytes).unwrap();
            bytes = gz.finish().unwrap();
        }
        let (_dir, path) = scratch(name);
        std::fs::write(&path, bytes).unwrap();
        if let Ok(corpus) = Corpus::count(std::slice::from_ref(&path)) {
            let held_out: Vec<bool> = (0..corpus.records()).map(|i| i % 2 == 1).collect();
            let _ = corpus.tokenize(tokenizer(), &held_out, &mut [TokenBuffer::default(), TokenBuffer::default()]);
            let _ = corpus.head(2);
        }
    }

    /// Parquet files as the Hub's `datasets` writes them: nested lists of structs (snappy), and
    /// text rows (zstd) read as a streamed corpus.
    #[test]
    fn parquet_reader_never_panics(edits in edits(), text in any::<bool>()) {
        use ember_data::text::{Corpus, TokenBuffer};
        let seed = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parquet").join(if text { "zh_text_sample.parquet" } else { "chat_sample.parquet" })).unwrap();
        let bytes = mutate(&seed, &edits);
        let _ = ember_data::dataset::parse(Path::new("d.parquet"), bytes.clone(), &Default::default());
        let (_dir, path) = scratch("c.parquet");
        std::fs::write(&path, bytes).unwrap();
        if let Ok(corpus) = Corpus::count(std::slice::from_ref(&path)) {
            let held_out = vec![false; corpus.records()];
            let _ = corpus.tokenize(tokenizer(), &held_out, &mut [TokenBuffer::default(), TokenBuffer::default()]);
        }
    }

    #[test]
    fn chat_reader_never_panics(edits in edits(), mapped in any::<bool>()) {
        use ember_data::columns::{Columns, Mapping, Tags};
        // Keys and role names renamed as `[data.columns]` and `[data.tags]` rename them.
        let mapping = match mapped {
            true => Mapping {
                columns: Columns { prompt: Some("output".into()), messages: Some("messages".into()), ..Default::default() },
                tags: Tags { user_tag: Some("human".into()), content_tag: Some("content".into()), ..Default::default() },
            },
            false => Mapping::default(),
        };
        // With tool calls: LLaMA-Factory's function_call turns and tools column, OpenAI's tool_calls.
        let seed = [CHAT, include_str!("data/tool_calls.jsonl")].concat();
        let _ = ember_data::dataset::parse(Path::new("d.jsonl"), mutate(seed.as_bytes(), &edits), &mapping);
    }

    #[test]
    fn tokenizer_model_readers_never_panic(edits in edits(), raw in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(model) = ember_data::sentencepiece::ModelProto::parse(&mutate(&sentencepiece_model(), &edits)) {
            let json = ember_data::sentencepiece::tokenizer_json(&model, &[], &Default::default());
            let _ = tokenizers::Tokenizer::from_bytes(json.to_string());
            if let Some(encoder) = ember_data::sentencepiece::BpeEncoder::new(&model) {
                let _ = encoder.encode("Hello 你好 🦙");
            }
        }
        let _ = ember_data::sentencepiece::ModelProto::parse(&raw);
        let _ = ember_data::tiktoken::parse_ranks(&String::from_utf8_lossy(&raw));
    }

    #[test]
    fn torch_bin_reader_never_panics(edits in edits()) {
        for file in ["views.bin", "legacy_views.bin"] {
            let real = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_bin").join(file)).unwrap();
            let _ = ember_models::torch::count_tensors(Path::new("pytorch_model.bin"), &mutate(&real, &edits));
        }
    }

    #[test]
    fn recipe_parser_never_panics(edits in edits(), overrides in prop::collection::vec(".{0,40}", 0..3)) {
        let text = String::from_utf8_lossy(&mutate(RECIPE.as_bytes(), &edits)).into_owned();
        let _ = ember_trainer::Recipe::parse(Path::new("/r/recipe.toml"), &text, &[], &[], Fetch::CacheOnly);
        let _ = ember_trainer::Recipe::parse(Path::new("/r/recipe.toml"), RECIPE, &[], &overrides, Fetch::CacheOnly);
    }

    #[test]
    fn safetensors_reader_never_panics(edits in edits(), header_edits in prop::collection::vec((0usize..2000, any::<u8>()), 1..6)) {
        let seed = valid_safetensors();
        let (_dir, path) = scratch("fuzz.safetensors");
        std::fs::write(&path, mutate(&seed, &edits)).unwrap();
        read_safetensors(&path);
        // Edits inside the JSON header, where the offsets, shapes and dtypes are.
        let mut bytes = seed;
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, byte) in header_edits {
            bytes[8 + at % header_len] = byte;
        }
        std::fs::write(&path, bytes).unwrap();
        read_safetensors(&path);
    }

    #[test]
    fn gguf_reader_never_panics(edits in edits()) {
        let (_dir, path) = scratch("fuzz.gguf");
        std::fs::write(&path, mutate(&valid_gguf(), &edits)).unwrap();
        read_gguf(&path);
    }

    /// Edits of tiny_llama_fp4.gguf's tensor infos (names, dimensions, types, offsets): its
    /// mapping to HF names and its `.scale` tensors are errors, never panics.
    #[test]
    fn gguf_model_mapping_never_panics(edits in edits()) {
        let (bytes, infos) = fp4_gguf();
        let mutated = [&bytes[..infos.start], &mutate(&bytes[infos.clone()], &edits), &bytes[infos.end..]].concat();
        let (_dir, path) = scratch("fuzz-fp4.gguf");
        std::fs::write(&path, mutated).unwrap();
        read_gguf_model(&path);
    }
}
