//! Prometheus as the metrics backend: renders the PromQL for one analysis, asks the
//! ChatRelease's Prometheus, and turns the answers into `Observations`.
//!
//! An analysis costs a constant number of queries ([`queries_per_analysis`]): requests, errors
//! and P99 each ask once for both tracks, grouped by the workload label of the ChatRelease's
//! source (Istio's `destination_workload`, or `workload` for OpenTelemetry metrics), so both
//! tracks are measured at the same instant over the same window; each custom check runs once
//! per track because its query names one workload through `{{workload}}`. Each source is one
//! [`SourceQueries`] table: the judge never knows which one answered.
//!
//! Anything short of an answer (unreachable, HTTP error, timeout, a rejected query) becomes
//! `Observations::Unavailable`, which the judge holds on; no data becomes `None`, never zero.

use crate::crd::RequestSource;
use crate::metrics::{
    AnalysisTarget, BoxFuture, MetricsSource, Observations, Tally, TrackSample, WatchLook,
};
use prometheus_http_query::response::Data;
use prometheus_http_query::{Client, Error as ApiError, reqwest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one query may take unless `PrometheusSource::new` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Called after every query with how long it took and whether it got a usable answer, so an
/// exporter can keep a latency histogram without this module knowing about it.
pub type QueryObserver = Arc<dyn Fn(Duration, bool) + Send + Sync>;

/// Why Prometheus could not answer; its `Display` is the short reason put into
/// `Observations::Unavailable` and from there into the ChatRelease's status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    /// The ChatRelease names an address that does not parse as a URL.
    #[error("Prometheus address {address:?} is not a URL: {cause}")]
    BadAddress { address: String, cause: String },
    /// The HTTP client itself could not be set up (TLS initialisation).
    #[error("cannot build an HTTP client for Prometheus at {address}: {cause}")]
    Client { address: String, cause: String },
    /// No connection: refused, no route, or the name does not resolve.
    #[error("Prometheus at {address} unreachable: {cause}")]
    Unreachable { address: String, cause: String },
    /// No answer within the source's timeout.
    #[error("Prometheus at {address} did not answer the {what} query within {}", humantime::format_duration(*.timeout))]
    Timeout {
        address: String,
        what: String,
        timeout: Duration,
    },
    /// Something (often a proxy in front of Prometheus) answered with an HTTP error.
    #[error("Prometheus at {address} answered the {what} query with HTTP {status}")]
    Http {
        address: String,
        what: String,
        status: u16,
    },
    /// Prometheus answered with an API error, such as a PromQL parse error.
    #[error("Prometheus at {address} rejected the {what} query: {message}")]
    Rejected {
        address: String,
        what: String,
        message: String,
    },
    /// The answer was not the Prometheus API's JSON.
    #[error("Prometheus at {address} sent an unreadable answer to the {what} query: {cause}")]
    BadResponse {
        address: String,
        what: String,
        cause: String,
    },
    /// The query answered with a shape the check cannot judge, such as several series.
    #[error(
        "the {what} query returned {shape} from Prometheus at {address}; it must return a single series"
    )]
    Shape {
        address: String,
        what: String,
        shape: String,
    },
}

/// The window as a Prometheus range: whole seconds, rounded up so the range never covers less
/// than the spec asked for, and at least `1s` because Prometheus rejects `0s`.
pub fn prometheus_duration(window: Duration) -> String {
    let seconds = window.as_secs() + u64::from(window.subsec_nanos() > 0);
    format!("{}s", seconds.max(1))
}

/// Queries one analysis sends: requests, errors and P99 for both tracks at once, then each
/// custom check once per track.
pub fn queries_per_analysis(custom: usize) -> usize {
    3 + 2 * custom
}

/// How far back a series must have no sample at all to count as born inside the window.
/// Longer than any scrape gap or Prometheus restart we expect to ride out.
pub const HISTORY: &str = "1h";

/// How much each counter of `series` grew over `window`, a series born inside the window counted
/// from zero.
///
/// increase() only sees a rise between two samples, so a series whose first sample is already 2
/// adds nothing: when a canary starts, every series it has is new, and errors spread over ten
/// codes (470-479) a few each were judged as no errors at all, passing a bad canary. So a series
/// born inside the window counts with its whole value.
///
/// "Born inside" must mean it: no sample in the hour before the window. A failed scrape writes a
/// stale marker, so `S offset w` alone came back empty for a series that existed all along (after
/// a scrape gap, or a Prometheus restart), and its whole lifetime (days of stable traffic) was
/// added. And when Prometheus itself has no data from before the window (new, or its data lost
/// on a restart: not even its own `up` series of any target), no series can be told to be new;
/// then none is, and increase() alone speaks.
fn growth(series: &str, window: &str) -> String {
    format!(
        "(increase({series}[{window}]) and present_over_time({series}[{HISTORY}] offset {window})) \
         or (({series} unless present_over_time({series}[{HISTORY}] offset {window})) \
         and on() group(present_over_time(up[{HISTORY}] offset {window})))"
    )
}

/// The parts of the three request queries that differ from one source to another: which series
/// count requests and durations, which labels name the namespace, the workload and the status,
/// and the unit of the durations. Everything else (the growth over the window, one query for both
/// tracks, the judge) is the same for every source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceQueries {
    /// A counter of requests.
    pub requests: &'static str,
    /// The buckets of the request duration histogram.
    pub duration_buckets: &'static str,
    /// Label holding the workload (the Deployment's name); the tracks are told apart by it.
    pub workload_label: &'static str,
    pub namespace_label: &'static str,
    /// Label holding the HTTP status code.
    pub code_label: &'static str,
    /// Further matchers every series must satisfy, such as Istio's reporter.
    pub fixed: &'static str,
    /// Multiplier from the histogram's unit to milliseconds: 1 (no multiplication rendered) for
    /// Istio's milliseconds, 1000 for OpenTelemetry's seconds.
    pub to_ms: u32,
}

