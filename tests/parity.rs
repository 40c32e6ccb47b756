//! Parity with Hugging Face transformers (+ PEFT): every fixture folder under `$EMBER_FIXTURES`
//! (default `tests/fixtures`; CI also runs `../shared/fixtures`) is compared with what ember
//! computes from the same files. Every method goes through the adapters registry.
//!
//! One line per check: `parity <fixture> <check> max_abs=<value> ok|FAIL`, or `SKIP` with the
//! reason. Folders and methods ember cannot handle yet are reported, never silently passed.
//! Folder kinds, told apart by their files:
//! - a model folder (`config.json` + `reference.safetensors`): `logits.base` and its texts' tokens;
//! - a tokenizer reference (`tokenizer_reference.json`): ids of every case;
//! - a pretrained-model reference (`reference.json` with `prompts`, no weights): needs the
//!   converted model in `$EMBER_MODELS/<folder>` (default `target/models/<folder>`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::collections::HashMap;

use burn::module::{Flag, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Gradients;
use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_adapters::registry::ModelAdapter;
use ember_adapters::{AdaptedModel, Method, prefix};
use ember_data::{Batch, ChatTemplate, Conversation, Example, Message, Record, Role, SftOptions, Template, Tokenizer, ToolCall, sft};
use ember_trainer::loss::causal_lm_loss;
use ember_trainer::merge;
use ember_trainer::step::{StepOptions, forward_backward};
use ember_models::nf4::Quantization;
use ember_models::{BaseModel, Checkpoint, KvCache, LoadDtype, LoadError, ModelConfig};
use serde_json::Value;

const LOGITS_ATOL_TINY: f32 = 1e-4;
/// The reference's fields that say whether its merged logits reproduce its adapter's.
const MERGE_REPRODUCED: [&str; 2] = ["reload_max_abs_diff", "merged_max_abs_diff_vs_unmerged"];
const LOGITS_ATOL_PRETRAINED: f32 = 1e-3;
const LOSS_ATOL: f32 = 1e-5;
const GRAD_ATOL: f32 = 1e-5;
const GRAD_RTOL: f32 = 1e-3;

#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Report {
    fn check(&mut self, fixture: &str, check: &str, max_abs: f32, tolerance: f32) {
        let ok = max_abs <= tolerance; // NaN fails
        println!("parity {fixture} {check} max_abs={max_abs:.3e} {}", if ok { "ok" } else { "FAIL" });
        if ok { self.passed += 1 } else { self.failed += 1 }
    }

    fn exact(&mut self, fixture: &str, check: &str, mismatches: usize, total: usize) {
        let ok = mismatches == 0 && total > 0;
        println!("parity {fixture} {check} mismatches={mismatches}/{total} {}", if ok { "ok" } else { "FAIL" });
        if ok { self.passed += 1 } else { self.failed += 1 }
    }

    fn skip(&mut self, fixture: &str, check: &str, reason: &str) {
        println!("parity {fixture} {check} SKIP ({reason})");
        self.skipped += 1;
    }

    /// [`Self::check`] of logits, but a SKIP saying by how much where the reference has dynamic
    /// RoPE and did not reproduce them itself: PEFT reloading the adapter (`reload_max_abs_diff`)
    /// or merging it (`merged_max_abs_diff_vs_unmerged`) gave other logits. transformers' dynamic
    /// RoPE keeps the frequencies of the longest call so far, so its model's logits depend on
    /// what it ran before; ember's depend on the call alone. (A merge may change logits by
    /// design, a tied head's, so elsewhere the fields decide nothing.)
    fn check_logits(&mut self, fixture: &str, check: &str, max_abs: f32, case: &Case, reproduced_by: &[&str]) {
        let unreproduced = reproduced_by
            .iter()
            .filter(|_| case.dynamic_rope)
            .find_map(|field| case.spec[*field].as_f64().filter(|&diff| diff > LOGITS_ATOL_TINY as f64).map(|diff| (field, diff)));
        match unreproduced {
            Some((field, diff)) => self.skip(fixture, check, &format!("the reference does not reproduce these logits itself: its {field} is {diff:.3e}")),
            None => self.check(fixture, check, max_abs, LOGITS_ATOL_TINY),
        }
    }

    fn error(&mut self, fixture: &str, check: &str, error: impl std::fmt::Display) {
        println!("parity {fixture} {check} FAIL ({error})");
        self.failed += 1;
    }
}

