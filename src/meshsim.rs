//! The mesh simulator, a test and demo stand-in for Istio's data plane.
//!
//! The local control plane runs no Envoy and no containers: kwok marks pods Ready but they serve
//! nothing. The simulator fills that gap. It reads the VirtualServices and DestinationRules the
//! operator writes, plus Services, Pods and an optional ConfigMap `mesh-simulator`, sends a steady
//! synthetic request rate through each VirtualService the way Envoy routes it, answers each request
//! as the chosen pod's `SIM_*` environment variables say, and exports the outcome as Istio's own
//! metrics (`istio_requests_total`, `istio_request_duration_milliseconds`) plus the chat app's
//! `chat_time_to_first_token_seconds`, for a real Prometheus to scrape and the operator to judge.
//!
//! The decision for one request is pure: [`simulate_request`] takes the mesh state, a user and a
//! random number generator and returns what Istio would have recorded. [`Simulator`] keeps the
//! synthetic users (and the cookies they were given) between ticks; [`drive_traffic`],
//! [`serve_metrics`] and [`run`] are the I/O around it.
//!
//! Where the simulator parts from Istio on purpose:
//! - A subset whose pods are all unready answers 503 and the request is recorded with
//!   `reporter="destination"` under the subset's workload, so the operator sees it. (Real Istio only
//!   has the source proxy's report of such a request.)
//! - A destination whose Service or subset is unknown is counted as unrouted and recorded nowhere,
//!   as no destination proxy would see it.
//! - Match conditions beyond `headers`, `uri` and `queryParams` are not read.

use crate::crd::{HttpMatch, StringMatch};
use crate::istio::{Destination, DestinationRule, HttpRouteDestination, VirtualService};
use crate::telemetry::{TEXT, metrics_reply, reply, serve_http};
use futures::StreamExt;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::{Rng, RngExt};
use regex::Regex;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// Name of the optional ConfigMap that turns on a provider outage in its namespace.
pub const CONFIG_MAP_NAME: &str = "mesh-simulator";
/// Key of that ConfigMap: the fraction of every track's requests answered 470-479, e.g. `"0.12"`.
pub const PROVIDER_ERROR_RATE_KEY: &str = "providerErrorRate";

/// Fraction of a pod's requests answered 500 or 503.
pub const ENV_ERROR_RATE: &str = "SIM_ERROR_RATE";
/// Fraction of a pod's requests answered 470-479, LobeChat's model-provider errors.
pub const ENV_PROVIDER_ERROR_RATE: &str = "SIM_PROVIDER_ERROR_RATE";
/// Median request duration of a pod, in milliseconds.
pub const ENV_LATENCY_MS: &str = "SIM_LATENCY_MS";
/// Median time to first token of a pod, in seconds.
pub const ENV_TTFT_SECONDS: &str = "SIM_TTFT_SECONDS";

/// Istio's `reporter` label for the server-side proxy, the one the operator's queries select.
pub const REPORTER: &str = "destination";
/// The label value Istio writes when it does not know a value.
pub const UNKNOWN: &str = "unknown";
/// The cookie testers carry, matched by the usual `canaryMatch` regex.
pub const TESTER_COOKIE: &str = "canary=true";
/// Path of every synthetic request: LobeChat's chat endpoint.
pub const REQUEST_PATH: &str = "/webapi/chat";

/// Istio's default buckets of `istio_request_duration_milliseconds`, in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Buckets of `chat_time_to_first_token_seconds`.
pub const TTFT_BUCKETS_SECONDS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0,
];

/// Spread of request durations and TTFTs around their median (sigma of a lognormal).
const JITTER_SIGMA: f64 = 0.3;
/// Envoy answers "no healthy upstream" itself, in about a millisecond.
const LOCAL_REPLY_MEDIAN_MS: f64 = 1.0;
/// After a stall (a suspended laptop, a stopped debugger) catch up on at most this much traffic.
const MAX_CATCH_UP: Duration = Duration::from_secs(10);
/// The highest `--rps` accepted.
const MAX_RPS: f64 = 100_000.0;
const CLUSTER_DOMAIN_SUFFIX: &str = ".svc.cluster.local";

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
    /// An Istio object that cannot be read as the fields the simulator routes by; it is skipped.
    #[error("{kind} {namespace}/{name} is skipped, it cannot be read: {source}")]
    Malformed {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

// --- Pods and how they behave ---

/// How a pod answers, from the `SIM_*` variables of its first container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behaviour {
    /// Fraction of requests answered 500 or 503.
    pub error_rate: f64,
    /// Fraction of requests answered 470-479.
    pub provider_error_rate: f64,
    /// Median request duration in milliseconds.
    pub latency_ms: f64,
    /// Median time to first token in seconds.
    pub ttft_seconds: f64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            provider_error_rate: 0.0,
            latency_ms: 200.0,
            ttft_seconds: 0.4,
        }
    }
}

impl Behaviour {
    /// The behaviour a pod's first container asks for, and a description of each variable that
    /// could not be used (its default applies instead).
    pub fn of_pod(pod: &Pod) -> (Behaviour, Vec<String>) {
        let mut behaviour = Behaviour::default();
        let mut problems = Vec::new();
        let env = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .and_then(|c| c.env.as_ref());
        for var in env.into_iter().flatten() {
            let (slot, is_rate) = match var.name.as_str() {
                ENV_ERROR_RATE => (&mut behaviour.error_rate, true),
                ENV_PROVIDER_ERROR_RATE => (&mut behaviour.provider_error_rate, true),
                ENV_LATENCY_MS => (&mut behaviour.latency_ms, false),
                ENV_TTFT_SECONDS => (&mut behaviour.ttft_seconds, false),
                _ => continue,
            };
            let Some(text) = var.value.as_deref() else {
                problems.push(format!(
                    "{} has no literal value (valueFrom is not read)",
                    var.name
                ));
                continue;
            };
            match parse_number(text, is_rate) {
                Ok(value) => *slot = value,
                Err(reason) => problems.push(format!("{}={text:?}: {reason}", var.name)),
            }
        }
        (behaviour, problems)
    }
}

/// A rate in 0..=1, or a non-negative finite number.
fn parse_number(text: &str, is_rate: bool) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| "not a number".to_string())?;
    if !value.is_finite() || value < 0.0 {
        return Err("must be a finite number, 0 or more".into());
    }
    if is_rate && value > 1.0 {
        return Err("a rate must be between 0 and 1".into());
    }
    Ok(value)
}

/// The pod's workload as Istio names it: the Deployment for a pod of a Deployment's ReplicaSet
/// (the ReplicaSet's name less `-<pod-template-hash>`), else its controller's name, else its own.
pub fn workload_name(pod: &Pod) -> String {
    let meta = &pod.metadata;
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first());
    match owner {
        Some(owner) if owner.kind == "ReplicaSet" => {
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}")))
                .unwrap_or(&owner.name)
                .to_string()
        }
        Some(owner) => owner.name.clone(),
        None => meta.name.clone().unwrap_or_else(|| UNKNOWN.to_string()),
    }
}

/// Envoy sends traffic to a pod only while its Ready condition is True and it is not terminating.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
}

/// What the simulator needs of a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    /// Istio's `destination_workload`.
    pub workload: String,
    pub behaviour: Behaviour,
}

impl SimPod {
    /// The pod as the simulator sees it, and the `SIM_*` variables it could not use.
    pub fn of_pod(pod: &Pod) -> (SimPod, Vec<String>) {
        let (behaviour, problems) = Behaviour::of_pod(pod);
        let sim = SimPod {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            labels: pod.labels().clone(),
            ready: is_ready(pod),
            workload: workload_name(pod),
            behaviour,
        };
        (sim, problems)
    }
}

