//! Hostile input: every bad file, record or key gives one clear error line naming it, exit code
//! 2, no panic, and nothing half-written.

mod common;

use std::path::Path;

use common::{assert_bad_input, ember, fixtures, read_json, recipe, write_micro_llama};

/// `ember train` of the tiny CI recipe on `data` (written to a file named `name`).
fn train_on(name: &str, data: &[u8], extra: &[&str]) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    let run = dir.path().join("run");
    let mut args = vec![
        "train".to_string(), recipe("ci/tiny-lora.toml"), "--quiet".into(),
        "--set".into(), format!("data.path=\"{}\"", path.display()),
        "--set".into(), format!("output.dir=\"{}\"", run.display()),
        "--set".into(), "data.val_size=0".into(), "--set".into(), "train.max_steps=1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    if !output.status.success() {
        assert!(!run.join("adapter").exists() && !run.join("summary.json").exists(), "a failed run left outputs");
    }
    (output, dir)
}

#[test]
fn malformed_datasets_name_the_file_record_and_key() {
    let cases: [(&str, &[u8], &[&str]); 8] = [
        ("broken.json", b"[{\"instruction\": \"a\", \"output\": ", &["broken.json", "malformed JSON"]),
        ("lines.jsonl", b"{\"instruction\": \"a\", \"output\": \"b\"}\n{oops}\n", &["lines.jsonl", "line 2: malformed JSON"]),
        ("missing.json", br#"[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]"#, &["missing.json", "record 1", "missing 'instruction'"]),
        ("no_output.json", br#"[{"instruction": "a"}]"#, &["no_output.json", "record 0", "missing 'output'"]),
        ("types.json", br#"[{"instruction": "a", "output": ["b"]}]"#, &["types.json", "record 0", "'output' must be a string, found an array"]),
        ("empty.json", b"[]", &["empty.json", "no records"]),
        ("not_records.json", b"[1, 2]", &["not_records.json", "record 0", "expected an object, found a number"]),
        ("latin1.json", b"[{\"instruction\": \"caf\xe9\", \"output\": \"b\"}]", &["latin1.json", "invalid UTF-8 at byte 21"]),
    ];
    for (name, data, needles) in cases {
        let (output, dir) = train_on(name, data, &[]);
        assert_bad_input(&output, needles);
        // Data is checked before the output folder is made.
        assert!(!dir.path().join("run").exists(), "{name}: a failed run left its output folder");
    }
}

/// Records longer than `cutoff_len` are truncated and counted; those left without an answer
/// token are listed by index, never trained on silently.
#[test]
fn over_long_records_are_counted_and_reported() {
    let long = "word ".repeat(200);
    let data = serde_json::json!([
        {"instruction": "Say hi.", "output": "Hi."},
        {"instruction": "Repeat.", "output": long},
        {"instruction": long, "output": "Too late."},
        {"instruction": "Say bye.", "output": "Bye."},
    ]);
    let (output, dir) = train_on("long.json", data.to_string().as_bytes(), &["--set", "data.cutoff_len=48", "--set", "train.micro_batch_size=2", "--set", "train.warmup_steps=0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&dir.path().join("run/summary.json"));
    assert_eq!(summary["truncated_records"], 2);
    assert_eq!(summary["skipped_empty_records"].as_array().unwrap().len(), 1);
    assert_eq!(summary["train_examples"], 3);
}

#[test]
fn recipe_with_a_wrong_type_names_the_key() {
    let output = ember(&["train", &recipe("ci/tiny-lora.toml"), "--set", "train.micro_batch_size=\"eight\""]);
    assert_bad_input(&output, &["tiny-lora.toml", "'train.micro_batch_size'", "expected usize"]);
    let output = ember(&["train", &recipe("ci/tiny-lora.toml"), "--set", "train.on_nonfinite=ignore"]);
    assert_bad_input(&output, &["'train.on_nonfinite'", "unknown variant `ignore`", "expected `stop` or `skip`"]);
}

type Header = serde_json::Map<String, serde_json::Value>;
type HeaderEdit = Box<dyn FnOnce(&mut Header)>;

/// Rewrites the JSON header of `dir/model.safetensors` through `edit`.
fn edit_safetensors_header(dir: &Path, edit: impl FnOnce(&mut Header)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn safetensors_with_a_lying_header_is_bad_input() {
    let norm = "model.norm.weight";
    let cases: [(&str, HeaderEdit); 4] = [
        ("offsets past the end", Box::new(|h| {
            let end = h.values().filter_map(|v| v["data_offsets"][1].as_u64()).max().unwrap();
            h[norm]["data_offsets"] = serde_json::json!([end, end + 32]);
        })),
        ("overlapping", Box::new(|h| {
            let other = h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
            h[norm]["data_offsets"] = other;
        })),
        ("huge dims", Box::new(|h| {
            h[norm]["shape"] = serde_json::json!([1u64 << 62, 1u64 << 62]);
        })),
        ("unknown dtype", Box::new(|h| {
            h[norm]["dtype"] = serde_json::json!("F128");
        })),
    ];
    for (what, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_micro_llama(dir.path(), 8);
        edit_safetensors_header(dir.path(), edit);
        let output = ember(&["inspect", dir.path().to_str().unwrap()]);
        eprintln!("{what}: {}", String::from_utf8_lossy(&output.stderr).trim());
        assert_bad_input(&output, &["model.safetensors"]);
    }
}

/// Copies a fixture adapter into a temp folder, with its config edited.
fn edited_adapter(model: &str, method: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join(model).join("adapters").join(method);
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("adapter_config.json");
    let mut config = read_json(&config_path);
    edit(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

fn generate_with(base: &str, adapter: &Path) -> std::process::Output {
    let base = fixtures().join(base);
    ember(&["generate", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2"])
}

#[test]
fn adapters_that_do_not_fit_the_base_are_bad_input() {
    // Rank in the config disagrees with the tensors.
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["r"] = 4.into());
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_model.safetensors", "lora_A.weight", "shape"]);
    // ChatGLM's fused query_key_value does not exist in a LLaMA model.
    let chatglm = fixtures().join("tiny_chatglm/adapters/lora");
    assert_bad_input(&generate_with("tiny_llama", &chatglm), &["adapter_config.json", "target_modules [dense, query_key_value] match no module"]);
    // A prefix whose config and table disagree on the number of virtual tokens.
    let prefix = edited_adapter("tiny_llama", "prefix", |c| c["num_virtual_tokens"] = 30.into());
    assert_bad_input(&generate_with("tiny_llama", prefix.path()), &["adapter_model.safetensors", "prompt_embeddings"]);
}

#[test]
fn peft_options_ember_cannot_compute_are_refused() {
    for (key, value) in [
        ("bias", serde_json::json!("some")),
        ("fan_in_fan_out", serde_json::json!(true)),
        ("alora_invocation_tokens", serde_json::json!([5, 17])),
        ("use_qalora", serde_json::json!(true)),
        ("arrow_config", serde_json::json!({"top_k": 3})),
    ] {
        let adapter = edited_adapter("tiny_llama", "lora", |c| c[key] = value.clone());
        assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_config.json", key]);
    }
    // Trained biases (B's, or the base's on Qwen2's q/k/v) the file does not hold.
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["lora_bias"] = true.into());
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_model.safetensors", "q_proj.lora_B.bias"]);
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["trainable_token_indices"] = serde_json::json!([5, 99999]));
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_config.json", "token 99999 is outside the vocabulary"]);
    let adapter = edited_adapter("tiny_qwen2", "lora_dropout", |c| c["bias"] = "all".into());
    assert_bad_input(&generate_with("tiny_qwen2", adapter.path()), &["adapter_model.safetensors", "q_proj.base_layer.bias"]);
    // Branches on the LM head or the embedding the file does not hold.
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["target_modules"] = serde_json::json!(["q_proj", "lm_head"]));
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_model.safetensors", "lm_head.lora_A.weight"]);
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["target_modules"] = serde_json::json!(".*embed_tokens"));
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_model.safetensors", "embed_tokens.lora_embedding_A"]);
    // A pattern that is not a regex.
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["rank_pattern"] = serde_json::json!({"q_proj(": 4}));
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_config.json", "rank_pattern", "q_proj("]);
    // A rank the pattern gives that the tensors do not have.
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["rank_pattern"] = serde_json::json!({"q_proj": 4}));
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_model.safetensors", "q_proj.lora_A.weight", "shape"]);
    // A LoRA file that claims to be DoRA lacks the magnitudes.
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["use_dora"] = true.into());
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_model.safetensors", "lora_magnitude_vector"]);
    let adapter = edited_adapter("tiny_llama", "lora", |c| c["peft_type"] = "VERA".into());
    assert_bad_input(&generate_with("tiny_llama", adapter.path()), &["adapter_config.json", "VERA", "not a format ember reads"]);
}
