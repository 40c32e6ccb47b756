//! The training loop against transformers' `Trainer` + PEFT, step by step
//! (`tests/fixtures/trainer_run`, made by `tests/fixtures/generate_trainer_run.py`): for each
//! case (LoRA; every bias trained with a bias on B; DoRA; prefix tuning; prompt tuning; QLoRA on
//! an NF4 base; (IA)³; LLaMA-Adapter's adaption prompts; LoRA+), from
//! PEFT's initial adapter, 12 steps of two accumulated micro-batches, warmup from 0 and cosine
//! decay, AdamW with weight decay (not on biases), the gradient norm clipped. Each step's learning
//! rate, loss and gradient norm, and the adapter after the last step, must be the reference's.

mod common;

use std::collections::HashMap;

use common::{ember, f32_tensors, read_json, repository};

fn tensors(path: &std::path::Path) -> HashMap<String, Vec<f32>> {
    f32_tensors(path).into_iter().collect()
}

#[test]
fn training_steps_are_transformers_trainers() {
    let fixture = repository().join("tests/fixtures/trainer_run");
    // QLoRA trains on a bitsandbytes NF4 base, ember on its own NF4 of the same bytes. The memory
    // options (checkpointing, a chunked loss, padded batches) must not move a run off the reference.
    let memory: &[&str] = &["train.gradient_checkpointing=true", "train.loss_chunk_tokens=16", "train.padding_free=false"];
    let cases: [(&str, &[&str]); 11] = [
        ("lora", &[]),
        ("lora", memory),
        ("lora_biases", &[]),
        ("dora", &[]),
        ("prefix", &[]),
        ("prompt_tuning", &[]),
        ("qlora_nf4", &["model.quantize=\"nf4\""]),
        ("qlora_nf4", &["model.quantize=\"nf4\"", "train.gradient_checkpointing=true", "train.loss_chunk_tokens=16"]),
        ("ia3", &[]),
        // PEFT's adaption prompts are LLaMA's.
        ("adaption", &["model.path=\"../tiny_llama\""]),
        // LoRA+ against PEFT's create_loraplus_optimizer: B, biases and the embedding's LoRA at rates of their own.
        ("loraplus", &["train.loraplus_lr_ratio=4"]),
    ];
    for (case, sets) in cases {
        check_case(&fixture, case, sets);
    }
}

fn check_case(fixture: &std::path::Path, case: &str, extra: &[&str]) {
    let dir = fixture.join(case);
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let sets = [format!("adapter.init_from=\"{}\"", dir.join("init_adapter").display()), format!("output.dir=\"{}\"", run.display())];
    let recipe = fixture.join("recipe.toml");
    let mut args = vec!["train", recipe.to_str().unwrap(), "--quiet"];
    for set in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        args.extend(["--set", set]);
    }
    let output = ember(&args);
    assert!(output.status.success(), "{case}: {}", String::from_utf8_lossy(&output.stderr));

    let reference = read_json(&dir.join("reference.json"));
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|m| m.get("loss").is_some())
        .collect();
    let want = reference["steps"].as_array().unwrap();
    assert_eq!(steps.len(), want.len(), "{case}");
    for (got, want) in steps.iter().zip(want) {
        let value = |m: &serde_json::Value, key: &str| m[key].as_f64().unwrap();
        let step = value(want, "step");
        assert_eq!(value(got, "step"), step);
        assert!((value(got, "lr") - value(want, "lr")).abs() < 1e-12, "{case} step {step}: lr {} vs {}", value(got, "lr"), value(want, "lr"));
        assert!((value(got, "loss") - value(want, "loss")).abs() < 2e-5, "{case} step {step}: loss {} vs {}", value(got, "loss"), value(want, "loss"));
        let (norm, want_norm) = (value(got, "grad_norm"), value(want, "grad_norm"));
        assert!((norm - want_norm).abs() < 1e-4 * want_norm, "{case} step {step}: gradient norm {norm} vs {want_norm}");
    }

    let trained = tensors(&run.join("adapter/adapter_model.safetensors"));
    // PEFT also saves a copy of a frozen embedding that carries a LoRA (`base_layer.weight`);
    // ember does not (the base has it).
    let mut reference = tensors(&dir.join("reference_adapter/adapter_model.safetensors"));
    reference.retain(|name, _| !name.ends_with(".base_layer.weight"));
    let initial = tensors(&dir.join("init_adapter/adapter_model.safetensors"));
    assert_eq!(trained.len(), reference.len(), "{case}: {:?}", trained.keys().collect::<Vec<_>>());
    for (name, want) in &reference {
        // A key's bias shifts every score of a query by the same amount, which softmax ignores:
        // its gradient is 0 up to rounding, and Adam turns either side's rounding into full steps.
        if name.ends_with("k_proj.bias") {
            continue;
        }
        let got = trained.get(name).unwrap_or_else(|| panic!("{case}: no {name} in ember's adapter"));
        let worst = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let moved = want.iter().zip(&initial[name]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // Adam scales each element's step by its own gradient's size, so an element whose
        // gradient is near zero carries rounding further: 1e-4, and 1% of what the tensor moved
        // (LoRA+ moves the embedding's LoRA at 1e-6 a step).
        assert!(worst < 1e-4 && worst < 1e-2 * moved, "{case} {name}: {worst} from the reference, which moved {moved}");
    }
}
