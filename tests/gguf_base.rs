//! A GGUF file as the frozen base (`model.path = "model.gguf"`): its Q4_0/Q8_0 blocks are
//! trained on as they are. Training on them must equal, bit for bit, training on the same
//! weights dequantized by `ember import gguf`; the tokenizer comes from the file's metadata.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_bad_input, ember, losses, recipe, repository};
use ember_models::gguf::GgmlType;

fn tiny_llama() -> PathBuf {
    repository().join("tests/fixtures/tiny_llama")
}

fn run_ok(args: &[&str]) -> String {
    let output = ember(args);
    assert!(output.status.success(), "ember {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// tiny_llama exported to GGUF as `ty`, and the same file imported back to an f32 folder.
fn exported(dir: &Path, ty: &str) -> (PathBuf, PathBuf) {
    let gguf = dir.join(format!("tiny-{ty}.gguf"));
    let folder = dir.join(format!("imported-{ty}"));
    // tiny_llama's trained BPE is not one llama.cpp knows by its hash: name the pre-tokenizer.
    run_ok(&["export", "gguf", "--base", tiny_llama().to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", ty, "--pre", "gpt-2"]);
    run_ok(&["import", "gguf", gguf.to_str().unwrap(), "--out", folder.to_str().unwrap()]);
    (gguf, folder)
}

fn train(base: &Path, run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train".to_string(), recipe("ci/tiny-lora.toml")];
    for set in [format!("model.path={}", base.display()), format!("output.dir={}", run.display()), "train.max_steps=4".into(), "train.eval_steps=2".into()] {
        args.extend(["--set".to_string(), set]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    ember(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn training_on_gguf_blocks_equals_training_on_their_dequantized_import() {
    let dir = tempfile::tempdir().unwrap();
    for ty in ["q8_0", "q4_0"] {
        let (gguf, folder) = exported(dir.path(), ty);
        let on_gguf = dir.path().join(format!("run-gguf-{ty}"));
        let on_folder = dir.path().join(format!("run-folder-{ty}"));
        for (base, run) in [(&gguf, &on_gguf), (&folder, &on_folder)] {
            let output = train(base, run, &[]);
            assert!(output.status.success(), "{ty} {}: {}", base.display(), String::from_utf8_lossy(&output.stderr));
        }
        assert_eq!(losses(&on_gguf), losses(&on_folder), "{ty}: losses");
        let weights = |run: &Path| std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
        assert!(weights(&on_gguf) == weights(&on_folder), "{ty}: the adapters differ");

        // Generation with the adapter: same ids and the same last-position logits.
        let answer = |base: &Path, run: &Path| {
            let logits = run.join("logits.json");
            run_ok(&[
                "generate", "--base", base.to_str().unwrap(), "--adapter", run.join("adapter").to_str().unwrap(),
                "--prompt", "Give three tips for staying healthy.", "--max-new-tokens", "8", "--logits-out", logits.to_str().unwrap(),
            ]);
            std::fs::read_to_string(logits).unwrap()
        };
        assert_eq!(answer(&gguf, &on_gguf), answer(&folder, &on_folder), "{ty}: generation");
    }
}

/// K-quants (Q2_K to Q6_K) and the 5-bit types (tests/fixtures/ggml_quants, blocks written by llama.cpp's
/// Python package): training on the blocks equals training on `ember import gguf`'s f32 folder.
#[test]
fn training_on_k_quant_blocks_equals_training_on_their_dequantized_import() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = repository().join("tests/fixtures/ggml_quants/tiny_llama_kquants.gguf");
    let folder = dir.path().join("imported");
    run_ok(&["import", "gguf", gguf.to_str().unwrap(), "--out", folder.to_str().unwrap()]);
    let (on_gguf, on_folder) = (dir.path().join("run-gguf"), dir.path().join("run-folder"));
    for (base, run) in [(&gguf, &on_gguf), (&folder, &on_folder)] {
        let output = train(base, run, &["--set", "adapter.target_modules=\"all-linear\""]);
        assert!(output.status.success(), "{}: {}", base.display(), String::from_utf8_lossy(&output.stderr));
    }
    let losses_on_gguf = losses(&on_gguf);
    // Each line is "step loss eval_loss", one of the two null; about ln(1000) before training.
    let first = losses_on_gguf[0].split(' ').skip(1).find_map(|loss| loss.parse::<f64>().ok()).unwrap();
    assert!((5.0..9.0).contains(&first), "{losses_on_gguf:?}");
    assert_eq!(losses_on_gguf, losses(&on_folder));
    let weights = |run: &Path| std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(weights(&on_gguf) == weights(&on_folder), "the adapters differ");
}

#[test]
fn the_tokenizer_comes_from_the_gguf_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = exported(dir.path(), "q8_0");
    let from_gguf = ember_models::load_tokenizer(&gguf).unwrap();
    let from_folder = ember_data::Tokenizer::from_dir(&tiny_llama()).unwrap();
    for text in ["Give three tips for staying healthy.", "你好，世界", "Hello"] {
        assert_eq!(from_gguf.encode(text, true).unwrap(), from_folder.encode(text, true).unwrap(), "{text}");
    }
    assert_eq!(from_gguf.eos_id, from_folder.eos_id);
}

/// Overwrites the ggml type id of the tensor `name` in a GGUF file's header.
fn set_tensor_type(path: &Path, name: &str, type_id: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    // Tensor info: u64 name length, the name, u32 n_dims, n_dims × u64, u32 type, u64 offset.
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend(name.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("tensor info") + needle.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + dims * 8;
    bytes[type_at..type_at + 4].copy_from_slice(&type_id.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn what_ember_cannot_train_on_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = exported(dir.path(), "q4_0");

    // NF4 on top of blocks that are quantized already.
    let output = train(&gguf, &dir.path().join("run-nf4"), &["--set", "model.quantize=nf4"]);
    assert_bad_input(&output, &["quantized already", "model.quantize"]);

    // A merge needs the weights as a folder: the error says how to get one.
    let run = dir.path().join("run");
    assert!(train(&gguf, &run, &[]).status.success());
    let output = ember(&["merge", "--base", gguf.to_str().unwrap(), "--adapter", run.join("adapter").to_str().unwrap(), "--out", dir.path().join("merged").to_str().unwrap()]);
    assert_bad_input(&output, &["tiny-q4_0.gguf", "ember import gguf", "gguf-lora"]);
    assert!(!dir.path().join("merged").exists());

    // A type ember does not read (Q8_K, type 15: llama.cpp's intermediate for dot products)
    // names the type and the tensor.
    set_tensor_type(&gguf, "blk.0.ffn_down.weight", 15);
    let output = train(&gguf, &dir.path().join("run-k"), &[]);
    assert_bad_input(&output, &["blk.0.ffn_down.weight", "Q8_K"]);

    // A per-tensor scale belongs to NVFP4 weights only: on MXFP4's it is refused, by name.
    let fp4 = dir.path().join("fp4.gguf");
    std::fs::copy(repository().join("tests/fixtures/ggml_quants/tiny_llama_fp4.gguf"), &fp4).unwrap();
    set_tensor_type(&fp4, "blk.0.attn_q.weight", 39);
    let output = train(&fp4, &dir.path().join("run-scale"), &[]);
    assert_bad_input(&output, &["blk.0.attn_q.scale", "MXFP4"]);
}

/// A ModelOpt NVFP4 checkpoint as llama.cpp's converter writes it (NVFP4 projections with their
/// per-tensor `.scale`, an MXFP4 ffn_down): kept in its blocks at the file's size, and training
/// on it equals training on its import.
#[test]
fn training_on_fp4_types_equals_training_on_their_dequantized_import() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = repository().join("tests/fixtures/ggml_quants/tiny_llama_fp4.gguf");
    let file = ember_models::gguf::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.tensor("blk.0.attn_q.weight").unwrap().ggml_type, GgmlType::NVFP4);
    assert_eq!(file.tensor("blk.0.ffn_down.weight").unwrap().ggml_type, GgmlType::MXFP4);
    let per_value = file.projection_bytes_per_value(4.0).unwrap();
    assert!((0.53..0.57).contains(&per_value), "{per_value}");
    let shown = run_ok(&["inspect", gguf.to_str().unwrap()]);
    for line in ["MXFP4 (1 tensor), NVFP4 (6 tensors)", "kept in their blocks, 0.56 bytes a value", "pad none"] {
        assert!(shown.contains(line), "{line}: {shown}");
    }
    assert_blocks_train_as_their_import(dir.path(), &gguf);
}

/// The lattice types (IQ3_S here, with Q4_K and Q6_K beside it in an IQ3_M file) are kept as
/// 4-bit codes of their grid values: training on the file equals training on `ember import
/// gguf`'s f32 folder.
#[test]
fn training_on_lattice_types_equals_training_on_their_dequantized_import() {
    let dir = tempfile::tempdir().unwrap();
    let wide = wide_tiny_llama(dir.path());
    let gguf = dir.path().join("wide-iq3_m.gguf");
    run_ok(&["export", "gguf", "--base", wide.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "iq3_m", "--pre", "gpt-2"]);
    let file = ember_models::gguf::GgufFile::open(&gguf).unwrap();
    assert_eq!(file.tensor("blk.0.attn_q.weight").unwrap().ggml_type, GgmlType::IQ3_S);
    // All projections stay in their blocks' codes: about 0.55 bytes a value whatever the dtype.
    let per_value = |dense: f64| file.projection_bytes_per_value(dense).unwrap();
    assert!(per_value(4.0) == per_value(2.0) && per_value(2.0) < 0.6, "{} {}", per_value(4.0), per_value(2.0));
    assert_blocks_train_as_their_import(dir.path(), &gguf);
}

/// The ternary TQ1_0 and TQ2_0 (a TriLM's or BitNet's), Q2_0 and Q1_0, written by ember as
/// llama-quantize writes them: training on their blocks equals training on their import.
#[test]
fn training_on_ternary_and_low_bit_types_equals_training_on_their_dequantized_import() {
    let dir = tempfile::tempdir().unwrap();
    let wide = wide_tiny_llama(dir.path());
    for (ty, kind) in [("tq1_0", GgmlType::TQ1_0), ("tq2_0", GgmlType::TQ2_0), ("q2_0", GgmlType::Q2_0), ("q1_0", GgmlType::Q1_0)] {
        let gguf = dir.path().join(format!("wide-{ty}.gguf"));
        run_ok(&["export", "gguf", "--base", wide.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", ty, "--pre", "gpt-2"]);
        let file = ember_models::gguf::GgufFile::open(&gguf).unwrap();
        assert_eq!(file.tensor("blk.0.ffn_down.weight").unwrap().ggml_type, kind, "{ty}");
        assert_blocks_train_as_their_import(&dir.path().join(ty), &gguf);
    }
}

/// tiny_llama_kquants' weights (256 wide, so whole blocks of 256) as an f32 folder.
fn wide_tiny_llama(dir: &Path) -> PathBuf {
    let wide = dir.join("wide");
    let kquants = repository().join("tests/fixtures/ggml_quants/tiny_llama_kquants.gguf");
    run_ok(&["import", "gguf", kquants.to_str().unwrap(), "--out", wide.to_str().unwrap()]);
    wide
}

/// Training on `gguf`'s blocks gives the losses and the adapter, bit for bit, of training on its
/// `ember import gguf` folder (all linear layers adapted, so every projection's blocks are read).
fn assert_blocks_train_as_their_import(dir: &Path, gguf: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let folder = dir.join("imported");
    run_ok(&["import", "gguf", gguf.to_str().unwrap(), "--out", folder.to_str().unwrap()]);
    let (on_gguf, on_folder) = (dir.join("run-gguf"), dir.join("run-folder"));
    for (base, run) in [(gguf, &on_gguf), (&folder, &on_folder)] {
        let output = train(base, run, &["--set", "adapter.target_modules=\"all-linear\""]);
        assert!(output.status.success(), "{}: {}", base.display(), String::from_utf8_lossy(&output.stderr));
    }
    assert_eq!(losses(&on_gguf), losses(&on_folder), "{}", gguf.display());
    let weights = |run: &Path| std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(weights(&on_gguf) == weights(&on_folder), "{}: the adapters differ", gguf.display());
}
