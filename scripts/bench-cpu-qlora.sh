#!/usr/bin/env bash
# Issue 14's CPU side-by-side: the shared workload (SmolLM2-135M, LoRA r8 on q_proj,v_proj, batch 4,
# cutoff 256, 20 timed steps after 3 warm-up steps, 2 threads) with an f32 base and with a 4-bit
# base, ember against HF PEFT (+ bitsandbytes 0.50.2 for --load-in-4bit), in alternating pairs, one
# run at a time; ember also on the same weights as a GGUF file (Q8_0, Q4_0 blocks). One JSON line a
# run goes to the output file (default target/bench-cpu-qlora.jsonl).
#
#   REFERENCE_PYTHON=/path/to/venv/bin/python scripts/bench-cpu-qlora.sh [out.jsonl]
#
# Needs the SmolLM2 folder (scripts/fetch-smollm2.sh) and a Python with torch, transformers, peft
# and bitsandbytes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-cpu-qlora.jsonl}
python=${REFERENCE_PYTHON:?set REFERENCE_PYTHON to a Python with torch, transformers, peft, bitsandbytes}
model=target/models/smollm2_135m_instruct
data=tests/data/alpaca_en_sample_200.json
reference=${REFERENCE_SCRIPT:-../shared/bench/peft_reference.py}
workload=(--model "$model" --data "$data" --method lora --r 8 --targets q_proj,v_proj --batch 4 --cutoff 256 --steps 20 --threads 2)
cargo build --release --quiet --bin ember
for ty in q8_0 q4_0; do
  [ -f "target/bench-smollm2-$ty.gguf" ] || target/release/ember export gguf --base "$model" --out "target/bench-smollm2-$ty.gguf" --type "$ty"
done
: > "$out"
run() { echo "$ $*" >&2; "$@" | tail -n 1 | tee -a "$out"; }
for pair in 1 2; do
  run "$python" "$reference" "${workload[@]}"
  run target/release/ember bench "${workload[@]}"
  run "$python" "$reference" "${workload[@]}" --load-in-4bit
  run target/release/ember bench "${workload[@]}" --quantize nf4
done
run "$python" "$reference" "${workload[@]}" --load-in-4bit --double-quant
run target/release/ember bench "${workload[@]}" --quantize nf4 --double-quant
for ty in q8_0 q4_0; do
  run target/release/ember bench "${workload[@]/$model/target/bench-smollm2-$ty.gguf}"
done
