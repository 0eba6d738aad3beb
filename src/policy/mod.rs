//! Routing policies: the TOML rule files in `policies/`, their validation, and rule
//! evaluation (score and request facts in, rule and tier out). Pure: no I/O after loading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::config::{BackendConfig, TierConfig};

pub mod calibrate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyToml {
    name: Option<String>,
    description: Option<String>,
    /// Whether a client may force a tier with the `x-tiergate-tier` header.
    #[serde(default)]
    allow_tier_override: bool,
    /// Whether conversations stay on the strongest tier they reached (on by default).
    stickiness: Option<bool>,
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
    fallback: Option<Vec<String>>,
    min_confidence: Option<f64>,
    escalate_to: Option<String>,
    hold_tokens: Option<i64>,
    // Conditions over the request.
    models: Option<Vec<String>>,
    min_turns: Option<u64>,
    max_turns: Option<u64>,
    tools: Option<bool>,
    json_mode: Option<bool>,
    images: Option<bool>,
    regex: Option<Spanned<String>>,
    keywords: Option<Vec<String>>,
    api_keys: Option<Vec<String>>,
    teams: Option<Vec<String>>,
    headers: Option<BTreeMap<String, String>>,
    local_load_below: Option<f64>,
    // Caps.
    max_local_output_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
    over_cost_tier: Option<String>,
}

/// A validated policy: ordered rules, the last of which matches everything.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    /// A client may force a tier with the `x-tiergate-tier` header.
    pub allow_tier_override: bool,
    /// Follow-up turns of a conversation stay at least on the strongest tier it reached.
    pub stickiness: bool,
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
    /// Every condition must hold for the rule to match; none means it matches everything.
    pub when: When,
    /// What happens after the tier is chosen; not conditions of the rule.
    pub then: Then,
    pub caps: Caps,
}

/// A rule's conditions. `None` (or empty) means "any".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct When {
    pub score_below: Option<f64>,
    pub score_at_least: Option<f64>,
    pub max_prompt_tokens: Option<u64>,
    pub min_prompt_tokens: Option<u64>,
    /// The requested model is one of these (an alias, `tiergate:<policy>`, …).
    pub models: Option<Vec<String>>,
    pub min_turns: Option<u64>,
    pub max_turns: Option<u64>,
    pub tools: Option<bool>,
    pub json_mode: Option<bool>,
    pub images: Option<bool>,
    pub regex: Option<Pattern>,
    /// Lowercased; any of them as a case-insensitive substring of the scored text.
    pub keywords: Option<Vec<String>>,
    pub api_keys: Option<Vec<String>>,
    pub teams: Option<Vec<String>>,
    /// Lowercased header name → exact value, or `*` for "present".
    pub headers: BTreeMap<String, String>,
    pub local_load_below: Option<f64>,
}

/// A compiled regex, compared by its source.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// A rule's second chances: where to spill when a local tier is saturated, which tiers to try
/// when the tier cannot answer, and when to re-ask another tier because its answer is too weak.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Then {
    /// Tier to send the request to when the rule's tier is saturated (otherwise a 429).
    pub on_saturated: Option<String>,
    /// Tiers to try in order when the rule's tier cannot answer (down, timed out, 5xx,
    /// 429, circuit open, saturated) before any byte reached the client.
    pub fallback: Vec<String>,
    /// Re-ask `tier` when an answer's confidence is below `min_confidence`.
    pub escalate: Option<Escalate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Escalate {
    pub min_confidence: f64,
    pub tier: String,
    /// A stream from a tier that judges its answers is held back for this many generated
    /// tokens, then judged on them; 0: streams are not escalated.
    pub hold_tokens: usize,
}

