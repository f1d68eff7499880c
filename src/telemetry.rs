//! The operator's own telemetry: Prometheus metrics of every ChatRelease it reconciles and of
//! itself, and the HTTP endpoints a kubelet and a Prometheus scrape: `/metrics` (OpenMetrics
//! text), `/healthz` and `/readyz`.
//!
//! [`Telemetry`] is the controller's [`ReconcileObserver`]: it sees every decided reconcile and
//! every failed one, and turns the status the decision wrote into gauges. [`METRICS`] lists every
//! metric it registers, with its labels; docs and dashboards should name metrics from that list
//! (a test checks that each one is registered and scraped, and that nothing else is).
//!
//! Every metric is derived from what the decision wrote to `status`, so the numbers a dashboard
//! shows are the ones `kubectl get chr` shows.

use crate::controller::ReconcileObserver;
use crate::crd::{ChatRelease, ChatReleaseStatus, Phase, Verdict};
use crate::error::Error;
use crate::prometheus::QueryObserver;
use crate::rollout::{Action, Decision};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode, Uri};
use kube::ResourceExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Content type of the OpenMetrics text that `/metrics` serves.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the plain-text answers (health, errors).
pub const TEXT: &str = "text/plain; charset=utf-8";

/// What kind of metric a [`MetricDoc`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Gauge,
    Counter,
    Histogram,
}

/// One metric as users query it: its name in PromQL (counters with their `_total`, histograms
/// without `_bucket`, `_sum` or `_count`), its kind, its labels and its help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDoc {
    pub name: &'static str,
    pub kind: MetricKind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

impl MetricDoc {
    /// The name given to the registry: prometheus-client appends `_total` to counters itself.
    fn registered_name(&self) -> &'static str {
        match self.kind {
            MetricKind::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            MetricKind::Gauge | MetricKind::Histogram => self.name,
        }
    }
}

const RELEASE: &[&str] = &["namespace", "name"];

/// Percent of weighted traffic on the canary, as `status.canaryWeight`.
pub const CANARY_WEIGHT: MetricDoc = MetricDoc {
    name: "chatrelease_canary_weight",
    kind: MetricKind::Gauge,
    labels: RELEASE,
    help: "Percent of weighted traffic the canary receives (status.canaryWeight)",
};

/// 1 for the ChatRelease's current `status.phase`, 0 for every other phase.
pub const PHASE: MetricDoc = MetricDoc {
    name: "chatrelease_phase",
    kind: MetricKind::Gauge,
    labels: &["namespace", "name", "phase"],
    help: "1 for the current status.phase of the ChatRelease, 0 for the other phases",
};

/// Consecutive failed analyses of the current canary, as `status.failedChecks`.
pub const FAILED_CHECKS: MetricDoc = MetricDoc {
    name: "chatrelease_failed_checks",
    kind: MetricKind::Gauge,
    labels: RELEASE,
    help: "Consecutive failed analyses of the current canary (status.failedChecks)",
};

/// The value of one check for one track in the last analysis, in the check's unit as status
/// shows it (`%` for error-rate, `ms` for latency-p99, the query's own unit for custom checks).
/// A track without data has no series, never a zero.
pub const ANALYSIS_VALUE: MetricDoc = MetricDoc {
    name: "chatrelease_analysis_value",
    kind: MetricKind::Gauge,
    labels: &["namespace", "name", "check", "track"],
    help: "Value of a check for a track (canary or stable) in the last analysis, in the check's unit (error-rate: percent, latency-p99: milliseconds)",
};

/// 1 for the verdict of one check in the last analysis, 0 for the other verdicts.
pub const CHECK_VERDICT: MetricDoc = MetricDoc {
    name: "chatrelease_analysis_check_verdict",
    kind: MetricKind::Gauge,
    labels: &["namespace", "name", "check", "verdict"],
    help: "1 for the verdict (pass, fail, inconclusive) of a check in the last analysis, 0 for the others",
};

/// 1 for the verdict of the last analysis as a whole, 0 for the other verdicts.
pub const ANALYSIS_VERDICT: MetricDoc = MetricDoc {
    name: "chatrelease_analysis_verdict",
    kind: MetricKind::Gauge,
    labels: &["namespace", "name", "verdict"],
    help: "1 for the verdict (pass, fail, inconclusive) of the last analysis, 0 for the others",
};

/// Decisions that took all traffic away from a canary: a failed analysis at the failure limit,
/// the rollback annotation, canary pods not Ready by progressDeadline, or the template set back
/// to the stable revision mid-rollout.
pub const ROLLBACKS: MetricDoc = MetricDoc {
    name: "chatrelease_rollbacks_total",
    kind: MetricKind::Counter,
    labels: RELEASE,
    help: "Rollbacks: decisions that moved all traffic from a canary back to stable",
};

/// Completed promotions: the decision that found stable running the canary's revision on all
/// its Ready pods and gave it all traffic (`Action::FinishPromotion`, phase `Succeeded`). The
/// start of a promotion (`Action::Promote`) is counted in [`DECISIONS`] as `promote`; counting
/// completions here makes `promotions / (promotions + rollbacks)` a release success rate.
pub const PROMOTIONS: MetricDoc = MetricDoc {
    name: "chatrelease_promotions_total",
    kind: MetricKind::Counter,
    labels: RELEASE,
    help: "Completed promotions: stable runs the canary's revision with all traffic (phase Succeeded)",
};

