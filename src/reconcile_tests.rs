//! The reconciler against a mocked API server: what it writes, in which order, and with which
//! field manager, for the flows a user relies on.

use crate::annotations::{LABEL_REVISION, ROLLBACK};
use crate::crd::{ChatRelease, Phase};
use crate::fixtures::*;
use crate::workload::Track;
use jiff::{SignedDuration, Timestamp};
use std::sync::atomic::Ordering;

/// `strategy.interval` of the fixtures' ChatReleases: the window of a scheduled analysis.
const INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

fn t0() -> Timestamp {
    "2026-11-21T12:00:00Z".parse().expect("timestamp")
}

fn minutes(m: i64) -> SignedDuration {
    SignedDuration::from_secs(m * 60)
}

/// `canary` at step `step` (entered at t0) over a `stable` release, both tracks' pods all Ready,
/// the clock at `now`.
fn running_canary(
    stable: &ChatRelease,
    canary: &ChatRelease,
    step: i32,
    now: Timestamp,
) -> Harness {
    let release = canary
        .clone()
        .with_status(canary_status(stable, canary, step, t0()));
    let mut h = Harness::new(&release, now);
    h.set_deployment(deployment(stable, Track::Stable, 2, 2));
    h.set_deployment(deployment(canary, Track::Canary, 2, 2));
    h
}

fn last_status(h: &Harness) -> crate::crd::ChatReleaseStatus {
    h.server.status_writes().pop().expect("a status write")
}

fn event_reasons(h: &Harness) -> Vec<String> {
    h.server
        .events()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn first_apply_runs_stable_only_with_all_traffic_on_it() {
    let release = ChatRelease::test("v1");
    let mut h = Harness::new(&release, t0());
    h.reconcile().await;

    let vs = h.server.virtual_service_writes();
    assert_eq!(vs.len(), 1);
    assert_eq!(split(&vs[0]), (100, 0));
    let stable = h.server.deployment_applies(Track::Stable);
    assert_eq!(stable.len(), 1);
    assert_eq!(stable[0]["spec"]["replicas"], 2);
    assert_eq!(
        stable[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        "lobehub/lobe-chat:v1"
    );
    assert!(owner_is_release(&stable[0]));
    let canary = h.server.deployment_applies(Track::Canary);
    assert_eq!(
        canary[0]["spec"]["replicas"], 0,
        "the canary Deployment exists with no pods"
    );
    assert!(
        h.server
            .calls()
            .iter()
            .any(|c| c.is("PATCH", "/services/lobe-chat?"))
    );
    assert!(
        h.server
            .calls()
            .iter()
            .any(|c| c.is("PATCH", "/destinationrules/lobe-chat?"))
    );
    for call in h
        .server
        .writes()
        .iter()
        .filter(|c| c.uri.contains("fieldManager"))
    {
        assert_eq!(
            field_manager(call).as_deref(),
            Some(OPERATOR),
            "{}",
            call.uri
        );
    }
    assert_eq!(last_status(&h).phase, Phase::Initializing);
    // Owner references are what make deleting the ChatRelease delete all of these.
    let applied: Vec<_> = h
        .server
        .writes()
        .into_iter()
        .filter(|c| c.uri.contains("fieldManager") && !c.uri.contains("/status"))
        .collect();
    assert_eq!(
        applied.len(),
        5,
        "Service, DestinationRule, VirtualService and two Deployments"
    );
    for call in &applied {
        assert!(
            owner_is_release(&call.body),
            "{} has no controller owner reference",
            call.uri
        );
    }

    h.set_deployment(deployment(&release, Track::Stable, 2, 2));
    h.set_deployment(deployment(&release, Track::Canary, 0, 0));
    h.reconcile().await;
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::Stable);
    assert_eq!(status.stable_image.as_deref(), Some("lobehub/lobe-chat:v1"));
    assert!(
        h.server.deployment_applies(Track::Stable).is_empty(),
        "an up-to-date Deployment is not re-applied"
    );
    assert!(event_reasons(&h).contains(&"StableReady".to_string()));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(ready.status, "True");
}

#[tokio::test]
async fn template_change_starts_a_canary_that_gets_weight_only_once_its_pods_are_ready() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let mut h = Harness::new(&v1.clone().with_status(settled_status(&v1)), t0());
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    h.set_deployment(deployment(&v1, Track::Canary, 0, 0));
    h.user_applies(&v2);

    h.reconcile().await;
    let canary = h.server.deployment_applies(Track::Canary);
    assert_eq!(canary.len(), 1);
    assert_eq!(
        canary[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        "lobehub/lobe-chat:v2"
    );
    assert_eq!(applied_revision(&canary[0]), v2.revision());
    assert_eq!(canary[0]["spec"]["replicas"], 2);
    assert!(
        h.server.deployment_applies(Track::Stable).is_empty(),
        "stable keeps v1"
    );
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (100, 0));
    let status = last_status(&h);
    assert_eq!(
        (status.phase, status.canary_weight),
        (Phase::Progressing, 0)
    );
    assert_eq!(status.canary_revision, Some(v2.revision()));

    h.set_deployment(deployment(&v2, Track::Canary, 2, 1));
    h.reconcile().await;
    assert_eq!(
        split(&h.server.virtual_service_writes()[0]),
        (100, 0),
        "no weight to pods that are not Ready"
    );
    assert!(
        last_status(&h).message.contains("1/2 Ready"),
        "{}",
        last_status(&h).message
    );

    // Mid rolling update: two new pods not Ready yet, two old ones Ready. readyReplicas is 2,
    // but those are the old pods: still no weight.
    let mut rolling = deployment(&v2, Track::Canary, 2, 2);
    rolling.status.as_mut().expect("status").replicas = Some(4);
    h.set_deployment(rolling);
    h.reconcile().await;
    assert_eq!(
        split(&h.server.virtual_service_writes()[0]),
        (100, 0),
        "old pods' readiness is not the canary's"
    );

    h.set_deployment(deployment(&v2, Track::Canary, 2, 2));
    h.reconcile().await;
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (95, 5));
    let status = last_status(&h);
    assert_eq!((status.canary_weight, status.current_step), (5, Some(0)));
    assert!(event_reasons(&h).contains(&"Advanced".to_string()));
}

