//! TensorBoard event files (`train.report_to = ["tensorboard"]`): the scalars of
//! `metrics.jsonl` and the recipe as text, under `<run>/tensorboard/`.
//!
//! An event file is a sequence of records — length (u64), its masked CRC-32C, a serialized
//! `tensorflow.Event` protobuf, the data's masked CRC-32C — as TensorBoard reads them. The
//! folder is rebuilt from `metrics.jsonl` whenever a run starts: a resumed run's metrics are the
//! checkpoint's, so steps logged after the checkpoint by the killed run are not shown twice.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::TrainError;

/// metrics.jsonl keys and their TensorBoard tags.
const TAGS: &[(&str, &str)] = &[
    ("loss", "train/loss"),
    ("lr", "train/learning_rate"),
    ("grad_norm", "train/grad_norm"),
    ("tokens_per_second", "train/tokens_per_second"),
    ("epoch", "train/epoch"),
    ("eval_loss", "eval/loss"),
];

pub(crate) struct EventFile {
    path: PathBuf,
    file: std::fs::File,
}

impl EventFile {
    /// `<run>/tensorboard/` with one fresh event file: the file version, the recipe as text, and
    /// the scalars of every line already in `metrics` (a resumed run's).
    pub(crate) fn create(run: &Path, recipe_text: &str, metrics: &Path) -> Result<Self, TrainError> {
        let dir = run.join("tensorboard");
        let write_error = |path: &Path, e: std::io::Error| TrainError::write(path, e);
        let mut records = Vec::new();
        records.extend(record(&event(0, Payload::FileVersion)));
        records.extend(record(&event(0, Payload::Text { tag: "recipe", text: recipe_text })));
        let lines = std::fs::read_to_string(metrics).unwrap_or_default();
        for line in lines.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
            records.extend(scalar_records(&line));
        }
        let name = format!("events.out.tfevents.{}.ember", now().trunc() as u64);
        ember_models::write_dir_atomically(&dir, |tmp| std::fs::write(tmp.join(&name), &records).map_err(|e| write_error(tmp, e)), write_error)?;
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| write_error(&path, e))?;
        Ok(Self { path, file })
    }

    /// The scalars of one metrics.jsonl line, flushed at once (TensorBoard reads as it goes).
    pub(crate) fn scalars(&mut self, line: &Value) -> Result<(), TrainError> {
        let bytes = scalar_records(line);
        self.file.write_all(&bytes).and_then(|()| self.file.flush()).map_err(|e| TrainError::write(&self.path, e))
    }
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn scalar_records(line: &Value) -> Vec<u8> {
    let step = line["step"].as_i64().unwrap_or(0);
    TAGS.iter()
        .filter_map(|(key, tag)| Some((tag, line.get(*key)?.as_f64()?)))
        .flat_map(|(tag, value)| record(&event(step, Payload::Scalar { tag, value: value as f32 })))
        .collect()
}

enum Payload<'a> {
    FileVersion,
    Scalar { tag: &'a str, value: f32 },
    Text { tag: &'a str, text: &'a str },
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    varint(out, number << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A serialized `tensorflow.Event` at `step`.
fn event(step: i64, payload: Payload) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(1 << 3 | 1); // wall_time: double
    out.extend_from_slice(&now().to_le_bytes());
    varint(&mut out, 2 << 3); // step: int64
    varint(&mut out, step as u64);
    let mut value = Vec::new(); // Summary.Value
    match payload {
        Payload::FileVersion => {
            bytes_field(&mut out, 3, b"brain.Event:2");
            return out;
        }
        Payload::Scalar { tag, value: v } => {
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(2 << 3 | 5); // simple_value: float
            value.extend_from_slice(&v.to_le_bytes());
        }
        Payload::Text { tag, text } => {
            // The text plugin: a scalar DT_STRING tensor with plugin_name "text".
            bytes_field(&mut value, 1, tag.as_bytes());
            let mut plugin = Vec::new();
            bytes_field(&mut plugin, 1, b"text");
            let mut metadata = Vec::new();
            bytes_field(&mut metadata, 1, &plugin);
            bytes_field(&mut value, 9, &metadata);
            let mut tensor = Vec::new();
            tensor.extend_from_slice(&[1 << 3, 7]); // dtype: DT_STRING
            bytes_field(&mut tensor, 2, &[]); // tensor_shape: scalar
            bytes_field(&mut tensor, 8, text.as_bytes()); // string_val
            bytes_field(&mut value, 8, &tensor);
        }
    }
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &value);
    bytes_field(&mut out, 5, &summary);
    out
}

/// TFRecord's CRC-32C, rotated and offset so that CRCs of CRCs do not look like data.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_tfrecord() {
        // The CRC-32C check value, and TFRecord's mask: rotate right 15, add 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_frame_their_data() {
        let data = event(7, Payload::Scalar { tag: "train/loss", value: 1.5 });
        let framed = record(&data);
        assert_eq!(u64::from_le_bytes(framed[..8].try_into().unwrap()) as usize, data.len());
        assert_eq!(&framed[12..12 + data.len()], data.as_slice());
        assert_eq!(u32::from_le_bytes(framed[framed.len() - 4..].try_into().unwrap()), masked_crc(&data));
        // step 7, then the tag and the float.
        assert_eq!(&data[9..11], &[0x10, 7]);
        assert!(data.windows(10).any(|w| w == b"train/loss"));
        assert!(data.windows(4).any(|w| w == 1.5f32.to_le_bytes()));
    }

    #[test]
    fn metrics_lines_become_their_scalars() {
        let line = serde_json::json!({"step": 3, "loss": 2.0, "lr": 1e-4, "elapsed_s": 9.0});
        let records = scalar_records(&line);
        // loss and lr; elapsed_s is not a TensorBoard scalar.
        let count = std::iter::successors(Some(0usize), |&at| {
            (at < records.len()).then(|| at + 16 + u64::from_le_bytes(records[at..at + 8].try_into().unwrap()) as usize)
        })
        .take_while(|&at| at < records.len())
        .count();
        assert_eq!(count, 2);
    }
}
