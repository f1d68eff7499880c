//! Server-side applies that are skipped when they would change nothing.
//!
//! Every reconcile used to apply the Service and the routes (a VirtualService and a
//! DestinationRule, or an HTTPRoute) whether or not they had changed: three writes the API server
//! must decode, compare and answer, per release per reconcile. An apply is skipped when the object
//! we would send is byte for byte what we last sent *and* nobody has written the object since:
//! the watch on it still reports the resourceVersion our own apply produced. A hand edit, a
//! deletion, or an operator restart (the memory is empty) makes the next reconcile apply again.

use crate::annotations::MANAGER;
use crate::error::Error;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// `(kind, namespace, name)`.
type Key = (String, String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    /// Hash of the JSON we applied.
    digest: u64,
    /// What our apply made of the object: while the watch reports it, nobody else has written.
    resource_version: String,
}

/// What the operator last applied, per object, and whether it may still stand.
#[derive(Default)]
pub struct Applied {
    written: Mutex<HashMap<Key, Written>>,
}

impl Applied {
    /// The watch saw `object` at `resource_version`: unless that is our own last write, someone
    /// else wrote it (or deleted it), and the next apply must go through.
    pub fn saw(&self, kind: &str, object: &kube::core::ObjectMeta, deleted: bool) {
        let key = (
            kind.to_string(),
            object.namespace.clone().unwrap_or_default(),
            object.name.clone().unwrap_or_default(),
        );
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let ours = written
            .get(&key)
            .is_some_and(|w| Some(&w.resource_version) == object.resource_version.as_ref());
        if deleted || !ours {
            written.remove(&key);
        }
    }

    fn unchanged(&self, key: &Key, digest: u64) -> bool {
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.get(key).is_some_and(|w| w.digest == digest)
    }

    fn record(&self, key: Key, written: Option<Written>) {
        let mut map = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written {
            Some(w) => map.insert(key, w),
            None => map.remove(&key),
        };
    }

    /// Server-side applies `object` as the operator's field manager, in one request, unless it is
    /// what we last applied and nobody has written the object since. `Ok(true)` when it was sent.
    pub async fn apply<K>(
        &self,
        client: &kube::Client,
        namespace: &str,
        object: &K,
    ) -> Result<bool, Error>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let kind = K::kind(&()).to_string();
        let body = serde_json::to_vec(object).map_err(|source| Error::Serialize {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
        let digest = digest(&body);
        let key = (kind.clone(), namespace.to_string(), name.clone());
        if self.unchanged(&key, digest) {
            tracing::trace!(%kind, %namespace, %name, "unchanged since our last apply; skipped");
            return Ok(false);
        }
        let api: Api<K> = Api::namespaced(client.clone(), namespace);
        // force: the operator owns these objects; a stale manager must not block a rollback.
        let params = PatchParams::apply(MANAGER).force();
        match api.patch(&name, &params, &Patch::Apply(object)).await {
            Ok(now) => {
                let written = now.resource_version().map(|resource_version| Written {
                    digest,
                    resource_version,
                });
                self.record(key, written);
                Ok(true)
            }
            Err(e) => {
                self.record(key, None);
                Err(Error::kube("apply", &kind, namespace, &name, e))
            }
        }
    }
}

fn digest(bytes: &[u8]) -> u64 {
    // SipHash with fixed keys: the same bytes give the same digest for the life of the process,
    // which is all the memory lasts.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A client whose API server answers every apply with the object at the next resourceVersion,
    /// counting the applies.
    fn counting_client() -> (kube::Client, Arc<AtomicUsize>) {
        let applies = Arc::new(AtomicUsize::new(0));
        let seen = applies.clone();
        let client = crate::fixtures::client_answered_by("default", move |_, _, body| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let mut object = body.clone();
            object["metadata"]["resourceVersion"] = format!("{n}").into();
            (200, object)
        });
        (client, applies)
    }

    fn service(port: i32) -> Service {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "chat", "namespace": "team"},
            "spec": {"ports": [{"port": port}]}
        }))
        .unwrap()
    }

    fn meta(resource_version: &str) -> kube::core::ObjectMeta {
        kube::core::ObjectMeta {
            name: Some("chat".into()),
            namespace: Some("team".into()),
            resource_version: Some(resource_version.into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_same_object_is_applied_once_until_someone_else_writes_it() {
        let (client, applies) = counting_client();
        let applied = Applied::default();
        assert!(applied.apply(&client, "team", &service(80)).await.unwrap());
        // The watch reports our own write: nothing to do.
        applied.saw("Service", &meta("1"), false);
        assert!(!applied.apply(&client, "team", &service(80)).await.unwrap());
        assert_eq!(applies.load(Ordering::SeqCst), 1);

        // A person edits it: the next apply puts ours back.
        applied.saw("Service", &meta("7"), false);
        assert!(applied.apply(&client, "team", &service(80)).await.unwrap());
        assert_eq!(applies.load(Ordering::SeqCst), 2);

        // It is deleted: applied again, even at the resourceVersion we wrote.
        applied.saw("Service", &meta("2"), true);
        assert!(applied.apply(&client, "team", &service(80)).await.unwrap());
        assert_eq!(applies.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_changed_object_is_always_applied() {
        let (client, applies) = counting_client();
        let applied = Applied::default();
        applied.apply(&client, "team", &service(80)).await.unwrap();
        assert!(applied.apply(&client, "team", &service(81)).await.unwrap());
        assert!(applied.apply(&client, "team", &service(80)).await.unwrap());
        assert_eq!(applies.load(Ordering::SeqCst), 3);
    }
}
