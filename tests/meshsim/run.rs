//! The whole simulator: the metrics server and the traffic loop over the watched cluster, until
//! shutdown.

use crate::MeshSimError;
use crate::cluster::ClusterState;
use crate::http::serve_metrics;
use crate::metrics::MeshMetrics;
use crate::routing::MeshState;
use crate::traffic::{Simulator, TrafficConfig};
use rand::Rng;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// How [`run`] is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch one namespace; `None` watches all.
    pub namespace: Option<String>,
    /// Address of the `/metrics`, `/healthz` and `/fail-scrapes` server.
    pub listen: SocketAddr,
    pub traffic: TrafficConfig,
    /// Seed of the random number generator, for a reproducible run; `None` seeds from the OS.
    pub seed: Option<u64>,
}

/// The random number generator of the simulation: seedable and the same on every platform.
pub type SimRng = rand::rngs::Xoshiro256PlusPlus;

/// Generates traffic every tick through the state `snapshot` returns, into `metrics`, until
/// `shutdown` completes. Before each tick the users due to leave are replaced.
pub async fn drive_traffic<F, R>(
    mut snapshot: F,
    metrics: Arc<MeshMetrics>,
    mut simulator: Simulator,
    rng: &mut R,
    shutdown: impl Future<Output = ()>,
) where
    F: FnMut() -> MeshState,
    R: Rng + ?Sized,
{
    tokio::pin!(shutdown);
    // tokio's interval panics on a zero period; `TrafficConfig::validate` rejects it for `run`.
    let period = simulator.config().tick.max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = interval.tick() => {}
        }
        // The measured time, not the nominal tick, keeps the rate right when ticks run late.
        let now = Instant::now();
        let requests = simulator.requests_for(now - last);
        let replaced = simulator.churn(now - last, rng);
        last = now;
        let state = snapshot();
        metrics.record_pods(&state.pods, jiff::Timestamp::now());
        let report = simulator.tick(&state, requests, rng);
        for record in &report.records {
            metrics.record(record);
        }
        for request in &report.user_requests {
            metrics.record_user(request);
        }
        tracing::trace!(
            virtual_services = state.virtual_services.len(),
            http_routes = state.http_routes.len(),
            recorded = report.records.len(),
            unrouted = report.unrouted,
            replaced_users = replaced,
            "tick"
        );
    }
}
/// Completes once `stop` holds true (or its sender is gone).
pub async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Runs the simulator against the cluster of the current kubeconfig until `shutdown` completes.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> Result<(), MeshSimError> {
    use rand::SeedableRng;

    options.traffic.validate()?;
    let listener =
        TcpListener::bind(options.listen)
            .await
            .map_err(|source| MeshSimError::Listen {
                address: options.listen,
                source,
            })?;
    let address = listener.local_addr().unwrap_or(options.listen);
    let client = kube::Client::try_default()
        .await
        .map_err(|e| MeshSimError::Kube(Box::new(e)))?;
    tracing::info!(
        metrics = %format!("http://{address}/metrics"),
        namespace = options.namespace.as_deref().unwrap_or("(all)"),
        rps = options.traffic.rps,
        tester_share = options.traffic.tester_share,
        user_churn = options.traffic.user_churn,
        seed = ?options.seed,
        "mesh simulator starting"
    );

    let mut tasks = JoinSet::new();
    let mut cluster = ClusterState::watch(client, options.namespace.as_deref(), &mut tasks);
    let metrics = Arc::new(MeshMetrics::new());
    let mut rng = match options.seed {
        Some(seed) => SimRng::seed_from_u64(seed),
        None => rand::make_rng(),
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::join!(
        serve_metrics(listener, metrics.clone(), stopped(stop_rx.clone())),
        drive_traffic(
            move || cluster.snapshot(),
            metrics,
            Simulator::new(options.traffic),
            &mut rng,
            stopped(stop_rx),
        ),
        async {
            shutdown.await;
            tracing::info!("mesh simulator stopping");
            let _ = stop.send(true);
        },
    );
    tasks.shutdown().await;
    Ok(())
}
