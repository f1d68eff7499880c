//! A spec checked and turned into typed values, once, before anything is decided. The API server's
//! schema and CEL rules catch most mistakes; this catches the rest (and specs that reached us some
//! other way, such as a `simulate` file) with an error that names the field.

use crate::crd::{ChatReleaseSpec, CustomMetric};
use std::time::Duration;

/// A spec value the operator cannot use, with the field that holds it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("spec.{field}: {problem}")]
pub struct SpecError {
    /// Path below `spec`, such as `strategy.interval`.
    pub field: String,
    pub problem: String,
}

impl SpecError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Everything the judge and the rollout state machine need from a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub replicas: i32,
    pub steps: Vec<i32>,
    pub manual_gates: Vec<i32>,
    pub interval: Duration,
    pub window: Duration,
    pub drain_timeout: Duration,
    pub progress_deadline: Duration,
    pub judge: JudgeSettings,
}

/// What the judge compares against.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeSettings {
    pub min_requests: f64,
    pub failure_limit: i32,
    pub compare_to_stable: bool,
    /// Highest error rate as a fraction (0.01 for `1%`).
    pub max_error_rate: f64,
    pub max_latency_p99_ms: Option<f64>,
    pub custom: Vec<CustomCheck>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CustomCheck {
    pub name: String,
    pub query: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
}

impl Settings {
    pub fn from_spec(spec: &ChatReleaseSpec) -> Result<Self, SpecError> {
        if spec.replicas < 1 {
            return Err(SpecError::new("replicas", "must be at least 1"));
        }
        let has_containers = spec
            .template
            .spec
            .as_ref()
            .is_some_and(|pod| !pod.containers.is_empty());
        if !has_containers {
            return Err(SpecError::new(
                "template.spec.containers",
                "must list at least one container",
            ));
        }

        let strategy = &spec.strategy;
        let steps = strategy.steps.clone();
        check_steps(&steps)?;
        for gate in &strategy.manual_gates {
            if !steps.contains(gate) {
                return Err(SpecError::new(
                    "strategy.manualGates",
                    format!("{gate} is not one of strategy.steps {steps:?}"),
                ));
            }
        }
        let interval = parse_duration("strategy.interval", &strategy.interval)?;
        if interval.is_zero() {
            return Err(SpecError::new(
                "strategy.interval",
                "must be longer than 0s",
            ));
        }
        let window = match &spec.analysis.window {
            Some(w) => parse_duration("analysis.window", w)?,
            None => interval,
        };
        if window.is_zero() {
            return Err(SpecError::new("analysis.window", "must be longer than 0s"));
        }

        let analysis = &spec.analysis;
        if analysis.min_requests < 1 {
            return Err(SpecError::new("analysis.minRequests", "must be at least 1"));
        }
        if analysis.failure_limit < 1 {
            return Err(SpecError::new(
                "analysis.failureLimit",
                "must be at least 1",
            ));
        }
        let max_error_rate = parse_percent("analysis.errorRate.max", &analysis.error_rate.max)?;
        let max_latency_p99_ms = analysis
            .latency_p99
            .as_ref()
            .map(|l| parse_duration("analysis.latencyP99.max", &l.max))
            .transpose()?
            .map(|d| d.as_secs_f64() * 1000.0);
        let custom = custom_checks(&analysis.metrics)?;

        Ok(Self {
            replicas: spec.replicas,
            steps,
            manual_gates: strategy.manual_gates.clone(),
            interval,
            window,
            drain_timeout: parse_duration("strategy.drainTimeout", &strategy.drain_timeout)?,
            progress_deadline: parse_duration(
                "strategy.progressDeadline",
                &strategy.progress_deadline,
            )?,
            judge: JudgeSettings {
                min_requests: analysis.min_requests as f64,
                failure_limit: analysis.failure_limit,
                compare_to_stable: analysis.compare_to_stable,
                max_error_rate,
                max_latency_p99_ms,
                custom,
            },
        })
    }

    /// The weight of step `index`, or 0 before the first step.
    pub fn weight_at(&self, index: Option<i32>) -> i32 {
        index
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.steps.get(i).copied())
            .unwrap_or(0)
    }

    pub fn is_gated(&self, weight: i32) -> bool {
        self.manual_gates.contains(&weight)
    }

    pub fn last_step(&self) -> i32 {
        self.steps.len() as i32 - 1
    }
}

fn check_steps(steps: &[i32]) -> Result<(), SpecError> {
    const FIELD: &str = "strategy.steps";
    if steps.is_empty() {
        return Err(SpecError::new(FIELD, "must list at least one weight"));
    }
    if let Some(bad) = steps.iter().find(|s| !(1..=100).contains(*s)) {
        return Err(SpecError::new(
            FIELD,
            format!("{bad} is not a weight from 1 to 100"),
        ));
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SpecError::new(
            FIELD,
            format!("{steps:?} must be strictly ascending"),
        ));
    }
    if steps.last() != Some(&100) {
        return Err(SpecError::new(FIELD, "the last weight must be 100"));
    }
    Ok(())
}