/// What the simulator needs of a Service: which pods it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct SimService {
    pub namespace: String,
    pub name: String,
    /// `None` for a Service without a selector, whose endpoints are managed by hand.
    pub selector: Option<BTreeMap<String, String>>,
}

impl SimService {
    /// The Service as the simulator sees it.
    pub fn of_service(service: &Service) -> SimService {
        SimService {
            namespace: service.namespace().unwrap_or_default(),
            name: service.name_any(),
            selector: service
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .filter(|s| !s.is_empty()),
        }
    }
}

/// The `providerErrorRate` of a `mesh-simulator` ConfigMap: `None` without the key.
pub fn provider_outage(config_map: &ConfigMap) -> Result<Option<f64>, String> {
    let Some(text) = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(PROVIDER_ERROR_RATE_KEY))
    else {
        return Ok(None);
    };
    parse_number(text, true)
        .map(Some)
        .map_err(|reason| format!("{PROVIDER_ERROR_RATE_KEY}={text:?}: {reason}"))
}

// --- The mesh state one tick routes through ---

/// Everything routing reads, as of one tick.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    pub virtual_services: Vec<VirtualService>,
    pub destination_rules: Vec<DestinationRule>,
    pub services: Vec<SimService>,
    pub pods: Vec<SimPod>,
    /// Namespace to the `providerErrorRate` of its `mesh-simulator` ConfigMap.
    pub provider_outages: BTreeMap<String, f64>,
}

/// A VirtualService from its JSON, filling in what hand-written ones often leave out and the
/// operator's types require (route names, destination subsets and ports), so those still route.
pub fn virtual_service_from_value(mut value: Value) -> Result<VirtualService, serde_json::Error> {
    let routes = value
        .get_mut("spec")
        .and_then(|s| s.get_mut("http"))
        .and_then(Value::as_array_mut);
    for route in routes.into_iter().flatten() {
        let Some(route) = route.as_object_mut() else {
            continue;
        };
        route.entry("name").or_insert_with(|| Value::from(""));
        let destinations = route.get_mut("route").and_then(Value::as_array_mut);
        for destination in destinations.into_iter().flatten() {
            if let Some(d) = destination
                .get_mut("destination")
                .and_then(Value::as_object_mut)
            {
                d.entry("subset").or_insert_with(|| Value::from(""));
                d.entry("port")
                    .or_insert_with(|| serde_json::json!({"number": 0}));
            }
        }
    }
    serde_json::from_value(value)
}

/// The fully qualified name Istio gives `host` as written in `namespace`: a short name is a
/// Service of that namespace; anything with a dot is taken as written.
pub fn service_fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}{CLUSTER_DOMAIN_SUFFIX}")
    }
}

/// `(service, namespace)` of an in-cluster FQDN such as `lobe-chat.chat.svc.cluster.local`.
fn split_fqdn(fqdn: &str) -> Option<(&str, &str)> {
    let (service, namespace) = fqdn.strip_suffix(CLUSTER_DOMAIN_SUFFIX)?.split_once('.')?;
    (!namespace.contains('.')).then_some((service, namespace))
}

// --- Synthetic users and their requests ---

/// The parts of an HTTP request that route matching reads. Header names are lower case.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyntheticRequest {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
}

/// One simulated user: a tester or not, and the cookies the mesh has set on them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct User {
    pub tester: bool,
    pub cookies: BTreeMap<String, String>,
}

impl User {
    /// The user's next request: testers send `canary=true` before the cookies they hold.
    pub fn request(&self) -> SyntheticRequest {
        let mut cookies: Vec<String> = Vec::new();
        if self.tester {
            cookies.push(TESTER_COOKIE.to_string());
        }
        cookies.extend(self.cookies.iter().map(|(k, v)| format!("{k}={v}")));
        let mut headers = BTreeMap::new();
        if !cookies.is_empty() {
            headers.insert("cookie".to_string(), cookies.join("; "));
        }
        SyntheticRequest {
            path: REQUEST_PATH.to_string(),
            headers,
            query: BTreeMap::new(),
        }
    }

    /// Keeps the cookie of a `set-cookie` header value (`name=value; Path=/; ...`) as a browser
    /// would; attributes are ignored.
    pub fn remember(&mut self, set_cookie: &str) {
        let pair = set_cookie.split(';').next().unwrap_or_default();
        if let Some((name, value)) = pair.split_once('=') {
            let name = name.trim();
            if !name.is_empty() {
                self.cookies
                    .insert(name.to_string(), value.trim().to_string());
            }
        }
    }
}

/// The users of one VirtualService. The first `tester_share` of them are testers, so testers send
/// that share of the requests.
#[derive(Debug, Clone)]
pub struct UserPool {
    users: Vec<User>,
}

impl UserPool {
    /// `size` users (at least one), `tester_share` of them testers.
    pub fn new(size: usize, tester_share: f64) -> Self {
        let size = size.max(1);
        let testers = (size as f64 * tester_share.clamp(0.0, 1.0)).round() as usize;
        let users = (0..size)
            .map(|i| User {
                tester: i < testers,
                cookies: BTreeMap::new(),
            })
            .collect();
        Self { users }
    }

    /// A user chosen uniformly at random.
    pub fn pick<R: Rng + ?Sized>(&mut self, rng: &mut R) -> (usize, &mut User) {
        let i = rng.random_range(0..self.users.len());
        (i, &mut self.users[i])
    }

    /// All users, in order.
    pub fn users(&self) -> &[User] {
        &self.users
    }
}

// --- Routing ---

/// Compiled RE2-style regexes by pattern; a pattern that does not compile never matches and is
/// reported once.
#[derive(Debug, Default)]
pub struct RegexCache {
    compiled: HashMap<String, Option<Regex>>,
}

impl RegexCache {
    /// Whether `pattern` matches all of `value`, as Envoy's `safe_regex` does.
    pub fn full_match(&mut self, pattern: &str, value: &str) -> bool {
        let regex = self
            .compiled
            .entry(pattern.to_string())
            .or_insert_with(|| match Regex::new(&format!("^(?:{pattern})$")) {
                Ok(regex) => Some(regex),
                Err(error) => {
                    tracing::warn!(%pattern, %error, "a route regex does not compile; it never matches");
                    None
                }
            });
        regex.as_ref().is_some_and(|r| r.is_match(value))
    }
}

/// Istio's StringMatch against a present value. One with no condition matches any value.
pub fn string_matches(m: &StringMatch, value: &str, regexes: &mut RegexCache) -> bool {
    if let Some(exact) = &m.exact {
        return value == exact;
    }
    if let Some(prefix) = &m.prefix {
        return value.starts_with(prefix.as_str());
    }
    if let Some(pattern) = &m.regex {
        return regexes.full_match(pattern, value);
    }
    true
}

/// Whether every condition of one `match` entry holds; an absent header or parameter fails.
pub fn request_matches(
    m: &HttpMatch,
    request: &SyntheticRequest,
    regexes: &mut RegexCache,
) -> bool {
    let fields_match = |wanted: &Option<BTreeMap<String, StringMatch>>,
                        have: &BTreeMap<String, String>,
                        lower: bool,
                        regexes: &mut RegexCache| {
        wanted.iter().flatten().all(|(name, condition)| {
            let key = if lower {
                name.to_ascii_lowercase()
            } else {
                name.clone()
            };
            have.get(&key)
                .is_some_and(|value| string_matches(condition, value, regexes))
        })
    };
    m.uri
        .as_ref()
        .is_none_or(|uri| string_matches(uri, &request.path, regexes))
        && fields_match(&m.headers, &request.headers, true, regexes)
        && fields_match(&m.query_params, &request.query, false, regexes)
}

