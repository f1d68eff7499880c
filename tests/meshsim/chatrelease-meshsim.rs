//! `chatrelease-meshsim`: the mesh simulator, a test and demo stand-in for Istio's data plane. It
//! is a binary of the package built from `tests/meshsim/`, so it ships with no library.
//!
//! The local control plane runs no Envoy and no containers: kwok marks pods Ready but they serve
//! nothing. The simulator fills that gap. It reads the VirtualServices and DestinationRules, or the
//! Gateway API HTTPRoutes, the operator writes, plus Services, Pods and an optional ConfigMap
//! `mesh-simulator`, sends a steady synthetic request rate through each VirtualService and each
//! HTTPRoute the way Envoy routes it (Istio implements both, the HTTPRoute as GAMMA in sidecar
//! mode), answers each request as the chosen pod's `SIM_*` environment variables say, and exports
//! the outcome as Istio's own metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`) plus the chat app's `chat_time_to_first_token_seconds`,
//! the series the built-in checks read (OpenTelemetry GenAI, vLLM, and the kubelet's per-pod
//! memory and CPU), for a real Prometheus to scrape and the operator to judge. Beside them it exports what the
//! end-to-end tests check about users: which kind of user each workload served and who moved from
//! one workload to another (see [`metrics`]).
//!
//! The modules, in the order a request meets them: [`users`] (synthetic users, their cookies and
//! pins, churn), [`routing`] (Envoy's choice of route and destination through a VirtualService,
//! and what both kinds of route share), [`gateway`] (the same through an HTTPRoute, and which of
//! the Gateway API's routing rules are followed), [`pods`] (what the chosen
//! pods are and how they behave), [`requests`] (one request answered: the pure
//! [`requests::simulate_request`]), [`traffic`] (the load over time, the users kept between
//! ticks), [`metrics`] and [`http`] (what Prometheus scrapes, and a scrape gap on demand),
//! [`cluster`] (the watched objects) and [`run`] (all of it together). [`contract`] holds the names
//! the end-to-end harness shares.
//!
//! Where the simulator parts from Istio on purpose:
//! - A subset whose pods are all unready answers 503 and the request is recorded with
//!   `reporter="destination"` under the subset's workload, so the operator sees it. (Real Istio only
//!   has the source proxy's report of such a request.)
//! - A destination whose Service or subset is unknown is counted as unrouted and recorded nowhere,
//!   as no destination proxy would see it.
//! - Match conditions beyond `headers`, `uri` and `queryParams` are not read.
//! - An HTTPRoute is routed whether or not a Gateway API implementation accepted it, and the
//!   destination proxy of its backend Service records it (`destination_service` is the backend's
//!   FQDN, e.g. `lobe-chat-canary.chat.svc.cluster.local`); see [`gateway`] for the rest.

