#!/usr/bin/env bash
# up.sh STATE_DIR — start a local Kubernetes control plane on 127.0.0.1 for the end-to-end tests
# and the demo: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (one fake
# Node that runs every Pod "Ready" without containers), Istio's validating webhook for
# VirtualService/DestinationRule writes, Prometheus, and the CRDs of Istio's networking API and
# of the Gateway API's standard channel (HTTPRoutes meet the upstream CEL rules). Ports are picked
# at run time. Writes STATE_DIR/kubeconfig and STATE_DIR/env; logs go to STATE_DIR/logs/.
# Stop with down.sh STATE_DIR. See README.md beside this file.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)

usage() { echo "usage: $0 STATE_DIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
mkdir -p "$1"
STATE_DIR=$(cd "$1" && pwd)

# ---- configuration (all overridable from the environment; tools.mk passes them) -------------
: "${TOOLS_DIR:=$HOME/.cache/chatrelease-tools}"
: "${K8S_VERSION:=v1.36.3}"
: "${KWOK_VERSION:=v0.8.0}"
: "${ETCD_VERSION:=v3.6.16}"
: "${ISTIO_VERSION:=v1.32.0}"
: "${ISTIO_CRDS:=$TOOLS_DIR/istio/$ISTIO_VERSION/networking-crds.yaml}"
: "${GATEWAY_API_VERSION:=v1.6.3}"
: "${GATEWAY_API_CRDS:=$TOOLS_DIR/gateway-api/$GATEWAY_API_VERSION/standard-crds.yaml}"
: "${ISTIO_WEBHOOK_VERSION:=v0.0.0-20260827124520-eed52ebb66ad}"
: "${CRDS_DIR:=$REPO_ROOT/crds}"
: "${UP_TIMEOUT:=90}"            # seconds, per component
: "${NODE_NAME:=kwok-node-0}"
: "${SCRAPE_INTERVAL:=2s}"
: "${KEEP_ON_FAILURE:=}"         # non-empty: leave processes running when up.sh fails

# A tool: the variable if set, else the versioned build in TOOLS_DIR, else PATH.
tool() { # VAR default-path command-name
  local var=$1 def=$2 name=$3 val
  val=${!var:-}
  if [ -z "$val" ]; then
    if [ -x "$def" ]; then val=$def
    elif command -v "$name" >/dev/null 2>&1; then val=$(command -v "$name")
    fi
  fi
  [ -n "$val" ] && [ -x "$val" ] || {
    echo "up.sh: $name not found (looked at \$$var, $def, PATH): run 'make tools'" >&2; exit 1; }
  printf -v "$var" '%s' "$val"
}
kbin="$TOOLS_DIR/kubernetes/$K8S_VERSION/bin"
tool KUBE_APISERVER "$kbin/kube-apiserver" kube-apiserver
tool KUBE_CONTROLLER_MANAGER "$kbin/kube-controller-manager" kube-controller-manager
tool KUBE_SCHEDULER "$kbin/kube-scheduler" kube-scheduler
tool KUBECTL "$kbin/kubectl" kubectl
tool KWOK "$TOOLS_DIR/kwok/$KWOK_VERSION/bin/kwok" kwok
tool ETCD "$TOOLS_DIR/etcd/$ETCD_VERSION/bin/etcd" etcd
tool PROMETHEUS_BIN /usr/bin/prometheus prometheus
# Same folder as tools.sh istio-webhook: version plus a hash of tests/istio-webhook's files.
iw_key=$(cd "$REPO_ROOT/tests/istio-webhook" 2>/dev/null && sha256sum go.mod go.sum main.go | sha256sum | cut -c1-12) || iw_key=missing
tool ISTIO_WEBHOOK "$TOOLS_DIR/istio-webhook/$ISTIO_WEBHOOK_VERSION-$iw_key/bin/istio-webhook" istio-webhook
: "${KWOK_STAGES_DIR:=$TOOLS_DIR/go/mod/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage}"
KWOK_STAGES=(
  "$KWOK_STAGES_DIR/node/fast/node-initialize.yaml"
  "$KWOK_STAGES_DIR/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml"
  "$KWOK_STAGES_DIR/pod/fast/pod-ready.yaml"
  "$KWOK_STAGES_DIR/pod/fast/pod-delete.yaml"
)
for f in "${KWOK_STAGES[@]}"; do
  [ -f "$f" ] || { echo "up.sh: kwok stage file $f missing (KWOK_STAGES_DIR): run 'make tools'" >&2; exit 1; }
done
# Without Istio's CRDs every VirtualService and DestinationRule write answers 404 and nothing
# rolls out: refuse to start a control plane that cannot run the operator.
[ -s "$ISTIO_CRDS" ] || {
  echo "up.sh: Istio's CRDs missing: no file at $ISTIO_CRDS (ISTIO_CRDS). Run 'make tools'" \
    "(tools.sh istio-crds cuts them from the istio.io/api@$ISTIO_VERSION Go module)" >&2
  exit 1
}
# Without the Gateway API's CRDs no HTTPRoute can be written, nor checked by the upstream CEL rules.
[ -s "$GATEWAY_API_CRDS" ] || {
  echo "up.sh: the Gateway API's CRDs missing: no file at $GATEWAY_API_CRDS (GATEWAY_API_CRDS)." \
    "Run 'make tools' (tools.sh gateway-api-crds takes the standard channel from the" \
    "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION Go module)" >&2
  exit 1
}
for c in openssl curl ss setsid flock base64; do
  command -v "$c" >/dev/null 2>&1 || { echo "up.sh: '$c' is required" >&2; exit 1; }
done

T0=$SECONDS
say() { printf 'up.sh: [%2ds] %s\n' $((SECONDS - T0)) "$*" >&2; }

# One up.sh per STATE_DIR at a time (the daemons get this descriptor closed, see start()).
exec 8>"$STATE_DIR/.up.lock"
flock -n 8 || { echo "up.sh: another up.sh is running on $STATE_DIR" >&2; exit 1; }

# ---- leftovers of a previous run -------------------------------------------------------------
if [ -d "$STATE_DIR/pids" ] && [ -n "$(ls -A "$STATE_DIR/pids" 2>/dev/null)" ]; then
  say "stopping what a previous run in $STATE_DIR left behind"
  bash "$HERE/down.sh" "$STATE_DIR" || true
fi
rm -rf "$STATE_DIR/etcd-data" "$STATE_DIR/prometheus-data" "$STATE_DIR/pki" "$STATE_DIR/pids" \
  "$STATE_DIR/logs" "$STATE_DIR/kwok-home" "$STATE_DIR/kubeconfig" "$STATE_DIR/env" \
  "$STATE_DIR/ports" "$STATE_DIR"/*.kubeconfig "$STATE_DIR/prometheus.yml"
mkdir -p "$STATE_DIR/pids" "$STATE_DIR/logs" "$STATE_DIR/pki" "$STATE_DIR/kwok-home" \
  "$STATE_DIR/prometheus-targets.d"
LOGS=$STATE_DIR/logs PKI=$STATE_DIR/pki

# ---- on failure: say which component, show its log, stop everything --------------------------
CURRENT=""
fail() {
  local msg=$1 comp=${2:-$CURRENT}
  FAILED=1
  echo "up.sh: error: $msg" >&2
  if [ -n "$comp" ] && [ -f "$LOGS/$comp.log" ]; then
    echo "---- last lines of $LOGS/$comp.log ----" >&2
    tail -n 40 "$LOGS/$comp.log" >&2
    echo "----" >&2
  fi
  if [ -z "$KEEP_ON_FAILURE" ]; then
    bash "$HERE/down.sh" "$STATE_DIR" >&2 || true
    echo "up.sh: stopped what had started (KEEP_ON_FAILURE=1 keeps it running)" >&2
  fi
  exit 1
}
ERR_LINE=?
trap 'ERR_LINE=$LINENO' ERR
trap 'rc=$?; [ $rc = 0 ] || [ -n "${FAILED:-}" ] || fail "unexpected failure (exit $rc) near line $ERR_LINE"' EXIT

# ---- free ports --------------------------------------------------------------------------------
# A random port that no socket uses (listening or connected) and this run has not taken yet,
# below the kernel's ephemeral range: an outgoing connection may take any port inside that range
# between our check and the component's bind. (Another program could still take a port before
# the component binds it: the component then fails to start, its log says so; run up.sh again.)
PICKED=" "
PORT_LOW=20000 PORT_HIGH=32767
if read -r eph_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null && [ "$eph_low" -gt 12000 ]; then
  PORT_LOW=10000 PORT_HIGH=$((eph_low - 1))
fi
pick_port() { # VAR
  local p i
  for i in $(seq 1 200); do
    p=$(( PORT_LOW + (RANDOM * 32768 + RANDOM) % (PORT_HIGH - PORT_LOW + 1) ))
    case "$PICKED" in *" $p "*) continue ;; esac
    if ! ss -Htan "( sport = :$p )" | grep . >/dev/null; then PICKED+="$p "; printf -v "$1" '%s' "$p"; return 0; fi
  done
  fail "no free port found"
}
pick_port ETCD_PORT; pick_port ETCD_PEER_PORT; pick_port API_PORT
pick_port KCM_PORT; pick_port SCHED_PORT; pick_port PROM_PORT; pick_port WEBHOOK_PORT
echo "$ETCD_PORT $ETCD_PEER_PORT $API_PORT $KCM_PORT $SCHED_PORT $PROM_PORT $WEBHOOK_PORT" >"$STATE_DIR/ports"
API_URL=https://127.0.0.1:$API_PORT
PROM_URL=http://127.0.0.1:$PROM_PORT
ETCD_URL=http://127.0.0.1:$ETCD_PORT
WEBHOOK_URL=https://127.0.0.1:$WEBHOOK_PORT/validate

# ---- start a process in its own session (so down.sh can kill its whole group) ---------------
start() { # NAME CMD...
  local name=$1; shift
  # Not a process-group leader here (no job control), so setsid execs in place: $! is the pid.
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 8>&- &
  echo $! >"$STATE_DIR/pids/$name.pid"
}
alive() { kill -0 "$(cat "$STATE_DIR/pids/$1.pid")" 2>/dev/null; }

# wait_for NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds, the process dies, or timeout.
wait_for() {
  local name=$1 what=$2; shift 2
  CURRENT=$name
  local deadline=$((SECONDS + UP_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    alive "$name" || fail "$name exited before $what"
    [ $SECONDS -lt $deadline ] || fail "$name: no $what after ${UP_TIMEOUT}s"
    sleep 0.3
  done
}

# ---- certificates and credentials --------------------------------------------------------------
say "making certificates"
# ECDSA P-256 throughout: RSA key generation took seconds on a busy 2-core machine.
{
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj "/CN=chatrelease-local-ca" \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt"
  cat >"$PKI/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr"
  openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt"
  # The API server calls the webhook at https://127.0.0.1:PORT and checks it against caBundle.
  printf '%s\n' basicConstraints=CA:FALSE keyUsage=critical,digitalSignature \
    extendedKeyUsage=serverAuth subjectAltName=IP:127.0.0.1 >"$PKI/istio-webhook.ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=istio-webhook" \
    -keyout "$PKI/istio-webhook.key" -out "$PKI/istio-webhook.csr"
  openssl x509 -req -in "$PKI/istio-webhook.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -extfile "$PKI/istio-webhook.ext" -out "$PKI/istio-webhook.crt"
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key"
  openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
} >"$LOGS/openssl.log" 2>&1 || fail "openssl failed" openssl
chmod 600 "$PKI"/*.key

token() { openssl rand -hex 24; }
ADMIN_TOKEN=$(token) KCM_TOKEN=$(token) SCHED_TOKEN=$(token) KWOK_TOKEN=$(token)
# token,user,uid,"groups": the RBAC bootstrap policy already binds the two system users.
cat >"$PKI/tokens.csv" <<EOF
$ADMIN_TOKEN,admin,admin,"system:masters"
$KCM_TOKEN,system:kube-controller-manager,system:kube-controller-manager
$SCHED_TOKEN,system:kube-scheduler,system:kube-scheduler
$KWOK_TOKEN,kwok,kwok,"system:masters"
EOF
chmod 600 "$PKI/tokens.csv"

CA_DATA=$(base64 -w0 <"$PKI/ca.crt")
kubeconfig() { # FILE USER TOKEN
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chatrelease-local
  cluster:
    server: $API_URL
    certificate-authority-data: $CA_DATA
users:
- name: $2
  user:
    token: $3
contexts:
- name: chatrelease-local
  context: {cluster: chatrelease-local, user: $2}
current-context: chatrelease-local
EOF
  chmod 600 "$1"
}
kubeconfig "$STATE_DIR/kubeconfig" admin "$ADMIN_TOKEN"
kubeconfig "$STATE_DIR/kube-controller-manager.kubeconfig" system:kube-controller-manager "$KCM_TOKEN"
kubeconfig "$STATE_DIR/kube-scheduler.kubeconfig" system:kube-scheduler "$SCHED_TOKEN"
kubeconfig "$STATE_DIR/kwok.kubeconfig" kwok "$KWOK_TOKEN"
export KUBECONFIG=$STATE_DIR/kubeconfig
kc() { "$KUBECTL" --kubeconfig "$STATE_DIR/kubeconfig" "$@"; }

# ---- etcd --------------------------------------------------------------------------------------
etcd_extra=()
# etcd >= 3.5: skip fsync (throw-away data; much faster on a busy disk).
if "$ETCD" --help 2>&1 | grep -- --unsafe-no-fsync >/dev/null; then etcd_extra+=(--unsafe-no-fsync); fi
say "starting etcd ($ETCD_URL)"
start etcd "$ETCD" --name=chatrelease-local --data-dir="$STATE_DIR/etcd-data" \
  --listen-client-urls="$ETCD_URL" --advertise-client-urls="$ETCD_URL" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="chatrelease-local=http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster-state=new --log-level=warn \
  --quota-backend-bytes=2147483648 ${etcd_extra[@]+"${etcd_extra[@]}"}
wait_for etcd "healthy /health" curl -sf --max-time 2 "$ETCD_URL/health"

# ---- kube-apiserver ----------------------------------------------------------------------------
say "starting kube-apiserver ($API_URL)"
start kube-apiserver "$KUBE_APISERVER" \
  --etcd-servers="$ETCD_URL" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --cert-dir="$PKI" --client-ca-file="$PKI/ca.crt" \
  --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --token-auth-file="$PKI/tokens.csv" \
  --authorization-mode=RBAC \
  --service-cluster-ip-range=10.96.0.0/12 \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --allow-privileged=true \
  --endpoint-reconciler-type=none \
  --profiling=false
# Istio's validating webhook needs nothing from the API server: start it while that one comes up.
say "starting istio-webhook ($WEBHOOK_URL)"
start istio-webhook "$ISTIO_WEBHOOK" --listen="127.0.0.1:$WEBHOOK_PORT" \
  --tls-cert-file="$PKI/istio-webhook.crt" --tls-private-key-file="$PKI/istio-webhook.key"
wait_for kube-apiserver "ready /readyz" \
  curl -sf --max-time 3 --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$API_URL/readyz"

# ---- kube-controller-manager and kube-scheduler ------------------------------------------------
say "starting kube-controller-manager and kube-scheduler"
start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
  --kubeconfig="$STATE_DIR/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$STATE_DIR/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$STATE_DIR/kube-controller-manager.kubeconfig" \
  --leader-elect=false --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
  --cert-dir="$PKI/kube-controller-manager" \
  --root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key" \
  --use-service-account-credentials=true --cluster-name=chatrelease-local \
  --profiling=false
start kube-scheduler "$KUBE_SCHEDULER" \
  --kubeconfig="$STATE_DIR/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$STATE_DIR/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$STATE_DIR/kube-scheduler.kubeconfig" \
  --leader-elect=false --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" \
  --cert-dir="$PKI/kube-scheduler" --profiling=false

# ---- Prometheus (started now so it comes up while the rest settles) ----------------------------
TARGETS_FILE=$STATE_DIR/prometheus-targets.json
echo "[]" >"$TARGETS_FILE"   # a new cluster starts with no extra targets
rm -f "$STATE_DIR"/prometheus-targets.d/*.json
cat >"$STATE_DIR/prometheus.yml" <<EOF
# Written by tests/cluster/up.sh. Add scrape targets by writing file_sd JSON, e.g.
#   [{"targets": ["127.0.0.1:9102"], "labels": {"job": "mesh-simulator"}}]
# to $TARGETS_FILE or to a new *.json file in $STATE_DIR/prometheus-targets.d/ (re-read every 2s).
global:
  scrape_interval: $SCRAPE_INTERVAL
  scrape_timeout: $SCRAPE_INTERVAL
  evaluation_interval: $SCRAPE_INTERVAL
scrape_configs:
- job_name: prometheus
  static_configs:
  - targets: ["127.0.0.1:$PROM_PORT"]
- job_name: file-sd
  file_sd_configs:
  - files: ["$TARGETS_FILE", "$STATE_DIR/prometheus-targets.d/*.json"]
    refresh_interval: 2s
EOF
say "starting prometheus ($PROM_URL)"
start prometheus "$PROMETHEUS_BIN" \
  --config.file="$STATE_DIR/prometheus.yml" \
  --storage.tsdb.path="$STATE_DIR/prometheus-data" \
  --storage.tsdb.retention.time=1d \
  --web.listen-address="127.0.0.1:$PROM_PORT" \
  --web.enable-lifecycle --web.enable-remote-write-receiver

# ---- kwok and the fake Node --------------------------------------------------------------------
say "starting kwok and node $NODE_NAME"
kwok_args=()
for f in "${KWOK_STAGES[@]}"; do kwok_args+=(-c "$f"); done
# HOME: kwok also reads ~/.kwok/kwok.yaml when present; keep a user's file out of the picture.
HOME=$STATE_DIR/kwok-home start kwok "$KWOK" "${kwok_args[@]}" \
  --kubeconfig="$STATE_DIR/kwok.kubeconfig" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds=40 \
  --cidr=10.244.0.0/16 --node-ip=127.0.0.1
CURRENT=kube-apiserver
# Room for make bench: its N releases run N stable and N canary pods on this one fake node, and a
# real node's 110 pods would leave canaries Pending (rolled back at progressDeadline).
kc apply -f - >"$LOGS/node.log" 2>&1 <<EOF || fail "could not create node $NODE_NAME: $(cat "$LOGS/node.log")"
apiVersion: v1
kind: Node
metadata:
  name: $NODE_NAME
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $NODE_NAME
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
    type: kwok
status:
  allocatable: {cpu: "1000", memory: 4Ti, pods: "2000"}
  capacity: {cpu: "1000", memory: 4Ti, pods: "2000"}
EOF
node_ready() {
  [ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# ---- Istio's validation: every VirtualService/DestinationRule write goes through the webhook ---
# As istiod's validator: CREATE/UPDATE only, Fail when the webhook is down (a real cluster
# refuses the write then too). Named validation.istio.io like istiod's, so refusals read the same.
wait_for istio-webhook "ready /ready" curl -sf --max-time 2 --cacert "$PKI/ca.crt" \
  "https://127.0.0.1:$WEBHOOK_PORT/ready"
CURRENT=kube-apiserver
kc apply -f - >"$LOGS/istio-webhook-config.log" 2>&1 <<EOF || fail "could not create the ValidatingWebhookConfiguration: $(cat "$LOGS/istio-webhook-config.log")"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: istio-validation.chatrelease.local
webhooks:
- name: validation.istio.io
  clientConfig:
    url: $WEBHOOK_URL
    caBundle: $CA_DATA
  rules:
  - apiGroups: [networking.istio.io]
    apiVersions: [v1, v1beta1, v1alpha3]
    resources: [virtualservices, destinationrules]
    operations: [CREATE, UPDATE]
    scope: Namespaced
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 5
EOF

# ---- CRDs: Istio's networking API, the Gateway API's standard channel, then the project's own -
CURRENT=kube-apiserver
crd_files=("$ISTIO_CRDS" "$GATEWAY_API_CRDS")
[ -d "$CRDS_DIR" ] || fail "no folder $CRDS_DIR (CRDS_DIR) with the ChatRelease CRD"
while IFS= read -r f; do crd_files+=("$f"); done \
  < <(find "$CRDS_DIR" -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
[ ${#crd_files[@]} -gt 2 ] || fail "no CRD in $CRDS_DIR (CRDS_DIR): run 'make crds'"
for f in "${crd_files[@]}"; do
  say "applying $f"
  kc apply --server-side --force-conflicts --field-manager=chatrelease-up -f "$f" \
    >>"$LOGS/crds.log" 2>&1 || fail "the API server refused $f (see below)" crds
done
# (`kubectl wait` errors out at once on a CRD that has no status yet, so poll.)
crds_established() {
  local s
  s=$(kc get crd -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Established")].status}{"\n"}{end}' 2>>"$LOGS/crds.log") || return 1
  ! printf '%s\n' "$s" | grep -v '=True$' | grep . >>"$LOGS/crds.log"
}
deadline=$((SECONDS + UP_TIMEOUT))
until crds_established; do
  [ $SECONDS -lt $deadline ] || fail "CRDs not Established after ${UP_TIMEOUT}s" crds
  sleep 0.3
done

# The API server picks up a new webhook configuration a moment later: wait until a server-side
# dry run of a VirtualService Istio refuses (all weights 0) is denied by the webhook.
say "waiting until the API server sends VirtualService writes to istio-webhook"
webhook_enforced() {
  ! kc create --dry-run=server -o name -f - >"$LOGS/istio-webhook-check.log" 2>&1 <<EOF &&
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: up-sh-webhook-check, namespace: default}
spec:
  hosts: [check.default.svc.cluster.local]
  http:
  - route:
    - {destination: {host: check.default.svc.cluster.local, subset: a}, weight: 0}
    - {destination: {host: check.default.svc.cluster.local, subset: b}, weight: 0}
EOF
    grep 'admission webhook "validation.istio.io" denied the request' "$LOGS/istio-webhook-check.log" >/dev/null
}
deadline=$((SECONDS + UP_TIMEOUT))
until webhook_enforced; do
  alive istio-webhook || fail "istio-webhook exited" istio-webhook
  [ $SECONDS -lt $deadline ] || fail "the API server does not send VirtualServices to istio-webhook after ${UP_TIMEOUT}s: $(cat "$LOGS/istio-webhook-check.log")" istio-webhook
  sleep 0.3
done

# ---- health of the rest ------------------------------------------------------------------------
wait_for kube-controller-manager "healthy /healthz" \
  curl -skf --max-time 3 "https://127.0.0.1:$KCM_PORT/healthz"
wait_for kube-scheduler "healthy /healthz" \
  curl -skf --max-time 3 "https://127.0.0.1:$SCHED_PORT/healthz"
wait_for kwok "node $NODE_NAME Ready" node_ready

say "waiting for the controller-manager, scheduler, node and Prometheus"
wait_for prometheus "ready /-/ready" curl -sf --max-time 2 "$PROM_URL/-/ready"
CURRENT=""

# ---- env file ----------------------------------------------------------------------------------
pid() { cat "$STATE_DIR/pids/$1.pid"; }
cat >"$STATE_DIR/env" <<EOF
# Written by tests/cluster/up.sh; source it:  . $STATE_DIR/env
export CLUSTER_STATE_DIR='$STATE_DIR'
export KUBECONFIG='$STATE_DIR/kubeconfig'
export KUBE_APISERVER_URL='$API_URL'
export KUBE_CA_FILE='$PKI/ca.crt'
export ETCD_URL='$ETCD_URL'
export PROMETHEUS_URL='$PROM_URL'
export PROMETHEUS_TARGETS_FILE='$TARGETS_FILE'
export PROMETHEUS_TARGETS_DIR='$STATE_DIR/prometheus-targets.d'
export KUBECTL='$KUBECTL'
export KWOK_NODE_NAME='$NODE_NAME'
export ISTIO_WEBHOOK_URL='$WEBHOOK_URL'
ETCD_PID=$(pid etcd)
KUBE_APISERVER_PID=$(pid kube-apiserver)
KUBE_CONTROLLER_MANAGER_PID=$(pid kube-controller-manager)
KUBE_SCHEDULER_PID=$(pid kube-scheduler)
KWOK_PID=$(pid kwok)
PROMETHEUS_PID=$(pid prometheus)
ISTIO_WEBHOOK_PID=$(pid istio-webhook)
EOF

trap - EXIT
say "control plane up in $((SECONDS - T0))s"
cat <<EOF
KUBECONFIG=$STATE_DIR/kubeconfig
KUBE_APISERVER_URL=$API_URL
PROMETHEUS_URL=$PROM_URL
stop with: $HERE/down.sh $STATE_DIR
EOF
