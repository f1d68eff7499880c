//! The pods, Services and ConfigMap the simulator reads, and how a pod answers: from the `SIM_*`
//! variables of its first container, plus a namespace's provider outage.

use crate::contract::PROVIDER_ERROR_RATE_KEY;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Fraction of a pod's requests answered 500 or 503.
pub const ENV_ERROR_RATE: &str = "SIM_ERROR_RATE";
/// Fraction of a pod's requests answered 470-479, LobeChat's model-provider errors.
pub const ENV_PROVIDER_ERROR_RATE: &str = "SIM_PROVIDER_ERROR_RATE";
/// Median request duration of a pod, in milliseconds.
pub const ENV_LATENCY_MS: &str = "SIM_LATENCY_MS";
/// Median time to first token of a pod, in seconds.
pub const ENV_TTFT_SECONDS: &str = "SIM_TTFT_SECONDS";
/// Median time between output tokens after the first, in seconds.
pub const ENV_TIME_PER_OUTPUT_TOKEN_SECONDS: &str = "SIM_TIME_PER_OUTPUT_TOKEN_SECONDS";
/// Median output tokens of an answer.
pub const ENV_OUTPUT_TOKENS: &str = "SIM_OUTPUT_TOKENS";
/// Growth of each pod's memory working set, in bytes per minute since the pod started.
pub const ENV_MEMORY_GROWTH_BYTES_PER_MIN: &str = "SIM_MEMORY_GROWTH_BYTES_PER_MIN";
/// CPU seconds a pod spends on each request it answers.
pub const ENV_CPU_SECONDS_PER_REQUEST: &str = "SIM_CPU_SECONDS_PER_REQUEST";

/// A pod's memory working set when it starts, in bytes.
pub const BASE_MEMORY_BYTES: f64 = 200.0 * 1024.0 * 1024.0;

/// The label value Istio writes when it does not know a value.
pub const UNKNOWN: &str = "unknown";

/// How a pod answers, from the `SIM_*` variables of its first container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behaviour {
    /// Fraction of requests answered 500 or 503.
    pub error_rate: f64,
    /// Fraction of requests answered 470-479.
    pub provider_error_rate: f64,
    /// Median request duration in milliseconds.
    pub latency_ms: f64,
    /// Median time to first token in seconds.
    pub ttft_seconds: f64,
    /// Median time per output token after the first, in seconds.
    pub time_per_output_token_seconds: f64,
    /// Median output tokens of an answer.
    pub output_tokens: f64,
    /// Memory working set growth in bytes per minute.
    pub memory_growth_bytes_per_min: f64,
    /// CPU seconds per request answered.
    pub cpu_seconds_per_request: f64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            provider_error_rate: 0.0,
            latency_ms: 200.0,
            ttft_seconds: 0.4,
            time_per_output_token_seconds: 0.02,
            output_tokens: 300.0,
            memory_growth_bytes_per_min: 0.0,
            cpu_seconds_per_request: 0.01,
        }
    }
}

impl Behaviour {
    /// The behaviour a pod's first container asks for, and a description of each variable that
    /// could not be used (its default applies instead).
    pub fn of_pod(pod: &Pod) -> (Behaviour, Vec<String>) {
        let mut behaviour = Behaviour::default();
        let mut problems = Vec::new();
        let env = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .and_then(|c| c.env.as_ref());
        for var in env.into_iter().flatten() {
            let (slot, is_rate) = match var.name.as_str() {
                ENV_ERROR_RATE => (&mut behaviour.error_rate, true),
                ENV_PROVIDER_ERROR_RATE => (&mut behaviour.provider_error_rate, true),
                ENV_LATENCY_MS => (&mut behaviour.latency_ms, false),
                ENV_TTFT_SECONDS => (&mut behaviour.ttft_seconds, false),
                ENV_TIME_PER_OUTPUT_TOKEN_SECONDS => {
                    (&mut behaviour.time_per_output_token_seconds, false)
                }
                ENV_OUTPUT_TOKENS => (&mut behaviour.output_tokens, false),
                ENV_MEMORY_GROWTH_BYTES_PER_MIN => {
                    (&mut behaviour.memory_growth_bytes_per_min, false)
                }
                ENV_CPU_SECONDS_PER_REQUEST => (&mut behaviour.cpu_seconds_per_request, false),
                _ => continue,
            };
            let Some(text) = var.value.as_deref() else {
                problems.push(format!(
                    "{} has no literal value (valueFrom is not read)",
                    var.name
                ));
                continue;
            };
            match parse_number(text, is_rate) {
                Ok(value) => *slot = value,
                Err(reason) => problems.push(format!("{}={text:?}: {reason}", var.name)),
            }
        }
        (behaviour, problems)
    }
}

/// A rate in 0..=1, or a non-negative finite number.
fn parse_number(text: &str, is_rate: bool) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| "not a number".to_string())?;
    if !value.is_finite() || value < 0.0 {
        return Err("must be a finite number, 0 or more".into());
    }
    if is_rate && value > 1.0 {
        return Err("a rate must be between 0 and 1".into());
    }
    Ok(value)
}

/// The pod's workload as Istio names it: the Deployment for a pod of a Deployment's ReplicaSet
/// (the ReplicaSet's name less `-<pod-template-hash>`), else its controller's name, else its own.
pub fn workload_name(pod: &Pod) -> String {
    let meta = &pod.metadata;
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first());
    match owner {
        Some(owner) if owner.kind == "ReplicaSet" => {
            let hash = meta
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"));
            hash.and_then(|h| owner.name.strip_suffix(&format!("-{h}")))
                .unwrap_or(&owner.name)
                .to_string()
        }
        Some(owner) => owner.name.clone(),
        None => meta.name.clone().unwrap_or_else(|| UNKNOWN.to_string()),
    }
}