/// Decided reconciles by action, every action but `none`; a dashboard draws these as annotations.
pub const DECISIONS: MetricDoc = MetricDoc {
    name: "chatrelease_decisions_total",
    kind: MetricKind::Counter,
    labels: &["namespace", "name", "action"],
    help: "Reconciles that decided an action other than none, by action",
};

/// Duration of reconciles that reached a decision (failed ones are in [`RECONCILE_ERRORS`]).
pub const RECONCILE_DURATION: MetricDoc = MetricDoc {
    name: "chatrelease_reconcile_duration_seconds",
    kind: MetricKind::Histogram,
    labels: &[],
    help: "Duration of reconciles that reached a decision, Prometheus queries included",
};

/// Failed reconciles by `Error::metric_label` (`kube`, `spec`, `missing`, `serialize`).
pub const RECONCILE_ERRORS: MetricDoc = MetricDoc {
    name: "chatrelease_reconcile_errors_total",
    kind: MetricKind::Counter,
    labels: &["namespace", "name", "kind"],
    help: "Failed reconciles by kind of error (kube, spec, missing, serialize)",
};

/// Latency of each Prometheus query an analysis sends, by outcome (`success`, `failure`).
pub const PROMETHEUS_QUERY_DURATION: MetricDoc = MetricDoc {
    name: "chatrelease_prometheus_query_duration_seconds",
    kind: MetricKind::Histogram,
    labels: &["outcome"],
    help: "Latency of Prometheus queries sent for analyses, by outcome (success or failure)",
};

/// 1 while this replica holds the leader Lease and reconciles, 0 on a standby.
pub const LEADER: MetricDoc = MetricDoc {
    name: "chatrelease_leader",
    kind: MetricKind::Gauge,
    labels: &[],
    help: "1 while this replica is the leader and reconciles, 0 while it stands by",
};

/// Every metric [`Telemetry`] registers.
pub const METRICS: &[MetricDoc] = &[
    CANARY_WEIGHT,
    PHASE,
    FAILED_CHECKS,
    ANALYSIS_VALUE,
    CHECK_VERDICT,
    ANALYSIS_VERDICT,
    ROLLBACKS,
    PROMOTIONS,
    DECISIONS,
    RECONCILE_DURATION,
    RECONCILE_ERRORS,
    PROMETHEUS_QUERY_DURATION,
    LEADER,
];

/// Buckets of [`RECONCILE_DURATION`]: API calls take milliseconds, an analysis up to the
/// Prometheus timeout (10 s by default).
const RECONCILE_BUCKETS_SECONDS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets of [`PROMETHEUS_QUERY_DURATION`]; a timed-out query lands near the timeout.
const QUERY_BUCKETS_SECONDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every phase, so that the phase gauge can set the ones a ChatRelease is not in to 0.
const PHASES: [Phase; 8] = [
    Phase::Initializing,
    Phase::Stable,
    Phase::Progressing,
    Phase::Paused,
    Phase::Promoting,
    Phase::Succeeded,
    Phase::RolledBack,
    Phase::Failed,
];

const VERDICTS: [Verdict; 3] = [Verdict::Pass, Verdict::Fail, Verdict::Inconclusive];

/// The label of a phase: as `status.phase` spells it. The exhaustive match makes a new phase a
/// compile error here, a reminder to add it to [`PHASES`].
fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::Initializing => "Initializing",
        Phase::Stable => "Stable",
        Phase::Progressing => "Progressing",
        Phase::Paused => "Paused",
        Phase::Promoting => "Promoting",
        Phase::Succeeded => "Succeeded",
        Phase::RolledBack => "RolledBack",
        Phase::Failed => "Failed",
    }
}

fn verdict_label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Inconclusive => "inconclusive",
    }
}

/// The label of an action in [`DECISIONS`]; `simulate`'s names where it has one.
fn action_label(action: Action) -> &'static str {
    match action {
        Action::None => "none",
        Action::Initialize => "initialize",
        Action::StartCanary => "start_canary",
        Action::AwaitCanary => "await_canary",
        Action::Advance { .. } => "advance",
        Action::Hold => "hold",
        Action::Wait => "wait",
        Action::Rollback => "rollback",
        Action::Promote => "promote",
        Action::FinishPromotion => "finish_promotion",
        Action::Drained => "drained",
    }
}

/// A ChatRelease's namespace or name as a label value. Its series (a phase gauge for each phase,
/// weight, counters, per-check values) are first created together from one `ReleaseLabels`, so
/// they share the two strings instead of holding a copy each.
type Shared = Arc<String>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ReleaseLabels {
    namespace: Shared,
    name: Shared,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: Shared,
    name: Shared,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValueLabels {
    namespace: Shared,
    name: Shared,
    check: String,
    track: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckVerdictLabels {
    namespace: Shared,
    name: Shared,
    check: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    namespace: Shared,
    name: Shared,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    namespace: Shared,
    name: Shared,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    namespace: Shared,
    name: Shared,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl ReleaseLabels {
    fn of(release: &ChatRelease) -> Self {
        Self {
            namespace: Arc::new(release.namespace().unwrap_or_default()),
            name: Arc::new(release.name_any()),
        }
    }

    fn phase(&self, phase: Phase) -> PhaseLabels {
        PhaseLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            phase: phase_label(phase),
        }
    }

    fn value(&self, check: &str, track: &'static str) -> ValueLabels {
        ValueLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            check: check.to_string(),
            track,
        }
    }

    fn check_verdict(&self, check: &str, verdict: Verdict) -> CheckVerdictLabels {
        CheckVerdictLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            check: check.to_string(),
            verdict: verdict_label(verdict),
        }
    }

    fn verdict(&self, verdict: Verdict) -> VerdictLabels {
        VerdictLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            verdict: verdict_label(verdict),
        }
    }

    fn action(&self, action: &'static str) -> ActionLabels {
        ActionLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            action,
        }
    }

    fn error(&self, kind: &'static str) -> ErrorLabels {
        ErrorLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            kind,
        }
    }
}

