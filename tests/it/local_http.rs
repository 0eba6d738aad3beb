//! The `local` tier through the gateway over HTTP with the real test model: OpenAI shapes
//! (whole and streamed), exact usage in the ledger, 400s, saturation (429 or spill) and
//! escalation of weak answers (whole, and streamed by holding back a prefix).

use futures::StreamExt;
use serde_json::{Value, json};

use crate::common::{Gateway, PIECES, Setup, gateway_with, header, keyless_tier_toml, sse_payloads, user};
use crate::local::{TEST_MODEL, model_dir};

pub(crate) fn local_tier(max_concurrent: usize, queue_capacity: usize) -> String {
    format!(
        r#"
[tiers.local]
backend = "local"
model = "{TEST_MODEL}"
model_dir = "{dir}"
threads = 2
max_concurrent = {max_concurrent}
queue_capacity = {queue_capacity}
default_max_tokens = 48
input_usd_per_mtok = 0.05
output_usd_per_mtok = 0.1
"#,
        dir = model_dir().display()
    )
}

/// A gateway with a local tier beside the fake upstream's tiers.
async fn local_gateway(max_concurrent: usize, queue_capacity: usize, policy: Option<String>) -> Gateway {
    gateway_with(&Setup {
        extra: local_tier(max_concurrent, queue_capacity),
        policy,
        ..Setup::default()
    })
    .await
}

fn policy(then: &str) -> String {
    format!(
        "[[rules]]\nname = \"local-first\"\nscore_below = 0.9\ntier = \"local\"\n{then}\n[[rules]]\nname = \"default\"\ntier = \"cloud\"\n"
    )
}

const PROMPT: &str = "What is the capital of France?";

/// Asks the one-slot local tier until it answers (bounded): whether an earlier request's
/// sequence released the slot.
async fn slot_frees(gw: &Gateway) -> bool {
    for _ in 0..200 {
        if gw.post_chat(&user(TEST_MODEL, PROMPT)).await.status() == 200 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
const ANSWER: &str = "The capital of France is Paris.";

#[tokio::test]
async fn answers_with_the_clouds_shapes_and_exact_usage() {
    let gw = local_gateway(2, 4, None).await;
    let r = gw.post_chat(&user(TEST_MODEL, PROMPT)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "local");
    assert_eq!(header(&r, "content-type"), "application/json");
    let confidence: f64 = header(&r, "x-tiergate-confidence").parse().expect("confidence header");
    assert!((0.0..=1.0).contains(&confidence));
    let body: Value = r.json().await.expect("json");
    let metrics = gw.get_text("/metrics").await;
    // The engine may still be retiring the finished sequence: 0 or 1, never more.
    let depth = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tiergate_local_queue_depth{tier=\"local\"} "));
    assert!(matches!(depth, Some("0" | "1")), "{metrics}");
    // The engine's totals: this answer's exact counts (it sent them before it was done).
    let total = |series: &str| -> u64 {
        let prefix = format!("tiergate_local_{series} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in {metrics}"))
    };
    assert_eq!(total("prompt_tokens_total{tier=\"local\"}"), 37);
    assert_eq!(total("generated_tokens_total{tier=\"local\"}"), 8);
    // Every pass after the prompt's yields at least one token; drafts only ever save passes.
    let steps = total("decode_steps_total{tier=\"local\"}");
    assert!((1..=7).contains(&steps), "{metrics}");
    let mut drafted_right = 0;
    for source in ["lookup", "head"] {
        let drafted = total(&format!("draft_tokens_total{{tier=\"local\",source=\"{source}\"}}"));
        let accepted = total(&format!(
            "draft_accepted_tokens_total{{tier=\"local\",source=\"{source}\"}}"
        ));
        assert!(accepted <= drafted, "{metrics}");
        drafted_right += accepted;
    }
    // One token from the prompt's pass, one from each later pass, one per confirmed draft.
    assert_eq!(1 + steps + drafted_right, 8, "{metrics}");
    assert!(
        body["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")),
        "{body}"
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], TEST_MODEL);
    assert!(body["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], ANSWER);
    assert_eq!(choice["finish_reason"], "stop");
    // 37 prompt tokens and 8 generated (the stop token included), as in the reference.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45})
    );
    let rows = gw.ledger().await;
    let row = &rows[0];
    assert_eq!((row.prompt_tokens, row.completion_tokens), (37, 8));
    assert!(!row.tokens_estimated);
    assert_eq!(row.tier.as_deref(), Some("local"));
    assert!((row.cost_usd - (37.0 * 0.05 + 8.0 * 0.1) / 1e6).abs() < 1e-15);
    assert!(row.attempts.is_empty(), "one call, no attempts list");

    // Over the model's context window: OpenAI's 400, in its envelope.
    let r = gw.post_chat(&user(TEST_MODEL, &"hello ".repeat(9000))).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "messages");
    let r = gw.post_chat(&user(TEST_MODEL, " \n")).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "empty_prompt");
}

