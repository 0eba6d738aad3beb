//! HTTP surface: the axum router and the small handlers (models, health, readiness,
//! metrics).
//! Chat completions live in `chat`, the report page in `report`.

mod chat;
mod report;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;

use crate::AppState;
use crate::error::Error;
use crate::upstream::resilience::{Breaker, CircuitState};

/// The gateway's routes; tests drive this directly or over a socket.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/route", post(route))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/report", get(report::report_page))
        .route("/report.json", get(report::report_json))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // The chat handler reads the body itself with the configured limit, so that an
        // oversized body gets an OpenAI-shaped 413 and a ledger row.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Runs before every handler: the header size limit, then the key for the endpoints that
/// need one (the caller goes to the handler in the request's extensions), and after it the
/// key's `x-ratelimit-*` headers on the response. `/healthz` and `/readyz` stay open for
/// probes; a chat completion refused for its key is refused by its handler, so that it
/// still gets its ledger row.
async fn guard(
    State(st): State<Arc<AppState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let caller = match admit(&st, &req) {
        Ok(c) => c,
        Err(e) => {
            let refused_key = matches!(e, Error::Unauthorized(_));
            let mut resp = e.into_response();
            // A browser cannot send a bearer token, but it asks for Basic credentials when
            // challenged: the report page can then be opened with the key as the password.
            if refused_key && req.uri().path() == "/report" {
                resp.headers_mut().append(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static(
                        "Basic realm=\"tiergate report: the password is a tiergate key\", charset=\"UTF-8\"",
                    ),
                );
            }
            return resp;
        }
    };
    let principal = caller.as_ref().and_then(|c| c.0.as_ref().ok().cloned().flatten());
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    let mut resp = next.run(req).await;
    if let Some(p) = principal {
        crate::auth::rate::put_headers(resp.headers_mut(), st.auth.rate.windows(&p.key.id, &p.limits));
    }
    resp
}

/// The caller of a request that needs a key (`None`: it needs none), or why it is refused.
/// A chat completion is let in whatever its key, with the refusal in its [`Caller`].
fn admit(st: &AppState, req: &axum::extract::Request) -> Result<Option<Caller>, Error> {
    let rt = st.runtime.load();
    let chat = req.uri().path() == "/v1/chat/completions";
    if !chat {
        check_header_size(req.headers(), rt.config.limits.max_header_bytes)?;
    }
    let auth = &rt.config.auth;
    let needs_key = match req.uri().path() {
        "/healthz" | "/readyz" => false,
        "/report" | "/report.json" => auth.protect_reports,
        "/metrics" => auth.protect_metrics,
        p => p.starts_with("/v1/"),
    };
    if !needs_key {
        return Ok(None);
    }
    match st.auth.authenticate(auth, req.headers()) {
        Err(e) if !chat => Err(e),
        found => Ok(Some(Caller(found))),
    }
}

/// The caller as [`guard`] authenticated it (`Ok(None)`: auth is off), so that handlers
/// do not authenticate again. A handler extracting it on a request that did not pass
/// through `guard` gets an internal error, never an anonymous caller.
#[derive(Clone)]
pub(crate) struct Caller(Result<Option<crate::auth::Principal>, Error>);

impl Caller {
    pub(crate) fn principal(self) -> Result<Option<crate::auth::Principal>, Error> {
        self.0
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.remove::<Caller>().unwrap_or_else(|| {
            Caller(Err(Error::Internal(
                "the request was not authenticated before its handler".to_owned(),
            )))
        }))
    }
}

/// `limits.max_header_bytes` over all request headers.
fn check_header_size(headers: &axum::http::HeaderMap, limit: usize) -> Result<(), Error> {
    // Name, value and the `: ` and CRLF around them, as on the wire.
    let size: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if size > limit {
        return Err(Error::HeadersTooLarge { size, limit });
    }
    Ok(())
}

/// Request bodies are uncompressed JSON: a form post, plain text, a body without a content
/// type or a compressed one is refused by name rather than with a JSON parse error.
fn require_json(headers: &axum::http::HeaderMap) -> Result<(), Error> {
    // A compressed body would otherwise be parsed as if it were JSON text (an opaque
    // `invalid_json`), or a plain one labelled compressed taken as it is.
    for encoding in headers.get_all(axum::http::header::CONTENT_ENCODING) {
        let shown: String = String::from_utf8_lossy(encoding.as_bytes()).chars().take(40).collect();
        if !shown.trim().eq_ignore_ascii_case("identity") {
            return Err(Error::InvalidRequest {
                message: format!("`content-encoding` is `{}`; send the body uncompressed", shown.trim()),
                param: None,
                code: "unsupported_content_encoding",
            });
        }
    }
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        return Ok(());
    }
    let message = if mime.is_empty() {
        "the request has no `content-type`; send the body as JSON with `content-type: application/json`".to_owned()
    } else {
        let shown: String = mime.chars().take(80).collect();
        format!("`content-type` is `{shown}`; send the body as JSON with `content-type: application/json`")
    };
    Err(Error::InvalidRequest {
        message,
        param: None,
        code: "unsupported_content_type",
    })
}

