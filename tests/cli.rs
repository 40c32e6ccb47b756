//! End-to-end tests of the `ember` binary: inspect, GGUF import, and bad input (one clear
//! error line naming the file or key, exit code 2, no panic).

mod common;

use std::path::Path;

use common::{assert_bad_input, data, ember, ember_with_env, fixtures, parameter_count, read_json, recipe, repository, write_micro_llama};
use safetensors::tensor::TensorView;

#[test]
fn inspect_prints_parameter_counts_of_the_fixtures() {
    for (name, arch) in [("tiny_llama", "llama"), ("tiny_qwen2", "llama (model_type qwen2)"), ("tiny_qwen3", "llama (model_type qwen3)"), ("tiny_mistral", "llama (model_type mistral)"), ("tiny_glm", "glm"), ("tiny_glm4", "glm (model_type glm4)"), ("tiny_chatglm", "chatglm")] {
        let params = group_digits(parameter_count(&fixtures().join(name)));
        let output = ember(&["inspect", fixtures().join(name).to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains(&format!("parameters:     {params}")), "{name}: {stdout}");
        assert!(stdout.contains(&format!("architecture:   {arch}")), "{name}: {stdout}");
    }
}

/// The 7B recipes are sized without their checkpoint: checkpointing brings the user's first job
/// (LLaMA-7B, bf16, 4 × 256 tokens) under a 24 GB card; the estimate names its parts.
#[test]
fn inspect_recipe_estimates_peak_memory_of_a_model_shape() {
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/alpaca-lora-7b.toml");
    let output = ember(&["inspect", "--recipe", recipe.to_str().unwrap(), "--shape", "llama-7b"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.starts_with("memory:")).unwrap_or_else(|| panic!("no memory line in {stdout}"));
    let gib: f64 = line.split('~').nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(gib > 12.6 && gib < 22.0, "{line}");
    for part in ["weights", "adapter + AdamW", "activations", "loss", "checkpointing on"] {
        assert!(line.contains(part), "{line}");
    }
    assert_bad_input(&ember(&["inspect", "--recipe", recipe.to_str().unwrap(), "--shape", "llama-99b"]), &["llama-99b", "not a preset"]);
    // Recipe keys are overridden as for `ember train`: twice the batch, more activations.
    let doubled = ember(&["inspect", "--recipe", recipe.to_str().unwrap(), "--shape", "llama-7b", "--set", "train.micro_batch_size=8"]);
    let doubled = String::from_utf8_lossy(&doubled.stdout);
    assert!(doubled.contains("8 sequences of 256 tokens"), "{doubled}");
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
    let summary = read_json(&run.join("summary.json"));
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

/// `ember chat`: a line a message; the second message's prompt holds the first exchange; /clear
/// starts over, so the same message gets the same answer, which is `ember generate`'s; the
/// streamed text is the answers of `--json`. Templates that hold no conversation are refused.
#[test]
fn chat_keeps_the_conversation_until_cleared() {
    let base = repository().join("tests/fixtures/tiny_llama");
    let chat = |extra: &[&str], input: &str| chat_on(&[&["--base", base.to_str().unwrap(), "--max-new-tokens", "6"], extra].concat(), input);
    let input = "Hello there\n\nAnd then?\n/clear\nHello there\n/exit\nnever read\n";
    let output = chat(&["--template", "llama2-chat", "--json"], input);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let turns: Vec<serde_json::Value> = String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(turns.len(), 3, "{turns:?}");
    let count = |turn: &serde_json::Value, key: &str| turn[key].as_u64().unwrap();
    assert!(count(&turns[1], "prompt_tokens") > count(&turns[0], "prompt_tokens") + count(&turns[0], "answer_tokens"), "{turns:?}");
    assert_eq!((&turns[2]["answer"], count(&turns[2], "prompt_tokens"), count(&turns[2], "reused_tokens")), (&turns[0]["answer"], count(&turns[0], "prompt_tokens"), 0));
    let generated = ember(&["generate", "--base", base.to_str().unwrap(), "--template", "llama2-chat", "--prompt", "Hello there", "--max-new-tokens", "6"]);
    assert_eq!(String::from_utf8(generated.stdout).unwrap().trim_end_matches('\n'), turns[0]["answer"].as_str().unwrap());
    let streamed = chat(&["--template", "llama2-chat"], input);
    assert!(streamed.status.success(), "{}", String::from_utf8_lossy(&streamed.stderr));
    let answers: String = turns.iter().map(|t| format!("{}\n", t["answer"].as_str().unwrap())).collect();
    assert_eq!(String::from_utf8(streamed.stdout).unwrap(), answers);
    assert_bad_input(&chat(&["--template", "text"], ""), &["--template text", "not a conversation"]);
    assert_bad_input(&chat(&["--template", "alpaca", "--system", "Be brief."], ""), &["--system", "prompt template"]);
}

/// `ember chat --tools`: a Jinja template renders the tools into the prompt, `/tool RESULT`
/// answers the model's turn and the model goes on from the cached conversation; `/tool` with no
/// answer to follow is refused on stderr and the chat goes on; templates without tool calls and
/// a tools file that is not a list of schemas are bad input.
#[test]
fn chat_offers_tools_and_takes_their_results() {
    let base = repository().join("tests/fixtures/tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repository().join("tests/fixtures/chat_template/qwen2.5_tools/tokenizer_config.json")).unwrap()).unwrap();
    let template = dir.path().join("qwen2.5.jinja");
    std::fs::write(&template, config["chat_template"].as_str().unwrap()).unwrap();
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, r#"[{"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]"#).unwrap();
    let chat = |extra: &[&str], input: &str| chat_on(&[&["--base", base.to_str().unwrap(), "--max-new-tokens", "4", "--json"], extra].concat(), input);
    let turns = |output: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let count = |turn: &serde_json::Value, key: &str| turn[key].as_u64().unwrap();
    let with_tools = chat(&["--template", template.to_str().unwrap(), "--tools", tools.to_str().unwrap()], "/tool 4\nWhat is 2 + 2?\n/tool {\"sum\": 4}\n");
    assert!(String::from_utf8_lossy(&with_tools.stderr).contains("/tool gives back the result of a call"), "{}", String::from_utf8_lossy(&with_tools.stderr));
    let with_tools = turns(&with_tools);
    assert_eq!(with_tools.len(), 2, "{with_tools:?}");
    // The result's turn runs only what it adds to the cached conversation.
    assert!(count(&with_tools[1], "prompt_tokens") > count(&with_tools[0], "prompt_tokens") + count(&with_tools[0], "answer_tokens"));
    assert!(count(&with_tools[1], "reused_tokens") >= count(&with_tools[0], "prompt_tokens"), "{with_tools:?}");
    let without = turns(&chat(&["--template", template.to_str().unwrap()], "What is 2 + 2?\n"));
    assert!(count(&with_tools[0], "prompt_tokens") > count(&without[0], "prompt_tokens") + 20, "the tools are not in the prompt: {with_tools:?} {without:?}");
    assert_bad_input(&chat(&["--template", "llama2-chat", "--tools", tools.to_str().unwrap()], ""), &["--tools", "'llama2-chat' has no tool calls"]);
    assert_bad_input(&chat(&["--template", "alpaca", "--tools", tools.to_str().unwrap()], ""), &["--tools", "prompt template"]);
    // GLM-4's own tool format; the tiny model's replies are read back as THUDM reads them.
    let glm = repository().join("tests/fixtures/tiny_chatglm");
    let glm4 = turns(&chat_on(&["--base", glm.to_str().unwrap(), "--max-new-tokens", "4", "--json", "--template", "glm4", "--tools", tools.to_str().unwrap()], "1 + 2?\n/tool 3\n"));
    assert_eq!(glm4.len(), 2, "{glm4:?}");
    let toolless = dir.path().join("plain.jinja");
    std::fs::write(&toolless, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    assert_bad_input(&chat(&["--template", toolless.to_str().unwrap(), "--tools", tools.to_str().unwrap()], ""), &["does not render the tools", "'add'"]);
    let not_a_list = dir.path().join("one.json");
    std::fs::write(&not_a_list, r#"{"name": "add"}"#).unwrap();
    assert_bad_input(&chat(&["--template", template.to_str().unwrap(), "--tools", not_a_list.to_str().unwrap()], ""), &["one.json", "'tools' must be a list of function schemas"]);
}

/// Generation stops where transformers' `generate` does: also at the `eos_token_id`s of the
/// base's `generation_config.json` (ChatGLM3's and Llama-3's name more than their config.json).
#[test]
fn generation_stops_at_the_generation_configs_eos() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(repository().join("tests/fixtures/tiny_llama").join(file), base.join(file)).unwrap();
    }
    let answer = |name: &str| -> Vec<u64> {
        let out = dir.path().join(name);
        let args = ["generate", "--base", base.to_str().unwrap(), "--template", "none", "--prompt", "Hello", "--max-new-tokens", "3", "--logits-out", out.to_str().unwrap()];
        let output = ember(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        read_json(&out)["answer_ids"].as_array().unwrap().iter().map(|id| id.as_u64().unwrap()).collect()
    };
    let free = answer("free.json");
    assert_eq!(free.len(), 3, "{free:?}");
    std::fs::write(base.join("generation_config.json"), format!(r#"{{"eos_token_id": [2, {}]}}"#, free[1])).unwrap();
    assert_eq!(answer("stopped.json"), free[..2]);
    std::fs::write(base.join("generation_config.json"), r#"{"eos_token_id": "</s>"}"#).unwrap();
    let output = ember(&["generate", "--base", base.to_str().unwrap(), "--template", "none", "--prompt", "Hello"]);
    assert_bad_input(&output, &["generation_config.json", "key 'eos_token_id': expected a token id, found \"</s>\""]);
}

/// Greedy answers with a repetition penalty are transformers' token for token:
/// `model.generate(ids, do_sample=False, max_new_tokens=24, repetition_penalty=p)` on the tiny
/// LLaMA fixture (transformers 5.23.0).
#[test]
fn repetition_penalty_is_transformers() {
    let base = repository().join("tests/fixtures/tiny_llama");
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, [u64; 24]); 3] = [
        ("1.0", [969, 60, 740, 969, 898, 734, 364, 34, 574, 750, 631, 931, 235, 259, 55, 364, 34, 259, 334, 286, 380, 334, 710, 174]),
        ("1.3", [969, 60, 740, 210, 96, 364, 870, 931, 622, 909, 787, 129, 151, 17, 906, 898, 174, 209, 631, 595, 335, 771, 928, 773]),
        ("0.7", [969, 60, 427, 969, 898, 344, 344, 344, 344, 344, 574, 969, 898, 574, 442, 442, 442, 970, 442, 970, 898, 970, 898, 970]),
    ];
    for (penalty, want) in cases {
        let out = dir.path().join(format!("{penalty}.json"));
        let args = ["generate", "--base", base.to_str().unwrap(), "--template", "none", "--prompt", "Hello, my name is", "--max-new-tokens", "24"];
        let output = ember(&[&args[..], &["--repetition-penalty", penalty, "--logits-out", out.to_str().unwrap()]].concat());
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let json = read_json(&out);
        assert_eq!(json["prompt_ids"], serde_json::json!([1, 42, 277, 602, 14, 344, 91, 427, 735, 306]));
        let answer: Vec<u64> = json["answer_ids"].as_array().unwrap().iter().map(|id| id.as_u64().unwrap()).collect();
        assert_eq!(answer, want, "repetition penalty {penalty}");
    }
}

/// Sampling settings and counts outside their range are refused, not run (NaN once sampled
/// garbage; a batch of 0 ran as 1).
#[test]
fn arguments_out_of_range_are_bad_input() {
    let base = repository().join("tests/fixtures/tiny_llama");
    let bad = [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "1.5"), ("--top-p", "-0.1"), ("--min-p", "2"), ("--repetition-penalty", "0")];
    for (flag, value) in bad {
        let setting = format!("{flag}={value}");
        let output = ember(&["generate", "--base", base.to_str().unwrap(), "--prompt", "Hello", &setting]);
        // clap's usage error: its line, then where to find help.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(&format!("error: invalid value '{value}' for '{flag}")), "{stderr}");
    }
    let data = repository().join("tests/data/alpaca_en_sample_200.json");
    let output = ember(&["eval", "--base", base.to_str().unwrap(), "--data", data.to_str().unwrap(), "--batch", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("error: invalid value '0' for '--batch"));
}

/// `ember chat` with `args`, `input` its standard input.
fn chat_on(args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("chat")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `ember exam` on MMLU-style (no header) and CMMLU-style (a header, `mapping.json`) files:
/// every question scored by base and adapter, accuracy matching the picks it writes, `--limit`
/// per subject; bad files and options name what is wrong.
#[test]
fn exam_scores_multiple_choice_questions() {
    let base = repository().join("tests/fixtures/tiny_llama");
    let exam = data("exam");
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.jsonl");
    let run = |args: &[&str]| {
        let mut all = vec!["exam", "--base", base.to_str().unwrap()];
        all.extend(args);
        ember(&all)
    };
    let (test, dev) = (exam.join("en/test"), exam.join("en/dev"));
    let adapter = base.join("adapters/lora");
    let output = run(&["--adapter", adapter.to_str().unwrap(), "--test", test.to_str().unwrap(), "--dev", dev.to_str().unwrap(), "--shots", "3", "--answers", answers.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((result["questions"].as_u64(), result["subjects"].as_u64(), result["method"].as_str()), (Some(9), Some(2), Some("lora")), "{result}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 9);
    for model in ["base", "adapter"] {
        let correct = lines.iter().filter(|l| l[model]["pick"] == l["answer"]).count();
        assert_eq!(result[model]["correct"].as_u64(), Some(correct as u64), "{model}: {result}");
        assert!((result[model]["accuracy"].as_f64().unwrap() - correct as f64 / 9.0).abs() < 1e-12);
    }
    // Shots make the prompt longer; the same test without them is shorter.
    let limited = run(&["--test", test.to_str().unwrap(), "--limit", "2", "--answers", answers.to_str().unwrap()]);
    assert!(limited.status.success(), "{}", String::from_utf8_lossy(&limited.stderr));
    let short: Vec<serde_json::Value> = std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(short.len(), 4);
    assert!(short[0]["prompt_tokens"].as_u64() < lines[0]["prompt_tokens"].as_u64());
    let zh = run(&["--test", exam.join("zh/test").to_str().unwrap(), "--dev", exam.join("zh/dev").to_str().unwrap(), "--shots", "2", "--lang", "zh"]);
    assert!(zh.status.success(), "{}", String::from_utf8_lossy(&zh.stderr));
    let zh: serde_json::Value = serde_json::from_slice(&zh.stdout).unwrap();
    assert!(zh["base"]["categories"]["Social Sciences"].is_number(), "{zh}");

    assert_bad_input(&run(&["--test", test.to_str().unwrap(), "--shots", "2"]), &["--shots 2", "--dev"]);
    assert_bad_input(&run(&["--test", test.to_str().unwrap(), "--template", "alpaca"]), &["--template alpaca", "fewshot"]);
    let bad = dir.path().join("bad_test.csv");
    std::fs::write(&bad, "Q1,a,b,c,d,A\nQ2,a,b,c,d,E\n").unwrap();
    assert_bad_input(&run(&["--test", bad.to_str().unwrap()]), &["bad_test.csv: row 2", "answer 'E'"]);
    std::fs::write(&bad, "Q1,a,b,c\n").unwrap();
    assert_bad_input(&run(&["--test", bad.to_str().unwrap()]), &["bad_test.csv: row 1", "4 columns, 6 needed"]);
    std::fs::write(&bad, "Q1,a,b,c,d,A\n").unwrap();
    assert_bad_input(&run(&["--test", bad.to_str().unwrap(), "--dev", dev.to_str().unwrap(), "--shots", "1"]), &["no dev questions of subject 'bad'"]);

    // The same questions as the Hub's datasets save them: `cais/mmlu`'s records (choices, an
    // index, the subject) in one JSON Lines file, C-Eval's (letters) in a JSON array.
    let as_records = |folder: &Path, mmlu: bool| -> Vec<serde_json::Value> {
        let mut files: Vec<_> = std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.iter().flat_map(|file| {
            let subject = file.file_stem().unwrap().to_str().unwrap().rsplit_once('_').unwrap().0.to_owned();
            std::fs::read_to_string(file).unwrap().lines().map(|line| {
                // The sample's questions hold commas only inside quotes, and no quotes.
                let mut cells: Vec<String> = Vec::new();
                let mut quoted = false;
                let mut cell = String::new();
                for c in line.chars() {
                    match c {
                        '"' => quoted = !quoted,
                        ',' if !quoted => cells.push(std::mem::take(&mut cell)),
                        c => cell.push(c),
                    }
                }
                cells.push(cell);
                let answer = "ABCD".find(cells[5].as_str()).unwrap();
                match mmlu {
                    true => serde_json::json!({"question": cells[0], "subject": subject, "choices": cells[1..5], "answer": answer}),
                    false => serde_json::json!({"id": 0, "question": cells[0], "A": cells[1], "B": cells[2], "C": cells[3], "D": cells[4], "answer": cells[5], "subject": subject}),
                }
            }).collect::<Vec<_>>()
        }).collect()
    };
    let (jsonl, array) = (dir.path().join("test.jsonl"), dir.path().join("dev.json"));
    std::fs::write(&jsonl, as_records(&test, true).iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    std::fs::write(&array, serde_json::to_string(&as_records(&dev, false)).unwrap()).unwrap();
    let from_records = run(&["--adapter", adapter.to_str().unwrap(), "--test", jsonl.to_str().unwrap(), "--dev", array.to_str().unwrap(), "--shots", "3"]);
    assert!(from_records.status.success(), "{}", String::from_utf8_lossy(&from_records.stderr));
    let from_records: serde_json::Value = serde_json::from_slice(&from_records.stdout).unwrap();
    for key in ["questions", "subjects", "base", "adapter"] {
        assert_eq!(from_records[key], result[key], "{key}");
    }
    // And as Parquet (`tests/data/parquet/generate.py`): `cais/mmlu`'s one table of every subject,
    // and C-Eval's folder a subject, its files named as the Hub names a split's shards.
    let parquet = exam.join("parquet");
    let shard = |folder: &str, split: &str| parquet.join(folder).join(format!("{split}-00000-of-00001.parquet")).to_str().unwrap().to_owned();
    let mmlu = run(&["--adapter", adapter.to_str().unwrap(), "--test", &shard("mmlu", "test"), "--dev", &shard("mmlu", "dev"), "--shots", "3"]);
    assert!(mmlu.status.success(), "{}", String::from_utf8_lossy(&mmlu.stderr));
    let mmlu: serde_json::Value = serde_json::from_slice(&mmlu.stdout).unwrap();
    for key in ["questions", "subjects", "base", "adapter"] {
        assert_eq!(mmlu[key], result[key], "{key}");
    }
    let ceval = run(&["--test", &shard("ceval/chinese_geography", "test"), "--dev", &shard("ceval/chinese_geography", "dev"), "--shots", "2", "--lang", "zh"]);
    assert!(ceval.status.success(), "{}", String::from_utf8_lossy(&ceval.stderr));
    let ceval: serde_json::Value = serde_json::from_slice(&ceval.stdout).unwrap();
    for key in ["correct", "subjects"] {
        assert_eq!(ceval["base"][key], zh["base"][key], "{key}: {ceval}");
    }
    std::fs::write(&jsonl, "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n").unwrap();
    assert_bad_input(&run(&["--test", jsonl.to_str().unwrap()]), &["test.jsonl: record 0", "'choices' must be 4 strings"]);
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

/// `data.eval_path` holds out a file of its own: every record of it is evaluated, none trained on.
#[test]
fn an_eval_file_is_held_out_whole() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let eval = data("alpaca_zh_sample_200.json");
    let sets = ["data.val_size=0".to_string(), format!("data.eval_path=\"{}\"", eval.display()), format!("output.dir=\"{}\"", run.display())];
    let mut args = vec!["train".to_string(), recipe("ci/tiny-lora.toml"), "--quiet".into()];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&run.join("summary.json"));
    // 200 records each; cutoff 128 leaves 10 English ones without an answer token.
    assert_eq!((summary["train_examples"].as_u64(), summary["eval_examples"].as_u64()), (Some(190), Some(190)));
}

/// `data.tokenized_path`: the first run tokenizes the corpus into the folder, the next reads the
/// ids from it without reading the text; both train exactly as a run without the folder.
#[test]
fn a_tokenized_corpus_is_kept_and_mapped_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tokens");
    let train = |name: &str, cached: bool| {
        let run = dir.path().join(name);
        let mut sets = vec![format!("output.dir=\"{}\"", run.display()), "train.max_steps=4".to_string()];
        if cached {
            sets.push(format!("data.tokenized_path=\"{}\"", cache.display()));
        }
        let mut args = vec!["train".to_string(), recipe("ci/tiny-pretrain.toml")];
        args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
        let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let summary = read_json(&run.join("summary.json"));
        let losses = ["train_examples", "eval_examples", "final_train_loss", "final_eval_loss"].map(|key| summary[key].clone());
        (String::from_utf8(output.stdout).unwrap(), losses)
    };
    let (_, in_memory) = train("in-memory", false);
    let (first, written) = train("first", true);
    assert!(first.contains("data: tokenizing into") && first.contains("nothing there yet"), "{first}");
    let (second, mapped) = train("second", true);
    assert!(second.contains("data: token ids read from"), "{second}");
    assert_eq!((&written, &mapped), (&in_memory, &in_memory));
    let output = ember(&["train", &recipe("ci/tiny-lora.toml"), "--set", "data.tokenized_path=\"tokens\""]);
    assert_bad_input(&output, &["data.tokenized_path", "data.template = \"text\""]);
}

/// `ember eval --template text` scores a corpus as a run evaluates it: a run whose `eval_path` is
/// a text file gives its final eval loss back. `--limit N` scores what a file of the first N
/// records scores; `--generate` has no question to answer.
#[test]
fn eval_scores_a_text_corpus_as_training_does() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = std::fs::read_to_string(data("zh_text_sample.txt")).unwrap().lines().map(str::to_owned).collect();
    let (held, head) = (dir.path().join("held.txt"), dir.path().join("head.txt"));
    std::fs::write(&held, lines[..40].join("\n")).unwrap();
    std::fs::write(&head, lines[..10].join("\n")).unwrap();
    let run = dir.path().join("run");
    let sets = ["train.max_steps=4".to_string(), "data.val_size=0".into(), format!("data.eval_path=\"{}\"", held.display()), format!("output.dir=\"{}\"", run.display())];
    let mut args = vec!["train".to_string(), recipe("ci/tiny-pretrain.toml"), "--quiet".into()];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&run.join("summary.json"));
    let base = repository().join("tests/fixtures/tiny_llama_vocab");
    let adapter = run.join("adapter");
    let eval = |data: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", data.to_str().unwrap(), "--template", "text", "--cutoff-len", "128"];
        args.extend(extra);
        ember(&args)
    };
    let scored = |data: &Path, extra: &[&str]| {
        let output = eval(data, extra);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let all = scored(&held, &[]);
    let (loss, final_eval) = (all["adapter"]["loss"].as_f64().unwrap(), summary["final_eval_loss"].as_f64().unwrap());
    assert!((loss - final_eval).abs() < 1e-5, "ember eval {loss} vs the run's final eval loss {final_eval}");
    assert_eq!((all["records"].as_u64(), all["examples"].as_u64()), (Some(40), summary["eval_examples"].as_u64()), "{all}");
    let (limited, first) = (scored(&held, &["--limit", "10"]), scored(&head, &[]));
    assert_eq!(limited["records"], 10);
    for key in ["examples", "answer_tokens", "base", "adapter"] {
        assert_eq!(limited[key], first[key], "{key}");
    }
    assert_bad_input(&eval(&held, &["--generate", "1", "--answers", "answers.jsonl"]), &["--generate", "plain text"]);
}

/// Early stopping and `load_best_model_at_end`: the run stops after `patience` evaluations
/// without a lower eval loss, and its adapter is the best evaluation's: `ember eval` on the eval
/// file gives that loss back.
#[test]
fn early_stopping_keeps_the_best_adapter() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let eval = data("alpaca_zh_sample_200.json");
    let sets = [
        "train.max_steps=40".to_string(), "train.lr=0.05".into(), "train.eval_steps=2".into(), "train.early_stopping_patience=2".into(),
        "train.load_best_model_at_end=true".into(), "data.val_size=0".into(), format!("data.eval_path=\"{}\"", eval.display()),
        format!("output.dir=\"{}\"", run.display()),
    ];
    let mut args = vec!["train".to_string(), recipe("ci/tiny-lora.toml"), "--quiet".into()];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&run.join("summary.json"));
    let (best_step, stopped) = (summary["best_eval_step"].as_u64().unwrap(), summary["stopped_early_at"].as_u64().unwrap());
    assert_eq!((stopped, summary["steps"].as_u64().unwrap()), (best_step + 4, stopped), "{summary}");
    assert!(!run.join("best_adapter").exists());
    let base = fixtures().join("tiny_llama");
    let adapter = run.join("adapter");
    let output = ember(&["eval", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", eval.to_str().unwrap(), "--cutoff-len", "128"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let (loss, best) = (result["adapter"]["loss"].as_f64().unwrap(), summary["best_eval_loss"].as_f64().unwrap());
    assert!((loss - best).abs() < 1e-5, "ember eval {loss} vs the best evaluation's {best}");
}

/// PiSSA takes its start out of the frozen weight and saves the adapter converted for the
/// original base: `ember eval` of the saved adapter on the untouched base gives the run's own
/// final eval loss back. A start given twice (`init_from`) is refused; with `model.quantize` the
/// base is quantized after the start is taken out (QPiSSA).
#[test]
fn a_pissa_adapter_is_saved_for_the_original_base() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let eval = data("alpaca_zh_sample_200.json");
    let sets = [
        "adapter.init_lora_weights=\"pissa_niter_4\"".to_string(), "train.max_steps=6".into(), "train.lr=0.01".into(), "data.val_size=0".into(),
        format!("data.eval_path=\"{}\"", eval.display()), format!("output.dir=\"{}\"", run.display()),
    ];
    let mut args = vec!["train".to_string(), recipe("ci/tiny-lora.toml"), "--quiet".into()];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]));
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&run.join("summary.json"));
    let config = read_json(&run.join("adapter/adapter_config.json"));
    assert_eq!((config["r"].as_u64(), config["init_lora_weights"].as_bool()), (Some(16), Some(true)), "{config}");
    let (base, adapter) = (fixtures().join("tiny_llama"), run.join("adapter"));
    let output = ember(&["eval", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", eval.to_str().unwrap(), "--cutoff-len", "128"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let (loss, trained) = (result["adapter"]["loss"].as_f64().unwrap(), summary["final_eval_loss"].as_f64().unwrap());
    assert!((loss - trained).abs() < 1e-5, "ember eval {loss} vs the run's {trained}");
    assert!((loss - result["base"]["loss"].as_f64().unwrap()).abs() > 1e-3, "the adapter changed nothing");

    // Away from the run folder, which --overwrite may clear.
    let start = out.path().join("start");
    std::fs::create_dir(&start).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(file), start.join(file)).unwrap();
    }
    args.push("--overwrite".into());
    let mut twice = args.clone();
    twice.extend(["--set".into(), format!("adapter.init_from=\"{}\"", start.display())]);
    assert_bad_input(&ember(&twice.iter().map(String::as_str).collect::<Vec<_>>()), &["init_lora_weights", "init_from"]);

    // QPiSSA: the base is quantized after the start is taken out of it, and trains.
    args.extend(["--set".into(), "model.quantize=\"nf4\"".into()]);
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&run.join("summary.json"));
    assert!(summary["final_eval_loss"].as_f64() < summary["first_eval_loss"].as_f64(), "{summary}");
}

/// The method CI recipes train, export in their formats, and generate with the adapter.
#[test]
fn method_recipes_train_export_and_generate() {
    const PEFT: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
    for (name, base, files) in [
        ("ci/tiny-ptuning-v2.toml", "tiny_chatglm", ["config.json", "prefix_encoder.safetensors"]),
        ("ci/tiny-llama-adapter.toml", "tiny_llama", PEFT),
        ("ci/tiny-dora.toml", "tiny_llama", PEFT),
        ("ci/tiny-ia3.toml", "tiny_llama", PEFT),
        ("ci/tiny-prompt-tuning.toml", "tiny_llama", PEFT),
        ("ci/tiny-qlora.toml", "tiny_llama", PEFT),
        ("ci/tiny-qpissa.toml", "tiny_llama", PEFT),
        ("ci/tiny-vocab-chat.toml", "tiny_llama_vocab", PEFT),
        ("ci/tiny-lora-options.toml", "tiny_qwen2", PEFT),
        ("ci/tiny-pretrain.toml", "tiny_llama_vocab", PEFT),
    ] {
        let out = tempfile::tempdir().unwrap();
        let run = out.path().join("run");
        let output = ember(&["train", &recipe(name), "--quiet", "--set", &format!("output.dir=\"{}\"", run.display())]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        let summary = read_json(&run.join("summary.json"));
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
    let data = data("alpaca_en_sample_200.json");
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

/// Every recipe under `recipes/` and `recipes/ci/`.
fn shipped_recipes(folder: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(recipe(folder))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

#[test]
fn recipe_check_passes_every_shipped_recipe() {
    let all: Vec<String> = shipped_recipes("").into_iter().chain(shipped_recipes("ci")).collect();
    assert!(all.len() >= 8, "{all:?}");
    let args: Vec<&str> = ["recipe", "check", "--skip-missing-paths"].into_iter().chain(all.iter().map(String::as_str)).collect();
    let output = ember(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}{stdout}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), all.len(), "{stdout}");
    // The CI recipes' models and data are all here: no flag needed, nothing skipped.
    let ci = shipped_recipes("ci");
    let args: Vec<&str> = ["recipe", "check"].into_iter().chain(ci.iter().map(String::as_str)).collect();
    let output = ember(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("200 records"));
}

#[test]
fn recipe_check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(recipe("ci/tiny-lora.toml")).unwrap().replace("\"../../", &format!("\"{}/", repository().display()));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text.replace("[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]", "[\"nonexistent_proj\"]")).unwrap();
    let output = ember(&["recipe", "check", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for needle in ["bad.toml", "'adapter.target_modules'", "nonexistent_proj", "q_proj"] {
        assert!(stderr.contains(needle), "'{needle}' not in: {stderr}");
    }
    // A missing model folder is an error, or a warning with --skip-missing-paths.
    let missing = dir.path().join("missing.toml");
    std::fs::write(&missing, text.replace("fixtures/tiny_llama", "fixtures/no_such_model")).unwrap();
    let output = ember(&["recipe", "check", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("'model.path'"));
    let output = ember(&["recipe", "check", "--skip-missing-paths", missing.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("warning: "));
}

/// `--json`: every stdout line is a JSON event, the last the summary; `EMBER_TRAIN__MAX_STEPS`
/// shortens the run; summary.json names the adapter, metrics and a valid PNG of the curves.
#[test]
fn train_json_prints_events_and_the_summary_last() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let set_dir = format!("output.dir=\"{}\"", run.display());
    let output = ember_with_env(&["train", &recipe("ci/tiny-lora.toml"), "--json", "--set", &set_dir], &[("EMBER_TRAIN__MAX_STEPS", "3")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let events: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(events.iter().filter(|e| e["event"] == "step").count(), 3);
    assert!(events.iter().all(|e| ["info", "step", "summary"].contains(&e["event"].as_str().unwrap())));
    let last = events.last().unwrap();
    assert_eq!(last["event"], "summary");
    assert_eq!(last["steps"], 3);
    let summary = read_json(&run.join("summary.json"));
    assert!(summary["final_eval_loss"].as_f64().is_some() && summary["best_eval_loss"].as_f64().is_some());
    assert!(Path::new(summary["adapter_dir"].as_str().unwrap()).join("adapter_config.json").is_file());
    assert!(Path::new(summary["metrics"].as_str().unwrap()).is_file());
    let png = std::fs::read(summary["plot"].as_str().unwrap()).unwrap();
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} bytes", png.len());
}

#[test]
fn unknown_recipe_key_from_the_environment_is_bad_input() {
    let output = ember_with_env(&["train", &recipe("ci/tiny-lora.toml")], &[("EMBER_TRAIN__MAX_STEP", "3")]);
    assert_bad_input(&output, &["EMBER_TRAIN__MAX_STEP", "unknown key 'train.max_step'", "did you mean 'train.max_steps'"]);
}

/// `ember inspect <run dir>` for a finished run and for one stopped after a checkpoint, and
/// `ember plot` redrawing the curves.
#[test]
fn inspect_and_plot_a_training_run() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let set_dir = format!("output.dir=\"{}\"", run.display());
    let output = ember_with_env(
        &["train", &recipe("ci/tiny-lora.toml"), "--quiet", "--set", &set_dir, "--set", "train.save_steps=2"],
        &[("EMBER_TRAIN__MAX_STEPS", "3")],
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let inspect = || {
        let output = ember(&["inspect", run.to_str().unwrap()]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let finished = inspect();
    for needle in ["status:         finished", "method:         LoRA r=8", "[q_proj, k_proj, v_proj, o_proj]", "trainable:      7,168 of", "steps:          3 ", "eval loss:", "training_curves.png"] {
        assert!(finished.contains(needle), "'{needle}' not in:\n{finished}");
    }

    let png = run.join("training_curves.png");
    std::fs::remove_file(&png).unwrap();
    let output = ember(&["plot", run.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));

    // As if killed after the step-2 checkpoint.
    std::fs::remove_file(run.join("summary.json")).unwrap();
    std::fs::remove_dir_all(run.join("adapter")).unwrap();
    let unfinished = inspect();
    for needle in ["status:         unfinished", "step-00000002", "steps:          2 ", "method:         LoRA r=8"] {
        assert!(unfinished.contains(needle), "'{needle}' not in:\n{unfinished}");
    }
    assert_bad_input(&ember(&["plot", out.path().to_str().unwrap()]), &["no metrics.jsonl"]);
}

/// `ember eval --generate`: greedy answers of the base and of base + adapter, one JSON line each.
#[test]
fn eval_writes_base_and_adapter_answers() {
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.jsonl");
    let base = fixtures().join("tiny_llama");
    let adapter = base.join("adapters/lora");
    let data = data("alpaca_en_sample_200.json");
    let output = ember(&[
        "eval", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", data.to_str().unwrap(),
        "--limit", "4", "--generate", "2", "--max-new-tokens", "4", "--answers", answers.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let records: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["instruction"], records[i]["instruction"]);
        assert_eq!(line["reference"], records[i]["output"]);
        assert!(line["input"].is_string() && line["base"].is_string() && line["adapter"].is_string(), "{line}");
    }
    assert_ne!(lines[0]["base"], lines[0]["adapter"]);
}

#[test]
fn help_documents_exit_codes_and_every_command() {
    let output = ember(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for needle in ["Exit codes:", "0  success", "1  failure while running", "2  bad input", "recipe", "plot"] {
        assert!(help.contains(needle), "'{needle}' not in:\n{help}");
    }
    for command in [&["train"][..], &["recipe", "check"], &["plot"], &["inspect"], &["eval"], &["generate"], &["merge"], &["bench"], &["import", "gguf"]] {
        let args: Vec<&str> = command.iter().copied().chain(["--help"]).collect();
        assert!(ember(&args).status.success(), "{command:?} --help");
    }
}

/// 1234567 -> "1,234,567", as `ember inspect` prints counts.
fn group_digits(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `model.quantize = "int8"` trains; `double_quant` without nf4 is refused, naming the key.
#[test]
fn int8_base_trains_and_double_quant_needs_nf4() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let set_dir = format!("output.dir=\"{}\"", run.display());
    let args = ["train", &recipe("ci/tiny-lora.toml"), "--quiet", "--set", &set_dir, "--set", "model.quantize=\"int8\"", "--set", "train.max_steps=3"];
    let output = ember(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    let output = ember(&["train", &recipe("ci/tiny-lora.toml"), "--set", "model.double_quant=true"]);
    assert_bad_input(&output, &["model.double_quant", "nf4"]);
}