#[tokio::test]
async fn canary_pods_not_ready_by_the_progress_deadline_roll_back() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let mut h = Harness::new(&v1.clone().with_status(settled_status(&v1)), t0());
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    h.user_applies(&v2);
    h.reconcile().await;
    h.set_deployment(deployment(&v2, Track::Canary, 2, 0));

    h.set_time(t0() + minutes(9));
    h.reconcile().await;
    assert_eq!(last_status(&h).phase, Phase::Progressing);

    h.set_time(t0() + minutes(10));
    h.reconcile().await;
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::RolledBack);
    assert!(
        status.message.contains("not Ready within progressDeadline"),
        "{}",
        status.message
    );
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (100, 0));
}

#[tokio::test]
async fn rollback_annotation_moves_all_traffic_in_one_virtualservice_write() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let at_25 = v2
        .clone()
        .with_status(canary_status(&v1, &v2, 1, t0()))
        .annotated(ROLLBACK);
    let mut h = Harness::new(&at_25, t0() + SignedDuration::from_secs(20));
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    h.set_deployment(deployment(&v2, Track::Canary, 2, 2));

    h.reconcile().await;
    let vs = h.server.virtual_service_writes();
    assert_eq!(vs.len(), 1, "one write of the VirtualService");
    assert_eq!(split(&vs[0]), (100, 0));
    let routes = vs[0]["spec"]["http"].as_array().expect("routes");
    assert_eq!(
        routes.len(),
        1,
        "no canary-match or canary-cookie route is left: {routes:?}"
    );

    let status = last_status(&h);
    assert_eq!((status.phase, status.canary_weight), (Phase::RolledBack, 0));
    assert!(
        status
            .message
            .contains("rolled back by the chatrelease.io/rollback annotation")
    );

    let removal = h
        .server
        .calls()
        .into_iter()
        .find(|c| c.is("PATCH", "/chatreleases/lobe-chat?"))
        .expect("annotation removal");
    assert_eq!(removal.body[0]["op"], "test");
    assert_eq!(
        removal.body[1],
        serde_json::json!({"op": "remove", "path": "/metadata/annotations/chatrelease.io~1rollback"})
    );
    let rolled_back = h
        .server
        .events()
        .into_iter()
        .find(|e| e["reason"] == "RolledBack")
        .expect("RolledBack event");
    assert_eq!(rolled_back["type"], "Warning");

    assert!(
        h.server.deployment_applies(Track::Canary).is_empty()
            && h.server.scale_writes(Track::Canary).is_empty(),
        "canary pods stay to drain"
    );
    assert_eq!(
        h.metrics.asked_over(INTERVAL),
        0,
        "no analysis when rolling back"
    );
}

