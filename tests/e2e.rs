//! End-to-end tests: the operator runs as a real process against a real API server (kube-apiserver
//! 1.36 with controller-manager, scheduler and a kwok node) and a real Prometheus that scrapes the
//! mesh simulator. Each test has its own namespace, simulator and operator (see `e2e/harness.rs`).
//!
//! They are `#[ignore]`d so that `cargo test` stays fast and needs no cluster. `make e2e` builds,
//! starts the control plane, runs them and tears it down; by hand:
//!
//! ```sh
//! tests/cluster/up.sh /tmp/e2e && E2E_STATE_DIR=/tmp/e2e cargo test --test e2e -- --ignored
//! tests/cluster/down.sh /tmp/e2e
//! ```
//!
//! Every ChatRelease here uses short timings: interval and window 10s, drainTimeout 10s,
//! progressDeadline 60s, minRequests 20, errorRate max 1%, compareToStable. The simulator sends
//! 100 requests/s, so the canary serves about 50 requests per window at 5%.

// The crate root of a test is its own file, so the harness folder is named explicitly.
#[path = "e2e/harness.rs"]
mod harness;

use chatrelease::crd::{ChatRelease, Phase, Verdict};
use harness::{
    DRAIN_TIMEOUT, INTERVAL, MIN_REQUESTS, MetricsText, NAME, Needs, PROGRESS_DEADLINE, Release,
    Router, Split, StatusWatch, TestEnv, Timeline, image_of, phase, replicas_of, report, run,
    summary, weight,
};
use kube::ResourceExt;
use serde_json::json;
use std::time::{Duration, Instant};

/// The overall limit of one test.
const LIMIT: Duration = Duration::from_secs(180);
/// Tests that hold on purpose for several intervals get longer.
const LONG_LIMIT: Duration = Duration::from_secs(240);
/// From applying the first template to phase Stable (pods of a kwok node are Ready in seconds).
const STABLE_TIMEOUT: Duration = Duration::from_secs(60);
/// From a template change to weight 25: pods Ready, 5%, one interval, one passed analysis.
const TO_25: Duration = Duration::from_secs(90);
/// From a template change (or a resumption) to Succeeded: four steps of one interval each, with
/// room for an inconclusive analysis or two on a loaded machine.
const TO_SUCCEEDED: Duration = Duration::from_secs(150);
/// After Stable, two of Prometheus's 2 s scrapes: stable's start-up 503s are then history.
const STABLE_SETTLE: Duration = Duration::from_secs(4);
/// "Within one reconcile": the operator acts on an annotation as soon as it sees it.
const ONE_RECONCILE: Duration = Duration::from_secs(5);

const SIM_ERROR_RATE: &str = "SIM_ERROR_RATE";
const SIM_PROVIDER_ERROR_RATE: &str = "SIM_PROVIDER_ERROR_RATE";
/// What the judge says when stable is as bad as the canary.
const SHARED_TROUBLE: &str = "trouble both versions share";

/// A rollout test run once per router: `$istio` routes with Istio's VirtualService, `$gateway`
/// with a Gateway API HTTPRoute attached to the app's Service (GAMMA); the body is the same.
macro_rules! both_routers {
    ($body:ident, $limit:expr, $name:literal: $istio:ident, $gateway:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
        async fn $istio() {
            run($name, Needs::Operator, $limit, async |t| {
                $body(t, Router::Istio).await
            })
            .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
        async fn $gateway() {
            run(concat!("gw-", $name), Needs::Operator, $limit, async |t| {
                $body(t, Router::GatewayApi).await
            })
            .await;
        }
    };
}

/// Applies `release` and waits until it is the stable version with all traffic.
async fn stable_at(t: &TestEnv, release: &Release) -> ChatRelease {
    t.apply(release).await;
    let stable = t.wait_phase(Phase::Stable, STABLE_TIMEOUT).await;
    // Until its pods were Ready the route to stable answered 503s; two scrapes later they are
    // out of the window of a canary started now.
    tokio::time::sleep(STABLE_SETTLE).await;
    let status = stable.status.clone().unwrap_or_default();
    assert_eq!(status.stable_image.as_deref(), Some(release.image.as_str()));
    assert_eq!(status.canary_weight, 0);
    assert_eq!(t.split().await, Some(Split::ALL_STABLE));
    stable
}

/// Waits until the timeline's watches have seen what a poll sees now (a watch event may trail
/// the poll that ended a wait), so that assertions on the timeline include the final state.
async fn caught_up(t: &TestEnv, timeline: &Timeline) {
    let split = t.split().await;
    let release = t.release().await;
    let want = (phase(&release), weight(&release));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen_split = timeline.splits().last().map(|(_, s)| *s);
        let seen_status = timeline
            .statuses()
            .last()
            .map(|s| (Some(s.phase), s.weight));
        if seen_split == split && seen_status == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the watches never saw the VirtualService at {split:?} and the status at {want:?}:\n{}",
            timeline.describe()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Canary weights of a rollout that only ever moved forward: up the steps, then back to 0 once
/// stable runs the promoted version.
const FULL_ROLLOUT: [i32; 6] = [0, 5, 25, 50, 100, 0];

/// The canary went up every step and was promoted, without a rollback or a step back.
fn assert_full_rollout(timeline: &Timeline) {
    assert_eq!(
        timeline.canary_weights(),
        FULL_ROLLOUT,
        "{}",
        timeline.describe()
    );
    assert!(
        !timeline.phases().contains(&Phase::RolledBack),
        "{}",
        timeline.describe()
    );
}

fn has_event(events: &[k8s_openapi::api::events::v1::Event], reason: &str) -> bool {
    events.iter().any(|e| e.reason.as_deref() == Some(reason))
}

// ----- (a) -------------------------------------------------------------------------------------

both_routers!(good_canary, LIMIT, "good-canary":
    a_good_canary_goes_5_25_50_100_and_stable_then_runs_it,
    gw_a_good_canary_goes_5_25_50_100_through_an_httproute);

async fn good_canary(t: &TestEnv, router: Router) {
    stable_at(t, &Release::version_routed(router, "v1")).await;
    let timeline = t.timeline().await;
    t.apply(&Release::version_routed(router, "v2")).await;

    let done = t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
    t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
    caught_up(t, &timeline).await;
    assert_full_rollout(&timeline);
    let status = done.status.unwrap_or_default();
    assert_eq!(status.stable_image.as_deref(), Some("lobehub/lobe-chat:v2"));
    assert_eq!(status.canary_weight, 0);

    // Each step was earned by a passed analysis on enough canary traffic.
    let passed: Vec<_> = timeline
        .analyses()
        .into_iter()
        .filter(|a| a.verdict == Verdict::Pass)
        .collect();
    let weights: Vec<i32> = passed.iter().map(|a| a.weight).collect();
    assert_eq!(weights, [5, 25, 50, 100], "{}", timeline.describe());
    report(&format!(
        "{}: canary requests per analysis window at 5/25/50/100%: {:?}",
        t.test,
        passed
            .iter()
            .map(|a| a.canary_requests.unwrap_or(0.0))
            .collect::<Vec<_>>()
    ));
    for a in &passed {
        assert!(
            a.canary_requests.unwrap_or(0.0) >= MIN_REQUESTS as f64,
            "{a:?}"
        );
    }

    let stable = t
        .wait_deployment("stable", "2 Ready pods of v2", ONE_RECONCILE, |d| {
            image_of(d).as_deref() == Some("lobehub/lobe-chat:v2") && replicas_of(d) == (2, 2)
        })
        .await;
    assert_eq!(replicas_of(&stable), (2, 2));
    // What the API server stores of a template the operator applied is no hand edit.
    assert!(
        !has_event(&t.events().await, "PodTemplateRestored"),
        "an untouched template was taken for a hand edit"
    );
}

// ----- (b), (c) --------------------------------------------------------------------------------

/// A canary whose pods answer `variable`=0.3 of requests with errors is rolled back while at 5%:
/// all traffic back on stable in one write, canary pods kept for drainTimeout, then scaled to 0.
async fn a_failing_canary_is_rolled_back(t: &TestEnv, router: Router, variable: &str) {
    stable_at(t, &Release::version_routed(router, "v1")).await;
    let timeline = t.timeline().await;
    let live_view = t.watch_status(&[]);
    let live_lines = t.watch_status(&["--timeline"]);
    t.apply(&Release::version_routed(router, "v2").env(variable, "0.3"))
        .await;

    let rolled_back = t
        .wait_phase(Phase::RolledBack, Duration::from_secs(120))
        .await;
    let rolled_back_at = Instant::now();
    // A rollback is recorded in status first (so a failed write cannot lose it), then written
    // to the VirtualService in the same reconcile.
    t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
    caught_up(t, &timeline).await;
    assert_eq!(
        timeline.canary_weights(),
        [0, 5, 0],
        "the bad canary must never get past 5%:\n{}",
        timeline.describe()
    );

    let status = rolled_back.status.clone().unwrap_or_default();
    let analysis = status.last_analysis.clone().expect("a last analysis");
    assert_eq!(analysis.verdict, Verdict::Fail, "{}", summary(&rolled_back));
    let errors = analysis
        .checks
        .iter()
        .find(|c| c.name == "error-rate")
        .expect("an error-rate check");
    // Stable may carry a few 503s of its own from the seconds before its pods were Ready (the
    // route went to it from the start): the canary's rate is still many times its.
    let canary_rate = errors.canary.unwrap_or(0.0);
    assert!(
        canary_rate > 10.0 && errors.stable.unwrap_or(100.0) < canary_rate / 4.0,
        "the canary's error rate is the one that failed: {errors:?}"
    );
    assert_eq!(status.stable_image.as_deref(), Some("lobehub/lobe-chat:v1"));
    t.wait_event("RolledBack", ONE_RECONCILE).await;

    let Some(held) = timeline.time_at_weight() else {
        panic!(
            "the timeline missed the weight or its withdrawal:\n{}",
            timeline.describe()
        );
    };
    report(&format!(
        "{}: bad canary ({variable}=0.3) had weight for {:.1}s before the route was 100% stable",
        t.test,
        held.as_secs_f64()
    ));
    // failureLimit (2) analyses an interval apart, plus a reconcile and a scrape or two.
    let bound = INTERVAL * 2 + Duration::from_secs(15);
    assert!(
        held <= bound,
        "the bad canary held weight for {held:?}, over {bound:?}:\n{}",
        timeline.describe()
    );

    // Streaming chats finish: the canary keeps its pods for drainTimeout, then goes to 0.
    let canary = t.deployment("canary").await.expect("canary Deployment");
    assert_eq!(
        replicas_of(&canary).0,
        2,
        "canary pods must stay while they drain"
    );
    t.wait_deployment(
        "canary",
        "0 replicas",
        DRAIN_TIMEOUT + Duration::from_secs(30),
        |d| replicas_of(d).0 == 0,
    )
    .await;
    let drained_after = rolled_back_at.elapsed();
    assert!(
        drained_after + Duration::from_secs(2) >= DRAIN_TIMEOUT,
        "canary scaled to 0 after only {drained_after:?}"
    );
    assert!(
        drained_after <= DRAIN_TIMEOUT + Duration::from_secs(10),
        "canary pods kept {drained_after:?}, well past drainTimeout {DRAIN_TIMEOUT:?}"
    );
    let stable = t.deployment("stable").await.expect("stable Deployment");
    assert_eq!(image_of(&stable).as_deref(), Some("lobehub/lobe-chat:v1"));
    assert_eq!(replicas_of(&stable), (2, 2));

    // The person watching saw it happen, and Ctrl-C ends the watch cleanly.
    t.wait_event("CanaryDrained", ONE_RECONCILE).await;
    // An Event reaches the watch a moment after it is stored.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_watched_the_rollback(live_view, live_lines).await;
}

/// What `status --watch` showed through a rollout rolled back at 5%: a redraw per change (the
/// frames, `---` apart when not on a terminal), and at the end the RolledBack phase, the failed
/// analysis as a table and the Events up to the drain. `--timeline`: one line per change.
async fn assert_watched_the_rollback(live_view: StatusWatch, live_lines: StatusWatch) {
    let (exit, printed) = live_view.interrupt().await;
    assert!(
        exit.is_some_and(|e| e.success()),
        "status --watch must end with status 0 on Ctrl-C, got {exit:?}:\n{printed}"
    );
    let frames: Vec<&str> = printed.split("\n---\n").collect();
    assert!(
        frames
            .iter()
            .any(|f| f.contains("Phase     Progressing") && f.contains("1/4 at 5%")),
        "no frame at step 1/4, 5%:\n{printed}"
    );
    let last = frames.last().copied().unwrap_or_default();
    for shown in [
        "Phase     RolledBack",
        "CHECK",
        "VERDICT",
        "error-rate",
        "Recent events",
    ] {
        assert!(
            last.contains(shown),
            "the last frame lacks {shown:?}:\n{last}"
        );
    }
    let events = last.split("Recent events").nth(1).unwrap_or_default();
    for reason in ["CanaryStarted", "Advanced", "RolledBack", "CanaryDrained"] {
        assert!(
            events.contains(reason),
            "no {reason} Event in the last frame:\n{last}"
        );
    }
    report(&format!(
        "status --watch redrew {} times through the rollback",
        frames.len()
    ));

    let (exit, printed) = live_lines.interrupt().await;
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}:\n{printed}");
    // Each line: time, phase, weight, then what changed.
    let phase_and_weight: Vec<(&str, &str)> = printed
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip(1);
            Some((words.next()?, words.next()?))
        })
        .collect();
    assert!(
        phase_and_weight.contains(&("Progressing", "5%")),
        "no line at 5%:\n{printed}"
    );
    assert_eq!(
        phase_and_weight.last(),
        Some(&("RolledBack", "0%")),
        "the last line is the rollback:\n{printed}"
    );
}

