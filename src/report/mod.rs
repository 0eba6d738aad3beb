//! The cost-savings report: per-tier cost, counterfactual cost, tokens, latency percentiles
//! and errors, computed with SQL over one or more ledger files (one per gateway replica).
//! It only reads ledgers (opened read-only) and never holds a whole ledger in memory.

pub mod html;
mod query;
pub mod render;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use query::build;

/// The tier label of rows that never reached a tier (malformed or rejected requests).
pub const UNROUTED: &str = "(unrouted)";

/// Upper bounds (ms, exclusive) of the latency histogram's buckets; a last bucket takes
/// everything slower. Roughly logarithmic, so a 30 ms local answer and a 20 s reasoning
/// answer both land in a readable bucket.
pub const LATENCY_BOUNDS_MS: &[f64] = &[50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0];

/// Which rows a report covers. Every condition is optional; all given ones must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// Inclusive lower bound on `ts_ms`.
    pub since_ms: Option<i64>,
    /// Exclusive upper bound on `ts_ms`.
    pub until_ms: Option<i64>,
    /// `api_key_id` as stored in the ledger (the key's id, `key_` + 12 hex digits), never the key.
    pub key: Option<String>,
    pub policy: Option<String>,
    /// Only requests whose id starts with this (what `tiergate replay` sends).
    pub request_id_prefix: Option<String>,
}

/// A filter as a person writes it: on the command line (`tiergate report --since 24h`) or
/// in the query string (`/report?since=24h`). Empty values mean "no condition", as an
/// empty field of the page's form sends them.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterArgs {
    /// Only requests since this: a duration back from now (`24h`, `7d`, `90m`), an RFC 3339
    /// time (`2025-06-01T12:00:00Z`) or a UTC date (`2025-06-01`). Default: all.
    #[arg(long)]
    pub since: Option<String>,
    /// Only requests before this (same forms as `--since`). Default: all.
    #[arg(long)]
    pub until: Option<String>,
    /// Only requests made with this API key id, as stored in the ledger (`key_` + 12 hex
    /// digits, as `tiergate keys list` shows it; never the key itself).
    #[arg(long)]
    pub key: Option<String>,
    /// Only requests routed by this policy (its `name`).
    #[arg(long)]
    pub policy: Option<String>,
    /// Only requests whose id starts with this (e.g. one `tiergate replay` run).
    #[arg(long, value_name = "PREFIX")]
    pub request_id_prefix: Option<String>,
}

impl FilterArgs {
    /// The filter these arguments ask for; an error names the argument (`since`, `until`)
    /// it is about.
    pub fn filter(&self, now_ms: i64) -> Result<Filter, (ReportError, &'static str)> {
        let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        let time = |what: &'static str, v: &Option<String>| {
            given(v)
                .map(|s| parse_time(what, &s, now_ms))
                .transpose()
                .map_err(|e| (e, what))
        };
        let since_ms = time("since", &self.since)?;
        let until_ms = time("until", &self.until)?;
        if let (Some(s), Some(u)) = (since_ms, until_ms)
            && s >= u
        {
            // The window `[since, until)` would be empty: a mistake, not a question.
            return Err((ReportError("`since` must be before `until`".to_owned()), "since"));
        }
        let key = given(&self.key);
        if key
            .as_deref()
            .is_some_and(|k| k.starts_with(crate::auth::store::KEY_PREFIX))
        {
            // A secret would be echoed in the report's header, JSON and page: refuse it unread.
            return Err((
                ReportError(
                    "`key` takes a key's id (`key_…`, as `tiergate keys list` shows it), not the key itself".to_owned(),
                ),
                "key",
            ));
        }
        Ok(Filter {
            since_ms,
            until_ms,
            key,
            policy: given(&self.policy),
            request_id_prefix: given(&self.request_id_prefix),
        })
    }
}

