//! Routing: a [`Scorer`] turns the request's text into a difficulty score in [0,1], the
//! policy turns score and request facts into a tier. Logical model → policy → tier.
//! `sticky` keeps a conversation on the strongest tier it reached.

pub mod sticky;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::config::{BackendConfig, Config};
use crate::error::Error;
use crate::openai::ChatRequest;
use crate::policy::{Facts, Policy, Rule, Then};
use crate::telemetry::trace;
use crate::tokens;
use tracing::Instrument;

/// A difficulty score and the scorer that produced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub value: f64,
    pub scorer: &'static str,
}

/// Something that rates how hard a prompt is: 0 routine, 1 hard.
pub trait Scorer: Send + Sync {
    fn score<'a>(&'a self, text: &'a str, prompt_tokens: u64) -> BoxFuture<'a, Score>;
}

/// The baseline scorer: longer prompts are harder. `score = t / (t + half_tokens)`, where
/// `t` is the estimated token count of the scored text, so `half_tokens` tokens score 0.5.
/// On RouteLLM's data this alone reaches APGR 0.58 (MMLU) and 0.60 (GSM8K); it stays as the
/// fallback when a learned scorer is unavailable or shedding load.
pub struct LengthScorer {
    pub half_tokens: f64,
}

impl LengthScorer {
    pub fn score_tokens(&self, tokens: u64) -> f64 {
        let t = tokens as f64;
        t / (t + self.half_tokens)
    }
}

impl Scorer for LengthScorer {
    fn score<'a>(&'a self, _text: &'a str, prompt_tokens: u64) -> BoxFuture<'a, Score> {
        let value = self.score_tokens(prompt_tokens);
        Box::pin(async move {
            Score {
                value,
                scorer: "length",
            }
        })
    }
}

/// What the HTTP layer knows about a request beyond its body.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Request headers, names lowercased (values that are not visible ASCII are left out).
    pub headers: BTreeMap<String, String>,
    /// The name of the client's gateway key (`tiergate keys create --name`), never the secret.
    pub key: Option<String>,
    pub team: Option<String>,
    /// Local tiers' load now: requests running or waiting / `max_concurrent`.
    pub local_load: BTreeMap<String, f64>,
}

/// The header that forces a tier, when the policy has `allow_tier_override = true`.
pub const HEADER_FORCE_TIER: &str = "x-tiergate-tier";
/// The prefix of models that pick a policy by name: `tiergate:<policy>`.
pub const POLICY_MODEL_PREFIX: &str = "tiergate:";

impl RequestContext {
    /// The request's headers as rules see them: without the client's key (keys are secrets;
    /// rules see only the key's name and team).
    pub fn from_headers(headers: &axum::http::HeaderMap) -> RequestContext {
        // A header sent twice is one comma-separated list (RFC 9110), not its last value:
        // two `x-tiergate-tier` headers name no tier, rather than the last one silently.
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in headers
            .iter()
            .filter(|(k, _)| *k != axum::http::header::AUTHORIZATION && k.as_str() != "x-api-key")
        {
            let Ok(v) = v.to_str() else { continue };
            map.entry(k.as_str().to_owned())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(v);
                })
                .or_insert_with(|| v.to_owned());
        }
        let headers = map;
        RequestContext {
            headers,
            ..RequestContext::default()
        }
    }
}

/// Why a request went where it went.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    pub tier: String,
    pub rule: String,
    pub policy: Option<String>,
    pub score: Option<Score>,
    pub prompt_tokens: u64,
    /// Estimated tokens of everything billed as input (all messages, not only what was
    /// scored): computed once here for the cost cap, the ledger, limits and `explain`.
    pub request_tokens: u64,
    /// The rule's spill and escalation tiers (none for a request that named a tier).
    pub then: Then,
    /// `max_tokens` is clamped to this for the first call (the rule's tier is local and the
    /// rule has `max_local_output_tokens`).
    pub max_output_tokens: Option<u64>,
    /// The rule's `max_cost_usd`, which stickiness may not lift the request past either.
    pub max_cost_usd: Option<f64>,
    /// The conversation may be kept on (and raise) its sticky tier.
    pub sticky: bool,
    /// What the rules saw; `None` when no policy was evaluated.
    pub facts: Option<Facts>,
    /// Things a cap or the override changed, for `explain`.
    pub notes: Vec<String>,
}