async fn canary_answering_5xx(t: &TestEnv, router: Router) {
    a_failing_canary_is_rolled_back(t, router, SIM_ERROR_RATE).await
}

async fn canary_with_provider_errors(t: &TestEnv, router: Router) {
    a_failing_canary_is_rolled_back(t, router, SIM_PROVIDER_ERROR_RATE).await
}

both_routers!(canary_answering_5xx, LIMIT, "canary-5xx":
    b_a_canary_answering_5xx_is_rolled_back_and_drained,
    gw_b_a_canary_answering_5xx_is_rolled_back_in_one_httproute_write);

both_routers!(canary_with_provider_errors, LIMIT, "canary-47x":
    c_a_canary_with_provider_errors_47x_is_rolled_back,
    gw_c_a_canary_with_provider_errors_47x_is_rolled_back_through_an_httproute);

// ----- (d) -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn d_a_provider_outage_on_both_tracks_holds_without_rollback_then_goes_on() {
    run("provider-outage", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        t.start_provider_outage("0.3").await;
        let timeline = t.timeline().await;
        // Under a shared outage each analysis is a fair coin for the one-sided z-test at 95%: 5%
        // of them fail by chance, and failures add up across inconclusive analyses. failureLimit
        // 3 keeps a chance rollback in this test's ~5 outage analyses near 0.1% (2 would be ~2%).
        t.apply(&Release::version("v2").failure_limit(3)).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        let at_5 = Instant::now();

        // Hold at 5% through at least three intervals, each analysis blaming shared trouble.
        let shared = || {
            timeline
                .analyses()
                .iter()
                .filter(|a| {
                    a.verdict == Verdict::Inconclusive
                        && a.weight == 5
                        && a.checks.iter().any(|c| c.note.contains(SHARED_TROUBLE))
                })
                .count()
        };
        t.holds_until(
            "weight 5 and Progressing during the outage",
            INTERVAL * 3,
            Duration::from_secs(90),
            |r| weight(r) == 5 && phase(r) == Some(Phase::Progressing),
            || match shared() {
                n if n >= 3 => Ok(()),
                n => Err(format!(
                    "only {n} analyses blamed shared trouble:\n{}",
                    timeline.describe()
                )),
            },
        )
        .await;
        assert!(
            timeline
                .statuses()
                .iter()
                .any(|s| s.message.contains(SHARED_TROUBLE)),
            "status.message must say the trouble is shared:\n{}",
            timeline.describe()
        );
        report(&format!(
            "{}: held at 5% for {:.1}s of provider outage",
            t.test,
            at_5.elapsed().as_secs_f64()
        ));

        t.end_provider_outage().await;
        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
        caught_up(t, &timeline).await;
        assert_full_rollout(&timeline);
    })
    .await;
}

// ----- (e) -------------------------------------------------------------------------------------

both_routers!(rollback_annotation, LIMIT, "rollback-annotation":
    e_the_rollback_annotation_moves_all_traffic_to_stable_in_one_reconcile,
    gw_e_the_rollback_annotation_is_one_httproute_write);

async fn rollback_annotation(t: &TestEnv, router: Router) {
    stable_at(t, &Release::version_routed(router, "v1")).await;
    let timeline = t.timeline().await;
    t.apply(&Release::version_routed(router, "v2")).await;
    t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;

    t.annotate("chatrelease.io/rollback", Some("true")).await;
    let took = t
        .wait_split(Split::ALL_STABLE, Duration::from_secs(15))
        .await;
    report(&format!(
        "{}: VirtualService at 100% stable {:.2}s after the annotation",
        t.test,
        took.as_secs_f64()
    ));
    assert!(took <= ONE_RECONCILE, "took {took:?}");

    let r = t
        .wait_for(
            "phase RolledBack with the annotation removed",
            ONE_RECONCILE,
            |r| {
                phase(r) == Some(Phase::RolledBack)
                    && !r.annotations().contains_key("chatrelease.io/rollback")
            },
        )
        .await;
    assert_eq!(weight(&r), 0);
    caught_up(t, &timeline).await;
    assert_eq!(
        timeline.canary_weights(),
        [0, 5, 25, 0],
        "{}",
        timeline.describe()
    );
    t.wait_event("RolledBack", ONE_RECONCILE).await;
}

// ----- (f) -------------------------------------------------------------------------------------

both_routers!(manual_gate, LIMIT, "manual-gate":
    f_a_manual_gate_waits_at_25_until_kubectl_chatrelease_promote,
    gw_f_a_manual_gate_waits_at_25_on_the_httproute);

async fn manual_gate(t: &TestEnv, router: Router) {
    stable_at(t, &Release::version_routed(router, "v1")).await;
    let timeline = t.timeline().await;
    t.apply(&Release::version_routed(router, "v2").manual_gates(&[50]))
        .await;

    let waiting = t
        .wait_for("Paused at 25", TO_25, |r| {
            phase(r) == Some(Phase::Paused) && weight(r) == 25
        })
        .await;
    let message = waiting.status.clone().unwrap_or_default().message;
    assert!(message.contains("manual gate"), "{message}");
    // Through at least one more analysis, it keeps waiting.
    t.holds("Paused at 25", INTERVAL + Duration::from_secs(3), |r| {
        phase(r) == Some(Phase::Paused) && weight(r) == 25
    })
    .await;
    assert_eq!(
        t.split().await,
        Some(Split {
            stable: 75,
            canary: 25
        })
    );

    let out = t.kubectl_chatrelease(&["promote", NAME]).await;
    assert!(
        out.status.success(),
        "kubectl-chatrelease promote failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    t.wait_for("weight 50 after promote", ONE_RECONCILE, |r| {
        weight(r) == 50
    })
    .await;
    t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
    let r = t.release().await;
    assert!(!r.annotations().contains_key("chatrelease.io/promote"));
    caught_up(t, &timeline).await;
    assert_eq!(
        timeline.canary_weights(),
        FULL_ROLLOUT,
        "{}",
        timeline.describe()
    );
    assert!(has_event(&t.events().await, "WaitingAtGate"));
}

