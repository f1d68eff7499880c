//! kube (rustls with aws-lc-rs) and the Prometheus client (reqwest with rustls) in one process
//! must not panic over which CryptoProvider to use. This test runs in its own process, with no
//! provider installed by hand, exactly as a fresh operator starts.

use std::time::Duration;

#[tokio::test]
async fn a_kube_client_and_a_prometheus_client_start_in_one_process() {
    let config = kube::Config::new("https://127.0.0.1:1".parse().expect("URL"));
    let client = kube::Client::try_from(config).expect("kube client builds");
    // Talking to a closed port fails, but through TLS setup rather than a provider panic.
    let version = tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await;
    assert!(matches!(version, Ok(Err(_))), "expected a connection error");

    let source = chatrelease::prometheus::PrometheusSource::new(Duration::from_millis(500));
    let target = chatrelease::metrics::AnalysisTarget {
        namespace: "chat".into(),
        canary_workload: "lobe-chat-canary".into(),
        stable_workload: "lobe-chat-stable".into(),
        window: Duration::from_secs(60),
        custom: vec![],
        source: chatrelease::crd::RequestSource::Istio,
        error_codes: chatrelease::crd::DEFAULT_ERROR_CODES.into(),
        address: "https://127.0.0.1:1".into(),
        at: jiff::Timestamp::now(),
    };
    use chatrelease::metrics::{MetricsSource, Observations};
    let observed = source.observe(&target).await;
    assert!(
        matches!(observed, Observations::Unavailable { .. }),
        "{observed:?}"
    );
}
