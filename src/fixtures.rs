//! Test fixtures: ChatRelease builders, Deployments in any state, a metrics double, and a mocked
//! API server (kube-rs controller-rs style: `tower_test::mock::pair` behind `Client::new`) that
//! records every call the reconciler makes and answers as the API server would.

use crate::annotations::{LABEL_REVISION, MANAGER};
use crate::controller::Context;
use crate::crd::{ChatRelease, ChatReleaseStatus, Phase};
use crate::metrics::{AnalysisTarget, BoxFuture, MetricsSource, Observations, TrackSample};
use crate::router::Routers;
use crate::workload::{self, Track};
use http::{Request, Response};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const NAMESPACE: &str = "chat";
pub const NAME: &str = "lobe-chat";

impl ChatRelease {
    /// A ChatRelease as a user applies it: image `lobehub/lobe-chat:<version>`, 1m interval.
    pub fn test(version: &str) -> Self {
        let mut release: ChatRelease = serde_json::from_value(json!({
            "apiVersion": "chatrelease.io/v1alpha1",
            "kind": "ChatRelease",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "uid-1", "generation": 1},
            "spec": {
                "template": {"spec": {"containers": [{
                    "name": "lobe-chat", "image": format!("lobehub/lobe-chat:{version}"),
                    "ports": [{"containerPort": 3210}]}]}},
                "service": {"port": 80, "targetPort": 3210},
                "strategy": {"steps": [5, 25, 50, 100], "interval": "1m", "drainTimeout": "5m", "progressDeadline": "10m"},
                "analysis": {"minRequests": 50, "failureLimit": 2, "errorRate": {"max": "1%"}}
            }
        }))
        .expect("test ChatRelease deserialises");
        release.metadata.uid = Some("uid-1".into());
        release
    }

    pub fn with_status(mut self, status: ChatReleaseStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn annotated(mut self, key: &str) -> Self {
        self.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), "true".into());
        self
    }

    pub fn revision(&self) -> String {
        self.spec.template.revision()
    }
}

/// Status of a release whose stable track runs `stable` (a release built with `ChatRelease::test`).
pub fn settled_status(stable: &ChatRelease) -> ChatReleaseStatus {
    ChatReleaseStatus {
        phase: Phase::Stable,
        stable_revision: Some(stable.revision()),
        stable_image: Some(workload::image_of(&stable.spec.template)),
        observed_generation: Some(1),
        ..Default::default()
    }
}

/// Status of a canary of `canary` at step `step`, entered at `since`.
pub fn canary_status(
    stable: &ChatRelease,
    canary: &ChatRelease,
    step: i32,
    since: Timestamp,
) -> ChatReleaseStatus {
    let steps = [5, 25, 50, 100];
    ChatReleaseStatus {
        phase: Phase::Progressing,
        canary_weight: steps[step as usize],
        current_step: Some(step),
        canary_revision: Some(canary.revision()),
        canary_image: Some(workload::image_of(&canary.spec.template)),
        canary_started_at: Some(Time(since)),
        step_started_at: Some(Time(since)),
        ..settled_status(stable)
    }
}

/// The Deployment a track has when it runs `release`'s template with `ready` of `replicas` Ready.
pub fn deployment(release: &ChatRelease, track: Track, replicas: i32, ready: i32) -> Deployment {
    let mut d = workload::deployment(
        release,
        track,
        &release.spec.template,
        &release.revision(),
        replicas,
    );
    d.metadata.generation = Some(1);
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(replicas),
        available_replicas: Some(ready),
        ..Default::default()
    });
    d
}

/// `deployment` read as the operator's watch reads it: from the JSON the API server sends.
pub fn cached_deployment(deployment: &Deployment) -> crate::workload::TrackDeployment {
    let json = serde_json::to_value(deployment).expect("a Deployment serialises");
    serde_json::from_value(json).expect("the cache's view of a Deployment deserialises")
}

