#!/usr/bin/env bash
# demo.sh [STATE_DIR] — `make demo`: on a throw-away local control plane (cluster.sh), release
# LobeChat v1, roll a good v2 (promoted, passing the manual gate with `kubectl chatrelease
# promote`) and then a bad v3 (30% errors, rolled back), narrating every status change with
# `kubectl chatrelease status --watch --timeline`. Ends with the time from v3 reaching the
# canary to the route (VirtualService or HTTPRoute) at 100% stable, then stops everything (also on Ctrl-C or failure).
#
# Environment: ROUTER (istio, the default, or gatewayAPI: the same release through an HTTPRoute),
# DEMO_STEP_TIMEOUT (seconds each stage may take, default 180), MESHSIM_RPS (default 100 here),
# CHATRELEASE_BIN_DIR and tool paths as for cluster.sh.
set -euo pipefail
export LC_ALL=C   # a '.' in $EPOCHREALTIME

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
[ $# -le 1 ] || { echo "usage: $0 [STATE_DIR]" >&2; exit 2; }
mkdir -p "${1:-$REPO_ROOT/.local/demo}"
STATE_DIR=$(cd "${1:-$REPO_ROOT/.local/demo}" && pwd)
: "${DEMO_STEP_TIMEOUT:=180}"
# Enough requests that 5% of them clear minRequests (20) in every 10s window.
export MESHSIM_RPS=${MESHSIM_RPS:-100}

NS=chat NAME=lobe-chat
RELEASE_FILE=$HERE/demo-release.yaml
: "${ROUTER:=istio}"
case "$ROUTER" in
  istio) ROUTE_KIND=virtualservices.networking.istio.io
    # The canary's share: the weights of destinations whose subset is canary.
    ROUTE_JSONPATH='{.spec.http[*].route[*].destination.subset} / {.spec.http[*].route[*].weight}{"\n"}'
    CANARY_BACKEND=canary ;;
  gatewayAPI) ROUTE_KIND=httproutes.gateway.networking.k8s.io
    # The canary's share: the weights of backendRefs to Service <name>-canary.
    ROUTE_JSONPATH='{.spec.rules[*].backendRefs[*].name} / {.spec.rules[*].backendRefs[*].weight}{"\n"}'
    CANARY_BACKEND=lobe-chat-canary ;;
  *) echo "demo.sh: ROUTER must be istio or gatewayAPI, not '$ROUTER'" >&2; exit 2 ;;
esac
# demo-release.yaml routes with Istio; for the Gateway API its traffic.istio block becomes a
# traffic.gatewayAPI one (a Gateway gateway-system/public, as in examples/lobe-chat-gateway-api.yaml).
release_manifest() {
  if [ "$ROUTER" = gatewayAPI ]; then
    sed '/^    istio:$/,/^      gateways:/c\
    gatewayAPI:\
      parentRefs: [{name: public, namespace: gateway-system}]\
      hostnames: [chat.example.com]' "$RELEASE_FILE"
  else
    cat "$RELEASE_FILE"
  fi
}
V1=lobehub/lobe-chat:v1.9.0 V2=lobehub/lobe-chat:v1.10.0 V3=lobehub/lobe-chat:v1.11.0
T0=$SECONDS

now() { printf '%(%H:%M:%S)T' -1; }
# Narration shares the timeline's time column; the timeline's lines carry phase and weight.
say() { printf '%s  ==> %s\n' "$(now)" "$*"; }
note() { printf '%s\n' "$*"; }

STARTED="" WATCH_PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in ${WATCH_PIDS[@]+"${WATCH_PIDS[@]}"}; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ -n "$STARTED" ]; then
    say "tearing down the control plane, the mesh simulator and the operator"
    if bash "$HERE/cluster.sh" down "$STATE_DIR" >"$STATE_DIR/down.log" 2>&1; then
      say "stopped; nothing left listening (logs kept in $STATE_DIR/logs)"
    else
      cat "$STATE_DIR/down.log" >&2
      rc=1
    fi
  fi
  if [ $rc = 0 ]; then
    say "demo finished in $(((SECONDS - T0) / 60))m$(((SECONDS - T0) % 60))s"
  else
    say "demo FAILED (exit $rc) after $((SECONDS - T0))s"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; say "interrupted"; exit 130' INT TERM

