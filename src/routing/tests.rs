use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::policy::tests::tiers;

/// The example config with the test tiers (`small`, `cloud`, in-process `local`) and
/// `policy` as its default policy, plus `cost-saver`-like `other` selectable by name.
fn config(policy: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiergate.toml");
    let text = std::fs::read_to_string(&path).expect("example");
    let mut c = Config::parse(&text, &path).expect("valid");
    c.tiers = tiers();
    c.policy = Policy::parse(policy, Path::new("p.toml"), &c.tiers).expect("valid policy");
    let other = Policy::parse(
        "name = \"other\"\n[[rules]]\nname = \"all-small\"\ntier = \"small\"\n",
        Path::new("other.toml"),
        &c.tiers,
    )
    .expect("valid");
    c.policies = [(c.policy.name.clone(), c.policy.clone()), (other.name.clone(), other)].into();
    c
}

fn scorer() -> Arc<dyn Scorer> {
    Arc::new(LengthScorer { half_tokens: 16.0 })
}

fn req(body: Value) -> ChatRequest {
    ChatRequest::parse(body.to_string().as_bytes()).expect("valid request")
}

fn user(model: &str, text: &str) -> ChatRequest {
    req(json!({"model": model, "messages": [{"role": "user", "content": text}]}))
}

fn ctx(headers: &[(&str, &str)]) -> RequestContext {
    RequestContext {
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..RequestContext::default()
    }
}

const TWO: &str = "name = \"two\"\n[[rules]]\nname = \"easy\"\nscore_below = 0.5\ntier = \"small\"\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n";

async fn decide(c: &Config, r: &ChatRequest, x: &RequestContext) -> Result<RouteDecision, Error> {
    route_with(c, &scorer(), r, x).await
}

#[tokio::test]
async fn the_model_picks_the_policy() {
    let c = config(TWO);
    let d = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[]))
        .await
        .expect("routed");
    assert_eq!((d.policy.as_deref(), d.rule.as_str()), (Some("two"), "easy"));
    let long = "why ".repeat(100);
    let d = decide(&c, &user("tiergate:other", &long), &ctx(&[]))
        .await
        .expect("routed");
    assert_eq!((d.policy.as_deref(), d.tier.as_str()), (Some("other"), "small"));
    let d = decide(&c, &user("tiergate:two", &long), &ctx(&[]))
        .await
        .expect("routed");
    assert_eq!(d.tier, "cloud");
    let e = decide(&c, &user("tiergate:nope", "hi"), &ctx(&[]))
        .await
        .expect_err("unknown");
    assert_eq!(e.status_code().as_u16(), 404);
    assert_eq!(e.code(), "model_not_found");
    assert!(
        e.to_string()
            .contains("`tiergate:nope` names no loaded policy; use one of: tiergate:other, tiergate:two"),
        "{e}"
    );
    let d = decide(&c, &user("m-local", "hi"), &ctx(&[])).await.expect("explicit");
    assert_eq!((d.rule.as_str(), d.policy), ("explicit-model", None));
}

#[tokio::test]
async fn the_tier_header_is_honoured_only_when_the_policy_allows_it() {
    let c = config(TWO);
    let e = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[(HEADER_FORCE_TIER, "cloud")]))
        .await
        .expect_err("not allowed");
    assert_eq!((e.status_code().as_u16(), e.code()), (400, "tier_override_not_allowed"));
    assert!(
        e.to_string()
            .contains("set `allow_tier_override = true` in that policy")
            && !e.to_string().contains("p.toml"),
        "{e}"
    );

    let c = config(&format!("allow_tier_override = true\n{TWO}"));
    let d = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[(HEADER_FORCE_TIER, "cloud")]))
        .await
        .expect("allowed");
    assert_eq!((d.tier.as_str(), d.rule.as_str()), ("cloud", "tier-override"));
    let e = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[(HEADER_FORCE_TIER, "gpu")]))
        .await
        .expect_err("unknown tier");
    assert!(e.to_string().contains("use one of cloud, local, small"), "{e}");
    // Sent twice, the header is one list, which names no tier: refused, not the last one.
    let mut headers = axum::http::HeaderMap::new();
    headers.append(HEADER_FORCE_TIER, "small".parse().expect("value"));
    headers.append(HEADER_FORCE_TIER, "cloud".parse().expect("value"));
    let twice = RequestContext::from_headers(&headers);
    assert_eq!(twice.headers[HEADER_FORCE_TIER], "small, cloud");
    let e = decide(&c, &user("tiergate-auto", "hi"), &twice)
        .await
        .expect_err("two tiers");
    assert!(
        e.to_string().contains("`x-tiergate-tier: small, cloud` is not a tier"),
        "{e}"
    );
}

