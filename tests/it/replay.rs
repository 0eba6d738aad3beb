//! `tiergate replay` against the in-process gateway: every line is sent, the report covers
//! exactly this run's requests, and the shipped workload goes through whole.

use std::path::PathBuf;

use indicatif::ProgressBar;
use serde_json::json;

use crate::common::{gateway, repo, user};
use tiergate::replay::{ReplayArgs, read_workload, run};

fn args(url: &str, key: &str, file: PathBuf) -> ReplayArgs {
    ReplayArgs {
        api_key: Some(key.to_owned()),
        file,
        url: url.to_owned(),
        rate: None,
        concurrency: 3,
        timeout_secs: 30.0,
    }
}

#[tokio::test]
async fn replay_reports_exactly_its_own_requests() {
    let gw = gateway().await;
    // Traffic before the replay must not show in its report.
    let r = gw.post_chat(&user("tiergate-auto", "Earlier request")).await;
    assert_eq!(r.status(), 200);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("w.jsonl");
    let long = "Derive the closed form of the sum of squares and prove it by induction. ".repeat(4);
    let mut streamed = user("tiergate-auto", "Capital of Italy?");
    streamed["stream"] = true.into();
    let lines = [
        user("tiergate-auto", "Capital of France?"),
        user("tiergate-auto", "Capital of Peru?"),
        streamed,
        user("tiergate-auto", &long),
        user("no-such-model", "hi"),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n\n")).collect();
    std::fs::write(&file, text).expect("write workload");

    let mut a = args(&gw.url, &gw.key, file);
    a.rate = Some(500.0);
    let done = run(&a, ProgressBar::hidden()).await.expect("replay");
    assert_eq!(done.sent, 5);
    assert_eq!(done.failed, 0);
    assert_eq!(
        done.statuses.iter().map(|(s, n)| (*s, *n)).collect::<Vec<_>>(),
        [(200, 4), (404, 1)]
    );
    let t = &done.report.totals.stats;
    assert_eq!(t.requests, 5, "{:#?}", done.report);
    assert_eq!(t.errors, 1);
    let tiers: Vec<(&str, u64)> = done
        .report
        .tiers
        .iter()
        .map(|s| (s.tier.as_str(), s.requests))
        .collect();
    assert_eq!(tiers, [("small", 3), ("cloud", 1), (tiergate::report::UNROUTED, 1)]);
    assert_eq!(
        done.report.filter.request_id_prefix.as_deref(),
        Some(done.prefix.as_str())
    );
    // The ids it sent are the ones in the ledger.
    let rows = gw.ledger().await;
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r.request_id.as_str())
        .filter(|id| id.starts_with(&done.prefix))
        .collect();
    assert_eq!(ids.len(), 5);
    assert!(done.summary().starts_with("replayed 5 requests in "));
    assert!(done.summary().contains("4 × 200, 1 × 404"));
}

#[tokio::test]
async fn the_shipped_workload_goes_through_whole() {
    let gw = gateway().await;
    let file = repo().join("examples/workloads/mixed.jsonl");
    let n = read_workload(&file).expect("valid workload").len();
    assert!((60..=100).contains(&n), "{n} requests");
    let done = run(&args(&gw.url, &gw.key, file), ProgressBar::hidden())
        .await
        .expect("replay");
    assert_eq!(done.statuses.get(&200), Some(&n), "{:?}", done.statuses);
    assert_eq!(done.report.totals.stats.requests as usize, n);
    // A mix: both tiers get work, and streamed requests are accounted with real usage.
    assert!(done.report.tiers.iter().all(|s| s.requests > 0));
    assert_eq!(done.report.tiers.len(), 2);
    assert_eq!(done.report.totals.stats.tokens_estimated, 0);
}

#[tokio::test]
async fn bad_workloads_and_missing_gateways_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, format!("{}\n[1, 2]\n", json!({"model": "m"}))).expect("write");
    let e = read_workload(&file).expect_err("line 2 is an array");
    assert!(e.to_string().contains("line 2: not a JSON object"), "{e}");
    std::fs::write(&file, "{\"model\": \n").expect("write");
    let e = read_workload(&file).expect_err("broken JSON");
    assert!(e.to_string().contains("line 1: not JSON"), "{e}");

    std::fs::write(&file, format!("{}\n", user("tiergate-auto", "hi"))).expect("write");
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let e = run(
        &args(&format!("http://127.0.0.1:{port}"), "tg-none", file),
        ProgressBar::hidden(),
    )
    .await
    .expect_err("no gateway");
    assert!(format!("{e:#}").contains("no gateway answers at"), "{e:#}");
}
