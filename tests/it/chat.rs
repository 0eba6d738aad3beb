//! `/v1/chat/completions` end to end: routing, relaying (whole and streamed), errors in
//! OpenAI's envelope, and the ledger row each request leaves.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::{self, FAKE_USAGE, PIECES, UPSTREAM_KEY, gateway, header, sse_payloads, user};

#[tokio::test]
async fn short_prompt_is_routed_to_the_small_tier_and_accounted() {
    let gw = gateway().await;
    let r = gw.post_chat(&user("tiergate-auto", "Capital of France?")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "small");
    assert_eq!(header(&r, "x-tiergate-rule"), "routine");
    assert_eq!(header(&r, "x-tiergate-scorer"), "length");
    assert_eq!(header(&r, "x-tiergate-policy"), "test");
    let score: f64 = header(&r, "x-tiergate-score")
        .parse()
        .expect("score header is a number");
    assert!((0.0..0.5).contains(&score), "short prompt scores low: {score}");
    let request_id = header(&r, "x-request-id").to_owned();
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], PIECES.concat());

    // The upstream got the tier's model and the gateway's key, not the client's.
    let (auth, sent) = gw.fake.requests.lock().expect("lock")[0].clone();
    assert_eq!(sent["model"], "fake-small");
    assert_eq!(auth.as_deref(), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));

    let rows = gw.ledger().await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.request_id, request_id);
    assert_eq!(row.requested_model.as_deref(), Some("tiergate-auto"));
    assert_eq!(row.tier.as_deref(), Some("small"));
    assert_eq!(row.backend_model.as_deref(), Some("fake-small"));
    assert_eq!(row.rule.as_deref(), Some("routine"));
    assert_eq!(row.policy.as_deref(), Some("test"));
    assert!(
        row.score.is_some_and(|s| (s - score).abs() < 1e-4),
        "header rounds the ledger's score"
    );
    assert_eq!((row.prompt_tokens, row.completion_tokens), FAKE_USAGE);
    assert!(!row.tokens_estimated);
    assert_eq!(row.outcome, "ok");
    assert_eq!(row.http_status, 200);
    assert!(!row.streamed);
    let cost = (11.0 * 0.1 + 4.0 * 0.2) / 1e6;
    let baseline = (11.0 * 2.5 + 4.0 * 10.0) / 1e6;
    assert!((row.cost_usd - cost).abs() < 1e-15, "{} vs {cost}", row.cost_usd);
    assert!((row.baseline_cost_usd - baseline).abs() < 1e-15);
    assert!(row.latency_ms >= row.gateway_ms && row.gateway_ms >= 0.0);
    let key_id = row.api_key_id.as_deref().expect("key id recorded");
    let store = tiergate::auth::KeyStore::open(&gw.keys_db).expect("key store");
    assert_eq!(Some(key_id), store.find("test").expect("find").map(|k| k.id).as_deref());
}

#[tokio::test]
async fn long_prompt_is_routed_to_the_cloud_tier() {
    let gw = gateway().await;
    let long = "Prove that there are infinitely many primes of the form 4k+3, then explain each step. ".repeat(4);
    let r = gw.post_chat(&user("tiergate-auto", &long)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    assert_eq!(header(&r, "x-tiergate-rule"), "default");
}

#[tokio::test]
async fn a_concrete_model_name_passes_through_to_its_tier() {
    let gw = gateway().await;
    let r = gw.post_chat(&user("fake-cloud", "hi")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    assert_eq!(header(&r, "x-tiergate-rule"), "explicit-model");
    assert!(r.headers().get("x-tiergate-score").is_none());
}

#[tokio::test]
async fn streaming_relays_chunks_and_done_and_records_usage() {
    let gw = gateway().await;
    let mut req = user("tiergate-auto", "Capital of France?");
    req["stream"] = json!(true);
    let r = gw.post_chat(&req).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    assert_eq!(header(&r, "x-tiergate-tier"), "small");
    let text = r.text().await.expect("body");
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).expect("chunk json"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, PIECES.concat());
    // The client did not ask for usage: the gateway asked upstream for it, and kept the usage-only chunk to itself.
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{text}"
    );
    let (_, sent) = gw.fake.requests.lock().expect("lock")[0].clone();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let rows = gw.ledger_rows(1).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(row.streamed);
    assert_eq!(row.outcome, "ok");
    assert_eq!((row.prompt_tokens, row.completion_tokens), FAKE_USAGE);
    assert!(!row.tokens_estimated);
    assert!(row.cost_usd > 0.0 && row.baseline_cost_usd > row.cost_usd);
    assert!(row.ttft_ms.is_some_and(|t| t <= row.latency_ms));
}

