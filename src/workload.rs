//! The Deployments and the Service a ChatRelease owns: how they are named, labelled and built, and
//! how a Deployment's state reads for the rollout decision.

use crate::annotations::{LABEL_MANAGED_BY, LABEL_NAME, LABEL_REVISION, LABEL_TRACK, MANAGER};
use crate::crd::{ChatRelease, PodTemplate};
use crate::rollout::TrackState;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// One of the two versions that serve a ChatRelease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    Stable,
    Canary,
}

impl Track {
    pub fn as_str(self) -> &'static str {
        match self {
            Track::Stable => "stable",
            Track::Canary => "canary",
        }
    }

    /// `<name>-stable` or `<name>-canary`: also Istio's `destination_workload` for the track.
    pub fn workload_name(self, release: &str) -> String {
        format!("{release}-{}", self.as_str())
    }
}

/// A track's Deployment as the operator caches it and reads it live: what [`track_state`], the
/// hand-edit check and the cache's freshness check read, and nothing else. It is deserialized
/// straight from the API server's answers, the pod spec read only to be fingerprinted, so neither
/// the pod spec nor the rest of a Deployment is ever kept: a k8s-openapi `Deployment` took 5.6 kB
/// of heap even with its pod spec dropped, because its structs hold every field inline.
#[derive(kube::Resource, Deserialize, Clone, Debug, Default, PartialEq)]
#[resource(inherit = Deployment)]
pub struct TrackDeployment {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TrackDeploymentSpec,
    #[serde(default)]
    pub status: TrackDeploymentStatus,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrackDeploymentSpec {
    pub replicas: Option<i32>,
    #[serde(default)]
    pub template: TrackTemplate,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TrackTemplate {
    /// The pod template's `chatrelease.io/revision` label.
    #[serde(default, rename = "metadata", deserialize_with = "revision_label")]
    pub revision: Option<String>,
    /// The [`fingerprint`] of the pod template.
    #[serde(default, rename = "spec", deserialize_with = "pod_spec_fingerprint")]
    pub fingerprint: Option<String>,
}

#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrackDeploymentStatus {
    pub observed_generation: Option<i64>,
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub updated_replicas: Option<i32>,
}

fn revision_label<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let meta = Option::<ObjectMeta>::deserialize(deserializer)?;
    Ok(meta
        .and_then(|m| m.labels)
        .and_then(|mut labels| labels.remove(LABEL_REVISION)))
}

fn pod_spec_fingerprint<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let spec = Option::<PodSpec>::deserialize(deserializer)?;
    Ok(spec.map(|spec| {
        fingerprint(&PodTemplateSpec {
            metadata: None,
            spec: Some(spec),
        })
    }))
}

#[cfg(test)]
impl TrackDeployment {
    /// What the cache keeps of a Deployment held whole, built field by field: a reconcile test
    /// checks the deserializers above read the API server's JSON the same way.
    pub fn of(deployment: &Deployment) -> Self {
        let spec = deployment.spec.as_ref();
        let status = deployment.status.as_ref();
        Self {
            metadata: deployment.metadata.clone(),
            spec: TrackDeploymentSpec {
                replicas: spec.and_then(|s| s.replicas),
                template: TrackTemplate {
                    revision: spec
                        .and_then(|s| s.template.metadata.as_ref())
                        .and_then(|m| m.labels.as_ref())
                        .and_then(|l| l.get(LABEL_REVISION).cloned()),
                    fingerprint: spec
                        .filter(|s| s.template.spec.is_some())
                        .map(|s| fingerprint(&s.template)),
                },
            },
            status: TrackDeploymentStatus {
                observed_generation: status.and_then(|s| s.observed_generation),
                replicas: status.and_then(|s| s.replicas),
                ready_replicas: status.and_then(|s| s.ready_replicas),
                updated_replicas: status.and_then(|s| s.updated_replicas),
            },
        }
    }
}

