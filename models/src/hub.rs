//! Models named by hub id (`HuggingFaceTB/SmolLM2-135M-Instruct[@revision]`), and data files of
//! dataset repositories named as `huggingface_hub`'s file system names them
//! (`hf://datasets/yahma/alpaca-cleaned[@revision]/alpaca_data_cleaned.json`), found in the
//! Hugging Face cache as `huggingface_hub` lays it out: `models--org--name/refs/<revision>`
//! (`datasets--org--name/…`) holds a commit hash, `snapshots/<hash>/` the files (symlinks into
//! `blobs/`).
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. ember
//! reads it first. A model that is not there is downloaded into it (the `download` feature:
//! `$HF_ENDPOINT`, `$HF_TOKEN` or the cached login token), unless `HF_HUB_OFFLINE` is set or the
//! caller only looks; then it is one error naming the id and the command that downloads it.

use std::path::{Path, PathBuf};

use crate::LoadError;

/// Whether `text` is a hub id: `org/name` with an optional `@revision`, no path syntax.
pub fn is_hub_id(text: &str) -> bool {
    let id = split_spec(text).0;
    let part = |p: &str| {
        !p.is_empty() && !p.starts_with(['.', '-']) && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) && !p.contains("..")
    };
    matches!(id.split_once('/'), Some((org, name)) if part(org) && part(name))
}

/// The hub cache folder, from the environment as `huggingface_hub` reads it.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|home| home.join("hub")))
        .or_else(|| var("HOME").map(|home| home.join(".cache/huggingface/hub")))
}

/// What [`model_dir`] may do when a hub id is not in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Download it (unless `HF_HUB_OFFLINE` is set): commands that are about to use the model.
    Download,
    /// Only look: `ember recipe check` never starts a download.
    CacheOnly,
}

/// `path` itself when it exists; otherwise, if it is a hub id, its snapshot folder in the cache,
/// downloaded first when `fetch` allows it and it is not there.
pub fn model_dir(path: &Path, fetch: Fetch) -> Result<PathBuf, LoadError> {
    let text = path.to_string_lossy();
    if path.exists() || !is_hub_id(&text) {
        return Ok(path.to_path_buf());
    }
    let cache = cache_dir().ok_or_else(|| LoadError::Invalid { path: path.to_path_buf(), reason: "no hub cache: set HF_HUB_CACHE or HF_HOME".into() })?;
    match resolve(&text, &cache) {
        Err(LoadError::Invalid { path, reason }) if fetch == Fetch::Download && cfg!(feature = "download") => {
            if offline() {
                return Err(LoadError::Invalid { path, reason: format!("{reason} (HF_HUB_OFFLINE is set)") });
            }
            #[cfg(feature = "download")]
            download::snapshot(&text, &cache, &download::Remote::from_env())?;
            resolve(&text, &cache)
        }
        found => found,
    }
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it: set to anything but `0`/`false`/empty.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off"))
}

/// `org/name[@revision]` as (id, revision), the revision `main` by default.
fn split_spec(spec: &str) -> (&str, &str) {
    spec.split_once('@').unwrap_or((spec, "main"))
}

/// The command that puts `id` at `revision` into the cache (only `file` of it, when given: a
/// dataset's file), for error lines.
fn download_command(id: &str, revision: &str, file: Option<&str>) -> String {
    let revision = revision_flag(revision);
    match file {
        None => format!("huggingface-cli download {id}{revision}"),
        Some(file) => format!("huggingface-cli download --repo-type dataset {id} {file}{revision}"),
    }
}

/// The snapshot folder of hub id `spec` (`org/name[@revision]`, revision `main` by default) in
/// `cache`. A revision is a ref (`refs/<revision>`) or a commit hash with a snapshot.
pub fn resolve(spec: &str, cache: &Path) -> Result<PathBuf, LoadError> {
    let (id, revision) = split_spec(spec);
    let missing = |what: String| LoadError::Invalid { path: PathBuf::from(spec), reason: format!("{what}; download it with `{}`", download_command(id, revision, None)) };
    let config = snapshot_file("models", id, revision, "config.json", cache).map_err(missing)?;
    Ok(config.parent().expect("a file of a snapshot").to_path_buf())
}