/// The label values a ChatRelease has series under, so they can be removed when a check leaves
/// its analysis or the ChatRelease is forgotten.
#[derive(Debug, Default)]
struct Seen {
    checks: BTreeSet<String>,
    actions: BTreeSet<&'static str>,
    error_kinds: BTreeSet<&'static str>,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(RECONCILE_BUCKETS_SECONDS)
}

fn query_histogram() -> Histogram {
    Histogram::new(QUERY_BUCKETS_SECONDS)
}

/// The operator's metrics: a prometheus-client registry fed by the controller (as its
/// [`ReconcileObserver`]), by the Prometheus source (through [`Telemetry::query_observer`]) and
/// by leader election (through [`Telemetry::set_leader`]). Share it in an `Arc`.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    canary_weight: Family<ReleaseLabels, Gauge>,
    phase: Family<PhaseLabels, Gauge>,
    failed_checks: Family<ReleaseLabels, Gauge>,
    analysis_value: Family<ValueLabels, FloatGauge>,
    check_verdict: Family<CheckVerdictLabels, Gauge>,
    analysis_verdict: Family<VerdictLabels, Gauge>,
    rollbacks: Family<ReleaseLabels, Counter>,
    promotions: Family<ReleaseLabels, Counter>,
    decisions: Family<ActionLabels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    query_duration: HistogramFamily<OutcomeLabels>,
    leader: Gauge,
    seen: Mutex<HashMap<ReleaseLabels, Seen>>,
    reconciles: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

fn register(registry: &mut Registry, doc: &MetricDoc, metric: impl Metric) {
    registry.register(doc.registered_name(), doc.help, metric);
}

impl Telemetry {
    /// A registry holding every metric of [`METRICS`], with no ChatRelease series yet and
    /// `chatrelease_leader` at 0.
    pub fn new() -> Self {
        let telemetry = Self {
            registry: Registry::default(),
            canary_weight: Family::default(),
            phase: Family::default(),
            failed_checks: Family::default(),
            analysis_value: Family::default(),
            check_verdict: Family::default(),
            analysis_verdict: Family::default(),
            rollbacks: Family::default(),
            promotions: Family::default(),
            decisions: Family::default(),
            reconcile_duration: reconcile_histogram(),
            reconcile_errors: Family::default(),
            query_duration: HistogramFamily::new_with_constructor(
                query_histogram as fn() -> Histogram,
            ),
            leader: Gauge::default(),
            seen: Mutex::new(HashMap::new()),
            reconciles: AtomicU64::new(0),
        };
        let mut registry = Registry::default();
        let t = &telemetry;
        register(&mut registry, &CANARY_WEIGHT, t.canary_weight.clone());
        register(&mut registry, &PHASE, t.phase.clone());
        register(&mut registry, &FAILED_CHECKS, t.failed_checks.clone());
        register(&mut registry, &ANALYSIS_VALUE, t.analysis_value.clone());
        register(&mut registry, &CHECK_VERDICT, t.check_verdict.clone());
        register(&mut registry, &ANALYSIS_VERDICT, t.analysis_verdict.clone());
        register(&mut registry, &ROLLBACKS, t.rollbacks.clone());
        register(&mut registry, &PROMOTIONS, t.promotions.clone());
        register(&mut registry, &DECISIONS, t.decisions.clone());
        register(
            &mut registry,
            &RECONCILE_DURATION,
            t.reconcile_duration.clone(),
        );
        register(&mut registry, &RECONCILE_ERRORS, t.reconcile_errors.clone());
        register(
            &mut registry,
            &PROMETHEUS_QUERY_DURATION,
            t.query_duration.clone(),
        );
        register(&mut registry, &LEADER, t.leader.clone());
        Self {
            registry,
            ..telemetry
        }
    }

    /// Reconciles finished so far: a sign of work done, for [`crate::memory`].
    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// A hook for `PrometheusSource::with_query_observer` that records each query's latency
    /// under `outcome="success"` or `outcome="failure"`.
    pub fn query_observer(&self) -> QueryObserver {
        let histogram = self.query_duration.clone();
        Arc::new(move |took: Duration, ok: bool| {
            let outcome = if ok { "success" } else { "failure" };
            histogram
                .get_or_create(&OutcomeLabels { outcome })
                .observe(took.as_secs_f64());
        })
    }

    /// Records whether this replica holds the leader Lease (`chatrelease_leader` 1 or 0).
    pub fn set_leader(&self, leader: bool) {
        let before = self.leader.set(i64::from(leader));
        if before != i64::from(leader) {
            tracing::info!(leader, "leadership changed");
        }
    }

