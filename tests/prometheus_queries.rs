//! The analysis queries against a real Prometheus (Debian's, as the local control plane runs it)
//! scraping a real exporter: what the judge reads must be the requests of the window, even when
//! scrapes failed. Starts its own Prometheus on 127.0.0.1; `make e2e` runs it
//! (`cargo test --test prometheus_queries -- --ignored`, with PROMETHEUS_BIN or
//! /usr/bin/prometheus).

use chatrelease::metrics::{AnalysisTarget, MetricsSource, Observations, TrackSample};
use chatrelease::prometheus::PrometheusSource;
use chatrelease::telemetry::{reply, serve_http};
use hyper::StatusCode;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

mod support;

const NAMESPACE: &str = "gap";
/// Seconds after the exporter starts during which /metrics answers 500.
const GAP: std::ops::Range<f64> = 8.0..12.0;
/// When the canary's series appear, seconds after the start.
const CANARY_BORN: f64 = 13.0;
const WINDOW: Duration = Duration::from_secs(10);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// Counters as Istio's sidecars would expose them `t` seconds after the start: stable with a long
/// life behind it (a million requests, five thousand errors), growing 20 requests and 1 error a
/// second; a canary born at CANARY_BORN whose first scrape already shows 3 errors.
fn exposition(t: f64) -> String {
    let series = |workload: &str, code: &str, value: f64| {
        format!(
            "istio_requests_total{{reporter=\"destination\",destination_workload_namespace=\"{NAMESPACE}\",destination_workload=\"{workload}\",response_code=\"{code}\"}} {value}\n"
        )
    };
    let mut text = String::from("# TYPE istio_requests_total counter\n");
    let whole = t.floor();
    text += &series("r-stable", "200", 1_000_000.0 + 19.0 * whole);
    text += &series("r-stable", "503", 5_000.0 + whole);
    if t >= CANARY_BORN {
        let age = (t - CANARY_BORN).floor();
        text += &series("r-canary", "200", 7.0 + 7.0 * age);
        text += &series("r-canary", "503", 3.0 + 3.0 * age);
    }
    text
}

/// What `exposition` counted between two instants, by the clock of the start.
fn truth(from: f64, to: f64) -> (f64, f64, f64, f64) {
    let stable = |t: f64| (20.0 * t.floor(), t.floor());
    let canary = |t: f64| {
        if t < CANARY_BORN {
            (0.0, 0.0)
        } else {
            let age = (t - CANARY_BORN).floor();
            (10.0 + 10.0 * age, 3.0 + 3.0 * age)
        }
    };
    let (s0, se0) = stable(from);
    let (s1, se1) = stable(to);
    let (c0, ce0) = canary(from);
    let (c1, ce1) = canary(to);
    (s1 - s0, se1 - se0, c1 - c0, ce1 - ce0)
}

