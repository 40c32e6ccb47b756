#!/usr/bin/env bash
# ember's rendering of real checkpoints' Jinja chat templates against transformers': the templates
# llama.cpp keeps in models/templates (from the PyPI sdist of llama-cpp-python, which vendors it),
# each record rendered by both (scripts/check_chat_templates.py).
#
#   REFERENCE_PYTHON=python scripts/check-chat-templates.sh [records.jsonl ...]
#
# Records default to tests/data/tool_calls.jsonl; LLaMA-Factory's glaive_toolcall_*_demo.json
# converted to JSON lines make a larger set. Needs curl, PyPI, and a Python with transformers
# (tests/fixtures/requirements.txt). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
work=target/chat-templates
mkdir -p "$work"
if [ ! -d "$work/templates" ]; then
  sdist=target/llamacpp/llama_cpp_python-$version.tar.gz
  if [ ! -f "$sdist" ]; then
    sdist=$work/llama_cpp_python-$version.tar.gz
    url=$(curl -sS https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*llama_cpp_python-$version.tar.gz" | head -1)
    curl -sSL -o "$sdist" "$url"
  fi
  tar -xzf "$sdist" -C "$work" --wildcards "*/vendor/llama.cpp/models/templates/*"
  mv "$work/llama_cpp_python-$version/vendor/llama.cpp/models/templates" "$work/templates"
  rm -rf "$work/llama_cpp_python-$version"
fi
cargo build --release --quiet
"${REFERENCE_PYTHON:-python3}" scripts/check_chat_templates.py "$work/templates" "$@"
