//! The metrics the simulator exports: Istio's own, as its destination proxies and (the same
//! series again with `reporter="waypoint"`) an ambient waypoint would, the app's OpenTelemetry
//! HTTP server histogram (`http_server_request_duration_seconds`), every request counted in all
//! three always, so a ChatRelease of any `analysis.source` finds its series; the chat app's time
//! to first token, and two about users that only the
//! end-to-end tests read, labelled by the route object the requests went through (`route`, and
//! `route_kind` `VirtualService` or `HTTPRoute`).

use crate::requests::RequestRecord;
use crate::traffic::UserRequest;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

/// The metrics the simulator exports, as Istio's proxies and the chat app would, and its own
/// about users.
#[derive(Debug)]
pub struct MeshMetrics {
    registry: Registry,
    requests: Family<IstioLabels, Counter>,
    durations: HistogramFamily<IstioLabels>,
    otel_durations: HistogramFamily<OtelLabels>,
    ttft: HistogramFamily<TtftLabels>,
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
        }
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
}