/// `file` in the snapshot of repository `id` (of `kind`: `models`, `datasets`) at `revision`
/// in `cache`; the error says what is missing.
fn snapshot_file(kind: &str, id: &str, revision: &str, file: &str, cache: &Path) -> Result<PathBuf, String> {
    let snapshot = snapshot_dir(kind, id, revision, cache)?;
    let path = snapshot.join(file);
    if !path.is_file() {
        let hash = snapshot.file_name().unwrap_or_default().to_string_lossy();
        return Err(format!("snapshot {hash} in {} has no {file} (missing, or a link to a blob that is not there)", cache.display()));
    }
    Ok(path)
}

/// `huggingface-cli download`'s `--revision` flag for `revision` (none for `main`).
fn revision_flag(revision: &str) -> String {
    if revision == "main" { String::new() } else { format!(" --revision {revision}") }
}

/// The snapshot folder of repository `id` at `revision` in `cache`.
fn snapshot_dir(kind: &str, id: &str, revision: &str, cache: &Path) -> Result<PathBuf, String> {
    let repo = cache.join(format!("{kind}--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(format!("not in the Hugging Face cache {}", cache.display()));
    }
    let hash = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(hash) => hash.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => revision.to_string(),
        Err(_) => return Err(format!("revision '{revision}' is not in the cache (no refs/{revision})")),
    };
    Ok(repo.join("snapshots").join(hash))
}

/// The files below `dir` (links to blobs that are there), as paths relative to it with `/`.
fn files_below(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file()
                && let Ok(relative) = path.strip_prefix(dir)
            {
                files.push(relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
    }
    files
}

/// Whether repository path `name` matches `pattern`, segment by segment (`*` and `?` never
/// match a `/`, as in `datasets`' `data_files` patterns).
fn path_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), name.split('/').collect());
    pattern.len() == name.len() && pattern.iter().zip(&name).all(|(p, n)| ember_data::dataset::wildcard_match(p, n))
}

/// The prefix of a dataset file's URL.
const DATASET_URL: &str = "hf://datasets/";

/// Whether `text` names a file of a hub dataset: `hf://datasets/org/name[@revision]/path`.
pub fn is_dataset_url(text: &str) -> bool {
    text.starts_with(DATASET_URL)
}

/// `hf://datasets/org/name[@revision]/path` as (id, revision, path); `None` when malformed.
fn split_dataset_url(text: &str) -> Option<(&str, &str, &str)> {
    let rest = text.strip_prefix(DATASET_URL)?;
    let (org, rest) = rest.split_once('/')?;
    let (name, file) = rest.split_once('/')?;
    let id = &text[DATASET_URL.len()..DATASET_URL.len() + org.len() + 1 + name.len()];
    let (id, revision) = split_spec(id);
    let safe = !file.is_empty() && file.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    (is_hub_id(id) && !revision.is_empty() && safe).then_some((id, revision, file))
}

/// `hf://datasets/org/name[@revision]` (a whole dataset, no file) as (id, revision).
fn split_dataset_repo(text: &str) -> Option<(&str, &str)> {
    let spec = text.strip_prefix(DATASET_URL)?.trim_end_matches('/');
    let (id, revision) = split_spec(spec);
    (is_hub_id(id) && id.matches('/').count() == 1 && !revision.is_empty() && !revision.contains('/')).then_some((id, revision))
}

