//! The small interface a traffic router implements, and what the routers share. Istio
//! (`istio.rs`: a VirtualService and a DestinationRule) and the Gateway API (`gateway_api.rs`:
//! an HTTPRoute and a Service per track) are the two; the rollout decision knows neither.

#[cfg(test)]
mod crd_schema;
pub mod gateway_api;
pub mod istio;

use crate::applied::Applied;
use crate::crd::ChatRelease;
use crate::error::Error;
use crate::metrics::BoxFuture;
use crate::settings::SpecError;
use kube::api::{Api, DeleteParams};
use kube::{Resource, ResourceExt};
use std::sync::Arc;

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
    /// Refuses, before any write, a spec this router cannot express (naming the field).
    fn check(&self, _release: &ChatRelease) -> Result<(), SpecError> {
        Ok(())
    }
    /// Creates or updates what routing needs besides the split (Istio: the DestinationRule;
    /// the Gateway API: a Service per track).
    fn reconcile<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>>;
    /// Writes the whole split in a single write (a VirtualService, an HTTPRoute), so a rollback
    /// moves all traffic at once.
    fn set_routes<'a>(
        &'a self,
        release: &'a ChatRelease,
        routes: &'a Routes,
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// Deletes what this router made for `release` (after a switch to the other router).
    fn remove<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>>;
}

/// Which router a ChatRelease asks for: `traffic.gatewayAPI` when set, else Istio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    Istio,
    GatewayApi,
}

impl RouterKind {
    pub fn of(release: &ChatRelease) -> Self {
        if release.spec.traffic.gateway_api.is_some() {
            RouterKind::GatewayApi
        } else {
            RouterKind::Istio
        }
    }

    /// The name `status.router` and messages use: the field under `spec.traffic`.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterKind::Istio => "istio",
            RouterKind::GatewayApi => "gatewayAPI",
        }
    }

    /// The router `status.router` names (what `as_str` wrote).
    pub fn of_status(router: &str) -> Self {
        match router {
            "gatewayAPI" => RouterKind::GatewayApi,
            _ => RouterKind::Istio,
        }
    }
}

/// Both routers; each ChatRelease is routed by the one its spec names.
pub struct Routers {
    istio: istio::IstioRouter,
    gateway_api: gateway_api::GatewayApiRouter,
    applied: Arc<Applied>,
}

impl Routers {
    pub fn new(client: kube::Client) -> Self {
        let applied = Arc::new(Applied::default());
        Self {
            istio: istio::IstioRouter::with_applied(client.clone(), applied.clone()),
            gateway_api: gateway_api::GatewayApiRouter::with_applied(client, applied.clone()),
            applied,
        }
    }

    /// What the routers (and the controller's Service) last applied: the watches on those
    /// objects tell it of other writers.
    pub fn applied(&self) -> &Arc<Applied> {
        &self.applied
    }

    /// The router of `kind`.
    pub fn get(&self, kind: RouterKind) -> &dyn TrafficRouter {
        match kind {
            RouterKind::Istio => &self.istio,
            RouterKind::GatewayApi => &self.gateway_api,
        }
    }
}

impl TrafficRouter for Routers {
    fn check(&self, release: &ChatRelease) -> Result<(), SpecError> {
        self.get(RouterKind::of(release)).check(release)
    }

    fn reconcile<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>> {
        self.get(RouterKind::of(release)).reconcile(release)
    }

    fn set_routes<'a>(
        &'a self,
        release: &'a ChatRelease,
        routes: &'a Routes,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.get(RouterKind::of(release))
            .set_routes(release, routes)
    }

    fn remove<'a>(&'a self, release: &'a ChatRelease) -> BoxFuture<'a, Result<(), Error>> {
        self.get(RouterKind::of(release)).remove(release)
    }
}

fn namespace_of(release: &ChatRelease) -> Result<String, Error> {
    release.namespace().ok_or_else(|| {
        Error::Missing(format!(
            "ChatRelease {} has no namespace; routes are namespaced",
            release.name_any()
        ))
    })
}

/// Deletes `name` if it is there; gone already is done.
async fn delete_owned<K>(client: &kube::Client, namespace: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            tracing::info!(kind = %K::kind(&()), %namespace, %name, "deleted what the previous router made");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(Error::kube("delete", &K::kind(&()), namespace, name, e)),
    }
}

/// A server-side apply creates what is missing, so its 404 means the kind itself is not served
/// (its CRD is not installed; the API server may answer in plain text), unless the namespace is
/// what is gone: say which CRD.
fn unavailable_when_unknown(error: Error, router: &'static str, what: &'static str) -> Error {
    let kind_unknown = match &error {
        Error::Kube { source, .. } => match source.as_ref() {
            kube::Error::Api(status) => {
                status.code == 404
                    && status
                        .details
                        .as_ref()
                        .is_none_or(|d| d.kind != "namespaces")
            }
            _ => false,
        },
        _ => false,
    };
    if kind_unknown {
        Error::RouterUnavailable { router, what }
    } else {
        error
    }
}

/// Logs a change of the split at info; the idempotent re-applies of every reconcile at debug.
fn log_split(release: &ChatRelease, namespace: &str, routes: &Routes) {
    let canary_weight = routes.canary_weight.clamp(0, 100);
    // The status still holds the weight of the last tick.
    let previous = release.status.as_ref().map(|s| s.canary_weight);
    if previous != Some(canary_weight) {
        tracing::info!(
            release = %release.name_any(),
            %namespace,
            router = RouterKind::of(release).as_str(),
            previous_canary_weight = previous,
            canary_weight,
            stable_weight = 100 - canary_weight,
            canary_routes = routes.canary_routes,
            "setting traffic split"
        );
    } else {
        tracing::debug!(
            release = %release.name_any(),
            %namespace,
            canary_weight,
            canary_routes = routes.canary_routes,
            "re-applying traffic split"
        );
    }
}
