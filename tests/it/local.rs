//! The `local` tier against the real test model (SmolLM2-135M, provisioned by
//! `python3 scripts/provision.py --test`): greedy output pinned to the Python reference,
//! sampling, limits, stop sequences, usage, and OpenAI's shapes.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};
use tiergate::local::engine::{Event, Finish, Job};
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
        draft_tokens: None,
        draft_head: true,
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
        tiergate::onnx::init(None).expect("ONNX Runtime loads (run `python3 scripts/provision.py`)");
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
    generate_on(backend(), req).await
}

async fn generate_on(b: &LocalBackend, req: ChatRequest) -> (String, Finish) {
    run_job(b, b.prepare(&req).expect("valid job")).await
}

async fn run_job(b: &LocalBackend, job: Job) -> (String, Finish) {
    let mut rx = b.engine().submit(job).expect("not saturated");
    let mut text = String::new();
    loop {
        match rx.recv().await.expect("engine answers") {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Prefix(p) => panic!("a prefix was reported unasked: {p:?}"),
            Event::Done(f) => return (text, f),
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    }
}

#[derive(serde::Deserialize)]
struct Reference {
    prompt: String,
    system: Option<String>,
    prompt_ids: Vec<u32>,
    max_new_tokens: usize,
    output_ids: Vec<u32>,
    text: String,
    finish_reason: Option<String>,
    #[serde(default)]
    more_cases: Vec<Reference>,
}

/// `reference_greedy.json`, written by provisioning: Python onnxruntime's greedy output
/// on the same model file.
fn reference() -> Reference {
    let path = model_dir().join("reference_greedy.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference_greedy.json")).expect("reference parses")
}

/// Every case of `reference`, generated greedily by `backend`, must equal Python's ids.
async fn check_reference(b: &LocalBackend, model: &str, main: &Reference) {
    let mut cases = vec![main];
    cases.extend(main.more_cases.iter());
    for r in cases {
        let mut messages = Vec::new();
        if let Some(s) = &r.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": r.prompt}));
        let req = request(json!({"model": model, "messages": messages, "max_tokens": r.max_new_tokens}));
        let job = b.prepare(&req).expect("job");
        assert_eq!(
            job.prompt, r.prompt_ids,
            "{:?}: chat template + tokenizer match transformers",
            r.prompt
        );
        let (text, f) = generate_on(b, req).await;
        assert_eq!(f.output_ids, r.output_ids, "{:?}", r.prompt);
        // Python decodes the ids lossily: an answer cut inside a character ends there with
        // U+FFFD, where ours ends before the character (as vLLM's does).
        assert_eq!(text, r.text.trim_end_matches('\u{FFFD}'), "{:?}", r.prompt);
        assert_eq!(Some(f.reason.as_str()), r.finish_reason.as_deref());
        assert_eq!(f.prompt_tokens, r.prompt_ids.len());
        assert_eq!(f.completion_tokens, r.output_ids.len());
    }
}

#[tokio::test]
async fn greedy_output_matches_the_python_reference_token_for_token() {
    check_reference(backend(), TEST_MODEL, &reference()).await;
}

#[tokio::test]
#[ignore = "needs the default model: `python3 scripts/provision.py --only default-model`"]
async fn default_model_greedy_output_matches_the_python_reference() {
    let model = "qwen2.5-coder-0.5b-instruct";
    let dir = tiergate::cache::cache_dir().join("models").join(model);
    tiergate::onnx::init(None).expect("ONNX Runtime loads");
    let b = LocalBackend::start(
        "local",
        model,
        &LocalSettings {
            model_dir: dir.clone(),
            ..settings()
        },
    )
    .expect("default model loads");
    let r: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_greedy.json")).expect("reference"))
            .expect("parses");
    check_reference(&b, model, &r).await;
}

