//! The learned router through the Rust path: parity with the Python reference
//! (`router-model/results/parity.jsonl`), and the gateway scoring with it.

use serde_json::{Value, json};
use tiergate::classifier::{Featurizer, Spec};

use crate::common::{gateway_with, repo};

fn featurizer() -> Featurizer {
    tiergate::onnx::init(None).expect("ONNX Runtime provisioned");
    let encoder = tiergate::cache::cache_dir().join("models/all-minilm-l6-v2-int8");
    let spec = Spec::load(&repo().join("router-model/head.json")).expect("spec");
    Featurizer::load(&encoder, &repo().join("router-model/head.onnx"), spec, 2, false)
        .expect("router model provisioned")
}

#[test]
fn rust_scores_match_the_python_reference() {
    let mut f = featurizer();
    let text = std::fs::read_to_string(repo().join("router-model/results/parity.jsonl")).expect("parity vectors");
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).expect("json");
        let body = json!({"model": "m", "messages": v["messages"]}).to_string();
        // A request without messages never reaches the scorer; its vector checks the empty text.
        let scored = match tiergate::openai::ChatRequest::parse(body.as_bytes()) {
            Ok(req) => req.scored_text(),
            Err(_) => String::new(),
        };
        assert_eq!(scored, v["scored_text"].as_str().expect("scored_text"), "scored text");
        let ids: Vec<i64> = v["input_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .filter_map(Value::as_i64)
            .collect();
        assert_eq!(f.encode(&scored).expect("encode"), ids, "input ids for {scored:.60}");
        // CPUs without VNNI run the float model.onnx; the vectors carry its score too.
        let key = if tiergate::classifier::features::integer_kernels_exact() {
            "score"
        } else {
            "score_float"
        };
        let want = v[key].as_f64().expect("score");
        let got = f64::from(f.score(&[&scored]).expect("score")[0]);
        assert!(
            (got - want).abs() < 1e-4,
            "score {got} vs python {want} for {scored:.60}"
        );
        n += 1;
    }
    assert!(n >= 10, "parity file has {n} vectors");
}

#[test]
fn batched_scores_equal_single_scores() {
    let mut f = featurizer();
    let texts = [
        "hi",
        "Prove that the square root of two is irrational, step by step.",
        "Translate 'good morning' to French",
    ];
    let batch = f.score(&texts).expect("batch");
    for (t, b) in texts.iter().zip(&batch) {
        let single = f.score(&[t]).expect("single")[0];
        assert!((single - b).abs() < 1e-5, "{t}: {single} vs {b}");
    }
}

#[test]
fn the_float_encoder_scores_like_the_integer_graph() {
    // CPUs whose integer products could saturate run the float `model.onnx` with the same head.
    let mut integer = featurizer();
    tiergate::onnx::init(None).expect("ONNX Runtime provisioned");
    let encoder = tiergate::cache::cache_dir().join("models/all-minilm-l6-v2-int8");
    let mut spec = Spec::load(&repo().join("router-model/head.json")).expect("spec");
    assert!(spec.encoder_graph_path.is_some(), "head.json names the integer graph");
    spec.encoder_graph_path = None;
    let mut float =
        Featurizer::load(&encoder, &repo().join("router-model/head.onnx"), spec, 2, false).expect("float encoder");
    let texts = [
        "hi",
        "Prove that the square root of two is irrational, step by step.",
        "You are a support bot.\n\nWhich plan has SSO?",
        "Design a distributed rate limiter for a global API with per-tenant quotas.",
    ];
    let a = integer.score(&texts).expect("integer");
    let b = float.score(&texts).expect("float");
    let most = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(most < 0.01, "integer {a:?} vs float {b:?}");
    if tiergate::classifier::features::integer_kernels_exact() {
        assert!(most > 0.0, "the integer graph is run where it is exact");
    }
}

#[tokio::test]
async fn encoder_float_runs_the_float_model_and_says_so() {
    let routing = format!(
        "scorer = \"classifier\"\n[routing.classifier]\ntimeout_ms = 10000\nencoder = \"float\"\nhead = \"{}\"\n",
        repo().join("router-model/head.onnx").display()
    );
    let gw = gateway_with(&crate::common::Setup {
        routing,
        ..Default::default()
    })
    .await;
    assert_eq!(gw.get_json("/readyz").await["classifier"]["encoder"], "float");
    let r = gw
        .post_chat(&crate::common::user("tiergate-auto", "What is 2 + 2?"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tiergate-scorer"], "classifier");
}

#[tokio::test]
async fn the_gateway_routes_with_the_classifier_and_explains() {
    let routing = format!(
        "scorer = \"classifier\"\n[routing.classifier]\ntimeout_ms = 10000\nhead = \"{}\"\n",
        repo().join("router-model/head.onnx").display()
    );
    let gw = gateway_with(&crate::common::Setup {
        routing,
        ..Default::default()
    })
    .await;
    let ready = gw.get_json("/readyz").await;
    assert_eq!(ready["onnxruntime"]["version"], tiergate::onnx::PINNED_VERSION);
    let encoder = if tiergate::classifier::features::integer_kernels_exact() {
        "integer"
    } else {
        "float"
    };
    assert_eq!(ready["classifier"]["encoder"], encoder, "{ready}");
    let r = gw
        .post_chat(&crate::common::user("tiergate-auto", "What is 2 + 2?"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-tiergate-scorer"],
        "classifier",
        "{:?}",
        gw.state.runtime.load().scorer_name
    );
    let score: f64 = r.headers()["x-tiergate-score"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("number");
    assert!((0.0..=1.0).contains(&score));

    let route = gw
        .post_json("/v1/route", &crate::common::user("tiergate-auto", "What is 2 + 2?"))
        .await;
    assert_eq!(route["scorer"], "classifier");
    assert!(
        (route["score"].as_f64().expect("score") - score).abs() < 1e-4,
        "{route}"
    );
    let trace = route["trace"].as_array().expect("trace");
    assert!(
        trace
            .last()
            .is_some_and(|t| t["matched"] == true && t["tier"] == route["tier"]),
        "{route}"
    );
    assert!(route["baseline_cost_usd"].as_f64().expect("cost") > 0.0);
    let metrics = gw.get_text("/metrics").await;
    assert!(metrics.contains("tiergate_classifier_scored_total 1"), "{metrics}");
    // The route call above scored the same text: a cache hit.
    assert!(metrics.contains("tiergate_classifier_cache_hits_total 1"), "{metrics}");
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    // /v1/route calls no model.
    assert_eq!(gw.fake.requests.lock().expect("lock").len(), 1);
}

#[test]
fn score_refuses_to_write_over_its_input_or_to_use_a_missing_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("prompts.jsonl");
    let prompts = "{\"id\": 1, \"text\": \"What is 2 + 2?\"}\n";
    std::fs::write(&input, prompts).expect("write");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
            .args(["score", "--config", "examples/tiergate.toml", "--input"])
            .arg(&input)
            .args(extra)
            .current_dir(repo())
            .output()
            .expect("run tiergate")
    };
    let same = dir.path().join(".").join("prompts.jsonl");
    let out = run(&["--output", same.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(std::fs::read_to_string(&input).expect("read"), prompts, "input intact");

    let scores = dir.path().join("scores.jsonl");
    let out = run(&[
        "--output",
        scores.to_str().expect("utf-8"),
        "--head",
        "nowhere/head.onnx",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--head `nowhere/head.onnx`: no such file"), "{err}");
}
