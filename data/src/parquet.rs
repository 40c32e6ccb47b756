//! Parquet data files, the format the Hugging Face Hub keeps most datasets in (and converts every
//! dataset to, on its `refs/convert/parquet` branch). Each row becomes the JSON object a JSON Lines
//! file would hold for it, so every record format, and every error naming a record, is the same
//! as for JSON: string columns are strings, lists arrays, structs objects; null columns are left
//! out.

use std::cell::Cell;
use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use ::parquet::file::reader::{ChunkReader, SerializedFileReader};
use ::parquet::record::{Field, Row};
use serde_json::{Map, Value};

use crate::dataset::DatasetError;

/// Whether `path` names a Parquet file (by its extension, as `datasets` decides).
pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Every row of the Parquet file held in `bytes`, as JSON objects; `path` names it in errors.
pub fn values(path: &Path, bytes: Vec<u8>) -> Result<Vec<Value>, DatasetError> {
    let rows = Rows::open(path, bytes::Bytes::from(bytes))?;
    let values: Vec<Value> = rows.collect::<Result<_, _>>()?;
    if values.is_empty() {
        return Err(invalid(path, "no records".into()));
    }
    Ok(values)
}

/// The number of rows in the Parquet file at `path`, counted by reading them (not taken from the
/// footer, which a damaged file can get wrong by any amount).
pub fn count(path: &Path) -> Result<usize, DatasetError> {
    let file = open(path)?;
    let rows = guarded(path, || {
        let reader = SerializedFileReader::new(file).map_err(|e| malformed(path, &e))?;
        let mut rows = 0;
        for row in ::parquet::record::reader::RowIter::from_file_into(Box::new(reader)) {
            row.map_err(|e| invalid(path, format!("row {rows}: malformed Parquet: {e}")))?;
            rows += 1;
        }
        Ok(rows)
    })?;
    match rows {
        0 => Err(invalid(path, "no records".into())),
        rows => Ok(rows),
    }
}

/// The rows of the Parquet file at `path` as JSON objects, read a row group at a time.
pub fn stream(path: &Path) -> Result<Rows, DatasetError> {
    Rows::open(path, open(path)?)
}

/// Rows read one at a time as JSON objects.
pub struct Rows {
    path: PathBuf,
    rows: ::parquet::record::reader::RowIter<'static>,
    /// The row the next one is, to name it in an error.
    index: usize,
    /// Whether the reader failed: nothing follows its error.
    failed: bool,
}

impl Rows {
    fn open<R: ChunkReader + 'static>(path: &Path, source: R) -> Result<Self, DatasetError> {
        let rows = guarded(path, || {
            let reader = SerializedFileReader::new(source).map_err(|e| malformed(path, &e))?;
            Ok(::parquet::record::reader::RowIter::from_file_into(Box::new(reader)))
        })?;
        Ok(Self { path: path.to_path_buf(), rows, index: 0, failed: false })
    }
}

impl Iterator for Rows {
    type Item = Result<Value, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let index = self.index;
        let row = guarded(&self.path, || match self.rows.next() {
            None => Ok(None),
            Some(Ok(row)) => Ok(Some(row)),
            Some(Err(e)) => Err(invalid(&self.path, format!("row {index}: malformed Parquet: {e}"))),
        });
        self.index += 1;
        match row {
            Ok(row) => Some(object(&row?).map_err(|reason| DatasetError::Record { path: self.path.clone(), index, reason })),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

thread_local! {
    /// Whether this thread is in [`guarded`], whose panics are reported as errors, not printed.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// `read` (the `parquet` crate's decoding) with a panic turned into an error naming `path`: its
/// row reader asserts rather than fails on some damaged files (a dictionary index past the
/// dictionary, levels that contradict the schema). Such a panic is not printed, as the error
/// line reports it; any other thread's or code's panics print as before.
fn guarded<T>(path: &Path, read: impl FnOnce() -> Result<T, DatasetError>) -> Result<T, DatasetError> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.get() {
                previous(info);
            }
        }));
    });
    let was = GUARDED.replace(true);
    let result = std::panic::catch_unwind(AssertUnwindSafe(read));
    GUARDED.set(was);
    result.unwrap_or_else(|panic| {
        let message = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default();
        Err(invalid(path, format!("malformed Parquet: the reader stopped ({message})")))
    })
}

/// A row or struct as an object. A null column is left out, as a JSON record leaves out a key it
/// does not have: every row of a table has every column, so a file that mixes record formats has
/// the other formats' columns null in each row.
fn object(row: &Row) -> Result<Value, String> {
    let mut object = Map::new();
    for (name, field) in row.get_column_iter() {
        match json(field).map_err(|e| format!("column '{name}': {e}"))? {
            Value::Null => {}
            value => {
                object.insert(name.clone(), value);
            }
        }
    }
    Ok(Value::Object(object))
}

/// A Parquet value as JSON. Binary values are text when they are UTF-8 (some writers store
/// strings without marking them); dates and times read as Parquet's own text for them.
fn json(field: &Field) -> Result<Value, String> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float16(n) => f64::from(*n).into(),
        Field::Float(n) => f64::from(*n).into(),
        Field::Double(n) => (*n).into(),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(std::str::from_utf8(b.data()).map_err(|_| "binary data that is not UTF-8 text".to_owned())?.to_owned()),
        Field::Group(row) => object(row)?,
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(json).collect::<Result<_, _>>()?),
        Field::MapInternal(map) => {
            let entry = |(key, value): &(Field, Field)| {
                let key = match json(key)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                Ok((key, json(value)?))
            };
            Value::Object(map.entries().iter().map(entry).collect::<Result<_, String>>()?)
        }
        other => Value::String(other.to_string()),
    })
}

fn open(path: &Path) -> Result<File, DatasetError> {
    File::open(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })
}

fn invalid(path: &Path, reason: String) -> DatasetError {
    DatasetError::Invalid { path: path.to_path_buf(), reason }
}

fn malformed(path: &Path, error: &::parquet::errors::ParquetError) -> DatasetError {
    invalid(path, format!("malformed Parquet: {error}"))
}