/// `hold_tokens` when a rule with `min_confidence` does not set it: streams are not held.
/// Holding delays every stream's first token by that many decode steps (16 tokens of the
/// default model: ~0.8 s here) and a prefix is judged more harshly than a whole answer, so
/// it is for the policy to ask for (16 is a reasonable start).
pub const DEFAULT_HOLD_TOKENS: usize = 0;
/// Most tokens a stream may be held back for: beyond this the client waits as long as for
/// a whole short answer.
pub const MAX_HOLD_TOKENS: usize = 256;

/// Limits a rule puts on the request it routes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caps {
    /// When the request is answered by a local tier, its `max_tokens` is at most this.
    pub max_local_output_tokens: Option<u64>,
    /// Estimated cost (prompt tokens + `max_tokens` at the tier's price) allowed per request.
    pub max_cost_usd: Option<f64>,
    /// Where a request over `max_cost_usd` goes; without it, it is rejected with a 400.
    pub over_cost_tier: Option<String>,
}

/// What a rule can look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub score: f64,
    pub prompt_tokens: u64,
    /// The `model` the client asked for.
    pub model: String,
    /// User messages in the request.
    pub turns: u64,
    pub tools: bool,
    pub json_mode: bool,
    pub images: bool,
    /// The scored text (system prompt + last user message).
    pub text: String,
    /// The name of the client's gateway key, never the secret.
    pub key: Option<String>,
    pub team: Option<String>,
    /// Request headers, names lowercased.
    pub headers: BTreeMap<String, String>,
    /// Local tiers' load: requests running or waiting / `max_concurrent`.
    pub local_load: BTreeMap<String, f64>,
}

impl When {
    fn is_empty(&self) -> bool {
        *self == When::default()
    }

    /// Whether every request `other` matches is also matched by `self` (so a rule with
    /// `other` placed after one with `self` never decides). Conservative: `false` when
    /// unsure. `local_load_below` reads the rule's own tier, hence the tiers.
    fn covers(&self, self_tier: &str, other: &When, other_tier: &str) -> bool {
        // `self`'s bound is absent, or `other` has one at least as strict.
        fn upper<T: PartialOrd>(a: Option<T>, b: Option<T>) -> bool {
            a.is_none_or(|a| b.is_some_and(|b| b <= a))
        }
        fn lower<T: PartialOrd>(a: Option<T>, b: Option<T>) -> bool {
            a.is_none_or(|a| b.is_some_and(|b| b >= a))
        }
        fn same<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            a.is_none() || a == b
        }
        fn subset(a: &Option<Vec<String>>, b: &Option<Vec<String>>) -> bool {
            a.as_ref()
                .is_none_or(|a| b.as_ref().is_some_and(|b| b.iter().all(|x| a.contains(x))))
        }
        let load = self.local_load_below.is_none() || self_tier == other_tier;
        upper(self.score_below, other.score_below)
            && lower(self.score_at_least, other.score_at_least)
            && upper(self.max_prompt_tokens, other.max_prompt_tokens)
            && lower(self.min_prompt_tokens, other.min_prompt_tokens)
            && subset(&self.models, &other.models)
            && lower(self.min_turns, other.min_turns)
            && upper(self.max_turns, other.max_turns)
            && same(&self.tools, &other.tools)
            && same(&self.json_mode, &other.json_mode)
            && same(&self.images, &other.images)
            && same(&self.regex, &other.regex)
            && same(&self.keywords, &other.keywords)
            && subset(&self.api_keys, &other.api_keys)
            && subset(&self.teams, &other.teams)
            && self.headers.iter().all(|(k, v)| other.headers.get(k) == Some(v))
            && load
            && upper(self.local_load_below, other.local_load_below)
    }
}

impl Rule {
    fn is_unconditional(&self) -> bool {
        self.when.is_empty()
    }

    pub fn matches(&self, f: &Facts) -> bool {
        self.eval(f, false).is_ok()
    }

    /// Why the rule matches (each condition that held) or why not (the first that failed).
    pub fn check(&self, f: &Facts) -> Result<String, String> {
        self.eval(f, true)
    }

