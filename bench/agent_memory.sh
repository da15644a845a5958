#!/usr/bin/env bash
# Node agent memory benchmark: the release node-agent on a simulated node with
# 100 ambient pods (real CNI chain, in-pod enrolment, ztunnel's ZDS client),
# VmRSS/VmHWM read from /proc/<pid>/status. Target: <= 15 MB RSS.
# Runs e2e/tests/control_loop_memory.rs (ignored in `make test`). Root needed.
#   bench/agent_memory.sh            # 100 pods
#   AGENT_MEMORY_PODS=200 bench/agent_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
OUT=${AGENT_MEMORY_OUT:-$PWD/target/bench/agent-memory.txt}
mkdir -p "$(dirname "$OUT")"
"$CARGO" build --release -p node-agent -p istio-cni
AGENT_MEMORY_OUT=$OUT E2E_BIN_DIR=$PWD/target/release \
  "$CARGO" test -p e2e --test control_loop_memory -- --ignored --nocapture --test-threads=1
echo "agent memory results: $OUT"
cat "$OUT"
