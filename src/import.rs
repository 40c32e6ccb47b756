//! `ember import`: other checkpoint formats into HF model folders.

use std::path::Path;

use ember_models::gguf;

use crate::inspect::group_digits;

pub fn gguf(file: &Path, out: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let summary = gguf::import_llama(file, out)?;
    println!(
        "imported {} -> {}: {} tensors, {} parameters (f32), {} tokenizer, {:.1}s",
        file.display(),
        out.display(),
        summary.tensors,
        group_digits(summary.parameters),
        summary.tokenizer_model,
        started.elapsed().as_secs_f64()
    );
    if !summary.skipped.is_empty() {
        println!("not converted (recomputed from config): {}", summary.skipped.join(", "));
    }
    Ok(())
}
