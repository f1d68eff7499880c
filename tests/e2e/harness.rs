//! The end-to-end harness: one fresh namespace per test on the local control plane of
//! `tests/cluster/up.sh`, with the test's own mesh simulator (scraped by the cluster's Prometheus
//! through a file_sd target) and its own operator process, both started from the binaries Cargo
//! built for this test run. Logs go to `STATE_DIR/logs/e2e/<namespace>/`, which `down.sh` keeps;
//! their tails are printed when a test fails.
//!
//! Everything is bounded: each test runs under an overall timeout, every wait has its own, child
//! processes are killed when their handle drops, and each child's pid file in `STATE_DIR/pids/`
//! lets `down.sh` stop it even if this process dies first.

// The mesh simulator is a binary, not a library: the names both sides use live in one file.
#[path = "../meshsim/contract.rs"]
mod meshsim_contract;

use chatrelease::crd::{AnalysisRecord, ChatRelease, Phase};
use chatrelease::router::gateway_api::{HttpRoute, PRIMARY_RULE};
use chatrelease::router::istio::{PRIMARY_ROUTE, VirtualService};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The environment variable naming the STATE_DIR that `tests/cluster/up.sh` started.
pub const STATE_ENV: &str = "E2E_STATE_DIR";
/// Name of the ChatRelease every test works on (each test has its own namespace).
pub const NAME: &str = "chat";
/// Field manager of what the tests apply, as a person's `kubectl apply --server-side` would be.
const FIELD_MANAGER: &str = "e2e-tests";

/// `strategy.interval` and `analysis.window` of every test's ChatRelease.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// `strategy.drainTimeout`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// `strategy.progressDeadline`.
pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);
/// `analysis.minRequests`.
pub const MIN_REQUESTS: i64 = 20;
/// Synthetic requests per second through the VirtualService: about 50 canary requests per
/// window at 5%, so a 30% error rate is tens of standard errors above a clean stable.
pub const MESHSIM_RPS: u32 = 100;
/// Share of the simulator's users replaced by new ones each second: new sessions arrive as
/// in real traffic, so a sticky canary gets users as its weight grows.
pub const MESHSIM_USER_CHURN: f64 = 0.1;
/// The cookie the simulator's testers carry, matched as `examples/lobe-chat.yaml` does.
pub const TESTER_COOKIE_REGEX: &str = r"^(.*;)?\s*canary=true(;.*)?$";
/// `spec.traffic.stickyCookie` of the tests that pin users.
pub const STICKY_COOKIE: &str = "chat-version";
/// A fixed seed: the traffic of a run can be reproduced.
pub const MESHSIM_SEED: u64 = 20_240_917;

const OPERATOR: &str = env!("CARGO_BIN_EXE_chatrelease-operator");
const MESHSIM: &str = env!("CARGO_BIN_EXE_chatrelease-meshsim");
const KUBECTL_CHATRELEASE: &str = env!("CARGO_BIN_EXE_kubectl-chatrelease");

/// How often waits look again. Well under a reconcile, far over the API server's cost.
const POLL: Duration = Duration::from_millis(250);
/// How long a child process (or the cluster's Prometheus target) may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A kube-apiserver starting beside nine tests on two cores takes a while.
const API_SERVER_START_TIMEOUT: Duration = Duration::from_secs(90);

// ----- the control plane ---------------------------------------------------------------------

/// What `up.sh` wrote to `STATE_DIR/env`.
pub struct Cluster {
    pub state_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub prometheus_url: String,
    pub targets_dir: PathBuf,
    /// The Prometheus binary, for tests that run a second one (`PROMETHEUS_BIN`, as tools.mk
    /// names it; default Debian's).
    pub prometheus_bin: PathBuf,
    /// The control plane's kubectl, as a person would run it.
    pub kubectl: PathBuf,
}

impl Cluster {
    /// The control plane named by `E2E_STATE_DIR`; panics with what to do when there is none.
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(|| {
            // kube and reqwest use rustls; the test process must choose a provider once.
            chatrelease::cli::install_crypto_provider();
            Cluster::load().unwrap_or_else(|problem| panic!("{problem}"))
        })
    }

    fn load() -> Result<Cluster, String> {
        let dir = std::env::var_os(STATE_ENV).ok_or_else(|| {
            format!(
                "{STATE_ENV} is not set: run `make e2e`, or start a control plane with \
                 `tests/cluster/up.sh DIR` and set {STATE_ENV}=DIR"
            )
        })?;
        let state_dir = PathBuf::from(dir);
        let env_file = state_dir.join("env");
        let text = fs::read_to_string(&env_file).map_err(|e| {
            format!(
                "cannot read {}: {e}; is the control plane of {STATE_ENV} up?",
                env_file.display()
            )
        })?;
        let vars = parse_env_file(&text);
        let var = |key: &str| {
            vars.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("{} has no {key}", env_file.display()))
        };
        Ok(Cluster {
            kubeconfig: PathBuf::from(var("KUBECONFIG")?),
            prometheus_url: var("PROMETHEUS_URL")?,
            targets_dir: PathBuf::from(var("PROMETHEUS_TARGETS_DIR")?),
            prometheus_bin: std::env::var_os("PROMETHEUS_BIN")
                .map_or_else(|| PathBuf::from("/usr/bin/prometheus"), PathBuf::from),
            kubectl: PathBuf::from(var("KUBECTL")?),
            state_dir,
        })
    }

    async fn client(&self) -> Client {
        client_of(&self.kubeconfig).await
    }
}

async fn client_of(path: &Path) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()));
    Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
}

/// `export KEY='value'` and `KEY=value` lines, as up.sh writes them.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches('\'').to_string(),
            )
        })
        .collect()
}

// ----- child processes -----------------------------------------------------------------------

