//! End-to-end tests of the `ember` binary: inspect, GGUF import, and bad input (one clear
//! error line naming the file or key, exit code 2, no panic).

mod common;

use std::path::Path;

use common::{assert_bad_input, ember, fixtures, recipe, write_micro_llama};
use safetensors::tensor::TensorView;

#[test]
fn inspect_prints_parameter_counts_of_the_fixtures() {
    for (name, params, arch) in [
        ("tiny_llama", "4,188,480", "llama"),
        ("tiny_glm", "336,448", "glm"),
        ("tiny_chatglm", "336,448", "chatglm"),
    ] {
        let output = ember(&["inspect", fixtures().join(name).to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains(&format!("parameters:     {params}")), "{name}: {stdout}");
        assert!(stdout.contains(&format!("architecture:   {arch}")), "{name}: {stdout}");
    }
}

#[test]
fn inspect_accepts_a_valid_micro_model() {
    let dir = tempfile::tempdir().unwrap();
    write_micro_llama(dir.path(), 8);
    let output = ember(&["inspect", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // 12·8 embed + 2·8 norms + (8+4+4+8)·8 attention + 3·16·8 mlp + 8 final norm
    assert!(String::from_utf8_lossy(&output.stdout).contains("parameters:     696 "));
}

#[test]
fn missing_model_folder_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    assert_bad_input(&ember(&["inspect", missing.to_str().unwrap()]), &["nope/config.json", "missing"]);
}

#[test]
fn missing_weights_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    write_micro_llama(dir.path(), 8);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_bad_input(&ember(&["inspect", dir.path().to_str().unwrap()]), &["model.safetensors", "missing"]);
}

#[test]
fn unknown_architecture_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt_neox", "hidden_size": 8}"#).unwrap();
    assert_bad_input(&ember(&["inspect", dir.path().to_str().unwrap()]), &["config.json", "model_type", "gpt_neox"]);
}

#[test]
fn malformed_config_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    assert_bad_input(&ember(&["inspect", dir.path().to_str().unwrap()]), &["config.json", "invalid JSON"]);
}

#[test]
fn truncated_safetensors_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    write_micro_llama(dir.path(), 8);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_bad_input(&ember(&["inspect", dir.path().to_str().unwrap()]), &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tensor_of_wrong_shape_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    write_micro_llama(dir.path(), 7);
    assert_bad_input(
        &ember(&["inspect", dir.path().to_str().unwrap()]),
        &["model.safetensors", "'model.norm.weight'", "[7]", "[8]"],
    );
}

#[test]
fn garbage_gguf_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    let out = dir.path().join("out");
    std::fs::write(&file, b"not a gguf file at all").unwrap();
    assert_bad_input(&ember(&["import", "gguf", file.to_str().unwrap(), "--out", out.to_str().unwrap()]), &["model.gguf", "bad magic"]);
    // A header whose tensor count claims more than the file holds.
    let mut lying = b"GGUF".to_vec();
    lying.extend(3u32.to_le_bytes());
    lying.extend(u64::MAX.to_le_bytes());
    lying.extend(0u64.to_le_bytes());
    std::fs::write(&file, lying).unwrap();
    assert_bad_input(&ember(&["import", "gguf", file.to_str().unwrap(), "--out", out.to_str().unwrap()]), &["model.gguf", "exceeds the file size"]);
    assert!(!out.exists(), "no output folder after a failed import");
}

/// The CI recipe end to end: train -> PEFT export -> merge -> generate.
#[test]
fn tiny_recipe_trains_merges_and_generates() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let output = ember(&["train", &recipe("ci/tiny-lora.toml"), "--quiet", "--set", &format!("output.dir=\"{}\"", run.display())]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 10);
    let (first, last) = (summary["first_eval_loss"].as_f64().unwrap(), summary["final_eval_loss"].as_f64().unwrap());
    assert!(last < first, "eval loss did not fall: {first} -> {last}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 10);
    let adapter = run.join("adapter");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");

    let base = fixtures().join("tiny_llama");
    let merged = out.path().join("merged");
    let output = ember(&["merge", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(merged.join("model.safetensors").is_file() && merged.join("tokenizer.json").is_file());

    let generate = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec!["generate", "--base", model.to_str().unwrap(), "--prompt", "Give three tips for staying healthy.", "--max-new-tokens", "8"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let output = ember(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    // The merged folder answers exactly as base + adapter.
    assert_eq!(generate(&merged, None), generate(&base, Some(&adapter)));
}

#[test]
fn recipe_with_unknown_key_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[model]\npath = \"m\"\n[adapter]\nmethod = \"lora\"\nrank = 8\n[data]\npath = \"d\"\n[output]\ndir = \"o\"\n").unwrap();
    assert_bad_input(&ember(&["train", path.to_str().unwrap()]), &["bad.toml", "unknown key 'adapter.rank'", "did you mean 'adapter.r'"]);
}

#[test]
fn recipe_pointing_at_missing_data_is_bad_input() {
    let output = ember(&["train", &recipe("ci/tiny-lora.toml"), "--set", "data.path=\"/nonexistent/data.json\""]);
    assert_bad_input(&output, &["/nonexistent/data.json"]);
}

/// The method CI recipes train, export in their formats, and generate with the adapter.
#[test]
fn prefix_and_adaption_recipes_train_export_and_generate() {
    for (name, base, files) in [
        ("ci/tiny-ptuning-v2.toml", "tiny_chatglm", ["config.json", "prefix_encoder.safetensors"]),
        ("ci/tiny-llama-adapter.toml", "tiny_llama", ["adapter_config.json", "adapter_model.safetensors"]),
    ] {
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join("run");
        let output = ember(&["train", &recipe(name), "--quiet", "--set", &format!("output.dir=\"{}\"", run.display())]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
        let (first, last) = (summary["first_eval_loss"].as_f64().unwrap(), summary["final_eval_loss"].as_f64().unwrap());
        assert!(last < first, "{name}: eval loss did not fall: {first} -> {last}");
        for file in files {
            assert!(run.join("adapter").join(file).is_file(), "{name}: no adapter/{file}");
        }
        let base = fixtures().join(base);
        let adapter = run.join("adapter");
        let output = ember(&["generate", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--prompt", "你好", "--max-new-tokens", "4"]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// A checkpoint split into shards with `model.safetensors.index.json` loads like a single file.
#[test]
fn sharded_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_micro_llama(dir.path(), 8);
    let single = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&single).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, keys) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let views: Vec<(String, TensorView)> = keys.iter().map(|k| (k.clone(), file.tensor(k).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(shard)).unwrap();
        for k in keys {
            weight_map.insert(k.clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(&single).unwrap();

    let output = ember(&["inspect", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("11 tensors"));
}

/// `ember eval` scores the base and base + adapter on the same answer tokens.
#[test]
fn eval_reports_base_and_adapter_loss() {
    let base = fixtures().join("tiny_llama");
    let adapter = base.join("adapters/lora");
    let data = fixtures().join("../data/alpaca_en_sample_200.json");
    let output = ember(&["eval", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", data.to_str().unwrap(), "--limit", "8"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["records"], 8);
    assert_eq!(result["method"], "lora");
    for side in ["base", "adapter"] {
        let loss = result[side]["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{side}: {loss}");
    }
    assert_ne!(result["base"]["loss"], result["adapter"]["loss"]);
}