fail() {
  say "error: $*" >&2
  if [ -n "$STARTED" ]; then
    echo "---- kubectl chatrelease status $NAME ----" >&2
    "$KUBECTL" chatrelease -n "$NS" status "$NAME" >&2 2>&1 || true
    echo "---- last lines of the operator's log ($OPERATOR_LOG) ----" >&2
    tail -n 15 "$OPERATOR_LOG" >&2 || true
    echo "----" >&2
  fi
  exit 1
}

# ---- start ---------------------------------------------------------------------------------------
say "starting a local control plane, Prometheus, the mesh simulator and the operator in $STATE_DIR"
STARTED=1
bash "$HERE/cluster.sh" up "$STATE_DIR" >"$STATE_DIR/up.log" 2>&1 || {
  cat "$STATE_DIR/up.log" >&2; fail "the cluster did not start (see above)"; }
# shellcheck disable=SC1091
. "$STATE_DIR/env"
export PATH="$CHATRELEASE_BIN_DIR:$PATH"   # `kubectl chatrelease` finds its plugin there
say "up in $((SECONDS - T0))s: API server $KUBE_APISERVER_URL, Prometheus $PROMETHEUS_URL, mesh simulator $MESHSIM_METRICS_URL"
k() { "$KUBECTL" -n "$NS" "$@"; }

# status_of: the ChatRelease's status fields that wait_for_stage reads, '|'-separated.
status_of() {
  k get chatrelease "$NAME" -o \
    jsonpath='{.status.phase}|{.status.pauseReason}|{.status.canaryWeight}|{.status.stableImage}|{.status.canaryImage}|{.status.message}' 2>/dev/null
}

# wait_for_stage DESCRIPTION PHASE IMAGE_FIELD IMAGE: until status.phase is PHASE and
# status.<stableImage|canaryImage> is IMAGE. Passes manual gates with `kubectl chatrelease promote`
# (once per weight). Fails on a phase the stage cannot come back from, or after DEMO_STEP_TIMEOUT.
wait_for_stage() {
  local what=$1 want=$2 field=$3 image=$4
  local deadline=$((SECONDS + DEMO_STEP_TIMEOUT)) promoted_at="" s phase reason weight stable canary msg
  while :; do
    s=$(status_of || true)
    IFS='|' read -r phase reason weight stable canary msg <<<"$s"
    local have=$stable
    [ "$field" = canaryImage ] && have=$canary
    if [ "$phase" = "$want" ] && [ "$have" = "$image" ]; then return 0; fi
    case "$phase" in
      Paused)
        if [ "$reason" = ManualGate ] && [ "$promoted_at" != "$weight" ]; then
          say "the canary waits at the manual gate; promoting it: kubectl chatrelease promote $NAME"
          "$KUBECTL" chatrelease -n "$NS" promote "$NAME" | sed 's/^/          /'
          promoted_at=$weight
        elif [ "$reason" = Inconclusive ]; then
          fail "$what: paused after inconclusive analyses: $msg"
        fi ;;
      RolledBack | Succeeded | Failed)
        # Stages end here; one that ends elsewhere for this image will not come back.
        if [ "$canary" = "$image" ] || [ "$stable" = "$image" ]; then
          fail "$what: ended $phase instead of $want: $msg"
        fi ;;
    esac
    [ $SECONDS -lt $deadline ] || fail "$what: not $want within ${DEMO_STEP_TIMEOUT}s (now ${phase:-no status}: $msg)"
    sleep 1
  done
}

# release IMAGE [SIM_ERROR_RATE]: a new template, as a person would change it (no env before).
release() {
  local image=$1 error_rate=${2:-}
  local patch="[{\"op\": \"replace\", \"path\": \"/spec/template/spec/containers/0/image\", \"value\": \"$image\"}"
  [ -z "$error_rate" ] ||
    patch+=", {\"op\": \"add\", \"path\": \"/spec/template/spec/containers/0/env\", \"value\": [{\"name\": \"SIM_ERROR_RATE\", \"value\": \"$error_rate\"}]}"
  echo "          kubectl patch chatrelease $NAME --type json -p '$patch]'"
  k patch chatrelease "$NAME" --type json -p "$patch]" >/dev/null
}