    /// Evaluates the conditions in order; reasons are only formatted when `explain` (rule
    /// evaluation on the request path allocates nothing).
    fn eval(&self, f: &Facts, explain: bool) -> Result<String, String> {
        let w = &self.when;
        let mut held: Vec<String> = Vec::new();
        let mut need = |ok: bool, why: &dyn Fn() -> String| {
            let why = if explain { why() } else { String::new() };
            if ok {
                if explain {
                    held.push(why);
                }
                Ok(())
            } else {
                Err(why)
            }
        };
        const LT: (&str, &str) = ("<", ">=");
        const GE: (&str, &str) = (">=", "<");
        const LE: (&str, &str) = ("<=", ">");
        let bound = |label: &str, got: String, ok: bool, (yes, no): (&str, &str), t: String| {
            format!("{label} {got} {} {t}", if ok { yes } else { no })
        };
        if let Some(t) = w.score_below {
            let ok = f.score < t;
            need(ok, &|| bound("score", format!("{:.4}", f.score), ok, LT, t.to_string()))?;
        }
        if let Some(t) = w.score_at_least {
            let ok = f.score >= t;
            need(ok, &|| bound("score", format!("{:.4}", f.score), ok, GE, t.to_string()))?;
        }
        for (label, got, bound_at, ops) in [
            ("prompt tokens", f.prompt_tokens, w.max_prompt_tokens, LE),
            ("prompt tokens", f.prompt_tokens, w.min_prompt_tokens, GE),
            ("turns", f.turns, w.min_turns, GE),
            ("turns", f.turns, w.max_turns, LE),
        ] {
            if let Some(t) = bound_at {
                let ok = if ops == LE { got <= t } else { got >= t };
                need(ok, &|| bound(label, got.to_string(), ok, ops, t.to_string()))?;
            }
        }
        if let Some(ms) = &w.models {
            let ok = ms.contains(&f.model);
            need(ok, &|| {
                format!("model `{}` {} models", f.model, if ok { "in" } else { "not in" })
            })?;
        }
        for (key, want, got) in [
            ("tools", w.tools, f.tools),
            ("json_mode", w.json_mode, f.json_mode),
            ("images", w.images, f.images),
        ] {
            if let Some(want) = want {
                need(want == got, &|| format!("{key} is {got}"))?;
            }
        }
        if let Some(re) = &w.regex {
            let ok = re.0.is_match(&f.text);
            need(ok, &|| {
                format!(
                    "regex `{}` {}",
                    re.0.as_str(),
                    if ok { "matches" } else { "does not match" }
                )
            })?;
        }
        if let Some(kw) = &w.keywords {
            let text = f.text.to_lowercase();
            let found = kw.iter().find(|k| text.contains(k.as_str()));
            need(found.is_some(), &|| match found {
                Some(k) => format!("keyword `{k}` found"),
                None => "no keyword found".to_owned(),
            })?;
        }
        for (what, list, got) in [("api key", &w.api_keys, &f.key), ("team", &w.teams, &f.team)] {
            if let Some(list) = list {
                let ok = got.as_ref().is_some_and(|g| list.contains(g));
                need(ok, &|| {
                    let g = got.as_deref().unwrap_or("(none)");
                    format!("{what} `{g}` {} the list", if ok { "in" } else { "not in" })
                })?;
            }
        }
        for (name, want) in &w.headers {
            let got = f.headers.get(name);
            let ok = got.is_some_and(|v| want == "*" || v == want);
            need(ok, &|| match got {
                None => format!("header `{name}` absent"),
                Some(_) if ok => format!("header `{name}` matches"),
                Some(_) => format!("header `{name}` is not `{want}`"),
            })?;
        }
        if let Some(t) = w.local_load_below {
            let load = f.local_load.get(&self.tier).copied().unwrap_or(0.0);
            let ok = load < t;
            need(ok, &|| {
                bound(
                    &format!("`{}` load", self.tier),
                    format!("{load:.2}"),
                    ok,
                    LT,
                    t.to_string(),
                )
            })?;
        }
        if !explain {
            Ok(String::new())
        } else if held.is_empty() {
            Ok("no conditions".to_owned())
        } else {
            Ok(held.join(", "))
        }
    }
}

