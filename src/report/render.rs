//! Turns a [`Report`] into text: a terminal table (comfy-table), CSV (one row per tier
//! plus `total`) or JSON. Pure formatting: no I/O, no arithmetic beyond display.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};
use serde::Serialize;

use super::{Percentiles, Report, Stats};

/// Output formats of `tiergate report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

pub fn render(r: &Report, format: Format) -> String {
    match format {
        Format::Table => table(r),
        Format::Json => json(r),
        Format::Csv => csv(r),
    }
}

pub fn json(r: &Report) -> String {
    // A report holds only strings and finite numbers, so this cannot fail.
    serde_json::to_string_pretty(r).unwrap_or_default() + "\n"
}

/// Dollars with enough digits to see sub-cent costs (`$0.000412`) without drowning large
/// ones (`$1,234.50`).
pub fn usd(v: f64) -> String {
    let a = v.abs();
    let sign = if v < 0.0 { "-" } else { "" };
    if a == 0.0 {
        "$0".to_owned()
    } else if a >= 1.0 {
        let cents = (a * 100.0).round() as u64;
        format!("{sign}${}.{:02}", thousands(cents / 100), cents % 100)
    } else if a >= 0.01 {
        format!("{sign}${a:.4}")
    } else {
        format!("{sign}${a:.6}")
    }
}

pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

pub fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn triple(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".to_owned();
    }
    format!("{} / {} / {}", ms(p.p50), ms(p.p95), ms(p.p99))
}

