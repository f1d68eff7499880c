//! The reconciler: reads what is there, asks `rollout::decide` what should be, applies the plan
//! (server-side apply, one field manager), writes status once, removes acted-on annotations and
//! records Events. All deciding happens in `rollout`; this file only does I/O.

use crate::annotations::{Command, Commands, MANAGER};
use crate::canary_watch::{self, CanaryWatch};
use crate::crd::{ChatRelease, ChatReleaseStatus};
use crate::error::Error;
use crate::metrics::{AnalysisTarget, MetricsSource};
use crate::rollout::{self, Decision, Plan, TrackPlan, World};
use crate::router::{RouterKind, Routers, Routes, TrafficRouter};
use crate::settings::Settings;
use crate::workload::{self, Track};
use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, debug, error, info, info_span, warn};
use workload::TrackDeployment;

/// How long to wait before retrying a reconcile that failed.
pub const ERROR_REQUEUE: Duration = Duration::from_secs(10);

/// Longest a reconcile waits for the Deployment cache's first list.
const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// A clock, so tests can set the time the decision sees.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Optional hooks for whoever wants to observe reconciles (the metrics exporter).
pub trait ReconcileObserver: Send + Sync {
    fn reconciled(&self, _release: &ChatRelease, _decision: &Decision, _took: Duration) {}
    fn failed(&self, _release: &ChatRelease, _error: &Error) {}
    /// The ChatRelease `namespace/name` is gone from the cluster.
    fn deleted(&self, _namespace: &str, _name: &str) {}
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// Deployments the operator owns, kept current by a reflector, without their managed fields
    /// and pod spec (see `keep_what_track_state_reads`).
    pub deployments: Store<TrackDeployment>,
    pub router: Arc<Routers>,
    pub metrics: Arc<dyn MetricsSource>,
    /// Publishes warnings, and folds a warning repeated with the same note into one series.
    pub recorder: Recorder,
    /// Who publishes the notices, each through a recorder of its own (see [`publish`]).
    pub reporter: Reporter,
    /// Prometheus address for ChatReleases that name none.
    pub default_prometheus: String,
    pub clock: Clock,
    pub observer: Option<Arc<dyn ReconcileObserver>>,
    /// The generation each of our own Deployment writes produced, until the cache has seen it.
    written: std::sync::Mutex<std::collections::HashMap<ObjectRef<TrackDeployment>, i64>>,
    /// When the sequential test last looked at each ChatRelease (`analysis.watchEvery` paces
    /// it). Memory only: a restarted operator looks again at once, and the counts since the
    /// step began carry the test on.
    watched: std::sync::Mutex<std::collections::HashMap<ObjectRef<ChatRelease>, Timestamp>>,
    /// The bulk sequential watch `run` starts, which each reconcile's own look seeds.
    canary_watch: Option<Arc<CanaryWatch>>,
    /// The resourceVersion our last write of each ChatRelease produced: a cached copy at it is
    /// current, and needs no GET.
    status_written: std::sync::Mutex<std::collections::HashMap<ObjectRef<ChatRelease>, String>>,
}

impl Context {
    fn cache_shows_our_last_write(
        &self,
        key: &ObjectRef<ChatRelease>,
        cached: &ChatRelease,
    ) -> bool {
        let written = self
            .status_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cached
            .metadata
            .resource_version
            .as_ref()
            .is_some_and(|rv| written.get(key) == Some(rv))
    }

    /// Whether this reconcile should run the sequential test's look itself: always without the
    /// bulk watch, and with it when the watch asks for it.
    fn wants_a_close_look(&self, release: &ChatRelease, status: &ChatReleaseStatus) -> bool {
        let Some(watch) = &self.canary_watch else {
            return true;
        };
        canary_watch::Step::of(status)
            .is_some_and(|step| watch.wants_a_close_look(&release.key(), &step))
    }

    fn wrote(&self, release: &ChatRelease, now: &ChatRelease) {
        let mut written = self
            .status_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match now.metadata.resource_version.clone() {
            Some(rv) => written.insert(release.key(), rv),
            None => written.remove(&release.key()),
        };
    }

    /// Whether `watch_every` has passed since the last look at `release`; if so, this is one.
    fn watch_paced(
        &self,
        release: ObjectRef<ChatRelease>,
        now: Timestamp,
        every: Duration,
    ) -> bool {
        let mut watched = self.watched.lock().unwrap();
        // The clock has whole seconds: a look a hair early is on time.
        let due = watched
            .get(&release)
            .is_none_or(|last| rollout::later(*last, every) <= later_by_a_second(now));
        if due {
            watched.insert(release, now);
        }
        due
    }
}