/// The local file of a dataset URL (`hf://datasets/org/name[@revision]/path`) in the cache,
/// downloaded first (that file alone) when `fetch` allows it and it is not there; any other path
/// as it is.
pub fn data_file(path: &Path, fetch: Fetch) -> Result<PathBuf, LoadError> {
    let text = path.to_string_lossy();
    if !is_dataset_url(&text) {
        return Ok(path.to_path_buf());
    }
    let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    if split_dataset_repo(&text).is_some() {
        return Err(invalid("a whole dataset is several files: give it to a recipe's data.path or `ember eval --data`, or name one file".into()));
    }
    let (id, revision, file) = split_dataset_url(&text).ok_or_else(|| invalid("expected hf://datasets/<org>/<name>[@<revision>]/<file in the repository>".into()))?;
    if file.contains(['*', '?']) {
        return Err(invalid("a pattern names several files: give it to a recipe's data.path or `ember eval --data`, or name one file".into()));
    }
    let cache = cache_dir().ok_or_else(|| invalid("no hub cache: set HF_HUB_CACHE or HF_HOME".into()))?;
    let missing = |what: String| invalid(format!("{what}; download it with `{}`", download_command(id, revision, Some(file))));
    match snapshot_file("datasets", id, revision, file, &cache) {
        Ok(found) => Ok(found),
        Err(what) if fetch == Fetch::Download && cfg!(feature = "download") && !offline() => {
            #[cfg(feature = "download")]
            download::dataset_file(id, revision, file, &cache, &download::Remote::from_env())?;
            snapshot_file("datasets", id, revision, file, &cache).map_err(|_| missing(what))
        }
        Err(what) if offline() => Err(missing(format!("{what} (HF_HUB_OFFLINE is set)"))),
        Err(what) => Err(missing(what)),
    }
}

/// The local files of a dataset URL that names several: a pattern
/// (`hf://datasets/org/name/data/train-*.parquet`: the repository's files it matches, segment by
/// segment) or the dataset alone (`hf://datasets/org/name[@revision]`: its train split's files,
/// [`split_files`]). In name order, downloaded first when `fetch` allows it and they are not
/// there (the hub's listing says which files there are); offline, chosen among the cached
/// snapshot's files. Any other path: [`data_file`]'s one file.
pub fn data_files(path: &Path, fetch: Fetch) -> Result<Vec<PathBuf>, LoadError> {
    dataset_files(path, "train", fetch)
}

/// [`data_files`], where a dataset alone stands for its split `split` ([`split_files`]).
pub fn dataset_files(path: &Path, split: &str, fetch: Fetch) -> Result<Vec<PathBuf>, LoadError> {
    let text = path.to_string_lossy();
    let (id, revision, pattern) = match (split_dataset_url(&text), split_dataset_repo(&text)) {
        (Some((id, revision, file)), _) if file.contains(['*', '?']) => (id, revision, Some(file)),
        (None, Some((id, revision))) => (id, revision, None),
        _ => return Ok(vec![data_file(path, fetch)?]),
    };
    let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    let cache = cache_dir().ok_or_else(|| invalid("no hub cache: set HF_HUB_CACHE or HF_HOME".into()))?;
    let choose = |names: Vec<String>| -> Result<Vec<String>, String> {
        let mut names = match pattern {
            Some(pattern) => names.into_iter().filter(|name| path_matches(pattern, name)).collect(),
            None => split_files(names, split)?,
        };
        names.sort();
        match names.is_empty() {
            true => Err(match pattern {
                Some(_) => "no file matches".into(),
                None => "no data files (JSON, JSON Lines, Parquet or text)".into(),
            }),
            false => Ok(names),
        }
    };
    #[cfg(feature = "download")]
    if fetch == Fetch::Download && !offline() {
        let remote = download::Remote::from_env();
        let names = choose(download::dataset_listing(id, revision, &cache, &remote)?).map_err(|why| invalid(format!("dataset {id} at revision {revision}: {why}")))?;
        // Each file not in the cache comes down, then is found there.
        return names
            .iter()
            .map(|name| match snapshot_file("datasets", id, revision, name, &cache) {
                Ok(found) => Ok(found),
                Err(_) => {
                    download::dataset_file(id, revision, name, &cache, &remote)?;
                    snapshot_file("datasets", id, revision, name, &cache).map_err(&invalid)
                }
            })
            .collect();
    }
    let in_cache = |dir: PathBuf| choose(files_below(&dir)).map_err(|why| format!("in the Hugging Face cache {}: {why}", cache.display()));
    let names = snapshot_dir("datasets", id, revision, &cache).and_then(in_cache).map_err(|why| {
        let revision = revision_flag(revision);
        let include = pattern.map(|p| format!(" --include '{p}'")).unwrap_or_default();
        let offline = if offline() { " (HF_HUB_OFFLINE is set)" } else { "" };
        invalid(format!("{why}{offline}; download it with `huggingface-cli download --repo-type dataset {id}{include}{revision}`"))
    })?;
    names.iter().map(|name| snapshot_file("datasets", id, revision, name, &cache).map_err(&invalid)).collect()
}

