//! `ember import torch`: PyTorch `pytorch_model.bin` checkpoints (single or sharded) to
//! safetensors, without running any of their code.
//!
//! A `.bin` from `torch.save` (PyTorch ≥ 1.6) is a zip archive of stored entries:
//! `<name>/data.pkl` (the state dict, pickled) and one `<name>/data/<key>` per storage; older
//! ones (and `_use_new_zipfile_serialization=False`) are pickles back to back followed by the
//! raw storages. The file is memory-mapped and read in place; every pickle goes through the
//! restricted unpickler in [`crate::pickle`]. Every tensor is checked against its storage before a byte is
//! written, and the output folder appears only complete.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use serde_json::{Value as Json, json};

use crate::LoadError;
use crate::pickle::{self, StorageDtype, TensorRef, Value};

/// An uncompressed entry's bytes within the archive.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: usize,
    len: usize,
}

/// The stored (uncompressed) entries of a zip archive, by name.
struct StoredZip<'a> {
    bytes: &'a [u8],
    entries: HashMap<String, Entry>,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes.get(at..at + 2).map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes.get(at..at + 4).map(|b| u64::from(u32::from_le_bytes(b.try_into().unwrap())))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

impl<'a> StoredZip<'a> {
    /// Reads the central directory (ZIP64 too). Compressed entries are refused: torch.save
    /// stores everything, and refusing them rules out decompression bombs.
    fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        const EOCD: u32 = 0x0605_4b50;
        let search_from = bytes.len().saturating_sub(22 + 65_535);
        let eocd = (search_from..bytes.len().saturating_sub(21))
            .rev()
            .find(|&at| u32_at(bytes, at) == Some(u64::from(EOCD)))
            .ok_or("neither a zip archive (no end-of-central-directory record) nor a legacy torch.save file: truncated, or not a PyTorch checkpoint")?;
        let short = |what: &str| format!("zip: truncated {what}");
        let mut count = u16_at(bytes, eocd + 10).ok_or_else(|| short("end record"))?;
        let mut cd_size = u32_at(bytes, eocd + 12).ok_or_else(|| short("end record"))?;
        let mut cd_offset = u32_at(bytes, eocd + 16).ok_or_else(|| short("end record"))?;
        if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            // ZIP64: the locator sits just before the end record and points at the ZIP64 record.
            let locator = eocd.checked_sub(20).filter(|&at| u32_at(bytes, at) == Some(0x0706_4b50)).ok_or("zip: ZIP64 locator missing")?;
            let record = usize::try_from(u64_at(bytes, locator + 8).ok_or_else(|| short("ZIP64 locator"))?).map_err(|_| "zip: offset too large")?;
            if u32_at(bytes, record) != Some(0x0606_4b50) {
                return Err("zip: ZIP64 end record missing".into());
            }
            count = u64_at(bytes, record + 32).ok_or_else(|| short("ZIP64 end record"))?;
            cd_size = u64_at(bytes, record + 40).ok_or_else(|| short("ZIP64 end record"))?;
            cd_offset = u64_at(bytes, record + 48).ok_or_else(|| short("ZIP64 end record"))?;
        }
        let end = cd_offset.checked_add(cd_size).filter(|&e| e <= bytes.len() as u64).ok_or("zip: central directory runs past the end (truncated?)")?;
        let directory = &bytes[cd_offset as usize..end as usize];
        let mut entries = HashMap::new();
        let mut at = 0;
        for _ in 0..count {
            if u32_at(directory, at) != Some(0x0201_4b50) {
                return Err("zip: corrupt central directory".into());
            }
            let field = |offset: usize, width: usize| if width == 2 { u16_at(directory, at + offset) } else { u32_at(directory, at + offset) };
            let header = (|| Some((field(10, 2)?, field(20, 4)?, field(24, 4)?, field(28, 2)?, field(30, 2)?, field(32, 2)?, field(42, 4)?)))();
            let (method, mut packed, mut size, name_len, extra_len, comment_len, mut local) = header.ok_or_else(|| short("central directory"))?;
            let name_at = at + 46;
            let name = directory.get(name_at..name_at + name_len as usize).ok_or_else(|| short("entry name"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            let extra = directory.get(name_at + name_len as usize..name_at + (name_len + extra_len) as usize).ok_or_else(|| short("extra field"))?;
            // ZIP64 sizes and offset, in this order, for the fields saturated at 0xFFFFFFFF.
            let mut e = 0;
            while e + 4 <= extra.len() {
                let (id, len) = (u16_at(extra, e).unwrap(), u16_at(extra, e + 2).unwrap() as usize);
                if id == 1 {
                    let mut k = e + 4;
                    for value in [&mut size, &mut packed, &mut local] {
                        if *value == 0xFFFF_FFFF {
                            *value = u64_at(extra, k).ok_or_else(|| short("ZIP64 extra field"))?;
                            k += 8;
                        }
                    }
                }
                e += 4 + len;
            }
            if method != 0 || packed != size {
                return Err(format!("zip entry '{name}' is compressed (method {method}); torch.save stores entries uncompressed"));
            }
            let local = usize::try_from(local).map_err(|_| "zip: offset too large")?;
            if u32_at(bytes, local) != Some(0x0403_4b50) {
                return Err(format!("zip entry '{name}': bad local header"));
            }
            let data = local + 30 + u16_at(bytes, local + 26).unwrap_or(0) as usize + u16_at(bytes, local + 28).unwrap_or(0) as usize;
            let len = usize::try_from(size).map_err(|_| "zip: entry too large")?;
            if data.checked_add(len).is_none_or(|e| e > bytes.len()) {
                return Err(format!("zip entry '{name}' ({len} bytes) runs past the end of the file (truncated?)"));
            }
            entries.insert(name, Entry { start: data, len });
            at = name_at + (name_len + extra_len + comment_len) as usize;
        }
        Ok(Self { bytes, entries })
    }

    fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.entries.get(name).map(|e| &self.bytes[e.start..e.start + e.len])
    }
}

