//! One request answered: routed as Envoy would through a VirtualService or an HTTPRoute, answered
//! by a Ready pod as its `SIM_*` variables say (or by Envoy's own 503), and what Istio would
//! record of it. Pure given a random number generator.

use crate::gateway::route_http_route;
use crate::pods::SimPod;
use crate::routing::{MeshState, RegexCache, Routed, Upstream, route_virtual_service};
use crate::users::{User, VersionChange};
use chatrelease::router::gateway_api::HttpRoute;
use chatrelease::router::istio::VirtualService;
use rand::{Rng, RngExt};

/// Spread of request durations and TTFTs around their median (sigma of a lognormal).
const JITTER_SIGMA: f64 = 0.3;
/// Envoy answers "no healthy upstream" itself, in about a millisecond.
const LOCAL_REPLY_MEDIAN_MS: f64 = 1.0;

/// What Istio (and the app) would record for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// `destination_workload`.
    pub workload: String,
    /// `destination_workload_namespace`.
    pub namespace: String,
    /// `destination_service`.
    pub service: String,
    pub response_code: u16,
    pub duration_ms: f64,
    /// Only successful chats stream a first token.
    pub ttft_seconds: Option<f64>,
    /// The pod that answered; `None` for Envoy's own reply.
    pub pod: Option<String>,
    /// Of a successful chat: time per output token after the first, and output tokens.
    pub time_per_output_token_seconds: Option<f64>,
    pub output_tokens: Option<f64>,
    /// CPU seconds the pod spent on the request.
    pub cpu_seconds: f64,
}

/// A lognormal sample with the given median: `median * exp(sigma * z)`, z standard normal.
fn jittered<R: Rng + ?Sized>(median: f64, rng: &mut R) -> f64 {
    if median <= 0.0 {
        return 0.0;
    }
    // Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    median * (JITTER_SIGMA * z).exp()
}

/// One request answered by a Ready pod of `upstream` drawn at random, or Envoy's 503 "no healthy
/// upstream" when there is none. `outage` is the namespace's provider outage, which adds to every
/// pod's own provider error rate.
pub fn answer<R: Rng + ?Sized>(
    service: &str,
    namespace: &str,
    workload: &str,
    ready: &[&SimPod],
    outage: f64,
    rng: &mut R,
) -> RequestRecord {
    if ready.is_empty() {
        return RequestRecord {
            workload: workload.to_string(),
            namespace: namespace.to_string(),
            service: service.to_string(),
            response_code: 503,
            duration_ms: jittered(LOCAL_REPLY_MEDIAN_MS, rng),
            ttft_seconds: None,
            pod: None,
            time_per_output_token_seconds: None,
            output_tokens: None,
            cpu_seconds: 0.0,
        };
    }
    let pod = ready[rng.random_range(0..ready.len())];
    let b = pod.behaviour;
    // A pod's own provider trouble and the outage strike independently.
    let provider = 1.0 - (1.0 - b.provider_error_rate) * (1.0 - outage.clamp(0.0, 1.0));
    let draw = rng.random::<f64>();
    let response_code = if draw < b.error_rate {
        if rng.random_bool(0.5) { 500 } else { 503 }
    } else if draw < b.error_rate + provider {
        470 + rng.random_range(0..10u16)
    } else {
        200
    };
    let ttft_seconds = (response_code == 200).then(|| jittered(b.ttft_seconds, rng));
    let duration_ms = jittered(b.latency_ms, rng);
    // Drawn after the draws above, so those stay what they were before these existed.
    let streamed = (response_code == 200).then(|| {
        let per_token = jittered(b.time_per_output_token_seconds, rng);
        let tokens = jittered(b.output_tokens, rng).round().max(1.0);
        (per_token, tokens)
    });
    RequestRecord {
        workload: pod.workload.clone(),
        namespace: pod.namespace.clone(),
        service: service.to_string(),
        response_code,
        duration_ms,
        ttft_seconds,
        pod: Some(pod.name.clone()),
        time_per_output_token_seconds: streamed.map(|(per_token, _)| per_token),
        output_tokens: streamed.map(|(_, tokens)| tokens),
        cpu_seconds: b.cpu_seconds_per_request,
    }
}

