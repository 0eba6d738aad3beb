//! Upstream faults, one test per case: each ends in a policy fallback or an OpenAI-shaped
//! error (JSON before streaming, an SSE error event after), with the ledger row to match.
//! The fake misbehaves by model name (`FAULT_TIERS` in `common`).

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::chat::assert_error;
use crate::common::{self, FAKE_USAGE, Gateway, PIECES, Setup, gateway, gateway_with, header, sse_payloads, user};

/// One rule sending everything to `tier`, falling back to `cloud`.
fn fallback_policy(tier: &str) -> String {
    format!("[[rules]]\nname = \"primary\"\ntier = \"{tier}\"\nfallback = [\"cloud\"]\n")
}

async fn gateway_falling_back(tier: &str, extra: String) -> Gateway {
    gateway_with(&Setup {
        policy: Some(fallback_policy(tier)),
        extra,
        ..Setup::default()
    })
    .await
}

/// (tier, outcome) of each attempt of the only ledger row.
async fn attempts(gw: &Gateway) -> (tiergate::ledger::Record, Vec<(String, String)>) {
    let rows = gw.ledger_rows(1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = rows[0].clone();
    let calls = row
        .attempts
        .iter()
        .map(|a| (a.tier.clone(), a.outcome.clone()))
        .collect();
    (row, calls)
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

async fn assert_fell_back_to_cloud(r: reqwest::Response) {
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], PIECES.concat());
}

