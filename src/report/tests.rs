//! The report over two ledgers (two replicas) filled with known rows. Costs are binary
//! fractions so sums are exact and asserted with `==`.

use std::path::{Path, PathBuf};

use super::render::{self, Format};
use super::{Filter, Report, ReportError, UNROUTED, build, parse_time};
use crate::ledger::{Ledger, Record};

/// 2025-06-15 15:06:40 UTC: a fixed time so snapshots are stable.
const T0: i64 = 1_750_000_000_000;

#[derive(Clone, Copy)]
struct Row {
    s: i64,
    tier: Option<&'static str>,
    rule: Option<&'static str>,
    outcome: &'static str,
    latency: f64,
    ttft: Option<f64>,
    gateway: f64,
    cost: f64,
    baseline: f64,
    tokens: (u64, u64),
}

fn ok(s: i64, tier: &'static str, latency: f64, gateway: f64, cost: f64, baseline: f64) -> Row {
    let rule = if tier == "small" { "routine" } else { "default" };
    Row {
        s,
        tier: Some(tier),
        rule: Some(rule),
        outcome: "ok",
        latency,
        ttft: Some(latency / 2.0),
        gateway,
        cost,
        baseline,
        tokens: (100, 50),
    }
}

fn record(i: usize, r: Row, replica: &str) -> Record {
    Record {
        ts_ms: T0 + r.s * 1000,
        request_id: format!("{replica}-{i:03}"),
        api_key_id: Some(
            if i % 2 == 0 {
                "key-aaaaaaaaaaaa"
            } else {
                "key-bbbbbbbbbbbb"
            }
            .into(),
        ),
        requested_model: Some("tiergate-auto".into()),
        tier: r.tier.map(Into::into),
        backend_model: r.tier.map(|t| format!("model-{t}")),
        score: r.tier.map(|_| 0.25),
        scorer: r.tier.map(|_| "length".into()),
        policy: r.tier.map(|_| "balanced".into()),
        rule: r.rule.map(Into::into),
        prompt_tokens: r.tokens.0,
        completion_tokens: r.tokens.1,
        tokens_estimated: false,
        ttft_ms: if r.outcome == "ok" { r.ttft } else { None },
        latency_ms: r.latency,
        gateway_ms: r.gateway,
        cost_usd: r.cost,
        baseline_cost_usd: r.baseline,
        outcome: r.outcome.into(),
        http_status: if r.outcome == "ok" { 200 } else { 502 },
        streamed: i % 3 == 0,
        fallback: false,
        escalated: false,
        attempts: Vec::new(),
    }
}

async fn write(path: &Path, rows: Vec<Record>) {
    let ledger = Ledger::start(path, 1000, 64).expect("ledger starts");
    for r in rows {
        ledger.record(r);
    }
    ledger.shutdown().await;
}

/// Replica A: five small, two cloud (one a fallback), one timeout, one malformed request.
/// Replica B: one small, one abandoned small stream, one escalated cloud request.
async fn two_replicas(dir: &Path) -> Vec<PathBuf> {
    let a_rows = [
        ok(0, "small", 10.0, 1.0, 0.125, 1.0),
        ok(1, "small", 20.0, 2.0, 0.125, 1.0),
        ok(2, "small", 30.0, 3.0, 0.125, 1.0),
        ok(3, "small", 40.0, 4.0, 0.125, 1.0),
        ok(4, "cloud", 1000.0, 5.0, 2.0, 2.0),
        ok(5, "cloud", 3000.0, 6.0, 2.0, 2.0),
        Row {
            outcome: "upstream_timeout",
            ttft: None,
            tokens: (100, 0),
            ..ok(6, "cloud", 30000.0, 7.0, 0.25, 0.25)
        },
        Row {
            tier: None,
            rule: None,
            outcome: "invalid_json",
            ttft: None,
            tokens: (0, 0),
            ..ok(7, "small", 0.5, 0.5, 0.0, 0.0)
        },
    ];
    let mut a: Vec<Record> = a_rows.iter().enumerate().map(|(i, r)| record(i, *r, "a")).collect();
    a[5].fallback = true;
    let b_rows = [
        ok(10, "small", 50.0, 8.0, 0.125, 1.0),
        Row {
            outcome: "client_disconnected",
            ..ok(11, "small", 700.0, 0.25, 0.0625, 0.5)
        },
        ok(12, "cloud", 2000.0, 9.0, 2.5, 2.0),
    ];
    let mut b: Vec<Record> = b_rows.iter().enumerate().map(|(i, r)| record(i, *r, "b")).collect();
    b[2].escalated = true;
    let pa = dir.join("replica-a.db");
    let pb = dir.join("replica-b.db");
    write(&pa, a).await;
    write(&pb, b).await;
    vec![pa, pb]
}

