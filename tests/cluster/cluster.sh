#!/usr/bin/env bash
# cluster.sh up|down STATE_DIR — the local control plane of up.sh plus what makes it a place to
# try ChatReleases: the mesh simulator (all namespaces, scraped by the control plane's Prometheus)
# and the operator (all namespaces). Used by `make cluster`, `make cluster-down` and `make demo`.
#
#   cluster.sh up STATE_DIR     start everything, write STATE_DIR/env (up.sh's, plus the lines
#                               below) and leave it running
#   cluster.sh down STATE_DIR   stop everything and check that nothing is left listening
#
# STATE_DIR/env, besides up.sh's variables: CHATRELEASE_BIN_DIR (the operator, the simulator and
# kubectl-chatrelease; put it on PATH for `kubectl chatrelease`), MESHSIM_METRICS_URL,
# OPERATOR_METRICS_URL, OPERATOR_LOG, MESHSIM_LOG. Logs stay in STATE_DIR/logs/ after `down`.
#
# `up` prints where everything is and how to stop it; with KUBECONFIG_COPY=FILE it also copies
# the kubeconfig there (make cluster: .local/kubeconfig), STOP_HINT replaces the stop command shown.
#
# Environment: CHATRELEASE_BIN_DIR (default: the repo's target/release), MESHSIM_RPS (requests per
# second through each VirtualService, default the simulator's), OPERATOR_ARGS, MESHSIM_ARGS (more
# flags), RUST_LOG; tool paths as for up.sh (tools.mk's CLUSTER_TOOLS_ENV).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)

usage() { echo "usage: $0 up|down STATE_DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
ACTION=$1
case "$ACTION" in up | down) ;; *) usage ;; esac
mkdir -p "$2"
STATE_DIR=$(cd "$2" && pwd)
: "${CHATRELEASE_BIN_DIR:=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}"
: "${START_TIMEOUT:=60}"   # seconds for the simulator and the operator to come up

say() { printf 'cluster.sh: %s\n' "$*" >&2; }

# The simulator's and the operator's ports are picked by the kernel, so down.sh does not know them:
# check them here.
own_ports() {
  sed -n 's#^export \(MESHSIM\|OPERATOR\)_METRICS_URL=.http://127\.0\.0\.1:\([0-9]*\)/.*#\2#p' \
    "$STATE_DIR/env" 2>/dev/null || true
}

down() {
  local ports port busy
  ports=$(own_ports)
  # down.sh stops the pid files of other tools (ours) before the control plane.
  bash "$HERE/down.sh" "$STATE_DIR"
  for _ in $(seq 1 25); do
    busy=""
    for port in $ports; do
      if ss -Htln "( sport = :$port )" | grep . >/dev/null; then busy+=" $port"; fi
    done
    [ -n "$busy" ] || return 0
    sleep 0.2
  done
  say "error: still listening on port(s)$busy:"
  for port in $busy; do ss -Htlnp "( sport = :$port )" >&2 || true; done
  return 1
}

if [ "$ACTION" = down ]; then
  if [ ! -d "$STATE_DIR/pids" ]; then say "nothing runs in $STATE_DIR"; exit 0; fi
  down
  exit
fi

for b in chatrelease-operator chatrelease-meshsim kubectl-chatrelease; do
  [ -x "$CHATRELEASE_BIN_DIR/$b" ] || {
    say "$CHATRELEASE_BIN_DIR/$b missing: run 'cargo build --release --bins' (or set CHATRELEASE_BIN_DIR)"
    exit 1
  }
done

T0=$SECONDS
# up.sh stops whatever a previous run left in STATE_DIR, including our pid files.
bash "$HERE/up.sh" "$STATE_DIR" >/dev/null
# shellcheck disable=SC1091
. "$STATE_DIR/env"
LOGS=$STATE_DIR/logs

FAILED=""
fail() {
  FAILED=1
  say "error: $1"
  if [ -n "${2:-}" ] && [ -f "$LOGS/$2.log" ]; then
    echo "---- last lines of $LOGS/$2.log ----" >&2
    tail -n 30 "$LOGS/$2.log" >&2
    echo "----" >&2
  fi
  down >&2 || true
  exit 1
}
trap 'rc=$?; [ $rc = 0 ] || [ -n "$FAILED" ] || fail "unexpected failure (exit $rc)"' EXIT
trap 'fail "interrupted"' INT TERM

# Like up.sh's start(): own session (down.sh kills the group), pid file, log. The environment
# names STATE_DIR (KUBECONFIG), which down.sh checks before it kills a pid from a file.
start() { # NAME CMD...
  local name=$1; shift
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
  echo $! >"$STATE_DIR/pids/$name.pid"
}
alive() { kill -0 "$(cat "$STATE_DIR/pids/$1.pid")" 2>/dev/null; }
wait_for() { # NAME WHAT COMMAND...
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    alive "$name" || fail "$name exited before $what" "$name"
    [ $SECONDS -lt $deadline ] || fail "$name: no $what after ${START_TIMEOUT}s" "$name"
    sleep 0.3
  done
}

