//! The rollout state machine: spec settings + status + what the world looks like + the analysis
//! (if one was due) + now → the next action, the new status, and the desired state of the
//! children. Pure: no Kubernetes calls, no HTTP, no clock. The controller applies the plan; the
//! `simulate` command runs the very same function on observations from a file.

use crate::annotations::{Command, Commands};
use crate::crd::{AnalysisRecord, ChatReleaseStatus, PauseReason, Phase, Verdict};
use crate::judge::{self, Judgement};
use crate::metrics::Observations;
use crate::settings::Settings;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::time::Duration;

/// How often a settled ChatRelease is looked at again even when nothing happens.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How long a release waiting for pods goes unlooked-at at most. Every change of its Deployments'
/// status wakes the controller at once (it watches them); this only covers a watch gone quiet (an
/// API server restarting holds watches for minutes), so it need not be short: a 5 s poll made
/// every waiting release cost the API server a read and three applies every 5 s.
pub const PODS_BACKSTOP: Duration = Duration::from_secs(30);

/// The state of one Deployment as far as the decision cares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackState {
    /// The `chatrelease.io/revision` label of its pod template.
    pub revision: Option<String>,
    pub replicas: i32,
    /// Pods of any template (status.replicas): during a rolling update old pods count here.
    pub total_replicas: i32,
    pub ready_replicas: i32,
    pub updated_replicas: i32,
    /// The Deployment controller has seen the latest spec (observedGeneration >= generation).
    pub observed: bool,
}

impl TrackState {
    /// All `replicas` pods run `revision` and are Ready. Old-template pods must be gone too:
    /// while they remain, readyReplicas may count them instead of the new ones.
    pub fn serves(&self, revision: &str, replicas: i32) -> bool {
        self.observed
            && self.revision.as_deref() == Some(revision)
            && self.replicas == replicas
            && self.updated_replicas >= replicas
            && self.total_replicas == self.updated_replicas
            && self.ready_replicas >= replicas
    }
}

/// What the controller saw this reconcile, besides status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct World {
    pub generation: Option<i64>,
    /// Hash of `spec.template`.
    pub desired_revision: String,
    pub desired_image: String,
    pub stable: Option<TrackState>,
    pub canary: Option<TrackState>,
    pub commands: Commands,
}

/// What one Deployment should look like after this reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackPlan {
    /// Apply `spec.template` with this many replicas.
    ApplyTemplate { replicas: i32 },
    /// Keep the template it runs; set its size.
    Scale { replicas: i32 },
    /// Leave it exactly as it is (canary pods draining).
    Keep,
}

/// The desired state of the children after this reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub stable: TrackPlan,
    pub canary: TrackPlan,
    /// Percent of weighted traffic to the canary.
    pub canary_weight: i32,
    /// canaryMatch and the sticky canary cookie route to the canary.
    pub canary_routes: bool,
    /// The sticky stable cookie routes to stable. False while stable is given the promoted
    /// template: it then runs a mix of old and new pods, and a returning user must not land on
    /// either by chance; they follow the split (all on the canary) until stable is whole.
    pub stable_routes: bool,
}

/// What the decision did, in the words of `simulate` where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do this time.
    None,
    /// The stable Deployment is being created or is not Ready yet.
    Initialize,
    StartCanary,
    /// Waiting for canary pods (or for old canary pods to drain before a new canary).
    AwaitCanary,
    Advance {
        from: i32,
        to: i32,
    },
    Hold,
    /// Waiting for a person: a manual gate or the pause annotation.
    Wait,
    Rollback,
    Promote,
    /// Stable runs the promoted revision on all its pods; traffic went back to it.
    FinishPromotion,
    /// Canary pods scaled to 0 after drainTimeout.
    Drained,
}

impl Action {
    /// The action as `simulate` prints it.
    pub fn simulate_name(self) -> &'static str {
        match self {
            Action::Advance { .. } => "advance",
            Action::Hold => "hold",
            Action::Wait => "wait",
            Action::Rollback => "rollback",
            Action::Promote => "promote",
            _ => "none",
        }
    }
}

/// An Event to record on the ChatRelease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// Everything the controller does after one decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub status: ChatReleaseStatus,
    pub plan: Plan,
    pub notices: Vec<Notice>,
    /// One-shot annotations to remove, because they were acted on (or cannot be).
    pub consumed: Vec<Command>,
    pub requeue_after: Duration,
}

/// Whether an analysis is due now, so the controller knows to query metrics before deciding.
pub fn analysis_due(
    settings: &Settings,
    status: &ChatReleaseStatus,
    commands: &Commands,
    now: Timestamp,
) -> bool {
    let in_flight = matches!(status.phase, Phase::Progressing | Phase::Paused);
    in_flight
        && status.current_step.is_some()
        // Its weight is withdrawn: the window holds no traffic to judge.
        && status.canary_unready_since.is_none()
        && !commands.pause
        && !commands.rollback
        && next_analysis_at(settings, status).is_some_and(|due| now >= due)
}

/// The window of an analysis now: the spec's, but never reaching back before the canary
/// revision's pods were started. Every revision's pods are the same workload (`<name>-canary`),
/// so with `window` longer than `interval` the first analyses of a new revision would count the
/// requests of the one before it.
pub fn analysis_window(
    settings: &Settings,
    status: &ChatReleaseStatus,
    now: Timestamp,
) -> Duration {
    let Some(started) = status.canary_started_at.as_ref() else {
        return settings.window;
    };
    let since_start = Duration::try_from(now.duration_since(started.0)).unwrap_or(Duration::ZERO);
    settings.window.min(since_start.max(Duration::from_secs(1)))
}

/// Whether the sequential test should look now, between the interval's analyses: a step with
/// weight and Ready pods, nothing asked by annotation, and no scheduled analysis due (that one
/// judges everything, the sequential test included). How often is the controller's to pace
/// (`analysis.watchEvery`); a restarted operator simply looks again.
pub fn watch_due(
    settings: &Settings,
    status: &ChatReleaseStatus,
    world: &World,
    now: Timestamp,
) -> bool {
    settings.watch_every.is_some()
        && canary_watchable(status)
        && status.canary_revision.as_deref() == Some(world.desired_revision.as_str())
        && world.commands == Commands::default()
        && !analysis_due(settings, status, &world.commands, now)
}

/// What status alone says of [`watch_due`]: a Ready canary has weight in a step that is not
/// paused by hand. The bulk watch (`canary_watch`) reads only this; the reconcile it wakes
/// checks the rest.
pub fn canary_watchable(status: &ChatReleaseStatus) -> bool {
    matches!(status.phase, Phase::Progressing | Phase::Paused)
        && status.pause_reason != Some(PauseReason::Annotation)
        && status.current_step.is_some()
        && status.canary_weight > 0
        && status.canary_unready_since.is_none()
        && status.step_started_at.is_some()
        && status.canary_revision.is_some()
}

/// The sequential test's window: every request since the step began (never before the canary
/// revision started), so each look weighs all the step's evidence at once.
pub fn watch_window(status: &ChatReleaseStatus, now: Timestamp) -> Duration {
    let since = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.map(|t| Duration::try_from(now.duration_since(t.0)).unwrap_or(Duration::ZERO))
    };
    let step = since(status.step_started_at.as_ref()).unwrap_or(Duration::ZERO);
    let canary = since(status.canary_started_at.as_ref()).unwrap_or(step);
    step.min(canary).max(Duration::from_secs(1))
}

/// A rollback, when the counts since the step began are overwhelming evidence that the canary's
/// error rate is above stable's ([`crate::sequential`]); otherwise nothing: the interval's
/// analysis decides everything else, advancing included (a step is earned with time).
pub fn decide_watch(
    settings: &Settings,
    status: &ChatReleaseStatus,
    world: &World,
    observations: &Observations,
    now: Timestamp,
) -> Option<Decision> {
    if !watch_due(settings, status, world, now) {
        return None;
    }
    let Observations::Sampled { canary, stable } = observations else {
        return None;
    };
    let evidence = crate::sequential::error_evidence(canary.into(), stable.into(), &settings.judge);
    if !evidence.stop {
        return None;
    }
    let mut d = Draft::new(settings, status, world, now);
    d.plan.canary = TrackPlan::Keep;
    d.rollback(format!(
        "stopped early at {}%: {}",
        status.canary_weight,
        evidence.describe()
    ));
    Some(d.finish())
}

/// An interval after the later of the step's start and the last analysis.
fn next_analysis_at(settings: &Settings, status: &ChatReleaseStatus) -> Option<Timestamp> {
    let step = status.step_started_at.as_ref().map(|t| t.0);
    let last = status.last_analysis.as_ref().map(|a| a.time.0);
    let base = step.into_iter().chain(last).max()?;
    Some(later(base, settings.interval))
}

