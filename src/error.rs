//! Errors the operator's I/O can meet, each with the object it concerns.

use crate::settings::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{verb} {kind} {namespace}/{name}: {source}")]
    Kube {
        verb: &'static str,
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// The spec cannot be used; the user has to change it.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Something the operator expected is not there (a namespace, a stable Deployment).
    #[error("{0}")]
    Missing(String),
    /// Reconciling one ChatRelease panicked: a bug, caught so the others go on being judged.
    #[error("internal error while reconciling {namespace}/{name}: {message}")]
    Panicked {
        namespace: String,
        name: String,
        message: String,
    },
    /// The router a ChatRelease asks for cannot work on this cluster: its CRDs are not installed.
    #[error(
        "traffic.{router} needs {what}, which this cluster's API server does not serve: install it, or route with the other router"
    )]
    RouterUnavailable {
        router: &'static str,
        what: &'static str,
    },
    /// An object could not be turned into JSON for an apply.
    #[error("serialising {kind} {name}: {source}")]
    Serialize {
        kind: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub fn kube(
        verb: &'static str,
        kind: &str,
        namespace: &str,
        name: &str,
        source: kube::Error,
    ) -> Self {
        Error::Kube {
            verb,
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            source: Box::new(source),
        }
    }

    /// A short label for metrics and logs: which kind of failure this was.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Spec(_) => "spec",
            Error::Missing(_) => "missing",
            Error::Serialize { .. } => "serialize",
            Error::Panicked { .. } => "panic",
            Error::RouterUnavailable { .. } => "router-unavailable",
        }
    }

    /// The namespace is being deleted: nothing new may be created in it, and everything the
    /// ChatRelease owns goes with it. Not a failure to retry or warn about.
    pub fn is_namespace_terminating(&self) -> bool {
        let Error::Kube { source, .. } = self else {
            return false;
        };
        let kube::Error::Api(status) = source.as_ref() else {
            return false;
        };
        let cause = status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"));
        status.code == 403 && (cause || status.message.contains("because it is being terminated"))
    }

    /// The API server refused the object as invalid (HTTP 422): the user's spec is at fault.
    pub fn is_invalid_object(&self) -> bool {
        matches!(self, Error::Kube { source, .. } if matches!(source.as_ref(), kube::Error::Api(s) if s.code == 422))
    }
}
