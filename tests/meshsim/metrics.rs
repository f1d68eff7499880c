//! The metrics the simulator exports: Istio's own, as its destination proxies and (the same
//! series again with `reporter="waypoint"`) an ambient waypoint would, the app's OpenTelemetry
//! HTTP server histogram (`http_server_request_duration_seconds`), every request counted in all
//! three always, so a ChatRelease of any `analysis.source` finds its series; the chat app's time
//! to first token; the series the built-in checks read (`analysis.metrics[].check`), under both
//! their OpenTelemetry GenAI and their vLLM names, and the kubelet's cAdvisor memory and CPU of
//! every pod; and two about users that only the
//! end-to-end tests read, labelled by the route object the requests went through (`route`, and
//! `route_kind` `VirtualService` or `HTTPRoute`).

use crate::pods::{BASE_MEMORY_BYTES, SimPod};
use crate::requests::RequestRecord;
use crate::traffic::UserRequest;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Istio's `reporter` label for the server-side proxy, the one `analysis.source: istio` selects.
pub const REPORTER: &str = "destination";
/// Istio's `reporter` label for an ambient waypoint proxy (`analysis.source: istio-waypoint`).
pub const WAYPOINT_REPORTER: &str = "waypoint";

/// Istio's default buckets of `istio_request_duration_milliseconds`, in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// The OpenTelemetry semantic conventions' advised buckets of `http.server.request.duration`, in
/// seconds.
pub const OTEL_DURATION_BUCKETS_SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Buckets of `chat_time_to_first_token_seconds`.
pub const TTFT_BUCKETS_SECONDS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
];

/// Buckets of the time per output token histograms, in seconds.
pub const TIME_PER_OUTPUT_TOKEN_BUCKETS_SECONDS: [f64; 13] = [
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];
/// The OpenTelemetry GenAI conventions' advised buckets of `gen_ai.client.token.usage`.
pub const TOKEN_USAGE_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// The model vLLM's series name in `model_name`.
pub const VLLM_MODEL: &str = "sim-model";

/// Istio's standard labels on `istio_requests_total` and `istio_request_duration_milliseconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IstioLabels {
    reporter: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_service: String,
    response_code: String,
}

/// Labels of `chat_time_to_first_token_seconds`, as the custom-metric example in the design uses.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TtftLabels {
    namespace: String,
    workload: String,
}

/// Labels of `gen_ai_client_token_usage`: the app's, and the kind of token (`output` here).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenUsageLabels {
    namespace: String,
    workload: String,
    gen_ai_token_type: String,
}

/// Labels of vLLM's series: the app's, and vLLM's own `model_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VllmLabels {
    namespace: String,
    workload: String,
    model_name: String,
}

/// Labels of the kubelet's cAdvisor series of a container.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ContainerLabels {
    namespace: String,
    pod: String,
    container: String,
}

/// Labels of `http_server_request_duration_seconds`: the status as OpenTelemetry names it, and
/// `namespace` and `workload` as the README's scrape job adds them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OtelLabels {
    namespace: String,
    workload: String,
    http_response_status_code: String,
}

/// Labels of `meshsim_user_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserRequestLabels {
    /// Of the route object.
    namespace: String,
    /// The route object's name.
    route: String,
    /// `VirtualService` or `HTTPRoute`.
    route_kind: String,
    /// `tester` or `regular`.
    user: String,
    /// The workload that served it; "" when unrouted.
    workload: String,
}

/// Labels of `meshsim_version_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionChangeLabels {
    /// As in [`UserRequestLabels`].
    namespace: String,
    route: String,
    route_kind: String,
    from: String,
    to: String,
    /// `true` or `false`, as [`crate::users::VersionChange`] defines it.
    pinned: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn otel_duration_histogram() -> Histogram {
    Histogram::new(OTEL_DURATION_BUCKETS_SECONDS)
}

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS_SECONDS)
}

fn time_per_output_token_histogram() -> Histogram {
    Histogram::new(TIME_PER_OUTPUT_TOKEN_BUCKETS_SECONDS)
}