/// A child process with its log file and a pid file `down.sh` honours. Killed on drop.
struct Proc {
    name: String,
    child: Child,
    pid_file: PathBuf,
    /// Set once the harness has asked it to stop, so its exit is not reported as a crash.
    signalled: bool,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command, log: &Path, pid_file: PathBuf) -> Proc {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let _ = writeln!(file, "---- e2e: starting {name} at {}", wall_clock());
        let err = file.try_clone().expect("log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        let _ = fs::write(&pid_file, format!("{}\n", child.id()));
        Proc {
            name: name.to_string(),
            child,
            pid_file,
            signalled: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs; a process that exited is reaped.
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait()
            && !self.signalled
        {
            // Shown with a failing test's output: a crash is often the whole story.
            eprintln!(
                "{} (pid {}) had exited by itself: {status}",
                self.name,
                self.pid()
            );
        }
        self.signalled = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.pid_file);
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    async fn terminate(&mut self, grace: Duration) {
        self.signalled = true;
        if self.running() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let deadline = Instant::now() + grace;
            while self.running() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kubectl chatrelease status --watch` running in the background; see [`TestEnv::watch_status`].
pub struct StatusWatch {
    proc: Proc,
    output: PathBuf,
}

impl StatusWatch {
    /// Ctrl-C, as a person ends the watch: its exit status (`None` if it did not exit within
    /// 5 s and had to be killed) and everything it printed, the harness's header line left out.
    pub async fn interrupt(mut self) -> (Option<std::process::ExitStatus>, String) {
        self.proc.signalled = true;
        let _ = Command::new("kill")
            .args(["-INT", &self.proc.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        let exit = loop {
            if let Ok(Some(exit)) = self.proc.child.try_wait() {
                break Some(exit);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.proc.kill();
        let printed = fs::read_to_string(&self.output).unwrap_or_default();
        let printed = printed
            .lines()
            .filter(|line| !line.starts_with("---- e2e: "))
            .collect::<Vec<_>>()
            .join("\n");
        (exit, printed)
    }
}

/// A TCP port on 127.0.0.1 that is free now, below the kernel's ephemeral range so an outgoing
/// connection does not take it meanwhile (as up.sh does).
fn free_port() -> u16 {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().rotate_left(16);
    for i in 0..2000u32 {
        let port = 20_000 + ((seed.wrapping_add(i.wrapping_mul(7919))) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-32000 on 127.0.0.1");
}

/// Status and body of `METHOD http://address/path` (no request body), or None when nothing
/// answers in time.
pub async fn http_exchange(address: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).to_string();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// A Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct MetricsText(pub String);

impl MetricsText {
    /// The sum over every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, label_text) = match series.split_once('{') {
                    Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                    None => (series, ""),
                };
                if metric != name {
                    return None;
                }
                // Names and numbers only here: no commas or quotes inside a value.
                let pairs: Vec<(&str, &str)> = label_text
                    .split(',')
                    .filter_map(|pair| {
                        let (key, quoted) = pair.split_once('=')?;
                        Some((key.trim(), quoted.trim().trim_matches('"')))
                    })
                    .collect();
                labels
                    .iter()
                    .all(|want| pairs.contains(want))
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }
}

/// Status code of `GET http://address/path`, or None when nothing answers in time.
pub async fn http_status(address: &str, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await.ok()?;
        let text = String::from_utf8_lossy(&head[..n]).to_string();
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

fn wall_clock() -> String {
    jiff::Timestamp::now().to_string()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A line for whoever runs the suite, past the test harness's output capture, also kept in
/// `STATE_DIR/logs/e2e/timings.txt`.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "e2e: {line}");
    if let Some(cluster) = CLUSTER_FOR_REPORT.get() {
        let path = cluster.join("logs/e2e/timings.txt");
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}
static CLUSTER_FOR_REPORT: OnceLock<PathBuf> = OnceLock::new();

// ----- the ChatRelease under test --------------------------------------------------------------

/// A ChatRelease as a test writes it: the short timings of the suite, an image, and the
/// simulator's `SIM_*` variables that make a version good or bad.
#[derive(Debug, Clone)]
pub struct Release {
    pub image: String,
    pub env: Vec<(String, String)>,
    pub manual_gates: Vec<i32>,
    pub failure_limit: Option<i32>,
    /// `strategy.interval` (and `analysis.window`), when not INTERVAL.
    pub interval: Option<Duration>,
    /// `strategy.steps`, when not 5, 25, 50, 100.
    pub steps: Option<Vec<i32>>,
    pub prometheus: Option<String>,
    /// `spec.analysis.latencyP99.max`.
    pub latency_p99: Option<String>,
    /// `spec.analysis.metrics`.
    pub metrics: Vec<Value>,
    /// `spec.analysis.minRequests`, when not MIN_REQUESTS.
    pub min_requests: Option<i64>,
    /// `spec.analysis.source`, when not the default (`istio`).
    pub source: Option<String>,
    /// `spec.template.spec.nodeSelector`: a selector no node has keeps the pods Pending.
    pub node_selector: Option<Value>,
    /// `spec.traffic`, when the test routes testers or pins users.
    pub traffic: Option<Value>,
    /// Which router carries the traffic.
    pub router: Router,
}

/// The two routers the operator drives; every rollout test runs with each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Router {
    /// A VirtualService and a DestinationRule.
    Istio,
    /// An HTTPRoute attached to the app's Service (GAMMA: the mesh), a Service per track.
    GatewayApi,
}

impl Router {
    /// `route_kind` of the simulator's user metrics.
    pub fn route_kind(self) -> &'static str {
        match self {
            Router::Istio => "VirtualService",
            Router::GatewayApi => "HTTPRoute",
        }
    }
}

impl Release {
    /// `lobehub/lobe-chat:<tag>`, a healthy version.
    pub fn version(tag: &str) -> Release {
        Release {
            image: format!("lobehub/lobe-chat:{tag}"),
            env: Vec::new(),
            manual_gates: Vec::new(),
            failure_limit: None,
            prometheus: None,
            latency_p99: None,
            metrics: Vec::new(),
            min_requests: None,
            source: None,
            node_selector: None,
            traffic: None,
            router: Router::Istio,
            interval: None,
            steps: None,
        }
    }

    /// `strategy.steps`.
    pub fn steps(mut self, steps: &[i32]) -> Release {
        self.steps = Some(steps.to_vec());
        self
    }

    /// `strategy.interval` and `analysis.window`.
    pub fn interval(mut self, interval: Duration) -> Release {
        self.interval = Some(interval);
        self
    }

    /// [`Release::version`] routed by `router`; the Gateway API's route attaches to the app's
    /// Service (GAMMA: the mesh).
    pub fn version_routed(router: Router, tag: &str) -> Release {
        Release {
            router,
            ..Release::version(tag)
        }
    }

    /// Testers (the simulator's `canary=true` cookie) always on the canary, and every other
    /// user kept on one version by the cookie `chat-version`, as `examples/lobe-chat.yaml` does.
    pub fn testers_and_sticky_users(mut self) -> Release {
        self.traffic = Some(json!({
            "canaryMatch": [{"headers": {"cookie": {"regex": TESTER_COOKIE_REGEX}}}],
            "stickyCookie": STICKY_COOKIE,
        }));
        self
    }

    /// `spec.analysis.minRequests`.
    pub fn min_requests(mut self, n: i64) -> Release {
        self.min_requests = Some(n);
        self
    }

    /// `spec.analysis.source`: `istio-waypoint` or `otel` (the simulator exports both always).
    pub fn source(mut self, source: &str) -> Release {
        self.source = Some(source.into());
        self
    }

    /// Pods that no node can take: they stay Pending, never Ready.
    pub fn unschedulable(mut self) -> Release {
        self.node_selector = Some(json!({"chatrelease.io/no-such-node": "true"}));
        self
    }

    /// `spec.analysis.latencyP99.max`, such as `1s`.
    pub fn latency_p99(mut self, max: &str) -> Release {
        self.latency_p99 = Some(max.into());
        self
    }

    /// One more `spec.analysis.metrics` entry with an upper bound.
    pub fn metric(mut self, name: &str, query: &str, max: f64) -> Release {
        self.metrics
            .push(json!({"name": name, "query": query, "max": max}));
        self
    }

    /// One more `spec.analysis.metrics` entry as written, such as a built-in check
    /// `{"check": "ttft-p99", "max": 1.5}`.
    pub fn check(mut self, entry: Value) -> Release {
        self.metrics.push(entry);
        self
    }

    /// Sets an environment variable of the container (the simulator reads `SIM_*`).
    pub fn env(mut self, name: &str, value: &str) -> Release {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn manual_gates(mut self, gates: &[i32]) -> Release {
        self.manual_gates = gates.to_vec();
        self
    }

    pub fn failure_limit(mut self, limit: i32) -> Release {
        self.failure_limit = Some(limit);
        self
    }

    /// `spec.analysis.prometheus.address`.
    pub fn prometheus(mut self, address: &str) -> Release {
        self.prometheus = Some(address.into());
        self
    }

    /// The whole object, for server-side apply.
    pub fn manifest(&self) -> Value {
        let env: Vec<Value> = self
            .env
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        let secs = |d: Duration| format!("{}s", d.as_secs());
        let mut analysis = json!({
            "window": secs(self.interval.unwrap_or(INTERVAL)),
            "minRequests": self.min_requests.unwrap_or(MIN_REQUESTS),
            "compareToStable": true,
            "errorRate": {"max": "1%"},
        });
        if let Some(limit) = self.failure_limit {
            analysis["failureLimit"] = json!(limit);
        }
        if let Some(source) = &self.source {
            analysis["source"] = json!(source);
        }
        if let Some(address) = &self.prometheus {
            analysis["prometheus"] = json!({"address": address});
        }
        if let Some(max) = &self.latency_p99 {
            analysis["latencyP99"] = json!({"max": max});
        }
        if !self.metrics.is_empty() {
            analysis["metrics"] = json!(self.metrics);
        }
        let mut pod = json!({"containers": [{
            "name": "lobe-chat",
            "image": self.image,
            "ports": [{"containerPort": 3210}],
            "env": env,
        }]});
        if let Some(selector) = &self.node_selector {
            pod["nodeSelector"] = selector.clone();
        }
        let mut manifest = json!({
            "apiVersion": "chatrelease.io/v1alpha1",
            "kind": "ChatRelease",
            "metadata": {"name": NAME},
            "spec": {
                "replicas": 2,
                "template": {"spec": pod},
                "service": {"port": 80, "targetPort": 3210},
                "strategy": {
                    "steps": self.steps.clone().unwrap_or_else(|| vec![5, 25, 50, 100]),
                    "interval": secs(self.interval.unwrap_or(INTERVAL)),
                    "manualGates": self.manual_gates,
                    "drainTimeout": secs(DRAIN_TIMEOUT),
                    "progressDeadline": secs(PROGRESS_DEADLINE),
                },
                "analysis": analysis,
            },
        });
        let mut traffic = self.traffic.clone().unwrap_or_else(|| json!({}));
        if self.router == Router::GatewayApi {
            traffic["gatewayAPI"] =
                json!({"parentRefs": [{"group": "", "kind": "Service", "name": NAME}]});
        }
        if traffic != json!({}) {
            manifest["spec"]["traffic"] = traffic;
        }
        manifest
    }
}

/// The weighted split of the VirtualService's `primary` route, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub stable: i32,
    pub canary: i32,
}

impl Split {
    pub const ALL_STABLE: Split = Split {
        stable: 100,
        canary: 0,
    };

    fn of_route(route: &HttpRoute) -> Option<Split> {
        let primary = route
            .spec
            .rules
            .iter()
            .find(|r| r.name.as_deref() == Some(PRIMARY_RULE))?;
        let weight = |track: &str| {
            let service = format!("{NAME}-{track}");
            primary
                .backend_refs
                .iter()
                .filter(|b| b.name == service)
                .map(|b| b.weight.unwrap_or(1))
                .sum()
        };
        Some(Split {
            stable: weight("stable"),
            canary: weight("canary"),
        })
    }

    fn of(vs: &VirtualService) -> Option<Split> {
        let primary = vs.spec.http.iter().find(|r| r.name == PRIMARY_ROUTE)?;
        let weight = |subset: &str| {
            primary
                .route
                .iter()
                .filter(|d| d.destination.subset == subset)
                .map(|d| d.weight)
                .sum()
        };
        Some(Split {
            stable: weight("stable"),
            canary: weight("canary"),
        })
    }
}

/// A short account of a ChatRelease's status for assertion messages.
pub fn summary(release: &ChatRelease) -> String {
    match &release.status {
        None => "no status yet".into(),
        Some(s) => format!(
            "phase {} weight {} step {:?} failedChecks {} message {:?}",
            s.phase, s.canary_weight, s.current_step, s.failed_checks, s.message
        ),
    }
}

pub fn phase(release: &ChatRelease) -> Option<Phase> {
    release.status.as_ref().map(|s| s.phase)
}

pub fn weight(release: &ChatRelease) -> i32 {
    release.status.as_ref().map_or(0, |s| s.canary_weight)
}

// ----- one test's world --------------------------------------------------------------------

/// What a test gets: its namespace, a client, and its own simulator and operator.
pub struct TestEnv {
    pub test: String,
    pub namespace: String,
    pub client: Client,
    cluster: &'static Cluster,
    dir: PathBuf,
    meshsim: Mutex<Option<Proc>>,
    meshsim_address: Mutex<Option<String>>,
    target_file: Mutex<Option<PathBuf>>,
    operator: Mutex<Option<Proc>>,
    prometheus: Mutex<Option<Proc>>,
    /// The command line of the test's own Prometheus, to start it again as it was.
    prometheus_args: Mutex<Vec<String>>,
    /// A second kube-apiserver on the cluster's etcd that only this test's operator talks to, so
    /// the test can stop and restart "the API server" without disturbing the tests beside it.
    api_server: Mutex<Option<Proc>>,
    api_server_args: Mutex<Vec<String>>,
    /// The kubeconfig the operator gets; the cluster's unless the test runs its own API server.
    operator_kubeconfig: Mutex<Option<PathBuf>>,
    cleaned: std::sync::atomic::AtomicBool,
}

/// What a test needs running beside the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Only a namespace (tests of the API server's validation).
    Namespace,
    /// A namespace, a mesh simulator scraped by Prometheus, and an operator.
    Operator,
}

