#!/usr/bin/env bash
# Fuzzes the readers of user files (Alpaca and chat data, recipes and --set overrides,
# safetensors and GGUF headers, tokenizer.model files, PyTorch .bin archives and pickles) with proptest: CASES random inputs per reader (default 200000, about 3 minutes
# on 2 cores). A panic fails the run and proptest prints the minimal failing input.
#   scripts/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-200000}
start=$(date +%s)
PROPTEST_CASES=$cases cargo test --release --test fuzz
echo "fuzz: $cases cases per reader, no panic, $(( $(date +%s) - start ))s"
