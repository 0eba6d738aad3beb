//! What `/metrics` says after known requests: exact counts, sums and bucket placement.

use super::Metrics;
use crate::ledger::{Ledger, Record};

fn row(tier: Option<&str>, outcome: &str, latency_ms: f64) -> Record {
    Record {
        tier: tier.map(Into::into),
        rule: tier.map(|_| "routine".into()),
        outcome: outcome.into(),
        prompt_tokens: 100,
        completion_tokens: if outcome == "ok" { 20 } else { 0 },
        latency_ms,
        ttft_ms: (outcome == "ok").then_some(latency_ms / 2.0),
        gateway_ms: 0.25,
        cost_usd: 0.5,
        baseline_cost_usd: 2.0,
        ..Record::default()
    }
}

fn lines(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn requests_tokens_and_costs_are_counted_by_tier_rule_and_outcome() {
    let m = Metrics::new(None);
    m.observe(&row(Some("small"), "ok", 40.0));
    m.observe(&row(Some("small"), "ok", 60.0));
    m.observe(&row(Some("small"), "upstream_timeout", 30_000.0));
    m.observe(&Record {
        fallback: true,
        escalated: true,
        tokens_estimated: true,
        ..row(Some("cloud"), "ok", 1500.0)
    });
    m.observe(&row(None, "invalid_json", 1.0));
    let text = m.encode();

    // Exactly the two small-tier series: no stray label combinations.
    assert_eq!(
        lines(&text, "tiergate_requests_total{tier=\"small\"").len(),
        2,
        "{text}"
    );
    for want in [
        "tiergate_requests_total{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 2",
        "tiergate_requests_total{tier=\"small\",rule=\"routine\",outcome=\"upstream_timeout\"} 1",
        "tiergate_requests_total{tier=\"(unrouted)\",rule=\"(none)\",outcome=\"invalid_json\"} 1",
        "tiergate_tokens_total{tier=\"small\",rule=\"routine\",outcome=\"ok\",token_type=\"input\"} 200",
        "tiergate_tokens_total{tier=\"small\",rule=\"routine\",outcome=\"ok\",token_type=\"output\"} 40",
        "tiergate_cost_usd_total{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 1.0",
        "tiergate_baseline_cost_usd_total{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 4.0",
        "tiergate_fallbacks_total{tier=\"cloud\"} 1",
        "tiergate_escalations_total{tier=\"cloud\"} 1",
        "tiergate_tokens_estimated_requests_total{tier=\"cloud\"} 1",
        // 40 ms and 60 ms: one in (0.02, 0.04], one in (0.04, 0.08].
        "tiergate_request_duration_seconds_bucket{le=\"0.04\",tier=\"small\",rule=\"routine\",outcome=\"ok\"} 1",
        "tiergate_request_duration_seconds_bucket{le=\"0.08\",tier=\"small\",rule=\"routine\",outcome=\"ok\"} 2",
        "tiergate_request_duration_seconds_count{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 2",
        "tiergate_request_duration_seconds_sum{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 0.1",
        // TTFT of successful requests only: 20 ms and 30 ms.
        "tiergate_time_to_first_token_seconds_count{tier=\"small\"} 2",
        "tiergate_time_to_first_token_seconds_sum{tier=\"small\"} 0.05",
        // Overhead of the four routed requests, none for the rejected one.
        "tiergate_gateway_overhead_seconds_count{tier=\"small\"} 3",
        "tiergate_gateway_overhead_seconds_count{tier=\"cloud\"} 1",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    assert!(!text.contains("gateway_overhead_seconds_count{tier=\"(unrouted)\"}"));
    // No output tokens were reported for the timeout, so no zero series for it.
    assert!(!text.contains("outcome=\"upstream_timeout\",token_type=\"output\""));
    assert!(text.ends_with("# EOF\n"));
}

#[tokio::test]
async fn ledger_counters_are_read_at_scrape_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::start(&dir.path().join("l.db"), 8, 4).expect("ledger");
    let m = Metrics::new(Some(ledger.clone()));
    assert!(m.encode().contains("tiergate_ledger_rows_written_total 0"));
    for i in 0..3 {
        ledger.record(Record {
            request_id: format!("r{i}"),
            outcome: "ok".into(),
            ..Record::default()
        });
    }
    ledger.flush().await;
    let text = m.encode();
    for want in [
        "# TYPE tiergate_ledger_rows_dropped counter",
        "tiergate_ledger_rows_dropped_total 0",
        "tiergate_ledger_rows_written_total 3",
        "tiergate_ledger_queue_depth 0",
        "tiergate_ledger_writer_up 1",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    ledger.clone().shutdown().await;
    let text = m.encode();
    assert!(text.contains("tiergate_ledger_writer_up 0"), "{text}");
    // Rows recorded after the writer stopped are dropped, and the scrape says so.
    ledger.record(Record::default());
    assert!(m.encode().contains("tiergate_ledger_rows_dropped_total 1"));
}

#[test]
fn retries_are_counted_by_tier_and_reason_and_only_when_retryable() {
    use crate::error::Error;
    let m = Metrics::new(None);
    let status = Error::UpstreamStatus {
        tier: "cloud".into(),
        status: 503,
    };
    let limited = Error::UpstreamRateLimited {
        tier: "cloud".into(),
        retry_after: None,
    };
    let refused = Error::UpstreamUnreachable {
        tier: "small".into(),
        connected: false,
    };
    let rejected = Error::UpstreamRejected {
        tier: "cloud".into(),
        status: 400,
        detail: "bad".into(),
    };
    for (tier, e) in [
        ("cloud", &status),
        ("cloud", &status),
        ("cloud", &limited),
        ("small", &refused),
        ("cloud", &rejected),
    ] {
        m.retried(tier, e);
    }
    let mut series = lines(&m.encode(), "tiergate_upstream_retries_total");
    series.sort_unstable();
    assert_eq!(
        series,
        [
            "tiergate_upstream_retries_total{tier=\"cloud\",reason=\"429\"} 1",
            "tiergate_upstream_retries_total{tier=\"cloud\",reason=\"5xx\"} 2",
            "tiergate_upstream_retries_total{tier=\"small\",reason=\"connect\"} 1",
        ],
        "a rejection is not retried, so not counted"
    );
}
