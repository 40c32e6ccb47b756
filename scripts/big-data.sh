#!/usr/bin/env bash
# Loads the full Stanford Alpaca (52,002 records, gzip) and the 20k Chinese Alpaca set the way a
# run does (every record parsed and checked, the seeded train/eval split) through
# `ember recipe check`, and reports the wall time and peak RSS of each.
#   scripts/big-data.sh [SHARED_DATA_DIR]     (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
[ -x target/release/ember ] || cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for file in "$data/alpaca_data.json.gz" "$data"/alpaca_chinese_carbonz0/*.json; do
    [ -f "$file" ] || continue
    sed -e "s#^path = \"../../tests/data/alpaca_en_sample_200.json\"#path = \"$(realpath "$file")\"#" recipes/ci/tiny-lora.toml > "$tmp/recipe.toml"
    sed -i "s#^path = \"../../tests/fixtures/tiny_llama\"#path = \"$PWD/tests/fixtures/tiny_llama\"#" "$tmp/recipe.toml"
    /usr/bin/time -f "%e s wall, peak RSS %M KiB" -o "$tmp/time" target/release/ember recipe check "$tmp/recipe.toml" > "$tmp/out"
    echo "$(basename "$file") ($(du -h "$file" | cut -f1)): $(grep -o '[0-9,]* records' "$tmp/out"); $(cat "$tmp/time")"
done
