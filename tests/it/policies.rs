//! Policies over HTTP and on the command line: per-request policy choice, conversation
//! stickiness, hot reload (file change, invalid change, SIGHUP), `tiergate policy check`,
//! `tiergate policy calibrate` and `tiergate explain --policy`; a printing command whose
//! reader closed the pipe.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{self, Setup, gateway_with, header, repo, user};

const LONG: &str = "Derive the closed form of the sum of the first n cubes and prove it by induction, step by step, with every algebraic manipulation shown.";

fn tiergate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run tiergate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `tiergate check --config CONFIG` with the example's API key variable set.
fn check_config(config: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["check", "--config"])
        .arg(config)
        .env("OPENAI_API_KEY", "sk-test-not-a-real-key")
        .output()
        .expect("run tiergate")
}

fn policy_file(gw: &common::Gateway) -> PathBuf {
    gw.state.runtime.load().config.policy.file.clone()
}

const TEST_POLICY: &str = "name = \"test\"\n[[rules]]\nname = \"routine\"\nscore_below = 0.5\ntier = \"small\"\n[[rules]]\nname = \"default\"\ntier = \"cloud\"\n";

#[tokio::test]
async fn tiergate_colon_name_picks_a_loaded_policy() {
    let gw = gateway_with(&Setup {
        routing: format!("policies = [\"{}\"]", repo().join("policies/cost-saver.toml").display()),
        ..Setup::default()
    })
    .await;
    let ids: Vec<String> = gw.get_json("/v1/models").await["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    assert!(
        ids.contains(&"tiergate:test".to_owned()) && ids.contains(&"tiergate:cost-saver".to_owned()),
        "{ids:?}"
    );

    let r = gw.post_chat(&user("tiergate:cost-saver", "hi")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tiergate-policy"), "cost-saver");
    let r = gw.post_chat(&user("tiergate:test", LONG)).await;
    assert_eq!(
        (header(&r, "x-tiergate-policy"), header(&r, "x-tiergate-tier")),
        ("test", "cloud")
    );

    let r = gw.post_chat(&user("tiergate:nope", "hi")).await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["param"], "model");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains("use one of: tiergate:cost-saver, tiergate:test"), "{msg}");
    let rows = gw.ledger().await;
    assert_eq!(rows.last().map(|r| r.outcome.as_str()), Some("model_not_found"));
}

fn conversation(turns: &[&str]) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are terse."})];
    for (i, t) in turns.iter().enumerate() {
        if i > 0 {
            messages.push(json!({"role": "assistant", "content": "Noted."}));
        }
        messages.push(json!({"role": "user", "content": t}));
    }
    json!({"model": "tiergate-auto", "messages": messages})
}