/// Prompt-lookup speculation on prompts whose answers copy from them: it drafts, the
/// model confirms drafts, an answer takes fewer forward passes than tokens, the limits and
/// counts hold, and, on the provisioned test model (a `row8` graph, rows exact), the answer
/// is plain one-token greedy decoding's, token for token.
#[tokio::test]
async fn speculative_decoding_confirms_drafts_and_keeps_limits_and_counts() {
    let b = backend();
    let cases = [
        (
            "Extract the key fields from the user's text as a flat JSON object with snake_case keys. Output JSON only.",
            "Invoice INV-2024-0931 from Acme Tools GmbH, dated 2024-11-02, total EUR 1,249.90 including 19% VAT, due within 30 days, IBAN DE44 5001 0517 5407 3249 31.",
        ),
        (
            "Repeat the user's list exactly, one item per line.",
            "apples, pears, plums, cherries, apricots, peaches, figs, dates, grapes, melons",
        ),
    ];
    let mut accepted = 0;
    for (system, user) in cases {
        let req = request(json!({"model": TEST_MODEL, "max_tokens": 40, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]}));
        let spec = || Job {
            draft_tokens: 8,
            ..b.prepare(&req).expect("job")
        };
        let (text, s) = run_job(b, spec()).await;
        let (again, s2) = run_job(b, spec()).await;
        assert_eq!((&again, &s2.output_ids), (&text, &s.output_ids), "deterministic");
        assert!(
            b.engine().files.rows_exact,
            "the test model is provisioned as `row8` (python3 scripts/provision.py --test)"
        );
        let plain = Job {
            draft_tokens: 0,
            ..b.prepare(&req).expect("job")
        };
        let (plain_text, p) = run_job(b, plain).await;
        assert_eq!(p.drafted, 0);
        assert_eq!(
            (&text, &s.output_ids),
            (&plain_text, &p.output_ids),
            "speculation changed the answer"
        );
        assert!(
            s.completion_tokens <= 40 && s.completion_tokens == s.output_ids.len(),
            "{s:?}"
        );
        assert_eq!(s.reason.as_str() == "length", s.completion_tokens == 40, "{s:?}");
        assert!(s.accepted <= s.drafted, "{s:?}");
        // Every pass gives its own token plus the confirmed drafts (a stop id ends early).
        assert!(s.completion_tokens <= 1 + s.decode_steps + s.accepted, "{s:?}");
        assert!(s.completion_tokens > s.decode_steps + s.accepted.min(1), "{s:?}");
        accepted += s.accepted;
        // A sampled request never drafts.
        let mut sampled = spec();
        sampled.sampling.temperature = 0.8;
        let (_, f) = run_job(b, sampled).await;
        assert_eq!((f.drafted, f.decode_steps), (0, f.completion_tokens - 1));
    }
    assert!(
        accepted > 0,
        "no draft was ever confirmed: the test must exercise verification"
    );
}

/// The trained draft head (provisioned beside the test model): where prompt lookup finds
/// nothing it guesses, the model confirms some guesses, and the answer is still plain
/// greedy decoding's, token for token; turned off, nothing is guessed.
#[tokio::test]
async fn the_draft_head_guesses_where_lookup_cannot_and_keeps_the_greedy_answer() {
    let b = backend();
    assert!(
        b.engine().files.draft_head.is_some(),
        "the test model is provisioned with its draft head (python3 scripts/provision.py --test)"
    );
    let (mut guessed, mut right) = (0, 0);
    // Free writing: little for lookup to copy.
    for user in [
        "Write a short paragraph about why the sky is blue.",
        "Give three tips for writing clear emails.",
    ] {
        let req = request(json!({"model": TEST_MODEL, "max_tokens": 48, "messages": [
            {"role": "user", "content": user}]}));
        let job = |draft_tokens, draft_head| Job {
            draft_tokens,
            draft_head,
            ..b.prepare(&req).expect("job")
        };
        let (plain_text, plain) = run_job(b, job(0, true)).await;
        let (lookup_text, lookup) = run_job(b, job(8, false)).await;
        let (text, s) = run_job(b, job(8, true)).await;
        assert_eq!((plain.drafted, lookup.guessed), (0, 0), "{plain:?} {lookup:?}");
        for (t, f) in [(&lookup_text, &lookup), (&text, &s)] {
            assert_eq!(
                (t, &f.output_ids),
                (&plain_text, &plain.output_ids),
                "drafting changed the answer"
            );
        }
        assert!(s.guessed_right <= s.guessed && s.guessed <= s.drafted, "{s:?}");
        assert!(s.accepted >= s.guessed_right, "{s:?}");
        // Every pass gives its own token plus the confirmed drafts.
        assert!(s.completion_tokens <= 1 + s.decode_steps + s.accepted, "{s:?}");
        guessed += s.guessed;
        right += s.guessed_right;
    }
    assert!(right > 0, "no guess was ever confirmed ({guessed} made)");
}

