//! OpenAI chat-completions wire types: what the gateway must understand of a request or a
//! response. Unknown fields are kept and forwarded untouched, so clients can use any
//! provider parameter without the gateway knowing it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod strict;

use crate::config::Limits;
use crate::error::Error;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
    /// The gateway's own ceiling on output tokens, for a request that set none (a rule's
    /// `max_local_output_tokens`): unlike a client's `max_tokens`, the local tier fits it
    /// into the context left rather than refusing it. Never sent upstream.
    #[serde(skip)]
    pub output_cap: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The message roles of OpenAI's chat-completions API (`function` is its deprecated
/// predecessor of `tool`).
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function"];

/// Longest `model` accepted, in bytes (OpenAI's and our tiers' names are tens).
pub const MAX_MODEL_BYTES: usize = 256;

impl ChatRequest {
    /// Parses and validates a request body; errors name the offending field.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, Error> {
        let invalid_json = |e: serde_json::Error| Error::InvalidRequest {
            message: format!("request body is not valid JSON: {e}"),
            param: None,
            code: "invalid_json",
        };
        let value: Value = match strict::from_slice(body) {
            Ok(v) => v,
            // Read as OpenAI reads it: a lone surrogate is replaced, not refused.
            Err(e) => match replace_lone_surrogates(body) {
                Some(fixed) => strict::from_slice(&fixed).map_err(invalid_json)?,
                None => return Err(invalid_json(e)),
            },
        };
        let Value::Object(obj) = &value else {
            return Err(Error::invalid("request body must be a JSON object", None));
        };
        for field in ["model", "messages"] {
            if obj.get(field).is_none_or(Value::is_null) {
                return Err(Error::invalid(
                    format!("missing required parameter: `{field}`"),
                    Some(field),
                ));
            }
        }
        let Some(model) = obj["model"].as_str() else {
            return Err(Error::invalid("`model` must be a string", Some("model")));
        };
        // The name is echoed in errors and stored in the ledger and the log: a megabyte of
        // it would be a megabyte in each, per request.
        if model.len() > MAX_MODEL_BYTES {
            return Err(Error::invalid(
                format!(
                    "`model` is {} bytes long; a model name has at most {MAX_MODEL_BYTES}",
                    model.len()
                ),
                Some("model"),
            ));
        }
        let Some(messages) = obj["messages"].as_array() else {
            return Err(Error::invalid(
                "`messages` must be an array of message objects",
                Some("messages"),
            ));
        };
        if messages.is_empty() {
            return Err(Error::invalid(
                "`messages` must contain at least one message",
                Some("messages"),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            let param = format!("messages[{i}]");
            let Some(m) = m.as_object() else {
                return Err(Error::invalid(format!("`{param}` must be an object"), Some(&param)));
            };
            let Some(role) = m.get("role").and_then(Value::as_str) else {
                return Err(Error::invalid(
                    format!("`{param}.role` must be a string"),
                    Some(&format!("{param}.role")),
                ));
            };
            if !ROLES.contains(&role) {
                return Err(Error::invalid(
                    format!(
                        "`{param}.role` = `{role}` is not a role; use one of {}",
                        ROLES.join(", ")
                    ),
                    Some(&format!("{param}.role")),
                ));
            }
            match m.get("content") {
                // Only an assistant turn may carry no text (its `tool_calls` are the content).
                None | Some(Value::Null) if role != "assistant" => {
                    return Err(Error::invalid(
                        format!("`{param}.content` is required for a `{role}` message"),
                        Some(&format!("{param}.content")),
                    ));
                }
                None | Some(Value::Null | Value::String(_) | Value::Array(_)) => {}
                Some(_) => {
                    return Err(Error::invalid(
                        format!("`{param}.content` must be a string, an array of content parts, or null"),
                        Some(&format!("{param}.content")),
                    ));
                }
            }
        }
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(v) = obj.get(field)
                && !v.is_null()
                && v.as_u64().is_none_or(|n| n == 0)
            {
                return Err(Error::invalid(
                    format!("`{field}` must be a positive integer, got `{v}`"),
                    Some(field),
                ));
            }
        }
        if let Some(v) = obj.get("n")
            && !v.is_null()
            && v.as_u64().is_none_or(|n| !(1..=128).contains(&n))
        {
            return Err(Error::invalid(
                format!("`n` must be an integer in 1..=128, got `{v}`"),
                Some("n"),
            ));
        }
        for (field, lo, hi) in [
            ("temperature", 0.0, 2.0),
            ("top_p", 0.0, 1.0),
            ("presence_penalty", -2.0, 2.0),
            ("frequency_penalty", -2.0, 2.0),
        ] {
            if let Some(v) = obj.get(field)
                && !v.is_null()
                && v.as_f64().is_none_or(|x| !(lo..=hi).contains(&x))
            {
                return Err(Error::invalid(
                    format!("`{field}` must be a number in {lo}..={hi}, got `{v}`"),
                    Some(field),
                ));
            }
        }
        if let Some(v) = obj.get("stop") {
            match stop_list(v) {
                None => {
                    return Err(Error::invalid(
                        format!("`stop` must be a string or an array of up to 4 strings, got `{v}`"),
                        Some("stop"),
                    ));
                }
                // An empty sequence matches before any text: the answer would always be
                // empty (vLLM refuses it too).
                Some(list) if list.iter().any(String::is_empty) => {
                    return Err(Error::invalid("`stop` must not contain an empty string", Some("stop")));
                }
                Some(_) => {}
            }
        }
        if let Some(v) = obj.get("seed")
            && !(v.is_null() || v.is_i64() || v.is_u64())
        {
            return Err(Error::invalid(
                format!("`seed` must be an integer, got `{v}`"),
                Some("seed"),
            ));
        }
        if let Some(v) = obj.get("top_logprobs")
            && !v.is_null()
            && v.as_u64().is_none_or(|n| n > 20)
        {
            return Err(Error::invalid(
                format!("`top_logprobs` must be an integer in 0..=20, got `{v}`"),
                Some("top_logprobs"),
            ));
        }
        for field in ["stream", "logprobs", "parallel_tool_calls", "store"] {
            if let Some(s) = obj.get(field)
                && !(s.is_boolean() || s.is_null())
            {
                return Err(Error::invalid(format!("`{field}` must be a boolean"), Some(field)));
            }
        }
        if let Some(v) = obj.get("user")
            && !(v.is_string() || v.is_null())
        {
            return Err(Error::invalid("`user` must be a string", Some("user")));
        }
        if let Some(s) = obj.get("stream_options")
            && !(s.is_object() || s.is_null())
        {
            return Err(Error::invalid(
                "`stream_options` must be an object",
                Some("stream_options"),
            ));
        }
        if let Some(v) = obj.get("stream_options").and_then(|s| s.get("include_usage"))
            && !(v.is_boolean() || v.is_null())
        {
            return Err(Error::invalid(
                "`stream_options.include_usage` must be a boolean",
                Some("stream_options.include_usage"),
            ));
        }
        if obj.get("stream_options").is_some_and(|s| !s.is_null()) && obj.get("stream") != Some(&Value::Bool(true)) {
            // OpenAI's own message for it.
            return Err(Error::invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                Some("stream_options"),
            ));
        }
        serde_json::from_value(value).map_err(|e| Error::invalid(format!("invalid request: {e}"), None))
    }

    /// The most tokens the request lets the model generate, if it says.
    pub fn max_output_tokens(&self) -> Option<u64> {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|f| self.rest.get(*f).and_then(Value::as_u64))
    }

    /// The stop sequences (checked by `parse`).
    pub fn stop_sequences(&self) -> Vec<String> {
        self.rest.get("stop").and_then(stop_list).unwrap_or_default()
    }

    /// `seed` as the 64 bits a sampler seeds from (checked to be an integer by `parse`).
    pub fn seed(&self) -> Option<u64> {
        let v = self.rest.get("seed")?;
        v.as_i64().map(|s| s as u64).or_else(|| v.as_u64())
    }

    /// The first of `tools` / `functions` that offers the model something to call (present,
    /// not null, not an empty array).
    pub fn tools_field(&self) -> Option<&'static str> {
        ["tools", "functions"].into_iter().find(|k| {
            self.rest
                .get(*k)
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        })
    }

    /// Whether `response_format` asks for JSON (`json_object` or `json_schema`).
    pub fn json_mode(&self) -> bool {
        self.rest
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t == "json_object" || t == "json_schema")
    }

    /// How many answers the request asks for (`n`): each may be up to `max_tokens` long.
    pub fn choices(&self) -> u64 {
        self.rest.get("n").and_then(Value::as_u64).unwrap_or(1).max(1)
    }

    /// Checks the request against `[limits]`; the error names the limit and its value.
    pub fn check_limits(&self, limits: &Limits) -> Result<(), Error> {
        let limit_error = |message: String, param: &str| Error::InvalidRequest {
            message,
            param: Some(param.to_owned()),
            code: "limit_exceeded",
        };
        if self.messages.len() > limits.max_messages {
            return Err(limit_error(
                format!(
                    "`messages` has {} entries; the limit is `limits.max_messages` = {}",
                    self.messages.len(),
                    limits.max_messages
                ),
                "messages",
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            let chars = content_text(m.content.as_ref()).chars().count();
            if chars > limits.max_message_chars {
                return Err(limit_error(
                    format!(
                        "`messages[{i}].content` has {chars} characters; the limit is `limits.max_message_chars` = {}",
                        limits.max_message_chars
                    ),
                    &format!("messages[{i}].content"),
                ));
            }
        }
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = self.rest.get(field).and_then(Value::as_u64)
                && n > limits.max_tokens
            {
                return Err(limit_error(
                    format!(
                        "`{field}` is {n}; the limit is `limits.max_tokens` = {}",
                        limits.max_tokens
                    ),
                    field,
                ));
            }
        }
        Ok(())
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Text of every message, for token estimates when the upstream reports no usage.
    pub fn all_text(&self) -> String {
        let mut out = String::new();
        for m in &self.messages {
            out.push_str(&m.role);
            out.push('\n');
            out.push_str(&content_text(m.content.as_ref()));
            out.push('\n');
        }
        out
    }

    /// What the router scores (`router-model/FEATURES.md`): the system messages' text
    /// joined by newlines, a blank line, then the last user message; without a system
    /// message, the last user message alone. Earlier turns are left out, so a long
    /// conversation is judged by what is being asked now. `developer` counts as `system`.
    pub fn scored_text(&self) -> String {
        let system: Vec<String> = self
            .messages
            .iter()
            .filter(|m| m.role == "system" || m.role == "developer")
            .map(|m| content_text(m.content.as_ref()))
            .collect();
        let last_user = self
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| content_text(m.content.as_ref()))
            .unwrap_or_default();
        if system.is_empty() {
            last_user
        } else {
            format!("{}\n\n{last_user}", system.join("\n"))
        }
    }
}