/// Metrics that always answer the same, counting how often they were asked.
pub struct FixedMetrics {
    pub observations: Mutex<Observations>,
    /// The window of every question asked, in order.
    pub windows: Mutex<Vec<std::time::Duration>>,
}

impl FixedMetrics {
    pub fn healthy() -> Self {
        Self {
            observations: Mutex::new(Observations::Sampled {
                canary: track_sample(2000.0, 2.0),
                stable: track_sample(38000.0, 40.0),
            }),
            windows: Mutex::default(),
        }
    }

    /// Analyses over `window` asked so far.
    pub fn asked_over(&self, window: std::time::Duration) -> usize {
        let windows = self.windows.lock().expect("windows lock");
        windows.iter().filter(|w| **w == window).count()
    }
}

/// A track's numbers with a P99 of 800 ms.
pub fn track_sample(requests: f64, errors: f64) -> TrackSample {
    TrackSample {
        requests: Some(requests),
        errors: Some(errors),
        latency_p99_ms: Some(800.0),
        custom: Default::default(),
    }
}

impl MetricsSource for FixedMetrics {
    fn observe<'a>(&'a self, target: &'a AnalysisTarget) -> BoxFuture<'a, Observations> {
        self.windows
            .lock()
            .expect("windows lock")
            .push(target.window);
        let observations = self.observations.lock().expect("observations lock").clone();
        Box::pin(async move { observations })
    }
}

/// One request the reconciler sent.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query, e.g. `/apis/apps/v1/namespaces/chat/deployments/lobe-chat-stable?...`.
    pub uri: String,
    pub body: Value,
}

impl Call {
    pub fn is(&self, method: &str, path_part: &str) -> bool {
        self.method == method && self.uri.contains(path_part)
    }
}

/// A fake API server for one reconcile at a time: records calls, answers with plausible objects.
pub struct ApiServer {
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub release: Arc<Mutex<ChatRelease>>,
    /// Set: the namespace is being deleted, and writes of new content are refused as Kubernetes
    /// refuses them (403, cause NamespaceTerminating).
    pub namespace_terminating: Arc<AtomicBool>,
    /// Writes whose path contains this fail with 500, as an overloaded API server answers.
    pub failing_writes: Arc<Mutex<Option<String>>>,
    /// Resources (such as `httproutes`) this API server does not serve: their CRD is missing.
    pub unknown_resources: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls lock").clone()
    }

    pub fn clear(&self) {
        self.calls.lock().expect("calls lock").clear();
    }

    /// Calls that wrote something (everything but Events).
    pub fn writes(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method != "GET" && !c.uri.contains("/events"))
            .collect()
    }

    pub fn events(&self) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.uri.contains("/events"))
            .map(|c| c.body)
            .collect()
    }

    pub fn virtual_service_writes(&self) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.is("PATCH", "/virtualservices/"))
            .map(|c| c.body)
            .collect()
    }

    pub fn deployment_applies(&self, track: Track) -> Vec<Value> {
        let path = format!("/deployments/{}?", track.workload_name(NAME));
        self.calls()
            .into_iter()
            .filter(|c| c.is("PATCH", &path))
            .map(|c| c.body)
            .collect()
    }

    pub fn scale_writes(&self, track: Track) -> Vec<Value> {
        let path = format!("/deployments/{}/scale", track.workload_name(NAME));
        self.calls()
            .into_iter()
            .filter(|c| c.is("PATCH", &path))
            .map(|c| c.body)
            .collect()
    }

    pub fn status_writes(&self) -> Vec<ChatReleaseStatus> {
        self.calls()
            .into_iter()
            .filter(|c| c.is("PATCH", "/chatreleases/lobe-chat/status"))
            .map(|c| {
                serde_json::from_value(c.body["status"].clone())
                    .expect("status body is a ChatReleaseStatus")
            })
            .collect()
    }
}

