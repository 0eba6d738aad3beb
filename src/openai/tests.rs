use serde_json::json;

use super::ChatRequest;

#[test]
fn unknown_fields_survive_the_round_trip() {
    let body = json!({
        "model": "m", "temperature": 0.2, "tools": [{"type": "function"}],
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
    });
    let req = ChatRequest::parse(body.to_string().as_bytes()).expect("valid");
    let back = serde_json::to_value(&req).expect("serialize");
    assert_eq!(back, body);
}

#[test]
fn scored_text_is_system_prompt_and_last_user_turn() {
    let body = json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    ]});
    let req = ChatRequest::parse(body.to_string().as_bytes()).expect("valid");
    assert_eq!(req.scored_text(), "Be brief.\n\nsecond question");
    assert!(req.all_text().contains("first question"));
}

#[test]
fn odd_but_valid_inputs_are_accepted() {
    for body in [
        json!({"model": "m", "messages": [{"role": "assistant", "content": null, "tool_calls": []}]}),
        json!({"model": "m", "messages": [{"role": "user", "content": ""}], "stream": null}),
        json!({"model": "m", "messages": [{"role": "user", "content": "日本語 🙂"}]}),
    ] {
        ChatRequest::parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
    }
}

#[test]
fn non_object_bodies_are_rejected() {
    for body in ["[]", "null", "\"x\"", "", "{\"model\": \"m\", \"messages\": {}}"] {
        assert!(ChatRequest::parse(body.as_bytes()).is_err(), "{body}");
    }
}

#[test]
fn duplicate_keys_are_refused_at_any_depth() {
    for body in [
        r#"{"model": "a", "model": "b", "messages": [{"role": "user", "content": "hi"}]}"#,
        r#"{"model": "a", "messages": [{"role": "user", "content": "hi", "content": "ho"}]}"#,
    ] {
        let e = ChatRequest::parse(body.as_bytes()).expect_err(body);
        assert!(e.to_string().contains("duplicate key"), "{e}");
        assert_eq!(e.code(), "invalid_json");
    }
}

#[test]
fn roles_content_and_numbers_are_checked_by_name() {
    for (body, says) in [
        (
            json!({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}),
            "`messages[0].role` = `wizard` is not a role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": null}]}),
            "`messages[0].content` is required for a `user` message",
        ),
        (
            json!({"model": "m", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}),
            "`max_tokens` must be a positive integer",
        ),
        (
            json!({"model": "m", "max_tokens": 1.5, "messages": [{"role": "user", "content": "x"}]}),
            "`max_tokens` must be a positive integer",
        ),
        (
            json!({"model": "m", "temperature": 1e308, "messages": [{"role": "user", "content": "x"}]}),
            "`temperature` must be a number in 0..=2",
        ),
    ] {
        let e = ChatRequest::parse(body.to_string().as_bytes()).expect_err(says);
        assert!(e.to_string().contains(says), "{e}");
    }
}

#[test]
fn limits_name_the_key_and_its_value() {
    let limits = crate::config::Limits {
        max_messages: 2,
        max_message_chars: 5,
        max_tokens: 100,
        ..crate::config::Limits::default()
    };
    let m = |c: &str| json!({"role": "user", "content": c});
    for (body, says) in [
        (
            json!({"model": "m", "messages": [m("a"), m("b"), m("c")]}),
            "`messages` has 3 entries; the limit is `limits.max_messages` = 2",
        ),
        (
            json!({"model": "m", "messages": [m("a"), m("🙂🙂🙂🙂🙂🙂")]}),
            "`messages[1].content` has 6 characters; the limit is `limits.max_message_chars` = 5",
        ),
        (
            json!({"model": "m", "max_completion_tokens": 101, "messages": [m("a")]}),
            "`max_completion_tokens` is 101; the limit is `limits.max_tokens` = 100",
        ),
    ] {
        let req = ChatRequest::parse(body.to_string().as_bytes()).expect("parses");
        let e = req.check_limits(&limits).expect_err(says);
        assert_eq!(e.to_string(), says);
        assert_eq!(e.code(), "limit_exceeded");
    }
    let ok = ChatRequest::parse(
        json!({"model": "m", "max_tokens": 100, "messages": [m("12345")]})
            .to_string()
            .as_bytes(),
    )
    .expect("parses");
    ok.check_limits(&limits).expect("at the limits is fine");
}
