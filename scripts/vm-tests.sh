#!/usr/bin/env bash
# Runs the tests that need kernel features this machine lacks (GENEVE) in a
# throw-away VM (../shared/tools/in-vm, or $IN_VM), all in one boot.
#
#   scripts/vm-tests.sh              # every VM test binary
#   scripts/vm-tests.sh FILTER       # only tests whose name contains FILTER
#
# Test binaries are built here, on the host, then run inside the VM, which
# shares the repository (read-write) and the host's root (read-only). Inside
# the VM GENEVE_TESTS_REQUIRED=1 makes a missing GENEVE a failure, not a skip.
# Env: IN_VM (path of the in-vm tool; missing: skipped with a message unless
# VM_TESTS_REQUIRED=1), IN_VM_TIMEOUT (default 900 s),
# CARGO (cargo), VM_TEST_THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- inside the VM: scripts/vm-tests.sh --inside THREADS FILTER BINARY... ---
if [ "${1:-}" = --inside ]; then
  threads=$2 filter=$3; shift 3
  export GENEVE_TESTS_REQUIRED=1 RUST_BACKTRACE=1
  rc=0 start=$(date +%s.%N)
  for b in "$@"; do
    echo "=== vm-tests: $b"
    t0=$(date +%s.%N)
    # --nocapture: the scenarios print their progress, so a run cut off by
    # the VM's timeout still shows how far it got.
    if [ -n "$filter" ]; then "./$b" --nocapture --test-threads="$threads" "$filter" || rc=1
    else "./$b" --nocapture --test-threads="$threads" || rc=1; fi
    echo "=== vm-tests: $b took $(elapsed "$t0") s"
  done
  echo "=== vm-tests: all test binaries took $(elapsed "$start") s inside the VM"
  exit "$rc"
fi

# --- on the host ---
ROOT=$PWD
IN_VM=${IN_VM:-$ROOT/../shared/tools/in-vm}
CARGO=${CARGO:-cargo}
if [ ! -x "$IN_VM" ]; then
  # Without the VM tool GENEVE cannot be tested on a kernel lacking it: say
  # so loudly; VM_TESTS_REQUIRED=1 turns this into a failure.
  echo "vm-tests: SKIPPED: $IN_VM not found or not executable; the GENEVE tests did not run" >&2
  [ "${VM_TESTS_REQUIRED:-0}" = 1 ] && exit 2
  exit 0
fi

# package:test-target pairs that need the VM.
TARGETS=(node-agent:geneve_redirect)
if [ -f e2e/tests/geneve.rs ]; then TARGETS+=(e2e:geneve); fi
if [ -f e2e/tests/control_loop_geneve.rs ]; then TARGETS+=(e2e:control_loop_geneve); fi
if [ -f e2e/tests/scenarios_geneve.rs ]; then TARGETS+=(e2e:scenarios_geneve); fi

# End-to-end tests run the real programs from target/debug. Everything is
# built for the whole workspace, exactly as `make test-host` builds it: a
# per-package build resolves other dependency features and would recompile
# half the dependency graph.
"$CARGO" build --workspace --bins --tests
artifacts=$("$CARGO" test --workspace --no-run --message-format=json |
  jq -r 'select(.reason == "compiler-artifact" and .profile.test == true and .executable != null
    and (.target.kind | index("test"))) | "\(.package_id) \(.target.name) \(.executable)"')

bins=()
for t in "${TARGETS[@]}"; do
  pkg=${t%%:*} test=${t#*:}
  # package_id: "path+file:///.../<dir>#<name>@<version>" (or "<name> <version> (...)").
  exe=$(awk -v pkg="$pkg" -v test="$test" '
    $2 == test && ($1 ~ ("#" pkg "@") || $1 ~ ("/" pkg "#") || $1 == pkg) { print $3 }' <<<"$artifacts" | tail -1)
  if [ -z "$exe" ] || [ ! -x "$exe" ]; then
    echo "vm-tests: cannot find the test binary of $pkg --test $test" >&2
    exit 1
  fi
  bins+=("${exe#"$ROOT"/}")
done

t0=$(date +%s.%N)
rc=0
IN_VM_TIMEOUT=${IN_VM_TIMEOUT:-900} "$IN_VM" scripts/vm-tests.sh --inside \
  "${VM_TEST_THREADS:-2}" "${1:-}" "${bins[@]}" || rc=$?
echo "vm-tests: VM run (boot included) took $(elapsed "$t0") s, exit $rc"
exit "$rc"
