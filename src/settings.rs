//! A spec checked and turned into typed values, once, before anything is decided. The API server's
//! schema and CEL rules catch most mistakes; this catches the rest (and specs that reached us some
//! other way, such as a `simulate` file) with an error that names the field.

use crate::crd::{ChatReleaseSpec, CustomMetric, RequestSource};
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

/// Upper bounds of the spec's numbers, the same as the CRD's schema (`crd.rs`).
pub const MAX_REPLICAS: i32 = 1000;
pub const MAX_MIN_REQUESTS: i64 = 1_000_000_000;
pub const MAX_FAILURE_LIMIT: i32 = 100;

/// Everything the judge and the rollout state machine need from a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub replicas: i32,
    pub steps: Vec<i32>,
    pub manual_gates: Vec<i32>,
    pub interval: Duration,
    pub window: Duration,
    /// Between analyses, how often the sequential test looks at the step's counts; `None`: off.
    pub watch_every: Option<Duration>,
    pub drain_timeout: Duration,
    pub progress_deadline: Duration,
    /// Which series the requests, errors and P99 are read from.
    pub source: RequestSource,
    /// Status codes counted as errors: a regex Prometheus anchors at both ends.
    pub error_codes: String,
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
    /// `analysis.latencyP99.maxIncrease` as a fraction (0.3 for `30%`).
    pub latency_p99_max_increase: Option<f64>,
    pub custom: Vec<CustomCheck>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CustomCheck {
    pub name: String,
    /// PromQL with `{{namespace}}`, `{{workload}}` and `{{window}}`: the user's, or a built-in
    /// check's as `checks.rs` renders it.
    pub query: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
    /// Relative to stable's value in the same window, as fractions (0.3 for `30%`).
    pub max_increase: Option<f64>,
    pub max_decrease: Option<f64>,
}

