#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) into build-fuzz/ and runs them: first
# every kept input under tests/fuzz/corpus (regression cases), then each target for
# FUZZ_SECONDS (default 12; five targets, about a minute in all). Exit status non-zero on a
# crash; libFuzzer leaves the input as crash-* in the current directory: keep it under
# tests/fuzz/corpus/<target>/ once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ ! -f build-fuzz/CMakeCache.txt ]; then
  CC=clang CXX=clang++ cmake -S tests/fuzz -B build-fuzz -G Ninja "${launcher[@]}"
fi
cmake -S tests/fuzz -B build-fuzz -DMOEMESH_FUZZ_SECONDS="${FUZZ_SECONDS:-12}" >/dev/null
cmake --build build-fuzz -j"${JOBS:-2}"
ctest --test-dir build-fuzz -L fuzz --output-on-failure -j1
