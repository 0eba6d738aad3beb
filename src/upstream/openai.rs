//! The `openai` backend: any server speaking OpenAI's chat-completions API, over reqwest,
//! with SSE relayed event by event (parsed by `eventsource-stream`, never buffered whole).

use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::resilience::Timeouts;
use super::{Backend, ChunkStream, Completion, StreamItem, redact_secrets};
use crate::error::Error;
use crate::openai::{ChatRequest, ChunkPeek, CompletionPeek, StreamOptions};

pub struct OpenAiBackend {
    tier: String,
    url: String,
    api_key: Result<Option<String>, String>,
    timeouts: Timeouts,
    client: reqwest::Client,
}

/// The key a tier sends, read from its `api_key_env` (none when it names no variable), or
/// why it cannot be called (the variable is unset or empty).
pub fn api_key_from_env(api_key_env: Option<&str>) -> Result<Option<String>, String> {
    match api_key_env {
        None => Ok(None),
        Some(var) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(format!(
                "set the environment variable `{var}` to the upstream API key and restart tiergate"
            )),
        },
    }
}

impl OpenAiBackend {
    pub fn new(tier: &str, base_url: &str, api_key_env: Option<&str>, timeouts: Timeouts) -> Result<Self, String> {
        let api_key = api_key_from_env(api_key_env);
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build HTTP client for tier `{tier}`: {e}"))?;
        Ok(OpenAiBackend {
            tier: tier.to_owned(),
            url: format!("{base_url}/chat/completions"),
            api_key,
            timeouts,
            client,
        })
    }

    /// Whether the tier can be called at all (an API key it needs may be missing).
    pub fn missing_key(&self) -> Option<&str> {
        self.api_key.as_ref().err().map(String::as_str)
    }

    /// Sends the request and waits for the response headers, at most `first_token`.
    async fn send(&self, req: &ChatRequest) -> Result<reqwest::Response, Error> {
        let key = self.api_key.as_ref().map_err(|detail| Error::TierUnavailable {
            tier: self.tier.clone(),
            detail: detail.clone(),
        })?;
        let mut builder = self.client.post(&self.url).timeout(self.timeouts.total).json(req);
        if let Some(k) = key {
            builder = builder.bearer_auth(k);
        }
        let started = Instant::now();
        let resp = tokio::time::timeout(self.timeouts.first_token, builder.send())
            .await
            .map_err(|_| self.timeout("first token"))?
            .map_err(|e| self.transport_error(&e, false, started.elapsed()))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.status_error(resp).await)
    }

    fn timeout(&self, phase: &'static str) -> Error {
        let limit = match phase {
            "connect" => self.timeouts.connect,
            "first token" => self.timeouts.first_token,
            _ => self.timeouts.total,
        };
        Error::UpstreamTimeout {
            tier: self.tier.clone(),
            secs: limit.as_secs_f64(),
            phase,
        }
    }

    /// `answering`: the response had begun (its body was being read).
    fn transport_error(&self, e: &reqwest::Error, answering: bool, elapsed: Duration) -> Error {
        if e.is_timeout() {
            let (phase, secs) = timeout_phase(e.is_connect(), elapsed, &self.timeouts);
            return Error::UpstreamTimeout {
                tier: self.tier.clone(),
                secs,
                phase,
            };
        }
        if e.is_decode() {
            return Error::Upstream {
                tier: self.tier.clone(),
                detail: "the upstream answer could not be read".to_owned(),
            };
        }
        Error::UpstreamUnreachable {
            tier: self.tier.clone(),
            connected: answering || !e.is_connect(),
        }
    }

    async fn status_error(&self, resp: reqwest::Response) -> Error {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Bounded read: an error body is only mined for its `error.message`.
        let body = tokio::time::timeout(Duration::from_secs(5), resp.bytes())
            .await
            .ok()
            .and_then(Result::ok);
        let upstream_message = body
            .as_deref()
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
            .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned));
        let tier = self.tier.clone();
        match status {
            429 => Error::UpstreamRateLimited { tier, retry_after },
            401 | 403 => Error::Upstream {
                tier,
                detail: format!(
                    "the upstream refused the gateway's credentials (HTTP {status}); check the tier's API key"
                ),
            },
            400..=499 => {
                let keys: Vec<&str> = self.api_key.iter().flatten().map(String::as_str).collect();
                let detail = upstream_message
                    .map(|m| redact_secrets(&m.chars().take(500).collect::<String>(), &keys))
                    .unwrap_or_else(|| format!("HTTP {status}"));
                Error::UpstreamRejected { tier, status, detail }
            }
            _ => Error::UpstreamStatus { tier, status },
        }
    }
}