fn later_by_a_second(now: Timestamp) -> Timestamp {
    rollout::later(now, Duration::from_secs(1))
}

impl Context {
    pub fn new(
        client: Client,
        deployments: Store<TrackDeployment>,
        router: Arc<Routers>,
        metrics: Arc<dyn MetricsSource>,
        default_prometheus: String,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            deployments,
            router,
            metrics,
            default_prometheus,
            // Whole seconds: status times are stored that way, and messages read better.
            clock: Arc::new(|| {
                Timestamp::now()
                    .round(jiff::Unit::Second)
                    .unwrap_or_else(|_| Timestamp::now())
            }),
            observer: None,
            written: Default::default(),
            watched: Default::default(),
            canary_watch: None,
            status_written: Default::default(),
        }
    }
}

/// Requests the operator has in flight to the API server at once, at most.
///
/// kube's client speaks HTTP/1.1, one request per connection, and keeps an idle connection 90 s
/// with its buffers. Unbounded, a burst (a template change across hundreds of releases) opened a
/// connection per reconcile in flight: hundreds, each costing the operator kilobytes and the API
/// server a TLS session, for a minute and a half after. Watches hold a slot only until their
/// response starts. controller-runtime's client allows 20 requests a second, 30 in a burst.
pub const API_CONCURRENCY: usize = 32;

/// The client the operator talks to the API server with: kube's own, with at most
/// [`API_CONCURRENCY`] requests in flight (the rest wait their turn in kube's request buffer).
pub fn api_client(config: kube::Config) -> Result<Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::limit::ConcurrencyLimitLayer::new(API_CONCURRENCY))
        .build())
}

/// Runs the controller until a termination signal, over all namespaces or just `namespace`.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    ctx_builder: impl FnOnce(Store<TrackDeployment>) -> Context,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let (releases, releases_writer) = reflector::store();
    let release_events = reflector::reflector(
        releases_writer,
        watcher(
            api::<ChatRelease>(&client, namespace),
            watcher::Config::default().any_semantic(),
        )
        .modify(keep_what_the_watch_reads),
    )
    .default_backoff()
    .applied_objects()
    // Our own status writes change neither: they need no reconcile of their own (the decision
    // says when to look again). The spec and the annotations (commands) do.
    .predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    );
    let owned = watcher::Config::default().labels(&format!(
        "{}={MANAGER}",
        crate::annotations::LABEL_MANAGED_BY
    ));
    let (deployments, writer) = reflector::store();
    let deployment_events = reflector::reflector(
        writer,
        watcher(api::<TrackDeployment>(&client, namespace), owned.clone())
            .modify(keep_what_track_state_reads),
    )
    .default_backoff()
    .touched_objects();
    let mut ctx = ctx_builder(deployments);
    // The sequential watch looks at all canaries in bulk and wakes the reconcile of one whose
    // counts say stop.
    let watch = Arc::new(CanaryWatch::new(
        ctx.metrics.clone(),
        ctx.default_prometheus.clone(),
    ));
    ctx.canary_watch = Some(watch.clone());
    let ctx = Arc::new(ctx);
    let (wake, woken) = futures::channel::mpsc::channel(1024);
    let watching = tokio::spawn(watch.run(releases.clone(), ctx.clock.clone(), wake));
    let _stop_watching = AbortOnDrop(watching);
    let observer = ctx.observer.clone();
    let applied = ctx.router.applied().clone();
    let mut controller = Controller::for_stream(release_events, releases)
        .reconcile_on(woken)
        .owns_stream(deployment_events)
        .owns_stream(written_by_others(
            api::<kube::core::PartialObjectMeta<Service>>(&client, namespace),
            &owned,
            &applied,
        ));
    // A router whose CRDs the cluster lacks is not watched (a watch of an unknown kind only
    // fails); a ChatRelease that asks for it gets a RouterUnavailable Event instead.
    if serves(&client, "networking.istio.io/v1", "virtualservices").await {
        controller = controller
            .owns_stream(written_by_others(
                api::<kube::core::PartialObjectMeta<crate::router::istio::VirtualService>>(
                    &client, namespace,
                ),
                &owned,
                &applied,
            ))
            .owns_stream(written_by_others(
                api::<kube::core::PartialObjectMeta<crate::router::istio::DestinationRule>>(
                    &client, namespace,
                ),
                &owned,
                &applied,
            ));
    } else {
        warn!(
            "the API server has no VirtualService (networking.istio.io/v1): traffic.istio cannot route"
        );
    }
    if serves(&client, "gateway.networking.k8s.io/v1", "httproutes").await {
        controller = controller.owns_stream(written_by_others(
            api::<kube::core::PartialObjectMeta<crate::router::gateway_api::HttpRoute>>(
                &client, namespace,
            ),
            &owned,
            &applied,
        ));
    } else {
        warn!(
            "the API server has no HTTPRoute (gateway.networking.k8s.io/v1): traffic.gatewayAPI cannot route"
        );
    }
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            let observer = observer.clone();
            async move {
                match result {
                    // A reconcile was due for a ChatRelease that is gone: it was deleted.
                    Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                        if let Some(observer) = observer {
                            observer.deleted(
                                object.namespace.as_deref().unwrap_or_default(),
                                &object.name,
                            );
                        }
                    }
                    Err(error) => warn!(%error, "reconcile failed"),
                    Ok(_) => {}
                }
            }
        })
        .await;
}

