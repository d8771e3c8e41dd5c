#!/usr/bin/env bash
# Installs every Debian package that moemesh's build and tests need. Idempotent: when all
# packages are present it only checks them (a second or two) and touches nothing.
set -euo pipefail
pkgs=(build-essential cmake ninja-build ccache pkg-config
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
      libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev libopenblas-dev
      nlohmann-json3-dev libonig-dev libicu-dev libcpp-httplib-dev libssl-dev openssl curl
      python3-grpcio python3-protobuf clang libclang-rt-14-dev)
# Node and npm run the tests against published tokenizers and the OpenAI SDK. A machine that
# already has Node (e.g. from NodeSource, whose nodejs conflicts with Debian's npm) keeps it.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  pkgs+=(nodejs npm)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
