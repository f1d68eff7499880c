# Tools of the local control plane (see tests/cluster/README.md).
# Included by the top-level Makefile:   include tests/cluster/tools.mk
#
#   make tools            build/install everything below that is missing (idempotent)
#   make tools-versions   print what is installed and where
#   make control-plane-up / control-plane-down   [CLUSTER_STATE_DIR=...]
#   make control-plane-smoke   start a throw-away control plane, check it, stop it
#
# Binaries live outside the repo in $(TOOLS_DIR), one folder per tool and version, next to the
# Go build and module caches, so a rebuild after a version bump is warm.

CLUSTER_SCRIPTS_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

TOOLS_DIR ?= $(HOME)/.cache/chatrelease-tools
# Kubernetes: the latest v1.36 patch on the Go module proxy when this was written; kwok v0.8.0
# is built against the v1.36 modules. etcd: the 3.6 line that kwokctl pairs with 1.36 (Debian's
# etcd-server 3.4.23 is older than 1.36 supports, see README).
K8S_VERSION  ?= v1.36.3
KWOK_VERSION ?= v0.8.0
ETCD_VERSION ?= v3.6.16

KUBE_BIN_DIR             = $(TOOLS_DIR)/kubernetes/$(K8S_VERSION)/bin
KUBE_APISERVER          ?= $(KUBE_BIN_DIR)/kube-apiserver
KUBE_CONTROLLER_MANAGER ?= $(KUBE_BIN_DIR)/kube-controller-manager
KUBE_SCHEDULER          ?= $(KUBE_BIN_DIR)/kube-scheduler
KUBECTL                 ?= $(KUBE_BIN_DIR)/kubectl
KWOK                    ?= $(TOOLS_DIR)/kwok/$(KWOK_VERSION)/bin/kwok
KWOK_STAGES_DIR         ?= $(TOOLS_DIR)/go/mod/sigs.k8s.io/kwok@$(KWOK_VERSION)/kustomize/stage
ETCD                    ?= $(TOOLS_DIR)/etcd/$(ETCD_VERSION)/bin/etcd
PROMETHEUS_BIN          ?= /usr/bin/prometheus

# Environment handed to tools.sh, up.sh and down.sh.
CLUSTER_TOOLS_ENV = TOOLS_DIR='$(TOOLS_DIR)' K8S_VERSION='$(K8S_VERSION)' \
  KWOK_VERSION='$(KWOK_VERSION)' ETCD_VERSION='$(ETCD_VERSION)' \
  KUBE_APISERVER='$(KUBE_APISERVER)' KUBE_CONTROLLER_MANAGER='$(KUBE_CONTROLLER_MANAGER)' \
  KUBE_SCHEDULER='$(KUBE_SCHEDULER)' KUBECTL='$(KUBECTL)' KWOK='$(KWOK)' \
  KWOK_STAGES_DIR='$(KWOK_STAGES_DIR)' ETCD='$(ETCD)' PROMETHEUS_BIN='$(PROMETHEUS_BIN)'

CLUSTER_TOOLS := $(KUBE_APISERVER) $(KUBE_CONTROLLER_MANAGER) $(KUBE_SCHEDULER) $(KUBECTL) \
  $(KWOK) $(KWOK_STAGES_DIR)/pod/fast/pod-ready.yaml $(ETCD) $(PROMETHEUS_BIN)

.PHONY: tools tools-versions control-plane-up control-plane-down control-plane-smoke

tools: $(CLUSTER_TOOLS)

# One `go build` for all four Kubernetes commands shares their compilation; tools.sh builds only
# the missing ones and holds a lock, so `make -j` asking for several at once is fine.
$(KUBE_APISERVER) $(KUBE_CONTROLLER_MANAGER) $(KUBE_SCHEDULER) $(KUBECTL):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh kubernetes

$(KWOK):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh kwok

# up.sh reads kwok's Stage files from its module in the Go module cache.
$(KWOK_STAGES_DIR)/pod/fast/pod-ready.yaml: | $(KWOK)
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh kwok-stages >/dev/null

$(ETCD):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh etcd

$(PROMETHEUS_BIN):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh prometheus

tools-versions: tools
	@echo "TOOLS_DIR=$(TOOLS_DIR)"
	@echo "kube-apiserver:          $$($(KUBE_APISERVER) --version)  $(KUBE_APISERVER)"
	@echo "kube-controller-manager: $$($(KUBE_CONTROLLER_MANAGER) --version)  $(KUBE_CONTROLLER_MANAGER)"
	@echo "kube-scheduler:          $$($(KUBE_SCHEDULER) --version)  $(KUBE_SCHEDULER)"
	@echo "kubectl:                 $$($(KUBECTL) version --client 2>/dev/null | head -1)  $(KUBECTL)"
	@echo "kwok:                    $$($(KWOK) --version 2>&1 | head -1)  $(KWOK)"
	@echo "etcd:                    $$($(ETCD) --version | head -1)  $(ETCD)"
	@echo "prometheus:              $$($(PROMETHEUS_BIN) --version 2>&1 | head -1)  $(PROMETHEUS_BIN)"

# Generic start/stop of the bare control plane; `make cluster` adds the operator on top.
CLUSTER_STATE_DIR ?= $(CURDIR)/.local/cluster
control-plane-up: tools
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/up.sh '$(CLUSTER_STATE_DIR)'

control-plane-down:
	@bash $(CLUSTER_SCRIPTS_DIR)/down.sh '$(CLUSTER_STATE_DIR)'

# Start a throw-away control plane, check Deployments/GC/VirtualService/Prometheus, stop it.
control-plane-smoke: tools
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/smoke.sh