# ---- mesh simulator: port 0, so the kernel picks a free port; its log says which -------------
export RUST_LOG=${RUST_LOG:-info,kube=warn}
export NO_COLOR=1   # plain log files
meshsim_args=(--listen 127.0.0.1:0)
[ -z "${MESHSIM_RPS:-}" ] || meshsim_args+=(--rps "$MESHSIM_RPS")
# shellcheck disable=SC2206
[ -z "${MESHSIM_ARGS:-}" ] || meshsim_args+=($MESHSIM_ARGS)
say "starting the mesh simulator"
start chatrelease-meshsim "$CHATRELEASE_BIN_DIR/chatrelease-meshsim" "${meshsim_args[@]}"
metrics_url() { grep -o 'http://127\.0\.0\.1:[0-9]*/metrics' "$LOGS/chatrelease-meshsim.log" | head -1; }
wait_for chatrelease-meshsim "metrics address in its log" metrics_url
MESHSIM_METRICS_URL=$(metrics_url)
MESHSIM_ADDRESS=${MESHSIM_METRICS_URL#http://}
MESHSIM_ADDRESS=${MESHSIM_ADDRESS%/metrics}
{ echo "# Added by tests/cluster/cluster.sh"; echo "export MESHSIM_METRICS_URL='$MESHSIM_METRICS_URL'"; } >>"$STATE_DIR/env"
wait_for chatrelease-meshsim "answer on /healthz" curl -sf --max-time 2 "http://$MESHSIM_ADDRESS/healthz"
# file_sd: Prometheus (re)reads this folder every 2s.
printf '[{"targets": ["%s"], "labels": {"job": "chatrelease-meshsim"}}]\n' "$MESHSIM_ADDRESS" \
  >"$PROMETHEUS_TARGETS_DIR/chatrelease-meshsim.json"
scraped() {
  curl -sf --max-time 2 "$PROMETHEUS_URL/api/v1/query" \
    --data-urlencode 'query=up{job="chatrelease-meshsim"}' | grep '"value":\[[0-9.]*,"1"\]'
}
wait_for chatrelease-meshsim "scrape by Prometheus" scraped

# ---- operator ----------------------------------------------------------------------------------
# Its /metrics, /healthz and /readyz on a port the kernel picks: 127.0.0.1 only, and no clash with
# another local cluster or the end-to-end tests.
say "starting the operator"
operator_args=(run --prometheus-url "$PROMETHEUS_URL" --metrics-addr 127.0.0.1:0)
# shellcheck disable=SC2206
[ -z "${OPERATOR_ARGS:-}" ] || operator_args+=($OPERATOR_ARGS)
start chatrelease-operator "$CHATRELEASE_BIN_DIR/chatrelease-operator" "${operator_args[@]}"
operator_address() {
  grep 'serving /metrics' "$LOGS/chatrelease-operator.log" | grep -o '127\.0\.0\.1:[0-9]*' | head -1
}
wait_for chatrelease-operator "metrics address in its log" operator_address
OPERATOR_ADDRESS=$(operator_address)
echo "export OPERATOR_METRICS_URL='http://$OPERATOR_ADDRESS/metrics'" >>"$STATE_DIR/env"
wait_for chatrelease-operator "ready on /readyz" curl -sf --max-time 2 "http://$OPERATOR_ADDRESS/readyz"

cat >>"$STATE_DIR/env" <<EOF
export CHATRELEASE_BIN_DIR='$CHATRELEASE_BIN_DIR'
export OPERATOR_LOG='$LOGS/chatrelease-operator.log'
export MESHSIM_LOG='$LOGS/chatrelease-meshsim.log'
EOF
trap - EXIT INT TERM
say "control plane, mesh simulator and operator up in $((SECONDS - T0))s"

kubeconfig=$KUBECONFIG
if [ -n "${KUBECONFIG_COPY:-}" ]; then
  mkdir -p "$(dirname "$KUBECONFIG_COPY")"
  install -m 600 "$KUBECONFIG" "$KUBECONFIG_COPY"
  kubeconfig=$KUBECONFIG_COPY
fi
cat <<EOF
The local cluster runs (state and logs in $STATE_DIR):
  kubeconfig      $kubeconfig
  API server      $KUBE_APISERVER_URL
  Prometheus      $PROMETHEUS_URL
  mesh simulator  $MESHSIM_METRICS_URL (all namespaces, scraped every 2s)
  operator        all namespaces, metrics http://$OPERATOR_ADDRESS/metrics, log in $LOGS/chatrelease-operator.log
Try it:
  export KUBECONFIG=$kubeconfig PATH=$CHATRELEASE_BIN_DIR:$(dirname "$KUBECTL"):\$PATH
  kubectl apply -f $HERE/demo-release.yaml
  kubectl chatrelease -n chat status lobe-chat --watch --timeline
Stop it:
  ${STOP_HINT:-$HERE/cluster.sh down $STATE_DIR}
EOF