// ----- (g) -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn g_invalid_chatreleases_are_rejected_by_the_api_server_naming_the_field() {
    run("invalid-specs", Needs::Namespace, LIMIT, async |t| {
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit, &str, &str); 38] = [
            (
                "steps not ascending",
                |m| m["spec"]["strategy"]["steps"] = json!([25, 5, 100]),
                "spec.strategy.steps",
                "strictly ascending",
            ),
            (
                "a step over 100",
                |m| m["spec"]["strategy"]["steps"] = json!([5, 50, 120]),
                "spec.strategy.steps",
                "from 1 to 100",
            ),
            (
                "a last step under 100",
                |m| m["spec"]["strategy"]["steps"] = json!([5, 50]),
                "spec.strategy.steps",
                "must be 100",
            ),
            (
                "a gate that is no step",
                |m| m["spec"]["strategy"]["manualGates"] = json!([75]),
                "spec.strategy",
                "must be one of strategy.steps",
            ),
            (
                "no containers",
                |m| m["spec"]["template"]["spec"]["containers"] = json!([]),
                "spec.template",
                "at least one container",
            ),
            (
                "a bad duration",
                |m| m["spec"]["strategy"]["interval"] = json!("10 seconds"),
                "spec.strategy.interval",
                "must be a duration",
            ),
            (
                "a duration that overflowed the parser",
                |m| m["spec"]["strategy"]["interval"] = json!("99999999999999999999h"),
                "spec.strategy.interval",
                "Too long",
            ),
            (
                "an interval over a day",
                |m| m["spec"]["strategy"]["interval"] = json!("100000h"),
                "spec.strategy.interval",
                "from 1s to 24h",
            ),
            (
                "an interval of 0s",
                |m| m["spec"]["strategy"]["interval"] = json!("0s"),
                "spec.strategy.interval",
                "from 1s to 24h",
            ),
            (
                "a progressDeadline of 0s",
                |m| m["spec"]["strategy"]["progressDeadline"] = json!("0s"),
                "spec.strategy.progressDeadline",
                "from 30s to 24h",
            ),
            (
                "a drainTimeout over a day",
                |m| m["spec"]["strategy"]["drainTimeout"] = json!("25h"),
                "spec.strategy.drainTimeout",
                "from 0s to 24h",
            ),
            (
                "a window over a day",
                |m| m["spec"]["analysis"]["window"] = json!("1440m1s"),
                "spec.analysis.window",
                "from 1s to 24h",
            ),
            (
                "a latency bound over an hour",
                |m| m["spec"]["analysis"]["latencyP99"] = json!({"max": "2h"}),
                "spec.analysis.latencyP99.max",
                "from 1ms to 1h",
            ),
            (
                "an error rate over 100%",
                |m| m["spec"]["analysis"]["errorRate"]["max"] = json!("150%"),
                "spec.analysis.errorRate.max",
                "percentage from 0% to 100%",
            ),
            (
                "no failures allowed",
                |m| m["spec"]["analysis"]["failureLimit"] = json!(0),
                "spec.analysis.failureLimit",
                "",
            ),
            (
                "a failureLimit out of reach",
                |m| m["spec"]["analysis"]["failureLimit"] = json!(1000),
                "spec.analysis.failureLimit",
                "",
            ),
            (
                "a minRequests out of reach",
                |m| m["spec"]["analysis"]["minRequests"] = json!(10_000_000_000i64),
                "spec.analysis.minRequests",
                "",
            ),
            (
                "a Prometheus address that is no URL",
                |m| m["spec"]["analysis"]["prometheus"] = json!({"address": "prometheus:9090"}),
                "spec.analysis.prometheus.address",
                "must start with http",
            ),
            (
                "an error-code regex that counts every request",
                |m| m["spec"]["analysis"]["errorRate"] = json!({"codes": "..."}),
                "spec.analysis.errorRate.codes",
                "must not match 200",
            ),
            (
                "an error-code regex that does not compile",
                |m| m["spec"]["analysis"]["errorRate"] = json!({"codes": "5..|(47."}),
                "spec.analysis.errorRate.codes",
                "must be an RE2 regex",
            ),
            (
                "a metrics source the operator does not know",
                |m| m["spec"]["analysis"]["source"] = json!("linkerd"),
                "spec.analysis.source",
                "istio-waypoint",
            ),
            (
                "a custom metric without a bound",
                |m| {
                    m["spec"]["analysis"]["metrics"] =
                        json!([{"name": "ttft", "query": "vector(1)"}])
                },
                "spec.analysis.metrics[0]",
                "needs max, min, maxIncrease or maxDecrease",
            ),
            (
                "a custom metric allowed to grow over 1000% of stable",
                |m| {
                    m["spec"]["analysis"]["metrics"] =
                        json!([{"name": "tokens", "query": "vector(1)", "maxIncrease": "1500%"}])
                },
                "spec.analysis.metrics[0].maxIncrease",
                "from 0% to 1000%",
            ),
            (
                "a custom metric allowed to fall over 100% below stable",
                |m| {
                    m["spec"]["analysis"]["metrics"] =
                        json!([{"name": "tokens", "query": "vector(1)", "maxDecrease": "150%"}])
                },
                "spec.analysis.metrics[0].maxDecrease",
                "from 0% to 100%",
            ),
            (
                "a metric with both PromQL and a built-in check",
                |m| {
                    m["spec"]["analysis"]["metrics"] = json!([
                        {"name": "ttft", "query": "vector(1)", "check": "ttft-p99", "max": 1.5}])
                },
                "spec.analysis.metrics[0]",
                "exactly one of query (your PromQL) and check",
            ),
            (
                "a metric with neither PromQL nor a check",
                |m| m["spec"]["analysis"]["metrics"] = json!([{"name": "ttft", "max": 1.5}]),
                "spec.analysis.metrics[0]",
                "exactly one of query (your PromQL) and check",
            ),
            (
                "PromQL without a name",
                |m| m["spec"]["analysis"]["metrics"] = json!([{"query": "vector(1)", "max": 1}]),
                "spec.analysis.metrics[0]",
                "name is required with a query",
            ),
            (
                "a flavor beside PromQL",
                |m| {
                    m["spec"]["analysis"]["metrics"] = json!([
                        {"name": "ttft", "query": "vector(1)", "flavor": "vllm", "max": 1.5}])
                },
                "spec.analysis.metrics[0]",
                "flavor goes with check",
            ),
            (
                "a check the operator does not know",
                |m| {
                    m["spec"]["analysis"]["metrics"] = json!([{"check": "ttft-p98", "max": 1.5}])
                },
                "spec.analysis.metrics[0].check",
                "ttft-p99",
            ),
            (
                "two unnamed checks of one kind",
                |m| {
                    m["spec"]["analysis"]["metrics"] = json!([
                        {"check": "ttft-p99", "max": 1.5},
                        {"check": "ttft-p99", "flavor": "vllm", "max": 2}])
                },
                "spec.analysis.metrics",
                "names must be unique",
            ),
            (
                "a latency bound without max or maxIncrease",
                |m| m["spec"]["analysis"]["latencyP99"] = json!({}),
                "spec.analysis.latencyP99",
                "needs max, maxIncrease or both",
            ),
            (
                "a sticky cookie name with a space",
                |m| m["spec"]["traffic"] = json!({"stickyCookie": "chat version"}),
                "spec.traffic.stickyCookie",
                "cookie name",
            ),
            (
                "both routers",
                |m| {
                    m["spec"]["traffic"] = json!({
                        "istio": {"hosts": ["chat.example.com"]},
                        "gatewayAPI": {"parentRefs": [{"name": "public"}]},
                    })
                },
                "spec.traffic",
                "set one of them",
            ),
            (
                "a Gateway API route attached to nothing",
                |m| m["spec"]["traffic"] = json!({"gatewayAPI": {"parentRefs": []}}),
                "spec.traffic.gatewayAPI.parentRefs",
                "at least 1",
            ),
            (
                "a hostname with a port",
                |m| {
                    m["spec"]["traffic"] = json!({"gatewayAPI": {
                        "parentRefs": [{"name": "public"}], "hostnames": ["chat.example.com:443"]}})
                },
                "spec.traffic.gatewayAPI.hostnames[0]",
                "lower-case DNS name",
            ),
            (
                "a JWT claim route through the Gateway API",
                |m| {
                    m["spec"]["traffic"] = json!({
                        "gatewayAPI": {"parentRefs": [{"name": "public"}]},
                        "canaryMatch": [{"headers": {"@request.auth.claims.group": {"exact": "beta"}}}],
                    })
                },
                "spec.traffic",
                "Istio's alone",
            ),
            (
                "a relative path through the Gateway API",
                |m| {
                    m["spec"]["traffic"] = json!({
                        "gatewayAPI": {"parentRefs": [{"name": "public"}]},
                        "canaryMatch": [{"uri": {"prefix": "beta"}}],
                    })
                },
                "spec.traffic",
                "must start with \"/\"",
            ),
            (
                "a path regex tester route through the Gateway API",
                |m| {
                    m["spec"]["traffic"] = json!({
                        "gatewayAPI": {"parentRefs": [{"name": "public"}]},
                        "canaryMatch": [{"uri": {"regex": "/beta/.*"}}],
                    })
                },
                "spec.traffic",
                "never match",
            ),
        ];
        for (case, edit, field, says) in cases {
            let mut manifest = Release::version("v1").manifest();
            edit(&mut manifest);
            match t.try_apply(manifest).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{case}: {status:?}");
                    assert!(
                        status.message.contains(field) && status.message.contains(says),
                        "{case}: the message should name {field} and say {says:?}: {}",
                        status.message
                    );
                }
                other => panic!("{case}: expected the API server to refuse it, got {other:?}"),
            }
        }
        let stored = t
            .releases()
            .list(&Default::default())
            .await
            .expect("listing ChatReleases");
        assert!(stored.items.is_empty(), "a refused ChatRelease was stored");
        // The same manifest without the mistakes is accepted: the refusals were the fields'.
        t.apply(&Release::version("v1")).await;
    })
    .await;
}

