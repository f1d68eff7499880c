//! The `ChatRelease` custom resource: what a user writes (spec) and what the operator reports
//! (status). Durations and percentages stay strings here so that a malformed value never stops the
//! object from deserialising; `settings.rs` turns them into typed values and names the bad field.

pub use crate::pod_template::PodTemplate;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Go-style duration as Kubernetes writes them: `30s`, `1m`, `1h30m`, `250ms`. At most six digits
/// a number and 16 characters, so CEL's `duration()` in the range rules below cannot overflow.
macro_rules! duration_regex {
    () => {
        "'^([0-9]{1,6}(\\\\.[0-9]{1,9})?(ms|s|m|h))+$'"
    };
}
const DURATION_RULE: &str = concat!("self.matches(", duration_regex!(), ")");
const DURATION_MESSAGE: &str =
    "must be a duration such as 30s, 1m, 5m or 1h30m (units ms, s, m, h)";
/// A range rule that holds for a malformed text, which DURATION_RULE already reports.
macro_rules! duration_range_rule {
    ($min:literal, $max:literal) => {
        concat!(
            "!self.matches(",
            duration_regex!(),
            ") || (duration(self) >= duration('",
            $min,
            "') && duration(self) <= duration('",
            $max,
            "'))"
        )
    };
}

/// A canary release of a chat web app: a stable and a canary Deployment behind one Service, with
/// traffic split by Istio and every step judged by Prometheus.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chatrelease.io",
    version = "v1alpha1",
    kind = "ChatRelease",
    plural = "chatreleases",
    shortname = "chr",
    namespaced,
    status = "ChatReleaseStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canaryWeight"}"#,
    printcolumn = r#"{"name":"Stable","type":"string","jsonPath":".status.stableImage"}"#,
    printcolumn = r#"{"name":"Canary","type":"string","jsonPath":".status.canaryImage"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ChatReleaseSpec {
    /// Size of the stable Deployment, and of the canary while it runs.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,

    /// The pod template to release. Changing it starts a canary.
    #[x_kube(validation = kube::core::Rule::new("has(self.spec) && size(self.spec.containers) > 0")
        .message("template.spec.containers must list at least one container"))]
    pub template: PodTemplate,

    /// The Service in front of both tracks.
    #[serde(default)]
    pub service: ServicePorts,

    /// How traffic reaches the tracks.
    #[serde(default)]
    pub traffic: Traffic,

    /// The steps of the canary and their pacing.
    #[serde(default)]
    pub strategy: Strategy,

    /// How each step is judged.
    #[serde(default)]
    pub analysis: Analysis,
}

impl ChatRelease {
    /// The release's namespace and name as the key of a per-release map. kube's
    /// `ObjectRef::from_obj` also copies the uid and resourceVersion, which no lookup compares
    /// and every entry would hold for nothing.
    pub fn key(&self) -> kube::runtime::reflector::ObjectRef<ChatRelease> {
        use kube::ResourceExt;
        let key = kube::runtime::reflector::ObjectRef::new(&self.name_any());
        match self.namespace() {
            Some(namespace) => key.within(&namespace),
            None => key,
        }
    }
}

