#!/usr/bin/env bash
# Issue 17's CPU side-by-side: the shared workload (SmolLM2-135M, batch 4, cutoff 256, 2 threads)
# for LoRA r8 on q_proj,v_proj (two alternating pairs, 20 timed steps), a 4-bit base (NF4, one
# pair), prefix tuning and adaption prompts (one pair each, 10 timed steps), ember against HF PEFT,
# one run at a time; then ember alone with gradient checkpointing and with its fused operations
# off (EMBER_FUSED=0). One JSON line a run goes to the output file (default
# target/bench-cpu.jsonl), with an "label" field added.
#
#   REFERENCE_PYTHON=/path/to/venv/bin/python scripts/bench-cpu.sh [out.jsonl] [checkpointing]
#
# `checkpointing` runs only the cost of activation checkpointing instead: each method without and
# with it, alternating (LoRA twice), then PEFT's LoRA without and with `--grad-ckpt`.
#
# Needs the SmolLM2 folder (scripts/fetch-smollm2.sh) and a Python with torch, transformers, peft
# and bitsandbytes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-cpu.jsonl}
python=${REFERENCE_PYTHON:?set REFERENCE_PYTHON to a Python with torch, transformers, peft, bitsandbytes}
reference=${REFERENCE_SCRIPT:-../shared/bench/peft_reference.py}
common=(--model target/models/smollm2_135m_instruct --data tests/data/alpaca_en_sample_200.json --batch 4 --cutoff 256 --threads 2)
lora=("${common[@]}" --method lora --r 8 --targets q_proj,v_proj --steps 20)
prefix=("${common[@]}" --method prefix --virtual-tokens 16 --steps 10)
adaption=("${common[@]}" --method adaption --adapter-len 10 --adapter-layers 8 --steps 10)
cargo build --release --quiet --bin ember
: > "$out"
# run LABEL COMMAND...: the command's last line (its JSON result) with the label added.
run() {
  local label=$1
  shift
  echo "$ $*" >&2
  "$@" | tail -n 1 | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["label"]=sys.argv[1]; print(json.dumps(d))' "$label" | tee -a "$out"
}
if [ "${2:-}" = checkpointing ]; then
  for method in lora lora prefix adaption; do
    declare -n workload=$method
    run "$method ember" target/release/ember bench "${workload[@]}"
    run "$method ember checkpointing" target/release/ember bench "${workload[@]}" --gradient-checkpointing
  done
  run "lora peft" "$python" "$reference" "${lora[@]}"
  run "lora peft checkpointing" "$python" "$reference" "${lora[@]}" --grad-ckpt
  exit 0
fi
for pair in 1 2; do
  run "lora peft" "$python" "$reference" "${lora[@]}"
  run "lora ember" target/release/ember bench "${lora[@]}"
done
run "nf4 peft+bnb" "$python" "$reference" "${lora[@]}" --load-in-4bit
run "nf4 ember" target/release/ember bench "${lora[@]}" --quantize nf4
run "prefix peft" "$python" "$reference" "${prefix[@]}"
run "prefix ember" target/release/ember bench "${prefix[@]}"
run "adaption peft" "$python" "$reference" "${adaption[@]}"
run "adaption ember" target/release/ember bench "${adaption[@]}"
for method in lora prefix adaption; do
  declare -n workload=$method
  run "$method ember checkpointing" target/release/ember bench "${workload[@]}" --gradient-checkpointing
done
run "lora ember EMBER_FUSED=0" env EMBER_FUSED=0 target/release/ember bench "${lora[@]}"