/// The metadata of the objects of kind `K` the operator owns, as they change: each change wakes
/// the owning ChatRelease's reconcile and, unless it is our own last apply, tells `applied` that
/// the next apply must go through. Metadata only: a trigger is all that is needed, and a cache of
/// whole VirtualServices would cost memory per release for nothing.
fn written_by_others<K>(
    api: Api<kube::core::PartialObjectMeta<K>>,
    owned: &watcher::Config,
    applied: &Arc<crate::applied::Applied>,
) -> impl futures::Stream<Item = Result<kube::core::PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let applied = applied.clone();
    let kind = K::kind(&()).to_string();
    watcher(api, owned.clone())
        .default_backoff()
        .inspect(move |event| match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                applied.saw(&kind, &o.metadata, false)
            }
            Ok(watcher::Event::Delete(o)) => applied.saw(&kind, &o.metadata, true),
            _ => {}
        })
        .touched_objects()
}

/// Stops a spawned task when the controller stops (a lost leadership ends `run`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The ChatRelease cache feeds the controller's queue and the sequential watch, and a reconcile
/// decides from it when it shows our own last status write. Of the metadata it keeps what those
/// read: identity, generation, and the command annotations. Managed fields, kubectl's copy of the
/// last applied object, and the labels and annotations other tools add (Helm's, Argo CD's) go:
/// together they are often bigger than the spec itself, and no decision reads them.
fn keep_what_the_watch_reads(release: &mut ChatRelease) {
    let meta = &mut release.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.annotations = meta.annotations.take().and_then(|mut annotations| {
        annotations.retain(|key, _| crate::annotations::is_command(key));
        (!annotations.is_empty()).then_some(annotations)
    });
}

/// Whether the API server serves `plural` in `group_version` (its CRD is installed).
async fn serves(client: &Client, group_version: &str, plural: &str) -> bool {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == plural),
        Err(error) => {
            debug!(%group_version, %error, "API group not served");
            false
        }
    }
}

/// One reconcile of one ChatRelease. A panic inside it (a bug, or an input nobody foresaw) is
/// caught here: it must not take the process down and stop every other ChatRelease from being
/// judged. That ChatRelease goes to `Failed` with the panic's message; traffic stays where it is.
pub async fn reconcile(release: Arc<ChatRelease>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", chatrelease = %release.name_any(), namespace = release.namespace().unwrap_or_default());
    let started = std::time::Instant::now();
    let caught = AssertUnwindSafe(reconcile_inner(&release, &ctx).instrument(span.clone()))
        .catch_unwind()
        .await;
    let result = match caught {
        Ok(Err(error)) if error.is_namespace_terminating() => {
            // Everything it owns goes with the namespace: stand aside instead of retrying.
            debug!(chatrelease = %release.name_any(), %error, "namespace is being deleted; standing aside");
            Ok((Action::await_change(), None))
        }
        Ok(result) => result,
        Err(panic) => Err(
            fail_after_panic(&release, &ctx, panic_message(panic.as_ref()))
                .instrument(span)
                .await,
        ),
    };
    // Failures are counted once, in `error_policy`.
    if let (Ok((_, Some(decision))), Some(observer)) = (&result, &ctx.observer) {
        observer.reconciled(&release, decision, started.elapsed());
    }
    result.map(|(action, _)| action)
}

/// Logs and retries soon; a failed reconcile never crashes the operator.
pub fn error_policy(release: Arc<ChatRelease>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(chatrelease = %release.name_any(), %error, kind = error.metric_label(), "reconcile failed; retrying");
    if let Some(observer) = &ctx.observer {
        observer.failed(&release, error);
    }
    Action::requeue(ERROR_REQUEUE)
}