/// Istio's sidecars. The destination side sees every request, including those that came through
/// the ingress gateway.
pub const ISTIO: SourceQueries = SourceQueries {
    requests: "istio_requests_total",
    duration_buckets: "istio_request_duration_milliseconds_bucket",
    workload_label: "destination_workload",
    namespace_label: "destination_workload_namespace",
    code_label: "response_code",
    fixed: "reporter=\"destination\",",
    to_ms: 1,
};

/// Istio's ambient mode: L7 metrics come from the waypoint proxy, under the same names.
pub const ISTIO_WAYPOINT: SourceQueries = SourceQueries {
    fixed: "reporter=\"waypoint\",",
    ..ISTIO
};

/// The app's OpenTelemetry HTTP server metrics (`http.server.request.duration`, in seconds) as
/// Prometheus stores them, labelled `namespace` and `workload` by the scrape job.
pub const OTEL: SourceQueries = SourceQueries {
    requests: "http_server_request_duration_seconds_count",
    duration_buckets: "http_server_request_duration_seconds_bucket",
    workload_label: "workload",
    namespace_label: "namespace",
    code_label: "http_response_status_code",
    fixed: "",
    to_ms: 1000,
};

/// The query parts of a ChatRelease's `analysis.source`.
pub fn source_queries(source: RequestSource) -> &'static SourceQueries {
    match source {
        RequestSource::Istio => &ISTIO,
        RequestSource::IstioWaypoint => &ISTIO_WAYPOINT,
        RequestSource::Otel => &OTEL,
    }
}

/// Requests per track over the window, one series per workload.
pub fn requests_query(target: &AnalysisTarget) -> String {
    let q = source_queries(target.source);
    let series = format!("{}{{{}}}", q.requests, selector(target));
    format!(
        "sum by ({}) ({})",
        q.workload_label,
        growth(&series, &prometheus_duration(target.window))
    )
}

/// Failed requests per track over the window: those whose status matches `analysis.errorRate.codes`.
pub fn errors_query(target: &AnalysisTarget) -> String {
    let q = source_queries(target.source);
    let series = format!(
        "{}{{{},{}=~\"{}\"}}",
        q.requests,
        selector(target),
        q.code_label,
        promql_string(&target.error_codes)
    );
    format!(
        "sum by ({}) ({})",
        q.workload_label,
        growth(&series, &prometheus_duration(target.window))
    )
}

/// P99 request duration per track in milliseconds. The buckets' growth over the window, not their
/// rate: the quantile depends only on how counts spread over buckets.
pub fn latency_p99_query(target: &AnalysisTarget) -> String {
    let q = source_queries(target.source);
    let series = format!("{}{{{}}}", q.duration_buckets, selector(target));
    let quantile = format!(
        "histogram_quantile(0.99, sum by ({}, le) ({}))",
        q.workload_label,
        growth(&series, &prometheus_duration(target.window))
    );
    match q.to_ms {
        1 => quantile,
        factor => format!("{factor} * {quantile}"),
    }
}

/// A user's check for one track. Values go in unquoted and unescaped because the user decides
/// where they stand in the query; Kubernetes names contain nothing PromQL would misread.
pub fn custom_query(template: &str, namespace: &str, workload: &str, window: Duration) -> String {
    template
        .replace("{{namespace}}", namespace)
        .replace("{{workload}}", workload)
        .replace("{{window}}", &prometheus_duration(window))
}

/// Requests of every track in a watch look's namespaces, by namespace and workload: one query
/// for all the canaries (and their stables) that share a Prometheus, a source and error codes.
pub fn look_requests_query(look: &WatchLook) -> String {
    let q = source_queries(look.source);
    let series = format!("{}{{{}}}", q.requests, look_selector(look));
    look_sum(look, &series)
}

/// Failed requests of every track in a watch look's namespaces, by namespace and workload.
pub fn look_errors_query(look: &WatchLook) -> String {
    let q = source_queries(look.source);
    let series = format!(
        "{}{{{},{}=~\"{}\"}}",
        q.requests,
        look_selector(look),
        q.code_label,
        promql_string(&look.error_codes)
    );
    look_sum(look, &series)
}

fn look_sum(look: &WatchLook, series: &str) -> String {
    let q = source_queries(look.source);
    format!(
        "sum by ({}, {}) ({})",
        q.namespace_label,
        q.workload_label,
        growth(series, &prometheus_duration(look.window))
    )
}

/// Every track the operator runs in the look's namespaces: workloads named `<release>-canary` and
/// `<release>-stable`.
fn look_selector(look: &WatchLook) -> String {
    let q = source_queries(look.source);
    let namespaces: Vec<String> = look.namespaces.iter().map(|n| regex_literal(n)).collect();
    format!(
        "{}{}=~\"{}\",{}=~\".+-canary|.+-stable\"",
        q.fixed,
        q.namespace_label,
        promql_string(&namespaces.join("|")),
        q.workload_label,
    )
}

fn selector(target: &AnalysisTarget) -> String {
    let q = source_queries(target.source);
    format!(
        "{}{}=\"{}\",{}=~\"{}|{}\"",
        q.fixed,
        q.namespace_label,
        promql_string(&target.namespace),
        q.workload_label,
        promql_string(&regex_literal(&target.canary_workload)),
        promql_string(&regex_literal(&target.stable_workload)),
    )
}

/// Deployment names may hold dots, which a `=~` matcher would read as "any character".
fn regex_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn promql_string(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"")
}

