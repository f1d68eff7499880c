//! The cluster as the simulator watches it: VirtualServices, DestinationRules, HTTPRoutes,
//! Services, Pods and `mesh-simulator` ConfigMaps kept current by reflectors, and turned into the
//! [`MeshState`] of a tick on demand. Each object is converted once per version, so a malformed one
//! is reported once. A kind the API server does not serve (a cluster without Istio's or the
//! Gateway API's CRDs) is reported once and retried quietly; the other kinds route on.

use crate::MeshSimError;
use crate::contract::CONFIG_MAP_NAME;
use crate::gateway::http_route_from_value;
use crate::pods::{SimPod, SimService, provider_outage};
use crate::routing::{MeshState, virtual_service_from_value};
use chatrelease::router::gateway_api::HttpRoute;
use chatrelease::router::istio::{DestinationRule, VirtualService};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinSet;

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

/// `name: target weight, ...; ...`, a one-line summary of routes for the log.
fn describe<'a>(routes: impl Iterator<Item = (&'a str, Vec<String>)>) -> String {
    routes
        .map(|(name, destinations)| {
            let name = if name.is_empty() { "(unnamed)" } else { name };
            format!("{name}: {}", destinations.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A one-line summary of a VirtualService's routes for the log.
pub fn describe_routes(service: &VirtualService) -> String {
    describe(service.spec.http.iter().map(|route| {
        let destinations = route.route.iter().map(|d| {
            let target = if d.destination.subset.is_empty() {
                &d.destination.host
            } else {
                &d.destination.subset
            };
            format!("{target} {}", d.weight)
        });
        (route.name.as_str(), destinations.collect())
    }))
}

/// A one-line summary of an HTTPRoute's rules for the log.
pub fn describe_rules(route: &HttpRoute) -> String {
    describe(route.spec.rules.iter().map(|rule| {
        let backends = rule.backend_refs.iter().map(|b| {
            let weight = b.weight.map_or("(1)".to_string(), |w| w.to_string());
            format!("{} {weight}", b.name)
        });
        (rule.name.as_deref().unwrap_or_default(), backends.collect())
    }))
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
    convert_route(
        object,
        "VirtualService",
        virtual_service_from_value,
        describe_routes,
    )
}

fn convert_http_route(object: &DynamicObject) -> Option<HttpRoute> {
    convert_route(object, "HTTPRoute", http_route_from_value, describe_rules)
}

/// A route object read by `read`, its routes logged once, or skipped with a warning.
fn convert_route<T>(
    object: &DynamicObject,
    kind: &'static str,
    read: fn(serde_json::Value) -> Result<T, serde_json::Error>,
    describe: impl Fn(&T) -> String,
) -> Option<T> {
    match serde_json::to_value(object).and_then(read) {
        Ok(route) => {
            tracing::info!(
                kind,
                namespace = %object.namespace().unwrap_or_default(),
                name = %object.name_any(),
                routes = %describe(&route),
                "routing through {kind}"
            );
            Some(route)
        }
        Err(source) => {
            let error = malformed(kind, object, source);
            tracing::warn!(%error, "skipping {kind}");
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
    http_routes: Store<DynamicObject>,
    services: Store<Service>,
    pods: Store<Pod>,
    config_maps: Store<ConfigMap>,
    converted_services: Converted<VirtualService>,
    converted_rules: Converted<DestinationRule>,
    converted_http_routes: Converted<HttpRoute>,
    converted_pods: Converted<SimPod>,
    converted_outages: Converted<(String, f64)>,
}

/// Whether a watch is failing, so that a run of failures is logged once: a kind the API server
/// does not serve fails every retry until its CRD is installed.
#[derive(Debug, Default)]
struct WatchHealth {
    failing: bool,
}

/// What a watch event changes in a [`WatchHealth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchChange {
    /// The first failure after working (or at the start).
    Failed,
    /// The first event that worked after failures.
    Recovered,
}

impl WatchHealth {
    fn observe(&mut self, worked: bool) -> Option<WatchChange> {
        let change = match (self.failing, worked) {
            (false, false) => Some(WatchChange::Failed),
            (true, true) => Some(WatchChange::Recovered),
            _ => None,
        };
        self.failing = !worked;
        change
    }
}

fn spawn_reflector<K>(
    tasks: &mut JoinSet<()>,
    what: &'static str,
    without: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let events = reflector::reflector(writer, watcher(api, config).default_backoff());
    tasks.spawn(async move {
        let mut health = WatchHealth::default();
        events
            .for_each(|event| {
                // The watcher retries with backoff; a missing CRD fails every retry. `Init` starts
                // each attempt, before the list that may fail: it says nothing either way.
                let change = match &event {
                    Ok(watcher::Event::Init) => None,
                    other => health.observe(other.is_ok()),
                };
                match (change, event) {
                    (Some(WatchChange::Failed), Err(error)) => {
                        tracing::warn!(
                            kind = what,
                            %error,
                            "watch failed, retrying quietly; {without}"
                        );
                    }
                    (_, Err(error)) => tracing::debug!(kind = what, %error, "watch failed again"),
                    (Some(WatchChange::Recovered), Ok(_)) => {
                        tracing::info!(kind = what, "watch works again");
                    }
                    (_, Ok(_)) => {}
                }
                std::future::ready(())
            })
            .await;
    });
}

impl ClusterState {
    /// Starts watching, in `namespace` or in all namespaces, on tasks added to `tasks`.
    pub fn watch(client: kube::Client, namespace: Option<&str>, tasks: &mut JoinSet<()>) -> Self {
        let every = watcher::Config::default();
        let mut dynamic = |resource: ApiResource, what, without| {
            let api = match namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            let writer = reflector::store::Writer::new(resource);
            let store = writer.as_reader();
            spawn_reflector(tasks, what, without, api, every.clone(), writer);
            store
        };
        let without_istio =
            "without Istio's CRDs no VirtualService is routed; HTTPRoutes still are";
        let virtual_services = dynamic(
            ApiResource::erase::<VirtualService>(&()),
            "VirtualService",
            without_istio,
        );
        let destination_rules = dynamic(
            ApiResource::erase::<DestinationRule>(&()),
            "DestinationRule",
            without_istio,
        );
        let http_routes = dynamic(
            ApiResource::erase::<HttpRoute>(&()),
            "HTTPRoute",
            "without the Gateway API's CRDs no HTTPRoute is routed; VirtualServices still are",
        );
        let core = "nothing is routed until it works";
        let services = watch_typed(tasks, &client, namespace, "Service", core, every.clone());
        let pods = watch_typed(tasks, &client, namespace, "Pod", core, every);
        let named = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP_NAME}"));
        let config_maps = watch_typed(
            tasks,
            &client,
            namespace,
            "ConfigMap",
            "no provider outage is simulated until it works",
            named,
        );

        Self {
            virtual_services,
            destination_rules,
            http_routes,
            services,
            pods,
            config_maps,
            converted_services: Converted::default(),
            converted_rules: Converted::default(),
            converted_http_routes: Converted::default(),
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
        let mut http_routes = self
            .converted_http_routes
            .refresh(&self.http_routes.state(), convert_http_route);
        http_routes.sort_by(|a, b| by_name(&a.metadata, &b.metadata));
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
            http_routes,
            services,
            pods,
            provider_outages,
        }
    }
}

/// A reflector of a built-in kind, in `namespace` or in all namespaces.
fn watch_typed<K>(
    tasks: &mut JoinSet<()>,
    client: &kube::Client,
    namespace: Option<&str>,
    what: &'static str,
    without: &'static str,
    config: watcher::Config,
) -> Store<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = reflector::store();
    spawn_reflector(tasks, what, without, api, config, writer);
    store
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// What is logged while the returned guard lives, on this thread (and its current-thread
    /// runtime's tasks).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("chatrelease_meshsim=debug")
            .with_ansi(false)
            .with_writer(move || Captured(writer.clone()))
            .finish();
        (buffer, tracing::subscriber::set_default(subscriber))
    }

    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(buffer: &Mutex<Vec<u8>>) -> String {
        String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
    }

    fn http_route(name: &str, version: &str, rules: Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": name, "namespace": "chat", "uid": name,
                             "resourceVersion": version},
                "spec": {"rules": rules}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_malformed_http_route_is_reported_once_and_skipped() {
        let rules = json!([{"backendRefs": [{"name": "lobe-chat-stable", "port": 80}]}]);
        let good = http_route("lobe-chat", "1", rules.clone());
        let broken = http_route("broken", "1", json!([{"matches": "every request"}]));
        let (logs, guard) = capture_logs();
        let mut converted = Converted::default();
        for _ in 0..3 {
            let routes = converted.refresh(&[good.clone(), broken.clone()], convert_http_route);
            let names: Vec<_> = routes.iter().map(|r| r.metadata.name.clone()).collect();
            assert_eq!(names, [Some("lobe-chat".to_string())]);
        }
        // Fixed, it is a new version: read and routed.
        let fixed = http_route("broken", "2", rules);
        assert_eq!(
            converted.refresh(&[good, fixed], convert_http_route).len(),
            2
        );
        drop(guard);
        let logs = text(&logs);
        let skipped: Vec<_> = logs
            .lines()
            .filter(|l| l.contains("skipping HTTPRoute"))
            .collect();
        assert_eq!(skipped.len(), 1, "{logs}");
        assert!(
            skipped[0].contains("HTTPRoute chat/broken is skipped"),
            "{logs}"
        );
        assert_eq!(
            logs.matches("routing through HTTPRoute").count(),
            2,
            "{logs}"
        );
    }

    #[test]
    fn a_run_of_watch_failures_is_reported_once_and_so_is_the_recovery() {
        let mut health = WatchHealth::default();
        let changes = [false, false, false, true, true, false, true].map(|w| health.observe(w));
        use WatchChange::{Failed, Recovered};
        assert_eq!(
            changes,
            [
                Some(Failed),
                None,
                None,
                Some(Recovered),
                None,
                Some(Failed),
                Some(Recovered)
            ]
        );
        let mut health = WatchHealth::default();
        assert_eq!(health.observe(true), None);
    }

    /// A client of an API server that serves no HTTPRoutes (404, as without the Gateway API's
    /// CRDs), one VirtualService and empty lists of the rest; watches stay open and quiet. Counts
    /// the HTTPRoute requests.
    fn cluster_without_the_gateway_api(http_route_lists: Arc<AtomicUsize>) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut open_watches = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let uri = request.uri().to_string();
                if uri.contains("watch=true") {
                    open_watches.push(send);
                    continue;
                }
                let (code, body) = if uri.contains("/httproutes") {
                    http_route_lists.fetch_add(1, Ordering::SeqCst);
                    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "code": 404,
                        "message": "the server could not find the requested resource"});
                    (404, status)
                } else {
                    let items = if uri.contains("/virtualservices") {
                        vec![
                            serde_json::to_value(chatrelease::router::istio::virtual_service(
                                &crate::fixtures::plain_release(),
                                &crate::fixtures::routes(5, true),
                            ))
                            .unwrap(),
                        ]
                    } else {
                        Vec::new()
                    };
                    let list = json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"}, "items": items});
                    (200, list)
                };
                let body = Body::from(serde_json::to_vec(&body).unwrap());
                send.send_response(Response::builder().status(code).body(body).unwrap());
            }
        });
        kube::Client::new(service, "chat")
    }

    #[tokio::test]
    async fn without_the_gateway_api_virtual_services_still_route_and_the_gap_is_reported_once() {
        let (logs, _guard) = capture_logs();
        let http_route_lists = Arc::new(AtomicUsize::new(0));
        let client = cluster_without_the_gateway_api(http_route_lists.clone());
        let mut tasks = JoinSet::new();
        let mut cluster = ClusterState::watch(client, Some("chat"), &mut tasks);
        let mut state = cluster.snapshot();
        // The watcher retries after about 0.8 s, then backs off further.
        for _ in 0..100 {
            if !state.virtual_services.is_empty() && http_route_lists.load(Ordering::SeqCst) >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            state = cluster.snapshot();
        }
        tasks.shutdown().await;
        assert_eq!(state.virtual_services.len(), 1);
        assert!(state.http_routes.is_empty());
        assert!(http_route_lists.load(Ordering::SeqCst) >= 2, "no retry");
        let logs = text(&logs);
        let warnings: Vec<_> = logs.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "{logs}");
        assert!(warnings[0].contains("kind=\"HTTPRoute\""), "{logs}");
        assert!(
            warnings[0].contains("no HTTPRoute is routed; VirtualServices still are"),
            "{logs}"
        );
        assert!(logs.contains("watch failed again"), "{logs}");
    }
}