fn default_replicas() -> i32 {
    2
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePorts {
    /// Port the Service listens on.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Container port traffic goes to. Default: the first container's first port, else `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<i32>,
}

impl Default for ServicePorts {
    fn default() -> Self {
        Self {
            port: default_service_port(),
            target_port: None,
        }
    }
}

fn default_service_port() -> i32 {
    80
}

// ---- Istio's own checks on the VirtualService fields below, as CEL rules ----
//
// Istio's validating webhook (`pkg/config/validation`) refuses a VirtualService these rules refuse,
// so the ChatRelease is refused at apply instead of the operator's write failing later. What CEL
// cannot say is checked by `traffic_rules.rs` before any write; it checks all of these again, for
// objects admitted before a CRD upgrade and for `simulate` files.

/// One DNS-1123 label as Istio's `labels.IsDNS1123Label` takes it: either case, at most 63.
macro_rules! dns_label {
    () => {
        r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?"
    };
}

/// Istio's `agent.ValidateWildcardDomain`: the first label may be `*` or start with `*` / `*-`
/// (`labels.IsWildcardDNS1123Label`), the rest are DNS labels, a trailing dot is allowed and the
/// last label may not be all digits (`ValidateDNS1123Labels`); or an IP address
/// (`netutil.IsValidIPAddress`). The 255 limit (`CheckDNS1123Preconditions`) is the maxLength.
const HOST_RULE: &str = concat!(
    r"(self.matches('^(\\*|\\*[a-zA-Z0-9]([-a-zA-Z0-9]{0,60}[a-zA-Z0-9])?",
    r"|\\*-[a-zA-Z0-9]([-a-zA-Z0-9]{0,59}[a-zA-Z0-9])?|",
    dns_label!(),
    r")(\\.",
    dns_label!(),
    r")*\\.?$') && !self.matches('\\.[0-9]+$')) || isIP(self)"
);
const HOST_MESSAGE: &str = "each of traffic.istio.hosts must be a host Istio takes: a DNS name \
    (labels of letters, digits and '-', at most 63 each, the last not all digits), with a wildcard \
    only at the start (\"*\" or \"*.example.com\"), or an IP address";

/// Istio's `validateGatewayNames`: `namespace/name`, both DNS labels, or else a name that passes
/// `agent.ValidateFQDN` (DNS labels, the last not all digits), such as `mesh`.
const GATEWAY_RULE: &str = concat!(
    "self.matches('^",
    dns_label!(),
    "/",
    dns_label!(),
    "$') || (self.matches('^",
    dns_label!(),
    r"(\\.",
    dns_label!(),
    r")*\\.?$') && !self.matches('(^|\\.)[0-9]+$'))"
);
const GATEWAY_MESSAGE: &str = "each of traffic.istio.gateways must be namespace/name (each a DNS \
    label: letters, digits and '-', at most 63), a plain gateway name such as public, or mesh";

/// A header name that Istio's `jwt.ToRoutingClaim` reads as a JWT claim:
/// `@request.auth.claims.<claim>` or `@request.auth.claims[<claim>]`, prefix in any case.
macro_rules! jwt_claim_regex {
    () => {
        r"'(?is)^@request\\.auth\\.claims(\\..+|\\[.+\\])$'"
    };
}

/// Istio's `ValidateHTTPHeaderNameOrJwtClaimRoute`: `validHeaderNameRegex` (RFC 7230 token
/// characters; its `+-.` is a range, so ',' is in too), the pseudo-headers of `pseudoHeaders`, or
/// a JWT claim.
macro_rules! header_name_ok {
    () => {
        concat!(
            r"k.matches('^[!#$%&\'*+-.^_`|~A-Za-z0-9]+$')",
            r" || k in [':method', ':scheme', ':authority', ':path', ':status'] || k.matches(",
            jwt_claim_regex!(),
            ")"
        )
    };
}
const HEADER_NAMES_RULE: &str = concat!("self.all(k, ", header_name_ok!(), ")");
/// Names the first bad header name.
const HEADER_NAMES_MESSAGE: &str = concat!(
    r#"'header name "' + self.filter(k, !("#,
    header_name_ok!(),
    r#"))[0] + '" is not one Istio takes: an HTTP header name (letters, digits and "#,
    r#"!#$%&\'*+-.^_`|~), a pseudo-header (:method, :scheme, :authority, :path, :status) or "#,
    r#"@request.auth.claims.<claim>'"#
);

fn host_items(schema: &mut schemars::Schema) {
    string_items(schema, 255, HOST_RULE, HOST_MESSAGE);
}

fn gateway_items(schema: &mut schemars::Schema) {
    string_items(schema, 255, GATEWAY_RULE, GATEWAY_MESSAGE);
}

/// Items of a list of strings with a length limit and a rule, so an error names the item.
fn string_items(schema: &mut schemars::Schema, max_length: u32, rule: &str, message: &str) {
    let rule = kube::core::Rule::new(rule).message(message);
    schema.insert(
        "items".into(),
        serde_json::json!({
            "type": "string",
            "maxLength": max_length,
            "x-kubernetes-validations": [rule],
        }),
    );
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
// Istio's ValidateVirtualService refuses JWT claim routing when the VirtualService is not bound
// to gateways only ("JWT claim based routing ... is only supported for gateway").
#[x_kube(validation = kube::core::Rule::new(concat!(
        "has(self.gatewayAPI) || (has(self.istio) && has(self.istio.gateways) && size(self.istio.gateways) > 0",
        " && !('mesh' in self.istio.gateways)) || !has(self.canaryMatch)",
        " || self.canaryMatch.all(m, !has(m.headers) || m.headers.all(k, !k.matches(",
        jwt_claim_regex!(),
        ")))"))
    .message("a canaryMatch header @request.auth.claims.<claim> (JWT claim routing) needs \
        traffic.istio.gateways without mesh: Istio routes on JWT claims only at gateways"))]