/// Runs one test: sets up its world, runs `body` under `limit`, prints the logs' tails and the
/// objects on failure, and always cleans up (processes, scrape target, namespace).
pub async fn run(test: &str, needs: Needs, limit: Duration, body: impl AsyncFnOnce(&TestEnv)) {
    let started = Instant::now();
    let env = TestEnv::new(test).await;
    let setup = AssertUnwindSafe(async {
        if needs == Needs::Operator {
            env.start_meshsim().await;
            env.start_operator();
        }
    })
    .catch_unwind()
    .await;
    let outcome = match setup {
        Err(panic) => Err(panic),
        Ok(()) => AssertUnwindSafe(tokio::time::timeout(limit, body(&env)))
            .catch_unwind()
            .await
            .map(|r| r.map_err(|_| ())),
    };
    let took = started.elapsed().as_secs_f64();
    let failed = !matches!(outcome, Ok(Ok(())));
    if failed {
        env.diagnose().await;
    }
    env.cleanup().await;
    match outcome {
        Ok(Ok(())) => report(&format!("{test}: passed in {took:.1}s")),
        Ok(Err(())) => {
            report(&format!("{test}: TIMED OUT after {took:.1}s"));
            panic!(
                "{test} did not finish within {}s (the overall limit of the test)",
                limit.as_secs()
            );
        }
        Err(panic) => {
            report(&format!("{test}: FAILED after {took:.1}s"));
            std::panic::resume_unwind(panic);
        }
    }
}