async fn report(filter: Filter) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = two_replicas(dir.path()).await;
    build(&paths, &filter).expect("report")
}

#[tokio::test]
async fn totals_and_savings_add_up_across_replicas() {
    let r = report(Filter::default()).await;
    let t = &r.totals;
    assert_eq!(r.ledgers, 2);
    assert_eq!(t.stats.requests, 11);
    assert_eq!(t.stats.cost_usd, 0.125 * 5.0 + 0.0625 + 2.0 * 2.0 + 0.25 + 2.5);
    assert_eq!(t.stats.baseline_cost_usd, 5.0 + 0.5 + 4.0 + 0.25 + 2.0);
    assert_eq!(t.savings_usd, 11.75 - 7.4375);
    assert_eq!(t.savings_pct, Some((11.75 - 7.4375) / 11.75));
    assert_eq!(t.stats.errors, 2, "timeout and malformed; not the disconnect");
    assert_eq!(t.stats.disconnected, 1);
    assert_eq!(t.stats.fallbacks, 1);
    assert_eq!(t.stats.escalations, 1);
    assert_eq!(t.stats.prompt_tokens, 100 * 10);
    assert_eq!(t.stats.completion_tokens, 50 * 9);
    assert_eq!(r.first_ts_ms, Some(T0));
    assert_eq!(r.last_ts_ms, Some(T0 + 12_000));
}

#[tokio::test]
async fn per_tier_figures_and_exact_percentiles_merge_both_files() {
    let r = report(Filter::default()).await;
    let names: Vec<&str> = r.tiers.iter().map(|s| s.tier.as_str()).collect();
    assert_eq!(names, ["small", "cloud", UNROUTED], "busiest first");

    let small = &r.tiers[0];
    assert_eq!(small.requests, 6);
    assert_eq!(small.share, 6.0 / 11.0);
    assert_eq!(small.cost_usd, 0.6875);
    assert_eq!(small.baseline_cost_usd, 5.5);
    assert_eq!(small.errors, 0);
    assert_eq!(small.disconnected, 1);
    // Successful small latencies: 10, 20, 30, 40 (A) and 50 (B); the abandoned 700 ms
    // stream is not a latency sample.
    assert_eq!(small.latency_ms.count, 5);
    assert_eq!(small.latency_ms.p50, Some(30.0));
    assert_eq!(small.latency_ms.p95, Some(50.0));
    assert_eq!(small.latency_ms.p99, Some(50.0));
    assert_eq!(small.ttft_ms.p50, Some(15.0));

    let cloud = &r.tiers[1];
    assert_eq!(cloud.requests, 4);
    assert_eq!(cloud.errors, 1);
    assert_eq!(cloud.error_rate, 0.25);
    assert_eq!((cloud.fallbacks, cloud.escalations), (1, 1));
    // 1000 and 3000 from A, 2000 from B: the median comes from the other file.
    assert_eq!(cloud.latency_ms.count, 3);
    assert_eq!(cloud.latency_ms.p50, Some(2000.0));
    assert_eq!(cloud.latency_ms.p95, Some(3000.0));

    let unrouted = &r.tiers[2];
    assert_eq!((unrouted.requests, unrouted.errors), (1, 1));
    assert_eq!(unrouted.latency_ms.count, 0);
    assert_eq!(unrouted.latency_ms.p50, None);

    // All eight successful requests: 10 20 30 40 50 1000 2000 3000.
    let all = &r.totals.stats.latency_ms;
    assert_eq!(
        (all.count, all.p50, all.p95, all.p99),
        (8, Some(40.0), Some(3000.0), Some(3000.0))
    );
    // Overhead over the ten routed requests: 0.25 1 2 3 4 5 6 7 8 9.
    let g = &r.totals.gateway_ms;
    assert_eq!((g.count, g.p50, g.p99), (10, Some(4.0), Some(9.0)));
}

