//! chatrelease-operator: canary releases for LLM chat web apps on Kubernetes.
//!
//! The rollout decision (`rollout`, `judge`) is pure; `controller`, `istio` and `prometheus` are
//! the I/O around it.

pub mod annotations;
pub mod crd;
pub mod error;
pub mod judge;
pub mod metrics;
pub mod rollout;
pub mod router;
pub mod settings;
pub mod simulate;
pub mod workload;