// ----- (h) -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn h_an_operator_killed_mid_rollout_carries_on_from_status_without_going_back() {
    run("operator-restart", Needs::Operator, LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let timeline = t.timeline().await;
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;

        t.kill_operator();
        // Down past the moment the next analysis was due; nothing moves meanwhile.
        tokio::time::sleep(INTERVAL + Duration::from_secs(2)).await;
        assert_eq!(
            t.split().await,
            Some(Split {
                stable: 75,
                canary: 25
            })
        );
        t.start_operator();

        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        caught_up(t, &timeline).await;
        assert_eq!(
            timeline.canary_weights(),
            FULL_ROLLOUT,
            "the VirtualService weight moved the wrong way:\n{}",
            timeline.describe()
        );
        assert_eq!(
            timeline.status_weights(),
            FULL_ROLLOUT,
            "status.canaryWeight moved the wrong way:\n{}",
            timeline.describe()
        );
        assert!(
            !timeline.phases().contains(&Phase::RolledBack),
            "{}",
            timeline.describe()
        );
        // The restarted operator took up the running canary; it did not start it over.
        let started: Vec<_> = t
            .events()
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("CanaryStarted"))
            .collect();
        assert_eq!(started.len(), 1, "{started:?}");
    })
    .await;
}

// ----- (i) -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn i_prometheus_down_mid_rollout_holds_and_the_rollout_goes_on_when_it_is_back() {
    run(
        "prometheus-outage",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            let prometheus = t.start_own_prometheus().await;
            let v1 = Release::version("v1").prometheus(&prometheus);
            stable_at(t, &v1).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2").prometheus(&prometheus))
                .await;
            // Weight 25 needed a passed analysis: the operator reads this test's Prometheus.
            t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;

            t.stop_own_prometheus().await;
            let stopped = Instant::now();
            let unavailable = |r: &ChatRelease| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.message.contains("metrics unavailable"))
            };
            t.wait_for(
                "a message that metrics are unavailable",
                INTERVAL + Duration::from_secs(10),
                unavailable,
            )
            .await;
            // Hold at 25% for at least two intervals, every analysis meanwhile unavailable.
            let down_analyses = || {
                timeline
                    .analyses()
                    .iter()
                    .filter(|a| a.reason.contains("metrics unavailable"))
                    .count()
            };
            t.holds_until(
                "weight 25, Progressing, metrics unavailable",
                (INTERVAL * 2).saturating_sub(stopped.elapsed()),
                INTERVAL * 4,
                |r| weight(r) == 25 && phase(r) == Some(Phase::Progressing) && unavailable(r),
                || match down_analyses() {
                    n if n >= 2 => Ok(()),
                    n => Err(format!(
                        "{n} analyses without metrics:\n{}",
                        timeline.describe()
                    )),
                },
            )
            .await;
            let down_analyses = down_analyses();
            report(&format!(
                "{}: held at 25% for {:.1}s without Prometheus ({down_analyses} analyses)",
                t.test,
                stopped.elapsed().as_secs_f64()
            ));

            t.restart_own_prometheus().await;
            t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
            caught_up(t, &timeline).await;
            assert_full_rollout(&timeline);
        },
    )
    .await;
}

// ----- (j), (k): checks beyond the error rate ---------------------------------------------------

/// The time-to-first-token check of the design's example: the chat app's own histogram.
const TTFT_QUERY: &str = r#"histogram_quantile(0.99, sum by (le) (rate(chat_time_to_first_token_seconds_bucket{namespace="{{namespace}}", workload="{{workload}}"}[{{window}}])))"#;

