//! The committed CRD is the one the code generates, and it carries what users rely on.

use chatrelease::crd_yaml::crd_yaml;

fn committed() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/chatrelease.yaml");
    std::fs::read_to_string(path).expect("crds/chatrelease.yaml exists")
}

#[test]
fn committed_crd_is_up_to_date() {
    let generated = crd_yaml().expect("CRD renders");
    assert!(
        generated == committed(),
        "crds/chatrelease.yaml is stale: run `cargo run --bin chatrelease-operator -- crd > crds/chatrelease.yaml`"
    );
}

#[test]
fn crd_has_short_name_status_and_printer_columns() {
    let crd: serde_yaml::Value = serde_yaml::from_str(&committed()).expect("YAML");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "chr");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_mapping());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_sequence()
        .expect("printer columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        columns,
        ["Phase", "Weight", "Stable", "Canary", "Message", "Age"]
    );
}

#[test]
fn crd_states_the_rules_a_schema_can_check() {
    let yaml = committed();
    for message in [
        "strategy.steps must be strictly ascending",
        "each of strategy.steps must be a weight from 1 to 100",
        "the last of strategy.steps must be 100",
        "every strategy.manualGates entry must be one of strategy.steps",
        "must be a duration such as 30s",
        "template.spec.containers must list at least one container",
        "analysis.errorRate.max must be a percentage from 0% to 100%",
        "analysis.errorRate.codes must be an RE2 regex",
        "analysis.errorRate.codes must not match 200",
        "analysis.latencyP99.maxIncrease must be a percentage of stable's value from 0% to 1000%",
        "analysis.metrics[].maxIncrease must be a percentage of stable's value from 0% to 1000%",
        "analysis.metrics[].maxDecrease must be a percentage of stable's value from 0% to 100%",
        "a custom metric needs max, min, maxIncrease or maxDecrease",
        "analysis.latencyP99 needs max, maxIncrease or both",
        // Istio's own validation of the VirtualService, refused at apply (traffic_rules.rs).
        "a canaryMatch entry needs a condition in headers, uri or queryParams",
        "a canaryMatch entry with only uri prefix \"/\" matches every request",
        "prefix must not be empty",
        "regex must not be empty",
        "regex must be at most 1024 bytes long",
        "regex must be RE2 syntax, the only kind Istio takes",
        "is not one Istio takes: an HTTP header name",
        "a queryParams name must not be empty",
        "(JWT claim routing) needs traffic.istio.gateways without mesh",
        "traffic.istio.hosts may hold \"*\" only with traffic.istio.gateways",
        "each of traffic.istio.hosts must be a host Istio takes",
        "traffic.istio.hosts must not list a host twice",
        "traffic.istio.hosts must not overlap",
        "each of traffic.istio.gateways must be namespace/name",
    ] {
        assert!(yaml.contains(message), "the CRD lacks the rule: {message}");
    }
    let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("YAML");
    let analysis = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["analysis"]["properties"];
    assert_eq!(analysis["failureLimit"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(analysis["minRequests"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(analysis["failureLimit"]["default"].as_i64(), Some(2));
    assert_eq!(analysis["source"]["default"].as_str(), Some("istio"));
    assert_eq!(
        analysis["source"]["enum"],
        serde_yaml::from_str::<serde_yaml::Value>("[istio, istio-waypoint, otel]").expect("YAML")
    );
    let codes = &analysis["errorRate"]["properties"]["codes"];
    assert_eq!(codes["default"].as_str(), Some("5..|47."));
    assert_eq!(codes["maxLength"].as_u64(), Some(256));
}

/// `has(self.headers)` holds for `headers: {}`, which matches every request: the rule must count
/// the entries. And a regex is compiled by the API server (CEL's matches() is Go's regexp, as
/// Istio's check), not only measured.
#[test]
fn crd_refuses_a_canary_match_that_matches_everything_and_regexes_istio_refuses() {
    let crd: serde_yaml::Value = serde_yaml::from_str(&committed()).expect("YAML");
    let traffic = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["traffic"];
    let entry = &traffic["properties"]["canaryMatch"]["items"];
    let rules: Vec<&str> = entry["x-kubernetes-validations"]
        .as_sequence()
        .expect("canaryMatch entry rules")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| r.contains("size(self.headers) > 0")
                && r.contains("size(self.queryParams) > 0")),
        "{rules:?}"
    );
    let regex = &entry["properties"]["uri"]["properties"]["regex"]["x-kubernetes-validations"];
    let regex_rules: Vec<&str> = regex
        .as_sequence()
        .expect("regex rules")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        regex_rules.iter().any(|r| r.contains("''.matches(self)")),
        "{regex_rules:?}"
    );
    let hosts = &traffic["properties"]["istio"]["properties"]["hosts"]["items"];
    assert_eq!(hosts["maxLength"].as_u64(), Some(255));
    assert!(hosts["x-kubernetes-validations"].is_sequence());
}

/// A relative bound is a percentage the API server checks before the operator sees it: within its
/// range, and no check without any bound at all.
#[test]
fn crd_refuses_relative_bounds_out_of_range_and_checks_without_a_bound() {
    let crd: serde_yaml::Value = serde_yaml::from_str(&committed()).expect("YAML");
    let analysis = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["analysis"]["properties"];
    let rules = |schema: &serde_yaml::Value| -> Vec<String> {
        schema["x-kubernetes-validations"]
            .as_sequence()
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(|r| r["rule"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let metric = &analysis["metrics"]["items"];
    let latency = &analysis["latencyP99"];
    for (schema, most) in [
        (&metric["properties"]["maxIncrease"], "<= 1000.0"),
        (&metric["properties"]["maxDecrease"], "<= 100.0"),
        (&latency["properties"]["maxIncrease"], "<= 1000.0"),
    ] {
        let rules = rules(schema);
        assert!(
            rules
                .iter()
                .any(|r| r.contains("%$')") && r.ends_with(most)),
            "{rules:?}"
        );
        assert_eq!(schema["maxLength"].as_u64(), Some(16));
    }
    assert!(
        rules(metric).contains(
            &"has(self.max) || has(self.min) || has(self.maxIncrease) || has(self.maxDecrease)"
                .to_string()
        ),
        "{:?}",
        rules(metric)
    );
    assert!(
        rules(latency).contains(&"has(self.max) || has(self.maxIncrease)".to_string()),
        "{:?}",
        rules(latency)
    );
    let required: Vec<&str> = latency["required"]
        .as_sequence()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(
        !required.contains(&"max"),
        "latencyP99.max is optional beside maxIncrease"
    );
}

/// A metric names its PromQL or a built-in check, never both and never neither; the API server
/// says so, and refuses a check it does not know.
#[test]
fn crd_refuses_a_metric_with_both_or_neither_of_query_and_check() {
    let crd: serde_yaml::Value = serde_yaml::from_str(&committed()).expect("YAML");
    let metrics = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["analysis"]["properties"]["metrics"];
    let item = &metrics["items"];
    let rules: Vec<&str> = item["x-kubernetes-validations"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    for rule in [
        "has(self.query) != has(self.check)",
        "has(self.name) || has(self.check)",
        "!has(self.flavor) || has(self.check)",
    ] {
        assert!(rules.contains(&rule), "{rule} not in {rules:?}");
    }
    let checks: Vec<&str> = item["properties"]["check"]["enum"]
        .as_sequence()
        .expect("an enum")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let known: Vec<&str> = chatrelease::crd::BuiltinCheck::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(checks, known);
    assert!(item["required"].is_null(), "name and query are optional");
}
