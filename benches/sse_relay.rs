//! Criterion bench of the SSE relay: a streamed chat completion through the gateway's
//! in-process router (`tiergate::app`, no client socket) from a fake upstream on loopback,
//! at 1, 16 and 256 chunks per answer, beside the same stream read directly from the fake.
//! The per-chunk cost of the relay is the slope between chunk counts (see BENCHMARKS.md).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{Request, header};
use axum::serve::ListenerExt;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;

const CHUNKS: [usize; 3] = [1, 16, 256];

/// A fake upstream whose streamed answer has as many content chunks as the number in the
/// model name (`chunks-16`), each the size of a typical token delta.
async fn fake(axum::Json(req): axum::Json<serde_json::Value>) -> axum::response::Response {
    let model = req["model"].as_str().unwrap_or_default().to_owned();
    let n: usize = model.strip_prefix("chunks-").and_then(|n| n.parse().ok()).unwrap_or(1);
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        Bytes::from(format!(
            "data: {}\n\n",
            serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        ))
    };
    let mut frames = vec![chunk(serde_json::json!({"role": "assistant", "content": ""}), None)];
    frames.extend((0..n).map(|i| chunk(serde_json::json!({"content": format!(" tok{i}")}), None)));
    frames.push(chunk(serde_json::json!({}), Some("stop")));
    frames.push(Bytes::from(format!(
        "data: {}\n\n",
        serde_json::json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n}})
    )));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let stream = futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
    axum::response::Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("response")
}

async fn start_fake() -> SocketAddr {
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake upstream");
    let addr = listener.local_addr().expect("addr");
    // Without TCP_NODELAY, Nagle's algorithm would hold each small SSE write until the
    // reader's delayed ACK (~40 ms), and the bench would time that timer, not the relay.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.expect("fake upstream") });
    addr
}

fn gateway(fake: SocketAddr, dir: &std::path::Path) -> Arc<tiergate::AppState> {
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/test.toml");
    let mut cfg = format!(
        "listen = \"127.0.0.1:0\"\n[auth]\nenabled = false\n[ledger]\npath = \"{}\"\n[baseline]\nmodel = \"m\"\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n[routing]\npolicy = \"{}\"\n",
        dir.join("ledger.db").display(),
        policy.display()
    );
    // Auth off: the relay is measured, not the key lookup. `policies/test.toml` routes to tiers `small` and `cloud`; each tier streams a
    // different number of chunks, and the bench names the tier's model explicitly.
    for (name, n) in [("small", CHUNKS[0]), ("cloud", CHUNKS[1]), ("long", CHUNKS[2])] {
        cfg.push_str(&format!(
            "[tiers.{name}]\nbackend = \"openai\"\nbase_url = \"http://{fake}/v1\"\nmodel = \"chunks-{n}\"\n"
        ));
    }
    let path = dir.join("tiergate.toml");
    std::fs::write(&path, cfg).expect("write config");
    let config = tiergate::Config::load(&path).expect("bench config is valid");
    tiergate::AppState::start(config).expect("gateway starts (run `python3 scripts/provision.py` first)")
}

fn body(n: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": format!("chunks-{n}"),
            "messages": [{"role": "user", "content": "Say something."}],
            "stream": true,
        })
        .to_string(),
    )
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = rt.block_on(start_fake());
    let state = {
        let _guard = rt.enter();
        gateway(fake, dir.path())
    };
    let app = tiergate::app(state.clone());
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .expect("client");

    let mut g = c.benchmark_group("sse_relay");
    for n in CHUNKS {
        let payload = body(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("gateway/{n}_chunks"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let req = Request::post("/v1/chat/completions")
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(payload.clone()))
                        .expect("request");
                    let resp = app.clone().oneshot(req).await.expect("infallible");
                    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
                    assert!(bytes.ends_with(b"data: [DONE]\n\n"), "stream completed");
                    black_box(bytes.len())
                })
            })
        });
        g.bench_function(format!("direct/{n}_chunks"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let bytes = client
                        .post(format!("http://{fake}/v1/chat/completions"))
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(payload.clone())
                        .send()
                        .await
                        .expect("fake answers")
                        .bytes()
                        .await
                        .expect("body");
                    black_box(bytes.len())
                })
            })
        });
    }
    g.finish();
    rt.block_on(state.ledger.flush());
}

criterion_group!(benches, bench);
criterion_main!(benches);
