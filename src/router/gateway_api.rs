//! The Gateway API as a traffic router: the HTTPRoute `<name>` that splits traffic between the
//! Services `<name>-stable` and `<name>-canary` (an HTTPRoute has no subsets, so each track is a
//! Service of its own), built by pure functions.
//!
//! The types hold only the fields the operator writes or reads, checked against the standard
//! channel's `gateway.networking.k8s.io/v1` CRD of `sigs.k8s.io/gateway-api` v1.6. The builder
//! refuses, naming the field at fault, whatever that CRD's schema or CEL rules would refuse, so the
//! API server never answers a write with 422.
//!
//! List order alone does not decide between the rules of an HTTPRoute: the Gateway API ranks every
//! match (exact path, then the longest path prefix, a method, the most headers, the most query
//! parameters) and falls back to list order only on ties. The rules are built so that ranking and
//! list order agree with Istio's first-match order: canaryMatch, then the cookies, then the split.

use crate::annotations::LABEL_TRACK;
use crate::applied::Applied;
use crate::crd::{ChatRelease, GatewayApiTraffic, HttpMatch, StringMatch};
use crate::error::Error;
use crate::metrics::BoxFuture;
use crate::router::istio;
use crate::router::{Routes, TrafficRouter};
use crate::settings::SpecError;
use crate::traffic_rules;
use crate::workload::{self, Track};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// Rule of the canaryMatch requests (testers); one rule, each canaryMatch entry a match of it.
pub const CANARY_MATCH_RULE: &str = "canary-match";
/// Rule for holders of the canary's cookie.
pub const STICKY_CANARY_RULE: &str = "sticky-canary";
/// Rule for holders of the stable's cookie.
pub const STICKY_STABLE_RULE: &str = "sticky-stable";
/// The weighted split, the last rule.
pub const PRIMARY_RULE: &str = "primary";
/// Header the sticky cookie is read from. Header names match case-insensitively.
pub const COOKIE_HEADER: &str = "cookie";
/// Header each backend of the split adds to its responses when a sticky cookie is set.
pub const SET_COOKIE_HEADER: &str = "set-cookie";

// Limits of the v1.6 standard-channel CRD (schema and CEL), as the builder enforces them.
/// `spec.rules`: maxItems.
pub const MAX_RULES: usize = 16;
/// `spec.rules[].matches`: maxItems.
pub const MAX_MATCHES_PER_RULE: usize = 64;
/// `spec.rules`, CEL: matches of all rules together.
pub const MAX_MATCHES: usize = 128;
/// `matches[].headers` and `matches[].queryParams`: maxItems.
pub const MAX_CONDITIONS: usize = 16;
/// `spec.parentRefs`: maxItems.
pub const MAX_PARENT_REFS: usize = 32;
/// `spec.hostnames`: maxItems.
pub const MAX_HOSTNAMES: usize = 16;
/// `headers[].value`: maxLength.
pub const MAX_HEADER_VALUE: usize = 4096;
/// `queryParams[].value` and `path.value`: maxLength.
pub const MAX_QUERY_OR_PATH_VALUE: usize = 1024;
/// Header and query parameter names: maxLength.
pub const MAX_MATCH_NAME: usize = 256;
/// The longest ChatRelease name whose `<name>-stable` and `<name>-canary` are Service names (DNS
/// labels of at most 63 characters).
pub const MAX_RELEASE_NAME: usize = 63 - "-stable".len();

/// The parts of the Gateway API's HTTPRoute spec the operator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    root = "HttpRoute",
    plural = "httproutes",
    namespaced,
    status = "HttpRouteStatus",
    // The Gateway API owns and installs this CRD; we only need the Rust type to talk to the API.
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Gateways (north-south) or Services (east-west, GAMMA) the route attaches to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    /// Host names the route answers for; none means every host name of its parents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// The rules, ranked by their matches (see the module's documentation).
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// A Gateway (or, for GAMMA, a Service) a route attaches to: the ChatRelease's own field, which
/// has the Gateway API's shape and limits.
pub use crate::crd::ParentReference;

/// Matches (any one selects the rule), filters and backends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Shown in the implementation's stats and status; unique within the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// None means the API server's default: path prefix `/`, every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters for every request of the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// Conditions that must all hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// None means the API server's default: path prefix `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpQueryParamMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
}

/// How a path is compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathMatchType {
    Exact,
    /// Whole path segments: `/chat` matches `/chat` and `/chat/x`, not `/chatty`.
    PathPrefix,
    /// Implementation-specific (dialect, and how it ranks against other paths).
    RegularExpression,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HttpPathMatch {
    #[serde(rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

/// How a header or query parameter value is compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ValueMatchType {
    /// The API server's default.
    #[default]
    Exact,
    /// Implementation-specific: not every implementation has it.
    RegularExpression,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HttpHeaderMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// Compared case-insensitively.
    pub name: String,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HttpQueryParamMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// Compared case-sensitively.
    pub name: String,
    pub value: String,
}

/// The methods a match may name (the CRD's enum).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    pub const ALL: [HttpMethod; 9] = [
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Delete,
        HttpMethod::Connect,
        HttpMethod::Options,
        HttpMethod::Trace,
        HttpMethod::Patch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Connect => "CONNECT",
            HttpMethod::Options => "OPTIONS",
            HttpMethod::Trace => "TRACE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// The filter kinds the operator writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpRouteFilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
}

/// A filter: its `type` and the one field of that type (the CRD's CEL rules refuse any other
/// pairing, so build it with [`HttpRouteFilter::request_headers`] or
/// [`HttpRouteFilter::response_headers`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: HttpRouteFilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HttpHeaderFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HttpHeaderFilter>,
}

impl HttpRouteFilter {
    /// Changes the request's headers before it is forwarded.
    pub fn request_headers(modifier: HttpHeaderFilter) -> Self {
        Self {
            kind: HttpRouteFilterType::RequestHeaderModifier,
            request_header_modifier: Some(modifier),
            response_header_modifier: None,
        }
    }

    /// Changes the response's headers before it is returned.
    pub fn response_headers(modifier: HttpHeaderFilter) -> Self {
        Self {
            kind: HttpRouteFilterType::ResponseHeaderModifier,
            request_header_modifier: None,
            response_header_modifier: Some(modifier),
        }
    }
}

/// Header changes: `set` replaces, `add` appends to what is there, `remove` drops by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpHeaderFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

/// A backend (here always a Service), its weight among the rule's backends and its own filters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// Default `""` (the core group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Default `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Default: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Required for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    /// A proportion, not a percentage; default 1, and 0 sends nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    /// Run only for requests sent to this backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

/// What the implementations report; the operator only reads it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteStatus {
    /// One entry per parent and implementation that looked at the route.
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentReference,
    /// The implementation, such as `gateway.envoyproxy.io/gatewayclass-controller`.
    pub controller_name: String,
    /// `Accepted`, `ResolvedRefs` and the implementation's own.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl HttpRouteStatus {
    /// Why a parent does not serve the route as written, one line each: its `Accepted` or
    /// `ResolvedRefs` condition is not True (a listener that does not allow the route, a backend
    /// Service that does not exist). Conditions observed for another generation than `generation`
    /// say nothing about the route as it is now and are skipped.
    pub fn problems(&self, generation: Option<i64>) -> Vec<String> {
        let mut out = Vec::new();
        for parent in &self.parents {
            for condition in &parent.conditions {
                let current = match (generation, condition.observed_generation) {
                    (Some(want), Some(seen)) => want == seen,
                    _ => true,
                };
                let matters = matches!(condition.type_.as_str(), "Accepted" | "ResolvedRefs");
                if current && matters && condition.status != "True" {
                    out.push(format!(
                        "{} {}: {} is {} ({}): {}",
                        describe_parent(&parent.parent_ref),
                        parent.controller_name,
                        condition.type_,
                        condition.status,
                        condition.reason,
                        condition.message
                    ));
                }
            }
        }
        out
    }
}

fn describe_parent(parent: &ParentReference) -> String {
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let name = match &parent.namespace {
        Some(namespace) => format!("{namespace}/{}", parent.name),
        None => parent.name.clone(),
    };
    match &parent.section_name {
        Some(section) => format!("{kind} {name} (listener {section})"),
        None => format!("{kind} {name}"),
    }
}

/// Where the HTTPRoute attaches, as `spec.traffic.gatewayAPI` holds it: its parents and host
/// names. No parents means the mesh (GAMMA): [`mesh_parent_ref`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Attachment {
    pub parent_refs: Vec<ParentReference>,
    pub hostnames: Vec<String>,
}

impl From<&GatewayApiTraffic> for Attachment {
    fn from(traffic: &GatewayApiTraffic) -> Self {
        Self {
            parent_refs: traffic.parent_refs.clone(),
            hostnames: traffic.hostnames.clone(),
        }
    }
}

/// The Service `<name>` as the route's parent, which makes it a GAMMA route: the mesh applies it
/// to every call to that Service. The Gateway API's counterpart of Istio's default (the mesh, for
/// the Service's in-cluster name).
pub fn mesh_parent_ref(release: &ChatRelease) -> ParentReference {
    ParentReference {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name: release.name_any(),
        ..Default::default()
    }
}

/// `<name>-stable` or `<name>-canary`: the Service of one track, a backend of the route.
pub fn track_service_name(release: &ChatRelease, track: Track) -> String {
    track.workload_name(&release.name_any())
}