/// `$EMBER_FIXTURES`, else the repository's own fixtures (`tests/fixtures`, written by
/// `tests/fixtures/generate.py`), so a bare clone runs parity.
fn fixtures_root() -> PathBuf {
    std::env::var_os("EMBER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

fn models_root() -> PathBuf {
    std::env::var_os("EMBER_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/models"))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A reference tensor as f32 or i64 values plus its shape.
fn f32s(reference: &Checkpoint, key: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
    let (bytes, shape, dtype) = reference.bytes(key).map_err(|e| e.to_string())?;
    if dtype != safetensors::Dtype::F32 {
        return Err(format!("{key}: expected F32, found {dtype:?}"));
    }
    Ok((bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(), shape.to_vec()))
}

fn i64s(reference: &Checkpoint, key: &str) -> Result<(Vec<i64>, Vec<usize>), String> {
    let (bytes, shape, dtype) = reference.bytes(key).map_err(|e| e.to_string())?;
    if dtype != safetensors::Dtype::I64 {
        return Err(format!("{key}: expected I64, found {dtype:?}"));
    }
    Ok((bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(), shape.to_vec()))
}

fn u8s(reference: &Checkpoint, key: &str) -> Result<(Vec<u8>, Vec<usize>), String> {
    let (bytes, shape, dtype) = reference.bytes(key).map_err(|e| e.to_string())?;
    if dtype != safetensors::Dtype::U8 {
        return Err(format!("{key}: expected U8, found {dtype:?}"));
    }
    Ok((bytes.to_vec(), shape.to_vec()))
}

fn int_tensor(values: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 values")
}

fn main() -> ExitCode {
    let root = fixtures_root();
    let mut report = Report::default();
    let Ok(entries) = std::fs::read_dir(&root) else {
        println!("parity: fixtures root {} not found (set EMBER_FIXTURES)", root.display());
        return ExitCode::FAILURE;
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let device = match ember_models::device::default_device() {
        Ok(device) => device,
        Err(e) => {
            println!("parity: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("parity: fixtures {}, device {device:?}", root.display());
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name == "tokenizers" {
            tokenizer_model_fixtures(&dir, &mut report);
        } else if name == "chat_template" {
            chat_template_fixtures(&dir, &mut report);
        } else if dir.join("tokenizer_reference.json").is_file() {
            tokenizer_fixture(&root, &dir, &name, &mut report);
        } else if dir.join("reference.json").is_file() && dir.join("config.json").is_file() {
            model_fixture(&dir, &name, &device, &mut report);
        } else if dir.join("reference.json").is_file() {
            pretrained_fixture(&dir, &name, &device, &mut report);
        }
        // Folders without a reference (e.g. scripts/) are not fixtures.
    }
    println!("parity: {} passed, {} failed, {} skipped", report.passed, report.failed, report.skipped);
    if report.failed == 0 && report.passed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// A tiny model with reference logits for the base model and each adapter method.
fn model_fixture(dir: &Path, name: &str, device: &Device, report: &mut Report) {
    // A model ember does not implement (an architecture, a RoPE scaling) is reported, not failed.
    if let Err(e @ LoadError::Unsupported { .. }) = ModelConfig::from_dir(dir) {
        report.skip(name, "all", &e.to_string());
        return;
    }
    let mut run = || -> Result<(), String> {
        let info = read_json(&dir.join("reference.json"))?;
        let reference = Checkpoint::open_file(&dir.join("reference.safetensors")).map_err(|e| e.to_string())?;
        let (ids, shape) = i64s(&reference, "input_ids")?;
        let (mask, _) = i64s(&reference, "attention_mask")?;
        let [batch, len] = [shape[0], shape[1]];

        // The fixture texts, tokenized by ember, must be the reference's input ids.
        match Tokenizer::from_dir(dir) {
            Ok(tokenizer) => {
                let texts = info["texts"].as_array().cloned().unwrap_or_default();
                let mut mismatches = 0;
                for (row, text) in texts.iter().enumerate() {
                    let ours = tokenizer.encode(text.as_str().unwrap_or_default(), true).map_err(|e| e.to_string())?;
                    let real = (0..len).filter(|&j| mask[row * len + j] == 1).map(|j| ids[row * len + j] as u32);
                    if !ours.iter().copied().eq(real) {
                        mismatches += 1;
                    }
                }
                report.exact(name, "tokenizer.texts", mismatches, texts.len());
                train_batch_check(&tokenizer, &info, &reference, name, report)?;
            }
            Err(e) => report.error(name, "tokenizer.texts", e),
        }

        let model = BaseModel::load(dir, LoadDtype::F32, device).map_err(|e| e.to_string())?;
        let logits = model.forward(int_tensor(ids.clone(), [batch, len], device), Some(int_tensor(mask.clone(), [batch, len], device)));
        let ours = to_vec(logits);
        let (expected, _) = f32s(&reference, "logits.base")?;
        let vocab = expected.len() / (batch * len);
        let max_abs = max_abs_on_mask(&ours, &expected, &mask, vocab);
        report.check(name, "logits.base", max_abs, LOGITS_ATOL_TINY);
        let dynamic_rope = matches!(model.config.rope.scaling, Some(ember_models::config::RopeScaling::Dynamic { .. }));

        let methods = info["methods"].as_object().cloned().unwrap_or_default();
        for (method, spec) in &methods {
            let quantization = match spec.get("quantization").filter(|q| !q.is_null()) {
                None => None,
                Some(q) if q["quant_type"] == "nf4" => Some(Quantization::Nf4 { double_quant: q["double_quant"].as_bool().unwrap_or(false) }),
                Some(q) => {
                    report.skip(name, method, &format!("quantization {} is not implemented", q["quant_type"]));
                    continue;
                }
            };
            let Some(adapter_dir) = spec["adapter_dir"].as_str().map(|d| dir.join(d)) else {
                report.skip(name, method, "no adapter_dir");
                continue;
            };
            // A format no registered method reads is reported, never failed or passed.
            if let Err(e) = Method::read(&adapter_dir) {
                report.skip(name, method, &format!("not a format ember reads: {e}"));
                continue;
            }
            let case = Case { dir, name, method, spec, reference: &reference, mask: &mask, shape: [batch, len], adapter_dir, quantization, dynamic_rope };
            if let Err(e) = method_checks(&case, device, report) {
                report.error(name, method, e);
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        report.error(name, "load", e);
    }
}

/// ember's Alpaca pipeline (Stanford template, EOS as text, prompt masked, right padding) must
/// rebuild the reference train batch token for token.
fn train_batch_check(tokenizer: &Tokenizer, info: &Value, reference: &Checkpoint, name: &str, report: &mut Report) -> Result<(), String> {
    let spec = &info["train_batch"];
    let records: Vec<Record> = spec["examples"]
        .as_array()
        .ok_or("no train_batch.examples")?
        .iter()
        .map(|e| Record {
            instruction: e["instruction"].as_str().unwrap_or_default().into(),
            input: e["input"].as_str().unwrap_or_default().into(),
            output: e["output"].as_str().unwrap_or_default().into(),
        })
        .collect();
    let template = Template::builtin("alpaca").expect("built-in template");
    let options = SftOptions { cutoff_len: usize::MAX, train_on_inputs: false, last_turn_only: false };
    let examples: Vec<Example> = records
        .iter()
        .map(|r| sft::build_example(tokenizer, &template, r, &options).map(|(e, _)| e))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let pad_id = spec["pad_id"].as_u64().ok_or("no train_batch.pad_id")? as u32;
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), pad_id);
    let mut mismatches = 0;
    for (key, ours) in [("train.input_ids", &batch.input_ids), ("train.attention_mask", &batch.attention_mask), ("train.labels", &batch.labels)] {
        let (expected, _) = i64s(reference, key)?;
        mismatches += usize::from(&expected != ours);
    }
    report.exact(name, "train_batch", mismatches, 3);
    Ok(())
}

/// One method of a model fixture.
struct Case<'a> {
    dir: &'a Path,
    name: &'a str,
    method: &'a str,
    spec: &'a Value,
    reference: &'a Checkpoint,
    mask: &'a [i64],
    shape: [usize; 2],
    adapter_dir: PathBuf,
    /// The base's storage (QLoRA), as the fixture quantized it.
    quantization: Option<Quantization>,
    /// The base has dynamic NTK RoPE: the reference's logits depend on what its model ran before.
    dynamic_rope: bool,
}

impl Case<'_> {
    fn base(&self, device: &Device) -> Result<BaseModel, String> {
        BaseModel::load_quantized(self.dir, LoadDtype::F32, self.quantization, device).map_err(|e| e.to_string())
    }
}

/// Any method, through the registry: logits with the PEFT-saved adapter, a save/load round trip
/// through ember's writer, merged logits and weights where the method merges, `ember merge`
/// against transformers' merged checkpoint, then loss and every gradient on the train batch,
/// once by one backward and once by ember's training step.
fn method_checks(case: &Case, device: &Device, report: &mut Report) -> Result<(), String> {
    let Case { dir, name, method, spec, reference, mask, shape: [batch, len], .. } = *case;
    let (ids, _) = i64s(reference, "input_ids")?;
    let ids_t = || int_tensor(ids.clone(), [batch, len], device);
    let mask_t = || Some(int_tensor(mask.to_vec(), [batch, len], device));
    let base = case.base(device)?;
    if case.quantization.is_some() {
        quantized_storage_checks(case, &base, report)?;
    }
    let (model, config) = Method::load(&case.adapter_dir, base, device).map_err(|e| e.to_string())?;
    // Prompt tuning's logits lead with its virtual positions, as PEFT returns them.
    let virtual_tokens = model.virtual_tokens();
    let mask_ext: Vec<i64> = mask.chunks(len).flat_map(|row| std::iter::repeat_n(1, virtual_tokens).chain(row.iter().copied())).collect();
    let logits_key = format!("logits.{method}");
    let (expected, _) = f32s(reference, &logits_key)?;
    let vocab = expected.len() / (batch * (len + virtual_tokens));
    let ours = to_vec(model.forward(ids_t(), mask_t()));
    report.check_logits(name, &logits_key, max_abs_on_mask(&ours, &expected, &mask_ext, vocab), case, &["reload_max_abs_diff"]);

    // An adapter ember writes and reads back reproduces its own logits exactly.
    let saved = tempfile::tempdir().map_err(|e| e.to_string())?;
    config.config().save(&model, name, saved.path()).map_err(|e| e.to_string())?;
    let base = case.base(device)?;
    let (reloaded, _) = Method::load(saved.path(), base, device).map_err(|e| e.to_string())?;
    let again = to_vec(reloaded.forward(ids_t(), mask_t()));
    report.check(name, &format!("{method}.save_load"), max_abs_on_mask(&again, &ours, &mask_ext, vocab), 0.0);

    let base_config = ember_models::ModelConfig::from_dir(dir).map_err(|e| e.to_string())?;
    let merges = Method::weight_merge(&case.adapter_dir, &base_config).is_ok();
    // Branches on the embedding or LM head stay unmerged in memory (where a tied head shares the
    // embedding, merging changes both, as PEFT's merge does): their merged logits are those of
    // the checkpoint `ember merge` writes.
    let vocab_branches = model.vocab.is_some();
    let merged_model = merges.then(|| model.into_inference());
    // Each method's merged logits, weights and checkpoint carry its own name.
    let merged_key = format!("logits.{method}_merged");
    if let (Some(merged), Ok((merged_expected, _))) = (&merged_model, f32s(reference, &merged_key)) {
        let logits = if vocab_branches {
            let out = tempfile::tempdir().map_err(|e| e.to_string())?;
            let out = out.path().join("merged");
            merge::merge(dir, &case.adapter_dir, &out, merge::MergeDtype::Keep, None).map_err(|e| e.to_string())?;
            to_vec(BaseModel::load(&out, LoadDtype::F32, device).map_err(|e| e.to_string())?.forward(ids_t(), mask_t()))
        } else {
            to_vec(merged.forward(ids_t(), mask_t()))
        };
        report.check_logits(name, &merged_key, max_abs_on_mask(&logits, &merged_expected, mask, vocab), case, &MERGE_REPRODUCED);
    }
    let weights_prefix = format!("merged.{method}.");
    let merged_weights: Vec<&str> = reference.keys().filter(|k| k.starts_with(&weights_prefix)).collect();
    if !merged_weights.is_empty() {
        let merged = merged_model.as_ref().ok_or("the reference has merged weights but ember cannot merge this adapter")?;
        // Weights and biases: (IA)³'s output scale merges into a projection's bias too.
        let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().expect("f32 weights");
        let ours: std::collections::HashMap<String, Vec<f32>> = merged
            .model
            .projections()
            .into_iter()
            .flat_map(|(module, p)| {
                let bias = p.base.bias.as_ref().map(|b| (format!("{module}.bias"), values(b.val().unsqueeze())));
                std::iter::once((format!("{module}.weight"), values(p.base.dense_weight()))).chain(bias)
            })
            .collect();
        // The embedding and LM head keep their branches and trained rows in memory; `ember merge`
        // below writes them.
        let vocab_weights = [ember_models::VocabModule::Embedding, ember_models::VocabModule::LmHead].map(|m| format!("{}.weight", m.hf_name(&base_config)));
        let mut max_abs = 0f32;
        for key in &merged_weights {
            let weight = &key[weights_prefix.len()..];
            if vocab_weights.iter().any(|w| w == weight) {
                continue;
            }
            let (theirs, _) = f32s(reference, key)?;
            let ours = ours.get(weight).ok_or_else(|| format!("{key}: no such projection in ember's merged model"))?;
            max_abs = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(max_abs, f32::max);
        }
        report.check(name, &format!("merged.{method}({})", merged_weights.len()), max_abs, 1e-5);
        // `ember merge` streams the same weights from the files.
        let out = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = out.path().join("merged");
        merge::merge(dir, &case.adapter_dir, &out, merge::MergeDtype::Keep, None).map_err(|e| e.to_string())?;
        let streamed = Checkpoint::open_dir(&out).map_err(|e| e.to_string())?;
        let mut max_abs = 0f32;
        for key in &merged_weights {
            let (a, _) = f32s(&streamed, &key[weights_prefix.len()..])?;
            let (b, _) = f32s(reference, key)?;
            max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(max_abs, f32::max);
        }
        report.check(name, &format!("ember_merge.{method}({})", merged_weights.len()), max_abs, 1e-5);
    }

    // `ember merge` of the PEFT adapter against transformers' merge_and_unload checkpoint.
    let merged_reference = dir.join(format!("merged_{method}"));
    if merged_reference.is_dir() {
        let out = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = out.path().join("merged");
        merge::merge(dir, &case.adapter_dir, &out, merge::MergeDtype::Keep, None).map_err(|e| e.to_string())?;
        let ours = Checkpoint::open_dir(&out).map_err(|e| e.to_string())?;
        let theirs = Checkpoint::open_dir(&merged_reference).map_err(|e| e.to_string())?;
        let mut max_abs = 0f32;
        for key in theirs.keys() {
            let (a, _) = f32s(&ours, key)?;
            let (b, _) = f32s(&theirs, key)?;
            max_abs = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(max_abs, f32::max);
        }
        if ours.keys().count() != theirs.keys().count() {
            return Err(format!("merged checkpoint has {} tensors, reference {}", ours.keys().count(), theirs.keys().count()));
        }
        report.check(name, &format!("merged_{method}.tensors"), max_abs, 1e-5);
        let (merged_expected, _) = f32s(reference, &merged_key)?;
        let merged = BaseModel::load(&out, LoadDtype::F32, device).map_err(|e| e.to_string())?;
        let logits = to_vec(merged.forward(ids_t(), mask_t()));
        report.check_logits(name, &format!("merged_{method}.logits"), max_abs_on_mask(&logits, &merged_expected, mask, vocab), case, &MERGE_REPRODUCED);
    }

    // Loss and gradients on the Alpaca train batch, on the autodiff device, with the
    // training-time parameters (PEFT's projected prefix keeps its MLP apart from the saved table),
    // where the reference has them.
    let Some(expected_loss) = spec["loss"].as_f64().map(|loss| loss as f32) else {
        return Ok(());
    };
    let autodiff = device.clone().autodiff();
    let base = case.base(&autodiff)?;
    let model = match training_prefix(case, &autodiff)? {
        Some(encoder) => AdaptedModel::with_inputs(base, Some(ModelAdapter::Prefix(encoder))),
        None => Method::load(&case.adapter_dir, base, &autodiff).map_err(|e| e.to_string())?.0,
    }
    .map(&mut EvalMode);
    let (train_ids, train_shape) = i64s(reference, "train.input_ids")?;
    let (train_mask, _) = i64s(reference, "train.attention_mask")?;
    let (labels, _) = i64s(reference, "train.labels")?;
    let train_shape = [train_shape[0], train_shape[1]];
    let train_batch = Batch { batch: train_shape[0], seq: train_shape[1], input_ids: train_ids, attention_mask: train_mask, labels };
    let hidden = model.hidden_states(int_tensor(train_batch.input_ids.clone(), train_shape, &autodiff), Some(int_tensor(train_batch.attention_mask.clone(), train_shape, &autodiff)));
    let labels = train_batch.with_virtual_tokens(model.virtual_tokens()).labels;
    let loss = causal_lm_loss(hidden, &labels, |h| model.logits(h)).ok_or("no supervised token in the train batch")?;
    let loss_value = loss.to_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?[0];
    report.check(name, &format!("{method}.loss"), (loss_value - expected_loss).abs(), LOSS_ATOL);
    let tape = loss.backward();
    let staged = staged_gradients(&model, &train_batch, &autodiff);
    let names = config.config().parameter_names(&model);
    let expected_count = spec["grad_keys"].as_array().map_or(0, Vec::len);
    if names.len() != expected_count {
        return Err(format!("ember names {} trainable parameters, the fixture has {expected_count} gradients", names.len()));
    }
    for (grads, label) in [(Grads::Tape(&tape), "grads"), (Grads::Staged(&staged), "grads_checkpointed")] {
        let ours = gradients_by_id(&model, &grads);
        let mut worst = 0f32;
        for (id, key) in &names {
            let full = gradient_key(reference, method, key);
            let (expected, _) = f32s(reference, &full)?;
            let values = ours.get(id).ok_or_else(|| format!("no gradient for {full}"))?;
            worst = worst.max(grad_excess(values, &expected));
        }
        // Reported as the largest |error| beyond rtol·|ref|, checked against atol.
        report.check(name, &format!("{method}.{label}({expected_count})"), worst, GRAD_ATOL);
    }
    Ok(())
}

/// QLoRA: every quantized projection holds bitsandbytes' bytes and scales exactly, and
/// dequantizes to its weights exactly (`<prefix>.<w>.packed`, `.absmax`, `.dequantized`, and
/// with double quantization `.absmax_quantized`, `.absmax2`, `.offset`).
fn quantized_storage_checks(case: &Case, base: &BaseModel, report: &mut Report) -> Result<(), String> {
    let q = &case.spec["quantization"];
    let prefix = q["tensor_prefix"].as_str().ok_or("no quantization.tensor_prefix")?;
    let quantized: Vec<&str> = q["quantized_modules"].as_array().ok_or("no quantization.quantized_modules")?.iter().filter_map(Value::as_str).collect();
    let projections: HashMap<String, &ember_models::layers::Linear> = base.projections().into_iter().collect();
    let bytes = |t: Tensor<1, Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().expect("integers");
    let (mut mismatches, mut checked) = (0, 0);
    for module in &quantized {
        let linear = projections.get(*module).ok_or_else(|| format!("{module}: not a projection of ember's model"))?;
        let ember_models::layers::Weight::Nf4(weight) = &linear.weight else {
            return Err(format!("{module}: ember did not quantize it"));
        };
        let key = |part: &str| format!("{prefix}.{module}.weight.{part}");
        let (packed, _) = u8s(case.reference, &key("packed"))?;
        let mut pairs: Vec<(Vec<f32>, Vec<f32>)> = vec![
            (to_vec(weight.block_absmax()), f32s(case.reference, &key("absmax"))?.0),
            (to_vec(weight.dequantize()), f32s(case.reference, &key("dequantized"))?.0),
        ];
        mismatches += usize::from(bytes(weight.packed.clone()) != packed.iter().map(|&b| b as i64).collect::<Vec<_>>());
        if let ember_models::nf4::Absmax::Double(ember_models::nf4::DoubleQuant { codes, scales, offset }) = &weight.absmax {
            let (codes_expected, _) = u8s(case.reference, &key("absmax_quantized"))?;
            mismatches += usize::from(bytes(codes.clone()) != codes_expected.iter().map(|&b| b as i64).collect::<Vec<_>>());
            pairs.push((to_vec(scales.clone()), f32s(case.reference, &key("absmax2"))?.0));
            pairs.push((vec![*offset], f32s(case.reference, &key("offset"))?.0));
        }
        for (ours, theirs) in pairs {
            mismatches += usize::from(ours.iter().map(|v| v.to_bits()).ne(theirs.iter().map(|v| v.to_bits())));
        }
        checked += 1;
    }
    report.exact(case.name, &format!("{}.nf4_storage({checked})", case.method), mismatches, checked);
    Ok(())
}

/// PEFT's projected prefix trains an embedding and MLP but saves only their output: the
/// reference keeps the training-time tensors as `train_params.<m>.prompt_encoder.*`.
fn training_prefix(case: &Case, device: &Device) -> Result<Option<prefix::PrefixEncoder>, String> {
    let (reference, method) = (case.reference, case.method);
    if !reference.contains(&format!("train_params.{method}.prompt_encoder.embedding.weight")) {
        return Ok(None);
    }
    let config = ModelConfig::from_dir(case.dir).map_err(|e| e.to_string())?;
    let tensor2 = |k: &str| -> Result<Tensor<2>, String> {
        let key = format!("train_params.{method}.prompt_encoder.{k}");
        let (shape, _) = reference.info(&key).ok_or(format!("no {key}"))?;
        reference.float(&key, [shape[0], shape[1]], LoadDtype::F32, device).map_err(|e| e.to_string())
    };
    let tensor1 = |k: &str| -> Result<Tensor<1>, String> {
        let key = format!("train_params.{method}.prompt_encoder.{k}");
        let (shape, _) = reference.info(&key).ok_or(format!("no {key}"))?;
        reference.float(&key, [shape[0]], LoadDtype::F32, device).map_err(|e| e.to_string())
    };
    let mlp = (tensor2("transform.0.weight")?, tensor1("transform.0.bias")?, tensor2("transform.2.weight")?, tensor1("transform.2.bias")?);
    Ok(Some(prefix::from_training_params(tensor2("embedding.weight")?, Some(mlp), &config)))
}

/// The reference's gradient of the adapter tensor `key`: keyed by the tensor's name in the
/// adapter file, or (as gen.py's first wave wrote them) by PEFT's parameter name, which adds
/// `.weight` to a DoRA magnitude and `.modules_to_save` to a module trained in full.
fn gradient_key(reference: &Checkpoint, method: &str, key: &str) -> String {
    let saved = format!("grad.{method}.{key}");
    let parameter_names = [format!("{saved}.weight"), saved.strip_suffix(".weight").map(|k| format!("{k}.modules_to_save.weight")).unwrap_or_default()];
    parameter_names.into_iter().find(|k| reference.contains(k)).filter(|_| !reference.contains(&saved)).unwrap_or(saved)
}

/// The reference's loss and gradients come from PEFT in eval mode: every dropout is off.
struct EvalMode;

impl ModuleMapper for EvalMode {
    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        flag.with_value(false)
    }
}

/// Gradients of one backward through the whole graph, or of ember's training step.
enum Grads<'a> {
    Tape(&'a Gradients),
    Staged(&'a GradientsParams),
}

impl Grads<'_> {
    fn of<const D: usize>(&self, param: &Param<Tensor<D>>) -> Option<Vec<f32>> {
        let grad = match self {
            Grads::Tape(grads) => param.val().grad(grads),
            Grads::Staged(grads) => grads.get::<D>(param.id),
        };
        grad.and_then(|g| g.into_data().try_to_vec::<f32>().ok())
    }
}

/// Every parameter's gradient, by id.
fn gradients_by_id(model: &AdaptedModel, grads: &Grads) -> HashMap<ParamId, Vec<f32>> {
    struct Collect<'a, 'b>(&'a Grads<'b>, HashMap<ParamId, Vec<f32>>);
    impl ModuleVisitor for Collect<'_, '_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.of(param) {
                self.1.insert(param.id, g);
            }
        }
    }
    let mut collect = Collect(grads, HashMap::new());
    model.visit(&mut collect);
    collect.1
}

/// The gradients ember's training step computes, padding-free, with per-layer activation
/// checkpointing and the loss in chunks of 5 tokens: they must match the reference as the plain
/// backward does.
fn staged_gradients(model: &AdaptedModel, batch: &Batch, device: &Device) -> GradientsParams {
    let mut grads = GradientsAccumulator::new();
    let options = StepOptions { checkpoint_every: 1, loss_chunk_tokens: 5, padding_free: true };
    forward_backward(model, batch, 1.0, options, None, 0, device, &mut grads);
    grads.grads()
}

/// max over elements of |a - b| - rtol·|b| (the part of the error that atol must cover).
fn grad_excess(ours: &[f32], expected: &[f32]) -> f32 {
    if ours.len() != expected.len() {
        return f32::INFINITY;
    }
    ours.iter().zip(expected).map(|(a, b)| (a - b).abs() - GRAD_RTOL * b.abs()).fold(0f32, |m, e| if e.is_nan() { f32::NAN } else { m.max(e) })
}

/// max |a - b| over positions whose mask is 1 (padded positions carry no meaning).
fn max_abs_on_mask(ours: &[f32], expected: &[f32], mask: &[i64], vocab: usize) -> f32 {
    let mut max_abs = 0f32;
    for (position, &m) in mask.iter().enumerate() {
        if m == 1 {
            let range = position * vocab..(position + 1) * vocab;
            for (a, b) in ours[range.clone()].iter().zip(&expected[range]) {
                max_abs = max_abs.max((a - b).abs());
                if a.is_nan() {
                    return f32::NAN;
                }
            }
        }
    }
    max_abs
}

fn tokenizer_fixture(root: &Path, dir: &Path, name: &str, report: &mut Report) {
    let mut run = || -> Result<(), String> {
        let info = read_json(&dir.join("tokenizer_reference.json"))?;
        // "tiny_llama/tokenizer.json (…description…)": the path relative to the fixtures root.
        let source = info["tokenizer"].as_str().ok_or("no \"tokenizer\" key")?;
        let path = root.join(source.split_whitespace().next().unwrap_or_default());
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| e.to_string())?;
        let cases = info["cases"].as_array().ok_or("no \"cases\" list")?;
        let (mut ids_bad, mut decode_bad) = (0, 0);
        for case in cases {
            let text = case["text"].as_str().unwrap_or_default();
            let expected: Vec<u32> =
                case["ids"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).map(|v| v as u32).collect();
            let ours = tokenizer.encode(text, true).map_err(|e| e.to_string())?;
            if ours != expected {
                ids_bad += 1;
                println!("  {name}: {text:?}: ember {ours:?} != reference {expected:?}");
            }
            if let Some(decoded) = case["decoded_skip_special"].as_str()
                && tokenizer.decode(&ours, true).map_err(|e| e.to_string())? != decoded
            {
                decode_bad += 1;
            }
        }
        report.exact(name, "ids", ids_bad, cases.len());
        report.exact(name, "decode", decode_bad, cases.len());
        Ok(())
    };
    if let Err(e) = run() {
        report.error(name, "load", e);
    }
}