/// The stream's last event is an OpenAI error envelope with `code`, and no `[DONE]`.
fn assert_stream_error(text: &str, code: &str) -> Value {
    let payloads = sse_payloads(text);
    assert!(!payloads.iter().any(|p| p == "[DONE]"), "{text}");
    let last: Value = serde_json::from_str(payloads.last().expect("events")).expect("JSON event");
    assert_eq!(last["error"]["code"], code, "{text}");
    assert!(last["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(last["error"].get("type").is_some());
    last
}

fn streamed(model: &str) -> Value {
    let mut req = user(model, "hi");
    req["stream"] = json!(true);
    req
}

#[tokio::test]
async fn slow_headers_hit_the_first_token_timeout_and_fall_back() {
    let gw = gateway_falling_back("late", String::new()).await;
    assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    let (row, calls) = attempts(&gw).await;
    assert!(row.fallback && row.outcome == "ok");
    assert_eq!(calls, pairs(&[("late", "upstream_timeout"), ("cloud", "ok")]));
    assert_eq!(gw.fake.calls("fake-late"), 1, "a timeout is not retried");
}

#[tokio::test]
async fn a_tier_failing_after_its_client_left_is_recorded_as_its_failure_and_not_fallen_back() {
    let gw = gateway_falling_back("late", String::new()).await;
    let conn = gw.send_and_hold(&user("tiergate-auto", "hi")).await;
    for _ in 0..500 {
        if gw.fake.calls("fake-late") == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(gw.fake.calls("fake-late"), 1, "the request reached the upstream");
    // Gone before the tier's 0.3 s first-token timeout.
    drop(conn);
    let (row, calls) = attempts(&gw).await;
    assert_eq!(
        (row.outcome.as_str(), row.http_status),
        ("upstream_timeout", 499),
        "the tier's failure, and nobody to tell: {row:?}"
    );
    assert!(calls.is_empty() && !row.fallback, "{calls:?}");
    assert_eq!(gw.fake.calls("fake-cloud"), 0, "no fallback for a client that left");
}

#[tokio::test]
async fn a_stream_whose_first_event_is_late_falls_back_before_any_byte_is_sent() {
    let gw = gateway_falling_back("late", String::new()).await;
    let r = gw.post_chat(&streamed("tiergate-auto")).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let text = r.text().await.expect("body");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let (row, calls) = attempts(&gw).await;
    assert!(row.fallback && row.streamed);
    assert_eq!(calls, pairs(&[("late", "upstream_timeout"), ("cloud", "ok")]));
}

#[tokio::test]
async fn a_stream_that_dies_before_its_first_chunk_falls_back() {
    for (tier, model) in [
        ("erroring", "fake-erroring"),
        ("broken_off", "fake-broken-off"),
        ("empty", "fake-empty"),
        ("json_stream", "fake-json-stream"),
    ] {
        let gw = gateway_falling_back(tier, String::new()).await;
        let r = gw.post_chat(&streamed("tiergate-auto")).await;
        assert_eq!(r.status(), 200, "{tier}");
        assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
        let text = r.text().await.expect("body");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let (row, calls) = attempts(&gw).await;
        assert!(row.fallback && row.streamed && row.outcome == "ok", "{row:?}");
        assert_eq!(calls, pairs(&[(tier, "upstream_error"), ("cloud", "ok")]));
        assert_eq!(
            gw.fake.calls(model),
            1,
            "not retried: the upstream may have started work"
        );
        // Without a fallback the client is told why, before its first chunk.
        let gw = gateway().await;
        let body = assert_error(gw.post_chat(&streamed(model)).await, 502, "upstream_error").await;
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("before its first chunk") || msg.contains("not an event stream"),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn a_whole_answer_without_choices_is_a_502() {
    let gw = gateway().await;
    let body = assert_error(gw.post_chat(&user("fake-empty", "hi")).await, 502, "upstream_error").await;
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("has no choices"), "{msg}");
}

#[tokio::test]
async fn first_token_timeout_without_fallback_is_a_504_naming_the_limit() {
    let gw = gateway().await;
    let body = assert_error(gw.post_chat(&streamed("fake-late")).await, 504, "upstream_timeout").await;
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("first token timeout of 0.3s"), "{msg}");
    assert_eq!(gw.ledger().await[0].outcome, "upstream_timeout");
}

#[tokio::test]
async fn upstream_429_is_retried_after_retry_after_then_falls_back() {
    let gw = gateway_falling_back("limited", String::new()).await;
    assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    assert_eq!(gw.fake.calls("fake-429"), 3, "first call and 2 retries");
    let (row, calls) = attempts(&gw).await;
    assert!(row.fallback);
    let limited = ("limited", "upstream_rate_limited");
    assert_eq!(calls, pairs(&[limited, limited, limited, ("cloud", "ok")]));
    assert_retries(&gw, &[("limited", "429", 2)]).await;
}

/// `tiergate_upstream_retries_total` has exactly these (tier, reason, count) series.
async fn assert_retries(gw: &Gateway, want: &[(&str, &str, u64)]) {
    let metrics = gw.get_text("/metrics").await;
    let mut series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tiergate_upstream_retries_total"))
        .collect();
    series.sort_unstable();
    let want: Vec<String> = want
        .iter()
        .map(|(tier, reason, n)| format!("tiergate_upstream_retries_total{{tier=\"{tier}\",reason=\"{reason}\"}} {n}"))
        .collect();
    assert_eq!(series, want, "{metrics}");
}

#[tokio::test]
async fn a_retry_after_beyond_the_cap_is_not_waited_for_and_passes_through() {
    let gw = gateway().await;
    let r = gw.post_chat(&user("fake-429-long", "hi")).await;
    assert_eq!(header(&r, "retry-after"), "60");
    assert_error(r, 429, "upstream_rate_limited").await;
    assert_eq!(gw.fake.calls("fake-429-long"), 1);
}

#[tokio::test]
async fn a_4xx_is_never_retried_nor_falls_back() {
    let gw = gateway_falling_back("rejecting", String::new()).await;
    let r = gw.post_chat(&user("tiergate-auto", "hi")).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "rejecting");
    let body = assert_error(r, 400, "upstream_rejected").await;
    assert!(body.to_string().contains("max_tokens is too large"));
    assert_eq!(gw.fake.calls("fake-400"), 1);
    assert_eq!(gw.fake.calls("fake-cloud"), 0);
    assert_retries(&gw, &[]).await;
}

#[tokio::test]
async fn a_500_is_retried_and_the_retry_answers() {
    let gw = gateway().await;
    let r = gw.post_chat(&user("fake-flaky", "hi")).await;
    assert_eq!(r.status(), 200);
    let (row, calls) = attempts(&gw).await;
    assert!(!row.fallback, "same tier: a retry, not a fallback");
    assert_eq!(calls, pairs(&[("flaky", "upstream_error"), ("flaky", "ok")]));
    assert_eq!((row.prompt_tokens, row.completion_tokens), FAKE_USAGE);
    assert_retries(&gw, &[("flaky", "5xx", 1)]).await;
}

#[tokio::test]
async fn repeated_500s_open_the_circuit_and_the_fallback_takes_over() {
    let gw = gateway_falling_back("down", String::new()).await;
    for _ in 0..3 {
        assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    }
    // Two failures opened the circuit: the third request never reached the upstream.
    assert_eq!(gw.fake.calls("fake-500-down"), 2);
    let rows = gw.ledger_rows(3).await;
    let outcomes: Vec<&str> = rows.iter().map(|r| r.attempts[0].outcome.as_str()).collect();
    assert_eq!(outcomes, ["upstream_error", "upstream_error", "upstream_unavailable"]);
    assert!(
        rows.iter()
            .all(|r| r.fallback && r.outcome == "ok" && r.tier.as_deref() == Some("cloud"))
    );

    let ready = gw.get_json("/readyz").await;
    let down = ready["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == "down")
        .expect("down tier")
        .clone();
    assert_eq!(down["circuit"], "open", "{down}");
    assert_eq!(down["ready"], false);
    let metrics = gw.get_text("/metrics").await;
    assert!(metrics.contains("tiergate_circuit_state{tier=\"down\"} 1"), "{metrics}");
    assert!(metrics.contains("tiergate_circuit_state{tier=\"cloud\"} 0"));
    assert!(metrics.contains("tiergate_circuit_transitions_total{tier=\"down\",to=\"open\"} 1"));
}

#[tokio::test]
async fn an_open_circuit_without_fallback_is_a_503() {
    let gw = gateway().await;
    for _ in 0..2 {
        assert_error(gw.post_chat(&user("fake-500-down", "hi")).await, 502, "upstream_error").await;
    }
    assert_error(
        gw.post_chat(&user("fake-500-down", "hi")).await,
        503,
        "upstream_unavailable",
    )
    .await;
}

/// An address nothing listens on.
async fn refused_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// An upstream that reads each request and resets the connection without answering.
async fn resetting_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // Enough to have the request; then RST instead of an answer.
                let _ = sock.read(&mut buf).await;
                let _ = sock.set_zero_linger();
                drop(sock);
            });
        }
    });
    addr
}