/// What a hand edit of a track's pod template changes and the operator would put back: each
/// container's name, image, command, args and env values, read the way the API server stores
/// them, so a template the operator applied has the same fingerprint live as in the spec. (It
/// drops empty lists and fills in defaults such as a fieldRef's apiVersion, resources and probes
/// are normalised: none of those count.) `kubectl set image` or `set env` on a track's Deployment
/// changes it while the revision label stays.
pub fn fingerprint(template: &PodTemplateSpec) -> String {
    let non_empty = |list: &Option<Vec<String>>| list.clone().filter(|l| !l.is_empty());
    let containers: Vec<_> = template
        .spec
        .iter()
        .flat_map(|pod| pod.init_containers.iter().flatten().chain(&pod.containers))
        .map(|c| {
            let env: Vec<_> = c
                .env
                .iter()
                .flatten()
                .map(|e| {
                    let from = e.value_from.as_ref().map(|from| {
                        (
                            from.secret_key_ref.as_ref().map(|r| (&r.name, &r.key)),
                            from.config_map_key_ref.as_ref().map(|r| (&r.name, &r.key)),
                            from.field_ref.as_ref().map(|r| &r.field_path),
                            from.resource_field_ref.as_ref().map(|r| &r.resource),
                        )
                    });
                    (&e.name, e.value.as_deref().unwrap_or_default(), from)
                })
                .collect();
            (
                &c.name,
                &c.image,
                non_empty(&c.command),
                non_empty(&c.args),
                env,
            )
        })
        .collect();
    let bytes = serde_json::to_vec(&containers).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of a live Deployment's pod template.
pub fn live_fingerprint(deployment: &TrackDeployment) -> Option<String> {
    deployment.spec.template.fingerprint.clone()
}

/// The images a template runs, comma-separated, for status and `kubectl get`.
pub fn image_of(template: &PodTemplate) -> String {
    template
        .spec()
        .spec
        .as_ref()
        .map(|pod| {
            pod.containers
                .iter()
                .filter_map(|c| c.image.clone())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Metadata every child carries: name, namespace, our labels and the controller owner reference
/// that makes Kubernetes delete it with its ChatRelease.
pub fn owned_meta(release: &ChatRelease, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: release.namespace(),
        labels: Some(BTreeMap::from([
            (LABEL_NAME.to_string(), release.name_any()),
            (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        ])),
        owner_references: release.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

pub fn selector_labels(release: &ChatRelease, track: Track) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), release.name_any()),
        (LABEL_TRACK.to_string(), track.as_str().to_string()),
    ])
}

/// A track's Deployment running `template` (the spec's, or the one a track already runs).
pub fn deployment(
    release: &ChatRelease,
    track: Track,
    template: &PodTemplate,
    revision: &str,
    replicas: i32,
) -> Deployment {
    let mut template = template.spec();
    let meta = template.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.extend(selector_labels(release, track));
    labels.insert(LABEL_REVISION.to_string(), revision.to_string());
    let mut object_meta = owned_meta(release, track.workload_name(&release.name_any()));
    if let Some(l) = object_meta.labels.as_mut() {
        l.insert(LABEL_TRACK.to_string(), track.as_str().to_string());
        l.insert(LABEL_REVISION.to_string(), revision.to_string());
    }
    Deployment {
        metadata: object_meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(release, track)),
                ..Default::default()
            },
            template,
            ..Default::default()
        }),
        status: None,
    }
}

/// The port pods listen on: `service.targetPort`, else the first container's first port.
pub fn target_port(release: &ChatRelease) -> i32 {
    let spec = &release.spec;
    spec.service.target_port.unwrap_or_else(|| {
        spec.template
            .spec()
            .spec
            .and_then(|pod| pod.containers.into_iter().next())
            .and_then(|c| c.ports)
            .and_then(|ports| ports.into_iter().next())
            .map_or(spec.service.port, |p| p.container_port)
    })
}