/// The Service of one track: the same port as Service `<name>`, selecting only the pods of `track`
/// (by the labels the track's Deployment puts on its pods).
pub fn track_service(release: &ChatRelease, track: Track) -> Service {
    let mut service = workload::service(release);
    service.metadata = workload::owned_meta(release, track_service_name(release, track));
    if let Some(labels) = service.metadata.labels.as_mut() {
        labels.insert(LABEL_TRACK.to_string(), track.as_str().to_string());
    }
    if let Some(spec) = service.spec.as_mut() {
        spec.selector = Some(workload::selector_labels(release, track));
    }
    service
}

/// Everything the builders refuse for `release` and `attachment`, before any write: what
/// [`http_route`] would refuse in any phase of a rollout, and a name too long for the track
/// Services. Field paths are below `spec`.
pub fn check(release: &ChatRelease, attachment: &Attachment) -> Result<(), SpecError> {
    let name = release.name_any();
    if name.len() > MAX_RELEASE_NAME {
        return Err(refuse(
            "traffic.gatewayAPI",
            format!(
                "the ChatRelease's name {name:?} is {} characters long; with the Gateway API each \
                 track is a Service <name>-stable / <name>-canary, whose name may have at most 63, \
                 so the ChatRelease's at most {MAX_RELEASE_NAME}: choose a shorter name or route \
                 with traffic.istio",
                name.len()
            ),
        ));
    }
    check_attachment(attachment)?;
    canary_matches(release).map(|_| ())
}

/// The HTTPRoute `<name>` for `routes`: the canaryMatch rule (while `canary_routes`), then the
/// sticky-cookie rules, then the weighted split `primary` between the two track Services, each
/// backend adding its `set-cookie` when `stickyCookie` is set. The same rules and cookies as
/// Istio's VirtualService ([`istio::virtual_service`]). Refuses what the Gateway API's CRD would.
pub fn http_route(
    release: &ChatRelease,
    attachment: &Attachment,
    routes: &Routes,
) -> Result<HttpRoute, SpecError> {
    check_attachment(attachment)?;
    let traffic = &release.spec.traffic;
    // The rollout only asks for 0..=100; clamping keeps a bad value from producing negative weights.
    let canary_weight = routes.canary_weight.clamp(0, 100);
    let sticky = traffic.sticky_cookie.as_deref();
    let stable_cookie = sticky.zip(routes.stable_revision.as_deref());
    // A cookie must name one version; with equal revisions stable serves it.
    let canary_cookie = sticky
        .zip(routes.canary_revision.as_deref())
        .filter(|_| routes.canary_revision != routes.stable_revision);
    // Translated in every phase, so a canaryMatch the Gateway API cannot say is refused while the
    // release is Stable, not at the first step of the next canary.
    let testers = canary_matches(release)?;
    let mut rules = Vec::new();

    if routes.canary_routes && !testers.is_empty() {
        let mut matches = Vec::new();
        for tester in testers {
            // A tester match that ranks below the cookie rules would lose a tester holding the
            // stable's cookie to stable; the same match with that cookie ranks above them.
            let with_cookie = stable_cookie
                .filter(|_| ranks_below_a_cookie_match(&tester))
                .map(|(cookie, revision)| {
                    let mut m = tester.clone();
                    m.headers.push(cookie_header_match(cookie, revision));
                    m
                });
            matches.push(tester);
            matches.extend(with_cookie);
        }
        rules.push(rule(
            CANARY_MATCH_RULE,
            matches,
            vec![backend_ref(release, Track::Canary, 100, None)],
        ));
    }
    if let Some((cookie, revision)) = canary_cookie
        && routes.canary_routes
    {
        rules.push(rule(
            STICKY_CANARY_RULE,
            vec![cookie_match(cookie, revision)],
            vec![backend_ref(release, Track::Canary, 100, None)],
        ));
    }
    if let Some((cookie, revision)) = stable_cookie {
        rules.push(rule(
            STICKY_STABLE_RULE,
            vec![cookie_match(cookie, revision)],
            vec![backend_ref(release, Track::Stable, 100, None)],
        ));
    }
    // Whoever the split sends somewhere is told so, and the cookie rules keep them there.
    let set_cookie = |(cookie, revision): (&str, &str)| istio::set_cookie_value(cookie, revision);
    rules.push(rule(
        PRIMARY_RULE,
        Vec::new(),
        vec![
            backend_ref(
                release,
                Track::Stable,
                100 - canary_weight,
                stable_cookie.map(set_cookie),
            ),
            backend_ref(
                release,
                Track::Canary,
                canary_weight,
                sticky
                    .zip(routes.canary_revision.as_deref())
                    .map(set_cookie),
            ),
        ],
    ));
    check_counts(&rules)?;

    let parent_refs = if attachment.parent_refs.is_empty() {
        vec![mesh_parent_ref(release)]
    } else {
        attachment.parent_refs.clone()
    };
    Ok(HttpRoute {
        metadata: workload::owned_meta(release, release.name_any()),
        spec: HttpRouteSpec {
            parent_refs,
            hostnames: attachment.hostnames.clone(),
            rules,
        },
        status: None,
    })
}

fn rule(name: &str, matches: Vec<HttpRouteMatch>, backends: Vec<HttpBackendRef>) -> HttpRouteRule {
    HttpRouteRule {
        name: Some(name.to_string()),
        matches,
        filters: Vec::new(),
        backend_refs: backends,
    }
}

/// The track's Service at the Service port, with `weight`; `set_cookie` adds that header to its
/// responses (appended, so the app's own cookies survive).
fn backend_ref(
    release: &ChatRelease,
    track: Track,
    weight: i32,
    set_cookie: Option<String>,
) -> HttpBackendRef {
    let filters = set_cookie
        .map(|value| {
            HttpRouteFilter::response_headers(HttpHeaderFilter {
                add: vec![HttpHeader {
                    name: SET_COOKIE_HEADER.to_string(),
                    value,
                }],
                ..Default::default()
            })
        })
        .into_iter()
        .collect();
    HttpBackendRef {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name: track_service_name(release, track),
        namespace: None,
        port: Some(release.spec.service.port),
        weight: Some(weight),
        filters,
    }
}

/// The Cookie header holding `cookie=revision`, by Istio's regex (full-match RE2).
fn cookie_header_match(cookie: &str, revision: &str) -> HttpHeaderMatch {
    HttpHeaderMatch {
        kind: ValueMatchType::RegularExpression,
        name: COOKIE_HEADER.to_string(),
        value: istio::cookie_regex(cookie, revision),
    }
}

fn cookie_match(cookie: &str, revision: &str) -> HttpRouteMatch {
    HttpRouteMatch {
        headers: vec![cookie_header_match(cookie, revision)],
        ..Default::default()
    }
}

/// Whether a cookie match (path prefix `/`, one header) outranks `m` in the Gateway API's
/// precedence, or ties with it only by the implementation's choice: `m` has no exact path, no path
/// prefix longer than `/`, no method and no header (so at most query parameters or a regex path,
/// whose rank is implementation-specific).
fn ranks_below_a_cookie_match(m: &HttpRouteMatch) -> bool {
    let strong_path = m.path.as_ref().is_some_and(|p| match p.kind {
        PathMatchType::Exact => true,
        PathMatchType::PathPrefix => !p.value.trim_end_matches('/').is_empty(),
        PathMatchType::RegularExpression => false,
    });
    !strong_path && m.method.is_none() && m.headers.is_empty()
}

/// The `spec.rules` limits of the CRD: rules, matches a rule, and (CEL) matches of all rules, where
/// a rule without matches gets the API server's default one.
fn check_counts(rules: &[HttpRouteRule]) -> Result<(), SpecError> {
    let per_rule = |r: &HttpRouteRule| r.matches.len().max(1);
    let total: usize = rules.iter().map(per_rule).sum();
    let widest = rules.iter().map(per_rule).max().unwrap_or(0);
    if rules.len() > MAX_RULES || widest > MAX_MATCHES_PER_RULE || total > MAX_MATCHES {
        return Err(refuse(
            "traffic.canaryMatch",
            format!(
                "makes {} rules with {total} matches (at most {widest} in one) in the HTTPRoute; \
                 the Gateway API takes at most {MAX_RULES} rules, {MAX_MATCHES_PER_RULE} matches \
                 a rule and {MAX_MATCHES} in all: list fewer entries",
                rules.len()
            ),
        ));
    }
    Ok(())
}

