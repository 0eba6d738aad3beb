//! `POST /v1/chat/completions`: parse, route, call the tier, relay the answer (whole or as
//! SSE), and account for it. Every request ends in exactly one ledger row, including
//! rejected ones and those the client walks away from (billed for what the tier did).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::config::{BackendConfig, Price, TierConfig};
use crate::error::Error;
use crate::ledger::{Attempt, Ledger, Record};
use crate::openai::{ChatRequest, Usage};
use crate::policy::OverBudget;
use crate::policy::{Escalate, Then};
use crate::routing::sticky::{self, HEADER_CONVERSATION};
use crate::routing::{self, RequestContext, RouteDecision};
use crate::telemetry::trace;
use crate::upstream::resilience::{Breaker, with_retries};
use crate::upstream::{Backend, Completion, Guard, StreamItem};
use crate::{AppState, Runtime, tokens};
use futures::future::BoxFuture;
use tracing::Instrument;

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    caller: super::Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rt = st.runtime.load_full();
    let mut acct = Accounting::new(st.ledger.clone(), &headers, rt.config.baseline);
    acct.metrics = Some(st.metrics.clone());
    let span = trace::request_span(&acct.rec.request_id);
    acct.span = Some(span.clone());
    acct.in_flight = Some(st.in_flight.enter());
    acct.cut = st.cut.clone();
    let result = tokio::select! {
        // The handler first: at a cut, a whole answer's task may already have handed back
        // the row (with its `shutting_down` error); dropping it unread would misfile it.
        biased;
        r = handle(&st, &rt, &mut acct, caller, &headers, body).instrument(span) => r,
        () = st.cut.cancelled() => Err(Error::ShuttingDown),
    };
    match result {
        Ok(Reply::Whole(resp)) => resp,
        Ok(Reply::Stream(resp)) => resp,
        Err(e) => {
            let status = e.status_code().as_u16();
            let code = e.code();
            let mut resp = e.into_response();
            acct.decorate(resp.headers_mut());
            acct.finish_durably(code, status).await;
            resp
        }
    }
}

enum Reply {
    Whole(Response),
    Stream(Response),
}

/// What the policy may read beyond the body: headers, the client's key and team, local load.
pub(super) fn request_context(
    rt: &Runtime,
    headers: &HeaderMap,
    principal: Option<&crate::auth::Principal>,
) -> RequestContext {
    let mut ctx = RequestContext::from_headers(headers);
    if let Some(p) = principal {
        ctx.key = Some(p.key.name.clone());
        ctx.team = p.key.team.clone();
    }
    for (name, b) in &rt.local_tiers {
        if let Some(BackendConfig::Local(s)) = rt.config.tiers.get(name).map(|t| &t.backend) {
            ctx.local_load
                .insert(name.clone(), b.in_flight() as f64 / s.max_concurrent.max(1) as f64);
        }
    }
    ctx
}