impl Settings {
    pub fn from_spec(spec: &ChatReleaseSpec) -> Result<Self, SpecError> {
        if !(1..=MAX_REPLICAS).contains(&spec.replicas) {
            return Err(SpecError::new(
                "replicas",
                format!("must be from 1 to {MAX_REPLICAS}"),
            ));
        }
        let has_containers = spec
            .template
            .spec()
            .spec
            .is_some_and(|pod| !pod.containers.is_empty());
        if !has_containers {
            return Err(SpecError::new(
                "template.spec.containers",
                "must list at least one container",
            ));
        }
        // What Istio's validation would refuse in the VirtualService: refused before any write.
        crate::traffic_rules::check(&spec.traffic)?;

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
        let interval = parse_duration("strategy.interval", &strategy.interval, INTERVAL_RANGE)?;
        let window = match &spec.analysis.window {
            Some(w) => parse_duration("analysis.window", w, WINDOW_RANGE)?,
            None => interval,
        };

        let analysis = &spec.analysis;
        let watch_every = match &analysis.watch_every {
            Some(w) => parse_duration("analysis.watchEvery", w, WATCH_EVERY_RANGE)?,
            None => DEFAULT_WATCH_EVERY,
        };
        let watch_every = (!watch_every.is_zero()).then_some(watch_every);
        if !(1..=MAX_MIN_REQUESTS).contains(&analysis.min_requests) {
            return Err(SpecError::new(
                "analysis.minRequests",
                format!("must be from 1 to {MAX_MIN_REQUESTS}"),
            ));
        }
        if !(1..=MAX_FAILURE_LIMIT).contains(&analysis.failure_limit) {
            return Err(SpecError::new(
                "analysis.failureLimit",
                format!("must be from 1 to {MAX_FAILURE_LIMIT}"),
            ));
        }
        let max_error_rate = parse_percent("analysis.errorRate.max", &analysis.error_rate.max)?;
        check_error_codes(&analysis.error_rate.codes)?;
        let latency = analysis.latency_p99.as_ref();
        let max_latency_p99_ms = latency
            .and_then(|l| l.max.as_deref())
            .map(|max| parse_duration("analysis.latencyP99.max", max, LATENCY_RANGE))
            .transpose()?
            .map(|d| d.as_secs_f64() * 1000.0);
        let latency_p99_max_increase = latency
            .and_then(|l| l.max_increase.as_deref())
            .map(|p| parse_percent_within("analysis.latencyP99.maxIncrease", p, MAX_INCREASE_PCT))
            .transpose()?;
        if latency.is_some() && max_latency_p99_ms.is_none() && latency_p99_max_increase.is_none() {
            return Err(SpecError::new(
                "analysis.latencyP99",
                "needs max, maxIncrease or both",
            ));
        }
        let custom = custom_checks(&analysis.metrics, analysis.source)?;

        Ok(Self {
            replicas: spec.replicas,
            steps,
            manual_gates: strategy.manual_gates.clone(),
            interval,
            window,
            watch_every,
            drain_timeout: parse_duration(
                "strategy.drainTimeout",
                &strategy.drain_timeout,
                DRAIN_TIMEOUT_RANGE,
            )?,
            progress_deadline: parse_duration(
                "strategy.progressDeadline",
                &strategy.progress_deadline,
                PROGRESS_DEADLINE_RANGE,
            )?,
            source: analysis.source,
            error_codes: analysis.error_rate.codes.clone(),
            judge: JudgeSettings {
                min_requests: analysis.min_requests as f64,
                failure_limit: analysis.failure_limit,
                compare_to_stable: analysis.compare_to_stable,
                max_error_rate,
                max_latency_p99_ms,
                latency_p99_max_increase,
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

/// Longest `analysis.errorRate.codes`, as the CRD's schema says.
pub const MAX_ERROR_CODES_LEN: usize = 256;

/// `analysis.errorRate.codes` must be a regex Prometheus takes, and must not count a successful
/// request as an error: a regex that takes 200 (`.*`, `...`, `[0-9]+`) would roll back every
/// canary. The CRD's CEL rules refuse the same at apply; this covers `simulate` files and objects
/// admitted before a CRD upgrade.
fn check_error_codes(codes: &str) -> Result<(), SpecError> {
    const FIELD: &str = "analysis.errorRate.codes";
    if codes.is_empty() {
        return Err(SpecError::new(
            FIELD,
            "must not be empty: it would count no request as an error",
        ));
    }
    if codes.len() > MAX_ERROR_CODES_LEN {
        return Err(SpecError::new(
            FIELD,
            format!("must be at most {MAX_ERROR_CODES_LEN} characters"),
        ));
    }
    // Prometheus anchors a label regex as `^(?:re)$`.
    let anchored = regex::Regex::new(&format!("^(?:{codes})$")).map_err(|e| {
        SpecError::new(
            FIELD,
            format!("{codes:?} is not an RE2 regex such as 5..|47.: {e}"),
        )
    })?;
    if regex::Regex::new(codes).is_err() {
        return Err(SpecError::new(
            FIELD,
            format!("{codes:?} is not an RE2 regex such as 5..|47."),
        ));
    }
    if anchored.is_match("200") {
        return Err(SpecError::new(
            FIELD,
            format!(
                "{codes:?} matches 200: it would count successful requests as errors and roll \
                 back every canary"
            ),
        ));
    }
    Ok(())
}

fn custom_checks(
    metrics: &[CustomMetric],
    source: RequestSource,
) -> Result<Vec<CustomCheck>, SpecError> {
    let mut checks: Vec<CustomCheck> = Vec::with_capacity(metrics.len());
    for (i, m) in metrics.iter().enumerate() {
        let field = format!("analysis.metrics[{i}]");
        let query = match (&m.query, m.check) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(SpecError::new(
                    field,
                    "needs exactly one of query (your PromQL) and check (a built-in check such \
                     as ttft-p99)",
                ));
            }
            (Some(query), None) => {
                if m.flavor.is_some() {
                    return Err(SpecError::new(
                        format!("{field}.flavor"),
                        "goes with check: it says whose metric names a built-in check reads, \
                         and a query names its own",
                    ));
                }
                if query.trim().is_empty() {
                    return Err(SpecError::new(
                        format!("{field}.query"),
                        "must not be empty",
                    ));
                }
                query.clone()
            }
            (None, Some(check)) => {
                crate::checks::query_template(check, m.flavor.unwrap_or_default(), source)
            }
        };
        let name = match (&m.name, m.check) {
            (Some(name), _) => name.clone(),
            (None, Some(check)) => check.as_str().to_string(),
            (None, None) => {
                return Err(SpecError::new(
                    format!("{field}.name"),
                    "is required with a query",
                ));
            }
        };
        if name.is_empty() {
            return Err(SpecError::new(format!("{field}.name"), "must not be empty"));
        }
        if checks.iter().any(|c| c.name == name) || name == "error-rate" || name == "latency-p99" {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("{name:?} is used twice (error-rate and latency-p99 are taken)"),
            ));
        }
        let relative = |name: &str, text: &Option<String>, most: f64| {
            text.as_deref()
                .map(|p| parse_percent_within(&format!("{field}.{name}"), p, most))
                .transpose()
        };
        let max_increase = relative("maxIncrease", &m.max_increase, MAX_INCREASE_PCT)?;
        let max_decrease = relative("maxDecrease", &m.max_decrease, 100.0)?;
        if m.max.is_none() && m.min.is_none() && max_increase.is_none() && max_decrease.is_none() {
            return Err(SpecError::new(
                field,
                "needs max, min, maxIncrease or maxDecrease",
            ));
        }
        checks.push(CustomCheck {
            name,
            query,
            max: m.max,
            min: m.min,
            max_increase,
            max_decrease,
        });
    }
    Ok(checks)
}

/// The range a duration field accepts. The CRD's CEL rules refuse the same at apply
/// (`crd.rs`); checking again here covers objects admitted before a CRD upgrade and `simulate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRange {
    pub min: Duration,
    pub max: Duration,
}

