//! Istio as the traffic router: the DestinationRule that names the two tracks as subsets, and the
//! VirtualService that splits traffic between them. The objects are built by pure functions and
//! applied by `IstioRouter`, one server-side apply each.
//!
//! The types below hold only the fields the operator writes, checked against Istio's
//! `networking.istio.io/v1` CRDs; the rest of Istio's API is deliberately left out.

use crate::annotations::LABEL_TRACK;
use crate::applied::Applied;
use crate::crd::{ChatRelease, HttpMatch, StringMatch};
use crate::error::Error;
use crate::metrics::BoxFuture;
use crate::router::{Routes, TrafficRouter};
use crate::traffic_rules;
use crate::workload::{self, Track};
use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Name of the weighted split, the last HTTP route of the VirtualService.
pub const PRIMARY_ROUTE: &str = "primary";
/// Route for holders of the canary's cookie.
pub const STICKY_CANARY_ROUTE: &str = "sticky-canary";
/// Route for holders of the stable's cookie.
pub const STICKY_STABLE_ROUTE: &str = "sticky-stable";

/// The parts of Istio's VirtualService spec the operator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "VirtualService",
    plural = "virtualservices",
    namespaced,
    // Istio owns and installs this CRD; we only need the Rust type to talk to the API.
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways the routes bind to; absent means the mesh only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

/// One HTTP route: optional match conditions and where matching requests go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Shown in Envoy's stats and access logs.
    pub name: String,
    /// Any one of these matches selects the route; none means every request.
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Destinations with their weights.
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
}

/// A destination of a route, its share of the route's traffic and headers to change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Percent of the route's requests; the weights of a route add up to 100.
    #[serde(default)]
    pub weight: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

impl HttpRouteDestination {
    /// The `set-cookie` this destination adds to its responses (the sticky cookie), if any.
    pub fn set_cookie(&self) -> Option<&str> {
        self.headers
            .as_ref()?
            .response
            .as_ref()?
            .add
            .get("set-cookie")
            .map(String::as_str)
    }
}

/// A subset of a Service at one port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The Service, by its short name: Istio reads it in the VirtualService's namespace.
    pub host: String,
    /// `stable` or `canary`, as the DestinationRule names them.
    pub subset: String,
    pub port: PortSelector,
}

/// Istio selects a port by an object, not a bare number.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    pub number: i32,
}

/// Header changes on a destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Headers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// Headers to append.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HeaderOperations {
    /// `add` appends rather than `set`, so the app's own `set-cookie` headers survive.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
}

/// The parts of Istio's DestinationRule spec the operator writes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "DestinationRule",
    plural = "destinationrules",
    namespaced,
    // Istio owns and installs this CRD; we only need the Rust type to talk to the API.
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The Service the subsets divide.
    pub host: String,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

/// A named group of the Service's pods, chosen by labels.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The DestinationRule `<name>`: subsets `stable` and `canary` of the Service `<name>`, by the
/// label `chatrelease.io/track`.
pub fn destination_rule(release: &ChatRelease) -> DestinationRule {
    let subset = |track: Track| Subset {
        name: track.as_str().to_string(),
        labels: BTreeMap::from([(LABEL_TRACK.to_string(), track.as_str().to_string())]),
    };
    DestinationRule {
        metadata: workload::owned_meta(release, release.name_any()),
        spec: DestinationRuleSpec {
            host: release.name_any(),
            subsets: vec![subset(Track::Stable), subset(Track::Canary)],
        },
    }
}

/// The hosts of the VirtualService: the spec's, else the Service's in-cluster name.
pub fn hosts(release: &ChatRelease) -> Vec<String> {
    let hosts = &release.spec.traffic.istio.hosts;
    if !hosts.is_empty() {
        return hosts.clone();
    }
    // A ChatRelease read from the API always has a namespace; "default" is what the API server
    // would have given one created without.
    let namespace = release.namespace().unwrap_or_else(|| "default".to_string());
    vec![format!(
        "{}.{namespace}.svc.cluster.local",
        release.name_any()
    )]
}

/// RE2 regex matching a Cookie header that holds `name=value` anywhere among its cookies.
pub fn cookie_regex(name: &str, value: &str) -> String {
    format!(
        r"^(.*;\s*)?{}={}(;.*)?$",
        re2_escape(name),
        re2_escape(value)
    )
}

