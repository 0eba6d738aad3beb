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
