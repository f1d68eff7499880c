//! `chatrelease-meshsim`: a stand-in for Istio's data plane, for tests and demos.

use chatrelease::meshsim::{self, Options, TrafficConfig};
use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Simulates Istio traffic and metrics for clusters that have no real mesh.
#[derive(Parser)]
#[command(
    version,
    about = "Test and demo tool: simulates Istio traffic and its Prometheus metrics, with no real mesh",
    long_about = "A TEST AND DEMO TOOL, not part of a production install.\n\n\
        On a cluster with no Istio and no container runtime (such as the project's local control \
        plane with kwok nodes), chatrelease-meshsim stands in for Envoy. It watches \
        VirtualServices, DestinationRules, Services, Pods and the optional ConfigMap \
        `mesh-simulator`, sends a steady synthetic request rate through every VirtualService as \
        Envoy would route it (matches, weights, sticky cookies, only Ready pods, 503 when none \
        is), and exports istio_requests_total, istio_request_duration_milliseconds and \
        chat_time_to_first_token_seconds on /metrics for Prometheus to scrape. No HTTP request \
        is ever sent to a pod.\n\n\
        A pod's first container sets how it answers: SIM_ERROR_RATE (fraction answered 500/503, \
        default 0), SIM_PROVIDER_ERROR_RATE (fraction answered 470-479, default 0), \
        SIM_LATENCY_MS (median duration, default 200) and SIM_TTFT_SECONDS (median time to \
        first token, default 0.4). A ConfigMap `mesh-simulator` with key providerErrorRate \
        (e.g. \"0.12\") adds a model-provider outage to every track of its namespace while it \
        exists.\n\n\
        It connects with the current kubeconfig (KUBECONFIG) and logs per RUST_LOG."
)]
struct Cli {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MESHSIM_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /metrics and /healthz server.
    #[arg(long, env = "MESHSIM_LISTEN", default_value = "127.0.0.1:15090")]
    listen: SocketAddr,
    /// Synthetic requests per second through each VirtualService.
    #[arg(long, env = "MESHSIM_RPS", default_value_t = 40.0)]
    rps: f64,
    /// How often requests are generated, e.g. 100ms.
    #[arg(long, env = "MESHSIM_TICK", default_value = "100ms", value_parser = humantime::parse_duration)]
    tick: Duration,
    /// Share of simulated users that carry the tester cookie `canary=true`.
    #[arg(long, env = "MESHSIM_TESTER_SHARE", default_value_t = 0.02)]
    tester_share: f64,
    /// Simulated users per VirtualService; each keeps the cookies the mesh sets on it.
    #[arg(long, env = "MESHSIM_USERS", default_value_t = 500)]
    users: usize,
    /// Seed for a reproducible run (default: a random seed).
    #[arg(long, env = "MESHSIM_SEED")]
    seed: Option<u64>,
    /// Log as text or as JSON lines.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = chatrelease::logging::LogFormat::Text)]
    log_format: chatrelease::logging::LogFormat,
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stop with Ctrl-C");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn main() -> ExitCode {
    // kube uses rustls; one process-wide provider avoids the "could not determine the
    // process-level CryptoProvider" panic at the first TLS connection.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    chatrelease::logging::init(cli.log_format);
    let options = Options {
        namespace: cli.namespace,
        listen: cli.listen,
        traffic: TrafficConfig {
            rps: cli.rps,
            tick: cli.tick,
            tester_share: cli.tester_share,
            users: cli.users,
        },
        seed: cli.seed,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(meshsim::run(options, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
