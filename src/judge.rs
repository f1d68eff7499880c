//! One analysis tick: observations in, a verdict and the numbers behind it out. Pure.
//!
//! 1. No backend, or the canary served fewer than `minRequests`: inconclusive.
//! 2. A check whose canary value breaches its bound fails, unless `compareToStable` holds, stable
//!    had traffic, and the canary is not significantly worse than stable (errors: a one-sided
//!    two-proportion z-test; latency and custom checks: within their `maxIncrease` / `maxDecrease`
//!    of stable, 20% when not set). Then it is inconclusive: trouble both versions share, such as
//!    the model provider being down.
//! 3. A check with `maxIncrease` / `maxDecrease` fails when the canary is that much worse than
//!    stable in the same window, whatever `compareToStable` says; it is inconclusive when stable
//!    served fewer than `minRequests` or has no value (no evidence), except at 100%, where stable
//!    serves nothing by design and the absolute bounds alone decide.
//! 4. Every check within bounds: pass.

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

/// Judges one window in which the canary had `canary_weight` percent of the traffic.
pub fn judge(
    settings: &JudgeSettings,
    canary_weight: i32,
    observations: &Observations,
) -> Judgement {
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

    // At 100% stable serves nothing by design: a relative bound has nothing to compare with.
    let full_weight = canary_weight >= 100;

    let mut checked = vec![error_rate_check(settings, canary, stable, compare)];
    if settings.max_latency_p99_ms.is_some() || settings.latency_p99_max_increase.is_some() {
        checked.push(bounded_check(
            LATENCY_P99,
            "ms",
            canary.latency_p99_ms,
            stable_value(stable.latency_p99_ms),
            Bounds {
                max: settings.max_latency_p99_ms,
                min: None,
                max_increase: settings.latency_p99_max_increase,
                max_decrease: None,
            },
            compare,
            full_weight,
        ));
    }
    for custom in &settings.custom {
        let value = |t: &TrackSample| t.custom.get(&custom.name).copied().flatten();
        checked.push(bounded_check(
            &custom.name,
            "",
            value(canary),
            stable_value(value(stable)),
            Bounds {
                max: custom.max,
                min: custom.min,
                max_increase: custom.max_increase,
                max_decrease: custom.max_decrease,
            },
            compare,
            full_weight,
        ));
    }

    // A check is inconclusive for one of two reasons: no evidence (no canary value, stable too
    // thin for a relative bound), or a breach stable shares (evidence the canary is no worse).
    let shared = checked.iter().any(|c| c.shared);
    let checks: Vec<CheckRecord> = checked.into_iter().map(|c| c.record).collect();
    let verdict = overall(&checks);
    let reason = explain(verdict, &checks);
    let shared_trouble = verdict == Verdict::Inconclusive && shared;
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
) -> Checked {
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
    Checked {
        // Inconclusive here always means: breached, and stable as bad.
        shared: verdict == Verdict::Inconclusive,
        record: CheckRecord {
            name: ERROR_RATE.into(),
            canary: Some(round4(canary_rate * 100.0)),
            stable: stable_rate.map(|r| round4(r * 100.0)),
            bound,
            unit: "%".into(),
            verdict,
            note,
        },
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

/// A check's record, and whether it is inconclusive because stable shares a breach (evidence the
/// canary is no worse) rather than for want of data.
struct Checked {
    record: CheckRecord,
    shared: bool,
}

/// The limits of a latency or custom check: absolute, and relative to stable's value in the same
/// window as fractions (0.3 for `30%`).
#[derive(Debug, Clone, Copy, Default)]
struct Bounds {
    max: Option<f64>,
    min: Option<f64>,
    max_increase: Option<f64>,
    max_decrease: Option<f64>,
}

impl Bounds {
    fn relative(&self) -> bool {
        self.max_increase.is_some() || self.max_decrease.is_some()
    }
}

/// stable × (1 + f) for stable ≥ 0; a negative stable (a shrinking slope) moves by its magnitude,
/// so that "30% higher" is still higher.
fn above(stable: f64, fraction: f64) -> f64 {
    stable + stable.abs() * fraction
}

fn below(stable: f64, fraction: f64) -> f64 {
    stable - stable.abs() * fraction
}

/// A factor as `1.30`, `0.875`, `11.00`: at least two decimals, never a rounded one.
fn fmt_factor(v: f64) -> String {
    let text = fmt_number(v);
    match text.split_once('.') {
        None => format!("{text}.00"),
        Some((_, decimals)) if decimals.len() == 1 => format!("{text}0"),
        Some(_) => text,
    }
}

fn fmt_percent(fraction: f64) -> String {
    format!("{}%", fmt_number(fraction * 100.0))
}

/// The relative bound as `<= stable × 1.30 (650ms)`: the rule, and what it came to in this window.
fn relative_bound_text(
    sign: &str,
    fraction: f64,
    up: bool,
    stable: Option<f64>,
    show: &dyn Fn(f64) -> String,
) -> String {
    let rule = match stable {
        Some(s) if s < 0.0 => format!(
            "{sign} stable {} {} of |stable|",
            if up { "+" } else { "-" },
            fmt_percent(fraction)
        ),
        _ => format!(
            "{sign} stable × {}",
            fmt_factor(if up { 1.0 + fraction } else { 1.0 - fraction })
        ),
    };
    match stable {
        Some(s) => {
            let limit = if up {
                above(s, fraction)
            } else {
                below(s, fraction)
            };
            format!("{rule} ({})", show(limit))
        }
        None => rule,
    }
}

fn bounded_check(
    name: &str,
    unit: &str,
    canary: Option<f64>,
    stable: Option<f64>,
    bounds: Bounds,
    compare: bool,
    full_weight: bool,
) -> Checked {
    let Bounds {
        max,
        min,
        max_increase,
        max_decrease,
    } = bounds;
    let stable = stable.filter(|v| v.is_finite());
    let show = |v: f64| format!("{}{unit}", fmt_number(v));
    let mut parts = Vec::new();
    match (min, max) {
        (Some(lo), Some(hi)) => parts.push(format!("{}..{}{unit}", fmt_number(lo), fmt_number(hi))),
        (None, Some(hi)) => parts.push(format!("<= {}{unit}", fmt_number(hi))),
        (Some(lo), None) => parts.push(format!(">= {}{unit}", fmt_number(lo))),
        (None, None) => {}
    }
    if let Some(f) = max_increase {
        parts.push(relative_bound_text("<=", f, true, stable, &show));
    }
    if let Some(f) = max_decrease {
        parts.push(relative_bound_text(">=", f, false, stable, &show));
    }
    let bound = if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    };
    let stable_text = stable.map_or("no stable value".into(), |v| format!("stable {}", show(v)));
    let record = |verdict, note: String, shared| Checked {
        record: CheckRecord {
            name: name.into(),
            canary: canary.filter(|v| v.is_finite()).map(round4),
            stable: stable.map(round4),
            bound: bound.clone(),
            unit: unit.into(),
            verdict,
            note,
        },
        shared,
    };
    let Some(value) = canary.filter(|v| v.is_finite()) else {
        return record(
            Verdict::Inconclusive,
            format!("{name}: no data for the canary"),
            false,
        );
    };

    // Relative bounds: the canary against stable in the same window.
    let rel_high = max_increase
        .zip(stable)
        .is_some_and(|(f, s)| value > above(s, f));
    let rel_low = max_decrease
        .zip(stable)
        .is_some_and(|(f, s)| value < below(s, f));
    if rel_high || rel_low {
        let (fraction, direction) = if rel_high {
            (max_increase, "above")
        } else {
            (max_decrease, "below")
        };
        return record(
            Verdict::Fail,
            format!(
                "{name} {} is more than {} {direction} {stable_text}: breaches {bound}",
                show(value),
                fmt_percent(fraction.unwrap_or_default()),
            ),
            false,
        );
    }

    // Absolute bounds: a breach stable shares within the relative tolerance is not the canary's.
    let too_high = max.is_some_and(|hi| value > hi);
    let too_low = min.is_some_and(|lo| value < lo);
    if too_high || too_low {
        let tolerance =
            if too_high { max_increase } else { max_decrease }.unwrap_or(STABLE_TOLERANCE);
        let shared = compare
            && stable.is_some_and(|s| {
                if too_high {
                    value <= above(s, tolerance)
                } else {
                    value >= below(s, tolerance)
                }
            });
        return if shared {
            record(
                Verdict::Inconclusive,
                format!(
                    "{name} {} breaches {bound} but is within {} of {stable_text}: trouble both versions share",
                    show(value),
                    fmt_percent(tolerance)
                ),
                true,
            )
        } else {
            record(
                Verdict::Fail,
                format!("{name} {} breaches {bound} ({stable_text})", show(value)),
                false,
            )
        };
    }

    if bounds.relative() && stable.is_none() {
        if full_weight {
            // Judged at every earlier step; at 100% there is no stable traffic to compare with.
            return record(
                Verdict::Pass,
                format!(
                    "{name} {} ({bound}; relative bounds not judged at 100%: stable serves no traffic)",
                    show(value)
                ),
                false,
            );
        }
        return record(
            Verdict::Inconclusive,
            format!(
                "{name} {}: stable has too little data in the window to judge {bound}",
                show(value)
            ),
            false,
        );
    }
    record(
        Verdict::Pass,
        format!("{name} {} ({stable_text}) {bound}", show(value)),
        false,
    )
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
            latency_p99_max_increase: None,
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
            25,
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
            25,
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
            25,
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
        let j = judge(&settings(), 25, &sampled(empty.clone(), empty));
        assert_eq!(j.verdict, Verdict::Inconclusive);
    }

    #[test]
    fn canary_5xx_well_above_stable_fails() {
        let j = judge(
            &settings(),
            25,
            &sampled(track(10000.0, 800.0, 800.0), track(30000.0, 60.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
        assert!(j.reason.contains("significantly worse"), "{}", j.reason);
    }

    #[test]
    fn provider_outage_on_both_tracks_is_inconclusive() {
        let j = judge(
            &settings(),
            25,
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
            25,
            &sampled(track(2000.0, 242.0, 800.0), track(38000.0, 4484.0, 780.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
    }

    #[test]
    fn at_full_weight_stable_has_no_traffic_so_bounds_alone_decide() {
        let j = judge(
            &settings(),
            100,
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
            25,
            &sampled(track(2000.0, 0.0, 4000.0), track(38000.0, 0.0, 3500.0)),
        );
        assert_eq!(j.verdict, Verdict::Inconclusive);
        let j = judge(
            &settings(),
            25,
            &sampled(track(2000.0, 0.0, 4500.0), track(38000.0, 0.0, 3500.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail);
    }

    #[test]
    fn missing_latency_data_is_inconclusive_not_a_pass() {
        let mut canary = track(2000.0, 0.0, 0.0);
        canary.latency_p99_ms = None;
        let j = judge(
            &settings(),
            25,
            &sampled(canary, track(38000.0, 0.0, 700.0)),
        );
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
                max_increase: None,
                max_decrease: None,
            },
            CustomCheck {
                name: "success".into(),
                query: String::new(),
                max: None,
                min: Some(0.95),
                max_increase: None,
                max_decrease: None,
            },
        ];
        let with = |ttft: f64, success: f64, stable_ttft: f64| {
            let mut c = track(2000.0, 0.0, 100.0);
            c.custom.insert("ttft-p99".into(), Some(ttft));
            c.custom.insert("success".into(), Some(success));
            let mut st = track(38000.0, 0.0, 100.0);
            st.custom.insert("ttft-p99".into(), Some(stable_ttft));
            st.custom.insert("success".into(), Some(0.99));
            judge(&s, 25, &sampled(c, st)).verdict
        };
        assert_eq!(with(0.9, 0.99, 0.8), Verdict::Pass);
        assert_eq!(with(2.5, 0.99, 0.8), Verdict::Fail);
        assert_eq!(with(1.8, 0.99, 1.7), Verdict::Inconclusive);
        assert_eq!(with(0.9, 0.5, 0.8), Verdict::Fail);
    }

    /// Settings with one custom check `tokens` and the canary's and stable's values of it.
    fn tokens(bounds: CustomCheck, weight: i32, canary: f64, stable: Option<f64>) -> Judgement {
        let mut s = settings();
        s.custom = vec![bounds];
        let mut c = track(2000.0, 0.0, 100.0);
        c.custom.insert("tokens".into(), Some(canary));
        let mut st = track(38000.0, 0.0, 100.0);
        st.custom.insert("tokens".into(), stable);
        judge(&s, weight, &sampled(c, st))
    }

    fn relative(max_increase: Option<f64>, max_decrease: Option<f64>) -> CustomCheck {
        CustomCheck {
            name: "tokens".into(),
            query: String::new(),
            max: None,
            min: None,
            max_increase,
            max_decrease,
        }
    }

    #[test]
    fn a_canary_more_than_max_increase_above_stable_fails() {
        let j = tokens(relative(Some(0.3), None), 25, 750.0, Some(500.0));
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
        let check = &j.checks[2];
        assert_eq!(check.bound, "<= stable × 1.30 (650)");
        assert_eq!((check.canary, check.stable), (Some(750.0), Some(500.0)));
        assert!(
            j.reason
                .contains("tokens 750 is more than 30% above stable 500"),
            "{}",
            j.reason
        );
    }

    #[test]
    fn a_canary_within_max_increase_of_stable_passes() {
        let j = tokens(relative(Some(0.3), None), 25, 640.0, Some(500.0));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.reason);
        assert_eq!(j.checks[2].verdict, Verdict::Pass);
        // Any lower value is fine: maxIncrease bounds one direction only.
        let j = tokens(relative(Some(0.3), None), 25, 10.0, Some(500.0));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.reason);
    }

    #[test]
    fn a_relative_bound_without_stable_data_is_inconclusive_never_a_pass() {
        // Stable has no value for the metric.
        let j = tokens(relative(Some(0.3), None), 25, 640.0, None);
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.reason);
        assert!(
            j.reason.contains("stable has too little data"),
            "{}",
            j.reason
        );
        assert!(
            !j.shared_trouble,
            "missing data is no evidence the canary is fine"
        );
        // Stable served fewer than minRequests: its value describes nothing.
        let mut s = settings();
        s.custom = vec![relative(Some(0.3), None)];
        let mut c = track(2000.0, 0.0, 100.0);
        c.custom.insert("tokens".into(), Some(640.0));
        let mut st = track(49.0, 0.0, 100.0);
        st.custom.insert("tokens".into(), Some(500.0));
        let j = judge(&s, 25, &sampled(c, st));
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.reason);
        assert_eq!(j.checks[2].stable, None);
        assert_eq!(j.checks[2].bound, "<= stable × 1.30");
    }

    #[test]
    fn at_full_weight_a_relative_bound_has_no_stable_to_compare_and_absolute_bounds_decide() {
        let j = tokens(relative(Some(0.3), None), 100, 640.0, None);
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.reason);
        assert!(j.reason.contains("not judged at 100%"), "{}", j.reason);
        let mut both = relative(Some(0.3), None);
        both.max = Some(600.0);
        let j = tokens(both, 100, 640.0, None);
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
    }

    #[test]
    fn a_canary_more_than_max_decrease_below_stable_fails() {
        let j = tokens(relative(None, Some(0.1)), 25, 0.85, Some(1.0));
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
        assert_eq!(j.checks[2].bound, ">= stable × 0.90 (0.9)");
        assert!(j.reason.contains("more than 10% below"), "{}", j.reason);
        let j = tokens(relative(None, Some(0.1)), 25, 0.95, Some(1.0));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.reason);
        let j = tokens(relative(None, Some(0.1)), 25, 5.0, Some(1.0));
        assert_eq!(
            j.verdict,
            Verdict::Pass,
            "maxDecrease bounds one direction only"
        );
    }

    #[test]
    fn a_negative_stable_value_moves_by_its_magnitude() {
        // A shrinking memory slope: 30% higher than -100 is -70, not -130.
        let j = tokens(relative(Some(0.3), None), 25, -80.0, Some(-100.0));
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.reason);
        assert_eq!(j.checks[2].bound, "<= stable + 30% of |stable| (-70)");
        let j = tokens(relative(Some(0.3), None), 25, -60.0, Some(-100.0));
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
    }

    #[test]
    fn max_with_max_increase_shares_trouble_within_the_relative_tolerance() {
        let mut both = relative(Some(0.5), None);
        both.max = Some(600.0);
        // Over max, but within 50% of a stable that is as high: trouble both share.
        let j = tokens(both.clone(), 25, 700.0, Some(650.0));
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.reason);
        assert!(j.shared_trouble);
        assert!(
            j.reason.contains("within 50% of stable 650"),
            "{}",
            j.reason
        );
        assert_eq!(j.checks[2].bound, "<= 600, <= stable × 1.50 (975)");
        // 40% over stable: within maxIncrease 50% (shared), where the default 20% would fail it.
        let j = tokens(both.clone(), 25, 700.0, Some(500.0));
        assert_eq!(j.verdict, Verdict::Inconclusive, "{}", j.reason);
        // Within max but more than 50% above stable: the relative bound fails it.
        let j = tokens(both.clone(), 25, 590.0, Some(300.0));
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
        // Over max and more than 50% above stable: fails.
        let j = tokens(both.clone(), 25, 800.0, Some(500.0));
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
        // Without compareToStable a breach of max fails even within the tolerance.
        let mut s = settings();
        s.compare_to_stable = false;
        s.custom = vec![both];
        let mut c = track(2000.0, 0.0, 100.0);
        c.custom.insert("tokens".into(), Some(700.0));
        let mut st = track(38000.0, 0.0, 100.0);
        st.custom.insert("tokens".into(), Some(650.0));
        assert_eq!(judge(&s, 25, &sampled(c, st)).verdict, Verdict::Fail);
    }

    #[test]
    fn latency_may_be_bounded_relative_to_stable_alone() {
        let mut s = settings();
        s.max_latency_p99_ms = None;
        s.latency_p99_max_increase = Some(0.3);
        let j = judge(
            &s,
            25,
            &sampled(track(2000.0, 0.0, 700.0), track(38000.0, 0.0, 500.0)),
        );
        assert_eq!(j.verdict, Verdict::Fail, "{}", j.reason);
        assert_eq!(j.checks[1].bound, "<= stable × 1.30 (650ms)");
        let j = judge(
            &s,
            25,
            &sampled(track(2000.0, 0.0, 600.0), track(38000.0, 0.0, 500.0)),
        );
        assert_eq!(j.verdict, Verdict::Pass, "{}", j.reason);
    }

    #[test]
    fn factors_print_with_two_decimals_at_least() {
        assert_eq!(fmt_factor(1.3), "1.30");
        assert_eq!(fmt_factor(11.0), "11.00");
        assert_eq!(fmt_factor(1.125), "1.125");
    }

    #[test]
    fn a_fail_outweighs_an_inconclusive_check() {
        let mut canary = track(10000.0, 800.0, 0.0);
        canary.latency_p99_ms = None;
        let j = judge(
            &settings(),
            25,
            &sampled(canary, track(30000.0, 60.0, 700.0)),
        );
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
