#!/usr/bin/env bash
# The main job: sets up and builds moemesh, starts the whole mesh on loopback (gateway,
# router and 2 expert-worker groups as separate processes) with the default model (created
# on first use), sends it one streaming generation request, and stops the mesh.
#
#   scripts/demo.sh                      # defaults below
#   MOEMESH_GROUPS=4 MOEMESH_REPLICAS=2 MOEMESH_PROMPT="Hi" scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
groups="${MOEMESH_GROUPS:-2}"
replicas="${MOEMESH_REPLICAS:-1}"
prompt="${MOEMESH_PROMPT:-The experts of the mesh say: }"
addr_file="$(mktemp -u /tmp/moemesh-demo-addr.XXXXXX)"
build/bin/moemesh up --groups "$groups" --replicas "$replicas" --address_file "$addr_file" &
up_pid=$!
cleanup() {
  kill -TERM "$up_pid" 2>/dev/null || true
  wait "$up_pid" 2>/dev/null || true
  rm -f "$addr_file"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  [ -s "$addr_file" ] && break
  kill -0 "$up_pid" 2>/dev/null || { echo "demo: moemesh up exited" >&2; exit 1; }
  sleep 0.2
done
[ -s "$addr_file" ] || { echo "demo: the mesh did not start in time" >&2; exit 1; }
gateway="$(cat "$addr_file")"
echo "demo: generating through the mesh at $gateway"
build/bin/moemesh generate --gateway "$gateway" --prompt "$prompt" --max-tokens 32 --timeout 60
model="${XDG_CACHE_HOME:-$HOME/.cache}/moemesh/default-model"
echo "demo: greedy token ids through the mesh:"
build/bin/moemesh generate --gateway "$gateway" --tokens 1,2,3,4 --max-tokens 16 --timeout 60
echo "demo: the same request in one process (the same ids):"
build/bin/moemesh generate --model "$model" --tokens 1,2,3,4 --max-tokens 16
