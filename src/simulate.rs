//! `kubectl chatrelease simulate`: the operator's judge and state machine run on observations from
//! a file, one analysis interval per tick, with no cluster. The canary starts with its pods Ready
//! at the first step.
//!
//! A tick may come sooner than the interval (`"after": "10s"`): if no analysis is due then, it is
//! a look of the sequential test (`analysis.watchEvery`), and its counts are those since the step
//! began, which is what the operator's look reads.

use crate::annotations::Commands;
use crate::crd::{ChatRelease, ChatReleaseStatus, Phase, Verdict};
use crate::metrics::{Observations, TrackSample};
use crate::rollout::{self, TrackState, World};
use crate::settings::Settings;
use crate::workload;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A scenario file. `expect` is for tests and ignored here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub release: ChatRelease,
    pub ticks: Vec<Tick>,
    #[serde(default)]
    pub expect: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tick {
    /// How long after the previous tick (or the canary's start) this one comes: a duration such
    /// as `10s`; one `strategy.interval` when absent.
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub prometheus: PrometheusState,
    #[serde(default)]
    pub canary: Option<TrackInput>,
    #[serde(default)]
    pub stable: Option<TrackInput>,
    /// Present during this tick only.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PrometheusState {
    #[default]
    Up,
    Down,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackInput {
    pub requests: f64,
    #[serde(default)]
    pub errors: f64,
    #[serde(default)]
    pub latency_p99_ms: Option<f64>,
    #[serde(default)]
    pub custom: BTreeMap<String, f64>,
}

impl TrackInput {
    fn sample(&self) -> TrackSample {
        TrackSample {
            requests: Some(self.requests),
            errors: Some(self.errors),
            latency_p99_ms: self.latency_p99_ms,
            custom: self
                .custom
                .iter()
                .map(|(k, v)| (k.clone(), Some(*v)))
                .collect(),
        }
    }
}

/// One line of output.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TickOutcome {
    pub tick: usize,
    pub action: &'static str,
    pub weight: i32,
    pub phase: Phase,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// A scenario that cannot be run, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ScenarioError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        ScenarioError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Parses a scenario; errors name the field (`ticks[2].canary.requests: ...`).
pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let scenario: Scenario = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(file)".to_string()
        } else {
            path
        };
        ScenarioError::at(path, e.inner().to_string())
    })?;
    if scenario.release.metadata.name.is_none() {
        return Err(ScenarioError::at("release.metadata.name", "is required"));
    }
    if scenario.ticks.is_empty() {
        return Err(ScenarioError::at("ticks", "must list at least one tick"));
    }
    for (i, tick) in scenario.ticks.iter().enumerate() {
        if let Some(after) = &tick.after {
            tick_gap(after)
                .map_err(|problem| ScenarioError::at(format!("ticks[{i}].after"), problem))?;
        }
        for (track, input) in [("canary", &tick.canary), ("stable", &tick.stable)] {
            let Some(input) = input else { continue };
            let numbers = [
                ("requests", Some(input.requests)),
                ("errors", Some(input.errors)),
                ("latency_p99_ms", input.latency_p99_ms),
            ];
            for (field, value) in numbers {
                if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(ScenarioError::at(
                        format!("ticks[{i}].{track}.{field}"),
                        "must be a number >= 0",
                    ));
                }
            }
            if input.errors > input.requests {
                return Err(ScenarioError::at(
                    format!("ticks[{i}].{track}.errors"),
                    "cannot exceed requests",
                ));
            }
        }
    }
    let settings = Settings::from_spec(&scenario.release.spec)
        .map_err(|e| ScenarioError::at(format!("release.spec.{}", e.field), e.problem))?;
    // A value under a name no check has would be read by nothing: the check it was meant for
    // would see no data and hold, and the scenario would test something else than it says.
    let names: Vec<&str> = settings
        .judge
        .custom
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for (i, tick) in scenario.ticks.iter().enumerate() {
        for (track, input) in [("canary", &tick.canary), ("stable", &tick.stable)] {
            let keys = input.iter().flat_map(|input| input.custom.keys());
            if let Some(unknown) = keys.into_iter().find(|k| !names.contains(&k.as_str())) {
                return Err(ScenarioError::at(
                    format!("ticks[{i}].{track}.custom.{unknown}"),
                    format!(
                        "names no check of release.spec.analysis.metrics (a check's name, or \
                         its built-in check when it has no name): {names:?}"
                    ),
                ));
            }
        }
    }
    Ok(scenario)
}