const fn range(min_secs: u64, max_secs: u64) -> DurationRange {
    DurationRange {
        min: Duration::from_secs(min_secs),
        max: Duration::from_secs(max_secs),
    }
}

const DAY: u64 = 24 * 3600;
/// `strategy.interval` and `analysis.window`: a query range Prometheus can answer.
pub const INTERVAL_RANGE: DurationRange = range(1, DAY);
pub const WINDOW_RANGE: DurationRange = range(1, DAY);
/// `analysis.watchEvery`: 0s turns the sequential watch off.
pub const WATCH_EVERY_RANGE: DurationRange = range(0, 3600);
/// Five of Istio's default 2s/15s scrapes apart at most: often enough to stop a bad canary
/// within seconds, rarely enough that each look sees new samples.
pub const DEFAULT_WATCH_EVERY: Duration = Duration::from_secs(10);
/// `strategy.drainTimeout`: 0s means no drain.
pub const DRAIN_TIMEOUT_RANGE: DurationRange = range(0, DAY);
/// `strategy.progressDeadline`: canary pods need some time to start.
pub const PROGRESS_DEADLINE_RANGE: DurationRange = range(30, DAY);
/// `analysis.latencyP99.max`: Istio's histogram ends at one hour.
pub const LATENCY_RANGE: DurationRange = DurationRange {
    min: Duration::from_millis(1),
    max: Duration::from_secs(3600),
};

/// Parses a Go-style duration (`90s`, `1m`, `1h30m`, `250ms`), the form Kubernetes users write,
/// and checks it lies in `range`. Any text gives a value or an error naming the field, never a
/// panic: every step of the arithmetic is checked.
pub fn parse_duration(
    field: &str,
    text: &str,
    range: DurationRange,
) -> Result<Duration, SpecError> {
    let bounds = format!("from {} to {}", go_style(range.min), go_style(range.max));
    let duration = go_duration(text).map_err(|problem| {
        let why = match problem {
            DurationProblem::Malformed => {
                "is not a duration such as 30s, 1m or 1h30m (units ms, s, m, h)"
            }
            DurationProblem::TooLong => "is far too long",
        };
        SpecError::new(field, format!("{text:?} {why}; it must be {bounds}"))
    })?;
    if duration < range.min || duration > range.max {
        return Err(SpecError::new(field, format!("{text:?} must be {bounds}")));
    }
    Ok(duration)
}

