//! The `local` tier against the real test model (SmolLM2-135M, provisioned by
//! `python3 scripts/provision.py --test`): greedy output pinned to the Python reference,
//! sampling, limits, stop sequences, usage, and OpenAI's shapes.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};
use tiergate::local::engine::{Event, Finish};
use tiergate::local::{LocalBackend, LocalSettings};
use tiergate::openai::ChatRequest;

pub const TEST_MODEL: &str = "smollm2-135m-instruct";

pub fn model_dir() -> PathBuf {
    let dir = tiergate::cache::cache_dir().join("models").join(TEST_MODEL);
    assert!(
        dir.join("model.onnx").exists(),
        "the test model is missing at `{}`: run `python3 scripts/provision.py --test`",
        dir.display()
    );
    dir
}

pub fn settings() -> LocalSettings {
    LocalSettings {
        model_dir: model_dir(),
        threads: 2,
        spinning: true,
        max_concurrent: 4,
        queue_capacity: 16,
        max_context_tokens: None,
        default_max_tokens: Some(64),
    }
}

/// One engine shared by the tests that talk to the backend directly (loading the model
/// once keeps the suite fast).
fn backend() -> &'static LocalBackend {
    static B: OnceLock<LocalBackend> = OnceLock::new();
    B.get_or_init(|| {
        tiergate::onnx::init(None)
            .expect("ONNX Runtime loads (run `python3 scripts/provision.py`)");
        LocalBackend::start("local", TEST_MODEL, &settings()).expect("test model loads")
    })
}

fn request(body: Value) -> ChatRequest {
    ChatRequest::parse(body.to_string().as_bytes()).expect("valid request")
}

fn ask(text: &str, extra: Value) -> ChatRequest {
    let mut body = json!({"model": TEST_MODEL, "messages": [{"role": "user", "content": text}]});
    if let Value::Object(e) = extra {
        body.as_object_mut().expect("object").extend(e);
    }
    request(body)
}

/// Runs a job on the shared engine and returns the text and the summary.
async fn generate(req: ChatRequest) -> (String, Finish) {
    let b = backend();
    let job = b.prepare(&req).expect("valid job");
    let mut rx = b.engine().submit(job).expect("not saturated");
    let mut text = String::new();
    loop {
        match rx.recv().await.expect("engine answers") {
            Event::Text(t) => text.push_str(&t),
            Event::Done(f) => return (text, f),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

#[derive(serde::Deserialize)]
struct Reference {
    prompt: String,
    prompt_ids: Vec<u32>,
    max_new_tokens: usize,
    output_ids: Vec<u32>,
    text: String,
}

fn reference() -> Reference {
    let path = model_dir().join("reference_greedy.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference_greedy.json"))
        .expect("reference parses")
}

#[tokio::test]
async fn greedy_output_matches_the_python_reference_token_for_token() {
    let r = reference();
    let req = ask(&r.prompt, json!({"max_tokens": r.max_new_tokens}));
    let job = backend().prepare(&req).expect("job");
    assert_eq!(
        job.prompt, r.prompt_ids,
        "chat template + tokenizer match transformers"
    );
    let (text, f) = generate(req).await;
    assert_eq!(f.output_ids, r.output_ids);
    assert_eq!(text, r.text);
    assert_eq!(f.reason.as_str(), "stop");
    assert_eq!(f.prompt_tokens, r.prompt_ids.len());
    assert_eq!(f.completion_tokens, r.output_ids.len());
}
