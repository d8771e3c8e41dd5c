#!/usr/bin/env bash
# Sets up, builds and runs every test suite (unit, integration, fault, load, tokenizer, openai;
# gpu tests skip without a GPU), then the bounded fuzz run (scripts/fuzz.sh, about a minute).
# Extra arguments go to ctest and skip the fuzz run, e.g. `scripts/test.sh -L unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
(cd build && ctest --output-on-failure -j2 --timeout 600 "$@")
if [ $# -eq 0 ]; then
  scripts/fuzz.sh
fi