#[tokio::test]
async fn request_facts_come_from_the_body_and_context() {
    let c = config(TWO);
    let r = req(json!({
        "model": "tiergate-auto",
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_schema", "json_schema": {}},
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            ]},
        ],
    }));
    let mut x = ctx(&[("x-team", "a")]);
    x.key = Some("key-1".into());
    let f = decide(&c, &r, &x).await.expect("routed").facts.expect("facts");
    assert_eq!((f.turns, f.tools, f.json_mode, f.images), (2, true, true, true));
    assert_eq!(f.text, "sys\n\nwhat is this");
    assert_eq!((f.model.as_str(), f.key.as_deref()), ("tiergate-auto", Some("key-1")));
    assert_eq!(f.headers.get("x-team").map(String::as_str), Some("a"));
    let f = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[]))
        .await
        .expect("routed")
        .facts
        .expect("facts");
    assert_eq!((f.turns, f.tools, f.json_mode, f.images), (1, false, false, false));
    let r = req(
        json!({"model": "tiergate-auto", "tools": [], "response_format": {"type": "text"},
        "messages": [{"role": "user", "content": "x"}]}),
    );
    let f = decide(&c, &r, &ctx(&[])).await.expect("routed").facts.expect("facts");
    assert_eq!((f.tools, f.json_mode), (false, false));
}

#[tokio::test]
async fn caps_clamp_local_output_and_keep_cost_under_the_cap() {
    let policy = |extra: &str| {
        format!(
            "name = \"caps\"\n[[rules]]\nname = \"r\"\ntier = \"{extra}\n[[rules]]\nname = \"rest\"\ntier = \"small\"\n"
        )
    };
    let c = config(&policy("local\"\nscore_below = 0.9\nmax_local_output_tokens = 64"));
    let d = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[]))
        .await
        .expect("routed");
    assert_eq!((d.tier.as_str(), d.max_output_tokens), ("local", Some(64)));
    let mut r = user("tiergate-auto", "hi");
    clamp_output(&mut r, 64);
    // The client set no limit: the gateway's own, which the local tier fits to the context.
    assert_eq!((r.output_cap, r.rest.get("max_tokens")), (Some(64), None));
    let mut r = req(json!({"model": "x", "max_completion_tokens": 10, "messages": [{"role": "user", "content": "x"}]}));
    clamp_output(&mut r, 64);
    assert_eq!(
        (r.rest["max_completion_tokens"].as_u64(), r.rest.get("max_tokens")),
        (Some(10), None)
    );

    // 256 output tokens at $10/Mtok is $0.00256: over a $0.001 cap.
    let c = config(&policy("cloud\"\nscore_below = 0.9\nmax_cost_usd = 0.001"));
    let e = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[]))
        .await
        .expect_err("over cap");
    assert_eq!((e.status_code().as_u16(), e.code()), (400, "cost_cap_exceeded"));
    assert!(
        e.to_string()
            .contains("over the $0.001 cap of rule `r` in policy `caps`"),
        "{e}"
    );
    let cheap =
        req(json!({"model": "tiergate-auto", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}));
    let d = decide(&c, &cheap, &ctx(&[])).await.expect("under cap");
    assert_eq!(d.tier, "cloud");
    // Each of `n` choices may use all of `max_tokens`: 5 × 50 tokens at $10/Mtok is over.
    let five = req(
        json!({"model": "tiergate-auto", "max_tokens": 50, "n": 5, "messages": [{"role": "user", "content": "hi"}]}),
    );
    let e = decide(&c, &five, &ctx(&[])).await.expect_err("n choices over cap");
    assert!(e.to_string().contains("+ 5 × 50 output tokens"), "{e}");

    let c = config(&policy(
        "cloud\"\nscore_below = 0.9\nmax_cost_usd = 0.001\nover_cost_tier = \"local\"\nmax_local_output_tokens = 32",
    ));
    let d = decide(&c, &user("tiergate-auto", "hi"), &ctx(&[]))
        .await
        .expect("capped");
    assert_eq!(
        (d.tier.as_str(), d.rule.as_str(), d.max_output_tokens),
        ("local", "r", Some(32))
    );
    assert!(d.notes[0].contains("sent to over_cost_tier `local`"), "{:?}", d.notes);
    assert!(
        !d.sticky,
        "a capped request is neither lifted nor recorded by stickiness"
    );
}