/// What one synthetic request led to.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What Istio records; `None` when Envoy would not reach any destination proxy.
    pub record: Option<RequestRecord>,
    /// The user's move from the workload of their previous request, if this one went elsewhere.
    pub change: Option<VersionChange>,
}

/// The kinds of route object users are sent through, as the `route_kind` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// Istio's `networking.istio.io` VirtualService.
    VirtualService,
    /// The Gateway API's `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute,
}

impl RouteKind {
    /// The object's `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::VirtualService => "VirtualService",
            RouteKind::HttpRoute => "HTTPRoute",
        }
    }
}

/// A route object by kind, namespace and name: a VirtualService and an HTTPRoute of the same
/// name (both exist while a ChatRelease switches router) are two entry points with their own users.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

/// An object the simulator sends users through.
#[derive(Debug, Clone, Copy)]
pub enum RouteObject<'a> {
    VirtualService(&'a VirtualService),
    HttpRoute(&'a HttpRoute),
}

impl<'a> From<&'a VirtualService> for RouteObject<'a> {
    fn from(service: &'a VirtualService) -> Self {
        RouteObject::VirtualService(service)
    }
}

impl<'a> From<&'a HttpRoute> for RouteObject<'a> {
    fn from(route: &'a HttpRoute) -> Self {
        RouteObject::HttpRoute(route)
    }
}

impl<'a> RouteObject<'a> {
    /// Every route object of `state`: the VirtualServices, then the HTTPRoutes.
    pub fn all(state: &'a MeshState) -> impl Iterator<Item = RouteObject<'a>> {
        let services = state.virtual_services.iter().map(RouteObject::from);
        services.chain(state.http_routes.iter().map(RouteObject::from))
    }

    pub fn key(&self) -> RouteKey {
        let (kind, meta) = match self {
            RouteObject::VirtualService(s) => (RouteKind::VirtualService, &s.metadata),
            RouteObject::HttpRoute(r) => (RouteKind::HttpRoute, &r.metadata),
        };
        RouteKey {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// The request as the object routes it; `None` when nothing matches it (Envoy's 404).
    fn route<R: Rng + ?Sized>(
        self,
        state: &'a MeshState,
        user: &User,
        rng: &mut R,
        regexes: &mut RegexCache,
    ) -> Option<Routed<'a>> {
        let request = user.request();
        match self {
            RouteObject::VirtualService(s) => {
                route_virtual_service(state, s, &request, rng, regexes)
            }
            RouteObject::HttpRoute(r) => route_http_route(state, r, &request, rng, regexes),
        }
    }
}

/// One synthetic request of `user` through `route`: routed, answered, and taken in by the user
/// (the route's `set-cookie`, the workload that served it).
pub fn simulate_request<'a, R: Rng + ?Sized>(
    state: &'a MeshState,
    route: impl Into<RouteObject<'a>>,
    user: &mut User,
    rng: &mut R,
    regexes: &mut RegexCache,
) -> Outcome {
    let Some(routed) = route.into().route(state, user, rng, regexes) else {
        return Outcome {
            record: None,
            change: user.answered(None, None),
        };
    };
    let record = match routed.upstream {
        Upstream::Resolved {
            service,
            namespace,
            workload,
            ready,
        } => {
            let outage = state
                .provider_outages
                .get(&namespace)
                .copied()
                .unwrap_or(0.0);
            Some(answer(&service, &namespace, &workload, &ready, outage, rng))
        }
        Upstream::Unresolved {
            response_code,
            reason,
        } => {
            tracing::debug!(
                route = routed.route,
                response_code,
                %reason,
                "Envoy answered, no workload reached"
            );
            None
        }
    };
    let change = user.answered(
        record.as_ref().map(|r| r.workload.as_str()),
        routed.set_cookie,
    );
    Outcome { record, change }
}

#[cfg(test)]
mod tests {
    use crate::fixtures::{
        ROUTERS, healthy_pods, no_testers, plain_release, pod, rng, routes, state,
    };
    use crate::pods::{
        ENV_CPU_SECONDS_PER_REQUEST, ENV_ERROR_RATE, ENV_LATENCY_MS, ENV_OUTPUT_TOKENS,
        ENV_PROVIDER_ERROR_RATE, ENV_TIME_PER_OUTPUT_TOKEN_SECONDS, ENV_TTFT_SECONDS,
    };
    use crate::traffic::Simulator;

