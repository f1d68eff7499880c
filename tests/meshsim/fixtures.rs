//! What the unit tests build on: the LobeChat ChatRelease `chat/lobe-chat`, the objects either
//! router of the operator writes for it at a given split, pods of either track, and a seeded
//! random number generator.

use crate::pods::{SimPod, SimService};
use crate::requests::{RouteKey, RouteKind};
use crate::routing::MeshState;
use crate::run::SimRng;
use crate::traffic::{TickReport, TrafficConfig};
use chatrelease::crd::ChatRelease;
use chatrelease::router::Routes;
use chatrelease::router::gateway_api::{self, Attachment};
use chatrelease::workload::{self, Track};
use k8s_openapi::api::core::v1::Pod;
use rand::SeedableRng;
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const STABLE_REV: &str = "aaaa111111";
pub const CANARY_REV: &str = "bbbb222222";

pub fn rng() -> SimRng {
    SimRng::seed_from_u64(7)
}

/// `chat/lobe-chat` with image `lobehub/lobe-chat:v1` and this `spec.traffic`, as the library's
/// own test builder makes it (that one is compiled for the library's tests only).
pub fn release(traffic: Value) -> ChatRelease {
    let mut r: ChatRelease = serde_json::from_value(json!({
        "apiVersion": "chatrelease.io/v1alpha1",
        "kind": "ChatRelease",
        "metadata": {"name": "lobe-chat", "namespace": "chat", "uid": "uid-1", "generation": 1},
        "spec": {
            "template": {"spec": {"containers": [{
                "name": "lobe-chat", "image": "lobehub/lobe-chat:v1",
                "ports": [{"containerPort": 3210}]}]}},
            "service": {"port": 80, "targetPort": 3210},
            "strategy": {"steps": [5, 25, 50, 100], "interval": "1m", "drainTimeout": "5m", "progressDeadline": "10m"},
            "analysis": {"minRequests": 50, "failureLimit": 2, "errorRate": {"max": "1%"}}
        }
    }))
    .unwrap();
    r.spec.traffic = serde_json::from_value(traffic).unwrap();
    r
}

pub fn plain_release() -> ChatRelease {
    release(json!({}))
}

pub fn tester_release(sticky: bool) -> ChatRelease {
    let mut traffic = json!({
        "canaryMatch": [{"headers": {"cookie": {"regex": "^(.*;)?\\s*canary=true(;.*)?$"}}}]
    });
    if sticky {
        traffic["stickyCookie"] = json!("chat-version");
    }
    release(traffic)
}

pub fn routes(canary_weight: i32, canary_routes: bool) -> Routes {
    Routes {
        canary_weight,
        canary_routes,
        stable_revision: Some(STABLE_REV.into()),
        canary_revision: Some(CANARY_REV.into()),
    }
}

/// A pod of `<release>-<track>` as a Deployment's ReplicaSet makes it.
pub fn pod(name: &str, track: &str, ready: bool, env: &[(&str, &str)]) -> Pod {
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

/// The objects the operator's Istio router writes for `release` at `routes`, with these pods.
pub fn state(release: &ChatRelease, routes: &Routes, pods: &[Pod]) -> MeshState {
    Router::Istio.state(release, routes, pods)
}

/// A router of the operator, and what it writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Router {
    /// The VirtualService and DestinationRule `<name>`.
    Istio,
    /// The HTTPRoute `<name>` (attached to Service `<name>`, GAMMA) and a Service per track.
    GatewayApi,
}

/// Both routers, for the tests that hold for either.
pub const ROUTERS: [Router; 2] = [Router::Istio, Router::GatewayApi];

impl Router {
    /// The objects this router writes for `release` at `routes`, with Service `<name>` and these
    /// pods.
    pub fn state(self, release: &ChatRelease, routes: &Routes, pods: &[Pod]) -> MeshState {
        let mut services = vec![workload::service(release)];
        let mut mesh = MeshState {
            pods: pods.iter().map(sim).collect(),
            ..MeshState::default()
        };
        match self {
            Router::Istio => {
                mesh.virtual_services =
                    vec![chatrelease::router::istio::virtual_service(release, routes)];
                mesh.destination_rules =
                    vec![chatrelease::router::istio::destination_rule(release)];
            }
            Router::GatewayApi => {
                let route = gateway_api::http_route(release, &Attachment::default(), routes)
                    .expect("the fixtures' release makes a valid HTTPRoute");
                mesh.http_routes = vec![route];
                services.extend(
                    [Track::Stable, Track::Canary].map(|t| gateway_api::track_service(release, t)),
                );
            }
        }
        mesh.services = services.iter().map(SimService::of_service).collect();
        mesh
    }

    /// The kind of route object it writes.
    pub fn kind(self) -> RouteKind {
        match self {
            Router::Istio => RouteKind::VirtualService,
            Router::GatewayApi => RouteKind::HttpRoute,
        }
    }

    /// Its route object `chat/lobe-chat`.
    pub fn key(self) -> RouteKey {
        RouteKey {
            kind: self.kind(),
            namespace: "chat".into(),
            name: "lobe-chat".into(),
        }
    }
}

pub fn healthy_pods() -> Vec<Pod> {
    vec![
        pod("lobe-chat-stable-5d8f9c7b6-a", "stable", true, &[]),
        pod("lobe-chat-stable-5d8f9c7b6-b", "stable", true, &[]),
        pod("lobe-chat-canary-5d8f9c7b6-c", "canary", true, &[]),
    ]
}

/// Requests per workload from one big tick.
pub fn count_by_workload(report: &TickReport) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in &report.records {
        *counts.entry(r.workload.clone()).or_default() += 1;
    }
    counts
}

pub fn no_testers() -> TrafficConfig {
    TrafficConfig {
        tester_share: 0.0,
        ..TrafficConfig::default()
    }
}
