//! The `local` backend: a small language model answering in-process through ONNX Runtime.
//! This file turns an OpenAI chat request into a generation job (chat template, tokens,
//! sampling parameters, limits) and the engine's events back into OpenAI's response and
//! chunk shapes. The model runs on the engine's own thread (`engine`), never here.

pub mod confidence;
pub mod draft;
pub mod engine;
pub mod lookup;
pub mod model;
pub mod sampling;
pub mod template;
pub mod text;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::Error;
use crate::openai::{ChatRequest, Usage};
use crate::upstream::{Backend, ChunkStream, Completion, StreamItem};
use engine::{Engine, EngineSettings, Event, Finish, Job, Used};
use model::{ModelFiles, SessionSettings};
use sampling::SamplingParams;
use template::{ChatTemplate, TurnView};

/// Settings of one local tier (validated config).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSettings {
    pub model_dir: PathBuf,
    /// ONNX Runtime intra-op threads for the model.
    pub threads: usize,
    /// Whether idle ONNX Runtime threads spin (lower latency on an idle machine, wasted CPU
    /// on a busy one).
    pub spinning: bool,
    /// Most tokens prompt lookup drafts per greedy decode step (0: no speculative decoding);
    /// `None`: the model decides ([`lookup::default_draft_tokens`]).
    pub draft_tokens: Option<usize>,
    /// Use the model's trained draft head ([`draft`]) when it has one and drafting is on.
    pub draft_head: bool,
    pub max_concurrent: usize,
    pub queue_capacity: usize,
    /// Tokens (prompt + answer) allowed per request; at most the model's context window.
    pub max_context_tokens: Option<usize>,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: Option<usize>,
}

/// What every request of a local tier shares: the model's files and the engine.
struct Shared {
    engine: Engine,
    template: ChatTemplate,
    context_tokens: usize,
    default_max_tokens: usize,
    draft_tokens: usize,
}

pub struct LocalBackend {
    tier: String,
    model: String,
    shared: Arc<Shared>,
}

/// `max_tokens` when neither the request nor the config gives one.
const FALLBACK_MAX_TOKENS: usize = 512;

/// The model's files and chat template as `start` reads them, without loading the graph.
fn files_and_template(tier: &str, s: &LocalSettings) -> Result<(ModelFiles, ChatTemplate), String> {
    let files = ModelFiles::load(&s.model_dir).map_err(|e| {
        format!("tier `{tier}`: {e}; provision the model (see `python3 scripts/provision.py --list`) or set `tiers.{tier}.model_dir`")
    })?;
    let template = ChatTemplate::new(&files.chat_template, &files.bos_token, &files.eos_token)
        .map_err(|e| format!("tier `{tier}`: {e}"))?;
    let graph = files.dir.join("model.onnx");
    if !graph.is_file() {
        return Err(format!(
            "tier `{tier}`: `{}` is not a file; provision the model (see `python3 scripts/provision.py --list`) or set `tiers.{tier}.model_dir`",
            graph.display()
        ));
    }
    Ok((files, template))
}

/// What `start` would refuse in the tier's model directory, in milliseconds rather than the
/// seconds loading the graph takes (`tiergate check`). A graph ONNX Runtime cannot load is
/// found only by `start`.
pub fn preflight(tier: &str, s: &LocalSettings) -> Result<(), String> {
    files_and_template(tier, s).map(drop)
}