#[tokio::test]
async fn streams_chunks_shaped_like_openais() {
    let gw = local_gateway(2, 4, None).await;
    let mut req = user(TEST_MODEL, PROMPT);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = gw.post_chat(&req).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let body = r.text().await.expect("body");
    let events = sse_payloads(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let id = chunks[0]["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id, "one id for the whole stream");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], TEST_MODEL);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // Every chunk but the last carries `usage: null`, as OpenAI's do when usage is asked for.
    let (usage_chunk, rest) = chunks.split_last().expect("chunks");
    assert!(rest.iter().all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45})
    );
    let finish = &rest[rest.len() - 1]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    assert_eq!(finish["delta"], json!({}));
    let text: String = rest
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, ANSWER);
    assert!(
        rest.iter()
            .filter(|c| c["choices"][0]["finish_reason"].is_string())
            .count()
            == 1
    );

    // Without include_usage: no usage chunk, no usage field.
    req["stream_options"] = json!(null);
    let body = gw.post_chat(&req).await.text().await.expect("body");
    let events = sse_payloads(&body);
    assert!(events.iter().all(|e| !e.contains("\"usage\"")), "{body}");
    let rows = gw.ledger_rows(2).await;
    assert!(
        rows.iter()
            .all(|r| r.streamed && (r.prompt_tokens, r.completion_tokens) == (37, 8))
    );
}

#[tokio::test]
async fn saturation_is_a_429_or_a_spill_as_the_policy_says() {
    let gw = local_gateway(1, 0, Some(policy("on_saturated = \"cloud\""))).await;
    // Occupy the one sequence slot with a long answer, and wait until it is generating.
    let mut long = user(TEST_MODEL, "Tell me a long story.");
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    long["max_tokens"] = json!(4000);
    let busy = gw.post_chat(&long).await;
    assert_eq!(busy.status(), 200);
    let mut busy = busy.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 2 {
        let chunk = busy.next().await.expect("stream goes on").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }

    // Named directly, the saturated tier answers 429 in OpenAI's envelope.
    let r = gw.post_chat(&user(TEST_MODEL, PROMPT)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "1");
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "tier_saturated");
    assert_eq!(e["error"]["type"], "rate_limit_error");

    // Routed by the policy, it spills to the cloud tier.
    let r = gw.post_chat(&user("tiergate-auto", PROMPT)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    assert_eq!(header(&r, "x-tiergate-rule"), "local-first");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], PIECES.concat());

    let rows = gw.ledger_rows(2).await;
    let rejected = rows.iter().find(|r| r.http_status == 429).expect("429 row");
    assert_eq!(rejected.outcome, "tier_saturated");
    let spilled = rows.iter().find(|r| r.http_status == 200).expect("spill row");
    assert!(spilled.fallback && !spilled.escalated);
    assert_eq!(spilled.tier.as_deref(), Some("cloud"));
    let outcomes: Vec<(&str, &str)> = spilled
        .attempts
        .iter()
        .map(|a| (a.tier.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, [("local", "saturated"), ("cloud", "ok")]);
    assert_eq!(spilled.attempts[0].cost_usd, 0.0);

    // The client of the long answer leaves: its sequence is cancelled and the slot frees.
    drop(busy);
    assert!(slot_frees(&gw).await, "the cancelled sequence released its slot");
}