#[tokio::test]
async fn promotion_updates_stable_first_returns_traffic_when_it_is_whole_then_drains_the_canary() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let mut h = running_canary(&v1, &v2, 3, t0() + minutes(1));

    h.reconcile().await;
    assert_eq!(h.metrics.asked_over(INTERVAL), 1);
    let stable = h.server.deployment_applies(Track::Stable);
    assert_eq!(stable.len(), 1, "stable gets the new template");
    assert_eq!(applied_revision(&stable[0]), v2.revision());
    assert_eq!(
        split(&h.server.virtual_service_writes()[0]),
        (0, 100),
        "traffic stays on the canary meanwhile"
    );
    assert_eq!(last_status(&h).phase, Phase::Promoting);

    let mut rolling = deployment(&v2, Track::Stable, 2, 1);
    rolling.status.as_mut().expect("status").updated_replicas = Some(1);
    h.set_deployment(rolling);
    h.set_time(t0() + minutes(2));
    h.reconcile().await;
    assert_eq!(
        split(&h.server.virtual_service_writes()[0]),
        (0, 100),
        "stable is not whole yet"
    );
    let message = h.stored().status.expect("status").message;
    assert!(
        message.contains("1/2 pods of it and 1 old ones left"),
        "{message}"
    );

    h.set_deployment(deployment(&v2, Track::Stable, 2, 2));
    h.reconcile().await;
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (100, 0));
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::Succeeded);
    assert_eq!(status.stable_revision, Some(v2.revision()));
    assert!(
        h.server.scale_writes(Track::Canary).is_empty(),
        "canary pods drain first"
    );

    h.set_time(t0() + minutes(6));
    h.reconcile().await;
    assert!(
        h.server.scale_writes(Track::Canary).is_empty(),
        "still within drainTimeout"
    );

    h.set_time(t0() + minutes(7));
    h.reconcile().await;
    let scale = h.server.scale_writes(Track::Canary);
    assert_eq!(scale.len(), 1);
    assert_eq!(scale[0]["spec"]["replicas"], 0);
    assert!(event_reasons(&h).contains(&"CanaryDrained".to_string()));
}

#[tokio::test]
async fn one_analysis_per_interval_even_across_a_restart() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let h = running_canary(&v1, &v2, 0, t0() + SignedDuration::from_secs(59));

    h.reconcile().await;
    assert_eq!(
        h.metrics.asked_over(INTERVAL),
        0,
        "not due before the interval"
    );
    h.set_time(t0() + minutes(1));
    h.reconcile().await;
    assert_eq!(h.metrics.asked_over(INTERVAL), 1);
    assert_eq!(last_status(&h).canary_weight, 25);
    // A restarted operator reads the same status: the step just taken is not analysed again.
    h.reconcile().await;
    assert_eq!(h.metrics.asked_over(INTERVAL), 1);
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (75, 25));
}

