//! The Gateway API's routing of an HTTPRoute, as the Envoy-based implementations route it (Istio,
//! which implements GAMMA in sidecar mode, and Envoy Gateway): the rule a request takes, the
//! backend it draws by weight, the `set-cookie` that backend's filter adds, and the pods behind the
//! backend Service. Each HTTPRoute is an entry point of its own, whatever its parents and host
//! names, as each VirtualService is.
//!
//! What is routed:
//! - **Matches.** A rule is taken when any of its matches holds; a rule without matches has the
//!   API server's default one (path prefix `/`). Within a match the path, the method, every header
//!   and every query parameter must hold. Paths: `Exact`; `PathPrefix` by whole path segments
//!   (`/chat` matches `/chat` and `/chat/x`, not `/chatty`; a trailing `/` of the value is
//!   ignored), unlike Istio's string prefix; `RegularExpression` over the whole path. Header and
//!   query parameter values: `Exact`, or `RegularExpression` over the whole value (RE2, as Envoy's
//!   `safe_regex`). Header names compare case-insensitively, query parameter names exactly; of
//!   several conditions on one name only the first counts, as the spec says. Every synthetic
//!   request is a `POST`.
//! - **Precedence** between the rules, which the Gateway API puts before list order, as Istio
//!   sorts them: of the matches that hold, the one with an `Exact` path, else a `PathPrefix` one
//!   (the longest first), else a `RegularExpression` one (its rank is implementation-specific:
//!   Istio puts it last), then one with a method, then the most headers, then the most query
//!   parameters; a tie goes to the earlier rule in the list. The operator's canaryMatch rule and
//!   its sticky-cookie rules each have one header, so list order decides between them.
//! - **Backends** take their weight's share (default 1; 0 takes none). A Service backend (group
//!   `""` and kind `Service`, the defaults) leads to that Service's Ready pods by its selector, in
//!   the backend's namespace (default the route's; no ReferenceGrant is asked for, as for a GAMMA
//!   route). What Envoy answers itself: **500** for a rule with no backend of weight above 0
//!   (Istio's direct response; the spec asks for 500), **500** for the share of a backend that is
//!   not a Service or names none (Istio and Envoy Gateway set `cluster_not_found_response_code`
//!   to 500 for Gateway API routes), **503** "no healthy upstream" for a Service without a Ready
//!   pod. As for a VirtualService, that 503 is recorded under the Service's workload, so the
//!   operator sees it; the 500s reach no workload and are recorded nowhere.
//! - **Response headers.** A `set-cookie` that a `ResponseHeaderModifier` adds or sets (the
//!   backend's own filter first, then the rule's) is kept by the user, on Envoy's own answers too.
//!
//! Not routed: parents, host names and status (no Gateway is simulated, and the route is routed
//! whether or not an implementation accepted it), precedence between HTTPRoutes, the backend
//! port, request header filters. Filter types other than the two header modifiers cannot be read
//! with the operator's types, so an HTTPRoute that has one is skipped as malformed.

use crate::routing::{MeshState, RegexCache, Routed, Upstream, draw_weighted, service_upstream};
use crate::users::{METHOD_HEADER, SyntheticRequest};
use chatrelease::router::gateway_api::{
    HttpBackendRef, HttpHeaderMatch, HttpPathMatch, HttpQueryParamMatch, HttpRoute,
    HttpRouteFilter, HttpRouteFilterType, HttpRouteMatch, HttpRouteRule, PathMatchType,
    SET_COOKIE_HEADER, ValueMatchType,
};
use rand::Rng;
use serde_json::Value;

/// What Envoy answers for a rule without a backend of weight above 0, or for the share of a
/// backend that is not a Service it knows.
pub const NO_VALID_BACKEND: u16 = 500;
/// A backend's weight when it has none.
const DEFAULT_WEIGHT: i32 = 1;

/// An HTTPRoute from its JSON. Its status is dropped unread: what an implementation reports there
/// must not keep the route from being routed.
pub fn http_route_from_value(mut value: Value) -> Result<HttpRoute, serde_json::Error> {
    if let Some(object) = value.as_object_mut() {
        object.remove("status");
    }
    serde_json::from_value(value)
}