/// `bad` breaches the check `check` that `good` keeps: it is rolled back at 5%, and the last
/// analysis names that check as the one that failed, with the canary's and stable's values.
async fn a_canary_failing_a_check_is_rolled_back(
    t: &TestEnv,
    good: Release,
    bad: Release,
    check: &str,
) {
    stable_at(t, &good).await;
    let timeline = t.timeline().await;
    t.apply(&bad).await;
    let rolled_back = t
        .wait_phase(Phase::RolledBack, Duration::from_secs(120))
        .await;
    t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
    caught_up(t, &timeline).await;
    assert_eq!(
        timeline.canary_weights(),
        [0, 5, 0],
        "the bad canary must never get past 5%:\n{}",
        timeline.describe()
    );
    let analysis = rolled_back
        .status
        .clone()
        .unwrap_or_default()
        .last_analysis
        .expect("a last analysis");
    assert_eq!(analysis.verdict, Verdict::Fail, "{}", summary(&rolled_back));
    let failed: Vec<&str> = analysis
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(failed, [check], "{analysis:?}");
    let record = analysis
        .checks
        .iter()
        .find(|c| c.name == check)
        .expect("the check");
    let (canary, stable) = (
        record.canary.expect("a canary value"),
        record.stable.expect("a stable value"),
    );
    assert!(
        canary > 1.2 * stable,
        "the canary ({canary}) is the worse one, stable {stable}: {record:?}"
    );
    report(&format!(
        "{}: {check} canary {canary}{} stable {stable}{} bound {}",
        t.test, record.unit, record.unit, record.bound
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn j_a_canary_breaching_p99_latency_is_rolled_back() {
    run("p99-latency", Needs::Operator, LIMIT, async |t| {
        let good = Release::version("v1").latency_p99("1s");
        let slow = Release::version("v2")
            .latency_p99("1s")
            .env("SIM_LATENCY_MS", "2500");
        a_canary_failing_a_check_is_rolled_back(t, good, slow, "latency-p99").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn k_a_canary_breaching_a_custom_time_to_first_token_check_is_rolled_back() {
    run("custom-ttft", Needs::Operator, LIMIT, async |t| {
        let good = Release::version("v1").metric("ttft-p99", TTFT_QUERY, 1.5);
        let slow = Release::version("v2")
            .metric("ttft-p99", TTFT_QUERY, 1.5)
            .env("SIM_TTFT_SECONDS", "4");
        a_canary_failing_a_check_is_rolled_back(t, good, slow, "ttft-p99").await;
    })
    .await;
}

// ----- (zf), (zg): built-in checks, no PromQL written ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zf_a_canary_whose_time_to_first_token_regresses_is_rolled_back_by_the_built_in_check() {
    run("builtin-ttft", Needs::Operator, LIMIT, async |t| {
        let release = |tag| Release::version(tag).check(json!({"check": "ttft-p99", "max": 1.5}));
        let slow = release("v2").env("SIM_TTFT_SECONDS", "4");
        assert!(
            slow.manifest()["spec"]["analysis"]["metrics"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m.get("query").is_none())),
            "no PromQL is written"
        );
        a_canary_failing_a_check_is_rolled_back(t, release("v1"), slow, "ttft-p99").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zg_a_canary_whose_answers_grow_half_longer_is_rolled_back_by_a_relative_bound_alone() {
    run("builtin-tokens", Needs::Operator, LIMIT, async |t| {
        let release = |tag| {
            Release::version(tag)
                .latency_p99("1s")
                .check(json!({"check": "output-tokens-per-request", "maxIncrease": "30%"}))
        };
        // The simulator's default is 300 tokens an answer.
        let verbose = release("v2").env("SIM_OUTPUT_TOKENS", "450");
        a_canary_failing_a_check_is_rolled_back(
            t,
            release("v1"),
            verbose,
            "output-tokens-per-request",
        )
        .await;
        // Its errors and latency were fine all along: only the relative bound failed, and the
        // status says what stable's value made of it.
        let analysis = t
            .release()
            .await
            .status
            .unwrap_or_default()
            .last_analysis
            .expect("a last analysis");
        for fine in ["error-rate", "latency-p99"] {
            let check = analysis
                .checks
                .iter()
                .find(|c| c.name == fine)
                .unwrap_or_else(|| panic!("no {fine} in {analysis:?}"));
            assert_eq!(check.verdict, Verdict::Pass, "{check:?}");
        }
        let tokens = analysis
            .checks
            .iter()
            .find(|c| c.name == "output-tokens-per-request")
            .expect("the tokens check");
        assert!(tokens.bound.contains("stable × 1.30"), "{tokens:?}");
    })
    .await;
}

// ----- (zb), (zc), (zh): other metric sources -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zb_an_otel_source_canary_is_judged_from_the_apps_histogram_and_promoted() {
    run("otel-source", Needs::Operator, LIMIT, async |t| {
        let release = |tag| Release::version(tag).source("otel").latency_p99("1s");
        stable_at(t, &release("v1")).await;
        let timeline = t.timeline().await;
        t.apply(&release("v2")).await;
        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
        caught_up(t, &timeline).await;
        assert_full_rollout(&timeline);
        let passed: Vec<_> = timeline
            .analyses()
            .into_iter()
            .filter(|a| a.verdict == Verdict::Pass)
            .collect();
        assert_eq!(
            passed.iter().map(|a| a.weight).collect::<Vec<_>>(),
            [5, 25, 50, 100],
            "{}",
            timeline.describe()
        );
        for a in &passed {
            assert!(
                a.canary_requests.unwrap_or(0.0) >= MIN_REQUESTS as f64,
                "{a:?}"
            );
            // The histogram is in seconds; the check reads milliseconds (the simulator's
            // median is 200 ms): read as seconds it would be under 1.
            let p99 = a
                .checks
                .iter()
                .find(|c| c.name == "latency-p99")
                .and_then(|c| c.canary)
                .expect("a canary P99");
            assert!((100.0..1000.0).contains(&p99), "P99 {p99} ms: {a:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zh_an_otel_source_canary_answering_5xx_is_rolled_back() {
    run("otel-source-5xx", Needs::Operator, LIMIT, async |t| {
        a_canary_answering_5xx_is_rolled_back_by_its_source(t, "otel").await;
    })
    .await;
}

/// A canary of a ChatRelease reading `analysis.source` that answers 30% 5xx fails error-rate.
async fn a_canary_answering_5xx_is_rolled_back_by_its_source(t: &TestEnv, source: &str) {
    let good = Release::version("v1").source(source);
    let bad = Release::version("v2")
        .source(source)
        .env(SIM_ERROR_RATE, "0.3");
    a_canary_failing_a_check_is_rolled_back(t, good, bad, "error-rate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zc_an_istio_waypoint_source_canary_answering_5xx_is_rolled_back() {
    run("waypoint-source", Needs::Operator, LIMIT, async |t| {
        a_canary_answering_5xx_is_rolled_back_by_its_source(t, "istio-waypoint").await;
    })
    .await;
}

// ----- (l): canary pods that stop being Ready ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn l_a_canary_whose_pods_stop_being_ready_loses_its_weight_until_they_are_back() {
    run("canary-unready", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let timeline = t.timeline().await;
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;

        t.set_pods_ready("canary", false).await;
        let withdrawn_in = t.wait_split(Split::ALL_STABLE, ONE_RECONCILE * 2).await;
        // The routes are written first when traffic leaves the canary; status follows them.
        t.wait_for("status at weight 0, Progressing", ONE_RECONCILE, |r| {
            (phase(r), weight(r)) == (Some(Phase::Progressing), 0)
        })
        .await;
        t.wait_event("CanaryNotReady", ONE_RECONCILE).await;
        report(&format!(
            "{}: weight withdrawn {:.1}s after the canary pods stopped being Ready",
            t.test,
            withdrawn_in.as_secs_f64()
        ));
        // No traffic, no analysis, and no rollback before progressDeadline.
        t.holds("weight 0 and Progressing", INTERVAL * 2, |r| {
            weight(r) == 0 && phase(r) == Some(Phase::Progressing)
        })
        .await;

        t.set_pods_ready("canary", true).await;
        t.wait_split(
            Split {
                stable: 95,
                canary: 5,
            },
            ONE_RECONCILE * 2,
        )
        .await;
        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
        caught_up(t, &timeline).await;
        assert_eq!(
            timeline.canary_weights(),
            [0, 5, 0, 5, 25, 50, 100, 0],
            "{}",
            timeline.describe()
        );
    })
    .await;
}

// ----- (m): hand edits of what the operator owns ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn m_a_virtualservice_or_deployment_edited_by_hand_is_put_back() {
    use chatrelease::router::istio::{PRIMARY_ROUTE, VirtualService};
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    run("hand-edits", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;

        // Someone sets the split to 50/50 with kubectl edit.
        let services = Api::<VirtualService>::namespaced(t.client.clone(), &t.namespace);
        let mut vs = services.get(NAME).await.expect("the VirtualService");
        for route in vs.spec.http.iter_mut().filter(|r| r.name == PRIMARY_ROUTE) {
            for destination in &mut route.route {
                destination.weight = 50;
            }
        }
        services
            .replace(NAME, &PostParams::default(), &vs)
            .await
            .expect("a hand edit of the VirtualService");
        let restored_in = t
            .wait_split(
                Split {
                    stable: 95,
                    canary: 5,
                },
                ONE_RECONCILE * 2,
            )
            .await;
        report(&format!(
            "{}: a hand-edited split was put back in {:.1}s",
            t.test,
            restored_in.as_secs_f64()
        ));

        // Someone runs `kubectl set image` on the canary: the analysed image must be the one
        // that runs and the one promoted.
        let deployments = Api::<Deployment>::namespaced(t.client.clone(), &t.namespace);
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "lobe-chat", "image": "evil:1"}
        ]}}}});
        let by_hand = PatchParams {
            field_manager: Some("kubectl-set".into()),
            ..PatchParams::default()
        };
        deployments
            .patch(
                &format!("{NAME}-canary"),
                &by_hand,
                &Patch::Strategic(&patch),
            )
            .await
            .expect("kubectl set image");
        t.wait_deployment("canary", "the v2 image back", ONE_RECONCILE * 3, |d| {
            image_of(d).as_deref() == Some("lobehub/lobe-chat:v2")
        })
        .await;
        assert!(has_event(&t.events().await, "PodTemplateRestored"));

        let done = t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        let status = done.status.unwrap_or_default();
        assert_eq!(status.stable_image.as_deref(), Some("lobehub/lobe-chat:v2"));
        t.wait_deployment("stable", "2 Ready pods of v2", ONE_RECONCILE * 2, |d| {
            image_of(d).as_deref() == Some("lobehub/lobe-chat:v2") && replicas_of(d) == (2, 2)
        })
        .await;
    })
    .await;
}

// ----- (n), (o): progressDeadline ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn n_too_few_requests_hold_then_pause_at_the_progress_deadline_with_the_weight_kept() {
    run("too-few-requests", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let timeline = t.timeline().await;
        // 5% of the simulator's 100 requests a second never reaches 100,000 in a window.
        t.apply(&Release::version("v2").min_requests(100_000)).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        let at_5 = Instant::now();
        let paused = t
            .wait_for(
                "Paused after progressDeadline",
                PROGRESS_DEADLINE + INTERVAL * 3,
                |r| phase(r) == Some(Phase::Paused),
            )
            .await;
        let waited = at_5.elapsed();
        let status = paused.status.clone().unwrap_or_default();
        assert_eq!(
            status.pause_reason,
            Some(chatrelease::crd::PauseReason::Inconclusive),
            "{}",
            summary(&paused)
        );
        assert!(
            status.message.contains("progressDeadline"),
            "{}",
            status.message
        );
        assert!(
            waited + Duration::from_secs(2) >= PROGRESS_DEADLINE,
            "paused after only {waited:?}"
        );
        assert_eq!(status.failed_checks, 0, "too few requests is no failure");
        t.wait_event("AnalysisInconclusive", ONE_RECONCILE).await;
        caught_up(t, &timeline).await;
        assert_eq!(timeline.canary_weights(), [0, 5], "{}", timeline.describe());
        report(&format!(
            "{}: paused {:.1}s after 5% with too few requests (progressDeadline {}s)",
            t.test,
            waited.as_secs_f64(),
            PROGRESS_DEADLINE.as_secs()
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn o_canary_pods_never_ready_roll_back_at_the_progress_deadline_without_traffic() {
    run("never-ready", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let timeline = t.timeline().await;
        let applied = Instant::now();
        t.apply(&Release::version("v2").unschedulable()).await;
        let rolled_back = t
            .wait_phase(
                Phase::RolledBack,
                PROGRESS_DEADLINE + Duration::from_secs(30),
            )
            .await;
        let waited = applied.elapsed();
        let status = rolled_back.status.clone().unwrap_or_default();
        assert!(
            status.message.contains("not Ready within progressDeadline"),
            "{}",
            status.message
        );
        assert!(
            waited + Duration::from_secs(2) >= PROGRESS_DEADLINE,
            "rolled back after only {waited:?}"
        );
        caught_up(t, &timeline).await;
        assert_eq!(
            timeline.canary_weights(),
            [0],
            "pods that were never Ready never got traffic:\n{}",
            timeline.describe()
        );
        assert_eq!(status.stable_image.as_deref(), Some("lobehub/lobe-chat:v1"));
    })
    .await;
}

// ----- (p): what only the operator can refuse -----------------------------------------------------

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn p_a_spec_only_the_operator_refuses_is_failed_with_traffic_untouched() {
    run("operator-refusal", Needs::Operator, LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let chr = format!("chatrelease/{NAME}");
        let ready = t
            .kubectl(&["wait", "--for=condition=Ready", &chr, "--timeout=30s"])
            .await;
        assert!(ready.status.success(), "kubectl wait: {ready:?}");
        let listed = stdout(&t.kubectl(&["get", "chr", NAME]).await);
        for column in ["PHASE", "WEIGHT", "STABLE", "CANARY", "MESSAGE", "Stable"] {
            assert!(
                listed.contains(column),
                "kubectl get chr lacks {column}:\n{listed}"
            );
        }
        assert!(listed.contains("lobehub/lobe-chat:v1"), "{listed}");

        let timeline = t.timeline().await;
        // The CRD admits it: a well-formed, unique name. Only the operator knows latency-p99 is
        // a built-in check's.
        let taken = Release::version("v2").metric("latency-p99", "vector(1)", 1.0);
        t.apply(&taken).await;
        let failed = t.wait_phase(Phase::Failed, ONE_RECONCILE * 2).await;
        let message = failed.status.clone().unwrap_or_default().message;
        assert!(
            message.contains("spec.analysis.metrics[0].name"),
            "{message}"
        );
        let not_ready = t
            .kubectl(&["wait", "--for=condition=Ready=False", &chr, "--timeout=10s"])
            .await;
        assert!(not_ready.status.success(), "kubectl wait: {not_ready:?}");
        t.wait_event("SpecRejected", ONE_RECONCILE).await;
        t.holds("Failed with all traffic on stable", INTERVAL, |r| {
            phase(r) == Some(Phase::Failed) && weight(r) == 0
        })
        .await;
        assert_eq!(t.split().await, Some(Split::ALL_STABLE));
        let canary = t.deployment("canary").await.expect("canary Deployment");
        assert_eq!(
            replicas_of(&canary).0,
            0,
            "no canary pods for a refused spec"
        );
        assert_eq!(image_of(&canary).as_deref(), Some("lobehub/lobe-chat:v1"));
        assert_eq!(
            t.release().await.spec.analysis.metrics[0].name.as_deref(),
            Some("latency-p99"),
            "the user's spec is left as written"
        );

        // Fixed, the release goes on as if nothing had happened.
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        caught_up(t, &timeline).await;
        assert_eq!(timeline.canary_weights(), [0, 5], "{}", timeline.describe());
    })
    .await;
}

// ----- (q): pause and resume -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn q_pause_holds_the_weight_without_analysis_and_resume_goes_on() {
    run("pause-resume", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let timeline = t.timeline().await;
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        let paused = t.kubectl_chatrelease(&["pause", NAME]).await;
        assert!(paused.status.success(), "{paused:?}");
        t.wait_phase(Phase::Paused, ONE_RECONCILE).await;
        let analyses_before = timeline.analyses().len();
        t.holds("Paused at 5%", INTERVAL * 2, |r| {
            phase(r) == Some(Phase::Paused) && weight(r) == 5
        })
        .await;
        assert_eq!(
            timeline.analyses().len(),
            analyses_before,
            "no analysis while paused:\n{}",
            timeline.describe()
        );
        let resumed = t.kubectl_chatrelease(&["resume", NAME]).await;
        assert!(resumed.status.success(), "{resumed:?}");
        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
        caught_up(t, &timeline).await;
        assert_full_rollout(&timeline);
        assert!(has_event(&t.events().await, "Paused"));
        assert!(has_event(&t.events().await, "Resumed"));
    })
    .await;
}