/// A tensor of the state dict, as safetensors writes it.
struct TensorOut<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for &TensorOut<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn safetensors_dtype(dtype: StorageDtype) -> Dtype {
    match dtype {
        StorageDtype::F64 => Dtype::F64,
        StorageDtype::F32 => Dtype::F32,
        StorageDtype::F16 => Dtype::F16,
        StorageDtype::Bf16 => Dtype::BF16,
        StorageDtype::I64 => Dtype::I64,
        StorageDtype::I32 => Dtype::I32,
        StorageDtype::I16 => Dtype::I16,
        StorageDtype::I8 => Dtype::I8,
        StorageDtype::U8 => Dtype::U8,
        StorageDtype::Bool => Dtype::BOOL,
    }
}

/// The tensor's bytes, row-major: a slice of the storage when contiguous, else gathered.
fn tensor_bytes<'a>(tensor: &TensorRef, storage: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    let size = tensor.storage.dtype.size();
    if storage.len() != tensor.storage.numel * size {
        return Err(format!("storage '{}' holds {} bytes, but its header says {} elements of {size} bytes", tensor.storage.key, storage.len(), tensor.storage.numel));
    }
    let count: usize = tensor.shape.iter().product();
    if count == 0 {
        return Ok(Cow::Borrowed(&[]));
    }
    // The furthest element the view reaches must lie inside the storage.
    let last = tensor.shape.iter().zip(&tensor.stride).try_fold(tensor.offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?));
    if last.is_none_or(|last| last >= tensor.storage.numel) {
        return Err(format!(
            "a tensor of shape {:?} (stride {:?}, offset {}) reaches past its storage '{}' of {} elements",
            tensor.shape, tensor.stride, tensor.offset, tensor.storage.key, tensor.storage.numel
        ));
    }
    let mut contiguous = vec![1usize; tensor.shape.len()];
    for d in (0..tensor.shape.len().saturating_sub(1)).rev() {
        contiguous[d] = contiguous[d + 1] * tensor.shape[d + 1];
    }
    let dims_agree = tensor.shape.iter().zip(&tensor.stride).zip(&contiguous).all(|((&n, &s), &c)| n == 1 || s == c);
    if dims_agree {
        let start = tensor.offset * size;
        return Ok(Cow::Borrowed(&storage[start..start + count * size]));
    }
    let mut out = Vec::with_capacity(count * size);
    for flat in 0..count {
        let mut rest = flat;
        let mut element = tensor.offset;
        for d in (0..tensor.shape.len()).rev() {
            element += (rest % tensor.shape[d]) * tensor.stride[d];
            rest /= tensor.shape[d];
        }
        out.extend_from_slice(&storage[element * size..(element + 1) * size]);
    }
    Ok(Cow::Owned(out))
}

