//! The sequential test's eyes between reconciles, for every canary at once.
//!
//! Looking at each canary from its own reconcile every `analysis.watchEvery` cost a reconcile
//! and three queries per canary every 10 s: at a thousand releases, a hundred reconciles and
//! three hundred queries a second. Instead, one task asks Prometheus once per group of canaries
//! that share a Prometheus, a source, error codes and `watchEvery` (two queries: requests and
//! errors by namespace and workload), adds what each look saw to the counts since each canary's
//! step began, and wakes the reconcile of a canary only when those counts say stop. That
//! reconcile asks again for its canary alone, over exactly the step, and decides
//! (`rollout::decide_watch`): the counts here only choose whom to look at closely.
//!
//! The counts live in memory. A restarted operator reconciles every ChatRelease once, and each
//! reconcile's own look seeds them with the exact counts since the step began ([`CanaryWatch::seed`]).

use crate::crd::{ChatRelease, RequestSource};
use crate::metrics::{MetricsSource, Tally, WatchLook};
use crate::rollout;
use crate::sequential::{self, Counts};
use crate::settings::{JudgeSettings, Settings};
use crate::workload::Track;
use futures::channel::mpsc;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often the task checks which groups are due a look. Looks themselves follow each group's
/// `watchEvery`.
const TICK: Duration = Duration::from_secs(1);

/// Canaries looked at together: the same query answers for all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    pub address: String,
    pub source: RequestSource,
    pub error_codes: String,
    pub every: Duration,
}

/// The step a canary's counts belong to: a new step, or a new canary revision, starts them anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub started: Timestamp,
    pub revision: String,
}

impl Step {
    /// The step status says a canary is in, if it is in one.
    pub fn of(status: &crate::crd::ChatReleaseStatus) -> Option<Self> {
        Some(Self {
            started: status.step_started_at.as_ref()?.0,
            revision: status.canary_revision.clone()?,
        })
    }
}

/// What the watch needs of one ChatRelease's spec, parsed once per generation.
#[derive(Debug, Clone)]
struct Watched {
    group: Group,
    judge: JudgeSettings,
}

/// The counts since a canary's step began, as far as the watch has seen them.
#[derive(Debug, Clone, PartialEq)]
struct StepCounts {
    step: Step,
    canary: Counts,
    stable: Counts,
}

#[derive(Default)]
struct State {
    settings: HashMap<ObjectRef<ChatRelease>, (Option<i64>, Option<Watched>)>,
    counts: HashMap<ObjectRef<ChatRelease>, StepCounts>,
    looked: HashMap<Group, Timestamp>,
    /// Canaries woken because their counts say stop, until their reconcile has looked.
    woken: std::collections::HashSet<ObjectRef<ChatRelease>>,
}

/// One canary under watch in this round.
#[derive(Debug, Clone)]
struct Member {
    key: ObjectRef<ChatRelease>,
    namespace: String,
    name: String,
    step: Step,
    judge: JudgeSettings,
}

pub struct CanaryWatch {
    metrics: Arc<dyn MetricsSource>,
    default_prometheus: String,
    state: Mutex<State>,
}

impl CanaryWatch {
    pub fn new(metrics: Arc<dyn MetricsSource>, default_prometheus: String) -> Self {
        Self {
            metrics,
            default_prometheus,
            state: Mutex::default(),
        }
    }

