//! `make bench-judge`: today's fixed-interval judge beside the sequential test, on synthetic
//! traffic, no cluster. For each kind of canary (healthy; sharing a provider outage with stable;
//! 2×, 5× and 50× stable's error rate; half its requests failing) at 5%, 25% and 50% weight and 1, 10 and 100 requests/s to
//! the canary, many seeded runs of one step: how often a canary no worse than stable is rolled
//! back, and how long a worse one takes to be.
//!
//! Columns: rollbacks out of the runs (a rate for canaries no worse than stable: all false),
//! and the median and 95th percentile time to rollback, for today's fixed-interval judge alone,
//! the sequential test alone, and both as the operator runs them (whichever rolls back first).
//!
//! The model: `interval: 1m`, `failureLimit: 2`, `minRequests: 50`, `errorRate.max: 1%`,
//! `compareToStable`, the sequential test looking every 10s; stable answers 0.5% errors (30% in
//! the outage, which hits both versions). Requests and errors arrive in 10 s slices (binomial).
//! A run is one step: it ends when an analysis passes (the canary earns the next step), or after
//! 10 minutes (progressDeadline); each interval's analysis sees the last minute, each look of the
//! sequential test everything since the step began. Seeds are fixed: the table is the same
//! on every machine.
//!
//! `cargo bench --bench judge` runs it (`BENCH_JUDGE_RUNS` runs per row, default 1000);
//! `cargo test --all-targets` only checks that it builds and runs a few.

use chatrelease::crd::Verdict;
use chatrelease::judge;
use chatrelease::metrics::{Observations, TrackSample};
use chatrelease::sequential::{self, Counts};
use chatrelease::settings::JudgeSettings;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const SLICE_SECONDS: u32 = 10;
const INTERVAL_SLICES: usize = 6;
const MAX_SLICES: usize = 60;
const STABLE_ERROR_RATE: f64 = 0.005;
const OUTAGE_ERROR_RATE: f64 = 0.30;

fn settings() -> JudgeSettings {
    JudgeSettings {
        min_requests: 50.0,
        failure_limit: 2,
        compare_to_stable: true,
        max_error_rate: 0.01,
        max_latency_p99_ms: None,
        latency_p99_max_increase: None,
        custom: Vec::new(),
    }
}

/// A draw from Binomial(n, p): exact for small n, normal with continuity otherwise.
fn binomial(rng: &mut StdRng, n: u64, p: f64) -> u64 {
    if n <= 500 {
        return (0..n).filter(|_| rng.random::<f64>() < p).count() as u64;
    }
    let mean = n as f64 * p;
    let sd = (mean * (1.0 - p)).sqrt();
    // Box-Muller.
    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (mean + sd * z).round().clamp(0.0, n as f64) as u64
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    canary_error_rate: f64,
    stable_error_rate: f64,
    weight: u32,
    canary_rps: u32,
}

impl Case {
    fn worse(&self) -> bool {
        self.canary_error_rate > self.stable_error_rate
    }
}

/// When each judge rolled the canary back, in seconds since the step began (None: never).
struct Outcome {
    fixed: Option<u32>,
    sequential: Option<u32>,
}

fn sample(requests: u64, errors: u64) -> TrackSample {
    TrackSample {
        requests: Some(requests as f64),
        errors: Some(errors as f64),
        latency_p99_ms: None,
        custom: Default::default(),
    }
}