impl LocalBackend {
    /// Loads the model and starts its engine thread (blocking; seconds for a large model).
    pub fn start(tier: &str, model: &str, s: &LocalSettings) -> Result<LocalBackend, String> {
        let (files, template) = files_and_template(tier, s)?;
        let context_tokens = s
            .max_context_tokens
            .map_or(files.context_tokens, |m| m.min(files.context_tokens));
        let default_max_tokens = s
            .default_max_tokens
            .or_else(|| generation_max_new_tokens(&files.dir))
            .unwrap_or(FALLBACK_MAX_TOKENS);
        let draft_tokens = s.draft_tokens.unwrap_or(lookup::default_draft_tokens(files.rows_exact));
        let rows_exact = files.rows_exact;
        let engine = Engine::start(
            Arc::new(files),
            EngineSettings {
                session: SessionSettings {
                    threads: s.threads,
                    spinning: s.spinning,
                },
                max_concurrent: s.max_concurrent,
                queue_capacity: s.queue_capacity,
                draft_head: s.draft_head && draft_tokens > 0,
            },
        )
        .map_err(|e| format!("tier `{tier}`: {e}"))?;
        tracing::info!(
            tier,
            rows_exact,
            draft_tokens,
            draft_head = engine.draft_head,
            "local model loaded"
        );
        Ok(LocalBackend {
            tier: tier.to_owned(),
            model: model.to_owned(),
            shared: Arc::new(Shared {
                engine,
                template,
                context_tokens,
                default_max_tokens,
                draft_tokens,
            }),
        })
    }

    /// Requests running or waiting in the engine now.
    pub fn in_flight(&self) -> usize {
        self.shared.engine.in_flight()
    }

    /// The engine, for callers that drive generation jobs themselves (tests, benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// The generation job a request becomes (blocking: renders and tokenizes the prompt).
    pub fn prepare(&self, req: &ChatRequest) -> Result<Job, Error> {
        prepare(&self.shared, req)
    }

    /// Validates the request, renders and tokenizes the prompt (off the async workers: it
    /// is CPU work), and admits it to the engine.
    async fn admit(&self, req: ChatRequest, assess_after: usize) -> Result<UnboundedReceiver<Event>, Error> {
        let shared = self.shared.clone();
        let job = tokio::task::spawn_blocking(move || prepare(&shared, &req))
            .await
            .map_err(|e| self.engine_error(format!("request preparation failed: {e}")))??;
        let job = Job { assess_after, ..job };
        self.shared.engine.submit(job).map_err(|_| Error::LocalSaturated {
            tier: self.tier.clone(),
        })
    }

    fn engine_error(&self, detail: String) -> Error {
        Error::LocalEngine {
            tier: self.tier.clone(),
            detail,
        }
    }
}

fn generation_max_new_tokens(dir: &std::path::Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("generation_config.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("max_new_tokens").and_then(Value::as_u64).map(|n| n as usize)
}

fn invalid(message: String, param: &str) -> Error {
    Error::invalid(message, Some(param))
}

/// The request as a generation job, or the 400 that explains what is wrong with it.
fn prepare(shared: &Shared, req: &ChatRequest) -> Result<Job, Error> {
    let p = &req.rest;
    if let Some(n) = p.get("n").filter(|v| !v.is_null())
        && n.as_u64() != Some(1)
    {
        return Err(invalid(
            "the local tier generates one choice: `n` must be 1".into(),
            "n",
        ));
    }
    unsupported(req)?;
    let turns = turns(req)?;
    let text = shared.template.render(&turns).map_err(|e| invalid(e, "messages"))?;
    let files = &shared.engine.files;
    // The template already holds the special tokens (`<|im_start|>`…): encode them as the
    // single ids they are, and add nothing (no BOS: the template starts the prompt).
    let enc = files
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| invalid(format!("the prompt cannot be tokenized: {e}"), "messages"))?;
    let prompt = enc.get_ids().to_vec();
    let context = shared.context_tokens;
    if prompt.len() >= context {
        return Err(Error::InvalidRequest {
            message: format!(
                "This model's maximum context length is {context} tokens. However, your messages resulted in {} tokens. Please reduce the length of the messages.",
                prompt.len()
            ),
            param: Some("messages".into()),
            code: "context_length_exceeded",
        });
    }
    let room = context - prompt.len();
    let max_tokens = match requested_max_tokens(p)? {
        Some((m, param)) => {
            if m > room {
                return Err(Error::InvalidRequest {
                    message: format!(
                        "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the messages, {m} in the completion). Please reduce the length of the messages or completion.",
                        prompt.len() + m,
                        prompt.len()
                    ),
                    param: Some(param.into()),
                    code: "context_length_exceeded",
                });
            }
            m
        }
        None => shared
            .default_max_tokens
            .min(room)
            .min(req.output_cap.map_or(usize::MAX, |c| c as usize)),
    };
    Ok(Job {
        prompt,
        max_tokens,
        sampling: sampling(req)?,
        stop: req.stop_sequences(),
        ignore_eos: match p.get("ignore_eos") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid("`ignore_eos` must be a boolean".into(), "ignore_eos"));
            }
        },
        draft_tokens: shared.draft_tokens,
        draft_head: true,
        assess_after: 0,
    })
}