async fn handle(
    st: &AppState,
    rt: &Arc<Runtime>,
    acct: &mut Accounting,
    caller: super::Caller,
    headers: &HeaderMap,
    body: Body,
) -> Result<Reply, Error> {
    super::check_header_size(headers, rt.config.limits.max_header_bytes)?;
    let principal = caller.principal()?;
    if let Some(p) = &principal {
        acct.rec.api_key_id = Some(p.key.id.clone());
        st.auth.rate.check_request(&p.key.id, &p.limits)?;
    }
    super::require_json(headers)?;
    let bytes = super::read_body(headers, body, &rt.config.limits).await?;
    let mut req = ChatRequest::parse(&bytes)?;
    acct.rec.requested_model = Some(req.model.clone());
    acct.rec.streamed = req.is_stream();
    req.check_limits(&rt.config.limits)?;

    let ctx = request_context(rt, headers, principal.as_ref());
    let mut decision = routing::route_with(&rt.config, &rt.scorer, &req, &ctx).await?;
    let conversation = sticky::apply(
        rt.stickiness.as_deref(),
        &rt.config.tiers,
        &mut decision,
        ctx.headers.get(HEADER_CONVERSATION).map(String::as_str),
        &req,
    );
    let prompt_estimate = decision.request_tokens;
    let (tier, _) = tier_backend(rt, &decision.tier)?;
    acct.routed(&decision, &tier.model, tier.price, prompt_estimate);
    if let Some(p) = &principal {
        let max_output = req
            .max_output_tokens()
            .unwrap_or(rt.config.auth.default_max_output_tokens)
            .saturating_mul(req.choices());
        // Byte-level BPE tokenizers make at most one token per byte, and everything billed as
        // input (messages, tools, …) is in the body; the chat template adds a few tokens per
        // message. So this bounds the prompt from above, where the estimate may fall short.
        let prompt_bound = (bytes.len() as u64).saturating_add(8 * req.messages.len() as u64 + 8);
        if admit_spend(st, rt, acct, p, &mut decision, prompt_bound, max_output)? {
            let (tier, _) = tier_backend(rt, &decision.tier)?;
            acct.routed(&decision, &tier.model, tier.price, prompt_estimate);
        }
        // After the budget: tokens counted here stay counted, so a request refused for its
        // budget must not get this far. One refused here releases its budget hold with its row.
        st.auth
            .rate
            .check_tokens(&p.key.id, &p.limits, prompt_estimate.saturating_add(max_output))?;
    }

    remember(rt, conversation.as_deref(), &decision.tier);
    acct.gateway_done();
    if req.is_stream() {
        let client_wants_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let escalation = usable_escalation(rt, &decision);
        let hold = escalation.map_or(0, |e| e.hold_tokens);
        let (mut upstream, mut tier, mut tier_span) = call_tiers(rt, acct, &decision, &mut req, move |b, r| {
            Box::pin(async move { b.stream_assessed(r, hold).await })
        })
        .await?;
        if let Some(esc) = escalation
            && hold > 0
            && matches!(tier.backend, BackendConfig::Local(_))
        {
            // Nothing has been sent yet: the prefix is held until it is judged, so that a
            // weak answer can still be replaced by another tier's whole.
            let (held, assessed) = hold_prefix(&mut upstream).await;
            let mut replaced = false;
            if let Some((confidence, used)) = assessed {
                acct.confidence = Some(confidence);
                if confidence < esc.min_confidence
                    && let Some(s) = escalate(rt, acct, used, Some(confidence), &esc.tier, req, |b, r| {
                        Box::pin(async move { b.stream(r).await })
                    })
                    .await
                {
                    // Dropping the local stream cancels its generation at the next step.
                    (upstream, tier, tier_span) = s;
                    acct.confidence = None;
                    replaced = true;
                    remember(rt, conversation.as_deref(), &esc.tier);
                }
            }
            if !replaced {
                upstream = futures::stream::iter(held).chain(upstream).boxed();
            }
        }
        acct.called_tier = true;
        let breaker = rt.guards.get(&tier.name).and_then(|g| g.breaker.clone());
        Ok(Reply::Stream(stream_response(
            std::mem::take(acct),
            upstream,
            client_wants_usage,
            tier_span,
            breaker,
        )))
    } else {
        let done = answer_whole_detached(rt, acct, decision, req, conversation).await?;
        let mut resp = Response::new(Body::from(done.body));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        acct.decorate(resp.headers_mut());
        acct.finish_durably("ok", 200).await;
        Ok(Reply::Whole(resp))
    }
}

/// Calls the tiers for a whole (non-streamed) answer in a task of its own, which holds the
/// ledger row meanwhile and hands both back. A client that goes away drops the handler but
/// not the task: a remote tier's call runs to its end (the upstream has the request and
/// bills it), and the row records its usage and cost as `client_disconnected` (499); a
/// local tier's generation stops at once (it would be for nobody), and the row records
/// what it had used and the machine time it held. Either way no retry,
/// fallback or escalation starts for a client that left. Streams need none of this: their
/// row follows the stream, whose usage arrives as it goes.
async fn answer_whole_detached(
    rt: &Arc<Runtime>,
    acct: &mut Accounting,
    decision: RouteDecision,
    req: ChatRequest,
    conversation: Option<String>,
) -> Result<Completion, Error> {
    let mut task_acct = acct.detach();
    let gone = tokio_util::sync::CancellationToken::new();
    task_acct.gone = Some(gone.clone());
    let stop_at_cut = gone.clone();
    // Dropped with the handler: when the client closes the connection, or when it is cut.
    let _handler_alive = gone.drop_guard();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = rt.clone();
    let task = async move {
        let mut acct = task_acct;
        let cut = acct.cut.clone();
        // A bug that panics here must still end the row as what it is, not as a client
        // that left (which is what dropping it unfinished would record). The panic's own
        // text goes to the log (the panic hook), not into an answer.
        let result = {
            let calls =
                std::panic::AssertUnwindSafe(answer_whole(&rt, &mut acct, &decision, req, conversation.as_deref()));
            let mut calls = std::pin::pin!(futures::FutureExt::catch_unwind(calls));
            tokio::select! {
                r = &mut calls => r.unwrap_or_else(|_| Err(Error::Internal("the tier call panicked".to_owned()))),
                () = cut.cancelled() => {
                    // Stopped as for a client that left, so that a local generation records
                    // the tokens and machine time it used (dropped at once, it recorded
                    // none); a remote call, which reports nothing until its end, is not
                    // waited for long.
                    stop_at_cut.cancel();
                    let _ = tokio::time::timeout(CUT_RECORD_WAIT, &mut calls).await;
                    Err(Error::ShuttingDown)
                }
            }
        };
        // Nobody waits for the answer: the handler was cut at shutdown (the row must be
        // durable before the ledger closes), or its client left.
        let Err((mut acct, result)) = tx.send((acct, result)) else {
            return;
        };
        if cut.is_cancelled() {
            let e = Error::ShuttingDown;
            acct.finish_durably(e.code(), e.status_code().as_u16()).await;
        } else if let Err(e) = result
            && !matches!(e, Error::ClientDisconnected)
        {
            // The tier failed as well: that is the row's outcome (an error in the report),
            // while the status says nobody was there to be told.
            acct.finish(e.code(), crate::error::CLIENT_CLOSED_REQUEST.as_u16());
        }
        // Otherwise dropping the row unfinished writes it as `client_disconnected`, with
        // what the tier used.
    };
    tokio::spawn(task.in_current_span());
    let (back, result) = rx
        .await
        .map_err(|_| Error::Internal("the task calling the tier ended without an answer".to_owned()))?;
    *acct = back;
    // The handler answers from here on; a client leaving now is the plain case again.
    acct.gone = None;
    result
}