/// The next action. `observations` is `Some` when an analysis was due and metrics were asked.
pub fn decide(
    settings: &Settings,
    status: &ChatReleaseStatus,
    world: &World,
    observations: Option<&Observations>,
    now: Timestamp,
) -> Decision {
    let mut d = Draft::new(settings, status, world, now);
    match resumable_phase(status) {
        Phase::Initializing => d.initializing(),
        Phase::Progressing | Phase::Paused => d.in_flight(observations),
        Phase::Promoting => d.promoting(),
        _ => d.settled(),
    }
    d.finish()
}

/// The status for a spec the operator cannot use: traffic stays where it is, nothing is applied.
pub fn spec_rejected(
    status: &ChatReleaseStatus,
    generation: Option<i64>,
    problem: &str,
    now: Timestamp,
) -> ChatReleaseStatus {
    failed(
        status,
        generation,
        format!(
            "the spec cannot be applied: {problem}; traffic stays where it is until it is fixed"
        ),
        now,
    )
}

fn failed(
    status: &ChatReleaseStatus,
    generation: Option<i64>,
    message: String,
    now: Timestamp,
) -> ChatReleaseStatus {
    let mut next = status.clone();
    next.phase = Phase::Failed;
    next.observed_generation = generation;
    next.message = message;
    next.conditions = conditions(&next, status, now);
    next
}

/// A decision for a spec the operator cannot use: hold everything, report `Failed`.
pub fn hold_rejected(
    status: &ChatReleaseStatus,
    generation: Option<i64>,
    problem: &str,
    now: Timestamp,
) -> Decision {
    let next = spec_rejected(status, generation, problem, now);
    hold_failed(status, next, "SpecRejected")
}

/// A decision after the operator itself failed while reconciling (a panic: a bug, not the
/// spec's fault): hold everything, report `Failed` with the error, try again on the next one.
pub fn hold_after_internal_error(
    status: &ChatReleaseStatus,
    generation: Option<i64>,
    error: &str,
    now: Timestamp,
) -> Decision {
    let message = format!(
        "the operator failed while reconciling: {error} (a bug in the operator: please report it with this message); traffic stays where it is, and the next reconcile tries again"
    );
    let next = failed(status, generation, message, now);
    hold_failed(status, next, "ReconcileFailed")
}

fn hold_failed(
    status: &ChatReleaseStatus,
    next: ChatReleaseStatus,
    reason: &'static str,
) -> Decision {
    // One Event per distinct problem, not one per resync.
    let newly_failed = status.phase != Phase::Failed || status.message != next.message;
    let notices = if newly_failed {
        vec![Notice {
            warning: true,
            reason,
            note: next.message.clone(),
        }]
    } else {
        Vec::new()
    };
    Decision {
        action: Action::None,
        status: next,
        plan: Plan {
            stable: TrackPlan::Keep,
            canary: TrackPlan::Keep,
            canary_weight: status.canary_weight,
            // As they were: a canary in a step, or Ready at a gate before its first step.
            canary_routes: status.current_step.is_some()
                || status.pause_reason == Some(PauseReason::ManualGate),
            stable_routes: status.phase != Phase::Promoting,
        },
        notices,
        consumed: Vec::new(),
        requeue_after: RESYNC,
    }
}

/// `Failed` is left as soon as the spec can be applied again; carry on from what status says.
/// Whether a canary is under way (serving, at a gate, or being promoted), a `Failed` one
/// included: what must not change under it, such as the router.
pub fn canary_in_flight(status: &ChatReleaseStatus) -> bool {
    matches!(
        resumable_phase(status),
        Phase::Progressing | Phase::Paused | Phase::Promoting
    )
}

fn resumable_phase(status: &ChatReleaseStatus) -> Phase {
    if status.phase != Phase::Failed {
        return status.phase;
    }
    if status.current_step.is_some() || status.canary_weight > 0 {
        Phase::Progressing
    } else if status.stable_revision.is_some() {
        Phase::Stable
    } else {
        Phase::Initializing
    }
}

struct Draft<'a> {
    settings: &'a Settings,
    before: &'a ChatReleaseStatus,
    world: &'a World,
    now: Timestamp,
    next: ChatReleaseStatus,
    action: Action,
    plan: Plan,
    notices: Vec<Notice>,
    consumed: Vec<Command>,
    /// Commands removed unused, with an Event saying so.
    ignored: Vec<Command>,
    requeue_after: Duration,
}

impl<'a> Draft<'a> {
    fn new(
        settings: &'a Settings,
        before: &'a ChatReleaseStatus,
        world: &'a World,
        now: Timestamp,
    ) -> Self {
        let mut next = before.clone();
        next.phase = resumable_phase(before);
        next.observed_generation = world.generation;
        Self {
            settings,
            before,
            world,
            now,
            plan: Plan {
                stable: TrackPlan::Scale {
                    replicas: settings.replicas,
                },
                canary: TrackPlan::Keep,
                canary_weight: before.canary_weight,
                canary_routes: false,
                stable_routes: true,
            },
            next,
            action: Action::None,
            notices: Vec::new(),
            consumed: Vec::new(),
            ignored: Vec::new(),
            requeue_after: RESYNC,
        }
    }

    fn notice(&mut self, reason: &'static str, note: impl Into<String>) {
        self.notices.push(Notice {
            warning: false,
            reason,
            note: note.into(),
        });
    }

    fn warn(&mut self, reason: &'static str, note: impl Into<String>) {
        self.notices.push(Notice {
            warning: true,
            reason,
            note: note.into(),
        });
    }

    fn consume(&mut self, command: Command) {
        if !self.consumed.contains(&command) {
            self.consumed.push(command);
        }
    }

    /// The promote annotation is set and was not ignored earlier in this decision.
    fn promote_requested(&self) -> bool {
        self.world.commands.promote && !self.ignored.contains(&Command::Promote)
    }

    /// A one-shot command that does not apply now is removed with an Event saying why. Ignored
    /// means ignored: it cannot pass a gate later in the same decision.
    fn ignore(&mut self, command: Command, why: &str) {
        if self.world.commands.has(command)
            && command.is_one_shot()
            && !self.consumed.contains(&command)
        {
            self.ignored.push(command);
            self.consume(command);
            self.notice(
                "AnnotationIgnored",
                format!("{} ignored: {why}", command.annotation()),
            );
        }
    }

    fn revision_short(revision: Option<&str>) -> &str {
        revision.unwrap_or("unknown")
    }

    fn drain_until(&self) -> Option<Timestamp> {
        self.next
            .draining_since
            .as_ref()
            .map(|t| later(t.0, self.settings.drain_timeout))
    }

    fn still_draining(&self) -> bool {
        self.drain_until().is_some_and(|until| self.now < until)
    }

    fn canary_ready(&self) -> bool {
        let Some(revision) = self.next.canary_revision.as_deref() else {
            return false;
        };
        self.world
            .canary
            .as_ref()
            .is_some_and(|c| c.serves(revision, self.settings.replicas))
    }

    /// How far the canary's pods are, for messages. readyReplicas alone misleads while the
    /// Deployment still rolls from an older template: "2/2 Ready" (or "3/2") counted old pods.
    fn canary_ready_text(&self) -> String {
        let wanted = self.settings.replicas;
        let Some(canary) = self.world.canary.as_ref() else {
            return format!("0/{wanted} Ready");
        };
        let rolled_out = canary.observed && canary.revision == self.next.canary_revision;
        let old = (canary.total_replicas - canary.updated_replicas).max(0);
        if !rolled_out {
            format!("0/{wanted} Ready (the Deployment has not taken the new template yet)")
        } else if old > 0 {
            format!(
                "{}/{wanted} pods of the new template, {old} old ones left",
                canary.updated_replicas
            )
        } else {
            format!("{}/{wanted} Ready", canary.ready_replicas.min(wanted))
        }
    }

    // ----- phases -----

    fn initializing(&mut self) {
        self.ignore(Command::Rollback, "no canary is running");
        self.ignore(Command::Promote, "no canary is waiting at a manual gate");
        self.ignore(Command::Retry, "no revision was rolled back");
        let revision = self.world.desired_revision.clone();
        self.next.stable_revision = Some(revision.clone());
        self.next.stable_image = Some(self.world.desired_image.clone());
        self.next.canary_weight = 0;
        self.plan.stable = TrackPlan::ApplyTemplate {
            replicas: self.settings.replicas,
        };
        self.plan.canary = TrackPlan::ApplyTemplate { replicas: 0 };
        self.plan.canary_weight = 0;
        let stable_ready = self
            .world
            .stable
            .as_ref()
            .is_some_and(|s| s.serves(&revision, self.settings.replicas));
        if stable_ready {
            self.next.phase = Phase::Stable;
            self.next.message = format!(
                "stable revision {revision} ({}) runs on {} Ready pods and has all traffic",
                self.world.desired_image, self.settings.replicas
            );
            self.notice("StableReady", self.next.message.clone());
            self.action = Action::None;
        } else {
            let ready = self.world.stable.as_ref().map_or(0, |s| s.ready_replicas);
            self.next.phase = Phase::Initializing;
            self.next.message = format!(
                "waiting for stable pods of revision {revision}: {ready}/{} Ready",
                self.settings.replicas
            );
            self.action = Action::Initialize;
            self.requeue_after = PODS_BACKSTOP;
        }
    }

