//! OpenTelemetry export: a request through the gateway arrives at a tiny in-process
//! OTLP/HTTP receiver as a request span with GenAI attributes and child spans for scoring,
//! policy and the tier call, all in one trace.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::common::{gateway, user};

/// An OTLP/HTTP receiver on its own thread and runtime (the exporter sends from the SDK's
/// thread with a blocking client, so it must not depend on the test's runtime). Hands
/// each export's (path, content type, body) to the channel.
fn receiver() -> (String, mpsc::Receiver<(String, String, Vec<u8>)>) {
    let (tx, rx) = mpsc::channel();
    let (addr_tx, addr_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let app = axum::Router::new().fallback(
                move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let tx = tx.clone();
                    async move {
                        let ct = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let _ = tx.send((uri.path().to_owned(), ct, body.to_vec()));
                        ""
                    }
                },
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind receiver");
            addr_tx.send(listener.local_addr().expect("addr")).expect("addr");
            axum::serve(listener, app).await.expect("receiver");
        });
    });
    let addr = addr_rx.recv().expect("receiver started");
    (format!("http://{addr}"), rx)
}

fn attrs(s: &Span) -> HashMap<String, Any> {
    s.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?)))
        .collect()
}

fn text(a: &HashMap<String, Any>, k: &str) -> String {
    match a.get(k) {
        Some(Any::StringValue(s)) => s.clone(),
        other => panic!("{k}: {other:?}"),
    }
}

fn int(a: &HashMap<String, Any>, k: &str) -> i64 {
    match a.get(k) {
        Some(Any::IntValue(i)) => *i,
        other => panic!("{k}: {other:?}"),
    }
}

// One thread: the subscriber is set for this test only (`set_default` is thread-local),
// so the gateway's tasks must run on the test's thread.
#[tokio::test(flavor = "current_thread")]
async fn a_request_exports_a_span_tree_with_genai_attributes() {
    let (url, exports) = receiver();
    let provider = tiergate::telemetry::trace::provider(&url).expect("provider");
    let subscriber = tracing_subscriber::registry().with(tiergate::telemetry::trace::layer(&provider));
    let _guard = tracing::subscriber::set_default(subscriber);

    let gw = gateway().await;
    let r = gw.post_chat(&user("tiergate-auto", "Capital of France?")).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    // A stream: its request span must outlive the handler and carry the final usage.
    let mut streamed = user("tiergate-auto", "Capital of Spain?");
    streamed["stream"] = true.into();
    gw.post_chat(&streamed).await.text().await.expect("stream");
    gw.ledger_rows(2).await;

    // Export now rather than after the batch delay; off this thread, which the receiver
    // does not need but the exporter's blocking client must not run on.
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .expect("join")
        .expect("flush");

    let mut spans: Vec<Span> = Vec::new();
    // Bounded wait for the export (normally already there after the flush).
    while let Ok((path, ct, body)) = exports.recv_timeout(Duration::from_secs(10)) {
        assert_eq!(path, "/v1/traces");
        assert_eq!(ct, "application/x-protobuf");
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.clone()?.value);
            assert_eq!(service, Some(Any::StringValue("tiergate".into())));
            spans.extend(rs.scope_spans.into_iter().flat_map(|s| s.spans));
        }
        if spans.iter().filter(|s| s.name == "chat tiergate-auto").count() == 2 {
            break;
        }
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.name == "chat tiergate-auto").collect();
    assert_eq!(roots.len(), 2, "{names:?}");
    let streamed = |s: &Span| matches!(attrs(s).get("tiergate.streamed"), Some(Any::BoolValue(true)));
    let root = *roots.iter().find(|s| !streamed(s)).expect("whole answer");
    let stream_root = *roots.iter().find(|s| streamed(s)).expect("streamed answer");
    let sa = attrs(stream_root);
    assert_eq!(int(&sa, "gen_ai.usage.output_tokens"), 4);
    assert_eq!(text(&sa, "tiergate.outcome"), "ok");
    assert!(
        spans
            .iter()
            .any(|s| s.name == "chat fake-small" && s.parent_span_id == stream_root.span_id),
        "the streamed request has its tier call"
    );
    let a = attrs(root);
    assert_eq!(text(&a, "gen_ai.operation.name"), "chat");
    assert_eq!(text(&a, "gen_ai.system"), "openai");
    assert_eq!(text(&a, "gen_ai.request.model"), "tiergate-auto");
    assert_eq!(text(&a, "gen_ai.response.model"), "fake-small");
    assert_eq!(int(&a, "gen_ai.usage.input_tokens"), 11);
    assert_eq!(int(&a, "gen_ai.usage.output_tokens"), 4);
    assert_eq!(text(&a, "tiergate.tier"), "small");
    assert_eq!(text(&a, "tiergate.rule"), "routine");
    assert_eq!(text(&a, "tiergate.outcome"), "ok");
    assert!(matches!(a.get("tiergate.score"), Some(Any::DoubleValue(s)) if (0.0..0.5).contains(s)));
    // SpanKind::Server = 2, Client = 3 in OTLP.
    assert_eq!(root.kind, 2);

    let child_of_root = |n: &str| {
        spans
            .iter()
            .find(|s| s.name == n && s.parent_span_id == root.span_id)
            .unwrap_or_else(|| panic!("no `{n}` under the first request in {names:?}"))
    };
    for child in ["score", "policy", "chat fake-small"] {
        let c = child_of_root(child);
        assert_eq!(c.trace_id, root.trace_id, "{child} in the request's trace");
        assert_eq!(c.parent_span_id, root.span_id, "{child} is a child of the request");
    }
    let call = attrs(child_of_root("chat fake-small"));
    assert_eq!(text(&call, "gen_ai.request.model"), "fake-small");
    assert_eq!(text(&call, "tiergate.tier"), "small");
    assert_eq!(child_of_root("chat fake-small").kind, 3);
    assert_eq!(text(&attrs(child_of_root("policy")), "tiergate.rule"), "routine");

    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.shutdown())
        .await
        .expect("join")
        .expect("shutdown");
}
