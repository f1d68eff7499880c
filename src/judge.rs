//! One analysis tick: observations in, a verdict and the numbers behind it out. Pure.
//!
//! 1. No backend, or the canary served fewer than `minRequests`: inconclusive.
//! 2. A check whose canary value breaches its bound fails, unless `compareToStable` holds, stable
//!    had traffic, and the canary is not significantly worse than stable (errors: a one-sided
//!    two-proportion z-test; latency and custom checks: within 20% of stable). Then it is
//!    inconclusive: trouble both versions share, such as the model provider being down.
//! 3. Every check within bounds: pass.

use crate::crd::{CheckRecord, Verdict};
use crate::metrics::{Observations, TrackSample};
use crate::settings::JudgeSettings;

/// z above which the canary's error rate counts as significantly worse (one-sided, 95%).
pub const Z_CRITICAL: f64 = 1.645;
/// Latency and custom checks: a canary within this factor of stable shares stable's trouble.
pub const STABLE_TOLERANCE: f64 = 0.20;

pub const ERROR_RATE: &str = "error-rate";
pub const LATENCY_P99: &str = "latency-p99";

/// The outcome of one analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub canary_requests: Option<f64>,
    pub stable_requests: Option<f64>,
    pub checks: Vec<CheckRecord>,
    /// One sentence for status.message.
    pub reason: String,
    /// Inconclusive because the canary breached a bound that stable breached as badly: evidence
    /// that the canary is no worse. Every other inconclusive (Prometheus down, too few requests,
    /// no value for a check) carries no evidence either way.
    pub shared_trouble: bool,
}

pub fn judge(settings: &JudgeSettings, observations: &Observations) -> Judgement {
    let (canary, stable) = match observations {
        Observations::Unavailable { reason } => {
            return Judgement {
                verdict: Verdict::Inconclusive,
                canary_requests: None,
                stable_requests: None,
                checks: Vec::new(),
                reason: format!("metrics unavailable ({reason})"),
                shared_trouble: false,
            };
        }
        Observations::Sampled { canary, stable } => (canary, stable),
    };
    // A counter with no matching series has simply not counted anything yet.
    let canary_requests = count(canary.requests);
    let stable_requests = count(stable.requests);
    if canary_requests < settings.min_requests {
        return Judgement {
            verdict: Verdict::Inconclusive,
            canary_requests: Some(canary_requests),
            stable_requests: Some(stable_requests),
            checks: Vec::new(),
            reason: format!(
                "the canary served {} requests in the window, fewer than minRequests {}",
                canary_requests.round(),
                settings.min_requests
            ),
            shared_trouble: false,
        };
    }
    let stable_has_traffic = stable_requests >= settings.min_requests;
    let compare = settings.compare_to_stable && stable_has_traffic;
    // Without traffic stable's latency or custom values describe nothing (an idle histogram).
    let stable_value = |v: Option<f64>| v.filter(|_| stable_has_traffic);

    let mut checks = vec![error_rate_check(settings, canary, stable, compare)];
    if let Some(max) = settings.max_latency_p99_ms {
        checks.push(bounded_check(
            LATENCY_P99,
            "ms",
            canary.latency_p99_ms,
            stable_value(stable.latency_p99_ms),
            Some(max),
            None,
            compare,
        ));
    }
    for custom in &settings.custom {
        let value = |t: &TrackSample| t.custom.get(&custom.name).copied().flatten();
        checks.push(bounded_check(
            &custom.name,
            "",
            value(canary),
            stable_value(value(stable)),
            custom.max,
            custom.min,
            compare,
        ));
    }

    let verdict = overall(&checks);
    let reason = explain(verdict, &checks);
    // A check is inconclusive for one of two reasons: the canary has no value (no evidence), or
    // its value breaches a bound stable breaches as badly (the canary has a value).
    let shared_trouble = verdict == Verdict::Inconclusive
        && checks
            .iter()
            .any(|c| c.verdict == Verdict::Inconclusive && c.canary.is_some());
    Judgement {
        verdict,
        canary_requests: Some(canary_requests),
        stable_requests: Some(stable_requests),
        checks,
        reason,
        shared_trouble,
    }
}

