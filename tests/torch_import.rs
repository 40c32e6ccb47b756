//! `ember import torch`: real `torch.save` files convert bit for bit; hostile ones are one error
//! line, exit 2, nothing written, no code run.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_bad_input, ember, read_json, repository};
use safetensors::SafeTensors;

fn torch_bin(path: &str) -> PathBuf {
    repository().join("tests/fixtures/torch_bin").join(path)
}

/// Every tensor of a converted folder (single file or shards), by name: dtype, shape, bytes.
fn tensors(dir: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("model") && name.ends_with(".safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let file = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in file.tensors() {
                out.push((name, format!("{:?}", view.dtype()), view.shape().to_vec(), view.data().to_vec()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn single_and_sharded_checkpoints_convert_bit_for_bit() {
    let expected = tensors(&repository().join("tests/fixtures/tiny_llama"));
    assert_eq!(expected.len(), 21);
    let out = tempfile::tempdir().unwrap();
    for folder in ["single", "sharded", "legacy"] {
        let target = out.path().join(folder);
        let output = ember(&["import", "torch", &torch_bin(folder).to_string_lossy(), "--out", &target.to_string_lossy()]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(tensors(&target), expected, "{folder}");
        assert!(target.join("config.json").is_file());
        // The converted folder is a model ember loads.
        let inspect = ember(&["inspect", &target.to_string_lossy()]);
        assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    }
    let index = read_json(&out.path().join("sharded/model.safetensors.index.json"));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 21);
    assert_eq!(std::fs::read_dir(out.path().join("sharded")).unwrap().count(), 6, "4 shards, the index and config.json");
}

#[test]
fn views_parameters_and_dtypes_keep_their_values() {
    let expected = read_json(&torch_bin("views.json"));
    for file in ["views.bin", "legacy_views.bin"] {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("in");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(torch_bin(file), folder.join("pytorch_model.bin")).unwrap();
        let out = dir.path().join("out");
        let output = ember(&["import", "torch", &folder.to_string_lossy(), "--out", &out.to_string_lossy()]);
        assert!(output.status.success(), "{file}: {}", String::from_utf8_lossy(&output.stderr));
        let converted = tensors(&out);
        assert_eq!(converted.len(), 5, "{file}");
        check_views(&converted, &expected);
    }
}

fn check_views(converted: &[(String, String, Vec<usize>, Vec<u8>)], expected: &serde_json::Value) {
    for (name, dtype, shape, bytes) in converted {
        let want = &expected[name];
        assert_eq!(*shape, want["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect::<Vec<_>>(), "{name}");
        let values: Vec<f64> = match dtype.as_str() {
            "F32" => bytes.chunks(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).collect(),
            "BF16" => bytes.chunks(2).map(|b| f64::from(f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))).collect(),
            "I64" => bytes.chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            other => panic!("{name}: {other}"),
        };
        // Every value is an f32 (or narrower) widened to f64; serde_json may round the last bit of
        // the f64 it parses, so compare as f32.
        let want: Vec<f32> = want["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(values.iter().map(|&v| v as f32).collect::<Vec<_>>(), want, "{name} ({dtype})");
    }
}

#[test]
fn hostile_files_are_refused_and_nothing_is_written() {
    let cases = [
        ("os_system.bin", "global 'posix.system' is not allowed"),
        ("zip_bomb.bin", "is compressed"),
        ("truncated.bin", "nor a legacy torch.save file"),
        ("lying_storage.bin", "holds 48 bytes, but its header says 24 elements"),
        ("not_a_zip.bin", "nor a legacy torch.save file"),
        ("legacy_os_system.bin", "global 'posix.system' is not allowed"),
        ("legacy_truncated.bin", "truncated"),
        ("legacy_lying_count.bin", "elements, but its header says"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (file, needle) in cases {
        let folder = dir.path().join(file);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(torch_bin(&format!("hostile/{file}")), folder.join("pytorch_model.bin")).unwrap();
        std::fs::write(folder.join("config.json"), "{}").unwrap();
        let out = dir.path().join(format!("{file}.out"));
        assert_bad_input(&ember(&["import", "torch", &folder.to_string_lossy(), "--out", &out.to_string_lossy()]), &["pytorch_model.bin", needle]);
        assert!(!out.exists(), "{file}: output written");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
        assert!(leftovers.is_empty(), "{file}: temporaries left: {leftovers:?}");
    }
    assert!(!Path::new("/tmp/ember-pwned").exists(), "the pickle's code ran");
    // A folder without weights names what is missing.
    assert_bad_input(&ember(&["import", "torch", &dir.path().to_string_lossy(), "--out", "/tmp/never"]), &["pytorch_model.bin"]);
}
