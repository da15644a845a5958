#!/usr/bin/env bash
# Installs every system package the build, the tests and the demo need.
# Idempotent; run as root on Debian/Ubuntu.
set -euo pipefail

PKGS=(
  iptables ipset nftables iproute2 procps psmisc kmod
  containernetworking-plugins
  protobuf-compiler libprotobuf-dev
  tcpdump tshark iperf3 sockperf wrk
  shellcheck socat netcat-openbsd
  buildah binutils openssl jq
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get -qq -o DPkg::Lock::Timeout=600 update
  DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 \
    install -y --no-install-recommends "${missing[@]}" >/dev/null
fi

# kubectl drives the simulated cluster in the e2e scenarios and the demo:
# the kubectl package where a Kubernetes/Google Cloud apt source offers it,
# else Debian's kubernetes-client.
if ! command -v kubectl >/dev/null; then
  apt-get -qq -o DPkg::Lock::Timeout=600 update
  if apt-cache show kubectl >/dev/null 2>&1; then k=kubectl; else k=kubernetes-client; fi
  echo "install-deps: installing $k (kubectl)"
  DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 \
    install -y --no-install-recommends "$k" >/dev/null
fi

# Python tools used by the chart tests (real Helm as a library, schema checks).
if ! python3 -c 'import helm_python' 2>/dev/null || ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "install-deps: installing helm-python-sdk kubernetes-validate (PyPI)"
  python3 -m pip install -q helm-python-sdk kubernetes-validate
fi
