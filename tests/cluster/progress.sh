#!/usr/bin/env bash
# progress.sh LABEL HINT COMMAND... — run COMMAND; while it runs longer than a few seconds, say
# every 30s that it is still working and for how long, so a person facing a 25-minute cold build
# knows it has not hung. Silent when COMMAND is quick (tools already built). Exit status: COMMAND's.
set -uo pipefail

[ $# -ge 3 ] || { echo "usage: $0 LABEL HINT COMMAND..." >&2; exit 2; }
label=$1 hint=$2
shift 2
: "${PROGRESS_EVERY:=30}"   # seconds between two progress lines
: "${PROGRESS_AFTER:=5}"    # seconds before the first one

"$@" &
pid=$!
# Ctrl-C reaches COMMAND through the terminal's process group; pass a TERM on too.
trap 'kill -TERM "$pid" 2>/dev/null' TERM
start=$SECONDS next=$PROGRESS_AFTER
while kill -0 "$pid" 2>/dev/null; do
  elapsed=$((SECONDS - start))
  if [ "$elapsed" -ge "$next" ]; then
    printf 'still %s… %dm%02ds so far (%s)\n' "$label" $((elapsed / 60)) $((elapsed % 60)) "$hint" >&2
    next=$((next == PROGRESS_AFTER ? PROGRESS_EVERY : next + PROGRESS_EVERY))
  fi
  sleep 0.5
done
wait "$pid"
