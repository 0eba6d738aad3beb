//! Test fixtures: a fake OpenAI-compatible upstream that behaves by model name, and a
//! gateway started in-process on a random port with a config pointing at it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;

pub const UPSTREAM_KEY: &str = "sk-upstream-SECRET-7f3a9c";
pub const UPSTREAM_KEY_ENV: &str = "TIERGATE_TEST_UPSTREAM_KEY";

/// The fake's answer text, streamed as these pieces.
pub const PIECES: [&str; 4] = ["Paris", " is", " the", " capital."];
pub const FAKE_USAGE: (u64, u64) = (11, 4);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static ENV: Once = Once::new();

fn set_env() {
    // Set once, before any gateway reads it; every test passes through here first.
    ENV.call_once(|| unsafe { std::env::set_var(UPSTREAM_KEY_ENV, UPSTREAM_KEY) });
}

#[derive(Default)]
pub struct Fake {
    pub requests: Mutex<Vec<(Option<String>, Value)>>,
    /// `fake-gated` streams its first chunk, then waits here before the rest.
    pub gate: Notify,
}

impl Fake {
    /// Requests received so far for `model`.
    pub fn calls(&self, model: &str) -> usize {
        let requests = self.requests.lock().expect("lock");
        requests.iter().filter(|(_, b)| b["model"] == model).count()
    }
}

pub async fn start_fake() -> (SocketAddr, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(fake_chat))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake upstream") });
    (addr, fake)
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> String {
    let c = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {c}\n\n")
}

fn usage_chunk(model: &str) -> String {
    let c = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
        "usage": {"prompt_tokens": FAKE_USAGE.0, "completion_tokens": FAKE_USAGE.1, "total_tokens": FAKE_USAGE.0 + FAKE_USAGE.1},
    });
    format!("data: {c}\n\n")
}