// One router per ChatRelease: an Istio VirtualService or a Gateway API HTTPRoute.
// `istio` defaults to `{}`, so it counts as set when it holds hosts or gateways.
#[x_kube(validation = kube::core::Rule::new(
        "!has(self.gatewayAPI) || !has(self.istio) || (!has(self.istio.hosts) && !has(self.istio.gateways))")
    .message("traffic.istio and traffic.gatewayAPI are two routers: set one of them (neither means istio)"))]
// HTTPRoute header matches are Exact or RegularExpression on an HTTP header name; Istio's JWT
// claim pseudo-headers do not exist there.
#[x_kube(validation = kube::core::Rule::new(
        "!has(self.gatewayAPI) || !has(self.canaryMatch) \
         || self.canaryMatch.all(m, !has(m.headers) || m.headers.all(k, k == ':method' || k.matches('^[A-Za-z0-9!#$%&*+.^_|~`\\x27-]+$')))")
    .message("with traffic.gatewayAPI each canaryMatch header must be an HTTP header name (or \
        :method): @request.auth.claims routing is Istio's alone"))]
// The Gateway API ranks a RegularExpression path below every path prefix, the `/` of the split's
// own rule included (Istio's GAMMA does): a tester route on a path regex would never match.
#[x_kube(validation = kube::core::Rule::new(
        "!has(self.gatewayAPI) || !has(self.canaryMatch) \
         || self.canaryMatch.all(m, !has(m.uri) || !has(m.uri.regex))")
    .message("with traffic.gatewayAPI a canaryMatch uri takes exact or prefix, not regex: \
        HTTPRoute implementations rank a path regex below the split's own prefix /, so the \
        tester route would never match"))]
// An HTTPRoute path is absolute.
#[x_kube(validation = kube::core::Rule::new(
        "!has(self.gatewayAPI) || !has(self.canaryMatch) \
         || self.canaryMatch.all(m, !has(m.uri) || has(m.uri.regex) \
              || (has(m.uri.exact) && m.uri.exact.startsWith('/')) \
              || (has(m.uri.prefix) && m.uri.prefix.startsWith('/')))")
    .message("with traffic.gatewayAPI a canaryMatch uri exact or prefix must start with \"/\": an \
        HTTPRoute path is absolute"))]
pub struct Traffic {
    /// Istio settings for the VirtualService (the default router).
    #[serde(default)]
    pub istio: IstioTraffic,
    /// Route through the Gateway API instead of Istio: an HTTPRoute attached to a Gateway
    /// (north-south) or to the app's Service (GAMMA: the mesh, east-west).
    #[serde(
        default,
        rename = "gatewayAPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_api: Option<GatewayApiTraffic>,
    /// Requests that always go to the canary while one runs (testers, a premium tier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub canary_match: Vec<HttpMatch>,
    /// Cookie that keeps a user on the version they first got, both ways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9_-]+$')")
        .message("stickyCookie must be a cookie name of letters, digits, '-' or '_'"))]
    pub sticky_cookie: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
// Istio's ValidateVirtualService: "wildcard host * is not allowed for virtual services bound to
// the mesh gateway".
// A VirtualService is bound to gateways only when it lists some and not mesh (Istio's isGateway).
#[x_kube(validation = kube::core::Rule::new(
        "!(has(self.hosts) && '*' in self.hosts) \
         || (has(self.gateways) && size(self.gateways) > 0 && !('mesh' in self.gateways))")
    .message("traffic.istio.hosts may hold \"*\" only with traffic.istio.gateways that do not \
        list mesh: Istio refuses the wildcard host * for the mesh"))]