/// A request through `route` as an Envoy-based implementation routes it: `None` when no rule
/// matches (a 404).
pub fn route_http_route<'a, R: Rng + ?Sized>(
    state: &'a MeshState,
    route: &'a HttpRoute,
    request: &SyntheticRequest,
    rng: &mut R,
    regexes: &mut RegexCache,
) -> Option<Routed<'a>> {
    let rule = choose_rule(route, request, regexes)?;
    let name = rule.name.as_deref().unwrap_or_default();
    let rule_cookie = set_cookie_in(&rule.filters);
    let Some(backend) = draw_weighted(&rule.backend_refs, backend_weight, rng) else {
        return Some(Routed {
            route: name,
            upstream: Upstream::unresolved(
                NO_VALID_BACKEND,
                "no backendRef of the rule has a weight above 0".to_string(),
            ),
            set_cookie: rule_cookie,
        });
    };
    let namespace = route.metadata.namespace.as_deref().unwrap_or("default");
    Some(Routed {
        route: name,
        upstream: resolve_backend(state, namespace, backend),
        set_cookie: set_cookie_in(&backend.filters).or(rule_cookie),
    })
}

fn backend_weight(backend: &HttpBackendRef) -> i64 {
    i64::from(backend.weight.unwrap_or(DEFAULT_WEIGHT))
}

/// The rule whose holding match ranks highest (see the module's documentation); on a tie the
/// earlier one.
fn choose_rule<'a>(
    route: &'a HttpRoute,
    request: &SyntheticRequest,
    regexes: &mut RegexCache,
) -> Option<&'a HttpRouteRule> {
    let default = [HttpRouteMatch::default()];
    let mut best: Option<(Precedence, &HttpRouteRule)> = None;
    for rule in &route.spec.rules {
        let matches = if rule.matches.is_empty() {
            &default[..]
        } else {
            &rule.matches
        };
        for m in matches {
            let rank = precedence(m);
            let better = best.as_ref().is_none_or(|(top, _)| rank > *top);
            if better && match_holds(m, request, regexes) {
                best = Some((rank, rule));
            }
        }
    }
    best.map(|(_, rule)| rule)
}

/// How a path condition ranks, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PathRank {
    RegularExpression,
    PathPrefix,
    Exact,
}

/// A match's place in the precedence, compared field by field: the greater ranks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    path: PathRank,
    /// The value's length, for a prefix (without its trailing `/`) and, in Istio, any path.
    path_length: usize,
    method: bool,
    headers: usize,
    query_params: usize,
}

fn precedence(m: &HttpRouteMatch) -> Precedence {
    let (path, path_length) = match &m.path {
        None => (PathRank::PathPrefix, 1),
        Some(p) => match p.kind {
            PathMatchType::Exact => (PathRank::Exact, p.value.len()),
            PathMatchType::PathPrefix => (PathRank::PathPrefix, significant_prefix(&p.value).len()),
            PathMatchType::RegularExpression => (PathRank::RegularExpression, p.value.len()),
        },
    };
    Precedence {
        path,
        path_length,
        method: m.method.is_some(),
        headers: first_of_each_name(&m.headers, same_header).count(),
        query_params: first_of_each_name(&m.query_params, same_query_param).count(),
    }
}

/// Whether path, method, headers and query parameters of `m` all hold for `request`.
fn match_holds(m: &HttpRouteMatch, request: &SyntheticRequest, regexes: &mut RegexCache) -> bool {
    m.path
        .as_ref()
        .is_none_or(|p| path_matches(p, &request.path, regexes))
        && m.method.is_none_or(|method| {
            request.headers.get(METHOD_HEADER).map(String::as_str) == Some(method.as_str())
        })
        && first_of_each_name(&m.headers, same_header).all(|h| {
            let value = request.headers.get(&h.name.to_ascii_lowercase());
            value.is_some_and(|v| value_matches(h.kind, &h.value, v, regexes))
        })
        && first_of_each_name(&m.query_params, same_query_param).all(|q| {
            let value = request.query.get(&q.name);
            value.is_some_and(|v| value_matches(q.kind, &q.value, v, regexes))
        })
}

/// Of several conditions on one name (by `same_name`), only the first counts.
fn first_of_each_name<T>(
    conditions: &[T],
    same_name: fn(&T, &T) -> bool,
) -> impl Iterator<Item = &T> {
    conditions
        .iter()
        .enumerate()
        .filter(move |(i, c)| !conditions[..*i].iter().any(|earlier| same_name(earlier, c)))
        .map(|(_, c)| c)
}

/// Header names compare case-insensitively.
fn same_header(a: &HttpHeaderMatch, b: &HttpHeaderMatch) -> bool {
    a.name.eq_ignore_ascii_case(&b.name)
}

