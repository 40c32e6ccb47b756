#!/usr/bin/env python3
"""Issue 14's quality check on the reference side: what NF4 costs HF PEFT + bitsandbytes.

Trains LoRA as recipes/smollm2-lora.toml does (r 8, alpha 16, dropout 0.05 on q_proj,v_proj, or --r, --alpha and
--target-modules; AdamW lr 3e-4,
linear schedule with 5 warm-up steps; batch 4; Alpaca template, prompt masked, cutoff 256) for --steps steps on an
f32 base and on a bitsandbytes NF4 base, and prints the held-out loss (transformers' masked mean over the answer
tokens of all held-out records) before training and every --eval-every steps, one JSON line per base.

The held-out records are the data file's last --val-size; training cycles over the others in order. ember holds
out a seeded shuffle instead, so compare each side's NF4 gap, not the absolute losses.

  python scripts/qlora_quality_reference.py --model target/models/smollm2_135m_instruct \
      --data tests/data/alpaca_en_sample_200.json [--reference ../shared/bench/peft_reference.py]
"""
import argparse, importlib.util, json, os, sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--reference", default=os.path.join(here, "..", "..", "shared", "bench", "peft_reference.py"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bases", default="f32,nf4")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--target-modules", default="q_proj,v_proj", help='comma-separated, or "all-linear"')
    a = ap.parse_args()

    # The reference's record loading and encoding, so that both scripts build the same examples.
    spec = importlib.util.spec_from_file_location("peft_reference", a.reference)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)

    import torch
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_linear_schedule_with_warmup

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    tok = AutoTokenizer.from_pretrained(a.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    records = reference.load_records(a.data)
    examples = [reference.encode(tok, r, 256) for r in records]
    train, held_out = examples[:-a.val_size], examples[-a.val_size:]

    def batch(chunk):
        width = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (x, y) in enumerate(chunk):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        return ids, mask, labels

    def held_out_loss(model):
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(held_out), 4):
                ids, mask, labels = batch(held_out[start:start + 4])
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                shifted = labels[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                        ignore_index=-100, reduction="sum")
                total += float(nll)
                count += int((shifted != -100).sum())
        model.train()
        return round(total / count, 4)

    for base in a.bases.split(","):
        torch.manual_seed(42)
        if base == "nf4":
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, quantization_config=quantization,
                                                         device_map={"": "cpu"})
            # On CPUs with AVX512-BF16, bitsandbytes 0.50.2's eval-mode forward repacks the weight once and computes in
            # bf16 (see shared/fixtures/README.md); it then ignored the trained LoRA (held-out loss unchanged). The f32
            # dequantize + linear path is what training runs and what other machines evaluate with.
            for module in model.modules():
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
        else:
            model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        config = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.05, task_type="CAUSAL_LM",
                                 target_modules=a.target_modules if a.target_modules == "all-linear" else a.target_modules.split(","))
        model = peft.get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.0)
        schedule = get_linear_schedule_with_warmup(optimizer, 5, a.steps)
        losses = {0: held_out_loss(model)}
        model.train()
        for step in range(a.steps):
            ids, mask, labels = batch([train[(step * 4 + i) % len(train)] for i in range(4)])
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
                losses[step + 1] = held_out_loss(model)
        print(json.dumps({"impl": "hf-peft", "peft": peft.__version__, "base": base, "steps": a.steps, "r": a.r, "alpha": a.alpha, "target_modules": a.target_modules,
                          "held_out_records": len(held_out), "held_out_loss": losses}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
