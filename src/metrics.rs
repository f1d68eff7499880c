//! What the judge needs from a metrics backend, and the small interface a backend implements.
//! Prometheus is one implementation (`prometheus.rs`); a test double is another.

use crate::crd::RequestSource;
use crate::settings::CustomCheck;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// One track's numbers over the analysis window. `None` means the backend returned no data (an
/// empty vector or NaN), which is never read as zero for a check's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackSample {
    pub requests: Option<f64>,
    pub errors: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub custom: BTreeMap<String, Option<f64>>,
}

/// What one analysis saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Observations {
    /// The backend could not be asked; the analysis is inconclusive.
    Unavailable { reason: String },
    Sampled {
        canary: TrackSample,
        stable: TrackSample,
    },
}

/// Which workloads to ask about, and over what window.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisTarget {
    pub namespace: String,
    pub canary_workload: String,
    pub stable_workload: String,
    pub window: Duration,
    pub custom: Vec<CustomCheck>,
    /// Which series hold the requests, errors and durations.
    pub source: RequestSource,
    /// Status codes counted as errors, a regex (`analysis.errorRate.codes`).
    pub error_codes: String,
    /// Base URL of the backend for this ChatRelease.
    pub address: String,
    /// The instant the window ends, the decision's `now`: every query of one analysis is
    /// evaluated at it, so the tracks and the checks are measured over the very same window.
    pub at: jiff::Timestamp,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A metrics backend. `observe` never fails: an unreachable backend is `Observations::Unavailable`,
/// which the judge treats as inconclusive (hold), never as a pass.
pub trait MetricsSource: Send + Sync {
    fn observe<'a>(&'a self, target: &'a AnalysisTarget) -> BoxFuture<'a, Observations>;

    /// Requests and errors of every workload a [`WatchLook`] covers, by one query each however
    /// many canaries it covers: what the sequential watch needs to stay light at a thousand
    /// releases. A backend that cannot ask in bulk returns `None`, and each ChatRelease is then
    /// watched by its own reconciles only.
    fn tally<'a>(&'a self, _look: &'a WatchLook) -> BoxFuture<'a, Option<Result<Tally, String>>> {
        Box::pin(async { None })
    }
}

/// One bulk look of the sequential watch: every canary whose ChatRelease asks the same
/// Prometheus, from the same source, with the same error codes.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchLook {
    pub address: String,
    pub source: RequestSource,
    pub error_codes: String,
    /// The namespaces of the ChatReleases it covers.
    pub namespaces: Vec<String>,
    /// How far back it counts: since the group's last look.
    pub window: Duration,
    pub at: jiff::Timestamp,
}

/// Requests and errors by `(namespace, workload)`.
pub type Tally = std::collections::HashMap<(String, String), crate::sequential::Counts>;
