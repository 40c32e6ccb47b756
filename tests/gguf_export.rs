//! `ember export gguf` / `gguf-lora` on the tiny fixtures: the round trip through ember's own
//! GGUF reader, the quantized types' error, the LoRA layout, and what is refused. llama.cpp
//! itself checks the files in scripts/verify-llamacpp.sh.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_bad_input, ember, f32_tensors, repository};
use ember_models::gguf::GgufFile;
use safetensors::SafeTensors;

fn fixture(path: &str) -> PathBuf {
    repository().join("tests/fixtures").join(path)
}

/// `ember import gguf` of `gguf` into `back` gives every tensor of `original` back within
/// `tolerance` × its largest value (a quantized block's step is at most that).
fn assert_imports_within(gguf: &Path, back: &Path, original: &[(String, Vec<f32>)], tolerance: f32, what: &str) {
    let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let imported = f32_tensors(&back.join("model.safetensors"));
    assert_eq!(imported.len(), original.len(), "{what}");
    for ((name, a), (_, b)) in original.iter().zip(&imported) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= tolerance * scale, "{what} {name}: max |diff| {worst} > {tolerance} x {scale}");
    }
}

/// The K-quant fixture imported as an f32 folder under `dir`: a one-layer LLaMA 256 wide, whose
/// rows fill whole super-blocks.
fn wide_tiny_llama(dir: &Path) -> PathBuf {
    let wide = dir.join("wide");
    let kquants = fixture("ggml_quants/tiny_llama_kquants.gguf");
    let output = ember(&["import", "gguf", kquants.to_str().unwrap(), "--out", wide.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wide
}

fn export(args: &[&str]) {
    let output = ember(&[&["export"], args].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn f32_round_trips_bit_for_bit_and_quantized_types_stay_within_their_step() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_llama");
    let original = f32_tensors(&base.join("model.safetensors"));
    for (ty, tolerance) in [("f32", 0.0f32), ("f16", 1.0 / 1024.0), ("q8_0", 1.0 / 127.0), ("q4_0", 1.0 / 7.0)] {
        let gguf = dir.path().join(format!("{ty}.gguf"));
        // tiny_llama's trained BPE is not one llama.cpp knows by its hash: name the pre-tokenizer.
        export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", ty, "--pre", "gpt-2"]);
        let file = GgufFile::open(&gguf).unwrap();
        assert_eq!(file.metadata.get("general.architecture").unwrap(), "llama");
        assert_eq!(file.metadata.get("tokenizer.ggml.pre").unwrap(), "gpt-2");
        let back = dir.path().join(format!("imported-{ty}"));
        assert_imports_within(&gguf, &back, &original, tolerance, ty);
        // The tokenizer comes back too: same ids for the fixture's texts.
        let theirs = ember_data::Tokenizer::from_dir(&back).unwrap();
        let ours = ember_data::Tokenizer::from_dir(&base).unwrap();
        for text in ["Give three tips for staying healthy.", "你好，世界", "Hello"] {
            assert_eq!(theirs.encode(text, false).unwrap(), ours.encode(text, false).unwrap(), "{ty}: {text}");
        }
    }
}

/// llama-quantize's mixtures: each tensor gets the type llama.cpp gives it, and its blocks
/// come back (`ember import gguf`) within their steps. The K-quant fixture imported as f32 is 256
/// wide, so its rows fill whole super-blocks; tiny_llama's 64 and 176 fall back.
#[test]
fn k_quant_mixtures_choose_llama_cpps_types_and_decode_within_their_steps() {
    use ember_models::gguf::GgmlType::{self, F16, F32, IQ3_S, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};
    let dir = tempfile::tempdir().unwrap();
    let wide = wide_tiny_llama(dir.path());
    // One layer: llama.cpp's use_more_bits picks it (it is in the last eighth).
    let wide_q4_k_m: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", Q4_K), ("blk.0.attn_v.weight", Q6_K), ("blk.0.ffn_down.weight", Q6_K),
        ("blk.0.ffn_up.weight", Q4_K), ("token_embd.weight", Q4_K), ("output.weight", Q6_K), ("blk.0.attn_norm.weight", F32)];
    let wide_q5_k_m: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", Q5_K), ("blk.0.attn_v.weight", Q6_K), ("blk.0.ffn_down.weight", Q6_K),
        ("token_embd.weight", Q5_K), ("output.weight", Q6_K)];
    let wide_q4_k_s: &[(&str, GgmlType)] = &[("blk.0.attn_v.weight", Q5_K), ("blk.0.ffn_down.weight", Q4_K), ("output.weight", Q6_K)];
    let wide_q3_k_m: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", Q3_K), ("blk.0.attn_output.weight", Q4_K), ("blk.0.attn_v.weight", Q5_K),
        ("blk.0.ffn_down.weight", Q4_K), ("output.weight", Q6_K)];
    let wide_q3_k_l: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", Q3_K), ("blk.0.attn_output.weight", Q5_K), ("blk.0.attn_v.weight", Q5_K),
        ("blk.0.ffn_down.weight", Q5_K), ("output.weight", Q6_K)];
    // Q2_K: Q3_K for attn_v (the fixture has 2 query heads per KV head), ffn_down and attn_output.
    let wide_q2_k: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", Q2_K), ("blk.0.attn_output.weight", Q3_K), ("blk.0.attn_v.weight", Q3_K),
        ("blk.0.ffn_down.weight", Q3_K), ("token_embd.weight", Q2_K), ("output.weight", Q6_K)];
    // IQ4_XS: Q5_K would go to ffn_down in the first eighth of the layers, none of one layer.
    let wide_iq4_xs: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", IQ4_XS), ("blk.0.attn_v.weight", IQ4_XS), ("blk.0.ffn_down.weight", IQ4_XS),
        ("token_embd.weight", IQ4_XS), ("output.weight", Q6_K)];
    let wide_q6_k: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", Q6_K), ("blk.0.ffn_up.weight", Q6_K), ("token_embd.weight", Q6_K), ("output.weight", Q6_K)];
    // 64 columns: Q4_K -> Q5_0, the output Q8_0; down_proj's 176 are not whole 32-value blocks.
    let narrow_q4_k_m: &[(&str, GgmlType)] = &[("blk.1.attn_q.weight", Q5_0), ("blk.1.attn_v.weight", Q8_0), ("blk.1.ffn_down.weight", F16),
        ("token_embd.weight", Q5_0), ("output.weight", Q8_0)];
    let narrow_q5_k_m: &[(&str, GgmlType)] = &[("blk.0.attn_v.weight", Q5_1), ("blk.1.attn_v.weight", Q8_0), ("output.weight", Q8_0)];
    // Q4_0 gives the output Q6_K as llama-quantize does (Q8_0 for rows of 64).
    let narrow_q4_0: &[(&str, GgmlType)] = &[("blk.0.attn_v.weight", Q4_0), ("token_embd.weight", Q4_0), ("output.weight", Q8_0)];
    // IQ4_NL's 32-value blocks fit rows of 64; Q2_K falls back to Q4_0.
    let narrow_iq4_nl: &[(&str, GgmlType)] = &[("blk.1.attn_q.weight", IQ4_NL), ("blk.1.ffn_down.weight", F16), ("output.weight", Q8_0)];
    let narrow_q2_k: &[(&str, GgmlType)] = &[("blk.1.attn_q.weight", Q4_0), ("blk.1.attn_v.weight", Q4_0), ("output.weight", Q8_0)];
    // IQ3_M: IQ3_S, with Q4_K for attn_v and attn_output.
    let wide_iq3_m: &[(&str, GgmlType)] = &[("blk.0.attn_q.weight", IQ3_S), ("blk.0.attn_v.weight", Q4_K), ("blk.0.attn_output.weight", Q4_K),
        ("blk.0.ffn_down.weight", IQ3_S), ("token_embd.weight", IQ3_S), ("output.weight", Q6_K)];
    let narrow_iq3_s: &[(&str, GgmlType)] = &[("blk.1.attn_q.weight", IQ4_NL), ("blk.1.ffn_down.weight", F16), ("output.weight", Q8_0)];
    let narrow = fixture("tiny_llama");
    for (base, ty, file_type, expected, tolerance) in
        [(&wide, "q4_k_m", 15, wide_q4_k_m, 0.12f32), (&wide, "q4_k_s", 14, wide_q4_k_s, 0.12), (&wide, "q3_k_m", 12, wide_q3_k_m, 0.3), (&wide, "q5_k_m", 17, wide_q5_k_m, 0.06), (&wide, "q6_k", 18, wide_q6_k, 0.03),
         (&wide, "q3_k_l", 13, wide_q3_k_l, 0.3), (&wide, "q2_k", 10, wide_q2_k, 0.5), (&wide, "iq4_xs", 30, wide_iq4_xs, 0.15), (&wide, "iq3_m", 27, wide_iq3_m, 0.35), (&narrow, "iq3_s", 26, narrow_iq3_s, 0.12),
         (&narrow, "q4_k_m", 15, narrow_q4_k_m, 0.07), (&narrow, "q5_k_m", 17, narrow_q5_k_m, 0.04), (&narrow, "q4_0", 2, narrow_q4_0, 1.0 / 7.0),
         (&narrow, "iq4_nl", 25, narrow_iq4_nl, 0.12), (&narrow, "q2_k", 10, narrow_q2_k, 1.0 / 7.0)]
    {
        let gguf = dir.path().join(format!("{ty}.gguf"));
        export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", ty, "--pre", "gpt-2"]);
        let file = GgufFile::open(&gguf).unwrap();
        assert_eq!(file.metadata.get("general.file_type").unwrap(), file_type, "{ty}");
        for (name, kind) in expected {
            assert_eq!(file.tensor(name).unwrap_or_else(|| panic!("{name}")).ggml_type, *kind, "{ty} {name}");
        }
        let back = dir.path().join(format!("imported-{ty}"));
        assert_imports_within(&gguf, &back, &f32_tensors(&base.join("model.safetensors")), tolerance, ty);
    }
}