    /// Stable, Succeeded or RolledBack: no canary takes traffic. Starts one when the template
    /// differs from stable, once earlier canary pods have drained.
    fn settled(&mut self) {
        self.ignore(Command::Rollback, "no canary is running");
        self.ignore(Command::Promote, "no canary is waiting at a manual gate");
        let desired = self.world.desired_revision.clone();
        let is_stable_template = self.next.stable_revision.as_deref() == Some(desired.as_str());
        self.plan.stable = if is_stable_template {
            TrackPlan::ApplyTemplate {
                replicas: self.settings.replicas,
            }
        } else {
            TrackPlan::Scale {
                replicas: self.settings.replicas,
            }
        };
        self.plan.canary_weight = 0;
        self.next.canary_weight = 0;
        self.drain_canary();

        if is_stable_template {
            self.ignore(Command::Retry, "the template is the stable revision");
            return;
        }
        let rolled_back = self.next.phase == Phase::RolledBack
            && self.next.canary_revision.as_deref() == Some(desired.as_str());
        if rolled_back {
            if self.world.commands.retry {
                self.consume(Command::Retry);
                self.notice("Retry", format!("retrying rolled-back revision {desired}"));
                self.start_canary_or_wait_for_drain();
                self.pend_canary_until_drained();
            }
            return;
        }
        self.ignore(Command::Retry, "no revision was rolled back");
        if self.world.commands.pause {
            self.next.message = format!("revision {desired} waits: the pause annotation is set");
            self.action = Action::Wait;
            return;
        }
        self.start_canary_or_wait_for_drain();
    }

    /// Canary pods keep running for drainTimeout after traffic leaves them, then scale to 0.
    fn drain_canary(&mut self) {
        if self.still_draining() {
            self.plan.canary = TrackPlan::Keep;
            self.requeue_after = self.requeue_after.min(until(self.now, self.drain_until()));
        } else {
            self.plan.canary = TrackPlan::Scale { replicas: 0 };
            if self.next.draining_since.take().is_some() {
                self.action = Action::Drained;
                self.notice(
                    "CanaryDrained",
                    format!(
                        "canary pods scaled to 0 after drainTimeout {}",
                        humantime::format_duration(self.settings.drain_timeout)
                    ),
                );
            }
        }
    }

    fn start_canary_or_wait_for_drain(&mut self) {
        let desired = self.world.desired_revision.clone();
        if self.still_draining() {
            let until = self
                .drain_until()
                .map(|t| t.to_string())
                .unwrap_or_default();
            self.next.message = format!(
                "revision {desired} starts once the previous canary's pods have drained ({until})"
            );
            self.action = Action::AwaitCanary;
            return;
        }
        let n = &mut self.next;
        n.phase = Phase::Progressing;
        n.canary_revision = Some(desired.clone());
        n.canary_image = Some(self.world.desired_image.clone());
        n.current_step = None;
        n.canary_weight = 0;
        n.failed_checks = 0;
        n.last_analysis = None;
        n.inconclusive_since = None;
        n.pause_reason = None;
        n.step_started_at = None;
        n.draining_since = None;
        n.canary_unready_since = None;
        n.canary_started_at = Some(Time(self.now));
        n.message = format!(
            "started canary revision {desired} ({}); waiting for its {} pods to be Ready",
            self.world.desired_image, self.settings.replicas
        );
        self.plan.canary = TrackPlan::ApplyTemplate {
            replicas: self.settings.replicas,
        };
        self.action = Action::StartCanary;
        self.requeue_after = PODS_BACKSTOP;
        self.notice("CanaryStarted", self.next.message.clone());
    }

    /// Progressing or Paused: a canary exists and may take traffic.
    fn in_flight(&mut self, observations: Option<&Observations>) {
        self.ignore(Command::Retry, "a canary is already running");
        let desired = self.world.desired_revision.clone();
        if self.next.canary_revision.as_deref() != Some(desired.as_str()) {
            return self.template_changed_mid_flight();
        }
        self.plan.canary = if self.still_draining() {
            // A superseded canary's pods serve their last streams until the drain ends, whatever
            // else this decision does (pause included).
            TrackPlan::Keep
        } else {
            TrackPlan::ApplyTemplate {
                replicas: self.settings.replicas,
            }
        };
        self.plan.canary_weight = self.next.canary_weight;
        self.plan.canary_routes = self.next.current_step.is_some();

        if self.world.commands.rollback {
            self.consume(Command::Rollback);
            self.notice("RollbackRequested", "rollback requested by annotation");
            return self.rollback("rolled back by the chatrelease.io/rollback annotation".into());
        }
        if let Some(step) = self.next.current_step {
            if !self.canary_ready() {
                return self.canary_lost_readiness(step);
            }
            if self.next.canary_unready_since.is_some() {
                self.canary_ready_again(step);
            }
        }
        if self.world.commands.pause {
            return self.pause_by_annotation();
        }
        if self.next.pause_reason == Some(PauseReason::Annotation) {
            self.next.pause_reason = None;
            self.next.phase = Phase::Progressing;
            self.next.message = format!("resumed at weight {}%", self.next.canary_weight);
            self.notice(
                "Resumed",
                "the pause annotation was removed; the rollout goes on",
            );
        }

        let Some(step) = self.next.current_step else {
            return self.await_canary_pods();
        };
        let waiting_for_person = matches!(
            self.next.pause_reason,
            Some(PauseReason::ManualGate | PauseReason::Inconclusive)
        );
        if waiting_for_person && self.promote_requested() {
            self.consume(Command::Promote);
            let from = self.settings.weight_at(Some(step));
            let reason = format!("promoted by annotation past the wait at {from}%");
            return self.advance_or_promote(step, reason);
        }
        if !waiting_for_person {
            self.ignore(
                Command::Promote,
                "no manual gate is waiting; the canary moves on by analysis",
            );
        }
        match observations {
            Some(observations) => self.analyse(step, observations),
            None => {
                self.requeue_after = until(self.now, next_analysis_at(self.settings, &self.next))
            }
        }
    }

    /// The canary held a step and its pods are no longer all Ready: Istio would answer its share
    /// of users 503. Its weight and routes leave at once; it rolls back if the pods are not Ready
    /// again within progressDeadline (unless a person paused the rollout: then it only waits).
    fn canary_lost_readiness(&mut self, step: i32) {
        let newly = self.next.canary_unready_since.is_none();
        let since = self
            .next
            .canary_unready_since
            .as_ref()
            .map_or(self.now, |t| t.0);
        self.next.canary_unready_since = Some(Time(since));
        let deadline = later(since, self.settings.progress_deadline);
        if self.now >= deadline && !self.world.commands.pause {
            let reason = format!(
                "canary pods not Ready again within progressDeadline {} ({})",
                humantime::format_duration(self.settings.progress_deadline),
                self.canary_ready_text()
            );
            return self.rollback(reason);
        }
        let weight = self.settings.weight_at(Some(step));
        self.next.canary_weight = 0;
        self.plan.canary_weight = 0;
        self.plan.canary_routes = false;
        self.next.message = format!(
            "canary weight {weight}% withdrawn: canary pods are {}; it returns when they are all Ready, or rolls back at {deadline}",
            self.canary_ready_text()
        );
        if newly {
            self.warn("CanaryNotReady", self.next.message.clone());
        }
        self.action = Action::Hold;
        self.requeue_after = PODS_BACKSTOP.min(until(self.now, Some(deadline)));
    }

    /// The canary's pods are all Ready again: its step's weight returns, and the step starts over
    /// so the next analysis judges a full interval with traffic.
    fn canary_ready_again(&mut self, step: i32) {
        let weight = self.settings.weight_at(Some(step));
        self.next.canary_unready_since = None;
        self.next.canary_weight = weight;
        self.next.step_started_at = Some(Time(self.now));
        self.plan.canary_weight = weight;
        self.plan.canary_routes = true;
        self.next.message = format!(
            "canary weight 0% → {weight}%: canary pods are all Ready again; the step starts over"
        );
        self.notice("CanaryReady", self.next.message.clone());
        self.action = Action::Advance {
            from: 0,
            to: weight,
        };
        self.requeue_after = self.settings.interval;
    }

