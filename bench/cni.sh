#!/usr/bin/env bash
# CNI plugin ADD latency (process spawn to exit) for the paths non-mesh pods
# take. Release build. Usage: bench/cni.sh [iterations]
set -euo pipefail
cd "$(dirname "$0")/.."
export ADD_LATENCY_ITERATIONS="${1:-1000}"
exec cargo bench -p istio-cni --bench add_latency