/// Cookie names and revisions are validated or hex today; escaping keeps a regex that matches only
/// the literal cookie if either ever holds a metacharacter.
fn re2_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if c.is_ascii_punctuation() && c != '_' && c != '-' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `set-cookie` value that pins a user to `revision`. No Max-Age: a session cookie is enough to
/// keep a conversation on one version, and it does not outlive the user's interest.
pub fn set_cookie_value(cookie: &str, revision: &str) -> String {
    format!("{cookie}={revision}; Path=/; SameSite=Lax")
}

fn destination(release: &ChatRelease, track: Track, weight: i32) -> HttpRouteDestination {
    HttpRouteDestination {
        destination: Destination {
            host: release.name_any(),
            subset: track.as_str().to_string(),
            port: PortSelector {
                number: release.spec.service.port,
            },
        },
        weight,
        headers: None,
    }
}

fn cookie_match(cookie: &str, revision: &str) -> HttpMatch {
    HttpMatch {
        headers: Some(BTreeMap::from([(
            "cookie".to_string(),
            StringMatch {
                regex: Some(cookie_regex(cookie, revision)),
                ..Default::default()
            },
        )])),
        ..Default::default()
    }
}

fn sets_cookie(
    mut dest: HttpRouteDestination,
    cookie: &str,
    revision: &str,
) -> HttpRouteDestination {
    dest.headers = Some(Headers {
        response: Some(HeaderOperations {
            add: BTreeMap::from([("set-cookie".to_string(), set_cookie_value(cookie, revision))]),
        }),
    });
    dest
}

/// The VirtualService `<name>` for `routes`: canaryMatch routes (while `canary_routes`), then the
/// sticky-cookie routes, then the weighted split `primary`.
pub fn virtual_service(release: &ChatRelease, routes: &Routes) -> VirtualService {
    let traffic = &release.spec.traffic;
    // The rollout only asks for 0..=100; clamping keeps a bad value from producing negative weights.
    let canary_weight = routes.canary_weight.clamp(0, 100);
    let mut http = Vec::new();

    if routes.canary_routes {
        http.extend(
            traffic
                .canary_match
                .iter()
                .enumerate()
                // Settings refuse such a spec before any write; should one get here anyway, a
                // match that holds for every request (none at all, `headers: {}`, uri prefix "/")
                // is left out rather than sending every user to the canary.
                .filter(|(_, m)| traffic_rules::matches_every_request(m).is_none())
                .map(|(i, m)| HttpRoute {
                    name: format!("canary-match-{i}"),
                    matches: vec![m.clone()],
                    route: vec![destination(release, Track::Canary, 100)],
                }),
        );
    }

    let sticky = traffic.sticky_cookie.as_deref();
    if let Some(cookie) = sticky {
        let stable_revision = routes.stable_revision.as_deref();
        let canary_revision = routes.canary_revision.as_deref();
        if let Some(revision) = canary_revision
            && routes.canary_routes
            // A cookie must name one version; with equal revisions stable serves it.
            && canary_revision != stable_revision
        {
            http.push(HttpRoute {
                name: STICKY_CANARY_ROUTE.to_string(),
                matches: vec![cookie_match(cookie, revision)],
                route: vec![destination(release, Track::Canary, 100)],
            });
        }
        if let Some(revision) = stable_revision {
            http.push(HttpRoute {
                name: STICKY_STABLE_ROUTE.to_string(),
                matches: vec![cookie_match(cookie, revision)],
                route: vec![destination(release, Track::Stable, 100)],
            });
        }
    }

    let mut stable = destination(release, Track::Stable, 100 - canary_weight);
    let mut canary = destination(release, Track::Canary, canary_weight);
    if let Some(cookie) = sticky {
        // Whoever the split sends somewhere is told so, and the cookie routes keep them there.
        if let Some(revision) = routes.stable_revision.as_deref() {
            stable = sets_cookie(stable, cookie, revision);
        }
        if let Some(revision) = routes.canary_revision.as_deref() {
            canary = sets_cookie(canary, cookie, revision);
        }
    }
    http.push(HttpRoute {
        name: PRIMARY_ROUTE.to_string(),
        matches: Vec::new(),
        route: vec![stable, canary],
    });

    VirtualService {
        metadata: workload::owned_meta(release, release.name_any()),
        spec: VirtualServiceSpec {
            hosts: hosts(release),
            // Copied as written: Istio drops the implicit "mesh" once gateways are listed, and
            // adding it back is the user's choice, not ours.
            gateways: traffic.istio.gateways.clone(),
            http,
        },
    }
}

