#!/usr/bin/env bash
# run.sh STATE_DIR [cargo test filter...] — run the end-to-end tests on a control plane of their
# own: start it with tests/cluster/up.sh STATE_DIR, run `cargo test --test e2e -- --ignored`
# against it, and always stop it with down.sh, whatever happened (failure, Ctrl-C, timeout).
# The exit status is the tests' (or up.sh's); a down.sh that leaves something listening turns a
# success into a failure. `make e2e` calls this; see tests/e2e/e2e.mk for the variables.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=$HERE/../cluster
[ $# -ge 1 ] || { echo "usage: $0 STATE_DIR [test filter...]" >&2; exit 2; }
mkdir -p "$1"
STATE_DIR=$(cd "$1" && pwd)
shift

: "${CARGO:=cargo}"
: "${E2E_THREADS:=9}"      # tests side by side (each has its own namespace and processes; they mostly wait)
: "${E2E_TIMEOUT:=900}"    # seconds for the whole test run, on top of each test's own limit
# Test binaries with #[ignore]d tests that need this control plane (word-split on purpose).
: "${E2E_TESTS:=--test e2e}"

say() { printf 'e2e: %s\n' "$*" >&2; }

rc=0
stop() {
  trap - EXIT INT TERM
  say "stopping the control plane in $STATE_DIR"
  if ! bash "$CLUSTER/down.sh" "$STATE_DIR"; then
    say "down.sh could not stop everything"
    [ "$rc" != 0 ] || rc=1
  fi
  if [ -f "$STATE_DIR/logs/e2e/timings.txt" ]; then
    say "timings (also in $STATE_DIR/logs/e2e/timings.txt):"
    sed 's/^/  /' "$STATE_DIR/logs/e2e/timings.txt" >&2
  fi
  say "logs of every test's operator and simulator: $STATE_DIR/logs/e2e/<namespace>/"
  exit "$rc"
}
trap stop EXIT
child=""
interrupted() {
  rc=130
  say "interrupted: stopping the tests"
  # timeout forwards the signal to the tests' whole process group.
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi
  exit
}
trap interrupted INT TERM

T0=$SECONDS
bash "$CLUSTER/up.sh" "$STATE_DIR" >&2 || { rc=$?; say "the control plane did not start"; exit; }
mkdir -p "$STATE_DIR/logs/e2e"
: >"$STATE_DIR/logs/e2e/timings.txt"
say "control plane up in $((SECONDS - T0))s; running the tests ($E2E_THREADS at a time)"

T1=$SECONDS
# timeout signals its whole process group, the test binary included; the harness's children are
# then stopped by down.sh through their pid files. In the background so that `wait` returns at
# Ctrl-C (timeout's own process group does not get the terminal's signals).
E2E_STATE_DIR=$STATE_DIR timeout -k 20 "$E2E_TIMEOUT" \
  "$CARGO" test ${E2E_TESTS:---test e2e} -- --ignored --test-threads="$E2E_THREADS" "$@" &
child=$!
wait "$child"
rc=$?
child=""
[ $rc != 124 ] || say "the tests did not finish within E2E_TIMEOUT=${E2E_TIMEOUT}s"
say "tests finished in $((SECONDS - T1))s with status $rc"
exit