/// A checkpoint's unpickled state dict and the bytes of every storage, by key.
struct Pickled<'a> {
    state: Value,
    storages: HashMap<String, &'a [u8]>,
}

/// A zip archive from `torch.save`: `<name>/data.pkl` and `<name>/data/<key>` per storage.
fn read_zip(bytes: &[u8]) -> Result<Pickled<'_>, String> {
    let zip = StoredZip::parse(bytes)?;
    let pickle_names: Vec<&String> = zip.entries.keys().filter(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl").collect();
    let [pickle_name] = pickle_names.as_slice() else {
        return Err(format!("expected one data.pkl in the archive, found {}", pickle_names.len()));
    };
    let prefix = &pickle_name[..pickle_name.len() - "data.pkl".len()];
    if zip.get(&format!("{prefix}byteorder")).is_some_and(|order| order != b"little") {
        return Err("big-endian storages are not supported".into());
    }
    let state = pickle::unpickle(zip.get(pickle_name).unwrap(), pickle::torch_storage).map_err(|e| format!("{pickle_name}: {e}"))?;
    let data = format!("{prefix}data/");
    let storages = zip.entries.keys().filter_map(|name| Some((name.strip_prefix(&data)?.to_string(), zip.get(name).unwrap()))).collect();
    Ok(Pickled { state, storages })
}

/// The magic number that opens a legacy `torch.save` file, 0x1950a86a20f9469cfc6c, as the
/// little-endian bytes of its pickled LONG1.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Whether `bytes` opens with a legacy file's first pickle (the magic number): PROTO, an
/// optional FRAME, LONG1 of 10 bytes, STOP. Its length if so.
fn legacy_magic(bytes: &[u8]) -> Option<usize> {
    let mut at = if bytes.first() == Some(&0x80) { 2 } else { 0 };
    if bytes.get(at) == Some(&0x95) {
        at += 9;
    }
    let magic = [&[0x8a, 10][..], &LEGACY_MAGIC, b"."].concat();
    (bytes.get(at..at + magic.len()) == Some(&magic[..])).then_some(at + magic.len())
}

