//! Leader election against a real API server: replicas electing on one Lease, with the
//! operator's default timings (a 15 s Lease renewed every 5 s). Each replica is an elector in
//! this process with its own identity; its "controller" only counts how many run at once.
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

use chatrelease::leader::{LeaderElection, LeaderError, Leadership};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::DeleteParams;
use kube::{Api, Client};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NAMESPACE: &str = "default";

async fn client() -> Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let path = std::env::var_os("E2E_KUBECONFIG")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("E2E_STATE_DIR").map(|dir| PathBuf::from(dir).join("kubeconfig"))
        })
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))
        .expect("set E2E_KUBECONFIG (or E2E_STATE_DIR or KUBECONFIG) to a running control plane");
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
