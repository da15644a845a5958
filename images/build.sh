#!/usr/bin/env bash
# `make images`: builds localhost/geneva-mesh/{ztunnel,node-agent}:dev with no
# registry access:
#   1. static binaries (images/build-binaries.sh),
#   2. one root filesystem per image (images/assemble-rootfs.sh; iptables and
#      ipset come from this machine's Debian packages),
#   3. FROM scratch images from those trees (images/Dockerfile.prebuilt),
#   4. docker-archive tarballs next to them, which `kind load image-archive`
#      takes whatever the builder was.
#
# env: HUB (localhost/geneva-mesh)  TAG (dev)  OUT_DIR (target/images-out)
#      BUILDER (auto | buildah | docker | podman; auto prefers buildah)
#      BIN_DIR: use these prebuilt static binaries instead of step 1
#      CARGO_TARGET_DIR: cargo target dir for step 1 (default target)
set -euo pipefail

die() { echo "images: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HUB=${HUB:-localhost/geneva-mesh}
TAG=${TAG:-dev}
OUT_DIR=${OUT_DIR:-$REPO/target/images-out}
BUILDER=${BUILDER:-auto}
IMAGES=(ztunnel node-agent)

if [ "$BUILDER" = auto ]; then
  for b in buildah docker podman; do
    if command -v "$b" >/dev/null; then BUILDER=$b; break; fi
  done
  [ "$BUILDER" != auto ] || die "no image builder found: install buildah (apt-get install buildah; scripts/install-deps.sh does) or docker/podman"
fi
command -v "$BUILDER" >/dev/null || die "BUILDER=$BUILDER is not installed"
if [ "$BUILDER" = docker ] && ! docker info >/dev/null 2>&1; then
  die "docker is installed but its daemon is not reachable; start it or use BUILDER=buildah"
fi

# 1. binaries
if [ -z "${BIN_DIR:-}" ]; then
  BIN_DIR=$OUT_DIR/bin
  rm -rf "$BIN_DIR"
  (cd "$REPO" && images/build-binaries.sh "$BIN_DIR")
fi
for b in ztunnel node-agent istio-cni; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing"
done

# 2. root filesystems (the build context)
CONTEXT=$OUT_DIR/context
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
"$REPO/images/assemble-rootfs.sh" "$CONTEXT/rootfs-ztunnel" \
  --binary "$BIN_DIR/ztunnel:/usr/local/bin/ztunnel"
"$REPO/images/assemble-rootfs.sh" "$CONTEXT/rootfs-node-agent" --iptables \
  --binary "$BIN_DIR/node-agent:/usr/local/bin/node-agent" \
  --binary "$BIN_DIR/istio-cni:/opt/istio-cni/bin/istio-cni"

# 3 + 4. images and archives
for image in "${IMAGES[@]}"; do
  ref="$HUB/$image:$TAG"
  archive="$OUT_DIR/$image.tar"
  rm -f "$archive"
  echo "images: building $ref with $BUILDER"
  case "$BUILDER" in
    buildah)
      buildah bud --isolation chroot --layers=false --quiet \
        -f "$REPO/images/Dockerfile.prebuilt" --target "$image" -t "$ref" "$CONTEXT"
      buildah push --quiet "$ref" "docker-archive:$archive:$ref"
      ;;
    docker | podman)
      "$BUILDER" build -f "$REPO/images/Dockerfile.prebuilt" --target "$image" -t "$ref" "$CONTEXT"
      "$BUILDER" save -o "$archive" "$ref"
      ;;
    *) die "unknown BUILDER=$BUILDER" ;;
  esac
  echo "images: $ref -> $archive ($(du -h "$archive" | cut -f1))"
done
