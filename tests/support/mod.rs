//! Helpers shared by the test binaries that start `chatrelease-operator` as a process and read
//! what it serves on its metrics port. Each test binary that needs them declares `mod support;`.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::io::{Read as _, Write as _};
use std::time::Duration;

/// A TCP port on 127.0.0.1 that was free a moment ago, for an operator's `--metrics-addr`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body, or `None` when nothing answers
/// (yet) within 5 s.
pub fn try_http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    Some((code, body))
}

/// [`try_http_get`] on a server that must answer.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    try_http_get(port, path).unwrap_or_else(|| panic!("no answer from 127.0.0.1:{port}{path}"))
}

/// The value of one series in a Prometheus text exposition, `series` written as exposed
/// (`chatrelease_leader`, `chatrelease_canary_weight{namespace="chat",name="lobe-chat"}`).
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn a_series_is_found_by_its_whole_name_and_labels() {
    let text = "# HELP chatrelease_leader leads\nchatrelease_leader 1\n\
                chatrelease_leader_x 7\n\
                chatrelease_canary_weight{namespace=\"chat\",name=\"a\"} 25\n";
    assert_eq!(metric_value(text, "chatrelease_leader"), Some(1.0));
    assert_eq!(
        metric_value(
            text,
            r#"chatrelease_canary_weight{namespace="chat",name="a"}"#
        ),
        Some(25.0)
    );
    assert_eq!(
        metric_value(
            text,
            r#"chatrelease_canary_weight{namespace="chat",name="b"}"#
        ),
        None
    );
}