/// `body` with each lone UTF-16 surrogate escape (`\ud800` without its other half) replaced
/// by `\ufffd`; `None` when it has none. JavaScript's `JSON.stringify` writes them for a
/// string cut in the middle of an emoji, OpenAI accepts them, and serde_json refuses them.
fn replace_lone_surrogates(body: &[u8]) -> Option<Vec<u8>> {
    let escape_at = |i: usize| -> Option<u16> {
        if body.get(i..i + 2) != Some(b"\\u") {
            return None;
        }
        let hex = std::str::from_utf8(body.get(i + 2..i + 6)?).ok()?;
        u16::from_str_radix(hex, 16).ok()
    };
    let mut out = Vec::with_capacity(body.len());
    let mut changed = false;
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            out.push(body[i]);
            i += 1;
            continue;
        }
        match escape_at(i) {
            Some(0xD800..=0xDBFF) if matches!(escape_at(i + 6), Some(0xDC00..=0xDFFF)) => {
                out.extend_from_slice(&body[i..i + 12]);
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out.extend_from_slice(b"\\ufffd");
                changed = true;
                i += 6;
            }
            // Any other escape, `\\` included: both bytes as they are.
            _ => {
                out.extend_from_slice(&body[i..(i + 2).min(body.len())]);
                i += 2;
            }
        }
    }
    changed.then_some(out)
}