#[tokio::test]
async fn connection_refused_is_retried_then_falls_back() {
    let addr = refused_addr().await;
    let extra = common::tier_toml("gone", "fake-gone", &format!("http://{addr}/v1"), "");
    let gw = gateway_falling_back("gone", extra).await;
    assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    let (row, calls) = attempts(&gw).await;
    assert!(row.fallback);
    let gone = ("gone", "upstream_unreachable");
    assert_eq!(calls, pairs(&[gone, gone, gone, ("cloud", "ok")]));
    assert_retries(&gw, &[("gone", "connect", 2)]).await;
}

#[tokio::test]
async fn connection_reset_before_the_answer_falls_back_without_a_retry() {
    let addr = resetting_upstream().await;
    let extra = common::tier_toml("resetting", "fake-reset", &format!("http://{addr}/v1"), "");
    let gw = gateway_falling_back("resetting", extra).await;
    assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    let (_, calls) = attempts(&gw).await;
    // The upstream may have started work: asking it again could bill twice.
    assert_eq!(calls, pairs(&[("resetting", "upstream_unreachable"), ("cloud", "ok")]));
}

#[tokio::test]
async fn connection_reset_mid_stream_ends_with_an_sse_error() {
    let gw = gateway_falling_back("cut", String::new()).await;
    let r = gw.post_chat(&streamed("tiergate-auto")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cut", "already streaming: no fallback");
    let text = r.text().await.expect("body");
    assert!(text.contains(PIECES[0]), "what came before the cut is relayed: {text}");
    assert_stream_error(&text, "upstream_error");
    let (row, calls) = attempts(&gw).await;
    assert_eq!(
        (row.outcome.as_str(), row.streamed, row.fallback),
        ("upstream_error", true, false)
    );
    assert!(calls.is_empty());
    assert_eq!(gw.fake.calls("fake-cloud"), 0);
}

#[tokio::test]
async fn malformed_sse_mid_stream_ends_with_an_sse_error() {
    let gw = gateway().await;
    let text = gw
        .post_chat(&streamed("fake-malformed"))
        .await
        .text()
        .await
        .expect("body");
    let e = assert_stream_error(&text, "upstream_error");
    assert!(
        e["error"]["message"].as_str().is_some_and(|m| m.contains("malformed")),
        "{e}"
    );
    assert!(!text.contains(PIECES[1]), "nothing after the bad event: {text}");
    assert_eq!(gw.ledger_rows(1).await[0].outcome, "upstream_error");
}

#[tokio::test]
async fn named_keep_alive_events_are_not_relayed_as_chunks() {
    let gw = gateway().await;
    let text = gw.post_chat(&streamed("fake-pings")).await.text().await.expect("body");
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(!payloads.iter().any(|p| p == "{}"), "a ping passed as a chunk: {text}");
    let content: String = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(content, PIECES.concat());
    assert_eq!(gw.ledger_rows(1).await[0].outcome, "ok");
}

#[tokio::test]
async fn a_whole_answer_that_is_no_chat_completion_is_a_502() {
    let gw = gateway().await;
    let r = gw.post_chat(&user("fake-malformed", "hi")).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "upstream_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a chat completion")),
        "{e}"
    );
    assert_eq!(gw.ledger_rows(1).await[0].outcome, "upstream_error");
}