/// `torch.save`'s format before PyTorch 1.6 (and with `_use_new_zipfile_serialization=False`):
/// pickles back to back — the magic number, the protocol version 1001, the system's byte order
/// and type sizes, the state dict, the sorted list of storage keys — then each storage in that
/// order as an i64 element count and its bytes.
fn read_legacy(bytes: &[u8], magic_end: usize) -> Result<Pickled<'_>, String> {
    let mut at = magic_end;
    let mut next = |what: &str| -> Result<Value, String> {
        let (value, len) = pickle::unpickle_prefix(&bytes[at..], pickle::torch_storage).map_err(|e| format!("legacy torch.save file, {what} (the pickle from byte {at}): {e}"))?;
        at += len;
        Ok(value)
    };
    match next("protocol version")? {
        Value::Int(1001) => {}
        other => return Err(format!("legacy torch.save protocol {other:?}, expected 1001")),
    }
    let Value::Dict(info) = next("system info")? else { return Err("legacy torch.save file: the system info is not a dict".into()) };
    let little = info.iter().any(|(k, v)| *k == Value::String("little_endian".into()) && *v == Value::Bool(true));
    if !little {
        return Err("big-endian storages are not supported".into());
    }
    let state = next("state dict")?;
    let Value::List(keys) = next("storage keys")? else { return Err("legacy torch.save file: the storage keys are not a list".into()) };
    let mut sizes = HashMap::new();
    collect_storages(&state, &mut sizes);
    let mut storages = HashMap::new();
    for key in keys {
        let Value::String(key) = key else { return Err(format!("legacy torch.save file: storage key {key:?} is not a string")) };
        let &(numel, size) = sizes.get(&key).ok_or_else(|| format!("storage '{key}' is not used by any tensor"))?;
        let count = u64_at(bytes, at).ok_or_else(|| format!("storage '{key}' runs past the end of the file (truncated?)"))?;
        if count != numel as u64 {
            return Err(format!("storage '{key}' holds {count} elements, but its header says {numel}"));
        }
        let start = at + 8;
        let end = numel.checked_mul(size).and_then(|len| start.checked_add(len)).filter(|&e| e <= bytes.len());
        let end = end.ok_or_else(|| format!("storage '{key}' ({numel} elements of {size} bytes) runs past the end of the file (truncated?)"))?;
        if storages.insert(key.clone(), &bytes[start..end]).is_some() {
            return Err(format!("storage '{key}' is listed twice"));
        }
        at = end;
    }
    if at != bytes.len() {
        return Err(format!("{} bytes after the last storage", bytes.len() - at));
    }
    Ok(Pickled { state, storages })
}

/// Every storage a value's tensors view: key → (elements, bytes an element).
fn collect_storages(value: &Value, out: &mut HashMap<String, (usize, usize)>) {
    match value {
        Value::Tensor(tensor) => {
            out.insert(tensor.storage.key.clone(), (tensor.storage.numel, tensor.storage.dtype.size()));
        }
        Value::Tuple(items) | Value::List(items) => items.iter().for_each(|v| collect_storages(v, out)),
        Value::Dict(pairs) => pairs.iter().for_each(|(k, v)| {
            collect_storages(k, out);
            collect_storages(v, out);
        }),
        _ => {}
    }
}

/// The tensors of one `.bin` file, by name, validated against their storages.
fn read_state_dict<'a>(path: &Path, bytes: &'a [u8]) -> Result<BTreeMap<String, TensorOut<'a>>, LoadError> {
    let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    let Pickled { state, storages } = match legacy_magic(bytes) {
        Some(magic_end) => read_legacy(bytes, magic_end),
        None => read_zip(bytes),
    }
    .map_err(invalid)?;
    let Value::Dict(pairs) = state else { return Err(invalid("the pickle is not a state dict (a dict of tensors)".into())) };
    let mut tensors = BTreeMap::new();
    for (key, value) in pairs {
        let Value::String(name) = key else { return Err(invalid(format!("a state-dict key is not a string: {key:?}"))) };
        let Value::Tensor(tensor) = value else { return Err(invalid(format!("'{name}' is not a tensor: not an HF state dict"))) };
        let storage = storages.get(&tensor.storage.key).ok_or_else(|| invalid(format!("'{name}': storage '{}' is missing", tensor.storage.key)))?;
        let data = tensor_bytes(&tensor, storage).map_err(|e| invalid(format!("'{name}': {e}")))?;
        let out = TensorOut { dtype: safetensors_dtype(tensor.storage.dtype), shape: tensor.shape.clone(), data };
        if tensors.insert(name.clone(), out).is_some() {
            return Err(invalid(format!("'{name}' appears twice")));
        }
    }
    Ok(tensors)
}

/// How many tensors the `.bin` in `bytes` holds, after every check the import makes.
pub fn count_tensors(path: &Path, bytes: &[u8]) -> Result<usize, LoadError> {
    Ok(read_state_dict(path, bytes)?.len())
}