/// Reads a request body within `limits`: over `max_body_bytes` (declared or sent) a 413,
/// slower than `body_timeout` a 408, both in OpenAI's shape; a client that leaves while
/// sending it is `client_disconnected`.
async fn read_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limits: &crate::config::Limits,
) -> Result<axum::body::Bytes, Error> {
    let limit = limits.max_body_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::BodyTooLarge { limit });
    }
    let read = tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, limit));
    let Ok(result) = read.await else {
        return Err(Error::BodyTimeout {
            secs: limits.body_timeout.as_secs_f64(),
        });
    };
    result.map_err(|e| {
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            if c.is::<http_body_util::LengthLimitError>() {
                return Error::BodyTooLarge { limit };
            }
            // hyper reports a body cut short by the connection's end as an io error.
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            {
                return Error::ClientDisconnected;
            }
            cause = c.source();
        }
        Error::invalid("could not read the request body", None)
    })
}

async fn not_found(uri: axum::http::Uri) -> impl IntoResponse {
    let e = Error::InvalidRequest {
        message: format!(
            "no route for `{}`; see `GET /v1/models` and `POST /v1/chat/completions`",
            uri.path()
        ),
        param: None,
        code: "unknown_url",
    };
    (StatusCode::NOT_FOUND, Json(e.envelope()))
}

/// axum's own 405 has an empty body; clients expect OpenAI's envelope (axum keeps `Allow`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Error {
    Error::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// `POST /v1/route`: the decision for a chat-completions body, without calling a model.
async fn route(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> axum::response::Response {
    let rt = st.runtime.load_full();
    let result = async {
        require_json(&headers)?;
        let body = read_body(&headers, body, &rt.config.limits).await?;
        let req = crate::openai::ChatRequest::parse(&body)?;
        req.check_limits(&rt.config.limits)?;
        // The policy may read the key's name and team.
        let principal = caller.principal()?;
        let ctx = chat::request_context(&rt, &headers, principal.as_ref());
        let mut e = crate::routing::explain_with(&rt.config, &rt.scorer, &req, &ctx, rt.stickiness.as_deref()).await?;
        e.note_unusable(&rt.tier_problems);
        Ok::<_, Error>(e)
    }
    .await;
    match result {
        Ok(e) => Json(e).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let rt = st.runtime.load();
    let mut data: Vec<serde_json::Value> = rt
        .config
        .aliases
        .iter()
        .map(|a| json!({"id": a, "object": "model", "created": 0, "owned_by": "tiergate"}))
        .collect();
    data.extend(rt.config.policies.keys().map(|p| {
        json!({"id": format!("{}{p}", crate::routing::POLICY_MODEL_PREFIX), "object": "model", "created": 0, "owned_by": "tiergate"})
    }));
    data.extend(
        rt.config.tiers.values().map(
            |t| json!({"id": t.model, "object": "model", "created": 0, "owned_by": format!("tiergate:{}", t.name)}),
        ),
    );
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::telemetry::metrics::CONTENT_TYPE,
        )],
        live_metrics(&st.metrics.encode(), &st.runtime.load(), &st.reload),
    )
}