/// llama.cpp's legacy importance-matrix file: per entry its name, calls and values.
fn legacy_imatrix(entries: &[(String, Vec<f32>)]) -> Vec<u8> {
    let mut out = (entries.len() as i32).to_le_bytes().to_vec();
    for (name, values) in entries {
        out.extend((name.len() as i32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(1i32.to_le_bytes());
        out.extend((values.len() as i32).to_le_bytes());
        values.iter().for_each(|v| out.extend(v.to_le_bytes()));
    }
    out
}

/// `--imatrix`: the quantizers weigh each column by it (the blocks change, and still decode within
/// their steps), the file records it as llama-quantize does, and a matrix of another model is one
/// error line with no file written.
#[test]
fn an_importance_matrix_weighs_the_quantization() {
    let dir = tempfile::tempdir().unwrap();
    let wide = wide_tiny_llama(dir.path());
    let export_to = |name: &str, extra: &[&str]| {
        let path = dir.path().join(name);
        export(&[&["gguf", "--base", wide.to_str().unwrap(), "--out", path.to_str().unwrap(), "--type", "q4_k_m", "--pre", "gpt-2"], extra].concat());
        path
    };
    let plain = GgufFile::open(&export_to("plain.gguf", &[])).unwrap();
    // Every matrix but the embedding, one importance per column, some columns far above the rest.
    let entries: Vec<(String, Vec<f32>)> = plain.tensors.iter()
        .filter(|t| t.shape.len() == 2 && t.name != "token_embd.weight")
        .map(|t| (t.name.clone(), (0..t.shape[1]).map(|i| if i % 5 == 0 { 50.0 } else { 0.5 }).collect()))
        .collect();
    let imatrix = dir.path().join("imatrix.dat");
    std::fs::write(&imatrix, legacy_imatrix(&entries)).unwrap();
    let weighted_path = export_to("weighted.gguf", &["--imatrix", imatrix.to_str().unwrap()]);
    let weighted = GgufFile::open(&weighted_path).unwrap();
    assert_eq!(weighted.metadata.get("quantize.imatrix.file").unwrap(), "imatrix.dat");
    assert_eq!(weighted.metadata.get("quantize.imatrix.entries_count").unwrap().as_u64(), Some(entries.len() as u64));
    let bytes = |file: &GgufFile, name: &str| {
        let t = file.tensor(name).unwrap();
        (t.ggml_type, file.dequantize(t))
    };
    for (name, _) in &entries {
        let (kind, values) = bytes(&weighted, name);
        let (plain_kind, plain_values) = bytes(&plain, name);
        assert_eq!(kind, plain_kind, "{name}");
        assert_ne!(values, plain_values, "{name}: the importance changes the blocks");
    }
    assert_eq!(bytes(&weighted, "token_embd.weight"), bytes(&plain, "token_embd.weight"), "no entry: quantized as without");
    let back = dir.path().join("imported-weighted");
    assert_imports_within(&weighted_path, &back, &f32_tensors(&wide.join("model.safetensors")), 0.12, "q4_k_m with an importance matrix");

    // q2_k_s and the 2-bit lattice types need the matrix, as llama-quantize does: with it, their
    // blocks, decoding within each tensor's range (the matrix favours every fifth column 100 to 1,
    // so the others may be off by that much; byte-equality is verify-llamacpp's (l)); without,
    // one error line.
    use ember_models::gguf::GgmlType;
    for (ty, file_type, attn_q) in [("q2_k_s", 21, GgmlType::Q2_K), ("iq2_xxs", 19, GgmlType::IQ2_XXS), ("iq3_xxs", 23, GgmlType::IQ2_S)] {
        let path = dir.path().join(format!("{ty}.gguf"));
        let base_args = ["export", "gguf", "--base", wide.to_str().unwrap(), "--out", path.to_str().unwrap(), "--type", ty, "--pre", "gpt-2"];
        let output = ember(&[&base_args[..], &["--imatrix", imatrix.to_str().unwrap()]].concat());
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.metadata.get("general.file_type").unwrap().as_u64(), Some(file_type), "{ty}");
        assert_eq!(file.tensor("blk.0.attn_q.weight").unwrap().ggml_type, attn_q, "{ty}");
        let back = dir.path().join(format!("imported-{ty}"));
        assert_imports_within(&path, &back, &f32_tensors(&wide.join("model.safetensors")), 1.0, ty);
        std::fs::remove_file(&path).unwrap();
        assert_bad_input(&ember(&base_args), &[ty, "--imatrix"]);
        assert!(!path.exists());
    }

    // Another model's matrix (rows of another length), and a float type: one error line each.
    let mut foreign = entries.clone();
    foreign[0].1.truncate(3);
    std::fs::write(&imatrix, legacy_imatrix(&foreign)).unwrap();
    let out = dir.path().join("foreign.gguf");
    let args = |ty: &'static str| ["export", "gguf", "--base", wide.to_str().unwrap(), "--out", out.to_str().unwrap(), "--type", ty, "--pre", "gpt-2", "--imatrix", imatrix.to_str().unwrap()].map(str::to_string);
    let run = |ty| ember(&args(ty).iter().map(String::as_str).collect::<Vec<_>>());
    assert_bad_input(&run("q4_k_m"), &["imatrix.dat", &foreign[0].0, "3 values"]);
    assert!(!out.exists());
    assert_bad_input(&run("f16"), &["--imatrix", "quantized types"]);
}

#[test]
fn lora_adapter_keeps_peft_shapes_with_q_k_rows_permuted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora.gguf");
    let adapter = fixture("tiny_llama/adapters/lora");
    export(&["gguf-lora", "--base", fixture("tiny_llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.metadata.get("general.type").unwrap(), "adapter");
    assert_eq!(file.metadata.get("adapter.type").unwrap(), "lora");
    assert_eq!(file.metadata.get("adapter.lora.alpha").unwrap().as_f64(), Some(16.0));
    // r = 8 on q/k/v/o of 2 layers: 8 modules, A and B each.
    assert_eq!(file.tensors.len(), 16);
    let peft = f32_tensors(&adapter.join("adapter_model.safetensors"));
    let get = |name: &str| file.dequantize(file.tensor(name).unwrap_or_else(|| panic!("{name}")));
    let peft_of = |key: &str| peft.iter().find(|(k, _)| k == key).unwrap().1.clone();
    assert_eq!(get("blk.0.attn_v.weight.lora_b"), peft_of("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"));
    assert_eq!(get("blk.1.attn_q.weight.lora_a"), peft_of("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"));
    // q's B rows in llama.cpp's interleaved order: not PEFT's, but the same rows.
    let (q, q_peft) = (get("blk.0.attn_q.weight.lora_b"), peft_of("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"));
    assert_ne!(q, q_peft);
    let sorted = |mut v: Vec<f32>| {
        v.sort_by(f32::total_cmp);
        v
    };
    assert_eq!(sorted(q), sorted(q_peft));
}

/// llama.cpp scales a tensor by one alpha over its own rank: a module whose alpha PEFT's
/// `alpha_pattern` changes carries the ratio in its B.
#[test]
fn an_alpha_pattern_goes_into_the_module_b() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("lora");
    std::fs::create_dir(&adapter).unwrap();
    let original = fixture("tiny_llama/adapters/lora");
    std::fs::copy(original.join("adapter_model.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(original.join("adapter_config.json")).unwrap()).unwrap();
    config["alpha_pattern"] = serde_json::json!({ "layers.1.self_attn.v_proj": 48 });
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    let out = dir.path().join("lora.gguf");
    export(&["gguf-lora", "--base", fixture("tiny_llama").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let file = GgufFile::open(&out).unwrap();
    assert_eq!(file.metadata.get("adapter.lora.alpha").unwrap().as_f64(), Some(16.0));
    let peft = f32_tensors(&adapter.join("adapter_model.safetensors"));
    let get = |name: &str| file.dequantize(file.tensor(name).unwrap_or_else(|| panic!("{name}")));
    let peft_of = |key: &str| peft.iter().find(|(k, _)| k == key).unwrap().1.clone();
    let v = |layer: usize| format!("base_model.model.model.layers.{layer}.self_attn.v_proj.lora_B.weight");
    assert_eq!(get("blk.0.attn_v.weight.lora_b"), peft_of(&v(0)));
    let tripled: Vec<f32> = peft_of(&v(1)).iter().map(|b| b * 3.0).collect();
    assert_eq!(get("blk.1.attn_v.weight.lora_b"), tripled);
}

/// tiny_llama in `dir` with its config edited and `extra` f32 tensors added.
fn tiny_llama_variant(dir: &Path, edit: impl FnOnce(&mut serde_json::Value), extra: Vec<(String, Vec<usize>, Vec<f32>)>) {
    let base = fixture("tiny_llama");
    for file in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        std::fs::copy(base.join(file), dir.join(file)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    for (name, view) in SafeTensors::deserialize(&bytes).unwrap().tensors() {
        tensors.push((name, view.shape().to_vec(), view.data().to_vec()));
    }
    tensors.extend(extra.into_iter().map(|(name, shape, values)| (name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// tiny_llama as a Qwen2 model in `dir`: `model_type` qwen2 and seeded q/k/v biases.
fn tiny_qwen2(dir: &Path) {
    let mut biases = Vec::new();
    for layer in 0..2 {
        for (proj, width) in [("q", 64), ("k", 32), ("v", 32)] {
            let bias = (0..width).map(|i| ((i * 7 + layer * 3) % 11) as f32 * 0.01 - 0.05).collect();
            biases.push((format!("model.layers.{layer}.self_attn.{proj}_proj.bias"), vec![width], bias));
        }
    }
    let edit = |config: &mut serde_json::Value| {
        config["model_type"] = "qwen2".into();
        config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    };
    tiny_llama_variant(dir, edit, biases);
}

/// `ember generate`'s last-position logits and answer on a raw prompt (`--pre gpt-2` splits
/// newlines unlike tiny_llama's trained BPE), as the JSON it writes.
fn raw_answer(model: &Path, out: &Path) -> String {
    let args = ["generate", "--base", model.to_str().unwrap(), "--prompt", "Give three tips for staying healthy.", "--template", "none", "--max-new-tokens", "3", "--logits-out", out.to_str().unwrap()];
    let output = ember(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    std::fs::read_to_string(out).unwrap()
}

/// RoPE scaling goes out as llama.cpp's converter writes it (linear: metadata keys; llama3: the
/// `rope_freqs` tensor of per-frequency divisors) and comes back as the same `rope_scaling`; the
/// GGUF as a base gives the folder's logits. Divisors that are not Llama 3's are refused.
#[test]
fn rope_scaling_round_trips_through_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let linear = serde_json::json!({"rope_type": "linear", "factor": 2.0});
    let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128});
    for (name, scaling) in [("llama3", llama3), ("linear", linear), ("yarn", yarn)] {
        let base = dir.path().join(name);
        std::fs::create_dir(&base).unwrap();
        tiny_llama_variant(&base, |config| config["rope_scaling"] = scaling.clone(), vec![]);
        let gguf = dir.path().join(format!("{name}.gguf"));
        export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "gpt-2"]);
        let file = GgufFile::open(&gguf).unwrap();
        let config = ember_models::ModelConfig::from_dir(&base).unwrap();
        match name {
            "llama3" => {
                let divisors = config.rope.scaling.as_ref().unwrap().llama3_divisors(config.rope.theta, config.rope.rotary_dim).unwrap();
                // head_dim 16, theta 1e4: short, blended and long wavelengths all occur.
                assert!(divisors.contains(&1.0) && divisors.contains(&8.0) && divisors.iter().any(|&d| d > 1.0 && d < 8.0), "{divisors:?}");
                assert_eq!(file.dequantize(file.tensor("rope_freqs.weight").unwrap()), divisors);
            }
            "yarn" => {
                assert_eq!(file.metadata.get("llama.rope.scaling.type").unwrap(), "yarn");
                assert_eq!(file.metadata.get("llama.rope.scaling.factor").unwrap().as_f64(), Some(4.0));
                assert_eq!(file.metadata.get("llama.rope.scaling.original_context_length").unwrap().as_u64(), Some(128));
                // transformers' default attention factor is llama.cpp's own: no attn_factor key.
                assert!(file.metadata.get("llama.rope.scaling.attn_factor").is_none());
            }
            _ => {
                assert_eq!(file.metadata.get("llama.rope.scaling.type").unwrap(), "linear");
                assert_eq!(file.metadata.get("llama.rope.scaling.factor").unwrap().as_f64(), Some(2.0));
            }
        }
        let back = dir.path().join(format!("imported-{name}"));
        let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(ember_models::ModelConfig::from_dir(&back).unwrap().rope, config.rope, "{name}");
        assert_eq!(raw_answer(&gguf, &dir.path().join(format!("{name}-gguf.json"))), raw_answer(&base, &dir.path().join(format!("{name}-folder.json"))), "{name}");
    }

    // A YaRN attention factor of the config's own goes out as llama.cpp's extra factor and comes
    // back; betas llama.cpp would not use are refused.
    let yarn = dir.path().join("yarn-attention");
    std::fs::create_dir(&yarn).unwrap();
    let scaling = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "attention_factor": 1.3});
    tiny_llama_variant(&yarn, |config| config["rope_scaling"] = scaling, vec![]);
    let gguf = dir.path().join("yarn-attention.gguf");
    export(&["gguf", "--base", yarn.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "gpt-2"]);
    let extra = GgufFile::open(&gguf).unwrap().metadata.get("llama.rope.scaling.attn_factor").unwrap().as_f64().unwrap();
    assert!((extra - 1.3 / (0.1 * 4f64.ln() + 1.0)).abs() < 1e-6, "{extra}");
    let back = dir.path().join("imported-yarn-attention");
    let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let attention = ember_models::ModelConfig::from_dir(&back).unwrap().rope.scaling.unwrap().attention_scaling();
    assert!((attention - 1.3).abs() < 1e-6, "{attention}");
    let betas = dir.path().join("yarn-betas");
    std::fs::create_dir(&betas).unwrap();
    let scaling = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 16});
    tiny_llama_variant(&betas, |config| config["rope_scaling"] = scaling, vec![]);
    let out = dir.path().join("betas.gguf");
    assert_bad_input(&ember(&["export", "gguf", "--base", betas.to_str().unwrap(), "--out", out.to_str().unwrap()]), &["rope_scaling", "betas"]);
    assert!(!out.exists());

    // Divisors no Llama 3 scaling gives: one error line naming the tensor, no folder.
    let gguf = dir.path().join("llama3.gguf");
    let mut bytes = std::fs::read(&gguf).unwrap();
    let file = GgufFile::open(&gguf).unwrap();
    let divisors = file.data(file.tensor("rope_freqs.weight").unwrap());
    let at = bytes.windows(divisors.len()).position(|w| w == divisors).unwrap();
    drop(file);
    bytes[at..at + 4].copy_from_slice(&3.0f32.to_le_bytes());
    let odd = dir.path().join("odd.gguf");
    std::fs::write(&odd, bytes).unwrap();
    let out = dir.path().join("imported-odd");
    assert_bad_input(&ember(&["import", "gguf", odd.to_str().unwrap(), "--out", out.to_str().unwrap()]), &["rope_freqs.weight", "not supported"]);
    assert!(!out.exists());
}

/// `base` exported f32 under `dir` as llama.cpp's `arch`: the file, after checking that `ember import
/// gguf` gives every tensor back bit for bit and that the file as a base gives the folder's
/// logits; and the folder's tensors.
fn f32_round_trip(base: &Path, dir: &Path, arch: &str) -> (GgufFile, Vec<(String, Vec<f32>)>) {
    let gguf = dir.join(format!("{arch}.gguf"));
    export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "gpt-2"]);
    let file = GgufFile::open(&gguf).unwrap();
    assert_eq!(file.metadata.get("general.architecture").unwrap(), arch);
    let original = f32_tensors(&base.join("model.safetensors"));
    let back = dir.join("imported");
    let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(f32_tensors(&back.join("model.safetensors")), original);
    assert_eq!(raw_answer(&gguf, &dir.join("gguf.json")), raw_answer(base, &dir.join("folder.json")));
    (file, original)
}

/// Qwen3 goes out as llama.cpp's `qwen3`: rows in HF order, the per-head norms as
/// `attn_q_norm`/`attn_k_norm`, head_dim (32) other than hidden / heads as the key length; it
/// comes back bit for bit, and as a base gives the folder's logits.
#[test]
fn qwen3_exports_as_llama_cpps_qwen3_with_its_head_norms() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_qwen3");
    let (file, original) = f32_round_trip(&base, dir.path(), "qwen3");
    assert_eq!(file.metadata.get("qwen3.attention.key_length").unwrap().as_u64(), Some(32));
    let hf = |key: &str| original.iter().find(|(k, _)| k == key).unwrap().1.clone();
    assert_eq!(file.dequantize(file.tensor("blk.1.attn_k_norm.weight").unwrap()), hf("model.layers.1.self_attn.k_norm.weight"));
    assert_eq!(file.dequantize(file.tensor("blk.0.attn_q.weight").unwrap()), hf("model.layers.0.self_attn.q_proj.weight"));
    let lora = dir.path().join("lora.gguf");
    export(&["gguf-lora", "--base", base.to_str().unwrap(), "--adapter", base.join("adapters/lora").to_str().unwrap(), "--out", lora.to_str().unwrap()]);
    assert_eq!(GgufFile::open(&lora).unwrap().metadata.get("general.architecture").unwrap(), "qwen3");
}