/// A request whose answer runs far longer than any test waits.
fn endless_story() -> Value {
    let mut long = user(TEST_MODEL, "Tell me a long story.");
    long["ignore_eos"] = json!(true);
    long["max_tokens"] = json!(4000);
    long
}

#[tokio::test]
async fn a_client_leaving_a_whole_local_answer_stops_its_generation() {
    let gw = local_gateway(1, 0, None).await;
    let conn = gw.send_and_hold(&endless_story()).await;
    let busy = "tiergate_local_queue_depth{tier=\"local\"} 1";
    let mut seen = String::new();
    for _ in 0..400 {
        seen = gw.get_text("/metrics").await;
        if seen.contains(busy) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(seen.contains(busy), "the long answer is generating: {seen}");
    // Time for its prefill and some tokens (SmolLM2 makes ~100 a second here).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    // Unlike a remote tier's call, the generation is for nobody once the client has gone.
    drop(conn);
    assert!(slot_frees(&gw).await, "the abandoned sequence released its slot");
    let rows = gw.ledger_rows(2).await;
    let left = rows
        .iter()
        .find(|r| r.outcome == "client_disconnected")
        .unwrap_or_else(|| panic!("the abandoned request's row: {rows:?}"));
    assert_eq!(left.http_status, 499);
    // The engine did work for it, as for a stream cut off: its own counts and its cost.
    assert!(
        left.completion_tokens >= 1 && left.completion_tokens < 4000 && !left.tokens_estimated,
        "the engine's counts so far: {left:?}"
    );
    assert!(left.prompt_tokens > 0 && left.cost_usd > 0.0, "{left:?}");
}

#[tokio::test]
async fn a_local_stream_cut_off_by_its_client_records_the_tokens_it_used_exactly() {
    let gw = local_gateway(1, 0, None).await;
    let mut long = endless_story();
    long["stream"] = json!(true);
    let r = gw.post_chat(&long).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut pieces = 0;
    while let Some(b) = body.next().await {
        pieces += String::from_utf8_lossy(&b.expect("chunk"))
            .matches("\"content\"")
            .count();
        if pieces > 8 {
            break;
        }
    }
    drop(body);
    let rows = gw.ledger_rows(1).await;
    let row = &rows[0];
    assert_eq!(row.outcome, "client_disconnected", "{row:?}");
    assert!(row.streamed);
    assert!(
        row.completion_tokens >= 8 && row.completion_tokens < 4000 && !row.tokens_estimated,
        "the engine's own counts, not an estimate from the text: {row:?}"
    );
    assert!(row.prompt_tokens > 0 && row.cost_usd > 0.0, "{row:?}");
    assert!(
        slot_frees(&gw).await,
        "the abandoned stream's sequence released its slot"
    );
}

#[tokio::test]
async fn a_weak_local_answer_is_escalated_and_both_attempts_are_accounted() {
    // A threshold no answer reaches, so the local answer is always judged weak. Without
    // stickiness, so that the second request (same conversation) tries the local tier again.
    let p = format!(
        "stickiness = false\n{}",
        policy("min_confidence = 1.0\nescalate_to = \"cloud\"")
    );
    let gw = local_gateway(2, 4, Some(p)).await;
    let r = gw.post_chat(&user("tiergate-auto", PROMPT)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], PIECES.concat());

    let rows = gw.ledger().await;
    let row = &rows[0];
    assert!(row.escalated && !row.fallback);
    assert_eq!(row.tier.as_deref(), Some("cloud"));
    let [local, cloud] = &row.attempts[..] else {
        panic!("two attempts: {:?}", row.attempts);
    };
    assert_eq!(
        (local.tier.as_str(), local.outcome.as_str()),
        ("local", "low_confidence")
    );
    assert_eq!((local.prompt_tokens, local.completion_tokens), (37, 8));
    let c = local.confidence.expect("local confidence recorded");
    assert!((0.0..1.0).contains(&c), "{c}");
    assert!((local.cost_usd - (37.0 * 0.05 + 8.0 * 0.1) / 1e6).abs() < 1e-15);
    assert_eq!((cloud.tier.as_str(), cloud.outcome.as_str()), ("cloud", "ok"));
    assert!((cloud.cost_usd - (11.0 * 2.5 + 4.0 * 10.0) / 1e6).abs() < 1e-15);
    assert!((row.cost_usd - (local.cost_usd + cloud.cost_usd)).abs() < 1e-15);
    // The cloud was asked the client's request, not the local tier's model name.
    let sent = gw.fake.requests.lock().expect("lock")[0].1.clone();
    assert_eq!(sent["model"], "fake-cloud");
}

