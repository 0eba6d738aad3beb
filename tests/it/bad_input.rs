//! Hostile and odd requests, one table: each gets a 4xx in OpenAI's envelope with a
//! message that says what is wrong (or a 200 when it is odd but valid), never a 5xx, and
//! each leaves a ledger row.

use serde_json::Value;

use crate::common::{Gateway, Setup, gateway_with};

const JSON: Option<&str> = Some("application/json");

/// (what, content type, body, status, error code, the message says).
type Case = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
    &'static str,
);

fn s(v: &str) -> Vec<u8> {
    v.as_bytes().to_vec()
}

fn cases() -> Vec<Case> {
    let msgs = |n: usize| {
        let one = r#"{"role": "user", "content": "hi"}"#;
        format!(
            r#"{{"model": "tiergate-auto", "messages": [{}]}}"#,
            vec![one; n].join(",")
        )
        .into_bytes()
    };
    vec![
        (
            "emoji",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "🙂🚀 ünïcödé"}]}"#),
            200,
            "",
            "",
        ),
        (
            "right-to-left",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "مرحبا \u202e עולם"}]}"#),
            200,
            "",
            "",
        ),
        (
            "NUL in content",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "a\u0000b"}]}"#),
            200,
            "",
            "",
        ),
        (
            "empty content",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": ""}]}"#),
            200,
            "",
            "",
        ),
        (
            // Read as U+FFFD: JavaScript writes it for a string cut mid-emoji.
            "lone surrogate",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "\ud800"}]}"#),
            200,
            "",
            "",
        ),
        (
            "invalid UTF-8",
            JSON,
            [
                &b"{\"model\": \"tiergate-auto\", \"messages\": [{\"role\": \"user\", \"content\": \""[..],
                b"\xff\xfe",
                b"\"}]}",
            ]
            .concat(),
            400,
            "invalid_json",
            "not valid JSON",
        ),
        ("empty body", JSON, s(""), 400, "invalid_json", "not valid JSON"),
        (
            "empty model",
            JSON,
            s(r#"{"model": "", "messages": [{"role": "user", "content": "hi"}]}"#),
            404,
            "model_not_found",
            "does not exist",
        ),
        (
            "messages null",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": null}"#),
            400,
            "invalid_request",
            "`messages`",
        ),
        (
            "stream_options without stream",
            JSON,
            s(
                r#"{"model": "tiergate-auto", "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}"#,
            ),
            400,
            "invalid_request",
            "only allowed when 'stream' is enabled",
        ),
        (
            "empty stop sequence",
            JSON,
            s(r#"{"model": "tiergate-auto", "stop": [""], "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`stop` must not contain an empty string",
        ),
        (
            "model null",
            JSON,
            s(r#"{"model": null, "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`model`",
        ),
        (
            "user content null",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": null}]}"#),
            400,
            "invalid_request",
            "required for a `user` message",
        ),
        (
            "role null",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": null, "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`messages[0].role` must be a string",
        ),
        (
            "max_tokens 1e400",
            JSON,
            s(r#"{"model": "tiergate-auto", "max_tokens": 1e400, "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_json",
            "number out of range",
        ),
        (
            "max_tokens negative",
            JSON,
            s(r#"{"model": "tiergate-auto", "max_tokens": -5, "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`max_tokens` must be a positive integer",
        ),
        (
            "max_tokens 2^64",
            JSON,
            s(
                r#"{"model": "tiergate-auto", "max_tokens": 18446744073709551616, "messages": [{"role": "user", "content": "hi"}]}"#,
            ),
            400,
            "invalid_request",
            "`max_tokens` must be a positive integer",
        ),
        (
            "max_tokens over the ceiling",
            JSON,
            s(r#"{"model": "tiergate-auto", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "limit_exceeded",
            "`limits.max_tokens` = 4096",
        ),
        (
            "temperature 1e308",
            JSON,
            s(r#"{"model": "tiergate-auto", "temperature": 1e308, "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`temperature` must be a number in 0..=2",
        ),
        (
            "temperature string",
            JSON,
            s(r#"{"model": "tiergate-auto", "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`temperature`",
        ),
        (
            "duplicate model key",
            JSON,
            s(r#"{"model": "fake-cloud", "model": "tiergate-auto", "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_json",
            "duplicate key `model`",
        ),
        (
            "text/plain",
            Some("text/plain"),
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "unsupported_content_type",
            "`content-type` is `text/plain`",
        ),
        (
            "form-encoded",
            Some("application/x-www-form-urlencoded"),
            s("model=tiergate-auto&messages=hi"),
            400,
            "unsupported_content_type",
            "application/json",
        ),
        (
            "no content type",
            None,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "unsupported_content_type",
            "no `content-type`",
        ),
        (
            "not JSON",
            JSON,
            s("hello there"),
            400,
            "invalid_json",
            "not valid JSON",
        ),
        (
            "truncated JSON",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "us"#),
            400,
            "invalid_json",
            "EOF",
        ),
        (
            "array body",
            JSON,
            s(r#"[{"model": "tiergate-auto"}]"#),
            400,
            "invalid_request",
            "must be a JSON object",
        ),
        (
            "messages an object",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": {"role": "user", "content": "hi"}}"#),
            400,
            "invalid_request",
            "`messages` must be an array",
        ),
        (
            "message an array",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [["user", "hi"]]}"#),
            400,
            "invalid_request",
            "`messages[0]` must be an object",
        ),
        (
            "content a number",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": 42}]}"#),
            400,
            "invalid_request",
            "`messages[0].content` must be a string",
        ),
        (
            "unknown role",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": [{"role": "wizard", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`wizard` is not a role",
        ),
        (
            "empty messages",
            JSON,
            s(r#"{"model": "tiergate-auto", "messages": []}"#),
            400,
            "invalid_request",
            "at least one message",
        ),
        (
            "stream a string",
            JSON,
            s(r#"{"model": "tiergate-auto", "stream": "yes", "messages": [{"role": "user", "content": "hi"}]}"#),
            400,
            "invalid_request",
            "`stream` must be a boolean",
        ),
        (
            "deep nesting",
            JSON,
            format!(
                r#"{{"model": "tiergate-auto", "messages": [{{"role": "user", "content": "hi", "x": {}{}}}]}}"#,
                "[".repeat(5000),
                "]".repeat(5000)
            )
            .into_bytes(),
            400,
            "invalid_json",
            "recursion limit",
        ),
        (
            "too many messages",
            JSON,
            msgs(9),
            400,
            "limit_exceeded",
            "`messages` has 9 entries; the limit is `limits.max_messages` = 8",
        ),
        (
            "message too long",
            JSON,
            format!(
                r#"{{"model": "tiergate-auto", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
                "x".repeat(1001)
            )
            .into_bytes(),
            400,
            "limit_exceeded",
            "`limits.max_message_chars` = 1000",
        ),
        (
            "body too large",
            JSON,
            format!(
                r#"{{"model": "tiergate-auto", "messages": [], "pad": "{}"}}"#,
                "x".repeat(20_000)
            )
            .into_bytes(),
            413,
            "body_too_large",
            "`limits.max_body_bytes`",
        ),
    ]
}

#[tokio::test]
async fn every_bad_input_gets_a_named_4xx_and_a_ledger_row() {
    let gw = gateway_with(&Setup {
        extra: "[limits]\nmax_body_bytes = 16384\nmax_messages = 8\nmax_message_chars = 1000\nmax_tokens = 4096\nmax_header_bytes = 4096\n".into(),
        ..Setup::default()
    })
    .await;
    let cases = cases();
    for (what, ct, body, status, code, says) in &cases {
        let mut r = gw
            .client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .body(body.clone());
        if let Some(ct) = ct {
            r = r.header("content-type", *ct);
        }
        let r = r.send().await.expect("gateway answers");
        assert_eq!(r.status().as_u16(), *status, "{what}");
        let answer: Value = r.json().await.unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        if *status == 200 {
            continue;
        }
        let err = &answer["error"];
        assert_eq!(err["code"], *code, "{what}: {answer}");
        assert!(
            err["type"].is_string() && err.get("param").is_some(),
            "{what}: the envelope: {answer}"
        );
        let message = err["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");
    }
    // Too many header bytes: refused by name, and accounted too.
    let r = gw
        .client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-padding", "y".repeat(5000))
        .json(&crate::common::user("tiergate-auto", "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 431);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "headers_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`limits.max_header_bytes`"))
    );

    let rows = gw.ledger_rows(cases.len() + 1).await;
    assert_eq!(rows.len(), cases.len() + 1, "one row per request");
    for ((what, _, _, status, code, _), row) in cases.iter().zip(&rows) {
        assert_eq!(row.http_status, *status, "{what}");
        assert_eq!(row.outcome, if *status == 200 { "ok" } else { code }, "{what}");
    }
    assert_eq!(rows.last().map(|r| r.outcome.as_str()), Some("headers_too_large"));
}

#[tokio::test]
async fn the_route_endpoint_refuses_the_same_inputs() {
    let gw = gateway_with(&Setup::default()).await;
    let r = gw
        .client()
        .post(format!("{}/v1/route", gw.url))
        .header("content-type", "text/plain")
        .body(r#"{"model": "tiergate-auto", "messages": [{"role": "user", "content": "hi"}]}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unsupported_content_type");
}

#[tokio::test]
async fn a_wrong_method_gets_a_405_envelope_with_allow() {
    let gw = gateway_with(&Setup::default()).await;
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/chat/completions", "POST"),
        (reqwest::Method::DELETE, "/report.json", "GET,HEAD"),
        (reqwest::Method::POST, "/v1/models", "GET,HEAD"),
    ] {
        let r = gw
            .client()
            .request(method.clone(), format!("{}{path}", gw.url))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let body: Value = r.json().await.expect("an OpenAI error envelope");
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            body["error"]["message"],
            format!("Invalid method for URL ({method} {path})")
        );
    }
}

/// Sends raw request `head` (and `body`) and reads the whole answer until the gateway
/// closes the connection or `wait` passes.
async fn raw_exchange(gw: &Gateway, head: &str, body: &[u8], wait: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{head}host: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
        gw.key
    );
    conn.write_all(request.as_bytes()).await.expect("send head");
    conn.write_all(body).await.expect("send body");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, conn.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_body_too_large_by_its_length_or_too_slow_is_refused_and_a_client_leaving_mid_body_is_recorded() {
    let gw = gateway_with(&Setup {
        extra: "[limits]\nmax_body_bytes = 16384\nbody_timeout_secs = 0.5\n".into(),
        ..Setup::default()
    })
    .await;
    let patience = std::time::Duration::from_secs(30);
    // Declared over the limit: refused before a byte of it is read.
    let answer = raw_exchange(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n",
        b"",
        patience,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"body_too_large\""), "{answer}");
    // A body that stops coming: 408 once `body_timeout_secs` has passed.
    let answer = raw_exchange(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 100\r\n",
        b"{",
        patience,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("\"request_timeout\"") && answer.contains("`limits.body_timeout_secs`"),
        "{answer}"
    );
    // A client that leaves halfway through its body.
    let left = raw_exchange(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 100\r\n",
        b"{",
        std::time::Duration::from_millis(100),
    )
    .await;
    assert_eq!(left, "", "nothing was answered yet");
    let rows = gw.ledger_rows(3).await;
    let outcomes: Vec<(&str, u16)> = rows.iter().map(|r| (r.outcome.as_str(), r.http_status)).collect();
    assert_eq!(
        outcomes,
        [
            ("body_too_large", 413),
            ("request_timeout", 408),
            ("client_disconnected", 499)
        ]
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = gateway_with(&Setup {
        extra: "[limits]\nheader_timeout_secs = 0.5\n".into(),
        ..Setup::default()
    })
    .await;
    let addr = gw.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("send half a head");
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), conn.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "the gateway still holds the connection");
    assert!(answer.is_empty(), "no request, no answer: {answer:?}");
    // Whole requests are unaffected.
    let r = gw.post_chat(&crate::common::user("tiergate-auto", "hi")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_compressed_body_is_refused_by_name() {
    let gw = gateway_with(&Setup::default()).await;
    let body = crate::common::user("tiergate-auto", "hi").to_string();
    for (encoding, status) in [("gzip", 400), ("identity", 200)] {
        let r = gw
            .client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), status, "{encoding}");
        if status == 400 {
            let e: Value = r.json().await.expect("json");
            assert_eq!(e["error"]["code"], "unsupported_content_encoding", "{e}");
            assert!(
                e["error"]["message"].as_str().is_some_and(|m| m.contains("`gzip`")),
                "{e}"
            );
        }
    }
}
