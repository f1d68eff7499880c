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
#   make alert-test    the PrometheusRule's alerts through `promtool check rules` and
#                      `promtool test rules` (tests/alerts/); needs promtool (Debian: prometheus)

CHART_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
CHART_DIR := $(CHART_MK_DIR)/chatrelease-operator

# The latest Helm 3 release on the Go module proxy when this was written.
HELM_VERSION ?= v3.22.0
HELM ?= $(TOOLS_DIR)/helm/$(HELM_VERSION)/bin/helm
CHART_STATE_DIR ?= $(CURDIR)/.local/chart-test
CARGO ?= cargo
# Debian's prometheus package, which tools.mk installs for the control plane, ships promtool too.
PROMTOOL ?= $(dir $(PROMETHEUS_BIN))promtool
ALERT_TEST_DIR ?= $(CURDIR)/.local/alert-test

.PHONY: helm chart-crds chart-lint chart-test chart-package alert-test

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

# The alerts are written once, in templates/prometheusrule.yaml. Rendered with the chart's
# defaults as release `chatrelease` in `chatrelease-system` (the names tests/alerts/ expects),
# the PrometheusRule's spec is a plain Prometheus rule file: everything under `spec:`, two
# spaces less indented. promtool then checks it and runs the unit tests, which read the rule file
# from their own folder.
alert-test: $(HELM) $(PROMETHEUS_BIN)
	@set -euo pipefail; \
	promtool='$(PROMTOOL)'; \
	if [ -z "$$promtool" ] || [ ! -x "$$promtool" ]; then \
	  echo "alert-test: promtool not found (PROMTOOL='$(PROMTOOL)'): install Prometheus's promtool, on Debian or Ubuntu with 'apt-get install prometheus' (it ships /usr/bin/promtool), or set PROMTOOL=/path/to/promtool" >&2; \
	  exit 1; \
	fi; \
	rm -rf '$(ALERT_TEST_DIR)'; mkdir -p '$(ALERT_TEST_DIR)'; \
	$(HELM) template chatrelease $(CHART_DIR) --namespace chatrelease-system \
	  --set prometheusRule.enabled=true --show-only templates/prometheusrule.yaml \
	  > '$(ALERT_TEST_DIR)/prometheusrule.yaml'; \
	awk 'spec { sub(/^  /, ""); print } /^spec:$$/ { spec = 1 }' \
	  '$(ALERT_TEST_DIR)/prometheusrule.yaml' > '$(ALERT_TEST_DIR)/chatrelease-alerts.rules.yaml'; \
	grep -q '^groups:' '$(ALERT_TEST_DIR)/chatrelease-alerts.rules.yaml' \
	  || { echo "alert-test: no spec.groups in the rendered PrometheusRule" >&2; exit 1; }; \
	cp tests/alerts/*.test.yaml '$(ALERT_TEST_DIR)/'; \
	"$$promtool" check rules '$(ALERT_TEST_DIR)/chatrelease-alerts.rules.yaml'; \
	"$$promtool" test rules '$(ALERT_TEST_DIR)'/*.test.yaml
