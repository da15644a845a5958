# Entry point for everything. Run as root on Linux (netns, iptables).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build release test test-unit test-e2e test-vm lint fmt bench demo images clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --workspace --bins --release

# Unit tests, netns integration tests and end-to-end scenarios. Tests that need
# binaries find them in target/debug (built first).
test: deps
	$(CARGO) build --workspace --bins --tests
	$(CARGO) test --workspace -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