pub struct TorchImport {
    pub tensors: usize,
    pub shards: usize,
    pub bytes: u64,
}

/// Converts `dir`'s `pytorch_model.bin` (or the shards its `pytorch_model.bin.index.json`
/// lists) into `out`: one safetensors file per input file, the index if sharded, and every other
/// file of the folder copied. Atomic: `out` appears complete or not at all.
pub fn import_dir(dir: &Path, out: &Path) -> Result<TorchImport, LoadError> {
    let index_path = dir.join("pytorch_model.bin.index.json");
    let shards: Vec<String> = if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| LoadError::io(&index_path, e))?;
        let index: Json = serde_json::from_str(&text).map_err(|e| LoadError::json(&index_path, e))?;
        let map = index["weight_map"].as_object().ok_or_else(|| LoadError::Invalid { path: index_path.clone(), reason: "no weight_map".into() })?;
        let mut files: Vec<String> = map.values().filter_map(Json::as_str).map(str::to_string).collect();
        files.sort();
        files.dedup();
        files
    } else if dir.join("pytorch_model.bin").is_file() {
        vec!["pytorch_model.bin".into()]
    } else {
        return Err(LoadError::Missing { path: dir.to_path_buf(), what: "pytorch_model.bin (or pytorch_model.bin.index.json)" });
    };
    if let Some(bad) = shards.iter().find(|f| f.contains('/') || f.contains('\\') || f.starts_with('.')) {
        return Err(LoadError::Invalid { path: index_path, reason: format!("shard name '{bad}' is not a file of this folder") });
    }
    // Map every shard and check every tensor before anything is written.
    let maps = shards
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| LoadError::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint that is not modified while converting.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(&path, e))?;
            Ok((path, map))
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    let dicts = maps.iter().map(|(path, map)| read_state_dict(path, map)).collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashMap::new();
    for (dict, (path, _)) in dicts.iter().zip(&maps) {
        for name in dict.keys() {
            if let Some(first) = seen.insert(name.clone(), path.clone()) {
                return Err(LoadError::Invalid { path: path.clone(), reason: format!("'{name}' is also in {}", first.display()) });
            }
        }
    }
    let names: Vec<String> = if dicts.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=dicts.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", dicts.len())).collect()
    };
    let bytes: u64 = dicts.iter().flat_map(|d| d.values()).map(|t| t.data.len() as u64).sum();
    crate::write_dir_atomically(out, |tmp| {
        for (dict, name) in dicts.iter().zip(&names) {
            let path = tmp.join(name);
            crate::write_safetensors(&path, dict.iter().map(|(k, v)| (k.as_str(), v))).map_err(|e| LoadError::write(&path, e))?;
        }
        if dicts.len() > 1 {
            let weight_map: BTreeMap<&str, &str> =
                dicts.iter().zip(&names).flat_map(|(d, file)| d.keys().map(move |k| (k.as_str(), file.as_str()))).collect();
            let path = tmp.join("model.safetensors.index.json");
            crate::write_json(&path, &json!({"metadata": {"total_size": bytes}, "weight_map": weight_map})).map_err(|e| LoadError::write(&path, e))?;
        }
        copy_other_files(dir, tmp)
    }, LoadError::write)?;
    Ok(TorchImport { tensors: seen.len(), shards: dicts.len(), bytes })
}

/// Every plain file of `dir` but weights (`.bin` pickles, which may hold code, and any
/// safetensors, which would clash with the converted ones) and their indexes.
fn copy_other_files(dir: &Path, to: &Path) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".bin") || name.ends_with(".safetensors") || name.ends_with(".index.json");
        if weights || !entry.path().is_file() {
            continue;
        }
        let target: PathBuf = to.join(&name);
        std::fs::copy(entry.path(), &target).map_err(|e| LoadError::write(&target, e))?;
    }
    Ok(())
}
