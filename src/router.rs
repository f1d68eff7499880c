//! The small interface a traffic router implements. Istio is one (`istio.rs`); another mesh or
//! gateway can be added without touching the rollout decision.

use crate::crd::ChatRelease;
use crate::error::Error;
use crate::metrics::BoxFuture;

/// The split the rollout wants now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// Percent of weighted traffic to the canary; the rest goes to stable.
    pub canary_weight: i32,
    /// canaryMatch requests (testers) and canary-cookie holders go to the canary.
    pub canary_routes: bool,
    /// Revisions the sticky cookie names, so a cookie keeps meaning the same version. No
    /// stable revision while stable serves none whole (being promoted): no stable cookie route.
    pub stable_revision: Option<String>,
    pub canary_revision: Option<String>,
}

pub trait TrafficRouter: Send + Sync {
    /// Creates or updates what routing needs besides the split (Istio: the DestinationRule).
    fn reconcile<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>>;
    /// Writes the whole split in a single write (Istio: the VirtualService), so a rollback moves
    /// all traffic at once.
    fn set_routes<'a>(
        &'a self,
        release: &'a ChatRelease,
        routes: &'a Routes,
    ) -> BoxFuture<'a, Result<(), Error>>;
}
