//! Criterion bench of the routing decision: policy rule evaluation alone
//! (`Policy::decide`) and the whole `routing::route` with the length scorer (text
//! extraction, token estimate, score, policy), for routed and explicit-model requests.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use tiergate::config::Config;
use tiergate::openai::ChatRequest;
use tiergate::policy::{Facts, Policy};
use tiergate::routing::{LengthScorer, Scorer, route};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped example config with its tiers pointed at loopback: the bench never sends.
fn config() -> Config {
    let path = repo().join("examples/tiergate.toml");
    let text = std::fs::read_to_string(&path).expect("examples/tiergate.toml is readable");
    Config::parse(&text, &path).expect("the example config is valid")
}

/// A policy of `n` rules where only the last matches, so `decide` walks all of them.
fn long_policy(n: usize, tiers: &BTreeMap<String, tiergate::config::TierConfig>) -> Policy {
    let mut text = String::from("name = \"long\"\n");
    for i in 0..n - 1 {
        text.push_str(&format!(
            "[[rules]]\nname = \"r{i}\"\ntier = \"small\"\nscore_at_least = 0.99\nmax_prompt_tokens = {i}\n"
        ));
    }
    text.push_str("[[rules]]\nname = \"default\"\ntier = \"cloud\"\n");
    Policy::parse(&text, Path::new("long.toml"), tiers).expect("generated policy is valid")
}

fn request(model: &str, words: usize) -> ChatRequest {
    let text = "Explain the trade-offs of this design in detail. ".repeat(words / 8 + 1);
    let body = serde_json::json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Earlier question."},
            {"role": "assistant", "content": "Earlier answer."},
            {"role": "user", "content": text},
        ],
    });
    ChatRequest::parse(body.to_string().as_bytes()).expect("valid request")
}

fn bench(c: &mut Criterion) {
    let config = config();
    let facts = Facts {
        score: 0.7,
        prompt_tokens: 300,
        ..Facts::default()
    };
    let mut g = c.benchmark_group("policy_decide");
    g.bench_function("balanced", |b| {
        b.iter(|| black_box(config.policy.decide(black_box(&facts))).tier.len())
    });
    let long = long_policy(32, &config.tiers);
    g.bench_function("32_rules_last_matches", |b| {
        b.iter(|| black_box(long.decide(black_box(&facts))).tier.len())
    });
    g.finish();

    let scorer: Arc<dyn Scorer> = Arc::new(LengthScorer {
        half_tokens: config.length_half_tokens,
    });
    let small_model = config.tiers["small"].model.clone();
    let mut g = c.benchmark_group("route");
    for (name, req) in [
        ("auto_short", request("tiergate-auto", 8)),
        ("auto_2k_words", request("tiergate-auto", 2000)),
        ("explicit_model", request(&small_model, 8)),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                // The length scorer's future is ready at once; no runtime is involved.
                let d = futures::executor::block_on(route(&config, &scorer, black_box(&req))).expect("routable");
                black_box(d.prompt_tokens)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
