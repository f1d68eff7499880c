//! The sequential test that stops a bad canary as soon as the evidence allows, between the
//! interval's analyses. Pure: counts in, evidence out.
//!
//! It is a mixture sequential probability ratio test (mSPRT, "always valid p-values": Johari,
//! Pekelis and Walsh) on the difference of the two error rates, canary minus stable, over every
//! request since the step began. With a normal mixing distribution of standard deviation `τ` over
//! the difference `θ`, the likelihood ratio of "θ ≠ 0" against "θ = 0" after the counts seen so
//! far is
//!
//! ```text
//!   Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))
//! ```
//!
//! where `θ̂` is the observed difference and `V` its variance under "θ = 0" (the pooled rate).
//! Stopping the first time `Λ ≥ 1/α` keeps the chance of ever stopping a canary that is no worse
//! than stable at or below `α`, however often one looks: that is what lets the operator look
//! every few seconds. Only the side "canary worse" stops, which halves that chance again.
//!
//! The test stops only what the interval's judge would also fail: the canary's error rate must
//! breach `errorRate.max`, both tracks need `minRequests`, and (as with `compareToStable`) the
//! evidence is relative to stable, so trouble both versions share never stops a canary.

use crate::settings::JudgeSettings;

/// The false-rollback probability the sequential test allows over a whole step.
pub const ALPHA: f64 = 0.001;
/// Canary errors the test needs before it may stop: below that the normal approximation behind
/// Λ misreads rare errors (two unlucky errors in fifty requests look like a 4% error rate), and
/// `make bench-judge` showed healthy canaries stopped 5 times in 1,000 at 1 request/s.
pub const MIN_CANARY_ERRORS: f64 = 5.0;
/// The spread of error-rate differences the test is tuned to: ten percentage points. Larger
/// differences are found at the first look; smaller ones wait for the interval's judge.
pub const MIXING_SD: f64 = 0.1;

/// Requests and errors of one track since the step began.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Counts {
    pub requests: f64,
    pub errors: f64,
}

/// A track's requests and errors over a window; no data counts as none.
impl From<&crate::metrics::TrackSample> for Counts {
    fn from(sample: &crate::metrics::TrackSample) -> Self {
        Self {
            requests: sample.requests.unwrap_or(0.0),
            errors: sample.errors.unwrap_or(0.0),
        }
    }
}

impl Counts {
    fn rate(self) -> f64 {
        if self.requests > 0.0 {
            self.errors / self.requests
        } else {
            0.0
        }
    }

    /// Usable numbers: finite, not negative, errors within requests.
    fn clean(self) -> Self {
        let requests = if self.requests.is_finite() {
            self.requests.max(0.0)
        } else {
            0.0
        };
        let errors = if self.errors.is_finite() {
            self.errors.clamp(0.0, requests)
        } else {
            0.0
        };
        Self { requests, errors }
    }
}

/// What the counts say, whether or not it is enough to stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evidence {
    pub canary: Counts,
    pub stable: Counts,
    /// Λ above; 1 when the counts say nothing.
    pub likelihood_ratio: f64,
    /// Λ ≥ 1/α, the canary is the worse one and breaches `errorRate.max`, both tracks have
    /// `minRequests` and the canary at least [`MIN_CANARY_ERRORS`] errors.
    pub stop: bool,
}

impl Evidence {
    /// The numbers behind a stop, for `status.message` and the Event.
    pub fn describe(&self) -> String {
        // Past a trillion the figure says nothing more, and exp() may have overflowed.
        let ratio = if self.likelihood_ratio >= 1e12 {
            "over 10^12".to_string()
        } else {
            crate::judge::fmt_number(self.likelihood_ratio)
        };
        format!(
            "sequential test: canary error rate {:.2}% over {} requests vs stable {:.2}% over {} since the step began, likelihood ratio {ratio} >= 1/alpha = {} (alpha {})",
            self.canary.rate() * 100.0,
            self.canary.requests.round(),
            self.stable.rate() * 100.0,
            self.stable.requests.round(),
            (1.0 / ALPHA).round(),
            ALPHA
        )
    }
}

/// The evidence that the canary's error rate is above stable's, from the counts since the step
/// began.
pub fn error_evidence(canary: Counts, stable: Counts, judge: &JudgeSettings) -> Evidence {
    let (canary, stable) = (canary.clean(), stable.clean());
    let likelihood_ratio = mixture_likelihood_ratio(canary, stable, MIXING_SD);
    let enough = canary.requests >= judge.min_requests
        && stable.requests >= judge.min_requests
        && canary.errors >= MIN_CANARY_ERRORS;
    let worse = canary.rate() > stable.rate();
    let breaches = canary.rate() > judge.max_error_rate;
    Evidence {
        canary,
        stable,
        likelihood_ratio,
        stop: judge.compare_to_stable
            && enough
            && worse
            && breaches
            && likelihood_ratio >= 1.0 / ALPHA,
    }
}

