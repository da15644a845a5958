#!/usr/bin/env bash
# `make bench`: every benchmark of the project in one run, release builds,
# results assembled into bench/RESULTS.md (the data-plane table first, then
# the node agent's memory, the CNI plugin's ADD latency and the L4 policy
# evaluation cost). Root needed (network namespaces). Raw outputs stay in
# target/bench/.
#   BENCH_SECONDS=10 bench/run.sh
#   ISTIO_ZTUNNEL=/path/to/istio/ztunnel bench/run.sh   # also measure Istio's
#     ztunnel in the same run (build it with bench/build-istio-ztunnel.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
OUT=$PWD/target/bench
SECONDS_EACH=${BENCH_SECONDS:-10}
mkdir -p "$OUT"

step() { echo "=== bench: $*" >&2; }

step "release build"
"$CARGO" build --release -p ztunnel -p mesh-bench -p node-agent -p istio-cni

step "data plane: direct vs through two ztunnels (${SECONDS_EACH} s per measurement)"
ISTIO_ARGS=()
if [ -n "${ISTIO_ZTUNNEL:-}" ]; then
  [ -x "$ISTIO_ZTUNNEL" ] || { echo "ISTIO_ZTUNNEL=$ISTIO_ZTUNNEL is not an executable" >&2; exit 1; }
  ISTIO_ARGS=(--istio-ztunnel "$ISTIO_ZTUNNEL")
fi
target/release/bench-dedicated --seconds "$SECONDS_EACH" --results "$OUT/dataplane.md" "${ISTIO_ARGS[@]}"

step "node agent memory with 100 enrolled pods"
AGENT_MEMORY_OUT=$OUT/agent-memory.txt bench/agent_memory.sh >&2

step "CNI plugin ADD latency"
bench/cni.sh "${CNI_ITERATIONS:-500}" | tee "$OUT/cni.txt" >&2

step "L4 policy evaluation with 10,000 policies"
"$CARGO" bench -p ztunnel --bench policy | tee "$OUT/policy.txt" >&2

{
  cat "$OUT/dataplane.md"
  cat <<'MD'

## Node agent memory (target: <= 15 MB RSS with 100 enrolled pods)

Release `node-agent` on a simulated node, 100 ambient pods created through the real CNI chain and enrolled in-pod (`bench/agent_memory.sh`).

```
MD
  cat "$OUT/agent-memory.txt"
  cat <<'MD'
```

## CNI plugin ADD latency (process spawn to exit)

Release `istio-cni` run as the runtime runs it, against a node agent that answers at once (`bench/cni.sh`); the baselines are `/bin/true` and the reference `bridge` plugin measured in the same run.

```
MD
  cat "$OUT/cni.txt"
  cat <<'MD'
```

## L4 AuthorizationPolicy evaluation

`cargo bench -p ztunnel --bench policy`: 10,000 policies indexed by scope, one evaluation per connection.

```
MD
  cat "$OUT/policy.txt"
  echo '```'
  echo
  cat bench/memory-note.md
} > bench/RESULTS.md
step "wrote bench/RESULTS.md"