async fn fake_chat(State(fake): State<Arc<Fake>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.requests.lock().expect("lock").push((auth, body.clone()));
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match model.as_str() {
        "fake-500" => {
            // An upstream that leaks internals and the key it was sent: none of it may reach the client.
            let msg = format!("internal failure in shard-7, key {UPSTREAM_KEY}");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"message": msg}})),
            )
                .into_response();
        }
        "fake-slow" => tokio::time::sleep(Duration::from_secs(10)).await,
        "fake-late" if !stream => tokio::time::sleep(Duration::from_secs(10)).await,
        "fake-sluggish" => tokio::time::sleep(Duration::from_secs(2)).await,
        "fake-429" | "fake-429-long" => {
            let wait = if model == "fake-429" { "0.05" } else { "60" };
            let e = Json(json!({"error": {"message": "slow down", "type": "rate_limit_error"}}));
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", wait)], e).into_response();
        }
        "fake-400" => {
            let e = Json(json!({"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}));
            return (StatusCode::BAD_REQUEST, e).into_response();
        }
        // A whole answer that is JSON but no chat completion.
        "fake-malformed" if !stream => return Json(json!({"hello": "world"})).into_response(),
        // Answers with nothing: no choices, or a stream of just `[DONE]`.
        "fake-empty" if !stream => {
            return Json(json!({"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}))
                .into_response();
        }
        "fake-empty" => {
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from("data: [DONE]\n\n"))
                .expect("response");
        }
        // Fails its first call, then answers.
        "fake-flaky" if fake.calls(&model) == 1 => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        m if m.starts_with("fake-500-") => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        _ => {}
    }
    // A server that ignores `stream` and answers whole.
    if !stream || model == "fake-json-stream" {
        let usage = if model == "fake-nousage" {
            Value::Null
        } else {
            json!({"prompt_tokens": FAKE_USAGE.0, "completion_tokens": FAKE_USAGE.1, "total_tokens": FAKE_USAGE.0 + FAKE_USAGE.1})
        };
        return Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": PIECES.concat()}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let fake2 = fake.clone();
    let body = async_stream::stream! {
        if model == "fake-late" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        // Streams that die before their first chunk, after the 200 and its headers.
        if model == "fake-erroring" {
            yield Ok::<String, std::io::Error>("event: error\ndata: {\"error\": {\"message\": \"overloaded\"}}\n\n".to_owned());
            return;
        }
        if model == "fake-broken-off" {
            tokio::time::sleep(Duration::from_millis(50)).await;
            yield Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
            return;
        }
        yield Ok::<String, std::io::Error>(chunk(&model, json!({"role": "assistant", "content": ""}), None));
        match model.as_str() {
            "fake-cut" => {
                yield Ok(chunk(&model, json!({"content": PIECES[0]}), None));
                // Lets the chunks go out first: the server drops unflushed bytes with the connection.
                tokio::time::sleep(Duration::from_millis(100)).await;
                // An error in the body makes the server drop the connection mid-answer.
                yield Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut"));
                return;
            }
            "fake-malformed" => {
                yield Ok(chunk(&model, json!({"content": PIECES[0]}), None));
                yield Ok("data: {\"choices\": [{\"delta\": \n\n".to_owned());
                yield Ok(chunk(&model, json!({"content": PIECES[1]}), None));
            }
            "fake-drip" => loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                yield Ok(chunk(&model, json!({"content": "drip "}), None));
            },
            _ => {}
        }
        if model.starts_with("fake-endless") {
            loop {
                yield Ok(chunk(&model, json!({"content": "more "}), None));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for (i, p) in PIECES.iter().enumerate() {
            if model == "fake-pings" {
                // Keep-alives as some servers send them: named events, no chunk in them.
                yield Ok("event: ping\ndata: {}\n\n".to_owned());
            }
            yield Ok(chunk(&model, json!({"content": p}), None));
            if i == 0 && model == "fake-gated" {
                fake2.gate.notified().await;
            }
        }
        yield Ok(chunk(&model, json!({}), Some("stop")));
        if include_usage && model != "fake-nousage" {
            yield Ok(usage_chunk(&model));
        }
        yield Ok("data: [DONE]\n\n".to_owned());
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .expect("response")
}

/// A `[tiers.NAME]` table for an `openai` tier. Retries wait milliseconds, and breakers
/// stay out of the way unless a tier's `settings` say otherwise.
pub fn tier_toml(name: &str, model: &str, base_url: &str, settings: &str) -> String {
    let (price_in, price_out) = if name == "small" { (0.1, 0.2) } else { (2.5, 10.0) };
    let mut t = format!(
        r#"
[tiers.{name}]
backend = "openai"
base_url = "{base_url}"
model = "{model}"
api_key_env = "{UPSTREAM_KEY_ENV}"
input_usd_per_mtok = {price_in}
output_usd_per_mtok = {price_out}
{settings}
"#
    );
    for (key, default) in [
        ("timeout_secs", "30"),
        ("retry_backoff_secs", "0.01"),
        ("breaker_failures", "50"),
    ] {
        if !settings.contains(&format!("{key} =")) {
            t.push_str(&format!("{key} = {default}\n"));
        }
    }
    t
}

/// A `[tiers.NAME]` table for an `openai` tier whose key variable nobody sets: it can never
/// be called, and `/readyz` shows it not ready.
pub fn keyless_tier_toml(name: &str) -> String {
    format!(
        "\n[tiers.{name}]\nbackend = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"fake-{name}\"\napi_key_env = \"TIERGATE_TEST_KEY_THAT_NOBODY_SETS\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n"
    )
}

pub struct Gateway {
    pub url: String,
    pub state: Arc<tiergate::AppState>,
    pub fake: Arc<Fake>,
    pub ledger_path: PathBuf,
    pub keys_db: PathBuf,
    pub config_path: PathBuf,
    /// The secret of the key `test`, created before the gateway starts; every helper
    /// sends it.
    pub key: String,
    _dir: tempfile::TempDir,
}

/// Tiers that misbehave on purpose (tests/it/faults.rs): name → upstream model → settings.
/// Limits are short so each fault ends quickly; the fake holds its answers far longer.
pub const FAULT_TIERS: &[(&str, &str, &str)] = &[
    ("late", "fake-late", "timeout_secs = 0.5\nttft_timeout_secs = 0.3"),
    ("limited", "fake-429", "retry_backoff_max_secs = 1"),
    ("limited_long", "fake-429-long", "retry_backoff_max_secs = 1"),
    ("rejecting", "fake-400", ""),
    ("flaky", "fake-flaky", ""),
    (
        "down",
        "fake-500-down",
        "max_retries = 0\nbreaker_failures = 2\nbreaker_cooldown_secs = 3600",
    ),
    ("cut", "fake-cut", ""),
    ("malformed", "fake-malformed", ""),
    ("pinging", "fake-pings", ""),
    ("drip", "fake-drip", "timeout_secs = 0.5"),
    ("endless_short", "fake-endless-short", "timeout_secs = 0.5"),
    ("sluggish", "fake-sluggish", ""),
    ("erroring", "fake-erroring", ""),
    ("broken_off", "fake-broken-off", ""),
    ("empty", "fake-empty", ""),
    ("json_stream", "fake-json-stream", ""),
];

/// Tiers of the test config: name → upstream model (the fake behaves by model name).
pub const TIERS: &[(&str, &str)] = &[
    ("small", "fake-small"),
    ("cloud", "fake-cloud"),
    ("broken", "fake-500"),
    ("slow", "fake-slow"),
    ("nousage", "fake-nousage"),
    ("gated", "fake-gated"),
    ("endless", "fake-endless"),
];

pub async fn gateway() -> Gateway {
    gateway_with(&Setup::default()).await
}

/// What a test adds to the standard config.
#[derive(Default)]
pub struct Setup {
    /// TOML appended to the config (more `[tiers.*]`).
    pub extra: String,
    /// The policy file's text, instead of `policies/test.toml`.
    pub policy: Option<String>,
    /// TOML appended to the `[routing]` table (e.g. another scorer).
    pub routing: String,
    /// TOML appended to the `[auth]` table.
    pub auth: String,
    /// Limits of the key `test`.
    pub key_limits: tiergate::auth::KeyLimits,
}

/// Where a test gateway's files are.
pub struct Files {
    pub config: PathBuf,
    pub ledger: PathBuf,
    pub keys_db: PathBuf,
}

/// Writes the test config into `dir`, with every tier at the fake upstream `fake_addr`.
pub fn write_config(dir: &std::path::Path, fake_addr: SocketAddr, setup: &Setup) -> Files {
    let ledger_path = dir.join("ledger.db");
    let keys_db = dir.join("keys.db");
    let mut cfg = format!(
        r#"
listen = "127.0.0.1:0"
[ledger]
path = "{ledger}"
[auth]
keys_db = "{keys_db}"
{auth_extra}
[baseline]
model = "gpt-4o"
input_usd_per_mtok = 2.5
output_usd_per_mtok = 10.0
[routing]
policy = "{policy}"
{routing_extra}
[routing.length_scorer]
half_tokens = 16
"#,
        ledger = ledger_path.display(),
        keys_db = keys_db.display(),
        auth_extra = setup.auth,
        routing_extra = setup.routing,
        policy = match &setup.policy {
            Some(text) => {
                let p = dir.join("policy.toml");
                std::fs::write(&p, text).expect("write policy");
                p
            }
            None => repo().join("policies/test.toml"),
        }
        .display(),
    );
    let base_url = format!("http://{fake_addr}/v1");
    for (name, model) in TIERS {
        let timeout = if *name == "slow" { 0.5 } else { 30.0 };
        cfg.push_str(&tier_toml(name, model, &base_url, &format!("timeout_secs = {timeout}")));
    }
    for (name, model, settings) in FAULT_TIERS {
        cfg.push_str(&tier_toml(name, model, &base_url, settings));
    }
    cfg.push_str(&setup.extra);
    let cfg_path = dir.join("tiergate.toml");
    std::fs::write(&cfg_path, cfg).expect("write config");
    Files {
        config: cfg_path,
        ledger: ledger_path,
        keys_db,
    }
}

/// Creates the key `test` in the store and returns its secret.
pub fn create_test_key(keys_db: &std::path::Path, limits: tiergate::auth::KeyLimits) -> String {
    tiergate::auth::KeyStore::open(keys_db)
        .expect("key store")
        .create(&tiergate::auth::NewKey {
            name: "test".into(),
            team: None,
            limits,
        })
        .expect("create the test key")
        .1
}

pub async fn gateway_with(setup: &Setup) -> Gateway {
    set_env();
    let (fake_addr, fake) = start_fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let Files {
        config: cfg_path,
        ledger: ledger_path,
        keys_db,
    } = write_config(dir.path(), fake_addr, setup);
    let config = tiergate::Config::load(&cfg_path).expect("test config is valid");
    let key = create_test_key(&keys_db, setup.key_limits);
    let state = tiergate::AppState::start(config).expect("gateway starts (run `python3 scripts/provision.py` first)");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    let addr = listener.local_addr().expect("addr");
    let s = state.clone();
    tokio::spawn(async move {
        tiergate::serve(listener, s, futures::stream::pending())
            .await
            .expect("serve")
    });
    Gateway {
        url: format!("http://{addr}"),
        state,
        fake,
        ledger_path,
        keys_db,
        config_path: cfg_path,
        key,
        _dir: dir,
    }
}

impl Gateway {
    /// A client that sends the test key with every request.
    pub fn client(&self) -> reqwest::Client {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", self.key).parse().expect("header"),
        );
        reqwest::Client::builder().default_headers(h).build().expect("client")
    }

    pub async fn post_chat(&self, body: &Value) -> reqwest::Response {
        self.client()
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// POSTs `body` to `path` and returns the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> Value {
        self.post_json_with(path, &[], body).await
    }

    /// [`Gateway::post_json`] with more request headers (an `authorization` here replaces
    /// the test key).
    pub async fn post_json_with(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Value {
        let mut r = self.client().post(format!("{}{path}", self.url)).json(body);
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        r.send().await.expect("send").json().await.expect("JSON answer")
    }

    /// GETs `path` with the test key.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("send")
    }

    pub async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.expect("text answer")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        serde_json::from_str(&self.get_text(path).await).expect("JSON answer")
    }

    /// Sends a chat request with the test key on a bare connection and returns it without
    /// reading the answer: dropping it is a client hanging up mid-request.
    pub async fn send_and_hold(&self, body: &Value) -> tokio::net::TcpStream {
        let body = body.to_string();
        let addr = self.url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.key,
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut conn, request.as_bytes())
            .await
            .expect("send the request");
        conn
    }

    /// All ledger rows, after everything queued so far is committed.
    pub async fn ledger(&self) -> Vec<tiergate::ledger::Record> {
        self.state.ledger.flush().await;
        tiergate::ledger::read_all(&self.ledger_path).expect("read ledger")
    }

    /// Waits (bounded, generously) until the ledger holds `n` rows; for rows written when a
    /// stream ends, or when a tier's call ends after its client left.
    pub async fn ledger_rows(&self, n: usize) -> Vec<tiergate::ledger::Record> {
        for _ in 0..600 {
            let rows = self.ledger().await;
            if rows.len() >= n {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.ledger().await
    }
}

/// A response header's value, or "" when it is absent.
pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

pub fn user(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_payloads(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_owned))
        .collect()
}