    fn template_changed_mid_flight(&mut self) {
        let desired = self.world.desired_revision.clone();
        let old = Self::revision_short(self.next.canary_revision.as_deref()).to_string();
        // Testers reach a canary waiting at a first-step gate: they are traffic too.
        let testers_on_it = self.next.pause_reason == Some(PauseReason::ManualGate);
        let had_traffic =
            self.next.current_step.is_some() || self.before.canary_weight > 0 || testers_on_it;
        if self.next.stable_revision.as_deref() == Some(desired.as_str()) {
            self.withdraw_traffic();
            self.next.phase = Phase::Stable;
            self.next.message = format!(
                "the template is back at stable revision {desired}; canary {old} withdrawn and its pods drain"
            );
            self.action = Action::Rollback;
            self.notice("CanaryWithdrawn", self.next.message.clone());
            return;
        }
        if had_traffic {
            self.withdraw_traffic();
        }
        self.notice(
            "CanarySuperseded",
            format!("canary {old} superseded by revision {desired}; traffic back on stable"),
        );
        self.start_canary_or_wait_for_drain();
        self.pend_canary_until_drained();
    }

    /// A canary that must wait for the previous one's pods to drain is recorded in status as a
    /// rollout in progress, so it starts after the drain whatever asked for it: a one-shot retry
    /// annotation is gone by then.
    fn pend_canary_until_drained(&mut self) {
        if self.action != Action::AwaitCanary {
            return;
        }
        self.next.phase = Phase::Progressing;
        self.next.canary_revision = Some(self.world.desired_revision.clone());
        self.next.canary_image = Some(self.world.desired_image.clone());
        self.next.current_step = None;
        self.next.canary_started_at = None;
        self.next.pause_reason = None;
        self.plan.canary = TrackPlan::Keep;
    }

    /// Traffic leaves the canary in this one write; its pods start draining.
    fn withdraw_traffic(&mut self) {
        self.next.canary_weight = 0;
        self.next.canary_unready_since = None;
        self.next.current_step = None;
        self.next.pause_reason = None;
        self.next.inconclusive_since = None;
        self.next.draining_since = Some(Time(self.now));
        self.plan.canary_weight = 0;
        self.plan.canary_routes = false;
        self.plan.canary = TrackPlan::Keep;
        self.requeue_after = self.requeue_after.min(self.settings.drain_timeout);
    }

    fn pause_by_annotation(&mut self) {
        if self.next.pause_reason != Some(PauseReason::Annotation) {
            self.notice(
                "Paused",
                format!(
                    "paused by annotation at weight {}%",
                    self.next.canary_weight
                ),
            );
        }
        self.next.phase = Phase::Paused;
        self.next.pause_reason = Some(PauseReason::Annotation);
        self.next.message = format!(
            "paused by annotation at weight {}%; remove chatrelease.io/pause (kubectl chatrelease resume) to go on",
            self.next.canary_weight
        );
        self.action = Action::Wait;
        if self.next.current_step.is_none() {
            // Pods may become Ready meanwhile, but no traffic moves while paused.
            self.plan.canary_routes = false;
        }
    }

    fn await_canary_pods(&mut self) {
        if self.next.draining_since.is_some() {
            if self.still_draining() {
                self.plan.canary = TrackPlan::Keep;
                self.action = Action::AwaitCanary;
                self.requeue_after = until(self.now, self.drain_until());
                return;
            }
            // The superseded canary has drained: now its successor's template goes on.
            self.next.draining_since = None;
            self.next.canary_started_at = Some(Time(self.now));
            self.action = Action::StartCanary;
            self.requeue_after = PODS_BACKSTOP;
            self.next.message = format!(
                "started canary revision {}; waiting for its {} pods to be Ready",
                Self::revision_short(self.next.canary_revision.as_deref()),
                self.settings.replicas
            );
            return;
        }
        if self.canary_ready() {
            // Testers reach a Ready canary at once, also while it waits at a gate before its
            // first weight: previewing it before any user gets it is what such a gate is for.
            self.plan.canary_routes = true;
            let first = self.settings.steps[0];
            if self.settings.is_gated(first) && !self.promote_requested() {
                return self
                    .wait_at_gate(first, format!("canary pods {}", self.canary_ready_text()));
            }
            if self.promote_requested() {
                self.consume(Command::Promote);
            }
            self.plan.canary_routes = true;
            let reason = format!("canary pods {}", self.canary_ready_text());
            self.enter_step(0, reason);
            return;
        }
        let started = self
            .next
            .canary_started_at
            .as_ref()
            .map_or(self.now, |t| t.0);
        if self.now >= later(started, self.settings.progress_deadline) {
            let reason = format!(
                "canary pods not Ready within progressDeadline {} ({})",
                humantime::format_duration(self.settings.progress_deadline),
                self.canary_ready_text()
            );
            return self.rollback(reason);
        }
        self.plan.canary_routes = false;
        self.next.message = format!(
            "waiting for canary revision {} to be Ready: {}",
            Self::revision_short(self.next.canary_revision.as_deref()),
            self.canary_ready_text()
        );
        self.action = Action::AwaitCanary;
        self.requeue_after = PODS_BACKSTOP;
    }

    fn analyse(&mut self, step: i32, observations: &Observations) {
        let weight = self.settings.weight_at(Some(step));
        let judgement = judge::judge(&self.settings.judge, weight, observations);
        self.record(&judgement);
        match judgement.verdict {
            Verdict::Fail => {
                self.next.failed_checks += 1;
                let limit = self.settings.judge.failure_limit;
                let failed = self.next.failed_checks;
                if failed >= limit {
                    let reason = format!(
                        "analysis failed {failed} of {limit} allowed times: {}",
                        judgement.reason
                    );
                    return self.rollback(reason);
                }
                if self.undecided_too_long() {
                    return self.rollback(self.undecided_rollback_reason(&judgement));
                }
                self.next.message = format!(
                    "holding at {weight}%: analysis failed ({failed} of {limit} allowed): {}",
                    judgement.reason
                );
                self.warn("AnalysisFailed", self.next.message.clone());
                self.action = Action::Hold;
            }
            Verdict::Inconclusive => {
                // Evidence that the canary is no worse than stable (trouble both share) breaks a
                // run of failures, so chance fails hours apart in a long shared outage do not add
                // up to a rollback. A window with no evidence (too few requests, no metrics)
                // neither counts nor breaks: fail, too few, fail is two failures in a row.
                if judgement.shared_trouble {
                    self.next.failed_checks = 0;
                }
                if self.undecided_too_long() {
                    if self.next.failed_checks > 0 {
                        // The last evidence says worse, and nothing since says otherwise.
                        return self.rollback(self.undecided_rollback_reason(&judgement));
                    }
                    if self.next.pause_reason.is_none() {
                        self.next.phase = Phase::Paused;
                        self.next.pause_reason = Some(PauseReason::Inconclusive);
                        self.next.message = format!(
                            "paused at {weight}%: no analysis passed for longer than progressDeadline {} ({}); promote or roll back by hand",
                            humantime::format_duration(self.settings.progress_deadline),
                            judgement.reason
                        );
                        self.warn("AnalysisInconclusive", self.next.message.clone());
                    }
                } else {
                    self.next.message = format!("holding at {weight}%: {}", judgement.reason);
                }
                self.action = Action::Hold;
            }
            Verdict::Pass => {
                self.next.failed_checks = 0;
                self.next.inconclusive_since = None;
                if self.next.pause_reason == Some(PauseReason::Inconclusive) {
                    self.next.pause_reason = None;
                    self.next.phase = Phase::Progressing;
                }
                if !self.canary_ready() {
                    self.next.message = format!(
                        "holding at {weight}%: analysis passed but canary pods are {}",
                        self.canary_ready_text()
                    );
                    self.action = Action::Hold;
                } else {
                    self.advance_or_promote(step, judgement.reason);
                }
            }
        }
        self.requeue_after = until(self.now, next_analysis_at(self.settings, &self.next));
    }

    /// No analysis has passed at this step for progressDeadline: the canary must not hold users
    /// undecided any longer. Starts the clock at the first analysis that did not pass.
    fn undecided_too_long(&mut self) -> bool {
        let since = self
            .next
            .inconclusive_since
            .as_ref()
            .map_or(self.now, |t| t.0);
        self.next.inconclusive_since = Some(Time(since));
        self.now >= later(since, self.settings.progress_deadline)
    }

    fn undecided_rollback_reason(&self, judgement: &Judgement) -> String {
        format!(
            "no analysis passed for longer than progressDeadline {} and the last with evidence failed ({} of {} allowed in a row): {}",
            humantime::format_duration(self.settings.progress_deadline),
            self.next.failed_checks,
            self.settings.judge.failure_limit,
            judgement.reason
        )
    }

    fn record(&mut self, judgement: &Judgement) {
        self.next.last_analysis = Some(AnalysisRecord {
            time: Time(self.now),
            verdict: judgement.verdict,
            weight: self.next.canary_weight,
            canary_requests: judgement.canary_requests.map(f64::round),
            stable_requests: judgement.stable_requests.map(f64::round),
            checks: judgement.checks.clone(),
            reason: judgement.reason.clone(),
        });
    }

