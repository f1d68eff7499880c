//! The simulator's HTTP server: `GET /metrics` for Prometheus, `GET /healthz`, and
//! `POST /fail-scrapes?seconds=N`, which makes `/metrics` answer 503 for N seconds as a sidecar
//! that stops answering would, while traffic and counters go on.

use crate::metrics::MeshMetrics;
use chatrelease::telemetry::{TEXT, metrics_reply, reply, serve_http};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode, Uri};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The path that starts a scrape gap.
pub const FAIL_SCRAPES_PATH: &str = "/fail-scrapes";
/// The longest scrape gap one request can ask for, in seconds.
pub const MAX_SCRAPE_GAP_SECONDS: f64 = 600.0;

/// When the scrape gap asked for last ends; `/metrics` answers 503 until then.
#[derive(Debug, Default)]
pub struct ScrapeGap {
    until: Mutex<Option<Instant>>,
}

impl ScrapeGap {
    /// Scrapes fail from `now` for `length`. The latest request wins, longer or shorter.
    pub fn start(&self, now: Instant, length: Duration) {
        *self.until.lock().unwrap_or_else(PoisonError::into_inner) = Some(now + length);
    }

    /// How much longer scrapes fail, if they do at `now`.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let until = *self.until.lock().unwrap_or_else(PoisonError::into_inner);
        until.filter(|until| *until > now).map(|until| until - now)
    }
}

/// The gap length of a `/fail-scrapes` query: `seconds=N`, 0 < N <= 600 (fractions allowed).
fn gap_length(query: Option<&str>) -> Result<Duration, String> {
    let value = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("seconds="));
    let Some(text) = value else {
        return Err(format!(
            "missing seconds: use POST {FAIL_SCRAPES_PATH}?seconds=N, N greater than 0 and at \
             most {MAX_SCRAPE_GAP_SECONDS}"
        ));
    };
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= MAX_SCRAPE_GAP_SECONDS => {
            Ok(Duration::from_secs_f64(seconds))
        }
        _ => Err(format!(
            "invalid seconds={text:?}: must be a number greater than 0 and at most \
             {MAX_SCRAPE_GAP_SECONDS}"
        )),
    }
}

