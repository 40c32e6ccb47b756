//! `ember imatrix`: llama.cpp's importance matrix of a model (with its adapter merged), from a
//! text file or the records of a dataset, for `ember export gguf --imatrix`; added to earlier
//! matrices (`--in-file`), or only those added up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ember_models::imatrix::ColumnSquares;

use ember_data::sft::{SftOptions, build_examples};
use ember_data::{Dataset, Tokenizer};
use ember_trainer::imatrix::Calibration;
use serde_json::json;

use crate::bad_input;

pub struct Request<'a> {
    pub base: Option<&'a Path>,
    pub adapter: Option<&'a Path>,
    pub data: Option<&'a Path>,
    pub in_files: &'a [PathBuf],
    /// Write llama-imatrix's legacy `.dat` layout instead of GGUF.
    pub legacy: bool,
    pub out: &'a Path,
    pub template: &'a str,
    pub chunk_size: usize,
    pub chunks: Option<usize>,
    pub process_output: bool,
    pub dtype: ember_models::LoadDtype,
    pub device: &'a str,
}

/// Whether `path` holds records (JSON, JSON lines, either gzipped, or Parquet) rather than plain
/// text.
fn is_dataset(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    [".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet"].iter().any(|ext| name.ends_with(ext))
}

/// The calibration tokens: a text file tokenized whole, with BOS first where the tokenizer adds
/// it (as llama-imatrix reads its `-f` file); a dataset's records as training renders them
/// (`template`, answers included, each cut at `cutoff_len`), one after another.
fn calibration_tokens(tokenizer: &Tokenizer, data: &Path, template: &str, base: &Path, adapter: Option<&Path>, cutoff_len: usize) -> anyhow::Result<Vec<u32>> {
    let data = &ember_models::hub::data_file(data, ember_models::hub::Fetch::Download)?;
    if !is_dataset(data) {
        let text = std::fs::read(data).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", data.display())))?;
        let text = String::from_utf8(text)
            .map_err(|e| bad_input(anyhow::anyhow!("{}: not UTF-8 text (byte {})", data.display(), e.utf8_error().valid_up_to())))?;
        return Ok(tokenizer.encode(&text, true)?);
    }
    let format = crate::format(template, base, adapter)?;
    let dataset = Dataset::load(data)?;
    let indices: Vec<usize> = (0..dataset.samples.len()).collect();
    let options = SftOptions { cutoff_len, train_on_inputs: true, last_turn_only: false };
    let (examples, _) = build_examples(tokenizer, &format, &dataset, &indices, &options)?;
    Ok(examples.into_iter().flat_map(|e| e.input_ids).collect())
}

pub fn run(request: &Request) -> anyhow::Result<()> {
    if request.chunk_size < 16 {
        // llama-imatrix skips products of fewer than 16 rows.
        return Err(bad_input(anyhow::anyhow!("--ctx {}: chunks need at least 16 tokens", request.chunk_size)));
    }
    let started = std::time::Instant::now();
    // The earlier matrices, added up as llama-imatrix's --in-file does.
    let mut entries: BTreeMap<String, ColumnSquares> = BTreeMap::new();
    let mut datasets = Vec::new();
    for path in request.in_files {
        let (file_entries, file_datasets) = ember_models::imatrix::read_sums(path, request.chunk_size)?;
        for (name, squares) in file_entries {
            let total = entries.entry(name.clone()).or_default();
            let columns = total.sums.len();
            total.merge(&squares).ok_or_else(|| {
                bad_input(anyhow::anyhow!("{}: '{name}' has {} columns, the matrices before it {columns}", path.display(), squares.sums.len()))
            })?;
        }
        datasets.extend(file_datasets);
    }
    let (data_tokens, new_chunks) = match request.data {
        Some(data) => {
            let base = request.base.ok_or_else(|| bad_input(anyhow::anyhow!("--data needs --base, the model to run it through")))?;
            let (collected, tokens) = collect(request, base, data, started)?;
            for (name, squares) in collected.entries {
                let total = entries.entry(name.clone()).or_default();
                let columns = total.sums.len();
                total.merge(&squares).ok_or_else(|| {
                    bad_input(anyhow::anyhow!("{}: the model's '{name}' has {} columns, the --in-file matrices' {columns}", base.display(), squares.sums.len()))
                })?;
            }
            datasets.push(data.display().to_string());
            (tokens, collected.chunks)
        }
        None if request.in_files.is_empty() => return Err(bad_input(anyhow::anyhow!("give --data (with --base) or --in-file matrices to add up"))),
        None => (0, 0),
    };
    // As llama-imatrix: the chunks of the entry that counted the most tokens.
    let chunks = entries.values().map(|e| e.tokens).max().unwrap_or(0) / request.chunk_size as u64;
    let write = if request.legacy { ember_models::imatrix::write_legacy } else { ember_models::imatrix::write_gguf };
    write(request.out, &entries, &datasets, chunks as u32, request.chunk_size as u32)?;
    let result = json!({
        "out": request.out, "entries": entries.len(), "chunks": chunks, "chunk_size": request.chunk_size, "in_files": request.in_files.len(),
        "new_chunks": new_chunks, "tokens": new_chunks * request.chunk_size, "data_tokens": data_tokens, "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{result}");
    Ok(())
}

/// `data` run through `base` (with the request's adapter): the matrix and the data's token count.
fn collect(request: &Request, base: &Path, data: &Path, started: std::time::Instant) -> anyhow::Result<(ember_trainer::imatrix::Collected, usize)> {
    let device = crate::device(request.device)?;
    let tokenizer = ember_models::load_tokenizer(base)?;
    let tokens = calibration_tokens(&tokenizer, data, request.template, base, request.adapter, request.chunk_size)?;
    let calibration = Calibration {
        tokens: &tokens,
        chunk_size: request.chunk_size,
        bos: tokenizer.added_bos(),
        max_chunks: request.chunks,
        output: request.process_output,
    };
    if calibration.chunks() == 0 {
        return Err(bad_input(anyhow::anyhow!("{}: {} tokens, fewer than one chunk of --ctx {}", data.display(), tokens.len(), request.chunk_size)));
    }
    let collected = ember_trainer::imatrix::collect(base, request.adapter, request.dtype, None, &calibration, &device, |chunk, chunks| {
        if chunk == 1 {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!("imatrix: {seconds:.2} s per chunk of {} tokens, {chunks} chunks, about {:.1} min", request.chunk_size, seconds * chunks as f64 / 60.0);
        }
    })?;
    Ok((collected, tokens.len()))
}