/// How long a whole answer cut at shutdown may take to record what its tier used.
const CUT_RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The tier calls of a whole answer, escalation included; see [`answer_whole_detached`].
async fn answer_whole(
    rt: &Runtime,
    acct: &mut Accounting,
    decision: &RouteDecision,
    mut req: ChatRequest,
    conversation: Option<&str>,
) -> Result<Completion, Error> {
    let (mut done, _, _) = call_tiers(rt, acct, decision, &mut req, |b, r| {
        Box::pin(async move { b.complete(r).await })
    })
    .await?;
    // A client that left gets the first answer recorded, not a second tier's.
    if let Some(esc) = usable_escalation(rt, decision)
        && done.confidence.is_some_and(|c| c < esc.min_confidence)
        && !acct.client_gone()
    {
        let used = done.usage.unwrap_or_default();
        if let Some((better, _, _)) = escalate(rt, acct, used, done.confidence, &esc.tier, req, |b, r| {
            Box::pin(async move { b.complete(r).await })
        })
        .await
        {
            done = better;
            remember(rt, conversation, &esc.tier);
        }
    }
    acct.called_tier = true;
    acct.usage = done.usage;
    acct.content = std::mem::take(&mut done.content);
    acct.confidence = done.confidence;
    Ok(done)
}

/// One call to a tier for a request whose client may leave (`gone`, for whole answers): a
/// local tier's generation stops when it does (`local`: the slot its usage so far is
/// reported into, for the row), a remote tier's call is billed anyway and runs to its end
/// (bounded by its timeouts).
async fn unless_gone<T>(
    gone: Option<tokio_util::sync::CancellationToken>,
    local: Option<&crate::upstream::Progress>,
    call: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match (gone, local) {
        (Some(gone), Some(progress)) => {
            // A retry starts from nothing: what an earlier try used is in its own attempt.
            if let Ok(mut p) = progress.lock() {
                *p = None;
            }
            let call = crate::upstream::watch_progress(progress.clone(), call);
            tokio::select! {
                r = call => r,
                () = gone.cancelled() => Err(Error::ClientDisconnected),
            }
        }
        _ => call.await,
    }
}

/// Records that `conversation` reached `tier` (kept only if stronger than what it had).
fn remember(rt: &Runtime, conversation: Option<&str>, tier: &str) {
    let (Some(store), Some(id), Some(t)) = (&rt.stickiness, conversation, rt.config.tiers.get(tier)) else {
        return;
    };
    let held = store.get(id);
    store.raise(id, t, held.as_ref().and_then(|h| rt.config.tiers.get(h)));
}

fn tier_backend<'a>(rt: &'a Runtime, name: &str) -> Result<(&'a TierConfig, Arc<dyn Backend>), Error> {
    let tier = rt
        .config
        .tiers
        .get(name)
        .ok_or_else(|| Error::Internal(format!("policy chose unknown tier `{name}`")))?;
    let backend = rt
        .backends
        .get(name)
        .ok_or_else(|| Error::Internal(format!("no backend for tier `{name}`")))?
        .clone();
    Ok((tier, backend))
}

/// Budgets: reserves the most this request can cost on the tiers it may reach (for at most
/// `prompt_tokens` in and `max_output` out), or applies the policy's `over_budget` when that
/// does not fit. Returns whether the request was downgraded to another tier.
fn admit_spend(
    st: &AppState,
    rt: &Runtime,
    acct: &mut Accounting,
    p: &crate::auth::Principal,
    decision: &mut RouteDecision,
    prompt_tokens: u64,
    max_output: u64,
) -> Result<bool, Error> {
    // Every key's spend is counted, budget or not: a budget given later (a reload that sets
    // `auth.default_daily_usd`) must see what the key has already spent today.
    acct.spend = Some(SpendAccount {
        budgets: st.auth.budgets.clone(),
        key_id: p.key.id.clone(),
        hold: None,
    });
    if !p.limits.has_budget() {
        return Ok(false);
    }
    // Tiers priced per token are the paid ones; a tier priced only by machine time is the
    // operator's own hardware and is not gated (its cost still counts as spend).
    // A tier that cannot be called (no API key) is passed over: it will cost nothing.
    let max_cost = |tier: Option<&String>| {
        tier.filter(|t| rt.can_call(t))
            .and_then(|t| rt.config.tiers.get(t))
            .map(|t| t.price.cost(prompt_tokens, max_output))
            .unwrap_or(0.0)
    };
    // A spill or fallback replaces the call; an escalation adds a second one.
    let max_usd = decision
        .then
        .fallback
        .iter()
        .chain(&decision.then.on_saturated)
        .fold(max_cost(Some(&decision.tier)), |m, t| m.max(max_cost(Some(t))))
        + max_cost(decision.then.escalate.as_ref().map(|e| &e.tier));
    if max_usd <= 0.0 {
        return Ok(false);
    }
    match st
        .auth
        .budgets
        .reserve(&p.key.id, &p.limits, max_usd, crate::report::now_ms())
    {
        Ok(hold) => {
            if let Some(s) = &mut acct.spend {
                s.hold = Some(hold);
            }
            Ok(false)
        }
        // The policy that decided (`tiergate:<name>`) says what over budget means; a request
        // that named a tier's model was decided by none, so the default policy says.
        Err(over) => match &decision
            .policy
            .as_ref()
            .and_then(|name| rt.config.policies.get(name))
            .unwrap_or(&rt.config.policy)
            .over_budget
        {
            OverBudget::Refuse => Err(Error::BudgetExceeded {
                message: over.to_string(),
                retry_after_secs: over.resets_in_secs,
            }),
            OverBudget::Downgrade(to) => {
                tracing::info!(request_id = %acct.rec.request_id, key = %p.key.id, from = %decision.tier, to = %to, "over budget: downgraded");
                decision.tier = to.clone();
                decision.rule = "over-budget".to_owned();
                decision.then = crate::policy::Then::default();
                Ok(true)
            }
        },
    }
}

