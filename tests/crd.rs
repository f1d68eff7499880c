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
    ] {
        assert!(yaml.contains(message), "the CRD lacks the rule: {message}");
    }
    let crd: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("YAML");
    let analysis = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["analysis"]["properties"];
    assert_eq!(analysis["failureLimit"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(analysis["minRequests"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(analysis["failureLimit"]["default"].as_i64(), Some(2));
}