/// A client whose every request goes to an `ApiServer` that answers like Kubernetes would.
pub fn mock_client(release: &ChatRelease) -> (Client, ApiServer) {
    let server = ApiServer {
        calls: Arc::default(),
        release: Arc::new(Mutex::new(release.clone())),
        namespace_terminating: Arc::default(),
        failing_writes: Arc::default(),
        unknown_resources: Arc::default(),
    };
    let calls = server.calls.clone();
    let stored = server.release.clone();
    let terminating = server.namespace_terminating.clone();
    let failing = server.failing_writes.clone();
    let unknown = server.unknown_resources.clone();
    let client = client_answered_by(NAMESPACE, move |method, uri, body| {
        calls.lock().expect("calls lock").push(Call {
            method: method.to_string(),
            uri: uri.to_string(),
            body: body.clone(),
        });
        if terminating.load(Ordering::SeqCst) && method != "GET" && !uri.contains("/chatreleases/")
        {
            return (403, namespace_terminating_status(uri));
        }
        let fails = failing.lock().expect("failing lock");
        if method != "GET" && fails.as_deref().is_some_and(|path| uri.contains(path)) {
            return (
                500,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                       "reason": "InternalError", "message": "etcdserver: request timed out"}),
            );
        }
        if unknown
            .lock()
            .expect("unknown lock")
            .iter()
            .any(|resource| uri.contains(&format!("/{resource}/")))
        {
            // What an API server answers for a kind it does not serve: no details.
            return (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                       "reason": "NotFound", "message": "the server could not find the requested resource"}),
            );
        }
        if method == "DELETE" {
            return (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
            );
        }
        (200, answer(uri, body, &stored))
    });
    (client, server)
}

/// A client in `default_namespace` whose requests are answered, on a task of their own, by
/// `answer(method, uri, JSON body)` with a status code and a JSON body: the plumbing every mocked
/// API server here shares.
pub fn client_answered_by(
    default_namespace: &str,
    answer: impl Fn(&str, &str, &Value) -> (u16, Value) + Send + 'static,
) -> Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, reply) = answer(&method, &uri, &body);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                    .expect("response"),
            );
        }
    });
    Client::new(service, default_namespace)
}

/// Kubernetes's answer to a create in a namespace being deleted.
fn namespace_terminating_status(uri: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
        "reason": "Forbidden",
        "message": format!("{uri} is forbidden: unable to create new content in namespace {NAMESPACE} because it is being terminated"),
        "details": {"causes": [{"reason": "NamespaceTerminating",
            "message": format!("namespace {NAMESPACE} is being terminated"), "field": "metadata.namespace"}]}
    })
}

/// What Kubernetes would send back: the applied object (with the metadata it keeps), a Scale for
/// the scale subresource, the whole ChatRelease for its status and annotations.
fn answer(uri: &str, body: &Value, stored: &Mutex<ChatRelease>) -> Value {
    if uri.contains("/chatreleases/") {
        let mut release = stored.lock().expect("release lock");
        if let Some(status) = uri
            .contains("/status")
            .then(|| serde_json::from_value(body["status"].clone()).ok())
            .flatten()
        {
            release.status = Some(status);
        }
        return serde_json::to_value(&*release).unwrap_or(Value::Null);
    }
    if uri.contains("/scale") {
        let name = uri
            .split("/deployments/")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_default();
        return json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                      "metadata": {"name": name, "namespace": NAMESPACE}, "spec": body["spec"].clone()});
    }
    let mut object = body.clone();
    if object.get("metadata").is_none() {
        object["metadata"] = json!({});
    }
    if object["metadata"].get("name").is_none() {
        object["metadata"]["name"] = json!("event");
    }
    object
}

/// A Context on the mocked API server, with Istio routing, a Deployment store, fixed metrics
/// and a settable clock.
pub struct Harness {
    pub ctx: Arc<Context>,
    pub server: ApiServer,
    pub deployments: Writer<crate::workload::TrackDeployment>,
    pub metrics: Arc<FixedMetrics>,
    pub now: Arc<Mutex<Timestamp>>,
}

