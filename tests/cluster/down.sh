#!/usr/bin/env bash
# down.sh STATE_DIR — stop everything up.sh STATE_DIR started (and anything else whose pid file
# another script put in STATE_DIR/pids/), then check that none of its ports is still listening.
# Keeps STATE_DIR/logs/ for a look afterwards; removes the data, credentials and env file.
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
if [ ! -d "$1" ]; then echo "down.sh: $1 does not exist: nothing to stop" >&2; exit 0; fi
STATE_DIR=$(cd "$1" && pwd)
PIDS=$STATE_DIR/pids
: "${DOWN_TIMEOUT:=15}"   # seconds to wait after SIGTERM before SIGKILL

say() { printf 'down.sh: %s\n' "$*" >&2; }

# Ours only if the process still mentions STATE_DIR/ in its command line or environment: a pid
# file left from long ago may name a pid that now belongs to something else.
ours() {
  local pid=$1
  [ -d "/proc/$pid" ] || return 1
  { tr '\0' '\n' <"/proc/$pid/cmdline"; tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null \
    | grep -F -- "$STATE_DIR/" >/dev/null
}

# What up.sh starts, and the pid files other tools (operator, simulator, tests) put beside them.
# istio-webhook with the API server, after the other tools: their last writes still validate.
control_plane=(kwok kube-scheduler kube-controller-manager kube-apiserver prometheus istio-webhook)
others=()
if [ -d "$PIDS" ]; then
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .pid)
    case " ${control_plane[*]} etcd " in *" $n "*) ;; *) others+=("$n") ;; esac
  done
fi

# Signals the named processes, then waits for them (SIGKILL after DOWN_TIMEOUT).
stop_wave() {
  local stopping=() n f pid pgid entry deadline
  for n in "$@"; do
    f=$PIDS/$n.pid
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid"; then
      pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)
      if [ "$pgid" = "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true   # its whole group
      else kill -TERM "$pid" 2>/dev/null || true; fi
      stopping+=("$n:$pid")
      say "stopping $n (pid $pid)"
    fi
  done
  deadline=$((SECONDS + DOWN_TIMEOUT))
  for entry in ${stopping[@]+"${stopping[@]}"}; do
    n=${entry%%:*} pid=${entry#*:}
    while kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ]; do
      if [ $SECONDS -ge $deadline ]; then
        say "$n (pid $pid) ignored SIGTERM for ${DOWN_TIMEOUT}s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.2
    done
    # Children that left the group leader behind (the group outlives its leader).
    if pgrep -g "$pid" >/dev/null 2>&1; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    rm -f "$PIDS/$n.pid"
  done
}

# Three waves. Other tools (operator, simulator) first: stopped together with the API server,
# their watches and a Lease release keep it in its graceful shutdown until DOWN_TIMEOUT. etcd
# only once the API server is gone: stopped together, the API server spends its whole shutdown
# retrying etcd.
[ ${#others[@]} -eq 0 ] || stop_wave "${others[@]}"
stop_wave "${control_plane[@]}"
stop_wave etcd
# Pid files whose process was gone already.
rm -f "$PIDS"/*.pid 2>/dev/null || true

# Nothing of ours may still listen.
rc=0
if [ -f "$STATE_DIR/ports" ]; then
  for _ in $(seq 1 25); do
    busy=""
    for p in $(cat "$STATE_DIR/ports"); do
      if ss -Htln "( sport = :$p )" | grep . >/dev/null; then busy+=" $p"; fi
    done
    [ -n "$busy" ] || break
    sleep 0.2
  done
  if [ -n "$busy" ]; then
    say "error: still listening on port(s)$busy:"
    for p in $busy; do ss -Htlnp "( sport = :$p )" >&2 || true; done
    rc=1
  else
    rm -f "$STATE_DIR/ports"
  fi
fi

rm -rf "$STATE_DIR/etcd-data" "$STATE_DIR/prometheus-data" "$STATE_DIR/pki" "$STATE_DIR/env" \
  "$STATE_DIR/kubeconfig" "$STATE_DIR"/*.kubeconfig
[ $rc = 0 ] && say "stopped; logs kept in $STATE_DIR/logs"
exit $rc
