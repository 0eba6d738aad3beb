//! Routing policies: the TOML rule files in `policies/`, their validation, and rule
//! evaluation (score and request facts in, rule and tier out). Pure: no I/O after loading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::config::TierConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyToml {
    name: Option<String>,
    description: Option<String>,
    over_budget: Option<String>,
    rules: Vec<Spanned<RuleToml>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    name: String,
    tier: String,
    score_below: Option<f64>,
    score_at_least: Option<f64>,
    max_prompt_tokens: Option<u64>,
    min_prompt_tokens: Option<u64>,
    on_saturated: Option<String>,
    min_confidence: Option<f64>,
    escalate_to: Option<String>,
}

/// A validated policy: ordered rules, the last of which matches everything.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    pub rules: Vec<Rule>,
    /// What happens to a request whose key is over its budget.
    pub over_budget: OverBudget,
}

/// `over_budget = "refuse"` (the default) or `over_budget = "<tier>"`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OverBudget {
    /// A 429 `budget_exceeded`.
    #[default]
    Refuse,
    /// Answer from this tier instead (typically a free local one), without a budget check.
    Downgrade(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub tier: String,
    pub score_below: Option<f64>,
    pub score_at_least: Option<f64>,
    pub max_prompt_tokens: Option<u64>,
    pub min_prompt_tokens: Option<u64>,
    /// What happens after the tier is chosen; not conditions of the rule.
    pub then: Then,
}

/// A rule's second chances, for a `local` tier: where to spill when it is saturated, and
/// when to re-ask another tier because its answer is too weak.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Then {
    /// Tier to send the request to when the rule's tier is saturated (otherwise a 429).
    pub on_saturated: Option<String>,
    /// Re-ask `tier` when a non-streamed answer's confidence is below `min_confidence`.
    pub escalate: Option<Escalate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Escalate {
    pub min_confidence: f64,
    pub tier: String,
}

/// What a rule can look at.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub score: f64,
    pub prompt_tokens: u64,
}

impl Rule {
    fn is_unconditional(&self) -> bool {
        self.score_below.is_none()
            && self.score_at_least.is_none()
            && self.max_prompt_tokens.is_none()
            && self.min_prompt_tokens.is_none()
    }

    pub fn matches(&self, f: &Facts) -> bool {
        self.score_below.is_none_or(|t| f.score < t)
            && self.score_at_least.is_none_or(|t| f.score >= t)
            && self.max_prompt_tokens.is_none_or(|t| f.prompt_tokens <= t)
            && self.min_prompt_tokens.is_none_or(|t| f.prompt_tokens >= t)
    }
}

