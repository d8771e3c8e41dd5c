#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (written for one H200): configures and builds
# moemesh with the CUDA backend, runs the gpu-labelled tests (every backend op against the CPU
# backend), insists that the CUDA cases really ran rather than skipped, starts an expert worker
# on the GPU once, and times the worker's ExpertFfn on CPU and GPU (bench_backend).
#
#   scripts/gpu_check.sh                 # builds into build-gpu/
#   MOEMESH_GPU_BUILD_DIR=build-x MOEMESH_GPU_DEVICE=1 scripts/gpu_check.sh
#
# Needs the build dependencies (scripts/setup.sh) and nvcc (/usr/local/cuda) already present;
# it downloads nothing. A few minutes, mostly the build. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${MOEMESH_GPU_BUILD_DIR:-build-gpu}"
device="${MOEMESH_GPU_DEVICE:-0}"
jobs="$(nproc)"
log() { echo "gpu_check: $*" >&2; }

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv || true
else
  log "nvidia-smi not found; continuing (the tests will say whether CUDA sees a device)"
fi

# ---- configure and build (only what the check runs) ----------------------------------------
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
launcher=()
command -v ccache >/dev/null &&
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
mkdir -p "$dir"
cmake -S . -B "$dir" "${gen[@]}" "${launcher[@]}" -DCMAKE_BUILD_TYPE=Release -DMOEMESH_CUDA=ON |
  tee "$dir/configure.log"
grep -q "moemesh: CUDA backend ON" "$dir/configure.log" || {
  log "the configure did not enable the CUDA backend (nvcc or the CUDA toolkit not found)"
  exit 1
}
# backend_conformance_test depends on the service binaries, so this builds those too.
time cmake --build "$dir" -j"$jobs" --target backend_conformance_test bench_backend

# ---- the gpu tests --------------------------------------------------------------------------
(cd "$dir" && ctest -L gpu --output-on-failure --timeout 300)
# ctest counts a skipped test as passed; on this machine the CUDA cases must have run.
out="$("$dir/bin/backend_conformance_test" --gtest_filter='*/cuda:CudaBackendFactory.*' 2>&1)" || {
  echo "$out"
  exit 1
}
if grep -q "^\[  SKIPPED \]" <<<"$out"; then
  echo "$out" | grep -A2 "Skipped" | head -20
  log "CUDA cases were skipped: the build or the process sees no GPU"
  exit 1
fi
log "conformance: $(grep -c '^\[       OK \]' <<<"$out") CUDA cases passed"

# ---- one expert worker on the GPU -----------------------------------------------------------
tmp="$(mktemp -d /tmp/moemesh-gpu-check.XXXXXX)"
worker_pid=""
cleanup() {
  if [ -n "$worker_pid" ]; then
    kill -TERM "$worker_pid" 2>/dev/null || true
    wait "$worker_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
"$dir/bin/moemesh" make-model --out "$tmp/model" --hidden 256 --intermediate 512 --layers 2 \
  --experts 8 --vocab 512 >/dev/null
"$dir/bin/moemesh-expert-worker" --model "$tmp/model" --experts 0-7 --backend cuda \
  --device "$device" --port_file "$tmp/port" 2>"$tmp/worker.log" &
worker_pid=$!
for _ in $(seq 1 150); do
  [ -s "$tmp/port" ] && break
  kill -0 "$worker_pid" 2>/dev/null || break
  sleep 0.2
done
cat "$tmp/worker.log" >&2
[ -s "$tmp/port" ] || { log "the CUDA expert worker did not start"; exit 1; }
grep -q "compute on cuda:$device" "$tmp/worker.log" || { log "the worker is not on cuda:$device"; exit 1; }
kill -TERM "$worker_pid"
wait "$worker_pid" || true
worker_pid=""
log "expert worker started on cuda:$device and drained"

# ---- ExpertFfn, CPU vs GPU (host buffers in and out, as the worker calls it) ----------------
"$dir/bin/bench_backend" --backends cpu,cuda --device "$device" \
  --shapes 1024x2816,4096x14336,7168x2048 --batches 1,16,128,512 --repeats 5 \
  --json "$dir/bench_backend.json"
log "all checks passed; bench rows in $dir/bench_backend.json"
