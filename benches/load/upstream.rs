//! `bench-upstream`: a fast fake OpenAI-compatible upstream for the load benchmark. It
//! answers `POST /v1/chat/completions` after a fixed latency, whole or as SSE, and does as
//! little work as possible so that what is measured is the gateway in front of it.
//!
//! ```text
//! cargo run --release --example bench-upstream -- --listen 127.0.0.1:0 --latency-ms 20
//! ```
//! Prints `LISTEN <addr>` on stdout once it accepts connections; runs until killed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use serde::Deserialize;
use serde_json::json;

struct Fake {
    latency: Duration,
    /// Pre-rendered bodies: the fake answers every request the same way, so rendering them
    /// once keeps its cost per request down to a parse of the request and a copy.
    whole: Bytes,
    chunks: Vec<Bytes>,
    usage_chunk: Bytes,
}

/// The only request fields the fake reads; serde skips the rest without building them.
#[derive(Deserialize)]
struct Req {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

const MODEL: &str = "bench-upstream";

fn sse(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl Fake {
    fn new(latency: Duration, pieces: usize) -> Fake {
        let words: Vec<String> = (0..pieces).map(|i| format!("word{i} ")).collect();
        let usage = json!({"prompt_tokens": 12, "completion_tokens": pieces, "total_tokens": 12 + pieces});
        let whole = json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat()}, "finish_reason": "stop"}],
            "usage": usage,
        });
        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            sse(&json!({
                "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }))
        };
        let mut chunks = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        chunks.extend(words.iter().map(|w| chunk(json!({"content": w}), None)));
        chunks.push(chunk(json!({}), Some("stop")));
        let usage_chunk = sse(&json!({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [], "usage": usage,
        }));
        Fake {
            latency,
            whole: Bytes::from(whole.to_string()),
            chunks,
            usage_chunk,
        }
    }
}

async fn chat(State(fake): State<Arc<Fake>>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Req>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not a chat request").into_response();
    };
    if !fake.latency.is_zero() {
        tokio::time::sleep(fake.latency).await;
    }
    if !req.stream.unwrap_or(false) {
        let mut resp = Response::new(Body::from(fake.whole.clone()));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return resp;
    }
    let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let mut frames: Vec<Bytes> = fake.chunks.clone();
    if include_usage {
        frames.push(fake.usage_chunk.clone());
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    // One frame per SSE event, as a real server flushes them, so a relay sees chunks.
    let stream = futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp
}

struct Args {
    listen: SocketAddr,
    latency_ms: u64,
    pieces: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        latency_ms: 0,
        pieces: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("`{flag}` needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("`--listen`: {e}"))?,
            "--latency-ms" => args.latency_ms = value()?.parse().map_err(|e| format!("`--latency-ms`: {e}"))?,
            "--pieces" => args.pieces = value()?.parse().map_err(|e| format!("`--pieces`: {e}"))?,
            other => {
                return Err(format!(
                    "unknown argument `{other}`; use `--listen`, `--latency-ms`, `--pieces`"
                ));
            }
        }
    }
    if !args.listen.ip().is_loopback() {
        return Err("`--listen` must be a loopback address (127.0.0.0/8 or ::1)".to_owned());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let fake = Arc::new(Fake::new(Duration::from_millis(args.latency_ms), args.pieces));
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .with_state(fake);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on `{}`: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string());
    // As uvicorn (vLLM, LiteLLM) does: without it, Nagle's algorithm holds each small SSE
    // write until the client's delayed ACK, adding ~40 ms to every stream.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // The orchestrator reads this line to learn the port.
    println!("LISTEN {}", addr.unwrap_or_default());
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
