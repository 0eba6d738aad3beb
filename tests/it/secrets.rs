//! Secrets stay secret: the real binary runs with a distinctive upstream key and a client
//! key, serves good and failing requests, and neither key may appear in its logs, any
//! response (bodies and headers), the ledger (every column of every table), the key store,
//! `tiergate report` in any format, the report page or `/metrics`.

use std::process::Stdio;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use crate::common::{Setup, UPSTREAM_KEY, UPSTREAM_KEY_ENV, create_test_key, start_fake, user, write_config};

/// An upstream that refuses the gateway's key and, like some providers, quotes it back.
async fn start_refusing_upstream() -> std::net::SocketAddr {
    async fn refuse(headers: HeaderMap) -> impl IntoResponse {
        let got = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (
            StatusCode::UNAUTHORIZED,
            Json(
                json!({"error": {"message": format!("Incorrect API key provided: {got}"), "type": "invalid_request_error", "code": "invalid_api_key"}}),
            ),
        )
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(refuse));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr
}

/// The gateway binary: cargo's, unless `TIERGATE_TEST_BIN` names another (for worktrees
/// that share a target directory, where `target/debug/tiergate` may be another branch's).
fn binary() -> std::path::PathBuf {
    std::env::var_os("TIERGATE_TEST_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tiergate").into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Every column of every row of every table, as text.
fn dump_sqlite(path: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(path).expect("open");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("tables");
    let mut out = String::new();
    for t in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM {t}")).expect("select");
        let n = stmt.column_count();
        let mut rows = stmt.query([]).expect("query");
        while let Some(row) = rows.next().expect("row") {
            for i in 0..n {
                let v = match row.get_ref(i).expect("value") {
                    rusqlite::types::ValueRef::Null => "NULL".to_owned(),
                    rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                    rusqlite::types::ValueRef::Real(v) => v.to_string(),
                    rusqlite::types::ValueRef::Text(v) | rusqlite::types::ValueRef::Blob(v) => {
                        String::from_utf8_lossy(v).into_owned()
                    }
                };
                out.push_str(&v);
                out.push('\t');
            }
            out.push('\n');
        }
    }
    out
}

async fn capture(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let headers = format!("{:?}", r.headers());
    (status, format!("{headers}\n{}", r.text().await.unwrap_or_default()))
}

#[tokio::test]
async fn no_secret_reaches_logs_responses_ledger_reports_or_metrics() {
    let (fake_addr, fake) = start_fake().await;
    let refusing = start_refusing_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "\n[tiers.denied]\nbackend = \"openai\"\nbase_url = \"http://{refusing}/v1\"\nmodel = \"fake-denied\"\napi_key_env = \"{UPSTREAM_KEY_ENV}\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n"
    );
    let files = write_config(
        dir.path(),
        fake_addr,
        &Setup {
            extra,
            ..Setup::default()
        },
    );
    let client_key = create_test_key(&files.keys_db, tiergate::auth::KeyLimits::default());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log_path = dir.path().join("gateway.log");
    let mut child = tokio::process::Command::new(binary())
        .args(["serve", "--config"])
        .arg(&files.config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
        // Debug logs of every crate: more lines that could leak.
        .env("TIERGATE_LOG", "debug,ort=warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway binary");
    let anon = reqwest::Client::new();
    let mut up = false;
    for _ in 0..300 {
        if anon.get(format!("{url}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        up,
        "gateway did not start: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    let chat = format!("{url}/v1/chat/completions");
    let with_key = |b: reqwest::RequestBuilder| b.bearer_auth(&client_key);
    let mut seen: Vec<(u16, String)> = Vec::new();
    let streamed = json!({"model": "fake-cloud", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    for body in [
        user("tiergate-auto", "hi"),
        streamed,
        user("fake-500", "hi"),
        user("fake-denied", "hi"),
        user("no-such-model", "hi"),
        json!({"model": "tiergate-auto", "messages": []}),
    ] {
        seen.push(capture(with_key(anon.post(&chat)).json(&body).send().await.expect("send")).await);
    }
    seen.push(
        capture(
            with_key(anon.post(&chat))
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .expect("send"),
        )
        .await,
    );
    // Wrong keys: the provider's key, a made-up gateway key, the client key in x-api-key with a typo.
    for auth in [
        format!("Bearer {UPSTREAM_KEY}"),
        "Bearer tg-0123456789abcdef".to_owned(),
        format!("Bearer {client_key}x"),
    ] {
        let r = anon
            .post(&chat)
            .header("authorization", auth)
            .json(&user("tiergate-auto", "hi"))
            .send()
            .await;
        seen.push(capture(r.expect("send")).await);
    }
    let statuses: Vec<u16> = seen.iter().map(|s| s.0).collect();
    assert_eq!(statuses, [200, 200, 502, 502, 404, 400, 400, 401, 401, 401], "{seen:?}");
    for path in ["/metrics", "/report.json", "/report", "/readyz", "/v1/models"] {
        seen.push(capture(with_key(anon.get(format!("{url}{path}"))).send().await.expect("send")).await);
    }
    // The upstreams were sent the upstream key: it was there to leak.
    let sent = fake.requests.lock().expect("lock").clone();
    assert!(
        sent.iter()
            .all(|(auth, _)| auth.as_deref() == Some(&format!("Bearer {UPSTREAM_KEY}")))
    );

    // Stop it (SIGTERM: graceful, ledger flushed), then read what it left behind.
    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    assert!(exited.is_ok_and(|s| s.is_ok()), "the gateway stops on SIGTERM");
    let logs = std::fs::read_to_string(&log_path).expect("logs");
    assert!(
        logs.contains("tiergate ready") && logs.contains("outcome=invalid_api_key"),
        "{logs}"
    );
    let ledger = dump_sqlite(&files.ledger);
    assert!(
        ledger.contains("invalid_api_key") && ledger.contains("upstream_error"),
        "{ledger}"
    );
    let keys = dump_sqlite(&files.keys_db);
    let mut reports = String::new();
    for format in ["table", "json", "csv"] {
        let out = tokio::process::Command::new(binary())
            .args(["report", "--format", format, "--ledger"])
            .arg(&files.ledger)
            .output()
            .await
            .expect("report");
        assert!(out.status.success(), "{out:?}");
        reports.push_str(&String::from_utf8_lossy(&out.stdout));
        reports.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(reports.contains("cloud"), "{reports}");

    let everything = [
        ("logs", logs),
        ("responses", format!("{seen:?}")),
        ("ledger", ledger),
        ("key store", keys),
        ("reports", reports),
    ];
    // The client key's tail too: a truncated or masked form is still a leak.
    let secrets = [UPSTREAM_KEY, client_key.as_str(), &client_key[client_key.len() - 16..]];
    for (what, text) in &everything {
        for s in secrets {
            assert!(!text.contains(s), "{what} contain a secret `{s}`:\n{text}");
        }
    }
}