/// Answers one request to the simulator's server at `now`.
fn route(
    method: &Method,
    uri: &Uri,
    metrics: &MeshMetrics,
    gap: &ScrapeGap,
    now: Instant,
) -> Response<Full<Bytes>> {
    let path = uri.path();
    if path == FAIL_SCRAPES_PATH {
        if method != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only POST\n".into());
        }
        return match gap_length(uri.query()) {
            Ok(length) => {
                gap.start(now, length);
                let seconds = length.as_secs_f64();
                tracing::info!(seconds, "/metrics answers 503 on request");
                reply(
                    StatusCode::OK,
                    TEXT,
                    format!("/metrics answers 503 for the next {seconds} s\n"),
                )
            }
            Err(reason) => reply(StatusCode::BAD_REQUEST, TEXT, format!("{reason}\n")),
        };
    }
    if method != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n".into());
    }
    match path {
        "/metrics" => match gap.remaining(now) {
            Some(left) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!(
                    "scrapes fail on request ({FAIL_SCRAPES_PATH}) for {:.1} s more\n",
                    left.as_secs_f64()
                ),
            ),
            None => metrics_reply(metrics.encode()),
        },
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("not found: try /metrics, /healthz or POST {FAIL_SCRAPES_PATH}?seconds=N\n"),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/fail-scrapes` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<MeshMetrics>,
    shutdown: impl Future<Output = ()>,
) {
    let gap = ScrapeGap::default();
    let handler =
        move |method: &Method, uri: &Uri| route(method, uri, &metrics, &gap, Instant::now());
    serve_http(listener, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{healthy_pods, plain_release, pod, rng, routes, state};
    use crate::pods::ENV_PROVIDER_ERROR_RATE;
    use crate::run::{drive_traffic, stopped};
    use crate::traffic::{Simulator, TrafficConfig};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn status_of(response: &Response<Full<Bytes>>) -> u16 {
        response.status().as_u16()
    }

    #[test]
    fn a_scrape_gap_fails_metrics_for_its_length_only() {
        let metrics = MeshMetrics::new();
        let gap = ScrapeGap::default();
        let start = Instant::now();
        let at = |seconds: f64| start + Duration::from_secs_f64(seconds);
        let get =
            |path: &str, now| route(&Method::GET, &path.parse().unwrap(), &metrics, &gap, now);
        let post =
            |path: &str, now| route(&Method::POST, &path.parse().unwrap(), &metrics, &gap, now);
        assert_eq!(status_of(&get("/metrics", at(0.0))), 200);
        assert_eq!(status_of(&post("/fail-scrapes?seconds=4", at(0.0))), 200);
        assert_eq!(status_of(&get("/metrics", at(0.0))), 503);
        assert_eq!(status_of(&get("/metrics", at(3.9))), 503);
        assert_eq!(status_of(&get("/healthz", at(1.0))), 200);
        assert_eq!(status_of(&get("/metrics", at(4.0))), 200);
        // The latest request wins, even a shorter one.
        assert_eq!(
            status_of(&post("/fail-scrapes?x=1&seconds=0.5", at(5.0))),
            200
        );
        assert_eq!(status_of(&get("/metrics", at(5.4))), 503);
        assert_eq!(status_of(&get("/metrics", at(5.5))), 200);
        assert_eq!(status_of(&post("/fail-scrapes?seconds=600", at(6.0))), 200);
        assert_eq!(status_of(&get("/metrics", at(605.0))), 503);
    }

    #[test]
    fn fail_scrapes_needs_post_and_seconds_above_0_up_to_600() {
        let metrics = MeshMetrics::new();
        let gap = ScrapeGap::default();
        let now = Instant::now();
        for query in [
            "",
            "?seconds=0",
            "?seconds=-1",
            "?seconds=600.5",
            "?seconds=NaN",
            "?seconds=inf",
            "?seconds=",
            "?secs=5",
        ] {
            let response = route(
                &Method::POST,
                &format!("/fail-scrapes{query}").parse().unwrap(),
                &metrics,
                &gap,
                now,
            );
            assert_eq!(status_of(&response), 400, "{query}");
        }
        assert_eq!(gap.remaining(now), None);
        let get = route(
            &Method::GET,
            &"/fail-scrapes?seconds=5".parse().unwrap(),
            &metrics,
            &gap,
            now,
        );
        assert_eq!(status_of(&get), 405);
        let post = route(
            &Method::POST,
            &"/metrics".parse().unwrap(),
            &metrics,
            &gap,
            now,
        );
        assert_eq!(status_of(&post), 405);
        assert_eq!(gap.remaining(now), None);
    }

    async fn http_request(address: SocketAddr, method: &str, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: meshsim\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    async fn http_get(address: SocketAddr, path: &str) -> String {
        http_request(address, "GET", path).await
    }

    /// The sum of every `istio_requests_total` series in a scrape, as the destination proxies
    /// count them (the waypoint's copies count the same requests again).
    fn total_requests(body: &str) -> f64 {
        body.lines()
            .filter(|l| l.starts_with("istio_requests_total{reporter=\"destination\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[tokio::test]
    async fn metrics_of_simulated_traffic_are_scraped_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(MeshMetrics::new());
        let mut pods = healthy_pods();
        pods.push(pod(
            "lobe-chat-canary-5d8f9c7b6-e",
            "canary",
            true,
            &[(ENV_PROVIDER_ERROR_RATE, "1")],
        ));
        let mesh = state(&plain_release(), &routes(50, true), &pods);
        let config = TrafficConfig {
            rps: 200.0,
            tick: Duration::from_millis(50),
            ..TrafficConfig::default()
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut rng = rng();
        let scrape = async {
            let health = http_get(address, "/healthz").await;
            assert!(health.starts_with("HTTP/1.1 200"), "{health}");
            let missing = http_get(address, "/nothing").await;
            assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
            let wanted = [
                r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-canary",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="200"}"#,
                r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-stable",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="200"}"#,
                r#"chat_time_to_first_token_seconds_count{namespace="chat",workload="lobe-chat-stable"}"#,
            ];
            let provider_error = r#"destination_workload="lobe-chat-canary",destination_workload_namespace="chat",destination_service="lobe-chat.chat.svc.cluster.local",response_code="47"#;
            let started = Instant::now();
            let body = loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let response = http_get(address, "/metrics").await;
                assert!(response.starts_with("HTTP/1.1 200"), "{response}");
                assert!(
                    response.contains("content-type: application/openmetrics-text"),
                    "{response}"
                );
                let done = started.elapsed() > Duration::from_secs(1)
                    && wanted.iter().all(|w| response.contains(w))
                    && response.contains(provider_error);
                if done || started.elapsed() > Duration::from_secs(10) {
                    break response;
                }
            };
            let _ = stop.send(true);
            body
        };
        let (body, (), ()) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                scrape,
                serve_metrics(listener, metrics.clone(), stopped(stop_rx.clone())),
                drive_traffic(
                    || mesh.clone(),
                    metrics.clone(),
                    Simulator::new(config),
                    &mut rng,
                    stopped(stop_rx),
                ),
            )
        })
        .await
        .expect("the simulator did not stop within 20 s");
        for w in [
            r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-canary""#,
            r#"istio_requests_total{reporter="destination",destination_workload="lobe-chat-stable""#,
            "chat_time_to_first_token_seconds_count",
            "response_code=\"47",
        ] {
            assert!(body.contains(w), "no {w} in\n{body}");
        }
        // ~1 s at 200 rps: a few hundred requests, counted once each.
        let total: f64 = body
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{reporter=\"destination\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(total >= 150.0, "only {total} requests in\n{body}");
    }

    #[tokio::test]
    async fn a_scrape_gap_asked_over_http_fails_metrics_while_traffic_goes_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(MeshMetrics::new());
        let mesh = state(&plain_release(), &routes(50, true), &healthy_pods());
        let config = TrafficConfig {
            rps: 200.0,
            tick: Duration::from_millis(50),
            ..TrafficConfig::default()
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut rng = rng();
        let client = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = http_get(address, "/metrics").await;
            assert!(before.starts_with("HTTP/1.1 200"), "{before}");
            let refused = http_request(address, "POST", "/fail-scrapes?seconds=601").await;
            assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
            assert!(refused.contains("invalid seconds=\"601\""), "{refused}");
            let not_post = http_get(address, "/fail-scrapes?seconds=5").await;
            assert!(not_post.starts_with("HTTP/1.1 405"), "{not_post}");
            assert!(
                http_get(address, "/metrics")
                    .await
                    .starts_with("HTTP/1.1 200")
            );

            let started = http_request(address, "POST", "/fail-scrapes?seconds=600").await;
            assert!(started.starts_with("HTTP/1.1 200"), "{started}");
            for _ in 0..3 {
                let failed = http_get(address, "/metrics").await;
                assert!(failed.starts_with("HTTP/1.1 503"), "{failed}");
                assert!(!failed.contains("istio_requests_total"), "{failed}");
                let health = http_get(address, "/healthz").await;
                assert!(health.starts_with("HTTP/1.1 200"), "{health}");
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            // A short gap replaces the long one, and ends by itself.
            let short = http_request(address, "POST", "/fail-scrapes?seconds=0.2").await;
            assert!(short.starts_with("HTTP/1.1 200"), "{short}");
            tokio::time::sleep(Duration::from_millis(400)).await;
            let after = http_get(address, "/metrics").await;
            assert!(after.starts_with("HTTP/1.1 200"), "{after}");
            let _ = stop.send(true);
            (before, after)
        };
        let ((before, after), (), ()) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(
                client,
                serve_metrics(listener, metrics.clone(), stopped(stop_rx.clone())),
                drive_traffic(
                    || mesh.clone(),
                    metrics.clone(),
                    Simulator::new(config),
                    &mut rng,
                    stopped(stop_rx),
                ),
            )
        })
        .await
        .expect("the simulator did not stop within 20 s");
        // About 0.85 s at 200 rps went by between the two scrapes: counting went on in the gap.
        let (before, after) = (total_requests(&before), total_requests(&after));
        assert!(
            after >= before + 80.0,
            "{before} requests before, {after} after"
        );
    }
}
