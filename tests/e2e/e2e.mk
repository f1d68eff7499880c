# End-to-end tests (tests/e2e.rs): the operator as a process against a real local control plane.
# Included by the top-level Makefile after tests/cluster/tools.mk:   include tests/e2e/e2e.mk
#
#   make e2e         build, start a control plane in $(E2E_STATE), run every end-to-end test,
#                    stop the control plane (always), exit with the tests' status
#   make e2e-build   only build the test and the binaries it starts
#
#   make e2e E2E_FILTER=rollback   only the tests whose name contains "rollback"
#
# Logs of each test's operator and mesh simulator stay in $(E2E_STATE)/logs/e2e/<namespace>/.

E2E_DIR     := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
E2E_STATE   ?= $(CURDIR)/.local/e2e
E2E_THREADS ?= 9
E2E_TIMEOUT ?= 900
E2E_FILTER  ?=
# Every test binary whose #[ignore]d tests need a running control plane (or, for
# prometheus_queries, the Prometheus it installs).
E2E_TESTS   ?= --test e2e --test leader_election --test helm_chart --test prometheus_queries

.PHONY: e2e e2e-build

# Compiling first keeps the build out of the control plane's lifetime and the tests' timeouts.
e2e-build:
	$(CARGO) test $(E2E_TESTS) --no-run

e2e: tools $(HELM) e2e-build
	@$(CLUSTER_TOOLS_ENV) CARGO='$(CARGO)' E2E_THREADS='$(E2E_THREADS)' E2E_TIMEOUT='$(E2E_TIMEOUT)' \
	  E2E_TESTS='$(E2E_TESTS)' HELM='$(HELM)' \
	  bash $(E2E_DIR)/run.sh '$(E2E_STATE)' $(E2E_FILTER)
