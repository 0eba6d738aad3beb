//! Access and spend over HTTP: gateway keys (401s, revocation, auth off), per-key rate
//! limits (429 with `retry-after`) and budgets that hold under concurrent requests.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Gateway, Setup, gateway, gateway_with, header, user};
use tiergate::auth::{KeyLimits, KeyStore, NewKey};

async fn post_with(gw: &Gateway, auth: Option<&str>, body: &Value) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(body);
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.send().await.expect("gateway answers")
}

async fn assert_401(r: reqwest::Response, says: &str) {
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let m = body["error"]["message"].as_str().expect("message");
    assert!(m.contains(says), "{m}");
}

#[tokio::test]
async fn chat_needs_a_live_gateway_key_and_refusals_are_accounted() {
    let gw = gateway().await;
    let store = KeyStore::open(&gw.keys_db).expect("store");
    let (_, revoked) = store.create(&NewKey::named("old")).expect("create");
    store.revoke("old").expect("revoke");
    let body = user("tiergate-auto", "hi");

    assert_401(post_with(&gw, None, &body).await, "didn't provide an API key").await;
    // A provider key is not a gateway key.
    assert_401(
        post_with(&gw, Some(&format!("Bearer {}", crate::common::UPSTREAM_KEY)), &body).await,
        "Incorrect API key",
    )
    .await;
    assert_401(
        post_with(&gw, Some(&format!("Bearer {revoked}")), &body).await,
        "revoked",
    )
    .await;
    assert_eq!(
        post_with(&gw, Some(&format!("bearer {}", gw.key)), &body)
            .await
            .status(),
        200
    );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-api-key", &gw.key)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "x-api-key works too");
    assert!(
        gw.fake.requests.lock().expect("lock").len() == 2,
        "refused requests never reach a tier"
    );

    let rows = gw.ledger().await;
    let outcomes: Vec<(&str, u16)> = rows.iter().map(|r| (r.outcome.as_str(), r.http_status)).collect();
    assert_eq!(
        outcomes,
        [
            ("invalid_api_key", 401),
            ("invalid_api_key", 401),
            ("invalid_api_key", 401),
            ("ok", 200),
            ("ok", 200)
        ]
    );
    assert!(rows[..3].iter().all(|r| r.api_key_id.is_none()));
}

#[tokio::test]
async fn other_endpoints_need_a_key_except_probes_and_metrics() {
    let gw = gateway().await;
    let anon = reqwest::Client::new();
    for (path, status) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/v1/models", 401),
        ("/report.json", 401),
        ("/report", 401),
    ] {
        let r = anon.get(format!("{}{path}", gw.url)).send().await.expect("send");
        assert_eq!(r.status(), status, "{path}");
    }
    let r = anon
        .post(format!("{}/v1/route", gw.url))
        .json(&user("tiergate-auto", "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    for path in ["/v1/models", "/report.json"] {
        let r = gw.client().get(format!("{}{path}", gw.url)).send().await.expect("send");
        assert_eq!(r.status(), 200, "{path} with the key");
    }
}

#[tokio::test]
async fn auth_off_lets_requests_in_without_a_key() {
    let gw = gateway_with(&Setup {
        auth: "enabled = false".into(),
        ..Setup::default()
    })
    .await;
    let r = post_with(&gw, None, &user("tiergate-auto", "hi")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.ledger().await[0].api_key_id, None);
}

