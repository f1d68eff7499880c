#!/usr/bin/env bash
# smoke.sh [STATE_DIR] — start the control plane, check what the operator relies on, stop it.
# Checks: API server version, node Ready, a 2-replica Deployment's Pods Ready on the kwok node,
# garbage collection after deleting it, a networking.istio.io/v1 VirtualService, Istio's
# validating webhook (admits valid VirtualServices/DestinationRules, refuses invalid ones with
# Istio's message, passes its warnings on), Prometheus `up` and a file_sd target added at run
# time, and that down.sh leaves no process or port behind.
# Tool paths as for up.sh (tools.mk passes them: make control-plane-smoke).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
own_dir=""
if [ $# -ge 1 ]; then STATE_DIR=$1; else STATE_DIR=$(mktemp -d /tmp/chatrelease-smoke.XXXXXX); own_dir=1; fi
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
ko() { failed=$((failed + 1)); echo "FAIL: $*"; }
check() { # DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then ok "$what"; else ko "$what"; fi
}
# poll N_SECONDS COMMAND...: until it succeeds
poll() {
  local n=$1; shift
  local deadline=$((SECONDS + n))
  until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.5; done
}

t0=$SECONDS
bash "$HERE/up.sh" "$STATE_DIR" >/dev/null
echo "up.sh took $((SECONDS - t0))s"
# shellcheck disable=SC1091
. "$STATE_DIR/env"
trap 'bash "$HERE/down.sh" "$STATE_DIR" >/dev/null 2>&1 || true' EXIT
k() { "$KUBECTL" "$@"; }
ns=smoke

check "server reports ${K8S_VERSION:-v1.36}" \
  bash -c "'$KUBECTL' version -o json | grep '\"gitVersion\": \"${K8S_VERSION:-v1.36}' >/dev/null"
check "node $KWOK_NODE_NAME Ready" \
  k wait --for=condition=Ready "node/$KWOK_NODE_NAME" --timeout=30s
k create namespace "$ns" >/dev/null
k -n "$ns" create deployment web --image=registry.invalid/web:1 --replicas=2 >/dev/null
check "Deployment rolled out (2 Pods Ready)" \
  k -n "$ns" rollout status deployment/web --timeout=60s
pods_on_node() {
  [ "$(k -n "$ns" get pods -l app=web -o jsonpath='{range .items[*]}{.spec.nodeName}/{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
      | grep -c "^$KWOK_NODE_NAME/True$")" = 2 ]
}
check "both Pods Ready on $KWOK_NODE_NAME" pods_on_node
k -n "$ns" delete deployment web --wait=false >/dev/null
gone() { [ -z "$(k -n "$ns" get replicasets,pods -o name 2>/dev/null)" ]; }
check "ReplicaSet and Pods garbage-collected" poll 60 gone

vs() {
  k apply -f - >/dev/null <<EOF
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: $ns}
spec:
  hosts: [web.$ns.svc.cluster.local]
  http:
  - route:
    - {destination: {host: web.$ns.svc.cluster.local, subset: stable}, weight: 95}
    - {destination: {host: web.$ns.svc.cluster.local, subset: canary}, weight: 5}
EOF
  [ "$(k -n "$ns" get virtualservices.networking.istio.io web -o jsonpath='{.spec.http[0].route[1].weight}')" = 5 ]
}
check "VirtualService networking.istio.io/v1 created" vs

# Istio's validating webhook (up.sh registers it for every VirtualService/DestinationRule write).
admitted() { # manifest on stdin
  local out
  out=$(k apply -f - 2>&1) || { echo "  refused: $out"; return 1; }
}
refused() { # EXPECTED-MESSAGE, manifest on stdin: the API server must refuse it with Istio's message
  local out msg
  if out=$(k apply -f - 2>&1); then echo "  admitted: $out"; return 1; fi
  msg=$(printf '%s\n' "$out" | grep -F -- 'admission webhook "validation.istio.io" denied the request' \
    | grep -F -- "$1") || { echo "  not refused by Istio's webhook with that message: $out"; return 1; }
  echo "  admission webhook${msg#*admission webhook}"   # without kubectl's patch dump
}
check "Istio's webhook admits a valid VirtualService (RE2 header regex, weights 90/10)" admitted <<EOF
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-header, namespace: $ns}
spec:
  hosts: [web.$ns.svc.cluster.local]
  http:
  - match:
    - headers: {x-canary: {regex: "^(1|true)$"}}
    route:
    - {destination: {host: web.$ns.svc.cluster.local, subset: canary}}
  - route:
    - {destination: {host: web.$ns.svc.cluster.local, subset: stable}, weight: 90}
    - {destination: {host: web.$ns.svc.cluster.local, subset: canary}, weight: 10}
