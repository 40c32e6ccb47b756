//! The `ember` command line.
//!
//! Exit codes: 0 success, 1 a failure while running, 2 bad input (a missing or malformed file,
//! an unsupported model, a wrong argument).

mod import;
mod inspect;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Parameter-efficient fine-tuning (LoRA, prefix tuning, LLaMA-Adapter) for LLaMA and GLM models.
#[derive(Parser)]
#[command(name = "ember", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe an HF model folder: architecture, shapes, parameter count, dtype, tokenizer.
    Inspect {
        /// Folder with config.json, safetensors weights and tokenizer.json.
        model: PathBuf,
    },
    /// Fine-tune an adapter as a recipe file describes; writes the adapter (PEFT format),
    /// metrics.jsonl and summary.json into the recipe's output folder.
    Train {
        /// The TOML recipe.
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set train.lr=1e-4` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Print only errors and the final summary line.
        #[arg(long)]
        quiet: bool,
    },
    /// Convert a checkpoint from another format into an HF model folder.
    #[command(subcommand)]
    Import(ImportCommand),
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A LLaMA-architecture GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors), dequantized to f32.
    Gguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output folder (written atomically; replaced if it exists).
        #[arg(long)]
        out: PathBuf,
    },
}

/// An error caused by the user's input (exit code 2), as opposed to a failure while running.
#[derive(Debug)]
pub struct BadInput(pub anyhow::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for BadInput {}

/// Marks load/parse errors as bad input.
pub fn bad_input(error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(BadInput(error.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect { model } => inspect::run(&model),
        Command::Import(ImportCommand::Gguf { file, out }) => import::gguf(&file, &out),
        Command::Train { recipe, overrides, quiet } => train::run(&recipe, &overrides, quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<BadInput>().is_some() { ExitCode::from(2) } else { ExitCode::from(1) }
        }
    }
}