async fn reconcile_inner(
    cached: &ChatRelease,
    ctx: &Context,
) -> Result<(Action, Option<Decision>), Error> {
    let namespace = cached.namespace().ok_or_else(|| {
        Error::Missing(format!(
            "ChatRelease {} has no namespace",
            cached.name_any()
        ))
    })?;
    let name = cached.name_any();
    // The watch cache can lag behind our own last status write; deciding from it could move the
    // weight backwards. Unless the cache already shows that write, a GET reads what we wrote.
    let key = cached.key();
    let fresh = if ctx.cache_shows_our_last_write(&key, cached) {
        cached.clone()
    } else {
        let api = Api::<ChatRelease>::namespaced(ctx.client.clone(), &namespace);
        let Some(fresh) = api
            .get_opt(&name)
            .await
            .map_err(|e| Error::kube("read", "ChatRelease", &namespace, &name, e))?
        else {
            return Ok((Action::await_change(), None));
        };
        fresh
    };
    let release = &fresh;
    if release.metadata.deletion_timestamp.is_some() {
        // Being deleted: garbage collection removes what it owns; any write now would only race it.
        return Ok((Action::await_change(), None));
    }
    // Until the Deployment cache has its first full list, "no Deployment" would be a guess.
    if tokio::time::timeout(CACHE_SYNC_TIMEOUT, ctx.deployments.wait_until_ready())
        .await
        .is_err()
    {
        return Err(Error::Missing(format!(
            "the Deployment cache did not sync within {}s",
            CACHE_SYNC_TIMEOUT.as_secs()
        )));
    }
    let now = (ctx.clock)();
    let status = release.status.clone().unwrap_or_default();

    let settings = match Settings::from_spec(&release.spec) {
        Ok(settings) => settings,
        Err(problem) => {
            return reject(ctx, release, &status, &problem.to_string(), now).await;
        }
    };
    if let Err(problem) = ctx.router.check(release) {
        return reject(ctx, release, &status, &problem.to_string(), now).await;
    }
    let router = RouterKind::of(release);
    let previous_router = match status.router.as_deref() {
        Some(recorded) => RouterKind::of_status(recorded),
        // Nothing routed yet: no router to switch from.
        None if status.stable_revision.is_none() => router,
        // Routed before the router was recorded in status: by Istio, the only one then.
        None => RouterKind::Istio,
    };
    if router != previous_router && rollout::canary_in_flight(&status) {
        let problem = format!(
            "spec.traffic: the router cannot change from {} to {} while a canary is under way (its routes carry the canary's users); set it back, and change it once the release is Stable",
            previous_router.as_str(),
            router.as_str()
        );
        return reject(ctx, release, &status, &problem, now).await;
    }

    let world = World {
        generation: release.metadata.generation,
        desired_revision: release.spec.template.revision(),
        desired_image: workload::image_of(&release.spec.template),
        stable: deployment(ctx, &namespace, &name, Track::Stable)
            .await?
            .as_deref()
            .map(workload::track_state),
        canary: deployment(ctx, &namespace, &name, Track::Canary)
            .await?
            .as_deref()
            .map(workload::track_state),
        commands: Commands::from_annotations(release.annotations()),
    };
    let target = analysis_target(
        release,
        &settings,
        &status,
        &namespace,
        &name,
        &ctx.default_prometheus,
        now,
    );
    let observations = if rollout::analysis_due(&settings, &status, &world.commands, now) {
        Some(ctx.metrics.observe(&target).await)
    } else {
        None
    };
    // Between the interval's analyses, the sequential test may stop a bad canary at once.
    let stopped_early = match settings.watch_every {
        Some(every)
            if observations.is_none()
                && rollout::watch_due(&settings, &status, &world, now)
                && ctx.wants_a_close_look(release, &status)
                && ctx.watch_paced(release.key(), now, every) =>
        {
            // Every request since the step began; the error counts are all it weighs.
            let since_the_step = AnalysisTarget {
                window: rollout::watch_window(&status, now),
                custom: Vec::new(),
                ..target
            };
            let seen = ctx.metrics.observe(&since_the_step).await;
            seed_watch(ctx, release, &status, &seen);
            rollout::decide_watch(&settings, &status, &world, &seen, now)
        }
        _ => None,
    };
    let mut decision = match stopped_early {
        Some(decision) => decision,
        None => rollout::decide(&settings, &status, &world, observations.as_ref(), now),
    };
    // Which router carries the traffic is I/O, not the decision's: it changes only once the
    // new router's routes are written and the old one's objects are gone.
    decision.status.router = Some(previous_router.as_str().to_string());
    if decision.action != rollout::Action::None {
        info!(action = ?decision.action, phase = %decision.status.phase, weight = decision.status.canary_weight, message = %decision.status.message, "decided");
    }

    // Traffic leaving the canary moves first, before anything else can fail, and a rollback is
    // recorded before it is carried out: a failed write below is then retried from RolledBack,
    // which routes everything to stable, instead of re-judged from metrics that may say otherwise.
    let rollback = decision.action == rollout::Action::Rollback;
    let routes_first = rollback || decision.plan.canary_weight < status.canary_weight;
    if rollback {
        write_status(ctx, release, &status, &decision.status).await?;
    }
    match apply_plan(ctx, release, &decision, routes_first).await {
        Ok(()) => {}
        Err(error) if error.is_invalid_object() => {
            // The API server refused what the spec asks for: the user must change the spec.
            return reject(ctx, release, &status, &error.to_string(), now).await;
        }
        Err(error @ Error::RouterUnavailable { .. }) => {
            // Nothing to retry until the CRD is installed or the spec names the other router:
            // say so where `kubectl get chr` and `kubectl wait` look, traffic untouched.
            publish(ctx, release, true, "RouterUnavailable", &error.to_string()).await;
            return reject(ctx, release, &status, &error.to_string(), now).await;
        }
        Err(error) => return Err(error),
    }
    if router != previous_router {
        // The new routes exist: only now do the old router's objects go.
        ctx.router.get(previous_router).remove(release).await?;
        let note = format!(
            "traffic now routed by traffic.{}; the objects of traffic.{} are deleted",
            router.as_str(),
            previous_router.as_str()
        );
        publish(ctx, release, false, "RouterSwitched", &note).await;
        decision.status.router = Some(router.as_str().to_string());
    }
    if !rollback {
        write_status(ctx, release, &status, &decision.status).await?;
    }
    remove_annotations(ctx, release, &decision.consumed).await?;
    for notice in &decision.notices {
        publish(ctx, release, notice.warning, notice.reason, &notice.note).await;
    }
    Ok((Action::requeue(decision.requeue_after), Some(decision)))
}