EOF
check "Istio's webhook refuses a VirtualService whose header regex is not RE2" \
  refused 'configuration is invalid: "headers": error parsing regexp: missing closing ): `(`' <<EOF
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-bad-regex, namespace: $ns}
spec:
  hosts: [web.$ns.svc.cluster.local]
  http:
  - match:
    - headers: {x-canary: {regex: "("}}
    route:
    - {destination: {host: web.$ns.svc.cluster.local, subset: canary}}
EOF
# An UPDATE of the VirtualService above: the operator's writes after the first are updates.
check "Istio's webhook refuses an update setting every route weight to 0" \
  refused 'configuration is invalid: total destination weight = 0' <<EOF
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: $ns}
spec:
  hosts: [web.$ns.svc.cluster.local]
  http:
  - route:
    - {destination: {host: web.$ns.svc.cluster.local, subset: stable}, weight: 0}
    - {destination: {host: web.$ns.svc.cluster.local, subset: canary}, weight: 0}
EOF
unchanged() { [ "$(k -n "$ns" get virtualservices.networking.istio.io web -o jsonpath='{.spec.http[0].route[*].weight}')" = "95 5" ]; }
check "the refused update left the VirtualService as it was (95/5)" unchanged
warned() { # manifest on stdin: admitted, and kubectl shows Istio's warning
  local out
  out=$(k apply -f - 2>&1) || { echo "  refused: $out"; return 1; }
  printf '%s\n' "$out" | grep -F 'Warning: using deprecated setting "mirrorPercent"' >/dev/null \
    || { echo "  no warning: $out"; return 1; }
}
check "Istio's webhook warnings reach the client (deprecated mirrorPercent)" warned <<EOF
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-mirror, namespace: $ns}
spec:
  hosts: [web.$ns.svc.cluster.local]
  http:
  - mirror: {host: shadow.$ns.svc.cluster.local}
    mirrorPercent: 10
    route:
    - {destination: {host: web.$ns.svc.cluster.local}}
EOF
check "Istio's webhook admits a valid DestinationRule (stable/canary subsets)" admitted <<EOF
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: $ns}
spec:
  host: web.$ns.svc.cluster.local
  subsets:
  - {name: stable, labels: {version: v1}}
  - {name: canary, labels: {version: v2}}
EOF
check "Istio's webhook refuses a DestinationRule with two subsets named stable" \
  refused 'configuration is invalid: duplicate subset names: stable' <<EOF
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-dup, namespace: $ns}
spec:
  host: web.$ns.svc.cluster.local
  subsets:
  - {name: stable, labels: {version: v1}}
  - {name: stable, labels: {version: v2}}
EOF

prom_up() { # JOB
  curl -sf "$PROMETHEUS_URL/api/v1/query" --data-urlencode "query=up{job=\"$1\"}" \
    | grep '"value":\[[0-9.]*,"1"\]'
}
check "Prometheus answers up{job=prometheus} = 1" poll 30 prom_up prometheus
echo "[{\"targets\": [\"${ETCD_URL#http://}\"], \"labels\": {\"job\": \"etcd\"}}]" \
  >"$PROMETHEUS_TARGETS_DIR/etcd.json"
check "file_sd target added at run time is scraped" poll 30 prom_up etcd

trap - EXIT
ports=$(cat "$STATE_DIR/ports")
check "down.sh succeeds" bash "$HERE/down.sh" "$STATE_DIR"
no_proc() { ! pgrep -f -- "$STATE_DIR/" >/dev/null; }
check "no process left" no_proc
no_port() {
  local p
  for p in $ports; do ss -Htln "( sport = :$p )" | grep . >/dev/null && return 1; done
  return 0
}
check "no port left listening" no_port

echo "$passed passed, $failed failed"
[ "$failed" = 0 ] || { echo "logs: $STATE_DIR/logs"; exit 1; }
[ -z "$own_dir" ] || rm -rf "$STATE_DIR"
