//! Classifier serving cost: one prompt of ≤128 tokens scored end to end (tokenization,
//! encoder, pooling, head), directly and through the gateway's queue + worker path.
//!
//! `cargo bench --bench classifier` (after `python3 scripts/provision.py`). Besides
//! criterion's estimates it prints p50/p90/p99 over 2,000 single-prompt calls per path,
//! the figures BENCHMARKS.md quotes, for the served settings (the integer encoder graph,
//! ONNX Runtime threads spinning) and, side by side in blocks, with the float `model.onnx`
//! (what CPUs without VNNI run) and with `spinning = false`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use tiergate::classifier::{Classifier, ClassifierConfig, Featurizer, Spec};
use tiergate::routing::{LengthScorer, Scorer};

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Translate into German: the meeting has been moved to Thursday afternoon, please confirm.",
    "You are a support assistant for Acme. Plans: Free (1 user), Team ($8/user), Business ($20/user, SSO). \
     Question: can I get SSO on the Team plan, and what would it cost for 12 people?",
    "Prove that for every integer n >= 1 the sum of the first n odd numbers is n squared, then generalise \
     the argument to sums of arithmetic progressions and explain each step carefully for a student who has \
     just learned induction. Finally give a counterexample showing why the base case matters, and discuss \
     strong induction versus ordinary induction with a worked example on the Fibonacci numbers.",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn featurizer(spinning: bool, integer: bool) -> Featurizer {
    tiergate::onnx::init(None).expect("run `python3 scripts/provision.py` first");
    let mut spec = Spec::load(&repo().join("router-model/head.json")).expect("spec");
    if !integer {
        spec.encoder_graph_path = None;
    }
    let encoder = tiergate::cache::cache_dir().join("models/all-minilm-l6-v2-int8");
    Featurizer::load(&encoder, &repo().join("router-model/head.onnx"), spec, 2, spinning).expect("router model")
}

fn classifier() -> Classifier {
    let cfg = ClassifierConfig {
        encoder_dir: tiergate::cache::cache_dir().join("models/all-minilm-l6-v2-int8"),
        head: repo().join("router-model/head.onnx"),
        spec: repo().join("router-model/head.json"),
        workers: 1,
        threads_per_worker: 2,
        spinning: true,
        float_encoder: false,
        max_batch: 8,
        queue_capacity: 64,
        // No cache hits: every call is a model pass.
        cache_capacity: 0,
        timeout: Duration::from_secs(10),
    };
    Classifier::start(&cfg, LengthScorer { half_tokens: 128.0 }).expect("classifier")
}

fn bench(c: &mut Criterion) {
    let mut f = featurizer(true, true);
    for (i, p) in PROMPTS.iter().enumerate() {
        let tokens = f.encode(p).expect("encode").len();
        c.bench_function(&format!("featurizer/prompt{i}_{tokens}tok"), |b| {
            b.iter(|| f.score(&[p]).expect("score"))
        });
    }
    drop(f);
    let mut float = featurizer(true, false);
    c.bench_function("featurizer_float/prompt3", |b| {
        b.iter(|| float.score(&[PROMPTS[3]]).expect("score"))
    });
    drop(float);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cl = classifier();
    c.bench_function("scorer_path/prompt3", |b| {
        b.to_async(&rt).iter(|| cl.score(PROMPTS[3], 100));
    });
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "{name:<32} n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99)
    );
}

fn latency_report() {
    // Blocks of 250 calls, rotating: a spinning session's threads keep a core busy for a
    // while after each call, which would slow the next one's call.
    let mut variants = [
        ("featurizer (tokenize+encode+head)", featurizer(true, true), Vec::new()),
        ("featurizer, float model.onnx", featurizer(true, false), Vec::new()),
        ("featurizer, spinning = false", featurizer(false, true), Vec::new()),
    ];
    for block in 0..12 {
        let (_, f, out) = &mut variants[block % 3];
        for i in 0..250 {
            let p = PROMPTS[i % PROMPTS.len()];
            let t = Instant::now();
            f.score(&[p]).expect("score");
            out.push(t.elapsed());
        }
    }
    for (name, f, out) in variants {
        drop(f);
        percentiles(name, out);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cl = Arc::new(classifier());
    let through_queue = rt.block_on(async {
        let mut out = Vec::new();
        for i in 0..2000 {
            let t = Instant::now();
            let s = cl.score(PROMPTS[i % PROMPTS.len()], 100).await;
            assert_eq!(s.scorer, "classifier");
            out.push(t.elapsed());
        }
        out
    });
    percentiles("scorer path (queue+worker)", through_queue);
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    latency_report();
}