#[tokio::test]
async fn explain_traces_the_new_conditions() {
    let c = config(
        "name = \"t\"\n[[rules]]\nname = \"json\"\njson_mode = true\ntier = \"small\"\n[[rules]]\nname = \"legal\"\nregex = '(?i)contract'\nmin_turns = 1\ntier = \"cloud\"\n[[rules]]\nname = \"rest\"\ntier = \"small\"\n",
    );
    let e = explain(&c, &scorer(), &user("tiergate-auto", "Review this Contract"))
        .await
        .expect("explained");
    let got: Vec<(&str, bool, &str)> = e
        .trace
        .iter()
        .map(|t| (t.rule.as_str(), t.matched, t.why.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("json", false, "json_mode is false"),
            ("legal", true, "turns 1 >= 1, regex `(?i)contract` matches"),
        ]
    );
    assert_eq!((e.tier.as_str(), e.rule.as_str()), ("cloud", "legal"));
}

#[tokio::test]
async fn explain_shows_the_chosen_rules_fallback_chain_and_escalation() {
    let c = config(
        "name = \"t\"\n[[rules]]\nname = \"vip\"\nheaders = { \"x-priority\" = \"high\" }\ntier = \"cloud\"\n[[rules]]\nname = \"rest\"\ntier = \"small\"\nfallback = [\"local\", \"cloud\"]\nmin_confidence = 0.4\nescalate_to = \"cloud\"\n",
    );
    let hi = user("tiergate-auto", "hi");
    let e = explain_with(&c, &scorer(), &hi, &ctx(&[]), None)
        .await
        .expect("explained");
    assert_eq!(e.rule, "rest");
    assert_eq!(e.fallback, ["local", "cloud"]);
    assert_eq!((e.escalate_to.as_deref(), e.min_confidence), (Some("cloud"), Some(0.4)));
    let json = serde_json::to_value(&e).expect("json");
    assert_eq!(json["fallback"], json!(["local", "cloud"]));
    assert_eq!(
        (&json["escalate_to"], &json["min_confidence"]),
        (&json!("cloud"), &json!(0.4))
    );

    let e = explain_with(&c, &scorer(), &hi, &ctx(&[("x-priority", "high")]), None)
        .await
        .expect("explained");
    assert_eq!(e.rule, "vip");
    let json = serde_json::to_value(&e).expect("json");
    assert_eq!(json["fallback"], json!([]), "the chosen rule's chain, not another's");
    assert!(
        json.get("escalate_to").is_none() && json.get("min_confidence").is_none(),
        "{json}"
    );
}

#[test]
fn rules_never_see_the_clients_key_headers() {
    let mut h = axum::http::HeaderMap::new();
    h.insert("authorization", "Bearer tg-secret".parse().expect("value"));
    h.insert("x-api-key", "tg-secret".parse().expect("value"));
    h.insert("x-priority", "high".parse().expect("value"));
    let ctx = RequestContext::from_headers(&h);
    assert_eq!(ctx.headers.keys().collect::<Vec<_>>(), ["x-priority"]);
}

#[test]
fn tiers_that_cannot_be_called_are_noted_once_each() {
    let mut e = Explanation {
        requested_model: "tiergate-auto".into(),
        tier: "local".into(),
        backend_model: "m".into(),
        rule: "r".into(),
        policy: None,
        score: None,
        scorer: None,
        prompt_tokens: 1,
        output_tokens_assumed: 1,
        estimated_cost_usd: 0.0,
        baseline_cost_usd: 0.0,
        trace: vec![],
        notes: vec![],
        on_saturated: Some("cloud".into()),
        fallback: vec!["cloud".into(), "other".into()],
        escalate_to: Some("cloud".into()),
        min_confidence: Some(0.5),
    };
    let mut problems = BTreeMap::from([("cloud".to_owned(), "no key".to_owned())]);
    e.note_unusable(&problems);
    assert_eq!(e.notes, ["tier `cloud` cannot be called (no key): it is passed over"]);
    problems.insert("local".into(), "no key".into());
    e.notes.clear();
    e.note_unusable(&problems);
    assert_eq!(e.notes.len(), 2);
    assert!(e.notes[0].contains("503 `tier_unavailable`"), "{:?}", e.notes);
}
