//! Backends a tier can use, behind one trait so handlers never know which one answered:
//! OpenAI-compatible HTTP servers (`openai`) and the in-process generator (`crate::local`).

pub mod openai;
pub mod resilience;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::error::Error;
use crate::openai::{ChatRequest, Usage};

/// A finished non-streamed answer: the body to return as is, and what it used.
#[derive(Debug)]
pub struct Completion {
    pub body: Bytes,
    pub usage: Option<Usage>,
    /// The answer's text, for token estimates when `usage` is missing.
    pub content: String,
    /// How sure the tier is of its answer, in [0, 1], when it can tell (the local tier).
    pub confidence: Option<f64>,
}

/// One event of a streamed answer.
#[derive(Debug)]
pub enum StreamItem {
    /// A chunk's JSON, forwarded as one SSE `data:` line.
    Chunk {
        json: Bytes,
        usage: Option<Usage>,
        content: Option<String>,
        finished: bool,
        usage_only: bool,
    },
    /// The end of the stream (`data: [DONE]`).
    Done,
    /// The tier's confidence in the answer so far, and what it used so far: sent once, by
    /// a tier that can judge its answers, when asked to (`Backend::stream_assessed`).
    /// Not forwarded to the client.
    Assessed { confidence: f64, usage: Usage },
}

/// What stands between a request and a tier's backend: its retry policy and its circuit
/// breaker. In-process tiers have neither (their failures are not transient).
#[derive(Clone)]
pub struct Guard {
    pub retry: resilience::RetryConfig,
    pub breaker: Option<std::sync::Arc<resilience::Breaker>>,
}

impl Guard {
    pub fn none() -> Guard {
        Guard {
            retry: resilience::RetryConfig {
                max_retries: 0,
                ..resilience::RetryConfig::default()
            },
            breaker: None,
        }
    }
}

pub type ChunkStream = BoxStream<'static, Result<StreamItem, Error>>;

/// What a whole answer has used so far, for a caller that may stop waiting for it (its
/// client left). Set by [`watch_progress`] around the call, reported by a backend that
/// knows its usage as it goes (the local tier); a streamed answer carries this in its items.
pub type Progress = std::sync::Arc<std::sync::Mutex<Option<Usage>>>;

tokio::task_local! {
    static PROGRESS: Progress;
}

/// Runs `call` with `progress` as the slot its backend reports usage into.
pub async fn watch_progress<T>(progress: Progress, call: impl std::future::Future<Output = T>) -> T {
    PROGRESS.scope(progress, call).await
}

/// Reports what the answer in progress has used, if its caller watches (`watch_progress`).
pub fn report_progress(used: Usage) {
    let _ = PROGRESS.try_with(|p| {
        if let Ok(mut slot) = p.lock() {
            *slot = Some(used);
        }
    });
}

pub trait Backend: Send + Sync {
    /// Sends a request that has `stream` unset and returns the whole answer.
    fn complete(&self, req: ChatRequest) -> BoxFuture<'_, Result<Completion, Error>>;
    /// Sends a streaming request; usage must be reported in the stream when the backend
    /// can (the OpenAI backend asks for it with `stream_options.include_usage`).
    fn stream(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChunkStream, Error>>;
    /// `stream`, plus one `StreamItem::Assessed` after the first `hold_tokens` generated
    /// tokens (or before the end of an answer that is not longer), from a tier that can
    /// judge its answers (the local tier); other tiers stream as `stream` does.
    fn stream_assessed(&self, req: ChatRequest, _hold_tokens: usize) -> BoxFuture<'_, Result<ChunkStream, Error>> {
        self.stream(req)
    }
}

/// Removes things that look like credentials from text that came from an upstream, so
/// that an upstream echoing a key never passes it on to a client or a log.
pub fn redact_secrets(text: &str, known: &[&str]) -> String {
    let mut out = text.to_owned();
    for k in known.iter().filter(|k| k.len() >= 4) {
        out = out.replace(k, "[redacted]");
    }
    // OpenAI's key shape, and the gateway's own (`tg-`), should an upstream echo one.
    for prefix in ["sk-", crate::auth::store::KEY_PREFIX] {
        out = redact_words(&out, prefix);
    }
    out
}

/// Replaces every word that starts with `prefix` and has at least 8 key characters after it.
fn redact_words(out: &str, prefix: &str) -> String {
    let mut result = String::with_capacity(out.len());
    let mut rest = out;
    while let Some(pos) = rest.find(prefix) {
        result.push_str(&rest[..pos]);
        let tail = &rest[pos + prefix.len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '*'))
            .unwrap_or(tail.len());
        let starts_word = !rest[..pos].ends_with(|c: char| c.is_ascii_alphanumeric());
        if starts_word && len >= 8 {
            result.push_str("[redacted]");
        } else {
            result.push_str(&rest[pos..pos + prefix.len() + len]);
        }
        rest = &tail[len..];
    }
    result.push_str(rest);
    result
}

#[cfg(test)]
mod tests {
    use super::redact_secrets;

    #[test]
    fn redacts_known_keys_and_key_shaped_words() {
        let s = "Incorrect API key provided: sk-abc123***xyz9. Key topsecretvalue leaked";
        let r = redact_secrets(s, &["topsecretvalue"]);
        assert_eq!(r, "Incorrect API key provided: [redacted]. Key [redacted] leaked");
        assert_eq!(redact_secrets("task-sk-ab", &[]), "task-sk-ab");
        let gateway_key = format!("Bearer tg-{}", "0a".repeat(32));
        assert_eq!(redact_secrets(&gateway_key, &[]), "Bearer [redacted]");
        assert_eq!(redact_secrets("a long-tg-word stays", &[]), "a long-tg-word stays");
    }
}