/// The policy a requested model names: `None` for a tier's own model (no policy).
pub fn select_policy<'a>(config: &'a Config, model: &str) -> Result<Option<&'a Policy>, Error> {
    if config.tiers.values().any(|t| t.model == model) {
        return Ok(None);
    }
    if config.aliases.iter().any(|a| a == model) {
        return Ok(Some(&config.policy));
    }
    if let Some(name) = model.strip_prefix(POLICY_MODEL_PREFIX) {
        return match config.policies.get(name) {
            Some(p) => Ok(Some(p)),
            None => Err(Error::PolicyNotFound {
                model: model.to_owned(),
                available: config
                    .policies
                    .keys()
                    .map(|n| format!("{POLICY_MODEL_PREFIX}{n}"))
                    .collect(),
            }),
        };
    }
    Err(Error::ModelNotFound(model.to_owned()))
}

/// The facts rules look at, from the request body and its context.
pub fn facts(req: &ChatRequest, text: String, score: f64, prompt_tokens: u64, ctx: &RequestContext) -> Facts {
    let images = req.messages.iter().any(|m| match &m.content {
        Some(Value::Array(parts)) => parts
            .iter()
            .any(|p| p.get("type").and_then(Value::as_str) == Some("image_url")),
        _ => false,
    });
    Facts {
        score,
        prompt_tokens,
        model: req.model.clone(),
        turns: req.messages.iter().filter(|m| m.role == "user").count() as u64,
        tools: req.tools_field().is_some(),
        json_mode: req.json_mode(),
        images,
        text,
        key: ctx.key.clone(),
        team: ctx.team.clone(),
        headers: ctx.headers.clone(),
        local_load: ctx.local_load.clone(),
    }
}

/// The output tokens a request asks for, if it says.
pub fn requested_output_tokens(req: &ChatRequest) -> Option<u64> {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| req.rest.get(*k).and_then(Value::as_u64))
}

/// Decides a tier for a request under one configuration snapshot, without request context.
pub async fn route(config: &Config, scorer: &Arc<dyn Scorer>, req: &ChatRequest) -> Result<RouteDecision, Error> {
    route_with(config, scorer, req, &RequestContext::default()).await
}

/// Decides a tier for a request under one configuration snapshot.
pub async fn route_with(
    config: &Config,
    scorer: &Arc<dyn Scorer>,
    req: &ChatRequest,
    ctx: &RequestContext,
) -> Result<RouteDecision, Error> {
    let scored = req.scored_text();
    let prompt_tokens = tokens::estimate(&scored);
    let request_tokens = tokens::estimate(&req.all_text());
    let decision = |tier: String, rule: &str, policy: Option<String>| RouteDecision {
        tier,
        rule: rule.to_owned(),
        policy,
        score: None,
        prompt_tokens,
        request_tokens,
        then: Then::default(),
        max_output_tokens: None,
        max_cost_usd: None,
        sticky: false,
        facts: None,
        notes: Vec::new(),
    };
    let Some(policy) = select_policy(config, &req.model)? else {
        let tier = config
            .tiers
            .values()
            .find(|t| t.model == req.model)
            .ok_or_else(|| Error::ModelNotFound(req.model.clone()))?;
        return Ok(decision(tier.name.clone(), "explicit-model", None));
    };
    if let Some(forced) = ctx.headers.get(HEADER_FORCE_TIER) {
        if !policy.allow_tier_override {
            return Err(Error::InvalidRequest {
                message: format!(
                    // The policy's name, not its file: a client has no business with the
                    // server's paths.
                    "policy `{}` does not let clients choose a tier with the `{HEADER_FORCE_TIER}` header; remove the header, or have the operator set `allow_tier_override = true` in that policy",
                    policy.name,
                ),
                param: None,
                code: "tier_override_not_allowed",
            });
        }
        if !config.tiers.contains_key(forced) {
            return Err(Error::InvalidRequest {
                message: format!(
                    "`{HEADER_FORCE_TIER}: {forced}` is not a tier; use one of {}",
                    config.tiers.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                ),
                param: None,
                code: "unknown_tier",
            });
        }
        let mut d = decision(forced.clone(), "tier-override", Some(policy.name.clone()));
        d.notes
            .push(format!("`{HEADER_FORCE_TIER}` header chose tier `{forced}`"));
        return Ok(d);
    }
    let span = trace::score_span(prompt_tokens);
    let score = scorer.score(&scored, prompt_tokens).instrument(span.clone()).await;
    trace::scored(&span, &score);
    let span = trace::policy_span(&policy.name);
    let facts = facts(req, scored, score.value, prompt_tokens, ctx);
    let rule = span.in_scope(|| policy.decide(&facts));
    trace::decided(&span, rule);
    let mut d = RouteDecision {
        tier: rule.tier.clone(),
        rule: rule.name.clone(),
        policy: Some(policy.name.clone()),
        score: Some(score),
        prompt_tokens,
        request_tokens,
        then: rule.then.clone(),
        max_output_tokens: None,
        max_cost_usd: None,
        sticky: policy.stickiness,
        facts: None,
        notes: Vec::new(),
    };
    apply_caps(config, rule, req, &mut d)?;
    d.facts = Some(facts);
    Ok(d)
}