struct Prometheus {
    child: Child,
    _data: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_prometheus(exporter: &str) -> (Prometheus, String) {
    let bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "/usr/bin/prometheus".into());
    let dir =
        TempDir(std::env::temp_dir().join(format!("chatrelease-prom-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s}}\n\
             scrape_configs:\n- job_name: mesh\n  static_configs:\n  - targets: [\"{exporter}\"]\n"
        ),
    )
    .expect("prometheus.yml");
    let port = support::free_port();
    let child = Command::new(&bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin} (set PROMETHEUS_BIN): {e}"));
    let prometheus = Prometheus { child, _data: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while support::try_http_get(port, "/-/ready").map(|(code, _)| code) != Some(200) {
        assert!(Instant::now() < deadline, "Prometheus not ready within 30s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (prometheus, format!("http://127.0.0.1:{port}"))
}

fn sampled(observations: Observations) -> (TrackSample, TrackSample) {
    match observations {
        Observations::Sampled { canary, stable } => (canary, stable),
        other => panic!("expected samples, got {other:?}"),
    }
}

/// `query` evaluated at `at` (unix seconds) on Prometheus at `address`: the sum of the vector.
async fn evaluate(address: &str, query: &str, at: i64) -> f64 {
    let client = prometheus_http_query::Client::try_from(address).expect("client");
    let data = client
        .query(query)
        .at(at)
        .get()
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    data.data()
        .as_vector()
        .expect("a vector")
        .iter()
        .map(|s| s.sample().value())
        .sum()
}

#[tokio::test]
#[ignore = "starts a real Prometheus: make e2e"]
async fn a_scrape_gap_does_not_add_a_tracks_lifetime_to_the_window() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let exporter = listener.local_addr().expect("address").to_string();
    let started = Arc::new(unix_now());
    let since = started.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_http(
        listener,
        move |_, uri: &hyper::Uri| {
            let t = unix_now() - *since;
            if uri.path() != "/metrics" {
                reply(StatusCode::NOT_FOUND, "text/plain", String::new())
            } else if GAP.contains(&t) {
                // The scrape fails: Prometheus writes stale markers for every series.
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "down".into(),
                )
            } else {
                reply(StatusCode::OK, "text/plain; version=0.0.4", exposition(t))
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    let (_prometheus, address) = start_prometheus(&exporter).await;

    // The window [at - 10s, at] starts inside the gap: `S offset 10s` finds only stale markers.
    let at = (*started + GAP.start + 2.0).ceil() as i64 + WINDOW.as_secs() as i64;
    let wait = (at as f64 + 1.5) - unix_now();
    tokio::time::sleep(Duration::from_secs_f64(wait.max(0.0))).await;

    let target = AnalysisTarget {
        namespace: NAMESPACE.into(),
        canary_workload: "r-canary".into(),
        stable_workload: "r-stable".into(),
        window: WINDOW,
        custom: vec![],
        source: chatrelease::crd::RequestSource::Istio,
        error_codes: chatrelease::crd::DEFAULT_ERROR_CODES.into(),
        address: address.clone(),
        at: jiff::Timestamp::from_second(at).expect("a time"),
    };

    // The setup really produces the fault: the plain `offset` test of birth counts the whole
    // million stable requests had before.
    let series = format!(
        "istio_requests_total{{destination_workload_namespace=\"{NAMESPACE}\",destination_workload=\"r-stable\"}}"
    );
    let naive = format!("({series} unless {series} offset 10s)");
    let poisoned = evaluate(&address, &naive, at).await;
    assert!(
        poisoned > 1_000_000.0,
        "the gap did not leave stale markers at the window's start ({poisoned})"
    );

    let (canary, stable) = sampled(PrometheusSource::default().observe(&target).await);
    let from = at as f64 - *started - WINDOW.as_secs_f64();
    let (stable_requests, stable_errors, canary_requests, canary_errors) =
        truth(from, at as f64 - *started);
    let stable_seen = stable.requests.expect("stable requests");
    eprintln!(
        "window [{from:.1}s, {:.1}s] after the start, gap {GAP:?}: stable {stable_seen} requests \
         (true {stable_requests}), {:?} errors (true {stable_errors}); canary {:?} requests \
         (true {canary_requests}), {:?} errors (true {canary_errors}); the naive form read {poisoned}",
        from + WINDOW.as_secs_f64(),
        stable.errors,
        canary.requests,
        canary.errors,
    );
    // increase() sees only the samples after the gap, so stable reads a little under the truth;
    // never its lifetime.
    assert!(
        (0.5 * stable_requests..=1.2 * stable_requests).contains(&stable_seen),
        "stable requests {stable_seen}, true {stable_requests}"
    );
    let stable_errors_seen = stable.errors.unwrap_or(0.0);
    assert!(
        stable_errors_seen <= 1.2 * stable_errors + 1.0,
        "stable errors {stable_errors_seen}, true {stable_errors}"
    );
    // The canary was born inside the window: counted from zero, whole.
    // (Up to one scrape interval behind: 10 requests and 3 errors a second.)
    let canary_seen = canary.requests.expect("canary requests");
    assert!(
        (canary_seen - canary_requests).abs() <= 15.0,
        "canary requests {canary_seen}, true {canary_requests}"
    );
    let canary_errors_seen = canary.errors.expect("canary errors");
    assert!(
        (canary_errors_seen - canary_errors).abs() <= 5.0,
        "canary errors {canary_errors_seen}, true {canary_errors}"
    );

    // A window that starts before Prometheus has any data (a new Prometheus, or one that lost its
    // data on restart): no series can be told to be new, so none counts its lifetime.
    let early = AnalysisTarget {
        at: jiff::Timestamp::from_second((*started + 6.0).ceil() as i64).expect("a time"),
        ..target
    };
    let (_, stable) = sampled(PrometheusSource::default().observe(&early).await);
    let early_seen = stable.requests.unwrap_or(0.0);
    eprintln!("a window before Prometheus's first sample: stable {early_seen} requests");
    assert!(
        early_seen < 1000.0,
        "stable's lifetime counted in a window Prometheus has no history for: {early_seen}"
    );
    let _ = stop.send(());
}