/// Query parameter names compare exactly.
fn same_query_param(a: &HttpQueryParamMatch, b: &HttpQueryParamMatch) -> bool {
    a.name == b.name
}

fn value_matches(
    kind: ValueMatchType,
    wanted: &str,
    value: &str,
    regexes: &mut RegexCache,
) -> bool {
    match kind {
        ValueMatchType::Exact => value == wanted,
        ValueMatchType::RegularExpression => regexes.full_match(wanted, value),
    }
}

fn path_matches(m: &HttpPathMatch, path: &str, regexes: &mut RegexCache) -> bool {
    match m.kind {
        PathMatchType::Exact => path == m.value,
        PathMatchType::PathPrefix => {
            let prefix = significant_prefix(&m.value);
            prefix == "/"
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        }
        PathMatchType::RegularExpression => regexes.full_match(&m.value, path),
    }
}

/// A `PathPrefix` value without the trailing `/` the spec says to ignore (`/` stays itself).
fn significant_prefix(value: &str) -> &str {
    match value.strip_suffix('/') {
        Some(trimmed) if !trimmed.is_empty() => trimmed,
        _ => value,
    }
}

/// The `set-cookie` a `ResponseHeaderModifier` among `filters` sets or adds, if any.
fn set_cookie_in(filters: &[HttpRouteFilter]) -> Option<&str> {
    filters
        .iter()
        .filter(|f| f.kind == HttpRouteFilterType::ResponseHeaderModifier)
        .filter_map(|f| f.response_header_modifier.as_ref())
        .flat_map(|m| m.set.iter().chain(&m.add))
        .find(|h| h.name.eq_ignore_ascii_case(SET_COOKIE_HEADER))
        .map(|h| h.value.as_str())
}

