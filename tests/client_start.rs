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

/// A burst of requests opens no more connections to the API server than the operator's limit:
/// kube's client speaks HTTP/1.1 and would otherwise open one per request in flight.
#[tokio::test]
async fn a_burst_of_requests_opens_at_most_api_concurrency_connections() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counting = accepted.clone();
    // An API server that takes every connection and never answers: each request holds its own.
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counting.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let client = chatrelease::controller::api_client(kube::Config::new(url.parse().expect("URL")))
        .expect("client builds");
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(3), client.apiserver_version()).await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        chatrelease::controller::API_CONCURRENCY,
        "connections opened by 100 requests in flight"
    );
    for request in requests {
        request.abort();
    }
    server.abort();
}
