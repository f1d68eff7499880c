# chatrelease-operator. Two commands matter on a fresh machine:
#   make demo   a full canary rollout on a local control plane, narrated, then torn down
#   make test   every test: unit, reconciler, scenarios, and end to end on a real control plane
# Every tool the tests need is built or installed by these targets and cached outside the repo
# in $(TOOLS_DIR) (see tests/cluster/README.md).

SHELL := /bin/bash
CARGO ?= cargo

include tests/cluster/tools.mk
include charts/chart.mk
include tests/e2e/e2e.mk
include tests/cluster/demo.mk

.PHONY: all build test unit-test fresh-clone-test lint fmt crds bench-judge

all: build

build:
	$(CARGO) build --release --bins

## Every test. The unit tests first: they are quick and need no control plane; then the chart's
## alerts through promtool.
test: unit-test alert-test fresh-clone-test e2e

## Judge, state machine, every scenario in tests/scenarios (and ../shared/scenarios when it
## exists), reconciler on a mocked API server, our routes against Istio's CRDs, CLI, chart checks
## that need no cluster, our HTTPRoutes against the Gateway API's CRDs.
unit-test: $(HELM) $(ISTIO_CRDS) $(GATEWAY_API_CRDS)
	HELM='$(HELM)' ISTIO_CRDS='$(ISTIO_CRDS)' GATEWAY_API_CRDS='$(GATEWAY_API_CRDS)' \
	  $(CARGO) test --all-targets

## The unit tests again in a clone of HEAD in an empty folder: nothing may come from outside the
## repository (no ../shared), and the README's set-up commands stay `make demo` and `make test`.
fresh-clone-test: $(HELM) $(ISTIO_CRDS) $(GATEWAY_API_CRDS)
	@TOOLS_DIR='$(TOOLS_DIR)' MAKE='$(MAKE)' bash tests/fresh_clone.sh

## Today's fixed-interval judge beside the sequential test on synthetic traffic (no cluster):
## false rollbacks and time to rollback, printed as a table. BENCH_JUDGE_RUNS=1000 runs a row.
bench-judge:
	$(CARGO) bench --bench judge

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

## Regenerate crds/ (and the chart's copy) from the Rust types.
crds:
	$(CARGO) run --quiet --bin chatrelease-operator -- crd > crds/chatrelease.yaml
	cp crds/chatrelease.yaml $(CHART_DIR)/crds/chatrelease.yaml
