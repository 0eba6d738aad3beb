//! `GET /report` and `GET /report.json` after real traffic through the gateway: the JSON
//! is the same report `tiergate report` builds from the ledger, and the page carries its
//! four charts.

use serde_json::Value;

use crate::common::{Gateway, gateway, user};

/// Three short prompts (→ small, one streamed), two long ones (→ cloud) and one request
/// for an unknown model (rejected before routing).
async fn traffic(gw: &Gateway) {
    for i in 0..3 {
        let mut body = user("tiergate-auto", &format!("Capital of France? ({i})"));
        if i == 0 {
            body["stream"] = true.into();
        }
        let r = gw.post_chat(&body).await;
        assert_eq!(r.status(), 200);
        r.text().await.expect("body");
    }
    let long = "Explain, step by step and with examples, how a B-tree index speeds up range queries. ".repeat(4);
    for _ in 0..2 {
        let r = gw.post_chat(&user("tiergate-auto", &long)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tiergate-tier"], "cloud");
    }
    let r = gw.post_chat(&user("no-such-model", "hi")).await;
    assert_eq!(r.status(), 404);
    gw.ledger_rows(6).await;
}

async fn get(gw: &Gateway, path: &str) -> reqwest::Response {
    gw.client()
        .get(format!("{}{path}", gw.url))
        .send()
        .await
        .expect("gateway answers")
}

#[tokio::test]
async fn report_json_is_the_ledger_report() {
    let gw = gateway().await;
    traffic(&gw).await;
    let r = get(&gw, "/report.json").await;
    assert_eq!(r.status(), 200);
    let json: Value = r.json().await.expect("json");
    let report: tiergate::report::Report = serde_json::from_value(json.clone()).expect("a report");

    // Same code path as `tiergate report --format json` on the same ledger.
    let direct = tiergate::report::build(
        std::slice::from_ref(&gw.ledger_path),
        &tiergate::report::Filter::default(),
    )
    .expect("report");
    assert_eq!(report, direct);

    let t = &report.totals.stats;
    assert_eq!(t.requests, 6);
    assert_eq!(t.errors, 1, "the unknown model");
    let tier = |name: &str| {
        report
            .tiers
            .iter()
            .find(|s| s.tier == name)
            .unwrap_or_else(|| panic!("tier {name} in {json}"))
    };
    assert_eq!(tier("small").requests, 3);
    assert_eq!(tier("cloud").requests, 2);
    assert_eq!(tier(tiergate::report::UNROUTED).requests, 1);
    // The fake reports 11 prompt and 4 completion tokens for every answer, streamed too.
    assert_eq!((t.prompt_tokens, t.completion_tokens), (11 * 5, 4 * 5));
    let small = (11.0 * 0.1 + 4.0 * 0.2) / 1e6;
    let cloud = (11.0 * 2.5 + 4.0 * 10.0) / 1e6;
    assert!((t.cost_usd - (3.0 * small + 2.0 * cloud)).abs() < 1e-15);
    assert!((t.baseline_cost_usd - 5.0 * cloud).abs() < 1e-15);
    assert!((report.totals.savings_usd - 3.0 * (cloud - small)).abs() < 1e-15);
    assert_eq!(tier("small").latency_ms.count, 3);
    assert_eq!(report.totals.gateway_ms.count, 5);
    let rules: Vec<(&str, u64)> = report.top_rules.iter().map(|r| (r.rule.as_str(), r.requests)).collect();
    assert_eq!(rules, [("routine", 3), ("default", 2)]);
}

#[tokio::test]
async fn report_json_filters_like_the_cli() {
    let gw = gateway().await;
    traffic(&gw).await;
    let json: Value = get(&gw, "/report.json?policy=test&since=1h&until=")
        .await
        .json()
        .await
        .expect("json");
    // The unknown-model request has no policy.
    assert_eq!(json["totals"]["requests"], 5);
    assert_eq!(json["filter"]["policy"], "test");
    assert_eq!(json["filter"]["until_ms"], Value::Null);

    let r = get(&gw, "/report.json?since=last-tuesday").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "invalid_request");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("last-tuesday"), "{msg}");
    assert_eq!(body["error"]["param"], "since");

    // A misspelt or repeated filter, or an empty window, must not quietly report the whole
    // ledger or nothing.
    for (query, param) in [
        ("sinse=1h", "sinse"),
        ("since=1h&since=2h", "since"),
        ("since=1h&until=2h", "since"),
        ("until=yesterday-ish", "until"),
    ] {
        let r = get(&gw, &format!("/report.json?{query}")).await;
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.expect("an OpenAI error envelope");
        assert_eq!(body["error"]["code"], "invalid_request", "{query}");
        assert_eq!(body["error"]["param"], param, "{query}");
    }
    // The page answers a browser with the form again and the reason, not with JSON.
    for (query, says, kept) in [
        ("sinse=1h", "unknown field `sinse`", ""),
        (
            "since=last-tuesday&policy=balanced",
            "last-tuesday",
            "value=\"balanced\"",
        ),
    ] {
        let r = get(&gw, &format!("/report?{query}")).await;
        assert_eq!(r.status(), 400, "{query}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("text/html")
        );
        let page = r.text().await.expect("page");
        assert!(
            page.contains("The filter was not applied") && page.contains(says),
            "{page}"
        );
        assert!(page.contains("<form") && page.contains(kept), "{page}");
    }
}

#[tokio::test]
async fn report_page_draws_every_chart() {
    let gw = gateway().await;
    traffic(&gw).await;
    let r = get(&gw, "/report").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/html"))
    );
    let html = r.text().await.expect("html");
    for chart in ["savings", "tiers", "latency", "rules"] {
        let at = html
            .find(&format!("data-chart=\"{chart}\""))
            .unwrap_or_else(|| panic!("chart {chart} missing"));
        let svg = &html[at..at + html[at..].find("</svg>").expect("closed svg")];
        assert!(svg.contains("class=\"mark\""), "chart {chart} has no marks");
    }
    assert!(html.contains("routine → small"));
    // Self-contained: nothing fetched from elsewhere, no script.
    assert!(!html.contains("<script"));
    assert!(!html.contains("src=\"http"));

    let empty = get(&gw, "/report?policy=nothing-here").await;
    let html = empty.text().await.expect("html");
    assert!(html.contains("No requests in this window"));
    assert!(html.contains("value=\"nothing-here\""), "the form keeps the filter");
}