#[tokio::test]
async fn a_slow_drip_is_cut_at_the_total_timeout() {
    let gw = gateway().await;
    let text = gw.post_chat(&streamed("fake-drip")).await.text().await.expect("body");
    assert!(text.contains("drip"), "{text}");
    let e = assert_stream_error(&text, "upstream_timeout");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("total timeout of 0.5s"))
    );
    let row = &gw.ledger_rows(1).await[0];
    assert_eq!((row.outcome.as_str(), row.http_status), ("upstream_timeout", 200));
    assert!(
        row.completion_tokens > 0 && row.tokens_estimated,
        "what was relayed is accounted: {row:?}"
    );
}

#[tokio::test]
async fn a_never_ending_stream_is_cut_at_the_total_timeout() {
    let gw = gateway().await;
    let text = gw
        .post_chat(&streamed("fake-endless-short"))
        .await
        .text()
        .await
        .expect("body");
    assert!(text.contains("more"), "{text}");
    assert_stream_error(&text, "upstream_timeout");
    assert_eq!(gw.ledger_rows(1).await[0].outcome, "upstream_timeout");
}

#[tokio::test]
async fn the_fallback_chain_is_tried_in_order_each_tier_with_its_retries() {
    let policy = "[[rules]]\nname = \"primary\"\ntier = \"late\"\nfallback = [\"broken\", \"cloud\"]\n";
    let gw = gateway_with(&Setup {
        policy: Some(policy.to_owned()),
        ..Setup::default()
    })
    .await;
    assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    let (row, calls) = attempts(&gw).await;
    assert!(row.fallback);
    let broken = ("broken", "upstream_error");
    assert_eq!(
        calls,
        pairs(&[("late", "upstream_timeout"), broken, broken, broken, ("cloud", "ok")])
    );
    assert_eq!(row.rule.as_deref(), Some("primary"));
}

#[tokio::test]
async fn a_tier_without_its_api_key_is_passed_over_in_the_fallback_chain() {
    let with_chain = |fallback: &str| Setup {
        policy: Some(format!(
            "[[rules]]\nname = \"primary\"\ntier = \"down\"\nfallback = {fallback}\n"
        )),
        extra: common::keyless_tier_toml("keyless"),
        ..Setup::default()
    };

    let gw = gateway_with(&with_chain("[\"keyless\", \"cloud\"]")).await;
    let route = gw.post_json("/v1/route", &user("tiergate-auto", "hi")).await;
    assert_eq!(route["fallback"], json!(["keyless", "cloud"]));
    let notes = route["notes"].to_string();
    assert!(
        notes.contains("tier `keyless` cannot be called") && notes.contains("passed over"),
        "{notes}"
    );
    assert_fell_back_to_cloud(gw.post_chat(&user("tiergate-auto", "hi")).await).await;
    let (row, calls) = attempts(&gw).await;
    assert!(row.fallback);
    assert_eq!(calls, pairs(&[("down", "upstream_error"), ("cloud", "ok")]));

    // With nothing else to try, the client hears why the routed tier failed, not the
    // keyless tier's 503.
    let gw = gateway_with(&with_chain("[\"keyless\"]")).await;
    let r = gw.post_chat(&user("tiergate-auto", "hi")).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "down");
    assert_error(r, 502, "upstream_error").await;
    let (row, _) = attempts(&gw).await;
    assert_eq!(
        (row.tier.as_deref(), row.outcome.as_str()),
        (Some("down"), "upstream_error")
    );
    assert!(!row.fallback, "nothing else was tried");
}

/// An address that accepts nothing: its accept queue is full, so new connections stall in
/// the handshake (the kernel drops their SYNs) until the client's connect timeout.
async fn stalled_addr() -> (SocketAddr, Vec<std::net::TcpStream>, tokio::net::TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(100)) {
            held.push(s);
        }
    }
    (addr, held, listener)
}

#[tokio::test]
async fn a_connect_timeout_is_named_as_such() {
    let (addr, _held, _listener) = stalled_addr().await;
    let extra = common::tier_toml(
        "stalled",
        "fake-stalled",
        &format!("http://{addr}/v1"),
        "connect_timeout_secs = 0.3\nmax_retries = 0",
    );
    let gw = gateway_with(&Setup {
        policy: Some("[[rules]]\nname = \"primary\"\ntier = \"stalled\"\n".to_owned()),
        extra,
        ..Setup::default()
    })
    .await;
    let body = assert_error(
        gw.post_chat(&user("tiergate-auto", "hi")).await,
        504,
        "upstream_timeout",
    )
    .await;
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("connect timeout of 0.3s"), "{msg}");
}
