//! Models by hub id: a real Hugging Face cache laid out on disk (refs, snapshots whose files are
//! symlinks into blobs, a sharded checkpoint, a missing blob, an unknown revision).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_bad_input, ember_with_env, repository};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn tiny() -> PathBuf {
    repository().join("tests/fixtures/tiny_llama")
}

/// `files` (name, bytes) as the snapshot `hash` of `models--org--<name>`, each a symlink to its
/// blob, with `refs/<revision>` pointing at it.
fn snapshot(cache: &Path, name: &str, revision: &str, hash: &str, files: &[(String, Vec<u8>)]) {
    let repo = cache.join(format!("models--org--{name}"));
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(repo.join("refs").join(revision), hash).unwrap();
    for (i, (file, bytes)) in files.iter().enumerate() {
        let blob = format!("{hash}-{i:04}");
        std::fs::write(repo.join("blobs").join(&blob), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(file)).unwrap();
    }
}

fn tiny_files() -> Vec<(String, Vec<u8>)> {
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(tiny().join(f)).unwrap()))
        .collect()
}

/// tiny_llama's weights split in two shards with `model.safetensors.index.json`.
fn sharded_files() -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut files: Vec<(String, Vec<u8>)> = tiny_files().into_iter().filter(|(f, _)| f != "model.safetensors").collect();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let name = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part.iter().map(|(k, v)| (k.clone(), TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).unwrap())).collect();
        files.push((name.clone(), safetensors::serialize(views, None).unwrap()));
        part.iter().for_each(|(k, _)| {
            weight_map.insert(k.clone(), serde_json::json!(name));
        });
    }
    files.push(("model.safetensors.index.json".into(), serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string().into_bytes()));
    files
}

#[test]
fn hub_ids_resolve_through_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    snapshot(&cache, "tiny", "main", MAIN, &tiny_files());
    snapshot(&cache, "tiny", "v1", V1, &tiny_files());
    snapshot(&cache, "sharded", "main", MAIN, &sharded_files());
    // A snapshot whose config.json links to a blob that is not there.
    snapshot(&cache, "broken", "main", MAIN, &tiny_files());
    std::fs::remove_file(cache.join("models--org--broken/blobs").join(format!("{MAIN}-0000"))).unwrap();

    let env = [("HF_HUB_CACHE", cache.to_str().unwrap())];
    for id in ["org/tiny", "org/tiny@v1", &format!("org/tiny@{V1}"), "org/sharded"] {
        let output = ember_with_env(&["inspect", id], &env);
        assert!(output.status.success(), "{id}: {}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("220,480"), "{id}: {stdout}");
    }
    // HF_HOME/hub when HF_HUB_CACHE is not set.
    let output = ember_with_env(&["inspect", "org/tiny"], &[("HF_HUB_CACHE", ""), ("HF_HOME", home.path().to_str().unwrap())]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The sharded snapshot generates too.
    let output = ember_with_env(&["generate", "--base", "org/sharded", "--prompt", "Hello", "--max-new-tokens", "3"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    assert_bad_input(&ember_with_env(&["inspect", "org/absent"], &env), &["org/absent", "not in the Hugging Face cache", "huggingface-cli download org/absent"]);
    assert_bad_input(&ember_with_env(&["inspect", "org/tiny@nope"], &env), &["revision 'nope'", "--revision nope"]);
    assert_bad_input(&ember_with_env(&["inspect", "org/broken"], &env), &["has no config.json"]);
}

#[test]
fn a_recipe_names_its_model_by_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    snapshot(&cache, "tiny", "main", MAIN, &tiny_files());
    let recipe = dir.path().join("r.toml");
    let text = format!(
        "[model]\npath = \"org/tiny\"\n[adapter]\nmethod = \"lora\"\n[data]\npath = {:?}\ncutoff_len = 64\n[train]\nmax_steps = 1\n[output]\ndir = {:?}\n",
        repository().join("tests/data/alpaca_en_sample_200.json"),
        dir.path().join("run")
    );
    std::fs::write(&recipe, text).unwrap();
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap())];
    let output = ember_with_env(&["train", recipe.to_str().unwrap(), "--quiet"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The adapter records where the base came from: the snapshot.
    let config = common::read_json(&dir.path().join("run/adapter/adapter_config.json"));
    assert!(config["base_model_name_or_path"].as_str().unwrap().contains(MAIN), "{config}");
    let missing = ember_with_env(&["train", recipe.to_str().unwrap(), "--quiet"], &[("HF_HUB_CACHE", dir.path().join("empty").to_str().unwrap())]);
    assert_bad_input(&missing, &["model.path", "org/tiny", "huggingface-cli download org/tiny"]);
}