/// Hands a reconcile's exact counts since the step began to the bulk watch, which goes on adding
/// to them.
fn seed_watch(
    ctx: &Context,
    release: &ChatRelease,
    status: &ChatReleaseStatus,
    seen: &crate::metrics::Observations,
) {
    let (Some(watch), crate::metrics::Observations::Sampled { canary, stable }) =
        (&ctx.canary_watch, seen)
    else {
        return;
    };
    let Some(step) = canary_watch::Step::of(status) else {
        return;
    };
    watch.seed(release.key(), step, canary.into(), stable.into());
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Reports a reconcile that panicked as the ChatRelease's `Failed`, from a fresh read so the rest
/// of status stays what the last good reconcile wrote. Returns the error for `error_policy`.
async fn fail_after_panic(release: &ChatRelease, ctx: &Context, message: String) -> Error {
    let namespace = release.namespace().unwrap_or_default();
    let name = release.name_any();
    error!(%message, "reconcile panicked; the ChatRelease is marked Failed and retried");
    let api = Api::<ChatRelease>::namespaced(ctx.client.clone(), &namespace);
    match api.get_opt(&name).await {
        Ok(Some(fresh)) => {
            let status = fresh.status.clone().unwrap_or_default();
            let decision = rollout::hold_after_internal_error(
                &status,
                fresh.metadata.generation,
                &message,
                (ctx.clock)(),
            );
            match write_status(ctx, &fresh, &status, &decision.status).await {
                Ok(()) => {
                    for notice in &decision.notices {
                        publish(ctx, &fresh, notice.warning, notice.reason, &notice.note).await;
                    }
                }
                Err(write) => {
                    warn!(error = %write, "could not mark the ChatRelease Failed after a panic")
                }
            }
        }
        Ok(None) => {}
        Err(read) => warn!(error = %read, "could not read the ChatRelease after a panic"),
    }
    Error::Panicked {
        namespace,
        name,
        message,
    }
}

/// The spec cannot be applied: status says why (phase Failed, Ready=False), traffic stays put.
async fn reject(
    ctx: &Context,
    release: &ChatRelease,
    status: &ChatReleaseStatus,
    problem: &str,
    now: Timestamp,
) -> Result<(Action, Option<Decision>), Error> {
    let decision = rollout::hold_rejected(status, release.metadata.generation, problem, now);
    write_status(ctx, release, status, &decision.status).await?;
    for notice in &decision.notices {
        publish(ctx, release, notice.warning, notice.reason, &notice.note).await;
    }
    Ok((Action::requeue(decision.requeue_after), Some(decision)))
}

/// Of a Deployment's metadata, the cache keeps what the reflector and the owner trigger need
/// (name, namespace, uid, resourceVersion, generation, owner references): managed fields, labels
/// and annotations go. The rest of it is [`workload::TrackDeployment`]'s to choose.
pub(crate) fn keep_what_track_state_reads(deployment: &mut TrackDeployment) {
    let meta = &mut deployment.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.annotations = None;
}

/// A track's Deployment as the decision may trust it: the cache's copy, unless the cache has
/// not seen our own last write of it or its status does not yet report on its current spec.
/// A watch can go quiet for minutes (an API server restarting with a cold watch cache holds
/// watches until it is ready), and a promotion waiting on stable's rollout would wait with it;
/// then the Deployment is read from the API server instead.
async fn deployment(
    ctx: &Context,
    namespace: &str,
    release: &str,
    track: Track,
) -> Result<Option<Arc<TrackDeployment>>, Error> {
    let key = ObjectRef::new(&track.workload_name(release)).within(namespace);
    let cached = ctx.deployments.get(&key);
    let written = ctx.written.lock().unwrap().get(&key).copied();
    if !cache_may_be_behind(cached.as_deref(), written) {
        if written.is_some() {
            ctx.written.lock().unwrap().remove(&key);
        }
        return Ok(cached);
    }
    let name = track.workload_name(release);
    let api = Api::<TrackDeployment>::namespaced(ctx.client.clone(), namespace);
    let mut live = api
        .get_opt(&name)
        .await
        .map_err(|e| Error::kube("read", "Deployment", namespace, &name, e))?;
    if let Some(live) = live.as_mut() {
        keep_what_track_state_reads(live);
    }
    debug!(deployment = %name, "the Deployment cache is behind; read it from the API server");
    Ok(live.map(Arc::new))
}

/// Whether `cached` may miss what the API server already has: our own write (`written`, the
/// generation it produced) or the Deployment controller's report on the current spec.
fn cache_may_be_behind(cached: Option<&TrackDeployment>, written: Option<i64>) -> bool {
    let Some(cached) = cached else {
        return written.is_some();
    };
    let generation = cached.metadata.generation.unwrap_or_default();
    let observed = cached.status.observed_generation.unwrap_or_default();
    written.is_some_and(|w| generation < w) || observed < generation
}

fn analysis_target(
    release: &ChatRelease,
    settings: &Settings,
    status: &ChatReleaseStatus,
    namespace: &str,
    name: &str,
    default_prometheus: &str,
    now: Timestamp,
) -> AnalysisTarget {
    AnalysisTarget {
        at: now,
        namespace: namespace.to_string(),
        canary_workload: Track::Canary.workload_name(name),
        stable_workload: Track::Stable.workload_name(name),
        window: rollout::analysis_window(settings, status, now),
        custom: settings.judge.custom.clone(),
        source: settings.source,
        error_codes: settings.error_codes.clone(),
        address: release
            .spec
            .analysis
            .prometheus
            .as_ref()
            .map_or_else(|| default_prometheus.to_string(), |p| p.address.clone()),
    }
}

/// Service, routing, then Deployments (routing before the Service when traffic leaves the
/// canary). The traffic split is written before any Deployment changes: traffic only ever leaves a
/// canary whose template is about to change, and only moves to pods the decision has seen Ready.
async fn apply_plan(
    ctx: &Context,
    release: &ChatRelease,
    decision: &Decision,
    routes_first: bool,
) -> Result<(), Error> {
    let namespace = release.namespace().unwrap_or_default();
    let status = &decision.status;
    let routes = routes_for(&decision.plan, status);
    if routes_first {
        ctx.router.set_routes(release, &routes).await?;
    }
    let service = workload::service(release);
    ctx.router
        .applied()
        .apply(&ctx.client, &namespace, &service)
        .await?;
    ctx.router.reconcile(release).await?;
    if !routes_first {
        ctx.router.set_routes(release, &routes).await?;
    }
    apply_track(ctx, release, Track::Stable, decision.plan.stable, status).await?;
    apply_track(ctx, release, Track::Canary, decision.plan.canary, status).await?;
    Ok(())
}

fn routes_for(plan: &Plan, status: &ChatReleaseStatus) -> Routes {
    Routes {
        canary_weight: plan.canary_weight,
        canary_routes: plan.canary_routes,
        stable_revision: status
            .stable_revision
            .clone()
            .filter(|_| plan.stable_routes),
        canary_revision: status.canary_revision.clone(),
    }
}

async fn apply_track(
    ctx: &Context,
    release: &ChatRelease,
    track: Track,
    plan: TrackPlan,
    status: &ChatReleaseStatus,
) -> Result<(), Error> {
    let namespace = release.namespace().unwrap_or_default();
    let name = track.workload_name(&release.name_any());
    let live = deployment(ctx, &namespace, &release.name_any(), track).await?;
    let live_state = live.as_deref().map(workload::track_state);
    match plan {
        TrackPlan::Keep => Ok(()),
        TrackPlan::ApplyTemplate { replicas } => {
            let revision = release.spec.template.revision();
            let up_to_date = live_state.as_ref().is_some_and(|s| {
                s.revision.as_deref() == Some(revision.as_str()) && s.replicas == replicas
            });
            // Same revision label, other containers: edited by hand (`kubectl set image`). The
            // analysed template must be the one that runs, and the one promoted.
            let edited = live.as_deref().is_some_and(|d| {
                workload::live_fingerprint(d)
                    != Some(workload::fingerprint(&release.spec.template.spec()))
            });
            if up_to_date && !edited {
                return Ok(());
            }
            if up_to_date {
                warn!(track = track.as_str(), %revision, "pod template edited by hand; putting it back");
                let note = format!(
                    "the pod template of Deployment {name} was edited by hand (its containers differ from revision {revision}); the operator put the ChatRelease's template back"
                );
                publish(ctx, release, true, "PodTemplateRestored", &note).await;
            }
            info!(track = track.as_str(), %revision, replicas, "applying pod template");
            let object =
                workload::deployment(release, track, &release.spec.template, &revision, replicas);
            let written = apply(ctx, &namespace, &object).await?;
            if let Some(generation) = written.metadata.generation {
                let key = ObjectRef::new(&name).within(&namespace);
                ctx.written.lock().unwrap().insert(key, generation);
            }
            Ok(())
        }
        TrackPlan::Scale { replicas } => match live_state {
            Some(state) if state.replicas == replicas => Ok(()),
            Some(_) => {
                info!(track = track.as_str(), replicas, "scaling");
                let api = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace);
                let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
                api.patch_scale(&name, &PatchParams::default(), &patch)
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::kube("scale", "Deployment", &namespace, &name, e))
            }
            None if replicas == 0 => Ok(()),
            None if track == Track::Stable => Err(Error::Missing(format!(
                "Deployment {namespace}/{name} is gone while stable revision {} is not the spec's template; restore it or set the template back",
                status.stable_revision.as_deref().unwrap_or("unknown")
            ))),
            None => Ok(()),
        },
    }
}

