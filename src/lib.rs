//! chatrelease-operator: canary releases for LLM chat web apps on Kubernetes.
//!
//! The rollout decision (`rollout`, `judge`) is pure; `controller`, `router` and `prometheus` are
//! the I/O around it.

pub mod annotations;
pub mod applied;
pub mod canary_watch;
pub mod checks;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod crd_yaml;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod judge;
pub mod leader;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pod_template;
pub mod prometheus;
#[cfg(test)]
mod reconcile_tests;
pub mod rollout;
pub mod router;
pub mod sequential;
pub mod settings;
pub mod simulate;
pub mod telemetry;
pub mod traffic_rules;
pub mod workload;