#[tokio::test]
async fn stickiness_does_not_lift_a_request_past_its_rules_cost_cap() {
    let gw = common::gateway_with(&Setup {
        policy: Some(
            "name = \"capped\"\n[[rules]]\nname = \"routine\"\nscore_below = 0.5\ntier = \"small\"\nmax_cost_usd = 0.001\n[[rules]]\nname = \"default\"\ntier = \"cloud\"\n"
                .into(),
        ),
        ..Setup::default()
    })
    .await;
    let r = gw.post_chat(&conversation(&[LONG])).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    // 1,000 output tokens at the cloud's $10/Mtok is $0.01, over the routine rule's cap.
    let mut big = conversation(&[LONG, "thanks"]);
    big["max_tokens"] = json!(1000);
    let e = gw.post_json("/v1/route", &big).await;
    assert_eq!(
        (e["tier"].as_str(), e["rule"].as_str()),
        (Some("small"), Some("routine")),
        "{e}"
    );
    assert!(
        e["notes"][0]
            .as_str()
            .is_some_and(|n| n.starts_with("conversation not kept on `cloud`: its estimated $0.01")),
        "{e}"
    );
    // Under the cap, the conversation stays on the cloud.
    let mut small = conversation(&[LONG, "thanks"]);
    small["max_tokens"] = json!(10);
    let r = gw.post_chat(&small).await;
    assert_eq!(
        (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
        ("cloud", "sticky")
    );
}

#[tokio::test]
async fn a_conversation_that_reached_the_cloud_stays_there() {
    let gw = common::gateway().await;
    let r = gw.post_chat(&conversation(&[LONG])).await;
    assert_eq!(
        (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
        ("cloud", "default")
    );
    // Turn 2 is short: on its own it would go to `small`.
    let r = gw.post_chat(&conversation(&[LONG, "thanks"])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
        ("cloud", "sticky")
    );
    // `/v1/route` explains it the same way, without calling a model.
    let e = gw.post_json("/v1/route", &conversation(&[LONG, "more"])).await;
    assert_eq!(
        (e["tier"].as_str(), e["rule"].as_str()),
        (Some("cloud"), Some("sticky")),
        "{e}"
    );
    assert_eq!(e["trace"][0]["rule"], "routine", "{e}");
    assert_eq!(
        e["notes"][0],
        "conversation stays on `cloud` (rule `routine` chose `small`)"
    );
    // Another conversation starting with a short message is not affected.
    let r = gw.post_chat(&conversation(&["hi", "thanks"])).await;
    assert_eq!(
        (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
        ("small", "routine")
    );
    // The explicit header names the conversation instead of the hash.
    let with_id = |body: Value| {
        gw.client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("x-tiergate-conversation", "conv-42")
            .json(&body)
            .send()
    };
    let r = with_id(user("tiergate-auto", LONG)).await.expect("send");
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let r = with_id(user("tiergate-auto", "ok")).await.expect("send");
    assert_eq!(
        (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
        ("cloud", "sticky")
    );
    let rows = gw.ledger().await;
    assert_eq!(rows.iter().filter(|r| r.rule.as_deref() == Some("sticky")).count(), 2);
}

#[tokio::test]
async fn a_policy_can_opt_out_of_stickiness() {
    let gw = gateway_with(&Setup {
        policy: Some(format!("stickiness = false\n{TEST_POLICY}")),
        ..Setup::default()
    })
    .await;
    let r = gw.post_chat(&conversation(&[LONG])).await;
    assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
    let r = gw.post_chat(&conversation(&[LONG, "thanks"])).await;
    assert_eq!(
        (header(&r, "x-tiergate-tier"), header(&r, "x-tiergate-rule")),
        ("small", "routine")
    );
}

async fn route_rule(gw: &common::Gateway, text: &str) -> String {
    gw.post_json("/v1/route", &user("tiergate-auto", text)).await["rule"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A gateway with its own copy of the test policy, which routes "hi" by rule `routine`.
async fn own_policy_gateway() -> common::Gateway {
    let gw = gateway_with(&Setup {
        policy: Some(TEST_POLICY.to_owned()),
        ..Setup::default()
    })
    .await;
    assert_eq!(route_rule(&gw, "hi").await, "routine");
    gw
}

/// `listen` is bound at start: a reload keeps serving on it, and keeps the file's new value
/// apart (what its restart warning compares), rather than dropping the edit unseen.
#[tokio::test]
async fn reload_keeps_the_bound_address_when_listen_changes() {
    let gw = own_policy_gateway().await;
    let before = gw.state.runtime.load_full();
    let file = before.config.file.clone();
    let text = std::fs::read_to_string(&file).expect("config");
    assert!(text.contains("listen = \"127.0.0.1:0\""), "{text}");
    std::fs::write(
        &file,
        text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:9\""),
    )
    .expect("write");
    tiergate::reload::reload(&gw.state).expect("valid change applies");
    let after = gw.state.runtime.load_full();
    assert_eq!(after.config.listen, before.config.listen);
    assert_eq!(after.config.listen_in_file, "127.0.0.1:9".parse().expect("addr"));
    assert_ne!(before.config.listen_in_file, after.config.listen_in_file);
}

#[tokio::test]
async fn reload_applies_a_valid_change_and_rejects_an_invalid_one() {
    let gw = own_policy_gateway().await;
    let before = gw.state.runtime.load_full();
    let file = policy_file(&gw);

    // Valid: a threshold no score here is below sends everything to `default`.
    std::fs::write(&file, TEST_POLICY.replace("0.5", "0.0001")).expect("write");
    tiergate::reload::reload(&gw.state).expect("valid change applies");
    assert_eq!(route_rule(&gw, "hi").await, "default");
    // A request that loaded the old runtime keeps it whole.
    assert_eq!(before.config.policy.rules[0].when.score_below, Some(0.5));

    // Invalid: the old policy keeps serving, and /readyz and /metrics say why.
    std::fs::write(&file, TEST_POLICY.replace("tier = \"small\"", "tier = \"gpu\"")).expect("write");
    let e = tiergate::reload::reload(&gw.state).expect_err("invalid change is rejected");
    assert!(
        e.contains("rules[0].tier (line 5) = `gpu` is not a configured tier"),
        "{e}"
    );
    assert_eq!(route_rule(&gw, "hi").await, "default");
    let ready = gw.get_json("/readyz").await;
    assert_eq!(ready["reload"]["ok"], false, "{ready}");
    let shown = ready["reload"]["error"].as_str().expect("error");
    assert!(shown.contains("`gpu` is not a configured tier"), "{shown}");
    let metrics = gw.get_text("/metrics").await;
    assert!(metrics.contains("tiergate_reload_ok 0"), "{metrics}");
    assert!(
        metrics.contains("tiergate_reloads_total{outcome=\"error\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_changed_policy_file_is_picked_up_without_a_signal() {
    let gw = own_policy_gateway().await;
    std::fs::write(policy_file(&gw), TEST_POLICY.replace("0.5", "0.0001")).expect("write");
    // The watcher polls every second (the default); wait for it, bounded.
    let mut rule = String::new();
    for _ in 0..100 {
        rule = route_rule(&gw, "hi").await;
        if rule == "default" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rule, "default");
    assert_eq!(gw.get_json("/readyz").await["reload"]["ok"], true);
}

/// A gateway process with reload on SIGHUP only (`reload.poll_secs = 0`).
struct Process {
    child: std::process::Child,
    url: String,
    policy: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_gateway() -> Process {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, TEST_POLICY).expect("write policy");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let cfg = dir.path().join("tiergate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen = "127.0.0.1:{port}"
[ledger]
path = "ledger.db"
# Reloading, not access, is under test: no client key.
[auth]
enabled = false
keys_db = "keys.db"
[baseline]
model = "gpt-4o"
input_usd_per_mtok = 2.5
output_usd_per_mtok = 10.0
[routing]
policy = "policy.toml"
[routing.length_scorer]
half_tokens = 16
[reload]
poll_secs = 0
[tiers.small]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "fake-small"
[tiers.cloud]
backend = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "fake-cloud"
"#
        ),
    )
    .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn gateway");
    let p = Process {
        child,
        url: format!("http://127.0.0.1:{port}"),
        policy,
        _dir: dir,
    };
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client.get(format!("{}/healthz", p.url)).send().await.is_ok() {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway process did not start");
}

async fn json_of(r: reqwest::RequestBuilder) -> Value {
    r.send().await.expect("send").json().await.expect("JSON answer")
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_a_running_gateway() {
    let p = spawn_gateway().await;
    let client = reqwest::Client::new();
    let route = || async {
        let v = json_of(
            client
                .post(format!("{}/v1/route", p.url))
                .json(&user("tiergate-auto", "hi")),
        )
        .await;
        v["rule"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(route().await, "routine");
    std::fs::write(&p.policy, TEST_POLICY.replace("0.5", "0.0001")).expect("write");
    // Polling is off: nothing changes until the signal.
    assert_eq!(route().await, "routine");
    let status = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut rule = String::new();
    for _ in 0..100 {
        rule = route().await;
        if rule == "default" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rule, "default");
    let ready = json_of(client.get(format!("{}/readyz", p.url))).await;
    assert_eq!(ready["reload"]["ok"], true, "{ready}");
}

#[test]
fn policy_check_validates_files_and_names_the_error() {
    let out = tiergate(&[
        "policy",
        "check",
        "policies/balanced.toml",
        "policies/cost-saver.toml",
        "policies/quality-first.toml",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ok policies/balanced.toml\nok policies/cost-saver.toml\nok policies/quality-first.toml\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rules]]\nname = \"r\"\nregex = '(unclosed'\ntier = \"small\"\n[[rules]]\nname = \"rest\"\ntier = \"cloud\"\n")
        .expect("write");
    let bad = bad.to_string_lossy().into_owned();
    let out = tiergate(&["policy", "check", "policies/balanced.toml", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "ok policies/balanced.toml\n");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "policy `{bad}`: rules[0].regex (line 3) = `(unclosed` is not a valid regex"
        )),
        "{err}"
    );
    assert!(err.contains("1 of 2 policy files are invalid"), "{err}");
    // Tiers come from the config: `local` exists only in examples/local.toml.
    let out = tiergate(&["policy", "check", "policies/private-first.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("rules[0].tier (line 25) = `local` is not a configured tier"),
        "{}",
        text(&out.stderr)
    );
    let out = tiergate(&[
        "policy",
        "check",
        "--config",
        "examples/local.toml",
        "policies/private-first.toml",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn explain_with_a_policy_file_prints_the_trace() {
    let out = tiergate(&[
        "explain",
        "--policy",
        "policies/quality-first.toml",
        "Translate 'good morning' to French.",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("policy    quality-first"), "{s}");
    assert!(
        s.contains("  rule tools                -> cloud      no    tools is false"),
        "{s}"
    );
    assert!(
        s.contains("  rule json-mode            -> cloud      no    json_mode is false"),
        "{s}"
    );
}

/// A rule chosen by a header, and a default with a fallback chain and an escalation.
const CHAIN_POLICY: &str = r#"
name = "chain"
[[rules]]
name = "vip"
headers = { "x-priority" = "high" }
tier = "cloud"
fallback = ["small"]

[[rules]]
name = "rest"
tier = "small"
fallback = ["cloud"]
"#;

#[test]
fn explain_takes_headers_and_prints_the_fallback_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("chain.toml");
    std::fs::write(&policy, CHAIN_POLICY).expect("write policy");
    let policy = policy.to_string_lossy().into_owned();
    let explain = |extra: &[&str]| {
        let mut args = vec!["explain", "--policy", &policy];
        args.extend_from_slice(extra);
        args.push("hi");
        let out = tiergate(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let s = explain(&[]);
    assert!(
        s.contains("  rule vip                  -> cloud      no    header `x-priority` absent"),
        "{s}"
    );
    assert!(s.contains("rule      rest\n"), "{s}");
    assert!(s.contains("fallback  cloud\n"), "{s}");

    let s = explain(&["--header", "X-Priority: high", "-H", "x-other: 1"]);
    assert!(s.contains("rule      vip\n"), "{s}");
    assert!(s.contains("fallback  small\n"), "{s}");
    assert!(!s.contains("escalate"), "{s}");

    let json: Value = serde_json::from_str(&explain(&["--json", "--header", "x-priority: high"])).expect("json");
    assert_eq!((&json["rule"], &json["fallback"]), (&json!("vip"), &json!(["small"])));

    let out = tiergate(&["explain", "--header", "x-priority", "hi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("write it as `NAME: VALUE`"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn route_shows_the_chosen_rules_fallback_chain() {
    let gw = gateway_with(&Setup {
        policy: Some(CHAIN_POLICY.into()),
        ..Setup::default()
    })
    .await;
    let e = gw.post_json("/v1/route", &user("tiergate-auto", "hi")).await;
    assert_eq!(e["rule"], "rest", "{e}");
    assert_eq!(e["fallback"], json!(["cloud"]));
    let e = gw
        .post_json_with("/v1/route", &[("x-priority", "high")], &user("tiergate-auto", "hi"))
        .await;
    assert_eq!(e["rule"], "vip", "{e}");
    assert_eq!(e["fallback"], json!(["small"]));
    assert!(e.get("escalate_to").is_none(), "{e}");
}

fn calibrate(policy: &Path, target: &str, write: bool) -> String {
    let policy = policy.to_string_lossy().into_owned();
    let mut args = vec![
        "policy",
        "calibrate",
        "--policy",
        &policy,
        "--sample",
        "examples/workloads/mixed.jsonl",
        "--target-cloud-share",
        target,
    ];
    if write {
        args.push("--write");
    }
    let out = tiergate(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// `calibrated: rule `routine` score_below = T sends P% (N of M) …` → (T, N, M).
fn parse_calibrated(out: &str) -> (f64, usize, usize) {
    let line = out
        .lines()
        .find(|l| l.starts_with("calibrated:"))
        .expect("calibrated line");
    let t = line.split("score_below = ").nth(1).and_then(|r| r.split(' ').next());
    let n = line.split('(').nth(1).and_then(|r| r.split(" of ").next());
    let m = line.split(" of ").nth(1).and_then(|r| r.split(')').next());
    (
        t.and_then(|t| t.parse().ok()).expect("threshold"),
        n.and_then(|n| n.parse().ok()).expect("count"),
        m.and_then(|m| m.parse().ok()).expect("total"),
    )
}

#[test]
fn calibrate_finds_and_writes_the_threshold_for_a_cloud_share() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("balanced.toml");
    let original = std::fs::read_to_string(repo().join("policies/balanced.toml")).expect("read");
    std::fs::write(&policy, &original).expect("write");
    let out = calibrate(&policy, "0.25", true);
    let (t, n, m) = parse_calibrated(&out);
    assert_eq!(m, 75, "{out}");
    // The closest share to 25% the sample allows (75 requests: 19 is 25.3%).
    assert!((n as f64 / m as f64 - 0.25).abs() <= 0.5 / m as f64 + 0.02, "{out}");
    let written = std::fs::read_to_string(&policy).expect("read");
    // Only the number changed: comments and layout are kept.
    assert_eq!(
        written,
        original.replace("score_below = 0.12", &format!("score_below = {t}")),
        "{out}"
    );
    // Scoring the sample again with the written threshold gives the same share.
    let again = calibrate(&policy, "0.25", false);
    assert!(
        again.contains(&format!("now:        score_below = {t} sends")),
        "{again}"
    );
    assert!(again.contains(&format!("({n} of {m}) to `cloud`")), "{again}");
    // A higher target means a lower threshold.
    let (t50, n50, _) = parse_calibrated(&calibrate(&policy, "0.5", false));
    assert!(t50 < t && n50 > n, "{t50} {n50} vs {t} {n}");
}

#[tokio::test]
async fn reload_reuses_the_loaded_classifier_unless_its_settings_change() {
    let routing = format!(
        "scorer = \"classifier\"\n[routing.classifier]\ntimeout_ms = 10000\nhead = \"{}\"\n",
        repo().join("router-model/head.onnx").display()
    );
    let gw = gateway_with(&Setup {
        routing,
        policy: Some(TEST_POLICY.to_owned()),
        ..Setup::default()
    })
    .await;
    let same = |a: &tiergate::Runtime, b: &tiergate::Runtime| {
        let classifier = match (&a.classifier, &b.classifier) {
            (Some(x), Some(y)) => std::sync::Arc::ptr_eq(x, y),
            _ => panic!("both runtimes score with the classifier"),
        };
        let sticky = match (&a.stickiness, &b.stickiness) {
            (Some(x), Some(y)) => std::sync::Arc::ptr_eq(x, y),
            _ => panic!("stickiness is on by default"),
        };
        (classifier, sticky)
    };
    let first = gw.state.runtime.load_full();
    std::fs::write(policy_file(&gw), TEST_POLICY.replace("0.5", "0.4")).expect("write");
    tiergate::reload::reload(&gw.state).expect("reload");
    let second = gw.state.runtime.load_full();
    assert_eq!(second.config.policy.rules[0].when.score_below, Some(0.4));
    assert_eq!(same(&first, &second), (true, true), "a policy edit loads no model");

    let cfg = second.config.file.clone();
    let text = std::fs::read_to_string(&cfg).expect("read config");
    std::fs::write(&cfg, text.replace("timeout_ms = 10000", "timeout_ms = 9000")).expect("write");
    tiergate::reload::reload(&gw.state).expect("reload");
    let third = gw.state.runtime.load_full();
    assert_eq!(
        same(&second, &third),
        (false, true),
        "new classifier settings start a new classifier"
    );
    let r = gw.post_chat(&user("tiergate-auto", "What is 2 + 2?")).await;
    assert_eq!(header(&r, "x-tiergate-scorer"), "classifier");
}

#[tokio::test]
async fn a_head_retrained_in_place_is_loaded_by_the_next_reload() {
    let heads = tempfile::tempdir().expect("tempdir");
    for f in ["head.onnx", "head.json", "encoder.onnx"] {
        std::fs::copy(repo().join("router-model").join(f), heads.path().join(f)).expect("copy");
    }
    let head = heads.path().join("head.onnx");
    let routing = format!(
        "scorer = \"classifier\"\n[routing.classifier]\ntimeout_ms = 10000\ncache_capacity = 0\nhead = \"{}\"\n",
        head.display()
    );
    let gw = gateway_with(&Setup {
        routing,
        ..Setup::default()
    })
    .await;
    let first = gw.state.runtime.load_full();
    assert!(
        first.config.files().contains(&head),
        "the head is watched for hot reload"
    );
    let body = user("tiergate-auto", "Prove that there are infinitely many primes.");
    let before = gw.post_json("/v1/route", &body).await["score"].as_f64().expect("score");
    // What `train.py` does: the head file is replaced, the config is not touched.
    std::fs::copy(repo().join("router-model/folds/fold0.onnx"), &head).expect("retrain");
    tiergate::reload::reload(&gw.state).expect("reload");
    let second = gw.state.runtime.load_full();
    let (a, b) = (first.classifier.as_ref(), second.classifier.as_ref());
    assert!(
        !std::sync::Arc::ptr_eq(a.expect("classifier"), b.expect("classifier")),
        "a changed head file loads a new classifier"
    );
    let after = gw.post_json("/v1/route", &body).await["score"].as_f64().expect("score");
    assert!(
        (after - before).abs() > 1e-4,
        "scored by the new head: {before} then {after}"
    );
}

#[tokio::test]
async fn tier_override_and_cost_cap_errors_are_openai_shaped_and_recorded() {
    let gw = gateway_with(&Setup {
        policy: Some(
            "[[rules]]\nname = \"capped\"\nscore_at_least = 0.5\nmax_cost_usd = 0.001\ntier = \"cloud\"\n[[rules]]\nname = \"default\"\ntier = \"small\"\n"
                .to_owned(),
        ),
        ..Setup::default()
    })
    .await;
    let forced = gw
        .client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-tiergate-tier", "cloud")
        .json(&user("tiergate-auto", "hi"))
        .send()
        .await
        .expect("send");
    assert_eq!(forced.status(), 400);
    let body: Value = forced.json().await.expect("json");
    assert_eq!(body["error"]["code"], "tier_override_not_allowed");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // 256 assumed output tokens at $10/Mtok is over $0.001; 50 is not.
    let r = gw.post_chat(&user("tiergate-auto", LONG)).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (Some("cost_cap_exceeded"), Some("max_tokens"))
    );
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("is over the $0.001 cap of rule `capped` in policy `policy`"),
        "{msg}"
    );
    let mut cheap = user("tiergate-auto", LONG);
    cheap["max_tokens"] = json!(50);
    let r = gw.post_chat(&cheap).await;
    assert_eq!((r.status().as_u16(), header(&r, "x-tiergate-tier")), (200, "cloud"));

    let rows = gw.ledger().await;
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(outcomes, ["tier_override_not_allowed", "cost_cap_exceeded", "ok"]);
}

#[tokio::test]
async fn a_policy_added_to_policies_dir_becomes_selectable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway_with(&Setup {
        routing: format!("policies_dir = \"{}\"", dir.path().display()),
        ..Setup::default()
    })
    .await;
    let r = gw.post_chat(&user("tiergate:all-cloud", "hi")).await;
    assert_eq!(r.status(), 404);
    std::fs::write(
        dir.path().join("all-cloud.toml"),
        "[[rules]]\nname = \"everything\"\ntier = \"cloud\"\n",
    )
    .expect("write");
    // The watcher sees the directory change (polled every second); wait for it, bounded.
    let mut status = 404;
    for _ in 0..100 {
        let r = gw.post_chat(&user("tiergate:all-cloud", "hi")).await;
        status = r.status().as_u16();
        if status == 200 {
            assert_eq!(header(&r, "x-tiergate-tier"), "cloud");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
}

/// A reader that stops early (`tiergate report | head`) ends a printing command the way it
/// ends `ls`, not with a panic about the broken pipe.
#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    // More output than a pipe buffers: whether the reader is gone before the first write or
    // the writer blocks on a full pipe first, a write meets the closed pipe.
    let files = vec!["policies/balanced.toml"; 4000];
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["policy", "check"])
        .args(&files)
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tiergate");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(13),
        "killed by SIGPIPE, like `ls | head`: {out:?}"
    );
}

#[test]
fn check_warns_of_a_tier_whose_key_is_missing_here_but_passes() {
    let check = |key: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tiergate"));
        c.args(["check", "--config", "examples/tiergate.toml"])
            .current_dir(repo());
        match key {
            Some(k) => c.env("OPENAI_API_KEY", k),
            None => c.env_remove("OPENAI_API_KEY"),
        };
        c.output().expect("run tiergate")
    };
    let out = check(None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("is valid"), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(
            "warning: tier `cloud` cannot be called in this environment: set the environment variable `OPENAI_API_KEY`"
        ),
        "{}",
        text(&out.stderr)
    );
    let out = check(Some("sk-test-not-a-real-key"));
    assert!(out.status.success());
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("sk-test"), "the key is never echoed");
}

#[test]
fn check_warns_when_the_classifier_could_not_start_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(repo().join("examples/tiergate.toml")).expect("example");
    let root = repo().display().to_string();
    let write = |name: &str, encoder_dir: &std::path::Path| {
        let text = example.replace("\"../", &format!("\"{root}/")).replace(
            "# encoder_dir = \"/path/to/all-minilm-l6-v2-int8\"",
            &format!("encoder_dir = \"{}\"", encoder_dir.display()),
        );
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    };
    let check = check_config;
    let fine = check(&write(
        "fine.toml",
        &tiergate::cache::cache_dir().join("models/all-minilm-l6-v2-int8"),
    ));
    assert!(
        fine.status.success() && text(&fine.stderr).is_empty(),
        "{}",
        text(&fine.stderr)
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("dir");
    let out = check(&write("empty.toml", &empty));
    assert!(out.status.success(), "a warning, not a failure: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: the classifier cannot start in this environment")
            && err.contains("tokenizer.json")
            && err.contains("scripts/provision.py"),
        "{err}"
    );
    std::fs::write(empty.join("tokenizer.json"), "{}").expect("write");
    std::fs::write(empty.join("model.onnx"), "not the encoder").expect("write");
    let err = text(&check(&write("other.toml", &empty)).stderr);
    assert!(err.contains("says it was trained on"), "{err}");
}

#[test]
fn check_warns_when_a_local_tiers_model_is_missing_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(repo().join("examples/local.toml")).expect("example");
    let root = repo().display().to_string();
    let check = |model_dir: &std::path::Path| {
        let config = example.replace("\"../", &format!("\"{root}/")).replace(
            "# model_dir = \"/models/my-model-onnx\"",
            &format!("model_dir = \"{}\"", model_dir.display()),
        );
        let path = dir.path().join("local.toml");
        std::fs::write(&path, config).expect("write config");
        let out = check_config(&path);
        assert!(out.status.success(), "a warning, not a failure: {}", text(&out.stderr));
        text(&out.stderr)
    };
    let err = check(&crate::local::model_dir());
    assert!(err.is_empty(), "{err}");
    let err = check(&dir.path().join("nowhere"));
    assert!(
        err.contains(
            "warning: the local tier cannot start in this environment (serve would stop): tier `local`: model directory"
        ) && err.contains("scripts/provision.py"),
        "{err}"
    );
    // Its JSON files without the graph: what a half-copied model directory looks like.
    let half = dir.path().join("half");
    std::fs::create_dir(&half).expect("dir");
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(crate::local::model_dir().join(f), half.join(f)).expect("copy");
    }
    let err = check(&half);
    assert!(err.contains("model.onnx` is not a file"), "{err}");
}

#[test]
fn a_gateway_without_classifier_or_local_tier_needs_no_onnx_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The test config: length scorer, remote tiers only.
    let files = common::write_config(dir.path(), "127.0.0.1:9".parse().expect("addr"), &Setup::default());
    let explain = |config: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .arg("explain")
            .arg("--config")
            .arg(config)
            .arg("hello")
            .env("TIERGATE_ORT_LIB", dir.path().join("no-such-libonnxruntime.so"))
            .current_dir(repo())
            .output()
            .expect("run tiergate")
    };
    let out = explain(&files.config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("score     "), "{}", text(&out.stdout));
    // With the classifier it is needed, and the error says where it was looked for.
    let out = explain(&repo().join("examples/tiergate.toml"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ONNX Runtime library not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn explain_says_why_a_request_with_the_tier_header_is_not_scored() {
    let out = tiergate(&[
        "explain",
        "--policy",
        "policies/quality-first.toml",
        "-H",
        "x-tiergate-tier: cloud",
        "hi",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("score     - (the `x-tiergate-tier` header chose the tier)"),
        "{shown}"
    );
    assert!(shown.contains("rule      tier-override"), "{shown}");
}

#[test]
fn check_warns_when_the_ledger_is_not_one_serve_can_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = repo().display().to_string();
    let ledger = dir.path().join("notes.db");
    std::fs::write(&ledger, "meeting notes, not a database\n".repeat(40)).expect("write");
    let config = std::fs::read_to_string(repo().join("examples/tiergate.toml"))
        .expect("example")
        .replace("\"../", &format!("\"{root}/"))
        .replace(
            "path = \"tiergate-ledger.db\"",
            &format!("path = \"{}\"", ledger.display()),
        );
    let path = dir.path().join("t.toml");
    std::fs::write(&path, config).expect("write config");
    let out = check_config(&path);
    assert!(out.status.success(), "a warning, not a failure: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: the ledger cannot be used (serve would stop)") && err.contains("notes.db"),
        "{err}"
    );
}