/// Server-side apply with the operator's one field manager; the object as the API server now has it.
async fn apply<K>(ctx: &Context, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::namespaced(ctx.client.clone(), namespace);
    let mut value = serde_json::to_value(object).map_err(|source| Error::Serialize {
        kind: K::kind(&()).to_string(),
        name: name.clone(),
        source,
    })?;
    value["apiVersion"] = json!(K::api_version(&()));
    value["kind"] = json!(K::kind(&()));
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(value),
    )
    .await
    .map_err(|e| Error::kube("apply", &K::kind(&()), namespace, &name, e))
}

/// One status write per reconcile, and none when nothing changed.
async fn write_status(
    ctx: &Context,
    release: &ChatRelease,
    before: &ChatReleaseStatus,
    next: &ChatReleaseStatus,
) -> Result<(), Error> {
    if before == next && release.status.is_some() {
        return Ok(());
    }
    let namespace = release.namespace().unwrap_or_default();
    let name = release.name_any();
    let api = Api::<ChatRelease>::namespaced(ctx.client.clone(), &namespace);
    let patch = Patch::Apply(json!({
        "apiVersion": ChatRelease::api_version(&()),
        "kind": ChatRelease::kind(&()),
        "status": next,
    }));
    let now = api
        .patch_status(&name, &PatchParams::apply(MANAGER).force(), &patch)
        .await
        .map_err(|e| Error::kube("update status of", "ChatRelease", &namespace, &name, e))?;
    ctx.wrote(release, &now);
    Ok(())
}

