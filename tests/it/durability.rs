//! The real `tiergate` binary as a process: killed with SIGKILL under load, no answered
//! request loses its ledger row; stopped with SIGTERM, an in-flight request still finishes
//! and is recorded, or is cut at the end of the grace period with a 503 and recorded.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{self, Fake, Setup, UPSTREAM_KEY, UPSTREAM_KEY_ENV, user};

struct Process {
    /// Shared so that a load worker can SIGKILL it the instant an answer arrives.
    child: Arc<Mutex<Child>>,
    url: String,
    ledger: PathBuf,
    fake: Arc<Fake>,
    dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts the gateway binary on a free loopback port against an in-process fake upstream,
/// and waits (bounded) until it answers `/healthz`. `top` is TOML put before the config's
/// tables (top-level keys).
async fn spawn_gateway(setup: &Setup, top: &str) -> Process {
    let (fake_addr, fake) = common::start_fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write_config(dir.path(), fake_addr, setup).config;
    // Durability, not access, is under test here: no client key.
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("[auth]\n", "[auth]\nenabled = false\n");
    std::fs::write(&config, format!("{top}\n{text}")).expect("config");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn tiergate");
    let p = Process {
        child: Arc::new(Mutex::new(child)),
        url: format!("http://127.0.0.1:{port}"),
        ledger: dir.path().join("ledger.db"),
        fake,
        dir,
    };
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client.get(format!("{}/healthz", p.url)).send().await
            && r.status() == 200
        {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway did not start; log:\n{}", p.log());
}

impl Process {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.lock().expect("child").id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits (bounded) for the process to exit and returns whether it exited cleanly.
    async fn exited_cleanly(&mut self) -> bool {
        for _ in 0..600 {
            if let Some(status) = self.child.lock().expect("child").try_wait().expect("try_wait") {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not exit; log:\n{}", self.log());
    }

    fn ledger_ids(&self) -> HashSet<String> {
        tiergate::ledger::read_all(&self.ledger)
            .expect("ledger readable after the process ended")
            .into_iter()
            .map(|r| r.request_id)
            .collect()
    }
}

/// Sends one request and returns whether a complete answer arrived: a whole JSON
/// completion, or a stream up to its `[DONE]`.
async fn complete_answer(client: &reqwest::Client, url: &str, id: &str, stream: bool) -> bool {
    let mut req = user("fake-small", "hi");
    req["stream"] = json!(stream);
    let Ok(r) = client
        .post(format!("{url}/v1/chat/completions"))
        .header("x-request-id", id)
        .json(&req)
        .send()
        .await
    else {
        return false;
    };
    if r.status() != 200 {
        return false;
    }
    if stream {
        r.text().await.is_ok_and(|t| t.ends_with("data: [DONE]\n\n"))
    } else {
        r.json::<Value>()
            .await
            .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answered_request_has_its_ledger_row_after_kill_9() {
    let p = spawn_gateway(&Setup::default(), "").await;
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    // Once armed, the next worker to get a whole answer kills the gateway at once: the
    // row of that answer, the freshest there is, is the one a lazy ledger would lose.
    let armed = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (answered, armed, url, child) = (answered.clone(), armed.clone(), p.url.clone(), p.child.clone());
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0u64.. {
                let id = format!("kill9-{w}-{i}");
                if !complete_answer(&client, &url, &id, i % 2 == 1).await {
                    break;
                }
                answered.lock().expect("lock").push(id);
                if armed.load(Ordering::Relaxed) {
                    // SIGKILL; a second worker's kill of the dead process is a no-op.
                    let _ = child.lock().expect("child").kill();
                    break;
                }
            }
        }));
    }
    for _ in 0..1200 {
        if answered.lock().expect("lock").len() >= 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    armed.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    p.child.lock().expect("child").wait().expect("reap");

    let answered = answered.lock().expect("lock").clone();
    assert!(answered.len() >= 300, "load ran: {} answered", answered.len());
    let ids = p.ledger_ids();
    let missing: Vec<&String> = answered.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no ledger row: {missing:?}",
        missing.len(),
        answered.len()
    );
    assert!(p.fake.calls("fake-small") >= answered.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_and_records_it() {
    let mut p = spawn_gateway(&Setup::default(), "").await;
    let in_flight = sluggish_request_then_sigterm(&p).await;
    let (status, body) = in_flight
        .await
        .expect("client task")
        .expect("answer despite the shutdown");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], common::PIECES.concat());
    assert!(p.exited_cleanly().await, "log:\n{}", p.log());
    assert!(p.ledger_ids().contains("graceful-1"));
    let log = p.log();
    assert!(
        log.contains("shutting down") && log.contains("stopped; ledger and traces flushed"),
        "{log}"
    );
}

/// Sends a request the fake holds for 2 s and sends SIGTERM once it is in flight.
async fn sluggish_request_then_sigterm(p: &Process) -> tokio::task::JoinHandle<Result<(u16, Value), reqwest::Error>> {
    let url = p.url.clone();
    let in_flight = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .header("x-request-id", "graceful-1")
            .json(&user("fake-sluggish", "hi"))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.json::<Value>().await?))
    });
    for _ in 0..400 {
        if p.fake.calls("fake-sluggish") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.fake.calls("fake-sluggish"), 1, "request reached the upstream");
    p.signal("-TERM");
    in_flight
}