#[tokio::test]
async fn a_spec_the_operator_cannot_use_is_reported_not_applied() {
    let v1 = ChatRelease::test("v1");
    let mut bad = ChatRelease::test("v2");
    // The CRD admits it (a well-formed, unique name); only the operator knows the name is taken
    // by a built-in check.
    bad.spec.analysis.metrics = vec![crate::crd::CustomMetric {
        name: Some("latency-p99".into()),
        query: Some("vector(1)".into()),
        check: None,
        flavor: None,
        max: Some(1.0),
        min: None,
        max_increase: None,
        max_decrease: None,
    }];
    let mut h = Harness::new(&v1.clone().with_status(settled_status(&v1)), t0());
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    h.user_applies(&bad);

    h.reconcile().await;
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status.message.contains("spec.analysis.metrics[0].name"),
        "{}",
        status.message
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SpecRejected")
    );
    assert!(event_reasons(&h).contains(&"SpecRejected".to_string()));
    let writes: Vec<_> = h
        .server
        .writes()
        .into_iter()
        .filter(|c| !c.uri.contains("/status"))
        .collect();
    assert!(
        writes.is_empty(),
        "nothing but status is written: {writes:?}"
    );
    assert_eq!(
        h.stored().spec.analysis.metrics[0].name.as_deref(),
        Some("latency-p99"),
        "the user's spec is left as written"
    );
    let _ = LABEL_REVISION;
}

#[tokio::test]
async fn a_stale_cached_copy_never_moves_the_weight_back() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let h = running_canary(&v1, &v2, 1, t0() + minutes(1));
    h.reconcile().await;
    assert_eq!(last_status(&h).canary_weight, 50);

    // The watch cache still shows 25% a moment after our own write of 50%.
    h.set_time(t0() + minutes(1) + SignedDuration::from_secs(1));
    let at_25 = v2.clone().with_status(canary_status(&v1, &v2, 1, t0()));
    h.reconcile_from_cache(at_25).await;
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (50, 50));
    assert!(h.server.status_writes().is_empty(), "nothing new to say");
}

/// The http route of a written VirtualService named `name`.
fn route<'a>(virtual_service: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    virtual_service["spec"]["http"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

#[tokio::test]
async fn while_stable_is_promoted_users_with_the_old_stable_cookie_follow_the_split() {
    let v1 = ChatRelease::test("v1");
    let mut v2 = ChatRelease::test("v2");
    v2.spec.traffic.sticky_cookie = Some("chat-version".into());
    let mut h = running_canary(&v1, &v2, 3, t0() + minutes(1));

    h.reconcile().await;
    assert_eq!(last_status(&h).phase, Phase::Promoting);
    let promoting = &h.server.virtual_service_writes()[0];
    assert!(
        route(promoting, "sticky-stable").is_none(),
        "stable now rolls to the new template; an old cookie must not pick its pods: {promoting}"
    );
    assert!(route(promoting, "sticky-canary").is_some(), "{promoting}");
    assert_eq!(split(promoting), (0, 100));

    h.set_deployment(deployment(&v2, Track::Stable, 2, 2));
    h.reconcile().await;
    assert_eq!(last_status(&h).phase, Phase::Succeeded);
    let promoted = &h.server.virtual_service_writes()[0];
    let sticky_stable = route(promoted, "sticky-stable").expect("a stable cookie route again");
    let regex = sticky_stable["match"][0]["headers"]["cookie"]["regex"]
        .as_str()
        .unwrap_or_default();
    assert!(regex.contains(&v2.revision()), "{regex}");
    assert!(route(promoted, "sticky-canary").is_none(), "{promoted}");
}