/// Removes one-shot annotations the decision acted on. The `test` op makes sure a value a person
/// set meanwhile is not removed unseen.
async fn remove_annotations(
    ctx: &Context,
    release: &ChatRelease,
    consumed: &[Command],
) -> Result<(), Error> {
    let present = release.annotations();
    let ops: Vec<serde_json::Value> = consumed
        .iter()
        .filter(|c| c.is_one_shot())
        .filter_map(|c| {
            present
                .get(c.annotation())
                .map(|value| (c.annotation(), value))
        })
        .flat_map(|(key, value)| {
            let path = format!(
                "/metadata/annotations/{}",
                key.replace('~', "~0").replace('/', "~1")
            );
            [
                json!({"op": "test", "path": path, "value": value}),
                json!({"op": "remove", "path": path}),
            ]
        })
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    let namespace = release.namespace().unwrap_or_default();
    let name = release.name_any();
    let api = Api::<ChatRelease>::namespaced(ctx.client.clone(), &namespace);
    let patch: json_patch::Patch =
        serde_json::from_value(json!(ops)).map_err(|source| Error::Serialize {
            kind: "JSON patch".into(),
            name: name.clone(),
            source,
        })?;
    api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map(|now| ctx.wrote(release, &now))
        .map_err(|e| {
            Error::kube(
                "remove annotations from",
                "ChatRelease",
                &namespace,
                &name,
                e,
            )
        })
}