/// Rolling the cache back keeps exactly the first positions: a cache of A + B cut to A
/// holds A's keys and values bit for bit.
#[test]
fn kv_cache_truncation_keeps_the_exact_prefix() {
    use tiergate::local::model::{Graph, KvCache, SessionSettings};
    let b = backend();
    let files = &b.engine().files;
    let mut g = Graph::load(
        files,
        SessionSettings {
            threads: 1,
            spinning: false,
        },
    )
    .expect("graph");
    let ids = files
        .tokenizer
        .encode("one two three four five six", false)
        .expect("ids")
        .get_ids()
        .to_vec();
    let mut kv = KvCache::default();
    g.step(&mut kv, &ids, 1, |_| false, None).expect("step");
    let full: Vec<Vec<f32>> = kv.tensors().expect("tensors");
    kv.truncate(2).expect("truncate");
    assert_eq!(kv.len, 2);
    let cut = kv.tensors().expect("tensors");
    let (h, d) = (files.kv_heads, files.head_dim);
    for (f, c) in full.iter().zip(&cut) {
        assert_eq!(c.len(), h * 2 * d);
        for head in 0..h {
            let t = ids.len();
            assert_eq!(
                c[head * 2 * d..(head + 1) * 2 * d],
                f[head * t * d..head * t * d + 2 * d]
            );
        }
    }
    // Past the end, nothing changes.
    kv.truncate(5).expect("no-op");
    assert_eq!(kv.len, 2);
}

#[tokio::test]
async fn max_tokens_ends_the_answer_with_finish_reason_length() {
    let (_, f) = generate(ask(&reference().prompt, json!({"max_completion_tokens": 3}))).await;
    assert_eq!(f.reason.as_str(), "length");
    assert_eq!(f.completion_tokens, 3);
    assert_eq!(f.output_ids, reference().output_ids[..3]);
}

/// A held-back stream is judged on its first tokens: the engine reports the prefix once,
/// between the text pieces, and the answer itself does not change.
#[tokio::test]
async fn the_prefix_is_judged_once_after_its_tokens_and_the_answer_goes_on() {
    let b = backend();
    let req = ask(&reference().prompt, json!({}));
    let (whole, plain) = generate_on(b, req.clone()).await;
    let assessed = |n: usize| Job {
        assess_after: n,
        ..b.prepare(&req).expect("job")
    };
    let mut rx = b.engine().submit(assessed(3)).expect("not saturated");
    let (mut before, mut after, mut prefixes) = (String::new(), String::new(), Vec::new());
    let finish = loop {
        match rx.recv().await.expect("engine answers") {
            Event::Text { text: t, .. } if prefixes.is_empty() => before.push_str(&t),
            Event::Text { text: t, .. } => after.push_str(&t),
            Event::Prefix(p) => prefixes.push(p),
            Event::Done(f) => break f,
            Event::Failed(e) => panic!("generation failed: {e}"),
        }
    };
    let [p] = prefixes[..] else {
        panic!("one prefix: {prefixes:?}")
    };
    assert_eq!(
        (p.used.prompt_tokens, p.used.completion_tokens),
        (plain.prompt_tokens, 3)
    );
    assert!(p.confidence.score > 0.0 && p.confidence.score <= 1.0, "{p:?}");
    assert!(!before.is_empty() && !after.is_empty(), "{before:?} | {after:?}");
    assert_eq!((before + &after, &finish.output_ids), (whole, &plain.output_ids));
    // An answer that ends at the prefix's last token is judged whole, by its `Done`.
    let (_, f) = run_job(b, assessed(plain.completion_tokens)).await;
    assert_eq!(f.output_ids, plain.output_ids);
}

#[tokio::test]
async fn a_stop_sequence_ends_the_answer_and_is_never_emitted() {
    let r = reference();
    let (text, f) = generate(ask(&r.prompt, json!({"stop": ["Paris", "zzz"]}))).await;
    assert_eq!(text, "The capital of France is ");
    assert_eq!(f.reason.as_str(), "stop");
    // The model generated the token that completed the stop text; it is counted.
    assert!(f.completion_tokens < r.output_ids.len(), "{f:?}");
    // A stop string spanning several tokens, given as a plain string.
    let (text, _) = generate(ask(&r.prompt, json!({"stop": "of France"}))).await;
    assert_eq!(text, "The capital ");
}

#[tokio::test]
async fn the_same_seed_gives_the_same_sampled_text() {
    let req = || {
        ask(
            "Write a short poem about the sea.",
            json!({"temperature": 1.2, "top_p": 0.95, "top_k": 50, "seed": 1234, "max_tokens": 24}),
        )
    };
    let (a, fa) = generate(req()).await;
    let (b, fb) = generate(req()).await;
    assert_eq!(a, b);
    assert_eq!(fa.output_ids, fb.output_ids);
    assert!(!a.is_empty());
}