/// Asks Prometheus over its HTTP API. Each ChatRelease may name its own Prometheus, so one
/// client (and its connection pool) is kept per address.
pub struct PrometheusSource {
    timeout: Duration,
    clients: Mutex<HashMap<String, Client>>,
    observer: Option<QueryObserver>,
}

impl Default for PrometheusSource {
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl PrometheusSource {
    /// A source whose every query gives up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clients: Mutex::new(HashMap::new()),
            observer: None,
        }
    }

    /// Reports each query's latency and success to `observer`.
    pub fn with_query_observer(mut self, observer: QueryObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Whether the Prometheus at `address` answers a trivial query (Flagger's `IsOnline`).
    pub async fn is_online(&self, address: &str) -> Result<(), QueryError> {
        let address = normalise(address);
        let client = self.client(address)?;
        let data = self
            .run(&client, address, "vector(1)", "vector(1)", None)
            .await?;
        match single_value(&data) {
            Ok(Some(v)) if (v - 1.0).abs() < f64::EPSILON => Ok(()),
            _ => Err(QueryError::BadResponse {
                address: address.into(),
                what: "vector(1)".into(),
                cause: "it did not return 1".into(),
            }),
        }
    }

    fn client(&self, address: &str) -> Result<Client, QueryError> {
        // A panic elsewhere while holding the lock leaves the map intact, so poisoning is moot.
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(address) {
            return Ok(client.clone());
        }
        // Building the reqwest client ourselves keeps a TLS set-up failure an error, where
        // `Client::try_from` would panic, and bounds connecting as well as the whole call.
        let http = reqwest::Client::builder()
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .build()
            .map_err(|e| QueryError::Client {
                address: address.into(),
                cause: root_cause(&e),
            })?;
        let client = Client::from(http, address).map_err(|e| QueryError::BadAddress {
            address: address.into(),
            cause: root_cause(&e),
        })?;
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }

    async fn run(
        &self,
        client: &Client,
        address: &str,
        what: &str,
        promql: &str,
        at: Option<i64>,
    ) -> Result<Data, QueryError> {
        let started = Instant::now();
        // Prometheus stops evaluating at its own timeout; ours also covers a hung connection.
        let millis = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
        let mut query = client.query(promql).timeout(millis);
        if let Some(at) = at {
            query = query.at(at);
        }
        let call = query.get();
        let outcome = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(result)) => Ok(result.into_inner().0),
            Ok(Err(e)) => Err(classify(address, what, self.timeout, e)),
            Err(_) => Err(QueryError::Timeout {
                address: address.into(),
                what: what.into(),
                timeout: self.timeout,
            }),
        };
        let elapsed = started.elapsed();
        if let Some(observer) = &self.observer {
            observer(elapsed, outcome.is_ok());
        }
        tracing::debug!(
            address,
            query = what,
            promql,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            ok = outcome.is_ok(),
            "prometheus query"
        );
        outcome
    }

    async fn sample(&self, target: &AnalysisTarget) -> Result<Observations, QueryError> {
        let address = normalise(&target.address);
        let client = &self.client(address)?;
        let at = Some(target.at.as_second());
        let (requests_q, errors_q, latency_q) = (
            requests_query(target),
            errors_query(target),
            latency_p99_query(target),
        );
        let tracks = [&target.canary_workload, &target.stable_workload];
        let custom: Vec<(String, String, String)> = target
            .custom
            .iter()
            .flat_map(|check| {
                tracks.into_iter().map(move |workload| {
                    (
                        check.name.clone(),
                        workload.clone(),
                        custom_query(&check.query, &target.namespace, workload, target.window),
                    )
                })
            })
            .collect();
        let custom_runs = custom.iter().map(|(name, workload, promql)| async move {
            let what = format!("{name} ({workload})");
            let data = self.run(client, address, &what, promql, at).await?;
            let value = single_value(&data).map_err(|shape| QueryError::Shape {
                address: address.into(),
                what,
                shape,
            })?;
            Ok::<_, QueryError>((name, workload, value))
        });

        let (requests, errors, latency, custom_values) = futures::try_join!(
            self.run(client, address, "requests", &requests_q, at),
            self.run(client, address, "errors", &errors_q, at),
            self.run(client, address, "latency-p99", &latency_q, at),
            futures::future::try_join_all(custom_runs),
        )?;
        let label = source_queries(target.source).workload_label;
        let requests = by_workload(address, "requests", label, requests)?;
        let errors = by_workload(address, "errors", label, errors)?;
        let latency = by_workload(address, "latency-p99", label, latency)?;

        let track = |workload: &String| TrackSample {
            requests: requests.get(workload).copied(),
            errors: errors.get(workload).copied(),
            latency_p99_ms: latency.get(workload).copied(),
            custom: custom_values
                .iter()
                .filter(|(_, w, _)| *w == workload)
                .map(|(name, _, value)| ((*name).clone(), *value))
                .collect(),
        };
        Ok(Observations::Sampled {
            canary: track(&target.canary_workload),
            stable: track(&target.stable_workload),
        })
    }
}

impl PrometheusSource {
    async fn look(&self, look: &WatchLook) -> Result<Tally, QueryError> {
        let address = normalise(&look.address);
        let client = &self.client(address)?;
        let at = Some(look.at.as_second());
        let (requests_q, errors_q) = (look_requests_query(look), look_errors_query(look));
        let (requests, errors) = futures::try_join!(
            self.run(client, address, "watch requests", &requests_q, at),
            self.run(client, address, "watch errors", &errors_q, at),
        )?;
        let q = source_queries(look.source);
        let labels = [q.namespace_label, q.workload_label];
        let requests = by_labels(address, "watch requests", labels, requests)?;
        let mut errors = by_labels(address, "watch errors", labels, errors)?;
        Ok(requests
            .into_iter()
            .map(|(key, requests)| {
                let errors = errors.remove(&key).unwrap_or(0.0);
                (key, crate::sequential::Counts { requests, errors })
            })
            .collect())
    }
}