fn token_usage_histogram() -> Histogram {
    Histogram::new(TOKEN_USAGE_BUCKETS)
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn vllm_labels(record: &RequestRecord) -> VllmLabels {
    VllmLabels {
        namespace: record.namespace.clone(),
        workload: record.workload.clone(),
        model_name: VLLM_MODEL.into(),
    }
}

/// The metrics the simulator exports, as Istio's proxies and the chat app would, and its own
/// about users.
#[derive(Debug)]
pub struct MeshMetrics {
    registry: Registry,
    requests: Family<IstioLabels, Counter>,
    durations: HistogramFamily<IstioLabels>,
    otel_durations: HistogramFamily<OtelLabels>,
    ttft: HistogramFamily<TtftLabels>,
    genai_ttft: HistogramFamily<TtftLabels>,
    genai_time_per_output_token: HistogramFamily<TtftLabels>,
    genai_token_usage: HistogramFamily<TokenUsageLabels>,
    vllm_ttft: HistogramFamily<VllmLabels>,
    vllm_inter_token_latency: HistogramFamily<VllmLabels>,
    vllm_generation_tokens: Family<VllmLabels, FloatCounter>,
    vllm_request_success: Family<VllmLabels, Counter>,
    memory: Family<ContainerLabels, FloatGauge>,
    cpu: Family<ContainerLabels, FloatCounter>,
    /// The containers whose cAdvisor series are exported: those of the pods that exist.
    containers: Mutex<BTreeSet<ContainerLabels>>,
    user_requests: Family<UserRequestLabels, Counter>,
    version_changes: Family<VersionChangeLabels, Counter>,
}

impl Default for MeshMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MeshMetrics {
    /// A registry holding `istio_requests_total`, `istio_request_duration_milliseconds`,
    /// `http_server_request_duration_seconds`, `chat_time_to_first_token_seconds`, `meshsim_user_requests_total` and
    /// `meshsim_version_changes_total`, with no series yet.
    pub fn new() -> Self {
        let requests = Family::<IstioLabels, Counter>::default();
        let durations = HistogramFamily::<IstioLabels>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let otel_durations = HistogramFamily::<OtelLabels>::new_with_constructor(
            otel_duration_histogram as fn() -> Histogram,
        );
        let ttft = HistogramFamily::<TtftLabels>::new_with_constructor(
            ttft_histogram as fn() -> Histogram,
        );
        let genai_ttft = HistogramFamily::<TtftLabels>::new_with_constructor(
            ttft_histogram as fn() -> Histogram,
        );
        let genai_time_per_output_token = HistogramFamily::<TtftLabels>::new_with_constructor(
            time_per_output_token_histogram as fn() -> Histogram,
        );
        let genai_token_usage = HistogramFamily::<TokenUsageLabels>::new_with_constructor(
            token_usage_histogram as fn() -> Histogram,
        );
        let vllm_ttft = HistogramFamily::<VllmLabels>::new_with_constructor(
            ttft_histogram as fn() -> Histogram,
        );
        let vllm_inter_token_latency = HistogramFamily::<VllmLabels>::new_with_constructor(
            time_per_output_token_histogram as fn() -> Histogram,
        );
        let vllm_generation_tokens = Family::<VllmLabels, FloatCounter>::default();
        let vllm_request_success = Family::<VllmLabels, Counter>::default();
        let memory = Family::<ContainerLabels, FloatGauge>::default();
        let cpu = Family::<ContainerLabels, FloatCounter>::default();
        let user_requests = Family::<UserRequestLabels, Counter>::default();
        let version_changes = Family::<VersionChangeLabels, Counter>::default();
        let mut registry = Registry::default();
        // prometheus-client adds the `_total` suffix to counters.
        registry.register(
            "istio_requests",
            "Requests served, as Istio's destination proxy counts them",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, as Istio's destination proxy measures it",
            durations.clone(),
        );
        registry.register(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests in seconds, as the app's OpenTelemetry SDK measures \
             it (http.server.request.duration)",
            otel_durations.clone(),
        );
        registry.register(
            "chat_time_to_first_token_seconds",
            "Time from a chat request to the first streamed token, in seconds",
            ttft.clone(),
        );
        registry.register(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate the first token of successful responses, in seconds \
             (OpenTelemetry GenAI gen_ai.server.time_to_first_token)",
            genai_ttft.clone(),
        );
        registry.register(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first of successful responses, in seconds \
             (OpenTelemetry GenAI gen_ai.server.time_per_output_token)",
            genai_time_per_output_token.clone(),
        );
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used per operation, by gen_ai_token_type (OpenTelemetry GenAI \
             gen_ai.client.token.usage); only output tokens are simulated",
            genai_token_usage.clone(),
        );
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token in seconds, as vLLM exports it",
            vllm_ttft.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens in seconds, as vLLM's V1 engine exports it",
            vllm_inter_token_latency.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Output tokens generated, as vLLM counts them",
            vllm_generation_tokens.clone(),
        );
        registry.register(
            "vllm:request_success",
            "Requests finished, as vLLM counts them",
            vllm_request_success.clone(),
        );
        registry.register(
            "container_memory_working_set_bytes",
            "Working set of a container in bytes, as the kubelet's cAdvisor reports it",
            memory.clone(),
        );
        registry.register(
            "container_cpu_usage_seconds",
            "CPU time a container used in seconds, as the kubelet's cAdvisor reports it",
            cpu.clone(),
        );
        registry.register(
            "meshsim_user_requests",
            "Synthetic requests through a route object (route, route_kind) by kind of user \
             (tester or regular) and the workload that served them (\"\" when unrouted)",
            user_requests.clone(),
        );
        registry.register(
            "meshsim_version_changes",
            "Users of a route object (route, route_kind) served by workload `from` and at their \
             next request by workload `to`; pinned: a regular user who still held the sticky \
             cookie set with the answer from `from`",
            version_changes.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            otel_durations,
            ttft,
            genai_ttft,
            genai_time_per_output_token,
            genai_token_usage,
            vllm_ttft,
            vllm_inter_token_latency,
            vllm_generation_tokens,
            vllm_request_success,
            memory,
            cpu,
            containers: Mutex::new(BTreeSet::new()),
            user_requests,
            version_changes,
        }
    }

    /// Counts one request as Istio's destination proxy, an ambient waypoint and the app's
    /// OpenTelemetry SDK would, all three always: which one a ChatRelease reads is its choice.
    pub fn record(&self, record: &RequestRecord) {
        for reporter in [REPORTER, WAYPOINT_REPORTER] {
            let labels = IstioLabels {
                reporter: reporter.to_string(),
                destination_workload: record.workload.clone(),
                destination_workload_namespace: record.namespace.clone(),
                destination_service: record.service.clone(),
                response_code: record.response_code.to_string(),
            };
            self.requests.get_or_create(&labels).inc();
            self.durations
                .get_or_create(&labels)
                .observe(record.duration_ms);
        }
        self.otel_durations
            .get_or_create(&OtelLabels {
                namespace: record.namespace.clone(),
                workload: record.workload.clone(),
                http_response_status_code: record.response_code.to_string(),
            })
            .observe(record.duration_ms / 1000.0);
        if let Some(ttft) = record.ttft_seconds {
            let labels = TtftLabels {
                namespace: record.namespace.clone(),
                workload: record.workload.clone(),
            };
            self.ttft.get_or_create(&labels).observe(ttft);
            self.genai_ttft.get_or_create(&labels).observe(ttft);
            self.vllm_ttft
                .get_or_create(&vllm_labels(record))
                .observe(ttft);
        }
        if let (Some(per_token), Some(tokens)) =
            (record.time_per_output_token_seconds, record.output_tokens)
        {
            let labels = TtftLabels {
                namespace: record.namespace.clone(),
                workload: record.workload.clone(),
            };
            self.genai_time_per_output_token
                .get_or_create(&labels)
                .observe(per_token);
            self.genai_token_usage
                .get_or_create(&TokenUsageLabels {
                    namespace: record.namespace.clone(),
                    workload: record.workload.clone(),
                    gen_ai_token_type: "output".into(),
                })
                .observe(tokens);
            let vllm = vllm_labels(record);
            self.vllm_inter_token_latency
                .get_or_create(&vllm)
                .observe(per_token);
            self.vllm_generation_tokens
                .get_or_create(&vllm)
                .inc_by(tokens);
            self.vllm_request_success.get_or_create(&vllm).inc();
        }
        if let Some(pod) = &record.pod {
            let labels = ContainerLabels {
                namespace: record.namespace.clone(),
                pod: pod.clone(),
                container: self.container_of(&record.namespace, pod),
            };
            self.cpu.get_or_create(&labels).inc_by(record.cpu_seconds);
        }
    }

    /// The container of a pod whose series are exported, or `app` for one not seen yet.
    fn container_of(&self, namespace: &str, pod: &str) -> String {
        let containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        containers
            .iter()
            .find(|c| c.namespace == namespace && c.pod == pod)
            .map(|c| c.container.clone())
            .unwrap_or_else(|| "app".into())
    }

    /// The kubelet's view of `pods` at `now`: each pod's memory working set, grown from
    /// [`BASE_MEMORY_BYTES`] at its start by its `SIM_MEMORY_GROWTH_BYTES_PER_MIN`; the series
    /// of pods that are gone are dropped, as cAdvisor drops them.
    pub fn record_pods(&self, pods: &[SimPod], now: jiff::Timestamp) {
        let mut current = BTreeSet::new();
        for pod in pods {
            let labels = ContainerLabels {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: pod.container.clone(),
            };
            let minutes = pod
                .started
                .map(|started| (now.as_millisecond() - started.as_millisecond()) as f64 / 60_000.0)
                .unwrap_or(0.0)
                .max(0.0);
            self.memory
                .get_or_create(&labels)
                .set(BASE_MEMORY_BYTES + pod.behaviour.memory_growth_bytes_per_min * minutes);
            current.insert(labels);
        }
        let mut containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        for gone in containers.difference(&current) {
            self.memory.remove(gone);
            self.cpu.remove(gone);
        }
        *containers = current;
    }

    /// Counts one request by its user, and the user's change of workload if it made one.
    pub fn record_user(&self, request: &UserRequest) {
        let user = if request.tester { "tester" } else { "regular" };
        self.user_requests
            .get_or_create(&UserRequestLabels {
                namespace: request.namespace.clone(),
                route: request.route.clone(),
                route_kind: request.route_kind.as_str().to_string(),
                user: user.to_string(),
                workload: request.workload.clone(),
            })
            .inc();
        if let Some(change) = &request.change {
            self.version_changes
                .get_or_create(&VersionChangeLabels {
                    namespace: request.namespace.clone(),
                    route: request.route.clone(),
                    route_kind: request.route_kind.as_str().to_string(),
                    from: change.from.clone(),
                    to: change.to.clone(),
                    pinned: change.pinned.to_string(),
                })
                .inc();
        }
    }

    /// The OpenMetrics text exposition of everything recorded so far.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requests::RouteKind;
    use crate::users::VersionChange;

    #[test]
    fn exported_names_labels_and_buckets_are_istios() {
        let metrics = MeshMetrics::new();
        metrics.record(&RequestRecord {
            workload: "lobe-chat-canary".into(),
            namespace: "chat".into(),
            service: "lobe-chat.chat.svc.cluster.local".into(),
            response_code: 200,
            duration_ms: 180.0,
            ttft_seconds: Some(0.3),
            pod: Some("lobe-chat-canary-5d8f9c7b6-c".into()),
            time_per_output_token_seconds: Some(0.04),
            output_tokens: Some(320.0),
            cpu_seconds: 0.01,
        });
        let text = metrics.encode().unwrap();
        let labels = r#"reporter="destination",destination_workload="lobe-chat-canary",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="200""#;
        for line in [
            "# TYPE istio_requests counter".to_string(),
            format!("istio_requests_total{{{labels}}} 1"),
            "# TYPE istio_request_duration_milliseconds histogram".to_string(),
            format!("istio_request_duration_milliseconds_count{{{labels}}} 1"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"250.0\",{labels}}} 1"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"100.0\",{labels}}} 0"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"3600000.0\",{labels}}} 1"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"+Inf\",{labels}}} 1"),
            "# TYPE chat_time_to_first_token_seconds histogram".to_string(),
            r#"chat_time_to_first_token_seconds_bucket{le="0.5",namespace="chat",workload="lobe-chat-canary"} 1"#.to_string(),
            "# EOF".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_bucket"))
            .count();
        assert_eq!(buckets, 2 * (DURATION_BUCKETS_MS.len() + 1));
    }

    #[test]
    fn every_request_is_also_reported_by_the_waypoint_and_by_opentelemetry_in_seconds() {
        let metrics = MeshMetrics::new();
        metrics.record(&RequestRecord {
            workload: "lobe-chat-canary".into(),
            namespace: "chat".into(),
            service: "lobe-chat.chat.svc.cluster.local".into(),
            response_code: 503,
            duration_ms: 180.0,
            ttft_seconds: None,
            pod: Some("lobe-chat-canary-5d8f9c7b6-c".into()),
            time_per_output_token_seconds: None,
            output_tokens: None,
            cpu_seconds: 0.01,
        });
        let text = metrics.encode().unwrap();
        let waypoint = r#"reporter="waypoint",destination_workload="lobe-chat-canary",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="503""#;
        let otel =
            r#"namespace="chat",workload="lobe-chat-canary",http_response_status_code="503""#;
        for line in [
            format!("istio_requests_total{{{waypoint}}} 1"),
            format!("istio_request_duration_milliseconds_bucket{{le=\"250.0\",{waypoint}}} 1"),
            "# TYPE http_server_request_duration_seconds histogram".to_string(),
            format!("http_server_request_duration_seconds_count{{{otel}}} 1"),
            format!("http_server_request_duration_seconds_bucket{{le=\"0.1\",{otel}}} 0"),
            format!("http_server_request_duration_seconds_bucket{{le=\"0.25\",{otel}}} 1"),
            format!("http_server_request_duration_seconds_bucket{{le=\"+Inf\",{otel}}} 1"),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        let otel_buckets = text
            .lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_bucket"))
            .count();
        assert_eq!(otel_buckets, OTEL_DURATION_BUCKETS_SECONDS.len() + 1);
    }

    #[test]
    fn user_requests_and_version_changes_are_exported_by_route_and_route_kind() {
        let metrics = MeshMetrics::new();
        let request = |route_kind, tester, workload: &str, change| UserRequest {
            namespace: "chat".into(),
            route: "lobe-chat".into(),
            route_kind,
            tester,
            workload: workload.into(),
            change,
        };
        let change = |pinned| {
            Some(VersionChange {
                from: "lobe-chat-canary".into(),
                to: "lobe-chat-stable".into(),
                pinned,
            })
        };
        let vs = RouteKind::VirtualService;
        metrics.record_user(&request(vs, true, "lobe-chat-canary", None));
        metrics.record_user(&request(vs, false, "lobe-chat-stable", change(true)));
        metrics.record_user(&request(vs, false, "lobe-chat-stable", change(true)));
        metrics.record_user(&request(vs, false, "lobe-chat-stable", change(false)));
        metrics.record_user(&request(vs, false, "", None));
        // The HTTPRoute of the same name, while the ChatRelease switches router: its own series.
        let http = RouteKind::HttpRoute;
        metrics.record_user(&request(http, false, "lobe-chat-stable", change(true)));
        let text = metrics.encode().unwrap();
        let vs = r#"namespace="chat",route="lobe-chat",route_kind="VirtualService""#;
        let http = r#"namespace="chat",route="lobe-chat",route_kind="HTTPRoute""#;
        for line in [
            "# TYPE meshsim_user_requests counter".to_string(),
            format!(
                r#"meshsim_user_requests_total{{{vs},user="tester",workload="lobe-chat-canary"}} 1"#
            ),
            format!(
                r#"meshsim_user_requests_total{{{vs},user="regular",workload="lobe-chat-stable"}} 3"#
            ),
            format!(r#"meshsim_user_requests_total{{{vs},user="regular",workload=""}} 1"#),
            format!(
                r#"meshsim_user_requests_total{{{http},user="regular",workload="lobe-chat-stable"}} 1"#
            ),
            "# TYPE meshsim_version_changes counter".to_string(),
            format!(
                r#"meshsim_version_changes_total{{{vs},from="lobe-chat-canary",to="lobe-chat-stable",pinned="true"}} 2"#
            ),
            format!(
                r#"meshsim_version_changes_total{{{vs},from="lobe-chat-canary",to="lobe-chat-stable",pinned="false"}} 1"#
            ),
            format!(
                r#"meshsim_version_changes_total{{{http},from="lobe-chat-canary",to="lobe-chat-stable",pinned="true"}} 1"#
            ),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("meshsim_version_changes_total"))
                .count(),
            3
        );
        assert!(!text.contains("virtual_service="), "{text}");
    }

    fn answered(tokens: f64, per_token: f64, cpu: f64) -> RequestRecord {
        RequestRecord {
            workload: "lobe-chat-canary".into(),
            namespace: "chat".into(),
            service: "lobe-chat.chat.svc.cluster.local".into(),
            response_code: 200,
            duration_ms: 180.0,
            ttft_seconds: Some(0.3),
            pod: Some("lobe-chat-canary-5d8f9c7b6-c".into()),
            time_per_output_token_seconds: Some(per_token),
            output_tokens: Some(tokens),
            cpu_seconds: cpu,
        }
    }

    fn has_line(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in\n{text}"
        );
    }

    #[test]
    fn the_built_in_checks_series_carry_the_labels_their_queries_select() {
        let metrics = MeshMetrics::new();
        let pods = [crate::fixtures::pod(
            "lobe-chat-canary-5d8f9c7b6-c",
            "canary",
            true,
            &[],
        )];
        let sim: Vec<SimPod> = pods.iter().map(|p| SimPod::of_pod(p).0).collect();
        metrics.record_pods(&sim, jiff::Timestamp::UNIX_EPOCH);
        metrics.record(&answered(320.0, 0.04, 0.01));
        metrics.record(&answered(480.0, 0.04, 0.01));
        let text = metrics.encode().unwrap();
        let app = r#"namespace="chat",workload="lobe-chat-canary""#;
        let vllm = format!(r#"{app},model_name="{VLLM_MODEL}""#);
        let container = r#"namespace="chat",pod="lobe-chat-canary-5d8f9c7b6-c",container="app""#;
        for line in [
            format!(r#"gen_ai_server_time_to_first_token_seconds_bucket{{le="0.5",{app}}} 2"#),
            format!(r#"gen_ai_server_time_per_output_token_seconds_bucket{{le="0.05",{app}}} 2"#),
            format!(r#"gen_ai_client_token_usage_sum{{{app},gen_ai_token_type="output"}} 800.0"#),
            format!(r#"gen_ai_client_token_usage_count{{{app},gen_ai_token_type="output"}} 2"#),
            format!(r#"vllm:time_to_first_token_seconds_bucket{{le="0.5",{vllm}}} 2"#),
            format!(r#"vllm:inter_token_latency_seconds_bucket{{le="0.05",{vllm}}} 2"#),
            format!(r#"vllm:generation_tokens_total{{{vllm}}} 800.0"#),
            format!(r#"vllm:request_success_total{{{vllm}}} 2"#),
            format!(r#"container_cpu_usage_seconds_total{{{container}}} 0.02"#),
        ] {
            has_line(&text, &line);
        }
        assert!(
            text.lines().any(|l| l.starts_with(&format!(
                "container_memory_working_set_bytes{{{container}}} "
            ))),
            "{text}"
        );
    }

    #[test]
    fn memory_grows_from_each_pods_start_at_its_env_rate_and_gone_pods_are_dropped() {
        let metrics = MeshMetrics::new();
        let mut leaky = crate::fixtures::pod(
            "lobe-chat-canary-5d8f9c7b6-c",
            "canary",
            true,
            &[(crate::pods::ENV_MEMORY_GROWTH_BYTES_PER_MIN, "10485760")],
        );
        let started: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        leaky.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(started),
        );
        let steady = crate::fixtures::pod("lobe-chat-stable-5d8f9c7b6-a", "stable", true, &[]);
        let pods: Vec<SimPod> = [&leaky, &steady]
            .iter()
            .map(|p| SimPod::of_pod(p).0)
            .collect();
        let three_minutes_on = started + jiff::SignedDuration::from_secs(180);
        metrics.record_pods(&pods, three_minutes_on);
        let text = metrics.encode().unwrap();
        let value = |pod: &str| -> f64 {
            let prefix = format!(
                r#"container_memory_working_set_bytes{{namespace="chat",pod="{pod}",container="app"}} "#
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no memory of {pod} in\n{text}"))
                .parse()
                .unwrap()
        };
        assert_eq!(
            value("lobe-chat-canary-5d8f9c7b6-c"),
            BASE_MEMORY_BYTES + 3.0 * 10485760.0
        );
        assert_eq!(value("lobe-chat-stable-5d8f9c7b6-a"), BASE_MEMORY_BYTES);

        metrics.record_pods(&pods[1..], three_minutes_on);
        let text = metrics.encode().unwrap();
        assert!(
            !text.contains("lobe-chat-canary-5d8f9c7b6-c"),
            "a deleted pod's series stay: {text}"
        );
    }
}