mod cluster;
mod contract;
#[cfg(test)]
mod fixtures;
mod gateway;
mod http;
mod metrics;
mod pods;
mod requests;
mod routing;
mod run;
mod traffic;
mod users;

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// What can stop the simulator, or make it skip an object.
#[derive(Debug, thiserror::Error)]
pub enum MeshSimError {
    /// A command-line value is out of range.
    #[error("invalid --{option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    /// The metrics address cannot be bound.
    #[error("cannot listen on {address}: {source}; pick another --listen address")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// No Kubernetes client could be configured.
    #[error("cannot connect to the Kubernetes API: {0}; check KUBECONFIG")]
    Kube(#[source] Box<kube::Error>),
    /// A route object (VirtualService, HTTPRoute) or DestinationRule that cannot be read as the
    /// fields the simulator routes by; it is skipped.
    #[error("{kind} {namespace}/{name} is skipped, it cannot be read: {source}")]
    Malformed {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Simulates Istio traffic and metrics for clusters that have no real mesh.
#[derive(Parser)]
#[command(
    version,
    about = "Test and demo tool: simulates Istio traffic (VirtualServices, HTTPRoutes) and its metrics",
    long_about = "A TEST AND DEMO TOOL, not part of a production install.\n\n\
        On a cluster with no Istio and no container runtime (such as the project's local control \
        plane with kwok nodes), chatrelease-meshsim stands in for Envoy. It watches \
        VirtualServices, DestinationRules, Gateway API HTTPRoutes, Services, Pods and the \
        optional ConfigMap `mesh-simulator`, sends a steady synthetic request rate through every \
        VirtualService and every HTTPRoute as Envoy would route it (matches, HTTPRoute \
        precedence, weights, sticky cookies, only Ready pods, 503 when none is, 500 for an \
        HTTPRoute rule with no backend to send to), and exports istio_requests_total and \
        istio_request_duration_milliseconds (every request twice: reporter=\"destination\" as a \
        sidecar and reporter=\"waypoint\" as an ambient waypoint would report it), \
        http_server_request_duration_seconds (the app's OpenTelemetry histogram, labels \
        namespace, workload and http_response_status_code) and \
        chat_time_to_first_token_seconds on /metrics for Prometheus to scrape, so a ChatRelease \
        of any analysis.source finds its series; and what the built-in checks read, under their \
        OpenTelemetry GenAI names (gen_ai_server_time_to_first_token_seconds, \
        gen_ai_server_time_per_output_token_seconds, gen_ai_client_token_usage) and vLLM's \
        (vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, \
        vllm:generation_tokens_total, vllm:request_success_total), and the kubelet's \
        container_memory_working_set_bytes and container_cpu_usage_seconds_total of every pod \
        (labels namespace, pod, container). No HTTP request is ever sent to a pod.\n\n\
        A pod's first container sets how it answers: SIM_ERROR_RATE (fraction answered 500/503, \
        default 0), SIM_PROVIDER_ERROR_RATE (fraction answered 470-479, default 0), \
        SIM_LATENCY_MS (median duration, default 200), SIM_TTFT_SECONDS (median time to \
        first token, default 0.4), SIM_TIME_PER_OUTPUT_TOKEN_SECONDS (median, default 0.02), \
        SIM_OUTPUT_TOKENS (median output tokens of an answer, default 300), \
        SIM_MEMORY_GROWTH_BYTES_PER_MIN (working set growth from the pod's start, default 0) and \
        SIM_CPU_SECONDS_PER_REQUEST (default 0.01). A ConfigMap `mesh-simulator` with key providerErrorRate \
        (e.g. \"0.12\") adds a model-provider outage to every track of its namespace while it \
        exists.\n\n\
        A cluster without Istio's or the Gateway API's CRDs is fine: the missing kind is \
        reported once and the other routes on.\n\n\
        Each VirtualService and each HTTPRoute has its own pool of users (--users), who keep the \
        cookies the mesh sets; --user-churn replaces a share of them every second by new users \
        with no cookies. /metrics also has, labelled namespace, route (the route object's name) \
        and route_kind (\"VirtualService\" or \"HTTPRoute\"), \
        meshsim_user_requests_total{user=\"tester\"|\"regular\", workload} (workload \"\" when \
        unrouted) and meshsim_version_changes_total{from, to, pinned=\"true\"|\"false\"}: a \
        user served by workload `from` and then by `to`; pinned=\"true\" when a regular user \
        still held the sticky cookie the mesh had set with an answer from `from`.\n\n\
        POST /fail-scrapes?seconds=N (0 < N <= 600) makes /metrics answer 503 for the next N \
        seconds, as a sidecar that stops answering would; traffic and counters go on. /healthz \
        answers 200 throughout.\n\n\
        It connects with the current kubeconfig (KUBECONFIG) and logs per RUST_LOG."
)]
struct Cli {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MESHSIM_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /metrics, /healthz and /fail-scrapes server.
    #[arg(long, env = "MESHSIM_LISTEN", default_value = "127.0.0.1:15090")]
    listen: SocketAddr,
    /// Synthetic requests per second through each VirtualService and each HTTPRoute.
    #[arg(long, env = "MESHSIM_RPS", default_value_t = 40.0)]
    rps: f64,
    /// How often requests are generated, e.g. 100ms.
    #[arg(long, env = "MESHSIM_TICK", default_value = "100ms", value_parser = humantime::parse_duration)]
    tick: Duration,
    /// Share of simulated users that carry the tester cookie `canary=true`.
    #[arg(long, env = "MESHSIM_TESTER_SHARE", default_value_t = 0.02)]
    tester_share: f64,
    /// Simulated users per VirtualService or HTTPRoute; each keeps the cookies the mesh sets on it.
    #[arg(long, env = "MESHSIM_USERS", default_value_t = 500)]
    users: usize,
    /// Share of each route object's users replaced per second by new users with no cookies
    /// (a tester by a tester), 0 to 1; e.g. 0.02 replaces 10 of 500 users a second. 0 keeps the
    /// same users throughout.
    #[arg(long, env = "MESHSIM_USER_CHURN", default_value_t = 0.0)]
    user_churn: f64,
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
    let options = run::Options {
        namespace: cli.namespace,
        listen: cli.listen,
        traffic: traffic::TrafficConfig {
            rps: cli.rps,
            tick: cli.tick,
            tester_share: cli.tester_share,
            users: cli.users,
            user_churn: cli.user_churn,
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
    match runtime.block_on(run::run(options, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