/// The rule's caps: clamp a local tier's output, keep the estimated cost under the cap.
fn apply_caps(config: &Config, rule: &Rule, req: &ChatRequest, d: &mut RouteDecision) -> Result<(), Error> {
    let is_local = |tier: &str| {
        config
            .tiers
            .get(tier)
            .is_some_and(|t| matches!(t.backend, BackendConfig::Local(_)))
    };
    let clamp = |tier: &str| rule.caps.max_local_output_tokens.filter(|_| is_local(tier));
    d.max_output_tokens = clamp(&d.tier);
    d.max_cost_usd = rule.caps.max_cost_usd;
    let Some(cap) = rule.caps.max_cost_usd else {
        return Ok(());
    };
    let prompt = d.request_tokens;
    let requested = requested_output_tokens(req).unwrap_or(DEFAULT_OUTPUT_ESTIMATE);
    // Each of the `n` choices may use the whole output limit.
    let n = req.choices();
    let cost = |tier: &str| {
        let output = clamp(tier).map_or(requested, |c| c.min(requested));
        config
            .tiers
            .get(tier)
            .map_or(0.0, |t| t.price.cost(prompt, output.saturating_mul(n)))
    };
    let estimate = cost(&d.tier);
    if estimate <= cap {
        return Ok(());
    }
    match &rule.caps.over_cost_tier {
        Some(to) => {
            d.notes.push(format!(
                "estimated ${estimate:.6} at `{}` is over max_cost_usd ${cap}; sent to over_cost_tier `{to}`",
                d.tier
            ));
            d.tier = to.clone();
            d.then = Then::default();
            // Stickiness would lift the request back over the cap.
            d.sticky = false;
            d.max_output_tokens = clamp(to);
            Ok(())
        }
        None => Err(Error::InvalidRequest {
            message: format!(
                "the estimated cost ${estimate:.6} ({prompt} prompt + {} output tokens at tier `{}`) is over the ${cap} cap of rule `{}` in policy `{}`; lower `max_tokens` (or `n`) or shorten the prompt",
                if n > 1 {
                    format!("{n} × {requested}")
                } else {
                    requested.to_string()
                },
                d.tier,
                rule.name,
                d.policy.as_deref().unwrap_or("-")
            ),
            param: Some("max_tokens".to_owned()),
            code: "cost_cap_exceeded",
        }),
    }
}

/// Sets the request's output limit to at most `cap`: the field it uses, else the gateway's
/// own [`ChatRequest::output_cap`] (a limit the client did not ask for must not turn into a
/// `context_length_exceeded`).
pub fn clamp_output(req: &mut ChatRequest, cap: u64) {
    let mut set = false;
    for key in ["max_completion_tokens", "max_tokens"] {
        if let Some(v) = req.rest.get_mut(key)
            && !v.is_null()
        {
            if v.as_u64().is_none_or(|n| n > cap) {
                *v = Value::from(cap);
            }
            set = true;
        }
    }
    if !set {
        req.output_cap = Some(cap);
    }
}

/// Output tokens assumed for a cost estimate when the request sets no `max_tokens`.
pub const DEFAULT_OUTPUT_ESTIMATE: u64 = 256;

/// What the gateway would do with a request, without calling any model (`POST /v1/route`,
/// `tiergate explain`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    pub requested_model: String,
    pub tier: String,
    pub backend_model: String,
    pub rule: String,
    pub policy: Option<String>,
    pub score: Option<f64>,
    pub scorer: Option<&'static str>,
    pub prompt_tokens: u64,
    pub output_tokens_assumed: u64,
    pub estimated_cost_usd: f64,
    pub baseline_cost_usd: f64,
    /// Each rule in order, whether it matched and why; evaluation stops at the first match.
    pub trace: Vec<RuleTrace>,
    /// What the tier override or a cap changed after the rule matched.
    pub notes: Vec<String>,
    /// Where the request goes when `tier` is saturated (local tiers), before `fallback`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_saturated: Option<String>,
    /// Tiers tried in order when `tier` cannot answer; empty when the request named a
    /// tier, or a cap, the override or stickiness replaced the rule's tier.
    pub fallback: Vec<String>,
    /// The tier that re-answers a non-streamed answer whose confidence is below
    /// `min_confidence`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_confidence: Option<f64>,
}

