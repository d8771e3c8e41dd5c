#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (written for one H200). It needs only CMake,
# nvcc and the CUDA toolkit (cuBLAS): it builds the GPU expert path alone (tools/gpu, no gRPC,
# Abseil or GoogleTest) and runs
#   - its conformance checks: BF16, FP8 and F32 expert groups against a double-precision
#     reference, bitwise repeatability, concurrent calls, refusals (gpu_experts_check);
#   - its benchmark: the cuBLAS BF16 GEMM peak, then the expert FFN's TFLOP/s for 1 to 4,096
#     tokens per call, RunExperts latency and the host<->device copy times (JSON beside it).
# When MOEMESH_GPU_PREBUILT names a directory holding binaries of the full build made on
# another machine (bin/ with the test binaries, the services and libmoemesh_cuda.so, and lib/
# with the shared libraries they need; tools/gpu/make_bundle.sh makes one), it also runs the
# gpu-labelled GoogleTest suites from it: the CUDA ComputeBackend against the CPU backend, the
# expert group on the GPU against the CPU group, and a mesh whose workers compute on the GPU;
# and the CPU kernels' tests (that machine's CPUs may have AVX-512 and many cores). A suite that
# hangs is stopped after 4 minutes with every thread's stack in its log (cuda-gdb).
#
#   scripts/gpu_check.sh                          # builds into build-gpu-experts/
#   MOEMESH_GPU_OUT=/tmp/out MOEMESH_GPU_PREBUILT=/tmp/bundle scripts/gpu_check.sh
#
# Exits non-zero if any part failed (each part still runs, so one run shows everything).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
dir="${MOEMESH_GPU_BUILD_DIR:-build-gpu-experts}"
out="${MOEMESH_GPU_OUT:-$dir}"
prebuilt="${MOEMESH_GPU_PREBUILT:-}"
jobs="$(nproc)"
failed=()
log() { echo "gpu_check: $*" >&2; }
mkdir -p "$out"

nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv || true
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvcc --version | tail -1 || true

# ---- the standalone build, in the background while the prebuilt suites run --------------
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
(cmake -S tools/gpu -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release >"$out/build.log" 2>&1 &&
  cmake --build "$dir" -j"$jobs" >>"$out/build.log" 2>&1) &
build_pid=$!

# ---- the full build's gpu suites, from prebuilt binaries ---------------------------------
if [ -n "$prebuilt" ]; then
  cudalib="$(dirname "$(find / -xdev -name 'libcublas.so.13' 2>/dev/null | head -1)")"
  export LD_LIBRARY_PATH="$prebuilt/lib:${cudalib}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  # The test binaries find the services through the build directory they were built in.
  if [ -f "$prebuilt/build_dir" ]; then
    bd="$(cat "$prebuilt/build_dir")"
    if [ ! -e "$bd/bin" ]; then mkdir -p "$bd" && ln -s "$prebuilt/bin" "$bd/bin"; fi
  fi
  # The CPU kernels' tests too: a GPU machine's CPUs may have AVX-512 (and many cores) where
  # the build machine has neither, and matmul_test forces every level the CPU has.
  for t in backend_conformance_test gpu_expert_group_test matmul_test kernels_test \
    kernel_threads_stress_test; do
    [ -x "$prebuilt/bin/$t" ] || continue
    log "running prebuilt $t"
    "$prebuilt/bin/$t" >"$out/$t.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      # Still running after 4 minutes: say where every thread is (cuda-gdb also debugs host
      # code; there is no gdb on the GPU machine), then stop it.
      log "$t is still running after 240 s; its threads:"
      command -v cuda-gdb >/dev/null &&
        timeout 60 cuda-gdb -p "$pid" -batch -ex "thread apply all bt 12" >>"$out/$t.log" 2>&1
      kill -9 "$pid"
    fi
    if ! wait "$pid"; then
      failed+=("$t")
    elif grep -q "^\[  SKIPPED \]" "$out/$t.log" && [ "$t" = gpu_expert_group_test ]; then
      log "$t skipped cases: the process sees no GPU"
      failed+=("$t (skipped)")
    fi
    grep -E "^\[  (PASSED|FAILED) |^\[  SKIPPED \] [0-9]|worst|detected" "$out/$t.log" >&2 || true
  done
fi

# ---- the standalone check and benchmark ---------------------------------------------------
if ! wait "$build_pid"; then
  tail -40 "$out/build.log"
  log "the standalone build failed"
  exit 1
fi
log "standalone build done"
"$dir/gpu_experts_check" --conformance 2>&1 | tee "$out/conformance.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || failed+=("conformance (exit $rc)")
"$dir/gpu_experts_check" --bench --json "$out/bench_gpu_experts.json" 2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || failed+=("bench (exit $rc)")

if [ "${#failed[@]}" -gt 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
log "all checks passed; bench rows in $out/bench_gpu_experts.json"