// ----- (r): deletion ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn r_deleting_a_chatrelease_mid_canary_removes_everything_it_made() {
    use chatrelease::router::istio::{DestinationRule, VirtualService};
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, DeleteParams};
    run("deletion", Needs::Operator, LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        t.releases()
            .delete(NAME, &DeleteParams::default())
            .await
            .expect("deleting the ChatRelease");
        // The real controller-manager's garbage collector follows the owner references.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ns = &t.namespace;
            let left = [
                t.deployment("stable").await.is_some(),
                t.deployment("canary").await.is_some(),
                Api::<Service>::namespaced(t.client.clone(), ns)
                    .get_opt(NAME)
                    .await
                    .expect("reading the Service")
                    .is_some(),
                Api::<VirtualService>::namespaced(t.client.clone(), ns)
                    .get_opt(NAME)
                    .await
                    .expect("reading the VirtualService")
                    .is_some(),
                Api::<DestinationRule>::namespaced(t.client.clone(), ns)
                    .get_opt(NAME)
                    .await
                    .expect("reading the DestinationRule")
                    .is_some(),
            ];
            if left.iter().all(|present| !present) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still there after 60s (stable, canary, Service, VirtualService, DestinationRule): {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
}

// ----- (s): the operator killed at a gate and while a canary drains -------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn s_an_operator_killed_at_a_gate_or_mid_drain_neither_moves_traffic_nor_cuts_the_drain() {
    run(
        "operator-kill-gate-drain",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            stable_at(t, &Release::version("v1")).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2").manual_gates(&[50])).await;
            t.wait_for("waiting at the gate before 50%", TO_25 + INTERVAL, |r| {
                phase(r) == Some(Phase::Paused) && weight(r) == 25
            })
            .await;

            // Killed while waiting at the gate: a restart neither passes the gate nor steps back.
            t.kill_operator();
            tokio::time::sleep(INTERVAL).await;
            t.start_operator();
            t.holds(
                "still at the gate at 25%",
                INTERVAL + Duration::from_secs(2),
                |r| phase(r) == Some(Phase::Paused) && weight(r) == 25,
            )
            .await;

            // Rolled back at the gate, then killed while the canary's pods drain: the restarted
            // operator keeps them until drainTimeout, counted from the rollback, not from its start.
            t.annotate("chatrelease.io/rollback", Some("true")).await;
            t.wait_phase(Phase::RolledBack, ONE_RECONCILE).await;
            let rolled_back_at = Instant::now();
            t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
            t.kill_operator();
            tokio::time::sleep(Duration::from_secs(2)).await;
            t.start_operator();
            let canary = t.deployment("canary").await.expect("canary Deployment");
            assert_eq!(
                replicas_of(&canary).0,
                2,
                "the draining pods are still there"
            );
            t.wait_deployment(
                "canary",
                "0 replicas",
                DRAIN_TIMEOUT + Duration::from_secs(20),
                |d| replicas_of(d).0 == 0,
            )
            .await;
            let drained_after = rolled_back_at.elapsed();
            assert!(
                drained_after + Duration::from_secs(2) >= DRAIN_TIMEOUT,
                "the restart cut the drain short: {drained_after:?}"
            );
            assert!(
                drained_after <= DRAIN_TIMEOUT + Duration::from_secs(10),
                "the restart restarted the drain: {drained_after:?}"
            );
            caught_up(t, &timeline).await;
            assert_eq!(
                timeline.canary_weights(),
                [0, 5, 25, 0],
                "{}",
                timeline.describe()
            );
        },
    )
    .await;
}

// ----- (t): latency both tracks share -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn t_latency_both_tracks_share_holds_without_rollback() {
    run("shared-latency", Needs::Operator, LONG_LIMIT, async |t| {
        // A slow model provider: every pod, stable's and the canary's, answers in about 2.5 s.
        let slow = |tag: &str| {
            Release::version(tag)
                .latency_p99("1s")
                // A P99 of 50 canary requests is noisy: chance breaches of "within 20% of
                // stable" must not add up to a rollback within this test's few analyses.
                .failure_limit(5)
                .env("SIM_LATENCY_MS", "2500")
        };
        stable_at(t, &slow("v1")).await;
        let timeline = t.timeline().await;
        t.apply(&slow("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        let shared = || {
            timeline
                .analyses()
                .iter()
                .filter(|a| {
                    a.verdict == Verdict::Inconclusive
                        && a.checks.iter().any(|c| {
                            c.name == "latency-p99"
                                && c.verdict == Verdict::Inconclusive
                                && c.note.contains(SHARED_TROUBLE)
                        })
                })
                .count()
        };
        t.holds_until(
            "weight 5 and Progressing while both tracks are slow",
            INTERVAL * 3,
            Duration::from_secs(90),
            |r| weight(r) == 5 && phase(r) == Some(Phase::Progressing),
            || match shared() {
                n if n >= 3 => Ok(()),
                n => Err(format!(
                    "only {n} analyses blamed shared latency:\n{}",
                    timeline.describe()
                )),
            },
        )
        .await;
        caught_up(t, &timeline).await;
        assert_eq!(timeline.canary_weights(), [0, 5], "{}", timeline.describe());
        assert!(!timeline.phases().contains(&Phase::RolledBack));
    })
    .await;
}

// ----- (u), (v): the template changes under a running canary ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn u_a_new_template_mid_canary_withdraws_the_old_one_then_rolls_out_after_its_drain() {
    run(
        "template-mid-canary",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            stable_at(t, &Release::version("v1")).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2")).await;
            t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;

            t.apply(&Release::version("v3")).await;
            // v2's traffic leaves in one write; its pods drain before v3's template goes on.
            let withdrawn = t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
            t.wait_event("CanarySuperseded", ONE_RECONCILE).await;
            let canary = t.deployment("canary").await.expect("canary Deployment");
            assert_eq!(
                image_of(&canary).as_deref(),
                Some("lobehub/lobe-chat:v2"),
                "v2's pods serve their last streams while they drain"
            );
            let done = t
                .wait_phase(Phase::Succeeded, DRAIN_TIMEOUT + TO_SUCCEEDED)
                .await;
            let status = done.status.unwrap_or_default();
            assert_eq!(status.stable_image.as_deref(), Some("lobehub/lobe-chat:v3"));
            t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
            caught_up(t, &timeline).await;
            assert_eq!(
                timeline.canary_weights(),
                [0, 5, 25, 0, 5, 25, 50, 100, 0],
                "{}",
                timeline.describe()
            );
            report(&format!(
                "{}: v2 withdrawn {:.1}s after v3 was applied",
                t.test,
                withdrawn.as_secs_f64()
            ));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn v_the_template_set_back_to_stables_withdraws_the_canary_and_retry_restarts_a_rollback() {
    run(
        "template-back-and-retry",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            stable_at(t, &Release::version("v1")).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2")).await;
            t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;

            // The template set back to stable's: the canary is withdrawn, nothing is promoted.
            t.apply(&Release::version("v1")).await;
            t.wait_phase(Phase::Stable, ONE_RECONCILE).await;
            t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
            t.wait_event("CanaryWithdrawn", ONE_RECONCILE).await;

            // v2 again, rolled back by hand, then retried: it goes all the way this time.
            t.apply(&Release::version("v2")).await;
            t.wait_for("weight 5", DRAIN_TIMEOUT + TO_25, |r| weight(r) == 5)
                .await;
            let rolled_back = t.kubectl_chatrelease(&["rollback", NAME]).await;
            assert!(rolled_back.status.success(), "{rolled_back:?}");
            t.wait_phase(Phase::RolledBack, ONE_RECONCILE).await;
            t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
            let retried = t.kubectl_chatrelease(&["retry", NAME]).await;
            assert!(retried.status.success(), "{retried:?}");
            let done = t
                .wait_phase(Phase::Succeeded, DRAIN_TIMEOUT + TO_SUCCEEDED)
                .await;
            assert_eq!(
                done.status.unwrap_or_default().stable_image.as_deref(),
                Some("lobehub/lobe-chat:v2")
            );
            assert!(has_event(&t.events().await, "Retry"));
            t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
            caught_up(t, &timeline).await;
            assert_eq!(
                timeline.canary_weights(),
                [0, 5, 0, 5, 0, 5, 25, 50, 100, 0],
                "{}",
                timeline.describe()
            );
        },
    )
    .await;
}