    /// A subset (Istio) or track Service (Gateway API) whose pods are all unready or terminating.
    #[test]
    fn a_track_with_no_ready_pods_answers_503_under_its_workload() {
        let release = plain_release();
        let mut deleting = pod("lobe-chat-canary-5d8f9c7b6-d", "canary", true, &[]);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        let pods = vec![
            pod("lobe-chat-stable-5d8f9c7b6-a", "stable", true, &[]),
            pod("lobe-chat-canary-5d8f9c7b6-c", "canary", false, &[]),
            deleting,
        ];
        for router in ROUTERS {
            let mesh = router.state(&release, &routes(100, true), &pods);
            let report = Simulator::new(no_testers()).tick(&mesh, 100, &mut rng());
            assert_eq!(report.records.len(), 100, "{router:?}");
            for r in &report.records {
                assert_eq!(
                    (r.workload.as_str(), r.response_code),
                    ("lobe-chat-canary", 503),
                    "{router:?}"
                );
                assert_eq!(r.ttft_seconds, None);
            }
        }
    }

    #[test]
    fn a_track_with_no_pods_at_all_answers_503_under_the_operators_workload_name() {
        for router in ROUTERS {
            let mesh = router.state(&plain_release(), &routes(100, true), &[]);
            let report = Simulator::new(no_testers()).tick(&mesh, 5, &mut rng());
            assert_eq!(report.records.len(), 5, "{router:?}");
            assert!(
                report
                    .records
                    .iter()
                    .all(|r| r.workload == "lobe-chat-canary" && r.response_code == 503),
                "{router:?}: {:?}",
                report.records
            );
        }
    }

    // --- Pod behaviour ---

    #[test]
    fn error_rates_from_the_pod_env_set_the_share_of_5xx_and_provider_errors() {
        let pods = vec![pod(
            "lobe-chat-stable-5d8f9c7b6-a",
            "stable",
            true,
            &[(ENV_ERROR_RATE, "0.1"), (ENV_PROVIDER_ERROR_RATE, "0.05")],
        )];
        let mesh = state(&plain_release(), &routes(0, false), &pods);
        let report = Simulator::new(no_testers()).tick(&mesh, 20_000, &mut rng());
        let share = |f: &dyn Fn(u16) -> bool| {
            report.records.iter().filter(|r| f(r.response_code)).count() as f64 / 20_000.0
        };
        let server = share(&|c| c == 500 || c == 503);
        let provider = share(&|c| (470..=479).contains(&c));
        let ok = share(&|c| c == 200);
        assert!((server - 0.10).abs() < 0.01, "5xx {server}");
        assert!((provider - 0.05).abs() < 0.008, "47x {provider}");
        assert!((server + provider + ok - 1.0).abs() < 1e-9, "other codes");
        assert!(share(&|c| c == 500) > 0.03 && share(&|c| c == 503) > 0.03);
        let ttfts = report
            .records
            .iter()
            .filter(|r| r.ttft_seconds.is_some())
            .count();
        assert_eq!(
            ttfts as f64 / 20_000.0,
            ok,
            "TTFT only for successful chats"
        );
    }