/// Λ of the module's documentation, for the difference of the two rates.
fn mixture_likelihood_ratio(canary: Counts, stable: Counts, mixing_sd: f64) -> f64 {
    if canary.requests <= 0.0 || stable.requests <= 0.0 {
        return 1.0;
    }
    let pooled = (canary.errors + stable.errors) / (canary.requests + stable.requests);
    let variance = pooled * (1.0 - pooled) * (1.0 / canary.requests + 1.0 / stable.requests);
    if variance <= 0.0 || !variance.is_finite() {
        // No error anywhere, or errors everywhere: nothing tells the tracks apart.
        return 1.0;
    }
    let difference = canary.rate() - stable.rate();
    let tau2 = mixing_sd * mixing_sd;
    let exponent = tau2 * difference * difference / (2.0 * variance * (variance + tau2));
    // exp overflows to infinity past ~709: that is a stop, and infinity compares fine.
    (variance / (variance + tau2)).sqrt() * exponent.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge() -> JudgeSettings {
        JudgeSettings {
            min_requests: 20.0,
            failure_limit: 2,
            compare_to_stable: true,
            max_error_rate: 0.01,
            max_latency_p99_ms: None,
            latency_p99_max_increase: None,
            custom: Vec::new(),
        }
    }

    fn counts(requests: f64, errors: f64) -> Counts {
        Counts { requests, errors }
    }

    #[test]
    fn half_its_requests_failing_stops_a_canary_at_the_first_look() {
        // 10 s at 5% of 200 requests/s.
        let e = error_evidence(counts(100.0, 50.0), counts(1900.0, 0.0), &judge());
        assert!(e.stop, "{e:?}");
        assert!(
            e.describe()
                .contains("canary error rate 50.00% over 100 requests")
        );
    }

    #[test]
    fn a_canary_as_good_as_stable_never_stops() {
        let e = error_evidence(counts(1000.0, 10.0), counts(19000.0, 190.0), &judge());
        assert!(!e.stop, "{e:?}");
        assert!(e.likelihood_ratio < 10.0, "{e:?}");
    }

    #[test]
    fn trouble_both_versions_share_never_stops() {
        // A provider outage: half of everyone's requests fail.
        let e = error_evidence(counts(1000.0, 500.0), counts(19000.0, 9500.0), &judge());
        assert!(!e.stop, "{e:?}");
    }

    #[test]
    fn too_few_requests_or_no_breach_never_stop() {
        let few = error_evidence(counts(10.0, 10.0), counts(1900.0, 0.0), &judge());
        assert!(!few.stop && few.likelihood_ratio > 1.0 / ALPHA, "{few:?}");
        // Worse than stable, but within errorRate.max.
        let mut loose = judge();
        loose.max_error_rate = 0.6;
        assert!(!error_evidence(counts(100.0, 50.0), counts(1900.0, 0.0), &loose).stop);
        // Without compareToStable there is no stable to be worse than.
        let mut alone = judge();
        alone.compare_to_stable = false;
        assert!(!error_evidence(counts(100.0, 50.0), counts(1900.0, 0.0), &alone).stop);
    }

    #[test]
    fn a_canary_better_than_stable_never_stops() {
        let e = error_evidence(counts(1000.0, 0.0), counts(19000.0, 5000.0), &judge());
        assert!(!e.stop, "{e:?}");
    }

    #[test]
    fn numbers_a_broken_backend_might_return_say_nothing() {
        for (c, s) in [
            (counts(f64::NAN, 1.0), counts(100.0, 0.0)),
            (counts(100.0, f64::INFINITY), counts(100.0, 0.0)),
            (counts(-5.0, -1.0), counts(100.0, 0.0)),
            (counts(0.0, 0.0), counts(0.0, 0.0)),
            (counts(100.0, 0.0), counts(100.0, 0.0)),
            (counts(100.0, 100.0), counts(100.0, 100.0)),
        ] {
            let e = error_evidence(c, s, &judge());
            assert!(!e.stop, "{c:?} {s:?}: {e:?}");
            assert!(!e.likelihood_ratio.is_nan(), "{c:?} {s:?}");
        }
    }

    #[test]
    fn evidence_grows_with_the_counts_of_a_moderately_worse_canary() {
        // 6% errors against 1%: fifty canary requests are not enough, thousands are.
        let early = error_evidence(counts(50.0, 3.0), counts(950.0, 10.0), &judge());
        let late = error_evidence(counts(4000.0, 200.0), counts(76000.0, 760.0), &judge());
        assert!(!early.stop, "{early:?}");
        assert!(late.stop, "{late:?}");
        assert!(late.likelihood_ratio > early.likelihood_ratio);
    }
}
