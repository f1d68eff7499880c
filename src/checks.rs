//! Built-in checks (`analysis.metrics[].check`): the PromQL the operator writes so that a user
//! does not. Each renders to the same kind of template a user's `query` is, with `{{namespace}}`,
//! `{{workload}}` and `{{window}}` filled in per track when it runs, so the rest of the judge (max
//! and min, maxIncrease and maxDecrease, compareToStable) treats both alike.
//!
//! Metric names:
//! - the OpenTelemetry GenAI semantic conventions' `gen_ai.server.time_to_first_token`,
//!   `gen_ai.server.time_per_output_token` (seconds) and `gen_ai.client.token.usage` (tokens, by
//!   `gen_ai.token.type`), as Prometheus stores them (dots to underscores, the unit `s` as
//!   `_seconds`, the annotation unit `{token}` dropped);
//! - vLLM's `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds` (the V1 engine's
//!   name; older releases called it `vllm:time_per_output_token_seconds`),
//!   `vllm:generation_tokens_total` and `vllm:request_success_total`;
//! - the kubelet's cAdvisor `container_memory_working_set_bytes` and
//!   `container_cpu_usage_seconds_total`, labelled `namespace`, `pod` and `container`.
//!
//! The app's metrics are selected by `namespace` and `workload`, the labels the README's scrape
//! job adds; the kubelet's by `namespace` and the track's pod names (`<workload>-<hash>-<suffix>`,
//! as a Deployment's ReplicaSet names them).

use crate::crd::{BuiltinCheck, CheckFlavor, RequestSource};
use crate::prometheus::source_queries;

/// The app's own series of one track, as the scrape job labels them.
const APP: &str = r#"namespace="{{namespace}}",workload="{{workload}}""#;
/// The kubelet's container series of one track's pods: a Deployment's pod is named
/// `<deployment>-<pod-template-hash>-<suffix>`, neither part holding a `-`. `container!=""`
/// leaves out the pod's own cgroup (the sum of its containers), `container!="POD"` the pause
/// container of older runtimes.
const PODS: &str = r#"namespace="{{namespace}}",pod=~"{{workload}}-[a-z0-9]+-[a-z0-9]+",container!="",container!="POD""#;

/// The query template of `check`, for a ChatRelease reading its requests from `source`.
pub fn query_template(check: BuiltinCheck, flavor: CheckFlavor, source: RequestSource) -> String {
    match check {
        BuiltinCheck::TtftP99 => quantile("0.99", ttft(flavor)),
        BuiltinCheck::TtftP95 => quantile("0.95", ttft(flavor)),
        BuiltinCheck::TimePerOutputTokenP99 => quantile(
            "0.99",
            match flavor {
                CheckFlavor::Otel => "gen_ai_server_time_per_output_token_seconds_bucket",
                CheckFlavor::Vllm => "vllm:inter_token_latency_seconds_bucket",
            },
        ),
        BuiltinCheck::OutputTokensPerRequest => match flavor {
            CheckFlavor::Otel => {
                let usage = format!(r#"{{{APP},gen_ai_token_type="output"}}[{{{{window}}}}]"#);
                format!(
                    "sum(rate(gen_ai_client_token_usage_sum{usage})) / \
                     sum(rate(gen_ai_client_token_usage_count{usage}))"
                )
            }
            CheckFlavor::Vllm => format!(
                "sum(rate(vllm:generation_tokens_total{{{APP}}}[{{{{window}}}}])) / \
                 sum(rate(vllm:request_success_total{{{APP}}}[{{{{window}}}}]))"
            ),
        },
        // deriv() is per second; the slope of a pod is the sum of its containers'.
        BuiltinCheck::MemoryGrowth => format!(
            "60 * max(sum by (pod) (deriv(container_memory_working_set_bytes{{{PODS}}}[{{{{window}}}}])))"
        ),
        BuiltinCheck::CpuPerRequest => {
            let q = source_queries(source);
            format!(
                "sum(rate(container_cpu_usage_seconds_total{{{PODS}}}[{{{{window}}}}])) / \
                 sum(rate({}{{{}{}=\"{{{{namespace}}}}\",{}=\"{{{{workload}}}}\"}}[{{{{window}}}}]))",
                q.requests, q.fixed, q.namespace_label, q.workload_label
            )
        }
    }
}

fn ttft(flavor: CheckFlavor) -> &'static str {
    match flavor {
        CheckFlavor::Otel => "gen_ai_server_time_to_first_token_seconds_bucket",
        CheckFlavor::Vllm => "vllm:time_to_first_token_seconds_bucket",
    }
}

