#!/usr/bin/env bash
# Soak: STEPS optimizer steps (default 2000) of the tiny CI recipe with a checkpoint every 50
# steps, 3 kept. Samples the process's resident memory (VmRSS) and open file descriptors
# (/proc/PID/fd) twice a second. Fails if, after the warm-up (the first 10% of the run, at least
# 100 steps: one evaluation and two checkpoints), RSS grows by more than 5%, if the descriptors
# held at the end (the fewest in the last quarter of the samples; a sample can catch a file being
# written) exceed those held after the warm-up, or if the checkpoints do not rotate.
#   scripts/soak.sh [STEPS]        (CI runs a short one: scripts/soak.sh 300)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-2000}
out=target/runs/soak
samples=target/runs/soak-samples.tsv
[ -x target/release/ember ] || cargo build --release --quiet
rm -rf "$out"
mkdir -p target/runs
SECONDS=0
target/release/ember train recipes/ci/tiny-lora.toml --quiet --overwrite \
    --set train.max_steps="$steps" --set train.save_steps=50 --set train.keep_checkpoints=3 \
    --set train.eval_steps=100 --set output.dir="\"$PWD/$out\"" &
pid=$!
printf 'seconds\tsteps\trss_kib\tfds\n' > "$samples"
while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l || true)
    done_steps=$(grep -c '"loss"' "$out/metrics.jsonl" 2>/dev/null || true)
    [ -n "$rss" ] && printf '%s\t%s\t%s\t%s\n' "$SECONDS" "${done_steps:-0}" "$rss" "$fds" >> "$samples"
    sleep 0.5
done
wait "$pid"
python3 - "$samples" "$steps" "$out" <<'PY'
import csv, os, sys
path, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [r for r in csv.DictReader(open(path), delimiter="\t")]
warmup = max(steps // 10, 100)
warm = [r for r in rows if int(r["steps"]) >= warmup]
assert warm, "no samples after the warm-up"
rss0, rss_max = int(warm[0]["rss_kib"]), max(int(r["rss_kib"]) for r in warm)
fds = [int(r["fds"]) for r in warm]
fd0, fd_end, fd_max = min(fds[: max(1, len(fds) // 4)]), min(fds[-max(1, len(fds) // 4):]), max(fds)
checkpoints = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step-"))
growth = 100.0 * (rss_max - rss0) / rss0
print(f"soak: {steps} steps in {float(rows[-1]['seconds']):.0f} s; {len(rows)} samples")
print(f"soak: RSS after the {warmup}-step warm-up {rss0 / 1024:.1f} MiB, max {rss_max / 1024:.1f} MiB (+{growth:.2f}%)")
print(f"soak: open descriptors held after warm-up {fd0}, at the end {fd_end} (max {fd_max} while writing)")
print(f"soak: checkpoints kept {checkpoints}")
ok = growth <= 5.0 and fd_end <= fd0 and len(checkpoints) == min(3, (steps - 1) // 50)
print("soak: ok" if ok else "soak: FAILED")
sys.exit(0 if ok else 1)
PY
