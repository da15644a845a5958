#!/usr/bin/env bash
# Shared settings and helpers for the kind end-to-end scripts. Sourced, not run.
# shellcheck disable=SC2034  # settings are used by the scripts that source this

KIND_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$KIND_DIR/../.." && pwd)

# Settings (environment overrides).
CLUSTER=${KIND_CLUSTER:-geneva-mesh-e2e}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}              # e.g. kindest/node:v1.32.2; empty = kind's default
MESH_NS=${MESH_NAMESPACE:-istio-system}
APP_NS=${E2E_NAMESPACE:-demo}
MODE=${E2E_REDIRECT_MODE:-inpod}                 # inpod | geneve
HUB=${HUB:-localhost/geneva-mesh}
TAG=${TAG:-dev}
IMAGES_OUT=${IMAGES_OUT:-$REPO/target/images-out}
CLIENT_IMAGE=${CLIENT_IMAGE:-docker.io/curlimages/curl:8.11.1}
SERVER_IMAGE=${SERVER_IMAGE:-registry.k8s.io/e2e-test-images/agnhost:2.52}
TRUST_DOMAIN=cluster.local
WAIT=${E2E_WAIT:-180s}

log() { printf '\n== %s\n' "$*"; }
info() { printf '   %s\n' "$*"; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }

k() { kubectl --context "kind-$CLUSTER" "$@"; }
kn() { k -n "$APP_NS" "$@"; }
km() { k -n "$MESH_NS" "$@"; }

# The two worker nodes: client side and server side, so traffic crosses nodes.
CLIENT_NODE="$CLUSTER-worker"
SERVER_NODE="$CLUSTER-worker2"

# RFC 3339 "now", for `kubectl logs --since-time`.
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# retry SECONDS CMD...: run CMD every second until it succeeds or time is up.
retry() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}
