//! `bench-floor`: the least an HTTP proxy in Rust can do — forward the request body to the
//! upstream and relay its answer, nothing else (no parsing, routing, keys or ledger). The load
//! benchmark runs it as the `floor` configuration: what any gateway in this position costs on
//! this machine before it does any work, so tiergate's own share of its added latency shows.
//!
//! ```text
//! cargo run --release --example bench-floor -- --listen 127.0.0.1:0 --upstream http://127.0.0.1:9000
//! ```
//! Prints `LISTEN <addr>` on stdout once it accepts connections; runs until killed.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;

#[derive(Clone)]
struct Proxy {
    client: reqwest::Client,
    url: String,
}

/// The same stack as tiergate (axum in, reqwest out), streaming the answer through as it comes.
async fn forward(State(p): State<Proxy>, headers: HeaderMap, body: Bytes) -> Response {
    let mut req = p.client.post(&p.url).body(body);
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v);
        }
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let content_type = r.headers().get(header::CONTENT_TYPE).cloned();
            let mut resp = Response::new(Body::from_stream(r.bytes_stream()));
            *resp.status_mut() = status;
            if let Some(v) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            resp
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("upstream: {e}")).into_response(),
    }
}

fn parse_args() -> Result<(String, String), String> {
    let (mut listen, mut upstream) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--upstream" => upstream = Some(value),
            other => {
                return Err(format!(
                    "unknown argument `{other}`; see the header of benches/load/floor.rs"
                ));
            }
        }
    }
    let upstream = upstream.ok_or("`--upstream` is required")?;
    Ok((
        listen.unwrap_or_else(|| "127.0.0.1:0".into()),
        format!("{}/v1/chat/completions", upstream.trim_end_matches('/')),
    ))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let (listen, url) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let proxy = Proxy {
        client: reqwest::Client::new(),
        url,
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(proxy);
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("LISTEN {a}"),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    // As tiergate and the fake upstream do: without it, Nagle holds back every SSE chunk
    // after the first until the client's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