    /// Looks at every due group every [`TICK`], forever; sends the ChatReleases whose counts say
    /// stop to `wake`.
    pub async fn run(
        self: Arc<Self>,
        releases: Store<ChatRelease>,
        clock: crate::controller::Clock,
        wake: mpsc::Sender<ObjectRef<ChatRelease>>,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticker.tick().await;
            for key in self.look_once(&releases.state(), clock()).await {
                // A full queue means reconciles are already on their way; the next look retries.
                if wake.clone().try_send(key).is_err() {
                    debug!("wake-up queue full; the next look retries");
                }
            }
        }
    }

    /// Whether a reconcile should look at this canary itself: its counts say stop, or the watch
    /// has none for this step yet (a new step, or a restarted operator). Otherwise the watch
    /// looks for it, and a reconcile for another reason (a Deployment changed) adds nothing.
    pub fn wants_a_close_look(&self, key: &ObjectRef<ChatRelease>, step: &Step) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.woken.contains(key) || state.counts.get(key).is_none_or(|c| &c.step != step)
    }

    /// The exact counts since `step` began, from a reconcile's own look at one canary.
    pub fn seed(&self, key: ObjectRef<ChatRelease>, step: Step, canary: Counts, stable: Counts) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.woken.remove(&key);
        state.counts.insert(
            key,
            StepCounts {
                step,
                canary,
                stable,
            },
        );
    }

    /// One round: the due groups are asked, their counts added up; returns the ChatReleases to
    /// wake.
    async fn look_once(
        &self,
        releases: &[Arc<ChatRelease>],
        now: Timestamp,
    ) -> Vec<ObjectRef<ChatRelease>> {
        let due = self.due_groups(releases, now);
        let mut wake = Vec::new();
        for (group, members, window) in due {
            let look = WatchLook {
                address: group.address.clone(),
                source: group.source,
                error_codes: group.error_codes.clone(),
                namespaces: members
                    .iter()
                    .map(|m| m.namespace.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                window,
                at: now,
            };
            let Some(answer) = self.metrics.tally(&look).await else {
                // This backend cannot ask in bulk: each reconcile looks for itself.
                continue;
            };
            match answer {
                Ok(tally) => {
                    let window_start = rollout::earlier(now, window);
                    wake.extend(self.add(&members, &tally, window_start));
                }
                // Nothing seen is nothing added: the interval's analysis still judges, and
                // treats an unreachable Prometheus as inconclusive.
                Err(reason) => {
                    warn!(address = %group.address, %reason, "sequential watch could not ask Prometheus")
                }
            }
        }
        wake
    }

    /// The groups due a look now, with their members and how far back the look counts. Forgets
    /// the counts of canaries no longer watched.
    fn due_groups(
        &self,
        releases: &[Arc<ChatRelease>],
        now: Timestamp,
    ) -> Vec<(Group, Vec<Member>, Duration)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut groups: HashMap<Group, Vec<Member>> = HashMap::new();
        let mut canaries = std::collections::HashSet::new();
        for release in releases {
            // Most releases are Stable: they cost the watch nothing, not even a settings entry.
            let Some(step) = watched_step(release) else {
                continue;
            };
            let key = release.key();
            canaries.insert(key.clone());
            let generation = release.metadata.generation;
            let watched = match state.settings.get(&key) {
                Some((seen, watched)) if *seen == generation => watched.clone(),
                _ => {
                    let watched = self.watched(release);
                    state
                        .settings
                        .insert(key.clone(), (generation, watched.clone()));
                    watched
                }
            };
            let Some(watched) = watched else {
                continue;
            };
            groups.entry(watched.group).or_default().push(Member {
                key,
                namespace: release.namespace().unwrap_or_default(),
                name: release.name_any(),
                step,
                judge: watched.judge,
            });
        }
        state.settings.retain(|key, _| canaries.contains(key));
        let watching: std::collections::HashSet<&ObjectRef<ChatRelease>> =
            groups.values().flatten().map(|m| &m.key).collect();
        state.counts.retain(|key, _| watching.contains(key));
        state.woken.retain(|key| watching.contains(key));
        state.looked.retain(|group, _| groups.contains_key(group));

        let mut due = Vec::new();
        for (group, members) in groups {
            let window = match state.looked.get(&group) {
                None => group.every,
                Some(last) => {
                    let since = Duration::try_from(now.duration_since(*last)).unwrap_or_default();
                    // The clock has whole seconds: a look a hair early is on time.
                    if since + Duration::from_secs(1) <= group.every {
                        continue;
                    }
                    since
                }
            };
            state.looked.insert(group.clone(), now);
            due.push((group, members, window));
        }
        due
    }

    fn watched(&self, release: &ChatRelease) -> Option<Watched> {
        let settings = Settings::from_spec(&release.spec).ok()?;
        let every = settings.watch_every?;
        let address = release
            .spec
            .analysis
            .prometheus
            .as_ref()
            .map_or_else(|| self.default_prometheus.clone(), |p| p.address.clone());
        Some(Watched {
            group: Group {
                address,
                source: settings.source,
                error_codes: settings.error_codes.clone(),
                every,
            },
            judge: settings.judge,
        })
    }

    /// Adds one look's counts to each member's step; the members whose counts now say stop.
    fn add(
        &self,
        members: &[Member],
        tally: &Tally,
        window_start: Timestamp,
    ) -> Vec<ObjectRef<ChatRelease>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut wake = Vec::new();
        for member in members {
            let seen = |track: Track| {
                tally
                    .get(&(member.namespace.clone(), track.workload_name(&member.name)))
                    .copied()
                    .unwrap_or_default()
            };
            let counts = state
                .counts
                .entry(member.key.clone())
                .or_insert_with(|| StepCounts {
                    step: member.step.clone(),
                    canary: Counts::default(),
                    stable: Counts::default(),
                });
            if counts.step != member.step {
                *counts = StepCounts {
                    step: member.step.clone(),
                    canary: Counts::default(),
                    stable: Counts::default(),
                };
            }
            // A look that reaches back before the step would count another step's requests (or
            // another canary revision's): it only starts the counts, the next look adds.
            if window_start < member.step.started {
                continue;
            }
            counts.canary = sum(counts.canary, seen(Track::Canary));
            counts.stable = sum(counts.stable, seen(Track::Stable));
            let evidence = sequential::error_evidence(counts.canary, counts.stable, &member.judge);
            if evidence.stop {
                info!(chatrelease = %member.name, namespace = %member.namespace, evidence = %evidence.describe(), "sequential watch: counts say stop; reconciling to confirm");
                state.woken.insert(member.key.clone());
                wake.push(member.key.clone());
            }
        }
        wake
    }
}