/// Exact nearest-rank percentiles of one measure over `count` rows (`None` when empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Figures for one tier, or for all tiers together (the totals).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Tier name, [`UNROUTED`], or `total`.
    pub tier: String,
    pub requests: u64,
    /// Share of all requests in the report, in [0,1].
    pub share: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Rows whose token counts are the gateway's estimate (the upstream reported none).
    pub tokens_estimated: u64,
    pub cost_usd: f64,
    /// What the same requests would have cost on the baseline cloud model.
    pub baseline_cost_usd: f64,
    /// Requests that ended in an error (any outcome but `ok` and `client_disconnected`).
    pub errors: u64,
    pub error_rate: f64,
    /// Requests the client abandoned before the answer was complete.
    pub disconnected: u64,
    pub fallbacks: u64,
    pub escalations: u64,
    /// Time to first token of successful requests.
    pub ttft_ms: Percentiles,
    /// Total latency of successful requests.
    pub latency_ms: Percentiles,
}

/// Totals with the savings against the all-cloud counterfactual.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    #[serde(flatten)]
    pub stats: Stats,
    pub savings_usd: f64,
    /// `savings_usd / baseline_cost_usd`; `None` when the counterfactual cost is zero.
    pub savings_pct: Option<f64>,
    /// Time the gateway spent before calling the tier, over routed requests.
    pub gateway_ms: Percentiles,
}

/// One time bucket of the series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Start of the bucket (Unix ms).
    pub ts_ms: i64,
    pub requests: u64,
    pub requests_by_tier: std::collections::BTreeMap<String, u64>,
    pub cost_usd: f64,
    pub baseline_cost_usd: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub bucket_ms: i64,
    /// Every bucket from the window's start to its end, empty ones included.
    pub points: Vec<Point>,
}

/// Counts of successful requests per latency bucket, per tier.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// [`LATENCY_BOUNDS_MS`]; each tier has one more count than bounds.
    pub bounds_ms: Vec<f64>,
    pub tiers: std::collections::BTreeMap<String, Vec<u64>>,
}

/// Traffic decided by one policy rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleStats {
    pub policy: Option<String>,
    pub rule: String,
    pub tier: String,
    pub requests: u64,
    pub share: f64,
    pub cost_usd: f64,
    pub baseline_cost_usd: f64,
}

/// The whole report; `--format json` and `GET /report.json` serialise exactly this.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub filter: Filter,
    /// How many ledger files were read (one per replica).
    pub ledgers: usize,
    /// First and last request time in the report (Unix ms); `None` when it is empty.
    pub first_ts_ms: Option<i64>,
    pub last_ts_ms: Option<i64>,
    pub totals: Totals,
    /// Busiest tier first, [`UNROUTED`] last.
    pub tiers: Vec<Stats>,
    pub series: Series,
    pub latency_histogram: LatencyHistogram,
    /// The ten rules that decided the most requests, busiest first.
    pub top_rules: Vec<RuleStats>,
}

/// A report that could not be made; the message names the ledger file.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ReportError(pub String);

impl ReportError {
    fn ledger(path: &Path, e: impl std::fmt::Display) -> Self {
        ReportError(format!("ledger `{}`: {e}", path.display()))
    }
}

/// Parses a `--since` / `--until` value: a duration back from `now_ms` (`24h`, `7d`,
/// `90m`), an RFC 3339 time (`2025-06-01T12:00:00Z`) or a UTC date (`2025-06-01`).
pub fn parse_time(what: &str, s: &str, now_ms: i64) -> Result<i64, ReportError> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        // Further back than the epoch is the whole ledger (and a time that can be shown).
        let ago = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(ago).max(0));
    }
    let rfc3339 = time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(s, date_fmt) {
        return Ok(d.midnight().assume_utc().unix_timestamp() * 1000);
    }
    Err(ReportError(format!(
        "`{what}` = `{s}` is neither a duration like `24h` or `7d` nor a time like \
         `2025-06-01T12:00:00Z` or `2025-06-01`"
    )))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