/// A request or error count as the judge may use it: no series, NaN or a negative value (a reset
/// counter read across the reset) count as nothing.
fn count(value: Option<f64>) -> f64 {
    value.filter(|v| v.is_finite() && *v > 0.0).unwrap_or(0.0)
}

fn overall(checks: &[CheckRecord]) -> Verdict {
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if checks.iter().any(|c| c.verdict == Verdict::Inconclusive) {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    }
}

fn explain(verdict: Verdict, checks: &[CheckRecord]) -> String {
    let with = |v: Verdict| {
        checks
            .iter()
            .filter(|c| c.verdict == v)
            .map(|c| c.note.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    match verdict {
        Verdict::Pass => format!("all checks within bounds: {}", with(Verdict::Pass)),
        Verdict::Fail => with(Verdict::Fail),
        Verdict::Inconclusive => with(Verdict::Inconclusive),
    }
}

fn error_rate_check(
    settings: &JudgeSettings,
    canary: &TrackSample,
    stable: &TrackSample,
    compare: bool,
) -> CheckRecord {
    let canary_n = count(canary.requests);
    let stable_n = count(stable.requests);
    // The two counts come from two queries: errors may read a little over requests.
    let canary_errors = count(canary.errors).min(canary_n);
    let stable_errors = count(stable.errors).min(stable_n);
    let canary_rate = canary_errors / canary_n;
    let stable_rate = (stable_n > 0.0).then(|| stable_errors / stable_n);
    let max = settings.max_error_rate;
    let bound = format!("<= {}%", fmt_number(max * 100.0));
    let pct = |r: f64| format!("{:.2}%", r * 100.0);
    let stable_text =
        stable_rate.map_or("no stable traffic".into(), |r| format!("stable {}", pct(r)));

    let (verdict, note) = if canary_rate <= max {
        (
            Verdict::Pass,
            format!("error rate {} ({stable_text}) {bound}", pct(canary_rate)),
        )
    } else if !compare {
        (
            Verdict::Fail,
            format!(
                "error rate {} breaches {bound} ({stable_text})",
                pct(canary_rate)
            ),
        )
    } else {
        let z = two_proportion_z(canary_errors, canary_n, stable_errors, stable_n);
        if z > Z_CRITICAL {
            (
                Verdict::Fail,
                format!(
                    "error rate {} breaches {bound} and is significantly worse than {stable_text} (z = {z:.2})",
                    pct(canary_rate)
                ),
            )
        } else {
            (
                Verdict::Inconclusive,
                format!(
                    "error rate {} breaches {bound} but {stable_text} is as bad in the same window (z = {z:.2}): trouble both versions share",
                    pct(canary_rate)
                ),
            )
        }
    };
    CheckRecord {
        name: ERROR_RATE.into(),
        canary: Some(round4(canary_rate * 100.0)),
        stable: stable_rate.map(|r| round4(r * 100.0)),
        bound,
        unit: "%".into(),
        verdict,
        note,
    }
}

/// One-sided two-proportion z statistic: how far the canary's rate lies above stable's.
pub fn two_proportion_z(
    canary_errors: f64,
    canary_n: f64,
    stable_errors: f64,
    stable_n: f64,
) -> f64 {
    let p1 = canary_errors / canary_n;
    let p2 = stable_errors / stable_n;
    let pooled = (canary_errors + stable_errors) / (canary_n + stable_n);
    let se = (pooled * (1.0 - pooled) * (1.0 / canary_n + 1.0 / stable_n)).sqrt();
    if se > 0.0 {
        (p1 - p2) / se
    } else if p1 > p2 {
        f64::INFINITY
    } else {
        0.0
    }
}

fn bounded_check(
    name: &str,
    unit: &str,
    canary: Option<f64>,
    stable: Option<f64>,
    max: Option<f64>,
    min: Option<f64>,
    compare: bool,
) -> CheckRecord {
    let bound = match (min, max) {
        (Some(lo), Some(hi)) => format!("{}..{}{unit}", fmt_number(lo), fmt_number(hi)),
        (None, Some(hi)) => format!("<= {}{unit}", fmt_number(hi)),
        (Some(lo), None) => format!(">= {}{unit}", fmt_number(lo)),
        (None, None) => "none".into(),
    };
    let show = |v: f64| format!("{}{unit}", fmt_number(v));
    let stable_text = stable
        .filter(|v| v.is_finite())
        .map_or("no stable value".into(), |v| format!("stable {}", show(v)));
    let record = |verdict, note: String| CheckRecord {
        name: name.into(),
        canary: canary.filter(|v| v.is_finite()).map(round4),
        stable: stable.filter(|v| v.is_finite()).map(round4),
        bound: bound.clone(),
        unit: unit.into(),
        verdict,
        note,
    };
    let Some(value) = canary.filter(|v| v.is_finite()) else {
        return record(
            Verdict::Inconclusive,
            format!("{name}: no data for the canary"),
        );
    };
    let too_high = max.is_some_and(|hi| value > hi);
    let too_low = min.is_some_and(|lo| value < lo);
    if !too_high && !too_low {
        return record(
            Verdict::Pass,
            format!("{name} {} ({stable_text}) {bound}", show(value)),
        );
    }
    let shared = compare
        && stable.filter(|v| v.is_finite()).is_some_and(|s| {
            if too_high {
                value <= s * (1.0 + STABLE_TOLERANCE)
            } else {
                value >= s * (1.0 - STABLE_TOLERANCE)
            }
        });
    if shared {
        record(
            Verdict::Inconclusive,
            format!(
                "{name} {} breaches {bound} but is within 20% of {stable_text}: trouble both versions share",
                show(value)
            ),
        )
    } else {
        record(
            Verdict::Fail,
            format!("{name} {} breaches {bound} ({stable_text})", show(value)),
        )
    }
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// Numbers as a person writes them: `1`, `0.5`, `2.25`, never `1.0000001`.
pub fn fmt_number(v: f64) -> String {
    let rounded = round4(v);
    if rounded.fract() == 0.0 {
        format!("{rounded:.0}")
    } else {
        let s = format!("{rounded:.4}");
        s.trim_end_matches('0').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::CustomCheck;

    fn settings() -> JudgeSettings {
        JudgeSettings {
            min_requests: 50.0,
            failure_limit: 2,
            compare_to_stable: true,
            max_error_rate: 0.01,
            max_latency_p99_ms: Some(3000.0),
            custom: vec![],
        }
    }

    fn track(requests: f64, errors: f64, p99: f64) -> TrackSample {
        TrackSample {
            requests: Some(requests),
            errors: Some(errors),
            latency_p99_ms: Some(p99),
            custom: Default::default(),
        }
    }

    fn sampled(canary: TrackSample, stable: TrackSample) -> Observations {
        Observations::Sampled { canary, stable }
    }

    #[test]
    fn healthy_canary_passes_with_numbers_recorded() {
        let j = judge(
            &settings(),
            &sampled(track(2000.0, 4.0, 800.0), track(38000.0, 76.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Pass);
        let err = &j.checks[0];
        assert_eq!((err.canary, err.stable), (Some(0.2), Some(0.2)));
        assert_eq!(err.bound, "<= 1%");
        assert_eq!(j.checks[1].bound, "<= 3000ms");
        assert!(
            j.reason.contains("error rate 0.20% (stable 0.20%) <= 1%"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn unreachable_prometheus_is_inconclusive_never_a_pass() {
        let j = judge(
            &settings(),
            &Observations::Unavailable {
                reason: "connection refused".into(),
            },
        );
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.reason.contains("connection refused"));
    }

    #[test]
    fn too_little_canary_traffic_is_inconclusive() {
        let j = judge(
            &settings(),
            &sampled(track(49.0, 40.0, 800.0), track(38000.0, 0.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(
            j.reason.contains("fewer than minRequests 50"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn no_series_at_all_counts_as_no_traffic() {
        let empty = TrackSample::default();
        let j = judge(&settings(), &sampled(empty.clone(), empty));
        assert_eq!(j.verdict, Verdict::Inconclusive);
    }

    #[test]
    fn canary_5xx_well_above_stable_fails() {
        let j = judge(
            &settings(),
            &sampled(track(10000.0, 800.0, 800.0), track(30000.0, 60.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
        assert!(j.reason.contains("significantly worse"), "{}", j.reason);
    }

    #[test]
    fn provider_outage_on_both_tracks_is_inconclusive() {
        let j = judge(
            &settings(),
            &sampled(track(2000.0, 242.0, 800.0), track(38000.0, 4484.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(
            j.reason.contains("trouble both versions share"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn without_compare_to_stable_a_shared_breach_fails() {
        let mut s = settings();
        s.compare_to_stable = false;
        let j = judge(
            &s,
            &sampled(track(2000.0, 242.0, 800.0), track(38000.0, 4484.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
    }

    #[test]
    fn at_full_weight_stable_has_no_traffic_so_bounds_alone_decide() {
        let j = judge(
            &settings(),
            &sampled(track(40000.0, 2000.0, 800.0), track(0.0, 0.0, 0.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
        assert_eq!(j.checks[0].stable, None);
        assert_eq!(
            j.checks[1].stable, None,
            "an idle stable has no latency to show"
        );
    }

    #[test]
    fn latency_within_20_percent_of_a_slow_stable_is_shared_trouble() {
        let j = judge(
            &settings(),
            &sampled(track(2000.0, 0.0, 4000.0), track(38000.0, 0.0, 3500.0)),
        );
        assert_eq!(j.verdict, Verdict::Inconclusive);
        let j = judge(
            &settings(),
            &sampled(track(2000.0, 0.0, 4500.0), track(38000.0, 0.0, 3500.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
    }

    #[test]
    fn missing_latency_data_is_inconclusive_not_a_pass() {
        let mut canary = track(2000.0, 0.0, 0.0);
        canary.latency_p99_ms = None;
        let j = judge(&settings(), &sampled(canary, track(38000.0, 0.0, 700.0)));
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.reason.contains("no data"), "{}", j.reason);
    }

    #[test]
    fn custom_checks_use_both_bounds_and_stable() {
        let mut s = settings();
        s.custom = vec![
            CustomCheck {
                name: "ttft-p99".into(),
                query: String::new(),
                max: Some(1.5),
                min: None,
            },
            CustomCheck {
                name: "success".into(),
                query: String::new(),
                max: None,
                min: Some(0.95),
            },
        ];
        let with = |ttft: f64, success: f64, stable_ttft: f64| {
            let mut c = track(2000.0, 0.0, 100.0);
            c.custom.insert("ttft-p99".into(), Some(ttft));
            c.custom.insert("success".into(), Some(success));
            let mut st = track(38000.0, 0.0, 100.0);
            st.custom.insert("ttft-p99".into(), Some(stable_ttft));
            st.custom.insert("success".into(), Some(0.99));
            judge(&s, &sampled(c, st)).verdict
        };
        assert_eq!(with(0.9, 0.99, 0.8), Verdict::Pass);
        assert_eq!(with(2.5, 0.99, 0.8), Verdict::Fail);
        assert_eq!(with(1.8, 0.99, 1.7), Verdict::Inconclusive);
        assert_eq!(with(0.9, 0.5, 0.8), Verdict::Fail);
    }

    #[test]
    fn a_fail_outweighs_an_inconclusive_check() {
        let mut canary = track(10000.0, 800.0, 0.0);
        canary.latency_p99_ms = None;
        let j = judge(&settings(), &sampled(canary, track(30000.0, 60.0, 700.0)));
        assert_eq!(j.verdict, Verdict::Fail);
    }

    #[test]
    fn z_statistic_matches_a_hand_computation() {
        // p1 = 0.121, p2 = 0.118, pooled 0.11815: z ≈ 0.41
        let z = two_proportion_z(242.0, 2000.0, 4484.0, 38000.0);
        assert!((z - 0.41).abs() < 0.02, "{z}");
    }

    #[test]
    fn numbers_print_as_a_person_writes_them() {
        assert_eq!(fmt_number(1.0), "1");
        assert_eq!(fmt_number(0.5), "0.5");
        assert_eq!(fmt_number(3000.0000001), "3000");
    }
}
