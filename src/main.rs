//! The `ember` command line.
//!
//! Exit codes: 0 success, 1 a failure while running, 2 bad input (a missing or malformed file,
//! an unsupported model, a wrong argument).

mod chat;
mod data;
mod eval;
mod exam;
mod generate;
mod imatrix;
mod import;
mod inspect;
mod recipe_check;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use ember_trainer::TrainError;

use clap::{Parser, Subcommand};

/// Parameter-efficient fine-tuning (LoRA, prefix tuning, LLaMA-Adapter) for LLaMA and GLM models.
#[derive(Parser)]
#[command(name = "ember", version, about, long_about = None, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure while running (NaN loss, an adapter that stayed zero, I/O)
  2  bad input (a missing or malformed file, record, key or argument; the message names it)";

#[derive(Subcommand)]
enum Command {
    /// Describe a model folder or a training run's output folder.
    ///
    /// A model: architecture, shapes, parameter count, dtype, tokenizer. A run (a folder with
    /// summary.json, adapter/ or checkpoints/): method and settings, trainable parameters, steps,
    /// losses and output paths; an unfinished run from its newest checkpoint.
    Inspect {
        /// A model folder (config.json, safetensors weights, tokenizer.json), or a run's output
        /// folder (summary.json, adapter/ or checkpoints/).
        #[arg(required_unless_present = "recipe")]
        model: Option<PathBuf>,
        /// Inspect a recipe's model, what its adapter would train and its estimated peak memory.
        #[arg(long, conflicts_with = "model")]
        recipe: Option<PathBuf>,
        /// With --recipe: size a model shape instead of the recipe's model (a preset: llama-7b,
        /// llama-13b, llama3-8b, smollm2-135m; or a config.json), for a checkpoint not on this machine.
        #[arg(long, requires = "recipe")]
        shape: Option<String>,
        /// With --recipe: override a recipe key, e.g. `--set train.micro_batch_size=4`
        /// (repeatable), after EMBER_<SECTION>__<KEY> environment variables, as `ember train` does.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE", requires = "recipe")]
        overrides: Vec<String>,
    },
    /// Fine-tune an adapter as a recipe file describes.
    ///
    /// Writes the adapter (PEFT format), metrics.jsonl, summary.json and training_curves.png
    /// into the recipe's output folder.
    Train {
        /// The TOML recipe.
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set train.lr=1e-4` (repeatable). Applied after
        /// EMBER_<SECTION>__<KEY> environment variables (e.g. EMBER_TRAIN__MAX_STEPS=3).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue from the newest checkpoint in the output folder (see train.save_steps).
        #[arg(long)]
        resume: bool,
        /// Replace the run already in the output folder (otherwise ember refuses to mix runs).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Print only errors and the final summary line.
        #[arg(long, conflicts_with = "json")]
        quiet: bool,
        /// Print one JSON object per line: {"event": "info" | "step" | "summary", ...}.
        #[arg(long)]
        json: bool,
    },
    /// Validate recipe files without training (`ember recipe check`).
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Draw a run's loss and learning-rate curves into <run dir>/training_curves.png.
    ///
    /// Reads the run's metrics.jsonl; `ember train` draws the same plot at the end of every run.
    Plot {
        /// The run's output folder (holds metrics.jsonl).
        run: PathBuf,
    },
    /// Fold a LoRA adapter into its base and write a complete HF model folder.
    Merge {
        /// Base model folder.
        #[arg(long)]
        base: PathBuf,
        /// PEFT LoRA adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Output dtype: keep (the base's), f32, bf16 or f16.
        #[arg(long, default_value = "keep")]
        dtype: String,
        /// A Jinja chat template (.jinja file) the adapter was trained with, written into the
        /// merged tokenizer instead of the base's (LLaMA-Factory's export --template); default:
        /// the adapter's chat_template.jinja, where training with a .jinja template left one.
        #[arg(long, value_name = "FILE")]
        chat_template: Option<PathBuf>,
    },
    /// Answer an instruction with a base model and optionally an adapter.
    Generate {
        /// Base model folder.
        #[arg(long)]
        base: PathBuf,
        /// Adapter folder: PEFT LoRA, prefix tuning or adaption prompts, or ChatGLM P-Tuning v2.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The instruction.
        #[arg(long)]
        prompt: String,
        /// Optional input (context) for the instruction.
        #[arg(long, default_value = "")]
        input: String,
        /// Prompt template (alpaca, alpaca-lora), chat template (chatglm2, chatglm3, glm4,
        /// llama2-chat, llama3, chatml, auto: the adapter's chat_template.jinja or the model's own, or a .jinja file), or none (raw prompt).
        #[arg(long, default_value = "alpaca")]
        template: String,
        #[command(flatten)]
        sampling: Sampling,
        /// Also write the prompt ids, answer ids and the prompt's last-position logits as JSON
        /// (to compare ember with another runtime, e.g. llama.cpp).
        #[arg(long)]
        logits_out: Option<PathBuf>,
        /// flex, libtorch, cuda or cuda:N.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Talk with a base model and optionally an adapter: one message a line of standard input.
    ///
    /// With a chat template the conversation is kept (and the KV cache with it: each turn runs
    /// only the tokens it adds); with a prompt template each message is answered on its own.
    /// Answers are written as they are generated; /clear starts a new conversation, /exit or the
    /// end of input ends.
    Chat {
        /// Base model folder.
        #[arg(long)]
        base: PathBuf,
        /// Adapter folder (any format `generate` takes).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Chat template (auto: the adapter's chat_template.jinja or the model's own, chatglm3, glm4, llama3, chatml, …, or a .jinja
        /// file) or prompt template (alpaca: no history).
        #[arg(long, default_value = "auto")]
        template: String,
        /// A system message first in every conversation (chat templates).
        #[arg(long)]
        system: Option<String>,
        /// A JSON file of function schemas the model may call (a list, as a record's `tools`),
        /// rendered by a template that takes tools (chatglm3, glm4, or a Jinja one that renders them); a
        /// line `/tool RESULT` gives a call's result back and the model goes on.
        #[arg(long)]
        tools: Option<PathBuf>,
        #[command(flatten)]
        sampling: Sampling,
        /// One JSON object a turn: {"turn", "prompt_tokens", "reused_tokens", "answer_tokens", "answer"}.
        #[arg(long)]
        json: bool,
        /// flex, libtorch, cuda or cuda:N.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Accuracy on multiple-choice questions (MMLU, C-Eval, CMMLU), base vs base + adapter.
    ///
    /// As LLaMA-Factory's `eval`: each question follows --shots solved examples of its subject
    /// (the first rows of its --dev file) and is answered by the highest of the logits of "A",
    /// "B", "C" and "D" after the answer cue. Prints one JSON line: accuracy overall, by subject,
    /// and by category where a `mapping.json` (LLaMA-Factory's) lies beside the files or above them.
    Exam {
        /// Base model folder.
        #[arg(long)]
        base: PathBuf,
        /// Adapter folder (any format `generate` takes).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Files of questions or folders of them, a subject a file (`abstract_algebra_test.csv`,
        /// or the folder of a Hub shard: `accountant/test-00000-of-00001.parquet`): CSV
        /// (question,A,B,C,D,answer without a header, or a header naming those columns), or JSON /
        /// JSON Lines / Parquet records as the Hub's MMLU, C-Eval and CMMLU hold them (a record's
        /// `subject` overrides the file's); hf://datasets/org/name/file or pattern for the Hub's.
        #[arg(long, num_args = 1.., required = true)]
        test: Vec<PathBuf>,
        /// The solved examples: files or folders as --test, matched to it by subject
        /// (`abstract_algebra_dev.csv`).
        #[arg(long, num_args = 1..)]
        dev: Vec<PathBuf>,
        /// Solved examples before each question.
        #[arg(long, default_value_t = 0)]
        shots: usize,
        /// The opening line and answer cue: en ("Answer:") or zh ("答案：").
        #[arg(long, value_enum, default_value = "en")]
        lang: exam::Lang,
        /// fewshot (plain text, for base models) or a chat template (auto, chatglm3, llama3, …).
        #[arg(long, default_value = "fewshot")]
        template: String,
        /// Only the first N questions of each subject (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Questions a forward pass (right-padded).
        #[arg(long, default_value_t = 4, value_parser = at_least_one)]
        batch: usize,
        /// JSONL file: each question's answer and each model's pick and choice logits.
        #[arg(long)]
        answers: Option<PathBuf>,
        /// flex, libtorch, cuda or cuda:N.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Score the base and base + adapter on an Alpaca file or plain text; optionally their answers side by side.
    ///
    /// Loss and perplexity over the answer tokens only, as in training; with --template text,
    /// over every token of a plain-text corpus in blocks of --cutoff-len, read as a stream.
    /// Prints one JSON line. With --generate N --answers FILE, also writes both models' greedy
    /// answers to the first N instructions.
    Eval {
        /// Base model folder.
        #[arg(long)]
        base: PathBuf,
        /// Adapter folder (any format `generate` takes).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Alpaca, ShareGPT or OpenAI-messages JSON / JSONL (.gz too) or Parquet; plain text
        /// (.txt, or {"text": …} records) with --template text. A folder or file-name pattern
        /// (quoted) reads its files; hf://datasets/org/name[/file or pattern] a hub dataset's.
        #[arg(long)]
        data: PathBuf,
        /// The records' keys where they are not ember's, as the recipe's [data.columns]:
        /// 'query = "context", response = "response"'.
        #[arg(long)]
        columns: Option<String>,
        /// A conversation's turn keys and role names, as the recipe's [data.tags].
        #[arg(long)]
        tags: Option<String>,
        /// Prompt template, as in the recipe.
        #[arg(long, default_value = "alpaca")]
        template: String,
        /// Longest example, in tokens (longer ones are truncated, as in training).
        #[arg(long, default_value_t = 256)]
        cutoff_len: usize,
        /// Examples per forward pass.
        #[arg(long, default_value_t = 4, value_parser = at_least_one)]
        batch: usize,
        /// Only the first N records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Greedy answers of the base and of base + adapter to the first N records.
        #[arg(long, value_name = "N", default_value_t = 0, requires = "answers")]
        generate: usize,
        /// JSONL file for the --generate answers: {"index", "instruction", "input", "reference",
        /// "base", "adapter"} per line (written atomically).
        #[arg(long, requires = "generate")]
        answers: Option<PathBuf>,
        /// Longest answer, in tokens, for --generate.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// flex, libtorch, cuda or cuda:N.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Convert a checkpoint or tokenizer from another format into an HF model folder.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Write a model or an adapter for llama.cpp (`ember export gguf|gguf-lora`).
    #[command(subcommand)]
    Export(ExportCommand),
    /// llama.cpp's importance matrix of a model (merged with its adapter, if given), as
    /// `llama-imatrix` computes it: for `ember export gguf --imatrix` or `llama-quantize --imatrix`.
    ///
    /// The calibration tokens are cut into chunks of --ctx (each starting with BOS where the
    /// tokenizer adds one), each run on its own; every decoder projection's entry sums the squares
    /// of its inputs per column. Writes llama-imatrix's GGUF layout; prints one JSON line.
    Imatrix {
        /// Model folder, hub id or GGUF file (needed with --data).
        #[arg(long)]
        base: Option<PathBuf>,
        /// An adapter that merges into the weights (LoRA, DoRA, (IA)³): the matrix is then the
        /// merged model's, the one `ember export gguf --adapter` writes.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Calibration data: a text file (tokenized whole, as llama-imatrix's -f), or Alpaca /
        /// chat records (.json, .jsonl, optionally .gz) rendered with --template, answers included.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Importance matrices to add up first (llama-imatrix's --in-file; GGUF, or the legacy
        /// .dat taken as --ctx tokens a call), then --data's, if given (repeatable).
        #[arg(long = "in-file")]
        in_files: Vec<PathBuf>,
        /// The importance matrix to write.
        #[arg(long)]
        out: PathBuf,
        /// gguf, or dat: llama-imatrix's legacy layout (its --output-format).
        #[arg(long = "output-format", default_value = "gguf", value_parser = ["gguf", "dat"])]
        output_format: String,
        /// Prompt template for records (alpaca, alpaca-lora), chat template (chatglm2, chatglm3,
        /// glm4, llama2-chat, llama3, chatml, auto: the adapter's chat_template.jinja or the model's own), as in the recipe.
        #[arg(long, default_value = "alpaca")]
        template: String,
        /// Tokens per chunk (llama-imatrix's --ctx-size).
        #[arg(long = "ctx", default_value_t = 512)]
        chunk_size: usize,
        /// At most this many chunks (default: every whole chunk of the data).
        #[arg(long)]
        chunks: Option<usize>,
        /// Also the output layer's input (llama-imatrix's --process-output), where the head is
        /// not tied to the embedding.
        #[arg(long)]
        process_output: bool,
        /// The base's dtype in memory: f32, bf16 (half a folder's f32 memory) or checkpoint. A
        /// GGUF base's quantized blocks stay as they are.
        #[arg(long, default_value = "f32", value_parser = ember_models::LoadDtype::parse)]
        dtype: ember_models::LoadDtype,
        /// flex, libtorch, cuda or cuda:N.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Look at training data as a recipe turns it into examples (`ember data preview`).
    #[command(subcommand)]
    Data(DataCommand),
    /// Measure training throughput (tokens/s) as shared/bench/peft_reference.py does.
    ///
    /// Runs the reference's workload step for step; prints one JSON line with its fields.
    Bench(BenchArgs),
}

/// How `generate` and `chat` pick tokens.
#[derive(clap::Args)]
struct Sampling {
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 for greedy decoding.
    #[arg(long, default_value_t = 0.0, value_parser = temperature)]
    temperature: f64,
    /// Sample from this many most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: sample from the most likely tokens that reach this probability.
    #[arg(long, default_value_t = 1.0, value_parser = probability)]
    top_p: f64,
    /// Drop the tokens less likely than this times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    min_p: f64,
    /// transformers' repetition penalty, greedy or sampled: each token already in the prompt or
    /// the answer has its logit divided by this if positive, multiplied if negative (1: off).
    #[arg(long, default_value_t = 1.0, value_parser = repetition_penalty)]
    repetition_penalty: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A count that must be at least 1 (a batch, a length, timed steps).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

/// `--temperature`: a finite number, at least 0.
fn temperature(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err("expected a number of at least 0 (0: greedy)".into()),
    }
}

/// `--top-p`, `--min-p`: a probability, as transformers' (0 to 1).
fn probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("expected a probability from 0 to 1".into()),
    }
}

/// `--repetition-penalty`: a finite number above 0, as transformers requires.
fn repetition_penalty(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if p.is_finite() && p > 0.0 => Ok(p),
        _ => Err("expected a number above 0 (1: off)".into()),
    }
}

impl Sampling {
    fn options(&self) -> ember_models::generate::GenerationOptions {
        ember_models::generate::GenerationOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..ember_models::generate::GenerationOptions::greedy(self.max_new_tokens, Vec::new())
        }
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    /// HF model folder.
    #[arg(long, required_unless_present = "synthetic")]
    model: Option<PathBuf>,
    /// Random weights of this shape instead: llama-7b, llama-13b, llama3-8b, smollm2-135m, or a
    /// config.json (needs --tokenizer).
    #[arg(long, conflicts_with = "model", requires = "tokenizer")]
    synthetic: Option<String>,
    /// Folder with tokenizer.json for --synthetic.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Alpaca JSON (or .json.gz).
    #[arg(long)]
    data: PathBuf,
    /// A method's recipe name: lora, dora, ia3, prefix, adaption or prompt_tuning.
    #[arg(long, default_value = "lora")]
    method: String,
    /// LoRA/DoRA rank (recipe: adapter.r).
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// LoRA/DoRA alpha (recipe: adapter.alpha).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Comma-separated module suffixes, or all-linear (recipe: adapter.target_modules).
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// Prefix or prompt tuning's virtual tokens (recipe: adapter.num_virtual_tokens).
    #[arg(long, default_value_t = 16)]
    virtual_tokens: usize,
    /// Adaption prompt length (recipe: adapter.adapter_len).
    #[arg(long, default_value_t = 10)]
    adapter_len: usize,
    /// Layers with adaption prompts (recipe: adapter.adapter_layers).
    #[arg(long, default_value_t = 8)]
    adapter_layers: usize,
    /// Any other key of the method's [adapter] section, e.g. `--adapter use_rslora=true` (repeatable).
    #[arg(long = "adapter", value_name = "KEY=VALUE")]
    adapter_keys: Vec<String>,
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    batch: usize,
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    cutoff: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    steps: usize,
    /// Untimed steps first. With 0 and one timed step, the peak RSS lacks AdamW's moments, which
    /// exist from the second step on.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// CPU threads of the flex backend (sets RAYON_NUM_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// flex, libtorch, cuda or cuda:N.
    #[arg(long, default_value = "flex")]
    device: ember_models::device::DeviceName,
    /// Frozen base dtype: f32, bf16 or checkpoint.
    #[arg(long, default_value = "f32", value_parser = ember_models::LoadDtype::parse)]
    dtype: ember_models::LoadDtype,
    /// Store the decoder projections quantized: none or nf4 (recipe: model.quantize).
    #[arg(long, default_value = "none")]
    quantize: String,
    /// With --quantize nf4: double-quantized block scales (recipe: model.double_quant).
    #[arg(long)]
    double_quant: bool,
    /// Activation checkpointing per decoder layer (recipe: train.gradient_checkpointing).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With --gradient-checkpointing: recompute one decoder layer in K, the others keep their
    /// graph (recipe: train.gradient_checkpointing_every).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    gradient_checkpointing_every: u64,
    /// LM head + loss over at most N supervised tokens at a time, 0: all (recipe: train.loss_chunk_tokens).
    #[arg(long, default_value_t = 0)]
    loss_chunk_tokens: usize,
    /// Compute the padded batch as the reference does, pad tokens included (recipe: train.padding_free = false).
    #[arg(long)]
    padded: bool,
    /// Wait for the device after the backward pass and after the optimizer, and report each
    /// phase's milliseconds a step (`phase_ms_per_step`).
    #[arg(long)]
    phase_times: bool,
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        // SAFETY: no other thread exists yet; flex's rayon pool reads this when first used.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    let method = bench_method(&args).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    let model = match (args.model, args.synthetic, args.tokenizer) {
        (Some(dir), _, _) => ember_trainer::bench::BenchModel::Dir(dir),
        (None, Some(shape), Some(tokenizer)) => ember_trainer::bench::BenchModel::Synthetic { shape, tokenizer },
        _ => return Err(bad_input(anyhow::anyhow!("give --model, or --synthetic with --tokenizer"))),
    };
    let options = ember_trainer::bench::BenchOptions {
        model, data: args.data, method,
        batch: args.batch, cutoff: args.cutoff, steps: args.steps, warmup: args.warmup, threads: args.threads,
        device: args.device, dtype: args.dtype,
        quantization: ember_models::nf4::Quantization::from_name(&args.quantize, args.double_quant).map_err(|e| bad_input(anyhow::anyhow!("--quantize {e}")))?,
        step: ember_trainer::step::StepOptions {
            checkpoint_every: ember_trainer::step::StepOptions::checkpoint_every(args.gradient_checkpointing, args.gradient_checkpointing_every as usize),
            loss_chunk_tokens: args.loss_chunk_tokens, padding_free: !args.padded,
        },
        phase_times: args.phase_times,
    };
    let result = ember_trainer::bench::run(&options).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    println!("{result}");
    Ok(())
}

/// The method from `--method` and the flags its `[adapter]` section has (others are ignored:
/// `--r` means nothing to prefix tuning), then `--adapter key=value`.
fn bench_method(args: &BenchArgs) -> Result<ember_adapters::Method, String> {
    use toml::Value;
    let keys = ember_adapters::Method::section_keys(&args.method)?;
    let targets = match args.targets.as_str() {
        "all-linear" => Value::String("all-linear".into()),
        list => Value::Array(list.split(',').map(|t| Value::String(t.to_owned())).collect()),
    };
    let flags = [
        ("r", Value::Integer(args.r as i64)),
        ("alpha", Value::Float(args.alpha)),
        ("target_modules", targets),
        ("num_virtual_tokens", Value::Integer(args.virtual_tokens as i64)),
        ("adapter_len", Value::Integer(args.adapter_len as i64)),
        ("adapter_layers", Value::Integer(args.adapter_layers as i64)),
    ];
    let mut section: toml::Table = flags.into_iter().filter(|(k, _)| keys.iter().any(|own| own == k)).map(|(k, v)| (k.to_owned(), v)).collect();
    for item in &args.adapter_keys {
        let (key, raw) = item.split_once('=').ok_or_else(|| format!("--adapter '{item}': expected KEY=VALUE"))?;
        section.insert(key.to_owned(), ember_trainer::recipe::override_value(raw));
    }
    ember_adapters::Method::from_recipe(&args.method, section)
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Check recipe files: keys and types, the paths they name, the method against the model.
    ///
    /// Checks the TOML keys and types, that model.path, data.path and adapter.init_from exist,
    /// the model's config.json, weights and tokenizer, that the method fits the architecture
    /// (LoRA's target_modules must match a projection), the template, and that the data loads.
    /// Prints `ok <file>: <summary>` per good recipe and `error: <file>: <reason>` per bad one;
    /// exit code 2 if any is bad. EMBER_<SECTION>__<KEY> variables apply, as in `ember train`.
    Check {
        /// Recipe files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A model, data or init_from path that does not exist is a warning (and the checks that
        /// need it are skipped) instead of an error: for recipes whose models live elsewhere.
        #[arg(long)]
        skip_missing_paths: bool,
    },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A llama, qwen2, qwen3 or chatglm GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
    /// Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, IQ3/IQ2/IQ1, TQ1_0, TQ2_0, Q1_0, Q2_0, MXFP4 and NVFP4
    /// tensors), dequantized to f32, as an HF folder in the family's layout
    /// (a chatglm file: ChatGLM's when q/k/v are one tensor, HF's glm otherwise).
    Gguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output folder (written atomically; replaced if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// PyTorch weights (pytorch_model.bin, or the shards of pytorch_model.bin.index.json) as
    /// safetensors, read without running any code.
    ///
    /// The pickle may name only what torch.load(weights_only=True) accepts (tensors, storages,
    /// dicts); anything else, a compressed or truncated archive, or a tensor that does not fit
    /// its storage is an error (exit 2) and nothing is written. Other files of the folder
    /// (config, tokenizer) are copied; other .bin files are not.
    Torch {
        /// The model folder with pytorch_model.bin or pytorch_model.bin.index.json.
        dir: PathBuf,
        /// Output folder (written atomically; replaced if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// A folder's tokenizer.model (SentencePiece BPE or Unigram, ChatGLM2/3 with THUDM's special
    /// tokens, or GLM-4's tiktoken ranks) as tokenizer.json.
    ///
    /// ember also reads tokenizer.model directly when a folder has no tokenizer.json.
    Tokenizer {
        /// The folder with tokenizer.model (and tokenizer_config.json / config.json, which tell
        /// a ChatGLM tokenizer from a LLaMA one).
        dir: PathBuf,
        /// Where tokenizer.json goes (default: the same folder); the folder's tokenizer configs
        /// are copied along.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// A LLaMA, Qwen2, Qwen3 or GLM-family model (glm, chatglm: llama.cpp's `chatglm`), merged with an
    /// adapter if one is given, as one GGUF file for llama.cpp / Ollama: llama.cpp's metadata and
    /// tokenizer, q/k rows in its order.
    ///
    /// Vectors stay f32; the quantized types give each matrix the type llama-quantize gives it
    /// (with its fallbacks for rows that are not whole blocks) and ggml's reference quantizer's
    /// bytes. Streamed tensor by tensor; the file appears only complete.
    Gguf {
        /// Base model folder.
        #[arg(long)]
        base: PathBuf,
        /// An adapter to merge first (any adapter `ember merge` takes).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The .gguf file to write.
        #[arg(long)]
        out: PathBuf,
        /// f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l,
        /// q3_k_m, q3_k_s, q2_k, iq4_xs, iq4_nl, iq3_m, iq3_s, tq2_0, tq1_0, q2_0, q1_0; with --imatrix
        /// also q2_k_s, iq3_xs, iq3_xxs, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s.
        #[arg(long = "type", default_value = "f16")]
        ty: String,
        /// llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`) for a byte-level BPE tokenizer it
        /// does not recognise by its check hash (e.g. default, gpt-2, llama-bpe).
        #[arg(long)]
        pre: Option<String>,
        /// An importance matrix from llama.cpp's `llama-imatrix` (GGUF or the legacy .dat),
        /// keyed by the GGUF's tensor names: the quantized types weigh each column's error by it,
        /// as `llama-quantize --imatrix` does.
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// A Jinja chat template (.jinja file) as `tokenizer.chat_template`, instead of the
        /// base's: the template the adapter was trained with (default: the adapter's
        /// chat_template.jinja, where there is one).
        #[arg(long, value_name = "FILE")]
        chat_template: Option<PathBuf>,
    },
    /// A PEFT LoRA adapter as llama.cpp's LoRA GGUF (`llama-cli --lora adapter.gguf`).
    GgufLora {
        /// The base model folder the adapter was trained on.
        #[arg(long)]
        base: PathBuf,
        /// The PEFT LoRA adapter folder.
        #[arg(long)]
        adapter: PathBuf,
        /// The .gguf file to write.
        #[arg(long)]
        out: PathBuf,
        /// f32, f16, bf16 or q8_0 (llama.cpp's convert_lora_to_gguf.py defaults to f32).
        #[arg(long = "type", default_value = "f32")]
        ty: String,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Show a recipe's first training examples as the model sees them: the rendered text, the
    /// ids, and which tokens carry loss.
    ///
    /// Records in file order. The text view marks the tokens that carry loss with ⟦ ⟧; --json
    /// prints one object per record: {"index", "held_out", "text", "input_ids", "labels"}, with
    /// labels -100 where no loss is taken.
    Preview {
        /// The TOML recipe.
        recipe: PathBuf,
        /// Records to show.
        #[arg(long, default_value_t = 3)]
        limit: usize,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Override a recipe key, as in `ember train`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Count a recipe's data as training sees it, to choose cutoff_len and the batch: records a
    /// file, the train/eval split, example lengths before the cutoff (min, median, p90, p99, max),
    /// how many the cutoff truncates, and the tokens that carry loss.
    Stats {
        /// The TOML recipe.
        recipe: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Override a recipe key, as in `ember train`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

/// A command-line argument that is wrong (exit code 2). The library's errors carry their own kind;
/// see [`exit_code`].
#[derive(Debug)]
pub struct BadInput(pub anyhow::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for BadInput {}

/// Marks an argument error as bad input.
pub fn bad_input(error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(BadInput(error.into()))
}

/// The device a `--device` flag names (flex, libtorch, cuda, cuda:N).
pub fn device(name: &str) -> anyhow::Result<burn::tensor::Device> {
    ember_models::device::parse_device(name).map_err(|e| bad_input(anyhow::anyhow!(e)))
}

/// The prompt, chat or text template a `--template` flag names, for the model at `base`; `auto`
/// with an adapter trained with a Jinja template of its own (its `chat_template.jinja`) is that
/// template.
pub fn format(name: &str, base: &std::path::Path, adapter: Option<&std::path::Path>) -> anyhow::Result<ember_data::Format> {
    let trained_with = adapter_chat_template(adapter).filter(|_| name == "auto");
    let name = trained_with.as_deref().map_or(std::borrow::Cow::Borrowed(name), |file| file.to_string_lossy());
    ember_models::template(&name, base).map_err(|e| bad_input(anyhow::anyhow!(e)))?.ok_or_else(|| bad_input(anyhow::anyhow!("unknown template '{name}'")))
}

/// The Jinja template an adapter was trained with, where its folder has one.
fn adapter_chat_template(adapter: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    adapter.map(|dir| dir.join(ember_data::chat::ADAPTER_CHAT_TEMPLATE)).filter(|file| file.is_file())
}

/// A flag's inline-table body (`key = "value", …`) read as `T`; none: `T`'s default.
fn inline_table<T: serde::de::DeserializeOwned + Default>(flag: &str, body: Option<&str>) -> anyhow::Result<T> {
    let Some(body) = body else { return Ok(T::default()) };
    let table: toml::Table = format!("v = {{ {body} }}").parse().map_err(|e: toml::de::Error| bad_input(anyhow::anyhow!("{flag} '{body}': expected key = \"value\", …: {}", e.message())))?;
    let value = table.get("v").cloned().unwrap_or_else(|| toml::Value::Table(Default::default()));
    value.try_into().map_err(|e: toml::de::Error| bad_input(anyhow::anyhow!("{flag} '{body}': {}", e.message())))
}

/// The text of `--chat-template FILE`, else of the adapter's `chat_template.jinja` where it has one.
fn chat_template_file(file: Option<&std::path::Path>, adapter: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let file = file.map(std::path::Path::to_path_buf).or_else(|| adapter_chat_template(adapter));
    file.map(|file| std::fs::read_to_string(&file).map_err(|e| bad_input(anyhow::anyhow!("--chat-template {}: {e}", file.display())))).transpose()
}

fn merge(base: &std::path::Path, adapter: &std::path::Path, out: &std::path::Path, dtype: &str, chat_template: Option<&std::path::Path>) -> anyhow::Result<()> {
    let dtype = ember_trainer::merge::MergeDtype::parse(dtype)
        .ok_or_else(|| bad_input(anyhow::anyhow!("--dtype '{dtype}': expected keep, f32, bf16 or f16")))?;
    let summary = ember_trainer::merge::merge(base, adapter, out, dtype, chat_template_file(chat_template, Some(adapter))?.as_deref())?;
    println!(
        "merged {} tensors into {}: {} tensors in all, {} shard(s), {:.1} MB",
        summary.merged_tensors, out.display(), summary.tensors, summary.shards, summary.bytes as f64 / 1e6
    );
    Ok(())
}

fn export(command: ExportCommand) -> anyhow::Result<()> {
    use ember_models::gguf::GgmlType;
    use ember_models::gguf_write::ExportType;
    let started = std::time::Instant::now();
    let (summary, out) = match command {
        ExportCommand::Gguf { base, adapter, out, ty, pre, imatrix, chat_template } => {
            let ty = ExportType::parse(&ty).ok_or_else(|| bad_input(anyhow::anyhow!("--type '{ty}': expected {}", ExportType::names())))?;
            let chat_template = chat_template_file(chat_template.as_deref(), adapter.as_deref())?;
            (ember_trainer::export::export_gguf(&base, adapter.as_deref(), &out, ty, pre.as_deref(), imatrix.as_deref(), chat_template.as_deref())?, out)
        }
        ExportCommand::GgufLora { base, adapter, out, ty } => {
            let ty = GgmlType::parse_lora(&ty)
                .ok_or_else(|| bad_input(anyhow::anyhow!("--type '{ty}': llama.cpp's LoRA adapters take f32, f16, bf16 or q8_0")))?;
            (ember_trainer::export::export_gguf_lora(&base, &adapter, &out, ty)?, out)
        }
    };
    println!("wrote {}: {} tensors, {:.1} MB, {:.1}s", out.display(), summary.tensors, summary.bytes as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(())
}

fn plot(run: &std::path::Path) -> anyhow::Result<()> {
    if !run.join("metrics.jsonl").is_file() {
        return Err(bad_input(anyhow::anyhow!("{}: no metrics.jsonl (is it a training run's output folder?)", run.display())));
    }
    // The folder's name, as `ember train` titles it.
    let name = std::fs::canonicalize(run).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "run".into());
    let path = ember_trainer::plot::plot_run(run, &name).map_err(|e| bad_input(anyhow::anyhow!(e)))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Output into a pipe whose reader has gone (`ember inspect … | head`) ends the process as it
/// ends other Unix tools, instead of a panic in `println!` (Rust ignores SIGPIPE by default).
/// Files are written atomically, so nothing is left half-written.
fn exit_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    exit_quietly_on_a_closed_pipe();
    ember_models::device::keep_freed_memory();
    ember_models::device::avoid_cudnn_attention();
    let cli = Cli::parse();
    // Training stops gracefully on the first signal; every other command exits at once, leaving
    // no half-written output.
    if let Err(e) = ember_trainer::interrupt::install(matches!(cli.command, Command::Train { .. })) {
        eprintln!("warning: Ctrl-C and SIGTERM are not handled: {e}");
    }
    let command = match resolve_hub_ids(cli.command) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("error: {}", message(&error));
            return ExitCode::from(exit_code(&error));
        }
    };
    let result = match command {
        Command::Inspect { model: Some(dir), .. } if inspect::is_training_run(&dir) => inspect::training_run(&dir),
        Command::Inspect { model: Some(model), .. } => inspect::run(&model),
        Command::Inspect { recipe, shape, overrides, .. } => inspect::recipe(&recipe.expect("clap requires model or recipe"), shape.as_deref(), &overrides),
        Command::Import(ImportCommand::Gguf { file, out }) => import::gguf(&file, &out),
        Command::Import(ImportCommand::Torch { dir, out }) => import::torch(&dir, &out),
        Command::Import(ImportCommand::Tokenizer { dir, out }) => import::tokenizer(&dir, out.as_deref().unwrap_or(&dir)),
        Command::Export(command) => export(command),
        Command::Imatrix { base, adapter, data, in_files, out, output_format, template, chunk_size, chunks, process_output, dtype, device } => imatrix::run(&imatrix::Request {
            base: base.as_deref(), adapter: adapter.as_deref(), data: data.as_deref(), in_files: &in_files, out: &out, legacy: output_format == "dat",
            template: &template, chunk_size, chunks, process_output, dtype, device: &device,
        }),
        Command::Data(DataCommand::Preview { recipe, limit, json, overrides }) => data::preview(&recipe, &overrides, limit, json),
        Command::Data(DataCommand::Stats { recipe, json, overrides }) => data::stats(&recipe, &overrides, json),
        Command::Train { recipe, overrides, resume, overwrite, quiet, json } => {
            let start = match (resume, overwrite) {
                (true, _) => ember_trainer::Start::Resume,
                (_, true) => ember_trainer::Start::Overwrite,
                _ => ember_trainer::Start::Fresh,
            };
            let output = if json { train::Output::Json } else if quiet { train::Output::Quiet } else { train::Output::Human };
            train::run(&recipe, &overrides, start, output)
        }
        Command::Recipe(RecipeCommand::Check { files, skip_missing_paths }) => recipe_check::run(&files, skip_missing_paths),
        Command::Plot { run } => plot(&run),
        Command::Merge { base, adapter, out, dtype, chat_template } => merge(&base, &adapter, &out, &dtype, chat_template.as_deref()),
        Command::Bench(args) => bench(args),
        Command::Eval { base, adapter, data, columns, tags, template, cutoff_len, batch, limit, generate, answers, max_new_tokens, device } => {
            let mapping = || -> anyhow::Result<_> { Ok(ember_data::Mapping { columns: inline_table("--columns", columns.as_deref())?, tags: inline_table("--tags", tags.as_deref())? }) };
            mapping().and_then(|mapping| {
                eval::run(&eval::Request {
                    base: &base, adapter: adapter.as_deref(), data: &data, mapping: &mapping, template: &template, cutoff_len, batch, limit, device: &device,
                    generate, answers: answers.as_deref(), max_new_tokens,
                })
            })
        }
        Command::Generate { base, adapter, prompt, input, template, sampling, logits_out, device } => {
            let request = generate::Request {
                base: &base, adapter: adapter.as_deref(), prompt: &prompt, input: &input, template: &template, options: sampling.options(), device: &device,
                logits_out: logits_out.as_deref(),
            };
            generate::complete(&request).map(|text| println!("{text}"))
        }
        Command::Exam { base, adapter, test, dev, shots, lang, template, limit, batch, answers, device } => exam::run(&exam::Request {
            base: &base, adapter: adapter.as_deref(), test: &test, dev: &dev, shots, lang, template: &template, limit, batch, answers: answers.as_deref(), device: &device,
        }),
        Command::Chat { base, adapter, template, system, tools, sampling, json, device } => {
            let request = chat::Request {
                base: &base, adapter: adapter.as_deref(), template: &template, system: system.as_deref(), tools: tools.as_deref(), options: sampling.options(), device: &device, json,
            };
            chat::run(&request)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let interrupted = matches!(error.downcast_ref::<TrainError>(), Some(TrainError::Interrupted { .. } | TrainError::InterruptedBeforeExport { .. }));
            eprintln!("{}{}", if interrupted { "" } else { "error: " }, message(&error));
            ExitCode::from(exit_code(&error))
        }
    }
}

/// Model folders given as hub ids (`org/name[@revision]`) replaced by their snapshot folders in
/// the Hugging Face cache.
fn resolve_hub_ids(mut command: Command) -> anyhow::Result<Command> {
    let resolve = |path: &mut PathBuf| -> anyhow::Result<()> {
        *path = ember_models::hub::model_dir(path, ember_models::hub::Fetch::Download)?;
        Ok(())
    };
    match &mut command {
        Command::Inspect { model: Some(dir), .. } => resolve(dir)?,
        Command::Merge { base, .. } | Command::Generate { base, .. } | Command::Chat { base, .. } | Command::Eval { base, .. } | Command::Exam { base, .. } => resolve(base)?,
        Command::Imatrix { base: Some(base), .. } => resolve(base)?,
        Command::Export(ExportCommand::Gguf { base, .. } | ExportCommand::GgufLora { base, .. }) => resolve(base)?,
        Command::Bench(args) => {
            if let Some(dir) = args.model.as_mut() {
                resolve(dir)?;
            }
        }
        _ => {}
    }
    Ok(command)
}

/// The exit code of a failed command, from the kind of its error, in this one place: 2 when the
/// user's input is at fault (arguments, recipe, data, model or adapter files), 1 when the command
/// failed while running (a write, a NaN loss, …), 128 + the signal when a signal stopped a run.
fn exit_code(error: &anyhow::Error) -> u8 {
    use ember_adapters::AdapterError;
    use ember_data::{DatasetError, TokenizerError};
    use ember_models::LoadError;
    use ember_trainer::merge::MergeError;
    use ember_trainer::recipe::RecipeError;
    let code = |is_input: bool| if is_input { 2 } else { 1 };
    let found = error.chain().find_map(|cause| {
        if cause.is::<BadInput>() || cause.is::<DatasetError>() || cause.is::<TokenizerError>() {
            return Some(2);
        }
        cause
            .downcast_ref::<TrainError>()
            .map(TrainError::exit_code)
            .or_else(|| cause.downcast_ref::<RecipeError>().map(|e| code(e.is_input())))
            .or_else(|| cause.downcast_ref::<MergeError>().map(|e| code(e.is_input())))
            .or_else(|| cause.downcast_ref::<LoadError>().map(|e| code(e.is_input())))
            .or_else(|| cause.downcast_ref::<AdapterError>().map(|e| code(e.is_input())))
    });
    found.unwrap_or(1) as u8
}

/// The error and its causes on one line, each said once (typed errors already name their cause).
fn message(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain().map(|c| c.to_string()) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}