impl Policy {
    pub fn load(path: &Path, tiers: &BTreeMap<String, TierConfig>) -> Result<Policy, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("policy `{}`: cannot read: {e}", path.display()))?;
        Self::parse(&text, path, tiers)
    }

    pub fn parse(text: &str, path: &Path, tiers: &BTreeMap<String, TierConfig>) -> Result<Policy, String> {
        let file = path.display();
        let raw: PolicyToml = toml::from_str(text).map_err(|e| format!("policy `{file}`: {e}"))?;
        let PolicyToml {
            name,
            description,
            over_budget,
            rules,
        } = raw;
        let over_budget = match over_budget.as_deref() {
            None | Some("refuse") => OverBudget::Refuse,
            Some(t) if tiers.contains_key(t) => OverBudget::Downgrade(t.to_owned()),
            Some(t) => {
                return Err(format!(
                    "policy `{file}`: over_budget = `{t}` is neither `refuse` nor a configured tier; use `refuse` or one of {}",
                    tiers.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                ));
            }
        };
        let name = name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        if rules.is_empty() {
            return Err(format!(
                "policy `{file}`: `rules` is empty; add at least one `[[rules]]` with a `tier`"
            ));
        }
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let mut out: Vec<Rule> = Vec::with_capacity(rules.len());
        for (i, spanned) in rules.into_iter().enumerate() {
            let line = line_of(spanned.span().start);
            let RuleToml {
                name: rname,
                tier,
                score_below,
                score_at_least,
                max_prompt_tokens,
                min_prompt_tokens,
                on_saturated,
                min_confidence,
                escalate_to,
            } = spanned.into_inner();
            let at = |key: &str| format!("policy `{file}`: rules[{i}].{key} (line {line})");
            let known = || tiers.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            for (key, t) in [
                ("tier", Some(&tier)),
                ("on_saturated", on_saturated.as_ref()),
                ("escalate_to", escalate_to.as_ref()),
            ] {
                if let Some(t) = t
                    && !tiers.contains_key(t)
                {
                    return Err(format!(
                        "{} = `{t}` is not a configured tier; use one of {}",
                        at(key),
                        known()
                    ));
                }
                if key != "tier" && t == Some(&tier) {
                    return Err(format!(
                        "{} = `{tier}` is the rule's own tier; name another tier",
                        at(key)
                    ));
                }
            }
            let escalate = match (min_confidence, escalate_to) {
                (None, None) => None,
                (Some(c), Some(t)) if (0.0..=1.0).contains(&c) => Some(Escalate {
                    min_confidence: c,
                    tier: t,
                }),
                (Some(c), Some(_)) => {
                    return Err(format!("{} = {c} must be in 0..=1", at("min_confidence")));
                }
                (Some(_), None) => {
                    return Err(format!(
                        "{}: `min_confidence` needs `escalate_to`, the tier that re-answers weak answers",
                        at("escalate_to")
                    ));
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "{}: `escalate_to` needs `min_confidence`, the confidence below which an answer is re-asked",
                        at("min_confidence")
                    ));
                }
            };
            for (key, v) in [("score_below", score_below), ("score_at_least", score_at_least)] {
                if let Some(v) = v
                    && !(0.0..=1.0).contains(&v)
                {
                    return Err(format!("{} = {v} must be in 0..=1", at(key)));
                }
            }
            if let (Some(lo), Some(hi)) = (score_at_least, score_below)
                && lo >= hi
            {
                return Err(format!(
                    "{}: score_at_least {lo} >= score_below {hi}, so the rule never matches",
                    at("score_below")
                ));
            }
            if let (Some(lo), Some(hi)) = (min_prompt_tokens, max_prompt_tokens)
                && lo > hi
            {
                return Err(format!(
                    "{}: min_prompt_tokens {lo} > max_prompt_tokens {hi}, so the rule never matches",
                    at("max_prompt_tokens")
                ));
            }
            if let Some(prev) = out.iter().find(|r| r.is_unconditional()) {
                return Err(format!(
                    "{}: rule `{rname}` is unreachable because rule `{}` before it matches every request; move it up or remove it",
                    at("name"),
                    prev.name
                ));
            }
            if out.iter().any(|r| r.name == rname) {
                return Err(format!("{}: rule name `{rname}` is used twice", at("name")));
            }
            out.push(Rule {
                name: rname,
                tier,
                score_below,
                score_at_least,
                max_prompt_tokens,
                min_prompt_tokens,
                then: Then { on_saturated, escalate },
            });
        }
        if !out.last().is_some_and(Rule::is_unconditional) {
            return Err(format!(
                "policy `{file}`: the last rule must have no conditions, so that every request gets a tier; add a final `[[rules]]` with only `name` and `tier`"
            ));
        }
        Ok(Policy {
            name,
            description: description.unwrap_or_default(),
            file: path.to_path_buf(),
            rules: out,
            over_budget,
        })
    }

    /// The first matching rule. Validation guarantees the last rule matches everything.
    pub fn decide(&self, facts: &Facts) -> &Rule {
        self.rules
            .iter()
            .find(|r| r.matches(facts))
            .unwrap_or_else(|| self.rules.last().expect("validated policy has rules"))
    }
}

#[cfg(test)]
mod tests;