fn run(case: Case, seed: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let canary_n = u64::from(case.canary_rps * SLICE_SECONDS);
    let stable_n = canary_n * u64::from(100 - case.weight) / u64::from(case.weight);
    let judge_settings = settings();
    let mut slices: Vec<(u64, u64)> = Vec::new();
    let (mut fixed, mut sequential) = (None, None);
    let mut failures = 0;
    for slice in 1..=MAX_SLICES {
        let canary_errors = binomial(&mut rng, canary_n, case.canary_error_rate);
        let stable_errors = binomial(&mut rng, stable_n, case.stable_error_rate);
        slices.push((canary_errors, stable_errors));
        let seconds = slice as u32 * SLICE_SECONDS;
        if sequential.is_none() {
            let canary_errors: u64 = slices.iter().map(|s| s.0).sum();
            let stable_errors: u64 = slices.iter().map(|s| s.1).sum();
            let counts = |n: u64, e: u64| Counts {
                requests: (n * slice as u64) as f64,
                errors: e as f64,
            };
            let evidence = sequential::error_evidence(
                counts(canary_n, canary_errors),
                counts(stable_n, stable_errors),
                &judge_settings,
            );
            if evidence.stop {
                sequential = Some(seconds);
            }
        }
        if fixed.is_none() && slice % INTERVAL_SLICES == 0 {
            let window = &slices[slice - INTERVAL_SLICES..];
            let n = INTERVAL_SLICES as u64;
            let observations = Observations::Sampled {
                canary: sample(canary_n * n, window.iter().map(|s| s.0).sum()),
                stable: sample(stable_n * n, window.iter().map(|s| s.1).sum()),
            };
            let judgement = judge::judge(&judge_settings, case.weight as i32, &observations);
            match judgement.verdict {
                Verdict::Fail => failures += 1,
                // A pass earns the next step: this step, and its chances to roll back, end.
                Verdict::Pass => break,
                Verdict::Inconclusive if judgement.shared_trouble => failures = 0,
                Verdict::Inconclusive => {}
            }
            if failures >= judge_settings.failure_limit {
                fixed = Some(seconds);
            }
        }
        if fixed.is_some() && sequential.is_some() {
            break;
        }
    }
    Outcome { fixed, sequential }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for weight in [5, 25, 50] {
        for canary_rps in [1, 10, 100] {
            let kinds = [
                ("healthy", STABLE_ERROR_RATE, STABLE_ERROR_RATE),
                ("shared outage", OUTAGE_ERROR_RATE, OUTAGE_ERROR_RATE),
                ("2x stable", 2.0 * STABLE_ERROR_RATE, STABLE_ERROR_RATE),
                ("5x stable", 5.0 * STABLE_ERROR_RATE, STABLE_ERROR_RATE),
                ("50x stable", 50.0 * STABLE_ERROR_RATE, STABLE_ERROR_RATE),
                ("50% errors", 0.5, STABLE_ERROR_RATE),
            ];
            for (name, canary_error_rate, stable_error_rate) in kinds {
                cases.push(Case {
                    name,
                    canary_error_rate,
                    stable_error_rate,
                    weight,
                    canary_rps,
                });
            }
        }
    }
    cases
}

/// The `q` quantile of `values` (sorted), or "-" when there are none.
fn quantile(values: &[u32], q: f64) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    format!("{}s", values[i])
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs: u64 = if quick {
        3
    } else {
        std::env::var("BENCH_JUDGE_RUNS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(1000)
    };
    println!(
        "judge on synthetic traffic: {runs} seeded runs per row, interval 1m, failureLimit 2, \
         sequential looks every {SLICE_SECONDS}s (alpha {})",
        sequential::ALPHA
    );
    println!(
        "{:<14} {:>6} {:>10} | {:>10} {:>6} {:>6} | {:>10} {:>6} {:>6} | {:>10} {:>6} {:>6}",
        "canary",
        "weight",
        "canary rps",
        "fixed: rb",
        "p50",
        "p95",
        "seq: rb",
        "p50",
        "p95",
        "both: rb",
        "p50",
        "p95"
    );
    for (row, case) in cases().into_iter().enumerate() {
        let outcomes: Vec<Outcome> = (0..runs)
            .map(|i| run(case, (row as u64) << 32 | i))
            .collect();
        let mut fixed: Vec<u32> = outcomes.iter().filter_map(|o| o.fixed).collect();
        let mut seq: Vec<u32> = outcomes.iter().filter_map(|o| o.sequential).collect();
        // The operator runs both: whichever rolls back first.
        let mut both: Vec<u32> = outcomes
            .iter()
            .filter_map(|o| match (o.fixed, o.sequential) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
            .collect();
        fixed.sort_unstable();
        seq.sort_unstable();
        both.sort_unstable();
        // For canaries no worse than stable every rollback is a false one: show the rate.
        let rate = |n: usize| {
            if case.worse() {
                format!("{n}/{runs}")
            } else {
                format!("{:.4}", n as f64 / runs as f64)
            }
        };
        println!(
            "{:<14} {:>5}% {:>10} | {:>10} {:>6} {:>6} | {:>10} {:>6} {:>6} | {:>10} {:>6} {:>6}",
            case.name,
            case.weight,
            case.canary_rps,
            rate(fixed.len()),
            quantile(&fixed, 0.5),
            quantile(&fixed, 0.95),
            rate(seq.len()),
            quantile(&seq, 0.5),
            quantile(&seq, 0.95),
            rate(both.len()),
            quantile(&both, 0.5),
            quantile(&both, 0.95)
        );
    }
}