#[tokio::test]
async fn a_repeated_warning_is_folded_into_a_series_and_notices_are_kept_by_no_one() {
    let v1 = ChatRelease::test("v1");
    let h = Harness::new(&v1, t0());
    let methods = |reason: &str| -> Vec<String> {
        h.server
            .calls()
            .into_iter()
            .filter(|c| c.uri.contains("/events") && c.body["reason"] == reason)
            .map(|c| c.method)
            .collect()
    };
    for _ in 0..2 {
        crate::controller::publish(&h.ctx, &v1, true, "AnalysisInconclusive", "no traffic").await;
        crate::controller::publish(&h.ctx, &v1, false, "Retry", "retrying v1").await;
    }
    assert_eq!(methods("AnalysisInconclusive"), ["POST", "PATCH"]);
    // The same note again is a new Event: no recorder held the first one.
    assert_eq!(methods("Retry"), ["POST", "POST"]);
}

#[tokio::test]
async fn each_step_is_an_event_of_its_own_not_a_series_showing_the_first_steps_note() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let h = running_canary(&v1, &v2, 0, t0() + minutes(1));

    let mut advanced = Vec::new();
    for minute in [1, 2] {
        h.set_time(t0() + minutes(minute));
        h.reconcile().await;
        let call = h
            .server
            .calls()
            .into_iter()
            .find(|c| c.uri.contains("/events") && c.body["reason"] == "Advanced")
            .expect("an Advanced Event");
        assert_eq!(
            call.method, "POST",
            "a new Event, not a patch of the last one"
        );
        advanced.push(call.body["note"].as_str().unwrap_or_default().to_string());
    }
    assert!(advanced[0].contains("5% → 25%"), "{advanced:?}");
    assert!(advanced[1].contains("25% → 50%"), "{advanced:?}");
}

#[test]
fn the_deployment_cache_keeps_what_the_decision_reads_from_the_api_servers_json() {
    let v2 = ChatRelease::test("v2");
    let mut full = deployment(&v2, Track::Canary, 2, 1);
    full.metadata.managed_fields = Some(vec![Default::default()]);
    let mut cached = crate::fixtures::cached_deployment(&full);
    crate::controller::keep_what_track_state_reads(&mut cached);
    assert_eq!(
        crate::workload::track_state(&cached),
        crate::workload::track_state(&crate::workload::TrackDeployment::of(&full))
    );
    assert_eq!(
        crate::workload::track_state(&cached),
        crate::rollout::TrackState {
            revision: Some(v2.revision()),
            replicas: 2,
            total_replicas: 2,
            ready_replicas: 1,
            updated_replicas: 2,
            observed: true,
        }
    );
    assert!(cached.metadata.managed_fields.is_none());
    assert!(
        cached.metadata.owner_references.is_some(),
        "owners are woken by it"
    );
    assert_eq!(
        crate::workload::live_fingerprint(&cached),
        Some(crate::workload::fingerprint(&v2.spec.template.spec())),
        "hand edits of the pod spec stay visible"
    );
}

#[tokio::test]
async fn a_pod_template_edited_by_hand_is_put_back() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let at_25 = v2.clone().with_status(canary_status(&v1, &v2, 1, t0()));
    let mut h = Harness::new(&at_25, t0() + SignedDuration::from_secs(20));
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    // `kubectl set image deployment/lobe-chat-canary lobe-chat=evil:1`: the revision label stays.
    let mut edited = deployment(&v2, Track::Canary, 2, 2);
    let pod = edited
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .expect("pod spec");
    pod.containers[0].image = Some("evil:1".into());
    h.set_deployment(edited);

    h.reconcile().await;
    let applied = h.server.deployment_applies(Track::Canary);
    assert_eq!(applied.len(), 1, "the canary's template is applied again");
    assert_eq!(
        applied[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        "lobehub/lobe-chat:v2"
    );
    assert!(event_reasons(&h).contains(&"PodTemplateRestored".to_string()));
    assert!(
        h.server.deployment_applies(Track::Stable).is_empty(),
        "stable was not touched"
    );
}

/// A metrics source with a bug: it panics when asked.
struct PanickingMetrics;

impl crate::metrics::MetricsSource for PanickingMetrics {
    fn observe<'a>(
        &'a self,
        _target: &'a crate::metrics::AnalysisTarget,
    ) -> crate::metrics::BoxFuture<'a, crate::metrics::Observations> {
        Box::pin(async { panic!("metrics source bug: index out of bounds") })
    }
}