    /// After a passed analysis (or a person's promote): the next step, a gate, or promotion.
    fn advance_or_promote(&mut self, step: i32, reason: String) {
        if step >= self.settings.last_step() {
            return self.promote(reason);
        }
        let next_weight = self.settings.weight_at(Some(step + 1));
        let passing_gate =
            self.consumed.contains(&Command::Promote) && !self.ignored.contains(&Command::Promote);
        if self.settings.is_gated(next_weight) && !passing_gate {
            if self.promote_requested() {
                self.consume(Command::Promote);
            } else {
                return self.wait_at_gate(next_weight, reason);
            }
        }
        self.enter_step(step + 1, reason);
    }

    fn enter_step(&mut self, index: i32, reason: String) {
        let from = self.next.canary_weight;
        let to = self.settings.weight_at(Some(index));
        let n = &mut self.next;
        n.current_step = Some(index);
        n.canary_weight = to;
        n.step_started_at = Some(Time(self.now));
        n.phase = Phase::Progressing;
        n.pause_reason = None;
        n.inconclusive_since = None;
        n.message = format!("canary weight {from}% → {to}%: {reason}");
        self.plan.canary_weight = to;
        self.plan.canary_routes = true;
        self.action = Action::Advance { from, to };
        self.requeue_after = self.settings.interval;
        self.notice("Advanced", self.next.message.clone());
    }

    fn wait_at_gate(&mut self, gate: i32, reason: String) {
        if self.next.pause_reason != Some(PauseReason::ManualGate) {
            self.notice(
                "WaitingAtGate",
                format!("waiting at the manual gate before {gate}%: kubectl chatrelease promote"),
            );
        }
        self.next.phase = Phase::Paused;
        self.next.pause_reason = Some(PauseReason::ManualGate);
        self.next.message = format!(
            "{reason}; waiting at the manual gate before {gate}% for chatrelease.io/promote (kubectl chatrelease promote)"
        );
        self.action = Action::Wait;
    }

    fn promote(&mut self, reason: String) {
        let revision = Self::revision_short(self.next.canary_revision.as_deref()).to_string();
        self.next.phase = Phase::Promoting;
        self.next.pause_reason = None;
        self.next.message = format!(
            "{reason}; promoting revision {revision}: stable gets its template and traffic returns to stable once all {} stable pods are Ready",
            self.settings.replicas
        );
        self.plan.stable = TrackPlan::ApplyTemplate {
            replicas: self.settings.replicas,
        };
        self.plan.canary_weight = self.next.canary_weight;
        self.plan.canary_routes = true;
        self.plan.stable_routes = false;
        self.action = Action::Promote;
        self.requeue_after = PODS_BACKSTOP;
        self.notice("Promoting", self.next.message.clone());
    }

    fn rollback(&mut self, reason: String) {
        let stable = Self::revision_short(self.next.stable_revision.as_deref()).to_string();
        self.withdraw_traffic();
        self.next.phase = Phase::RolledBack;
        let until = self
            .drain_until()
            .map(|t| t.to_string())
            .unwrap_or_default();
        self.next.message = format!(
            "{reason}; all traffic on stable revision {stable}, canary pods drain until {until}"
        );
        self.action = Action::Rollback;
        self.warn("RolledBack", self.next.message.clone());
    }

    /// Stable is getting the canary's template; traffic stays on the canary until stable is whole.
    fn promoting(&mut self) {
        self.ignore(Command::Promote, "promotion is already under way");
        self.ignore(Command::Retry, "promotion is under way");
        if self.world.commands.rollback {
            self.consume(Command::Rollback);
            self.warn(
                "RollbackRefused",
                "promotion is under way and stable already runs the new template; apply the previous template to go back",
            );
        }
        let revision = self.next.canary_revision.clone().unwrap_or_default();
        let template_is_canary = self.world.desired_revision == revision;
        self.plan.stable = if template_is_canary {
            TrackPlan::ApplyTemplate {
                replicas: self.settings.replicas,
            }
        } else {
            TrackPlan::Scale {
                replicas: self.settings.replicas,
            }
        };
        // The canary serves every user now: a Deployment deleted or scaled by hand is put back
        // (when the spec still holds its template; otherwise there is nothing to put back).
        self.plan.canary = if template_is_canary {
            TrackPlan::ApplyTemplate {
                replicas: self.settings.replicas,
            }
        } else {
            TrackPlan::Keep
        };
        let stable = self.world.stable.clone().unwrap_or_default();
        let full_weight = self.settings.weight_at(self.next.current_step);
        // Until it is back, users go to stable's Ready pods, old or new, rather than get 503s.
        let canary_down = !self.canary_ready() && stable.ready_replicas >= self.settings.replicas;
        self.next.canary_weight = if canary_down { 0 } else { full_weight };
        self.plan.canary_weight = self.next.canary_weight;
        self.plan.canary_routes = !canary_down;
        self.plan.stable_routes = false;
        if stable.serves(&revision, self.settings.replicas) {
            self.plan.stable_routes = true;
            let image = self.next.canary_image.clone().unwrap_or_default();
            self.withdraw_traffic();
            let n = &mut self.next;
            n.phase = Phase::Succeeded;
            n.stable_revision = Some(revision.clone());
            n.stable_image = Some(image.clone());
            let until = self
                .drain_until()
                .map(|t| t.to_string())
                .unwrap_or_default();
            self.next.message = format!(
                "revision {revision} ({image}) promoted: stable runs it on {} Ready pods with all traffic; canary pods drain until {until}",
                self.settings.replicas
            );
            self.action = Action::FinishPromotion;
            self.notice("Succeeded", self.next.message.clone());
        } else {
            // readyReplicas counts old pods too while stable rolls; report new and old apart.
            let (new_pods, old_pods) = if stable.revision.as_deref() == Some(revision.as_str()) {
                (
                    stable.updated_replicas,
                    (stable.total_replicas - stable.updated_replicas).max(0),
                )
            } else {
                (0, stable.total_replicas)
            };
            self.next.message = if canary_down {
                format!(
                    "promoting revision {revision}: canary pods are {}, so traffic is on stable's Ready pods ({new_pods} of the new revision, {old_pods} old) until they are back",
                    self.canary_ready_text()
                )
            } else {
                format!(
                    "promoting revision {revision}: stable has {new_pods}/{} pods of it and {old_pods} old ones left; traffic stays on the canary until all {} are Ready",
                    self.settings.replicas, self.settings.replicas
                )
            };
            self.requeue_after = PODS_BACKSTOP;
        }
    }

    fn finish(mut self) -> Decision {
        if self.action == Action::None
            && self.next.phase == self.before.phase
            && self.next.message.is_empty()
        {
            self.next.message = self.before.message.clone();
        }
        self.next.conditions = conditions(&self.next, self.before, self.now);
        Decision {
            action: self.action,
            status: self.next,
            plan: self.plan,
            notices: self.notices,
            consumed: self.consumed,
            requeue_after: self.requeue_after.max(Duration::from_secs(1)),
        }
    }
}

