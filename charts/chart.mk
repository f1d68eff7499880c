# The Helm chart's tools and checks. Included by the top-level Makefile after tools.mk (it uses
# TOOLS_DIR, CLUSTER_TOOLS_ENV, CLUSTER_SCRIPTS_DIR and the tools targets from there):
#   include charts/chart.mk
#
#   make helm          build Helm from the Go module proxy into $(TOOLS_DIR) (idempotent)
#   make chart-crds    copy crds/chatrelease.yaml into the chart (after `make crds`)
#   make chart-lint    the checks that need Helm but no cluster: lint, schema, rendered RBAC
#   make chart-test    all of tests/helm_chart.rs, with the server-side dry runs and the operator
#                      running under the chart's RBAC, on E2E_STATE_DIR's control plane if set,
#                      else on a throw-away one it starts and stops
#   make chart-package package the chart into .local/charts/

CHART_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
CHART_DIR := $(CHART_MK_DIR)/chatrelease-operator

# The latest Helm 3 release on the Go module proxy when this was written.
HELM_VERSION ?= v3.22.0
HELM ?= $(TOOLS_DIR)/helm/$(HELM_VERSION)/bin/helm
CHART_STATE_DIR ?= $(CURDIR)/.local/chart-test
CARGO ?= cargo

.PHONY: helm chart-crds chart-lint chart-test chart-package

helm: $(HELM)

$(HELM):
	@TOOLS_DIR='$(TOOLS_DIR)' HELM_VERSION='$(HELM_VERSION)' bash $(CHART_MK_DIR)/install-helm.sh

# The chart ships a copy of the generated CRD (Helm installs crds/ before the templates); the
# test the_charts_crd_is_the_generated_one fails when the copy is stale.
chart-crds:
	cp crds/chatrelease.yaml $(CHART_DIR)/crds/chatrelease.yaml

# Everything in tests/helm_chart.rs except what needs an API server.
chart-lint: $(HELM)
	HELM='$(HELM)' $(CARGO) test --test helm_chart -- --include-ignored --skip api_server::

chart-test: tools $(HELM)
	@set -euo pipefail; \
	state='$(E2E_STATE_DIR)'; \
	if [ -z "$$state" ]; then \
	  state='$(CHART_STATE_DIR)'; \
	  $(CARGO) test --no-run --test helm_chart; \
	  $(CLUSTER_TOOLS_ENV) bash $(CLUSTER_SCRIPTS_DIR)/up.sh "$$state" >/dev/null; \
	  trap 'bash $(CLUSTER_SCRIPTS_DIR)/down.sh "'"$$state"'" >/dev/null' EXIT; \
	fi; \
	HELM='$(HELM)' E2E_STATE_DIR="$$state" $(CARGO) test --test helm_chart -- --include-ignored

chart-package: $(HELM)
	$(HELM) package $(CHART_DIR) --destination .local/charts