/// The request of [`sluggish_request_then_sigterm`] was cut: a 503 `shutting_down`, a clean
/// exit, and its row. Returns the gateway's log.
async fn assert_cut_and_recorded(
    p: &mut Process,
    in_flight: tokio::task::JoinHandle<Result<(u16, Value), reqwest::Error>>,
) -> String {
    let (status, body) = in_flight
        .await
        .expect("client task")
        .expect("an answer, not a dropped connection");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    assert!(p.exited_cleanly().await, "log:\n{}", p.log());
    let rows = tiergate::ledger::read_all(&p.ledger).expect("ledger");
    let row = rows
        .iter()
        .find(|r| r.request_id == "graceful-1")
        .expect("the cut request's row");
    assert_eq!((row.outcome.as_str(), row.http_status), ("shutting_down", 503));
    p.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_end_of_the_grace_period_running_requests_are_cut_with_a_503_and_recorded() {
    let mut p = spawn_gateway(&Setup::default(), "shutdown_grace_secs = 0.1").await;
    let in_flight = sluggish_request_then_sigterm(&p).await;
    let log = assert_cut_and_recorded(&mut p, in_flight).await;
    assert!(log.contains("shutdown grace period over"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_is_the_one_configured_when_the_signal_comes() {
    let mut p = spawn_gateway(&Setup::default(), "shutdown_grace_secs = 60").await;
    // A reload shortens it: the request held 2 s by the fake is cut, not waited for.
    let config = p.dir.path().join("tiergate.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("shutdown_grace_secs = 60", "shutdown_grace_secs = 0.1"),
    )
    .expect("write");
    p.signal("-HUP");
    for _ in 0..500 {
        if p.log().contains("reloaded configuration") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(p.log().contains("reloaded configuration"), "{}", p.log());
    let in_flight = sluggish_request_then_sigterm(&p).await;
    let log = assert_cut_and_recorded(&mut p, in_flight).await;
    assert!(log.contains("shutdown grace period over"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_grace_period_at_once_and_the_cut_request_is_recorded() {
    // The grace period would let the request (held 2 s by the fake) finish; a second signal
    // says not to wait.
    let mut p = spawn_gateway(&Setup::default(), "shutdown_grace_secs = 60").await;
    let in_flight = sluggish_request_then_sigterm(&p).await;
    // Two signals sent together may arrive as one: wait until the first was taken.
    for _ in 0..200 {
        if p.log().contains("shutting down") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal("-TERM");
    let log = assert_cut_and_recorded(&mut p, in_flight).await;
    assert!(log.contains("asked again to stop"), "{log}");
    let lines = log
        .lines()
        .filter(|l| l.contains("request_id=graceful-1") && l.contains("outcome="));
    assert_eq!(lines.count(), 1, "one log line per request, as one row: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_whole_answers_cut_at_shutdown_record_what_they_generated() {
    let setup = Setup {
        extra: crate::local_http::local_tier(2, 2),
        ..Setup::default()
    };
    let mut p = spawn_gateway(&setup, "shutdown_grace_secs = 0.1").await;
    let requests: Vec<_> = (0..2)
        .map(|i| {
            let url = p.url.clone();
            tokio::spawn(async move {
                let body = json!({
                    "model": crate::local::TEST_MODEL, "max_tokens": 1000, "ignore_eos": true,
                    "messages": [{"role": "user", "content": format!("Write a long story number {i}.")}],
                });
                reqwest::Client::new()
                    .post(format!("{url}/v1/chat/completions"))
                    .header("x-request-id", format!("cut-local-{i}"))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Both generating (1,000 tokens take the test model far longer than this).
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.signal("-TERM");
    for r in requests {
        assert_eq!(r.await.expect("task").expect("an answer"), 503);
    }
    assert!(p.exited_cleanly().await, "log:\n{}", p.log());
    let rows = tiergate::ledger::read_all(&p.ledger).expect("ledger");
    for i in 0..2 {
        let row = rows
            .iter()
            .find(|r| r.request_id == format!("cut-local-{i}"))
            .expect("the cut answer's row");
        assert_eq!(row.outcome, "shutting_down");
        assert!(
            row.prompt_tokens > 0 && row.completion_tokens > 0 && row.cost_usd > 0.0,
            "what the engine generated before the cut: {row:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_end_of_the_grace_period_ends_with_an_sse_error_and_is_recorded() {
    let mut p = spawn_gateway(&Setup::default(), "shutdown_grace_secs = 0.1").await;
    let mut req = user("fake-gated", "hi");
    req["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", p.url))
        .header("x-request-id", "graceful-stream")
        .json(&req)
        .send()
        .await
        .expect("stream starts");
    // The fake sends its first piece and then holds the rest until told (never, here).
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(common::PIECES[0]) {
        let chunk = futures::StreamExt::next(&mut body).await.expect("more").expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    p.signal("-TERM");
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    let last = common::sse_payloads(&seen).pop().expect("events");
    let last: Value = serde_json::from_str(&last).expect("a JSON event");
    assert_eq!(last["error"]["code"], "shutting_down", "{seen}");
    assert!(p.exited_cleanly().await, "log:\n{}", p.log());
    let rows = tiergate::ledger::read_all(&p.ledger).expect("ledger");
    let row = rows
        .iter()
        .find(|r| r.request_id == "graceful-stream")
        .expect("the cut stream's row");
    assert_eq!(row.outcome, "shutting_down");
    assert!(row.streamed && row.completion_tokens > 0, "{row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_ledger_stops_at_start() {
    let p = spawn_gateway(&Setup::default(), "").await;
    let config = p.dir.path().join("tiergate.toml");
    // The same file through a symbolic link is the same ledger.
    let link = p.dir.path().join("link.db");
    std::os::unix::fs::symlink(&p.ledger, &link).expect("symlink");
    let linked = p.dir.path().join("linked.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let ledger = p.ledger.display().to_string();
    std::fs::write(&linked, text.replace(&ledger, &link.display().to_string())).expect("write");
    for config in [config, linked] {
        let mut second = Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0"])
            .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run tiergate");
        // Bounded: a second gateway that starts would serve until killed.
        let mut stopped = None;
        for _ in 0..600 {
            stopped = second.try_wait().expect("wait");
            if stopped.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if stopped.is_none() {
            let _ = second.kill();
        }
        let out = second.wait_with_output().expect("output");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(stopped.is_some_and(|s| !s.success()), "{}: {err}", config.display());
        assert!(err.contains("is in use by another running tiergate"), "{err}");
    }
    // The first one serves on.
    let r = reqwest::get(format!("{}/healthz", p.url)).await.expect("healthz");
    assert_eq!(r.status(), 200);
}