/// A dataset's files of split `split`, as `datasets` finds them in a repository without a
/// loading script: of the data files ember reads, those whose path names the split. The train
/// split is a file or folder `train…` (`train.json`, `data/train-00000-of-00002.parquet`,
/// `train/part_1.jsonl`), or all of them where no file names a split; another split, one named
/// as it is (`data/train_sft-00000-of-00003.parquet` for `train_sft`). Hidden files and folders
/// are not data.
fn split_files(listing: Vec<String>, split: &str) -> Result<Vec<String>, String> {
    let data: Vec<String> = listing.into_iter().filter(|n| !n.split('/').any(|s| s.starts_with('.')) && ember_data::dataset::is_data_file(Path::new(n))).collect();
    if split != "train" {
        let named = |segment: &str| segment.strip_prefix(split).is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '.']));
        let files: Vec<String> = data.into_iter().filter(|n| n.split('/').any(named)).collect();
        return match files.is_empty() {
            true => Err(format!("no data file of split '{split}'")),
            false => Ok(files),
        };
    }
    // A segment that is the word, or starts with it and a separator or digit (`train-0000`, `test.json`).
    let names_split = |name: &str, words: &[&str]| {
        name.split('/').any(|segment| {
            let segment = segment.to_lowercase();
            words.iter().any(|word| segment.strip_prefix(word).is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '.', '_', ' ']) || rest.starts_with(|c: char| c.is_ascii_digit())))
        })
    };
    let train: Vec<String> = data.iter().filter(|n| names_split(n, &["train", "training"])).cloned().collect();
    if !train.is_empty() {
        return Ok(train);
    }
    if let Some(other) = data.iter().find(|n| names_split(n, &["validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation"])) {
        return Err(format!("no train split: its data files are of other splits ({other}); name the files, or a pattern of them"));
    }
    Ok(data)
}

/// Downloading a model repository into the cache with `hf-hub`, the way `huggingface_hub` lays
/// it out, so that [`resolve`] then finds it.
#[cfg(feature = "download")]
mod download {
    use std::path::Path;

    use hf_hub::api::sync::{ApiBuilder, ApiError};
    use hf_hub::{Cache, Repo, RepoType};

    use super::{download_command, split_spec};
    use crate::LoadError;

    /// Where to download from, and as whom.
    #[derive(Clone, Debug, Default)]
    pub struct Remote {
        /// `None`: `https://huggingface.co`.
        pub endpoint: Option<String>,
        /// `None`: the token `huggingface-cli login` saved beside the cache, if any.
        pub token: Option<String>,
    }

    impl Remote {
        /// `$HF_ENDPOINT` and `$HF_TOKEN`.
        pub fn from_env() -> Self {
            let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
            Remote { endpoint: var("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()), token: var("HF_TOKEN") }
        }

        /// A client writing into `cache`.
        fn api(&self, cache: &Path) -> Result<hf_hub::api::sync::Api, ApiError> {
            let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf())).with_retries(3);
            if let Some(endpoint) = &self.endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            if self.token.is_some() {
                builder = builder.with_token(self.token.clone());
            }
            builder.build()
        }
    }

