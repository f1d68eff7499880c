# chatrelease-operator. Two commands matter on a fresh machine:
#   make demo   a full canary rollout on a local control plane, narrated
#   make test   every test
# Tools the tests need are built or installed by targets in tests/cluster/tools.mk, cached
# outside the repo in $(TOOLS_DIR).

SHELL := /bin/bash
CARGO ?= cargo

include tests/cluster/tools.mk

.PHONY: all build test unit-test lint fmt crds check-crds

all: build

build:
	$(CARGO) build --release --bins

## Every test: unit tests (judge, state machine, scenarios, reconciler on a mocked API server).
test: unit-test

unit-test:
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

## Regenerate crds/ from the Rust types.
crds:
	$(CARGO) run --quiet --bin chatrelease-operator -- crd > crds/chatrelease.yaml
