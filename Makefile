# Entry point for everything. Run as root on Linux (netns, iptables).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build release test test-host test-vm lint fmt bench demo images clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --workspace --bins --release

# Everything CI runs: unit tests, netns integration tests and the in-pod
# end-to-end scenarios on this kernel, the chart checks, then the GENEVE tests
# in one VM boot. Tests that need binaries find them in target/debug (built
# first).
test: deps test-host test-chart test-vm

test-host: deps
	$(CARGO) build --workspace --bins --tests
	$(CARGO) test --workspace -- --test-threads=2

# Two-node simulated cluster, a client and a server, before/after
# `kubectl label namespace demo istio.io/dataplane-mode=ambient` (root).
demo:
	scripts/demo.sh

# Tests that need kernel features this machine lacks (GENEVE), run in one
# throw-away VM boot (../shared/tools/in-vm); see scripts/vm-tests.sh.
test-vm: deps
	scripts/vm-tests.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

# --- Chart, images, kind (issue 9; charts/README.md, e2e/kind/README.md) -----
.PHONY: test-chart e2e-kind e2e-kind-clean

# Offline chart checks: render every documented values combination with real
# Helm, validate against Kubernetes schemas, security properties, env golden
# files, bad values refused; shellcheck of the chart's scripts.
test-chart: deps
	cd charts/tests && python3 -m unittest -v test_chart test_images test_contract

# localhost/geneva-mesh/{ztunnel,node-agent}:dev, offline (buildah, or docker/
# podman with BUILDER=...), plus docker-archive tarballs in target/images-out.
images: deps
	images/build.sh

# Needs docker, kind, kubectl and helm (cannot run on the build machine).
e2e-kind:
	e2e/kind/run.sh

e2e-kind-clean:
	e2e/kind/clean.sh

# --- Benchmarks: data plane vs direct, agent memory, CNI ADD latency, policy ---------
# bench/run.sh writes bench/RESULTS.md (raw outputs in target/bench/).
# BENCH_SECONDS sets the length of each data-plane measurement.
# ISTIO_ZTUNNEL=PATH also measures Istio's own ztunnel in the same run and
# topology (`make istio-ztunnel` builds one from a checkout, ISTIO_ZTUNNEL_SRC).
BENCH_SECONDS ?= 10
bench: deps
	BENCH_SECONDS=$(BENCH_SECONDS) bench/run.sh

.PHONY: istio-ztunnel test-interop
istio-ztunnel:
	bench/build-istio-ztunnel.sh $(ISTIO_ZTUNNEL_SRC)

# Interop with Istio's own ztunnel (e2e/tests/istio_interop.rs): HBONE, L4
# policy and double HBONE through an east-west gateway both ways between this
# ztunnel and Istio's, Istio's ztunnel serving
# pods that this node agent enrols over ZDS; and (e2e/tests/ca.rs) Istio's
# ztunnel getting its own and its pods' certificates from the built-in CA; and
# (e2e/tests/xds.rs) Istio's ztunnel taking the istiod xDS double's resources,
# identifying itself to it and starting on-demand subscriptions as this ztunnel
# does. Needs `make
# istio-ztunnel` first (or ISTIO_ZTUNNEL + ISTIO_ZTUNNEL_SRC); `make test`
# skips them without one.
test-interop: deps
	$(CARGO) build --workspace --bins
	$(CARGO) test -p e2e --test istio_interop -- --nocapture
	$(CARGO) test -p e2e --test ca istios_ztunnel -- --nocapture
	$(CARGO) test -p e2e --test xds istios_ztunnel -- --nocapture

# The parts alone.
.PHONY: bench-agent-memory bench-dedicated bench-cni
bench-agent-memory: deps
	bench/agent_memory.sh
bench-dedicated: deps
	$(CARGO) build --release -p ztunnel -p mesh-bench
	target/release/bench-dedicated --seconds $(BENCH_SECONDS) --results target/bench-dedicated.md
bench-cni: deps
	bench/cni.sh
