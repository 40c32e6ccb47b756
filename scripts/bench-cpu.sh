#!/usr/bin/env bash
# Issue 17's CPU side-by-side: the shared workload (SmolLM2-135M, batch 4, cutoff 256, 2 threads)
# for LoRA r8 on q_proj,v_proj (20 timed steps), prefix tuning and adaption prompts (10 timed
# steps), PAIRS alternating pairs each (default 3: one pair moved by up to 0.2x on a shared host),
# and a 4-bit base (NF4, one pair), ember against HF PEFT, one run at a time; then ember alone with
# gradient checkpointing and with its fused operations off (EMBER_FUSED=0). One JSON line a run
# goes to the output file (default target/bench-cpu.jsonl), with an "label" field added; a summary
# of the means and ratios ends the output.
#
#   REFERENCE_PYTHON=/path/to/venv/bin/python [PAIRS=n] scripts/bench-cpu.sh [out.jsonl] [checkpointing]
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
# The means over each label's runs: ember's tokens/s and peak RSS against PEFT's, and what
# checkpointing costs each side.
summary() {
  python3 - "$out" <<'SUMMARY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
    run = json.loads(line)
    runs.setdefault(run["label"], []).append(run)
mean = lambda label, key: sum(r[key] for r in runs[label]) / len(runs[label])
references = {"lora": "lora peft", "prefix": "prefix peft", "adaption": "adaption peft", "nf4": "nf4 peft+bnb"}
for method, reference in references.items():
    for suffix in ["", " checkpointing"]:
        ours, theirs = f"{method} ember{suffix}", reference + suffix
        if ours in runs and theirs in runs:
            speed = mean(ours, "tokens_per_s") / mean(theirs, "tokens_per_s")
            memory = mean(ours, "peak_rss_mib") / mean(theirs, "peak_rss_mib")
            pairs = ", ".join(f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}" for o, r in zip(runs[ours], runs[theirs]))
            print(f"{ours}: {speed:.2f}x PEFT's tokens/s, means of {len(runs[ours])} ember and {len(runs[theirs])} PEFT runs "
                  f"(in order, pair by pair: {pairs}), {memory:.2f}x its peak RSS")
for label in sorted(runs):
    plain = label.removesuffix(" checkpointing")
    if plain != label and plain in runs:
        cost = 1 - mean(label, "tokens_per_s") / mean(plain, "tokens_per_s")
        print(f"{label}: costs {100 * cost:.1f}% of the tokens/s, peak RSS {mean(label, 'peak_rss_mib'):,.0f} MiB against {mean(plain, 'peak_rss_mib'):,.0f}")
SUMMARY
}
if [ "${2:-}" = checkpointing ]; then
  for method in lora lora prefix adaption; do
    declare -n workload=$method
    run "$method ember" target/release/ember bench "${workload[@]}"
    run "$method ember checkpointing" target/release/ember bench "${workload[@]}" --gradient-checkpointing
  done
  run "lora peft" "$python" "$reference" "${lora[@]}"
  run "lora peft checkpointing" "$python" "$reference" "${lora[@]}" --grad-ckpt
  summary
  exit 0
fi
for pair in $(seq "${PAIRS:-3}"); do
  for method in lora prefix adaption; do
    declare -n workload=$method
    run "$method peft" "$python" "$reference" "${workload[@]}"
    run "$method ember" target/release/ember bench "${workload[@]}"
  done
done
run "nf4 peft+bnb" "$python" "$reference" "${lora[@]}" --load-in-4bit
run "nf4 ember" target/release/ember bench "${lora[@]}" --quantize nf4
for method in lora prefix adaption; do
  declare -n workload=$method
  run "$method ember checkpointing" target/release/ember bench "${workload[@]}" --gradient-checkpointing
done
run "lora ember EMBER_FUSED=0" env EMBER_FUSED=0 target/release/ember bench "${lora[@]}"
summary
