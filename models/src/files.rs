//! Writing outputs so that a crash, a kill or a full disk never leaves half a file: atomic
//! folders and files, and the two formats every output is made of (safetensors, JSON).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// What this process is writing right now: the temporaries of unfinished atomic writes. A
/// signal handler removes them before the process exits ([`exit_removing_temporaries`]); a
/// killed process leaves them to [`remove_stale_temporaries`].
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn in_progress() -> MutexGuard<'static, Vec<PathBuf>> {
    IN_PROGRESS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A temporary registered in [`IN_PROGRESS`] until dropped.
struct Temporary(PathBuf);

impl Temporary {
    fn new(path: &Path) -> Self {
        in_progress().push(path.to_path_buf());
        Temporary(path.to_path_buf())
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        in_progress().retain(|p| p != &self.0);
    }
}

/// Removes every unfinished temporary of this process and exits with `code`, for a signal
/// handler: no half-written output stays behind. A write that is renaming its temporary into
/// place finishes that first (the renames happen under the same lock), so an output is either
/// the old one or the new one.
pub fn exit_removing_temporaries(code: i32) -> ! {
    let mut paths = in_progress();
    for path in paths.drain(..).rev() {
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
    std::process::exit(code)
}

/// The output a path inside a writer's temporary stands for: each `.<name>.tmp-<pid>` component
/// read as `<name>`, so that a write error names the file the user asked for, not a temporary
/// that is gone by the time the error is printed.
pub fn destination_path(path: &Path) -> PathBuf {
    path.components()
        .map(|c| {
            let name = c.as_os_str();
            match name.to_str().and_then(temporary_of) {
                Some(original) => original.into(),
                None => name.to_owned(),
            }
        })
        .collect()
}

/// `<name>` of a temporary's file name `.<name>.tmp-<pid>`.
fn temporary_of(file_name: &str) -> Option<&str> {
    let (original, pid) = file_name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    (!original.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then_some(original)
}

/// `path`'s folder and the hidden sibling `.<name>.<tag>-<pid>` this process writes beside it
/// (the names [`remove_stale_temporaries`] recognises).
fn sibling<'a>(path: &'a Path, tag: &str) -> (&'a Path, PathBuf) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    (parent, parent.join(format!(".{name}.{tag}-{}", std::process::id())))
}

/// Writes a folder through `write` into a temporary sibling, then renames it to `out`, so a
/// crash never leaves a half-written output. An existing `out` is moved aside and removed only
/// once the new one is in place (and put back if that fails); every file is synced before the
/// rename and the parent folder after it. `io_error` turns a failed file operation into the
/// caller's error type.
pub fn write_dir_atomically<E>(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
    io_error: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let (parent, tmp) = sibling(out, "tmp");
    let (_, old) = sibling(out, "old");
    std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    let _ = std::fs::remove_dir_all(&tmp);
    let temporary = Temporary::new(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    let result = write(&tmp).and_then(|()| {
        sync_tree(&tmp).map_err(|(path, e)| io_error(&path, e))?;
        let swapping = in_progress();
        let replacing = out.exists();
        if replacing {
            std::fs::rename(out, &old).map_err(|e| io_error(out, e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, out) {
            if replacing {
                let _ = std::fs::rename(&old, out);
            }
            return Err(io_error(out, e));
        }
        drop(swapping);
        sync_dir(parent).map_err(|e| io_error(parent, e))?;
        if replacing {
            std::fs::remove_dir_all(&old).map_err(|e| io_error(&old, e))?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    drop(temporary);
    result
}

/// Writes `bytes` to a temporary sibling of `path`, syncs it, renames it over `path` and syncs
/// the folder: readers see the old file or the new one, never a part.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (parent, tmp) = sibling(path, "tmp");
    let temporary = Temporary::new(&tmp);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
        let swapping = in_progress();
        std::fs::rename(&tmp, path)?;
        drop(swapping);
        sync_dir(parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drop(temporary);
    result
}

/// [`write_file_atomically`] for a file written piece by piece through `write` (a GGUF file
/// tensor by tensor): the temporary is synced and renamed into place only when `write`
/// succeeds.
pub fn write_file_streaming<E>(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<(), E>,
    io_error: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let (parent, tmp) = sibling(path, "tmp");
    let temporary = Temporary::new(&tmp);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| io_error(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_error(&tmp, e))?;
        let swapping = in_progress();
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
        drop(swapping);
        sync_dir(parent).map_err(|e| io_error(parent, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drop(temporary);
    result
}

/// Cleans up after writers killed in `dir`: removes `.<name>.tmp-<pid>` (never complete) and
/// `.<name>.old-<pid>`, unless `<name>` is missing, when that old copy is the last good one and is
/// put back.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some((original, _)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".old-")) {
            let original = dir.join(original);
            if !original.exists() && std::fs::rename(&path, &original).is_ok() {
                continue;
            }
        }
        if name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")) {
            let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        }
    }
}

/// fsync of every file below `dir`, and of the folders themselves.
fn sync_tree(dir: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    for entry in std::fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e))? {
        let path = entry.map_err(|e| (dir.to_path_buf(), e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path).and_then(|f| f.sync_all()).map_err(|e| (path.clone(), e))?;
        }
    }
    sync_dir(dir).map_err(|e| (dir.to_path_buf(), e))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Pretty JSON with a final newline, as transformers and PEFT write their config files.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// A safetensors file with the `format: pt` metadata that transformers and PEFT expect (without
/// it `from_pretrained` warns, and some loaders refuse the file).
pub fn write_safetensors<S, V>(path: &Path, tensors: impl IntoIterator<Item = (S, V)>) -> std::io::Result<()>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
{
    write_safetensors_with(path, tensors, std::collections::HashMap::new())
}

/// [`write_safetensors`] with more metadata beside `format: pt`.
pub fn write_safetensors_with<S, V>(
    path: &Path,
    tensors: impl IntoIterator<Item = (S, V)>,
    mut metadata: std::collections::HashMap<String, String>,
) -> std::io::Result<()>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
{
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(e) => e,
        other => std::io::Error::other(other.to_string()),
    })?;
    give_default_mode(path)
}

/// Gives `path` the permissions a file created there gets (0666 less the umask on Unix):
/// safetensors 0.8 writes through a temporary file created 0600 and renames it
/// (safetensors/safetensors#782), which leaves adapters and merged models unreadable to
/// other users, e.g. a vLLM or llama.cpp server running as another account.
fn give_default_mode(path: &Path) -> std::io::Result<()> {
    let (_, probe) = sibling(path, "mode");
    let permissions = File::create(&probe)?.metadata()?.permissions();
    std::fs::remove_file(&probe)?;
    std::fs::set_permissions(path, permissions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A written safetensors file has the permissions of any other new file (not 0600).
    #[cfg(unix)]
    #[test]
    fn safetensors_files_get_the_default_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (file, plain) = (dir.path().join("a.safetensors"), dir.path().join("plain"));
        let bytes = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &bytes).unwrap();
        write_safetensors(&file, [("w", view)]).unwrap();
        File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), mode(&plain));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no probe left behind");
    }

    /// Temporaries, nested ones included, read as what they become; other dot names stay.
    #[test]
    fn errors_name_the_destination_of_a_temporary() {
        let (_, tmp) = sibling(Path::new("/runs/a/checkpoints/step-00000006"), "tmp");
        let nested = tmp.join(".adapter.tmp-17").join("adapter_model.safetensors");
        assert_eq!(destination_path(&nested), Path::new("/runs/a/checkpoints/step-00000006/adapter/adapter_model.safetensors"));
        for kept in ["/a/.hidden/b", "/a/.x.tmp-12ab/b", "/a/.x.old-12/b", "rel/.tmp-3/b"] {
            assert_eq!(destination_path(Path::new(kept)), Path::new(kept));
        }
    }

    /// A writer killed between moving the old folder aside and renaming the new one in leaves
    /// only `.<name>.old-<pid>`: the cleanup puts it back; a half-written `.tmp-` goes.
    #[test]
    fn stale_temporaries_restore_the_last_good_folder() {
        let dir = std::env::temp_dir().join(format!("ember-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".adapter.old-123")).unwrap();
        std::fs::write(dir.join(".adapter.old-123/weights"), b"good").unwrap();
        std::fs::create_dir_all(dir.join(".adapter.tmp-456")).unwrap();
        remove_stale_temporaries(&dir);
        assert_eq!(std::fs::read(dir.join("adapter/weights")).unwrap(), b"good");
        assert!(!dir.join(".adapter.tmp-456").exists() && !dir.join(".adapter.old-123").exists());

        write_dir_atomically(&dir.join("adapter"), |tmp| std::fs::write(tmp.join("weights"), b"new"), |_, e| e).unwrap();
        assert_eq!(std::fs::read(dir.join("adapter/weights")).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporaries left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