pub struct IstioTraffic {
    /// Hosts of the VirtualService. Default: the Service's in-cluster name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), transform = host_items)]
    // Istio's ValidateVirtualService: "duplicate hosts in virtual service" (host.Name.Matches).
    #[x_kube(validation = kube::core::Rule::new("self.all(a, self.exists_one(b, b == a))")
        .message("traffic.istio.hosts must not list a host twice: Istio refuses duplicate hosts"))]
    #[x_kube(validation = kube::core::Rule::new(
            "self.all(a, self.all(b, a == b || !((a.startsWith('*') && b.endsWith(a.substring(1))) \
             || (b.startsWith('*') && a.endsWith(b.substring(1))))))")
        .message("traffic.istio.hosts must not overlap, as *.example.com and chat.example.com do: \
            Istio refuses duplicate hosts"))]
    pub hosts: Vec<String>,
    /// Gateways the VirtualService binds to (`namespace/name`, or `mesh`). Default: the mesh only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), transform = gateway_items)]
    pub gateways: Vec<String>,
}

/// Where an HTTPRoute attaches and which hostnames it answers, as the Gateway API's own fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiTraffic {
    /// Gateways (north-south) or the app's Service (`{group: "", kind: Service, name: <name>}`:
    /// GAMMA, the mesh) the HTTPRoute attaches to.
    #[schemars(length(min = 1, max = 32))]
    pub parent_refs: Vec<ParentReference>,
    /// Hostnames the HTTPRoute answers for. Default: whatever its parents accept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), transform = hostname_items)]
    pub hostnames: Vec<String>,
}

/// The Gateway API's ParentReference, with its own limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// API group of the parent. Default `gateway.networking.k8s.io`; `""` for a Service (GAMMA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = kube::core::Rule::new(
            r"self == '' || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
        .message("parentRefs group must be empty (core) or a DNS subdomain"))]
    pub group: Option<String>,
    /// Kind of the parent. Default `Gateway`; `Service` for GAMMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$')")
        .message("parentRefs kind must be a Kubernetes kind such as Gateway or Service"))]
    pub kind: Option<String>,
    /// Namespace of the parent. Default: the ChatRelease's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("parentRefs namespace must be a DNS label"))]
    pub namespace: Option<String>,
    /// Name of the parent.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// A listener of the Gateway (or port name of the Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(
            r"self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
        .message("parentRefs sectionName must be a DNS subdomain"))]
    pub section_name: Option<String>,
    /// Port of the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// The Gateway API's Hostname: a DNS name, optionally with a leading `*.`.
const HOSTNAME_RULE: &str =
    r"self.matches('^(\\*\\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";
const HOSTNAME_MESSAGE: &str = "each of traffic.gatewayAPI.hostnames must be a lower-case DNS \
    name, optionally starting with *. (no IP address, no port)";

fn hostname_items(schema: &mut schemars::Schema) {
    string_items(schema, 253, HOSTNAME_RULE, HOSTNAME_MESSAGE);
}

/// A subset of Istio's HTTPMatchRequest: the parts a tester route needs. Every condition must
/// hold; an entry must have one that some request fails, or all users would reach the canary.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
// `has(self.headers)` alone holds for `headers: {}`, which matches every request.
#[x_kube(validation = kube::core::Rule::new(
        "(has(self.headers) && size(self.headers) > 0) || has(self.uri) \
         || (has(self.queryParams) && size(self.queryParams) > 0)")
    .message("a canaryMatch entry needs a condition in headers, uri or queryParams: one without \
        matches every request, and all users would reach the canary"))]
#[x_kube(validation = kube::core::Rule::new(
        "!(has(self.uri) && has(self.uri.prefix) && self.uri.prefix == '/') \
         || (has(self.headers) && size(self.headers) > 0) \
         || (has(self.queryParams) && size(self.queryParams) > 0)")
    .message("a canaryMatch entry with only uri prefix \"/\" matches every request: all users \
        would reach the canary"))]
pub struct HttpMatch {
    /// Header name to match (lower case, `cookie` for cookies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = kube::core::Rule::new(HEADER_NAMES_RULE)
        .message(kube::core::Message::Expression(HEADER_NAMES_MESSAGE.into())))]
    pub headers: Option<BTreeMap<String, StringMatch>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 16))]
    // Istio does not check query parameter names; Envoy refuses an empty one
    // (QueryParameterMatcher.name: min_len 1), and with it every route of the listener.
    #[x_kube(validation = kube::core::Rule::new("self.all(k, size(k) > 0)")
        .message("a queryParams name must not be empty"))]
    pub query_params: Option<BTreeMap<String, StringMatch>>,
}