/// The pods behind a backend of a route in `namespace`: a Service's, by its selector.
fn resolve_backend<'a>(
    state: &'a MeshState,
    namespace: &str,
    backend: &HttpBackendRef,
) -> Upstream<'a> {
    let group = backend.group.as_deref().unwrap_or_default();
    let kind = backend.kind.as_deref().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        return Upstream::unresolved(
            NO_VALID_BACKEND,
            format!(
                "backendRef {} is a {kind} of group {group:?}, not a Service",
                backend.name
            ),
        );
    }
    let namespace = backend.namespace.as_deref().unwrap_or(namespace);
    service_upstream(state, &backend.name, namespace, None, NO_VALID_BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        CANARY_REV, Router, STABLE_REV, count_by_workload, healthy_pods, no_testers, rng, routes,
        tester_release,
    };
    use crate::traffic::Simulator;
    use crate::users::User;
    use chatrelease::router::gateway_api::{
        CANARY_MATCH_RULE, PRIMARY_RULE, STICKY_CANARY_RULE, STICKY_STABLE_RULE,
    };
    use serde_json::json;
    use std::collections::BTreeMap;

    /// An HTTPRoute `chat/lobe-chat` of these rules, as written by hand.
    fn route(rules: Value) -> HttpRoute {
        http_route_from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "lobe-chat", "namespace": "chat"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "lobe-chat"}],
                     "rules": rules}
        }))
        .unwrap()
    }

    /// The name of the rule a request to `path` with these headers takes.
    fn taken(route: &HttpRoute, path: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut request = User::default().request();
        request.path = path.to_string();
        for (name, value) in headers {
            request.headers.insert(name.to_string(), value.to_string());
        }
        let rule = choose_rule(route, &request, &mut RegexCache::default())?;
        rule.name.clone()
    }

    fn workload_of(routed: &Routed) -> String {
        match &routed.upstream {
            Upstream::Resolved { workload, .. } => workload.clone(),
            other => panic!("not resolved: {other:?}"),
        }
    }

    #[test]
    fn the_operators_rules_go_canary_match_then_sticky_cookies_then_the_weighted_split() {
        let mesh =
            Router::GatewayApi.state(&tester_release(true), &routes(50, true), &healthy_pods());
        let route = &mesh.http_routes[0];
        let (mut rng, mut regexes) = (rng(), RegexCache::default());
        let holding = |tester, revision: &str| {
            let mut user = User::fresh(tester);
            user.remember(&format!("chat-version={revision}"));
            user
        };
        for (user, rule, workload) in [
            // The tester's cookie outranks the stable cookie the tester also holds.
            (
                holding(true, STABLE_REV),
                CANARY_MATCH_RULE,
                "lobe-chat-canary",
            ),
            (
                holding(false, CANARY_REV),
                STICKY_CANARY_RULE,
                "lobe-chat-canary",
            ),
            (
                holding(false, STABLE_REV),
                STICKY_STABLE_RULE,
                "lobe-chat-stable",
            ),
        ] {
            for _ in 0..50 {
                let routed =
                    route_http_route(&mesh, route, &user.request(), &mut rng, &mut regexes)
                        .unwrap();
                assert_eq!(
                    (routed.route, workload_of(&routed).as_str()),
                    (rule, workload)
                );
                assert_eq!(routed.set_cookie, None, "only the split sets the cookie");
            }
        }
        let mut seen = BTreeMap::new();
        for _ in 0..400 {
            let routed = route_http_route(
                &mesh,
                route,
                &User::fresh(false).request(),
                &mut rng,
                &mut regexes,
            )
            .unwrap();
            assert_eq!(routed.route, PRIMARY_RULE);
            let workload = workload_of(&routed);
            let revision = if workload == "lobe-chat-canary" {
                CANARY_REV
            } else {
                STABLE_REV
            };
            let cookie = routed.set_cookie.unwrap();
            assert!(
                cookie.starts_with(&format!("chat-version={revision};")),
                "{cookie}"
            );
            *seen.entry(workload).or_insert(0) += 1;
        }
        assert!(
            seen["lobe-chat-stable"] > 150 && seen["lobe-chat-canary"] > 150,
            "{seen:?}"
        );
    }

    #[test]
    fn precedence_goes_before_list_order_and_list_order_settles_ties() {
        let to = json!([{"name": "lobe-chat-stable", "port": 80}]);
        let ranked = |later: Value, earlier: Value| {
            let mut rules = vec![earlier, later];
            for (rule, name) in rules.iter_mut().zip(["earlier", "later"]) {
                rule["name"] = json!(name);
                rule["backendRefs"] = to.clone();
            }
            taken(
                &route(json!(rules)),
                "/webapi/chat",
                &[("x-user-tier", "premium"), ("x-b", "1")],
            )
        };
        let path = |kind: &str, value: &str| json!({"path": {"type": kind, "value": value}});
        let tier = json!({"headers": [{"name": "X-User-Tier", "value": "premium"}]});
        let two_headers = json!({"headers": [{"name": "x-user-tier", "value": "premium"},
                                             {"name": "x-b", "value": "1"}]});
        for (wins, loses, why) in [
            (
                path("Exact", "/webapi/chat"),
                path("PathPrefix", "/webapi"),
                "exact path",
            ),
            (
                path("PathPrefix", "/webapi/"),
                tier.clone(),
                "longer prefix than the default /",
            ),
            (
                path("PathPrefix", "/webapi/chat"),
                path("PathPrefix", "/webapi"),
                "longer prefix",
            ),
            (
                json!({"method": "POST"}),
                two_headers.clone(),
                "a method before headers",
            ),
            (two_headers.clone(), tier.clone(), "more headers"),
            (json!({"queryParams": []}), json!({}), "tie"),
            // Istio ranks a regex path below every prefix, the default `/` included.
            (
                json!({}),
                json!({"path": {"type": "RegularExpression", "value": "/webapi/.*"},
                               "headers": [{"name": "x-b", "value": "1"}]}),
                "regex last",
            ),
        ] {
            let (wins, loses) = (json!({"matches": [wins]}), json!({"matches": [loses]}));
            if why == "tie" {
                assert_eq!(ranked(wins, loses).as_deref(), Some("earlier"), "{why}");
                continue;
            }
            assert_eq!(
                ranked(wins.clone(), loses.clone()).as_deref(),
                Some("later"),
                "{why}"
            );
            assert_eq!(ranked(loses, wins).as_deref(), Some("earlier"), "{why}");
        }
        // A rule without matches takes every request, as the API server's default match does.
        let catch_all = route(json!([{"name": "all", "backendRefs": to}]));
        assert_eq!(taken(&catch_all, "/anything", &[]).as_deref(), Some("all"));
    }

    #[test]
    fn path_prefix_matches_whole_segments_unlike_istios_string_prefix() {
        let mut regexes = RegexCache::default();
        let holds = |kind: PathMatchType, value: &str, path: &str, regexes: &mut RegexCache| {
            let m = HttpPathMatch {
                kind,
                value: value.to_string(),
            };
            path_matches(&m, path, regexes)
        };
        use PathMatchType::{Exact, PathPrefix, RegularExpression};
        for (kind, value, path, expected) in [
            (PathPrefix, "/", "/webapi/chat", true),
            (PathPrefix, "/webapi", "/webapi/chat", true),
            (PathPrefix, "/webapi/", "/webapi/chat", true),
            (PathPrefix, "/webapi/chat", "/webapi/chat", true),
            (PathPrefix, "/webapi/chat", "/webapi/chat/", true),
            (PathPrefix, "/web", "/webapi/chat", false),
            (PathPrefix, "/webapi/ch", "/webapi/chat", false),
            (PathPrefix, "/webapi/chat/x", "/webapi/chat", false),
            (Exact, "/webapi/chat", "/webapi/chat", true),
            (Exact, "/webapi/chat", "/webapi/chat/", false),
            (Exact, "/webapi", "/webapi/chat", false),
            (RegularExpression, "/webapi/.*", "/webapi/chat", true),
            // Over the whole path, as Envoy's safe_regex.
            (RegularExpression, "/webapi", "/webapi/chat", false),
        ] {
            assert_eq!(
                holds(kind, value, path, &mut regexes),
                expected,
                "{kind:?} {value} {path}"
            );
        }
    }

    #[test]
    fn a_match_needs_path_method_headers_and_query_and_reads_the_first_condition_on_a_name() {
        let mut regexes = RegexCache::default();
        let m = |value: Value| -> HttpRouteMatch { serde_json::from_value(value).unwrap() };
        let mut request = User::default().request();
        request
            .headers
            .insert("x-user-tier".into(), "premium".into());
        request.query.insert("beta".into(), "1".into());
        for (condition, expected) in [
            (json!({}), true),
            (json!({"method": "POST"}), true),
            (json!({"method": "GET"}), false),
            // Header names compare case-insensitively, values exactly.
            (
                json!({"headers": [{"name": "X-User-Tier", "value": "premium"}]}),
                true,
            ),
            (
                json!({"headers": [{"name": "x-user-tier", "value": "Premium"}]}),
                false,
            ),
            (
                json!({"headers": [{"type": "RegularExpression", "name": "x-user-tier",
                                 "value": "prem.*"}]}),
                true,
            ),
            (
                json!({"headers": [{"type": "RegularExpression", "name": "x-user-tier",
                                 "value": "prem"}]}),
                false,
            ),
            (
                json!({"headers": [{"name": "x-absent", "value": ""}]}),
                false,
            ),
            // Only the first condition on a name counts.
            (
                json!({"headers": [{"name": "x-user-tier", "value": "premium"},
                                {"name": "X-USER-TIER", "value": "other"}]}),
                true,
            ),
            // Query parameter names compare exactly.
            (
                json!({"queryParams": [{"name": "beta", "value": "1"}]}),
                true,
            ),
            (
                json!({"queryParams": [{"name": "Beta", "value": "1"}]}),
                false,
            ),
            (
                json!({"queryParams": [{"name": "beta", "value": "1"},
                                    {"name": "beta", "value": "2"}]}),
                true,
            ),
            (
                json!({"path": {"type": "PathPrefix", "value": "/webapi"}, "method": "POST",
                    "headers": [{"name": "x-user-tier", "value": "premium"}],
                    "queryParams": [{"name": "beta", "value": "2"}]}),
                false,
            ),
        ] {
            assert_eq!(
                match_holds(&m(condition.clone()), &request, &mut regexes),
                expected,
                "{condition}"
            );
        }
    }

    #[test]
    fn a_rule_with_no_backend_of_weight_above_0_answers_500_and_reaches_no_workload() {
        let mut mesh =
            Router::GatewayApi.state(&tester_release(true), &routes(0, false), &healthy_pods());
        for backend in &mut mesh.http_routes[0]
            .spec
            .rules
            .last_mut()
            .unwrap()
            .backend_refs
        {
            backend.weight = Some(0);
        }
        let routed = route_http_route(
            &mesh,
            &mesh.http_routes[0],
            &User::fresh(false).request(),
            &mut rng(),
            &mut RegexCache::default(),
        )
        .unwrap();
        assert!(matches!(
            routed.upstream,
            Upstream::Unresolved {
                response_code: 500,
                ..
            }
        ));
        assert_eq!(routed.set_cookie, None);
        let report = Simulator::new(no_testers()).tick(&mesh, 50, &mut rng());
        assert_eq!((report.records.len(), report.unrouted), (0, 50));
        assert!(report.user_requests.iter().all(|r| r.workload.is_empty()));
        // No backends at all is the same.
        mesh.http_routes[0]
            .spec
            .rules
            .last_mut()
            .unwrap()
            .backend_refs
            .clear();
        let report = Simulator::new(no_testers()).tick(&mesh, 50, &mut rng());
        assert_eq!((report.records.len(), report.unrouted), (0, 50));
    }

    #[test]
    fn weights_default_to_1_and_an_invalid_backend_answers_500_for_its_share() {
        let mesh = crate::routing::MeshState {
            http_routes: vec![route(json!([{"backendRefs": [
                {"name": "lobe-chat-stable", "port": 80},
                {"name": "missing", "port": 80},
                {"group": "example.com", "kind": "Bucket", "name": "lobe-chat-canary"},
                {"name": "lobe-chat-canary", "port": 80, "weight": 0}
            ]}]))],
            ..Router::GatewayApi.state(&tester_release(false), &routes(0, false), &healthy_pods())
        };
        let (mut rng, mut regexes) = (rng(), RegexCache::default());
        let mut codes = BTreeMap::new();
        for _ in 0..3_000 {
            let request = User::fresh(false).request();
            let routed = route_http_route(
                &mesh,
                &mesh.http_routes[0],
                &request,
                &mut rng,
                &mut regexes,
            );
            let key = match routed.unwrap().upstream {
                Upstream::Resolved { workload, .. } => workload,
                Upstream::Unresolved { response_code, .. } => response_code.to_string(),
            };
            *codes.entry(key).or_insert(0) += 1;
        }
        assert_eq!(
            codes.keys().collect::<Vec<_>>(),
            ["500", "lobe-chat-stable"]
        );
        let share = codes["500"] as f64 / 3_000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.04, "{codes:?}");
    }

    #[test]
    fn a_backend_service_without_ready_pods_answers_503_under_its_workload() {
        let pods = [
            crate::fixtures::pod("lobe-chat-stable-5d8f9c7b6-a", "stable", true, &[]),
            crate::fixtures::pod("lobe-chat-canary-5d8f9c7b6-c", "canary", false, &[]),
        ];
        let mesh = Router::GatewayApi.state(&tester_release(false), &routes(50, true), &pods);
        let report = Simulator::new(no_testers()).tick(&mesh, 4_000, &mut rng());
        let canary: Vec<_> = report
            .records
            .iter()
            .filter(|r| r.workload == "lobe-chat-canary")
            .collect();
        assert!(canary.len() > 1_800, "{}", canary.len());
        assert!(canary.iter().all(|r| r.response_code == 503));
        assert!(
            canary
                .iter()
                .all(|r| r.service == "lobe-chat-canary.chat.svc.cluster.local")
        );
        assert_eq!(count_by_workload(&report).values().sum::<usize>(), 4_000);
    }

    #[test]
    fn the_response_header_filter_sets_the_cookie_the_backends_own_first() {
        let filter = |value: &str| {
            json!([{"type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {"add": [{"name": "Set-Cookie", "value": value}]}}])
        };
        let both = route(json!([{"filters": filter("v=rule"), "backendRefs": [
            {"name": "lobe-chat-stable", "port": 80, "filters": filter("v=backend")}]}]));
        let rule_only = route(json!([{"filters": filter("v=rule"), "backendRefs": [
            {"name": "lobe-chat-stable", "port": 80}]}]));
        let mesh = crate::routing::MeshState::default();
        let (mut rng, mut regexes) = (rng(), RegexCache::default());
        let request = User::fresh(false).request();
        for (route, cookie) in [(both, "v=backend"), (rule_only, "v=rule")] {
            let routed = route_http_route(&mesh, &route, &request, &mut rng, &mut regexes).unwrap();
            assert_eq!(routed.set_cookie, Some(cookie));
        }
    }

    #[test]
    fn status_is_not_read_and_unknown_filter_types_make_a_route_malformed() {
        let mut value = serde_json::to_value(route(json!([]))).unwrap();
        value["status"] = json!({"parents": "not what the operator's types read"});
        assert!(http_route_from_value(value.clone()).is_ok());
        value["spec"]["rules"] = json!([{"filters": [{"type": "RequestRedirect",
            "requestRedirect": {"statusCode": 301}}]}]);
        assert!(http_route_from_value(value).is_err());
    }
}
