//! Envoy's routing, as the simulator follows it: the mesh state of one tick, what both kinds of
//! route share (compiled regexes, a draw by weight, a Service's pods, what a request was routed
//! to), and Istio's VirtualService: the route a request matches, the destination it draws by
//! weight, the `set-cookie` that destination adds, and the pods behind it. The Gateway API's
//! HTTPRoute is routed by [`crate::gateway`] on the same parts.

use crate::pods::{SimPod, SimService};
use crate::users::SyntheticRequest;
use chatrelease::crd::{HttpMatch, StringMatch};
use chatrelease::router::gateway_api::HttpRoute;
use chatrelease::router::istio::{
    Destination, DestinationRule, HttpRouteDestination, VirtualService,
};
use rand::{Rng, RngExt};
use regex::Regex;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

const CLUSTER_DOMAIN_SUFFIX: &str = ".svc.cluster.local";
/// Envoy's answer when a route leads to a cluster it does not have, by default (`NC`).
pub const CLUSTER_NOT_FOUND: u16 = 503;
/// Envoy's answer when it knows no endpoint of a Service (here: a Service without a selector).
pub const NO_HEALTHY_UPSTREAM: u16 = 503;

/// Everything routing reads, as of one tick.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    pub virtual_services: Vec<VirtualService>,
    /// The Gateway API's HTTPRoutes, each routed on its own (see [`crate::gateway`]).
    pub http_routes: Vec<HttpRoute>,
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
    if destinations.len() <= 1 {
        return destinations.first();
    }
    draw_weighted(destinations, |d| i64::from(d.weight), rng).or(destinations.first())
}

/// One of `items`, each with the share of its `weight` (a negative one counts as 0); `None` when
/// every weight is 0.
pub fn draw_weighted<'a, T, R: Rng + ?Sized>(
    items: &'a [T],
    weight: impl Fn(&T) -> i64,
    rng: &mut R,
) -> Option<&'a T> {
    let total: i64 = items.iter().map(|i| weight(i).max(0)).sum();
    if total == 0 {
        return None;
    }
    let mut draw = rng.random_range(0..total);
    for item in items {
        let share = weight(item).max(0);
        if draw < share {
            return Some(item);
        }
        draw -= share;
    }
    items.last()
}

/// Where a destination leads.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream<'a> {
    /// A known Service (and subset), with its Ready pods (possibly none).
    Resolved {
        /// `destination_service`: the Service's FQDN.
        service: String,
        namespace: String,
        /// The workload a "no healthy upstream" 503 is recorded under: that of the first pod, or
        /// the Service's name (`<service>-<subset>` for a subset, the operator's naming) when it
        /// has no pods.
        workload: String,
        ready: Vec<&'a SimPod>,
    },
    /// Envoy answers `response_code` itself and no destination proxy sees the request: Envoy has
    /// no cluster for it (unknown Service or subset), or knows no endpoints of the Service.
    Unresolved { response_code: u16, reason: String },
}

impl Upstream<'_> {
    pub fn unresolved(response_code: u16, reason: String) -> Self {
        Upstream::Unresolved {
            response_code,
            reason,
        }
    }
}

/// What a route object did with one request: the route (or rule) it took, where that leads, and
/// the `set-cookie` the answer carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed<'a> {
    /// The route's or rule's name ("" when unnamed), for the log.
    pub route: &'a str,
    pub upstream: Upstream<'a>,
    /// Envoy adds route response headers to its own replies too, so this is set either way.
    pub set_cookie: Option<&'a str>,
}

/// A request through `service` as Envoy routes it: `None` when no route matches (Envoy's 404).
pub fn route_virtual_service<'a, R: Rng + ?Sized>(
    state: &'a MeshState,
    service: &'a VirtualService,
    request: &SyntheticRequest,
    rng: &mut R,
    regexes: &mut RegexCache,
) -> Option<Routed<'a>> {
    let choice = choose_route(service, request, rng, regexes)?;
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    Some(Routed {
        route: choice.route,
        upstream: resolve_upstream(state, namespace, &choice.destination.destination),
        set_cookie: choice.destination.set_cookie(),
    })
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
        return Upstream::unresolved(
            CLUSTER_NOT_FOUND,
            format!("{fqdn} is not an in-cluster Service"),
        );
    };
    let subset = if destination.subset.is_empty() {
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
            Some((_, labels)) => Some((destination.subset.as_str(), labels)),
            None => {
                return Upstream::unresolved(
                    CLUSTER_NOT_FOUND,
                    format!(
                        "no DestinationRule subset {:?} for {fqdn}",
                        destination.subset
                    ),
                );
            }
        }
    };
    service_upstream(
        state,
        service_name,
        service_namespace,
        subset,
        CLUSTER_NOT_FOUND,
    )
}

/// The pods of Service `namespace/name` by its selector, those of them that also carry the
/// `subset`'s labels when one is given. A Service that does not exist is answered `not_found`.
pub fn service_upstream<'a>(
    state: &'a MeshState,
    name: &str,
    namespace: &str,
    subset: Option<(&str, &BTreeMap<String, String>)>,
    not_found: u16,
) -> Upstream<'a> {
    let Some(service) = state
        .services
        .iter()
        .find(|s| s.name == name && s.namespace == namespace)
    else {
        return Upstream::unresolved(not_found, format!("no Service {namespace}/{name}"));
    };
    let Some(selector) = &service.selector else {
        return Upstream::unresolved(
            NO_HEALTHY_UPSTREAM,
            format!("Service {namespace}/{name} has no selector"),
        );
    };
    let has_all = |pod: &SimPod, labels: &BTreeMap<String, String>| {
        labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    };
    let members: Vec<&SimPod> = state
        .pods
        .iter()
        .filter(|p| p.namespace == namespace && has_all(p, selector))
        .filter(|p| subset.is_none_or(|(_, labels)| has_all(p, labels)))
        .collect();
    let workload = match (members.first(), subset) {
        (Some(pod), _) => pod.workload.clone(),
        (None, None) => name.to_string(),
        (None, Some((subset, _))) => format!("{name}-{subset}"),
    };
    Upstream::Resolved {
        service: service_fqdn(name, namespace),
        namespace: namespace.to_string(),
        workload,
        ready: members.into_iter().filter(|p| p.ready).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        count_by_workload, healthy_pods, no_testers, plain_release, pod, rng, routes, state,
        tester_release,
    };
    use crate::requests::simulate_request;
    use crate::traffic::Simulator;
    use crate::users::User;
    use chatrelease::annotations::LABEL_NAME;
    use serde_json::json;

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
            let record = simulate_request(&mesh, service, &mut tester, &mut rng, &mut regexes)
                .record
                .unwrap();
            assert_eq!(record.workload, "lobe-chat-canary");
        }
        let mut other = User::default();
        let choice = choose_route(service, &other.request(), &mut rng, &mut regexes).unwrap();
        assert_eq!(choice.route, chatrelease::router::istio::PRIMARY_ROUTE);
        let _ = simulate_request(&mesh, service, &mut other, &mut rng, &mut regexes);
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
}