fn refuse(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

// ---- canaryMatch, from Istio's HTTPMatchRequest to the Gateway API's HTTPRouteMatch ----

/// The canaryMatch entries as HTTPRoute matches, in order. An entry that holds for every request
/// is left out, as from the VirtualService (settings refuse it before any write). Istio compares
/// regexes with the whole value, some implementations search in it: each regex is anchored, `^(…)$`,
/// so both read it as Istio does. A prefix of a header or query value becomes such a regex (the
/// Gateway API has no prefix there); a uri prefix becomes a `PathPrefix`, which matches whole path
/// segments (`/chat` no longer matches `/chatty`). A `:method` exact match becomes `method`.
pub fn canary_matches(release: &ChatRelease) -> Result<Vec<HttpRouteMatch>, SpecError> {
    let mut out = Vec::new();
    for (i, m) in release.spec.traffic.canary_match.iter().enumerate() {
        if traffic_rules::matches_every_request(m).is_some() {
            continue;
        }
        out.push(translate(&format!("traffic.canaryMatch[{i}]"), m)?);
    }
    Ok(out)
}

fn translate(field: &str, m: &HttpMatch) -> Result<HttpRouteMatch, SpecError> {
    let mut out = HttpRouteMatch::default();
    let headers = m.headers.iter().flatten();
    for (name, value) in headers {
        let here = key_path(&format!("{field}.headers"), name);
        if name == ":method" {
            out.method = Some(method(&here, value)?);
            continue;
        }
        if let Some(why) = header_name_problem(name) {
            return Err(refuse(here, why));
        }
        // The Gateway API reads only the first of two names that differ in case: the second
        // condition would be dropped, and the match would take more users than written.
        if let Some(twin) = out
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
        {
            return Err(refuse(
                here,
                format!(
                    "names the same header as {:?} (header names are case-insensitive), and the \
                     Gateway API would ignore one of the two: write one condition",
                    twin.name
                ),
            ));
        }
        let (kind, value) = value_match(&here, value, MAX_HEADER_VALUE)?;
        out.headers.push(HttpHeaderMatch {
            kind,
            name: name.clone(),
            value,
        });
    }
    if let Some(uri) = &m.uri {
        out.path = Some(path_match(&format!("{field}.uri"), uri)?);
    }
    for (name, value) in m.query_params.iter().flatten() {
        let here = key_path(&format!("{field}.queryParams"), name);
        if !is_token(name) {
            return Err(refuse(
                here,
                format!(
                    "{name:?} is not a query parameter name the Gateway API takes: 1 to \
                     {MAX_MATCH_NAME} letters, digits or !#$%&'*+-.^_`|~"
                ),
            ));
        }
        let (kind, value) = value_match(&here, value, MAX_QUERY_OR_PATH_VALUE)?;
        out.query_params.push(HttpQueryParamMatch {
            kind,
            name: name.clone(),
            value,
        });
    }
    for (count, what) in [
        (out.headers.len(), "headers"),
        (out.query_params.len(), "queryParams"),
    ] {
        if count > MAX_CONDITIONS {
            return Err(refuse(
                format!("{field}.{what}"),
                format!(
                    "has {count} conditions; the Gateway API takes at most {MAX_CONDITIONS} a match"
                ),
            ));
        }
    }
    Ok(out)
}

/// `map.key` for a readable key, `map["key"]` otherwise, as `traffic_rules` names them.
fn key_path(map: &str, key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@[]".contains(c))
    {
        format!("{map}.{key}")
    } else {
        format!("{map}[{key:?}]")
    }
}

/// Why the Gateway API cannot match on header `name`, if it cannot.
fn header_name_problem(name: &str) -> Option<String> {
    if traffic_rules::is_jwt_claim(name) {
        return Some(
            "is a JWT claim, and the Gateway API has no routing on JWT claims: match a header \
             your gateway sets from the token instead, or route with traffic.istio"
                .into(),
        );
    }
    match name {
        ":path" => {
            return Some(
                "the Gateway API has no match on the :path pseudo-header: write the path as uri"
                    .into(),
            );
        }
        ":authority" => {
            return Some(
                "the Gateway API has no match on the :authority pseudo-header: list the host \
                 names in traffic.gatewayAPI.hostnames"
                    .into(),
            );
        }
        _ => {}
    }
    if name.starts_with(':') {
        return Some(format!(
            "the Gateway API has no match on the {name} pseudo-header (only :method, as method)"
        ));
    }
    if !is_token(name) {
        return Some(format!(
            "{name:?} is not a header name the Gateway API takes: 1 to {MAX_MATCH_NAME} letters, \
             digits or !#$%&'*+-.^_`|~"
        ));
    }
    None
}

/// An HTTP token (RFC 7230) of at most 256 characters: the CRD's pattern for header and query
/// parameter names.
fn is_token(name: &str) -> bool {
    (1..=MAX_MATCH_NAME).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

/// `:method` matched exactly against one of the methods the Gateway API knows.
fn method(field: &str, m: &StringMatch) -> Result<HttpMethod, SpecError> {
    let known = HttpMethod::ALL
        .iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(exact) = &m.exact else {
        return Err(refuse(
            field,
            format!(
                "the Gateway API matches a method only exactly: write exact with one of {known} \
                 (one canaryMatch entry a method)"
            ),
        ));
    };
    HttpMethod::ALL
        .into_iter()
        .find(|m| m.as_str() == exact)
        .ok_or_else(|| {
            refuse(
                format!("{field}.exact"),
                format!("{exact:?} is not a method the Gateway API matches: one of {known}"),
            )
        })
}

/// A header or query parameter condition: exact stays exact (an empty one becomes `^$`, as the
/// Gateway API takes no empty value), prefix and regex become anchored regexes.
fn value_match(
    field: &str,
    m: &StringMatch,
    max: usize,
) -> Result<(ValueMatchType, String), SpecError> {
    let (key, kind, value) = match (&m.exact, &m.prefix, &m.regex) {
        (Some(exact), None, None) if exact.is_empty() => {
            ("exact", ValueMatchType::RegularExpression, "^$".to_string())
        }
        (Some(exact), None, None) => ("exact", ValueMatchType::Exact, exact.clone()),
        (None, Some(prefix), None) => (
            "prefix",
            ValueMatchType::RegularExpression,
            format!("^{}.*$", regex_literal(prefix)),
        ),
        (None, None, Some(regex)) => ("regex", ValueMatchType::RegularExpression, anchored(regex)),
        _ => return Err(refuse(field, "needs exactly one of exact, prefix or regex")),
    };
    check_length(&format!("{field}.{key}"), &value, max)?;
    Ok((kind, value))
}

fn path_match(field: &str, m: &StringMatch) -> Result<HttpPathMatch, SpecError> {
    let (key, kind, value) = match (&m.exact, &m.prefix, &m.regex) {
        (Some(exact), None, None) => ("exact", PathMatchType::Exact, exact.clone()),
        (None, Some(prefix), None) => ("prefix", PathMatchType::PathPrefix, prefix.clone()),
        (None, None, Some(regex)) => ("regex", PathMatchType::RegularExpression, anchored(regex)),
        _ => return Err(refuse(field, "needs exactly one of exact, prefix or regex")),
    };
    let here = format!("{field}.{key}");
    check_length(&here, &value, MAX_QUERY_OR_PATH_VALUE)?;
    if kind != PathMatchType::RegularExpression
        && let Some(why) = path_problem(&value)
    {
        return Err(refuse(
            here,
            format!("{value:?} is not a path the Gateway API takes: {why}"),
        ));
    }
    Ok(HttpPathMatch { kind, value })
}

/// The CRD's CEL rules on an Exact or PathPrefix path value.
fn path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("it must start with /");
    }
    for (bad, why) in [
        ("//", "it must not contain //"),
        ("/./", "it must not contain /./"),
        ("/../", "it must not contain /../"),
        ("%2f", "it must not contain %2f"),
        ("%2F", "it must not contain %2F"),
        ("#", "it must not contain #"),
    ] {
        if path.contains(bad) {
            return Some(why);
        }
    }
    if path.ends_with("/..") || path.ends_with("/.") {
        return Some("it must not end with /. or /..");
    }
    // ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return Some("a % must start an escape of two hex digits");
            }
            i += 3;
        } else if c.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&c) {
            i += 1;
        } else {
            return Some(
                "it may hold only letters, digits, -/._~!$&'()*+,;=:@ and %-escapes (%20)",
            );
        }
    }
    None
}

/// The CRD's maxLength, in characters as Kubernetes counts them.
fn check_length(field: &str, value: &str, max: usize) -> Result<(), SpecError> {
    let length = value.chars().count();
    if length > max {
        return Err(refuse(
            field,
            format!(
                "is {length} characters long as the HTTPRoute writes it (regexes anchored as \
                 ^(...)$); the Gateway API takes at most {max} here"
            ),
        ));
    }
    Ok(())
}

/// Anchored at both ends, so an implementation that searches compares the whole value, as Istio
/// does. A plain group: `(?:` is not in every regex dialect an implementation may use.
fn anchored(regex: &str) -> String {
    format!("^({regex})$")
}

/// `text` as a regex matching exactly it, escaping what is special in RE2, PCRE and POSIX.
fn regex_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// ---- parents and host names ----

/// The CRD's schema and CEL rules on `spec.parentRefs` and `spec.hostnames`.
fn check_attachment(attachment: &Attachment) -> Result<(), SpecError> {
    const PARENTS: &str = "traffic.gatewayAPI.parentRefs";
    let parents = &attachment.parent_refs;
    if parents.len() > MAX_PARENT_REFS {
        return Err(refuse(
            PARENTS,
            format!(
                "lists {} parents; the Gateway API takes at most {MAX_PARENT_REFS}",
                parents.len()
            ),
        ));
    }
    for (i, parent) in parents.iter().enumerate() {
        check_parent(&format!("{PARENTS}[{i}]"), parent)?;
    }
    // CEL: "sectionName must be specified when parentRefs includes 2 or more references to the
    // same parent" and "sectionName must be unique when ...".
    for (j, later) in parents.iter().enumerate() {
        let section = |p: &ParentReference| p.section_name.clone().filter(|s| !s.is_empty());
        if let Some(i) = parents[..j].iter().position(|earlier| {
            same_parent(earlier, later)
                && (section(earlier).is_none()
                    || section(later).is_none()
                    || section(earlier) == section(later))
        }) {
            return Err(refuse(
                format!("{PARENTS}[{j}].sectionName"),
                format!(
                    "names the same parent as {PARENTS}[{i}]: the Gateway API takes several \
                     references to one parent only when each names a listener (sectionName) of \
                     its own"
                ),
            ));
        }
    }

    const HOSTNAMES: &str = "traffic.gatewayAPI.hostnames";
    let hostnames = &attachment.hostnames;
    if hostnames.len() > MAX_HOSTNAMES {
        return Err(refuse(
            HOSTNAMES,
            format!(
                "lists {} host names; the Gateway API takes at most {MAX_HOSTNAMES}",
                hostnames.len()
            ),
        ));
    }
    for (i, host) in hostnames.iter().enumerate() {
        let name = host.strip_prefix("*.").unwrap_or(host);
        if host.len() > 253 || !is_dns_subdomain(name) {
            return Err(refuse(
                format!("{HOSTNAMES}[{i}]"),
                format!(
                    "{host:?} is not a host name the Gateway API takes: lower-case DNS labels \
                     (letters, digits, '-') joined by '.', at most 253 characters, a wildcard \
                     only as a first label \"*.\""
                ),
            ));
        }
    }
    Ok(())
}

