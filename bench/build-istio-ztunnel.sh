#!/usr/bin/env bash
# Builds Istio's own ztunnel for the same-run comparison of `make bench`
# (ISTIO_ZTUNNEL=... make bench), and prints the binary's path.
#
#   bench/build-istio-ztunnel.sh [SRC]
#
# SRC: a checkout of https://github.com/istio/ztunnel (default: cloned into
# target/istio-ztunnel/src). The build runs on a copy in target/istio-ztunnel/build:
# its Cargo.toml loses the optional tls-boring provider (a git dependency; only
# crates.io is reachable here) and the binary is built with upstream's release
# profile plus `--features testing`, which provides FAKE_CA (its built-in test
# CA, which the benchmark uses instead of istiod).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$PWD/target/istio-ztunnel
SRC=${1:-$WORK/src}
if [ ! -f "$SRC/Cargo.toml" ]; then
  echo "cloning istio/ztunnel into $SRC" >&2
  git clone --depth 1 https://github.com/istio/ztunnel "$SRC" >&2
fi
grep -q '^name = "ztunnel"' "$SRC/Cargo.toml" || { echo "$SRC is not a checkout of istio/ztunnel" >&2; exit 1; }
mkdir -p "$WORK/build"
# Sources and git metadata (its build reports the revision); the vendored FIPS
# libraries and any old build output stay behind.
tar -C "$SRC" --exclude=./target --exclude=./out --exclude=./vendor -cf - . | tar -C "$WORK/build" -xf -
sed -i -e '/^boring-rustls-provider = /d' -e 's/^tls-boring = .*/tls-boring = []/' "$WORK/build/Cargo.toml"
rev=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "building istio/ztunnel $rev (release, --features testing); this takes a while" >&2
# (Upstream's .cargo/config.toml, kept: frame pointers on; the target dir is set here.)
(cd "$WORK/build" && cargo build --release --features testing --bin ztunnel --target-dir "$WORK/target" >&2)
echo "$WORK/target/release/ztunnel"