/// The route Envoy picks for a request and the destination it draws.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteChoice<'a> {
    /// The route's name ("" when unnamed).
    pub route: &'a str,
    pub destination: &'a HttpRouteDestination,
}

/// Walks `spec.http` in order; the first route with no match or a matching entry wins and draws
/// one of its destinations by weight. `None` when no route matches (Envoy's 404).
pub fn choose_route<'a, R: Rng + ?Sized>(
    service: &'a VirtualService,
    request: &SyntheticRequest,
    rng: &mut R,
    regexes: &mut RegexCache,
) -> Option<RouteChoice<'a>> {
    let route = service.spec.http.iter().find(|route| {
        route.matches.is_empty()
            || route
                .matches
                .iter()
                .any(|m| request_matches(m, request, regexes))
    })?;
    let destination = pick_weighted(&route.route, rng)?;
    Some(RouteChoice {
        route: &route.name,
        destination,
    })
}

/// A lone destination takes everything whatever its weight, as in Istio; otherwise each takes its
/// weight's share. All-zero weights send everything to the first.
fn pick_weighted<'a, R: Rng + ?Sized>(
    destinations: &'a [HttpRouteDestination],
    rng: &mut R,
) -> Option<&'a HttpRouteDestination> {
    let total: i64 = destinations
        .iter()
        .map(|d| i64::from(d.weight.max(0)))
        .sum();
    if destinations.len() <= 1 || total == 0 {
        return destinations.first();
    }
    let mut draw = rng.random_range(0..total);
    for destination in destinations {
        let weight = i64::from(destination.weight.max(0));
        if draw < weight {
            return Some(destination);
        }
        draw -= weight;
    }
    destinations.last()
}

/// The `set-cookie` a destination adds to its responses, if any.
pub fn set_cookie_of(destination: &HttpRouteDestination) -> Option<&str> {
    destination
        .headers
        .as_ref()?
        .response
        .as_ref()?
        .add
        .get("set-cookie")
        .map(String::as_str)
}

/// Where a destination leads.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream<'a> {
    /// A known subset of a known Service, with its Ready pods (possibly none).
    Resolved {
        /// `destination_service`: the Service's FQDN.
        service: String,
        namespace: String,
        /// The workload a "no healthy upstream" 503 is recorded under: that of the subset's
        /// first pod, or `<service>-<subset>` (the operator's naming) when it has no pods.
        workload: String,
        ready: Vec<&'a SimPod>,
    },
    /// Envoy has no cluster for it (unknown Service or subset); no destination proxy sees it.
    Unresolved(String),
}

/// The pods behind `destination` of a VirtualService in `namespace`: those of the Service that
/// carry the subset's labels from the DestinationRule for the same host.
pub fn resolve_upstream<'a>(
    state: &'a MeshState,
    namespace: &str,
    destination: &Destination,
) -> Upstream<'a> {
    let fqdn = service_fqdn(&destination.host, namespace);
    let Some((service_name, service_namespace)) = split_fqdn(&fqdn) else {
        return Upstream::Unresolved(format!("{fqdn} is not an in-cluster Service"));
    };
    let Some(service) = state
        .services
        .iter()
        .find(|s| s.name == service_name && s.namespace == service_namespace)
    else {
        return Upstream::Unresolved(format!("no Service {service_namespace}/{service_name}"));
    };
    let Some(selector) = &service.selector else {
        return Upstream::Unresolved(format!(
            "Service {service_namespace}/{service_name} has no selector"
        ));
    };
    let subset_labels = if destination.subset.is_empty() {
        None
    } else {
        // Istio prefers the rule in the client's namespace, then the Service's.
        let rule = state
            .destination_rules
            .iter()
            .filter(|r| {
                let rule_namespace = r.metadata.namespace.as_deref().unwrap_or_default();
                service_fqdn(&r.spec.host, rule_namespace) == fqdn
            })
            .filter_map(|r| {
                let subset = r
                    .spec
                    .subsets
                    .iter()
                    .find(|s| s.name == destination.subset)?;
                let rule_namespace = r.metadata.namespace.as_deref().unwrap_or_default();
                let rank = if rule_namespace == namespace {
                    0
                } else if rule_namespace == service_namespace {
                    1
                } else {
                    2
                };
                Some((rank, &subset.labels))
            })
            .min_by_key(|(rank, _)| *rank);
        match rule {
            Some((_, labels)) => Some(labels),
            None => {
                return Upstream::Unresolved(format!(
                    "no DestinationRule subset {:?} for {fqdn}",
                    destination.subset
                ));
            }
        }
    };
    let has_all = |pod: &SimPod, labels: &BTreeMap<String, String>| {
        labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    };
    let members: Vec<&SimPod> = state
        .pods
        .iter()
        .filter(|p| p.namespace == service_namespace && has_all(p, selector))
        .filter(|p| subset_labels.is_none_or(|labels| has_all(p, labels)))
        .collect();
    let workload = match members.first() {
        Some(pod) => pod.workload.clone(),
        None if destination.subset.is_empty() => service_name.to_string(),
        None => format!("{service_name}-{}", destination.subset),
    };
    Upstream::Resolved {
        service: fqdn.clone(),
        namespace: service_namespace.to_string(),
        workload,
        ready: members.into_iter().filter(|p| p.ready).collect(),
    }
}

// --- Answering a request ---

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
    RequestRecord {
        workload: pod.workload.clone(),
        namespace: pod.namespace.clone(),
        service: service.to_string(),
        response_code,
        duration_ms: jittered(b.latency_ms, rng),
        ttft_seconds,
    }
}

/// One synthetic request of `user` through `service`: routed, answered, and the route's
/// `set-cookie` remembered by the user. `None` when Envoy would not reach any destination proxy.
pub fn simulate_request<R: Rng + ?Sized>(
    state: &MeshState,
    service: &VirtualService,
    user: &mut User,
    rng: &mut R,
    regexes: &mut RegexCache,
) -> Option<RequestRecord> {
    let request = user.request();
    let choice = choose_route(service, &request, rng, regexes)?;
    // Envoy adds route response headers to its own replies too, so the cookie is set either way.
    if let Some(cookie) = set_cookie_of(choice.destination) {
        user.remember(cookie);
    }
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    match resolve_upstream(state, namespace, &choice.destination.destination) {
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
        Upstream::Unresolved(reason) => {
            tracing::debug!(route = choice.route, %reason, "request not routed to any workload");
            None
        }
    }
}

// --- The traffic over time ---

/// The synthetic load.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficConfig {
    /// Requests per second sent through each VirtualService.
    pub rps: f64,
    /// How often requests are generated and counted.
    pub tick: Duration,
    /// Share of users that carry the tester cookie `canary=true`.
    pub tester_share: f64,
    /// Simulated users per VirtualService, each keeping its own cookies.
    pub users: usize,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            rps: 40.0,
            tick: Duration::from_millis(100),
            tester_share: 0.02,
            users: 500,
        }
    }
}