/// LoRA on the embedding and the LM head goes out as llama.cpp's converter writes it: the head's
/// as any projection's on `output.weight`, the embedding's on `token_embd.weight` with
/// `lora_a` PEFT's `lora_embedding_A` transposed (`[vocab, r]`, rows picked by token id) and
/// `lora_b` its `lora_embedding_B` (`[hidden, r]`).
#[test]
fn lora_on_the_embedding_and_head_goes_out_as_llama_cpps_converter_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixture("tiny_mistral/adapters/lora_vocab");
    let lora = dir.path().join("lora.gguf");
    export(&["gguf-lora", "--base", fixture("tiny_mistral").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", lora.to_str().unwrap()]);
    let file = GgufFile::open(&lora).unwrap();
    let peft = f32_tensors(&adapter.join("adapter_model.safetensors"));
    let tensor = |key: &str| peft.iter().find(|(k, _)| k == key).unwrap().1.clone();
    let a = tensor("base_model.model.model.embed_tokens.lora_embedding_A");
    let vocab = a.len() / 4;
    let transposed: Vec<f32> = (0..vocab * 4).map(|i| a[(i % 4) * vocab + i / 4]).collect();
    assert_eq!(file.dequantize(file.tensor("token_embd.weight.lora_a").unwrap()), transposed);
    assert_eq!(file.dequantize(file.tensor("token_embd.weight.lora_b").unwrap()), tensor("base_model.model.model.embed_tokens.lora_embedding_B"));
    assert_eq!(file.dequantize(file.tensor("output.weight.lora_b").unwrap()), tensor("base_model.model.lm_head.lora_B.weight"));
    assert_eq!(file.tensor("output.weight.lora_a").unwrap().shape, [4, 64]);
}

/// llama.cpp's llama has no sliding window: Mistral goes out as llama declaring its window (6
/// tokens here, not 512) as the context, within which both attend alike.
#[test]
fn a_sliding_window_bounds_the_declared_context() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("mistral.gguf");
    export(&["gguf", "--base", fixture("tiny_mistral").to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "gpt-2"]);
    let file = GgufFile::open(&gguf).unwrap();
    assert_eq!(file.metadata.get("general.architecture").unwrap(), "llama");
    assert_eq!(file.metadata.get("llama.context_length").unwrap().as_u64(), Some(6));
}