fn custom_checks(metrics: &[CustomMetric]) -> Result<Vec<CustomCheck>, SpecError> {
    let mut checks: Vec<CustomCheck> = Vec::with_capacity(metrics.len());
    for (i, m) in metrics.iter().enumerate() {
        let field = format!("analysis.metrics[{i}]");
        if m.name.is_empty() {
            return Err(SpecError::new(format!("{field}.name"), "must not be empty"));
        }
        if checks.iter().any(|c| c.name == m.name)
            || m.name == "error-rate"
            || m.name == "latency-p99"
        {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!(
                    "{:?} is used twice (error-rate and latency-p99 are taken)",
                    m.name
                ),
            ));
        }
        if m.query.trim().is_empty() {
            return Err(SpecError::new(
                format!("{field}.query"),
                "must not be empty",
            ));
        }
        if m.max.is_none() && m.min.is_none() {
            return Err(SpecError::new(field, "needs max, min or both"));
        }
        checks.push(CustomCheck {
            name: m.name.clone(),
            query: m.query.clone(),
            max: m.max,
            min: m.min,
        });
    }
    Ok(checks)
}

/// Parses a Go-style duration (`90s`, `1m`, `1h30m`, `250ms`), the form Kubernetes users write.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, SpecError> {
    let parsed: kube::core::Duration = text.parse().map_err(|e| {
        SpecError::new(
            field,
            format!("{text:?} is not a duration such as 30s, 1m or 1h30m ({e})"),
        )
    })?;
    if parsed.is_negative() || text.trim().is_empty() {
        return Err(SpecError::new(
            field,
            format!("{text:?} must be a positive duration such as 30s or 1m"),
        ));
    }
    Ok(parsed.into())
}

/// Parses `1%` or `0.5%` into a fraction.
pub fn parse_percent(field: &str, text: &str) -> Result<f64, SpecError> {
    let number = text
        .trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<f64>().ok())
        .filter(|n| n.is_finite() && (0.0..=100.0).contains(n))
        .ok_or_else(|| {
            SpecError::new(
                field,
                format!("{text:?} is not a percentage from 0% to 100%, such as 1% or 0.5%"),
            )
        })?;
    Ok(number / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ChatReleaseSpec;

    fn spec() -> ChatReleaseSpec {
        serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "lobehub/lobe-chat:v1"}]}}
        }))
        .expect("minimal spec deserialises")
    }

    #[test]
    fn defaults_follow_the_design() {
        let s = Settings::from_spec(&spec()).unwrap();
        assert_eq!(s.replicas, 2);
        assert_eq!(s.steps, vec![5, 25, 50, 100]);
        assert_eq!(s.interval, Duration::from_secs(60));
        assert_eq!(s.window, s.interval, "window defaults to the interval");
        assert_eq!(s.drain_timeout, Duration::from_secs(300));
        assert_eq!(s.progress_deadline, Duration::from_secs(600));
        assert_eq!(s.judge.min_requests, 50.0);
        assert_eq!(s.judge.failure_limit, 2);
        assert!(s.judge.compare_to_stable);
        assert!((s.judge.max_error_rate - 0.01).abs() < 1e-12);
        assert_eq!(s.judge.max_latency_p99_ms, None);
    }

    #[test]
    fn go_durations_parse_including_compound_ones() {
        assert_eq!(
            parse_duration("f", "1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("f", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("f", "1.5s").unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn a_bad_duration_names_its_field() {
        let mut s = spec();
        s.strategy.interval = "one minute".into();
        let err = Settings::from_spec(&s).unwrap_err();
        assert_eq!(err.field, "strategy.interval");
        assert!(err.to_string().contains("spec.strategy.interval"), "{err}");
    }

    #[test]
    fn steps_must_ascend_stay_in_range_and_end_at_100() {
        for (steps, needle) in [
            (vec![25, 5, 100], "ascending"),
            (vec![5, 5, 100], "ascending"),
            (vec![5, 150], "1 to 100"),
            (vec![0, 100], "1 to 100"),
            (vec![5, 50], "must be 100"),
        ] {
            let mut s = spec();
            s.strategy.steps = steps.clone();
            let err = Settings::from_spec(&s).unwrap_err();
            assert_eq!(err.field, "strategy.steps", "{steps:?}");
            assert!(err.problem.contains(needle), "{steps:?}: {err}");
        }
    }

    #[test]
    fn a_gate_must_be_a_step() {
        let mut s = spec();
        s.strategy.manual_gates = vec![75];
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "strategy.manualGates"
        );
    }

    #[test]
    fn error_rate_is_a_percentage() {
        assert!((parse_percent("f", "0.5%").unwrap() - 0.005).abs() < 1e-12);
        assert!(parse_percent("f", "0.5").is_err());
        assert!(parse_percent("f", "101%").is_err());
        let mut s = spec();
        s.analysis.error_rate.max = "lots".into();
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.errorRate.max"
        );
    }

    #[test]
    fn no_containers_is_refused() {
        let mut s = spec();
        s.template.spec.as_mut().unwrap().containers.clear();
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "template.spec.containers"
        );
    }

    #[test]
    fn custom_metric_names_are_unique() {
        let mut s = spec();
        let m = crate::crd::CustomMetric {
            name: "ttft-p99".into(),
            query: "vector(1)".into(),
            max: Some(1.5),
            min: None,
        };
        s.analysis.metrics = vec![m.clone(), m];
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.metrics[1].name"
        );
    }
}