    #[test]
    fn a_provider_outage_config_map_fails_every_track() {
        let mut mesh = state(&plain_release(), &routes(50, true), &healthy_pods());
        mesh.provider_outages.insert("chat".into(), 0.12);
        let report = Simulator::new(no_testers()).tick(&mesh, 20_000, &mut rng());
        for workload in ["lobe-chat-stable", "lobe-chat-canary"] {
            let mine: Vec<_> = report
                .records
                .iter()
                .filter(|r| r.workload == workload)
                .collect();
            let failed = mine
                .iter()
                .filter(|r| (470..=479).contains(&r.response_code))
                .count() as f64
                / mine.len() as f64;
            assert!((failed - 0.12).abs() < 0.015, "{workload}: {failed}");
        }
        mesh.provider_outages.insert("elsewhere".into(), 1.0);
        mesh.provider_outages.remove("chat");
        let report = Simulator::new(no_testers()).tick(&mesh, 1_000, &mut rng());
        assert!(report.records.iter().all(|r| r.response_code == 200));
    }

    #[test]
    fn latency_and_ttft_medians_follow_the_pod_env() {
        let pods = vec![pod(
            "lobe-chat-canary-5d8f9c7b6-a",
            "canary",
            true,
            &[(ENV_LATENCY_MS, "1500"), (ENV_TTFT_SECONDS, "2")],
        )];
        let mesh = state(&plain_release(), &routes(100, true), &pods);
        let report = Simulator::new(no_testers()).tick(&mesh, 10_001, &mut rng());
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let latency = median(report.records.iter().map(|r| r.duration_ms).collect());
        let ttft = median(
            report
                .records
                .iter()
                .filter_map(|r| r.ttft_seconds)
                .collect(),
        );
        assert!(
            (latency / 1500.0 - 1.0).abs() < 0.03,
            "median latency {latency}"
        );
        assert!((ttft / 2.0 - 1.0).abs() < 0.03, "median ttft {ttft}");
        let max = report
            .records
            .iter()
            .map(|r| r.duration_ms)
            .fold(0.0, f64::max);
        assert!(max > 2500.0 && max < 8000.0, "jitter reaches {max}");
    }

    #[test]
    fn answers_stream_as_many_tokens_as_fast_and_cost_the_cpu_the_pod_env_says() {
        let pods = vec![pod(
            "lobe-chat-canary-5d8f9c7b6-a",
            "canary",
            true,
            &[
                (ENV_OUTPUT_TOKENS, "450"),
                (ENV_TIME_PER_OUTPUT_TOKEN_SECONDS, "0.05"),
                (ENV_CPU_SECONDS_PER_REQUEST, "0.25"),
                (ENV_ERROR_RATE, "0.1"),
            ],
        )];
        let mesh = state(&plain_release(), &routes(100, true), &pods);
        let report = Simulator::new(no_testers()).tick(&mesh, 10_001, &mut rng());
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let answered: Vec<&super::RequestRecord> = report
            .records
            .iter()
            .filter(|r| r.response_code == 200)
            .collect();
        let tokens = median(answered.iter().filter_map(|r| r.output_tokens).collect());
        let per_token = median(
            answered
                .iter()
                .filter_map(|r| r.time_per_output_token_seconds)
                .collect(),
        );
        assert!(
            (tokens / 450.0 - 1.0).abs() < 0.03,
            "median tokens {tokens}"
        );
        assert!(
            (per_token / 0.05 - 1.0).abs() < 0.03,
            "median time per token {per_token}"
        );
        for r in &report.records {
            assert_eq!(r.pod.as_deref(), Some("lobe-chat-canary-5d8f9c7b6-a"));
            assert_eq!(r.cpu_seconds, 0.25, "every answer costs CPU, errors too");
            assert_eq!(
                r.output_tokens.is_some(),
                r.response_code == 200,
                "only answered chats stream tokens"
            );
        }
    }
}