/// A key's share of a request: settled to the actual cost when the row is written.
struct SpendAccount {
    budgets: Arc<crate::auth::Budgets>,
    key_id: String,
    hold: Option<crate::auth::Hold>,
}

impl SpendAccount {
    fn settle(self, cost_usd: f64) {
        match self.hold {
            Some(h) => h.settle(cost_usd),
            None => self.budgets.spend(&self.key_id, cost_usd, crate::report::now_ms()),
        }
    }
}

/// Calls the routed tier through its retries and circuit breaker; when it cannot answer,
/// moves down the rule's fallback chain (or spills, for a saturated local tier). Runs
/// before anything is sent to the client, so a switch is invisible to it but for the
/// `x-tiergate-tier` header. Every failed call becomes an attempt in the ledger.
async fn call_tiers<'a, T>(
    rt: &'a Runtime,
    acct: &mut Accounting,
    decision: &RouteDecision,
    req: &mut ChatRequest,
    call: impl Fn(Arc<dyn Backend>, ChatRequest) -> BoxFuture<'static, Result<T, Error>>,
) -> Result<(T, &'a TierConfig, tracing::Span), Error> {
    let (mut tier, mut backend) = tier_backend(rt, &decision.tier)?;
    let mut tried: Vec<&str> = Vec::new();
    loop {
        req.model = tier.model.clone();
        // The routed tier's call may be clamped (a local tier's cap); a spill or fallback's not.
        let mut this_req = req.clone();
        if let Some(cap) = decision.max_output_tokens
            && tier.name == decision.tier
        {
            routing::clamp_output(&mut this_req, cap);
        }
        let span = trace::tier_span(tier);
        let result = call_guarded(rt, acct, tier, &backend, &this_req, &span, &call).await;
        let e = match result {
            Ok(v) => return Ok((v, tier, span)),
            Err(e) => e,
        };
        tried.push(&tier.name);
        if acct.client_gone() {
            return Err(e);
        }
        // A tier that cannot be called at all (no API key; `/readyz` says so) is passed over:
        // its 503 would hide why the request really failed, e.g. a saturated local tier's 429.
        let usable = |t: &str| match rt.tier_problems.get(t) {
            Some(problem) => {
                tracing::warn!(request_id = %acct.rec.request_id, tier = %t, problem = %problem, "passing over a tier that cannot be called");
                false
            }
            None => true,
        };
        let Some(next) = next_tier(&decision.then, &tried, &e, usable) else {
            return Err(e);
        };
        tracing::warn!(
            request_id = %acct.rec.request_id,
            from = %tier.name,
            to = %next,
            code = e.code(),
            "falling back to the next tier"
        );
        let outcome = if matches!(e, Error::LocalSaturated { .. }) {
            "saturated"
        } else {
            e.code()
        };
        acct.attempt_failed(outcome, Usage::default(), None);
        acct.rec.fallback = true;
        (tier, backend) = tier_backend(rt, next)?;
        acct.switch_tier(tier);
    }
}