#[tokio::test]
async fn a_panic_while_reconciling_marks_that_release_failed_instead_of_ending_the_process() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let mut h = running_canary(&v1, &v2, 0, t0() + minutes(1));
    std::sync::Arc::get_mut(&mut h.ctx)
        .expect("the harness holds the only Context")
        .metrics = std::sync::Arc::new(PanickingMetrics);

    let result = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::controller::reconcile(std::sync::Arc::new(h.stored()), h.ctx.clone()),
    )
    .await
    .expect("reconcile finished in time");
    let error = result.expect_err("a panic is an error, not a success");
    assert!(
        matches!(error, crate::error::Error::Panicked { .. }),
        "{error}"
    );
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status.message.contains("metrics source bug"),
        "{}",
        status.message
    );
    assert_eq!(status.canary_weight, 5, "traffic stays where it was");
    assert!(
        h.server.virtual_service_writes().is_empty(),
        "no route is written after a panic"
    );
    assert!(
        !status.message.contains("spec cannot be applied"),
        "not the spec's fault: {}",
        status.message
    );
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    assert_eq!(ready.map(|c| c.status.as_str()), Some("False"));
    assert!(event_reasons(&h).contains(&"ReconcileFailed".to_string()));
}

#[tokio::test]
async fn a_release_being_deleted_is_left_to_garbage_collection() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let mut at_25 = v2.clone().with_status(canary_status(&v1, &v2, 1, t0()));
    at_25.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t0()));
    let mut h = Harness::new(&at_25, t0() + minutes(1));
    // The stable Deployment is already gone, as garbage collection leaves it mid-deletion.
    h.set_deployment(deployment(&v2, Track::Canary, 2, 2));
    h.reconcile().await;
    assert!(h.server.writes().is_empty(), "{:?}", h.server.writes());
    assert!(h.server.events().is_empty());
}

#[tokio::test]
async fn a_namespace_being_deleted_is_stood_aside_from_not_retried() {
    let v1 = ChatRelease::test("v1");
    let h = Harness::new(&v1.clone().with_status(settled_status(&v1)), t0());
    h.server.namespace_terminating.store(true, Ordering::SeqCst);
    let action = h.reconcile().await;
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert!(
        h.server.status_writes().is_empty(),
        "no Failed status for a namespace on its way out"
    );
}

#[tokio::test]
async fn a_rollback_survives_a_failed_reconcile_and_moves_traffic_before_anything_else() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let at_25 = v2
        .clone()
        .annotated(ROLLBACK)
        .with_status(canary_status(&v1, &v2, 1, t0()));
    let mut h = Harness::new(&at_25, t0() + SignedDuration::from_secs(20));
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    h.set_deployment(deployment(&v2, Track::Canary, 2, 2));
    // The Service write fails: the API server is overloaded.
    *h.server.failing_writes.lock().expect("lock") = Some("/services/".into());
    h.server.clear();
    let result = crate::controller::reconcile(std::sync::Arc::new(h.stored()), h.ctx.clone()).await;
    assert!(result.is_err(), "the failed Service write is an error");
    let writes = h.server.writes();
    let first = writes.first().expect("a write");
    assert!(
        first.uri.contains("/chatreleases/lobe-chat/status"),
        "the rollback is recorded first: {}",
        first.uri
    );
    assert_eq!(last_status(&h).phase, Phase::RolledBack);
    assert_eq!(
        split(&h.server.virtual_service_writes()[0]),
        (100, 0),
        "traffic left the canary before the failing write"
    );

    // The next reconcile carries the rollback on from status, whatever the metrics say now.
    *h.server.failing_writes.lock().expect("lock") = None;
    h.reconcile().await;
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (100, 0));
    assert_eq!(h.stored().status.expect("status").phase, Phase::RolledBack);
}

