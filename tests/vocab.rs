//! Extended vocabularies (Chinese-LLaMA-Alpaca's recipe): the embedding and LM head grown to a
//! bigger tokenizer, and trained in full beside LoRA (`modules_to_save`), end to end.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use common::{assert_bad_input, data, ember, read_json, repository};
use ember_models::{BaseModel, Checkpoint, LoadDtype, VocabModule};

fn fixture(path: &str) -> PathBuf {
    repository().join("tests/fixtures").join(path)
}

fn rows(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn new_rows_are_the_mean_transformers_draws_around() {
    let device = Device::flex();
    let base = BaseModel::load(&fixture("tiny_llama"), LoadDtype::F32, &device).unwrap();
    let resized = base.resize_vocab(1006).unwrap();
    assert_eq!(resized.config.vocab_size, 1006);
    // transformers' rows: N(mean, 1e-9 · covariance) draws, the fixture's base.
    let theirs = Checkpoint::open_dir(&fixture("tiny_llama_vocab")).unwrap();
    for (module, key) in [(VocabModule::Embedding, "model.embed_tokens.weight"), (VocabModule::LmHead, "lm_head.weight")] {
        let ours = rows(resized.vocab_weight(module).unwrap().val().narrow(0, 1000, 6));
        let expected = rows(theirs.float::<2>(key, [1006, 64], LoadDtype::F32, &device).unwrap().narrow(0, 1000, 6));
        let worst = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{key}: new rows differ from transformers' by {worst}");
        // The old rows are untouched.
        let old = rows(resized.vocab_weight(module).unwrap().val().narrow(0, 0, 1000));
        let original = rows(theirs.float::<2>(key, [1006, 64], LoadDtype::F32, &device).unwrap().narrow(0, 0, 1000));
        assert_eq!(old, original);
    }
    assert!(resized.resize_vocab(999).unwrap_err().contains("cannot shrink"));
}

/// tiny_llama's weights with tiny_llama_vocab's tokenizer (6 ids more than the embedding).
fn extended_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture("tiny_llama").join(file), model.join(file)).unwrap();
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny_llama_vocab").join(file), model.join(file)).unwrap();
    }
    model
}

fn recipe(dir: &Path, model: &Path, resize: bool) -> String {
    let path = dir.join(format!("vocab-{resize}.toml"));
    let text = format!(
        "[model]\npath = {model:?}\nresize_embeddings = {resize}\n[adapter]\nmethod = \"lora\"\nr = 4\nmodules_to_save = [\"embed_tokens\", \"lm_head\"]\n\
         [data]\npath = {:?}\ncutoff_len = 64\n[train]\nmax_steps = 2\nmicro_batch_size = 2\nlr = 1e-3\n[output]\ndir = {:?}\n",
        data("alpaca_zh_sample_200.json"),
        dir.join("run")
    );
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn extended_vocabulary_trains_saves_merges_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let model = extended_model(dir.path());
    let run = dir.path().join("run");
    // Without the switch: one error line naming both sizes.
    assert_bad_input(&ember(&["train", &recipe(dir.path(), &model, false)]), &["model.resize_embeddings", "1006 ids", "1000 rows"]);
    let check = ember(&["recipe", "check", &recipe(dir.path(), &model, false)]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.code() == Some(2) && stderr.contains("1006 ids") && stderr.contains("1000 rows"), "{stderr}");

    let recipe = recipe(dir.path(), &model, true);
    let check = ember(&["inspect", "--recipe", &recipe]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    // LoRA r4 on q (64 -> 64) and v (64 -> 32) of 2 layers: 1,792; plus 2 · 1006 · 64 for the
    // two modules at the grown vocabulary.
    assert!(stdout.contains("LoRA r=4 on [q_proj, v_proj], embed_tokens and lm_head trained in full: 130,560 trainable"), "{stdout}");
    let output = ember(&["train", &recipe, "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("grown from 1000 to 1006 ids"), "{log}");

    // PEFT's layout: the modules under their own names, listed in adapter_config.json.
    let adapter = run.join("adapter");
    let config = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(config["modules_to_save"], serde_json::json!(["embed_tokens", "lm_head"]));
    let weights = Checkpoint::open_file(&adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(weights.info("base_model.model.model.embed_tokens.weight").unwrap().0, [1006, 64]);
    assert_eq!(weights.info("base_model.model.lm_head.weight").unwrap().0, [1006, 64]);

    // Merged: a full model with the grown vocabulary.
    let merged = dir.path().join("merged");
    let output = ember(&["merge", "--base", &model.to_string_lossy(), "--adapter", &adapter.to_string_lossy(), "--out", &merged.to_string_lossy()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(read_json(&merged.join("config.json"))["vocab_size"], 1006);
    let merged_weights = Checkpoint::open_dir(&merged).unwrap();
    assert_eq!(merged_weights.info("model.embed_tokens.weight").unwrap().0, [1006, 64]);
    let inspect = ember(&["inspect", &merged.to_string_lossy()]);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));

    // The adapter loads onto the original 1000-id base, growing it, and generates.
    let output = ember(&["generate", "--base", &model.to_string_lossy(), "--adapter", &adapter.to_string_lossy(), "--prompt", "你好", "--max-new-tokens", "4"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn modules_to_save_must_name_the_embedding_or_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = format!(
        "[model]\npath = {:?}\n[adapter]\nmethod = \"lora\"\nmodules_to_save = [\"norm\"]\n[data]\npath = {:?}\n[train]\nmax_steps = 1\n[output]\ndir = {:?}\n",
        fixture("tiny_llama"), data("alpaca_en_sample_200.json"), dir.path().join("run")
    );
    std::fs::write(&path, text).unwrap();
    assert_bad_input(&ember(&["train", &path.to_string_lossy()]), &["modules_to_save", "'norm'", "model.embed_tokens", "lm_head"]);
}