/// Lines of `text` up to byte `offset`, 1-based.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
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
            allow_tier_override,
            stickiness,
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
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!(
                "policy `{file}`: name = `{name}` must be non-empty ASCII letters, digits, `-` or `_` (it is used in `tiergate:<name>`)"
            ));
        }
        if rules.is_empty() {
            return Err(format!(
                "policy `{file}`: `rules` is empty; add at least one `[[rules]]` with a `tier`"
            ));
        }
        let mut out: Vec<Rule> = Vec::with_capacity(rules.len());
        // A rule's span covers its `[[rules]]` header; its keys run to the next header.
        let starts: Vec<usize> = rules.iter().map(|r| r.span().start).collect();
        for (i, spanned) in rules.into_iter().enumerate() {
            let span = spanned.span().start..starts.get(i + 1).copied().unwrap_or(text.len());
            let rule = rule(spanned.into_inner(), i, span.clone(), text, &file.to_string(), tiers)?;
            let at = |key: &str| {
                format!(
                    "policy `{file}`: rules[{i}].{key} (line {})",
                    key_line(text, &span, key)
                )
            };
            if let Some(prev) = out.iter().find(|r| r.is_unconditional()) {
                return Err(format!(
                    "{}: rule `{}` is unreachable because rule `{}` before it matches every request; move it up or remove it",
                    at("name"),
                    rule.name,
                    prev.name
                ));
            }
            if let Some(prev) = out.iter().find(|r| r.when.covers(&r.tier, &rule.when, &rule.tier)) {
                return Err(format!(
                    "{}: rule `{}` is unreachable because rule `{}` before it matches every request it would (its conditions are the same or looser); move it above `{}`, or change its conditions",
                    at("name"),
                    rule.name,
                    prev.name,
                    prev.name
                ));
            }
            if out.iter().any(|r| r.name == rule.name) {
                return Err(format!("{}: rule name `{}` is used twice", at("name"), rule.name));
            }
            out.push(rule);
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
            allow_tier_override,
            stickiness: stickiness.unwrap_or(true),
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

/// The line of `key = …` inside the table at `span`, else the table's first line.
fn key_line(text: &str, span: &std::ops::Range<usize>, key: &str) -> usize {
    let table = &text[span.start.min(text.len())..span.end.min(text.len())];
    let mut offset = span.start;
    for l in table.split_inclusive('\n') {
        let t = l.trim_start();
        if t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('=') || rest.starts_with('.'))
        {
            return line_at(text, offset);
        }
        offset += l.len();
    }
    line_at(text, span.start)
}

