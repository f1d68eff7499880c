//! Property tests: no spec the API server admits and no sequence of observations, pod states,
//! annotations and clock readings can make the pure decision panic. One panicking ChatRelease
//! used to crash-loop the whole operator, so "never panics" is a safety property here.

use chatrelease::annotations::Commands;
use chatrelease::crd::{ChatReleaseSpec, ChatReleaseStatus};
use chatrelease::judge;
use chatrelease::metrics::{Observations, TrackSample};
use chatrelease::rollout::{self, TrackState, World};
use chatrelease::settings::Settings;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Durations as the CRD's pattern admits them, plus text it refuses (a spec may reach the
/// operator from before a CRD upgrade, or through `simulate`).
fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "([0-9]{1,6}(\\.[0-9]{1,9})?(ms|s|m|h)){1,3}",
        1 => "[0-9]{1,25}(ms|s|m|h)",
        1 => ".{0,20}",
    ]
}

fn step_list() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![
        // What the CRD admits: ascending weights from 1 to 100, the last 100.
        3 => proptest::collection::btree_set(1i64..100, 0..8).prop_map(|set| {
            let mut steps: Vec<i64> = set.into_iter().collect();
            steps.push(100);
            steps
        }),
        1 => proptest::collection::vec(-5i64..200, 0..6),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i32>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|n| json!(n)),
    ]
}

prop_compose! {
    fn spec()(
        replicas in prop_oneof![1i64..=1000, any::<i32>().prop_map(i64::from)],
        steps in step_list(),
        gate_picks in proptest::collection::vec(any::<proptest::sample::Index>(), 0..3),
        interval in duration_text(),
        drain in duration_text(),
        deadline in duration_text(),
        window in proptest::option::of(duration_text()),
        latency in proptest::option::of(duration_text()),
        min_requests in prop_oneof![1i64..=1_000_000_000, any::<i64>()],
        failure_limit in prop_oneof![1i32..=100, any::<i32>()],
        compare in any::<bool>(),
        error_rate in "[0-9]{1,3}(\\.[0-9]{1,4})?%",
        custom in proptest::collection::vec((number(), proptest::option::of(number())), 0..3),
    ) -> ChatReleaseSpec {
        let gates: Vec<i64> = gate_picks
            .iter()
            .filter(|_| !steps.is_empty())
            .map(|i| steps[i.index(steps.len())])
            .collect();
        let metrics: Vec<Value> = custom
            .iter()
            .enumerate()
            .map(|(i, (max, min))| json!({
                "name": format!("check-{i}"),
                "query": "vector(1)",
                "max": max,
                "min": min,
            }))
            .collect();
        let mut analysis = json!({
            "minRequests": min_requests,
            "failureLimit": failure_limit,
            "compareToStable": compare,
            "errorRate": {"max": error_rate},
            "metrics": metrics,
        });
        if let Some(window) = window {
            analysis["window"] = json!(window);
        }
        if let Some(latency) = latency {
            analysis["latencyP99"] = json!({"max": latency});
        }
        serde_json::from_value(json!({
            "replicas": replicas,
            "template": {"spec": {"containers": [{"name": "app", "image": "chat:v2"}]}},
            "strategy": {
                "steps": steps,
                "manualGates": gates,
                "interval": interval,
                "drainTimeout": drain,
                "progressDeadline": deadline,
            },
            "analysis": analysis,
        }))
        .expect("every generated spec deserialises")
    }
}

/// Any count Prometheus could answer, the impossible ones included.
fn reading() -> impl Strategy<Value = Option<f64>> {
    proptest::option::of(prop_oneof![
        4 => 0.0f64..100_000.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => -1000.0f64..0.0,
        1 => any::<f64>(),
    ])
}

fn track_sample() -> impl Strategy<Value = TrackSample> {
    (reading(), reading(), reading(), reading(), reading()).prop_map(
        |(requests, errors, latency_p99_ms, c0, c1)| TrackSample {
            requests,
            errors,
            latency_p99_ms,
            custom: [("check-0".to_string(), c0), ("check-1".to_string(), c1)]
                .into_iter()
                .collect(),
        },
    )
}