/// Istio's StringMatch: exactly one of exact, prefix or regex (RE2).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1")
    .message("a string match needs exactly one of exact, prefix or regex"))]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    // Istio's validateStringMatch: "prefix string match should not be empty" (headers,
    // queryParams; on uri Istio takes it, and it matches every path).
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0")
        .message("prefix must not be empty: Istio refuses an empty prefix (on uri it would match \
            every request)"))]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    // Istio's validateStringMatchRegexp: "regex string match should not be empty".
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0")
        .message("regex must not be empty: Istio refuses an empty regex"))]
    // Istio's validateStringRegexp: "regex is too large, max length allowed is 1024" (bytes).
    #[x_kube(validation = kube::core::Rule::new("size(bytes(self)) <= 1024")
        .message("regex must be at most 1024 bytes long, Istio's limit"))]
    // Istio's validateStringRegexp compiles it with Go's regexp (RE2 syntax), as CEL's matches()
    // does: a pattern that does not compile makes this rule fail with Go's error and this message.
    #[x_kube(validation = kube::core::Rule::new("!''.matches(self) || ''.matches(self)")
        .message("regex must be RE2 syntax, the only kind Istio takes \
            (https://github.com/google/re2/wiki/Syntax): no look-ahead (?=, look-behind (?<= or \
            backreferences \\1"))]
    pub regex: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.manualGates.all(g, g in self.steps)")
    .message("every strategy.manualGates entry must be one of strategy.steps"))]
pub struct Strategy {
    /// Canary weights in percent: ascending, each in 1..=100, the last 100.
    #[serde(default = "default_steps")]
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(validation = kube::core::Rule::new("self.all(s, s >= 1 && s <= 100)")
        .message("each of strategy.steps must be a weight from 1 to 100"))]
    #[x_kube(validation = kube::core::Rule::new("self.isSorted() && self.all(s, self.exists_one(t, t == s))")
        .message("strategy.steps must be strictly ascending, such as [5, 25, 50, 100]"))]
    #[x_kube(validation = kube::core::Rule::new("self[self.size() - 1] == 100")
        .message("the last of strategy.steps must be 100"))]
    pub steps: Vec<i32>,
    /// Time between two analyses (and two steps).
    #[serde(default = "default_interval")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = kube::core::Rule::new(duration_range_rule!("1s", "24h"))
        .message("strategy.interval must be from 1s to 24h"))]
    pub interval: String,
    /// Weights the canary enters only after the promote annotation.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub manual_gates: Vec<i32>,
    /// How long canary pods keep running after traffic leaves them, so streaming chats finish.
    #[serde(default = "default_drain_timeout")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = kube::core::Rule::new(duration_range_rule!("0s", "24h"))
        .message("strategy.drainTimeout must be from 0s to 24h"))]
    pub drain_timeout: String,
    /// Canary pods not Ready by then roll back; no analysis passing at a step this long rolls
    /// back (the last evidence failed) or pauses.
    #[serde(default = "default_progress_deadline")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = kube::core::Rule::new(duration_range_rule!("30s", "24h"))
        .message("strategy.progressDeadline must be from 30s to 24h"))]
    pub progress_deadline: String,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            interval: default_interval(),
            manual_gates: Vec::new(),
            drain_timeout: default_drain_timeout(),
            progress_deadline: default_progress_deadline(),
        }
    }
}

fn default_steps() -> Vec<i32> {
    vec![5, 25, 50, 100]
}
fn default_interval() -> String {
    "1m".into()
}
fn default_drain_timeout() -> String {
    "5m".into()
}
fn default_progress_deadline() -> String {
    "10m".into()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Where to query. Default: the operator's `--prometheus-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,
    /// Which series count requests, errors and latency: `istio` (sidecars), `istio-waypoint`
    /// (ambient mode's waypoint proxy) or `otel` (the app's own OpenTelemetry HTTP metrics).
    #[serde(default)]
    pub source: RequestSource,
    /// Range of each query. Default: the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = kube::core::Rule::new(duration_range_rule!("1s", "24h"))
        .message("analysis.window must be from 1s to 24h"))]
    pub window: Option<String>,
    /// How often, between the interval's analyses, the canary is watched for overwhelming
    /// evidence that it is worse than stable (a sequential test that may roll back at once).
    /// Default 10s; 0s turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = kube::core::Rule::new(duration_range_rule!("0s", "1h"))
        .message("analysis.watchEvery must be from 0s (off) to 1h"))]
    pub watch_every: Option<String>,
    /// Fewer canary requests than this in a window make the analysis inconclusive.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub min_requests: i64,
    /// Consecutive failed analyses that roll back.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_limit: i32,
    /// A breach that stable shares in the same window is not the canary's fault.
    #[serde(default = "default_true")]
    pub compare_to_stable: bool,
    /// Bound on the share of requests answered with an error status (`codes`).
    #[serde(default = "default_error_rate")]
    pub error_rate: ErrorRateBound,
    /// Bound on the 99th percentile of request duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99: Option<LatencyBound>,
    /// More checks, each a PromQL query or a built-in check, run for both tracks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    // A check's name defaults to the check; '' for an entry with neither, which its own rule
    // refuses with a clearer message.
    #[x_kube(validation = kube::core::Rule::new(concat!(
            "self.all(m, self.exists_one(n, ",
            "(has(n.name) ? n.name : (has(n.check) ? n.check : '')) == ",
            "(has(m.name) ? m.name : (has(m.check) ? m.check : ''))))"))
        .message("analysis.metrics names must be unique (a check without a name is named after \
            its check)"))]
    pub metrics: Vec<CustomMetric>,
}