/// Routes traffic with Istio: one DestinationRule and one VirtualService per ChatRelease.
#[derive(Clone)]
pub struct IstioRouter {
    pub client: kube::Client,
    applied: Arc<Applied>,
}

impl IstioRouter {
    /// A router that writes through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self::with_applied(client, Arc::default())
    }

    /// A router that writes through `client`, skipping what `applied` says is already there.
    pub fn with_applied(client: kube::Client, applied: Arc<Applied>) -> Self {
        Self { client, applied }
    }
}

/// What the Istio router needs from the API server.
pub const ISTIO_CRDS: &str =
    "Istio's VirtualService and DestinationRule CRDs (networking.istio.io, v1)";

impl TrafficRouter for IstioRouter {
    fn reconcile<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let namespace = super::namespace_of(release)?;
            let rule = destination_rule(release);
            tracing::debug!(release = %release.name_any(), %namespace, "applying DestinationRule");
            self.applied
                .apply(&self.client, &namespace, &rule)
                .await
                .map(|_sent| ())
                .map_err(|error| super::unavailable_when_unknown(error, "istio", ISTIO_CRDS))
        })
    }

    fn set_routes<'a>(
        &'a self,
        release: &'a ChatRelease,
        routes: &'a Routes,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let namespace = super::namespace_of(release)?;
            let service = virtual_service(release, routes);
            super::log_split(release, &namespace, routes);
            self.applied
                .apply(&self.client, &namespace, &service)
                .await
                .map(|_sent| ())
                .map_err(|error| super::unavailable_when_unknown(error, "istio", ISTIO_CRDS))
        })
    }

    fn remove<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let namespace = super::namespace_of(release)?;
            let name = release.name_any();
            super::delete_owned::<VirtualService>(&self.client, &namespace, &name).await?;
            super::delete_owned::<DestinationRule>(&self.client, &namespace, &name).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::MANAGER;
    use crate::router::crd_schema;
    use assert_json_diff::assert_json_eq;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::time::Duration;

    const STABLE_REV: &str = "aaaa111111";
    const CANARY_REV: &str = "bbbb222222";

    fn release_with(traffic: Value) -> ChatRelease {
        let mut r: ChatRelease = serde_json::from_value(json!({
            "apiVersion": "chatrelease.io/v1alpha1", "kind": "ChatRelease",
            "metadata": {"name": "lobe-chat", "namespace": "chat", "uid": "u-1"},
            "spec": {
                "template": {"spec": {"containers": [{"name": "app", "image": "lobehub/lobe-chat:v1"}]}},
                "service": {"port": 8080, "targetPort": 3210},
                "traffic": traffic,
            }
        }))
        .unwrap();
        r.metadata.uid = Some("u-1".into());
        r
    }

    fn release() -> ChatRelease {
        release_with(json!({}))
    }

    /// Testers by header and by cookie, and a sticky cookie.
    fn full_release() -> ChatRelease {
        release_with(json!({
            "istio": {"hosts": ["chat.example.com"], "gateways": ["istio-system/public"]},
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

    fn route<'a>(vs: &'a VirtualService, name: &str) -> &'a HttpRoute {
        vs.spec
            .http
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no route {name}"))
    }

    fn route_names(vs: &VirtualService) -> Vec<&str> {
        vs.spec.http.iter().map(|r| r.name.as_str()).collect()
    }

    /// (subset, weight) of each destination of a route.
    fn split(route: &HttpRoute) -> Vec<(&str, i32)> {
        route
            .route
            .iter()
            .map(|d| (d.destination.subset.as_str(), d.weight))
            .collect()
    }

    #[test]
    fn at_5_percent_stable_gets_95_and_canary_5() {
        let vs = virtual_service(&release(), &routes(5, true));
        assert_eq!(route_names(&vs), vec![PRIMARY_ROUTE]);
        assert_eq!(
            split(route(&vs, PRIMARY_ROUTE)),
            vec![("stable", 95), ("canary", 5)]
        );
    }

    #[test]
    fn at_full_canary_stable_gets_0_and_canary_100() {
        let vs = virtual_service(&full_release(), &routes(100, true));
        assert_eq!(
            split(route(&vs, PRIMARY_ROUTE)),
            vec![("stable", 0), ("canary", 100)]
        );
    }

    #[test]
    fn after_rollback_everything_goes_to_stable_with_no_canary_match_or_canary_cookie_routes() {
        let vs = virtual_service(&full_release(), &routes(0, false));
        assert_eq!(route_names(&vs), vec![STICKY_STABLE_ROUTE, PRIMARY_ROUTE]);
        assert_eq!(
            split(route(&vs, PRIMARY_ROUTE)),
            vec![("stable", 100), ("canary", 0)]
        );
        assert_eq!(
            split(route(&vs, STICKY_STABLE_ROUTE)),
            vec![("stable", 100)]
        );
    }

    #[test]
    fn weights_outside_0_to_100_are_clamped() {
        let vs = virtual_service(&release(), &routes(140, true));
        assert_eq!(
            split(route(&vs, PRIMARY_ROUTE)),
            vec![("stable", 0), ("canary", 100)]
        );
    }

    #[test]
    fn canary_match_routes_come_first_and_send_everything_to_the_canary() {
        let r = full_release();
        let vs = virtual_service(&r, &routes(25, true));
        assert_eq!(
            route_names(&vs),
            vec![
                "canary-match-0",
                "canary-match-1",
                STICKY_CANARY_ROUTE,
                STICKY_STABLE_ROUTE,
                PRIMARY_ROUTE
            ]
        );
        for (i, m) in r.spec.traffic.canary_match.iter().enumerate() {
            let tester = route(&vs, &format!("canary-match-{i}"));
            assert_eq!(tester.matches, vec![m.clone()]);
            assert_eq!(split(tester), vec![("canary", 100)]);
            assert_eq!(tester.route[0].set_cookie(), None);
        }
    }

    #[test]
    fn a_canary_match_that_holds_for_every_request_never_becomes_a_route() {
        // Settings refuse these; the VirtualService must not send everyone to the canary anyway.
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
        let vs = virtual_service(&r, &routes(25, true));
        assert_eq!(route_names(&vs), vec!["canary-match-1", PRIMARY_ROUTE]);
        for route in &vs.spec.http {
            if route
                .route
                .iter()
                .any(|d| d.destination.subset == "canary" && d.weight == 100)
            {
                assert!(!route.matches.is_empty(), "{} has no match", route.name);
                for m in &route.matches {
                    assert_eq!(
                        traffic_rules::matches_every_request(m),
                        None,
                        "{}",
                        route.name
                    );
                }
            }
        }
        assert_eq!(
            split(route(&vs, PRIMARY_ROUTE)),
            vec![("stable", 75), ("canary", 25)]
        );
    }

    #[test]
    fn canary_match_routes_exist_only_while_canary_routes_are_on() {
        let vs = virtual_service(&full_release(), &routes(25, false));
        assert!(
            !route_names(&vs)
                .iter()
                .any(|n| n.starts_with("canary-match"))
        );
    }

    #[test]
    fn sticky_cookie_keeps_users_on_their_version_both_ways() {
        let vs = virtual_service(&full_release(), &routes(25, true));

        let to_canary = route(&vs, STICKY_CANARY_ROUTE);
        assert_eq!(split(to_canary), vec![("canary", 100)]);
        let cookie = &to_canary.matches[0].headers.as_ref().unwrap()["cookie"];
        assert_eq!(
            cookie.regex.as_deref(),
            Some(r"^(.*;\s*)?chat-version=bbbb222222(;.*)?$")
        );

        let to_stable = route(&vs, STICKY_STABLE_ROUTE);
        assert_eq!(split(to_stable), vec![("stable", 100)]);
        let cookie = &to_stable.matches[0].headers.as_ref().unwrap()["cookie"];
        assert_eq!(
            cookie.regex.as_deref(),
            Some(r"^(.*;\s*)?chat-version=aaaa111111(;.*)?$")
        );

        let primary = route(&vs, PRIMARY_ROUTE);
        assert_eq!(
            primary.route[0].set_cookie(),
            Some("chat-version=aaaa111111; Path=/; SameSite=Lax")
        );
        assert_eq!(
            primary.route[1].set_cookie(),
            Some("chat-version=bbbb222222; Path=/; SameSite=Lax")
        );
    }

    #[test]
    fn after_promotion_the_promoted_revisions_cookie_lands_on_stable() {
        // Promotion: stable now runs what the canary ran, and no canary is left.
        let promoted = Routes {
            canary_weight: 0,
            canary_routes: false,
            stable_revision: Some(CANARY_REV.into()),
            canary_revision: None,
        };
        let vs = virtual_service(&full_release(), &promoted);
        assert_eq!(route_names(&vs), vec![STICKY_STABLE_ROUTE, PRIMARY_ROUTE]);
        let to_stable = route(&vs, STICKY_STABLE_ROUTE);
        let cookie = &to_stable.matches[0].headers.as_ref().unwrap()["cookie"];
        assert_eq!(
            cookie.regex.as_deref(),
            Some(r"^(.*;\s*)?chat-version=bbbb222222(;.*)?$")
        );
        assert_eq!(route(&vs, PRIMARY_ROUTE).route[1].set_cookie(), None);
    }

    #[test]
    fn without_a_sticky_cookie_there_are_no_cookie_routes_or_headers() {
        let vs = virtual_service(&release(), &routes(50, true));
        let primary = route(&vs, PRIMARY_ROUTE);
        assert!(primary.route.iter().all(|d| d.headers.is_none()));
        assert_eq!(route_names(&vs), vec![PRIMARY_ROUTE]);
    }

    #[test]
    fn cookie_regex_escapes_metacharacters() {
        assert_eq!(cookie_regex("a.b", "1+2"), r"^(.*;\s*)?a\.b=1\+2(;.*)?$");
    }

    #[test]
    fn destinations_use_the_service_name_and_port() {
        let vs = virtual_service(&full_release(), &routes(5, true));
        for dest in vs.spec.http.iter().flat_map(|r| &r.route) {
            assert_eq!(dest.destination.host, "lobe-chat");
            assert_eq!(dest.destination.port.number, 8080);
        }
    }

    #[test]
    fn default_host_is_the_services_in_cluster_name_and_no_gateways() {
        let vs = virtual_service(&release(), &routes(5, true));
        assert_eq!(vs.spec.hosts, vec!["lobe-chat.chat.svc.cluster.local"]);
        assert!(vs.spec.gateways.is_empty());
        let json = serde_json::to_value(&vs).unwrap();
        assert!(json["spec"].get("gateways").is_none());
    }

    #[test]
    fn hosts_and_gateways_come_from_the_spec_and_mesh_is_not_invented() {
        let vs = virtual_service(&full_release(), &routes(5, true));
        assert_eq!(vs.spec.hosts, vec!["chat.example.com"]);
        assert_eq!(vs.spec.gateways, vec!["istio-system/public"]);

        let both = release_with(json!({"istio": {"gateways": ["istio-system/public", "mesh"]}}));
        let vs = virtual_service(&both, &routes(5, true));
        assert_eq!(vs.spec.gateways, vec!["istio-system/public", "mesh"]);
    }

    #[test]
    fn destination_rule_subsets_select_the_tracks_of_the_service() {
        let dr = destination_rule(&release());
        assert_eq!(dr.metadata.name.as_deref(), Some("lobe-chat"));
        assert_eq!(dr.metadata.namespace.as_deref(), Some("chat"));
        assert_eq!(dr.spec.host, "lobe-chat");
        let subsets: Vec<_> = dr
            .spec
            .subsets
            .iter()
            .map(|s| (s.name.as_str(), s.labels.clone()))
            .collect();
        assert_eq!(
            subsets,
            vec![
                (
                    "stable",
                    BTreeMap::from([(LABEL_TRACK.to_string(), "stable".to_string())])
                ),
                (
                    "canary",
                    BTreeMap::from([(LABEL_TRACK.to_string(), "canary".to_string())])
                ),
            ]
        );
    }

    #[test]
    fn both_objects_are_named_after_and_owned_by_the_release() {
        let r = release();
        let vs = virtual_service(&r, &routes(5, true));
        let dr = destination_rule(&r);
        for meta in [&vs.metadata, &dr.metadata] {
            assert_eq!(meta.name.as_deref(), Some("lobe-chat"));
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            let owner = &owners[0];
            assert_eq!(owner.api_version, "chatrelease.io/v1alpha1");
            assert_eq!(owner.kind, "ChatRelease");
            assert_eq!(owner.name, "lobe-chat");
            assert_eq!(owner.uid, "u-1");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(
                meta.labels.as_ref().unwrap()[crate::annotations::LABEL_MANAGED_BY],
                MANAGER
            );
        }
    }

    // --- The serialized objects against Istio's real CRDs ---

    /// Where `object` breaks version v1 of the Istio CRD `crd_name`, from the file of Istio's
    /// CRDs that `make tools` cuts from the `istio.io/api` module (`make unit-test` names it in
    /// `ISTIO_CRDS`, as it hands it to the local control plane).
    fn check_against_crd(object: &Value, crd_name: &str, kind: &str) -> Vec<String> {
        let crd = crd_schema::crd("ISTIO_CRDS", "the istio.io/api module", crd_name);
        let schema = crd_schema::v1_schema(&crd);
        crd_schema::check(object, &schema, "networking.istio.io/v1", kind).violations
    }

    #[test]
    fn serialized_objects_use_only_fields_of_istios_crds() {
        let r = full_release();
        let vs = serde_json::to_value(virtual_service(&r, &routes(25, true))).unwrap();
        let dr = serde_json::to_value(destination_rule(&r)).unwrap();
        // The walk must see every kind of field we write, or the check proves little.
        let text = vs.to_string();
        for field in [
            "\"match\"",
            "\"queryParams\"",
            "\"uri\"",
            "\"set-cookie\"",
            "\"gateways\"",
            "\"number\"",
        ] {
            assert!(text.contains(field), "{field} not exercised");
        }
        assert_eq!(
            check_against_crd(&vs, "virtualservices.networking.istio.io", "VirtualService"),
            Vec::<String>::new()
        );
        assert_eq!(
            check_against_crd(
                &dr,
                "destinationrules.networking.istio.io",
                "DestinationRule"
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_crd_check_catches_a_misspelled_field() {
        let mut dr = serde_json::to_value(destination_rule(&release())).unwrap();
        dr["spec"]["subsets"][0]["label"] = json!({});
        dr["spec"]["subsets"][1]
            .as_object_mut()
            .unwrap()
            .remove("name");
        dr["spec"]["host"] = json!(7);
        assert_eq!(
            check_against_crd(
                &dr,
                "destinationrules.networking.istio.io",
                "DestinationRule"
            ),
            vec![
                "spec.host: integer where the CRD has Some(\"string\")",
                "spec.subsets[0].label: not a field of the CRD",
                "spec.subsets[1].name: required and missing",
            ]
        );
    }

    // --- IstioRouter against a mocked API server ---

    type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn mock_router() -> (IstioRouter, ApiServerHandle) {
        let (mock_service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (
            IstioRouter::new(kube::Client::new(mock_service, "default")),
            handle,
        )
    }

    const APPLY_QUERY: &str = "?&force=true&fieldManager=chatrelease-operator";

    /// Expects one PATCH to `path` with `expected` as body and answers with the body; then expects
    /// no further request.
    async fn expect_one_apply(
        mut handle: ApiServerHandle,
        path: String,
        expected: Value,
        status: u16,
    ) {
        let (request, send) = handle.next_request().await.expect("no request came");
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().to_string(), format!("{path}{APPLY_QUERY}"));
        assert_eq!(
            request.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        let sent: Value = serde_json::from_slice(&body).unwrap();
        assert_json_eq!(sent, expected);
        let answer = if status == 200 {
            body.to_vec()
        } else {
            serde_json::to_vec(&json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "VirtualService.networking.istio.io \"lobe-chat\" is invalid",
                "reason": "Invalid", "code": status
            }))
            .unwrap()
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(answer))
                .unwrap(),
        );
        // The client is dropped once the router is done: any second call would show up here.
        assert!(handle.next_request().await.is_none(), "a second request");
    }

    fn expected_virtual_service() -> Value {
        let owner = json!([{"apiVersion": "chatrelease.io/v1alpha1", "kind": "ChatRelease",
            "name": "lobe-chat", "uid": "u-1", "controller": true}]);
        let dest = |subset: &str, weight: i32| {
            json!({"destination": {"host": "lobe-chat", "subset": subset, "port": {"number": 8080}},
                   "weight": weight})
        };
        let sticky = |subset: &str, weight: i32, rev: &str| {
            let mut d = dest(subset, weight);
            d["headers"] = json!({"response": {"add": {
                "set-cookie": format!("chat-version={rev}; Path=/; SameSite=Lax")}}});
            d
        };
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {
                "name": "lobe-chat", "namespace": "chat",
                "labels": {"app.kubernetes.io/name": "lobe-chat",
                           "app.kubernetes.io/managed-by": "chatrelease-operator"},
                "ownerReferences": owner
            },
            "spec": {
                "hosts": ["chat.example.com"],
                "gateways": ["istio-system/public"],
                "http": [
                    {"name": "canary-match-0",
                     "match": [{"headers": {"cookie": {"regex": "^(.*;)?\\s*canary=true(;.*)?$"}}}],
                     "route": [dest("canary", 100)]},
                    {"name": "canary-match-1",
                     "match": [{"headers": {"x-user-tier": {"exact": "premium"}},
                                "uri": {"prefix": "/chat"},
                                "queryParams": {"beta": {"exact": "1"}}}],
                     "route": [dest("canary", 100)]},
                    {"name": "sticky-canary",
                     "match": [{"headers": {"cookie": {"regex": "^(.*;\\s*)?chat-version=bbbb222222(;.*)?$"}}}],
                     "route": [dest("canary", 100)]},
                    {"name": "sticky-stable",
                     "match": [{"headers": {"cookie": {"regex": "^(.*;\\s*)?chat-version=aaaa111111(;.*)?$"}}}],
                     "route": [dest("stable", 100)]},
                    {"name": "primary",
                     "route": [sticky("stable", 75, STABLE_REV), sticky("canary", 25, CANARY_REV)]}
                ]
            }
        })
    }

    #[tokio::test]
    async fn set_routes_is_one_server_side_apply_of_the_whole_virtual_service() {
        let (router, handle) = mock_router();
        let server = tokio::spawn(expect_one_apply(
            handle,
            "/apis/networking.istio.io/v1/namespaces/chat/virtualservices/lobe-chat".into(),
            expected_virtual_service(),
            200,
        ));
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            router.set_routes(&full_release(), &routes(25, true)),
        )
        .await
        .expect("set_routes timed out");
        assert!(result.is_ok(), "{result:?}");
        drop(router);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("API server never saw the expected call")
            .unwrap();
    }

    #[tokio::test]
    async fn reconcile_is_one_server_side_apply_of_the_destination_rule() {
        let (router, handle) = mock_router();
        let expected = serde_json::to_value(destination_rule(&full_release())).unwrap();
        assert_eq!(expected["spec"]["host"], "lobe-chat");
        let server = tokio::spawn(expect_one_apply(
            handle,
            "/apis/networking.istio.io/v1/namespaces/chat/destinationrules/lobe-chat".into(),
            expected,
            200,
        ));
        let result =
            tokio::time::timeout(Duration::from_secs(5), router.reconcile(&full_release()))
                .await
                .expect("reconcile timed out");
        assert!(result.is_ok(), "{result:?}");
        drop(router);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("API server never saw the expected call")
            .unwrap();
    }

    #[tokio::test]
    async fn a_refused_virtual_service_is_an_error_naming_the_object() {
        let (router, handle) = mock_router();
        let server = tokio::spawn(expect_one_apply(
            handle,
            "/apis/networking.istio.io/v1/namespaces/chat/virtualservices/lobe-chat".into(),
            expected_virtual_service(),
            422,
        ));
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            router.set_routes(&full_release(), &routes(25, true)),
        )
        .await
        .expect("set_routes timed out");
        let err = result.unwrap_err();
        assert!(err.is_invalid_object(), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("apply VirtualService chat/lobe-chat: "),
            "{err}"
        );
        drop(router);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("API server never saw the expected call")
            .unwrap();
    }
}