impl TestEnv {
    async fn new(test: &str) -> TestEnv {
        let cluster = Cluster::get();
        let _ = CLUSTER_FOR_REPORT.set(cluster.state_dir.clone());
        let client = cluster.client().await;
        let suffix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            % 0xfffff;
        let namespace = format!("e2e-{test}-{suffix:05x}");
        assert!(namespace.len() <= 63, "namespace {namespace} too long");
        let dir = cluster.state_dir.join("logs/e2e").join(&namespace);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))
            .expect("namespace object");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {namespace}: {e}"));
        TestEnv {
            test: test.to_string(),
            namespace,
            client,
            cluster,
            dir,
            meshsim: Mutex::new(None),
            meshsim_address: Mutex::new(None),
            target_file: Mutex::new(None),
            operator: Mutex::new(None),
            prometheus: Mutex::new(None),
            prometheus_args: Mutex::new(Vec::new()),
            api_server: Mutex::new(None),
            api_server_args: Mutex::new(Vec::new()),
            operator_kubeconfig: Mutex::new(None),
            cleaned: Default::default(),
        }
    }

    fn pid_file(&self, what: &str) -> PathBuf {
        self.cluster
            .state_dir
            .join("pids")
            .join(format!("{}-{what}.pid", self.namespace))
    }

    fn log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }

    /// The cluster's child-process environment: its kubeconfig, and logs at info.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("KUBECONFIG", &self.cluster.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .env("NO_COLOR", "1")
            .env_remove("PROMETHEUS_URL")
            .env_remove("WATCH_NAMESPACE");
        command
    }

    /// Starts the simulator on a free port, waits for `/healthz`, then registers it with the
    /// cluster's Prometheus and waits until Prometheus scrapes it.
    async fn start_meshsim(&self) {
        let mut last_problem = String::new();
        for _attempt in 0..3 {
            let address = format!("127.0.0.1:{}", free_port());
            let mut proc = Proc::spawn(
                "chatrelease-meshsim",
                self.command(MESHSIM).args([
                    "--namespace",
                    &self.namespace,
                    "--listen",
                    &address,
                    "--rps",
                    &MESHSIM_RPS.to_string(),
                    "--seed",
                    &MESHSIM_SEED.to_string(),
                    "--user-churn",
                    &MESHSIM_USER_CHURN.to_string(),
                ]),
                &self.log("meshsim"),
                self.pid_file("meshsim"),
            );
            let deadline = Instant::now() + START_TIMEOUT;
            while proc.running() && Instant::now() < deadline {
                if http_status(&address, "/healthz").await == Some(200) {
                    *self.meshsim.lock().unwrap() = Some(proc);
                    *self.meshsim_address.lock().unwrap() = Some(address.clone());
                    self.register_scrape_target(&address).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            last_problem = format!(
                "chatrelease-meshsim did not serve /healthz on {address}:\n{}",
                tail(&self.log("meshsim"), 20)
            );
            proc.kill();
        }
        panic!("{last_problem}");
    }

    async fn register_scrape_target(&self, address: &str) {
        let file = self
            .cluster
            .targets_dir
            .join(format!("{}.json", self.namespace));
        let body =
            json!([{"targets": [address], "labels": {"job": "meshsim", "e2e_test": self.test}}]);
        // Written whole and renamed, so Prometheus never reads half a file.
        let partial = file.with_extension("json.tmp");
        fs::write(&partial, body.to_string())
            .and_then(|()| fs::rename(&partial, &file))
            .unwrap_or_else(|e| panic!("writing scrape target {}: {e}", file.display()));
        *self.target_file.lock().unwrap() = Some(file);
        // Analyses read rates over 10 s windows: be sure Prometheus has the target before any.
        let query = format!("up{{instance=\"{address}\"}}");
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if self
                .prometheus_value(&self.cluster.prometheus_url, &query)
                .await
                == Some(1.0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "Prometheus {} did not scrape the simulator at {address} within {}s",
            self.cluster.prometheus_url,
            START_TIMEOUT.as_secs()
        );
    }

    /// The single value an instant query returns, if Prometheus answers with one.
    pub async fn prometheus_value(&self, base: &str, query: &str) -> Option<f64> {
        let client = prometheus_http_query::Client::try_from(base).ok()?;
        let result = tokio::time::timeout(Duration::from_secs(3), client.query(query).get())
            .await
            .ok()?
            .ok()?;
        match result.data() {
            prometheus_http_query::response::Data::Vector(series) => {
                series.first().map(|s| s.sample().value())
            }
            _ => None,
        }
    }

    /// Starts `chatrelease-operator run` for this namespace (again, after `kill_operator`).
    pub fn start_operator(&self) {
        let mut slot = self.operator.lock().unwrap();
        assert!(slot.is_none(), "the operator is already running");
        let mut command = self.command(OPERATOR);
        if let Some(kubeconfig) = self.operator_kubeconfig.lock().unwrap().as_ref() {
            command.env("KUBECONFIG", kubeconfig);
        }
        *slot = Some(Proc::spawn(
            "chatrelease-operator",
            command.args([
                "run",
                // One operator per test namespace: no election among them, metrics on loopback.
                "--no-leader-election",
                "--metrics-addr",
                "127.0.0.1:0",
                "--namespace",
                &self.namespace,
                "--prometheus-url",
                &self.cluster.prometheus_url,
            ]),
            &self.log("operator"),
            self.pid_file("operator"),
        ));
    }

    /// SIGKILL, as a node failure or an OOM kill would: no chance to finish a reconcile.
    pub fn kill_operator(&self) {
        let mut proc = self
            .operator
            .lock()
            .unwrap()
            .take()
            .expect("the operator is not running");
        assert!(proc.running(), "the operator had exited on its own");
        proc.kill();
    }

    // ----- the test's own Prometheus ---------------------------------------------------------

    /// Starts a Prometheus that scrapes only this test's simulator, every 2 s, with its own data
    /// folder and port; returns its address for `spec.analysis.prometheus.address`.
    pub async fn start_own_prometheus(&self) -> String {
        let meshsim = self
            .meshsim_address
            .lock()
            .unwrap()
            .clone()
            .expect("the simulator runs");
        let port = free_port();
        let config = self.dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}}\n\
                 scrape_configs:\n\
                 - job_name: meshsim\n  static_configs:\n  - targets: [\"{meshsim}\"]\n"
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
        let args = vec![
            format!("--config.file={}", config.display()),
            format!(
                "--storage.tsdb.path={}",
                self.dir.join("prometheus-data").display()
            ),
            "--storage.tsdb.retention.time=1h".into(),
            format!("--web.listen-address=127.0.0.1:{port}"),
        ];
        self.spawn_own_prometheus(args).await;
        format!("http://127.0.0.1:{port}")
    }

    async fn spawn_own_prometheus(&self, args: Vec<String>) {
        let address = args
            .iter()
            .find_map(|a| a.strip_prefix("--web.listen-address="))
            .expect("listen address")
            .to_string();
        let mut proc = Proc::spawn(
            "prometheus",
            Command::new(&self.cluster.prometheus_bin)
                .args(&args)
                // down.sh stops a pid file's process only if it mentions STATE_DIR.
                .env("KUBECONFIG", &self.cluster.kubeconfig),
            &self.log("prometheus"),
            self.pid_file("prometheus"),
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            assert!(
                proc.running(),
                "prometheus exited:\n{}",
                tail(&self.log("prometheus"), 20)
            );
            if http_status(&address, "/-/ready").await == Some(200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus on {address} not ready within {}s:\n{}",
                START_TIMEOUT.as_secs(),
                tail(&self.log("prometheus"), 20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        *self.prometheus.lock().unwrap() = Some(proc);
        *self.prometheus_args.lock().unwrap() = args;
    }

    /// Stops the test's Prometheus (SIGTERM, as an orderly restart would) and waits until its
    /// port is closed.
    pub async fn stop_own_prometheus(&self) {
        let mut proc = self
            .prometheus
            .lock()
            .unwrap()
            .take()
            .expect("own prometheus runs");
        proc.terminate(Duration::from_secs(15)).await;
    }

    /// Starts it again with the same port and data folder.
    pub async fn restart_own_prometheus(&self) {
        let args = self.prometheus_args.lock().unwrap().clone();
        assert!(!args.is_empty(), "own prometheus was never started");
        assert!(
            self.prometheus.lock().unwrap().is_none(),
            "own prometheus still runs"
        );
        self.spawn_own_prometheus(args).await;
    }

    /// Polls the ChatRelease's Events until one has `reason`: an Event is recorded after the
    /// writes it reports, so it may trail what a test saw change.
    pub async fn wait_event(&self, reason: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self
            .events()
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason))
        {
            assert!(
                Instant::now() < deadline,
                "no {reason} Event within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts it again on the same port with its data folder emptied, as a Prometheus without a
    /// persistent volume comes back from a restart.
    pub async fn restart_own_prometheus_without_its_data(&self) {
        let data = self.dir.join("prometheus-data");
        fs::remove_dir_all(&data).unwrap_or_else(|e| panic!("removing {}: {e}", data.display()));
        self.restart_own_prometheus().await;
    }

    // ----- the simulator's own view -------------------------------------------------------------

    fn meshsim_address(&self) -> String {
        self.meshsim_address
            .lock()
            .unwrap()
            .clone()
            .expect("the simulator runs")
    }

    /// The simulator's metrics as it exports them now (not as Prometheus last scraped them).
    pub async fn meshsim_metrics(&self) -> MetricsText {
        let address = self.meshsim_address();
        match http_exchange(&address, "GET", "/metrics").await {
            Some((200, body)) => MetricsText(body),
            other => panic!("GET {address}/metrics answered {other:?}"),
        }
    }

    /// Makes the simulator's `/metrics` answer 503 for `seconds`, as a sidecar that stops
    /// answering its scrapes would; its traffic goes on.
    pub async fn fail_scrapes(&self, seconds: u32) {
        let address = self.meshsim_address();
        let path = format!("/fail-scrapes?seconds={seconds}");
        let answer = http_exchange(&address, "POST", &path).await;
        assert!(
            matches!(answer, Some((200..=299, _))),
            "POST {address}{path} answered {answer:?}"
        );
    }

    /// Status of the simulator's `/metrics` now.
    pub async fn meshsim_metrics_status(&self) -> Option<u16> {
        http_status(&self.meshsim_address(), "/metrics").await
    }

    // ----- the test's own API server ---------------------------------------------------------

    /// Starts a second kube-apiserver with the cluster's own command line (read from its pid)
    /// on a free port, and makes it the API server of every operator this test starts from now
    /// on. The test's client and kubectl stay on the cluster's, so they watch while it is down.
    pub async fn start_own_api_server(&self) {
        let pid_file = self.cluster.state_dir.join("pids/kube-apiserver.pid");
        let pid = fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()));
        let cmdline_file = format!("/proc/{}/cmdline", pid.trim());
        let cmdline =
            fs::read(&cmdline_file).unwrap_or_else(|e| panic!("reading {cmdline_file}: {e}"));
        let mut args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(!args.is_empty(), "{cmdline_file} is empty");
        let cluster_port = args
            .iter()
            .find_map(|a| a.strip_prefix("--secure-port="))
            .expect("the cluster's kube-apiserver names --secure-port")
            .to_string();
        let port = free_port().to_string();
        for arg in &mut args {
            if arg.starts_with("--secure-port=") {
                *arg = format!("--secure-port={port}");
            }
        }
        let kubeconfig = fs::read_to_string(&self.cluster.kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.cluster.kubeconfig.display()));
        let cluster_server = format!("https://127.0.0.1:{cluster_port}");
        assert!(
            kubeconfig.contains(&cluster_server),
            "the cluster's kubeconfig does not name {cluster_server}"
        );
        let own = self.dir.join("own-api-server.kubeconfig");
        fs::write(
            &own,
            kubeconfig.replace(&cluster_server, &format!("https://127.0.0.1:{port}")),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", own.display()));
        *self.operator_kubeconfig.lock().unwrap() = Some(own);
        *self.api_server_args.lock().unwrap() = args;
        self.spawn_own_api_server().await;
    }

    async fn spawn_own_api_server(&self) {
        let mut args = self.api_server_args.lock().unwrap().clone();
        assert!(!args.is_empty(), "own API server was never started");
        let program = args.remove(0);
        let mut proc = Proc::spawn(
            "kube-apiserver",
            Command::new(program).args(&args),
            &self.log("kube-apiserver"),
            self.pid_file("kube-apiserver"),
        );
        let kubeconfig = self.operator_kubeconfig.lock().unwrap().clone().unwrap();
        let client = client_of(&kubeconfig).await;
        let deadline = Instant::now() + API_SERVER_START_TIMEOUT;
        loop {
            assert!(
                proc.running(),
                "own kube-apiserver exited:\n{}",
                tail(&self.log("kube-apiserver"), 20)
            );
            let ready = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if client
                .request_text(ready)
                .await
                .is_ok_and(|body| body == "ok")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "own kube-apiserver not ready within {}s:\n{}",
                API_SERVER_START_TIMEOUT.as_secs(),
                tail(&self.log("kube-apiserver"), 20)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        *self.api_server.lock().unwrap() = Some(proc);
    }

    /// Stops the test's own API server as an upgrade or a crash-looping control plane would
    /// take it away: SIGTERM, then its port closed; the operator keeps running without it.
    pub async fn stop_own_api_server(&self) {
        let mut proc = self
            .api_server
            .lock()
            .unwrap()
            .take()
            .expect("own API server runs");
        proc.terminate(Duration::from_secs(20)).await;
    }

    /// Starts it again on the same port and waits until it is ready.
    pub async fn restart_own_api_server(&self) {
        assert!(
            self.api_server.lock().unwrap().is_none(),
            "own API server still runs"
        );
        self.spawn_own_api_server().await;
    }

    // ----- the API ----------------------------------------------------------------------------

    /// Panics at once, with its log, if the operator or the simulator died: no wait should run
    /// into its timeout for a process that is gone.
    fn check_processes(&self) {
        for (what, slot) in [("operator", &self.operator), ("meshsim", &self.meshsim)] {
            let mut slot = slot.lock().unwrap();
            if let Some(proc) = slot.as_mut()
                && !proc.running()
            {
                let status = proc.child.try_wait().ok().flatten();
                panic!(
                    "{} exited ({status:?}); last lines of its log:\n{}",
                    proc.name,
                    tail(&self.log(what), 20)
                );
            }
        }
    }

    pub fn releases(&self) -> Api<ChatRelease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Server-side applies `release` as the ChatRelease `NAME`.
    pub async fn apply(&self, release: &Release) -> ChatRelease {
        self.try_apply(release.manifest())
            .await
            .unwrap_or_else(|e| panic!("applying {release:?}: {e}"))
    }

    /// Server-side applies a raw manifest; the API server's answer, refusals included.
    pub async fn try_apply(&self, manifest: Value) -> Result<ChatRelease, kube::Error> {
        let name = manifest["metadata"]["name"]
            .as_str()
            .unwrap_or(NAME)
            .to_string();
        self.releases()
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(manifest),
            )
            .await
    }

    pub async fn release(&self) -> ChatRelease {
        self.releases()
            .get(NAME)
            .await
            .unwrap_or_else(|e| panic!("reading ChatRelease {}/{NAME}: {e}", self.namespace))
    }

    /// Sets (or with `None` removes) an annotation on the ChatRelease, as `kubectl annotate`.
    pub async fn annotate(&self, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.releases()
            .patch(NAME, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap_or_else(|e| panic!("annotating {key}: {e}"));
    }

    /// Polls the ChatRelease until `ok` holds; panics with `what` and the last status after
    /// `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&ChatRelease) -> bool,
    ) -> ChatRelease {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            self.check_processes();
            match self.releases().get_opt(NAME).await {
                Ok(Some(release)) => {
                    if ok(&release) {
                        return release;
                    }
                    last = Some(release);
                }
                Ok(None) => {}
                Err(error) => eprintln!("reading the ChatRelease: {error}"),
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {}s for {what}; last seen: {}",
                    timeout.as_secs(),
                    last.as_ref().map_or("no ChatRelease".into(), summary)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for a phase.
    pub async fn wait_phase(&self, want: Phase, timeout: Duration) -> ChatRelease {
        self.wait_for(&format!("phase {want}"), timeout, |r| {
            phase(r) == Some(want)
        })
        .await
    }

    /// Checks `ok` on every poll for `duration`: the release must *stay* so.
    pub async fn holds(&self, what: &str, duration: Duration, ok: impl Fn(&ChatRelease) -> bool) {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            self.check_processes();
            let release = self.release().await;
            assert!(
                ok(&release),
                "expected {what} for {}s, but after {:.1}s: {}",
                duration.as_secs(),
                (duration - deadline.saturating_duration_since(Instant::now())).as_secs_f64(),
                summary(&release)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Checks `hold` on every poll until `done` says the wait is over (`Ok`) and at least
    /// `at_least` has passed; panics if `hold` breaks or if that takes longer than `timeout`.
    /// `done` explains in its `Err` what is still missing.
    pub async fn holds_until(
        &self,
        what: &str,
        at_least: Duration,
        timeout: Duration,
        hold: impl Fn(&ChatRelease) -> bool,
        done: impl Fn() -> Result<(), String>,
    ) {
        let started = Instant::now();
        loop {
            self.check_processes();
            let release = self.release().await;
            assert!(
                hold(&release),
                "expected {what}, but after {:.1}s: {}",
                started.elapsed().as_secs_f64(),
                summary(&release)
            );
            let missing = done();
            if missing.is_ok() && started.elapsed() >= at_least {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{what} held for {}s, but the wait did not end: {}",
                timeout.as_secs(),
                missing.err().unwrap_or_default()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The split of the VirtualService, or of the HTTPRoute when there is none.
    pub async fn split(&self) -> Option<Split> {
        match self.virtual_service_opt().await {
            Some(vs) => Split::of(&vs),
            None => Split::of_route(&self.http_route_opt().await?),
        }
    }

    async fn http_route_opt(&self) -> Option<HttpRoute> {
        Api::<HttpRoute>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(NAME)
            .await
            .unwrap_or_else(|e| panic!("reading HTTPRoute {NAME}: {e}"))
    }

    /// The names of the routes of the VirtualService or HTTPRoute, in order.
    pub async fn route_names(&self) -> Vec<String> {
        if let Some(vs) = self.virtual_service_opt().await {
            return vs.spec.http.iter().map(|r| r.name.clone()).collect();
        }
        self.http_route_opt()
            .await
            .map(|r| r.spec.rules.iter().filter_map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    }

    async fn virtual_service_opt(&self) -> Option<VirtualService> {
        Api::<VirtualService>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(NAME)
            .await
            .unwrap_or_else(|e| panic!("reading VirtualService {NAME}: {e}"))
    }

    /// Polls the VirtualService until its split is `want`; the time it took.
    pub async fn wait_split(&self, want: Split, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            self.check_processes();
            let split = self.split().await;
            if split == Some(want) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "VirtualService split not {want:?} within {}s: {split:?}",
                timeout.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn deployment(&self, track: &str) -> Option<Deployment> {
        Api::<Deployment>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&format!("{NAME}-{track}"))
            .await
            .unwrap_or_else(|e| panic!("reading Deployment {NAME}-{track}: {e}"))
    }

    /// Polls a track's Deployment until `ok` holds.
    pub async fn wait_deployment(
        &self,
        track: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Deployment) -> bool,
    ) -> Deployment {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_processes();
            let deployment = self.deployment(track).await;
            if let Some(d) = deployment.as_ref().filter(|d| ok(d)) {
                return d.clone();
            }
            assert!(
                Instant::now() < deadline,
                "waited {}s for Deployment {NAME}-{track} to have {what}; it is {}",
                timeout.as_secs(),
                deployment
                    .as_ref()
                    .map_or("absent".into(), deployment_summary)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The Events recorded about the ChatRelease.
    pub async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("listing Events: {e}"))
            .items
            .into_iter()
            .filter(|e| {
                e.regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("ChatRelease"))
            })
            .collect()
    }

    /// The simulator's `mesh-simulator` ConfigMap: a model-provider outage on every track.
    pub async fn start_provider_outage(&self, rate: &str) {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": meshsim_contract::CONFIG_MAP_NAME},
            "data": {meshsim_contract::PROVIDER_ERROR_RATE_KEY: rate},
        }))
        .expect("config map");
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &cm)
            .await
            .unwrap_or_else(|e| panic!("creating the provider outage ConfigMap: {e}"));
    }

    pub async fn end_provider_outage(&self) {
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .delete(meshsim_contract::CONFIG_MAP_NAME, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting the provider outage ConfigMap: {e}"));
    }

    /// Sets the Ready condition of every pod of `track`, as a failing readiness probe (or its
    /// recovery) would. kwok leaves a running pod's conditions alone once it has set them.
    pub async fn set_pods_ready(&self, track: &str, ready: bool) {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace);
        let selector = format!("{}={track}", chatrelease::annotations::LABEL_TRACK);
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap_or_else(|e| panic!("listing {track} pods: {e}"));
        assert!(!list.items.is_empty(), "no {track} pods");
        let state = if ready { "True" } else { "False" };
        let patch = json!({"status": {"conditions": [
            {"type": "Ready", "status": state},
            {"type": "ContainersReady", "status": state},
        ]}});
        for pod in list.items {
            pods.patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("setting pod {} Ready={state}: {e}", pod.name_any()));
        }
    }

    /// Runs the control plane's `kubectl` in this namespace; its exit status and output.
    pub async fn kubectl(&self, args: &[&str]) -> std::process::Output {
        self.run_in_namespace(&self.cluster.kubectl, args).await
    }

    /// Runs the built `kubectl-chatrelease` against this namespace; its exit status and output.
    pub async fn kubectl_chatrelease(&self, args: &[&str]) -> std::process::Output {
        self.run_in_namespace(Path::new(KUBECTL_CHATRELEASE), args)
            .await
    }

    /// `program -n NAMESPACE args...` against this control plane, as a person runs it.
    async fn run_in_namespace(&self, program: &Path, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(program);
        command
            .env("KUBECONFIG", &self.cluster.kubeconfig)
            .arg("-n")
            .arg(&self.namespace)
            .args(args);
        let what = program.display().to_string();
        tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap_or_else(|e| panic!("{what} task: {e}"))
            .unwrap_or_else(|e| panic!("running {what}: {e}"))
    }

    /// Starts `kubectl chatrelease status NAME --watch` (plus `extra`, such as `--timeline`) in
    /// the background, as a person would leave it running beside a rollout.
    pub fn watch_status(&self, extra: &[&str]) -> StatusWatch {
        let what = format!("status-watch{}", extra.concat());
        let output = self.log(&what);
        let proc = Proc::spawn(
            &what,
            self.command(KUBECTL_CHATRELEASE)
                .args(["-n", &self.namespace, "status", NAME, "--watch"])
                .args(extra),
            &output,
            self.pid_file(&what),
        );
        StatusWatch { proc, output }
    }

    /// Starts recording every change of the VirtualService split and of the ChatRelease status.
    /// A timeline whose watches have listed what is there now: everything after this is seen.
    pub async fn timeline(&self) -> Timeline {
        Timeline::start(self.client.clone(), &self.namespace).await
    }

    // ----- failure and cleanup ---------------------------------------------------------------

    async fn diagnose(&self) {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "==== {} failed; namespace {}",
            self.test, self.namespace
        );
        match self.releases().get_opt(NAME).await {
            Ok(Some(r)) => {
                let _ = writeln!(
                    out,
                    "ChatRelease status:\n{}",
                    serde_json::to_string_pretty(&r.status).unwrap_or_default()
                );
                let _ = writeln!(out, "annotations: {:?}", r.annotations());
            }
            other => {
                let _ = writeln!(out, "ChatRelease: {other:?}");
            }
        }
        let _ = writeln!(
            out,
            "VirtualService split: {:?}",
            self.split_quietly().await
        );
        for track in ["stable", "canary"] {
            let d = Api::<Deployment>::namespaced(self.client.clone(), &self.namespace)
                .get_opt(&format!("{NAME}-{track}"))
                .await;
            let text = match d {
                Ok(Some(d)) => deployment_summary(&d),
                other => format!("{other:?}"),
            };
            let _ = writeln!(out, "Deployment {NAME}-{track}: {text}");
        }
        if let Ok(events) = Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
        {
            let _ = writeln!(out, "Events:");
            for e in events.items {
                let _ = writeln!(
                    out,
                    "  {} {} {}",
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default()
                );
            }
        }
        for what in ["operator", "meshsim", "prometheus"] {
            let log = self.log(what);
            if log.exists() {
                let _ = writeln!(
                    out,
                    "---- last lines of {}:\n{}",
                    log.display(),
                    tail(&log, 40)
                );
            }
        }
        // Through the harness's capture: printed with the failure, kept out of passing runs.
        eprintln!("{out}");
    }

    async fn split_quietly(&self) -> Option<Split> {
        let vs = Api::<VirtualService>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(NAME)
            .await
            .ok()??;
        Split::of(&vs)
    }

    /// Stops the test's processes, removes its scrape target and deletes its namespace.
    async fn cleanup(&self) {
        self.stop_processes();
        let deleted = Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::background())
            .await;
        if let Err(error) = deleted {
            eprintln!("deleting namespace {}: {error}", self.namespace);
        }
        self.cleaned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stop_processes(&self) {
        // The operator first, so it does not act on a half-deleted namespace.
        if let Some(mut p) = self.operator.lock().unwrap().take() {
            p.kill();
        }
        if let Some(mut p) = self.prometheus.lock().unwrap().take() {
            p.kill();
        }
        if let Some(mut p) = self.api_server.lock().unwrap().take() {
            p.kill();
        }
        if let Some(mut p) = self.meshsim.lock().unwrap().take() {
            p.kill();
        }
        if let Some(file) = self.target_file.lock().unwrap().take() {
            let _ = fs::remove_file(file);
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !self.cleaned.load(std::sync::atomic::Ordering::SeqCst) {
            self.stop_processes();
        }
    }
}

fn deployment_summary(d: &Deployment) -> String {
    let spec = d.spec.as_ref();
    let status = d.status.as_ref();
    let image = spec
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    format!(
        "image {image} replicas {:?} ready {:?} updated {:?}",
        spec.and_then(|s| s.replicas),
        status.and_then(|s| s.ready_replicas),
        status.and_then(|s| s.updated_replicas)
    )
}

/// The image of a Deployment's first container.
pub fn image_of(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
}

pub fn replicas_of(d: &Deployment) -> (i32, i32) {
    (
        d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        d.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
    )
}

// ----- what happened, in order -----------------------------------------------------------------

/// One observed state of the ChatRelease.
#[derive(Debug, Clone)]
pub struct StatusSample {
    pub at: Duration,
    pub phase: Phase,
    pub weight: i32,
    pub message: String,
    pub analysis: Option<AnalysisRecord>,
}

/// Every change of the split (of the VirtualService or the HTTPRoute, whichever the release's
/// router writes) and of the ChatRelease status, from watches, so
/// that nothing between two polls goes unseen.
pub struct Timeline {
    splits: Arc<Mutex<Vec<(Duration, Split)>>>,
    statuses: Arc<Mutex<Vec<StatusSample>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Logs each new split of the route objects `api` holds, as `split_of` reads them.
fn watch_splits<K>(
    api: Api<K>,
    config: watcher::Config,
    log: Arc<Mutex<Vec<(Duration, Split)>>>,
    started: Instant,
    split_of: fn(&K) -> Option<Split>,
    listed: Arc<tokio::sync::Semaphore>,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut first_list = true;
        while let Some(event) = stream.next().await {
            let route = match event {
                Ok(watcher::Event::Apply(route) | watcher::Event::InitApply(route)) => route,
                Ok(watcher::Event::InitDone) if first_list => {
                    first_list = false;
                    listed.add_permits(1);
                    continue;
                }
                _ => continue,
            };
            if let Some(split) = split_of(&route) {
                let mut log = log.lock().unwrap();
                if log.last().map(|(_, s)| *s) != Some(split) {
                    log.push((started.elapsed(), split));
                }
            }
        }
    })
}

impl Timeline {
    async fn start(client: Client, namespace: &str) -> Timeline {
        let started = Instant::now();
        // One permit per watch once its first list is in: what exists now is recorded first.
        let listed = Arc::new(tokio::sync::Semaphore::new(0));
        let splits = Arc::new(Mutex::new(Vec::<(Duration, Split)>::new()));
        let statuses = Arc::new(Mutex::new(Vec::<StatusSample>::new()));
        let by_name = watcher::Config::default().fields(&format!("metadata.name={NAME}"));

        let vs_task = watch_splits(
            Api::<VirtualService>::namespaced(client.clone(), namespace),
            by_name.clone(),
            splits.clone(),
            started,
            Split::of,
            listed.clone(),
        );
        let route_task = watch_splits(
            Api::<HttpRoute>::namespaced(client.clone(), namespace),
            by_name.clone(),
            splits.clone(),
            started,
            Split::of_route,
            listed.clone(),
        );

        let cr_api = Api::<ChatRelease>::namespaced(client, namespace);
        let cr_log = statuses.clone();
        let cr_task = tokio::spawn(async move {
            let mut stream = watcher(cr_api, by_name)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(item) = stream.next().await {
                let Ok(release) = item else { continue };
                let Some(s) = release.status else { continue };
                let sample = StatusSample {
                    at: started.elapsed(),
                    phase: s.phase,
                    weight: s.canary_weight,
                    message: s.message,
                    analysis: s.last_analysis,
                };
                let mut log = cr_log.lock().unwrap();
                let changed = log.last().is_none_or(|l| {
                    (l.phase, l.weight, &l.message, &l.analysis)
                        != (
                            sample.phase,
                            sample.weight,
                            &sample.message,
                            &sample.analysis,
                        )
                });
                if changed {
                    log.push(sample);
                }
            }
        });
        let lists = tokio::time::timeout(Duration::from_secs(30), listed.acquire_many(2)).await;
        assert!(
            lists.is_ok(),
            "the timeline's watches did not list within 30s"
        );
        Timeline {
            splits,
            statuses,
            tasks: vec![vs_task, route_task, cr_task],
        }
    }

    /// The splits seen, each with when it was first seen.
    pub fn splits(&self) -> Vec<(Duration, Split)> {
        self.splits.lock().unwrap().clone()
    }

    /// From the first split giving the canary weight to the last one giving it none: how long
    /// the canary held traffic. None when the timeline saw no such pair.
    pub fn time_at_weight(&self) -> Option<Duration> {
        let splits = self.splits();
        let from = splits
            .iter()
            .find(|(_, s)| s.canary > 0)
            .map(|(at, _)| *at)?;
        let to = splits
            .iter()
            .rev()
            .find(|(_, s)| s.canary == 0)
            .map(|(at, _)| *at)?;
        Some(to.saturating_sub(from))
    }

    /// The canary weights of the VirtualService in the order they were written.
    pub fn canary_weights(&self) -> Vec<i32> {
        dedup(self.splits().into_iter().map(|(_, s)| s.canary))
    }

    pub fn statuses(&self) -> Vec<StatusSample> {
        self.statuses.lock().unwrap().clone()
    }

    /// `status.canaryWeight` in the order it was written.
    pub fn status_weights(&self) -> Vec<i32> {
        dedup(self.statuses().into_iter().map(|s| s.weight))
    }

    pub fn phases(&self) -> Vec<Phase> {
        dedup(self.statuses().into_iter().map(|s| s.phase))
    }

    /// Distinct analyses recorded in status (by time), in order.
    pub fn analyses(&self) -> Vec<AnalysisRecord> {
        let mut out: Vec<AnalysisRecord> = Vec::new();
        for record in self.statuses().into_iter().filter_map(|s| s.analysis) {
            if out.last().is_none_or(|l| l.time != record.time) {
                out.push(record);
            }
        }
        out
    }

    /// A readable account for assertion messages.
    pub fn describe(&self) -> String {
        let mut out = String::from("VirtualService canary weights:");
        for (at, split) in self.splits() {
            let _ = write!(out, " {:.1}s:{}", at.as_secs_f64(), split.canary);
        }
        out.push_str("\nstatus:");
        for s in self.statuses() {
            let _ = write!(
                out,
                "\n  {:6.1}s {:?} {}% {}",
                s.at.as_secs_f64(),
                s.phase,
                s.weight,
                s.message
            );
        }
        out
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn dedup<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for item in items {
        if out.last() != Some(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_file_of_up_sh_is_read() {
        let vars =
            parse_env_file("# comment\nexport KUBECONFIG='/tmp/x/kubeconfig'\nETCD_PID=12\n");
        assert_eq!(
            vars,
            vec![
                ("KUBECONFIG".into(), "/tmp/x/kubeconfig".into()),
                ("ETCD_PID".into(), "12".into())
            ]
        );
    }
}