// ----- (w): Prometheus back without its data ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn w_prometheus_back_without_its_data_never_judges_a_tracks_lifetime() {
    run(
        "prometheus-data-lost",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            let prometheus = t.start_own_prometheus().await;
            stable_at(t, &Release::version("v1").prometheus(&prometheus)).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2").prometheus(&prometheus))
                .await;
            t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;
            // Long enough that both tracks' counters hold far more than one window's requests.
            tokio::time::sleep(INTERVAL).await;
            t.stop_own_prometheus().await;
            t.restart_own_prometheus_without_its_data().await;
            let restarted_at = timeline.statuses().len();

            t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
            caught_up(t, &timeline).await;
            assert_full_rollout(&timeline);
            assert_each_analysis_counted_one_window(t, &timeline, restarted_at, "the data loss");
        },
    )
    .await;
}

// ----- (x): killed while Promoting ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn x_an_operator_killed_while_promoting_keeps_traffic_on_the_canary_and_finishes() {
    run(
        "operator-kill-promoting",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            stable_at(t, &Release::version("v1")).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2")).await;
            t.wait_for("weight 50", TO_SUCCEEDED, |r| weight(r) == 50)
                .await;
            // A pod quota at what runs now holds the promotion: stable's new pods cannot be made,
            // so the operator waits in Promoting with all traffic on the canary.
            let pods = t
                .kubectl(&["get", "pods", "--no-headers", "-o", "name"])
                .await;
            let count = stdout(&pods).lines().count().to_string();
            let quota = t
                .kubectl(&[
                    "create",
                    "quota",
                    "pods-now",
                    &format!("--hard=pods={count}"),
                ])
                .await;
            assert!(quota.status.success(), "{quota:?}");
            t.wait_for("Promoting at 100%", TO_25, |r| {
                phase(r) == Some(Phase::Promoting) && weight(r) == 100
            })
            .await;

            t.kill_operator();
            tokio::time::sleep(Duration::from_secs(3)).await;
            t.start_operator();
            t.holds(
                "still Promoting at 100% while stable's pods cannot be made",
                INTERVAL,
                |r| phase(r) == Some(Phase::Promoting) && weight(r) == 100,
            )
            .await;
            assert_eq!(
                t.split().await,
                Some(Split {
                    stable: 0,
                    canary: 100
                }),
                "users stay on the canary, the only track running the new version"
            );

            let deleted = t.kubectl(&["delete", "quota", "pods-now"]).await;
            assert!(deleted.status.success(), "{deleted:?}");
            // The ReplicaSet controller backs off after refused creations; a change to the
            // ReplicaSets makes it look again at once, as a person fixing a quota would see.
            let nudged = t
                .kubectl(&[
                    "annotate",
                    "rs",
                    "--all",
                    "--overwrite",
                    "e2e.chatrelease.io/quota=gone",
                ])
                .await;
            assert!(nudged.status.success(), "{nudged:?}");
            t.wait_phase(Phase::Succeeded, TO_25).await;
            caught_up(t, &timeline).await;
            assert_full_rollout(&timeline);
            let promoting: Vec<_> = t
                .events()
                .await
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("Promoting"))
                .collect();
            assert_eq!(
                promoting.len(),
                1,
                "the restart promoted again: {promoting:?}"
            );
        },
    )
    .await;
}

// ----- (y): the API server restarted mid-rollout --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn y_an_api_server_restarted_mid_rollout_holds_the_weight_then_the_rollout_goes_on() {
    run(
        "api-server-restart",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            // This test's operator talks to an API server of its own on the cluster's etcd.
            t.kill_operator();
            t.start_own_api_server().await;
            t.start_operator();
            stable_at(t, &Release::version("v1")).await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2")).await;
            t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;

            t.stop_own_api_server().await;
            // Gone past the moment the next analysis was due: the operator can neither read nor
            // write, and nothing moves; it must not exit either.
            t.holds(
                "at 25% while the API server is down",
                INTERVAL + Duration::from_secs(5),
                |r| weight(r) == 25,
            )
            .await;
            assert_eq!(
                t.split().await,
                Some(Split {
                    stable: 75,
                    canary: 25
                })
            );
            t.restart_own_api_server().await;

            t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
            caught_up(t, &timeline).await;
            assert_full_rollout(&timeline);
            let started: Vec<_> = t
                .events()
                .await
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("CanaryStarted"))
                .collect();
            assert_eq!(started.len(), 1, "the canary was started over: {started:?}");
        },
    )
    .await;
}

/// Every analysis in `timeline` from status `from` on counted at most one window's requests:
/// the simulator sends 100 a second, so one 10 s window holds about 1,000 in all, and a track's
/// lifetime (every request since its pods started) several times that.
fn assert_each_analysis_counted_one_window(
    t: &TestEnv,
    timeline: &Timeline,
    from: usize,
    since: &str,
) {
    let window_most = 1.5 * f64::from(harness::MESHSIM_RPS) * INTERVAL.as_secs_f64();
    let counted: Vec<f64> = timeline.statuses()[from..]
        .iter()
        .filter_map(|s| s.analysis.as_ref())
        .map(|a| a.canary_requests.unwrap_or(0.0) + a.stable_requests.unwrap_or(0.0))
        .collect();
    assert!(
        !counted.is_empty(),
        "no analysis after {since}:\n{}",
        timeline.describe()
    );
    for seen in &counted {
        assert!(
            *seen <= window_most,
            "an analysis after {since} counted {seen} requests, more than a window holds \
             ({window_most}):\n{}",
            timeline.describe()
        );
    }
    report(&format!(
        "{}: requests per analysis after {since}: {counted:?}",
        t.test
    ));
}

// ----- (z): testers and sticky users with real traffic --------------------------------------------

both_routers!(testers_and_sticky_users, LONG_LIMIT, "testers-and-sticky":
    z_testers_always_reach_the_canary_and_sticky_users_keep_one_version_both_ways,
    gw_z_testers_and_sticky_users_through_an_httproute);

async fn testers_and_sticky_users(t: &TestEnv, router: Router) {
    let version = |tag: &str| Release::version_routed(router, tag).testers_and_sticky_users();
    stable_at(t, &version("v1")).await;
    let timeline = t.timeline().await;
    t.apply(&version("v2")).await;
    t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;

    // Testers first, then each version's cookie holders, then everyone else by weight.
    let names = t.route_names().await;
    let testers = match router {
        Router::Istio => "canary-match-0",
        Router::GatewayApi => "canary-match",
    };
    assert_eq!(
        names,
        [testers, "sticky-canary", "sticky-stable", "primary"],
        "route order"
    );
    // Give the mesh a moment to route by the routes just read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_5 = t.meshsim_metrics().await;

    // The canary earns its steps on the users it pinned and the new ones who arrive.
    t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;
    let before_rollback = t.meshsim_metrics().await;
    t.annotate("chatrelease.io/rollback", Some("true")).await;
    t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rolled_back = t.meshsim_metrics().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = t.meshsim_metrics().await;

    let ns = t.namespace.as_str();
    let stable = format!("{NAME}-stable");
    let canary = format!("{NAME}-canary");
    let requests = |m: &MetricsText, user: &str, workload: &str| {
        m.sum(
            "meshsim_user_requests_total",
            &[
                ("namespace", ns),
                ("route", NAME),
                ("route_kind", router.route_kind()),
                ("user", user),
                ("workload", workload),
            ],
        )
    };
    // Changes of version by regular users who held the cookie of the version they left
    // (testers follow their route, not a cookie).
    // Regular users who held the cookie of the version they left (testers follow their
    // route, not a cookie).
    let changes = |m: &MetricsText, from: &str, to: &str| {
        m.sum(
            "meshsim_version_changes_total",
            &[
                ("namespace", ns),
                ("route", NAME),
                ("route_kind", router.route_kind()),
                ("from", from),
                ("to", to),
                ("pinned", "true"),
            ],
        )
    };
    let during = |f: &dyn Fn(&MetricsText) -> f64| f(&before_rollback) - f(&at_5);

    let testers_on_canary = during(&|m| requests(m, "tester", &canary));
    let testers_on_stable = during(&|m| requests(m, "tester", &stable));
    assert!(
        testers_on_canary > 0.0,
        "testers sent nothing to the canary"
    );
    assert_eq!(
        testers_on_stable, 0.0,
        "a tester reached stable while the canary ran"
    );
    assert!(
        during(&|m| requests(m, "regular", &canary)) > 0.0,
        "no regular user reached the canary"
    );
    assert_eq!(
        during(&|m| changes(m, &stable, &canary)),
        0.0,
        "users pinned to stable were moved to the canary"
    );
    assert_eq!(
        during(&|m| changes(m, &canary, &stable)),
        0.0,
        "users pinned to the canary were moved to stable while it ran"
    );

    // After the rollback nobody reaches the canary, and its cookie holders are on stable.
    assert_eq!(
        requests(&later, "tester", &canary) - requests(&rolled_back, "tester", &canary),
        0.0,
        "a tester reached the rolled-back canary"
    );
    assert_eq!(
        requests(&later, "regular", &canary) - requests(&rolled_back, "regular", &canary),
        0.0,
        "a user reached the rolled-back canary"
    );
    let moved = changes(&later, &canary, &stable) - changes(&before_rollback, &canary, &stable);
    assert!(moved > 0.0, "no canary cookie holder came back to stable");
    report(&format!(
        "{}: testers on the canary {testers_on_canary}, on stable {testers_on_stable}; \
             canary cookie holders moved to stable by the rollback: {moved}",
        t.test
    ));
    caught_up(t, &timeline).await;
    assert_eq!(
        timeline.canary_weights(),
        [0, 5, 25, 0],
        "{}",
        timeline.describe()
    );
}

