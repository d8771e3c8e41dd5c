#!/usr/bin/env bash
# CTest fixture: installs transformers.js (@lenml/tokenizers) and @huggingface/jinja with npm
# into OUT_DIR (in the build tree) and writes OUT_DIR/goldens_js.json. Fails when npm cannot
# install them: the golden test must then fail, not skip.
set -euo pipefail
mkdir -p "$1"
out="$(cd "$1" && pwd)"
src="$(cd "$(dirname "$0")" && pwd)"
rm -f "$out/goldens_js.json"
cp "$src/package.json" "$src/golden_chat.mjs" "$out/"
cd "$out"
if ! cmp -s package.json .installed-package.json 2>/dev/null || [ ! -d node_modules ]; then
  npm install --no-audit --no-fund --loglevel=error
  cp package.json .installed-package.json
fi
node golden_chat.mjs "$src" "$out/goldens_js.json"