/// `release` routed by the Gateway API through the Gateway `gateway-system/public`.
fn through_gateway(mut release: ChatRelease) -> ChatRelease {
    release.spec.traffic.gateway_api = Some(crate::crd::GatewayApiTraffic {
        parent_refs: vec![crate::crd::ParentReference {
            name: "public".into(),
            namespace: Some("gateway-system".into()),
            ..Default::default()
        }],
        hostnames: vec!["chat.example.com".into()],
    });
    release
}

fn position(h: &Harness, method: &str, path: &str) -> Option<usize> {
    h.server.calls().iter().position(|c| c.is(method, path))
}

#[tokio::test]
async fn a_gateway_api_release_is_routed_by_an_httproute_and_a_service_per_track_only() {
    let release = through_gateway(ChatRelease::test("v1"));
    let h = Harness::new(&release, t0());
    h.reconcile().await;

    let route = h
        .server
        .calls()
        .into_iter()
        .find(|c| c.is("PATCH", "/httproutes/lobe-chat?"))
        .expect("the HTTPRoute is applied");
    assert!(owner_is_release(&route.body));
    let primary = &route.body["spec"]["rules"][0];
    assert_eq!(primary["backendRefs"][0]["name"], "lobe-chat-stable");
    assert_eq!(primary["backendRefs"][0]["weight"], 100);
    assert_eq!(primary["backendRefs"][1]["weight"], 0);
    for service in ["lobe-chat-stable", "lobe-chat-canary"] {
        assert!(
            position(&h, "PATCH", &format!("/services/{service}?")).is_some(),
            "Service {service} is applied"
        );
    }
    assert!(
        h.server
            .calls()
            .iter()
            .all(|c| !c.uri.contains("virtualservices") && !c.uri.contains("destinationrules")),
        "nothing of Istio's is written or deleted"
    );
    assert_eq!(last_status(&h).router.as_deref(), Some("gatewayAPI"));
    assert!(!event_reasons(&h).contains(&"RouterSwitched".to_string()));
}

#[tokio::test]
async fn the_router_cannot_change_under_a_running_canary() {
    let v1 = ChatRelease::test("v1");
    let v2 = through_gateway(ChatRelease::test("v2"));
    let h = running_canary(&v1, &v2, 1, t0() + minutes(1));
    h.reconcile().await;

    let status = last_status(&h);
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status
            .message
            .contains("router cannot change from istio to gatewayAPI"),
        "{}",
        status.message
    );
    assert!(
        h.server
            .writes()
            .iter()
            .all(|c| c.uri.contains("/status") || c.uri.contains("/events")),
        "no route or Deployment is written: {:?}",
        h.server.writes().iter().map(|c| &c.uri).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_stable_release_switches_router_writing_the_new_route_before_deleting_the_old() {
    let v1 = ChatRelease::test("v1");
    let release = through_gateway(v1.clone()).with_status(settled_status(&v1));
    let mut h = Harness::new(&release, t0());
    h.set_deployment(deployment(&v1, Track::Stable, 2, 2));
    h.set_deployment(deployment(&v1, Track::Canary, 0, 0));
    h.reconcile().await;

    let route = position(&h, "PATCH", "/httproutes/lobe-chat?").expect("the HTTPRoute");
    let virtual_service =
        position(&h, "DELETE", "/virtualservices/lobe-chat").expect("the VirtualService deleted");
    let destination_rule =
        position(&h, "DELETE", "/destinationrules/lobe-chat").expect("the DestinationRule deleted");
    assert!(route < virtual_service && route < destination_rule);
    let status = last_status(&h);
    assert_eq!(status.router.as_deref(), Some("gatewayAPI"));
    assert_eq!(status.phase, Phase::Stable);
    assert!(event_reasons(&h).contains(&"RouterSwitched".to_string()));
}

#[tokio::test]
async fn a_router_whose_crds_are_missing_is_named_in_status_and_a_warning_and_nothing_else_moves() {
    let release = through_gateway(ChatRelease::test("v1"));
    let h = Harness::new(&release, t0());
    h.server
        .unknown_resources
        .lock()
        .unwrap()
        .push("httproutes".into());
    h.reconcile().await;
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::Failed, "kubectl get chr shows it");
    assert!(
        status
            .message
            .contains("httproutes.gateway.networking.k8s.io"),
        "{}",
        status.message
    );
    let events = h.server.events();
    let unavailable = events
        .iter()
        .find(|e| e["reason"] == "RouterUnavailable")
        .expect("a RouterUnavailable Event");
    assert_eq!(unavailable["type"], "Warning");
    assert!(
        h.server.deployment_applies(Track::Stable).is_empty(),
        "no Deployment is written before the route can be"
    );
}