impl TrafficConfig {
    /// Rejects values the simulation cannot use, naming the option.
    pub fn validate(&self) -> Result<(), MeshSimError> {
        let invalid = |option, reason: &str| {
            Err(MeshSimError::InvalidOption {
                option,
                reason: reason.to_string(),
            })
        };
        // Every request is simulated one by one; far beyond this a tick outlasts its interval.
        if !self.rps.is_finite() || !(0.0..=MAX_RPS).contains(&self.rps) {
            return invalid("rps", "must be a number from 0 to 100000");
        }
        if self.tick.is_zero() {
            return invalid("tick", "must be longer than zero");
        }
        if !(0.0..=1.0).contains(&self.tester_share) {
            return invalid("tester-share", "must be between 0 and 1");
        }
        if self.users == 0 {
            return invalid("users", "must be at least 1");
        }
        Ok(())
    }
}

/// What one tick produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TickReport {
    pub records: Vec<RequestRecord>,
    /// Requests that matched no route or led to no known Service or subset.
    pub unrouted: u32,
}

/// The state kept between ticks: the users of each VirtualService, compiled regexes and the
/// fraction of a request still owed.
#[derive(Debug)]
pub struct Simulator {
    config: TrafficConfig,
    users: HashMap<(String, String), UserPool>,
    regexes: RegexCache,
    owed: f64,
}

impl Simulator {
    /// A simulator with no users yet; each VirtualService gets its pool when first seen.
    pub fn new(config: TrafficConfig) -> Self {
        Self {
            config,
            users: HashMap::new(),
            regexes: RegexCache::default(),
            owed: 0.0,
        }
    }

    /// The load it generates.
    pub fn config(&self) -> &TrafficConfig {
        &self.config
    }

    /// The users of the VirtualService `namespace/name`, once it has had traffic.
    pub fn users_of(&self, namespace: &str, name: &str) -> Option<&UserPool> {
        self.users.get(&(namespace.to_string(), name.to_string()))
    }

    /// Requests each VirtualService gets for `elapsed`; fractions carry over to the next call so
    /// low rates average out right.
    pub fn requests_for(&mut self, elapsed: Duration) -> u32 {
        self.owed += self.config.rps * elapsed.min(MAX_CATCH_UP).as_secs_f64();
        let whole = self.owed.floor();
        self.owed -= whole;
        whole as u32
    }

    /// Sends `requests` requests through every VirtualService of `state`.
    pub fn tick<R: Rng + ?Sized>(
        &mut self,
        state: &MeshState,
        requests: u32,
        rng: &mut R,
    ) -> TickReport {
        let mut report = TickReport::default();
        let mut present = HashSet::new();
        for service in &state.virtual_services {
            let key = (
                service.metadata.namespace.clone().unwrap_or_default(),
                service.metadata.name.clone().unwrap_or_default(),
            );
            let pool = self
                .users
                .entry(key.clone())
                .or_insert_with(|| UserPool::new(self.config.users, self.config.tester_share));
            present.insert(key);
            for _ in 0..requests {
                let (_, user) = pool.pick(rng);
                match simulate_request(state, service, user, rng, &mut self.regexes) {
                    Some(record) => report.records.push(record),
                    None => report.unrouted += 1,
                }
            }
        }
        // A VirtualService that is gone takes its users' cookies with it.
        self.users.retain(|key, _| present.contains(key));
        report
    }
}

// --- Metrics ---

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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS_SECONDS)
}

/// The metrics the simulator exports, as Istio's proxies and the chat app would.
#[derive(Debug)]
pub struct MeshMetrics {
    registry: Registry,
    requests: Family<IstioLabels, Counter>,
    durations: HistogramFamily<IstioLabels>,
    ttft: HistogramFamily<TtftLabels>,
}

impl Default for MeshMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl MeshMetrics {
    /// A registry holding `istio_requests_total`, `istio_request_duration_milliseconds` and
    /// `chat_time_to_first_token_seconds`, with no series yet.
    pub fn new() -> Self {
        let requests = Family::<IstioLabels, Counter>::default();
        let durations = HistogramFamily::<IstioLabels>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let ttft = HistogramFamily::<TtftLabels>::new_with_constructor(
            ttft_histogram as fn() -> Histogram,
        );
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
            "chat_time_to_first_token_seconds",
            "Time from a chat request to the first streamed token, in seconds",
            ttft.clone(),
        );
        Self {
            registry,
            requests,
            durations,
            ttft,
        }
    }

    /// Counts one request.
    pub fn record(&self, record: &RequestRecord) {
        let labels = IstioLabels {
            reporter: REPORTER.to_string(),
            destination_workload: record.workload.clone(),
            destination_workload_namespace: record.namespace.clone(),
            destination_service: record.service.clone(),
            response_code: record.response_code.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(record.duration_ms);
        if let Some(ttft) = record.ttft_seconds {
            let labels = TtftLabels {
                namespace: record.namespace.clone(),
                workload: record.workload.clone(),
            };
            self.ttft.get_or_create(&labels).observe(ttft);
        }
    }

    /// The OpenMetrics text exposition of everything recorded so far.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

// --- HTTP ---

/// Answers one request to the simulator's metrics server.
fn route(method: &Method, path: &str, metrics: &MeshMetrics) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => metrics_reply(metrics.encode()),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<MeshMetrics>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |method: &Method, path: &str| route(method, path, &metrics);
    serve_http(listener, handler, shutdown).await;
}

/// Generates traffic every tick through the state `snapshot` returns, into `metrics`, until
/// `shutdown` completes.
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
        last = now;
        let state = snapshot();
        let report = simulator.tick(&state, requests, rng);
        for record in &report.records {
            metrics.record(record);
        }
        tracing::trace!(
            virtual_services = state.virtual_services.len(),
            recorded = report.records.len(),
            unrouted = report.unrouted,
            "tick"
        );
    }
}

// --- The cluster ---

/// Each object converted once per version, so a malformed object is reported once and not on
/// every tick.
#[derive(Debug)]
struct Converted<T> {
    entries: HashMap<String, (String, Option<T>)>,
}

impl<T> Default for Converted<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<T: Clone> Converted<T> {
    fn refresh<K: Resource>(
        &mut self,
        objects: &[Arc<K>],
        mut convert: impl FnMut(&K) -> Option<T>,
    ) -> Vec<T> {
        let mut entries = HashMap::with_capacity(objects.len());
        let mut out = Vec::with_capacity(objects.len());
        for object in objects {
            let meta = object.meta();
            let key = format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            );
            let version = format!(
                "{}@{}",
                meta.uid.as_deref().unwrap_or_default(),
                meta.resource_version.as_deref().unwrap_or_default()
            );
            let converted = match self.entries.remove(&key) {
                Some((seen, converted)) if seen == version => converted,
                _ => convert(object),
            };
            if let Some(c) = &converted {
                out.push(c.clone());
            }
            entries.insert(key, (version, converted));
        }
        self.entries = entries;
        out
    }
}