/// Real `tokenizer.model` files (no tokenizer.json) with the ids of their reference libraries:
/// sentencepiece, THUDM's remote code, tiktoken. One `ids` and one `decode` line per folder.
fn tokenizer_model_fixtures(root: &Path, report: &mut Report) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("reference.json").is_file()).collect();
    dirs.sort();
    for dir in dirs {
        let name = format!("tokenizer.{}", dir.file_name().unwrap().to_string_lossy());
        if !dir.join("tokenizer.model").is_file() {
            report.skip(&name, "ids", "no tokenizer.model: not a format this check reads");
            continue;
        }
        if let Err(e) = tokenizer_model_checks(&dir, &name, report) {
            report.error(&name, "load", e);
        }
    }
}

fn tokenizer_model_checks(dir: &Path, name: &str, report: &mut Report) -> Result<(), String> {
    let info = read_json(&dir.join("reference.json"))?;
    let tokenizer = Tokenizer::from_dir(dir).map_err(|e| e.to_string())?;
    let ids_of = |value: &Value| -> Vec<u32> { value.as_array().into_iter().flatten().filter_map(Value::as_u64).map(|v| v as u32).collect() };
    let (mut checked, mut ids_bad, mut decoded, mut decode_bad) = (0, 0, 0, 0);
    let mut compare = |text: &str, with_specials: bool, expected: Vec<u32>| -> Result<(), String> {
        let ours = tokenizer.encode(text, with_specials).map_err(|e| e.to_string())?;
        checked += 1;
        if ours != expected {
            ids_bad += 1;
            println!("  {name}: {text:?} (specials {with_specials}): ember {ours:?} != reference {expected:?}");
        }
        Ok(())
    };
    // sentencepiece's own ids (no BOS/EOS), THUDM's (with the [gMASK] sop prefix), tiktoken's.
    for case in info["sentencepiece"]["cases"].as_array().into_iter().flatten() {
        compare(case["text"].as_str().unwrap_or_default(), false, ids_of(&case["ids"]))?;
    }
    for case in info["transformers_remote_code"]["cases"].as_array().into_iter().flatten() {
        let text = case["text"].as_str().unwrap_or_default();
        compare(text, true, ids_of(&case["encode"]))?;
        compare(text, false, ids_of(&case["encode_no_special"]))?;
    }
    // chatglm.cpp's expected ids, for cases that apply to this folder's model.
    let folder = dir.file_name().unwrap().to_string_lossy().into_owned();
    let applies = |case: &&Value| case["applies_to"].as_array().is_some_and(|a| a.iter().any(|m| m.as_str() == Some(&folder)));
    for case in info["cross_check_chatglm_cpp"].as_array().into_iter().flatten().filter(applies) {
        if let Some(text) = case["text"].as_str() {
            compare(text, true, ids_of(&case["expected"]))?;
        }
    }
    for case in info["tiktoken"]["cases"].as_array().into_iter().flatten() {
        let text = case["text"].as_str().unwrap_or_default();
        compare(text, false, ids_of(&case["ids_ordinary"]))?;
        compare(text, true, ids_of(&case["with_prefix_[gMASK]<sop>"]))?;
    }
    // ChatGLM3's chat input (`build_chat_input`), as chatglm.cpp expects it.
    for case in info["cross_check_chatglm_cpp"].as_array().into_iter().flatten().filter(applies) {
        let Some(messages) = case["messages"].as_array() else { continue };
        let conversation = conversation_of(messages)?;
        let ours = ChatTemplate::ChatGlm3.prompt_ids(&tokenizer, &conversation)?;
        checked += 1;
        if ours != ids_of(&case["expected"]) {
            ids_bad += 1;
            println!("  {name}: chatglm3 chat input: ember {ours:?} != reference {}", case["expected"]);
        }
    }
    // Special tokens: THUDM's and GLM-4's ids by name.
    let specials = [&info["transformers_remote_code"]["special_tokens"], &info["tiktoken"]["special_tokens_expected_ids"]];
    for (token, id) in specials.into_iter().filter_map(Value::as_object).flatten() {
        checked += 1;
        if tokenizer.token_to_id(token) != id.as_u64().map(|v| v as u32) {
            ids_bad += 1;
            println!("  {name}: special {token:?}: ember {:?} != reference {id}", tokenizer.token_to_id(token));
        }
    }
    // Decoding: sentencepiece's `decoded`, or the text itself where the reference round-trips.
    let cases = info["sentencepiece"]["cases"].as_array().into_iter().flatten().map(|c| (c, "ids"))
        .chain(info["tiktoken"]["cases"].as_array().into_iter().flatten().map(|c| (c, "ids_ordinary")));
    for (case, key) in cases {
        let expected = match case["decoded"].as_str() {
            // sentencepiece shows <unk> as " ⁇ "; HF's decoders drop it as a special token.
            Some(decoded) if decoded.contains(" ⁇ ") => continue,
            Some(decoded) => decoded,
            None if case["roundtrip"] == Value::Bool(true) => case["text"].as_str().unwrap_or_default(),
            None => continue,
        };
        let ours = tokenizer.decode(&ids_of(&case[key]), true).map_err(|e| e.to_string())?;
        decoded += 1;
        if ours != expected {
            decode_bad += 1;
            println!("  {name}: decode: ember {ours:?} != reference {expected:?}");
        }
    }
    if checked == 0 {
        report.skip(name, "ids", "reference.json has no case format this check reads");
        return Ok(());
    }
    report.exact(name, "ids", ids_bad, checked);
    report.exact(name, "decode", decode_bad, decoded);
    Ok(())
}