/// Which limit a reqwest timeout hit, and its seconds. reqwest runs two timers, the connect
/// timeout and the whole call's; a timeout before the whole call's limit that is not the
/// connect one came from the network (the operating system giving up on a connection), so it
/// is named by how long the call had run, not by a limit it never reached.
fn timeout_phase(is_connect: bool, elapsed: Duration, limits: &Timeouts) -> (&'static str, f64) {
    if is_connect {
        ("connect", limits.connect.as_secs_f64())
    } else if elapsed < limits.total {
        ("network", elapsed.as_secs_f64())
    } else {
        ("total", limits.total.as_secs_f64())
    }
}

impl Backend for OpenAiBackend {
    fn complete(&self, mut req: ChatRequest) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async move {
            req.stream = None;
            req.stream_options = None;
            let started = Instant::now();
            let resp = self.send(&req).await?;
            let body = resp
                .bytes()
                .await
                .map_err(|e| self.transport_error(&e, true, started.elapsed()))?;
            let peek: CompletionPeek = serde_json::from_slice(&body).map_err(|_| Error::Upstream {
                tier: self.tier.clone(),
                detail: "the upstream answer is not a chat completion".to_owned(),
            })?;
            // An SDK reads `choices[0]`: an answer without one is no answer.
            if peek.choices.is_empty() {
                return Err(Error::Upstream {
                    tier: self.tier.clone(),
                    detail: "the upstream answer has no choices".to_owned(),
                });
            }
            let content = completion_text(&peek);
            Ok(Completion {
                body,
                usage: peek.usage,
                content,
                confidence: None,
            })
        })
    }

    fn stream(&self, mut req: ChatRequest) -> BoxFuture<'_, Result<ChunkStream, Error>> {
        Box::pin(async move {
            req.stream = Some(true);
            req.stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = Some(true);
            let started = Instant::now();
            let resp = self.send(&req).await?;
            let is_json = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.trim_start().starts_with("application/json"));
            if is_json {
                return Err(Error::UpstreamBroken {
                    tier: self.tier.clone(),
                    detail: "the upstream answered the stream request with a whole JSON answer, not an event stream"
                        .to_owned(),
                });
            }
            let tier = self.tier.clone();
            let total = self.timeouts.total.as_secs_f64();
            let events = resp.bytes_stream().eventsource().map_err(move |e| {
                let is_timeout = matches!(&e, eventsource_stream::EventStreamError::Transport(t) if t.is_timeout());
                (is_timeout, e.to_string())
            });
            let mut items = events.filter_map(move |ev| {
                let item = match ev {
                    // Unnamed events are "message"; OpenAI's chunks come only as those.
                    Ok(ev) if ev.event == "message" => Some(chunk_item(&tier, ev.data.trim())),
                    Ok(ev) if ev.event == "error" => Some(Err(Error::Upstream {
                        tier: tier.clone(),
                        detail: "the upstream reported an error in its stream".to_owned(),
                    })),
                    // Keep-alives and other named events carry no chunk: passed on as data,
                    // a client's SDK would read them as chunks without `choices`.
                    Ok(_) => None,
                    Err((true, _)) => Some(Err(Error::UpstreamTimeout {
                        tier: tier.clone(),
                        secs: total,
                        phase: "total",
                    })),
                    Err((false, _)) => Some(Err(Error::Upstream {
                        tier: tier.clone(),
                        detail: "the upstream stream broke off".to_owned(),
                    })),
                };
                futures::future::ready(item)
            });
            // Nothing reaches the client before the first event, so until then a failure
            // can still be retried or fall back to another tier.
            let left = self.timeouts.first_token.saturating_sub(started.elapsed());
            let first = tokio::time::timeout(left, items.next())
                .await
                .map_err(|_| self.timeout("first token"))?;
            match first {
                None => Err(Error::UpstreamUnreachable {
                    tier: self.tier.clone(),
                    connected: true,
                }),
                // A dead tier like a 5xx, not an answer gone bad.
                Some(Err(Error::Upstream { tier, detail })) => Err(Error::UpstreamBroken {
                    tier,
                    detail: format!("{detail}, before its first chunk"),
                }),
                Some(Err(e)) => Err(e),
                Some(Ok(StreamItem::Done)) => Err(Error::UpstreamBroken {
                    tier: self.tier.clone(),
                    detail: "the upstream stream ended ([DONE]) before its first chunk".to_owned(),
                }),
                Some(Ok(item)) => Ok(futures::stream::once(async { Ok(item) }).chain(items).boxed()),
            }
        })
    }
}