/// A one-line summary of a VirtualService's routes for the log.
pub fn describe_routes(service: &VirtualService) -> String {
    service
        .spec
        .http
        .iter()
        .map(|route| {
            let destinations: Vec<String> = route
                .route
                .iter()
                .map(|d| {
                    let target = if d.destination.subset.is_empty() {
                        &d.destination.host
                    } else {
                        &d.destination.subset
                    };
                    format!("{target} {}", d.weight)
                })
                .collect();
            let name = if route.name.is_empty() {
                "(unnamed)"
            } else {
                &route.name
            };
            format!("{name}: {}", destinations.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn malformed(
    kind: &'static str,
    object: &DynamicObject,
    source: serde_json::Error,
) -> MeshSimError {
    MeshSimError::Malformed {
        kind,
        namespace: object.namespace().unwrap_or_default(),
        name: object.name_any(),
        source,
    }
}

fn convert_virtual_service(object: &DynamicObject) -> Option<VirtualService> {
    match serde_json::to_value(object).and_then(virtual_service_from_value) {
        Ok(service) => {
            tracing::info!(
                namespace = %service.metadata.namespace.as_deref().unwrap_or_default(),
                name = %service.metadata.name.as_deref().unwrap_or_default(),
                routes = %describe_routes(&service),
                "routing through VirtualService"
            );
            Some(service)
        }
        Err(source) => {
            let error = malformed("VirtualService", object, source);
            tracing::warn!(%error, "skipping VirtualService");
            None
        }
    }
}

fn convert_destination_rule(object: &DynamicObject) -> Option<DestinationRule> {
    match serde_json::to_value(object).and_then(serde_json::from_value::<DestinationRule>) {
        Ok(rule) => Some(rule),
        Err(source) => {
            let error = malformed("DestinationRule", object, source);
            tracing::warn!(%error, "skipping DestinationRule");
            None
        }
    }
}

fn convert_pod(pod: &Pod) -> Option<SimPod> {
    let (sim, problems) = SimPod::of_pod(pod);
    for problem in problems {
        tracing::warn!(namespace = %sim.namespace, pod = %sim.name, %problem, "ignoring a simulation variable; its default applies");
    }
    Some(sim)
}

fn convert_config_map(config_map: &ConfigMap) -> Option<(String, f64)> {
    let namespace = config_map.namespace().unwrap_or_default();
    match provider_outage(config_map) {
        Ok(Some(rate)) => {
            tracing::info!(%namespace, provider_error_rate = rate, "provider outage on every track");
            Some((namespace, rate))
        }
        Ok(None) => None,
        Err(problem) => {
            tracing::warn!(%namespace, config_map = CONFIG_MAP_NAME, %problem, "ignoring the provider outage");
            None
        }
    }
}

/// The objects the simulator watches, kept current by reflectors, and turned into a
/// [`MeshState`] on demand.
pub struct ClusterState {
    virtual_services: Store<DynamicObject>,
    destination_rules: Store<DynamicObject>,
    services: Store<Service>,
    pods: Store<Pod>,
    config_maps: Store<ConfigMap>,
    converted_services: Converted<VirtualService>,
    converted_rules: Converted<DestinationRule>,
    converted_pods: Converted<SimPod>,
    converted_outages: Converted<(String, f64)>,
}

fn spawn_reflector<K>(
    tasks: &mut JoinSet<()>,
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let events = reflector::reflector(writer, watcher(api, config).default_backoff());
    tasks.spawn(async move {
        events
            .for_each(|event| {
                // The watcher retries with backoff; a missing Istio CRD shows up here.
                if let Err(error) = event {
                    tracing::warn!(kind = what, %error, "watch failed; retrying");
                }
                std::future::ready(())
            })
            .await;
    });
}

impl ClusterState {
    /// Starts watching, in `namespace` or in all namespaces, on tasks added to `tasks`.
    pub fn watch(client: kube::Client, namespace: Option<&str>, tasks: &mut JoinSet<()>) -> Self {
        let dynamic = |resource: ApiResource| -> (Api<DynamicObject>, Store<DynamicObject>, _) {
            let api = match namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let writer = reflector::store::Writer::new(resource);
            (api, writer.as_reader(), writer)
        };
        let (vs_api, virtual_services, vs_writer) =
            dynamic(ApiResource::erase::<VirtualService>(&()));
        let (dr_api, destination_rules, dr_writer) =
            dynamic(ApiResource::erase::<DestinationRule>(&()));
        let every = watcher::Config::default();
        spawn_reflector(tasks, "VirtualService", vs_api, every.clone(), vs_writer);
        spawn_reflector(tasks, "DestinationRule", dr_api, every.clone(), dr_writer);

        let (services, writer) = reflector::store();
        spawn_reflector(
            tasks,
            "Service",
            typed_api(&client, namespace),
            every.clone(),
            writer,
        );
        let (pods, writer) = reflector::store();
        spawn_reflector(tasks, "Pod", typed_api(&client, namespace), every, writer);
        let (config_maps, writer) = reflector::store();
        let named = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP_NAME}"));
        spawn_reflector(
            tasks,
            "ConfigMap",
            typed_api(&client, namespace),
            named,
            writer,
        );

        Self {
            virtual_services,
            destination_rules,
            services,
            pods,
            config_maps,
            converted_services: Converted::default(),
            converted_rules: Converted::default(),
            converted_pods: Converted::default(),
            converted_outages: Converted::default(),
        }
    }

    /// The mesh as the reflectors see it now, sorted by namespace and name.
    pub fn snapshot(&mut self) -> MeshState {
        let by_name = |a: &kube::core::ObjectMeta, b: &kube::core::ObjectMeta| {
            (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
        };
        let mut virtual_services = self
            .converted_services
            .refresh(&self.virtual_services.state(), convert_virtual_service);
        virtual_services.sort_by(|a, b| by_name(&a.metadata, &b.metadata));
        let mut destination_rules = self
            .converted_rules
            .refresh(&self.destination_rules.state(), convert_destination_rule);
        destination_rules.sort_by(|a, b| by_name(&a.metadata, &b.metadata));
        let mut services: Vec<SimService> = self
            .services
            .state()
            .iter()
            .map(|s| SimService::of_service(s))
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut pods = self.converted_pods.refresh(&self.pods.state(), convert_pod);
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let provider_outages = self
            .converted_outages
            .refresh(&self.config_maps.state(), convert_config_map)
            .into_iter()
            .collect();
        MeshState {
            virtual_services,
            destination_rules,
            services,
            pods,
            provider_outages,
        }
    }
}

fn typed_api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

// --- The whole simulator ---

/// How [`run`] is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Watch one namespace; `None` watches all.
    pub namespace: Option<String>,
    /// Address of the `/metrics` and `/healthz` server.
    pub listen: SocketAddr,
    pub traffic: TrafficConfig,
    /// Seed of the random number generator, for a reproducible run; `None` seeds from the OS.
    pub seed: Option<u64>,
}

/// The random number generator of the simulation: seedable and the same on every platform.
pub type SimRng = rand::rngs::Xoshiro256PlusPlus;

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::LABEL_NAME;
    use crate::crd::ChatRelease;
    use crate::router::Routes;
    use rand::SeedableRng;
    use serde_json::json;
    use std::collections::BTreeSet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const STABLE_REV: &str = "aaaa111111";
    const CANARY_REV: &str = "bbbb222222";

    fn rng() -> SimRng {
        SimRng::seed_from_u64(7)
    }

    fn release(traffic: Value) -> ChatRelease {
        let mut r = ChatRelease::test("v1");
        r.spec.traffic = serde_json::from_value(traffic).unwrap();
        r
    }

    fn plain_release() -> ChatRelease {
        release(json!({}))
    }

    fn tester_release(sticky: bool) -> ChatRelease {
        let mut traffic = json!({
            "canaryMatch": [{"headers": {"cookie": {"regex": "^(.*;)?\\s*canary=true(;.*)?$"}}}]
        });
        if sticky {
            traffic["stickyCookie"] = json!("chat-version");
        }
        release(traffic)
    }

    fn routes(canary_weight: i32, canary_routes: bool) -> Routes {
        Routes {
            canary_weight,
            canary_routes,
            stable_revision: Some(STABLE_REV.into()),
            canary_revision: Some(CANARY_REV.into()),
        }
    }

    /// A pod of `<release>-<track>` as a Deployment's ReplicaSet makes it.
    fn pod(name: &str, track: &str, ready: bool, env: &[(&str, &str)]) -> Pod {
        let env: Vec<Value> = env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "chat",
                "labels": {"app.kubernetes.io/name": "lobe-chat", "chatrelease.io/track": track,
                           "pod-template-hash": "5d8f9c7b6"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": format!("lobe-chat-{track}-5d8f9c7b6"), "uid": "rs", "controller": true}]
            },
            "spec": {"containers": [{"name": "app", "image": "x", "env": env}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    fn sim(pod: &Pod) -> SimPod {
        SimPod::of_pod(pod).0
    }

    /// The objects the operator writes for `release` at `routes`, with these pods.
    fn state(release: &ChatRelease, routes: &Routes, pods: &[Pod]) -> MeshState {
        MeshState {
            virtual_services: vec![crate::istio::virtual_service(release, routes)],
            destination_rules: vec![crate::istio::destination_rule(release)],
            services: vec![SimService::of_service(&crate::workload::service(release))],
            pods: pods.iter().map(sim).collect(),
            provider_outages: BTreeMap::new(),
        }
    }

    fn healthy_pods() -> Vec<Pod> {
        vec![
            pod("lobe-chat-stable-5d8f9c7b6-a", "stable", true, &[]),
            pod("lobe-chat-stable-5d8f9c7b6-b", "stable", true, &[]),
            pod("lobe-chat-canary-5d8f9c7b6-c", "canary", true, &[]),
        ]
    }

    /// Requests per workload from one big tick.
    fn count_by_workload(report: &TickReport) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in &report.records {
            *counts.entry(r.workload.clone()).or_default() += 1;
        }
        counts
    }

    fn no_testers() -> TrafficConfig {
        TrafficConfig {
            tester_share: 0.0,
            ..TrafficConfig::default()
        }
    }

    // --- Routing ---

    #[test]
    fn weights_95_5_are_honoured_over_many_requests() {
        let mesh = state(&plain_release(), &routes(5, true), &healthy_pods());
        let mut simulator = Simulator::new(no_testers());
        let report = simulator.tick(&mesh, 20_000, &mut rng());
        let counts = count_by_workload(&report);
        let canary = counts["lobe-chat-canary"] as f64 / 20_000.0;
        assert!((canary - 0.05).abs() < 0.006, "canary share {canary}");
        assert_eq!(
            counts["lobe-chat-stable"] + counts["lobe-chat-canary"],
            20_000
        );
        assert_eq!(report.unrouted, 0);
    }

    #[test]
    fn records_carry_istios_service_and_namespace() {
        let mesh = state(&plain_release(), &routes(0, false), &healthy_pods());
        let report = Simulator::new(no_testers()).tick(&mesh, 10, &mut rng());
        for r in &report.records {
            assert_eq!(r.service, "lobe-chat.chat.svc.cluster.local");
            assert_eq!(r.namespace, "chat");
            assert_eq!(r.workload, "lobe-chat-stable");
            assert_eq!(r.response_code, 200);
        }
    }

    #[test]
    fn testers_cookie_routes_first_and_always_reaches_the_canary() {
        let mesh = state(&tester_release(false), &routes(5, true), &healthy_pods());
        let service = &mesh.virtual_services[0];
        let mut regexes = RegexCache::default();
        let mut rng = rng();
        let mut tester = User {
            tester: true,
            ..User::default()
        };
        for _ in 0..500 {
            let choice = choose_route(service, &tester.request(), &mut rng, &mut regexes).unwrap();
            assert_eq!(choice.route, "canary-match-0");
            let record =
                simulate_request(&mesh, service, &mut tester, &mut rng, &mut regexes).unwrap();
            assert_eq!(record.workload, "lobe-chat-canary");
        }
        let mut other = User::default();
        let choice = choose_route(service, &other.request(), &mut rng, &mut regexes).unwrap();
        assert_eq!(choice.route, crate::istio::PRIMARY_ROUTE);
        let _ = simulate_request(&mesh, service, &mut other, &mut rng, &mut regexes);
    }

    #[test]
    fn tester_share_of_users_sends_that_share_of_requests_to_the_canary_at_weight_0() {
        let mesh = state(&tester_release(false), &routes(0, true), &healthy_pods());
        let report = Simulator::new(TrafficConfig::default()).tick(&mesh, 20_000, &mut rng());
        let canary = count_by_workload(&report)["lobe-chat-canary"] as f64 / 20_000.0;
        assert!((canary - 0.02).abs() < 0.005, "canary share {canary}");
    }

    #[test]
    fn the_tester_cookie_matches_wherever_it_sits_among_cookies() {
        let mut regexes = RegexCache::default();
        let m = HttpMatch {
            headers: Some(BTreeMap::from([(
                "Cookie".to_string(),
                StringMatch {
                    regex: Some(r"^(.*;)?\s*canary=true(;.*)?$".into()),
                    ..Default::default()
                },
            )])),
            ..Default::default()
        };
        let mut user = User {
            tester: true,
            ..User::default()
        };
        user.remember("zz=1; Path=/");
        user.remember("aa=2");
        assert_eq!(user.request().headers["cookie"], "canary=true; aa=2; zz=1");
        assert!(request_matches(&m, &user.request(), &mut regexes));
        user.tester = false;
        assert!(!request_matches(&m, &user.request(), &mut regexes));
        assert!(!request_matches(
            &m,
            &User::default().request(),
            &mut regexes
        ));
    }

    #[test]
    fn string_matches_are_exact_prefix_or_full_regex() {
        let mut regexes = RegexCache::default();
        let exact = StringMatch {
            exact: Some("premium".into()),
            ..Default::default()
        };
        let prefix = StringMatch {
            prefix: Some("/webapi".into()),
            ..Default::default()
        };
        let regex = StringMatch {
            regex: Some("canary=tr".into()),
            ..Default::default()
        };
        let broken = StringMatch {
            regex: Some("(".into()),
            ..Default::default()
        };
        assert!(string_matches(&exact, "premium", &mut regexes));
        assert!(!string_matches(&exact, "premium+", &mut regexes));
        assert!(string_matches(&prefix, "/webapi/chat", &mut regexes));
        assert!(!string_matches(&prefix, "/chat", &mut regexes));
        // Envoy's safe_regex must match the whole value.
        assert!(!string_matches(&regex, "canary=true", &mut regexes));
        assert!(string_matches(&regex, "canary=tr", &mut regexes));
        assert!(!string_matches(&broken, "(", &mut regexes));
    }

    #[test]
    fn a_match_needs_uri_and_every_header_and_query_parameter() {
        let mut regexes = RegexCache::default();
        let m: HttpMatch = serde_json::from_value(json!({
            "headers": {"x-user-tier": {"exact": "premium"}},
            "uri": {"prefix": "/webapi"}
        }))
        .unwrap();
        let mut request = User::default().request();
        assert!(!request_matches(&m, &request, &mut regexes));
        request
            .headers
            .insert("x-user-tier".into(), "premium".into());
        assert!(request_matches(&m, &request, &mut regexes));
        request.path = "/other".into();
        assert!(!request_matches(&m, &request, &mut regexes));
        let q: HttpMatch =
            serde_json::from_value(json!({"queryParams": {"beta": {"exact": "1"}}})).unwrap();
        assert!(!request_matches(&q, &request, &mut regexes));
        request.query.insert("beta".into(), "1".into());
        assert!(request_matches(&q, &request, &mut regexes));
    }

    /// The subset each user was served by, across all their requests.
    fn versions_per_user(
        mesh: &MeshState,
        simulator: &mut Simulator,
        requests: usize,
        rng: &mut SimRng,
        seen: &mut BTreeMap<usize, BTreeSet<String>>,
    ) {
        let service = &mesh.virtual_services[0];
        let key = ("chat".to_string(), "lobe-chat".to_string());
        let pool = simulator
            .users
            .entry(key)
            .or_insert_with(|| UserPool::new(200, 0.0));
        for _ in 0..requests {
            let (i, user) = pool.pick(rng);
            let record =
                simulate_request(mesh, service, user, rng, &mut simulator.regexes).unwrap();
            seen.entry(i).or_default().insert(record.workload);
        }
    }

    #[test]
    fn a_sticky_cookie_keeps_each_user_on_one_version_both_ways() {
        let release = tester_release(true);
        let pods = healthy_pods();
        let mut simulator = Simulator::new(no_testers());
        let mut rng = rng();
        let mut seen = BTreeMap::new();
        let at_50 = state(&release, &routes(50, true), &pods);
        versions_per_user(&at_50, &mut simulator, 4_000, &mut rng, &mut seen);
        // Later steps move the split; users who already have a cookie stay where they are.
        let at_5 = state(&release, &routes(5, true), &pods);
        versions_per_user(&at_5, &mut simulator, 4_000, &mut rng, &mut seen);
        let at_100 = state(&release, &routes(100, true), &pods);
        versions_per_user(&at_100, &mut simulator, 4_000, &mut rng, &mut seen);

        let mut on = BTreeMap::<String, usize>::new();
        for (user, versions) in &seen {
            assert_eq!(versions.len(), 1, "user {user} saw {versions:?}");
            *on.entry(versions.iter().next().unwrap().clone())
                .or_default() += 1;
        }
        let stable = on["lobe-chat-stable"];
        let canary = on["lobe-chat-canary"];
        assert_eq!(stable + canary, 200);
        assert!(
            stable > 60 && canary > 60,
            "stable {stable}, canary {canary}"
        );
        let pool = simulator.users_of("chat", "lobe-chat").unwrap();
        assert!(
            pool.users()
                .iter()
                .all(|u| u.cookies.contains_key("chat-version"))
        );
    }

    #[test]
    fn after_a_rollback_canary_cookie_holders_return_to_stable_and_are_re_pinned() {
        let release = tester_release(true);
        let pods = healthy_pods();
        let mut simulator = Simulator::new(no_testers());
        let mut rng = rng();
        let at_100 = state(&release, &routes(100, true), &pods);
        simulator.tick(&at_100, 2_000, &mut rng);
        let rolled_back = state(&release, &routes(0, false), &pods);
        let report = simulator.tick(&rolled_back, 2_000, &mut rng);
        assert_eq!(
            count_by_workload(&report),
            BTreeMap::from([("lobe-chat-stable".to_string(), 2_000)])
        );
        let pool = simulator.users_of("chat", "lobe-chat").unwrap();
        let pinned: BTreeSet<_> = pool
            .users()
            .iter()
            .filter_map(|u| u.cookies.get("chat-version").cloned())
            .collect();
        assert!(pinned.contains(STABLE_REV));
    }

    #[test]
    fn a_subset_with_no_ready_pods_answers_503_under_its_workload() {
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
        let mesh = state(&release, &routes(100, true), &pods);
        let report = Simulator::new(no_testers()).tick(&mesh, 100, &mut rng());
        assert_eq!(report.records.len(), 100);
        for r in &report.records {
            assert_eq!(
                (r.workload.as_str(), r.response_code),
                ("lobe-chat-canary", 503)
            );
            assert_eq!(r.ttft_seconds, None);
        }
    }

    #[test]
    fn a_subset_with_no_pods_at_all_answers_503_under_the_operators_workload_name() {
        let mesh = state(&plain_release(), &routes(100, true), &[]);
        let report = Simulator::new(no_testers()).tick(&mesh, 5, &mut rng());
        assert!(
            report
                .records
                .iter()
                .all(|r| r.workload == "lobe-chat-canary" && r.response_code == 503)
        );
    }

    #[test]
    fn pods_of_another_release_with_the_same_track_are_not_endpoints() {
        let mut other = pod("other-canary-5d8f9c7b6-x", "canary", true, &[]);
        other
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_NAME.into(), "other".into());
        let pods = vec![
            pod("lobe-chat-stable-5d8f9c7b6-a", "stable", true, &[]),
            other,
        ];
        let mesh = state(&plain_release(), &routes(100, true), &pods);
        let report = Simulator::new(no_testers()).tick(&mesh, 5, &mut rng());
        assert!(report.records.iter().all(|r| r.response_code == 503));
    }

    #[test]
    fn an_unknown_service_or_subset_is_unrouted() {
        let release = plain_release();
        let mut mesh = state(&release, &routes(5, true), &healthy_pods());
        mesh.destination_rules.clear();
        let report = Simulator::new(no_testers()).tick(&mesh, 50, &mut rng());
        assert_eq!((report.records.len(), report.unrouted), (0, 50));
        let mut mesh = state(&release, &routes(5, true), &healthy_pods());
        mesh.services.clear();
        let report = Simulator::new(no_testers()).tick(&mesh, 50, &mut rng());
        assert_eq!((report.records.len(), report.unrouted), (0, 50));
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
    fn behaviour_defaults_and_unusable_values() {
        let (b, problems) = Behaviour::of_pod(&pod("p", "stable", true, &[]));
        assert_eq!(b, Behaviour::default());
        assert_eq!(
            (
                b.error_rate,
                b.provider_error_rate,
                b.latency_ms,
                b.ttft_seconds
            ),
            (0.0, 0.0, 200.0, 0.4)
        );
        assert!(problems.is_empty());
        let (b, problems) = Behaviour::of_pod(&pod(
            "p",
            "stable",
            true,
            &[
                (ENV_ERROR_RATE, "lots"),
                (ENV_PROVIDER_ERROR_RATE, "1.5"),
                (ENV_LATENCY_MS, " 900 "),
                (ENV_TTFT_SECONDS, "-1"),
            ],
        ));
        assert_eq!(
            b,
            Behaviour {
                latency_ms: 900.0,
                ..Behaviour::default()
            }
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("SIM_ERROR_RATE=\"lots\""),
            "{problems:?}"
        );
    }

    #[test]
    fn only_the_first_container_sets_the_behaviour() {
        let mut p = pod("p", "stable", true, &[]);
        let spec = p.spec.as_mut().unwrap();
        let mut sidecar = spec.containers[0].clone();
        sidecar.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: ENV_ERROR_RATE.into(),
            value: Some("1".into()),
            ..Default::default()
        }]);
        spec.containers.push(sidecar);
        assert_eq!(Behaviour::of_pod(&p).0, Behaviour::default());
    }

    #[test]
    fn provider_outage_reads_the_config_map_key() {
        let cm = |data: Value| -> ConfigMap {
            serde_json::from_value(
                json!({"metadata": {"name": CONFIG_MAP_NAME, "namespace": "chat"}, "data": data}),
            )
            .unwrap()
        };
        assert_eq!(
            provider_outage(&cm(json!({"providerErrorRate": "0.12"}))),
            Ok(Some(0.12))
        );
        assert_eq!(provider_outage(&cm(json!({}))), Ok(None));
        assert!(provider_outage(&cm(json!({"providerErrorRate": "12%"}))).is_err());
    }

    // --- Names ---

    #[test]
    fn the_workload_of_a_deployments_pod_is_the_deployment() {
        assert_eq!(
            workload_name(&pod("lobe-chat-canary-5d8f9c7b6-c", "canary", true, &[])),
            "lobe-chat-canary"
        );
        let mut p = pod("x", "canary", true, &[]);
        // A ReplicaSet of its own, not a Deployment's: its name stands.
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("pod-template-hash");
        assert_eq!(workload_name(&p), "lobe-chat-canary-5d8f9c7b6");
        let owners = p.metadata.owner_references.as_mut().unwrap();
        owners[0].kind = "StatefulSet".into();
        owners[0].name = "chat-db".into();
        assert_eq!(workload_name(&p), "chat-db");
        p.metadata.owner_references = None;
        assert_eq!(workload_name(&p), "x");
    }

    #[test]
    fn readiness_needs_ready_true_and_no_deletion() {
        assert!(is_ready(&pod("p", "stable", true, &[])));
        assert!(!is_ready(&pod("p", "stable", false, &[])));
        let mut no_status = pod("p", "stable", true, &[]);
        no_status.status = None;
        assert!(!is_ready(&no_status));
    }

    #[test]
    fn short_hosts_are_services_of_the_rules_namespace() {
        assert_eq!(
            service_fqdn("lobe-chat", "chat"),
            "lobe-chat.chat.svc.cluster.local"
        );
        assert_eq!(
            service_fqdn("lobe-chat.chat.svc.cluster.local", "other"),
            "lobe-chat.chat.svc.cluster.local"
        );
        assert_eq!(
            split_fqdn("lobe-chat.chat.svc.cluster.local"),
            Some(("lobe-chat", "chat"))
        );
        assert_eq!(split_fqdn("chat.example.com"), None);
    }

    #[test]
    fn hand_written_virtual_services_without_names_ports_or_subsets_still_route() {
        let vs = virtual_service_from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "lobe-chat", "namespace": "chat"},
            "spec": {"hosts": ["lobe-chat"], "http": [{"route": [{"destination": {"host": "lobe-chat"}}]}]}
        }))
        .unwrap();
        let mut mesh = state(&plain_release(), &routes(0, false), &healthy_pods());
        mesh.virtual_services = vec![vs];
        let report = Simulator::new(no_testers()).tick(&mesh, 3_000, &mut rng());
        let counts = count_by_workload(&report);
        assert_eq!(counts.values().sum::<usize>(), 3_000);
        // Two stable pods and one canary pod behind the whole Service.
        let canary = counts["lobe-chat-canary"] as f64 / 3_000.0;
        assert!((canary - 1.0 / 3.0).abs() < 0.04, "{canary}");
        assert!(virtual_service_from_value(json!({"spec": {"http": [{"route": 3}]}})).is_err());
    }

    #[test]
    fn the_rate_carries_fractions_between_ticks() {
        let mut simulator = Simulator::new(TrafficConfig::default());
        assert_eq!(simulator.requests_for(Duration::from_millis(100)), 4);
        let mut slow = Simulator::new(TrafficConfig {
            rps: 5.0,
            ..TrafficConfig::default()
        });
        let total: u32 = (0..10)
            .map(|_| slow.requests_for(Duration::from_millis(100)))
            .sum();
        assert_eq!(total, 5);
        assert_eq!(simulator.requests_for(Duration::from_secs(3600)), 400);
    }

    #[test]
    fn invalid_traffic_options_name_the_flag() {
        let bad = TrafficConfig {
            tester_share: 1.5,
            ..TrafficConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid --tester-share: must be between 0 and 1"
        );
        for (bad, flag) in [
            (
                TrafficConfig {
                    rps: -1.0,
                    ..TrafficConfig::default()
                },
                "--rps",
            ),
            (
                TrafficConfig {
                    rps: f64::NAN,
                    ..TrafficConfig::default()
                },
                "--rps",
            ),
            (
                TrafficConfig {
                    rps: 1e9,
                    ..TrafficConfig::default()
                },
                "--rps",
            ),
            (
                TrafficConfig {
                    tick: Duration::ZERO,
                    ..TrafficConfig::default()
                },
                "--tick",
            ),
            (
                TrafficConfig {
                    users: 0,
                    ..TrafficConfig::default()
                },
                "--users",
            ),
        ] {
            let message = bad.validate().unwrap_err().to_string();
            assert!(
                message.starts_with(&format!("invalid {flag}: ")),
                "{message}"
            );
        }
        assert!(TrafficConfig::default().validate().is_ok());
    }

    #[test]
    fn a_removed_virtual_service_forgets_its_users() {
        let mut mesh = state(&plain_release(), &routes(5, true), &healthy_pods());
        let mut simulator = Simulator::new(no_testers());
        simulator.tick(&mesh, 1, &mut rng());
        assert!(simulator.users_of("chat", "lobe-chat").is_some());
        mesh.virtual_services.clear();
        simulator.tick(&mesh, 1, &mut rng());
        assert!(simulator.users_of("chat", "lobe-chat").is_none());
    }

    // --- Metrics ---

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
        assert_eq!(buckets, DURATION_BUCKETS_MS.len() + 1);
    }

    // --- The server, end to end without a cluster ---

    async fn http_get(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: meshsim\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn metrics_of_simulated_traffic_are_scraped_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(MeshMetrics::new());
        let mut pods = healthy_pods();
        pods.push(pod(
            "lobe-chat-canary-5d8f9c7b6-e",
            "canary",
            true,
            &[(ENV_PROVIDER_ERROR_RATE, "1")],
        ));
        let mesh = state(&plain_release(), &routes(50, true), &pods);
        let config = TrafficConfig {
            rps: 200.0,
            tick: Duration::from_millis(50),
            ..TrafficConfig::default()
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut rng = rng();
        let scrape = async {
            let health = http_get(address, "/healthz").await;
            assert!(health.starts_with("HTTP/1.1 200"), "{health}");
            let missing = http_get(address, "/nothing").await;
            assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
            let wanted = [
                r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-canary",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="200"}"#,
                r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-stable",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="200"}"#,
                r#"chat_time_to_first_token_seconds_count{namespace="chat",workload="lobe-chat-stable"}"#,
            ];
            let provider_error = r#"destination_workload="lobe-chat-canary",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="47"#;
            let started = Instant::now();
            let body = loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let response = http_get(address, "/metrics").await;
                assert!(response.starts_with("HTTP/1.1 200"), "{response}");
                assert!(
                    response.contains("content-type: application/openmetrics-text"),
                    "{response}"
                );
                let done = started.elapsed() > Duration::from_secs(1)
                    && wanted.iter().all(|w| response.contains(w))
                    && response.contains(provider_error);
                if done || started.elapsed() > Duration::from_secs(10) {
                    break response;
                }
            };
            let _ = stop.send(true);
            body
        };
        let (body, (), ()) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                scrape,
                serve_metrics(listener, metrics.clone(), stopped(stop_rx.clone())),
                drive_traffic(
                    || mesh.clone(),
                    metrics.clone(),
                    Simulator::new(config),
                    &mut rng,
                    stopped(stop_rx),
                ),
            )
        })
        .await
        .expect("the simulator did not stop within 20 s");
        for w in [
            r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-canary""#,
            r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-stable""#,
            "chat_time_to_first_token_seconds_count",
            "response_code=\"47",
        ] {
            assert!(body.contains(w), "no {w} in\n{body}");
        }
        // ~1 s at 200 rps: a few hundred requests, counted once each.
        let total: f64 = body
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(total >= 150.0, "only {total} requests in\n{body}");
    }
}