/// Qwen2 goes out as llama.cpp's `qwen2` (its NEOX RoPE is HF's rotate_half: q/k rows stay in HF
/// order, biases included) and comes back bit for bit; as a base it gives the folder's logits.
#[test]
fn qwen2_exports_as_llama_cpps_qwen2_with_rows_in_hf_order() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tiny_qwen2");
    std::fs::create_dir(&base).unwrap();
    tiny_qwen2(&base);
    let (file, original) = f32_round_trip(&base, dir.path(), "qwen2");
    assert_eq!(file.metadata.get("qwen2.block_count").unwrap().as_u64(), Some(2));
    let hf = |key: &str| original.iter().find(|(k, _)| k == key).unwrap().1.clone();
    assert_eq!(file.dequantize(file.tensor("blk.0.attn_q.weight").unwrap()), hf("model.layers.0.self_attn.q_proj.weight"));
    assert_eq!(file.dequantize(file.tensor("blk.1.attn_k.bias").unwrap()), hf("model.layers.1.self_attn.k_proj.bias"));

    // The LoRA GGUF: qwen2, B rows as PEFT's.
    let lora = dir.path().join("lora.gguf");
    let adapter = fixture("tiny_llama/adapters/lora");
    export(&["gguf-lora", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", lora.to_str().unwrap()]);
    let file = GgufFile::open(&lora).unwrap();
    assert_eq!(file.metadata.get("general.architecture").unwrap(), "qwen2");
    let peft = f32_tensors(&adapter.join("adapter_model.safetensors"));
    let q_peft = peft.iter().find(|(k, _)| k == "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").unwrap().1.clone();
    assert_eq!(file.dequantize(file.tensor("blk.0.attn_q.weight.lora_b").unwrap()), q_peft);
}

/// GLM's two layouts go out as llama.cpp's `chatglm`: HF-native `glm` with separate q/k/v,
/// ChatGLM's fused `query_key_value` as `attn_qkv`; both with rows in HF order (llama.cpp's
/// `chatglm` RoPE pairs neighbours, as GLM does), the fused `[gate | up]` as `ffn_up`, and RoPE
/// over the rotary part of each head only. GLM-4-0414 goes out the same way as llama.cpp's
/// `glm4`, its output norms as `post_attention_norm` and `post_ffw_norm`. They come back in
/// their own layout (`import gguf`, and as a base), and LoRA on the fused projections keeps
/// PEFT's B rows.
#[test]
fn glm_family_exports_as_llama_cpps_chatglm() {
    let dir = tempfile::tempdir().unwrap();
    for (name, arch, q, q_hf) in [
        ("tiny_glm", "chatglm", "blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
        ("tiny_chatglm", "chatglm", "blk.1.attn_qkv.weight", "transformer.encoder.layers.1.self_attention.query_key_value.weight"),
        ("tiny_glm4", "glm4", "blk.1.post_ffw_norm.weight", "model.layers.1.post_mlp_layernorm.weight"),
    ] {
        let base = fixture(name);
        let gguf = dir.path().join(format!("{name}.gguf"));
        // The fixtures' trained BPEs are not ones llama.cpp knows by their hash.
        export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "gpt-2"]);
        let file = GgufFile::open(&gguf).unwrap();
        let meta = |key: &str| file.metadata.get(key).unwrap().clone();
        assert_eq!(meta("general.architecture"), arch);
        assert_eq!(meta(&format!("{arch}.rope.dimension_count")), 8, "{name}: half of each 16-value head");
        assert_eq!(meta(&format!("{arch}.attention.head_count_kv")), 2);
        assert_eq!(meta("tokenizer.ggml.add_bos_token"), false);
        let original = f32_tensors(&base.join("model.safetensors"));
        let hf = |key: &str| original.iter().find(|(k, _)| k == key).unwrap().1.clone();
        assert_eq!(file.dequantize(file.tensor(q).unwrap()), hf(q_hf), "{name}");
        let up = file.tensor("blk.0.ffn_up.weight").unwrap();
        assert_eq!(up.shape, [256, 64], "{name}: [gate | up] as one tensor");
        assert!(file.tensor("blk.0.ffn_gate.weight").is_none());

        // Back in the checkpoint's layout: the same tensors (ChatGLM's `rotary_pos_emb.inv_freq`
        // is recomputed), the same config, the same logits from the folder and from the GGUF.
        let back = dir.path().join(format!("imported-{name}"));
        let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        let kept: Vec<_> = original.iter().filter(|(k, _)| !k.ends_with("inv_freq")).cloned().collect();
        assert_eq!(f32_tensors(&back.join("model.safetensors")), kept, "{name}");
        // The same config but for the RMS epsilon, stored as f32, and the end-of-text ids: the
        // GGUF keeps the end of text and llama.cpp's end of turn, `<|user|>`.
        let (back_config, config) = (ember_models::ModelConfig::from_dir(&back).unwrap(), ember_models::ModelConfig::from_dir(&base).unwrap());
        assert_eq!(back_config.rms_norm_eps, config.rms_norm_eps as f32 as f64, "{name}");
        let user = ember_data::Tokenizer::from_dir(&base).unwrap().token_to_id("<|user|>").unwrap();
        assert_eq!(back_config.eos_token_ids, [config.eos_token_ids[0], user], "{name}");
        let comparable = |c: &ember_models::ModelConfig| ember_models::ModelConfig { rms_norm_eps: 0.0, eos_token_ids: Vec::new(), ..c.clone() };
        assert_eq!(comparable(&back_config), comparable(&config), "{name}");
        let answer = |model: &Path, tag: &str| raw_answer(model, &dir.path().join(format!("{name}-{tag}.json")));
        let expected = answer(&base, "folder");
        assert_eq!(answer(&gguf, "gguf"), expected, "{name}: the GGUF as a base");
        assert_eq!(answer(&back, "imported"), expected, "{name}: the imported folder");
    }
    let lora = dir.path().join("glm4-lora.gguf");
    export(&["gguf-lora", "--base", fixture("tiny_glm4").to_str().unwrap(), "--adapter", fixture("tiny_glm4/adapters/lora").to_str().unwrap(), "--out", lora.to_str().unwrap()]);
    assert_eq!(GgufFile::open(&lora).unwrap().metadata.get("general.architecture").unwrap(), "glm4");
    let lora = dir.path().join("chatglm-lora.gguf");
    let adapter = fixture("tiny_chatglm/adapters/lora");
    export(&["gguf-lora", "--base", fixture("tiny_chatglm").to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", lora.to_str().unwrap()]);
    let file = GgufFile::open(&lora).unwrap();
    assert_eq!(file.metadata.get("general.architecture").unwrap(), "chatglm");
    let peft = f32_tensors(&adapter.join("adapter_model.safetensors"));
    let b = peft.iter().find(|(k, _)| k.ends_with("layers.0.self_attention.query_key_value.lora_B.weight")).unwrap().1.clone();
    assert_eq!(file.dequantize(file.tensor("blk.0.attn_qkv.weight.lora_b").unwrap()), b);
}

/// A ChatGLM folder's `tokenizer.model` goes out as llama.cpp's converter writes it: the
/// SentencePiece pieces (ids 0-2 named `<unk>`, `<bos>`, `<eos>`), THUDM's nine specials after
/// them as control tokens, padding to the embedding's rows, and no BOS added. It comes back as
/// ChatGLM3's tokenizer: `[gMASK] sop` before every text, the same ids.
#[test]
fn chatglm_sentencepiece_vocabulary_goes_out_as_llama_cpps_converter_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("chatglm-sp");
    std::fs::create_dir(&model).unwrap();
    with_sentencepiece("tiny_chatglm", &model, 2048, "padded_vocab_size", ["transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"]);
    let gguf = dir.path().join("chatglm-sp.gguf");
    export(&["gguf", "--base", model.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32"]);
    let file = GgufFile::open(&gguf).unwrap();
    let meta = |key: &str| file.metadata.get(key).unwrap().clone();
    assert_eq!(meta("tokenizer.ggml.model"), "llama");
    assert_eq!(meta("tokenizer.ggml.pre"), "chatglm-spm");
    assert_eq!(meta("tokenizer.ggml.add_bos_token"), false);
    let tokens = meta("tokenizer.ggml.tokens");
    let types = meta("tokenizer.ggml.token_type");
    assert_eq!(tokens.as_array().unwrap().len(), 2048);
    assert_eq!(tokens.as_array().unwrap()[..3], ["<unk>", "<bos>", "<eos>"].map(serde_json::Value::from));
    assert_eq!((&types[0], &types[1]), (&serde_json::json!(2), &serde_json::json!(3)), "unknown, control");
    assert_eq!((&tokens[2001], &types[2001]), (&serde_json::json!("[gMASK]"), &serde_json::json!(3)));
    assert_eq!((&tokens[2008], &types[2008]), (&serde_json::json!("<|observation|>"), &serde_json::json!(3)));
    assert_eq!((&tokens[2009], &types[2009]), (&serde_json::json!("[PAD2009]"), &serde_json::json!(5)));

    let back = dir.path().join("imported");
    let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours = ember_data::Tokenizer::from_dir(&model).unwrap();
    for theirs in [ember_models::load_tokenizer(&gguf).unwrap(), ember_data::Tokenizer::from_dir(&back).unwrap()] {
        for text in ["Give three tips for staying healthy.", "Hello world", "你好"] {
            let ids = theirs.encode(text, true).unwrap();
            assert_eq!(ids[..2], [2001, 2003], "{text}: [gMASK] sop");
            assert_eq!(ids, ours.encode(text, true).unwrap(), "{text}");
        }
    }
}

#[test]
fn what_llama_cpp_cannot_take_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let out = out.to_str().unwrap();
    let llama = fixture("tiny_llama");
    // A tensor llama.cpp has no place for is named, not dropped; RoPE's inverse frequencies are
    // recomputed and left out.
    let extra = dir.path().join("extra");
    std::fs::create_dir(&extra).unwrap();
    let inv_freq = ("model.layers.0.self_attn.rotary_emb.inv_freq".to_string(), vec![8], vec![1.0; 8]);
    tiny_llama_variant(&extra, |_| {}, vec![inv_freq.clone(), ("model.vision_tower.weight".into(), vec![2, 2], vec![0.0; 4])]);
    assert_bad_input(&ember(&["export", "gguf", "--base", extra.to_str().unwrap(), "--out", out, "--pre", "gpt-2"]), &["model.vision_tower.weight", "no place"]);
    tiny_llama_variant(&extra, |_| {}, vec![inv_freq]);
    export(&["gguf", "--base", extra.to_str().unwrap(), "--out", out, "--pre", "gpt-2", "--type", "f32"]);
    assert_eq!(GgufFile::open(Path::new(out)).unwrap().tensors.len(), f32_tensors(&llama.join("model.safetensors")).len());
    std::fs::remove_file(out).unwrap();
    assert_bad_input(
        &ember(&["export", "gguf-lora", "--base", llama.to_str().unwrap(), "--adapter", fixture("tiny_llama/adapters/dora").to_str().unwrap(), "--out", out]),
        &["a dora adapter", "LoRA only"],
    );
    let vocab = fixture("tiny_llama_vocab");
    assert_bad_input(
        &ember(&["export", "gguf-lora", "--base", vocab.to_str().unwrap(), "--adapter", vocab.join("adapters/lora_modules_to_save").to_str().unwrap(), "--out", out]),
        &["modules_to_save"],
    );
    assert_bad_input(&ember(&["export", "gguf", "--base", llama.to_str().unwrap(), "--out", out]), &["--pre"]);
    assert_bad_input(&ember(&["export", "gguf", "--base", llama.to_str().unwrap(), "--out", out, "--type", "q5_k"]), &["--type 'q5_k'", "q4_k_m"]);
    let lora = fixture("tiny_llama/adapters/lora");
    assert_bad_input(
        &ember(&["export", "gguf-lora", "--base", llama.to_str().unwrap(), "--adapter", lora.to_str().unwrap(), "--out", out, "--type", "q4_k_m"]),
        &["--type 'q4_k_m'", "f32, f16, bf16 or q8_0"],
    );
    assert!(!Path::new(out).exists());
}

/// The fixture `base` with a SentencePiece `tokenizer.model` (the repository's sp_bpe, 2,000
/// pieces) and its embedding and head (`vocab_tensors`) grown to `rows` rows.
fn with_sentencepiece(base: &str, dir: &Path, rows: usize, vocab_key: &str, vocab_tensors: [&str; 2]) {
    let base = fixture(base);
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut shape = view.shape().to_vec();
            let mut data = view.data().to_vec();
            if vocab_tensors.contains(&name.as_str()) {
                data.resize(rows * shape[1] * 4, 0);
                shape[0] = rows;
            }
            (name, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config[vocab_key] = rows.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(fixture("tokenizers/sp_bpe/tokenizer.model"), dir.join("tokenizer.model")).unwrap();
}

fn tiny_llama_with_sentencepiece(dir: &Path) {
    with_sentencepiece("tiny_llama", dir, 2000, "vocab_size", ["model.embed_tokens.weight", "lm_head.weight"]);
}

/// A byte-level BPE's pre-tokenizer comes back from `tokenizer.ggml.pre` as HF's: GPT-2's
/// byte-level regex, or the regex splits of Llama 3, Qwen2, Mistral's tekken, DeepSeek's,
/// SmolLM's, BLOOM's, GPT-4o's and the rest of llama.cpp's (digits whole, in runs of up to three,
/// one by one, or in thousands from the right). A name ember does not read is one error line, not
/// GPT-2's split in its place.
#[test]
fn gguf_pre_tokenizer_names_come_back_as_hf_pre_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_llama");
    let tokenizer = ember_data::Tokenizer::from_dir(&base).unwrap();
    let ids = |text: &str| tokenizer.encode(text, false).unwrap();
    let one_by_one = vec!["1", "2", "3", "4", "5"];
    for (pre, digits, ignore_merges) in [
        ("gpt-2", vec!["12345"], false),
        ("llama-bpe", vec!["123", "45"], true),
        ("smaug-bpe", vec!["123", "45"], false),
        ("qwen2", one_by_one.clone(), false),
        ("deepseek-r1-qwen", one_by_one.clone(), false),
        ("tekken", one_by_one.clone(), true),
        ("deepseek-llm", vec!["12345"], false),
        ("deepseek-coder", one_by_one.clone(), false),
        ("smollm", one_by_one.clone(), false),
        ("mpt", vec!["12345"], false),
        ("dbrx", vec!["123", "45"], false),
        ("stablelm2", one_by_one.clone(), false),
        ("bloom", vec!["12345"], false),
        ("viking", one_by_one.clone(), false),
        ("gpt-4o", vec!["123", "45"], false),
        ("jina-de", vec!["12345"], false),
        ("midm-2.0", vec!["123", "45"], true),
        ("glm5", vec!["123", "45"], true),
        ("grok-2", one_by_one.clone(), false),
        ("deepseek-v3", vec!["123", "45"], false),
        ("spark2_5", one_by_one.clone(), false),
        ("youtu", one_by_one.clone(), true),
        ("falcon", vec!["123", "45"], false),
        ("jais-2", vec!["123", "45"], false),
        // Thousands from the right.
        ("tiny_aya", vec!["12", "345"], false),
        ("bailingmoe", one_by_one.clone(), false),
        ("seed-coder", one_by_one.clone(), false),
        ("ufakzeka", one_by_one.clone(), false),
        ("laguna", one_by_one.clone(), false),
        ("exaone-moe", one_by_one.clone(), false),
        ("minicpm5", vec!["123", "45"], true),
    ] {
        let gguf = dir.path().join(format!("{pre}.gguf"));
        export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", pre]);
        let back = dir.path().join(format!("imported-{pre}"));
        let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
        assert!(output.status.success(), "{pre}: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(back.join("tokenizer.json")).unwrap()).unwrap();
        assert_eq!(json["model"]["ignore_merges"], ignore_merges, "{pre}");
        assert_eq!(json["normalizer"]["type"].as_str(), pre.contains("qwen").then_some("NFC"), "{pre}");
        // The digits are split as the pre-tokenizer says, each piece then merged on its own.
        let imported = ember_data::Tokenizer::from_dir(&back).unwrap();
        let expected: Vec<_> = digits.iter().flat_map(|piece| ids(piece)).collect();
        assert_eq!(imported.encode("12345", false).unwrap(), expected, "{pre}");
    }
    let gguf = dir.path().join("chameleon.gguf");
    export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "chameleon"]);
    let out = dir.path().join("imported-chameleon");
    assert_bad_input(&ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()]), &["tokenizer.ggml.pre", "chameleon", "tekken"]);
    assert!(!out.exists());
    // A name llama.cpp splits with its own code: the reason, not the list.
    let gguf = dir.path().join("kimi-k2.gguf");
    export(&["gguf", "--base", base.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32", "--pre", "kimi-k2"]);
    let out = dir.path().join("imported-kimi-k2");
    assert_bad_input(&ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()]), &["tokenizer.ggml.pre", "kimi-k2", "code of its own"]);
    assert!(!out.exists());
}

