#!/usr/bin/env bash
# Checks what `make e2e-kind` needs and says how to get whatever is missing.
# Exit 0 when everything is there, 1 otherwise (all problems listed at once).
set -uo pipefail

problems=()

need() { # need TOOL HOW-TO-INSTALL
  command -v "$1" >/dev/null 2>&1 || problems+=("$1 not found: $2")
}

need docker "install Docker Engine (https://docs.docker.com/engine/install/); kind runs its nodes as Docker containers"
need kind "install kind >= 0.24 (https://kind.sigs.k8s.io/docs/user/quick-start/#installation, e.g. 'go install sigs.k8s.io/kind@v0.26.0')"
need kubectl "install kubectl (https://kubernetes.io/docs/tasks/tools/)"
need helm "install Helm 3.8+ or 4 (https://helm.sh/docs/intro/install/)"

if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  problems+=("docker daemon not reachable ('docker info' failed): start it (e.g. 'sudo systemctl start docker') or give your user access to its socket (docker group)")
fi
# `make images` needs an image builder; docker with a running daemon is one.
if ! command -v buildah >/dev/null 2>&1 && ! command -v docker >/dev/null 2>&1 && ! command -v podman >/dev/null 2>&1; then
  problems+=("no image builder: install buildah (apt-get install buildah), docker or podman")
fi
if ! command -v cargo >/dev/null 2>&1 && [ -z "${BIN_DIR:-}" ] && [ -z "${SKIP_IMAGES:-}" ]; then
  problems+=("cargo not found: install Rust (https://rustup.rs) to build the images, or set BIN_DIR to prebuilt static binaries")
fi

if [ "${#problems[@]}" -gt 0 ]; then
  {
    echo "e2e-kind: missing prerequisites:"
    for p in "${problems[@]}"; do echo "  - $p"; done
    echo "(this end-to-end test needs a Docker engine; without one, 'make test' runs the node-in-a-box e2e instead)"
  } >&2
  exit 1
fi
echo "e2e-kind: prerequisites ok (docker, kind, kubectl, helm)"
