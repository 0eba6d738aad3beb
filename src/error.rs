//! The gateway's client-facing errors: one enum, its HTTP status, and OpenAI's error
//! envelope. Messages here are shown to clients, so they never carry secrets or raw
//! upstream bodies.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// 499, nginx's status for a request whose client closed the connection first.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("request body is larger than the limit of {limit} bytes (`limits.max_body_bytes`)")]
    BodyTooLarge { limit: usize },
    /// The client sent its headers but not its whole body in time (a stalled or very slow
    /// client would otherwise hold its connection and its key's request slot forever).
    #[error("the request body did not arrive within {secs:.0}s (`limits.body_timeout_secs`)")]
    BodyTimeout { secs: f64 },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// `tiergate:<name>` names no loaded policy.
    #[error("The model `{model}` names no loaded policy; use one of: {}", available.join(", "))]
    PolicyNotFound { model: String, available: Vec<String> },
    /// `phase` is which limit ran out: `connect`, `first token` or `total`.
    #[error("tier `{tier}` timed out ({phase} timeout of {secs:.1}s)")]
    UpstreamTimeout {
        tier: String,
        secs: f64,
        phase: &'static str,
    },
    #[error("tier `{tier}` failed: {detail}")]
    Upstream { tier: String, detail: String },
    /// A stream that broke, ended or reported an error before its first chunk (or was no
    /// event stream): nothing reached the client, so, like a 5xx, the request may fall
    /// back (not retried: the upstream may have started work).
    #[error("tier `{tier}` failed: {detail}")]
    UpstreamBroken { tier: String, detail: String },
    /// No answer at all: the connection could not be made (`connected` false; retried) or
    /// was closed before the response began (not retried: the upstream may have started
    /// work).
    #[error("tier `{tier}` failed: {}", if *connected { "the upstream closed the connection before answering" } else { "could not connect to the upstream server" })]
    UpstreamUnreachable { tier: String, connected: bool },
    /// The upstream answered 5xx (its body is never shown: it may carry internals).
    #[error("tier `{tier}` failed: the upstream answered HTTP {status}")]
    UpstreamStatus { tier: String, status: u16 },
    /// The tier's circuit breaker is open after repeated failures; nothing was sent.
    #[error("tier `{tier}` is unavailable after repeated failures (circuit open); retry later")]
    CircuitOpen { tier: String },
    #[error("tier `{tier}` is rate limited upstream; retry later")]
    UpstreamRateLimited { tier: String, retry_after: Option<String> },
    #[error("tier `{tier}` rejected the request: {detail}")]
    UpstreamRejected { tier: String, status: u16, detail: String },
    #[error("tier `{tier}` is not usable: {detail}")]
    TierUnavailable { tier: String, detail: String },
    /// Every sequence slot and queue place of a local tier is taken. The policy may spill
    /// the request to another tier; otherwise the client gets a 429.
    #[error("tier `{tier}` is saturated: all its local sequence slots and queue places are taken; retry later")]
    LocalSaturated { tier: String },
    #[error("tier `{tier}` failed: {detail}")]
    LocalEngine { tier: String, detail: String },
    /// The shutdown grace period ran out before the request was answered.
    #[error("the gateway is shutting down and could not finish this request in time; retry it")]
    ShuttingDown,
    /// The client closed the connection before its answer (a local tier's generation for
    /// it is stopped). Nobody sees it but the ledger, as the outcome `client_disconnected`.
    #[error("the client closed the connection before the answer was ready")]
    ClientDisconnected,
    /// No key, an unknown key or a revoked key (the key itself is never echoed).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The client's key is over its requests- or tokens-per-minute limit.
    #[error("{message}")]
    RateLimited { message: String, retry_after_secs: u64 },
    /// The client's key would exceed its daily or monthly budget. 429 like OpenAI's
    /// `insufficient_quota`, so clients that handle OpenAI's quota errors handle this one;
    /// `retry-after` says when the budget resets.
    #[error("{message}")]
    BudgetExceeded { message: String, retry_after_secs: u64 },
    #[error("request headers are {size} bytes, more than the limit of {limit} bytes (`limits.max_header_bytes`)")]
    HeadersTooLarge { size: usize, limit: usize },
    /// The path exists but not for this method; the response carries `Allow`.
    #[error("Invalid method for URL ({method} {path})")]
    MethodNotAllowed { method: String, path: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
            code: "invalid_request",
        }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Error::ModelNotFound(_) | Error::PolicyNotFound { .. } => StatusCode::NOT_FOUND,
            Error::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Upstream { .. } | Error::UpstreamBroken { .. } => StatusCode::BAD_GATEWAY,
            Error::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Error::UpstreamStatus { .. } => StatusCode::BAD_GATEWAY,
            Error::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamRejected { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
            Error::TierUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::LocalSaturated { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::LocalEngine { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::ClientDisconnected => CLIENT_CLOSED_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::RateLimited { .. } | Error::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    fn kind(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. }
            | Error::BodyTooLarge { .. }
            | Error::BodyTimeout { .. }
            | Error::UpstreamRejected { .. }
            | Error::HeadersTooLarge { .. }
            | Error::MethodNotAllowed { .. } => "invalid_request_error",
            Error::Unauthorized(_) => "authentication_error",
            Error::RateLimited { .. } => "rate_limit_error",
            Error::BudgetExceeded { .. } => "insufficient_quota",
            Error::ModelNotFound(_) | Error::PolicyNotFound { .. } => "invalid_request_error",
            Error::UpstreamRateLimited { .. } | Error::LocalSaturated { .. } => "rate_limit_error",
            Error::UpstreamTimeout { .. }
            | Error::Upstream { .. }
            | Error::UpstreamBroken { .. }
            | Error::UpstreamUnreachable { .. }
            | Error::UpstreamStatus { .. }
            | Error::CircuitOpen { .. }
            | Error::TierUnavailable { .. }
            | Error::LocalEngine { .. }
            | Error::ShuttingDown
            | Error::ClientDisconnected
            | Error::Internal(_) => "api_error",
        }
    }

    /// OpenAI's `error.code`, and the ledger's outcome for a failed request.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest { code, .. } => code,
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::BodyTimeout { .. } => "request_timeout",
            Error::ModelNotFound(_) | Error::PolicyNotFound { .. } => "model_not_found",
            Error::UpstreamTimeout { .. } => "upstream_timeout",
            Error::Upstream { .. } | Error::UpstreamBroken { .. } => "upstream_error",
            Error::UpstreamUnreachable { .. } => "upstream_unreachable",
            Error::UpstreamStatus { .. } => "upstream_error",
            Error::CircuitOpen { .. } => "upstream_unavailable",
            Error::UpstreamRateLimited { .. } => "upstream_rate_limited",
            Error::UpstreamRejected { .. } => "upstream_rejected",
            Error::TierUnavailable { .. } => "tier_unavailable",
            Error::LocalSaturated { .. } => "tier_saturated",
            Error::LocalEngine { .. } => "local_engine_error",
            Error::ShuttingDown => "shutting_down",
            Error::ClientDisconnected => "client_disconnected",
            Error::Unauthorized(_) => "invalid_api_key",
            Error::RateLimited { .. } => "rate_limit_exceeded",
            Error::BudgetExceeded { .. } => "budget_exceeded",
            Error::HeadersTooLarge { .. } => "headers_too_large",
            Error::MethodNotAllowed { .. } => "method_not_allowed",
            Error::Internal(_) => "internal_error",
        }
    }

    pub(crate) fn param(&self) -> Option<&str> {
        match self {
            Error::InvalidRequest { param, .. } => param.as_deref(),
            Error::ModelNotFound(_) | Error::PolicyNotFound { .. } => Some("model"),
            Error::BodyTooLarge { .. }
            | Error::BodyTimeout { .. }
            | Error::UpstreamTimeout { .. }
            | Error::Upstream { .. }
            | Error::UpstreamBroken { .. }
            | Error::UpstreamUnreachable { .. }
            | Error::UpstreamStatus { .. }
            | Error::CircuitOpen { .. }
            | Error::UpstreamRateLimited { .. }
            | Error::UpstreamRejected { .. }
            | Error::TierUnavailable { .. }
            | Error::LocalSaturated { .. }
            | Error::LocalEngine { .. }
            | Error::ShuttingDown
            | Error::ClientDisconnected
            | Error::Unauthorized(_)
            | Error::RateLimited { .. }
            | Error::BudgetExceeded { .. }
            | Error::HeadersTooLarge { .. }
            | Error::MethodNotAllowed { .. }
            | Error::Internal(_) => None,
        }
    }

    /// How the call that failed with this error is handled: one exhaustive match, so a new
    /// variant is classified for fallback, retries and the circuit breaker at once.
    fn handling(&self) -> Handling {
        let tier_down = |retry, backend_failure| Handling {
            falls_back: true,
            retry,
            backend_failure,
        };
        match self {
            Error::UpstreamTimeout { phase, .. } => tier_down((*phase == "connect").then_some("connect"), true),
            Error::UpstreamUnreachable { connected, .. } => tier_down((!connected).then_some("connect"), true),
            Error::UpstreamStatus { .. } => tier_down(Some("5xx"), true),
            Error::UpstreamBroken { .. } => tier_down(None, true),
            // The backend working as designed: it is busy, not broken.
            Error::UpstreamRateLimited { .. } => tier_down(Some("429"), false),
            Error::CircuitOpen { .. } | Error::TierUnavailable { .. } | Error::LocalSaturated { .. } => {
                tier_down(None, false)
            }
            // The tier is broken like a 5xx upstream is, but the same input would fail the
            // same way again: no retry.
            Error::LocalEngine { .. } => tier_down(None, true),
            Error::InvalidRequest { .. }
            | Error::BodyTooLarge { .. }
            | Error::BodyTimeout { .. }
            | Error::ModelNotFound(_)
            | Error::PolicyNotFound { .. }
            | Error::Upstream { .. }
            | Error::UpstreamRejected { .. }
            | Error::ShuttingDown
            | Error::ClientDisconnected
            | Error::Unauthorized(_)
            | Error::RateLimited { .. }
            | Error::BudgetExceeded { .. }
            | Error::HeadersTooLarge { .. }
            | Error::MethodNotAllowed { .. }
            | Error::Internal(_) => Handling::FINAL,
        }
    }

    /// Whether the request may move on to the rule's next tier: the tier could not answer
    /// (down, slow, overloaded, circuit open), as opposed to a request it rejected.
    pub fn falls_back(&self) -> bool {
        self.handling().falls_back
    }

    /// Whether the same tier may be asked again after a backoff: connect failures, 429 and
    /// 5xx. Never a 4xx, and never a timeout past the connect phase (the tier is slow, and
    /// asking again would multiply the wait; the fallback chain handles it).
    pub fn retryable(&self) -> bool {
        self.retry_reason().is_some()
    }

    /// Why the same tier may be asked again (`connect`, `429` or `5xx`, the `reason` label
    /// of `tiergate_upstream_retries_total`), or `None` when it may not; see [`Error::retryable`].
    pub fn retry_reason(&self) -> Option<&'static str> {
        self.handling().retry
    }

    /// Whether the error says the backend itself is unhealthy, for its circuit breaker. A
    /// 4xx or a 429 is the backend working as designed.
    pub fn is_backend_failure(&self) -> bool {
        self.handling().backend_failure
    }

    pub fn envelope(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        }})
    }
}