#[tokio::test]
async fn streaming_forwards_usage_when_the_client_asks_for_it() {
    let gw = gateway().await;
    let mut req = user("fake-small", "hi");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let text = gw.post_chat(&req).await.text().await.expect("body");
    let usage: Vec<Value> = sse_payloads(&text)
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
        .collect();
    assert_eq!(usage.len(), 1, "{text}");
    assert_eq!(usage[0]["usage"]["prompt_tokens"], FAKE_USAGE.0);
}

#[tokio::test]
async fn stream_without_upstream_usage_is_estimated_not_zero() {
    let gw = gateway().await;
    let mut req = user("fake-nousage", "Tell me the capital of France");
    req["stream"] = json!(true);
    let text = gw.post_chat(&req).await.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let rows = gw.ledger_rows(1).await;
    let row = &rows[0];
    assert!(row.tokens_estimated);
    assert!(row.prompt_tokens > 0 && row.completion_tokens > 0, "{row:?}");
    assert!(row.cost_usd > 0.0);
}

#[tokio::test]
async fn chunks_arrive_before_the_upstream_has_finished() {
    let gw = gateway().await;
    let mut req = user("fake-gated", "hi");
    req["stream"] = json!(true);
    let r = gw.post_chat(&req).await;
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    // The fake holds the rest of its answer until we have seen its first words through
    // the gateway; a buffering gateway would hang here.
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(b) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&b.expect("chunk")));
            if seen.contains(PIECES[0]) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        first,
        Ok(true),
        "first piece not relayed before the upstream finished: {seen}"
    );
    gw.fake.gate.notify_one();
    while let Some(b) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&b.expect("chunk")));
    }
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
}

#[tokio::test]
async fn client_disconnecting_mid_stream_still_leaves_a_ledger_row() {
    let gw = gateway().await;
    let mut req = user("fake-endless", "Count forever");
    req["stream"] = json!(true);
    let r = gw.post_chat(&req).await;
    let mut body = r.bytes_stream();
    let mut got = 0;
    while let Some(b) = body.next().await {
        got += b.expect("chunk").len();
        if got > 500 {
            break;
        }
    }
    drop(body);
    let rows = gw.ledger_rows(1).await;
    assert_eq!(rows.len(), 1, "exactly one row for the abandoned stream");
    let row = &rows[0];
    assert_eq!(row.outcome, "client_disconnected");
    assert!(row.streamed);
    assert!(row.completion_tokens > 0 && row.tokens_estimated, "{row:?}");
}

#[tokio::test]
async fn a_client_leaving_a_whole_cloud_answer_is_billed_what_the_upstream_reports() {
    // A key with a budget: leaving early must not dodge it.
    let gw = common::gateway_with(&common::Setup {
        key_limits: tiergate::auth::KeyLimits {
            daily_usd: Some(1.0),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // `fake-sluggish` (tier `sluggish`, $2.5/$10 per Mtok) answers 2 s after it gets the request.
    let conn = gw
        .send_and_hold(&user("fake-sluggish", "Summarise the history of Rome."))
        .await;
    for _ in 0..500 {
        if gw.fake.calls("fake-sluggish") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.fake.calls("fake-sluggish"), 1, "the request reached the upstream");
    // The client hangs up while the upstream is still working on the answer.
    drop(conn);
    let rows = gw.ledger_rows(1).await;
    assert_eq!(rows.len(), 1, "one row for the abandoned request: {rows:?}");
    let row = &rows[0];
    assert_eq!(
        (row.outcome.as_str(), row.http_status),
        ("client_disconnected", 499),
        "{row:?}"
    );
    assert_eq!(row.tier.as_deref(), Some("sluggish"));
    assert!(!row.streamed);
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        FAKE_USAGE,
        "the upstream's usage"
    );
    assert!(!row.tokens_estimated);
    let price = (FAKE_USAGE.0 as f64 * 2.5 + FAKE_USAGE.1 as f64 * 10.0) / 1e6;
    assert!(
        row.cost_usd > 0.0 && (row.cost_usd - price).abs() < 1e-12,
        "cost {} for {price}",
        row.cost_usd
    );
    let key = row.api_key_id.as_deref().expect("the key's id");
    let (today, _) = gw.state.auth.budgets.spent(key, tiergate::report::now_ms());
    assert!((today - row.cost_usd).abs() < 1e-12, "budget charged {today}");
    assert_eq!(
        gw.fake.calls("fake-sluggish"),
        1,
        "nothing asked again for a client that left"
    );
}

/// The answer is `status` with OpenAI's error envelope carrying `code`.
pub async fn assert_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status);
    let body: Value = r.json().await.expect("error body is JSON");
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(
        e.get("type").is_some() && e.get("param").is_some(),
        "OpenAI envelope: {body}"
    );
    body
}