fn observations() -> impl Strategy<Value = Observations> {
    prop_oneof![
        1 => Just(Observations::Unavailable { reason: "down".into() }),
        6 => (track_sample(), track_sample())
            .prop_map(|(canary, stable)| Observations::Sampled { canary, stable }),
    ]
}

fn track_state() -> impl Strategy<Value = Option<TrackState>> {
    let count = || prop_oneof![0i32..4, any::<i32>()];
    proptest::option::of(
        (
            proptest::option::of(prop_oneof![Just("v1"), Just("v2"), Just("v3")]),
            count(),
            count(),
            count(),
            count(),
            any::<bool>(),
        )
            .prop_map(
                |(revision, replicas, total, ready, updated, observed)| TrackState {
                    revision: revision.map(String::from),
                    replicas,
                    total_replicas: total,
                    ready_replicas: ready,
                    updated_replicas: updated,
                    observed,
                },
            ),
    )
}

/// One reconcile's view of the world: which template the spec holds, the pods, the annotations,
/// how much time passed since the last reconcile, and an analysis if one was due.
#[derive(Debug, Clone)]
struct Turn {
    desired: &'static str,
    stable: Option<TrackState>,
    canary: Option<TrackState>,
    commands: Commands,
    elapsed_secs: i64,
    observations: Observations,
}

fn turn() -> impl Strategy<Value = Turn> {
    (
        prop_oneof![Just("v1"), Just("v2"), Just("v3")],
        track_state(),
        track_state(),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        prop_oneof![0i64..120, 0i64..100_000, Just(i64::MAX / 4)],
        observations(),
    )
        .prop_map(
            |(
                desired,
                stable,
                canary,
                (rollback, promote, pause, retry),
                elapsed_secs,
                observations,
            )| Turn {
                desired,
                stable,
                canary,
                commands: Commands {
                    rollback,
                    promote,
                    pause,
                    retry,
                },
                elapsed_secs,
                observations,
            },
        )
}

/// Clock readings anywhere jiff can hold, the ends included.
fn start_time() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        Just(Timestamp::UNIX_EPOCH),
        Just(Timestamp::MAX - SignedDuration::from_hours(1)),
        Just(Timestamp::MIN),
        (0i64..4_000_000_000).prop_map(|s| Timestamp::from_second(s).expect("in range")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn settings_take_any_admitted_spec_without_panicking(spec in spec()) {
        // Either typed values or an error naming a field: both are fine, a panic is not.
        if let Err(problem) = Settings::from_spec(&spec) {
            prop_assert!(!problem.field.is_empty());
        }
    }

    #[test]
    fn the_judge_takes_any_observations_without_panicking(
        spec in spec(),
        observations in observations(),
    ) {
        if let Ok(settings) = Settings::from_spec(&spec) {
            let judgement = judge::judge(&settings.judge, 25, &observations);
            // Whatever it says, it says it in numbers a status can hold.
            prop_assert!(serde_json::to_string(&judgement.checks).is_ok());
        }
    }

    #[test]
    fn decide_takes_any_sequence_of_turns_without_panicking(
        spec in spec(),
        start in start_time(),
        turns in proptest::collection::vec(turn(), 1..40),
    ) {
        let Ok(settings) = Settings::from_spec(&spec) else {
            return Ok(());
        };
        let mut status = ChatReleaseStatus::default();
        let mut now = start;
        for turn in turns {
            now = now
                .checked_add(SignedDuration::from_secs(turn.elapsed_secs))
                .unwrap_or(Timestamp::MAX);
            let world = World {
                generation: Some(1),
                desired_revision: turn.desired.into(),
                desired_image: format!("chat:{}", turn.desired),
                stable: turn.stable,
                canary: turn.canary,
                commands: turn.commands,
            };
            let due = rollout::analysis_due(&settings, &status, &world.commands, now);
            let observations = due.then_some(&turn.observations);
            let decision = rollout::decide(&settings, &status, &world, observations, now);
            prop_assert!((0..=100).contains(&decision.plan.canary_weight));
            prop_assert!((0..=100).contains(&decision.status.canary_weight));
            status = decision.status;
        }
    }
}