/// One tier's call through its retries and circuit breaker, each failed try recorded as an
/// attempt; see [`unless_gone`] for a client that leaves meanwhile.
async fn call_guarded<T>(
    rt: &Runtime,
    acct: &mut Accounting,
    tier: &TierConfig,
    backend: &Arc<dyn Backend>,
    req: &ChatRequest,
    span: &tracing::Span,
    call: &impl Fn(Arc<dyn Backend>, ChatRequest) -> BoxFuture<'static, Result<T, Error>>,
) -> Result<T, Error> {
    let guard = rt.guards.get(&tier.name).cloned().unwrap_or_else(Guard::none);
    let gone = acct.gone.clone();
    let progress = matches!(tier.backend, BackendConfig::Local(_)).then(crate::upstream::Progress::default);
    let result = with_retries(
        &tier.name,
        &guard.retry,
        guard.breaker.as_deref(),
        || {
            unless_gone(
                gone.clone(),
                progress.as_ref(),
                call(backend.clone(), req.clone()).instrument(span.clone()),
            )
        },
        |e| acct.retried(e),
    )
    .await;
    // The client left a local answer half-made: the engine did that work (its machine time,
    // the tokens so far), so the row bills it like a stream cut off at the same point.
    // (Before its first token it may still have been queued: then it used nothing.)
    if let (Err(Error::ClientDisconnected), Some(progress)) = (&result, &progress)
        && let Some(used) = progress.lock().ok().and_then(|p| *p)
    {
        acct.called_tier = true;
        acct.usage = Some(used);
    }
    result
}

/// The tier to try after `tried` failed with `e`: the spill tier for a saturated local
/// tier (`on_saturated`), then the rule's `fallback` list, skipping tiers not `usable`; none
/// for errors that another tier would not fix (the request itself was rejected).
fn next_tier<'a>(then: &'a Then, tried: &[&str], e: &Error, usable: impl Fn(&str) -> bool) -> Option<&'a str> {
    if !e.falls_back() {
        return None;
    }
    let spill = match e {
        Error::LocalSaturated { .. } => then.on_saturated.as_deref(),
        _ => None,
    };
    spill
        .into_iter()
        .chain(then.fallback.iter().map(String::as_str))
        .find(|t| !tried.contains(t) && usable(t))
}

/// The rule's escalation, unless its tier cannot be called at all (no API key): then a weak
/// answer is kept as it is, and a stream is not held back for a judgement nothing could act on.
fn usable_escalation<'a>(rt: &Runtime, decision: &'a RouteDecision) -> Option<&'a Escalate> {
    decision.then.escalate.as_ref().filter(|e| rt.can_call(&e.tier))
}

/// The first answer is too weak: re-ask `to`, recording the first call as a
/// `low_confidence` attempt (with what it `used`). If that tier fails, the first answer is
/// still better than an error: the request is back on the first tier, the failed attempts
/// stay in the ledger, and `None` is returned.
async fn escalate<'a, T>(
    rt: &'a Runtime,
    acct: &mut Accounting,
    used: Usage,
    confidence: Option<f64>,
    to: &str,
    mut req: ChatRequest,
    call: impl Fn(Arc<dyn Backend>, ChatRequest) -> BoxFuture<'static, Result<T, Error>>,
) -> Option<(T, &'a TierConfig, tracing::Span)> {
    let Ok((tier, backend)) = tier_backend(rt, to) else {
        return None;
    };
    let first_tier = acct.current_tier();
    let first_attempt = acct.rec.attempts.len();
    acct.attempt_failed("low_confidence", used, confidence);
    acct.rec.escalated = true;
    acct.switch_tier(tier);
    req.model = tier.model.clone();
    let span = trace::tier_span(tier);
    let result = call_guarded(rt, acct, tier, &backend, &req, &span, &call).await;
    match result {
        Ok(v) => Some((v, tier, span)),
        Err(e) => {
            tracing::warn!(request_id = %acct.rec.request_id, code = e.code(), "escalation failed; answering with the first tier's answer");
            // The first attempt gives the answer after all: it is already recorded (so
            // `finish` adds no final attempt), in the order the calls were made.
            if let Some(a) = acct.rec.attempts.get_mut(first_attempt) {
                a.outcome = "ok".to_owned();
            }
            acct.attempt_failed(e.code(), Usage::default(), None);
            acct.restore_tier(first_tier);
            acct.answer_attempt = Some(first_attempt);
            None
        }
    }
}

/// Reads a stream until its tier judges the answer so far (`StreamItem::Assessed`), or it
/// ends or fails first. Returns what was read (to send if the answer is kept) and the
/// judgement: confidence and usage so far.
async fn hold_prefix(
    upstream: &mut crate::upstream::ChunkStream,
) -> (Vec<Result<StreamItem, Error>>, Option<(f64, Usage)>) {
    let mut held = Vec::new();
    while let Some(item) = upstream.next().await {
        match item {
            Ok(StreamItem::Assessed { confidence, usage }) => return (held, Some((confidence, usage))),
            Ok(StreamItem::Done) | Err(_) => {
                held.push(item);
                break;
            }
            Ok(chunk) => held.push(Ok(chunk)),
        }
    }
    (held, None)
}

