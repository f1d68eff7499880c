//! `kubectl chatrelease` as a person runs it: the built binary, its output and its exit status.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn plugin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubectl-chatrelease"));
    // No test may reach a real cluster through the developer's kubeconfig.
    command
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    command
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("the plugin runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn healthy_promote() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/healthy-promote.json")
}

/// The healthy scenario with one change, written where only this test looks.
fn altered_scenario(file: &str, change: impl FnOnce(&mut Value)) -> PathBuf {
    let text = std::fs::read_to_string(healthy_promote()).expect("the repository's scenario");
    let mut scenario: Value = serde_json::from_str(&text).expect("scenario is JSON");
    change(&mut scenario);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    std::fs::write(&path, scenario.to_string()).expect("temp scenario written");
    path
}

#[test]
fn simulate_prints_one_json_line_per_tick_and_exits_0() {
    let (output, stdout, stderr) = run(plugin().arg("simulate").arg(healthy_promote()));
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["tick"], i, "{line}");
        for key in ["action", "phase", "reason"] {
            assert!(line[key].is_string(), "{key} in {line}");
        }
        assert!(line["weight"].is_i64(), "{line}");
    }
    let actions: Vec<&str> = lines.iter().filter_map(|l| l["action"].as_str()).collect();
    assert_eq!(actions, ["advance", "advance", "advance", "promote"]);
    assert_eq!(lines[0]["weight"], 25);
}

#[test]
fn simulate_refuses_steps_out_of_order_naming_the_field() {
    let path = altered_scenario("steps-out-of-order.json", |s| {
        s["release"]["spec"]["strategy"]["steps"] = serde_json::json!([50, 25, 100]);
    });
    let (output, stdout, stderr) = run(plugin().arg("simulate").arg(&path));
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with("error: release.spec.strategy.steps: "),
        "{stderr}"
    );
}

#[test]
fn simulate_refuses_a_string_where_a_number_belongs_naming_the_field() {
    let path = altered_scenario("string-for-number.json", |s| {
        s["ticks"][1]["canary"]["requests"] = Value::from("lots");
    });
    let (output, _, stderr) = run(plugin().arg("simulate").arg(&path));
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: ticks[1].canary.requests: "),
        "{stderr}"
    );
}

#[test]
fn simulate_of_a_missing_file_exits_2() {
    let (output, _, stderr) = run(plugin().args(["simulate", "/nonexistent/scenario.json"]));
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: /nonexistent/scenario.json: "),
        "{stderr}"
    );
}

#[test]
fn simulate_ignores_a_broken_kubeconfig() {
    let kubeconfig = Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken-kubeconfig");
    std::fs::write(&kubeconfig, "this: [is not a kubeconfig").expect("temp file");
    let (output, _, stderr) = run(plugin()
        .env("KUBECONFIG", &kubeconfig)
        .arg("simulate")
        .arg(healthy_promote()));
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn a_cluster_command_that_cannot_connect_fails_with_a_message_not_a_panic() {
    // TLS to a port nothing listens on: the client must be built (crypto provider installed)
    // and the failure reported as an error.
    let kubeconfig = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unreachable-kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}
users:
- name: someone
  user: {token: not-a-real-token}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: someone, namespace: chat}
current-context: nowhere
",
    )
    .expect("temp kubeconfig");
    let (output, _, stderr) = run(plugin()
        .env("KUBECONFIG", &kubeconfig)
        .args(["rollback", "lobe-chat"]));
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: patch ChatRelease chat/lobe-chat: "),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_cluster_command_without_a_kubeconfig_says_so() {
    let (output, _, stderr) = run(plugin().args(["status", "lobe-chat"]));
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: cannot load a kubeconfig"),
        "{stderr}"
    );
}