// ----- (za): a scrape gap mid-rollout ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn za_a_scrape_gap_mid_rollout_never_counts_a_tracks_lifetime() {
    run("scrape-gap", Needs::Operator, LONG_LIMIT, async |t| {
        stable_at(t, &Release::version("v1")).await;
        let timeline = t.timeline().await;
        t.apply(&Release::version("v2")).await;
        t.wait_for("weight 25", TO_25, |r| weight(r) == 25).await;
        // Long enough that both tracks' counters hold far more than one window's requests.
        tokio::time::sleep(INTERVAL).await;
        // Five of Prometheus's 2 s scrapes fail: every series gets a stale marker, and one
        // analysis's window starts inside the gap whatever its phase.
        t.fail_scrapes(10).await;
        assert_eq!(t.meshsim_metrics_status().await, Some(503), "the gap began");
        let gap_at = timeline.statuses().len();

        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        caught_up(t, &timeline).await;
        assert_full_rollout(&timeline);
        assert_each_analysis_counted_one_window(t, &timeline, gap_at, "the scrape gap");
    })
    .await;
}

// ----- (gw-s): switching router -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn gw_s_the_router_switches_only_while_stable_and_removes_the_old_routes_after_the_new() {
    use chatrelease::router::gateway_api::HttpRoute;
    use chatrelease::router::istio::{DestinationRule, VirtualService};
    use k8s_openapi::api::core::v1::Service;
    run("switch-router", Needs::Operator, LONG_LIMIT, async |t| {
        let routes = kube::Api::<HttpRoute>::namespaced(t.client.clone(), &t.namespace);
        let virtual_services =
            kube::Api::<VirtualService>::namespaced(t.client.clone(), &t.namespace);
        let destination_rules =
            kube::Api::<DestinationRule>::namespaced(t.client.clone(), &t.namespace);
        let services = kube::Api::<Service>::namespaced(t.client.clone(), &t.namespace);
        let exists = async |found: kube::Result<Option<()>>| found.expect("reading").is_some();
        let istio = |tag: &str| Release::version_routed(Router::Istio, tag);
        let gateway = |tag: &str| Release::version_routed(Router::GatewayApi, tag);

        // Stable on Istio, then the same version through the Gateway API.
        stable_at(t, &istio("v1")).await;
        t.apply(&gateway("v1")).await;
        t.wait_event("RouterSwitched", Duration::from_secs(15))
            .await;
        assert!(exists(routes.get_opt(NAME).await.map(|r| r.map(|_| ()))).await);
        for track in ["stable", "canary"] {
            let name = format!("{NAME}-{track}");
            assert!(exists(services.get_opt(&name).await.map(|s| s.map(|_| ()))).await);
        }
        assert!(!exists(virtual_services.get_opt(NAME).await.map(|r| r.map(|_| ()))).await);
        assert!(!exists(destination_rules.get_opt(NAME).await.map(|r| r.map(|_| ()))).await);
        assert_eq!(t.split().await, Some(Split::ALL_STABLE));
        let release = t.release().await;
        assert_eq!(
            release.status.unwrap_or_default().router.as_deref(),
            Some("gatewayAPI")
        );

        // A canary through the HTTPRoute; asking for Istio under it is refused, traffic stays.
        let timeline = t.timeline().await;
        t.apply(&gateway("v2")).await;
        t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
        t.apply(&istio("v2")).await;
        let refused = t
            .wait_phase(Phase::Failed, ONE_RECONCILE + Duration::from_secs(5))
            .await;
        let message = refused.status.unwrap_or_default().message;
        assert!(
            message.contains("router cannot change from gatewayAPI to istio"),
            "{message}"
        );
        assert!(!exists(virtual_services.get_opt(NAME).await.map(|r| r.map(|_| ()))).await);
        assert_eq!(t.split().await.map(|s| s.canary), Some(5));

        // Set back, the canary goes on through the HTTPRoute to the end.
        t.apply(&gateway("v2")).await;
        t.wait_phase(Phase::Succeeded, TO_SUCCEEDED).await;
        caught_up(t, &timeline).await;
        assert_full_rollout(&timeline);

        // Stable again: back to Istio, and the Gateway API's objects go.
        t.apply(&istio("v2")).await;
        t.wait_for("routed by istio", Duration::from_secs(15), |r| {
            r.status.as_ref().and_then(|s| s.router.as_deref()) == Some("istio")
        })
        .await;
        assert!(exists(virtual_services.get_opt(NAME).await.map(|r| r.map(|_| ()))).await);
        assert!(!exists(routes.get_opt(NAME).await.map(|r| r.map(|_| ()))).await);
        assert!(
            !exists(
                services
                    .get_opt(&format!("{NAME}-canary"))
                    .await
                    .map(|s| s.map(|_| ()))
            )
            .await
        );
        assert_eq!(t.split().await, Some(Split::ALL_STABLE));
    })
    .await;
}

// ----- (zd): the sequential test -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zd_under_a_one_minute_interval_a_canary_failing_half_its_requests_is_stopped_in_seconds() {
    run("sequential-stop", Needs::Operator, LIMIT, async |t| {
        let minute = Duration::from_secs(60);
        stable_at(t, &Release::version("v1").interval(minute)).await;
        let timeline = t.timeline().await;
        t.apply(
            &Release::version("v2")
                .interval(minute)
                .env(SIM_ERROR_RATE, "0.5"),
        )
        .await;
        let rolled_back = t.wait_phase(Phase::RolledBack, minute).await;
        t.wait_split(Split::ALL_STABLE, ONE_RECONCILE).await;
        caught_up(t, &timeline).await;
        assert_eq!(
            timeline.canary_weights(),
            [0, 5, 0],
            "{}",
            timeline.describe()
        );
        let message = rolled_back.status.unwrap_or_default().message;
        assert!(
            message.contains("stopped early at 5%: sequential test"),
            "{message}"
        );
        let held = timeline
            .time_at_weight()
            .expect("weight given and withdrawn");
        report(&format!(
            "{}: a canary failing half its requests held weight {:.1}s under interval 1m: {message}",
            t.test,
            held.as_secs_f64()
        ));
        assert!(held <= Duration::from_secs(20), "held weight {held:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn ze_under_a_one_minute_interval_a_healthy_canary_is_watched_and_promoted_without_an_early_stop()
 {
    run(
        "sequential-healthy",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            let minute = Duration::from_secs(60);
            let healthy = |tag: &str| Release::version(tag).interval(minute).steps(&[50, 100]);
            stable_at(t, &healthy("v1")).await;
            let timeline = t.timeline().await;
            t.apply(&healthy("v2")).await;
            // Each step waits its whole interval; the looks every 10s in between stop nothing.
            t.wait_phase(Phase::Succeeded, 3 * minute + Duration::from_secs(20))
                .await;
            caught_up(t, &timeline).await;
            assert_eq!(
                timeline.canary_weights(),
                [0, 50, 100, 0],
                "{}",
                timeline.describe()
            );
            assert!(
                timeline
                    .statuses()
                    .iter()
                    .all(|s| !s.message.contains("stopped early")),
                "{}",
                timeline.describe()
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs the local control plane; run with `make e2e`"]
async fn zi_under_a_one_minute_interval_an_outage_both_tracks_share_is_looked_at_and_holds() {
    run(
        "sequential-shared",
        Needs::Operator,
        LONG_LIMIT,
        async |t| {
            let minute = Duration::from_secs(60);
            stable_at(t, &Release::version("v1").interval(minute)).await;
            t.start_provider_outage("0.5").await;
            let timeline = t.timeline().await;
            t.apply(&Release::version("v2").interval(minute)).await;
            t.wait_for("weight 5", TO_25, |r| weight(r) == 5).await;
            // Six looks of the sequential test see half of each track's requests fail, then the
            // interval's analysis: none stops the canary, the analysis blames shared trouble.
            t.holds_until(
                "weight 5 and Progressing through a minute of shared outage",
                minute + Duration::from_secs(10),
                minute + Duration::from_secs(40),
                |r| weight(r) == 5 && phase(r) == Some(Phase::Progressing),
                || {
                    let blamed = timeline.analyses().iter().any(|a| {
                        a.verdict == Verdict::Inconclusive
                            && a.checks.iter().any(|c| c.note.contains(SHARED_TROUBLE))
                    });
                    if blamed {
                        Ok(())
                    } else {
                        Err(format!(
                            "no analysis blamed shared trouble:\n{}",
                            timeline.describe()
                        ))
                    }
                },
            )
            .await;
            assert!(
                timeline
                    .statuses()
                    .iter()
                    .all(|s| !s.message.contains("stopped early")),
                "{}",
                timeline.describe()
            );
            assert_eq!(
                t.split().await,
                Some(Split {
                    stable: 95,
                    canary: 5
                })
            );
        },
    )
    .await;
}