#[tokio::test]
async fn filters_narrow_every_figure() {
    let by_key = report(Filter {
        key: Some("key-aaaaaaaaaaaa".into()),
        ..Filter::default()
    })
    .await;
    // Even row indices in each file: A 0,2,4,6 and B 0,2.
    assert_eq!(by_key.totals.stats.requests, 6);

    let window = report(Filter {
        since_ms: Some(T0 + 4_000),
        until_ms: Some(T0 + 11_000),
        ..Filter::default()
    })
    .await;
    // Seconds 4, 5, 6, 7 (A) and 10 (B): the bounds are [since, until).
    assert_eq!(window.totals.stats.requests, 5);
    // The series covers [since, until) in 1-second buckets.
    assert_eq!(window.series.bucket_ms, 1000);
    assert_eq!(window.series.points.first().map(|p| p.ts_ms), Some(T0 + 4000));
    assert_eq!(window.series.points.len(), 7);

    let replica_b = report(Filter {
        request_id_prefix: Some("b-".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(replica_b.totals.stats.requests, 3);
    assert_eq!(replica_b.totals.stats.escalations, 1);

    let other_policy = report(Filter {
        policy: Some("cost-saver".into()),
        ..Filter::default()
    })
    .await;
    assert_eq!(other_policy.totals.stats.requests, 0);
    assert!(other_policy.tiers.is_empty());
    assert_eq!(other_policy.totals.savings_pct, None);
}

#[tokio::test]
async fn series_histogram_and_rules_count_every_request_once() {
    let r = report(Filter::default()).await;
    // 13 s of traffic: the finest buckets (1 s) that give at most 60 points, empty
    // seconds (8 and 9) included.
    assert_eq!(r.series.bucket_ms, 1000);
    assert_eq!(r.series.points.len(), 13);
    assert_eq!(r.series.points[8].requests, 0);
    let n: u64 = r.series.points.iter().map(|p| p.requests).sum();
    assert_eq!(n, 11);
    let cost: f64 = r.series.points.iter().map(|p| p.cost_usd).sum();
    assert_eq!(cost, r.totals.stats.cost_usd);
    let at = |s: usize, tier: &str| r.series.points[s].requests_by_tier.get(tier).copied();
    assert_eq!(
        (at(10, "small"), at(11, "small"), at(12, "cloud")),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(r.series.points[12].ts_ms, T0 + 12_000);

    let h = &r.latency_histogram;
    let small = h.tiers.get("small").expect("small histogram");
    assert_eq!(small.len(), h.bounds_ms.len() + 1);
    // <50: 10 20 30 40; <100: 50.
    assert_eq!(&small[..2], &[4, 1]);
    let cloud = h.tiers.get("cloud").expect("cloud histogram");
    // 1000 → [1000, 2500), 2000 → [1000, 2500), 3000 → [2500, 5000).
    assert_eq!(&cloud[4..7], &[0, 2, 1]);

    let rules: Vec<(&str, &str, u64)> = r
        .top_rules
        .iter()
        .map(|x| (x.rule.as_str(), x.tier.as_str(), x.requests))
        .collect();
    assert_eq!(rules, [("routine", "small", 6), ("default", "cloud", 4)]);
}

#[tokio::test]
async fn snapshots_of_table_json_and_csv() {
    let r = report(Filter::default()).await;
    insta::assert_snapshot!("table", render::render(&r, Format::Table));
    insta::assert_snapshot!("csv", render::render(&r, Format::Csv));
    insta::assert_snapshot!("json", render::render(&r, Format::Json));
    // The JSON is the report itself: what `/report.json` serves and `replay` reads back.
    let back: Report = serde_json::from_str(&render::json(&r)).expect("json parses back");
    assert_eq!(back, r);
}

#[tokio::test]
async fn an_empty_ledger_gives_an_empty_report_not_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("empty.db");
    write(&p, Vec::new()).await;
    let r = build(&[p], &Filter::default()).expect("report");
    assert_eq!(r.totals.stats.requests, 0);
    assert!(r.series.points.is_empty());
    assert!(render::table(&r).contains("0 requests from 1 ledger"));
}

#[test]
fn missing_or_foreign_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.db");
    let ReportError(e) = build(&[missing], &Filter::default()).expect_err("missing");
    assert!(e.contains("nope.db") && e.contains("no such file"), "{e}");
    let ReportError(e) = build(&[dir.path().to_path_buf()], &Filter::default()).expect_err("a directory");
    assert!(e.contains("is a directory; pass the ledger file in it"), "{e}");

    let foreign = dir.path().join("other.db");
    rusqlite::Connection::open(&foreign)
        .and_then(|c| c.execute_batch("CREATE TABLE t (x)"))
        .expect("foreign db");
    let ReportError(e) = build(&[foreign], &Filter::default()).expect_err("foreign");
    assert!(e.contains("other.db") && e.contains("not a tiergate ledger"), "{e}");
}

#[test]
fn times_are_durations_back_from_now_or_dates() {
    let now = T0;
    assert_eq!(parse_time("--since", "24h", now), Ok(now - 86_400_000));
    assert_eq!(parse_time("--since", "7d", now), Ok(now - 7 * 86_400_000));
    assert_eq!(
        parse_time("--since", "999999999999d", now),
        Ok(0),
        "clamped to the epoch"
    );
    assert_eq!(
        parse_time("--since", "2025-06-15T15:06:40Z", now),
        Ok(1_750_000_000_000)
    );
    assert_eq!(parse_time("--until", "2025-06-15", now), Ok(1_749_945_600_000));
    let e = parse_time("since", "yesterday", now).expect_err("not a time");
    assert!(e.0.contains("`since` = `yesterday`"), "{}", e.0);
}

#[test]
fn money_and_counts_are_readable() {
    assert_eq!(render::usd(0.0), "$0");
    assert_eq!(render::usd(0.000412), "$0.000412");
    assert_eq!(render::usd(0.0625), "$0.0625");
    assert_eq!(render::usd(1234.5), "$1,234.50");
    assert_eq!(render::usd(-2.0), "-$2.00");
    assert_eq!(render::thousands(1_234_567), "1,234,567");
}

#[test]
fn empty_filter_fields_mean_no_condition() {
    let args = super::FilterArgs {
        since: Some("1h".into()),
        until: Some(String::new()),
        key: Some("  ".into()),
        policy: Some("balanced".into()),
        request_id_prefix: None,
    };
    let f = args.filter(T0).expect("valid");
    assert_eq!(
        f,
        Filter {
            since_ms: Some(T0 - 3_600_000),
            policy: Some("balanced".into()),
            ..Filter::default()
        }
    );
}

#[test]
fn a_key_secret_given_as_the_key_filter_is_refused_without_echoing_it() {
    let secret = "tg-0123456789abcdef0123456789abcdef";
    let args = super::FilterArgs {
        key: Some(format!(" {secret}")),
        ..super::FilterArgs::default()
    };
    let (e, param) = args.filter(T0).expect_err("refused");
    assert_eq!(param, "key");
    assert!(e.0.contains("key's id") && !e.0.contains(secret), "{}", e.0);
}

#[tokio::test]
async fn a_closed_ledger_reads_the_same_as_immutable_whatever_its_path() {
    // The fallback for a ledger in a directory the reader cannot write; the odd characters
    // must survive the `file:` URI that immutable mode needs.
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = dir.path().join("a?b#c%20d");
    std::fs::create_dir(&odd).expect("dir");
    let paths = two_replicas(&odd).await;
    // As a gateway leaves it at exit: every row in the database file.
    rusqlite::Connection::open(&paths[0])
        .expect("open")
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint");
    let count = |immutable| {
        let (conn, has_table) = super::query::open_checked(&paths[0], immutable).expect("opens");
        assert!(has_table);
        conn.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get::<_, i64>(0))
            .expect("count")
    };
    let immutable = count(true);
    assert!(immutable > 0);
    assert_eq!(immutable, count(false));
}

#[tokio::test]
async fn one_ledger_named_twice_is_refused_rather_than_counted_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = two_replicas(dir.path()).await;
    let again = dir.path().join(".").join("replica-a.db");
    let e = build(&[paths[0].clone(), paths[1].clone(), again], &Filter::default()).expect_err("refused");
    assert!(
        e.0.contains("is the same file as") && e.0.contains("pass each ledger once"),
        "{}",
        e.0
    );
}

#[test]
fn a_ledger_of_another_layout_is_named_as_such_by_the_report_and_the_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    rusqlite::Connection::open(&path)
        .expect("open")
        .execute_batch("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts_ms INTEGER, outcome TEXT);")
        .expect("old table");
    let e = build(std::slice::from_ref(&path), &Filter::default()).expect_err("refused");
    assert!(
        e.0.contains("written by another version of tiergate") && e.0.contains("no `request_id`"),
        "{}",
        e.0
    );
    let e = crate::ledger::Ledger::start(&path, 8, 8)
        .err()
        .expect("refused at start");
    assert!(e.contains("written by another version of tiergate"), "{e}");
}
