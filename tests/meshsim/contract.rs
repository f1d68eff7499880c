//! What the end-to-end harness and the mesh simulator must agree on. The harness includes this
//! file with `#[path]` (the simulator is a binary, not a library it could import), so it holds
//! only constants both sides use.

/// Name of the optional ConfigMap that turns on a provider outage in its namespace.
pub const CONFIG_MAP_NAME: &str = "mesh-simulator";
/// Key of that ConfigMap: the fraction of every track's requests answered 470-479, e.g. `"0.12"`.
pub const PROVIDER_ERROR_RATE_KEY: &str = "providerErrorRate";
