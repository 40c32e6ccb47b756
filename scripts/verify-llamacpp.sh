#!/usr/bin/env bash
# ember's GGUF export checked by llama.cpp itself (issue 16): builds llama.cpp from the PyPI sdist
# of llama-cpp-python (which vendors it) with cmake, then runs scripts/verify_llamacpp.py:
# (a) f16 SmolLM2: llama.cpp's greedy answers and last logits vs ember's; (b) ember's LoRA GGUF in
# llama.cpp; (c) gguf-lora vs llama.cpp's convert_lora_to_gguf.py; (d) export -> import round
# trip; (e) perplexity of ember's f32 vs llama.cpp's f32/f16/q8_0/q4_0 files.
# (f) a LoRA trained on the q8_0/q4_0 GGUF itself, run by llama.cpp on that file; (g) the same on
# Q4_K_M, Q6_K, Q3_K_M, Q2_K, IQ4_NL, IQ4_XS, IQ3_M and IQ2_M files made by llama.cpp's own quantizer.
# (h) Qwen2 as llama.cpp's qwen2; (i) Llama 3.1 RoPE scaling: tiny models from transformers.
# (j) pre-tokenizers read back from a GGUF (and a SentencePiece vocabulary's user-defined pieces);
# (k) the GLM family (ChatGLM3, GLM-4 vocabularies) as llama.cpp's chatglm (needs
# REFERENCE_PYTHON and the shared tokenizers, EMBER_TOKENIZERS); (l) ember's 24 quantized types
# against llama.cpp's quantizer, byte for byte, without and with an importance matrix (q2_k_s, iq3_xs,
# iq3_xxs and the iq2/iq1 types only with one, as llama-quantize); (m) `ember
# imatrix` against llama.cpp's llama-imatrix (built from the same source with cmake); (n) SmolLM2
# as llama.cpp's converter writes a ModelOpt NVFP4 checkpoint (NVFP4 projections with tensor
# scales, an MXFP4 ffn_down): ember's import against gguf-py's, and (f) on that file.
#
#   scripts/verify-llamacpp.sh [work dir]      (default target/llamacpp)
#
# Needs python3 (venv, pip), a C/C++ compiler and PyPI. Not part of CI: the llama.cpp build takes
# about 15 minutes on 2 cores (CMAKE_BUILD_PARALLEL_LEVEL sets its jobs). For (c), point
# REFERENCE_PYTHON at a Python with torch, transformers and safetensors (tests/fixtures/
# requirements.txt); without it (c) and the Python-built models of (h), (i), (k), (l) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/llamacpp}
version=0.3.36
mkdir -p "$work"
work=$(cd "$work" && pwd)
src="$work/llama_cpp_python-$version"

if [ ! -x "$work/venv/bin/python" ] || ! "$work/venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  if [ ! -d "$src" ]; then
    # PyPI's simple index (PEP 503) lists the sdist; its JSON API is not reachable everywhere.
    url=$(curl -sS https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$version.tar.gz" | head -1)
    curl -sSL -o "$work/llama_cpp_python-$version.tar.gz" "$url"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
  fi
  python3 -m venv "$work/venv"
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" "$work/venv/bin/pip" install -q "$src"
  echo "llama.cpp (llama-cpp-python $version) built in $(( $(date +%s) - start ))s"
fi

# numpy for the checks, pyyaml for llama.cpp's gguf-py, safetensors for the fixtures' generator
# (n), cmake and ninja for llama-imatrix
"$work/venv/bin/pip" install -q numpy pyyaml safetensors cmake ninja
tools="$work/build-tools"
if [ ! -x "$tools/bin/llama-imatrix" ]; then
  start=$(date +%s)
  PATH="$work/venv/bin:$PATH" cmake -S "$src/vendor/llama.cpp" -B "$tools" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$work/build-tools.log"
  PATH="$work/venv/bin:$PATH" cmake --build "$tools" --target llama-imatrix >> "$work/build-tools.log"
  echo "llama-imatrix built in $(( $(date +%s) - start ))s"
fi
scripts/fetch-smollm2.sh
cargo build --release --quiet --bin ember
"$work/venv/bin/python" scripts/verify_llamacpp.py \
  --ember target/release/ember --smollm2 target/models/smollm2_135m_instruct --work "$work/out" \
  --llama-cpp "$src/vendor/llama.cpp" --reference-python "${REFERENCE_PYTHON:-}" \
  --data tests/data/alpaca_en_sample_200.json --data-zh tests/data/alpaca_zh_sample_200.json \
  --tokenizers "${EMBER_TOKENIZERS:-../shared/fixtures/tokenizers}" --llama-imatrix "$tools/bin/llama-imatrix"