/// What a failed tier call leads to; see [`Error::handling`].
struct Handling {
    falls_back: bool,
    /// The retry's reason, when the same tier may be asked again.
    retry: Option<&'static str>,
    /// Counts against the tier's circuit breaker.
    backend_failure: bool,
}

impl Handling {
    /// The request itself was refused or failed in a way no other call would fix.
    const FINAL: Handling = Handling {
        falls_back: false,
        retry: None,
        backend_failure: false,
    };
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut resp = (self.status_code(), axum::Json(self.envelope())).into_response();
        let retry_after = match &self {
            Error::UpstreamRateLimited { retry_after, .. } => {
                retry_after.as_deref().and_then(|v| HeaderValue::from_str(v).ok())
            }
            Error::RateLimited { retry_after_secs, .. } | Error::BudgetExceeded { retry_after_secs, .. } => {
                Some(HeaderValue::from(*retry_after_secs))
            }
            // A local answer takes seconds; a slot frees as soon as one ends. OpenAI's SDKs
            // honour the header and would otherwise back off on their own schedule.
            Error::LocalSaturated { .. } => Some(HeaderValue::from_static("1")),
            _ => None,
        };
        if let Some(v) = retry_after {
            resp.headers_mut().insert("retry-after", v);
        }
        if let Error::Unauthorized(_) = &self {
            resp.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"tiergate\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn failed_calls_are_classified_for_fallback_retries_and_the_breaker() {
        let tier = || "t".to_owned();
        let timeout = |phase| Error::UpstreamTimeout {
            tier: tier(),
            secs: 1.0,
            phase,
        };
        // (error, falls back, retry reason, backend failure)
        let table = [
            (timeout("connect"), true, Some("connect"), true),
            (timeout("first token"), true, None, true),
            (
                Error::UpstreamUnreachable {
                    tier: tier(),
                    connected: false,
                },
                true,
                Some("connect"),
                true,
            ),
            (
                Error::UpstreamUnreachable {
                    tier: tier(),
                    connected: true,
                },
                true,
                None,
                true,
            ),
            (
                Error::UpstreamStatus {
                    tier: tier(),
                    status: 503,
                },
                true,
                Some("5xx"),
                true,
            ),
            (
                Error::UpstreamRateLimited {
                    tier: tier(),
                    retry_after: None,
                },
                true,
                Some("429"),
                false,
            ),
            (Error::CircuitOpen { tier: tier() }, true, None, false),
            (Error::LocalSaturated { tier: tier() }, true, None, false),
            (
                Error::LocalEngine {
                    tier: tier(),
                    detail: "onnx run failed".into(),
                },
                true,
                None,
                true,
            ),
            (
                Error::UpstreamRejected {
                    tier: tier(),
                    status: 400,
                    detail: "bad".into(),
                },
                false,
                None,
                false,
            ),
            (Error::ShuttingDown, false, None, false),
            (Error::ClientDisconnected, false, None, false),
        ];
        for (e, falls_back, retry, failure) in table {
            assert_eq!(
                (e.falls_back(), e.retry_reason(), e.retryable(), e.is_backend_failure()),
                (falls_back, retry, retry.is_some(), failure),
                "{e:?}"
            );
        }
    }
}