fn check_parent(field: &str, parent: &ParentReference) -> Result<(), SpecError> {
    let bad = |key: &str, value: &str, rule: &str| {
        refuse(
            format!("{field}.{key}"),
            format!("{value:?} is not a {key} the Gateway API takes: {rule}"),
        )
    };
    if let Some(group) = &parent.group
        && !(group.is_empty() || (group.len() <= 253 && is_dns_subdomain(group)))
    {
        return Err(bad(
            "group",
            group,
            "empty (the core group) or a DNS subdomain such as gateway.networking.k8s.io",
        ));
    }
    if let Some(kind) = &parent.kind
        && !is_kind(kind)
    {
        return Err(bad(
            "kind",
            kind,
            "a kind such as Gateway or Service: a letter, then letters, digits or '-', at most 63",
        ));
    }
    if let Some(namespace) = &parent.namespace
        && !(namespace.len() <= 63 && is_dns_label(namespace))
    {
        return Err(bad(
            "namespace",
            namespace,
            "a DNS label: lower-case letters, digits and '-', at most 63",
        ));
    }
    if !(1..=253).contains(&parent.name.len()) {
        return Err(bad("name", &parent.name, "1 to 253 characters"));
    }
    if let Some(section) = &parent.section_name
        && !(section.len() <= 253 && is_dns_subdomain(section))
    {
        return Err(bad(
            "sectionName",
            section,
            "a listener's name: lower-case DNS labels joined by '.', at most 253 characters",
        ));
    }
    if let Some(port) = parent.port
        && !(1..=65535).contains(&port)
    {
        return Err(bad("port", &port.to_string(), "1 to 65535"));
    }
    Ok(())
}