impl Harness {
    pub fn new(release: &ChatRelease, now: Timestamp) -> Self {
        let (client, server) = mock_client(release);
        let (store, mut deployments) = reflector::store();
        // The controller's cache has had its first list.
        deployments.apply_watcher_event(&watcher::Event::InitDone);
        let metrics = Arc::new(FixedMetrics::healthy());
        let now = Arc::new(Mutex::new(now));
        let clock_now = now.clone();
        let mut ctx = Context::new(
            client.clone(),
            store,
            Arc::new(Routers::new(client)),
            metrics.clone(),
            "http://prometheus.test:9090".into(),
        );
        ctx.clock = Arc::new(move || *clock_now.lock().expect("clock lock"));
        Self {
            ctx: Arc::new(ctx),
            server,
            deployments,
            metrics,
            now,
        }
    }

    /// The Deployment cache now holds `deployment`, as its watch would have read it.
    pub fn set_deployment(&mut self, deployment: Deployment) {
        let mut cached = cached_deployment(&deployment);
        crate::controller::keep_what_track_state_reads(&mut cached);
        self.deployments
            .apply_watcher_event(&watcher::Event::Apply(cached));
    }

    pub fn set_time(&self, now: Timestamp) {
        *self.now.lock().expect("clock lock") = now;
    }

    /// The ChatRelease as the API server now holds it (status included).
    pub fn stored(&self) -> ChatRelease {
        self.server.release.lock().expect("release lock").clone()
    }

    /// Runs one reconcile of the stored object, as the controller would after a watch event.
    pub async fn reconcile(&self) -> kube::runtime::controller::Action {
        self.server.clear();
        let release = Arc::new(self.stored());
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            crate::controller::reconcile(release, self.ctx.clone()),
        )
        .await
        .expect("reconcile finished in time")
        .expect("reconcile succeeded")
    }

    /// A reconcile handed an out-of-date copy of the object, as a lagging watch cache would.
    pub async fn reconcile_from_cache(&self, cached: ChatRelease) {
        self.server.clear();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            crate::controller::reconcile(Arc::new(cached), self.ctx.clone()),
        )
        .await
        .expect("reconcile finished in time")
        .expect("reconcile succeeded");
    }

    /// Replaces the stored object's spec and annotations, as `kubectl apply` or `annotate` would.
    pub fn user_applies(&self, release: &ChatRelease) {
        let mut stored = self.server.release.lock().expect("release lock");
        stored.spec = release.spec.clone();
        stored.metadata.annotations = release.metadata.annotations.clone();
        stored.metadata.generation = Some(stored.metadata.generation.unwrap_or(1) + 1);
    }
}

/// (stable, canary) weights of the weighted split in a VirtualService body.
pub fn split(virtual_service: &Value) -> (i64, i64) {
    let routes = virtual_service["spec"]["http"]
        .as_array()
        .expect("http routes");
    let primary = routes.last().expect("a weighted route");
    let weight_of = |subset: &str| {
        primary["route"]
            .as_array()
            .expect("destinations")
            .iter()
            .find(|d| d["destination"]["subset"] == subset)
            .map_or(0, |d| d["weight"].as_i64().unwrap_or(0))
    };
    (weight_of("stable"), weight_of("canary"))
}

/// The revision label on an applied Deployment's pod template.
pub fn applied_revision(deployment: &Value) -> String {
    deployment["spec"]["template"]["metadata"]["labels"][LABEL_REVISION]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The field manager the reconciler used for a call.
pub fn field_manager(call: &Call) -> Option<String> {
    call.uri
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("fieldManager="))
        .map(str::to_string)
}

pub fn owner_is_release(object: &Value) -> bool {
    let owner = &object["metadata"]["ownerReferences"][0];
    owner["apiVersion"] == "chatrelease.io/v1alpha1"
        && owner["kind"] == "ChatRelease"
        && owner["name"] == NAME
        && owner["controller"] == true
}

pub const OPERATOR: &str = MANAGER;
