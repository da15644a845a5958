#!/usr/bin/env bash
# Assembles an image root filesystem from files of the machine it runs on, so
# images can be built with no registry (`FROM scratch` + this tree). The
# multi-stage Dockerfile runs the same script inside a Debian stage.
#
# usage: assemble-rootfs.sh DEST [--iptables] [--binary SRC:PATH]...
#   DEST              directory to fill (created; must be empty or absent)
#   --iptables        add iptables (nft + legacy), ip6tables, ipset and nft
#                     (native nftables, NATIVE_NFTABLES=true), with their
#                     extensions and shared libraries, from this machine
#   --binary SRC:PATH copy the static executable SRC to DEST/PATH; refuses a
#                     dynamically linked one (the image has no libc for it,
#                     and the CNI plugin runs on the host's own filesystem)
set -euo pipefail

die() { echo "assemble-rootfs: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: assemble-rootfs.sh DEST [--iptables] [--binary SRC:PATH]..."
DEST=$1
shift
if [ -e "$DEST" ] && [ -n "$(ls -A "$DEST")" ]; then
  die "$DEST is not empty"
fi

WANT_IPTABLES=0
BINARIES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --iptables) WANT_IPTABLES=1 ;;
    --binary) [ $# -ge 2 ] || die "--binary needs SRC:PATH"; BINARIES+=("$2"); shift ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done

# --- base layout: merged /usr, /var/run -> /run, users, name service ----------
mkdir -p "$DEST"/{etc,tmp,run,var,proc,sys,dev,usr/bin,usr/sbin,usr/lib,usr/local/bin,opt}
chmod 1777 "$DEST/tmp"
ln -s usr/bin "$DEST/bin"
ln -s usr/sbin "$DEST/sbin"
ln -s usr/lib "$DEST/lib"
# CNI events name netns as /var/run/netns/... or /run/netns/...; both resolve.
ln -s ../run "$DEST/var/run"
cat > "$DEST/etc/passwd" <<'EOF'
root:x:0:0:root:/:/sbin/nologin
nonroot:x:65532:65532:nonroot:/:/sbin/nologin
EOF
cat > "$DEST/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
echo "hosts: files dns" > "$DEST/etc/nsswitch.conf"

# --- static binaries ------------------------------------------------------------
is_static() {
  # No program interpreter and no NEEDED entries: static (or static-pie).
  ! readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter' &&
    ! readelf -d "$1" 2>/dev/null | grep -q '(NEEDED)'
}
for spec in "${BINARIES[@]}"; do
  src=${spec%%:*}
  path=${spec#*:}
  if [ -z "$src" ] || [ -z "$path" ] || [ "$src" = "$spec" ]; then
    die "--binary $spec: expected SRC:PATH"
  fi
  [ -f "$src" ] || die "binary $src does not exist (build it first: make images builds it)"
  readelf -h "$src" >/dev/null 2>&1 || die "$src is not an ELF executable"
  is_static "$src" || die "$src is dynamically linked; build with -C target-feature=+crt-static"
  mkdir -p "$DEST/$(dirname "$path")"
  install -m 0755 "$src" "$DEST/$path"
done

# --- iptables / ipset -----------------------------------------------------------
copy_file() { # host path -> same path in DEST, dereferenced
  local f=$1
  [ -e "$DEST$f" ] && return 0
  mkdir -p "$DEST$(dirname "$f")"
  cp -L "$f" "$DEST$f"
}
copy_with_libs() {
  local f=$1 lib
  copy_file "$f"
  # ldd lines: "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
  while read -r lib; do
    [ -n "$lib" ] && copy_file "$lib"
  done < <(ldd "$f" 2>/dev/null | sed -nE 's#^\s*(\S+ => )?(/\S+) \(0x[0-9a-f]+\)$#\2#p')
}

if [ "$WANT_IPTABLES" = 1 ]; then
  for tool in xtables-nft-multi xtables-legacy-multi ipset nft; do
    command -v "$tool" >/dev/null || die "$tool not found: install the iptables, ipset and nftables packages"
  done
  xtables_dir=""
  for d in /usr/lib/*/xtables /usr/lib/xtables /usr/lib64/xtables; do
    [ -d "$d" ] && { xtables_dir=$d; break; }
  done
  [ -n "$xtables_dir" ] || die "iptables extensions directory (…/xtables) not found"
  # ldd output names /lib/... and /lib64/...; keep those paths valid.
  if [ -L /lib64 ] || [ -d /lib64 ]; then
    mkdir -p "$DEST/usr/lib64"
    ln -s usr/lib64 "$DEST/lib64"
  fi
  for tool in xtables-nft-multi xtables-legacy-multi ipset nft; do
    real=$(readlink -f "$(command -v "$tool")")
    copy_with_libs "$real"
    [ "$real" = "/usr/sbin/$tool" ] || ln -sf "$real" "$DEST/usr/sbin/$tool"
  done
  for ext in "$xtables_dir"/*.so; do
    copy_with_libs "$ext"
  done
  # The multi binaries dispatch on argv[0]. Unqualified names are nft, as on
  # Debian; the node agent always calls the -nft or -legacy variant.
  for fam in iptables ip6tables; do
    for op in "" -save -restore; do
      ln -s xtables-nft-multi "$DEST/usr/sbin/$fam-nft$op"
      ln -s xtables-legacy-multi "$DEST/usr/sbin/$fam-legacy$op"
      ln -s xtables-nft-multi "$DEST/usr/sbin/$fam$op"
    done
  done
  # Protocol names for -p and for iptables-save output.
  [ -f /etc/protocols ] && cp /etc/protocols "$DEST/etc/protocols"
fi

echo "assemble-rootfs: $DEST ready ($(du -sh "$DEST" | cut -f1))"
