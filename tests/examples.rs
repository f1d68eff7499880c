//! The YAML in examples/ is what people copy: every document must be a valid object, every
//! ChatRelease must be one the operator accepts, and no field may be misspelt (a misspelt field
//! would be dropped by the API server and silently fall back to a default).

use chatrelease::crd::ChatRelease;
use chatrelease::router::gateway_api;
use chatrelease::settings::Settings;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

/// Every document of a file, as JSON (what kubectl sends), with its position for messages.
fn documents(file: &Path) -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(file).expect("readable example");
    let name = file.file_name().expect("file name").to_string_lossy();
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .filter_map(|(i, doc)| {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name} document {i}: not YAML: {e}"));
            // An empty document (a trailing `---`) is not an object.
            (!yaml.is_null()).then(|| {
                let json = serde_json::to_value(&yaml)
                    .unwrap_or_else(|e| panic!("{name} document {i}: not JSON-like: {e}"));
                (format!("{name} document {i}"), json)
            })
        })
        .collect()
}

/// Deserialises into `T` and checks that serialising it back keeps everything written, which
/// catches misspelt and misplaced fields that plain deserialisation ignores.
fn typed<T: DeserializeOwned + serde::Serialize>(what: &str, json: &Value) -> T {
    let object: T = serde_path_to_error::deserialize(json.clone())
        .unwrap_or_else(|e| panic!("{what}: {}: {}", e.path(), e.inner()));
    let back = serde_json::to_value(&object).expect("serialisable");
    assert_kept(what, "", json, &back);
    object
}

fn assert_kept(what: &str, path: &str, written: &Value, kept: &Value) {
    match (written, kept) {
        (Value::Object(w), Value::Object(k)) => {
            for (key, value) in w {
                let here = format!("{path}.{key}");
                let other = k
                    .get(key)
                    .unwrap_or_else(|| panic!("{what}: {here} is not a field of this kind"));
                assert_kept(what, &here, value, other);
            }
        }
        (Value::Array(w), Value::Array(k)) => {
            assert_eq!(w.len(), k.len(), "{what}: {path} changed length");
            for (i, (a, b)) in w.iter().zip(k).enumerate() {
                assert_kept(what, &format!("{path}[{i}]"), a, b);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            assert_eq!(a.as_f64(), b.as_f64(), "{what}: {path}");
        }
        // A quantity written as a string may come back as a string: compare as written.
        (a, b) => assert_eq!(a, b, "{what}: {path}"),
    }
}

#[test]
fn there_are_examples() {
    let names: Vec<String> = example_files()
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"lobe-chat.yaml".to_string()), "{names:?}");
    assert!(
        names.contains(&"lobe-chat-with-backend.yaml".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"lobe-chat-gateway-api.yaml".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"lobe-chat-with-backend-checks.yaml".to_string()),
        "{names:?}"
    );
}

#[test]
fn every_example_document_is_a_valid_object_and_every_chatrelease_is_accepted() {
    let mut releases = 0;
    for file in example_files() {
        for (what, json) in documents(&file) {
            match (json["apiVersion"].as_str(), json["kind"].as_str()) {
                (Some("chatrelease.io/v1alpha1"), Some("ChatRelease")) => {
                    let release: ChatRelease = typed(&what, &json);
                    assert!(
                        release.metadata.name.is_some() && release.metadata.namespace.is_some(),
                        "{what}: name and namespace are required"
                    );
                    if let Err(e) = Settings::from_spec(&release.spec) {
                        panic!("{what}: the operator refuses it: {e}");
                    }
                    if let Some(gateway) = &release.spec.traffic.gateway_api {
                        let attachment = gateway_api::Attachment::from(gateway);
                        if let Err(e) = gateway_api::check(&release, &attachment) {
                            panic!("{what}: the Gateway API router refuses it: {e}");
                        }
                    }
                    releases += 1;
                }
                (Some("v1"), Some("Namespace")) => {
                    typed::<Namespace>(&what, &json);
                }
                (Some("v1"), Some("Secret")) => {
                    typed::<Secret>(&what, &json);
                }
                (api, kind) => panic!("{what}: unexpected {api:?} {kind:?}; add it to this test"),
            }
        }
    }
    assert!(releases >= 3, "only {releases} ChatReleases in examples/");
}

