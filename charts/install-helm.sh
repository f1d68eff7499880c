#!/usr/bin/env bash
# Builds Helm from the Go module proxy into $TOOLS_DIR/helm/$HELM_VERSION/bin/helm, once.
# Called by charts/chart.mk; usable alone:  TOOLS_DIR=... HELM_VERSION=v3.22.0 charts/install-helm.sh
# helm.sh/helm/v3 has no replace directives, so `go install pkg@version` builds it as released;
# the -X flags are the ones Helm's own Makefile sets, so `helm version` and the Kubernetes version
# that `helm template` and `helm lint` assume match a release build.
set -euo pipefail

: "${HELM_VERSION:=v3.22.0}"
# shellcheck source=../tests/cluster/go-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/../tests/cluster/go-env.sh"

bin="$TOOLS_DIR/helm/$HELM_VERSION/bin"
mkdir -p "$bin"

# Two `make` runs asking at once build it once.
exec 9>"$TOOLS_DIR/.lock-helm"
flock 9
[ -x "$bin/helm" ] && exit 0

log() { printf '%s\n' "helm: $*" >&2; }
die() { printf '%s\n' "helm: error: $*" >&2; exit 1; }

log "building helm $HELM_VERSION from the Go module proxy (first time, several minutes on 2 cores)…"
info=$($GO mod download -json "helm.sh/helm/v3@$HELM_VERSION") \
  || die "cannot download helm.sh/helm/v3@$HELM_VERSION from the Go module proxy"
gomod=$(printf '%s' "$info" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -f "$gomod" ] || die "no go.mod for helm.sh/helm/v3@$HELM_VERSION"
# Helm's Makefile: the Kubernetes version it assumes is 1.<minor of its client-go>.
client_go=$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod" | head -1)
[ -n "$client_go" ] || die "cannot read k8s.io/client-go's version from $gomod"

ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$client_go"
done

t0=$SECONDS
GOBIN="$bin.tmp" $NICE $GO install -p "$BUILD_JOBS" -trimpath -ldflags "$ld" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
# Install atomically: an interrupted build never leaves a half-written helm that looks installed.
mv "$bin.tmp/helm" "$bin/helm"
rmdir "$bin.tmp"
log "built helm $HELM_VERSION in $((SECONDS - t0))s → $bin/helm"
