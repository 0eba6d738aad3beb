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
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d"],
               "seed": -7, "presence_penalty": -2, "frequency_penalty": 1.5, "logprobs": true,
               "top_logprobs": 20, "user": "u-1", "store": null}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "\n\n"}),
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
            json!({"model": "m", "n": 0, "messages": [{"role": "user", "content": "x"}]}),
            "`n` must be an integer in 1..=128",
        ),
        (
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": "yes"},
                   "messages": [{"role": "user", "content": "x"}]}),
            "`stream_options.include_usage` must be a boolean",
        ),
        (
            json!({"model": "m".repeat(3_000_000), "messages": [{"role": "user", "content": "x"}]}),
            "`model` is 3000000 bytes long; a model name has at most 256",
        ),
        (
            json!({"model": "m", "temperature": 1e308, "messages": [{"role": "user", "content": "x"}]}),
            "`temperature` must be a number in 0..=2",
        ),
    ] {
        let e = ChatRequest::parse(body.to_string().as_bytes()).expect_err(says);
        assert!(e.to_string().contains(says), "{e}");
    }
    // Fields OpenAI types strictly: a wrong type is a 400 naming the field, whichever tier
    // would have answered (a self-hosted upstream may accept what OpenAI refuses).
    for (field, value) in [
        ("stop", json!(5)),
        ("stop", json!([1, 2])),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stop", json!({"s": "x"})),
        ("seed", json!(1.5)),
        ("seed", json!("42")),
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!("high")),
        ("top_logprobs", json!(21)),
        ("logprobs", json!("yes")),
        ("parallel_tool_calls", json!(1)),
        ("store", json!("true")),
        ("user", json!(42)),
    ] {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        body[field] = value.clone();
        let e = ChatRequest::parse(body.to_string().as_bytes()).expect_err(field);
        assert_eq!(e.param(), Some(field), "{field} = {value}: {e}");
        assert_eq!(e.code(), "invalid_request", "{field} = {value}");
    }
}

#[test]
fn stream_options_need_stream_on() {
    let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    for stream in [None, Some(json!(false)), Some(json!(null))] {
        let mut body = base();
        body["stream_options"] = json!({"include_usage": true});
        if let Some(s) = stream.clone() {
            body["stream"] = s;
        }
        let e = ChatRequest::parse(body.to_string().as_bytes()).expect_err("stream_options without stream");
        assert_eq!(e.param(), Some("stream_options"), "stream = {stream:?}");
        assert_eq!(e.code(), "invalid_request");
        assert_eq!(
            e.to_string(),
            "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        );
    }
    // Null is no option; with `stream` on, options are what it is for.
    let mut absent = base();
    absent["stream_options"] = json!(null);
    let mut streamed = base();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    for body in [absent, streamed] {
        ChatRequest::parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
    }
}

#[test]
fn an_empty_stop_sequence_is_refused() {
    for stop in [json!(""), json!([""]), json!(["###", ""])] {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        body["stop"] = stop.clone();
        let e = ChatRequest::parse(body.to_string().as_bytes()).expect_err("empty stop");
        assert_eq!(e.param(), Some("stop"), "stop = {stop}");
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("empty string"), "{e}");
    }
    // An empty list (or null) means no stop sequences at all.
    for stop in [json!([]), json!(null), json!(" ")] {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        body["stop"] = stop;
        ChatRequest::parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
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

/// Property tests: parsing never panics, whatever JSON arrives, and valid requests survive
/// a round trip unchanged. Few cases, so the CI suite stays fast; `fuzz/` goes further.
mod properties {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::super::{ChatRequest, ROLES};

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("model".to_owned()),
                        Just("messages".to_owned()),
                        Just("role".to_owned()),
                        Just("content".to_owned()),
                        Just("max_tokens".to_owned()),
                        Just("stream".to_owned()),
                        "[a-z_]{1,8}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// A request whose known fields hold arbitrary values: reaches every validation branch.
    fn request_shaped() -> impl Strategy<Value = Value> {
        (any_json(), prop::collection::vec(any_json(), 0..4), any_json(), any_json(), any_json()).prop_map(
            |(model, messages, max_tokens, temperature, stream)| {
                json!({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "stream": stream})
            },
        )
    }

    fn valid_message() -> impl Strategy<Value = Value> {
        (prop::sample::select(ROLES), "\\PC{0,40}", any::<bool>()).prop_map(|(role, text, as_parts)| {
            if as_parts {
                json!({"role": role, "content": [{"type": "text", "text": text}]})
            } else {
                json!({"role": role, "content": text})
            }
        })
    }

    fn valid_request() -> impl Strategy<Value = Value> {
        (
            "[a-z0-9.:-]{1,20}",
            prop::collection::vec(valid_message(), 1..6),
            prop::option::of(1u64..100_000),
            prop::option::of(0.0f64..=2.0),
            prop::option::of(any::<bool>()),
        )
            .prop_map(|(model, messages, max_tokens, temperature, stream)| {
                let mut v = json!({"model": model, "messages": messages});
                if let Some(n) = max_tokens {
                    v["max_tokens"] = json!(n);
                }
                if let Some(t) = temperature {
                    v["temperature"] = json!(t);
                }
                if let Some(s) = stream {
                    v["stream"] = json!(s);
                }
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parsing_any_json_never_panics(v in any_json()) {
            let _ = ChatRequest::parse(v.to_string().as_bytes());
        }

        #[test]
        fn parsing_request_shaped_json_never_panics_and_errors_say_why(v in request_shaped()) {
            let limits = crate::config::Limits::default();
            match ChatRequest::parse(v.to_string().as_bytes()) {
                Ok(req) => { let _ = req.check_limits(&limits); let _ = req.scored_text(); }
                Err(e) => {
                    prop_assert!(e.status_code().is_client_error());
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }

        #[test]
        fn parsing_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = ChatRequest::parse(&bytes);
        }

        #[test]
        fn valid_requests_round_trip(v in valid_request()) {
            let req = ChatRequest::parse(v.to_string().as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(serde_json::to_value(&req).map_err(|e| TestCaseError::fail(e.to_string()))?, v);
        }
    }
}

#[test]
fn a_lone_surrogate_is_read_as_the_replacement_character() {
    let content = |json_text: &str| {
        let body = format!(r#"{{"model": "m", "messages": [{{"role": "user", "content": "{json_text}"}}]}}"#);
        let req = ChatRequest::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{json_text}: {e}"));
        req.messages[0].content.clone().expect("content")
    };
    // A string cut in the middle of an emoji, as JavaScript's JSON.stringify writes it.
    assert_eq!(content(r"ok \ud83d"), "ok \u{FFFD}");
    assert_eq!(content(r"\ude00 then \ud83d\ude00"), "\u{FFFD} then 😀");
    // An escaped backslash before `ud800` is text, not an escape.
    assert_eq!(content(r"\\ud800 \ud800"), "\\ud800 \u{FFFD}");
    // Other broken JSON is still refused.
    let e = ChatRequest::parse(br#"{"model": "m", "messages": [{"role": "user", "content": "\uZZZZ"}]}"#)
        .expect_err("bad escape");
    assert_eq!(e.code(), "invalid_json");
}
