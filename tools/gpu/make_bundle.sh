#!/usr/bin/env bash
# Packs a full build's GPU-relevant binaries for a GPU machine that lacks moemesh's build
# dependencies (scripts/gpu_check.sh runs them with MOEMESH_GPU_PREBUILT): bin/ holds the gpu
# test binaries, the CPU kernels' tests, the service binaries (the mesh test starts them) and
# libmoemesh_cuda.so; lib/ the shared libraries they
# load from this system (glibc, and CUDA's own libraries, which the GPU machine has, excepted);
# build_dir the build directory the tests were compiled against.
#
#   tools/gpu/make_bundle.sh build .gpu/bundle.tar.xz
set -euo pipefail
build="$(cd "${1:?build dir}" && pwd)"
dest="${2:?output .tar.xz}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bundle/bin" "$stage/bundle/lib"
bins=(backend_conformance_test gpu_expert_group_test gpu_experts_check matmul_test kernels_test
      kernel_threads_stress_test moemesh moemesh-gateway
      moemesh-router moemesh-expert-worker libmoemesh_cuda.so)
for b in "${bins[@]}"; do cp "$build/bin/$b" "$stage/bundle/bin/"; done
for b in "${bins[@]}"; do ldd "$build/bin/$b"; done | awk '$3 ~ /^\// {print $3}' | sort -u |
  grep -v -E '/(libc|libm|libdl|librt|libpthread|ld-linux-x86-64)\.so|/libcu|/libnccl|/libmoemesh' |
  while read -r l; do cp -L "$l" "$stage/bundle/lib/"; done
echo "$build" >"$stage/bundle/build_dir"
mkdir -p "$(dirname "$dest")"
tar -C "$stage" -cJf "$dest" bundle
ls -la "$dest"
