//! Models named by hub id (`HuggingFaceTB/SmolLM2-135M-Instruct[@revision]`), found in the
//! Hugging Face cache as `huggingface_hub` lays it out: `models--org--name/refs/<revision>`
//! holds a commit hash, `snapshots/<hash>/` the files (symlinks into `blobs/`).
//!
//! The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. ember
//! reads it offline; a model that is not there is one error naming the id and the command that
//! downloads it.

use std::path::{Path, PathBuf};

use crate::LoadError;

/// Whether `text` is a hub id: `org/name` with an optional `@revision`, no path syntax.
pub fn is_hub_id(text: &str) -> bool {
    let id = text.split_once('@').map_or(text, |(id, _)| id);
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

/// `path` itself when it exists; otherwise, if it is a hub id, its snapshot folder in the cache.
pub fn model_dir(path: &Path) -> Result<PathBuf, LoadError> {
    let text = path.to_string_lossy();
    if path.exists() || !is_hub_id(&text) {
        return Ok(path.to_path_buf());
    }
    let cache = cache_dir().ok_or_else(|| LoadError::Invalid { path: path.to_path_buf(), reason: "no hub cache: set HF_HUB_CACHE or HF_HOME".into() })?;
    resolve(&text, &cache)
}

/// The snapshot folder of hub id `spec` (`org/name[@revision]`, revision `main` by default) in
/// `cache`. A revision is a ref (`refs/<revision>`) or a commit hash with a snapshot.
pub fn resolve(spec: &str, cache: &Path) -> Result<PathBuf, LoadError> {
    let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let missing = |what: String| LoadError::Invalid {
        path: PathBuf::from(spec),
        reason: format!("{what}; download it with `huggingface-cli download {id}{}` (ember reads the cache offline)", if revision == "main" { String::new() } else { format!(" --revision {revision}") }),
    };
    if !repo.is_dir() {
        return Err(missing(format!("not in the Hugging Face cache {}", cache.display())));
    }
    let hash = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(hash) => hash.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => revision.to_string(),
        Err(_) => return Err(missing(format!("revision '{revision}' is not in the cache (no refs/{revision})"))),
    };
    let snapshot = repo.join("snapshots").join(&hash);
    if !snapshot.join("config.json").is_file() {
        return Err(missing(format!("snapshot {hash} in {} has no config.json (missing, or a link to a blob that is not there)", repo.display())));
    }
    Ok(snapshot)
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
}
