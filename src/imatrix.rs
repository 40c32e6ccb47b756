//! `ember imatrix`: llama.cpp's importance matrix of a model (with its adapter merged), from a
//! text file or the records of a dataset, for `ember export gguf --imatrix`.

use std::path::Path;

use ember_data::sft::{SftOptions, build_examples};
use ember_data::{Dataset, Tokenizer};
use ember_trainer::imatrix::Calibration;
use serde_json::json;

use crate::bad_input;

pub struct Request<'a> {
    pub base: &'a Path,
    pub adapter: Option<&'a Path>,
    pub data: &'a Path,
    pub out: &'a Path,
    pub template: &'a str,
    pub chunk_size: usize,
    pub chunks: Option<usize>,
    pub process_output: bool,
    pub dtype: ember_models::LoadDtype,
    pub device: &'a str,
}

/// Whether `path` holds records (JSON, JSON lines, either gzipped) rather than plain text.
fn is_dataset(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    [".json", ".jsonl", ".json.gz", ".jsonl.gz"].iter().any(|ext| name.ends_with(ext))
}

/// The calibration tokens: a text file tokenized whole, with BOS first where the tokenizer adds
/// it (as llama-imatrix reads its `-f` file); a dataset's records as training renders them
/// (`template`, answers included, each cut at `cutoff_len`), one after another.
fn calibration_tokens(tokenizer: &Tokenizer, data: &Path, template: &str, base: &Path, cutoff_len: usize) -> anyhow::Result<Vec<u32>> {
    if !is_dataset(data) {
        let text = std::fs::read(data).map_err(|e| bad_input(anyhow::anyhow!("{}: {e}", data.display())))?;
        let text = String::from_utf8(text)
            .map_err(|e| bad_input(anyhow::anyhow!("{}: not UTF-8 text (byte {})", data.display(), e.utf8_error().valid_up_to())))?;
        return Ok(tokenizer.encode(&text, true)?);
    }
    let format = ember_models::template(template, base)
        .map_err(|e| bad_input(anyhow::anyhow!(e)))?
        .ok_or_else(|| bad_input(anyhow::anyhow!("unknown template '{template}'")))?;
    let dataset = Dataset::load(data)?;
    let indices: Vec<usize> = (0..dataset.samples.len()).collect();
    let options = SftOptions { cutoff_len, train_on_inputs: true, last_turn_only: false };
    let (examples, _) = build_examples(tokenizer, &format, &dataset, &indices, &options)?;
    Ok(examples.into_iter().flat_map(|e| e.input_ids).collect())
}

pub fn run(request: &Request) -> anyhow::Result<()> {
    let device = ember_models::device::parse_device(request.device).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    if request.chunk_size < 16 {
        // llama-imatrix skips products of fewer than 16 rows.
        return Err(bad_input(anyhow::anyhow!("--ctx {}: chunks need at least 16 tokens", request.chunk_size)));
    }
    let tokenizer = ember_models::load_tokenizer(request.base)?;
    let tokens = calibration_tokens(&tokenizer, request.data, request.template, request.base, request.chunk_size)?;
    let calibration = Calibration {
        tokens: &tokens,
        chunk_size: request.chunk_size,
        bos: tokenizer.bos_id.filter(|_| tokenizer.adds_bos()),
        max_chunks: request.chunks,
        output: request.process_output,
    };
    if calibration.chunks() == 0 {
        return Err(bad_input(anyhow::anyhow!(
            "{}: {} tokens, fewer than one chunk of --ctx {}",
            request.data.display(), tokens.len(), request.chunk_size
        )));
    }
    let started = std::time::Instant::now();
    let collected = ember_trainer::imatrix::collect(request.base, request.adapter, request.dtype, None, &calibration, &device, |chunk, chunks| {
        if chunk == 1 {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!("imatrix: {seconds:.2} s per chunk of {} tokens, {chunks} chunks, about {:.1} min", request.chunk_size, seconds * chunks as f64 / 60.0);
        }
    })?;
    let dataset = request.data.display().to_string();
    ember_models::imatrix::write_gguf(request.out, &collected.entries, &[dataset], collected.chunks as u32, request.chunk_size as u32)?;
    let result = json!({
        "out": request.out, "entries": collected.entries.len(), "chunks": collected.chunks, "chunk_size": request.chunk_size,
        "tokens": collected.chunks * request.chunk_size, "data_tokens": tokens.len(), "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{result}");
    Ok(())
}