/// `[{role, content, tool_calls?}]` as a conversation.
fn conversation_of(messages: &[Value]) -> Result<Conversation, String> {
    let messages = messages
        .iter()
        .map(|m| {
            let role = match m["role"].as_str() {
                Some("system") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("observation" | "tool") => Role::Observation,
                other => return Err(format!("unknown role {other:?}")),
            };
            let mut message = Message::new(role, m["content"].as_str().unwrap_or_default());
            message.tool_call_id = m["tool_call_id"].as_str().map(str::to_string);
            // transformers' `tool_calls`: `{"type": "function", "function": {name, arguments}, "id"?}`.
            for call in m["tool_calls"].as_array().into_iter().flatten() {
                let function = if call["function"].is_object() { &call["function"] } else { call };
                let name = function["name"].as_str().ok_or("a tool call without a name")?;
                let id = call["id"].as_str().map(str::to_string);
                message.tool_calls.push(ToolCall { name: name.to_string(), arguments: function["arguments"].clone(), id });
            }
            Ok(message)
        })
        .collect::<Result<_, String>>()?;
    Ok(Conversation::new(messages))
}

/// Checkpoints' own Jinja chat templates (`template = "auto"`) against transformers'
/// `apply_chat_template`: the rendered text, the ids of the conversation, and the prompt ids
/// with the generation prompt.
fn chat_template_fixtures(root: &Path, report: &mut Report) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("reference.json").is_file()).collect();
    dirs.sort();
    for dir in dirs {
        let name = format!("chat_template.{}", dir.file_name().unwrap().to_string_lossy());
        let run = |report: &mut Report| -> Result<(), String> {
            let info = read_json(&dir.join("reference.json"))?;
            let tokenizer = Tokenizer::from_dir(&dir).map_err(|e| e.to_string())?;
            let template = ChatTemplate::named("auto", &dir)?.expect("auto is a template");
            let policy = ember_data::chat::LossPolicy { last_turn_only: false, train_on_inputs: false };
            let cases = info["cases"].as_array().ok_or("no \"cases\" list")?;
            let (mut text_bad, mut ids_bad) = (0, 0);
            for case in cases {
                let mut conversation = conversation_of(case["messages"].as_array().ok_or("a case without messages")?)?;
                conversation.tools = ember_data::dataset::tools(case.get("tools"))?;
                let ids = |key: &str| -> Vec<u32> { case[key].as_array().into_iter().flatten().filter_map(Value::as_u64).map(|v| v as u32).collect() };
                let text = template.text(&tokenizer, &template.render(&conversation, policy, false)?);
                text_bad += usize::from(case["text"].as_str() != Some(text.as_str()));
                let (example, _) = template.example(&tokenizer, &conversation, policy, usize::MAX)?;
                ids_bad += usize::from(example.input_ids != ids("ids"));
                conversation.messages.pop();
                let prompt = template.render(&conversation, policy, true)?;
                text_bad += usize::from(case["prompt_text"].as_str() != Some(template.text(&tokenizer, &prompt).as_str()));
                ids_bad += usize::from(template.prompt_ids(&tokenizer, &conversation)? != ids("prompt_ids"));
            }
            report.exact(&name, "text", text_bad, 2 * cases.len());
            report.exact(&name, "ids", ids_bad, 2 * cases.len());
            Ok(())
        };
        if let Err(e) = run(report) {
            report.error(&name, "load", e);
        }
    }
}

