#!/usr/bin/env bash
# Resident memory of every mesh process for a model: starts `moemesh up --model DIR --groups 2`,
# sends one 16-token generate, prints VmRSS per process, stops the mesh.
#   tools/bench/worker_rss.sh MODEL_DIR
set -uo pipefail
model=${1:?usage: worker_rss.sh MODEL_DIR}
bin="$(cd "$(dirname "$0")/../.." && pwd)/build/bin"
log=$(mktemp /tmp/worker_rss.XXXXXX)
"$bin/moemesh" up --model "$model" --groups 2 >"$log" 2>&1 &
up=$!
addr=""
for _ in $(seq 1 300); do
  addr=$(grep -oE "gateway listening on [0-9.]+:[0-9]+" "$log" | awk '{print $4}' | head -1)
  [ -n "$addr" ] && break
  kill -0 "$up" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 1
done
[ -n "$addr" ] || { echo "the mesh did not start; log: $log"; kill -INT "$up"; exit 1; }
"$bin/moemesh" generate --gateway "$addr" --tokens 1,2,3,4,5,6,7,8 --max-tokens 16 >/dev/null ||
  echo "generate failed"
for p in $(pgrep -P "$up"); do
  echo "$(cat /proc/"$p"/comm) $(awk '/VmRSS/ {print $2, $3}' /proc/"$p"/status)"
done
kill -INT "$up"
wait "$up" 2>/dev/null
rm -f "$log"
