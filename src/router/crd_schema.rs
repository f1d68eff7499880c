//! Test support: our objects walked through the real CRDs' schemas (Istio's and the Gateway
//! API's, from the files `make tools` takes from their Go modules), as the API server's
//! structural validation would. The CEL rules on the way are collected, not run.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;

/// The CRD named `crd_name` from the file the environment variable `env` names (`make
/// unit-test` sets it), taken from `source`.
pub fn crd(env: &str, source: &str, crd_name: &str) -> Value {
    let path = std::env::var(env).unwrap_or_else(|_| {
        panic!(
            "{env} is not set: run `make unit-test`, which fetches the CRDs by version from \
             {source} and names the file, or set {env} to such a file"
        )
    });
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{env}={path}: {e} (`make tools` writes it from {source})"));
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd = Value::deserialize(doc).unwrap();
        if crd["metadata"]["name"] == crd_name {
            return crd;
        }
    }
    panic!("{env}={path} has no {crd_name}");
}

/// The `openAPIV3Schema` of the served version v1 of `crd`.
pub fn v1_schema(crd: &Value) -> Value {
    let versions = crd["spec"]["versions"].as_array().unwrap();
    let v1 = versions.iter().find(|v| v["name"] == "v1").unwrap();
    assert_eq!(
        v1["served"], true,
        "{} v1 is not served",
        crd["metadata"]["name"]
    );
    v1["schema"]["openAPIV3Schema"].clone()
}

/// Top-level keys are Kubernetes', not the CRD schema's; the spec is walked field by field.
pub fn check(object: &Value, schema: &Value, api_version: &str, kind: &str) -> Walk {
    assert_eq!(object["apiVersion"], api_version);
    assert_eq!(object["kind"], kind);
    let top: Vec<_> = object.as_object().unwrap().keys().cloned().collect();
    assert_eq!(top, vec!["apiVersion", "kind", "metadata", "spec"]);
    let mut out = Walk::default();
    walk(
        &object["spec"],
        &schema["properties"]["spec"],
        "spec",
        &mut out,
    );
    out
}

/// What the walk of a value through the schema found.
#[derive(Default)]
pub struct Walk {
    /// Where the value breaks the schema, one line each.
    pub violations: Vec<String>,
    /// The messages of the CEL rules on the nodes the value reached: the API server runs
    /// them, the walk cannot.
    pub cel_rules: BTreeSet<String>,
}

/// A pattern of the CRD as a Rust regex (the CRD's patterns are in the shared subset).
fn pattern_holds(pattern: &str, text: &str) -> bool {
    regex::Regex::new(pattern)
        .unwrap_or_else(|e| panic!("pattern {pattern:?}: {e}"))
        .is_match(text)
}

/// Walks `value` through `schema` as the API server's structural validation would: types,
/// required and unknown fields, enums, patterns, lengths, item counts, bounds and list-map
/// keys.
pub fn walk(value: &Value, schema: &Value, path: &str, out: &mut Walk) {
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for rule in rules {
            out.cel_rules
                .insert(rule["message"].as_str().unwrap_or("?").to_string());
        }
    }
    let declared = schema["type"].as_str();
    let actual = match value {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Null => "null",
    };
    let type_ok = match declared {
        None => true,
        Some("number") => matches!(actual, "number" | "integer"),
        Some(t) => t == actual,
    };
    let mut fail = |what: String| out.violations.push(format!("{path}: {what}"));
    if !type_ok {
        fail(format!("{actual} where the CRD has {declared:?}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        fail(format!("{value} is not one of {allowed:?}"));
    }
    match value {
        Value::String(s) => {
            let length = s.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64()
                && length > max
            {
                fail(format!("{length} characters, more than {max}"));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && length < min
            {
                fail(format!("{length} characters, fewer than {min}"));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && !pattern_holds(pattern, s)
            {
                fail(format!("{s:?} does not match {pattern}"));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or(f64::NAN);
            if schema["maximum"].as_f64().is_some_and(|max| n > max)
                || schema["minimum"].as_f64().is_some_and(|min| n < min)
            {
                fail(format!(
                    "{n} outside {}..={}",
                    schema["minimum"], schema["maximum"]
                ));
            }
        }
        Value::Object(fields) => {
            let required = schema["required"].as_array().into_iter().flatten();
            for required in required.filter_map(Value::as_str) {
                if !fields.contains_key(required) {
                    out.violations
                        .push(format!("{path}.{required}: required and missing"));
                }
            }
            for (key, child) in fields {
                let child_path = format!("{path}.{key}");
                if let Some(s) = schema["properties"].get(key) {
                    walk(child, s, &child_path, out);
                } else if schema["additionalProperties"].is_object() {
                    walk(child, &schema["additionalProperties"], &child_path, out);
                } else if schema["x-kubernetes-preserve-unknown-fields"] != true {
                    out.violations
                        .push(format!("{child_path}: not a field of the CRD"));
                }
            }
        }
        Value::Array(items) => {
            let count = items.len() as u64;
            if let Some(max) = schema["maxItems"].as_u64()
                && count > max
            {
                fail(format!("{count} items, more than {max}"));
            }
            if let Some(min) = schema["minItems"].as_u64()
                && count < min
            {
                fail(format!("{count} items, fewer than {min}"));
            }
            if schema["x-kubernetes-list-type"] == "map" {
                let keys = schema["x-kubernetes-list-map-keys"].as_array().unwrap();
                let key_of = |item: &Value| -> Vec<Value> {
                    keys.iter()
                        .map(|k| item[k.as_str().unwrap()].clone())
                        .collect()
                };
                for (i, item) in items.iter().enumerate() {
                    if items[..i]
                        .iter()
                        .any(|earlier| key_of(earlier) == key_of(item))
                    {
                        fail(format!(
                            "[{i}]: a second item with the key {:?}",
                            key_of(item)
                        ));
                    }
                }
            }
            for (i, item) in items.iter().enumerate() {
                walk(item, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}