    /// Keeps `chatrelease_leader` equal to `leadership` (such as `leader::Leadership::subscribe`)
    /// until its sender is dropped, then reports 0: a replica whose election ended leads no more.
    pub async fn follow_leadership(self: Arc<Self>, mut leadership: watch::Receiver<bool>) {
        loop {
            let leader = *leadership.borrow_and_update();
            self.set_leader(leader);
            if leadership.changed().await.is_err() {
                break;
            }
        }
        self.set_leader(false);
    }

    /// Removes every series of the ChatRelease `namespace/name`, for when it was deleted; its
    /// last values would otherwise stay on dashboards until the operator restarts.
    pub fn forget(&self, namespace: &str, name: &str) {
        let release = ReleaseLabels {
            namespace: Arc::new(namespace.to_string()),
            name: Arc::new(name.to_string()),
        };
        let seen = self.seen().remove(&release).unwrap_or_default();
        self.canary_weight.remove(&release);
        self.failed_checks.remove(&release);
        self.rollbacks.remove(&release);
        self.promotions.remove(&release);
        for phase in PHASES {
            self.phase.remove(&release.phase(phase));
        }
        for verdict in VERDICTS {
            self.analysis_verdict.remove(&release.verdict(verdict));
        }
        for check in &seen.checks {
            self.remove_check(&release, check);
        }
        for action in seen.actions {
            self.decisions.remove(&release.action(action));
        }
        for kind in seen.error_kinds {
            self.reconcile_errors.remove(&release.error(kind));
        }
        tracing::debug!(namespace, name, "metrics of a deleted ChatRelease removed");
    }

    /// A panic while the lock was held leaves the map merely stale, so poisoning is ignored.
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<ReleaseLabels, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove_check(&self, release: &ReleaseLabels, check: &str) {
        for track in ["canary", "stable"] {
            self.analysis_value.remove(&release.value(check, track));
        }
        for verdict in VERDICTS {
            self.check_verdict
                .remove(&release.check_verdict(check, verdict));
        }
    }

    /// Sets the gauges of one ChatRelease from the status its reconcile wrote.
    fn record_status(&self, release: &ReleaseLabels, status: &ChatReleaseStatus) {
        // Counters start at 0 so that `increase()` sees a release's first rollback: a series
        // that appears at 1 has no earlier sample to increase from.
        self.rollbacks.get_or_create(release).inc_by(0);
        self.promotions.get_or_create(release).inc_by(0);
        self.canary_weight
            .get_or_create(release)
            .set(i64::from(status.canary_weight));
        self.failed_checks
            .get_or_create(release)
            .set(i64::from(status.failed_checks));
        for phase in PHASES {
            self.phase
                .get_or_create(&release.phase(phase))
                .set(i64::from(phase == status.phase));
        }

        let analysis = status.last_analysis.as_ref();
        for verdict in VERDICTS {
            let labels = release.verdict(verdict);
            match analysis {
                Some(a) => {
                    self.analysis_verdict
                        .get_or_create(&labels)
                        .set(i64::from(a.verdict == verdict));
                }
                None => {
                    self.analysis_verdict.remove(&labels);
                }
            }
        }

        let checks = analysis.map(|a| a.checks.as_slice()).unwrap_or_default();
        let mut seen = self.seen();
        let seen = seen.entry(release.clone()).or_default();
        let current: BTreeSet<String> = checks.iter().map(|c| c.name.clone()).collect();
        for gone in seen.checks.difference(&current) {
            self.remove_check(release, gone);
        }
        for check in checks {
            for (track, value) in [("canary", check.canary), ("stable", check.stable)] {
                let labels = release.value(&check.name, track);
                // No data is not zero: a track without a value has no series.
                match value.filter(|v| v.is_finite()) {
                    Some(v) => {
                        self.analysis_value.get_or_create(&labels).set(v);
                    }
                    None => {
                        self.analysis_value.remove(&labels);
                    }
                }
            }
            for verdict in VERDICTS {
                self.check_verdict
                    .get_or_create(&release.check_verdict(&check.name, verdict))
                    .set(i64::from(check.verdict == verdict));
            }
        }
        seen.checks = current;
    }

    fn record_action(&self, release: &ReleaseLabels, action: Action) {
        match action {
            Action::None => return,
            Action::Rollback => {
                self.rollbacks.get_or_create(release).inc();
            }
            Action::FinishPromotion => {
                self.promotions.get_or_create(release).inc();
            }
            _ => {}
        }
        let label = action_label(action);
        self.decisions.get_or_create(&release.action(label)).inc();
        self.seen()
            .entry(release.clone())
            .or_default()
            .actions
            .insert(label);
    }
}

impl ReconcileObserver for Telemetry {
    fn deleted(&self, namespace: &str, name: &str) {
        self.forget(namespace, name);
    }

    fn reconciled(&self, release: &ChatRelease, decision: &Decision, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        let labels = ReleaseLabels::of(release);
        self.record_status(&labels, &decision.status);
        self.record_action(&labels, decision.action);
    }

    fn failed(&self, release: &ChatRelease, error: &Error) {
        let labels = ReleaseLabels::of(release);
        let kind = error.metric_label();
        self.reconcile_errors
            .get_or_create(&labels.error(kind))
            .inc();
        self.seen()
            .entry(labels)
            .or_default()
            .error_kinds
            .insert(kind);
    }
}