/// What a whole answer generated (text, tool calls, reasoning), for the token estimate
/// when the upstream reports no usage.
fn completion_text(peek: &CompletionPeek) -> String {
    peek.choices
        .iter()
        .filter_map(|c| c.message.as_ref())
        .map(|m| {
            let text = m.content.as_ref().and_then(Value::as_str).unwrap_or_default();
            let calls = crate::openai::calls_text(m.rest.get("tool_calls"), m.rest.get("function_call"));
            let reasoning = m
                .rest
                .get("reasoning_content")
                .and_then(Value::as_str)
                .unwrap_or_default();
            format!("{text}{calls}{reasoning}")
        })
        .collect()
}

/// One SSE `data:` payload of an upstream stream, checked and peeked at.
fn chunk_item(tier: &str, data: &str) -> Result<StreamItem, Error> {
    if data == "[DONE]" {
        return Ok(StreamItem::Done);
    }
    let peek: ChunkPeek = serde_json::from_str(data).map_err(|_| Error::Upstream {
        tier: tier.to_owned(),
        detail: "the upstream sent a malformed stream chunk".to_owned(),
    })?;
    if peek.error.is_some() {
        return Err(Error::Upstream {
            tier: tier.to_owned(),
            detail: "the upstream reported an error in its stream".to_owned(),
        });
    }
    // Text, tool calls and reasoning are all generated (and billed): they time the first
    // token and make the estimate when no usage arrives.
    let content: Option<String> = {
        let parts: Vec<String> = peek
            .choices
            .iter()
            .filter_map(|c| c.delta.as_ref())
            .filter(|d| {
                d.content.is_some()
                    || d.tool_calls.is_some()
                    || d.function_call.is_some()
                    || d.reasoning_content.is_some()
            })
            .map(crate::openai::DeltaPeek::generated)
            .collect();
        if parts.is_empty() { None } else { Some(parts.concat()) }
    };
    Ok(StreamItem::Chunk {
        json: Bytes::copy_from_slice(data.as_bytes()),
        usage: peek.usage,
        finished: peek.choices.iter().any(|c| c.finish_reason.is_some()),
        usage_only: peek.choices.is_empty() && peek.usage.is_some(),
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_named_by_the_limit_it_hit_or_by_how_long_the_call_ran() {
        let limits = Timeouts {
            connect: Duration::from_secs(5),
            first_token: Duration::from_secs(60),
            total: Duration::from_secs(300),
        };
        let at = Duration::from_millis(31_500);
        assert_eq!(timeout_phase(true, at, &limits), ("connect", 5.0));
        // Seen under a flood of connections: the OS gave up after ~31 s, not the 300 s limit.
        assert_eq!(timeout_phase(false, at, &limits), ("network", 31.5));
        assert_eq!(
            timeout_phase(false, Duration::from_secs(300), &limits),
            ("total", 300.0)
        );
    }

    #[test]
    fn tool_calls_and_reasoning_count_as_generated_text() {
        let generated = |data: &str| match chunk_item("t", data) {
            Ok(StreamItem::Chunk { content, .. }) => content,
            _ => panic!("a chunk: {data}"),
        };
        let call = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"weather","arguments":"{\"city\":"}}]}}]}"#;
        assert_eq!(generated(call).as_deref(), Some(r#"weather{"city":"#));
        let legacy = r#"{"choices":[{"delta":{"function_call":{"arguments":"Paris"}}}]}"#;
        assert_eq!(generated(legacy).as_deref(), Some("Paris"));
        let thinking = r#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#;
        assert_eq!(generated(thinking).as_deref(), Some("hmm"));
        // An odd shape adds nothing and is not a malformed chunk.
        let odd = r#"{"choices":[{"delta":{"tool_calls":{"x":1},"content":"a"}}]}"#;
        assert_eq!(generated(odd).as_deref(), Some("a"));
        assert_eq!(generated(r#"{"choices":[{"finish_reason":"stop","delta":{}}]}"#), None);
        let whole: CompletionPeek = serde_json::from_str(
            r#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"weather","arguments":"{}"}}]}}]}"#,
        )
        .expect("completion");
        assert_eq!(completion_text(&whole), "weather{}");
    }
}