/// `at + d`, or the end of time: a status time near jiff's limit plus a long duration must not
/// panic (overflowing `+` does), and "never" is the right reading of a sum past year 9999.
pub fn later(at: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| at.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Time from now until `at`, or a resync if there is nothing to wait for.
/// `d` before `at`, or the earliest time when that is before it.
pub fn earlier(at: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| at.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

fn until(now: Timestamp, at: Option<Timestamp>) -> Duration {
    match at {
        Some(at) => Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO),
        None => RESYNC,
    }
}

/// `Ready` and `Progressing`, keeping lastTransitionTime while a condition's status holds.
fn conditions(
    next: &ChatReleaseStatus,
    before: &ChatReleaseStatus,
    now: Timestamp,
) -> Vec<Condition> {
    let (ready, ready_reason) = match next.phase {
        Phase::Failed => ("False", "SpecRejected"),
        Phase::Initializing => ("False", "StableNotReady"),
        _ => ("True", "StableServing"),
    };
    let (progressing, progressing_reason) = match next.phase {
        Phase::Progressing => ("True", "CanaryProgressing"),
        Phase::Paused => ("True", "CanaryPaused"),
        Phase::Promoting => ("True", "Promoting"),
        Phase::Succeeded => ("False", "Succeeded"),
        Phase::RolledBack => ("False", "RolledBack"),
        Phase::Failed => ("False", "SpecRejected"),
        Phase::Initializing | Phase::Stable => ("False", "NoCanary"),
    };
    [
        ("Ready", ready, ready_reason),
        ("Progressing", progressing, progressing_reason),
    ]
    .into_iter()
    .map(|(kind, state, reason)| {
        let previous = before.conditions.iter().find(|c| c.type_ == kind);
        let since = match previous {
            Some(p) if p.status == state => p.last_transition_time.clone(),
            _ => Time(now),
        };
        Condition {
            type_: kind.into(),
            status: state.into(),
            reason: reason.into(),
            message: next.message.clone(),
            observed_generation: next.observed_generation,
            last_transition_time: since,
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ChatRelease;
    use crate::metrics::TrackSample;

    fn t(minutes: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(minutes * 60)
    }

    struct Case {
        settings: Settings,
        status: ChatReleaseStatus,
        world: World,
    }

    fn ready(revision: &str) -> TrackState {
        TrackState {
            revision: Some(revision.into()),
            replicas: 2,
            total_replicas: 2,
            ready_replicas: 2,
            updated_replicas: 2,
            observed: true,
        }
    }

    /// A canary `v2` at `step`, entered at t(0), over a ready stable `v1`.
    fn canary_at(step: i32) -> Case {
        let spec = ChatRelease::test("v2").spec;
        let settings = Settings::from_spec(&spec).unwrap();
        let status = ChatReleaseStatus {
            phase: Phase::Progressing,
            canary_weight: settings.weight_at(Some(step)),
            current_step: Some(step),
            stable_revision: Some("v1".into()),
            canary_revision: Some("v2".into()),
            step_started_at: Some(Time(t(0))),
            canary_started_at: Some(Time(t(0))),
            ..Default::default()
        };
        let world = World {
            generation: Some(1),
            desired_revision: "v2".into(),
            desired_image: "lobe-chat:v2".into(),
            stable: Some(ready("v1")),
            canary: Some(ready("v2")),
            commands: Commands::default(),
        };
        Case {
            settings,
            status,
            world,
        }
    }

    /// Requests and errors of the canary and of stable over one window, P99 100 ms on both.
    fn window(canary: (f64, f64), stable: (f64, f64)) -> Observations {
        let track = |(requests, errors): (f64, f64)| TrackSample {
            requests: Some(requests),
            errors: Some(errors),
            latency_p99_ms: Some(100.0),
            custom: Default::default(),
        };
        Observations::Sampled {
            canary: track(canary),
            stable: track(stable),
        }
    }

    fn healthy() -> Observations {
        window((1000.0, 0.0), (9000.0, 0.0))
    }

    /// 10% errors on the canary, none on stable: a failed analysis.
    fn canary_erroring() -> Observations {
        window((1000.0, 100.0), (9000.0, 0.0))
    }

    /// 12% errors on both tracks: trouble both versions share.
    fn shared_outage() -> Observations {
        window((1000.0, 120.0), (9000.0, 1080.0))
    }

    impl Case {
        fn decide(&self, observations: Option<&Observations>, now: Timestamp) -> Decision {
            decide(&self.settings, &self.status, &self.world, observations, now)
        }
    }

    fn reasons(d: &Decision) -> Vec<&str> {
        d.notices.iter().map(|n| n.reason).collect()
    }

    #[test]
    fn retry_starts_a_rolled_back_revision_again_and_is_consumed() {
        let mut case = canary_at(1);
        case.status.phase = Phase::RolledBack;
        case.status.current_step = None;
        case.status.canary_weight = 0;
        let d = case.decide(None, t(30));
        assert_eq!(
            d.action,
            Action::None,
            "without retry a rolled-back revision stays rolled back"
        );

        case.world.commands.retry = true;
        let d = case.decide(None, t(30));
        assert_eq!(d.action, Action::StartCanary);
        assert_eq!(d.status.phase, Phase::Progressing);
        assert_eq!(d.consumed, vec![Command::Retry]);
        assert!(reasons(&d).contains(&"Retry"));
        assert_eq!(d.plan.canary, TrackPlan::ApplyTemplate { replicas: 2 });
    }

    #[test]
    fn a_retry_during_the_drain_starts_the_canary_once_the_drain_ends() {
        let mut case = canary_at(1);
        case.status.phase = Phase::RolledBack;
        case.status.current_step = None;
        case.status.canary_weight = 0;
        case.status.draining_since = Some(Time(t(0)));
        case.world.commands.retry = true;
        let d = case.decide(None, t(1));
        assert_eq!(d.consumed, vec![Command::Retry]);
        assert_eq!(d.action, Action::AwaitCanary);
        assert_eq!(d.plan.canary, TrackPlan::Keep, "the old pods drain");
        case.status = d.status;
        // The annotation is gone; the retry is not.
        case.world.commands.retry = false;
        let d = case.decide(None, t(6));
        assert_eq!(d.action, Action::StartCanary);
        assert_eq!(d.status.phase, Phase::Progressing);
    }

    #[test]
    fn retry_waits_for_the_old_canary_pods_to_drain() {
        let mut case = canary_at(1);
        case.status.phase = Phase::RolledBack;
        case.status.current_step = None;
        case.status.draining_since = Some(Time(t(0)));
        case.world.commands.retry = true;
        let d = case.decide(None, t(2));
        assert_eq!(d.action, Action::AwaitCanary);
        assert_eq!(
            d.plan.canary,
            TrackPlan::Keep,
            "draining pods are not replaced"
        );
    }

    #[test]
    fn pause_freezes_the_weight_and_skips_analysis_until_removed() {
        let mut case = canary_at(1);
        case.world.commands.pause = true;
        assert!(!analysis_due(
            &case.settings,
            &case.status,
            &case.world.commands,
            t(5)
        ));
        let d = case.decide(None, t(5));
        assert_eq!(
            (d.action, d.status.phase, d.status.canary_weight),
            (Action::Wait, Phase::Paused, 25)
        );
        assert!(d.consumed.is_empty(), "pause is not one-shot");
        assert!(reasons(&d).contains(&"Paused"));

        case.status = d.status;
        case.world.commands.pause = false;
        let d = case.decide(Some(&healthy()), t(6));
        assert!(reasons(&d).contains(&"Resumed"));
        assert_eq!(d.action, Action::Advance { from: 25, to: 50 });
    }

    #[test]
    fn rollback_annotation_sends_everything_to_stable_and_drains() {
        let mut case = canary_at(2);
        case.world.commands.rollback = true;
        let d = case.decide(None, t(1));
        assert_eq!(d.action, Action::Rollback);
        assert_eq!((d.plan.canary_weight, d.plan.canary_routes), (0, false));
        assert_eq!(d.plan.canary, TrackPlan::Keep);
        assert_eq!(d.status.draining_since, Some(Time(t(1))));
        assert_eq!(d.consumed, vec![Command::Rollback]);
    }

    #[test]
    fn a_new_template_mid_canary_withdraws_traffic_then_starts_after_the_drain() {
        let mut case = canary_at(1);
        case.world.desired_revision = "v3".into();
        let d = case.decide(None, t(1));
        assert_eq!(d.plan.canary_weight, 0);
        assert_eq!(
            d.plan.canary,
            TrackPlan::Keep,
            "v2 pods drain before v3 replaces them"
        );
        assert_eq!(d.status.canary_revision.as_deref(), Some("v3"));
        assert!(reasons(&d).contains(&"CanarySuperseded"));

        case.status = d.status;
        let d = case.decide(None, t(7));
        assert_eq!(d.action, Action::StartCanary);
        assert_eq!(d.plan.canary, TrackPlan::ApplyTemplate { replicas: 2 });
        assert_eq!(d.status.canary_started_at, Some(Time(t(7))));
    }

    #[test]
    fn setting_the_template_back_to_stable_withdraws_the_canary() {
        let mut case = canary_at(1);
        case.world.desired_revision = "v1".into();
        let d = case.decide(None, t(1));
        assert_eq!((d.status.phase, d.plan.canary_weight), (Phase::Stable, 0));
        assert!(reasons(&d).contains(&"CanaryWithdrawn"));
    }

    /// The canary of `canary_at` with `ready_pods` of its 2 pods Ready.
    fn canary_pods_ready(case: &mut Case, ready_pods: i32) {
        case.world.canary = Some(TrackState {
            ready_replicas: ready_pods,
            ..ready("v2")
        });
    }

    #[test]
    fn a_canary_whose_pods_stop_being_ready_loses_its_weight_until_they_are_back() {
        let mut case = canary_at(1);
        canary_pods_ready(&mut case, 0);
        let d = case.decide(Some(&healthy()), t(1));
        assert_eq!(d.action, Action::Hold);
        assert_eq!((d.plan.canary_weight, d.plan.canary_routes), (0, false));
        assert_eq!(
            (d.status.canary_weight, d.status.current_step),
            (0, Some(1)),
            "the step is kept, its weight is not"
        );
        assert!(reasons(&d).contains(&"CanaryNotReady"), "{:?}", d.notices);
        assert_eq!(
            d.status.last_analysis, None,
            "nothing judged without traffic"
        );
        case.status = d.status;
        assert!(
            !analysis_due(&case.settings, &case.status, &case.world.commands, t(3)),
            "no analysis while the weight is withdrawn"
        );

        let d = case.decide(None, t(2));
        assert!(
            !reasons(&d).contains(&"CanaryNotReady"),
            "one Event, not one per look"
        );
        case.status = d.status;

        canary_pods_ready(&mut case, 2);
        let d = case.decide(None, t(3));
        assert_eq!(d.action, Action::Advance { from: 0, to: 25 });
        assert_eq!((d.plan.canary_weight, d.plan.canary_routes), (25, true));
        assert_eq!(
            d.status.step_started_at,
            Some(Time(t(3))),
            "the step starts over"
        );
        assert_eq!(d.status.canary_unready_since, None);
    }

    #[test]
    fn a_canary_not_ready_again_within_the_deadline_rolls_back() {
        let mut case = canary_at(2);
        canary_pods_ready(&mut case, 1);
        let d = case.decide(None, t(1));
        assert_eq!(d.plan.canary_weight, 0);
        case.status = d.status;
        let deadline = later(t(1), case.settings.progress_deadline);
        let d = case.decide(None, deadline - SignedDuration::from_secs(1));
        assert_eq!(d.action, Action::Hold);
        case.status = d.status;
        let d = case.decide(None, deadline);
        assert_eq!(d.action, Action::Rollback);
        assert_eq!(d.status.phase, Phase::RolledBack);
        assert!(
            d.status.message.contains("not Ready again"),
            "{}",
            d.status.message
        );
    }

    #[test]
    fn a_new_revisions_window_never_reaches_back_into_the_one_before() {
        let mut case = canary_at(0);
        case.settings.window = Duration::from_secs(600);
        case.status.canary_started_at = Some(Time(t(0)));
        assert_eq!(
            analysis_window(&case.settings, &case.status, t(2)),
            Duration::from_secs(120),
            "two minutes of this revision, not ten with the last one's"
        );
        assert_eq!(
            analysis_window(&case.settings, &case.status, t(30)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn a_canary_superseded_at_a_first_step_gate_drains_its_testers() {
        let mut case = canary_at(0);
        case.status.current_step = None;
        case.status.canary_weight = 0;
        case.status.phase = Phase::Paused;
        case.status.pause_reason = Some(PauseReason::ManualGate);
        case.world.desired_revision = "v3".into();
        let d = case.decide(None, t(1));
        assert_eq!(d.status.draining_since, Some(Time(t(1))));
        assert_eq!(
            d.plan.canary,
            TrackPlan::Keep,
            "v2's testers finish their chats"
        );
        assert!(!d.plan.canary_routes);
        assert_eq!(d.action, Action::AwaitCanary);
    }

    #[test]
    fn a_canary_lost_while_promoting_is_put_back_and_users_go_to_stables_ready_pods() {
        let mut case = canary_at(3);
        case.status.phase = Phase::Promoting;
        // Stable rolls to v2: one new pod, two old ones, all Ready.
        case.world.stable = Some(TrackState {
            revision: Some("v2".into()),
            total_replicas: 3,
            updated_replicas: 1,
            ready_replicas: 3,
            ..ready("v2")
        });
        case.world.canary = None;
        let d = case.decide(None, t(1));
        assert_eq!(d.plan.canary, TrackPlan::ApplyTemplate { replicas: 2 });
        assert_eq!((d.plan.canary_weight, d.status.canary_weight), (0, 0));
        assert_eq!(d.status.phase, Phase::Promoting);
        case.status = d.status;

        case.world.canary = Some(ready("v2"));
        let d = case.decide(None, t(2));
        assert_eq!(
            (d.plan.canary_weight, d.status.canary_weight),
            (100, 100),
            "back on the canary until stable is whole"
        );
    }

    #[test]
    fn a_spec_rejected_while_promoting_keeps_users_on_the_canary_and_promotes_again_once_fixed() {
        let mut case = canary_at(3);
        case.status.phase = Phase::Promoting;
        let d = hold_rejected(&case.status, Some(2), "spec.x: broken", t(1));
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(
            (
                d.plan.canary_weight,
                d.plan.canary_routes,
                d.plan.stable_routes
            ),
            (100, true, false),
            "everyone stays on the canary; no stable cookie route to a half-rolled stable"
        );
        assert_eq!(
            (d.plan.stable, d.plan.canary),
            (TrackPlan::Keep, TrackPlan::Keep)
        );
        case.status = d.status;

        // Fixed: the canary is judged once more at 100%, then promoted again.
        let d = case.decide(Some(&healthy()), t(2));
        assert_eq!(d.action, Action::Promote);
        assert_eq!(d.status.phase, Phase::Promoting);
        assert_eq!(d.plan.canary_weight, 100);
    }

    #[test]
    fn an_ignored_promote_does_not_pass_the_gate_the_same_analysis_reaches() {
        // At 25% with a gate before 50%: the promote annotation arrives while no gate waits.
        let mut case = canary_at(1);
        case.settings.manual_gates = vec![50];
        case.world.commands.promote = true;
        let d = case.decide(Some(&healthy()), t(1));
        assert!(reasons(&d).contains(&"AnnotationIgnored"));
        assert_eq!(d.consumed, vec![Command::Promote]);
        assert_eq!(
            (d.action, d.status.phase, d.plan.canary_weight),
            (Action::Wait, Phase::Paused, 25),
            "{}",
            d.status.message
        );
        assert_eq!(d.status.pause_reason, Some(PauseReason::ManualGate));
    }

    #[test]
    fn pausing_a_superseded_canary_never_shortens_its_drain() {
        let mut case = canary_at(1);
        case.world.desired_revision = "v3".into();
        let d = case.decide(None, t(1));
        assert_eq!(d.action, Action::AwaitCanary, "v2 drains before v3 starts");
        case.status = d.status;
        case.world.commands.pause = true;
        for minute in [2, 3, 5] {
            let d = case.decide(None, t(minute));
            assert_eq!(d.action, Action::Wait, "minute {minute}");
            assert_eq!(
                d.plan.canary,
                TrackPlan::Keep,
                "minute {minute}: the draining v2 pods keep running"
            );
            case.status = d.status;
        }
    }

    #[test]
    fn promote_without_a_waiting_gate_is_removed_with_an_event() {
        let mut case = canary_at(0);
        case.world.commands.promote = true;
        let d = case.decide(None, t(0) + SignedDuration::from_secs(10));
        assert_eq!(d.action, Action::None);
        assert_eq!(d.consumed, vec![Command::Promote]);
        assert!(reasons(&d).contains(&"AnnotationIgnored"));
    }

    #[test]
    fn inconclusive_longer_than_the_deadline_pauses_and_a_person_can_promote() {
        let mut case = canary_at(0);
        let mut now = t(1);
        for _ in 0..10 {
            let d = case.decide(Some(&shared_outage()), now);
            assert_eq!(d.action, Action::Hold);
            assert_eq!(d.status.failed_checks, 0, "inconclusive is not a failure");
            case.status = d.status;
            now += SignedDuration::from_secs(60);
        }
        let d = case.decide(Some(&shared_outage()), now);
        assert_eq!(
            (d.status.phase, d.status.pause_reason),
            (Phase::Paused, Some(PauseReason::Inconclusive))
        );
        assert!(
            d.status.message.contains("progressDeadline"),
            "{}",
            d.status.message
        );
        case.status = d.status;
        case.world.commands.promote = true;
        let d = case.decide(None, now + SignedDuration::from_secs(5));
        assert_eq!(d.action, Action::Advance { from: 5, to: 25 });
        assert_eq!(d.consumed, vec![Command::Promote]);
    }

    #[test]
    fn a_gate_on_the_first_step_keeps_users_off_the_canary_until_promoted_but_not_testers() {
        let mut case = canary_at(0);
        case.settings.manual_gates = vec![5];
        case.status.current_step = None;
        case.status.canary_weight = 0;
        let d = case.decide(None, t(1));
        assert_eq!(
            (d.action, d.status.phase, d.plan.canary_weight),
            (Action::Wait, Phase::Paused, 0)
        );
        assert!(d.plan.canary_routes, "canaryMatch reaches the Ready canary");
        case.status = d.status;
        let d = case.decide(None, t(2));
        assert!(
            (d.action, d.plan.canary_weight, d.plan.canary_routes) == (Action::Wait, 0, true),
            "still at the gate on the next resync: {d:?}"
        );
        case.world.commands.promote = true;
        let d = case.decide(None, t(2));
        assert_eq!(d.action, Action::Advance { from: 0, to: 5 });
    }

    #[test]
    fn while_the_canary_rolls_from_an_old_template_the_message_counts_new_and_old_pods() {
        let mut case = canary_at(0);
        case.status.current_step = None;
        case.status.canary_weight = 0;
        // readyReplicas 3 of 2 wanted: two old pods and one new one are Ready.
        case.world.canary = Some(TrackState {
            total_replicas: 3,
            ready_replicas: 3,
            updated_replicas: 1,
            ..ready("v2")
        });
        let d = case.decide(None, t(1));
        assert_eq!((d.action, d.plan.canary_weight), (Action::AwaitCanary, 0));
        assert!(
            d.status
                .message
                .ends_with("1/2 pods of the new template, 2 old ones left"),
            "{}",
            d.status.message
        );

        case.world.canary = Some(TrackState {
            observed: false,
            ..ready("v2")
        });
        let d = case.decide(None, t(1));
        assert!(
            d.status
                .message
                .contains("0/2 Ready (the Deployment has not"),
            "{}",
            d.status.message
        );

        case.world.canary = Some(ready("v2"));
        let d = case.decide(None, t(1));
        assert_eq!(
            d.status.message,
            "canary weight 0% → 5%: canary pods 2/2 Ready"
        );
    }

    #[test]
    fn sticky_stable_users_follow_the_split_while_stable_is_given_the_promoted_template() {
        let mut case = canary_at(3);
        let d = case.decide(Some(&healthy()), t(1));
        assert_eq!(d.action, Action::Promote);
        assert!(!d.plan.stable_routes, "stable runs old and new pods now");
        assert!(d.plan.canary_routes && d.plan.canary_weight == 100);

        case.status = d.status;
        let d = case.decide(None, t(2));
        assert_eq!(d.status.phase, Phase::Promoting, "stable is not whole yet");
        assert!(!d.plan.stable_routes);

        case.status = d.status;
        case.world.stable = case.world.canary.clone();
        let d = case.decide(None, t(3));
        assert_eq!(d.action, Action::FinishPromotion);
        assert!(
            d.plan.stable_routes,
            "stable serves the promoted revision whole"
        );
        assert_eq!(d.status.stable_revision, case.status.canary_revision);
    }

    #[test]
    fn rollback_during_promotion_is_refused_with_an_explanation() {
        let mut case = canary_at(3);
        case.status.phase = Phase::Promoting;
        case.world.commands.rollback = true;
        let d = case.decide(None, t(1));
        assert_eq!(d.status.phase, Phase::Promoting);
        assert_eq!(d.plan.canary_weight, 100);
        assert!(reasons(&d).contains(&"RollbackRefused"));
        assert_eq!(d.consumed, vec![Command::Rollback]);
    }

    #[test]
    fn a_failed_analysis_below_the_limit_holds_and_a_pass_resets_the_count() {
        let mut case = canary_at(1);
        let bad = canary_erroring();
        let d = case.decide(Some(&bad), t(1));
        assert_eq!((d.action, d.status.failed_checks), (Action::Hold, 1));
        assert!(
            d.notices
                .iter()
                .any(|n| n.warning && n.reason == "AnalysisFailed")
        );
        case.status = d.status;
        let d = case.decide(Some(&healthy()), t(2));
        assert_eq!((d.status.failed_checks, d.status.canary_weight), (0, 50));
    }

    /// A canary that served fewer than minRequests in the window (with 30% errors).
    fn too_few_requests() -> Observations {
        window((30.0, 9.0), (38000.0, 76.0))
    }

    #[test]
    fn a_window_without_evidence_does_not_break_a_run_of_failures() {
        let down = Observations::Unavailable {
            reason: "Prometheus is down".into(),
        };
        for gap in [down, too_few_requests()] {
            let mut case = canary_at(1);
            let d = case.decide(Some(&canary_erroring()), t(1));
            assert_eq!((d.action, d.status.failed_checks), (Action::Hold, 1));
            case.status = d.status;
            let d = case.decide(Some(&gap), t(2));
            assert_eq!((d.action, d.status.failed_checks), (Action::Hold, 1));
            case.status = d.status;
            let d = case.decide(Some(&canary_erroring()), t(3));
            assert_eq!(d.action, Action::Rollback, "fail, no evidence, fail");
            assert_eq!(d.plan.canary_weight, 0);
        }
    }

    #[test]
    fn trouble_both_versions_share_breaks_a_run_of_failures() {
        let mut case = canary_at(1);
        for (minute, observations) in [(1, canary_erroring()), (2, shared_outage())] {
            let d = case.decide(Some(&observations), t(minute));
            assert_eq!(d.action, Action::Hold, "minute {minute}");
            case.status = d.status;
        }
        assert_eq!(
            case.status.failed_checks, 0,
            "shared trouble resets the run"
        );
        let d = case.decide(Some(&canary_erroring()), t(3));
        assert_eq!((d.action, d.status.failed_checks), (Action::Hold, 1));
        case.status = d.status;
        let d = case.decide(Some(&canary_erroring()), t(4));
        assert_eq!(d.action, Action::Rollback, "two fails in a row");
    }

    #[test]
    fn a_canary_undecided_past_the_deadline_rolls_back_when_its_last_evidence_failed() {
        // failureLimit out of reach: fail and too-few alternate for longer than progressDeadline.
        let mut case = canary_at(0);
        case.settings.judge.failure_limit = 100;
        let deadline = case.settings.progress_deadline.as_secs() as i64 / 60;
        let mut minute = 1;
        loop {
            let observations = if minute % 2 == 1 {
                canary_erroring()
            } else {
                too_few_requests()
            };
            let d = case.decide(Some(&observations), t(minute));
            if minute <= deadline {
                assert_eq!(d.action, Action::Hold, "minute {minute}");
                assert_eq!(d.status.canary_weight, 5, "minute {minute}");
                case.status = d.status;
                minute += 1;
                continue;
            }
            assert_eq!(d.action, Action::Rollback, "minute {minute}");
            assert!(
                d.status.message.contains("progressDeadline"),
                "{}",
                d.status.message
            );
            break;
        }
        assert_eq!(
            minute,
            deadline + 1,
            "decided at the first analysis past the deadline"
        );
    }

    #[test]
    fn a_shared_outage_past_the_deadline_pauses_even_after_a_chance_failure() {
        let mut case = canary_at(0);
        let d = case.decide(Some(&canary_erroring()), t(1));
        case.status = d.status;
        let mut now = t(2);
        let deadline = later(t(1), case.settings.progress_deadline);
        while now < deadline {
            let d = case.decide(Some(&shared_outage()), now);
            assert_eq!(d.action, Action::Hold);
            case.status = d.status;
            now += SignedDuration::from_secs(60);
        }
        let d = case.decide(Some(&shared_outage()), now);
        assert_eq!(
            (d.action, d.status.phase, d.status.canary_weight),
            (Action::Hold, Phase::Paused, 5)
        );
    }

    #[test]
    fn a_rejected_spec_is_announced_once_per_problem() {
        let case = canary_at(1);
        let first = hold_rejected(&case.status, Some(2), "spec.strategy.steps: bad", t(1));
        assert_eq!(reasons(&first), vec!["SpecRejected"]);
        assert_eq!(first.plan.canary_weight, 25, "traffic stays where it was");
        let again = hold_rejected(&first.status, Some(2), "spec.strategy.steps: bad", t(6));
        assert!(again.notices.is_empty(), "no Event on every resync");
        let other = hold_rejected(&first.status, Some(3), "spec.strategy.interval: bad", t(7));
        assert_eq!(reasons(&other), vec!["SpecRejected"]);
    }

    #[test]
    fn a_rejected_spec_leaves_the_routes_as_they_were() {
        let mut at_first_gate = canary_at(0);
        at_first_gate.settings.manual_gates = vec![5];
        at_first_gate.status.current_step = None;
        at_first_gate.status.canary_weight = 0;
        let waiting = at_first_gate.decide(None, t(1));
        assert!(waiting.plan.canary_routes);
        let rejected = hold_rejected(&waiting.status, Some(2), "spec.replicas: bad", t(2));
        let again = hold_rejected(&rejected.status, Some(2), "spec.replicas: bad", t(3));
        for d in [&rejected, &again] {
            assert_eq!(
                (
                    d.plan.canary_weight,
                    d.plan.canary_routes,
                    d.plan.stable_routes
                ),
                (0, true, true),
                "testers keep their route to the canary at the gate"
            );
        }

        let mut promoting = canary_at(3);
        promoting.status.phase = Phase::Promoting;
        let d = hold_rejected(&promoting.status, Some(2), "spec.replicas: bad", t(1));
        assert!(!d.plan.stable_routes, "stable is still half rolled");
    }

    #[test]
    fn a_fixed_spec_leaves_failed_where_the_rollout_was() {
        let mut case = canary_at(1);
        case.status = spec_rejected(&case.status, Some(2), "spec.strategy.steps: bad", t(1));
        assert_eq!(case.status.phase, Phase::Failed);
        let d = case.decide(None, t(1) + SignedDuration::from_secs(10));
        assert_eq!(d.status.phase, Phase::Progressing);
        assert_eq!(d.plan.canary_weight, 25, "traffic stayed where it was");
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let case = canary_at(1);
        let first = case.decide(Some(&healthy()), t(1)).status;
        let mut again = canary_at(2);
        again.status = first.clone();
        let second = again
            .decide(None, t(1) + SignedDuration::from_secs(30))
            .status;
        let since = |s: &ChatReleaseStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Progressing")
                .unwrap()
                .last_transition_time
                .clone()
        };
        assert_eq!(since(&first), since(&second));
    }
}