/// A SentencePiece tokenizer goes into the GGUF as llama.cpp's `llama` model (pieces, scores,
/// types) and comes back, through `ember import gguf` and as a GGUF base, with the same ids (and
/// llama.cpp's around user-defined pieces).
#[test]
fn sentencepiece_tokenizers_round_trip_through_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sp-model");
    std::fs::create_dir(&model).unwrap();
    tiny_llama_with_sentencepiece(&model);
    let gguf = dir.path().join("sp.gguf");
    export(&["gguf", "--base", model.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--type", "f32"]);
    let file = GgufFile::open(&gguf).unwrap();
    assert_eq!(file.metadata.get("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(file.metadata.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().len(), 2000);
    assert_eq!(file.metadata.get("tokenizer.ggml.add_bos_token").unwrap(), true);

    let back = dir.path().join("imported");
    let output = ember(&["import", "gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let ours = ember_data::Tokenizer::from_dir(&model).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("tokenizers/sp_bpe/reference.json")).unwrap()).unwrap();
    // Both encode with sentencepiece's BPE, as tokenizer.model does, except around user-defined
    // pieces (`<tool>` here): the GGUF as a base splits them out first as llama.cpp does, and the
    // imported folder's tokenizer.json is HF's legacy LLaMA conversion, which does the same. Each
    // text after one starts a word: `▁`.
    let as_gguf = ember_models::load_tokenizer(&gguf).unwrap();
    let legacy = ember_data::Tokenizer::from_dir(&back).unwrap();
    let tool = ours.token_to_id("<tool>").unwrap();
    let split: Vec<u32> = std::iter::once(tool).chain(ours.encode("call", false).unwrap()).collect();
    assert_eq!(as_gguf.encode("<tool>call", false).unwrap(), split);
    assert_ne!(ours.encode("<tool>call", false).unwrap(), split, "sentencepiece keeps the piece inside the text");
    for theirs in [&as_gguf, &legacy] {
        for case in reference["sentencepiece"]["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let expected = if text.contains("<tool>") { legacy.encode(text, true).unwrap() } else { ours.encode(text, true).unwrap() };
            assert_eq!(theirs.encode(text, true).unwrap(), expected, "{text:?}");
            let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(theirs.decode(&ids, true).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        }
        assert_eq!((theirs.bos_id, theirs.eos_id), (ours.bos_id, ours.eos_id));
    }
}

/// `ember imatrix` on a text file and on Alpaca records; its matrix is what `export gguf
/// --imatrix` reads, and too little data or too short a chunk is one error line.
#[test]
fn ember_imatrix_feeds_the_quantized_export() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_llama");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let imatrix = |data: &str, extra: &[&str]| {
        let output = ember(&[&["imatrix", "--base", base.to_str().unwrap(), "--data", data, "--out", &path("m.gguf")], extra].concat());
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    std::fs::write(path("calibration.txt"), "The quick brown fox jumps over the lazy dog.\n".repeat(30)).unwrap();
    let text = imatrix(&path("calibration.txt"), &["--ctx", "32"]);
    assert_eq!(text["entries"], 14);
    assert_eq!(text["chunk_size"], 32);
    assert_eq!(imatrix(&path("calibration.txt"), &["--ctx", "32", "--dtype", "bf16", "--process-output"])["entries"], 15);
    let records = repository().join("tests/data/alpaca_en_sample_200.json");
    let records = imatrix(records.to_str().unwrap(), &["--ctx", "64", "--chunks", "3"]);
    assert_eq!((records["chunks"].as_u64(), records["tokens"].as_u64()), (Some(3), Some(192)));

    export(&["gguf", "--base", base.to_str().unwrap(), "--out", &path("q4_0.gguf"), "--type", "q4_0", "--pre", "gpt-2", "--imatrix", &path("m.gguf")]);
    let file = GgufFile::open(Path::new(&path("q4_0.gguf"))).unwrap();
    assert_eq!(file.metadata.get("quantize.imatrix.file").unwrap(), "m.gguf");
    assert_eq!(file.metadata.get("quantize.imatrix.entries_count").unwrap().as_u64(), Some(14));
    assert_eq!(file.metadata.get("quantize.imatrix.chunks_count").unwrap().as_u64(), Some(3));

    std::fs::write(path("short.txt"), "Too short.").unwrap();
    let short = ember(&["imatrix", "--base", base.to_str().unwrap(), "--data", &path("short.txt"), "--out", &path("short.gguf")]);
    assert_bad_input(&short, &["short.txt", "fewer than one chunk of --ctx 512"]);
    let tiny = ember(&["imatrix", "--base", base.to_str().unwrap(), "--data", &path("calibration.txt"), "--out", &path("short.gguf"), "--ctx", "8"]);
    assert_bad_input(&tiny, &["--ctx 8"]);
    assert!(!dir.path().join("short.gguf").exists());
}

/// `--in-file`: earlier matrices added up (sums and tokens), alone or before --data's, as
/// llama-imatrix does; one error line for nothing to do or a matrix of other widths.
#[test]
fn ember_imatrix_adds_up_earlier_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny_llama");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(path("calibration.txt"), "The quick brown fox jumps over the lazy dog.\n".repeat(30)).unwrap();
    let imatrix = |args: &[&str]| {
        let output = ember(&[&["imatrix", "--ctx", "32"], args].concat());
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let data = ["--base", base.to_str().unwrap(), "--data", &path("calibration.txt")];
    imatrix(&[&data[..], &["--chunks", "2", "--out", &path("a.gguf")]].concat());
    imatrix(&[&data[..], &["--chunks", "3", "--out", &path("b.gguf")]].concat());
    let merged = imatrix(&["--in-file", &path("a.gguf"), "--in-file", &path("b.gguf"), "--out", &path("ab.gguf")]);
    assert_eq!((merged["chunks"].as_u64(), merged["entries"].as_u64()), (Some(5), Some(14)));
    // With --data: the first file's sums plus the new chunks', the same as adding both files.
    let continued = imatrix(&[&data[..], &["--chunks", "3", "--in-file", &path("a.gguf"), "--out", &path("a+3.gguf")]].concat());
    assert_eq!((continued["chunks"].as_u64(), continued["new_chunks"].as_u64()), (Some(5), Some(3)));
    let sums = |name: &str| ember_models::imatrix::read_sums(Path::new(&path(name)), 32).unwrap();
    let ((a, _), (b, _), (ab, datasets), (a3, _)) = (sums("a.gguf"), sums("b.gguf"), sums("ab.gguf"), sums("a+3.gguf"));
    assert_eq!(datasets.len(), 2);
    for (name, entry) in &ab {
        assert_eq!(entry.tokens, a[name].tokens + b[name].tokens, "{name}");
        assert_eq!(a3[name].tokens, entry.tokens, "{name}");
        for (i, sum) in entry.sums.iter().enumerate() {
            let expected = a[name].sums[i] + b[name].sums[i];
            assert!((sum - expected).abs() <= 1e-6 * expected.abs().max(1e-6), "{name}[{i}]: {sum} vs {expected}");
            assert!((a3[name].sums[i] - expected).abs() <= 1e-5 * expected.abs().max(1e-6), "{name}[{i}]: {} vs {expected}", a3[name].sums[i]);
        }
    }
    // The legacy layout (--output-format dat) reads back as the same sums over whole chunks.
    imatrix(&["--in-file", &path("a.gguf"), "--in-file", &path("b.gguf"), "--output-format", "dat", "--out", &path("ab.dat")]);
    let (dat, _) = sums("ab.dat");
    for (name, entry) in &ab {
        assert_eq!(dat[name].tokens, entry.tokens, "{name}");
        assert!(dat[name].sums.iter().zip(&entry.sums).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1e-6)), "{name}");
    }
    assert_bad_input(&ember(&["imatrix", "--out", &path("none.gguf")]), &["--data", "--in-file"]);
    assert_bad_input(&ember(&["imatrix", "--data", &path("calibration.txt"), "--out", &path("none.gguf")]), &["--base"]);
    // A matrix of another width for the same name.
    std::fs::write(path("other.dat"), legacy_imatrix(&[("blk.0.attn_q.weight".to_string(), vec![1.0; 3])])).unwrap();
    let other = ember(&["imatrix", "--in-file", &path("a.gguf"), "--in-file", &path("other.dat"), "--out", &path("none.gguf")]);
    assert_bad_input(&other, &["other.dat", "blk.0.attn_q.weight", "3 columns"]);
    assert!(!dir.path().join("none.gguf").exists());
}

/// A recipe's `[export]`: after training, the merged folder, an importance matrix of the
/// training examples and the GGUF files, the same bytes `ember export gguf` writes from the run's
/// adapter; a tokenizer llama.cpp would not know fails before training.
#[test]
fn a_recipe_export_writes_the_merged_model_and_its_gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let train = |extra: &[&str]| {
        let output_dir = format!("output.dir=\"{}\"", run.display());
        let recipe = common::recipe("ci/tiny-lora.toml");
        ember(&[&["train", &recipe, "--quiet", "--set", &output_dir, "--set", "train.max_steps=2"], extra].concat())
    };
    let settings = ["export.gguf=[\"q8_0\", \"q4_0\"]", "export.imatrix=true", "export.imatrix_chunks=2", "export.merged=f32"];
    let set: Vec<&str> = settings.iter().flat_map(|s| ["--set", s]).collect();
    assert_bad_input(&train(&set), &["tokenizer.json", "export.pre"]);
    assert!(!run.exists(), "no output folder before training");

    let output = train(&[&set[..], &["--set", "export.pre=gpt-2"]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let exports: Vec<String> = summary["exports"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let names: Vec<&str> = exports.iter().map(|p| Path::new(p).file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["merged", "imatrix.gguf", "model-q8_0.gguf", "model-q4_0.gguf"]);
    assert!(run.join("merged/model.safetensors").is_file());
    let matrix = GgufFile::open(&run.join("gguf/imatrix.gguf")).unwrap();
    assert_eq!(matrix.metadata.get("imatrix.chunk_count").unwrap().as_u64(), Some(2));

    // The same files as the commands write from the run's adapter.
    let base = fixture("tiny_llama");
    let adapter = run.join("adapter");
    let again = dir.path().join("q8_0.gguf");
    let matrix = run.join("gguf/imatrix.gguf");
    let (base, adapter, again_path, matrix) = (base.to_str().unwrap(), adapter.to_str().unwrap(), again.to_str().unwrap(), matrix.to_str().unwrap());
    export(&["gguf", "--base", base, "--adapter", adapter, "--out", again_path, "--type", "q8_0", "--pre", "gpt-2", "--imatrix", matrix]);
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(run.join("gguf/model-q8_0.gguf")).unwrap());
    let quantized = GgufFile::open(&run.join("gguf/model-q4_0.gguf")).unwrap();
    assert_eq!(quantized.metadata.get("quantize.imatrix.file").unwrap(), "imatrix.gguf");
}

/// A template of one's own (`data.template = "x.jinja"`) trains the adapter and goes with the
/// model it trained: into the merged tokenizer and the GGUF's `tokenizer.chat_template`, as
/// `ember merge` and `ember export gguf` write it with `--chat-template`.
#[test]
fn a_jinja_template_file_trains_and_goes_into_the_merged_model_and_its_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    let file = dir.path().join("chat.jinja");
    std::fs::write(&file, template).unwrap();
    let run = dir.path().join("run");
    let sets = [
        format!("output.dir=\"{}\"", run.display()),
        format!("data.path=\"{}\"", common::data("chat_sample.jsonl").display()),
        format!("data.template=\"{}\"", file.display()),
        "data.val_size=0".into(), "train.max_steps=1".into(), "train.warmup_steps=0".into(), "export.merged=\"f32\"".into(), "export.gguf=[\"f32\"]".into(), "export.pre=\"gpt-2\"".into(),
    ];
    let mut args = vec!["train".to_string(), common::recipe("ci/tiny-lora.toml"), "--quiet".into()];
    sets.iter().for_each(|s| args.extend(["--set".into(), s.clone()]));
    let output = ember(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let chat_template = |folder: &Path| -> Option<String> {
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(folder.join("tokenizer_config.json")).unwrap()).unwrap();
        config["chat_template"].as_str().map(str::to_string)
    };
    assert_eq!(chat_template(&run.join("merged")).as_deref(), Some(template));
    let gguf = GgufFile::open(&run.join("gguf/model-f32.gguf")).unwrap();
    assert_eq!(gguf.metadata.get("tokenizer.chat_template").and_then(|v| v.as_str()), Some(template));
    // The adapter keeps it (as transformers' tokenizer saves it), and the commands read it there:
    // `--template auto` is the adapter's template (tiny_llama has none of its own).
    let base = fixture("tiny_llama");
    let adapter = run.join("adapter");
    assert_eq!(std::fs::read_to_string(adapter.join("chat_template.jinja")).unwrap(), template);
    let generate = |adapter_args: &[&str]| ember(&[&["generate", "--base", base.to_str().unwrap(), "--template", "auto", "--prompt", "hi", "--max-new-tokens", "1"], adapter_args].concat());
    let output = generate(&["--adapter", adapter.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_bad_input(&generate(&[]), &["no chat_template"]);
    let merged = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let args = [&["merge", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()], extra].concat();
        let output = ember(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        chat_template(&out)
    };
    assert_eq!(merged("from_adapter", &[]).as_deref(), Some(template));
    let again = dir.path().join("again.gguf");
    export(&["gguf", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", again.to_str().unwrap(), "--type", "f32", "--pre", "gpt-2"]);
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(run.join("gguf/model-f32.gguf")).unwrap());
    // Without it, the base's template unless --chat-template names one.
    std::fs::remove_file(adapter.join("chat_template.jinja")).unwrap();
    assert_eq!(merged("plain", &[]), chat_template(&base));
    assert_eq!(merged("templated", &["--chat-template", file.to_str().unwrap()]).as_deref(), Some(template));
    assert_bad_input(&ember(&["merge", "--base", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", dir.path().join("x").to_str().unwrap(), "--chat-template", "missing.jinja"]), &["--chat-template missing.jinja"]);
}