/// Envoy sends traffic to a pod only while its Ready condition is True and it is not terminating.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
}

/// What the simulator needs of a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    /// Istio's `destination_workload`.
    pub workload: String,
    /// The first container's name, cAdvisor's `container` label.
    pub container: String,
    /// When the pod started (its status's startTime, else its creation); its memory grows from then.
    pub started: Option<jiff::Timestamp>,
    pub behaviour: Behaviour,
}

impl SimPod {
    /// The pod as the simulator sees it, and the `SIM_*` variables it could not use.
    pub fn of_pod(pod: &Pod) -> (SimPod, Vec<String>) {
        let (behaviour, problems) = Behaviour::of_pod(pod);
        let sim = SimPod {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            labels: pod.labels().clone(),
            ready: is_ready(pod),
            workload: workload_name(pod),
            container: pod
                .spec
                .as_ref()
                .and_then(|spec| spec.containers.first())
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            started: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .or(pod.metadata.creation_timestamp.as_ref())
                .map(|t| t.0),
            behaviour,
        };
        (sim, problems)
    }
}

/// What the simulator needs of a Service: which pods it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct SimService {
    pub namespace: String,
    pub name: String,
    /// `None` for a Service without a selector, whose endpoints are managed by hand.
    pub selector: Option<BTreeMap<String, String>>,
}

impl SimService {
    /// The Service as the simulator sees it.
    pub fn of_service(service: &Service) -> SimService {
        SimService {
            namespace: service.namespace().unwrap_or_default(),
            name: service.name_any(),
            selector: service
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .filter(|s| !s.is_empty()),
        }
    }
}

/// The `providerErrorRate` of a `mesh-simulator` ConfigMap: `None` without the key.
pub fn provider_outage(config_map: &ConfigMap) -> Result<Option<f64>, String> {
    let Some(text) = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(PROVIDER_ERROR_RATE_KEY))
    else {
        return Ok(None);
    };
    parse_number(text, true)
        .map(Some)
        .map_err(|reason| format!("{PROVIDER_ERROR_RATE_KEY}={text:?}: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::CONFIG_MAP_NAME;
    use crate::fixtures::pod;
    use serde_json::{Value, json};

    #[test]
    fn behaviour_defaults_and_unusable_values() {
        let (b, problems) = Behaviour::of_pod(&pod("p", "stable", true, &[]));
        assert_eq!(b, Behaviour::default());
        assert_eq!(
            (
                b.error_rate,
                b.provider_error_rate,
                b.latency_ms,
                b.ttft_seconds
            ),
            (0.0, 0.0, 200.0, 0.4)
        );
        assert!(problems.is_empty());
        let (b, problems) = Behaviour::of_pod(&pod(
            "p",
            "stable",
            true,
            &[
                (ENV_ERROR_RATE, "lots"),
                (ENV_PROVIDER_ERROR_RATE, "1.5"),
                (ENV_LATENCY_MS, " 900 "),
                (ENV_TTFT_SECONDS, "-1"),
            ],
        ));
        assert_eq!(
            b,
            Behaviour {
                latency_ms: 900.0,
                ..Behaviour::default()
            }
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("SIM_ERROR_RATE=\"lots\""),
            "{problems:?}"
        );
    }

    #[test]
    fn only_the_first_container_sets_the_behaviour() {
        let mut p = pod("p", "stable", true, &[]);
        let spec = p.spec.as_mut().unwrap();
        let mut sidecar = spec.containers[0].clone();
        sidecar.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: ENV_ERROR_RATE.into(),
            value: Some("1".into()),
            ..Default::default()
        }]);
        spec.containers.push(sidecar);
        assert_eq!(Behaviour::of_pod(&p).0, Behaviour::default());
    }

    #[test]
    fn provider_outage_reads_the_config_map_key() {
        let cm = |data: Value| -> ConfigMap {
            serde_json::from_value(
                json!({"metadata": {"name": CONFIG_MAP_NAME, "namespace": "chat"}, "data": data}),
            )
            .unwrap()
        };
        assert_eq!(
            provider_outage(&cm(json!({"providerErrorRate": "0.12"}))),
            Ok(Some(0.12))
        );
        assert_eq!(provider_outage(&cm(json!({}))), Ok(None));
        assert!(provider_outage(&cm(json!({"providerErrorRate": "12%"}))).is_err());
    }

    // --- Names ---

    #[test]
    fn the_workload_of_a_deployments_pod_is_the_deployment() {
        assert_eq!(
            workload_name(&pod("lobe-chat-canary-5d8f9c7b6-c", "canary", true, &[])),
            "lobe-chat-canary"
        );
        let mut p = pod("x", "canary", true, &[]);
        // A ReplicaSet of its own, not a Deployment's: its name stands.
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("pod-template-hash");
        assert_eq!(workload_name(&p), "lobe-chat-canary-5d8f9c7b6");
        let owners = p.metadata.owner_references.as_mut().unwrap();
        owners[0].kind = "StatefulSet".into();
        owners[0].name = "chat-db".into();
        assert_eq!(workload_name(&p), "chat-db");
        p.metadata.owner_references = None;
        assert_eq!(workload_name(&p), "x");
    }

    #[test]
    fn readiness_needs_ready_true_and_no_deletion() {
        assert!(is_ready(&pod("p", "stable", true, &[])));
        assert!(!is_ready(&pod("p", "stable", false, &[])));
        let mut no_status = pod("p", "stable", true, &[]);
        no_status.status = None;
        assert!(!is_ready(&no_status));
    }
}