#[tokio::test]
async fn route_and_explain_show_a_local_rules_escalation() {
    let gw = local_gateway(2, 4, Some(policy("min_confidence = 0.3\nescalate_to = \"cloud\""))).await;
    let e = gw.post_json("/v1/route", &user("tiergate-auto", PROMPT)).await;
    assert_eq!(
        (&e["rule"], &e["tier"]),
        (&json!("local-first"), &json!("local")),
        "{e}"
    );
    assert_eq!(
        (&e["escalate_to"], &e["min_confidence"]),
        (&json!("cloud"), &json!(0.3))
    );
    // The CLI prints the same plan from the gateway's config file, without calling a model.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["explain", "--config"])
        .arg(&gw.config_path)
        .arg(PROMPT)
        .output()
        .expect("run tiergate explain");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        s.contains("escalate  to cloud when the answer's confidence is below 0.3\n"),
        "{s}"
    );
}

/// A streamed request: its parsed chunks before `[DONE]` (which must end the body).
async fn stream_chunks(gw: &Gateway, model: &str) -> (reqwest::header::HeaderMap, Vec<Value>) {
    let mut req = user(model, PROMPT);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = gw.post_chat(&req).await;
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.text().await.expect("body");
    let events = sse_payloads(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1, "{body}");
    let chunks = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("chunk json: {e}")))
        .collect();
    (headers, chunks)
}

/// What a client reads from chunks: one id, one role chunk (the first), the text, the
/// finish reason and the usage (last chunk).
fn read_stream(chunks: &[Value]) -> (String, String, Value) {
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| c["id"] == *id), "one id: {chunks:?}");
    let roles: Vec<usize> = (0..chunks.len())
        .filter(|&i| chunks[i]["choices"][0]["delta"].get("role").is_some())
        .collect();
    assert_eq!(roles, [0], "one role chunk, first: {chunks:?}");
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    let [finish] = finish[..] else {
        panic!("one finish reason: {chunks:?}")
    };
    let (last, _) = chunks.split_last().expect("chunks");
    assert_eq!(last["choices"], json!([]), "usage chunk last: {chunks:?}");
    (text, finish.to_owned(), last["usage"].clone())
}