/// A duration as the spec writes them: `24h`, `1h30m`, `30s`, `250ms`.
pub fn go_style(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s, ms) = (secs / 3600, secs / 60 % 60, secs % 60, d.subsec_millis());
    let parts = [(h, "h"), (m, "m"), (s, "s"), (u64::from(ms), "ms")];
    let text: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() { "0s".into() } else { text }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DurationProblem {
    Malformed,
    /// More than any field could accept; reported apart so no arithmetic needs to hold it.
    TooLong,
}

/// `(<digits>[.<digits>](ms|s|m|h))+` in nanoseconds.
fn go_duration(text: &str) -> Result<Duration, DurationProblem> {
    // Beyond any range above, and far from u128's limit, so the sums below cannot overflow.
    const CAP_NANOS: u128 = 1_000_000 * 3600 * 1_000_000_000;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(DurationProblem::Malformed);
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or(DurationProblem::Malformed)?;
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            _ => return Err(DurationProblem::Malformed),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let well_formed = !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
            && (!number.contains('.') || !fraction.is_empty())
            && fraction.bytes().all(|b| b.is_ascii_digit());
        if !well_formed {
            return Err(DurationProblem::Malformed);
        }
        let mut whole_value: u128 = 0;
        for digit in whole.bytes() {
            whole_value = whole_value * 10 + u128::from(digit - b'0');
            if whole_value * unit_nanos > CAP_NANOS {
                return Err(DurationProblem::TooLong);
            }
        }
        // The first 18 digits of the fraction count (more cannot change a nanosecond); what is
        // below a nanosecond is dropped, as Go does.
        let (mut numerator, mut denominator) = (0u128, 1u128);
        for digit in fraction.bytes().take(18) {
            numerator = numerator * 10 + u128::from(digit - b'0');
            denominator *= 10;
        }
        let fraction_nanos = numerator * unit_nanos / denominator;
        total += whole_value * unit_nanos + fraction_nanos;
        if total > CAP_NANOS {
            return Err(DurationProblem::TooLong);
        }
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| DurationProblem::TooLong)?;
    // The remainder of a division by 10^9 fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Highest `maxIncrease`, as the CRD's schema says: a canary at 11 times stable's value.
pub const MAX_INCREASE_PCT: f64 = 1000.0;

/// Parses `1%` or `0.5%` into a fraction.
pub fn parse_percent(field: &str, text: &str) -> Result<f64, SpecError> {
    parse_percent_within(field, text, 100.0)
}

