//! llama.cpp's importance matrix (`llama-imatrix` output; `llama-quantize --imatrix`): for each
//! weight, by its GGUF name, the mean squared activation each input column saw on calibration
//! text. Read from either of its formats:
//! - GGUF (`general.type = imatrix`): per weight `<name>.in_sum2` (the sums of squares, f32) and
//!   `<name>.counts` (the tokens counted, f32), with `imatrix.datasets`, `imatrix.chunk_count` and
//!   `imatrix.chunk_size`; the importance is `in_sum2 / round(count)` (1 where nothing was counted).
//! - the legacy `.dat`: an i32 entry count, then per entry an i32 name length, the name, i32 calls,
//!   i32 values and the f32 values (sums already divided by the tokens, times the calls), then
//!   optionally the chunk count and the dataset name; the importance is `values / calls`.
//!
//! [`write_gguf`] writes the GGUF layout, for what `ember imatrix` collects; [`read_sums`] reads
//! a file back as sums and token counts, to add to (llama-imatrix's `--in-file`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::LoadError;
use crate::gguf::{GgmlType, GgufFile};

pub struct ImportanceMatrix {
    path: PathBuf,
    entries: HashMap<String, Vec<f32>>,
    /// The calibration texts' names, and how many chunks of them were run, where the file says.
    pub datasets: Vec<String>,
    pub chunks: Option<u32>,
}

/// What a file holds besides the entries.
struct Provenance {
    datasets: Vec<String>,
    chunks: Option<u32>,
}

