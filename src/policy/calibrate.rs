//! Threshold calibration: given the scores and facts of a sample workload, the score
//! threshold of one rule that sends a target share of the sample to a tier, and the
//! rewrite of that threshold in the policy file (comments and layout kept).

use super::{Facts, Policy};

/// Which threshold of the rule is calibrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    ScoreBelow,
    ScoreAtLeast,
}

impl Key {
    pub fn name(self) -> &'static str {
        match self {
            Key::ScoreBelow => "score_below",
            Key::ScoreAtLeast => "score_at_least",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub rule: String,
    pub key: Key,
    pub threshold: f64,
    /// Sample requests the policy sends to the target tier with `threshold`.
    pub to_tier: usize,
    pub total: usize,
    /// The same with the threshold the file has now.
    pub current: Option<(f64, usize)>,
}

impl Calibration {
    pub fn share(&self) -> f64 {
        self.to_tier as f64 / self.total.max(1) as f64
    }
}

/// The rule to calibrate: `name`, or the first rule with a score threshold.
pub fn pick_rule(policy: &Policy, name: Option<&str>) -> Result<(usize, Key), String> {
    let found = match name {
        Some(n) => policy
            .rules
            .iter()
            .position(|r| r.name == n)
            .ok_or_else(|| format!("policy `{}` has no rule named `{n}`", policy.file.display()))?,
        None => policy
            .rules
            .iter()
            .position(|r| r.when.score_below.is_some() || r.when.score_at_least.is_some())
            .ok_or_else(|| {
                format!(
                    "policy `{}` has no rule with `score_below` or `score_at_least` to calibrate",
                    policy.file.display()
                )
            })?,
    };
    let w = &policy.rules[found].when;
    let key = match (w.score_below, w.score_at_least) {
        (Some(_), _) => Key::ScoreBelow,
        (None, Some(_)) => Key::ScoreAtLeast,
        (None, None) => {
            return Err(format!(
                "rule `{}` has no `score_below` or `score_at_least`; add one (any value) to calibrate it",
                policy.rules[found].name
            ));
        }
    };
    Ok((found, key))
}

fn count(policy: &Policy, sample: &[Facts], tier: &str) -> usize {
    sample.iter().filter(|f| policy.decide(f).tier == tier).count()
}

/// Tries every threshold between adjacent sample scores (rounded to 4 decimals) and keeps
/// the one whose share to `tier` is closest to `target`; on a tie, the lower share (the
/// cheaper one when `tier` is the costly tier).
pub fn calibrate(
    policy: &Policy,
    rule: usize,
    key: Key,
    sample: &[Facts],
    tier: &str,
    target: f64,
) -> Result<Calibration, String> {
    if sample.is_empty() {
        return Err("the sample is empty".to_owned());
    }
    let mut scores: Vec<f64> = sample.iter().map(|f| f.score).collect();
    scores.sort_by(f64::total_cmp);
    scores.dedup();
    // `score_below = 0` never matches, so a policy may not hold it: the lowest threshold for
    // it lies just under the lowest sample score instead (the rule then takes none of the
    // sample, which is what 0 would have said).
    let floor = match key {
        Key::ScoreBelow => (scores[0] / 2.0 * 10_000.0).floor().max(1.0) / 10_000.0,
        Key::ScoreAtLeast => 0.0,
    };
    let mut candidates = vec![floor, 1.0];
    candidates.extend(
        scores
            .windows(2)
            .map(|w| ((w[0] + w[1]) / 2.0 * 10_000.0).round() / 10_000.0),
    );
    // A threshold just past the top score: `score_below` then takes every sample request.
    candidates.extend(
        scores
            .last()
            .map(|s| ((s * 10_000.0).floor() + 1.0).min(10_000.0) / 10_000.0),
    );
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    let w = &policy.rules[rule].when;
    let current = match key {
        Key::ScoreBelow => w.score_below,
        Key::ScoreAtLeast => w.score_at_least,
    };
    let mut trial = policy.clone();
    let mut best: Option<(f64, usize)> = None;
    for t in candidates {
        let w = &mut trial.rules[rule].when;
        match key {
            Key::ScoreBelow => w.score_below = Some(t),
            Key::ScoreAtLeast => w.score_at_least = Some(t),
        }
        // A candidate that would make the rule unmatchable is not a setting the file could hold.
        if let (Some(lo), Some(hi)) = (w.score_at_least, w.score_below)
            && lo >= hi
        {
            continue;
        }
        let n = count(&trial, sample, tier);
        let dist = |n: usize| (n as f64 / sample.len() as f64 - target).abs();
        if best.is_none_or(|(_, b)| dist(n) < dist(b) - 1e-12 || ((dist(n) - dist(b)).abs() <= 1e-12 && n < b)) {
            best = Some((t, n));
        }
    }
    let (threshold, to_tier) = best.ok_or("no threshold in 0..=1 keeps the rule matchable")?;
    Ok(Calibration {
        rule: policy.rules[rule].name.clone(),
        key,
        threshold,
        to_tier,
        total: sample.len(),
        current: current.map(|c| (c, count(policy, sample, tier))),
    })
}

/// `text` with rule `rule`'s `key` set to `value`, everything else (comments, order,
/// spacing) as it was.
pub fn rewrite(text: &str, rule: &str, key: Key, value: f64) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let rules = doc
        .get_mut("rules")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or("the policy has no `[[rules]]`")?;
    let table = rules
        .iter_mut()
        .find(|t| t.get("name").and_then(toml_edit::Item::as_str) == Some(rule))
        .ok_or_else(|| format!("no `[[rules]]` with name = `{rule}`"))?;
    let mut new = toml_edit::Value::from(value);
    match table.get_mut(key.name()).and_then(toml_edit::Item::as_value_mut) {
        Some(old) => {
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => {
            table.insert(key.name(), toml_edit::Item::Value(new));
        }
    }
    Ok(doc.to_string())
}