impl Default for Analysis {
    fn default() -> Self {
        Self {
            prometheus: None,
            source: RequestSource::default(),
            window: None,
            watch_every: None,
            min_requests: default_min_requests(),
            failure_limit: default_failure_limit(),
            compare_to_stable: true,
            error_rate: default_error_rate(),
            latency_p99: None,
            metrics: Vec::new(),
        }
    }
}

fn default_min_requests() -> i64 {
    50
}
fn default_failure_limit() -> i32 {
    2
}
fn default_true() -> bool {
    true
}
fn default_error_rate() -> ErrorRateBound {
    ErrorRateBound {
        max: default_max_error_rate(),
        codes: default_error_codes(),
    }
}
fn default_max_error_rate() -> String {
    "1%".into()
}
/// Server errors, and 470-479: LobeChat answers a failed model-provider call with these, and a
/// user sees them as a broken chat.
pub const DEFAULT_ERROR_CODES: &str = "5..|47.";
fn default_error_codes() -> String {
    DEFAULT_ERROR_CODES.into()
}

/// Where the request metrics come from. Each names the same three numbers (requests, errors,
/// P99) in another set of series; `prometheus.rs` holds the queries of each.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RequestSource {
    /// Istio's sidecars: `istio_requests_total` and `istio_request_duration_milliseconds` with
    /// `reporter="destination"`.
    #[default]
    #[serde(rename = "istio")]
    Istio,
    /// Istio's ambient mode: the same series as reported by the waypoint proxy,
    /// `reporter="waypoint"`.
    #[serde(rename = "istio-waypoint")]
    IstioWaypoint,
    /// The app's OpenTelemetry HTTP server metrics as Prometheus stores them:
    /// `http_server_request_duration_seconds`, by `namespace` and `workload` labels.
    #[serde(rename = "otel")]
    Otel,
}

impl RequestSource {
    /// The name a spec writes.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestSource::Istio => "istio",
            RequestSource::IstioWaypoint => "istio-waypoint",
            RequestSource::Otel => "otel",
        }
    }
}

/// A built-in check whose query the operator writes for each track: `ttft-p99`, `ttft-p95`,
/// `time-per-output-token-p99`, `output-tokens-per-request`, `memory-growth` or `cpu-per-request`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BuiltinCheck {
    /// 99th percentile of time to first token, in seconds.
    #[serde(rename = "ttft-p99")]
    TtftP99,
    /// 95th percentile of time to first token, in seconds.
    #[serde(rename = "ttft-p95")]
    TtftP95,
    /// 99th percentile of the time between output tokens after the first, in seconds.
    #[serde(rename = "time-per-output-token-p99")]
    TimePerOutputTokenP99,
    /// Mean output tokens per answered request.
    #[serde(rename = "output-tokens-per-request")]
    OutputTokensPerRequest,
    /// Steepest growth of a pod's memory working set, in bytes per minute.
    #[serde(rename = "memory-growth")]
    MemoryGrowth,
    /// CPU seconds spent per request served.
    #[serde(rename = "cpu-per-request")]
    CpuPerRequest,
}

impl BuiltinCheck {
    /// Every check, in the order the README lists them.
    pub const ALL: [BuiltinCheck; 6] = [
        BuiltinCheck::TtftP99,
        BuiltinCheck::TtftP95,
        BuiltinCheck::TimePerOutputTokenP99,
        BuiltinCheck::OutputTokensPerRequest,
        BuiltinCheck::MemoryGrowth,
        BuiltinCheck::CpuPerRequest,
    ];