/// Parents the CEL rules take for the same one: group and kind after the API server's defaults,
/// name, and namespace (unset and empty alike).
fn same_parent(a: &ParentReference, b: &ParentReference) -> bool {
    let group = |p: &ParentReference| p.group.clone().unwrap_or_else(|| GROUP.to_string());
    let kind = |p: &ParentReference| p.kind.clone().unwrap_or_else(|| "Gateway".to_string());
    let namespace = |p: &ParentReference| p.namespace.clone().unwrap_or_default();
    group(a) == group(b) && kind(a) == kind(b) && a.name == b.name && namespace(a) == namespace(b)
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`.
fn is_dns_label(label: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    label.starts_with(ok) && label.ends_with(ok) && label.chars().all(|c| ok(c) || c == '-')
}

/// DNS labels joined by `.` (the CRD's pattern; the length is checked apart).
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.split('.').all(is_dns_label)
}

/// `^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$`, at most 63.
fn is_kind(kind: &str) -> bool {
    kind.len() <= 63
        && kind.starts_with(|c: char| c.is_ascii_alphabetic())
        && kind.ends_with(|c: char| c.is_ascii_alphanumeric())
        && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The Gateway API router: the two track Services and the HTTPRoute `<name>`, each written with
/// one server-side apply, so a rollback is one HTTPRoute write.
pub struct GatewayApiRouter {
    client: kube::Client,
    applied: Arc<Applied>,
}

impl GatewayApiRouter {
    pub fn new(client: kube::Client) -> Self {
        Self::with_applied(client, Arc::default())
    }

    /// A router that writes through `client`, skipping what `applied` says is already there.
    pub fn with_applied(client: kube::Client, applied: Arc<Applied>) -> Self {
        Self { client, applied }
    }
}

fn attachment_of(release: &ChatRelease) -> Attachment {
    release
        .spec
        .traffic
        .gateway_api
        .as_ref()
        .map(Attachment::from)
        .unwrap_or_default()
}

impl TrafficRouter for GatewayApiRouter {
    fn check(&self, release: &ChatRelease) -> Result<(), SpecError> {
        check(release, &attachment_of(release))
    }

    fn reconcile<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let namespace = super::namespace_of(release)?;
            for track in [Track::Stable, Track::Canary] {
                let service = track_service(release, track);
                self.applied
                    .apply(&self.client, &namespace, &service)
                    .await?;
            }
            Ok(())
        })
    }

    fn set_routes<'a>(
        &'a self,
        release: &'a ChatRelease,
        routes: &'a Routes,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let namespace = super::namespace_of(release)?;
            let route = http_route(release, &attachment_of(release), routes)?;
            super::log_split(release, &namespace, routes);
            self.applied
                .apply(&self.client, &namespace, &route)
                .await
                .map(|_sent| ())
                .map_err(|error| {
                    super::unavailable_when_unknown(error, "gatewayAPI", HTTPROUTE_CRD)
                })
        })
    }

    fn remove<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let namespace = super::namespace_of(release)?;
            let name = release.name_any();
            super::delete_owned::<HttpRoute>(&self.client, &namespace, &name).await?;
            for track in [Track::Stable, Track::Canary] {
                let service = track_service_name(release, track);
                super::delete_owned::<Service>(&self.client, &namespace, &service).await?;
            }
            Ok(())
        })
    }
}

/// What the Gateway API router needs from the API server.
pub const HTTPROUTE_CRD: &str =
    "the Gateway API's HTTPRoute CRD (httproutes.gateway.networking.k8s.io, v1)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{LABEL_NAME, LABEL_REVISION, MANAGER};
    use crate::router::crd_schema::{self, Walk};
    use serde_json::{Value, json};
    use std::collections::{BTreeMap, BTreeSet};

    const STABLE_REV: &str = "aaaa111111";
    const CANARY_REV: &str = "bbbb222222";

    /// The fixtures' release (Service port 80) with `traffic`.
    fn release_with(traffic: Value) -> ChatRelease {
        let mut r = ChatRelease::test("v1");
        r.spec.traffic = serde_json::from_value(traffic).unwrap();
        r
    }

    fn release() -> ChatRelease {
        release_with(json!({}))
    }

    fn sticky_release() -> ChatRelease {
        release_with(json!({"stickyCookie": "chat-version"}))
    }

    /// Testers by cookie, by header with a path and a query parameter, and a sticky cookie.
    fn full_release() -> ChatRelease {
        release_with(json!({
            "canaryMatch": [
                {"headers": {"cookie": {"regex": "^(.*;)?\\s*canary=true(;.*)?$"}}},
                {"headers": {"x-user-tier": {"exact": "premium"}}, "uri": {"prefix": "/chat"},
                 "queryParams": {"beta": {"exact": "1"}}}
            ],
            "stickyCookie": "chat-version"
        }))
    }

    fn routes(canary_weight: i32, canary_routes: bool) -> Routes {
        Routes {
            canary_weight,
            canary_routes,
            stable_revision: Some(STABLE_REV.into()),
            canary_revision: Some(CANARY_REV.into()),
        }
    }

    fn build(release: &ChatRelease, routes: &Routes) -> HttpRoute {
        http_route(release, &Attachment::default(), routes).unwrap()
    }

    fn rule_names(route: &HttpRoute) -> Vec<&str> {
        route
            .spec
            .rules
            .iter()
            .map(|r| r.name.as_deref().unwrap_or("?"))
            .collect()
    }

    fn rule<'a>(route: &'a HttpRoute, name: &str) -> &'a HttpRouteRule {
        route
            .spec
            .rules
            .iter()
            .find(|r| r.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no rule {name}"))
    }

    /// (Service, weight) of each backend of a rule.
    fn split(rule: &HttpRouteRule) -> Vec<(&str, i32)> {
        rule.backend_refs
            .iter()
            .map(|b| (b.name.as_str(), b.weight.unwrap_or(1)))
            .collect()
    }

    /// The `set-cookie` values a backend adds to its responses.
    fn set_cookies(backend: &HttpBackendRef) -> Vec<&str> {
        backend
            .filters
            .iter()
            .filter_map(|f| f.response_header_modifier.as_ref())
            .flat_map(|m| &m.add)
            .filter(|h| h.name == SET_COOKIE_HEADER)
            .map(|h| h.value.as_str())
            .collect()
    }

    /// The canaryMatch translations of `canary_match`, or the field and problem of the refusal.
    fn translated(canary_match: Value) -> Result<Vec<Value>, (String, String)> {
        let r = release_with(json!({"canaryMatch": canary_match}));
        canary_matches(&r)
            .map(|ms| {
                ms.iter()
                    .map(|m| serde_json::to_value(m).unwrap())
                    .collect()
            })
            .map_err(|e| (e.field, e.problem))
    }

    fn refused_field(canary_match: Value) -> String {
        translated(canary_match.clone())
            .map(|ok| panic!("{canary_match} was taken as {ok:?}"))
            .unwrap_or_else(|(field, _)| field)
    }

    // --- Rules, their order and the split ---

    #[test]
    fn rules_come_as_canary_match_then_sticky_canary_then_sticky_stable_then_primary() {
        let route = build(&full_release(), &routes(25, true));
        assert_eq!(
            rule_names(&route),
            vec![
                CANARY_MATCH_RULE,
                STICKY_CANARY_RULE,
                STICKY_STABLE_RULE,
                PRIMARY_RULE
            ]
        );
        assert_eq!(
            split(rule(&route, CANARY_MATCH_RULE)),
            vec![("lobe-chat-canary", 100)]
        );
        assert_eq!(
            split(rule(&route, STICKY_CANARY_RULE)),
            vec![("lobe-chat-canary", 100)]
        );
        assert_eq!(
            split(rule(&route, STICKY_STABLE_RULE)),
            vec![("lobe-chat-stable", 100)]
        );
        // The split matches everything: no match, so the API server's default prefix "/".
        assert!(rule(&route, PRIMARY_RULE).matches.is_empty());
    }

    #[test]
    fn each_canary_match_entry_is_one_match_of_the_canary_match_rule() {
        let route = build(&full_release(), &routes(25, true));
        let testers = &rule(&route, CANARY_MATCH_RULE).matches;
        assert_eq!(testers.len(), 2);
        assert_eq!(testers[0].headers[0].name, "cookie");
        assert_eq!(testers[1].headers[0].name, "x-user-tier");
    }

    #[test]
    fn the_weighted_split_gives_stable_the_rest_of_the_canary_weight() {
        for (weight, stable, canary) in [(0, 100, 0), (5, 95, 5), (25, 75, 25), (100, 0, 100)] {
            let route = build(&release(), &routes(weight, true));
            assert_eq!(
                split(rule(&route, PRIMARY_RULE)),
                vec![("lobe-chat-stable", stable), ("lobe-chat-canary", canary)],
                "at {weight}"
            );
        }
    }

    #[test]
    fn weights_outside_0_to_100_are_clamped() {
        let route = build(&release(), &routes(140, true));
        assert_eq!(
            split(rule(&route, PRIMARY_RULE)),
            vec![("lobe-chat-stable", 0), ("lobe-chat-canary", 100)]
        );
        let route = build(&release(), &routes(-3, true));
        assert_eq!(
            split(rule(&route, PRIMARY_RULE)),
            vec![("lobe-chat-stable", 100), ("lobe-chat-canary", 0)]
        );
    }

    #[test]
    fn backends_are_the_track_services_at_the_service_port() {
        let route = build(&full_release(), &routes(5, true));
        for backend in route.spec.rules.iter().flat_map(|r| &r.backend_refs) {
            assert_eq!(backend.group.as_deref(), Some(""));
            assert_eq!(backend.kind.as_deref(), Some("Service"));
            assert_eq!(backend.port, Some(80));
            assert_eq!(backend.namespace, None);
            assert!(["lobe-chat-stable", "lobe-chat-canary"].contains(&backend.name.as_str()));
        }
    }

    #[test]
    fn after_rollback_everything_goes_to_stable_with_no_tester_or_canary_cookie_rules() {
        let route = build(&full_release(), &routes(0, false));
        assert_eq!(rule_names(&route), vec![STICKY_STABLE_RULE, PRIMARY_RULE]);
        assert_eq!(
            split(rule(&route, PRIMARY_RULE)),
            vec![("lobe-chat-stable", 100), ("lobe-chat-canary", 0)]
        );
    }

    #[test]
    fn after_promotion_the_promoted_revisions_cookie_lands_on_stable() {
        let promoted = Routes {
            canary_weight: 0,
            canary_routes: false,
            stable_revision: Some(CANARY_REV.into()),
            canary_revision: None,
        };
        let route = build(&full_release(), &promoted);
        assert_eq!(rule_names(&route), vec![STICKY_STABLE_RULE, PRIMARY_RULE]);
        let cookie = &rule(&route, STICKY_STABLE_RULE).matches[0].headers[0];
        assert_eq!(
            cookie.value,
            istio::cookie_regex("chat-version", CANARY_REV)
        );
        let primary = rule(&route, PRIMARY_RULE);
        assert_eq!(set_cookies(&primary.backend_refs[1]), Vec::<&str>::new());
    }

    #[test]
    fn with_equal_revisions_no_cookie_sends_anyone_to_the_canary() {
        let same = Routes {
            canary_weight: 5,
            canary_routes: true,
            stable_revision: Some(STABLE_REV.into()),
            canary_revision: Some(STABLE_REV.into()),
        };
        let route = build(&sticky_release(), &same);
        assert_eq!(rule_names(&route), vec![STICKY_STABLE_RULE, PRIMARY_RULE]);
    }

    // --- The sticky cookie ---

    #[test]
    fn sticky_cookie_rules_match_the_cookie_header_as_istio_does_both_ways() {
        let route = build(&sticky_release(), &routes(25, true));
        for (name, revision) in [
            (STICKY_CANARY_RULE, CANARY_REV),
            (STICKY_STABLE_RULE, STABLE_REV),
        ] {
            let r = rule(&route, name);
            assert_eq!(r.matches.len(), 1);
            let m = &r.matches[0];
            assert_eq!(
                (m.path.clone(), m.method, m.query_params.len()),
                (None, None, 0)
            );
            assert_eq!(
                m.headers,
                vec![HttpHeaderMatch {
                    kind: ValueMatchType::RegularExpression,
                    name: "cookie".into(),
                    value: format!(r"^(.*;\s*)?chat-version={revision}(;.*)?$"),
                }]
            );
        }
    }

    #[test]
    fn each_backend_of_the_split_sets_its_own_cookie_with_a_response_header_modifier() {
        let route = build(&sticky_release(), &routes(25, true));
        let primary = rule(&route, PRIMARY_RULE);
        for (backend, revision) in primary.backend_refs.iter().zip([STABLE_REV, CANARY_REV]) {
            assert_eq!(
                backend.filters,
                vec![HttpRouteFilter {
                    kind: HttpRouteFilterType::ResponseHeaderModifier,
                    request_header_modifier: None,
                    response_header_modifier: Some(HttpHeaderFilter {
                        add: vec![HttpHeader {
                            name: "set-cookie".into(),
                            value: format!("chat-version={revision}; Path=/; SameSite=Lax"),
                        }],
                        ..Default::default()
                    }),
                }]
            );
            // The very value the Istio router sets.
            assert_eq!(
                set_cookies(backend),
                vec![istio::set_cookie_value("chat-version", revision)]
            );
        }
        // Testers and cookie holders are not told anything new.
        for name in [STICKY_CANARY_RULE, STICKY_STABLE_RULE] {
            assert!(rule(&route, name).backend_refs[0].filters.is_empty());
        }
    }

    #[test]
    fn without_a_sticky_cookie_there_are_no_cookie_rules_or_filters() {
        let route = build(&release(), &routes(50, true));
        assert_eq!(rule_names(&route), vec![PRIMARY_RULE]);
        let primary = rule(&route, PRIMARY_RULE);
        assert!(primary.backend_refs.iter().all(|b| b.filters.is_empty()));
        assert!(primary.filters.is_empty());
    }

    #[test]
    fn a_tester_match_that_ranks_below_the_cookie_rules_also_matches_with_the_stable_cookie() {
        // Query parameters only: a cookie match (one header) outranks it, so a tester holding the
        // stable's cookie would reach stable. The second match (with that cookie) outranks it back.
        let r = release_with(json!({
            "canaryMatch": [{"queryParams": {"beta": {"exact": "1"}}},
                            {"headers": {"x-tester": {"exact": "1"}}}],
            "stickyCookie": "chat-version"
        }));
        let route = build(&r, &routes(5, true));
        let testers = &rule(&route, CANARY_MATCH_RULE).matches;
        assert_eq!(testers.len(), 3);
        assert_eq!(testers[0].headers, vec![]);
        assert_eq!(testers[1].query_params, testers[0].query_params);
        assert_eq!(
            testers[1].headers,
            vec![cookie_header_match("chat-version", STABLE_REV)]
        );
        // A header match ties with the cookie rules and wins by list order: no second match.
        assert_eq!(testers[2].headers[0].name, "x-tester");

        // Without a sticky cookie there is nothing to outrank.
        let plain =
            release_with(json!({"canaryMatch": [{"queryParams": {"beta": {"exact": "1"}}}]}));
        assert_eq!(
            rule(&build(&plain, &routes(5, true)), CANARY_MATCH_RULE)
                .matches
                .len(),
            1
        );
    }

    #[test]
    fn what_outranks_a_cookie_match_is_known_by_path_method_and_headers() {
        let m = |v: Value| -> HttpRouteMatch { serde_json::from_value(v).unwrap() };
        assert!(ranks_below_a_cookie_match(&m(
            json!({"queryParams": [{"name": "a", "value": "1"}]})
        )));
        assert!(ranks_below_a_cookie_match(&m(
            json!({"path": {"type": "PathPrefix", "value": "/"}})
        )));
        assert!(ranks_below_a_cookie_match(&m(
            json!({"path": {"type": "RegularExpression", "value": "^(/a.*)$"}})
        )));
        assert!(!ranks_below_a_cookie_match(&m(
            json!({"path": {"type": "PathPrefix", "value": "/a"}})
        )));
        assert!(!ranks_below_a_cookie_match(&m(
            json!({"path": {"type": "Exact", "value": "/"}})
        )));
        assert!(!ranks_below_a_cookie_match(&m(json!({"method": "POST"}))));
        assert!(!ranks_below_a_cookie_match(&m(
            json!({"headers": [{"name": "x", "value": "1"}]})
        )));
    }

    // --- canaryMatch translation ---

    #[test]
    fn header_matches_exact_stays_exact_and_prefix_and_regex_become_anchored_regexes() {
        assert_eq!(
            translated(json!([{"headers": {
                "x-user-tier": {"exact": "premium"},
                "x-build": {"prefix": "2026.1+"},
                "x-team": {"regex": "qa|dev"},
                "x-empty": {"exact": ""}
            }}])),
            Ok(vec![json!({"headers": [
                // In the map's (sorted) order.
                {"type": "RegularExpression", "name": "x-build", "value": "^2026\\.1\\+.*$"},
                {"type": "RegularExpression", "name": "x-empty", "value": "^$"},
                {"type": "RegularExpression", "name": "x-team", "value": "^(qa|dev)$"},
                {"type": "Exact", "name": "x-user-tier", "value": "premium"},
            ]})])
        );
    }

    #[test]
    fn query_params_translate_as_headers_do() {
        assert_eq!(
            translated(json!([{"queryParams": {
                "beta": {"exact": "1"},
                "cohort": {"prefix": "a.b"},
                "lang": {"regex": "en|de"}
            }}])),
            Ok(vec![json!({"queryParams": [
                {"type": "Exact", "name": "beta", "value": "1"},
                {"type": "RegularExpression", "name": "cohort", "value": "^a\\.b.*$"},
                {"type": "RegularExpression", "name": "lang", "value": "^(en|de)$"},
            ]})])
        );
    }

    #[test]
    fn uri_becomes_path_exact_prefix_or_anchored_regex() {
        assert_eq!(
            translated(json!([
                {"uri": {"exact": "/chat"}},
                {"uri": {"prefix": "/v2/"}},
                {"uri": {"regex": "/api/v[0-9]+/.*"}}
            ])),
            Ok(vec![
                json!({"path": {"type": "Exact", "value": "/chat"}}),
                json!({"path": {"type": "PathPrefix", "value": "/v2/"}}),
                json!({"path": {"type": "RegularExpression", "value": "^(/api/v[0-9]+/.*)$"}}),
            ])
        );
    }

    #[test]
    fn an_exact_method_pseudo_header_becomes_the_method() {
        assert_eq!(
            translated(json!([{"headers": {":method": {"exact": "POST"}, "x-a": {"exact": "1"}}}])),
            Ok(vec![json!({"method": "POST", "headers": [
                {"type": "Exact", "name": "x-a", "value": "1"}]})])
        );
        assert_eq!(
            refused_field(
                json!([{"headers": {":method": {"regex": "POST|PUT"}, "x-a": {"exact": "1"}}}])
            ),
            "traffic.canaryMatch[0].headers.:method"
        );
        assert_eq!(
            refused_field(
                json!([{"headers": {":method": {"exact": "post"}, "x-a": {"exact": "1"}}}])
            ),
            "traffic.canaryMatch[0].headers.:method.exact"
        );
    }

    #[test]
    fn regex_literals_escape_what_is_special_in_every_dialect() {
        assert_eq!(
            regex_literal(r"a.b+c*(d)[e]{f}|g^h$i\j?k"),
            r"a\.b\+c\*\(d\)\[e\]\{f\}\|g\^h\$i\\j\?k"
        );
        assert_eq!(regex_literal("plain-text_1/2"), "plain-text_1/2");
    }

    #[test]
    fn a_canary_match_that_holds_for_every_request_never_becomes_a_match() {
        let r = release_with(json!({
            "canaryMatch": [
                {"headers": {}},
                {"headers": {"x-user-tier": {"exact": "premium"}}},
                {},
                {"queryParams": {}},
                {"uri": {"prefix": "/"}},
                {"uri": {"regex": ".*"}, "headers": {":method": {"regex": "[A-Z]+"}}}
            ]
        }));
        let route = build(&r, &routes(25, true));
        let testers = &rule(&route, CANARY_MATCH_RULE).matches;
        assert_eq!(testers.len(), 1);
        assert_eq!(testers[0].headers[0].name, "x-user-tier");
        // Nothing else sends everyone to the canary.
        assert_eq!(
            split(rule(&route, PRIMARY_RULE)),
            vec![("lobe-chat-stable", 75), ("lobe-chat-canary", 25)]
        );

        let only_everyone = release_with(json!({"canaryMatch": [{"uri": {"prefix": "/"}}]}));
        assert_eq!(
            rule_names(&build(&only_everyone, &routes(25, true))),
            vec![PRIMARY_RULE]
        );
    }

    #[test]
    fn canary_match_rules_exist_only_while_canary_routes_are_on() {
        let route = build(&full_release(), &routes(25, false));
        assert!(!rule_names(&route).contains(&CANARY_MATCH_RULE));
    }

    #[test]
    fn what_the_gateway_api_cannot_match_is_refused_naming_the_field() {
        let cases = [
            (
                json!([{"headers": {":authority": {"exact": "chat.example.com"}}}]),
                "traffic.canaryMatch[0].headers.:authority",
            ),
            (
                json!([{"headers": {":path": {"prefix": "/chat"}}}]),
                "traffic.canaryMatch[0].headers.:path",
            ),
            (
                json!([{"headers": {":scheme": {"exact": "https"}}}]),
                "traffic.canaryMatch[0].headers.:scheme",
            ),
            (
                json!([{"headers": {"@request.auth.claims.group": {"exact": "qa"}}}]),
                "traffic.canaryMatch[0].headers.@request.auth.claims.group",
            ),
            // Istio takes ',' in a header name (its character range +-. holds it); the Gateway API
            // does not.
            (
                json!([{"uri": {"exact": "/a"}}, {"headers": {"x,y": {"exact": "1"}}}]),
                "traffic.canaryMatch[1].headers[\"x,y\"]",
            ),
            (
                json!([{"headers": {"X-Tester": {"exact": "1"}, "x-tester": {"exact": "2"}}}]),
                "traffic.canaryMatch[0].headers.x-tester",
            ),
            (
                json!([{"queryParams": {"a b": {"exact": "1"}}}]),
                "traffic.canaryMatch[0].queryParams[\"a b\"]",
            ),
            (
                json!([{"uri": {"prefix": "chat"}}]),
                "traffic.canaryMatch[0].uri.prefix",
            ),
            (
                json!([{"uri": {"exact": "/a//b"}}]),
                "traffic.canaryMatch[0].uri.exact",
            ),
            (
                json!([{"uri": {"prefix": "/a/.."}}]),
                "traffic.canaryMatch[0].uri.prefix",
            ),
            (
                json!([{"uri": {"prefix": "/a%2Fb"}}]),
                "traffic.canaryMatch[0].uri.prefix",
            ),
            (
                json!([{"uri": {"prefix": "/a b"}}]),
                "traffic.canaryMatch[0].uri.prefix",
            ),
            (
                json!([{"uri": {"prefix": "/a%zz"}}]),
                "traffic.canaryMatch[0].uri.prefix",
            ),
            (
                json!([{"uri": {"exact": "/a#b"}}]),
                "traffic.canaryMatch[0].uri.exact",
            ),
        ];
        for (canary_match, field) in cases {
            assert_eq!(refused_field(canary_match.clone()), field, "{canary_match}");
        }
        // Every allowed character and an escape.
        assert!(translated(json!([{"uri": {"prefix": "/A-z_0.9~!$&'()*+,;=:@%20"}}])).is_ok());
    }

    #[test]
    fn values_longer_than_the_gateway_api_takes_are_refused_with_the_limit() {
        // Istio takes a 1024-byte regex; anchored, a query parameter's no longer fits.
        let long = "a".repeat(1022);
        let (field, problem) =
            translated(json!([{"queryParams": {"q": {"regex": long}}}])).unwrap_err();
        assert_eq!(field, "traffic.canaryMatch[0].queryParams.q.regex");
        assert!(
            problem.contains("1026 characters") && problem.contains("at most 1024"),
            "{problem}"
        );
        // In a header it fits.
        assert!(translated(json!([{"headers": {"q": {"regex": long}}}])).is_ok());
        let (field, _) = translated(json!([{"uri": {"regex": long}}])).unwrap_err();
        assert_eq!(field, "traffic.canaryMatch[0].uri.regex");
    }

    #[test]
    fn a_refused_canary_match_refuses_the_route_even_while_no_canary_runs() {
        let r = release_with(json!({"canaryMatch": [{"headers": {":authority": {"exact": "a"}}}]}));
        let err = http_route(&r, &Attachment::default(), &routes(0, false)).unwrap_err();
        assert_eq!(err.field, "traffic.canaryMatch[0].headers.:authority");
        assert!(
            err.to_string()
                .starts_with("spec.traffic.canaryMatch[0].headers.:authority: the Gateway API"),
            "{err}"
        );
        assert_eq!(check(&r, &Attachment::default()), Err(err));
    }

    // --- Parents and host names ---

    #[test]
    fn without_parents_the_route_attaches_to_the_service_for_the_mesh() {
        let route = build(&release(), &routes(5, true));
        assert_eq!(
            serde_json::to_value(&route.spec.parent_refs).unwrap(),
            json!([{"group": "", "kind": "Service", "name": "lobe-chat"}])
        );
        assert!(route.spec.hostnames.is_empty());
        assert!(
            serde_json::to_value(&route).unwrap()["spec"]
                .get("hostnames")
                .is_none()
        );
    }

    fn gateway(namespace: &str, name: &str, section: Option<&str>) -> ParentReference {
        ParentReference {
            namespace: Some(namespace.into()),
            name: name.into(),
            section_name: section.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn parents_and_host_names_are_written_as_given() {
        let attachment = Attachment {
            parent_refs: vec![
                gateway("gateway-system", "public", Some("https")),
                gateway("gateway-system", "public", Some("http")),
            ],
            hostnames: vec!["chat.example.com".into(), "*.chat.example.com".into()],
        };
        let route = http_route(&release(), &attachment, &routes(5, true)).unwrap();
        assert_eq!(route.spec.parent_refs, attachment.parent_refs);
        assert_eq!(route.spec.hostnames, attachment.hostnames);
    }

    fn attachment_refusal(attachment: Attachment) -> String {
        let err = http_route(&release(), &attachment, &routes(5, true)).unwrap_err();
        assert_eq!(check(&release(), &attachment), Err(err.clone()));
        err.field
    }

    #[test]
    fn two_references_to_one_parent_need_distinct_section_names() {
        let with = |parents: Vec<ParentReference>| Attachment {
            parent_refs: parents,
            hostnames: vec![],
        };
        assert_eq!(
            attachment_refusal(with(vec![
                gateway("gw", "public", None),
                gateway("gw", "public", None)
            ])),
            "traffic.gatewayAPI.parentRefs[1].sectionName"
        );
        assert_eq!(
            attachment_refusal(with(vec![
                gateway("gw", "public", Some("http")),
                gateway("gw", "public", None)
            ])),
            "traffic.gatewayAPI.parentRefs[1].sectionName"
        );
        assert_eq!(
            attachment_refusal(with(vec![
                gateway("gw", "a", None),
                gateway("gw", "public", Some("http")),
                gateway("gw", "public", Some("http"))
            ])),
            "traffic.gatewayAPI.parentRefs[2].sectionName"
        );
        // The group and kind the API server fills in count: these name the same Gateway.
        let explicit = ParentReference {
            group: Some(GROUP.into()),
            kind: Some("Gateway".into()),
            ..gateway("gw", "public", None)
        };
        assert_eq!(
            attachment_refusal(with(vec![explicit, gateway("gw", "public", None)])),
            "traffic.gatewayAPI.parentRefs[1].sectionName"
        );
        // Another namespace, kind or name is another parent.
        let service = ParentReference {
            group: Some(String::new()),
            kind: Some("Service".into()),
            ..gateway("gw", "public", None)
        };
        let fine = with(vec![
            gateway("gw", "public", None),
            gateway("other", "public", None),
            gateway("gw", "private", None),
            service,
        ]);
        assert!(http_route(&release(), &fine, &routes(5, true)).is_ok());
    }

    #[test]
    fn parent_fields_the_crd_refuses_are_refused_naming_the_field() {
        let one = |parent: ParentReference| Attachment {
            parent_refs: vec![parent],
            hostnames: vec![],
        };
        let base = || gateway("gw", "public", None);
        let cases = [
            (
                ParentReference {
                    namespace: Some("Gateway_System".into()),
                    ..base()
                },
                "namespace",
            ),
            (
                ParentReference {
                    group: Some("Gateway.Networking".into()),
                    ..base()
                },
                "group",
            ),
            (
                ParentReference {
                    kind: Some("1Gateway".into()),
                    ..base()
                },
                "kind",
            ),
            (
                ParentReference {
                    name: String::new(),
                    ..base()
                },
                "name",
            ),
            (
                ParentReference {
                    section_name: Some("HTTPS".into()),
                    ..base()
                },
                "sectionName",
            ),
            (
                ParentReference {
                    port: Some(0),
                    ..base()
                },
                "port",
            ),
        ];
        for (parent, key) in cases {
            assert_eq!(
                attachment_refusal(one(parent)),
                format!("traffic.gatewayAPI.parentRefs[0].{key}")
            );
        }
        let too_many = Attachment {
            parent_refs: (0..33)
                .map(|i| gateway("gw", &format!("g{i}"), None))
                .collect(),
            hostnames: vec![],
        };
        assert_eq!(
            attachment_refusal(too_many),
            "traffic.gatewayAPI.parentRefs"
        );
    }

    #[test]
    fn host_names_the_crd_refuses_are_refused_naming_the_entry() {
        let hosts = |hostnames: Vec<&str>| Attachment {
            parent_refs: vec![],
            hostnames: hostnames.into_iter().map(String::from).collect(),
        };
        for bad in [
            "Chat.example.com",
            "*",
            "chat.*.com",
            "-chat.example.com",
            "chat..com",
            "",
        ] {
            assert_eq!(
                attachment_refusal(hosts(vec!["ok.example.com", bad])),
                "traffic.gatewayAPI.hostnames[1]",
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..17).map(|i| format!("h{i}.example.com")).collect();
        assert_eq!(
            attachment_refusal(hosts(many.iter().map(String::as_str).collect())),
            "traffic.gatewayAPI.hostnames"
        );
    }

    #[test]
    fn a_name_too_long_for_the_track_services_is_refused_before_any_write() {
        let mut r = release();
        r.metadata.name = Some("a".repeat(MAX_RELEASE_NAME));
        assert_eq!(check(&r, &Attachment::default()), Ok(()));
        r.metadata.name = Some("a".repeat(MAX_RELEASE_NAME + 1));
        let err = check(&r, &Attachment::default()).unwrap_err();
        assert_eq!(err.field, "traffic.gatewayAPI");
        assert!(err.problem.contains("at most 56"), "{}", err.problem);
    }

    // --- The objects ---

    #[test]
    fn the_route_is_named_after_and_owned_by_the_release_and_writes_no_status() {
        let route = build(&full_release(), &routes(5, true));
        let meta = &route.metadata;
        assert_eq!(meta.name.as_deref(), Some("lobe-chat"));
        assert_eq!(meta.namespace.as_deref(), Some("chat"));
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("ChatRelease", "lobe-chat", Some(true))
        );
        assert_eq!(
            meta.labels.as_ref().unwrap()[crate::annotations::LABEL_MANAGED_BY],
            MANAGER
        );
        let json = serde_json::to_value(&route).unwrap();
        assert_eq!(json["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(json["kind"], "HTTPRoute");
        let top: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(top, vec!["apiVersion", "kind", "metadata", "spec"]);
    }

    #[test]
    fn track_services_select_only_their_tracks_pods_on_the_services_port() {
        let r = release();
        let both = workload::service(&r);
        for (track, other) in [
            (Track::Stable, Track::Canary),
            (Track::Canary, Track::Stable),
        ] {
            let service = track_service(&r, track);
            let name = format!("lobe-chat-{}", track.as_str());
            assert_eq!(service.metadata.name.as_deref(), Some(name.as_str()));
            let labels = service.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[LABEL_TRACK], track.as_str());
            assert_eq!(labels[LABEL_NAME], "lobe-chat");
            let owner = &service.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.controller),
                ("ChatRelease", Some(true))
            );

            let spec = service.spec.as_ref().unwrap();
            assert_eq!(spec.ports, both.spec.as_ref().unwrap().ports);
            let selector = spec.selector.as_ref().unwrap();
            // The pods of the track's Deployment carry every selector label; the other track's
            // pods do not.
            let pods_of = |t: Track| -> BTreeMap<String, String> {
                let d = workload::deployment(&r, t, &r.spec.template, "rev1", 2);
                d.spec.unwrap().template.metadata.unwrap().labels.unwrap()
            };
            let selects = |pod: &BTreeMap<String, String>| {
                selector.iter().all(|(k, v)| pod.get(k) == Some(v))
            };
            assert!(selects(&pods_of(track)), "{track:?}");
            assert!(!selects(&pods_of(other)), "{track:?}");
            // Not by revision: the Service outlives each revision of its track.
            assert!(!selector.contains_key(LABEL_REVISION));
        }
    }

    #[test]
    fn a_route_read_back_with_an_implementations_status_says_what_is_wrong() {
        let route: HttpRoute = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "lobe-chat", "namespace": "chat", "generation": 3},
            "spec": {"parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                     "namespace": "gw", "name": "public"}],
                     "rules": [{"name": "primary", "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [{"group": "", "kind": "Service", "name": "lobe-chat-stable",
                                                 "port": 80, "weight": 100}]}]},
            "status": {"parents": [{
                "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                              "namespace": "gw", "name": "public"},
                "controllerName": "gateway.envoyproxy.io/gatewayclass-controller",
                "conditions": [
                    {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3},
                    {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
                     "message": "service chat/lobe-chat-canary not found",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3},
                    {"type": "Accepted", "status": "False", "reason": "Old", "message": "stale",
                     "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}
                ]}]}
        }))
        .unwrap();
        let status = route.status.as_ref().unwrap();
        assert_eq!(
            status.problems(route.metadata.generation),
            vec![
                "Gateway gw/public gateway.envoyproxy.io/gatewayclass-controller: ResolvedRefs is \
                 False (BackendNotFound): service chat/lobe-chat-canary not found"
            ]
        );
        assert_eq!(
            HttpRouteStatus::default().problems(Some(1)),
            Vec::<String>::new()
        );
    }

    // --- The serialized objects against the Gateway API's real CRD ---

    /// The HTTPRoute CRD's v1 schema, from the file of the Gateway API's standard-channel CRDs
    /// that `make tools` takes from the `sigs.k8s.io/gateway-api` module (`make unit-test` names
    /// it in `GATEWAY_API_CRDS`, as it hands it to the local control plane).
    fn http_route_schema() -> Value {
        let crd = crd_schema::crd(
            "GATEWAY_API_CRDS",
            "the sigs.k8s.io/gateway-api module",
            "httproutes.gateway.networking.k8s.io",
        );
        assert_eq!(
            crd["metadata"]["annotations"]["gateway.networking.k8s.io/channel"],
            "standard"
        );
        crd_schema::v1_schema(&crd)
    }

    fn check_against_crd(route: &Value) -> Walk {
        crd_schema::check(
            route,
            &http_route_schema(),
            "gateway.networking.k8s.io/v1",
            "HTTPRoute",
        )
    }

    /// Every kind of HTTPRoute the builder writes: plain, sticky, testers of every kind, at
    /// weights 0, 5 and 100, in the mesh and at Gateways with host names, during a canary, after
    /// a rollback and after a promotion.
    fn every_kind_of_route() -> Vec<(String, Value)> {
        let testers = release_with(json!({
            "canaryMatch": [
                {"headers": {"cookie": {"regex": "^(.*;)?\\s*canary=true(;.*)?$"}}},
                {"headers": {"x-user-tier": {"exact": "premium"}, "x-build": {"prefix": "2026."},
                             ":method": {"exact": "POST"}},
                 "uri": {"prefix": "/chat"}, "queryParams": {"beta": {"exact": "1"}}},
                {"uri": {"exact": "/webapi/chat/openai"}},
                {"uri": {"regex": "/api/v[0-9]+/.*"}},
                {"queryParams": {"cohort": {"regex": "a|b"}, "lang": {"prefix": "en"}}},
                {"headers": {"x-empty": {"exact": ""}}}
            ],
            "stickyCookie": "chat-version"
        }));
        let releases = [
            ("plain", release()),
            ("sticky", sticky_release()),
            ("canaryMatch", testers),
        ];
        let at_gateways = Attachment {
            parent_refs: vec![
                gateway("gateway-system", "public", Some("https")),
                ParentReference {
                    port: Some(443),
                    ..gateway("gateway-system", "public", Some("http"))
                },
            ],
            hostnames: vec!["chat.example.com".into(), "*.example.org".into()],
        };
        let promoted = Routes {
            canary_weight: 0,
            canary_routes: false,
            stable_revision: Some(CANARY_REV.into()),
            canary_revision: None,
        };
        let mut out = Vec::new();
        for (kind, release) in &releases {
            for (where_, attachment) in [
                ("mesh", Attachment::default()),
                ("gateways", at_gateways.clone()),
            ] {
                for (when, r) in [
                    ("0", routes(0, true)),
                    ("5", routes(5, true)),
                    ("100", routes(100, true)),
                    ("rolled back", routes(0, false)),
                    ("promoted", promoted.clone()),
                ] {
                    let route = http_route(release, &attachment, &r).unwrap();
                    out.push((
                        format!("{kind}, {where_}, {when}"),
                        serde_json::to_value(route).unwrap(),
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn every_http_route_the_builder_writes_passes_the_upstream_crd_schema() {
        let routes = every_kind_of_route();
        // The walk must see every kind of field we write, or the check proves little.
        let all = Value::Array(routes.iter().map(|(_, r)| r.clone()).collect()).to_string();
        for field in [
            "\"parentRefs\"",
            "\"sectionName\"",
            "\"hostnames\"",
            "\"matches\"",
            "\"path\"",
            "\"PathPrefix\"",
            "\"Exact\"",
            "\"RegularExpression\"",
            "\"queryParams\"",
            "\"method\"",
            "\"backendRefs\"",
            "\"weight\"",
            "\"ResponseHeaderModifier\"",
            "\"set-cookie\"",
            "\"port\"",
        ] {
            assert!(all.contains(field), "{field} not exercised");
        }
        for (what, route) in &routes {
            assert_eq!(
                check_against_crd(route).violations,
                Vec::<String>::new(),
                "{what}"
            );
        }
    }

    #[test]
    fn the_crd_check_catches_what_the_api_server_would_refuse() {
        let mut route = serde_json::to_value(build(&full_release(), &routes(5, true))).unwrap();
        let spec = &mut route["spec"];
        spec["rules"][0]["matches"][1]["headers"][0]["name"] = json!("x,y");
        spec["rules"][0]["matches"][1]["method"] = json!("get");
        spec["rules"][3]["backendRefs"][0]["weight"] = json!(-1);
        spec["rules"][3]["backendRefs"][1]["filters"][0]["type"] = json!("AddHeader");
        spec["rules"][3]["backendRefs"][1]["name"] = json!("");
        spec["rules"][2]["matches"][0]["headers"][0]
            .as_object_mut()
            .unwrap()
            .remove("value");
        spec["rules"][1]["matches"][0]["headers"] = json!([
            {"name": "a", "value": "1"}, {"name": "a", "value": "2"}]);
        spec["hostnames"] = json!(["Chat.example.com"]);
        spec["rules"][0]["timeout"] = json!("1s");
        assert_eq!(
            check_against_crd(&route).violations,
            vec![
                "spec.hostnames[0]: \"Chat.example.com\" does not match \
                 ^(\\*\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                "spec.rules[0].matches[1].headers[0].name: \"x,y\" does not match \
                 ^[A-Za-z0-9!#$%&'*+\\-.^_\\x60|~]+$",
                "spec.rules[0].matches[1].method: \"get\" is not one of [String(\"GET\"), \
                 String(\"HEAD\"), String(\"POST\"), String(\"PUT\"), String(\"DELETE\"), \
                 String(\"CONNECT\"), String(\"OPTIONS\"), String(\"TRACE\"), String(\"PATCH\")]",
                "spec.rules[0].timeout: not a field of the CRD",
                "spec.rules[1].matches[0].headers: [1]: a second item with the key [String(\"a\")]",
                "spec.rules[2].matches[0].headers[0].value: required and missing",
                "spec.rules[3].backendRefs[0].weight: -1 outside 0..=1000000",
                "spec.rules[3].backendRefs[1].filters[0].type: \"AddHeader\" is not one of \
                 [String(\"RequestHeaderModifier\"), String(\"ResponseHeaderModifier\"), \
                 String(\"RequestMirror\"), String(\"RequestRedirect\"), String(\"URLRewrite\"), \
                 String(\"ExtensionRef\"), String(\"CORS\")]",
                "spec.rules[3].backendRefs[1].name: 0 characters, fewer than 1",
            ]
        );
    }

    /// The CEL rules of the CRD on the fields the builder writes, each with what keeps our routes
    /// within it. A rule upstream adds on one of those fields fails
    /// `the_cel_rules_on_what_we_write_are_all_guarded` until it is read and listed here.
    const GUARDED_CEL_RULES: [(&str, &str); 19] = [
        (
            "sectionName must be specified when parentRefs includes 2 or more references to the same parent",
            "check_attachment refuses it",
        ),
        (
            "sectionName must be unique when parentRefs includes 2 or more references to the same parent",
            "check_attachment refuses it",
        ),
        (
            "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route must be less than 128",
            "check_counts refuses it; at most 4 rules and 2 x 16 + 2 matches are written",
        ),
        (
            "RequestRedirect filter must not be used together with backendRefs",
            "no RequestRedirect is written",
        ),
        (
            "When using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
            "no RequestRedirect is written",
        ),
        (
            "When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
            "no URLRewrite is written",
        ),
        (
            "Within backendRefs, when using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
            "no RequestRedirect is written",
        ),
        (
            "Within backendRefs, When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified",
            "no URLRewrite is written",
        ),
        (
            "Must have port for Service reference",
            "backend_ref always writes the Service port",
        ),
        (
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
            "neither is written",
        ),
        (
            "CORS filter cannot be repeated",
            "no CORS filter is written",
        ),
        (
            "RequestHeaderModifier filter cannot be repeated",
            "none is written",
        ),
        (
            "ResponseHeaderModifier filter cannot be repeated",
            "one a backend",
        ),
        (
            "RequestRedirect filter cannot be repeated",
            "none is written",
        ),
        ("URLRewrite filter cannot be repeated", "none is written"),
        // One message stands for each "filter.X must be nil if the filter.type is not X" and
        // "filter.X must be specified for X filter.type" pair: HttpRouteFilter's constructors
        // pair the type with its field.
        (
            "filter.<kind>: nil unless the type, and present for it",
            "HttpRouteFilter::response_headers",
        ),
        (
            "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']",
            "path_problem refuses it, with the ten rules on path values below it",
        ),
        (
            "type must be one of ['Exact', 'PathPrefix', 'RegularExpression']",
            "PathMatchType",
        ),
        (
            "must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$) for types ['Exact', 'PathPrefix']",
            "path_problem refuses it",
        ),
    ];

    /// The CEL messages `walk` saw, folded as GUARDED_CEL_RULES lists them.
    fn folded(messages: &BTreeSet<String>) -> BTreeSet<String> {
        messages
            .iter()
            .map(|m| {
                let filter_pairing = m.starts_with("filter.")
                    && (m.contains("must be nil if the filter.type is not")
                        || m.contains("must be specified for"));
                let path_value_rule =
                    m.starts_with("must not contain ") || m.starts_with("must not end with ");
                if filter_pairing {
                    "filter.<kind>: nil unless the type, and present for it".to_string()
                } else if path_value_rule {
                    "value must be an absolute path and start with '/' when type one of \
                     ['Exact', 'PathPrefix']"
                        .to_string()
                } else {
                    m.clone()
                }
            })
            .collect()
    }

    #[test]
    fn the_cel_rules_on_what_we_write_are_all_guarded() {
        let mut seen = BTreeSet::new();
        for (_, route) in every_kind_of_route() {
            seen.extend(check_against_crd(&route).cel_rules);
        }
        // The ten rules on Exact and PathPrefix values, all met.
        let path_rules = seen
            .iter()
            .filter(|m| m.contains("when type one of ['Exact', 'PathPrefix']"))
            .count();
        assert_eq!(path_rules, 9, "{seen:#?}");
        let guarded: BTreeSet<String> = GUARDED_CEL_RULES
            .iter()
            .map(|(m, _)| m.to_string())
            .collect();
        assert_eq!(folded(&seen), guarded);
    }
}