#[tokio::test]
async fn malformed_json_is_a_400_in_openai_shape() {
    let gw = gateway().await;
    let r = gw
        .client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("content-type", "application/json")
        .body("{\"model\": \"tiergate-auto\", \"messages\": [")
        .send()
        .await
        .expect("send");
    let body = assert_error(r, 400, "invalid_json").await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let rows = gw.ledger().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].outcome, "invalid_json");
    assert_eq!(rows[0].http_status, 400);
}

#[tokio::test]
async fn missing_or_bad_fields_are_named() {
    let gw = gateway().await;
    for (req, param) in [
        (json!({"model": "tiergate-auto"}), "messages"),
        (json!({"messages": [{"role": "user", "content": "hi"}]}), "model"),
        (json!({"model": "tiergate-auto", "messages": []}), "messages"),
        (
            json!({"model": "tiergate-auto", "messages": [{"content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "tiergate-auto", "messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"model": "tiergate-auto", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
    ] {
        let body = assert_error(gw.post_chat(&req).await, 400, "invalid_request").await;
        assert_eq!(body["error"]["param"], param, "{req}");
    }
    assert_eq!(gw.ledger().await.len(), 6);
}

#[tokio::test]
async fn unknown_model_is_a_404() {
    let gw = gateway().await;
    let body = assert_error(gw.post_chat(&user("gpt-9-ultra", "hi")).await, 404, "model_not_found").await;
    assert_eq!(body["error"]["param"], "model");
}

#[tokio::test]
async fn oversized_body_is_a_413() {
    let gw = gateway().await;
    let huge = "x".repeat(5 * 1024 * 1024);
    let r = gw.post_chat(&user("tiergate-auto", &huge)).await;
    assert_error(r, 413, "body_too_large").await;
    assert_eq!(gw.ledger().await[0].outcome, "body_too_large");
}

#[tokio::test]
async fn upstream_500_is_a_502_that_leaks_nothing() {
    let gw = gateway().await;
    for stream in [false, true] {
        let mut req = user("fake-500", "hi");
        req["stream"] = json!(stream);
        let r = gw.post_chat(&req).await;
        assert_eq!(header(&r, "x-tiergate-tier"), "broken");
        let body = assert_error(r, 502, "upstream_error").await;
        let text = body.to_string();
        assert!(!text.contains(UPSTREAM_KEY) && !text.contains("shard-7"), "{text}");
    }
    let rows = gw.ledger().await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.outcome == "upstream_error" && r.http_status == 502 && r.cost_usd == 0.0)
    );
}

#[tokio::test]
async fn upstream_timeout_is_a_504() {
    let gw = gateway().await;
    let started = std::time::Instant::now();
    let body = assert_error(gw.post_chat(&user("fake-slow", "hi")).await, 504, "upstream_timeout").await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the tier's 0.5 s timeout applies"
    );
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("slow")));
    assert_eq!(gw.ledger().await[0].outcome, "upstream_timeout");
}

#[tokio::test]
async fn no_secret_reaches_the_ledger() {
    let gw = gateway().await;
    gw.post_chat(&user("tiergate-auto", "hi")).await;
    gw.post_chat(&user("fake-500", "hi")).await;
    gw.post_chat(&user("nope", "hi")).await;
    let rows = gw.ledger().await;
    assert_eq!(rows.len(), 3);
    let dump = format!("{rows:?}");
    assert!(
        !dump.contains(UPSTREAM_KEY) && !dump.contains(&gw.key) && !dump.contains("SECRET"),
        "{dump}"
    );
}

#[tokio::test]
async fn models_lists_aliases_and_tier_models() {
    let gw = gateway().await;
    let body = gw.get_json("/v1/models").await;
    let ids: Vec<&str> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&"tiergate-auto"));
    for (_, model) in common::TIERS {
        assert!(ids.contains(model), "{ids:?}");
    }
}

#[tokio::test]
async fn readyz_reports_the_ledger_and_policy() {
    let gw = gateway().await;
    let r = gw
        .client()
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    // The ONNX Runtime version is there once something loaded it (the classifier's test).
    assert!(body["onnxruntime"].get("version").is_some(), "{body}");
    assert_eq!(body["ledger"]["writer_alive"], true);
    assert_eq!(body["policy"], "test");
    let health = gw
        .client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .expect("send");
    assert_eq!(health.status(), 200);
}