/// A real pretrained model: top-5 ids at every position, last-position logits, greedy tokens.
fn pretrained_fixture(dir: &Path, name: &str, device: &Device, report: &mut Report) {
    let model_dir = models_root().join(name);
    if !model_dir.join("config.json").is_file() {
        report.skip(name, "all", &format!("no converted model at {} (see README: ember import gguf)", model_dir.display()));
        return;
    }
    let mut run = || -> Result<(), String> {
        let info = read_json(&dir.join("reference.json"))?;
        let reference = Checkpoint::open_file(&dir.join("reference.safetensors")).map_err(|e| e.to_string())?;
        let tokenizer = Tokenizer::from_dir(&model_dir).map_err(|e| e.to_string())?;
        let model = BaseModel::load(&model_dir, LoadDtype::F32, device).map_err(|e| e.to_string())?;
        let prompts = info["prompts"].as_array().ok_or("no \"prompts\" list")?;
        for (i, prompt) in prompts.iter().enumerate() {
            let ids: Vec<i64> = prompt["input_ids"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect();
            let text = prompt["text"].as_str().unwrap_or_default();
            let ours_ids = tokenizer.encode(text, true).map_err(|e| e.to_string())?;
            let mismatched = ours_ids.len() != ids.len() || ours_ids.iter().zip(&ids).any(|(&a, &b)| a as i64 != b);
            report.exact(name, &format!("prompt{i}.tokens"), usize::from(mismatched), 1);

            let len = ids.len();
            let logits = to_vec(model.forward(int_tensor(ids, [1, len], device), None));
            let vocab = logits.len() / len;
            let top5 = prompt["top5_ids"].as_array().ok_or("no top5_ids")?;
            let top5_values = prompt["top5_values"].as_array().ok_or("no top5_values")?;
            let (mut bad_positions, mut max_abs_top5) = (0, 0f32);
            for (pos, (expected, values)) in top5.iter().zip(top5_values).enumerate() {
                let row = &logits[pos * vocab..(pos + 1) * vocab];
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let expected: Vec<usize> = expected.as_array().into_iter().flatten().filter_map(|v| v.as_u64()).map(|v| v as usize).collect();
                if order[..5] != expected[..] {
                    bad_positions += 1;
                }
                for (&id, value) in expected.iter().zip(values.as_array().into_iter().flatten()) {
                    max_abs_top5 = max_abs_top5.max((row[id] - value.as_f64().unwrap_or(f64::NAN) as f32).abs());
                }
            }
            report.exact(name, &format!("prompt{i}.top5_ids"), bad_positions, top5.len());
            report.check(name, &format!("prompt{i}.top5_logits"), max_abs_top5, LOGITS_ATOL_PRETRAINED);
            let (last, _) = f32s(&reference, &format!("prompt{i}.last_logits"))?;
            let ours_last = &logits[(len - 1) * vocab..];
            let max_abs = ours_last.iter().zip(&last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            report.check(name, &format!("prompt{i}.last_logits"), max_abs, LOGITS_ATOL_PRETRAINED);
        }

        let generation = &info["greedy_generation"];
        let prompt: Vec<i64> = generation["prompt_ids"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect();
        let expected: Vec<i64> = generation["new_token_ids"].as_array().into_iter().flatten().filter_map(Value::as_i64).collect();
        let mut cache = KvCache::default();
        let mut next = prompt;
        let mut generated = Vec::new();
        while generated.len() < expected.len() {
            let len = next.len();
            let last = to_vec(model.next_token_logits(int_tensor(next, [1, len], device), &mut cache));
            let token = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as i64;
            generated.push(token);
            next = vec![token];
        }
        let mismatches = generated.iter().zip(&expected).filter(|(a, b)| a != b).count();
        report.exact(name, "greedy_tokens", mismatches, expected.len());
        Ok(())
    };
    if let Err(e) = run() {
        report.error(name, "load", e);
    }
}