# ---- v1 ------------------------------------------------------------------------------------------
say "applying $(basename "$RELEASE_FILE") (examples/lobe-chat.yaml with 10s steps), routed by $ROUTER: $V1"
release_manifest | k apply -f - >/dev/null
note ""
note "Timeline (kubectl chatrelease status $NAME --watch --timeline):"
printf '%-8s  %-12s%4s  %s\n' time phase weight "[new analysis: verdict, requests, each check's canary vs stable value (bound) verdict] message"
"$KUBECTL" chatrelease -n "$NS" status "$NAME" --watch --timeline &
WATCH_PIDS+=($!)
wait_for_stage "v1" Stable stableImage "$V1"

# Every change of the route object (VirtualService or HTTPRoute), time-stamped, for the v3
# measurement at the end: its destinations (subsets or Services), then their weights. (kubectl 1.36
# prints only the first event of a watch whose jsonpath uses {range}, hence two flat lists.)
VS_LOG=$STATE_DIR/route.log
: >"$VS_LOG"
stamp() { local line; while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done; }
# "$KUBECTL" itself, not the function k: a backgrounded function is a subshell whose kill leaves
# kubectl watching, and its open watch held the API server's shutdown for 15 s.
"$KUBECTL" -n "$NS" get "$ROUTE_KIND" "$NAME" -w -o jsonpath="$ROUTE_JSONPATH" \
  2>"$STATE_DIR/logs/route-watch.log" > >(stamp >"$VS_LOG") &
WATCH_PIDS+=($!)

# ---- v2: good ------------------------------------------------------------------------------------
say "releasing v2 ($V2): a good release; steps 5 → 25 → 50 → gate → 100, one analysis per 10s"
release "$V2"
wait_for_stage "v2" Succeeded stableImage "$V2"
say "v2 promoted: stable runs $V2"

# ---- v3: bad -------------------------------------------------------------------------------------
say "releasing v3 ($V3) with SIM_ERROR_RATE=0.3: 30% of its answers are 5xx (it first waits for v2's canary pods to drain, drainTimeout 15s)"
V3_AT=$EPOCHREALTIME
release "$V3" 0.3
wait_for_stage "v3" RolledBack canaryImage "$V3"
say "v3 rolled back: stable still runs $V2"

# ---- how fast the bad release left the canary -----------------------------------------------------
# From the first route state after v3's release with canary weight > 0 to the first one
# after that with no canary weight at all (also no tester route to it).
canary_share() { # "SUBSET... / WEIGHT...": the sum of the canary's weights over all routes
  local subsets weights sum=0 i
  read -r -a subsets <<<"${1%%/*}"
  read -r -a weights <<<"${1#*/}"
  for i in "${!subsets[@]}"; do
    [ "${subsets[$i]}" = "$CANARY_BACKEND" ] && sum=$((sum + ${weights[$i]:-0}))
  done
  echo "$sum"
}
measure() {
  local t line on="" off="" share
  while read -r t line; do
    [ "${t%.*}" -ge "${V3_AT%.*}" ] || continue
    share=$(canary_share "$line")
    if [ -z "$on" ]; then [ "$share" -gt 0 ] && on=$t
    elif [ "$share" -eq 0 ]; then off=$t; break; fi
  done <"$VS_LOG"
  [ -n "$on" ] && [ -n "$off" ] && echo "$on $off"
}
deadline=$((SECONDS + 15))
until span=$(measure); do
  [ $SECONDS -lt $deadline ] || fail "the $ROUTE_KIND log does not show v3 on the canary and then 100% stable ($VS_LOG)"
  sleep 0.5
done
read -r on off <<<"$span"
clock() { printf '%(%H:%M:%S)T.%s' "${1%.*}" "$(printf '%.3s' "${1#*.}")"; }
ms=$(( (${off%.*} * 1000000 + 10#${off#*.} - ${on%.*} * 1000000 - 10#${on#*.}) / 1000 ))
note ""
note "$ROUTE_KIND $NAME, v3:"
note "  $(clock "$on")  canary weight > 0 (v3 takes traffic)"
note "  $(clock "$off")  100% stable, no route to the canary"
note "  bad release on the canary for $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s before it was rolled back"
note ""
