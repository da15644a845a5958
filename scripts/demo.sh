#!/usr/bin/env bash
# `make demo`: installs what is missing, builds, and runs the node-in-a-box
# demo (e2e/src/bin/demo.rs): a two-node simulated cluster on this machine,
# a client and a server, `kubectl label namespace demo
# istio.io/dataplane-mode=ambient`, and what changes on the wire, in
# ztunnel's access log and in its metrics. Cleans up after itself.
#   scripts/demo.sh [--mode inpod|geneve] [--sample 2s]
# Needs root (network namespaces, iptables). Env: CARGO (cargo).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (it creates network namespaces and iptables rules)" >&2
  exit 1
fi
scripts/install-deps.sh
CARGO=${CARGO:-cargo}
command -v "$CARGO" >/dev/null || { echo "demo: $CARGO not found; install Rust (https://rustup.rs)" >&2; exit 1; }
echo "demo: building (first build takes a few minutes)"
"$CARGO" build --quiet -p ztunnel --bin ztunnel -p node-agent --bin node-agent \
  -p istio-cni --bin istio-cni -p e2e --bin e2e-workload --bin demo
exec "${CARGO_TARGET_DIR:-target}/debug/demo" "$@"
