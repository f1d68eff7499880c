//! Leader election against a real API server, with the operator's default timings (a 15 s Lease
//! renewed every 5 s), two ways:
//! - electors in this process, each with its own identity, whose "controller" only counts how
//!   many run at once: the election's rules, down to the step-down on SIGTERM;
//! - two `chatrelease-operator run` processes, as two replicas of the chart run: exactly one
//!   leads and reconciles a ChatRelease, and when it is killed the other takes over and goes on.
//!
//! `#[ignore]`d: it needs a control plane. With the one from tests/cluster:
//!
//! ```sh
//! tests/cluster/up.sh /tmp/leader-dev
//! E2E_KUBECONFIG=/tmp/leader-dev/kubeconfig cargo test --test leader_election -- --ignored --nocapture
//! tests/cluster/down.sh /tmp/leader-dev
//! ```
//!
//! The kubeconfig is `E2E_KUBECONFIG`, else `E2E_STATE_DIR/kubeconfig`, else `KUBECONFIG`.

mod support;

use chatrelease::crd::{ChatRelease, Phase};
use chatrelease::leader::{LeaderElection, LeaderError, Leadership};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NAMESPACE: &str = "default";

/// The kubeconfig of the control plane under test.
fn kubeconfig_path() -> PathBuf {
    std::env::var_os("E2E_KUBECONFIG")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("E2E_STATE_DIR").map(|dir| PathBuf::from(dir).join("kubeconfig"))
        })
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))
        .expect("set E2E_KUBECONFIG (or E2E_STATE_DIR or KUBECONFIG) to a running control plane")
}

async fn client() -> Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let path = kubeconfig_path();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()));
    Client::try_from(config).expect("kube client")
}

/// How many replicas run their controller right now, and the most that ever did at once.
#[derive(Default)]
struct Writers {
    now: AtomicUsize,
    most: AtomicUsize,
}

struct Writing(Arc<Writers>);