#[tokio::test]
async fn a_weak_streamed_local_answer_is_replaced_by_the_escalation_tiers_stream() {
    // A threshold no answer reaches. `hold_tokens = 3` judges the answer (8 tokens) on its
    // first 3 and cancels the rest; 16 judges it whole.
    for (hold, judged) in [("hold_tokens = 3", 3), ("hold_tokens = 16", 8)] {
        let p = format!(
            "stickiness = false\n{}",
            policy(&format!("min_confidence = 1.0\nescalate_to = \"cloud\"\n{hold}"))
        );
        let gw = local_gateway(2, 4, Some(p)).await;
        let (h, chunks) = stream_chunks(&gw, "tiergate-auto").await;
        assert_eq!(h["x-tiergate-tier"], "cloud");
        assert_eq!(h["x-tiergate-rule"], "local-first");
        assert_eq!(h["x-tiergate-escalated"], "true");
        assert!(h.get("x-tiergate-confidence").is_none(), "the cloud answered");
        // Exactly the fake cloud's stream: nothing of the abandoned local answer.
        let (text, finish, usage) = read_stream(&chunks);
        assert_eq!((text.as_str(), finish.as_str()), (PIECES.concat().as_str(), "stop"));
        assert_eq!(
            usage,
            json!({"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15})
        );
        assert!(
            chunks
                .iter()
                .all(|c| c["id"] == "chatcmpl-fake" && c["model"] == "fake-cloud"),
            "{chunks:?}"
        );

        let rows = gw.ledger().await;
        let row = &rows[0];
        assert!(row.streamed && row.escalated && !row.fallback, "{row:?}");
        assert_eq!((row.tier.as_deref(), row.outcome.as_str()), (Some("cloud"), "ok"));
        assert_eq!((row.prompt_tokens, row.completion_tokens), (11, 4));
        let [local, cloud] = &row.attempts[..] else {
            panic!("two attempts: {:?}", row.attempts);
        };
        assert_eq!(
            (local.tier.as_str(), local.outcome.as_str()),
            ("local", "low_confidence")
        );
        assert_eq!((local.prompt_tokens, local.completion_tokens), (37, judged), "{hold}");
        let c = local.confidence.expect("local confidence recorded");
        assert!((0.0..1.0).contains(&c), "{c}");
        assert!((local.cost_usd - (37.0 * 0.05 + judged as f64 * 0.1) / 1e6).abs() < 1e-15);
        assert_eq!((cloud.tier.as_str(), cloud.outcome.as_str()), ("cloud", "ok"));
        assert!((cloud.cost_usd - (11.0 * 2.5 + 4.0 * 10.0) / 1e6).abs() < 1e-15);
        assert!((row.cost_usd - (local.cost_usd + cloud.cost_usd)).abs() < 1e-15);
        let sent = gw.fake.requests.lock().expect("lock")[0].1.clone();
        assert_eq!((&sent["model"], &sent["stream"]), (&json!("fake-cloud"), &json!(true)));
    }
}

#[tokio::test]
async fn an_escalated_stream_cancels_the_local_generation_and_frees_its_slot() {
    // One sequence slot, no queue. The local answer would run for thousands of tokens; it
    // is judged weak after 3 and the cloud answers instead.
    let p = policy("min_confidence = 1.0\nescalate_to = \"cloud\"\nhold_tokens = 3");
    let gw = local_gateway(1, 0, Some(p)).await;
    let mut long = user("tiergate-auto", "Tell me a long story.");
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    long["max_tokens"] = json!(4000);
    let r = gw.post_chat(&long).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let body = r.text().await.expect("body");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    // The slot is released at the engine's next step, not when 4000 tokens are done.
    assert!(slot_frees(&gw).await, "the abandoned sequence released its slot");
    let rows = gw.ledger_rows(2).await;
    let escalated = rows.iter().find(|r| r.escalated).expect("escalated row");
    assert_eq!(escalated.attempts[0].completion_tokens, 3);
}

#[tokio::test]
async fn a_confident_streamed_local_answer_is_held_then_sent_unchanged() {
    // No confidence is below 0: the held prefix is always kept. `hold_tokens = 3` keeps a
    // prefix and streams the rest; `hold_tokens = 0` (the default) does not hold (nor
    // escalate) at all.
    for hold in ["hold_tokens = 3", "hold_tokens = 16", "", "hold_tokens = 0"] {
        let p = policy(&format!("min_confidence = 0.0\nescalate_to = \"cloud\"\n{hold}"));
        let gw = local_gateway(2, 4, Some(p)).await;
        // Named by its model, the local tier streams without a rule's escalation.
        let (_, plain) = stream_chunks(&gw, TEST_MODEL).await;
        let (h, held) = stream_chunks(&gw, "tiergate-auto").await;
        assert_eq!(h["x-tiergate-tier"], "local");
        assert!(h.get("x-tiergate-escalated").is_none());
        let confidence = h.get("x-tiergate-confidence").map(|v| v.to_str().expect("ascii"));
        assert_eq!(
            confidence.is_some(),
            !(hold.is_empty() || hold.ends_with('0')),
            "{hold}: judged prefix"
        );
        let read = read_stream(&held);
        assert_eq!(read, read_stream(&plain), "{hold}");
        assert_eq!(read.0, ANSWER);
        assert_eq!(
            read.2,
            json!({"prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45})
        );
        // Chunk for chunk the same stream (but for its id and time).
        let strip = |cs: &[Value]| -> Vec<Value> { cs.iter().map(|c| c["choices"].clone()).collect() };
        assert_eq!(strip(&held), strip(&plain), "{hold}");
        assert!(
            gw.fake.requests.lock().expect("lock").is_empty(),
            "the cloud was not asked"
        );
        let rows = gw.ledger_rows(2).await;
        let row = rows
            .iter()
            .find(|r| r.rule.as_deref() == Some("local-first"))
            .expect("row");
        assert!(!row.escalated && row.attempts.is_empty(), "{row:?}");
        assert_eq!(
            (row.outcome.as_str(), row.prompt_tokens, row.completion_tokens),
            ("ok", 37, 8)
        );
    }
}

#[tokio::test]
async fn when_a_streams_escalation_fails_the_held_local_answer_is_streamed_whole() {
    let p = policy("min_confidence = 1.0\nescalate_to = \"broken\"\nhold_tokens = 3");
    let gw = local_gateway(2, 4, Some(p)).await;
    let (h, chunks) = stream_chunks(&gw, "tiergate-auto").await;
    assert_eq!(h["x-tiergate-tier"], "local");
    assert_eq!(h["x-tiergate-escalated"], "true");
    let (text, _, usage) = read_stream(&chunks);
    assert_eq!(text, ANSWER);
    assert_eq!(usage["completion_tokens"], 8);

    let rows = gw.ledger().await;
    let row = &rows[0];
    assert!(row.escalated);
    assert_eq!((row.tier.as_deref(), row.outcome.as_str()), (Some("local"), "ok"));
    let calls: Vec<(&str, &str, u64)> = row
        .attempts
        .iter()
        .map(|a| (a.tier.as_str(), a.outcome.as_str(), a.completion_tokens))
        .collect();
    // The local call was judged on 3 tokens, then gave the whole answer: 8.
    let failed = ("broken", "upstream_error", 0);
    assert_eq!(calls, [("local", "ok", 8), failed, failed, failed]);
    assert!(
        (row.cost_usd - (37.0 * 0.05 + 8.0 * 0.1) / 1e6).abs() < 1e-15,
        "the failed call cost nothing"
    );
}

#[tokio::test]
async fn an_escalation_tier_without_its_api_key_is_not_asked_nor_waited_for() {
    // Every answer is weak, but the escalation tier cannot be called: the local answer is
    // kept as if the rule had no escalation, whole or streamed (no prefix held for judging).
    let p = policy("min_confidence = 1.0\nescalate_to = \"keyless\"\nhold_tokens = 3");
    let gw = gateway_with(&Setup {
        extra: local_tier(2, 4) + &keyless_tier_toml("keyless"),
        policy: Some(p),
        ..Setup::default()
    })
    .await;
    let r = gw.post_chat(&user("tiergate-auto", PROMPT)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "local");
    assert!(r.headers().get("x-tiergate-escalated").is_none());
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
    let (h, chunks) = stream_chunks(&gw, "tiergate-auto").await;
    assert_eq!(h["x-tiergate-tier"], "local");
    assert!(h.get("x-tiergate-escalated").is_none());
    assert!(
        h.get("x-tiergate-confidence").is_none(),
        "no prefix was held to be judged"
    );
    assert_eq!(read_stream(&chunks).0, ANSWER);
    for row in gw.ledger_rows(2).await {
        assert!(!row.escalated && row.attempts.is_empty(), "{row:?}");
        assert_eq!((row.tier.as_deref(), row.outcome.as_str()), (Some("local"), "ok"));
    }
}

#[tokio::test]
async fn when_escalation_fails_the_local_answer_is_returned_and_both_calls_are_accounted() {
    let gw = local_gateway(2, 4, Some(policy("min_confidence = 1.0\nescalate_to = \"broken\""))).await;
    let r = gw.post_chat(&user("tiergate-auto", PROMPT)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "local");
    assert!(!header(&r, "x-tiergate-confidence").is_empty());
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);

    let rows = gw.ledger().await;
    let row = &rows[0];
    assert!(row.escalated);
    assert_eq!((row.tier.as_deref(), row.outcome.as_str()), (Some("local"), "ok"));
    let calls: Vec<(&str, &str)> = row
        .attempts
        .iter()
        .map(|a| (a.tier.as_str(), a.outcome.as_str()))
        .collect();
    // The escalation tier is retried (2 retries by default) before the local answer stands.
    let failed = ("broken", "upstream_error");
    assert_eq!(calls, [("local", "ok"), failed, failed, failed]);
    assert_eq!((row.prompt_tokens, row.completion_tokens), (37, 8));
    assert!(
        (row.cost_usd - (37.0 * 0.05 + 8.0 * 0.1) / 1e6).abs() < 1e-15,
        "the failed call cost nothing"
    );
}

#[tokio::test]
async fn a_cap_larger_than_the_context_left_is_fitted_not_refused() {
    // The client set no `max_tokens`: the cap is the gateway's, so it is fitted into the
    // context like the tier's default, not refused as `context_length_exceeded`.
    let gw = local_gateway(2, 4, Some(policy("max_local_output_tokens = 1000000"))).await;
    let r = gw.post_chat(&user("tiergate-auto", PROMPT)).await;
    assert_eq!((r.status().as_u16(), header(&r, "x-tiergate-tier")), (200, "local"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
}

#[tokio::test]
async fn max_local_output_tokens_clamps_the_local_answer_only() {
    // The answer is 8 tokens; the rule caps local answers at 3, whatever the client asks.
    let gw = local_gateway(2, 4, Some(policy("max_local_output_tokens = 3"))).await;
    let mut req = user("tiergate-auto", PROMPT);
    req["max_tokens"] = json!(50);
    let r = gw.post_chat(&req).await;
    assert_eq!((r.status().as_u16(), header(&r, "x-tiergate-tier")), (200, "local"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    // A request for fewer tokens than the cap keeps its own limit.
    req["max_tokens"] = json!(2);
    let body: Value = gw.post_chat(&req).await.json().await.expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 2);
    // One that sets none gets the cap.
    let body: Value = gw
        .post_chat(&user("tiergate-auto", PROMPT))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    // The same policy sends long prompts to the cloud, unclamped.
    let long = "Explain in detail, step by step, how a transformer computes attention. ".repeat(8);
    let mut req = user("tiergate-auto", &long);
    req["max_tokens"] = json!(50);
    let r = gw.post_chat(&req).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let sent = gw
        .fake
        .requests
        .lock()
        .expect("lock")
        .last()
        .map(|(_, b)| b.clone())
        .expect("sent");
    assert_eq!(sent["max_tokens"], 50);
}