#[tokio::test]
async fn a_revoked_key_is_refused_once_its_cache_entry_expires() {
    let gw = gateway_with(&Setup {
        auth: "cache_ttl_secs = 0.2".into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(gw.post_chat(&user("tiergate-auto", "hi")).await.status(), 200);
    KeyStore::open(&gw.keys_db)
        .expect("store")
        .revoke("test")
        .expect("revoke");
    // Bounded wait: passes as soon as the cache entry expires.
    for _ in 0..100 {
        if gw.post_chat(&user("tiergate-auto", "hi")).await.status() == 401 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the revoked key still works");
}

#[tokio::test]
async fn requests_over_the_per_minute_limit_get_429_with_retry_after() {
    let gw = gateway_with(&Setup {
        key_limits: KeyLimits {
            rpm: Some(2),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(gw.post_chat(&user("tiergate-auto", "hi")).await.status(), 200);
    }
    let r = gw.post_chat(&user("tiergate-auto", "hi")).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().expect("retry-after in seconds");
    assert!((1..=30).contains(&retry), "one request per 30 s: {retry}");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 requests per minute"))
    );

    let tokens = gateway_with(&Setup {
        key_limits: KeyLimits {
            tpm: Some(1000),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    let mut body = user("tiergate-auto", "hi");
    body["max_tokens"] = json!(600);
    assert_eq!(tokens.post_chat(&body).await.status(), 200);
    let r = tokens.post_chat(&body).await;
    assert_eq!(r.status(), 429, "600 + 600 tokens > 1000 per minute");
    assert!(!header(&r, "retry-after").is_empty());
}

/// Seconds in an `x-ratelimit-reset-*` value (`350ms`, `20s`, `1m0s`).
fn reset_secs(v: &str) -> f64 {
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.parse::<f64>().expect("ms") / 1000.0;
    }
    let v = v.strip_suffix('s').expect("ends in s");
    let (m, s) = v.split_once('m').unwrap_or(("0", v));
    m.parse::<f64>().expect("minutes") * 60.0 + s.parse::<f64>().expect("seconds")
}

#[tokio::test]
async fn rate_limit_headers_count_down_and_come_with_the_429() {
    let gw = gateway_with(&Setup {
        key_limits: KeyLimits {
            rpm: Some(3),
            tpm: Some(1000),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    let mut body = user("tiergate-auto", "hi");
    body["max_tokens"] = json!(100);
    for left in ["2", "1", "0"] {
        let r = gw.post_chat(&body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
        let reset = reset_secs(header(&r, "x-ratelimit-reset-requests"));
        assert!(reset > 0.0 && reset <= 60.0, "{reset}");
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "1000");
        // Over 100 tokens a request, and 100 tokens take 6 s to come back.
        let tokens: u32 = header(&r, "x-ratelimit-remaining-tokens").parse().expect("a count");
        assert!(tokens < 1000, "{tokens}");
    }
    let r = gw.post_chat(&body).await;
    assert_eq!(r.status(), 429);
    assert!(!header(&r, "retry-after").is_empty());
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    // Three requests counted within the last minute: the limit is full again in 40 to 60 s.
    let reset = reset_secs(header(&r, "x-ratelimit-reset-requests"));
    assert!(reset > 40.0 && reset <= 60.0, "{reset}");
    let models = gw.get("/v1/models").await;
    assert_eq!(
        header(&models, "x-ratelimit-remaining-requests"),
        "0",
        "other endpoints show the key's state"
    );

    let unlimited = gateway().await;
    let r = unlimited.post_chat(&body).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().keys().all(|k| !k.as_str().starts_with("x-ratelimit-")),
        "no limits, no headers"
    );
}

/// The most one `hi` request with `max_tokens` 4 can cost on the `cloud` tier, as the
/// gateway reserves it, and what it actually costs (the fake reports 11 + 4 tokens).
const MAX_TOKENS: u64 = 4;

fn cloud_cost(prompt: u64, completion: u64) -> f64 {
    (prompt as f64 * 2.5 + completion as f64 * 10.0) / 1e6
}

fn race_body() -> Value {
    json!({"model": "fake-cloud", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]})
}

/// What the gateway reserves for `race_body()` on `cloud`: its bytes (+ 8 per message + 8)
/// bound the prompt's tokens, `max_tokens` the output.
fn reserved_per_request() -> f64 {
    let bytes = serde_json::to_vec(&race_body()).expect("json").len() as u64;
    cloud_cost(bytes + 16, MAX_TOKENS)
}

async fn race(gw: &Gateway, n: usize) -> Vec<(u16, String, String)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = gw.client();
        let url = format!("{}/v1/chat/completions", gw.url);
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&race_body()).send().await.expect("send");
            let status = r.status().as_u16();
            let tier = header(&r, "x-tiergate-tier").to_owned();
            let body: Value = r.json().await.expect("json");
            (status, tier, body["error"]["code"].as_str().unwrap_or("").to_owned())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn racing_requests_cannot_overspend_a_budget() {
    let actual = cloud_cost(crate::common::FAKE_USAGE.0, crate::common::FAKE_USAGE.1);
    // Room for three reservations at once; less than 24 requests actually cost.
    let budget = 3.5 * reserved_per_request();
    assert!(
        24.0 * actual > budget,
        "the test needs more requests than the budget pays for"
    );
    let gw = gateway_with(&Setup {
        key_limits: KeyLimits {
            daily_usd: Some(budget),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    let results = race(&gw, 24).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert!(ok >= 3, "three reservations fit at once: {results:?}");
    assert!(!refused.is_empty(), "{results:?}");
    assert!(
        refused.iter().all(|r| r.0 == 429 && r.2 == "budget_exceeded"),
        "{refused:?}"
    );
    let rows = gw.ledger_rows(24).await;
    assert_eq!(rows.len(), 24, "every request has its row");
    assert_eq!(
        rows.iter().filter(|r| r.outcome == "budget_exceeded").count(),
        refused.len()
    );
    // Then one at a time until refused: spend is remembered, and the budget never passed.
    let mut last = None;
    for _ in 0..24 {
        let r = gw.post_chat(&race_body()).await;
        if r.status() == 429 {
            last = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let r = last.expect("the budget runs out");
    let retry: u64 = header(&r, "retry-after").parse().expect("seconds to the UTC day's end");
    assert!((1..=86_400).contains(&retry));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("daily budget"))
    );
    let spent: f64 = gw.ledger().await.iter().map(|r| r.cost_usd).sum();
    // Reservations bound each request's cost from above, so the budget holds exactly.
    assert!(spent <= budget + 1e-12, "spent {spent} of {budget}");
    assert!(
        spent > budget - reserved_per_request(),
        "refused only when the next one might not fit: {spent}"
    );
}

#[tokio::test]
async fn a_budget_given_by_a_reload_counts_what_the_key_spent_before() {
    let gw = gateway().await;
    assert_eq!(gw.post_chat(&race_body()).await.status(), 200, "no budget yet");
    let spent: f64 = gw.ledger_rows(1).await.iter().map(|r| r.cost_usd).sum();
    assert!(spent > 0.0);
    // Room for the next request's reservation only if the first request is forgotten.
    let limit = reserved_per_request() + spent / 2.0;
    let config = std::fs::read_to_string(&gw.config_path).expect("config");
    std::fs::write(
        &gw.config_path,
        config.replacen("[auth]\n", &format!("[auth]\ndefault_daily_usd = {limit}\n"), 1),
    )
    .expect("write");
    tiergate::reload::reload(&gw.state).expect("applies");
    let r = gw.post_chat(&race_body()).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("daily budget"), "{message}");
}

#[tokio::test]
async fn over_budget_downgrades_when_the_policy_says_so() {
    let policy = std::fs::read_to_string(crate::common::repo().join("policies/test.toml")).expect("policy");
    let actual = cloud_cost(crate::common::FAKE_USAGE.0, crate::common::FAKE_USAGE.1);
    let gw = gateway_with(&Setup {
        policy: Some(format!("over_budget = \"small\"\n{policy}")),
        // A second policy, which leaves `over_budget` at "refuse".
        routing: format!(
            "policies = [\"{}\"]",
            crate::common::repo().join("policies/quality-first.toml").display()
        ),
        key_limits: KeyLimits {
            // Less than one cloud request may cost: every request is over budget for cloud.
            daily_usd: Some(actual / 10.0),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    // The policy that routes the request decides, not the default one.
    let hard = "Derive the closed form of the sum of the first n cubes and prove it by induction, step by step.";
    let r = gw.post_chat(&user("tiergate:quality-first", hard)).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    let results = race(&gw, 6).await;
    assert!(
        results.iter().all(|r| r.0 == 200 && r.1 == "small"),
        "answered by the downgrade tier: {results:?}"
    );
    let rows = gw.ledger_rows(7).await;
    let (refused, downgraded): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.outcome == "budget_exceeded");
    assert_eq!(refused.len(), 1, "{rows:?}");
    assert_eq!(refused[0].policy.as_deref(), Some("quality-first"));
    assert!(
        downgraded
            .iter()
            .all(|r| r.rule.as_deref() == Some("over-budget") && r.tier.as_deref() == Some("small"))
    );
    assert!(
        gw.fake
            .requests
            .lock()
            .expect("lock")
            .iter()
            .all(|(_, b)| b["model"] == "fake-small")
    );
}

#[tokio::test]
async fn a_request_refused_for_its_budget_uses_no_tokens_per_minute_and_vice_versa() {
    let limits = KeyLimits {
        tpm: Some(1000),
        // Less than one cloud request may cost.
        daily_usd: Some(reserved_per_request() / 2.0),
        ..KeyLimits::default()
    };
    let gw = gateway_with(&Setup {
        key_limits: limits,
        ..Setup::default()
    })
    .await;
    let r = gw.post_chat(&race_body()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "1000", "nothing counted");
    let key_id = gw.ledger().await[0].api_key_id.clone().expect("key id");
    gw.state
        .auth
        .rate
        .check_tokens(&key_id, &limits, 1000)
        .expect("the whole minute's tokens are still there");

    // The other way round: a request refused for its tokens holds none of the budget.
    let limits = KeyLimits {
        tpm: Some(1000),
        daily_usd: Some(1.0),
        ..KeyLimits::default()
    };
    let gw = gateway_with(&Setup {
        key_limits: limits,
        ..Setup::default()
    })
    .await;
    let mut body = race_body();
    body["max_tokens"] = json!(600);
    assert_eq!(gw.post_chat(&body).await.status(), 200);
    let r = gw.post_chat(&body).await;
    assert_eq!(r.status(), 429, "600 + 600 tokens > 1000 per minute");
    let rows = gw.ledger().await;
    assert_eq!(rows[1].outcome, "rate_limit_exceeded");
    let key_id = rows[0].api_key_id.clone().expect("key id");
    let now = tiergate::report::now_ms();
    let (spent, _) = gw.state.auth.budgets.spent(&key_id, now);
    gw.state
        .auth
        .budgets
        .reserve(&key_id, &limits, 1.0 - spent, now)
        .expect("nothing left reserved");
}

#[tokio::test]
async fn spend_survives_a_restart() {
    let actual = cloud_cost(crate::common::FAKE_USAGE.0, crate::common::FAKE_USAGE.1);
    let gw = gateway_with(&Setup {
        key_limits: KeyLimits {
            daily_usd: Some(1.0),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    for r in race(&gw, 3).await {
        assert_eq!(r.0, 200);
    }
    let rows = gw.ledger_rows(3).await;
    let key_id = rows[0].api_key_id.clone().expect("key id");
    // A second gateway on the same files, as after a restart, starts from what was spent.
    let config = tiergate::Config::load(&gw.config_path).expect("config");
    let restarted = tiergate::AppState::start(config).expect("restart");
    let (today, month) = restarted.auth.budgets.spent(&key_id, tiergate::report::now_ms());
    assert!((today - 3.0 * actual).abs() < 1e-12, "{today} vs {}", 3.0 * actual);
    assert!((month - today).abs() < 1e-12);
}

#[tokio::test]
async fn readyz_says_whether_auth_is_on() {
    let on = gateway().await;
    assert_eq!(on.get_json("/readyz").await["auth"]["enabled"], true);
    let off = gateway_with(&Setup {
        auth: "enabled = false".into(),
        ..Setup::default()
    })
    .await;
    assert_eq!(off.get_json("/readyz").await["auth"]["enabled"], false);
}

/// Issue 5 × 7: a policy's `teams` and `api_keys` conditions read the virtual key's team
/// and name (never its secret), over HTTP and in `/v1/route`.
#[tokio::test]
async fn policy_rules_see_the_key_name_and_team() {
    let policy = r#"
[[rules]]
name = "research-team"
teams = ["research"]
tier = "cloud"

[[rules]]
name = "vip-key"
api_keys = ["vip"]
tier = "cloud"

[[rules]]
name = "default"
tier = "small"
"#;
    let gw = gateway_with(&Setup {
        policy: Some(policy.into()),
        ..Setup::default()
    })
    .await;
    let store = KeyStore::open(&gw.keys_db).expect("store");
    let (_, alice) = store
        .create(&NewKey {
            name: "alice".into(),
            team: Some("research".into()),
            ..NewKey::default()
        })
        .expect("create alice");
    let (_, vip) = store.create(&NewKey::named("vip")).expect("create vip");
    let body = user("tiergate-auto", "hi");
    for (secret, tier, rule) in [
        (gw.key.as_str(), "small", "default"),
        (alice.as_str(), "cloud", "research-team"),
        (vip.as_str(), "cloud", "vip-key"),
    ] {
        let r = post_with(&gw, Some(&format!("Bearer {secret}")), &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
            (tier, rule)
        );
        let explained = gw
            .post_json_with("/v1/route", &[("authorization", &format!("Bearer {secret}"))], &body)
            .await;
        assert_eq!(explained["rule"], rule, "{explained}");
    }
}

#[tokio::test]
async fn a_reload_that_turns_auth_on_or_names_another_key_store_opens_it() {
    let gw = gateway_with(&Setup {
        auth: "enabled = false".into(),
        ..Setup::default()
    })
    .await;
    let body = user("tiergate-auto", "hi");
    assert_eq!(post_with(&gw, None, &body).await.status(), 200, "auth is off");
    let config = std::fs::read_to_string(&gw.config_path).expect("config");
    let apply = |text: String| {
        std::fs::write(&gw.config_path, text).expect("write");
        tiergate::reload::reload(&gw.state)
    };

    // On: the store is opened, so the key made before start works and no key is a 401
    // (it used to be a 500 for every keyed request, with the reload reported as applied).
    let on = config.replace("enabled = false", "enabled = true");
    apply(on.clone()).expect("applies");
    assert_eq!(gw.post_chat(&body).await.status(), 200);
    assert_401(post_with(&gw, None, &body).await, "didn't provide an API key").await;

    // Another store: its keys work, the old store's (cached a moment ago) no longer do.
    let other = gw.keys_db.with_file_name("other-keys.db");
    let (_, secret) = KeyStore::open(&other)
        .expect("store")
        .create(&NewKey::named("other"))
        .expect("create");
    let old_db = gw.keys_db.display().to_string();
    apply(on.replace(&old_db, &other.display().to_string())).expect("applies");
    assert_401(gw.post_chat(&body).await, "Incorrect API key").await;
    let bearer = format!("Bearer {secret}");
    assert_eq!(post_with(&gw, Some(&bearer), &body).await.status(), 200);

    // A store that cannot be opened (a directory) rejects the reload; the last one serves on.
    let dir = gw.keys_db.parent().expect("dir").display().to_string();
    let e = apply(on.replace(&old_db, &dir)).expect_err("rejected");
    assert!(e.contains("auth.keys_db") && e.contains("is a directory"), "{e}");
    assert_eq!(post_with(&gw, Some(&bearer), &body).await.status(), 200);
}

#[tokio::test]
async fn a_browser_is_challenged_for_the_report_page_and_may_send_the_key_as_basic_credentials() {
    let gw = gateway().await;
    let anon = reqwest::Client::new();
    let r = anon.get(format!("{}/report", gw.url)).send().await.expect("send");
    assert_eq!(r.status(), 401);
    let challenges: Vec<&str> = r
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic realm=")),
        "{challenges:?}"
    );
    // The JSON API keeps the bearer challenge alone: no login prompt for programs.
    let r = anon.get(format!("{}/report.json", gw.url)).send().await.expect("send");
    assert_eq!(r.headers().get_all("www-authenticate").iter().count(), 1);

    // The key as the password (any user name), or as the user name with an empty password.
    for (user, password) in [("me", Some(gw.key.as_str())), (gw.key.as_str(), None)] {
        let r = anon
            .get(format!("{}/report", gw.url))
            .basic_auth(user, password)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        assert!(r.text().await.expect("page").contains("<html"));
    }
    let r = anon
        .get(format!("{}/report", gw.url))
        .basic_auth("me", Some("tg-not-a-key"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
}

#[test]
fn keys_list_or_revoke_on_a_missing_store_is_an_error_and_revoking_twice_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("keys.db");
    let keys = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .arg("keys")
            .arg("--keys-db")
            .arg(&db)
            .args(args)
            .output()
            .expect("run tiergate")
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for args in [&["list"][..], &["revoke", "alice"]] {
        let out = keys(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out.stderr).contains("no key store at"), "{}", text(&out.stderr));
    }
    assert!(!db.exists(), "no store was made by a typo");
    assert!(keys(&["create", "--name", "alice"]).status.success());
    let odd = keys(&["create", "--name", "bob", "--daily-usd", "10", "--monthly-usd", "5"]);
    assert!(odd.status.success(), "allowed, if odd");
    assert!(
        text(&odd.stderr).contains("the monthly budget binds first"),
        "{}",
        text(&odd.stderr)
    );
    let first = keys(&["revoke", "alice"]);
    assert!(
        text(&first.stdout).starts_with("revoked key `alice`"),
        "{}",
        text(&first.stdout)
    );
    let again = keys(&["revoke", "alice"]);
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("was already revoked at"),
        "{}",
        text(&again.stdout)
    );
}

#[tokio::test]
async fn a_tier_that_cannot_be_called_holds_no_budget() {
    // Room for one cloud request; the fallback tier would cost far more, but it has no key
    // and will be passed over, so it must not make the reservation too big to fit.
    let pricey_keyless = "\n[tiers.keyless]\nbackend = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"fake-keyless\"\napi_key_env = \"TIERGATE_TEST_KEY_THAT_NOBODY_SETS\"\ninput_usd_per_mtok = 100000.0\noutput_usd_per_mtok = 100000.0\n";
    let gw = gateway_with(&Setup {
        policy: Some("[[rules]]\nname = \"primary\"\ntier = \"cloud\"\nfallback = [\"keyless\"]\n".to_owned()),
        extra: pricey_keyless.to_owned(),
        key_limits: KeyLimits {
            daily_usd: Some(1.5 * reserved_per_request()),
            ..KeyLimits::default()
        },
        ..Setup::default()
    })
    .await;
    // Routed by the rule (a model name would skip its fallback list).
    let mut body = race_body();
    body["model"] = json!("tiergate-auto");
    let r = gw.post_chat(&body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
}