/// Refuses what the local tier cannot honour and a client relies on: a tool call it may
/// be required to make, a JSON answer, log-probabilities. Answering such a request with
/// plain text would be a wrong answer that looks right, so it is OpenAI's 400 for a model
/// that lacks the feature instead (policies send these requests to a cloud tier first).
fn unsupported(req: &ChatRequest) -> Result<(), Error> {
    let p = &req.rest;
    let refuse = |what: &str, param: &str| Error::InvalidRequest {
        message: format!(
            "Unsupported parameter: {what} is not supported by the local tier's model `{}`; route such requests to another tier",
            req.model
        ),
        param: Some(param.into()),
        code: "unsupported_parameter",
    };
    // `tool_choice: "none"` forbids calls: a plain answer is then what was asked for.
    let choice_none = ["tool_choice", "function_call"]
        .iter()
        .any(|k| p.get(*k).and_then(Value::as_str) == Some("none"));
    if let Some(field) = req.tools_field()
        && !choice_none
    {
        return Err(refuse(&format!("'{field}' (tool calling)"), field));
    }
    if req.json_mode() {
        return Err(refuse("'response_format' of a JSON type", "response_format"));
    }
    if p.get("logprobs") == Some(&Value::Bool(true)) {
        return Err(refuse("'logprobs'", "logprobs"));
    }
    Ok(())
}

/// The conversation as the chat template sees it; text content only.
fn turns(req: &ChatRequest) -> Result<Vec<TurnView>, Error> {
    let mut out = Vec::with_capacity(req.messages.len());
    let mut any_text = false;
    for (i, m) in req.messages.iter().enumerate() {
        let content = match &m.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (
                        part.get("type").and_then(Value::as_str),
                        part.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(t);
                        }
                        _ => {
                            return Err(invalid(
                                format!(
                                    "the local tier reads text only: `messages[{i}].content[{j}]` is not a text part"
                                ),
                                &format!("messages[{i}].content[{j}]"),
                            ));
                        }
                    }
                }
                text
            }
            Some(_) => {
                return Err(invalid(
                    format!("`messages[{i}].content` must be a string or an array of text parts"),
                    &format!("messages[{i}].content"),
                ));
            }
        };
        any_text |= !content.trim().is_empty();
        // OpenAI's `developer` messages are the system prompt of its newer models; chat
        // templates know only `system` (SmolLM2's would add its default system prompt and
        // show the instructions under a role the model was never trained on).
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        out.push(TurnView {
            role: role.to_owned(),
            content,
        });
    }
    if !any_text {
        return Err(Error::InvalidRequest {
            message:
                "the prompt is empty: every message's content is empty or blank; send at least one message with text"
                    .into(),
            param: Some("messages".into()),
            code: "empty_prompt",
        });
    }
    Ok(out)
}

/// `max_completion_tokens`, else the older `max_tokens`.
fn requested_max_tokens(p: &Map<String, Value>) -> Result<Option<(usize, &'static str)>, Error> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match p.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(Some((n as usize, key))),
                    _ => Err(invalid(format!("`{key}` must be an integer >= 1"), key)),
                };
            }
        }
    }
    Ok(None)
}

fn number(p: &Map<String, Value>, key: &str, ok: impl Fn(f64) -> bool, want: &str) -> Result<Option<f64>, Error> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if ok(x) => Ok(Some(x)),
            _ => Err(invalid(format!("`{key}` must be {want}"), key)),
        },
    }
}