/// Whether this replica is ready, as `/readyz` reports it.
///
/// Ready means the process is initialised: its HTTP server listens and the API server answered
/// it ([`Readiness::ready_when_api_answers`]).
/// It does **not** depend on leadership, and it does not wait for the controller's caches: with
/// leader election a standby runs no controller and so has no caches, and the leader's caches
/// fill only after it wins the Lease.
///
/// Kubernetes uses readiness only to pick a Service's endpoints, and the one Service in front of
/// the operator is the metrics Service, which should scrape both replicas: a standby reporting
/// not-ready would drop out of it, and a rolling update of the operator's Deployment would wait
/// on a pod that stands by by design. Leadership is exported instead as `chatrelease_leader`
/// (1 on the leader, 0 on a standby), so a dashboard or alert can check that exactly one replica
/// leads. Liveness (`/healthz`) answers 200 as long as the process serves HTTP at all.
///
/// Clones share one flag; it starts not ready.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that says not ready until [`Readiness::set`] says otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks this replica ready or not ready.
    pub fn set(&self, ready: bool) {
        let before = self.0.swap(ready, Ordering::SeqCst);
        if before != ready {
            tracing::info!(ready, "readiness changed");
        }
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Marks this replica ready once the API server answers `client` (a `GET /version`),
    /// asking again every [`API_RETRY`] until it does. Spawn it at start-up.
    pub async fn ready_when_api_answers(self, client: kube::Client) {
        self.ready_when_api_answers_every(client, API_RETRY).await;
    }

    async fn ready_when_api_answers_every(self, client: kube::Client, retry: Duration) {
        loop {
            match client.apiserver_version().await {
                Ok(version) => {
                    tracing::debug!(version = %version.git_version, "the API server answered");
                    self.set(true);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "the API server does not answer yet; not ready");
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }
}

/// How often [`Readiness::ready_when_api_answers`] asks again.
pub const API_RETRY: Duration = Duration::from_secs(2);

/// Why the telemetry server could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen on {address} for /metrics, /healthz and /readyz: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The answer to `GET /metrics`: the OpenMetrics text, or a 500 saying why it was not encoded.
pub fn metrics_reply(encoded: Result<String, std::fmt::Error>) -> Response<Full<Bytes>> {
    match encoded {
        Ok(text) => reply(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, text),
        Err(error) => {
            tracing::error!(%error, "cannot encode the metrics");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("cannot encode the metrics: {error}\n"),
            )
        }
    }
}

/// A response with a body and its content type.
pub fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Answers one request to the telemetry server.
fn route(
    method: &Method,
    path: &str,
    telemetry: &Telemetry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => metrics_reply(telemetry.encode()),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if readiness.is_ready() => reply(StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: caches not synced with the API server yet\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves HTTP/1 on `listener` until `shutdown` completes, answering each request with
/// `handler(method, uri)`. Nothing here is specific to the operator: any small metrics or health
/// endpoint can use it (the mesh simulator's reads the query too).
pub async fn serve_http<H>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(&Method, &Uri) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(%error, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handler(request.method(), request.uri());
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
        // Reap finished connections so the set does not grow with every scrape.
        while connections.try_join_next().is_some() {}
    }
}

/// The telemetry server, bound but not yet serving: binding first lets `main` fail fast on a
/// taken port, and lets tests bind port 0 and read the port.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    readiness: Readiness,
}

impl MetricsServer {
    /// Listens on `address` for `/metrics`, `/healthz` and `/readyz`.
    pub async fn bind(
        address: SocketAddr,
        telemetry: Arc<Telemetry>,
        readiness: Readiness,
    ) -> Result<Self, TelemetryError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| TelemetryError::Bind { address, source })?;
        Ok(Self {
            listener,
            telemetry,
            readiness,
        })
    }

    /// The address it listens on, with the port the system chose for port 0.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let address = self
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        tracing::info!(%address, "serving /metrics, /healthz and /readyz");
        let (telemetry, readiness) = (self.telemetry, self.readiness);
        serve_http(
            self.listener,
            move |method, uri: &Uri| route(method, uri.path(), &telemetry, &readiness),
            shutdown,
        )
        .await;
    }
}

