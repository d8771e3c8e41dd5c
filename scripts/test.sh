#!/usr/bin/env bash
# Sets up, builds and runs every test suite (unit, integration, fault, load; gpu tests skip
# without a GPU). Extra arguments go to ctest, e.g. `scripts/test.sh -L unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
cd build && ctest --output-on-failure -j2 --timeout 600 "$@"
