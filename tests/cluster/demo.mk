# `make cluster`, `make cluster-down` and `make demo` (see tests/cluster/README.md).
# Included by the top-level Makefile after tools.mk:   include tests/cluster/demo.mk
# (it includes tools.mk itself when that was not done, so `make -f tests/cluster/demo.mk demo`
# works too).
#
#   make cluster        control plane + Prometheus + mesh simulator + operator, left running;
#                       kubeconfig in .local/kubeconfig
#   make cluster-down   stop all of it
#   make demo           a good release promoted and a bad one rolled back, narrated, then torn down
#   make bench          the operator's memory and reconcile figures with BENCH_RELEASES
#                       ChatReleases (default 100), printed, then torn down

DEMO_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
ifndef CLUSTER_TOOLS_ENV
include $(DEMO_MK_DIR)/tools.mk
endif

CARGO ?= cargo
# Where `cargo build --release` puts the operator, the simulator and kubectl-chatrelease.
CHATRELEASE_BIN_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release
# tools.mk's CLUSTER_STATE_DIR (.local/cluster) is `make cluster`'s; the demo has its own, so
# both can run at once.
DEMO_STATE_DIR ?= $(CURDIR)/.local/demo
BENCH_STATE_DIR ?= $(CURDIR)/.local/bench
BENCH_RELEASES ?= 100
LOCAL_KUBECONFIG ?= $(CURDIR)/.local/kubeconfig
# Requests per second the mesh simulator sends through each VirtualService: at 100, a 5% canary
# gets ~70 requests per 10s window, well over demo-release.yaml's minRequests of 20.
MESHSIM_RPS ?= 100

# `make tools` in a sub-make, with a line every 30s while a cold build runs (~25 min on 2 cores).
DEMO_TOOLS = bash $(DEMO_MK_DIR)/progress.sh "building the control plane's tools" \
  "the first build takes ~25 min on 2 cores; later runs reuse $(TOOLS_DIR)" \
  $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) tools
DEMO_BINS = $(CARGO) build --release --bins
DEMO_ENV = $(CLUSTER_TOOLS_ENV) CHATRELEASE_BIN_DIR='$(CHATRELEASE_BIN_DIR)' MESHSIM_RPS='$(MESHSIM_RPS)'

.PHONY: cluster cluster-down demo bench

cluster:
	@$(DEMO_TOOLS)
	$(DEMO_BINS)
	@$(DEMO_ENV) KUBECONFIG_COPY='$(LOCAL_KUBECONFIG)' STOP_HINT='make cluster-down' \
	  bash $(DEMO_MK_DIR)/cluster.sh up '$(CLUSTER_STATE_DIR)'

cluster-down:
	@bash $(DEMO_MK_DIR)/cluster.sh down '$(CLUSTER_STATE_DIR)'
	@rm -f '$(LOCAL_KUBECONFIG)'

demo:
	@$(DEMO_TOOLS)
	$(DEMO_BINS)
	@$(DEMO_ENV) bash $(DEMO_MK_DIR)/demo.sh '$(DEMO_STATE_DIR)'

bench:
	@$(DEMO_TOOLS)
	$(DEMO_BINS)
	@$(DEMO_ENV) bash $(DEMO_MK_DIR)/bench.sh '$(BENCH_STATE_DIR)' '$(BENCH_RELEASES)'
