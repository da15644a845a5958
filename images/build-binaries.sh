#!/usr/bin/env bash
# Builds the three programs as static executables and copies them to OUT_DIR.
#
# usage: build-binaries.sh OUT_DIR
# env:   CARGO (cargo), CARGO_TARGET_DIR (target), PROFILE (release),
#        CARGO_BUILD_FLAGS (extra cargo flags, e.g. --locked for release builds)
#        STRIP_DEBUG (1: drop DWARF from the copies, keeping symbol names for
#        backtraces; the release profile keeps line tables, ~4x the size)
#
# Static on the gnu target with crt-static (no musl toolchain needed). The
# flag is passed for the target triple only, so build scripts and proc macros
# stay dynamic as they must.
set -euo pipefail

die() { echo "build-binaries: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: build-binaries.sh OUT_DIR"
OUT=$1
CARGO=${CARGO:-cargo}
PROFILE=${PROFILE:-release}
TARGET_DIR=${CARGO_TARGET_DIR:-target}

triple=$(rustc -vV | sed -n 's/^host: //p')
[ -n "$triple" ] || die "cannot determine the host target triple from rustc -vV"
case "$triple" in
  *-linux-gnu) ;;
  *) die "static build expects a *-linux-gnu host, got $triple" ;;
esac
var="CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
export "$var=${!var:-} -C target-feature=+crt-static"

echo "build-binaries: $CARGO build --profile $PROFILE --target $triple ($var='${!var}')"
# shellcheck disable=SC2086  # CARGO_BUILD_FLAGS is a list of flags
"$CARGO" build ${CARGO_BUILD_FLAGS:-} --profile "$PROFILE" --target "$triple" --target-dir "$TARGET_DIR" \
  -p ztunnel -p node-agent -p istio-cni --bins

dir=$PROFILE
[ "$PROFILE" = dev ] && dir=debug
mkdir -p "$OUT"
for bin in ztunnel node-agent istio-cni; do
  src="$TARGET_DIR/$triple/$dir/$bin"
  [ -x "$src" ] || die "$src was not built"
  if readelf -l "$src" | grep -q 'Requesting program interpreter' || readelf -d "$src" | grep -q '(NEEDED)'; then
    die "$src is dynamically linked despite crt-static"
  fi
  install -m 0755 "$src" "$OUT/$bin"
  if [ "${STRIP_DEBUG:-1}" = 1 ]; then
    strip --strip-debug "$OUT/$bin"
  fi
done
ls -l "$OUT"