/// Parses a percentage from 0% to `most`% into a fraction.
pub fn parse_percent_within(field: &str, text: &str, most: f64) -> Result<f64, SpecError> {
    let number = text
        .trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<f64>().ok())
        .filter(|n| n.is_finite() && (0.0..=most).contains(n))
        .ok_or_else(|| {
            SpecError::new(
                field,
                format!(
                    "{text:?} is not a percentage from 0% to {}%, such as 1% or 0.5%",
                    crate::judge::fmt_number(most)
                ),
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
        assert_eq!(s.source, RequestSource::Istio);
        assert_eq!(s.error_codes, "5..|47.");
    }

    #[test]
    fn source_and_error_codes_are_read_from_the_spec() {
        let s: ChatReleaseSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "chat:v1"}]}},
            "analysis": {"source": "otel", "errorRate": {"codes": "5..|429"}}
        }))
        .expect("spec deserialises");
        let settings = Settings::from_spec(&s).unwrap();
        assert_eq!(settings.source, RequestSource::Otel);
        assert_eq!(settings.error_codes, "5..|429");
        assert!(
            (settings.judge.max_error_rate - 0.01).abs() < 1e-12,
            "max keeps its default beside codes"
        );
    }

    #[test]
    fn error_codes_that_count_successes_are_refused_naming_the_field() {
        for codes in [".*", "...", "[0-9]+", "2..|5..", "200", ".+", "5..|.*"] {
            let mut s = spec();
            s.analysis.error_rate.codes = codes.into();
            let err = Settings::from_spec(&s).expect_err(codes);
            assert_eq!(err.field, "analysis.errorRate.codes", "{codes}");
            assert!(err.problem.contains("matches 200"), "{codes}: {err}");
        }
    }

    #[test]
    fn error_codes_must_be_a_regex_and_not_empty() {
        for (codes, needle) in [
            ("5..|(47.", "not an RE2 regex"),
            ("5..)|(.*", "not an RE2 regex"),
            ("", "must not be empty"),
        ] {
            let mut s = spec();
            s.analysis.error_rate.codes = codes.into();
            let err = Settings::from_spec(&s).expect_err(codes);
            assert_eq!(err.field, "analysis.errorRate.codes", "{codes}");
            assert!(err.problem.contains(needle), "{codes}: {err}");
        }
        let mut s = spec();
        s.analysis.error_rate.codes = "5".repeat(MAX_ERROR_CODES_LEN + 1);
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.errorRate.codes"
        );
        for fine in ["5..|47.", "5\\d\\d", "502|503|504", "4[0-9]{2}"] {
            let mut s = spec();
            s.analysis.error_rate.codes = fine.into();
            assert!(Settings::from_spec(&s).is_ok(), "{fine}");
        }
    }

    const ANY: DurationRange = DurationRange {
        min: Duration::ZERO,
        max: Duration::from_secs(DAY),
    };

    #[test]
    fn go_durations_parse_including_compound_ones() {
        for (text, want) in [
            ("1h30m", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.25m", Duration::from_secs(15)),
            ("1m30s500ms", Duration::from_millis(90_500)),
            ("0s", Duration::ZERO),
            ("24h", Duration::from_secs(DAY)),
            // Digits past the nanosecond are dropped, as Go does.
            (
                "1.99999999999999999999999h",
                Duration::new(7199, 999_999_999),
            ),
        ] {
            assert_eq!(parse_duration("f", text, ANY), Ok(want), "{text}");
        }
    }

    #[test]
    fn any_text_is_a_duration_or_an_error_never_a_panic() {
        for text in [
            "99999999999999999999h",
            "100000000h",
            "18446744073709551616s",
            "9999999999999999999999999999999999999999ms",
            "23h59m60s1ms",
            "",
            " ",
            "h",
            ".5s",
            "5.s",
            "1..5s",
            "-1s",
            "1d",
            "1us",
            "1h-30m",
            "1e3s",
            "١s",
        ] {
            let result = parse_duration("strategy.interval", text, INTERVAL_RANGE);
            let err = result.expect_err(text);
            assert_eq!(err.field, "strategy.interval", "{text}");
            assert!(err.problem.contains("from 1s to 24h"), "{text}: {err}");
        }
    }

    #[test]
    fn each_duration_field_keeps_its_range() {
        type SetField = fn(&mut ChatReleaseSpec, &str);
        let cases: [(&str, SetField); 5] = [
            ("strategy.interval", |s, v| s.strategy.interval = v.into()),
            ("analysis.window", |s, v| s.analysis.window = Some(v.into())),
            ("strategy.drainTimeout", |s, v| {
                s.strategy.drain_timeout = v.into()
            }),
            ("strategy.progressDeadline", |s, v| {
                s.strategy.progress_deadline = v.into()
            }),
            ("analysis.latencyP99.max", |s, v| {
                s.analysis.latency_p99 = Some(crate::crd::LatencyBound {
                    max: Some(v.into()),
                    max_increase: None,
                })
            }),
        ];
        for (field, set) in cases {
            for too_far in ["25h", "100000000h"] {
                let mut s = spec();
                set(&mut s, too_far);
                let err = Settings::from_spec(&s).unwrap_err();
                assert_eq!(err.field, field, "{too_far}");
            }
        }
        let mut s = spec();
        s.strategy.progress_deadline = "0s".into();
        let err = Settings::from_spec(&s).unwrap_err();
        assert_eq!(err.field, "strategy.progressDeadline");
        assert!(err.problem.contains("from 30s to 24h"), "{err}");
        let mut s = spec();
        s.strategy.interval = "0s".into();
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "strategy.interval"
        );
        let mut s = spec();
        s.strategy.drain_timeout = "0s".into();
        assert!(Settings::from_spec(&s).is_ok(), "no drain is a choice");
    }

    #[test]
    fn counts_have_upper_bounds() {
        let mut s = spec();
        s.analysis.min_requests = i64::MAX;
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.minRequests"
        );
        let mut s = spec();
        s.analysis.failure_limit = i32::MAX;
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.failureLimit"
        );
        let mut s = spec();
        s.replicas = i32::MAX;
        assert_eq!(Settings::from_spec(&s).unwrap_err().field, "replicas");
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
        let mut template = s.template.spec();
        template.spec.as_mut().unwrap().containers.clear();
        s.template = template.into();
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "template.spec.containers"
        );
    }

    fn with_metric(extra: serde_json::Value) -> ChatReleaseSpec {
        let mut metric = serde_json::json!({"name": "tokens", "query": "vector(1)"});
        for (k, v) in extra.as_object().expect("an object") {
            metric[k] = v.clone();
        }
        serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "chat:v1"}]}},
            "analysis": {"metrics": [metric]}
        }))
        .expect("spec deserialises")
    }

    #[test]
    fn relative_bounds_are_read_as_fractions_and_may_stand_alone() {
        let s = Settings::from_spec(&with_metric(
            serde_json::json!({"maxIncrease": "30%", "maxDecrease": "12.5%"}),
        ))
        .unwrap();
        let check = &s.judge.custom[0];
        assert_eq!((check.max, check.min), (None, None));
        assert!((check.max_increase.unwrap() - 0.3).abs() < 1e-12);
        assert!((check.max_decrease.unwrap() - 0.125).abs() < 1e-12);
        let big = Settings::from_spec(&with_metric(serde_json::json!({"maxIncrease": "1000%"})));
        assert!(big.is_ok(), "{big:?}");
    }

    #[test]
    fn relative_bounds_out_of_range_name_their_field() {
        for (extra, field) in [
            (
                serde_json::json!({"maxIncrease": "1001%"}),
                "analysis.metrics[0].maxIncrease",
            ),
            (
                serde_json::json!({"maxIncrease": "30"}),
                "analysis.metrics[0].maxIncrease",
            ),
            (
                serde_json::json!({"maxDecrease": "101%"}),
                "analysis.metrics[0].maxDecrease",
            ),
            (
                serde_json::json!({"maxDecrease": "-5%"}),
                "analysis.metrics[0].maxDecrease",
            ),
        ] {
            let err = Settings::from_spec(&with_metric(extra.clone())).expect_err("refused");
            assert_eq!(err.field, field, "{extra}");
        }
    }

    #[test]
    fn a_check_needs_some_bound() {
        let err = Settings::from_spec(&with_metric(serde_json::json!({}))).unwrap_err();
        assert_eq!(err.field, "analysis.metrics[0]");
        assert!(
            err.problem
                .contains("needs max, min, maxIncrease or maxDecrease"),
            "{err}"
        );
        let mut s = spec();
        s.analysis.latency_p99 = Some(crate::crd::LatencyBound {
            max: None,
            max_increase: None,
        });
        let err = Settings::from_spec(&s).unwrap_err();
        assert_eq!(err.field, "analysis.latencyP99");
        s.analysis.latency_p99 = Some(crate::crd::LatencyBound {
            max: None,
            max_increase: Some("30%".into()),
        });
        let settings = Settings::from_spec(&s).unwrap();
        assert_eq!(settings.judge.max_latency_p99_ms, None);
        assert!((settings.judge.latency_p99_max_increase.unwrap() - 0.3).abs() < 1e-12);
        s.analysis.latency_p99 = Some(crate::crd::LatencyBound {
            max: Some("3s".into()),
            max_increase: Some("2000%".into()),
        });
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.latencyP99.maxIncrease"
        );
    }

    #[test]
    fn custom_metric_names_are_unique() {
        let mut s = spec();
        let m = crate::crd::CustomMetric {
            name: Some("ttft-p99".into()),
            query: Some("vector(1)".into()),
            check: None,
            flavor: None,
            max: Some(1.5),
            min: None,
            max_increase: None,
            max_decrease: None,
        };
        s.analysis.metrics = vec![m.clone(), m];
        assert_eq!(
            Settings::from_spec(&s).unwrap_err().field,
            "analysis.metrics[1].name"
        );
    }

    fn with_metrics(metrics: serde_json::Value) -> ChatReleaseSpec {
        serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "chat:v1"}]}},
            "analysis": {"source": "otel", "metrics": metrics}
        }))
        .expect("spec deserialises")
    }

    #[test]
    fn a_builtin_check_is_named_after_itself_and_runs_its_rendered_query() {
        let s = Settings::from_spec(&with_metrics(serde_json::json!([
            {"check": "ttft-p99", "max": 1.5},
            {"check": "ttft-p99", "flavor": "vllm", "name": "vllm-ttft", "max": 1.5},
            {"check": "cpu-per-request", "maxIncrease": "20%"}
        ])))
        .unwrap();
        let names: Vec<&str> = s.judge.custom.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["ttft-p99", "vllm-ttft", "cpu-per-request"]);
        let custom = &s.judge.custom;
        assert_eq!(
            custom[0].query,
            crate::checks::query_template(
                crate::crd::BuiltinCheck::TtftP99,
                crate::crd::CheckFlavor::Otel,
                RequestSource::Otel
            )
        );
        assert!(
            custom[1]
                .query
                .contains("vllm:time_to_first_token_seconds_bucket")
        );
        assert_eq!(custom[0].max, Some(1.5));
        // The request rate it divides by is the ChatRelease's source's.
        assert!(
            custom[2]
                .query
                .contains("http_server_request_duration_seconds_count"),
            "{}",
            custom[2].query
        );
        assert!((custom[2].max_increase.unwrap() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn a_metric_names_exactly_one_of_query_and_check() {
        for (metric, field, needle) in [
            (
                serde_json::json!({"name": "t", "query": "vector(1)", "check": "ttft-p99", "max": 1}),
                "analysis.metrics[0]",
                "exactly one of query",
            ),
            (
                serde_json::json!({"name": "t", "max": 1}),
                "analysis.metrics[0]",
                "exactly one of query",
            ),
            (
                serde_json::json!({"query": "vector(1)", "max": 1}),
                "analysis.metrics[0].name",
                "required with a query",
            ),
            (
                serde_json::json!({"name": "t", "query": "vector(1)", "flavor": "vllm", "max": 1}),
                "analysis.metrics[0].flavor",
                "goes with check",
            ),
            (
                serde_json::json!({"check": "memory-growth"}),
                "analysis.metrics[0]",
                "needs max, min, maxIncrease or maxDecrease",
            ),
        ] {
            let err = Settings::from_spec(&with_metrics(serde_json::json!([metric.clone()])))
                .expect_err("refused");
            assert_eq!(err.field, field, "{metric}");
            assert!(err.problem.contains(needle), "{metric}: {err}");
        }
    }

    #[test]
    fn two_unnamed_checks_of_one_kind_clash_by_name() {
        let err = Settings::from_spec(&with_metrics(serde_json::json!([
            {"check": "ttft-p99", "max": 1.5},
            {"check": "ttft-p99", "flavor": "vllm", "max": 2}
        ])))
        .unwrap_err();
        assert_eq!(err.field, "analysis.metrics[1].name");
        assert!(err.problem.contains("used twice"), "{err}");
    }

    #[test]
    fn an_unknown_check_is_refused_naming_it() {
        let err = serde_json::from_value::<ChatReleaseSpec>(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "chat:v1"}]}},
            "analysis": {"metrics": [{"check": "ttft-p98", "max": 1}]}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ttft-p98") && err.contains("ttft-p99"),
            "{err}"
        );
    }
}