impl Writing {
    fn start(writers: &Arc<Writers>) -> Self {
        let now = writers.now.fetch_add(1, Ordering::SeqCst) + 1;
        writers.most.fetch_max(now, Ordering::SeqCst);
        Self(writers.clone())
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Replica {
    identity: &'static str,
    leadership: Arc<Leadership>,
    /// Like SIGTERM: reaches both the elector and the controller.
    terminate: watch::Sender<bool>,
    task: JoinHandle<Result<(), LeaderError>>,
}

impl Replica {
    fn start(client: &Client, lease: &str, identity: &'static str, writers: &Arc<Writers>) -> Self {
        let election = LeaderElection {
            lease_name: lease.into(),
            namespace: NAMESPACE.into(),
            ..LeaderElection::new(identity)
        };
        let leadership = Arc::new(Leadership::new());
        let (terminate, signal) = watch::channel(false);
        let (client, writers, elector) = (client.clone(), writers.clone(), leadership.clone());
        let task = tokio::spawn(async move {
            let mut controller_signal = signal.clone();
            let mut shutdown_signal = signal;
            elector
                .run_when_leader(
                    client,
                    Some(&election),
                    move || async move {
                        let _writing = Writing::start(&writers);
                        let _ = controller_signal.wait_for(|stop| *stop).await;
                    },
                    async move {
                        let _ = shutdown_signal.wait_for(|stop| *stop).await;
                    },
                )
                .await
        });
        Self {
            identity,
            leadership,
            terminate,
            task,
        }
    }

    fn leads(&self) -> bool {
        self.leadership.is_leader()
    }
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    let lease = leases.get(name).await.expect("read the Lease");
    lease.spec?.holder_identity
}

/// Waits until `replica` leads, checking every 50 ms that no other does meanwhile.
async fn until_leads(replica: &Replica, others: &[&Replica], within: Duration) -> Duration {
    let started = Instant::now();
    while !replica.leads() {
        for other in others {
            assert!(
                !other.leads(),
                "{} leads while {} is waiting",
                other.identity,
                replica.identity
            );
        }
        assert!(
            started.elapsed() < within,
            "{} did not lead within {within:?}",
            replica.identity
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test]
#[ignore = "needs a running API server: E2E_KUBECONFIG, E2E_STATE_DIR or KUBECONFIG"]
async fn one_leader_at_a_time_and_a_standby_takes_over_when_it_dies_or_steps_down() {
    let client = client().await;
    let leases = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
    let lease = format!("leader-election-test-{}", std::process::id());
    let defaults = LeaderElection::new("any");
    let writers = Arc::new(Writers::default());

    // A alone: it takes the Lease.
    let a = Replica::start(&client, &lease, "replica-a", &writers);
    let took = until_leads(&a, &[], Duration::from_secs(20)).await;
    println!("replica-a led {:.1}s after starting", took.as_secs_f64());
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("replica-a"));

    // B stands by for two renewals while A holds the Lease.
    let b = Replica::start(&client, &lease, "replica-b", &writers);
    let watched = Instant::now();
    while watched.elapsed() < 2 * defaults.renew_interval {
        assert!(a.leads() && !b.leads(), "A must lead and B stand by");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("replica-a"));

    // A dies without releasing the Lease: B takes over once it expires.
    a.task.abort();
    let died = Instant::now();
    assert!(a.task.await.is_err_and(|e| e.is_cancelled()));
    let bound = defaults.lease_duration + Duration::from_secs(10);
    until_leads(&b, &[], bound).await;
    let takeover = died.elapsed();
    println!(
        "replica-b took over {:.1}s after replica-a died (lease {:?}, bound {bound:?})",
        takeover.as_secs_f64(),
        defaults.lease_duration
    );
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("replica-b"));

    // B steps down on SIGTERM: it releases the Lease and C takes it without waiting for expiry.
    let c = Replica::start(&client, &lease, "replica-c", &writers);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(b.leads() && !c.leads(), "B must lead and C stand by");
    let _ = b.terminate.send(true);
    let stepped_down = Instant::now();
    let returned = tokio::time::timeout(Duration::from_secs(10), b.task)
        .await
        .expect("B stops within 10s")
        .expect("B's task");
    assert!(returned.is_ok(), "{returned:?}");
    until_leads(
        &c,
        &[],
        2 * defaults.renew_interval + Duration::from_secs(3),
    )
    .await;
    let handover = stepped_down.elapsed();
    println!(
        "replica-c took over {:.1}s after replica-b stepped down",
        handover.as_secs_f64()
    );
    assert!(
        handover < defaults.lease_duration,
        "a released Lease is taken before it would have expired"
    );
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("replica-c"));

    // C steps down with no standby left: the Lease is free.
    let _ = c.terminate.send(true);
    let returned = tokio::time::timeout(Duration::from_secs(10), c.task)
        .await
        .expect("C stops within 10s")
        .expect("C's task");
    assert!(returned.is_ok(), "{returned:?}");
    assert_eq!(holder(&leases, &lease).await, None);

    assert_eq!(
        writers.most.load(Ordering::SeqCst),
        1,
        "two controllers ran at once"
    );
    assert_eq!(writers.now.load(Ordering::SeqCst), 0);
    leases
        .delete(&lease, &DeleteParams::default())
        .await
        .expect("delete the Lease");
}

// ----- two operator processes ------------------------------------------------------------------

const OPERATOR: &str = env!("CARGO_BIN_EXE_chatrelease-operator");

/// A `chatrelease-operator run` process with its own identity and metrics port. Killed on drop.
struct OperatorProcess {
    identity: &'static str,
    child: Child,
    metrics_port: u16,
    log: PathBuf,
    pid_file: Option<PathBuf>,
}

impl OperatorProcess {
    fn start(identity: &'static str, lease: &str, namespace: &str, logs: &Path) -> Self {
        let metrics_port = support::free_port();
        let log = logs.join(format!("{identity}.log"));
        let file = std::fs::File::create(&log).expect("operator log file");
        let child = Command::new(OPERATOR)
            .args([
                "run",
                "--namespace",
                namespace,
                "--lease-namespace",
                namespace,
            ])
            .args(["--lease-name", lease, "--leader-identity", identity])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            // Nothing answers there: analyses are inconclusive, which this test does not need.
            .args(["--prometheus-url", "http://127.0.0.1:9"])
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {OPERATOR}: {e}"));
        // down.sh stops what these name, should this test die before its processes.
        let pid_file = std::env::var_os("E2E_STATE_DIR").map(|dir| {
            let file = PathBuf::from(dir).join(format!("pids/leader-election-{identity}.pid"));
            let _ = std::fs::write(&file, format!("{}\n", child.id()));
            file
        });
        Self {
            identity,
            child,
            metrics_port,
            log,
            pid_file,
        }
    }

    fn metrics(&self) -> Option<String> {
        support::try_http_get(self.metrics_port, "/metrics").map(|(_, body)| body)
    }

    /// `chatrelease_leader` (1 leads, 0 stands by); `None` while /metrics does not answer.
    fn leads(&self) -> Option<bool> {
        support::metric_value(&self.metrics()?, "chatrelease_leader").map(|v| v == 1.0)
    }

    /// How many reconciles reached a decision in this process.
    fn reconciles(&self) -> f64 {
        self.metrics()
            .and_then(|m| support::metric_value(&m, "chatrelease_reconcile_duration_seconds_count"))
            .unwrap_or(0.0)
    }

