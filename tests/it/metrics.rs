//! `GET /metrics` after real traffic: every request counted once, from the same row the
//! ledger gets, with the ledger writer's own counters beside.

use crate::common::{gateway, user};

#[tokio::test]
async fn metrics_count_what_the_gateway_served() {
    let gw = gateway().await;
    for _ in 0..2 {
        let r = gw.post_chat(&user("tiergate-auto", "Capital of France?")).await;
        assert_eq!(r.status(), 200);
    }
    let mut streamed = user("tiergate-auto", "Capital of Spain?");
    streamed["stream"] = true.into();
    let r = gw.post_chat(&streamed).await;
    r.text().await.expect("stream body");
    let r = gw.post_chat(&user("fake-500", "hi")).await;
    assert_eq!(r.status(), 502);
    gw.ledger_rows(4).await;

    let r = gw
        .client()
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("application/openmetrics-text"))
    );
    let text = r.text().await.expect("text");
    for want in [
        "tiergate_requests_total{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 3",
        "tiergate_requests_total{tier=\"broken\",rule=\"explicit-model\",outcome=\"upstream_error\"} 1",
        // The fake's usage (11 in, 4 out) for each of the three answers, streamed included.
        "tiergate_tokens_total{tier=\"small\",rule=\"routine\",outcome=\"ok\",token_type=\"input\"} 33",
        "tiergate_tokens_total{tier=\"small\",rule=\"routine\",outcome=\"ok\",token_type=\"output\"} 12",
        "tiergate_request_duration_seconds_count{tier=\"small\",rule=\"routine\",outcome=\"ok\"} 3",
        "tiergate_time_to_first_token_seconds_count{tier=\"small\"} 3",
        "tiergate_gateway_overhead_seconds_count{tier=\"small\"} 3",
        "tiergate_ledger_rows_written_total 4",
        "tiergate_ledger_rows_dropped_total 0",
        "tiergate_ledger_writer_up 1",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    assert!(!text.contains("SECRET"), "no key in metrics");
}