impl MetricsSource for PrometheusSource {
    fn tally<'a>(&'a self, look: &'a WatchLook) -> BoxFuture<'a, Option<Result<Tally, String>>> {
        Box::pin(async move { Some(self.look(look).await.map_err(|e| e.to_string())) })
    }

    fn observe<'a>(&'a self, target: &'a AnalysisTarget) -> BoxFuture<'a, Observations> {
        Box::pin(async move {
            match self.sample(target).await {
                Ok(observations) => observations,
                Err(e) => {
                    let reason = e.to_string();
                    tracing::warn!(
                        address = %target.address,
                        namespace = %target.namespace,
                        canary = %target.canary_workload,
                        %reason,
                        "metrics unavailable"
                    );
                    Observations::Unavailable { reason }
                }
            }
        })
    }
}

/// A trailing slash would make the API path `//api/v1/query`, and two spellings of one
/// address should share a client.
fn normalise(address: &str) -> &str {
    address.trim().trim_end_matches('/')
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// One value per workload (the source's `label`); NaN and Inf are left out so they read as no
/// data.
fn by_workload(
    address: &str,
    what: &str,
    label: &str,
    data: Data,
) -> Result<HashMap<String, f64>, QueryError> {
    let series = match data {
        Data::Vector(series) => series,
        other => {
            return Err(QueryError::Shape {
                address: address.into(),
                what: what.into(),
                shape: shape_of(&other),
            });
        }
    };
    Ok(series
        .into_iter()
        .filter_map(|s| {
            let (mut labels, sample) = s.into_inner();
            Some((labels.remove(label)?, finite(sample.value())?))
        })
        .collect())
}

/// One value per `(namespace, workload)` pair of labels.
fn by_labels(
    address: &str,
    what: &str,
    [namespace, workload]: [&str; 2],
    data: Data,
) -> Result<HashMap<(String, String), f64>, QueryError> {
    let Data::Vector(series) = data else {
        return Err(QueryError::Shape {
            address: address.into(),
            what: what.into(),
            shape: shape_of(&data),
        });
    };
    Ok(series
        .into_iter()
        .filter_map(|s| {
            let (mut labels, sample) = s.into_inner();
            let key = (labels.remove(namespace)?, labels.remove(workload)?);
            Some((key, finite(sample.value())?))
        })
        .collect())
}

/// A custom check names one workload, so more than one series means the query is ambiguous;
/// guessing which to judge would be worse than saying so.
fn single_value(data: &Data) -> Result<Option<f64>, String> {
    match data {
        Data::Scalar(sample) => Ok(finite(sample.value())),
        Data::Vector(series) => match series.as_slice() {
            [] => Ok(None),
            [one] => Ok(finite(one.sample().value())),
            _ => Err(shape_of(data)),
        },
        Data::Matrix(_) => Err(shape_of(data)),
    }
}

fn shape_of(data: &Data) -> String {
    match data {
        Data::Vector(series) => format!("{} series", series.len()),
        Data::Matrix(_) => "a range vector".into(),
        Data::Scalar(_) => "a scalar".into(),
    }
}

fn classify(address: &str, what: &str, timeout: Duration, error: ApiError) -> QueryError {
    let (address, what) = (address.to_string(), what.to_string());
    match error {
        ApiError::Prometheus(e) => QueryError::Rejected {
            address,
            what,
            message: e.to_string(),
        },
        ApiError::Client(e) => match e.inner() {
            Some(source) if source.is_timeout() => QueryError::Timeout {
                address,
                what,
                timeout,
            },
            Some(source) if source.is_connect() => QueryError::Unreachable {
                address,
                cause: root_cause(source),
            },
            Some(source) if source.status().is_some() => QueryError::Http {
                address,
                what,
                status: source.status().map_or(0, |s| s.as_u16()),
            },
            Some(source) => QueryError::BadResponse {
                address,
                what,
                cause: root_cause(source),
            },
            None => QueryError::BadResponse {
                address,
                what,
                cause: e.to_string(),
            },
        },
        other => QueryError::BadResponse {
            address,
            what,
            cause: root_cause(&other),
        },
    }
}

/// The innermost cause ("Connection refused (os error 111)") says more to a person than
/// reqwest's outer "error sending request for url".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::CustomCheck;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const TTFT: &str = r#"histogram_quantile(0.99, sum by (le) (rate(chat_time_to_first_token_seconds_bucket{namespace="{{namespace}}", workload="{{workload}}"}[{{window}}])))"#;

    fn target(address: &str) -> AnalysisTarget {
        AnalysisTarget {
            namespace: "chat".into(),
            canary_workload: "lobe-chat-canary".into(),
            stable_workload: "lobe-chat-stable".into(),
            window: Duration::from_secs(60),
            custom: vec![],
            source: RequestSource::Istio,
            error_codes: crate::crd::DEFAULT_ERROR_CODES.into(),
            address: address.into(),
            at: "2026-11-30T12:00:00Z".parse().expect("timestamp"),
        }
    }

    fn check(name: &str, query: &str) -> CustomCheck {
        CustomCheck {
            name: name.into(),
            query: query.into(),
            max: Some(1.5),
            min: None,
            max_increase: None,
            max_decrease: None,
        }
    }

    fn vector(series: &[(&str, &str)]) -> Reply {
        let result: Vec<_> = series
            .iter()
            .map(|(workload, value)| {
                json!({"metric": {"destination_workload": workload}, "value": [1_700_000_000.0, value]})
            })
            .collect();
        ok_json(json!({"resultType": "vector", "result": result}))
    }

    fn unlabelled(values: &[&str]) -> Reply {
        let result: Vec<_> = values
            .iter()
            .map(|v| json!({"metric": {}, "value": [1_700_000_000.0, v]}))
            .collect();
        ok_json(json!({"resultType": "vector", "result": result}))
    }

    fn ok_json(data: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body: json!({"status": "success", "data": data}).to_string(),
        }
    }

    struct Reply {
        status: u16,
        content_type: &'static str,
        body: String,
    }

    type Responder = Arc<dyn Fn(&str) -> Reply + Send + Sync>;
    /// One request's decoded query-string pairs.
    type Params = Vec<(String, String)>;

    /// A Prometheus stand-in on 127.0.0.1 that answers `/api/v1/query` with whatever the test's
    /// responder returns for the `query` parameter, and remembers every request's parameters.
    struct FakePrometheus {
        address: String,
        seen: Arc<Mutex<Vec<Params>>>,
    }

    impl FakePrometheus {
        async fn start(responder: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
            let responder: Responder = Arc::new(responder);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = format!("http://{}", listener.local_addr().unwrap());
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let (responder, log) = (responder.clone(), log.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut chunk = [0u8; 4096];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let head = String::from_utf8_lossy(&head).to_string();
                        let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                        let (path, query_string) = target.split_once('?').unwrap_or((&target, ""));
                        assert_eq!(path, "/api/v1/query");
                        let params = form_decode(query_string);
                        let query = params
                            .iter()
                            .find(|(k, _)| k == "query")
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default();
                        log.lock().unwrap().push(params);
                        let reply = responder(&query);
                        let response = format!(
                            "HTTP/1.1 {} Canned\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                            reply.status,
                            reply.content_type,
                            reply.body.len(),
                            reply.body
                        );
                        let _ = stream.write_all(response.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
            });
            Self { address, seen }
        }

        fn queries(&self) -> Vec<String> {
            self.param("query")
        }

        fn param(&self, name: &str) -> Vec<String> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .filter_map(|params| {
                    params
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                })
                .collect()
        }
    }

    fn form_decode(query_string: &str) -> Params {
        let decode = |s: &str| {
            let bytes = s.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'+' => out.push(b' '),
                    b'%' => {
                        let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                        out.push(u8::from_str_radix(hex, 16).unwrap());
                        i += 2;
                    }
                    b => out.push(b),
                }
                i += 1;
            }
            String::from_utf8(out).unwrap()
        };
        query_string
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(k), decode(v))
            })
            .collect()
    }

    /// Answers like a Prometheus seeing a healthy canary beside a busier stable.
    fn healthy(query: &str) -> Reply {
        if query.contains("response_code") {
            vector(&[("lobe-chat-canary", "3"), ("lobe-chat-stable", "40")])
        } else if query.contains("istio_requests_total") {
            vector(&[("lobe-chat-stable", "22800"), ("lobe-chat-canary", "1200")])
        } else if query.contains("histogram_quantile(0.99, sum by (destination_workload, le)") {
            vector(&[("lobe-chat-canary", "850"), ("lobe-chat-stable", "800")])
        } else if query.contains(r#"workload="lobe-chat-canary""#) {
            unlabelled(&["0.9"])
        } else if query.contains(r#"workload="lobe-chat-stable""#) {
            unlabelled(&["0.8"])
        } else {
            unlabelled(&["1"])
        }
    }

    fn sampled(observations: Observations) -> (TrackSample, TrackSample) {
        match observations {
            Observations::Sampled { canary, stable } => (canary, stable),
            other => panic!("expected samples, got {other:?}"),
        }
    }

    fn unavailable(observations: Observations) -> String {
        match observations {
            Observations::Unavailable { reason } => reason,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_query_of_an_analysis_is_evaluated_at_the_decisions_instant() {
        let prometheus = FakePrometheus::start(healthy).await;
        let mut t = target(&prometheus.address);
        t.custom = vec![check("ttft-p99", TTFT)];
        sampled(PrometheusSource::default().observe(&t).await);
        let times = prometheus.param("time");
        assert_eq!(times.len(), queries_per_analysis(1), "{times:?}");
        let want = t.at.as_second().to_string();
        assert!(times.iter().all(|time| *time == want), "{times:?}");
    }

    #[test]
    fn window_is_rendered_in_whole_seconds_never_shorter_than_asked() {
        assert_eq!(prometheus_duration(Duration::from_secs(60)), "60s");
        assert_eq!(prometheus_duration(Duration::from_secs(90)), "90s");
        assert_eq!(prometheus_duration(Duration::from_millis(1500)), "2s");
        assert_eq!(prometheus_duration(Duration::from_millis(250)), "1s");
        assert_eq!(prometheus_duration(Duration::ZERO), "1s");
    }

    #[test]
    fn requests_for_both_tracks_come_from_one_query() {
        assert_eq!(
            requests_query(&target("http://p:9090")),
            format!(
                "sum by (destination_workload) ((increase({S}[60s]) and present_over_time({S}[1h] offset 60s)) \
                 or (({S} unless present_over_time({S}[1h] offset 60s)) \
                 and on() group(present_over_time(up[1h] offset 60s))))",
                S = r#"istio_requests_total{reporter="destination",destination_workload_namespace="chat",destination_workload=~"lobe-chat-canary|lobe-chat-stable"}"#
            )
        );
    }

    #[test]
    fn errors_are_5xx_and_lobechat_provider_errors_470_to_479() {
        assert_eq!(
            errors_query(&target("http://p:9090")),
            format!(
                "sum by (destination_workload) ((increase({S}[60s]) and present_over_time({S}[1h] offset 60s)) \
                 or (({S} unless present_over_time({S}[1h] offset 60s)) \
                 and on() group(present_over_time(up[1h] offset 60s))))",
                S = r#"istio_requests_total{reporter="destination",destination_workload_namespace="chat",destination_workload=~"lobe-chat-canary|lobe-chat-stable",response_code=~"5..|47."}"#
            )
        );
    }

    #[test]
    fn p99_keeps_buckets_apart_per_workload() {
        let mut t = target("http://p:9090");
        t.window = Duration::from_secs(90);
        assert_eq!(
            latency_p99_query(&t),
            format!(
                "histogram_quantile(0.99, sum by (destination_workload, le) ((increase({S}[90s]) and present_over_time({S}[1h] offset 90s)) \
                 or (({S} unless present_over_time({S}[1h] offset 90s)) \
                 and on() group(present_over_time(up[1h] offset 90s)))))",
                S = r#"istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload_namespace="chat",destination_workload=~"lobe-chat-canary|lobe-chat-stable"}"#
            )
        );
    }

    /// The counter expression of `growth` for a series `s` over 60s, as the tests spell it out.
    fn growth_60s(s: &str) -> String {
        format!(
            "(increase({s}[60s]) and present_over_time({s}[1h] offset 60s)) \
             or (({s} unless present_over_time({s}[1h] offset 60s)) \
             and on() group(present_over_time(up[1h] offset 60s)))"
        )
    }

    #[test]
    fn the_waypoint_source_reads_istios_series_reported_by_the_waypoint() {
        let mut t = target("http://p:9090");
        t.source = RequestSource::IstioWaypoint;
        let s = r#"reporter="waypoint",destination_workload_namespace="chat",destination_workload=~"lobe-chat-canary|lobe-chat-stable""#;
        assert_eq!(
            requests_query(&t),
            format!(
                "sum by (destination_workload) ({})",
                growth_60s(&format!("istio_requests_total{{{s}}}"))
            )
        );
        assert_eq!(
            errors_query(&t),
            format!(
                "sum by (destination_workload) ({})",
                growth_60s(&format!(
                    "istio_requests_total{{{s},response_code=~\"5..|47.\"}}"
                ))
            )
        );
        assert_eq!(
            latency_p99_query(&t),
            format!(
                "histogram_quantile(0.99, sum by (destination_workload, le) ({}))",
                growth_60s(&format!(
                    "istio_request_duration_milliseconds_bucket{{{s}}}"
                ))
            )
        );
    }

    #[test]
    fn the_otel_source_reads_the_apps_http_server_histogram_in_seconds_as_milliseconds() {
        let mut t = target("http://p:9090");
        t.source = RequestSource::Otel;
        let s = r#"namespace="chat",workload=~"lobe-chat-canary|lobe-chat-stable""#;
        assert_eq!(
            requests_query(&t),
            format!(
                "sum by (workload) ({})",
                growth_60s(&format!(
                    "http_server_request_duration_seconds_count{{{s}}}"
                ))
            )
        );
        assert_eq!(
            errors_query(&t),
            format!(
                "sum by (workload) ({})",
                growth_60s(&format!(
                    "http_server_request_duration_seconds_count{{{s},http_response_status_code=~\"5..|47.\"}}"
                ))
            )
        );
        assert_eq!(
            latency_p99_query(&t),
            format!(
                "1000 * histogram_quantile(0.99, sum by (workload, le) ({}))",
                growth_60s(&format!(
                    "http_server_request_duration_seconds_bucket{{{s}}}"
                ))
            )
        );
    }

    #[test]
    fn the_error_codes_of_the_spec_go_into_the_error_query_of_every_source() {
        for source in [
            RequestSource::Istio,
            RequestSource::IstioWaypoint,
            RequestSource::Otel,
        ] {
            let mut t = target("http://p:9090");
            t.source = source;
            t.error_codes = r"5\d\d|429".into();
            let code_label = source_queries(source).code_label;
            // A backslash doubles inside a PromQL string, which Prometheus reads back as one.
            let matcher = format!(r#"{code_label}=~"5\\d\\d|429""#);
            let query = errors_query(&t);
            assert_eq!(query.matches(&matcher).count(), 4, "{source:?}: {query}");
            assert!(!query.contains("47."), "{source:?}: {query}");
        }
    }

    #[test]
    fn one_watch_look_asks_for_every_track_of_its_namespaces_by_namespace_and_workload() {
        let look = WatchLook {
            address: "http://p:9090".into(),
            source: RequestSource::Istio,
            error_codes: crate::crd::DEFAULT_ERROR_CODES.into(),
            namespaces: vec!["chat".into(), "team.a".into()],
            window: Duration::from_secs(60),
            at: "2026-11-30T12:00:00Z".parse().expect("timestamp"),
        };
        let s = r#"reporter="destination",destination_workload_namespace=~"chat|team\\.a",destination_workload=~".+-canary|.+-stable""#;
        assert_eq!(
            look_requests_query(&look),
            format!(
                "sum by (destination_workload_namespace, destination_workload) ({})",
                growth_60s(&format!("istio_requests_total{{{s}}}"))
            )
        );
        assert_eq!(
            look_errors_query(&look),
            format!(
                "sum by (destination_workload_namespace, destination_workload) ({})",
                growth_60s(&format!(
                    "istio_requests_total{{{s},response_code=~\"5..|47.\"}}"
                ))
            )
        );
    }

    #[test]
    fn dots_in_workload_names_match_only_dots() {
        let mut t = target("http://p:9090");
        t.canary_workload = "chat.v2-canary".into();
        t.stable_workload = "chat.v2-stable".into();
        assert!(
            requests_query(&t)
                .contains(r#"destination_workload=~"chat\\.v2-canary|chat\\.v2-stable""#),
            "{}",
            requests_query(&t)
        );
    }

    #[test]
    fn custom_query_placeholders_are_filled_for_one_track() {
        assert_eq!(
            custom_query(TTFT, "chat", "lobe-chat-canary", Duration::from_secs(60)),
            r#"histogram_quantile(0.99, sum by (le) (rate(chat_time_to_first_token_seconds_bucket{namespace="chat", workload="lobe-chat-canary"}[60s])))"#
        );
    }

    #[test]
    fn an_analysis_costs_three_queries_plus_two_per_custom_metric() {
        assert_eq!(queries_per_analysis(0), 3);
        assert_eq!(queries_per_analysis(2), 7);
    }

    #[tokio::test]
    async fn the_server_receives_exactly_the_rendered_queries_each_with_a_timeout() {
        let server = FakePrometheus::start(healthy).await;
        let mut t = target(&server.address);
        t.custom = vec![check("ttft-p99", TTFT), check("other", TTFT)];
        let source = PrometheusSource::new(Duration::from_secs(5));
        sampled(source.observe(&t).await);

        let mut got = server.queries();
        got.sort();
        let canary_ttft = custom_query(TTFT, "chat", "lobe-chat-canary", t.window);
        let stable_ttft = custom_query(TTFT, "chat", "lobe-chat-stable", t.window);
        let mut want = vec![
            requests_query(&t),
            errors_query(&t),
            latency_p99_query(&t),
            canary_ttft.clone(),
            stable_ttft.clone(),
            canary_ttft,
            stable_ttft,
        ];
        want.sort();
        assert_eq!(got.len(), queries_per_analysis(t.custom.len()));
        assert_eq!(got, want);
        assert_eq!(server.param("timeout"), vec!["5000ms"; 7]);
    }

    #[tokio::test]
    async fn both_tracks_are_read_from_one_vector_by_destination_workload() {
        let server = FakePrometheus::start(|query| {
            if query.contains("response_code") {
                // A workload the selector would not match is ignored rather than misread.
                vector(&[
                    ("someone-else", "999"),
                    ("lobe-chat-stable", "40"),
                    ("lobe-chat-canary", "3"),
                ])
            } else {
                healthy(query)
            }
        })
        .await;
        let source = PrometheusSource::default();
        let (canary, stable) = sampled(source.observe(&target(&server.address)).await);
        assert_eq!(
            canary,
            TrackSample {
                requests: Some(1200.0),
                errors: Some(3.0),
                latency_p99_ms: Some(850.0),
                custom: Default::default(),
            }
        );
        assert_eq!(
            stable,
            TrackSample {
                requests: Some(22800.0),
                errors: Some(40.0),
                latency_p99_ms: Some(800.0),
                custom: Default::default(),
            }
        );
    }

    #[tokio::test]
    async fn otel_tracks_are_read_by_their_workload_label() {
        let server = FakePrometheus::start(|query| {
            let by_workload = |series: &[(&str, &str)]| {
                let result: Vec<_> = series
                    .iter()
                    .map(|(workload, value)| {
                        json!({"metric": {"workload": workload}, "value": [1_700_000_000.0, value]})
                    })
                    .collect();
                ok_json(json!({"resultType": "vector", "result": result}))
            };
            if query.contains("http_response_status_code") {
                by_workload(&[("lobe-chat-canary", "2"), ("lobe-chat-stable", "10")])
            } else if query.starts_with("1000 * histogram_quantile") {
                by_workload(&[("lobe-chat-canary", "420"), ("lobe-chat-stable", "400")])
            } else {
                by_workload(&[("lobe-chat-canary", "600"), ("lobe-chat-stable", "6000")])
            }
        })
        .await;
        let mut t = target(&server.address);
        t.source = RequestSource::Otel;
        let (canary, stable) = sampled(PrometheusSource::default().observe(&t).await);
        assert_eq!(
            (canary.requests, canary.errors, canary.latency_p99_ms),
            (Some(600.0), Some(2.0), Some(420.0))
        );
        assert_eq!(
            (stable.requests, stable.errors, stable.latency_p99_ms),
            (Some(6000.0), Some(10.0), Some(400.0))
        );
    }

    #[tokio::test]
    async fn an_empty_vector_is_no_data_never_zero() {
        let server = FakePrometheus::start(|query| {
            if query.contains("response_code") {
                vector(&[])
            } else if query.contains("istio_requests_total") {
                vector(&[("lobe-chat-stable", "22800")])
            } else {
                healthy(query)
            }
        })
        .await;
        let source = PrometheusSource::default();
        let (canary, stable) = sampled(source.observe(&target(&server.address)).await);
        assert_eq!((canary.requests, canary.errors), (None, None));
        assert_eq!((stable.requests, stable.errors), (Some(22800.0), None));
    }

    #[tokio::test]
    async fn nan_and_inf_are_no_data() {
        let server = FakePrometheus::start(|query| {
            if query.contains("histogram_quantile(0.99, sum by (destination_workload") {
                vector(&[("lobe-chat-canary", "NaN"), ("lobe-chat-stable", "+Inf")])
            } else if query.contains("chat_time_to_first_token") {
                unlabelled(&["NaN"])
            } else {
                healthy(query)
            }
        })
        .await;
        let mut t = target(&server.address);
        t.custom = vec![check("ttft-p99", TTFT)];
        let (canary, stable) = sampled(PrometheusSource::default().observe(&t).await);
        assert_eq!((canary.latency_p99_ms, stable.latency_p99_ms), (None, None));
        assert_eq!(canary.custom["ttft-p99"], None);
        assert_eq!(canary.requests, Some(1200.0));
    }

    #[tokio::test]
    async fn a_custom_metric_is_asked_once_per_track_with_its_own_workload() {
        let server = FakePrometheus::start(healthy).await;
        let mut t = target(&server.address);
        t.window = Duration::from_secs(90);
        t.custom = vec![check("ttft-p99", TTFT)];
        let (canary, stable) = sampled(PrometheusSource::default().observe(&t).await);
        assert_eq!(canary.custom["ttft-p99"], Some(0.9));
        assert_eq!(stable.custom["ttft-p99"], Some(0.8));
        let custom: Vec<_> = server
            .queries()
            .into_iter()
            .filter(|q| q.contains("chat_time_to_first_token"))
            .collect();
        assert_eq!(custom.len(), 2);
        for workload in ["lobe-chat-canary", "lobe-chat-stable"] {
            let want = format!(
                r#"histogram_quantile(0.99, sum by (le) (rate(chat_time_to_first_token_seconds_bucket{{namespace="chat", workload="{workload}"}}[90s])))"#
            );
            assert!(custom.contains(&want), "{want} not in {custom:?}");
        }
    }

    #[tokio::test]
    async fn a_custom_query_with_several_series_is_unavailable_and_says_why() {
        let server = FakePrometheus::start(|query| {
            if query.contains("chat_time_to_first_token") {
                unlabelled(&["0.9", "1.1"])
            } else {
                healthy(query)
            }
        })
        .await;
        let mut t = target(&server.address);
        t.custom = vec![check("ttft-p99", TTFT)];
        let reason = unavailable(PrometheusSource::default().observe(&t).await);
        assert!(reason.contains("ttft-p99"), "{reason}");
        assert!(reason.contains("returned 2 series"), "{reason}");
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_is_unavailable_naming_the_address() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let address = format!("http://127.0.0.1:{port}");
        let reason = unavailable(
            PrometheusSource::new(Duration::from_secs(5))
                .observe(&target(&address))
                .await,
        );
        assert!(
            reason.starts_with(&format!("Prometheus at {address} unreachable: ")),
            "{reason}"
        );
        assert!(reason.to_lowercase().contains("refused"), "{reason}");
    }

    #[tokio::test]
    async fn a_prometheus_that_never_answers_is_unavailable_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let source = PrometheusSource::new(Duration::from_millis(300));
        let started = Instant::now();
        let observations =
            tokio::time::timeout(Duration::from_secs(5), source.observe(&target(&address)))
                .await
                .expect("observe must give up by itself");
        let reason = unavailable(observations);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(reason.contains(&address), "{reason}");
        assert!(reason.contains("within 300ms"), "{reason}");
    }

    #[tokio::test]
    async fn an_http_error_is_unavailable() {
        let server = FakePrometheus::start(|_| Reply {
            status: 502,
            content_type: "text/plain",
            body: "upstream connect error".into(),
        })
        .await;
        let reason = unavailable(
            PrometheusSource::default()
                .observe(&target(&server.address))
                .await,
        );
        assert!(reason.contains("HTTP 502"), "{reason}");
        assert!(reason.contains(&server.address), "{reason}");
    }

    #[tokio::test]
    async fn a_query_prometheus_rejects_is_unavailable_with_its_message() {
        let server = FakePrometheus::start(|query| {
            if query == "broken{" {
                Reply {
                    status: 400,
                    content_type: "application/json",
                    body: json!({"status": "error", "errorType": "bad_data",
                                 "error": "1:12: parse error: unexpected \"}\""})
                    .to_string(),
                }
            } else {
                healthy(query)
            }
        })
        .await;
        let mut t = target(&server.address);
        t.custom = vec![check("ttft-p99", "broken{")];
        let reason = unavailable(PrometheusSource::default().observe(&t).await);
        assert!(
            reason.contains("rejected the ttft-p99 (lobe-chat-"),
            "{reason}"
        );
        assert!(reason.contains("bad_data: 1:12: parse error"), "{reason}");
    }

    #[tokio::test]
    async fn an_address_that_is_not_a_url_is_unavailable() {
        let reason = unavailable(
            PrometheusSource::default()
                .observe(&target("not a url"))
                .await,
        );
        assert!(reason.starts_with("Prometheus address"), "{reason}");
    }

    #[tokio::test]
    async fn one_client_is_kept_per_address() {
        let first = FakePrometheus::start(healthy).await;
        let second = FakePrometheus::start(healthy).await;
        let source = PrometheusSource::default();
        for address in [
            first.address.clone(),
            format!("{}/", first.address),
            second.address.clone(),
        ] {
            sampled(source.observe(&target(&address)).await);
        }
        let mut cached: Vec<_> = source.clients.lock().unwrap().keys().cloned().collect();
        cached.sort();
        let mut want = vec![first.address.clone(), second.address.clone()];
        want.sort();
        assert_eq!(cached, want);
        assert_eq!(first.queries().len(), 6);
    }

    #[tokio::test]
    async fn the_observer_hears_of_every_query_and_its_outcome() {
        let server = FakePrometheus::start(healthy).await;
        let heard = Arc::new(Mutex::new(Vec::new()));
        let log = heard.clone();
        let source = PrometheusSource::default().with_query_observer(Arc::new(move |took, ok| {
            log.lock().unwrap().push((took, ok))
        }));
        sampled(source.observe(&target(&server.address)).await);
        let heard = heard.lock().unwrap();
        assert_eq!(heard.len(), queries_per_analysis(0));
        assert!(heard.iter().all(|(_, ok)| *ok));
    }

    #[tokio::test]
    async fn is_online_asks_for_vector_1() {
        let server = FakePrometheus::start(healthy).await;
        let source = PrometheusSource::default();
        source.is_online(&server.address).await.unwrap();
        assert_eq!(server.queries(), vec!["vector(1)".to_string()]);
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        assert!(matches!(
            source.is_online(&closed).await,
            Err(QueryError::Unreachable { .. })
        ));
    }
}