/// Adds what belongs to the current runtime (it is swapped on reload, so it is read at
/// scrape time rather than registered): local tiers' queues and the classifier's counters.
fn live_metrics(encoded: &str, rt: &crate::Runtime, reload: &crate::reload::ReloadState) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;

    use crate::local::engine::EngineStats;
    let body = encoded.strip_suffix("# EOF\n").unwrap_or(encoded);
    let mut out = String::with_capacity(body.len() + 1024);
    out.push_str(body);
    if !rt.local_tiers.is_empty() {
        out.push_str("# HELP tiergate_local_queue_depth Requests running or waiting in a local tier's engine.\n");
        out.push_str("# TYPE tiergate_local_queue_depth gauge\n");
        for (tier, b) in &rt.local_tiers {
            let _ = writeln!(out, "tiergate_local_queue_depth{{tier=\"{tier}\"}} {}", b.in_flight());
        }
        // Since the engine started (a reload that restarts it starts them again at 0).
        // (name, help, the series: `source` label and the count it reads)
        type Series = [(&'static str, fn(&EngineStats) -> &AtomicU64)];
        let families: [(&str, &str, &Series); 5] = [
            (
                "tiergate_local_prompt_tokens",
                "Prompt tokens the local engine has read.",
                &[("", |s| &s.prompt_tokens)],
            ),
            (
                "tiergate_local_generated_tokens",
                "Tokens the local engine has generated.",
                &[("", |s| &s.generated_tokens)],
            ),
            (
                "tiergate_local_decode_steps",
                "Forward passes after the prompt's; one yields several tokens when drafts are confirmed.",
                &[("", |s| &s.decode_steps)],
            ),
            (
                "tiergate_local_draft_tokens",
                "Tokens drafted for the model to verify, by source (prompt lookup, the draft head).",
                &[("lookup", |s| &s.lookup_drafted), ("head", |s| &s.head_drafted)],
            ),
            (
                "tiergate_local_draft_accepted_tokens",
                "Drafted tokens the model confirmed into an answer, by source; each saved a forward pass.",
                &[("lookup", |s| &s.lookup_accepted), ("head", |s| &s.head_accepted)],
            ),
        ];
        for (name, help, series) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (tier, b) in &rt.local_tiers {
                let stats = &b.engine().stats;
                for (source, count) in series {
                    let source = if source.is_empty() {
                        String::new()
                    } else {
                        format!(",source=\"{source}\"")
                    };
                    let _ = writeln!(
                        out,
                        "{name}_total{{tier=\"{tier}\"{source}}} {}",
                        count(stats).load(Relaxed)
                    );
                }
            }
        }
    }
    if !rt.guards.is_empty() {
        out.push_str("# HELP tiergate_circuit_state Circuit breaker per tier: 0 closed, 1 open, 2 half-open.\n");
        out.push_str("# TYPE tiergate_circuit_state gauge\n");
        for (tier, b) in breakers(rt) {
            let _ = writeln!(out, "tiergate_circuit_state{{tier=\"{tier}\"}} {}", b.state() as u8);
        }
        out.push_str(
            "# HELP tiergate_circuit_transitions Circuit breaker state changes per tier, by the state entered.\n",
        );
        out.push_str("# TYPE tiergate_circuit_transitions counter\n");
        for (tier, b) in breakers(rt) {
            for to in [CircuitState::Open, CircuitState::HalfOpen, CircuitState::Closed] {
                let _ = writeln!(
                    out,
                    "tiergate_circuit_transitions_total{{tier=\"{tier}\",to=\"{}\"}} {}",
                    to.name(),
                    b.transitions(to)
                );
            }
        }
    }
    if let Some(c) = &rt.classifier {
        let s = &c.stats;
        for (name, help, v) in [
            (
                "tiergate_classifier_cache_hits",
                "Scores answered from the classifier's cache.",
                s.cache_hits.load(Relaxed),
            ),
            (
                "tiergate_classifier_scored",
                "Scores computed by the classifier model.",
                s.scored.load(Relaxed),
            ),
            (
                "tiergate_classifier_fallbacks",
                "Requests scored by length because the classifier queue was full, late or failed.",
                s.shed.load(Relaxed) + s.timeouts.load(Relaxed) + s.errors.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {v}");
        }
    }
    out.push_str(
        "# HELP tiergate_reloads Configuration reloads, by outcome (`error`: rejected, the old config kept serving).\n",
    );
    out.push_str("# TYPE tiergate_reloads counter\n");
    let _ = writeln!(
        out,
        "tiergate_reloads_total{{outcome=\"applied\"}} {}",
        reload.applied.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "tiergate_reloads_total{{outcome=\"error\"}} {}",
        reload.failed.load(Relaxed)
    );
    out.push_str(
        "# HELP tiergate_reload_ok Whether the last reload was applied (1) or rejected (0); 1 before any reload.\n",
    );
    out.push_str("# TYPE tiergate_reload_ok gauge\n");
    let ok = reload.last().is_none_or(|o| o.ok);
    let _ = writeln!(out, "tiergate_reload_ok {}", u8::from(ok));
    out.push_str("# EOF\n");
    out
}

fn breakers(rt: &crate::Runtime) -> impl Iterator<Item = (&String, &Breaker)> {
    rt.guards
        .iter()
        .filter_map(|(t, g)| g.breaker.as_deref().map(|b| (t, b)))
}

async fn readyz(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let rt = st.runtime.load();
    let ledger_ok = st.ledger.is_alive();
    let tiers: Vec<serde_json::Value> = rt
        .config
        .tiers
        .values()
        .map(|t| {
            let problem = rt.tier_problems.get(&t.name).cloned();
            let circuit = rt
                .guards
                .get(&t.name)
                .and_then(|g| g.breaker.as_deref())
                .map(Breaker::state);
            let problem = problem.or_else(|| {
                (circuit == Some(CircuitState::Open))
                    .then(|| "circuit open after repeated failures; requests fall back or get a 503".to_owned())
            });
            json!({
                "name": t.name,
                "model": t.model,
                "ready": problem.is_none(),
                "problem": problem,
                "circuit": circuit.map(CircuitState::name),
            })
        })
        .collect();
    let body = json!({
        "status": if ledger_ok { "ready" } else { "degraded" },
        "onnxruntime": {"version": crate::onnx::loaded_version()},
        "ledger": {
            "path": st.ledger.path().display().to_string(),
            "writer_alive": ledger_ok,
            "queued": st.ledger.queued(),
            "written": st.ledger.written(),
            "dropped": st.ledger.dropped(),
        },
        "auth": {"enabled": rt.config.auth.enabled},
        "policy": rt.config.policy.name,
        "policies": rt.config.policies.keys().collect::<Vec<_>>(),
        "reload": st.reload.last(),
        "scorer": rt.scorer_name,
        "classifier": rt.classifier.as_ref().map(|c| json!({"encoder": c.encoder})),
        "tiers": tiers,
    });
    let status = if ledger_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