    fn assert_running(&mut self) {
        if let Ok(Some(exit)) = self.child.try_wait() {
            panic!(
                "{} exited ({exit}); its log, {}:\n{}",
                self.identity,
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(file) = &self.pid_file {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls every 100 ms until `done`, failing after `within`; returns how long it took.
async fn until(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Applies ChatRelease `chat` running `image`, as `kubectl apply --server-side` would.
async fn apply_release(releases: &Api<ChatRelease>, image: &str) {
    let namespace = releases.namespace().expect("a namespaced Api");
    releases
        .patch(
            "chat",
            &PatchParams::apply("leader-election-test"),
            &Patch::Apply(chat_release(namespace, image)),
        )
        .await
        .unwrap_or_else(|e| panic!("applying ChatRelease chat with {image}: {e}"));
}

fn chat_release(namespace: &str, image: &str) -> ChatRelease {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "chatrelease.io/v1alpha1",
        "kind": "ChatRelease",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "template": {"spec": {"containers": [{"name": "chat", "image": image}]}},
            "strategy": {"steps": [50, 100], "interval": "5s", "progressDeadline": "2m"}
        }
    }))
    .expect("a valid ChatRelease")
}

async fn status_of(releases: &Api<ChatRelease>) -> Option<chatrelease::crd::ChatReleaseStatus> {
    releases.get("chat").await.ok()?.status
}

#[tokio::test]
#[ignore = "needs a running API server: E2E_KUBECONFIG, E2E_STATE_DIR or KUBECONFIG"]
async fn two_operator_processes_have_one_leader_and_the_standby_carries_on_when_it_is_killed() {
    let client = client().await;
    let defaults = LeaderElection::new("any");
    let namespace = format!("leader-procs-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))
                .expect("a Namespace"),
        )
        .await
        .expect("create the test namespace");
    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);
    let releases = Api::<ChatRelease>::namespaced(client.clone(), &namespace);
    let lease = "chatrelease-operator";
    let logs = std::env::var_os("E2E_STATE_DIR")
        .map_or_else(std::env::temp_dir, PathBuf::from)
        .join("logs/leader-election")
        .join(&namespace);
    std::fs::create_dir_all(&logs).expect("log folder");

    // A starts alone and takes the Lease.
    let mut a = OperatorProcess::start("operator-a", lease, &namespace, &logs);
    let took = until("operator-a leads", Duration::from_secs(30), async || {
        a.assert_running();
        a.leads() == Some(true)
    })
    .await;
    println!("operator-a led {:.1}s after starting", took.as_secs_f64());
    assert_eq!(holder(&leases, lease).await.as_deref(), Some("operator-a"));

    // B starts: it serves /metrics and /readyz but stands by while A renews.
    let mut b = OperatorProcess::start("operator-b", lease, &namespace, &logs);
    until(
        "operator-b serves /metrics",
        Duration::from_secs(30),
        async || {
            b.assert_running();
            b.leads().is_some()
        },
    )
    .await;
    // A standby is Ready once it reaches the API server: readiness does not follow leadership.
    until(
        "operator-b answers /readyz with 200",
        Duration::from_secs(30),
        async || {
            b.assert_running();
            support::try_http_get(b.metrics_port, "/readyz").is_some_and(|(code, _)| code == 200)
        },
    )
    .await;
    assert_eq!(b.leads(), Some(false), "operator-b stands by");

    // A ChatRelease applied now is reconciled by A alone.
    apply_release(&releases, "example.invalid/chat:v1").await;
    until("phase Stable", Duration::from_secs(60), async || {
        a.assert_running();
        b.assert_running();
        assert_eq!(
            (a.leads(), b.leads()),
            (Some(true), Some(false)),
            "exactly one leader"
        );
        status_of(&releases)
            .await
            .is_some_and(|s| s.phase == Phase::Stable)
    })
    .await;
    let watched = Instant::now();
    while watched.elapsed() < 2 * defaults.renew_interval {
        assert_eq!(
            (a.leads(), b.leads()),
            (Some(true), Some(false)),
            "exactly one leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(holder(&leases, lease).await.as_deref(), Some("operator-a"));
    assert!(a.reconciles() > 0.0, "the leader reconciled");
    assert_eq!(b.reconciles(), 0.0, "the standby must not reconcile");

    // A is killed (a node failure, an OOM kill): no release of the Lease. B takes over once it
    // runs out, and carries on with the ChatRelease.
    a.kill();
    let died = Instant::now();
    let bound = defaults.lease_duration + Duration::from_secs(10);
    until(
        "operator-b leads after operator-a died",
        bound,
        async || {
            b.assert_running();
            b.leads() == Some(true)
        },
    )
    .await;
    let takeover = died.elapsed();
    println!(
        "operator-b took over {:.1}s after operator-a was killed (lease {:?}, bound {bound:?})",
        takeover.as_secs_f64(),
        defaults.lease_duration
    );
    assert_eq!(holder(&leases, lease).await.as_deref(), Some("operator-b"));
    apply_release(&releases, "example.invalid/chat:v2").await;
    let started = until(
        "operator-b starts the canary",
        Duration::from_secs(60),
        async || {
            b.assert_running();
            status_of(&releases)
                .await
                .is_some_and(|s| s.canary_image.as_deref() == Some("example.invalid/chat:v2"))
        },
    )
    .await;
    println!(
        "operator-b started the v2 canary {:.1}s after the template changed",
        started.as_secs_f64()
    );
    assert!(b.reconciles() > 0.0, "the new leader reconciled");

    // B is stopped as the kubelet stops a pod: it exits cleanly and gives the Lease up.
    let term = Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let exited = Instant::now();
    let exit = loop {
        if let Some(exit) = b.child.try_wait().expect("wait for operator-b") {
            break exit;
        }
        assert!(
            exited.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "operator-b exited with {exit}");
    assert_eq!(holder(&leases, lease).await, None, "the Lease was released");

    drop((a, b));
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
        .expect("delete the test namespace");
}