/// The Event's `action`. kube's Recorder folds Events with the same type, reason and action into
/// one series that keeps the first Event's note: with one action for all, "canary weight 5% → 25%"
/// went on showing (with a newer time) after the step to 50%. An action named after the note
/// folds only true repeats, as client-go's correlator does with identical messages.
fn event_action(note: &str) -> String {
    let digest = Sha256::digest(note.as_bytes());
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("Reconcile-{short}")
}

/// Events are best effort: failing to record one must not stop a rollback.
///
/// kube's Recorder keeps each Event it published for six minutes (until its next publish after
/// that), to fold a repeat into a series. A warning does repeat (the same trouble found again at
/// each analysis), so warnings share `ctx.recorder`. A notice (a step, a promotion) does not:
/// each goes through a recorder of its own, dropped with its copy. At a thousand releases the
/// shared recorder's copies of notices took more memory than the releases themselves.
pub(crate) async fn publish(
    ctx: &Context,
    release: &ChatRelease,
    warning: bool,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: event_action(note),
        secondary: None,
    };
    let regarding = release.object_ref(&());
    let published = if warning {
        ctx.recorder.publish(&event, &regarding).await
    } else {
        Recorder::new(ctx.client.clone(), ctx.reporter.clone())
            .publish(&event, &regarding)
            .await
    };
    if let Err(error) = published {
        warn!(%error, reason, "could not record Event");
    }
}

#[cfg(test)]
mod cache_tests {
    use super::{cache_may_be_behind, keep_what_the_watch_reads};
    use crate::annotations::Commands;
    use crate::crd::ChatRelease;
    use crate::workload::TrackDeployment;
    use kube::ResourceExt;
    use serde_json::json;

    fn cached(generation: i64, observed: i64) -> TrackDeployment {
        serde_json::from_value(json!({
            "metadata": {"name": "chat-stable", "generation": generation},
            "status": {"observedGeneration": observed},
        }))
        .unwrap()
    }

    #[test]
    fn a_cache_that_has_seen_our_write_and_its_rollout_is_trusted() {
        assert!(!cache_may_be_behind(Some(&cached(3, 3)), None));
        assert!(!cache_may_be_behind(Some(&cached(3, 3)), Some(3)));
        assert!(!cache_may_be_behind(None, None));
    }

    #[test]
    fn a_cache_without_our_last_write_is_behind() {
        assert!(cache_may_be_behind(Some(&cached(2, 2)), Some(3)));
        assert!(cache_may_be_behind(None, Some(1)));
    }

    #[test]
    fn a_spec_the_deployment_controller_has_not_reported_on_is_read_live() {
        assert!(cache_may_be_behind(Some(&cached(3, 2)), None));
    }

    #[test]
    fn the_release_cache_keeps_identity_spec_status_and_commands_only() {
        let mut full = ChatRelease::test("v2");
        full.metadata.resource_version = Some("41".into());
        full.metadata.generation = Some(3);
        full.metadata.managed_fields = Some(vec![Default::default()]);
        full.metadata.labels = Some([("helm.sh/chart".into(), "chat-1.2.0".into())].into());
        full.metadata.annotations = Some(
            [
                ("kubectl.kubernetes.io/last-applied-configuration", "{...}"),
                ("meta.helm.sh/release-name", "chat"),
                (crate::annotations::ROLLBACK, "true"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        );
        let mut cached = full.clone();
        keep_what_the_watch_reads(&mut cached);

        assert_eq!(
            (cached.spec, cached.status),
            (full.spec.clone(), full.status.clone())
        );
        let meta = &cached.metadata;
        assert_eq!(
            (&meta.name, &meta.namespace, &meta.uid),
            (
                &full.metadata.name,
                &full.metadata.namespace,
                &full.metadata.uid
            )
        );
        assert_eq!(
            (meta.generation, meta.resource_version.as_deref()),
            (Some(3), Some("41"))
        );
        assert_eq!(
            Commands::from_annotations(cached.metadata.annotations.as_ref().unwrap()),
            Commands::from_annotations(full.annotations()),
            "a command set on the release is still seen"
        );
        assert_eq!(meta.annotations.as_ref().map(|a| a.len()), Some(1));
        assert!(meta.labels.is_none() && meta.managed_fields.is_none());

        let mut plain = ChatRelease::test("v2");
        plain.metadata.annotations = Some([("note".into(), "x".into())].into());
        keep_what_the_watch_reads(&mut plain);
        assert!(plain.metadata.annotations.is_none());
    }
}