#[test]
fn the_backend_example_judges_time_to_first_token_with_every_placeholder() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lobe-chat-with-backend.yaml");
    let backend = documents(&file)
        .into_iter()
        .find(|(_, json)| {
            json["kind"] == "ChatRelease" && json["metadata"]["name"] == "chat-backend"
        })
        .expect("a ChatRelease chat-backend");
    let release: ChatRelease = typed(&backend.0, &backend.1);
    let ttft = release
        .spec
        .analysis
        .metrics
        .iter()
        .find(|m| {
            m.query
                .as_deref()
                .is_some_and(|q| q.contains("chat_time_to_first_token_seconds_bucket"))
        })
        .expect("a time-to-first-token check");
    let query = ttft.query.as_deref().unwrap_or_default();
    for placeholder in ["{{namespace}}", "{{workload}}", "{{window}}"] {
        assert!(
            query.contains(placeholder),
            "{placeholder} missing: {query}"
        );
    }
    assert_eq!(ttft.max, Some(1.5));
}

/// The checks example judges the backend on time to first token, tokens per answer (relative to
/// stable) and memory growth, and LobeChat on memory growth, with no PromQL written: the
/// operator renders each query, reading the OpenTelemetry GenAI and cAdvisor series.
#[test]
fn the_checks_example_judges_ttft_tokens_and_memory_without_promql() {
    use chatrelease::crd::BuiltinCheck;
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lobe-chat-with-backend-checks.yaml");
    let releases: Vec<ChatRelease> = documents(&file)
        .into_iter()
        .filter(|(_, json)| json["kind"] == "ChatRelease")
        .map(|(what, json)| typed(&what, &json))
        .collect();
    assert_eq!(releases.len(), 2);
    for release in &releases {
        let name = release.metadata.name.as_deref().unwrap_or_default();
        let metrics = &release.spec.analysis.metrics;
        assert!(
            metrics.iter().all(|m| m.query.is_none()),
            "{name}: no hand-written PromQL"
        );
        let settings = Settings::from_spec(&release.spec).expect("accepted");
        let memory = settings
            .judge
            .custom
            .iter()
            .find(|c| c.name == "memory-growth")
            .unwrap_or_else(|| panic!("{name}: no memory-growth check"));
        assert!(memory.query.contains("container_memory_working_set_bytes"));
        assert_eq!(
            memory.max,
            Some(10.0 * 1024.0 * 1024.0),
            "{name}: 10 MiB/min"
        );
    }
    let backend = releases
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("chat-backend"))
        .expect("chat-backend");
    let by_check = |check: BuiltinCheck| {
        backend
            .spec
            .analysis
            .metrics
            .iter()
            .find(|m| m.check == Some(check))
            .unwrap_or_else(|| panic!("chat-backend has no {check:?} check"))
    };
    assert_eq!(by_check(BuiltinCheck::TtftP99).max, Some(1.5));
    let tokens = by_check(BuiltinCheck::OutputTokensPerRequest);
    assert_eq!(tokens.max_increase.as_deref(), Some("30%"));
    assert_eq!(
        (tokens.max, tokens.min),
        (None, None),
        "a relative bound alone"
    );
    let settings = Settings::from_spec(&backend.spec).expect("accepted");
    let queries: Vec<&str> = settings
        .judge
        .custom
        .iter()
        .map(|c| c.query.as_str())
        .collect();
    assert!(queries[0].contains("gen_ai_server_time_to_first_token_seconds_bucket"));
    assert!(queries[1].contains(r#"gen_ai_client_token_usage_sum{namespace="{{namespace}}",workload="{{workload}}",gen_ai_token_type="output"}"#));
    // The backend's pods are scraped for the GenAI series.
    let annotations = backend
        .spec
        .template
        .spec()
        .metadata
        .and_then(|m| m.annotations)
        .expect("scrape annotations");
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
}