fn stream_response(
    mut acct: Accounting,
    mut upstream: crate::upstream::ChunkStream,
    client_wants_usage: bool,
    tier_span: tracing::Span,
    breaker: Option<Arc<Breaker>>,
) -> Response {
    let mut headers = HeaderMap::new();
    acct.decorate(&mut headers);
    let cut = acct.cut.clone();
    let body = async_stream::stream! {
        // The tier call lasts as long as its stream.
        let _tier_span = tier_span;
        let mut saw_done = false;
        let mut finished = false;
        loop {
            let item = tokio::select! {
                item = upstream.next() => item,
                () = cut.cancelled() => Some(Err(Error::ShuttingDown)),
            };
            let Some(item) = item else { break };
            match item {
                Ok(StreamItem::Chunk { json, usage, content, finished: f, usage_only }) => {
                    if usage.is_some() {
                        acct.usage = usage;
                    }
                    if let Some(c) = content {
                        if acct.ttft_ms.is_none() && !c.is_empty() {
                            acct.ttft_ms = Some(acct.elapsed_ms());
                        }
                        acct.content.push_str(&c);
                    }
                    finished |= f;
                    if usage_only && !client_wants_usage {
                        continue;
                    }
                    yield Ok::<Bytes, std::convert::Infallible>(sse_data(&json));
                }
                Ok(StreamItem::Done) => {
                    saw_done = true;
                    break;
                }
                // Judged before the first byte was sent (or not asked for): not for the client.
                Ok(StreamItem::Assessed { .. }) => {}
                Err(e) => {
                    tracing::warn!(request_id = %acct.rec.request_id, code = e.code(), "stream failed mid-way");
                    if let Some(b) = breaker.as_ref().filter(|_| !matches!(e, Error::ShuttingDown)) {
                        b.record_late_failure();
                    }
                    acct.finish_durably(e.code(), 200).await;
                    yield Ok(sse_data(e.envelope().to_string().as_bytes()));
                    return;
                }
            }
        }
        if !saw_done && !finished {
            let e = Error::Upstream {
                tier: acct.rec.tier.clone().unwrap_or_default(),
                detail: "the upstream stream ended before the answer was complete".to_owned(),
            };
            if let Some(b) = &breaker {
                b.record_late_failure();
            }
            acct.finish_durably(e.code(), 200).await;
            yield Ok(sse_data(e.envelope().to_string().as_bytes()));
            return;
        }
        acct.finish_durably("ok", 200).await;
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.extend(headers);
    resp
}

fn sse_data(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// One request's ledger row in the making. Dropping it unfinished (the client went away)
/// still writes the row, as `client_disconnected`.
#[derive(Default)]
struct Accounting {
    ledger: Option<Ledger>,
    rec: Record,
    start: Option<Instant>,
    baseline: Option<Price>,
    price: Option<Price>,
    prompt_estimate: u64,
    called_tier: bool,
    usage: Option<Usage>,
    content: String,
    ttft_ms: Option<f64>,
    /// The answering tier's confidence, when it reports one.
    confidence: Option<f64>,
    /// When the current tier was called (for per-attempt latency).
    attempt_start: Option<Instant>,
    /// The answering call is already in `rec.attempts`, at this index (an escalation that
    /// failed). A stream goes on after it is recorded: its usage and time are completed
    /// when the row is written.
    answer_attempt: Option<usize>,
    done: bool,
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// Held until the row is written (fields drop after `Drop::drop`).
    in_flight: Option<crate::InFlightGuard>,
    /// Cancelled when shutdown cuts the requests still running.
    cut: tokio_util::sync::CancellationToken,
    /// The request's span: it ends when the request does (for a stream, with the stream).
    span: Option<tracing::Span>,
    /// Budget reservation of the caller's key, if it has a budget.
    spend: Option<SpendAccount>,
    /// Cancelled when the handler of a whole answer is dropped (its client left) while a
    /// task calls the tiers; see [`answer_whole_detached`].
    gone: Option<tokio_util::sync::CancellationToken>,
}

/// Where an attempt went: enough to record it and to switch back.
#[derive(Clone)]
struct TierRef {
    tier: Option<String>,
    backend_model: Option<String>,
    price: Option<Price>,
    started: Option<Instant>,
}

pub const HEADER_TIER: &str = "x-tiergate-tier";
pub const HEADER_SCORE: &str = "x-tiergate-score";
pub const HEADER_RULE: &str = "x-tiergate-rule";
pub const HEADER_SCORER: &str = "x-tiergate-scorer";
pub const HEADER_POLICY: &str = "x-tiergate-policy";
pub const HEADER_REQUEST_ID: &str = "x-request-id";
pub const HEADER_CONFIDENCE: &str = "x-tiergate-confidence";
pub const HEADER_ESCALATED: &str = "x-tiergate-escalated";

impl Accounting {
    fn new(ledger: Ledger, headers: &HeaderMap, baseline: Price) -> Self {
        let request_id = headers
            .get(HEADER_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("tg-{}", uuid::Uuid::new_v4().simple()));
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut a = Accounting::default();
        a.ledger = Some(ledger);
        a.rec = Record {
            ts_ms,
            request_id,
            ..Record::default()
        };
        a.start = Some(Instant::now());
        a.baseline = Some(baseline);
        a
    }

    /// The current tier failed and is about to be called again, unless the client has
    /// left (false: no retry for nobody; the failure is then the row's last attempt).
    fn retried(&mut self, e: &Error) -> bool {
        if self.client_gone() {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.retried(self.rec.tier.as_deref().unwrap_or_default(), e);
        }
        self.attempt_failed(e.code(), Usage::default(), None);
        self.attempt_start = Some(Instant::now());
        true
    }

    fn client_gone(&self) -> bool {
        self.gone.as_ref().is_some_and(|g| g.is_cancelled())
    }

    /// Moves the row out, for a task that may outlive the handler to finish. What stays
    /// writes no row, but still names the request and its route in the response headers.
    fn detach(&mut self) -> Accounting {
        let mut shadow = Accounting::default();
        shadow.rec = Record {
            request_id: self.rec.request_id.clone(),
            tier: self.rec.tier.clone(),
            rule: self.rec.rule.clone(),
            policy: self.rec.policy.clone(),
            score: self.rec.score,
            scorer: self.rec.scorer.clone(),
            ..Record::default()
        };
        std::mem::replace(self, shadow)
    }

    fn elapsed_ms(&self) -> f64 {
        self.start.map(|s| s.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0)
    }

    fn routed(&mut self, d: &RouteDecision, backend_model: &str, price: Price, prompt_estimate: u64) {
        self.rec.tier = Some(d.tier.clone());
        self.rec.rule = Some(d.rule.clone());
        self.rec.policy = d.policy.clone();
        self.rec.score = d.score.map(|s| s.value);
        self.rec.scorer = d.score.map(|s| s.scorer.to_owned());
        self.rec.backend_model = Some(backend_model.to_owned());
        self.price = Some(price);
        self.prompt_estimate = prompt_estimate;
    }

    fn gateway_done(&mut self) {
        self.rec.gateway_ms = self.elapsed_ms();
        self.attempt_start = Some(Instant::now());
    }

    fn current_tier(&self) -> TierRef {
        TierRef {
            tier: self.rec.tier.clone(),
            backend_model: self.rec.backend_model.clone(),
            price: self.price,
            started: self.attempt_start,
        }
    }

    fn restore_tier(&mut self, t: TierRef) {
        self.rec.tier = t.tier;
        self.rec.backend_model = t.backend_model;
        self.price = t.price;
        self.attempt_start = t.started;
    }

    /// The request moves on to another tier (spill or escalation).
    fn switch_tier(&mut self, tier: &TierConfig) {
        self.rec.tier = Some(tier.name.clone());
        self.rec.backend_model = Some(tier.model.clone());
        self.price = Some(tier.price);
        self.attempt_start = Some(Instant::now());
    }

    /// Seconds since the current tier was called (or since routing, for the first tier).
    fn attempt_secs(&self) -> f64 {
        self.attempt_start
            .or(self.start)
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0)
    }

    /// Records the current tier's call as an attempt that did not give the answer.
    fn attempt_failed(&mut self, outcome: &str, usage: Usage, confidence: Option<f64>) {
        let a = self.attempt(outcome, usage, confidence);
        self.rec.attempts.push(a);
    }

    fn attempt(&self, outcome: &str, usage: Usage, confidence: Option<f64>) -> Attempt {
        Attempt {
            tier: self.rec.tier.clone().unwrap_or_default(),
            backend_model: self.rec.backend_model.clone().unwrap_or_default(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost_usd: self
                .price
                .map(|p| p.cost_with_time(usage.prompt_tokens, usage.completion_tokens, self.attempt_secs()))
                .unwrap_or(0.0),
            latency_ms: self.attempt_secs() * 1000.0,
            confidence,
            outcome: outcome.to_owned(),
        }
    }

    /// The `x-tiergate-*` headers that say which tier answered and why.
    fn decorate(&self, h: &mut HeaderMap) {
        let mut put = |name: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        put(HEADER_REQUEST_ID, &self.rec.request_id);
        if let Some(t) = &self.rec.tier {
            put(HEADER_TIER, t);
        }
        if let Some(r) = &self.rec.rule {
            put(HEADER_RULE, r);
        }
        if let Some(p) = &self.rec.policy {
            put(HEADER_POLICY, p);
        }
        if let Some(s) = self.rec.score {
            put(HEADER_SCORE, &format!("{s:.4}"));
        }
        if let Some(s) = &self.rec.scorer {
            put(HEADER_SCORER, s);
        }
        if let Some(c) = self.confidence {
            put(HEADER_CONFIDENCE, &format!("{c:.4}"));
        }
        if self.rec.escalated {
            put(HEADER_ESCALATED, "true");
        }
    }

    /// Queues the row without waiting (the client is gone; nobody waits for the answer).
    fn finish(&mut self, outcome: &str, status: u16) {
        if let Some((l, rec)) = self.settle(outcome, status) {
            l.record(rec);
        }
    }

    /// Writes the row and waits for its commit: called before the answer's last bytes
    /// leave, so that a client holding a complete answer can count on its ledger row.
    async fn finish_durably(&mut self, outcome: &str, status: u16) {
        if let Some((l, rec)) = self.settle(outcome, status) {
            l.record_durable(rec).await;
        }
    }

    /// Completes the row (once) and hands it over with the ledger to write it to.
    fn settle(&mut self, outcome: &str, status: u16) -> Option<(Ledger, Record)> {
        if self.done {
            return None;
        }
        self.done = true;
        // The handler's stand-in while a detached task holds the row (`detach`): the task
        // writes and logs the request; a second log line for it would be a phantom.
        self.ledger.as_ref()?;
        let r = &mut self.rec;
        r.outcome = outcome.to_owned();
        r.http_status = status;
        r.latency_ms = self.start.map(|s| s.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0);
        if r.gateway_ms == 0.0 {
            r.gateway_ms = r.latency_ms;
        }
        r.ttft_ms = self.ttft_ms.or(if outcome == "ok" && !r.streamed {
            Some(r.latency_ms)
        } else {
            None
        });
        match self.usage {
            Some(u) => {
                r.prompt_tokens = u.prompt_tokens;
                r.completion_tokens = u.completion_tokens;
                r.tokens_estimated = false;
            }
            // The tier was called and answered at least in part: it will bill for it even
            // without reporting usage, so estimate rather than record zero.
            None if self.called_tier => {
                r.prompt_tokens = self.prompt_estimate;
                r.completion_tokens = tokens::estimate(&self.content);
                r.tokens_estimated = true;
            }
            None => {}
        }
        let held = if self.called_tier { self.attempt_secs() } else { 0.0 };
        let r = &mut self.rec;
        r.cost_usd = self
            .price
            .map(|p| p.cost_with_time(r.prompt_tokens, r.completion_tokens, held))
            .unwrap_or(0.0);
        // Several tiers were called: the row's tokens are the final answer's, its cost is
        // what every call cost together.
        if let Some(i) = self.answer_attempt
            && r.streamed
        {
            // The stream kept going after its attempt was recorded: it used what the row says.
            let final_usage = Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
            };
            let outcome = r.outcome.clone();
            let whole = self.attempt(&outcome, final_usage, self.confidence);
            if let Some(a) = self.rec.attempts.get_mut(i) {
                *a = whole;
            }
        }
        let r = &mut self.rec;
        if !r.attempts.is_empty() && self.answer_attempt.is_none() {
            let final_usage = Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
            };
            let outcome = r.outcome.clone();
            let last = self.attempt(&outcome, final_usage, self.confidence);
            let r = &mut self.rec;
            r.attempts.push(last);
        }
        if !self.rec.attempts.is_empty() {
            self.rec.cost_usd = self.rec.attempts.iter().map(|a| a.cost_usd).sum();
        }
        if let Some(s) = self.spend.take() {
            s.settle(self.rec.cost_usd);
        }
        let r = &mut self.rec;
        r.baseline_cost_usd = self
            .baseline
            .map(|p| p.cost(r.prompt_tokens, r.completion_tokens))
            .unwrap_or(0.0);
        tracing::info!(
            request_id = %r.request_id,
            key = r.api_key_id.as_deref().unwrap_or("-"),
            model = r.requested_model.as_deref().unwrap_or("-"),
            tier = r.tier.as_deref().unwrap_or("-"),
            rule = r.rule.as_deref().unwrap_or("-"),
            outcome = %r.outcome,
            status = r.http_status,
            latency_ms = format!("{:.1}", r.latency_ms),
            "request"
        );
        if let Some(m) = &self.metrics {
            m.observe(r);
        }
        if let Some(s) = &self.span {
            trace::record_request(s, r);
        }
        let rec = std::mem::take(&mut self.rec);
        self.ledger.clone().map(|l| (l, rec))
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if self.ledger.is_some() && !self.done {
            let e = Error::ClientDisconnected;
            self.finish(e.code(), e.status_code().as_u16());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_tier;
    use crate::error::Error;
    use crate::policy::Then;

    #[test]
    fn saturation_spills_first_then_the_fallback_list_and_rejections_stop_the_chain() {
        let any = |_: &str| true;
        let then = Then {
            on_saturated: Some("spill".into()),
            fallback: vec!["b".into(), "c".into()],
            escalate: None,
        };
        let saturated = Error::LocalSaturated { tier: "a".into() };
        let down = Error::UpstreamStatus {
            tier: "a".into(),
            status: 503,
        };
        assert_eq!(next_tier(&then, &["a"], &saturated, any), Some("spill"));
        assert_eq!(
            next_tier(&then, &["a"], &down, any),
            Some("b"),
            "`on_saturated` is for saturation only"
        );
        assert_eq!(next_tier(&then, &["a", "spill"], &down, any), Some("b"));
        assert_eq!(next_tier(&then, &["a", "b"], &saturated, any), Some("spill"));
        assert_eq!(
            next_tier(&then, &["a", "b", "spill", "c"], &down, any),
            None,
            "chain exhausted"
        );
        let rejected = Error::UpstreamRejected {
            tier: "a".into(),
            status: 400,
            detail: "bad".into(),
        };
        assert_eq!(next_tier(&then, &["a"], &rejected, any), None);
        assert_eq!(next_tier(&Then::default(), &["a"], &down, any), None);
        // A tier that cannot be called is passed over, as if it were not listed.
        let not_spill = |t: &str| t != "spill";
        assert_eq!(next_tier(&then, &["a"], &saturated, not_spill), Some("b"));
        assert_eq!(next_tier(&then, &["a", "b", "c"], &saturated, not_spill), None);
    }
}