/// Validates one `[[rules]]` table.
fn rule(
    r: RuleToml,
    i: usize,
    span: std::ops::Range<usize>,
    text: &str,
    file: &str,
    tiers: &BTreeMap<String, TierConfig>,
) -> Result<Rule, String> {
    let RuleToml {
        name: rname,
        tier,
        score_below,
        score_at_least,
        max_prompt_tokens,
        min_prompt_tokens,
        on_saturated,
        fallback,
        min_confidence,
        escalate_to,
        hold_tokens,
        models,
        min_turns,
        max_turns,
        tools,
        json_mode,
        images,
        regex,
        keywords,
        api_keys,
        teams,
        headers,
        local_load_below,
        max_local_output_tokens,
        max_cost_usd,
        over_cost_tier,
    } = r;
    let at = |key: &str| {
        format!(
            "policy `{file}`: rules[{i}].{key} (line {})",
            key_line(text, &span, key)
        )
    };
    let known = || tiers.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
    for (key, t) in [
        ("tier", Some(&tier)),
        ("on_saturated", on_saturated.as_ref()),
        ("escalate_to", escalate_to.as_ref()),
        ("over_cost_tier", over_cost_tier.as_ref()),
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
    let fallback = fallback.unwrap_or_default();
    for (j, t) in fallback.iter().enumerate() {
        let at = || {
            format!(
                "policy `{file}`: rules[{i}].fallback[{j}] (line {})",
                key_line(text, &span, "fallback")
            )
        };
        if !tiers.contains_key(t) {
            return Err(format!(
                "{} = `{t}` is not a configured tier; use one of {}",
                at(),
                known()
            ));
        }
        if *t == tier {
            return Err(format!("{} = `{t}` is the rule's own tier; name another tier", at()));
        }
        if fallback[..j].contains(t) {
            return Err(format!("{} = `{t}` is already in the fallback list", at()));
        }
    }
    let hold_tokens_given = hold_tokens.is_some();
    let hold_tokens = match hold_tokens {
        None => DEFAULT_HOLD_TOKENS,
        Some(n) if (0..=MAX_HOLD_TOKENS as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(format!(
                "{} = {n} must be in 0..={MAX_HOLD_TOKENS} (0: streams are not escalated)",
                at("hold_tokens")
            ));
        }
    };
    if hold_tokens_given && min_confidence.is_none() {
        return Err(format!(
            "{}: `hold_tokens` needs `min_confidence` and `escalate_to`: it holds back streams to judge them",
            at("hold_tokens")
        ));
    }
    let escalate = match (min_confidence, escalate_to) {
        (None, None) => None,
        (Some(c), Some(t)) if (0.0..=1.0).contains(&c) => Some(Escalate {
            min_confidence: c,
            tier: t,
            hold_tokens,
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
    if score_below == Some(0.0) {
        return Err(format!(
            "{} = 0 never matches: no score is below 0; remove the rule, or raise the threshold",
            at("score_below")
        ));
    }
    if let (Some(lo), Some(hi)) = (score_at_least, score_below)
        && lo >= hi
    {
        return Err(format!(
            "{}: score_at_least {lo} >= score_below {hi}, so the rule never matches",
            at("score_below")
        ));
    }
    for (lo_key, lo, hi_key, hi) in [
        (
            "min_prompt_tokens",
            min_prompt_tokens,
            "max_prompt_tokens",
            max_prompt_tokens,
        ),
        ("min_turns", min_turns, "max_turns", max_turns),
    ] {
        if let (Some(lo), Some(hi)) = (lo, hi)
            && lo > hi
        {
            return Err(format!(
                "{}: {lo_key} {lo} > {hi_key} {hi}, so the rule never matches",
                at(hi_key)
            ));
        }
    }
    if max_turns == Some(0) {
        return Err(format!(
            "{} = 0 never matches: every request has at least one turn",
            at("max_turns")
        ));
    }
    for (key, list) in [
        ("models", &models),
        ("keywords", &keywords),
        ("api_keys", &api_keys),
        ("teams", &teams),
    ] {
        if let Some(list) = list
            && (list.is_empty() || list.iter().any(|s| s.trim().is_empty()))
        {
            return Err(format!(
                "{}: the list must not be empty nor hold empty strings; remove the key to match any",
                at(key)
            ));
        }
    }
    let regex = match regex {
        None => None,
        Some(s) => {
            let rline = line_at(text, s.span().start);
            let src = s.into_inner();
            // It would match every request while looking like a condition, and the rules
            // after it would not be reported unreachable.
            // (A pattern that matches the empty text matches every text unless anchored, as
            // `^$` is: hence the samples.)
            let always = |re: regex::Regex| ["", "a", "\n", "Hello, world."].iter().all(|t| re.is_match(t));
            if regex::Regex::new(&src).is_ok_and(always) {
                return Err(format!(
                    "policy `{file}`: rules[{i}].regex (line {rline}) = `{src}` matches every request (even an empty one); remove the condition, or make the pattern require something"
                ));
            }
            let re = regex::Regex::new(&src).map_err(|e| {
                format!(
                    "policy `{file}`: rules[{i}].regex (line {rline}) = `{src}` is not a valid regex: {e}; see https://docs.rs/regex/#syntax"
                )
            })?;
            Some(Pattern(re))
        }
    };
    let mut header_conds = BTreeMap::new();
    for (name, value) in headers.unwrap_or_default() {
        let lower = name.to_ascii_lowercase();
        if axum::http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(format!("{}: `{name}` is not a valid HTTP header name", at("headers")));
        }
        if value.is_empty() {
            return Err(format!(
                "{}.{lower}: the value must not be empty; use `\"*\"` to match any value",
                at("headers")
            ));
        }
        header_conds.insert(lower, value);
    }
    if let Some(v) = local_load_below {
        let Some(BackendConfig::Local(s)) = tiers.get(&tier).map(|t| &t.backend) else {
            return Err(format!(
                "{}: tier `{tier}` is not a `local` tier, and the condition reads the rule's own tier's load",
                at("local_load_below")
            ));
        };
        let max_load = (s.max_concurrent + s.queue_capacity) as f64 / s.max_concurrent as f64;
        if !(v.is_finite() && v > 0.0 && v <= max_load) {
            return Err(format!(
                "{} = {v} must be in (0, {max_load}]: load is requests running or waiting / max_concurrent, at most (max_concurrent + queue_capacity) / max_concurrent",
                at("local_load_below")
            ));
        }
    }
    if let Some(0) = max_local_output_tokens {
        return Err(format!("{} must be > 0", at("max_local_output_tokens")));
    }
    // These act only on a local tier's answer or saturation; on a rule that can reach no
    // local tier they would look like settings while doing nothing.
    let is_local = |t: &String| matches!(tiers.get(t).map(|t| &t.backend), Some(BackendConfig::Local(_)));
    let answered_by = std::iter::once(&tier).chain(&fallback);
    let local_only = [
        (
            "max_local_output_tokens",
            max_local_output_tokens.is_some(),
            std::iter::once(&tier).chain(&over_cost_tier).any(is_local),
            "`tier` nor `over_cost_tier`",
        ),
        (
            "on_saturated",
            on_saturated.is_some(),
            answered_by.clone().any(is_local),
            "`tier` nor any `fallback` tier",
        ),
        (
            "min_confidence",
            escalate.is_some(),
            answered_by.chain(&on_saturated).any(is_local),
            "`tier`, `fallback` nor `on_saturated`",
        ),
    ];
    for (key, given, reaches_local, which) in local_only {
        if given && !reaches_local {
            return Err(format!(
                "{} does nothing here: it acts on a `local` tier's answers, and neither {which} is a local tier; remove it or route to a local tier",
                at(key)
            ));
        }
    }
    if let Some(c) = max_cost_usd
        && !(c.is_finite() && c > 0.0)
    {
        return Err(format!("{} = {c} must be a number > 0 (USD)", at("max_cost_usd")));
    }
    if over_cost_tier.is_some() && max_cost_usd.is_none() {
        return Err(format!(
            "{}: `over_cost_tier` needs `max_cost_usd`, the estimated cost above which it applies",
            at("over_cost_tier")
        ));
    }
    Ok(Rule {
        name: rname,
        tier,
        when: When {
            score_below,
            score_at_least,
            max_prompt_tokens,
            min_prompt_tokens,
            models,
            min_turns,
            max_turns,
            tools,
            json_mode,
            images,
            regex,
            keywords: keywords.map(|k| k.iter().map(|s| s.to_lowercase()).collect()),
            api_keys,
            teams,
            headers: header_conds,
            local_load_below,
        },
        then: Then {
            on_saturated,
            fallback,
            escalate,
        },
        caps: Caps {
            max_local_output_tokens,
            max_cost_usd,
            over_cost_tier,
        },
    })
}

#[cfg(test)]
pub(crate) mod tests;
