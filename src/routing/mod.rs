//! Routing: a [`Scorer`] turns the request's text into a difficulty score in [0,1], the
//! policy turns score and request facts into a tier. Logical model → policy → tier.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::config::Config;
use crate::error::Error;
use crate::openai::ChatRequest;
use crate::policy::{Facts, Then};
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

/// Why a request went where it went.
#[derive(Debug, Clone)]
pub struct RouteDecision {
    pub tier: String,
    pub rule: String,
    pub policy: Option<String>,
    pub score: Option<Score>,
    pub prompt_tokens: u64,
    /// The rule's spill and escalation tiers (none for a request that named a tier).
    pub then: Then,
}

/// Decides a tier for a request under one configuration snapshot.
pub async fn route(config: &Config, scorer: &Arc<dyn Scorer>, req: &ChatRequest) -> Result<RouteDecision, Error> {
    let scored = req.scored_text();
    let prompt_tokens = tokens::estimate(&scored);
    if let Some(tier) = config.tiers.values().find(|t| t.model == req.model) {
        return Ok(RouteDecision {
            tier: tier.name.clone(),
            rule: "explicit-model".to_owned(),
            policy: None,
            score: None,
            prompt_tokens,
            then: Then::default(),
        });
    }
    if !config.aliases.iter().any(|a| a == &req.model) {
        return Err(Error::ModelNotFound(req.model.clone()));
    }
    let span = trace::score_span(prompt_tokens);
    let score = scorer.score(&scored, prompt_tokens).instrument(span.clone()).await;
    trace::scored(&span, &score);
    let span = trace::policy_span(&config.policy.name);
    let rule = span.in_scope(|| {
        config.policy.decide(&Facts {
            score: score.value,
            prompt_tokens,
        })
    });
    trace::decided(&span, rule);
    Ok(RouteDecision {
        tier: rule.tier.clone(),
        rule: rule.name.clone(),
        policy: Some(config.policy.name.clone()),
        score: Some(score),
        prompt_tokens,
        then: rule.then.clone(),
    })
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
    /// Each rule in order, whether it matched; evaluation stops at the first match.
    pub trace: Vec<RuleTrace>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleTrace {
    pub rule: String,
    pub tier: String,
    pub matched: bool,
}

pub async fn explain(config: &Config, scorer: &Arc<dyn Scorer>, req: &ChatRequest) -> Result<Explanation, Error> {
    let d = route(config, scorer, req).await?;
    let tier = config
        .tiers
        .get(&d.tier)
        .ok_or_else(|| Error::Internal(format!("unknown tier `{}`", d.tier)))?;
    let prompt_tokens = tokens::estimate(&req.all_text());
    let output = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| req.rest.get(*k).and_then(serde_json::Value::as_u64))
        .unwrap_or(DEFAULT_OUTPUT_ESTIMATE);
    let trace = match (&d.policy, d.score) {
        (Some(_), Some(s)) => {
            let facts = Facts {
                score: s.value,
                prompt_tokens: d.prompt_tokens,
            };
            let mut out = Vec::new();
            for r in &config.policy.rules {
                let matched = r.matches(&facts);
                out.push(RuleTrace {
                    rule: r.name.clone(),
                    tier: r.tier.clone(),
                    matched,
                });
                if matched {
                    break;
                }
            }
            out
        }
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
    })
}