impl Explanation {
    /// Notes the tiers on this route that cannot be called at all (`problems`: tier → why,
    /// e.g. a missing API key): serving passes them over in spill, fallback and escalation.
    pub fn note_unusable(&mut self, problems: &BTreeMap<String, String>) {
        if let Some(p) = problems.get(&self.tier) {
            self.notes.push(format!(
                "tier `{}` cannot be called ({p}): the request fails with 503 `tier_unavailable` unless a fallback answers",
                self.tier
            ));
        }
        let mut seen = vec![self.tier.as_str()];
        let later = self.on_saturated.iter().chain(&self.fallback).chain(&self.escalate_to);
        for t in later {
            if seen.contains(&t.as_str()) {
                continue;
            }
            seen.push(t);
            if let Some(p) = problems.get(t) {
                self.notes
                    .push(format!("tier `{t}` cannot be called ({p}): it is passed over"));
            }
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleTrace {
    pub rule: String,
    pub tier: String,
    pub matched: bool,
    /// For a match, the conditions that held; otherwise the first that failed.
    pub why: String,
}

/// Each rule of `policy` in order until the first match, with the reason.
pub fn rule_trace(policy: &Policy, facts: &Facts) -> Vec<RuleTrace> {
    let mut out = Vec::new();
    for r in &policy.rules {
        let (matched, why) = match r.check(facts) {
            Ok(why) => (true, why),
            Err(why) => (false, why),
        };
        out.push(RuleTrace {
            rule: r.name.clone(),
            tier: r.tier.clone(),
            matched,
            why,
        });
        if matched {
            break;
        }
    }
    out
}

pub async fn explain(config: &Config, scorer: &Arc<dyn Scorer>, req: &ChatRequest) -> Result<Explanation, Error> {
    explain_with(config, scorer, req, &RequestContext::default(), None).await
}

/// The explanation of a request with its context; with the gateway's stickiness store, a
/// conversation held on a stronger tier is explained as the chat endpoint would route it
/// (the store is only read).
pub async fn explain_with(
    config: &Config,
    scorer: &Arc<dyn Scorer>,
    req: &ChatRequest,
    ctx: &RequestContext,
    stickiness: Option<&sticky::Stickiness>,
) -> Result<Explanation, Error> {
    let mut d = route_with(config, scorer, req, ctx).await?;
    let header = ctx.headers.get(sticky::HEADER_CONVERSATION).map(String::as_str);
    sticky::apply(stickiness, &config.tiers, &mut d, header, req);
    let tier = config
        .tiers
        .get(&d.tier)
        .ok_or_else(|| Error::Internal(format!("unknown tier `{}`", d.tier)))?;
    let prompt_tokens = d.request_tokens;
    let requested = requested_output_tokens(req).unwrap_or(DEFAULT_OUTPUT_ESTIMATE);
    let output = d.max_output_tokens.map_or(requested, |c| c.min(requested));
    let trace = match (select_policy(config, &req.model)?, &d.facts) {
        (Some(policy), Some(facts)) => rule_trace(policy, facts),
        _ => Vec::new(),
    };
    Ok(Explanation {
        requested_model: req.model.clone(),
        tier: d.tier,
        backend_model: tier.model.clone(),
        rule: d.rule,
        policy: d.policy,
        score: d.score.map(|s| s.value),
        scorer: d.score.map(|s| s.scorer),
        prompt_tokens,
        output_tokens_assumed: output,
        estimated_cost_usd: tier.price.cost(prompt_tokens, output),
        baseline_cost_usd: config.baseline.cost(prompt_tokens, output),
        trace,
        notes: d.notes,
        on_saturated: d.then.on_saturated,
        fallback: d.then.fallback,
        min_confidence: d.then.escalate.as_ref().map(|e| e.min_confidence),
        escalate_to: d.then.escalate.map(|e| e.tier),
    })
}

#[cfg(test)]
mod tests;