fn quantile(q: &str, buckets: &str) -> String {
    format!("histogram_quantile({q}, sum by (le) (rate({buckets}{{{APP}}}[{{{{window}}}}])))")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prometheus::custom_query;
    use std::time::Duration;

    /// The query run for the canary of `chat/lobe-chat` over a 60 s window.
    fn canary(check: BuiltinCheck, flavor: CheckFlavor, source: RequestSource) -> String {
        custom_query(
            &query_template(check, flavor, source),
            "chat",
            "lobe-chat-canary",
            Duration::from_secs(60),
        )
    }

    fn otel(check: BuiltinCheck) -> String {
        canary(check, CheckFlavor::Otel, RequestSource::Istio)
    }

    fn vllm(check: BuiltinCheck) -> String {
        canary(check, CheckFlavor::Vllm, RequestSource::Istio)
    }

    #[test]
    fn ttft_percentiles_read_the_genai_histogram_of_one_track() {
        assert_eq!(
            otel(BuiltinCheck::TtftP99),
            r#"histogram_quantile(0.99, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_bucket{namespace="chat",workload="lobe-chat-canary"}[60s])))"#
        );
        assert_eq!(
            otel(BuiltinCheck::TtftP95),
            r#"histogram_quantile(0.95, sum by (le) (rate(gen_ai_server_time_to_first_token_seconds_bucket{namespace="chat",workload="lobe-chat-canary"}[60s])))"#
        );
        assert_eq!(
            vllm(BuiltinCheck::TtftP99),
            r#"histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{namespace="chat",workload="lobe-chat-canary"}[60s])))"#
        );
    }

    #[test]
    fn time_per_output_token_reads_genai_or_vllms_inter_token_latency() {
        assert_eq!(
            otel(BuiltinCheck::TimePerOutputTokenP99),
            r#"histogram_quantile(0.99, sum by (le) (rate(gen_ai_server_time_per_output_token_seconds_bucket{namespace="chat",workload="lobe-chat-canary"}[60s])))"#
        );
        assert_eq!(
            vllm(BuiltinCheck::TimePerOutputTokenP99),
            r#"histogram_quantile(0.99, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket{namespace="chat",workload="lobe-chat-canary"}[60s])))"#
        );
    }

    #[test]
    fn output_tokens_per_request_is_a_mean_of_output_tokens_only() {
        assert_eq!(
            otel(BuiltinCheck::OutputTokensPerRequest),
            r#"sum(rate(gen_ai_client_token_usage_sum{namespace="chat",workload="lobe-chat-canary",gen_ai_token_type="output"}[60s])) / sum(rate(gen_ai_client_token_usage_count{namespace="chat",workload="lobe-chat-canary",gen_ai_token_type="output"}[60s]))"#
        );
        assert_eq!(
            vllm(BuiltinCheck::OutputTokensPerRequest),
            r#"sum(rate(vllm:generation_tokens_total{namespace="chat",workload="lobe-chat-canary"}[60s])) / sum(rate(vllm:request_success_total{namespace="chat",workload="lobe-chat-canary"}[60s]))"#
        );
    }

    #[test]
    fn memory_growth_is_the_steepest_pod_of_the_track_in_bytes_per_minute_whatever_the_flavor() {
        let want = r#"60 * max(sum by (pod) (deriv(container_memory_working_set_bytes{namespace="chat",pod=~"lobe-chat-canary-[a-z0-9]+-[a-z0-9]+",container!="",container!="POD"}[60s])))"#;
        assert_eq!(otel(BuiltinCheck::MemoryGrowth), want);
        assert_eq!(vllm(BuiltinCheck::MemoryGrowth), want);
    }

    #[test]
    fn cpu_per_request_divides_by_the_requests_of_the_chatreleases_source() {
        let cpu = r#"sum(rate(container_cpu_usage_seconds_total{namespace="chat",pod=~"lobe-chat-canary-[a-z0-9]+-[a-z0-9]+",container!="",container!="POD"}[60s]))"#;
        for (source, requests) in [
            (
                RequestSource::Istio,
                r#"istio_requests_total{reporter="destination",destination_workload_namespace="chat",destination_workload="lobe-chat-canary"}"#,
            ),
            (
                RequestSource::IstioWaypoint,
                r#"istio_requests_total{reporter="waypoint",destination_workload_namespace="chat",destination_workload="lobe-chat-canary"}"#,
            ),
            (
                RequestSource::Otel,
                r#"http_server_request_duration_seconds_count{namespace="chat",workload="lobe-chat-canary"}"#,
            ),
        ] {
            assert_eq!(
                canary(BuiltinCheck::CpuPerRequest, CheckFlavor::Otel, source),
                format!("{cpu} / sum(rate({requests}[60s]))"),
                "{source:?}"
            );
        }
    }

    #[test]
    fn the_pod_pattern_takes_the_tracks_pods_and_no_other_deployments() {
        let template = query_template(
            BuiltinCheck::MemoryGrowth,
            CheckFlavor::Otel,
            RequestSource::Istio,
        );
        let pattern = template
            .split(r#"pod=~""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a pod matcher")
            .replace("{{workload}}", "lobe-chat-canary");
        // Prometheus anchors a label regex at both ends.
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).expect("a regex");
        assert!(re.is_match("lobe-chat-canary-5d8f9c7b6-x2k9p"));
        for other in [
            "lobe-chat-stable-5d8f9c7b6-x2k9p",
            "lobe-chat-canary-worker-5d8f9c7b6-x2k9p",
            "lobe-chat-canary",
            "x-lobe-chat-canary-5d8f9c7b6-x2k9p",
        ] {
            assert!(!re.is_match(other), "{other}");
        }
    }

    #[test]
    fn every_check_fills_every_placeholder() {
        for check in BuiltinCheck::ALL {
            for flavor in [CheckFlavor::Otel, CheckFlavor::Vllm] {
                for source in [
                    RequestSource::Istio,
                    RequestSource::IstioWaypoint,
                    RequestSource::Otel,
                ] {
                    let q = canary(check, flavor, source);
                    assert!(!q.contains("{{"), "{check:?} {flavor:?}: {q}");
                    assert!(q.contains("[60s]"), "{check:?} {flavor:?}: {q}");
                }
            }
        }
    }
}