/// A message's text: the string, or the `text` of its `type: "text"` parts joined by newlines.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The parts of a streamed chunk the gateway reads; the chunk itself is forwarded as is.
#[derive(Debug, Default, Deserialize)]
pub struct ChunkPeek {
    #[serde(default)]
    pub choices: Vec<ChoicePeek>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChoicePeek {
    #[serde(default)]
    pub delta: Option<DeltaPeek>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct DeltaPeek {
    #[serde(default)]
    pub content: Option<String>,
    /// Generated too, and billed as output: read leniently (any shape), only to estimate
    /// tokens when the upstream reports no usage.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub reasoning_content: Option<Value>,
}

impl DeltaPeek {
    /// Everything this delta generated, for the token estimate and the first token's time.
    pub fn generated(&self) -> String {
        let mut out = self.content.clone().unwrap_or_default();
        out.push_str(&calls_text(self.tool_calls.as_ref(), self.function_call.as_ref()));
        if let Some(Value::String(r)) = &self.reasoning_content {
            out.push_str(r);
        }
        out
    }
}

/// The names and arguments of `tool_calls` (and the legacy `function_call`), as generated
/// text. Any other shape adds nothing.
pub fn calls_text(tool_calls: Option<&Value>, function_call: Option<&Value>) -> String {
    let functions = tool_calls
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("function"))
        .chain(function_call);
    let mut out = String::new();
    for f in functions {
        for key in ["name", "arguments"] {
            if let Some(t) = f.get(key).and_then(Value::as_str) {
                out.push_str(t);
            }
        }
    }
    out
}

/// The parts of a non-streamed response the gateway reads.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionPeek {
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Required: a 200 without it is not a chat completion, and passing it on as one would
    /// hand the client an answer its SDK cannot read.
    pub choices: Vec<CompletionChoicePeek>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CompletionChoicePeek {
    #[serde(default)]
    pub message: Option<Message>,
}

/// OpenAI's `stop`: a string, an array of at most 4 strings, or null; `None` if malformed.
fn stop_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Null => Some(Vec::new()),
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) if a.len() <= 4 => a.iter().map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
