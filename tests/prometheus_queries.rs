//! The analysis queries against a real Prometheus (Debian's, as the local control plane runs it)
//! scraping a real exporter: what the judge reads must be the requests of the window, even when
//! scrapes failed, from the series of the ChatRelease's `analysis.source` alone. Starts its own Prometheus on 127.0.0.1; `make e2e` runs it
//! (`cargo test --test prometheus_queries -- --ignored`, with PROMETHEUS_BIN or
//! /usr/bin/prometheus).

use chatrelease::crd::{DEFAULT_ERROR_CODES, RequestSource};
use chatrelease::metrics::{AnalysisTarget, MetricsSource, Observations, TrackSample, WatchLook};
use chatrelease::prometheus::PrometheusSource;
use chatrelease::telemetry::{reply, serve_http};
use hyper::StatusCode;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    // The tests of this binary run side by side in one process: each Prometheus its own data.
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let dir = TempDir(std::env::temp_dir().join(format!(
        "chatrelease-prom-{}-{}",
        std::process::id(),
        STARTED.fetch_add(1, Ordering::Relaxed)
    )));
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
        source: RequestSource::Istio,
        error_codes: DEFAULT_ERROR_CODES.into(),
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

/// Series of every source at once, `t` seconds after the exporter started: sidecar-reported Istio
/// series a hundred times busier than the truth (a source reading them would be caught), and the
/// truth twice, as a waypoint and as the app's OpenTelemetry histogram. Per second the canary
/// serves 7 requests answered 200, 2 answered 503 and 1 answered 471, all within 100-250 ms;
/// stable serves 20 answered 200 within 100-500 ms.
fn every_source(t: f64) -> String {
    let n = t.floor();
    let mut text = String::new();
    let istio = |reporter: &str, workload: &str, code: &str, count: f64, le: &str| {
        let labels = format!(
            "reporter=\"{reporter}\",destination_workload_namespace=\"{SOURCES_NAMESPACE}\",destination_workload=\"{workload}\",response_code=\"{code}\""
        );
        let mut lines = format!("istio_requests_total{{{labels}}} {count}\n");
        for (bound, value) in [("100", 0.0), (le, count), ("+Inf", count)] {
            if bound != "+Inf" || le != "+Inf" {
                lines += &format!(
                    "istio_request_duration_milliseconds_bucket{{{labels},le=\"{bound}\"}} {value}\n"
                );
            }
        }
        lines
    };
    let otel = |workload: &str, code: &str, count: f64, le: &str| {
        let labels = format!(
            "namespace=\"{SOURCES_NAMESPACE}\",workload=\"{workload}\",http_response_status_code=\"{code}\""
        );
        let mut lines = format!("http_server_request_duration_seconds_count{{{labels}}} {count}\n");
        for (bound, value) in [("0.1", 0.0), (le, count), ("+Inf", count)] {
            lines += &format!(
                "http_server_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {value}\n"
            );
        }
        lines
    };
    for (workload, code, per_second, istio_le, otel_le) in [
        ("s-canary", "200", 7.0, "250", "0.25"),
        ("s-canary", "503", 2.0, "250", "0.25"),
        ("s-canary", "471", 1.0, "250", "0.25"),
        ("s-stable", "200", 20.0, "500", "0.5"),
    ] {
        text += &istio(
            "destination",
            workload,
            code,
            100.0 * per_second * n,
            istio_le,
        );
        text += &istio("waypoint", workload, code, per_second * n, istio_le);
        text += &otel(workload, code, per_second * n, otel_le);
    }
    text
}

const SOURCES_NAMESPACE: &str = "sources";