impl ImportanceMatrix {
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let (entries, Provenance { datasets, chunks }) = if is_gguf(path)? { read_gguf(path)? } else { read_legacy(path)? };
        for (name, values) in &entries {
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                return Err(LoadError::Invalid { path: path.to_path_buf(), reason: format!("'{name}' has a non-finite value {bad}") });
            }
        }
        Ok(Self { path: path.to_path_buf(), entries, datasets, chunks })
    }

    /// The importance of the columns of the GGUF tensor `name` with rows of `columns`: `None`
    /// when the file has none for it (llama-quantize then quantizes it without); an error when
    /// its length is not `columns`, except for the token embedding, whose entry llama-quantize
    /// ignores then.
    pub fn for_tensor(&self, name: &str, columns: usize) -> Result<Option<&[f32]>, LoadError> {
        match self.entries.get(name) {
            Some(values) if values.len() == columns => Ok(Some(values)),
            Some(_) if name == "token_embd.weight" => Ok(None),
            Some(values) => Err(LoadError::Invalid {
                path: self.path.clone(),
                reason: format!("'{name}' has {} values, the tensor's rows {columns}: an importance matrix of another model?", values.len()),
            }),
            None => Ok(None),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What llama-imatrix collects for one weight: the sum of each input column's squares, and the
/// tokens (rows) summed.
#[derive(Debug, Clone, Default)]
pub struct ColumnSquares {
    pub sums: Vec<f64>,
    pub tokens: u64,
}

impl ColumnSquares {
    /// Adds `other`'s sums and tokens; `None` when their columns differ.
    pub fn merge(&mut self, other: &ColumnSquares) -> Option<()> {
        if self.sums.is_empty() {
            self.sums = vec![0.0; other.sums.len()];
        }
        if self.sums.len() != other.sums.len() {
            return None;
        }
        for (sum, other) in self.sums.iter_mut().zip(&other.sums) {
            *sum += other;
        }
        self.tokens += other.tokens;
        Some(())
    }

    /// Adds the column sums of `squares` over `tokens` more rows.
    pub fn add(&mut self, squares: &[f32], tokens: usize) {
        if self.sums.is_empty() {
            self.sums = vec![0.0; squares.len()];
        }
        for (sum, &square) in self.sums.iter_mut().zip(squares) {
            *sum += f64::from(square);
        }
        self.tokens += tokens as u64;
    }
}

/// Writes `entries` (by GGUF weight name) in llama-imatrix's GGUF layout: `general.type =
/// imatrix`, the datasets, the chunks run and their size; per weight, in name order,
/// `<name>.in_sum2` (f32, `[1, columns]`) and `<name>.counts` (f32, `[1, 1]`). Atomic.
pub fn write_gguf(path: &Path, entries: &BTreeMap<String, ColumnSquares>, datasets: &[String], chunks: u32, chunk_size: u32) -> Result<(), LoadError> {
    use crate::gguf::GgmlType;
    use crate::gguf_write::{MetaValue, TensorSpec, write};
    let metadata = [
        ("general.type".to_string(), MetaValue::Str("imatrix".into())),
        ("imatrix.datasets".into(), MetaValue::Strs(datasets.to_vec())),
        ("imatrix.chunk_count".into(), MetaValue::U32(chunks)),
        ("imatrix.chunk_size".into(), MetaValue::U32(chunk_size)),
    ];
    let entries: Vec<(&String, &ColumnSquares)> = entries.iter().filter(|(_, e)| !e.sums.is_empty()).collect();
    let specs: Vec<TensorSpec> = entries
        .iter()
        .flat_map(|(name, e)| {
            [
                TensorSpec { name: format!("{name}.in_sum2"), shape: vec![1, e.sums.len()], ty: GgmlType::F32 },
                TensorSpec { name: format!("{name}.counts"), shape: vec![1, 1], ty: GgmlType::F32 },
            ]
        })
        .collect();
    write(path, &metadata, &specs, None, |i| {
        let (_, entry) = entries[i / 2];
        Ok(if i % 2 == 0 { entry.sums.iter().map(|&s| s as f32).collect() } else { vec![entry.tokens as f32] })
    })
}

/// An importance matrix file as sums of squares and token counts per weight (what llama-imatrix
/// loads with `--in-file`), with its datasets. A GGUF file holds them as they are; a legacy one's
/// means times calls are taken back to sums over `chunk_size` tokens a call, as llama-imatrix does.
pub fn read_sums(path: &Path, chunk_size: usize) -> Result<(BTreeMap<String, ColumnSquares>, Vec<String>), LoadError> {
    let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    let mut entries = BTreeMap::new();
    if !is_gguf(path)? {
        let (legacy, Provenance { datasets, .. }) = read_legacy_raw(path)?;
        for (name, (calls, values)) in legacy {
            let sums = values.iter().map(|&v| f64::from(v) * chunk_size as f64).collect();
            entries.insert(name, ColumnSquares { sums, tokens: calls.max(0) as u64 * chunk_size as u64 });
        }
        return Ok((entries, datasets));
    }
    let file = GgufFile::open(path)?;
    check_gguf_keys(&file, path)?;
    for sums in &file.tensors {
        let Some(name) = sums.name.strip_suffix(".in_sum2") else { continue };
        let (sums, counts) = gguf_entry(&file, name, sums, path)?;
        let [count] = counts[..] else {
            return Err(invalid(format!("'{name}' has {} counts (one per expert): ember merges no MoE matrices", counts.len())));
        };
        entries.insert(name.to_string(), ColumnSquares { sums: sums.iter().map(|&s| f64::from(s)).collect(), tokens: count.round().max(0.0) as u64 });
    }
    if entries.is_empty() {
        return Err(invalid("no '<tensor>.in_sum2' entries".into()));
    }
    Ok((entries, gguf_provenance(&file).datasets))
}

/// Whether `path` starts as a GGUF file.
fn is_gguf(path: &Path) -> Result<bool, LoadError> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    file.read(&mut head).map_err(|e| LoadError::io(path, e))?;
    Ok(&head == b"GGUF")
}

/// The keys that make a GGUF file an importance matrix.
fn check_gguf_keys(file: &GgufFile, path: &Path) -> Result<(), LoadError> {
    for key in ["imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"] {
        if file.metadata.get(key).is_none() {
            return Err(LoadError::Invalid { path: path.to_path_buf(), reason: format!("missing the importance matrix key '{key}' (not a llama-imatrix file?)") });
        }
    }
    Ok(())
}

/// Entry `name`'s sums (`sums`, its `.in_sum2` tensor) and counts, whole experts of columns.
fn gguf_entry(file: &GgufFile, name: &str, sums: &crate::gguf::GgufTensor, path: &Path) -> Result<(Vec<f32>, Vec<f32>), LoadError> {
    let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    let counts = file.tensor(&format!("{name}.counts")).ok_or_else(|| invalid(format!("'{name}.in_sum2' has no '{name}.counts'")))?;
    if sums.ggml_type != GgmlType::F32 || counts.ggml_type != GgmlType::F32 {
        return Err(invalid(format!("'{name}': sums and counts must be F32")));
    }
    let (sums, counts) = (file.dequantize(sums), file.dequantize(counts));
    if counts.is_empty() || sums.len() % counts.len() != 0 {
        return Err(invalid(format!("'{name}': {} sums do not split into {} counts", sums.len(), counts.len())));
    }
    Ok((sums, counts))
}

fn gguf_provenance(file: &GgufFile) -> Provenance {
    let datasets = file.metadata.get("imatrix.datasets").and_then(|v| v.as_array()).map(|names| {
        names.iter().filter_map(|name| name.as_str().map(str::to_string)).collect()
    });
    let chunks = file.metadata.get("imatrix.chunk_count").and_then(|v| v.as_u64()).and_then(|n| u32::try_from(n).ok());
    Provenance { datasets: datasets.unwrap_or_default(), chunks }
}

/// Writes `entries` in llama-imatrix's legacy `.dat` layout (its `--output-format dat`): per
/// weight in name order its calls (`⌈tokens / chunk_size⌉`) and `sums / tokens · calls` in f32,
/// then the chunks and the last dataset's name. Entries that counted nothing are left out, as
/// llama-imatrix leaves them. Atomic.
pub fn write_legacy(path: &Path, entries: &BTreeMap<String, ColumnSquares>, datasets: &[String], chunks: u32, chunk_size: u32) -> Result<(), LoadError> {
    let stored: Vec<(&String, &ColumnSquares)> = entries.iter().filter(|(_, e)| e.tokens > 0 && !e.sums.is_empty()).collect();
    let mut out = (stored.len() as i32).to_le_bytes().to_vec();
    for (name, entry) in stored {
        out.extend((name.len() as i32).to_le_bytes());
        out.extend(name.as_bytes());
        let calls = entry.tokens.div_ceil(u64::from(chunk_size)) as i32;
        out.extend(calls.to_le_bytes());
        out.extend((entry.sums.len() as i32).to_le_bytes());
        // In f32, as llama-imatrix computes it from its f32 sums.
        let (count, calls) = (entry.tokens as f32, calls as f32);
        for &sum in &entry.sums {
            out.extend(((sum as f32 / count) * calls).to_le_bytes());
        }
    }
    out.extend((chunks as i32).to_le_bytes());
    let dataset = datasets.last().map(String::as_str).unwrap_or_default();
    out.extend((dataset.len() as i32).to_le_bytes());
    out.extend(dataset.as_bytes());
    crate::files::write_file_atomically(path, &out).map_err(|e| LoadError::io(path, e))
}

fn read_gguf(path: &Path) -> Result<(HashMap<String, Vec<f32>>, Provenance), LoadError> {
    let file = GgufFile::open(path)?;
    check_gguf_keys(&file, path)?;
    let mut entries = HashMap::new();
    for sums in &file.tensors {
        let Some(name) = sums.name.strip_suffix(".in_sum2") else { continue };
        let (sums, counts) = gguf_entry(&file, name, sums, path)?;
        // Per expert (one count each): sums over its columns, divided by its rounded count.
        let columns = sums.len() / counts.len();
        let values = sums
            .chunks(columns)
            .zip(&counts)
            .flat_map(|(sums, &count)| {
                let count = count.round() as i64 as f32;
                sums.iter().map(move |&s| if count > 0.0 { s / count } else { 1.0 })
            })
            .collect();
        entries.insert(name.to_string(), values);
    }
    if entries.is_empty() {
        return Err(LoadError::Invalid { path: path.to_path_buf(), reason: "no '<tensor>.in_sum2' entries".into() });
    }
    Ok((entries, gguf_provenance(&file)))
}

/// A legacy file's bytes, read in order.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LoadError> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or_else(|| LoadError::Invalid {
            path: self.path.to_path_buf(),
            reason: format!("neither GGUF nor a legacy importance matrix: {what} runs past the end"),
        })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn int(&mut self, what: &str) -> Result<i32, LoadError> {
        Ok(i32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
}

/// A legacy file's entries as they are stored: per name its calls and values (sums divided by the
/// tokens, times the calls).
fn read_legacy_raw(path: &Path) -> Result<(HashMap<String, (i32, Vec<f32>)>, Provenance), LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    let invalid = |reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    let mut cursor = Cursor { bytes: &bytes, at: 0, path };
    let count = cursor.int("the entry count")?;
    if count < 1 {
        return Err(invalid(format!("neither GGUF nor a legacy importance matrix ({count} entries)")));
    }
    let mut entries = HashMap::new();
    for i in 0..count {
        let length = cursor.int("a name length")?;
        let length = usize::try_from(length).map_err(|_| invalid(format!("entry {i}: a name length of {length}")))?;
        let name = String::from_utf8(cursor.take(length, "a name")?.to_vec()).map_err(|_| invalid(format!("entry {i}: the name is not UTF-8")))?;
        let calls = cursor.int("a call count")?;
        let values = cursor.int("a value count")?;
        if values < 1 {
            return Err(invalid(format!("'{name}': {values} values")));
        }
        let data = cursor.take(values as usize * 4, "the values")?;
        entries.insert(name, (calls, data.chunks(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()));
    }
    // Optionally, the chunks run and the dataset's name.
    let mut provenance = Provenance { datasets: Vec::new(), chunks: None };
    if let Ok(chunks) = cursor.int("the chunk count") {
        provenance.chunks = u32::try_from(chunks).ok();
        let name = cursor.int("the dataset name's length").ok().and_then(|n| usize::try_from(n).ok()).and_then(|n| cursor.take(n, "the dataset name").ok());
        provenance.datasets.extend(name.and_then(|n| std::str::from_utf8(n).ok()).filter(|n| !n.is_empty()).map(str::to_string));
    }
    Ok((entries, provenance))
}

fn read_legacy(path: &Path) -> Result<(HashMap<String, Vec<f32>>, Provenance), LoadError> {
    let (raw, provenance) = read_legacy_raw(path)?;
    // The sums were divided by the tokens and multiplied by the calls: divide by the calls.
    let entries = raw
        .into_iter()
        .map(|(name, (calls, values))| (name, values.into_iter().map(|v| if calls > 0 { v / calls as f32 } else { v }).collect()))
        .collect();
    Ok((entries, provenance))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy(entries: &[(&str, i32, &[f32])]) -> Vec<u8> {
        let mut out = (entries.len() as i32).to_le_bytes().to_vec();
        for (name, calls, values) in entries {
            out.extend((name.len() as i32).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(calls.to_le_bytes());
            out.extend((values.len() as i32).to_le_bytes());
            values.iter().for_each(|v| out.extend(v.to_le_bytes()));
        }
        // The optional tail: chunks and the dataset's name.
        out.extend(10i32.to_le_bytes());
        out.extend(4i32.to_le_bytes());
        out.extend(b"wiki");
        out
    }

    /// A scratch file for one test: the process id and `test` keep tests apart.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-imatrix-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("imatrix.dat")
    }

    #[test]
    fn legacy_files_divide_by_their_calls_and_check_lengths() {
        let path = scratch("legacy");
        std::fs::write(&path, legacy(&[("blk.0.attn_q.weight", 4, &[8.0, 2.0]), ("output.weight", 0, &[3.0, 1.0])])).unwrap();
        let matrix = ImportanceMatrix::read(&path).unwrap();
        assert_eq!(matrix.len(), 2);
        assert_eq!((matrix.chunks, matrix.datasets.clone()), (Some(10), vec!["wiki".to_string()]));
        assert_eq!(matrix.for_tensor("blk.0.attn_q.weight", 2).unwrap(), Some(&[2.0f32, 0.5][..]));
        assert_eq!(matrix.for_tensor("output.weight", 2).unwrap(), Some(&[3.0f32, 1.0][..]));
        assert_eq!(matrix.for_tensor("blk.0.attn_k.weight", 2).unwrap(), None);
        let error = matrix.for_tensor("blk.0.attn_q.weight", 3).unwrap_err().to_string();
        assert!(error.contains("imatrix.dat") && error.contains("blk.0.attn_q.weight") && error.contains("2 values"), "{error}");
        assert_eq!(matrix.for_tensor("token_embd.weight", 2).unwrap(), None);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// llama-imatrix's GGUF layout, written with ember's own GGUF writer.
    fn gguf_imatrix(path: &Path, keys: &[&str], entries: &[(&str, Vec<f32>, f32)]) {
        use crate::gguf::GgmlType;
    use crate::gguf_write::{MetaValue, TensorSpec, write};
        let mut metadata = vec![("general.type".to_string(), MetaValue::Str("imatrix".into()))];
        for &key in keys {
            let value = if key == "imatrix.datasets" { MetaValue::Strs(vec!["wiki.train".into()]) } else { MetaValue::U32(10) };
            metadata.push((key.to_string(), value));
        }
        let mut specs = Vec::new();
        let mut data = Vec::new();
        for (name, sums, count) in entries {
            specs.push(TensorSpec { name: format!("{name}.in_sum2"), shape: vec![1, sums.len()], ty: GgmlType::F32 });
            data.push(sums.clone());
            specs.push(TensorSpec { name: format!("{name}.counts"), shape: vec![1, 1], ty: GgmlType::F32 });
            data.push(vec![*count]);
        }
        write(path, &metadata, &specs, None, |i| Ok(data[i].clone())).unwrap();
    }

    #[test]
    fn gguf_files_divide_sums_by_rounded_counts() {
        let path = scratch("gguf").with_file_name("imatrix.gguf");
        let keys = ["imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"];
        gguf_imatrix(&path, &keys, &[("blk.0.ffn_down.weight", vec![6.0, 3.0, 1.5], 2.6), ("output.weight", vec![4.0, 8.0], 0.0)]);
        let matrix = ImportanceMatrix::read(&path).unwrap();
        // A count of 2.6 rounds to 3; nothing counted gives importance 1.
        assert_eq!(matrix.for_tensor("blk.0.ffn_down.weight", 3).unwrap(), Some(&[2.0f32, 1.0, 0.5][..]));
        assert_eq!(matrix.for_tensor("output.weight", 2).unwrap(), Some(&[1.0f32, 1.0][..]));
        assert_eq!((matrix.chunks, matrix.datasets.clone()), (Some(10), vec!["wiki.train".to_string()]));
        // Without llama-imatrix's keys it is not taken for one.
        gguf_imatrix(&path, &keys[..2], &[("output.weight", vec![4.0, 8.0], 1.0)]);
        let error = ImportanceMatrix::read(&path).err().unwrap().to_string();
        assert!(error.contains("imatrix.gguf") && error.contains("imatrix.chunk_size"), "{error}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// What `ember imatrix` writes reads back as llama-imatrix's files do: sums over tokens,
    /// the dataset and chunks, tensors in name order.
    #[test]
    fn written_sums_read_back_as_mean_squares() {
        let path = scratch("written").with_file_name("ember.imatrix.gguf");
        let mut entries = BTreeMap::new();
        let mut ffn = ColumnSquares::default();
        ffn.add(&[4.0, 1.0, 0.5], 2);
        ffn.add(&[2.0, 1.0, 0.5], 2);
        entries.insert("blk.0.ffn_down.weight".to_string(), ffn);
        entries.insert("blk.0.attn_q.weight".to_string(), ColumnSquares { sums: vec![3.0, 6.0], tokens: 3 });
        write_gguf(&path, &entries, &["alpaca.json".to_string()], 2, 2).unwrap();
        let matrix = ImportanceMatrix::read(&path).unwrap();
        assert_eq!(matrix.for_tensor("blk.0.ffn_down.weight", 3).unwrap(), Some(&[1.5f32, 0.5, 0.25][..]));
        assert_eq!(matrix.for_tensor("blk.0.attn_q.weight", 2).unwrap(), Some(&[1.0f32, 2.0][..]));
        assert_eq!((matrix.chunks, matrix.datasets.clone()), (Some(2), vec!["alpaca.json".to_string()]));
        let names: Vec<String> = GgufFile::open(&path).unwrap().tensors.iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// For adding up (`--in-file`): a GGUF file's sums and counts as they are, a legacy file's
    /// values and calls times the chunk size, as llama-imatrix takes them back; entries add.
    #[test]
    fn sums_read_back_for_adding_up() {
        let path = scratch("sums").with_file_name("a.gguf");
        let keys = ["imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"];
        gguf_imatrix(&path, &keys, &[("blk.0.ffn_down.weight", vec![6.0, 3.0], 2.6)]);
        let (gguf, datasets) = read_sums(&path, 512).unwrap();
        assert_eq!((gguf["blk.0.ffn_down.weight"].sums.clone(), gguf["blk.0.ffn_down.weight"].tokens), (vec![6.0, 3.0], 3));
        assert_eq!(datasets, ["wiki.train"]);
        let legacy_path = path.with_file_name("b.dat");
        std::fs::write(&legacy_path, legacy(&[("blk.0.ffn_down.weight", 2, &[0.5, 0.25])])).unwrap();
        let (old, datasets) = read_sums(&legacy_path, 4).unwrap();
        assert_eq!((old["blk.0.ffn_down.weight"].sums.clone(), old["blk.0.ffn_down.weight"].tokens), (vec![2.0, 1.0], 8));
        assert_eq!(datasets, ["wiki"]);
        let mut total = gguf["blk.0.ffn_down.weight"].clone();
        total.merge(&old["blk.0.ffn_down.weight"]).unwrap();
        assert_eq!((total.sums, total.tokens), (vec![8.0, 4.0], 11));
        assert!(total_of(&[1.0]).merge(&old["blk.0.ffn_down.weight"]).is_none(), "columns differ");
        // The legacy layout written reads back as the same sums (at whole calls of 4 tokens).
        let mut entries = BTreeMap::new();
        entries.insert("blk.0.ffn_down.weight".to_string(), ColumnSquares { sums: vec![8.0, 4.0], tokens: 8 });
        entries.insert("blk.0.attn_q.weight".to_string(), ColumnSquares { sums: vec![1.0], tokens: 0 });
        let written = path.with_file_name("written.dat");
        write_legacy(&written, &entries, &["a.txt".into(), "b.txt".into()], 2, 4).unwrap();
        let (back, datasets) = read_sums(&written, 4).unwrap();
        assert_eq!((back["blk.0.ffn_down.weight"].sums.clone(), back["blk.0.ffn_down.weight"].tokens, back.len()), (vec![8.0, 4.0], 8, 1));
        assert_eq!(datasets, ["b.txt"]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn total_of(sums: &[f64]) -> ColumnSquares {
        ColumnSquares { sums: sums.to_vec(), tokens: 1 }
    }

    #[test]
    fn truncated_or_foreign_files_are_errors_naming_the_file() {
        let path = scratch("truncated");
        let mut bytes = legacy(&[("blk.0.attn_q.weight", 1, &[1.0, 2.0])]);
        bytes.truncate(20);
        std::fs::write(&path, &bytes).unwrap();
        let error = ImportanceMatrix::read(&path).err().unwrap().to_string();
        assert!(error.contains("imatrix.dat") && error.contains("runs past the end"), "{error}");
        std::fs::write(&path, legacy(&[("blk.0.attn_q.weight", 1, &[f32::NAN, 2.0])])).unwrap();
        let error = ImportanceMatrix::read(&path).err().unwrap().to_string();
        assert!(error.contains("non-finite"), "{error}");
        std::fs::write(&path, b"{\"not\": \"an imatrix\"}").unwrap();
        assert!(ImportanceMatrix::read(&path).is_err());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
