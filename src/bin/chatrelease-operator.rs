//! `chatrelease-operator run` runs the controller; `chatrelease-operator crd` prints the CRD.

use chatrelease::controller::{self, Context};
use chatrelease::leader::{LeaderElectionArgs, Leadership, shutdown_signal};
use chatrelease::prometheus::PrometheusSource;
use chatrelease::router::Routers;
use chatrelease::telemetry::{MetricsServer, Readiness, Telemetry};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Canary releases for LLM chat apps with Istio and Prometheus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the current kubeconfig or in-cluster config.
    Run(Box<RunArgs>),
    /// Print the ChatRelease CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Prometheus for ChatReleases that do not name one in spec.analysis.prometheus.address.
    #[arg(
        long,
        env = "PROMETHEUS_URL",
        default_value = "http://prometheus.istio-system:9090"
    )]
    prometheus_url: String,
    /// Longest a single Prometheus query may take before the analysis counts as inconclusive.
    #[arg(long, env = "PROMETHEUS_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    prometheus_timeout: Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    #[command(flatten)]
    leader_election: LeaderElectionArgs,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = chatrelease::logging::LogFormat::Text)]
    log_format: chatrelease::logging::LogFormat,
}

fn main() -> ExitCode {
    // kube and the Prometheus client both use rustls; one process-wide provider avoids the
    // "could not determine the process-level CryptoProvider" panic at the first TLS connection.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match chatrelease::crd_yaml::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            chatrelease::logging::init(args.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("error: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(*args))
        }
    }
}

async fn run(args: RunArgs) -> ExitCode {
    let election = match args.leader_election.election() {
        Ok(election) => election,
        Err(error) => {
            tracing::error!(%error, "invalid leader election options");
            return ExitCode::FAILURE;
        }
    };
    // Two clients: the controller's bounds its requests in flight; the Lease's does not, so a
    // burst of reconciles never makes a renewal wait its turn and lose the leadership.
    let clients = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)
        .and_then(|config| {
            Ok((
                controller::api_client(config.clone())?,
                kube::Client::try_from(config)?,
            ))
        });
    let (client, lease_client) = match clients {
        Ok(clients) => clients,
        Err(error) => {
            tracing::error!(%error, "cannot connect to the Kubernetes API; check KUBECONFIG or the in-cluster service account");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(prometheus = %args.prometheus_url, namespace = args.namespace.as_deref().unwrap_or("(all)"), "chatrelease-operator starting");

    let telemetry = Arc::new(Telemetry::new());
    let readiness = Readiness::new();
    let leadership = Leadership::new();
    match MetricsServer::bind(args.metrics_addr, telemetry.clone(), readiness.clone()).await {
        Ok(server) => {
            tokio::spawn(server.run(std::future::pending()));
        }
        Err(error) => {
            tracing::error!(%error, addr = %args.metrics_addr, "cannot serve /metrics, /healthz and /readyz");
            return ExitCode::FAILURE;
        }
    }
    tokio::spawn(readiness.ready_when_api_answers(lease_client.clone()));
    tokio::spawn(telemetry.clone().follow_leadership(leadership.subscribe()));
    let work = telemetry.clone();
    tokio::spawn(chatrelease::memory::give_back_after_bursts(move || {
        work.reconciles()
    }));

    let router = Arc::new(Routers::new(client.clone()));
    let metrics = Arc::new(
        PrometheusSource::new(args.prometheus_timeout)
            .with_query_observer(telemetry.query_observer()),
    );
    let prometheus_url = args.prometheus_url.clone();
    let ctx_client = client.clone();
    let controller_client = client;
    let namespace = args.namespace.as_deref();
    let outcome = leadership
        .run_when_leader(
            lease_client,
            election.as_ref(),
            move || {
                controller::run(controller_client, namespace, move |deployments| {
                    let mut ctx =
                        Context::new(ctx_client, deployments, router, metrics, prometheus_url);
                    ctx.observer = Some(telemetry);
                    ctx
                })
            },
            shutdown_signal(),
        )
        .await;
    match outcome {
        Ok(()) => {
            tracing::info!("chatrelease-operator stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            // Lost leadership: exit so the kubelet restarts this replica as a standby, with no
            // half-done reconcile carried over.
            tracing::error!(%error, "chatrelease-operator stopping");
            ExitCode::FAILURE
        }
    }
}