/// `2025-06-01 12:00:00 UTC`.
pub fn timestamp(ms: i64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(fmt).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// One line saying what the report covers.
pub fn headline(r: &Report) -> String {
    let mut s = format!(
        "tiergate report: {} requests from {} ledger{}",
        thousands(r.totals.stats.requests),
        r.ledgers,
        if r.ledgers == 1 { "" } else { "s" }
    );
    if let (Some(a), Some(b)) = (r.first_ts_ms, r.last_ts_ms) {
        s.push_str(&format!(", {} to {}", timestamp(a), timestamp(b)));
    }
    let f = &r.filter;
    let mut filters = Vec::new();
    if let Some(t) = f.since_ms {
        filters.push(format!("since {}", timestamp(t)));
    }
    if let Some(t) = f.until_ms {
        filters.push(format!("until {}", timestamp(t)));
    }
    if let Some(k) = &f.key {
        filters.push(format!("key {k}"));
    }
    if let Some(p) = &f.policy {
        filters.push(format!("policy {p}"));
    }
    if let Some(p) = &f.request_id_prefix {
        filters.push(format!("request ids {p}*"));
    }
    if !filters.is_empty() {
        s.push_str(&format!(" ({})", filters.join(", ")));
    }
    s
}

/// A table with `header`, one row per tier and the total, numbers right-aligned. Cells
/// never wrap: a number cut in two reads as two numbers.
fn stats_table(r: &Report, header: &[&str], row: impl Fn(&Stats) -> Vec<String>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for s in r.tiers.iter().chain(std::iter::once(&r.totals.stats)) {
        t.add_row(row(s));
    }
    for i in 1..header.len() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// The terminal report: volume and cost per tier, then latency and errors per tier (two
/// tables, so each fits a common terminal), then the totals.
pub fn table(r: &Report) -> String {
    let volume = stats_table(
        r,
        &[
            "tier",
            "requests",
            "share",
            "tokens in",
            "tokens out",
            "cost",
            "all-cloud cost",
        ],
        |s| {
            vec![
                s.tier.clone(),
                thousands(s.requests),
                pct(s.share),
                thousands(s.prompt_tokens),
                thousands(s.completion_tokens),
                usd(s.cost_usd),
                usd(s.baseline_cost_usd),
            ]
        },
    );
    let latency = stats_table(
        r,
        &[
            "tier",
            "TTFT ms\np50 / p95 / p99",
            "latency ms\np50 / p95 / p99",
            "errors",
            "fallbacks",
            "escalations",
        ],
        |s| {
            vec![
                s.tier.clone(),
                triple(&s.ttft_ms),
                triple(&s.latency_ms),
                format!("{} ({})", thousands(s.errors), pct(s.error_rate)),
                thousands(s.fallbacks),
                thousands(s.escalations),
            ]
        },
    );

    let tot = &r.totals;
    let mut s = Table::new();
    s.load_preset(UTF8_FULL_CONDENSED);
    s.add_row(vec!["actual cost".to_owned(), usd(tot.stats.cost_usd)]);
    s.add_row(vec![
        "all on the baseline model".to_owned(),
        usd(tot.stats.baseline_cost_usd),
    ]);
    s.add_row(vec![
        "savings".to_owned(),
        match tot.savings_pct {
            Some(p) => format!("{} ({})", usd(tot.savings_usd), pct(p)),
            None => usd(tot.savings_usd),
        },
    ]);
    s.add_row(vec![
        "gateway overhead p50 / p99".to_owned(),
        format!("{} / {} ms", ms(tot.gateway_ms.p50), ms(tot.gateway_ms.p99)),
    ]);
    if let Some(c) = s.column_mut(1) {
        c.set_cell_alignment(CellAlignment::Right);
    }
    let mut out = format!("{}\n\n{volume}\n{latency}\n{s}\n", headline(r));
    if tot.stats.tokens_estimated > 0 {
        out.push_str(&format!(
            "{} requests have estimated token counts (the upstream reported no usage).\n",
            thousands(tot.stats.tokens_estimated)
        ));
    }
    out
}

#[derive(Serialize)]
struct CsvRow<'a> {
    tier: &'a str,
    requests: u64,
    share: f64,
    prompt_tokens: u64,
    completion_tokens: u64,
    tokens_estimated: u64,
    cost_usd: f64,
    baseline_cost_usd: f64,
    savings_usd: f64,
    errors: u64,
    error_rate: f64,
    disconnected: u64,
    fallbacks: u64,
    escalations: u64,
    ttft_p50_ms: Option<f64>,
    ttft_p95_ms: Option<f64>,
    ttft_p99_ms: Option<f64>,
    latency_p50_ms: Option<f64>,
    latency_p95_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
}

/// `v` to `places` decimals: sums of float costs and latencies carry binary noise
/// (`160.28683099999998`) that a spreadsheet would show. Nano-dollars, microseconds and
/// millionths of a share are finer than any figure here means.
fn round(v: f64, places: i32) -> f64 {
    let k = 10f64.powi(places);
    (v * k).round() / k
}

impl<'a> From<&'a Stats> for CsvRow<'a> {
    fn from(s: &'a Stats) -> Self {
        let usd = |v: f64| round(v, 9);
        let ms = |v: Option<f64>| v.map(|v| round(v, 3));
        CsvRow {
            tier: &s.tier,
            requests: s.requests,
            share: round(s.share, 6),
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            tokens_estimated: s.tokens_estimated,
            cost_usd: usd(s.cost_usd),
            baseline_cost_usd: usd(s.baseline_cost_usd),
            savings_usd: usd(s.baseline_cost_usd - s.cost_usd),
            errors: s.errors,
            error_rate: round(s.error_rate, 6),
            disconnected: s.disconnected,
            fallbacks: s.fallbacks,
            escalations: s.escalations,
            ttft_p50_ms: ms(s.ttft_ms.p50),
            ttft_p95_ms: ms(s.ttft_ms.p95),
            ttft_p99_ms: ms(s.ttft_ms.p99),
            latency_p50_ms: ms(s.latency_ms.p50),
            latency_p95_ms: ms(s.latency_ms.p95),
            latency_p99_ms: ms(s.latency_ms.p99),
        }
    }
}

/// One row per tier, then `total`; the columns are the JSON's per-tier fields, flattened.
pub fn csv(r: &Report) -> String {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    for s in r.tiers.iter().chain(std::iter::once(&r.totals.stats)) {
        // Writing plain fields into a Vec cannot fail.
        let _ = w.serialize(CsvRow::from(s));
    }
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}
