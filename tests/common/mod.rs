//! Helpers shared by the end-to-end tests of the `ember` binary.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, TensorView};

pub fn ember(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember")).args(args).output().expect("run ember")
}

/// `ember` with extra environment variables.
pub fn ember_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember")).args(args).envs(env.iter().copied()).output().expect("run ember")
}

/// The reference fixtures: `EMBER_FIXTURES`, or the repository's own (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    std::env::var_os("EMBER_FIXTURES").map(PathBuf::from).unwrap_or_else(|| repository().join("tests/fixtures"))
}

/// A file of the repository's sample data (`tests/data`).
pub fn data(name: &str) -> PathBuf {
    repository().join("tests/data").join(name)
}

pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Parameters of a model folder's `model.safetensors`, from its header. ChatGLM also stores
/// RoPE's `inv_freq` buffer, which is not a parameter.
pub fn parameter_count(dir: &Path) -> usize {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model.safetensors");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    tensors.tensors().iter().filter(|(name, _)| !name.ends_with("inv_freq")).map(|(_, view)| view.shape().iter().product::<usize>()).sum()
}

/// A shipped recipe, by path under `recipes/`.
pub fn recipe(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes").join(name).to_string_lossy().into_owned()
}

/// Exit code `code` and exactly one line on stderr, `error: ...`, that contains every `needle`.
pub fn assert_error(output: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "expected one error line, got: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "'{needle}' not in: {stderr}");
    }
}

/// Bad input: exit code 2 and one error line naming every `needle`.
pub fn assert_bad_input(output: &Output, needles: &[&str]) {
    assert_error(output, 2, needles);
}

/// Every F32 tensor of a safetensors file, by name, in name order.
pub fn f32_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> =
        file.tensors().into_iter().map(|(name, view)| (name, view.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Every file of a run's exported adapter, by name.
pub fn adapter_files(run: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut files: Vec<_> =
        std::fs::read_dir(run.join("adapter")).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name(), std::fs::read(e.path()).unwrap())).collect();
    files.sort();
    files
}

/// Step, train loss and eval loss of every line of a run's `metrics.jsonl` (the timings differ
/// from run to run; these must not).
pub fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["step"], v["loss"], v["eval_loss"])
        })
        .collect()
}

/// A micro LLaMA (hidden 8, one layer) whose `model.norm.weight` has `norm_len` values.
pub fn write_micro_llama(dir: &Path, norm_len: usize) {
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 12, "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![12, 8]),
        ("model.layers.0.input_layernorm.weight", vec![8]),
        ("model.layers.0.post_attention_layernorm.weight", vec![8]),
        ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", vec![8, 8]),
        ("model.layers.0.mlp.gate_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.up_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.down_proj.weight", vec![8, 16]),
        ("model.norm.weight", vec![norm_len]),
    ];
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            (name.to_owned(), shape, (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}