/// A tick's `after`: from a second to a day.
fn tick_gap(after: &str) -> Result<SignedDuration, String> {
    let range = crate::settings::DurationRange {
        min: std::time::Duration::from_secs(1),
        max: std::time::Duration::from_secs(86_400),
    };
    let gap = crate::settings::parse_duration("after", after, range).map_err(|e| e.problem)?;
    SignedDuration::try_from(gap).map_err(|e| e.to_string())
}

/// Runs every tick through `rollout::decide` (or, at a look between analyses,
/// `rollout::decide_watch`).
pub fn run(scenario: &Scenario) -> Result<Vec<TickOutcome>, ScenarioError> {
    let spec = &scenario.release.spec;
    let settings = Settings::from_spec(spec)
        .map_err(|e| ScenarioError::at(format!("release.spec.{}", e.field), e.problem))?;
    let canary_revision = spec.template.revision();
    let image = workload::image_of(&spec.template);
    let start = Timestamp::UNIX_EPOCH;
    let interval = SignedDuration::try_from(settings.interval).unwrap_or(SignedDuration::MAX);

    let mut status = ChatReleaseStatus {
        phase: Phase::Progressing,
        canary_weight: settings.steps[0],
        current_step: Some(0),
        stable_revision: Some("previous".into()),
        stable_image: Some("previous".into()),
        canary_revision: Some(canary_revision.clone()),
        canary_image: Some(image.clone()),
        canary_started_at: Some(Time(start)),
        step_started_at: Some(Time(start)),
        ..Default::default()
    };
    let ready = |revision: &str| TrackState {
        revision: Some(revision.to_string()),
        replicas: settings.replicas,
        total_replicas: settings.replicas,
        ready_replicas: settings.replicas,
        updated_replicas: settings.replicas,
        observed: true,
    };

    let mut outcomes = Vec::with_capacity(scenario.ticks.len());
    let mut now = start;
    for (i, tick) in scenario.ticks.iter().enumerate() {
        now += match &tick.after {
            Some(after) => tick_gap(after)
                .map_err(|problem| ScenarioError::at(format!("ticks[{i}].after"), problem))?,
            None => interval,
        };
        // Stable's Deployment takes the promoted template at once: no pods to wait for here.
        let stable_runs = if status.phase == Phase::Promoting {
            status.canary_revision.clone()
        } else {
            status.stable_revision.clone()
        }
        .unwrap_or_default();
        let world = World {
            generation: Some(1),
            desired_revision: canary_revision.clone(),
            desired_image: image.clone(),
            stable: Some(ready(&stable_runs)),
            canary: Some(ready(&canary_revision)),
            commands: Commands::from_annotations(&tick.annotations),
        };
        let observations = match tick.prometheus {
            PrometheusState::Down => Observations::Unavailable {
                reason: "Prometheus is down".into(),
            },
            PrometheusState::Up => Observations::Sampled {
                canary: tick
                    .canary
                    .as_ref()
                    .map(TrackInput::sample)
                    .unwrap_or_default(),
                stable: tick
                    .stable
                    .as_ref()
                    .map(TrackInput::sample)
                    .unwrap_or_default(),
            },
        };
        let due = rollout::analysis_due(&settings, &status, &world.commands, now);
        let stopped_early = if due {
            None
        } else {
            rollout::decide_watch(&settings, &status, &world, &observations, now)
        };
        let decision = stopped_early.unwrap_or_else(|| {
            rollout::decide(
                &settings,
                &status,
                &world,
                due.then_some(&observations),
                now,
            )
        });
        let analysed = decision
            .status
            .last_analysis
            .as_ref()
            .is_some_and(|a| a.time.0 == now);
        outcomes.push(TickOutcome {
            tick: i,
            action: decision.action.simulate_name(),
            weight: decision.status.canary_weight,
            phase: decision.status.phase,
            reason: decision.status.message.clone(),
            verdict: analysed
                .then(|| decision.status.last_analysis.as_ref().map(|a| a.verdict))
                .flatten(),
        });
        status = decision.status;
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{
      "release": {"apiVersion": "chatrelease.io/v1alpha1", "kind": "ChatRelease",
                  "metadata": {"name": "lobe-chat", "namespace": "chat"},
                  "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "lobehub/lobe-chat:v2"}]}}}},
      "ticks": [TICKS]
    }"#;

    fn scenario(ticks: &str) -> Result<Scenario, ScenarioError> {
        parse(&MINIMAL.replace("TICKS", ticks))
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let err = scenario(r#"{"canary": {"requests": "many"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ticks[0].canary.requests:"), "{err}");
    }

    #[test]
    fn an_unknown_key_names_where_it_is() {
        let err = scenario(r#"{"canray": {"requests": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ticks[0]") && err.contains("canray"), "{err}");
    }

    #[test]
    fn a_value_for_a_check_the_spec_does_not_have_is_refused_naming_it() {
        let with_check = |custom: &str| {
            MINIMAL
                .replace(
                    "TICKS",
                    &format!(r#"{{"canary": {{"requests": 100, "custom": {custom}}}}}"#),
                )
                .replace(
                    r#""template""#,
                    r#""analysis": {"metrics": [{"check": "ttft-p99", "max": 1.5}]}, "template""#,
                )
        };
        assert!(parse(&with_check(r#"{"ttft-p99": 0.8}"#)).is_ok());
        let err = parse(&with_check(r#"{"ttft_p99": 0.8}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ticks[0].canary.custom.ttft_p99:") && err.contains("\"ttft-p99\""),
            "{err}"
        );
    }

    #[test]
    fn a_bad_spec_names_the_spec_field() {
        let text = MINIMAL.replace("TICKS", "{}").replace(
            r#""template""#,
            r#""strategy": {"steps": [50, 25, 100]}, "template""#,
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("release.spec.strategy.steps:"), "{err}");
    }

    #[test]
    fn a_tick_sooner_than_the_interval_is_a_sequential_look_over_the_step_so_far() {
        let s = scenario(
            r#"{"after": "10s", "canary": {"requests": 30, "errors": 15}, "stable": {"requests": 570}},
               {"after": "10s", "canary": {"requests": 200, "errors": 100}, "stable": {"requests": 1140}}"#,
        )
        .unwrap();
        let out = run(&s).unwrap();
        assert_eq!((out[0].action, out[0].weight), ("none", 5), "{out:?}");
        assert_eq!((out[1].action, out[1].weight), ("rollback", 0), "{out:?}");
        assert!(
            out[1].reason.contains("sequential test"),
            "{}",
            out[1].reason
        );
    }

    #[test]
    fn a_bad_tick_gap_names_the_field() {
        let err = scenario(r#"{"after": "soon"}"#).unwrap_err().to_string();
        assert!(err.starts_with("ticks[0].after:"), "{err}");
        let err = scenario(r#"{}, {"after": "0s"}"#).unwrap_err().to_string();
        assert!(err.starts_with("ticks[1].after:"), "{err}");
    }

    #[test]
    fn negative_counts_are_refused() {
        let err = scenario(r#"{"canary": {"requests": -1}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ticks[0].canary.requests"), "{err}");
    }

    #[test]
    fn prometheus_down_holds_without_counting_a_failure() {
        let s =
            scenario(r#"{"prometheus": "down"}, {"prometheus": "down"}, {"prometheus": "down"}"#)
                .unwrap();
        let out = run(&s).unwrap();
        assert!(
            out.iter().all(|o| o.action == "hold" && o.weight == 5),
            "{out:?}"
        );
        assert!(
            out[0].reason.contains("Prometheus is down"),
            "{}",
            out[0].reason
        );
    }

    #[test]
    fn pause_annotation_waits_and_rollback_annotation_rolls_back() {
        let s = scenario(
            r#"{"annotations": {"chatrelease.io/pause": "true"}, "canary": {"requests": 1000}, "stable": {"requests": 1000}},
               {"annotations": {"chatrelease.io/rollback": "true"}}"#,
        )
        .unwrap();
        let out = run(&s).unwrap();
        assert_eq!(
            (out[0].action, out[0].phase, out[0].weight),
            ("wait", Phase::Paused, 5)
        );
        assert_eq!(
            (out[1].action, out[1].phase, out[1].weight),
            ("rollback", Phase::RolledBack, 0)
        );
    }
}
