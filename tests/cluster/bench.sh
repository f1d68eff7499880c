#!/usr/bin/env bash
# bench.sh STATE_DIR [N] — how the operator holds up with N ChatReleases (default 100) on the local
# control plane: its resident memory idle, with N Stable releases (right after the last became
# Stable, and after a minute at rest, once freed memory has gone back) and at its peak; how long the
# first apply of N releases takes to reach Stable; how long a template change of all N takes to
# reach the first canary step; its CPU for each, and at rest (a minute with all N Stable, and a
# minute with all N canaries at 5% under the sequential watch); the requests it sends the API
# server and Prometheus at rest; and its reconcile durations. It prints figures and asserts
# nothing (`make bench`). Everything runs on 127.0.0.1 and is torn down at the end, whatever
# happens.
#
# No mesh simulator runs, so every analysis finds no traffic and holds: the figures are the
# operator's own cost (watches, caches, SSA writes, status, queries), not the traffic's.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 STATE_DIR [N]" >&2; exit 2; }
mkdir -p "$1"
STATE_DIR=$(cd "$1" && pwd)
N=${2:-100}
: "${CHATRELEASE_BIN_DIR:=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release}"
: "${BENCH_TIMEOUT:=600}"   # seconds for each stage
NS=bench

T0=$SECONDS
say() { printf '%(%H:%M:%S)T  bench: %s\n' -1 "$*" >&2; }
figure() { printf '  %-44s %s\n' "$1" "$2"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  say "tearing down"
  bash "$HERE/down.sh" "$STATE_DIR" >"$STATE_DIR/down.log" 2>&1 || { cat "$STATE_DIR/down.log" >&2; rc=1; }
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash "$HERE/up.sh" "$STATE_DIR" >&2
# shellcheck disable=SC1091
. "$STATE_DIR/env"
k() { "$KUBECTL" "$@"; }

metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$CHATRELEASE_BIN_DIR/chatrelease-operator" run --no-leader-election \
  --metrics-addr "127.0.0.1:$metrics_port" --prometheus-url "$PROMETHEUS_URL" \
  >"$STATE_DIR/logs/chatrelease-operator.log" 2>&1 &
operator=$!
echo "$operator" >"$STATE_DIR/pids/chatrelease-operator.pid"
metrics() { curl -fsS "http://127.0.0.1:$metrics_port/metrics"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$operator/status"; }
# The operator's CPU time so far, in seconds (user + system).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$operator/stat"; }
# Requests to the API server for what only the operator touches (ChatReleases other than the
# bench's own LISTs, Services, VirtualServices, DestinationRules, HTTPRoutes, and Deployments
# other than the Deployment controller's status writes); watches excluded.
api_requests() {
  "$KUBECTL" get --raw /metrics | awk '
    /^apiserver_request_total\{/ {
      verb = res = sub_ = ""
      if (match($0, /verb="[^"]*"/)) verb = substr($0, RSTART + 6, RLENGTH - 7)
      if (match($0, /resource="[^"]*"/)) res = substr($0, RSTART + 10, RLENGTH - 11)
      if (match($0, /subresource="[^"]*"/)) sub_ = substr($0, RSTART + 13, RLENGTH - 14)
      if (verb == "WATCH" || verb == "LIST") next
      if (res ~ /^(chatreleases|services|virtualservices|destinationrules|httproutes)$/ ||
          (res == "deployments" && sub_ != "status")) total += $NF
    }
    END {printf "%d", total}'
}
prometheus_queries() {
  metrics | awk '/^chatrelease_prometheus_query_duration_seconds_count/ {s += $2} END {printf "%d", s}'
}
# Over REST_SECONDS of rest: the operator's CPU seconds per minute, API requests a second and
# Prometheus queries a second, as "cpu requests queries".
: "${REST_SECONDS:=60}"
at_rest() {
  local c0 a0 q0 c1 a1 q1
  c0=$(cpu_s) a0=$(api_requests) q0=$(prometheus_queries)
  sleep "$REST_SECONDS"
  c1=$(cpu_s) a1=$(api_requests) q1=$(prometheus_queries)
  awk -v c0="$c0" -v c1="$c1" -v a0="$a0" -v a1="$a1" -v q0="$q0" -v q1="$q1" -v t="$REST_SECONDS" \
    'BEGIN {printf "%.2f %.2f %.2f\n", (c1 - c0) * 60 / t, (a1 - a0) / t, (q1 - q0) / t}'
}
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$operator/status"; }
mb() { awk -v kb="$1" 'BEGIN {printf "%.1f MB", kb / 1024}'; }
for _ in $(seq 1 100); do metrics >/dev/null 2>&1 && break; sleep 0.2; done
metrics >/dev/null || { say "the operator did not start; log: $STATE_DIR/logs/chatrelease-operator.log"; exit 1; }
sleep 5
idle_kb=$(rss_kb)

# N ChatReleases, one pod each, with a first step that no analysis blocks.
releases() {
  local image=$1 i
  for i in $(seq 1 "$N"); do
    cat <<EOF
apiVersion: chatrelease.io/v1alpha1
kind: ChatRelease
metadata: {name: chat-$i, namespace: $NS}
spec:
  replicas: 1
  template:
    spec:
      containers: [{name: chat, image: "$image", ports: [{containerPort: 3210}]}]
  strategy: {steps: [5, 50, 100], interval: 1m, drainTimeout: 10s, progressDeadline: 10m}
---
EOF
  done
}

# Seconds until `count` releases satisfy the jsonpath test, polling every second.
count_where() { k get chr -n "$NS" -o jsonpath="{range .items[*]}{$1}{\"\\n\"}{end}" | grep -cx "$2" || true; }
wait_all() {
  local what=$1 field=$2 want=$3 started=$SECONDS n=0
  while :; do
    n=$(count_where "$field" "$want")
    [ "$n" -ge "$N" ] && break
    if [ $((SECONDS - started)) -ge "$BENCH_TIMEOUT" ]; then
      say "only $n of $N $what after ${BENCH_TIMEOUT}s"; exit 1
    fi
    sleep 1
  done
  echo $((SECONDS - started))
}

k create namespace "$NS" >/dev/null
say "applying $N ChatReleases"
cpu0=$(cpu_s)
releases "example.invalid/chat:v1" | k apply --server-side -f - >/dev/null
stable_s=$(wait_all "Stable" .status.phase Stable)
cpu_stable=$(awk -v a="$(cpu_s)" -v b="$cpu0" 'BEGIN {printf "%.2f", a - b}')
sleep 5
stable_kb=$(rss_kb)
say "all $N Stable in ${stable_s}s; ${REST_SECONDS}s at rest"
read -r rest_stable_cpu rest_stable_api rest_stable_queries < <(at_rest)
stable_rest_kb=$(rss_kb)
say "changing every template"
cpu0=$(cpu_s)
releases "example.invalid/chat:v2" | k apply --server-side -f - >/dev/null
canary_s=$(wait_all "at 5%" .status.canaryWeight 5)
cpu_canary=$(awk -v a="$(cpu_s)" -v b="$cpu0" 'BEGIN {printf "%.2f", a - b}')
sleep 5
canary_kb=$(rss_kb)
say "all $N at 5% in ${canary_s}s; ${REST_SECONDS}s at rest under the sequential watch"
read -r rest_canary_cpu rest_canary_api rest_canary_queries < <(at_rest)
canary_rest_kb=$(rss_kb)
peak_kb=$(hwm_kb)

m=$(metrics)
reconciles=$(awk '/^chatrelease_reconcile_duration_seconds_count / {print $2}' <<<"$m")
reconcile_sum=$(awk '/^chatrelease_reconcile_duration_seconds_sum / {print $2}' <<<"$m")
# The bucket at or below which half (and 99%) of the reconciles fall.
bucket_for() {
  awk -v q="$1" -v total="$reconciles" '
    /^chatrelease_reconcile_duration_seconds_bucket/ {
      match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
      if ($2 >= q * total) { print "<= " le " s"; exit }
    }' <<<"$m"
}
errors=$(awk '/^chatrelease_reconcile_errors_total/ {s += $2} END {print s + 0}' <<<"$m")

echo
echo "chatrelease-operator with $N ChatReleases (1 pod each; release build; no traffic, so analyses hold):"
figure "resident memory, idle (no ChatRelease)" "$(mb "$idle_kb")"
figure "resident memory, $N Stable" "$(mb "$stable_kb")"
figure "  after a minute at rest" "$(mb "$stable_rest_kb")"
figure "resident memory, $N canaries at 5%" "$(mb "$canary_kb")"
figure "  after a minute at rest" "$(mb "$canary_rest_kb")"
figure "resident memory, peak (VmHWM)" "$(mb "$peak_kb")"
per_release() { awk -v a="$1" -v b="$idle_kb" -v n="$N" 'BEGIN {printf "%.1f kB", (a - b) / n}'; }
figure "memory per ChatRelease (Stable - idle) / N" "$(per_release "$stable_kb")"
figure "  after a minute at rest" "$(per_release "$stable_rest_kb")"
figure "first apply of $N to all Stable" "${stable_s}s, ${cpu_stable} s of CPU"
figure "template change of $N to all at 5%" "${canary_s}s, ${cpu_canary} s of CPU"
figure "CPU per transition (template change / N)" "$(awk -v c="$cpu_canary" -v n="$N" 'BEGIN {printf "%.1f ms", 1000 * c / n}')"
figure "CPU at rest, $N Stable" "${rest_stable_cpu} s a minute"
figure "CPU at rest, $N at 5% (watched every 10s)" "${rest_canary_cpu} s a minute"
figure "API requests at rest, $N Stable" "${rest_stable_api} /s"
figure "API requests at rest, $N at 5%" "${rest_canary_api} /s"
figure "Prometheus queries at rest, $N Stable" "${rest_stable_queries} /s"
figure "Prometheus queries at rest, $N at 5%" "${rest_canary_queries} /s"
figure "reconciles that reached a decision" "$reconciles"
figure "reconcile duration, mean" "$(awk -v s="$reconcile_sum" -v c="$reconciles" 'BEGIN {printf "%.1f ms", c ? 1000 * s / c : 0}')"
figure "reconcile duration, median bucket" "$(bucket_for 0.5)"
figure "reconcile duration, 99th percentile bucket" "$(bucket_for 0.99)"
figure "reconcile errors" "$errors"
echo
say "done in $((SECONDS - T0))s"