/// The Service `<name>` selecting both tracks. The port is named `http` so Istio treats it as HTTP.
pub fn service(release: &ChatRelease) -> Service {
    Service {
        metadata: owned_meta(release, release.name_any()),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(
                LABEL_NAME.to_string(),
                release.name_any(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: release.spec.service.port,
                target_port: Some(IntOrString::Int(target_port(release))),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// How a live Deployment reads for the decision.
pub fn track_state(deployment: &TrackDeployment) -> TrackState {
    let (spec, status) = (&deployment.spec, &deployment.status);
    let generation = deployment.metadata.generation.unwrap_or(0);
    TrackState {
        revision: spec.template.revision.clone(),
        replicas: spec.replicas.unwrap_or(1),
        total_replicas: status.replicas.unwrap_or(0),
        ready_replicas: status.ready_replicas.unwrap_or(0),
        updated_replicas: status.updated_replicas.unwrap_or(0),
        observed: status.observed_generation.unwrap_or(0) >= generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ChatRelease;

    fn release() -> ChatRelease {
        let mut r: ChatRelease = serde_json::from_value(serde_json::json!({
            "apiVersion": "chatrelease.io/v1alpha1", "kind": "ChatRelease",
            "metadata": {"name": "lobe-chat", "namespace": "chat", "uid": "u-1"},
            "spec": {"template": {"metadata": {"labels": {"team": "chat"}},
                     "spec": {"containers": [{"name": "app", "image": "lobehub/lobe-chat:v1", "ports": [{"containerPort": 3210}]}]}}}
        }))
        .unwrap();
        r.metadata.uid = Some("u-1".into());
        r
    }

    #[test]
    fn revision_changes_with_the_template_only() {
        let r = release();
        let a = r.spec.template.revision();
        assert_eq!(a.len(), 10);
        assert_eq!(a, r.spec.template.clone().revision());
        let mut t = r.spec.template.spec();
        t.spec.as_mut().unwrap().containers[0].image = Some("lobehub/lobe-chat:v2".into());
        assert_ne!(a, PodTemplate::from(t).revision());
    }

    #[test]
    fn deployment_pods_carry_name_track_and_revision_and_keep_user_labels() {
        let r = release();
        let d = deployment(&r, Track::Canary, &r.spec.template, "abc", 2);
        assert_eq!(d.metadata.name.as_deref(), Some("lobe-chat-canary"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ChatRelease", Some(true))
        );
        let labels = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(labels[LABEL_NAME], "lobe-chat");
        assert_eq!(labels[LABEL_TRACK], "canary");
        assert_eq!(labels[LABEL_REVISION], "abc");
        assert_eq!(labels["team"], "chat");
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    }

    #[test]
    fn a_template_reads_the_same_live_as_in_the_spec_but_not_after_set_image() {
        let spec: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "app", "image": "chat:v2", "args": [], "env": [
                {"name": "MODE", "value": "chat"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
            ]}]}
        }))
        .unwrap();
        // As the API server returns it: empty lists dropped, defaults filled in.
        let live: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "app", "image": "chat:v2",
                "imagePullPolicy": "IfNotPresent", "terminationMessagePath": "/dev/termination-log",
                "resources": {}, "env": [
                {"name": "MODE", "value": "chat"},
                {"name": "POD", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
            ]}], "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}
        }))
        .unwrap();
        assert_eq!(fingerprint(&spec), fingerprint(&live));
        let mut set_image = live.clone();
        set_image.spec.as_mut().unwrap().containers[0].image = Some("evil:1".into());
        assert_ne!(fingerprint(&spec), fingerprint(&set_image));
        let mut set_env = live;
        set_env.spec.as_mut().unwrap().containers[0]
            .env
            .as_mut()
            .unwrap()[0]
            .value = Some("debug".into());
        assert_ne!(fingerprint(&spec), fingerprint(&set_env));
    }

    #[test]
    fn service_selects_both_tracks_and_targets_the_container_port() {
        let s = service(&release());
        let spec = s.spec.unwrap();
        assert_eq!(
            spec.selector.unwrap(),
            BTreeMap::from([(LABEL_NAME.to_string(), "lobe-chat".to_string())])
        );
        let port = &spec.ports.unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (80, Some(IntOrString::Int(3210)))
        );
    }
}
