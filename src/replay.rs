//! `tiergate replay`: sends a recorded workload (one chat request body per line) through a
//! running gateway, tagging each request's id with a run prefix, then fetches the report
//! for exactly those requests from the gateway's `/report.json`. It never reads a ledger
//! file itself, so it works against a gateway on another machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::report::Report;

/// How long the report may lag behind the last answer: the ledger writes in batches, off
/// the request path. Waited for in short polls, never in one sleep.
const REPORT_WAIT: Duration = Duration::from_secs(10);
const REPORT_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Workload: one chat-completions request body (JSON) per line; blank lines are skipped.
    pub file: PathBuf,
    /// Base URL of the running gateway.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Requests started per second (default: as fast as `--concurrency` allows).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 300.0)]
    pub timeout_secs: f64,
    /// The gateway key to send (`tiergate keys create`); also used for `/report.json`.
    #[arg(long, env = "TIERGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// What a replay did: how the requests ended, and the gateway's report for them.
#[derive(Debug)]
pub struct Replay {
    /// Prefix of every request id this run sent (`replay-…-`).
    pub prefix: String,
    pub sent: usize,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer (connection refused, timeout, cut stream).
    pub failed: usize,
    pub elapsed: Duration,
    pub report: Report,
}

impl Replay {
    /// `replayed 75 requests in 12.3 s: 74 × 200, 1 × 502`.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self.statuses.iter().map(|(s, n)| format!("{n} × {s}")).collect();
        if self.failed > 0 {
            parts.push(format!("{} without an answer", self.failed));
        }
        let mut s = format!(
            "replayed {} requests in {:.1} s: {}",
            self.sent,
            self.elapsed.as_secs_f64(),
            parts.join(", ")
        );
        let seen = self.report.totals.stats.requests as usize;
        let answered: usize = self.statuses.values().sum();
        if seen < answered {
            s.push_str(&format!(
                "\nnote: the ledger holds {seen} of them so far (rows are written in batches, or were dropped: see `/readyz`)"
            ));
        }
        s
    }
}

/// Reads a workload: every non-blank line must be a JSON object.
pub fn read_workload(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read workload `{}`", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => out.push(line.to_owned()),
            Ok(_) => bail!(
                "workload `{}` line {}: not a JSON object (one request body per line)",
                path.display(),
                i + 1
            ),
            Err(e) => bail!("workload `{}` line {}: not JSON: {e}", path.display(), i + 1),
        }
    }
    if out.is_empty() {
        bail!("workload `{}` has no requests", path.display());
    }
    Ok(out)
}

/// A progress bar on stderr (hidden when stderr is not a terminal); `run` sets its length.
pub fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} requests, {per_sec}, eta {eta} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// Replays `args.file` against the gateway at `args.url`, reporting progress on `bar`.
pub async fn run(args: &ReplayArgs, bar: ProgressBar) -> anyhow::Result<Replay> {
    if args.concurrency == 0 {
        bail!("`--concurrency` must be at least 1");
    }
    let interval = match args.rate {
        Some(r) if r.is_finite() && r > 0.0 => Some(Duration::from_secs_f64(1.0 / r)),
        Some(_) => bail!("`--rate` must be a number of requests per second > 0"),
        None => None,
    };
    if !(args.timeout_secs.is_finite() && args.timeout_secs > 0.0) {
        bail!("`--timeout-secs` must be > 0");
    }
    let bodies = read_workload(&args.file)?;
    let base = args.url.trim_end_matches('/').to_owned();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = &args.api_key {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}"))
            .map_err(|_| anyhow::anyhow!("`--api-key` is not a valid header value"))?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout_secs))
        .default_headers(headers)
        .build()?;
    client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("no gateway answers at `{base}`; start one with `tiergate serve` or pass `--url`"))?;

    let prefix = format!(
        "replay-{}-{}-",
        time::OffsetDateTime::now_utc().unix_timestamp(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    bar.set_length(bodies.len() as u64);
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut ticker = interval.map(tokio::time::interval);
    let mut tasks: JoinSet<Result<u16, reqwest::Error>> = JoinSet::new();
    for (n, body) in bodies.iter().enumerate() {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        let permit = permits.clone().acquire_owned().await?;
        let req = client
            .post(format!("{base}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-request-id", format!("{prefix}{n:05}"))
            .body(body.clone());
        let bar = bar.clone();
        tasks.spawn(async move {
            let result = async {
                let resp = req.send().await?;
                let status = resp.status().as_u16();
                // Read to the end: a streamed answer is only done (and in the ledger with
                // its real latency) once the stream is.
                resp.bytes().await?;
                Ok(status)
            }
            .await;
            drop(permit);
            bar.inc(1);
            result
        });
    }
    let mut statuses = BTreeMap::new();
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(status) => *statuses.entry(status).or_default() += 1,
            Err(e) => {
                failed += 1;
                bar.suspend(|| tracing::warn!(error = %e, "request failed"));
            }
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    // Every answered request has a ledger row (a request that never connected may not).
    let answered = statuses.values().sum();
    let report = fetch_report(&client, &base, &prefix, answered).await?;
    Ok(Replay {
        prefix,
        sent: bodies.len(),
        statuses,
        failed,
        elapsed,
        report,
    })
}

/// The gateway's report for ids starting with `prefix`, once it holds `expected` rows or
/// [`REPORT_WAIT`] has passed.
async fn fetch_report(client: &reqwest::Client, base: &str, prefix: &str, expected: usize) -> anyhow::Result<Report> {
    let deadline = Instant::now() + REPORT_WAIT;
    loop {
        let report: Report = client
            .get(format!("{base}/report.json"))
            .query(&[("request_id_prefix", prefix)])
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("cannot fetch `{base}/report.json`"))?
            .json()
            .await
            .with_context(|| format!("`{base}/report.json` is not a tiergate report"))?;
        if report.totals.stats.requests as usize >= expected || Instant::now() >= deadline {
            return Ok(report);
        }
        tokio::time::sleep(REPORT_POLL).await;
    }
}