/// A real Prometheus scraping an exporter of `exposition(seconds since the start)` every second,
/// and `at`, an instant two windows after the start that has been scraped. Dropping it stops both.
struct Scraped {
    address: String,
    at: i64,
    _prometheus: Prometheus,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn scraping(exposition: fn(f64) -> String) -> Scraped {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let exporter = listener.local_addr().expect("address").to_string();
    let started = unix_now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_http(
        listener,
        move |_, uri: &hyper::Uri| {
            if uri.path() == "/metrics" {
                let body = exposition(unix_now() - started);
                reply(StatusCode::OK, "text/plain; version=0.0.4", body)
            } else {
                reply(StatusCode::NOT_FOUND, "text/plain", String::new())
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    let (prometheus, address) = start_prometheus(&exporter).await;
    let at = (unix_now() + 3.0 + 2.0 * WINDOW.as_secs_f64()).ceil() as i64;
    tokio::time::sleep(Duration::from_secs_f64(
        (at as f64 + 1.5 - unix_now()).max(0.0),
    ))
    .await;
    Scraped {
        address,
        at,
        _prometheus: prometheus,
        _stop: stop,
    }
}

#[tokio::test]
#[ignore = "starts a real Prometheus: make e2e"]
async fn waypoint_and_otel_sources_read_their_own_series_and_the_same_numbers() {
    // Every series has history before the window: the increase() branch speaks.
    let Scraped {
        address,
        at,
        _prometheus,
        _stop,
    } = scraping(every_source).await;

    let window = WINDOW.as_secs_f64();
    for source in [RequestSource::IstioWaypoint, RequestSource::Otel] {
        let target = AnalysisTarget {
            namespace: SOURCES_NAMESPACE.into(),
            canary_workload: "s-canary".into(),
            stable_workload: "s-stable".into(),
            window: WINDOW,
            custom: vec![],
            source,
            error_codes: DEFAULT_ERROR_CODES.into(),
            address: address.clone(),
            at: jiff::Timestamp::from_second(at).expect("a time"),
        };
        let (canary, stable) = sampled(PrometheusSource::default().observe(&target).await);
        eprintln!("{source:?}: canary {canary:?}, stable {stable:?}");
        // The sequential watch's bulk look, over every track of the namespace, reads the same
        // numbers as the canary's own analysis.
        let look = WatchLook {
            address: address.clone(),
            source,
            error_codes: DEFAULT_ERROR_CODES.into(),
            namespaces: vec![SOURCES_NAMESPACE.into()],
            window: WINDOW,
            at: target.at,
        };
        let tally = PrometheusSource::default()
            .tally(&look)
            .await
            .expect("Prometheus asks in bulk")
            .expect("the bulk look answers");
        let of = |workload: &str| tally[&(SOURCES_NAMESPACE.to_string(), workload.to_string())];
        assert_eq!(
            of("s-canary").requests,
            canary.requests.expect("canary requests")
        );
        assert_eq!(of("s-canary").errors, canary.errors.expect("canary errors"));
        assert_eq!(
            of("s-stable").requests,
            stable.requests.expect("stable requests")
        );
        assert_eq!(
            of("s-stable").errors,
            0.0,
            "{source:?}: stable has no errors"
        );
        assert_eq!(tally.len(), 2, "{source:?}: {tally:?}");
        // increase() extrapolates to the window's edges and may miss up to a scrape at either
        // end; never the sidecar's hundredfold series.
        let canary_requests = canary.requests.expect("canary requests");
        assert!(
            (0.7 * 10.0 * window..=1.3 * 10.0 * window).contains(&canary_requests),
            "{source:?}: canary requests {canary_requests}, true {}",
            10.0 * window
        );
        let stable_requests = stable.requests.expect("stable requests");
        assert!(
            (0.7 * 20.0 * window..=1.3 * 20.0 * window).contains(&stable_requests),
            "{source:?}: stable requests {stable_requests}, true {}",
            20.0 * window
        );
        // 503 and 471 match 5..|47.; the error share is the truth's 30%.
        let share = canary.errors.expect("canary errors") / canary_requests;
        assert!(
            (0.25..=0.35).contains(&share),
            "{source:?}: error share {share}"
        );
        assert_eq!(stable.errors, None, "{source:?}: stable has no errors");
        // P99 interpolated in the bucket that holds every request, in milliseconds either way.
        let p99 = |sample: &TrackSample| sample.latency_p99_ms.expect("a P99");
        assert!(
            (p99(&canary) - 248.5).abs() < 0.01,
            "{source:?}: {canary:?}"
        );
        assert!(
            (p99(&stable) - 496.0).abs() < 0.01,
            "{source:?}: {stable:?}"
        );
    }
}

const CHECKS_NAMESPACE: &str = "checks";
/// Pod names as a Deployment's ReplicaSet makes them.
const CANARY_POD: &str = "q-canary-5d8f9c7b6-x2k9p";
const CANARY_STEADY_POD: &str = "q-canary-5d8f9c7b6-b7m4d";
const STABLE_POD: &str = "q-stable-7c9d8e6f5-h3j8k";
/// Another Deployment whose name begins with the canary's: its pods are not the canary's.
const OTHER_POD: &str = "q-canary-worker-6b5c4d3e2-z9x8w";
const MIB: f64 = 1024.0 * 1024.0;

/// The series the built-in checks read, as the mesh simulator exports them (same names and
/// labels; `tests/meshsim/metrics.rs` checks its own lines), `t` seconds after the start. Per
/// second the canary answers 10 requests, first tokens within 1-1.5 s, 0.05-0.1 s per later
/// token, 450 output tokens each, 0.25 CPU seconds each; one of its pods leaks 10 MiB a minute.
/// Stable answers 20, first tokens within 0.25-0.5 s, 0.01-0.02 s per token, 300 tokens, 0.05 CPU
/// seconds, memory flat. Beside them: the waypoint-reported requests a hundred times busier than
/// the sidecars' and the app's (a CPU per request reading the wrong source is caught), another Deployment's pod leaking a GiB a
/// minute and the pods' own cgroups (container="") growing as fast; no check may read those.
fn builtin_series(t: f64) -> String {
    let mut text = String::new();
    let histogram = |name: &str, labels: &str, count: f64, low: &str, high: &str| {
        let mut lines = String::new();
        for (le, value) in [(low, 0.0), (high, count), ("+Inf", count)] {
            lines += &format!("{name}_bucket{{{labels},le=\"{le}\"}} {value}\n");
        }
        lines + &format!("{name}_count{{{labels}}} {count}\n")
    };
    for (workload, rps, ttft, tpot, tokens) in [
        ("q-canary", 10.0, ("1", "1.5"), ("0.05", "0.1"), 450.0),
        ("q-stable", 20.0, ("0.25", "0.5"), ("0.01", "0.02"), 300.0),
    ] {
        let n = rps * t;
        let app = format!("namespace=\"{CHECKS_NAMESPACE}\",workload=\"{workload}\"");
        let vllm = format!("{app},model_name=\"sim-model\"");
        text += &histogram(
            "gen_ai_server_time_to_first_token_seconds",
            &app,
            n,
            ttft.0,
            ttft.1,
        );
        text += &histogram("vllm:time_to_first_token_seconds", &vllm, n, ttft.0, ttft.1);
        text += &histogram(
            "gen_ai_server_time_per_output_token_seconds",
            &app,
            n,
            tpot.0,
            tpot.1,
        );
        text += &histogram("vllm:inter_token_latency_seconds", &vllm, n, tpot.0, tpot.1);
        let usage = format!("{app},gen_ai_token_type=\"output\"");
        text += &format!("gen_ai_client_token_usage_sum{{{usage}}} {}\n", tokens * n);
        text += &format!("gen_ai_client_token_usage_count{{{usage}}} {n}\n");
        text += &format!("vllm:generation_tokens_total{{{vllm}}} {}\n", tokens * n);
        text += &format!("vllm:request_success_total{{{vllm}}} {n}\n");
        for (reporter, scale) in [("destination", 1.0), ("waypoint", 100.0)] {
            text += &format!(
                "istio_requests_total{{reporter=\"{reporter}\",destination_workload_namespace=\"{CHECKS_NAMESPACE}\",destination_workload=\"{workload}\",response_code=\"200\"}} {}\n",
                scale * n
            );
        }
        text += &format!(
            "http_server_request_duration_seconds_count{{{app},http_response_status_code=\"200\"}} {n}\n"
        );
    }
    let container = |pod: &str, container: &str| {
        format!("namespace=\"{CHECKS_NAMESPACE}\",pod=\"{pod}\",container=\"{container}\"")
    };
    let minutes = t / 60.0;
    for (pod, per_minute, cpu) in [
        (CANARY_POD, 10.0 * MIB, 0.25 * 5.0 * t),
        (CANARY_STEADY_POD, 0.0, 0.25 * 5.0 * t),
        (STABLE_POD, 0.0, 0.05 * 20.0 * t),
        (OTHER_POD, 1024.0 * MIB, 100.0 * t),
    ] {
        let memory = 200.0 * MIB + per_minute * minutes;
        text += &format!(
            "container_memory_working_set_bytes{{{}}} {memory}\n",
            container(pod, "app")
        );
        text += &format!(
            "container_cpu_usage_seconds_total{{{}}} {cpu}\n",
            container(pod, "app")
        );
        // The pod's own cgroup: its containers summed, and a leak as steep as the other pod's.
        text += &format!(
            "container_memory_working_set_bytes{{{}}} {}\n",
            container(pod, ""),
            memory + 1024.0 * MIB * minutes
        );
    }
    text
}

#[tokio::test]
#[ignore = "starts a real Prometheus: make e2e"]
async fn every_built_in_check_reads_its_tracks_value_from_the_simulators_series() {
    use chatrelease::crd::{BuiltinCheck, ChatReleaseSpec};
    use chatrelease::settings::Settings;

    // Every series has history before the window: the increase() branch speaks.
    let Scraped {
        address,
        at,
        _prometheus,
        _stop,
    } = scraping(builtin_series).await;

    // What each check must read, canary and stable, with both flavors and every source where
    // they matter: each spec names every check once with no PromQL of its own.
    let interpolated = |low: f64, high: f64, q: f64| low + q * (high - low);
    let llm = [
        (
            "ttft-p99",
            interpolated(1.0, 1.5, 0.99),
            interpolated(0.25, 0.5, 0.99),
        ),
        (
            "ttft-p95",
            interpolated(1.0, 1.5, 0.95),
            interpolated(0.25, 0.5, 0.95),
        ),
        (
            "time-per-output-token-p99",
            interpolated(0.05, 0.1, 0.99),
            interpolated(0.01, 0.02, 0.99),
        ),
        ("output-tokens-per-request", 450.0, 300.0),
    ];
    let pods = [
        ("memory-growth", 10.0 * MIB, 0.0),
        ("cpu-per-request", 0.25, 0.05),
    ];
    let mut runs = 0;
    for (flavor, source) in [
        ("otel", RequestSource::Istio),
        ("vllm", RequestSource::Otel),
        ("otel", RequestSource::IstioWaypoint),
    ] {
        let metrics: Vec<serde_json::Value> = BuiltinCheck::ALL
            .iter()
            .map(|c| serde_json::json!({"check": c.as_str(), "flavor": flavor, "maxIncrease": "20%"}))
            .collect();
        let spec: ChatReleaseSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app", "image": "chat:v1"}]}},
            "analysis": {"source": source.as_str(), "metrics": metrics}
        }))
        .expect("spec");
        let settings = Settings::from_spec(&spec).expect("valid settings");
        let target = AnalysisTarget {
            namespace: CHECKS_NAMESPACE.into(),
            canary_workload: "q-canary".into(),
            stable_workload: "q-stable".into(),
            window: WINDOW,
            custom: settings.judge.custom.clone(),
            source,
            error_codes: DEFAULT_ERROR_CODES.into(),
            address: address.clone(),
            at: jiff::Timestamp::from_second(at).expect("a time"),
        };
        let (canary, stable) = sampled(PrometheusSource::default().observe(&target).await);
        // The waypoint's requests are a hundred times the sidecars' and the app's here: CPU per
        // request is divided by the requests of the ChatRelease's own source.
        let per_request = if source == RequestSource::IstioWaypoint {
            100.0
        } else {
            1.0
        };
        let pods = pods.map(|(name, canary, stable)| match name {
            "cpu-per-request" => (name, canary / per_request, stable / per_request),
            _ => (name, canary, stable),
        });
        for (name, want_canary, want_stable) in llm.iter().chain(pods.iter()) {
            let got = |track: &TrackSample| track.custom.get(*name).copied().flatten();
            for (track, got, want) in [
                ("canary", got(&canary), *want_canary),
                ("stable", got(&stable), *want_stable),
            ] {
                let got =
                    got.unwrap_or_else(|| panic!("{flavor}/{source:?} {name} {track}: no value"));
                eprintln!("{flavor}/{source:?} {name} {track}: {got} (want {want})");
                assert!(
                    (got - want).abs() <= 0.01 * want.abs() + 1e-9,
                    "{flavor}/{source:?} {name} {track}: {got}, want {want}"
                );
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 3 * 2 * BuiltinCheck::ALL.len());
}