/// Binds `address` and serves `/metrics`, `/healthz` and `/readyz` for as long as the process
/// runs; fails only if the address cannot be bound.
pub async fn serve(
    address: SocketAddr,
    telemetry: Arc<Telemetry>,
    readiness: Readiness,
) -> Result<(), TelemetryError> {
    MetricsServer::bind(address, telemetry, readiness)
        .await?
        .run(std::future::pending())
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{NAME, NAMESPACE};
    use crate::rollout::{Plan, TrackPlan};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A canary of v2 at 25% after an analysis that passed with error-rate and latency checks.
    fn mid_rollout_status() -> ChatReleaseStatus {
        serde_json::from_value(json!({
            "phase": "Progressing",
            "canaryWeight": 25,
            "currentStep": 1,
            "stableRevision": "aaaa1111",
            "canaryRevision": "bbbb2222",
            "failedChecks": 1,
            "message": "analysis passed; canary advanced from 5% to 25%",
            "lastAnalysis": {
                "time": "2025-06-01T12:00:00Z",
                "verdict": "Pass",
                "weight": 5,
                "canaryRequests": 1200.0,
                "stableRequests": 22800.0,
                "reason": "every check within bounds",
                "checks": [
                    {"name": "error-rate", "canary": 0.17, "stable": 0.13, "bound": "<= 1%",
                     "unit": "%", "verdict": "Pass"},
                    {"name": "latency-p99", "canary": 850.0, "stable": 800.0, "bound": "<= 3000ms",
                     "unit": "ms", "verdict": "Pass"},
                    {"name": "ttft-p99", "canary": 1.7, "bound": "<= 1.5", "verdict": "Inconclusive"}
                ]
            }
        }))
        .expect("the status deserialises")
    }

    fn release(status: &ChatReleaseStatus) -> ChatRelease {
        ChatRelease::test("v2").with_status(status.clone())
    }

    fn decision(action: Action, status: ChatReleaseStatus) -> Decision {
        Decision {
            action,
            status,
            plan: Plan {
                stable: TrackPlan::Keep,
                canary: TrackPlan::Keep,
                canary_weight: 25,
                canary_routes: true,
                stable_routes: true,
            },
            notices: Vec::new(),
            consumed: Vec::new(),
            requeue_after: Duration::from_secs(60),
        }
    }

    fn observe(telemetry: &Telemetry, action: Action, status: ChatReleaseStatus) {
        telemetry.reconciled(
            &release(&status),
            &decision(action, status),
            Duration::from_millis(40),
        );
    }

    fn scraped(telemetry: &Telemetry) -> String {
        telemetry.encode().expect("the metrics encode")
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    fn assert_line(text: &str, line: &str) {
        assert!(has_line(text, line), "no line {line:?} in\n{text}");
    }

    const RELEASE_LABELS: &str = r#"namespace="chat",name="lobe-chat""#;

    /// Status line and body of `GET path`.
    async fn http_get(address: SocketAddr, path: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    /// A server on a free local port, stopped when the returned sender is dropped.
    async fn start(
        telemetry: Arc<Telemetry>,
        readiness: Readiness,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let server = MetricsServer::bind(([127, 0, 0, 1], 0).into(), telemetry, readiness)
            .await
            .unwrap();
        let address = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        (address, stop)
    }

    #[tokio::test]
    async fn a_release_mid_rollout_is_scraped_with_its_weight_phase_and_checks() {
        let telemetry = Arc::new(Telemetry::new());
        observe(
            &telemetry,
            Action::Advance { from: 5, to: 25 },
            mid_rollout_status(),
        );
        let (address, _stop) = start(telemetry, Readiness::new()).await;

        let (head, body) = http_get(address, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        let l = RELEASE_LABELS;
        for line in [
            format!("chatrelease_canary_weight{{{l}}} 25"),
            format!("chatrelease_failed_checks{{{l}}} 1"),
            format!("chatrelease_phase{{{l},phase=\"Progressing\"}} 1"),
            format!("chatrelease_phase{{{l},phase=\"Stable\"}} 0"),
            format!("chatrelease_phase{{{l},phase=\"RolledBack\"}} 0"),
            format!("chatrelease_analysis_value{{{l},check=\"error-rate\",track=\"canary\"}} 0.17"),
            format!("chatrelease_analysis_value{{{l},check=\"error-rate\",track=\"stable\"}} 0.13"),
            format!(
                "chatrelease_analysis_value{{{l},check=\"latency-p99\",track=\"canary\"}} 850.0"
            ),
            format!(
                "chatrelease_analysis_check_verdict{{{l},check=\"error-rate\",verdict=\"pass\"}} 1"
            ),
            format!(
                "chatrelease_analysis_check_verdict{{{l},check=\"error-rate\",verdict=\"fail\"}} 0"
            ),
            format!(
                "chatrelease_analysis_check_verdict{{{l},check=\"ttft-p99\",verdict=\"inconclusive\"}} 1"
            ),
            format!("chatrelease_analysis_verdict{{{l},verdict=\"pass\"}} 1"),
            format!("chatrelease_decisions_total{{{l},action=\"advance\"}} 1"),
            "chatrelease_reconcile_duration_seconds_count 1".to_string(),
            "chatrelease_reconcile_duration_seconds_bucket{le=\"0.05\"} 1".to_string(),
            "chatrelease_leader 0".to_string(),
            "# EOF".to_string(),
        ] {
            assert_line(&body, &line);
        }
        // The custom check had no stable value: no series rather than a zero.
        assert!(
            !body.contains(r#"check="ttft-p99",track="stable""#),
            "{body}"
        );
    }

    #[tokio::test]
    async fn readyz_follows_the_readiness_flag_and_healthz_always_answers() {
        let readiness = Readiness::new();
        let (address, _stop) = start(Arc::new(Telemetry::new()), readiness.clone()).await;

        let (head, body) = http_get(address, "/readyz").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(body.starts_with("not ready"), "{body}");
        let (head, _) = http_get(address, "/healthz").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");

        readiness.set(true);
        let (head, body) = http_get(address, "/readyz").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "ready\n");

        readiness.set(false);
        let (head, _) = http_get(address, "/readyz").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");

        let (head, _) = http_get(address, "/nothing").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    }

    #[tokio::test]
    async fn the_leader_gauge_follows_the_election() {
        let telemetry = Arc::new(Telemetry::new());
        let (leadership, subscribed) = watch::channel(false);
        let follower = tokio::spawn(telemetry.clone().follow_leadership(subscribed));
        let leader_line = |telemetry: &Telemetry| {
            scraped(telemetry)
                .lines()
                .find(|l| l.starts_with("chatrelease_leader "))
                .map(str::to_string)
        };
        let wait_for = |want: &'static str| {
            let telemetry = telemetry.clone();
            async move {
                for _ in 0..200 {
                    if leader_line(&telemetry).as_deref() == Some(want) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("never saw {want:?}, last {:?}", leader_line(&telemetry));
            }
        };
        leadership.send_replace(true);
        wait_for("chatrelease_leader 1").await;
        leadership.send_replace(false);
        wait_for("chatrelease_leader 0").await;
        leadership.send_replace(true);
        wait_for("chatrelease_leader 1").await;
        drop(leadership);
        follower.await.unwrap();
        assert_eq!(
            leader_line(&telemetry).as_deref(),
            Some("chatrelease_leader 0")
        );
    }

    #[tokio::test]
    async fn a_replica_is_ready_once_the_api_server_answers() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let readiness = Readiness::new();
        let task = tokio::spawn(readiness.clone().ready_when_api_answers_every(
            kube::Client::new(service, NAMESPACE),
            Duration::from_millis(10),
        ));

        let (request, send) = api.next_request().await.unwrap();
        assert_eq!(request.uri().path(), "/version");
        send.send_response(
            Response::builder()
                .status(503)
                .body(Body::from(b"starting".to_vec()))
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!readiness.is_ready());

        let (_, send) = api.next_request().await.unwrap();
        let version = json!({
            "major": "1", "minor": "36", "gitVersion": "v1.36.0", "gitCommit": "abc",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
            "compiler": "gc", "platform": "linux/amd64"
        });
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&version).unwrap()))
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(readiness.is_ready());
    }

    #[test]
    fn reconciles_count_every_finished_reconcile_for_the_memory_trimmer() {
        let telemetry = Telemetry::new();
        assert_eq!(telemetry.reconciles(), 0);
        observe(&telemetry, Action::None, mid_rollout_status());
        observe(&telemetry, Action::Rollback, mid_rollout_status());
        assert_eq!(telemetry.reconciles(), 2);
    }

    #[test]
    fn leadership_is_a_gauge_independent_of_readiness() {
        let telemetry = Telemetry::new();
        assert_line(&scraped(&telemetry), "chatrelease_leader 0");
        telemetry.set_leader(true);
        assert_line(&scraped(&telemetry), "chatrelease_leader 1");
        telemetry.set_leader(false);
        assert_line(&scraped(&telemetry), "chatrelease_leader 0");
    }

    #[test]
    fn reconcile_errors_are_counted_by_kind() {
        let telemetry = Telemetry::new();
        let release = ChatRelease::test("v2");
        let missing = Error::Missing("Deployment chat/lobe-chat-stable is gone".into());
        let spec = Error::Spec(crate::settings::SpecError {
            field: "strategy.interval".into(),
            problem: "must be a duration".into(),
        });
        telemetry.failed(&release, &missing);
        telemetry.failed(&release, &missing);
        telemetry.failed(&release, &spec);
        let text = scraped(&telemetry);
        let l = RELEASE_LABELS;
        assert_line(
            &text,
            &format!("chatrelease_reconcile_errors_total{{{l},kind=\"missing\"}} 2"),
        );
        assert_line(
            &text,
            &format!("chatrelease_reconcile_errors_total{{{l},kind=\"spec\"}} 1"),
        );
        assert!(!text.contains("kind=\"kube\""), "{text}");
    }

    #[test]
    fn a_promotion_counts_when_it_finishes_and_a_rollback_when_it_is_decided() {
        let telemetry = Telemetry::new();
        let mut status = mid_rollout_status();
        status.phase = Phase::Promoting;
        observe(&telemetry, Action::Promote, status.clone());
        let text = scraped(&telemetry);
        let l = RELEASE_LABELS;
        assert_line(&text, &format!("chatrelease_promotions_total{{{l}}} 0"));
        assert_line(&text, &format!("chatrelease_rollbacks_total{{{l}}} 0"));
        assert_line(
            &text,
            &format!("chatrelease_decisions_total{{{l},action=\"promote\"}} 1"),
        );

        status.phase = Phase::Succeeded;
        status.canary_weight = 0;
        observe(&telemetry, Action::FinishPromotion, status.clone());
        // Later reconciles of a settled release decide nothing and count nothing.
        observe(&telemetry, Action::None, status.clone());
        let text = scraped(&telemetry);
        assert_line(&text, &format!("chatrelease_promotions_total{{{l}}} 1"));
        assert_line(&text, &format!("chatrelease_canary_weight{{{l}}} 0"));
        assert_line(
            &text,
            &format!("chatrelease_phase{{{l},phase=\"Succeeded\"}} 1"),
        );
        assert_line(
            &text,
            &format!("chatrelease_phase{{{l},phase=\"Promoting\"}} 0"),
        );
        assert!(!text.contains("action=\"none\""), "{text}");

        status.phase = Phase::RolledBack;
        observe(&telemetry, Action::Rollback, status);
        let text = scraped(&telemetry);
        assert_line(&text, &format!("chatrelease_rollbacks_total{{{l}}} 1"));
        assert_line(&text, &format!("chatrelease_promotions_total{{{l}}} 1"));
    }

    #[test]
    fn the_query_observer_records_latency_by_outcome() {
        let telemetry = Telemetry::new();
        let observer = telemetry.query_observer();
        observer(Duration::from_millis(30), true);
        observer(Duration::from_millis(20), true);
        observer(Duration::from_secs(10), false);
        let text = scraped(&telemetry);
        let name = "chatrelease_prometheus_query_duration_seconds";
        assert_line(&text, &format!("{name}_count{{outcome=\"success\"}} 2"));
        assert_line(&text, &format!("{name}_count{{outcome=\"failure\"}} 1"));
        assert_line(
            &text,
            &format!("{name}_bucket{{le=\"0.05\",outcome=\"success\"}} 2"),
        );
        assert_line(
            &text,
            &format!("{name}_bucket{{le=\"5.0\",outcome=\"failure\"}} 0"),
        );
    }

    #[test]
    fn a_check_that_leaves_the_analysis_loses_its_series() {
        let telemetry = Telemetry::new();
        observe(&telemetry, Action::Hold, mid_rollout_status());
        assert!(scraped(&telemetry).contains(r#"check="ttft-p99""#));

        let mut status = mid_rollout_status();
        if let Some(analysis) = status.last_analysis.as_mut() {
            analysis.checks.retain(|c| c.name != "ttft-p99");
        }
        observe(&telemetry, Action::Hold, status.clone());
        let text = scraped(&telemetry);
        assert!(!text.contains(r#"check="ttft-p99""#), "{text}");
        assert!(text.contains(r#"check="error-rate""#), "{text}");

        status.last_analysis = None;
        observe(&telemetry, Action::StartCanary, status);
        let text = scraped(&telemetry);
        assert!(!text.contains("check="), "{text}");
        assert!(!text.contains("chatrelease_analysis_verdict{"), "{text}");
    }

    #[test]
    fn a_forgotten_release_has_no_series_left() {
        let telemetry = Telemetry::new();
        observe(&telemetry, Action::Rollback, mid_rollout_status());
        telemetry.failed(&ChatRelease::test("v2"), &Error::Missing("gone".into()));
        let other = {
            let mut r = ChatRelease::test("v2");
            r.metadata.name = Some("other".into());
            r
        };
        telemetry.reconciled(
            &other,
            &decision(Action::Hold, mid_rollout_status()),
            Duration::from_millis(5),
        );

        telemetry.forget(NAMESPACE, NAME);
        let text = scraped(&telemetry);
        assert!(!text.contains(r#"name="lobe-chat""#), "{text}");
        assert!(
            text.contains(r#"chatrelease_canary_weight{namespace="chat",name="other"} 25"#),
            "{text}"
        );
    }

    #[test]
    fn every_phase_has_a_distinct_label_as_status_spells_it() {
        let labels: BTreeSet<&str> = PHASES.iter().map(|p| phase_label(*p)).collect();
        assert_eq!(labels.len(), PHASES.len());
        for phase in PHASES {
            assert_eq!(phase_label(phase), phase.to_string());
        }
    }

    /// Sample names a metric shows under: counters and gauges as named, histograms by `_count`.
    fn sample_name(doc: &MetricDoc) -> String {
        match doc.kind {
            MetricKind::Histogram => format!("{}_count", doc.name),
            MetricKind::Counter | MetricKind::Gauge => doc.name.to_string(),
        }
    }

    /// The label names of a sample line, `le` aside.
    fn label_names(line: &str) -> BTreeSet<String> {
        let Some((_, rest)) = line.split_once('{') else {
            return BTreeSet::new();
        };
        let labels = rest.rsplit_once('}').map_or(rest, |(l, _)| l);
        regex::Regex::new(r#"([a-z_]+)="[^"]*""#)
            .unwrap()
            .captures_iter(labels)
            .map(|c| c[1].to_string())
            .filter(|n| n != "le")
            .collect()
    }

    #[test]
    fn every_documented_metric_is_registered_with_its_labels_and_nothing_else_is() {
        let telemetry = Telemetry::new();
        observe(&telemetry, Action::Rollback, mid_rollout_status());
        observe(&telemetry, Action::FinishPromotion, mid_rollout_status());
        telemetry.failed(&ChatRelease::test("v2"), &Error::Missing("gone".into()));
        (telemetry.query_observer())(Duration::from_millis(3), true);
        let text = scraped(&telemetry);

        for doc in METRICS {
            assert!(doc.name.starts_with("chatrelease_"), "{}", doc.name);
            let kind = match doc.kind {
                MetricKind::Gauge => "gauge",
                MetricKind::Counter => "counter",
                MetricKind::Histogram => "histogram",
            };
            assert_line(&text, &format!("# TYPE {} {kind}", doc.registered_name()));
            assert_line(
                &text,
                &format!("# HELP {} {}.", doc.registered_name(), doc.help),
            );
            let sample = sample_name(doc);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("{sample}{{")) || l.starts_with(&format!("{sample} "))
                })
                .collect();
            assert!(!lines.is_empty(), "no sample of {sample} in\n{text}");
            let wanted: BTreeSet<String> = doc.labels.iter().map(|l| l.to_string()).collect();
            for line in lines {
                assert_eq!(label_names(line), wanted, "{line}");
            }
        }

        let registered: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let documented: BTreeSet<&str> = METRICS.iter().map(|d| d.registered_name()).collect();
        assert_eq!(registered, documented);
    }
}