    /// The name a spec writes, which is also the check's default name in status.
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinCheck::TtftP99 => "ttft-p99",
            BuiltinCheck::TtftP95 => "ttft-p95",
            BuiltinCheck::TimePerOutputTokenP99 => "time-per-output-token-p99",
            BuiltinCheck::OutputTokensPerRequest => "output-tokens-per-request",
            BuiltinCheck::MemoryGrowth => "memory-growth",
            BuiltinCheck::CpuPerRequest => "cpu-per-request",
        }
    }
}

/// Whose metric names the LLM checks read: `otel` (OpenTelemetry GenAI, the default) or `vllm`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum CheckFlavor {
    /// The OpenTelemetry GenAI semantic conventions (`gen_ai_server_time_to_first_token_seconds`).
    #[default]
    #[serde(rename = "otel")]
    Otel,
    /// vLLM's own metrics (`vllm:time_to_first_token_seconds`).
    #[serde(rename = "vllm")]
    Vllm,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSource {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.istio-system:9090`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("analysis.prometheus.address must start with http:// or https://"))]
    pub address: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorRateBound {
    /// Highest acceptable error rate, as a percentage: `1%`, `0.5%`.
    #[serde(default = "default_max_error_rate")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?%$') && double(self.substring(0, self.size() - 1)) <= 100.0")
        .message("analysis.errorRate.max must be a percentage from 0% to 100%, such as 1% or 0.5%"))]
    pub max: String,
    /// Status codes that count as errors: an RE2 regex over the whole code, as Prometheus's
    /// `=~` takes it. Default `5..|47.` (server errors and LobeChat's provider errors).
    #[serde(default = "default_error_codes")]
    #[schemars(length(min = 1, max = 256))]
    // CEL's matches() compiles RE2, as Prometheus does: a pattern that does not compile makes
    // this rule fail with the compiler's error and this message.
    #[x_kube(validation = kube::core::Rule::new("!''.matches(self) || ''.matches(self)")
        .message("analysis.errorRate.codes must be an RE2 regex (https://github.com/google/re2/wiki/Syntax), \
            such as 5..|47."))]
    // Prometheus anchors a label regex at both ends. A regex that takes 200 counts successful
    // requests as errors: every canary would roll back.
    #[x_kube(validation = kube::core::Rule::new("!'200'.matches('^(?:' + self + ')$')")
        .message("analysis.errorRate.codes must not match 200: it would count successful \
            requests as errors and roll back every canary"))]
    pub codes: String,
}

/// A percentage bound relative to stable, such as `30%` or `12.5%`, from 0% to `$max`% (the regex
/// admits only digits, so CEL's `double()` always has a number to take).
macro_rules! increase_rule {
    ($field:literal, $max:literal) => {
        kube::core::Rule::new(concat!(
            "self.matches('^[0-9]{1,6}(\\\\.[0-9]{1,6})?%$') && double(self.substring(0, self.size() - 1)) <= ",
            $max,
            ".0"
        ))
        .message(concat!(
            $field,
            " must be a percentage of stable's value from 0% to ",
            $max,
            "%, such as 30% or 12.5%"
        ))
    };
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.max) || has(self.maxIncrease)")
    .message("analysis.latencyP99 needs max, maxIncrease or both"))]
pub struct LatencyBound {
    /// Highest acceptable P99 request duration, such as `3s` or `800ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    #[x_kube(validation = kube::core::Rule::new(duration_range_rule!("1ms", "1h"))
        .message("analysis.latencyP99.max must be from 1ms to 1h"))]
    pub max: Option<String>,
    /// How far the canary's P99 may rise above stable's in the same window, as a percentage of
    /// stable's: `30%` fails a canary slower than stable × 1.30. Also the tolerance within which a
    /// breach of `max` is trouble both versions share (default 20%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = increase_rule!("analysis.latencyP99.maxIncrease", "1000"))]
    pub max_increase: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
        "has(self.max) || has(self.min) || has(self.maxIncrease) || has(self.maxDecrease)")
    .message("a custom metric needs max, min, maxIncrease or maxDecrease"))]
