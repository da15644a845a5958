#!/usr/bin/env bash
# `make e2e-kind-clean`: deletes the kind cluster and the e2e state files.
# Images built by `make images` stay in the builder's storage and in
# target/images-out (removed by `make clean`).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! command -v kind >/dev/null 2>&1; then
  echo "e2e-kind-clean: kind not installed: nothing to delete"
elif kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "e2e-kind-clean: no kind cluster named $CLUSTER"
fi
rm -rf "$IMAGES_OUT/e2e-kind"
