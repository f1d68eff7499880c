#!/usr/bin/env bash
# fresh_clone.sh — what a user, a packager or a CI system sees: clone the repository's committed
# HEAD into an empty temporary folder (nothing beside it, so no ../shared) and run the unit tests
# there with `make unit-test`, then check that the README still starts a new user with exactly
# `make demo` and `make test`. Fails when anything the tests need lives outside the repository.
#
# The tools (TOOLS_DIR) are shared with the checkout: they are fetched by name and version, which
# is what a fresh clone does too. The clone builds into its own CARGO target folder
# (FRESH_CLONE_TARGET_DIR), kept between runs so only the project's own crate recompiles.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/.." && pwd)
: "${TOOLS_DIR:=$HOME/.cache/chatrelease-tools}"
: "${FRESH_CLONE_TARGET_DIR:=$TOOLS_DIR/fresh-clone/target}"
: "${MAKE:=make}"

say() { printf 'fresh-clone: %s\n' "$*" >&2; }

workdir=$(mktemp -d "${TMPDIR:-/tmp}/chatrelease-fresh-clone.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
clone=$workdir/chatrelease-operator

commit=$(git -C "$REPO_ROOT" rev-parse --short HEAD)
if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
  say "note: the checkout has uncommitted changes; the clone tests commit $commit without them"
fi
git clone --quiet --no-hardlinks "$REPO_ROOT" "$clone"
[ ! -e "$workdir/shared" ] || { say "error: $workdir/shared exists beside the clone"; exit 1; }

# The README's set-up block: exactly the two commands a new machine needs.
setup=$(awk '/^```sh$/ { inblock = 1; next } inblock && /^```$/ { exit } inblock' "$clone/README.md" \
  | sed 's/[[:space:]]*#.*$//' | grep .)
if [ "$setup" != $'make demo\nmake test' ]; then
  say "error: the README's first commands are not exactly 'make demo' and 'make test':"
  printf '%s\n' "$setup" >&2
  exit 1
fi
# Each of them is a target of the clone's own Makefile. Read from make's database for a goal that
# has no rule, so nothing runs: `make -n` would still run recipes that call $(MAKE), this script
# among them.
targets=$("$MAKE" -C "$clone" --no-print-directory -pRrq -f Makefile __fresh_clone_probe__ 2>/dev/null \
  | sed -n 's/^\([a-zA-Z0-9_-]*\):.*/\1/p' || true)
for target in demo test; do
  printf '%s\n' "$targets" | grep -qx "$target" \
    || { say "error: 'make $target' is not a target of the clone's Makefile"; exit 1; }
done

say "unit tests in a clone of $commit at $clone (no ../shared beside it)"
t0=$SECONDS
CARGO_TARGET_DIR=$FRESH_CLONE_TARGET_DIR TOOLS_DIR=$TOOLS_DIR \
  "$MAKE" --no-print-directory -C "$clone" unit-test
say "the clone's unit tests passed in $((SECONDS - t0))s"