#[tokio::test]
async fn between_analyses_the_sequential_test_stops_a_canary_failing_half_its_requests() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let h = running_canary(&v1, &v2, 0, t0() + SignedDuration::from_secs(10));
    *h.metrics.observations.lock().unwrap() = crate::metrics::Observations::Sampled {
        canary: track_sample(100.0, 50.0),
        stable: track_sample(1900.0, 0.0),
    };

    h.reconcile().await;
    // It looked at the 10 s since the step began, not at a whole interval's window.
    assert_eq!(
        *h.metrics.windows.lock().unwrap(),
        [std::time::Duration::from_secs(10)]
    );
    let status = last_status(&h);
    assert_eq!(status.phase, Phase::RolledBack);
    assert!(
        status.message.contains("sequential test")
            && status
                .message
                .contains("canary error rate 50.00% over 100 requests"),
        "{}",
        status.message
    );
    assert_eq!(split(&h.server.virtual_service_writes()[0]), (100, 0));
    assert!(event_reasons(&h).contains(&"RolledBack".to_string()));
}

#[tokio::test]
async fn a_healthy_canary_is_looked_at_no_more_than_every_watch_every_and_only_the_interval_advances_it()
 {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let h = running_canary(&v1, &v2, 0, t0() + SignedDuration::from_secs(10));
    let action = h.reconcile().await;
    assert_eq!(h.metrics.windows.lock().unwrap().len(), 1, "one look");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(50)),
        "the next analysis: between analyses the bulk watch looks, and wakes it if need be"
    );
    assert!(
        h.server.status_writes().is_empty() || last_status(&h).canary_weight == 5,
        "a look never advances"
    );
    // Woken five seconds later (a Deployment changed), it is not time to look again.
    h.set_time(t0() + SignedDuration::from_secs(15));
    h.reconcile().await;
    assert_eq!(h.metrics.windows.lock().unwrap().len(), 1);
    h.set_time(t0() + SignedDuration::from_secs(20));
    h.reconcile().await;
    assert_eq!(h.metrics.windows.lock().unwrap().len(), 2);
    assert_eq!(
        h.metrics.asked_over(INTERVAL),
        0,
        "no analysis before the interval"
    );
}

#[tokio::test]
async fn the_chatrelease_is_read_again_only_when_the_cache_does_not_show_our_last_write() {
    let v1 = ChatRelease::test("v1");
    let v2 = ChatRelease::test("v2");
    let h = running_canary(&v1, &v2, 0, t0() + SignedDuration::from_secs(65));
    h.server.release.lock().unwrap().metadata.resource_version = Some("7".into());
    let reads = |h: &Harness| {
        h.server
            .calls()
            .iter()
            .filter(|c| c.is("GET", "/chatreleases/"))
            .count()
    };

    // Nothing written yet: read; the analysis's status write leaves the object at "7".
    h.reconcile().await;
    assert_eq!(reads(&h), 1);
    assert!(
        !h.server.status_writes().is_empty(),
        "the analysis wrote status"
    );

    // A cache at our own last write is current: no read.
    h.reconcile_from_cache(h.stored()).await;
    assert_eq!(reads(&h), 0);

    // A cache behind it is not.
    let mut behind = h.stored();
    behind.metadata.resource_version = Some("6".into());
    h.reconcile_from_cache(behind).await;
    assert_eq!(reads(&h), 1);
}