#[x_kube(validation = kube::core::Rule::new("has(self.query) != has(self.check)")
    .message("each of analysis.metrics needs exactly one of query (your PromQL) and check (a \
        built-in check such as ttft-p99)"))]
#[x_kube(validation = kube::core::Rule::new("has(self.name) || has(self.check)")
    .message("analysis.metrics[].name is required with a query (a check is named after itself \
        unless given a name)"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.flavor) || has(self.check)")
    .message("analysis.metrics[].flavor goes with check: it says whose metric names a built-in \
        check reads, and a query names its own"))]
pub struct CustomMetric {
    /// Name shown in status; unique among the metrics. Default: the `check`, if one is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("a metric name must be lower-case letters, digits and '-'"))]
    pub name: Option<String>,
    /// PromQL returning one number; `{{namespace}}`, `{{workload}}` and `{{window}}` are filled in.
    /// Exactly one of `query` and `check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub query: Option<String>,
    /// A built-in check whose query the operator writes for each track (see the README's "How
    /// the judge decides"). Exactly one of `query` and `check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<BuiltinCheck>,
    /// Whose metric names the LLM checks read: `otel` (the OpenTelemetry GenAI semantic
    /// conventions, the default) or `vllm` (vLLM's own `vllm:` metrics). Only with `check`;
    /// `memory-growth` and `cpu-per-request` read the kubelet's container metrics either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<CheckFlavor>,
    /// The canary's value must not exceed this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The canary's value must not fall below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// How far the canary's value may rise above stable's in the same window, as a percentage of
    /// stable's (`30%`: at most stable × 1.30), 0% to 1000%. Also the tolerance within which a
    /// breach of `max` is trouble both versions share (default 20%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = increase_rule!("analysis.metrics[].maxIncrease", "1000"))]
    pub max_increase: Option<String>,
    /// How far the canary's value may fall below stable's, as a percentage of stable's (`10%`: at
    /// least stable × 0.90), 0% to 100%. Also the tolerance for a breach of `min` (default 20%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = increase_rule!("analysis.metrics[].maxDecrease", "100"))]
    pub max_decrease: Option<String>,
}

/// Where a ChatRelease stands. `Failed` means the spec cannot be applied.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Initializing,
    Stable,
    Progressing,
    Paused,
    Promoting,
    Succeeded,
    RolledBack,
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Why the rollout is paused, so that the right thing resumes it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseReason {
    /// Waiting at a manual gate for the promote annotation.
    ManualGate,
    /// The pause annotation is set.
    Annotation,
    /// Analysis was inconclusive for longer than progressDeadline.
    Inconclusive,
}

/// The outcome of one check, or of one whole analysis.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ChatReleaseStatus {
    #[serde(default)]
    pub phase: Phase,
    /// The router whose objects carry the traffic now: `istio` or `gatewayAPI` (absent: istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    #[serde(default)]
    pub canary_weight: i32,
    /// Index into strategy.steps of the weight the canary has; absent before the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_image: Option<String>,
    /// Consecutive failed analyses of the current canary.
    #[serde(default)]
    pub failed_checks: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One sentence: why the last action was taken.
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<PauseReason>,
    /// When the canary template was applied; its pods must be Ready within progressDeadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_started_at: Option<Time>,
    /// When the canary entered its current weight; the next analysis is an interval later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// Start of the current run of analyses at this step that did not pass (failed or
    /// inconclusive): past progressDeadline it rolls back or pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconclusive_since: Option<Time>,
    /// When the canary's pods stopped being all Ready while it held a step: its weight is
    /// withdrawn until they are, and it rolls back when they are not Ready again within
    /// progressDeadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_unready_since: Option<Time>,
    /// When traffic last left the canary; its pods scale to 0 a drainTimeout later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<Time>,
}

/// One analysis: the numbers behind the verdict.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRecord {
    pub time: Time,
    pub verdict: Verdict,
    /// The weight the canary had during the window.
    pub weight: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_requests: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_requests: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckRecord>,
    /// Why the analysis came out as it did.
    pub reason: String,
}

/// One check in one analysis.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckRecord {
    /// `error-rate`, `latency-p99` or the name of a custom metric.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<f64>,
    /// The bound as written, with its direction: `<= 1%`, `<= 3000ms`, `>= 0.95`; a bound relative
    /// to stable with what it came to in the window: `<= stable × 1.30 (650ms)`.
    pub bound: String,
    /// Unit of canary and stable: `%`, `ms` or empty for custom metrics.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}
