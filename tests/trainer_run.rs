//! The training loop against transformers' `Trainer` + PEFT, step by step
//! (`tests/fixtures/trainer_run`, made by `tests/fixtures/generate_trainer_run.py`): for each
//! case (LoRA; every bias trained with a bias on B; DoRA; prefix tuning; prompt tuning; QLoRA on
//! an NF4 base; (IA)³; LLaMA-Adapter's adaption prompts; LoRA+), from
//! PEFT's initial adapter, 12 steps of two accumulated micro-batches, warmup from 0 and cosine
//! decay, AdamW with weight decay (not on biases), the gradient norm clipped. Each step's learning
//! rate, loss and gradient norm, and the adapter after the last step, must be the reference's.
//! PiSSA and OLoRA make their start from the base weight on both sides instead, and are saved
//! converted to plain LoRA of rank 2r on the original base; QPiSSA quantizes what PiSSA leaves.

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
    let cases: [(&str, &[&str]); 14] = [
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
        ("pissa", &["adapter.init_lora_weights=\"pissa\""]),
        ("olora", &["adapter.init_lora_weights=\"olora\""]),
        // QPiSSA: the reference rounds every projection through bitsandbytes' NF4 after the start.
        ("qpissa", &["adapter.init_lora_weights=\"pissa\"", "model.quantize=\"nf4\""]),
    ];
    for (case, sets) in cases {
        check_case(&fixture, case, sets);
    }
}

fn check_case(fixture: &std::path::Path, case: &str, extra: &[&str]) {
    let dir = fixture.join(case);
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let own_start = extra.iter().any(|set| set.starts_with("adapter.init_lora_weights"));
    let mut sets = vec![format!("output.dir=\"{}\"", run.display())];
    if !own_start {
        sets.push(format!("adapter.init_from=\"{}\"", dir.join("init_adapter").display()));
    }
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

    if own_start {
        return check_converted(case, &run.join("adapter"), &dir.join("reference_adapter"));
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

/// A start read from the weight is only defined up to each singular pair's sign, so the converted
/// adapters are compared by what they add to each weight: `B'·A'` over all 2r components (the
/// trained update) and over the last r (`−B₀A₀`, the start taken out of the weight).
fn check_converted(case: &str, got: &std::path::Path, want: &std::path::Path) {
    let config = |dir: &std::path::Path| {
        let c = read_json(&dir.join("adapter_config.json"));
        (c["r"].as_u64().unwrap() as usize, c["lora_alpha"].as_f64().unwrap(), c["init_lora_weights"].clone())
    };
    assert_eq!(config(got), config(want), "{case}: r, lora_alpha, init_lora_weights");
    let rank = config(want).0;
    let (got, want) = (tensors(&got.join("adapter_model.safetensors")), tensors(&want.join("adapter_model.safetensors")));
    assert_eq!(got.keys().collect::<std::collections::BTreeSet<_>>(), want.keys().collect(), "{case}");
    // B·A over the components `parts` of a module whose A is `[rank, in]` and B `[out, rank]`.
    let product = |t: &HashMap<String, Vec<f32>>, module: &str, parts: std::ops::Range<usize>| -> Vec<f64> {
        let (a, b) = (&t[&format!("{module}.lora_A.weight")], &t[&format!("{module}.lora_B.weight")]);
        let (inp, out) = (a.len() / rank, b.len() / rank);
        let mut p = vec![0.0; out * inp];
        for o in 0..out {
            for k in parts.clone() {
                for i in 0..inp {
                    p[o * inp + i] += b[o * rank + k] as f64 * a[k * inp + i] as f64;
                }
            }
        }
        p
    };
    // OLoRA's QR has LAPACK's signs on both sides: its factors are the reference's themselves.
    if case == "olora" {
        for (name, w) in &want {
            let worst = got[name].iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5, "{case} {name}: {worst} from the reference");
        }
    }
    for module in want.keys().filter_map(|k| k.strip_suffix(".lora_A.weight")) {
        for (what, parts) in [("update", 0..rank), ("start", rank / 2..rank)] {
            let (g, w) = (product(&got, module, parts.clone()), product(&want, module, parts));
            let worst = g.iter().zip(&w).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            let size = w.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(worst < 1e-4 * size.max(1.0), "{case} {module} {what}: {worst} from the reference, whose largest entry is {size}");
        }
    }
}