    /// Downloads `file` of dataset repository `id` at `revision` into `cache` (atomically, as
    /// [`snapshot`] does).
    pub fn dataset_file(id: &str, revision: &str, file: &str, cache: &Path, remote: &Remote) -> Result<(), LoadError> {
        let spec = format!("{}{id}@{revision}/{file}", super::DATASET_URL);
        let fail = |what: &str, e: ApiError| failure(&spec, &download_command(id, revision, Some(file)), what, e);
        let api = remote.api(cache).map_err(|e| fail("starting the download", e))?;
        let repo = api.repo(Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string()));
        repo.get(file).map_err(|e| fail(&format!("downloading {file}"), e))?;
        eprintln!("downloaded {spec} into {}", cache.display());
        Ok(())
    }

    /// The files of dataset repository `id` at `revision`, as the hub lists them.
    pub fn dataset_listing(id: &str, revision: &str, cache: &Path, remote: &Remote) -> Result<Vec<String>, LoadError> {
        let spec = format!("{}{id}@{revision}", super::DATASET_URL);
        let command = format!("huggingface-cli download --repo-type dataset {id}{}", super::revision_flag(revision));
        let fail = |what: &str, e: ApiError| failure(&spec, &command, what, e);
        let api = remote.api(cache).map_err(|e| fail("starting the download", e))?;
        let repo = api.repo(Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string()));
        let info = repo.info().map_err(|e| fail("listing its files", e))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// Files of a model ember reads, as transformers picks them: config, tokenizer and generation
    /// config, and the weights in one format: the sharded safetensors named by their index, else
    /// `model.safetensors`, else the PyTorch pickles the same way. Top level only (no `onnx/`,
    /// `original/`). The weights come first and `config.json` last, so an interrupted download
    /// leaves a snapshot without `config.json`, which the next run completes.
    pub fn wanted_files(listing: &[String], shards: impl Fn(&str) -> Result<Vec<String>, LoadError>) -> Result<Vec<String>, LoadError> {
        const SMALL: [&str; 8] = [
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.json",
            "merges.txt",
            "generation_config.json",
        ];
        let has = |name: &str| listing.iter().any(|n| n == name);
        let mut files = Vec::new();
        for (index, single) in [("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")] {
            if has(index) {
                files.extend(shards(index)?);
                files.push(index.to_string());
                break;
            }
            if has(single) {
                files.push(single.to_string());
                break;
            }
        }
        files.extend(listing.iter().filter(|n| SMALL.contains(&n.as_str()) || (!n.contains('/') && n.ends_with(".tiktoken"))).cloned());
        files.push("config.json".to_string());
        Ok(files)
    }

    /// Downloads what [`wanted_files`] picks of `spec` (`org/name[@revision]`) into `cache`.
    /// Files already there are not fetched again; each lands atomically (hf-hub writes a
    /// temporary file, then renames it into `blobs/`).
    pub fn snapshot(spec: &str, cache: &Path, remote: &Remote) -> Result<(), LoadError> {
        let (id, revision) = split_spec(spec);
        let fail = |what: &str, e: ApiError| failure(spec, &download_command(id, revision, None), what, e);
        let api = remote.api(cache).map_err(|e| fail("starting the download", e))?;
        let repo = api.repo(Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string()));
        let info = repo.info().map_err(|e| fail("listing its files", e))?;
        let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        if !listing.iter().any(|n| n == "config.json") {
            return Err(LoadError::Invalid { path: spec.into(), reason: "the repository has no config.json: not a transformers model".into() });
        }
        let shards = |index: &str| {
            let path = repo.get(index).map_err(|e| fail(&format!("downloading {index}"), e))?;
            let text = std::fs::read_to_string(&path).map_err(|e| LoadError::io(&path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::json(&path, e))?;
            let map = json["weight_map"].as_object().ok_or_else(|| LoadError::Invalid { path: path.clone(), reason: "no 'weight_map'".into() })?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            Ok(names)
        };
        let files = wanted_files(&listing, shards)?;
        eprintln!("downloading {spec} ({} files) into {}", files.len(), cache.display());
        for file in &files {
            repo.get(file).map_err(|e| fail(&format!("downloading {file}"), e))?;
        }
        Ok(())
    }

    /// The error of a failed download: the id's fault (no such repository or revision, no access)
    /// or the run's (the network, the disk); either way with the command that fetches it.
    fn failure(spec: &str, command: &str, what: &str, error: ApiError) -> LoadError {
        let status = match &error {
            ApiError::RequestError(e) => match e.as_ref() {
                ureq::Error::Status(code, _) => Some(*code),
                ureq::Error::Transport(_) => None,
            },
            _ => None,
        };
        match status {
            Some(404) => LoadError::Invalid { path: spec.into(), reason: format!("no such repository, revision or file on the hub ({what}: HTTP 404)") },
            Some(code @ (401 | 403)) => LoadError::Invalid {
                path: spec.into(),
                reason: format!("access denied ({what}: HTTP {code}): a gated or private repository needs HF_TOKEN, or a login with `huggingface-cli login`"),
            },
            _ => LoadError::Download { id: spec.to_string(), reason: format!("{what} failed: {error}; fetch it with `{command}`, or set HF_HUB_OFFLINE=1 to use the cache only") },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        for id in ["HuggingFaceTB/SmolLM2-135M-Instruct", "THUDM/chatglm3-6b@main", "org/name@0123abc"] {
            assert!(is_hub_id(id), "{id}");
        }
        for path in ["./org/name", "../models/llama", "/abs/dir", "models", "a/b/c", "org/..", ".hidden/x", "org/na me"] {
            assert!(!is_hub_id(path), "{path}");
        }
    }

    #[test]
    fn dataset_urls_split_into_id_revision_and_file() {
        let cases = [
            ("hf://datasets/yahma/alpaca-cleaned/alpaca_data_cleaned.json", Some(("yahma/alpaca-cleaned", "main", "alpaca_data_cleaned.json"))),
            ("hf://datasets/org/name@v1.0/data/train.jsonl", Some(("org/name", "v1.0", "data/train.jsonl"))),
            ("hf://datasets/org/name", None),
            ("hf://datasets/org/name/", None),
            ("hf://datasets/org/name/../../secret", None),
            ("hf://datasets/org/name@/a.json", None),
            ("hf://datasets/../name/a.json", None),
        ];
        for (url, want) in cases {
            assert!(is_dataset_url(url));
            assert_eq!(split_dataset_url(url), want, "{url}");
        }
        assert!(!is_dataset_url("data/hf://datasets/x"));
        assert_eq!(split_dataset_repo("hf://datasets/tatsu-lab/alpaca"), Some(("tatsu-lab/alpaca", "main")));
        assert_eq!(split_dataset_repo("hf://datasets/org/name@v1/"), Some(("org/name", "v1")));
        assert_eq!(split_dataset_repo("hf://datasets/org/name/data.json"), None);
    }

    /// As `datasets` resolves a repository without a loading script.
    #[test]
    fn a_datasets_split_is_its_files_named_so() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let shards = names(&["README.md", ".gitattributes", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]);
        assert_eq!(split_files(shards, "train").unwrap(), names(&["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]));
        assert_eq!(split_files(names(&["alpaca_data.json", "README.md", "training/a.jsonl.gz"]), "train").unwrap(), names(&["training/a.jsonl.gz"]));
        assert_eq!(split_files(names(&["alpaca_data_cleaned.json", "README.md"]), "train").unwrap(), names(&["alpaca_data_cleaned.json"]));
        assert!(split_files(names(&["val.json", "test.jsonl", "trainer.py"]), "train").unwrap_err().contains("no train split"));
        assert_eq!(split_files(names(&["README.md", "convert.csv"]), "train").unwrap(), Vec::<String>::new());
        let ultrachat = names(&["data/train_sft-00000-of-00001.parquet", "data/train_gen-00000-of-00001.parquet", "data/test_sft-00000-of-00001.parquet"]);
        assert_eq!(split_files(ultrachat.clone(), "train_sft").unwrap(), names(&["data/train_sft-00000-of-00001.parquet"]));
        assert!(split_files(ultrachat, "validation").unwrap_err().contains("no data file of split 'validation'"));
    }
}
