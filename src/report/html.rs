//! The `/report` page: the report as HTML with inline SVG charts drawn on the server (no
//! script, no CDN, nothing fetched). maud escapes every value, so tier, rule and policy
//! names from configuration cannot inject markup.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::render::{headline, ms, pct, thousands, timestamp, usd};
use super::{FilterArgs, Report, Series, Stats};

/// Colours for tiers, in the order of `Report::tiers` (busiest first), so a tier keeps its
/// colour across every chart of the page. Chosen to stay apart for colour-blind readers.
const PALETTE: &[&str] = &[
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#999999",
];
const COST: &str = "#d55e00";
const BASELINE: &str = "#7f7f7f";

const W: f64 = 640.0;
const H: f64 = 240.0;
/// Plot margins: left (y labels), right, top, bottom (x labels).
const ML: f64 = 64.0;
const MR: f64 = 12.0;
const MT: f64 = 12.0;
const MB: f64 = 28.0;

const STYLE: &str = r#"
:root { color-scheme: light; font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
body { margin: 0 auto; max-width: 1360px; padding: 16px 24px 48px; color: #1b1f24; background: #f6f7f9; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 16px; margin: 0 0 8px; }
.sub { color: #57606a; font-size: 13px; margin-bottom: 16px; }
form { display: flex; gap: 8px; flex-wrap: wrap; align-items: end; font-size: 12px; margin-bottom: 16px; }
form label { display: flex; flex-direction: column; gap: 2px; color: #57606a; }
form input { font: inherit; padding: 4px 6px; border: 1px solid #c9d1d9; border-radius: 4px; width: 140px; }
form button { font: inherit; padding: 5px 12px; border-radius: 4px; border: 1px solid #1f6feb; background: #1f6feb; color: white; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(180px, 1fr)); gap: 12px; margin-bottom: 16px; }
.tile { background: white; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.tile .k { font-size: 12px; color: #57606a; }
.tile .v { font-size: 24px; font-weight: 600; margin-top: 2px; }
.tile .v.good { color: #1a7f37; }
.tile .n { font-size: 12px; color: #57606a; margin-top: 2px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
.card { background: white; border-radius: 8px; padding: 14px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card svg { width: 100%; height: auto; display: block; }
.legend { display: flex; gap: 14px; flex-wrap: wrap; font-size: 12px; color: #57606a; margin-top: 6px; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; margin-right: 5px; border-radius: 2px; background: var(--c); vertical-align: -1px; }
svg text { font-size: 11px; fill: #57606a; }
svg .grid line { stroke: #eaeef2; }
svg .axis { stroke: #8c959f; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 8px; text-align: right; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { color: #57606a; font-weight: 600; }
tr.total td { font-weight: 600; border-top: 2px solid #d0d7de; }
.empty { padding: 32px; text-align: center; color: #57606a; }
.foot { font-size: 12px; color: #57606a; margin-top: 16px; }
"#;

/// The `<head>` both pages share.
fn page_head() -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { "tiergate: cost and latency report" }
            // An empty icon, so the browser does not ask for /favicon.ico (a 404).
            link rel="icon" href="data:,";
            style { (PreEscaped(STYLE)) }
        }
    }
}

/// The page for a filter that was refused (`message` says why), with the form filled back
/// in to correct it: a browser user gets the form again, not a JSON error.
pub fn refusal_page(message: &str, args: &FilterArgs) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            (page_head())
            body {
                h1 { "tiergate cost and latency report" }
                (filter_form(args))
                div.card.empty role="alert" { "The filter was not applied: " (message) }
            }
        }
    }
    .into_string()
}

/// The whole page for `report`, with `args` filled back into the filter form.
pub fn page(r: &Report, args: &FilterArgs) -> String {
    let colour = |tier: &str| -> &'static str {
        let i = r.tiers.iter().position(|s| s.tier == tier).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let t = &r.totals;
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (page_head())
            body {
                h1 { "tiergate cost and latency report" }
                div.sub { (headline(r)) }
                (filter_form(args))
                div.tiles {
                    (tile("Saved", &usd(t.savings_usd), t.savings_pct.map(|p| format!("{} less than all-cloud", pct(p))), true))
                    (tile("Actual cost", &usd(t.stats.cost_usd), None, false))
                    (tile("All on the baseline model", &usd(t.stats.baseline_cost_usd), Some("what sending everything to the cloud would cost".into()), false))
                    (tile("Requests", &thousands(t.stats.requests), Some(format!("{} errors ({})", thousands(t.stats.errors), pct(t.stats.error_rate))), false))
                    (tile("Gateway overhead p50 / p99", &format!("{} / {} ms", ms(t.gateway_ms.p50), ms(t.gateway_ms.p99)), Some("routing time before calling the tier".into()), false))
                }
                @if t.stats.requests == 0 {
                    div.card.empty { "No requests in this window yet. Send some through the gateway, or widen the filter." }
                } @else {
                    div.grid {
                        div.card {
                            h2 { "Cumulative cost: actual vs all-cloud" }
                            (savings_chart(&r.series))
                            div.legend {
                                span style=(format!("--c:{COST}")) { "actual" }
                                span style=(format!("--c:{BASELINE}")) { "all on the baseline model" }
                            }
                        }
                        div.card {
                            h2 { "Requests per tier over time" }
                            (tier_series_chart(r, &colour))
                            (legend(r, &colour))
                        }
                        div.card {
                            h2 { "Latency distribution per tier (ms, successful requests)" }
                            (latency_chart(r, &colour))
                            (legend(r, &colour))
                        }
                        div.card {
                            h2 { "Top rules by traffic" }
                            (rules_chart(r, &colour))
                        }
                    }
                    div.card style="margin-top:16px" {
                        h2 { "Per tier" }
                        (tier_table(r))
                    }
                }
                div.foot {
                    "Same data as " a href="report.json" { "report.json" } ". "
                    "Latency percentiles count successful requests; errors exclude requests the client abandoned. "
                    "Several replicas: run " code { "tiergate report --ledger A.db --ledger B.db" } "."
                }
            }
        }
    };
    markup.into_string()
}

fn tile(k: &str, v: &str, note: Option<String>, good: bool) -> Markup {
    html! {
        div.tile {
            div.k { (k) }
            div.v.good[good] { (v) }
            @if let Some(n) = note { div.n { (n) } }
        }
    }
}

fn filter_form(a: &FilterArgs) -> Markup {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    html! {
        form method="get" action="report" {
            label { "since" input name="since" placeholder="24h, 7d, 2025-06-01" value=(v(&a.since)); }
            label { "until" input name="until" placeholder="1h, 2025-06-02" value=(v(&a.until)); }
            label { "key id" input name="key" placeholder="key_…" value=(v(&a.key)); }
            label { "policy" input name="policy" value=(v(&a.policy)); }
            label { "request id prefix" input name="request_id_prefix" value=(v(&a.request_id_prefix)); }
            button type="submit" { "Apply" }
        }
    }
}

fn legend(r: &Report, colour: &dyn Fn(&str) -> &'static str) -> Markup {
    html! {
        div.legend {
            @for s in &r.tiers {
                span style=(format!("--c:{}", colour(&s.tier))) { (s.tier) }
            }
        }
    }
}

/// A "nice" axis maximum (1, 2, 4 or 8 × 10^k) at or above `v`: its quarters, where the
/// grid lines go, are round too (a maximum of 50 would put a line at 12.5 requests).
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 4.0, 8.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * mag)
}

fn num(v: f64) -> String {
    if v == v.round() && v.abs() < 1e15 {
        thousands(v.abs() as u64)
    } else {
        format!("{v}")
    }
}

/// Horizontal grid lines and y labels for a plot whose axis runs from 0 to `max`.
fn y_axis(max: f64, label: &dyn Fn(f64) -> String) -> Markup {
    let ph = H - MT - MB;
    html! {
        g.grid {
            @for i in 0..=4 {
                @let y = MT + ph - ph * f64::from(i) / 4.0;
                line x1=(ML) x2=(W - MR) y1=(y) y2=(y) {}
                text x=(ML - 6.0) y=(y + 4.0) text-anchor="end" { (label(max * f64::from(i) / 4.0)) }
            }
        }
        line.axis x1=(ML) x2=(W - MR) y1=(H - MB) y2=(H - MB) {}
    }
}

/// Labels under the first, middle and last of `n` slots of width `slot` starting at ML.
fn time_labels(s: &Series, slot: f64) -> Markup {
    let n = s.points.len();
    let label = |ts: i64| {
        let full = timestamp(ts);
        // `2025-06-01 12:00:05 UTC` → `12:00:05`, `06-01 12:00` or `2025-06-01`, as fine
        // as the buckets.
        let part = if s.bucket_ms < 60_000 {
            full.get(11..19)
        } else if s.bucket_ms < 86_400_000 {
            full.get(5..16)
        } else {
            full.get(..10)
        };
        part.unwrap_or(&full).to_owned()
    };
    let picks: Vec<usize> = match n {
        0 => vec![],
        1 => vec![0],
        2 => vec![0, 1],
        _ => vec![0, n / 2, n - 1],
    };
    html! {
        @for i in picks {
            // The outer labels hang inwards so the plot's edges do not clip them.
            @let (x, anchor) = match i {
                0 if n > 1 => (ML, "start"),
                _ if i + 1 == n && n > 1 => (W - MR, "end"),
                _ => (ML + slot * (i as f64 + 0.5), "middle"),
            };
            text x=(format!("{x:.1}")) y=(H - 8.0) text-anchor=(anchor) { (label(s.points[i].ts_ms)) }
        }
    }
}

fn svg(chart: &str, body: Markup) -> Markup {
    html! {
        svg data-chart=(chart) viewBox=(format!("0 0 {W} {H}")) role="img" xmlns="http://www.w3.org/2000/svg" {
            (body)
        }
    }
}

/// Two cumulative lines, with the gap between them (the savings) shaded. Each line starts
/// at zero at the window's start and steps at each bucket's end, so even one bucket of
/// traffic draws a line rather than a dot.
fn savings_chart(s: &Series) -> Markup {
    let (mut c, mut b) = (0.0, 0.0);
    let mut cum_cost = vec![0.0];
    let mut cum_base = vec![0.0];
    for p in &s.points {
        c += p.cost_usd;
        b += p.baseline_cost_usd;
        cum_cost.push(c);
        cum_base.push(b);
    }
    let max = nice_max(c.max(b));
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let n = s.points.len().max(1);
    let slot = pw / n as f64;
    // Point k is the end of bucket k-1 (point 0: the start of the first bucket).
    let x = |k: usize| ML + slot * k as f64;
    let y = |v: f64| MT + ph - ph * v / max;
    let xy = |k: usize, v: f64| format!("{:.1},{:.1}", x(k), y(v));
    let line = |vals: &[f64]| {
        vals.iter()
            .enumerate()
            .map(|(k, v)| xy(k, *v))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut area: Vec<String> = cum_base.iter().enumerate().map(|(k, v)| xy(k, *v)).collect();
    area.extend(cum_cost.iter().enumerate().rev().map(|(k, v)| xy(k, *v)));
    svg(
        "savings",
        html! {
            (y_axis(max, &|v| usd(v)))
            polygon.mark points=(area.join(" ")) fill="#2da44e" fill-opacity="0.15" {}
            polyline.mark points=(line(&cum_base)) fill="none" stroke=(BASELINE) stroke-width="2" stroke-dasharray="5 3" {}
            polyline.mark points=(line(&cum_cost)) fill="none" stroke=(COST) stroke-width="2.5" {}
            @for (i, p) in s.points.iter().enumerate() {
                circle cx=(format!("{:.1}", x(i + 1))) cy=(format!("{:.1}", y(cum_cost[i + 1]))) r="2.5" fill=(COST) {
                    title { "by " (timestamp(p.ts_ms + s.bucket_ms)) ": " (usd(cum_cost[i + 1])) " so far, vs " (usd(cum_base[i + 1])) " all-cloud" }
                }
            }
            (time_labels(s, slot))
        },
    )
}

/// Stacked bars: one per time bucket, one segment per tier.
fn tier_series_chart(r: &Report, colour: &dyn Fn(&str) -> &'static str) -> Markup {
    let s = &r.series;
    let max = nice_max(s.points.iter().map(|p| p.requests).max().unwrap_or(0) as f64);
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let slot = pw / s.points.len().max(1) as f64;
    let bw = (slot * 0.8).max(1.0);
    // Segments bottom-up in the tiers' order: (point, tier, count, requests below it).
    let mut segments = Vec::new();
    for (i, p) in s.points.iter().enumerate() {
        let mut below = 0u64;
        for t in &r.tiers {
            if let Some(&n) = p.requests_by_tier.get(&t.tier) {
                segments.push((i, p.ts_ms, t.tier.as_str(), n, below));
                below += n;
            }
        }
    }
    svg(
        "tiers",
        html! {
            (y_axis(max, &num))
            @for (i, ts, tier, n, below) in segments {
                @let x = ML + slot * i as f64 + (slot - bw) / 2.0;
                @let y0 = MT + ph - ph * below as f64 / max;
                @let h = ph * n as f64 / max;
                rect.mark x=(format!("{x:.1}")) y=(format!("{:.1}", y0 - h)) width=(format!("{bw:.1}")) height=(format!("{h:.1}")) fill=(colour(tier)) {
                    title { (timestamp(ts)) ": " (thousands(n)) " on " (tier) }
                }
            }
            (time_labels(s, slot))
        },
    )
}

/// Grouped bars: per latency bucket, each tier's share of its own successful requests, so
/// a busy tier and a quiet one compare on the same scale.
fn latency_chart(r: &Report, colour: &dyn Fn(&str) -> &'static str) -> Markup {
    let h = &r.latency_histogram;
    let buckets = h.bounds_ms.len() + 1;
    let tiers: Vec<(&Stats, Vec<f64>)> = r
        .tiers
        .iter()
        .filter_map(|s| {
            let counts = h.tiers.get(&s.tier)?;
            let n: u64 = counts.iter().sum();
            (n > 0).then(|| (s, counts.iter().map(|c| *c as f64 / n as f64).collect()))
        })
        .collect();
    let max = nice_max(tiers.iter().flat_map(|(_, f)| f.iter().copied()).fold(0.0, f64::max)).min(1.0);
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let slot = pw / buckets as f64;
    let bw = (slot * 0.8) / tiers.len().max(1) as f64;
    let bucket_label = |i: usize| -> String {
        let fmt = |v: f64| {
            if v >= 1000.0 {
                format!("{}s", v / 1000.0)
            } else {
                format!("{v}")
            }
        };
        match (i.checked_sub(1).map(|j| h.bounds_ms[j]), h.bounds_ms.get(i)) {
            (None, Some(hi)) => format!("<{}", fmt(*hi)),
            (Some(lo), _) if i == h.bounds_ms.len() => format!("≥{}", fmt(lo)),
            (Some(lo), Some(hi)) => format!("{}–{}", fmt(lo), fmt(*hi)),
            _ => String::new(),
        }
    };
    svg(
        "latency",
        html! {
            (y_axis(max, &|v| format!("{:.0}%", v * 100.0)))
            @for b in 0..buckets {
                @for (k, (s, fr)) in tiers.iter().enumerate() {
                    @let f = fr[b];
                    @if f > 0.0 {
                        @let x = ML + slot * b as f64 + slot * 0.1 + bw * k as f64;
                        @let hgt = ph * f / max;
                        rect.mark x=(format!("{x:.1}")) y=(format!("{:.1}", MT + ph - hgt)) width=(format!("{bw:.1}")) height=(format!("{hgt:.1}")) fill=(colour(&s.tier)) {
                            title { (s.tier) ", " (bucket_label(b)) " ms: " (pct(f)) " of its successful requests" }
                        }
                    }
                }
                text x=(format!("{:.1}", ML + slot * (b as f64 + 0.5))) y=(H - 8.0) text-anchor="middle" { (bucket_label(b)) }
            }
        },
    )
}

/// Horizontal bars: requests decided by each rule, labelled `rule → tier`.
fn rules_chart(r: &Report, colour: &dyn Fn(&str) -> &'static str) -> Markup {
    let rows = r.top_rules.len().max(1);
    let row_h = 22.0;
    let height = MT + row_h * rows as f64 + 8.0;
    let label_w = 200.0;
    let max = r.top_rules.iter().map(|x| x.requests).max().unwrap_or(1).max(1) as f64;
    let bar_w = W - label_w - 110.0;
    html! {
        svg data-chart="rules" viewBox=(format!("0 0 {W} {height}")) role="img" xmlns="http://www.w3.org/2000/svg" {
            @for (i, x) in r.top_rules.iter().enumerate() {
                @let y = MT + row_h * i as f64;
                @let w = (bar_w * x.requests as f64 / max).max(1.0);
                text x=(label_w - 8.0) y=(y + 14.0) text-anchor="end" {
                    @if let Some(p) = &x.policy { (p) " / " }
                    (x.rule) " → " (x.tier)
                }
                rect.mark x=(label_w) y=(y + 3.0) width=(format!("{w:.1}")) height="15" rx="2" fill=(colour(&x.tier)) {
                    title { (thousands(x.requests)) " requests, " (usd(x.cost_usd)) " (all-cloud " (usd(x.baseline_cost_usd)) ")" }
                }
                text x=(format!("{:.1}", label_w + w + 6.0)) y=(y + 14.0) { (thousands(x.requests)) " (" (pct(x.share)) ")" }
            }
        }
    }
}

fn tier_table(r: &Report) -> Markup {
    let row = |s: &Stats, total: bool| {
        html! {
            tr.total[total] {
                td { (s.tier) }
                td { (thousands(s.requests)) }
                td { (pct(s.share)) }
                td { (thousands(s.prompt_tokens)) }
                td { (thousands(s.completion_tokens)) }
                td { (usd(s.cost_usd)) }
                td { (usd(s.baseline_cost_usd)) }
                td { (ms(s.ttft_ms.p50)) " / " (ms(s.ttft_ms.p95)) " / " (ms(s.ttft_ms.p99)) }
                td { (ms(s.latency_ms.p50)) " / " (ms(s.latency_ms.p95)) " / " (ms(s.latency_ms.p99)) }
                td { (thousands(s.errors)) " (" (pct(s.error_rate)) ")" }
                td { (thousands(s.fallbacks)) }
                td { (thousands(s.escalations)) }
            }
        }
    };
    html! {
        table {
            thead { tr {
                th { "tier" } th { "requests" } th { "share" } th { "tokens in" } th { "tokens out" }
                th { "cost" } th { "all-cloud cost" } th { "TTFT ms p50/p95/p99" }
                th { "latency ms p50/p95/p99" } th { "errors" } th { "fallbacks" } th { "escalations" }
            } }
            tbody {
                @for s in &r.tiers { (row(s, false)) }
                (row(&r.totals.stats, true))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FilterArgs, nice_max, page};
    use crate::report::{Report, RuleStats, Stats};

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 8.0);
        assert_eq!(nice_max(22.0), 40.0);
        assert_eq!(nice_max(101.0), 200.0);
        assert_eq!(nice_max(0.3), 0.4);
    }

    #[test]
    fn names_from_configuration_are_escaped() {
        let evil = "<img src=x onerror=alert(1)>";
        let tier = Stats {
            tier: evil.into(),
            requests: 1,
            ..Stats::default()
        };
        let mut r = Report {
            tiers: vec![tier.clone()],
            top_rules: vec![RuleStats {
                rule: evil.into(),
                tier: evil.into(),
                requests: 1,
                ..RuleStats::default()
            }],
            ..Report::default()
        };
        r.totals.stats.requests = 1;
        let args = FilterArgs {
            policy: Some("\"><script>".into()),
            ..FilterArgs::default()
        };
        let html = page(&r, &args);
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<script"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
    }
}
