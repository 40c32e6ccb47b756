//! Models by hub id: a real Hugging Face cache laid out on disk (refs, snapshots whose files are
//! symlinks into blobs, a sharded checkpoint, a missing blob, an unknown revision), and models
//! downloaded into it from a local server that answers as the Hub does.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{assert_bad_input, assert_error, ember_with_env, repository};
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

    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    for id in ["org/tiny", "org/tiny@v1", &format!("org/tiny@{V1}"), "org/sharded"] {
        let output = ember_with_env(&["inspect", id], &env);
        assert!(output.status.success(), "{id}: {}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("220,480"), "{id}: {stdout}");
    }
    // HF_HOME/hub when HF_HUB_CACHE is not set.
    let output = ember_with_env(&["inspect", "org/tiny"], &[("HF_HUB_CACHE", ""), ("HF_HOME", home.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The sharded snapshot generates too.
    let output = ember_with_env(&["generate", "--base", "org/sharded", "--prompt", "Hello", "--max-new-tokens", "3"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    assert_bad_input(&ember_with_env(&["inspect", "org/absent"], &env), &["org/absent", "not in the Hugging Face cache", "huggingface-cli download org/absent", "HF_HUB_OFFLINE is set"]);
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
    let missing = ember_with_env(&["train", recipe.to_str().unwrap(), "--quiet"], &[("HF_HUB_CACHE", dir.path().join("empty").to_str().unwrap()), ("HF_HUB_OFFLINE", "1")]);
    assert_bad_input(&missing, &["model.path", "org/tiny", "huggingface-cli download org/tiny"]);
}

/// A local stand-in for the Hub's HTTP API, enough for hf-hub: the revision listing
/// (`/api/models/<id>/revision/<rev>`) and ranged file reads (`/<id>/resolve/<rev>/<file>`) with
/// the `etag`, `x-repo-commit` and `content-range` headers. Records every request line and the
/// `authorization` header seen.
struct FakeHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    /// Serves `repos` (id, files) at revision `main`, commit [`MAIN`].
    fn start(repos: Vec<(&'static str, Vec<(String, Vec<u8>)>)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let (seen, auth) = (requests.clone(), authorizations.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let (mut range_start, mut range_end) = (0usize, None::<usize>);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "authorization" => auth.lock().unwrap().push(value.trim().to_string()),
                        "range" => {
                            let (a, b) = value.trim().trim_start_matches("bytes=").split_once('-').unwrap();
                            range_start = a.parse().unwrap();
                            range_end = b.parse().ok();
                        }
                        _ => {}
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap().to_string();
                seen.lock().unwrap().push(path.clone());
                let (status, headers, body) = answer(&repos, &path, range_start, range_end);
                let head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n", body.len());
                let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
            }
        });
        FakeHub { endpoint, requests, authorizations }
    }

    /// Requests for files (not listings) so far.
    fn file_requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().filter(|p| p.contains("/resolve/")).cloned().collect()
    }
}

fn answer(repos: &[(&str, Vec<(String, Vec<u8>)>)], path: &str, start: usize, end: Option<usize>) -> (&'static str, String, Vec<u8>) {
    let not_found = ("404 Not Found", "x-error-code: RepoNotFound\r\n".to_string(), b"{}".to_vec());
    for (id, files) in repos {
        let listing = match id.strip_prefix("datasets/") {
            Some(dataset) => format!("/api/datasets/{dataset}/revision/main"),
            None => format!("/api/models/{id}/revision/main"),
        };
        if path == listing {
            let siblings: Vec<serde_json::Value> = files.iter().map(|(name, _)| serde_json::json!({ "rfilename": name })).collect();
            return ("200 OK", "content-type: application/json\r\n".into(), serde_json::json!({ "sha": MAIN, "siblings": siblings }).to_string().into_bytes());
        }
        let Some(file) = path.strip_prefix(&format!("/{id}/resolve/main/")) else { continue };
        let Some((_, bytes)) = files.iter().find(|(name, _)| name == file) else { return not_found };
        let end = end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
        let headers = format!("etag: \"{id}-{file}\"\r\nx-repo-commit: {MAIN}\r\ncontent-range: bytes {start}-{end}/{}\r\n", bytes.len());
        return ("206 Partial Content", headers, bytes[start..=end].to_vec());
    }
    not_found
}

#[test]
fn hub_ids_not_in_the_cache_are_downloaded() {
    let mut tiny = tiny_files();
    // Files ember does not read are left on the server.
    tiny.push(("onnx/model.onnx".into(), b"not read".to_vec()));
    tiny.push(("README.md".into(), b"# tiny".to_vec()));
    let hub = FakeHub::start(vec![("org/tiny", tiny), ("org/sharded", sharded_files())]);
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_TOKEN", "hf_secret"), ("HF_HUB_OFFLINE", "")];

    for id in ["org/tiny", "org/sharded"] {
        let output = ember_with_env(&["inspect", id], &env);
        assert!(output.status.success(), "{id}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(String::from_utf8_lossy(&output.stdout).contains("220,480"), "{id}");
    }
    let fetched = hub.file_requests();
    assert!(fetched.iter().any(|p| p.ends_with("model-00002-of-00002.safetensors")), "{fetched:?}");
    assert!(!fetched.iter().any(|p| p.contains("onnx") || p.contains("README")), "{fetched:?}");
    assert!(hub.authorizations.lock().unwrap().iter().all(|a| a == "Bearer hf_secret"));
    // Laid out as huggingface_hub does: a ref, and snapshot files that link into blobs.
    let repo = cache.join("models--org--tiny");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap().trim(), MAIN);
    let config = repo.join("snapshots").join(MAIN).join("config.json");
    assert!(std::fs::symlink_metadata(&config).unwrap().file_type().is_symlink());
    assert!(std::fs::canonicalize(&config).unwrap().starts_with(std::fs::canonicalize(repo.join("blobs")).unwrap()));

    // Offline first: the second run reads the cache and asks the server nothing.
    let asked = hub.requests.lock().unwrap().len();
    let output = ember_with_env(&["generate", "--base", "org/tiny", "--prompt", "Hello", "--max-new-tokens", "3"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(hub.requests.lock().unwrap().len(), asked);

    // An id the hub does not have is the input's fault; a hub that cannot be reached is not.
    assert_bad_input(&ember_with_env(&["inspect", "org/absent"], &env), &["org/absent", "no such repository, revision or file", "HTTP 404"]);
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", unreachable.as_str()), ("HF_HUB_OFFLINE", "")];
    assert_error(&ember_with_env(&["inspect", "org/other"], &env), 1, &["org/other", "failed", "huggingface-cli download org/other", "HF_HUB_OFFLINE=1"]);
    // `recipe check` only looks.
    let recipe = home.path().join("r.toml");
    std::fs::write(&recipe, "[model]\npath = \"org/sharded@v2\"\n[adapter]\nmethod = \"lora\"\n[data]\npath = \"d.json\"\n[output]\ndir = \"run\"\n").unwrap();
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_HUB_OFFLINE", "")];
    let asked = hub.requests.lock().unwrap().len();
    let check = ember_with_env(&["recipe", "check", recipe.to_str().unwrap()], &env);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'model.path'") && stderr.contains("revision 'v2'"), "{stderr}");
    assert_eq!(hub.requests.lock().unwrap().len(), asked);
}

/// A pattern of a hub dataset's files (`hf://datasets/org/name/data/train-*.parquet`, as the Hub
/// shards a split) or the dataset alone (its train split): the files the hub lists that match,
/// downloaded; offline, those of the cache.
#[test]
fn dataset_patterns_and_whole_datasets_are_the_files_of_the_hubs_listing() {
    let parquet = std::fs::read(repository().join("tests/data/parquet/alpaca_en_sample_200.parquet")).unwrap();
    let shard = |name: &str| (name.to_string(), parquet.clone());
    let files = vec![shard("data/train-00000-of-00002.parquet"), shard("data/train-00001-of-00002.parquet"), shard("data/test-00000-of-00001.parquet"), shard("other/train-00000-of-00001.parquet")];
    let hub = FakeHub::start(vec![("datasets/org/shards", files)]);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let recipe = repository().join("recipes/ci/tiny-lora.toml");
    let stats = |pattern: &str, offline: &str| {
        let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_HUB_OFFLINE", offline)];
        let set = format!("data.path=\"hf://datasets/org/shards/{pattern}\"");
        ember_with_env(&["data", "stats", recipe.to_str().unwrap(), "--json", "--set", &set], &env)
    };
    let files = |output: std::process::Output| -> Vec<(String, u64)> {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let name = |f: &serde_json::Value| f["path"].as_str().unwrap().rsplit_once("snapshots/").unwrap().1.split_once('/').unwrap().1.to_owned();
        stats["files"].as_array().unwrap().iter().map(|f| (name(f), f["records"].as_u64().unwrap())).collect()
    };
    let want = vec![("data/train-00000-of-00002.parquet".to_owned(), 200), ("data/train-00001-of-00002.parquet".to_owned(), 200)];
    assert_eq!(files(stats("data/train-*.parquet", "")), want);
    let mut fetched = hub.file_requests();
    fetched.dedup();
    assert_eq!(fetched, want.iter().map(|(name, _)| format!("/datasets/org/shards/resolve/main/{name}")).collect::<Vec<_>>());
    // From the cache: offline, and online without fetching again.
    let requests = hub.file_requests().len();
    assert_eq!(files(stats("data/train-*.parquet", "1")), want);
    assert_eq!(files(stats("data/train-*.parquet", "")), want);
    assert_eq!(hub.file_requests().len(), requests);
    assert_bad_input(&stats("data/valid-*.parquet", ""), &["valid-*.parquet", "dataset org/shards at revision main: no file matches"]);
    assert_bad_input(&stats("data/test-*.parquet", "1"), &["in the Hugging Face cache", "no file matches", "HF_HUB_OFFLINE", "--include 'data/test-*.parquet'"]);
    // The dataset alone: its train split, as `datasets` finds it (the files named train…).
    let whole = |offline: &str| {
        let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_HUB_OFFLINE", offline)];
        ember_with_env(&["data", "stats", recipe.to_str().unwrap(), "--json", "--set", "data.path=\"hf://datasets/org/shards\""], &env)
    };
    assert_eq!(files(whole("1")), want);
    let both = vec![want[0].clone(), want[1].clone(), ("other/train-00000-of-00001.parquet".to_owned(), 200)];
    assert_eq!(files(whole("")), both);
    assert_eq!(files(whole("1")), both);
    // LLaMA-Factory's `hf_hub_url` entries are the same train split.
    std::fs::write(dir.path().join("dataset_info.json"), r#"{"shards": {"hf_hub_url": "org/shards", "ms_hub_url": "org/shards"}}"#).unwrap();
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let folder = format!("data.dataset_dir=\"{}\"", dir.path().display());
    let by_name = ember_with_env(&["data", "stats", recipe.to_str().unwrap(), "--json", "--set", "data.path=[]", "--set", "data.dataset=\"shards\"", "--set", &folder], &env);
    assert_eq!(files(by_name), both);
    let absent = ember_with_env(&["data", "stats", recipe.to_str().unwrap(), "--set", "data.path=\"hf://datasets/org/absent\""], &env);
    assert_bad_input(&absent, &["hf://datasets/org/absent", "not in the Hugging Face cache", "HF_HUB_OFFLINE", "huggingface-cli download --repo-type dataset org/absent`"]);
}

/// `ember exam` on MMLU as the Hub holds it (`cais/mmlu`'s Parquet shards, by pattern): the scores
/// of the same files read locally.
#[test]
fn exam_questions_come_from_the_hub() {
    let exam = repository().join("tests/data/exam/parquet/mmlu");
    let shard = |split: &str| format!("{split}-00000-of-00001.parquet");
    let files = ["test", "dev"].map(|split| (format!("all/{}", shard(split)), std::fs::read(exam.join(shard(split))).unwrap())).to_vec();
    let hub = FakeHub::start(vec![("datasets/cais/mmlu", files)]);
    let dir = tempfile::tempdir().unwrap();
    let env = [("HF_HUB_CACHE", dir.path().to_str().unwrap()), ("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_HUB_OFFLINE", "")];
    let base = tiny();
    let exam_of = |test: &str, dev: &str| {
        let output = ember_with_env(&["exam", "--base", base.to_str().unwrap(), "--test", test, "--dev", dev, "--shots", "2"], &env);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        (result["questions"].clone(), result["base"].clone())
    };
    let local = exam_of(exam.join(shard("test")).to_str().unwrap(), exam.join(shard("dev")).to_str().unwrap());
    assert_eq!(exam_of("hf://datasets/cais/mmlu/all/test-*.parquet", "hf://datasets/cais/mmlu/all/dev-*.parquet"), local);
    assert_eq!(local.0.as_u64(), Some(9));
}

/// A data file of a hub dataset (`hf://datasets/org/name[@revision]/file`): downloaded alone into
/// the cache as huggingface_hub lays it out, read from there after; errors name the URL and the
/// command that fetches it.
#[test]
fn dataset_files_come_from_the_hub_cache() {
    let records = std::fs::read(repository().join("tests/data/alpaca_en_sample_200.json")).unwrap();
    let parquet = std::fs::read(repository().join("tests/data/parquet/alpaca_en_sample_200.parquet")).unwrap();
    let files = vec![("data/train.json".to_string(), records), ("data/train-00000-of-00001.parquet".to_string(), parquet), ("README.md".to_string(), b"# alpaca".to_vec())];
    let hub = FakeHub::start(vec![("datasets/org/alpaca", files)]);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let url = "hf://datasets/org/alpaca/data/train.json";
    let recipe = dir.path().join("r.toml");
    let text = format!(
        "[model]\npath = {:?}\n[adapter]\nmethod = \"lora\"\n[data]\npath = \"{url}\"\ncutoff_len = 64\nval_size = 10\n[train]\nmax_steps = 1\n[output]\ndir = {:?}\n",
        tiny(),
        dir.path().join("run")
    );
    std::fs::write(&recipe, text).unwrap();
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_HUB_OFFLINE", "")];
    let output = ember_with_env(&["train", recipe.to_str().unwrap(), "--quiet"], &env);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let fetched = hub.file_requests();
    assert!(!fetched.is_empty() && fetched.iter().all(|p| p == "/datasets/org/alpaca/resolve/main/data/train.json"), "{fetched:?}");
    let file = cache.join("datasets--org--alpaca/snapshots").join(MAIN).join("data/train.json");
    assert!(std::fs::symlink_metadata(&file).unwrap().file_type().is_symlink());

    // From the cache after: offline, and `ember eval --data` takes the URL too.
    let offline = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let base = tiny();
    let eval = |data: &str, env: &[(&str, &str)]| ember_with_env(&["eval", "--base", base.to_str().unwrap(), "--data", data, "--limit", "4"], env);
    let output = eval(url, &offline);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let absent = format!("{url}x");
    let command = "huggingface-cli download --repo-type dataset org/alpaca data/train.jsonx";
    assert_bad_input(&eval(&absent, &offline), &["train.jsonx", "HF_HUB_OFFLINE", command]);
    assert_bad_input(&eval(&absent, &env), &["train.jsonx", "HTTP 404"]);

    assert_bad_input(&eval("hf://datasets/org", &env), &["expected hf://datasets/<org>/<name>"]);

    // The Hub's Parquet shards: the same records, the same scores.
    let shard = "hf://datasets/org/alpaca/data/train-00000-of-00001.parquet";
    let scores = |output: std::process::Output| {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        result["base"].clone()
    };
    assert_eq!(scores(eval(shard, &env)), scores(eval(url, &offline)));
    // A pattern of them, and the dataset alone (its train split: both files, the shard first).
    assert_eq!(scores(eval("hf://datasets/org/alpaca/data/train-*.parquet", &env)), scores(eval(url, &offline)));
    assert_eq!(scores(eval("hf://datasets/org/alpaca", &offline)), scores(eval(url, &offline)));
}
