# Sourced by tests/cluster/tools.sh and charts/install-helm.sh: the one Go build environment for
# every tool built from the Go module proxy, so they share one module and build cache.
: "${TOOLS_DIR:=$HOME/.cache/chatrelease-tools}"
: "${GO:=go}"
# Two cores: keep the machine usable while a cold build runs.
: "${BUILD_JOBS:=2}"
: "${NICE:=nice -n 10}"

export GOCACHE="$TOOLS_DIR/go/cache"
export GOMODCACHE="$TOOLS_DIR/go/mod"
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
mkdir -p "$GOCACHE" "$GOMODCACHE"