/// The step a watchable canary is in, from status alone; `None` when it is not watched.
fn watched_step(release: &ChatRelease) -> Option<Step> {
    let status = release.status.as_ref()?;
    if !rollout::canary_watchable(status) {
        return None;
    }
    Step::of(status)
}

fn sum(a: Counts, b: Counts) -> Counts {
    Counts {
        requests: a.requests + b.requests,
        errors: a.errors + b.errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{NAMESPACE, canary_status};
    use crate::metrics::{AnalysisTarget, BoxFuture, Observations};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers every bulk look with the same counts per workload, and counts the looks.
    #[derive(Default)]
    struct Bulk {
        tally: Mutex<Tally>,
        looks: Mutex<Vec<WatchLook>>,
        unavailable: std::sync::atomic::AtomicBool,
        observes: AtomicUsize,
    }

    impl Bulk {
        fn set(&self, release: &str, canary: (f64, f64), stable: (f64, f64)) {
            let mut tally = self.tally.lock().unwrap();
            for (track, (requests, errors)) in [(Track::Canary, canary), (Track::Stable, stable)] {
                tally.insert(
                    (NAMESPACE.into(), track.workload_name(release)),
                    Counts { requests, errors },
                );
            }
        }
    }

    impl MetricsSource for Bulk {
        fn observe<'a>(&'a self, _: &'a AnalysisTarget) -> BoxFuture<'a, Observations> {
            self.observes.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {
                Observations::Unavailable {
                    reason: "unused".into(),
                }
            })
        }

        fn tally<'a>(
            &'a self,
            look: &'a WatchLook,
        ) -> BoxFuture<'a, Option<Result<Tally, String>>> {
            self.looks.lock().unwrap().push(look.clone());
            let answer = if self.unavailable.load(Ordering::SeqCst) {
                Err("connection refused".to_string())
            } else {
                Ok(self.tally.lock().unwrap().clone())
            };
            Box::pin(async move { Some(answer) })
        }
    }

    fn t0() -> Timestamp {
        "2026-11-30T12:00:00Z".parse().unwrap()
    }

    fn at(seconds: i64) -> Timestamp {
        t0() + jiff::SignedDuration::from_secs(seconds)
    }

    /// `name` at 5%, its step begun at t0, watched every 10 s.
    fn canary(name: &str) -> Arc<ChatRelease> {
        let stable = ChatRelease::test("v1");
        let mut release = ChatRelease::test("v2");
        release.metadata.name = Some(name.into());
        release.metadata.uid = Some(format!("uid-{name}"));
        let status = canary_status(&stable, &release, 0, t0());
        Arc::new(release.with_status(status))
    }

    fn watch(bulk: &Arc<Bulk>) -> CanaryWatch {
        CanaryWatch::new(bulk.clone(), "http://prometheus:9090".into())
    }

    fn names(keys: &[ObjectRef<ChatRelease>]) -> Vec<String> {
        keys.iter().map(|k| k.name.clone()).collect()
    }

    #[tokio::test]
    async fn one_look_for_all_canaries_wakes_only_the_one_whose_counts_say_stop() {
        let bulk = Arc::new(Bulk::default());
        let releases: Vec<_> = (0..50).map(|i| canary(&format!("chat-{i}"))).collect();
        for i in 0..50 {
            bulk.set(&format!("chat-{i}"), (100.0, 0.0), (2000.0, 2.0));
        }
        // Half its requests fail while stable's do not.
        bulk.set("chat-7", (100.0, 50.0), (2000.0, 2.0));
        let watch = watch(&bulk);

        let woken = watch.look_once(&releases, at(10)).await;

        assert_eq!(names(&woken), ["chat-7"]);
        let looks = bulk.looks.lock().unwrap();
        assert_eq!(
            looks.len(),
            1,
            "one bulk look (two queries) for fifty canaries"
        );
        assert_eq!(looks[0].namespaces, [NAMESPACE]);
        assert_eq!(looks[0].window, Duration::from_secs(10));
        assert_eq!(
            bulk.observes.load(Ordering::SeqCst),
            0,
            "no look per canary"
        );
    }

    #[tokio::test]
    async fn looks_follow_watch_every_and_count_only_since_the_last_look() {
        let bulk = Arc::new(Bulk::default());
        let releases = vec![canary("chat")];
        let watch = watch(&bulk);
        watch.look_once(&releases, at(10)).await;
        watch.look_once(&releases, at(15)).await;
        assert_eq!(
            bulk.looks.lock().unwrap().len(),
            1,
            "not due again before 10 s"
        );
        watch.look_once(&releases, at(22)).await;
        let looks = bulk.looks.lock().unwrap();
        assert_eq!(looks.len(), 2);
        assert_eq!(looks[1].window, Duration::from_secs(12));
    }

    #[tokio::test]
    async fn counts_add_up_over_looks_until_they_say_stop() {
        let bulk = Arc::new(Bulk::default());
        let releases = vec![canary("chat")];
        // Each look alone: 4 canary errors in 30 requests, under the 5 errors and 50 requests
        // the test needs before it may stop.
        bulk.set("chat", (30.0, 4.0), (400.0, 0.0));
        let watch = watch(&bulk);
        assert!(watch.look_once(&releases, at(10)).await.is_empty());
        let woken = watch.look_once(&releases, at(20)).await;
        assert_eq!(
            names(&woken),
            ["chat"],
            "8 errors in 60 requests against none in 800"
        );
    }

    #[tokio::test]
    async fn a_new_step_starts_the_counts_anew_and_skips_a_look_reaching_back_before_it() {
        let bulk = Arc::new(Bulk::default());
        bulk.set("chat", (30.0, 4.0), (400.0, 0.0));
        let watch = watch(&bulk);
        assert!(watch.look_once(&[canary("chat")], at(10)).await.is_empty());
        // The step to 25% began at 15 s: the look at 20 s covers 10-20 s, half of it the old step.
        let mut next = (*canary("chat")).clone();
        let status = next.status.as_mut().unwrap();
        status.current_step = Some(1);
        status.canary_weight = 25;
        status.step_started_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(15)));
        let next = vec![Arc::new(next)];
        assert!(
            watch.look_once(&next, at(20)).await.is_empty(),
            "old step's errors dropped"
        );
        assert!(
            watch.look_once(&next, at(30)).await.is_empty(),
            "4 errors: too few"
        );
        assert_eq!(names(&watch.look_once(&next, at(40)).await), ["chat"]);
    }

    #[tokio::test]
    async fn trouble_both_versions_share_wakes_nobody() {
        let bulk = Arc::new(Bulk::default());
        bulk.set("chat", (100.0, 50.0), (2000.0, 1000.0));
        let watch = watch(&bulk);
        for look in 1..=10 {
            assert!(
                watch
                    .look_once(&[canary("chat")], at(10 * look))
                    .await
                    .is_empty()
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_wakes_nobody() {
        let bulk = Arc::new(Bulk::default());
        bulk.set("chat", (100.0, 50.0), (2000.0, 2.0));
        bulk.unavailable.store(true, Ordering::SeqCst);
        let watch = watch(&bulk);
        assert!(watch.look_once(&[canary("chat")], at(10)).await.is_empty());
    }

    #[tokio::test]
    async fn a_seed_carries_the_reconciles_exact_counts_on() {
        let bulk = Arc::new(Bulk::default());
        bulk.set("chat", (30.0, 4.0), (400.0, 0.0));
        let watch = watch(&bulk);
        let release = canary("chat");
        let status = release.status.as_ref().unwrap();
        watch.seed(
            ObjectRef::from_obj(release.as_ref()),
            Step {
                started: t0(),
                revision: status.canary_revision.clone().unwrap(),
            },
            Counts {
                requests: 30.0,
                errors: 4.0,
            },
            Counts {
                requests: 400.0,
                errors: 0.0,
            },
        );
        assert_eq!(names(&watch.look_once(&[release], at(10)).await), ["chat"]);
    }

    #[tokio::test]
    async fn a_reconcile_looks_itself_only_at_a_step_the_watch_has_not_counted_or_when_woken() {
        let bulk = Arc::new(Bulk::default());
        bulk.set("chat", (30.0, 0.0), (570.0, 0.0));
        let watch = watch(&bulk);
        let release = canary("chat");
        let key = ObjectRef::from_obj(release.as_ref());
        let step = Step::of(release.status.as_ref().unwrap()).unwrap();
        assert!(watch.wants_a_close_look(&key, &step), "nothing counted yet");
        watch
            .look_once(std::slice::from_ref(&release), at(10))
            .await;
        assert!(
            !watch.wants_a_close_look(&key, &step),
            "the watch counts it"
        );
        let next_step = Step {
            started: at(15),
            ..step.clone()
        };
        assert!(
            watch.wants_a_close_look(&key, &next_step),
            "a step not counted yet"
        );

        bulk.set("chat", (100.0, 50.0), (570.0, 0.0));
        let woken = watch
            .look_once(std::slice::from_ref(&release), at(20))
            .await;
        assert_eq!(names(&woken), ["chat"]);
        assert!(watch.wants_a_close_look(&key, &step), "woken: it must look");
        watch.seed(
            key.clone(),
            step.clone(),
            Counts::default(),
            Counts::default(),
        );
        assert!(!watch.wants_a_close_look(&key, &step), "it looked");
    }

    #[tokio::test]
    async fn groups_split_by_prometheus_and_releases_not_watched_are_left_out() {
        let bulk = Arc::new(Bulk::default());
        let watch = watch(&bulk);
        let mut elsewhere = (*canary("other")).clone();
        elsewhere.spec.analysis.prometheus = Some(
            serde_json::from_value(serde_json::json!({"address": "http://other:9090"})).unwrap(),
        );
        let mut off = (*canary("off")).clone();
        off.spec.analysis.watch_every = Some("0s".into());
        let mut settled = (*canary("settled")).clone();
        settled.status = Some(crate::fixtures::settled_status(&ChatRelease::test("v1")));
        let releases = vec![
            canary("chat"),
            Arc::new(elsewhere),
            Arc::new(off),
            Arc::new(settled),
        ];
        watch.look_once(&releases, at(10)).await;
        let mut addresses: Vec<String> = bulk
            .looks
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.address.clone())
            .collect();
        addresses.sort();
        assert_eq!(addresses, ["http://other:9090", "http://prometheus:9090"]);
    }
}