/// Sampling settings. Without `temperature` the model's own default applies, which for
/// the provisioned models is greedy (`generation_config.json` `do_sample: false`): a small
/// model answers better greedy than at OpenAI's default temperature 1.
fn sampling(req: &ChatRequest) -> Result<SamplingParams, Error> {
    let p = &req.rest;
    let temperature = number(
        p,
        "temperature",
        |t| (0.0..=2.0).contains(&t),
        "a number between 0 and 2",
    )?;
    // 0 keeps only the most likely token (the nucleus always holds one), as OpenAI accepts.
    let top_p = number(p, "top_p", |t| (0.0..=1.0).contains(&t), "a number in 0..=1")?;
    let top_k = match p.get("top_k") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64() {
            // vLLM's convention: -1 (like 0) means no limit.
            Some(k) if k >= -1 => k.max(0) as usize,
            _ => {
                return Err(invalid(
                    "`top_k` must be an integer >= 0 (or -1 for no limit)".into(),
                    "top_k",
                ));
            }
        },
    };
    let seed = req.seed();
    Ok(SamplingParams {
        temperature: temperature.unwrap_or(0.0) as f32,
        top_p: top_p.unwrap_or(1.0) as f32,
        top_k,
        // Without a seed every answer draws fresh randomness; uuid's v4 generator is the
        // process's OS-seeded source.
        seed: seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

fn usage_json(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

/// A sequence's first event, or the error it ended with before producing one.
async fn first_event(rx: &mut UnboundedReceiver<Event>, tier: &str) -> Result<Event, Error> {
    let detail = match rx.recv().await {
        Some(Event::Failed(e)) => e,
        Some(e) => return Ok(e),
        None => "the local engine stopped".into(),
    };
    Err(Error::LocalEngine {
        tier: tier.to_owned(),
        detail,
    })
}

fn usage_of(f: &Finish) -> Usage {
    usage(Used {
        prompt_tokens: f.prompt_tokens,
        completion_tokens: f.completion_tokens,
    })
}

fn usage(u: Used) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens as u64,
        completion_tokens: u.completion_tokens as u64,
    }
}

impl Backend for LocalBackend {
    fn complete(&self, req: ChatRequest) -> BoxFuture<'_, Result<Completion, Error>> {
        async move {
            let mut rx = self.admit(req, 0).await?;
            let mut content = String::new();
            let finish = loop {
                match rx.recv().await {
                    Some(Event::Text { text, used }) => {
                        content.push_str(&text);
                        // A client that leaves stops this answer; its row still counts this.
                        crate::upstream::report_progress(usage(used));
                    }
                    // Not asked for (`assess_after` 0).
                    Some(Event::Prefix(_)) => {}
                    Some(Event::Done(f)) => break f,
                    Some(Event::Failed(e)) => return Err(self.engine_error(e)),
                    None => return Err(self.engine_error("the local engine stopped".into())),
                }
            };
            let body = json!({
                "id": completion_id(),
                "object": "chat.completion",
                "created": now_secs(),
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": null},
                    "logprobs": null,
                    "finish_reason": finish.reason.as_str(),
                }],
                "usage": usage_json(&finish),
                "system_fingerprint": null,
            });
            Ok(Completion {
                body: Bytes::from(body.to_string()),
                usage: Some(usage_of(&finish)),
                content,
                confidence: Some(finish.confidence.score),
            })
        }
        .boxed()
    }

    fn stream(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChunkStream, Error>> {
        self.stream_assessed(req, 0)
    }

    fn stream_assessed(&self, req: ChatRequest, hold_tokens: usize) -> BoxFuture<'_, Result<ChunkStream, Error>> {
        async move {
            // OpenAI puts `"usage": null` on every chunk when the client asked for usage;
            // mirror that so the shapes are the cloud's.
            let with_usage_field = req
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
            let mut rx = self.admit(req, hold_tokens).await?;
            // Prefill is where a local answer fails (the graph rejects the input, the
            // engine is gone); waiting for its first event makes that an HTTP error or a
            // fallback to the next tier instead of an error inside a 200 stream, as the
            // OpenAI backend does.
            let mut first = Some(first_event(&mut rx, &self.tier).await?);
            let id = completion_id();
            let created = now_secs();
            let model = self.model.clone();
            let tier = self.tier.clone();
            let chunk = move |choices: Value, usage: Option<Value>| -> Bytes {
                let mut c = json!({
                    "id": id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": null,
                    "choices": choices,
                });
                if let Some(u) = usage {
                    c["usage"] = u;
                } else if with_usage_field {
                    c["usage"] = Value::Null;
                }
                Bytes::from(c.to_string())
            };
            let s = async_stream::stream! {
                let delta = |d: Value, finish: Option<&str>| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]);
                yield Ok(StreamItem::Chunk {
                    json: chunk(delta(json!({"role": "assistant", "content": "", "refusal": null}), None), None),
                    usage: None,
                    content: None,
                    finished: false,
                    usage_only: false,
                });
                loop {
                    let event = match first.take() {
                        Some(e) => Some(e),
                        None => rx.recv().await,
                    };
                    match event {
                        Some(Event::Text { text, used }) => {
                            yield Ok(StreamItem::Chunk {
                                json: chunk(delta(json!({"content": text}), None), None),
                                // Not shown to the client: exact counts for the ledger, should
                                // the stream be cut off before its usage chunk.
                                usage: Some(usage(used)),
                                content: Some(text),
                                finished: false,
                                usage_only: false,
                            });
                        }
                        Some(Event::Prefix(p)) => {
                            yield Ok(StreamItem::Assessed { confidence: p.confidence.score, usage: usage(p.used) });
                        }
                        Some(Event::Done(f)) => {
                            // An answer that ended within the held prefix is judged whole.
                            if hold_tokens > 0 && f.completion_tokens <= hold_tokens {
                                yield Ok(StreamItem::Assessed { confidence: f.confidence.score, usage: usage_of(&f) });
                            }
                            yield Ok(StreamItem::Chunk {
                                json: chunk(delta(json!({}), Some(f.reason.as_str())), None),
                                usage: None,
                                content: None,
                                finished: true,
                                usage_only: false,
                            });
                            // Always sent: the gateway accounts exact usage from it and
                            // shows it only to clients that asked for it.
                            yield Ok(StreamItem::Chunk {
                                json: chunk(json!([]), Some(usage_json(&f))),
                                usage: Some(usage_of(&f)),
                                content: None,
                                finished: true,
                                usage_only: true,
                            });
                            yield Ok(StreamItem::Done);
                            return;
                        }
                        Some(Event::Failed(e)) => {
                            yield Err(Error::LocalEngine { tier: tier.clone(), detail: e });
                            return;
                        }
                        None => {
                            yield Err(Error::LocalEngine { tier: tier.clone(), detail: "the local engine stopped".into() });
                            return;
                        }
                    }
                }
            };
            Ok(s.boxed())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    #[tokio::test]
    async fn a_sequence_failing_before_its_first_event_is_an_error_not_a_stream() {
        let (tx, mut rx) = unbounded_channel();
        tx.send(Event::Failed("prefill: bad input".into())).unwrap();
        match first_event(&mut rx, "local").await {
            Err(Error::LocalEngine { tier, detail }) => {
                assert_eq!(tier, "local");
                assert_eq!(detail, "prefill: bad input");
            }
            other => panic!("expected a local engine error, got {other:?}"),
        }

        let (tx, mut rx) = unbounded_channel::<Event>();
        drop(tx);
        assert!(matches!(
            first_event(&mut rx, "local").await,
            Err(Error::LocalEngine { detail, .. }) if detail == "the local engine stopped"
        ));

        let (tx, mut rx) = unbounded_channel();
        tx.send(Event::Text {
            text: "Hi".into(),
            used: Default::default(),
        })
        .unwrap();
        tx.send(Event::Failed("later".into())).unwrap();
        assert!(matches!(first_event(&mut rx, "local").await, Ok(Event::Text { text, .. }) if text == "Hi"));
        // Later events stay for the stream, which reports a failure after the first token in-band.
        assert!(matches!(rx.recv().await, Some(Event::Failed(_))));
    }
}