#[test]
fn streaming_detokenization_holds_back_split_characters() {
    let tok = &backend().engine().files.tokenizer;
    let text = "Café 日本語 🎉👍🏽 naïve";
    let ids = tok.encode(text, false).expect("encode").get_ids().to_vec();
    let mut d = tiergate::local::text::Detokenizer::default();
    let mut out = String::new();
    let mut held = 0;
    for &id in &ids {
        match d.push(tok, id).expect("decodes") {
            Some(piece) => out.push_str(&piece),
            None => held += 1,
        }
    }
    if let Some(rest) = d.finish(tok).expect("decodes") {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
    assert!(
        held > 0,
        "some token ended inside a character: the test must exercise that"
    );
}

#[tokio::test]
async fn empty_and_oversized_prompts_are_rejected_before_generation() {
    let b = backend();
    let e = b
        .prepare(&request(json!({"model": TEST_MODEL, "messages": [
            {"role": "system", "content": "  "}, {"role": "user", "content": ""}]})))
        .expect_err("empty");
    assert_eq!((e.status_code().as_u16(), e.code()), (400, "empty_prompt"));
    let long = "hello ".repeat(9000);
    let e = b.prepare(&ask(&long, json!({}))).expect_err("too long");
    assert_eq!((e.status_code().as_u16(), e.code()), (400, "context_length_exceeded"));
    assert!(e.to_string().contains("maximum context length is 8192 tokens"), "{e}");
    let e = b
        .prepare(&ask("hi", json!({"max_tokens": 9000})))
        .expect_err("completion too long");
    assert_eq!(e.code(), "context_length_exceeded");
    let e = b.prepare(&ask("hi", json!({"n": 2}))).expect_err("n");
    assert_eq!(e.envelope()["error"]["param"], "n");
}

#[tokio::test]
async fn top_p_zero_keeps_only_the_most_likely_token() {
    // OpenAI accepts `top_p: 0`; the nucleus then holds the argmax alone, whatever the seed.
    let req = |seed: u64| {
        ask(
            "Write a short poem about the sea.",
            json!({"temperature": 1.5, "top_p": 0, "seed": seed, "max_tokens": 16}),
        )
    };
    let (greedy, _) = generate(ask("Write a short poem about the sea.", json!({"max_tokens": 16}))).await;
    for seed in [1, 2] {
        let (text, _) = generate(req(seed)).await;
        assert_eq!(text, greedy, "seed {seed}");
    }
}

#[tokio::test]
async fn features_the_model_lacks_are_refused_not_ignored() {
    let b = backend();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    for (extra, param) in [
        (json!({"tools": tools}), "tools"),
        (json!({"tools": tools, "tool_choice": "required"}), "tools"),
        (
            json!({"functions": [{"name": "f", "parameters": {"type": "object"}}]}),
            "functions",
        ),
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
            "response_format",
        ),
        (json!({"logprobs": true, "top_logprobs": 2}), "logprobs"),
    ] {
        let e = b
            .prepare(&ask("Weather in Paris?", extra.clone()))
            .expect_err("refused");
        let env = e.envelope();
        assert_eq!(e.status_code().as_u16(), 400, "{extra}");
        assert_eq!(env["error"]["code"], "unsupported_parameter", "{extra}");
        assert_eq!(env["error"]["param"], param, "{extra}");
        assert_eq!(env["error"]["type"], "invalid_request_error", "{extra}");
    }
    // What a plain text answer satisfies is accepted.
    for extra in [
        json!({"tools": tools, "tool_choice": "none"}),
        json!({"tools": []}),
        json!({"tools": null}),
        json!({"response_format": {"type": "text"}}),
        json!({"logprobs": false}),
    ] {
        b.prepare(&ask("Weather in Paris?", extra.clone()))
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
}

#[test]
fn a_developer_message_is_the_system_prompt() {
    // OpenAI's newer clients send their instructions as `developer`; chat templates know
    // `system` (SmolLM2's adds its own default system prompt before any other first role).
    let b = backend();
    let prompt = |role: &str| {
        b.prepare(&request(json!({"model": TEST_MODEL, "messages": [
            {"role": role, "content": "You are a pirate. Always talk like a pirate."},
            {"role": "user", "content": "How are you today?"}]})))
            .expect("valid")
            .prompt
    };
    assert_eq!(prompt("developer"), prompt("system"));
}

#[test]
fn an_answer_cut_inside_a_character_ends_before_it() {
    use tiergate::local::text::Detokenizer;
    let tok = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).expect("tokenizer");
    let text = "Go 👉🏽 now";
    let ids = tok.encode(text, false).expect("encode").get_ids().to_vec();
    // Every cut: what is given out, plus what `finish` adds, is a prefix of the text and never
    // a replacement character.
    for cut in 1..=ids.len() {
        let mut d = Detokenizer::default();
        let mut out = String::new();
        for &id in &ids[..cut] {
            out.push_str(&d.push(&tok, id).expect("push").unwrap_or_default());
        }
        out.push_str(&d.finish(&tok).expect("finish").unwrap_or_default());
        assert!(
            !out.contains('\u{FFFD}') && text.starts_with(&out),
            "cut {cut}: {out:?}"
        );
    }
}
