//! Criterion bench of request parsing: `ChatRequest::parse` (JSON, field validation,
//! typed request with unknown fields kept) on a small and a large chat body.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tiergate::openai::ChatRequest;

/// A typical short request: one system and one user message, a few sampling parameters.
fn small() -> Vec<u8> {
    serde_json::json!({
        "model": "tiergate-auto",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
    })
    .to_string()
    .into_bytes()
}

/// A long conversation (~200 KB): 64 turns of a few hundred words, with tools declared,
/// the shape of an agent's request late in a session.
fn large() -> Vec<u8> {
    let para = "The quick brown fox jumps over the lazy dog; a \"quoted\" phrase, a tab\t and unicode é 日本. ";
    let messages: Vec<serde_json::Value> = (0..64)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            serde_json::json!({"role": role, "content": para.repeat(36)})
        })
        .collect();
    serde_json::json!({
        "model": "tiergate-auto",
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "tools": [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
    })
    .to_string()
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    for (name, body) in [("small", small()), ("large", large())] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let req = ChatRequest::parse(black_box(&body)).expect("valid request");
                black_box(req.messages.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
