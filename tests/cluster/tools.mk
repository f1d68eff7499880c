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
# Istio's networking CRDs (VirtualService, DestinationRule) as that Istio release publishes them in
# the istio.io/api Go module (kubernetes/customresourcedefinitions.gen.yaml): the newest release on
# the Go module proxy when this was written. The API server validates every route we write against
# them, and the unit tests check our objects against the same file.
ISTIO_VERSION ?= v1.32.0
# The Gateway API's standard-channel CRDs (HTTPRoute, Gateway, GatewayClass, ReferenceGrant and
# the rest of the channel) from the sigs.k8s.io/gateway-api Go module (config/crd/standard), with
# their CEL rules: the API server validates every HTTPRoute we write against them, and the unit
# tests check our objects against the same file. v1.6.3: the newest this machine's Go (1.26) takes;
# v1.7 needs Go 1.27.
GATEWAY_API_VERSION ?= v1.6.3
# Istio's validating webhook (tests/istio-webhook), so the API server refuses what istiod would.
# istio.io/istio publishes only pseudo-versions: this is a release-1.31 commit of 2026-08-27
# (VERSION file 1.31) whose go.mod requires istio.io/api at the v1.31.0 commit, the closest of the
# served ones to ISTIO_VERSION (the others pair with api 1.30). tests/istio-webhook/go.mod must
# require the same version.
ISTIO_WEBHOOK_VERSION ?= v0.0.0-20260827124520-eed52ebb66ad

KUBE_BIN_DIR             = $(TOOLS_DIR)/kubernetes/$(K8S_VERSION)/bin
KUBE_APISERVER          ?= $(KUBE_BIN_DIR)/kube-apiserver
KUBE_CONTROLLER_MANAGER ?= $(KUBE_BIN_DIR)/kube-controller-manager
KUBE_SCHEDULER          ?= $(KUBE_BIN_DIR)/kube-scheduler
KUBECTL                 ?= $(KUBE_BIN_DIR)/kubectl
KWOK                    ?= $(TOOLS_DIR)/kwok/$(KWOK_VERSION)/bin/kwok
KWOK_STAGES_DIR         ?= $(TOOLS_DIR)/go/mod/sigs.k8s.io/kwok@$(KWOK_VERSION)/kustomize/stage
ETCD                    ?= $(TOOLS_DIR)/etcd/$(ETCD_VERSION)/bin/etcd
PROMETHEUS_BIN          ?= /usr/bin/prometheus
ISTIO_CRDS              ?= $(TOOLS_DIR)/istio/$(ISTIO_VERSION)/networking-crds.yaml
GATEWAY_API_CRDS        ?= $(TOOLS_DIR)/gateway-api/$(GATEWAY_API_VERSION)/standard-crds.yaml
# Keyed by a hash of the module's files as well, so a changed main.go is a new (missing) target.
ISTIO_WEBHOOK_SRC       := $(CLUSTER_SCRIPTS_DIR)/../istio-webhook
ISTIO_WEBHOOK_KEY       := $(shell cd '$(ISTIO_WEBHOOK_SRC)' && sha256sum go.mod go.sum main.go | sha256sum | cut -c1-12)
ISTIO_WEBHOOK           ?= $(TOOLS_DIR)/istio-webhook/$(ISTIO_WEBHOOK_VERSION)-$(ISTIO_WEBHOOK_KEY)/bin/istio-webhook

# Environment handed to tools.sh, up.sh and down.sh.
CLUSTER_TOOLS_ENV = TOOLS_DIR='$(TOOLS_DIR)' K8S_VERSION='$(K8S_VERSION)' \
  KWOK_VERSION='$(KWOK_VERSION)' ETCD_VERSION='$(ETCD_VERSION)' ISTIO_VERSION='$(ISTIO_VERSION)' \
  KUBE_APISERVER='$(KUBE_APISERVER)' KUBE_CONTROLLER_MANAGER='$(KUBE_CONTROLLER_MANAGER)' \
  KUBE_SCHEDULER='$(KUBE_SCHEDULER)' KUBECTL='$(KUBECTL)' KWOK='$(KWOK)' \
  KWOK_STAGES_DIR='$(KWOK_STAGES_DIR)' ETCD='$(ETCD)' PROMETHEUS_BIN='$(PROMETHEUS_BIN)' \
  ISTIO_CRDS='$(ISTIO_CRDS)' ISTIO_WEBHOOK_VERSION='$(ISTIO_WEBHOOK_VERSION)' \
  ISTIO_WEBHOOK='$(ISTIO_WEBHOOK)' GATEWAY_API_VERSION='$(GATEWAY_API_VERSION)' \
  GATEWAY_API_CRDS='$(GATEWAY_API_CRDS)'

CLUSTER_TOOLS := $(KUBE_APISERVER) $(KUBE_CONTROLLER_MANAGER) $(KUBE_SCHEDULER) $(KUBECTL) \
  $(KWOK) $(KWOK_STAGES_DIR)/pod/fast/pod-ready.yaml $(ETCD) $(PROMETHEUS_BIN) $(ISTIO_CRDS) \
  $(GATEWAY_API_CRDS) $(ISTIO_WEBHOOK)

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

$(ISTIO_CRDS):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh istio-crds

$(GATEWAY_API_CRDS):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh gateway-api-crds

$(ISTIO_WEBHOOK):
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/tools.sh istio-webhook

tools-versions: tools
	@echo "TOOLS_DIR=$(TOOLS_DIR)"
	@echo "kube-apiserver:          $$($(KUBE_APISERVER) --version)  $(KUBE_APISERVER)"
	@echo "kube-controller-manager: $$($(KUBE_CONTROLLER_MANAGER) --version)  $(KUBE_CONTROLLER_MANAGER)"
	@echo "kube-scheduler:          $$($(KUBE_SCHEDULER) --version)  $(KUBE_SCHEDULER)"
	@echo "kubectl:                 $$($(KUBECTL) version --client 2>/dev/null | head -1)  $(KUBECTL)"
	@echo "kwok:                    $$($(KWOK) --version 2>&1 | head -1)  $(KWOK)"
	@echo "etcd:                    $$($(ETCD) --version | head -1)  $(ETCD)"
	@echo "prometheus:              $$($(PROMETHEUS_BIN) --version 2>&1 | head -1)  $(PROMETHEUS_BIN)"
	@echo "istio CRDs:              istio.io/api@$(ISTIO_VERSION)  $(ISTIO_CRDS)"
	@echo "Gateway API CRDs:        sigs.k8s.io/gateway-api@$(GATEWAY_API_VERSION)  $(GATEWAY_API_CRDS)"
	@echo "istio-webhook:           istio.io/istio@$(ISTIO_WEBHOOK_VERSION)  $(ISTIO_WEBHOOK)"

# Generic start/stop of the bare control plane; `make cluster` adds the operator on top.
CLUSTER_STATE_DIR ?= $(CURDIR)/.local/cluster
control-plane-up: tools
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/up.sh '$(CLUSTER_STATE_DIR)'

control-plane-down:
	@bash $(CLUSTER_SCRIPTS_DIR)/down.sh '$(CLUSTER_STATE_DIR)'

# Start a throw-away control plane, check Deployments/GC/VirtualService/Istio's webhook/Prometheus,
# stop it.
control-plane-smoke: tools
	@$(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/smoke.sh
